"""Tests for twotower_assets.model.metrics: hand-computed metrics and the baselines."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from twotower_assets.model import metrics

INV_LOG2_3 = 1.0 / math.log2(3)  # discount at position 2 = 0.6309297535714575
IDCG_2 = 1.0 + INV_LOG2_3  # two hits at the top = 1.6309297535714575


def _csr(rows: list[list[int]], n_items: int) -> sp.csr_matrix:
    """Binary CSR matrix with a 1 at every (u, i) for i in rows[u]."""
    r = [u for u, items in enumerate(rows) for _ in items]
    c = [i for items in rows for i in items]
    return sp.csr_matrix((np.ones(len(c)), (r, c)), shape=(len(rows), n_items))


# --------------------------------------------------------------- hand-computed metrics

# Five items. popularity = [0.5, 0.25, 0.125, 0.0, 1.0]. The floor is the smallest
# positive value, 0.125, so item 3 (0.0) is clipped to 0.125.
# -log2: item0 = 1, item1 = 2, item2 = 3, item3 = 3, item4 = 0.
POPULARITY = np.array([0.5, 0.25, 0.125, 0.0, 1.0])
RECOMMENDED = np.array(
    [
        [0, 1, 2],  # u0, relevant {1, 3}
        [4, 0, 1],  # u1, relevant {4}
        [3, 2, 0],  # u2, relevant {} -> ignored in every metric
    ]
)
RELEVANT = _csr([[1, 3], [4], []], n_items=5)

# k=1: u0 [0] no hit, u1 [4] hit.
#   precision = (0 + 1)/2 = 0.5; recall = (0 + 1/1)/2 = 0.5; ndcg = (0 + 1/1)/2 = 0.5
#   coverage = |{0, 4}| / 5 = 0.4          (it would be 0.6 if u2's item 3 counted)
#   novelty = (1 + 0)/2 = 0.5                (it would be 4/3 if u2 counted)
# k=2: u0 [0, 1] hit at p=2, u1 [4, 0] hit at p=1.
#   precision = (1/2 + 1/2)/2 = 0.5; recall = (1/2 + 1/1)/2 = 0.75
#   ndcg: u0 DCG = 1/log2(3), IDCG = 1 + 1/log2(3) (min(2, 2) = 2 ideal hits) -> 0.386853
#         u1 DCG = 1, IDCG = 1 (min(2, 1) = 1) -> 1;  mean = 0.693426
#   coverage = |{0, 1, 4}| / 5 = 0.6
#   novelty = ((1 + 2)/2 + (0 + 1)/2)/2 = (1.5 + 0.5)/2 = 1.0
# k=3: u0 [0, 1, 2] one hit at p=2, u1 [4, 0, 1] one hit at p=1.
#   precision = (1/3 + 1/3)/2 = 1/3; recall = (1/2 + 1)/2 = 0.75; ndcg = 0.693426 as above
#   coverage = |{0, 1, 2, 4}| / 5 = 0.8      (it would be 1.0 if u2 counted)
#   novelty = ((1 + 2 + 3)/3 + (0 + 1 + 2)/3)/2 = (2 + 1)/2 = 1.5
NDCG_U0 = INV_LOG2_3 / IDCG_2  # 0.38685280723454163
EXPECTED = pd.DataFrame(
    {
        "k": [1, 2, 3],
        "precision": [0.5, 0.5, 1 / 3],
        "recall": [0.5, 0.75, 0.75],
        "ndcg": [0.5, (NDCG_U0 + 1) / 2, (NDCG_U0 + 1) / 2],
        "coverage": [0.4, 0.6, 0.8],
        "novelty": [0.5, 1.0, 1.5],
    }
)


def test_ranking_metrics_hand_computed():
    # 10 is capped at K = 3, and the duplicate 3 is dropped.
    got = metrics.ranking_metrics(RECOMMENDED, RELEVANT, POPULARITY, ks=[3, 1, 10, 2])
    assert list(got.columns) == ["k", "precision", "recall", "ndcg", "coverage", "novelty"]
    assert got["k"].tolist() == [1, 2, 3]
    pd.testing.assert_frame_equal(got, EXPECTED, check_dtype=False, atol=1e-12, rtol=0)
    assert abs(got.loc[1, "ndcg"] - 0.6934264036172708) < 1e-12


def test_ndcg_ideal_uses_min_k_and_relevant_count():
    # One user, relevant {0, 2}, recommended [2, 1, 0].
    # k=1: [2] hit at p=1 -> precision 1, recall 1/2, DCG 1, IDCG 1 (min(1, 2) = 1) -> 1
    # k=2: [2, 1] one hit -> precision 1/2, recall 1/2, DCG 1, IDCG 1 + 1/log2(3) -> 0.613147
    # k=3: hits at p=1, 3 -> precision 2/3, recall 1, DCG 1 + 1/log2(4) = 1.5,
    #      IDCG 1 + 1/log2(3) -> 1.5 / 1.6309297535714575 = 0.919721
    got = metrics.ranking_metrics(
        np.array([[2, 1, 0]]), _csr([[0, 2]], 3), np.full(3, 0.5), ks=[1, 2, 3]
    )
    np.testing.assert_allclose(got["precision"], [1, 0.5, 2 / 3], atol=1e-12)
    np.testing.assert_allclose(got["recall"], [0.5, 0.5, 1.0], atol=1e-12)
    np.testing.assert_allclose(got["ndcg"], [1.0, 1 / IDCG_2, 1.5 / IDCG_2], atol=1e-12)
    assert abs(got["ndcg"].iloc[2] - 0.9197207891481876) < 1e-12
    # popularity 0.5 everywhere -> 1 bit per item. Coverage over 3 items: {2}, {1, 2}, {0, 1, 2}.
    np.testing.assert_allclose(got["novelty"], [1.0, 1.0, 1.0])
    np.testing.assert_allclose(got["coverage"], [1 / 3, 2 / 3, 1.0])


def test_relevant_is_binarised_and_explicit_zeros_do_not_count():
    # u0: item 1 has value 5 (counts once, like a 1). u1: only an explicit stored zero,
    # so it has no relevant items and must be ignored.
    relevant = sp.csr_matrix(
        (np.array([5.0, 0.0]), np.array([1, 0]), np.array([0, 1, 2])), shape=(2, 3)
    )
    assert relevant.nnz == 2
    recommended = np.array([[1, 0], [2, 1]])
    got = metrics.ranking_metrics(recommended, relevant, np.full(3, 0.5), ks=[1, 2])
    # Only u0 counts: k=1 [1] hit -> precision 1, recall 1; k=2 -> precision 1/2, recall 1.
    np.testing.assert_allclose(got["precision"], [1.0, 0.5])
    np.testing.assert_allclose(got["recall"], [1.0, 1.0])
    np.testing.assert_allclose(got["ndcg"], [1.0, 1.0])
    # Coverage from u0 only: k=1 {1} -> 1/3; k=2 {0, 1} -> 2/3 (u1 would add item 2).
    np.testing.assert_allclose(got["coverage"], [1 / 3, 2 / 3])


def test_novelty_floor_and_clipping():
    recommended = np.array([[0, 1]])
    relevant = _csr([[0]], 2)
    # No positive popularity at all: floor 1e-12 -> -log2(1e-12) = 39.863137 bits per item.
    got = metrics.ranking_metrics(recommended, relevant, np.zeros(2), ks=[2])
    assert abs(got["novelty"].iloc[0] - 12 * math.log2(10)) < 1e-9
    # Popularity above 1 is clipped to 1 (0 bits); 0.25 -> 2 bits; mean over top 2 = 1.
    got = metrics.ranking_metrics(recommended, relevant, np.array([3.0, 0.25]), ks=[2])
    assert abs(got["novelty"].iloc[0] - 1.0) < 1e-12
    # Zero popularity is clipped to the smallest positive value (0.25 -> 2 bits), not 1e-12:
    # both items give 2 bits, mean 2 (a 1e-12 floor would give (39.86 + 2) / 2).
    got = metrics.ranking_metrics(recommended, relevant, np.array([0.0, 0.25]), ks=[2])
    assert abs(got["novelty"].iloc[0] - 2.0) < 1e-12


def test_no_counted_users_gives_nan():
    got = metrics.ranking_metrics(np.array([[0, 1]]), _csr([[]], 2), np.full(2, 0.5), ks=[1, 2])
    assert got["k"].tolist() == [1, 2]
    assert got[["precision", "recall", "ndcg", "coverage", "novelty"]].isna().all().all()


@pytest.mark.parametrize(
    "recommended",
    [np.array([[0, 0]]), np.array([[0, 5]]), np.array([[-1, 0]]), np.array([[0, 1], [1, 0]])],
    ids=["duplicate", "too-large", "negative", "row-count"],
)
def test_ranking_metrics_rejects_bad_input(recommended):
    with pytest.raises(ValueError):
        metrics.ranking_metrics(recommended, _csr([[0]], 3), np.full(3, 0.5), ks=[1])


# ------------------------------------------------------------------------ capped_ks


def test_capped_ks():
    assert metrics.capped_ks([10, 50, 100], 60) == [10, 50, 60]
    assert metrics.capped_ks([100, 10, 10], 5) == [5]
    assert metrics.capped_ks([20, 5], 100) == [5, 20]
    with pytest.raises(ValueError):
        metrics.capped_ks([0, 5], 10)


# --------------------------------------------------------------------------- baselines


def test_random_recommendations_reproducible_and_exclude_seen():
    rng = np.random.default_rng(4)
    exclude = sp.csr_matrix((rng.random((30, 40)) < 0.4).astype(np.float64))
    a = metrics.random_recommendations(30, 40, 10, exclude=exclude, seed=7)
    b = metrics.random_recommendations(30, 40, 10, exclude=exclude, seed=7, block_size=4)
    c = metrics.random_recommendations(30, 40, 10, exclude=exclude, seed=8)
    assert a.shape == (30, 10) and a.dtype == np.int64
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    dense = exclude.toarray()
    for u in range(30):
        assert len(set(a[u])) == 10
        assert not dense[u, a[u]].any()
    # Without exclusion every item can appear; k is capped at n_items.
    full = metrics.random_recommendations(3, 6, 50, seed=0)
    assert full.shape == (3, 6)
    assert all(sorted(row) == list(range(6)) for row in full.tolist())
    # The order is random, not always sorted.
    assert any(row != sorted(row) for row in full.tolist())


def test_random_recommendations_tail_when_too_few_unseen():
    exclude = _csr([[0, 1, 2]], 5)  # only items 3 and 4 unseen
    got = metrics.random_recommendations(1, 5, 4, exclude=exclude, seed=0)
    assert set(got[0, :2]) == {3, 4}
    assert set(got[0, 2:]) <= {0, 1, 2} and len(set(got[0])) == 4


def test_popularity_recommendations_rank_by_counts_and_skip_excluded():
    counts = np.array([5, 1, 9, 3, 9, 0])
    # Descending counts, ties to the lower index: 2, 4, 0, 3, 1, 5.
    exclude = _csr([[], [4, 0], [2, 4, 0, 3, 1]], 6)
    got = metrics.popularity_recommendations(counts, 3, 3, exclude=exclude)
    np.testing.assert_array_equal(
        got,
        [
            [2, 4, 0],  # nothing excluded
            [2, 3, 1],  # 4 and 0 skipped
            [5, 2, 4],  # only item 5 unseen; excluded items fill the tail by popularity
        ],
    )
    np.testing.assert_array_equal(metrics.popularity_recommendations(counts, 2, 2), [[2, 4], [2, 4]])


def _block_data(n_users=20, n_items=20, held_out_per_user=2):
    """Two user groups x two item groups (rank-2 block matrix); hold out 2 ones per user."""
    full = np.zeros((n_users, n_items))
    half_u, half_i = n_users // 2, n_items // 2
    full[:half_u, :half_i] = 1
    full[half_u:, half_i:] = 1
    train, test = full.copy(), np.zeros_like(full)
    for u in range(n_users):
        offset = 0 if u < half_u else half_i
        for j in range(held_out_per_user):
            item = offset + (u * held_out_per_user + j) % half_i
            train[u, item], test[u, item] = 0, 1
    return sp.csr_matrix(train), sp.csr_matrix(test)


def test_svd_recovers_held_out_better_than_random():
    train, test = _block_data()
    users = np.arange(20)
    svd = metrics.svd_recommendations(train, users, k=2, exclude=train, n_factors=2)
    rand = metrics.random_recommendations(20, 20, 2, exclude=train, seed=0)
    popularity = np.asarray((train != 0).mean(axis=0)).ravel()
    svd_m = metrics.ranking_metrics(svd, test, popularity, ks=[2])
    rand_m = metrics.ranking_metrics(rand, test, popularity, ks=[2])
    # The only unseen in-group items are exactly the two held-out ones.
    assert svd_m["recall"].iloc[0] == pytest.approx(1.0)
    assert svd_m["recall"].iloc[0] > rand_m["recall"].iloc[0] + 0.5


def test_svd_caps_factors_and_user_rows_select_users():
    train, _ = _block_data()
    # n_factors=100 on a 20 x 20 matrix is capped at 19 instead of failing.
    everyone = metrics.svd_recommendations(train, np.arange(20), k=3, exclude=train, n_factors=100)
    assert everyone.shape == (20, 3)
    rows = np.array([15, 0])
    subset = metrics.svd_recommendations(train, rows, k=3, exclude=train[rows], n_factors=2)
    full2 = metrics.svd_recommendations(train, np.arange(20), k=3, exclude=train, n_factors=2)
    np.testing.assert_array_equal(subset, full2[rows])
    # User 15 is in the second group, so its top item is from items 10-19; user 0 from 0-9.
    assert subset[0, 0] >= 10 and subset[1, 0] < 10


@pytest.mark.parametrize("shape", [(60, 25), (25, 60)])  # more users than items, and fewer
def test_svd_ranks_by_the_truncated_svd_scores(shape):
    """Against numpy's dense SVD: scores U_f S_f V_f^T of the sampled users, seen items removed."""
    rng = np.random.default_rng(3)
    train = sp.csr_matrix((rng.random(shape) < 0.3).astype(np.float64))
    rows, factors, k = np.array([4, 0, 17, 9]), 5, 6
    u, s, vt = np.linalg.svd(train.toarray(), full_matrices=False)
    scores = (u[rows, :factors] * s[:factors]) @ vt[:factors]
    scores[train[rows].toarray() > 0] = -np.inf
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    got = metrics.svd_recommendations(train, rows, k, exclude=train[rows], n_factors=factors)
    np.testing.assert_array_equal(got, expected)


