"""Tests for twotower_assets.model.topk: exact top-k against brute force, the threshold pass included."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from twotower_assets.model import topk


# ----------------------------------------------------------------------- top_k_items


def _brute(users, items, k, exclude=None):
    """Exact reference: float64 scores, excluded -inf, stable sort (ties -> lower index)."""
    scores = users.astype(np.float64) @ items.astype(np.float64).T
    if exclude is not None:
        scores[exclude.toarray() != 0] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :k], scores


def test_top_k_items_matches_brute_force():
    rng = np.random.default_rng(1)
    users, items = rng.normal(size=(7, 4)), rng.normal(size=(20, 4))
    got = topk.top_k_items(users, items, k=5)
    assert got.shape == (7, 5) and got.dtype == np.int64
    np.testing.assert_array_equal(got, _brute(users, items, 5)[0])


def test_top_k_items_respects_exclude_and_blocking():
    rng = np.random.default_rng(2)
    users, items = rng.normal(size=(11, 3)), rng.normal(size=(25, 3))
    exclude_dense = (rng.random((11, 25)) < 0.3).astype(np.float64)
    exclude = sp.csr_matrix(exclude_dense)
    got = topk.top_k_items(users, items, k=6, exclude=exclude, block_size=1000)
    for u in range(11):
        assert not np.isin(got[u], np.flatnonzero(exclude_dense[u])).any()
    np.testing.assert_array_equal(got, _brute(users, items, 6, exclude)[0])
    blocked = topk.top_k_items(users, items, k=6, exclude=exclude, block_size=3)
    np.testing.assert_array_equal(blocked, got)


def test_top_k_items_argpartition_row_chunks(monkeypatch):
    # Force argpartition to run 2 rows at a time (25 items -> 50 // 25 = 2).
    rng = np.random.default_rng(3)
    users, items = rng.normal(size=(9, 3)), rng.normal(size=(25, 3))
    monkeypatch.setattr(topk, "_ARGPARTITION_MAX_ELEMENTS", 50)
    got = topk.top_k_items(users, items, k=4, block_size=5)
    np.testing.assert_array_equal(got, _brute(users, items, 4)[0])


def test_top_k_items_caps_k_and_breaks_ties_by_index():
    users = np.array([[1.0], [-1.0]])
    items = np.array([[2.0], [1.0], [2.0], [0.0]])
    got = topk.top_k_items(users, items, k=10)
    # User 0 scores [2, 1, 2, 0] -> 0, 2 (tie, lower index first), 1, 3.
    # User 1 scores [-2, -1, -2, 0] -> 3, 1, 0, 2.
    np.testing.assert_array_equal(got, [[0, 2, 1, 3], [3, 1, 0, 2]])


def test_top_k_items_exclude_ignores_explicit_zeros_and_fills_tail():
    users = np.array([[1.0]])
    items = np.array([[3.0], [2.0], [1.0]])
    # Stored zero on item 0 (not excluded) and a 1 on item 1 (excluded).
    exclude = sp.csr_matrix((np.array([0.0, 1.0]), np.array([0, 1]), np.array([0, 2])), shape=(1, 3))
    np.testing.assert_array_equal(topk.top_k_items(users, items, 2, exclude=exclude), [[0, 2]])
    # k = all items: the excluded item is pushed to the tail.
    np.testing.assert_array_equal(topk.top_k_items(users, items, 3, exclude=exclude), [[0, 2, 1]])


# ------------------------------------------------------------------ top_k_items threshold pass


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
    assert topk._threshold_sample_size(n_items, k) is not None  # the pass under test runs
    users, items, exclude = _random_case(n_users + n_items, n_users, n_items, 8)
    got, scores = topk.top_k_items(users, items, k, exclude=exclude, block_size=block_size, return_scores=True)
    expected, all_scores = _brute(users, items, k, exclude)
    assert got.dtype == np.int64 and got.shape == (n_users, k)
    np.testing.assert_array_equal(got, expected)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, np.take_along_axis(all_scores, expected, axis=1), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(topk.top_k_items(users, items, k, exclude=exclude, block_size=block_size), got)


def test_threshold_pass_redoes_users_whose_threshold_was_too_high(monkeypatch):
    # Threshold = the best sampled score with ~k expected survivors: many users get fewer
    # than k survivors and must be redone exactly; the result stays exact.
    monkeypatch.setattr(topk, "_SAMPLE_ORDER", 1)
    monkeypatch.setattr(topk, "_CANDIDATES_PER_K", 1)
    users, items, exclude = _random_case(3, 200, 3000, 6, density=0.05)
    got = topk.top_k_items(users, items, 30, exclude=exclude, block_size=64)
    np.testing.assert_array_equal(got, _brute(users, items, 30, exclude)[0])


def test_threshold_pass_with_ties_zero_vectors_and_heavy_exclusion():
    users, items, exclude = _random_case(4, 120, 4000, 5)
    users[7] = 0.0  # every score 0: every item ties at the threshold (a flooded row)
    items[100:400] = items[50]  # 301 identical items: ties across tiles
    exclude = exclude.tolil()
    exclude[9, :3990] = 1.0  # only 10 unseen items left: the tail holds excluded ones
    exclude = exclude.tocsr()
    k = 20
    got = topk.top_k_items(users, items, k, exclude=exclude, block_size=32)
    expected, scores = _brute(users, items, k, exclude)
    for u in range(len(users)):
        assert len(set(got[u])) == k
        # Ties at the cut-off may pick different items; the scores must be the best ones.
        np.testing.assert_allclose(scores[u, got[u]], scores[u, expected[u]], rtol=1e-5, atol=1e-6)
    unseen = np.flatnonzero(exclude[9].toarray()[0] == 0)
    assert set(got[9, :10]) == set(unseen)
    assert np.isin(got[9, 10:], unseen).sum() == 0
