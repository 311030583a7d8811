"""The short soak and chaos run of tests/helpers/soak.py: one round, bounded in time.

The whole graph of one date runs in a separate process that is SIGKILLed mid-run while
another process rewrites the date's datasets with another feature config; a clean run
follows; then the invariants (one verified copy of each partition, published models' datasets
recorded and intact, no RUNNING MLflow run, a gate-passed champion) must hold. The long
version (several dates and rounds) is `python -m tests.helpers.soak`; its figures are in
docs/reliability.md.
"""

import pytest

from helpers.soak import run_soak


@pytest.mark.slow
def test_a_killed_run_and_a_concurrent_rewrite_leave_every_invariant_true(tmp_path):
    # The kill lands 1-3 s after the rewrite starts, while A trains: a clock from the datasets
    # alone (5-60 s) sometimes came after a quick run had finished, and nothing was killed.
    rounds = run_soak(tmp_path, ["2026-06-01"], rounds=1, seed=3, max_minutes=15, kill_probability=1.0,
                      kill_window_s=(1.0, 3.0))
    [record] = rounds
    # The chaos happened: the rewrite started while run A ran (after its datasets), then A was killed.
    assert record.rewrite_started_s is not None and record.killed_after_s is not None
    assert record.rewrite_started_s < record.killed_after_s
    assert record.rewrite_rc == 0, (tmp_path / "round1-b.log").read_text()[-3000:]
    assert record.cleanup_rc == 0, (tmp_path / "round1-cleanup.log").read_text()[-3000:]
    assert record.violations == []
