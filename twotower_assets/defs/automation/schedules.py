"""The weekly schedule of the training job, and the monthly one of tuning.

The ``weekly_training`` schedule runs the partitioned ``two_tower_training`` job for the
tick's training date, once a week (production cadence; the weekday and hour, or a whole cron
string, come from the environment so dev and staging can train on other days).

Environment (read when the code location loads):

``TWOTOWER_TRAINING_CRON``      full cron string of the schedule (wins over the next two)
``TWOTOWER_TRAINING_WEEKDAY``   ``mon`` .. ``sun`` (default ``mon``)
``TWOTOWER_TRAINING_HOUR``      hour of day, UTC (default ``3``)
``TWOTOWER_SCHEDULES_RUNNING``  ``true``: both schedules start running when a fresh instance loads
                                the code; by default they start stopped (Dagster's convention), so
                                a local ``dagster dev`` trains nothing until someone turns them on
"""

import datetime as dt
import os
from collections.abc import Mapping

import dagster as dg

# Dagster's own cron check: the public ScheduleDefinition runs the same check, but its error
# would not name the environment variable the string came from.
from dagster._utils.schedules import is_valid_cron_string

from twotower_assets.defs.automation import jobs
from twotower_assets.lib.conditions import TRAINING_RUN_TAGS, AutomationSettingsError
from twotower_assets.lib.partitions import training_date_partitions

WEEKDAYS = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}


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


def schedules_status(env: Mapping[str, str] = os.environ) -> dg.DefaultScheduleStatus:
    """Both schedules' status on an instance that has not set one (``TWOTOWER_SCHEDULES_RUNNING``)."""
    raw = env.get("TWOTOWER_SCHEDULES_RUNNING", "").strip().lower()
    if raw not in {"", "0", "false", "no", "1", "true", "yes"}:
        raise AutomationSettingsError(f"TWOTOWER_SCHEDULES_RUNNING must be true or false, not {raw!r}")
    return dg.DefaultScheduleStatus.RUNNING if raw in {"1", "true", "yes"} else dg.DefaultScheduleStatus.STOPPED


TURN_ON = (
    "Stopped until turned on: the toggle under Automation, `dagster schedule start {name}`, or "
    "TWOTOWER_SCHEDULES_RUNNING=true where the code location loads."
)


def run_config_source(env: Mapping[str, str] = os.environ) -> str:
    """Which run config the training job's scheduled runs get, in words."""
    path = env.get("TWOTOWER_RUN_CONFIG", "").strip()
    return f"run config {path} (TWOTOWER_RUN_CONFIG)" if path else (
        "the production defaults (set TWOTOWER_RUN_CONFIG to a run-config file for others)"
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
        job=jobs.training_job,
        execution_timezone="UTC",
        default_status=schedules_status(),
        description=f"Trains and publishes the model of the tick's date ({cron}, UTC) with "
        f"{run_config_source()}. {TURN_ON.format(name='weekly_training')}",
    )
    def weekly_training(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
        partition_key = training_partition_at(context.scheduled_execution_time)
        return dg.RunRequest(run_key=partition_key, partition_key=partition_key, tags=TRAINING_RUN_TAGS)

    return weekly_training


training_schedule = build_training_schedule()


TUNING_CRON = "0 1 1 * *"
"""Retuning's own cadence: monthly, the 1st at 01:00 UTC, before that week's training."""


@dg.schedule(
    name="monthly_tuning",
    cron_schedule=TUNING_CRON,
    job=jobs.tuning_job,
    execution_timezone="UTC",
    default_status=schedules_status(),
    description=f"Tunes the recipe's hyperparameters on the tick's training date ({TUNING_CRON}, UTC); "
    f"the weekly trainings after it use the result. {TURN_ON.format(name='monthly_tuning')}",
)
def monthly_tuning(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    partition_key = training_partition_at(context.scheduled_execution_time)
    return dg.RunRequest(run_key=f"tuning-{partition_key}", partition_key=partition_key)
