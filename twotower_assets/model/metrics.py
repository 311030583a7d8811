"""Offline evaluation of a retrieval model against simple baselines.

Each evaluated user gets a ranked list drawn from the FULL catalogue (every item), with
the items that user already saw in training removed, and that list is compared with the
user's held-out test items. The baselines are random, popularity, and truncated SVD; the
model's lists and SVD's come from :func:`twotower_assets.model.topk.top_k_items` (ranked
lists: item indices best first, ties to the lower index, excluded items only in the tail
of a user with fewer than k unseen items).

Scale: up to 50,000 evaluated users x 200,000 items. No function builds a dense users x
items matrix.

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

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.linalg
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator, eigsh, svds

from twotower_assets.model.topk import (
    as_exclude_matrix,
    check_block_size,
    check_k,
    top_k_items,
)

__all__ = [
    "random_recommendations",
    "popularity_recommendations",
    "svd_recommendations",
    "ease_item_weights",
    "ease_recommendations",
    "EASE_MAX_ITEMS",
    "item_knn_similarities",
    "item_knn_recommendations",
    "ranking_metrics",
    "evaluate_recommenders",
    "capped_ks",
    "METRIC_COLUMNS",
]

METRIC_COLUMNS = ["k", "precision", "recall", "ndcg", "coverage", "novelty"]

_NOVELTY_FLOOR_FALLBACK = 1e-12


# --------------------------------------------------------------------------- baselines


def _excluded_items(exclude: sp.csr_matrix, row: int) -> np.ndarray:
    """Item indices with a non-zero exclude entry in one row (explicit zeros do not count)."""
    lo, hi = exclude.indptr[row], exclude.indptr[row + 1]
    cols = exclude.indices[lo:hi]
    data = exclude.data[lo:hi]
    return np.unique(cols[data != 0])


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
    k = min(check_k(k), n_items)
    check_block_size(block_size)
    exclude = as_exclude_matrix(exclude, n_users, n_items)
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
    k = min(check_k(k), n_items)
    check_block_size(block_size)
    exclude = as_exclude_matrix(exclude, n_users, n_items)
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


def _binary(train_matrix) -> sp.csr_matrix:
    """The training matrix as float64 CSR with every stored non-zero set to 1 (explicit zeros dropped)."""
    binary = sp.csr_matrix(train_matrix, copy=True)
    binary.eliminate_zeros()
    binary.data = np.ones_like(binary.data, dtype=np.float64)
    return binary.astype(np.float64)


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
    binary = _binary(train_matrix)
    user_rows = np.asarray(user_rows, dtype=np.int64).ravel()
    n_train_users, n_items = binary.shape
    if user_rows.size and (user_rows.min() < 0 or user_rows.max() >= n_train_users):
        raise ValueError("user_rows out of range of train_matrix rows")
    n_factors = min(int(n_factors), min(binary.shape) - 1)
    if n_factors < 1:
        raise ValueError(f"train_matrix of shape {binary.shape} is too small for a truncated SVD")

    # An explicit start vector keeps the result fixed by ``seed`` on every SciPy version.
    v0 = np.random.default_rng(seed).uniform(-1.0, 1.0, size=min(binary.shape))
    if n_items <= n_train_users:
        user_factors, item_factors = _svd_factors_from_item_gram(binary, user_rows, n_factors, v0)
    else:
        u, s, vt = svds(binary, k=n_factors, v0=v0)
        user_factors = (u[user_rows] * s).astype(np.float32)
        item_factors = np.ascontiguousarray(vt.T, dtype=np.float32)
    return top_k_items(user_factors, item_factors, k, exclude=exclude, block_size=block_size)


def _svd_factors_from_item_gram(
    binary: sp.csr_matrix, user_rows: np.ndarray, n_factors: int, v0: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(U_s S, V) of the truncated SVD X = U S V^T, without an (all users x factors) matrix.

    ``svds`` finds V as the top eigenvectors of X^T X (what is done here, the same ARPACK
    call) but then forms X V and U for every training user: two dense (users x factors)
    float64 matrices, 1.4 GB for 876k users and 100 factors, to score only the sampled users.
    Since U S = X V, the sampled users' factors are X[user_rows] V, and the scores
    U_s S V^T = X_s V V^T are the ones ``svds``' factors give.
    """
    n_items = binary.shape[1]
    transposed = binary.T.tocsr()

    def gram(vectors: np.ndarray) -> np.ndarray:
        return transposed @ (binary @ vectors)

    operator = LinearOperator((n_items, n_items), matvec=gram, matmat=gram, rmatvec=gram, dtype=np.float64)
    _, vectors = eigsh(operator, k=n_factors, tol=0, v0=v0)
    # ARPACK's eigenvectors are not exactly orthonormal for clustered eigenvalues (as in svds).
    vectors, _ = np.linalg.qr(vectors)
    user_factors = np.asarray(binary[user_rows] @ vectors, dtype=np.float32)
    return user_factors, np.ascontiguousarray(vectors, dtype=np.float32)


