"""Shared fixtures: tiny data, real DuckDB / MLflow stores in temporary directories.

Plain helpers (the tiny run config, materialising the graph, free ports, ...) are in
tests/helpers/; tests import them from there (``from helpers.graph import materialize_all``).
"""

import os
from pathlib import Path

import pytest

import twotower_assets  # noqa: F401  (sets TF_USE_LEGACY_KERAS before any TensorFlow import)
from helpers.graph import make_resources

# `mlflow server` / `mlflow ui` of MLflow 3 start a job runner whose ~10 huey workers detach
# from the server's process group and outlive it; the tests need no server-side jobs.
os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"


@pytest.fixture
def tiny_resources(tmp_path) -> dict:
    return make_resources(tmp_path / "home")


@pytest.fixture
def tiny_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("TWOTOWER_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def tiny_training(tmp_path_factory):
    """The tiny-features config, its feature stats, the saved dataset of a learnable table
    (helpers.model.learnable_table) and its row count, once per test module."""
    from helpers.model import learnable_table
    from twotower_assets.model.datasets import FeatureStatsBuilder, feature_kinds, load_dataset, save_dataset
    from twotower_assets.model.features import load_feature_config
    from twotower_assets.model.towers import SAMPLING_PROBABILITY_COLUMN

    config = load_feature_config("tiny-features")
    table = learnable_table()
    kinds = {**feature_kinds(config), SAMPLING_PROBABILITY_COLUMN: "number"}
    directory = tmp_path_factory.mktemp("datasets")
    builder = FeatureStatsBuilder(config)
    rows = save_dataset(table.to_batches(max_chunksize=1000), kinds, directory / "train", on_batch=builder.update)
    return config, builder.build(), load_dataset(directory / "train"), rows
