"""The user tower at request time: a vector for a click made a minute ago, or a user the
training never saw, from the request's own features and recent items.

The retriever version carries the user tower the training saved (a SavedModel) and its feature
config. A request with ``recent_item_ids`` (newest first) and/or ``user_features`` (the user
tower's input columns) gets its vector from the tower, with the batch pipeline's own
preprocessing (:func:`twotower_assets.model.datasets.batch_to_features`): each history feature
is the known recent ids joined by spaces and cut to the feature's length, a column the request
leaves out is what a null is in the batch (``"none"`` for strings, 0 for numbers, ``""`` for a
history), and the user id, when given, is the id feature. Recent ids not in the catalogue are
ignored and named in the answer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa


class UserEncoder:
    """One version's user tower and the columns it reads."""

    def __init__(self, tower_dir: str | Path, feature_config_path: str | Path, catalogue: set[str]):
        import tensorflow as tf

        from twotower_assets.model.datasets import batch_to_features, feature_kinds
        from twotower_assets.model.features import FeatureConfig

        self._to_features = batch_to_features  # imported here: TensorFlow only for versions with a tower
        self.config = FeatureConfig.model_validate_json(Path(feature_config_path).read_text())
        kinds = feature_kinds(self.config)
        self.kinds = {name: kinds[name] for name in self.config.user_columns if name in kinds}
        self.history_lengths = {name: spec.history_length for name, spec in self.config.history_features.items()}
        self.catalogue = catalogue
        tower = tf.keras.models.load_model(str(tower_dir), compile=False)
        # The saved tower was traced on training batches: its serving signature takes every
        # column of those (item columns too, which the user tower ignores), so the others are
        # given as empty strings and zeros.
        self._serving = tower.signatures["serving_default"]
        self._inputs = dict(self._serving.structured_input_signature[1])
        self._tf = tf

    @property
    def feature_names(self) -> list[str]:
        """The ``user_features`` a request may give (the id comes from ``user_id``)."""
        return [name for name in self.kinds if name != self.config.user_id_feature and name not in self.history_lengths]

    def check(self, user_features: Any, recent_item_ids: Any) -> str | None:
        """What is wrong with a request's features and recent items, or None."""
        if user_features is not None:
            if not isinstance(user_features, dict):
                return f"user_features must be an object of feature values, got {type(user_features).__name__}"
            unknown = sorted(set(user_features) - set(self.feature_names))
            if unknown:
                return f"user_features has no feature {unknown}; the user tower reads {self.feature_names}"
            for name, value in user_features.items():
                number = self.kinds[name] == "number"
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float) if number else str)):
                    return f"user_features.{name} must be {'a number' if number else 'a string'}, got {value!r}"
        if recent_item_ids is not None and (
            not isinstance(recent_item_ids, list) or any(not isinstance(i, str) for i in recent_item_ids)
        ):
            return "recent_item_ids must be a list of item id strings, newest first"
        return None

    def vector(self, user_id: str | None, user_features: dict | None, recent_item_ids: list[str] | None
               ) -> tuple[np.ndarray, list[str]]:
        """(the user's unit vector, the recent ids ignored as unknown)."""
        recent = list(recent_item_ids or [])
        known = [item for item in recent if item in self.catalogue]
        values: dict[str, Any] = dict(user_features or {})
        values[self.config.user_id_feature] = user_id
        for name, length in self.history_lengths.items():
            values[name] = " ".join(known[:length])
        columns = {
            name: pa.array([values.get(name)], pa.float64() if kind == "number" else pa.string())
            for name, kind in self.kinds.items()
        }
        features = self._to_features(pa.record_batch(columns), self.kinds)
        tf = self._tf
        inputs = {
            name: tf.constant(features[name], spec.dtype) if name in features
            else tf.constant([""] if spec.dtype == tf.string else [0], spec.dtype)
            for name, spec in self._inputs.items()
        }
        [output] = self._serving(**inputs).values()
        vector = output.numpy()[0].astype(np.float32)
        return vector, [item for item in recent if item not in self.catalogue]
