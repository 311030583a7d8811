"""``dagster dev`` end to end: webserver and daemon on a loopback port, driven like the UI.

Starts ``dagster dev`` against a temporary DAGSTER_HOME (with the project's dagster.yaml) and
TWOTOWER_HOME, checks through the webserver's GraphQL API that the code location loaded with
every asset, check, the schedule and the automation sensor (running), that the daemon is
healthy, then launches a materialisation of the whole graph for one date with the tiny run
config (the ``launchRun`` mutation the UI's "Materialize" button sends) and waits for it to
succeed; and terminates a run mid-training as the UI's "Terminate" button does. Everything
it starts is stopped at the end.
"""

import time

import pytest
import yaml

from helpers.dagster_dev import ENDED, DagsterDev
from helpers.graph import REPO, TINY_PARTITION
from twotower_assets.lib import layout

LOCATION = "twotower_assets"
REPOSITORY = "__repository__"
RUN_TIMEOUT_S = 180

pytestmark = pytest.mark.slow  # starts dagster dev and materialises the graph


ASSETS_QUERY = """
{ assetNodes {
    assetKey { path }
    isPartitioned
    automationCondition { label }
    internalFreshnessPolicy { __typename }
    pools
    opVersion
    assetChecksOrError { ... on AssetChecks { checks { name blocking } } }
} }"""

REPOSITORY_QUERY = """
query($selector: RepositorySelector!) {
  schedulesOrError(repositorySelector: $selector) {
    __typename
    ... on Schedules { results { name cronSchedule pipelineName scheduleState { status } } }
    ... on PythonError { message }
  }
  sensorsOrError(repositorySelector: $selector) {
    __typename
    ... on Sensors { results { name sensorType sensorState { status } } }
    ... on PythonError { message }
  }
  instance {
    daemonHealth { allDaemonStatuses { daemonType required healthy } }
    poolConfig { poolGranularity defaultPoolLimit }
  }
}"""

LAUNCH_RUN = """
mutation($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message stack }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on InvalidSubsetError { message }
  }
}"""

def test_dagster_dev_serves_the_graph_and_runs_it_like_the_ui(tmp_path):
    from twotower_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    expected_assets = {key.to_user_string() for key in graph.get_all_asset_keys()}
    expected_checks = {f"{key.asset_key.to_user_string()}:{key.name}" for key in graph.asset_check_keys}

    with DagsterDev(tmp_path) as dev:
        nodes = dev.query(ASSETS_QUERY)["assetNodes"]
        by_key = {"/".join(n["assetKey"]["path"]): n for n in nodes}
        assert set(by_key) == expected_assets
        checks = {
            f"{key}:{check['name']}": check["blocking"]
            for key, node in by_key.items()
            for check in node["assetChecksOrError"]["checks"]
        }
        assert set(checks) == expected_checks
        assert checks["evaluation_metrics:quality_gate"] is True
        # Every check stops what depends on it, except model_comparison's churn warning (a
        # change between two models is information, not a reason to hold one back).
        assert checks.pop("model_comparison:churn") is False
        assert all(checks.values()), "every other check is blocking"
        model = by_key["two_tower_model"]
        assert model["isPartitioned"] and model["pools"] == ["training"] and model["opVersion"] == "1"
        assert model["automationCondition"]["label"] == "retrain"
        assert model["internalFreshnessPolicy"]["__typename"] == "TimeWindowFreshnessPolicy"
        assert by_key[layout.USER_EMBEDDING_HISTORY]["internalFreshnessPolicy"] is not None
        assert by_key[layout.CLICK_EVENTS]["isPartitioned"]  # one partition per event day

        selector = {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY}
        repository = dev.query(REPOSITORY_QUERY, {"selector": selector})
        assert repository["schedulesOrError"]["__typename"] == "Schedules", repository["schedulesOrError"]
        schedules = {s["name"]: s for s in repository["schedulesOrError"]["results"]}
        assert set(schedules) == {"weekly_training", "monthly_tuning"}
        schedule = schedules["weekly_training"]
        assert schedule["pipelineName"] == "two_tower_training"
        assert schedules["monthly_tuning"]["pipelineName"] == "hyperparameter_tuning"
        # Stopped on a fresh instance: nothing trains with the production defaults behind the user's back.
        assert schedule["cronSchedule"] == "0 3 * * 1" and schedule["scheduleState"]["status"] == "STOPPED"
        sensors = {s["name"]: s for s in repository["sensorsOrError"]["results"]}
        assert sensors["twotower_automation"]["sensorType"] == "AUTO_MATERIALIZE"  # the automation-condition sensor type
        assert sensors["twotower_automation"]["sensorState"]["status"] == "RUNNING"
        assert repository["instance"]["poolConfig"] == {"poolGranularity": "op", "defaultPoolLimit": 1}
        daemons = {d["daemonType"]: d for d in repository["instance"]["daemonHealth"]["allDaemonStatuses"]}
        for daemon in ("SCHEDULER", "SENSOR", "BACKFILL", "QUEUED_RUN_COORDINATOR", "FRESHNESS_DAEMON"):
            assert daemons[daemon]["required"], daemon

        # The UI's "Materialize all" for one partition: __ASSET_JOB with every asset and check.
        params = {
            "selector": {
                **selector,
                "pipelineName": "__ASSET_JOB",
                "assetSelection": [{"path": [key]} for key in sorted(expected_assets)],
                "assetCheckSelection": [
                    {"assetKey": {"path": [key.asset_key.to_user_string()]}, "name": key.name}
                    for key in graph.asset_check_keys
                ],
            },
            "runConfigData": yaml.safe_load((REPO / "configs" / "run" / "tiny.yaml").read_text()),
            "mode": "default",
            "executionMetadata": {"tags": [{"key": "dagster/partition", "value": TINY_PARTITION}]},
        }
        launched = dev.query(LAUNCH_RUN, {"params": params})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]

        status = dev.wait_for_run(run_id, RUN_TIMEOUT_S)
        assert status == "SUCCESS", f"run {run_id} ended {status}:\n{dev.tail()}"

        daemons = dev.query(REPOSITORY_QUERY, {"selector": selector})["instance"]["daemonHealth"]["allDaemonStatuses"]
        unhealthy = [d["daemonType"] for d in daemons if d["required"] and not d["healthy"]]
        assert not unhealthy, f"unhealthy daemons {unhealthy}:\n{dev.tail()}"

    from twotower_assets.warehouse.duckdb import DuckDBWarehouse

    warehouse = DuckDBWarehouse(path=str(tmp_path / "home" / "warehouse.duckdb"))
    for table in (layout.USER_EMBEDDING_HISTORY, layout.ITEM_EMBEDDING_HISTORY):
        counts = warehouse.partition_row_counts(table, layout.PARTITION_COLUMN)
        assert [str(d) for d in counts] == [TINY_PARTITION] and min(counts.values()) > 0
    assert dev.process.poll() is not None, "dagster dev stopped"


