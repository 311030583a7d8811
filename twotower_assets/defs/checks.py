"""Asset checks: the split tables' data checks and the model quality gate.

Both are *blocking*: in a run, a failed check stops everything downstream of its asset, and
the automation conditions (``all_deps_blocking_checks_passed``) do not start it later either.

* Split data checks (one SQL aggregate per table, run in the warehouse with the training date
  as a query parameter): every split is non-empty and has no null ids; validation and test
  users and items all occur in training; no (user, item) pair of training is in validation
  or test (the split rules of SPEC "Data and splits").
* Quality gate on ``evaluation_metrics``: the model's recall@k must beat the popularity
  baseline (by ``min_lift_over_popularity``) and must not fall more than
  ``max_relative_drop`` below the previously *published* model (the newest earlier date in
  the embedding history table; its recall comes from that model's MLflow run). When it
  fails, ``match_model`` and both embedding tables do not run for that date, and the check's
  description and metadata in the UI say why.
"""


import datetime as dt
import warnings
from dataclasses import dataclass, field

import dagster as dg
import pandas as pd
from pydantic import Field

from twotower_assets.defs import tables
from twotower_assets.defs.artifacts import ArtifactStore
from twotower_assets.defs.automation import CHECK_CONDITION
from twotower_assets.defs.evaluation import EVALUATION_METRICS, MODEL_NAME
from twotower_assets.defs.mlflow_tracking import MlflowTracking
from twotower_assets.defs.partitions import training_date_partitions
from twotower_assets.warehouse.base import WarehouseResource
from twotower_assets.warehouse.sql import ITEM_COLUMN, USER_COLUMN, count_where, quote_identifier

# Partitioned checks (one result per training date) are a preview feature in Dagster 1.13;
# without them a backfill's dates would share one check status.
warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec", category=dg.PreviewWarning)

QUALITY_GATE = "quality_gate"
BASELINE = "popularity"
HELD_OUT = {"validation": tables.VALIDATION_EVENTS, "test": tables.TEST_EVENTS}

# --------------------------------------------------------------------------- split data checks

NON_EMPTY = "non_empty"
NO_NULL_IDS = "no_null_ids"
KNOWN_USERS_AND_ITEMS = "users_and_items_in_training"
NO_TRAINING_PAIRS = "no_training_pairs"


def _spec(table: str, name: str, description: str) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(
        name,
        asset=table,
        description=description,
        blocking=True,
        partitions_def=training_date_partitions,
        automation_condition=CHECK_CONDITION,
    )


SPLIT_CHECK_SPECS = [
    spec
    for table in tables.SPLIT_TABLES.values()
    for spec in (
        _spec(table, NON_EMPTY, "The split has rows for the training date."),
        _spec(table, NO_NULL_IDS, "No row has a null user_id or item_id."),
    )
] + [
    spec
    for table in HELD_OUT.values()
    for spec in (
        _spec(table, KNOWN_USERS_AND_ITEMS, "Every user and every item also occurs in training (same date)."),
        _spec(table, NO_TRAINING_PAIRS, "No (user_id, item_id) pair also occurs in training (same date)."),
    )
]


def split_table_stats(warehouse: WarehouseResource, train_date: dt.date) -> dict[str, dict[str, int]]:
    """Counts behind the split checks, per split table, computed in the warehouse."""
    dialect = warehouse.dialect
    date = dialect.param("train_date")
    column = quote_identifier(tables.PARTITION_COLUMN)
    user, item = quote_identifier(USER_COLUMN), quote_identifier(ITEM_COLUMN)
    training = dialect.table(warehouse.table_name(tables.TRAINING_EVENTS))
    params = {"train_date": train_date}
    stats: dict[str, dict[str, int]] = {}
    for table in tables.SPLIT_TABLES.values():
        source = dialect.table(warehouse.table_name(table))
        row = warehouse.query(
            f"SELECT COUNT(*) AS row_count, "
            f"{count_where(f'{user} IS NULL')} AS null_user_ids, "
            f"{count_where(f'{item} IS NULL')} AS null_item_ids, "
            f"COUNT(DISTINCT {user}) AS users, COUNT(DISTINCT {item}) AS items "
            f"FROM {source} WHERE {column} = {date}",
            params,
        ).to_pylist()[0]
        stats[table] = {name: int(value) for name, value in row.items()}
    for table in HELD_OUT.values():
        source = dialect.table(warehouse.table_name(table))
        # Anti- and semi-joins against the same date's training rows; LEFT JOIN ... IS NULL
        # is the form both DuckDB and BigQuery plan well.
        row = warehouse.query(
            f"WITH held_out AS (SELECT {user}, {item} FROM {source} WHERE {column} = {date}), "
            f"train_users AS (SELECT DISTINCT {user} FROM {training} WHERE {column} = {date}), "
            f"train_items AS (SELECT DISTINCT {item} FROM {training} WHERE {column} = {date}), "
            f"train_pairs AS (SELECT DISTINCT {user}, {item} FROM {training} WHERE {column} = {date}) "
            f"SELECT "
            f"(SELECT COUNT(*) FROM held_out h LEFT JOIN train_users u ON h.{user} = u.{user} "
            f"WHERE u.{user} IS NULL) AS rows_with_unknown_user, "
            f"(SELECT COUNT(*) FROM held_out h LEFT JOIN train_items i ON h.{item} = i.{item} "
            f"WHERE i.{item} IS NULL) AS rows_with_unknown_item, "
            f"(SELECT COUNT(*) FROM held_out h JOIN train_pairs p "
            f"ON h.{user} = p.{user} AND h.{item} = p.{item}) AS rows_with_training_pair",
            params,
        ).to_pylist()[0]
        stats[table].update({name: int(value) for name, value in row.items()})
    return stats


