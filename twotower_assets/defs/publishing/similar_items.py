"""Similar items per item, and the vector index that serves ad hoc searches.

``two_tower_similar_items`` holds, for every item of a training date, its ``top_k`` nearest
other items by the item tower's vectors (one row per neighbour, ``neighbor_rank`` 1 = best).

Where the neighbours are computed depends on the warehouse:

* **BigQuery** (``native_vector_search``): in the warehouse, with ``VECTOR_SEARCH`` over the
  item history table (and a vector index on it once it has ``index_min_rows`` rows, which
  also serves query-time searches for any user vector); the candidates are re-scored
  exactly. The result never leaves BigQuery.
* **DuckDB and emulators** (no ``VECTOR_SEARCH``): the date's item vectors are read as Arrow
  and scored by blocked float32 matrix products (:func:`~twotower_assets.model.topk.top_k_items`,
  the same code as the recommendations), streamed back one chunk of items at a time.
  Scoring every pair in SQL instead needed 20 GB at 1M events (docs/benchmarks-scale.md).

Top-k items *per user* are not computed here: that is ``two_tower_recommendations``, which
also removes the items a user has already seen.
"""

import datetime as dt
from collections.abc import Iterator
from typing import Literal

import dagster as dg
import numpy as np
import pyarrow as pa
import scipy.sparse as sp
from pydantic import Field

from twotower_assets import settings
from twotower_assets.lib import layout
from twotower_assets.lib.conditions import DOWNSTREAM_CONDITION
from twotower_assets.lib.metadata import table_metadata
from twotower_assets.lib.partitions import training_date, training_date_partitions
from twotower_assets.lib.retries import WAREHOUSE_RETRY_POLICY, StepConfig, retry_transient_errors_only
from twotower_assets.model.topk import top_k_items
from twotower_assets.warehouse.base import WarehouseResource
from twotower_assets.warehouse.errors import EmptyTableError
from twotower_assets.warehouse.queries import item_vectors_query
from twotower_assets.warehouse.sql import NeighborSearch


class VectorSearchConfig(StepConfig):
    top_k: int = Field(default=50, ge=1, le=1000, description="Similar items kept per item (at most catalog size - 1).")
    metric: Literal["DOT_PRODUCT", "COSINE"] = Field(
        default="DOT_PRODUCT", description="The towers' vectors are L2-normalised, so both rank alike."
    )
    index_min_rows: int = Field(
        default=100_000,
        ge=1,
        description="Rows the item history table needs before a vector index is created (BigQuery "
        "does not build indexes on small tables; without one VECTOR_SEARCH is brute force).",
    )
    items_per_batch: int = Field(
        default=16_384, gt=0, description="Items scored and written per record batch where the search runs locally."
    )


def similar_items_schema() -> pa.Schema:
    return pa.schema(
        [
            ("train_date", pa.date32()),
            ("item_id", pa.string()),
            ("similar_item_id", pa.string()),
            ("neighbor_rank", pa.int64()),
            ("score", pa.float64()),
        ]
    )


def similar_item_batches(
    item_ids: np.ndarray,
    item_vectors: np.ndarray,
    top_k: int,
    metric: str,
    train_date: dt.date,
    items_per_batch: int = 16_384,
) -> Iterator[pa.RecordBatch]:
    """The ``top_k`` most similar other items of every item, best first, one batch per chunk.

    Ties are broken by position, so with ``item_ids`` sorted the order is the one of
    ``ORDER BY score DESC, similar_item_id`` in the warehouse query.
    """
    vectors = np.asarray(item_vectors, dtype=np.float32)
    if metric == "COSINE":
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
    n_items = len(item_ids)
    k = min(top_k, n_items - 1)
    if k <= 0:
        return
    id_array = pa.array(item_ids, pa.string())
    ranks = np.arange(1, k + 1, dtype=np.int64)
    for start in range(0, n_items, items_per_batch):
        stop = min(start + items_per_batch, n_items)
        rows = np.arange(stop - start)
        itself = sp.csr_matrix((np.ones(rows.size, np.float32), (rows, rows + start)), shape=(rows.size, n_items))
        best, scores = top_k_items(vectors[start:stop], vectors, k, exclude=itself, return_scores=True)
        yield pa.RecordBatch.from_arrays(
            [
                pa.array(np.full(best.size, train_date), pa.date32()),
                id_array.take(pa.array(np.repeat(np.arange(start, stop), k))),
                id_array.take(pa.array(best.ravel())),
                pa.array(np.tile(ranks, rows.size)),
                pa.array(scores.ravel().astype(np.float64)),
            ],
            schema=similar_items_schema(),
        )


