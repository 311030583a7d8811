"""History features: the user's earlier items, embedded with the item tower's id embedding and pooled.

Also mixed negative sampling (in-batch plus uniform catalogue negatives), checked against a
loss computed by hand in numpy.
"""

import numpy as np
import pyarrow as pa
import pydantic
import pytest
import tensorflow as tf

from twotower_assets.model.datasets import FeatureStatsBuilder, batch_to_features, feature_kinds
from twotower_assets.model.features import parse_feature_config
from twotower_assets.model.layers import FeatureStats, HistoryFeature, StringFeature
from twotower_assets.model.match_model import MatchModel, probe_match_model, save_match_model
from twotower_assets.model.towers import SAMPLING_PROBABILITY_COLUMN, TwoTowerModel
from twotower_assets.model.recipes import ModelRecipe, Optimizer, Schedule, Task, Towers
from twotower_assets.model.negatives import MixedNegatives, in_batch_losses
from twotower_assets.model.training import TrainingParams, tower_outputs, train_two_tower
from twotower_assets.model.warm_start import warm_start
from helpers.model import reload_towers

ITEMS = ["a", "b", "c", "d"]  # lookup rows 1..4; row 0 is the OOV row


def item_layer(size: int = 3) -> StringFeature:
    layer = StringFeature(ITEMS, size)
    layer(tf.constant(["a"]))  # build
    table = np.arange(5 * size, dtype=np.float32).reshape(5, size) + 1.0  # OOV row non-zero on purpose
    layer.embedding.set_weights([table])
    return layer


