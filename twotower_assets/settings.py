"""Where things live, from the environment, with defaults that work on a fresh clone.

``TWOTOWER_HOME``      the local data directory (default ``./data``): the DuckDB file, the
                       MLflow store, saved datasets and models.
``TWOTOWER_WAREHOUSE`` ``duckdb`` (default) or ``bigquery``.
``MLFLOW_TRACKING_URI`` overrides the local MLflow store (``sqlite:///$TWOTOWER_HOME/mlflow.db``).
``TWOTOWER_OPTUNA_STORAGE`` where tuning keeps its studies (default: ``optuna.db`` beside the MLflow store).
``TWOTOWER_DUCKDB_MEMORY_LIMIT`` DuckDB's memory limit (default ``2GB``; past it DuckDB spills to disk).
``TWOTOWER_ASSET_OWNERS`` owners of every asset, comma-separated (default ``team:recommendations``).
``TWOTOWER_ASSET_TAGS``   tags of every asset, ``key=value`` comma-separated (default ``pipeline=two_tower``).
``TWOTOWER_MOVIELENS_PATH`` MovieLens 100K's directory, for ``click_events`` with ``source: movielens``
                         when the run config names no ``movielens_path``.

BigQuery (``TWOTOWER_WAREHOUSE=bigquery``; docs/bigquery.md is the guide):

``TWOTOWER_ENV``                     ``dev`` (default), ``stg`` or ``prod``: the dataset suffix.
``TWOTOWER_BQ_PROJECT``              GCP project (default: ``GOOGLE_CLOUD_PROJECT``, then ADC's).
``TWOTOWER_BQ_DATASET``              dataset of the pipeline's tables (default ``ml_preproc_<env>``).
``TWOTOWER_BQ_LOCATION``             dataset / job location (default ``EU``).
``TWOTOWER_BQ_CLICK_EVENTS_TABLE``   ``project.dataset.table`` of the production click events; when
                                     set, ``click_events`` is an external input, not generated.
``TWOTOWER_BQ_PARTITION_EXPIRATION_DAYS`` partition expiration of the partitioned tables (183).
``TWOTOWER_GCP_CREDENTIALS``         base64 service-account key; unset: application default credentials.
``TWOTOWER_BQ_ENDPOINT`` / ``BIGQUERY_EMULATOR_HOST`` a BigQuery emulator (anonymous credentials).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("TWOTOWER_HOME", "data")).resolve()


def movielens_path() -> str | None:
    """``TWOTOWER_MOVIELENS_PATH``, or None."""
    return os.environ.get("TWOTOWER_MOVIELENS_PATH", "").strip() or None


def warehouse_kind() -> str:
    kind = os.environ.get("TWOTOWER_WAREHOUSE", "duckdb").strip().lower()
    if kind not in {"duckdb", "bigquery"}:
        raise ValueError(f"TWOTOWER_WAREHOUSE must be 'duckdb' or 'bigquery', not {kind!r}")
    return kind


def duckdb_path() -> Path:
    return Path(os.environ.get("TWOTOWER_DUCKDB_PATH", home() / "warehouse.duckdb"))


def duckdb_memory_limit() -> str | None:
    """``TWOTOWER_DUCKDB_MEMORY_LIMIT`` (e.g. ``4GB``), or None for the warehouse's default."""
    return os.environ.get("TWOTOWER_DUCKDB_MEMORY_LIMIT") or None


def mlflow_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{home() / 'mlflow.db'}")


def optuna_storage() -> str | None:
    """``TWOTOWER_OPTUNA_STORAGE``: an Optuna storage URL for tuning's studies (unset: an SQLite
    file beside the local MLflow store)."""
    return os.environ.get("TWOTOWER_OPTUNA_STORAGE") or None


def mlflow_artifact_root() -> str:
    return os.environ.get("TWOTOWER_MLFLOW_ARTIFACTS", (home() / "mlartifacts").as_uri())


DEPLOYMENT_ENVS = ("dev", "stg", "prod")


def deployment_env() -> str:
    env = os.environ.get("TWOTOWER_ENV", "dev").strip().lower()
    if env not in DEPLOYMENT_ENVS:
        raise ValueError(f"TWOTOWER_ENV must be one of {', '.join(DEPLOYMENT_ENVS)}, not {env!r}")
    return env


def bigquery_click_events_table() -> str | None:
    """The production click-event table on BigQuery, or None (synthetic events)."""
    if warehouse_kind() != "bigquery":
        return None
    return os.environ.get("TWOTOWER_BQ_CLICK_EVENTS_TABLE") or None




@dataclass(frozen=True)
class BigQuerySettings:
    """The BigQuery warehouse as the variables above describe it (all read in this module, so the
    warehouse itself reads no TWOTOWER_* variable)."""

    project: str | None
    location: str
    dataset: str
    endpoint: str | None
    # The variable's name, not its value: the resource gets an EnvVar, so the key is never shown.
    credentials_variable: str | None
    # {table name the pipeline asks for: project.dataset.table read in its place}
    external_tables: dict[str, str]
    partition_expiration_days: int


def bigquery_settings() -> BigQuerySettings:
    """The BigQuery variables with their defaults (ValueError for a bad TWOTOWER_ENV)."""
    # The pipeline's name for the table TWOTOWER_BQ_CLICK_EVENTS_TABLE stands in for.
    from twotower_assets.lib.layout import CLICK_EVENTS

    env = deployment_env()
    click_events_table = bigquery_click_events_table()
    return BigQuerySettings(
        project=os.environ.get("TWOTOWER_BQ_PROJECT") or os.environ.get("GOOGLE_CLOUD_PROJECT") or None,
        location=os.environ.get("TWOTOWER_BQ_LOCATION", "EU"),
        dataset=os.environ.get("TWOTOWER_BQ_DATASET") or f"ml_preproc_{env}",
        endpoint=os.environ.get("TWOTOWER_BQ_ENDPOINT") or None,
        credentials_variable="TWOTOWER_GCP_CREDENTIALS" if os.environ.get("TWOTOWER_GCP_CREDENTIALS") else None,
        external_tables={CLICK_EVENTS: click_events_table} if click_events_table else {},
        partition_expiration_days=int(os.environ.get("TWOTOWER_BQ_PARTITION_EXPIRATION_DAYS", "183")),
    )


def asset_owners() -> list[str]:
    """``TWOTOWER_ASSET_OWNERS``: comma-separated owners of every asset (emails or ``team:name``)."""
    raw = os.environ.get("TWOTOWER_ASSET_OWNERS", "team:recommendations")
    return [owner.strip() for owner in raw.split(",") if owner.strip()]


def asset_tags() -> dict[str, str]:
    """``TWOTOWER_ASSET_TAGS``: ``key=value`` pairs, comma-separated, put on every asset."""
    raw = os.environ.get("TWOTOWER_ASSET_TAGS", "pipeline=two_tower")
    tags = {}
    for pair in filter(None, (p.strip() for p in raw.split(","))):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"TWOTOWER_ASSET_TAGS must be key=value pairs separated by commas, not {raw!r}")
        tags[key.strip()] = value.strip()
    return tags
