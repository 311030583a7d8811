"""The fused retrieval task gives TFRS's per-row loss and gradients, case by case."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_recommenders as tfrs

from twotower_assets.model.retrieval_task import Retrieval, softmax_losses


def tfrs_task(temperature: float, remove_accidental_hits: bool) -> tfrs.tasks.Retrieval:
    return tfrs.tasks.Retrieval(
        loss=tf.keras.losses.CategoricalCrossentropy(from_logits=True, reduction=tf.keras.losses.Reduction.NONE),
        temperature=temperature, remove_accidental_hits=remove_accidental_hits,
    )


def losses_and_gradients(task, queries, candidates, **kwargs):
    q, c = tf.Variable(queries), tf.Variable(candidates)
    with tf.GradientTape() as tape:
        losses = task(q, c, compute_metrics=False, **kwargs)
        total = tf.reduce_sum(losses * tf.range(1, tf.shape(losses)[0] + 1, dtype=tf.float32))  # rows weighted apart
    gq, gc = tape.gradient(total, [q, c])
    return losses.numpy(), gq.numpy(), gc.numpy()


def data(rows=12, extra=0, dim=5, seed=0):
    rng = np.random.default_rng(seed)
    queries = rng.standard_normal((rows, dim)).astype(np.float32)
    candidates = rng.standard_normal((rows + extra, dim)).astype(np.float32)
    ids = rng.integers(0, 4, rows + extra).astype(np.int64)  # 4 ids over 12+ rows: many accidental hits
    probability = rng.uniform(1e-7, 0.5, rows + extra).astype(np.float32)  # some below TFRS's 1e-6 clip
    mask = rng.uniform(size=(rows, rows + extra)) > 0.3
    return queries, candidates, ids, probability, mask


@pytest.mark.parametrize("hits", [True, False])
@pytest.mark.parametrize("probability", [True, False])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("extra", [0, 7])
def test_the_fused_task_gives_tfrs_losses_and_gradients(hits, probability, masked, extra):
    queries, candidates, ids, p, mask = data(extra=extra)
    kwargs = {}
    if probability:
        kwargs["candidate_sampling_probability"] = p
    if hits:
        kwargs["candidate_ids"] = ids
    if masked:
        kwargs["score_mask"] = mask | np.eye(*mask.shape, dtype=bool)  # the product's masks keep positives
    expected = losses_and_gradients(tfrs_task(0.07, hits), queries, candidates, **kwargs)
    fused = losses_and_gradients(Retrieval(0.07, hits), queries, candidates, **kwargs)
    for name, want, got in zip(("losses", "query gradients", "candidate gradients"), expected, fused):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=name)


def test_the_loss_by_hand():
    # Two rows, three candidates (the third an extra negative), temperature 0.5, no correction.
    queries = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    candidates = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, -1.0]], np.float32)
    # Scores / 0.5: row 0: [2, 2, 0]; row 1: [0, 2, -2].
    losses = softmax_losses(queries, candidates, tf.constant(2.0)).numpy()
    expected = [np.log(np.exp(2) + np.exp(2) + 1) - 2, np.log(1 + np.exp(2) + np.exp(-2)) - 2]
    np.testing.assert_allclose(losses, expected, rtol=1e-6)
    # Rows 0 and 1 have the same item id: each is an accidental hit for the other, not a negative.
    ids = tf.constant([7, 7, 3], tf.int64)
    losses = softmax_losses(queries, candidates, tf.constant(2.0), candidate_ids=ids).numpy()
    np.testing.assert_allclose(losses, [np.log(np.exp(2) + 1) - 2, np.log(np.exp(2) + np.exp(-2)) - 2], rtol=1e-5)


def test_string_ids_are_compared_as_fingerprints():
    queries, candidates, ids, p, _ = data()
    strings = np.array([f"item-{i}" for i in ids], dtype=object)
    expected = losses_and_gradients(tfrs_task(0.1, True), queries, candidates, candidate_ids=strings)
    fused = losses_and_gradients(Retrieval(0.1, True), queries, candidates, candidate_ids=strings)
    np.testing.assert_allclose(fused[0], expected[0], rtol=2e-5, atol=2e-5)


def test_calls_it_does_not_fuse_are_tfrs_own():
    queries, candidates, ids, p, _ = data()
    weights = np.linspace(0.5, 2.0, len(queries)).astype(np.float32)
    expected = tfrs_task(0.1, True)(queries, candidates, sample_weight=weights, candidate_ids=ids, compute_metrics=False)
    got = Retrieval(0.1, True)(queries, candidates, sample_weight=weights, candidate_ids=ids, compute_metrics=False)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="candidate ids must be supplied"):
        Retrieval(0.1, True)(queries, candidates, compute_metrics=False)
