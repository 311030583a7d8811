"""The split tables' data checks.

They are *blocking*: in a run, a failed check stops everything downstream of its table, and
the automation conditions (``all_deps_blocking_checks_passed``) do not start it later either.

One SQL aggregate per table, run in the warehouse with the training date as a query
parameter: every split is non-empty and has no null ids; validation and test users and
items all occur in training; no (user, item) pair of training is in validation or test (the
split's rules: docs/decisions.md, "The split is SQL, the same on DuckDB and BigQuery").

The quality gate on the model is in ``defs/evaluation/quality_gate.py``.
"""


import datetime as dt
import warnings

import dagster as dg

from twotower_assets.lib import layout
from twotower_assets.lib.conditions import CHECK_CONDITION
from twotower_assets.lib.partitions import training_date_partitions
from twotower_assets.warehouse.base import WarehouseResource
from twotower_assets.warehouse.queries import held_out_stats_query, split_stats_query

# Partitioned checks (one result per training date) are a preview feature in Dagster 1.13;
# without them a backfill's dates would share one check status.
warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec", category=dg.PreviewWarning)

HELD_OUT = {"validation": layout.VALIDATION_EVENTS, "test": layout.TEST_EVENTS}

# --------------------------------------------------------------------------- split data checks

NON_EMPTY = "non_empty"
NO_NULL_IDS = "no_null_ids"
KNOWN_USERS_AND_ITEMS = "users_and_items_in_training"
NO_TRAINING_PAIRS = "no_training_pairs"


def _spec(table: str, name: str, description: str) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(
        name,
        asset=table,
        description=description,
        blocking=True,
        partitions_def=training_date_partitions,
        automation_condition=CHECK_CONDITION,
    )


SPLIT_CHECK_SPECS = [
    spec
    for table in layout.SPLIT_TABLES.values()
    for spec in (
        _spec(table, NON_EMPTY, "The split has rows for the training date."),
        _spec(table, NO_NULL_IDS, "No row has a null user_id or item_id."),
    )
] + [
    spec
    for table in HELD_OUT.values()
    for spec in (
        _spec(table, KNOWN_USERS_AND_ITEMS, "Every user and every item also occurs in training (same date)."),
        _spec(table, NO_TRAINING_PAIRS, "No (user_id, item_id) pair also occurs in training (same date)."),
    )
]


def split_table_stats(warehouse: WarehouseResource, train_date: dt.date) -> dict[str, dict[str, int]]:
    """Counts behind the split checks, per split table, computed in the warehouse."""
    params = {"train_date": train_date}
    training = warehouse.table_name(layout.TRAINING_EVENTS)
    stats: dict[str, dict[str, int]] = {}
    for table in layout.SPLIT_TABLES.values():
        sql = split_stats_query(warehouse.dialect, warehouse.table_name(table))
        row = warehouse.query(sql, params).to_pylist()[0]
        stats[table] = {name: int(value) for name, value in row.items()}
    for table in HELD_OUT.values():
        sql = held_out_stats_query(warehouse.dialect, warehouse.table_name(table), training)
        row = warehouse.query(sql, params).to_pylist()[0]
        stats[table].update({name: int(value) for name, value in row.items()})
    return stats


def _split_result(table: str, check: str, failures: int, failure: str, metadata: dict) -> dg.AssetCheckResult:
    """Passed when ``failures`` is 0; otherwise ``failure`` (with the count) is the description."""
    return dg.AssetCheckResult(
        asset_key=table,
        check_name=check,
        passed=failures == 0,
        description=None if failures == 0 else failure.format(count=failures, table=table),
        metadata=metadata,
    )


def split_check_results(stats: dict[str, dict[str, int]]) -> list[dg.AssetCheckResult]:
    """One result per check spec from the counts of :func:`split_table_stats`."""
    results = []
    for table, counts in stats.items():
        results.append(_split_result(
            table, NON_EMPTY, int(counts["row_count"] == 0), "{table} has no rows for this training date",
            {"dagster/row_count": counts["row_count"], "users": counts["users"], "items": counts["items"]},
        ))
        results.append(_split_result(
            table, NO_NULL_IDS, counts["null_user_ids"] + counts["null_item_ids"], "{count} null ids in {table}",
            {"null_user_ids": counts["null_user_ids"], "null_item_ids": counts["null_item_ids"]},
        ))
        if table not in HELD_OUT.values():
            continue
        results.append(_split_result(
            table, KNOWN_USERS_AND_ITEMS, counts["rows_with_unknown_user"] + counts["rows_with_unknown_item"],
            "{count} rows of {table} have a user or item missing from training",
            {"rows_with_unknown_user": counts["rows_with_unknown_user"],
             "rows_with_unknown_item": counts["rows_with_unknown_item"]},
        ))
        results.append(_split_result(
            table, NO_TRAINING_PAIRS, counts["rows_with_training_pair"],
            "{count} rows of {table} repeat a training (user, item) pair",
            {"rows_with_training_pair": counts["rows_with_training_pair"]},
        ))
    return results


@dg.multi_asset_check(specs=SPLIT_CHECK_SPECS, name="split_data_checks", description="Data checks of the three split layout.")
def split_data_checks(context: dg.AssetCheckExecutionContext, warehouse: WarehouseResource):
    train_date = dt.date.fromisoformat(context.partition_key)
    yield from split_check_results(split_table_stats(warehouse, train_date))
