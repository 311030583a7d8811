"""The DuckDB warehouse: atomic writes, partition replacement, latest view."""

import datetime as dt

import pyarrow as pa
import pytest

from twotower_assets.warehouse.base import WarehouseError
from twotower_assets.warehouse.duckdb import DuckDBWarehouse

DAY1, DAY2 = dt.date(2026, 6, 1), dt.date(2026, 6, 8)


def rows(day, ids):
    return pa.table({"train_date": pa.array([day] * len(ids), pa.date32()), "item_id": ids,
                     "item_embedding": pa.array([[float(i)] * 2 for i in range(len(ids))], pa.list_(pa.float64()))})


@pytest.fixture
def warehouse(tmp_path):
    return DuckDBWarehouse(path=str(tmp_path / "w.duckdb"))


def test_replace_partition_creates_replaces_and_leaves_others(warehouse):
    assert warehouse.replace_partition("history", "train_date", DAY1, rows(DAY1, ["a", "b"])) == 2
    assert warehouse.replace_partition("history", "train_date", DAY2, rows(DAY2, ["a"])) == 1
    assert warehouse.replace_partition("history", "train_date", DAY1, rows(DAY1, ["c", "d", "e"])) == 3
    assert warehouse.partition_row_counts("history", "train_date") == {DAY1: 3, DAY2: 1}
    assert warehouse.table_schema("history").field("item_embedding").type == pa.list_(pa.float64())


def test_interrupted_partition_write_keeps_the_old_partition(warehouse):
    warehouse.replace_partition("history", "train_date", DAY1, rows(DAY1, ["a", "b"]))
    good = rows(DAY1, ["x", "y", "z"])

    def dying_stream():
        yield good.to_batches()[0].slice(0, 1)
        raise ConnectionError("stream cut")

    with pytest.raises(Exception, match="stream cut"):
        warehouse.replace_partition("history", "train_date", DAY1, dying_stream(), schema=good.schema)
    assert warehouse.query("SELECT item_id FROM history ORDER BY item_id")["item_id"].to_pylist() == ["a", "b"]


def test_write_table_failure_keeps_the_old_table(warehouse):
    warehouse.write_table("events", pa.table({"x": [1, 2, 3]}))

    def dying_stream():
        yield pa.record_batch({"x": [9]})
        raise ConnectionError("stream cut")

    with pytest.raises(Exception, match="stream cut"):
        warehouse.write_table("events", dying_stream(), schema=pa.schema([("x", pa.int64())]))
    assert warehouse.query("SELECT x FROM events ORDER BY x")["x"].to_pylist() == [1, 2, 3]


def test_latest_view_shows_only_the_newest_partition(warehouse):
    warehouse.replace_partition("history", "train_date", DAY1, rows(DAY1, ["a", "b"]))
    warehouse.replace_partition("history", "train_date", DAY2, rows(DAY2, ["c"]))
    warehouse.create_latest_view("history_latest", "history", "train_date")
    assert warehouse.query("SELECT item_id FROM history_latest")["item_id"].to_pylist() == ["c"]


def test_query_values_are_parameters_not_sql(warehouse):
    warehouse.write_table("events", pa.table({"name": ["o'brien", "x"]}))
    result = warehouse.query("SELECT COUNT(*) AS n FROM events WHERE name = $name", {"name": "o'brien"})
    assert result["n"].to_pylist() == [1]


def test_missing_table_is_a_clear_error(warehouse):
    with pytest.raises(WarehouseError, match="does not exist"):
        warehouse.table_schema("nope")


def test_streamed_batches_cover_the_table(warehouse):
    warehouse.write_table("events", pa.table({"x": list(range(1000))}))
    batches = list(warehouse.query_batches("SELECT x FROM events", batch_size=256))
    assert sum(b.num_rows for b in batches) == 1000 and len(batches) >= 4
