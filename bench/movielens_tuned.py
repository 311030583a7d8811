"""MovieLens 100K, the product's tuning: the tuned two-tower model against EASE, item-kNN and popularity.

Two protocols (``--split``):

* ``last`` (leave-last-out, the protocol of recommender papers): each user's latest rating is
  the test item, the one before it the validation item (``in_memory.leave_last_out(events,
  validation=True)``: ties in time go to the larger movie id, as a number). Every model
  trains on the training rows; the test ranking starts from each user's training rows.
  Default recipe ``movielens``.
* ``random`` (the TFRS basic-retrieval tutorial's protocol, one vector per user): the ratings
  shuffled by a numpy permutation with seed 42 (``in_memory.random_split(events, 0.2,
  seed=42)``), 80% training and 20% test; the validation rows are a seeded random
  ``--validation-share`` (10%) of the training ratings (``in_memory.random_split(train, 0.1,
  seed=42)``, the same rows for every seed). History features are recomputed from training ratings only: a training or
  validation row's history is its user's latest ratings among the rows the model trains on,
  without the row's own movie (the query the evaluation gives: every other rating of the
  user, newest first); no test rating is ever an input. The test ranking starts from each
  user's state at the end of all the training ratings, one vector per user, scored over each
  test user's held-out movies (recall@k over several items). EASE and item-kNN choose their
  hyperparameter on the validation rows, then fit all the training ratings; popularity counts
  them. Default recipe ``movielens-one-vector``.
* ``tutorial``: as ``random``, but the 80/20 cut is the tutorial's own shuffle (``tf.data``
  with seed 42 over the ratings in file order, ``bench.movielens.tutorial_order``, the split of
  ``bench.movielens``) instead of a numpy permutation.

Per seed, the product tunes the recipe's search space on the validation rows
(``in_memory.tune``, ``--trials`` / ``--minutes``: 50 trials or 30 minutes, the product's
default budget; scored by ``--metric`` at ``--k``), then trains the best recipe with early
stopping on the validation rows and ranks the test items from each user's state
(``in_memory.rank_held_out``): every movie ranked, the user's training movies removed.
``--refit`` also trains the best recipe on training + validation rows for the tuning's best
epoch count (the graph's ``refit`` switch: ``schedule: {epochs: best_epoch,
early_stopping_patience: best_epoch}``, no validation), ranked from the user's training +
validation rows; on leave-last-out it adds the early-stopped model ranked from the same rows
and EASE fitted on them, so the refit's training and the longer query are told apart.
Every model is scored by the same function, ``tuning.ranking_scores_at``.

    .venv/bin/python -m bench.movielens_tuned --data data/ml-100k --split random --seeds 42 43 44
    .venv/bin/python -m bench.movielens_tuned --data data/ml-100k --split tutorial --refit --skip-as-is --seeds 42 43 44
    .venv/bin/python -m bench.movielens_tuned --data data/ml-100k --split last --refit --seeds 42 43 44
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from bench._common import load_average, machine, markdown_table, print_header
from twotower_assets.model.recipes import DEFAULT_N_TRIALS, DEFAULT_TIMEOUT_MINUTES

EASE_LAMBDAS = (50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)
KNN_NEIGHBOURS = (20, 50, 100, 200)
DEFAULT_RECIPE = {"last": "movielens", "random": "movielens-one-vector", "tutorial": "movielens-one-vector"}
# (k, metric, label) printed per protocol; the first two are the ones compared with EASE.
COLUMNS = {
    "last": ((10, "hit_rate", "HR@10"), (10, "ndcg", "NDCG@10"), (100, "hit_rate", "HR@100")),
    "random": ((100, "recall", "recall@100"), (10, "ndcg", "NDCG@10"), (10, "hit_rate", "HR@10"),
               (10, "recall", "recall@10")),
}
COLUMNS["tutorial"] = COLUMNS["random"]
KS = (10, 100)
TUTORIAL_SEED = 42


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def histories(config, rows, history):
    """``in_memory.history_from``, refusing a feature config whose recent items are a text column
    (computed over all events: they would hold test ratings, and nothing recomputes them)."""
    from twotower_assets.model import in_memory

    if "user_recent_items" in config.user_columns and "user_recent_items" not in config.history_features:
        raise SystemExit(f"feature config {config.name!r}: user_recent_items is a text column, not a `history` "
                         "feature; the random split recomputes history features only (use a recipe with one)")
    return in_memory.history_from(config, rows, history)


def tutorial_cut(data, events):
    """The tutorial's 80,000 training and 20,000 test ratings (its shuffle of the ratings file's
    rows) as rows of ``events`` (which ``click_event_table`` orders by time)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from bench.movielens import tutorial_order
    from twotower_assets.model import in_memory

    def pair(table):
        return pc.binary_join_element_wise(table["user_id"].cast(pa.string()), table["item_id"].cast(pa.string()), ":")

    event_row = pc.index_in(pair(data.ratings), value_set=pair(events)).to_numpy()  # pairs are unique
    rows = event_row[tutorial_order(data.num_ratings)]
    return in_memory.Split(train=events.take(pa.array(rows[:80_000])), test=events.take(pa.array(rows[80_000:100_000])))


