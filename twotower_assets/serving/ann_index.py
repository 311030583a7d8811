"""Approximate nearest-neighbour index of item vectors on LanceDB, with exact re-ranking.

The retrieval endpoint needs the best k items for a user vector out of a catalogue too large
to score in full on every request. :class:`ItemIndex` keeps the item vectors in a LanceDB
table (embedded: a local directory, or a ``gs://`` URI in production; ``lancedb.connect``
handles both) with an IVF_PQ (or IVF_HNSW_SQ) index trained for dot-product distance. A
search asks the index for ``refine_factor`` times as many candidates as it needs, then scores
those candidates exactly against the vectors held in memory and keeps the best: the order
and the scores returned are exact dot products; only which items become candidates is
approximate.

Layout at ``uri``: a LanceDB database holding one table, ``items`` (``item_id`` string,
``vector`` fixed_size_list<float32>[d]). The search settings (index type, partitions,
sub-vectors, nprobes, refine_factor, dimension, row count) are JSON in the table's schema
metadata, so they are part of the very table version they describe.

Publishing is all-or-nothing through a LanceDB tag. Every build writes a *new version* of
the ``items`` table (an overwrite commit, then the index commit); only when both have
succeeded does it move the tag ``serving`` to that version, a single small write. :meth:`open`
reads the tagged version, never "latest". A build that fails anywhere (or a process killed
halfway) therefore leaves the tag, and so what every reader sees, on the previous good
build; the half-written version is rolled back best-effort and is never served. Versions
other than the tagged one are deleted after :data:`KEEP_UNPUBLISHED_VERSIONS_FOR`, so a
server still reading the previous build keeps working for that long after a new one is
published.

Below ``min_rows_for_index`` items no ANN index is built (k-means on a few thousand vectors
gives poor partitions and an exact scan is cheap there): searches are then an exact scan of
the in-memory vectors, reported as index type ``FLAT``.

Plain Python (no Dagster): the asset that publishes the index and the serving process both
import this module.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import threading
import warnings
from collections.abc import Collection, Sequence
from datetime import timedelta
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa
from lancedb.index import HnswSq, IvfPq

TABLE_NAME = "items"
SERVING_TAG = "serving"
"""The tag naming the published table version; moving it is what publishes a build."""
METADATA_KEY = b"twotower.item_index"
FORMAT_VERSION = 1

INDEX_TYPES = ("IVF_PQ", "IVF_HNSW_SQ")
FLAT = "FLAT"
"""index_type reported when the table is below min_rows_for_index and searches scan exactly."""

KEEP_UNPUBLISHED_VERSIONS_FOR = timedelta(days=1)
"""How long table versions other than the published one are kept after a successful build:
long enough for a server that opened the previous build to be reloaded, short enough that a
daily rebuild holds at most about two builds on disk."""

QUERIES_PER_LANCEDB_CALL = 64
"""Query vectors sent to LanceDB in one multi-vector search. A single-vector call costs
~1.5-2 CPU ms, mostly fixed planning and thread hand-offs; in calls of 64 vectors a query
costs ~0.3 ms. From 64 up to 2,000 vectors per call the rate was flat (8 per call: 0.5 ms),
and 64 keeps the candidate table of one call small (bench/serving.py, 200,000 x 64)."""

_FLAT_SCORE_BLOCK = 256
"""Queries scored together in a flat (exact) search: bounds the score matrix in memory."""

_LANCEDB_SAMPLE_RATE = 256
"""LanceDB's default training vectors per IVF partition (IvfPq / HnswSq sample_rate)."""

_RANK_BLOCK_ELEMENTS = 250_000
"""Candidate vector elements gathered at once for the exact re-rank (float64: 2 MB, about
20 queries of 200 candidates x 64 dims). Blocks that stay in cache re-ranked at ~80 us a
query at 200,000 x 64; one query at a time took ~150 us, 32 MB blocks ~110-160 us."""


