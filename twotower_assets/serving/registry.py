"""Logging, registering and promoting the published models in MLflow.

Both published models, the MatchModel (``two_tower_match``) and the retriever
(``two_tower_retriever``), are MLflow 3 logged models of their training run and one registered
version per training date, tagged with the date, the Dagster run and (once the quality gate has
judged them) ``gate=passed`` or ``gate=failed`` with the gate's metrics. Each logged model carries
only its own metrics (:func:`link_metrics`): the MatchModel the losses of the epoch it kept and
its evaluation, the retriever the evaluation of the vectors it serves. The alias ``champion``
names the versions consumers read; :func:`promote` moves it (after a passed gate, or to roll
back). Aliases, not the deprecated stages.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from twotower_assets.lib.kill_points import kill_point

CHAMPION = "champion"
TRAIN_DATE_TAG = "train_date"
GATE_TAG = "gate"
DAGSTER_RUN_TAG = "dagster_run_id"


def requirements(*packages: str) -> list[str]:
    """``name==version`` of each installed package, for a model's pip requirements."""
    return [f"{name}=={importlib_metadata.version(name)}" for name in packages]


def package_copy(into: Path) -> Path:
    """A copy of the ``twotower_assets`` package (sources only) for a model's ``code_paths``."""
    package = Path(__file__).resolve().parents[1]
    target = into / package.name
    shutil.copytree(package, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


@contextlib.contextmanager
def tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (which ``Model.log`` uses) at ``uri`` for one call.

    MLflow has no public way to scope the tracking URI; ``_use_tracking_uri`` puts the previous
    setting back, but clears ``MLFLOW_TRACKING_URI`` when there was none set by code, so the
    variable is restored here too.
    """
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    variable = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if variable is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = variable


def log_registered_pyfunc(
    client: MlflowClient,
    run_id: str,
    *,
    name: str,
    entry_code: str,
    artifacts: Mapping[str, str],
    signature: Any,
    input_example: Any,
    registered_model_name: str,
    pip_requirements: list[str],
    tags: Mapping[str, Any] | None = None,
    description: str | None = None,
) -> tuple[str, str]:
    """Log a models-from-code pyfunc into ``run_id``, register a version, tag both; (URI, version).

    The model carries a copy of this package (``code_paths``), so a served version, or a
    rollback to an older one, runs the code it was logged with; the entry file is code, not a
    pickle, so servers that refuse pickles load it. ``description`` becomes the registered
    model's (what the registry's page of the model says it is) when it has none yet, so a text
    someone wrote there is kept.
    """
    tags = {k: str(v) for k, v in (tags or {}).items()}
    # A version of this run left untagged by an attempt that died before tagging goes first.
    remove_orphans(client, registered_model_name, run_id)
    run = client.get_run(run_id)
    # Model.log links every run metric logged at its ``step`` to the model (MLflow 3); at a step
    # no run metric has, the model gets none of the run's other numbers (per-epoch losses,
    # baselines), only what link_metrics gives it.
    step = unused_step(client, run)
    # Created here, in the run's experiment: Model.log given only a run_id (and no active run)
    # files the logged model under the default experiment "0", with artifacts in ./mlruns.
    logged_model = client.create_logged_model(
        experiment_id=run.info.experiment_id, name=name, source_run_id=run_id,
        tags=tags, params=dict(run.data.params),
    )
    with tempfile.TemporaryDirectory(prefix=f"{name}-") as tmp:
        entry = Path(tmp) / f"{registered_model_name}_model.py"
        entry.write_text(entry_code)
        with tracking_uri(client.tracking_uri):
            # mlflow.pyfunc.log_model is Model.log(flavor=mlflow.pyfunc) into the active run;
            # passing run_id logs into the run without making it the process's active run
            # (start_run would end it on exit, which is MlflowTracking.active's job).
            info = mlflow.models.Model.log(
                artifact_path=None,
                name=name,
                model_id=logged_model.model_id,
                flavor=mlflow.pyfunc,
                run_id=run_id,
                step=step,
                python_model=str(entry),
                artifacts=dict(artifacts),
                code_paths=[str(package_copy(Path(tmp) / "code"))],
                pip_requirements=pip_requirements,
                signature=signature,
                input_example=input_example,
                registered_model_name=registered_model_name,
            )
    version = str(info.registered_model_version)
    kill_point("registration.registered")
    for key, value in tags.items():
        client.set_model_version_tag(registered_model_name, version, key, value)
    if description and not client.get_registered_model(registered_model_name).description:
        client.update_registered_model(registered_model_name, description=description)
    return f"models:/{registered_model_name}/{version}", version


def remove_orphans(client: MlflowClient, name: str, run_id: str) -> list[str]:
    """Delete ``name``'s versions that carry no ``train_date`` tag, left by an attempt that died
    between registering and tagging (MLflow registers the logged model, then the tags are set):
    those of ``run_id`` (this run registering again) and those of runs no longer RUNNING (a
    killed run is marked FAILED by the rerun of its date before it trains). A version another
    live run is tagging right now is left alone. Returns their numbers."""
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return []  # no such registered model yet
    orphans = []
    for version in versions:
        if TRAIN_DATE_TAG in (version.tags or {}):
            continue
        if version.run_id == run_id or (version.run_id and client.get_run(version.run_id).info.status != "RUNNING"):
            client.delete_model_version(name, str(version.version))
            orphans.append(str(version.version))
    return orphans


def unused_step(client: MlflowClient, run) -> int:
    """One past the largest step of any metric of ``run``."""
    steps = [m.step for key in run.data.metrics for m in client.get_metric_history(run.info.run_id, key)]
    return max(steps, default=-1) + 1


def run_metrics(client: MlflowClient, run_id: str, keys: Iterable[str], step: int | None = None) -> list[Metric]:
    """The points of ``keys`` in ``run_id``: each key's point at ``step``, or its latest point.

    A key without such a point is left out.
    """
    points = []
    for key in keys:
        history = client.get_metric_history(run_id, key)
        if step is not None:
            history = [m for m in history if m.step == step]
        if history:
            points.append(max(history, key=lambda m: (m.step, m.timestamp)))
    return points


def link_metrics(client: MlflowClient, run_id: str, model_id: str, metrics: Iterable[Metric]) -> None:
    """Record ``metrics`` of ``run_id`` as the logged model ``model_id``'s own (MLflow 3).

    A point the run already has (same key, step, timestamp and value) is not added to the run
    again: only the model's link is new. Nothing is logged without a ``model_id``.
    """
    if not model_id:
        return
    linked = [
        Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id, run_id=run_id,
               dataset_name=m.dataset_name, dataset_digest=m.dataset_digest)
        for m in metrics
    ]
    for start in range(0, len(linked), 1000):  # log_batch takes at most 1000 metrics
        client.log_batch(run_id, metrics=linked[start:start + 1000])


def logged_model_id(client: MlflowClient, name: str, version: str) -> str | None:
    """The MLflow 3 logged model a registered version was made from.

    A SQL registry does not fill ``ModelVersion.model_id``; its ``source`` is ``models:/<model_id>``.
    """
    model_version = client.get_model_version(name, str(version))
    if model_version.model_id:
        return model_version.model_id
    prefix = "models:/"
    source = model_version.source or ""
    if source.startswith(prefix) and "/" not in source[len(prefix):]:
        return source[len(prefix):]
    return None


def version_of_date(client: MlflowClient, name: str, train_date: str, mlflow_run_id: str | None = None) -> ModelVersion | None:
    """The newest version of ``name`` for ``train_date`` (of ``mlflow_run_id`` when given)."""
    try:
        versions = client.search_model_versions(f"name = '{name}' and tags.{TRAIN_DATE_TAG} = '{train_date}'")
    except MlflowException:
        return None
    if mlflow_run_id is not None:
        versions = [v for v in versions if v.run_id == mlflow_run_id]
    return max(versions, key=lambda v: int(v.version), default=None)


def record_gate(client: MlflowClient, name: str, version: str, passed: bool, metrics: Mapping[str, Any]) -> None:
    """Tag a version with the gate's verdict and the numbers it was decided on."""
    client.set_model_version_tag(name, version, GATE_TAG, "passed" if passed else "failed")
    for key, value in metrics.items():
        client.set_model_version_tag(name, version, f"gate.{key}", f"{value:.6g}" if isinstance(value, float) else str(value))


