"""Adam that updates only the embedding rows a batch touched (lazy Adam).

Keras 2's Adam (``tf.keras.optimizers.Adam`` in tf-keras 2.21, the v2.11+ optimizer) decays
both moment slots of an embedding table densely on every step, even when the gradient is an
``IndexedSlices`` naming a few thousand rows: three full passes over a 1M x 64 table per step.
:class:`LazyAdam` keeps TensorFlow Addons' ``LazyAdam`` semantics instead:

* sparse gradients (``IndexedSlices``, what an ``Embedding`` lookup produces): ``m`` and ``v``
  are decayed and updated at the touched rows only, the variable moves at those rows only,
  and the bias correction uses the optimizer's global step (``iterations + 1``)::

      m[i] = beta_1 * m[i] + (1 - beta_1) * g[i]
      v[i] = beta_2 * v[i] + (1 - beta_2) * g[i]**2
      w[i] -= lr * sqrt(1 - beta_2**t) / (1 - beta_1**t) * m[i] / (sqrt(v[i]) + epsilon)

  A row's moments are therefore not decayed on the steps that do not touch it (the
  difference from Adam, and why it is cheap).
* dense gradients: exactly the stock Adam update (``super().update_step``).

Duplicate indices: the base optimizer's ``apply_gradients`` sums the values of repeated
indices (``Optimizer._deduplicate_sparse_grad``) before any ``update_step`` runs, on one
device and under a distribution strategy alike (after the cross-replica all-reduce), so each
row is updated once with its summed gradient.

XLA: on a GPU the base optimizer runs every update in ``tf.function(jit_compile=True)``. An
``IndexedSlices`` gradient has as many rows as the batch has distinct ids, a different shape
on nearly every step, and XLA would compile again for each; sparse updates therefore run as
ordinary TensorFlow ops (gather / scatter kernels), dense ones stay compiled.
"""

from __future__ import annotations

import tensorflow as tf


@tf.keras.utils.register_keras_serializable(package="twotower_assets")
class LazyAdam(tf.keras.optimizers.Adam):
    """Adam whose sparse (embedding) updates touch only the rows in the batch; see the module."""

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False,
                 name="LazyAdam", **kwargs):
        if amsgrad:
            # As TensorFlow Addons' LazyAdam: v_hat would need its own lazy rule.
            raise ValueError("LazyAdam does not support amsgrad")
        super().__init__(
            learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon, amsgrad=False,
            name=name, **kwargs,
        )

    def update_step(self, gradient, variable):
        if not isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable)
        dtype = variable.dtype
        lr = tf.cast(self.learning_rate, dtype)
        local_step = tf.cast(self.iterations + 1, dtype)
        beta_1 = tf.cast(self.beta_1, dtype)
        beta_2 = tf.cast(self.beta_2, dtype)
        beta_1_power = tf.pow(beta_1, local_step)
        beta_2_power = tf.pow(beta_2, local_step)
        alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        epsilon = tf.cast(self.epsilon, dtype)
        if self.adaptive_epsilon:
            epsilon = epsilon * tf.sqrt(1 - beta_2_power)

        key = self._index_dict[self._var_key(variable)]
        m, v = self._momentums[key], self._velocities[key]
        indices = gradient.indices
        values = tf.cast(gradient.values, dtype)
        m_rows = beta_1 * tf.gather(m, indices) + (1 - beta_1) * values
        v_rows = beta_2 * tf.gather(v, indices) + (1 - beta_2) * tf.square(values)
        m.scatter_update(tf.IndexedSlices(m_rows, indices))
        v.scatter_update(tf.IndexedSlices(v_rows, indices))
        variable.scatter_sub(tf.IndexedSlices(alpha * m_rows / (tf.sqrt(v_rows) + epsilon), indices))

    def _update_step_xla(self, gradient, variable, key):
        # Sparse updates outside XLA (their shape changes every step: see the module).
        if isinstance(gradient, tf.IndexedSlices):
            return self._update_step(gradient, variable)
        return super()._update_step_xla(gradient, variable, key)


OPTIMIZERS = ("lazy_adam", "adam", "adagrad")


def make_optimizer(name: str, learning_rate: float) -> tf.keras.optimizers.Optimizer:
    """The optimizer a run config names: ``lazy_adam`` (:class:`LazyAdam`), ``adam`` (stock Keras
    Adam) or ``adagrad`` (stock Keras Adagrad, what TFRS's tutorials compile with)."""
    if name == "lazy_adam":
        return LazyAdam(learning_rate=learning_rate)
    if name == "adam":
        return tf.keras.optimizers.Adam(learning_rate=learning_rate)
    if name == "adagrad":
        return tf.keras.optimizers.Adagrad(learning_rate=learning_rate)
    raise ValueError(f"unknown optimizer {name!r}: one of {', '.join(OPTIMIZERS)}")
