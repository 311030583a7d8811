"""The MatchModel: the published scorer, a lookup of fixed user and item vectors.

After training, the tower outputs for every training user and item are frozen into two
lookup tables; the model scores a (user, item) pair as the dot product of their vectors.
An unknown id maps to a zero vector, so it scores 0, also inside a batch of known ids; user
and item batches of different lengths are an InvalidArgumentError that says so. It is a plain ``tf.Module`` saved as a
SavedModel, so a serving process loads it with TensorFlow alone::

    match_model = tf.saved_model.load(path)
    match_model([np.array(["u1"]), np.array(["i7"])])   # -> float32 scores, shape (1,)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from twotower_assets.model.layers import vocabulary_array

_IDS = tf.TensorSpec([None], tf.string)


class _IdEmbedding(tf.Module):
    """StringLookup(ids) -> frozen Embedding(len(ids) + 1, E) with row 0 (unknown) all zeros."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray, name: str):
        super().__init__(name=name)
        ids = np.asarray(ids).astype(str)
        if len(set(ids.tolist())) != len(ids):
            raise ValueError(f"{name}: ids are not unique")
        self.lookup = tf.keras.layers.StringLookup(vocabulary=vocabulary_array(ids), num_oov_indices=1)
        table = np.vstack([np.zeros((1, vectors.shape[1]), np.float32), vectors.astype(np.float32)])
        self.table = tf.Variable(table, trainable=False, name="embeddings")

    def __call__(self, ids: tf.Tensor) -> tf.Tensor:
        return tf.gather(self.table, self.lookup(ids))


class MatchModel(tf.Module):
    """Scores user-item pairs with frozen two-tower vectors."""

    def __init__(self, user_ids, user_vectors, item_ids, item_vectors):
        super().__init__(name="match_model")
        if user_vectors.shape[1] != item_vectors.shape[1]:
            raise ValueError("user and item vectors must have the same size")
        self.user_embedding = _IdEmbedding(user_ids, user_vectors, "user_embedding")
        self.item_embedding = _IdEmbedding(item_ids, item_vectors, "item_embedding")

    @tf.function(input_signature=[[_IDS, _IDS]])
    def __call__(self, inputs):
        user_ids, item_ids = inputs
        tf.debugging.assert_equal(
            tf.size(user_ids), tf.size(item_ids),
            message="MatchModel scores pairs: it needs the same number of user_id and item_id values",
        )
        return tf.reduce_sum(self.user_embedding(user_ids) * self.item_embedding(item_ids), axis=1)

    @tf.function(input_signature=[_IDS, _IDS])
    def serve(self, user_id, item_id):
        return {"score": self.__call__([user_id, item_id])}


def save_match_model(model: MatchModel, path: str | Path) -> None:
    tf.saved_model.save(model, str(path), signatures={"serving_default": model.serve})
