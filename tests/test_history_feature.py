"""History features (data side): computed by the split SQL from the click events.

Hand-written events in a real DuckDB file through the real split query and the per-user row
query; the BigQuery spelling is parsed with sqlglot here (tests/bigquery/test_history_split.py
runs it on the emulator); the synthetic generator's day rule still holds with its sessions.
"""

import datetime as dt
import json

import numpy as np
import pyarrow as pa
import pytest
import sqlglot

from twotower_assets.data.movielens import recent_items
from twotower_assets.data.synthetic import SyntheticSpec, generate_all, generate_days
from twotower_assets.model.datasets import FeatureStatsBuilder, feature_kinds, save_dataset
from twotower_assets.defs.splits.input_validation import InputDataError, check_column_types, validate_training_input
from twotower_assets.model.features import load_feature_config, parse_feature_config
from twotower_assets.warehouse.duckdb import DuckDBWarehouse
from twotower_assets.warehouse.sql import BIGQUERY, DUCKDB, latest_row_per_query, split_queries

TRAIN_DATE = dt.date(2026, 3, 1)
D = lambda day: TRAIN_DATE - dt.timedelta(days=day)  # noqa: E731  (n days before the training date)
HISTORY = {"recent_3": 3, "recent_1": 1}


def events(rows, timestamps=None):
    """rows: (user, item, days before the training date, hour)."""
    columns = {
        "event_date": pa.array([D(d) for _, _, d, _ in rows], pa.date32()),
        "user_id": [u for u, *_ in rows],
        "item_id": [i for _, i, *_ in rows],
        "event_hour": pa.array([h for *_, h in rows], pa.int64()),
    }
    if timestamps is not None:
        columns["event_timestamp"] = pa.array(timestamps, pa.int64())
    return pa.table(columns)


# u1: a and b at the same hour (neither sees the other), then c, d, e, f at later times.
# u3 makes d, e, f training items, so u1's held-out d, e, f are kept (validation / test).
# u2's second event (item a) is held out too: every split carries the history column.
HAND_EVENTS = [
    ("u1", "b", 9, 10), ("u1", "a", 9, 10), ("u1", "c", 9, 12), ("u1", "d", 8, 9), ("u1", "e", 7, 8), ("u1", "f", 7, 9),
    ("u2", "x", 9, 10), ("u2", "a", 8, 10),
    ("u3", "d", 9, 1), ("u3", "e", 9, 2), ("u3", "f", 9, 3), ("u3", "g", 9, 4), ("u3", "h", 9, 5), ("u3", "i", 9, 6),
    # Outside the window: neither a row nor anyone's history.
    ("u1", "old", 11, 1), ("u1", "today", 0, 1),
]


@pytest.fixture
def warehouse(tmp_path):
    return DuckDBWarehouse(path=str(tmp_path / "w.duckdb"))


def run_split(warehouse, table, history=HISTORY, train_set_size=0.5, window_days=10, train_date=TRAIN_DATE):
    warehouse.write_table("click_events", table)
    selects = split_queries(DUCKDB, "click_events", table.column_names, history)
    counts = warehouse.replace_partition_from_queries(
        {f"{name}_events": sql for name, sql in selects.items()},
        "train_date",
        train_date,
        {"start_date": train_date - dt.timedelta(days=window_days), "train_date": train_date,
         "train_set_size": train_set_size},
    )
    return {name: warehouse.query(f"SELECT * FROM {name}_events").to_pylist() for name in selects}, counts


def by_user_item(rows, column):
    return {(r["user_id"], r["item_id"]): r[column] for r in rows}


def test_history_is_strictly_earlier_newest_first_cut_to_length_and_per_user(warehouse):
    splits, _ = run_split(warehouse, events(HAND_EVENTS))
    everything = [row for rows in splits.values() for row in rows]
    recent = by_user_item(everything, "recent_3")
    assert recent[("u1", "a")] == "" and recent[("u1", "b")] == ""  # first events; same hour as each other
    assert recent[("u1", "c")] == "b a"  # ties newest first = item id descending
    assert recent[("u1", "d")] == "c b a"
    assert recent[("u1", "e")] == "d c b"  # length 3
    assert recent[("u1", "f")] == "e d c"
    assert recent[("u2", "x")] == "" and recent[("u2", "a")] == "x"  # only the user's own items
    assert recent[("u3", "f")] == "e d"
    assert by_user_item(everything, "recent_1")[("u1", "f")] == "e"
    assert all("old" not in r["recent_3"].split() and r["item_id"] not in ("old", "today") for r in everything)


