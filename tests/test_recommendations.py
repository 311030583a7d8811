"""The recommendations asset (its top-k engine: tests/test_topk.py)."""

from __future__ import annotations

import datetime as dt

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from helpers.graph import TINY_PARTITION, make_resources, materialize_all
from twotower_assets.defs.publishing.recommendations import recommendation_batches
from twotower_assets.lib.layout import RECOMMENDATIONS, RECOMMENDATIONS_LATEST


# ------------------------------------------------------------------------- record batches


def test_recommendation_batches_cut_seen_tails_and_stream_in_chunks():
    rng = np.random.default_rng(5)
    users, items = rng.normal(size=(5, 3)), rng.normal(size=(6, 3))
    seen = sp.csr_matrix(np.array([[1, 1, 1, 1, 0, 0], [0] * 6, [1] * 6, [0, 0, 0, 0, 0, 1], [1, 0, 0, 0, 0, 0]]))
    user_ids = np.array([f"u{i}" for i in range(5)])
    item_ids = np.array([f"i{i}" for i in range(6)])
    batches = list(
        recommendation_batches(user_ids, users, item_ids, items, seen, 4, dt.date(2026, 6, 1), "run1", users_per_batch=2)
    )
    assert [b.num_rows for b in batches] == [2, 2, 1]
    rows = [row for b in batches for row in b.to_pylist()]
    scores = users @ items.T
    for u, row in enumerate(rows):
        assert row["user_id"] == f"u{u}" and row["mlflow_run_id"] == "run1"
        unseen = [f"i{i}" for i in np.flatnonzero(seen[u].toarray()[0] == 0)]
        assert len(row["item_ids"]) == min(4, len(unseen))
        assert set(row["item_ids"]) <= set(unseen)
        expected = [f"i{i}" for i in np.argsort(-np.where(seen[u].toarray()[0] > 0, -np.inf, scores[u]))][: len(row["item_ids"])]
        assert row["item_ids"] == expected
        np.testing.assert_allclose(row["scores"], [scores[u, int(i[1:])] for i in expected], rtol=1e-5)
    assert rows[2]["item_ids"] == []  # a user who has seen everything gets an empty list


# --------------------------------------------------------------------------------- the asset


@pytest.fixture(scope="module")
def materialised(tmp_path_factory):
    resources = make_resources(tmp_path_factory.mktemp("recommendations") / "home")
    # With champion: the _latest view is the champion's partition, pointed there by promotion.
    selection = dg.AssetSelection.assets(RECOMMENDATIONS, "champion").upstream()
    result = materialize_all(resources, TINY_PARTITION, selection=selection)
    assert result.success
    return resources, result


def _table(resources, name=RECOMMENDATIONS):
    return resources["warehouse"].query(f"SELECT * FROM {name} ORDER BY user_id").to_pylist()


@pytest.mark.slow
def test_asset_writes_exact_top_k_unseen_items_for_every_user(materialised):
    resources, result = materialised
    home = resources["artifacts"].path("two_tower_model", TINY_PARTITION)
    users = pq.read_table(home / "user_embeddings.parquet")
    items = pq.read_table(home / "item_embeddings.parquet")
    user_ids = np.array(users["user_id"].to_pylist())
    item_ids = np.array(items["item_id"].to_pylist())
    user_vectors = np.array(users["embedding"].to_pylist())
    item_vectors = np.array(items["embedding"].to_pylist())
    seen = resources["warehouse"].query(
        "SELECT DISTINCT user_id, item_id FROM training_events WHERE train_date = $d", {"d": dt.date(2026, 6, 1)}
    ).to_pylist()
    seen_by_user: dict[str, set[str]] = {}
    for pair in seen:
        seen_by_user.setdefault(pair["user_id"], set()).add(pair["item_id"])

    rows = _table(resources)
    assert sorted(r["user_id"] for r in rows) == sorted(set(user_ids))
    metadata = result.asset_materializations_for_node(RECOMMENDATIONS)[0].metadata
    assert metadata["dagster/row_count"].value == len(rows)
    k = metadata["k"].value
    item_index = {item: i for i, item in enumerate(item_ids)}
    for row in rows:
        u = int(np.flatnonzero(user_ids == row["user_id"])[0])
        scores = item_vectors @ user_vectors[u]
        unseen = [i for i in item_ids if i not in seen_by_user.get(row["user_id"], set())]
        assert row["train_date"] == dt.date(2026, 6, 1)
        assert len(row["item_ids"]) == min(k, len(unseen)) and len(set(row["item_ids"])) == len(row["item_ids"])
        assert not set(row["item_ids"]) & seen_by_user.get(row["user_id"], set())
        assert row["scores"] == sorted(row["scores"], reverse=True)
        best = sorted((scores[item_index[i]] for i in unseen), reverse=True)[: len(row["item_ids"])]
        np.testing.assert_allclose(row["scores"], best, rtol=1e-4, atol=1e-5)
    latest = _table(resources, RECOMMENDATIONS_LATEST)
    assert len(latest) == len(rows)


@pytest.mark.slow
def test_rerun_replaces_the_partition(materialised):
    resources, _ = materialised
    before = _table(resources)
    config = {"ops": {RECOMMENDATIONS: {"config": {"k": 3, "users_per_batch": 50}}}}
    again = materialize_all(resources, TINY_PARTITION, run_config=config, selection=dg.AssetSelection.assets(RECOMMENDATIONS))
    assert again.success
    after = _table(resources)
    assert [r["user_id"] for r in after] == [r["user_id"] for r in before]
    assert all(len(r["item_ids"]) == 3 for r in after)
    assert [r["item_ids"] for r in after] == [r["item_ids"][:3] for r in before]


@pytest.mark.slow
def test_missing_model_is_a_clear_error_and_keeps_the_table(materialised):
    resources, _ = materialised
    before = _table(resources)
    result = materialize_all(
        resources, "2026-06-02", run_config={"ops": {}}, selection=dg.AssetSelection.assets(RECOMMENDATIONS),
        raise_on_error=False,
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "two_tower_model has no materialisation for partition 2026-06-02" in str(failure.step_failure_data.error)
    assert _table(resources) == before
