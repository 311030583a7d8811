"""Hyperparameter search for a model recipe, scored by ranking quality on held-out rows.

The search space is the recipe's ``search`` section (:class:`SearchDimension` per field, by
its dotted name, e.g. ``optimizer.learning_rate``). Each trial trains the recipe with the
sampled values; after every epoch :class:`EpochRanking` ranks the whole catalogue for the
validation users with their training items removed (the product's evaluation code,
:mod:`twotower_assets.model.metrics`) and reports recall@k or NDCG@k to Optuna, whose pruner
stops trials that fall behind the others' curves once they stop improving. A trial's score is
the metric at the epoch its training keeps (the recipe's ``schedule.monitor`` picks it: val_loss
by default), so the search judges the model the trial would publish, not the best of its noisy
per-epoch values; that epoch count is kept, so the final model can be refit for exactly that
many epochs. Trials are scored by ranking, not by val_loss: the two disagree (a lower
temperature or a bigger batch changes the loss's scale, not only its quality).

The study lives in Optuna's storage (an SQLite file by default), so a search that was killed
resumes: its finished trials count against the budget, a trial it left running is marked
failed, and TPE continues from what the finished ones learnt.

Pure TensorFlow / Optuna: the caller says how to train (in memory or from saved datasets).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import optuna
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp
import tensorflow as tf

from twotower_assets.model import metrics, topk
from twotower_assets.model.recipes import DEFAULT_N_TRIALS, ModelRecipe, SearchDimension, overrides_from_fields

log = logging.getLogger(__name__)

RankingMetric = Literal["recall", "ndcg"]


class RankingEvaluator:
    """recall@k, NDCG@k and hit rate@k of a model's towers for held-out (user, item) rows.

    ``users``: the user tower's input columns, one row per evaluated user (their state at the
    end of training); ``items``: the item tower's columns, one row per catalogue item;
    ``relevant`` (users x items): the held-out items; ``exclude`` (users x items): the items
    each user had in training, removed before ranking (as the offline evaluation does).
    """

    def __init__(
        self,
        users: Mapping[str, np.ndarray],
        items: Mapping[str, np.ndarray],
        relevant: sp.csr_matrix,
        exclude: sp.csr_matrix | None,
        k: int,
        batch_size: int = 4096,
    ):
        n_users = len(next(iter(users.values())))
        n_items = len(next(iter(items.values())))
        if relevant.shape != (n_users, n_items):
            raise ValueError(f"relevant is {relevant.shape}, expected (users, items) = ({n_users}, {n_items})")
        if exclude is not None and exclude.shape != relevant.shape:
            raise ValueError(f"exclude is {exclude.shape}, expected {relevant.shape}")
        if k <= 0:
            raise ValueError(f"k must be > 0, got {k}")
        self.users, self.items = dict(users), dict(items)
        self.relevant, self.exclude = sp.csr_matrix(relevant), exclude
        self.k = min(k, n_items)
        self.batch_size = batch_size
        self._forward: list[tuple[object, object]] = []

    def vectors(self, tower: tf.keras.Model, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        # One traced function per tower, reused every epoch (a new one per call retraces).
        forward = next((f for t, f in self._forward if t is tower), None)
        if forward is None:
            forward = tf.function(lambda rows: tower(rows, training=False), reduce_retracing=True)
            self._forward = [*self._forward[-1:], (tower, forward)]  # this model's two towers
        dataset = tf.data.Dataset.from_tensor_slices(dict(columns)).batch(self.batch_size)
        return np.concatenate([forward(rows).numpy() for rows in dataset]).astype(np.float32, copy=False)

    def __call__(self, model) -> dict[str, float]:
        return self.scores_at(model, [self.k])[self.k]

    def scores_at(self, model, ks: Sequence[int]) -> dict[int, dict[str, float]]:
        """The scores at each k of ``ks``, from one pass of the towers and one ranking."""
        wanted = lambda tower, columns: {name: columns[name] for name in _tower_inputs(tower) if name in columns}
        user_vectors = self.vectors(model.user_tower, wanted(model.user_tower, self.users))
        item_vectors = self.vectors(model.item_tower, wanted(model.item_tower, self.items))
        return ranking_scores_at(user_vectors, item_vectors, self.relevant, self.exclude, ks)


def ranking_scores(
    user_vectors: np.ndarray, item_vectors: np.ndarray, relevant: sp.csr_matrix, exclude: sp.csr_matrix | None, k: int
) -> dict[str, float]:
    """HR@k (share of users with a held-out item in their top k), recall@k and NDCG@k
    (:func:`metrics.ranking_metrics`), users with at least one held-out item only."""
    return ranking_scores_at(user_vectors, item_vectors, relevant, exclude, [k])[k]


def ranking_scores_at(
    user_vectors: np.ndarray, item_vectors: np.ndarray, relevant: sp.csr_matrix, exclude: sp.csr_matrix | None,
    ks: Sequence[int],
) -> dict[int, dict[str, float]]:
    """:func:`ranking_scores` at each k of ``ks``, from one top-max(ks) ranking."""
    recommended = topk.top_k_items(user_vectors, item_vectors, max(ks), exclude=exclude)
    counted = np.flatnonzero(np.diff(relevant.indptr) > 0)
    scores = {}
    for k in ks:
        top = recommended[:, :k]
        table = metrics.ranking_metrics(top, relevant, np.zeros(relevant.shape[1]), [k]).iloc[0]
        hits = np.array([np.isin(top[u], relevant.indices[relevant.indptr[u]:relevant.indptr[u + 1]]).any()
                         for u in counted])
        scores[k] = {"hit_rate": float(hits.mean()) if hits.size else 0.0, "recall": float(table["recall"]),
                     "ndcg": float(table["ndcg"])}
    return scores


def _tower_inputs(tower) -> list[str]:
    return list(dict.fromkeys(getattr(tower, "input_keys", [])))


Evaluator = Callable[[object], Mapping[str, float]]
"""Scores a model: ``{"recall": ..., "ndcg": ..., "hit_rate": ...}`` (:class:`RankingEvaluator`);
its ``k`` attribute, when it has one, names the metric."""


class EpochRanking(tf.keras.callbacks.Callback):
    """After each epoch: the validation ranking metrics into the logs (``val_recall_at_<k>``, ...)
    and, for a tuning trial, the chosen one reported to Optuna, stopping the fit when pruned.

    Placed after the weight-averaging callback, it sees the weights validation sees.

    ``deadline`` (a ``time.perf_counter()`` value): past it, the fit stops after the current
    batch and the partial epoch is still scored, so a search's budget holds inside a long
    trial, not only between trials (``stopped_at_deadline`` then says so).
    """

    def __init__(self, evaluator: Evaluator, metric: RankingMetric = "recall", trial: optuna.Trial | None = None,
                 deadline: float | None = None):
        super().__init__()
        self.evaluator, self.metric, self.trial, self.deadline = evaluator, metric, trial, deadline
        self.k = getattr(evaluator, "k", "k")
        self.values: list[float] = []
        self.pruned = False
        self.stopped_at_deadline = False
        # The batch hook reads no logs: Keras then passes them as they are, instead of copying
        # every step's loss out of TensorFlow for it (which waits for the step to finish).
        self._supports_tf_logs = True

    def _stop_if_past_deadline(self) -> None:
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            self.stopped_at_deadline = True
            self.model.stop_training = True

    def on_train_batch_end(self, batch, logs=None):
        self._stop_if_past_deadline()

    @property
    def name(self) -> str:
        return f"val_{self.metric}_at_{self.k}"

    @property
    def best_epoch(self) -> int:
        """1-based epoch of the best value (the first, on ties)."""
        return int(np.argmax(self.values)) + 1 if self.values else 0

    def on_epoch_end(self, epoch, logs=None):
        scores = self.evaluator(self.model)
        if logs is not None:
            logs.update({f"val_{name}_at_{self.k}": value for name, value in scores.items()})
        value = scores[self.metric]
        self.values.append(value)
        if self.trial is not None:
            self.trial.report(value, epoch)
            if self.trial.should_prune():
                self.pruned = True
                self.model.stop_training = True
        self._stop_if_past_deadline()


@dataclass
class TrialOutcome:
    """What one trial trained: its recipe, per-epoch validation metric and losses.

    ``best_epoch`` (1-based) is the epoch its training kept, the best by the recipe's
    ``schedule.monitor``, and ``best_value`` the metric there: the trial's score."""

    number: int
    overrides: dict
    recipe: ModelRecipe
    values: list[float]
    best_epoch: int
    best_value: float
    pruned: bool
    seconds: float
    history: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class TuningResult:
    """The best trial's overrides and epoch count, with the whole study."""

    study: optuna.Study
    metric: str
    best_overrides: dict
    best_value: float
    best_epoch: int
    trials_run: int
    seconds: float

    def best_recipe(self, recipe: ModelRecipe) -> ModelRecipe:
        return recipe.with_overrides(self.best_overrides)