def test_every_split_carries_the_history_column(warehouse):
    splits, counts = run_split(warehouse, events(HAND_EVENTS))
    held_out = {(r["user_id"], r["item_id"]): r["recent_3"] for r in splits["validation"] + splits["test"]}
    assert held_out == {("u1", "d"): "c b a", ("u1", "e"): "d c b", ("u1", "f"): "e d c", ("u2", "a"): "x"}
    assert by_user_item(splits["training"], "recent_3")[("u1", "c")] == "b a"
    assert all(set(HISTORY) <= set(warehouse.table_schema(f"{name}_events").names) for name in splits)


def test_no_history_features_leaves_the_split_as_it_was(warehouse):
    splits, _ = run_split(warehouse, events(HAND_EVENTS), history={})
    assert "recent_3" not in splits["training"][0]
    assert split_queries(DUCKDB, "click_events", ["user_id", "item_id", "event_date", "event_hour"]) == split_queries(
        DUCKDB, "click_events", ["user_id", "item_id", "event_date", "event_hour"], {}
    )


HISTORY_CONFIG = parse_feature_config(
    {"user_embedding_layers": {"user_id": {"type": "string", "embedding_size": 8},
                               "recent_3": {"type": "history", "embedding_size": 8, "length": 3}},
     "item_embedding_layers": {"item_id": {"type": "string", "embedding_size": 8}}},
    name="history-test", source="test",
)


def test_a_split_made_without_the_history_is_named_by_the_input_checks(warehouse, tmp_path):
    earlier = TRAIN_DATE - dt.timedelta(days=1)
    run_split(warehouse, events(HAND_EVENTS), history={}, train_date=earlier)
    with pytest.raises(InputDataError, match=r"has no column 'recent_3'.*split_tables with config_name 'history-test'"):
        validate_training_input(warehouse, HISTORY_CONFIG, earlier)
    # A later split with the history adds the column (DuckDB); the earlier date's rows are
    # NULL there, and the checks refuse them rather than read them as empty histories.
    run_split(warehouse, events(HAND_EVENTS), train_date=TRAIN_DATE)
    assert warehouse.partition_row_counts("training_events", "train_date").keys() == {earlier, TRAIN_DATE}
    nulls = warehouse.query("SELECT train_date, COUNT(*) AS n FROM training_events WHERE recent_3 IS NULL GROUP BY 1")
    assert nulls["train_date"].to_pylist() == [earlier]
    with pytest.raises(InputDataError, match=r"training_events.recent_3 is NULL in \d+ rows.*config_name 'history-test'"):
        validate_training_input(warehouse, HISTORY_CONFIG, earlier)


def test_a_history_column_of_the_wrong_type_is_refused():
    schema = pa.schema([("user_id", pa.string()), ("item_id", pa.string()), ("recent_3", pa.int64())])
    with pytest.raises(InputDataError, match="history features need the split's string column"):
        check_column_types(HISTORY_CONFIG, schema, "training_events")


def test_event_timestamp_gives_the_time_to_the_second(tmp_path):
    # With event_timestamp (MovieLens) events of one hour are ordered by it, and only the same
    # second is excluded.
    rows = [("u1", "a", 5, 10), ("u1", "b", 5, 10), ("u1", "c", 5, 10), ("u1", "d", 5, 11)]
    table = events(rows, timestamps=[100, 100, 160, 4000])
    splits, _ = run_split(DuckDBWarehouse(path=str(tmp_path / "w.duckdb")), table, train_set_size=0.99)
    recent = by_user_item([r for rows in splits.values() for r in rows], "recent_3")
    assert recent == {("u1", "a"): "", ("u1", "b"): "", ("u1", "c"): "b a"}  # d: the held-out last event, dropped


