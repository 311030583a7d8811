"""The quality gate: a blocking check on ``evaluation_metrics`` that decides what is published.

The model's recall@k must beat the popularity baseline (by ``min_lift_over_popularity``) and
must not fall more than ``max_relative_drop`` below the previously *published* model (the
newest earlier date in the embedding history table; its recall comes from that model's MLflow
run). It is also compared with the strongest simple baseline the evaluation could afford:
EASE up to ``EvaluationConfig.ease_max_items`` items (10,000: a dense items x items inverse),
item-kNN above. Falling short of that one warns by default (``strongest_baseline: warn``) and
blocks with ``block``: docs/decisions.md says why. The lift over every baseline is reported.
When the gate fails, ``match_model`` and everything published from it do not run for that
date (the check is blocking), and the check's description and metadata in the UI say why.
"""

import datetime as dt
import warnings
from dataclasses import dataclass, field
from typing import Literal

import dagster as dg
import pandas as pd
from pydantic import Field

from twotower_assets.lib import layout
from twotower_assets.lib.artifacts import ArtifactStore
from twotower_assets.lib.conditions import CHECK_CONDITION
from twotower_assets.lib.layout import EvaluationFiles, MatchModelFiles
from twotower_assets.lib.mlflow_tracking import MlflowTracking
from twotower_assets.lib.partitions import training_date_partitions
from twotower_assets.warehouse.base import WarehouseResource
from twotower_assets.serving.registry import record_gate
from twotower_assets.warehouse.queries import latest_partition_before_query

# Partitioned checks (one result per training date) are a preview feature in Dagster 1.13;
# without them a backfill's dates would share one check status.
warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec", category=dg.PreviewWarning)

