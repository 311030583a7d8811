"""The two towers and the retrieval model that trains them.

Each tower turns a dict of raw feature columns into a unit-length vector: concat(feature
layers) -> head (:mod:`twotower_assets.model.heads`) -> L2 normalisation. The user tower
scores items by dot product (cosine, since both are unit length). The loss is TFRS's
retrieval task with temperature and logQ correction, over the negatives a strategy chooses
(:mod:`twotower_assets.model.negatives`: in-batch, the full catalogue, or mixed).

Opt-in (``item_bias``): a learned score per item beside the cosine (the output layer bias of
Mult-DAE, Liang et al. 2018). It travels inside the vectors, so serving stays one dot product:
the item tower appends its item's bias and the user tower a constant 1, and both towers return
``embedding_size + 1`` values (the first ``embedding_size`` unit length). Unit vectors alone
must spend directions on popularity; on MovieLens the bias adds about 3 points of NDCG@10
(docs/benchmarks-movielens.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import tensorflow as tf
import tensorflow_recommenders as tfrs

from twotower_assets.model.features import FeatureConfig, FeatureSpec
from twotower_assets.model.heads import HEAD_NAMES, HEADS, ResidualHead
from twotower_assets.model.layers import (
    FeatureStats,
    HistoryFeature,
    StringFeature,
    build_feature_layer,
    vocabulary_array,
)

from twotower_assets.model.negatives import (
    SAMPLING_PROBABILITY_COLUMN,
    InBatchNegatives,
    Negatives,
)

MIXED_POLICY = "mixed_bfloat16"
"""bfloat16, not float16, on GPUs too: it keeps float32's exponent range and so needs no loss
scaling, which TFRS's train_step (it computes and applies the gradients itself) does not do."""


@contextlib.contextmanager
def _global_policy(name: str) -> Iterator[None]:
    """Keras layers take the global dtype policy when they are created: set it for the layers
    built inside, then put the previous one back (so it cannot leak into later models)."""
    previous = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        tf.keras.mixed_precision.set_global_policy(previous)


class Tower(tf.keras.Model):
    """Feature layers in config order, then the head (:mod:`twotower_assets.model.heads`) and L2 normalisation."""

    def __init__(
        self,
        features: dict[str, FeatureSpec],
        id_feature: str,
        stats: FeatureStats,
        config: FeatureConfig,
        embedding_size: int,
        item_id_layer: tf.keras.layers.Layer | None = None,
        score_bias: str | None = None,
        head: str = "mlp",
        **kwargs,
    ):
        """``item_id_layer``: the item tower's id layer, shared by the user tower's history features.

        ``score_bias``: ``"item"`` appends a learned scalar per id (looked up by ``id_feature``)
        to the unit vector, ``"user"`` appends a constant 1, so the dot product of the two adds
        the item's bias to the cosine (see ``item_bias`` in the module docstring).

        ``head``: one of :data:`~twotower_assets.model.heads.HEAD_NAMES`; with ``none`` the features must add up to
        ``embedding_size`` values (checked when the tower is first called); with
        ``dense_tanh_residual`` the tower needs a history feature of ``embedding_size`` values."""
        super().__init__(**kwargs)
        if head not in HEAD_NAMES:
            raise ValueError(f"unknown tower head {head!r}: one of {', '.join(HEAD_NAMES)}")
        self.head = head
        if score_bias not in (None, "item", "user"):
            raise ValueError(f"score_bias must be None, 'item' or 'user', not {score_bias!r}")
        self.score_bias = score_bias
        self.id_feature = id_feature
        # A scalar per item id: an id embedding of size 1 (its own lookup, so the id layer's
        # table and a history feature sharing it are untouched).
        self.bias = (
            StringFeature(stats.vocabularies[id_feature], 1, name=f"{id_feature}_score_bias")
            if score_bias == "item" else None
        )
        self.feature_names = list(features)
        # Pretrained vectors are looked up by the tower's id; every other layer reads its column.
        self.input_keys = [
            id_feature if spec.type == "pretrained" else name for name, spec in features.items()
        ]
        self.feature_layers = [
            build_feature_layer(name, spec, stats, config, item_id_layer) for name, spec in features.items()
        ]
        history_positions = tuple(i for i, spec in enumerate(features.values()) if spec.type == "history")
        if head == "dense_tanh_residual":
            if not history_positions:
                raise ValueError(
                    f"head 'dense_tanh_residual' adds the pooled history to the vector, but the tower has "
                    f"no history feature (features: {', '.join(features) or 'none'})"
                )
            for name, spec in features.items():
                if spec.type == "history" and spec.embedding_size != embedding_size:
                    raise ValueError(
                        f"head 'dense_tanh_residual' adds history feature {name!r} to the vector: its "
                        f"embedding_size {spec.embedding_size} must be embedding_size {embedding_size}"
                    )
            self.head_layer = ResidualHead(embedding_size, shortcut_positions=history_positions, name=f"{self.name}_head")
        else:
            self.head_layer = HEADS[head](embedding_size, name=f"{self.name}_head")
        self.embedding_size = embedding_size

    @property
    def hidden(self) -> tf.keras.layers.Dense | None:
        """The head's first Dense layer of two (``mlp``), None for other heads."""
        return self.head_layer.hidden

    @property
    def projection(self) -> tf.keras.layers.Dense | None:
        """The head's Dense layer to ``embedding_size``, None for head ``none``."""
        return self.head_layer.projection

    def get_config(self) -> dict:
        """What describes the tower, for Keras' saving: its features and vector size.

        The vocabularies and statistics live in the weights and the SavedModel restores the
        traced tower, so a tower is never rebuilt from this config (no ``from_config``). Without
        it Keras warns on every save that the constructor's FeatureStats cannot be serialised.
        """
        return {"name": self.name, "feature_names": self.feature_names, "input_keys": self.input_keys,
                "embedding_size": self.embedding_size, "score_bias": self.score_bias, "head": self.head}

    def call(self, inputs):
        parts = [layer(inputs[key]) for layer, key in zip(self.feature_layers, self.input_keys)]
        # Mixed precision: cast every part to the compute dtype before concatenating.
        parts = [tf.cast(part, self.compute_dtype) for part in parts]
        vectors = tf.concat(parts, axis=1)
        vectors = self.head_layer(vectors, parts)
        vectors = tf.math.l2_normalize(tf.cast(vectors, tf.float32), axis=1)
        if self.score_bias == "item":
            vectors = tf.concat([vectors, tf.cast(self.bias(inputs[self.id_feature]), tf.float32)], axis=1)
        elif self.score_bias == "user":
            vectors = tf.concat([vectors, tf.ones_like(vectors[:, :1])], axis=1)
        return vectors


