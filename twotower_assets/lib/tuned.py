"""The result of a tuning (``tuned_hyperparameters``), as the model asset reads it."""

import json
from pathlib import Path

from twotower_assets.lib import layout
from twotower_assets.lib.artifacts import ArtifactStore

TUNED_FILE = "tuned.json"
"""The best overrides, epoch count and score of one date's search, beside its trials and plots."""


def newest_tuning(artifacts: ArtifactStore, partition_key: str, recipe: str) -> dict | None:
    """The newest tuning of ``recipe`` at or before ``partition_key`` (its ``tuned.json``), or None."""
    root = Path(artifacts.base_dir) / layout.TUNED_HYPERPARAMETERS
    if not root.is_dir():
        return None
    dates = sorted((p.name for p in root.iterdir() if len(p.name) == 10 and p.name <= partition_key), reverse=True)
    for date in dates:
        if artifacts.current_version(layout.TUNED_HYPERPARAMETERS, date) is None:
            continue
        tuned = json.loads((artifacts.require(layout.TUNED_HYPERPARAMETERS, date) / TUNED_FILE).read_text())
        if tuned.get("recipe") == recipe:
            return tuned
    return None
