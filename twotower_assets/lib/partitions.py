"""Daily partitions: event days of ``click_events``, training dates of everything after it.

Both share one ``DailyPartitionsDefinition`` (one calendar), so ``dagster asset materialize
--select '*' --partition D`` can run the whole graph: Dagster puts assets in one run only when
they share their partitions definition.

* ``click_events`` partition E holds the events of day E.
* Every other asset's partition D is a training date: it trains on the ``event_day_number``
  days of events before D (D itself excluded), so a model for D can be trained on the morning
  of D. ``end_offset=1`` makes today's partition available. The split of D depends on the
  event days ``[D - EVENT_WINDOW_DAYS, D - 1]`` (:data:`EVENT_WINDOW_MAPPING`).

Environment (read when the code location loads):

``TWOTOWER_PARTITIONS_START``  first partition, ``YYYY-MM-DD`` (default ``2026-03-03``, the first
                               event day of the packaged data sets; set it to your source's
                               first event date, docs/operations.md)
"""

import datetime as dt
import os
from collections.abc import Mapping

import dagster as dg

DEFAULT_PARTITIONS_START = "2026-03-03"
"""The first day with events of the packaged data sets (``configs/run/tiny.yaml`` and
``production-scale.yaml``: 90 days up to 2026-05-31; the quickstart's data ends today), so the
partition health bar counts days that can have data, not the months before it."""

EVENT_WINDOW_DAYS = 90
"""Event days a training date reads by default (``split_tables``' ``event_day_number``), and the window
its split declares on ``click_events``. A run config may read a shorter window."""


class PartitionSettingsError(ValueError):
    """A partition setting from the environment that cannot be used."""


def partitions_start(env: Mapping[str, str] = os.environ) -> str:
    raw = env.get("TWOTOWER_PARTITIONS_START", "").strip() or DEFAULT_PARTITIONS_START
    try:
        dt.date.fromisoformat(raw)
    except ValueError:
        raise PartitionSettingsError(f"TWOTOWER_PARTITIONS_START must be a date YYYY-MM-DD, not {raw!r}") from None
    return raw


PARTITIONS_START = partitions_start()

training_date_partitions = dg.DailyPartitionsDefinition(start_date=PARTITIONS_START, end_offset=1)
event_day_partitions = training_date_partitions
"""The same definition under the name that says what ``click_events``' keys are."""

EVENT_WINDOW_MAPPING = dg.TimeWindowPartitionMapping(start_offset=-EVENT_WINDOW_DAYS, end_offset=-1)
"""Training date D -> event days [D - EVENT_WINDOW_DAYS, D - 1]."""


def training_date(context: dg.AssetExecutionContext) -> dt.date:
    return dt.date.fromisoformat(context.partition_key)


def day_range(first: dt.date, last: dt.date) -> list[dt.date]:
    """Every date from ``first`` to ``last``, both included."""
    return [first + dt.timedelta(days=i) for i in range((last - first).days + 1)]


def describe_days(days: list[dt.date]) -> str:
    """``2026-05-01..2026-05-03, 2026-05-07``: sorted days as runs of consecutive dates."""
    runs: list[list[dt.date]] = []
    for day in sorted(days):
        if runs and day - runs[-1][-1] == dt.timedelta(days=1):
            runs[-1].append(day)
        else:
            runs.append([day])
    return ", ".join(f"{r[0]}..{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
