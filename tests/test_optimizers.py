"""LazyAdam (twotower_assets/model/optimizers.py): sparse rows updated lazily, dense exactly as Adam."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pydantic
import pytest
import tensorflow as tf

from helpers.model import learnable_table
from twotower_assets.model.datasets import FeatureStatsBuilder, feature_kinds, load_dataset, save_dataset
from twotower_assets.model.features import load_feature_config
from twotower_assets.model.optimizers import LazyAdam, make_optimizer
from twotower_assets.model.towers import SAMPLING_PROBABILITY_COLUMN
from twotower_assets.model.recipes import ModelRecipe, Optimizer, Schedule, Towers
from twotower_assets.model.training import TrainingParams, build_model, train_two_tower

REPO = Path(__file__).resolve().parents[1]
LR, B1, B2, EPS = 0.1, 0.9, 0.999, 1e-7


def lookup_step(optimizer, table, ids, weights):
    """One step of loss = sum_k <table[ids[k]], weights[k]>: an IndexedSlices gradient, row
    ids[k] getting weights[k] (a repeated id gets the sum, once Keras has summed duplicates)."""

    @tf.function(reduce_retracing=True)
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.gather(table, ids) * weights)
        gradient = tape.gradient(loss, table)
        assert isinstance(gradient, tf.IndexedSlices)
        optimizer.apply_gradients([(gradient, table)])

    step()


def state(optimizer, table):
    return table.numpy().copy(), optimizer._momentums[0].numpy().copy(), optimizer._velocities[0].numpy().copy()


def test_untouched_rows_and_their_moments_stay_bit_for_bit_unchanged():
    rng = np.random.default_rng(0)
    initial = rng.normal(size=(10, 4)).astype(np.float32)
    table = tf.Variable(initial)
    optimizer = LazyAdam(learning_rate=LR)
    lookup_step(optimizer, table, tf.constant([1, 3, 7]), rng.normal(size=(3, 4)).astype(np.float32))
    before = state(optimizer, table)
    lookup_step(optimizer, table, tf.constant([3, 5, 3]), rng.normal(size=(3, 4)).astype(np.float32))
    after = state(optimizer, table)

    untouched = [0, 1, 2, 4, 6, 7, 8, 9]  # 1 and 7 have non-zero moments from the first step
    for old, new in zip(before, after):
        np.testing.assert_array_equal(new[untouched], old[untouched])
    assert np.all(before[1][[1, 7]] != 0)
    assert not np.array_equal(after[0][[3, 5]], before[0][[3, 5]])

    # Stock Adam decays every row's moments, touched or not: the test above can tell them apart.
    table = tf.Variable(initial)
    adam = tf.keras.optimizers.Adam(learning_rate=LR)
    lookup_step(adam, table, tf.constant([1, 3, 7]), rng.normal(size=(3, 4)).astype(np.float32))
    m_before = adam._momentums[0].numpy().copy()
    lookup_step(adam, table, tf.constant([3, 5, 3]), rng.normal(size=(3, 4)).astype(np.float32))
    assert not np.array_equal(adam._momentums[0].numpy()[1], m_before[1])


def test_touched_rows_follow_the_lazy_adam_formula_with_a_duplicated_index():
    rng = np.random.default_rng(1)
    initial = rng.normal(size=(6, 3)).astype(np.float32)
    batches = [
        (np.array([1, 4, 1]), rng.normal(size=(3, 3)).astype(np.float32)),  # row 1 twice
        (np.array([4, 2]), rng.normal(size=(2, 3)).astype(np.float32)),  # row 1 not touched
        (np.array([1, 1, 1, 2]), rng.normal(size=(4, 3)).astype(np.float32)),
    ]
    table = tf.Variable(initial)
    optimizer = LazyAdam(learning_rate=LR, beta_1=B1, beta_2=B2, epsilon=EPS)
    for ids, weights in batches:
        lookup_step(optimizer, table, tf.constant(ids), weights)

    # By hand, in float32 like the variables (1 - beta_2 is 0.00099998713 in float32):
    # duplicates summed, m and v decayed at the touched rows only, bias correction by the
    # global step t (1, 2, 3), the variable moved at the touched rows only.
    f = np.float32
    b1, b2, lr, eps = f(B1), f(B2), f(LR), f(EPS)
    w, m, v = initial.copy(), np.zeros((6, 3), f), np.zeros((6, 3), f)
    for t, (ids, weights) in enumerate(batches, start=1):
        g = {}
        for i, row in zip(ids, weights):
            g[i] = g.get(i, f(0)) + row
        alpha = lr * np.sqrt(f(1) - b2 ** f(t)) / (f(1) - b1 ** f(t))
        for i, gi in g.items():
            m[i] = b1 * m[i] + (f(1) - b1) * gi
            v[i] = b2 * v[i] + (f(1) - b2) * gi**2
            w[i] = w[i] - alpha * m[i] / (np.sqrt(v[i]) + eps)
    new_w, new_m, new_v = state(optimizer, table)
    np.testing.assert_allclose(new_m, m, rtol=1e-6)
    np.testing.assert_allclose(new_v, v, rtol=1e-6)
    np.testing.assert_allclose(new_w, w, rtol=1e-6)
    np.testing.assert_array_equal(new_w[[0, 3, 5]], initial[[0, 3, 5]])  # never touched
    assert optimizer.iterations.numpy() == 3


def test_dense_variables_get_exactly_the_stock_adam_update():
    rng = np.random.default_rng(2)
    initial = rng.normal(size=(5, 3)).astype(np.float32)
    gradients = [rng.normal(size=(5, 3)).astype(np.float32) for _ in range(3)]
    results = []
    for optimizer in (LazyAdam(learning_rate=LR), tf.keras.optimizers.Adam(learning_rate=LR)):
        variable = tf.Variable(initial)
        for gradient in gradients:
            optimizer.apply_gradients([(tf.constant(gradient), variable)])
        results.append(state(optimizer, variable))
    for lazy, stock in zip(*results):
        np.testing.assert_array_equal(lazy, stock)


def test_amsgrad_is_refused():
    with pytest.raises(ValueError, match="amsgrad"):
        LazyAdam(amsgrad=True)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    config = load_feature_config("tiny-features")
    kinds = {**feature_kinds(config), SAMPLING_PROBABILITY_COLUMN: "number"}
    builder = FeatureStatsBuilder(config)
    directory = tmp_path_factory.mktemp("optimizer-data")
    rows = save_dataset(learnable_table(3000, n_users=150, n_groups=6).to_batches(max_chunksize=1000), kinds, directory / "train", on_batch=builder.update)
    return config, builder.build(), load_dataset(directory / "train"), rows


def test_two_tower_model_trains_with_lazy_adam(tiny_data):
    config, stats, dataset, rows = tiny_data
    params = TrainingParams(recipe=ModelRecipe(towers=Towers(embedding_size=8), optimizer=Optimizer(learning_rate=0.05, name="lazy_adam"), schedule=Schedule(batch_size=64, epochs=4)), seed=3)
    result = train_two_tower(config, stats, dataset, rows, None, params)
    assert type(result.model.optimizer) is LazyAdam
    losses = result.history["loss"]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] * 0.9


def test_run_config_switch_chooses_the_optimizer(tiny_data):
    config, stats, _, _ = tiny_data
    assert TrainingParams().recipe.optimizer.name == "lazy_adam"
    assert "adam" in Optimizer.model_fields["name"].description
    stock = build_model(config, stats, TrainingParams(recipe=ModelRecipe(towers=Towers(embedding_size=4), optimizer=Optimizer(name="adam"))))
    assert type(stock.optimizer) is tf.keras.optimizers.Adam
    lazy = build_model(config, stats, TrainingParams(recipe=ModelRecipe(towers=Towers(embedding_size=4))))
    assert type(lazy.optimizer) is LazyAdam
    assert float(lazy.optimizer.learning_rate) == pytest.approx(TrainingParams().recipe.optimizer.learning_rate)
    with pytest.raises(pydantic.ValidationError):
        TrainingParams(recipe=ModelRecipe(optimizer=Optimizer(name="sgd")))
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("sgd", 0.1)


MIRRORED_AND_MIXED = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import twotower_assets
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from twotower_assets.model.optimizers import LazyAdam

    out = {}
    # MirroredStrategy: each replica looks up its own ids (row 3 on both); the all-reduced
    # IndexedSlices reach the optimizer, duplicates summed, untouched rows left alone.
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    initial = np.random.default_rng(0).normal(size=(8, 2)).astype(np.float32)
    with strategy.scope():
        table = tf.Variable(initial)
        optimizer = LazyAdam(learning_rate=0.1)
    per_replica_ids = [[[1, 3], [3, 6]], [[2, 2], [3, 0]]]  # step -> replica -> ids

    @tf.function
    def step(ids_0, ids_1):
        def replica_fn():
            ctx = tf.distribute.get_replica_context()
            ids = tf.cond(ctx.replica_id_in_sync_group == 0, lambda: ids_0, lambda: ids_1)
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.gather(table, ids))
            optimizer.apply_gradients([(tape.gradient(loss, table), table)])
        strategy.run(replica_fn)

    snapshots = []
    for ids in per_replica_ids:
        step(tf.constant(ids[0]), tf.constant(ids[1]))
        snapshots.append([table.numpy().tolist(), optimizer._momentums[0].numpy().tolist(),
                          optimizer._velocities[0].numpy().tolist()])
    out["mirrored"] = {"initial": initial.tolist(), "snapshots": snapshots}

    # Mixed precision: bfloat16 compute, float32 embedding table; only its looked-up rows move.
    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    embedding = tf.keras.layers.Embedding(50, 4)
    dense = tf.keras.layers.Dense(1)
    embedding.build((None,))
    start = embedding.embeddings.numpy().copy()
    optimizer = LazyAdam(learning_rate=0.1)
    @tf.function
    def mixed_step(ids):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.cast(dense(embedding(ids)), tf.float32) ** 2)
        variables = embedding.trainable_variables + dense.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    mixed_step(tf.constant([5, 9, 5]))
    changed = np.where(np.any(embedding.embeddings.numpy() != start, axis=1))[0].tolist()
    out["mixed"] = {"dtype": embedding.embeddings.dtype.name, "compute": embedding(tf.constant([1])).dtype.name,
                    "changed_rows": changed}
    print(json.dumps(out))
    """
)


