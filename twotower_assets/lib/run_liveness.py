"""Runs whose worker died: noticed and marked failed.

Dagster's run monitoring (``configs/dagster.yaml``) fails runs stuck in STARTING or CANCELING
and runs over their ``dagster/max_runtime``, but the default run launcher cannot say whether
a STARTED run's process is alive: a run killed by SIGKILL or the OOM killer stays STARTED for
ever, holding its concurrency slot. The run worker's pid is in the run's own engine events
(``Started process for run (pid: N)`` from the launcher, ``Executing steps in process (pid:
N)`` from the in-process executor) and its host in the tag :data:`WORKER_HOST_TAG`, which the
artifact store resource writes when a run starts (:func:`record_run_host`; a run that does
not use it, e.g. events alone, is not judged). The ``dead_run_detector`` sensor
marks a STARTED run FAILED when its worker on this host is gone, so run retries and the
automation conditions take over.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator

import dagster as dg

from twotower_assets.lib.mlflow_tracking import process_is_gone

WORKER_HOST_TAG = "twotower/worker_host"
_WORKER_PID = re.compile(r"^(?:Started process for run|Executing steps in process) \(pid: (\d+)\)")


def record_run_host(context) -> None:
    """Tag the run a resource is set up for with this host (once); no-op outside a run."""
    instance, run_id = getattr(context, "instance", None), getattr(context, "run_id", None)
    if instance is None or not run_id:
        return
    run = instance.get_run_by_id(run_id)
    if run is not None and WORKER_HOST_TAG not in run.tags:
        instance.add_run_tags(run_id, {WORKER_HOST_TAG: socket.gethostname()})


def worker_pid(instance: dg.DagsterInstance, run_id: str) -> int | None:
    """The run worker's pid, from the run's first engine event that names it."""
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        match = _WORKER_PID.match(record.message or record.user_message or "")
        if match:
            return int(match.group(1))
    return None


def dead_runs(instance: dg.DagsterInstance) -> Iterator[tuple[dg.DagsterRun, str]]:
    """STARTED runs of this host whose worker process is gone, each with the reason."""
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])):
        if run.tags.get(WORKER_HOST_TAG) != socket.gethostname():
            continue  # another machine's run (or one that never set up a resource): not ours to judge
        pid = worker_pid(instance, run.run_id)
        if pid is not None and process_is_gone(pid):
            yield run, (f"its run worker (pid {pid} on {socket.gethostname()}) is gone, killed or out of memory, "
                        "while the run was STARTED: marked failed by the dead_run_detector sensor")
