"""What changed between two trained models (a new date's and the champion before it).

Two trainings' vector spaces are not aligned: any rotation of both towers scores the same, so
comparing a user's old and new vectors directly measures the rotation, not the change. This
module therefore compares what the models *do* (the items they recommend, each item's
neighbours) and, for the vectors themselves, first aligns the old space onto the new one with
an orthogonal Procrustes rotation (:func:`procrustes`) and reports what the rotation cannot
explain (the residual) and each user's remaining change.

Definitions (the tests check them against hand-computed values):

* ``jaccard_at_k``: per user, |A_k ∩ B_k| / |A_k ∪ B_k| of the two models' top-k items.
* ``neighbour_overlap``: per item, |N_a ∩ N_b| / k, where N is the item's k nearest other
  items (dot product) among the items both models know.
* ``procrustes``: the orthogonal R minimising ||A R - B||_F (scipy); residual
  ||A R - B||_F / ||B||_F (0: the spaces differ by a rotation only).
* ``coverage``: distinct recommended items / catalogue size.
* ``mean_popularity``: mean popularity (share of training events) of the recommended items,
  over every (user, slot); higher means recommendations lean to popular items.
* ``id_churn``: share of the new ids not in the old model, and of the old ids not in the new.

Pure numpy / scipy. No TensorFlow, no Dagster.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.linalg import orthogonal_procrustes

from twotower_assets.model.topk import top_k_items


def jaccard_at_k(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Per row, Jaccard similarity of the first ``k`` entries of ``a`` and of ``b`` (item ids,
    best first, one row per user in the same order). A row whose two lists are both empty is 1."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"the two recommendation lists cover {a.shape[0]} and {b.shape[0]} users")
    out = np.empty(a.shape[0], dtype=np.float64)
    for row, (left, right) in enumerate(zip(a[:, :k], b[:, :k])):
        left, right = set(left.tolist()), set(right.tolist())
        union = left | right
        out[row] = len(left & right) / len(union) if union else 1.0
    return out


def id_churn(old_ids: Sequence, new_ids: Sequence) -> tuple[float, float]:
    """(share of ``new_ids`` not in ``old_ids``, share of ``old_ids`` not in ``new_ids``)."""
    old, new = set(old_ids), set(new_ids)
    return (len(new - old) / len(new) if new else 0.0, len(old - new) / len(old) if old else 0.0)


def coverage(recommended_ids: np.ndarray, catalogue_size: int) -> float:
    """Distinct recommended items / ``catalogue_size``."""
    if catalogue_size <= 0:
        raise ValueError("the catalogue is empty")
    return len(np.unique(np.asarray(recommended_ids))) / catalogue_size


def mean_popularity(recommended_ids: np.ndarray, popularity: Mapping[str, float]) -> float:
    """Mean popularity of every recommended (user, slot); items without a popularity count 0."""
    values = [popularity.get(item, 0.0) for item in np.asarray(recommended_ids).ravel().tolist()]
    return float(np.mean(values)) if values else float("nan")


def procrustes(old: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, float]:
    """The rotation R aligning ``old`` rows onto ``new`` rows (same ids, same order), and the
    relative residual ||old R - new||_F / ||new||_F."""
    old, new = np.asarray(old, np.float64), np.asarray(new, np.float64)
    if old.shape != new.shape:
        raise ValueError(f"cannot align vectors of shapes {old.shape} and {new.shape}")
    rotation, _ = orthogonal_procrustes(old, new)
    norm = np.linalg.norm(new)
    return rotation, float(np.linalg.norm(old @ rotation - new) / norm) if norm else 0.0


def aligned_change(old: np.ndarray, new: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """Per row, ||old R - new||: how far each vector moved once the rotation is taken out."""
    return np.linalg.norm(np.asarray(old, np.float64) @ rotation - np.asarray(new, np.float64), axis=1)


def neighbours(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """(len(queries), k) indices of each query row's ``k`` highest-scoring other rows."""
    exclude = sp.csr_matrix(
        (np.ones(len(queries)), (np.arange(len(queries)), queries)), shape=(len(queries), len(vectors))
    )
    return top_k_items(np.asarray(vectors)[queries], vectors, min(k, len(vectors) - 1), exclude=exclude)


