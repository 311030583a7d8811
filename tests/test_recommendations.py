"""The recommendations asset and the exact threshold pass of top_k_items behind it."""

from __future__ import annotations

import datetime as dt

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from conftest import TINY_PARTITION, make_resources, materialize_all

from twotower_assets.defs.recommendations import RECOMMENDATIONS, RECOMMENDATIONS_LATEST, recommendation_batches
from twotower_assets.model import metrics

# ------------------------------------------------------------------ top_k_items threshold pass


def _brute(users, items, k, exclude=None):
    """Exact reference: float64 scores, excluded -inf, stable sort (ties -> lower index)."""
    scores = users.astype(np.float64) @ items.astype(np.float64).T
    if exclude is not None:
        scores[exclude.toarray() != 0] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :k], scores


def _random_case(seed, n_users, n_items, dim, density=0.01):
    rng = np.random.default_rng(seed)
    users = rng.normal(size=(n_users, dim))
    items = rng.normal(size=(n_items, dim))
    exclude = sp.random(n_users, n_items, density=density, random_state=seed, format="csr")
    exclude.data[:] = 1.0
    return users, items, exclude


@pytest.mark.parametrize(
    ("n_users", "n_items", "k", "block_size"),
    [(300, 5000, 5, 64), (130, 2000, 100, 50), (70, 12000, 40, 1000)],
    ids=["small-k", "half-catalogue-candidates", "several-tiles"],
)
def test_threshold_pass_is_exact(n_users, n_items, k, block_size):
    assert metrics._threshold_sample_size(n_items, k) is not None  # the pass under test runs
    users, items, exclude = _random_case(n_users + n_items, n_users, n_items, 8)
    got, scores = metrics.top_k_items(users, items, k, exclude=exclude, block_size=block_size, return_scores=True)
    expected, all_scores = _brute(users, items, k, exclude)
    assert got.dtype == np.int64 and got.shape == (n_users, k)
    np.testing.assert_array_equal(got, expected)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, np.take_along_axis(all_scores, expected, axis=1), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(metrics.top_k_items(users, items, k, exclude=exclude, block_size=block_size), got)


def test_threshold_pass_redoes_users_whose_threshold_was_too_high(monkeypatch):
    # Threshold = the best sampled score with ~k expected survivors: many users get fewer
    # than k survivors and must be redone exactly; the result stays exact.
    monkeypatch.setattr(metrics, "_SAMPLE_ORDER", 1)
    monkeypatch.setattr(metrics, "_CANDIDATES_PER_K", 1)
    users, items, exclude = _random_case(3, 200, 3000, 6, density=0.05)
    got = metrics.top_k_items(users, items, 30, exclude=exclude, block_size=64)
    np.testing.assert_array_equal(got, _brute(users, items, 30, exclude)[0])


def test_threshold_pass_with_ties_zero_vectors_and_heavy_exclusion():
    users, items, exclude = _random_case(4, 120, 4000, 5)
    users[7] = 0.0  # every score 0: every item ties at the threshold (a flooded row)
    items[100:400] = items[50]  # 301 identical items: ties across tiles
    exclude = exclude.tolil()
    exclude[9, :3990] = 1.0  # only 10 unseen items left: the tail holds excluded ones
    exclude = exclude.tocsr()
    k = 20
    got = metrics.top_k_items(users, items, k, exclude=exclude, block_size=32)
    expected, scores = _brute(users, items, k, exclude)
    for u in range(len(users)):
        assert len(set(got[u])) == k
        # Ties at the cut-off may pick different items; the scores must be the best ones.
        np.testing.assert_allclose(scores[u, got[u]], scores[u, expected[u]], rtol=1e-5, atol=1e-6)
    unseen = np.flatnonzero(exclude[9].toarray()[0] == 0)
    assert set(got[9, :10]) == set(unseen)
    assert np.isin(got[9, 10:], unseen).sum() == 0


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
    selection = dg.AssetSelection.assets(RECOMMENDATIONS).upstream()
    result = materialize_all(resources, TINY_PARTITION, selection=selection)
    assert result.success
    return resources, result


def _table(resources, name=RECOMMENDATIONS):
    return resources["warehouse"].query(f"SELECT * FROM {name} ORDER BY user_id").to_pylist()


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
