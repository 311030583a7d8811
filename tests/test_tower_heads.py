"""The towers' heads (TrainingParams.user_head / item_head, towers.TOWER_HEADS): production's
``mlp``, Mult-DAE's one ``dense_tanh`` layer, ``dense_tanh_residual`` (that layer plus the pooled
history) and ``none`` (the features are the vector).
Each vector is recomputed by hand in numpy from the layers' weights."""

import numpy as np
import pydantic
import pytest
import tensorflow as tf

from twotower_assets.model.features import parse_feature_config
from twotower_assets.model.layers import FeatureStats
from twotower_assets.model.match_model import MatchModel, probe_match_model, save_match_model
from twotower_assets.model.negatives import FullCatalogNegatives
from twotower_assets.model.recipes import ModelRecipe, Optimizer, RecipeError, Task, Towers
from twotower_assets.model.towers import TwoTowerModel
from twotower_assets.model.training import TrainingParams, build_model
from twotower_assets.model.warm_start import warm_start
from helpers.model import reload_towers

ITEMS = ["a", "b", "c", "d", "e"]
STATS = FeatureStats(vocabularies={"user_id": ["u1", "u2", "u3"], "item_id": ITEMS})


def config(item_id_size: int = 4):
    return parse_feature_config(
        {
            "user_embedding_layers": {
                "user_id": {"type": "string", "embedding_size": 2},
                "user_history": {"type": "history", "embedding_size": item_id_size, "pooling": "sqrtn", "length": 4},
            },
            "item_embedding_layers": {"item_id": {"type": "string", "embedding_size": item_id_size}},
        },
        name="heads-test",
        source="test",
    )


def features():
    return {
        "user_id": tf.constant(["u1", "u2", "u3"]),
        "user_history": tf.constant(["b c", "", "c zzz a"]),
        "item_id": tf.constant(["a", "d", "c"]),
    }


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_dense_tanh_is_one_tanh_layer_over_the_features_and_none_is_the_id_row():
    tf.random.set_seed(3)
    params = TrainingParams(recipe=ModelRecipe(towers=Towers(embedding_size=4, user_head="dense_tanh", item_head="none")))
    model = build_model(config(), STATS, params)
    batch = features()
    users, items = model.user_tower(batch).numpy(), model.item_tower(batch).numpy()
    # The item vector is its id embedding row, made unit length: no layer in between.
    item_table = model.item_tower.feature_layers[0].embedding.get_weights()[0]
    np.testing.assert_allclose(items, unit(item_table[[1, 4, 3]]), rtol=1e-5)  # a, d, c
    # The user vector: tanh(W [user id row, sqrtn history] + b), unit length; no hidden layer.
    assert model.user_tower.hidden is None and model.item_tower.projection is None
    user_table = model.user_tower.feature_layers[0].embedding.get_weights()[0]
    history = np.stack([
        (item_table[2] + item_table[3]) / np.sqrt(2),  # b c
        np.zeros(4),  # empty
        (item_table[3] + item_table[1]) / np.sqrt(2),  # c a (zzz is unknown)
    ])
    concat = np.hstack([user_table[[1, 2, 3]], history])
    kernel, bias = model.user_tower.projection.get_weights()
    np.testing.assert_allclose(users, unit(np.tanh(concat @ kernel + bias)), rtol=1e-4, atol=1e-6)


def test_dense_tanh_residual_adds_the_pooled_history_to_the_tanh_layer(tmp_path):
    tf.random.set_seed(4)
    params = TrainingParams(recipe=ModelRecipe(towers=Towers(embedding_size=4, user_head="dense_tanh_residual", item_head="none")))
    model = build_model(config(), STATS, params)
    batch = features()
    users = model.user_tower(batch).numpy()
    item_table = model.item_tower.feature_layers[0].embedding.get_weights()[0]
    user_table = model.user_tower.feature_layers[0].embedding.get_weights()[0]
    history = np.stack([
        (item_table[2] + item_table[3]) / np.sqrt(2),  # b c
        np.zeros(4),  # empty: the vector is the tanh layer's alone
        (item_table[3] + item_table[1]) / np.sqrt(2),  # c a (zzz is unknown)
    ])
    kernel, bias = model.user_tower.projection.get_weights()
    assert kernel.shape == (6, 4) and model.user_tower.hidden is None
    expected = np.tanh(np.hstack([user_table[[1, 2, 3]], history]) @ kernel + bias) + history
    np.testing.assert_allclose(users, unit(expected), rtol=1e-4, atol=1e-6)
    model(batch)  # builds the item tower too, for saving
    reload_towers(model, tmp_path, batch)  # the SavedModel the MatchModel is built from gives the same


