"""tf.data input built from Arrow record batches, and the feature statistics of training.

The warehouse streams a split as Arrow batches; :func:`save_dataset` turns that stream into
a saved ``tf.data`` dataset (``tf.data.Dataset.save``) in one pass, while
:class:`FeatureStatsBuilder` collects what the input layers need (vocabularies, moments,
pretrained vectors) from the same batches. Training and embedding extraction then load the
saved datasets without touching the warehouse again.

Preprocessing (the production rule): null strings become ``"none"``, null numbers ``0``;
text values are cut to :data:`~twotower_assets.model.layers.TEXT_MAX_CHARS` characters. The
values themselves are validated in the warehouse before any of this runs
(``twotower_assets/defs/validation.py``).

Storage is in blocks of up to :data:`BLOCK_ROWS` rows (one saved element per block): tf.data
pays a fixed cost per element, so writing, reading and shuffling single examples ran at
~15k rows/s on 2 cores, well below what training consumes; blocks read at >1M rows/s.
:func:`load_dataset` still yields single examples; :func:`load_blocks` and
:func:`shuffled_batches` are the fast path that training uses.
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
from twotower_assets.model.layers import TEXT_MAX_CHARS, TEXT_MAX_TOKENS, FeatureStats, parse_vector
from twotower_assets.model.towers import SAMPLING_PROBABILITY_COLUMN

MISSING_STRING = "none"
BLOCK_ROWS = 1024
"""Rows per saved dataset element."""


def feature_kinds(config: FeatureConfig) -> dict[str, str]:
    """Column -> "string", "text", "history" or "number" for every column the towers read.

    String and id columns are strings, text columns strings cut to TEXT_MAX_CHARS
    characters, int features numbers. History columns are strings of space-separated item ids
    (the split computes them); a null is the empty history, not an id. Pretrained features are
    looked up by id, so their own column is read only to build the statistics.
    """
    kinds = {config.user_id_feature: "string", config.item_id_feature: "string"}
    for layers in (config.user_embedding_layers, config.item_embedding_layers):
        for name, spec in layers.items():
            if spec.type != "pretrained":
                kinds[name] = {"int": "number", "text": "text", "history": "history"}.get(spec.type, "string")
    return kinds


def _strings(column: pa.ChunkedArray | pa.Array, kind: str = "string") -> pa.ChunkedArray | pa.Array:
    """A string column with nulls filled; text cut to TEXT_MAX_CHARS characters (in Arrow).

    A history's null is ``""`` (no earlier items): ``"none"`` would read as an item id. Its
    length is bounded by the feature's N ids, so it is not cut.
    """
    if kind == "history":
        return pc.fill_null(column.cast(pa.string()), "")
    filled = pc.fill_null(column.cast(pa.string()), MISSING_STRING)
    return pc.utf8_slice_codeunits(filled, 0, TEXT_MAX_CHARS) if kind == "text" else filled


def _clean_column(column: pa.ChunkedArray | pa.Array, kind: str, name: str = "") -> np.ndarray:
    if kind == "number":
        if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
                or pa.types.is_boolean(column.type) or pa.types.is_decimal(column.type)):
            raise FeatureConfigError(f"numeric feature {name!r} has non-numeric type {column.type}")
        filled = pc.fill_null(column.cast(pa.float32()), 0.0)
        return filled.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return np.asarray(_strings(column, kind).to_numpy(zero_copy_only=False), dtype=object)


def batch_to_features(batch: pa.RecordBatch, kinds: dict[str, str]) -> dict[str, np.ndarray]:
    """One Arrow batch as a dict of numpy columns, nulls filled."""
    missing = [name for name in kinds if name not in batch.schema.names]
    if missing:
        raise FeatureConfigError(f"columns {missing} are missing from the input table")
    return {name: _clean_column(batch.column(name), kind, name) for name, kind in kinds.items()}


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
    """Write the batches as a saved tf.data dataset (blocks of rows); returns the row count.

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
                    features = batch_to_features(batch, kinds)
                    for start in range(0, batch.num_rows, BLOCK_ROWS):
                        yield {name: column[start : start + BLOCK_ROWS] for name, column in features.items()}
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            failure.append(exc)

    dataset = tf.data.Dataset.from_generator(generate, output_signature=_signature(kinds))
    partial = path.with_name(path.name + ".partial")
    _remove_tree(partial)
    dataset.save(str(partial))
    if failure:
        _remove_tree(partial)
        raise failure[0]
    _remove_tree(path)
    partial.rename(path)
    (path.parent / f"{path.name}.rows.json").write_text(json.dumps({"rows": rows}))
    return rows


