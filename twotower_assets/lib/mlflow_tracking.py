"""MLflow tracking for the graph, built on ``mlflow.MlflowClient``.

One MLflow run holds one trained model: the training asset creates it (tagged with the
Dagster run id and partition, so a retried step finds and reuses it), and evaluation and
publishing log into the run recorded next to the model. When the whole graph is
materialised in one Dagster run that is exactly one MLflow run per Dagster run.

Each step ends the MLflow run FINISHED when it succeeds and FAILED when it raises, so the
MLflow UI never shows a run stuck in RUNNING after its Dagster step ended. The client API is
used instead of ``mlflow.start_run`` so no global "active run" leaks between steps.

A process that dies (SIGKILL, OOM killer, lost node) cannot end its run: the run stays
RUNNING. Runs are tagged with the host and process id that own them, and before training a
date, :meth:`MlflowTracking.fail_abandoned_runs` ends FAILED every RUNNING run of that date
whose process is gone (or whose Dagster run is over), with the reason in the tag
``twotower.failed_reason``. A SIGTERM (what Dagster's run termination sends) reaches the step as
an exception, and :meth:`MlflowTracking.active` ends the run FAILED itself.

When the tracking server cannot be reached the step fails with :class:`MlflowTrackingError`,
which names the tracking URI (credentials removed), and nothing downstream of it runs: no
MatchModel, no embedding partition for that date. MLflow's own HTTP
retries (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, default 7 with backoff factor 2, about 4 minutes;
``MLFLOW_HTTP_REQUEST_TIMEOUT``, default 120 s) ride out a server restart first.
"""


import contextlib
import hashlib
import json
import os
import socket
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import dagster as dg
from pydantic import Field

from twotower_assets.preflight import check_artifact_root, check_mlflow_store



OWNER_HOST_TAG = "twotower.host"
OWNER_PID_TAG = "twotower.pid"
FAILED_REASON_TAG = "twotower.failed_reason"

EXPERIMENT_TAGS = {
    # The MLflow UI opens runs of a "custom model development" experiment in its model-training
    # view (parameters, metric charts, logged models), not the GenAI view it may infer otherwise.
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.note.content": (
        "Two-tower retrieval models (TensorFlow Recommenders), one run per training date, trained "
        "and published by the twotower-assets Dagster graph. Each run holds the training losses per "
        "epoch; the evaluation against the random, popularity, SVD and EASE baselines (item-kNN above "
        "EASE's 10,000 items): each metric as one curve over k (`recall_at_k`, step = k) and the "
        "single numbers `recall_at_50` and `ndcg_at_10` (baselines prefixed, `ease_recall_at_50`); "
        "the logged MatchModel and retriever with their own evaluation; and the training data it read."
    ),
    "project": "twotower-assets",
    "model_family": "two_tower_retrieval",
}
"""Set when the graph creates an experiment: its description (``mlflow.note.content``) and kind."""


class MlflowTrackingError(RuntimeError):
    """The MLflow tracking server or store failed; the message names it."""


def shown_uri(uri: str) -> str:
    """``uri`` without a user or password, for messages."""
    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"***@{host}{f':{parts.port}' if parts.port else ''}"
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    return uri


def owner_tags() -> dict[str, str]:
    """The host and process that own a run (the process training it)."""
    return {OWNER_HOST_TAG: socket.gethostname(), OWNER_PID_TAG: str(os.getpid())}


