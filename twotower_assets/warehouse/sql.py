"""SQL shared by the warehouses: the split rules and the per-entity feature reads.

Identifiers (table and column names) cannot be query parameters, so every identifier that
reaches SQL goes through the checks of :mod:`twotower_assets.identifiers`, the one place that
defines a safe name: ``check_identifier`` / ``quote_identifier`` (plain ASCII names, no
reserved words), ``check_project_id`` and ``check_table_name``. Values (dates, fractions, ids)
are always query parameters. The statements use the subset of SQL that
DuckDB and BigQuery share; the few differences live in :class:`Dialect`. The exception is
BigQuery's native vector search (``bigquery_vector_*``), which DuckDB does not have.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# The identifier rules live in twotower_assets.identifiers (model code checks feature names
# with them too).
from twotower_assets.identifiers import check_parameter_name, check_table_name, quote_identifier
from twotower_assets.warehouse.errors import WarehouseError


@dataclass(frozen=True)
class Dialect:
    """What differs between the warehouses' SQL."""

    name: str
    param_prefix: str  # "$" for DuckDB, "@" for BigQuery
    int_type: str
    float_type: str
    hex_md5: str  # format string with one {} for the string expression
    non_finite_test: str  # format string with {0} for the float expression, used twice

    def param(self, name: str) -> str:
        return f"{self.param_prefix}{check_parameter_name(name)}"

    def table(self, name: str) -> str:
        check_table_name(name)
        if self.name == "bigquery":
            return f"`{name}`"
        return ".".join(f'"{part}"' for part in name.split("."))

    def non_finite(self, column: str) -> str:
        """SQL true when the float expression ``column`` (already checked or quoted) is NaN or infinite."""
        return self.non_finite_test.format(column)


DUCKDB = Dialect("duckdb", "$", "BIGINT", "DOUBLE", "md5({})", "(isnan({0}) OR isinf({0}))")
BIGQUERY = Dialect("bigquery", "@", "INT64", "FLOAT64", "TO_HEX(MD5({}))", "(IS_NAN({0}) OR IS_INF({0}))")

USER_COLUMN = "user_id"
ITEM_COLUMN = "item_id"
DATE_COLUMN = "event_date"
# Ties inside a day are broken by hour then item, so the chronological cut is reproducible.
EVENT_ORDER = "event_date, event_hour, item_id"
EVENT_ORDER_DESC = "event_date DESC, event_hour DESC, item_id DESC"
TIMESTAMP_COLUMN = "event_timestamp"
"""A source column of event times in seconds (MovieLens has one); histories use it when present."""


def _column_list(columns: list[str], prefix: str = "") -> str:
    return ", ".join(f"{prefix}{quote_identifier(c)}" for c in columns)


def history_time_columns(columns: Sequence[str]) -> list[str]:
    """The columns that say when an event happened, for histories: ``event_timestamp`` (seconds)
    when the table has it, else ``event_date, event_hour`` (the production schema's finest time).

    Events at the same time are not each other's history: they were made together (a MovieLens
    user rates several movies in one second; an hour is the production table's resolution).
    """
    return [TIMESTAMP_COLUMN] if TIMESTAMP_COLUMN in columns else [DATE_COLUMN, "event_hour"]


def _check_history(history: Mapping[str, int]) -> dict[str, int]:
    checked = {}
    for name, length in history.items():
        quote_identifier(name)
        if not isinstance(length, int) or isinstance(length, bool) or length < 1:
            raise ValueError(f"history feature {name!r} needs a length >= 1, not {length!r}")
        checked[name] = length
    return checked


def _history_list(lags: list[str]) -> str:
    """The non-null values of ``lags`` joined by spaces, '' when there is none (both dialects:
    an array literal, and ARRAY_TO_STRING / array_to_string skip NULL elements)."""
    return f"COALESCE(ARRAY_TO_STRING([{', '.join(lags)}], ' '), '')"


