"""Declarative automation, evaluated with Dagster's testing API on the real code location.

``dg.evaluate_automation_conditions`` runs the same evaluation the ``twotower_automation``
sensor runs in the daemon, against a real instance. Upstream updates are recorded on the
instance as they would be by runs or by an external writer; freshness is computed by the
Dagster freshness daemon's own iteration under a frozen clock; the quality-gate case uses
real tiny runs.
"""

import datetime as dt

import dagster as dg
import pytest
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
from dagster._core.test_utils import InProcessTestWorkspaceLoadTarget, freeze_time
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._daemon.freshness import FreshnessDaemon

from helpers.graph import REPO, TINY_PARTITION, make_resources, materialize_all, tiny_run_config
from twotower_assets.defs.automation import jobs, schedules
from twotower_assets.lib import conditions, layout
from twotower_assets.lib.layout import QUALITY_GATE
from twotower_assets.lib.layout import EVALUATION_METRICS
from twotower_assets.lib.partitions import EVENT_WINDOW_DAYS, EVENT_WINDOW_MAPPING, training_date_partitions
from twotower_assets.definitions import defs

NOW = dt.datetime.now(dt.timezone.utc)
TRAINING_CHAIN = {"tf_datasets", "two_tower_model", layout.MATCH_MODEL, EVALUATION_METRICS}
"""Up to the quality gate: the candidate MatchModel is registered before it is evaluated."""
PUBLISHING = {layout.USER_EMBEDDING_HISTORY, layout.ITEM_EMBEDDING_HISTORY, layout.RECOMMENDATIONS,
              layout.SIMILAR_ITEMS, layout.ITEM_ANN_INDEX, layout.TWO_TOWER_RETRIEVER, layout.CHAMPION}
"""Behind the gate: what a date publishes once it passes."""


@pytest.fixture
def instance(tmp_path):
    (tmp_path / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance:
        yield instance


def latest_partition(at: dt.datetime) -> str:
    return schedules.training_partition_at(at)


class Ticks:
    """Successive sensor ticks: each evaluation continues from the previous cursor."""

    def __init__(self, instance: dg.DagsterInstance):
        self.instance = instance
        self.cursor = None

    def __call__(self, at: dt.datetime = NOW) -> dict[str, set[str]]:
        result = dg.evaluate_automation_conditions(defs=defs, instance=self.instance, cursor=self.cursor, evaluation_time=at)
        self.cursor = result.cursor
        asset_keys = defs.resolve_asset_graph().get_all_asset_keys()
        return {
            key.to_user_string(): set(result.get_requested_partitions(key))
            for key in asset_keys
            if result.get_num_requested(key)
        }


def report(instance: dg.DagsterInstance, keys, partition: str | None) -> None:
    for key in keys:
        instance.report_runless_asset_event(dg.AssetMaterialization(key, partition=partition))


def evaluate_freshness(instance: dg.DagsterInstance, at: dt.datetime) -> dict[str, str]:
    """One iteration of Dagster's freshness daemon (what ``dagster dev`` runs every 30 s) at ``at``."""
    origin = InProcessCodeLocationOrigin(LoadableTargetOrigin(module_name="twotower_assets.definitions"))
    with WorkspaceProcessContext(instance, InProcessTestWorkspaceLoadTarget(origin)) as context, freeze_time(at):
        for _ in FreshnessDaemon().run_iteration(context):
            pass
    records = instance.get_freshness_state_records([dg.AssetKey(k) for k in (layout.TRAINING_EVENTS, "two_tower_model", layout.USER_EMBEDDING_HISTORY)])
    return {key.to_user_string(): record.freshness_state.value for key, record in records.items()}


# --------------------------------------------------------------------------- new upstream data


def test_an_empty_instance_starts_nothing(instance):
    # dagster dev on a fresh DAGSTER_HOME must not launch production-size runs by itself.
    assert Ticks(instance)() == {}


def test_new_training_data_retrains_evaluates_and_publishes_that_date(instance, tmp_path):
    from twotower_assets.definitions import ALL_ASSETS, ALL_CHECKS

    tick = Ticks(instance)
    tick()
    resources = make_resources(tmp_path / "home")
    config = tiny_run_config()["ops"]
    graph = [*ALL_ASSETS, *ALL_CHECKS]
    source = {"ops": {layout.CLICK_EVENTS: config[layout.CLICK_EVENTS]}}
    # An events backfill (one run over the days both dates read, BackfillPolicy.single_run).
    events = dg.materialize(graph, selection=[layout.CLICK_EVENTS], resources=resources, run_config=source,
                            instance=instance, tags={ASSET_PARTITION_RANGE_START_TAG: "2026-05-02",
                                                     ASSET_PARTITION_RANGE_END_TAG: "2026-06-01"})
    assert events.success
    assert tick() == {}, "new click events alone wait for the weekly schedule"

    # New training data: runs that rebuild the split of two dates (their data checks pass).
    dates = {TINY_PARTITION, "2026-06-02"}
    for date in sorted(dates):
        split = dg.materialize(
            graph,
            selection=dg.AssetSelection.assets(*layout.SPLIT_TABLES.values()),
            resources=resources,
            partition_key=date,
            run_config={"ops": {"split_tables": config["split_tables"]}},
            instance=instance,
        )
        assert all(e.passed for e in split.get_asset_check_evaluations())
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor, evaluation_time=NOW)
    tick.cursor = result.cursor
    for key in TRAINING_CHAIN | PUBLISHING:
        assert result.get_requested_partitions(dg.AssetKey(key)) == dates, key
    assert not any(result.get_num_requested(dg.AssetKey(key)) for key in layout.SPLIT_TABLES.values())
    # The quality gate joins the run that evaluates; the split checks already ran with the split.
    assert requested_checks(result) == {QUALITY_GATE}
    assert tick() == {}, "handled: not requested again"


