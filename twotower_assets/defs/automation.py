"""When the graph runs by itself: the weekly training job, freshness and declarative automation.

Three things start work without a person pressing a button:

* the ``weekly_training`` schedule runs the partitioned ``two_tower_training`` job for the
  tick's training date, once a week (production cadence; the weekday and hour, or a whole
  cron string, come from the environment so dev and staging can train on other days);
* the ``twotower_automation`` sensor evaluates the automation conditions below every 30 s:
  downstream assets follow their inputs (new training data retrains the model, a new model
  is evaluated, gated and published), and stale training data/models are retrained;
* freshness policies (``FreshnessPolicy.time_window``) on the training data, the model and
  the embedding tables, evaluated by the Dagster daemon, say in the UI when something is
  older than the cadence allows, and a FAIL starts a retrain of the latest training date.

This module must not import the asset modules (they import the conditions from here).
Environment (read when the code location loads):

``TWOTOWER_TRAINING_CRON``      full cron string of the schedule (wins over the next two)
``TWOTOWER_TRAINING_WEEKDAY``   ``mon`` .. ``sun`` (default ``mon``)
``TWOTOWER_TRAINING_HOUR``      hour of day, UTC (default ``3``)
``TWOTOWER_RETRAIN_AFTER_DAYS`` freshness fail window of model, training data and embeddings
                                (default ``8``: the weekly cadence plus a day of grace)
``TWOTOWER_RUN_CONFIG``         a run-config YAML (like ``configs/run/tiny.yaml``) used by the
                                training job, hence by the schedule and job backfills
"""


import datetime as dt
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import yaml
from dagster._utils.schedules import is_valid_cron_string

from twotower_assets.defs import tables
from twotower_assets.defs.partitions import training_date_partitions

TRAINING_JOB = "two_tower_training"
TRAINING_POOL = "training"
"""Concurrency pool of the training step: ``dagster.yaml`` limits every pool to one slot, so
two partitions never train at the same time on one machine (one GPU)."""

WEEKDAYS = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}


class AutomationSettingsError(ValueError):
    """A schedule or freshness setting from the environment that cannot be used."""


# --------------------------------------------------------------------------- cadence


def weekly_cron(weekday: str = "mon", hour: int = 3, minute: int = 0) -> str:
    """The cron string of a weekly run on ``weekday`` at ``hour:minute``."""
    day = WEEKDAYS.get(weekday.strip().lower()[:3]) if weekday else None
    if day is None:
        raise AutomationSettingsError(f"weekday must be one of {', '.join(WEEKDAYS)}, not {weekday!r}")
    if not 0 <= hour <= 23 or not 0 <= minute <= 59:
        raise AutomationSettingsError(f"not a time of day: {hour:02d}:{minute:02d}")
    return f"{minute} {hour} * * {day}"


def training_cron(env: Mapping[str, str] = os.environ) -> str:
    """The schedule's cron string from the environment (see the module docstring)."""
    cron = env.get("TWOTOWER_TRAINING_CRON", "").strip()
    if cron:
        if not is_valid_cron_string(cron):
            raise AutomationSettingsError(f"TWOTOWER_TRAINING_CRON is not a valid cron string: {cron!r}")
        return cron
    hour = env.get("TWOTOWER_TRAINING_HOUR", "3").strip()
    if not hour.isdigit():
        raise AutomationSettingsError(f"TWOTOWER_TRAINING_HOUR must be an hour 0-23, not {hour!r}")
    return weekly_cron(env.get("TWOTOWER_TRAINING_WEEKDAY", "mon"), int(hour))


def retrain_after(env: Mapping[str, str] = os.environ) -> dt.timedelta:
    raw = env.get("TWOTOWER_RETRAIN_AFTER_DAYS", "8").strip()
    try:
        days = float(raw)
    except ValueError:
        days = 0.0
    if days <= 0:
        raise AutomationSettingsError(f"TWOTOWER_RETRAIN_AFTER_DAYS must be a positive number of days, not {raw!r}")
    return dt.timedelta(days=days)


def freshness_policy(fail_after: dt.timedelta | None = None) -> dg.FreshnessPolicy:
    """FAIL when the last materialisation is older than ``fail_after``; WARN from 7/8 of it."""
    fail_after = fail_after or retrain_after()
    return dg.FreshnessPolicy.time_window(fail_window=fail_after, warn_window=fail_after * 7 / 8)


RETRAIN_FRESHNESS = freshness_policy()
"""On the split tables, the model and the embedding tables (same window: one weekly run
refreshes them together)."""


# --------------------------------------------------------------------------- conditions

AC = dg.AutomationCondition

TRAINING_RUN_TAGS = {"twotower/run": "training_date"}
"""Tags of the training job's runs (schedule, launchpad): such a run materialises everything
of its date, so automation ignores the updates it makes."""

_MADE_BY_A_RUN_THAT_COVERS_US = (
    AC.executed_with_root_target()
    | AC.executed_with_tags(tag_values=TRAINING_RUN_TAGS)
    | AC.executed_with_tags(tag_keys={"dagster/backfill"})
).with_label("made_by_a_run_that_covers_us")

_UPDATED_ELSEWHERE = (AC.newly_updated() & ~_MADE_BY_A_RUN_THAT_COVERS_US).with_label("updated_elsewhere")

