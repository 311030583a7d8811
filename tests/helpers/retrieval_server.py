"""The retrieval server (``python -m twotower_assets.serving``) on a free loopback port, and
retriever versions made to test it: the tiny catalogue with item attributes, the same with
every user vector doubled (so an answer's scores tell which version produced it), and two
broken versions it must refuse."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
from mlflow import MlflowClient

from helpers.processes import free_port
from helpers.retriever import ITEM_VECTORS, VERSION_TAGS, write_catalogue
from twotower_assets.serving.retriever import REGISTERED_MODEL_NAME, log_retriever

START_TIMEOUT_S = 120

# Category "a" is i01..i06, "b" i07..i12; subcategory "odd" / "even" by the item's number.
ITEM_ATTRIBUTES = {
    item: {"offer_category_id": "a" if int(item[1:]) <= 6 else "b",
           "offer_subcategory_id": "odd" if int(item[1:]) % 2 else "even"}
    for item in ITEM_VECTORS
}


@dataclass
class Registry:
    """A sqlite MLflow store with one training run to log retriever versions into."""

    directory: Path
    tracking_uri: str
    run_id: str

    @classmethod
    def create(cls, directory: Path) -> Registry:
        tracking_uri = f"sqlite:///{directory / 'mlflow.db'}"
        client = MlflowClient(tracking_uri=tracking_uri)
        experiment_id = client.create_experiment("two_tower", artifact_location=(directory / "mlartifacts").as_uri())
        run_id = client.create_run(experiment_id, run_name="training").info.run_id
        return cls(directory, tracking_uri, run_id)

    def log(self, name: str, *, user_scale: float = 1.0, attributes: bool = True,
            broken_users: str | None = None) -> str:
        """Log a version of the tiny catalogue; its version number.

        ``user_scale`` multiplies every user vector (scores scale with it). ``broken_users``:
        ``"dimensions"`` gives the users 3 dimensions against the items' 4 (the version cannot
        load), ``"nan"`` makes every user vector NaN (it loads, and fails the probe).
        """
        catalogue = write_catalogue(self.directory / name)
        users = pq.read_table(catalogue["user_embeddings_path"])
        vectors = np.stack(users.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32) * user_scale
        if broken_users == "dimensions":
            vectors = vectors[:, :3]
        elif broken_users == "nan":
            vectors[:] = np.nan
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1])
        pq.write_table(pa.table({"user_id": users.column("user_id"), "embedding": embedding}),
                       catalogue["user_embeddings_path"])
        if attributes:
            path = self.directory / name / "item_attributes.parquet"
            pq.write_table(pa.table({
                "item_id": list(ITEM_ATTRIBUTES),
                **{column: [a[column] for a in ITEM_ATTRIBUTES.values()]
                   for column in ("offer_category_id", "offer_subcategory_id")},
            }), path)
            catalogue["item_attributes_path"] = path
        _, version = log_retriever(self.tracking_uri, self.run_id, **catalogue, tags=VERSION_TAGS)
        return version

    def promote(self, version: str) -> None:
        MlflowClient(tracking_uri=self.tracking_uri).set_registered_model_alias(REGISTERED_MODEL_NAME, "champion", version)


@dataclass
class RetrievalServer:
    url: str
    process: subprocess.Popen
    log_path: Path

    def post(self, route: str, payload, content_type: str = "application/json") -> requests.Response:
        data = payload if isinstance(payload, (str, bytes)) else json.dumps(payload)
        return requests.post(f"{self.url}{route}", data=data, headers={"Content-Type": content_type}, timeout=60)

    def health(self) -> dict:
        return requests.get(f"{self.url}/health", timeout=10).json()

    def wait_for(self, predicate, what: str, timeout_s: float = 60) -> dict:
        """Poll /health until ``predicate(health)``; the health that satisfied it."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            health = self.health()
            if predicate(health):
                return health
            time.sleep(0.1)
        pytest.fail(f"the server never reached: {what}; last health {self.health()}\n{self.log_path.read_text()}")

    def logged_events(self) -> list[dict]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.startswith("{")]


def _wait_until_listening(url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the retrieval server exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            requests.get(f"{url}/health", timeout=2)
            return
        except requests.ConnectionError:
            time.sleep(0.2)
    pytest.fail(f"the retrieval server did not listen in {START_TIMEOUT_S} s:\n{log_path.read_text()}")


def terminate(process: subprocess.Popen, timeout_s: float = 30) -> int:
    """SIGTERM, as an orchestrator stops a replica; its exit code (SIGKILL if it hangs)."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"the retrieval server did not stop within {timeout_s} s of SIGTERM")


@contextlib.contextmanager
def retrieval_server(tracking_uri: str, log_path: Path, *extra_args: str,
                     wait_ready: bool = True) -> Iterator[RetrievalServer]:
    """The server on a free loopback port, started as docs/serving.md says."""
    port = free_port()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "twotower_assets.serving", "--host", "127.0.0.1", "--port", str(port), *extra_args],
            env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri},
            stdout=log, stderr=subprocess.STDOUT,
        )
    server = RetrievalServer(f"http://127.0.0.1:{port}", process, log_path)
    try:
        _wait_until_listening(server.url, process, log_path)
        if wait_ready:
            server.wait_for(lambda h: h["model_version"] is not None, "a loaded model", START_TIMEOUT_S)
        yield server
    finally:
        if process.poll() is None:
            terminate(process)
