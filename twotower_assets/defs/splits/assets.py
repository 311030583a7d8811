"""Training, validation and test tables, split in the warehouse by SQL.

The rules (docs/decisions.md) are in :func:`twotower_assets.warehouse.sql.split_queries`;
the three tables of one training date are replaced together, in one transaction.

The split of training date D reads the event days ``[D - event_day_number, D - 1]`` and
declares them as its dependency on ``click_events`` (``EVENT_WINDOW_MAPPING``). Before writing
it checks that every day of that window is there, and names the missing ones otherwise.
"""


import datetime as dt

import dagster as dg
from pydantic import Field

from twotower_assets import settings
from twotower_assets.lib import layout
from twotower_assets.lib.feature_choice import FeatureConfigChoice
from twotower_assets.lib.conditions import RETRAIN_FRESHNESS, TRAINING_DATA_CONDITION
from twotower_assets.lib.metadata import table_metadata
from twotower_assets.lib.partitions import (
    EVENT_WINDOW_DAYS,
    EVENT_WINDOW_MAPPING,
    PARTITIONS_START,
    day_range,
    describe_days,
    training_date,
    training_date_partitions,
)
from twotower_assets.lib.retries import WAREHOUSE_RETRY_POLICY, retry_transient_errors_only
from twotower_assets.warehouse.base import WarehouseResource
from twotower_assets.warehouse.errors import EmptyTableError, WarehouseError
from twotower_assets.warehouse.event_days import event_day_counts_query
from twotower_assets.warehouse.queries import events_in_window_count
from twotower_assets.warehouse.sql import split_queries


class SplitConfig(FeatureConfigChoice):
    train_set_size: float = Field(
        default=0.95, gt=0.0, lt=1.0, description="Share of each user's events that go to training."
    )
    event_day_number: int = Field(
        default=EVENT_WINDOW_DAYS, gt=0, description="Days of events before the training date."
    )
    # config_name / config_path (lib/feature_choice.py): the feature config whose history features
    # the split computes from the click events; give tf_datasets the same one.


class MissingEventDaysError(ValueError):
    """Event days of a training date's window that have neither rows nor a materialisation."""


def missing_event_days(
    context: dg.AssetExecutionContext, warehouse: WarehouseResource, source: str, window: list[dt.date]
) -> list[dt.date]:
    """Days of ``window`` that have no events in ``source`` and no materialisation of
    ``click_events`` either (a materialised day may hold no events: MovieLens has such days).
    Days before the first partition are not checked: the partitions start at the first day
    with data (``TWOTOWER_PARTITIONS_START``), and such days cannot be materialised."""
    counts = warehouse.query(
        event_day_counts_query(warehouse.dialect, source), {"first_day": window[0], "last_day": window[-1]}
    )
    with_rows = set(counts["event_date"].to_pylist())
    materialised = context.instance.get_materialized_partitions(dg.AssetKey(layout.CLICK_EVENTS))
    first_day = dt.date.fromisoformat(PARTITIONS_START)
    return [d for d in window if d >= first_day and d not in with_rows and d.isoformat() not in materialised]


def split_specs() -> list[dg.AssetSpec]:
    """One spec per split table (a function: the defs loader would collect a module-level list)."""
    return [
        dg.AssetSpec(
            key=table,
            deps=[dg.AssetDep(layout.CLICK_EVENTS, partition_mapping=EVENT_WINDOW_MAPPING)],
            group_name="splits",
            kinds={settings.warehouse_kind()},
            description=f"The {split} split of the click events for one training date.",
            automation_condition=TRAINING_DATA_CONDITION,
            freshness_policy=RETRAIN_FRESHNESS,
            code_version="1",
        )
        for split, table in layout.SPLIT_TABLES.items()
    ]


@dg.multi_asset(
    specs=split_specs(), partitions_def=training_date_partitions, can_subset=False, retry_policy=WAREHOUSE_RETRY_POLICY
)
@retry_transient_errors_only
def split_tables(
    context: dg.AssetExecutionContext, config: SplitConfig, warehouse: WarehouseResource
):
    train_date = training_date(context)
    start_date = train_date - dt.timedelta(days=config.event_day_number)
    source = warehouse.table_name(layout.CLICK_EVENTS)
    if not warehouse.table_exists(source):
        raise WarehouseError(f"source table {source} does not exist; materialise click_events first")
    missing = missing_event_days(context, warehouse, source, day_range(start_date, train_date - dt.timedelta(days=1)))
    if missing:
        # Checked before writing, like the empty window below: the previous split stays.
        raise MissingEventDaysError(
            f"training date {train_date} reads the click events of {start_date}..{train_date - dt.timedelta(days=1)} "
            f"(event_day_number={config.event_day_number}); {len(missing)} event days are missing: "
            f"{describe_days(missing)}. Backfill them first (docs/operations.md, 'Backfilling events'; an "
            f"external table must be loaded by its owner): "
            f"dagster asset materialize -m twotower_assets.definitions --select {layout.CLICK_EVENTS} "
            f"--partition-range {min(missing)}...{max(missing)} -c <run config>"
        )
    columns = warehouse.table_schema(source).names
    # History features are computed here, from the window's click events, never read from the source.
    history = {name: spec.history_length for name, spec in config.feature_config().history_features.items()}
    params = {"start_date": start_date, "train_date": train_date}
    count = warehouse.query(events_in_window_count(warehouse.dialect, source), params)["n"][0].as_py()
    if count == 0:
        # Checked before writing: an empty window must not wipe the previous split.
        raise EmptyTableError(
            f"{source} has no events in [{start_date}, {train_date}): nothing to split for "
            f"training date {train_date} (event_day_number={config.event_day_number})"
        )
    queries = split_queries(warehouse.dialect, source, columns, history)
    counts = warehouse.replace_partition_from_queries(
        {warehouse.table_name(layout.SPLIT_TABLES[split]): sql for split, sql in queries.items()},
        layout.PARTITION_COLUMN,
        train_date,
        {**params, "train_set_size": config.train_set_size},
    )
    context.log.info(f"Split {count} events from {start_date} to {train_date}: {counts}")
    for split, table in layout.SPLIT_TABLES.items():
        qualified = warehouse.table_name(table)
        yield dg.MaterializeResult(
            asset_key=table,
            metadata={
                **table_metadata(qualified, warehouse.table_schema(qualified), counts[qualified]),
                "source_events": count,
                "window_start": start_date.isoformat(),
                "window_end_exclusive": train_date.isoformat(),
                "train_set_size": config.train_set_size,
            },
        )
