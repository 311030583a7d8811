"""Every shipped config builds its towers and trains one tiny epoch on the synthetic data."""

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from twotower_assets.data.movielens import recent_items
from twotower_assets.data.synthetic import SyntheticSpec, generate_all
from twotower_assets.model.datasets import FeatureStatsBuilder, feature_kinds, load_dataset, save_dataset
from twotower_assets.model.features import available_configs, load_feature_config
from twotower_assets.model.recipes import ModelRecipe, Schedule, Towers
from twotower_assets.model.training import TrainingParams, tower_outputs, train_two_tower
from twotower_assets.model.towers import SAMPLING_PROBABILITY_COLUMN


@pytest.fixture(scope="module")
def events() -> pa.Table:
    table = generate_all(SyntheticSpec(end_date=dt.date(2026, 5, 31), num_users=150, num_items=64,
                                       num_events=1500, days=10))
    counts = pc.value_counts(table["item_id"])
    share = dict(zip(counts.field("values").to_pylist(), (np.array(counts.field("counts")) / table.num_rows).tolist()))
    return table.append_column(SAMPLING_PROBABILITY_COLUMN, pa.array([share[i] for i in table["item_id"].to_pylist()]))


def with_histories(events: pa.Table, config) -> pa.Table:
    """The history columns the split SQL would add (tests/test_history_feature.py checks the SQL
    against this same reference, recent_items, with the hour as the time)."""
    if not config.history_features:
        return events
    ordered = events.sort_by([("event_date", "ascending"), ("event_hour", "ascending"), ("item_id", "ascending")])
    days = np.array(pc.cast(ordered["event_date"], pa.int32()))
    time = days.astype(np.int64) * 24 + np.array(ordered["event_hour"])
    users, items = np.array(ordered["user_id"].to_pylist()), np.array(ordered["item_id"].to_pylist())
    for name, spec in config.history_features.items():
        values = recent_items(users, time, users, items, time, spec.history_length)
        ordered = ordered.append_column(name, pa.array(values, pa.string()))
    return ordered


@pytest.mark.parametrize("config_name", [c for c in available_configs() if c != "movielens-features"])
def test_config_trains_one_epoch(config_name, events, tmp_path):
    config = load_feature_config(config_name)
    events = with_histories(events, config)
    config.check_columns(events.column_names)
    kinds = {**feature_kinds(config), SAMPLING_PROBABILITY_COLUMN: "number"}
    builder = FeatureStatsBuilder(config)
    rows = save_dataset(events.to_batches(max_chunksize=500), kinds, tmp_path / "train", on_batch=builder.update)
    dataset = load_dataset(tmp_path / "train")
    result = train_two_tower(config, builder.build(), dataset, rows, dataset.take(200),
                             TrainingParams(recipe=ModelRecipe(towers=Towers(embedding_size=4), schedule=Schedule(batch_size=128, epochs=1)), seed=0))
    assert result.epochs_run == 1 and np.isfinite(result.history["loss"][0])
    ids, vectors = tower_outputs(result.model.user_tower, dataset.take(300), [config.user_id_feature])
    assert vectors.shape == (300, 4) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert set(ids[config.user_id_feature]) <= set(events[config.user_id_feature].to_pylist()) | {"none"}
