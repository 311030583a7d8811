"""The training-input checks (twotower_assets/defs/validation.py) give the same answer on
BigQuery (the emulator) as on DuckDB: their SQL differs only in the NaN / infinity test."""

import datetime as dt

import pyarrow as pa
import pytest

from twotower_assets.lib import layout
from twotower_assets.defs.splits.input_validation import InputDataError, validate_training_input
from twotower_assets.model.features import load_feature_config
from twotower_assets.model.layers import TEXT_MAX_CHARS
from twotower_assets.warehouse.duckdb import DuckDBWarehouse

TRAIN_DATE = dt.date(2026, 6, 1)
CONFIG = load_feature_config("tiny-features")
N = 12


def split_table(**changes) -> pa.Table:
    """N clean rows of what tiny-features reads; ``changes`` replace whole columns."""
    columns = {
        "train_date": pa.array([TRAIN_DATE] * N, pa.date32()),
        "user_id": pa.array([f"u{i % 4}" for i in range(N)]),
        "item_id": pa.array([f"i{i % 5}" for i in range(N)]),
        "booking_cnt": pa.array(range(N), pa.int64()),
        "user_queries": pa.array(["some words"] * N),
        "offer_category_id": pa.array(["c1"] * N),
        "item_names": pa.array(["a name"] * (N - 1) + ["x" * (TEXT_MAX_CHARS + 1)]),
        "item_mean_stock_price": pa.array([1.5] * N, pa.float64()),
        "item_image_embedding": pa.array(["[" + ", ".join(["0.5"] * 16) + "]"] * N),
    }
    columns.update(changes)
    return pa.table(columns)


def outcome(warehouse, training: pa.Table) -> str:
    """The error message, or the counts, with the dataset prefix of table names removed."""
    warehouse.write_table(warehouse.table_name(layout.TRAINING_EVENTS), training)
    warehouse.write_table(warehouse.table_name(layout.VALIDATION_EVENTS), split_table())
    try:
        report = validate_training_input(warehouse, CONFIG, TRAIN_DATE)
        text = repr((report.rows, report.distinct_users, report.distinct_items, report.truncated_texts))
    except InputDataError as error:
        text = str(error)
    prefix = warehouse.table_name("x")[:-1]  # "project.dataset." on BigQuery
    return text.replace(prefix, "") if prefix else text


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({}, "({'training_events': 12, 'validation_events': 12}, 4, 5, {'training_events.item_names': 1, "
             "'validation_events.item_names': 1})"),
        ({"item_mean_stock_price": pa.array([float("nan"), float("inf"), float("-inf")] + [1.0] * (N - 3))},
         "training_events.item_mean_stock_price has 3 NaN or infinite values"),
        ({"user_id": pa.array([None, "", "  "] + ["u1", "u2"] * ((N - 3) // 2) + ["u3"])},
         "training_events.user_id has 3 null or empty values"),
        ({"item_id": pa.array(["only"] * N)}, "training_events has 1 distinct item_id"),
    ],
)
def test_the_checks_agree_on_bigquery_and_duckdb(bq_warehouse, tmp_path, changes, expected):
    training = split_table(**changes)
    on_duckdb = outcome(DuckDBWarehouse(path=str(tmp_path / "w.duckdb")), training)
    on_bigquery = outcome(bq_warehouse, training)
    assert expected in on_duckdb
    assert on_bigquery == on_duckdb
