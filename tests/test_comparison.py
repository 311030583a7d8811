"""Model comparison figures against hand-computed values on tiny inputs."""

import numpy as np
import pytest

from twotower_assets.model.comparison import (
    Embeddings,
    aligned_change,
    common,
    compare_models,
    comparison_markdown,
    coverage,
    id_churn,
    jaccard_at_k,
    mean_popularity,
    neighbour_overlap,
    procrustes,
)
from twotower_assets.model.plots import histograms_png


def test_jaccard_at_k_per_user():
    old = np.array([["a", "b", "c"], ["a", "b", "c"], ["x", "y", "z"]])
    new = np.array([["b", "a", "d"], ["d", "e", "f"], ["x", "y", "z"]])
    # User 0: top-2 {a,b} vs {b,a} -> 1; top-3 {a,b,c} vs {a,b,d} -> 2/4.
    np.testing.assert_allclose(jaccard_at_k(old, new, 2), [1.0, 0.0, 1.0])
    np.testing.assert_allclose(jaccard_at_k(old, new, 3), [0.5, 0.0, 1.0])
    with pytest.raises(ValueError, match="users"):
        jaccard_at_k(old, new[:2], 2)


def test_id_churn_coverage_and_popularity():
    # New: {b, c, d, e}; old: {a, b, c}. New share 2/4, dropped share 1/3.
    assert id_churn(["a", "b", "c"], ["b", "c", "d", "e"]) == (0.5, pytest.approx(1 / 3))
    assert id_churn([], ["a"]) == (1.0, 0.0)
    recommended = np.array([["a", "b"], ["a", "c"]])
    assert coverage(recommended, 6) == 0.5  # a, b, c of 6
    # (0.5 + 0.2 + 0.5 + 0.0) / 4: c has no popularity.
    assert mean_popularity(recommended, {"a": 0.5, "b": 0.2}) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="empty"):
        coverage(recommended, 0)


def test_procrustes_undoes_a_rotation_and_reports_what_it_cannot_explain():
    rng = np.random.default_rng(0)
    new = rng.normal(size=(20, 3))
    theta = 0.7
    rotation = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    old = new @ rotation.T  # old = new rotated; old @ rotation = new
    found, residual = procrustes(old, new)
    np.testing.assert_allclose(found, rotation, atol=1e-10)
    assert residual == pytest.approx(0.0, abs=1e-10)
    np.testing.assert_allclose(aligned_change(old, new, found), 0.0, atol=1e-10)


def test_procrustes_residual_and_change_by_hand():
    # Old points (1,0) and (0,1); new points (1,0) and (0,-1): a reflection, which is
    # orthogonal, so the residual is 0. Then move one new point: new = (1,0), (0,2).
    found, residual = procrustes(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[1.0, 0.0], [0.0, -1.0]]))
    assert residual == pytest.approx(0.0, abs=1e-12)
    old, new = np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[1.0, 0.0], [0.0, 2.0]])
    found, residual = procrustes(old, new)
    # The best rotation of the identity onto diag(1, 2) is the identity: residual |(0,1)-(0,2)| / sqrt(5).
    np.testing.assert_allclose(found, np.eye(2), atol=1e-12)
    assert residual == pytest.approx(1 / np.sqrt(5))
    np.testing.assert_allclose(aligned_change(old, new, found), [0.0, 1.0], atol=1e-12)
    with pytest.raises(ValueError, match="shapes"):
        procrustes(np.zeros((2, 2)), np.zeros((2, 3)))


def test_neighbour_overlap_by_hand():
    # Four items on a line; by dot product of 1-D "vectors" the neighbours are the largest values.
    old = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    # New: item 0's nearest other is item 1 in both; item 2's nearest is 3 in old, 1 in new.
    new = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [-1.0, 0.0]])
    overlap = neighbour_overlap(old, new, np.array([0, 2]), k=1)
    np.testing.assert_allclose(overlap, [1.0, 0.0])
    # k is capped at the other items (3): every neighbourhood is all other items.
    np.testing.assert_allclose(neighbour_overlap(old, new, np.arange(4), k=50), 1.0)


def test_common_ids_with_their_rows():
    ids, old_rows, new_rows = common(np.array(["c", "a", "b"]), np.array(["b", "d", "c"]))
    assert ids.tolist() == ["b", "c"] and old_rows.tolist() == [2, 0] and new_rows.tolist() == [0, 2]


def test_compare_models_on_a_rotated_copy_agrees_everywhere_but_the_ids():
    rng = np.random.default_rng(1)
    users, items = rng.normal(size=(30, 4)), rng.normal(size=(12, 4))
    rotation, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    user_ids = np.array([f"u{i:02d}" for i in range(30)])
    item_ids = np.array([f"i{i:02d}" for i in range(12)])
    old = Embeddings(user_ids, users, item_ids, items)
    # The new model: the same space rotated, one user fewer, one new user (unknown to old).
    new = Embeddings(
        np.append(user_ids[1:], "u99"), np.vstack([users[1:], rng.normal(size=(1, 4))]) @ rotation,
        item_ids, items @ rotation,
    )
    popularity = {item: 1 / 12 for item in item_ids}
    result = compare_models(old, new, popularity, ks=(3, 10), neighbour_k=5)
    s = result.summary
    assert s["compared_users"] == 29
    assert s["jaccard_at_3"] == pytest.approx(1.0) and s["jaccard_at_10"] == pytest.approx(1.0)
    assert s["item_neighbour_overlap_at_5"] == pytest.approx(1.0)
    assert s["procrustes_residual"] == pytest.approx(0.0, abs=1e-9)
    assert s["user_change_p90"] == pytest.approx(0.0, abs=1e-9)
    assert s["share_new_users"] == pytest.approx(1 / 30) and s["share_dropped_users"] == pytest.approx(1 / 30)
    assert s["share_new_items"] == 0.0 and s["share_dropped_items"] == 0.0
    # Same rankings, so the same coverage; 29 users' top 10 of 12 items reach every item.
    assert s["old_coverage_at_10"] == s["new_coverage_at_10"] == 1.0
    assert s["old_mean_popularity_at_10"] == pytest.approx(1 / 12)
    markdown = comparison_markdown(s, "2026-06-01", "2026-06-08")
    assert "| coverage_at_10 | 1.0000 | 1.0000 |" in markdown and "| jaccard_at_3 | 1.0000 |" in markdown
    assert histograms_png({"jaccard@3": result.jaccard[3]}, "Jaccard", "t").startswith(b"\x89PNG")


def test_compare_models_of_different_sizes_skips_the_alignment():
    rng = np.random.default_rng(2)
    ids = np.array(["a", "b", "c"])
    old = Embeddings(ids, rng.normal(size=(3, 2)), ids, rng.normal(size=(3, 2)))
    new = Embeddings(ids, rng.normal(size=(3, 3)), ids, rng.normal(size=(3, 3)))
    s = compare_models(old, new, {}, ks=(1, 2), neighbour_k=1).summary
    assert np.isnan(s["procrustes_residual"]) and "user_change_p50" not in s