class TwoTowerModel(tfrs.Model):
    """User and item towers trained with TFRS's retrieval task over a negatives strategy.

    ``negatives``: where each row's negatives come from (:mod:`twotower_assets.model.negatives`);
    strategies that need every item's features (``needs_catalog``) take them as ``catalog``.
    ``mixed_precision``: the towers' layers compute in bfloat16 (:data:`MIXED_POLICY`) and
    return float32 vectors; the retrieval task, and the layers TFRS creates inside it at call
    time, stay float32 (its labels and logits must share a dtype, and the softmax is where
    precision matters).
    """

    def __init__(
        self,
        config: FeatureConfig,
        stats: FeatureStats,
        embedding_size: int = 64,
        temperature: float = 0.05,
        negatives: Negatives | None = None,
        catalog: Mapping[str, np.ndarray] | None = None,
        seen_pairs: tuple[np.ndarray, np.ndarray] | None = None,
        mixed_precision: bool = False,
        item_bias: bool = False,
        user_head: str = "mlp",
        item_head: str = "mlp",
    ):
        super().__init__()
        self.negatives = negatives if negatives is not None else InBatchNegatives()
        if self.negatives.needs_catalog and catalog is None:
            raise ValueError(
                f"negatives {self.negatives.kind!r} score the catalogue's items: pass catalog (every item's features)"
            )
        self.config = config
        self.temperature = temperature
        # Only the towers are built under the mixed policy; the task below is created under
        # the caller's (float32) policy, so no layer's policy has to be changed afterwards.
        with _global_policy(MIXED_POLICY) if mixed_precision else contextlib.nullcontext():
            # The item tower first: the user tower's history features share its id layer.
            item_tower = Tower(
                config.item_embedding_layers, config.item_id_feature, stats, config, embedding_size,
                score_bias="item" if item_bias else None, head=item_head, name="item_tower",
            )
            item_id_layer = item_tower.feature_layers[item_tower.feature_names.index(config.item_id_feature)]
            self.user_tower = Tower(
                config.user_embedding_layers, config.user_id_feature, stats, config, embedding_size,
                item_id_layer=item_id_layer, score_bias="user" if item_bias else None, head=user_head,
                name="user_tower",
            )
            self.item_tower = item_tower
        self.task = self.negatives.build_task(temperature)
        self.catalog = None
        if catalog is not None and self.negatives.needs_catalog:
            self._set_catalog(catalog, stats)
        self.seen = None
        if seen_pairs is not None:
            self._set_seen_pairs(*seen_pairs, stats)

    def _set_seen_pairs(self, user_keys, item_ids, stats: FeatureStats) -> None:
        """Training (user key, item) pairs, which validation does not count as negatives.

        Validation rows are, by the split rules, pairs the user never had in training, and
        the offline evaluation removes each user's training items before ranking. Without
        the same rule in val_loss, a model that learns users' histories is punished for
        ranking their own past items high, val_loss rises from the first epoch on and
        EarlyStopping restores an untrained-looking model (docs/decisions.md).

        ``user_keys`` and ``item_ids`` are string arrays (Arrow or numpy); the pairs become
        int64 keys with Arrow, so millions of pairs never turn into Python strings.
        """
        users = stats.vocabularies[self.config.user_id_feature]
        items = stats.vocabularies[self.config.item_id_feature]
        self.seen_user_index = tf.keras.layers.StringLookup(vocabulary=vocabulary_array(users), num_oov_indices=1)
        self.seen_item_index = tf.keras.layers.StringLookup(vocabulary=vocabulary_array(items), num_oov_indices=1)
        self.seen_stride = tf.constant(len(items) + 1, tf.int64)
        keys = _lookup_index(user_keys, users) * (len(items) + 1) + _lookup_index(item_ids, items)
        keys = np.unique(keys)
        self.seen = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(keys, np.ones(len(keys), np.int32)), default_value=0
        )

    def _set_catalog(self, catalog: Mapping[str, np.ndarray], stats: FeatureStats) -> None:
        """Every item's feature columns (as :func:`batch_to_features` gives them), one row each."""
        id_feature = self.config.item_id_feature
        # The item tower's inputs (pretrained features are looked up by the id column).
        columns = list(dict.fromkeys(self.item_tower.input_keys))
        missing = [c for c in columns if c not in catalog]
        if missing:
            raise ValueError(f"catalog has no column {missing}")
        ids = [i.decode("utf-8") if isinstance(i, bytes) else str(i) for i in np.asarray(catalog[id_feature]).tolist()]
        if len(set(ids)) != len(ids):
            raise ValueError("catalog lists an item id twice")
        unknown = sorted(set(stats.vocabularies.get(id_feature, [])) - set(ids))
        if unknown:
            raise ValueError(f"{len(unknown)} training items are not in the catalog (first: {unknown[0]!r})")
        self.catalog = {name: tf.constant(catalog[name]) for name in columns}
        # Label of a training row: its item's row in the catalogue (num_oov_indices=0: rows 0..n-1).
        self.catalog_row = tf.keras.layers.StringLookup(vocabulary=vocabulary_array(ids), num_oov_indices=0)
        # History ids may name items outside the catalogue: row + 1, 0 for those.
        self.catalog_row_or_unknown = tf.keras.layers.StringLookup(
            vocabulary=vocabulary_array(ids), num_oov_indices=1
        )
        self.history_keys = [
            key for layer, key in zip(self.user_tower.feature_layers, self.user_tower.input_keys)
            if isinstance(layer, HistoryFeature)
        ]

    def call(self, features):
        return self.user_tower(features), self.item_tower(features)

    def compute_loss(self, features, training=False):
        """The mean loss over the global batch (the whole batch on one device).

        Under a distribution strategy each replica sees a slice of the batch and Keras sums
        the replicas' losses and gradients; :func:`tf.nn.compute_average_loss` divides each
        replica's sum by the global batch size, so those sums are the global-batch mean.
        """
        return tf.nn.compute_average_loss(self.negatives.losses(self, features, training))

    def unseen_pairs(self, features):
        """(batch, batch) bool, False where row i's user had row j's item in training; the
        positives (the diagonal) always count. The task gives the False scores its own
        minimum logit, as it does for accidental hits."""
        user_index = self.seen_user_index(features[self.config.user_id_feature])
        item_index = self.seen_item_index(features[self.config.item_id_feature])
        pair_keys = user_index[:, tf.newaxis] * self.seen_stride + item_index[tf.newaxis, :]
        seen = self.seen.lookup(pair_keys) > 0
        positives = tf.eye(tf.shape(seen)[0], dtype=tf.bool)
        return ~seen | positives

    def history_catalog_rows(self, features, shape):
        """(batch, catalogue) bool: True where the item is named in the row's history features
        (every listed id, whether or not dropout or the length cut hid it from the tower)."""
        pairs = []
        for key in self.history_keys:
            ids = tf.strings.split(tf.reshape(features[key], (-1,)))
            rows = tf.cast(self.catalog_row_or_unknown(ids.flat_values), tf.int64)
            pairs.append(tf.stack([ids.value_rowids(), rows], axis=1))
        pairs = tf.concat(pairs, axis=0)
        # Column 0 counts the ids outside the catalogue; it is dropped.
        counts_shape = tf.cast(tf.stack([shape[0], shape[1] + 1]), tf.int64)
        counts = tf.scatter_nd(pairs, tf.ones_like(pairs[:, 0], tf.float32), counts_shape)
        return counts[:, 1:] > 0


def _lookup_index(values, vocabulary: list[str]) -> np.ndarray:
    """What ``StringLookup(vocabulary, num_oov_indices=1)`` returns: position + 1, 0 if unknown."""
    values = values if isinstance(values, pa.ChunkedArray | pa.Array) else pa.array(values, pa.string())
    positions = pc.index_in(values.cast(pa.string()), value_set=pa.array(vocabulary, pa.string()))
    return pc.fill_null(pc.add(positions, 1), 0).to_numpy(zero_copy_only=False).astype(np.int64)
