"""Warm start: embedding rows mapped by id between vocabularies, Dense layers copied by shape."""

import numpy as np
import pytest
import tensorflow as tf

from twotower_assets.model.features import load_feature_config
from twotower_assets.model.layers import FeatureStats
from twotower_assets.model.towers import SAMPLING_PROBABILITY_COLUMN, TwoTowerModel
from twotower_assets.model.recipes import ModelRecipe, Schedule, Towers
from twotower_assets.model.training import TrainingParams, train_two_tower
from twotower_assets.model.warm_start import RowMapping, load_towers, map_rows, warm_start

# ----------------------------------------------------------------------------- map_rows by hand


def test_map_rows_copies_carried_rows_keeps_fresh_rows_and_drops_the_rest():
    # Row 0 is the OOV row; rows 1.. belong to the vocabulary entries in order.
    old = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])  # OOV, a, b, c
    new = np.array([[9.0, 9.0], [-1.0, -1.0], [-2.0, -2.0], [-3.0, -3.0]])  # OOV, b, c, d (fresh values)
    mapped, mapping = map_rows(["a", "b", "c"], old, ["b", "c", "d"], new, reserved_rows=1)
    np.testing.assert_array_equal(mapped, [[0, 0], [2, 2], [3, 3], [-3, -3]])
    assert mapping == RowMapping(carried=2, new=1, dropped=1)
    assert mapping.new_share == pytest.approx(1 / 3) and mapping.dropped_share == pytest.approx(1 / 3)
    # The new table itself is not changed.
    assert new[1, 0] == -1.0


def test_map_rows_with_two_reserved_rows_and_a_table_longer_than_its_vocabulary():
    # A TextVectorization table: padding, OOV, then tokens; sized for the token limit (6 rows).
    old = np.arange(12, dtype=float).reshape(6, 2)  # pad, oov, red, blue, (unused), (unused)
    new = -np.arange(12, dtype=float).reshape(6, 2) - 100  # pad, oov, blue, green, (unused), (unused)
    mapped, mapping = map_rows(["red", "blue"], old, ["blue", "green"], new, reserved_rows=2)
    np.testing.assert_array_equal(mapped[:2], old[:2])  # padding and OOV rows copied
    np.testing.assert_array_equal(mapped[2], old[3])  # blue: old row 3 -> new row 2
    np.testing.assert_array_equal(mapped[3], new[3])  # green is new: fresh
    np.testing.assert_array_equal(mapped[4:], new[4:])  # past the vocabulary: untouched
    assert mapping == RowMapping(carried=1, new=1, dropped=1)


def test_map_rows_refuses_tables_of_different_widths_or_too_short():
    with pytest.raises(ValueError, match="different widths"):
        map_rows(["a"], np.zeros((2, 3)), ["a"], np.zeros((2, 4)), reserved_rows=1)
    with pytest.raises(ValueError, match="longer than its embedding table"):
        map_rows(["a", "b"], np.zeros((2, 3)), ["a"], np.zeros((2, 3)), reserved_rows=1)


# ----------------------------------------------------------------------------- whole towers

CONFIG = load_feature_config("tiny-features")


def stats(users: list[str], items: list[str], categories: list[str], tokens: list[str]) -> FeatureStats:
    """Hand-made statistics of the tiny config: vocabularies per feature, moments, vectors."""
    return FeatureStats(
        vocabularies={"user_id": users, "item_id": items, "offer_category_id": categories},
        moments={"booking_cnt": (1.0, 2.0), "item_mean_stock_price": (10.0, 25.0)},
        text_vocabularies={"user_queries": tokens, "item_names": tokens},
        pretrained={"item_image_embedding": (items, np.ones((len(items), 16), np.float32))},
    )