def sample_overrides(trial: optuna.Trial, search: Mapping[str, SearchDimension]) -> dict:
    """One point of the search space, as the recipe's nested overrides."""
    point = {}
    for path, dimension in search.items():
        if dimension.choices is not None:
            value = trial.suggest_categorical(path, list(dimension.choices))
        elif isinstance(dimension.low, int) and isinstance(dimension.high, int) and not dimension.float_range:
            value = trial.suggest_int(path, dimension.low, dimension.high, log=dimension.log)
        else:
            value = trial.suggest_float(path, float(dimension.low), float(dimension.high), log=dimension.log)
        point[path] = value
    return overrides_from_fields(point)


Train = Callable[[ModelRecipe, "EpochRanking"], object]
"""Trains a recipe with the trial's :class:`EpochRanking` (``train_two_tower(..., ranking=...)``:
the caller's data and pipeline); returns its result."""


def tune(
    recipe: ModelRecipe,
    train: Train,
    evaluator: Evaluator,
    *,
    metric: RankingMetric = "recall",
    n_trials: int = DEFAULT_N_TRIALS,
    timeout_seconds: float | None = None,
    storage: str | None = None,
    study_name: str = "two_tower",
    seed: int = 42,
    on_trial_end: Callable[[TrialOutcome], None] | None = None,
) -> TuningResult:
    """Search ``recipe.search`` with TPE and patient median pruning (:func:`pruner`); at most
    ``n_trials`` trials in the study (earlier runs' finished trials included) and
    ``timeout_seconds`` for this call.

    The budget holds inside a trial too: at ``timeout_seconds`` the running trial stops after
    its current batch, is scored on what it trained, and ends the search as a finished trial
    (user attribute ``stopped_at_deadline``), unless the pruner stops it first.

    ``storage``: an Optuna storage URL (``sqlite:///path``) to keep the study in and resume
    it from; None keeps it in memory. ``on_trial_end`` is called after every trial (finished
    or pruned), e.g. to log it to MLflow. Refuses a recipe with no ``search`` section.
    """
    if not recipe.search:
        raise ValueError(f"recipe {recipe.name!r} has no `search` section: nothing to tune")
    check_scored_as_monitored(recipe, metric, getattr(evaluator, "k", None))
    if n_trials <= 0:
        raise ValueError(f"n_trials must be > 0, got {n_trials}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=study_name,
        storage=storage,
        load_if_exists=True,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(5, n_trials)),
        pruner=pruner(),
    )
    _fail_abandoned_trials(study)
    if not study.trials:
        # The recipe's own values are the first trial: the search starts from what the recipe
        # would train, so its best is never a point the validation rows rank below it.
        study.enqueue_trial(recipe_point(recipe), skip_if_exists=True)
    done = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    remaining = n_trials - len(done)
    started = time.perf_counter()
    deadline = None if timeout_seconds is None else started + timeout_seconds

    def objective(trial: optuna.Trial) -> float:
        overrides = sample_overrides(trial, recipe.search)
        candidate = recipe.with_overrides(overrides)
        ranking = EpochRanking(evaluator, metric, trial, deadline=deadline)
        trial_started = time.perf_counter()
        result = train(candidate, ranking)
        epoch = scored_epoch(result, ranking)
        trial.set_user_attr("best_epoch", epoch)
        trial.set_user_attr("values", ranking.values)
        if ranking.stopped_at_deadline:
            trial.set_user_attr("stopped_at_deadline", True)
        outcome = TrialOutcome(
            number=trial.number, overrides=overrides, recipe=candidate, values=list(ranking.values),
            best_epoch=epoch, best_value=ranking.values[epoch - 1] if epoch else float("nan"), pruned=ranking.pruned,
            seconds=time.perf_counter() - trial_started, history=dict(getattr(result, "history", {}) or {}),
        )
        if on_trial_end is not None:
            on_trial_end(outcome)
        if ranking.pruned:
            raise optuna.TrialPruned()
        if not math.isfinite(outcome.best_value):
            raise optuna.TrialPruned()  # no epoch finished: nothing to compare
        return outcome.best_value

    if remaining > 0:
        study.optimize(objective, n_trials=remaining, timeout=timeout_seconds, catch=(tf.errors.ResourceExhaustedError,))
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not completed:
        raise RuntimeError(f"study {study_name!r}: no trial finished within the budget")
    best = study.best_trial
    return TuningResult(
        study=study,
        metric=f"{metric}@{getattr(evaluator, 'k', 'k')}",
        best_overrides=overrides_from_fields(best.params),
        best_value=float(best.value),
        best_epoch=int(best.user_attrs.get("best_epoch", 0)),
        trials_run=len([t for t in study.trials if t.state != optuna.trial.TrialState.RUNNING]),
        seconds=time.perf_counter() - started,
    )


