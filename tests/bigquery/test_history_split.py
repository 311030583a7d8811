"""History features in BigQuery's SQL, run on the emulator: the same as DuckDB's."""

import datetime as dt

import pyarrow as pa

from twotower_assets.data.synthetic import CLICK_EVENT_SCHEMA, SyntheticSpec, generate_click_events
from twotower_assets.lib import layout
from twotower_assets.warehouse.bigquery import BigQueryWarehouse
from twotower_assets.warehouse.duckdb import DuckDBWarehouse
from twotower_assets.warehouse.sql import latest_row_per_query, split_queries

TRAIN_DATE = dt.date(2026, 6, 1)
PARAMS = {"start_date": TRAIN_DATE - dt.timedelta(days=20), "train_date": TRAIN_DATE, "train_set_size": 0.8}
HISTORY = {"user_recent_items": 5, "user_last_item": 1}
KEYS = ("user_id", "item_id", "event_date", "event_hour")


def events() -> pa.Table:
    spec = SyntheticSpec(end_date=TRAIN_DATE - dt.timedelta(days=1), num_users=40, num_items=40,
                         num_events=800, days=25, seed=11)
    return pa.concat_tables(generate_click_events(spec)).select(["event_date", "user_id", "item_id", "event_hour",
                                                                 "user_age"])


def run_split(warehouse, table: pa.Table) -> dict[str, list[dict]]:
    source = warehouse.table_name(layout.CLICK_EVENTS)
    warehouse.write_table(source, table)
    queries = split_queries(warehouse.dialect, source, table.column_names, HISTORY)
    warehouse.replace_partition_from_queries(
        {warehouse.table_name(layout.SPLIT_TABLES[split]): sql for split, sql in queries.items()},
        layout.PARTITION_COLUMN, TRAIN_DATE, PARAMS,
    )
    rows = {}
    for split, name in layout.SPLIT_TABLES.items():
        result = warehouse.query(f"SELECT * FROM {warehouse.dialect.table(warehouse.table_name(name))}")
        rows[split] = sorted(result.to_pylist(), key=lambda r: tuple(r[k] for k in KEYS) + (r["user_recent_items"],))
    return rows


def test_bigquery_history_split_and_user_rows_are_duckdbs(bq_warehouse: BigQueryWarehouse, tmp_path):
    table = events()
    duckdb = DuckDBWarehouse(path=str(tmp_path / "h.duckdb"))
    bq_rows, duck_rows = run_split(bq_warehouse, table), run_split(duckdb, table)
    assert bq_rows == duck_rows
    assert sum(1 for r in duck_rows["training"] if len(r["user_recent_items"].split()) == 5) > 100

    users = {}
    for warehouse in (bq_warehouse, duckdb):
        training = warehouse.table_name(layout.TRAINING_EVENTS)
        sql = latest_row_per_query(warehouse.dialect, training, "user_id", ["user_age", *HISTORY], HISTORY)
        users[warehouse.dialect.name] = warehouse.query(sql, {"train_date": TRAIN_DATE}).to_pylist()
    assert users["bigquery"] == users["duckdb"]
    assert all(len(u["user_recent_items"].split()) >= 1 for u in users["duckdb"])
