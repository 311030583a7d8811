"""Tower heads: the layers between a tower's concatenated features and its unit vector.

A tower is its features plus one head (:class:`~twotower_assets.model.towers.Tower`):

* ``mlp``: Dense(2E, relu) -> Dense(E), production's.
* ``dense_tanh``: one Dense(E, tanh), Mult-DAE's single hidden layer (Liang et al. 2018):
  over a pooled history it is the user vector of the autoencoder.
* ``dense_tanh_residual``: ``dense_tanh`` plus the pooled history itself as an identity
  shortcut (He et al. 2016). The history is pooled from the item tower's id embedding, so the
  user starts at the pooled vectors of the items it has and the Dense layer learns a
  correction; with an item head ``none`` the linear part is an item-to-item model, what EASE
  is made of.
* ``none``: the concatenated features are the vector (an item tower of one id embedding of
  size E: the item vectors are that table's rows, as Mult-DAE's output layer).

Every head exposes ``hidden`` and ``projection`` (None where it has no such layer), the Dense
layers a warm start copies (:mod:`twotower_assets.model.warm_start`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import tensorflow as tf

HeadName = Literal["mlp", "dense_tanh", "dense_tanh_residual", "none"]
HEAD_NAMES = get_args(HeadName)


class Head(tf.keras.layers.Layer):
    """Base head: ``call(vectors, parts)`` gets the concatenated features and the feature
    outputs they were made from (for a shortcut)."""

    head_name: str = ""

    def __init__(self, embedding_size: int, **kwargs):
        super().__init__(**kwargs)
        self.embedding_size = embedding_size
        self.hidden: tf.keras.layers.Dense | None = None
        self.projection: tf.keras.layers.Dense | None = None

    def get_config(self) -> dict:
        return {**super().get_config(), "embedding_size": self.embedding_size}


class MLPHead(Head):
    head_name = "mlp"

    def __init__(self, embedding_size: int, **kwargs):
        super().__init__(embedding_size, **kwargs)
        self.hidden = tf.keras.layers.Dense(2 * embedding_size, activation="relu")
        self.projection = tf.keras.layers.Dense(embedding_size)

    def call(self, vectors, parts=()):
        return self.projection(self.hidden(vectors))


class DenseTanhHead(Head):
    head_name = "dense_tanh"

    def __init__(self, embedding_size: int, **kwargs):
        super().__init__(embedding_size, **kwargs)
        self.projection = tf.keras.layers.Dense(embedding_size, activation="tanh")

    def call(self, vectors, parts=()):
        return self.projection(vectors)


class ResidualHead(DenseTanhHead):
    """``dense_tanh`` plus the feature outputs at ``shortcut_positions`` (the history features)."""

    head_name = "dense_tanh_residual"

    def __init__(self, embedding_size: int, shortcut_positions: Sequence[int] = (), **kwargs):
        super().__init__(embedding_size, **kwargs)
        self.shortcut_positions = tuple(shortcut_positions)

    def call(self, vectors, parts=()):
        vectors = self.projection(vectors)
        for position in self.shortcut_positions:
            vectors = vectors + parts[position]
        return vectors


class IdentityHead(Head):
    head_name = "none"

    def call(self, vectors, parts=()):
        if vectors.shape[-1] != self.embedding_size:
            raise ValueError(
                f"head 'none' uses the features as the vector, but they add up to "
                f"{vectors.shape[-1]} values, not embedding_size {self.embedding_size}"
            )
        return vectors


HEADS: dict[str, type[Head]] = {head.head_name: head for head in (MLPHead, DenseTanhHead, ResidualHead, IdentityHead)}