@pytest.mark.parametrize("with_timestamp", [False, True])
def test_random_events_match_the_movielens_reference(tmp_path, with_timestamp):
    # Many users, many ties: the SQL equals the MovieLens loader's numpy recent_items (how the
    # MovieLens feature is computed) on every training row.
    rng = np.random.default_rng(5)
    n = 600
    users, items = rng.integers(0, 12, n), rng.integers(0, 40, n)
    days, hours = rng.integers(1, 8, n), rng.integers(0, 3, n)
    rows = [(f"u{u}", f"i{i}", int(d), int(h)) for u, i, d, h in zip(users, items, days, hours)]
    seconds = (10 - days) * 86_400 + hours * 3600 + rng.integers(0, 3, n)  # ties inside an hour too
    time = seconds if with_timestamp else (10 - days) * 24 + hours
    table = events(rows, timestamps=seconds.tolist() if with_timestamp else None)
    warehouse = DuckDBWarehouse(path=str(tmp_path / "w.duckdb"))
    warehouse.write_table("click_events", table)
    sql = split_queries(DUCKDB, "click_events", table.column_names, {"recent": 7})["training"]
    got = warehouse.query(sql, {"start_date": D(10), "train_date": TRAIN_DATE, "train_set_size": 0.999999})

    # recent_items breaks ties by input order: give it the events sorted by (time, item).
    user_ids, item_ids = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
    order = np.lexsort((item_ids, time))
    expected = recent_items(user_ids[order], time[order], user_ids[order], item_ids[order], time[order], 7)
    # Events of one user, item and time have one history (same time: same earlier events).
    expected_by_event = dict(zip(zip(user_ids[order], item_ids[order], time[order].tolist()), expected))
    if with_timestamp:
        got_time = got["event_timestamp"].to_pylist()
    else:
        got_days = [(TRAIN_DATE - d).days for d in got["event_date"].to_pylist()]
        got_time = [(10 - d) * 24 + h for d, h in zip(got_days, got["event_hour"].to_pylist())]
    got_events = list(zip(got["user_id"].to_pylist(), got["item_id"].to_pylist(), got_time))
    assert len(got_events) == n - 12  # every event but each user's last is training
    assert [h for h in got["recent"].to_pylist()] == [expected_by_event[e] for e in got_events]
    assert sum(1 for h in got["recent"].to_pylist() if len(h.split()) == 7) > n / 2


def test_a_source_column_with_the_history_name_is_refused():
    with pytest.raises(ValueError, match=r"already has a column 'user_recent_items'.*history feature"):
        split_queries(DUCKDB, "click_events", ["user_id", "item_id", "event_date", "event_hour", "user_recent_items"],
                      {"user_recent_items": 20})
    with pytest.raises(ValueError, match="length >= 1"):
        split_queries(DUCKDB, "click_events", ["user_id", "item_id", "event_date", "event_hour"], {"h": 0})


# ----------------------------------------------------------------- the user's published row


def test_the_users_row_carries_the_history_up_to_and_including_its_latest_event(tmp_path):
    day = TRAIN_DATE
    rows = [  # a training table: u1's latest two events share an hour (both in the history)
        ("u1", "a", D(9), 10, "x"), ("u1", "b", D(8), 10, "x"), ("u1", "c", D(7), 10, "c-before"),
        ("u1", "e", D(6), 11, "b a"), ("u1", "d", D(6), 11, "b a"),
        ("u2", "z", D(5), 3, ""),
        ("u3", "y", D(5), 3, "from another date"),
    ]
    table = pa.table({
        "train_date": pa.array([day] * 6 + [D(1)], pa.date32()),
        "user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
        "event_date": pa.array([r[2] for r in rows], pa.date32()), "event_hour": pa.array([r[3] for r in rows], pa.int64()),
        "recent_3": [r[4] for r in rows], "recent_1": [r[4] for r in rows], "credit": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],
    })
    warehouse = DuckDBWarehouse(path=str(tmp_path / "w.duckdb"))
    warehouse.write_table("training_events", table)
    sql = latest_row_per_query(DUCKDB, "training_events", "user_id", ["credit", "recent_3", "recent_1"], HISTORY)
    result = warehouse.query(sql, {"train_date": day}).to_pylist()
    assert result == [
        {"credit": 4.0, "user_id": "u1", "recent_3": "e d c", "recent_1": "e"},
        {"credit": 6.0, "user_id": "u2", "recent_3": "z", "recent_1": "z"},
    ]
    with pytest.raises(ValueError, match="per 'user_id'"):
        latest_row_per_query(DUCKDB, "training_events", "item_id", ["recent_3"], HISTORY)


