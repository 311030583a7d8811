"""The two towers and the retrieval model that trains them.

Each tower turns a dict of raw feature columns into a unit-length vector:
concat(feature layers) -> Dense(2E, relu) -> Dense(E) -> L2 normalisation. The user tower
scores items by dot product (cosine, since both are unit length), and training uses TFRS's
in-batch softmax :class:`tfrs.tasks.Retrieval` with temperature and logQ correction.
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_recommenders as tfrs

from twotower_assets.model.features import FeatureConfig, FeatureSpec
from twotower_assets.model.layers import FeatureStats, build_feature_layer

SAMPLING_PROBABILITY_COLUMN = "item_sampling_probability"
"""Each training row carries its item's share of training rows, for the logQ correction."""


class Tower(tf.keras.Model):
    """Feature layers in config order, then the shared MLP head and L2 normalisation."""

    def __init__(
        self,
        features: dict[str, FeatureSpec],
        id_feature: str,
        stats: FeatureStats,
        config: FeatureConfig,
        embedding_size: int,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.feature_names = list(features)
        # Pretrained vectors are looked up by the tower's id; every other layer reads its column.
        self.input_keys = [
            id_feature if spec.type == "pretrained" else name for name, spec in features.items()
        ]
        self.feature_layers = [
            build_feature_layer(name, spec, stats, config) for name, spec in features.items()
        ]
        self.hidden = tf.keras.layers.Dense(2 * embedding_size, activation="relu")
        self.projection = tf.keras.layers.Dense(embedding_size)

    def call(self, inputs):
        parts = [layer(inputs[key]) for layer, key in zip(self.feature_layers, self.input_keys)]
        # Mixed precision: cast every part to the compute dtype before concatenating.
        parts = [tf.cast(part, self.compute_dtype) for part in parts]
        vectors = self.projection(self.hidden(tf.concat(parts, axis=1)))
        return tf.math.l2_normalize(tf.cast(vectors, tf.float32), axis=1)


class TwoTowerModel(tfrs.Model):
    """User and item towers trained with an in-batch softmax retrieval loss."""

    def __init__(
        self,
        config: FeatureConfig,
        stats: FeatureStats,
        embedding_size: int = 64,
        temperature: float = 0.05,
        remove_accidental_hits: bool = True,
    ):
        super().__init__()
        self.config = config
        self.user_tower = Tower(
            config.user_embedding_layers, config.user_id_feature, stats, config, embedding_size,
            name="user_tower",
        )
        self.item_tower = Tower(
            config.item_embedding_layers, config.item_id_feature, stats, config, embedding_size,
            name="item_tower",
        )
        self.remove_accidental_hits = remove_accidental_hits
        self.task = tfrs.tasks.Retrieval(
            # Mean over the batch, so loss values compare across batch sizes.
            loss=tf.keras.losses.CategoricalCrossentropy(
                from_logits=True, reduction=tf.keras.losses.Reduction.SUM_OVER_BATCH_SIZE
            ),
            temperature=temperature,
            remove_accidental_hits=remove_accidental_hits,
        )

    def call(self, features):
        return self.user_tower(features), self.item_tower(features)

    def compute_loss(self, features, training=False):
        user_vectors, item_vectors = self(features)
        return self.task(
            user_vectors,
            item_vectors,
            candidate_sampling_probability=features[SAMPLING_PROBABILITY_COLUMN],
            candidate_ids=features[self.config.item_id_feature] if self.remove_accidental_hits else None,
            compute_metrics=False,
        )
