"""One promotion record: ``two_tower_retriever@champion`` says which run is champion; the
MatchModel's alias and the ``_latest`` views follow it, and a promotion that stopped after the
record moved is noticed (check, sensor) and finished (reconcile job, next ``champion`` run).

A real MLflow registry (SQLite) and a real DuckDB warehouse; the registered versions point at
no model files, which promotion never opens."""

import datetime as dt

import dagster as dg
import pytest
from mlflow import MlflowClient

from twotower_assets.defs.automation.sensors import champion_reconciler
from twotower_assets.defs.publishing.champion import champion_aliases_agree
from twotower_assets.definitions import defs
from twotower_assets.lib import layout
from twotower_assets.lib.mlflow_tracking import MlflowTracking
from twotower_assets.lib.promotion import alias_state, move_champion
from twotower_assets.serving.registry import CHAMPION, promote
from twotower_assets.warehouse.duckdb import DuckDBWarehouse

MATCH, RETRIEVER = "two_tower_match", "two_tower_retriever"
DATES = {"1": "2026-06-01", "2": "2026-06-08", "3": "2026-06-15"}


@pytest.fixture
def registry(tmp_path):
    mlflow = MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=(tmp_path / "a").as_uri())
    client = MlflowClient(tracking_uri=mlflow.tracking_uri)
    experiment = client.create_experiment("two_tower")
    for name in (MATCH, RETRIEVER):
        client.create_registered_model(name)
    for version, date in DATES.items():  # one training run per date, both models registered from it
        run = client.create_run(experiment).info.run_id
        for name in (MATCH, RETRIEVER):
            client.create_model_version(name, f"runs:/{run}/{name}", run_id=run, tags={
                "train_date": date, "gate": "failed" if version == "3" else "passed"})
    warehouse = DuckDBWarehouse(path=str(tmp_path / "warehouse.duckdb"))
    table = warehouse.table_name(layout.USER_EMBEDDING_HISTORY)
    rows = ", ".join(f"('u1', DATE '{date}', '{client.get_model_version(MATCH, v).run_id}')" for v, date in DATES.items())
    warehouse.execute(f"CREATE TABLE {table} AS SELECT * FROM (VALUES {rows}) AS t(user_id, train_date, mlflow_run_id)")
    return client, mlflow, warehouse


def _aliases(client) -> tuple[str, str]:
    return tuple(str(client.get_model_version_by_alias(n, CHAMPION).version) for n in (MATCH, RETRIEVER))


def _view_dates(warehouse) -> set:
    view = warehouse.table_name(layout.USER_EMBEDDING_LATEST)
    return set(warehouse.query(f"SELECT DISTINCT train_date FROM {view}")["train_date"].to_pylist())


def test_a_promotion_moves_the_record_then_the_alias_and_the_views_follow(registry):
    client, _, warehouse = registry
    moved = move_champion(warehouse, client, MATCH, "2", RETRIEVER)
    assert (moved.match_version, moved.retriever_version, moved.train_date) == ("2", "2", "2026-06-08")
    assert _aliases(client) == ("2", "2") and _view_dates(warehouse) == {dt.date(2026, 6, 8)}
    assert moved.mlflow_run_id == client.get_model_version(MATCH, "2").run_id


def test_a_version_the_gate_failed_is_refused_and_nothing_moves(registry):
    client, _, warehouse = registry
    move_champion(warehouse, client, MATCH, "1", RETRIEVER)
    with pytest.raises(ValueError, match=r"two_tower_match version 3 \(train_date 2026-06-15\) has gate=failed"):
        move_champion(warehouse, client, MATCH, "3", RETRIEVER)
    assert _aliases(client) == ("1", "1") and _view_dates(warehouse) == {dt.date(2026, 6, 1)}


def test_a_promotion_stopped_after_the_record_is_noticed_and_finished(registry):
    client, mlflow, warehouse = registry
    move_champion(warehouse, client, MATCH, "1", RETRIEVER)
    promote(client, RETRIEVER, "2")  # the record moved; the process was killed before anything else
    assert _aliases(client) == ("1", "2")

    state = alias_state(client, MATCH, RETRIEVER)
    assert not state.agree and (state.record, state.match, state.expected_match) == ("2", "1", "2")
    check = champion_aliases_agree(mlflow=mlflow)
    assert not check.passed and "two_tower_match@champion is v1, the same run's version is v2" in check.description

    request = champion_reconciler(dg.build_sensor_context(resources={"mlflow": mlflow}))
    assert isinstance(request, dg.RunRequest) and request.run_key == "record-2-match-1"

    job = defs.resolve_job_def("reconcile_champion_job")
    assert job.execute_in_process(resources={"mlflow": mlflow, "warehouse": warehouse}).success
    assert _aliases(client) == ("2", "2") and _view_dates(warehouse) == {dt.date(2026, 6, 8)}
    assert champion_aliases_agree(mlflow=mlflow).passed
    assert isinstance(champion_reconciler(dg.build_sensor_context(resources={"mlflow": mlflow})), dg.SkipReason)
    # Again: idempotent.
    assert job.execute_in_process(resources={"mlflow": mlflow, "warehouse": warehouse}).success
    assert _aliases(client) == ("2", "2")


def test_a_champion_whose_rows_were_rewritten_is_refused_before_the_record_moves(registry):
    client, _, warehouse = registry
    move_champion(warehouse, client, MATCH, "2", RETRIEVER)
    table = warehouse.table_name(layout.USER_EMBEDDING_HISTORY)
    warehouse.execute(f"UPDATE {table} SET mlflow_run_id = '{'f' * 32}' WHERE train_date = DATE '2026-06-01'")  # a retrain
    with pytest.raises(ValueError, match=r"two_tower_user_embedding_history has no rows of run \w+ for 2026-06-01: "
                                         r"the date was rewritten by another run since"):
        move_champion(warehouse, client, MATCH, "1", RETRIEVER)
    assert _aliases(client) == ("2", "2") and _view_dates(warehouse) == {dt.date(2026, 6, 8)}


def test_the_latest_tables_keep_the_champions_rows_when_its_date_is_rewritten(registry):
    client, _, warehouse = registry
    move_champion(warehouse, client, MATCH, "2", RETRIEVER)
    table = warehouse.table_name(layout.USER_EMBEDDING_HISTORY)
    warehouse.execute(f"DELETE FROM {table} WHERE train_date = DATE '2026-06-08'")  # a retrain's rewrite begins
    assert _view_dates(warehouse) == {dt.date(2026, 6, 8)}


def test_a_version_with_no_retriever_of_its_run_is_refused(registry):
    client, _, warehouse = registry
    run = client.get_model_version(MATCH, "1").run_id
    client.create_model_version(MATCH, f"runs:/{run}/x", run_id=client.create_run(
        client.get_experiment_by_name("two_tower").experiment_id).info.run_id, tags={"train_date": "2026-06-22",
                                                                                     "gate": "passed"})
    with pytest.raises(ValueError, match=r"has no two_tower_retriever version of the same run .*materialise "
                                         r"two_tower_retriever for 2026-06-22 first"):
        move_champion(warehouse, client, MATCH, "4", RETRIEVER)
