"""Two weekly dates through the whole graph: the second warm-starts from the first's champion
and is compared with it (model_comparison and its churn check)."""

import dagster as dg
import pytest
from mlflow import MlflowClient

from helpers.graph import TINY_PARTITION, make_resources, materialize_all, metadata_of, tiny_run_config
from twotower_assets.definitions import ALL_ASSETS
from twotower_assets.defs.evaluation.comparison import figures_by_warm_start
from twotower_assets.defs.training.warm_start_source import previous_model_date, resolve_warm_start
from twotower_assets.lib import layout

FIRST = "2026-05-25"

pytestmark = pytest.mark.slow  # two dates through the whole graph


def churn_check(result) -> dg.AssetCheckEvaluation:
    [evaluation] = [
        e.event_specific_data for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION" and e.event_specific_data.check_name == "churn"
    ]
    return evaluation


@pytest.fixture(scope="module")
def two_dates(tmp_path_factory):
    home = tmp_path_factory.mktemp("lifecycle")
    resources = make_resources(home)
    instance = dg.DagsterInstance.ephemeral()  # one instance: the second date sees the first's history
    config = tiny_run_config(two_tower_model={"warm_start": "champion"})
    # Every event day both dates read, in one events backfill (a partition range) first.
    events = dg.materialize(
        ALL_ASSETS, selection=[layout.CLICK_EVENTS], resources=resources, instance=instance,
        run_config={"ops": {layout.CLICK_EVENTS: config["ops"][layout.CLICK_EVENTS]}},
        tags={"dagster/asset_partition_range_start": "2026-04-15", "dagster/asset_partition_range_end": "2026-05-31"},
    )
    assert events.success
    first = materialize_all(resources, FIRST, run_config=config, instance=instance)
    second = materialize_all(resources, TINY_PARTITION, run_config=config, instance=instance)
    assert first.success and second.success
    return resources, first, second, instance


def test_the_first_date_starts_cold_and_has_nothing_to_compare(two_dates):
    resources, first, _, _ = two_dates
    model = metadata_of(first, layout.TWO_TOWER_MODEL)
    assert model["warm_start_from"].value == "none"
    assert "no champion yet" in model["warm_start_reason"].value
    comparison = metadata_of(first, layout.MODEL_COMPARISON)
    assert comparison["compared_with"].value == "none"
    assert churn_check(first).passed


def test_the_second_date_warm_starts_from_the_champion_and_logs_it(two_dates):
    resources, _, second, _ = two_dates
    model = metadata_of(second, layout.TWO_TOWER_MODEL)
    assert model["warm_start_from"].value == f"champion:{FIRST}"
    # The tiny data keeps every item and nearly every user from one week to the next.
    assert model["warm_start/item_tower.item_id_string.carried"].value > 0
    run = MlflowClient(tracking_uri=resources["mlflow"].tracking_uri).get_run(model["mlflow_run_id"].value)
    assert run.data.params["warm_start"] == "champion"
    assert run.data.params["warm_start_from"] == f"champion:{FIRST}"


def test_the_second_date_is_compared_with_the_first(two_dates):
    resources, _, second, _ = two_dates
    comparison = metadata_of(second, layout.MODEL_COMPARISON)
    assert comparison["compared_with"].value == FIRST
    for name in ("jaccard_at_10", "jaccard_at_100", "item_neighbour_overlap_at_50", "old_coverage_at_100",
                 "new_coverage_at_100", "old_mean_popularity_at_100", "share_new_users", "share_dropped_items"):
        assert 0.0 <= comparison[name].value <= 1.0, name
    assert comparison["procrustes_residual"].value >= 0.0
    assert "| jaccard_at_10 |" in comparison["comparison"].value
    assert comparison["plot_recommendation_overlap"].value.startswith("![")
    assert comparison["plot_overlap_over_dates"].value.startswith("![")
    check = churn_check(second)
    assert check.severity == dg.AssetCheckSeverity.WARN
    run_id = metadata_of(second, layout.TWO_TOWER_MODEL)["mlflow_run_id"].value
    client = MlflowClient(tracking_uri=resources["mlflow"].tracking_uri)
    assert "comparison_jaccard_at_10" in client.get_run(run_id).data.metrics
    logged = {a.path for a in client.list_artifacts(run_id, "comparison")}
    assert {"comparison/comparison.md", "comparison/recommendation_overlap.png"} <= logged


def test_a_low_churn_threshold_warns_without_blocking(two_dates):
    resources, _, _, instance = two_dates
    config = tiny_run_config(model_comparison={"max_recommendation_churn": 0.0, "max_id_churn": 0.0})
    result = materialize_all(
        resources, TINY_PARTITION, selection=[layout.MODEL_COMPARISON], instance=instance,
        run_config={"ops": {layout.MODEL_COMPARISON: config["ops"][layout.MODEL_COMPARISON]}},
    )
    check = churn_check(result)
    assert result.success and not check.passed and "Jaccard@10" in check.description
    # The overlap-over-dates plot reads earlier materialisations, grouped by the model's
    # warm_start: the second date's, not the first's (it had nothing to compare with).
    history = figures_by_warm_start(instance)
    assert set(history) == {"champion"} and set(history["champion"]) == {TINY_PARTITION}
    assert 0.0 <= history["champion"][TINY_PARTITION]["jaccard_at_10"] <= 1.0


def test_previous_picks_the_newest_earlier_saved_model(two_dates):
    resources, _, _, _ = two_dates
    artifacts = resources["artifacts"]
    assert previous_model_date(artifacts, TINY_PARTITION) == FIRST
    assert previous_model_date(artifacts, FIRST) is None
    source = resolve_warm_start("previous", "2026-06-08", artifacts, resources["mlflow"])
    assert source.label == f"previous:{TINY_PARTITION}"
    assert resolve_warm_start("none", TINY_PARTITION, artifacts, resources["mlflow"]).model is None


def test_warm_start_champion_loads_the_champions_own_run_not_a_later_retrain(two_dates):
    """An unpublished retrain of the champion's date is that date's current model, not the champion."""
    resources, _, second, instance = two_dates
    artifacts, client = resources["artifacts"], MlflowClient(tracking_uri=resources["mlflow"].tracking_uri)
    champion_run = client.get_model_version_by_alias("two_tower_match", "champion").run_id
    assert champion_run == metadata_of(second, layout.TWO_TOWER_MODEL)["mlflow_run_id"].value
    champion_version = artifacts.current_version(layout.TWO_TOWER_MODEL, TINY_PARTITION)
    retrain = materialize_all(resources, TINY_PARTITION, selection=[layout.TWO_TOWER_MODEL], instance=instance,
                              run_config={"ops": {layout.TWO_TOWER_MODEL: tiny_run_config()["ops"][layout.TWO_TOWER_MODEL]}})
    assert retrain.success
    assert artifacts.current_version(layout.TWO_TOWER_MODEL, TINY_PARTITION) != champion_version
    source = resolve_warm_start("champion", "2026-06-08", artifacts, resources["mlflow"])
    assert source.model.root.name == champion_version
    assert f"MLflow run {champion_run}" in source.reason and champion_version in source.reason