def pruner() -> optuna.pruners.BasePruner:
    """Stops a trial that has not improved for three epochs while its best is below the median
    of the other trials' values at the same epoch (from the fourth trial and third epoch).

    Why the patience: a trial at a big batch or a small learning rate rises more slowly per
    epoch than the others, and the median alone cuts it while it is still rising."""
    with warnings.catch_warnings():  # PatientPruner is marked experimental since Optuna 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.pruners.PatientPruner(
            optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2), patience=2
        )


def scored_epoch(result, ranking: EpochRanking) -> int:
    """The 1-based epoch a trial is scored at: the one its training kept (``result.kept_epoch``,
    0-based: the schedule monitor's best, whose weights the model holds), or the ranking's best
    when the training does not say; 0 when no epoch was ranked."""
    kept = getattr(result, "kept_epoch", None)
    if kept is not None and 0 <= kept < len(ranking.values):
        return int(kept) + 1
    return ranking.best_epoch


def check_scored_as_monitored(recipe: ModelRecipe, metric: str, k: int | None) -> None:
    """Refuse a search whose score is not the ranking metric the recipe's trials monitor: each
    trial keeps its epoch by that metric, so the search scores the same one (and training reads
    it from the search's own per-epoch ranking, which is at one k)."""
    monitored = recipe.schedule.ranking_monitor
    if monitored is not None and k is not None and monitored != (metric, k):
        raise ValueError(
            f"recipe {recipe.name!r} monitors {recipe.schedule.monitor} (schedule.monitor), so its trials must be "
            f"scored by it too: tune with metric {monitored[0]!r} and k {monitored[1]}, not {metric}@{k}"
        )


