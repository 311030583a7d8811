"""``champion``: once a gated date is fully published, its models become the champion.

The asset runs after everything of the date (MatchModel, retriever, index, embedding tables,
recommendations, similar items), and only for a model that passed the quality gate (the gate
blocks everything downstream of ``evaluation_metrics``). It moves the champion record (the
retriever's alias) to the date's run, then the MatchModel's alias and the ``_latest`` tables
follow it (:mod:`twotower_assets.lib.promotion`, which the ``rollback_champion`` job uses too).
A promotion an earlier run left half done is finished first. A backfill of an older date does
not take the alias from a newer champion; ``rollback_champion`` moves it back on purpose.

The check ``champion_aliases_agree`` fails while the two aliases name different runs.
"""

import dagster as dg

from twotower_assets import settings
from twotower_assets.lib import layout
from twotower_assets.lib.artifacts import ArtifactStore
from twotower_assets.lib.conditions import DOWNSTREAM_CONDITION
from twotower_assets.lib.layout import MatchModelFiles, ModelFiles, RetrieverFiles
from twotower_assets.lib.lineage import check_model_datasets
from twotower_assets.lib.mlflow_tracking import MlflowTracking
from twotower_assets.lib.partitions import training_date_partitions
from twotower_assets.lib.retries import WAREHOUSE_RETRY_POLICY, retry_transient_errors_only
from twotower_assets.lib.promotion import alias_state, move_champion, reconcile_champion
from twotower_assets.serving.registry import TRAIN_DATE_TAG
from twotower_assets.serving.registry import champion as current_champion
from twotower_assets.warehouse.base import WarehouseResource


@dg.asset(
    key=layout.CHAMPION,
    partitions_def=training_date_partitions,
    deps=[
        layout.MATCH_MODEL, layout.EVALUATION_METRICS, layout.TWO_TOWER_RETRIEVER, layout.ITEM_ANN_INDEX,
        layout.USER_EMBEDDING_HISTORY, layout.ITEM_EMBEDDING_HISTORY, layout.RECOMMENDATIONS, layout.SIMILAR_ITEMS,
    ],
    group_name="publishing",
    kinds={"mlflow", settings.warehouse_kind()},
    description="Moves the registry alias `champion` (two_tower_match, two_tower_retriever) and the _latest "
    "tables (the champion run's rows) to this date, unless a newer date is champion.",
    automation_condition=DOWNSTREAM_CONDITION,
    code_version="1",
    retry_policy=WAREHOUSE_RETRY_POLICY,
)
@retry_transient_errors_only
def champion(
    context: dg.AssetExecutionContext, warehouse: WarehouseResource, artifacts: ArtifactStore, mlflow: MlflowTracking
) -> dg.MaterializeResult:
    summary = ModelFiles(artifacts.require(layout.TWO_TOWER_MODEL, context.partition_key)).summary()
    check_model_datasets(artifacts, context.partition_key, summary, "champion")
    match = MatchModelFiles(artifacts.require(layout.MATCH_MODEL, context.partition_key)).registration()
    served = RetrieverFiles(artifacts.require(layout.TWO_TOWER_RETRIEVER, context.partition_key)).registration()
    with mlflow.reporting_failures(f"moving the champion alias to {context.partition_key}"):
        client = mlflow.client()
        state = alias_state(client, match.name, served.name)
        if not state.agree:
            context.log.warning(f"finishing a promotion that stopped halfway: {state.describe(match.name, served.name)}")
            reconcile_champion(warehouse, client, match.name, served.name)
        current = current_champion(client, served.name)
        current_date = current.tags.get(TRAIN_DATE_TAG, "") if current is not None else ""
        if current_date > context.partition_key:
            context.log.info(f"{match.name}@champion stays at {current_date}, newer than {context.partition_key}")
            return dg.MaterializeResult(
                metadata={"moved": False, "champion_train_date": current_date,
                          "reason": f"a newer date ({current_date}) is champion; use rollback_champion to move back"}
            )
        moved = move_champion(warehouse, client, match.name, match.version, served.name)
    return dg.MaterializeResult(
        metadata={
            "moved": True,
            "champion_train_date": moved.train_date,
            "previous_champion_train_date": current_date or "none",
            "match_model": dg.MetadataValue.url(mlflow.model_version_url(match.name, moved.match_version)),
            "retriever": dg.MetadataValue.url(mlflow.model_version_url(served.name, moved.retriever_version)),
            "latest_tables": ", ".join(warehouse.table_name(v) for v in layout.LATEST_TABLES.values()),
        }
    )


@dg.asset_check(
    asset=layout.CHAMPION,
    name="champion_aliases_agree",
    blocking=True,
    description="two_tower_match@champion is the MatchModel of the run two_tower_retriever@champion (the "
    "record) serves; fails while a promotion is half done (the champion_reconciler sensor finishes it).",
)
def champion_aliases_agree(mlflow: MlflowTracking) -> dg.AssetCheckResult:
    from twotower_assets.serving.match_scorer import REGISTERED_MODEL_NAME as MATCH_MODEL_NAME
    from twotower_assets.serving.retriever import REGISTERED_MODEL_NAME as RETRIEVER_NAME

    with mlflow.reporting_failures("reading the champion aliases"):
        state = alias_state(mlflow.client(), MATCH_MODEL_NAME, RETRIEVER_NAME)
    return dg.AssetCheckResult(
        passed=state.agree,
        description=state.describe(MATCH_MODEL_NAME, RETRIEVER_NAME),
        metadata={"retriever_champion": state.record or "none", "match_champion": state.match or "none",
                  "match_of_the_same_run": state.expected_match or "none", "train_date": state.train_date or "none"},
    )
