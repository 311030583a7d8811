"""The queries the pipeline's checks, validation, evaluation and publishing run.

Each function returns SQL for one :class:`~twotower_assets.warehouse.sql.Dialect`; every value
is a query parameter (named in the docstring), every name is checked or quoted. The split
and dataset queries live in :mod:`twotower_assets.warehouse.sql`.
"""

from __future__ import annotations

from twotower_assets.identifiers import quote_identifier
from twotower_assets.warehouse.sql import (
    DATE_COLUMN,
    ITEM_COLUMN,
    USER_COLUMN,
    Dialect,
    count_where,
)

PARTITION_COLUMN = "train_date"
"""The column every partitioned table of the pipeline is partitioned by."""

_PARTITION = quote_identifier(PARTITION_COLUMN)


def _on_date(dialect: Dialect) -> str:
    return f"{_PARTITION} = {dialect.param('train_date')}"


def events_in_window_count(dialect: Dialect, source: str) -> str:
    """``n``: events in ``[start_date, train_date)`` (parameters ``start_date``, ``train_date``)."""
    return (
        f"SELECT COUNT(*) AS n FROM {dialect.table(source)} "
        f"WHERE {DATE_COLUMN} >= {dialect.param('start_date')} AND {DATE_COLUMN} < {dialect.param('train_date')}"
    )


def split_stats_query(dialect: Dialect, table: str) -> str:
    """Rows, null ids and distinct users/items of one split partition (parameter ``train_date``)."""
    user, item = quote_identifier(USER_COLUMN), quote_identifier(ITEM_COLUMN)
    return (
        f"SELECT COUNT(*) AS row_count, "
        f"{count_where(f'{user} IS NULL')} AS null_user_ids, "
        f"{count_where(f'{item} IS NULL')} AS null_item_ids, "
        f"COUNT(DISTINCT {user}) AS users, COUNT(DISTINCT {item}) AS items "
        f"FROM {dialect.table(table)} WHERE {_on_date(dialect)}"
    )


def held_out_stats_query(dialect: Dialect, held_out: str, training: str) -> str:
    """Rows of a held-out split whose user or item is not in training, or whose pair is.

    Anti- and semi-joins against the same date's training rows (parameter ``train_date``);
    LEFT JOIN ... IS NULL is the form both DuckDB and BigQuery plan well.
    """
    user, item = quote_identifier(USER_COLUMN), quote_identifier(ITEM_COLUMN)
    source, train, on_date = dialect.table(held_out), dialect.table(training), _on_date(dialect)
    return (
        f"WITH held_out AS (SELECT {user}, {item} FROM {source} WHERE {on_date}), "
        f"train_users AS (SELECT DISTINCT {user} FROM {train} WHERE {on_date}), "
        f"train_items AS (SELECT DISTINCT {item} FROM {train} WHERE {on_date}), "
        f"train_pairs AS (SELECT DISTINCT {user}, {item} FROM {train} WHERE {on_date}) "
        f"SELECT "
        f"(SELECT COUNT(*) FROM held_out h LEFT JOIN train_users u ON h.{user} = u.{user} "
        f"WHERE u.{user} IS NULL) AS rows_with_unknown_user, "
        f"(SELECT COUNT(*) FROM held_out h LEFT JOIN train_items i ON h.{item} = i.{item} "
        f"WHERE i.{item} IS NULL) AS rows_with_unknown_item, "
        f"(SELECT COUNT(*) FROM held_out h JOIN train_pairs p "
        f"ON h.{user} = p.{user} AND h.{item} = p.{item}) AS rows_with_training_pair"
    )


