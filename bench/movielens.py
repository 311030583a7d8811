"""MovieLens 100K: the TFRS basic-retrieval protocol, baselines and this project's model, in one run.

The protocol of the TFRS basic retrieval tutorial
(https://www.tensorflow.org/recommenders/examples/basic_retrieval): the 100,000 ratings
shuffled with seed 42 (``tf.random.set_seed(42)``, ``shuffle(100_000, seed=42,
reshuffle_each_iteration=False)``), the first 80,000 for training and the next 20,000 for
test; every test rating's movie is ranked against all 1,682 movies, and top-k categorical
accuracy is the share of test ratings whose movie is in the top k for that rating's query.
It is counted twice: as the tutorial counts it (movies the user rated in training stay in
the ranking) and with them removed (what a recommender serves).

Side by side, in the same run:

* ``tfrs-tutorial``: the tutorial's own model, built with TFRS as in the tutorial (32-d
  user and movie id embeddings, ``tfrs.tasks.Retrieval`` with ``FactorizedTopK`` over all
  movies, Adagrad 0.1, batch 8192, 3 epochs); TFRS's own ``evaluate`` is printed beside our
  exact count as a cross-check. Movies are keyed by id, not title (1,682 ids, 1,664 titles).
* ``popularity``: training rating counts.
* ``ease``: EASE (Steck 2019, closed form); its regulariser is tuned on a validation slice
  (the last 10% of the shuffled training ratings), then refitted on all 80,000.
* ``two-tower``: this project's model (``twotower_assets.model``, trained through the public
  ``in_memory`` API) from a model recipe (``--recipe``, default ``movielens``: production's
  in-batch softmax with logQ correction, temperature 0.1, LazyAdam 0.01, batch 1024, on
  ``configs/movielens-features.json``), early stopping on val_loss of the same validation slice, then
  refitted on all 80,000 for the best epoch count. Its query for a rating is the user's
  features plus ``user_recent_items``: the user's latest *training* ratings strictly before
  that rating's time (the test rating itself and every other test rating are never inputs).
* ``two-tower (per user)`` and ``ease (recent-items query)``: the same models with the other
  kind of query, so the effect of the query is visible: one vector per user from all their
  training ratings, and EASE scored from the same recent items.

Then the project's own evaluation (``twotower_assets.model.metrics``): per test user,
precision / recall / NDCG at 10, 50, 100 over the full catalogue with training items
removed, for the model (per-user vectors, as the asset graph serves them) and the random,
popularity, SVD and EASE baselines, overall and for light vs heavy users.

    .venv/bin/python -m bench.movielens --data data/ml-100k
    .venv/bin/python -m bench.movielens --data data/ml-100k --out /tmp/movielens-bench --ablations
    .venv/bin/python -m bench.movielens --data data/ml-100k --recipe movielens-one-vector \
        --skip-tutorial --training-history others --seeds 42 43 44   # one vector per user vs EASE

The model is a recipe (``--recipe``: a name in configs/models/ or a YAML file; its ``features``
name the feature config, default ``movielens-features``), with ``--set section.field=value``
overrides (``--set schedule.epochs=20 --set task.temperature=0.2``). The bench's own options
are its protocol: ``--recent-items N`` (how many latest training ratings the queries see;
default: the recipe's history feature's length, else 10) and ``--training-history causal|others``
(a training rating's query: the ratings strictly before it, or the user's other training
ratings, the one-vector-per-user setting); ``--seeds`` trains once per seed and prints the
per-user metrics as mean ± sample standard deviation [min, max] beside EASE.

``--data`` takes GroupLens's u.data/u.user/u.item or RecBole's ml-100k.inter/.user/.item.
``--out`` writes results.json, metrics.csv and the plots (PNG).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

import twotower_assets  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import pyarrow as pa
import tensorflow as tf
import tensorflow_recommenders as tfrs
import yaml

from bench._common import machine
from twotower_assets.data.movielens import click_event_table, load_movielens, recent_items
from twotower_assets.model import in_memory, metrics, plots, topk
from twotower_assets.model.features import FeatureConfig, load_feature_config, parse_feature_config
from twotower_assets.model.recipes import ModelRecipe, load_recipe, overrides_from_fields
from twotower_assets.model.training import TrainingParams

DEFAULT_DATA = Path("data") / "ml-100k"
DEFAULT_FEATURES = "movielens-features"
KS = (1, 5, 10, 50, 100)
PROJECT_KS = (10, 50, 100)
EASE_LAMBDAS = (50.0, 100.0, 200.0, 300.0, 500.0, 1000.0, 2000.0)
TARGET_TUTORIAL_TOP100 = 0.42
SEED = 42


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ data


@dataclass
class Split:
    """The tutorial split as frames with every event column, plus index maps."""

    train: pd.DataFrame
    test: pd.DataFrame
    fit: pd.DataFrame  # training minus the validation slice
    validation: pd.DataFrame
    users: np.ndarray  # all user ids (row order of user matrices)
    items: pd.DataFrame  # every movie's item columns (row order of item matrices)


def tutorial_order(n: int) -> np.ndarray:
    """The tutorial's shuffle of ``n`` ratings (``tf.data`` with seed 42): its first 80,000 rows
    train, the next 20,000 test."""
    tf.random.set_seed(SEED)
    return np.fromiter(
        tf.data.Dataset.range(n).shuffle(100_000, seed=SEED, reshuffle_each_iteration=False).as_numpy_iterator(),
        dtype=np.int64,
        count=n,
    )


def tutorial_split(data_path: Path, validation_share: float) -> Split:
    data = load_movielens(data_path)
    order = tutorial_order(data.num_ratings)
    train_rows, test_rows = order[:80_000], order[80_000:100_000]
    ratings = data.ratings.select(["user_id", "item_id"]).to_pandas()
    # Event columns (user and movie attributes, dates) from the product's mapping; pairs are unique.
    events = click_event_table(data).to_pandas().drop(columns=["user_recent_items"])
    frame = ratings.merge(events, on=["user_id", "item_id"], how="left", validate="one_to_one")
    train = frame.iloc[train_rows].reset_index(drop=True)
    test = frame.iloc[test_rows].reset_index(drop=True)
    cut = len(train) - int(round(len(train) * validation_share))
    items = data.items.to_pandas().rename(
        columns={"title": "item_title", "genres": "item_genres", "release_year": "item_release_year"}
    )
    items["offer_category_id"] = items["item_genres"].str.split(" ").str[0]
    return Split(
        train=train,
        test=test,
        fit=train.iloc[:cut].reset_index(drop=True),
        validation=train.iloc[cut:].reset_index(drop=True),
        users=np.sort(data.users["user_id"].to_numpy(zero_copy_only=False).astype(str)),
        items=items,
    )


def with_recent(events: pd.DataFrame, history: pd.DataFrame, k: int, at_end: bool = False) -> pd.DataFrame:
    """``events`` with user_recent_items from ``history`` only (at_end: after every rating)."""
    times = np.full(len(events), np.iinfo(np.int64).max) if at_end else events["event_timestamp"].to_numpy()
    out = events.copy()
    out["user_recent_items"] = recent_items(
        events["user_id"].to_numpy(), times, history["user_id"].to_numpy(), history["item_id"].to_numpy(),
        history["event_timestamp"].to_numpy(), k,
    )
    return out


def with_other_items(events: pd.DataFrame, history: pd.DataFrame, k: int) -> pd.DataFrame:
    """``events`` with user_recent_items = the user's ``k`` latest ratings in ``history`` at its end,
    leaving out the event's own item: the query the one-vector-per-user evaluation gives a user
    (all their training ratings, newest first), minus the item to be predicted.

    Not causal (an event sees its user's later ratings), on purpose: on a random split a test
    rating is any of the user's ratings, not the next one, and the one vector per user is
    computed from the whole training history; training each rating on the same kind of query
    is what EASE does too (every training item predicted from the user's other items).
    """
    latest = with_recent(events, history, k + 1, at_end=True)["user_recent_items"]
    own = events["item_id"].astype(str).to_numpy()
    out = events.copy()
    out["user_recent_items"] = [
        " ".join([m for m in items.split() if m != item][:k]) for items, item in zip(latest, own)
    ]
    return out


class Index:
    def __init__(self, split: Split):
        self.user_row = {u: i for i, u in enumerate(split.users)}
        self.item_ids = split.items["item_id"].to_numpy().astype(str)
        self.item_row = {m: i for i, m in enumerate(self.item_ids)}

    def users(self, frame: pd.DataFrame) -> np.ndarray:
        return frame["user_id"].map(self.user_row).to_numpy(np.int64)

    def items(self, frame: pd.DataFrame) -> np.ndarray:
        return frame["item_id"].map(self.item_row).to_numpy(np.int64)

    def matrix(self, frame: pd.DataFrame) -> sp.csr_matrix:
        rows, cols = self.users(frame), self.items(frame)
        return sp.csr_matrix(
            (np.ones(len(rows), np.float32), (rows, cols)), shape=(len(self.user_row), len(self.item_row))
        )


# ------------------------------------------------------------------------ counting


def top_k_accuracy(
    query_vectors: np.ndarray,
    item_vectors: np.ndarray,
    true_items: np.ndarray,
    seen: sp.csr_matrix | None = None,
    ks=KS,
    block: int = 2048,
) -> dict[int, float]:
    """Share of queries whose true item ranks in the top k of query @ items (exact, all items).

    Row i of ``query_vectors`` is test rating i's query; ``seen`` (rows aligned with the
    queries) lists items removed from that query's ranking. Ties count against the true item
    only for lower item indices, as ``topk.top_k_items`` breaks them.
    """
    ranks = np.empty(len(true_items), np.int64)
    items_t = np.ascontiguousarray(item_vectors, dtype=np.float32).T
    columns = np.arange(item_vectors.shape[0])
    for start in range(0, len(true_items), block):
        stop = min(start + block, len(true_items))
        scores = np.asarray(query_vectors[start:stop], dtype=np.float32) @ items_t
        if seen is not None:
            part = seen[start:stop]
            rows = np.repeat(np.arange(stop - start), np.diff(part.indptr))
            scores[rows, part.indices] = -np.inf
        true = true_items[start:stop]
        true_scores = scores[np.arange(stop - start), true][:, None]
        ahead = (scores > true_scores) | ((scores == true_scores) & (columns[None, :] < true[:, None]))
        ranks[start:stop] = ahead.sum(axis=1)
    return {k: float(np.mean(ranks < k)) for k in ks}


def both_countings(query_vectors, item_vectors, true_items, seen_rows) -> dict[str, dict[int, float]]:
    return {
        "tutorial": top_k_accuracy(query_vectors, item_vectors, true_items),
        "seen_removed": top_k_accuracy(query_vectors, item_vectors, true_items, seen_rows),
    }


# ----------------------------------------------------------------------------- models


def tutorial_model(split: Split, index: Index, epochs: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """The basic retrieval tutorial's model, with TFRS as in the tutorial; (user, item) vectors."""
    tf.keras.utils.set_random_seed(SEED)
    unique_users = split.users
    unique_movies = index.item_ids
    movies = tf.data.Dataset.from_tensor_slices(unique_movies)
    embedding_dimension = 32
    user_model = tf.keras.Sequential(
        [
            tf.keras.layers.StringLookup(vocabulary=unique_users, mask_token=None),
            tf.keras.layers.Embedding(len(unique_users) + 1, embedding_dimension),
        ]
    )
    movie_model = tf.keras.Sequential(
        [
            tf.keras.layers.StringLookup(vocabulary=unique_movies, mask_token=None),
            tf.keras.layers.Embedding(len(unique_movies) + 1, embedding_dimension),
        ]
    )

    class MovielensModel(tfrs.Model):
        def __init__(self):
            super().__init__()
            self.user_model = user_model
            self.movie_model = movie_model
            self.task = tfrs.tasks.Retrieval(
                metrics=tfrs.metrics.FactorizedTopK(candidates=movies.batch(128).map(movie_model))
            )

        def compute_loss(self, features, training=False):
            return self.task(
                self.user_model(features["user_id"]),
                self.movie_model(features["movie_id"]),
                # Metrics only when evaluating: same weights, a faster fit.
                compute_metrics=not training,
            )

    def dataset(frame: pd.DataFrame) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices(
            {"user_id": frame["user_id"].to_numpy().astype(str), "movie_id": frame["item_id"].to_numpy().astype(str)}
        )

    model = MovielensModel()
    model.compile(optimizer=tf.keras.optimizers.Adagrad(learning_rate=0.1))
    cached_train = dataset(split.train).shuffle(100_000).batch(8192).cache()
    cached_test = dataset(split.test).batch(4096).cache()
    model.fit(cached_train, epochs=epochs, verbose=0)
    tfrs_result = model.evaluate(cached_test, return_dict=True, verbose=0)
    user_vectors = user_model(tf.constant(unique_users)).numpy()
    item_vectors = movie_model(tf.constant(unique_movies)).numpy()
    return user_vectors, item_vectors, {k: float(v) for k, v in tfrs_result.items() if "top_" in k}


def ease_weights(train: sp.csr_matrix, regulariser: float) -> np.ndarray:
    """EASE's item-item weights (the product's :func:`metrics.ease_item_weights`), float32."""
    return metrics.ease_item_weights(train, regulariser).astype(np.float32)


def tune_ease(split: Split, index: Index) -> tuple[float, list[dict]]:
    """The regulariser with the best validation accuracy (mean of top-10 and top-100, seen removed)."""
    fit = index.matrix(split.fit)
    users = index.users(split.validation)
    true = index.items(split.validation)
    seen = fit[users]
    trials = []
    for regulariser in EASE_LAMBDAS:
        weights = ease_weights(fit, regulariser)
        # Scores of a user = X_u B: users' rows as queries against B's columns as items.
        accuracy = top_k_accuracy(fit[users].toarray(), weights.T, true, seen, ks=(10, 100))
        trials.append({"lambda": regulariser, "top10": accuracy[10], "top100": accuracy[100]})
    best = max(trials, key=lambda t: t["top10"] + t["top100"])
    return best["lambda"], trials


@dataclass(frozen=True)
class TowerSetup:
    """The project's model in this bench: a recipe, and the protocol's queries."""

    recipe: ModelRecipe
    seed: int = SEED
    # How many of the user's latest training ratings a query sees.
    recent_items: int = 10
    # causal: a training rating's query sees the user's ratings strictly before it (next-item);
    # others: the user's latest training ratings at the end of training, minus its own item.
    training_history: str = "causal"
    # Feature config features left out (ablations).
    drop_features: tuple[str, ...] = ()

    @property
    def features(self) -> FeatureConfig:
        config = load_feature_config(self.recipe.features or DEFAULT_FEATURES)
        if not self.drop_features:
            return config
        raw = json.loads(config.model_dump_json())
        for tower in ("user_embedding_layers", "item_embedding_layers"):
            raw[tower] = {k: v for k, v in raw[tower].items() if k not in self.drop_features}
        raw.pop("name")
        return parse_feature_config(raw, name=config.name, source="bench ablation")

    def describe(self) -> str:
        dropped = f", without {list(self.drop_features)}" if self.drop_features else ""
        fields = ", ".join(f"{k} {v}" for k, v in self.recipe.params().items() if k not in ("name", "description"))
        return (
            f"recipe {self.recipe.name} ({fields}){dropped}; seed {self.seed}; recent items {self.recent_items}, "
            f"training rows see {self.training_history} ratings"
        )


def default_recent_items(recipe: ModelRecipe) -> int:
    """The length of the recipe's history feature, if its features have one; else 10."""
    config = load_feature_config(recipe.features or DEFAULT_FEATURES)
    lengths = [spec.history_length for spec in config.history_features.values()]
    return lengths[0] if lengths else 10


def _table(frame: pd.DataFrame, config: FeatureConfig) -> pa.Table:
    columns = [c for c in dict.fromkeys([*config.user_columns, *config.item_columns]) if c in frame.columns]
    return pa.Table.from_pandas(frame[columns], preserve_index=False)


def _train(setup: TowerSetup, config: FeatureConfig, train: pd.DataFrame, validation: pd.DataFrame | None,
           catalog_frame: pd.DataFrame, recipe: ModelRecipe) -> in_memory.FittedModel:
    """The product's training through the public API; the catalogue is every movie."""
    return in_memory.fit(
        config, _table(train, config), _table(validation, config) if validation is not None else None,
        TrainingParams(recipe=recipe, seed=setup.seed),
        catalog=pa.Table.from_pandas(catalog_frame[config.item_columns], preserve_index=False),
        # The tutorial protocol's validation slice as measured in docs/benchmarks-movielens.md:
        # val_loss counts the user's training items as negatives.
        seen_pairs=None,
    )


@dataclass
class TowerRun:
    test_queries: np.ndarray  # one vector per test rating
    user_vectors: np.ndarray  # one per user (all training ratings as history), split.users order
    user_mean_vectors: np.ndarray  # one per user: the mean of its training ratings' queries
    item_vectors: np.ndarray  # index.item_ids order
    history_tune: dict
    history_final: dict
    best_epochs: int
    seconds: float


def two_tower(split: Split, index: Index, setup: TowerSetup) -> TowerRun:
    """Early stopping on the validation slice, then a refit on all training ratings."""
    started = time.perf_counter()
    config = setup.features
    k = setup.recent_items
    if setup.training_history == "others":
        fit = with_other_items(split.fit, split.fit, k)
        validation = with_other_items(split.validation, split.fit, k)
    else:
        fit = with_recent(split.fit, split.fit, k)
        validation = with_recent(split.validation, split.fit, k)
    tuned = _train(setup, config, fit, validation, split.items, setup.recipe).result
    val_losses = tuned.history.get("val_loss", [])
    best_epochs = int(np.argmin(val_losses)) + 1 if val_losses else tuned.epochs_run
    log(f"two-tower [{setup.describe()}]: best validation epoch {best_epochs} of {tuned.epochs_run}")
    log("validation loss by epoch: " + " ".join(f"{v:.4f}" for v in val_losses))
    log("learning rate by epoch: " + " ".join(f"{v:.2g}" for v in tuned.history.get("lr", [])))
    train = with_other_items(split.train, split.train, k) if setup.training_history == "others" else with_recent(
        split.train, split.train, k)
    refit = _train(setup, config, train, None, split.items,
                   setup.recipe.with_overrides({"schedule": {"epochs": best_epochs}}))
    final = refit.result
    test = with_recent(split.test, split.train, k)
    users = pd.DataFrame({"user_id": split.users}).merge(
        split.train.drop_duplicates("user_id"), on="user_id", how="left"
    )
    users = with_recent(users, split.train, k, at_end=True)
    def vectors(tower: str, frame: pd.DataFrame) -> np.ndarray:
        return in_memory.tower_vectors(refit, tower, _table(frame, config))

    # A user's taste over their whole timeline: the mean of the queries of their training ratings.
    train_queries = vectors("user", train)
    rows = pd.Series(np.arange(len(split.users)), index=split.users)[train["user_id"].to_numpy()].to_numpy()
    sums = np.zeros((len(split.users), train_queries.shape[1]), np.float64)
    np.add.at(sums, rows, train_queries)
    mean_vectors = (sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    return TowerRun(
        test_queries=vectors("user", test),
        user_vectors=vectors("user", users),
        user_mean_vectors=mean_vectors,
        item_vectors=vectors("item", split.items),
        history_tune=tuned.history,
        history_final=final.history,
        best_epochs=best_epochs,
        seconds=time.perf_counter() - started,
    )


# ---------------------------------------------------------------------------- report


def accuracy_table(results: dict[str, dict[str, dict[int, float]]]) -> str:
    header = (
        "| model | " + " | ".join(f"top-{k}" for k in KS) + " | " + " | ".join(f"top-{k}" for k in KS) + " |"
    )
    lines = [
        "|  | tutorial counting" + " |" * len(KS) + " seen removed" + " |" * len(KS),
        header,
        "|---|" + "---:|" * (2 * len(KS)),
    ]
    for name, counted in results.items():
        cells = [f"{counted['tutorial'][k]:.4f}" for k in KS] + [f"{counted['seen_removed'][k]:.4f}" for k in KS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def project_table(table: pd.DataFrame, segment: str = "all") -> str:
    rows = table[table["segment"] == segment]
    lines = ["| model | " + " | ".join(f"{m}@{k}" for m in ("precision", "recall", "ndcg") for k in PROJECT_KS) + " |"]
    lines.append("|---|" + "---:|" * (3 * len(PROJECT_KS)))
    for model, group in rows.groupby("model", sort=False):
        group = group.set_index("k")
        cells = [f"{group.loc[k, m]:.4f}" for m in ("precision", "recall", "ndcg") for k in PROJECT_KS]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


SEED_METRICS = (("recall", 100), ("ndcg", 10), ("recall", 10), ("ndcg", 100))


def seeds_table(per_seed: pd.DataFrame, project: pd.DataFrame) -> str:
    """Per model: mean ± sample standard deviation [min, max] over seeds; EASE (no seed) beside them."""
    rows = per_seed[per_seed["segment"] == "all"]
    lines = ["| model | seeds | " + " | ".join(f"{m}@{k}" for m, k in SEED_METRICS) + " |",
             "|---|---:|" + "---:|" * len(SEED_METRICS)]
    for model, group in rows.groupby("model", sort=False):
        cells = []
        for metric, k in SEED_METRICS:
            values = group[group["k"] == k][metric].to_numpy()
            spread = values.std(ddof=1) if len(values) > 1 else 0.0
            cells.append(f"{values.mean():.4f} ± {spread:.4f} [{values.min():.4f}, {values.max():.4f}]")
        lines.append(f"| {model} | {group['seed'].nunique()} | " + " | ".join(cells) + " |")
    ease = project[(project["segment"] == "all") & (project["model"] == "ease")].set_index("k")
    lines.append("| ease | - | " + " | ".join(f"{ease.loc[k, m]:.4f}" for m, k in SEED_METRICS) + " |")
    return "\n".join(lines)


def parse_overrides(assignments: list[str]) -> dict:
    """``["schedule.epochs=20", "task.negatives.kind=full_catalog"]`` as the recipe's nested shape."""
    fields = {}
    for assignment in assignments:
        path, separator, value = assignment.partition("=")
        if not separator or not path:
            raise SystemExit(f"--set takes SECTION.FIELD=VALUE, not {assignment!r}")
        fields[path] = yaml.safe_load(value)
    return overrides_from_fields(fields)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MovieLens 100K directory (either layout)")
    parser.add_argument("--out", type=Path, default=None, help="write results.json, metrics.csv and plots here")
    parser.add_argument("--tutorial-epochs", type=int, default=3)
    parser.add_argument("--validation-share", type=float, default=0.1)
    parser.add_argument("--cold-user-max-ratings", type=int, default=30,
                        help="users with at most this many training ratings form the 'cold' segment")
    parser.add_argument("--ablations", action="store_true", help="also train the feature / loss ablations")
    parser.add_argument("--training-seed", type=int, default=SEED,
                        help="seed of the two-tower training only (the split stays seeded with 42)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="train the two-tower once per seed and print mean ± spread (default: --training-seed)")
    parser.add_argument("--recipe", default="movielens",
                        help="the two-tower's model recipe: a name in configs/models/ or a YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a recipe field, e.g. --set schedule.epochs=20 (repeatable; YAML values)")
    parser.add_argument("--recent-items", type=int, default=None,
                        help="how many of the user's latest training ratings the query sees "
                        "(default: the recipe's history feature's length, else 10)")
    parser.add_argument("--training-history", choices=["causal", "others"], default="causal",
                        help="a training rating's recent items: those strictly before it, or the user's latest "
                        "training ratings at the end of training without the rating itself (with_other_items)")
    parser.add_argument("--skip-tutorial", action="store_true", help="do not train the TFRS tutorial model")
    args = parser.parse_args()
    seeds = args.seeds or [args.training_seed]

    started = time.perf_counter()
    machine_at_start = machine()
    seconds: dict[str, float] = {}

    def timed(name: str, function, *a, **kw):
        t0 = time.perf_counter()
        out = function(*a, **kw)
        seconds[name] = time.perf_counter() - t0
        log(f"{name}: {seconds[name]:.1f}s")
        return out

    split = timed("load + split", tutorial_split, args.data, args.validation_share)
    index = Index(split)
    log(f"{len(split.train)} training / {len(split.test)} test ratings, {len(index.user_row)} users, "
        f"{len(index.item_ids)} movies (validation slice: {len(split.validation)})")
    train_matrix = index.matrix(split.train)
    test_users, test_items = index.users(split.test), index.items(split.test)
    seen_rows = train_matrix[test_users]

    results: dict[str, dict[str, dict[int, float]]] = {}
    tfrs_eval = {}
    if not args.skip_tutorial:
        tut_users, tut_items, tfrs_eval = timed("tfrs-tutorial", tutorial_model, split, index, args.tutorial_epochs)
        results["tfrs-tutorial"] = both_countings(tut_users[test_users], tut_items, test_items, seen_rows)

    item_counts = np.asarray(train_matrix.sum(axis=0)).ravel()
    # Popularity as a rank-1 "model": a constant query against each item's count.
    popularity_items = item_counts[:, None].astype(np.float32)
    results["popularity"] = both_countings(np.ones((len(test_users), 1), np.float32), popularity_items, test_items, seen_rows)

    ease_lambda, ease_trials = timed("ease tuning", tune_ease, split, index)
    log(f"EASE validation: {ease_trials}; chosen lambda {ease_lambda:g}")
    weights = timed("ease fit", ease_weights, train_matrix, ease_lambda)
    dense_train = train_matrix.toarray()
    results["ease"] = both_countings(dense_train[test_users], weights.T, test_items, seen_rows)

    # The protocol picks the refit's epoch count by val_loss (two_tower), so the first fit stops on
    # val_loss too, whatever the recipe monitors; --override can still change it.
    recipe = load_recipe(args.recipe, {"schedule": {"monitor": "val_loss"}}).with_overrides(parse_overrides(args.overrides))
    setup = TowerSetup(
        recipe=recipe, seed=seeds[0], training_history=args.training_history,
        recent_items=args.recent_items if args.recent_items is not None else default_recent_items(recipe),
    )
    towers = {}
    for seed in seeds:
        towers[seed] = timed(f"two-tower seed {seed}", two_tower, split, index, replace(setup, seed=seed))
    tower = towers[seeds[0]]
    results["two-tower"] = both_countings(tower.test_queries, tower.item_vectors, test_items, seen_rows)
    results["two-tower (per user, latest query)"] = both_countings(
        tower.user_vectors[test_users], tower.item_vectors, test_items, seen_rows
    )
    results["two-tower (per user, mean query)"] = both_countings(
        tower.user_mean_vectors[test_users], tower.item_vectors, test_items, seen_rows
    )
    recent_test = with_recent(split.test, split.train, setup.recent_items)
    recent_rows = np.repeat(np.arange(len(recent_test)), [len(s.split()) for s in recent_test["user_recent_items"]])
    recent_cols = [index.item_row[m] for s in recent_test["user_recent_items"] for m in s.split()]
    recent_matrix = sp.csr_matrix(
        (np.ones(len(recent_cols), np.float32), (recent_rows, recent_cols)), shape=(len(recent_test), len(index.item_ids))
    )
    results["ease (recent-items query)"] = both_countings(recent_matrix.toarray(), weights.T, test_items, seen_rows)

    ablations = {}
    full_softmax = recipe.with_overrides({"task": {"negatives": {"kind": "full_catalog"}}})
    if args.ablations:
        for name, variant in {
            "two-tower, exact softmax over all movies": replace(setup, recipe=full_softmax),
            "two-tower, no user_recent_items": replace(setup, drop_features=("user_recent_items",)),
            "two-tower, exact softmax, no user_recent_items": replace(
                setup, recipe=full_softmax, drop_features=("user_recent_items",)
            ),
        }.items():
            run = timed(name, two_tower, split, index, variant)
            results[name] = both_countings(run.test_queries, run.item_vectors, test_items, seen_rows)
            ablations[name] = variant.describe()

    # The project's own evaluation: per test user, full catalogue, training items removed.
    t0 = time.perf_counter()
    eval_users = np.unique(test_users)
    relevant = index.matrix(split.test)[eval_users]
    exclude = train_matrix[eval_users]
    k_max = max(PROJECT_KS)
    recommendations = {
        "two-tower (latest query)": topk.top_k_items(
            tower.user_vectors[eval_users], tower.item_vectors, k_max, exclude=exclude
        ),
        "two-tower (mean query)": topk.top_k_items(
            tower.user_mean_vectors[eval_users], tower.item_vectors, k_max, exclude=exclude
        ),
        "ease": topk.top_k_items(dense_train[eval_users], weights.T, k_max, exclude=exclude),
        "svd": metrics.svd_recommendations(train_matrix, eval_users, k_max, exclude=exclude, n_factors=100, seed=0),
        "popularity": metrics.popularity_recommendations(item_counts, len(eval_users), k_max, exclude=exclude),
        "random": metrics.random_recommendations(len(eval_users), len(index.item_ids), k_max, exclude=exclude, seed=0),
    }
    train_counts = np.asarray(exclude.sum(axis=1)).ravel()
    segments = np.where(train_counts <= args.cold_user_max_ratings, "cold", "warm")
    popularity_share = np.asarray((train_matrix > 0).sum(axis=0)).ravel() / train_matrix.shape[0]
    project = metrics.evaluate_recommenders(recommendations, relevant, popularity_share, PROJECT_KS, user_segments=segments)
    # One vector per user for every seed's model, beside EASE (deterministic: evaluated once).
    per_seed = []
    for seed, run in towers.items():
        frame = metrics.evaluate_recommenders({
            "two-tower (latest query)": topk.top_k_items(run.user_vectors[eval_users], run.item_vectors, k_max, exclude=exclude),
            "two-tower (mean query)": topk.top_k_items(run.user_mean_vectors[eval_users], run.item_vectors, k_max, exclude=exclude),
        }, relevant, popularity_share, PROJECT_KS)
        per_seed.append(frame.assign(seed=seed))
    per_seed_metrics = pd.concat(per_seed, ignore_index=True)
    seconds["project evaluation"] = time.perf_counter() - t0
    total = time.perf_counter() - started

    command = "python -m bench.movielens" + "".join(f" {a}" for a in sys.argv[1:])
    print("## MovieLens 100K: TFRS basic-retrieval protocol\n")
    print(f"Machine at start: {machine_at_start}  ")
    print(f"Machine at end: {machine()}  ")
    print(f"Command: `{command}` (data: {args.data})  ")
    print(f"Wall time: {total:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())})\n")
    print("Top-k categorical accuracy over 20,000 test ratings, every test movie ranked against all "
          f"{len(index.item_ids):,} movies.\n")
    print(accuracy_table(results))
    print()
    print(f"TFRS's own `evaluate` of the tutorial model (tutorial counting): "
          + ", ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in sorted(tfrs_eval.items(), key=lambda x: int(x[0].split('_')[-3]))))
    print(f"EASE lambda {ease_lambda:g}, chosen on the validation slice: "
          + ", ".join(f"{t['lambda']:g}: {t['top10']:.4f}/{t['top100']:.4f}" for t in ease_trials) + " (top-10/top-100, seen removed)")
    print(f"two-tower: {setup.describe()}; best epoch {tower.best_epochs} (an epoch is a fifth of the "
          f"training ratings) on the validation slice, refitted on all training ratings; {tower.seconds:.0f} s")
    if len(seeds) > 1:
        print("two-tower best epochs per seed: " + ", ".join(f"{s}: {r.best_epochs} ({r.seconds:.0f} s)" for s, r in towers.items()))
    for name, description in ablations.items():
        print(f"{name}: {description}")
    print("\n### The project's evaluation (per test user, full catalogue, training items removed)\n")
    print(f"{len(eval_users)} users; cold = at most {args.cold_user_max_ratings} training ratings "
          f"({int((segments == 'cold').sum())} users)\n")
    print(project_table(project, "all"))
    for segment in ("cold", "warm"):
        print(f"\n{segment} users:\n")
        print(project_table(project, segment))

    print(f"\n### One vector per user over {len(seeds)} training seed(s) {seeds} (all users)\n")
    print(seeds_table(per_seed_metrics, project))
    latest = per_seed_metrics[(per_seed_metrics["segment"] == "all") & (per_seed_metrics["model"] == "two-tower (latest query)")]
    print("\nPer seed (latest query), recall@100 / NDCG@10: " + ", ".join(
        f"{seed}: {group.set_index('k').loc[100, 'recall']:.4f} / {group.set_index('k').loc[10, 'ndcg']:.4f}"
        for seed, group in latest.groupby("seed", sort=False)))

    tutorial_top100 = results["two-tower"]["tutorial"][100]
    checks = {
        f"tutorial counting top-100 >= {TARGET_TUTORIAL_TOP100}": tutorial_top100 >= TARGET_TUTORIAL_TOP100,
        "seen removed top-10 >= EASE": results["two-tower"]["seen_removed"][10] >= results["ease"]["seen_removed"][10],
        "seen removed top-100 >= EASE": results["two-tower"]["seen_removed"][100] >= results["ease"]["seen_removed"][100],
    }
    # One vector per user: the mean over the seeds at least EASE's.
    seed_all = per_seed_metrics[per_seed_metrics["segment"] == "all"]
    ease_all = project[(project["segment"] == "all") & (project["model"] == "ease")].set_index("k")
    for query in ("latest query", "mean query"):
        rows = seed_all[seed_all["model"] == f"two-tower ({query})"]
        for metric, k in SEED_METRICS[:2]:
            mean = rows[rows["k"] == k][metric].mean()
            checks[f"one vector per user ({query}) {metric}@{k} {mean:.4f} >= EASE {ease_all.loc[k, metric]:.4f}"] = (
                mean >= ease_all.loc[k, metric])
    print("\n### Targets (two-tower)\n")
    for name, passed in checks.items():
        print(f"- {'PASS' if passed else 'FAIL'}: {name}")

    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        project.to_csv(args.out / "metrics.csv", index=False)
        per_seed_metrics.to_csv(args.out / "metrics_per_seed.csv", index=False)
        (args.out / "results.json").write_text(json.dumps(
            {"results": results, "tfrs_evaluate": tfrs_eval, "ease_lambda": ease_lambda, "ease_trials": ease_trials,
             "two_tower": setup.describe(), "best_epochs": tower.best_epochs, "seconds": seconds, "total_seconds": total,
             "checks": {name: bool(passed) for name, passed in checks.items()}, "machine": machine_at_start}, indent=2))
        (args.out / "metric_vs_k.png").write_bytes(plots.metric_vs_k_png(project, title="MovieLens 100K, seen removed"))
        (args.out / "item_pca_by_genre.png").write_bytes(plots.embedding_pca_png(
            tower.item_vectors, split.items["offer_category_id"].tolist(), title="Movie embeddings by first genre"))
        (args.out / "loss.png").write_bytes(plots.loss_curves_png(tower.history_tune, title="Two-tower loss (validation run)"))
        log(f"wrote {args.out}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
