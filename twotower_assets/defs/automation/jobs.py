"""The partitioned training job: everything of one training date, with its checks.

Environment (read when the code location loads):

``TWOTOWER_RUN_CONFIG``  a run-config YAML (like ``configs/run/tiny.yaml``) used by the training
                         job, hence by the schedule and job backfills
"""

import os
from importlib import resources
from pathlib import Path
from typing import Any

import dagster as dg
import yaml

from twotower_assets.lib import layout
from twotower_assets.lib.conditions import TRAINING_RUN_TAGS, AutomationSettingsError
from twotower_assets.lib.partitions import training_date_partitions

TRAINING_JOB = "two_tower_training"
TUNING_JOB = "hyperparameter_tuning"

NOT_IN_TRAINING_JOB = (layout.CLICK_EVENTS, layout.TUNED_HYPERPARAMETERS)
"""Event days are backfilled on their own, and tuning has its own (monthly) cadence: a weekly
training reads the newest tuning, it does not retune."""


def load_run_config(path: str | Path | Any | None) -> dict[str, Any] | None:
    """Run config for the training job from a YAML file, without the event source.

    The same file drives ``dagster asset materialize -c`` of the whole graph, which includes
    ``click_events``; the training job does not (a training never writes event days:
    docs/operations.md, "Backfilling events vs backfilling trainings"), so its entry is
    dropped here.
    """
    if not path:
        return None
    path = path if hasattr(path, "read_text") and not isinstance(path, str) else Path(path)
    if not path.is_file():
        raise AutomationSettingsError(f"TWOTOWER_RUN_CONFIG points to {path}, which is not a file")
    config = yaml.safe_load(path.read_text()) or {}
    if not isinstance(config, dict):
        raise AutomationSettingsError(f"{path} must hold a run-config mapping, not {type(config).__name__}")
    ops = {name: value for name, value in (config.get("ops") or {}).items() if name not in NOT_IN_TRAINING_JOB}
    config = {key: value for key, value in config.items() if key != "ops"}
    if ops:
        config["ops"] = ops
    return config or None


training_job = dg.define_asset_job(
    TRAINING_JOB,
    selection=dg.AssetSelection.all() - dg.AssetSelection.assets(*NOT_IN_TRAINING_JOB),
    partitions_def=training_date_partitions,
    config=load_run_config(os.environ.get("TWOTOWER_RUN_CONFIG")),
    run_tags=TRAINING_RUN_TAGS,
    description=(
        "Everything that depends on the training date, with its checks: split, datasets, training, "
        "evaluation and quality gate, MatchModel, embedding layout. One run per date."
    ),
)


def preset_job(name: str, run_config_file: str, description: str):
    """The training job with a packaged run config (``configs/run/<file>``) as its defaults.

    Asset jobs have no presets; a job per ready-made run config makes each one click away in
    the UI, and its Launchpad starts from that config (editable before launching).
    """
    return dg.define_asset_job(
        name,
        selection=dg.AssetSelection.all() - dg.AssetSelection.assets(*NOT_IN_TRAINING_JOB),
        partitions_def=training_date_partitions,
        config=load_run_config(resources.files("twotower_assets.configs") / "run" / run_config_file),
        run_tags=TRAINING_RUN_TAGS,
        description=description,
    )


training_job_quickstart = preset_job(
    "two_tower_training_quickstart", "quickstart.yaml",
    "The training job with configs/run/quickstart.yaml: the README's size (batch 512 on the default data).",
)
training_job_quickstart_history = preset_job(
    "two_tower_training_quickstart_history", "quickstart-history.yaml",
    "The quickstart with the history-aware user tower (default-features-history): the split computes "
    "each event's recent items from the click events.",
)
training_job_tiny = preset_job(
    "two_tower_training_tiny", "tiny.yaml",
    "The training job with configs/run/tiny.yaml: a smoke run in about a minute (needs the event days "
    "of its window: an events backfill of click_events with the same file, docs/operations.md).",
)
training_job_production_scale = preset_job(
    "two_tower_training_production_scale", "production-scale.yaml",
    "The training job with configs/run/production-scale.yaml: production sizes (10M events).",
)


tuning_job = dg.define_asset_job(
    TUNING_JOB,
    selection=dg.AssetSelection.assets(layout.TUNED_HYPERPARAMETERS),
    partitions_def=training_date_partitions,
    description="Tunes the model recipe's hyperparameters on one training date's datasets "
    "(tuned_hyperparameters); later trainings use the result.",
)
