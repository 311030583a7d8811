"""SQL shared by the warehouses: the split rules and the per-entity feature reads.

Identifiers (table and column names) cannot be query parameters, so every identifier that
reaches SQL goes through this module's checks, the one place that defines a safe name:
:func:`check_identifier` / :func:`quote_identifier` (plain ASCII names, no reserved words),
:func:`check_project_id` and :func:`check_table_name`. Values (dates, fractions, ids) are
always query parameters. The statements use the subset of SQL that
DuckDB and BigQuery share; the few differences live in :class:`Dialect`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# ASCII only, matched with fullmatch (a "$" would also accept a trailing newline).
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# GCP project ids: lowercase letters, digits and hyphens, a letter first, no hyphen last (GCP
# itself asks for 6 to 30 characters; the length is left to BigQuery).
_PROJECT_ID = re.compile(r"[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?")
# Words reserved in BigQuery's or DuckDB's grammar: refused as names rather than failing as a
# syntax error (names are written unquoted into SQL).
RESERVED_WORDS = frozenset(
    """all analyse analyze and any array as asc assert_rows_modified asymmetric at between both by
    case cast check collate column constraint contains create cross cube current default deferrable
    define desc describe distinct do else end enum escape except exclude exists extract false fetch
    following for foreign from full group grouping groups hash having if ignore in initially inner
    intersect interval into is join lambda lateral leading left like limit lookup merge natural new
    no not null nulls of offset on only or order outer over partition pivot pivot_longer pivot_wider
    placing preceding primary proto qualify range recursive references respect returning right
    rollup rows select set show some struct summarize symmetric table tablesample then to trailing
    treat true unbounded union unique unnest unpivot using variadic when where window with within""".split()
)
# BigQuery's pseudo-column and system prefixes (case-insensitive).
RESERVED_PREFIXES = ("_table_", "_file_", "_partition", "_row_timestamp", "__root__", "_colidentifier")
NAME_RULE = "ASCII letters, digits and underscores, not starting with a digit, at most 128 characters"


class UnsafeIdentifierError(ValueError):
    """A table, dataset, project or column name that is not a plain identifier."""


def _shown(name: object) -> str:
    """The refused value for an error message: escaped (lookalikes and controls visible), cut short."""
    text = ascii(name)
    return text if len(text) <= 80 else f"{text[:60]}...{text[-10:]} ({len(name)} characters)"


def _why_not_plain(name: object) -> str:
    if not isinstance(name, str):
        return f"not a string but {type(name).__name__}"
    if not name:
        return "empty"
    if not name.isascii():
        return "non-ASCII character"
    if len(name) > 128:
        return "too long"
    if name[0].isdigit():
        return "starts with a digit"
    bad = next((c for c in name if not (c.isalnum() or c == "_")), "")
    return f"character {bad!r} not allowed"


def check_identifier(name: str, what: str = "SQL identifier", *, keywords_ok: bool = False) -> str:
    """``name`` itself if it is a plain identifier, else :class:`UnsafeIdentifierError`.

    The one rule for every name that is written into SQL (tables, datasets, columns, feature
    names, the user key, the partition column, query-parameter names): values never are; they
    are query parameters.
    """
    if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
        raise UnsafeIdentifierError(f"{what} {_shown(name)} is not a plain name: {_why_not_plain(name)} ({NAME_RULE})")
    if keywords_ok:
        return name
    if name.lower() in RESERVED_WORDS:
        raise UnsafeIdentifierError(f"{what} {name!r} is not a plain name: a reserved SQL keyword")
    prefix = next((p for p in RESERVED_PREFIXES if name.lower().startswith(p)), None)
    if prefix is not None:
        raise UnsafeIdentifierError(f"{what} {name!r} is not a plain name: BigQuery reserves the prefix {prefix.upper()!r}")
    return name


def quote_identifier(name: str) -> str:
    """A column (or other) name safe to write into SQL as is: see :func:`check_identifier`."""
    return check_identifier(name, "column name")


def check_parameter_name(name: str) -> str:
    """A query parameter's name (written ``$name`` / ``@name``, so keywords are fine)."""
    return check_identifier(name, "query parameter name", keywords_ok=True)


def check_project_id(name: str) -> str:
    """A GCP project id: lowercase letters, digits and single hyphens, starting with a letter."""
    if not isinstance(name, str) or not _PROJECT_ID.fullmatch(name) or "--" in name:
        raise UnsafeIdentifierError(
            f"GCP project id {_shown(name)} is not a plain name: lowercase ASCII letters, digits "
            "and single hyphens, starting with a letter and not ending with a hyphen"
        )
    return name


def check_table_name(name: str) -> str:
    """A table name of up to three dotted parts (project.dataset.table, or dataset.table).

    The project part follows :func:`check_project_id`; the dataset and table parts follow
    :func:`check_identifier`. Returned unchanged; :meth:`Dialect.table` quotes it.
    """
    if not isinstance(name, str) or not name:
        raise UnsafeIdentifierError(f"table name {_shown(name)} is not a plain table name: empty")
    parts = name.split(".")
    if len(parts) > 3:
        raise UnsafeIdentifierError(
            f"table name {_shown(name)} is not a plain table name: at most three dotted parts "
            "(project.dataset.table)"
        )
    try:
        if len(parts) == 3:
            check_project_id(parts[0])
        for part, what in zip(parts[-2:][::-1], ("table", "dataset")):
            check_identifier(part, f"{what} name")
    except UnsafeIdentifierError as exc:
        raise UnsafeIdentifierError(f"table name {_shown(name)} is not a plain table name: {exc}") from None
    return name


