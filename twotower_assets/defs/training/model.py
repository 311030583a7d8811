"""The trained two-tower model of one training date, tracked in MLflow.

The asset trains the towers on the saved tf datasets, saves both towers as SavedModels and
their outputs for every training user and item (Parquet), which evaluation, the MatchModel
and the embedding tables all read, so tower outputs are computed once. The work itself is
:func:`~twotower_assets.defs.training.trainer.train_partition`, run here or, with
``training_launcher: pipes``, in a process launched through Dagster Pipes.
"""

import dagster as dg

# Dagster's own reader of the Pipes metadata format (what it applies to a Pipes report), so a
# local training and a launched one give identical metadata; it has no public alias.
from dagster._core.definitions.metadata.external_metadata import metadata_map_from_external

from twotower_assets.defs.training.trainer import TrainingConfig, train_partition
from twotower_assets.lib import layout
from twotower_assets.lib.artifacts import ArtifactStore
from twotower_assets.lib.conditions import MODEL_CONDITION, RETRAIN_FRESHNESS, TRAINING_POOL
from twotower_assets.lib.mlflow_tracking import MlflowTracking
from twotower_assets.lib.partitions import training_date_partitions


@dg.asset(
    key=layout.TWO_TOWER_MODEL,
    partitions_def=training_date_partitions,
    # Tuning is read when there is one, the newest at or before the date (trainer.py): a date
    # without its own tuning still trains (MODEL_CONDITION ignores this input).
    deps=[layout.TF_DATASETS, layout.TUNED_HYPERPARAMETERS],
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
        from twotower_assets.defs.training.launcher import launch_training

        return launch_training(context, config, artifacts, mlflow)
    metadata = train_partition(
        context.partition_key,
        config,
        artifacts,
        mlflow,
        dagster_run_id=context.run_id,
        dagster_run_is_over=dagster_run_is_over(context.instance),
        log_info=context.log.info,
        log_warning=context.log.warning,
    )
    return dg.MaterializeResult(metadata=metadata_map_from_external(metadata))


def dagster_run_is_over(instance: dg.DagsterInstance):
    """Whether a Dagster run this instance knows has finished (unknown runs: no)."""

    def is_over(dagster_run_id: str) -> bool:
        run = instance.get_run_by_id(dagster_run_id)
        return run is not None and run.is_finished

    return is_over