# ------------------------------------------------------------------------ segments


def test_evaluate_recommenders_segments():
    recs = {"model_a": RECOMMENDED, "model_b": RECOMMENDED[:, ::-1].copy()}
    segments = np.array(["x", "y", "x"])
    got = metrics.evaluate_recommenders(recs, RELEVANT, POPULARITY, [1, 3], user_segments=segments)
    assert list(got.columns) == [
        "model", "segment", "k", "precision", "recall", "ndcg", "coverage", "novelty"
    ]
    assert len(got) == 2 * 3 * 2  # models x (all, x, y) x ks
    assert got["segment"].drop_duplicates().tolist() == ["all", "x", "y"]
    assert got["model"].drop_duplicates().tolist() == ["model_a", "model_b"]

    a = got[got["model"] == "model_a"].set_index(["segment", "k"])
    # 'all' equals the hand-computed table.
    np.testing.assert_allclose(a.loc[("all", 1), "precision"], 0.5)
    np.testing.assert_allclose(a.loc[("all", 3), "coverage"], 0.8)
    # Segment x = u0 and u2, and u2 has no relevant items, so only u0 counts:
    #   k=1 [0] no hit -> precision 0; coverage {0} -> 1/5; novelty item0 -> 1.
    #   k=3 [0, 1, 2] hit at p=2 -> precision 1/3, recall 1/2, ndcg 0.386853; coverage 3/5.
    np.testing.assert_allclose(a.loc[("x", 1), ["precision", "coverage", "novelty"]], [0.0, 0.2, 1.0])
    np.testing.assert_allclose(
        a.loc[("x", 3), ["precision", "recall", "ndcg", "coverage"]], [1 / 3, 0.5, NDCG_U0, 0.6]
    )
    # Segment y = u1: k=1 [4] hit -> precision 1, recall 1, ndcg 1, coverage 1/5, novelty 0.
    np.testing.assert_allclose(
        a.loc[("y", 1), ["precision", "recall", "ndcg", "coverage", "novelty"]], [1, 1, 1, 0.2, 0]
    )
    # model_b reverses the lists: u1 [1, 0, 4] hits at p=3 only; k=1 in segment y -> 0.
    b = got[got["model"] == "model_b"].set_index(["segment", "k"])
    assert b.loc[("y", 1), "precision"] == 0.0


