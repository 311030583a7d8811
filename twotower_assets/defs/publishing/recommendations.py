"""Top-k recommendations for every user of one training date, written to the warehouse.

Where they are computed depends on the warehouse, as for the similar items:

* **BigQuery** (``native_vector_search``): in the warehouse, by ``VECTOR_SEARCH`` with the
  user embedding history as queries over the item embedding history, over-fetching by the
  largest number of items a user has seen and removing the seen pairs by an anti-join
  (:mod:`twotower_assets.warehouse.recommendation_sql`); nothing leaves BigQuery, so the
  work scales with it rather than with this machine.
* **DuckDB and emulators**: locally, as below.

Locally, every training user's vector is scored against every item by blocked float32 matrix
products (:func:`twotower_assets.model.topk.top_k_items`); the items the user already
has in training are removed, and the best ``k`` remaining items, best first, become one row
of ``two_tower_recommendations`` (partition ``train_date``). A serving layer that wants
precomputed lists reads the champion's partition through ``two_tower_recommendations_latest``
(moved by the ``champion`` step).

Like the embedding tables, it is published only for a model that passed the quality gate
(it depends on the MatchModel, which is gated). Users are processed in chunks that are
streamed into the warehouse as Arrow record batches, so memory does not grow with the
number of users.
"""


import datetime as dt
import time
from collections.abc import Iterator

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp
from pydantic import Field

from twotower_assets import settings
from twotower_assets.lib import layout
from twotower_assets.lib.artifacts import ArtifactStore
from twotower_assets.lib.conditions import DOWNSTREAM_CONDITION
from twotower_assets.lib.metadata import table_metadata
from twotower_assets.lib.mlflow_tracking import MlflowTracking
from twotower_assets.lib.partitions import training_date, training_date_partitions
from twotower_assets.lib.retries import WAREHOUSE_RETRY_POLICY, StepConfig, retry_transient_errors_only
from twotower_assets.lib.layout import ModelFiles, ModelSummary
from twotower_assets.model.topk import top_k_items
from twotower_assets.warehouse.base import WarehouseResource
from twotower_assets.warehouse.errors import EmptyTableError
from twotower_assets.warehouse.recommendation_sql import (
    MAX_CANDIDATES,
    RecommendationSearch,
    max_seen_items_query,
    recommendations_query,
)
from twotower_assets.warehouse.sql import ITEM_COLUMN, distinct_pairs_query


class RecommendationsConfig(StepConfig):
    k: int = Field(default=100, gt=0, description="Items per user (fewer when a user has seen almost every item).")
    users_per_batch: int = Field(
        default=32_768, gt=0, description="Users scored and written per record batch (bounds memory)."
    )
    block_size: int = Field(default=1024, gt=0, description="Users per matrix product inside a batch (at most 1024 are used).")
    extra_candidates: int | None = Field(
        default=None,
        ge=0,
        description="In-warehouse search only: candidates fetched per user beyond k, to make up for "
        "the seen items removed afterwards. Default: the most items any one user has seen (exact), "
        f"capped so that k + extra stays within {MAX_CANDIDATES}.",
    )


def recommendations_schema() -> pa.Schema:
    return pa.schema(
        [
            ("train_date", pa.date32()),
            ("mlflow_run_id", pa.string()),
            ("user_id", pa.string()),
            ("item_ids", pa.list_(pa.string())),
            ("scores", pa.list_(pa.float64())),
        ]
    )


def seen_matrix(pairs: pa.Table, user_ids: np.ndarray, item_ids: np.ndarray) -> sp.csr_matrix:
    """Binary (users x items) CSR of the (user, item) pairs; pairs with an unknown id are dropped."""
    rows = pc.index_in(pairs["user_key"], value_set=pa.array(user_ids, pa.string()))
    cols = pc.index_in(pairs[ITEM_COLUMN], value_set=pa.array(item_ids, pa.string()))
    known = pc.and_(pc.is_valid(rows), pc.is_valid(cols))
    rows = rows.filter(known).to_numpy().astype(np.int64, copy=False)
    cols = cols.filter(known).to_numpy().astype(np.int64, copy=False)
    matrix = sp.csr_matrix(
        (np.ones(rows.size, dtype=np.float32), (rows, cols)), shape=(len(user_ids), len(item_ids))
    )
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


