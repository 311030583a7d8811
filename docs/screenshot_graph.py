"""Screenshot of the Dagster UI's global asset graph with every group expanded.

Used by ``docs/screenshot.sh``. Chromium's ``--screenshot`` flag cannot press keys, and the
graph page starts with its groups collapsed, so this drives headless Chromium over the
DevTools protocol instead: open the page, wait for the graph, press the UI's own "expand all
groups" shortcut (Alt+E), wait, save the PNG.

    python docs/screenshot_graph.py http://127.0.0.1:3000/asset-groups out.png
"""

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import websockets

WIDTH, HEIGHT = 1800, 1050
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    f"--window-size={WIDTH},{HEIGHT}",
    "--remote-debugging-port=0",
]


class DevTools:
    def __init__(self, socket):
        self.socket = socket
        self.next_id = 0

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        await self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(await self.socket.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await self.evaluate(expression):
                return
            await asyncio.sleep(0.5)
        raise TimeoutError(f"page never satisfied {expression!r}")

    async def press_alt(self, key: str) -> None:
        for kind in ("keyDown", "keyUp"):
            await self.call(
                "Input.dispatchKeyEvent", type=kind, modifiers=1, key=key, code=f"Key{key.upper()}",
                windowsVirtualKeyCode=ord(key.upper()),
            )


async def screenshot(url: str, out: Path, port: int) -> None:
    targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
    page = next(t for t in targets if t["type"] == "page")
    async with websockets.connect(page["webSocketDebuggerUrl"], max_size=64 * 2**20) as socket:
        tools = DevTools(socket)
        await tools.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)
        await tools.call("Page.navigate", url=url)
        # The graph is drawn as SVG once the asset layout is computed.
        await tools.wait_for("document.querySelectorAll('svg path').length > 20 && document.body.innerText.includes('publishing')", 90)
        await asyncio.sleep(3)
        # Give the graph the whole window: hide the navigation and the asset-tree sidebar.
        await tools.evaluate(
            "Array.from(document.querySelectorAll('button'))"
            ".filter(b => b.querySelector('[aria-label=\"panel_show_right\"]')).forEach(b => b.click())"
        )
        await asyncio.sleep(2)
        await tools.press_alt("e")  # the UI's "expand all groups" shortcut
        await asyncio.sleep(8)  # re-layout and zoom-to-fit animation
        shot = await tools.call("Page.captureScreenshot", format="png")
        out.write_bytes(base64.b64decode(shot["data"]))


def main(url: str, out: str) -> None:
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium not found: apt-get install -y chromium")
    profile = Path(tempfile.mkdtemp(prefix="chromium-"))
    browser = subprocess.Popen(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not active.exists() or not active.read_text().strip():
            if time.monotonic() > deadline or browser.poll() is not None:
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.2)
        port = int(active.read_text().splitlines()[0])
        asyncio.run(screenshot(url, Path(out), port))
    finally:
        browser.terminate()
        try:
            browser.wait(timeout=10)
        except subprocess.TimeoutExpired:
            browser.kill()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
