"""Where things live, from the environment, with defaults that work on a fresh clone.

``TWOTOWER_HOME``      the local data directory (default ``./data``): the DuckDB file, the
                       MLflow store, saved datasets and models.
``TWOTOWER_WAREHOUSE`` ``duckdb`` (default) or ``bigquery``.
``MLFLOW_TRACKING_URI`` overrides the local MLflow store (``sqlite:///$TWOTOWER_HOME/mlflow.db``).
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("TWOTOWER_HOME", "data")).resolve()


def warehouse_kind() -> str:
    kind = os.environ.get("TWOTOWER_WAREHOUSE", "duckdb").strip().lower()
    if kind not in {"duckdb", "bigquery"}:
        raise ValueError(f"TWOTOWER_WAREHOUSE must be 'duckdb' or 'bigquery', not {kind!r}")
    return kind


def duckdb_path() -> Path:
    return Path(os.environ.get("TWOTOWER_DUCKDB_PATH", home() / "warehouse.duckdb"))


def mlflow_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{home() / 'mlflow.db'}")


def mlflow_artifact_root() -> str:
    return os.environ.get("TWOTOWER_MLFLOW_ARTIFACTS", (home() / "mlartifacts").as_uri())
