"""Tests for twotower_assets.serving.ann_index: LanceDB item index against numpy brute force.

Real LanceDB tables in temporary directories (no mocks). The indexed cases use 20,000
items x 16 dims with ``min_rows_for_index`` lowered, so that a real IVF_PQ index is trained
in about two seconds; the exact cases use a FLAT table (below the threshold), whose results
must equal brute force exactly.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from helpers.processes import sigkill_once_started
from twotower_assets.serving.ann_index import ItemIndex, ItemIndexError


def clustered_unit_vectors(n: int, dim: int, centres: int, noise: float, seed: int) -> np.ndarray:
    """Unit vectors around `centres` random directions: shaped like trained embeddings."""
    rng = np.random.default_rng(seed)
    centre_vectors = np.random.default_rng(1000 + centres).standard_normal((centres, dim))
    centre_vectors /= np.linalg.norm(centre_vectors, axis=1, keepdims=True)
    vectors = centre_vectors[rng.integers(0, centres, n)] + noise / np.sqrt(dim) * rng.standard_normal((n, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def shuffled_ids(n: int, seed: int) -> np.ndarray:
    """Ids whose sorted order is not table order, so a tie-break by id is visible."""
    return np.array([f"item-{i:06d}" for i in np.random.default_rng(seed).permutation(n)])


def brute_force(ids, vectors, queries, k, exclude=None):
    """Reference: float64 dot products, excluded dropped, best first, ties by item id."""
    scores = np.asarray(queries, np.float64) @ np.asarray(vectors, np.float64).T
    results = []
    for i, row in enumerate(scores):
        keep = ~np.isin(ids, list(exclude[i])) if exclude is not None else np.ones(len(ids), bool)
        order = np.lexsort((ids[keep], -row[keep]))[:k]
        results.append((ids[keep][order].tolist(), row[keep][order].tolist()))
    return results


def assert_same_results(got, expected):
    assert len(got) == len(expected)
    for (got_ids, got_scores), (want_ids, want_scores) in zip(got, expected, strict=True):
        assert got_ids == want_ids
        # float64 sums in a different order (gemv vs gemm) may differ in the last bits only.
        np.testing.assert_allclose(got_scores, want_scores, rtol=0, atol=1e-12)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """A real IVF_PQ index of 20,000 clustered items x 16 dims, built with the defaults."""
    ids = shuffled_ids(20_000, seed=1)
    vectors = clustered_unit_vectors(20_000, 16, centres=200, noise=0.5, seed=2)
    uri = str(tmp_path_factory.mktemp("indexed") / "items")
    index = ItemIndex.build(uri, ids, vectors, min_rows_for_index=1_000)
    return index, ids, vectors


@pytest.fixture
def flat(tmp_path):
    """A FLAT (exact) table: 600 items x 8 dims, with exact duplicate vectors to tie on."""
    ids = shuffled_ids(600, seed=3)
    vectors = clustered_unit_vectors(600, 8, centres=20, noise=0.7, seed=4)
    vectors[100:110] = vectors[5]  # ten exact ties with item 5: ordered by id
    uri = str(tmp_path / "flat")
    return ItemIndex.build(uri, ids, vectors), ids, vectors, uri


# ---------------------------------------------------------------------- exact (FLAT)


def test_flat_index_equals_brute_force_exactly(flat):
    index, ids, vectors, _ = flat
    assert index.info()["index_type"] == "FLAT"
    queries = np.vstack([vectors[5], clustered_unit_vectors(15, 8, centres=20, noise=0.7, seed=5)])
    got = index.search(queries, k=20)
    assert_same_results(got, brute_force(ids, vectors, queries, 20))
    tied = sorted(ids[[5, *range(100, 110)]].tolist())
    assert got[0][0][:11] == tied  # the 11 identical vectors, best first, by id


def test_flat_exclude_removes_ids_and_still_returns_k(flat):
    index, ids, vectors, _ = flat
    queries = clustered_unit_vectors(6, 8, centres=20, noise=0.7, seed=6)
    best = brute_force(ids, vectors, queries, 10)
    exclude = [set(found[:5]) | {"not-an-item"} for found, _ in best]
    got = index.search(queries, k=10, exclude=exclude)
    assert_same_results(got, brute_force(ids, vectors, queries, 10, exclude))
    for (found, _), excluded in zip(got, exclude, strict=True):
        assert len(found) == 10 and not excluded & set(found)


def test_k_beyond_the_catalogue_returns_every_item_left(flat):
    index, ids, vectors, _ = flat
    query = vectors[:1]
    (found, scores), = index.search(query, k=1_000, exclude=[ids[:50].tolist()])
    assert len(found) == 550 and set(found) == set(ids[50:].tolist())
    assert scores == sorted(scores, reverse=True)


def test_search_rejects_wrong_shapes(flat):
    index, *_ = flat
    with pytest.raises(ValueError, match="8 dimensions"):
        index.search(np.ones((2, 7), np.float32), k=3)
    with pytest.raises(ValueError, match="k must be"):
        index.search(np.ones((2, 8), np.float32), k=0)
    with pytest.raises(ValueError, match="exclude has 1 entries for 2 queries"):
        index.search(np.ones((2, 8), np.float32), k=3, exclude=[[]])


# ---------------------------------------------------------------------- real IVF_PQ index


def test_ivf_pq_recall_against_brute_force(indexed):
    index, ids, vectors = indexed
    info = index.info()
    assert info["index_type"] == "IVF_PQ" and info["rows"] == 20_000 and info["dimension"] == 16
    assert info["num_partitions"] > 1 and info["nprobes"] < info["num_partitions"]
    queries = clustered_unit_vectors(200, 16, centres=200, noise=0.5, seed=7)
    got = index.search(queries, k=10)
    expected = brute_force(ids, vectors, queries, 10)
    recall = np.mean([len(set(g) & set(e)) / 10 for (g, _), (e, _) in zip(got, expected, strict=True)])
    assert recall >= 0.9, recall
    # Candidates are approximate, scores and order are not: exact dot products, best first.
    position = {item: i for i, item in enumerate(ids)}
    for query, (found, scores) in zip(queries, got, strict=True):
        assert len(found) == 10
        exact = vectors[[position[x] for x in found]].astype(np.float64) @ query.astype(np.float64)
        np.testing.assert_allclose(scores, exact, rtol=0, atol=1e-12)
        assert scores == sorted(scores, reverse=True)


def test_ivf_pq_exclude_removes_ids_and_still_returns_k(indexed):
    index, ids, vectors = indexed
    queries = clustered_unit_vectors(20, 16, centres=200, noise=0.5, seed=8)
    first = index.search(queries, k=10)
    exclude = [set(found[:7]) for found, _ in first]
    got = index.search(queries, k=10, exclude=exclude)
    for (found, _), (before, _), excluded in zip(got, first, exclude, strict=True):
        assert len(found) == 10 and not excluded & set(found)
        assert set(before[7:]) <= set(found)  # the next best are still found


def test_single_and_concurrent_searches_match_one_batched_search(indexed):
    index, _, _ = indexed
    queries = clustered_unit_vectors(40, 16, centres=200, noise=0.5, seed=9)
    batched = index.search(queries, k=10)
    one_by_one = [index.search(q, k=10)[0] for q in queries]
    assert one_by_one == batched
    concurrent: dict[int, tuple] = {}

    def worker(rows: range) -> None:
        for i in rows:
            concurrent[i] = index.search(queries[i : i + 1], k=10)[0]

    threads = [threading.Thread(target=worker, args=(range(s, 40, 2),)) for s in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [concurrent[i] for i in range(40)] == batched


def test_open_gives_back_ids_vectors_and_settings(indexed):
    index, ids, vectors = indexed
    reopened = ItemIndex.open(index.uri)
    assert reopened.info() == index.info()
    assert reopened.info()["size_bytes"] > vectors.nbytes  # the vectors, the ids and the index
    assert len(reopened) == 20_000 and reopened.dimension == 16
    assert reopened.item_ids.tolist() == ids.tolist()  # table order is build order
    picked = [ids[17], ids[0], ids[19_999], ids[17]]
    np.testing.assert_array_equal(reopened.vectors_of(picked), vectors[[17, 0, 19_999, 17]])
    assert reopened.vectors_of(picked).dtype == np.float32
    with pytest.raises(KeyError, match="no-such-item"):
        reopened.vectors_of([ids[0], "no-such-item"])


def test_ivf_hnsw_sq_index_recall_against_brute_force(tmp_path):
    ids = shuffled_ids(8_000, seed=13)
    vectors = clustered_unit_vectors(8_000, 16, centres=100, noise=0.5, seed=14)
    index = ItemIndex.build(str(tmp_path / "hnsw"), ids, vectors, index_type="IVF_HNSW_SQ", min_rows_for_index=1_000)
    assert index.info()["index_type"] == "IVF_HNSW_SQ" and index.info()["num_sub_vectors"] is None
    queries = clustered_unit_vectors(100, 16, centres=100, noise=0.5, seed=15)
    got = index.search(queries, k=10, exclude=[ids[:100].tolist()] * 100)
    expected = brute_force(ids, vectors, queries, 10, exclude=[set(ids[:100].tolist())] * 100)
    recall = np.mean([len(set(g) & set(e)) / 10 for (g, _), (e, _) in zip(got, expected, strict=True)])
    assert recall >= 0.9, recall
    assert ItemIndex.open(index.uri).info() == index.info()


# ---------------------------------------------------------------------- open errors


def test_open_missing_directory_names_the_path(tmp_path):
    missing = tmp_path / "never-built"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        ItemIndex.open(str(missing))
    assert not missing.exists()  # opening must not create it
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty")):
        ItemIndex.open(str(tmp_path / "empty"))


def test_open_corrupt_directory_names_the_path(flat):
    _, _, _, uri = flat
    for manifest in (Path(uri) / "items.lance" / "_versions").glob("*.manifest"):
        manifest.write_bytes(b"not a lance manifest")
    with pytest.raises(ItemIndexError, match=uri):
        ItemIndex.open(uri)


# ---------------------------------------------------------------------- failed builds


def _assert_unchanged(uri: str, ids, vectors) -> None:
    index = ItemIndex.open(uri)
    assert index.item_ids.tolist() == ids.tolist()
    np.testing.assert_array_equal(index.vectors_of(ids.tolist()), vectors)
    queries = vectors[:5]
    assert_same_results(index.search(queries, k=5), brute_force(ids, vectors, queries, 5))


def test_invalid_builds_raise_and_leave_the_previous_index(flat):
    _, ids, vectors, uri = flat
    with_nan = vectors.copy()
    with_nan[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ItemIndex.build(uri, ids, with_nan)
    with pytest.raises(ValueError, match="600 entries but vectors has 599 rows"):
        ItemIndex.build(uri, ids, vectors[:599])
    with pytest.raises(ValueError, match="duplicated"):
        ItemIndex.build(uri, np.array([*ids[:-1], ids[0]]), vectors)
    with pytest.raises(ValueError, match="more than the 600 items"):
        ItemIndex.build(uri, ids, vectors, num_partitions=601, min_rows_for_index=100)
    _assert_unchanged(uri, ids, vectors)


def test_build_failing_inside_lancedb_leaves_the_previous_index(flat):
    _, ids, vectors, uri = flat
    other = clustered_unit_vectors(600, 8, centres=20, noise=0.7, seed=10)
    # The new data is written (a new table version) before LanceDB rejects the index
    # settings: the published build must still be the old one.
    with pytest.raises(ItemIndexError, match=f"{uri}.*num_sub_vectors"):
        ItemIndex.build(uri, ids, other, num_partitions=2, num_sub_vectors=3, min_rows_for_index=100)
    _assert_unchanged(uri, ids, vectors)
    rebuilt = ItemIndex.build(uri, ids[:300], other[:300, :4] / np.linalg.norm(other[:300, :4], axis=1, keepdims=True))
    assert len(rebuilt) == 300 and rebuilt.dimension == 4  # a later build publishes normally


def test_build_killed_midway_leaves_the_previous_index(flat):
    """SIGKILL during the index training of a rebuild: readers still get the old build."""
    _, ids, vectors, uri = flat
    versions = Path(uri) / "items.lance" / "_versions"
    latest = max(2**64 - 1 - int(p.stem) for p in versions.glob("*.manifest"))
    # Lance names version v's manifest u64::MAX - v: the rebuild's data commit is latest + 1;
    # once it exists the writer is training the index (seconds at 60,000 x 16).
    data_commit = versions / f"{2**64 - 1 - (latest + 1)}.manifest"
    script = f"""
import numpy as np
from twotower_assets.serving.ann_index import ItemIndex
vectors = np.random.default_rng(11).standard_normal((60_000, 16)).astype(np.float32)
ids = np.array([f"new-{{i}}" for i in range(60_000)])
ItemIndex.build({uri!r}, ids, vectors, num_partitions=256, min_rows_for_index=1_000)
"""
    sigkill_once_started([sys.executable, "-c", script], data_commit, timeout_s=120)
    _assert_unchanged(uri, ids, vectors)
    # The half-written version left behind does not get in the way of the next build.
    replacement = clustered_unit_vectors(50, 8, centres=5, noise=0.7, seed=12)
    ItemIndex.build(uri, ids[:50], replacement)
    _assert_unchanged(uri, ids[:50], replacement)
