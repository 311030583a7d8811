"""Validation of the training input: every check of the data a model is trained on, in one place.

``tf_datasets`` calls :func:`validate_training_input` before it reads a row, so bad data fails
before anything is written (the previous datasets of the partition stay) and long before
training. Everything is checked in the warehouse: the column types from the table schema,
the values by one aggregate query per split table (the date is a query parameter), so a
10-million-row partition is never pulled into Python to be checked.

What is refused, per split table read (training and validation) of the training date:

* a configured feature that is not a column (:meth:`FeatureConfig.check_columns`); a missing
  ``history`` column is named as what it is: the split computes it from the click events (it
  is never a source column), so the split of that date was made for another feature config;
* a column of the wrong type: an ``int`` feature on a non-numeric column, a ``string`` or
  ``text`` feature (or an id) on a binary or nested column, a ``pretrained`` or ``history``
  feature on a non-string column. Binary columns are refused rather than decoded: DuckDB VARCHAR and
  BigQuery STRING are valid UTF-8 by construction, so bytes that are not UTF-8 can only come
  from BLOB / BYTES columns; cast them in the source;
* no rows for the date;
* null or empty (blank) ``user_id`` / ``item_id`` (they would all become one fake user or
  item called "none");
* NaN or infinite values in a floating-point ``int`` feature (they would turn the
  normalisation's mean, and then every loss, into NaN). Nulls are fine: they become 0;
* fewer than :data:`MIN_DISTINCT` distinct users or items in training (in-batch softmax has
  no negatives to learn from).

What is only reported (asset metadata): how many text values are longer than
:data:`~twotower_assets.model.layers.TEXT_MAX_CHARS` characters and will be truncated.

The split data checks (``defs/splits/checks.py``) test the split itself (empty splits, null ids,
held-out rows unknown to training, leaked pairs); these checks test what a feature config
reads from it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import pyarrow as pa

from twotower_assets.lib import layout
from twotower_assets.model.features import FeatureConfig
from twotower_assets.model.layers import TEXT_MAX_CHARS
from twotower_assets.warehouse.base import WarehouseResource
from twotower_assets.warehouse.errors import EmptyTableError
from twotower_assets.warehouse.queries import input_stats_query
from twotower_assets.warehouse.sql import ITEM_COLUMN, USER_COLUMN

MIN_DISTINCT = 2
"""Distinct users and distinct items training needs at least."""

ID_COLUMNS = (USER_COLUMN, ITEM_COLUMN)


class InputDataError(ValueError):
    """Training input that cannot be used; the message names the table, column and row count."""


@dataclass
class InputReport:
    """What the checks counted, for the asset's metadata."""

    rows: dict[str, int] = field(default_factory=dict)
    distinct_users: int = 0
    distinct_items: int = 0
    truncated_texts: dict[str, int] = field(default_factory=dict)


def _is_numeric(kind: pa.DataType) -> bool:
    return (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
            or pa.types.is_decimal(kind))


def _is_binary(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind)


def _is_nested(kind: pa.DataType) -> bool:
    return pa.types.is_nested(kind) or pa.types.is_dictionary(kind)


def check_column_types(config: FeatureConfig, schema: pa.Schema, table: str) -> None:
    """Each configured feature's column has a type its feature type can read."""
    features = {name: "id" for name in ID_COLUMNS if name in schema.names}
    for layers in (config.user_embedding_layers, config.item_embedding_layers):
        features.update({name: spec.type for name, spec in layers.items()})
    for name, feature_type in features.items():
        if name not in schema.names:
            continue  # reported by check_columns, with the config's own wording
        kind = schema.field(name).type
        where = f"{feature_type} feature {name!r} reads {table}.{name}"
        if feature_type == "int" and not _is_numeric(kind):
            raise InputDataError(f"{where}, a {kind} column; int features need a numeric column")
        if feature_type == "pretrained" and not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise InputDataError(
                f"{where}, a {kind} column; pretrained features need a string column of JSON lists"
            )
        if feature_type == "history" and not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise InputDataError(
                f"{where}, a {kind} column; history features need the split's string column of "
                "space-separated item ids"
            )
        if feature_type in ("string", "text", "id") and _is_binary(kind):
            raise InputDataError(
                f"{where}, a binary column: its bytes need not be UTF-8 text; cast it to a string "
                "column in the source (DuckDB VARCHAR and BigQuery STRING hold valid UTF-8 only)"
            )
        if feature_type in ("string", "text", "id") and _is_nested(kind):
            raise InputDataError(f"{where}, a {kind} column; {feature_type} features need scalar values")