def process_is_gone(pid: int) -> bool:
    """Whether no live process on this host has ``pid`` (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state == "Z"


def _is_tracking_failure(exc: BaseException) -> bool:
    import requests
    from mlflow.exceptions import MlflowException

    return isinstance(exc, (MlflowException, requests.exceptions.RequestException, ConnectionError))


class MlflowTracking(dg.ConfigurableResource):
    """An MLflow tracking server or local store, and the URL of its UI."""

    tracking_uri: str = Field(description="MLflow tracking URI (sqlite:///... locally).")
    artifact_root: str = Field(default="", description="Artifact location for new experiments.")
    ui_url: str = Field(default="http://127.0.0.1:5000", description="Base URL of the MLflow UI.")
    tracking_uri_setting: str = Field(
        default="MLFLOW_TRACKING_URI", description="The variable tracking_uri comes from, named in errors."
    )
    artifact_root_setting: str = Field(
        default="TWOTOWER_MLFLOW_ARTIFACTS", description="The variable artifact_root comes from, named in errors."
    )

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """Fail the run at its start when the store cannot be written (twotower_assets/preflight.py)."""
        check_mlflow_store(checked_tracking_uri(self.tracking_uri), self.tracking_uri_setting)
        check_artifact_root(self.artifact_root, self.artifact_root_setting)

    def store_exists(self) -> bool:
        """Whether the tracking store is there to read: a server, or a SQLite file already
        created (opening a missing file would create it, racing the run that is creating it)."""
        uri = checked_tracking_uri(self.tracking_uri)
        if not uri.startswith("sqlite:///"):
            return True
        return Path(uri.removeprefix("sqlite:///")).is_file()

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=checked_tracking_uri(self.tracking_uri))

    def experiment_id(self, name: str) -> str:
        """The experiment's id, created with its description and tags when it does not exist."""
        client = self.client()
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        return client.create_experiment(name, artifact_location=self.artifact_root or None, tags=EXPERIMENT_TAGS)

    def run_url(self, experiment_id: str, run_id: str) -> str:
        return f"{self.ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"

    def model_version_url(self, name: str, version: str) -> str:
        return f"{self.ui_url.rstrip('/')}/#/models/{name}/versions/{version}"

    @contextlib.contextmanager
    def reporting_failures(self, doing: str) -> Iterator[None]:
        """Turn a failure of the tracking server or store into an error that names it."""
        try:
            yield
        except Exception as exc:
            if isinstance(exc, MlflowTrackingError) or not _is_tracking_failure(exc):
                raise
            raise MlflowTrackingError(
                f"MLflow tracking at {shown_uri(self.tracking_uri)} failed while {doing}: {exc}"
            ) from exc

    def find_or_create_run(
        self, experiment_name: str, run_name: str, tags: Mapping[str, str]
    ) -> tuple[str, str]:
        """(experiment_id, run_id) of the run with these tags, created if there is none.

        The run is tagged with this host and process (:func:`owner_tags`), also when an
        existing run is reused by a retried step.
        """
        with self.reporting_failures(f"finding or creating the run {run_name!r}"):
            client = self.client()
            experiment_id = self.experiment_id(experiment_name)
            query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
            found = client.search_runs([experiment_id], filter_string=query, max_results=1)
            if found:
                run_id = found[0].info.run_id
                for key, value in owner_tags().items():
                    client.set_tag(run_id, key, value)
                return experiment_id, run_id
            run = client.create_run(experiment_id, run_name=run_name, tags={**tags, **owner_tags()})
            return experiment_id, run.info.run_id

    def fail_abandoned_runs(
        self,
        experiment_name: str,
        train_date: str,
        current_dagster_run_id: str,
        dagster_run_is_over=None,
    ) -> dict[str, str]:
        """End FAILED the RUNNING runs of ``train_date`` that nobody is running any more.

        A run is abandoned when its owner process (tags :data:`OWNER_HOST_TAG` /
        :data:`OWNER_PID_TAG`) was on this host and is gone, or when
        ``dagster_run_is_over(dagster_run_id)`` says its Dagster run has ended. Runs of the
        current Dagster run (a retried step reuses its run) and runs owned by a live process or
        another host with no ended Dagster run are left alone. Returns {run_id: reason}.
        """
        with self.reporting_failures(f"looking for abandoned runs of {train_date}"):
            client = self.client()
            experiment = client.get_experiment_by_name(experiment_name)
            if experiment is None:
                return {}
            running = client.search_runs(
                [experiment.experiment_id],
                filter_string=f"tags.`train_date` = '{train_date}' and attributes.status = 'RUNNING'",
            )
            failed = {}
            for run in running:
                tags = run.data.tags
                if tags.get("dagster_run_id") == current_dagster_run_id:
                    continue
                reason = _abandoned(tags, dagster_run_is_over)
                if reason is None:
                    continue
                client.set_tag(run.info.run_id, FAILED_REASON_TAG, reason)
                client.set_terminated(run.info.run_id, status="FAILED")
                failed[run.info.run_id] = reason
            return failed

    @contextlib.contextmanager
    def active(self, run_id: str) -> Iterator["RunLogger"]:
        """Log into ``run_id``; it ends FINISHED on success, FAILED on an exception.

        Any exception counts, a SIGTERM's interrupt included. When the run cannot be marked
        FAILED (the server is down) the original error is raised, and the next training of the
        date fails the run (:meth:`fail_abandoned_runs`). A tracking failure is raised as
        :class:`MlflowTrackingError` naming the tracking URI.
        """
        with self.reporting_failures(f"starting run {run_id}"):
            client = self.client()
            client.update_run(run_id, status="RUNNING")
        try:
            with self.reporting_failures(f"logging to run {run_id}"):
                yield RunLogger(client, run_id)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                client.set_tag(run_id, FAILED_REASON_TAG, f"{type(exc).__name__}: {exc}"[:1000])
                client.set_terminated(run_id, status="FAILED")
            raise
        with self.reporting_failures(f"ending run {run_id}"):
            client.set_terminated(run_id, status="FINISHED")


