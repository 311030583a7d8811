"""What a one-vector-per-user model needs to compete with EASE on MovieLens:
``sqrtn`` history pooling, an exact softmax that leaves out the row's history items, and a
learned score per item carried inside the vectors (``item_bias``). Checked by hand in numpy.
"""

import numpy as np
import pytest
import tensorflow as tf

from twotower_assets.model.features import parse_feature_config
from twotower_assets.model.layers import FeatureStats, HistoryFeature, StringFeature
from twotower_assets.model.match_model import MatchModel, probe_match_model, save_match_model
from twotower_assets.model.towers import SAMPLING_PROBABILITY_COLUMN, TwoTowerModel
from twotower_assets.model.negatives import FullCatalogNegatives, catalog_losses
from twotower_assets.model.recipes import ModelRecipe, Task, Towers
from twotower_assets.model.training import TrainingParams, build_model
from helpers.model import reload_towers

ITEMS = ["a", "b", "c", "d", "e"]


def config(pooling: str = "sqrtn"):
    return parse_feature_config(
        {
            "user_embedding_layers": {
                "user_id": {"type": "string", "embedding_size": 2},
                "user_history": {"type": "history", "embedding_size": 4, "pooling": pooling, "length": 4},
            },
            "item_embedding_layers": {"item_id": {"type": "string", "embedding_size": 4}},
        },
        name="bias-test",
        source="test",
    )


FULL = FullCatalogNegatives()
STATS = FeatureStats(vocabularies={"user_id": ["u1", "u2", "u3"], "item_id": ITEMS})
CATALOG = {"item_id": np.array(ITEMS, dtype=object)}


def features():
    return {
        "user_id": tf.constant(["u1", "u2", "u3"]),
        # Row 2's history names its own positive (c) and an item outside the catalogue.
        "user_history": tf.constant(["b c", "", "c zzz a"]),
        "item_id": tf.constant(["a", "d", "c"]),
        SAMPLING_PROBABILITY_COLUMN: tf.constant([0.4, 0.2, 0.4]),
    }


def test_sqrtn_pooling_is_the_sum_over_the_square_root_of_the_count():
    ids = StringFeature(["a", "b", "c", "d"], 3)
    ids(tf.constant(["a"]))
    table = np.arange(15, dtype=np.float32).reshape(5, 3) + 1.0
    ids.embedding.set_weights([table])
    out = HistoryFeature(ids, length=3, pooling="sqrtn")(tf.constant(["c a", "d", "b b a d", "", "zzz"])).numpy()
    np.testing.assert_allclose(out[0], (table[3] + table[1]) / np.sqrt(2), rtol=1e-6)
    np.testing.assert_allclose(out[1], table[4], rtol=1e-6)
    np.testing.assert_allclose(out[2], (2 * table[2] + table[1]) / np.sqrt(3), rtol=1e-6)  # first 3 ids
    np.testing.assert_array_equal(out[3:], np.zeros((2, 3)))  # empty or unknown: zeros


def test_the_exact_softmax_leaves_out_the_rows_history_items_but_not_its_positive():
    temperature = 0.5
    model = TwoTowerModel(config(), STATS, embedding_size=3, temperature=temperature, negatives=FULL, catalog=CATALOG)
    batch = features()
    losses = catalog_losses(model, batch).numpy()
    users = model.user_tower(batch).numpy()
    items = model.item_tower({"item_id": tf.constant(ITEMS)}).numpy()
    logits = users @ items.T / temperature
    positives = [0, 3, 2]  # a, d, c
    left_out = [{1, 2}, set(), {0}]  # row 0: b, c; row 2: a (c is its positive, zzz is unknown)
    expected = []
    for row, (positive, out) in enumerate(zip(positives, left_out)):
        kept = [j for j in range(len(ITEMS)) if j not in out]
        expected.append(-(logits[row, positive] - np.log(np.exp(logits[row, kept]).sum())))
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    # The same rule in the loss Keras reports for training and validation.
    np.testing.assert_allclose(model.compute_loss(batch, training=False).numpy(), np.mean(expected), rtol=1e-5)