def _split_result(table: str, check: str, failures: int, failure: str, metadata: dict) -> dg.AssetCheckResult:
    """Passed when ``failures`` is 0; otherwise ``failure`` (with the count) is the description."""
    return dg.AssetCheckResult(
        asset_key=table,
        check_name=check,
        passed=failures == 0,
        description=None if failures == 0 else failure.format(count=failures, table=table),
        metadata=metadata,
    )


def split_check_results(stats: dict[str, dict[str, int]]) -> list[dg.AssetCheckResult]:
    """One result per check spec from the counts of :func:`split_table_stats`."""
    results = []
    for table, counts in stats.items():
        results.append(_split_result(
            table, NON_EMPTY, int(counts["row_count"] == 0), "{table} has no rows for this training date",
            {"dagster/row_count": counts["row_count"], "users": counts["users"], "items": counts["items"]},
        ))
        results.append(_split_result(
            table, NO_NULL_IDS, counts["null_user_ids"] + counts["null_item_ids"], "{count} null ids in {table}",
            {"null_user_ids": counts["null_user_ids"], "null_item_ids": counts["null_item_ids"]},
        ))
        if table not in HELD_OUT.values():
            continue
        results.append(_split_result(
            table, KNOWN_USERS_AND_ITEMS, counts["rows_with_unknown_user"] + counts["rows_with_unknown_item"],
            "{count} rows of {table} have a user or item missing from training",
            {"rows_with_unknown_user": counts["rows_with_unknown_user"],
             "rows_with_unknown_item": counts["rows_with_unknown_item"]},
        ))
        results.append(_split_result(
            table, NO_TRAINING_PAIRS, counts["rows_with_training_pair"],
            "{count} rows of {table} repeat a training (user, item) pair",
            {"rows_with_training_pair": counts["rows_with_training_pair"]},
        ))
    return results


@dg.multi_asset_check(specs=SPLIT_CHECK_SPECS, name="split_data_checks", description="Data checks of the three split tables.")
def split_data_checks(context: dg.AssetCheckExecutionContext, warehouse: WarehouseResource):
    train_date = dt.date.fromisoformat(context.partition_key)
    yield from split_check_results(split_table_stats(warehouse, train_date))


# --------------------------------------------------------------------------- quality gate


class QualityGateConfig(dg.Config):
    k: int = Field(default=50, gt=0, description="Cut-off of the gated recall@k (the largest evaluated k up to it).")
    min_lift_over_popularity: float = Field(
        default=0.0,
        ge=-1.0,
        description="recall@k must exceed popularity's recall@k x (1 + this). 0: strictly beat it.",
    )
    max_relative_drop: float = Field(
        default=0.1,
        ge=0.0,
        le=1.0,
        description="recall@k may be at most this fraction below the previously published model's.",
    )


@dataclass(frozen=True)
class PreviousModel:
    """The newest model published before this date, and its logged recall@k (if any)."""

    train_date: str
    mlflow_run_id: str
    recall: float | None


@dataclass
class GateDecision:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)

    @property
    def description(self) -> str:
        return "; ".join(self.reasons) if self.reasons else "passed"


def gated_k(metrics: pd.DataFrame, k: int) -> int | None:
    """The largest evaluated k not above ``k`` (evaluation caps ks at the catalog size)."""
    evaluated = sorted(int(x) for x in metrics["k"].unique() if int(x) <= k)
    return evaluated[-1] if evaluated else None


