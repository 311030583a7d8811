"""The whole asset graph at production size: per-asset peak memory and wall time.

Each asset (the split multi-asset as one step) is materialised by its own
``dagster asset materialize`` process, one after the other, in graph order, against one
TWOTOWER_HOME / DAGSTER_HOME. The process's peak resident memory comes from ``os.wait4``
(that child's own ``ru_maxrss``), so every row is what that step needs on its own,
including the ~0.5-0.9 GB every process pays for Python + Dagster + TensorFlow (measured
in the first row, ``(imports only)``). Target: every step under 8 GB on 2 CPU cores.

    python -m bench.scale                                   # 10M events, 1M users, 200k items
    python -m bench.scale --events 1000000 --users 100000 --items 20000   # a quicker try

Sizes default to ``configs/run/production-scale.yaml``; the flags override the source size.
Keeps its data under --home (default /tmp/twotower-scale) for a look afterwards.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench._common import PYTHON, REPO, markdown_table, print_header, run_measured

TARGET_PEAK_MB = 8 * 1024
PARTITION = "2026-06-01"


def graph_steps() -> list[tuple[str, list[str], bool]]:
    """(op name, asset keys, partitioned) of every asset of the code location, in dependency order."""
    import twotower_assets  # noqa: F401
    from twotower_assets.definitions import ALL_ASSETS

    steps = {a.node_def.name: a for a in ALL_ASSETS}
    owner = {key: name for name, a in steps.items() for key in a.keys}
    ordered: list[str] = []

    def visit(name: str, path: tuple[str, ...] = ()) -> None:
        if name in ordered:
            return
        if name in path:
            raise ValueError(f"dependency cycle through {name}")
        for dep in steps[name].dependency_keys:
            if dep in owner and owner[dep] != name:
                visit(owner[dep], (*path, name))
        ordered.append(name)

    for name in steps:
        visit(name)
    return [
        (name, [k.to_user_string() for k in steps[name].keys], steps[name].partitions_def is not None)
        for name in ordered
    ]


def previous_day(date: str) -> str:
    return (dt.date.fromisoformat(date) - dt.timedelta(days=1)).isoformat()


def event_window_start(run_config: dict) -> str:
    """First event day the split of PARTITION reads (``split_tables``' ``event_day_number``)."""
    from twotower_assets.defs.splits.assets import SplitConfig

    split = run_config.get("ops", {}).get("split_tables", {}).get("config", {})
    days = SplitConfig(**split).event_day_number
    return (dt.date.fromisoformat(PARTITION) - dt.timedelta(days=days)).isoformat()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-config", default=str(REPO / "configs/run/production-scale.yaml"))
    parser.add_argument("--events", type=int, help="override click_events num_events")
    parser.add_argument("--users", type=int, help="override click_events num_users")
    parser.add_argument("--items", type=int, help="override click_events num_items")
    parser.add_argument("--eval-users", type=int, help="override evaluation_metrics num_users")
    parser.add_argument("--home", default=str(Path(tempfile.gettempdir()) / "twotower-scale"))
    parser.add_argument("--keep", action="store_true", help="reuse --home instead of starting clean")
    parser.add_argument("--only", help="comma-separated op names to run (the rest must exist already)")
    parser.add_argument("--skip", default="", help="comma-separated op names not to run (listed as skipped)")
    parser.add_argument("--kill-above-gb", type=float, default=14.0,
                        help="kill a step whose resident memory passes this (the machine is shared)")
    parser.add_argument("--step-timeout-s", type=float, help="kill a step that runs longer than this")
    args = parser.parse_args()

    run_config = yaml.safe_load(Path(args.run_config).read_text())
    source = run_config["ops"]["click_events"]["config"]
    for flag, key in (("events", "num_events"), ("users", "num_users"), ("items", "num_items")):
        if getattr(args, flag):
            source[key] = getattr(args, flag)
    if args.eval_users:
        run_config["ops"]["evaluation_metrics"]["config"]["num_users"] = args.eval_users

    home = Path(args.home)
    if home.exists() and not args.keep:
        shutil.rmtree(home)
    (home / "dagster_home").mkdir(parents=True, exist_ok=True)
    (home / "logs").mkdir(exist_ok=True)
    env = {**os.environ, "TWOTOWER_HOME": str(home), "DAGSTER_HOME": str(home / "dagster_home")}
    env.pop("TWOTOWER_WAREHOUSE", None)

    command = "python -m bench.scale " + " ".join(sys.argv[1:])
    print_header("Whole graph at scale: per-asset peak RSS and wall time", command.strip())
    print(
        f"Source: {source['num_events']:,} events, {source['num_users']:,} users, "
        f"{source['num_items']:,} items over {source.get('days')} days; run config {Path(args.run_config).name}\n",
        flush=True,
    )

    baseline = run_measured(
        [PYTHON, "-c", "import twotower_assets.definitions, tensorflow, tensorflow_recommenders"], env=env
    )
    rows = [["(imports only)", f"{baseline.wall_s:.1f}", f"{baseline.cpu_s:.1f}", f"{baseline.peak_rss_mb:,.0f}", "", "ok"]]
    only = set(args.only.split(",")) if args.only else None
    skip = set(filter(None, args.skip.split(",")))
    failed = False
    total_wall = 0.0
    for op, keys, partitioned in graph_steps():
        if only is not None and op not in only:
            continue
        if op in skip:
            rows.append([op, "", "", "", "", "skipped (--skip)"])
            continue
        # Dagster rejects config for ops outside the run: give each step its own op's config
        # and its checks' (named ``<op>_<check>``, e.g. evaluation_metrics_quality_gate).
        ops = {name: value for name, value in run_config.get("ops", {}).items() if name == op or name.startswith(f"{op}_")}
        step_config = {"ops": ops} if ops else {}
        config_path = home / "logs" / f"{op}.yaml"
        config_path.write_text(yaml.safe_dump(step_config))
        cli = [
            str(Path(PYTHON).with_name("dagster")), "asset", "materialize",
            "-m", "twotower_assets.definitions", "--select", ",".join(keys), "-c", str(config_path),
        ]
        if op == "click_events":
            # One partition per event day: the step writes the window the training date
            # reads (the split's event_day_number days before it), as one single-run backfill.
            cli += ["--partition-range", f"{event_window_start(run_config)}...{previous_day(PARTITION)}"]
        elif partitioned:
            cli += ["--partition", PARTITION]
        load = os.getloadavg()[0]
        result = run_measured(cli, env=env, log_path=home / "logs" / f"{op}.log",
                              kill_above_mb=args.kill_above_gb * 1024, timeout_s=args.step_timeout_s)
        total_wall += result.wall_s
        status = "ok" if result.returncode == 0 else f"FAILED (rc {result.returncode}, see {home}/logs/{op}.log)"
        if result.returncode == -9:
            status = (f"KILLED after {result.wall_s:.0f} s (--step-timeout-s)"
                      if args.step_timeout_s and result.wall_s >= args.step_timeout_s
                      else f"KILLED above {args.kill_above_gb:g} GB resident (watchdog)")
        rows.append([op, f"{result.wall_s:.1f}", f"{result.cpu_s:.1f}", f"{result.peak_rss_mb:,.0f}", f"{load:.1f}", status])
        print(f"  {op}: {result.wall_s:.1f} s, peak {result.peak_rss_mb:,.0f} MB, {status}", file=sys.stderr, flush=True)
        if result.returncode != 0:
            print(result.output[-3000:], file=sys.stderr)
            failed = True
            break

    peak = max(float(r[3].replace(",", "")) for r in rows if r[3])
    print(markdown_table(["step", "wall s", "CPU s", "peak RSS MB", "load at start", "status"], rows))
    print(
        f"\nTotal wall time {total_wall:,.0f} s; highest step peak {peak:,.0f} MB = "
        f"{peak / TARGET_PEAK_MB:.2f} x the 8 GB target ({'met' if peak < TARGET_PEAK_MB and not failed else 'NOT met'})."
    )
    print(f"Finished {time.strftime('%Y-%m-%d %H:%M:%S')}; data kept under {home}.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