def item_vectors_of(warehouse: WarehouseResource, train_date: dt.date) -> tuple[np.ndarray, np.ndarray]:
    """(ids sorted, float32 matrix) of one partition of the item history table."""
    table = warehouse.table_name(layout.ITEM_EMBEDDING_HISTORY)
    rows = warehouse.query(item_vectors_query(warehouse.dialect, table), {"train_date": train_date})
    embeddings = rows["item_embedding"].combine_chunks()
    dimension = embeddings.value_lengths()[0].as_py() if len(embeddings) else 0
    if len(embeddings) and not np.all(embeddings.value_lengths().to_numpy() == dimension):
        raise ValueError(f"{table} has item vectors of different lengths for {train_date}")
    vectors = embeddings.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(embeddings), dimension)
    return rows["item_id"].to_numpy(zero_copy_only=False), vectors


def similar_items_search(warehouse: WarehouseResource, config: VectorSearchConfig) -> NeighborSearch:
    items = warehouse.table_name(layout.ITEM_EMBEDDING_HISTORY)
    return NeighborSearch(
        query_table=items, query_key="item_id", query_vector="item_embedding",
        base_table=items, base_key="item_id", base_vector="item_embedding",
        top_k=config.top_k, metric=config.metric, exclude_same_key=True,
        query_column="item_id", neighbor_column="similar_item_id",
    )


@dg.asset(
    key=layout.SIMILAR_ITEMS,
    deps=[layout.ITEM_EMBEDDING_HISTORY],
    partitions_def=training_date_partitions,
    group_name="publishing",
    kinds={settings.warehouse_kind(), "numpy"},
    description="Top-k similar items per item (itself excluded), one partition per training date; "
    "VECTOR_SEARCH on BigQuery, blocked matrix products elsewhere.",
    automation_condition=DOWNSTREAM_CONDITION,
    code_version="2",
    retry_policy=WAREHOUSE_RETRY_POLICY,
)
@retry_transient_errors_only
def similar_items(context: dg.AssetExecutionContext, config: VectorSearchConfig, warehouse: WarehouseResource):
    train_date = training_date(context)
    items = warehouse.table_name(layout.ITEM_EMBEDDING_HISTORY)
    item_rows = warehouse.partition_row_counts(items, layout.PARTITION_COLUMN).get(train_date, 0)
    if item_rows == 0:
        # Checked before writing: an empty search must not replace a previous result.
        raise EmptyTableError(f"{items} has no item embeddings for {train_date}; materialise it first")
    target = warehouse.table_name(layout.SIMILAR_ITEMS)
    indexed = warehouse.ensure_vector_index(items, "item_embedding", config.metric, config.index_min_rows)
    if warehouse.has_vector_search:
        where = "warehouse VECTOR_SEARCH"
        rows = warehouse.replace_partition_from_queries(
            {target: warehouse.nearest_neighbors_query(similar_items_search(warehouse, config))},
            layout.PARTITION_COLUMN,
            train_date,
            {"train_date": train_date},
        )[target]
    else:
        where = "local blocked matrix products"
        item_ids, vectors = item_vectors_of(warehouse, train_date)
        rows = warehouse.replace_partition(
            target,
            layout.PARTITION_COLUMN,
            train_date,
            similar_item_batches(item_ids, vectors, config.top_k, config.metric, train_date, config.items_per_batch),
            schema=similar_items_schema(),
        )
    context.log.info(f"Similar items for {train_date}: {rows} rows by {where} (vector index: {indexed})")
    return dg.MaterializeResult(
        metadata={
            **table_metadata(target, similar_items_schema(), rows),
            "items": item_rows,
            "top_k": min(config.top_k, item_rows - 1),
            "metric": config.metric,
            "computed_by": where,
            "vector_index": indexed,
        }
    )
