"""The split rules, run as SQL in a real DuckDB file, against hand-worked expectations."""

import datetime as dt
import hashlib

import pyarrow as pa
import pytest

from twotower_assets.data.synthetic import SyntheticSpec, generate_all
from twotower_assets.warehouse.duckdb import DuckDBWarehouse
from twotower_assets.identifiers import UnsafeIdentifierError
from twotower_assets.warehouse.sql import DUCKDB, latest_row_per_query, split_queries, training_examples_query

TRAIN_DATE = dt.date(2026, 3, 1)
D = lambda day: TRAIN_DATE - dt.timedelta(days=day)  # noqa: E731  (n days before the training date)


def events(rows):
    """rows: (user, item, days before the training date, hour)."""
    return pa.table(
        {
            "event_date": pa.array([D(d) for _, _, d, _ in rows], pa.date32()),
            "user_id": [u for u, *_ in rows],
            "item_id": [i for _, i, *_ in rows],
            "event_hour": pa.array([h for *_, h in rows], pa.int64()),
        }
    )


HAND_EVENTS = [
    # alice: 5 events -> floor(5 * 0.8) = 4 training, the 5th is held out (item x seen by bob in training, pair unseen).
    ("alice", "a", 9, 10), ("alice", "b", 8, 10), ("alice", "c", 7, 10), ("alice", "d", 6, 10), ("alice", "x", 5, 10),
    # bob: one event -> all training.
    ("bob", "x", 9, 1),
    # carol: 5 events; her 5th item "z" never occurs in training -> dropped.
    ("carol", "a", 9, 1), ("carol", "b", 8, 1), ("carol", "c", 7, 1), ("carol", "d", 6, 1), ("carol", "z", 5, 1),
    # dave: 5 events; his 5th repeats a training pair (dave, a) -> dropped.
    ("dave", "a", 9, 1), ("dave", "b", 8, 1), ("dave", "c", 7, 1), ("dave", "d", 6, 1), ("dave", "a", 5, 1),
    # erin: same day, ordered by hour: 2 events -> 1 training (hour 3), 1 held out (hour 20, item "b").
    ("erin", "b", 4, 20), ("erin", "a", 4, 3),
    # Outside the 10-day window or on the training date itself: ignored.
    ("alice", "old", 11, 1), ("alice", "today", 0, 1),
]


@pytest.fixture
def warehouse(tmp_path):
    return DuckDBWarehouse(path=str(tmp_path / "w.duckdb"))


def run_split(warehouse, table, train_set_size=0.8, window_days=10):
    warehouse.write_table("click_events", table)
    selects = split_queries(DUCKDB, "click_events", table.column_names)
    return warehouse.replace_partition_from_queries(
        {f"{name}_events": sql for name, sql in selects.items()},
        "train_date",
        TRAIN_DATE,
        {"start_date": TRAIN_DATE - dt.timedelta(days=window_days), "train_date": TRAIN_DATE,
         "train_set_size": train_set_size},
    )


def rows_of(warehouse, table):
    result = warehouse.query(f"SELECT user_id, item_id, event_date FROM {table} ORDER BY ALL")
    return [(r["user_id"], r["item_id"], r["event_date"]) for r in result.to_pylist()]


def is_validation(user, item, date):
    digest = hashlib.md5(f"{user}|{item}|{date.isoformat()}".encode()).hexdigest()
    return digest[-1] in "02468ace"


def test_split_follows_the_rules_on_hand_made_events(warehouse):
    counts = run_split(warehouse, events(HAND_EVENTS))
    training = rows_of(warehouse, "training_events")
    assert sorted((u, i) for u, i, _ in training) == sorted(
        [("alice", i) for i in "abcd"] + [("bob", "x")] + [("carol", i) for i in "abcd"]
        + [("dave", i) for i in "abcd"] + [("erin", "a")]
    )
    held_out = sorted(rows_of(warehouse, "validation_events") + rows_of(warehouse, "test_events"))
    assert held_out == sorted([("alice", "x", D(5)), ("erin", "b", D(4))])
    for user, item, date in rows_of(warehouse, "validation_events"):
        assert is_validation(user, item, date)
    for user, item, date in rows_of(warehouse, "test_events"):
        assert not is_validation(user, item, date)
    assert counts == {"training_events": 14, "validation_events": len(rows_of(warehouse, "validation_events")),
                      "test_events": len(rows_of(warehouse, "test_events"))}


