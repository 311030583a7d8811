"""The public in-memory API: other splits than the graph's, trained with the product's model."""

import numpy as np
import pyarrow as pa
import pytest

from twotower_assets.model import in_memory
from twotower_assets.model.features import parse_feature_config
from twotower_assets.model.recipes import ModelRecipe, Optimizer, Schedule, Towers
from twotower_assets.model.training import TrainingParams

EVENTS = pa.table({
    "user_id": ["u1", "u1", "u1", "u2", "u2", "u3"],
    "item_id": ["a", "b", "c", "a", "d", "b"],
    "event_timestamp": [1, 3, 3, 5, 2, 9],
})


def test_leave_last_out_holds_out_each_users_latest_event():
    split = in_memory.leave_last_out(EVENTS)
    # u1's latest second holds b and c: the larger item id (c) is the test row; u3 has one event.
    assert sorted(zip(split.test["user_id"].to_pylist(), split.test["item_id"].to_pylist())) == [("u1", "c"), ("u2", "a")]
    assert sorted(zip(split.train["user_id"].to_pylist(), split.train["item_id"].to_pylist())) == [
        ("u1", "a"), ("u1", "b"), ("u2", "d"), ("u3", "b")]
    # The same split whatever the row order.
    shuffled = in_memory.leave_last_out(EVENTS.take(pa.array([5, 3, 1, 0, 4, 2])))
    assert sorted(shuffled.test["item_id"].to_pylist()) == sorted(split.test["item_id"].to_pylist())


def test_leave_last_out_names_a_missing_column():
    with pytest.raises(ValueError, match="no column 'event_timestamp'"):
        in_memory.leave_last_out(EVENTS.drop_columns(["event_timestamp"]))


def test_random_split_is_seeded_and_disjoint():
    events = pa.table({"user_id": [f"u{n % 7}" for n in range(100)], "item_id": [f"i{n}" for n in range(100)]})
    first, again = in_memory.random_split(events, 0.2, seed=3), in_memory.random_split(events, 0.2, seed=3)
    assert first.test.num_rows == 20 and first.train.num_rows == 80
    assert first.test["item_id"].to_pylist() == again.test["item_id"].to_pylist()
    assert not set(first.test["item_id"].to_pylist()) & set(first.train["item_id"].to_pylist())
    with pytest.raises(ValueError, match="test_share"):
        in_memory.random_split(events, 1.0)


def test_distinct_items_keeps_each_items_first_row_in_order_of_first_appearance():
    config = parse_feature_config({
        "user_embedding_layers": {"user_id": {"type": "string", "embedding_size": 4}},
        "item_embedding_layers": {"item_id": {"type": "string", "embedding_size": 4}},
    }, "ids", "test")
    catalog = in_memory.distinct_items(EVENTS, config)
    # a (row 0), b (row 1), c (row 2), d (row 4): the later rows of a and b are dropped.
    assert catalog["item_id"].to_pylist() == ["a", "b", "c", "d"]
    assert catalog["user_id"].to_pylist() == ["u1", "u1", "u1", "u2"]
    assert catalog["event_timestamp"].to_pylist() == [1, 3, 3, 2]


HISTORY_CONFIG = parse_feature_config({
    "user_embedding_layers": {"user_id": {"type": "string", "embedding_size": 4},
                              "user_recent_items": {"type": "history", "embedding_size": 4, "length": 2}},
    "item_embedding_layers": {"item_id": {"type": "string", "embedding_size": 4}},
}, "history-test", "test")


def test_history_from_gives_each_row_its_users_other_latest_items_of_the_history_only():
    history = pa.table({
        "user_id": ["u1", "u1", "u1", "u1", "u2"],
        "item_id": ["a", "b", "c", "d", "a"],
        "event_timestamp": [1, 4, 3, 2, 7],
        "user_recent_items": ["stale"] * 5,
    })
    # Rows: two of the history (their own item is left out), a held-out one (not in the
    # history: never an input), a user the history lacks.
    rows = pa.table({"user_id": ["u1", "u1", "u1", "u2", "u9"], "item_id": ["b", "c", "z", "a", "a"],
                     "event_timestamp": [4, 3, 0, 7, 1], "user_recent_items": ["stale"] * 5})
    out = in_memory.history_from(HISTORY_CONFIG, rows, history)
    # u1 newest first: b (4), c (3), d (2), a (1); length 2, the row's own item skipped.
    assert out["user_recent_items"].to_pylist() == ["c d", "b d", "b c", "", ""]
    assert out.column_names == rows.column_names and out["item_id"].to_pylist() == rows["item_id"].to_pylist()
    # A table without the column gets it.
    assert in_memory.history_from(HISTORY_CONFIG, rows.drop_columns(["user_recent_items"]), history)[
        "user_recent_items"].to_pylist() == ["c d", "b d", "b c", "", ""]
    with pytest.raises(ValueError, match="no column 'event_timestamp'"):
        in_memory.history_from(HISTORY_CONFIG, rows, history.drop_columns(["event_timestamp"]))


def test_history_from_keeps_a_random_splits_test_ratings_out_of_the_training_rows():
    rng = np.random.default_rng(1)
    events = pa.table({"user_id": [f"u{n % 5}" for n in range(200)], "item_id": [f"i{n}" for n in range(200)],
                       "event_timestamp": rng.permutation(200)})
    split = in_memory.random_split(events, 0.2, seed=4)
    train = in_memory.history_from(HISTORY_CONFIG, split.train, split.train)
    seen = {i for s in train["user_recent_items"].to_pylist() for i in s.split()}
    assert seen and seen <= set(split.train["item_id"].to_pylist())
    # Each user's rows share the user's latest two training items, minus their own.
    state = in_memory.user_state(HISTORY_CONFIG, split.train)
    latest = dict(zip(state["user_id"].to_pylist(), state["user_recent_items"].to_pylist()))
    for user, item, recent in zip(*(train[c].to_pylist() for c in ("user_id", "item_id", "user_recent_items"))):
        assert item not in recent.split()
        if item not in latest[user].split():
            assert recent == latest[user]


