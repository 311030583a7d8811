"""Similar items: scored locally on DuckDB and the emulator, VECTOR_SEARCH parsed by sqlglot.

bqemulator has no VECTOR_SEARCH or CREATE VECTOR INDEX, so the native BigQuery statements are
checked by parsing them with sqlglot's BigQuery dialect; the local search runs for real
through the asset on both warehouses and is compared with a numpy brute force.
"""

import datetime as dt

import dagster as dg
import numpy as np
import pyarrow as pa
import pytest
import sqlglot
from sqlglot import exp

from twotower_assets.defs.publishing.embeddings import history_rows
from twotower_assets.defs.publishing.similar_items import similar_item_batches, similar_items
from twotower_assets.lib.layout import SIMILAR_ITEMS
from twotower_assets.warehouse.duckdb import DuckDBWarehouse
from twotower_assets.warehouse.errors import EmptyTableError, WarehouseError
from twotower_assets.warehouse.sql import NeighborSearch, bigquery_vector_index_statement, bigquery_vector_search_query

DAY, OTHER_DAY = dt.date(2026, 6, 1), dt.date(2026, 5, 25)
SUMMARY = {"mlflow_run_id": "r", "mlflow_experiment_name": "e", "mlflow_run_name": "n"}
TOP_K = 3


def vectors(count: int, seed: int, normalise: bool) -> np.ndarray:
    values = np.random.default_rng(seed).normal(size=(count, 6))
    return values / np.linalg.norm(values, axis=1, keepdims=True) if normalise else values


ITEMS = vectors(15, 2, normalise=False)
ITEM_IDS = np.array([f"i{n:02d}" for n in range(15)])


def load_embeddings(warehouse) -> str:
    items = warehouse.table_name("two_tower_item_embedding_history")
    for day, shift in ((DAY, 0.0), (OTHER_DAY, 5.0)):  # another date's vectors must be ignored
        # shuffled rows: the search must not depend on the order the table returns
        order = np.random.default_rng(3).permutation(len(ITEM_IDS))
        warehouse.replace_partition(items, "train_date", day, history_rows("item", day, SUMMARY, ITEM_IDS[order], ITEMS[order] - shift))
    return items


def search(items: str, metric: str = "DOT_PRODUCT") -> NeighborSearch:
    return NeighborSearch(query_table=items, query_key="item_id", query_vector="item_embedding",
                          base_table=items, base_key="item_id", base_vector="item_embedding",
                          top_k=TOP_K, metric=metric, exclude_same_key=True,
                          query_column="item_id", neighbor_column="similar_item_id")


def brute_force(metric: str, top_k: int = TOP_K) -> list[tuple[str, str, int, float]]:
    """Hand-rolled: every pair scored in float64, ties to the smaller id, the item itself dropped."""
    queries = ITEMS / np.linalg.norm(ITEMS, axis=1, keepdims=True) if metric == "COSINE" else ITEMS
    scores = queries @ queries.T
    expected = []
    for row, query_id in enumerate(ITEM_IDS):
        order = [c for c in np.argsort(-scores[row], kind="stable") if c != row]
        expected += [(query_id, ITEM_IDS[c], rank + 1, scores[row, c]) for rank, c in enumerate(order[:top_k])]
    return expected


def neighbours(table: pa.Table) -> list[tuple[str, str, int, float]]:
    table = table.sort_by([("item_id", "ascending"), ("neighbor_rank", "ascending")])
    return list(zip(table["item_id"].to_pylist(), table["similar_item_id"].to_pylist(),
                    table["neighbor_rank"].to_pylist(), table["score"].to_pylist()))


def assert_same_neighbours(actual, expected):
    assert [row[:3] for row in actual] == [row[:3] for row in expected]
    assert np.allclose([row[3] for row in actual], [row[3] for row in expected], atol=1e-5)


@pytest.mark.parametrize("metric", ["DOT_PRODUCT", "COSINE"])
def test_the_asset_finds_the_exact_similar_items_on_duckdb_and_the_emulator(bq_warehouse, tmp_path, metric):
    for warehouse in (DuckDBWarehouse(path=str(tmp_path / "vectors.duckdb")), bq_warehouse):
        assert not warehouse.has_vector_search
        with pytest.raises(WarehouseError, match="no native vector search"):
            warehouse.nearest_neighbors_query(search("items", metric))
        load_embeddings(warehouse)
        result = dg.materialize(
            [similar_items], resources={"warehouse": warehouse}, partition_key=DAY.isoformat(),
            run_config={"ops": {SIMILAR_ITEMS: {"config": {"top_k": TOP_K, "metric": metric, "items_per_batch": 4}}}},
        )
        assert result.success
        table = warehouse.table_name(SIMILAR_ITEMS)
        rows = warehouse.query(f"SELECT * FROM {warehouse.dialect.table(table)}")
        assert rows.schema.names == ["train_date", "item_id", "similar_item_id", "neighbor_rank", "score"]
        assert set(rows["train_date"].to_pylist()) == {DAY}
        assert_same_neighbours(neighbours(rows), brute_force(metric))
        metadata = result.asset_materializations_for_node(SIMILAR_ITEMS)[0].metadata
        assert metadata["dagster/row_count"].value == 15 * TOP_K
        assert metadata["computed_by"].value == "local blocked matrix products"


