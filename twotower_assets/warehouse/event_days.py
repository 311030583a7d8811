"""SQL about the days of the click-event table: events per day in a date range.

The source asset observes an external table with it, and the split asks it which days of its
window have events. Values are query parameters; the table name is checked by the dialect.
"""

from __future__ import annotations

from twotower_assets.warehouse.sql import DATE_COLUMN, Dialect


def event_day_counts_query(dialect: Dialect, source: str) -> str:
    """``event_date, n``: events per day in ``[first_day, last_day]`` (parameters ``first_day``,
    ``last_day``), days without events left out, ordered by day."""
    return (
        f"SELECT {DATE_COLUMN} AS event_date, COUNT(*) AS n FROM {dialect.table(source)} "
        f"WHERE {DATE_COLUMN} >= {dialect.param('first_day')} AND {DATE_COLUMN} <= {dialect.param('last_day')} "
        f"GROUP BY {DATE_COLUMN} ORDER BY {DATE_COLUMN}"
    )
