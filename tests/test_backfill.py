"""A backfill of three training dates, the documented way: ``dagster job backfill`` + the daemon.

``dagster job backfill`` queues one run of the partitioned ``two_tower_training`` job per date
(its run config from ``TWOTOWER_RUN_CONFIG``, here the tiny one); ``dagster-daemon run``
dequeues and launches them, several at once, while the ``training`` pool (one slot, from the
project's dagster.yaml) keeps their training steps from overlapping. At the end each
embedding history table has one partition per date.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from helpers.dagster_dev import dagster_home
from helpers.graph import REPO, make_resources, tiny_run_config
from twotower_assets.lib import layout
from twotower_assets.defs.automation.jobs import TRAINING_JOB
from twotower_assets.lib.conditions import TRAINING_POOL

DATES = ["2026-06-01", "2026-06-02", "2026-06-03"]
BACKFILL_TIMEOUT_S = 420

pytestmark = pytest.mark.slow  # dagster job backfill and the daemon: three training runs


def test_a_backfill_of_three_dates_publishes_three_partitions(tmp_path, monkeypatch):
    from twotower_assets.definitions import ALL_ASSETS

    home = dagster_home(tmp_path / "dagster_home")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "TWOTOWER_HOME": str(tmp_path / "home"),
        "TWOTOWER_RUN_CONFIG": str(REPO / "configs" / "run" / "tiny.yaml"),
        "DAGSTER_DISABLE_TELEMETRY": "yes",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    bin_dir = Path(sys.executable).parent

    # Backfilling events and backfilling trainings are separate operations (docs/operations.md):
    # first the event days the three dates read (30 days before each), in one run, ...
    resources = make_resources(tmp_path / "home")
    # Events up to the last day the trainings read (no event is written after end_date).
    source = {"ops": {layout.CLICK_EVENTS: tiny_run_config(click_events={"end_date": "2026-06-02"})["ops"][layout.CLICK_EVENTS]}}
    events = dg.materialize(ALL_ASSETS, selection=[layout.CLICK_EVENTS], resources=resources, run_config=source,
                            tags={ASSET_PARTITION_RANGE_START_TAG: "2026-05-02", ASSET_PARTITION_RANGE_END_TAG: "2026-06-02"})
    assert events.success
    # ... then the trainings: the job excludes click_events, so no training run writes event days.

    submitted = subprocess.run(
        [str(bin_dir / "dagster"), "job", "backfill", "-w", "workspace.yaml", "-j", TRAINING_JOB,
         "--from", DATES[0], "--to", DATES[-1], "--noprompt"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180,
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert "Launched backfill job" in submitted.stdout

    with dg.DagsterInstance.get() as instance:
        queued = instance.get_runs()
        assert sorted(run.tags["dagster/partition"] for run in queued) == DATES
        assert {run.status for run in queued} == {dg.DagsterRunStatus.QUEUED}, "nothing runs before the daemon"

        log = (tmp_path / "daemon.log").open("w")
        daemon = subprocess.Popen(
            [str(bin_dir / "dagster-daemon"), "run", "-w", "workspace.yaml"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            deadline = time.monotonic() + BACKFILL_TIMEOUT_S
            while time.monotonic() < deadline:
                runs = instance.get_runs()
                if all(run.is_finished for run in runs):
                    break
                assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()[-5000:]
                time.sleep(2)
        finally:
            group = os.getpgid(daemon.pid)
            os.killpg(group, signal.SIGINT)
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(group, signal.SIGKILL)
                daemon.wait(timeout=10)
            log.close()

        runs = instance.get_runs()
        assert len(runs) == 3, "the daemon's automation sensor added no runs of its own"
        failed = [run.run_id for run in runs if run.status != dg.DagsterRunStatus.SUCCESS]
        assert not failed, f"runs {failed} did not succeed: {[r.status for r in runs]}"

        # The pool: no two training steps ran at the same time.
        spans = []
        for run in runs:
            starts = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.STEP_START).records
            ends = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.STEP_SUCCESS).records
            start = next(r.event_log_entry.timestamp for r in starts if r.event_log_entry.step_key == "two_tower_model")
            end = next(r.event_log_entry.timestamp for r in ends if r.event_log_entry.step_key == "two_tower_model")
            spans.append((start, end))
        spans.sort()
        assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:])), spans
        assert instance.event_log_storage.get_concurrency_info(TRAINING_POOL).slot_count == 1

    warehouse = resources["warehouse"]
    for table in (layout.USER_EMBEDDING_HISTORY, layout.ITEM_EMBEDDING_HISTORY):
        counts = warehouse.partition_row_counts(table, layout.PARTITION_COLUMN)
        assert sorted(str(date) for date in counts) == DATES, table
        assert min(counts.values()) > 0