def load_blocks(path: str | Path) -> tf.data.Dataset:
    """The saved dataset as written: each element a block of up to BLOCK_ROWS rows."""
    return tf.data.Dataset.load(str(path))


def load_dataset(path: str | Path) -> tf.data.Dataset:
    """The saved dataset as single examples."""
    blocks = load_blocks(path)
    return blocks.unbatch() if is_blocked(blocks) else blocks  # (older saves hold single examples)


def is_blocked(dataset: tf.data.Dataset) -> bool:
    """Whether the elements are blocks of rows (rank-1 columns) rather than single examples."""
    return next(iter(dataset.element_spec.values())).shape.rank == 1


def batches(dataset: tf.data.Dataset, batch_size: int, drop_remainder: bool = False) -> tf.data.Dataset:
    """Batches of ``batch_size`` rows from blocks or from single examples."""
    if is_blocked(dataset):
        return dataset.rebatch(batch_size, drop_remainder=drop_remainder)
    return dataset.batch(batch_size, drop_remainder=drop_remainder)


def shuffled_batches(blocks: tf.data.Dataset, batch_size: int, shuffle_rows: int, seed: int) -> tf.data.Dataset:
    """Endless training batches from saved blocks, shuffled with vectorised operations.

    Stands for ``unbatch().shuffle(shuffle_rows).repeat().batch(batch_size)`` at a fraction
    of the cost: the blocks go through a shuffle buffer of ~``shuffle_rows`` rows, then
    windows of ~``shuffle_rows`` rows are concatenated and their rows permuted with one
    gather per column, and the windows are cut into batches. The training query already
    stores rows in a fixed pseudo-random (md5) order, so a block is not one user's history.
    """
    window_blocks = max(1, -(-shuffle_rows // BLOCK_ROWS))

    def permute(window):
        columns = {name: values.flat_values for name, values in window.items()}
        order = tf.random.shuffle(tf.range(tf.shape(next(iter(columns.values())))[0]), seed=seed)
        return {name: tf.gather(values, order) for name, values in columns.items()}

    return (
        blocks.shuffle(window_blocks, seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .ragged_batch(window_blocks)
        .map(permute)
        .rebatch(batch_size, drop_remainder=True)
    )


def dataset_rows(path: str | Path) -> int:
    path = Path(path)
    return json.loads((path.parent / f"{path.name}.rows.json").read_text())["rows"]


def _remove_tree(path: Path) -> None:
    import shutil

    if path.exists():
        shutil.rmtree(path)


class _DistinctStrings:
    """The distinct values of a string column over many batches, kept as Arrow arrays.

    A Python set would hold every distinct value as a Python object while the stream is read
    (a million user ids); Arrow arrays are compact and deduplicated in bulk.
    """

    _MERGE_EVERY = 16

    def __init__(self):
        self._parts: list[pa.Array] = []

    def add(self, values: pa.Array | pa.ChunkedArray) -> None:
        self._parts.append(pc.unique(values))
        if len(self._parts) >= self._MERGE_EVERY:
            self._merge()

    def _merge(self) -> pa.Array:
        if not self._parts:
            return pa.array([], pa.string())
        merged = pc.unique(pa.chunked_array(self._parts, pa.string()))
        self._parts = [merged]
        return merged

    def sorted(self) -> list[str]:
        """Sorted by code point, as Python's ``sorted`` orders str (UTF-8 byte order)."""
        merged = self._merge()
        return merged.take(pc.sort_indices(merged)).to_pylist()


class FeatureStatsBuilder:
    """Accumulates vocabularies, moments, distinct texts and pretrained vectors over batches.

    History features collect nothing: their ids are looked up in the item id's vocabulary
    (the item tower's id embedding, shared).
    """

    def __init__(self, config: FeatureConfig):
        self.config = config
        layers = {**config.user_embedding_layers, **config.item_embedding_layers}
        self._vocab = {n: _DistinctStrings() for n, s in layers.items() if s.type == "string"}
        self._texts = {n: _DistinctStrings() for n, s in layers.items() if s.type == "text"}
        self._sums = {n: np.zeros(3) for n, s in layers.items() if s.type == "int"}
        self._pretrained: dict[str, dict[str, str | None]] = {}
        self._pretrained_key: dict[str, str] = {}
        self._pretrained_size: dict[str, int] = {}
        self.unusable_vectors: dict[str, int] = {}
        """Per pretrained feature, the ids whose vector is missing or unusable (zeros); set by build()."""
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
            seen.add(_strings(batch.column(name)))
        for name, seen in self._texts.items():
            seen.add(_strings(batch.column(name), "text"))
        for name, sums in self._sums.items():
            values = _clean_column(batch.column(name), "number", name).astype(np.float64)
            sums += (values.size, values.sum(), np.square(values).sum())
        for name, vectors in self._pretrained.items():
            # The first vector of each id: dedupe the batch in Arrow (in row order), then
            # only ids not seen before become Python objects (at most one per item).
            key = self._pretrained_key[name]
            pairs = pa.table(
                {"key": pc.fill_null(batch.column(key).cast(pa.string()), MISSING_STRING),
                 "text": batch.column(name).cast(pa.string())}
            )
            firsts = pairs.group_by("key", use_threads=False).aggregate([("text", "first")])
            for key_value, text in zip(firsts["key"].to_pylist(), firsts["text_first"].to_pylist()):
                vectors.setdefault(key_value, text)

    def build(self) -> FeatureStats:
        stats = FeatureStats()
        for name, seen in self._vocab.items():
            stats.vocabularies[name] = seen.sorted()
        for name, (count, total, total_sq) in self._sums.items():
            mean = total / count if count else 0.0
            variance = max(total_sq / count - mean * mean, 0.0) if count else 1.0
            stats.moments[name] = (float(mean), float(variance))
        for name, seen in self._texts.items():
            stats.text_vocabularies[name] = adapt_text_vocabulary(seen.sorted())
        for name, texts in self._pretrained.items():
            ids, vectors, unusable = parse_pretrained(name, texts, self._pretrained_size[name], self.config)
            stats.pretrained[name] = ids, vectors
            self.unusable_vectors[name] = unusable
        return stats


def adapt_text_vocabulary(values: list[str]) -> list[str]:
    """TextVectorization's vocabulary adapted on the distinct values of a text column."""
    layer = tf.keras.layers.TextVectorization(max_tokens=TEXT_MAX_TOKENS, output_mode="int")
    layer.adapt(tf.data.Dataset.from_tensor_slices(values or [MISSING_STRING]).batch(4096))
    # The first two entries are the padding and OOV tokens the layer adds again itself.
    return [str(token) for token in layer.get_vocabulary()[2:]]


def parse_pretrained(
    name: str, texts: dict[str, str | None], dim: int, config: FeatureConfig
) -> tuple[list[str], np.ndarray, int]:
    """Ids, their parsed vectors and how many are missing or unusable (not JSON, not ``dim``
    finite numbers: zeros). None usable at all is a config error naming the feature."""
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
    return ids, vectors, len(ids) - parsed
