"""Training the two-tower model, and computing tower outputs for every user and item.

Production facts (docs/decisions.md): Adam at learning rate 0.1; ReduceLROnPlateau and
EarlyStopping on val_loss; up to 100 epochs where one epoch is a fifth of the training set.
Uses a GPU when one is visible (memory growth on), the CPU otherwise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from twotower_assets.model.datasets import batches, is_blocked, shuffled_batches
from twotower_assets.model.features import FeatureConfig
from twotower_assets.model.layers import FeatureStats
from twotower_assets.model.towers import TwoTowerModel

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
    if mixed_precision:
        tf.keras.mixed_precision.set_global_policy("mixed_float16" if gpus else "mixed_bfloat16")
    device = f"GPU x{len(gpus)} ({', '.join(g.name for g in gpus)})" if gpus else "CPU (no GPU visible)"
    if not _device_reported:
        log.info("Training on %s", device)
        _device_reported = True
    return device


@dataclass(frozen=True)
class TrainingParams:
    embedding_size: int = 64
    batch_size: int = 2048
    epochs: int = 100
    learning_rate: float = 0.1
    seed: int = 42
    temperature: float = 0.05
    shuffle_buffer: int = 100_000
    reduce_lr_patience: int = 2
    early_stopping_patience: int = 10
    min_delta: float = 0.001
    remove_accidental_hits: bool = True


@dataclass
class TrainingResult:
    model: TwoTowerModel
    history: dict[str, list[float]] = field(default_factory=dict)
    epochs_run: int = 0
    steps_per_epoch: int = 0
    examples_seen: int = 0
    device: str = ""


def build_model(
    config: FeatureConfig,
    stats: FeatureStats,
    params: TrainingParams,
    catalog: Mapping[str, np.ndarray] | None = None,
    seen_pairs: tuple[np.ndarray, np.ndarray] | None = None,
) -> TwoTowerModel:
    model = TwoTowerModel(
        config,
        stats,
        embedding_size=params.embedding_size,
        temperature=params.temperature,
        remove_accidental_hits=params.remove_accidental_hits,
        catalog=catalog,
        seen_pairs=seen_pairs,
    )
    model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate=params.learning_rate))
    return model


def train_two_tower(
    config: FeatureConfig,
    stats: FeatureStats,
    train_examples: tf.data.Dataset,
    train_rows: int,
    validation_examples: tf.data.Dataset | None,
    params: TrainingParams,
    callbacks: list[tf.keras.callbacks.Callback] | None = None,
    mixed_precision: bool = False,
    catalog: Mapping[str, np.ndarray] | None = None,
    seen_pairs: tuple[np.ndarray, np.ndarray] | None = None,
) -> TrainingResult:
    """Fit the towers; returns the model with the best validation weights restored.

    ``catalog`` (opt-in): every item's feature columns; the loss is then an exact softmax over
    them instead of in-batch negatives (see :class:`TwoTowerModel`).
    ``seen_pairs``: the training (user key, item id) pairs; val_loss then does not count a
    user's training items as negatives, as the offline evaluation does.
    """
    if train_rows <= 0:
        raise ValueError("the training dataset is empty: nothing to train on")
    device = configure_devices(mixed_precision)
    tf.keras.utils.set_random_seed(params.seed)
    model = build_model(config, stats, params, catalog, seen_pairs)

    batch_size = min(params.batch_size, train_rows)
    steps_per_epoch = max(1, math.ceil(train_rows / batch_size / EPOCH_FRACTION))
    shuffle_rows = min(params.shuffle_buffer, train_rows)
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
    monitor = "val_loss" if validation is not None else "loss"
    all_callbacks = [
        tf.keras.callbacks.ReduceLROnPlateau(
            monitor=monitor, factor=0.5, patience=params.reduce_lr_patience, min_delta=params.min_delta
        ),
        tf.keras.callbacks.EarlyStopping(
            monitor=monitor,
            patience=params.early_stopping_patience,
            min_delta=params.min_delta,
            restore_best_weights=True,
        ),
        *(callbacks or []),
    ]
    history = model.fit(
        train,
        validation_data=validation,
        epochs=params.epochs,
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
    )


def tower_outputs(
    tower: tf.keras.Model, examples: tf.data.Dataset, id_columns: list[str], batch_size: int = 8192
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A tower's float32 vectors over a dataset (single examples or blocks), with their id columns (as str)."""
    ids: dict[str, list[np.ndarray]] = {column: [] for column in id_columns}
    vectors = []
    for batch in batches(examples, batch_size).prefetch(tf.data.AUTOTUNE):
        vectors.append(tower(batch, training=False).numpy().astype(np.float32, copy=False))
        for column in id_columns:
            ids[column].append(batch[column].numpy())
    if not vectors:
        raise ValueError("no examples to compute tower outputs for")
    decoded = {
        column: np.char.decode(np.concatenate(parts).astype(bytes), "utf-8").astype(object)
        for column, parts in ids.items()
    }
    return decoded, np.concatenate(vectors)
