"""default-features vs default-features-history on the synthetic data (issue 16's synthetic target).

The quickstart's data set and run config, one training date. The events and the split are
written once, with the history config's split (its ``user_recent_items`` column is simply
not read by default-features), so both configs train and are evaluated on the same rows.
Then, per seed, each config's tf_datasets, model and evaluation_metrics are materialised in
process with the product's assets; the table gives recall@50 and NDCG@10 per config (mean
and spread over the seeds) with popularity's and EASE's beside them, and the ratio
history / default.

    python bench/history_synthetic.py                 # 3 seeds
    python bench/history_synthetic.py --seeds 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, markdown_table, print_header  # noqa: E402

PARTITION = "2026-06-01"
CONFIGS = ("default-features", "default-features-history")
SEEDS = (42, 43, 44)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--home", default=None)
    args = parser.parse_args()
    print_header("History feature on the synthetic data", "python bench/history_synthetic.py " + " ".join(sys.argv[1:]))

    import dagster as dg
    import pandas as pd
    import yaml

    import twotower_assets  # noqa: F401  (TF environment switches)
    from twotower_assets.definitions import ALL_ASSETS
    from twotower_assets.lib import layout
    from twotower_assets.lib.artifacts import ArtifactStore
    from twotower_assets.lib.mlflow_tracking import MlflowTracking
    from twotower_assets.warehouse.duckdb import DuckDBWarehouse

    home = Path(args.home or tempfile.mkdtemp(prefix="history-bench-"))
    home.mkdir(parents=True, exist_ok=True)
    resources = {
        "warehouse": DuckDBWarehouse(path=str(home / "warehouse.duckdb")),
        "mlflow": MlflowTracking(tracking_uri=f"sqlite:///{home / 'mlflow.db'}", artifact_root=(home / "mlartifacts").as_uri()),
        "artifacts": ArtifactStore(base_dir=str(home / "artifacts")),
    }
    base = yaml.safe_load((REPO / "configs/run/quickstart.yaml").read_text())["ops"]
    instance = dg.DagsterInstance.ephemeral()
    source = {"ops": {layout.CLICK_EVENTS: {"config": {"end_date": "2026-05-31"}},
                      "split_tables": {"config": {"config_name": "default-features-history"}}}}
    prepared = dg.materialize(ALL_ASSETS, selection=[layout.CLICK_EVENTS, *layout.SPLIT_TABLES.values()],
                              resources=resources, partition_key=PARTITION, run_config=source, instance=instance)
    assert prepared.success

    results: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for seed in SEEDS[: args.seeds]:
        for name in CONFIGS:
            ops = {
                "tf_datasets": {"config": {"config_name": name}},
                "two_tower_model": {"config": {**base["two_tower_model"]["config"], "seed": seed}},
            }
            run = dg.materialize(ALL_ASSETS, selection=[layout.TF_DATASETS, layout.TWO_TOWER_MODEL, layout.EVALUATION_METRICS],
                                 resources=resources, partition_key=PARTITION, run_config={"ops": ops}, instance=instance)
            assert run.success, name
            metrics = pd.read_csv(home / "artifacts" / layout.EVALUATION_METRICS / PARTITION / "metrics.csv")
            overall = metrics[metrics["segment"] == "all"].set_index(["model", "k"])
            row = {"seed": seed, **{f"{model}_{metric}@{k}": overall.loc[(model, k), metric]
                                    for model in ("two_tower", "popularity", "ease")
                                    for metric, k in (("recall", 50), ("ndcg", 10))}}
            results[name].append(row)
            print(f"  {name} seed {seed}: recall@50 {row['two_tower_recall@50']:.4f}, ndcg@10 {row['two_tower_ndcg@10']:.4f}",
                  file=sys.stderr, flush=True)

    def summary(values: list[float]) -> str:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.4f} ± {spread:.4f}"

    rows = []
    for name in CONFIGS:
        for key in ("recall@50", "ndcg@10"):
            rows.append([name, key, summary([r[f"two_tower_{key}"] for r in results[name]]),
                         summary([r[f"popularity_{key}"] for r in results[name]]),
                         summary([r[f"ease_{key}"] for r in results[name]])])
    print(markdown_table(["config", "metric", "two-tower", "popularity", "EASE"], rows))
    default = statistics.mean(r["two_tower_recall@50"] for r in results[CONFIGS[0]])
    history = statistics.mean(r["two_tower_recall@50"] for r in results[CONFIGS[1]])
    print(f"\nrecall@50 history / default: {history / default:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
