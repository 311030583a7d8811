"""The resources every asset shares, chosen from the environment (see ``settings``)."""


from twotower_assets import settings
from twotower_assets.defs.artifacts import ArtifactStore
from twotower_assets.defs.mlflow_tracking import default_mlflow
from twotower_assets.warehouse.base import WarehouseResource


def default_warehouse() -> WarehouseResource:
    kind = settings.warehouse_kind()
    if kind == "bigquery":
        from twotower_assets.warehouse.bigquery import BigQueryWarehouse

        return BigQueryWarehouse.from_env()
    from twotower_assets.warehouse.duckdb import DuckDBWarehouse

    limit = settings.duckdb_memory_limit()
    return DuckDBWarehouse(path=str(settings.duckdb_path()), **({"memory_limit": limit} if limit else {}))


def default_resources() -> dict:
    return {
        "warehouse": default_warehouse(),
        "mlflow": default_mlflow(),
        "artifacts": ArtifactStore(base_dir=str(settings.home() / "artifacts")),
    }
