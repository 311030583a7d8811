"""Training through the asset graph vs a standalone script, and input time vs compute time.

One process, one data set (synthetic, materialised through the graph up to ``tf_datasets``):

* **asset**: ``two_tower_model`` materialised by Dagster (in process), examples/second of its
  training call as it records it (build + fit + validation, MLflow logging per epoch);
* **standalone**: a plain script on the same saved datasets: the same model class and
  model recipe (``production`` with this run's embedding size, batch and one epoch, resolved
  by the asset's own ``TrainingConfig``), the same tf.data pipeline (``shuffled_batches`` over the saved blocks,
  the same validation set), ``model.fit`` for the same steps, no Dagster, no MLflow;
* **input only**: the same training pipeline iterated for the same steps with no model;
* **compute only**: the same model fitted on one batch repeated from memory (no input work).

Alternates asset and standalone ``--repeats`` times and keeps the best of each (the machine
is shared). Target: asset >= 0.9 x standalone; input not the bottleneck.

    python -m bench.training_overhead                       # 1M events, 100k users, 20k items
    python -m bench.training_overhead --events 300000 --users 30000 --items 8000
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from bench._common import load_average, markdown_table, print_header

import twotower_assets  # noqa: F401  (TF environment switches)

PARTITION = "2026-06-01"


def resources(home: Path) -> dict:
    from twotower_assets.lib.artifacts import ArtifactStore
    from twotower_assets.lib.mlflow_tracking import MlflowTracking
    from twotower_assets.warehouse.duckdb import DuckDBWarehouse

    home.mkdir(parents=True, exist_ok=True)
    return {
        "warehouse": DuckDBWarehouse(path=str(home / "warehouse.duckdb")),
        "mlflow": MlflowTracking(tracking_uri=f"sqlite:///{home / 'mlflow.db'}", artifact_root=(home / "mlartifacts").as_uri()),
        "artifacts": ArtifactStore(base_dir=str(home / "artifacts")),
    }


def materialize(selection: list[str], run_config: dict, res: dict):
    import dagster as dg

    from twotower_assets.definitions import ALL_ASSETS

    result = dg.materialize(
        ALL_ASSETS,
        selection=dg.AssetSelection.assets(*selection),
        resources=res,
        partition_key=PARTITION,
        run_config=run_config,
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--embedding-size", type=int, default=64)
    parser.add_argument("--config-name", default="default-features")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--home", default=str(Path(tempfile.gettempdir()) / "twotower-training-overhead"))
    args = parser.parse_args()

    import pyarrow.parquet as pq
    import tensorflow as tf

    from twotower_assets.defs.training.trainer import TrainingConfig
    from twotower_assets.lib.layout import TF_DATASETS, DatasetFiles
    from twotower_assets.model.datasets import batches, dataset_rows, load_blocks, shuffled_batches
    from twotower_assets.model.features import FeatureConfig
    from twotower_assets.model.layers import FeatureStats
    from twotower_assets.model.training import EPOCH_FRACTION, build_model

    print_header("Training overhead: asset graph vs standalone script", "python -m bench.training_overhead " + " ".join(sys.argv[1:]))
    home = Path(args.home)
    res = resources(home)
    datasets = res["artifacts"].path(TF_DATASETS, PARTITION)
    source = {"num_users": args.users, "num_items": args.items, "num_events": args.events, "days": 90,
              "end_date": "2026-05-31", "seed": 7}
    manifest = datasets / "bench_source.json"
    if not (manifest.exists() and json.loads(manifest.read_text()) == {**source, "config": args.config_name}):
        print("Preparing data through the graph (click_events, splits, tf_datasets)...", file=sys.stderr, flush=True)
        materialize(
            ["click_events", "training_events", "validation_events", "test_events", TF_DATASETS],
            {"ops": {"click_events": {"config": source}, "split_tables": {"config": {"train_set_size": 0.95, "event_day_number": 90}},
                     TF_DATASETS: {"config": {"config_name": args.config_name}}}},
            res,
        )
        manifest.write_text(json.dumps({**source, "config": args.config_name}))

    train_rows = dataset_rows(datasets / "training")
    # The asset's config; the standalone script trains the very parameters it resolves to.
    model_config = {"recipe": "production", "towers": {"embedding_size": args.embedding_size},
                    "schedule": {"batch_size": args.batch_size, "epochs": 1}, "seed": 42}
    params = TrainingConfig(**model_config).training_params()
    steps = max(1, math.ceil(train_rows / args.batch_size / EPOCH_FRACTION))
    examples = steps * args.batch_size
    feature_config = FeatureConfig.model_validate_json((datasets / "feature_config.json").read_text())
    stats = FeatureStats.load(datasets)
    pairs = pq.read_table(DatasetFiles(datasets).seen_pairs)
    seen_pairs = (pairs["user_key"], pairs["item_id"])
    print(
        f"{args.events:,} events -> {train_rows:,} training rows; config {args.config_name}, batch {args.batch_size}, "
        f"embedding {args.embedding_size}: one epoch = {steps} steps = {examples:,} examples.\n",
        flush=True,
    )

    def train_pipeline():
        return shuffled_batches(load_blocks(datasets / "training"), args.batch_size, min(params.recipe.schedule.shuffle_buffer, train_rows), params.seed).prefetch(tf.data.AUTOTUNE)

    def standalone() -> float:
        tf.keras.utils.set_random_seed(params.seed)
        started = time.perf_counter()
        model = build_model(feature_config, stats, params, seen_pairs=seen_pairs)
        validation = batches(load_blocks(datasets / "validation"), args.batch_size).cache().prefetch(tf.data.AUTOTUNE)
        model.fit(train_pipeline(), validation_data=validation, epochs=1, steps_per_epoch=steps, verbose=0)
        return examples / (time.perf_counter() - started)

    run_config = {"ops": {"two_tower_model": {"config": model_config}}}

    def asset() -> tuple[float, float]:
        started = time.perf_counter()
        materialize(["two_tower_model"], run_config, res)
        wall = time.perf_counter() - started
        summary = json.loads((res["artifacts"].path("two_tower_model", PARTITION) / "summary.json").read_text())
        return summary["examples_per_second"], wall

    best = {"standalone": 0.0, "asset": 0.0}
    asset_wall = float("inf")
    loads = []
    for repeat in range(args.repeats):
        loads.append(load_average())
        best["standalone"] = max(best["standalone"], standalone())
        rate, wall = asset()
        best["asset"] = max(best["asset"], rate)
        asset_wall = min(asset_wall, wall)
        print(f"  repeat {repeat + 1}: standalone best {best['standalone']:,.0f}/s, asset best {best['asset']:,.0f}/s", file=sys.stderr, flush=True)

    # Input alone: the same pipeline, the same number of batches, no model.
    started = time.perf_counter()
    for _ in train_pipeline().take(steps):
        pass
    input_seconds = time.perf_counter() - started

    # Compute alone: the same model on one batch held in memory.
    one_batch = next(iter(train_pipeline()))
    tf.keras.utils.set_random_seed(params.seed)
    model = build_model(feature_config, stats, params, seen_pairs=seen_pairs)
    model.fit(tf.data.Dataset.from_tensors(one_batch).repeat(), epochs=1, steps_per_epoch=3, verbose=0)  # trace first
    started = time.perf_counter()
    model.fit(tf.data.Dataset.from_tensors(one_batch).repeat(), epochs=1, steps_per_epoch=steps, verbose=0)
    compute_seconds = time.perf_counter() - started

    rows = [
        ["standalone script (model.fit, same pipeline and validation)", f"{best['standalone']:,.0f}", "1.00"],
        ["asset graph (two_tower_model, its recorded training rate)", f"{best['asset']:,.0f}", f"{best['asset'] / best['standalone']:.2f}"],
        ["input pipeline alone (no model)", f"{examples / input_seconds:,.0f}", f"{examples / input_seconds / best['standalone']:.2f}"],
        ["compute alone (one batch from memory)", f"{examples / compute_seconds:,.0f}", f"{examples / compute_seconds / best['standalone']:.2f}"],
    ]
    print(markdown_table(["training", "examples/s", "x standalone"], rows))
    ratio = best["asset"] / best["standalone"]
    print(
        f"\nAsset / standalone: {ratio:.2f} (target >= 0.90: {'met' if ratio >= 0.9 else 'NOT met'}). "
        f"Per step: input {input_seconds / steps * 1000:.0f} ms when run alone, compute {compute_seconds / steps * 1000:.0f} ms "
        f"({'input is not' if input_seconds < compute_seconds else 'input IS'} the bottleneck; prefetch overlaps the two). "
        f"The whole asset (training + tower outputs for every user and item + saving + MLflow) took {asset_wall:.0f} s. "
        f"Load average at the repeats: {', '.join(f'{x:.1f}' for x in loads)}."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
