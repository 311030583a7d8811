"""Screenshot of the Dagster UI's global asset graph with every group expanded.

Used by ``docs/screenshot.sh``. Chromium's ``--screenshot`` flag cannot press keys or click,
and the graph page starts with its groups collapsed, so this drives headless Chromium over the
DevTools protocol instead: open the page, wait for the graph, hide the side panels, press the
UI's own "expand all groups" shortcut (Alt+E), keep the default horizontal orientation (the
groups read source -> splits -> training -> evaluation -> publishing from left to right; the
vertical layout of the expanded graph is too tall to fit), double-click the graph's background
(the UI's "zoom to fit": the graph does not refit by itself after a re-layout), wait, save the
PNG.

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

# Wide and tall enough that the fitted graph draws each asset with its name readable.
WIDTH, HEIGHT = 1800, 1350
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


# A point of the graph's background (not a node, a group or a control) in the window.
EMPTY_GRAPH_POINT = """(() => {
  const svg = Array.from(document.querySelectorAll('svg')).find(s => +s.getAttribute('width') > 300);
  if (!svg) return null;
  const viewport = svg.parentElement.parentElement;
  const r = viewport.getBoundingClientRect();
  for (let fy = 0.05; fy < 0.95; fy += 0.05) {
    for (let fx = 0.05; fx < 0.9; fx += 0.05) {
      const x = r.left + fx * r.width, y = r.top + fy * r.height;
      const el = document.elementFromPoint(x, y);
      if (el === viewport || el === svg || el === svg.parentElement) return [x, y];
    }
  }
  return null;
})()"""


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

    async def double_click(self, x: float, y: float) -> None:
        for count in (1, 2):
            for kind in ("mousePressed", "mouseReleased"):
                await self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=count)

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
        await tools.wait_for("Array.from(document.querySelectorAll('svg foreignObject'))"
                             ".some(e => e.textContent.trim() === 'champion')", 60)
        await asyncio.sleep(3)  # re-layout
        point = await tools.evaluate(EMPTY_GRAPH_POINT)
        if not point:
            raise RuntimeError("no empty background in the graph to double-click")
        await tools.double_click(*point)  # the graph's "zoom to fit"
        await asyncio.sleep(5)  # zoom animation
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
