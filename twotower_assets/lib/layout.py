"""Every asset key, warehouse table and artifact file of the graph, in one place.

Asset modules import names from here instead of from each other, so the code of an asset
never depends on the module of another asset: the data flows through the keys below, the
imports do not follow it.

* **Keys**: asset keys double as the unqualified warehouse table names (``warehouse.table_name``
  adds the dataset or schema).
* **Artifact files**: a file-based asset partition owns one directory of the
  :class:`~twotower_assets.lib.artifacts.ArtifactStore`; the classes below name the files in
  it, so a file name is written once.
* **ModelSummary**: what training records next to the model (the MLflow run, the user key,
  the history), read by evaluation and publishing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pydantic

from twotower_assets.warehouse import queries as warehouse_queries

# --------------------------------------------------------------------------- asset keys / tables

CLICK_EVENTS = "click_events"
TRAINING_EVENTS = "training_events"
VALIDATION_EVENTS = "validation_events"
TEST_EVENTS = "test_events"
SPLIT_TABLES = {"training": TRAINING_EVENTS, "validation": VALIDATION_EVENTS, "test": TEST_EVENTS}

TF_DATASETS = "tf_datasets"
TUNED_HYPERPARAMETERS = "tuned_hyperparameters"
TWO_TOWER_MODEL = "two_tower_model"
EVALUATION_METRICS = "evaluation_metrics"
MATCH_MODEL = "match_model"

USER_EMBEDDING_HISTORY = "two_tower_user_embedding_history"
ITEM_EMBEDDING_HISTORY = "two_tower_item_embedding_history"
USER_EMBEDDING_LATEST = "two_tower_user_embedding_latest"
ITEM_EMBEDDING_LATEST = "two_tower_item_embedding_latest"
RECOMMENDATIONS = "two_tower_recommendations"
RECOMMENDATIONS_LATEST = "two_tower_recommendations_latest"
SIMILAR_ITEMS = "two_tower_similar_items"
ITEM_ANN_INDEX = "item_ann_index"
TWO_TOWER_RETRIEVER = "two_tower_retriever"
MODEL_COMPARISON = "model_comparison"
"""What changed between a date's model and the champion before it (overlap, churn, drift)."""
CHAMPION = "champion"
"""The promotion step: moves the registry alias ``champion`` and the ``_latest`` tables to a date."""

LATEST_TABLES = {
    USER_EMBEDDING_HISTORY: USER_EMBEDDING_LATEST,
    ITEM_EMBEDDING_HISTORY: ITEM_EMBEDDING_LATEST,
    RECOMMENDATIONS: RECOMMENDATIONS_LATEST,
}
"""Table -> its ``_latest`` table: the champion run's rows, copied at promotion, what consumers read."""

EVALUATED_MODEL = "two_tower"
"""The trained model's name in the evaluation metrics table (beside random, popularity, svd)."""

EVALUATION_METRICS_PER_K = ("precision", "recall", "ndcg", "coverage", "novelty")
HEADLINE_METRICS = {"recall": 50, "ndcg": 10}
"""The evaluation's single numbers, logged to MLflow under plain keys (``recall_at_50``,
``popularity_ndcg_at_10``): recall@50, what the quality gate judges by default, and NDCG@10.
At a k the evaluation did not reach (a small catalogue), the largest evaluated k below it."""
MODEL_EVALUATION_METRIC = re.compile(rf"(?:{'|'.join(EVALUATION_METRICS_PER_K)})_at_\d+")
"""The MLflow names of the evaluated model's single numbers (``recall_at_50``); baselines' have a prefix."""


def evaluation_metric_key(model: str, metric: str, k: int | None = None) -> str:
    """The MLflow key of ``metric`` of ``model`` at ``k`` (``recall_at_50``, ``ease_recall_at_50``),
    or with ``k`` None of its curve over k (``recall_at_k``, ``ease_recall_at_k``: one point per
    evaluated k, MLflow's step = k). The evaluated model's keys have no prefix."""
    prefix = "" if model == EVALUATED_MODEL else f"{model}_"
    return f"{prefix}{metric}_at_{'k' if k is None else k}"


