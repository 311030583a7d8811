"""Where the training step runs: in the Dagster process (``local``) or launched through Pipes.

``TrainingConfig.training_launcher = "pipes"`` makes ``two_tower_model`` start the training
entry point (``python -m twotower_assets.pipes_training``) through Dagster Pipes instead of
training in its own process. The entry point calls the same training body
(:func:`~twotower_assets.defs.training.trainer.train_partition`) against the same artifact
store and MLflow server, and reports the materialization back through Pipes, so the asset's
metadata, MLflow run and files are the same either way. Nothing here schedules anything:
Dagster runs the asset, the Pipes client starts the process, and the client decides *where*
-- a local subprocess here (:class:`dagster.PipesSubprocessClient`), a GPU pod with
``dagster_k8s.PipesK8sClient`` (docs/distributed.md).
"""

import os
import sys

import dagster as dg

from twotower_assets.defs.training.trainer import TrainingConfig
from twotower_assets.lib.artifacts import ArtifactStore
from twotower_assets.lib.mlflow_tracking import MlflowTracking

ENTRY_POINT = [sys.executable, "-m", "twotower_assets.pipes_training"]
ERROR_MESSAGE = "training_error"
"""Key of the custom Pipes message in which the entry point reports a failed training."""


class LaunchedTrainingError(RuntimeError):
    """The training entry point ran and its training failed; the message is the original error."""


def pipes_extras(config: TrainingConfig, artifacts: ArtifactStore, mlflow: MlflowTracking, run_id: str) -> dict:
    """What the entry point needs: the training config and where the artifacts and MLflow live
    (shared storage and a tracking server when it runs elsewhere)."""
    return {
        "training_config": config.model_dump(),
        "artifacts": {"base_dir": artifacts.base_dir},
        "mlflow": {"tracking_uri": mlflow.tracking_uri, "artifact_root": mlflow.artifact_root, "ui_url": mlflow.ui_url},
        "dagster_run_id": run_id,
    }


def launch_training(
    context: dg.AssetExecutionContext,
    config: TrainingConfig,
    artifacts: ArtifactStore,
    mlflow: MlflowTracking,
    client: dg.PipesClient | None = None,
    command: list[str] | None = None,
    **run_kwargs,
) -> dg.MaterializeResult:
    """Run the training entry point through Pipes; its reported materialization is the asset's.

    ``client`` defaults to a local subprocess; another Pipes client (a GPU pod through
    ``dagster_k8s.PipesK8sClient``, with ``image=...`` and a pod spec in ``run_kwargs``)
    launches the same ``command`` elsewhere (docs/distributed.md).
    """
    client = client or dg.PipesSubprocessClient(env=dict(os.environ))
    invocation = client.run(
        context=context,
        command=command or ENTRY_POINT,
        extras=pipes_extras(config, artifacts, mlflow, context.run_id),
        **run_kwargs,
    )
    errors = [m[ERROR_MESSAGE] for m in invocation.get_custom_messages() if isinstance(m, dict) and ERROR_MESSAGE in m]
    if errors:
        raise LaunchedTrainingError(f"training launched through Pipes failed: {errors[-1]}")
    return invocation.get_materialize_result()
