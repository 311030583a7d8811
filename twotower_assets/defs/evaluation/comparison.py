"""``model_comparison``: what changed between a date's model and the champion before it.

The champion before a date is the newest earlier date in the user embedding history (what
consumers were served; the quality gate compares against the same model). Its vectors come
from the history tables (the warehouse), the date's own from its trained model, so the
comparison runs for every trained model, before the gate decides whether to publish it.

Figures (:mod:`twotower_assets.model.comparison`): per-user Jaccard of the top-10 and top-100
recommendations (each model ranks its own catalogue; seen items are not removed, so the lists
compare the models, not the users' histories), item-neighbour overlap@50, coverage and mean
popularity of the recommended items for both models, the share of new and dropped users and
items, the Procrustes residual and the distribution of each user's change after alignment.
Each figure is a float in the metadata, so the Dagster UI plots it over dates; the markdown
table and the histograms go to the UI and to the date's MLflow run.

Overlap over dates, cold vs warm: the asset records the model's ``warm_start`` setting (the
MLflow param its training logged) and draws ``overlap_over_dates`` from the earlier
materialisations grouped by that setting, the newest of each (setting, date), one line style
per setting. Backfilling the same dates once with ``warm_start: none`` and once with
``previous`` in one Dagster instance therefore shows both series on one plot (also as JSON
metadata, ``overlap_over_dates``; docs/operations.md, docs/decisions.md).

The ``churn`` check (non-blocking, WARN) flags a date whose recommendations or ids changed
more than configured. Without an earlier champion the asset says so and records no figures.
"""

import datetime as dt

import dagster as dg
import numpy as np
import pyarrow as pa
from pydantic import Field

from twotower_assets import settings
from twotower_assets.lib import layout
from twotower_assets.lib.artifacts import ArtifactStore
from twotower_assets.lib.conditions import DOWNSTREAM_CONDITION
from twotower_assets.lib.layout import ModelFiles
from twotower_assets.lib.metadata import rounded
from twotower_assets.lib.mlflow_tracking import MlflowTracking
from twotower_assets.lib.partitions import training_date, training_date_partitions
from twotower_assets.lib.retries import WAREHOUSE_RETRY_POLICY, StepConfig, retry_transient_errors_only
from twotower_assets.model import plots
from twotower_assets.model.comparison import Embeddings, compare_models, comparison_markdown
from twotower_assets.warehouse.base import WarehouseResource
from twotower_assets.warehouse.queries import (
    item_event_counts_query,
    item_vectors_query,
    latest_partition_before_query,
    user_vectors_query,
)

CHURN_CHECK = "churn"


class ComparisonConfig(StepConfig):
    ks: list[int] = Field(default=[10, 100], min_length=1, description="Top-k cut-offs of the per-user Jaccard.")
    neighbour_k: int = Field(default=50, gt=0, description="Neighbours per item in the item-neighbour overlap.")
    max_users: int = Field(default=5_000, gt=0, description="Shared users compared at most (a seeded sample).")
    max_items: int = Field(default=2_000, gt=0, description="Shared items whose neighbours are compared at most.")
    max_recommendation_churn: float = Field(
        default=0.9, ge=0, le=1,
        description="The churn check warns when 1 - mean Jaccard of the smallest k exceeds this.",
    )
    max_id_churn: float = Field(
        default=0.5, ge=0, le=1,
        description="The churn check warns when the share of new or of dropped users or items exceeds this.",
    )
    seed: int = 0


def _vectors(table: pa.Table, column: str) -> np.ndarray:
    values = table[column].combine_chunks()
    return values.flatten().to_numpy().reshape(len(values), -1).astype(np.float32)


def champion_before(warehouse: WarehouseResource, train_date: dt.date) -> tuple[str, str] | None:
    """(train date, MLflow run id) of the newest published model before ``train_date``."""
    history = warehouse.table_name(layout.USER_EMBEDDING_HISTORY)
    if not warehouse.table_exists(history) or not warehouse.table_exists(warehouse.table_name(layout.ITEM_EMBEDDING_HISTORY)):
        return None
    rows = warehouse.query(latest_partition_before_query(warehouse.dialect, history), {"train_date": train_date}).to_pylist()
    return (str(rows[0]["train_date"]), rows[0]["mlflow_run_id"]) if rows else None


