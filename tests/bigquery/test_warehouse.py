"""BigQueryWarehouse against bqemulator: loads, reads, partitioned tables, views, faults.

Everything goes through the real google-cloud-bigquery client to a real emulator process;
table metadata (schema, partitioning, expiration) is read back through the client.
"""

import datetime as dt
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pytest
from google.cloud import bigquery

from helpers.processes import sigkill_once_started
from twotower_assets.data.synthetic import CLICK_EVENT_SCHEMA, SyntheticSpec, generate_click_events
from twotower_assets.defs.publishing.embeddings import history_rows, history_schema
from twotower_assets.warehouse.bigquery import BigQueryWarehouse, normalise_endpoint
from twotower_assets.warehouse.bigquery_types import arrow_schema, bigquery_schema, date_literal
from twotower_assets.warehouse.errors import WarehouseError

from .emulator import PROJECT

JUNE_1, JUNE_8 = dt.date(2026, 6, 1), dt.date(2026, 6, 8)
SUMMARY = {"mlflow_run_id": "run-1", "mlflow_experiment_name": "exp", "mlflow_run_name": "tiny"}


def item_rows(train_date: dt.date, count: int, offset: float = 0.0, run_id: str = "run-1") -> pa.Table:
    ids = np.array([f"i{n}" for n in range(count)])
    vectors = np.arange(count * 4, dtype=np.float64).reshape(count, 4) + offset
    return history_rows("item", train_date, {**SUMMARY, "mlflow_run_id": run_id}, ids, vectors)


def sorted_rows(table: pa.Table, *keys: str) -> list[dict]:
    return table.sort_by([(k, "ascending") for k in keys]).to_pylist()


def staging_tables(client: bigquery.Client, dataset: str) -> list[str]:
    return [t.table_id for t in client.list_tables(dataset) if t.table_id.startswith("_staging_")]


def test_schema_conversion_round_trips_the_pipeline_schemas():
    for schema in (CLICK_EVENT_SCHEMA, history_schema("user"), history_schema("item")):
        assert arrow_schema(bigquery_schema(schema)) == schema
    fields = bigquery_schema(history_schema("item"))
    assert [(f.name, f.field_type, f.mode) for f in fields][-1] == ("item_embedding", "FLOAT64", "REPEATED")
    with pytest.raises(WarehouseError, match="no BigQuery column type"):
        bigquery_schema(pa.schema([("bad", pa.struct([("x", pa.int64())]))]))


def test_emulator_endpoint_and_literals():
    assert normalise_endpoint("127.0.0.1:9050") == "http://127.0.0.1:9050"
    assert normalise_endpoint("http://localhost:9050/") == "http://localhost:9050"
    assert date_literal(JUNE_1) == "DATE '2026-06-01'"
    with pytest.raises(WarehouseError):
        date_literal("2026-06-01'; DROP TABLE x; --")


def test_table_names_are_qualified_and_click_events_can_be_external(bq_warehouse):
    assert bq_warehouse.table_name("training_events") == f"{PROJECT}.{bq_warehouse.dataset}.training_events"
    assert bq_warehouse.table_name("p.d.t") == "p.d.t"
    external = bq_warehouse.model_copy(update={"external_tables": {"click_events": "prod-project.raw_prod.click_events"}})
    assert external.table_name("click_events") == "prod-project.raw_prod.click_events"
    with pytest.raises(ValueError, match="not a plain"):
        bq_warehouse.table_name("x`; DROP TABLE y")


def test_write_table_loads_arrow_and_rewrites_without_duplicates(bq_warehouse, bq_client):
    spec = SyntheticSpec(end_date=JUNE_1, num_users=30, num_items=40, num_events=400, days=5, seed=3)
    source = pa.concat_tables(generate_click_events(spec))
    name = bq_warehouse.table_name("click_events")

    for _ in range(2):  # the second write replaces the first
        written = bq_warehouse.write_table(name, (b for b in source.to_batches(max_chunksize=100)), CLICK_EVENT_SCHEMA)
        assert written == source.num_rows

    assert bq_warehouse.table_schema(name) == CLICK_EVENT_SCHEMA
    assert bq_client.get_table(name).num_rows == source.num_rows
    back = bq_warehouse.query(f"SELECT * FROM `{name}`")
    keys = ("event_date", "user_id", "item_id", "event_hour")
    assert sorted_rows(back, *keys) == sorted_rows(source, *keys)