def test_new_event_days_retrain_the_latest_date_when_switched_on(instance):
    # TWOTOWER_RETRAIN_ON_NEW_EVENTS=true: the split condition with NEW_EVENT_DAYS, on a graph of
    # the same shape (event days -> the split of the latest date, through the window mapping).
    assert not conditions.retrain_on_new_events({})
    assert conditions.retrain_on_new_events({"TWOTOWER_RETRAIN_ON_NEW_EVENTS": "true"})
    with pytest.raises(conditions.AutomationSettingsError):
        conditions.retrain_on_new_events({"TWOTOWER_RETRAIN_ON_NEW_EVENTS": "daily"})

    events = dg.AssetSpec("click_events", partitions_def=training_date_partitions)
    split = dg.AssetSpec(
        "training_events", partitions_def=training_date_partitions,
        deps=[dg.AssetDep("click_events", partition_mapping=EVENT_WINDOW_MAPPING)],
        automation_condition=conditions.training_data_condition(on_new_events=True),
    )
    small = dg.Definitions(assets=[events, split])
    latest = dt.date.fromisoformat(latest_partition(NOW))
    window = [(latest - dt.timedelta(days=d)).isoformat() for d in range(1, EVENT_WINDOW_DAYS + 1)]

    def tick(cursor=None):
        result = dg.evaluate_automation_conditions(defs=small, instance=instance, cursor=cursor, evaluation_time=NOW)
        return result.get_requested_partitions(dg.AssetKey("training_events")), result.cursor

    requested, cursor = tick()
    assert requested == set()
    for day in window[1:]:  # all but yesterday: not yet
        report(instance, ["click_events"], day)
    requested, cursor = tick(cursor)
    assert requested == set(), "a day of the window is missing"
    report(instance, ["click_events"], window[0])  # yesterday's events land
    requested, cursor = tick(cursor)
    assert requested == {latest.isoformat()}
    requested, cursor = tick(cursor)
    assert requested == set(), "handled: not requested again"
    assert conditions.TRAINING_DATA_CONDITION is conditions.RETRAIN_WHEN_STALE  # off by default


def requested_checks(result) -> set[str]:
    return {r.key.name for r in result.results if isinstance(r.key, dg.AssetCheckKey) and not r.true_subset.is_empty}


# --------------------------------------------------------------------------- stale model


def test_a_stale_model_is_retrained_once_for_the_latest_date(instance):
    trained = TINY_PARTITION
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        report(instance, [key], trained if graph.get(key).partitions_def else None)
    # The event days the latest date nine days from now reads exist (the source keeps growing).
    nine_days_later = NOW + dt.timedelta(days=9)
    latest = dt.date.fromisoformat(latest_partition(nine_days_later))
    for day in range(1, EVENT_WINDOW_DAYS + 1):
        report(instance, [layout.CLICK_EVENTS], (latest - dt.timedelta(days=day)).isoformat())

    tick = Ticks(instance)
    one_day_later = NOW + dt.timedelta(days=1)
    assert set(evaluate_freshness(instance, one_day_later).values()) == {"PASS"}
    assert tick(one_day_later) == {}

    # nine_days_later: past the 8-day fail window
    assert set(evaluate_freshness(instance, nine_days_later).values()) == {"FAIL"}
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor, evaluation_time=nine_days_later)
    tick.cursor = result.cursor
    today = latest_partition(nine_days_later)
    for key in {*layout.SPLIT_TABLES.values(), *TRAINING_CHAIN, *PUBLISHING}:
        assert result.get_requested_partitions(dg.AssetKey(key)) == {today}, key
    assert requested_checks(result) == {QUALITY_GATE, "non_empty", "no_null_ids", "users_and_items_in_training", "no_training_pairs"}
    # The FAIL stays until the daemon sees the new materialisation: no second request meanwhile.
    assert tick(nine_days_later + dt.timedelta(minutes=1)) == {}


