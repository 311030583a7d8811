"""Daily partitions keyed by training date.

The partition for date D trains on the ``event_day_number`` days of events before D (D
itself excluded), so a model for D can be trained on the morning of D. ``end_offset=1``
makes today's partition available.
"""

import datetime as dt

import dagster as dg

PARTITIONS_START = "2026-01-01"

training_date_partitions = dg.DailyPartitionsDefinition(start_date=PARTITIONS_START, end_offset=1)


def training_date(context: dg.AssetExecutionContext) -> dt.date:
    return dt.date.fromisoformat(context.partition_key)