class ItemIndexError(RuntimeError):
    """An item index that cannot be built, or read back, at the given uri."""


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _local_path(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


def default_num_partitions(rows: int) -> int:
    """IVF partitions: one per 125 items (1,600 at 200,000 items), at most 4,096.

    From the sweeps at 200,000 x 64 (docs/benchmarks-serving.md), refine_factor 2: 1,600
    partitions gave recall@100 0.987-0.993 probing 2-20 of them; 800 gave 0.965-0.981 and
    3,200 0.985-0.994 from 3 probes (0.946 at 2), all for ~0.2-0.35 CPU ms per batched query, which
    is LanceDB's fixed cost per query rather than the codes scanned. Smaller partitions
    leave smaller residuals for PQ to encode, so the PQ ranking of the candidates is
    better; 3,200 took longer to build (69-77 s against 43-56 s, under load 5-6). Not
    measured beyond 200,000 items; the cap keeps the k-means of a large catalogue bounded.
    """
    return max(1, min(4096, round(rows / 125)))


def default_hnsw_partitions(rows: int) -> int:
    """IVF partitions of an IVF_HNSW_SQ index: one per million items (1 at 200,000).

    At 200,000 x 64 one HNSW graph gave recall@100 1.00 at 1.7 CPU ms per batched query;
    4 partitions needed all 4 probed for the same recall, at 4.4 ms, and took twice as long
    to build (the sweep in docs/benchmarks-serving.md).
    """
    return max(1, round(rows / 1_000_000))


def default_num_sub_vectors(dimension: int) -> int:
    """PQ sub-vectors: d / 8, at least 8 (8 at 64 dims), a divisor of d as LanceDB requires.

    8 dimensions per 8-bit code is LanceDB's fast (SIMD) layout and, with the exact re-rank,
    reaches recall@100 0.99 at 64 dims (1,600 partitions); at 200-800 partitions 16
    sub-vectors gained 0.003-0.01 at the same nprobes for builds 1.2-3.4x as long. At
    least 8 codes: at 16 dims, 4 codes of 4 dims
    ranked so loosely that recall@10 stayed at 0.81 with 4x re-ranking; 8 codes of 2 dims
    gave 0.98.
    """
    target = min(dimension, max(8, dimension // 8))
    return max(m for m in range(1, target + 1) if dimension % m == 0)


def default_nprobes(num_partitions: int) -> int:
    """Partitions probed per query: 1 in 160, at least 8 (10 of 1,600 at 200,000 items).

    At 1,600 partitions recall@100 was 0.989 / 0.993 / 0.991 / 0.989 / 0.987 probing
    2 / 3 / 5 / 10 / 20 (refine 2): the bench's clustered data needs very few; 10 keeps a
    margin for embeddings less clustered than that, for about the same CPU per query.
    """
    return max(1, min(num_partitions, max(8, math.ceil(num_partitions / 160))))


DEFAULT_REFINE_FACTOR = 2
"""Candidates taken from the index per wanted result, then re-ranked exactly in memory.
PQ distances alone give recall@100 ~0.70 at 200,000 x 64; re-ranking 2x the wanted count
gives 0.99 at the default 1,600 partitions (0.97-0.98 at 800, where 3x added ~0.01 for
~40% more CPU per query). LanceDB's own
refine_factor re-reads every candidate's vector from the table: 8.4 CPU ms per query
against 0.3 for this in-memory re-rank."""

MIN_CANDIDATES = 200
"""At least this many candidates per query, whatever k. A PQ ranking misplaces items by a
roughly fixed number of places, not a fixed fraction of k. At 200,000 x 64 (bench/serving.py's
data, 500 queries, nprobes 10) recall@10 was 0.919 from 100 candidates and 0.9996 from 200,
at the same 0.2 CPU ms per batched query and ~1.1-1.2 ms per single query; 400 gave 1.000
(recall@100 0.9995 instead of 0.990) for ~0.1 ms more. At 20,000 x 16 (the tests' data),
recall@10 was 0.90 from 2 x 10 candidates, 1.00 from 100."""


def _as_vectors(vectors: Any, name: str) -> np.ndarray:
    array = np.asarray(vectors)
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"{name} must be a 2-D array (rows x dimensions), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(
            f"{name} has {len(rows)} row(s) with NaN or infinite values (first: row {rows[0]})"
        )
    return array


def _as_item_ids(item_ids: Any) -> np.ndarray:
    ids = np.asarray(item_ids)
    if ids.ndim != 1:
        raise ValueError(f"item_ids must be 1-D, got shape {ids.shape}")
    ids = ids.astype(str)
    if len(ids) and (ids == "").any():
        raise ValueError(f"item_ids has an empty id at position {int(np.flatnonzero(ids == '')[0])}")
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        duplicates = unique[counts > 1]
        raise ValueError(f"item_ids has {len(duplicates)} duplicated id(s), e.g. {duplicates[0]!r}")
    return ids


class ItemIndex:
    """Item vectors in a LanceDB table with an ANN index; searches re-rank candidates exactly."""

    def __init__(
        self,
        uri: str,
        table: Any,
        async_table: Any,
        item_ids: np.ndarray,
        vectors: np.ndarray,
        row_ids: np.ndarray,
        settings: dict[str, Any],
    ):
        """Use :meth:`build` or :meth:`open`; this wires the pieces they read back."""
        self._uri = uri
        self._table = table
        self._async_table = async_table
        self._item_ids = item_ids
        self._item_ids.setflags(write=False)
        self._vectors = vectors
        self._settings = settings
        self._position = {item_id: i for i, item_id in enumerate(item_ids.tolist())}
        # Rank of each id in sorted order: ties in score are broken by item id, and an integer
        # key sorts far faster than strings inside every search.
        self._id_rank = np.empty(len(item_ids), np.int64)
        self._id_rank[np.argsort(item_ids, kind="stable")] = np.arange(len(item_ids))
        # LanceDB's _rowid is (fragment << 32 | offset). A table written in one go is one
        # fragment, where the row id is the position; otherwise the scan at open gives the ids
        # in table order and a position is found by binary search.
        self._row_id_is_position = bool(np.array_equal(row_ids, np.arange(len(row_ids), dtype=np.uint64)))
        self._row_order = np.argsort(row_ids, kind="stable")
        self._row_ids_by_value = row_ids[self._row_order]

    # ------------------------------------------------------------------ build / open

    @classmethod
    def build(
        cls,
        uri: str,
        item_ids: np.ndarray,
        vectors: np.ndarray,
        *,
        index_type: str = "IVF_PQ",
        num_partitions: int | None = None,
        num_sub_vectors: int | None = None,
        nprobes: int | None = None,
        refine_factor: int | None = None,
        min_rows_for_index: int = 10_000,
    ) -> ItemIndex:
        """Write ``item_ids`` / ``vectors`` as table ``items`` at ``uri``, index them, publish.

        The ANN index (dot-product distance) is built when there are at least
        ``min_rows_for_index`` items; below that searches are an exact scan (``FLAT``).
        Settings left as None get the measured defaults (``default_num_partitions`` etc.).
        Inputs are validated before anything is written (lengths, NaN/inf, duplicate or empty
        ids); a failure after that, in LanceDB, is raised as :class:`ItemIndexError` and the
        build previously published at ``uri`` stays what :meth:`open` returns.
        """
        index_type = index_type.upper()
        if index_type not in INDEX_TYPES:
            raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}")
        ids = _as_item_ids(item_ids)
        matrix = _as_vectors(vectors, "vectors")
        if len(ids) != len(matrix):
            raise ValueError(
                f"item_ids has {len(ids)} entries but vectors has {len(matrix)} rows; "
                "they must be the same items in the same order"
            )
        if len(ids) == 0:
            raise ValueError("cannot build an item index of zero items")
        for name, value in (
            ("num_partitions", num_partitions),
            ("num_sub_vectors", num_sub_vectors),
            ("nprobes", nprobes),
            ("refine_factor", refine_factor),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")

        rows, dimension = matrix.shape
        indexed = rows >= min_rows_for_index
        if indexed and num_partitions is not None and num_partitions > rows:
            raise ValueError(f"num_partitions={num_partitions} is more than the {rows} items to partition")
        settings: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "index_type": index_type if indexed else FLAT,
            "rows": rows,
            "dimension": dimension,
            "num_partitions": None,
            "num_sub_vectors": None,
            "nprobes": None,
            "refine_factor": None,
        }
        if indexed:
            partitions = num_partitions or (
                default_num_partitions(rows) if index_type == "IVF_PQ" else default_hnsw_partitions(rows)
            )
            settings.update(
                num_partitions=partitions,
                num_sub_vectors=(num_sub_vectors or default_num_sub_vectors(dimension))
                if index_type == "IVF_PQ"
                else None,
                nprobes=min(nprobes or default_nprobes(partitions), partitions),
                refine_factor=refine_factor or DEFAULT_REFINE_FACTOR,
            )

        schema = pa.schema(
            [
                pa.field("item_id", pa.string(), nullable=False),
                pa.field("vector", pa.list_(pa.float32(), dimension), nullable=False),
            ],
            metadata={METADATA_KEY: json.dumps(settings).encode()},
        )
        data = pa.table(
            {
                "item_id": pa.array(ids, pa.string()),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), dimension),
            },
            schema=schema,
        )

        db = lancedb.connect(uri)
        try:
            existing = TABLE_NAME in db.list_tables().tables
        except Exception as error:
            raise ItemIndexError(f"cannot list the tables at {uri}: {error}") from error
        table = None
        published_version = None
        try:
            if existing:
                table = db.open_table(TABLE_NAME)
                published_version = _tagged_version(table)
                table.add(data, mode="overwrite")
            else:
                table = db.create_table(TABLE_NAME, data=data)
            if indexed:
                table.create_index("vector", config=_index_config(settings), replace=True)
            if published_version is None:
                table.tags.create(SERVING_TAG, table.version)
            else:
                table.tags.update(SERVING_TAG, table.version)
        except Exception as error:
            if table is not None and published_version is not None:
                _roll_back(table, published_version)
            raise ItemIndexError(
                f"building the {settings['index_type']} item index at {uri} failed; "
                f"the index published there before (if any) is unchanged: {error}"
            ) from error
        _drop_old_versions(table)
        return cls.open(uri)

    @classmethod
    def open(cls, uri: str) -> ItemIndex:
        """The build last published at ``uri``: settings, ids and vectors read back.

        Raises FileNotFoundError when there is no index at ``uri`` and :class:`ItemIndexError`
        when what is there cannot be read as one; both name ``uri``.
        """
        if _is_local(uri) and not os.path.isdir(_local_path(uri)):
            raise FileNotFoundError(f"no item index at {uri}: the directory does not exist")
        try:
            # connect() creates a missing local directory; checked above so open never writes.
            db = lancedb.connect(uri)
            tables = db.list_tables().tables
        except Exception as error:
            raise ItemIndexError(f"cannot read the item index at {uri}: {error}") from error
        if TABLE_NAME not in tables:
            raise FileNotFoundError(f"no item index at {uri}: it has no table {TABLE_NAME!r}")
        try:
            table = db.open_table(TABLE_NAME)
            version = _tagged_version(table)
            if version is None:
                raise ItemIndexError(
                    f"the item index at {uri} has no published build (tag {SERVING_TAG!r}); "
                    "a build there never completed"
                )
            table.checkout(version)
            settings = _read_settings(table.schema)
            columns = table.search().with_row_id(True).limit(None).to_arrow()
            async_table = _event_loop().run(_open_async_table(uri, version))
        except ItemIndexError:
            raise
        except Exception as error:
            raise ItemIndexError(f"the item index at {uri} is unreadable: {error}") from error

        dimension = settings["dimension"]
        item_ids = columns.column("item_id").to_numpy(zero_copy_only=False).astype(str)
        vector_column = columns.column("vector").combine_chunks()
        vectors = vector_column.flatten().to_numpy().reshape(-1, dimension).astype(np.float32)
        row_ids = columns.column("_rowid").to_numpy().astype(np.uint64)
        if len(item_ids) != settings["rows"]:
            raise ItemIndexError(
                f"the item index at {uri} has {len(item_ids)} rows but its settings say "
                f"{settings['rows']}: the table is damaged"
            )
        return cls(uri, table, async_table, item_ids, vectors, row_ids, settings)

    # ------------------------------------------------------------------ accessors

    @property
    def uri(self) -> str:
        return self._uri

    @property
    def item_ids(self) -> np.ndarray:
        """All item ids (read-only array of str), in table order."""
        return self._item_ids

    @property
    def dimension(self) -> int:
        return int(self._settings["dimension"])

    def __len__(self) -> int:
        return len(self._item_ids)

    def __repr__(self) -> str:
        s = self._settings
        return f"ItemIndex({self._uri!r}, {s['index_type']}, rows={s['rows']}, dimension={s['dimension']})"

    def vectors_of(self, item_ids: Sequence[str]) -> np.ndarray:
        """The stored vectors of ``item_ids``, float32 (n, d), in the order asked.

        Raises KeyError naming the first id not in the index.
        """
        positions = np.empty(len(item_ids), np.int64)
        for i, item_id in enumerate(item_ids):
            try:
                positions[i] = self._position[item_id]
            except KeyError:
                raise KeyError(f"item {item_id!r} is not in the item index at {self._uri}") from None
        return self._vectors[positions]

    def info(self) -> dict[str, Any]:
        """Index type, size and search settings of this build, for logs and run metadata."""
        try:
            size_bytes = int(self._table.stats()["total_bytes"])
        except Exception:  # a stats failure must not take down whoever only wants the settings
            size_bytes = None
        s = self._settings
        return {
            "uri": self._uri,
            "index_type": s["index_type"],
            "rows": s["rows"],
            "dimension": s["dimension"],
            "num_partitions": s["num_partitions"],
            "num_sub_vectors": s["num_sub_vectors"],
            "nprobes": s["nprobes"],
            "refine_factor": s["refine_factor"],
            "size_bytes": size_bytes,
        }

    # ------------------------------------------------------------------ search

    def search(
        self,
        queries: np.ndarray,
        k: int,
        exclude: Sequence[Collection[str]] | None = None,
        *,
        allowed: Sequence[np.ndarray | None] | None = None,
        exact: bool = False,
    ) -> list[tuple[list[str], list[float]]]:
        """Top k items per query vector by dot product, best first, excluding exclude[i] for query i
        (over-fetch k + len(exclude[i]) candidates, then drop), scores are exact dot products.

        ``allowed[i]``, when given and not None, is a boolean mask over the catalogue (table
        order, ``item_ids``): query i ranks only the items it marks, before the top k is cut,
        so it still gets k items when k allowed, unexcluded items exist. ``exact=True`` scans
        every item exactly even when the table has an ANN index (below the size where the
        index pays for itself, a scan is faster and has recall 1).

        ``queries``: (n, d), or one vector (d,). Scores are float64 dot products of the stored
        float32 vectors; equal scores are ordered by item id. Fewer than k results come back
        only when the catalogue minus the excluded items has fewer than k; ids in exclude
        that are not in the catalogue are ignored. With an ANN index the candidates
        (refine_factor x (k + excluded), at least MIN_CANDIDATES, per query; the most
        excluded of a block of queries sets the count for the block) come from the index
        and are then scored exactly, so a true top-k item can be missed (recall < 1), never
        mis-scored or mis-ordered. Safe to call from several threads at once.
        """
        matrix = np.asarray(queries)
        if matrix.ndim == 1:
            matrix = matrix[None, :]
        matrix = _as_vectors(matrix, "queries") if len(matrix) else matrix.astype(np.float32)
        if matrix.ndim != 2 or matrix.shape[1] != self.dimension:
            raise ValueError(
                f"queries must have {self.dimension} dimensions, got shape {np.shape(queries)}"
            )
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if exclude is not None and len(exclude) != len(matrix):
            raise ValueError(f"exclude has {len(exclude)} entries for {len(matrix)} queries")
        if allowed is not None and len(allowed) != len(matrix):
            raise ValueError(f"allowed has {len(allowed)} entries for {len(matrix)} queries")
        masks = [self._as_mask(mask) for mask in allowed] if allowed is not None else [None] * len(matrix)
        if len(matrix) == 0:
            return []
        excluded = [
            self._excluded_positions(exclude[i] if exclude is not None else ()) for i in range(len(matrix))
        ]
        if exact or self._settings["index_type"] == FLAT:
            candidates = self._flat_candidates(matrix, k, excluded, masks)
        else:
            candidates = self._index_candidates(matrix, k, excluded, masks)
            candidates = self._allowed_candidates(matrix, k, excluded, masks, candidates)
        return self._rank(matrix, candidates, k, excluded)

    def positions_of(self, item_ids: Collection[str]) -> np.ndarray:
        """Table positions of the ``item_ids`` that are in the catalogue (others are skipped)."""
        position = self._position
        return np.fromiter((position[x] for x in item_ids if x in position), np.int64)

    def exact_one(
        self, query: np.ndarray, k: int, excluded: np.ndarray, allowed: np.ndarray | None = None
    ) -> tuple[list[str], list[float]]:
        """What ``search(query, k, exclude, allowed=[allowed], exact=True)`` answers for one
        query, with ``excluded`` already as table positions (:meth:`positions_of`), and no
        input checks: the retrieval server's path for a single request, where the general
        batch machinery cost more than the matrix-vector product itself.

        The same steps as the batch path, so the same answer: float32 scores pick the pool
        (with a margin of ties at its edge), float64 dot products rank it, ties by item id.
        """
        scores = self._vectors @ query
        if allowed is not None:
            scores[~allowed] = -np.inf
        if len(excluded):
            scores[excluded] = -np.inf
        available = len(scores) if allowed is None and not len(excluded) else int(np.isfinite(scores).sum())
        wanted = min(available, k)
        if wanted == 0:
            return [], []
        cut = np.partition(scores, len(scores) - wanted)[len(scores) - wanted]
        pool = np.flatnonzero(scores >= cut - 1e-5)
        exact = np.einsum(
            "qcd,qd->qc", self._vectors[pool][None].astype(np.float64), query[None].astype(np.float64)
        )[0]
        order = np.lexsort((self._id_rank[pool], -exact))[:wanted]
        return self._item_ids[pool[order]].tolist(), exact[order].tolist()

    def _as_mask(self, mask: np.ndarray | None) -> np.ndarray | None:
        if mask is None:
            return None
        mask = np.asarray(mask)
        if mask.dtype != bool or mask.shape != (len(self),):
            raise ValueError(
                f"an allowed mask must be a boolean array of the catalogue's {len(self)} items, "
                f"got {mask.dtype} {mask.shape}"
            )
        return mask

    def _allowed_candidates(
        self,
        queries: np.ndarray,
        k: int,
        excluded: list[np.ndarray],
        masks: list[np.ndarray | None],
        candidates: list[np.ndarray],
    ) -> list[np.ndarray]:
        """The index's candidates cut to each query's allowed items; an exact scan of the allowed
        items for a query the index left short of k (a narrow filter leaves few of its
        candidates), so filtering never shortens an answer."""
        result = []
        for i, found in enumerate(candidates):
            mask = masks[i]
            if mask is None:
                result.append(found)
                continue
            found = found[mask[found]]
            available = int(mask.sum()) - int(mask[excluded[i]].sum())
            usable = len(found) - int(np.isin(found, excluded[i]).sum()) if len(excluded[i]) else len(found)
            if usable < min(k, available):
                found = self._flat_candidates(queries[i : i + 1], k, excluded[i : i + 1], [mask])[0]
            result.append(found)
        return result

    def _excluded_positions(self, item_ids: Collection[str]) -> np.ndarray:
        # Ids not in the catalogue cannot be returned anyway; they are not an error.
        found = [self._position[x] for x in item_ids if x in self._position]
        return np.unique(np.asarray(found, np.int64))

    def _flat_candidates(
        self,
        queries: np.ndarray,
        k: int,
        excluded: list[np.ndarray],
        masks: list[np.ndarray | None] | None = None,
    ) -> list[np.ndarray]:
        """Every query's top (k + excluded) allowed positions by an exact scan."""
        n = len(self._vectors)
        result: list[np.ndarray] = []
        for start in range(0, len(queries), _FLAT_SCORE_BLOCK):
            block = queries[start : start + _FLAT_SCORE_BLOCK]
            scores = block @ self._vectors.T
            for row, i in enumerate(range(start, start + len(block))):
                mask = masks[i] if masks is not None else None
                if mask is not None:
                    scores[row, ~mask] = -np.inf  # disallowed items never reach the cut
                available = n if mask is None else int(mask.sum())
                wanted = min(available, k + len(excluded[i]))
                if wanted >= available:
                    result.append(np.arange(n) if mask is None else np.flatnonzero(mask))
                    continue
                # float32 scores pick the pool; a margin of ties at its edge is kept so the
                # exact (float64) re-rank, not float32 rounding, decides the order.
                cut = np.partition(scores[row], n - wanted)[n - wanted]
                result.append(np.flatnonzero(scores[row] >= cut - 1e-5))
        return result

    def _index_candidates(
        self,
        queries: np.ndarray,
        k: int,
        excluded: list[np.ndarray],
        masks: list[np.ndarray | None] | None = None,
    ) -> list[np.ndarray]:
        """Candidate table positions per query from LanceDB's ANN index.

        Queries go to LanceDB in blocks of QUERIES_PER_LANCEDB_CALL vectors, one
        multi-vector search per block, all blocks in flight at once on the event loop.
        A query with an allowed mask asks for 1 / (the share of items allowed) times as many
        candidates, so about as many allowed ones survive the cut as an unfiltered query gets.
        """
        blocks = []
        for start in range(0, len(queries), QUERIES_PER_LANCEDB_CALL):
            block = queries[start : start + QUERIES_PER_LANCEDB_CALL]
            most_excluded = max(len(e) for e in excluded[start : start + len(block)])
            shares = [m.mean() for m in (masks or [])[start : start + len(block)] if m is not None]
            scale = 1.0 / max(min(shares), 1.0 / len(self)) if shares else 1.0
            blocks.append((block, k + most_excluded, scale))
        found = _event_loop().run(self._search_blocks(blocks))
        result: list[np.ndarray] = []
        for (block, _, _), table in zip(blocks, found, strict=True):
            positions = self._positions_of_row_ids(table.column("_rowid").to_numpy())
            if len(block) == 1:
                result.append(positions)
                continue
            query_of = table.column("query_index").to_numpy()
            order = np.argsort(query_of, kind="stable")
            bounds = np.searchsorted(query_of[order], np.arange(len(block) + 1))
            result.extend(positions[order[bounds[j] : bounds[j + 1]]] for j in range(len(block)))
        return result

    async def _search_blocks(self, blocks: list[tuple[np.ndarray, int, float]]) -> list[pa.Table]:
        if len(blocks) == 1:  # the common single request: no task to schedule
            return [await self._search_block(*blocks[0])]
        return await asyncio.gather(*(self._search_block(*block) for block in blocks))

    async def _search_block(self, block: np.ndarray, wanted: int, scale: float = 1.0) -> pa.Table:
        """Row ids of the index's best refine_factor x wanted candidates for each vector of block.

        Only ``_rowid`` (and LanceDB's own ``_distance``) is selected: any stored column
        would make LanceDB read it back for every candidate, a random-access take that tripled
        the cost of a query; the exact scores come from the vectors held in memory instead.
        """
        settings = self._settings
        limit = min(len(self), math.ceil(max(settings["refine_factor"] * wanted, MIN_CANDIDATES) * scale))
        query = (
            self._async_table.query()
            .nearest_to(block if len(block) > 1 else block[0])
            .distance_type("dot")
            .nprobes(settings["nprobes"])
            .limit(limit)
            .select(["_distance"])
            .with_row_id()
        )
        if settings["index_type"] == "IVF_HNSW_SQ":
            query = query.ef(max(limit, 2 * wanted))
        return await query.to_arrow()

    def _positions_of_row_ids(self, row_ids: np.ndarray) -> np.ndarray:
        row_ids = row_ids.astype(np.uint64, copy=False)
        if self._row_id_is_position:
            return row_ids.astype(np.int64)
        return self._row_order[np.searchsorted(self._row_ids_by_value, row_ids)]

    def _rank(
        self,
        queries: np.ndarray,
        candidates: list[np.ndarray],
        k: int,
        excluded: list[np.ndarray],
    ) -> list[tuple[list[str], list[float]]]:
        """Exact scores of each query's candidates; excluded dropped; best k, ties by item id.

        Vectorised over blocks of queries (a per-query loop of numpy calls cost about twice
        as much): candidates padded to one width, scored in float64, excluded and padding set
        to -inf so they sort last.
        """
        results: list[tuple[list[str], list[float]]] = []
        widest = max(1, max(len(c) for c in candidates))
        per_block = max(1, _RANK_BLOCK_ELEMENTS // (widest * self.dimension))
        for start in range(0, len(queries), per_block):
            stop = min(len(queries), start + per_block)
            width = max(1, max(len(c) for c in candidates[start:stop]))
            positions = np.zeros((stop - start, width), np.int64)
            valid = np.zeros((stop - start, width), bool)
            for row, i in enumerate(range(start, stop)):
                found = candidates[i]
                positions[row, : len(found)] = found
                valid[row, : len(found)] = ~np.isin(found, excluded[i]) if len(excluded[i]) else True
            scores = np.einsum(
                "qcd,qd->qc",
                self._vectors[positions].astype(np.float64),
                queries[start:stop].astype(np.float64),
            )
            scores[~valid] = -np.inf
            order = np.lexsort((self._id_rank[positions], -scores), axis=-1)
            kept = np.minimum(valid.sum(axis=1), k)
            for row in range(stop - start):
                best = order[row, : kept[row]]
                results.append(
                    (self._item_ids[positions[row, best]].tolist(), scores[row, best].tolist())
                )
        return results


# ---------------------------------------------------------------------- LanceDB helpers


class _EventLoopThread:
    """An asyncio loop in a daemon thread, for LanceDB's async API from plain threads.

    LanceDB's synchronous query API hands every step (schema look-ups, execution, each
    result batch) to its own loop thread and waits: about six thread hand-offs per query,
    which more than doubled the cost of a single-vector search (bench/serving.py). One
    coroutine per search on this loop is one hand-off, and concurrent callers' searches
    overlap on it.
    """

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="item-index-lancedb", daemon=True
        )
        self._thread.start()

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()


