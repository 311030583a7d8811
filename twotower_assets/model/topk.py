"""Exact top-k items by dot product for many users over a large catalogue, seen items excluded.

Used by the model evaluation, the SVD baseline, the recommendations and the similar-items
(vector search) assets. Scale: up to 1M users (the recommendations asset: every user) x
200,000 items. No function builds a dense users x items matrix. Scores are float32 products
of a block of users with the items. Excluded items get ``-inf``. When k is small next to the
catalogue, a per-user threshold turns selection into one comparison per score while a tile
of scores is in cache (:func:`_top_k_thresholded`, exact); otherwise ``np.argpartition``
picks the top k of every row before only those k are sorted.

Ranked lists hold item column indices, best first. When a user has fewer than k items left
after exclusion, the tail of the list holds that user's excluded items (score ``-inf``), so
every row still has k distinct items. At the scale above this never happens (k is far
smaller than the number of unseen items). Ties in score go to the lower item index inside
the top k. Which tied item makes it into the top k at the cut-off is not fixed.

Pure numpy / scipy. No TensorFlow, no Dagster.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

__all__ = ["top_k_items", "check_k", "check_block_size", "as_exclude_matrix"]

# The most entries argpartition handles in one call. Its int64 index output is 8 bytes an
# entry, so a 2048 x 200,000 block would need 3.3 GB at once. Each block is therefore
# partitioned a few rows at a time (about 32 MB of indices).
_ARGPARTITION_MAX_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------- inputs
# Public because every recommender (the baselines in metrics.py too) checks its inputs the same way.


def check_k(k: int) -> int:
    """k as an int; a negative k is a ValueError."""
    k = int(k)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return k


def check_block_size(block_size: int) -> int:
    """block_size as an int; below 1 is a ValueError."""
    block_size = int(block_size)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return block_size


def as_exclude_matrix(exclude, n_users: int, n_items: int) -> sp.csr_matrix | None:
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


# ----------------------------------------------------------------------- scoring


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
    k = min(check_k(k), n_items)
    block_size = check_block_size(block_size)
    exclude = as_exclude_matrix(exclude, n_users, n_items)
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
