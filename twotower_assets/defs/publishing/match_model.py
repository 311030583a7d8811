"""The MatchModel: the published model of one training date.

Frozen user and item vectors scored by dot product, keyed by the model's own ids: ``item_id``
for items and the config's ``input_prediction_feature`` for users (``user_id`` except in
configs such as ``user-qpi-features``). It is a SavedModel that loads with TensorFlow alone,
logged to the model's MLflow run as an MLflow model (a pyfunc around the SavedModel) and
registered (``two_tower_match`` by default), one version per training date. It is registered
before it is evaluated, so the quality gate can record its verdict on the version it judged;
the alias ``champion`` moves only after the gate passed and the date is published (``champion``).
"""

import dagster as dg
from pydantic import Field

from twotower_assets.lib import layout
from twotower_assets.lib.artifacts import ArtifactStore, write_references
from twotower_assets.lib.conditions import DOWNSTREAM_CONDITION
from twotower_assets.lib.layout import MatchModelFiles, ModelFiles, Registration
from twotower_assets.lib.lineage import check_model_datasets
from twotower_assets.lib.mlflow_tracking import MlflowTracking
from twotower_assets.lib.partitions import training_date_partitions
from twotower_assets.serving import match_scorer
from twotower_assets.serving.registry import (
    DAGSTER_RUN_TAG,
    TRAIN_DATE_TAG,
    link_metrics,
    logged_model_id,
    run_metrics,
)

def is_per_epoch_metric(key: str) -> bool:
    """What training logs once per epoch (defs/training/trainer.py): loss, lr and the validation values."""
    return key in ("loss", "lr") or key.startswith("val_")


class MatchModelConfig(dg.Config):
    registered_model_name: str = Field(
        default=match_scorer.REGISTERED_MODEL_NAME,
        pattern=r"^[A-Za-z0-9_.-]{1,256}$",
        description="MLflow registered model the MatchModel versions go to.",
    )


@dg.asset(
    key=layout.MATCH_MODEL,
    partitions_def=training_date_partitions,
    deps=[layout.TWO_TOWER_MODEL],
    # With the model it freezes: it is the candidate evaluation judges, so the graph's groups read
    # training -> evaluation -> publishing with no edge going back.
    group_name="training",
    kinds={"tensorflow", "mlflow"},
    description="The MatchModel: frozen user and item vectors scored by dot product; an MLflow model, "
    "registered one version per training date (evaluated and gated next).",
    automation_condition=DOWNSTREAM_CONDITION,
    code_version="1",
)
def match_model(
    context: dg.AssetExecutionContext, config: MatchModelConfig, artifacts: ArtifactStore, mlflow: MlflowTracking
) -> dg.MaterializeResult:
    from twotower_assets.model.match_model import MatchModel, probe_match_model, save_match_model

    trained = ModelFiles(artifacts.require(layout.TWO_TOWER_MODEL, context.partition_key))
    summary = trained.summary()
    datasets_version = check_model_datasets(artifacts, context.partition_key, summary, "match_model")
    user_ids, user_vectors = trained.user_vectors(summary.user_key)
    item_ids, item_vectors = trained.item_vectors()
    model = MatchModel(user_ids, user_vectors, item_ids, item_vectors)
    with artifacts.writing(layout.MATCH_MODEL, context.partition_key) as directory, mlflow.active(summary.mlflow_run_id) as run:
        out = MatchModelFiles(directory)
        # The registered version's record keeps the model (and so its datasets) it was made from.
        write_references(directory, {layout.TWO_TOWER_MODEL: (context.partition_key, artifacts.version_of(trained.root))})
        save_match_model(model, out.saved_model)
        # Loaded back and scored before it is logged, registered or moved into place.
        probe_match_model(out.saved_model, user_ids, user_vectors, item_ids, item_vectors)
        with mlflow.reporting_failures(f"registering the MatchModel of {context.partition_key}"):
            model_uri, version = match_scorer.log_match_model(
                run.client, summary.mlflow_run_id, out.saved_model, (str(user_ids[0]), str(item_ids[0])),
                registered_model_name=config.registered_model_name,
                tags={TRAIN_DATE_TAG: context.partition_key, DAGSTER_RUN_TAG: context.run_id},
            )
            # The model's own training numbers: those of the epoch whose weights it holds.
            kept_epoch = summary.kept_epoch if summary.kept_epoch is not None else summary.epochs_run - 1
            per_epoch = [k for k in run.client.get_run(summary.mlflow_run_id).data.metrics if is_per_epoch_metric(k)]
            link_metrics(
                run.client, summary.mlflow_run_id,
                logged_model_id(run.client, config.registered_model_name, version),
                run_metrics(run.client, summary.mlflow_run_id, per_epoch, step=kept_epoch),
            )
        out.registration_file.write_text(
            Registration(name=config.registered_model_name, version=version, model_uri=model_uri).model_dump_json()
        )
    path = MatchModelFiles(artifacts.path(layout.MATCH_MODEL, context.partition_key)).saved_model
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(path)),
            "users": len(user_ids),
            "items": len(item_ids),
            "mlflow_run_id": summary.mlflow_run_id,
            "version": artifacts.current_version(layout.MATCH_MODEL, context.partition_key),
            "model_version_trained": artifacts.version_of(trained.root),
            "datasets_version": datasets_version,
            "mlflow_run_url": dg.MetadataValue.url(mlflow.run_url(summary.mlflow_experiment_id, summary.mlflow_run_id)),
            "registered_model": config.registered_model_name,
            "model_version": version,
            "model_uri": model_uri,
            "model_version_url": dg.MetadataValue.url(mlflow.model_version_url(config.registered_model_name, version)),
            "usage": dg.MetadataValue.md(
                f"```python\nimport numpy as np, tensorflow as tf\nmatch_model = tf.saved_model.load('{path}')\n"
                f"match_model([np.array(['{user_ids[0]}']), np.array(['{item_ids[0]}'])])\n```"
            ),
        }
    )
