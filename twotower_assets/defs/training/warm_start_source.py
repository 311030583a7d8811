"""Which trained model a warm start begins from (the model asset's ``warm_start`` run config).

* ``champion``: the towers of the champion's own training run: the version of the champion's
  date (its ``train_date`` tag) whose ``summary.json`` records the run the registered version
  came from. A later retrain of that date that was not promoted is not the champion.
* ``previous``: the newest earlier date with a saved ``two_tower_model``, published or not.

When there is no such model (the first training, a registry without a champion, the
champion's files gone), training starts cold and says why: a warm start is an optimisation,
never a reason for a weekly training to fail. Glue only; the weights are mapped by
:mod:`twotower_assets.model.warm_start`.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

from twotower_assets.lib import layout
from twotower_assets.lib.artifacts import ArtifactStore
from twotower_assets.lib.layout import ModelFiles
from twotower_assets.lib.mlflow_tracking import MlflowTracking
from twotower_assets.serving.match_scorer import REGISTERED_MODEL_NAME
from twotower_assets.serving.registry import TRAIN_DATE_TAG, champion


@dataclass(frozen=True)
class WarmStartSource:
    """The model to start from (``model`` None: a cold start, ``reason`` says why)."""

    choice: str
    train_date: str | None
    model: ModelFiles | None
    reason: str

    @property
    def label(self) -> str:
        """What the MLflow param ``warm_start_from`` and the Dagster metadata show."""
        return f"{self.choice}:{self.train_date}" if self.model is not None else "none"


def _saved(artifacts: ArtifactStore, train_date: str, version: str | None = None) -> ModelFiles | None:
    """The date's saved model (its current version, or ``version``; resolved and verified once), or None."""
    try:
        files = ModelFiles(artifacts.require(layout.TWO_TOWER_MODEL, train_date, version))
    except FileNotFoundError:
        return None
    return files if files.user_tower.is_dir() and files.item_tower.is_dir() else None


def _saved_of_run(artifacts: ArtifactStore, train_date: str, mlflow_run_id: str) -> ModelFiles | None:
    """The date's saved model trained by MLflow run ``mlflow_run_id`` (newest such version), or None."""
    for version in reversed(artifacts.versions(layout.TWO_TOWER_MODEL, train_date)):
        summary = artifacts.version_path(layout.TWO_TOWER_MODEL, train_date, version) / "summary.json"
        try:
            run_id = json.loads(summary.read_text()).get("mlflow_run_id")
        except (OSError, ValueError):
            continue
        if run_id == mlflow_run_id:
            return _saved(artifacts, train_date, version)
    return None


def _is_date(name: str) -> bool:
    try:
        dt.date.fromisoformat(name)
    except ValueError:
        return False
    return True


def previous_model_date(artifacts: ArtifactStore, partition_key: str) -> str | None:
    """The newest date before ``partition_key`` with saved towers (entries of the asset's
    directory named by a date; scratch and version directories are not)."""
    root = Path(artifacts.path(layout.TWO_TOWER_MODEL, partition_key)).parent
    if not root.is_dir():
        return None
    dates = sorted((p.name for p in root.iterdir() if _is_date(p.name) and p.name < partition_key), reverse=True)
    return next((date for date in dates if _saved(artifacts, date) is not None), None)


def resolve_warm_start(choice: str, partition_key: str, artifacts: ArtifactStore, mlflow: MlflowTracking) -> WarmStartSource:
    """The saved model ``choice`` names for a training of ``partition_key``."""
    if choice == "none":
        return WarmStartSource(choice, None, None, "warm_start is none")
    if choice == "previous":
        date = previous_model_date(artifacts, partition_key)
        if date is None:
            return WarmStartSource(choice, None, None, f"no model trained before {partition_key}: cold start")
        return WarmStartSource(choice, date, _saved(artifacts, date), f"the newest earlier model ({date})")
    if choice == "champion":
        with mlflow.reporting_failures("reading the champion to warm-start from"):
            version = champion(mlflow.client(), REGISTERED_MODEL_NAME)
        if version is None:
            return WarmStartSource(choice, None, None, f"{REGISTERED_MODEL_NAME} has no champion yet: cold start")
        date = version.tags.get(TRAIN_DATE_TAG)
        model = _saved_of_run(artifacts, date, version.run_id) if date else None
        described = f"the champion ({REGISTERED_MODEL_NAME} v{version.version}, {date}, MLflow run {version.run_id})"
        if model is None:
            return WarmStartSource(choice, date, None, f"{described} has no saved towers here: cold start")
        return WarmStartSource(choice, date, model, f"{described}, model version {model.root.name}")
    raise ValueError(f"warm_start must be none, champion or previous, not {choice!r}")
