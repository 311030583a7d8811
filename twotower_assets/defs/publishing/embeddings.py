"""The embedding history tables: every published model's user and item vectors, by training date.

One partition per training date. The ``_latest`` tables show the champion's partition; the
``champion`` step moves them (and a rollback moves them back). Keyed like the
MatchModel (``item_id``; the config's user key for users). The unknown-id zero vector is never
written: it is not a user or an item. Written only for a model that passed the quality gate
(they follow the MatchModel).
"""

import datetime as dt
from collections.abc import Mapping

import dagster as dg
import numpy as np
import pyarrow as pa

from twotower_assets import settings
from twotower_assets.lib import layout
from twotower_assets.lib.artifacts import ArtifactStore
from twotower_assets.lib.kill_points import kill_point
from twotower_assets.lib.conditions import DOWNSTREAM_CONDITION, RETRAIN_FRESHNESS
from twotower_assets.lib.layout import ModelFiles
from twotower_assets.lib.lineage import check_model_datasets
from twotower_assets.lib.metadata import table_metadata
from twotower_assets.lib.mlflow_tracking import MlflowTracking
from twotower_assets.lib.partitions import training_date, training_date_partitions
from twotower_assets.lib.retries import WAREHOUSE_RETRY_POLICY, retry_transient_errors_only
from twotower_assets.warehouse.base import WarehouseResource


def history_schema(entity: str) -> pa.Schema:
    return pa.schema(
        [
            ("train_date", pa.date32()),
            ("mlflow_run_id", pa.string()),
            ("mlflow_experiment_name", pa.string()),
            ("mlflow_run_name", pa.string()),
            (f"{entity}_id", pa.string()),
            (f"{entity}_embedding", pa.list_(pa.float64())),
        ]
    )


def history_rows(entity: str, train_date: dt.date, run: Mapping[str, str], ids: np.ndarray, vectors: np.ndarray) -> pa.Table:
    """The history rows of one date; ``run`` has the MLflow ``mlflow_run_id``, ``mlflow_experiment_name``, ``mlflow_run_name``."""
    n = len(ids)
    flat = pa.array(vectors.astype(np.float64).ravel())
    offsets = pa.array(np.arange(0, (n + 1) * vectors.shape[1], vectors.shape[1], dtype=np.int32))
    return pa.table(
        {
            "train_date": pa.array([train_date] * n, pa.date32()),
            "mlflow_run_id": pa.array([run["mlflow_run_id"]] * n, pa.string()),
            "mlflow_experiment_name": pa.array([run["mlflow_experiment_name"]] * n, pa.string()),
            "mlflow_run_name": pa.array([run["mlflow_run_name"]] * n, pa.string()),
            f"{entity}_id": pa.array(ids, pa.string()),
            f"{entity}_embedding": pa.ListArray.from_arrays(offsets, flat),
        },
        schema=history_schema(entity),
    )


def _embedding_history_asset(entity: str, table: str, view: str):
    @dg.asset(
        key=table,
        partitions_def=training_date_partitions,
        # evaluation_metrics: its blocking quality gate keeps a failed model out of the table.
        deps=[layout.MATCH_MODEL, layout.EVALUATION_METRICS],
        group_name="publishing",
        kinds={settings.warehouse_kind()},
        description=f"{entity.capitalize()} embeddings, one partition per training date; table {view} holds the "
        "champion's rows (copied by the champion step).",
        automation_condition=DOWNSTREAM_CONDITION,
        freshness_policy=RETRAIN_FRESHNESS,
        code_version="1",
        retry_policy=WAREHOUSE_RETRY_POLICY,
    )
    @retry_transient_errors_only
    def _asset(
        context: dg.AssetExecutionContext, warehouse: WarehouseResource, artifacts: ArtifactStore, mlflow: MlflowTracking
    ) -> dg.MaterializeResult:
        trained = ModelFiles(artifacts.require(layout.TWO_TOWER_MODEL, context.partition_key))
        summary = trained.summary()
        check_model_datasets(artifacts, context.partition_key, summary, table)
        ids, vectors = trained.user_vectors(summary.user_key) if entity == "user" else trained.item_vectors()
        rows = history_rows(entity, training_date(context), summary.model_dump(), ids, vectors)
        qualified = warehouse.table_name(table)
        written = warehouse.replace_partition(
            qualified, layout.PARTITION_COLUMN, training_date(context), rows, schema=history_schema(entity)
        )
        if entity == "user":
            kill_point("history.partition_written")
        return dg.MaterializeResult(
            metadata={
                **table_metadata(qualified, history_schema(entity), written),
                "latest_table": warehouse.table_name(view),
                "embedding_size": int(vectors.shape[1]),
                "mlflow_run_id": summary.mlflow_run_id,
                "mlflow_run_url": dg.MetadataValue.url(mlflow.run_url(summary.mlflow_experiment_id, summary.mlflow_run_id)),
            }
        )

    return _asset


user_embedding_history = _embedding_history_asset("user", layout.USER_EMBEDDING_HISTORY, layout.USER_EMBEDDING_LATEST)
item_embedding_history = _embedding_history_asset("item", layout.ITEM_EMBEDDING_HISTORY, layout.ITEM_EMBEDDING_LATEST)
