"""Per-user recommendations in the warehouse: VECTOR_SEARCH over-fetch plus an anti-join.

The BigQuery statement is parsed with sqlglot's BigQuery dialect (bqemulator has no
VECTOR_SEARCH); the DuckDB equivalent, which shares everything but the candidate generator,
runs for real and is compared with a hand-rolled numpy brute force.
"""

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest
import sqlglot
from sqlglot import exp

from twotower_assets.defs.publishing.embeddings import history_rows
from twotower_assets.defs.publishing.recommendations import RecommendationsConfig, _in_warehouse
from twotower_assets.lib import layout
from twotower_assets.lib.layout import ModelSummary
from twotower_assets.warehouse.duckdb import DuckDBWarehouse
from twotower_assets.warehouse.errors import EmptyTableError
from twotower_assets.warehouse.recommendation_sql import (
    RecommendationSearch,
    max_seen_items_query,
    recommendations_query,
)
from twotower_assets.warehouse.sql import BIGQUERY, DUCKDB

DAY, OTHER_DAY = dt.date(2026, 6, 1), dt.date(2026, 5, 25)
RUN = {"mlflow_run_id": "run-1", "mlflow_experiment_name": "e", "mlflow_run_name": "n"}
K = 3

rng = np.random.default_rng(11)
USER_IDS = np.array(["none", "u1", "u2", "u3", "u4", "u5"])  # 'none': the key of a NULL user id
USERS = rng.normal(size=(6, 5))
ITEM_IDS = np.array([f"i{n:02d}" for n in range(12)])
ITEMS = rng.normal(size=(12, 5))
SCORES = USERS @ ITEMS.T
# u1 has seen its own 4 best items (more than K: over-fetching by K alone would leave it short);
# u2 has seen every item but one; u3 nothing; NULL user ids have seen one item; u4 a repeat.
SEEN = {
    "none": [ITEM_IDS[np.argmax(SCORES[0])]],
    "u1": list(ITEM_IDS[np.argsort(-SCORES[1], kind="stable")[:4]]),
    "u2": list(ITEM_IDS[1:]),
    "u3": [],
    "u4": ["i03", "i03", "i07"],
    "u5": ["i00"],
}
MAX_SEEN = 11  # u2's distinct items


def training_rows(day: dt.date, seen: dict[str, list[str]]) -> pa.Table:
    users = [None if user == "none" else user for user, items in seen.items() for _ in items]
    items = [item for item_list in seen.values() for item in item_list]
    return pa.table({"train_date": pa.array([day] * len(items), pa.date32()),
                     "user_id": pa.array(users, pa.string()), "item_id": pa.array(items, pa.string())})


def load(warehouse) -> RecommendationSearch:
    users = warehouse.table_name(layout.USER_EMBEDDING_HISTORY)
    items = warehouse.table_name(layout.ITEM_EMBEDDING_HISTORY)
    training = warehouse.table_name(layout.TRAINING_EVENTS)
    for day, shift, seen in ((DAY, 0.0, SEEN), (OTHER_DAY, 3.0, {"u3": list(ITEM_IDS)})):  # other dates ignored
        order = np.random.default_rng(1).permutation(len(ITEM_IDS))  # table order must not matter
        warehouse.replace_partition(users, "train_date", day, history_rows("user", day, RUN, USER_IDS, USERS + shift))
        warehouse.replace_partition(items, "train_date", day, history_rows("item", day, RUN, ITEM_IDS[order], ITEMS[order] - shift))
        warehouse.replace_partition(training, "train_date", day, training_rows(day, seen))
    return RecommendationSearch(users, items, training, "user_id", K, MAX_SEEN)


def brute_force(k: int, candidates: int) -> dict[str, list[tuple[str, float]]]:
    """Hand-rolled: each user's ``candidates`` best items (ties to the smaller id), seen ones dropped, first k kept."""
    expected = {}
    for row, user in enumerate(USER_IDS):
        best = np.argsort(-SCORES[row], kind="stable")[:candidates]
        unseen = [(ITEM_IDS[c], SCORES[row, c]) for c in best if ITEM_IDS[c] not in SEEN[user]][:k]
        if unseen:
            expected[user] = unseen
    return expected


def recommended(table: pa.Table) -> dict[str, list[tuple[str, float]]]:
    assert set(table["mlflow_run_id"].to_pylist()) == {"run-1"}
    return {row["user_id"]: list(zip(row["item_ids"], row["scores"])) for row in table.to_pylist()}


def assert_same(actual, expected):
    assert {u: [i for i, _ in rows] for u, rows in actual.items()} == {u: [i for i, _ in rows] for u, rows in expected.items()}
    for user, rows in expected.items():
        np.testing.assert_allclose([s for _, s in actual[user]], [s for _, s in rows], rtol=1e-9)


@pytest.fixture
def duckdb_warehouse(tmp_path):
    return DuckDBWarehouse(path=str(tmp_path / "recommendations.duckdb"))


