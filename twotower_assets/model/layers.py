"""Per-feature input layers, one class per feature type of the config.

Each layer takes one raw column (a batch of scalars: strings or numbers) and returns a
``(batch, embedding_size)`` float tensor. Their preprocessing state (vocabularies, means,
pretrained vectors) is computed once from the training table by
:mod:`twotower_assets.model.datasets` and passed in, so building a model never re-reads data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import numpy as np
import tensorflow as tf

from twotower_assets.model.features import FeatureConfig, FeatureConfigError, FeatureSpec, HistoryPooling

TEXT_MAX_TOKENS = 10_000


def vocabulary_array(values) -> np.ndarray:
    """A vocabulary as a numpy object array, the form lookup layers are given.

    Keras tracks a layer's Python-list attributes element by element: a lookup layer built from
    a list of 1M ids made every ``model.weights`` / ``get_weights()`` walk 1M strings (15 s per
    EarlyStopping snapshot at 1M users, docs/benchmarks-training.md). A numpy array is one
    untracked attribute.
    """
    return np.asarray(list(values), dtype=object)
TEXT_MAX_CHARS = 1_000
"""Text values are cut to their first 1,000 characters when read (model/datasets.py): a
multi-megabyte value would otherwise become hundreds of thousands of tokens, and a batch is
padded to its longest row. Production's titles and descriptions are far shorter."""


@dataclass
class FeatureStats:
    """What the input layers learn from the training table, computed before training.

    ``pretrained`` maps a feature to ``(ids, vectors)``: the id of each row and its vector;
    unknown ids are looked up as row 0, which is all zeros.
    """

    vocabularies: dict[str, list[str]] = field(default_factory=dict)
    moments: dict[str, tuple[float, float]] = field(default_factory=dict)
    text_vocabularies: dict[str, list[str]] = field(default_factory=dict)
    pretrained: dict[str, tuple[list[str], np.ndarray]] = field(default_factory=dict)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "feature_stats.json").write_text(
            json.dumps(
                {
                    "vocabularies": self.vocabularies,
                    "moments": self.moments,
                    "text_vocabularies": self.text_vocabularies,
                    "pretrained_ids": {k: ids for k, (ids, _) in self.pretrained.items()},
                }
            )
        )
        np.savez(
            directory / "pretrained_vectors.npz",
            **{k: vectors for k, (_, vectors) in self.pretrained.items()},
        )

    @classmethod
    def load(cls, directory: str | Path) -> FeatureStats:
        directory = Path(directory)
        raw = json.loads((directory / "feature_stats.json").read_text())
        with np.load(directory / "pretrained_vectors.npz") as vectors:
            pretrained = {k: (ids, vectors[k]) for k, ids in raw["pretrained_ids"].items()}
        return cls(
            vocabularies=raw["vocabularies"],
            moments={k: tuple(v) for k, v in raw["moments"].items()},
            text_vocabularies=raw["text_vocabularies"],
            pretrained=pretrained,
        )


def parse_vector(text: str | None, dim: int) -> np.ndarray | None:
    """A JSON list of ``dim`` numbers, or None when it is missing or unusable."""
    if text is None:
        return None
    try:
        values = np.asarray(json.loads(text), dtype=np.float32)
    except (ValueError, TypeError):
        return None
    if values.shape != (dim,) or not np.all(np.isfinite(values)):
        return None
    return values


class StringFeature(tf.keras.layers.Layer):
    """StringLookup over the training vocabulary (one OOV slot) -> Embedding(vocab + 1, size)."""

    def __init__(self, vocabulary: list[str], embedding_size: int, **kwargs):
        super().__init__(**kwargs)
        self.lookup = tf.keras.layers.StringLookup(vocabulary=vocabulary_array(vocabulary), num_oov_indices=1)
        self.embedding = tf.keras.layers.Embedding(len(vocabulary) + 1, embedding_size)

    def call(self, inputs):
        return self.embedding(self.lookup(inputs))


class NumericFeature(tf.keras.layers.Layer):
    """Normalization with the training column's mean and variance -> linear Dense(size)."""

    def __init__(self, mean: float, variance: float, embedding_size: int, **kwargs):
        super().__init__(**kwargs)
        # A constant column has variance 0; Normalization would divide by ~0.
        self.normalization = tf.keras.layers.Normalization(
            axis=None, mean=mean, variance=max(variance, 1e-12)
        )
        self.dense = tf.keras.layers.Dense(embedding_size)

    def call(self, inputs):
        values = tf.reshape(tf.cast(inputs, tf.float32), (-1, 1))
        return self.dense(self.normalization(values))


class TextFeature(tf.keras.layers.Layer):
    """TextVectorization (10,000 tokens) -> Embedding(10,000, size) -> average over tokens."""

    def __init__(self, vocabulary: list[str], embedding_size: int, **kwargs):
        super().__init__(**kwargs)
        self.vectorize = tf.keras.layers.TextVectorization(
            max_tokens=TEXT_MAX_TOKENS, output_mode="int", vocabulary=vocabulary_array(vocabulary)
        )
        self.embedding = tf.keras.layers.Embedding(TEXT_MAX_TOKENS, embedding_size, mask_zero=True)
        self.pooling = tf.keras.layers.GlobalAveragePooling1D()

    def call(self, inputs):
        tokens = self.vectorize(tf.reshape(inputs, (-1, 1)))
        embedded = self.embedding(tokens)
        mask = self.embedding.compute_mask(tokens)
        # All-padding rows (empty text) average to zeros instead of NaN.
        pooled = self.pooling(embedded, mask=mask)
        return tf.where(tf.math.is_finite(pooled), pooled, tf.zeros_like(pooled))


