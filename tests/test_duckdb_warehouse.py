"""The DuckDB warehouse: atomic writes, partition replacement, latest view."""

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pytest

from twotower_assets.warehouse.duckdb import DuckDBWarehouse
from twotower_assets.warehouse.errors import WarehouseError
from twotower_assets.warehouse.sql import DUCKDB

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


DAY3 = dt.date(2026, 6, 15)


def _stream(*tables):
    return (batch for table in tables for batch in table.to_batches())


def test_replace_partitions_writes_listed_days_in_one_go_and_keeps_the_rest(warehouse):
    warehouse.replace_partition("history", "train_date", DAY1, rows(DAY1, ["a", "b"]))
    warehouse.replace_partition("history", "train_date", DAY2, rows(DAY2, ["c"]))
    new = [rows(DAY2, ["x", "y", "z"]), rows(DAY3, ["w"])]
    # DAY1 is not listed: kept; DAY2 replaced; DAY3 new; a listed day with no rows is emptied.
    counts = warehouse.replace_partitions("history", "train_date", [DAY2, DAY3], _stream(*new), schema=new[0].schema)
    assert counts == {DAY2: 3, DAY3: 1}
    assert warehouse.partition_row_counts("history", "train_date") == {DAY1: 2, DAY2: 3, DAY3: 1}
    emptied = warehouse.replace_partitions("history", "train_date", [DAY3], _stream(rows(DAY3, [])), schema=new[0].schema)
    assert emptied == {DAY3: 0}
    assert warehouse.partition_row_counts("history", "train_date") == {DAY1: 2, DAY2: 3}


def test_replace_partitions_refuses_a_row_of_an_unlisted_day_and_writes_nothing(warehouse):
    warehouse.replace_partition("history", "train_date", DAY1, rows(DAY1, ["a", "b"]))
    stray = [rows(DAY2, ["x"]), rows(DAY1, ["overwritten?"])]
    with pytest.raises(WarehouseError, match="train_date = 2026-06-01, which is not one of the partitions"):
        warehouse.replace_partitions("history", "train_date", [DAY2], _stream(*stray), schema=stray[0].schema)
    assert warehouse.query("SELECT item_id FROM history ORDER BY item_id")["item_id"].to_pylist() == ["a", "b"]


def _staging_files(warehouse):
    return sorted(p.name for p in Path(warehouse.path).parent.iterdir() if p.suffix == ".parquet")


def test_multi_day_write_leaves_no_staging_file_whether_it_succeeds_or_fails(warehouse):
    """The days are staged in a Parquet file beside the database (DuckDB keeps an Arrow
    stream's buffers alive until the transaction commits: 10M events took 5 GB); the file
    goes away after the write, and after a refused or interrupted one."""
    good = [rows(DAY2, ["x"]), rows(DAY3, ["y", "z"])]
    assert warehouse.replace_partitions("history", "train_date", [DAY2, DAY3], _stream(*good), schema=good[0].schema) == {DAY2: 1, DAY3: 2}
    assert _staging_files(warehouse) == []
    with pytest.raises(WarehouseError, match="not one of the partitions"):
        warehouse.replace_partitions("history", "train_date", [DAY2], _stream(rows(DAY1, ["q"])), schema=good[0].schema)
    assert _staging_files(warehouse) == []
    assert warehouse.partition_row_counts("history", "train_date") == {DAY2: 1, DAY3: 2}


def test_interrupted_multi_day_write_keeps_every_old_day(warehouse):
    warehouse.replace_partition("history", "train_date", DAY1, rows(DAY1, ["a", "b"]))
    warehouse.replace_partition("history", "train_date", DAY2, rows(DAY2, ["c"]))

    def dying_stream():
        yield rows(DAY1, ["x"]).to_batches()[0]
        raise ConnectionError("stream cut")

    with pytest.raises(Exception, match="stream cut"):
        warehouse.replace_partitions("history", "train_date", [DAY1, DAY2], dying_stream(), schema=rows(DAY1, ["q"]).schema)
    assert warehouse.partition_row_counts("history", "train_date") == {DAY1: 2, DAY2: 1}


