"""The code location: every asset of the graph and the resources they share.

Loaded by ``dagster dev`` (workspace.yaml / pyproject ``[tool.dagster]``),
``dagster definitions validate`` and ``dagster asset materialize -m twotower_assets.definitions``.
"""

import dagster as dg

from twotower_assets.defs.automation import automation_sensor, training_job, training_schedule
from twotower_assets.defs.checks import quality_gate, split_data_checks
from twotower_assets.defs.datasets import tf_datasets
from twotower_assets.defs.evaluation import evaluation_metrics
from twotower_assets.defs.publishing import item_embedding_history, match_model, user_embedding_history
from twotower_assets.defs.recommendations import recommendations
from twotower_assets.defs.resources import default_resources
from twotower_assets.defs.source import click_events_asset
from twotower_assets.defs.splits import split_tables
from twotower_assets.defs.training import two_tower_model
from twotower_assets.defs.vector_search import similar_items

# Assets that use the warehouse retry transient errors (defs/retries.py: WAREHOUSE_RETRY_POLICY).
ALL_ASSETS = [
    click_events_asset(),
    split_tables,
    tf_datasets,
    two_tower_model,
    evaluation_metrics,
    match_model,
    user_embedding_history,
    item_embedding_history,
    similar_items,
    recommendations,
]

# Blocking checks: split data checks and the model quality gate (twotower_assets/defs/checks.py).
ALL_CHECKS = [split_data_checks, quality_gate]

# One process runs a whole run: TensorFlow loads once, and DuckDB's single-writer file is
# never opened by two steps of the same run at once (docs/decisions.md).
defs = dg.Definitions(
    assets=ALL_ASSETS,
    asset_checks=ALL_CHECKS,
    jobs=[training_job],
    schedules=[training_schedule],
    sensors=[automation_sensor],
    resources=default_resources(),
    executor=dg.in_process_executor,
)
