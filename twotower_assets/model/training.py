"""Training the two-tower model, and computing tower outputs for every user and item.

Production facts (docs/decisions.md): Adam at learning rate 0.1; ReduceLROnPlateau and
EarlyStopping on val_loss; up to 100 epochs where one epoch is a fifth of the training set.
Uses a GPU when one is visible (memory growth on), the CPU otherwise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pydantic
import tensorflow as tf
from pydantic import Field

from twotower_assets.model.averaging import WeightAveraging
from twotower_assets.model.datasets import batches, is_blocked, shuffled_batches
from twotower_assets.model.features import FeatureConfig
from twotower_assets.model.layers import FeatureStats
from twotower_assets.model.optimizers import make_optimizer
from twotower_assets.model.recipes import ModelRecipe
from twotower_assets.model.towers import MIXED_POLICY, TwoTowerModel

# Training (user key, item id) pairs, as string arrays (Arrow or numpy).
SeenPairs = tuple[np.ndarray | pa.ChunkedArray, np.ndarray | pa.ChunkedArray]

log = logging.getLogger(__name__)

EPOCH_FRACTION = 5
"""One epoch is a fifth of the training set, so the callbacks react five times per pass."""

_device_reported = False


def configure_devices(mixed_precision: bool = False) -> str:
    """Turn on GPU memory growth (if there is a GPU) and say once what training runs on."""
    global _device_reported
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass  # Already initialised in this process: growth was set the first time.
    device = f"GPU x{len(gpus)} ({', '.join(g.name for g in gpus)})" if gpus else "CPU (no GPU visible)"
    if mixed_precision:
        device += f", {MIXED_POLICY}"
    if not _device_reported:
        log.info("Training on %s", device)
        _device_reported = True
    return device


def distribution_strategy() -> tf.distribute.Strategy:
    """MirroredStrategy over every visible GPU when there are several, else the default (one device).

    Each replica gets batch_size / replicas rows of every batch: its in-batch softmax draws
    negatives from its own slice, the gradients are summed across replicas.
    """
    if len(tf.config.list_logical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


class TrainingParams(pydantic.BaseModel):
    """What :func:`train_two_tower` trains: a model recipe, plus the run's seed and precision.

    The recipe (:mod:`twotower_assets.model.recipes`) holds the architecture, the loss and the
    optimiser and schedule; production's is the default.
    """

    # Unknown names are refused: a misspelt setting must not silently train on a default.
    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    recipe: ModelRecipe = Field(default_factory=ModelRecipe, description="The model and how it is fitted.")
    seed: int = Field(default=42, description="Seeds TensorFlow, numpy, Python and the shuffle.")
    mixed_precision: bool = Field(
        default=False, description=f"The towers compute in {MIXED_POLICY} (faster on GPUs); the loss stays float32."
    )


@dataclass
class TrainingResult:
    model: TwoTowerModel
    history: dict[str, list[float]] = field(default_factory=dict)
    epochs_run: int = 0
    steps_per_epoch: int = 0
    examples_seen: int = 0
    device: str = ""
    kept_epoch: int | None = None
    """The epoch (0-based) whose weights the model holds: EarlyStopping restores its best epoch."""


def build_model(
    config: FeatureConfig,
    stats: FeatureStats,
    params: TrainingParams,
    catalog: Mapping[str, np.ndarray] | None = None,
    seen_pairs: tuple[np.ndarray, np.ndarray] | None = None,
) -> TwoTowerModel:
    """The model of ``params.recipe``, compiled with its optimizer; refuses a recipe that does
    not fit ``config``'s features (:meth:`ModelRecipe.check_features`)."""
    recipe = params.recipe
    recipe.check_features(config)
    model = TwoTowerModel(
        config,
        stats,
        embedding_size=recipe.towers.embedding_size,
        temperature=recipe.task.temperature,
        negatives=recipe.task.negatives,
        catalog=catalog,
        seen_pairs=seen_pairs,
        mixed_precision=params.mixed_precision,
        item_bias=recipe.towers.item_bias,
        user_head=recipe.towers.user_head,
        item_head=recipe.towers.item_head,
    )
    model.compile(optimizer=make_optimizer(recipe.optimizer.name, recipe.optimizer.learning_rate))
    return model


