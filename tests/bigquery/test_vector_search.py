"""Nearest-neighbour SQL: exact on DuckDB and on the emulator, VECTOR_SEARCH parsed by sqlglot.

bqemulator has no VECTOR_SEARCH or CREATE VECTOR INDEX, so the native BigQuery statements are
checked by parsing them with sqlglot's BigQuery dialect; the exact queries run for real on both
warehouses and are compared with a numpy brute force.
"""

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest
import sqlglot
from sqlglot import exp

from twotower_assets.defs.publishing import history_rows
from twotower_assets.warehouse.bigquery import vector_index_statement, vector_search_query
from twotower_assets.warehouse.duckdb import DuckDBWarehouse
from twotower_assets.warehouse.sql import BIGQUERY, DUCKDB, NeighborSearch, exact_nearest_neighbors_query

DAY, OTHER_DAY = dt.date(2026, 6, 1), dt.date(2026, 5, 25)
SUMMARY = {"mlflow_run_id": "r", "mlflow_experiment_name": "e", "mlflow_run_name": "n"}
TOP_K = 3


def vectors(count: int, seed: int, normalise: bool) -> np.ndarray:
    values = np.random.default_rng(seed).normal(size=(count, 6))
    return values / np.linalg.norm(values, axis=1, keepdims=True) if normalise else values


USERS, ITEMS = vectors(9, 1, normalise=False), vectors(15, 2, normalise=False)
USER_IDS, ITEM_IDS = np.array([f"u{n}" for n in range(9)]), np.array([f"i{n:02d}" for n in range(15)])


def load_embeddings(warehouse) -> tuple[str, str]:
    users = warehouse.table_name("two_tower_user_embedding_history")
    items = warehouse.table_name("two_tower_item_embedding_history")
    for day, shift in ((DAY, 0.0), (OTHER_DAY, 5.0)):  # another date's vectors must be ignored
        warehouse.replace_partition(users, "train_date", day, history_rows("user", day, SUMMARY, USER_IDS, USERS + shift))
        warehouse.replace_partition(items, "train_date", day, history_rows("item", day, SUMMARY, ITEM_IDS, ITEMS - shift))
    return users, items


def search(users: str, items: str, metric: str, similar_items: bool) -> NeighborSearch:
    if similar_items:
        query = {"query_table": items, "query_key": "item_id", "query_vector": "item_embedding"}
    else:
        query = {"query_table": users, "query_key": "user_id", "query_vector": "user_embedding"}
    return NeighborSearch(**query, base_table=items, base_key="item_id", base_vector="item_embedding",
                          top_k=TOP_K, metric=metric, exclude_same_key=similar_items)


def brute_force(metric: str, similar_items: bool) -> list[tuple[str, str, int]]:
    queries, query_ids = (ITEMS, ITEM_IDS) if similar_items else (USERS, USER_IDS)
    if metric == "COSINE":
        scores = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
            ITEMS / np.linalg.norm(ITEMS, axis=1, keepdims=True)).T
    else:
        scores = queries @ ITEMS.T
    expected = []
    for row, query_id in enumerate(query_ids):
        order = [c for c in np.argsort(-scores[row], kind="stable") if not (similar_items and ITEM_IDS[c] == query_id)]
        expected += [(query_id, ITEM_IDS[c], rank + 1) for rank, c in enumerate(order[:TOP_K])]
    return sorted(expected)


def neighbours(table: pa.Table) -> list[tuple[str, str, int]]:
    return sorted(zip(table["query_id"].to_pylist(), table["neighbor_id"].to_pylist(), table["neighbor_rank"].to_pylist()))


@pytest.mark.parametrize("metric", ["DOT_PRODUCT", "COSINE"])
@pytest.mark.parametrize("similar_items", [False, True], ids=["user_top_items", "similar_items"])
def test_exact_search_matches_numpy_on_duckdb_and_the_emulator(bq_warehouse, tmp_path, metric, similar_items):
    expected = brute_force(metric, similar_items)
    results = {}
    for warehouse in (DuckDBWarehouse(path=str(tmp_path / "vectors.duckdb")), bq_warehouse):
        users, items = load_embeddings(warehouse)
        sql = warehouse.nearest_neighbors_query(search(users, items, metric, similar_items))
        assert "VECTOR_SEARCH" not in sql  # the emulator gets the exact query
        results[warehouse.dialect.name] = warehouse.query(sql, {"train_date": DAY})
        assert neighbours(results[warehouse.dialect.name]) == expected, warehouse.dialect.name
    duck, bq = (r.sort_by([("query_id", "ascending"), ("neighbor_rank", "ascending")]) for r in results.values())
    assert np.allclose(duck["score"].to_numpy(), bq["score"].to_numpy(), atol=1e-12)


