"""Train and evaluate the two-tower model on Arrow tables, on a split of your choice.

The asset graph splits events in the warehouse (the chronological per-user split, one partition per
training date) and trains from saved tf datasets. Research and benchmark protocols need other splits
(the TFRS tutorial's random 80/20, leave-last-out), and small data fits in memory, so this
module is the public way to do that without the graph::

    from twotower_assets.data.movielens import click_event_table, load_movielens
    from twotower_assets.model import in_memory
    from twotower_assets.model.features import load_feature_config
    from twotower_assets.model.recipes import load_recipe
    from twotower_assets.model.training import TrainingParams

    events = click_event_table(load_movielens("data/ml-100k"))
    split = in_memory.leave_last_out(events, validation=True)   # or in_memory.random_split(events)
    config = load_feature_config("movielens-features")
    tuned = in_memory.tune(config, split, "movielens", metric="ndcg", k=10)   # <= 30 minutes
    recipe = tuned.best_recipe(load_recipe("movielens"))
    fitted = in_memory.fit(config, split.train, split.validation, TrainingParams(recipe=recipe))
    print(in_memory.rank_held_out(fitted, split.train, split.test, ks=(10, 100)))   # HR, recall, NDCG

After :func:`random_split`, recompute the history features of the rows a model trains on
from those rows (:func:`history_from`): the events' own are computed over every event, test
ratings included.

The model, loss, optimiser and feature layers are the product's own (:func:`train_two_tower`);
only the input pipeline differs. Pure TensorFlow / pyarrow: no Dagster, no warehouse.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
import logging
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp
import tensorflow as tf

from twotower_assets.model.datasets import FeatureStatsBuilder, batch_to_features, feature_kinds
from twotower_assets.model import tuning
from twotower_assets.model.features import ITEM_ID_FEATURE as ITEM_ID
from twotower_assets.model.features import FeatureConfig
from twotower_assets.model.recipes import DEFAULT_N_TRIALS, DEFAULT_TIMEOUT_MINUTES, ModelRecipe, load_recipe
from twotower_assets.model.layers import FeatureStats
from twotower_assets.model.towers import SAMPLING_PROBABILITY_COLUMN
from twotower_assets.model.tuning import RankingEvaluator, RankingMetric, TuningResult
from twotower_assets.model.training import SeenPairs, TrainingParams, TrainingResult, train_two_tower

log = logging.getLogger(__name__)

__all__ = [
    "Split", "random_split", "leave_last_out", "history_from", "FittedModel", "fit", "distinct_items", "tower_vectors",
    "user_state", "ranking_evaluator", "rank_held_out", "tune",
]


@dataclass(frozen=True)
class Split:
    """Training, test and (optionally) validation rows of one split (Arrow tables with the
    events' columns)."""

    train: pa.Table
    test: pa.Table
    validation: pa.Table | None = None


def random_split(events: pa.Table, test_share: float = 0.2, seed: int = 42) -> Split:
    """Rows shuffled with ``seed``; the last ``test_share`` of them are the test rows.

    The TFRS tutorial's protocol: a test rating is any rating, earlier or later than the
    user's training ratings.
    """
    if not 0.0 < test_share < 1.0:
        raise ValueError(f"test_share must be between 0 and 1, got {test_share}")
    if events.num_rows < 2:
        raise ValueError(f"a split needs at least 2 rows, got {events.num_rows}")
    order = np.random.default_rng(seed).permutation(events.num_rows)
    cut = events.num_rows - max(1, int(round(events.num_rows * test_share)))
    return Split(train=events.take(pa.array(order[:cut])), test=events.take(pa.array(order[cut:])))


def leave_last_out(
    events: pa.Table,
    user_column: str = "user_id",
    time_column: str = "event_timestamp",
    item_column: str = "item_id",
    validation: bool = False,
) -> Split:
    """Each user's latest event is a test row, the rest train (users with one event only train).

    ``validation``: each user's second-latest event is a validation row too (users with three
    events or more), the protocol that tunes on the event before the held-out one.

    Ties in time go to the larger item id, compared as integers when every item id is one
    (MovieLens: "1000" is after "99") and as strings otherwise, so the split depends neither on
    row order nor on how numeric ids sort as text.
    """
    for column in (user_column, time_column, item_column):
        if column not in events.column_names:
            raise ValueError(f"the events have no column {column!r} (columns: {events.column_names})")
    item_key = _item_sort_key(events[item_column])
    numbered = events.select([user_column, time_column]).append_column("_item_key", item_key).append_column(
        "_row", pa.array(np.arange(events.num_rows))
    )
    ordered = numbered.sort_by([(user_column, "ascending"), (time_column, "descending"), ("_item_key", "descending")])
    users = ordered[user_column].to_numpy(zero_copy_only=False)
    starts = np.ones(len(users), dtype=bool)
    starts[1:] = users[1:] != users[:-1]
    position = np.arange(len(users)) - np.maximum.accumulate(np.where(starts, np.arange(len(users)), 0))
    group = np.cumsum(starts) - 1
    counts = np.bincount(group)[group]  # events of each row's user
    rows = ordered["_row"].to_numpy()
    test_rows = np.sort(rows[(position == 0) & (counts > 1)])
    validation_rows = np.sort(rows[(position == 1) & (counts > 2)]) if validation else np.array([], np.int64)
    held_out = np.concatenate([test_rows, validation_rows])
    train_rows = np.setdiff1d(np.arange(events.num_rows), held_out)
    return Split(
        train=events.take(pa.array(train_rows)),
        test=events.take(pa.array(test_rows)),
        validation=events.take(pa.array(validation_rows)) if validation else None,
    )


def history_from(config: FeatureConfig, rows: pa.Table, history: pa.Table, time_column: str = "event_timestamp") -> pa.Table:
    """``rows`` with each history feature of ``config`` recomputed from ``history`` alone: the
    user's latest items in ``history`` (newest first, ties as :func:`user_state` breaks them,
    the feature's ``length``), the row's own item left out; ``""`` for a user ``history`` lacks.

    The query of one vector per user on a random split, for the rows a model trains and
    validates on: every other rating of the user in the training rows, the one :func:`user_state`
    gives the user after training. The events' own history columns are causal over *all*
    events, so after :func:`random_split` they hold test ratings (a rating is any of the
    user's, earlier or later than the test ones): recompute them from the training rows.
    """
    user_key = config.user_id_feature
    for table, label in ((rows, "rows"), (history, "history")):
        needed = (user_key, ITEM_ID, time_column) if label == "history" else (user_key, ITEM_ID)
        for column in needed:
            if column not in table.column_names:
                raise ValueError(f"the {label} have no column {column!r} (columns: {table.column_names})")
    ordered = history.select([user_key, time_column, ITEM_ID]).append_column(
        "_item_key", _item_sort_key(history[ITEM_ID])
    ).sort_by([(user_key, "ascending"), (time_column, "descending"), ("_item_key", "descending")])
    users = ordered[user_key].to_numpy(zero_copy_only=False).astype(str)
    items = ordered[ITEM_ID].to_numpy(zero_copy_only=False).astype(str)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else np.array([], np.int64)
    ends = np.r_[starts[1:], len(users)]
    row_users = rows[user_key].to_numpy(zero_copy_only=False).astype(str)
    own = rows[ITEM_ID].to_numpy(zero_copy_only=False).astype(str)
    for name, spec in config.history_features.items():
        length = spec.history_length
        latest = {users[a]: items[a:min(b, a + length + 1)].tolist() for a, b in zip(starts, ends)}
        values = pa.array([" ".join([m for m in latest.get(u, ()) if m != item][:length]) for u, item in zip(row_users, own)],
                          pa.string())
        index = rows.schema.get_field_index(name)
        rows = rows.set_column(index, name, values) if index >= 0 else rows.append_column(name, values)
    return rows


def _item_sort_key(ids: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Item ids as integers when every one is an integer, else as strings."""
    text = pc.cast(ids, pa.string())
    if len(text) and pc.all(pc.match_substring_regex(text, r"^-?[0-9]{1,18}$")).as_py():
        return pc.cast(text, pa.int64()).combine_chunks() if isinstance(text, pa.ChunkedArray) else pc.cast(text, pa.int64())
    return text.combine_chunks() if isinstance(text, pa.ChunkedArray) else text


@dataclass
class FittedModel:
    """A trained model with what is needed to feed it more tables."""

    config: FeatureConfig
    stats: FeatureStats
    kinds: dict[str, str]
    result: TrainingResult

    @property
    def model(self):
        return self.result.model


def _examples(table: pa.Table, kinds: Mapping[str, str], item_counts: Mapping[str, int], total: int) -> dict:
    """The towers' columns plus each row's item sampling probability (its share of training rows)."""
    items = table["item_id"].to_pylist()
    probability = np.array([item_counts.get(item, 1) / total for item in items], dtype=np.float64)
    columns = {name: table[name] for name in kinds}
    batch = pa.table({**columns, SAMPLING_PROBABILITY_COLUMN: probability}).combine_chunks().to_batches()[0]
    return batch_to_features(batch, {**kinds, SAMPLING_PROBABILITY_COLUMN: "number"})


def fit(
    config: FeatureConfig,
    train: pa.Table,
    validation: pa.Table | None,
    params: TrainingParams | None = None,
    catalog: pa.Table | None = None,
    *,
    seen_pairs: SeenPairs | Literal["train"] | None = "train",
    callbacks: list[tf.keras.callbacks.Callback] | None = None,
    progress: bool = False,
    ranking: tuning.EpochRanking | None = None,
) -> FittedModel:
    """Train the product's two-tower model on ``train`` (early stopping on ``validation`` if given).

    ``params``: the recipe, seed and precision (default: the production recipe, seed 42).
    ``catalog``: every item's row (the item tower's columns), for negatives that score the
    catalogue (``full_catalog``, ``mixed``); default: the distinct items of ``train``.
    ``seen_pairs``: (user ids, item ids) that validation does not count as negatives, as the
    offline evaluation removes a user's training items before ranking; ``"train"`` (default):
    ``train``'s own pairs; None: none. ``callbacks``: Keras callbacks for the fit (after the
    product's own). ``progress``: log each epoch's losses (logger
    ``twotower_assets.model.in_memory``, INFO). ``ranking``: the validation ranking run after
    each epoch (:class:`~twotower_assets.model.tuning.EpochRanking`); default, when the recipe's
    ``schedule.monitor`` is a ranking metric: that metric over ``validation``'s users.
    """
    params = params if params is not None else TrainingParams()
    config.check_columns(train.column_names, source="the training table")
    if train.num_rows == 0:
        raise ValueError("the training table is empty: nothing to train on")
    kinds = feature_kinds(config)
    counts = pc.value_counts(train["item_id"]).flatten()
    item_counts = dict(zip(counts[0].to_pylist(), counts[1].to_pylist()))
    features = _examples(train, kinds, item_counts, train.num_rows)
    builder = FeatureStatsBuilder(config)
    for batch in train.to_batches():
        builder.update(batch)
    stats = builder.build()
    validation_data = None
    if validation is not None and validation.num_rows:
        validation_data = tf.data.Dataset.from_tensor_slices(_examples(validation, kinds, item_counts, train.num_rows))
    catalog_features = None
    if catalog is None and params.recipe.task.negatives.needs_catalog:
        catalog = distinct_items(train, config)
    if catalog is not None:
        item_kinds = {name: kinds[name] for name in config.item_columns if name in kinds}
        catalog_batch = pa.table({name: catalog[name] for name in item_kinds}).combine_chunks().to_batches()[0]
        catalog_features = batch_to_features(catalog_batch, item_kinds)
    if isinstance(seen_pairs, str):
        if seen_pairs != "train":
            raise ValueError(f"seen_pairs must be 'train', None or (user ids, item ids), not {seen_pairs!r}")
        seen_pairs = (train[config.user_id_feature], train[config.item_id_feature])
    watched = params.recipe.schedule.ranking_monitor
    if ranking is None and watched is not None and validation_data is not None:
        metric, k = watched
        ranking = tuning.EpochRanking(ranking_evaluator(config, train, validation, k, catalog), metric)
    all_callbacks = [*(callbacks or []), *([_ProgressLog()] if progress else [])]
    result = train_two_tower(
        config, stats, tf.data.Dataset.from_tensor_slices(features), train.num_rows, validation_data, params,
        callbacks=all_callbacks, catalog=catalog_features, seen_pairs=seen_pairs, ranking=ranking,
    )
    return FittedModel(config=config, stats=stats, kinds=kinds, result=result)


class _ProgressLog(tf.keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        shown = ", ".join(f"{name} {value:.4f}" for name, value in (logs or {}).items() if name != "lr")
        log.info("epoch %d: %s", epoch + 1, shown)


def distinct_items(table: pa.Table, config: FeatureConfig) -> pa.Table:
    """The catalogue of ``table``: one row per item, its first, in the order items first appear
    (pass it as ``catalog`` to rank every item, those a split left out of training included)."""
    ids = table[config.item_id_feature]
    first = np.unique(pc.cast(ids, pa.string()).to_numpy(zero_copy_only=False), return_index=True)[1]
    return table.take(pa.array(np.sort(first)))


def tower_vectors(fitted: FittedModel, tower: Literal["user", "item"], table: pa.Table, batch_size: int = 4096) -> np.ndarray:
    """(rows, E) float32 unit vectors of one tower for each row of ``table``."""
    columns = fitted.config.user_columns if tower == "user" else fitted.config.item_columns
    model_tower = fitted.model.user_tower if tower == "user" else fitted.model.item_tower
    # Pretrained features are looked up by the tower's id column, which every config has.
    wanted = {name: fitted.kinds[name] for name in columns if name in fitted.kinds}
    missing = [name for name in wanted if name not in table.column_names]
    if missing:
        raise ValueError(f"the table has no column {missing} for the {tower} tower")
    batch = pa.table({name: table[name] for name in wanted}).combine_chunks().to_batches()[0]
    dataset = tf.data.Dataset.from_tensor_slices(batch_to_features(batch, wanted)).batch(batch_size)
    forward = tf.function(lambda rows: model_tower(rows, training=False), reduce_retracing=True)
    return np.concatenate([forward(rows).numpy() for rows in dataset]).astype(np.float32, copy=False)


def user_state(config: FeatureConfig, events: pa.Table, time_column: str = "event_timestamp") -> pa.Table:
    """One row per user as the user tower sees them at the end of ``events``: the user columns of
    their latest event, and each history feature as their latest items (newest first, the
    feature's ``length``), the query that recommends to them after training.

    Latest means by ``time_column``, ties broken as :func:`leave_last_out` breaks them.
    """
    user_key = config.user_id_feature
    for column in (user_key, time_column, ITEM_ID):
        if column not in events.column_names:
            raise ValueError(f"the events have no column {column!r} (columns: {events.column_names})")
    ordered = events.append_column("_item_key", _item_sort_key(events[ITEM_ID])).sort_by(
        [(user_key, "ascending"), (time_column, "descending"), ("_item_key", "descending")]
    )
    users = ordered[user_key].to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    latest = ordered.take(pa.array(starts))
    columns = {name: latest[name] for name in config.user_columns if name in latest.column_names}
    items = ordered[ITEM_ID].to_numpy(zero_copy_only=False).astype(str)
    ends = np.r_[starts[1:], len(users)]
    for name, spec in config.history_features.items():
        length = spec.history_length
        columns[name] = pa.array([" ".join(items[a:min(b, a + length)]) for a, b in zip(starts, ends)], pa.string())
    return pa.table(columns)


def ranking_evaluator(
    config: FeatureConfig, train: pa.Table, held_out: pa.Table, k: int, catalog: pa.Table | None = None,
    time_column: str = "event_timestamp",
) -> RankingEvaluator:
    """Ranks the whole catalogue for each user with held-out rows, from their state at the end
    of ``train``, with their training items removed (:class:`RankingEvaluator`)."""
    kinds = feature_kinds(config)
    states = user_state(config, train, time_column)
    user_key = config.user_id_feature
    held_users = set(held_out[user_key].to_numpy(zero_copy_only=False).astype(str))
    state_users = states[user_key].to_numpy(zero_copy_only=False).astype(str)
    states = states.filter(pa.array([u in held_users for u in state_users]))
    if catalog is None:
        catalog = distinct_items(pa.concat_tables([train.select(held_out.column_names), held_out], promote_options="default")
                                  if set(held_out.column_names) >= set(config.item_columns) else train, config)
    user_kinds = {name: kinds[name] for name in config.user_columns if name in kinds}
    item_kinds = {name: kinds[name] for name in config.item_columns if name in kinds}
    users = batch_to_features(pa.table({n: states[n] for n in user_kinds}).combine_chunks().to_batches()[0], user_kinds)
    items = batch_to_features(pa.table({n: catalog[n] for n in item_kinds}).combine_chunks().to_batches()[0], item_kinds)
    user_ids = states[user_key].to_numpy(zero_copy_only=False).astype(str)
    item_ids = catalog[ITEM_ID].to_numpy(zero_copy_only=False).astype(str)
    def pairs(table: pa.Table) -> sp.csr_matrix:
        return tuning.pairs_matrix(user_ids, item_ids, table[user_key].to_numpy(zero_copy_only=False).astype(str),
                                   table[ITEM_ID].to_numpy(zero_copy_only=False).astype(str))

    return RankingEvaluator(users, items, pairs(held_out), pairs(train), k)


def rank_held_out(
    fitted: FittedModel, train: pa.Table, held_out: pa.Table, ks: Sequence[int] = (10, 100),
    catalog: pa.Table | None = None,
) -> dict[str, float]:
    """HR@k, recall@k and NDCG@k of ``fitted`` on ``held_out``: each user with held-out rows
    ranks every catalogue item (default: the items of ``train`` and ``held_out``) from their
    state at the end of ``train`` (:func:`user_state`), their training items removed.

    Returns ``{"hr@10": ..., "recall@10": ..., "ndcg@10": ..., ...}``; with one held-out item
    per user (leave-last-out) HR@k and recall@k are the same number.
    """
    evaluator = ranking_evaluator(fitted.config, train, held_out, max(ks), catalog)
    scores = {}
    for k, values in evaluator.scores_at(fitted.model, ks).items():
        scores.update({f"hr@{k}": values["hit_rate"], f"recall@{k}": values["recall"], f"ndcg@{k}": values["ndcg"]})
    return scores


def tune(
    config: FeatureConfig,
    split: Split,
    recipe: ModelRecipe | str = "production",
    *,
    n_trials: int = DEFAULT_N_TRIALS,
    timeout_minutes: float | None = DEFAULT_TIMEOUT_MINUTES,
    metric: RankingMetric = "recall",
    k: int = 50,
    seed: int = 42,
    storage: str | None = None,
    study_name: str = "two_tower",
    catalog: pa.Table | None = None,
    on_trial_end=None,
) -> TuningResult:
    """Search ``recipe``'s ``search`` space on ``split.train`` scored by ``metric``@``k`` on
    ``split.validation`` (the same search as the ``tuned_hyperparameters`` asset,
    :func:`twotower_assets.model.tuning.tune`). Then train the final model with
    ``result.best_recipe(recipe)``, refit on train + validation for ``result.best_epoch`` epochs
    (``schedule: {epochs: best_epoch, early_stopping_patience: ...}``) or early-stopped again.
    """
    if split.validation is None or split.validation.num_rows == 0:
        raise ValueError("tuning scores trials on validation rows: the split has none "
                         "(leave_last_out(events, validation=True), or set Split.validation)")
    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    evaluator = ranking_evaluator(config, split.train, split.validation, k, catalog)

    def train(candidate: ModelRecipe, ranking):
        return fit(config, split.train, split.validation, TrainingParams(recipe=candidate, seed=seed), catalog,
                   ranking=ranking).result

    return tuning.tune(
        recipe, train, evaluator, metric=metric, n_trials=n_trials,
        timeout_seconds=None if timeout_minutes is None else timeout_minutes * 60,
        storage=storage, study_name=study_name, seed=seed, on_trial_end=on_trial_end,
    )