def recipe_point(recipe: ModelRecipe) -> dict:
    """The recipe's own value of each searched field that lies in its range (Optuna's params)."""
    values = recipe.params()
    point = {}
    for path, dimension in recipe.search.items():
        value = values[path]
        inside = value in dimension.choices if dimension.choices is not None else dimension.low <= value <= dimension.high
        if inside:
            point[path] = value
    return point


def _fail_abandoned_trials(study: optuna.Study) -> None:
    """A trial still RUNNING when a study is opened was left by a process that died: fail it,
    so it neither counts against the budget nor blocks the sampler."""
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL)
        log.warning("trial %s of study %r was left running by a stopped search: marked failed",
                    trial.number, study.study_name)


def trials_frame(study: optuna.Study) -> list[dict]:
    """One dict per trial: number, state, value, best epoch and its parameters."""
    return [
        {"trial": t.number, "state": t.state.name, "value": t.value, "best_epoch": t.user_attrs.get("best_epoch"),
         **t.params}
        for t in study.trials
    ]


def pairs_matrix(user_ids: Sequence[str], item_ids: Sequence[str], pairs_user, pairs_item) -> sp.csr_matrix:
    """(users x items) binary matrix of the (user, item) pairs whose user and item are known.

    ``pairs_user`` / ``pairs_item``: sequences of strings, or Arrow string arrays (the saved
    training pairs), which are looked up in Arrow without one Python object per pair (9.5M
    pairs at 10M events)."""
    rows = _positions(user_ids, pairs_user)
    cols = _positions(item_ids, pairs_item)
    known = (rows >= 0) & (cols >= 0)
    matrix = sp.csr_matrix((np.ones(int(known.sum()), np.float32), (rows[known], cols[known])),
                           shape=(len(user_ids), len(item_ids)))
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


def _positions(ids: Sequence[str], values) -> np.ndarray:
    """Index of each of ``values`` in ``ids``, -1 where it is not there."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        found = pc.index_in(values, value_set=pa.array(np.asarray(ids, dtype=str), type=values.type))
        return found.to_numpy(zero_copy_only=False) if found.null_count == 0 else pc.fill_null(found, -1).to_numpy()
    return pd.Index(np.asarray(ids, dtype=str)).get_indexer(np.asarray(values, dtype=str))
