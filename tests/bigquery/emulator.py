"""Run bqemulator (a DuckDB-backed BigQuery emulator) as a subprocess on free loopback ports.

Used by the test session (conftest.py, and ``emulator_warehouse`` for tests that need a
warehouse of their own on it) and by .ci/bigquery.sh::

    python tests/bigquery/emulator.py --workdir DIR --endpoint-file DIR/endpoint

bqemulator runs ``INSTALL spatial`` at start, which downloads the extension; offline that
fails. The ``duckdb-extension-spatial`` package ships the extension file for the installed
DuckDB version, so it is installed from that file into a private extension directory
(``<workdir>/home/.duckdb/extensions``) and the emulator runs with ``HOME=<workdir>/home``:
DuckDB looks for extensions under ``$HOME/.duckdb``, and nothing is written to the real home.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from twotower_assets.warehouse.bigquery import BigQueryWarehouse

PROJECT = "twotower-test"


def spatial_extension_file() -> Path:
    """The spatial extension shipped by duckdb-extension-spatial for this DuckDB version."""
    import duckdb
    import duckdb_extension_spatial

    path = (
        Path(duckdb_extension_spatial.__file__).parent
        / "extensions"
        / f"v{duckdb.__version__}"
        / "spatial.duckdb_extension"
    )
    if not path.is_file():
        raise RuntimeError(
            f"no spatial extension for DuckDB {duckdb.__version__} at {path}: install "
            f"duckdb-extension-spatial=={duckdb.__version__}"
        )
    return path


def install_spatial_extension(home: Path) -> None:
    """Install the spatial extension into ``home``'s DuckDB extension directory."""
    import duckdb

    connection = duckdb.connect(config={"extension_directory": str(home / ".duckdb" / "extensions")})
    try:
        connection.install_extension(str(spatial_extension_file()))
        connection.load_extension("spatial")
    finally:
        connection.close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Emulator:
    process: subprocess.Popen
    rest_port: int
    grpc_port: int
    log_path: Path

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _ready(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint}/readyz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def start_emulator(workdir: Path, project: str = PROJECT, timeout_s: float = 90.0) -> Emulator:
    """Start bqemulator (in-memory) and wait until it answers ``/readyz``."""
    workdir.mkdir(parents=True, exist_ok=True)
    home = workdir / "home"
    install_spatial_extension(home)
    last_error = ""
    for _attempt in range(3):  # a port taken between free_port() and bind: try others
        rest_port, grpc_port = free_port(), free_port()
        log_path = workdir / f"bqemulator-{rest_port}.log"
        command = [
            sys.executable, "-m", "bqemulator", "start",
            "--rest-host", "127.0.0.1", "--rest-port", str(rest_port),
            "--grpc-host", "127.0.0.1", "--grpc-port", str(grpc_port),
            "--ephemeral", "--project", project, "--log-level", "warning",
        ]
        environment = {**os.environ, "HOME": str(home)}
        environment.pop("BIGQUERY_EMULATOR_HOST", None)
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                command, cwd=workdir, env=environment, stdout=log, stderr=subprocess.STDOUT
            )
        emulator = Emulator(process, rest_port, grpc_port, log_path)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and process.poll() is None:
            if _ready(emulator.endpoint):
                return emulator
            time.sleep(0.2)
        emulator.stop()
        last_error = emulator.log_tail()
    raise RuntimeError(f"bqemulator did not start; last log lines:\n{last_error}")


def emulator_warehouse(emulator: Emulator, dataset: str | None = None, **fields) -> BigQueryWarehouse:
    """The project's BigQuery warehouse on ``emulator``, in a dataset of its own unless one is given."""
    from dagster_gcp import BigQueryResource

    from twotower_assets.warehouse.bigquery import BigQueryWarehouse

    return BigQueryWarehouse(
        bigquery=BigQueryResource(project=PROJECT, location="EU"),
        dataset=dataset or f"test_{uuid.uuid4().hex[:10]}",
        endpoint=emulator.endpoint,
        **fields,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--endpoint-file", type=Path, required=True)
    parser.add_argument("--project", default=PROJECT)
    args = parser.parse_args()
    emulator = start_emulator(args.workdir, args.project)
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    args.endpoint_file.write_text(emulator.endpoint)
    print(f"bqemulator at {emulator.endpoint} (log {emulator.log_path})", flush=True)
    try:
        while not stopping and emulator.process.poll() is None:
            time.sleep(0.5)
    finally:
        emulator.stop()
    if not stopping:
        sys.exit(f"bqemulator exited with {emulator.process.returncode}:\n{emulator.log_tail()}")


if __name__ == "__main__":
    main()
