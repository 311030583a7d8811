"""Request-time user vectors (twotower_assets/serving/user_encoder.py): the saved user tower run
on a request's recent items gives the batch pipeline's vector for the same history."""

import numpy as np
import pyarrow as pa
import pytest

from twotower_assets.model import in_memory
from twotower_assets.model.features import parse_feature_config
from twotower_assets.model.recipes import ModelRecipe, Schedule, Towers
from twotower_assets.model.training import TrainingParams
from twotower_assets.serving.user_encoder import UserEncoder

HISTORY_CONFIG = {
    "user_embedding_layers": {"user_id": {"type": "string", "embedding_size": 8},
                              "recent_3": {"type": "history", "embedding_size": 8, "length": 3}},
    "item_embedding_layers": {"item_id": {"type": "string", "embedding_size": 8}},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    rng = np.random.default_rng(0)
    users = rng.integers(0, 60, 1500)
    items = (users % 4) * 10 + rng.integers(0, 10, 1500)
    events = pa.table({"user_id": [f"u{u}" for u in users], "item_id": [f"i{i}" for i in items],
                       "event_timestamp": np.arange(1500)})
    config = parse_feature_config(HISTORY_CONFIG, "history-test", "test")
    # The training rows' history: each user's 3 latest earlier items (what the split computes).
    order = np.lexsort((np.arange(1500), users))
    history, last = [""] * 1500, {}
    for row in order:
        history[row] = " ".join(last.get(users[row], [])[:3])
        last[users[row]] = [f"i{items[row]}", *last.get(users[row], [])]
    table = events.append_column("recent_3", pa.array(history))
    fitted = in_memory.fit(config, table, None, TrainingParams(recipe=ModelRecipe(
        towers=Towers(embedding_size=8), schedule=Schedule(batch_size=128, epochs=2)), seed=1))
    directory = tmp_path_factory.mktemp("tower")
    fitted.model.user_tower.save(str(directory / "user_tower"), save_format="tf")
    (directory / "feature_config.json").write_text(config.model_dump_json())
    return fitted, table, directory


def test_the_vector_for_a_history_is_the_batch_pipelines_for_that_history(trained):
    fitted, table, directory = trained
    encoder = UserEncoder(directory / "user_tower", directory / "feature_config.json",
                          {f"i{n}" for n in range(40)})
    states = in_memory.user_state(fitted.config, table)  # each user's latest 3 items, newest first
    batch = in_memory.tower_vectors(fitted, "user", states)
    for row in (0, 7, 31):
        user, recent = states["user_id"][row].as_py(), states["recent_3"][row].as_py().split()
        vector, ignored = encoder.vector(user, None, [*recent, "not-an-item"])
        assert ignored == ["not-an-item"]
        np.testing.assert_allclose(vector, batch[row], atol=1e-6)
    # A new user: the id is unknown, the history carries the signal; the vector differs by history.
    one, _ = encoder.vector(None, None, ["i1", "i2"])
    other, _ = encoder.vector(None, None, ["i31", "i32"])
    assert np.linalg.norm(one) == pytest.approx(1.0, abs=1e-5) and not np.allclose(one, other)


def test_bad_request_features_are_named(trained):
    _, _, directory = trained
    encoder = UserEncoder(directory / "user_tower", directory / "feature_config.json", set())
    assert encoder.feature_names == []
    assert "has no feature ['age']" in encoder.check({"age": 3}, None)
    assert "recent_item_ids must be a list of item id strings" in encoder.check(None, "i1 i2")
    assert encoder.check(None, ["i1"]) is None
