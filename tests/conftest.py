"""Shared fixtures: tiny data, real DuckDB / MLflow stores in temporary directories."""

import os
import signal
import subprocess
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

import twotower_assets  # noqa: F401  (sets TF_USE_LEGACY_KERAS before any TensorFlow import)
from twotower_assets.lib.artifacts import ArtifactStore
from twotower_assets.lib.mlflow_tracking import MlflowTracking
from twotower_assets.warehouse.duckdb import DuckDBWarehouse

# `mlflow server` / `mlflow ui` of MLflow 3 start a job runner whose ~10 huey workers detach
# from the server's process group and outlive it; the tests need no server-side jobs.
os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"

REPO = Path(__file__).resolve().parents[1]
TINY_PARTITION = "2026-06-01"


def make_resources(home: Path) -> dict:
    """The embedded default's resources, rooted in ``home``."""
    home.mkdir(parents=True, exist_ok=True)
    return {
        "warehouse": DuckDBWarehouse(path=str(home / "warehouse.duckdb")),
        "mlflow": MlflowTracking(
            tracking_uri=f"sqlite:///{home / 'mlflow.db'}",
            artifact_root=(home / "mlartifacts").as_uri(),
        ),
        "artifacts": ArtifactStore(base_dir=str(home / "artifacts")),
    }


def tiny_run_config(**overrides: dict) -> dict:
    """configs/run/tiny.yaml, with per-asset config overrides merged in."""
    config = yaml.safe_load((REPO / "configs" / "run" / "tiny.yaml").read_text())
    for asset, values in overrides.items():
        config["ops"].setdefault(asset, {"config": {}})["config"].update(values)
    return config


def materialize_all(resources: dict, partition_key: str = TINY_PARTITION, run_config: dict | None = None,
                    selection=None, instance: dg.DagsterInstance | None = None, raise_on_error: bool = True):
    from twotower_assets.definitions import ALL_ASSETS, ALL_CHECKS

    return dg.materialize(
        [*ALL_ASSETS, *ALL_CHECKS],
        selection=selection,
        resources=resources,
        partition_key=partition_key,
        run_config=run_config or tiny_run_config(),
        instance=instance or dg.DagsterInstance.ephemeral(),
        raise_on_error=raise_on_error,
    )


def sigkill_once_started(command: list[str], marker: Path, timeout_s: float = 60) -> None:
    """Run ``command`` and SIGKILL it as soon as it creates ``marker`` (it is mid-write then).

    The fault tests' way of interrupting a writer at a known point: no signal handler, no
    cleanup, exactly what an OOM kill or a lost machine does.
    """
    writer = subprocess.Popen(command, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    try:
        deadline = time.monotonic() + timeout_s
        while not marker.exists() and writer.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), f"the writer never started writing (exit code {writer.poll()})"
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait()
    assert writer.returncode == -signal.SIGKILL


def failure_text(result) -> str:
    """Every step failure's message, causes included (the error a user sees in the UI)."""
    texts = []
    for event in result.all_events:
        if event.event_type_value != "STEP_FAILURE":
            continue
        error = event.event_specific_data.error
        while error is not None:
            texts.append(error.message)
            error = error.cause or error.context
    assert texts, "expected a step failure"
    return "\n".join(texts)


@pytest.fixture
def tiny_resources(tmp_path) -> dict:
    return make_resources(tmp_path / "home")


@pytest.fixture
def tiny_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("TWOTOWER_HOME", str(home))
    return home
