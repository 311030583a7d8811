"""GPU check: the default model trained on production-sized synthetic data, GPU vs CPU.

One short script (well under 8 minutes on one GPU machine):

1. generates the synthetic click events at production size (default 10M events, 1M users,
   200k items), keeps the default-features columns, adds each item's share of rows (logQ),
   builds the feature statistics and saves the training blocks, as ``tf_datasets`` does;
2. trains the ``production`` model recipe on default-features (embedding 64, batch ``--batch-size``) with
   ``train_two_tower`` for one epoch (a fifth of the rows) on the GPU(s) -- MirroredStrategy
   when several are visible -- in float32 and with mixed precision (bfloat16);
3. trains the same model on the CPU (a child process with no GPU visible) for
   ``--cpu-steps`` steps, the CPU figure for the same model;
4. prints examples/second (after ``--warmup`` steps, which include tracing) as a table.

    python -m bench.gpu_check                       # production size
    python -m bench.gpu_check --events 300000 --users 30000 --items 8000   # a dry run

On a GPU machine, from the repository root (the table is in the last lines):

    python -m bench.gpu_check 2>&1 | tail -40
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import REPO, markdown_table, machine


def prepare(args, directory: Path) -> dict:
    """Events -> default-features columns + logQ probability -> stats and saved blocks."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from twotower_assets.data.synthetic import SyntheticSpec, generate_click_events
    from twotower_assets.model.datasets import FeatureStatsBuilder, feature_kinds, save_dataset
    from twotower_assets.model.features import load_feature_config
    from twotower_assets.model.towers import SAMPLING_PROBABILITY_COLUMN

    started = time.perf_counter()
    config = load_feature_config("default-features")
    kinds = feature_kinds(config)
    spec = SyntheticSpec(end_date=dt.date(2026, 5, 31), num_users=args.users, num_items=args.items,
                         num_events=args.events, days=90, seed=7)
    days = [day.select(list(kinds)) for day in generate_click_events(spec)]
    events = pa.concat_tables(days)
    del days
    item_ids = pc.unique(events["item_id"])
    counts = np.bincount(pc.index_in(events["item_id"], value_set=item_ids).to_numpy(), minlength=len(item_ids))
    share = (counts / events.num_rows).astype(np.float64)
    events = events.append_column(
        SAMPLING_PROBABILITY_COLUMN, pa.array(share[pc.index_in(events["item_id"], value_set=item_ids).to_numpy()])
    )
    # Rows in a fixed pseudo-random order, as the training query returns them.
    events = events.take(pa.array(np.random.default_rng(0).permutation(events.num_rows)))
    generated = time.perf_counter() - started
    builder = FeatureStatsBuilder(config)
    rows = save_dataset(events.to_batches(max_chunksize=65_536), {**kinds, SAMPLING_PROBABILITY_COLUMN: "number"},
                        directory / "training", on_batch=builder.update)
    builder.build().save(directory)
    return {"rows": rows, "generate_s": generated, "prepare_s": time.perf_counter() - started}


def train(args, directory: Path, mixed_precision: bool, steps: int | None) -> dict:
    """Train with train_two_tower; examples/s measured after the warm-up steps."""
    import tensorflow as tf

    from twotower_assets.model.datasets import load_blocks
    from twotower_assets.model.features import load_feature_config
    from twotower_assets.model.layers import FeatureStats
    from twotower_assets.model.recipes import load_recipe
    from twotower_assets.model.training import EPOCH_FRACTION, TrainingParams, train_two_tower

    rows = json.loads((directory / "prepared.json").read_text())["rows"]

    class Throughput(tf.keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.started, self.steps = None, 0

        def on_train_batch_end(self, batch, logs=None):
            self.steps = batch + 1
            if self.steps == args.warmup:
                float(logs["loss"])  # wait for the device: the warm-up (and tracing) is over
                self.started = time.perf_counter()

        def on_train_end(self, logs=None):
            self.seconds = time.perf_counter() - self.started if self.started else float("nan")

    timer = Throughput()
    # One epoch is rows / batch / EPOCH_FRACTION steps; a CPU run is cut to `steps` by
    # pretending the table is that many epochs' worth of rows.
    train_rows = rows if steps is None else steps * args.batch_size * EPOCH_FRACTION
    started = time.perf_counter()
    result = train_two_tower(
        load_feature_config("default-features"), FeatureStats.load(directory), load_blocks(directory / "training"),
        train_rows, None,
        TrainingParams(
            recipe=load_recipe("production", {"towers": {"embedding_size": 64}, "schedule": {"batch_size": args.batch_size, "epochs": 1}}),
            seed=42, mixed_precision=mixed_precision,
        ),
        callbacks=[timer],
    )
    measured = (timer.steps - args.warmup) * args.batch_size
    return {
        "device": result.device,
        "mixed_precision": mixed_precision,
        "steps": timer.steps,
        "examples_per_s": measured / timer.seconds,
        "wall_s": time.perf_counter() - started,
        "loss": result.history["loss"][-1],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--cpu-steps", type=int, default=30)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--cpu-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.cpu_child:  # the CPU figure: this process sees no GPU (set before TF loads)
        import twotower_assets  # noqa: F401

        print(json.dumps(train(args, Path(args.work), False, args.cpu_steps)))
        return 0

    import twotower_assets  # noqa: F401
    import tensorflow as tf

    started = time.perf_counter()
    print(f"Machine: {machine()}")
    gpus = tf.config.list_physical_devices("GPU")
    print(f"GPUs visible: {[g.name for g in gpus] or 'none'}; TensorFlow {tf.__version__}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="twotower-gpu-check-"))
    prepared = prepare(args, work)
    (work / "prepared.json").write_text(json.dumps(prepared))
    print(f"Prepared {prepared['rows']:,} training rows in {prepared['prepare_s']:.0f} s "
          f"(generation {prepared['generate_s']:.0f} s)", flush=True)

    results = []
    for mixed in (False, True):
        results.append(train(args, work, mixed, None if gpus else args.cpu_steps))
        print(f"  {results[-1]}", flush=True)
    child = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--cpu-child", "--work", str(work), "--batch-size", str(args.batch_size),
         "--warmup", str(min(args.warmup, 5)), "--cpu-steps", str(args.cpu_steps)],
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "-1"}, cwd=REPO, capture_output=True, text=True,
    )
    if child.returncode != 0:
        print(child.stderr[-3000:])
        return 1
    cpu = json.loads(child.stdout.strip().splitlines()[-1])
    results.append(cpu)

    rows = [[r["device"], "yes" if r["mixed_precision"] else "no", r["steps"], f"{r['examples_per_s']:,.0f}",
             f"{r['examples_per_s'] / cpu['examples_per_s']:.1f}", f"{r['loss']:.3f}"] for r in results]
    print()
    print(markdown_table(["device", "mixed precision", "steps", "examples/s (after warm-up)", "x CPU", "last loss"], rows))
    print(f"\n{args.events:,} events, {args.users:,} users, {args.items:,} items; batch {args.batch_size}, "
          f"default-features, embedding 64. Total {time.perf_counter() - started:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