def recommendation_batches(
    user_ids: np.ndarray,
    user_vectors: np.ndarray,
    item_ids: np.ndarray,
    item_vectors: np.ndarray,
    seen: sp.csr_matrix,
    k: int,
    train_date: dt.date,
    mlflow_run_id: str,
    users_per_batch: int = 32_768,
    block_size: int = 1024,
) -> Iterator[pa.RecordBatch]:
    """One record batch per chunk of users: their best unseen items, best first, and scores."""
    item_array = pa.array(item_ids, pa.string())
    items32 = np.ascontiguousarray(item_vectors, dtype=np.float32)
    n_items = len(item_ids)
    k = min(k, n_items)
    for start in range(0, len(user_ids), users_per_batch):
        stop = min(start + users_per_batch, len(user_ids))
        users32 = np.ascontiguousarray(user_vectors[start:stop], dtype=np.float32)
        block_seen = seen[start:stop]
        best, best_scores = top_k_items(users32, items32, k, exclude=block_seen, block_size=block_size, return_scores=True)
        # Excluded items only fill the tail of a user with fewer than k unseen items: cut it.
        lengths = np.minimum(k, n_items - np.diff(block_seen.indptr))
        keep = np.arange(k)[None, :] < lengths[:, None]
        chosen = best[keep]
        scores = best_scores[keep]
        offsets = pa.array(np.concatenate(([0], np.cumsum(lengths))).astype(np.int32))
        n = stop - start
        yield pa.RecordBatch.from_arrays(
            [
                pa.array(np.full(n, train_date), pa.date32()),
                pa.array([mlflow_run_id] * n, pa.string()),
                pa.array(user_ids[start:stop], pa.string()),
                pa.ListArray.from_arrays(offsets, item_array.take(pa.array(chosen))),
                pa.ListArray.from_arrays(offsets, pa.array(scores.astype(np.float64))),
            ],
            schema=recommendations_schema(),
        )


@dg.asset(
    key=layout.RECOMMENDATIONS,
    partitions_def=training_date_partitions,
    # The embedding histories are what the in-warehouse (BigQuery) search reads.
    deps=[layout.MATCH_MODEL, layout.EVALUATION_METRICS, layout.TWO_TOWER_MODEL, layout.TRAINING_EVENTS,
          layout.USER_EMBEDDING_HISTORY, layout.ITEM_EMBEDDING_HISTORY],
    group_name="publishing",
    kinds={settings.warehouse_kind(), "numpy"},
    description="Top-k unseen items per training user, one partition per training date; VECTOR_SEARCH "
    "on BigQuery, blocked matrix products elsewhere.",
    automation_condition=DOWNSTREAM_CONDITION,
    code_version="2",
    retry_policy=WAREHOUSE_RETRY_POLICY,
)
@retry_transient_errors_only
def recommendations(
    context: dg.AssetExecutionContext,
    config: RecommendationsConfig,
    warehouse: WarehouseResource,
    artifacts: ArtifactStore,
    mlflow: MlflowTracking,
) -> dg.MaterializeResult:
    trained = ModelFiles(artifacts.require(layout.TWO_TOWER_MODEL, context.partition_key))
    summary = trained.summary()
    train_date = training_date(context)
    if warehouse.has_vector_search:
        metadata = _in_warehouse(warehouse, config, summary, train_date)
    else:
        metadata = _locally(warehouse, config, trained, summary, train_date)
    return dg.MaterializeResult(
        metadata={
            **metadata,
            "latest_table": warehouse.table_name(layout.RECOMMENDATIONS_LATEST),
            "mlflow_run_id": summary.mlflow_run_id,
            "mlflow_run_url": dg.MetadataValue.url(mlflow.run_url(summary.mlflow_experiment_id, summary.mlflow_run_id)),
        }
    )


