"""The whole asset graph on the BigQuery warehouse (bqemulator), in process, with tiny data."""

import datetime as dt
import importlib
import uuid

import dagster as dg
import pyarrow as pa
import pytest
from dagster._core.definitions.observe import observe  # what the UI's 'Observe' runs; not exported
from google.cloud import bigquery

from helpers.graph import TINY_PARTITION, failure_text, make_resources, materialize_all, tiny_run_config
from twotower_assets.data.synthetic import CLICK_EVENT_SCHEMA, SyntheticSpec, generate_click_events
from twotower_assets.lib import layout
from twotower_assets.defs.resources import default_warehouse
from twotower_assets.defs.splits.assets import split_tables
from twotower_assets.lib.layout import SIMILAR_ITEMS

from .emulator import emulator_warehouse

TRAIN_DATE = dt.date.fromisoformat(TINY_PARTITION)
REPUBLISHED = [
    *layout.SPLIT_TABLES.values(),
    layout.USER_EMBEDDING_HISTORY,
    layout.ITEM_EMBEDDING_HISTORY,
    SIMILAR_ITEMS,
]


def partition_counts(warehouse, names) -> dict[str, dict]:
    return {name: warehouse.partition_row_counts(warehouse.table_name(name), "train_date") for name in names}


@pytest.mark.slow
def test_the_whole_graph_materialises_on_bigquery_and_reruns_replace_partitions(bq_emulator, tmp_path):
    resources = make_resources(tmp_path / "home")
    warehouse = emulator_warehouse(bq_emulator)
    resources["warehouse"] = warehouse

    result = materialize_all(resources)

    assert result.success
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert {layout.CLICK_EVENTS, *REPUBLISHED, "tf_datasets", "two_tower_model", "match_model"} <= materialized
    with warehouse.client() as client:
        for entity, table_name, view_name in (
            ("user", layout.USER_EMBEDDING_HISTORY, layout.USER_EMBEDDING_LATEST),
            ("item", layout.ITEM_EMBEDDING_HISTORY, layout.ITEM_EMBEDDING_LATEST),
        ):
            table = client.get_table(warehouse.table_name(table_name))
            assert [(f.name, f.field_type, f.mode) for f in table.schema] == [
                ("train_date", "DATE", "NULLABLE"),
                ("mlflow_run_id", "STRING", "NULLABLE"),
                ("mlflow_experiment_name", "STRING", "NULLABLE"),
                ("mlflow_run_name", "STRING", "NULLABLE"),
                (f"{entity}_id", "STRING", "NULLABLE"),
                (f"{entity}_embedding", "FLOAT64", "REPEATED"),
            ]
            assert table.time_partitioning.type_ == bigquery.TimePartitioningType.DAY
            assert table.time_partitioning.field == "train_date"
            assert table.time_partitioning.expiration_ms == 183 * 86_400_000
            assert client.get_table(warehouse.table_name(view_name)).table_type == "TABLE"  # the champion run's rows, copied
            latest = warehouse.query(f"SELECT train_date, {entity}_embedding FROM `{warehouse.table_name(view_name)}`")
            assert latest.num_rows > 0 and set(latest["train_date"].to_pylist()) == {TRAIN_DATE}
            assert set(pa.compute.list_value_length(latest[f"{entity}_embedding"]).to_pylist()) == {8}
        # The events: one DAY partition per event day, the training window of the tiny config.
        events = client.get_table(warehouse.table_name(layout.CLICK_EVENTS))
        assert events.time_partitioning.field == "event_date"
        days = warehouse.partition_row_counts(warehouse.table_name(layout.CLICK_EVENTS), "event_date")
        assert sorted(days) == [TRAIN_DATE - dt.timedelta(days=d) for d in range(30, 0, -1)]

    before = partition_counts(warehouse, REPUBLISHED)
    top_k = tiny_run_config()["ops"].get(SIMILAR_ITEMS, {}).get("config", {}).get("top_k", 50)
    items = before[layout.ITEM_EMBEDDING_HISTORY][TRAIN_DATE]
    assert before[SIMILAR_ITEMS][TRAIN_DATE] == items * min(top_k, items - 1)

    rerun = dg.materialize(
        _all_assets(),
        selection=REPUBLISHED,
        resources=resources,
        partition_key=TINY_PARTITION,
        run_config={"ops": {"split_tables": tiny_run_config()["ops"]["split_tables"]}},
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert rerun.success
    assert partition_counts(warehouse, REPUBLISHED) == before  # replaced, never duplicated


def _all_assets():
    from twotower_assets.definitions import ALL_ASSETS

    return ALL_ASSETS


def test_production_click_events_are_an_external_input_of_the_split(bq_emulator, monkeypatch):
    raw = emulator_warehouse(bq_emulator, dataset=f"raw_{uuid.uuid4().hex[:8]}")
    source = raw.table_name("click_events")
    # 30 days, the window of the run config below, but for two days that have not landed yet.
    spec = SyntheticSpec(end_date=TRAIN_DATE - dt.timedelta(days=1), num_users=60, num_items=40,
                         num_events=1200, days=30, seed=5)
    late = {TRAIN_DATE - dt.timedelta(days=1), TRAIN_DATE - dt.timedelta(days=2)}
    days = [d for d in generate_click_events(spec) if d["event_date"][0].as_py() not in late]
    raw.write_table(source, pa.concat_tables(days), CLICK_EVENT_SCHEMA)

    definitions = importlib.import_module("twotower_assets.definitions")
    with monkeypatch.context() as env:
        env.setenv("TWOTOWER_WAREHOUSE", "bigquery")
        env.setenv("TWOTOWER_BQ_PROJECT", "twotower-test")
        env.setenv("TWOTOWER_BQ_CLICK_EVENTS_TABLE", source)
        env.setenv("BIGQUERY_EMULATOR_HOST", bq_emulator.endpoint)
        try:
            importlib.reload(definitions)  # the code location as `dagster` would load it
            graph = definitions.defs.resolve_asset_graph()
            assert not graph.get(dg.AssetKey(layout.CLICK_EVENTS)).is_materializable  # external input
            assert graph.get(dg.AssetKey(layout.TRAINING_EVENTS)).parent_keys == {dg.AssetKey(layout.CLICK_EVENTS)}
            assert default_warehouse().table_name(layout.CLICK_EVENTS) == source
            assert graph.get(dg.AssetKey(layout.CLICK_EVENTS)).is_observable  # observed for new days
            external = [a for a in definitions.ALL_ASSETS if isinstance(a, dg.AssetsDefinition) and a.is_observable]
        finally:
            env.undo()
            importlib.reload(definitions)  # back to the default graph for the other tests
    assert [a.key for a in external] == [dg.AssetKey(layout.CLICK_EVENTS)]

    pipeline = emulator_warehouse(bq_emulator, external_tables={layout.CLICK_EVENTS: source})
    instance = dg.DagsterInstance.ephemeral()
    split_config = {"ops": {"split_tables": {"config": {"train_set_size": 0.8, "event_day_number": 30}}}}

    def split():
        return dg.materialize([*external, split_tables], resources={"warehouse": pipeline}, partition_key=TINY_PARTITION,
                              run_config=split_config, instance=instance, raise_on_error=False)

    # The observation: one data version (the row count) per event day of the table.
    observed = observe(external, resources={"warehouse": pipeline}, instance=instance)
    assert observed.success
    versions = {e.partition: e.asset_observation_data.asset_observation.data_version
                for e in observed.all_events if e.event_type_value == "ASSET_OBSERVATION"}
    assert len(versions) == 28 and set(versions.values()) == {"40"}

    missing = split()
    assert not missing.success
    assert "2 event days are missing: 2026-05-30..2026-05-31" in failure_text(missing)
    assert not pipeline.table_exists(pipeline.table_name(layout.TRAINING_EVENTS)), "nothing written"

    # The late days land; the next observation sees them, and the split runs.
    raw.write_table(source, pa.concat_tables(list(generate_click_events(spec))), CLICK_EVENT_SCHEMA)
    observed = observe(external, resources={"warehouse": pipeline}, instance=instance)
    assert len([e for e in observed.all_events if e.event_type_value == "ASSET_OBSERVATION"]) == 30
    result = split()
    assert result.success
    counts = partition_counts(pipeline, layout.SPLIT_TABLES.values())
    assert all(c[TRAIN_DATE] > 0 for c in counts.values())
    assert sum(c[TRAIN_DATE] for c in counts.values()) <= 1200
    # nothing was generated or copied into the pipeline's dataset
    assert not pipeline.table_exists(f"{pipeline.bigquery.project}.{pipeline.dataset}.{layout.CLICK_EVENTS}")