@pytest.mark.parametrize("similar_items", [False, True], ids=["user_top_items", "similar_items"])
def test_vector_search_sql_parses_as_bigquery_with_the_requested_search(similar_items):
    sql = vector_search_query(search("p.d.users", "p.d.items", "DOT_PRODUCT", similar_items))
    tree = sqlglot.parse_one(sql, read="bigquery")
    vector_search = tree.find(exp.VectorSearch)
    assert vector_search is not None
    assert vector_search.args["column_to_search"].name == "item_embedding"
    options = {e.this.name.lower(): e.expression for e in vector_search.find_all(exp.Kwarg)}
    # one extra candidate for similar items: an item is its own nearest neighbour
    assert int(options["top_k"].name) == TOP_K + similar_items
    assert options["distance_type"].name == "DOT_PRODUCT"
    expected_tables = {"`p.d.items`"} if similar_items else {"`p.d.items`", "`p.d.users`"}
    assert {t.sql("bigquery") for t in tree.find_all(exp.Table) if t.name} == expected_tables
    assert {p.name for p in tree.find_all(exp.Parameter)} == {"train_date"}
    self_filter = [e.sql("bigquery") for e in tree.find_all(exp.NEQ)]
    assert self_filter == (["query.item_id <> base.item_id"] if similar_items else [])
    # the same columns as the exact query the emulator and DuckDB run
    assert [s.alias_or_name for s in tree.selects] == ["query_id", "neighbor_id", "neighbor_rank", "score"]


def test_exact_sql_of_both_dialects_parses():
    for dialect in (DUCKDB, BIGQUERY):
        sql = exact_nearest_neighbors_query(dialect, search("p.d.users", "p.d.items", "COSINE", False))
        assert sqlglot.parse_one(sql, read=dialect.name).find(exp.Window) is not None


def test_vector_index_statement_is_plain_ddl_with_checked_names():
    statement = vector_index_statement("p.d.two_tower_item_embedding_history", "item_embedding", "COSINE")
    assert statement == (
        "CREATE VECTOR INDEX IF NOT EXISTS two_tower_item_embedding_history_item_embedding_index "
        "ON `p.d.two_tower_item_embedding_history`(item_embedding) STORING(train_date) "
        "OPTIONS(index_type = 'IVF', distance_type = 'COSINE')"
    )
    # sqlglot has no grammar for CREATE VECTOR INDEX: it keeps the statement whole as a Command.
    parsed = sqlglot.parse_one(statement, read="bigquery")
    assert isinstance(parsed, exp.Command) and parsed.this.upper() == "CREATE"
    with pytest.raises(ValueError):
        vector_index_statement("p.d.items", "item_embedding) OPTIONS(x", "COSINE")


def test_bad_searches_are_refused():
    fields = {"query_table": "p.d.u", "query_key": "user_id", "query_vector": "v",
              "base_table": "p.d.i", "base_key": "item_id", "base_vector": "v"}
    with pytest.raises(ValueError, match="top_k"):
        NeighborSearch(**fields, top_k=0)
    with pytest.raises(ValueError, match="metric"):
        NeighborSearch(**fields, top_k=5, metric="EUCLIDEAN")
    with pytest.raises(ValueError, match="not a plain"):
        NeighborSearch(**{**fields, "base_key": "item_id; DROP TABLE x"}, top_k=5)


def test_no_vector_index_on_the_emulator_or_duckdb(bq_warehouse, tmp_path):
    _, items = load_embeddings(bq_warehouse)
    assert bq_warehouse.ensure_vector_index(items, "item_embedding", "DOT_PRODUCT", min_rows=1) is False
    duckdb = DuckDBWarehouse(path=str(tmp_path / "vectors.duckdb"))
    assert duckdb.ensure_vector_index("items", "item_embedding", "DOT_PRODUCT", min_rows=1) is False