def largest_k_up_to(evaluated: Iterable[int], k: int) -> int | None:
    """The largest evaluated k not above ``k`` (evaluation caps ks at the catalogue size)."""
    below = sorted(int(x) for x in evaluated if int(x) <= k)
    return below[-1] if below else None

QUALITY_GATE = "quality_gate"
"""The blocking check on ``evaluation_metrics`` that decides whether a model is published."""

PARTITION_COLUMN = warehouse_queries.PARTITION_COLUMN
"""The column every partitioned table is partitioned by: the training date."""

# --------------------------------------------------------------------------- artifact files


@dataclass(frozen=True)
class DatasetFiles:
    """One training date's saved tf.data input (written by ``tf_datasets``)."""

    root: Path

    @property
    def training(self) -> Path:
        return self.root / "training"

    @property
    def validation(self) -> Path:
        return self.root / "validation"

    @property
    def users(self) -> Path:
        return self.root / "users"

    @property
    def items(self) -> Path:
        return self.root / "items"

    @property
    def seen_pairs(self) -> Path:
        """The distinct training (user key, item) pairs, so val_loss can leave them out."""
        return self.root / "seen_pairs.parquet"

    @property
    def feature_config(self) -> Path:
        return self.root / "feature_config.json"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"


class DatasetsManifest(pydantic.BaseModel):
    """What ``tf_datasets`` wrote: the feature config, the row counts, the partition, and the
    warehouse tables (with the columns read) each dataset came from."""

    config_name: str
    rows: dict[str, int]
    partition: str
    source_tables: dict[str, str] = {}
    columns: dict[str, str] = {}

    @classmethod
    def read(cls, path: Path) -> DatasetsManifest:
        return cls.model_validate_json(path.read_text())


class ModelSummary(pydantic.BaseModel):
    """What training records next to a model: the MLflow run it logged to and what it learnt."""

    mlflow_run_id: str
    mlflow_experiment_id: str
    mlflow_experiment_name: str
    mlflow_run_name: str
    config_name: str
    datasets_version: str = pydantic.Field(
        default="",
        description="The tf_datasets version trained on (lib/artifacts.py); '' for models saved before it was recorded.",
    )
    user_key: str = pydantic.Field(description="The user column the user vectors are keyed by.")
    epochs_run: int
    kept_epoch: int | None = pydantic.Field(
        default=None,
        description="The epoch (0-based) whose weights were kept (EarlyStopping's best); None for models saved before it was recorded.",
    )
    history: dict[str, list[float]]
    train_seconds: float
    examples_per_second: float
    device: str


@dataclass(frozen=True)
class ModelFiles:
    """One training date's trained model (written by ``two_tower_model``)."""

    root: Path

    @property
    def user_tower(self) -> Path:
        return self.root / "user_tower"

    @property
    def item_tower(self) -> Path:
        return self.root / "item_tower"

    @property
    def user_embeddings(self) -> Path:
        """Parquet: the user id columns and ``embedding`` for every training user."""
        return self.root / "user_embeddings.parquet"

    @property
    def item_embeddings(self) -> Path:
        """Parquet: ``item_id`` and ``embedding`` for every training item."""
        return self.root / "item_embeddings.parquet"

    @property
    def summary_file(self) -> Path:
        return self.root / "summary.json"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    def summary(self) -> ModelSummary:
        return ModelSummary.model_validate_json(self.summary_file.read_text())

    def user_vectors(self, user_key: str) -> tuple[np.ndarray, np.ndarray]:
        """Distinct values of ``user_key`` (sorted) and one vector each."""
        return keyed_vectors(self.user_embeddings, user_key)

    def item_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """Item ids (sorted) and one vector each."""
        return keyed_vectors(self.item_embeddings, "item_id")

    def write_summary(self, summary: ModelSummary) -> None:
        self.summary_file.write_text(summary.model_dump_json(indent=2))


