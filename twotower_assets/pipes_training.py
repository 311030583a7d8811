"""The training entry point that Dagster Pipes launches (``python -m twotower_assets.pipes_training``).

Started by ``two_tower_model`` when its ``training_launcher`` is ``pipes``
(:mod:`twotower_assets.defs.training.launcher`), in a subprocess or on a GPU node. It calls
the same training body as a local training
(:func:`~twotower_assets.defs.training.trainer.train_partition`) on the artifact store and
MLflow server named in the Pipes extras, then reports the materialization and its metadata
back to the Dagster run that launched it; a failed training is reported as a custom message
carrying the original error, which the launching step raises.
"""

from dagster_pipes import open_dagster_pipes

import twotower_assets  # noqa: F401  (TF environment switches, before TensorFlow loads)


def main() -> None:
    from twotower_assets.defs.training.launcher import ERROR_MESSAGE
    from twotower_assets.defs.training.trainer import TrainingConfig, train_partition
    from twotower_assets.lib.artifacts import ArtifactStore
    from twotower_assets.lib.mlflow_tracking import MlflowTracking

    with open_dagster_pipes() as pipes:
        extras = pipes.extras
        config = TrainingConfig(**{**extras["training_config"], "training_launcher": "local"})
        launching_run = extras["dagster_run_id"]
        pipes.log.info(f"Training {pipes.asset_key} {pipes.partition_key} (launched by run {launching_run})")
        try:
            metadata = train_partition(
                pipes.partition_key,
                config,
                ArtifactStore(**extras["artifacts"]),
                MlflowTracking(**extras["mlflow"]),
                dagster_run_id=launching_run,
                log_info=pipes.log.info,
                log_warning=pipes.log.warning,
            )
        except Exception as exc:
            # The launching step raises this message as its own error (launcher.py).
            pipes.report_custom_message({ERROR_MESSAGE: f"{type(exc).__name__}: {exc}"})
            return
        pipes.report_asset_materialization(metadata=metadata)


if __name__ == "__main__":
    main()
