"""``tuned_hyperparameters``: the recipe's search space tuned on one training date's datasets.

Each trial trains the recipe with sampled values on the date's training dataset and ranks the
whole catalogue for the validation users after every epoch (recall@k or NDCG@k, training items
removed: the product's evaluation code), so Optuna's pruner stops the trials that fall behind;
each trial is scored at the epoch its training keeps (:mod:`twotower_assets.model.tuning`). The
search is one parent MLflow run with a nested run per trial; the study is kept in Optuna's
storage (``TWOTOWER_OPTUNA_STORAGE``, default an SQLite file beside the MLflow store), so a
search that was stopped resumes where it was. The result (the best values and epoch count) is a
file the model asset reads: ``two_tower_model`` trains every later date with the newest tuning
of its recipe at or before it, until the next tuning. Retuning has its own cadence (the monthly
``monthly_tuning`` schedule, or on demand): the weekly training job does not retune.
"""


import json
import time
import warnings
from pathlib import Path
from typing import Literal

import dagster as dg
import numpy as np
from pydantic import Field

from twotower_assets import settings
from twotower_assets.lib import layout
from twotower_assets.lib.artifacts import ArtifactStore, write_references
from twotower_assets.lib.conditions import TRAINING_POOL
from twotower_assets.lib.layout import DatasetFiles
from twotower_assets.lib.metadata import rounded
from twotower_assets.lib.mlflow_tracking import MlflowTracking
from twotower_assets.lib.partitions import training_date_partitions
from twotower_assets.lib.tuned import TUNED_FILE
from twotower_assets.defs.training.trainer import MAX_VALIDATION_USERS
from twotower_assets.model.recipes import DEFAULT_N_TRIALS, DEFAULT_RECIPE, DEFAULT_TIMEOUT_MINUTES, load_recipe



class TuningConfig(dg.Config):
    """What is searched (the recipe's ``search`` section), how it is scored, and the budget."""

    recipe: str = Field(default=DEFAULT_RECIPE, description="The recipe whose search space is tuned.")
    n_trials: int = Field(default=DEFAULT_N_TRIALS, gt=0, description="Trials in the study, those of a resumed search included.")
    timeout_minutes: float = Field(default=DEFAULT_TIMEOUT_MINUTES, gt=0, description="Wall-clock budget of this run's search.")
    metric: Literal["recall", "ndcg"] = Field(default="recall", description="What ranks the trials, at k.")
    k: int = Field(default=50, gt=0, description="Cut-off of the ranking metric (the quality gate's k).")
    max_epochs: int | None = Field(
        default=None, gt=0, description="Caps each trial's epochs (None: the recipe's schedule.epochs)."
    )
    max_validation_users: int = Field(
        default=MAX_VALIDATION_USERS, gt=0,
        description="Validation users ranked after each epoch (a seeded sample above this).",
    )
    seed: int = Field(default=42, description="Seeds the sampler, the user sample and each trial's training.")
    experiment_name: str = Field(default="two_tower_tuning", min_length=1, description="MLflow experiment.")


def optuna_storage(mlflow: MlflowTracking, artifacts: ArtifactStore) -> str:
    """Where the study is kept: ``TWOTOWER_OPTUNA_STORAGE`` (an Optuna storage URL) when set;
    else ``optuna.db`` beside a local (SQLite) MLflow store, or in the artifacts directory when
    MLflow is a server."""
    configured = settings.optuna_storage()
    if configured:
        return configured
    if mlflow.tracking_uri.startswith("sqlite:///"):
        directory = Path(mlflow.tracking_uri.removeprefix("sqlite:///")).parent
    else:
        directory = Path(artifacts.base_dir)
    directory.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{directory / 'optuna.db'}"


@dg.asset(
    key=layout.TUNED_HYPERPARAMETERS,
    partitions_def=training_date_partitions,
    deps=[layout.TF_DATASETS],
    group_name="training",
    kinds={"optuna", "mlflow"},
    description="Hyperparameters of the model recipe tuned on the date's validation rows (Optuna, "
    "scored by recall@k); the model asset trains with the newest tuning at or before its date.",
    pool=TRAINING_POOL,
    code_version="1",
)
def tuned_hyperparameters(
    context: dg.AssetExecutionContext, config: TuningConfig, artifacts: ArtifactStore, mlflow: MlflowTracking
) -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata=tune_partition(context.partition_key, config, artifacts, mlflow,
                                                        context.run_id, context.log.info))


