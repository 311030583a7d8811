"""ItemIndex.search with allowed masks and exact scans, on a real IVF_PQ index, against an
independent numpy top k: filters are applied before the top k is cut, on both the exact and
the ANN path."""

from __future__ import annotations

import numpy as np
import pytest

from twotower_assets.serving.ann_index import ItemIndex

ITEMS, DIM, K = 3_000, 16, 10


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(ITEMS, DIM)).astype(np.float32)
    item_ids = np.array([f"item{i:05d}" for i in range(ITEMS)])
    index = ItemIndex.build(
        str(tmp_path_factory.mktemp("filters") / "index"), item_ids, vectors,
        # Every partition probed: recall then depends on the PQ ranking and the candidate count
        # alone, which a k-means seed does not move much (4 of 24 gave 0.6-0.7 run to run).
        min_rows_for_index=1_000, num_partitions=24, nprobes=24,
    )
    queries = rng.normal(size=(20, DIM)).astype(np.float32)
    return index, item_ids, vectors, queries


def numpy_top_k(vectors, item_ids, query, k, allowed=None, excluded=()):
    scores = vectors.astype(np.float64) @ query.astype(np.float64)
    keep = np.ones(len(item_ids), bool) if allowed is None else allowed.copy()
    keep[[i for i, x in enumerate(item_ids) if x in set(excluded)]] = False
    order = sorted(np.flatnonzero(keep), key=lambda i: (-scores[i], item_ids[i]))[:k]
    return [str(item_ids[i]) for i in order], [float(scores[i]) for i in order]


def test_exact_search_is_numpys_top_k_even_with_an_ann_index(data):
    index, item_ids, vectors, queries = data
    assert index.info()["index_type"] == "IVF_PQ"
    found = index.search(queries, K, exact=True)
    for query, (ids, scores) in zip(queries, found):
        expected_ids, expected_scores = numpy_top_k(vectors, item_ids, query, K)
        assert ids == expected_ids
        np.testing.assert_allclose(scores, expected_scores, rtol=1e-6)


@pytest.fixture(scope="module")
def one_probe_index(data, tmp_path_factory):
    """The same items, probing 1 of 24 partitions: its candidates are ~125 items."""
    _, item_ids, vectors, _ = data
    return ItemIndex.build(str(tmp_path_factory.mktemp("one-probe") / "index"), item_ids, vectors,
                           min_rows_for_index=1_000, num_partitions=24, nprobes=1)


@pytest.mark.parametrize("path", ["exact", "ann", "ann probing one partition"])
def test_a_narrow_filter_still_gives_k_items_the_exact_ones(data, one_probe_index, path):
    # 25 allowed items: one probed partition holds one or two of them, so the ANN path must
    # rescan the allowed items to fill k.
    index, item_ids, vectors, queries = data
    exact = path == "exact"
    if path == "ann probing one partition":
        index = one_probe_index
    allowed = np.zeros(ITEMS, bool)
    allowed[np.random.default_rng(1).choice(ITEMS, 25, replace=False)] = True
    excluded = [str(item_ids[np.flatnonzero(allowed)[0]])]
    found = index.search(queries, K, [excluded] * len(queries), allowed=[allowed] * len(queries), exact=exact)
    for query, (ids, scores) in zip(queries, found):
        expected_ids, expected_scores = numpy_top_k(vectors, item_ids, query, K, allowed, excluded)
        assert ids == expected_ids
        np.testing.assert_allclose(scores, expected_scores, rtol=1e-6)


def test_fewer_than_k_only_when_fewer_are_allowed_and_a_query_without_a_mask_is_unfiltered(data):
    index, item_ids, vectors, queries = data
    allowed = np.zeros(ITEMS, bool)
    allowed[[3, 30, 300]] = True
    filtered, unfiltered = index.search(queries[:2], K, allowed=[allowed, None], exact=True)
    assert sorted(filtered[0]) == sorted(str(item_ids[i]) for i in (3, 30, 300))
    assert unfiltered[0] == numpy_top_k(vectors, item_ids, queries[1], K)[0]


def test_a_broad_filter_on_the_ann_path_returns_allowed_items_at_the_unfiltered_recall(data):
    # Half the items allowed: the index is asked for twice the candidates, so the filtered
    # answer finds about as many of its true top k as an unfiltered one does.
    index, item_ids, vectors, queries = data
    allowed = np.arange(ITEMS) % 2 == 0
    position = {x: i for i, x in enumerate(item_ids)}

    def recall(masks):
        found = index.search(queries, K, allowed=masks)
        hits = 0
        for i, (query, (ids, _)) in enumerate(zip(queries, found)):
            mask = masks[i] if masks else None
            assert len(ids) == K and (mask is None or all(mask[position[x]] for x in ids))
            hits += len(set(ids) & set(numpy_top_k(vectors, item_ids, query, K, mask)[0]))
        return hits / (K * len(queries))

    assert recall([allowed] * len(queries)) >= recall(None) - 0.05


def test_a_mask_of_the_wrong_shape_is_refused(data):
    index, _, _, queries = data
    with pytest.raises(ValueError, match=r"an allowed mask must be a boolean array of the catalogue's 3000 items, got bool \(10,\)"):
        index.search(queries[:1], K, allowed=[np.ones(10, bool)])
    with pytest.raises(ValueError, match=r"allowed has 2 entries for 1 queries"):
        index.search(queries[:1], K, allowed=[None, None])


def test_the_single_query_path_answers_what_the_batch_path_answers(data):
    index, item_ids, vectors, queries = data
    rng = np.random.default_rng(3)
    for i, query in enumerate(queries):
        excluded = [str(x) for x in rng.choice(item_ids, 5, replace=False)] + ["not-an-item"]
        allowed = None if i % 2 else rng.random(ITEMS) < 0.3
        for k in (1, K, 100):
            [expected] = index.search(query, k, [excluded], allowed=[allowed], exact=True)
            assert index.exact_one(query, k, index.positions_of(excluded), allowed) == expected
    nothing = np.zeros(ITEMS, bool)
    assert index.exact_one(queries[0], K, index.positions_of([]), nothing) == ([], [])
