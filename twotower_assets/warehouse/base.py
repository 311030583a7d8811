"""The warehouse resource: the one way assets read and write tables.

Two implementations share this interface: :class:`~twotower_assets.warehouse.duckdb.DuckDBWarehouse`
(the embedded default, a local file) and the BigQuery one (production). Data goes in and out
as Arrow: tables or streams of record batches, never rows as Python objects.

Writes are all-or-nothing. ``write_table`` replaces a whole table and ``replace_partition``
replaces the rows of one partition value; if the input fails midway the previous contents
stay as they were.
"""

from __future__ import annotations

import datetime as dt
from abc import abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc

from twotower_assets.warehouse.errors import WarehouseError
from twotower_assets.warehouse.sql import Dialect, NeighborSearch

ArrowData = pa.Table | Iterable[pa.RecordBatch]
QueryParams = Mapping[str, Any]


def check_partition_values(rows: pa.Table | pa.RecordBatch, column: str, values: Sequence[dt.date]) -> None:
    """Raise unless every row's ``column`` is one of ``values`` (a write must not touch other partitions)."""
    if column not in rows.schema.names:
        raise WarehouseError(f"the rows have no partition column {column!r} (columns: {rows.schema.names})")
    outside = pc.invert(pc.fill_null(pc.is_in(rows[column], value_set=pa.array(list(values), rows.schema.field(column).type)), False))
    if pc.any(outside).as_py():
        example = pc.filter(rows[column], outside)[0].as_py()
        raise WarehouseError(f"a row has {column} = {example}, which is not one of the partitions being written")


def as_batches(data: ArrowData, schema: pa.Schema | None = None) -> pa.RecordBatchReader:
    """A record-batch stream over a table or an iterable of batches."""
    if isinstance(data, pa.Table):
        if schema is not None:
            data = data.select(schema.names).cast(schema)
        return pa.RecordBatchReader.from_batches(data.schema, data.to_batches())
    if isinstance(data, pa.RecordBatchReader):
        return data
    batches = iter(data)
    if schema is None:
        first = next(batches, None)
        if first is None:
            raise WarehouseError("no data and no schema: cannot create the table")
        schema = first.schema

        def chained() -> Iterator[pa.RecordBatch]:
            yield first
            yield from batches

        return pa.RecordBatchReader.from_batches(schema, chained())
    return pa.RecordBatchReader.from_batches(schema, batches)


class WarehouseResource(dg.ConfigurableResource):
    """Read, write and query tables. Subclasses implement one warehouse each."""

    @property
    @abstractmethod
    def dialect(self) -> Dialect: ...

    @abstractmethod
    def table_name(self, name: str) -> str:
        """The fully qualified name of a pipeline table (adds the dataset/schema)."""

    @abstractmethod
    def query(self, sql: str, params: QueryParams | None = None) -> pa.Table: ...

    @abstractmethod
    def query_batches(
        self, sql: str, params: QueryParams | None = None, batch_size: int = 65_536
    ) -> Iterator[pa.RecordBatch]: ...

    @abstractmethod
    def execute(self, sql: str, params: QueryParams | None = None) -> None: ...

    @abstractmethod
    def table_exists(self, name: str) -> bool: ...

    @abstractmethod
    def table_schema(self, name: str) -> pa.Schema: ...

    @abstractmethod
    def write_table(self, name: str, data: ArrowData, schema: pa.Schema | None = None) -> int:
        """Create or replace ``name`` with ``data`` in one step; returns the row count."""

    @abstractmethod
    def replace_partition(
        self,
        name: str,
        partition_column: str,
        partition_value: dt.date,
        data: ArrowData,
        schema: pa.Schema | None = None,
    ) -> int:
        """Replace the rows whose ``partition_column`` equals the value, atomically.

        Creates the table when it does not exist. Rows of other partitions are untouched.
        """

    def replace_partitions(
        self,
        name: str,
        partition_column: str,
        partition_values: Sequence[dt.date],
        data: ArrowData,
        schema: pa.Schema | None = None,
    ) -> dict[dt.date, int]:
        """Replace the rows of every value in ``partition_values`` with ``data``; each value's new count.

        ``data`` is the rows of all those partitions (a stream is fine); a row whose value is not
        listed is an error and nothing is written. This default replaces one partition at a time
        and holds ``data`` in memory; DuckDB overrides it with one transaction over a stream.
        """
        rows = as_batches(data, schema).read_all()
        check_partition_values(rows, partition_column, partition_values)
        column = rows[partition_column]
        return {
            value: self.replace_partition(
                name, partition_column, value, rows.filter(pc.equal(column, pa.scalar(value, column.type))), schema=schema
            )
            for value in partition_values
        }

    @abstractmethod
    def replace_partition_from_queries(
        self,
        selects: Mapping[str, str],
        partition_column: str,
        partition_value: dt.date,
        params: QueryParams,
    ) -> dict[str, int]:
        """Fill one partition of several tables from SELECTs run in the warehouse, atomically."""

    @abstractmethod
    def drop_view(self, name: str) -> None:
        """Drop ``name`` if it is a view (a table of that name is left alone)."""

    def write_run_snapshot(
        self, target: str, table: str, partition_column: str, partition_value: dt.date, run_column: str, run_id: str
    ) -> int:
        """Replace table ``target`` with the rows of run ``run_id`` in one partition of ``table``
        (:func:`~twotower_assets.warehouse.sql.run_snapshot_statement`); returns its row count.
        A view of that name (how ``_latest`` was once published) is dropped first."""
        from twotower_assets.warehouse.sql import run_snapshot_statement

        statement = run_snapshot_statement(self.dialect, target, table, partition_column, partition_value,
                                           run_column, run_id)  # every name and value checked before any write
        self.drop_view(target)
        self.execute(statement)
        return int(self.query(f"SELECT COUNT(*) AS n FROM {self.dialect.table(target)}")["n"][0].as_py())

    def run_rows(self, table: str, partition_column: str, partition_value: dt.date, run_column: str, run_id: str) -> int:
        """How many rows of run ``run_id`` partition ``partition_value`` of ``table`` holds."""
        from twotower_assets.warehouse.sql import run_rows_query

        rows = self.query(run_rows_query(self.dialect, table, partition_column, run_column),
                          {"train_date": partition_value, "mlflow_run_id": run_id})
        return int(rows["n"][0].as_py())

    @property
    def has_vector_search(self) -> bool:
        """Whether :meth:`nearest_neighbors_query` can run here (BigQuery's VECTOR_SEARCH)."""
        return False

    def nearest_neighbors_query(self, search: NeighborSearch) -> str:
        """A SELECT of the top-k neighbours (see :class:`~twotower_assets.warehouse.sql.NeighborSearch`).

        Only warehouses with native vector search have one; the parameter is ``train_date``.
        """
        raise WarehouseError(f"{type(self).__name__} has no native vector search; score the vectors locally")

    def ensure_vector_index(self, table: str, column: str, metric: str, min_rows: int) -> bool:
        """Create an approximate-search index on ``column`` once ``table`` has ``min_rows`` rows.

        Returns whether an index exists now. Warehouses without vector indexes return False.
        """
        return False

    def partition_row_counts(self, name: str, partition_column: str) -> dict[dt.date, int]:
        from twotower_assets.identifiers import quote_identifier

        column = quote_identifier(partition_column)
        result = self.query(
            f"SELECT {column} AS partition_value, COUNT(*) AS row_count "
            f"FROM {self.dialect.table(self.table_name(name))} GROUP BY {column} ORDER BY {column}"
        )
        return dict(zip(result["partition_value"].to_pylist(), result["row_count"].to_pylist()))
