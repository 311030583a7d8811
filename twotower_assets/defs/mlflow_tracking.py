"""MLflow tracking for the graph, built on ``mlflow.MlflowClient``.

One MLflow run holds one trained model: the training asset creates it (tagged with the
Dagster run id and partition, so a retried step finds and reuses it), and evaluation and
publishing log into the run recorded next to the model. When the whole graph is
materialised in one Dagster run that is exactly one MLflow run per Dagster run.

Each step ends the MLflow run FINISHED when it succeeds and FAILED when it raises, so the
MLflow UI never shows a run stuck in RUNNING after its Dagster step ended. The client API is
used instead of ``mlflow.start_run`` so no global "active run" leaks between steps.
"""


import contextlib
import json
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from twotower_assets import settings


class MlflowTracking(dg.ConfigurableResource):
    """An MLflow tracking server or local store, and the URL of its UI."""

    tracking_uri: str = Field(description="MLflow tracking URI (sqlite:///... locally).")
    artifact_root: str = Field(default="", description="Artifact location for new experiments.")
    ui_url: str = Field(default="http://127.0.0.1:5000", description="Base URL of the MLflow UI.")

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def experiment_id(self, name: str) -> str:
        client = self.client()
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        return client.create_experiment(name, artifact_location=self.artifact_root or None)

    def run_url(self, experiment_id: str, run_id: str) -> str:
        return f"{self.ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"

    def find_or_create_run(
        self, experiment_name: str, run_name: str, tags: Mapping[str, str]
    ) -> tuple[str, str]:
        """(experiment_id, run_id) of the run with these tags, created if there is none."""
        client = self.client()
        experiment_id = self.experiment_id(experiment_name)
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        found = client.search_runs([experiment_id], filter_string=query, max_results=1)
        if found:
            return experiment_id, found[0].info.run_id
        run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
        return experiment_id, run.info.run_id

    @contextlib.contextmanager
    def active(self, run_id: str) -> Iterator["RunLogger"]:
        """Log into ``run_id``; it ends FINISHED on success, FAILED on an exception."""
        client = self.client()
        client.update_run(run_id, status="RUNNING")
        try:
            yield RunLogger(client, run_id)
        except BaseException:
            client.set_terminated(run_id, status="FAILED")
            raise
        client.set_terminated(run_id, status="FINISHED")


class RunLogger:
    """Thin helpers over MlflowClient for one run."""

    def __init__(self, client, run_id: str):
        self.client = client
        self.run_id = run_id

    def params(self, values: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, str(v)) for k, v in values.items() if k not in existing]
        if fresh:
            self.client.log_batch(self.run_id, params=fresh)

    def metrics(self, values: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in values.items()]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def text(self, text: str, file_name: str, artifact_path: str | None = None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / file_name
            target.write_text(text)
            self.client.log_artifact(self.run_id, str(target), artifact_path)

    def dict(self, values: Mapping[str, Any], file_name: str, artifact_path: str | None = None) -> None:
        self.text(json.dumps(values, indent=2, default=str), file_name, artifact_path)


def default_mlflow() -> MlflowTracking:
    return MlflowTracking(
        tracking_uri=settings.mlflow_tracking_uri(),
        artifact_root=settings.mlflow_artifact_root(),
    )
