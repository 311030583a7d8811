"""The training step's body: train one date's towers, save them and their outputs, log to MLflow.

One function, :func:`train_partition`, called by the ``two_tower_model`` asset when it trains
in its own process and by the Pipes entry point (``python -m twotower_assets.pipes_training``)
when it runs elsewhere, so both launchers write the same files, MLflow run and metadata.

The metadata comes back in the Dagster Pipes wire format (``{"raw_value", "type"}`` per entry):
the Pipes entry point reports it as it is, and the asset reads it with the same function
Dagster applies to a Pipes report, so the two launchers cannot disagree on a type.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from dagster_pipes import PipesMetadataValue
from pydantic import Field

from twotower_assets.defs.training.warm_start_source import resolve_warm_start
from twotower_assets.lib import layout
from twotower_assets.lib.artifacts import ArtifactStore
from twotower_assets.lib.layout import DatasetFiles, DatasetsManifest, ModelFiles, ModelSummary
from twotower_assets.lib.metadata import rounded
from twotower_assets.lib.mlflow_tracking import MlflowTracking
from twotower_assets.model.training import TrainingParams
from twotower_assets.warehouse.sql import USER_COLUMN


class TrainingConfig(TrainingParams, dg.Config):
    """The model's hyperparameters (:class:`TrainingParams`: the defaults are production's, and
    live there only) plus how and where this step trains and logs."""

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
        "(twotower_assets/defs/training/launcher.py, docs/distributed.md).",
    )


Log = Callable[[str], None]


def _value(raw, kind: str = "__infer__") -> PipesMetadataValue:
    return {"raw_value": raw, "type": kind}


def train_partition(
    partition_key: str,
    config: TrainingConfig,
    artifacts: ArtifactStore,
    mlflow: MlflowTracking,
    dagster_run_id: str,
    dagster_run_is_over: Callable[[str], bool] | None = None,
    log_info: Log = print,
    log_warning: Log = print,
) -> dict[str, PipesMetadataValue]:
    """Train ``partition_key``'s model from its saved datasets; returns the asset's metadata.

    ``dagster_run_id`` is the Dagster run the MLflow run is tagged with (the launching run,
    also when this runs in a Pipes process); ``dagster_run_is_over`` tells whether another
    Dagster run has ended, so a RUNNING MLflow run it left behind can be failed.
    """
    import tensorflow as tf

    from twotower_assets.model.datasets import dataset_rows, load_blocks, load_dataset
    from twotower_assets.model.features import FeatureConfig
    from twotower_assets.model.layers import FeatureStats
    from twotower_assets.model.plots import loss_curves_png, markdown_image
    from twotower_assets.model.training import tower_output_table, train_two_tower
    from twotower_assets.model.warm_start import load_towers, warm_start

    datasets = DatasetFiles(artifacts.require(layout.TF_DATASETS, partition_key))
    feature_config = FeatureConfig.model_validate_json(datasets.feature_config.read_text())
    stats = FeatureStats.load(datasets.root)
    train_rows = dataset_rows(datasets.training)
    validation_rows = dataset_rows(datasets.validation)
    params = TrainingParams(**config.model_dump(include=set(TrainingParams.model_fields)))
    run_name = config.run_name or f"two_tower_{partition_key}"
    # Resolved before the run starts: a champion that cannot be read fails here, not mid-training.
    start_from = resolve_warm_start(params.warm_start, partition_key, artifacts, mlflow)
    # A run of this date left RUNNING by a process that died (SIGKILL, OOM) ends FAILED first.
    abandoned = mlflow.fail_abandoned_runs(config.experiment_name, partition_key, dagster_run_id, dagster_run_is_over)
    for abandoned_run_id, reason in abandoned.items():
        log_warning(f"MLflow run {abandoned_run_id} of {partition_key} marked FAILED ({reason})")
    experiment_id, run_id = mlflow.find_or_create_run(
        config.experiment_name, run_name, tags={"dagster_run_id": dagster_run_id, "train_date": partition_key}
    )
    # The run ends FINISHED before the files move into place: a run that cannot be ended leaves no model.
    with artifacts.writing(layout.TWO_TOWER_MODEL, partition_key) as directory, mlflow.active(run_id) as run:
        out = ModelFiles(directory)
        run.params(
            {
                "environment": "local" if "sqlite" in mlflow.tracking_uri else "remote",
                "config_name": feature_config.name,
                "learning_rate": params.learning_rate,
                "optimizer": params.optimizer,
                "epochs": params.epochs,
                "embedding_size": params.embedding_size,
                "batch_size": params.batch_size,
                "seed": params.seed,
                "temperature": params.temperature,
                "full_catalog_softmax": config.full_catalog_softmax,
                "warm_start": params.warm_start,
                "warm_start_from": start_from.label,
                "train_date": partition_key,
                "training_rows": train_rows,
                "validation_rows": validation_rows,
                "user_count": dataset_rows(datasets.users),
                "item_count": dataset_rows(datasets.items),
                "user_feature_count": len(feature_config.user_embedding_layers),
                "item_feature_count": len(feature_config.item_embedding_layers),
            }
        )
        run.artifact(datasets.feature_config)
        manifest = DatasetsManifest.read(datasets.manifest)
        for split, table in manifest.source_tables.items():
            run.input_table(
                f"{table}@{partition_key}", f"{table} WHERE train_date = {partition_key}",
                manifest.rows.get(split, 0), split, manifest.columns,
            )
        log_epoch = tf.keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: run.metrics(
                {k: v for k, v in (logs or {}).items() if k in ("loss", "val_loss", "lr")}, step=epoch
            )
        )
        warm_report = {}

        def initialize(model) -> None:
            report = warm_start(model, *load_towers(start_from.model.user_tower, start_from.model.item_tower))
            warm_report.update(report.summary())
            run.dict(warm_report, "warm_start.json")

        log_info(f"Warm start ({params.warm_start}): {start_from.reason}")
        started = time.perf_counter()
        result = train_two_tower(
            feature_config,
            stats,
            load_blocks(datasets.training),
            train_rows,
            load_blocks(datasets.validation) if validation_rows else None,
            params,
            callbacks=[log_epoch],
            catalog=_catalog(load_dataset(datasets.items)) if config.full_catalog_softmax else None,
            seen_pairs=lambda: _seen_pairs(datasets.seen_pairs),  # read while building, freed before fitting
            initialize=initialize if start_from.model is not None else None,
        )
        train_seconds = time.perf_counter() - started
        log_info(f"Trained on {result.device}: {result.epochs_run} epochs in {train_seconds:.1f}s")

        user_key = feature_config.user_id_feature
        # One tower at a time, each table written and dropped before the next: the export
        # is the trainer's memory peak at production size (docs/benchmarks-scale.md).
        exported = {}
        for side, tower, examples, id_columns, path in (
            ("users", result.model.user_tower, datasets.users, sorted({USER_COLUMN, user_key}), out.user_embeddings),
            ("items", result.model.item_tower, datasets.items, [feature_config.item_id_feature], out.item_embeddings),
        ):
            table = tower_output_table(tower, load_blocks(examples), id_columns)
            pq.write_table(table, path)
            exported[side] = table.num_rows
            del table
        result.model.user_tower.save(str(out.user_tower), save_format="tf")
        result.model.item_tower.save(str(out.item_tower), save_format="tf")
        summary = ModelSummary(
            mlflow_run_id=run_id,
            mlflow_experiment_id=experiment_id,
            mlflow_experiment_name=config.experiment_name,
            mlflow_run_name=run_name,
            config_name=feature_config.name,
            datasets_version=artifacts.version_of(datasets.root),  # the immutable version read above
            user_key=user_key,
            epochs_run=result.epochs_run,
            history=result.history,
            train_seconds=train_seconds,
            examples_per_second=result.examples_seen / train_seconds if train_seconds else 0.0,
            device=result.device,
        )
        out.write_summary(summary)
        run.dict(summary.model_dump(), "training_summary.json")
        loss_png = loss_curves_png(result.history, title=f"Two-tower loss, {partition_key}")
        out.loss_plot.write_bytes(loss_png)
        run.artifact(out.loss_plot, "plots")

    history = result.history
    return {
        "mlflow_run_id": _value(run_id, "text"),
        "mlflow_run_url": _value(mlflow.run_url(experiment_id, run_id), "url"),
        "config_name": _value(feature_config.name, "text"),
        "device": _value(result.device, "text"),
        "warm_start_from": _value(start_from.label, "text"),
        "warm_start_reason": _value(start_from.reason, "text"),
        **{f"warm_start/{k}": _value(v) for k, v in warm_report.items() if not isinstance(v, str)},
        "epochs_run": _value(result.epochs_run, "int"),
        "final_loss": _value(rounded(history["loss"][-1]), "float"),
        "best_val_loss": _value(rounded(min(history["val_loss"])) if "val_loss" in history else float("nan"), "float"),
        "training_seconds": _value(round(train_seconds, 2), "float"),
        "examples_per_second": _value(round(summary.examples_per_second, 1), "float"),
        "users": _value(exported["users"], "int"),
        "items": _value(exported["items"], "int"),
        "path": _value(str(artifacts.path(layout.TWO_TOWER_MODEL, partition_key)), "path"),
        "loss_per_epoch": _value(markdown_image(loss_png, "training and validation loss per epoch"), "md"),
    }


def _catalog(items) -> dict[str, np.ndarray]:
    """The saved one-row-per-item dataset as columns, the catalogue of the exact softmax."""
    columns: dict[str, list[np.ndarray]] = {}
    for batch in items.batch(65_536):
        for name, values in batch.items():
            columns.setdefault(name, []).append(values.numpy())
    return {name: np.concatenate(parts) for name, parts in columns.items()}


def _seen_pairs(path: Path) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """The training (user key, item) pairs saved by tf_datasets."""
    pairs = pq.read_table(path)
    return pairs["user_key"], pairs["item_id"]
