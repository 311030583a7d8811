"""Backfilling three weekly dates with and without warm start in one Dagster instance:
``model_comparison`` records each date's overlap with the champion before it, grouped by the
model's ``warm_start`` setting, and draws both series on one overlap-over-dates plot.

The dates run one after another, as the foreground loop of docs/operations.md does, so each
warm date starts from the date before it. A champion before the backfill (an earlier date)
gives every backfilled date something to compare with. Only what the comparison needs runs:
the splits, datasets, model, embedding history and comparison (1 epoch, the tiny data).
"""

import dagster as dg
import pytest

from helpers.graph import make_resources, materialize_all, metadata_of, tiny_run_config
from twotower_assets.definitions import ALL_ASSETS
from twotower_assets.defs.evaluation.comparison import OVER_DATES, figures_by_warm_start
from twotower_assets.lib import layout

CHAMPION = "2026-05-11"
DATES = ["2026-05-18", "2026-05-25", "2026-06-01"]
DATA = [layout.TRAINING_EVENTS, layout.VALIDATION_EVENTS, layout.TEST_EVENTS, layout.TF_DATASETS]
HISTORY = [layout.USER_EMBEDDING_HISTORY, layout.ITEM_EMBEDDING_HISTORY]

pytestmark = pytest.mark.slow  # seven trainings and their comparisons


def run_config(ops: list[str], warm_start: str) -> dict:
    """tiny.yaml's config of ``ops`` (op names: the three splits are one op, split_tables)."""
    config = tiny_run_config(two_tower_model={"schedule": {"epochs": 1}, "warm_start": warm_start})["ops"]
    return {"ops": {name: config[name] for name in ops}}


@pytest.fixture(scope="module")
def backfills(tmp_path_factory):
    resources = make_resources(tmp_path_factory.mktemp("lifecycle-backfill"))
    instance = dg.DagsterInstance.ephemeral()  # one instance, like the UI: both backfills in its history
    events = dg.materialize(
        ALL_ASSETS, selection=[layout.CLICK_EVENTS], resources=resources, instance=instance,
        run_config={"ops": {layout.CLICK_EVENTS: tiny_run_config()["ops"][layout.CLICK_EVENTS]}},
        tags={"dagster/asset_partition_range_start": "2026-04-11", "dagster/asset_partition_range_end": "2026-05-31"},
    )
    assert events.success
    runs = {}

    def train_and_publish(date: str, setting: str, selection: list[str], ops: list[str]):
        runs[setting, date] = materialize_all(
            resources, date, selection=selection + [layout.TWO_TOWER_MODEL, layout.MODEL_COMPARISON],
            run_config=run_config(ops + ["two_tower_model"], setting), instance=instance,
        )
        # The history follows the model through match_model and evaluation_metrics in the full
        # graph; without them in the selection it needs a run of its own after the model.
        published = materialize_all(resources, date, selection=HISTORY, run_config={"ops": {}}, instance=instance)
        assert runs[setting, date].success and published.success

    for date in [CHAMPION, *DATES]:  # the champion, then the cold backfill
        train_and_publish(date, "none", DATA, ["split_tables", "tf_datasets"])
    for date in DATES:  # the warm backfill of the same dates: the splits and datasets are there
        train_and_publish(date, "previous", [], [])
    return runs, instance


def test_each_warm_date_starts_from_the_date_before(backfills):
    runs, _ = backfills
    for before, date in zip([CHAMPION, *DATES], DATES):
        assert metadata_of(runs["previous", date], layout.TWO_TOWER_MODEL)["warm_start_from"].value == f"previous:{before}"
        assert metadata_of(runs["none", date], layout.TWO_TOWER_MODEL)["warm_start_from"].value == "none"


def test_every_backfilled_date_is_compared_with_the_date_before(backfills):
    runs, _ = backfills
    for (setting, date), result in runs.items():
        comparison = metadata_of(result, layout.MODEL_COMPARISON)
        if date == CHAMPION:
            assert comparison["compared_with"].value == "none"
            continue
        assert comparison["compared_with"].value == [CHAMPION, *DATES][DATES.index(date)]
        assert comparison["warm_start"].value == setting


def test_the_last_date_plots_overlap_over_the_three_dates_cold_and_warm(backfills):
    runs, instance = backfills
    comparison = metadata_of(runs["previous", DATES[-1]], layout.MODEL_COMPARISON)
    series = comparison["overlap_over_dates"].value
    assert set(series) == {"none", "previous"}
    for setting in series:
        assert list(series[setting]) == DATES
        for date in DATES:
            # Each point is that date's own comparison, as its materialisation recorded it.
            recorded = metadata_of(runs[setting, date], layout.MODEL_COMPARISON)
            for name in OVER_DATES:
                assert series[setting][date][name] == pytest.approx(recorded[name].value, abs=1e-4)
                assert 0.0 <= series[setting][date][name] <= 1.0
    assert comparison["plot_overlap_over_dates"].value.startswith("![overlap_over_dates](data:image/png;base64,")
    # What the next materialisation will read: the same two series from the instance.
    assert {group: sorted(dates) for group, dates in figures_by_warm_start(instance).items()} == {
        "none": DATES, "previous": DATES,
    }