@pytest.mark.slow
def test_fit_on_a_leave_last_out_split_learns_the_groups():
    # Users of group g click only items of group g (as tests/test_model.py's learnable table):
    # trained on a leave-last-out split, each held-out user scores its group's items higher.
    rng = np.random.default_rng(0)
    users = rng.integers(0, 200, 4000)
    items = (users % 8) * 10 + rng.integers(0, 10, 4000)
    events = pa.table({"user_id": [f"u{u}" for u in users], "item_id": [f"i{i}" for i in items],
                       "event_timestamp": np.arange(4000)})
    config = parse_feature_config({
        "user_embedding_layers": {"user_id": {"type": "string", "embedding_size": 8}},
        "item_embedding_layers": {"item_id": {"type": "string", "embedding_size": 8}},
    }, "groups", "test")
    split = in_memory.leave_last_out(events)
    assert split.test.num_rows == 200
    fitted = in_memory.fit(config, split.train, split.test,
                           TrainingParams(recipe=ModelRecipe(towers=Towers(embedding_size=8), optimizer=Optimizer(learning_rate=0.05), schedule=Schedule(batch_size=64, epochs=20)), seed=3))
    catalogue = pa.table({"item_id": [f"i{n}" for n in range(80)]})
    scores = in_memory.tower_vectors(fitted, "user", split.test) @ in_memory.tower_vectors(fitted, "item", catalogue).T
    user_group = np.array([int(u[1:]) % 8 for u in split.test["user_id"].to_pylist()])
    same = user_group[:, None] == (np.arange(80) // 10)[None, :]
    assert scores[same].mean() > scores[~same].mean() + 0.2


def _groups_events(n_events: int = 4000):
    """Users of group g click only items of group g, as above."""
    rng = np.random.default_rng(0)
    users = rng.integers(0, 200, n_events)
    items = (users % 8) * 10 + rng.integers(0, 10, n_events)
    return pa.table({"user_id": [f"u{u}" for u in users], "item_id": [f"i{i}" for i in items],
                     "event_timestamp": np.arange(n_events)})


GROUPS_CONFIG = {
    "user_embedding_layers": {"user_id": {"type": "string", "embedding_size": 8}},
    "item_embedding_layers": {"item_id": {"type": "string", "embedding_size": 8}},
}


def test_a_ranking_monitor_keeps_the_epoch_with_the_best_validation_ranking():
    config = parse_feature_config(GROUPS_CONFIG, "groups", "test")
    split = in_memory.leave_last_out(_groups_events(), validation=True)
    recipe = ModelRecipe(
        towers=Towers(embedding_size=8), optimizer=Optimizer(learning_rate=0.05),
        schedule=Schedule(batch_size=64, epochs=8, min_delta=0.0, early_stopping_patience=2, monitor="recall@10"),
    )
    fitted = in_memory.fit(config, split.train, split.validation, TrainingParams(recipe=recipe, seed=3))
    values = fitted.result.history["val_recall_at_10"]
    assert len(values) == fitted.result.epochs_run and "val_ndcg_at_10" in fitted.result.history
    # Kept: the first epoch with the highest validation recall@10 (0-based), not val_loss's best.
    assert fitted.result.kept_epoch == int(np.argmax(values))
    # And the model holds that epoch's weights: ranking the validation rows again gives its value.
    evaluator = in_memory.ranking_evaluator(config, split.train, split.validation, 10)
    assert evaluator(fitted.model)["recall"] == pytest.approx(max(values), abs=1e-6)


def test_a_ranking_monitor_needs_a_ranking_of_the_validation_users():
    from twotower_assets.model.training import train_two_tower
    from twotower_assets.model.tuning import EpochRanking

    config = parse_feature_config(GROUPS_CONFIG, "groups", "test")
    split = in_memory.leave_last_out(_groups_events(400), validation=True)
    params = TrainingParams(recipe=ModelRecipe(towers=Towers(embedding_size=8),
                                               schedule=Schedule(batch_size=32, epochs=1, monitor="ndcg@10")))
    fitted = in_memory.fit(config, split.train, split.validation, params)  # in_memory builds it
    assert "val_ndcg_at_10" in fitted.result.history
    evaluator = in_memory.ranking_evaluator(config, split.train, split.validation, 5)
    with pytest.raises(ValueError, match=r"schedule.monitor is 'ndcg@10'.*k = 10.*got one at k = 5"):
        in_memory.fit(config, split.train, split.validation, params, ranking=EpochRanking(evaluator, "ndcg"))
    with pytest.raises(ValueError, match=r"schedule.monitor is 'ndcg@10'.*got none"):
        # Refused before any data is read: a fit would otherwise run without its early stopping.
        train_two_tower(config, fitted.stats, train_examples=None, train_rows=10, validation_examples=object(),
                        params=params)


def test_a_monitor_that_is_not_a_validation_metric_is_refused():
    from twotower_assets.model.recipes import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=r"schedule\.monitor"):
        load_recipe("production", {"schedule": {"monitor": "precision@5"}})
    assert load_recipe("production", {"schedule": {"monitor": "ndcg@10"}}).schedule.ranking_monitor == ("ndcg", 10)