def test_evaluate_recommenders_without_segments_and_reserved_label():
    got = metrics.evaluate_recommenders({"m": RECOMMENDED}, RELEVANT, POPULARITY, [1, 2, 3])
    assert got["segment"].unique().tolist() == ["all"]
    pd.testing.assert_frame_equal(
        got.drop(columns=["model", "segment"]), EXPECTED, check_dtype=False, atol=1e-12, rtol=0
    )
    with pytest.raises(ValueError):
        metrics.evaluate_recommenders(
            {"m": RECOMMENDED}, RELEVANT, POPULARITY, [1], user_segments=np.array(["all", "a", "a"])
        )


def test_evaluation_does_not_depend_on_the_order_the_warehouse_returns_rows():
    # GROUP BY results come back in any order; the sampled users, the random baseline and
    # every metric must not follow it.
    import pyarrow as pa

    from twotower_assets.defs.evaluation.assets import EvaluationConfig, evaluate

    rng = np.random.default_rng(3)
    users = [f"u{n:02d}" for n in range(40)]
    items = [f"i{n:02d}" for n in range(25)]

    def embeddings(ids, key):
        vectors = rng.normal(size=(len(ids), 4))
        return pa.table({key: ids, "embedding": [list(v) for v in vectors]})

    def pairs(count):
        chosen = {(users[rng.integers(40)], items[rng.integers(25)]) for _ in range(count)}
        user_ids, item_ids = zip(*sorted(chosen))
        return pa.table({"user_id": list(user_ids), "item_id": list(item_ids), "events": [1] * len(user_ids)})

    user_embeddings, item_embeddings = embeddings(users, "user_id"), embeddings(items, "item_id")
    training, test = pairs(300), pairs(60)
    config = EvaluationConfig(ks=[5, 10], num_users=12, svd_factors=3)  # sample 12 of the test users
    expected, _ = evaluate(user_embeddings, item_embeddings, training, test, config)
    for seed in (1, 2):
        shuffle = np.random.default_rng(seed).permutation
        table, _ = evaluate(user_embeddings, item_embeddings, training.take(shuffle(training.num_rows)),
                            test.take(shuffle(test.num_rows)), config)
        pd.testing.assert_frame_equal(table, expected, check_exact=False, rtol=1e-9)


