"""Transient BigQuery errors are retried with backoff; permanent ones are not.

A loopback proxy (fault_proxy.py) sits between the real google-cloud-bigquery client and the
real emulator and answers chosen requests with 429 / 5xx / 4xx errors shaped like BigQuery's.
The counts of what the proxy saw show which requests were retried.
"""

import datetime as dt
import time
import uuid

import dagster as dg
import numpy as np
import pyarrow as pa
import pytest
import requests
from dagster_gcp import BigQueryResource
from google.api_core import exceptions as api_exceptions
from google.cloud import bigquery
from google.cloud.bigquery import retry as bigquery_retry

from twotower_assets.defs.publishing.embeddings import history_rows
from twotower_assets.lib.retries import WAREHOUSE_RETRY_POLICY, retry_transient_errors_only
from twotower_assets.warehouse.bigquery import BigQueryWarehouse
from twotower_assets.warehouse.errors import is_transient_bigquery_error, is_transient_warehouse_error

from .emulator import PROJECT
from .fault_proxy import FaultProxy

JUNE_1, JUNE_8 = dt.date(2026, 6, 1), dt.date(2026, 6, 8)
JOBS_INSERT = r"^/bigquery/v2/projects/[^/]+/jobs(\?|$)"
QUERY_RESULTS = r"^/bigquery/v2/projects/[^/]+/queries/"
DATASET_GET = r"^/bigquery/v2/projects/[^/]+/datasets/[^/?]+(\?|$)"
TABLE_GET = r"^/bigquery/v2/projects/[^/]+/datasets/[^/]+/tables/[^/?]+(\?|$)"
FAST_RETRIES = {"retry_initial_s": 0.05, "retry_maximum_s": 0.2, "retry_deadline_s": 20.0, "job_retry_deadline_s": 60.0}


@pytest.fixture
def proxy(bq_emulator):
    proxy = FaultProxy(bq_emulator.endpoint)
    yield proxy
    proxy.close()


def proxied_warehouse(proxy: FaultProxy, monkeypatch, **fields) -> BigQueryWarehouse:
    monkeypatch.delenv("BIGQUERY_EMULATOR_HOST", raising=False)
    return BigQueryWarehouse(
        bigquery=BigQueryResource(project=PROJECT, location="EU"),
        dataset=f"test_{uuid.uuid4().hex[:10]}",
        endpoint=proxy.endpoint,
        **{**FAST_RETRIES, **fields},
    )


def item_rows(day: dt.date, count: int, run_id: str):
    ids = np.array([f"i{n}" for n in range(count)])
    summary = {"mlflow_run_id": run_id, "mlflow_experiment_name": "e", "mlflow_run_name": "r"}
    return history_rows("item", day, summary, ids, np.arange(count * 4, dtype=float).reshape(count, 4))


def api_error(status: int, reason: str) -> Exception:
    return api_exceptions.from_http_status(status, "boom", errors=[{"reason": reason}])


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (api_error(429, "rateLimitExceeded"), True),
        (api_error(500, "internalError"), True),
        (api_error(502, "badGateway"), True),
        (api_error(503, "backendError"), True),
        (api_error(504, "timeout"), True),
        (api_error(403, "rateLimitExceeded"), True),  # BigQuery's per-table update limit is a 403
        (api_error(400, "jobRateLimitExceeded"), True),
        (api_error(403, "accessDenied"), False),
        (api_error(403, "quotaExceeded"), False),  # a daily quota does not come back in minutes
        (api_error(404, "notFound"), False),
        (api_error(400, "invalidQuery"), False),
        (api_exceptions.RetryError("deadline", api_error(503, "backendError")), True),
        (api_exceptions.RetryError("deadline", api_error(403, "accessDenied")), False),
        (requests.exceptions.ConnectionError("reset"), True),
        (requests.exceptions.SSLError("bad certificate"), False),
        (ValueError("no events in the window"), False),
    ],
)
def test_the_predicate_tells_transient_from_permanent(error, transient):
    assert is_transient_bigquery_error(error) is transient
    assert is_transient_warehouse_error(error) is transient
    wrapped = RuntimeError("while writing")
    wrapped.__cause__ = error
    assert is_transient_warehouse_error(wrapped) is transient


