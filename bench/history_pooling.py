"""History pooling: one matrix product over the batch's distinct items against a segment sum per id.

A ``mean`` / ``sqrtn`` history feature pools each row's item vectors. ``HistoryFeature`` does it
by one (rows x distinct ids) matrix product where that is cheaper, else by a ragged segment sum
of every id's vector (the way it is forced here, as the baseline, by setting
``HistoryFeature.MAX_MATRIX_ENTRIES = 0``). Both are timed on the same training rows in the same
run: MovieLens 100K's tutorial random split with each rating's history (the user's other
training ratings, 145 a row on average), the ``movielens-one-vector`` recipe (600-d, full
softmax over 1,682 movies), ``--epochs`` epochs each, same seed. The first epoch (tracing) is
left out of the per-epoch time; the last epoch's training loss is printed beside it, since both
ways compute the same function.

    .venv/bin/python -m bench.history_pooling --data data/ml-100k
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from bench._common import load_average, machine, markdown_table, print_header


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data") / "ml-100k")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--recipe", default="movielens-one-vector")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error(f"--epochs must be at least 2 (the first epoch traces the graph and is not timed), got {args.epochs}")
    print_header("History pooling: matrix product against segment sum",
                 "python -m bench.history_pooling " + " ".join(sys.argv[1:]))

    import tensorflow as tf

    import twotower_assets  # noqa: F401  (TF environment switches)
    from twotower_assets.data.movielens import click_event_table, load_movielens
    from twotower_assets.model import in_memory
    from twotower_assets.model.features import load_feature_config
    from twotower_assets.model.layers import HistoryFeature
    from twotower_assets.model.recipes import load_recipe
    from twotower_assets.model.training import TrainingParams

    recipe = load_recipe(args.recipe).with_overrides({"schedule": {"epochs": args.epochs}})
    config = load_feature_config(recipe.features)
    events = click_event_table(load_movielens(args.data))
    train = in_memory.random_split(events, 0.2, seed=42).train
    train = in_memory.history_from(config, train, train)
    catalog = in_memory.distinct_items(events, config)
    lengths = [len(h.split()) for h in train[next(iter(config.history_features))].to_pylist()]
    print(f"{train.num_rows:,} training rows, {catalog.num_rows:,} items, history {statistics.mean(lengths):.0f} ids a "
          f"row on average (max {max(lengths)}); recipe `{recipe.name}`, batch {recipe.schedule.batch_size}, "
          f"{args.epochs} epochs\n")

    class EpochTimes(tf.keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds, self.losses = [], []

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.started)
            self.losses.append(float(logs["loss"]))

    default_cap = HistoryFeature.MAX_MATRIX_ENTRIES
    measured = {}
    for way, cap in (("segment sum per id (baseline)", 0), ("matrix product (product)", default_cap)):
        HistoryFeature.MAX_MATRIX_ENTRIES = cap
        times = EpochTimes()
        in_memory.fit(config, train, None, TrainingParams(recipe=recipe, seed=42), catalog, callbacks=[times])
        measured[way] = times
        print(f"  {way}: {', '.join(f'{s:.1f}' for s in times.seconds)} s an epoch", file=sys.stderr, flush=True)
    HistoryFeature.MAX_MATRIX_ENTRIES = default_cap

    baseline = statistics.median(next(iter(measured.values())).seconds[1:])
    rows = []
    for way, times in measured.items():
        per_epoch = statistics.median(times.seconds[1:])
        rows.append([way, f"{per_epoch:.2f}", f"{times.seconds[0]:.1f}", f"{times.losses[-1]:.4f}",
                     f"{baseline / per_epoch:.2f}"])
    print(markdown_table(["pooling", "s / epoch (median, epochs 2+)", "first epoch s", "last epoch's loss",
                          "x baseline"], rows))
    print(f"\nMachine at end: {machine()}; load average {load_average():.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