TERMINATE_RUN = """
mutation($runId: String!) {
  terminateRun(runId: $runId) {
    __typename
    ... on TerminateRunFailure { message }
    ... on PythonError { message }
  }
}"""


def test_terminating_a_run_in_the_ui_stops_training_and_publishes_nothing(tmp_path):
    """The UI's "Terminate" on a run that is training: the run ends CANCELED, its MLflow run
    FAILED with the reason, and no model (not even a partial one) is left for the date."""
    from mlflow import MlflowClient

    from twotower_assets.lib.mlflow_tracking import FAILED_REASON_TAG

    ops = ("click_events", "split_tables", "tf_datasets", "two_tower_model")
    run_config = yaml.safe_load((REPO / "configs" / "run" / "tiny.yaml").read_text())
    run_config = {"ops": {op: run_config["ops"][op] for op in ops}}
    # Many tiny steps per epoch: training lasts long enough to be terminated mid-epoch.
    run_config["ops"]["two_tower_model"]["config"]["schedule"].update(epochs=1000, batch_size=4)
    selection = [layout.CLICK_EVENTS, *layout.SPLIT_TABLES.values(), "tf_datasets", "two_tower_model"]

    with DagsterDev(tmp_path) as dev:
        params = {
            "selector": {
                "repositoryLocationName": LOCATION,
                "repositoryName": REPOSITORY,
                "pipelineName": "__ASSET_JOB",
                "assetSelection": [{"path": [key]} for key in selection],
                "assetCheckSelection": [],
            },
            "runConfigData": run_config,
            "mode": "default",
            "executionMetadata": {"tags": [{"key": "dagster/partition", "value": TINY_PARTITION}]},
        }
        launched = dev.query(LAUNCH_RUN, {"params": params})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]

        mlflow = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
        deadline = time.monotonic() + RUN_TIMEOUT_S
        training = None
        while training is None and time.monotonic() < deadline:
            status = dev.run_status(run_id)
            assert status not in ENDED, f"run ended {status} before training:\n{dev.tail()}"
            if (tmp_path / "home" / "mlflow.db").exists():
                experiments = [e.experiment_id for e in mlflow.search_experiments()]
                running = mlflow.search_runs(experiments, "attributes.status = 'RUNNING'") if experiments else []
                training = next((r for r in running if "loss" in r.data.metrics), None)
            time.sleep(1)
        assert training is not None, f"training did not start in {RUN_TIMEOUT_S}s:\n{dev.tail()}"

        terminated = dev.query(TERMINATE_RUN, {"runId": run_id})["terminateRun"]
        assert terminated["__typename"] == "TerminateRunSuccess", terminated
        status = dev.wait_for_run(run_id, 60)
        assert status == "CANCELED", f"run {run_id} ended {status}:\n{dev.tail()}"

    ended = mlflow.get_run(training.info.run_id)
    assert ended.info.status == "FAILED"
    assert ended.data.tags[FAILED_REASON_TAG]  # why, for whoever opens the run in MLflow
    model_dir = tmp_path / "home" / "artifacts" / "two_tower_model" / TINY_PARTITION
    assert not model_dir.exists() and not list(model_dir.with_name(model_dir.name + ".versions").glob(".partial-*"))
    # What ran before training is kept.
    assert (tmp_path / "home" / "artifacts" / "tf_datasets" / TINY_PARTITION).is_dir()