@dataclass(frozen=True)
class Dialect:
    """What differs between the warehouses' SQL."""

    name: str
    param_prefix: str  # "$" for DuckDB, "@" for BigQuery
    table_quote: str  # DuckDB: '"', BigQuery: '`'
    int_type: str
    float_type: str
    hex_md5: str  # format string with one {} for the string expression

    def param(self, name: str) -> str:
        return f"{self.param_prefix}{check_parameter_name(name)}"

    def table(self, name: str) -> str:
        check_table_name(name)
        if self.name == "bigquery":
            return f"`{name}`"
        return ".".join(f'"{part}"' for part in name.split("."))


DUCKDB = Dialect("duckdb", "$", '"', "BIGINT", "DOUBLE", "md5({})")
BIGQUERY = Dialect("bigquery", "@", "`", "INT64", "FLOAT64", "TO_HEX(MD5({}))")

USER_COLUMN = "user_id"
ITEM_COLUMN = "item_id"
DATE_COLUMN = "event_date"
# Ties inside a day are broken by hour then item, so the chronological cut is reproducible.
EVENT_ORDER = "event_date, event_hour, item_id"
EVENT_ORDER_DESC = "event_date DESC, event_hour DESC, item_id DESC"


def _column_list(columns: list[str], prefix: str = "") -> str:
    return ", ".join(f"{prefix}{quote_identifier(c)}" for c in columns)


def _ranked_events(dialect: Dialect, source: str, columns: list[str]) -> str:
    cols = _column_list(columns)
    return f"""
windowed AS (
  SELECT {cols} FROM {dialect.table(source)}
  WHERE {DATE_COLUMN} >= {dialect.param("start_date")} AND {DATE_COLUMN} < {dialect.param("train_date")}
),
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
holdout AS (
  SELECT {_column_list(columns, "r.")},
    {dialect.hex_md5.format(f"CONCAT(r.{USER_COLUMN}, '|', r.{ITEM_COLUMN}, '|', CAST(r.{DATE_COLUMN} AS STRING))")} AS split_hash
  FROM ranked AS r
  WHERE r.event_rank > GREATEST(1, CAST(FLOOR(r.user_event_count * {dialect.param("train_set_size")}) AS {dialect.int_type}))
    AND r.{USER_COLUMN} IN (SELECT {USER_COLUMN} FROM training)
    AND r.{ITEM_COLUMN} IN (SELECT {ITEM_COLUMN} FROM training)
    AND NOT EXISTS (
      SELECT 1 FROM training AS t
      WHERE t.{USER_COLUMN} = r.{USER_COLUMN} AND t.{ITEM_COLUMN} = r.{ITEM_COLUMN}
    )
)"""


SPLITS = ("training", "validation", "test")


def split_queries(dialect: Dialect, source: str, columns: list[str]) -> dict[str, str]:
    """One SELECT per split over the events in ``[start_date, train_date)``.

    Parameters: ``start_date`` and ``train_date`` (DATE), ``train_set_size`` (FLOAT64).
    Rules (docs/decisions.md): per user, events in date order; the first
    ``floor(n * train_set_size)`` (at least one, so single-event users are all training) go
    to training. The rest are kept only if user and item occur in training and the pair
    does not; the md5 of ``user|item|date`` sends even hashes to validation, odd to test.
    """
    for required in (USER_COLUMN, ITEM_COLUMN, DATE_COLUMN, "event_hour"):
        if required not in columns:
            raise ValueError(f"source table {source} has no column {required!r}")
    prefix = "WITH " + _ranked_events(dialect, source, columns)
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


def latest_row_per_query(dialect: Dialect, table: str, key: str, columns: list[str]) -> str:
    """One row per ``key``: its most recent training event (parameter ``train_date``).

    Events of one key at the same date, hour and item are told apart by their values (largest
    first), so the chosen row does not depend on how the warehouse scans the table.
    """
    selected = sorted(set(columns) | {key})
    cols = _column_list(selected)
    ties = ", ".join(f"{quote_identifier(c)} DESC" for c in selected)
    return f"""
SELECT {cols} FROM {dialect.table(table)}
WHERE train_date = {dialect.param("train_date")}
QUALIFY ROW_NUMBER() OVER (PARTITION BY {quote_identifier(key)} ORDER BY {EVENT_ORDER_DESC}, {ties}) = 1
ORDER BY {quote_identifier(key)}"""


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


def distinct_pairs_query(dialect: Dialect, table: str, user_key: str) -> str:
    """Distinct (user key, item) pairs of one partition (parameter ``train_date``).

    Nulls become ``'none'``, as in the tf.data input, so the keys match the model's.
    """
    key = quote_identifier(user_key)
    return f"""
SELECT DISTINCT COALESCE(CAST({key} AS STRING), 'none') AS user_key, {ITEM_COLUMN} AS item_id
FROM {dialect.table(table)}
WHERE train_date = {dialect.param("train_date")}"""
