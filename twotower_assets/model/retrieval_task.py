"""TFRS's retrieval task with its softmax computed in one XLA-compiled function.

:class:`tfrs.tasks.Retrieval` builds the in-batch softmax from separate TensorFlow ops, each a
pass over the (batch x candidates) logits: a dense ``eye`` of labels, the division by the
temperature, the logQ correction, the accidental-hit mask (``argmax`` of the labels, an
equality, a cast, a subtraction, a multiply-add), the score mask, and a categorical
cross-entropy that reads the dense labels again; the gradient makes as many passes back. At
production size (4,096 x 4,096 logits, 67 MB) those passes, not the matrix products, are most
of a training step on a CPU (docs/benchmarks-training.md).

:class:`Retrieval` is the same task with the same arguments and the same per-row loss,
computed as each row's log-sum-exp over its negatives and its positive: the logits are made
once (one matrix product), scaled, corrected and masked in one fused XLA pass and reduced in
the same pass, and XLA compiles the gradient the same way. It is checked against
``tfrs.tasks.Retrieval`` value for value and gradient for gradient (tests/test_retrieval_task.py).

The loss per row ``i`` (candidate ``i`` is row ``i``'s positive; extra candidates after the
batch's, as mixed negatives add, are negatives of every row)::

    s_ij   = q_i . c_j / temperature - log(clip(p_j, 1e-6, 1))      (p: sampling probability)
    loss_i = logsumexp({s_ii} + {s_ij : j != i, id_j != id_i, mask_ij}) - s_ii

which is what TFRS computes: it gives a removed or masked logit the smallest float, whose
exponent is 0.
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_recommenders as tfrs

_SMALLEST = tf.float32.min


def integer_ids(ids: tf.Tensor) -> tf.Tensor:
    """Candidate ids as int64 fingerprints, for the accidental-hit mask.

    The mask compares every pair of candidates in the batch (4096 x 4096 at production size),
    which on strings costs far more than the rest of the softmax, and XLA compares integers
    only. Two different ids collide with probability ~2^-63 per pair, and a collision only
    drops one negative from one row's softmax.
    """
    if ids.dtype != tf.string:
        return ids
    return tf.strings.to_hash_bucket_fast(ids, tf.int64.max)


@tf.function(jit_compile=True, reduce_retracing=True)
def softmax_losses(queries, candidates, inverse_temperature, log_probability=None, candidate_ids=None, score_mask=None):
    """Each query row's cross-entropy of its own candidate (same row) among all candidates.

    ``log_probability`` (candidates,): the logQ correction's log sampling probability;
    ``candidate_ids`` (candidates,): integer ids, equal ids are accidental hits, not negatives;
    ``score_mask`` (queries, candidates) bool: False scores are left out (its diagonal is ignored:
    a positive always counts).
    """
    rows = tf.shape(queries)[0]
    logits = tf.matmul(queries, candidates, transpose_b=True) * inverse_temperature
    positives = tf.reduce_sum(queries * candidates[:rows], axis=1) * inverse_temperature
    if log_probability is not None:
        logits -= log_probability[tf.newaxis, :]
        positives -= log_probability[:rows]
    if candidate_ids is not None:
        # Every candidate with the row's own item id: the positive itself and its accidental hits.
        excluded = tf.equal(candidate_ids[:rows, tf.newaxis], candidate_ids[tf.newaxis, :])
    else:
        excluded = tf.equal(tf.range(rows)[:, tf.newaxis], tf.range(tf.shape(candidates)[0])[tf.newaxis, :])
    if score_mask is not None:
        excluded |= ~score_mask
    negatives = tf.reduce_logsumexp(tf.where(excluded, _SMALLEST, logits), axis=1)
    return tf.reduce_logsumexp(tf.stack([positives, negatives], axis=1), axis=1) - positives


class Retrieval(tfrs.tasks.Retrieval):
    """``tfrs.tasks.Retrieval`` returning each row's loss from :func:`softmax_losses`.

    The loss is the task's softmax cross-entropy, one value per row (the model averages them,
    :meth:`TwoTowerModel.compute_loss`). Calls this class does not fuse (sample weights,
    metrics, hard-negative mining, multi-vector queries) go to TFRS's own implementation.
    """

    def __init__(self, temperature: float, remove_accidental_hits: bool = False):
        super().__init__(
            loss=tf.keras.losses.CategoricalCrossentropy(from_logits=True, reduction=tf.keras.losses.Reduction.NONE),
            temperature=temperature,
            remove_accidental_hits=remove_accidental_hits,
        )

    def call(
        self,
        query_embeddings,
        candidate_embeddings,
        sample_weight=None,
        candidate_sampling_probability=None,
        candidate_ids=None,
        compute_metrics=True,
        compute_batch_metrics=True,
        score_mask=None,
    ):
        if candidate_ids is not None:
            candidate_ids = integer_ids(tf.convert_to_tensor(candidate_ids))
        fused = sample_weight is None and not compute_metrics and query_embeddings.shape.rank == 2
        if not fused:
            return super().call(
                query_embeddings, candidate_embeddings, sample_weight=sample_weight,
                candidate_sampling_probability=candidate_sampling_probability, candidate_ids=candidate_ids,
                compute_metrics=compute_metrics, compute_batch_metrics=compute_batch_metrics, score_mask=score_mask,
            )
        if self._remove_accidental_hits and candidate_ids is None:
            raise ValueError("When accidental hit removal is enabled, candidate ids must be supplied.")
        log_probability = None
        if candidate_sampling_probability is not None:
            # TFRS's SamplingProbablityCorrection clips the same way.
            log_probability = tf.math.log(tf.clip_by_value(tf.cast(candidate_sampling_probability, tf.float32), 1e-6, 1.0))
        ids = candidate_ids if self._remove_accidental_hits else None
        temperature = self._temperature if self._temperature is not None else 1.0
        return softmax_losses(
            tf.cast(query_embeddings, tf.float32), tf.cast(candidate_embeddings, tf.float32),
            tf.constant(1.0 / temperature, tf.float32), log_probability, ids, score_mask,
        )