def _two_blocks() -> sp.csr_matrix:
    """a, b co-occur twice (n_a = 3, n_b = 2); c, d once (n_c = 1, n_d = 2); no pair across the blocks."""
    rows = [[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1]]
    return sp.csr_matrix(np.array(rows, dtype=np.float32))


def test_ease_weights_match_the_closed_form_by_hand():
    # With two items that co-occur n_ab times, B = I - P diag(1/diag P), P = (X'X + lambda I)^-1
    # gives B[a, b] = n_ab / (n_a + lambda) and B[b, a] = n_ab / (n_b + lambda) (Steck 2019).
    weights = metrics.ease_item_weights(_two_blocks(), regulariser=1.0)
    expected = np.zeros((4, 4))
    expected[0, 1], expected[1, 0] = 2 / (3 + 1), 2 / (2 + 1)
    expected[2, 3], expected[3, 2] = 1 / (1 + 1), 1 / (2 + 1)
    np.testing.assert_allclose(weights, expected, atol=1e-6)


def test_ease_recommends_co_occurring_items_and_skips_seen():
    train = _two_blocks()
    # User 2 has a: b (2/4) first, then c and d (score 0) by index. User 4 has d: c (1/3) first.
    top = metrics.ease_recommendations(train, np.array([2, 4]), 3, exclude=train[[2, 4]], regulariser=1.0)
    assert top.tolist() == [[1, 2, 3], [2, 0, 1]]


