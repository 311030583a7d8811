"""Offline evaluation of a retrieval model against simple baselines.

Each evaluated user gets a ranked list drawn from the FULL catalogue (every item), with
the items that user already saw in training removed, and that list is compared with the
user's held-out test items. The baselines are random, popularity, and truncated SVD.

Scale: up to 50,000 evaluated users (and the recommendations asset: every user, 1M) x
200,000 items. No function builds a dense users x items matrix. Scores are float32
products of a block of users with the items. Seen items get ``-inf``. When k is small next
to the catalogue, a per-user threshold turns selection into one comparison per score
while a tile of scores is in cache (:func:`_top_k_thresholded`, exact); otherwise
``np.argpartition`` picks the top k of every row before only those k are sorted.

Ranked lists hold item column indices, best first. When a user has fewer than k items
left after exclusion, the tail of the list holds that user's excluded items (score
``-inf``), so every row still has k distinct items. At the scale above this never happens
(k is far smaller than the number of unseen items). Ties in score go to the lower item
index inside the top k. Which tied item makes it into the top k at the cut-off is not
fixed.

Metric definitions, as computed by :func:`ranking_metrics`:

* Only *counted* users enter any average. A counted user has at least one relevant (test)
  item, so rows of ``relevant`` with no non-zero entry are ignored by every metric,
  coverage and novelty included. Non-zero entries of ``relevant`` count as relevant,
  whatever their value.
* ``precision@k`` = hits in the top k / k, averaged over users.
* ``recall@k`` = hits in the top k / number of relevant items of the user, averaged over
  users.
* ``ndcg@k``: binary gains. DCG = sum over hit positions p (1-based) of 1 / log2(p + 1).
  IDCG is the same sum for min(k, |relevant|) hits at the top. Averaged over users.
* ``coverage@k`` = number of distinct items in any counted user's top k / n_items, where
  n_items = ``relevant.shape[1]``.
* ``novelty@k`` = mean over counted users of the mean over their top-k items of
  -log2(popularity[i]). ``popularity`` is the fraction of training users who interacted
  with the item. It is clipped to ``[floor, 1]``, where ``floor`` is the smallest positive
  value in ``item_popularity``, or 1e-12 if there is none. With popularity given as a
  fraction of training users, that floor is at least 1/(number of training users), and
  equals it whenever some item has exactly one training user. So an item never seen in
  training scores like the rarest seen item instead of infinity.

If no user is counted, the metric columns are NaN.

Pure numpy / scipy / pandas. No TensorFlow, no Dagster.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.sparse.linalg import svds
from threadpoolctl import threadpool_limits

__all__ = [
    "top_k_items",
    "random_recommendations",
    "popularity_recommendations",
    "svd_recommendations",
    "ranking_metrics",
    "evaluate_recommenders",
    "capped_ks",
    "METRIC_COLUMNS",
]

METRIC_COLUMNS = ["k", "precision", "recall", "ndcg", "coverage", "novelty"]

# The most entries argpartition handles in one call. Its int64 index output is 8 bytes an
# entry, so a 2048 x 200,000 block would need 3.3 GB at once. Each block is therefore
# partitioned a few rows at a time (about 32 MB of indices).
_ARGPARTITION_MAX_ELEMENTS = 1 << 22

_NOVELTY_FLOOR_FALLBACK = 1e-12


# --------------------------------------------------------------------------- helpers


def _check_k(k: int) -> int:
    k = int(k)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return k


def _check_block_size(block_size: int) -> int:
    block_size = int(block_size)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return block_size


def _as_exclude(exclude, n_users: int, n_items: int) -> sp.csr_matrix | None:
    """Make ``exclude`` a CSR matrix of shape (n_users, n_items), or None."""
    if exclude is None:
        return None
    if not sp.issparse(exclude):
        raise TypeError("exclude must be a scipy.sparse matrix (CSR) or None")
    exclude = sp.csr_matrix(exclude)
    if exclude.shape != (n_users, n_items):
        raise ValueError(
            f"exclude has shape {exclude.shape}, expected (n_users, n_items) = {(n_users, n_items)}"
        )
    return exclude


def _excluded_items(exclude: sp.csr_matrix, row: int) -> np.ndarray:
    """Item indices with a non-zero exclude entry in one row (explicit zeros do not count)."""
    lo, hi = exclude.indptr[row], exclude.indptr[row + 1]
    cols = exclude.indices[lo:hi]
    data = exclude.data[lo:hi]
    return np.unique(cols[data != 0])


def _mask_excluded(scores: np.ndarray, exclude: sp.csr_matrix, start: int) -> None:
    """Set ``scores[r, i] = -inf`` where ``exclude[start + r, i] != 0`` (in place)."""
    block = exclude[start : start + scores.shape[0]]
    if block.nnz == 0:
        return
    rows = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))
    keep = block.data != 0
    scores[rows[keep], block.indices[keep]] = -np.inf


def _top_k_of_scores(scores: np.ndarray, k: int) -> np.ndarray:
    """Top k column indices of each row of ``scores``, sorted by descending score.

    Ties inside the top k go to the lower item index.
    """
    n_rows, n_items = scores.shape
    if k >= n_items:
        top = np.broadcast_to(np.arange(n_items, dtype=np.int64), (n_rows, n_items)).copy()
    else:
        top = np.empty((n_rows, k), dtype=np.int64)
        kth = n_items - k
        step = max(1, _ARGPARTITION_MAX_ELEMENTS // n_items)
        for lo in range(0, n_rows, step):
            hi = min(lo + step, n_rows)
            top[lo:hi] = np.argpartition(scores[lo:hi], kth, axis=1)[:, kth:]
    top_scores = np.take_along_axis(scores, top, axis=1)
    # lexsort: last key is primary -> by descending score, then by ascending item index.
    order = np.lexsort((top, -top_scores), axis=-1)
    return np.take_along_axis(top, order, axis=1)


# ----------------------------------------------------------------------- ranking


def top_k_items(
    user_vectors: np.ndarray,
    item_vectors: np.ndarray,
    k: int,
    exclude: sp.csr_matrix | None = None,
    block_size: int = 2048,
    return_scores: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """(U, k) int64 item indices sorted by descending dot-product score; exclude[u, i] != 0 removes item i for user u. k is capped at the number of items.

    With ``return_scores``, also the (U, k) float32 scores of those items (-inf for excluded).

    Scores every item in the catalogue for each user, ``block_size`` users at a time with a
    float32 product, so memory stays at one (block_size, n_items) block. Excluded items
    score -inf. They show up only in the tail of a user who has fewer than k items left.

    When k is small next to the catalogue, the exact result comes from a threshold pass
    (:func:`_top_k_thresholded`) instead of partitioning every score: selecting from all
    n_items scores costs ~10x the product itself, filtering them costs a fraction of it.
    """
    user_vectors = np.asarray(user_vectors)
    item_vectors = np.asarray(item_vectors)
    if user_vectors.ndim != 2 or item_vectors.ndim != 2:
        raise ValueError("user_vectors and item_vectors must be 2-D")
    if user_vectors.shape[1] != item_vectors.shape[1]:
        raise ValueError(
            f"dimension mismatch: users have {user_vectors.shape[1]}, items have {item_vectors.shape[1]}"
        )
    n_users, n_items = user_vectors.shape[0], item_vectors.shape[0]
    k = min(_check_k(k), n_items)
    block_size = _check_block_size(block_size)
    exclude = _as_exclude(exclude, n_users, n_items)
    out = np.empty((n_users, k), dtype=np.int64)
    out_scores = np.empty((n_users, k), dtype=np.float32) if return_scores else None
    if k == 0 or n_users == 0:
        return (out, out_scores) if return_scores else out

    items32 = np.ascontiguousarray(item_vectors, dtype=np.float32)
    if not np.isfinite(items32).all():
        raise ValueError("item_vectors contain NaN or inf")
    if _threshold_sample_size(n_items, k) is not None:
        _top_k_thresholded(user_vectors, items32, k, exclude, block_size, out, out_scores)
    else:
        _top_k_dense(user_vectors, items32.T, k, exclude, block_size, np.arange(n_users), out, out_scores)
    return (out, out_scores) if return_scores else out


def _user_block(user_vectors: np.ndarray, rows: np.ndarray | slice) -> np.ndarray:
    users32 = np.ascontiguousarray(user_vectors[rows], dtype=np.float32)
    if not np.isfinite(users32).all():
        raise ValueError("user_vectors contain NaN or inf")
    return users32


def _top_k_dense(
    user_vectors: np.ndarray,
    items32_t: np.ndarray,
    k: int,
    exclude: sp.csr_matrix | None,
    block_size: int,
    user_rows: np.ndarray,
    out: np.ndarray,
    out_scores: np.ndarray | None = None,
) -> None:
    """Exact top k of the users at ``user_rows`` by partitioning every score; fills out[user_rows]."""
    n_items = items32_t.shape[1]
    # One score buffer reused by every block: a fresh 1.6 GB array per block costs page faults.
    buffer = np.empty((min(block_size, len(user_rows)), n_items), dtype=np.float32)
    for start in range(0, len(user_rows), block_size):
        rows = user_rows[start : start + block_size]
        scores = np.matmul(_user_block(user_vectors, rows), items32_t, out=buffer[: len(rows)])
        if exclude is not None:
            _mask_excluded(scores, exclude[rows], 0)
        top = _top_k_of_scores(scores, k)
        out[rows] = top
        if out_scores is not None:
            out_scores[rows] = np.take_along_axis(scores, top, axis=1)


# The threshold pass. A user's k best items all score at least the k-th best score, so any
# lower bound t on that score turns selection into a filter: keep the scores >= t (one
# comparison per score, done while a tile of scores is still in cache), then rank the few
# survivors. t is the m-th best score of the user over a random sample of the catalogue,
# sized so that about _CANDIDATES_PER_K * k of all items pass. A user with fewer than k
# survivors (t was too high: ~1e-3 of users with m = 8 and 4 k expected), or with
# far too many (ties, e.g. a zero vector), is redone exactly by _top_k_dense, so the result
# is always the exact top k.
_CANDIDATES_PER_K = 4
_SAMPLE_ORDER = 8  # m: the threshold is the 8th best sampled score
_OVERFLOW_FACTOR = 8  # a user with more than 8x the expected survivors is redone exactly
# (the threshold pass runs when the expected survivors are at most half the catalogue)
_TILE_ITEMS = 512  # a (1024 x 512) tile of float32 scores is 2 MB: compared while in cache
_THRESHOLD_BLOCK = 1024  # users per block (1024 x 64 @ 64 x 512 runs at ~the square-product rate)


def _threshold_sample_size(n_items: int, k: int) -> int | None:
    """Sampled items for the threshold, or None when the plain pass is as cheap."""
    expected = _CANDIDATES_PER_K * k
    if 2 * expected > n_items:
        return None
    return min(n_items, -(-_SAMPLE_ORDER * n_items // expected))


def _top_k_thresholded(
    user_vectors: np.ndarray,
    items32: np.ndarray,
    k: int,
    exclude: sp.csr_matrix | None,
    block_size: int,
    out: np.ndarray,
    out_scores: np.ndarray | None = None,
) -> np.ndarray:
    """Fills ``out`` (and ``out_scores``) with the exact top k; user blocks run on one thread per core.

    BLAS is held to one thread meanwhile: many small products on a multi-threaded BLAS
    spend about as much CPU synchronising its threads as multiplying (measured: 2x the CPU
    time of the same work on one BLAS thread per block and one block per core).
    """
    n_users, n_items = user_vectors.shape[0], items32.shape[0]
    sample_size = _threshold_sample_size(n_items, k)
    # A fixed sample: the result is exact whatever it is, the seed only fixes the cost.
    sample = np.sort(np.random.default_rng(0).choice(n_items, size=sample_size, replace=False))
    shared = _ThresholdInputs(
        user_vectors=user_vectors,
        k=k,
        exclude=exclude,
        sample_t=np.ascontiguousarray(items32[sample].T),
        sample_position=np.full(n_items, -1, dtype=np.int64),
        tiles=[
            (lo, np.ascontiguousarray(items32[lo : lo + _TILE_ITEMS].T))
            for lo in range(0, n_items, _TILE_ITEMS)
        ],
        row_cap=min(_OVERFLOW_FACTOR * _CANDIDATES_PER_K * k, n_items),
        out=out,
        out_scores=out_scores,
    )
    shared.sample_position[sample] = np.arange(sample_size)
    block_size = min(block_size, n_users, _THRESHOLD_BLOCK)
    starts = range(0, n_users, block_size)
    workers = min(len(starts), _WORKERS)
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
        redo = [rows for rows in pool.map(lambda start: _threshold_block(shared, start, min(start + block_size, n_users)), starts) if rows.size]
    if redo:
        _top_k_dense(user_vectors, items32.T, k, exclude, block_size, np.concatenate(redo), out, out_scores)
    return out


_WORKERS = max(1, os.cpu_count() or 1)


@dataclass
class _ThresholdInputs:
    """What every block of the threshold pass reads (and ``out``, which blocks write disjointly)."""

    user_vectors: np.ndarray
    k: int
    exclude: sp.csr_matrix | None
    sample_t: np.ndarray
    sample_position: np.ndarray
    tiles: list[tuple[int, np.ndarray]]
    row_cap: int
    out: np.ndarray
    out_scores: np.ndarray | None


def _threshold_block(shared: _ThresholdInputs, start: int, stop: int) -> np.ndarray:
    """Top k of users [start, stop) into shared.out; returns the users to redo exactly."""
    k, row_cap = shared.k, shared.row_cap
    users32 = _user_block(shared.user_vectors, slice(start, stop))
    n_rows = stop - start
    seen_rows, seen_items = _excluded_pairs(shared.exclude, start, stop)

    sample_scores = users32 @ shared.sample_t
    sample_size = sample_scores.shape[1]
    in_sample = shared.sample_position[seen_items]
    hit = in_sample >= 0
    sample_scores[seen_rows[hit], in_sample[hit]] = -np.inf
    order = min(_SAMPLE_ORDER, sample_size)
    threshold = np.partition(sample_scores, sample_size - order, axis=1)[:, sample_size - order, None]

    tile_width = shared.tiles[0][1].shape[1]
    n_items = shared.sample_position.size
    tile_buffer = np.empty((n_rows, tile_width), dtype=np.float32)
    mask_buffer = np.empty((n_rows, tile_width), dtype=bool)
    # A tile normally yields about n_rows * E * width / n_items candidates (E expected per
    # user). Only a tile with far more is counted per row, to find flooded rows.
    usual = max(256, 4 * n_rows * _CANDIDATES_PER_K * k * tile_width // n_items)
    flooded = np.zeros(n_rows, dtype=bool)
    # The block's seen pairs grouped by tile (sorted by item), so each tile masks its own few.
    by_item = np.argsort(seen_items, kind="stable")
    seen_rows, seen_items = seen_rows[by_item], seen_items[by_item]
    tile_starts = np.searchsorted(seen_items, [lo for lo, _ in shared.tiles] + [n_items])
    found_rows, found_items, found_scores = [], [], []
    for tile, (lo, tile_t) in enumerate(shared.tiles):
        width = tile_t.shape[1]
        # The hot loop: one product, one comparison, one scan per tile of scores.
        scores = np.matmul(users32, tile_t, out=tile_buffer[:, :width])
        first, last = tile_starts[tile], tile_starts[tile + 1]
        if last > first:
            scores[seen_rows[first:last], seen_items[first:last] - lo] = -np.inf
        flat = np.flatnonzero(np.greater_equal(scores, threshold, out=mask_buffer[:, :width]))
        many = flat.size > usual
        if flooded.any():
            flat = flat[~flooded[flat // width]]  # rows already given up on collect nothing more
        rows, columns = np.divmod(flat, width)
        found_rows.append(rows.astype(np.uint16))
        found_items.append(columns + lo)
        found_scores.append(scores.ravel()[flat])
        if many:
            # Ties flood a row (e.g. a zero vector): stop collecting it, redo it exactly.
            newly = (np.bincount(np.concatenate(found_rows), minlength=n_rows) > row_cap) & ~flooded
            if newly.any():
                flooded |= newly
                for i, rows_i in enumerate(found_rows):
                    keep = ~flooded[rows_i]
                    found_rows[i], found_items[i], found_scores[i] = rows_i[keep], found_items[i][keep], found_scores[i][keep]

    rows = np.concatenate(found_rows)
    items = np.concatenate(found_items)
    values = np.concatenate(found_scores)
    short = (np.bincount(rows, minlength=n_rows) < k) | flooded
    keep = ~short[rows]
    rows, items, values = rows[keep], items[keep], values[keep]
    if rows.size:
        # Each row's k-th best candidate score: one partition of the candidates laid side
        # by side (padded with -inf). The candidates at or above it are then sorted by
        # (row, descending score, ascending item) and each row's first k kept.
        by_row = np.argsort(rows, kind="stable")
        rows, items, values = rows[by_row], items[by_row], values[by_row]
        row_counts = np.bincount(rows, minlength=n_rows)
        row_starts = np.concatenate(([0], np.cumsum(row_counts)[:-1]))
        # A few rows have many more candidates than the rest (the count's spread is wide):
        # they get their own partition so they do not set the width of everyone's.
        heavy = row_counts > 2 * _CANDIDATES_PER_K * k
        light = ~heavy[rows]
        width = max(k, int(row_counts[~heavy].max(initial=0)))
        padded = np.full((n_rows, width), -np.inf, dtype=np.float32)
        padded[rows[light], (np.arange(rows.size) - row_starts[rows])[light]] = values[light]
        kth_best = np.partition(padded, width - k, axis=1)[:, width - k]
        for row in np.flatnonzero(heavy):
            own = values[row_starts[row] : row_starts[row] + row_counts[row]]
            kth_best[row] = np.partition(own, own.size - k)[own.size - k]
        top = values >= kth_best[rows]
        rows, items, values = rows[top], items[top], values[top]
        order = np.lexsort((items, -values, rows))
        items, values = items[order], values[order]
        row_starts = np.concatenate(([0], np.cumsum(np.bincount(rows, minlength=n_rows))[:-1]))
        done = np.flatnonzero(~short)
        first_k = row_starts[done][:, None] + np.arange(k)
        shared.out[start + done] = items[first_k]
        if shared.out_scores is not None:
            shared.out_scores[start + done] = values[first_k]
    return np.flatnonzero(short) + start


def _excluded_pairs(exclude: sp.csr_matrix | None, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """(row within the block, item) of every non-zero exclude entry of rows [start, stop)."""
    if exclude is None:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    block = exclude[start:stop]
    rows = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))
    keep = block.data != 0
    return rows[keep], block.indices[keep].astype(np.int64)


def random_recommendations(
    n_users: int,
    n_items: int,
    k: int,
    exclude=None,
    seed: int = 0,
    block_size=2048,
) -> np.ndarray:
    """(n_users, k) int64 items in uniformly random order, skipping each user's excluded items.

    The random baseline: any ranker worth keeping must beat it. For each user, this
    samples k + |excluded| distinct items without replacement, drops the excluded ones,
    and keeps the first k. That costs O(k) per user instead of O(n_items). One generator
    seeded with ``seed`` walks the users in order, so the result depends only on ``seed``.
    ``block_size`` is accepted so all recommenders share a signature. It does not change
    the result.
    """
    n_users, n_items = int(n_users), int(n_items)
    if n_users < 0 or n_items < 0:
        raise ValueError("n_users and n_items must be >= 0")
    k = min(_check_k(k), n_items)
    _check_block_size(block_size)
    exclude = _as_exclude(exclude, n_users, n_items)
    out = np.empty((n_users, k), dtype=np.int64)
    if k == 0 or n_users == 0:
        return out

    rng = np.random.default_rng(seed)
    flag = np.zeros(n_items, dtype=bool)
    for u in range(n_users):
        seen = _excluded_items(exclude, u) if exclude is not None else None
        n_seen = 0 if seen is None else seen.size
        sample = rng.choice(n_items, size=min(n_items, k + n_seen), replace=False, shuffle=True)
        if n_seen == 0:
            out[u] = sample[:k]
            continue
        flag[seen] = True
        is_seen = flag[sample]
        flag[seen] = False
        # Unseen items first. Seen ones fill the tail only when fewer than k are unseen
        # (then the sample is the whole catalogue).
        out[u] = np.concatenate((sample[~is_seen], sample[is_seen]))[:k]
    return out.astype(np.int64, copy=False)


def popularity_recommendations(
    item_counts: np.ndarray,
    n_users: int,
    k: int,
    exclude=None,
    block_size=2048,
) -> np.ndarray:
    """(n_users, k) int64 items ranked by descending ``item_counts``, skipping each user's excluded items.

    The most-popular baseline. Every user gets the same global ranking, with ties going to
    the lower item index and excluded items left out. That makes it O(k + |excluded|) per
    user, with no score matrix. ``block_size`` is accepted so all recommenders share a
    signature. It does not change the result.
    """
    counts = np.asarray(item_counts, dtype=np.float64).ravel()
    if not np.isfinite(counts).all():
        raise ValueError("item_counts contain NaN or inf")
    n_users, n_items = int(n_users), counts.size
    if n_users < 0:
        raise ValueError("n_users must be >= 0")
    k = min(_check_k(k), n_items)
    _check_block_size(block_size)
    exclude = _as_exclude(exclude, n_users, n_items)
    order = np.argsort(-counts, kind="stable").astype(np.int64)
    out = np.empty((n_users, k), dtype=np.int64)
    if k == 0 or n_users == 0:
        return out
    out[:] = order[:k]
    if exclude is None:
        return out

    rank = np.empty(n_items, dtype=np.int64)
    rank[order] = np.arange(n_items)
    for u in np.flatnonzero(np.diff(exclude.indptr)):
        seen = _excluded_items(exclude, u)
        if seen.size == 0:
            continue
        m = min(n_items, k + seen.size)
        seen_rank = rank[seen]
        keep = np.ones(m, dtype=bool)
        keep[seen_rank[seen_rank < m]] = False
        candidates = order[:m]
        # Fewer than k unseen items only when m == n_items: seen items fill the tail.
        out[u] = np.concatenate((candidates[keep], candidates[~keep]))[:k]
    return out


def svd_recommendations(
    train_matrix: sp.csr_matrix,
    user_rows: np.ndarray,
    k: int,
    exclude=None,
    n_factors: int = 100,
    seed: int = 0,
    block_size=2048,
) -> np.ndarray:
    """Truncated SVD (scipy.sparse.linalg.svds, n_factors capped at min(shape)-1) of the binary training user x item matrix (all training users); scores for the users at user_rows are U_s * S @ V^T.

    A classic collaborative-filtering baseline. The factorisation uses every training user,
    but only the ``user_rows`` users are ranked: user factors U_s * S against item factors
    V, through :func:`top_k_items`. ``exclude`` is aligned with ``user_rows``: its row j
    belongs to user ``user_rows[j]``. ``seed`` fixes ARPACK's start vector.
    """
    if not sp.issparse(train_matrix):
        raise TypeError("train_matrix must be a scipy.sparse matrix")
    binary = sp.csr_matrix(train_matrix, copy=True)
    binary.eliminate_zeros()
    binary.data = np.ones_like(binary.data, dtype=np.float64)
    binary = binary.astype(np.float64)
    user_rows = np.asarray(user_rows, dtype=np.int64).ravel()
    n_train_users, n_items = binary.shape
    if user_rows.size and (user_rows.min() < 0 or user_rows.max() >= n_train_users):
        raise ValueError("user_rows out of range of train_matrix rows")
    n_factors = min(int(n_factors), min(binary.shape) - 1)
    if n_factors < 1:
        raise ValueError(f"train_matrix of shape {binary.shape} is too small for a truncated SVD")

    # An explicit start vector keeps the result fixed by ``seed`` on every SciPy version.
    v0 = np.random.default_rng(seed).uniform(-1.0, 1.0, size=min(binary.shape))
    u, s, vt = svds(binary, k=n_factors, v0=v0)
    user_factors = (u[user_rows] * s).astype(np.float32)
    item_factors = np.ascontiguousarray(vt.T, dtype=np.float32)
    return top_k_items(user_factors, item_factors, k, exclude=exclude, block_size=block_size)


# ----------------------------------------------------------------------- metrics


def capped_ks(ks: Sequence[int], n_items: int) -> list[int]:
    """Sorted distinct ks with each k capped at n_items (e.g. [10,50,100] with 60 items -> [10,50,60]).

    A cut-off beyond the list length would just repeat the last row, so it is folded in.
    """
    n_items = int(n_items)
    if n_items < 1:
        raise ValueError(f"n_items must be >= 1, got {n_items}")
    ks = [int(k) for k in ks]
    if not ks:
        raise ValueError("ks must not be empty")
    if min(ks) < 1:
        raise ValueError(f"every k must be >= 1, got {ks}")
    return sorted({min(k, n_items) for k in ks})


def _novelty_information(item_popularity: np.ndarray) -> np.ndarray:
    """-log2 of popularity clipped to [smallest positive popularity (or 1e-12), 1]."""
    positive = item_popularity[item_popularity > 0]
    floor = float(positive.min()) if positive.size else _NOVELTY_FLOOR_FALLBACK
    return -np.log2(np.clip(item_popularity, floor, 1.0))


def ranking_metrics(
    recommended: np.ndarray,
    relevant: sp.csr_matrix,
    item_popularity: np.ndarray,
    ks: Sequence[int],
) -> pd.DataFrame:
    """recommended: (U, K) item indices sorted best first; relevant: (U, I) binary test matrix; item_popularity: (I,) fraction of training users who interacted with each item.
    Returns one row per k (k capped at K; duplicates after capping dropped), columns: k, precision, recall, ndcg, coverage, novelty.

    See the module docstring for the definitions. Only users with at least one relevant
    item count. Hits come from comparing each relevant (user, item) pair with that user's
    list, O(nnz * K), and every (U, K) temporary is made a chunk of users at a time, so
    50,000 users x k = 1000 need tens of MB, not GB.
    """
    recommended, relevant, popularity, ks_eff = _checked_ranking_inputs(
        recommended, relevant, item_popularity, ks
    )
    return _ranking_metrics(recommended, relevant, popularity, ks_eff)


# Users per chunk of the (users, K) temporaries of the metrics: 4096 x 1000 float64 = 32 MB.
_METRIC_CHUNK_USERS = 4096


def _checked_ranking_inputs(recommended, relevant, item_popularity, ks):
    recommended = np.asarray(recommended)
    if recommended.ndim != 2:
        raise ValueError("recommended must be 2-D (users x K)")
    if recommended.size and not np.issubdtype(recommended.dtype, np.integer):
        raise TypeError("recommended must hold integer item indices")
    if not recommended.size:
        recommended = recommended.astype(np.int64, copy=False)
    if not sp.issparse(relevant):
        raise TypeError("relevant must be a scipy.sparse matrix")
    relevant = sp.csr_matrix(relevant, copy=True)
    relevant.eliminate_zeros()
    relevant.sum_duplicates()
    n_users, big_k = recommended.shape
    if relevant.shape[0] != n_users:
        raise ValueError(f"recommended has {n_users} rows but relevant has {relevant.shape[0]}")
    n_items = relevant.shape[1]
    popularity = np.asarray(item_popularity, dtype=np.float64).ravel()
    if popularity.size != n_items:
        raise ValueError(f"item_popularity has {popularity.size} entries, expected {n_items}")
    if np.isnan(popularity).any() or (popularity < 0).any():
        raise ValueError("item_popularity must be non-negative and not NaN")
    if big_k == 0:
        raise ValueError("recommended has no columns")
    if recommended.size and (recommended.min() < 0 or recommended.max() >= n_items):
        raise ValueError("recommended holds item indices outside [0, n_items)")
    for lo in range(0, n_users, _METRIC_CHUNK_USERS):
        sorted_rec = np.sort(recommended[lo : lo + _METRIC_CHUNK_USERS], axis=1)
        if (sorted_rec[:, 1:] == sorted_rec[:, :-1]).any():
            raise ValueError("a recommended row repeats an item")
    return recommended, relevant, popularity, capped_ks(ks, big_k)


def _ranking_metrics(
    recommended: np.ndarray,
    relevant: sp.csr_matrix,
    popularity: np.ndarray,
    ks_eff: list[int],
    rows: np.ndarray | None = None,
) -> pd.DataFrame:
    """The metrics of checked inputs, over the user rows ``rows`` (all when None)."""
    if rows is not None:
        relevant = relevant[rows]
    else:
        rows = np.arange(recommended.shape[0])
    n_items = relevant.shape[1]
    big_k = recommended.shape[1]
    n_relevant = np.diff(relevant.indptr)
    counted = n_relevant > 0
    n_counted = int(counted.sum())
    if n_counted == 0:
        nan_rows = [
            {"k": k, "precision": np.nan, "recall": np.nan, "ndcg": np.nan,
             "coverage": np.nan, "novelty": np.nan}
            for k in ks_eff
        ]
        return pd.DataFrame(nan_rows, columns=METRIC_COLUMNS)
    counted_rows = rows[counted]  # rows of ``recommended`` that count, in order
    n_rel = n_relevant[counted].astype(np.float64)

    # Hits: the position of each relevant (user, item) pair in that user's list, if any.
    # A row holds no repeated item, so a pair hits at most once.
    pair_user = np.repeat(np.arange(n_counted), n_relevant[counted])  # index among counted
    pair_item = relevant.indices
    hit_user_parts, hit_position_parts = [], []
    chunk_pairs = max(1, (_METRIC_CHUNK_USERS * 1000) // big_k)
    for lo in range(0, pair_user.size, chunk_pairs):
        users = pair_user[lo : lo + chunk_pairs]
        pair, position = np.nonzero(recommended[counted_rows[users]] == pair_item[lo : lo + chunk_pairs, None])
        hit_user_parts.append(users[pair])
        hit_position_parts.append(position)
    hit_user = np.concatenate(hit_user_parts)
    hit_position = np.concatenate(hit_position_parts)
    # Each user's hits in list order: DCG then adds the discounts in the order of a cumsum.
    order = np.lexsort((hit_position, hit_user))
    hit_user, hit_position = hit_user[order], hit_position[order]

    discounts = 1.0 / np.log2(np.arange(2, big_k + 2, dtype=np.float64))
    cum_discounts = np.cumsum(discounts)
    information = _novelty_information(popularity)
    # Per user, the running sum of novelty information at each k (a cumsum per chunk).
    k_columns = np.asarray(ks_eff) - 1
    info_at_k = np.empty((n_counted, len(ks_eff)), dtype=np.float64)
    covered = np.zeros((len(ks_eff), n_items), dtype=bool)
    for lo in range(0, n_counted, _METRIC_CHUNK_USERS):
        chunk = recommended[counted_rows[lo : lo + _METRIC_CHUNK_USERS]]
        info_at_k[lo : lo + len(chunk)] = np.cumsum(information[chunk], axis=1)[:, k_columns]
        for j, k in enumerate(ks_eff):
            covered[j, chunk[:, :k].ravel()] = True

    result = []
    for j, k in enumerate(ks_eff):
        in_top = hit_position < k
        hits_k = np.bincount(hit_user[in_top], minlength=n_counted).astype(np.float64)
        dcg_k = np.bincount(hit_user[in_top], weights=discounts[hit_position[in_top]], minlength=n_counted)
        ideal_hits = np.minimum(k, n_rel).astype(np.int64)
        idcg = cum_discounts[ideal_hits - 1]
        result.append(
            {
                "k": k,
                "precision": float(np.mean(hits_k / k)),
                "recall": float(np.mean(hits_k / n_rel)),
                "ndcg": float(np.mean(dcg_k / idcg)),
                "coverage": float(covered[j].sum()) / n_items,
                "novelty": float(np.mean(info_at_k[:, j] / k)),
            }
        )
    frame = pd.DataFrame(result, columns=METRIC_COLUMNS)
    frame["k"] = frame["k"].astype(np.int64)
    return frame


def evaluate_recommenders(
    recommendations: Mapping[str, np.ndarray],
    relevant,
    item_popularity,
    ks,
    user_segments: np.ndarray | None = None,
) -> pd.DataFrame:
    """Long table: columns model, segment, k, precision, recall, ndcg, coverage, novelty. segment is 'all' plus, when user_segments (one label per user row) is given, one block of rows per distinct label.

    Every model's recommendations must be row-aligned with ``relevant``. Segment labels are
    written as strings, in sorted order, after 'all'. A label may not be 'all' itself.
    Inside a segment, coverage is still divided by the whole catalogue (relevant.shape[1]).
    """
    if not sp.issparse(relevant):
        raise TypeError("relevant must be a scipy.sparse matrix")
    relevant = sp.csr_matrix(relevant)
    n_users = relevant.shape[0]
    segments: list[tuple[str, np.ndarray | None]] = [("all", None)]
    if user_segments is not None:
        labels = np.asarray(user_segments)
        if labels.ndim != 1 or labels.shape[0] != n_users:
            raise ValueError(f"user_segments must hold one label per user row ({n_users})")
        for label in np.unique(labels):
            name = str(label)
            if name == "all":
                raise ValueError("'all' is reserved and cannot be a segment label")
            segments.append((name, np.flatnonzero(labels == label)))

    columns = ["model", "segment", *METRIC_COLUMNS]
    frames = []
    for model, recommended in recommendations.items():
        recommended = np.asarray(recommended)
        if recommended.ndim != 2 or recommended.shape[0] != n_users:
            raise ValueError(
                f"recommendations[{model!r}] must have {n_users} rows, got shape {recommended.shape}"
            )
        # Checked once per model; each segment is then a subset of rows, not a copy.
        checked, checked_relevant, popularity, ks_eff = _checked_ranking_inputs(
            recommended, relevant, item_popularity, ks
        )
        for name, rows in segments:
            frame = _ranking_metrics(checked, checked_relevant, popularity, ks_eff, rows)
            frame.insert(0, "segment", name)
            frame.insert(0, "model", str(model))
            frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True)[columns]
