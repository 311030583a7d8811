"""The GPU path, tested on CPU: MirroredStrategy over several replicas, mixed precision.

TensorFlow fixes its devices when it first initialises them, so each check runs in a fresh
Python process: two logical CPU devices stand in for two GPUs (MirroredStrategy does not
care what the devices are), and the mixed-precision policy cannot leak into other tests.
"""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # each test trains twice in a fresh TensorFlow process

PREAMBLE = textwrap.dedent(
    """
    import datetime as dt, json, sys
    import numpy as np, pyarrow as pa, pyarrow.compute as pc
    import twotower_assets
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from twotower_assets.data.synthetic import SyntheticSpec, generate_click_events
    from twotower_assets.model.datasets import FeatureStatsBuilder, feature_kinds, load_blocks, save_dataset
    from twotower_assets.model.features import load_feature_config
    from twotower_assets.model.towers import SAMPLING_PROBABILITY_COLUMN
    from twotower_assets.model.recipes import ModelRecipe, Optimizer, Schedule, Towers
    from twotower_assets.model.training import TrainingParams, train_two_tower, tower_outputs

    spec = SyntheticSpec(end_date=dt.date(2026, 5, 31), num_users=300, num_items=120, num_events=6000, days=10, seed=3)
    events = pa.concat_tables(generate_click_events(spec))
    counts = pc.value_counts(events["item_id"])
    share = dict(zip(counts.field("values").to_pylist(), (np.array(counts.field("counts")) / events.num_rows).tolist()))
    events = events.append_column(SAMPLING_PROBABILITY_COLUMN, pa.array([share[i] for i in events["item_id"].to_pylist()]))
    config = load_feature_config("tiny-features")
    kinds = {**feature_kinds(config), SAMPLING_PROBABILITY_COLUMN: "number"}
    builder = FeatureStatsBuilder(config)
    directory = sys.argv[1]
    rows = save_dataset(events.to_batches(max_chunksize=1000), kinds, directory + "/train", on_batch=builder.update)
    stats = builder.build()
    data = load_blocks(directory + "/train")

    def train(batch_size, mixed_precision=False, **kwargs):
        recipe = ModelRecipe(towers=Towers(embedding_size=8), optimizer=Optimizer(learning_rate=0.05),
                             schedule=Schedule(batch_size=batch_size, epochs=3))
        params = TrainingParams(recipe=recipe, seed=1, mixed_precision=mixed_precision)
        return train_two_tower(config, stats, data, rows, None, params, **kwargs)
    """
)


def run_script(body: str, tmp_path: Path) -> dict:
    script = tmp_path / "script.py"
    script.write_text(PREAMBLE + textwrap.dedent(body))
    completed = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_mirrored_strategy_over_two_replicas_trains_with_the_global_mean_loss(tmp_path):
    result = run_script(
        """
        mirrored = train(128, strategy=tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
        # One device with the replicas' slice size: the same number of in-batch negatives.
        single = train(64)
        print(json.dumps({"mirrored": mirrored.history["loss"], "single": single.history["loss"],
                          "device": mirrored.device,
                          "norms": np.linalg.norm(tower_outputs(mirrored.model.user_tower, data, ["user_id"])[1], axis=1).tolist()}))
        """,
        tmp_path,
    )
    mirrored, single = result["mirrored"], result["single"]
    assert "MirroredStrategy over 2 replicas" in result["device"]
    assert all(np.isfinite(mirrored)) and mirrored[-1] < mirrored[0]
    # Summed over replicas without the 1/replicas scaling, the loss would read twice as high.
    assert abs(mirrored[0] - single[0]) / single[0] < 0.15
    assert np.allclose(result["norms"], 1.0, atol=1e-4)


def test_mixed_precision_trains_and_does_not_leak_into_the_next_model(tmp_path):
    result = run_script(
        """
        mixed = train(128, mixed_precision=True)
        policy_during = mixed.model.item_tower.hidden.dtype_policy.name
        ids, vectors = tower_outputs(mixed.model.item_tower, data, ["item_id"])
        plain = train(128)
        print(json.dumps({"loss": mixed.history["loss"], "device": mixed.device, "policy_during": policy_during,
                          "policy_after": tf.keras.mixed_precision.global_policy().name,
                          "dtype": str(vectors.dtype), "norms": np.linalg.norm(vectors, axis=1).tolist(),
                          "plain_compute": plain.model.item_tower.compute_dtype}))
        """,
        tmp_path,
    )
    assert result["policy_during"] == "mixed_bfloat16" and "mixed_bfloat16" in result["device"]
    assert all(np.isfinite(result["loss"])) and result["loss"][-1] < result["loss"][0]
    assert result["dtype"] == "float32" and np.allclose(result["norms"], 1.0, atol=1e-3)
    assert result["policy_after"] == "float32" and result["plain_compute"] == "float32"