def test_ease_refuses_a_catalogue_above_its_bound():
    with pytest.raises(ValueError, match="EASE needs a dense 4 x 4 item matrix; the bound is 3 items"):
        metrics.ease_recommendations(_two_blocks(), np.array([0]), 2, regulariser=1.0, max_items=3)


def test_evaluation_reports_ease_under_its_bound_and_says_why_not_above_it():
    import pyarrow as pa

    from twotower_assets.defs.evaluation.assets import EvaluationConfig, evaluate

    train = _two_blocks()
    users, items = [f"u{n}" for n in range(5)], ["a", "b", "c", "d"]
    rows, cols = train.nonzero()
    training = pa.table({"user_id": [users[r] for r in rows], "item_id": [items[c] for c in cols], "events": [1] * len(rows)})
    test = pa.table({"user_id": ["u2", "u4"], "item_id": ["b", "c"], "events": [1, 1]})
    vectors = lambda ids, key: pa.table({key: ids, "embedding": [[1.0, float(n)] for n in range(len(ids))]})  # noqa: E731
    config = EvaluationConfig(ks=[1, 2], num_users=10, svd_factors=1, ease_regulariser=1.0)
    table, counts = evaluate(vectors(users, "user_id"), vectors(items, "item_id"), training, test, config)
    ease = table[(table["model"] == "ease") & (table["segment"] == "all")].set_index("k")
    # u2 (has a) gets b first, u4 (has d) gets c first (the weights above): both hit at k = 1.
    assert ease.loc[1, "recall"] == 1.0 and ease.loc[1, "precision"] == 1.0
    assert counts["ease"] == "evaluated"
    # Item-kNN is evaluated beside EASE too (the same hits as below: a~b, c~d).
    assert table[(table["model"] == "item_knn") & (table["segment"] == "all")].set_index("k").loc[1, "recall"] == 1.0

    table, counts = evaluate(vectors(users, "user_id"), vectors(items, "item_id"), training, test,
                             EvaluationConfig(ks=[1], num_users=10, svd_factors=1, ease_max_items=3))
    assert counts["ease"] == "left out: 4 items is above ease_max_items (3); item-kNN evaluated instead"
    assert "ease" not in set(table["model"]) and "item_knn" in set(table["model"])
    knn = table[(table["model"] == "item_knn") & (table["segment"] == "all")].set_index("k")
    # Cosines: a~b 2/sqrt(3*2), c~d 1/sqrt(1*2), nothing across the blocks: u2 (has a) gets b,
    # u4 (has d) gets c, both hits at k = 1.
    assert knn.loc[1, "recall"] == 1.0