def _history_ctes(dialect: Dialect, source: str, columns: list[str], history: dict[str, int]) -> str:
    """``windowed``: the window's events plus one column per history feature (see split_queries).

    A history depends only on the user and the event's time, so it is computed on the key
    columns (one sort of user, time and item) once per (user, time) and joined to the wide
    rows by those keys: the wide rows are not sorted.
    """
    cols = _column_list(columns)
    time_columns = [quote_identifier(c) for c in history_time_columns(columns)]
    time = ", ".join(time_columns)
    user, item = quote_identifier(USER_COLUMN), quote_identifier(ITEM_COLUMN)
    order = f"PARTITION BY {user} ORDER BY {time}, {item}"
    longest = max(history.values())
    lags = [f"LAG(CAST({item} AS STRING), {k}) OVER ({order})" for k in range(1, longest + 1)]
    lists = ",\n    ".join(
        f"{_history_list(lags[:length])} AS {quote_identifier(f'history_{i}')}"
        for i, length in enumerate(history.values())
    )
    # A row's lags are the rows just before it in (time, item) order. For the first row of a
    # group of events at the same time those are all strictly earlier, and the group's rows
    # all take that row's lists: an event never sees one made at the same time (nor itself).
    first_of_time = " OR ".join(
        f"LAG({c}) OVER ({order}) IS NULL OR LAG({c}) OVER ({order}) <> {c}" for c in time_columns
    )
    joined = ", ".join(
        f"COALESCE(h.{quote_identifier(f'history_{i}')}, '') AS {quote_identifier(name)}"
        for i, name in enumerate(history)
    )
    on = " AND ".join(f"e.{c} = h.{c}" for c in [user, *time_columns])
    return f"""
window_events AS (
  SELECT {cols} FROM {dialect.table(source)}
  WHERE {DATE_COLUMN} >= {dialect.param("start_date")} AND {DATE_COLUMN} < {dialect.param("train_date")}
),
history_keys AS (
  SELECT {user}, {time},
    CASE WHEN {first_of_time} THEN 1 ELSE 0 END AS first_of_time,
    {lists}
  FROM window_events
),
histories AS (
  SELECT * FROM history_keys WHERE first_of_time = 1
),
windowed AS (
  SELECT {_column_list(columns, "e.")}, {joined}
  FROM window_events AS e LEFT JOIN histories AS h ON {on}
),"""


def _ranked_events(
    dialect: Dialect, source: str, columns: list[str], history: dict[str, int] | None = None
) -> str:
    if history:
        windowed = _history_ctes(dialect, source, columns, history)
        columns = [*columns, *history]
    else:
        windowed = f"""
windowed AS (
  SELECT {_column_list(columns)} FROM {dialect.table(source)}
  WHERE {DATE_COLUMN} >= {dialect.param("start_date")} AND {DATE_COLUMN} < {dialect.param("train_date")}
),"""
    cols = _column_list(columns)
    return f"""{windowed}
ranked AS (
  SELECT {cols},
    ROW_NUMBER() OVER (PARTITION BY {USER_COLUMN} ORDER BY {EVENT_ORDER}) AS event_rank,
    COUNT(*) OVER (PARTITION BY {USER_COLUMN}) AS user_event_count
  FROM windowed
),
training AS (
  SELECT {cols} FROM ranked
  WHERE event_rank <= GREATEST(1, CAST(FLOOR(user_event_count * {dialect.param("train_set_size")}) AS {dialect.int_type}))
),
ranked_keys AS (
  SELECT {USER_COLUMN}, {ITEM_COLUMN},
    ROW_NUMBER() OVER (PARTITION BY {USER_COLUMN} ORDER BY {EVENT_ORDER}) AS event_rank,
    COUNT(*) OVER (PARTITION BY {USER_COLUMN}) AS user_event_count
  FROM {dialect.table(source)}
  WHERE {DATE_COLUMN} >= {dialect.param("start_date")} AND {DATE_COLUMN} < {dialect.param("train_date")}
),
training_pairs AS (
  SELECT DISTINCT {USER_COLUMN}, {ITEM_COLUMN} FROM ranked_keys
  WHERE event_rank <= GREATEST(1, CAST(FLOOR(user_event_count * {dialect.param("train_set_size")}) AS {dialect.int_type}))
),
holdout AS (
  SELECT {_column_list(columns, "r.")},
    {dialect.hex_md5.format(f"CONCAT(r.{USER_COLUMN}, '|', r.{ITEM_COLUMN}, '|', CAST(r.{DATE_COLUMN} AS STRING))")} AS split_hash
  FROM windowed AS r
  WHERE r.{ITEM_COLUMN} IN (SELECT {ITEM_COLUMN} FROM training_pairs)
    AND NOT EXISTS (
      SELECT 1 FROM training_pairs AS t
      WHERE t.{USER_COLUMN} = r.{USER_COLUMN} AND t.{ITEM_COLUMN} = r.{ITEM_COLUMN}
    )
)"""


