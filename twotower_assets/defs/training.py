"""The trained two-tower model of one training date, tracked in MLflow.

The asset trains the towers on the saved tf datasets, saves both towers as SavedModels and
their outputs for every training user and item (Parquet), which evaluation, the MatchModel
and the embedding tables all read, so tower outputs are computed once.
"""


import json
import time
from pathlib import Path
from typing import Literal

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from twotower_assets.defs.artifacts import ArtifactStore
from twotower_assets.defs.automation import MODEL_CONDITION, RETRAIN_FRESHNESS, TRAINING_POOL
from twotower_assets.defs.datasets import SEEN_PAIRS_FILE, TF_DATASETS
from twotower_assets.defs.mlflow_tracking import MlflowTracking
from twotower_assets.defs.partitions import training_date_partitions
from twotower_assets.warehouse.sql import USER_COLUMN

TWO_TOWER_MODEL = "two_tower_model"


class TrainingConfig(dg.Config):
    """Hyperparameters; the defaults are production's."""

    embedding_size: int = Field(default=64, gt=0)
    batch_size: int = Field(default=2048, gt=0)
    epochs: int = Field(default=100, gt=0, description="Upper bound; early stopping usually ends sooner.")
    learning_rate: float = Field(default=0.1, gt=0)
    seed: int = 42
    temperature: float = Field(default=0.05, gt=0)
    remove_accidental_hits: bool = True
    mixed_precision: bool = False
    full_catalog_softmax: bool = Field(
        default=False,
        description="Exact softmax over every training item instead of in-batch negatives: for "
        "small catalogues (MovieLens: 1,682 items), too slow at production's 200,000.",
    )
    experiment_name: str = Field(
        default="two_tower",
        min_length=1,
        max_length=256,
        pattern=r"^[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f][^\x00-\x1f\x7f]*$",
        description="MLflow experiment: any printable text (it is a value, never SQL), no control characters.",
    )
    run_name: str | None = Field(default=None, description="MLflow run name; default two_tower_<date>.")
    training_launcher: Literal["local", "pipes"] = Field(
        default="local",
        description="local: train in the Dagster process. pipes: launch the training entry point "
        "(python -m twotower_assets.pipes_training) through Dagster Pipes, e.g. on a GPU node "
        "(twotower_assets/defs/training_launcher.py, docs/distributed.md).",
    )


def embeddings_table(ids: dict[str, np.ndarray], vectors: np.ndarray) -> pa.Table:
    columns = {name: pa.array(values, pa.string()) for name, values in ids.items()}
    flat = pa.array(vectors.astype(np.float32).ravel())
    columns["embedding"] = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
    return pa.table(columns)


