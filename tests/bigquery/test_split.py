"""The training / validation / test split runs in BigQuery as SQL and matches DuckDB's."""

import datetime as dt

import pyarrow as pa
import pytest
from google.cloud import bigquery

from twotower_assets.data.synthetic import CLICK_EVENT_SCHEMA, SyntheticSpec, generate_click_events
from twotower_assets.lib import layout
from twotower_assets.warehouse.bigquery import BigQueryWarehouse
from twotower_assets.warehouse.duckdb import DuckDBWarehouse
from twotower_assets.warehouse.sql import BIGQUERY, split_queries

TRAIN_DATE = dt.date(2026, 6, 1)
PARAMS = {"start_date": TRAIN_DATE - dt.timedelta(days=20), "train_date": TRAIN_DATE, "train_set_size": 0.8}
KEYS = ("user_id", "item_id", "event_date", "event_hour")


@pytest.fixture(scope="module")
def events() -> pa.Table:
    spec = SyntheticSpec(end_date=TRAIN_DATE - dt.timedelta(days=1), num_users=120, num_items=60,
                         num_events=3000, days=25, seed=11)
    return pa.concat_tables(generate_click_events(spec))


def run_split(warehouse, events: pa.Table) -> dict[str, int]:
    source = warehouse.table_name(layout.CLICK_EVENTS)
    warehouse.write_table(source, events, CLICK_EVENT_SCHEMA)
    queries = split_queries(warehouse.dialect, source, CLICK_EVENT_SCHEMA.names)
    return warehouse.replace_partition_from_queries(
        {warehouse.table_name(layout.SPLIT_TABLES[split]): sql for split, sql in queries.items()},
        layout.PARTITION_COLUMN,
        TRAIN_DATE,
        PARAMS,
    )


def split_rows(warehouse, split: str) -> list[dict]:
    table = warehouse.query(f"SELECT * FROM {warehouse.dialect.table(warehouse.table_name(layout.SPLIT_TABLES[split]))}")
    return table.sort_by([(k, "ascending") for k in KEYS]).to_pylist()


def test_bigquery_split_sql_is_the_duckdb_split(bq_warehouse: BigQueryWarehouse, bq_client, events, tmp_path):
    duckdb = DuckDBWarehouse(path=str(tmp_path / "split.duckdb"))
    bq_counts = run_split(bq_warehouse, events)
    duck_counts = run_split(duckdb, events)

    assert list(bq_counts.values()) == list(duck_counts.values())
    assert all(count > 0 for count in bq_counts.values())
    for split in layout.SPLIT_TABLES:
        assert split_rows(bq_warehouse, split) == split_rows(duckdb, split), split

    for split, name in layout.SPLIT_TABLES.items():
        table = bq_client.get_table(bq_warehouse.table_name(name))
        assert table.time_partitioning.type_ == bigquery.TimePartitioningType.DAY
        assert table.time_partitioning.field == "train_date"
        assert table.time_partitioning.expiration_ms == 183 * 86_400_000
        assert [f.name for f in table.schema] == ["train_date", *CLICK_EVENT_SCHEMA.names]


def test_rerunning_the_split_replaces_the_partition(bq_warehouse: BigQueryWarehouse, events):
    first = run_split(bq_warehouse, events)
    second = run_split(bq_warehouse, events)
    assert first == second
    for split, name in layout.SPLIT_TABLES.items():
        counts = bq_warehouse.partition_row_counts(bq_warehouse.table_name(name), "train_date")
        assert counts == {TRAIN_DATE: first[bq_warehouse.table_name(name)]}


def test_split_sql_uses_only_query_parameters_for_values():
    queries = split_queries(BIGQUERY, "p.d.click_events", CLICK_EVENT_SCHEMA.names)
    for sql in queries.values():
        assert "@start_date" in sql and "@train_date" in sql and "@train_set_size" in sql
        assert "2026" not in sql