def split_queries(
    dialect: Dialect, source: str, columns: list[str], history: Mapping[str, int] | None = None
) -> dict[str, str]:
    """One SELECT per split over the events in ``[start_date, train_date)``.

    Parameters: ``start_date`` and ``train_date`` (DATE), ``train_set_size`` (FLOAT64).
    Rules (docs/decisions.md): per user, events in date order; the first
    ``floor(n * train_set_size)`` (at least one, so single-event users are all training) go
    to training. The rest are kept only if user and item occur in training and the pair
    does not; the md5 of ``user|item|date`` sends even hashes to validation, odd to test.

    The held-out rows are found without sorting the full rows: an event whose (user, item)
    pair has no training event is past its user's cut (all of the pair's events are), and
    every user has a training event, so "item in training, pair not" is the whole rule.
    Only the ranking of the key columns (``ranked_keys``) is needed for the training pairs,
    and the wide rows are filtered, not sorted (they used to go through the window sort once
    per split; ``python -m bench.split_speed`` measures it).

    ``history`` (feature name -> length N, from the feature config's ``history`` features)
    adds one column per feature to every split: the user's N latest items strictly before the
    event (:func:`history_time_columns`; events at the same time excluded), newest first
    (ties by item id, descending), space-separated, ``''`` when there is none. It is computed
    from the window's events, all of them (training, held-out and dropped alike), with LAG
    over each user's events: the one analytic form that is deterministic in both warehouses
    (BigQuery's analytic ARRAY_AGG / STRING_AGG take no ORDER BY of their own). Events before
    the window are not read: the split depends on the window's event days only.
    """
    for required in (USER_COLUMN, ITEM_COLUMN, DATE_COLUMN, "event_hour"):
        if required not in columns:
            raise ValueError(f"source table {source} has no column {required!r}")
    history = _check_history(history or {})
    for name in history:
        if name in columns:
            raise ValueError(
                f"source table {source} already has a column {name!r}, but {name!r} is a history "
                "feature the split computes from the click events; rename the feature in the "
                "config or the column in the source"
            )
    prefix = "WITH " + _ranked_events(dialect, source, columns, history)
    columns = [*columns, *history]
    cols = _column_list(columns)
    even = "STRPOS('02468ace', SUBSTR(split_hash, 32, 1)) > 0"
    return {
        "training": f"{prefix}\nSELECT {cols} FROM training",
        "validation": f"{prefix}\nSELECT {cols} FROM holdout WHERE {even}",
        "test": f"{prefix}\nSELECT {cols} FROM holdout WHERE NOT ({even})",
    }


def count_where(condition: str) -> str:
    """SQL counting the rows where ``condition`` holds (0 over no rows, on both warehouses)."""
    return f"COALESCE(SUM(CASE WHEN {condition} THEN 1 ELSE 0 END), 0)"


def training_examples_query(dialect: Dialect, table: str, columns: list[str]) -> str:
    """Rows of one split partition plus each item's share of training rows (logQ correction).

    Parameter ``train_date``. Rows come in md5 order: a fixed pseudo-random order, so the
    input is reproducible and consecutive rows are not one user's history. Events of one
    user, item, date and hour share a key; the row's own values break those ties, or their
    order would follow how the warehouse scans the table (and so would the trained model).
    """
    cols = _column_list(columns)
    key = f"CONCAT(user_id, '|', item_id, '|', CAST(event_date AS STRING), '|', CAST(event_hour AS STRING))"
    return f"""
SELECT {cols},
  CAST(COUNT(*) OVER (PARTITION BY {ITEM_COLUMN}) AS {dialect.float_type}) / COUNT(*) OVER () AS item_sampling_probability
FROM {dialect.table(table)}
WHERE train_date = {dialect.param("train_date")}
ORDER BY {dialect.hex_md5.format(key)}, {cols}"""