EASE_MAX_ITEMS = 10_000
"""The largest catalogue EASE is computed for. EASE inverts a dense items x items matrix:
at 10,000 items that is 800 MB of float64 and ~1 TFLOP (seconds on 2 cores); at production's
200,000 items it would be 320 GB, so the evaluation leaves EASE out above this bound."""


def ease_item_weights(train_matrix: sp.csr_matrix, regulariser: float = 500.0) -> np.ndarray:
    """EASE's item-item weights (Steck 2019): B = I - P diag(1/diag P), P = (X'X + lambda I)^-1.

    X is the binary training user x item matrix. B has a zero diagonal (an item may not
    recommend itself), and a user's scores are x_u B. The closed form has one hyperparameter,
    the L2 regulariser lambda; on MovieLens 100K 500 was best on a validation slice
    (docs/benchmarks-movielens.md).
    """
    if regulariser <= 0:
        raise ValueError(f"regulariser must be > 0, got {regulariser}")
    binary = _binary(train_matrix)
    gram = (binary.T @ binary).toarray()
    gram[np.diag_indices_from(gram)] += regulariser
    # G is symmetric positive definite: a Cholesky-based inverse, overwriting G in place.
    precision = scipy.linalg.inv(gram, overwrite_a=True, check_finite=False)
    weights = -precision / np.diag(precision)
    weights[np.diag_indices_from(weights)] = 0.0
    return weights


def ease_recommendations(
    train_matrix: sp.csr_matrix,
    user_rows: np.ndarray,
    k: int,
    exclude=None,
    regulariser: float = 500.0,
    max_items: int = EASE_MAX_ITEMS,
    block_size: int = 2048,
) -> np.ndarray:
    """Top k of EASE (:func:`ease_item_weights`) for the training users at ``user_rows``.

    Like :func:`svd_recommendations`, ``exclude`` is aligned with ``user_rows``. A catalogue
    above ``max_items`` is a ValueError (see :data:`EASE_MAX_ITEMS`).
    """
    n_items = train_matrix.shape[1]
    if n_items > max_items:
        raise ValueError(
            f"EASE needs a dense {n_items} x {n_items} item matrix; the bound is {max_items} items"
        )
    user_rows = np.asarray(user_rows, dtype=np.int64).ravel()
    k, block_size = check_k(k), check_block_size(block_size)
    exclude = as_exclude_matrix(exclude, len(user_rows), n_items)
    weights_t = np.ascontiguousarray(ease_item_weights(train_matrix, regulariser).T, dtype=np.float32)
    binary = sp.csr_matrix(train_matrix, dtype=np.float32)
    out = np.empty((len(user_rows), min(k, n_items)), dtype=np.int64)
    # A user's "vector" is its row of X (n_items wide), an item's is its column of B: blocks
    # of users keep the dense rows at block_size x n_items.
    for start in range(0, len(user_rows), block_size):
        rows = user_rows[start : start + block_size]
        users = (binary[rows] > 0).astype(np.float32).toarray()
        block_exclude = None if exclude is None else exclude[start : start + len(rows)]
        out[start : start + len(rows)] = top_k_items(users, weights_t, k, exclude=block_exclude, block_size=block_size)
    return out


