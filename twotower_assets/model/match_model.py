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
        same_size = tf.debugging.assert_equal(
            tf.size(user_ids), tf.size(item_ids),
            message="MatchModel scores pairs: it needs the same number of user_id and item_id values",
        )
        # The check must run before the product: in a graph nothing else orders them, and a
        # product that ran first failed with a bare shape error instead of this message.
        with tf.control_dependencies([same_size]):
            user_ids = tf.identity(user_ids)
        return tf.reduce_sum(self.user_embedding(user_ids) * self.item_embedding(item_ids), axis=1)

    @tf.function(input_signature=[_IDS, _IDS])
    def serve(self, user_id, item_id):
        return {"score": self.__call__([user_id, item_id])}


def save_match_model(model: MatchModel, path: str | Path) -> None:
    tf.saved_model.save(model, str(path), signatures={"serving_default": model.serve})


class MatchModelProbeError(RuntimeError):
    """A saved MatchModel that does not load, or does not score as its vectors say."""


PROBE_PAIRS = 8


def probe_match_model(path: str | Path, user_ids, user_vectors, item_ids, item_vectors) -> None:
    """Load the SavedModel at ``path`` and score a few pairs, right after saving, before publishing.

    The first :data:`PROBE_PAIRS` (user, item) pairs must score the dot product of their
    vectors, and an unknown pair 0. A truncated or corrupted SavedModel fails here, naming the
    path, instead of being registered and only failing when serving loads it.
    """
    n = min(PROBE_PAIRS, len(user_ids), len(item_ids))
    users = np.asarray(user_ids).astype(str)[:n]
    items = np.asarray(item_ids).astype(str)[:n]
    expected = np.sum(np.asarray(user_vectors, np.float32)[:n] * np.asarray(item_vectors, np.float32)[:n], axis=1)
    unknown = "\x00probe-unknown"
    try:
        loaded = tf.saved_model.load(str(path))
        scores = loaded.signatures["serving_default"](
            user_id=tf.constant([*users, unknown]), item_id=tf.constant([*items, unknown])
        )["score"].numpy()
    except Exception as exc:  # any load or call failure means the files are unusable
        raise MatchModelProbeError(
            f"MatchModel at {path} does not load or score: {type(exc).__name__}: {str(exc)[:300]}"
        ) from exc
    if not np.allclose(scores[:n], expected, rtol=1e-4, atol=1e-5) or scores[n] != 0:
        raise MatchModelProbeError(
            f"MatchModel at {path} scores {scores[:n].tolist()} (unknown pair: {scores[n]}) for "
            f"{list(zip(users.tolist(), items.tolist()))}, but its vectors give {expected.tolist()} (and 0)"
        )
