"""MovieLens 100K, leave-last-out: the tuned two-tower model against EASE, item-kNN and popularity.

The protocol a recommender paper uses: each user's latest rating is the test item, the one
before it the validation item (``in_memory.leave_last_out(events, validation=True)``: ties in
time go to the larger movie id, as a number); every movie is ranked, the user's training
movies removed. Per seed, the product tunes the recipe's search space on the validation rows
(``in_memory.tune``, ``--trials`` / ``--minutes``, scored by ``--metric`` at ``--k``), then
trains the best recipe (early stopping on the validation rows) and ranks the test items from
each user's state at the end of training (``in_memory.rank_held_out``). EASE's lambda and
item-kNN's neighbour count are chosen on the same validation rows. Every model is scored by
the same function, ``tuning.ranking_scores``.

    .venv/bin/python -m bench.leave_last_out --data data/ml-100k            # 3 seeds
    .venv/bin/python -m bench.leave_last_out --data data/ml-100k --seeds 42 --trials 10 --minutes 15
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

from bench._common import load_average, machine, markdown_table, print_header

KS = (10, 100)
EASE_LAMBDAS = (50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)
KNN_NEIGHBOURS = (20, 50, 100, 200)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data") / "ml-100k")
    parser.add_argument("--recipe", default="movielens")
    parser.add_argument("--features", default="movielens-features")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--metric", choices=["recall", "ndcg"], default="ndcg")
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    print_header("MovieLens 100K, leave-last-out", "python -m bench.leave_last_out " + " ".join(sys.argv[1:]))

    import numpy as np
    import pyarrow as pa

    import twotower_assets  # noqa: F401
    from twotower_assets.data.movielens import click_event_table, load_movielens
    from twotower_assets.model import in_memory, metrics, tuning
    from twotower_assets.model.features import load_feature_config
    from twotower_assets.model.recipes import load_recipe
    from twotower_assets.model.training import TrainingParams

    events = click_event_table(load_movielens(args.data))
    split = in_memory.leave_last_out(events, validation=True)
    config = load_feature_config(args.features)
    # Every movie once (its first rating's row holds its columns): all of them are ranked.
    first = np.unique(events["item_id"].to_numpy(zero_copy_only=False).astype(str), return_index=True)[1]
    catalog = events.take(pa.array(np.sort(first)))
    print(f"{split.train.num_rows} training, {split.validation.num_rows} validation, {split.test.num_rows} test "
          f"ratings; {catalog.num_rows} movies", file=sys.stderr)

    def matrices(held_out):
        evaluator = in_memory.ranking_evaluator(config, split.train, held_out, max(KS), catalog)
        users = np.asarray(evaluator.users[config.user_id_feature]).astype(str)
        return evaluator, users

    def baseline_scores(score_users, evaluator, ks):
        """A baseline's scores for the evaluator's users (users x items), ranked as the model's are."""
        identity = np.eye(score_users.shape[1], dtype=np.float32)
        return tuning.ranking_scores_at(score_users, identity, evaluator.relevant, evaluator.exclude, ks)

    item_ids = np.asarray(catalog["item_id"].to_numpy(zero_copy_only=False)).astype(str)
    user_ids = np.unique(split.train["user_id"].to_numpy(zero_copy_only=False).astype(str))
    user_row = {u: i for i, u in enumerate(user_ids)}
    train_matrix = tuning.pairs_matrix(user_ids, item_ids, split.train["user_id"].to_numpy(zero_copy_only=False),
                                       split.train["item_id"].to_numpy(zero_copy_only=False))

    def rows_of(evaluator_users):
        return np.array([user_row[u] for u in evaluator_users])

    results: dict[str, list[dict]] = {}
    started = time.perf_counter()
    validation_eval, validation_users = matrices(split.validation)
    test_eval, test_users = matrices(split.test)
    # EASE and item-kNN: the hyperparameter with the best validation NDCG@10, then the test.
    def ease(lam, users):
        return (train_matrix[rows_of(users)] @ metrics.ease_item_weights(train_matrix, lam)).astype(np.float32)

    lam = max(EASE_LAMBDAS, key=lambda l: baseline_scores(
        np.asarray(ease(l, validation_users)), validation_eval, (10,))[10]["ndcg"])
    results["EASE"] = [baseline_scores(np.asarray(ease(lam, test_users)), test_eval, KS)]

    def knn(n, users):
        return np.asarray((train_matrix[rows_of(users)] @ metrics.item_knn_similarities(train_matrix, n)).todense(),
                          dtype=np.float32)

    neighbours = max(KNN_NEIGHBOURS, key=lambda n: baseline_scores(knn(n, validation_users), validation_eval, (10,))[10]["ndcg"])
    results["item-kNN"] = [baseline_scores(knn(neighbours, test_users), test_eval, KS)]
    counts = np.asarray(train_matrix.sum(axis=0)).ravel().astype(np.float32)
    results["popularity"] = [baseline_scores(np.tile(counts, (len(test_users), 1)), test_eval, KS)]
    baselines_seconds = time.perf_counter() - started

    searches = []
    results["two-tower, recipe as is"] = []
    results["two-tower, tuned"] = []

    def two_tower_scores(fitted):
        scores = in_memory.rank_held_out(fitted, split.train, split.test, KS, catalog)
        return {k: {"hit_rate": scores[f"hr@{k}"], "recall": scores[f"recall@{k}"], "ndcg": scores[f"ndcg@{k}"]}
                for k in KS}

    for seed in args.seeds:
        recipe = load_recipe(args.recipe)
        as_is = in_memory.fit(config, split.train, split.validation, TrainingParams(recipe=recipe, seed=seed), catalog)
        results["two-tower, recipe as is"].append(two_tower_scores(as_is))
        t0 = time.perf_counter()
        tuned = in_memory.tune(config, split, recipe, n_trials=args.trials, timeout_minutes=args.minutes,
                               metric=args.metric, k=args.k, seed=seed, catalog=catalog)
        search_seconds = time.perf_counter() - t0
        final = in_memory.fit(config, split.train, split.validation,
                              TrainingParams(recipe=tuned.best_recipe(recipe), seed=seed), catalog)
        results["two-tower, tuned"].append(two_tower_scores(final))
        searches.append((seed, tuned.trials_run, round(search_seconds), tuned.best_overrides, tuned.best_epoch))
        scores, plain = results["two-tower, tuned"][-1], results["two-tower, recipe as is"][-1]
        print(f"  seed {seed}: tuned HR@10 {scores[10]['hit_rate']:.4f}, NDCG@10 {scores[10]['ndcg']:.4f}; as is "
              f"{plain[10]['hit_rate']:.4f} / {plain[10]['ndcg']:.4f} ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)

    def summary(values):
        return f"{statistics.mean(values):.4f}" + (f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else "")

    table = [[name, *(summary([r[k][m] for r in runs]) for k, m in ((10, "hit_rate"), (100, "hit_rate"), (10, "ndcg")))]
             for name, runs in results.items()]
    print(markdown_table(["model", "HR@10", "HR@100", "NDCG@10"], table))
    ease_runs, tuned_runs = results["EASE"], results["two-tower, tuned"]
    for k, m, label in ((10, "hit_rate", "HR@10"), (10, "ndcg", "NDCG@10")):
        ratio = statistics.mean(r[k][m] for r in tuned_runs) / ease_runs[0][k][m]
        per_seed = ", ".join(f"{r[k][m] / ease_runs[0][k][m]:.3f}" for r in tuned_runs)
        print(f"\n{label} tuned / EASE: {ratio:.3f} (per seed {per_seed})")
    print(f"\nEASE lambda {lam:g}, item-kNN {neighbours} neighbours (chosen on validation NDCG@10); baselines "
          f"{baselines_seconds:.0f} s")
    for seed, trials, seconds, overrides, epoch in searches:
        print(f"- seed {seed}: {trials} trials, {seconds} s, best epoch {epoch}: {overrides}")
    print(f"\nMachine at end: {machine()}; load average {load_average():.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
