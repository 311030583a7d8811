"""Serving what the graph published: the registry, champion, rollback and the real server.

Two dates of the tiny graph are materialised; then ``mlflow models serve`` is started on
``models:/two_tower_retriever@champion`` exactly as the README says, and its answers are
checked against the tables the same date published (the tiny catalogue is below the index's
``min_rows_for_index``, so the index searches exactly and the answers must be equal). The
``rollback_champion`` job moves the alias and the ``_latest`` views back; a failed gate keeps
the alias where it was. The retrieval server (``python -m twotower_assets.serving``) answers the
same tables and follows a rollback and the way back without a restart.
"""

import datetime as dt

import dagster as dg
import numpy as np
import pytest
import requests
from mlflow import MlflowClient

from helpers.graph import TINY_PARTITION, make_resources, materialize_all, tiny_run_config
from helpers.model_server import mlflow_models_serve
from helpers.retrieval_server import retrieval_server
from twotower_assets.lib import layout

pytestmark = pytest.mark.slow

OLDER_PARTITION = "2026-05-25"
MATCH, RETRIEVER = "two_tower_match", "two_tower_retriever"


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    home = tmp_path_factory.mktemp("serving-graph")
    resources = make_resources(home)
    for partition in (OLDER_PARTITION, TINY_PARTITION):
        assert materialize_all(resources, partition).success
    return home, resources


def champion_version(client: MlflowClient, name: str):
    return client.get_model_version_by_alias(name, "champion")


def latest_view_dates(warehouse) -> dict[str, list]:
    return {
        view: sorted(set(warehouse.query(f"SELECT train_date FROM {view}")["train_date"].to_pylist()))
        for view in layout.LATEST_TABLES.values()
    }


def test_champion_is_the_newest_gated_date_and_the_views_follow_it(published):
    _, resources = published
    client = MlflowClient(tracking_uri=resources["mlflow"].tracking_uri)
    for name in (MATCH, RETRIEVER):
        versions = {v.tags["train_date"]: v for v in client.search_model_versions(f"name = '{name}'")}
        assert set(versions) == {OLDER_PARTITION, TINY_PARTITION}
        assert all(v.tags["gate"] == "passed" for v in versions.values())
        assert champion_version(client, name).tags["train_date"] == TINY_PARTITION
    newest = dt.date.fromisoformat(TINY_PARTITION)
    assert latest_view_dates(resources["warehouse"]) == {view: [newest] for view in layout.LATEST_TABLES.values()}


def test_a_backfill_of_an_older_date_does_not_take_the_alias_back(published):
    _, resources = published
    client = MlflowClient(tracking_uri=resources["mlflow"].tracking_uri)
    before = champion_version(client, MATCH).version
    result = materialize_all(resources, OLDER_PARTITION, selection=dg.AssetSelection.assets(layout.CHAMPION),
                             run_config={"ops": {}})
    assert result.success
    [event] = result.get_asset_materialization_events()
    assert event.materialization.metadata["moved"].value is False
    assert champion_version(client, MATCH).version == before


@pytest.fixture(scope="module")
def server(published, tmp_path_factory):
    _, resources = published
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    with mlflow_models_serve(f"models:/{RETRIEVER}@champion", resources["mlflow"].tracking_uri, log_path) as url:
        yield url


