"""Warm start: initialise a new date's towers from an earlier trained model.

Most users and items carry over from one weekly training to the next, but their vocabularies
change: ids appear, ids drop out, and a StringLookup's row of an id is its position in that
date's sorted vocabulary, so the old and the new embedding tables cannot be copied row for
row. :func:`map_rows` maps a table by value: the row of every value in both vocabularies is
copied, a new value keeps the fresh (randomly initialised) row the new model was built with,
a dropped value's row is left behind. The reserved rows before the vocabulary (the OOV row of
a StringLookup; padding and OOV of a TextVectorization) are copied too: what the old model
learnt for "unknown" is still its best guess.

:func:`warm_start` applies that to every embedding layer of both towers: id features, other
string features (categories), and text token tables, each by its own vocabulary; numeric
features' Dense layers and the towers' MLP head are copied when their shapes match (a changed
feature config changes the head's input width, and then the head starts fresh). Pretrained
vectors are not trained and come from the new date's data. The optimiser is not copied: the
new model is compiled with a fresh one, so Adam's moments restart.

The source towers can be live :class:`~twotower_assets.model.towers.Tower` objects or the
SavedModels a training wrote (:func:`load_towers`): Keras revives their feature layers with
the same names and attributes (``lookup``, ``vectorize``, ``embedding``, ``dense``).
No Dagster here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf

from twotower_assets.model.layers import (
    HistoryFeature,
    NumericFeature,
    PretrainedFeature,
    StringFeature,
    TextFeature,
)

@dataclass(frozen=True)
class RowMapping:
    """How one embedding table was carried over: values copied, fresh, and left behind."""

    carried: int
    new: int
    dropped: int

    @property
    def new_share(self) -> float:
        total = self.carried + self.new
        return self.new / total if total else 0.0

    @property
    def dropped_share(self) -> float:
        total = self.carried + self.dropped
        return self.dropped / total if total else 0.0


@dataclass
class WarmStartReport:
    """What :func:`warm_start` did: per embedding layer its row mapping; the Dense layers
    copied, and the layers that start fresh (no such layer in the source, or other shapes).
    Layers are named ``tower/layer``."""

    embeddings: dict[str, RowMapping] = field(default_factory=dict)
    copied: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, float | int | str]:
        """Flat numbers for MLflow params and Dagster metadata."""
        out: dict[str, float | int | str] = {}
        for name, mapping in self.embeddings.items():
            key = name.replace("/", ".")
            out[f"{key}.carried"] = mapping.carried
            out[f"{key}.new"] = mapping.new
            out[f"{key}.dropped"] = mapping.dropped
        out["copied"] = ", ".join(self.copied) or "none"
        out["fresh"] = ", ".join(self.fresh) or "none"
        return out


def map_rows(
    old_vocabulary: Sequence[str],
    old_table: np.ndarray,
    new_vocabulary: Sequence[str],
    new_table: np.ndarray,
    reserved_rows: int,
) -> tuple[np.ndarray, RowMapping]:
    """The new table with each carried-over value's row taken from the old table.

    A table's row ``reserved_rows + i`` belongs to vocabulary entry ``i``; the first
    ``reserved_rows`` rows (OOV, padding) are copied as they are. Rows past the vocabulary (a
    TextVectorization's table is sized for its token limit, not its vocabulary) keep the new
    table's values. Returns a copy; ``new_table`` is not changed.
    """
    old_table, new_table = np.asarray(old_table), np.asarray(new_table)
    if old_table.ndim != 2 or new_table.ndim != 2 or old_table.shape[1] != new_table.shape[1]:
        raise ValueError(
            f"embedding tables of different widths cannot be mapped: old {old_table.shape}, new {new_table.shape}"
        )
    if len(old_vocabulary) + reserved_rows > old_table.shape[0] or len(new_vocabulary) + reserved_rows > new_table.shape[0]:
        raise ValueError("a vocabulary is longer than its embedding table")
    old_index = {value: i for i, value in enumerate(old_vocabulary)}
    new_rows, old_rows = [], []
    for i, value in enumerate(new_vocabulary):
        j = old_index.get(value)
        if j is not None:
            new_rows.append(reserved_rows + i)
            old_rows.append(reserved_rows + j)
    mapped = new_table.copy()
    mapped[:reserved_rows] = old_table[:reserved_rows]
    if new_rows:
        mapped[np.asarray(new_rows)] = old_table[np.asarray(old_rows)]
    carried = len(new_rows)
    return mapped, RowMapping(carried=carried, new=len(new_vocabulary) - carried, dropped=len(old_vocabulary) - carried)


def _strings(values) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _lookup_vocabulary(lookup) -> tuple[list[str], int]:
    """A StringLookup's / TextVectorization's vocabulary without its reserved tokens, and how
    many reserved rows come first (StringLookup: OOV; TextVectorization: padding and OOV)."""
    full = _strings(lookup.get_vocabulary())
    reserved = 2 if isinstance(lookup, tf.keras.layers.TextVectorization) or (full[:1] == [""]) else 1
    return full[reserved:], reserved


def _copy_dense(name: str, new_layer, old_layer, report: WarmStartReport) -> None:
    old_weights, new_weights = old_layer.get_weights(), new_layer.get_weights()
    if len(old_weights) == len(new_weights) and all(o.shape == n.shape for o, n in zip(old_weights, new_weights)):
        new_layer.set_weights(old_weights)
        report.copied.append(name)
    else:
        report.fresh.append(name)


def _old_feature_layers(tower) -> dict[str, tf.keras.layers.Layer]:
    """The source tower's feature layers by name (live Tower or a revived SavedModel)."""
    layers = getattr(tower, "feature_layers", None)
    if layers is None:
        layers = [layer for layer in tower.layers if not isinstance(layer, tf.keras.layers.Dense)]
    return {layer.name: layer for layer in layers}


def _warm_start_tower(prefix: str, new_tower, old_tower, report: WarmStartReport) -> None:
    old_layers = _old_feature_layers(old_tower)
    for layer in new_tower.feature_layers:
        old = old_layers.get(layer.name)
        name = f"{prefix}/{layer.name}"
        if old is None or isinstance(layer, PretrainedFeature):
            # A feature the old model did not have starts fresh; pretrained vectors come from the data.
            if old is None:
                report.fresh.append(name)
            continue
        if isinstance(layer, StringFeature | TextFeature):
            lookup_new = layer.lookup if isinstance(layer, StringFeature) else layer.vectorize
            lookup_old = getattr(old, "lookup", None) or getattr(old, "vectorize", None)
            new_vocabulary, reserved = _lookup_vocabulary(lookup_new)
            old_vocabulary, old_reserved = _lookup_vocabulary(lookup_old)
            if reserved != old_reserved:
                raise ValueError(f"{name}: the old and new layers reserve different rows ({old_reserved} vs {reserved})")
            mapped, mapping = map_rows(
                old_vocabulary, old.embedding.get_weights()[0], new_vocabulary, layer.embedding.get_weights()[0], reserved
            )
            layer.embedding.set_weights([mapped])
            report.embeddings[name] = mapping
        elif isinstance(layer, NumericFeature):
            _copy_dense(name, layer.dense, old.dense, report)
        elif isinstance(layer, HistoryFeature):
            _warm_start_history(name, layer, old, report)
    new_head = (new_tower.hidden, new_tower.projection)
    for name, new_layer, old_layer in zip(("hidden", "projection"), new_head, _head(old_tower)):
        if new_layer is None:
            continue  # the new tower's head has no such layer
        if old_layer is None:
            report.fresh.append(f"{prefix}/{name}")
        else:
            _copy_dense(f"{prefix}/{name}", new_layer, old_layer, report)


def _warm_start_history(name: str, layer: HistoryFeature, old, report: WarmStartReport) -> None:
    """A history's item vectors are the item tower's id table, mapped with the item tower; only
    attention pooling's own weights (scoring layers, position biases) are copied, by shape."""
    if layer.pooling != "attention":
        return
    old_hidden, old_score = getattr(old, "attention_hidden", None), getattr(old, "attention_score", None)
    old_bias = [w for w in getattr(old, "weights", []) if "position_bias" in w.name]
    if old_hidden is None or old_score is None or len(old_bias) != 1 or old_bias[0].shape != layer.position_bias.shape:
        report.fresh.append(name)  # mean pooling before, or another history length
        return
    _copy_dense(f"{name}/attention_hidden", layer.attention_hidden, old_hidden, report)
    _copy_dense(f"{name}/attention_score", layer.attention_score, old_score, report)
    layer.position_bias.assign(old_bias[0].numpy())
    report.copied.append(f"{name}/position_bias")


def _head(tower) -> tuple:
    """The source tower's head layers: (hidden, projection), None where its head has none
    (``dense_tanh`` and ``dense_tanh_residual`` have only a projection, ``none`` neither;
    twotower_assets/model/heads.py). Towers saved before heads were layers of their own kept
    the Dense layers on the tower itself."""
    head = getattr(tower, "head_layer", None)
    if head is not None:
        return getattr(head, "hidden", None), getattr(head, "projection", None)
    if hasattr(tower, "hidden") or hasattr(tower, "projection"):
        return getattr(tower, "hidden", None), getattr(tower, "projection", None)
    dense = [layer for layer in tower.layers if isinstance(layer, tf.keras.layers.Dense)]
    if len(dense) > 2:
        raise ValueError(f"expected at most the tower's two head Dense layers, found {len(dense)}")
    return (None,) * (2 - len(dense)) + tuple(dense)


def warm_start(model, user_tower, item_tower) -> WarmStartReport:
    """Copy an earlier model's weights into ``model`` (a built TwoTowerModel), by id.

    ``user_tower``/``item_tower``: the source towers (live, or :func:`load_towers`).
    ``model`` must have been called once, so its variables exist.
    """
    if not model.user_tower.built or not model.item_tower.built:
        raise ValueError("build the model (call it on a batch) before warm-starting it")
    report = WarmStartReport()
    _warm_start_tower("user_tower", model.user_tower, user_tower, report)
    _warm_start_tower("item_tower", model.item_tower, item_tower, report)
    return report


def load_towers(user_tower: str | Path, item_tower: str | Path) -> tuple[tf.keras.Model, tf.keras.Model]:
    """The two towers a training saved (SavedModel directories), revived with their layers."""
    for path in (user_tower, item_tower):
        if not Path(path).is_dir():
            raise FileNotFoundError(f"no saved tower at {path}: cannot warm-start from it")
    return (
        tf.keras.models.load_model(str(user_tower), compile=False),
        tf.keras.models.load_model(str(item_tower), compile=False),
    )
