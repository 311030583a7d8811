"""Warm start vs cold start on consecutive weekly dates of the synthetic data or of MovieLens.

The graph prepares three weekly training dates (click_events, the splits, tf_datasets), then,
per seed, this script trains in process with the product's code (``train_two_tower``, the trainer's inputs: saved blocks,
seen pairs for val_loss):

* date 1, cold: the model the next week starts from;
* date 2 and date 3, cold, and warm (``warm_start`` from the same seed's model of the week
  before: date 2 from date 1's cold model, date 3 from date 2's warm model, a warm chain).

Per (date, seed, start): epochs run, the epoch and the seconds (training wall clock, epoch
ends) at which val_loss first reaches the cold start's best val_loss of that date and seed,
recall@50 on the date's test split (the product's evaluation: full catalogue, seen items
removed), and the stability against the week before's model of the same chain: mean
Jaccard@10 of the top-10 lists of shared users and item-neighbour overlap@50
(``twotower_assets.model.comparison``). The summary gives warm/cold ratios per date
(mean over seeds) and the seed spread of recall.

Sources (``--source``):

* ``synthetic`` (default): the seeded generator (``--users/--items/--events``, 60 days ending
  2026-05-31), 30 event days per date, the tiny run config's features;
* ``movielens``: MovieLens 100K split by time (``--data``: GroupLens's or RecBole's ml-100k
  files; the bench reads them, the product never needs them). The product's MovieLens source
  (``configs/run/movielens.yaml``: ``click_events`` shifts every rating by whole days so the
  last one falls on 2026-05-31, a 240-day window that holds all 215 days of ratings, feature
  config ``movielens-features``, and its model recipe, ``movielens``).
  A date D trains on the ratings before D, so 2026-05-18, 2026-05-25 and 2026-06-01 see the
  ratings up to 05-17, 05-24 and 05-31: each week adds that week's newer ratings (1,382 and
  2,278 of the 100,000) and moves every user's chronological 80% cut.

Target: warm reaches the cold best val_loss in at most half the cold epochs, at
equal recall within the seed spread.

    python -m bench.warm_start                    # 3 seeds, 3 weekly dates, ~2,000 users
    python -m bench.warm_start --seeds 1 --epochs 10   # a quick look
    python -m bench.warm_start --source movielens --data data/ml-100k --epochs 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench._common import REPO, markdown_table, print_header

DATES = ["2026-05-18", "2026-05-25", "2026-06-01"]
EVENT_DAYS = 30
"""Event days each synthetic date trains on (tiny.yaml's event_day_number)."""
LAST_EVENT_DAY = "2026-05-31"
RUN_CONFIGS = {"synthetic": "configs/run/tiny.yaml", "movielens": "configs/run/movielens.yaml"}


def run_config(args: argparse.Namespace) -> dict:
    """The ops config of click_events, the splits and tf_datasets for ``args.source``."""
    import yaml

    config = yaml.safe_load((REPO / RUN_CONFIGS[args.source]).read_text())
    ops = {op: config["ops"][op] for op in ("click_events", "split_tables", "tf_datasets")}
    if args.source == "movielens":
        ops["click_events"]["config"].update({"movielens_path": str(Path(args.data).resolve()), "end_date": LAST_EVENT_DAY})
    else:
        ops["click_events"]["config"].update(
            {"num_users": args.users, "num_items": args.items, "num_events": args.events, "days": 60,
             "end_date": LAST_EVENT_DAY, "seed": 7}
        )
        ops["split_tables"]["config"].update({"train_set_size": 0.8, "event_day_number": EVENT_DAYS})
    return ops


FLAGS = {"embedding_size": ("towers", "embedding_size"), "batch_size": ("schedule", "batch_size"),
         "learning_rate": ("optimizer", "learning_rate"), "temperature": ("task", "temperature")}
"""Command-line flags that override a field of the model recipe: flag -> (section, field)."""
SYNTHETIC_OVERRIDES = {"towers": {"embedding_size": 32}, "schedule": {"batch_size": 512},
                       "optimizer": {"learning_rate": 0.05}}
"""The synthetic bench's changes to the production recipe."""


def model_recipe(args: argparse.Namespace):
    """The model recipe every run trains: the source's run config's (movielens.yaml's
    ``two_tower_model`` config, resolved as the asset resolves it) for MovieLens, production
    with the synthetic bench's own sizes for the synthetic data; then the flags given on the
    command line, ``--epochs`` and ``--patience``."""
    from twotower_assets.defs.training.trainer import TrainingConfig
    from twotower_assets.model.recipes import load_recipe

    if args.source == "movielens":
        import yaml

        model = yaml.safe_load((REPO / RUN_CONFIGS["movielens"]).read_text())["ops"]["two_tower_model"]["config"]
        recipe = TrainingConfig(**model).model_recipe()
    else:
        recipe = load_recipe("production", SYNTHETIC_OVERRIDES)
    overrides: dict = {"schedule": {"epochs": args.epochs, "early_stopping_patience": args.patience}}
    for flag, (section, field) in FLAGS.items():
        if getattr(args, flag) is not None:
            overrides.setdefault(section, {})[field] = getattr(args, flag)
    return recipe.with_overrides(overrides)


def prepare(home: Path, args: argparse.Namespace) -> dict:
    """click_events, splits and tf_datasets of each date; the resources they live in."""
    import datetime as dt

    import dagster as dg

    from twotower_assets.definitions import ALL_ASSETS, ALL_CHECKS
    from twotower_assets.lib.artifacts import ArtifactStore
    from twotower_assets.lib.mlflow_tracking import MlflowTracking
    from twotower_assets.warehouse.duckdb import DuckDBWarehouse

    home.mkdir(parents=True, exist_ok=True)
    resources = {
        "warehouse": DuckDBWarehouse(path=str(home / "warehouse.duckdb")),
        "mlflow": MlflowTracking(tracking_uri=f"sqlite:///{home / 'mlflow.db'}", artifact_root=(home / "mlartifacts").as_uri()),
        "artifacts": ArtifactStore(base_dir=str(home / "artifacts")),
    }
    ops = run_config(args)
    window = ops["split_tables"]["config"]["event_day_number"]
    selection = ["training_events", "validation_events", "test_events", "tf_datasets"]
    if args.source == "movielens":
        # MovieLens's 240-day window reaches before the first event-day partition, so no
        # events backfill can write it: each date's run includes click_events, which (as in
        # a training run of the whole graph) writes the days of its window not yet written.
        selection.insert(0, "click_events")
    else:
        # The events first, every day in one run (an events backfill over a partition range),
        # then the splits and datasets of each date.
        first_day = (dt.date.fromisoformat(DATES[0]) - dt.timedelta(days=window)).isoformat()
        events = dg.materialize(
            ALL_ASSETS, selection=["click_events"], resources=resources, run_config={"ops": {"click_events": ops.pop("click_events")}},
            instance=dg.DagsterInstance.ephemeral(),
            tags={"dagster/asset_partition_range_start": first_day, "dagster/asset_partition_range_end": LAST_EVENT_DAY},
        )
        assert events.success
    for date in DATES:
        result = dg.materialize(
            [*ALL_ASSETS, *ALL_CHECKS], selection=selection, resources=resources, partition_key=date,
            run_config={"ops": ops}, instance=dg.DagsterInstance.ephemeral(),
        )
        assert result.success, date
    return resources


class EpochClock:
    """Seconds since training began at each epoch end, and each epoch's val_loss."""

    def __init__(self):
        import tensorflow as tf

        self.started = 0.0
        self.ends: list[float] = []
        self.callback = tf.keras.callbacks.LambdaCallback(
            on_train_begin=lambda logs: self._begin(), on_epoch_end=lambda epoch, logs: self.ends.append(time.perf_counter() - self.started)
        )

    def _begin(self) -> None:
        self.started = time.perf_counter()
        self.ends = []


def train(resources: dict, date: str, seed: int, args: argparse.Namespace, source=None):
    """(model, history, epoch end times, user ids, user vectors, item ids, item vectors)."""
    import pyarrow.parquet as pq

    from twotower_assets.lib import layout
    from twotower_assets.lib.layout import DatasetFiles
    from twotower_assets.model.datasets import dataset_rows, load_blocks
    from twotower_assets.model.features import FeatureConfig
    from twotower_assets.model.layers import FeatureStats
    from twotower_assets.model.training import TrainingParams, tower_outputs, train_two_tower
    from twotower_assets.model.warm_start import warm_start

    datasets = DatasetFiles(resources["artifacts"].require(layout.TF_DATASETS, date))
    config = FeatureConfig.model_validate_json(datasets.feature_config.read_text())
    stats = FeatureStats.load(datasets.root)
    pairs = pq.read_table(datasets.seen_pairs)
    # Cold or warm is the ``initialize`` below: warm_start maps the week before's weights in.
    params = TrainingParams(recipe=model_recipe(args), seed=seed)
    clock = EpochClock()
    result = train_two_tower(
        config, stats, load_blocks(datasets.training), dataset_rows(datasets.training),
        load_blocks(datasets.validation), params, callbacks=[clock.callback],
        seen_pairs=(pairs["user_key"], pairs["item_id"]),
        initialize=(lambda model: warm_start(model, source.user_tower, source.item_tower)) if source else None,
    )
    user_ids, user_vectors = tower_outputs(result.model.user_tower, load_blocks(datasets.users), ["user_id"])
    item_ids, item_vectors = tower_outputs(result.model.item_tower, load_blocks(datasets.items), ["item_id"])
    return result.model, result.history, clock.ends, (user_ids["user_id"], user_vectors, item_ids["item_id"], item_vectors)


def recall_at_50(resources: dict, date: str, vectors) -> float:
    import datetime as dt

    from twotower_assets.defs.evaluation.assets import EvaluationConfig, evaluate
    from twotower_assets.lib import layout
    from twotower_assets.warehouse.queries import pair_counts_query

    warehouse = resources["warehouse"]
    params = {"train_date": dt.date.fromisoformat(date)}
    pairs = {
        split: warehouse.query(pair_counts_query(warehouse.dialect, warehouse.table_name(table)), params)
        for split, table in (("training", layout.TRAINING_EVENTS), ("test", layout.TEST_EVENTS))
    }
    user_ids, user_vectors, item_ids, item_vectors = vectors
    table, _ = evaluate(
        layout.embeddings_table({"user_id": user_ids}, user_vectors), layout.embeddings_table({"item_id": item_ids}, item_vectors),
        pairs["training"], pairs["test"], EvaluationConfig(ks=[50], num_users=5000, svd_factors=10),
    )
    overall = table[(table["segment"] == "all") & (table["model"] == "two_tower")]
    return float(overall["recall"].iloc[0])


def stability(before, after) -> tuple[float, float]:
    """(mean Jaccard@10, item-neighbour overlap@50) of ``after`` against ``before``."""
    from twotower_assets.model.comparison import Embeddings, compare_models

    result = compare_models(Embeddings(*before), Embeddings(*after), {}, ks=(10,), neighbour_k=50)
    return result.summary["jaccard_at_10"], result.summary["item_neighbour_overlap_at_50"]


def reach(history: dict, ends: list[float], target: float) -> tuple[int | None, float | None]:
    """The first epoch (1-based) whose val_loss is at most ``target``, and its time."""
    for epoch, value in enumerate(history["val_loss"]):
        if value <= target + 1e-9:
            return epoch + 1, ends[epoch]
    return None, None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=["synthetic", "movielens"], default="synthetic")
    parser.add_argument("--data", default=None, help="MovieLens 100K directory (--source movielens).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--events", type=int, default=60_000)
    parser.add_argument("--embedding-size", type=int, default=None, help="Default: 32 (synthetic), movielens.yaml's.")
    parser.add_argument("--batch-size", type=int, default=None, help="Default: 512 (synthetic), movielens.yaml's.")
    parser.add_argument("--learning-rate", type=float, default=None, help="Default: 0.05 (synthetic), movielens.yaml's.")
    parser.add_argument("--temperature", type=float, default=None, help="Default: the production recipe's (synthetic), movielens.yaml's.")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--patience", type=int, default=5, help="EarlyStopping patience (production: 10).")
    parser.add_argument("--home", default=None)
    args = parser.parse_args()
    if args.source == "movielens" and not args.data:
        parser.error("--source movielens needs --data (the ml-100k directory)")

    import twotower_assets  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)

    home = Path(args.home or tempfile.mkdtemp(prefix="twotower-warm-start-"))
    print_header("Warm start vs cold start, consecutive weekly dates", "python -m bench.warm_start " + " ".join(sys.argv[1:]))
    recipe = model_recipe(args)
    model = (f"recipe {recipe.name}: embedding {recipe.towers.embedding_size}, batch {recipe.schedule.batch_size}, "
             f"learning rate {recipe.optimizer.learning_rate}, temperature {recipe.task.temperature}")
    source = (f"MovieLens 100K from {args.data}, ratings shifted to end {LAST_EVENT_DAY}, 240-day window"
              if args.source == "movielens" else
              f"Synthetic source: {args.users} users, {args.items} items, {args.events} events over 60 days")
    print(f"{source}; dates {', '.join(DATES)}; {model}, up to {args.epochs} epochs, EarlyStopping patience "
          f"{args.patience}.\n", flush=True)
    resources = prepare(home, args)
    rows = []
    for seed in args.seeds:
        first_model, _, _, first_vectors = train(resources, DATES[0], seed, args)
        previous = {"cold": (first_model, first_vectors), "warm": (first_model, first_vectors)}
        for date in DATES[1:]:
            runs = {}
            for start in ("cold", "warm"):
                source = previous[start][0] if start == "warm" else None
                model, history, ends, vectors = train(resources, date, seed, args, source=source)
                runs[start] = (model, history, ends, vectors)
            target = min(runs["cold"][1]["val_loss"])
            for start, (model, history, ends, vectors) in runs.items():
                epoch, seconds = reach(history, ends, target)
                jaccard, overlap = stability(previous[start][1], vectors)
                row = {"date": date, "seed": seed, "start": start, "epochs_run": len(history["val_loss"]),
                       "best_val_loss": min(history["val_loss"]), "epochs_to_target": epoch,
                       "seconds_to_target": seconds, "train_s": ends[-1], "recall@50": recall_at_50(resources, date, vectors),
                       "jaccard@10": jaccard, "neighbours@50": overlap}
                rows.append(row)
                print(f"  {date} seed {seed} {start}: {row['epochs_to_target']} epochs to the cold best, "
                      f"recall@50 {row['recall@50']:.4f}, Jaccard@10 {jaccard:.3f}", file=sys.stderr, flush=True)
            previous = {start: (runs[start][0], runs[start][3]) for start in runs}

    def fmt(value, pattern="{:.4f}"):
        return "never" if value is None else pattern.format(value)

    print(markdown_table(
        ["date", "seed", "start", "epochs run", "best val_loss", "epochs to cold best", "s to cold best", "train s",
         "recall@50", "Jaccard@10 vs week before", "neighbour overlap@50"],
        [[r["date"], r["seed"], r["start"], r["epochs_run"], fmt(r["best_val_loss"]), fmt(r["epochs_to_target"], "{}"),
          fmt(r["seconds_to_target"], "{:.1f}"), f"{r['train_s']:.1f}", fmt(r["recall@50"]), fmt(r["jaccard@10"], "{:.3f}"),
          fmt(r["neighbours@50"], "{:.3f}")] for r in rows],
    ))
    print()
    summary = []
    for date in DATES[1:]:
        of = {start: [r for r in rows if r["date"] == date and r["start"] == start] for start in ("cold", "warm")}

        def mean(start, key):
            values = [r[key] for r in of[start] if r[key] is not None]
            return statistics.mean(values) if values else None

        def spread(start):
            values = [r["recall@50"] for r in of[start]]
            return statistics.stdev(values) if len(values) > 1 else 0.0

        reached = sum(r["epochs_to_target"] is not None for r in of["warm"])
        epochs_ratio = (mean("warm", "epochs_to_target") or float("nan")) / mean("cold", "epochs_to_target")
        seconds_ratio = (mean("warm", "seconds_to_target") or float("nan")) / mean("cold", "seconds_to_target")
        summary.append([
            date, f"{mean('cold', 'epochs_to_target'):.1f}", f"{fmt(mean('warm', 'epochs_to_target'), '{:.1f}')} ({reached}/{len(of['warm'])})",
            f"{epochs_ratio:.2f}", f"{seconds_ratio:.2f}",
            f"{mean('cold', 'recall@50'):.4f} ± {spread('cold'):.4f}", f"{mean('warm', 'recall@50'):.4f} ± {spread('warm'):.4f}",
            f"{mean('cold', 'jaccard@10'):.3f} / {mean('warm', 'jaccard@10'):.3f}",
            f"{mean('cold', 'neighbours@50'):.3f} / {mean('warm', 'neighbours@50'):.3f}",
        ])
    print(markdown_table(
        ["date", "cold: epochs to its best", "warm: epochs to cold best (seeds reached)", "epochs warm/cold",
         "seconds warm/cold", "recall@50 cold (mean ± std)", "recall@50 warm", "Jaccard@10 cold / warm",
         "neighbour overlap@50 cold / warm"],
        summary,
    ))
    print(f"\nData and models under {home}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