def test_queries_bind_typed_parameters_and_stream_batches(bq_warehouse):
    name = bq_warehouse.table_name("two_tower_item_embedding_history")
    bq_warehouse.replace_partition(name, "train_date", JUNE_1, item_rows(JUNE_1, 50))
    sql = (
        f"SELECT item_id, item_embedding FROM `{name}` WHERE train_date = @day "
        "AND item_embedding[OFFSET(0)] >= @low AND mlflow_run_id = @run AND @limit > 0 ORDER BY item_id"
    )
    params = {"day": JUNE_1, "low": 40.0, "run": "run-1", "limit": np.int64(3)}
    table = bq_warehouse.query(sql, params)
    assert table.num_rows == 40  # rows 10..49 have a first component >= 40
    assert table.schema.field("item_embedding").type == pa.list_(pa.float64())

    batches = list(bq_warehouse.query_batches(sql, params, batch_size=16))
    assert all(isinstance(b, pa.RecordBatch) for b in batches)
    assert len(batches) >= 3  # pages of 16 rows, never one row at a time
    assert pa.Table.from_batches(batches).to_pylist() == table.to_pylist()


def test_history_table_has_exact_schema_day_partitions_and_expiration(bq_warehouse, bq_client):
    name = bq_warehouse.table_name("two_tower_item_embedding_history")
    assert bq_warehouse.replace_partition(name, "train_date", JUNE_1, item_rows(JUNE_1, 5)) == 5

    table = bq_client.get_table(name)
    assert [(f.name, f.field_type, f.mode) for f in table.schema] == [
        ("train_date", "DATE", "NULLABLE"),
        ("mlflow_run_id", "STRING", "NULLABLE"),
        ("mlflow_experiment_name", "STRING", "NULLABLE"),
        ("mlflow_run_name", "STRING", "NULLABLE"),
        ("item_id", "STRING", "NULLABLE"),
        ("item_embedding", "FLOAT64", "REPEATED"),
    ]
    assert table.time_partitioning.type_ == bigquery.TimePartitioningType.DAY
    assert table.time_partitioning.field == "train_date"
    assert table.time_partitioning.expiration_ms == 183 * 86_400_000
    assert bq_warehouse.table_schema(name).names == history_schema("item").names
    assert staging_tables(bq_client, bq_warehouse.dataset) == []


def test_replace_partition_touches_one_partition_and_reruns_never_duplicate(bq_warehouse):
    name = bq_warehouse.table_name("two_tower_item_embedding_history")
    bq_warehouse.replace_partition(name, "train_date", JUNE_1, item_rows(JUNE_1, 5))
    bq_warehouse.replace_partition(name, "train_date", JUNE_8, item_rows(JUNE_8, 7))
    june_8 = bq_warehouse.query(f"SELECT * FROM `{name}` WHERE train_date = @d", {"d": JUNE_8})

    for _ in range(2):
        assert bq_warehouse.replace_partition(name, "train_date", JUNE_1, item_rows(JUNE_1, 3, 100.0, "run-2")) == 3

    assert bq_warehouse.partition_row_counts(name, "train_date") == {JUNE_1: 3, JUNE_8: 7}
    june_1 = bq_warehouse.query(f"SELECT DISTINCT mlflow_run_id FROM `{name}` WHERE train_date = @d", {"d": JUNE_1})
    assert june_1["mlflow_run_id"].to_pylist() == ["run-2"]
    after = bq_warehouse.query(f"SELECT * FROM `{name}` WHERE train_date = @d", {"d": JUNE_8})
    assert sorted_rows(after, "item_id") == sorted_rows(june_8, "item_id")


def test_replace_partitions_writes_each_listed_day_and_refuses_an_unlisted_one(bq_warehouse):
    name = bq_warehouse.table_name("two_tower_item_embedding_history")
    june_15 = JUNE_8 + dt.timedelta(days=7)
    bq_warehouse.replace_partition(name, "train_date", JUNE_1, item_rows(JUNE_1, 5))
    stream = [item_rows(JUNE_8, 2), item_rows(june_15, 4)]
    counts = bq_warehouse.replace_partitions(name, "train_date", [JUNE_8, june_15],
                                             (b for t in stream for b in t.to_batches()), schema=stream[0].schema)
    assert counts == {JUNE_8: 2, june_15: 4}
    with pytest.raises(WarehouseError, match="not one of the partitions being written"):
        bq_warehouse.replace_partitions(name, "train_date", [JUNE_8], item_rows(JUNE_1, 9))
    assert bq_warehouse.partition_row_counts(name, "train_date") == {JUNE_1: 5, JUNE_8: 2, june_15: 4}