def test_freshness_policy_follows_the_cadence():
    graph = defs.resolve_asset_graph()
    for key in (layout.TRAINING_EVENTS, "two_tower_model", layout.USER_EMBEDDING_HISTORY, layout.ITEM_EMBEDDING_HISTORY):
        policy = graph.get(dg.AssetKey(key)).freshness_policy
        assert policy.fail_window.to_timedelta() == dt.timedelta(days=8), key
        assert policy.warn_window.to_timedelta() == dt.timedelta(days=7), key
    with pytest.raises(conditions.AutomationSettingsError):
        conditions.retrain_after({"TWOTOWER_RETRAIN_AFTER_DAYS": "soon"})
    assert conditions.retrain_after({"TWOTOWER_RETRAIN_AFTER_DAYS": "15"}) == dt.timedelta(days=15)


# --------------------------------------------------------------------------- failed quality gate


@pytest.mark.slow
def test_a_failed_quality_gate_keeps_the_model_from_being_published(instance, tmp_path):
    resources = make_resources(tmp_path / "home")
    tick = Ticks(instance)
    tick()
    assert materialize_all(resources, TINY_PARTITION, instance=instance).success
    assert tick() == {}, "a whole-graph run leaves nothing for automation to do"

    def evaluate(gate_config: dict) -> dg.ExecuteInProcessResult:
        """Re-evaluate the date and re-run its gate, in a run that does not include publishing."""
        from twotower_assets.definitions import ALL_ASSETS, ALL_CHECKS

        ops = tiny_run_config(evaluation_metrics_quality_gate=gate_config)["ops"]
        return dg.materialize(
            [*ALL_ASSETS, *ALL_CHECKS],
            selection=dg.AssetSelection.assets(EVALUATION_METRICS),
            resources=resources,
            partition_key=TINY_PARTITION,
            run_config={"ops": {op: ops[op] for op in (EVALUATION_METRICS, "evaluation_metrics_quality_gate")}},
            instance=instance,
            raise_on_error=False,
        )

    # Production thresholds: the tiny model does not beat popularity.
    failed = evaluate({"min_lift_over_popularity": 0.0})
    assert [e.passed for e in failed.get_asset_check_evaluations()] == [False]
    assert tick() == {}, "evaluation_metrics updated, but its blocking gate failed: nothing is published"

    passed = evaluate({"min_lift_over_popularity": -0.5})
    assert [e.passed for e in passed.get_asset_check_evaluations()] == [True]
    requested = tick()
    for key in PUBLISHING:
        assert requested.get(key) == {TINY_PARTITION}, key


# --------------------------------------------------------------------------- schedule, sensor, job config


def test_the_weekly_schedule_trains_the_date_of_its_tick():
    schedule = defs.resolve_schedule_def("weekly_training")
    assert schedule.cron_schedule == "0 3 * * 1"
    assert schedule.job_name == jobs.TRAINING_JOB
    monday = dt.datetime(2026, 6, 1, 3, tzinfo=dt.timezone.utc)
    (request,) = schedule.evaluate_tick(dg.build_schedule_context(scheduled_execution_time=monday, repository_def=defs.get_repository_def())).run_requests
    assert request.partition_key == "2026-06-01"


def test_tuning_has_its_own_monthly_schedule_and_the_weekly_training_does_not_retune():
    schedule = defs.resolve_schedule_def("monthly_tuning")
    assert schedule.cron_schedule == "0 1 1 * *" and schedule.job_name == jobs.TUNING_JOB
    first = dt.datetime(2026, 7, 1, 1, tzinfo=dt.timezone.utc)
    (request,) = schedule.evaluate_tick(dg.build_schedule_context(
        scheduled_execution_time=first, repository_def=defs.get_repository_def())).run_requests
    assert request.partition_key == "2026-07-01"
    tuning = {key.to_user_string() for key in defs.resolve_job_def(jobs.TUNING_JOB).asset_layer.selected_asset_keys}
    assert tuning == {layout.TUNED_HYPERPARAMETERS}
    training = {key.to_user_string() for key in defs.resolve_job_def(jobs.TRAINING_JOB).asset_layer.selected_asset_keys}
    assert layout.TUNED_HYPERPARAMETERS not in training and "two_tower_model" in training
    assert layout.TUNED_HYPERPARAMETERS not in jobs.load_run_config(REPO / "configs" / "run" / "tiny.yaml")["ops"]


