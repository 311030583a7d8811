"""training_launcher = pipes: the training step runs in a process launched through Dagster Pipes."""

import json

import dagster as dg
import pytest
from helpers.graph import TINY_PARTITION, make_resources, materialize_all, tiny_run_config



@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    resources = make_resources(tmp_path_factory.mktemp("launcher") / "home")
    config = tiny_run_config(two_tower_model={"training_launcher": "pipes"})
    selection = dg.AssetSelection.assets("evaluation_metrics").upstream()
    ops = {name: value for name, value in config["ops"].items() if not name.startswith(("match", "two_tower_recommendations"))}
    result = materialize_all(resources, TINY_PARTITION, run_config={"ops": ops}, selection=selection)
    return resources, result


@pytest.mark.slow
def test_pipes_launch_materialises_the_model_with_the_same_outputs(launched):
    resources, result = launched
    assert result.success
    metadata = result.asset_materializations_for_node("two_tower_model")[0].metadata
    # The metadata comes back through Pipes with its types (url, path, numbers).
    assert isinstance(metadata["mlflow_run_url"], dg.UrlMetadataValue)
    assert isinstance(metadata["path"], dg.PathMetadataValue)
    assert metadata["epochs_run"].value == 2 and metadata["users"].value > 0
    model_dir = resources["artifacts"].path("two_tower_model", TINY_PARTITION)
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["mlflow_run_id"] == metadata["mlflow_run_id"].value
    for name in ("user_embeddings.parquet", "item_embeddings.parquet", "user_tower", "item_tower"):
        assert (model_dir / name).exists()
    # The MLflow run names the Dagster run that launched the training, not the inner one.
    run = resources["mlflow"].client().get_run(summary["mlflow_run_id"])
    assert run.data.tags["dagster_run_id"] == result.run_id
    # Downstream assets read the launched model like a local one.
    assert result.asset_materializations_for_node("evaluation_metrics")


@pytest.mark.slow
def test_a_failing_launched_training_fails_the_asset_and_keeps_the_model(launched):
    resources, _ = launched
    model_dir = resources["artifacts"].path("two_tower_model", TINY_PARTITION)
    before = (model_dir / "summary.json").read_text()
    # An unknown feature config makes the launched process fail.
    (resources["artifacts"].path("tf_datasets", TINY_PARTITION) / "feature_config.json").rename(
        resources["artifacts"].path("tf_datasets", TINY_PARTITION) / "feature_config.json.moved"
    )
    try:
        result = materialize_all(
            resources, TINY_PARTITION, raise_on_error=False,
            run_config={"ops": {"two_tower_model": {"config": {"training_launcher": "pipes", "schedule": {"epochs": 1}}}}},
            selection=dg.AssetSelection.assets("two_tower_model"),
        )
    finally:
        (resources["artifacts"].path("tf_datasets", TINY_PARTITION) / "feature_config.json.moved").rename(
            resources["artifacts"].path("tf_datasets", TINY_PARTITION) / "feature_config.json"
        )
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = str(failure.step_failure_data.error.cause or failure.step_failure_data.error)
    assert "training launched through Pipes failed: FileNotFoundError" in message and "feature_config.json" in message
    assert (model_dir / "summary.json").read_text() == before


def test_launcher_setting_is_validated():
    with pytest.raises(dg.DagsterInvalidConfigError, match="training_launcher"):
        materialize_all(
            make_resources(__import__("pathlib").Path(__import__("tempfile").mkdtemp())),
            TINY_PARTITION,
            run_config={"ops": {"two_tower_model": {"config": {"training_launcher": "ssh"}}}},
            selection=dg.AssetSelection.assets("two_tower_model"),
        )
