"""The default synthetic data set end to end: wall time and peak RSS per asset, training
examples/second, and the model against the popularity baseline.

Runs ``python -m bench.scale`` (one ``dagster asset materialize`` process per asset, peak RSS of
each process) on the quickstart's data set and run config, then reads the trained model's
summary and metrics. The ``(imports only)`` row is the baseline every step pays (Python,
Dagster, TensorFlow); the last table compares the model's recall with popularity's as a ratio.

    python -m bench.pipeline
    python -m bench.pipeline --home /tmp/pipeline-bench   # keep the data somewhere else
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

from bench._common import PYTHON, REPO, markdown_table

PARTITION = "2026-06-01"
SOURCE = {"num_users": 2000, "num_items": 1000, "num_events": 100_000, "days": 120,
          "end_date": "2026-05-31", "seed": 7}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", default=str(Path(tempfile.gettempdir()) / "twotower-pipeline-bench"),
                        help="where the data, models and logs are written (emptied first)")
    args = parser.parse_args()
    home = Path(args.home)
    run_config = yaml.safe_load((REPO / "configs/run/quickstart.yaml").read_text())
    run_config["ops"]["click_events"] = {"config": SOURCE}
    config_path = Path(tempfile.mkstemp(suffix=".yaml")[1])
    config_path.write_text(yaml.safe_dump(run_config))
    completed = subprocess.run(
        [PYTHON, "-m", "bench.scale", "--run-config", str(config_path), "--home", str(home)],
        cwd=REPO,
    )
    model_dir = home / "artifacts/two_tower_model" / PARTITION
    metrics_csv = home / "artifacts/evaluation_metrics" / PARTITION / "metrics.csv"
    if not model_dir.exists() or not metrics_csv.exists():
        print("the model or its metrics are missing: see the failed step above")
        return 1
    summary = json.loads((model_dir / "summary.json").read_text())
    metrics = pd.read_csv(metrics_csv)
    overall = metrics[metrics["segment"] == "all"].pivot(index="k", columns="model", values="recall")
    print("\nTraining: "
          f"{summary['epochs_run']} epochs, {summary['train_seconds']:.1f} s, "
          f"{summary['examples_per_second']:,.0f} examples/s on {summary['device']}\n")
    rows = [[k, *(f"{overall.loc[k, m]:.4f}" for m in overall.columns),
             f"{overall.loc[k, 'two_tower'] / overall.loc[k, 'popularity']:.2f}"] for k in overall.index]
    print(markdown_table(["k", *(f"recall {m}" for m in overall.columns), "model / popularity"], rows))
    return completed.returncode


if __name__ == "__main__":
    sys.exit(main())