def decide(metrics: pd.DataFrame, config: QualityGateConfig, previous: PreviousModel | None) -> GateDecision:
    """Apply the gate to one date's metrics table (columns model, segment, k, recall, ...)."""
    overall = metrics[metrics["segment"] == "all"]
    k = gated_k(overall, config.k)
    if k is None:
        return GateDecision(False, [f"no recall evaluated at k <= {config.k}"], {"gate_k": config.k})
    recall = overall.set_index(["model", "k"])["recall"]
    if (MODEL_NAME, k) not in recall.index or (BASELINE, k) not in recall.index:
        return GateDecision(False, [f"metrics lack {MODEL_NAME} or {BASELINE} recall@{k}"], {"gate_k": k})
    model_recall, baseline_recall = float(recall[(MODEL_NAME, k)]), float(recall[(BASELINE, k)])
    needed = baseline_recall * (1 + config.min_lift_over_popularity)
    decision = GateDecision(
        True,
        metadata={
            "gate_k": k,
            f"recall_at_{k}": model_recall,
            f"popularity_recall_at_{k}": baseline_recall,
            "popularity_threshold": needed,
            "min_lift_over_popularity": config.min_lift_over_popularity,
            "max_relative_drop": config.max_relative_drop,
        },
    )
    if not model_recall > needed:
        decision.passed = False
        decision.reasons.append(
            f"recall@{k} {model_recall:.4f} does not beat the popularity baseline "
            f"({baseline_recall:.4f} x (1 + {config.min_lift_over_popularity:g}) = {needed:.4f})"
        )
    if previous is None:
        decision.metadata["previous_model"] = "none published before this date"
    elif previous.recall is None:
        decision.metadata["previous_model"] = f"{previous.train_date} (run {previous.mlflow_run_id}) has no recall_at_{k} logged"
    else:
        floor = previous.recall * (1 - config.max_relative_drop)
        decision.metadata.update(
            {
                "previous_train_date": previous.train_date,
                "previous_mlflow_run_id": previous.mlflow_run_id,
                f"previous_recall_at_{k}": previous.recall,
                "previous_threshold": floor,
            }
        )
        if model_recall < floor:
            decision.passed = False
            decision.reasons.append(
                f"recall@{k} {model_recall:.4f} fell more than {config.max_relative_drop:.0%} below the model "
                f"published for {previous.train_date} ({previous.recall:.4f}; floor {floor:.4f})"
            )
    return decision


def previous_published_model(
    warehouse: WarehouseResource, mlflow: MlflowTracking, train_date: dt.date, k: int
) -> PreviousModel | None:
    """The newest date before ``train_date`` in the user embedding history (what consumers
    were served) and the recall@k that model's evaluation logged to MLflow."""
    history = warehouse.table_name(tables.USER_EMBEDDING_HISTORY)
    if not warehouse.table_exists(history):
        return None
    column = quote_identifier(tables.PARTITION_COLUMN)
    rows = warehouse.query(
        f"SELECT {column} AS train_date, MIN(mlflow_run_id) AS mlflow_run_id "
        f"FROM {warehouse.dialect.table(history)} WHERE {column} < {warehouse.dialect.param('train_date')} "
        f"GROUP BY {column} ORDER BY {column} DESC LIMIT 1",
        {"train_date": train_date},
    ).to_pylist()
    if not rows:
        return None
    run_id = rows[0]["mlflow_run_id"]
    logged = mlflow.client().get_run(run_id).data.metrics
    recall = logged.get(f"recall_at_{k}")
    return PreviousModel(str(rows[0]["train_date"]), run_id, None if recall is None else float(recall))


@dg.asset_check(
    asset=EVALUATION_METRICS,
    name=QUALITY_GATE,
    blocking=True,
    partitions_def=training_date_partitions,
    automation_condition=CHECK_CONDITION,
    description=(
        "recall@k beats the popularity baseline and is not more than max_relative_drop below the "
        "previously published model. Blocking: when it fails nothing is published for the date."
    ),
)
def quality_gate(
    context: dg.AssetCheckExecutionContext,
    config: QualityGateConfig,
    warehouse: WarehouseResource,
    artifacts: ArtifactStore,
    mlflow: MlflowTracking,
) -> dg.AssetCheckResult:
    metrics_path = artifacts.require(EVALUATION_METRICS, context.partition_key) / "metrics.csv"
    metrics = pd.read_csv(metrics_path)
    k = gated_k(metrics[metrics["segment"] == "all"], config.k) or config.k
    previous = previous_published_model(warehouse, mlflow, dt.date.fromisoformat(context.partition_key), k)
    decision = decide(metrics, config, previous)
    if not decision.passed:
        context.log.warning(f"Quality gate failed for {context.partition_key}: {decision.description}")
    return dg.AssetCheckResult(
        passed=decision.passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=decision.description,
        metadata={"reason": dg.MetadataValue.text(decision.description), **decision.metadata},
    )
