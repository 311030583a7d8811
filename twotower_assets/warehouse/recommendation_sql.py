"""SQL for per-user recommendations computed inside the warehouse.

On BigQuery the top-k unseen items of every user are found with ``VECTOR_SEARCH`` (the user
vectors of one date as queries, the item vectors of the same date as the base), so the work
scales with BigQuery, not with the machine that runs the asset. ``VECTOR_SEARCH`` cannot skip
the items a user has already seen, so it over-fetches: it asks for ``k + extra_candidates``
candidates per user, the seen (user, item) pairs of the training partition are removed by an
anti-join, and the best ``k`` of the rest are kept. With ``extra_candidates`` at least the
largest number of distinct items any one user has seen, the result is the exact top-k unseen
(given exact candidates); with fewer, a heavy user can get fewer than ``k`` items.

DuckDB has no ``VECTOR_SEARCH``: :func:`recommendations_query` for DuckDB generates the same
candidates by brute force (every user against every item, ranked) and shares the rest of the
statement, so the over-fetch, anti-join, ranking and aggregation run for real in tests. The
DuckDB asset itself scores locally with blocked matrix products (much faster than a cross join).

Output columns (``train_date`` is added by the partition write): ``mlflow_run_id`` (parameter),
``user_id``, ``item_ids`` (best first) and ``scores`` (exact dot products, FLOAT64). Users whose
candidates were all seen get no row. Parameters: ``train_date`` (DATE), ``mlflow_run_id`` (STRING).
"""

from __future__ import annotations

from dataclasses import dataclass

from twotower_assets.identifiers import check_table_name, quote_identifier
from twotower_assets.warehouse.sql import BIGQUERY, DUCKDB, ITEM_COLUMN, Dialect

USER_TABLE_KEY, USER_TABLE_VECTOR = "user_id", "user_embedding"
ITEM_TABLE_KEY, ITEM_TABLE_VECTOR = "item_id", "item_embedding"
# VECTOR_SEARCH's top_k is an INT64 option; its documented range is bounded, keep well inside it.
MAX_CANDIDATES = 10_000


@dataclass(frozen=True)
class RecommendationSearch:
    """Top-``k`` unseen items per user of one training date, from the embedding history tables.

    ``users_table`` / ``items_table`` are the user and item embedding history tables
    (``user_id``, ``user_embedding`` / ``item_id``, ``item_embedding``); ``training_table`` is the
    training split, whose ``user_key`` column (nulls as ``'none'``, as the model keys them) and
    ``item_id`` give the seen pairs.
    """

    users_table: str
    items_table: str
    training_table: str
    user_key: str
    k: int
    extra_candidates: int

    def __post_init__(self):
        for table in (self.users_table, self.items_table, self.training_table):
            check_table_name(table)
        quote_identifier(self.user_key)
        for name, value, low in (("k", self.k, 1), ("extra_candidates", self.extra_candidates, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, not {value!r}")
        if self.candidates > MAX_CANDIDATES:
            raise ValueError(
                f"k + extra_candidates = {self.candidates} is over {MAX_CANDIDATES} candidates per user"
            )

    @property
    def candidates(self) -> int:
        return self.k + self.extra_candidates


def _on_date(dialect: Dialect, table: str, columns: str) -> str:
    return f"SELECT {columns} FROM {dialect.table(table)} WHERE train_date = {dialect.param('train_date')}"


def _bigquery_candidates(search: RecommendationSearch) -> str:
    """VECTOR_SEARCH candidates, each re-scored exactly from its two vectors (as the similar items)."""
    pairs = (
        f"FROM UNNEST(query.{USER_TABLE_VECTOR}) AS x WITH OFFSET AS i "
        f"JOIN UNNEST(base.{ITEM_TABLE_VECTOR}) AS y WITH OFFSET AS j ON i = j"
    )
    items = _on_date(BIGQUERY, search.items_table, f"{ITEM_TABLE_KEY}, {ITEM_TABLE_VECTOR}")
    users = _on_date(BIGQUERY, search.users_table, f"{USER_TABLE_KEY}, {USER_TABLE_VECTOR}")
    return f"""
  SELECT query.{USER_TABLE_KEY} AS user_id, base.{ITEM_TABLE_KEY} AS item_id, (SELECT SUM(x * y) {pairs}) AS score
  FROM VECTOR_SEARCH(
    ({items}),
    '{ITEM_TABLE_VECTOR}',
    ({users}),
    '{USER_TABLE_VECTOR}',
    top_k => {search.candidates},
    distance_type => 'DOT_PRODUCT')"""


def _duckdb_candidates(search: RecommendationSearch) -> str:
    """The exact equivalent of VECTOR_SEARCH's candidates: every pair scored, best per user kept."""
    items = _on_date(DUCKDB, search.items_table, f"{ITEM_TABLE_KEY}, {ITEM_TABLE_VECTOR}")
    users = _on_date(DUCKDB, search.users_table, f"{USER_TABLE_KEY}, {USER_TABLE_VECTOR}")
    return f"""
  SELECT query.{USER_TABLE_KEY} AS user_id, base.{ITEM_TABLE_KEY} AS item_id,
    list_dot_product(query.{USER_TABLE_VECTOR}, base.{ITEM_TABLE_VECTOR}) AS score
  FROM ({users}) AS query CROSS JOIN ({items}) AS base
  QUALIFY ROW_NUMBER() OVER (PARTITION BY query.{USER_TABLE_KEY} ORDER BY score DESC, base.{ITEM_TABLE_KEY})
    <= {search.candidates}"""


def recommendations_query(dialect: Dialect, search: RecommendationSearch) -> str:
    """One row per user: the best ``k`` unseen candidates, best first (ties to the smaller item id)."""
    candidates = _bigquery_candidates(search) if dialect.name == "bigquery" else _duckdb_candidates(search)
    key = quote_identifier(search.user_key)
    seen = _on_date(
        dialect, search.training_table, f"DISTINCT COALESCE(CAST({key} AS STRING), 'none') AS user_id, {ITEM_COLUMN} AS item_id"
    )
    return f"""
WITH candidates AS ({candidates}
),
seen AS ({seen}),
unseen AS (
  SELECT candidates.user_id, candidates.item_id, candidates.score
  FROM candidates LEFT JOIN seen
    ON seen.user_id = candidates.user_id AND seen.item_id = candidates.item_id
  WHERE seen.item_id IS NULL
),
ranked AS (
  SELECT user_id, item_id, score,
    ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY score DESC, item_id) AS item_rank
  FROM unseen
)
SELECT {dialect.param("mlflow_run_id")} AS mlflow_run_id, user_id,
  ARRAY_AGG(item_id ORDER BY item_rank) AS item_ids,
  ARRAY_AGG(CAST(score AS {dialect.float_type}) ORDER BY item_rank) AS scores
FROM ranked
WHERE item_rank <= {search.k}
GROUP BY user_id"""


def max_seen_items_query(dialect: Dialect, training_table: str, user_key: str) -> str:
    """The most distinct items any one user has in the training partition (parameter ``train_date``).

    The over-fetch that makes the in-warehouse recommendations exact.
    """
    key = quote_identifier(user_key)
    pairs = _on_date(dialect, training_table, f"DISTINCT COALESCE(CAST({key} AS STRING), 'none') AS user_key, {ITEM_COLUMN}")
    return f"SELECT COALESCE(MAX(seen_items), 0) AS max_seen_items FROM (SELECT user_key, COUNT(*) AS seen_items FROM ({pairs}) AS pairs GROUP BY user_key) AS per_user"