def train_two_tower(
    config: FeatureConfig,
    stats: FeatureStats,
    train_examples: tf.data.Dataset,
    train_rows: int,
    validation_examples: tf.data.Dataset | None,
    params: TrainingParams,
    callbacks: list[tf.keras.callbacks.Callback] | None = None,
    catalog: Mapping[str, np.ndarray] | None = None,
    seen_pairs: SeenPairs | Callable[[], SeenPairs] | None = None,
    strategy: tf.distribute.Strategy | None = None,
    initialize: Callable[[TwoTowerModel], object] | None = None,
    ranking: tf.keras.callbacks.Callback | None = None,
) -> TrainingResult:
    """Fit the towers; returns the model with the best validation weights restored.

    ``catalog``: every item's feature columns, for negatives strategies that score the
    catalogue (``needs_catalog``: the full-catalogue softmax, mixed negatives).
    ``seen_pairs``: the training (user key, item id) pairs; val_loss then does not count a
    user's training items as negatives, as the offline evaluation does. A callable that
    returns them is called while the model is built, and what it returned is freed (and
    Arrow's unused memory handed back) before fitting: at 10M events the pairs are 7.4M rows
    of strings, 330 MB that a caller's argument would otherwise hold for the whole fit.
    ``strategy``: where to train; default :func:`distribution_strategy` (all GPUs if several).
    ``initialize``: called with the built model (variables created) before fitting, e.g. a
    warm start (:func:`twotower_assets.model.warm_start.warm_start`).
    ``ranking``: an :class:`~twotower_assets.model.tuning.EpochRanking` of the validation users,
    run after each epoch before the callbacks that read its values; required when the recipe's
    ``schedule.monitor`` is a ranking metric (at the ranking's k), which then picks the epoch kept.
    """
    if train_rows <= 0:
        raise ValueError("the training dataset is empty: nothing to train on")
    recipe, schedule = params.recipe, params.recipe.schedule
    monitor, mode = _monitored(schedule, validation_examples is not None, ranking)  # before any work
    device = configure_devices(params.mixed_precision)
    strategy = strategy or distribution_strategy()
    tf.keras.utils.set_random_seed(params.seed)
    with strategy.scope():
        # The loss is the global-batch mean on any number of replicas (TwoTowerModel.compute_loss).
        model = build_model(config, stats, params, catalog, seen_pairs() if callable(seen_pairs) else seen_pairs)
        if callable(seen_pairs):
            pa.default_memory_pool().release_unused()
        if initialize is not None:
            model(next(iter(batches(train_examples, 2))))  # creates the variables to initialise
            initialize(model)
    if strategy.num_replicas_in_sync > 1:
        device += f", MirroredStrategy over {strategy.num_replicas_in_sync} replicas"

    batch_size = min(schedule.batch_size, train_rows)
    steps_per_epoch = max(1, math.ceil(train_rows / batch_size / EPOCH_FRACTION))
    shuffle_rows = min(schedule.shuffle_buffer, train_rows)
    if is_blocked(train_examples):  # saved blocks (tf_datasets): the vectorised shuffle
        train = shuffled_batches(train_examples, batch_size, shuffle_rows, params.seed)
    else:
        train = train_examples.shuffle(shuffle_rows, seed=params.seed).repeat().batch(batch_size, drop_remainder=True)
    train = train.prefetch(tf.data.AUTOTUNE)
    validation = (
        batches(validation_examples, batch_size).cache().prefetch(tf.data.AUTOTUNE)
        if validation_examples is not None
        else None
    )
    all_callbacks = [
        # First, so that the callbacks after it see the averaged weights when an epoch ends.
        *([WeightAveraging(recipe.optimizer.weight_averaging)] if recipe.optimizer.weight_averaging else []),
        *([ranking] if ranking is not None else []),
        tf.keras.callbacks.ReduceLROnPlateau(
            monitor=monitor, mode=mode, factor=0.5, patience=schedule.reduce_lr_patience, min_delta=schedule.min_delta
        ),
        early_stopping := tf.keras.callbacks.EarlyStopping(
            monitor=monitor,
            mode=mode,
            patience=schedule.early_stopping_patience,
            min_delta=schedule.min_delta,
            restore_best_weights=True,
        ),
        *(callbacks or []),
    ]
    history = model.fit(
        train,
        validation_data=validation,
        epochs=schedule.epochs,
        steps_per_epoch=steps_per_epoch,
        callbacks=all_callbacks,
        verbose=0,
    )
    epochs_run = len(history.history.get("loss", []))
    return TrainingResult(
        model=model,
        history={k: [float(v) for v in vals] for k, vals in history.history.items()},
        epochs_run=epochs_run,
        steps_per_epoch=steps_per_epoch,
        examples_seen=epochs_run * steps_per_epoch * batch_size,
        device=device,
        kept_epoch=int(early_stopping.best_epoch) if epochs_run else None,
    )


