"""tf.data input built from Arrow record batches, and the feature statistics of training.

The warehouse streams a split as Arrow batches; :func:`save_dataset` turns that stream into
a saved ``tf.data`` dataset (``tf.data.Dataset.save``) in one pass, while
:class:`FeatureStatsBuilder` collects what the input layers need (vocabularies, moments,
pretrained vectors) from the same batches. Training and embedding extraction then load the
saved datasets without touching the warehouse again.

Preprocessing (the production rule): null strings become ``"none"``, null numbers ``0``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import tensorflow as tf

from twotower_assets.model.features import FeatureConfig, FeatureConfigError
from twotower_assets.model.layers import TEXT_MAX_TOKENS, FeatureStats, parse_vector
from twotower_assets.model.towers import SAMPLING_PROBABILITY_COLUMN

MISSING_STRING = "none"


def feature_kinds(config: FeatureConfig) -> dict[str, str]:
    """Column -> "string" or "number" for every column the towers read.

    Text, string and id columns are strings; int features are numbers. Pretrained features
    are looked up by id, so their own column is read only to build the statistics.
    """
    kinds = {config.user_id_feature: "string", config.item_id_feature: "string"}
    for layers in (config.user_embedding_layers, config.item_embedding_layers):
        for name, spec in layers.items():
            if spec.type != "pretrained":
                kinds[name] = "number" if spec.type == "int" else "string"
    return kinds


def _clean_column(column: pa.ChunkedArray | pa.Array, kind: str) -> np.ndarray:
    if kind == "number":
        if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
                or pa.types.is_boolean(column.type)):
            raise FeatureConfigError(f"numeric feature has non-numeric type {column.type}")
        filled = pc.fill_null(column.cast(pa.float32()), 0.0)
        return filled.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    filled = pc.fill_null(column.cast(pa.string()), MISSING_STRING)
    return np.asarray(filled.to_numpy(zero_copy_only=False), dtype=object)


def batch_to_features(batch: pa.RecordBatch, kinds: dict[str, str]) -> dict[str, np.ndarray]:
    """One Arrow batch as a dict of numpy columns, nulls filled."""
    missing = [name for name in kinds if name not in batch.schema.names]
    if missing:
        raise FeatureConfigError(f"columns {missing} are missing from the input table")
    return {name: _clean_column(batch.column(name), kind) for name, kind in kinds.items()}


def _signature(kinds: dict[str, str]) -> dict[str, tf.TensorSpec]:
    return {
        name: tf.TensorSpec([None], tf.float32 if kind == "number" else tf.string)
        for name, kind in kinds.items()
    }


def save_dataset(
    batches: Iterable[pa.RecordBatch],
    kinds: dict[str, str],
    path: str | Path,
    on_batch: Callable[[pa.RecordBatch], None] | None = None,
) -> int:
    """Write the batches as a saved tf.data dataset of single examples; returns the row count.

    ``on_batch`` sees every raw Arrow batch on the way (for statistics), so the source is read
    once. The dataset is written to a temporary directory and renamed into place, so an
    interrupted write never leaves a half dataset where a reader expects a whole one.
    """
    path = Path(path)
    rows = 0
    failure: list[BaseException] = []

    def generate() -> Iterator[dict[str, np.ndarray]]:
        nonlocal rows
        # An exception raised inside a tf.data generator can hang Dataset.save; end the
        # stream instead and re-raise the original error once save has returned.
        try:
            for batch in batches:
                if on_batch is not None:
                    on_batch(batch)
                rows += batch.num_rows
                if batch.num_rows:
                    yield batch_to_features(batch, kinds)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            failure.append(exc)

    dataset = tf.data.Dataset.from_generator(generate, output_signature=_signature(kinds))
    partial = path.with_name(path.name + ".partial")
    _remove_tree(partial)
    dataset.unbatch().save(str(partial))
    if failure:
        _remove_tree(partial)
        raise failure[0]
    _remove_tree(path)
    partial.rename(path)
    (path.parent / f"{path.name}.rows.json").write_text(json.dumps({"rows": rows}))
    return rows


def load_dataset(path: str | Path) -> tf.data.Dataset:
    return tf.data.Dataset.load(str(path))


def dataset_rows(path: str | Path) -> int:
    path = Path(path)
    return json.loads((path.parent / f"{path.name}.rows.json").read_text())["rows"]


def _remove_tree(path: Path) -> None:
    import shutil

    if path.exists():
        shutil.rmtree(path)


class FeatureStatsBuilder:
    """Accumulates vocabularies, moments, distinct texts and pretrained vectors over batches."""

    def __init__(self, config: FeatureConfig):
        self.config = config
        layers = {**config.user_embedding_layers, **config.item_embedding_layers}
        self._vocab = {n: set() for n, s in layers.items() if s.type == "string"}
        self._texts = {n: set() for n, s in layers.items() if s.type == "text"}
        self._sums = {n: np.zeros(3) for n, s in layers.items() if s.type == "int"}
        self._pretrained: dict[str, dict[str, str | None]] = {}
        self._pretrained_key: dict[str, str] = {}
        self._pretrained_size: dict[str, int] = {}
        for tower_layers, key in (
            (config.user_embedding_layers, config.user_id_feature),
            (config.item_embedding_layers, config.item_id_feature),
        ):
            for name, spec in tower_layers.items():
                if spec.type == "pretrained":
                    self._pretrained[name] = {}
                    self._pretrained_key[name] = key
                    self._pretrained_size[name] = spec.embedding_size

    def update(self, batch: pa.RecordBatch) -> None:
        for name, seen in self._vocab.items():
            values = pc.fill_null(batch.column(name).cast(pa.string()), MISSING_STRING)
            seen.update(pc.unique(values).to_pylist())
        for name, seen in self._texts.items():
            values = pc.fill_null(batch.column(name).cast(pa.string()), MISSING_STRING)
            seen.update(pc.unique(values).to_pylist())
        for name, sums in self._sums.items():
            values = _clean_column(batch.column(name), "number").astype(np.float64)
            sums += (values.size, values.sum(), np.square(values).sum())
        for name, vectors in self._pretrained.items():
            ids = batch.column(self._pretrained_key[name]).to_pylist()
            texts = batch.column(name).to_pylist()
            for key, text in zip(ids, texts):
                vectors.setdefault(key, text)

    def build(self) -> FeatureStats:
        stats = FeatureStats()
        for name, seen in self._vocab.items():
            stats.vocabularies[name] = sorted(seen)
        for name, (count, total, total_sq) in self._sums.items():
            mean = total / count if count else 0.0
            variance = max(total_sq / count - mean * mean, 0.0) if count else 1.0
            stats.moments[name] = (float(mean), float(variance))
        for name, seen in self._texts.items():
            stats.text_vocabularies[name] = adapt_text_vocabulary(sorted(seen))
        for name, texts in self._pretrained.items():
            stats.pretrained[name] = pretrained_table(
                name, texts, self._pretrained_size[name], self.config
            )
        return stats


def adapt_text_vocabulary(values: list[str]) -> list[str]:
    """TextVectorization's vocabulary adapted on the distinct values of a text column."""
    layer = tf.keras.layers.TextVectorization(max_tokens=TEXT_MAX_TOKENS, output_mode="int")
    layer.adapt(tf.data.Dataset.from_tensor_slices(values or [MISSING_STRING]).batch(4096))
    # The first two entries are the padding and OOV tokens the layer adds again itself.
    return [str(token) for token in layer.get_vocabulary()[2:]]


def pretrained_table(
    name: str, texts: dict[str, str | None], dim: int, config: FeatureConfig
) -> tuple[list[str], np.ndarray]:
    """Ids and their parsed vectors; unparsable or missing vectors become zeros."""
    ids = sorted(texts)
    vectors = np.zeros((len(ids), dim), dtype=np.float32)
    parsed = 0
    for row, key in enumerate(ids):
        vector = parse_vector(texts[key], dim)
        if vector is not None:
            vectors[row] = vector
            parsed += 1
    if ids and parsed == 0:
        raise FeatureConfigError(
            f"config {config.name!r}: no value of pretrained feature {name!r} is a JSON list "
            f"of {dim} numbers (its embedding_size)"
        )
    return ids, vectors