def test_the_users_row_uses_event_timestamp_when_given(tmp_path):
    table = pa.table({
        "train_date": pa.array([TRAIN_DATE] * 3, pa.date32()), "user_id": ["u1"] * 3, "item_id": ["a", "b", "c"],
        "event_date": pa.array([D(2)] * 3, pa.date32()), "event_hour": pa.array([5, 5, 5], pa.int64()),
        "event_timestamp": pa.array([30, 10, 20], pa.int64()), "recent": ["", "", ""],
    })
    warehouse = DuckDBWarehouse(path=str(tmp_path / "w.duckdb"))
    warehouse.write_table("training_events", table)
    sql = latest_row_per_query(DUCKDB, "training_events", "user_id", ["recent"], {"recent": 5},
                               time_columns=["event_timestamp"])
    assert warehouse.query(sql, {"train_date": TRAIN_DATE})["recent"].to_pylist() == ["a c b"]


# ----------------------------------------------------------------- BigQuery's spelling


def test_bigquery_history_sql_parses_as_bigquery():
    columns = ["user_id", "item_id", "event_date", "event_hour", "credit"]
    for sql in [*split_queries(BIGQUERY, "p.d.click_events", columns, HISTORY).values(),
                latest_row_per_query(BIGQUERY, "p.d.training_events", "user_id", ["credit", *HISTORY], HISTORY)]:
        tree = sqlglot.parse_one(sql, read="bigquery")
        assert tree is not None
        assert "@train_date" in sql and "2026" not in sql
        assert "LAG(" in sql or "STRING_AGG(" in sql


# ----------------------------------------------------------------- datasets and configs


def test_a_history_column_is_a_string_input_without_its_own_vocabulary(tmp_path):
    config = load_feature_config("default-features-history")
    assert config.history_features["user_recent_items"].history_length == 50
    kinds = feature_kinds(config)
    assert kinds["user_recent_items"] == "history"
    table = pa.table({name: pa.array(["1"] * 2) for name in kinds}).set_column(
        list(kinds).index("user_recent_items"), "user_recent_items", pa.array(["i1 i2", None])
    )
    for name, kind in kinds.items():
        if kind == "number":
            table = table.set_column(table.column_names.index(name), name, pa.array([1.0, 2.0]))
    builder = FeatureStatsBuilder(config)
    save_dataset(table.to_batches(), kinds, tmp_path / "d")
    builder.update(table.to_batches()[0])
    stats = builder.build()
    assert "user_recent_items" not in stats.vocabularies and "user_recent_items" not in stats.text_vocabularies
    from twotower_assets.model.datasets import load_dataset

    values = [row["user_recent_items"].numpy().decode() for row in load_dataset(tmp_path / "d")]
    assert values == ["i1 i2", ""]  # no history is the empty list, not an id called "none"


def test_the_history_config_is_default_features_plus_two_views_of_the_history():
    with open("configs/default-features.json") as f:
        default = json.load(f)
    with open("configs/default-features-history.json") as f:
        history = json.load(f)
    extra = {"user_recent_items": {"type": "history", "embedding_size": 64, "pooling": "mean", "length": 50},
             "user_latest_items": {"type": "history", "embedding_size": 64, "pooling": "attention", "length": 10}}
    assert history == {**default, "user_embedding_layers": {**default["user_embedding_layers"], **extra}}


# ----------------------------------------------------------------- the synthetic generator