def test_the_latest_table_is_a_copy_of_the_champion_runs_partition(bq_warehouse, bq_client):
    run_1, run_2 = "a" * 32, "b" * 32
    name = bq_warehouse.table_name("two_tower_item_embedding_history")
    latest_name = bq_warehouse.table_name("two_tower_item_embedding_latest")
    bq_warehouse.replace_partition(name, "train_date", JUNE_1, item_rows(JUNE_1, 5, run_id=run_1))
    assert bq_warehouse.write_run_snapshot(latest_name, name, "train_date", JUNE_1, "mlflow_run_id", run_1) == 5
    assert bq_client.get_table(latest_name).table_type == "TABLE"

    bq_warehouse.replace_partition(name, "train_date", JUNE_1, item_rows(JUNE_1, 7, run_id=run_2))  # a retrain
    assert bq_warehouse.run_rows(name, "train_date", JUNE_1, "mlflow_run_id", run_1) == 0
    latest = bq_warehouse.query(f"SELECT * FROM `{latest_name}`")
    assert latest.num_rows == 5 and set(latest["mlflow_run_id"].to_pylist()) == {run_1}
    assert bq_warehouse.write_run_snapshot(latest_name, name, "train_date", JUNE_1, "mlflow_run_id", run_2) == 7


def test_rows_of_another_partition_are_refused_and_nothing_changes(bq_warehouse, bq_client):
    name = bq_warehouse.table_name("two_tower_item_embedding_history")
    bq_warehouse.replace_partition(name, "train_date", JUNE_1, item_rows(JUNE_1, 5))
    with pytest.raises(WarehouseError, match="outside partition"):
        bq_warehouse.replace_partition(name, "train_date", JUNE_1, item_rows(JUNE_8, 2))
    assert bq_warehouse.partition_row_counts(name, "train_date") == {JUNE_1: 5}
    assert staging_tables(bq_client, bq_warehouse.dataset) == []


def test_a_table_with_other_columns_gets_a_clear_error(bq_warehouse):
    name = bq_warehouse.table_name("two_tower_item_embedding_history")
    bq_warehouse.replace_partition(name, "train_date", JUNE_1, item_rows(JUNE_1, 5))
    other = item_rows(JUNE_8, 2).drop_columns(["mlflow_run_name"])
    with pytest.raises(WarehouseError, match="has columns"):
        bq_warehouse.replace_partition(name, "train_date", JUNE_8, other)
    assert bq_warehouse.partition_row_counts(name, "train_date") == {JUNE_1: 5}


def test_fault_input_failing_midway_leaves_the_old_partition(bq_warehouse, bq_client):
    name = bq_warehouse.table_name("two_tower_item_embedding_history")
    bq_warehouse.replace_partition(name, "train_date", JUNE_1, item_rows(JUNE_1, 6))
    before = sorted_rows(bq_warehouse.query(f"SELECT * FROM `{name}`"), "item_id")

    def failing_batches():
        yield from item_rows(JUNE_1, 4, 50.0, "run-2").to_batches(max_chunksize=2)[:1]
        raise RuntimeError("upstream died midway")

    with pytest.raises(RuntimeError, match="midway"):
        bq_warehouse.replace_partition(name, "train_date", JUNE_1, failing_batches(), history_schema("item"))

    assert sorted_rows(bq_warehouse.query(f"SELECT * FROM `{name}`"), "item_id") == before
    assert staging_tables(bq_client, bq_warehouse.dataset) == []
    assert bq_warehouse.replace_partition(name, "train_date", JUNE_1, item_rows(JUNE_1, 4, 50.0, "run-2")) == 4


def test_fault_failure_inside_the_swap_transaction_rolls_back_every_table(bq_warehouse, bq_client):
    """The swap deletes and inserts table after table; a failure at the last statement
    (here: a staging table that vanished) must leave every table as it was."""
    first = bq_warehouse.table_name("two_tower_item_embedding_history")
    second = bq_warehouse.table_name("item_embedding_history_copy")
    for name in (first, second):
        bq_warehouse.replace_partition(name, "train_date", JUNE_1, item_rows(JUNE_1, 6))
    staging = f"{PROJECT}.{bq_warehouse.dataset}._staging_manual"
    bq_warehouse.execute(f"CREATE TABLE `{staging}` AS SELECT * FROM `{first}` WHERE item_id = 'i0'")
    columns = list(bq_client.get_table(first).schema)

    with pytest.raises(Exception, match="(?i)not found|does not exist"):
        bq_warehouse._swap_partitions(
            bq_client,
            {first: staging, second: f"{PROJECT}.{bq_warehouse.dataset}._staging_vanished"},
            {first: columns, second: columns},
            "train_date",
            date_literal(JUNE_1),
        )
    for name in (first, second):
        assert bq_warehouse.partition_row_counts(name, "train_date") == {JUNE_1: 6}