def test_split_of_synthetic_data_has_no_leakage_and_is_stable(warehouse, tmp_path):
    table = generate_all(SyntheticSpec(end_date=D(1), num_users=200, num_items=80, num_events=6000, days=30))
    run_split(warehouse, table, window_days=30)
    first = {name: rows_of(warehouse, f"{name}_events") for name in ("training", "validation", "test")}
    training_users = {u for u, _, _ in first["training"]}
    training_items = {i for _, i, _ in first["training"]}
    training_pairs = {(u, i) for u, i, _ in first["training"]}
    assert first["validation"] and first["test"]
    for name in ("validation", "test"):
        for user, item, _ in first[name]:
            assert user in training_users and item in training_items and (user, item) not in training_pairs
    assert not set(first["validation"]) & set(first["test"])
    # A second run over the same events, in a different warehouse file, gives the same split.
    other = DuckDBWarehouse(path=str(tmp_path / "other.duckdb"))
    run_split(other, table, window_days=30)
    for name in first:
        assert rows_of(other, f"{name}_events") == first[name]


def test_rerunning_a_partition_replaces_it(warehouse):
    run_split(warehouse, events(HAND_EVENTS))
    run_split(warehouse, events(HAND_EVENTS))
    assert len(rows_of(warehouse, "training_events")) == 14


def test_identifiers_are_refused_unless_plain():
    with pytest.raises(UnsafeIdentifierError):
        split_queries(DUCKDB, "click_events; DROP TABLE x", ["user_id", "item_id", "event_date", "event_hour"])
    with pytest.raises(UnsafeIdentifierError):
        split_queries(DUCKDB, "click_events", ["user_id", "item_id", "event_date", "event_hour", "a b"])


def test_training_rows_come_in_the_same_order_whatever_order_the_table_holds_them(tmp_path):
    # Two events of one user, item, date and hour share the md5 key of the shuffle order; they
    # differ in another column, so without a tie-breaker their order (and the model) depends
    # on how the warehouse happens to scan the table.
    day = dt.date(2026, 6, 1)
    rows = [
        {"train_date": day, "user_id": "u1", "item_id": "i1", "event_date": day, "event_hour": 9, "booking_cnt": count}
        for count in (0, 1, 2)
    ] + [{"train_date": day, "user_id": f"u{n}", "item_id": "i2", "event_date": day, "event_hour": 3, "booking_cnt": 5}
         for n in range(2, 6)]
    columns = ["user_id", "item_id", "event_date", "event_hour", "booking_cnt"]
    orders = []
    for permutation in (rows, rows[::-1], rows[3:] + rows[:3]):
        warehouse = DuckDBWarehouse(path=str(tmp_path / f"{len(orders)}.duckdb"))
        warehouse.write_table("training_events", pa.Table.from_pylist(permutation))
        result = warehouse.query(training_examples_query(DUCKDB, "training_events", columns), {"train_date": day})
        orders.append(list(zip(result["user_id"].to_pylist(), result["booking_cnt"].to_pylist())))
    assert orders[0] == orders[1] == orders[2]
    tied = [count for user, count in orders[0] if user == "u1"]
    assert tied == [0, 1, 2]  # ties broken by the row's values


def test_each_users_latest_row_is_the_same_whatever_order_the_table_holds_them(tmp_path):
    # u1's two latest events share date, hour and item and differ in another column: the row
    # the user tower reads must not depend on the warehouse's scan order.
    day = dt.date(2026, 6, 1)
    rows = [
        {"train_date": day, "user_id": "u1", "item_id": "i1", "event_date": day, "event_hour": 9, "credit": credit}
        for credit in (3.0, 1.0, 2.0)
    ] + [{"train_date": day, "user_id": "u1", "item_id": "i0", "event_date": day, "event_hour": 8, "credit": 9.0}]
    chosen = []
    for permutation in (rows, rows[::-1], rows[1:] + rows[:1]):
        warehouse = DuckDBWarehouse(path=str(tmp_path / f"{len(chosen)}.duckdb"))
        warehouse.write_table("training_events", pa.Table.from_pylist(permutation))
        result = warehouse.query(latest_row_per_query(DUCKDB, "training_events", "user_id", ["credit"]), {"train_date": day})
        chosen.append(result.to_pylist())
    assert chosen[0] == chosen[1] == chosen[2]
    assert [row["credit"] for row in chosen[0]] == [3.0]  # the latest event; ties broken by the row's values
