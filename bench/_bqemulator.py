"""bqemulator (a DuckDB-backed BigQuery emulator) for the benches: start it on free loopback ports.

The benches that write to BigQuery (``bench.embeddings_export``) measure the product's
BigQuery warehouse against this emulator when the ``test`` extra is installed (``bqemulator``
and ``duckdb-extension-spatial``). The test suite starts its own (tests/bigquery/emulator.py);
the benches do not import test code, so the few lines they need are here.

bqemulator runs ``INSTALL spatial`` at start, which downloads the extension; offline that
fails. The ``duckdb-extension-spatial`` package ships the extension file for the installed
DuckDB version, so it is installed from that file into a private extension directory
(``<workdir>/home/.duckdb/extensions``) and the emulator runs with ``HOME=<workdir>/home``:
nothing is written to the real home.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

PROJECT = "twotower-bench"


def _install_spatial_extension(home: Path) -> None:
    import duckdb
    import duckdb_extension_spatial

    extension = (Path(duckdb_extension_spatial.__file__).parent / "extensions" / f"v{duckdb.__version__}"
                 / "spatial.duckdb_extension")
    if not extension.is_file():
        raise RuntimeError(f"no spatial extension for DuckDB {duckdb.__version__} at {extension}: install "
                           f"duckdb-extension-spatial=={duckdb.__version__}")
    connection = duckdb.connect(config={"extension_directory": str(home / ".duckdb" / "extensions")})
    try:
        connection.install_extension(str(extension))
        connection.load_extension("spatial")
    finally:
        connection.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Emulator:
    process: subprocess.Popen
    rest_port: int
    log_path: Path

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/readyz", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_emulator(workdir: Path, project: str = PROJECT, timeout_s: float = 90.0) -> Emulator:
    """Start bqemulator (in-memory) and wait until it answers ``/readyz``."""
    workdir.mkdir(parents=True, exist_ok=True)
    home = workdir / "home"
    _install_spatial_extension(home)
    for _attempt in range(3):  # a port taken between _free_port() and bind: try others
        rest_port, grpc_port = _free_port(), _free_port()
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
            process = subprocess.Popen(command, cwd=workdir, env=environment, stdout=log, stderr=subprocess.STDOUT)
        emulator = Emulator(process, rest_port, log_path)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and process.poll() is None:
            if emulator.ready():
                return emulator
            time.sleep(0.2)
        emulator.stop()
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:]) if log_path.exists() else ""
    raise RuntimeError(f"bqemulator did not start; last log lines:\n{tail}")