class PretrainedFeature(tf.keras.layers.Layer):
    """A frozen Embedding filled with given vectors per id; unknown ids get row 0 (zeros).

    Its input is the tower's id column, not the vector column: the vectors are looked up by
    id, so serving needs only the id.
    """

    def __init__(self, ids: list[str], vectors: np.ndarray, **kwargs):
        super().__init__(**kwargs)
        vectors = np.asarray(vectors, dtype=np.float32)
        self.lookup = tf.keras.layers.StringLookup(vocabulary=vocabulary_array(ids), num_oov_indices=1)
        table = np.vstack([np.zeros((1, vectors.shape[1]), np.float32), vectors])
        self.embedding = tf.keras.layers.Embedding(
            table.shape[0],
            table.shape[1],
            embeddings_initializer=tf.keras.initializers.Constant(table),
            trainable=False,
        )

    def call(self, inputs):
        return self.embedding(self.lookup(inputs))


class HistoryFeature(tf.keras.layers.Layer):
    """A user's earlier items (space-separated ids, newest first) -> one pooled vector.

    The ids are embedded with the item tower's own id layer (``item_ids``: the same
    StringLookup and Embedding objects), so a history item and a candidate item are one
    variable row, trained by both towers' gradients. Only the first ``length`` ids count.
    Padding and ids outside the item vocabulary (lookup row 0, the OOV row) are masked out.

    ``pooling``: ``mean`` averages the valid items (no valid item: zeros); ``sqrtn`` sums them
    and divides by the square root of their count (Mult-DAE's L2-normalised multi-hot input,
    Liang et al. 2018: a long history weighs more than a short one, but not linearly); ``attention``
    weighs them by a softmax over the valid positions of a learned score per item,
    ``v . tanh(W e + b)`` plus a learned bias per position (recency), and also returns zeros
    for an empty history.

    ``dropout`` (in [0, 1)): while training, each valid id is left out independently with this
    probability before pooling (a row that loses every id pools to zeros, like an empty
    history); at inference every id counts. The denoising of Mult-DAE (Liang et al. 2018):
    the user tower learns to predict an item from a random part of the user's other items.
    """

    MATRIX_ENTRIES_PER_ID = 32
    MAX_MATRIX_ENTRIES = 1 << 24  # 64 MB of float32 weights

    def __init__(
        self, item_ids: StringFeature, length: int, pooling: str = "mean", dropout: float = 0.0, **kwargs
    ):
        super().__init__(**kwargs)
        if pooling not in get_args(HistoryPooling):
            raise ValueError(f"unknown history pooling {pooling!r} ({', '.join(get_args(HistoryPooling))})")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"history dropout must be in [0, 1), got {dropout!r}")
        self.item_ids = item_ids
        self.length = int(length)
        self.pooling = pooling
        self.dropout = float(dropout)
        if pooling == "attention":
            size = item_ids.embedding.output_dim
            self.attention_hidden = tf.keras.layers.Dense(size, activation="tanh")
            self.attention_score = tf.keras.layers.Dense(1, use_bias=False)
            self.position_bias = self.add_weight(
                name="position_bias", shape=(self.length,), initializer="zeros", trainable=True
            )

    def history_ids(self, inputs) -> tf.RaggedTensor:
        """Each row's first ``length`` ids (ragged: rows keep their own lengths)."""
        return tf.strings.split(tf.reshape(inputs, (-1,)))[:, : self.length]

    def item_positions(self, inputs):
        """(batch, length) lookup rows of the first ``length`` ids; 0 for padding and unknown ids."""
        ids = self.history_ids(inputs).to_tensor(default_value="", shape=(None, self.length))
        return self.item_ids.lookup(ids)

    def attention_weights(self, embedded, valid):
        """Softmax over the valid positions of each row; a row without any is all zeros."""
        scores = tf.squeeze(self.attention_score(self.attention_hidden(embedded)), axis=-1)
        scores = tf.cast(scores, tf.float32) + self.position_bias
        scores = tf.where(valid, scores, tf.fill(tf.shape(scores), -1e9))
        weights = tf.nn.softmax(scores, axis=-1)
        return tf.where(valid, weights, tf.zeros_like(weights))

    def get_config(self) -> dict:
        """The pooling settings, for Keras' saving; the shared id layer is saved with the item
        tower, so (as for Tower) the layer is restored from the SavedModel, not rebuilt."""
        return {**super().get_config(), "length": self.length, "pooling": self.pooling, "dropout": self.dropout}

    def kept(self, valid, training=None):
        """``valid`` with, while training, each id left out with probability ``dropout``."""
        if not self.dropout:
            return valid

        def drop():
            return valid & (tf.random.uniform(tf.shape(valid)) >= self.dropout)

        if training is None:
            training = tf.keras.backend.learning_phase()
        return tf.__internal__.smart_cond.smart_cond(training, drop, lambda: tf.identity(valid))

    def call(self, inputs, training=None):
        if self.pooling != "attention":
            return self._pooled_sum(inputs, training)
        positions = self.item_positions(inputs)
        valid = self.kept(positions > 0, training)
        embedded = tf.cast(self.item_ids.embedding(positions), tf.float32)
        weights = self.attention_weights(embedded, valid)
        return tf.reduce_sum(embedded * weights[:, :, tf.newaxis], axis=1)

    def _pooled_sum(self, inputs, training=None):
        """``mean`` and ``sqrtn``: a weighted sum per row over the ids the row has, never over a
        (batch, length, size) padded tensor (a history of hundreds of items in a batch of 1,024
        would be gigabytes of mostly padding). Computed one of two ways, chosen per batch from its
        rows, its ids and the catalogue's size:

        - long histories over a small catalogue (MovieLens: about 160 ids a row, 1,682 movies):
          a (rows x distinct ids) weight matrix times the distinct ids' vectors, one matrix
          product. The per-id way would copy every id's vector (165,000 of them a batch of
          1,024) forward and back; this one gathers each distinct id once, 4.7x faster an
          epoch (bench/history_pooling.py).
        - otherwise (a large catalogue, short histories): a ragged segment sum of the ids' vectors.

        Both give the same vector and the same gradient, one row per distinct id, so a lazy
        optimizer updates the same rows either way."""
        ids = self.history_ids(inputs)
        positions = self.item_ids.lookup(ids.flat_values)
        rows = ids.value_rowids()
        n_rows = ids.nrows()
        valid = tf.cast(self.kept(positions > 0, training), tf.float32)
        count = tf.math.unsorted_segment_sum(valid, rows, n_rows)
        scale = tf.maximum(count, 1.0)
        scale = tf.sqrt(scale) if self.pooling == "sqrtn" else scale
        weights = valid / tf.gather(scale, rows)

        def by_matrix_product():
            distinct, slot = tf.unique(positions, out_idx=tf.int64)
            shape = tf.stack([n_rows, tf.size(distinct, out_type=tf.int64)])
            matrix = tf.scatter_nd(tf.stack([rows, slot], axis=1), weights, shape)
            return tf.matmul(matrix, tf.cast(self.item_ids.embedding(distinct), tf.float32))

        def by_segment_sum():
            embedded = tf.cast(self.item_ids.embedding(positions), tf.float32)
            return tf.math.unsorted_segment_sum(embedded * weights[:, tf.newaxis], rows, n_rows)

        # The matrix's entries cost a multiply-add per vector value, an id of the segment sum
        # a copy of its vector several times over: the product wins while the matrix has at
        # most MATRIX_ENTRIES_PER_ID entries per id, and is capped in memory. Bounded by the
        # catalogue's size (the distinct ids never exceed it), so the segment sum, the large
        # catalogue's way, does not pay for finding the distinct ids.
        entries = n_rows * self.item_ids.lookup.vocabulary_size()
        by_product = (entries <= self.MATRIX_ENTRIES_PER_ID * tf.size(positions, out_type=tf.int64)) & (
            entries <= self.MAX_MATRIX_ENTRIES)
        return tf.cond(by_product, by_matrix_product, by_segment_sum)