def test_top_k_is_capped_at_the_other_items_and_a_single_item_has_none():
    batches = list(similar_item_batches(ITEM_IDS, ITEMS, 100, "DOT_PRODUCT", DAY, items_per_batch=7))
    assert [b.num_rows for b in batches] == [7 * 14, 7 * 14, 1 * 14]
    assert_same_neighbours(neighbours(pa.Table.from_batches(batches)), brute_force("DOT_PRODUCT", top_k=14))
    assert list(similar_item_batches(ITEM_IDS[:1], ITEMS[:1], 5, "DOT_PRODUCT", DAY)) == []


def test_a_date_without_item_vectors_fails_and_keeps_the_previous_result(tmp_path):
    warehouse = DuckDBWarehouse(path=str(tmp_path / "vectors.duckdb"))
    load_embeddings(warehouse)
    run_config = {"ops": {SIMILAR_ITEMS: {"config": {"top_k": TOP_K}}}}
    assert dg.materialize([similar_items], resources={"warehouse": warehouse}, partition_key=DAY.isoformat(),
                          run_config=run_config).success
    before = warehouse.query(f"SELECT * FROM {SIMILAR_ITEMS} ORDER BY item_id, neighbor_rank")
    failed = dg.materialize([similar_items], resources={"warehouse": warehouse}, partition_key="2026-06-02",
                            run_config=run_config, raise_on_error=False)
    assert not failed.success
    [failure] = [e for e in failed.all_events if e.event_type_value == "STEP_FAILURE"]
    error = failure.event_specific_data.error
    assert error.cause.cls_name == EmptyTableError.__name__
    assert "no item embeddings for 2026-06-02" in error.message
    assert warehouse.query(f"SELECT * FROM {SIMILAR_ITEMS} ORDER BY item_id, neighbor_rank").equals(before)


def test_vector_search_sql_parses_as_bigquery_with_the_requested_search():
    sql = bigquery_vector_search_query(search("p.d.items"))
    tree = sqlglot.parse_one(sql, read="bigquery")
    vector_search = tree.find(exp.VectorSearch)
    assert vector_search is not None
    assert vector_search.args["column_to_search"].name == "item_embedding"
    options = {e.this.name.lower(): e.expression for e in vector_search.find_all(exp.Kwarg)}
    # one extra candidate: an item is its own nearest neighbour
    assert int(options["top_k"].name) == TOP_K + 1
    assert options["distance_type"].name == "DOT_PRODUCT"
    assert {t.sql("bigquery") for t in tree.find_all(exp.Table) if t.name} == {"`p.d.items`"}
    assert {p.name for p in tree.find_all(exp.Parameter)} == {"train_date"}
    assert [e.sql("bigquery") for e in tree.find_all(exp.NEQ)] == ["query.item_id <> base.item_id"]
    # the columns of the table the local search writes (train_date is added by the write)
    assert [s.alias_or_name for s in tree.selects] == ["item_id", "similar_item_id", "neighbor_rank", "score"]


def test_vector_index_statement_is_plain_ddl_with_checked_names():
    statement = bigquery_vector_index_statement("p.d.two_tower_item_embedding_history", "item_embedding", "COSINE")
    assert statement == (
        "CREATE VECTOR INDEX IF NOT EXISTS two_tower_item_embedding_history_item_embedding_index "
        "ON `p.d.two_tower_item_embedding_history`(item_embedding) STORING(train_date) "
        "OPTIONS(index_type = 'IVF', distance_type = 'COSINE')"
    )
    # sqlglot has no grammar for CREATE VECTOR INDEX: it keeps the statement whole as a Command.
    parsed = sqlglot.parse_one(statement, read="bigquery")
    assert isinstance(parsed, exp.Command) and parsed.this.upper() == "CREATE"
    with pytest.raises(ValueError):
        bigquery_vector_index_statement("p.d.items", "item_embedding) OPTIONS(x", "COSINE")


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
    items = load_embeddings(bq_warehouse)
    assert bq_warehouse.ensure_vector_index(items, "item_embedding", "DOT_PRODUCT", min_rows=1) is False
    duckdb = DuckDBWarehouse(path=str(tmp_path / "vectors.duckdb"))
    assert duckdb.ensure_vector_index("items", "item_embedding", "DOT_PRODUCT", min_rows=1) is False
