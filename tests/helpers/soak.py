"""Soak and chaos: materialisations over several dates with SIGKILLs and concurrent dataset rewrites.

Each round picks a date and starts the whole graph for it in a separate process (run A). Once
A has written the date's datasets (it trains next), a second process (run B) rewrites them
with a random feature config at a random moment (0-20 s later), and run A is SIGKILLed at a
random moment (5-60 s after its datasets; 75 % of rounds) or left to finish. A clean run of
the whole graph for the date (the cleanup) follows. After every round these invariants are
checked over every date done so far:

1. exactly one copy of each partition: every artifact partition's link resolves to one
   complete version whose checksums verify, and no warehouse table holds a (date, id) twice;
2. every published model (a date with a registered MatchModel) records the datasets version
   it was trained on, that version still exists, verifies, and is the date's current one;
3. no MLflow run is left RUNNING once the cleanup has run;
4. the champion, when there is one, is a version the quality gate passed.

Bounded: ``--rounds`` and ``--max-minutes`` (no round starts after the budget). The CI
version is ``tests/test_soak.py`` (one round, ``run_soak``); the long one is this module's
command line, run from the repository root:

    .venv/bin/python -m tests.helpers.soak --rounds 6 --dates 2026-06-01,2026-06-02,2026-06-03 --seed 1

It prints one line per round and a table (pasted into docs/reliability.md). Only the standard
library and ``twotower_assets`` are imported, so the module loads both as ``helpers.soak``
(the tests) and as ``tests.helpers.soak`` (the command line).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

ARTIFACT_ASSETS = ("tf_datasets", "two_tower_model", "match_model", "evaluation_metrics", "item_ann_index",
                   "two_tower_retriever")
DATASET_CONFIGS = ("tiny-features", "default-features")

WORKER = r"""
import json, sys
import dagster as dg
import yaml
from twotower_assets.definitions import ALL_ASSETS, ALL_CHECKS
from twotower_assets.defs.resources import default_resources

date, what, config_name = sys.argv[1:4]
config = yaml.safe_load(open(sys.argv[4]))
if what == "datasets":
    selection = dg.AssetSelection.assets("tf_datasets")
    ops = {"tf_datasets": {"config": {"config_name": config_name}}}
else:
    selection = dg.AssetSelection.all()
    ops = config["ops"]
result = dg.materialize([*ALL_ASSETS, *ALL_CHECKS], selection=selection, resources=default_resources(),
                        partition_key=date, run_config={"ops": ops}, raise_on_error=False)
