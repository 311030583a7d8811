"""Which datasets version a model was trained on, and the refusal to mix versions.

Training records the ``tf_datasets`` version it read (and its feature config) in the model's
summary. Evaluation, the MatchModel and publishing call :func:`check_model_datasets` first:
when ``tf_datasets`` of the date has been re-materialised since (another feature config, new
data), they refuse, naming both versions and both configs, instead of scoring one model against
another model's datasets.
"""

from __future__ import annotations

import contextlib

from twotower_assets.lib import layout
from twotower_assets.lib.artifacts import ArtifactStore
from twotower_assets.lib.layout import DatasetFiles, DatasetsManifest, ModelSummary


class DatasetsMismatchError(RuntimeError):
    """A model and the date's current datasets are not the pair it was trained as."""


def check_model_datasets(artifacts: ArtifactStore, partition_key: str, summary: ModelSummary, step: str) -> str:
    """The datasets version ``summary`` records, if it is still the date's current one; else an error."""
    fix = f"re-materialise two_tower_model for {partition_key} (and what follows it) so it trains on the current datasets"
    recorded = summary.datasets_version
    if not recorded:
        raise DatasetsMismatchError(
            f"{step} for {partition_key}: two_tower_model records no tf_datasets version (trained before "
            f"versions were recorded); {fix}"
        )
    current = artifacts.current_version(layout.TF_DATASETS, partition_key)
    if current != recorded:
        config_now = "unknown"
        with contextlib.suppress(OSError, ValueError):
            config_now = DatasetsManifest.read(DatasetFiles(artifacts.path(layout.TF_DATASETS, partition_key)).manifest).config_name
        raise DatasetsMismatchError(
            f"{step} for {partition_key}: two_tower_model was trained on tf_datasets version {recorded} "
            f"(feature config {summary.config_name!r}), but tf_datasets for {partition_key} is now version "
            f"{current} (feature config {config_now!r}); {fix}"
        )
    return recorded