def input_stats_query(
    dialect: Dialect,
    table: str,
    id_columns: dict[str, bool],
    floats: list[str],
    texts: list[str],
    text_max_chars: int,
    distinct: bool,
    histories: list[str] = (),
) -> tuple[str, dict[str, str]]:
    """One aggregate over a split partition for the training-input checks (parameter ``train_date``).

    ``id_columns``: id column -> whether it is a string column (others are cast to compare
    with ''). Returns the SQL and output alias -> the column it counts for: ``empty_id_i``
    (null or blank ids), ``distinct_id_i`` (when ``distinct``), ``non_finite_i`` (NaN or
    infinite floats), ``long_text_i`` (texts over ``text_max_chars``), ``null_history_i`` (NULL
    history values: the split writes '' for none), plus ``row_count``.
    """
    selects = ["COUNT(*) AS row_count"]
    meaning: dict[str, str] = {}
    for i, (name, is_string) in enumerate(id_columns.items()):
        column = quote_identifier(name)
        text = column if is_string else f"CAST({column} AS STRING)"
        blank = f"{column} IS NULL OR TRIM({text}) = ''"
        selects.append(f"{count_where(blank)} AS empty_id_{i}")
        meaning[f"empty_id_{i}"] = name
        if distinct:
            selects.append(f"COUNT(DISTINCT {column}) AS distinct_id_{i}")
    for i, name in enumerate(floats):
        selects.append(f"{count_where(dialect.non_finite(quote_identifier(name)))} AS non_finite_{i}")
        meaning[f"non_finite_{i}"] = name
    for i, name in enumerate(texts):
        selects.append(f"{count_where(f'LENGTH({quote_identifier(name)}) > {int(text_max_chars)}')} AS long_text_{i}")
        meaning[f"long_text_{i}"] = name
    for i, name in enumerate(histories):
        selects.append(f"{count_where(f'{quote_identifier(name)} IS NULL')} AS null_history_{i}")
        meaning[f"null_history_{i}"] = name
    sql = f"SELECT {', '.join(selects)} FROM {dialect.table(table)} WHERE {_on_date(dialect)}"
    return sql, meaning


def pair_counts_query(dialect: Dialect, table: str) -> str:
    """``user_id, item_id, events``: events per pair of one partition (parameter ``train_date``)."""
    return (
        f"SELECT {USER_COLUMN}, {ITEM_COLUMN}, COUNT(*) AS events FROM {dialect.table(table)} "
        f"WHERE {_on_date(dialect)} GROUP BY {USER_COLUMN}, {ITEM_COLUMN}"
    )


def item_attributes_query(dialect: Dialect, table: str, columns: list[str]) -> str:
    """One value of each of ``columns`` per item of one partition (parameter ``train_date``)."""
    values = ", ".join(f"MIN({quote_identifier(c)}) AS {quote_identifier(c)}" for c in columns)
    return (
        f"SELECT {ITEM_COLUMN}, {values} FROM {dialect.table(table)} "
        f"WHERE {_on_date(dialect)} GROUP BY {ITEM_COLUMN}"
    )


def latest_partition_before_query(dialect: Dialect, history: str) -> str:
    """The newest partition of an embedding history table before ``train_date`` and its MLflow run."""
    return (
        f"SELECT {_PARTITION} AS train_date, MIN(mlflow_run_id) AS mlflow_run_id "
        f"FROM {dialect.table(history)} WHERE {_PARTITION} < {dialect.param('train_date')} "
        f"GROUP BY {_PARTITION} ORDER BY {_PARTITION} DESC LIMIT 1"
    )


def item_vectors_query(dialect: Dialect, table: str) -> str:
    """``item_id, item_embedding`` of one partition of the item history table, by id (``train_date``)."""
    return (
        f"SELECT {ITEM_COLUMN}, item_embedding FROM {dialect.table(table)} "
        f"WHERE {_on_date(dialect)} ORDER BY {ITEM_COLUMN}"
    )


def user_vectors_query(dialect: Dialect, table: str) -> str:
    """``user_id, user_embedding`` of one partition of the user history table, by id (``train_date``)."""
    return (
        f"SELECT user_id, user_embedding FROM {dialect.table(table)} "
        f"WHERE {_on_date(dialect)} ORDER BY user_id"
    )


def item_event_counts_query(dialect: Dialect, table: str) -> str:
    """``item_id, events``: events per item of one partition (parameter ``train_date``)."""
    return (
        f"SELECT {ITEM_COLUMN}, COUNT(*) AS events FROM {dialect.table(table)} "
        f"WHERE {_on_date(dialect)} GROUP BY {ITEM_COLUMN} ORDER BY {ITEM_COLUMN}"
    )
