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
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pydantic
from dagster_pipes import PipesMetadataValue
from pydantic import Field

from twotower_assets.lib.tuned import newest_tuning
from twotower_assets.defs.training.warm_start_source import resolve_warm_start
from twotower_assets.lib import layout
from twotower_assets.lib.artifacts import ArtifactStore, write_references
from twotower_assets.lib.kill_points import kill_point
from twotower_assets.lib.layout import DatasetFiles, DatasetsManifest, ModelFiles, ModelSummary
from twotower_assets.lib.metadata import rounded
from twotower_assets.lib.mlflow_tracking import MlflowTracking
from twotower_assets.model.recipes import (
    DEFAULT_RECIPE,
    ModelRecipe,
    Optimizer,
    Schedule,
    Towers,
    load_recipe,
    recipe_names,
)
from twotower_assets.model.towers import MIXED_POLICY
from twotower_assets.model.training import TrainingParams
from twotower_assets.warehouse.sql import USER_COLUMN


def _overrides_of(section: type[pydantic.BaseModel]) -> type[dg.Config]:
    """A run-config section with ``section``'s fields, each optional (None: the recipe's value).

    Generated from the recipe's own section, so its fields and descriptions live in one place
    (twotower_assets/model/recipes.py). Choice fields are plain strings here (Dagster's config
    types have no optional Literal); the recipe validates them when the overrides are applied.
    """
    fields = {
        name: (
            (str if typing.get_origin(info.annotation) is typing.Literal else info.annotation) | None,
            Field(default=None, description=info.description),
        )
        for name, info in section.model_fields.items()
    }
    return pydantic.create_model(f"{section.__name__}Overrides", __base__=dg.Config, **fields)


TowersOverrides = _overrides_of(Towers)
OptimizerOverrides = _overrides_of(Optimizer)
ScheduleOverrides = _overrides_of(Schedule)


class NegativesOverrides(dg.Config):
    """``task.negatives``: naming another ``kind`` replaces the recipe's strategy."""

    kind: str | None = Field(default=None, description="in_batch, full_catalog or mixed.")
    sampled: int | None = Field(default=None, description="mixed: catalogue items drawn per step.")
    remove_accidental_hits: bool | None = Field(
        default=None, description="in_batch, mixed: candidates with the positive's own item are not negatives."
    )


class TaskOverrides(dg.Config):
    temperature: float | None = Field(default=None, description="Softmax temperature: scores are divided by it.")
    negatives: NegativesOverrides | None = None


class TrainingConfig(dg.Config):
    """Which model recipe this step trains (configs/models/), fields of it to override, and how
    and where it trains and logs. The resolved recipe is checked when the config is built, so a
    bad name or an invalid combination fails before any data is read."""

    recipe: str = Field(
        default=DEFAULT_RECIPE,
        min_length=1,
        description=f"A model recipe: a name in configs/models/ ({', '.join(recipe_names())}) or a path "
        "to a recipe YAML file (twotower_assets/model/recipes.py).",
    )
    towers: TowersOverrides | None = Field(default=None, description="Overrides of the recipe's towers section.")
    task: TaskOverrides | None = Field(default=None, description="Overrides of the recipe's task section.")
    optimizer: OptimizerOverrides | None = Field(default=None, description="Overrides of the recipe's optimizer.")
    schedule: ScheduleOverrides | None = Field(default=None, description="Overrides of the recipe's schedule.")
    seed: int = Field(default=42, description="Seeds TensorFlow, numpy, Python and the shuffle.")
    mixed_precision: bool = Field(
        default=False, description=f"The towers compute in {MIXED_POLICY} (faster on GPUs); the loss stays float32."
    )
    warm_start: Literal["none", "champion", "previous"] = Field(
        default="none",
        description="none: random initial weights. champion: start from the champion model's weights; "
        "previous: from the newest earlier date's model. Embedding rows are mapped by id (carried-over "
        "ids keep their rows, new ids start fresh), Dense layers are copied when their shapes match, "
        "the optimiser restarts (twotower_assets/model/warm_start.py). No such model: a cold start.",
    )
    experiment_name: str = Field(
        default="two_tower",
        min_length=1,
        max_length=256,
        pattern=r"^[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f][^\x00-\x1f\x7f]*$",
        description="MLflow experiment: any printable text (it is a value, never SQL), no control characters.",
    )
    run_name: str | None = Field(default=None, description="MLflow run name; default two_tower_<date>.")
    tuned: Literal["newest", "none"] = Field(
        default="newest",
        description="newest: start from the newest tuning of this recipe at or before the date "
        "(tuned_hyperparameters), then apply the overrides above. none: the recipe and overrides only.",
    )
    refit: bool = Field(
        default=False,
        description="With a tuning: train on training + validation rows for the tuning's best epoch count "
        "instead of early-stopping on the validation rows.",
    )
    training_launcher: Literal["local", "pipes"] = Field(
        default="local",
        description="local: train in the Dagster process. pipes: launch the training entry point "
        "(python -m twotower_assets.pipes_training) through Dagster Pipes, e.g. on a GPU node "
        "(twotower_assets/defs/training/launcher.py, docs/distributed.md).",
    )

    @pydantic.model_validator(mode="after")
    def _recipe_resolves(self) -> TrainingConfig:
        self.model_recipe()  # raises RecipeError naming the fields
        return self

    def recipe_overrides(self) -> dict:
        """The override sections as the recipe's nested shape, only the fields that were set."""
        sections = {"towers": self.towers, "task": self.task, "optimizer": self.optimizer, "schedule": self.schedule}
        return {name: section.model_dump(exclude_none=True) for name, section in sections.items() if section is not None}

    def model_recipe(self, *before: dict) -> ModelRecipe:
        """The recipe, then ``before`` in order (a tuning's values, ...), then this config's overrides."""
        recipe = load_recipe(self.recipe)
        for overrides in (*before, self.recipe_overrides()):
            recipe = recipe.with_overrides(overrides)
        return recipe

    def training_params(self, *before: dict) -> TrainingParams:
        return TrainingParams(recipe=self.model_recipe(*before), seed=self.seed, mixed_precision=self.mixed_precision)


