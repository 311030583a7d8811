"""Feature layers, towers, training and the MatchModel, on small in-memory data."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import tensorflow as tf

from helpers.model import learnable_table
from twotower_assets.model.datasets import feature_kinds, load_dataset, save_dataset
from twotower_assets.model.features import FeatureConfigError, load_feature_config, parse_feature_config
from twotower_assets.model.layers import (
    FeatureStats,
    NumericFeature,
    PretrainedFeature,
    StringFeature,
    TextFeature,
    parse_vector,
)
from twotower_assets.model.match_model import MatchModel, save_match_model
from twotower_assets.model.recipes import ModelRecipe, Optimizer, Schedule, Towers
from twotower_assets.model.training import TrainingParams, tower_outputs, train_two_tower
from twotower_assets.model.towers import TwoTowerModel


def test_string_feature_maps_unknown_values_to_the_oov_row():
    layer = StringFeature(["a", "b"], 3)
    out = layer(tf.constant(["a", "b", "zzz"]))
    assert out.shape == (3, 3)
    # Index 0 is the OOV slot: an unseen value gets the same vector as any other unseen value.
    np.testing.assert_allclose(layer(tf.constant(["zzz"])), layer(tf.constant(["other"])))
    assert not np.allclose(out[0], out[1])


def test_numeric_feature_normalises_with_the_given_moments():
    layer = NumericFeature(mean=10.0, variance=4.0, embedding_size=2)
    out = layer(tf.constant([10.0, 12.0]))
    # Normalised inputs are 0 and 1, so the outputs are bias and kernel + bias of the dense layer.
    kernel, bias = layer.dense.get_weights()
    np.testing.assert_allclose(out.numpy(), np.stack([bias, kernel[0] + bias]), rtol=1e-5)


def test_numeric_feature_survives_a_constant_column():
    layer = NumericFeature(mean=3.0, variance=0.0, embedding_size=2)
    assert np.all(np.isfinite(layer(tf.constant([3.0, 3.0])).numpy()))


def test_text_feature_averages_token_embeddings_and_handles_empty_text():
    layer = TextFeature(["red", "blue"], 4)
    out = layer(tf.constant(["red blue", "red", ""])).numpy()
    tokens = layer.embedding.get_weights()[0]
    red, blue = tokens[layer.vectorize(tf.constant([["red blue"]])).numpy()[0][:2]]
    np.testing.assert_allclose(out[0], (red + blue) / 2, rtol=1e-5)
    np.testing.assert_allclose(out[1], red, rtol=1e-5)
    np.testing.assert_allclose(out[2], np.zeros(4))


def test_pretrained_feature_is_frozen_and_zero_for_unknown_ids():
    vectors = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    layer = PretrainedFeature(["x", "y"], vectors)
    out = layer(tf.constant(["y", "x", "unknown"])).numpy()
    np.testing.assert_allclose(out, [[3, 4], [1, 2], [0, 0]])
    assert layer.trainable_weights == []


def test_parse_vector_rejects_bad_values():
    assert parse_vector("[1, 2]", 2).tolist() == [1.0, 2.0]
    assert parse_vector("not-a-vector", 2) is None
    assert parse_vector("[1, 2, 3]", 2) is None
    assert parse_vector(None, 2) is None
    assert parse_vector("[1, NaN]", 2) is None


def test_saved_dataset_round_trips_with_nulls_filled(tmp_path):
    config = load_feature_config("tiny-features")
    table = pa.table({"user_id": ["a", None], "item_id": ["x", "y"], "booking_cnt": [None, 3],
                      "user_queries": [None, "q"], "offer_category_id": ["c", "c"], "item_names": ["n", "n"],
                      "item_mean_stock_price": [1.5, None]})
    rows = save_dataset([table.to_batches()[0]], feature_kinds(config), tmp_path / "d")
    examples = list(load_dataset(tmp_path / "d").as_numpy_iterator())
    assert rows == 2 and len(examples) == 2
    assert examples[1]["user_id"] == b"none" and examples[0]["user_queries"] == b"none"
    assert examples[0]["booking_cnt"] == 0.0 and examples[1]["item_mean_stock_price"] == 0.0


def test_interrupted_dataset_write_keeps_the_previous_dataset(tmp_path):
    config = load_feature_config("tiny-features")
    kinds = feature_kinds(config)
    table = learnable_table(100)
    save_dataset(table.to_batches(), kinds, tmp_path / "d")

    def failing_batches():
        yield table.to_batches()[0]
        raise OSError("connection lost mid-read")

    with pytest.raises(Exception, match="connection lost"):
        save_dataset(failing_batches(), kinds, tmp_path / "d")
    assert len(list(load_dataset(tmp_path / "d"))) == 100


def test_feature_stats_round_trip(tiny_training, tmp_path):
    _, stats, _, _ = tiny_training
    stats.save(tmp_path)
    loaded = FeatureStats.load(tmp_path)
    assert loaded.vocabularies == stats.vocabularies
    assert loaded.text_vocabularies == stats.text_vocabularies
    np.testing.assert_allclose(loaded.pretrained["item_image_embedding"][1], stats.pretrained["item_image_embedding"][1])
    # Unparsable vectors ("bad") become zeros, parsable ones are kept.
    ids, vectors = stats.pretrained["item_image_embedding"]
    assert np.allclose(vectors[ids.index("i0")], 0) and np.allclose(vectors[ids.index("i11")], 1.0)


def test_towers_output_unit_vectors_of_the_embedding_size(tiny_training):
    config, stats, dataset, _ = tiny_training
    model = TwoTowerModel(config, stats, embedding_size=6)
    batch = next(iter(dataset.batch(32)))
    users, items = model(batch)
    assert users.shape == (32, 6) and items.shape == (32, 6)
    np.testing.assert_allclose(np.linalg.norm(users, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(items, axis=1), 1.0, rtol=1e-5)


def test_pretrained_size_mismatch_is_a_config_error(tiny_training):
    config, stats, _, _ = tiny_training
    raw = json.loads(config.model_dump_json(exclude={"name"}))
    raw["item_embedding_layers"]["item_image_embedding"]["embedding_size"] = 8
    wrong = parse_feature_config(raw, "wrong", "test")
    with pytest.raises(FeatureConfigError, match="item_image_embedding"):
        TwoTowerModel(wrong, stats, embedding_size=4)


@pytest.mark.slow
@pytest.mark.parametrize(
    "optimizer, epochs",
    # lazy_adam moves a row only on the steps that touch it (no momentum in between), so on
    # this very short training it needs more steps for the same margin
    # (docs/benchmarks-training.md, "Very short training learns more slowly").
    [("adam", 10), ("lazy_adam", 20)],
)
def test_training_decreases_the_loss_and_learns_the_groups(tiny_training, optimizer, epochs):
    config, stats, dataset, rows = tiny_training
    # 13 steps per epoch (a fifth of 4,000 rows at batch 64).
    params = TrainingParams(recipe=ModelRecipe(towers=Towers(embedding_size=8), optimizer=Optimizer(learning_rate=0.05, name=optimizer), schedule=Schedule(batch_size=64, epochs=epochs)), seed=3)
    result = train_two_tower(config, stats, dataset, rows, dataset.take(512), params)
    losses = result.history["loss"]
    assert losses[-1] < losses[0] * 0.9
    users, user_vectors = tower_outputs(result.model.user_tower, dataset.take(400), ["user_id"])
    items, item_vectors = tower_outputs(result.model.item_tower, dataset.take(400), ["item_id"])
    scores = user_vectors @ item_vectors.T
    user_group = np.array([int(u[1:]) % 8 for u in users["user_id"]])
    item_group = np.array([int(i[1:]) // 10 for i in items["item_id"]])
    same = scores[user_group[:, None] == item_group[None, :]].mean()
    other = scores[user_group[:, None] != item_group[None, :]].mean()
    assert same > other + 0.2


def test_empty_training_set_is_refused(tiny_training):
    config, stats, dataset, _ = tiny_training
    with pytest.raises(ValueError, match="empty"):
        train_two_tower(config, stats, dataset.take(0), 0, None, TrainingParams())


def test_match_model_round_trip_in_a_fresh_process(tmp_path):
    rng = np.random.default_rng(0)
    user_vectors, item_vectors = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(5, 4)).astype(np.float32)
    model = MatchModel(np.array(["u0", "u1", "u2"]), user_vectors, np.array([f"i{i}" for i in range(5)]), item_vectors)
    save_match_model(model, tmp_path / "mm")
    loaded = tf.saved_model.load(str(tmp_path / "mm"))
    users, items = np.array(["u1", "u2", "nobody", "u0"]), np.array(["i4", "i0", "i1", "unknown"])
    expected = [user_vectors[1] @ item_vectors[4], user_vectors[2] @ item_vectors[0], 0.0, 0.0]
    np.testing.assert_allclose(loaded([users, items]).numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(model([users, items]).numpy(), expected, rtol=1e-5)
    # A serving process has TensorFlow and nothing of this project.
    script = (
        "import numpy as np, tensorflow as tf;"
        f"m = tf.saved_model.load({str(tmp_path / 'mm')!r});"
        "print(float(m([np.array(['u1']), np.array(['i4'])])[0]))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert abs(float(out.stdout.strip().splitlines()[-1]) - expected[0]) < 1e-5


def test_match_model_rejects_duplicate_ids():
    with pytest.raises(ValueError, match="not unique"):
        MatchModel(np.array(["u", "u"]), np.ones((2, 2)), np.array(["i"]), np.ones((1, 2)))


def test_validation_loss_matches_tfrs_and_leaves_out_seen_pairs(tiny_training):
    config, stats, dataset, _ = tiny_training
    batch = next(iter(dataset.batch(64)))
    users = batch["user_id"].numpy().astype(str)
    items = batch["item_id"].numpy().astype(str)
    # Seen pairs that never occur in the batch: the loss must equal TFRS's own task loss.
    unrelated = TwoTowerModel(config, stats, embedding_size=4, seen_pairs=(np.array(["nobody"]), np.array(["i0"])))
    tfrs_loss = float(unrelated.compute_loss(batch, training=True))
    assert float(unrelated.compute_loss(batch, training=False)) == pytest.approx(tfrs_loss, rel=1e-5)
    # Marking every in-batch (user, other item) pair as seen leaves only the positives (and
    # the accidental hits, which are masked anyway): the loss drops to ~0.
    everything = (np.repeat(users, len(items)), np.tile(items, len(users)))
    masked = TwoTowerModel(config, stats, embedding_size=4, seen_pairs=everything)
    masked(batch)  # builds the weights
    masked.user_tower.set_weights(unrelated.user_tower.get_weights())
    masked.item_tower.set_weights(unrelated.item_tower.get_weights())
    assert float(masked.compute_loss(batch, training=True)) == pytest.approx(tfrs_loss, rel=1e-5)
    assert float(masked.compute_loss(batch, training=False)) < 1e-3


def test_seen_pairs_given_lazily_train_exactly_as_given_directly(tiny_training):
    """The trainer hands the pairs as a callable so they are freed before fitting: the model
    must come out the same, and the callable must be read once, while the model is built."""
    config, stats, dataset, rows = tiny_training
    batch = next(iter(dataset.batch(4000)))
    pairs = (batch["user_id"].numpy().astype(str)[:2000], batch["item_id"].numpy().astype(str)[:2000])
    params = TrainingParams(recipe=ModelRecipe(towers=Towers(embedding_size=8), optimizer=Optimizer(learning_rate=0.05), schedule=Schedule(batch_size=64, epochs=2)), seed=5)
    direct = train_two_tower(config, stats, dataset, rows, dataset.take(512), params, seen_pairs=pairs)
    calls = []
    lazy = train_two_tower(
        config, stats, dataset, rows, dataset.take(512), params, seen_pairs=lambda: calls.append(1) or pairs
    )
    assert calls == [1]
    assert lazy.history["val_loss"] == pytest.approx(direct.history["val_loss"], rel=1e-5)
    for a, b in zip(lazy.model.user_tower.get_weights(), direct.model.user_tower.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The pairs reached the model: a pair it was given is a seen key, one it was not is not.
    seen_key = lazy.model.seen_user_index(pairs[0][:1]) * lazy.model.seen_stride + lazy.model.seen_item_index(pairs[1][:1])
    assert int(lazy.model.seen.lookup(seen_key)[0]) == 1
    unseen = lazy.model.seen_user_index(["nobody"]) * lazy.model.seen_stride + lazy.model.seen_item_index(pairs[1][:1])
    assert int(lazy.model.seen.lookup(unseen)[0]) == 0


def test_tower_output_table_matches_tower_outputs_row_for_row(tiny_training):
    """The trainer writes the Arrow table; tower_outputs is the same numbers as numpy."""
    from twotower_assets.model.training import EMBEDDING_COLUMN, tower_output_table

    config, stats, dataset, _ = tiny_training
    model = TwoTowerModel(config, stats, embedding_size=4)
    examples = dataset.take(300)
    table = tower_output_table(model.user_tower, examples, ["user_id"], batch_size=64)
    ids, vectors = tower_outputs(model.user_tower, examples, ["user_id"], batch_size=64)
    assert table.column_names == ["user_id", EMBEDDING_COLUMN]
    assert table.schema.field("user_id").type == pa.string()
    assert table.schema.field(EMBEDDING_COLUMN).type == pa.list_(pa.float32(), 4)
    assert table["user_id"].to_pylist() == ids["user_id"].tolist()
    expected = model.user_tower(next(iter(examples.batch(300)))).numpy()  # one call over all rows
    np.testing.assert_allclose(vectors, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(table[EMBEDDING_COLUMN].to_pylist(), np.float32), expected, rtol=1e-5, atol=1e-6)
    vectors[0, 0] = 1.0  # callers may change the arrays they get
