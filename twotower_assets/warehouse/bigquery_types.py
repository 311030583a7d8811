"""BigQuery's types for Arrow columns and Python values: table schemas, query parameters, literals."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
from google.cloud import bigquery

from twotower_assets.warehouse.base import QueryParams
from twotower_assets.warehouse.errors import WarehouseError
from twotower_assets.identifiers import check_parameter_name, quote_identifier

# Arrow <-> BigQuery column types for the tables the pipeline writes and reads.
_ARROW_TO_BIGQUERY = [
    (pa.types.is_boolean, "BOOL"),
    (pa.types.is_integer, "INT64"),
    (pa.types.is_floating, "FLOAT64"),
    (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "STRING"),
    (lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t), "BYTES"),
    (pa.types.is_date, "DATE"),
    (lambda t: pa.types.is_timestamp(t) and t.tz is not None, "TIMESTAMP"),
    (pa.types.is_timestamp, "DATETIME"),
    (pa.types.is_decimal, "NUMERIC"),
]
_BIGQUERY_TO_ARROW = {
    "BOOL": pa.bool_(),
    "INT64": pa.int64(),
    "FLOAT64": pa.float64(),
    "STRING": pa.string(),
    "BYTES": pa.binary(),
    "DATE": pa.date32(),
    "TIMESTAMP": pa.timestamp("us", tz="UTC"),
    "DATETIME": pa.timestamp("us"),
    "NUMERIC": pa.decimal128(38, 9),
}
# The REST API still answers with the legacy names.
_LEGACY_TYPE_NAMES = {"BOOLEAN": "BOOL", "INTEGER": "INT64", "FLOAT": "FLOAT64"}


def standard_type(field_type: str) -> str:
    return _LEGACY_TYPE_NAMES.get(field_type.upper(), field_type.upper())


def bigquery_schema(schema: pa.Schema) -> list[bigquery.SchemaField]:
    """BigQuery columns for an Arrow schema: lists become REPEATED, non-nullable REQUIRED."""
    fields = []
    for field in schema:
        arrow_type, mode = field.type, "NULLABLE" if field.nullable else "REQUIRED"
        if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
            arrow_type, mode = arrow_type.value_type, "REPEATED"
        bigquery_type = next((name for test, name in _ARROW_TO_BIGQUERY if test(arrow_type)), None)
        if bigquery_type is None:
            raise WarehouseError(f"column {field.name!r}: Arrow type {field.type} has no BigQuery column type")
        fields.append(bigquery.SchemaField(quote_identifier(field.name), bigquery_type, mode=mode))
    return fields


def arrow_schema(fields: list[bigquery.SchemaField]) -> pa.Schema:
    """The Arrow schema that query results of these BigQuery columns have."""
    arrow_fields = []
    for field in fields:
        arrow_type = _BIGQUERY_TO_ARROW.get(standard_type(field.field_type))
        if arrow_type is None:
            raise WarehouseError(f"column {field.name!r}: BigQuery type {field.field_type} is not supported")
        if field.mode == "REPEATED":
            arrow_type = pa.list_(arrow_type)
        arrow_fields.append(pa.field(field.name, arrow_type, nullable=field.mode != "REQUIRED"))
    return pa.schema(arrow_fields)


def query_parameters(params: QueryParams | None) -> list:
    """Typed BigQuery query parameters from Python values."""
    result = []
    for name, value in (params or {}).items():
        check_parameter_name(name)
        if isinstance(value, (list, tuple)):
            element_type = _parameter_type(value[0]) if value else "STRING"
            result.append(bigquery.ArrayQueryParameter(name, element_type, [_plain(v) for v in value]))
        else:
            result.append(bigquery.ScalarQueryParameter(name, _parameter_type(value), _plain(value)))
    return result


def _plain(value):
    return value.item() if hasattr(value, "item") and not isinstance(value, (dt.date, str)) else value


def _parameter_type(value) -> str:
    value = _plain(value)
    if isinstance(value, bool):
        return "BOOL"
    if isinstance(value, int):
        return "INT64"
    if isinstance(value, float):
        return "FLOAT64"
    if isinstance(value, str):
        return "STRING"
    if isinstance(value, dt.datetime):
        return "TIMESTAMP"
    if isinstance(value, dt.date):
        return "DATE"
    raise WarehouseError(f"no BigQuery query parameter type for {type(value).__name__} value {value!r}")


def date_literal(value: dt.date) -> str:
    """``DATE 'YYYY-MM-DD'`` for scripts, where bqemulator binds no parameters (see
    ``warehouse/bigquery.py``'s module doc)."""
    if not isinstance(value, dt.date) or isinstance(value, dt.datetime):
        raise WarehouseError(f"a partition value must be a datetime.date, not {value!r}")
    return f"DATE '{value.isoformat()}'"
