"""The tiny asset graph: resources rooted in a temporary home, the tiny run config, and
in-process materialisation of the whole graph (or a selection of it) with its checks."""

from pathlib import Path

import dagster as dg
import yaml

import twotower_assets  # noqa: F401  (sets TF_USE_LEGACY_KERAS before any TensorFlow import)
from twotower_assets.lib.artifacts import ArtifactStore
from twotower_assets.lib.mlflow_tracking import MlflowTracking
from twotower_assets.warehouse.duckdb import DuckDBWarehouse

REPO = Path(__file__).resolve().parents[2]
TINY_PARTITION = "2026-06-01"


def make_resources(home: Path) -> dict:
    """The embedded default's resources, rooted in ``home``."""
    home.mkdir(parents=True, exist_ok=True)
    return {
        "warehouse": DuckDBWarehouse(path=str(home / "warehouse.duckdb")),
        "mlflow": MlflowTracking(
            tracking_uri=f"sqlite:///{home / 'mlflow.db'}",
            artifact_root=(home / "mlartifacts").as_uri(),
        ),
        "artifacts": ArtifactStore(base_dir=str(home / "artifacts")),
    }


def tiny_run_config(**overrides: dict) -> dict:
    """configs/run/tiny.yaml, with per-asset config overrides merged in."""
    config = yaml.safe_load((REPO / "configs" / "run" / "tiny.yaml").read_text())
    for asset, values in overrides.items():
        config["ops"].setdefault(asset, {"config": {}})["config"].update(values)
    return config


def materialize_all(resources: dict, partition_key: str = TINY_PARTITION, run_config: dict | None = None,
                    selection=None, instance: dg.DagsterInstance | None = None, raise_on_error: bool = True):
    from twotower_assets.definitions import ALL_ASSETS, ALL_CHECKS

    return dg.materialize(
        [*ALL_ASSETS, *ALL_CHECKS],
        selection=selection,
        resources=resources,
        partition_key=partition_key,
        run_config=run_config or tiny_run_config(),
        instance=instance or dg.DagsterInstance.ephemeral(),
        raise_on_error=raise_on_error,
    )


def failure_text(result) -> str:
    """Every step failure's message, causes included (the error a user sees in the UI)."""
    texts = []
    for event in result.all_events:
        if event.event_type_value != "STEP_FAILURE":
            continue
        error = event.event_specific_data.error
        while error is not None:
            texts.append(error.message)
            error = error.cause or error.context
    assert texts, "expected a step failure"
    return "\n".join(texts)


def metadata_of(result, asset_key):
    """The metadata of ``asset_key``'s one materialisation in ``result``."""
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == asset_key]
    return event.materialization.metadata
