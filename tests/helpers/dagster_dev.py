"""``dagster dev`` for the tests that drive it like the UI: a temporary DAGSTER_HOME with the
project's dagster.yaml, the process group started on a free loopback port, and a GraphQL
client for its webserver. Used by tests/test_dagster_dev.py and tests/test_browser.py."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from helpers.graph import REPO
from helpers.processes import free_port

START_TIMEOUT_S = 120
ENDED = ("SUCCESS", "FAILURE", "CANCELED")

RUN_STATUS = """
query($runId: ID!) { runOrError(runId: $runId) { ... on Run { status } } }"""


def dagster_home(path: Path) -> Path:
    """A DAGSTER_HOME with the project's instance settings, telemetry off (no network)."""
    path.mkdir(parents=True, exist_ok=True)
    settings = yaml.safe_load((REPO / "configs" / "dagster.yaml").read_text())
    settings["telemetry"] = {"enabled": False}
    (path / "dagster.yaml").write_text(yaml.safe_dump(settings))
    return path


class DagsterDev:
    """A ``dagster dev`` process group and a GraphQL client for its webserver."""

    def __init__(self, tmp: Path, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "dagster_dev.log"
        self.env = {
            **os.environ,
            "DAGSTER_HOME": str(dagster_home(tmp / "dagster_home")),
            "TWOTOWER_HOME": str(tmp / "home"),
            "DAGSTER_DISABLE_TELEMETRY": "yes",
            **(env or {}),
        }
        self.env.pop("MLFLOW_TRACKING_URI", None)
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "DagsterDev":
        dagster = Path(sys.executable).with_name("dagster")
        self.log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [str(dagster), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(self.port)],
            cwd=REPO,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as one below
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dagster dev exited with {self.process.returncode}:\n{self.tail()}")
            try:
                statuses = self.query("{ locationStatusesOrError { ... on WorkspaceLocationStatusEntries "
                                      "{ entries { name loadStatus } } } }")
                entries = statuses["locationStatusesOrError"]["entries"]
                if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                    return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, AssertionError):
                pass  # not listening yet, or still loading
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"dagster dev did not load the code location in {START_TIMEOUT_S}s:\n{self.tail()}")

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        group = os.getpgid(self.process.pid)
        os.killpg(group, signal.SIGINT)  # what Ctrl-C does: dagster dev stops webserver, daemon, code server
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(group, signal.SIGKILL)
            self.process.wait(timeout=10)
        try:  # children that outlived their parent
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def run_status(self, run_id: str) -> str:
        return self.query(RUN_STATUS, {"runId": run_id})["runOrError"]["status"]

    def wait_for_run(self, run_id: str, timeout_s: float) -> str:
        """The run's status once it has ended, or its status when ``timeout_s`` ran out."""
        deadline = time.monotonic() + timeout_s
        while (status := self.run_status(run_id)) not in ENDED and time.monotonic() < deadline:
            time.sleep(1)
        return status

    def query(self, query: str, variables: dict | None = None) -> dict:
        request = urllib.request.Request(
            f"{self.url}/graphql",
            data=json.dumps({"query": query, "variables": variables or {}}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as error:  # GraphQL reports query errors with a 4xx/5xx body
            raise AssertionError(f"GraphQL HTTP {error.code}: {error.read().decode(errors='replace')[:2000]}") from error
        if body.get("errors"):
            raise AssertionError(f"GraphQL errors: {body['errors']}")
        return body["data"]