def _abandoned(tags: Mapping[str, str], dagster_run_is_over) -> str | None:
    host, pid = tags.get(OWNER_HOST_TAG), tags.get(OWNER_PID_TAG)
    if host == socket.gethostname() and pid and pid.isdigit() and process_is_gone(int(pid)):
        return f"abandoned: its process {pid} on {host} is gone"
    dagster_run = tags.get("dagster_run_id")
    if dagster_run and dagster_run_is_over is not None and dagster_run_is_over(dagster_run):
        return f"abandoned: its Dagster run {dagster_run} has ended"
    return None


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

    def metrics(self, values: Mapping[str, float], step: int = 0, model_id: str | None = None) -> None:
        """Log ``values`` at ``step``; with ``model_id`` they are also that logged model's own (MLflow 3)."""
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step, model_id=model_id) for k, v in values.items()]
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

    def input_table(self, name: str, source: str, rows: int, context: str, schema: Mapping[str, str]) -> None:
        """Log a warehouse table partition the run read (the run's Datasets in the MLflow UI)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        digest = hashlib.sha256(f"{source}|{rows}|{sorted(schema.items())}".encode()).hexdigest()[:16]
        dataset = Dataset(
            name=name, digest=digest, source_type="warehouse_table",
            source=json.dumps({"table": source}),
            schema=json.dumps({"mlflow_colspec": [{"name": k, "type": v} for k, v in schema.items()]}),
            profile=json.dumps({"num_rows": rows}),
        )
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])])


def checked_tracking_uri(uri: str) -> str:
    """``uri``, refused if it is an http(s) URI with a user or password in it.

    MLflow puts the URI, userinfo included, into the messages of failed requests (which end up
    in Dagster's event log); MLflow's own variables MLFLOW_TRACKING_USERNAME /
    MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) send the same credentials as a header
    and never print them. The refusal does not repeat the secret.
    """
    parts = urlsplit(uri)
    if parts.scheme.lower() in ("http", "https") and (parts.username or parts.password):
        raise ValueError(
            f"MLflow tracking URI {shown_uri(uri)} carries credentials: set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead, and remove them from the URI"
        )
    return uri
