"""The resources every asset shares, chosen from the environment (``twotower_assets.settings``).

* ``warehouse``: DuckDB (the embedded default) or BigQuery (``TWOTOWER_WAREHOUSE=bigquery``),
  both :class:`~twotower_assets.warehouse.base.WarehouseResource`;
* ``mlflow``: the MLflow tracking store or server (:class:`~twotower_assets.lib.mlflow_tracking.MlflowTracking`);
* ``artifacts``: the directories of file-based assets (:class:`~twotower_assets.lib.artifacts.ArtifactStore`).
"""

import os

import dagster as dg

from twotower_assets import settings
from twotower_assets.lib.artifacts import ArtifactStore
from twotower_assets.lib.mlflow_tracking import MlflowTracking
from twotower_assets.warehouse.base import WarehouseResource


def default_warehouse() -> WarehouseResource:
    if settings.warehouse_kind() == "bigquery":
        from twotower_assets.warehouse.bigquery import BigQueryWarehouse

        return BigQueryWarehouse.from_env()
    from twotower_assets.warehouse.duckdb import DuckDBWarehouse

    limit = settings.duckdb_memory_limit()
    return DuckDBWarehouse(
        path=str(settings.duckdb_path()),
        path_setting="TWOTOWER_DUCKDB_PATH" if os.environ.get("TWOTOWER_DUCKDB_PATH") else "TWOTOWER_HOME",
        **({"memory_limit": limit} if limit else {}),
    )


def default_mlflow() -> MlflowTracking:
    # From the environment as an EnvVar: the Dagster UI then shows the variable's name, never a
    # URI that may carry a database password (postgresql://user:password@host/db).
    return MlflowTracking(
        tracking_uri=dg.EnvVar("MLFLOW_TRACKING_URI") if os.environ.get("MLFLOW_TRACKING_URI") else settings.mlflow_tracking_uri(),
        artifact_root=settings.mlflow_artifact_root(),
        # Named in the run-start check's error (the default store lives in TWOTOWER_HOME).
        tracking_uri_setting="MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "TWOTOWER_HOME",
        artifact_root_setting="TWOTOWER_MLFLOW_ARTIFACTS" if os.environ.get("TWOTOWER_MLFLOW_ARTIFACTS") else "TWOTOWER_HOME",
    )


def default_resources() -> dict:
    return {
        "warehouse": default_warehouse(),
        "mlflow": default_mlflow(),
        "artifacts": ArtifactStore(base_dir=str(settings.home() / "artifacts")),
    }


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources=default_resources())
