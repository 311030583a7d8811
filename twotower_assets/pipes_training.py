"""The training entry point that Dagster Pipes launches (``python -m twotower_assets.pipes_training``).

Started by ``two_tower_model`` when its ``training_launcher`` is ``pipes``
(:mod:`twotower_assets.defs.training_launcher`), in a subprocess or on a GPU node. It runs
the same asset code in process (launcher ``local``) on the artifact store and MLflow server
named in the Pipes extras, then reports the materialization and its metadata back to the
Dagster run that launched it; a failed training is reported as a custom message carrying
the original error, which the launching step raises.
"""

import dagster as dg
from dagster_pipes import open_dagster_pipes

import twotower_assets  # noqa: F401  (TF environment switches, before TensorFlow loads)


def main() -> None:
    from twotower_assets.defs.artifacts import ArtifactStore
    from twotower_assets.defs.mlflow_tracking import MlflowTracking
    from twotower_assets.defs.training import TWO_TOWER_MODEL, two_tower_model
    from twotower_assets.defs.training_launcher import ERROR_MESSAGE, pipes_metadata

    with open_dagster_pipes() as pipes:
        extras = pipes.extras
        training_config = {**extras["training_config"], "training_launcher": "local"}
        pipes.log.info(f"Training {TWO_TOWER_MODEL} {pipes.partition_key} (launched by run {extras['dagster_run_id']})")
        result = dg.materialize(
            [two_tower_model],
            partition_key=pipes.partition_key,
            run_config={"ops": {TWO_TOWER_MODEL: {"config": training_config}}},
            resources={"artifacts": ArtifactStore(**extras["artifacts"]), "mlflow": MlflowTracking(**extras["mlflow"])},
            instance=dg.DagsterInstance.ephemeral(),
            tags={"launched_by_run": extras["dagster_run_id"]},
            raise_on_error=False,
        )
        if not result.success:
            # The launching step raises this message as its own error (training_launcher.py).
            pipes.report_custom_message({ERROR_MESSAGE: root_cause(result)})
            return
        materialization = result.asset_materializations_for_node(TWO_TOWER_MODEL)[0]
        pipes.report_asset_materialization(metadata=pipes_metadata(materialization.metadata))


def root_cause(result: dg.ExecuteInProcessResult) -> str:
    """The innermost error of the failed step ("FileNotFoundError: ..."), without Dagster's wrappers."""
    failure = next((event for event in result.all_events if event.is_step_failure), None)
    if failure is None:
        return "the training run failed before its step started"
    error = failure.step_failure_data.error
    while error.cause is not None:
        error = error.cause
    return error.message.strip()


if __name__ == "__main__":
    main()