def item_knn_similarities(train_matrix: sp.csr_matrix, neighbours: int = 100, block_items: int = 2048) -> sp.csr_matrix:
    """Item-kNN's (items x items) sparse weights: the cosine between items' binary user columns,
    each item keeping its ``neighbours`` most similar other items (Sarwar et al. 2001).

    Column j holds item j's neighbours, so a user's scores are ``x_u @ S``: the sum of the
    similarities of each item to the items the user has. Built ``block_items`` columns at a
    time, so no dense items x items matrix exists (200,000 items: blocks of 2,048 columns).
    """
    if neighbours <= 0:
        raise ValueError(f"neighbours must be > 0, got {neighbours}")
    binary = sp.csc_matrix(_binary(train_matrix))
    norms = np.sqrt(np.asarray(binary.multiply(binary).sum(axis=0)).ravel())
    normalised = sp.csc_matrix(binary.multiply(1.0 / np.maximum(norms, 1e-12)[None, :]))
    gram_left = sp.csr_matrix(normalised.T)
    n_items = binary.shape[1]
    keep = min(neighbours, n_items - 1)
    if keep <= 0:
        return sp.csr_matrix((n_items, n_items), dtype=np.float32)
    rows, cols, values = [], [], []
    for start in range(0, n_items, block_items):
        stop = min(start + block_items, n_items)
        # The block's cosines stay sparse: only items that share a user have one, so the top
        # ``keep`` of a column are chosen among its non-zeros (a dense (items x block) array is
        # 1.5 GB per block at 200,000 items, and mostly zeros).
        block = (gram_left @ normalised[:, start:stop]).tocoo()
        row, col, value = block.row, block.col, block.data
        useful = (row != col + start) & (value > 0)  # an item is not its own neighbour
        row, col, value = row[useful], col[useful], value[useful]
        order = np.lexsort((row, -value, col))  # by column, best first, ties by item row
        row, col, value = row[order], col[order], value[order]
        rank = np.arange(len(col)) - np.searchsorted(col, col, side="left")
        kept = rank < keep
        rows.append(row[kept])
        cols.append(col[kept] + start)
        values.append(value[kept])
    return sp.csr_matrix(
        (np.concatenate(values).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))),
        shape=(n_items, n_items),
    )


# Entries per block of item-kNN users, at most: a bound on each user's scores (from the
# weights' row counts) plus the k places of its list. The product and the arrays that rank
# it peak at ~50 MB a block (measured; twice the entries was no faster).
_ITEM_KNN_BLOCK_SCORES = 1 << 20


def item_knn_recommendations(
    train_matrix: sp.csr_matrix,
    user_rows: np.ndarray,
    k: int,
    exclude=None,
    neighbours: int = 100,
    block_size: int = 2048,
) -> np.ndarray:
    """Top k of item-kNN (:func:`item_knn_similarities`) for the training users at ``user_rows``;
    ``exclude`` is aligned with ``user_rows``. Any catalogue size: the weights are sparse.

    The lists are those of scoring every item (descending score, ties to the lower item
    index, excluded items -inf and so only in the tail of a user with fewer than k others),
    but no dense scores are made: a user's score is non-zero only for the neighbours of its
    items (every weight is > 0), a few thousand of 200,000 items, so the top k is sorted out
    of the stored entries of the sparse product ``binary[rows] @ weights``. A user with fewer
    than k of them gets the zero-score items next, lowest index first, then the excluded
    items, lowest index first, as the full ranking orders them. Blocks of at most
    ``block_size`` users are cut so that their scores and lists hold at most
    ``_ITEM_KNN_BLOCK_SCORES`` entries, so memory does not grow with the catalogue.
    """
    user_rows = np.asarray(user_rows, dtype=np.int64).ravel()
    k, block_size = check_k(k), check_block_size(block_size)
    n_items = train_matrix.shape[1]
    exclude = as_exclude_matrix(exclude, len(user_rows), n_items)
    weights = item_knn_similarities(train_matrix, neighbours)
    k = min(k, n_items)
    out = np.empty((len(user_rows), k), dtype=np.int64)
    if k == 0 or len(user_rows) == 0:
        return out
    users = _binary(train_matrix).astype(np.float32)[user_rows]
    # A user's scores are at most as many as the weight rows of its items hold; its list is k.
    bound = np.minimum(users @ np.diff(weights.indptr).astype(np.float64), n_items) + k
    ends = np.cumsum(bound)
    start = 0
    while start < len(user_rows):
        fits = int(np.searchsorted(ends, ends[start] - bound[start] + _ITEM_KNN_BLOCK_SCORES, side="right"))
        stop = min(max(fits, start + 1), start + block_size, len(user_rows))
        out[start:stop] = _item_knn_block(
            users[start:stop] @ weights, None if exclude is None else exclude[start:stop], k
        )
        start = stop
    return out