sys.exit(0 if result.success else 1)
"""


@dataclass
class Round:
    number: int
    date: str
    killed_after_s: float | None
    rewrite_started_s: float | None
    rewrite_config: str
    rewrite_rc: int | None
    a_rc: int | None
    cleanup_rc: int
    seconds: float
    violations: list[str] = field(default_factory=list)


class Soak:
    def __init__(self, root: Path, seed: int, kill_probability: float = 0.75, dates: list[str] | None = None,
                 kill_window_s: tuple[float, float] = (5.0, 60.0)):
        import datetime as dt

        import yaml

        self.root = root
        self.home = root / "home"
        self.rng = random.Random(seed)
        self.kill_probability = kill_probability
        # Seconds after the concurrent rewrite starts within which run A is killed (uniform).
        self.kill_window_s = kill_window_s
        self.config = root / "tiny.yaml"
        config = yaml.safe_load((REPO / "configs" / "run" / "tiny.yaml").read_text())
        # The tiny events end the day before 2026-06-01; later training dates need their window.
        events = config["ops"]["click_events"]["config"]
        last = max(dt.date.fromisoformat(d) for d in (dates or ["2026-06-01"])) - dt.timedelta(days=1)
        extra = (last - dt.date.fromisoformat(events["end_date"])).days
        if extra > 0:
            events.update(end_date=last.isoformat(), days=events["days"] + extra,
                          num_events=events["num_events"] * (events["days"] + extra) // events["days"])
        self.config.write_text(yaml.safe_dump(config))
        self.env = {**os.environ, "TWOTOWER_HOME": str(self.home), "TF_CPP_MIN_LOG_LEVEL": "3"}
        for name in ("MLFLOW_TRACKING_URI", "TWOTOWER_MLFLOW_ARTIFACTS", "TWOTOWER_DUCKDB_PATH", "TWOTOWER_WAREHOUSE"):
            self.env.pop(name, None)
        self.dates_done: set[str] = set()

    def start(self, date: str, what: str, config_name: str, log: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", WORKER, date, what, config_name, str(self.config)],
            env=self.env, cwd=REPO, stdout=open(self.root / log, "wb"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def run_round(self, number: int, date: str) -> Round:
        """Run A (whole graph); once A has written its datasets, B rewrites them and A may be killed."""
        from twotower_assets.lib.artifacts import ArtifactStore

        store = ArtifactStore(base_dir=str(self.home / "artifacts"))
        started = time.monotonic()
        rewrite_after = self.rng.uniform(0, 20)  # seconds after A's datasets are in place (A trains then)
        kill_after = self.rng.uniform(*self.kill_window_s) if self.rng.random() < self.kill_probability else None
        rewrite_config = self.rng.choice(DATASET_CONFIGS)
        before = store.current_version("tf_datasets", date)
        a = self.start(date, "graph", "", f"round{number}-a.log")
        b = None
        killed_after = rewrite_started = None
        datasets_at = None
        while a.poll() is None:
            now = time.monotonic()
            if datasets_at is None and store.current_version("tf_datasets", date) not in (None, before):
                datasets_at = now
            if datasets_at is not None and b is None and now - datasets_at >= rewrite_after:
                b = self.start(date, "datasets", rewrite_config, f"round{number}-b.log")
                rewrite_started = now - started
            # The kill is timed from the rewrite's start, so it always comes after it.
            if b is not None and kill_after is not None and now - (started + rewrite_started) >= kill_after:
                os.killpg(a.pid, signal.SIGKILL)  # the whole step process, no cleanup
                killed_after = now - started
                break
            time.sleep(0.25)
        a_rc = a.wait()
        if b is None:
            b = self.start(date, "datasets", rewrite_config, f"round{number}-b.log")
        b_rc = b.wait()
        cleanup = self.start(date, "graph", "", f"round{number}-cleanup.log")
        cleanup_rc = cleanup.wait()
        self.dates_done.add(date)
        record = Round(number, date, killed_after, rewrite_started, rewrite_config, b_rc, a_rc, cleanup_rc,
                       time.monotonic() - started)
        record.violations = self.check_invariants()
        if cleanup_rc != 0:
            record.violations.append(f"the cleanup run of {date} failed (see round{number}-cleanup.log)")
        return record

    # ------------------------------------------------------------------ invariants
    def resources(self) -> dict:
        """What ``default_resources()`` builds for ``TWOTOWER_HOME=self.home`` (the workers' settings)."""
        from twotower_assets.lib.artifacts import ArtifactStore
        from twotower_assets.lib.mlflow_tracking import MlflowTracking
        from twotower_assets.warehouse.duckdb import DuckDBWarehouse

        return {
            "warehouse": DuckDBWarehouse(path=str(self.home / "warehouse.duckdb")),
            "mlflow": MlflowTracking(tracking_uri=f"sqlite:///{self.home / 'mlflow.db'}"),
            "artifacts": ArtifactStore(base_dir=str(self.home / "artifacts")),
        }

    def check_invariants(self) -> list[str]:
        from twotower_assets.lib.layout import ModelFiles, ModelSummary
        from twotower_assets.serving.match_scorer import REGISTERED_MODEL_NAME
        from twotower_assets.serving.registry import GATE_TAG, champion

        problems: list[str] = []
        resources = self.resources()
        artifacts, warehouse = resources["artifacts"], resources["warehouse"]
        for date in sorted(self.dates_done):
            for asset in ARTIFACT_ASSETS:
                try:
                    artifacts.require(asset, date)
                except Exception as exc:  # noqa: BLE001  (every failure is a violation to report)
                    problems.append(f"{asset} {date}: {type(exc).__name__}: {exc}")
            if artifacts.path("match_model", date).exists():
                try:
                    summary: ModelSummary = ModelFiles(artifacts.require("two_tower_model", date)).summary()
                    artifacts.require("tf_datasets", date, version=summary.datasets_version)
                    if summary.datasets_version != artifacts.current_version("tf_datasets", date):
                        problems.append(f"{date}: published model's datasets {summary.datasets_version} are not current")
                except Exception as exc:  # noqa: BLE001
                    problems.append(f"{date}: published model's datasets: {type(exc).__name__}: {exc}")
        problems += self._duplicate_rows(warehouse)
        client = resources["mlflow"].client()
        for experiment in client.search_experiments():
            running = client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'RUNNING'")
            problems += [f"MLflow run {r.info.run_id} ({r.data.tags.get('train_date')}) is RUNNING" for r in running]
        current = champion(client, REGISTERED_MODEL_NAME)
        if current is not None and current.tags.get(GATE_TAG) != "passed":
            problems.append(f"champion is version {current.version} with gate={current.tags.get(GATE_TAG)}")
        return problems

    @staticmethod
    def _duplicate_rows(warehouse) -> list[str]:
        problems = []
        tables = {"two_tower_user_embedding_history": ("user_id",), "two_tower_item_embedding_history": ("item_id",),
                  "two_tower_recommendations": ("user_id", "item_id")}
        for table, keys in tables.items():
            try:
                schema = warehouse.table_schema(table)
            except Exception:  # noqa: BLE001  (not written yet)
                continue
            keys = [k for k in keys if k in schema.names]
            if not keys or "train_date" not in schema.names:
                continue
            cols = ", ".join(keys)
            rows = warehouse.query(
                f"SELECT train_date, COUNT(*) - COUNT(DISTINCT ({cols})) AS extra FROM {table} GROUP BY train_date"
            ).to_pylist()
            problems += [f"{table} {r['train_date']}: {r['extra']} duplicate rows" for r in rows if r["extra"]]
        return problems


def run_soak(root: Path, dates: list[str], rounds: int, seed: int, max_minutes: float, echo=print,
             kill_probability: float = 0.75, kill_window_s: tuple[float, float] = (5.0, 60.0)) -> list[Round]:
    soak = Soak(root, seed, kill_probability, dates, kill_window_s)
    deadline = time.monotonic() + max_minutes * 60
    done = []
    for number in range(1, rounds + 1):
        if time.monotonic() > deadline:
            echo(f"time budget of {max_minutes} min reached after {len(done)} rounds")
            break
        date = dates[(number - 1) % len(dates)]
        record = soak.run_round(number, date)
        done.append(record)
        echo(json.dumps(record.__dict__))
    return done


def machine() -> str:
    """One line: the machine the soak ran on (cores, memory, load), printed above its table."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} cores, {memory_gb:.0f} GiB RAM, "
            f"load average {load} (1/5/15 min), Python {platform.python_version()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--dates", default="2026-06-01,2026-06-02,2026-06-03")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-minutes", type=float, default=60)
    args = parser.parse_args()
    print(machine())
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))  # kept: the per-round logs are in it
    print(f"work directory (logs): {workdir}")
    rounds = run_soak(workdir, args.dates.split(","), args.rounds, args.seed, args.max_minutes)
    print("\n| round | date | run A | rewrite started | rewrite (config, rc) | cleanup rc | seconds | violations |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rounds:
        a = f"SIGKILL at {r.killed_after_s:.0f} s" if r.killed_after_s is not None else f"rc {r.a_rc}"
        b = f"{r.rewrite_started_s:.0f} s" if r.rewrite_started_s is not None else "after A"
        print(f"| {r.number} | {r.date} | {a} | {b} | {r.rewrite_config}, {r.rewrite_rc} | {r.cleanup_rc} | "
              f"{r.seconds:.0f} | {len(r.violations)} |")
    print(f"\nload average after: {os.getloadavg()}")
    sys.exit(1 if any(r.violations for r in rounds) else 0)


if __name__ == "__main__":
    main()
