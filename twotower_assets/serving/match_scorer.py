"""The MatchModel as an MLflow model: a pyfunc around the SavedModel, registered ``two_tower_match``.

The SavedModel (:mod:`twotower_assets.model.match_model`) is logged unchanged as the pyfunc
artifact ``saved_model`` (stored under its directory name, ``artifacts/model``), so it still
loads with TensorFlow alone (``tf.saved_model.load(<downloaded model>/artifacts/model)``); the
pyfunc scores a table of
``user_id, item_id`` pairs with it and answers one ``score`` per pair (0 for an unknown id).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, DataType, Schema

from twotower_assets.serving.registry import log_registered_pyfunc, requirements

REGISTERED_MODEL_NAME = "two_tower_match"
LOGGED_MODEL_NAME = "match_model"
SAVED_MODEL = "saved_model"
DESCRIPTION = (
    "The MatchModel of the two-tower retrieval model (TensorFlow Recommenders): the user and item "
    "vectors of one training date, frozen, scored by dot product. One version per training date, "
    "logged by the twotower-assets Dagster graph.\n\n"
    "Input: a table of `user_id` and `item_id` (strings). Output: one `score` per row, the dot "
    "product of the two vectors (0 for an id the model does not know). The TensorFlow SavedModel "
    "inside (`artifacts/model`) loads with TensorFlow alone.\n\n"
    "The alias `champion` names the version consumers read; only the graph's quality gate moves it "
    "(a version tagged `gate=passed`), or the `rollback_champion` job. Each version's model page "
    "carries its evaluation (`recall_at_50`, `ndcg_at_10`)."
)
"""The registered model's description in the registry."""

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.string, "user_id"), ColSpec(DataType.string, "item_id")]),
    outputs=Schema([ColSpec(DataType.float, "score")]),
)

MODEL_ENTRY_CODE = """\
import mlflow

from twotower_assets.serving.match_scorer import MatchModelScorer

mlflow.models.set_model(MatchModelScorer())
"""


class MatchModelScorer(mlflow.pyfunc.PythonModel):
    """Scores (user_id, item_id) pairs with the MatchModel SavedModel."""

    def load_context(self, context) -> None:
        import tensorflow as tf

        self.match_model = tf.saved_model.load(context.artifacts[SAVED_MODEL])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        missing = [c for c in ("user_id", "item_id") if c not in model_input.columns]
        if missing:
            raise MlflowException(f"the pairs have no column {missing}", error_code=INVALID_PARAMETER_VALUE)
        users = model_input["user_id"].astype(str).to_numpy()
        items = model_input["item_id"].astype(str).to_numpy()
        scores = self.match_model([users, items]).numpy().astype(np.float32)
        return pd.DataFrame({"score": scores})


def log_match_model(
    client: MlflowClient,
    run_id: str,
    saved_model: Path,
    example_pair: tuple[str, str],
    *,
    registered_model_name: str = REGISTERED_MODEL_NAME,
    tags: Mapping[str, Any] | None = None,
) -> tuple[str, str]:
    """Log the MatchModel into its training run and register a version; (model URI, version)."""
    return log_registered_pyfunc(
        client,
        run_id,
        name=LOGGED_MODEL_NAME,
        entry_code=MODEL_ENTRY_CODE,
        artifacts={SAVED_MODEL: str(saved_model)},
        signature=SIGNATURE,
        input_example=pd.DataFrame({"user_id": [example_pair[0]], "item_id": [example_pair[1]]}),
        registered_model_name=registered_model_name,
        pip_requirements=requirements("mlflow", "tensorflow", "tf-keras", "pandas", "numpy"),
        tags=tags,
        description=DESCRIPTION,
    )