def invoke(url: str, records: list[dict]) -> list[dict]:
    response = requests.post(f"{url}/invocations", json={"dataframe_records": records}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def test_served_users_get_the_recommendations_table(published, server):
    _, resources = published
    table = resources["warehouse"].query(
        "SELECT user_id, item_ids, scores FROM two_tower_recommendations_latest ORDER BY user_id"
    ).to_pylist()
    sample = table[:: max(1, len(table) // 20)]
    k = 10
    answers = invoke(server, [{"user_id": row["user_id"], "k": k} for row in sample])
    for row, answer in zip(sample, answers):
        assert answer["source"] == "user"
        assert answer["scores"] == pytest.approx(row["scores"][:k], abs=1e-4)
        assert set(answer["item_ids"]) == set(row["item_ids"][:k])


def test_served_items_get_the_similar_items_table(published, server):
    _, resources = published
    rows = resources["warehouse"].query(
        "SELECT item_id, similar_item_id, score FROM two_tower_similar_items WHERE train_date = $d "
        "ORDER BY item_id, neighbor_rank", {"d": dt.date.fromisoformat(TINY_PARTITION)}
    ).to_pylist()
    neighbours: dict[str, list] = {}
    for row in rows:
        neighbours.setdefault(row["item_id"], []).append(row)
    items = sorted(neighbours)[:10]
    k = 5
    answers = invoke(server, [{"item_id": item, "k": k} for item in items])
    for item, answer in zip(items, answers):
        assert answer["source"] == "item"
        assert item not in answer["item_ids"]
        assert answer["scores"] == pytest.approx([r["score"] for r in neighbours[item][:k]], abs=1e-4)
        assert set(answer["item_ids"]) == {r["similar_item_id"] for r in neighbours[item][:k]}


def test_an_unknown_user_gets_the_most_popular_items(published, server):
    _, resources = published
    counts = resources["warehouse"].query(
        "SELECT item_id, COUNT(*) AS n FROM training_events WHERE train_date = $d GROUP BY item_id "
        "ORDER BY n DESC, item_id LIMIT 5", {"d": dt.date.fromisoformat(TINY_PARTITION)}
    ).to_pylist()
    [answer] = invoke(server, [{"user_id": "somebody-new", "k": 5}])
    assert answer["source"] == "popular"
    assert answer["item_ids"] == [row["item_id"] for row in counts]
    total = resources["warehouse"].query(
        "SELECT COUNT(*) AS n FROM training_events WHERE train_date = $d", {"d": dt.date.fromisoformat(TINY_PARTITION)}
    )["n"][0].as_py()
    assert answer["scores"] == pytest.approx([row["n"] / total for row in counts])


def test_a_bad_request_gets_a_400_and_the_server_keeps_serving(server):
    response = requests.post(f"{server}/invocations", json={"dataframe_records": [{"user_id": "u0", "k": 0}]}, timeout=60)
    assert response.status_code == 400 and "k=0 is below 1" in response.json()["message"]
    assert invoke(server, [{"user_id": "somebody-new", "k": 1}])[0]["source"] == "popular"


def test_the_retrieval_server_answers_the_published_tables_and_follows_a_rollback(published, tmp_path):
    # The package's server on the same registry: its answers are the tables of the champion's
    # date, and a rollback (and back) moves what it serves without a restart.
    _, resources = published
    client = MlflowClient(tracking_uri=resources["mlflow"].tracking_uri)
    matches = {v.tags["train_date"]: v for v in client.search_model_versions(f"name = '{MATCH}'")}
    served_date = champion_version(client, RETRIEVER).tags["train_date"]
    other_date = OLDER_PARTITION if served_date == TINY_PARTITION else TINY_PARTITION

    def check_answers(server, date: str) -> None:
        champion = champion_version(client, RETRIEVER)
        assert champion.tags["train_date"] == date
        version = str(champion.version)  # MlflowClient gives an int here, the server a string
        server.wait_for(lambda h: h["model_version"] == version, f"version {version} served")
        table = resources["warehouse"].query(
            "SELECT user_id, item_ids, scores FROM two_tower_recommendations_latest ORDER BY user_id"
        ).to_pylist()
        sample = table[:: max(1, len(table) // 20)]
        response = server.post("/invocations", {"dataframe_records": [{"user_id": r["user_id"], "k": 10} for r in sample]})
        assert response.json()["model_version"] == version
        for row, answer in zip(sample, response.json()["predictions"], strict=True):
            assert answer["source"] == "user"
            assert answer["scores"] == pytest.approx(row["scores"][:10], abs=1e-4)
            assert set(answer["item_ids"]) == set(row["item_ids"][:10])
        similar = resources["warehouse"].query(
            "SELECT item_id, similar_item_id, score FROM two_tower_similar_items WHERE train_date = $d "
            "ORDER BY item_id, neighbor_rank", {"d": dt.date.fromisoformat(date)}
        ).to_pylist()
        item = similar[0]["item_id"]
        neighbours = [r for r in similar if r["item_id"] == item][:5]
        answer = server.post("/recommend", {"item_id": item, "k": 5}).json()
        assert answer["source"] == "item"
        assert answer["scores"] == pytest.approx([r["score"] for r in neighbours], abs=1e-4)
        assert set(answer["item_ids"]) == {r["similar_item_id"] for r in neighbours}
        # The published version carries the items' categories: a filtered answer holds only
        # the category's items, k of them when k exist.
        categories = resources["warehouse"].query(
            "SELECT DISTINCT item_id, offer_category_id FROM training_events WHERE train_date = $d",
            {"d": dt.date.fromisoformat(date)}).to_pylist()
        category = categories[0]["offer_category_id"]
        members = {r["item_id"] for r in categories if r["offer_category_id"] == category}
        filtered = server.post("/recommend", {"user_id": sample[0]["user_id"], "k": 5, "exclude_seen": False,
                                              "filters": {"offer_category_id": category}}).json()
        assert set(filtered["item_ids"]) <= members and len(filtered["item_ids"]) == min(5, len(members))
        # Request-time vectors: the user's own features, sent with the request, go through the
        # published user tower and give the batch pipeline's vector (the same scores).
        from twotower_assets.defs.training.trainer import _catalog
        from twotower_assets.model.datasets import load_dataset

        users = _catalog(load_dataset(resources["artifacts"].require("tf_datasets", date) / "users"))
        user = sample[0]["user_id"]
        row_of = [u.decode() if isinstance(u, bytes) else str(u) for u in users["user_id"]].index(user)
        features = {name: (values[row_of].decode() if isinstance(values[row_of], bytes) else float(values[row_of]))
                    for name, values in users.items() if name in ("booking_cnt", "user_queries")}
        fresh = server.post("/recommend", {"user_id": user, "user_features": features, "k": 10}).json()
        assert fresh.get("source") == "request", fresh
        assert fresh["scores"] == pytest.approx(sample[0]["scores"][:10], abs=1e-4)
        # A user the training never saw, with two clicks: personalised, the clicks left out, an
        # unknown id ignored and named.
        clicked = [r["item_id"] for r in categories[:2]]
        new_user = server.post("/recommend", {"recent_item_ids": [*clicked, "no-such-item"], "k": 5}).json()
        assert new_user["source"] == "request" and len(new_user["item_ids"]) == 5
        assert not set(clicked) & set(new_user["item_ids"]) and new_user["ignored_item_ids"] == ["no-such-item"]

    with retrieval_server(resources["mlflow"].tracking_uri, tmp_path / "server.log", "--poll-interval", "0.2") as server:
        check_answers(server, served_date)
        try:
            assert rollback(resources, str(matches[other_date].version)).success
            check_answers(server, other_date)
        finally:
            assert rollback(resources, str(matches[served_date].version)).success
        check_answers(server, served_date)


def rollback(resources, version: str, raise_on_error: bool = True):
    from twotower_assets.definitions import defs

    job = defs.resolve_job_def("rollback_champion")
    return job.execute_in_process(
        run_config={"ops": {"set_champion": {"config": {"match_model_version": version}}}},
        resources={"warehouse": resources["warehouse"], "mlflow": resources["mlflow"]},
        raise_on_error=raise_on_error,
    )


def test_rollback_moves_both_aliases_and_the_views_and_refuses_a_failed_version(published, server):
    _, resources = published
    client = MlflowClient(tracking_uri=resources["mlflow"].tracking_uri)
    older = {v.tags["train_date"]: v for v in client.search_model_versions(f"name = '{MATCH}'")}[OLDER_PARTITION]
    assert rollback(resources, str(older.version)).success
    for name in (MATCH, RETRIEVER):
        version = champion_version(client, name)
        assert version.tags["train_date"] == OLDER_PARTITION and version.run_id == older.run_id
    older_date = dt.date.fromisoformat(OLDER_PARTITION)
    assert latest_view_dates(resources["warehouse"]) == {view: [older_date] for view in layout.LATEST_TABLES.values()}

    # A version the gate failed cannot be made champion.
    newest = champion_version(client, MATCH)
    client.set_model_version_tag(MATCH, str(older.version), "gate", "failed")
    try:
        result = rollback(resources, str(older.version), raise_on_error=False)
    finally:
        client.set_model_version_tag(MATCH, str(older.version), "gate", "passed")
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "gate=failed" in str(failure.step_failure_data.error)
    assert champion_version(client, MATCH).version == newest.version


def test_a_failed_gate_keeps_the_champion_and_tags_the_version(tmp_path):
    resources = make_resources(tmp_path)
    assert materialize_all(resources, OLDER_PARTITION).success
    client = MlflowClient(tracking_uri=resources["mlflow"].tracking_uri)
    champion_before = champion_version(client, MATCH).version
    # A gate no model can pass: recall must beat popularity by 1000 %.
    config = tiny_run_config(evaluation_metrics_quality_gate={"min_lift_over_popularity": 10.0})
    result = materialize_all(resources, TINY_PARTITION, run_config=config, raise_on_error=False)
    versions = {v.tags["train_date"]: v for v in client.search_model_versions(f"name = '{MATCH}'")}
    assert versions[TINY_PARTITION].tags["gate"] == "failed"
    assert float(versions[TINY_PARTITION].tags["gate.min_lift_over_popularity"]) == 10.0
    assert champion_version(client, MATCH).version == champion_before
    materialised = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert not materialised & {layout.CHAMPION, layout.TWO_TOWER_RETRIEVER, layout.ITEM_ANN_INDEX,
                               layout.USER_EMBEDDING_HISTORY}
    assert np.array_equal(
        resources["warehouse"].query("SELECT DISTINCT train_date FROM two_tower_user_embedding_latest")["train_date"].to_pylist(),
        [dt.date.fromisoformat(OLDER_PARTITION)],
    )