def latest_row_per_query(
    dialect: Dialect,
    table: str,
    key: str,
    columns: list[str],
    history: Mapping[str, int] | None = None,
    time_columns: Sequence[str] = (DATE_COLUMN, "event_hour"),
) -> str:
    """One row per ``key``: its most recent training event (parameter ``train_date``).

    Events of one key at the same date, hour and item are told apart by their values (largest
    first), so the chosen row does not depend on how the warehouse scans the table.

    ``history`` (feature name -> length N; ``key`` must then be ``user_id``): those columns are
    not the latest row's own (its history *before* that event) but the user's N latest items
    of the table's rows up to and including the latest event (events at the latest time too),
    newest first by ``time_columns`` then item id descending: the history a user has on the
    training date, which the user's published vector and evaluation query describe.
    """
    history = _check_history(history or {})
    if history and key != USER_COLUMN:
        raise ValueError(f"history features are per {USER_COLUMN!r}, not per {key!r}")
    selected = sorted((set(columns) | {key}) - set(history))
    cols = _column_list(selected)
    ties = ", ".join(f"{quote_identifier(c)} DESC" for c in selected)
    latest = f"""
SELECT {cols} FROM {dialect.table(table)}
WHERE train_date = {dialect.param("train_date")}
QUALIFY ROW_NUMBER() OVER (PARTITION BY {quote_identifier(key)} ORDER BY {EVENT_ORDER_DESC}, {ties}) = 1"""
    if not history:
        return f"{latest}\nORDER BY {quote_identifier(key)}"
    user, item = quote_identifier(USER_COLUMN), quote_identifier(ITEM_COLUMN)
    newest_first = ", ".join(f"{quote_identifier(c)} DESC" for c in time_columns) + f", {item} DESC"
    lists = ", ".join(
        f"STRING_AGG(CASE WHEN recency <= {length} THEN item_text END, ' ' ORDER BY recency) "
        f"AS {quote_identifier(name)}"
        for name, length in history.items()
    )
    filled = ", ".join(f"COALESCE(h.{quote_identifier(n)}, '') AS {quote_identifier(n)}" for n in history)
    return f"""
WITH latest AS ({latest}
),
recent AS (
  SELECT {user}, item_text, recency FROM (
    SELECT {user}, CAST({item} AS STRING) AS item_text,
      ROW_NUMBER() OVER (PARTITION BY {user} ORDER BY {newest_first}) AS recency
    FROM {dialect.table(table)}
    WHERE train_date = {dialect.param("train_date")}
  ) AS numbered
  WHERE recency <= {max(history.values())}
),
histories AS (
  SELECT {user}, {lists} FROM recent GROUP BY {user}
)
SELECT {_column_list(selected, "l.")}, {filled}
FROM latest AS l LEFT JOIN histories AS h ON l.{user} = h.{user}
ORDER BY l.{user}"""


# -- nearest neighbours (vector search) ---------------------------------------------------------

VECTOR_METRICS = ("DOT_PRODUCT", "COSINE")


@dataclass(frozen=True)
class NeighborSearch:
    """Top-k rows of ``base_table`` for every row of ``query_table`` of one training date.

    Both tables hold one vector per key and a ``train_date`` column; the date is the query
    parameter ``train_date``. The result has columns ``query_column``, ``neighbor_column``,
    ``neighbor_rank`` (1 = best) and ``score`` (dot product or cosine similarity, higher is
    closer). ``exclude_same_key`` drops a row's own key (similar items of an item).
    """

    query_table: str
    query_key: str
    query_vector: str
    base_table: str
    base_key: str
    base_vector: str
    top_k: int
    metric: str = "DOT_PRODUCT"
    exclude_same_key: bool = False
    query_column: str = "query_id"
    neighbor_column: str = "neighbor_id"

    def __post_init__(self):
        check_table_name(self.query_table)
        check_table_name(self.base_table)
        for name in (self.query_key, self.query_vector, self.base_key, self.base_vector,
                     self.query_column, self.neighbor_column):
            quote_identifier(name)
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or not 1 <= self.top_k <= 10_000:
            raise ValueError(f"top_k must be an integer in [1, 10000], not {self.top_k!r}")
        if self.metric not in VECTOR_METRICS:
            raise ValueError(f"metric must be one of {VECTOR_METRICS}, not {self.metric!r}")


def _bigquery_pair_score(metric: str, left: str, right: str) -> str:
    """BigQuery SQL for the similarity of two ARRAY<FLOAT64> expressions (higher is closer).

    BigQuery has no scalar dot product: it is summed over the arrays' positions.
    """
    pairs = f"FROM UNNEST({left}) AS x WITH OFFSET AS i JOIN UNNEST({right}) AS y WITH OFFSET AS j ON i = j"
    if metric == "DOT_PRODUCT":
        return f"(SELECT SUM(x * y) {pairs})"
    return f"(SELECT SUM(x * y) / NULLIF(SQRT(SUM(x * x)) * SQRT(SUM(y * y)), 0) {pairs})"


