"""Shared by the model tests: saving a model's towers and loading them back."""

from pathlib import Path

import numpy as np

from twotower_assets.model.warm_start import load_towers


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