def batch(users: list[str], items: list[str]) -> dict[str, tf.Tensor]:
    n = len(users)
    return {
        "user_id": tf.constant(users),
        "booking_cnt": tf.constant(np.ones(n, np.float32)),
        "user_queries": tf.constant(["red blue"] * n),
        "item_id": tf.constant(items),
        "offer_category_id": tf.constant(["c1"] * n),
        "item_names": tf.constant(["green"] * n),
        "item_mean_stock_price": tf.constant(np.full(n, 3.0, np.float32)),
        SAMPLING_PROBABILITY_COLUMN: tf.constant(np.full(n, 0.1, np.float32)),
    }


def built_model(s: FeatureStats, embedding_size: int = 4, seed: int = 0) -> TwoTowerModel:
    tf.keras.utils.set_random_seed(seed)
    model = TwoTowerModel(CONFIG, s, embedding_size=embedding_size)
    users, items = s.vocabularies["user_id"], s.vocabularies["item_id"]
    model(batch(users[:2], items[:2]))
    return model


def layer(tower, name: str):
    return next(layer for layer in tower.feature_layers if layer.name == name)


OLD = stats(["u1", "u2", "u3"], ["i1", "i2"], ["c1", "c2"], ["red", "blue"])
NEW = stats(["u2", "u3", "u4", "u5"], ["i2", "i3"], ["c2", "c3"], ["blue", "green"])


def rows_by_value(table: np.ndarray, vocabulary: list[str], reserved: int) -> dict[str, np.ndarray]:
    return {value: table[reserved + i] for i, value in enumerate(vocabulary)}


@pytest.fixture(scope="module")
def old_model():
    return built_model(OLD, seed=1)


def assert_mapped(old_table, old_vocab, fresh_table, mapped_table, new_vocab, reserved):
    old_rows = rows_by_value(old_table, old_vocab, reserved)
    fresh_rows = rows_by_value(fresh_table, new_vocab, reserved)
    mapped_rows = rows_by_value(mapped_table, new_vocab, reserved)
    for value in new_vocab:
        expected = old_rows[value] if value in old_rows else fresh_rows[value]
        np.testing.assert_array_equal(mapped_rows[value], expected, err_msg=value)
    np.testing.assert_array_equal(mapped_table[:reserved], old_table[:reserved])
    # Dropped values' rows are gone: no row of the new vocabulary holds one.
    for value in set(old_vocab) - set(new_vocab):
        assert not any(np.array_equal(row, old_rows[value]) for row in mapped_rows.values()), value


def check_warm_start(new, fresh_weights, old_user_tower, old_item_tower, report):
    # Id features, the category feature and the text token tables are each mapped by value.
    for tower, old_tower, name, key, reserved in [
        ("user_tower", old_user_tower, "user_id_string", "user_id", 1),
        ("item_tower", old_item_tower, "item_id_string", "item_id", 1),
        ("item_tower", old_item_tower, "offer_category_id_string", "offer_category_id", 1),
    ]:
        assert_mapped(
            old_tower[name], OLD.vocabularies[key], fresh_weights[tower][name],
            layer(getattr(new, tower), name).embedding.get_weights()[0], NEW.vocabularies[key], reserved,
        )
    assert_mapped(
        old_user_tower["user_queries_text"], ["red", "blue"], fresh_weights["user_tower"]["user_queries_text"],
        layer(new.user_tower, "user_queries_text").embedding.get_weights()[0], ["blue", "green"], 2,
    )
    assert report.embeddings["user_tower/user_id_string"] == RowMapping(carried=2, new=2, dropped=1)
    assert report.embeddings["item_tower/item_id_string"] == RowMapping(carried=1, new=1, dropped=1)
    assert report.embeddings["item_tower/offer_category_id_string"] == RowMapping(carried=1, new=1, dropped=1)
    assert report.embeddings["item_tower/item_names_text"] == RowMapping(carried=1, new=1, dropped=1)
    # Numeric features' Dense layers and the heads have equal shapes: copied.
    np.testing.assert_array_equal(new.user_tower.hidden.get_weights()[0], old_user_tower["hidden"])
    np.testing.assert_array_equal(new.item_tower.projection.get_weights()[0], old_item_tower["projection"])
    np.testing.assert_array_equal(layer(new.user_tower, "booking_cnt_int").dense.get_weights()[0], old_user_tower["booking_cnt_int"])
    assert {"user_tower/hidden", "user_tower/projection", "item_tower/hidden", "user_tower/booking_cnt_int"} <= set(report.copied)
    assert report.fresh == []


