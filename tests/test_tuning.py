"""Tuning (twotower_assets/model/tuning.py, in_memory.tune): the search finds a known best point of
a hand-made objective, prunes, resumes after a kill, and tunes the real model on held-out rows."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import optuna
import pyarrow as pa
import pytest
import scipy.sparse as sp
import tensorflow as tf

from helpers.tuning import SEARCH, hand_made_score, hand_made_train
from twotower_assets.model import in_memory, tuning
from twotower_assets.model.features import parse_feature_config
from twotower_assets.model.recipes import load_recipe
from twotower_assets.model.training import TrainingParams

def test_the_search_finds_the_known_best_point_within_its_budget():
    recipe = load_recipe("production", SEARCH)
    trials = []
    result = tuning.tune(recipe, hand_made_train(), lambda _: {"recall": 0.0}, n_trials=40, seed=3,
                         on_trial_end=trials.append)
    best = result.best_recipe(recipe)
    # The score's peak is 1.0 at (0.03, 0.1, 128); TPE gets within a small distance in 40 trials.
    assert result.best_value > 0.9
    assert best.schedule.batch_size == 128
    assert abs(np.log10(best.optimizer.learning_rate) - np.log10(0.03)) < 0.35
    assert abs(np.log10(best.task.temperature) - np.log10(0.1)) < 0.35
    assert result.best_epoch == 5  # the peak
    assert result.best_value == pytest.approx(hand_made_score(best, 5))
    # Pruning stopped trials that had stopped improving with their best below the median: after
    # the peak at epoch 5 and three epochs without a new best, before the trial's 10 epochs.
    pruned = [t for t in trials if t.pruned]
    assert pruned and all(8 <= len(t.values) < 10 for t in pruned)
    assert {t.state for t in result.study.trials} <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    assert result.trials_run == 40
    # The first trial is the recipe's own point where it lies in the space (production: learning
    # rate 0.1, temperature 0.05, 64-d); its batch 2048 is not among SEARCH's choices, so sampled.
    first = result.study.trials[0].params
    assert {k: first[k] for k in ("optimizer.learning_rate", "task.temperature", "towers.embedding_size")} == {
        "optimizer.learning_rate": 0.1, "task.temperature": 0.05, "towers.embedding_size": 64}
    assert first["schedule.batch_size"] in (64, 128, 256)


def test_a_trial_is_scored_at_the_epoch_its_training_keeps_not_at_its_best_ranking():
    # The 'training' keeps epoch 8 (0-based 7), past the ranking's peak at 5, as early stopping
    # on val_loss can: the trial's score is what the kept model ranks, and its epoch count.
    recipe = load_recipe("production", SEARCH)
    trials = []
    result = tuning.tune(recipe, hand_made_train(kept_epoch=lambda _: 7), lambda _: {"recall": 0.0}, n_trials=3,
                         seed=3, on_trial_end=trials.append)
    for outcome in trials:
        assert outcome.best_epoch == 8
        assert outcome.best_value == pytest.approx(hand_made_score(outcome.recipe, 8)) == outcome.values[7]
        assert outcome.best_value < max(outcome.values)
    assert result.best_epoch == 8
    assert result.best_value == pytest.approx(hand_made_score(result.best_recipe(recipe), 8))


def test_a_pruner_waits_for_a_slow_rising_trial_to_stop_improving():
    study = optuna.create_study(direction="maximize", pruner=tuning.pruner())
    for _ in range(3):  # the others reach 0.9 at epoch 4 and stay there
        study.add_trial(optuna.trial.create_trial(
            value=0.9, intermediate_values={e: min(0.9, 0.3 * (e + 1)) for e in range(10)}))
    slow = study.ask()
    for epoch in range(6):  # rising a little every epoch, far below the others
        slow.report(0.1 + 0.05 * epoch, epoch)
        assert not slow.should_prune()
    for epoch in range(6, 9):  # three epochs below its best (0.35): no new best, below the median
        slow.report(0.3, epoch)
    assert slow.should_prune()


def test_a_recipe_without_a_search_space_is_refused():
    with pytest.raises(ValueError, match="has no `search` section"):
        # Every packaged recipe has a search space: this one has it taken away.
        without_search = load_recipe("movielens-one-vector").model_copy(update={"search": {}})
        tuning.tune(without_search, hand_made_train(), lambda _: {}, n_trials=2)


KILLED_SEARCH = textwrap.dedent(
    """
    import json, os, sys, time
    from helpers import tuning as t
    from twotower_assets.model import tuning
    from twotower_assets.model.recipes import load_recipe

    marker = sys.argv[2]
    train = t.hand_made_train()
    calls = []

    def slow_on_fourth(recipe, ranking):
        calls.append(recipe)
        if len(calls) == 4:  # the kill comes while this trial runs
            open(marker, "w").write("in trial 4")
            time.sleep(600)
        return train(recipe, ranking)

    tuning.tune(load_recipe("production", t.SEARCH), slow_on_fourth, lambda _: {"recall": 0.0}, n_trials=10,
                storage=sys.argv[1], study_name="resume", seed=5)
    """
)


def test_the_budget_stops_a_long_trial_after_its_current_batch():
    # Each epoch is 20 batches of 50 ms: one trial would take 8 s, the budget is 0.6 s.
    slow_train = hand_made_train(epochs=8, batches_per_epoch=20, batch_seconds=0.05)
    batches_run = slow_train.batches_run

    result = tuning.tune(load_recipe("production", SEARCH), slow_train, lambda _: {"recall": 0.0}, n_trials=5,
                         timeout_seconds=0.6)
    # Stopped at the batch that crossed 0.6 s (about 12), inside the first epoch, not after the
    # trial's 160 batches: counted in batches, not timed.
    assert len(batches_run) <= 14
    [trial] = result.study.trials  # the search started no trial after the deadline
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.user_attrs["stopped_at_deadline"] is True
    # The partial first epoch is scored: the trial's value is what it reached, and it is the result.
    assert trial.user_attrs["values"] == [pytest.approx(hand_made_score(result.best_recipe(load_recipe("production", SEARCH)), 1))]
    assert result.best_epoch == 1 and result.trials_run == 1


def test_the_ranking_callback_does_not_make_keras_copy_every_steps_logs():
    # Its batch hook (the deadline) reads no logs; a hook that cannot take TensorFlow's logs makes
    # Keras turn each step's loss into a Python number, waiting for the step.
    callbacks = tf.keras.callbacks.CallbackList(
        [tf.keras.callbacks.EarlyStopping(), tuning.EpochRanking(lambda _: {"recall": 0.0}, deadline=1.0)]
    )
    assert callbacks._should_call_train_batch_hooks
    assert callbacks._batch_hooks_support_tf_logs


@pytest.mark.slow
def test_a_killed_search_resumes_where_it_stopped(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    marker = tmp_path / "killed"
    script = tmp_path / "search.py"
    script.write_text(KILLED_SEARCH)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__)}  # finds tests/helpers
    process = subprocess.Popen([sys.executable, str(script), storage, str(marker)], env=env)
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert marker.exists(), "the search never reached its fourth trial"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)

    killed = optuna.load_study(study_name="resume", storage=storage)
    states = [t.state for t in killed.trials]
    assert states.count(optuna.trial.TrialState.RUNNING) == 1  # left behind by the kill
    finished_before = [t.number for t in killed.trials if t.state.is_finished()]
    assert len(finished_before) == 3

    result = tuning.tune(load_recipe("production", SEARCH), hand_made_train(), lambda _: {"recall": 0.0},
                         n_trials=10, storage=storage, study_name="resume", seed=5)
    resumed = result.study.trials
    assert [t.number for t in resumed if t.state == optuna.trial.TrialState.FAIL] == [3]  # the killed trial
    done = [t for t in resumed if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(done) == 10  # the 3 from before count against the budget: 7 new ones
    assert {t.number for t in done} >= set(finished_before)


def test_ranking_scores_by_hand():
    users = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    items = np.array([[0.9, 0.1], [0.8, 0.0], [0.1, 0.9], [0.0, 0.5]], np.float32)
    relevant = sp.csr_matrix(np.array([[0, 1, 0, 0], [0, 0, 0, 1]], np.float32))
    exclude = sp.csr_matrix(np.array([[1, 0, 0, 0], [0, 0, 0, 0]], np.float32))
    scores = tuning.ranking_scores(users, items, relevant, exclude, k=1)
    # user 0: item 0 removed, top-1 is item 1 (a hit); user 1: top-1 is item 2, held-out item 3 missed.
    assert scores == {"hit_rate": 0.5, "recall": 0.5, "ndcg": 0.5}
    scores = tuning.ranking_scores(users, items, relevant, exclude, k=2)
    # user 1's item 3 at rank 2: DCG 1/log2(3), ideal 1.
    assert scores["hit_rate"] == 1.0 and scores["recall"] == 1.0
    assert scores["ndcg"] == pytest.approx((1.0 + 1 / np.log2(3)) / 2)


def _group_events(users: int = 200, per_user: int = 12, seed: int = 0) -> pa.Table:
    """Users of group g click distinct items of group g's 30 (6 groups, 180 items, no repeats):
    a held-out item is never a training item of its user."""
    rng = np.random.default_rng(seed)
    rows = [(f"u{u}", f"i{(u % 6) * 30 + i}") for u in range(users) for i in rng.choice(30, per_user, replace=False)]
    return pa.table({"user_id": [u for u, _ in rows], "item_id": [i for _, i in rows],
                     "event_timestamp": rng.permutation(len(rows))})


GROUPS = parse_feature_config({
    "user_embedding_layers": {"user_id": {"type": "string", "embedding_size": 8}},
    "item_embedding_layers": {"item_id": {"type": "string", "embedding_size": 8}},
}, "groups", "test")


@pytest.mark.slow
def test_in_memory_tune_scores_trials_on_the_validation_rows_and_the_result_trains():
    split = in_memory.leave_last_out(_group_events(), validation=True)
    recipe = load_recipe("production", {
        "towers": {"embedding_size": 8}, "schedule": {"epochs": 30, "early_stopping_patience": 30},
        "search": {"optimizer.learning_rate": {"low": 0.03, "high": 0.1, "log": True},
                   "schedule.batch_size": {"choices": [64, 128]}, "towers.embedding_size": {"choices": [8]},
                   "task.temperature": {"choices": [0.1]}},
    })
    outcomes = []
    result = in_memory.tune(GROUPS, split, recipe, n_trials=3, k=10, on_trial_end=outcomes.append)
    assert len(outcomes) == 3 and result.metric == "recall@10"
    assert all(1 <= len(o.values) <= 30 for o in outcomes)
    assert result.best_value == max(o.best_value for o in outcomes if not o.pruned)
    # A user's held-out item is one of the 19 unseen items of their group: chance is 10/170
    # among all unseen items, a model that learnt the groups ranks the group first (about 10/19).
    assert result.best_value > 0.3
    final = in_memory.fit(GROUPS, split.train, split.validation, TrainingParams(recipe=result.best_recipe(recipe)))
    scores = in_memory.rank_held_out(final, split.train, split.test, ks=(10,))
    assert scores["hr@10"] == scores["recall@10"] > 0.3 and 0 < scores["ndcg@10"] <= scores["hr@10"]


def test_leave_last_out_ties_compare_numeric_ids_as_numbers_and_can_hold_out_validation():
    events = pa.table({
        "user_id": ["u1", "u1", "u1", "u2", "u2", "u3"],
        "item_id": ["99", "1000", "5", "7", "8", "2"],
        "event_timestamp": [3, 3, 1, 5, 2, 9],
    })
    split = in_memory.leave_last_out(events, validation=True)
    # u1's latest second holds 99 and 1000: 1000 is the larger id (as a number), so the test row.
    assert sorted(zip(split.test["user_id"].to_pylist(), split.test["item_id"].to_pylist())) == [
        ("u1", "1000"), ("u2", "7")]
    assert list(zip(split.validation["user_id"].to_pylist(), split.validation["item_id"].to_pylist())) == [("u1", "99")]
    assert sorted(split.train["item_id"].to_pylist()) == ["2", "5", "8"]  # u2 has two events: no validation row
    assert in_memory.leave_last_out(events).validation is None


def test_user_state_is_the_latest_event_and_the_newest_items():
    config = parse_feature_config({
        "user_embedding_layers": {"user_id": {"type": "string", "embedding_size": 4},
                                  "user_recent_items": {"type": "history", "embedding_size": 4, "length": 2}},
        "item_embedding_layers": {"item_id": {"type": "string", "embedding_size": 4}},
    }, "state", "test")
    events = pa.table({"user_id": ["u1", "u1", "u1", "u2"], "item_id": ["a", "b", "c", "d"],
                       "event_timestamp": [1, 3, 2, 4], "user_recent_items": ["", "a c", "a", ""]})
    state = in_memory.user_state(config, events).to_pylist()
    assert state == [{"user_id": "u1", "user_recent_items": "b c"}, {"user_id": "u2", "user_recent_items": "d"}]


@pytest.mark.parametrize("as_arrow", [False, True])
def test_pairs_matrix_marks_the_known_pairs_from_strings_or_arrow(as_arrow):
    users, items = ["1", "2", "10"], ["a", "b"]
    pairs_user, pairs_item = ["10", "2", "x", "1", "2"], ["b", "a", "a", "zz", "a"]  # unknowns dropped, a duplicate
    if as_arrow:  # the saved training pairs are Arrow columns, looked up without Python strings
        pairs_user, pairs_item = pa.chunked_array([pairs_user], pa.large_string()), pa.chunked_array([pairs_item])
    matrix = tuning.pairs_matrix(users, items, pairs_user, pairs_item)
    assert matrix.toarray().tolist() == [[0, 0], [1, 0], [0, 1]]
    assert matrix.data.tolist() == [1.0, 1.0]


class _EvaluatorAt:
    """A stand-in score with the cut-off a RankingEvaluator carries."""

    def __init__(self, k: int):
        self.k = k

    def __call__(self, model):
        return {"recall": 0.0, "ndcg": 0.0}


def test_a_search_must_score_the_ranking_metric_its_recipe_monitors(tmp_path):
    # Trials of a recipe that monitors ndcg@10 stop early on the search's own per-epoch ranking,
    # so a search scored by recall@50 is refused before any trial, naming what to tune with.
    recipe = load_recipe("production", {**SEARCH, "schedule": {"monitor": "ndcg@10"}})
    train = hand_made_train()
    with pytest.raises(ValueError, match=r"monitors ndcg@10 .* tune with metric 'ndcg' and k 10, not recall@50"):
        tuning.tune(recipe, train, _EvaluatorAt(50), metric="recall", n_trials=2)
    with pytest.raises(ValueError, match=r"tune with metric 'ndcg' and k 10, not ndcg@20"):
        tuning.tune(recipe, train, _EvaluatorAt(20), metric="ndcg", n_trials=2)
    assert train.batches_run == []
    matching = load_recipe("production", {**SEARCH, "schedule": {"monitor": "recall@10"}})
    result = tuning.tune(matching, hand_made_train(), _EvaluatorAt(10), metric="recall", n_trials=2)
    assert result.metric == "recall@10" and result.trials_run == 2

    # The tuning asset refuses it before reading any dataset or starting an MLflow run.
    from twotower_assets.defs.training.tuning import TuningConfig, tune_partition
    from twotower_assets.lib.artifacts import ArtifactStore
    from twotower_assets.lib.mlflow_tracking import MlflowTracking

    recipe_file = tmp_path / "monitors-ndcg.yaml"
    recipe_file.write_text("schedule: {monitor: ndcg@10}\nsearch:\n  task.temperature: {low: 0.05, high: 0.5}\n")
    mlflow_dir = tmp_path / "mlflow"
    with pytest.raises(ValueError, match=r"recipe 'monitors-ndcg' monitors ndcg@10"):
        tune_partition("2026-06-01", TuningConfig(recipe=str(recipe_file), metric="recall", k=50),
                       ArtifactStore(base_dir=str(tmp_path / "artifacts")),
                       MlflowTracking(tracking_uri=f"sqlite:///{mlflow_dir / 'mlflow.db'}"), "run-id")
    assert not mlflow_dir.exists() and not (tmp_path / "artifacts").exists()


def test_the_asset_and_in_memory_tune_have_one_default_budget():
    # The graph's search and the research API's are documented as the same search under the
    # same budget (50 trials or 30 minutes): a default changed in one place only would make the
    # published benchmarks describe a search the graph does not run.
    import inspect

    from twotower_assets.defs.training.tuning import TuningConfig

    asset = TuningConfig()
    api = inspect.signature(in_memory.tune).parameters
    assert (asset.n_trials, asset.timeout_minutes) == (50, 30.0)
    assert (api["n_trials"].default, api["timeout_minutes"].default) == (50, 30.0)
    assert inspect.signature(tuning.tune).parameters["n_trials"].default == 50