def test_client_retry_objects_use_the_project_predicate_and_settings():
    warehouse = BigQueryWarehouse(bigquery=BigQueryResource(project=PROJECT), dataset="d", retry_deadline_s=42.0)
    assert warehouse.api_retry._predicate is is_transient_bigquery_error
    assert warehouse.job_retry._predicate is is_transient_bigquery_error
    assert warehouse.api_retry._deadline == 42.0 and warehouse.job_retry._deadline == 2400.0
    assert (warehouse.api_retry._initial, warehouse.api_retry._maximum, warehouse.api_retry._multiplier) == (1.0, 32.0, 2.0)
    # Production defaults keep google-cloud-bigquery's deadlines.
    assert BigQueryWarehouse.model_fields["retry_deadline_s"].default == bigquery.DEFAULT_RETRY._deadline
    assert BigQueryWarehouse.model_fields["job_retry_deadline_s"].default == bigquery_retry.DEFAULT_JOB_RETRY._deadline


@pytest.mark.parametrize("status", [429, 500, 502, 503])
def test_transient_errors_on_a_query_are_retried_with_backoff(proxy, monkeypatch, status):
    warehouse = proxied_warehouse(proxy, monkeypatch)
    proxy.fail("POST", JOBS_INSERT, status, times=2)
    proxy.fail("GET", QUERY_RESULTS, status, times=2)
    assert warehouse.query("SELECT 1 AS x, 'a' AS y")["x"].to_pylist() == [1]
    inserts = proxy.requests("POST", JOBS_INSERT)
    assert [s.injected for s in inserts] == [True, True, False]  # the third try reached BigQuery
    results = proxy.requests("GET", QUERY_RESULTS)
    assert [s.injected for s in results[:2]] == [True, True] and not results[2].injected


def test_a_403_rate_limit_is_retried_but_a_403_access_denied_is_not(proxy, monkeypatch):
    warehouse = proxied_warehouse(proxy, monkeypatch)
    proxy.fail("POST", JOBS_INSERT, 403, times=1, reason="rateLimitExceeded")
    assert warehouse.query("SELECT 2 AS x")["x"].to_pylist() == [2]
    assert len(proxy.requests("POST", JOBS_INSERT)) == 2
    proxy.reset()
    proxy.fail("POST", JOBS_INSERT, 403, times=-1, reason="accessDenied")
    with pytest.raises(api_exceptions.Forbidden):
        warehouse.query("SELECT 3 AS x")
    assert len(proxy.requests("POST", JOBS_INSERT)) == 1


@pytest.mark.parametrize(
    ("status", "error"),
    [(403, api_exceptions.Forbidden), (404, api_exceptions.NotFound), (400, api_exceptions.BadRequest)],
)
def test_permanent_errors_are_raised_at_once(proxy, monkeypatch, status, error):
    warehouse = proxied_warehouse(proxy, monkeypatch)
    proxy.fail("POST", JOBS_INSERT, status, times=-1)
    started = time.monotonic()
    with pytest.raises(error, match=f"injected {status}"):
        warehouse.execute("SELECT 1")
    assert len(proxy.requests("POST", JOBS_INSERT)) == 1
    assert time.monotonic() - started < 5


def history_with_two_dates(warehouse: BigQueryWarehouse, other_rows: int) -> str:
    """The item history table with 5 rows on June 1 (run "old") and ``other_rows`` on June 8."""
    name = warehouse.table_name("two_tower_item_embedding_history")
    warehouse.replace_partition(name, "train_date", JUNE_1, item_rows(JUNE_1, 5, "old"))
    warehouse.replace_partition(name, "train_date", JUNE_8, item_rows(JUNE_8, other_rows, "other"))
    return name


def assert_june_1_written_once(warehouse: BigQueryWarehouse, bq_emulator, name: str, run_id: str, other_rows: int):
    """June 1 holds exactly the 3 new rows of ``run_id``, June 8 is untouched, no staging is left."""
    assert warehouse.partition_row_counts(name, "train_date") == {JUNE_1: 3, JUNE_8: other_rows}
    day1 = warehouse.query(f"SELECT item_id, mlflow_run_id FROM `{name}` WHERE train_date = @d", {"d": JUNE_1})
    assert sorted(day1["item_id"].to_pylist()) == ["i0", "i1", "i2"]  # no duplicates
    assert set(day1["mlflow_run_id"].to_pylist()) == {run_id}
    with bq_emulator_client(bq_emulator) as client:
        assert not [t for t in client.list_tables(f"{PROJECT}.{warehouse.dataset}") if t.table_id.startswith("_staging_")]


