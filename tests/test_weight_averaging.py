"""Weight averaging (a recipe's optimizer.weight_averaging, model/averaging.py): the moving average is
recomputed by hand, and training, validation and the trained model are checked to use the
weights they should: training the raw ones, the rest the average."""

import numpy as np
import pydantic
import pytest
import tensorflow as tf

from twotower_assets.model.averaging import WeightAveraging
from twotower_assets.model.datasets import batches
from twotower_assets.model.recipes import ModelRecipe, Optimizer, Schedule, Towers
from twotower_assets.model.training import TrainingParams, train_two_tower


class WeightsAtEpochEnd(tf.keras.callbacks.Callback):
    """Records the model's weight when an epoch ends, as a callback after WeightAveraging sees it."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def on_epoch_end(self, epoch, logs=None):
        self.seen.append(float(self.model.get_weights()[0][0, 0]))


def test_the_average_is_the_hand_computed_one_and_training_keeps_the_raw_weights():
    # One weight w, loss (w - 1)^2 on x = y = 1, plain SGD at 0.1 from w = 0: each step is
    # w <- w - 0.1 * 2 (w - 1), so after t steps w_t = 1 - 0.8^t (training on the raw weights).
    model = tf.keras.Sequential([tf.keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros", input_shape=(1,))])
    model.compile(optimizer=tf.keras.optimizers.SGD(0.1), loss="mse")
    ones = np.ones((3, 1), np.float32)
    momentum = 0.5
    recorder = WeightsAtEpochEnd()
    history = model.fit(ones, ones, batch_size=1, epochs=2, shuffle=False, validation_data=(ones, ones),
                        callbacks=[WeightAveraging(momentum), recorder], verbose=0)

    raw = [1 - 0.8 ** t for t in range(7)]
    # The average starts at w_1; update t mixes in w_t with decay min(momentum, (1 + t) / (10 + t)).
    averages = {1: raw[1]}
    for t in range(2, 7):
        decay = min(momentum, (1 + t) / (10 + t))
        averages[t] = decay * averages[t - 1] + (1 - decay) * raw[t]
    # Epoch 2 trained from w_3, not from the average the model held when epoch 1 ended: its
    # training loss is the mean of the raw weights' losses before steps 4, 5 and 6.
    assert history.history["loss"] == pytest.approx(
        [np.mean([(raw[t] - 1) ** 2 for t in range(0, 3)]), np.mean([(raw[t] - 1) ** 2 for t in range(3, 6)])],
        rel=1e-5,
    )
    # Validation judged the average, and so did the callbacks after WeightAveraging.
    assert history.history["val_loss"] == pytest.approx([(averages[3] - 1) ** 2, (averages[6] - 1) ** 2], rel=1e-5)
    assert recorder.seen == pytest.approx([averages[3], averages[6]], rel=1e-5)
    # The model fit returns holds the average, not the last raw weight.
    assert model.get_weights()[0][0, 0] == pytest.approx(averages[6], rel=1e-5)
    assert abs(averages[6] - raw[6]) > 0.05


def test_a_short_run_averages_the_same_whatever_the_momentum_above_its_warm_up():
    # The decay of step t is min(momentum, (1 + t) / (10 + t)): below 0.995 for 1,790 steps, so a
    # run of 40 steps has one average for 0.995 and 0.999; 0.8 binds from step 35 and differs.
    def averaged(momentum):
        model = tf.keras.Sequential([tf.keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros",
                                                           input_shape=(1,))])
        model.compile(optimizer=tf.keras.optimizers.SGD(0.01), loss="mse")
        ones = np.ones((40, 1), np.float32)
        model.fit(ones, ones, batch_size=1, epochs=1, shuffle=False, callbacks=[WeightAveraging(momentum)], verbose=0)
        return float(model.get_weights()[0][0, 0])

    at_995 = averaged(0.995)
    assert averaged(0.999) == at_995
    assert averaged(0.8) != pytest.approx(at_995, rel=1e-4)


def test_early_stopping_restores_the_best_epochs_average():
    # Growing a weight away from its target: the loss rises every epoch, so EarlyStopping
    # (patience 0) stops after epoch 2 and restores epoch 1's weights, which are an average.
    model = tf.keras.Sequential([tf.keras.layers.Dense(1, use_bias=False, kernel_initializer="ones", input_shape=(1,))])
    model.compile(optimizer=tf.keras.optimizers.SGD(0.1), loss="mse")
    ones = np.ones((3, 1), np.float32)
    recorder = WeightsAtEpochEnd()
    stop = tf.keras.callbacks.EarlyStopping(monitor="val_loss", patience=0, restore_best_weights=True)
    history = model.fit(ones, ones * 5, batch_size=1, epochs=5, shuffle=False, validation_data=(ones, -ones),
                        callbacks=[WeightAveraging(0.9), recorder, stop], verbose=0)
    assert len(history.history["val_loss"]) == 2
    assert history.history["val_loss"][1] > history.history["val_loss"][0]
    assert model.get_weights()[0][0, 0] == pytest.approx(recorder.seen[0], rel=1e-6)


def test_the_momentum_must_be_between_zero_and_one():
    for momentum in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"averaging momentum must be in \(0, 1\)"):
            WeightAveraging(momentum)
    with pytest.raises(pydantic.ValidationError, match="weight_averaging"):
        TrainingParams(recipe=ModelRecipe(optimizer=Optimizer(weight_averaging=1.0)))
    assert TrainingParams().recipe.optimizer.weight_averaging == 0.0  # off unless asked for


def test_train_two_tower_trains_the_raw_weights_and_returns_the_average(tiny_training):
    config, stats, dataset, rows = tiny_training
    params = TrainingParams(recipe=ModelRecipe(towers=Towers(embedding_size=8), optimizer=Optimizer(learning_rate=0.05), schedule=Schedule(batch_size=64, epochs=3)), seed=5)
    validation = dataset.take(512)
    plain = train_two_tower(config, stats, dataset, rows, validation, params)
    averaged = train_two_tower(config, stats, dataset, rows, validation,
                               params.model_copy(update={"recipe": params.recipe.with_overrides({"optimizer": {"weight_averaging": 0.9}})}))
    # The same raw trajectory (same seed, and averaging never feeds back into training) ...
    assert averaged.history["loss"] == pytest.approx(plain.history["loss"], rel=1e-4)
    # ... but validation and the returned model are the average's.
    assert averaged.history["val_loss"] != pytest.approx(plain.history["val_loss"], rel=1e-4)
    returned = averaged.model.evaluate(batches(validation, 64), return_dict=True, verbose=0)["loss"]
    assert returned == pytest.approx(averaged.history["val_loss"][-1], rel=1e-4)
    assert not np.allclose(averaged.model.user_tower.get_weights()[0], plain.model.user_tower.get_weights()[0])
