"""Where the training step runs: in the Dagster process (``local``) or launched through Pipes.

``TrainingConfig.training_launcher = "pipes"`` makes ``two_tower_model`` start the training
entry point (``python -m twotower_assets.pipes_training``) through Dagster Pipes instead of
training in its own process. The entry point runs the same asset code (with the launcher
set to ``local``) against the same artifact store and MLflow server, and reports the
materialization back through Pipes, so the asset's metadata, MLflow run and files are the
same either way. Nothing here schedules anything: Dagster runs the asset, the Pipes client
starts the process, and the client decides *where* -- a local subprocess here
(:class:`dagster.PipesSubprocessClient`), a GPU pod with ``dagster_k8s.PipesK8sClient``
(docs/distributed.md).
"""


import os
import sys

import dagster as dg

from twotower_assets.defs.artifacts import ArtifactStore
from twotower_assets.defs.mlflow_tracking import MlflowTracking

ENTRY_POINT = [sys.executable, "-m", "twotower_assets.pipes_training"]
ERROR_MESSAGE = "training_error"
"""Key of the custom Pipes message in which the entry point reports a failed training."""


class LaunchedTrainingError(RuntimeError):
    """The training entry point ran and its training failed; the message is the original error."""


# Dagster metadata value classes -> the type names of the Pipes protocol.
_PIPES_TYPES = {
    "UrlMetadataValue": "url",
    "PathMetadataValue": "path",
    "MarkdownMetadataValue": "md",
    "JsonMetadataValue": "json",
    "TextMetadataValue": "text",
    "FloatMetadataValue": "float",
    "IntMetadataValue": "int",
    "BoolMetadataValue": "bool",
}


def pipes_extras(config: dg.Config, artifacts: ArtifactStore, mlflow: MlflowTracking, run_id: str) -> dict:
    """What the entry point needs: the training config and where the artifacts and MLflow live
    (shared storage and a tracking server when it runs elsewhere). The entry point itself
    sets the launcher to ``local``, so it never launches again."""
    return {
        "training_config": config.model_dump(),
        "artifacts": {"base_dir": artifacts.base_dir},
        "mlflow": {"tracking_uri": mlflow.tracking_uri, "artifact_root": mlflow.artifact_root, "ui_url": mlflow.ui_url},
        "dagster_run_id": run_id,
    }


def pipes_metadata(metadata: dict) -> dict:
    """A materialization's metadata in the Pipes wire format ({"raw_value", "type"} per entry)."""
    converted = {}
    for key, value in metadata.items():
        kind = _PIPES_TYPES.get(type(value).__name__)
        raw = value.value if kind else str(getattr(value, "value", value))
        converted[key] = {"raw_value": raw, "type": kind or "text"}
    return converted


def launch_training(
    context: dg.AssetExecutionContext,
    config: dg.Config,
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
    result = invocation.get_materialize_result()
    run_id = result.metadata.get("mlflow_run_id") if result.metadata else None
    if run_id is not None:
        # The entry point ran the asset in a run of its own; the MLflow run points at this one.
        mlflow.client().set_tag(getattr(run_id, "value", run_id), "dagster_run_id", context.run_id)
    return result