def tables(tower) -> dict[str, np.ndarray]:
    """First weight of each layer of a live tower, by layer name (plus the head)."""
    out = {}
    for feature in tower.feature_layers:
        inner = getattr(feature, "embedding", None) or getattr(feature, "dense", None)
        out[feature.name] = inner.get_weights()[0]
    out["hidden"] = tower.hidden.get_weights()[0]
    out["projection"] = tower.projection.get_weights()[0]
    return out


def fresh(model) -> dict[str, dict[str, np.ndarray]]:
    return {"user_tower": tables(model.user_tower), "item_tower": tables(model.item_tower)}


def test_warm_start_from_a_live_model_maps_every_vocabulary_and_copies_the_dense_layers(old_model):
    new = built_model(NEW, seed=2)
    before = fresh(new)
    report = warm_start(new, old_model.user_tower, old_model.item_tower)
    check_warm_start(new, before, tables(old_model.user_tower), tables(old_model.item_tower), report)
    # The pretrained table is not trained: it stays the new date's vectors.
    np.testing.assert_array_equal(
        layer(new.item_tower, "item_image_embedding_pretrained").embedding.get_weights()[0],
        before["item_tower"]["item_image_embedding_pretrained"],
    )


def test_warm_start_from_saved_towers_gives_the_same_weights(old_model, tmp_path):
    old_model.user_tower.save(str(tmp_path / "user_tower"), save_format="tf")
    old_model.item_tower.save(str(tmp_path / "item_tower"), save_format="tf")
    user_tower, item_tower = load_towers(tmp_path / "user_tower", tmp_path / "item_tower")
    new = built_model(NEW, seed=2)
    before = fresh(new)
    report = warm_start(new, user_tower, item_tower)
    check_warm_start(new, before, tables(old_model.user_tower), tables(old_model.item_tower), report)


def test_dense_layers_of_other_shapes_start_fresh(old_model):
    wider = built_model(NEW, embedding_size=6, seed=2)
    before = fresh(wider)
    report = warm_start(wider, old_model.user_tower, old_model.item_tower)
    np.testing.assert_array_equal(wider.user_tower.projection.get_weights()[0], before["user_tower"]["projection"])
    assert {"user_tower/hidden", "user_tower/projection", "item_tower/hidden", "item_tower/projection"} <= set(report.fresh)
    # The embedding tables do not depend on the head's size: still mapped.
    assert report.embeddings["user_tower/user_id_string"].carried == 2


def test_an_unbuilt_model_or_a_missing_tower_is_a_clear_error(old_model, tmp_path):
    with pytest.raises(ValueError, match="build the model"):
        warm_start(TwoTowerModel(CONFIG, NEW, embedding_size=4), old_model.user_tower, old_model.item_tower)
    with pytest.raises(FileNotFoundError, match="no saved tower"):
        load_towers(tmp_path / "missing_user", tmp_path / "missing_item")


def test_training_starts_from_the_warm_start_weights(old_model):
    """train_two_tower calls ``initialize`` on the built model before fitting."""
    rows = [batch(["u2", "u3", "u4", "u5"] * 4, ["i2", "i3"] * 8)]
    data = tf.data.Dataset.from_tensor_slices(rows[0])
    seen = {}

    def initialize(model):
        warm_start(model, old_model.user_tower, old_model.item_tower)
        seen["hidden"] = model.user_tower.hidden.get_weights()[0].copy()

    params = TrainingParams(recipe=ModelRecipe(towers=Towers(embedding_size=4), schedule=Schedule(batch_size=8, epochs=1)), seed=0)
    train_two_tower(CONFIG, NEW, data, 16, None, params, initialize=initialize)
    np.testing.assert_array_equal(seen["hidden"], old_model.user_tower.hidden.get_weights()[0])