def _monitored(schedule, has_validation: bool, ranking) -> tuple[str, str]:
    """The Keras log key the schedule's callbacks watch, and whether lower or higher is better."""
    if not has_validation:
        return "loss", "min"  # nothing held out: the training loss is all there is
    if schedule.ranking_monitor is None:
        return "val_loss", "min"
    metric, k = schedule.ranking_monitor
    if ranking is None or getattr(ranking, "k", None) != k:
        have = "none" if ranking is None else f"one at k = {getattr(ranking, 'k', None)}"
        raise ValueError(
            f"schedule.monitor is {schedule.monitor!r}: training needs a ranking of the validation users "
            f"at k = {k} (ranking=EpochRanking(...)), got {have}"
        )
    return f"val_{metric}_at_{k}", "max"


def tower_outputs(
    tower: tf.keras.Model, examples: tf.data.Dataset, id_columns: list[str], batch_size: int = 8192
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A tower's float32 vectors over a dataset (single examples or blocks), with their id columns (as str)."""
    table = tower_output_table(tower, examples, id_columns, batch_size)
    embedding = table[EMBEDDING_COLUMN].combine_chunks()
    vectors = embedding.flatten().to_numpy(zero_copy_only=False, writable=True).reshape(len(embedding), embedding.type.list_size)
    return {column: table[column].to_numpy(zero_copy_only=False) for column in id_columns}, vectors


# The vector column of an embeddings file (lib.layout.EMBEDDING_COLUMN: model code imports
# nothing outside model/, so the name is repeated here).
EMBEDDING_COLUMN = "embedding"


def tower_output_table(
    tower: tf.keras.Model, examples: tf.data.Dataset, id_columns: list[str], batch_size: int = 8192
) -> pa.Table:
    """A tower's outputs as Arrow: the id columns (strings) and ``embedding`` (fixed-size float32 lists).

    Each batch's ids become Arrow strings at once: holding a million ids as Python objects
    until the end made the trainer's export the 10M graph's memory peak.
    """
    # A graph, not eager calls: eagerly, a StringLookup over a 1M-id vocabulary took 0.4 s per
    # 16k-row batch (1M users: 30 s); traced, 9 ms.
    forward = tf.function(lambda batch: tower(batch, training=False), reduce_retracing=True)
    parts = []
    for batch in batches(examples, batch_size).prefetch(tf.data.AUTOTUNE):
        vectors = forward(batch).numpy().astype(np.float32, copy=False)
        columns = {column: pa.array(batch[column].numpy(), pa.binary()).cast(pa.string()) for column in id_columns}
        columns[EMBEDDING_COLUMN] = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1])
        parts.append(pa.record_batch(columns))
    if not parts:
        raise ValueError("no examples to compute tower outputs for")
    return pa.Table.from_batches(parts)