def champion_embeddings(warehouse: WarehouseResource, train_date: dt.date) -> Embeddings:
    params = {"train_date": train_date}
    users = warehouse.query(user_vectors_query(warehouse.dialect, warehouse.table_name(layout.USER_EMBEDDING_HISTORY)), params)
    items = warehouse.query(item_vectors_query(warehouse.dialect, warehouse.table_name(layout.ITEM_EMBEDDING_HISTORY)), params)
    return Embeddings(
        users["user_id"].to_numpy(zero_copy_only=False).astype(str), _vectors(users, "user_embedding"),
        items["item_id"].to_numpy(zero_copy_only=False).astype(str), _vectors(items, "item_embedding"),
    )


def item_popularity(warehouse: WarehouseResource, train_date: dt.date) -> dict[str, float]:
    """Each item's share of the date's training events (the yardstick for both models)."""
    counts = warehouse.query(
        item_event_counts_query(warehouse.dialect, warehouse.table_name(layout.TRAINING_EVENTS)), {"train_date": train_date}
    )
    total = float(sum(counts["events"].to_pylist())) or 1.0
    return {item: events / total for item, events in zip(counts["item_id"].to_pylist(), counts["events"].to_pylist())}


OVER_DATES = ("jaccard_at_10", "jaccard_at_100", "item_neighbour_overlap_at_50")
"""The figures drawn over dates (a backfill's dates side by side)."""


WARM_START = "warm_start"
"""Metadata key of the compared model's ``warm_start`` setting: what the series are grouped by."""
UNRECORDED = "not recorded"
"""The group of materialisations from before the setting was recorded."""


def model_warm_start(mlflow: MlflowTracking, run_id: str) -> str:
    """The ``warm_start`` setting the model's training logged (``none`` for runs without it)."""
    with mlflow.reporting_failures("reading the model's warm_start param"):
        return mlflow.client().get_run(run_id).data.params.get(WARM_START, "none")


def figures_by_warm_start(instance: dg.DagsterInstance, limit: int = 200) -> dict[str, dict[str, dict[str, float]]]:
    """warm_start setting -> date -> the :data:`OVER_DATES` figures of the newest earlier
    materialisation of that date with that setting."""
    records = instance.fetch_materializations(dg.AssetKey(layout.MODEL_COMPARISON), limit=limit).records
    groups: dict[str, dict[str, dict[str, float]]] = {}
    for record in records:  # newest first: the first record of a (setting, date) is its latest
        materialization = record.asset_materialization
        if materialization is None or materialization.partition is None:
            continue
        metadata = materialization.metadata
        group = metadata[WARM_START].value if WARM_START in metadata else UNRECORDED
        by_date = groups.setdefault(group, {})
        values = {name: metadata[name].value for name in OVER_DATES if name in metadata}
        if values and materialization.partition not in by_date:
            by_date[materialization.partition] = values
    return {group: by_date for group, by_date in groups.items() if by_date}


def churn_verdict(summary: dict[str, float], config: ComparisonConfig) -> tuple[bool, list[str]]:
    """Whether churn stays within the configured limits, and what exceeded them."""
    reasons = []
    k = min(config.ks)
    recommendation_churn = 1.0 - summary[f"jaccard_at_{k}"]
    if recommendation_churn > config.max_recommendation_churn:
        reasons.append(f"1 - Jaccard@{k} = {recommendation_churn:.3f} > {config.max_recommendation_churn:g}")
    for name in ("share_new_users", "share_dropped_users", "share_new_items", "share_dropped_items"):
        if summary[name] > config.max_id_churn:
            reasons.append(f"{name} = {summary[name]:.3f} > {config.max_id_churn:g}")
    return not reasons, reasons