def test_item_knn_similarities_and_recommendations_by_hand():
    train = sp.csr_matrix(np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 1, 1], [0, 1, 0, 1]], np.float32))
    # Item columns: 0 {u0, u1}, 1 {u0, u1, u3}, 2 {u1, u2}, 3 {u2, u3}. Cosines: 0~1 2/sqrt(6),
    # 0~2 1/2, 0~3 0, 1~2 1/sqrt(6), 1~3 1/sqrt(6), 2~3 1/2. Two neighbours per item (column).
    weights = metrics.item_knn_similarities(train, neighbours=2).toarray()
    c = 1 / np.sqrt(6)
    assert weights[:, 0] == pytest.approx([0, 2 * c, 0.5, 0])
    assert weights[:, 2] == pytest.approx([0.5, 0, 0, 0.5])
    assert weights[:, 3] == pytest.approx([0, c, 0.5, 0])
    assert np.count_nonzero(weights[:, 1]) == 2 and weights[0, 1] == pytest.approx(2 * c)  # b's tie: one of c, d
    assert weights[2, 1] == pytest.approx(c)  # the tie goes to the lower item row
    # Built one column at a time, or in uneven blocks, the weights are the same.
    for block_items in (1, 3):
        blocked = metrics.item_knn_similarities(train, neighbours=2, block_items=block_items).toarray()
        np.testing.assert_array_equal(blocked, weights)
    # With every neighbour kept: u2 has c and d, scores a 1/2, b 2/sqrt(6) (from c and d): b first.
    top = metrics.item_knn_recommendations(train, np.array([2]), 2, exclude=train[[2]], neighbours=3)
    assert top.tolist() == [[1, 0]]