def test_lazy_adam_under_mirrored_strategy_and_mixed_precision(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(MIRRORED_AND_MIXED)
    completed = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])

    mirrored = result["mirrored"]
    f = np.float32
    b1, b2, eps = f(B1), f(B2), f(EPS)
    w, m, v = np.array(mirrored["initial"], f), np.zeros((8, 2), f), np.zeros((8, 2), f)
    steps = [[[1, 3], [3, 6]], [[2, 2], [3, 0]]]
    for t, (step, snapshot) in enumerate(zip(steps, mirrored["snapshots"]), start=1):
        # The gradient of a sum of looked-up rows is one per lookup, summed over both replicas.
        counts = np.bincount(np.concatenate(step), minlength=8).astype(f)
        touched = counts > 0
        g = counts[:, None] * np.ones((1, 2), f)
        alpha = f(0.1) * np.sqrt(f(1) - b2 ** f(t)) / (f(1) - b1 ** f(t))
        m[touched] = b1 * m[touched] + (f(1) - b1) * g[touched]
        v[touched] = b2 * v[touched] + (f(1) - b2) * g[touched] ** 2
        w[touched] -= alpha * m[touched] / (np.sqrt(v[touched]) + eps)
        np.testing.assert_allclose(snapshot[0], w, rtol=1e-6)
        np.testing.assert_allclose(snapshot[1], m, rtol=1e-6)
        np.testing.assert_allclose(snapshot[2], v, rtol=1e-6)
    # Row 6 was touched on step 1 only: step 2 left its weights and moments bit for bit.
    first, second = mirrored["snapshots"]
    assert all(first[k][6] == second[k][6] for k in range(3)) and first[1][6] != [0.0, 0.0]

    assert result["mixed"] == {"dtype": "float32", "compute": "bfloat16", "changed_rows": [5, 9]}