_NOT_IN_PROGRESS = ~AC.in_progress()
_JUST_FINISHED = (
    _NOT_IN_PROGRESS.newly_true() & ~AC.in_latest_time_window().newly_true()
).with_label("finished_since_last_tick")
_IDLE = (_NOT_IN_PROGRESS & ~_JUST_FINISHED).with_label("idle_since_last_tick")
"""Not in progress now, nor at the previous tick. A partition stops being "in progress" the
moment its materialisation lands, but a tick only sees the events written before it started;
a tick in between would see the partition idle yet not updated and request it again. One tick
later the update is visible and has reset the conditions that would have fired. (A date that
has just become the latest was not in progress before either: it did not exist.)"""

DEPS_UPDATED = (
    AC.any_deps_match(_UPDATED_ELSEWHERE | AC.will_be_requested()).since_last_handled()
    & ~AC.any_deps_missing()
    & ~AC.any_deps_in_progress()
    & _IDLE
    & AC.all_deps_blocking_checks_passed()
).with_label("deps_updated")
"""Materialise a training-date partition when an input of the same date was updated (or is
requested in the same tick), once all inputs exist, none is running, and every blocking check
of the inputs passed (or runs in the same run, where a failure stops the run before us).

Unlike ``AutomationCondition.eager()`` it is not limited to the latest date: re-materialising
the split of an older date retrains that date. Updates are ignored when the run that made
them also covers this asset: it targeted it, or it is a run of the training job or of a
backfill (job and backfill runs record no asset selection, so they are told by their tags).
Dagster answers "which run updated it" only for an asset's most recently updated partition,
so with several dates running at once this filter misses some; ``_IDLE`` is what keeps those
from being requested twice."""

RETRAIN_WHEN_STALE = (
    AC.in_latest_time_window()
    & AC.freshness_failed().newly_true().since_last_handled()
    & ~AC.any_deps_missing()
    & ~AC.any_deps_in_progress()
    & _IDLE
).with_label("retrain_when_stale")
"""Materialise the latest training date once when the asset's freshness policy goes to FAIL
(the weekly run did not happen or failed). ``newly_true`` + ``since_last_handled`` request it
once per FAIL, not again on every tick until the daemon re-evaluates freshness."""

TRAINING_DATA_CONDITION = RETRAIN_WHEN_STALE
"""Split tables: rebuilt for the latest date when stale. New click events alone do not
retrain: the source grows every day and the cadence is weekly (the schedule takes them)."""

MODEL_CONDITION = (DEPS_UPDATED | RETRAIN_WHEN_STALE).with_label("retrain")
"""The model retrains when its training data has new data, and when it is stale."""

DOWNSTREAM_CONDITION = DEPS_UPDATED
"""Datasets, metrics, MatchModel and embedding tables follow their inputs; the blocking
checks in DEPS_UPDATED keep a model that failed the quality gate from being published."""

CHECK_CONDITION = AC.any_deps_match(AC.will_be_requested()).with_label("with_asset")
"""Checks run in the same run as their asset whenever automation materialises it; schedule,
backfill and UI runs include them already. (Re-running them after every update instead would
follow each job run with check-only runs: job runs record no explicit check selection.)"""


# --------------------------------------------------------------------------- job, schedule, sensor


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
    ops = {name: value for name, value in (config.get("ops") or {}).items() if name != tables.CLICK_EVENTS}
    config = {key: value for key, value in config.items() if key != "ops"}
    if ops:
        config["ops"] = ops
    return config or None


training_job = dg.define_asset_job(
    TRAINING_JOB,
    selection=dg.AssetSelection.all() - dg.AssetSelection.assets(tables.CLICK_EVENTS),
    partitions_def=training_date_partitions,
    config=load_run_config(os.environ.get("TWOTOWER_RUN_CONFIG")),
    run_tags=TRAINING_RUN_TAGS,
    description=(
        "Everything that depends on the training date, with its checks: split, datasets, training, "
        "evaluation and quality gate, MatchModel, embedding tables. One run per date."
    ),
)


def training_partition_at(when: dt.datetime) -> str:
    """The training date a run started at ``when`` trains: the latest partition then."""
    with dg.partition_loading_context(effective_dt=when):
        key = training_date_partitions.get_last_partition_key()
    if key is None:
        raise AutomationSettingsError(f"no training date partition exists at {when.isoformat()}")
    return key


def build_training_schedule(cron: str | None = None) -> dg.ScheduleDefinition:
    """The weekly schedule of the partitioned training job.

    ``build_schedule_from_partitioned_job`` only fires at the partitions' own cadence (daily
    here) and refuses a weekday or cron for daily partitions, so this schedule picks the
    partition itself: the latest training date at the tick.
    """
    cron = cron or training_cron()

    @dg.schedule(
        name="weekly_training",
        cron_schedule=cron,
        job=training_job,
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Trains and publishes the model of the tick's date ({cron}, UTC).",
    )
    def weekly_training(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
        partition_key = training_partition_at(context.scheduled_execution_time)
        return dg.RunRequest(run_key=partition_key, partition_key=partition_key, tags=TRAINING_RUN_TAGS)

    return weekly_training


training_schedule = build_training_schedule()

automation_sensor = dg.AutomationConditionSensorDefinition(
    "twotower_automation",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description=(
        "Evaluates the assets' automation conditions: follow updated inputs, retrain stale "
        "models. Running by default (Dagster's own default sensor starts stopped)."
    ),
)
