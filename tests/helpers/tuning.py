"""A hand-made tuning objective with a known best point, for tests of the search."""

import time
from types import SimpleNamespace

import numpy as np

SEARCH = {
    "search": {
        "optimizer.learning_rate": {"low": 0.001, "high": 1.0, "log": True},
        "task.temperature": {"low": 0.01, "high": 1.0, "log": True},
        "schedule.batch_size": {"choices": [64, 128, 256]},
    }
}


def hand_made_score(recipe, epoch: int) -> float:
    """Peaks at learning rate 0.03, temperature 0.1, batch 128, rising over 5 epochs and
    falling by 5% of the peak an epoch after it (a model that overfits)."""
    distance = (np.log10(recipe.optimizer.learning_rate) - np.log10(0.03)) ** 2 + (
        np.log10(recipe.task.temperature) - np.log10(0.1)
    ) ** 2
    shape = min(epoch, 5) / 5 * (1 - 0.05 * max(0, epoch - 5))
    return float(np.exp(-distance) * (1.0 if recipe.schedule.batch_size == 128 else 0.8) * shape)


class _Model:
    """What EpochRanking needs of a Keras model: somewhere to say stop."""

    stop_training = False


def hand_made_train(epochs: int = 10, batches_per_epoch: int = 0, batch_seconds: float = 0.0,
                    kept_epoch=None):
    """A 'training' that runs the callbacks' epochs, each scored by hand_made_score (the
    objective the search must maximise, in place of a trained model's recall).

    With ``batches_per_epoch``, each epoch first runs that many batches of ``batch_seconds``
    each through the batch hook; the returned function's ``batches_run`` lists them.
    ``kept_epoch(recipe)``: the 0-based epoch the 'training' says it kept (its result's
    ``kept_epoch``, as ``train_two_tower``'s); None returns no result."""

    def train(recipe, ranking):
        model = _Model()
        ranking.set_model(model)
        for epoch in range(epochs):
            for batch in range(batches_per_epoch):
                time.sleep(batch_seconds)
                train.batches_run.append((epoch, batch))
                ranking.on_train_batch_end(batch, {})
                if model.stop_training:
                    break
            ranking.evaluator = lambda _, e=epoch + 1: {"recall": hand_made_score(recipe, e)}
            ranking.on_epoch_end(epoch, {})
            if model.stop_training:
                break
        return None if kept_epoch is None else SimpleNamespace(kept_epoch=kept_epoch(recipe))

    train.batches_run = []
    return train