def _item_knn_block(scores: sp.csr_matrix, exclude: sp.csr_matrix | None, k: int) -> np.ndarray:
    """The (rows, k) ranked items of a block's sparse scores (the full ranking: see
    :func:`item_knn_recommendations`); ``exclude`` is aligned with the block's rows."""
    n_rows, n_items = scores.shape
    out = np.empty((n_rows, k), dtype=np.int64)
    scores.sort_indices()
    rows = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(scores.indptr))
    items = scores.indices.astype(np.int64)
    values = scores.data.astype(np.float32, copy=False)
    # Keys (row, item), sorted: candidates are the positive scores, excluded pairs removed.
    keys = rows * n_items + items
    positive = values > 0
    if exclude is not None:
        ex_rows = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(exclude.indptr))
        ex_keys = np.unique((ex_rows * n_items + exclude.indices)[exclude.data != 0])
        at = np.searchsorted(keys, ex_keys)
        hit = at < keys.size
        hit[hit] = keys[at[hit]] == ex_keys[hit]
        positive[at[hit]] = False
    else:
        ex_keys = np.empty(0, dtype=np.int64)
    if not positive.all():
        rows, items, values, keys = rows[positive], items[positive], values[positive], keys[positive]
    # Best first inside each row: a stable sort on (row, descending score) keeps the items of
    # a tie in ascending order. A positive float32's bits order like the float.
    descending = np.int64(0x7FFFFFFF) - values.view(np.int32)
    order = np.argsort((rows << 31) | descending, kind="stable")
    counts = np.bincount(rows, minlength=n_rows)
    rank = np.arange(rows.size) - (np.cumsum(counts) - counts)[rows[order]]
    top = rank < k
    out[rows[order[top]], rank[top]] = items[order[top]]

    # Rows with fewer than k candidates: the rest is the zero-score items, ascending, then the
    # excluded ones, ascending. The j-th (from 0) item outside a row's sorted blocked items
    # b_0 < b_1 < ... (candidates and excluded) is j plus the number of i with b_i - i <= j.
    filled = np.minimum(counts, k)
    need = k - filled
    if not need.any():
        return out
    short = need[rows] > 0
    ex_rows, ex_items = np.divmod(ex_keys, n_items)
    blocked = np.sort(np.concatenate([keys[short], ex_keys[need[ex_rows] > 0]]), kind="stable")
    blocked_rows, blocked_items = np.divmod(blocked, n_items)
    blocked_counts = np.bincount(blocked_rows, minlength=n_rows)
    blocked_starts = np.cumsum(blocked_counts) - blocked_counts
    gaps = blocked_items - (np.arange(blocked.size) - blocked_starts[blocked_rows])
    stride = n_items + 1
    free = np.minimum(need, n_items - blocked_counts)
    fill_rows = np.repeat(np.arange(n_rows, dtype=np.int64), free)
    j = np.arange(fill_rows.size) - np.repeat(np.cumsum(free) - free, free)
    below = np.searchsorted(blocked_rows * stride + gaps, fill_rows * stride + j, side="right")
    out[fill_rows, filled[fill_rows] + j] = j + below - blocked_starts[fill_rows]
    # Then the excluded items, for a row with fewer unseen items than k.
    rest = need - free
    if rest.any():
        ex_counts = np.bincount(ex_rows, minlength=n_rows)
        ex_rank = np.arange(ex_rows.size) - (np.cumsum(ex_counts) - ex_counts)[ex_rows]
        tail = ex_rank < rest[ex_rows]
        out[ex_rows[tail], (filled + free)[ex_rows[tail]] + ex_rank[tail]] = ex_items[tail]
    return out


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