def test_a_day_is_the_same_alone_or_inside_a_range_with_sessions():
    spec = SyntheticSpec(end_date=dt.date(2026, 5, 31), num_users=80, num_items=64, num_events=4000, days=20)
    day = dt.date(2026, 5, 20)
    alone = dict(generate_days(spec, [day]))[day]
    inside = dict(generate_days(spec, [dt.date(2026, 5, 10) + dt.timedelta(days=i) for i in range(15)]))[day]
    assert alone.equals(inside)


def category_shares(events_table: pa.Table) -> tuple[float, float]:
    """(share of a user's non-first events whose category is the previous event's, share whose
    category is the user's most frequent one); events in each user's time order (date, hour,
    item id)."""
    import pyarrow.compute as pc

    ordered = events_table.sort_by([("user_id", "ascending"), ("event_date", "ascending"),
                                    ("event_hour", "ascending"), ("item_id", "ascending")])
    user = pc.dictionary_encode(ordered["user_id"]).combine_chunks().indices.to_numpy()
    label = pc.dictionary_encode(ordered["offer_category_id"]).combine_chunks().indices.to_numpy()
    same_user = user[1:] == user[:-1]
    previous = float(np.mean(label[1:][same_user] == label[:-1][same_user]))
    counts = np.zeros((user.max() + 1, label.max() + 1), np.int64)
    np.add.at(counts, (user, label), 1)
    top = counts.argmax(axis=1)  # ties: the smallest label
    return previous, float(np.mean(label[1:][same_user] == top[user[1:][same_user]]))


def test_synthetic_users_have_sessions_a_history_can_learn():
    # The share of events whose category is the user's previous event's category is well above
    # the share that is the user's overall top category: the order carries what the mix does not.
    events_table = generate_all(SyntheticSpec(end_date=dt.date(2026, 5, 31), num_users=300, num_items=200,
                                              num_events=20_000, days=40))
    previous_category, top_category = category_shares(events_table)
    assert previous_category > top_category + 0.05


# ----------------------------------------------------------------- through the asset graph


@pytest.mark.slow
def test_split_and_datasets_assets_carry_the_history(tmp_path):
    from helpers.graph import TINY_PARTITION, make_resources, materialize_all, tiny_run_config

    from twotower_assets.lib import layout
    from twotower_assets.model.datasets import load_dataset

    resources = make_resources(tmp_path / "home")
    config = {"config_name": "default-features-history"}
    result = materialize_all(
        resources,
        selection=[layout.CLICK_EVENTS, *layout.SPLIT_TABLES.values(), "tf_datasets"],
        run_config={"ops": {op: values for op, values in tiny_run_config(split_tables=config, tf_datasets=config)[
            "ops"].items() if op in ("click_events", "split_tables", "tf_datasets")}},
    )
    assert result.success
    warehouse = resources["warehouse"]
    training = warehouse.query("SELECT * FROM training_events").to_pylist()
    assert all(isinstance(r["user_recent_items"], str) for r in training)
    length = load_feature_config("default-features-history").user_embedding_layers["user_recent_items"].length
    assert all(len(r["user_recent_items"].split()) <= length for r in training)
    assert sum(1 for r in training if len(r["user_recent_items"].split()) >= 20) > len(training) / 2
    # The config's second view of the same history: its 10 latest items, the first 10 of the 50.
    assert all(r["user_latest_items"].split() == r["user_recent_items"].split()[:10] for r in training)
    # Each user's dataset row: the `length` latest training items, newest first (hour, then item id).
    latest = {}
    for r in sorted(training, key=lambda r: (r["event_date"], r["event_hour"], r["item_id"]), reverse=True):
        latest.setdefault(r["user_id"], []).append(r["item_id"])
    users = resources["artifacts"].path(layout.TF_DATASETS, TINY_PARTITION) / "users"
    rows = {row["user_id"].numpy().decode(): (row["user_recent_items"].numpy().decode(),
                                              row["user_latest_items"].numpy().decode()) for row in load_dataset(users)}
    assert len(rows) == len(latest)
    assert all(rows[user] == (" ".join(items[:length]), " ".join(items[:10])) for user, items in latest.items())
