"""When assets run by themselves: automation conditions, freshness policies, the training pool.

Imported by the asset modules (each asset says which condition it follows) and by
``defs/automation`` (the schedule, the sensor that evaluates these conditions, the job).

* the ``twotower_automation`` sensor evaluates the conditions below every 30 s: downstream
  assets follow their inputs (new training data retrains the model, a new model is
  evaluated, gated and published), and stale training data/models are retrained;
* freshness policies (``FreshnessPolicy.time_window``) on the training data, the model and
  the embedding tables, evaluated by the Dagster daemon, say in the UI when something is
  older than the cadence allows, and a FAIL starts a retrain of the latest training date.

Environment (read when the code location loads):

``TWOTOWER_RETRAIN_AFTER_DAYS`` freshness fail window of model, training data and embeddings
                                (default ``8``: the weekly cadence plus a day of grace)
``TWOTOWER_RETRAIN_ON_NEW_EVENTS`` ``true``: a new event day of the latest training date's
                                window retrains that date (default ``false``: weekly cadence)
"""

import datetime as dt
import os
from collections.abc import Mapping

import dagster as dg

TRAINING_POOL = "training"
"""Concurrency pool of the training step: ``dagster.yaml`` limits every pool to one slot, so
two partitions never train at the same time on one machine (one GPU)."""


class AutomationSettingsError(ValueError):
    """A schedule or freshness setting from the environment that cannot be used."""


# --------------------------------------------------------------------------- freshness


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

def deps_updated(ignore: dg.AssetSelection | None = None) -> dg.AutomationCondition:
    """DEPS_UPDATED (below), blind to the inputs in ``ignore``."""

    def blind(condition):
        return condition.ignore(ignore) if ignore is not None else condition

    return (
        blind(AC.any_deps_match(_UPDATED_ELSEWHERE | AC.will_be_requested())).since_last_handled()
        & ~blind(AC.any_deps_missing())
        & ~blind(AC.any_deps_in_progress())
        & _IDLE
        & AC.all_deps_blocking_checks_passed()
    ).with_label("deps_updated")


DEPS_UPDATED = deps_updated()
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

NEW_EVENT_DAYS = (
    AC.in_latest_time_window()
    & AC.any_deps_match(AC.newly_updated()).since_last_handled()
    & ~AC.any_deps_missing()
    & ~AC.any_deps_in_progress()
    & _IDLE
).with_label("new_event_days")
"""Rebuild the latest training date's split when an event day of its window is new: a
materialised day, or, for an observed external table (BigQuery), a day whose row count
(its data version) changed. Only once every day of the window is there."""


def retrain_on_new_events(env: Mapping[str, str] = os.environ) -> bool:
    raw = env.get("TWOTOWER_RETRAIN_ON_NEW_EVENTS", "").strip().lower()
    if raw not in {"", "0", "false", "no", "1", "true", "yes"}:
        raise AutomationSettingsError(f"TWOTOWER_RETRAIN_ON_NEW_EVENTS must be true or false, not {raw!r}")
    return raw in {"1", "true", "yes"}


def training_data_condition(on_new_events: bool) -> dg.AutomationCondition:
    """The split tables' condition: stale-only (weekly cadence) or also on new event days."""
    if on_new_events:
        return (RETRAIN_WHEN_STALE | NEW_EVENT_DAYS).with_label("retrain_on_new_data")
    return RETRAIN_WHEN_STALE


TRAINING_DATA_CONDITION = training_data_condition(retrain_on_new_events())
"""Split tables: rebuilt for the latest date when stale. By default new click events alone do
not retrain: the source grows every day and the cadence is weekly (the schedule takes them).
With ``TWOTOWER_RETRAIN_ON_NEW_EVENTS=true`` a new event day of the latest date's window
rebuilds its split, and the model follows (``MODEL_CONDITION``): retraining on new data."""

_TUNING = dg.AssetSelection.assets("tuned_hyperparameters")

MODEL_CONDITION = (
    deps_updated(ignore=_TUNING)
    | (
        AC.in_latest_time_window()
        & AC.freshness_failed().newly_true().since_last_handled()
        & ~AC.any_deps_missing().ignore(_TUNING)
        & ~AC.any_deps_in_progress().ignore(_TUNING)
        & _IDLE
    ).with_label("retrain_when_stale")
).with_label("retrain")
"""The model retrains when its training data has new data, and when it is stale. Tuning is
an input it reads when there is one (the newest at or before its date), on its own monthly
cadence: a date without a tuning of its own still trains, and a new tuning does not by itself
retrain (the next weekly training uses it)."""

DOWNSTREAM_CONDITION = DEPS_UPDATED
"""Datasets, metrics, MatchModel and embedding tables follow their inputs; the blocking
checks in DEPS_UPDATED keep a model that failed the quality gate from being published."""

CHECK_CONDITION = AC.any_deps_match(AC.will_be_requested()).with_label("with_asset")
"""Checks run in the same run as their asset whenever automation materialises it; schedule,
backfill and UI runs include them already. (Re-running them after every update instead would
follow each job run with check-only runs: job runs record no explicit check selection.)"""
