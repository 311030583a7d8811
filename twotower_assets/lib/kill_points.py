"""Named points where a fault test kills this process with SIGKILL, as a crash or the OOM
killer would: no handler runs, nothing is cleaned up.

``TWOTOWER_KILL_POINT=<name>`` arms one point (``tests/test_kill_points.py`` runs the graph
once per point, then the rerun, and checks that nothing is half published). Unset, as in
every real run, a point costs one environment lookup.
"""

import os
import signal

KILL_POINT_VARIABLE = "TWOTOWER_KILL_POINT"

POINTS = (
    "training.trained",  # the model is fitted; its version is not in place yet
    "registration.registered",  # a model version is registered; its tags are not written
    "history.partition_written",  # the date's user embedding history is rewritten, nothing promoted
    "promotion.record_moved",  # two_tower_retriever@champion moved; the MatchModel alias did not
    "promotion.match_alias_moved",  # both aliases moved; the _latest tables did not
)


def kill_point(name: str) -> None:
    """SIGKILL this process if ``name`` is the armed point."""
    if name not in POINTS:
        raise ValueError(f"unknown kill point {name!r} (points: {', '.join(POINTS)})")
    if os.environ.get(KILL_POINT_VARIABLE) == name:
        os.kill(os.getpid(), signal.SIGKILL)