# The vector column of every embeddings file (training's, the retriever's).
EMBEDDING_COLUMN = "embedding"


def embeddings_table(ids: dict[str, np.ndarray], vectors: np.ndarray) -> pa.Table:
    """An embeddings file's table: the id columns as strings, then one float32 vector per row."""
    columns = {name: pa.array(values, pa.string()) for name, values in ids.items()}
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel())
    columns[EMBEDDING_COLUMN] = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
    return pa.table(columns)


def keyed_vectors(path: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ids of ``key`` (sorted) and one vector each (the first row of each id)."""
    table = pq.read_table(path, columns=[key, EMBEDDING_COLUMN])
    ids = table[key].to_numpy(zero_copy_only=False).astype(str)
    vectors = np.stack(table[EMBEDDING_COLUMN].combine_chunks().flatten().to_numpy().reshape(len(ids), -1))
    unique_ids, first = np.unique(ids, return_index=True)
    return unique_ids, vectors[first]


@dataclass(frozen=True)
class EvaluationFiles:
    """One training date's evaluation (written by ``evaluation_metrics``)."""

    root: Path

    @property
    def metrics(self) -> Path:
        """CSV: model, segment, k, precision, recall, ndcg, coverage, novelty."""
        return self.root / "metrics.csv"

    @property
    def counts(self) -> Path:
        return self.root / "counts.json"

    def plot(self, name: str) -> Path:
        return self.root / f"{name}.png"

    def write_counts(self, counts: dict[str, int | str]) -> None:
        self.counts.write_text(json.dumps(counts))


class Registration(pydantic.BaseModel):
    """A registered MLflow model version written by an asset."""

    name: str
    version: str
    model_uri: str


@dataclass(frozen=True)
class MatchModelFiles:
    """One training date's MatchModel (written by ``match_model``)."""

    root: Path

    @property
    def saved_model(self) -> Path:
        """The SavedModel directory, loadable with TensorFlow alone."""
        return self.root / "model"

    @property
    def registration_file(self) -> Path:
        return self.root / "registration.json"

    def registration(self) -> Registration:
        return Registration.model_validate_json(self.registration_file.read_text())


@dataclass(frozen=True)
class ItemIndexFiles:
    """One training date's ANN index of the item vectors (written by ``item_ann_index``)."""

    root: Path

    @property
    def index(self) -> Path:
        """The LanceDB directory (when the index lives in the artifact store)."""
        return self.root / "lancedb"

    @property
    def remote_uri_file(self) -> Path:
        """Holds the index's URI when it lives elsewhere (``gs://...``)."""
        return self.root / "uri.txt"

    def uri(self) -> str:
        """Where the index is: the URI recorded, or the local LanceDB directory."""
        return self.remote_uri_file.read_text().strip() if self.remote_uri_file.is_file() else str(self.index)


@dataclass(frozen=True)
class RetrieverFiles:
    """One training date's retriever inputs and registration (written by ``two_tower_retriever``)."""

    root: Path

    @property
    def user_vectors(self) -> Path:
        """Parquet: ``user_id`` (the model's user key) and ``embedding``."""
        return self.root / "user_vectors.parquet"

    @property
    def seen_pairs(self) -> Path:
        """Parquet: ``user_id``, ``item_id`` of every training pair."""
        return self.root / "seen_pairs.parquet"

    @property
    def item_attributes(self) -> Path:
        """Parquet: ``item_id`` and the category columns the retrieval server filters on."""
        return self.root / "item_attributes.parquet"

    @property
    def registration_file(self) -> Path:
        return self.root / "registration.json"

    def registration(self) -> Registration:
        return Registration.model_validate_json(self.registration_file.read_text())
