"""Where a training row's negatives come from: strategies that build TFRS's retrieval task.

Each strategy is a small pydantic model (it is also the ``task.negatives`` section of a model
recipe, :mod:`twotower_assets.model.recipes`) that knows which catalogue it needs and computes
each row's loss for :class:`~twotower_assets.model.towers.TwoTowerModel`:

* :class:`InBatchNegatives`: the other items of the batch (TFRS's ``Retrieval`` task, with
  the logQ correction for their sampling probability and accidental hits removed). The
  production default.
* :class:`FullCatalogNegatives`: an exact softmax over every item of a small catalogue (the
  items in a row's history features are left out, its positive excepted: the user already has
  them, and the evaluation removes a user's items before ranking). Affordable for thousands of
  items (MovieLens: 1,682), not for production's 200,000.
* :class:`MixedNegatives`: the batch's items plus ``sampled`` items drawn uniformly from the
  catalogue at each step (mixed negative sampling, Yang et al. 2020), so rarely clicked items
  are negatives too, not only the popular ones a batch holds; the extra candidates go through
  the same TFRS task.

Validation always scores a row against the batch (the full catalogue for
:class:`FullCatalogNegatives`) with each user's training items left out, as the offline
evaluation does: a random draw would make val_loss noisy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, ClassVar, Literal

import pydantic
import tensorflow as tf
import tensorflow_recommenders as tfrs
from pydantic import Field

from twotower_assets.model.retrieval_task import Retrieval

if TYPE_CHECKING:
    from twotower_assets.model.towers import TwoTowerModel

SAMPLING_PROBABILITY_COLUMN = "item_sampling_probability"
"""Each training row carries its item's share of training rows, for the logQ correction."""


class _Strategy(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    needs_catalog: ClassVar[bool] = False
    """Whether training needs every item's features (the model's ``catalog``)."""

    def build_task(self, temperature: float) -> tfrs.tasks.Retrieval:
        """TFRS's retrieval task with its softmax fused (:mod:`twotower_assets.model.retrieval_task`),
        one loss per row: the model averages them over the global batch
        (:meth:`TwoTowerModel.compute_loss`), which the Keras reductions cannot do under a
        distribution strategy."""
        return Retrieval(temperature=temperature, remove_accidental_hits=getattr(self, "remove_accidental_hits", False))

    def losses(self, model: TwoTowerModel, features, training: bool):
        """Each row's loss; by default the in-batch softmax (training items masked in validation)."""
        return in_batch_losses(model, features, mask_seen_pairs=not training and model.seen is not None, training=training)


class InBatchNegatives(_Strategy):
    """The batch's other items are a row's negatives (TFRS's in-batch softmax with logQ correction)."""

    kind: Literal["in_batch"] = "in_batch"
    remove_accidental_hits: bool = Field(
        default=True, description="Other rows of the batch with the positive's own item are not negatives."
    )


class FullCatalogNegatives(_Strategy):
    """Every catalogue item is a negative: an exact softmax (small catalogues only)."""

    kind: Literal["full_catalog"] = "full_catalog"
    needs_catalog: ClassVar[bool] = True

    def losses(self, model: TwoTowerModel, features, training: bool):
        return catalog_losses(model, features, training)


class MixedNegatives(_Strategy):
    """The batch's items plus ``sampled`` uniform catalogue items (Yang et al. 2020)."""

    kind: Literal["mixed"] = "mixed"
    sampled: int = Field(gt=0, description="Catalogue items drawn uniformly per step beside the batch's own.")
    remove_accidental_hits: bool = Field(
        default=True, description="Candidates with the positive's own item id are not negatives."
    )
    needs_catalog: ClassVar[bool] = True

    def losses(self, model: TwoTowerModel, features, training: bool, sampled_rows=None):
        """Training: each row's cross-entropy of its item among the batch's items and the sampled ones.

        TFRS's task subtracts the log of each candidate's expected count among the step's
        candidates (the sampled-softmax correction), per source: a batch item ``batch_size * p``
        (p: its share of training rows), a uniform item ``sampled / catalogue size``; the extra
        candidates are columns after the batch's, which the task's labels (``eye(batch,
        candidates)``) make negatives. ``sampled_rows``: catalogue rows to use instead of a
        random draw (tests).
        """
        if not training:
            return super().losses(model, features, training)
        user_vectors, item_vectors = model(features, training=training)
        catalog_size = tf.shape(model.catalog[model.config.item_id_feature])[0]
        if sampled_rows is None:
            sampled_rows = tf.random.uniform([self.sampled], 0, catalog_size, dtype=tf.int32)
        sampled = {name: tf.gather(column, sampled_rows) for name, column in model.catalog.items()}
        sampled_vectors = model.item_tower(sampled, training=training)
        batch_size = tf.cast(tf.shape(user_vectors)[0], tf.float32)
        in_batch_share = batch_size * tf.cast(features[SAMPLING_PROBABILITY_COLUMN], tf.float32)
        uniform_share = tf.cast(tf.size(sampled_rows), tf.float32) / tf.cast(catalog_size, tf.float32)
        expected_counts = tf.concat([in_batch_share, tf.fill(tf.shape(sampled_rows), uniform_share)], axis=0)
        id_feature = model.config.item_id_feature
        return model.task(
            user_vectors,
            tf.concat([item_vectors, sampled_vectors], axis=0),
            # TFRS clips probabilities to [1e-6, 1]; an expected count can exceed 1, so all are
            # divided by the largest (a shift of every logit by one constant: same softmax).
            candidate_sampling_probability=expected_counts / tf.reduce_max(expected_counts),
            candidate_ids=tf.concat([features[id_feature], sampled[id_feature]], axis=0)
            if self.remove_accidental_hits else None,
            compute_metrics=False,
        )


Negatives = Annotated[InBatchNegatives | FullCatalogNegatives | MixedNegatives, Field(discriminator="kind")]
"""One negatives strategy, chosen by its ``kind``."""


def in_batch_losses(model: TwoTowerModel, features, mask_seen_pairs: bool, training=False):
    """Each row's loss in the task's in-batch softmax (temperature, logQ correction,
    accidental hits), optionally with the batch's seen (user, item) pairs left out.
    ``training`` reaches the towers' layers (a history feature's dropout)."""
    user_vectors, item_vectors = model(features, training=training)
    remove_hits = getattr(model.negatives, "remove_accidental_hits", False)
    return model.task(
        user_vectors,
        item_vectors,
        candidate_sampling_probability=features[SAMPLING_PROBABILITY_COLUMN],
        candidate_ids=features[model.config.item_id_feature] if remove_hits else None,
        compute_metrics=False,
        score_mask=model.unseen_pairs(features) if mask_seen_pairs else None,
    )


def catalog_losses(model: TwoTowerModel, features, training=False):
    """Each row's cross-entropy of its item among all catalogue items (exact softmax)."""
    user_vectors = model.user_tower(features, training=training)
    item_vectors = model.item_tower(model.catalog, training=training)
    logits = tf.matmul(user_vectors, item_vectors, transpose_b=True) / model.temperature
    labels = model.catalog_row(features[model.config.item_id_feature])
    if model.history_keys:
        in_history = model.history_catalog_rows(features, tf.shape(logits)) & ~tf.cast(
            tf.one_hot(labels, tf.shape(logits)[1]), tf.bool
        )
        logits = tf.where(in_history, tf.fill(tf.shape(logits), -1e9), logits)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
