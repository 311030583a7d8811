"""Headless Chromium for the browser tests: Debian's chromium driven by Playwright.

Playwright's Python package brings its own driver (it runs offline); its browser downloads
(`playwright install`) are not used: the tests launch Debian's ``/usr/bin/chromium``
(`apt-get install -y chromium`; .ci/run installs it when it is missing) through
``executable_path``, headless, with a fresh profile in the test's temporary directory.

Also here: the MLflow UI (``mlflow ui`` on a free loopback port, stopped at the end) and the
command-line materialisation of the tiny graph that the browser tests look at.
"""

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from helpers.graph import REPO, TINY_PARTITION
from helpers.processes import free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # root in a container: Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
MISSING_CHROMIUM = (
    f"{CHROMIUM} is missing: the browser tests need Debian's chromium; "
    "install it with `apt-get install -y chromium` (.ci/run does this)"
)
PAGE_TIMEOUT_MS = 60_000  # any single wait for the page: navigation, an element, a condition
MATERIALIZE_TIMEOUT_S = 600
MLFLOW_START_TIMEOUT_S = 90


def require_chromium() -> Path:
    """Debian's chromium, or a test failure (not a skip) that says how to install it."""
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(MISSING_CHROMIUM, pytrace=False)
    return CHROMIUM


@contextmanager
def chromium_context(tmp: Path, width: int = 1600, height: int = 1000) -> Iterator:
    """A Playwright browser context of headless Debian chromium with a fresh profile in ``tmp``."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=PAGE_TIMEOUT_MS)  # its default is 5 s
    executable = require_chromium()
    profile = tmp / "chromium-profile"
    profile.mkdir(parents=True, exist_ok=False)  # fresh: nothing from an earlier run
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(executable),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": width, "height": height},
            timeout=PAGE_TIMEOUT_MS,
        )
        context.set_default_timeout(PAGE_TIMEOUT_MS)
        context.set_default_navigation_timeout(PAGE_TIMEOUT_MS)
        try:
            yield context
        finally:
            context.close()


def save_page(page, directory: Path, name: str) -> str:
    """A screenshot and the text of ``page`` in ``directory``; says where they are."""
    directory.mkdir(parents=True, exist_ok=True)
    saved = []
    try:
        page.screenshot(path=str(directory / f"{name}.png"), timeout=15_000)
        saved.append(str(directory / f"{name}.png"))
    except Exception as error:  # noqa: BLE001  (a failing page may not even render)
        saved.append(f"(no screenshot: {error})")
    try:
        text = f"URL: {page.url}\n\n{page.inner_text('body', timeout=15_000)}"
    except Exception as error:  # noqa: BLE001
        text = f"URL: {page.url}\n\n(no page text: {error})"
    (directory / f"{name}.txt").write_text(text)
    saved.append(str(directory / f"{name}.txt"))
    return ", ".join(saved)


@contextmanager
def saved_on_failure(page, directory: Path, name: str) -> Iterator[None]:
    """Turns a failed check or a Playwright timeout inside into an AssertionError that names
    the screenshot and the page text saved at that moment."""
    from playwright.sync_api import Error as PlaywrightError

    try:
        yield
    except (AssertionError, PlaywrightError) as error:
        where = save_page(page, directory, name)
        raise AssertionError(f"{name}: {error}\npage saved: {where}") from error


def materialize_tiny(env: dict, log_path: Path, partition: str = TINY_PARTITION) -> None:
    """The whole graph for one date with configs/run/tiny.yaml, from the CLI, into ``env``'s
    DAGSTER_HOME and TWOTOWER_HOME (what a user does before opening the UI)."""
    dagster = Path(sys.executable).with_name("dagster")
    command = [str(dagster), "asset", "materialize", "-m", "twotower_assets.definitions", "--select", "*",
               "--partition", partition, "-c", "configs/run/tiny.yaml"]
    with log_path.open("w") as log:
        try:
            result = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, timeout=MATERIALIZE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"materialising the tiny graph took over {MATERIALIZE_TIMEOUT_S}s (log: {log_path})")
    if result.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        pytest.fail(f"materialising the tiny graph failed ({result.returncode}, log: {log_path}):\n{tail}")


class MlflowUI:
    """``mlflow ui`` on the tracking store ``sqlite:///<home>/mlflow.db``, on a free loopback port."""

    def __init__(self, home: Path, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.home = home
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "MlflowUI":
        mlflow = Path(sys.executable).with_name("mlflow")
        env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no detached job workers (conftest.py)
        self.log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [str(mlflow), "ui", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.home / 'mlflow.db'}"],
            cwd=self.home, env=env, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group (uvicorn workers): stopped as one
        )
        deadline = time.monotonic() + MLFLOW_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                pytest.fail(f"mlflow ui exited with {self.process.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        self.stop()
        pytest.fail(f"mlflow ui did not answer in {MLFLOW_START_TIMEOUT_S}s:\n{self.tail()}")

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left of its group
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)
        self.log.close()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def label_matches(label: str, name: str) -> bool:
    """Whether a node label shows ``name``, in full or shortened around an ellipsis."""
    if "…" not in label:
        return label == name
    head, _, tail = label.partition("…")
    head, tail = head.rstrip("_."), tail.lstrip("_.")
    return re.fullmatch(re.escape(head) + r".*" + re.escape(tail), name) is not None