def test_write_table_failure_keeps_the_old_table(warehouse):
    warehouse.write_table("events", pa.table({"x": [1, 2, 3]}))

    def dying_stream():
        yield pa.record_batch({"x": [9]})
        raise ConnectionError("stream cut")

    with pytest.raises(Exception, match="stream cut"):
        warehouse.write_table("events", dying_stream(), schema=pa.schema([("x", pa.int64())]))
    assert warehouse.query("SELECT x FROM events ORDER BY x")["x"].to_pylist() == [1, 2, 3]


RUN_1, RUN_2 = "a" * 32, "b" * 32


def run_rows(day, ids, run_id):
    return rows(day, ids).append_column("mlflow_run_id", pa.array([run_id] * len(ids), pa.string()))


def test_the_latest_table_is_a_copy_of_one_runs_partition_that_a_rewrite_leaves_alone(warehouse):
    """The champion's run, not the newest date: a rollback copies an older partition, and a
    rewrite of the champion's date by another run does not reach the copy."""
    warehouse.replace_partition("history", "train_date", DAY1, run_rows(DAY1, ["a", "b"], RUN_1))
    warehouse.replace_partition("history", "train_date", DAY2, run_rows(DAY2, ["c"], RUN_2))
    assert warehouse.write_run_snapshot("history_latest", "history", "train_date", DAY1, "mlflow_run_id", RUN_1) == 2
    assert sorted(warehouse.query("SELECT item_id FROM history_latest")["item_id"].to_pylist()) == ["a", "b"]
    assert warehouse.run_rows("history", "train_date", DAY1, "mlflow_run_id", RUN_1) == 2
    warehouse.replace_partition("history", "train_date", DAY1, run_rows(DAY1, ["z"], RUN_2))  # a retrain of DAY1
    assert warehouse.run_rows("history", "train_date", DAY1, "mlflow_run_id", RUN_1) == 0
    assert sorted(warehouse.query("SELECT item_id FROM history_latest")["item_id"].to_pylist()) == ["a", "b"]
    assert warehouse.write_run_snapshot("history_latest", "history", "train_date", DAY2, "mlflow_run_id", RUN_2) == 1
    assert warehouse.query("SELECT item_id FROM history_latest")["item_id"].to_pylist() == ["c"]
    with pytest.raises(TypeError, match="datetime.date"):
        warehouse.write_run_snapshot("history_latest", "history", "train_date", "2026-01-01' OR 1=1 --",
                                     "mlflow_run_id", RUN_1)
    with pytest.raises(ValueError, match="not an MLflow run id"):
        warehouse.write_run_snapshot("history_latest", "history", "train_date", DAY1, "mlflow_run_id", "x' OR 1=1 --")


def test_a_latest_view_of_an_older_install_becomes_a_table(warehouse):
    warehouse.replace_partition("history", "train_date", DAY1, run_rows(DAY1, ["a"], RUN_1))
    warehouse.execute('CREATE VIEW history_latest AS SELECT * FROM history')
    assert warehouse.write_run_snapshot("history_latest", "history", "train_date", DAY1, "mlflow_run_id", RUN_1) == 1
    kinds = warehouse.query("SELECT table_type FROM information_schema.tables WHERE table_name = 'history_latest'")
    assert kinds["table_type"].to_pylist() == ["BASE TABLE"]


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


def test_the_dialect_finds_nan_and_infinite_floats(warehouse):
    warehouse.write_table("floats", pa.table({"x": [1.0, float("nan"), float("inf"), float("-inf"), None]}))
    result = warehouse.query(f"SELECT x, {DUCKDB.non_finite('x')} AS bad FROM floats")
    assert result["bad"].to_pylist() == [False, True, True, True, None]


def test_a_lock_held_by_another_process_counts_as_transient(tmp_path):
    """DuckDB's lock error comes from its C module ``_duckdb``; the step retry must see it as transient."""
    import subprocess
    import sys

    import duckdb

    from twotower_assets.warehouse.errors import is_transient_warehouse_error

    path = tmp_path / "locked.duckdb"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import duckdb, sys, time; c = duckdb.connect({str(path)!r}); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(duckdb.Error) as caught:
            duckdb.connect(str(path))
        assert "lock" in str(caught.value).lower()
        assert is_transient_warehouse_error(caught.value)
        assert not is_transient_warehouse_error(duckdb.CatalogException("Table x does not exist"))
    finally:
        holder.kill()
        holder.wait()