def validate_training_input(
    warehouse: WarehouseResource, config: FeatureConfig, train_date: dt.date
) -> InputReport:
    """Check what ``config`` reads from the training and validation splits of ``train_date``.

    Raises :class:`InputDataError` (bad columns or values) or
    :class:`~twotower_assets.warehouse.base.EmptyTableError` (no rows) naming the table,
    column and number of bad rows; returns the counts otherwise.
    """
    report = InputReport()
    layers = {**config.user_embedding_layers, **config.item_embedding_layers}
    for key in (layout.TRAINING_EVENTS, layout.VALIDATION_EVENTS):
        table = warehouse.table_name(key)
        schema = warehouse.table_schema(table)
        for name in config.history_features:
            if name not in schema.names:
                raise InputDataError(
                    f"{table} has no column {name!r}: history feature "
                    f"{name!r} of config {config.name!r} is computed by split_tables from the click "
                    f"events; materialise split_tables with config_name {config.name!r} "
                    "(ops.split_tables.config.config_name) for this date first"
                )
        config.check_columns(schema.names, source=table)
        for name in ID_COLUMNS:
            if name not in schema.names:
                raise InputDataError(f"{table} has no {name} column")
        check_column_types(config, schema, table)
        floats = [n for n, s in layers.items() if s.type == "int" and pa.types.is_floating(schema.field(n).type)]
        texts = [n for n, s in layers.items() if s.type == "text"]
        is_training = key == layout.TRAINING_EVENTS
        id_columns = {name: pa.types.is_string(schema.field(name).type) for name in ID_COLUMNS}
        sql, meaning = input_stats_query(
            warehouse.dialect, table, id_columns, floats, texts, TEXT_MAX_CHARS, distinct=is_training,
            histories=list(config.history_features),
        )
        counts = warehouse.query(sql, {"train_date": train_date}).to_pylist()[0]
        counts = {name: int(value or 0) for name, value in counts.items()}
        on_date = f"for train_date {train_date}"
        if counts["row_count"] == 0:
            raise EmptyTableError(f"{table} has no rows {on_date}: nothing to train on; materialise the split first")
        report.rows[key] = counts["row_count"]
        for alias, name in meaning.items():
            bad = counts[alias]
            if alias.startswith("empty_id") and bad:
                raise InputDataError(
                    f"{table}.{name} has {bad} null or empty values {on_date}: every event needs "
                    f"a {name}; fix or drop those rows in the source"
                )
            if alias.startswith("non_finite") and bad:
                raise InputDataError(
                    f"{table}.{name} has {bad} NaN or infinite values {on_date} (int feature "
                    f"{name!r} of config {config.name!r}); make them NULL (read as 0) or fix the source"
                )
            if alias.startswith("long_text") and bad:
                report.truncated_texts[f"{table}.{name}"] = bad
            if alias.startswith("null_history") and bad:
                # The split writes '' for no history, never NULL: this date was split without it.
                raise InputDataError(
                    f"{table}.{name} is NULL in {bad} rows {on_date}: history feature {name!r} of "
                    f"config {config.name!r} is computed by split_tables, and this date was split for "
                    f"another config; materialise split_tables with config_name {config.name!r} "
                    "(ops.split_tables.config.config_name) for this date first"
                )
        if is_training:
            report.distinct_users, report.distinct_items = counts["distinct_id_0"], counts["distinct_id_1"]
            for name, distinct in zip(ID_COLUMNS, (report.distinct_users, report.distinct_items)):
                if distinct < MIN_DISTINCT:
                    raise InputDataError(
                        f"{table} has {distinct} distinct {name} {on_date}: a two-tower model needs "
                        f"at least {MIN_DISTINCT} users and {MIN_DISTINCT} items (in-batch negatives)"
                    )
    return report