def test_schedules_start_stopped_unless_the_deployment_turns_them_on(monkeypatch):
    """A fresh `dagster dev` trains nothing on its own at the next Monday; production opts in."""
    for name in ("weekly_training", "monthly_tuning"):
        schedule = defs.resolve_schedule_def(name)
        assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED, name
        assert "TWOTOWER_SCHEDULES_RUNNING" in schedule.description, name
    assert schedules.schedules_status({"TWOTOWER_SCHEDULES_RUNNING": "true"}) == dg.DefaultScheduleStatus.RUNNING
    assert schedules.schedules_status({}) == dg.DefaultScheduleStatus.STOPPED
    with pytest.raises(conditions.AutomationSettingsError, match="TWOTOWER_SCHEDULES_RUNNING"):
        schedules.schedules_status({"TWOTOWER_SCHEDULES_RUNNING": "sometimes"})
    # The description names the run config its runs get, as the UI's schedule page shows it.
    assert "production defaults" in schedules.build_training_schedule("0 3 * * 1").description
    monkeypatch.setenv("TWOTOWER_RUN_CONFIG", str(REPO / "configs" / "run" / "tiny.yaml"))
    assert "configs/run/tiny.yaml" in schedules.build_training_schedule("0 3 * * 1").description


def test_the_schedule_cadence_is_configurable():
    assert schedules.training_cron({"TWOTOWER_TRAINING_WEEKDAY": "Wednesday", "TWOTOWER_TRAINING_HOUR": "5"}) == "0 5 * * 3"
    assert schedules.training_cron({"TWOTOWER_TRAINING_CRON": "30 1 * * 2", "TWOTOWER_TRAINING_WEEKDAY": "fri"}) == "30 1 * * 2"
    with pytest.raises(conditions.AutomationSettingsError, match="weekday"):
        schedules.training_cron({"TWOTOWER_TRAINING_WEEKDAY": "someday"})
    with pytest.raises(conditions.AutomationSettingsError, match="cron"):
        schedules.training_cron({"TWOTOWER_TRAINING_CRON": "every monday"})
    with pytest.raises(conditions.AutomationSettingsError, match="HOUR"):
        schedules.training_cron({"TWOTOWER_TRAINING_HOUR": "25h"})
    assert schedules.build_training_schedule("0 4 * * 3").cron_schedule == "0 4 * * 3"


def test_the_automation_sensor_runs_by_default_and_targets_everything():
    sensor = defs.resolve_sensor_def("twotower_automation")
    assert isinstance(sensor, dg.AutomationConditionSensorDefinition)
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING


def test_the_training_job_takes_its_run_config_from_a_file(tmp_path):
    config = jobs.load_run_config(REPO / "configs" / "run" / "tiny.yaml")
    assert layout.CLICK_EVENTS not in config["ops"]
    assert config["ops"]["two_tower_model"]["config"]["schedule"]["epochs"] == 2
    assert jobs.load_run_config(None) is None
    with pytest.raises(conditions.AutomationSettingsError, match="not a file"):
        jobs.load_run_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(conditions.AutomationSettingsError, match="mapping"):
        jobs.load_run_config(bad)
    job = defs.resolve_job_def(jobs.TRAINING_JOB)
    assert job.partitions_def == training_date_partitions
    assert layout.CLICK_EVENTS not in {key.to_user_string() for key in job.asset_layer.selected_asset_keys}
    assert dg.validate_run_config(job, config)


def test_each_ready_made_run_config_is_a_job_whose_launchpad_starts_from_it():
    for name, file in (("quickstart", "quickstart.yaml"), ("quickstart_history", "quickstart-history.yaml"), ("tiny", "tiny.yaml"),
                       ("production_scale", "production-scale.yaml")):
        job = defs.resolve_job_def(f"two_tower_training_{name}")
        expected = jobs.load_run_config(REPO / "configs" / "run" / file)
        assert job.partitioned_config is not None
        assert job.partitioned_config.get_run_config_for_partition_key(TINY_PARTITION) == expected
        assert layout.CLICK_EVENTS not in expected.get("ops", {})