def champion(client: MlflowClient, name: str) -> ModelVersion | None:
    """The version ``name@champion`` points at, or None."""
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def passed_versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    """Every version of ``name`` the gate passed, oldest training date first."""
    try:
        versions = client.search_model_versions(f"name = '{name}' and tags.{GATE_TAG} = 'passed'")
    except MlflowException:
        return []
    return sorted(versions, key=lambda v: (v.tags.get(TRAIN_DATE_TAG, ""), int(v.version)))


def promote(client: MlflowClient, name: str, version: str, *, require_passed: bool = True) -> ModelVersion:
    """Point ``name@champion`` at ``version``; refuses a version the gate did not pass."""
    model_version = client.get_model_version(name, str(version))
    if require_passed:
        check_gate_passed(model_version)
    client.set_registered_model_alias(name, CHAMPION, str(version))
    return model_version


def check_gate_passed(model_version: ModelVersion) -> None:
    """Refuse (ValueError) a version the quality gate did not tag ``gate=passed``."""
    gate = model_version.tags.get(GATE_TAG)
    if gate != "passed":
        raise ValueError(
            f"{model_version.name} version {model_version.version} (train_date "
            f"{model_version.tags.get(TRAIN_DATE_TAG)}) has gate={gate or 'unset'}: only a version that passed "
            "the quality gate can be champion"
        )