def bigquery_vector_search_query(search: NeighborSearch) -> str:
    """Top-k neighbours with BigQuery's VECTOR_SEARCH (uses a vector index when there is one).

    VECTOR_SEARCH returns candidate pairs; each pair is then scored exactly from its two vectors
    (the serving system's "approximate index plus exact re-ranking"), so ``score`` means the same
    as in the local search whatever sign convention ``distance`` has. For ``exclude_same_key`` one
    extra candidate is asked for, since an item is its own nearest neighbour.
    """
    candidates = search.top_k + 1 if search.exclude_same_key else search.top_k
    query_key, base_key = quote_identifier(search.query_key), quote_identifier(search.base_key)
    query_vector, base_vector = quote_identifier(search.query_vector), quote_identifier(search.base_vector)
    score = _bigquery_pair_score(search.metric, f"query.{query_vector}", f"base.{base_vector}")
    same_key = f"\n    WHERE query.{query_key} <> base.{base_key}" if search.exclude_same_key else ""
    train_date = BIGQUERY.param("train_date")
    return f"""
SELECT query_id AS {quote_identifier(search.query_column)}, neighbor_id AS {quote_identifier(search.neighbor_column)},
  neighbor_rank, score
FROM (
  SELECT query_id, neighbor_id, score,
    ROW_NUMBER() OVER (PARTITION BY query_id ORDER BY score DESC, neighbor_id) AS neighbor_rank
  FROM (
    SELECT query.{query_key} AS query_id, base.{base_key} AS neighbor_id, {score} AS score
    FROM VECTOR_SEARCH(
      (SELECT {base_key}, {base_vector} FROM {BIGQUERY.table(search.base_table)} WHERE train_date = {train_date}),
      '{base_vector}',
      (SELECT {query_key}, {query_vector} FROM {BIGQUERY.table(search.query_table)} WHERE train_date = {train_date}),
      '{query_vector}',
      top_k => {candidates},
      distance_type => '{search.metric}'){same_key}
  ) AS candidates
) AS ranked
WHERE neighbor_rank <= {search.top_k}"""


def bigquery_vector_index_statement(table: str, column: str, metric: str) -> str:
    """BigQuery's CREATE VECTOR INDEX on ``column``, storing ``train_date`` so the date filter pre-filters."""
    short_name = check_table_name(table).split(".")[-1]
    index = quote_identifier(f"{short_name}_{quote_identifier(column)}_index")
    if metric not in VECTOR_METRICS:
        raise WarehouseError(f"unknown vector distance {metric!r}")
    return (
        f"CREATE VECTOR INDEX IF NOT EXISTS {index} ON {BIGQUERY.table(table)}({column}) "
        f"STORING(train_date) OPTIONS(index_type = 'IVF', distance_type = '{metric}')"
    )


def distinct_pairs_query(dialect: Dialect, table: str, user_key: str) -> str:
    """Distinct (user key, item) pairs of one partition (parameter ``train_date``).

    Nulls become ``'none'``, as in the tf.data input, so the keys match the model's.
    """
    key = quote_identifier(user_key)
    return f"""
SELECT DISTINCT COALESCE(CAST({key} AS STRING), 'none') AS user_key, {ITEM_COLUMN} AS item_id
FROM {dialect.table(table)}
WHERE train_date = {dialect.param("train_date")}"""


MLFLOW_RUN_ID = re.compile(r"[0-9a-f]{32}")
"""What an MLflow run id looks like (uuid4 hex): the only run ids written into a statement."""


def run_snapshot_statement(
    dialect: Dialect, target: str, table: str, partition_column: str, partition_value: dt.date, run_column: str,
    run_id: str,
) -> str:
    """CREATE OR REPLACE TABLE ``target`` as the rows of training run ``run_id`` in partition
    ``partition_value`` of ``table``: the champion's ``_latest`` table, which a later rewrite of
    the partition does not change. Literals, not parameters (DDL takes none in BigQuery): the
    date from a ``datetime.date`` and the run id checked against :data:`MLFLOW_RUN_ID`."""
    if not isinstance(partition_value, dt.date) or isinstance(partition_value, dt.datetime):
        raise TypeError(f"partition_value must be a datetime.date, not {type(partition_value).__name__}")
    if not MLFLOW_RUN_ID.fullmatch(run_id or ""):
        raise ValueError(f"not an MLflow run id: {run_id!r}")
    return (
        f"CREATE OR REPLACE TABLE {dialect.table(target)} AS SELECT * FROM {dialect.table(table)} "
        f"WHERE {quote_identifier(partition_column)} = DATE '{partition_value.isoformat()}' "
        f"AND {quote_identifier(run_column)} = '{run_id}'"
    )


def run_rows_query(dialect: Dialect, table: str, partition_column: str, run_column: str) -> str:
    """SELECT ``n``: the rows of run ``@mlflow_run_id`` in partition ``@train_date`` of ``table``."""
    return (
        f"SELECT COUNT(*) AS n FROM {dialect.table(table)} WHERE {quote_identifier(partition_column)} = "
        f"{dialect.param('train_date')} AND {quote_identifier(run_column)} = {dialect.param('mlflow_run_id')}"
    )