@dg.asset(
    key=TWO_TOWER_MODEL,
    partitions_def=training_date_partitions,
    deps=[TF_DATASETS],
    group_name="training",
    kinds={"tensorflow", "mlflow"},
    description="TFRS two-tower retrieval model: towers, tower outputs, MLflow run.",
    automation_condition=MODEL_CONDITION,
    freshness_policy=RETRAIN_FRESHNESS,
    pool=TRAINING_POOL,
    code_version="1",
)
def two_tower_model(
    context: dg.AssetExecutionContext,
    config: TrainingConfig,
    artifacts: ArtifactStore,
    mlflow: MlflowTracking,
) -> dg.MaterializeResult:
    if config.training_launcher == "pipes":
        from twotower_assets.defs.training_launcher import launch_training

        return launch_training(context, config, artifacts, mlflow)
    import tensorflow as tf

    from twotower_assets.model.datasets import dataset_rows, load_blocks, load_dataset
    from twotower_assets.model.features import FeatureConfig
    from twotower_assets.model.layers import FeatureStats
    from twotower_assets.model.plots import loss_curves_png, markdown_image
    from twotower_assets.model.training import TrainingParams, train_two_tower, tower_outputs

    datasets = artifacts.require(TF_DATASETS, context.partition_key)
    feature_config = FeatureConfig.model_validate_json((datasets / "feature_config.json").read_text())
    stats = FeatureStats.load(datasets)
    train_rows = dataset_rows(datasets / "training")
    validation_rows = dataset_rows(datasets / "validation")
    params = TrainingParams(
        embedding_size=config.embedding_size,
        batch_size=config.batch_size,
        epochs=config.epochs,
        learning_rate=config.learning_rate,
        seed=config.seed,
        temperature=config.temperature,
        remove_accidental_hits=config.remove_accidental_hits,
    )
    run_name = config.run_name or f"two_tower_{context.partition_key}"
    # A run of this date left RUNNING by a process that died (SIGKILL, OOM) ends FAILED first.
    abandoned = mlflow.fail_abandoned_runs(
        config.experiment_name, context.partition_key, context.run_id, _dagster_run_is_over(context.instance)
    )
    for abandoned_run_id, reason in abandoned.items():
        context.log.warning(f"MLflow run {abandoned_run_id} of {context.partition_key} marked FAILED ({reason})")
    experiment_id, run_id = mlflow.find_or_create_run(
        config.experiment_name,
        run_name,
        tags={"dagster_run_id": context.run_id, "train_date": context.partition_key},
    )
    # The run ends FINISHED before the files move into place: a run that cannot be ended leaves no model.
    with artifacts.writing(TWO_TOWER_MODEL, context.partition_key) as out, mlflow.active(run_id) as run:
        run.params(
            {
                "environment": "local" if "sqlite" in mlflow.tracking_uri else "remote",
                "config_name": feature_config.name,
                "learning_rate": params.learning_rate,
                "epochs": params.epochs,
                "embedding_size": params.embedding_size,
                "batch_size": params.batch_size,
                "seed": params.seed,
                "temperature": params.temperature,
                "full_catalog_softmax": config.full_catalog_softmax,
                "train_date": context.partition_key,
                "training_rows": train_rows,
                "validation_rows": validation_rows,
                "user_count": dataset_rows(datasets / "users"),
                "item_count": dataset_rows(datasets / "items"),
                "user_feature_count": len(feature_config.user_embedding_layers),
                "item_feature_count": len(feature_config.item_embedding_layers),
            }
        )
        run.artifact(datasets / "feature_config.json")
        log_epoch = tf.keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: run.metrics(
                {k: v for k, v in (logs or {}).items() if k in ("loss", "val_loss", "lr")}, step=epoch
            )
        )
        started = time.perf_counter()
        result = train_two_tower(
            feature_config,
            stats,
            load_blocks(datasets / "training"),
            train_rows,
            load_blocks(datasets / "validation") if validation_rows else None,
            params,
            callbacks=[log_epoch],
            mixed_precision=config.mixed_precision,
            catalog=_catalog(load_dataset(datasets / "items")) if config.full_catalog_softmax else None,
            seen_pairs=_seen_pairs(datasets),
        )
        train_seconds = time.perf_counter() - started
        context.log.info(f"Trained on {result.device}: {result.epochs_run} epochs in {train_seconds:.1f}s")

        user_key = feature_config.user_id_feature
        user_ids, user_vectors = tower_outputs(
            result.model.user_tower, load_blocks(datasets / "users"), sorted({USER_COLUMN, user_key})
        )
        item_ids, item_vectors = tower_outputs(
            result.model.item_tower, load_blocks(datasets / "items"), [feature_config.item_id_feature]
        )
        pq.write_table(embeddings_table(user_ids, user_vectors), out / "user_embeddings.parquet")
        pq.write_table(embeddings_table(item_ids, item_vectors), out / "item_embeddings.parquet")
        result.model.user_tower.save(str(out / "user_tower"), save_format="tf")
        result.model.item_tower.save(str(out / "item_tower"), save_format="tf")
        summary = {
            "mlflow_run_id": run_id,
            "mlflow_experiment_id": experiment_id,
            "mlflow_experiment_name": config.experiment_name,
            "mlflow_run_name": run_name,
            "config_name": feature_config.name,
            "user_key": user_key,
            "epochs_run": result.epochs_run,
            "history": result.history,
            "train_seconds": train_seconds,
            "examples_per_second": result.examples_seen / train_seconds if train_seconds else 0.0,
            "device": result.device,
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        run.dict(summary, "training_summary.json")
        loss_png = loss_curves_png(result.history, title=f"Two-tower loss, {context.partition_key}")
        (out / "loss.png").write_bytes(loss_png)
        run.artifact(out / "loss.png", "plots")

    history = result.history
    return dg.MaterializeResult(
        metadata={
            "mlflow_run_id": run_id,
            "mlflow_run_url": dg.MetadataValue.url(mlflow.run_url(experiment_id, run_id)),
            "config_name": feature_config.name,
            "device": result.device,
            "epochs_run": result.epochs_run,
            "final_loss": history["loss"][-1],
            "best_val_loss": min(history["val_loss"]) if "val_loss" in history else float("nan"),
            "training_seconds": round(train_seconds, 2),
            "examples_per_second": round(summary["examples_per_second"], 1),
            "users": len(user_vectors),
            "items": len(item_vectors),
            "path": dg.MetadataValue.path(str(artifacts.path(TWO_TOWER_MODEL, context.partition_key))),
            "loss_per_epoch": dg.MetadataValue.md(markdown_image(loss_png, "training and validation loss per epoch")),
        }
    )


def _dagster_run_is_over(instance: dg.DagsterInstance):
    """Whether a Dagster run this instance knows has finished (unknown runs: no)."""

    def is_over(dagster_run_id: str) -> bool:
        run = instance.get_run_by_id(dagster_run_id)
        return run is not None and run.is_finished

    return is_over


def _catalog(items) -> dict[str, np.ndarray]:
    """The saved one-row-per-item dataset as columns, the catalogue of the exact softmax."""
    columns: dict[str, list[np.ndarray]] = {}
    for batch in items.batch(65_536):
        for name, values in batch.items():
            columns.setdefault(name, []).append(values.numpy())
    return {name: np.concatenate(parts) for name, parts in columns.items()}


def _seen_pairs(datasets: Path) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """The training (user key, item) pairs saved by tf_datasets."""
    pairs = pq.read_table(datasets / SEEN_PAIRS_FILE)
    return pairs["user_key"], pairs["item_id"]


def load_model_summary(path: Path) -> dict:
    return json.loads((path / "summary.json").read_text())