def test_dense_tanh_residual_needs_a_history_of_the_embedding_size():
    # Refused when the recipe meets the features, naming the recipe's fields ...
    with pytest.raises(RecipeError, match="towers.item_head 'dense_tanh_residual'.*no history feature"):
        build_model(config(), STATS, TrainingParams(recipe=ModelRecipe(towers=Towers(embedding_size=4, item_head="dense_tanh_residual"))))
    with pytest.raises(RecipeError, match="towers.user_head 'dense_tanh_residual' adds history feature 'user_history' to "
                       "the vector: its embedding_size 6 must equal towers.embedding_size 4"):
        build_model(config(item_id_size=6), STATS, TrainingParams(recipe=ModelRecipe(towers=Towers(embedding_size=4, user_head="dense_tanh_residual"))))
    # ... and by the tower itself, for a model built without a recipe.
    with pytest.raises(ValueError, match="'user_history' to the vector: its embedding_size 6 must be embedding_size 4"):
        TwoTowerModel(config(item_id_size=6), STATS, embedding_size=4, user_head="dense_tanh_residual")


def test_mlp_is_the_default_head_of_both_towers():
    assert (Towers().user_head, Towers().item_head) == ("mlp", "mlp")
    tf.random.set_seed(7)
    model = build_model(config(), STATS, TrainingParams(recipe=ModelRecipe(towers=Towers(embedding_size=8))))
    batch = features()
    items = model.item_tower(batch).numpy()
    hidden_kernel, hidden_bias = model.item_tower.hidden.get_weights()
    kernel, bias = model.item_tower.projection.get_weights()
    rows = model.item_tower.feature_layers[0].embedding.get_weights()[0][[1, 4, 3]]
    np.testing.assert_allclose(items, unit(np.maximum(rows @ hidden_kernel + hidden_bias, 0) @ kernel + bias),
                               rtol=1e-4, atol=1e-6)


def test_none_needs_features_of_the_embedding_size_and_unknown_heads_are_refused():
    with pytest.raises(RecipeError, match="towers.item_head 'none' .* 6 values, not towers.embedding_size 4"):
        build_model(config(item_id_size=6), STATS, TrainingParams(recipe=ModelRecipe(towers=Towers(embedding_size=4, item_head="none"))))
    model = TwoTowerModel(config(item_id_size=6), STATS, embedding_size=4, item_head="none")
    with pytest.raises(ValueError, match="(?s)item_tower_head.*head 'none' .* add up to 6 values, not embedding_size 4"):
        model.item_tower(features())
    with pytest.raises(pydantic.ValidationError, match="user_head"):
        TrainingParams(recipe=ModelRecipe(towers=Towers(user_head="transformer")))
    from twotower_assets.model.towers import Tower

    cfg = config()
    with pytest.raises(ValueError, match="unknown tower head 'deep'"):
        Tower(cfg.item_embedding_layers, "item_id", STATS, cfg, 4, head="deep")


def test_a_shallow_head_model_trains_saves_loads_and_serves(tmp_path):
    tf.random.set_seed(5)
    params = TrainingParams(recipe=ModelRecipe(towers=Towers(embedding_size=4, user_head="dense_tanh", item_head="none", item_bias=True), task=Task(temperature=0.5, negatives=FullCatalogNegatives()), optimizer=Optimizer(learning_rate=0.05)))
    model = build_model(config(), STATS, params, catalog={"item_id": np.array(ITEMS, dtype=object)})
    batch = features()
    model(batch)
    before = model.user_tower.projection.get_weights()[0].copy()
    model.train_step(batch)
    assert not np.allclose(model.user_tower.projection.get_weights()[0], before)  # the head learns
    user, item = reload_towers(model, tmp_path, batch)
    users = model.user_tower(batch).numpy()
    items = model.item_tower({"item_id": tf.constant(ITEMS)}).numpy()
    assert users.shape == (3, 5) and items.shape == (5, 5)  # embedding_size + the bias
    match = MatchModel(np.array(["u1", "u2", "u3"], dtype=object), users, np.array(ITEMS, dtype=object), items)
    save_match_model(match, tmp_path / "match")
    probe_match_model(tmp_path / "match", np.array(["u1", "u2", "u3"], dtype=object), users,
                      np.array(ITEMS, dtype=object), items)

    # A warm start between heads copies the layers both have, by shape, from live or saved towers.
    for old_user, old_item in ((model.user_tower, model.item_tower), (user, item)):
        same = build_model(config(), STATS, params, catalog={"item_id": np.array(ITEMS, dtype=object)})
        same(batch)
        report = warm_start(same, old_user, old_item)
        assert "user_tower/projection" in report.copied
        np.testing.assert_allclose(same.user_tower(batch).numpy()[:, :4], users[:, :4], rtol=1e-5, atol=1e-6)
    mlp = build_model(config(), STATS, TrainingParams(recipe=ModelRecipe(towers=Towers(embedding_size=4))))
    mlp(batch)
    report = warm_start(mlp, user, item)
    # The old user projection is 6 x 4, the new one 8 x 4; the old item tower had no head at all.
    assert {"user_tower/hidden", "user_tower/projection", "item_tower/hidden", "item_tower/projection"} <= set(
        report.fresh
    )
    np.testing.assert_allclose(  # the shared id table still carries over
        mlp.item_tower.feature_layers[0].embedding.get_weights()[0],
        model.item_tower.feature_layers[0].embedding.get_weights()[0],
    )
