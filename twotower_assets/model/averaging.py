"""Weight averaging: train with the raw weights, validate and keep their moving average.

Polyak averaging (Polyak and Juditsky 1992; as an exponential moving average, what Keras 3's
``use_ema`` optimizers and ``SwapEMAWeights`` do): the average of the last few hundred steps'
weights sits nearer the bottom of the loss than any one step's, which is where a small model
trained with a full softmax plateaus, hopping around it. On MovieLens, with the residual user
head, it lifts the one-vector-per-user model past EASE (configs/models/movielens-one-vector.yaml,
docs/benchmarks-movielens.md).

tf-keras' own ``use_ema`` writes the average into the model only when ``fit`` ends, after
EarlyStopping has restored its best (raw) weights, so it would replace the best epoch's weights
with the last epoch's average, and the validation loss that picks the best epoch would judge
raw weights. :class:`WeightAveraging` keeps the average itself
(:class:`tf.train.ExponentialMovingAverage`) and swaps it into the model whenever something
other than a training step looks at the weights.
"""

from __future__ import annotations

import tensorflow as tf


class WeightAveraging(tf.keras.callbacks.Callback):
    """An exponential moving average of the trainable weights, swapped in outside training steps.

    After every training step: ``average = d * average + (1 - d) * weights`` with
    ``d = min(momentum, (1 + t) / (10 + t))`` at the t-th update
    (:class:`tf.train.ExponentialMovingAverage` with ``num_updates``: the first steps are not
    held back by the initial weights). The average starts at the weights after the first step.

    The model holds the average during validation (so ``val_loss``, ReduceLROnPlateau and
    EarlyStopping judge it), at the end of every epoch (so EarlyStopping's best weights are
    averages) and when ``fit`` returns; it holds the raw weights while it trains. Put this
    callback before the others: they then see the average in ``on_epoch_end``.
    """

    def __init__(self, momentum: float):
        super().__init__()
        if not 0 < momentum < 1:
            raise ValueError(f"the averaging momentum must be in (0, 1), got {momentum}")
        self.momentum = momentum
        self._average: tf.train.ExponentialMovingAverage | None = None
        self._pairs: list[tuple[tf.Variable, tf.Variable]] = []
        self._averaged_in_model = False

    def on_train_batch_end(self, batch, logs=None):
        if self._average is None:
            self._start()
        self._update()

    def _start(self) -> None:
        """Create the average (the model's variables exist after its first step)."""
        variables = list(self.model.trainable_variables)
        with self.model.distribute_strategy.scope():
            self._updates = tf.Variable(0, dtype=tf.int64, trainable=False, name="averaging_updates")
            self._average = tf.train.ExponentialMovingAverage(self.momentum, num_updates=self._updates)
            self._average.apply(variables)  # creates the averages, equal to the weights
        self._pairs = [(variable, self._average.average(variable)) for variable in variables]
        self._update = tf.function(self._update_step)
        self._swap = tf.function(self._swap_values)

    def _update_step(self) -> None:
        self._updates.assign_add(1)
        self._average.apply([variable for variable, _ in self._pairs])

    def _swap_values(self) -> None:
        # Reads and writes of one variable run in program order inside a tf.function.
        for variable, average in self._pairs:
            weights = tf.identity(variable)
            variable.assign(average)
            average.assign(weights)

    def _put_average_in_model(self, wanted: bool) -> None:
        if self._average is not None and self._averaged_in_model != wanted:
            self._swap()
            self._averaged_in_model = wanted

    def on_epoch_begin(self, epoch, logs=None):
        self._put_average_in_model(False)

    def on_test_begin(self, logs=None):
        self._put_average_in_model(True)

    def on_test_end(self, logs=None):
        self._put_average_in_model(False)

    def on_epoch_end(self, epoch, logs=None):
        self._put_average_in_model(True)
