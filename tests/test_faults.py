"""Faults: a training process killed or terminated mid-epoch, the MLflow tracking server
going away mid-run, a DuckDB writer killed mid-write.

The graph runs for real: ``dagster asset materialize`` in a subprocess, against a real
``mlflow server`` on loopback (sqlite backend, one worker) and the DuckDB warehouse, all under
one temporary home. A date (2026-05-25) is materialised first; every fault hits another date,
and afterwards that previous date must be exactly as it was. Training is detected from the
outside, as an operator would: an MLflow run of the date that is RUNNING and has logged an
epoch's loss.
"""

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pytest
import yaml

from helpers.graph import materialize_all, tiny_run_config
from helpers.processes import free_port, sigkill_once_started
from twotower_assets.lib import layout
from twotower_assets.lib.artifacts import ArtifactStore
from twotower_assets.lib.mlflow_tracking import FAILED_REASON_TAG, OWNER_PID_TAG, MlflowTracking
from twotower_assets.warehouse.duckdb import DuckDBWarehouse

PREVIOUS = "2026-05-25"
EXPERIMENT = "two_tower"
PUBLISHED = (layout.USER_EMBEDDING_HISTORY, layout.ITEM_EMBEDDING_HISTORY)
# Keep MLflow's HTTP retries short here; production keeps MLflow's defaults (7 retries, backoff
# factor 2, 120 s timeout: a few minutes of retrying, enough for a server restart).
SHORT_MLFLOW_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a sqlite backend; stoppable and restartable on its port."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 90) -> None:
        log = open(self.workdir / "mlflow-server.log", "ab")
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}",
             "--artifacts-destination", (self.workdir / "mlartifacts").as_uri()],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.workdir,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.workdir / 'mlflow-server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        # Not left running for the rest of the session (its job runner starts ~10 workers).
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        raise RuntimeError(f"mlflow server did not answer /health in {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # the port is free again: nothing answers there
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1)
            except OSError:
                return
            time.sleep(0.2)


