"""Metadata a person reads in the Dagster UI: table schemas and row counts, rounded numbers.

Every asset that writes a table reports ``dagster/row_count`` and ``dagster/column_schema``
(the UI's Columns tab and row-count plot); headline numbers are rounded to 4 digits.
"""

import math

import dagster as dg
import pyarrow as pa

DIGITS = 4


def rounded(value: float) -> float:
    """``value`` to 4 significant decimals (NaN and inf unchanged)."""
    return round(float(value), DIGITS) if math.isfinite(value) else float(value)


def column_schema(schema: pa.Schema) -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(field.name, str(field.type)) for field in schema])


def table_metadata(table: str, schema: pa.Schema, rows: int) -> dict:
    """Row count, column schema and name of a table asset's partition."""
    return {"dagster/row_count": rows, "dagster/column_schema": column_schema(schema), "table": table}