def test_transient_errors_during_a_partition_swap_write_it_exactly_once(proxy, monkeypatch, bq_emulator):
    warehouse = proxied_warehouse(proxy, monkeypatch)
    name = history_with_two_dates(warehouse, other_rows=7)
    proxy.reset()
    # Every kind of call of a partition write fails once or twice before it goes through:
    # table metadata, creating the staging table, starting the swap script, reading its results.
    rules = [
        proxy.fail("GET", TABLE_GET, 503, times=2),
        proxy.fail("POST", r"/datasets/[^/]+/tables(\?|$)", 500, times=1),
        proxy.fail("POST", JOBS_INSERT, 429, times=2),
        proxy.fail("GET", QUERY_RESULTS, 502, times=2),
    ]

    assert warehouse.replace_partition(name, "train_date", JUNE_1, item_rows(JUNE_1, 3, "new")) == 3

    assert [rule.failed for rule in rules] == [2, 1, 2, 2]  # every fault was hit, and got past
    assert_june_1_written_once(warehouse, bq_emulator, name, "new", other_rows=7)


def bq_emulator_client(emulator):
    direct = BigQueryWarehouse(bigquery=BigQueryResource(project=PROJECT), dataset="unused", endpoint=emulator.endpoint)
    return direct.client()


# -- the Dagster step-level policy ---------------------------------------------------------------


def uses_warehouse(asset: object) -> bool:
    return (
        isinstance(asset, dg.AssetsDefinition)
        and not isinstance(asset, dg.AssetChecksDefinition)
        and asset.is_executable
        and "warehouse" in asset.required_resource_keys
    )


def test_the_graph_puts_the_warehouse_policy_on_warehouse_assets_only():
    from twotower_assets.definitions import ALL_ASSETS

    policies = {
        asset.node_def.name: asset.op.retry_policy for asset in ALL_ASSETS if isinstance(asset, dg.AssetsDefinition)
    }
    warehouse_steps = {a.node_def.name for a in ALL_ASSETS if uses_warehouse(a)}
    assert {"click_events", "split_tables", "tf_datasets", "evaluation_metrics"} <= warehouse_steps
    assert all(policies[name] == WAREHOUSE_RETRY_POLICY for name in warehouse_steps)
    assert policies["two_tower_model"] is None and policies["match_model"] is None
    assert WAREHOUSE_RETRY_POLICY.backoff == dg.Backoff.EXPONENTIAL
    # Every retried step's config fails once when invalid (lib/retries.StepConfig).
    from twotower_assets.lib.retries import StepConfig

    configs = {asset.node_def.name: asset.op.compute_fn.decorated_fn.__annotations__.get("config")
               for asset in ALL_ASSETS if asset.node_def.name in warehouse_steps}
    assert {name for name, config in configs.items() if config is not None} >= {"click_events", "split_tables"}
    assert all(issubclass(config, StepConfig) for config in configs.values() if config is not None), configs


def events_table_run(warehouse: BigQueryWarehouse, policy: dg.RetryPolicy):
    """A warehouse step written like the graph's (policy + transient-only wrapper), with ``policy``.

    The graph's own policy waits 30 s or more between tries, too long for a test.
    """

    @dg.asset(retry_policy=policy)
    @retry_transient_errors_only
    def events_table(warehouse: BigQueryWarehouse) -> None:
        warehouse.write_table(warehouse.table_name("click_events"), pa.table({"user_id": [f"u{n}" for n in range(200)]}))

    return dg.materialize(
        [events_table], resources={"warehouse": warehouse}, instance=dg.DagsterInstance.ephemeral(), raise_on_error=False
    )