@dg.asset(
    key=layout.MODEL_COMPARISON,
    partitions_def=training_date_partitions,
    deps=[layout.TWO_TOWER_MODEL, layout.TRAINING_EVENTS],
    group_name="evaluation",
    kinds={"python", "mlflow", settings.warehouse_kind()},
    description="Top-k overlap, item-neighbour overlap, coverage, popularity bias, id churn and aligned "
    "vector change against the champion before this date.",
    automation_condition=DOWNSTREAM_CONDITION,
    code_version="1",
    retry_policy=WAREHOUSE_RETRY_POLICY,
    check_specs=[
        dg.AssetCheckSpec(
            CHURN_CHECK,
            asset=layout.MODEL_COMPARISON,
            blocking=False,
            partitions_def=training_date_partitions,
            description="Warns (does not block) when recommendations or ids churned more than configured.",
        )
    ],
)
@retry_transient_errors_only
def model_comparison(
    context: dg.AssetExecutionContext,
    config: ComparisonConfig,
    warehouse: WarehouseResource,
    artifacts: ArtifactStore,
    mlflow: MlflowTracking,
) -> dg.MaterializeResult:
    model = ModelFiles(artifacts.require(layout.TWO_TOWER_MODEL, context.partition_key))
    summary = model.summary()
    train_date = training_date(context)
    previous = champion_before(warehouse, train_date)
    if previous is None:
        reason = f"no champion before {context.partition_key}: nothing to compare with"
        context.log.info(reason)
        return dg.MaterializeResult(
            metadata={"compared_with": "none", "reason": reason},
            check_results=[dg.AssetCheckResult(check_name=CHURN_CHECK, passed=True, description=reason)],
        )
    previous_date, previous_run = previous
    user_ids, user_vectors = model.user_vectors(summary.user_key)
    item_ids, item_vectors = model.item_vectors()
    result = compare_models(
        champion_embeddings(warehouse, dt.date.fromisoformat(previous_date)),
        Embeddings(user_ids.astype(str), user_vectors, item_ids.astype(str), item_vectors),
        item_popularity(warehouse, train_date),
        ks=config.ks, neighbour_k=config.neighbour_k, max_users=config.max_users, max_items=config.max_items,
        seed=config.seed,
    )
    markdown = comparison_markdown(result.summary, f"champion {previous_date}", context.partition_key)
    figures = {
        "recommendation_overlap": plots.histograms_png(
            {f"Jaccard@{k}": values for k, values in result.jaccard.items()},
            "per-user Jaccard", f"Top-k overlap with the champion of {previous_date}",
        ),
        "item_neighbour_overlap": plots.histograms_png(
            {f"overlap@{config.neighbour_k}": result.neighbour_overlap},
            "share of shared neighbours", "Item-neighbour overlap",
        ),
    }
    if len(result.user_change):
        figures["user_vector_change"] = plots.histograms_png(
            {"||old R - new||": result.user_change}, "distance after Procrustes alignment", "User-vector change"
        )
    setting = model_warm_start(mlflow, summary.mlflow_run_id)
    over_dates = figures_by_warm_start(context.instance)
    over_dates.setdefault(setting, {})[context.partition_key] = {
        name: result.summary[name] for name in OVER_DATES if name in result.summary
    }
    figures["overlap_over_dates"] = plots.grouped_series_over_dates_png(
        over_dates, "Overlap with the champion before each date, by warm_start", "mean overlap"
    )
    passed, reasons = churn_verdict(result.summary, config)
    with artifacts.writing(layout.MODEL_COMPARISON, context.partition_key) as directory, mlflow.active(summary.mlflow_run_id) as run:
        (directory / "comparison.md").write_text(markdown)
        run.metrics({f"comparison_{name}": value for name, value in result.summary.items() if np.isfinite(value)})
        run.text(markdown, "comparison.md", "comparison")
        for name, png in figures.items():
            (directory / f"{name}.png").write_bytes(png)
            run.artifact(directory / f"{name}.png", "comparison")
    if not passed:
        context.log.warning(f"Churn against {previous_date}: {'; '.join(reasons)}")
    return dg.MaterializeResult(
        metadata={
            "compared_with": previous_date,
            "champion_mlflow_run_id": previous_run,
            WARM_START: setting,
            "overlap_over_dates": dg.MetadataValue.json({
                group: {date: {name: round(value, 4) for name, value in values.items()}
                        for date, values in sorted(by_date.items())}
                for group, by_date in sorted(over_dates.items())
            }),
            "comparison": dg.MetadataValue.md(markdown),
            **{name: rounded(value) for name, value in result.summary.items()},
            **{f"plot_{name}": dg.MetadataValue.md(plots.markdown_image(png, name)) for name, png in figures.items()},
            "mlflow_run_url": dg.MetadataValue.url(mlflow.run_url(summary.mlflow_experiment_id, summary.mlflow_run_id)),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=CHURN_CHECK,
                passed=passed,
                severity=dg.AssetCheckSeverity.WARN,
                description="; ".join(reasons) or "within limits",
                metadata={
                    "compared_with": previous_date,
                    "max_recommendation_churn": config.max_recommendation_churn,
                    "max_id_churn": config.max_id_churn,
                },
            )
        ],
    )
