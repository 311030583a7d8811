"""The partitioned training job: everything of one training date, with its checks.

Environment (read when the code location loads):

``TWOTOWER_RUN_CONFIG``  a run-config YAML (like ``configs/run/tiny.yaml``) used by the training
                         job, hence by the schedule and job backfills
"""

import os
from pathlib import Path
from typing import Any

import dagster as dg
import yaml

from twotower_assets.lib import layout
from twotower_assets.lib.conditions import TRAINING_RUN_TAGS, AutomationSettingsError
from twotower_assets.lib.partitions import training_date_partitions

TRAINING_JOB = "two_tower_training"


def load_run_config(path: str | Path | None) -> dict[str, Any] | None:
    """Run config for the training job from a YAML file, without the unpartitioned source.

    The same file drives ``dagster asset materialize -c`` of the whole graph, which includes
    ``click_events``; the partitioned job does not, so its entry is dropped here.
    """
    if not path:
        return None
    path = Path(path)
    if not path.is_file():
        raise AutomationSettingsError(f"TWOTOWER_RUN_CONFIG points to {path}, which is not a file")
    config = yaml.safe_load(path.read_text()) or {}
    if not isinstance(config, dict):
        raise AutomationSettingsError(f"{path} must hold a run-config mapping, not {type(config).__name__}")
    ops = {name: value for name, value in (config.get("ops") or {}).items() if name != layout.CLICK_EVENTS}
    config = {key: value for key, value in config.items() if key != "ops"}
    if ops:
        config["ops"] = ops
    return config or None


training_job = dg.define_asset_job(
    TRAINING_JOB,
    selection=dg.AssetSelection.all() - dg.AssetSelection.assets(layout.CLICK_EVENTS),
    partitions_def=training_date_partitions,
    config=load_run_config(os.environ.get("TWOTOWER_RUN_CONFIG")),
    run_tags=TRAINING_RUN_TAGS,
    description=(
        "Everything that depends on the training date, with its checks: split, datasets, training, "
        "evaluation and quality gate, MatchModel, embedding layout. One run per date."
    ),
)
