"""What the graph publishes for one training date: the MatchModel and the embedding tables.

The MatchModel and both history tables are keyed by the model's own ids: ``item_id`` for
items and the config's ``input_prediction_feature`` for users (``user_id`` except in
configs such as ``user-qpi-features``). The unknown-id zero vector is never written: it is
not a user or an item.
"""


import datetime as dt

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from twotower_assets.defs import tables
from twotower_assets.defs.artifacts import ArtifactStore
from twotower_assets.defs.automation import DOWNSTREAM_CONDITION, RETRAIN_FRESHNESS
from twotower_assets.defs.evaluation import EVALUATION_METRICS
from twotower_assets.defs.mlflow_tracking import MlflowTracking
from twotower_assets.defs.partitions import training_date, training_date_partitions
from twotower_assets.defs.retries import WAREHOUSE_RETRY_POLICY, retry_transient_errors_only
from twotower_assets.defs.training import TWO_TOWER_MODEL, load_model_summary
from twotower_assets.warehouse.base import WarehouseResource

MATCH_MODEL = "match_model"


def keyed_embeddings(path, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ids of ``key`` (sorted) and one vector each (the first row of each id)."""
    table = pq.read_table(path, columns=[key, "embedding"])
    ids = table[key].to_numpy(zero_copy_only=False).astype(str)
    vectors = np.stack(table["embedding"].combine_chunks().flatten().to_numpy().reshape(len(ids), -1))
    unique_ids, first = np.unique(ids, return_index=True)
    return unique_ids, vectors[first]


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


def history_rows(entity: str, train_date: dt.date, summary: dict, ids: np.ndarray, vectors: np.ndarray) -> pa.Table:
    n = len(ids)
    flat = pa.array(vectors.astype(np.float64).ravel())
    offsets = pa.array(np.arange(0, (n + 1) * vectors.shape[1], vectors.shape[1], dtype=np.int32))
    return pa.table(
        {
            "train_date": pa.array([train_date] * n, pa.date32()),
            "mlflow_run_id": pa.array([summary["mlflow_run_id"]] * n, pa.string()),
            "mlflow_experiment_name": pa.array([summary["mlflow_experiment_name"]] * n, pa.string()),
            "mlflow_run_name": pa.array([summary["mlflow_run_name"]] * n, pa.string()),
            f"{entity}_id": pa.array(ids, pa.string()),
            f"{entity}_embedding": pa.ListArray.from_arrays(offsets, flat),
        },
        schema=history_schema(entity),
    )


@dg.asset(
    key=MATCH_MODEL,
    partitions_def=training_date_partitions,
    deps=[TWO_TOWER_MODEL, EVALUATION_METRICS],
    group_name="publishing",
    kinds={"tensorflow", "mlflow"},
    description="The MatchModel: frozen user and item vectors scored by dot product; MLflow artifact `model`.",
    automation_condition=DOWNSTREAM_CONDITION,
    code_version="1",
)
def match_model(
    context: dg.AssetExecutionContext, artifacts: ArtifactStore, mlflow: MlflowTracking
) -> dg.MaterializeResult:
    from twotower_assets.model.match_model import MatchModel, save_match_model

    model_dir = artifacts.require(TWO_TOWER_MODEL, context.partition_key)
    summary = load_model_summary(model_dir)
    user_ids, user_vectors = keyed_embeddings(model_dir / "user_embeddings.parquet", summary["user_key"])
    item_ids, item_vectors = keyed_embeddings(model_dir / "item_embeddings.parquet", "item_id")
    model = MatchModel(user_ids, user_vectors, item_ids, item_vectors)
    with artifacts.writing(MATCH_MODEL, context.partition_key) as out, mlflow.active(summary["mlflow_run_id"]) as run:
        save_match_model(model, out / "model")
        run.artifact(out / "model", "model")
    path = artifacts.path(MATCH_MODEL, context.partition_key) / "model"
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(path)),
            "users": len(user_ids),
            "items": len(item_ids),
            "mlflow_run_id": summary["mlflow_run_id"],
            "mlflow_artifact": "model",
            "usage": dg.MetadataValue.md(
                f"```python\nimport numpy as np, tensorflow as tf\nmatch_model = tf.saved_model.load('{path}')\n"
                f"match_model([np.array(['{user_ids[0]}']), np.array(['{item_ids[0]}'])])\n```"
            ),
        }
    )


def _embedding_history_asset(entity: str, table: str, view: str):
    @dg.asset(
        key=table,
        partitions_def=training_date_partitions,
        deps=[MATCH_MODEL],
        group_name="publishing",
        kinds={"sql"},
        description=f"{entity.capitalize()} embeddings, one partition per training date; view {view} shows the newest.",
        automation_condition=DOWNSTREAM_CONDITION,
        freshness_policy=RETRAIN_FRESHNESS,
        code_version="1",
        retry_policy=WAREHOUSE_RETRY_POLICY,
    )
    @retry_transient_errors_only
    def _asset(
        context: dg.AssetExecutionContext, warehouse: WarehouseResource, artifacts: ArtifactStore
    ) -> dg.MaterializeResult:
        model_dir = artifacts.require(TWO_TOWER_MODEL, context.partition_key)
        summary = load_model_summary(model_dir)
        key = summary["user_key"] if entity == "user" else "item_id"
        ids, vectors = keyed_embeddings(model_dir / f"{entity}_embeddings.parquet", key)
        rows = history_rows(entity, training_date(context), summary, ids, vectors)
        qualified = warehouse.table_name(table)
        written = warehouse.replace_partition(
            qualified, tables.PARTITION_COLUMN, training_date(context), rows, schema=history_schema(entity)
        )
        warehouse.create_latest_view(warehouse.table_name(view), qualified, tables.PARTITION_COLUMN)
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": written,
                "table": qualified,
                "latest_view": warehouse.table_name(view),
                "embedding_size": int(vectors.shape[1]),
                "mlflow_run_id": summary["mlflow_run_id"],
            }
        )

    return _asset


user_embedding_history = _embedding_history_asset("user", tables.USER_EMBEDDING_HISTORY, tables.USER_EMBEDDING_LATEST)
item_embedding_history = _embedding_history_asset("item", tables.ITEM_EMBEDDING_HISTORY, tables.ITEM_EMBEDDING_LATEST)