def _in_warehouse(
    warehouse: WarehouseResource, config: RecommendationsConfig, summary: ModelSummary, train_date: dt.date
) -> dict:
    """VECTOR_SEARCH over the embedding histories, seen pairs removed by an anti-join, in BigQuery."""
    users = warehouse.table_name(layout.USER_EMBEDDING_HISTORY)
    items = warehouse.table_name(layout.ITEM_EMBEDDING_HISTORY)
    user_rows = warehouse.partition_row_counts(users, layout.PARTITION_COLUMN).get(train_date, 0)
    item_rows = warehouse.partition_row_counts(items, layout.PARTITION_COLUMN).get(train_date, 0)
    if user_rows == 0 or item_rows == 0:
        # Checked before writing: an empty search must not replace a previous result.
        raise EmptyTableError(f"{users} or {items} has no vectors for {train_date}; materialise them first")
    training = warehouse.table_name(layout.TRAINING_EVENTS)
    k = min(config.k, item_rows, MAX_CANDIDATES)
    extra = config.extra_candidates
    if extra is None:
        seen = warehouse.query(max_seen_items_query(warehouse.dialect, training, summary.user_key), {"train_date": train_date})
        extra = int(seen["max_seen_items"][0].as_py() or 0)
    extra = min(extra, MAX_CANDIDATES - k)
    search = RecommendationSearch(users, items, training, summary.user_key, k, extra)
    qualified = warehouse.table_name(layout.RECOMMENDATIONS)
    started = time.perf_counter()
    written = warehouse.replace_partition_from_queries(
        {qualified: recommendations_query(warehouse.dialect, search)},
        layout.PARTITION_COLUMN,
        train_date,
        {"train_date": train_date, "mlflow_run_id": summary.mlflow_run_id},
    )[qualified]
    return {
        **table_metadata(qualified, recommendations_schema(), written),
        "computed_by": "warehouse VECTOR_SEARCH",
        "k": k,
        "candidates_per_user": search.candidates,
        "users": user_rows,
        "items": item_rows,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _locally(
    warehouse: WarehouseResource, config: RecommendationsConfig, trained: ModelFiles, summary: ModelSummary,
    train_date: dt.date,
) -> dict:
    """Blocked matrix products on this machine, streamed into the warehouse."""
    user_ids, user_vectors = trained.user_vectors(summary.user_key)
    item_ids, item_vectors = trained.item_vectors()
    if len(user_ids) == 0 or len(item_ids) == 0:
        raise EmptyTableError(f"the model of {train_date} has no user or no item vectors")
    training = warehouse.table_name(layout.TRAINING_EVENTS)
    pairs = warehouse.query(distinct_pairs_query(warehouse.dialect, training, summary.user_key), {"train_date": train_date})
    seen = seen_matrix(pairs, user_ids, item_ids)

    qualified = warehouse.table_name(layout.RECOMMENDATIONS)
    started = time.perf_counter()
    written = warehouse.replace_partition(
        qualified,
        layout.PARTITION_COLUMN,
        train_date,
        recommendation_batches(
            user_ids, user_vectors, item_ids, item_vectors, seen, config.k, train_date,
            summary.mlflow_run_id, config.users_per_batch, config.block_size,
        ),
        schema=recommendations_schema(),
    )
    seconds = time.perf_counter() - started
    # Scoring work: one multiply-add per user, item and vector dimension.
    flops = 2.0 * len(user_ids) * len(item_ids) * user_vectors.shape[1]
    return {
        **table_metadata(qualified, recommendations_schema(), written),
        "computed_by": "local blocked matrix products",
        "k": min(config.k, len(item_ids)),
        "users": len(user_ids),
        "items": len(item_ids),
        "seen_pairs_removed": int(seen.nnz),
        "seconds": round(seconds, 2),
        "scoring_gflop_per_s": round(flops / seconds / 1e9, 2) if seconds else 0.0,
    }
