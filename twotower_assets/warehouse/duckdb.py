"""The embedded default warehouse: one DuckDB file under the local data directory.

DuckDB lets one process write a file at a time. Each operation opens the file, does its
work in one transaction and closes it, retrying for a while when another process (a second
Dagster run, a notebook) holds the lock, so runs queue instead of failing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from twotower_assets.warehouse.base import (
    ArrowData,
    QueryParams,
    WarehouseResource,
    as_batches,
    check_partition_values,
)
from twotower_assets.warehouse.errors import DUCKDB_LOCK_MESSAGES, WarehouseError
from twotower_assets.identifiers import check_table_name, quote_identifier
from twotower_assets.preflight import check_writable_directory
from twotower_assets.warehouse.sql import DUCKDB, Dialect


class DuckDBWarehouse(WarehouseResource):
    """Tables in a local DuckDB file (created on first use)."""

    path: str = Field(description="The DuckDB database file.")
    lock_timeout_s: float = Field(default=120.0, description="How long to wait for another writer.")
    memory_limit: str = Field(
        default="2GB",
        pattern=r"^[0-9]+(\.[0-9]+)?\s*[KMGT]i?B$",
        description="DuckDB's memory_limit; past it DuckDB spills to disk. Its own default (80% of "
        "RAM) let the 10M-event split take 13 GB. 2 GB keeps every step of the 10M-event graph "
        "under 4 GB with Python, Dagster and TensorFlow beside it, at little cost in time "
        "(docs/benchmarks-scale.md; env TWOTOWER_DUCKDB_MEMORY_LIMIT).",
    )

    path_setting: str = Field(default="the DuckDB path", description="The variable path comes from, named in errors.")

    def setup_for_execution(self, context) -> None:
        # At the start of the run, before any step writes (twotower_assets/preflight.py).
        check_writable_directory(Path(self.path).parent, self.path_setting, "the directory of the DuckDB file")

    @property
    def dialect(self) -> Dialect:
        return DUCKDB

    def table_name(self, name: str) -> str:
        return check_table_name(name)

    @contextlib.contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.lock_timeout_s
        while True:
            try:
                connection = duckdb.connect(self.path)
                break
            except duckdb.IOException as exc:
                if not any(m in str(exc) for m in DUCKDB_LOCK_MESSAGES) or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        try:
            # A literal, not a parameter (SET takes none); the field's pattern keeps it a size.
            connection.execute(f"SET memory_limit = '{self.memory_limit}'")
            yield connection
        finally:
            connection.close()

    def query(self, sql: str, params: QueryParams | None = None) -> pa.Table:
        with self.connect() as con:
            return con.execute(sql, dict(params or {})).to_arrow_table()

    def query_batches(
        self, sql: str, params: QueryParams | None = None, batch_size: int = 65_536
    ) -> Iterator[pa.RecordBatch]:
        with self.connect() as con:
            reader = con.execute(sql, dict(params or {})).to_arrow_reader(batch_size)
            yield from reader

    def execute(self, sql: str, params: QueryParams | None = None) -> None:
        with self.connect() as con:
            con.execute(sql, dict(params or {}))

    def table_exists(self, name: str) -> bool:
        with self.connect() as con:
            return self._exists(con, name)

    @staticmethod
    def _exists(con: duckdb.DuckDBPyConnection, name: str) -> bool:
        check_table_name(name)
        rows = con.execute(
            "SELECT 1 FROM information_schema.tables WHERE table_name = $name", {"name": name}
        ).fetchall()
        return bool(rows)

    def table_schema(self, name: str) -> pa.Schema:
        with self.connect() as con:
            if not self._exists(con, name):
                raise WarehouseError(f"table {name} does not exist in {self.path}")
            return con.execute(f"SELECT * FROM {DUCKDB.table(name)} LIMIT 0").to_arrow_table().schema

    def write_table(self, name: str, data: ArrowData, schema: pa.Schema | None = None) -> int:
        check_table_name(name)  # before the file is opened
        reader = as_batches(data, schema)
        with self.connect() as con, _transaction(con):
            con.register("incoming_rows", reader)
            con.execute(f"CREATE OR REPLACE TABLE {DUCKDB.table(name)} AS SELECT * FROM incoming_rows")
            con.unregister("incoming_rows")
            return con.execute(f"SELECT COUNT(*) FROM {DUCKDB.table(name)}").fetchone()[0]

    def replace_partition(
        self,
        name: str,
        partition_column: str,
        partition_value: dt.date,
        data: ArrowData,
        schema: pa.Schema | None = None,
    ) -> int:
        reader = as_batches(data, schema)
        table, column = DUCKDB.table(name), quote_identifier(partition_column)
        with self.connect() as con, _transaction(con):
            con.register("incoming_rows", reader)
            con.execute(f"CREATE TABLE IF NOT EXISTS {table} AS SELECT * FROM incoming_rows LIMIT 0")
            con.execute(f"DELETE FROM {table} WHERE {column} = $value", {"value": partition_value})
            con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM incoming_rows")
            con.unregister("incoming_rows")
            return con.execute(
                f"SELECT COUNT(*) FROM {table} WHERE {column} = $value", {"value": partition_value}
            ).fetchone()[0]

    def replace_partitions(
        self,
        name: str,
        partition_column: str,
        partition_values: Sequence[dt.date],
        data: ArrowData,
        schema: pa.Schema | None = None,
    ) -> dict[dt.date, int]:
        # One DELETE and one INSERT in one transaction: writing 90 event days one transaction
        # each took 11.6 min at 10M events, against 51 s for one write (docs/benchmarks-scale.md).
        # The rows are staged in a Parquet file first: DuckDB holds every batch of an Arrow
        # stream it inserts until the transaction commits (10M events: 5 GB whatever its
        # memory_limit), while a Parquet scan stays within the limit. Staging also checks
        # every row's day before the table is touched.
        reader = as_batches(data, schema)
        table, column = DUCKDB.table(name), quote_identifier(partition_column)
        values = list(partition_values)
        with self._staged(reader, partition_column, values) as staged:
            with self.connect() as con, _transaction(con):
                source = "read_parquet($staged)"
                con.execute(f"CREATE TABLE IF NOT EXISTS {table} AS SELECT * FROM {source} LIMIT 0", {"staged": staged})
                con.execute(f"DELETE FROM {table} WHERE list_contains($values, {column})", {"values": values})
                con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM {source}", {"staged": staged})
                counts = dict(con.execute(
                    f"SELECT {column}, COUNT(*) FROM {table} WHERE list_contains($values, {column}) GROUP BY {column}",
                    {"values": values},
                ).fetchall())
        return {value: counts.get(value, 0) for value in values}

    @contextlib.contextmanager
    def _staged(
        self, reader: pa.RecordBatchReader, partition_column: str, values: Sequence[dt.date]
    ) -> Iterator[str]:
        """The stream written to a Parquet file beside the database (its path), removed after.

        Uncompressed: the file lives for one write, and compressing it cost a third more time
        at 10M events for half the disk."""
        directory = Path(self.path).parent
        directory.mkdir(parents=True, exist_ok=True)
        handle, path = tempfile.mkstemp(prefix=".staging-", suffix=".parquet", dir=directory)
        os.close(handle)
        try:
            with pq.ParquetWriter(path, reader.schema, compression="none") as writer:
                for batch in reader:
                    check_partition_values(batch, partition_column, values)
                    writer.write_batch(batch)
            yield path
        finally:
            Path(path).unlink(missing_ok=True)

    def replace_partition_from_queries(
        self,
        selects: Mapping[str, str],
        partition_column: str,
        partition_value: dt.date,
        params: QueryParams,
    ) -> dict[str, int]:
        column = quote_identifier(partition_column)
        counts = {}
        with self.connect() as con, _transaction(con):
            for name, select in selects.items():
                table = DUCKDB.table(name)
                partition_select = (
                    f"SELECT CAST($partition_value AS DATE) AS {column}, source.* FROM ({select}) AS source"
                )
                query_params = {**params, "partition_value": partition_value}
                con.execute(
                    f"CREATE TABLE IF NOT EXISTS {table} AS {partition_select} LIMIT 0", query_params
                )
                _add_new_columns(con, name, partition_select, query_params)
                con.execute(f"DELETE FROM {table} WHERE {column} = $value", {"value": partition_value})
                con.execute(f"INSERT INTO {table} BY NAME {partition_select}", query_params)
                counts[name] = con.execute(
                    f"SELECT COUNT(*) FROM {table} WHERE {column} = $value", {"value": partition_value}
                ).fetchone()[0]
        return counts

    def drop_view(self, name: str) -> None:
        check_table_name(name)
        with self.connect() as con:
            views = con.execute(
                "SELECT 1 FROM information_schema.tables WHERE table_name = $name AND table_type = 'VIEW'", {"name": name}
            ).fetchall()
            if views:
                con.execute(f"DROP VIEW {DUCKDB.table(name)}")


def _add_new_columns(con: duckdb.DuckDBPyConnection, name: str, select: str, params: QueryParams) -> None:
    """Add the columns ``select`` has and table ``name`` lacks (NULL in its other partitions).

    A split made for a feature config with a history feature has that column and one made
    before does not; the other partitions keep their rows, and the input checks
    refuse a NULL history where a config needs one. Inside the caller's transaction.
    """
    have = {row[0] for row in con.execute(f"DESCRIBE {DUCKDB.table(name)}").fetchall()}
    con.execute(f"CREATE OR REPLACE TEMP TABLE incoming_columns AS {select} LIMIT 0", params)
    for column_name, column_type, *_ in con.execute("DESCRIBE incoming_columns").fetchall():
        if column_name not in have:
            # The type is DuckDB's own name for a column it just created.
            con.execute(f"ALTER TABLE {DUCKDB.table(name)} ADD COLUMN {quote_identifier(column_name)} {column_type}")
    con.execute("DROP TABLE incoming_columns")


@contextlib.contextmanager
def _transaction(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    con.execute("BEGIN TRANSACTION")
    try:
        yield
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")
