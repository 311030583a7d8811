"""Model quality on the default synthetic data set through the asset graph, tuned and untuned,
beside popularity and EASE, over seeds.

The quickstart's data set (2,000 users, 1,000 items, 100,000 events), one training date. The
events, the split and the datasets are written once; then, per seed, the graph's own assets
run: ``tuned_hyperparameters`` (the production recipe's search, ``--trials`` / ``--minutes``),
``two_tower_model`` with that tuning, and ``evaluation_metrics``; and, for comparison, the
production recipe untuned (``tuned: none``) and, with ``--refit``, the same tuning refit on the
training and validation rows (``refit: true``; the evaluation and its baselines still read the
training rows only, so the refit model has seen more recent events than EASE has). The table
gives recall@50 and NDCG@10 (mean ± sample standard deviation over the seeds) with
popularity's, item-kNN's and EASE's from the same evaluation, the tuned parameters, and how
long each search took.

    .venv/bin/python -m bench.synthetic_quality                      # 3 seeds, 50 trials / 30 min
    .venv/bin/python -m bench.synthetic_quality --seeds 42 --trials 10 --minutes 8
    .venv/bin/python -m bench.synthetic_quality --features default-features-history
    .venv/bin/python -m bench.synthetic_quality --recipe production --skip-untuned --seeds 42
    .venv/bin/python -m bench.synthetic_quality --features default-features-history --skip-untuned --refit
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench._common import load_average, machine, markdown_table, print_header
from twotower_assets.model.recipes import DEFAULT_N_TRIALS, DEFAULT_TIMEOUT_MINUTES

PARTITION = "2026-06-01"
BASELINES = ("popularity", "item_knn", "ease")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--trials", type=int, default=DEFAULT_N_TRIALS, help="tuning budget: trials per seed")
    parser.add_argument("--minutes", type=float, default=DEFAULT_TIMEOUT_MINUTES, help="tuning budget: minutes per seed")
    parser.add_argument("--home", default=None, help="where the run's warehouse, MLflow and artifacts go")
    parser.add_argument("--features", default="default-features",
                        help="the feature config split_tables and tf_datasets prepare (configs/*.json)")
    parser.add_argument("--recipe", default="production", help="the model recipe tuned and trained (configs/models)")
    parser.add_argument("--skip-untuned", action="store_true", help="do not train the recipe's own values")
    parser.add_argument("--refit", action="store_true",
                        help="also train the same tuning with refit: true (training + validation rows)")
    args = parser.parse_args()
    print_header("Model quality on the synthetic data, tuned and untuned",
                 "python -m bench.synthetic_quality " + " ".join(sys.argv[1:]))

    import dagster as dg
    import pandas as pd

    import twotower_assets  # noqa: F401  (TF environment switches)
    from twotower_assets.definitions import ALL_ASSETS
    from twotower_assets.lib import layout
    from twotower_assets.lib.artifacts import ArtifactStore
    from twotower_assets.lib.mlflow_tracking import MlflowTracking
    from twotower_assets.warehouse.duckdb import DuckDBWarehouse

    home = Path(args.home or tempfile.mkdtemp(prefix="synthetic-quality-"))
    home.mkdir(parents=True, exist_ok=True)
    resources = {
        "warehouse": DuckDBWarehouse(path=str(home / "warehouse.duckdb")),
        "mlflow": MlflowTracking(tracking_uri=f"sqlite:///{home / 'mlflow.db'}",
                                 artifact_root=(home / "mlartifacts").as_uri()),
        "artifacts": ArtifactStore(base_dir=str(home / "artifacts")),
    }
    instance = dg.DagsterInstance.ephemeral()
    features = {"config": {"config_name": args.features}}
    source = {"ops": {layout.CLICK_EVENTS: {"config": {"end_date": "2026-05-31"}}, "split_tables": features,
                      "tf_datasets": features}}
    prepared = dg.materialize(
        ALL_ASSETS, selection=[layout.CLICK_EVENTS, *layout.SPLIT_TABLES.values(), layout.TF_DATASETS],
        resources=resources, partition_key=PARTITION, run_config=source, instance=instance,
    )
    assert prepared.success

    def evaluate(model_config: dict, tuning: dict | None) -> tuple[dict, dict]:
        selection = [layout.TWO_TOWER_MODEL, layout.EVALUATION_METRICS]
        ops = {"two_tower_model": {"config": model_config}}
        if tuning is not None:
            selection.insert(0, layout.TUNED_HYPERPARAMETERS)
            ops["tuned_hyperparameters"] = {"config": tuning}
        run = dg.materialize(ALL_ASSETS, selection=selection, resources=resources, partition_key=PARTITION,
                             run_config={"ops": ops}, instance=instance)
        assert run.success
        metrics = pd.read_csv(home / "artifacts" / layout.EVALUATION_METRICS / PARTITION / "metrics.csv")
        overall = metrics[metrics["segment"] == "all"].set_index(["model", "k"])
        scores = {f"{model}_{metric}@{k}": float(overall.loc[(model, k), metric])
                  for model in ("two_tower", *BASELINES) for metric, k in (("recall", 50), ("ndcg", 10))}
        tuned = {}
        for event in run.get_asset_materialization_events():
            if event.asset_key.to_user_string() == layout.TUNED_HYPERPARAMETERS:
                metadata = event.materialization.metadata
                tuned = {"overrides": metadata["best_overrides"].value, "seconds": metadata["search_seconds"].value,
                         "trials": metadata["trials"].value, "pruned": metadata["trials_pruned"].value}
        return scores, tuned

    rows = {"untuned": [], "tuned": [], "tuned, refit": []}
    searches = []
    for seed in args.seeds:
        started = time.perf_counter()
        if not args.skip_untuned:
            untuned, _ = evaluate({"recipe": args.recipe, "tuned": "none", "seed": seed}, None)
            rows["untuned"].append(untuned)
        tuned, search = evaluate(
            {"recipe": args.recipe, "tuned": "newest", "seed": seed},
            {"recipe": args.recipe, "n_trials": args.trials, "timeout_minutes": args.minutes, "seed": seed,
             "experiment_name": f"two_tower_tuning_seed_{seed}"},
        )
        rows["tuned"].append(tuned)
        searches.append({"seed": seed, **search})
        if args.refit:
            # The same tuning, refit on training + validation rows for its best epoch count.
            refit, _ = evaluate({"recipe": args.recipe, "tuned": "newest", "refit": True, "seed": seed}, None)
            rows["tuned, refit"].append(refit)
        untuned_recall = f"{rows['untuned'][-1]['two_tower_recall@50']:.4f}" if rows["untuned"] else "-"
        refit_recall = f"{rows['tuned, refit'][-1]['two_tower_recall@50']:.4f}" if rows["tuned, refit"] else "-"
        print(f"  seed {seed}: untuned recall@50 {untuned_recall}, tuned "
              f"{tuned['two_tower_recall@50']:.4f} (refit {refit_recall}), EASE {tuned['ease_recall@50']:.4f} "
              f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)

    def summary(values: list[float]) -> str:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.4f} ± {spread:.4f}"

    table = []
    for key in ("recall@50", "ndcg@10"):
        for name in [name for name in rows if rows[name]]:
            table.append([f"two-tower, {name}", key, summary([r[f"two_tower_{key}"] for r in rows[name]])])
        for baseline in BASELINES:
            table.append([baseline, key, summary([r[f"{baseline}_{key}"] for r in rows["tuned"]])])
    print(markdown_table(["model", "metric", f"mean ± sd over seeds {args.seeds}"], table))
    for key in ("recall@50", "ndcg@10"):
        tuned_mean = statistics.mean(r[f"two_tower_{key}"] for r in rows["tuned"])
        ease_mean = statistics.mean(r[f"ease_{key}"] for r in rows["tuned"])
        print(f"\n{key} tuned / EASE: {tuned_mean / ease_mean:.3f}")
    print("\nSearches (per seed): ")
    for search in searches:
        print(f"- seed {search['seed']}: {search.get('trials')} trials ({search.get('pruned')} pruned), "
              f"{search.get('seconds')} s; best {search.get('overrides')}")
    print(f"\nMachine at end: {machine()}; load average {load_average():.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