def test_fault_failing_select_leaves_split_tables_and_no_staging(bq_warehouse, bq_client):
    good, bad = bq_warehouse.table_name("split_a"), bq_warehouse.table_name("split_b")
    params = {"train_date": JUNE_1}
    assert bq_warehouse.replace_partition_from_queries(
        {good: "SELECT 'a' AS k", bad: "SELECT 'b' AS k"}, "train_date", JUNE_1, params
    ) == {good: 1, bad: 1}
    with pytest.raises(Exception, match="boom"):
        bq_warehouse.replace_partition_from_queries(
            {good: "SELECT 'a2' AS k UNION ALL SELECT 'a3'", bad: "SELECT ERROR('boom') AS k"},
            "train_date", JUNE_1, params,
        )
    assert bq_warehouse.query(f"SELECT k FROM `{good}`")["k"].to_pylist() == ["a"]
    assert bq_warehouse.query(f"SELECT k FROM `{bad}`")["k"].to_pylist() == ["b"]
    assert staging_tables(bq_client, bq_warehouse.dataset) == []


KILLED_WRITER = textwrap.dedent(
    """
    import datetime as dt, pathlib, sys, time
    import numpy as np
    from dagster_gcp import BigQueryResource
    from twotower_assets.defs.publishing.embeddings import history_rows, history_schema
    from twotower_assets.warehouse.bigquery import BigQueryWarehouse

    endpoint, project, dataset, marker = sys.argv[1:5]
    warehouse = BigQueryWarehouse(bigquery=BigQueryResource(project=project), dataset=dataset, endpoint=endpoint)
    day = dt.date(2026, 6, 1)
    rows = history_rows("item", day, {"mlflow_run_id": "killed", "mlflow_experiment_name": "e",
                                      "mlflow_run_name": "r"}, np.array(["k0", "k1"]), np.ones((2, 4)))

    def batches():
        yield rows.to_batches()[0]
        pathlib.Path(marker).write_text("writing")
        time.sleep(600)  # killed here, halfway through the write

    warehouse.replace_partition(warehouse.table_name("two_tower_item_embedding_history"), "train_date", day,
                                batches(), history_schema("item"))
    """
)


def test_fault_killed_writer_leaves_the_old_partition_and_a_rerun_succeeds(bq_warehouse, tmp_path):
    name = bq_warehouse.table_name("two_tower_item_embedding_history")
    bq_warehouse.replace_partition(name, "train_date", JUNE_1, item_rows(JUNE_1, 6))
    before = sorted_rows(bq_warehouse.query(f"SELECT * FROM `{name}`"), "item_id")
    marker = tmp_path / "writing"
    sigkill_once_started(
        [sys.executable, "-c", KILLED_WRITER, bq_warehouse.endpoint, PROJECT, bq_warehouse.dataset, str(marker)], marker
    )

    assert sorted_rows(bq_warehouse.query(f"SELECT * FROM `{name}`"), "item_id") == before
    assert bq_warehouse.replace_partition(name, "train_date", JUNE_1, item_rows(JUNE_1, 2, run_id="rerun")) == 2
    assert bq_warehouse.partition_row_counts(name, "train_date") == {JUNE_1: 2}


def test_missing_table_reads_give_clear_errors(bq_warehouse):
    name = bq_warehouse.table_name("no_such_table")
    assert not bq_warehouse.table_exists(name)
    with pytest.raises(WarehouseError, match="does not exist"):
        bq_warehouse.table_schema(name)


def test_from_env_reads_the_documented_variables(monkeypatch):
    monkeypatch.setenv("TWOTOWER_WAREHOUSE", "bigquery")
    monkeypatch.setenv("TWOTOWER_ENV", "stg")
    monkeypatch.setenv("TWOTOWER_BQ_PROJECT", "my-project")
    monkeypatch.setenv("TWOTOWER_BQ_CLICK_EVENTS_TABLE", "prod-project.raw_stg.click_events")
    monkeypatch.setenv("TWOTOWER_BQ_PARTITION_EXPIRATION_DAYS", "120")
    monkeypatch.delenv("TWOTOWER_BQ_DATASET", raising=False)
    monkeypatch.delenv("TWOTOWER_BQ_ENDPOINT", raising=False)
    monkeypatch.delenv("BIGQUERY_EMULATOR_HOST", raising=False)
    warehouse = BigQueryWarehouse.from_env()
    assert warehouse.bigquery.project == "my-project"
    assert warehouse.bigquery.location == "EU"
    assert warehouse.dataset == "ml_preproc_stg"
    assert warehouse.partition_expiration_days == 120
    assert warehouse.table_name("click_events") == "prod-project.raw_stg.click_events"
    assert warehouse.emulator_endpoint is None and warehouse.storage_read_enabled
    monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", "localhost:9050")
    assert warehouse.emulator_endpoint == "http://localhost:9050"
    assert not warehouse.storage_read_enabled and not warehouse.native_vector_search_enabled
    monkeypatch.setenv("TWOTOWER_ENV", "qa")
    with pytest.raises(ValueError, match="TWOTOWER_ENV"):
        BigQueryWarehouse.from_env()
