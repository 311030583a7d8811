"""Shared by the model tests: a click table a retrieval model must learn, and saving a model's
towers and loading them back."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from twotower_assets.model.towers import SAMPLING_PROBABILITY_COLUMN
from twotower_assets.model.warm_start import load_towers


def learnable_table(n_rows: int = 4000, seed: int = 0, n_users: int = 200, n_groups: int = 8) -> pa.Table:
    """Users of group g click only items of group g: a retrieval model must learn the groups."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n_rows)
    groups = users % n_groups
    items = groups * 10 + rng.integers(0, 10, n_rows)
    counts = np.bincount(items, minlength=10 * n_groups)
    return pa.table(
        {
            "user_id": [f"u{u}" for u in users],
            "item_id": [f"i{i}" for i in items],
            "booking_cnt": rng.integers(0, 5, n_rows),
            "user_queries": [f"topic{g} words" for g in groups],
            "offer_category_id": [f"c{g}" for g in groups],
            "item_names": [f"name{g} thing" for g in groups],
            "item_mean_stock_price": rng.random(n_rows) * 20,
            "item_image_embedding": [json.dumps([float(g)] * 16) if i % 9 else "bad" for g, i in zip(groups, items)],
            SAMPLING_PROBABILITY_COLUMN: counts[items] / n_rows,
        }
    )


def reload_towers(model, directory: Path, batch: dict):
    """Save both towers as SavedModels under ``directory``, load them back as a warm start does
    (:func:`load_towers`), and check that the loaded towers give the live towers' vectors on
    ``batch``. Returns the loaded (user, item)."""
    user_dir, item_dir = directory / "user_tower", directory / "item_tower"
    model.user_tower.save(str(user_dir), save_format="tf")
    model.item_tower.save(str(item_dir), save_format="tf")
    user, item = load_towers(user_dir, item_dir)
    np.testing.assert_allclose(user(batch).numpy(), model.user_tower(batch).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(item(batch).numpy(), model.item_tower(batch).numpy(), rtol=1e-5, atol=1e-6)
    return user, item