def main(default_split: str = "last") -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data") / "ml-100k")
    parser.add_argument("--split", choices=["last", "random", "tutorial"], default=default_split)
    parser.add_argument("--validation-share", type=float, default=0.1,
                        help="random and tutorial splits: the share of training ratings held out for validation (seeded, 42)")
    parser.add_argument("--recipe", default=None, help="default: movielens (last), movielens-one-vector (random, tutorial)")
    parser.add_argument("--features", default=None, help="default: the recipe's own, else movielens-features")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--trials", type=int, default=DEFAULT_N_TRIALS)
    parser.add_argument("--minutes", type=float, default=DEFAULT_TIMEOUT_MINUTES)
    parser.add_argument("--metric", choices=["recall", "ndcg"], default="ndcg")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--refit", action="store_true",
                        help="also refit the tuned recipe on training + validation for the best epoch count")
    parser.add_argument("--skip-as-is", action="store_true", help="do not train the recipe's own values")
    args = parser.parse_args()
    title = {"last": "leave-last-out", "random": "a random 80/20 split, one vector per user",
             "tutorial": "the TFRS tutorial's random split, one vector per user"}[args.split]
    print_header(f"MovieLens 100K, {title}, tuned", "python -m bench.movielens_tuned " + " ".join(sys.argv[1:]))
    started_at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())

    import numpy as np
    import pyarrow as pa

    import twotower_assets  # noqa: F401
    from twotower_assets.data.movielens import click_event_table, load_movielens
    from twotower_assets.model import in_memory, metrics, tuning
    from twotower_assets.model.features import load_feature_config
    from twotower_assets.model.recipes import load_recipe
    from twotower_assets.model.training import TrainingParams

    recipe_name = args.recipe or DEFAULT_RECIPE[args.split]
    config = load_feature_config(args.features or load_recipe(recipe_name).features or "movielens-features")
    data = load_movielens(args.data)
    events = click_event_table(data)
    if args.split == "last":
        split = in_memory.leave_last_out(events, validation=True)
        known = split.train  # the rows the test users' state and removed movies come from
        refit_rows = pa.concat_tables([split.train, split.validation])
    else:
        tutorial = (in_memory.random_split(events, 0.2, seed=TUTORIAL_SEED) if args.split == "random"
                    else tutorial_cut(data, events))
        inner = in_memory.random_split(tutorial.train, args.validation_share, seed=TUTORIAL_SEED)
        split = in_memory.Split(train=histories(config, inner.train, inner.train),
                                validation=histories(config, inner.test, inner.train), test=tutorial.test)
        known = refit_rows = histories(config, tutorial.train, tutorial.train)
    catalog = in_memory.distinct_items(events, config)  # every movie is ranked
    log(f"{split.train.num_rows} training, {split.validation.num_rows} validation, {split.test.num_rows} test "
        f"ratings; {catalog.num_rows} movies; recipe {recipe_name}, features {config.name}")

    item_ids = np.asarray(catalog["item_id"].to_numpy(zero_copy_only=False)).astype(str)
    user_ids = np.unique(events["user_id"].to_numpy(zero_copy_only=False).astype(str))
    user_row = {u: i for i, u in enumerate(user_ids)}

    def matrix(table):
        return tuning.pairs_matrix(user_ids, item_ids, table["user_id"].to_numpy(zero_copy_only=False),
                                   table["item_id"].to_numpy(zero_copy_only=False))

    def evaluator(train, held_out):
        ranked = in_memory.ranking_evaluator(config, train, held_out, max(KS), catalog)
        users = np.asarray(ranked.users[config.user_id_feature]).astype(str)
        return ranked, np.array([user_row[u] for u in users])

    def baseline_scores(score_users, ranked, ks):
        """A baseline's scores for the evaluator's users (users x items), ranked as the model's are."""
        identity = np.eye(score_users.shape[1], dtype=np.float32)
        return tuning.ranking_scores_at(np.asarray(score_users, np.float32), identity, ranked.relevant,
                                        ranked.exclude, ks)

    results: dict[str, list[dict]] = {}
    started = time.perf_counter()
    validation_eval, validation_rows = evaluator(split.train, split.validation)
    test_eval, test_rows = evaluator(known, split.test)
    fit_matrix, known_matrix = matrix(split.train), matrix(known)

    # EASE and item-kNN: the hyperparameter with the best validation NDCG@10 (fitted on the rows the
    # models train on), then fitted on the rows the test ranking starts from.
    def ease(lam, fitted_on, rows):
        return fitted_on[rows] @ metrics.ease_item_weights(fitted_on, lam)

    def knn(n, fitted_on, rows):
        return (fitted_on[rows] @ metrics.item_knn_similarities(fitted_on, n)).todense()

    def validation_ndcg(scores):
        return baseline_scores(scores, validation_eval, (10,))[10]["ndcg"]

    lam = max(EASE_LAMBDAS, key=lambda l: validation_ndcg(ease(l, fit_matrix, validation_rows)))
    neighbours = max(KNN_NEIGHBOURS, key=lambda n: validation_ndcg(knn(n, fit_matrix, validation_rows)))
    results[f"EASE (λ {lam:g})"] = [baseline_scores(ease(lam, known_matrix, test_rows), test_eval, KS)]
    results[f"item-kNN ({neighbours} neighbours)"] = [baseline_scores(knn(neighbours, known_matrix, test_rows),
                                                                       test_eval, KS)]
    counts = np.asarray(known_matrix.sum(axis=0)).ravel()
    results["popularity"] = [baseline_scores(np.tile(counts, (len(test_rows), 1)), test_eval, KS)]
    refit_eval = None
    if args.refit and args.split == "last":
        refit_eval, refit_test_rows = evaluator(refit_rows, split.test)
        refit_matrix = matrix(refit_rows)
        results[f"EASE (λ {lam:g}), training + validation rows"] = [
            baseline_scores(ease(lam, refit_matrix, refit_test_rows), refit_eval, KS)]
    baselines_seconds = time.perf_counter() - started
    ease_name = f"EASE (λ {lam:g})"
    columns = COLUMNS[args.split]
    log(f"baselines: {baselines_seconds:.0f} s; " + "; ".join(
        f"{name}: " + " / ".join(f"{runs[0][k][m]:.4f}" for k, m, _ in columns) for name, runs in results.items()))

    def two_tower_scores(fitted, train_rows):
        scores = in_memory.rank_held_out(fitted, train_rows, split.test, KS, catalog)
        return {k: {"hit_rate": scores[f"hr@{k}"], "recall": scores[f"recall@{k}"], "ndcg": scores[f"ndcg@{k}"]}
                for k in KS}

    def on_trial_end(outcome):
        log(f"  trial {outcome.number}: {outcome.overrides} -> best {outcome.best_value:.4f} at epoch "
            f"{outcome.best_epoch} of {len(outcome.values)}{' (pruned)' if outcome.pruned else ''}, "
            f"{outcome.seconds:.0f} s")

    searches, timings = [], []
    for seed in args.seeds:
        recipe = load_recipe(recipe_name)
        t0 = time.perf_counter()
        if not args.skip_as_is:
            as_is = in_memory.fit(config, split.train, split.validation, TrainingParams(recipe=recipe, seed=seed),
                                  catalog)
            results.setdefault("two-tower, recipe as is", []).append(two_tower_scores(as_is, known))
        t1 = time.perf_counter()
        tuned = in_memory.tune(config, split, recipe, n_trials=args.trials, timeout_minutes=args.minutes,
                               metric=args.metric, k=args.k, seed=seed, catalog=catalog, on_trial_end=on_trial_end)
        search_seconds = time.perf_counter() - t1
        best = tuned.best_recipe(recipe)
        final = in_memory.fit(config, split.train, split.validation, TrainingParams(recipe=best, seed=seed), catalog)
        t2 = time.perf_counter()
        results.setdefault("two-tower, tuned", []).append(two_tower_scores(final, known))
        timing = {"seed": seed, "as is": None if args.skip_as_is else t1 - t0, "search": search_seconds, "final": t2 - t1 - search_seconds,
                  "epochs": final.result.epochs_run,
                  "kept": None if final.result.kept_epoch is None else final.result.kept_epoch + 1}
        if args.refit:
            if args.split == "last":
                results.setdefault("two-tower, tuned, ranked from training + validation rows", []).append(
                    two_tower_scores(final, refit_rows))
            epochs = max(1, tuned.best_epoch)
            refit_recipe = best.with_overrides({"schedule": {"epochs": epochs, "early_stopping_patience": epochs}})
            refit = in_memory.fit(config, refit_rows, None, TrainingParams(recipe=refit_recipe, seed=seed), catalog)
            results.setdefault("two-tower, tuned, refit on training + validation", []).append(
                two_tower_scores(refit, refit_rows))
            timing["refit"] = time.perf_counter() - t2
        timings.append(timing)
        searches.append((seed, tuned.trials_run, round(search_seconds), tuned.best_overrides, tuned.best_epoch,
                         tuned.best_value))
        log(f"seed {seed}: " + "; ".join(
            f"{name}: " + " / ".join(f"{runs[-1][k][m]:.4f}" for k, m, _ in columns[:2])
            for name, runs in results.items() if name.startswith("two-tower")) + f" ({time.perf_counter() - t0:.0f} s); "
            f"best {tuned.best_overrides}, epoch {tuned.best_epoch}, {tuned.trials_run} trials in {search_seconds:.0f} s")

    def summary(values):
        return f"{statistics.mean(values):.4f}" + (f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else "")

    print(f"Started {started_at}; {split.train.num_rows:,} training, {split.validation.num_rows:,} validation and "
          f"{split.test.num_rows:,} test ratings, {test_eval.relevant.shape[0]} test users, {catalog.num_rows:,} movies "
          f"ranked; recipe `{recipe_name}`, features `{config.name}`; tuning {args.metric}@{args.k}, "
          f"{args.trials} trials or {args.minutes:g} minutes; seeds {args.seeds}\n")
    table = [[name, len(runs), *(summary([r[k][m] for r in runs]) for k, m, _ in columns)]
             for name, runs in results.items()]
    print(markdown_table(["model", "seeds", *(label for _, _, label in columns)], table))
    ease_runs = results[ease_name]
    print()
    for name, runs in results.items():
        if not name.startswith("two-tower"):
            continue
        for k, m, label in columns[:2]:
            base = ease_runs[0][k][m]
            per_seed = ", ".join(f"{r[k][m]:.4f} ({r[k][m] / base:.3f})" for r in runs)
            verdict = "at least EASE" if statistics.mean(r[k][m] for r in runs) >= base else "below EASE"
            print(f"- {name}, {label}: per seed {per_seed}; mean / EASE "
                  f"{statistics.mean(r[k][m] for r in runs) / base:.3f}, {verdict}")
    print(f"\nEASE λ {lam:g}, item-kNN {neighbours} neighbours (chosen on validation NDCG@10); baselines "
          f"{baselines_seconds:.0f} s")
    for (seed, trials, seconds, overrides, epoch, value), timing in zip(searches, timings):
        extra = "".join(f", {name} {timing[name]:.0f} s" for name in ("as is", "refit") if timing.get(name))
        print(f"- seed {seed}: search {trials} trials in {seconds} s, best {args.metric}@{args.k} {value:.4f} at epoch "
              f"{epoch}: {overrides}; final fit {timing['final']:.0f} s ({timing['epochs']} epochs, kept "
              f"{timing['kept']}){extra}")
    print(f"\nMachine at end: {machine()}; load average {load_average():.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
