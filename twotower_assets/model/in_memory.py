"""Train and evaluate the two-tower model on Arrow tables, on a split of your choice.

The asset graph splits events in the warehouse (SPEC's split, one partition per training
date) and trains from saved tf datasets. Research and benchmark protocols need other splits
(the TFRS tutorial's random 80/20, leave-last-out), and small data fits in memory, so this
module is the public way to do that without the graph::

    from twotower_assets.model import in_memory
    from twotower_assets.model.features import load_feature_config
    from twotower_assets.model.recipes import load_recipe
    from twotower_assets.model.training import TrainingParams

    split = in_memory.leave_last_out(events)            # or in_memory.random_split(events)
    fitted = in_memory.fit(load_feature_config("movielens-features"), split.train, None,
                           TrainingParams(recipe=load_recipe("movielens", {"schedule": {"epochs": 10}})))
    users = in_memory.tower_vectors(fitted, "user", split.test)

The model, loss, optimiser and feature layers are the product's own (:func:`train_two_tower`);
only the input pipeline differs. Pure TensorFlow / pyarrow: no Dagster, no warehouse.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import tensorflow as tf

from twotower_assets.model.datasets import FeatureStatsBuilder, batch_to_features, feature_kinds
from twotower_assets.model.features import FeatureConfig
from twotower_assets.model.layers import FeatureStats
from twotower_assets.model.towers import SAMPLING_PROBABILITY_COLUMN
from twotower_assets.model.training import TrainingParams, TrainingResult, train_two_tower

__all__ = ["Split", "random_split", "leave_last_out", "FittedModel", "fit", "tower_vectors"]


@dataclass(frozen=True)
class Split:
    """Training and test rows of one split (each an Arrow table with the events' columns)."""

    train: pa.Table
    test: pa.Table


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
    events: pa.Table, user_column: str = "user_id", time_column: str = "event_timestamp", item_column: str = "item_id"
) -> Split:
    """Each user's latest event is a test row, the rest train (users with one event only train).

    Ties in time go to the larger item id, so the split does not depend on row order.
    """
    for column in (user_column, time_column, item_column):
        if column not in events.column_names:
            raise ValueError(f"the events have no column {column!r} (columns: {events.column_names})")
    numbered = events.append_column("_row", pa.array(np.arange(events.num_rows)))
    ordered = numbered.sort_by([(user_column, "ascending"), (time_column, "descending"), (item_column, "descending")])
    users = ordered[user_column].to_numpy(zero_copy_only=False)
    first_of_user = np.ones(len(users), dtype=bool)
    first_of_user[1:] = users[1:] != users[:-1]
    counts = pc.value_counts(events[user_column]).flatten()
    many = set(counts[0].filter(pc.greater(counts[1], 1)).to_pylist())
    has_many = np.array([user in many for user in users], dtype=bool)
    rows = ordered["_row"].to_numpy()
    test_rows = np.sort(rows[first_of_user & has_many])
    train_rows = np.setdiff1d(np.arange(events.num_rows), test_rows)
    return Split(train=events.take(pa.array(train_rows)), test=events.take(pa.array(test_rows)))


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
    params: TrainingParams,
    catalog: pa.Table | None = None,
) -> FittedModel:
    """Train the product's two-tower model on ``train`` (early stopping on ``validation`` if given).

    ``catalog``: every item's row (the item tower's columns), for negatives that score the
    catalogue (``full_catalog``, ``mixed``); default: the distinct items of ``train``.
    """
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
        catalog = _distinct_items(train, config)
    if catalog is not None:
        item_kinds = {name: kinds[name] for name in config.item_columns if name in kinds}
        catalog_batch = pa.table({name: catalog[name] for name in item_kinds}).combine_chunks().to_batches()[0]
        catalog_features = batch_to_features(catalog_batch, item_kinds)
    result = train_two_tower(
        config, stats, tf.data.Dataset.from_tensor_slices(features), train.num_rows, validation_data, params,
        catalog=catalog_features,
    )
    return FittedModel(config=config, stats=stats, kinds=kinds, result=result)


def _distinct_items(table: pa.Table, config: FeatureConfig) -> pa.Table:
    """One row per item of ``table`` (its first), with the item tower's columns."""
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
