"""Retention by reference: a superseded version is deleted only when nothing refers to it
(twotower_assets/lib/artifacts.py): not a lease of a step reading it, not another version's
record of what it was made from; age is only a floor."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from twotower_assets.lib import artifacts as artifacts_module
from twotower_assets.lib.artifacts import ArtifactStore, write_references

DATE = "2026-06-01"
THREE_DAYS_LATER = 3 * 24 * 3600  # past the 48 h floor: only references can keep a version


@pytest.fixture(autouse=True)
def _release_this_processes_leases():
    yield
    artifacts_module._LEASES.release_all()


def _write(store: ArtifactStore, asset: str, text: str, references: dict | None = None) -> str:
    with store.writing(asset, DATE) as directory:
        (directory / "f.txt").write_text(text)
        if references:
            write_references(directory, references)
    return store.current_version(asset, DATE)


def test_a_version_a_step_reads_is_kept_until_the_step_is_done(tmp_path):
    store = ArtifactStore(base_dir=str(tmp_path))
    old = _write(store, "tf_datasets", "old")
    reading = store.require("tf_datasets", DATE)  # what the training step opened
    new = _write(store, "tf_datasets", "new")  # a rewrite while it trains (it collects too)
    later = time.time() + THREE_DAYS_LATER
    assert store.collect_garbage("tf_datasets", DATE, now=later) == []
    assert (reading / "f.txt").read_text() == "old"
    [lease] = store.leases("tf_datasets", DATE)[old]
    assert lease["pid"] == os.getpid() and lease["expires"] > time.time()
    store.teardown_after_execution(None)  # the step is over: its leases go
    assert store.leases("tf_datasets", DATE) == {}
    assert store.collect_garbage("tf_datasets", DATE, now=later) == [old]
    assert store.versions("tf_datasets", DATE) == [new]


def test_a_lease_is_renewed_while_its_step_runs(tmp_path):
    store = ArtifactStore(base_dir=str(tmp_path), lease_seconds=0.6)
    version = _write(store, "tf_datasets", "v")
    store.require("tf_datasets", DATE)
    first = store.leases("tf_datasets", DATE)[version][0]["expires"]
    time.sleep(1.5)  # longer than the lease: only renewal keeps it
    renewed = store.leases("tf_datasets", DATE)[version][0]["expires"]
    assert renewed > first and renewed > time.time()


READER = textwrap.dedent(
    """
    import sys, time
    from twotower_assets.lib.artifacts import ArtifactStore
    ArtifactStore(base_dir=sys.argv[1]).require("tf_datasets", "2026-06-01")
    print("reading", flush=True)
    time.sleep(600)
    """
)


def test_another_processes_lease_holds_until_that_process_dies(tmp_path):
    store = ArtifactStore(base_dir=str(tmp_path))
    old = _write(store, "tf_datasets", "old")
    reader = subprocess.Popen([sys.executable, "-c", READER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "reading"
        _write(store, "tf_datasets", "new")
        later = time.time() + THREE_DAYS_LATER
        assert store.collect_garbage("tf_datasets", DATE, now=later) == []
        assert [r["pid"] for r in store.leases("tf_datasets", DATE)[old]] == [reader.pid]
        reader.send_signal(signal.SIGKILL)  # no teardown runs: the dead process's lease ends anyway
        reader.wait(30)
        assert store.collect_garbage("tf_datasets", DATE, now=later) == [old]
    finally:
        reader.kill()


def test_a_version_another_version_was_made_from_is_kept_while_that_one_exists(tmp_path):
    store = ArtifactStore(base_dir=str(tmp_path))
    datasets_1 = _write(store, "tf_datasets", "d1")
    model_1 = _write(store, "two_tower_model", "m1", {"tf_datasets": (DATE, datasets_1)})
    datasets_2 = _write(store, "tf_datasets", "d2")
    later = time.time() + THREE_DAYS_LATER
    assert store.collect_garbage("tf_datasets", DATE, now=later) == []  # model 1 trained on it
    assert store.referenced_versions("tf_datasets", DATE) == {
        datasets_1: [str(store.version_path("two_tower_model", DATE, model_1))]
    }
    _write(store, "two_tower_model", "m2", {"tf_datasets": (DATE, datasets_2)})
    assert store.collect_garbage("two_tower_model", DATE, now=later) == [model_1]
    assert store.collect_garbage("tf_datasets", DATE, now=later) == [datasets_1]  # nothing refers to it now


def test_a_running_writers_references_count(tmp_path):
    store = ArtifactStore(base_dir=str(tmp_path))
    datasets_1 = _write(store, "tf_datasets", "d1")
    _write(store, "tf_datasets", "d2")
    later = time.time() + THREE_DAYS_LATER
    with store.writing("two_tower_model", DATE) as directory:  # a training still writing
        write_references(directory, {"tf_datasets": (DATE, datasets_1)})
        assert store.collect_garbage("tf_datasets", DATE, now=later) == []
    store.collect_garbage("two_tower_model", DATE, now=later)
    assert datasets_1 in store.versions("tf_datasets", DATE)  # the finished model refers to it
