"""Plain SQL identifiers: the one rule for every name written into SQL.

Table, dataset, column and feature names, the user key and query-parameter names cannot be
query parameters, so each is checked here before it reaches SQL (values never are: they are
always query parameters). A leaf module, importing nothing from the package: the feature
configs (model code) and the warehouses (SQL) both check names with it.
"""

from __future__ import annotations

import re

__all__ = [
    "NAME_RULE",
    "RESERVED_PREFIXES",
    "RESERVED_WORDS",
    "UnsafeIdentifierError",
    "check_identifier",
    "check_parameter_name",
    "check_project_id",
    "check_table_name",
    "quote_identifier",
]

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
    :func:`check_identifier`. Returned unchanged; the warehouse's SQL dialect quotes it.
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