def test_over_fetching_by_the_most_seen_items_gives_the_exact_top_k_unseen(duckdb_warehouse):
    search = load(duckdb_warehouse)
    seen = duckdb_warehouse.query(max_seen_items_query(DUCKDB, search.training_table, "user_id"), {"train_date": DAY})
    assert seen["max_seen_items"].to_pylist() == [MAX_SEEN]
    rows = duckdb_warehouse.query(recommendations_query(DUCKDB, search), {"train_date": DAY, "mlflow_run_id": "run-1"})
    assert rows.schema.names == ["mlflow_run_id", "user_id", "item_ids", "scores"]
    actual = recommended(rows)
    # every item for every user, seen ones removed: the exact answer
    assert_same(actual, brute_force(K, len(ITEM_IDS)))
    assert [i for i, _ in actual["u2"]] == ["i00"]  # only one unseen item left
    assert "i03" not in dict(actual["u4"]) and "i07" not in dict(actual["u4"])
    assert dict(actual["none"]).keys().isdisjoint(SEEN["none"])  # NULL user ids matched as 'none'


def test_too_small_an_over_fetch_leaves_heavy_users_short(duckdb_warehouse):
    search = load(duckdb_warehouse)
    short = RecommendationSearch(search.users_table, search.items_table, search.training_table, "user_id", K, 1)
    actual = recommended(duckdb_warehouse.query(recommendations_query(DUCKDB, short), {"train_date": DAY, "mlflow_run_id": "run-1"}))
    assert_same(actual, brute_force(K, K + 1))
    # u1's 4 best are all seen: none of its K + 1 candidates survives, so it gets no row
    assert "u1" not in actual and len(actual["u3"]) == K


def test_the_in_warehouse_path_writes_the_partition_and_refuses_missing_vectors(duckdb_warehouse):
    class VectorSearchDuckDB(DuckDBWarehouse):
        """DuckDB taking the in-warehouse path, its brute-force SQL standing in for VECTOR_SEARCH."""

        @property
        def has_vector_search(self) -> bool:
            return True

    warehouse = VectorSearchDuckDB(path=duckdb_warehouse.path)
    summary = ModelSummary.model_construct(user_key="user_id", mlflow_run_id="run-1")
    load(warehouse)
    with pytest.raises(EmptyTableError, match="no vectors for 2026-06-02"):
        _in_warehouse(warehouse, RecommendationsConfig(k=K), summary, dt.date(2026, 6, 2))
    metadata = _in_warehouse(warehouse, RecommendationsConfig(k=K), summary, DAY)
    assert metadata["candidates_per_user"] == K + MAX_SEEN and metadata["computed_by"] == "warehouse VECTOR_SEARCH"
    table = warehouse.query(f"SELECT * FROM {layout.RECOMMENDATIONS}")
    assert table.schema.names == ["train_date", "mlflow_run_id", "user_id", "item_ids", "scores"]
    assert set(table["train_date"].to_pylist()) == {DAY}
    assert metadata["dagster/row_count"] == table.num_rows == len(USER_IDS)
    assert_same(recommended(table.drop(["train_date"])), brute_force(K, len(ITEM_IDS)))


def test_recommendation_sql_parses_as_bigquery_with_the_over_fetch_and_the_anti_join():
    search = RecommendationSearch("p.d.users", "p.d.items", "p.d.training", "user_id", 100, 40)
    tree = sqlglot.parse_one(recommendations_query(BIGQUERY, search), read="bigquery")
    [vector_search] = list(tree.find_all(exp.VectorSearch))
    assert vector_search.args["column_to_search"].name == "item_embedding"
    options = {e.this.name.lower(): e.expression for e in vector_search.find_all(exp.Kwarg)}
    assert int(options["top_k"].name) == 140  # k + the over-fetch
    assert options["distance_type"].name == "DOT_PRODUCT"
    ctes = {cte.alias for cte in tree.find_all(exp.CTE)}
    assert ctes == {"candidates", "seen", "unseen", "ranked"}
    assert {t.sql("bigquery") for t in tree.find_all(exp.Table) if t.name and t.name not in ctes} == {
        "`p.d.users`", "`p.d.items`", "`p.d.training`"}
    assert {p.name for p in tree.find_all(exp.Parameter)} == {"train_date", "mlflow_run_id"}
    [join] = [j for j in tree.find_all(exp.Join) if j.side == "LEFT"]
    assert join.this.alias_or_name == "seen"
    assert any(isinstance(n.this, exp.Column) and n.this.table == "seen" for n in tree.find_all(exp.Is))
    assert [s.alias_or_name for s in tree.selects] == ["mlflow_run_id", "user_id", "item_ids", "scores"]
    assert tree.find(exp.Where).sql("bigquery") == "WHERE item_rank <= 100"


def test_bad_searches_are_refused():
    fields = {"users_table": "p.d.u", "items_table": "p.d.i", "training_table": "p.d.t", "user_key": "user_id"}
    with pytest.raises(ValueError, match="k must be"):
        RecommendationSearch(**fields, k=0, extra_candidates=0)
    with pytest.raises(ValueError, match="extra_candidates must be"):
        RecommendationSearch(**fields, k=5, extra_candidates=-1)
    with pytest.raises(ValueError, match="over 10000"):
        RecommendationSearch(**fields, k=5000, extra_candidates=5001)
    with pytest.raises(ValueError, match="not a plain"):
        RecommendationSearch(**{**fields, "user_key": "user_id; DROP TABLE x"}, k=5, extra_candidates=0)


def test_the_over_fetch_query_runs_on_the_emulator(bq_warehouse):
    search = load(bq_warehouse)
    seen = bq_warehouse.query(max_seen_items_query(BIGQUERY, search.training_table, "user_id"), {"train_date": DAY})
    assert seen["max_seen_items"].to_pylist() == [MAX_SEEN]