def click_events_run(warehouse: BigQueryWarehouse):
    """The graph's own click_events step (with WAREHOUSE_RETRY_POLICY), for one event day."""
    from twotower_assets.defs.source.assets import click_events

    return dg.materialize(
        [click_events],
        partition_key="2026-05-31",
        resources={"warehouse": warehouse},
        run_config={"ops": {"click_events": {"config": {
            "num_users": 20, "num_items": 40, "num_events": 200, "days": 3, "end_date": "2026-05-31", "seed": 1}}}},
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )


def test_a_step_whose_client_retries_run_out_is_retried_by_dagster(proxy, monkeypatch):
    # The client gives up after 0.3 s; BigQuery answers 503 for the first 8 dataset lookups,
    # more than one step attempt makes, so the step fails and Dagster runs it again.
    warehouse = proxied_warehouse(proxy, monkeypatch, retry_deadline_s=0.3, retry_initial_s=0.1, retry_maximum_s=0.1)
    proxy.fail("GET", DATASET_GET, 503, times=8)
    policy = dg.RetryPolicy(max_retries=10, delay=0.2, backoff=dg.Backoff.EXPONENTIAL)
    result = events_table_run(warehouse, policy)
    assert result.success
    retries = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert retries, "the step should have been retried by the RetryPolicy"
    assert len(proxy.requests("GET", DATASET_GET)) == 9  # 8 injected failures, then the real one
    table = warehouse.table_name("click_events")
    assert warehouse.query(f"SELECT COUNT(*) AS n FROM `{table}`")["n"].to_pylist() == [200]


def test_dagster_does_not_retry_a_permanent_error(proxy, monkeypatch):
    warehouse = proxied_warehouse(proxy, monkeypatch)
    proxy.fail("GET", DATASET_GET, 403, times=-1)
    # The graph's policy would wait 30 s before a retry; a permanent error gets none.
    result = click_events_run(warehouse)
    assert not result.success
    assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    error = failure.event_specific_data.error
    assert "Forbidden" in error.message and "injected 403" in error.message
    assert error.cause is not None and error.cause.cls_name == "Forbidden"
    assert len(proxy.requests("GET", DATASET_GET)) == 1


@pytest.mark.parametrize("reason", ["backendError", "rateLimitExceeded", "internalError"])
def test_a_query_job_that_fails_for_a_transient_reason_runs_again_as_a_new_job(proxy, monkeypatch, reason):
    # The API call succeeds; the job itself ends with a retryable errorResult. Only job_retry
    # covers this: the query is submitted again as a new job.
    warehouse = proxied_warehouse(proxy, monkeypatch)
    proxy.reset()
    proxy.fail_jobs(times=2, reason=reason)
    assert warehouse.query("SELECT 41 + 1 AS answer").to_pylist() == [{"answer": 42}]
    inserts = proxy.requests("POST", JOBS_INSERT)
    assert [s.injected for s in inserts] == [True, True, False]


def test_a_query_job_that_fails_for_a_permanent_reason_is_not_run_again(proxy, monkeypatch):
    warehouse = proxied_warehouse(proxy, monkeypatch)
    proxy.reset()
    proxy.fail_jobs(times=1, reason="invalidQuery")
    with pytest.raises(api_exceptions.BadRequest, match="injected job failure invalidQuery"):
        warehouse.query("SELECT 1 AS x")
    assert len(proxy.requests("POST", JOBS_INSERT)) == 1


def test_a_swap_job_reported_failed_after_it_ran_runs_again_and_writes_the_partition_once(proxy, monkeypatch, bq_emulator):
    # The proxy lets the swap script run in the emulator, then reports the job as failed: the
    # case of a job whose success was lost. job_retry runs the script again; it is one
    # DELETE + INSERT transaction per table, so running it twice still leaves one copy.
    warehouse = proxied_warehouse(proxy, monkeypatch)
    name = history_with_two_dates(warehouse, other_rows=2)
    proxy.reset()
    proxy.fail_jobs(times=1)

    assert warehouse.replace_partition(name, "train_date", JUNE_1, item_rows(JUNE_1, 3, "second")) == 3

    injected = [s for s in proxy.requests("POST", JOBS_INSERT) if s.injected]
    assert len(injected) == 1, "the swap job should have been reported failed once"
    assert_june_1_written_once(warehouse, bq_emulator, name, "second", other_rows=2)