def tune_partition(partition_key: str, config: TuningConfig, artifacts: ArtifactStore, mlflow: MlflowTracking,
                   dagster_run_id: str, log_info=print) -> dict:
    import optuna

    from twotower_assets.model import tuning
    from twotower_assets.model.datasets import dataset_rows, load_blocks, load_dataset
    from twotower_assets.model.features import FeatureConfig
    from twotower_assets.model.layers import FeatureStats
    from twotower_assets.model.plots import markdown_image
    from twotower_assets.model.training import TrainingParams, train_two_tower
    from twotower_assets.defs.training.trainer import _catalog, _seen_pairs, validation_evaluator

    recipe = load_recipe(config.recipe)
    tuning.check_scored_as_monitored(recipe, config.metric, config.k)  # before any work
    if config.max_epochs is not None:
        recipe = recipe.with_overrides({"schedule": {"epochs": min(config.max_epochs, recipe.schedule.epochs)}})
    datasets = DatasetFiles(artifacts.require(layout.TF_DATASETS, partition_key))
    feature_config = FeatureConfig.model_validate_json(datasets.feature_config.read_text())
    recipe.check_features(feature_config)
    stats = FeatureStats.load(datasets.root)
    train_rows, validation_rows = dataset_rows(datasets.training), dataset_rows(datasets.validation)
    if not validation_rows:
        raise ValueError(f"{partition_key} has no validation rows: tuning scores trials on them")
    catalog = _catalog(load_dataset(datasets.items))
    evaluator = validation_evaluator(datasets, feature_config, catalog, _seen_pairs(datasets.seen_pairs), config.k,
                                     config.max_validation_users, config.seed)
    study_name = f"{config.experiment_name}/{partition_key}/{recipe.name}/{config.metric}@{config.k}"
    run_name = f"tuning_{partition_key}"
    experiment_id, parent_id = mlflow.find_or_create_run(
        config.experiment_name, run_name,
        tags={"train_date": partition_key, "recipe": recipe.name, "study": study_name},
    )
    client = mlflow.client()
    client.set_tag(parent_id, "dagster_run_id", dagster_run_id)

    def train(candidate, ranking):
        return train_two_tower(
            feature_config, stats, load_blocks(datasets.training), train_rows, load_blocks(datasets.validation),
            TrainingParams(recipe=candidate, seed=config.seed), ranking=ranking,
            catalog=catalog if candidate.task.negatives.needs_catalog else None,
            # Read while each trial's model is built and freed before it fits, as the trainer does:
            # at 10M events the pairs are a few hundred MB a whole search would otherwise hold.
            seen_pairs=lambda: _seen_pairs(datasets.seen_pairs),
        )

    def log_trial(outcome: tuning.TrialOutcome) -> None:
        """Each trial is a nested run: its recipe's fields, per-epoch metric and losses."""
        trial_run = client.create_run(
            experiment_id, run_name=f"trial_{outcome.number}",
            tags={"mlflow.parentRunId": parent_id, "train_date": partition_key, "trial": str(outcome.number),
                  "pruned": str(outcome.pruned).lower()},
        )
        with mlflow.active(trial_run.info.run_id) as run:
            run.params({**outcome.recipe.params(), "trial": outcome.number})
            for epoch, value in enumerate(outcome.values):
                run.metrics({f"val_{config.metric}_at_{evaluator.k}": value,
                             **{name: values[epoch] for name, values in outcome.history.items()
                                if name in ("loss", "val_loss") and epoch < len(values)}}, step=epoch)
            run.metrics({"best_value": outcome.best_value, "best_epoch": outcome.best_epoch,
                         "seconds": outcome.seconds})
        log_info(f"trial {outcome.number}: {config.metric}@{evaluator.k} {outcome.best_value:.4f} at epoch "
                 f"{outcome.best_epoch}{' (pruned)' if outcome.pruned else ''}; {outcome.overrides}")

    started = time.perf_counter()
    with artifacts.writing(layout.TUNED_HYPERPARAMETERS, partition_key) as directory, mlflow.active(parent_id) as run:
        write_references(directory, {layout.TF_DATASETS: (partition_key, artifacts.version_of(datasets.root))})
        run.params({"recipe": recipe.name, "metric": f"{config.metric}@{evaluator.k}", "n_trials": config.n_trials,
                    "timeout_minutes": config.timeout_minutes, "train_date": partition_key, "study": study_name,
                    "validation_users": evaluator.relevant.shape[0]})
        result = tuning.tune(
            recipe, train, evaluator, metric=config.metric, n_trials=config.n_trials,
            timeout_seconds=config.timeout_minutes * 60, storage=optuna_storage(mlflow, artifacts), study_name=study_name,
            seed=config.seed, on_trial_end=log_trial,
        )
        seconds = time.perf_counter() - started
        tuned = {
            "recipe": recipe.name,
            "train_date": partition_key,
            "metric": result.metric,
            "value": result.best_value,
            "best_epoch": result.best_epoch,
            "overrides": result.best_overrides,
            "trials": result.trials_run,
            "study": study_name,
            "mlflow_run_id": parent_id,
            "seconds": round(seconds, 1),
        }
        (directory / TUNED_FILE).write_text(json.dumps(tuned, indent=2))
        trials = tuning.trials_frame(result.study)
        (directory / "trials.json").write_text(json.dumps(trials, indent=2, default=str))
        run.metrics({"best_value": result.best_value, "best_epoch": result.best_epoch, "trials": result.trials_run,
                     "seconds": seconds})
        run.artifact(directory / TUNED_FILE)
        run.artifact(directory / "trials.json")
        plots = study_plots(result.study, directory)
        for path in plots.values():
            run.artifact(path, "plots")
        images = {name: path.read_bytes() for name, path in plots.items()}  # before the version moves in
    complete = [t for t in result.study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    pruned = [t for t in result.study.trials if t.state == optuna.trial.TrialState.PRUNED]
    return {
        "recipe": dg.MetadataValue.text(recipe.name),
        "metric": dg.MetadataValue.text(result.metric),
        "best_value": dg.MetadataValue.float(rounded(result.best_value)),
        "best_epoch": dg.MetadataValue.int(result.best_epoch),
        "best_overrides": dg.MetadataValue.json(result.best_overrides),
        "trials": dg.MetadataValue.int(result.trials_run),
        "trials_complete": dg.MetadataValue.int(len(complete)),
        "trials_pruned": dg.MetadataValue.int(len(pruned)),
        "search_seconds": dg.MetadataValue.float(round(seconds, 1)),
        "study": dg.MetadataValue.text(study_name),
        "mlflow_run_url": dg.MetadataValue.url(mlflow.run_url(experiment_id, parent_id)),
        **{name: dg.MetadataValue.md(markdown_image(png, name.replace("_", " "))) for name, png in images.items()},
    }


def study_plots(study, directory: Path) -> dict[str, Path]:
    """Optuna's optimisation history and parameter importances as PNG files (what can be drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    import optuna.visualization.matplotlib as ov

    plots = {}
    for name, draw in (("optimization_history", ov.plot_optimization_history),
                       ("param_importances", ov.plot_param_importances)):
        try:
            with warnings.catch_warnings():
                # Optuna marks its matplotlib plots experimental (since v2.2.0); these two are
                # what the asset shows, so the notice would only repeat on every tuning.
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                axes = draw(study)
        except (ValueError, RuntimeError):
            continue  # e.g. importances need two finished trials with different values
        figure = axes.figure if hasattr(axes, "figure") else plt.gcf()
        figure.set_size_inches(7, 4)
        figure.tight_layout()
        path = directory / f"{name}.png"
        figure.savefig(path, dpi=80)
        plt.close(figure)
        plots[name] = path
    return plots