_EVENT_LOOP: _EventLoopThread | None = None
_EVENT_LOOP_LOCK = threading.Lock()


def _event_loop() -> _EventLoopThread:
    global _EVENT_LOOP
    with _EVENT_LOOP_LOCK:
        if _EVENT_LOOP is None:
            _EVENT_LOOP = _EventLoopThread()
        return _EVENT_LOOP


async def _open_async_table(uri: str, version: int) -> Any:
    db = await lancedb.connect_async(uri)
    table = await db.open_table(TABLE_NAME)
    await table.checkout(version)
    return table


def _index_config(settings: dict[str, Any]) -> Any:
    """LanceDB index configuration for the settings, trained on enough rows for every partition.

    LanceDB samples num_partitions x sample_rate (256 by default) vectors for k-means and,
    when the table holds fewer, silently trains fewer partitions (781 of 800 at 200,000
    rows). Lowering the rate to rows / partitions trains exactly the partitions asked for,
    so the settings stored and reported are the index's own.
    """
    sample_rate = max(1, min(_LANCEDB_SAMPLE_RATE, settings["rows"] // settings["num_partitions"]))
    if settings["index_type"] == "IVF_PQ":
        return IvfPq(
            distance_type="dot",
            num_partitions=settings["num_partitions"],
            num_sub_vectors=settings["num_sub_vectors"],
            sample_rate=sample_rate,
        )
    return HnswSq(distance_type="dot", num_partitions=settings["num_partitions"], sample_rate=sample_rate)


def _tagged_version(table: Any) -> int | None:
    tags = table.tags.list()
    return int(tags[SERVING_TAG]["version"]) if SERVING_TAG in tags else None


def _read_settings(schema: pa.Schema) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ItemIndexError(f"the table has no {METADATA_KEY.decode()!r} schema metadata")
    settings = json.loads(raw)
    if settings.get("format_version") != FORMAT_VERSION:
        raise ItemIndexError(
            f"item index format {settings.get('format_version')!r}, this code reads {FORMAT_VERSION}"
        )
    return settings


def _roll_back(table: Any, published_version: int) -> None:
    """Make the table's latest version the published one again (best effort).

    Readers use the tag, so this is for tidiness (tools that look at 'latest'); a failure
    here must not hide the build error being raised.
    """
    try:
        table.restore(published_version)
    except Exception as error:  # noqa: BLE001
        warnings.warn(f"could not roll the item table back to version {published_version}: {error}")


def _drop_old_versions(table: Any) -> None:
    """Delete table versions, other than the published one, older than the keep period."""
    try:
        table.optimize(cleanup_older_than=KEEP_UNPUBLISHED_VERSIONS_FOR)
    except Exception as error:  # noqa: BLE001  (disk tidying; the build itself succeeded)
        warnings.warn(f"could not clean up old item index versions: {error}")