def table_of(layer: StringFeature) -> np.ndarray:
    return layer.embedding.get_weights()[0]


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_padding_unknown_ids_and_ids_past_the_length_do_not_change_the_pooled_vector(pooling):
    history = HistoryFeature(item_layer(), length=3, pooling=pooling)
    out = history(tf.constant(["a b", "a b zzz", "a b   ", "a b zzz d", "a  b"])).numpy()
    for row in out[1:]:
        np.testing.assert_allclose(row, out[0], rtol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_an_empty_or_all_unknown_history_is_zeros(pooling):
    history = HistoryFeature(item_layer(), length=4, pooling=pooling)
    out = history(tf.constant(["", "zzz yyy", "none"])).numpy()
    np.testing.assert_array_equal(out, np.zeros((3, 3)))


def test_mean_pooling_by_hand():
    ids = item_layer()
    history = HistoryFeature(ids, length=3, pooling="mean")
    table = table_of(ids)
    out = history(tf.constant(["c a", "d", "b b a d"])).numpy()
    np.testing.assert_allclose(out[0], (table[3] + table[1]) / 2, rtol=1e-6)
    np.testing.assert_allclose(out[1], table[4], rtol=1e-6)
    # Only the first (newest) 3 ids count; a repeated id counts twice.
    np.testing.assert_allclose(out[2], (2 * table[2] + table[1]) / 3, rtol=1e-6)


def test_attention_weights_sum_to_one_over_valid_positions_and_pool_by_them():
    ids = item_layer()
    history = HistoryFeature(ids, length=4, pooling="attention")
    history(tf.constant(["a"]))  # build the scoring layers
    # Non-zero position biases, so the weights are not uniform.
    history.position_bias.assign([0.5, -1.0, 2.0, 0.0])
    inputs = tf.constant(["a zzz c d", "b", ""])
    positions = history.item_positions(inputs)
    valid = positions.numpy() > 0
    np.testing.assert_array_equal(valid, [[1, 0, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    embedded = tf.cast(ids.embedding(positions), tf.float32)
    weights = history.attention_weights(embedded, positions > 0).numpy()
    np.testing.assert_allclose(weights.sum(axis=1), [1.0, 1.0, 0.0], rtol=1e-6)
    assert np.all(weights[~valid] == 0)
    assert weights[0, 2] > weights[0, 0]  # the larger position bias weighs more
    out = history(inputs).numpy()
    np.testing.assert_allclose(out, np.einsum("bl,ble->be", weights, embedded.numpy()), rtol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "sqrtn"])
def test_the_matrix_product_and_the_segment_sum_pool_to_the_same_vectors_and_gradients(pooling):
    """Long histories over a small catalogue are pooled by one matrix product over the batch's
    distinct ids, other batches by a segment sum per id: both give the same vectors, and the
    same gradient on the same rows of the id table."""
    rng = np.random.default_rng(0)
    rows = tf.constant([" ".join(rng.choice(ITEMS + ["zzz"], size=n)) for n in rng.integers(0, 12, size=40)])
    upstream = tf.constant(rng.normal(size=(40, 3)), tf.float32)
    pooled = {}
    for way, (per_id, cap) in {"product": (10**9, 10**9), "segments": (0, 0)}.items():
        ids = item_layer()
        history = HistoryFeature(ids, length=8, pooling=pooling)
        history.MATRIX_ENTRIES_PER_ID, history.MAX_MATRIX_ENTRIES = per_id, cap
        with tf.GradientTape() as tape:
            out = history(rows)
            loss = tf.reduce_sum(out * upstream)
        pooled[way] = (out.numpy(), tape.gradient(loss, ids.embedding.embeddings))
    (product, product_gradient), (segments, segments_gradient) = pooled["product"], pooled["segments"]
    np.testing.assert_allclose(product, segments, rtol=1e-5, atol=1e-6)
    # Sparse both ways (a lazy optimizer updates only these rows); the product's lists each id once.
    assert isinstance(product_gradient, tf.IndexedSlices) and isinstance(segments_gradient, tf.IndexedSlices)
    indices = product_gradient.indices.numpy()
    assert len(indices) == len(set(indices.tolist()))
    np.testing.assert_allclose(tf.convert_to_tensor(product_gradient).numpy(),
                               tf.convert_to_tensor(segments_gradient).numpy(), rtol=1e-5, atol=1e-5)


def test_unknown_pooling_is_refused():
    with pytest.raises(ValueError, match="unknown history pooling"):
        HistoryFeature(item_layer(), length=3, pooling="max")


# ----------------------------------------------------------------------------- dropout


def one_hot_item_layer() -> StringFeature:
    """Item k's vector is the unit vector e_k (OOV row: all ones), so a mean over a set of
    distinct items shows which items were kept: 1/|kept| at theirs, 0 elsewhere."""
    layer = StringFeature(ITEMS, 4)
    layer(tf.constant(["a"]))
    layer.embedding.set_weights([np.vstack([np.ones((1, 4)), np.eye(4)]).astype(np.float32)])
    return layer


def test_history_dropout_pools_the_mean_of_the_kept_ids_while_training():
    history = HistoryFeature(one_hot_item_layer(), length=4, dropout=0.5)
    rows = ["a b c d", "b d", "c zzz a", ""] * 250
    allowed = [{0, 1, 2, 3}, {1, 3}, {0, 2}, set()] * 250
    tf.random.set_seed(7)
    out = history(tf.constant(rows), training=True).numpy()
    kept_counts = []
    for vector, ids in zip(out, allowed):
        kept = set(np.flatnonzero(vector).tolist())
        assert kept <= ids  # only the row's own valid ids; padding and unknown ids never count
        expected = np.zeros(4, np.float32)
        expected[list(kept)] = 1.0 / len(kept) if kept else 0.0  # the mean over the kept ids
        np.testing.assert_allclose(vector, expected, rtol=1e-6)
        if ids:
            kept_counts.append((len(kept), len(ids)))
    kept, total = np.sum(kept_counts, axis=0)
    assert 0.45 < kept / total < 0.55  # each id kept with probability 1 - dropout
    assert any(k == 0 for k, _ in kept_counts)  # a row that loses every id pools to zeros
    # The same seed, the same draw.
    tf.random.set_seed(7)
    np.testing.assert_array_equal(history(tf.constant(rows), training=True).numpy(), out)


def test_history_dropout_is_off_at_inference_and_zero_dropout_is_the_plain_mean():
    ids = one_hot_item_layer()
    rows = tf.constant(["a b c d", "b d", "c zzz a", ""])
    plain = HistoryFeature(ids, length=4)(rows).numpy()
    np.testing.assert_allclose(plain[0], [0.25] * 4)
    dropped = HistoryFeature(ids, length=4, dropout=0.7)
    for training in (False, None):
        np.testing.assert_array_equal(dropped(rows, training=training).numpy(), plain)
    np.testing.assert_array_equal(HistoryFeature(ids, length=4, dropout=0.0)(rows, training=True).numpy(), plain)
    assert not np.array_equal(dropped(rows, training=True).numpy(), plain)


def test_history_dropout_close_to_one_drops_everything_while_training():
    history = HistoryFeature(one_hot_item_layer(), length=4, dropout=0.999999)
    tf.random.set_seed(3)
    out = history(tf.constant(["a b c d", "b d"] * 50), training=True).numpy()
    np.testing.assert_array_equal(out, np.zeros_like(out))


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_history_dropout_in_a_traced_training_step(pooling):
    """Inside a tf.function (how Keras trains) the training flag still switches the draw."""
    history = HistoryFeature(one_hot_item_layer(), length=4, pooling=pooling, dropout=0.5)
    rows = tf.constant(["a b c d"] * 64)
    step = tf.function(lambda training: history(rows, training=training))
    tf.random.set_seed(11)
    train_out = step(tf.constant(True)).numpy()
    assert len({tuple(v) for v in train_out.round(5)}) > 1  # rows kept different ids
    np.testing.assert_array_equal(step(tf.constant(False)).numpy(), history(rows).numpy())


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5])
def test_history_dropout_outside_zero_to_one_is_refused(dropout):
    with pytest.raises(ValueError, match=r"history dropout must be in \[0, 1\)"):
        HistoryFeature(item_layer(), length=3, dropout=dropout)


@pytest.mark.parametrize(
    "dropout, message",
    [(-0.1, "greater than or equal to 0"), (1.0, "less than 1"), ("0.5", "valid number"), (True, "valid number")],
)
def test_history_dropout_in_a_config_outside_zero_to_one_is_refused(dropout, message):
    from twotower_assets.model.features import FeatureConfigError

    with pytest.raises(FeatureConfigError, match=f"feature 'user_history' in user_embedding_layers: .*{message}"):
        history_config(dropout=dropout)


def test_dropout_applies_only_to_history_features():
    from twotower_assets.model.features import FeatureConfigError

    with pytest.raises(FeatureConfigError, match="as does 'dropout'"):
        parse_feature_config(
            {"user_embedding_layers": {"user_id": {"type": "string", "embedding_size": 4, "dropout": 0.5}},
             "item_embedding_layers": {"item_id": {"type": "string", "embedding_size": 4}}},
            name="bad", source="test",
        )


def test_history_dropout_reaches_the_layer_and_its_config():
    config = history_config(dropout=0.3)
    assert config.user_embedding_layers["user_history"].history_dropout == 0.3
    assert history_config().user_embedding_layers["user_history"].history_dropout == 0.0
    stats = FeatureStats(vocabularies={"user_id": ["u1", "u2"], "item_id": ITEMS})
    model = TwoTowerModel(config, stats, embedding_size=6)
    history = model.user_tower.feature_layers[1]
    assert history.dropout == 0.3
    saved = history.get_config()
    assert (saved["name"], saved["length"], saved["pooling"], saved["dropout"]) == (
        "user_history_history", 5, "mean", 0.3)


def test_the_training_loss_sees_history_dropout_and_validation_does_not():
    """compute_loss(training=True) passes the flag to the towers: with dropout the in-batch
    training loss changes from draw to draw, the validation loss does not."""
    stats = FeatureStats(vocabularies={"user_id": ["u1", "u2"], "item_id": ITEMS})
    model = TwoTowerModel(history_config(dropout=0.5), stats, embedding_size=6)
    features = {"user_id": tf.constant(["u1", "u2", "u1"]), "user_history": tf.constant(["a b c d", "c d a", "b c"]),
                "item_id": tf.constant(["d", "a", "b"]), SAMPLING_PROBABILITY_COLUMN: tf.constant([0.4, 0.3, 0.3])}
    tf.random.set_seed(5)
    training_losses = {round(float(model.compute_loss(features, training=True)), 6) for _ in range(8)}
    validation_losses = {round(float(model.compute_loss(features, training=False)), 6) for _ in range(3)}
    assert len(training_losses) > 1
    assert len(validation_losses) == 1


# ----------------------------------------------------------------------------- in the model


def history_config(pooling: str = "mean", length: int = 5, dropout=None):
    history = {"type": "history", "embedding_size": 8, "pooling": pooling, "length": length}
    if dropout is not None:
        history["dropout"] = dropout
    return parse_feature_config(
        {
            "user_embedding_layers": {
                "user_id": {"type": "string", "embedding_size": 4},
                "user_history": history,
            },
            "item_embedding_layers": {"item_id": {"type": "string", "embedding_size": 8}},
        },
        name="history-test",
        source="test",
    )


def test_the_history_shares_the_item_towers_id_embedding_and_both_towers_train_it():
    # Seeded: with some random weights every ReLU of the item head is off for one item, and its
    # row's gradient is zero by chance.
    tf.keras.utils.set_random_seed(0)
    config = history_config()
    stats = FeatureStats(vocabularies={"user_id": ["u1", "u2"], "item_id": ITEMS})
    model = TwoTowerModel(config, stats, embedding_size=6)
    features = {"user_id": tf.constant(["u1", "u2"]), "user_history": tf.constant(["a b", "c"]),
                "item_id": tf.constant(["d", "a"])}
    model(features)
    history_layer = model.user_tower.feature_layers[1]
    item_id_layer = model.item_tower.feature_layers[0]
    assert isinstance(history_layer, HistoryFeature)
    assert history_layer.item_ids is item_id_layer
    # One variable: listed once in the model's weights, though both towers reach it.
    shared = item_id_layer.embedding.embeddings
    assert sum(v is shared for v in model.trainable_variables) == 1
    assert any(v is shared for v in model.user_tower.trainable_variables)

    def gradient_rows(loss_of) -> set[int]:
        with tf.GradientTape() as tape:
            loss = loss_of()
        gradient = tape.gradient(loss, shared)
        dense = tf.convert_to_tensor(gradient).numpy()
        return set(np.flatnonzero(np.abs(dense).sum(axis=1) > 0).tolist())

    # The user tower alone trains the rows of the history's items (a=1, b=2, c=3) ...
    assert gradient_rows(lambda: tf.reduce_sum(model.user_tower(features))) == {1, 2, 3}
    # ... the item tower alone the rows of the batch's items (d=4, a=1) ...
    assert gradient_rows(lambda: tf.reduce_sum(model.item_tower(features))) == {1, 4}
    # ... and the training loss both.
    features[SAMPLING_PROBABILITY_COLUMN] = tf.constant([0.5, 0.5])
    assert gradient_rows(lambda: model.compute_loss(features, training=True)) == {1, 2, 3, 4}


def test_a_history_feature_needs_the_item_id_layer():
    from twotower_assets.model.features import FeatureConfigError
    from twotower_assets.model.layers import build_feature_layer

    config = history_config()
    with pytest.raises(FeatureConfigError, match="needs the item tower's id layer"):
        build_feature_layer("user_history", config.user_embedding_layers["user_history"], FeatureStats(), config)


def history_table(n_rows: int = 3000, seed: int = 0) -> pa.Table:
    """Users of group g click items of group g; their history holds earlier items of the group."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 120, n_rows)
    groups = users % 6
    items = groups * 8 + rng.integers(0, 8, n_rows)
    histories = [" ".join(f"i{g * 8 + j}" for j in rng.integers(0, 8, rng.integers(0, 6))) for g in groups]
    return pa.table({
        "user_id": [f"u{u}" for u in users],
        "user_history": histories,
        "item_id": [f"i{i}" for i in items],
    })


@pytest.fixture(scope="module")
def trained_history_model():
    # With history dropout: the SavedModel is traced with both branches of the training flag.
    config = history_config(pooling="attention", dropout=0.2)
    table = history_table()
    batch = table.combine_chunks().to_batches()[0]
    kinds = feature_kinds(config)
    builder = FeatureStatsBuilder(config)
    builder.update(batch)
    stats = builder.build()
    features = batch_to_features(batch, kinds)
    counts = table.group_by("item_id").aggregate([("item_id", "count")]).to_pydict()
    share = dict(zip(counts["item_id"], np.asarray(counts["item_id_count"]) / len(table)))
    features[SAMPLING_PROBABILITY_COLUMN] = np.array([share[i] for i in features["item_id"]], np.float32)
    dataset = tf.data.Dataset.from_tensor_slices(features)
    params = TrainingParams(recipe=ModelRecipe(towers=Towers(embedding_size=8), optimizer=Optimizer(learning_rate=0.05), schedule=Schedule(batch_size=256, epochs=20)))
    result = train_two_tower(config, stats, dataset, len(table), None, params)
    return config, stats, features, result


@pytest.mark.slow
def test_towers_with_a_history_feature_save_load_warm_start_and_serve(trained_history_model, tmp_path):
    config, stats, features, result = trained_history_model
    model = result.model
    # The saved towers were traced on the training rows: they take every column of a row.
    sample = {k: tf.constant(v[:64]) for k, v in features.items()}
    loaded_user, loaded_item = reload_towers(model, tmp_path, sample)

    # Warm start from the saved towers: the shared id table is mapped once (by the item tower),
    # and the new model's user tower sees the carried-over rows through the shared layer.
    fresh = TwoTowerModel(config, stats, embedding_size=8)
    fresh(sample)
    report = warm_start(fresh, loaded_user, loaded_item)
    assert report.embeddings["item_tower/item_id_string"].carried == len(stats.vocabularies["item_id"])
    np.testing.assert_allclose(fresh.user_tower(sample).numpy(), model.user_tower(sample).numpy(), rtol=1e-5, atol=1e-6)
    history = fresh.user_tower.feature_layers[1]
    np.testing.assert_allclose(history.position_bias.numpy(), model.user_tower.feature_layers[1].position_bias.numpy())

    # The published scorer from the towers' outputs: saved, loaded and probed.
    users = tf.data.Dataset.from_tensor_slices({k: v[:64] for k, v in features.items() if k in ("user_id", "user_history")})
    user_ids, user_vectors = tower_outputs(model.user_tower, users, ["user_id"])
    _, first = np.unique(user_ids["user_id"], return_index=True)
    catalog = tf.data.Dataset.from_tensor_slices({"item_id": np.array(stats.vocabularies["item_id"], dtype=object)})
    item_ids, item_vectors = tower_outputs(model.item_tower, catalog, ["item_id"])
    match = MatchModel(user_ids["user_id"][first], user_vectors[first], item_ids["item_id"], item_vectors)
    save_match_model(match, tmp_path / "match_model")
    n = min(len(first), len(item_vectors))
    probe_match_model(tmp_path / "match_model", user_ids["user_id"][first][:n], user_vectors[first][:n],
                      item_ids["item_id"][:n], item_vectors[:n])


@pytest.mark.slow
def test_training_with_a_history_learns_the_groups(trained_history_model):
    config, stats, features, result = trained_history_model
    assert result.history["loss"][-1] < result.history["loss"][0]
    model = result.model
    # A user with no id signal (unknown user) and a history of group 2 ranks group 2's items first.
    query = {"user_id": tf.constant(["nobody"]), "user_history": tf.constant(["i16 i17 i18 i19"])}
    item_ids = np.array([f"i{i}" for i in range(48)], dtype=object)
    scores = (model.user_tower(query).numpy() @ model.item_tower({"item_id": tf.constant(item_ids)}).numpy().T)[0]
    top = np.argsort(-scores)[:8]
    assert np.mean(top // 8 == 2) >= 0.75


# ----------------------------------------------------------------------------- mixed negatives


def id_config():
    return parse_feature_config(
        {"user_embedding_layers": {"user_id": {"type": "string", "embedding_size": 4}},
         "item_embedding_layers": {"item_id": {"type": "string", "embedding_size": 4}}},
        name="ids", source="test",
    )


def test_mixed_negative_loss_by_hand():
    config = id_config()
    stats = FeatureStats(vocabularies={"user_id": ["u1", "u2", "u3"], "item_id": ITEMS})
    catalog = {"item_id": np.array(ITEMS, dtype=object)}
    temperature = 0.5
    negatives = MixedNegatives(sampled=3)
    model = TwoTowerModel(config, stats, embedding_size=3, temperature=temperature, negatives=negatives, catalog=catalog)
    features = {"user_id": tf.constant(["u1", "u2", "u3"]), "item_id": tf.constant(["a", "b", "a"]),
                SAMPLING_PROBABILITY_COLUMN: tf.constant([0.5, 0.25, 0.5])}
    sampled_rows = tf.constant([1, 0, 3])  # b, a, d
    losses = negatives.losses(model, features, training=True, sampled_rows=sampled_rows).numpy()

    users = model.user_tower(features).numpy()
    items = model.item_tower(features).numpy()
    sampled = model.item_tower({"item_id": tf.constant(["b", "a", "d"])}).numpy()
    in_batch = users @ items.T / temperature - np.log(3 * np.array([0.5, 0.25, 0.5]))[None, :]
    uniform = users @ sampled.T / temperature - np.log(3 / 4)
    in_batch[0, 2] = in_batch[2, 0] = -1e9  # rows 0 and 2 both have item a: accidental hits
    uniform[0, 1] = uniform[2, 1] = uniform[1, 0] = -1e9  # a sampled item equal to the row's own
    logits = np.concatenate([in_batch, uniform], axis=1)
    expected = -np.array([logits[i, i] - np.log(np.exp(logits[i]).sum()) for i in range(3)])
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    # Training steps use it; evaluation stays in-batch (no random draw in val_loss).
    eval_loss = model.compute_loss(features, training=False).numpy()
    np.testing.assert_allclose(eval_loss, np.mean(in_batch_losses(model, features, mask_seen_pairs=False).numpy()),
                               rtol=1e-6)


def test_mixed_negatives_need_a_catalog_and_are_not_negative():
    stats = FeatureStats(vocabularies={"user_id": ["u1"], "item_id": ITEMS})
    with pytest.raises(ValueError, match="pass catalog"):
        TwoTowerModel(id_config(), stats, negatives=MixedNegatives(sampled=4))
    with pytest.raises(pydantic.ValidationError, match="sampled"):
        MixedNegatives(sampled=-1)
    with pytest.raises(pydantic.ValidationError, match="sampled"):
        MixedNegatives(sampled=0)


def test_training_with_mixed_negatives_decreases_the_loss():
    table = history_table(1500, seed=1).drop(["user_history"])
    config = id_config()
    batch = table.combine_chunks().to_batches()[0]
    builder = FeatureStatsBuilder(config)
    builder.update(batch)
    stats = builder.build()
    features = batch_to_features(batch, feature_kinds(config))
    features[SAMPLING_PROBABILITY_COLUMN] = np.full(len(table), 1 / 48, np.float32)
    catalog = {"item_id": np.array(stats.vocabularies["item_id"], dtype=object)}
    params = TrainingParams(recipe=ModelRecipe(towers=Towers(embedding_size=8), task=Task(negatives=MixedNegatives(sampled=32)), optimizer=Optimizer(learning_rate=0.05), schedule=Schedule(batch_size=128, epochs=3)))
    result = train_two_tower(config, stats, tf.data.Dataset.from_tensor_slices(features), len(table), None, params,
                             catalog=catalog)
    assert result.model.negatives.sampled == 32
    assert result.history["loss"][-1] < result.history["loss"][0]