def _item_knn_dense_reference(train, user_rows, k, exclude, neighbours):
    """Item-kNN ranked the plain way: every item scored (binary @ weights, densified), excluded
    items -inf, each row sorted stably by descending score, so ties go to the lower item index."""
    weights = metrics.item_knn_similarities(train, neighbours)
    binary = metrics._binary(train).astype(np.float32)
    scores = (binary[user_rows] @ weights).toarray()
    if exclude is not None:
        pairs = sp.coo_matrix(exclude)
        hit = pairs.data != 0
        scores[pairs.row[hit], pairs.col[hit]] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")
    return order[:, : min(k, train.shape[1])]


def _tied_train(rng, n_users, n_items):
    """A random binary matrix whose items repeat a few base columns (so cosines and scores
    tie), with one user who has no items."""
    base = rng.random((n_users, max(2, n_items // 3))) < 0.3
    dense = base[:, rng.integers(0, base.shape[1], size=n_items)].astype(np.float32)
    dense[rng.integers(n_users)] = 0
    return sp.csr_matrix(dense)


@pytest.mark.parametrize("seed", range(6))
def test_item_knn_recommendations_match_the_dense_ranking(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    n_users, n_items = int(rng.integers(3, 12)), int(rng.integers(2, 25))
    train = _tied_train(rng, n_users, n_items)
    user_rows = rng.permutation(n_users)[: max(1, n_users - 2)]
    user_rows = np.concatenate([user_rows, user_rows[:1]])  # a user asked for twice
    empty = int(np.flatnonzero(train.getnnz(axis=1) == 0)[0])
    user_rows = np.concatenate([user_rows, [empty]])
    # Excluded: each user's training items, a few random pairs, explicit zeros (not excluded),
    # and one user left with fewer unseen items than k (the -inf tail is ranked too).
    excluded = (train[user_rows] != 0).toarray().astype(np.float32)
    excluded[rng.random(excluded.shape) < 0.15] = 1
    excluded[0, : max(1, n_items - 2)] = 1
    exclude = sp.csr_matrix(excluded)
    exclude.data[rng.random(exclude.nnz) < 0.2] = 0  # stored zeros: not excluded
    for neighbours in (1, 3, 50):
        for k in sorted({1, 3, n_items - 1, n_items, n_items + 7} - {0}):
            for ex in (exclude, None, sp.csr_matrix(exclude.shape, dtype=np.float32)):
                expected = _item_knn_dense_reference(train, user_rows, k, ex, neighbours)
                for block_size in (1, 3, 2048):
                    got = metrics.item_knn_recommendations(
                        train, user_rows, k, exclude=ex, neighbours=neighbours, block_size=block_size
                    )
                    np.testing.assert_array_equal(got, expected, err_msg=f"{neighbours=} {k=} {block_size=}")
    # Blocks cut by the number of scores rather than of users give the same lists.
    monkeypatch.setattr(metrics, "_ITEM_KNN_BLOCK_SCORES", 5)
    got = metrics.item_knn_recommendations(train, user_rows, 4, exclude=exclude, neighbours=3)
    np.testing.assert_array_equal(got, _item_knn_dense_reference(train, user_rows, 4, exclude, 3))


def test_item_knn_recommendations_of_no_users_or_k_zero():
    train = _tied_train(np.random.default_rng(0), 5, 6)
    assert metrics.item_knn_recommendations(train, np.array([], np.int64), 3).shape == (0, 3)
    assert metrics.item_knn_recommendations(train, np.arange(5), 0).shape == (5, 0)
    assert metrics.item_knn_recommendations(train, np.arange(5), 10).shape == (5, 6)
