"""``rollback_champion``: move ``champion`` to a chosen earlier MatchModel version, on purpose.

Launch it from the Dagster UI (Jobs -> rollback_champion) or the CLI::

    dagster job execute -m twotower_assets.definitions -j rollback_champion \
      -c <(echo 'ops: {set_champion: {config: {match_model_version: "3"}}}')

It points ``two_tower_match@champion`` at that version, ``two_tower_retriever@champion`` at the
retriever of the same training run, and the ``_latest`` tables at its training date, so the
server (after a restart) and every table consumer read the rolled-back model. Only versions
the quality gate passed can be chosen.
"""

import dagster as dg
from pydantic import Field

from twotower_assets.lib.promotion import alias_state, move_champion, reconcile_champion
from twotower_assets.lib.mlflow_tracking import MlflowTracking
from twotower_assets.serving.match_scorer import REGISTERED_MODEL_NAME as MATCH_MODEL_NAME
from twotower_assets.serving.retriever import REGISTERED_MODEL_NAME as RETRIEVER_NAME
from twotower_assets.warehouse.base import WarehouseResource


class RollbackConfig(dg.Config):
    match_model_version: str = Field(pattern=r"^[0-9]+$", description="The two_tower_match version to make champion.")
    registered_model_name: str = Field(default=MATCH_MODEL_NAME, description="The MatchModel's registered model.")
    retriever_model_name: str = Field(default=RETRIEVER_NAME, description="The retriever's registered model.")


@dg.op(description="Moves the champion alias of both registered models and the _latest tables to a chosen version.")
def set_champion(context: dg.OpExecutionContext, config: RollbackConfig, warehouse: WarehouseResource, mlflow: MlflowTracking):
    with mlflow.reporting_failures(f"moving champion to {config.registered_model_name} v{config.match_model_version}"):
        moved = move_champion(
            warehouse, mlflow.client(), config.registered_model_name, config.match_model_version, config.retriever_model_name
        )
    context.log.info(
        f"champion is now {moved.match_model} v{moved.match_version} and {moved.retriever} v{moved.retriever_version} "
        f"(train_date {moved.train_date}); the _latest tables show {moved.train_date}"
    )
    return moved.train_date


@dg.job(description="Roll back: make an earlier gate-passed model version the champion (docs/operations.md).")
def rollback_champion():
    set_champion()


class ReconcileConfig(dg.Config):
    registered_model_name: str = Field(default=MATCH_MODEL_NAME, description="The MatchModel's registered model.")
    retriever_model_name: str = Field(default=RETRIEVER_NAME, description="The retriever's registered model (the record).")


@dg.op(description="Points two_tower_match@champion and the _latest tables at the run two_tower_retriever@champion names.")
def follow_champion_record(context: dg.OpExecutionContext, config: ReconcileConfig, warehouse: WarehouseResource,
                           mlflow: MlflowTracking):
    with mlflow.reporting_failures("finishing a half-done promotion"):
        client = mlflow.client()
        before = alias_state(client, config.registered_model_name, config.retriever_model_name)
        followed = reconcile_champion(warehouse, client, config.registered_model_name, config.retriever_model_name)
    context.log.info(f"before: {before.describe(config.registered_model_name, config.retriever_model_name)}; "
                     f"now both name {followed.train_date if followed else 'nothing'}")


@dg.job(description="Finish a promotion that stopped halfway: the MatchModel alias and the _latest tables follow "
        "the retriever's champion alias (started by the champion_reconciler sensor).")
def reconcile_champion_job():
    follow_champion_record()