class Stack:
    def __init__(self, root: Path):
        self.root = root
        self.home = root / "home"
        self.home.mkdir(parents=True)
        self.server = MlflowServer(root)
        self.server.start()
        self.resources = {
            "warehouse": DuckDBWarehouse(path=str(self.home / "warehouse.duckdb")),
            "mlflow": MlflowTracking(tracking_uri=self.server.uri),
            "artifacts": ArtifactStore(base_dir=str(self.home / "artifacts")),
        }

    @property
    def client(self):
        return self.resources["mlflow"].client()

    def runs_of(self, date: str, status: str | None = None):
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        query = f"tags.`train_date` = '{date}'" + (f" and attributes.status = '{status}'" if status else "")
        return self.client.search_runs([experiment.experiment_id], filter_string=query) if experiment else []

    def launch(self, date: str, **env) -> subprocess.Popen:
        """The whole graph for ``date`` from the CLI, with training slowed to many short epochs."""
        config = tiny_run_config(two_tower_model={"schedule": {"epochs": 1000, "batch_size": 4}})
        config_path = self.root / f"run-{date}.yaml"
        config_path.write_text(yaml.safe_dump(config))
        dagster_home = self.root / f"dagster-{date}"
        dagster_home.mkdir(exist_ok=True)
        environment = {
            **os.environ, "TWOTOWER_HOME": str(self.home), "MLFLOW_TRACKING_URI": self.server.uri,
            "DAGSTER_HOME": str(dagster_home), "TF_CPP_MIN_LOG_LEVEL": "3", **SHORT_MLFLOW_RETRIES, **env,
        }
        environment.pop("TWOTOWER_WAREHOUSE", None)
        self.log = self.root / f"materialize-{date}.log"
        return subprocess.Popen(
            [str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-m", "twotower_assets.definitions",
             "--select", "*", "--partition", date, "-c", str(config_path)],
            env=environment, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_for_training(self, date: str, process: subprocess.Popen, timeout_s: float = 240):
        """The RUNNING MLflow run of ``date`` once it has logged an epoch's loss."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert process.poll() is None, f"the run ended before training:\n{self.log.read_text()[-3000:]}"
            for run in self.runs_of(date, "RUNNING"):
                if "loss" in run.data.metrics:
                    return run
            time.sleep(0.2)
        raise AssertionError(f"training of {date} never started:\n{self.log.read_text()[-3000:]}")

    def rerun_from_training(self, date: str):
        """Everything from two_tower_model down, in-process (the split and datasets exist)."""
        config = tiny_run_config()
        ops = {k: v for k, v in config["ops"].items() if k in ("two_tower_model", "evaluation_metrics",
                                                                 "evaluation_metrics_quality_gate")}
        return materialize_all(self.resources, date, run_config={"ops": ops},
                               selection=dg.AssetSelection.assets("two_tower_model").downstream())

    def snapshot(self, date: str) -> dict:
        """Everything the graph keeps for ``date``: files, warehouse rows, MLflow run status."""
        artifacts = self.resources["artifacts"]
        files = {}
        for asset in ("two_tower_model", "evaluation_metrics", "match_model"):
            base = artifacts.path(asset, date)
            files[asset] = sorted((str(p.relative_to(base)), p.stat().st_size, p.stat().st_mtime_ns)
                                  for p in base.rglob("*") if p.is_file()) if base.exists() else None
        warehouse = self.resources["warehouse"]
        rows = {}
        for table in PUBLISHED:
            key = "user_id" if "user" in table else "item_id"
            data = warehouse.query(f"SELECT * FROM {table} WHERE train_date = $d ORDER BY {key}",
                                   {"d": dt.date.fromisoformat(date)})
            rows[table] = data.to_pylist()
        summary = json.loads((artifacts.path("two_tower_model", date) / "summary.json").read_text())
        status = self.client.get_run(summary["mlflow_run_id"]).info.status
        return {"files": files, "rows": rows, "mlflow_status": status}

    def assert_nothing_published(self, date: str) -> None:
        artifacts = self.resources["artifacts"]
        for asset in ("two_tower_model", "evaluation_metrics", "match_model"):
            assert not artifacts.path(asset, date).exists(), f"{asset} was written for {date}"
        for table in PUBLISHED:
            counts = self.resources["warehouse"].partition_row_counts(table, "train_date")
            assert dt.date.fromisoformat(date) not in counts, f"{table} has a partition for {date}"

    def assert_rerun_published(self, date: str, result, abandoned_run_id: str) -> None:
        assert result.success
        new_run_id = result.asset_materializations_for_node("two_tower_model")[0].metadata["mlflow_run_id"].value
        assert new_run_id != abandoned_run_id
        assert self.client.get_run(new_run_id).info.status == "FINISHED"
        artifacts = self.resources["artifacts"]
        assert (artifacts.path("match_model", date) / "model" / "saved_model.pb").exists()
        assert not artifacts.partials("two_tower_model", date)  # the killed writer's scratch is collected
        for table in PUBLISHED:
            data = self.resources["warehouse"].query(
                f"SELECT mlflow_run_id FROM {table} WHERE train_date = $d", {"d": dt.date.fromisoformat(date)})
            assert data.num_rows > 0 and set(data["mlflow_run_id"].to_pylist()) == {new_run_id}

    def close(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("faults"))
    try:
        assert materialize_all(stack.resources, PREVIOUS).success
        stack.previous = stack.snapshot(PREVIOUS)
        assert stack.previous["mlflow_status"] == "FINISHED"
        yield stack
    finally:
        stack.close()


def stop(process: subprocess.Popen, sig: int, timeout_s: float = 120) -> int:
    os.kill(process.pid, sig)
    try:
        return process.wait(timeout=timeout_s)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.slow
def test_training_killed_mid_epoch_fails_its_run_on_the_rerun_and_publishes_nothing(stack):
    date = "2026-06-01"
    process = stack.launch(date)
    run = stack.wait_for_training(date, process)
    assert stop(process, signal.SIGKILL) == -signal.SIGKILL

    # A killed process cannot end its own run: it is left RUNNING, owned by the dead process.
    killed = stack.client.get_run(run.info.run_id)
    assert killed.info.status == "RUNNING" and killed.data.tags[OWNER_PID_TAG] == str(process.pid)
    stack.assert_nothing_published(date)

    # The Dagster run is left STARTED too, until the dead_run_detector sensor sees its worker is gone.
    from twotower_assets.defs.automation.sensors import dead_run_detector

    with dg.DagsterInstance.from_config(str(stack.root / f"dagster-{date}")) as instance:
        [dagster_run] = instance.get_runs()
        assert dagster_run.status == dg.DagsterRunStatus.STARTED
        dead_run_detector(dg.build_sensor_context(instance=instance))
        dagster_run = instance.get_run_by_id(dagster_run.run_id)
        assert dagster_run.status == dg.DagsterRunStatus.FAILURE
        [failure] = instance.all_logs(dagster_run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
        assert f"its run worker (pid {process.pid} on {socket.gethostname()}) is gone" in failure.message
    assert stack.snapshot(PREVIOUS) == stack.previous

    # The rerun of the date first ends the abandoned run FAILED, then trains and publishes.
    result = stack.rerun_from_training(date)
    stack.assert_rerun_published(date, result, run.info.run_id)
    abandoned = stack.client.get_run(run.info.run_id)
    assert abandoned.info.status == "FAILED"
    assert abandoned.data.tags[FAILED_REASON_TAG] == f"abandoned: its process {process.pid} on {socket.gethostname()} is gone"
    assert stack.snapshot(PREVIOUS) == stack.previous


@pytest.mark.slow
def test_training_terminated_mid_epoch_ends_its_own_run_failed(stack):
    """SIGTERM is what Dagster's run termination sends the run worker: Dagster turns it into an
    interrupt inside the step, and the step ends its MLflow run FAILED before the process exits."""
    date = "2026-05-18"
    process = stack.launch(date)
    run = stack.wait_for_training(date, process)
    assert stop(process, signal.SIGTERM) != 0

    terminated = stack.client.get_run(run.info.run_id)
    assert terminated.info.status == "FAILED"
    assert "Interrupt" in terminated.data.tags[FAILED_REASON_TAG]
    stack.assert_nothing_published(date)
    assert not stack.resources["artifacts"].partials("two_tower_model", date)
    assert stack.snapshot(PREVIOUS) == stack.previous


@pytest.mark.slow
def test_mlflow_server_lost_mid_training_fails_the_run_clearly_and_a_rerun_after_restart_succeeds(stack):
    date = "2026-05-28"
    process = stack.launch(date)
    run = stack.wait_for_training(date, process)
    stack.server.stop()
    try:
        assert process.wait(timeout=120) != 0
        log = stack.log.read_text()
        assert f"MlflowTrackingError: MLflow tracking at {stack.server.uri} failed while logging to run {run.info.run_id}" in log
        stack.assert_nothing_published(date)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        stack.server.start()

    # The server could not be told: the run is still RUNNING until the date is trained again.
    assert stack.client.get_run(run.info.run_id).info.status == "RUNNING"
    assert stack.snapshot(PREVIOUS) == stack.previous
    result = stack.rerun_from_training(date)
    stack.assert_rerun_published(date, result, run.info.run_id)
    assert stack.client.get_run(run.info.run_id).info.status == "FAILED"
    assert stack.snapshot(PREVIOUS) == stack.previous


def test_mlflow_server_down_before_training_names_the_tracking_uri(tmp_path):
    port = free_port()  # nothing listens here
    resources = {
        "mlflow": MlflowTracking(tracking_uri=f"http://127.0.0.1:{port}"),
        "artifacts": ArtifactStore(base_dir=str(tmp_path / "artifacts")),
    }
    (tmp_path / "artifacts" / "tf_datasets" / PREVIOUS).mkdir(parents=True)
    for name, value in SHORT_MLFLOW_RETRIES.items():
        os.environ[name] = value
    try:
        with pytest.raises(Exception, match=rf"MLflow tracking at http://127\.0\.0\.1:{port} failed while looking for abandoned runs"):
            resources["mlflow"].fail_abandoned_runs(EXPERIMENT, PREVIOUS, "dagster-run")
    finally:
        for name in SHORT_MLFLOW_RETRIES:
            os.environ.pop(name, None)


# -- DuckDB: a writer process killed halfway through a partition write ----------------------------

KILLED_DUCKDB_WRITER = textwrap.dedent(
    """
    import datetime as dt, pathlib, sys, time
    import pyarrow as pa
    from twotower_assets.warehouse.duckdb import DuckDBWarehouse

    path, marker, how = sys.argv[1:4]
    warehouse = DuckDBWarehouse(path=path, lock_timeout_s=5)
    day = dt.date(2026, 6, 1)
    schema = pa.schema([("train_date", pa.date32()), ("item_id", pa.string())])

    def batches():
        for n in range(100):
            yield pa.record_batch([pa.array([day] * 1000, pa.date32()), pa.array([f"k{n}-{i}" for i in range(1000)])],
                                  schema=schema)
            if n == 10:
                pathlib.Path(marker).write_text("writing")
                time.sleep(600)  # killed here, with 11,000 rows inserted but not committed

    if how == "partition":
        warehouse.replace_partition("history", "train_date", day, batches(), schema)
    else:
        warehouse.write_table("events", batches(), schema)
    """
)


@pytest.mark.parametrize("how", ["partition", "table"])
def test_duckdb_writer_killed_mid_write_leaves_the_old_data_and_a_rerun_succeeds(tmp_path, how):
    warehouse = DuckDBWarehouse(path=str(tmp_path / "w.duckdb"), lock_timeout_s=5)
    june_1, june_8 = dt.date(2026, 6, 1), dt.date(2026, 6, 8)

    def rows(day, ids):
        return pa.table({"train_date": pa.array([day] * len(ids), pa.date32()), "item_id": ids})

    table = "history" if how == "partition" else "events"
    if how == "partition":
        warehouse.replace_partition(table, "train_date", june_1, rows(june_1, ["a", "b"]))
        warehouse.replace_partition(table, "train_date", june_8, rows(june_8, ["c"]))
    else:
        warehouse.write_table(table, rows(june_1, ["a", "b"]))
    before = warehouse.query(f"SELECT * FROM {table} ORDER BY train_date, item_id").to_pylist()

    marker = tmp_path / "writing"
    sigkill_once_started([sys.executable, "-c", KILLED_DUCKDB_WRITER, warehouse.path, str(marker), how], marker)

    # The lock died with the process; the uncommitted rows are gone on the next open.
    assert warehouse.query(f"SELECT * FROM {table} ORDER BY train_date, item_id").to_pylist() == before
    if how == "partition":
        assert warehouse.replace_partition(table, "train_date", june_1, rows(june_1, ["x", "y", "z"])) == 3
        assert warehouse.partition_row_counts(table, "train_date") == {june_1: 3, june_8: 1}
    else:
        assert warehouse.write_table(table, rows(june_1, ["x", "y", "z"])) == 3
    ids = warehouse.query(f"SELECT item_id FROM {table} WHERE train_date = $d", {"d": june_1})["item_id"].to_pylist()
    assert sorted(ids) == ["x", "y", "z"]


def test_a_run_that_cannot_end_finished_leaves_no_artifact(tmp_path):
    """The steps that log to MLflow nest the MLflow run inside the artifact write (training,
    evaluation, MatchModel): the run ends FINISHED before the files move into place, so a run
    that cannot be ended (tracking store gone, run deleted) publishes nothing new."""
    artifacts = ArtifactStore(base_dir=str(tmp_path / "artifacts"))
    mlflow = MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    _, run_id = mlflow.find_or_create_run(EXPERIMENT, "r", {"train_date": "2026-06-01"})
    with artifacts.writing("two_tower_model", "2026-06-01") as out:
        (out / "model.txt").write_text("previous")

    with pytest.raises(Exception, match="must be in the 'active' state"):
        with artifacts.writing("two_tower_model", "2026-06-01") as out, mlflow.active(run_id):
            (out / "model.txt").write_text("new")
            mlflow.client().delete_run(run_id)  # ending the run FINISHED will now fail

    model_dir = artifacts.path("two_tower_model", "2026-06-01")
    assert (model_dir / "model.txt").read_text() == "previous"
    assert not artifacts.partials("two_tower_model", "2026-06-01")