def build_feature_layer(
    name: str,
    spec: FeatureSpec,
    stats: FeatureStats,
    config: FeatureConfig,
    item_id_layer: StringFeature | None = None,
) -> tf.keras.layers.Layer:
    """The input layer for one configured feature, from the statistics of the training table.

    ``item_id_layer``: the item tower's id layer, which a ``history`` feature shares.
    """
    layer_name = f"{name}_{spec.type}"
    if spec.type == "history":
        if item_id_layer is None:
            raise FeatureConfigError(
                f"config {config.name!r}: history feature {name!r} needs the item tower's id layer (build it first)"
            )
        return HistoryFeature(
            item_id_layer, spec.history_length, spec.history_pooling, spec.history_dropout, name=layer_name
        )
    if spec.type == "string":
        return StringFeature(stats.vocabularies[name], spec.embedding_size, name=layer_name)
    if spec.type == "int":
        mean, variance = stats.moments[name]
        return NumericFeature(mean, variance, spec.embedding_size, name=layer_name)
    if spec.type == "text":
        return TextFeature(stats.text_vocabularies[name], spec.embedding_size, name=layer_name)
    if spec.type == "pretrained":
        ids, vectors = stats.pretrained[name]
        if vectors.shape[1] != spec.embedding_size:
            raise FeatureConfigError(
                f"config {config.name!r}: pretrained feature {name!r} has embedding_size "
                f"{spec.embedding_size} but its vectors have {vectors.shape[1]} values"
            )
        return PretrainedFeature(ids, vectors, name=layer_name)
    raise FeatureConfigError(f"config {config.name!r}: feature {name!r} has unknown type {spec.type!r}")