Log = Callable[[str], None]

MAX_VALIDATION_USERS = 5000
"""Validation users ranked after each epoch when the recipe monitors a ranking metric (a seeded
sample above this): enough for a stable recall@50, cheap beside an epoch at production size."""


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
    tuned = newest_tuning(artifacts, partition_key, load_recipe(config.recipe).name) if config.tuned == "newest" else None
    refit_epochs = tuned["best_epoch"] if tuned and config.refit and tuned.get("best_epoch") else None
    refit_schedule = {"schedule": {"epochs": refit_epochs, "early_stopping_patience": refit_epochs}} if refit_epochs else {}
    params = config.training_params(tuned["overrides"] if tuned else {}, refit_schedule)
    recipe = params.recipe
    tuned_from = (f"{tuned['train_date']} ({tuned['metric']} {tuned['value']:.4f}, {tuned['trials']} trials)"
                  if tuned else "none")
    recipe.check_features(feature_config)  # before the MLflow run: a recipe that cannot fit fails here
    run_name = config.run_name or f"two_tower_{partition_key}"
    # Resolved before the run starts: a champion that cannot be read fails here, not mid-training.
    start_from = resolve_warm_start(config.warm_start, partition_key, artifacts, mlflow)
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
        # While this model (or its scratch) exists, the datasets it trained on are kept.
        write_references(directory, {layout.TF_DATASETS: (partition_key, artifacts.version_of(datasets.root))})
        run.params(
            {
                "environment": "local" if "sqlite" in mlflow.tracking_uri else "remote",
                "config_name": feature_config.name,
                **{f"recipe.{key}" if key in ("name", "description", "features") else key: value
                   for key, value in recipe.params().items()},
                "seed": params.seed,
                "mixed_precision": params.mixed_precision,
                "warm_start": config.warm_start,
                "tuned_from": tuned_from,
                "refit_on_validation": bool(refit_epochs),
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
        recipe_file = directory / "recipe.yaml"
        recipe_file.write_text(recipe.to_yaml())
        run.artifact(recipe_file)
        manifest = DatasetsManifest.read(datasets.manifest)
        for split, table in manifest.source_tables.items():
            run.input_table(
                f"{table}@{partition_key}", f"{table} WHERE train_date = {partition_key}",
                manifest.rows.get(split, 0), split, manifest.columns,
            )
        log_epoch = tf.keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: run.metrics(
                {k: v for k, v in (logs or {}).items() if k in ("loss", "val_loss", "lr") or k.startswith("val_")},
                step=epoch,
            )
        )
        warm_report = {}

        def initialize(model) -> None:
            report = warm_start(model, *load_towers(start_from.model.user_tower, start_from.model.item_tower))
            warm_report.update(report.summary())
            run.dict(warm_report, "warm_start.json")

        log_info(f"Recipe {recipe.name!r} (tuned from: {tuned_from}): {recipe.params()}")
        fitted_rows = train_rows + validation_rows if refit_epochs else train_rows
        if recipe.schedule.batch_size > fitted_rows:
            log_warning(f"schedule.batch_size {recipe.schedule.batch_size:,} is more than the {fitted_rows:,} training "
                        f"rows of {partition_key}: each step takes all {fitted_rows:,} rows (one batch per epoch)")
        if refit_epochs:
            log_info(f"Refit: training + validation rows for the tuning's best epoch count, {refit_epochs}")
        log_info(f"Warm start ({config.warm_start}): {start_from.reason}")
        catalog = _catalog(load_dataset(datasets.items)) if recipe.task.negatives.needs_catalog else None
        ranking = None
        if recipe.schedule.ranking_monitor is not None and validation_rows and not refit_epochs:
            from twotower_assets.model.tuning import EpochRanking

            metric, k = recipe.schedule.ranking_monitor
            evaluator = validation_evaluator(
                datasets, feature_config, catalog if catalog is not None else _catalog(load_dataset(datasets.items)),
                _seen_pairs(datasets.seen_pairs), k, MAX_VALIDATION_USERS, params.seed,
            )
            ranking = EpochRanking(evaluator, metric)
            log_info(f"The epoch kept is the best {recipe.schedule.monitor} of {evaluator.relevant.shape[0]:,} "
                     "validation users")
        started = time.perf_counter()
        result = train_two_tower(
            feature_config,
            stats,
            load_blocks(datasets.training).concatenate(load_blocks(datasets.validation))
            if refit_epochs and validation_rows else load_blocks(datasets.training),
            train_rows + validation_rows if refit_epochs else train_rows,
            load_blocks(datasets.validation) if validation_rows and not refit_epochs else None,
            params,
            callbacks=[log_epoch],
            catalog=catalog,
            seen_pairs=lambda: _seen_pairs(datasets.seen_pairs),  # read while building, freed before fitting
            initialize=initialize if start_from.model is not None else None,
            ranking=ranking,
        )
        train_seconds = time.perf_counter() - started
        log_info(f"Trained on {result.device}: {result.epochs_run} epochs in {train_seconds:.1f}s")
        kill_point("training.trained")

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
            kept_epoch=result.kept_epoch,
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
        "recipe": _value(recipe.name, "text"),
        "tuned_from": _value(tuned_from, "text"),
        "refit_on_validation": _value(bool(refit_epochs), "bool"),
        "recipe_fields": _value(recipe.params(), "json"),
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


def validation_evaluator(datasets: DatasetFiles, feature_config, items: dict, seen_pairs, k: int, max_users: int,
                         seed: int):
    """Ranks every item (``items``: the items dataset's columns) for the date's validation users
    (one row per user from the users dataset, their state at the end of the training window),
    their training pairs (``seen_pairs``) removed."""
    from twotower_assets.model.datasets import load_dataset
    from twotower_assets.model.tuning import RankingEvaluator, pairs_matrix

    user_key = feature_config.user_id_feature
    item_key = feature_config.item_id_feature
    # Only the columns and rows needed are kept: at 10M events the users dataset holds a million
    # rows, whose every column as Python objects cost ~800 MB of a tuning step's peak.
    validation = _catalog(load_dataset(datasets.validation), columns=[user_key, item_key])
    held_users = _strings(validation[user_key])
    user_ids = np.asarray(_catalog(load_dataset(datasets.users), columns=[user_key])[user_key], dtype="S")
    # As fixed-width strings: np.isin compares object arrays element by element (users x held
    # users comparisons, hours at a million users), and sorts strings.
    keep = np.flatnonzero(np.isin(user_ids, np.unique(np.asarray(validation[user_key], dtype="S"))))
    if len(keep) > max_users:
        keep = np.sort(np.random.default_rng(seed).choice(keep, max_users, replace=False))
    users = _catalog(load_dataset(datasets.users), rows_where=(user_key, user_ids[keep]))
    user_ids = _strings(users[user_key])
    item_ids = _strings(items[item_key])
    seen_users, seen_items = seen_pairs
    relevant = pairs_matrix(user_ids, item_ids, held_users, _strings(validation[item_key]))
    exclude = pairs_matrix(user_ids, item_ids, seen_users, seen_items)
    return RankingEvaluator(users, items, relevant, exclude, k)


def _strings(values) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)


def _catalog(items, columns: list[str] | None = None, rows_where: tuple[str, np.ndarray] | None = None
             ) -> dict[str, np.ndarray]:
    """The saved one-row-per-item dataset as columns, the catalogue of the exact softmax.

    ``columns``: only those; ``rows_where`` (column, values as bytes): only the rows whose
    column holds one of the values, filtered batch by batch so the rest are never all held."""
    if columns is not None:
        items = items.map(lambda row: {name: row[name] for name in columns})
    kept: dict[str, list[np.ndarray]] = {}
    for batch in items.batch(65_536):
        batch = {name: values.numpy() for name, values in batch.items()}
        if rows_where is not None:
            column, values = rows_where
            wanted = np.isin(np.asarray(batch[column], dtype="S"), values)
            batch = {name: array[wanted] for name, array in batch.items()}
        for name, array in batch.items():
            kept.setdefault(name, []).append(array)
    return {name: np.concatenate(parts) for name, parts in kept.items()}


def _seen_pairs(path: Path) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """The training (user key, item) pairs saved by tf_datasets."""
    pairs = pq.read_table(path)
    return pairs["user_key"], pairs["item_id"]