BASELINE = "popularity"
STRONGEST_BASELINES = ("ease", "item_knn")
"""In order of preference: the evaluation computes EASE up to its item bound, item-kNN above it."""


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
    strongest_baseline: Literal["warn", "block"] = Field(
        default="warn",
        description="When recall@k does not beat the strongest simple baseline (EASE, or item-kNN above "
        "EASE's item bound): warn (publish, and say so) or block (publish nothing).",
    )
    min_lift_over_strongest: float = Field(
        default=0.0, ge=-1.0, description="recall@k must exceed the strongest baseline's x (1 + this)."
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
    warnings: list[str] = field(default_factory=list)

    @property
    def description(self) -> str:
        text = "; ".join(self.reasons) if self.reasons else "passed"
        return text + "".join(f"; warning: {warning}" for warning in self.warnings)


def gated_k(metrics: pd.DataFrame, k: int) -> int | None:
    """The largest evaluated k not above ``k`` (evaluation caps ks at the catalog size)."""
    return layout.largest_k_up_to(metrics["k"].unique(), k)


def decide(metrics: pd.DataFrame, config: QualityGateConfig, previous: PreviousModel | None) -> GateDecision:
    """Apply the gate to one date's metrics table (columns model, segment, k, recall, ...)."""
    overall = metrics[metrics["segment"] == "all"]
    k = gated_k(overall, config.k)
    if k is None:
        return GateDecision(False, [f"no recall evaluated at k <= {config.k}"], {"gate_k": config.k})
    recall = overall.set_index(["model", "k"])["recall"]
    if (layout.EVALUATED_MODEL, k) not in recall.index or (BASELINE, k) not in recall.index:
        return GateDecision(False, [f"metrics lack {layout.EVALUATED_MODEL} or {BASELINE} recall@{k}"], {"gate_k": k})
    model_recall, baseline_recall = float(recall[(layout.EVALUATED_MODEL, k)]), float(recall[(BASELINE, k)])
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
    for baseline in sorted({model for model, at in recall.index if at == k} - {layout.EVALUATED_MODEL}):
        value = float(recall[(baseline, k)])
        decision.metadata[f"lift_over_{baseline}_at_{k}"] = model_recall / value if value else float("nan")
    strongest = next((b for b in STRONGEST_BASELINES if (b, k) in recall.index), None)
    if strongest is None:
        decision.metadata["strongest_baseline"] = "none evaluated (popularity only)"
    else:
        strongest_recall = float(recall[(strongest, k)])
        threshold = strongest_recall * (1 + config.min_lift_over_strongest)
        decision.metadata.update({
            "strongest_baseline": strongest,
            f"{strongest}_recall_at_{k}": strongest_recall,
            "strongest_baseline_policy": config.strongest_baseline,
        })
        if not model_recall > threshold:
            shortfall = (f"recall@{k} {model_recall:.4f} does not beat the strongest simple baseline, {strongest} "
                         f"({strongest_recall:.4f} x (1 + {config.min_lift_over_strongest:g}) = {threshold:.4f})")
            if config.strongest_baseline == "block":
                decision.passed = False
                decision.reasons.append(shortfall)
            else:
                decision.warnings.append(shortfall)
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
    history = warehouse.table_name(layout.USER_EMBEDDING_HISTORY)
    if not warehouse.table_exists(history):
        return None
    rows = warehouse.query(
        latest_partition_before_query(warehouse.dialect, history), {"train_date": train_date}
    ).to_pylist()
    if not rows:
        return None
    run_id = rows[0]["mlflow_run_id"]
    return PreviousModel(str(rows[0]["train_date"]), run_id, logged_recall(mlflow.client(), run_id, k))


def logged_recall(client, run_id: str, k: int) -> float | None:
    """The model's recall@k that the evaluation logged to ``run_id``: the point at step k of its
    ``recall_at_k`` curve, else a plain ``recall_at_<k>`` (older runs logged every k that way)."""
    curve = [m for m in client.get_metric_history(run_id, layout.evaluation_metric_key(layout.EVALUATED_MODEL, "recall"))
             if m.step == k]
    if curve:
        return float(max(curve, key=lambda m: m.timestamp).value)
    recall = client.get_run(run_id).data.metrics.get(layout.evaluation_metric_key(layout.EVALUATED_MODEL, "recall", k))
    return None if recall is None else float(recall)


@dg.asset_check(
    asset=layout.EVALUATION_METRICS,
    name=layout.QUALITY_GATE,
    blocking=True,
    partitions_def=training_date_partitions,
    automation_condition=CHECK_CONDITION,
    description=(
        "recall@k beats the popularity baseline and is not more than max_relative_drop below the "
        "previously published model. Blocking: when it fails nothing is published for the date. Tags the "
        "registered MatchModel version gate=passed or gate=failed."
    ),
)
def quality_gate(
    context: dg.AssetCheckExecutionContext,
    config: QualityGateConfig,
    warehouse: WarehouseResource,
    artifacts: ArtifactStore,
    mlflow: MlflowTracking,
) -> dg.AssetCheckResult:
    metrics_path = EvaluationFiles(artifacts.require(layout.EVALUATION_METRICS, context.partition_key)).metrics
    metrics = pd.read_csv(metrics_path)
    k = gated_k(metrics[metrics["segment"] == "all"], config.k) or config.k
    previous = previous_published_model(warehouse, mlflow, dt.date.fromisoformat(context.partition_key), k)
    decision = decide(metrics, config, previous)
    if not decision.passed:
        context.log.warning(f"Quality gate failed for {context.partition_key}: {decision.description}")
    elif decision.warnings:
        context.log.warning(f"Quality gate passed for {context.partition_key} with a warning: {decision.description}")
    verdict = record_verdict(artifacts, mlflow, context.partition_key, decision)
    return dg.AssetCheckResult(
        passed=decision.passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=decision.description,
        metadata={"reason": dg.MetadataValue.text(decision.description), **decision.metadata, **verdict},
    )


def record_verdict(artifacts: ArtifactStore, mlflow: MlflowTracking, partition_key: str, decision: GateDecision) -> dict:
    """Tag the registered MatchModel version of the date ``gate=passed|failed`` with the numbers.

    The alias ``champion`` is not moved here: it moves once everything of the date is
    published (the ``champion`` asset), so consumers never follow it to a half-published date.
    """
    directory = artifacts.path(layout.MATCH_MODEL, partition_key)
    if not MatchModelFiles(directory).registration_file.is_file():
        return {"registered_version": "none: match_model has not registered this date"}
    registration = MatchModelFiles(directory).registration()
    with mlflow.reporting_failures(f"tagging {registration.name} version {registration.version}"):
        record_gate(mlflow.client(), registration.name, registration.version, decision.passed, decision.metadata)
    return {
        "registered_version": f"{registration.name} v{registration.version}",
        "model_version_url": dg.MetadataValue.url(mlflow.model_version_url(registration.name, registration.version)),
    }