def test_without_a_history_feature_the_exact_softmax_is_over_every_item():
    id_only = parse_feature_config(
        {"user_embedding_layers": {"user_id": {"type": "string", "embedding_size": 2}},
         "item_embedding_layers": {"item_id": {"type": "string", "embedding_size": 4}}},
        name="ids", source="test",
    )
    model = TwoTowerModel(id_only, STATS, embedding_size=3, temperature=1.0, negatives=FULL, catalog=CATALOG)
    batch = features()
    logits = model.user_tower(batch).numpy() @ model.item_tower({"item_id": tf.constant(ITEMS)}).numpy().T
    expected = [-(logits[r, p] - np.log(np.exp(logits[r]).sum())) for r, p in enumerate([0, 3, 2])]
    np.testing.assert_allclose(catalog_losses(model, batch).numpy(), expected, rtol=1e-5)


def test_item_bias_travels_in_the_vectors_and_adds_to_the_cosine():
    # Seeded, and 16 hidden units: with a handful, a row's ReLUs can all be 0 at random
    # initialisation and its unit vector is then zeros.
    tf.random.set_seed(7)
    params = TrainingParams(recipe=ModelRecipe(towers=Towers(embedding_size=8, item_bias=True), task=Task(temperature=0.5)))
    model = build_model(config(), STATS, params)
    batch = features()
    users, items = model.user_tower(batch).numpy(), model.item_tower(batch).numpy()
    assert users.shape == (3, 9) and items.shape == (3, 9)
    np.testing.assert_array_equal(users[:, 8], np.ones(3))
    np.testing.assert_allclose(np.linalg.norm(users[:, :8], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(items[:, :8], axis=1), 1.0, rtol=1e-5)
    # The bias is a learned scalar per item id: set it and read it back from the vectors.
    bias_layer = model.item_tower.bias
    bias_layer.embedding.set_weights([np.array([[0.0], [1.5], [-2.0], [0.25], [3.0], [0.5]], np.float32)])
    items = model.item_tower(batch).numpy()  # a, d, c
    np.testing.assert_allclose(items[:, 8], [1.5, 3.0, 0.25], rtol=1e-6)
    scores = users @ items.T
    np.testing.assert_allclose(scores, users[:, :8] @ items[:, :8].T + items[:, 8][None, :], rtol=1e-5)


def test_item_bias_is_trained_and_off_by_default():
    assert TrainingParams().recipe.towers.item_bias is False
    plain = build_model(config(), STATS, TrainingParams(recipe=ModelRecipe(towers=Towers(embedding_size=3))))
    assert plain.user_tower(features()).shape[1] == 3
    model = build_model(config(), STATS, TrainingParams(recipe=ModelRecipe(towers=Towers(embedding_size=3, item_bias=True), task=Task(negatives=FULL))), catalog=CATALOG)
    batch = features()
    model(batch)
    bias = model.item_tower.bias.embedding.embeddings
    with tf.GradientTape() as tape:
        loss = model.compute_loss(batch, training=True)
    gradient = tf.convert_to_tensor(tape.gradient(loss, bias)).numpy()
    # Every catalogue item is a candidate of the exact softmax: each row's bias gets a gradient
    # (the OOV row 0 is nobody's).
    assert np.all(np.abs(gradient[1:, 0]) > 0) and gradient[0, 0] == 0


def test_towers_with_item_bias_save_load_and_serve(tmp_path):
    model = build_model(config(), STATS, TrainingParams(recipe=ModelRecipe(towers=Towers(embedding_size=3, item_bias=True))))
    batch = features()
    model(batch)
    model.item_tower.bias.embedding.set_weights([np.linspace(-1, 1, 6, dtype=np.float32)[:, None]])
    reload_towers(model, tmp_path, batch)
    users = model.user_tower(batch).numpy()
    items = model.item_tower({"item_id": tf.constant(ITEMS), "user_id": tf.constant(["u1"] * 5),
                              "user_history": tf.constant([""] * 5)}).numpy()
    match = MatchModel(np.array(["u1", "u2", "u3"], dtype=object), users, np.array(ITEMS, dtype=object), items)
    save_match_model(match, tmp_path / "match")
    probe_match_model(tmp_path / "match", np.array(["u1", "u2", "u3"], dtype=object), users,
                      np.array(ITEMS[:3], dtype=object), items[:3])


def test_a_tower_refuses_an_unknown_score_bias():
    from twotower_assets.model.towers import Tower

    cfg = config()
    with pytest.raises(ValueError, match="score_bias"):
        Tower(cfg.item_embedding_layers, "item_id", STATS, cfg, 3, score_bias="both")