def neighbour_overlap(old: np.ndarray, new: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Per query row, the share of its ``k`` nearest neighbours both models agree on.

    ``old`` and ``new`` hold the same items in the same order (the items both models know), so
    neighbourhoods are compared by row index, and no alignment is needed.
    """
    k = min(k, len(old) - 1)
    if k <= 0:
        return np.full(len(queries), np.nan)
    a, b = neighbours(old, queries, k), neighbours(new, queries, k)
    return np.array([len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(a, b)])


def common(old_ids: np.ndarray, new_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ids both arrays hold (sorted), with their row in ``old_ids`` and in ``new_ids``."""
    shared, old_rows, new_rows = np.intersect1d(np.asarray(old_ids), np.asarray(new_ids), return_indices=True)
    return shared, old_rows, new_rows


@dataclass(frozen=True)
class Embeddings:
    """One model's vectors: user ids, user vectors, item ids, item vectors (rows aligned)."""

    user_ids: np.ndarray
    user_vectors: np.ndarray
    item_ids: np.ndarray
    item_vectors: np.ndarray


@dataclass
class ModelComparison:
    """The comparison of a new model with an old one, per user and per item, and summed up."""

    summary: dict[str, float]
    jaccard: dict[int, np.ndarray]
    neighbour_overlap: np.ndarray
    user_change: np.ndarray


QUANTILES = (0.1, 0.5, 0.9)


def compare_models(
    old: Embeddings,
    new: Embeddings,
    popularity: Mapping[str, float],
    ks: Sequence[int] = (10, 100),
    neighbour_k: int = 50,
    max_users: int = 5_000,
    max_items: int = 2_000,
    seed: int = 0,
) -> ModelComparison:
    """Compare ``new`` with ``old`` on at most ``max_users`` shared users (a seeded sample)
    and ``max_items`` shared query items; each model recommends from its own catalogue."""
    rng = np.random.default_rng(seed)
    summary: dict[str, float] = {}
    summary["share_new_users"], summary["share_dropped_users"] = id_churn(old.user_ids, new.user_ids)
    summary["share_new_items"], summary["share_dropped_items"] = id_churn(old.item_ids, new.item_ids)

    users, old_user_rows, new_user_rows = common(old.user_ids, new.user_ids)
    if len(users) > max_users:
        pick = np.sort(rng.choice(len(users), max_users, replace=False))
        users, old_user_rows, new_user_rows = users[pick], old_user_rows[pick], new_user_rows[pick]
    summary["compared_users"] = float(len(users))
    k_max = max(ks)
    old_top = np.asarray(old.item_ids)[top_k_items(old.user_vectors[old_user_rows], old.item_vectors, k_max)]
    new_top = np.asarray(new.item_ids)[top_k_items(new.user_vectors[new_user_rows], new.item_vectors, k_max)]
    jaccard = {k: jaccard_at_k(old_top, new_top, k) for k in ks}
    for k, values in jaccard.items():
        summary[f"jaccard_at_{k}"] = float(values.mean()) if len(values) else float("nan")
    for name, top, model in (("old", old_top, old), ("new", new_top, new)):
        summary[f"{name}_coverage_at_{k_max}"] = coverage(top, len(model.item_ids)) if len(top) else float("nan")
        summary[f"{name}_mean_popularity_at_{k_max}"] = mean_popularity(top, popularity)

    items, old_item_rows, new_item_rows = common(old.item_ids, new.item_ids)
    queries = np.arange(len(items))
    if len(queries) > max_items:
        queries = np.sort(rng.choice(len(items), max_items, replace=False))
    overlap = neighbour_overlap(old.item_vectors[old_item_rows], new.item_vectors[new_item_rows], queries, neighbour_k)
    summary[f"item_neighbour_overlap_at_{neighbour_k}"] = float(np.nanmean(overlap)) if len(overlap) else float("nan")

    change = np.array([])
    same_size = old.user_vectors.shape[1] == new.user_vectors.shape[1]
    if same_size and len(users) >= 2 and len(items) >= 2:
        # One rotation for both towers: scores are dot products of user and item vectors, so
        # a change of basis that keeps scores rotates users and items alike.
        rotation, residual = procrustes(
            np.vstack([old.user_vectors[old_user_rows], old.item_vectors[old_item_rows]]),
            np.vstack([new.user_vectors[new_user_rows], new.item_vectors[new_item_rows]]),
        )
        summary["procrustes_residual"] = residual
        change = aligned_change(old.user_vectors[old_user_rows], new.user_vectors[new_user_rows], rotation)
        for q in QUANTILES:
            summary[f"user_change_p{int(q * 100)}"] = float(np.quantile(change, q))
    else:
        summary["procrustes_residual"] = float("nan")
    return ModelComparison(summary=summary, jaccard=jaccard, neighbour_overlap=overlap, user_change=change)


def comparison_markdown(summary: Mapping[str, float], old_label: str, new_label: str) -> str:
    """The summary as a two-column markdown table (old vs new where a figure has both)."""
    paired = sorted({key[4:] for key in summary if key.startswith(("old_", "new_"))})
    lines = [f"| figure | {old_label} | {new_label} |", "|---|---|---|"]
    for name in paired:
        lines.append(f"| {name} | {summary.get('old_' + name, float('nan')):.4f} | {summary.get('new_' + name, float('nan')):.4f} |")
    lines += ["", "| change | value |", "|---|---|"]
    for key, value in summary.items():
        if not key.startswith(("old_", "new_")):
            lines.append(f"| {key} | {value:.4f} |")
    return "\n".join(lines)
