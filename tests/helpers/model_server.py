"""``mlflow models serve`` on a free loopback port, for the serving tests: started the way the
docs say (``--env-manager local``, ``-h 127.0.0.1``), stopped with its whole process group."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from helpers.processes import free_port

SERVER_START_TIMEOUT_S = 120
MLFLOW_CLI = Path(sys.executable).with_name("mlflow")


def wait_until_up(url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow models serve did not answer /ping in {SERVER_START_TIMEOUT_S} s:\n{log_path.read_text()}")


def stop(process: subprocess.Popen) -> None:
    # The CLI starts uvicorn as a child; both are in the session started for them, so the
    # group is exactly the server's processes. SIGKILL at the end: a worker that outlived
    # the CLI.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def mlflow_models_serve(model_uri: str, tracking_uri: str, log_path: Path) -> Iterator[str]:
    """``mlflow models serve -m <model_uri> --env-manager local`` on a free loopback port; its URL."""
    url = f"http://127.0.0.1:{free_port()}"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(MLFLOW_CLI), "models", "serve", "-m", model_uri,
             "--env-manager", "local", "-h", "127.0.0.1", "-p", url.rsplit(":", 1)[1]],
            # The CLI starts the server as `exec uvicorn ...` in bash, found on PATH: the
            # virtualenv's bin must be there, as when the virtualenv is activated.
            env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
                 "PATH": f"{MLFLOW_CLI.parent}{os.pathsep}{os.environ.get('PATH', '')}"},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        wait_until_up(url, process, log_path)
        yield url
    finally:
        stop(process)
