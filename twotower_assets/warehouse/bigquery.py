"""The production warehouse: the pipeline's tables in one BigQuery dataset.

Built on dagster-gcp's ``BigQueryResource`` (project, location, credentials: a base64
service-account key, normally through ``EnvVar``, or application default credentials). With
an emulator endpoint (``endpoint`` or ``BIGQUERY_EMULATOR_HOST``) the client talks to it with
anonymous credentials; the tests and CI run bqemulator that way. docs/bigquery.md is the
user's guide.

How writes stay all-or-nothing:

* ``replace_partition``: the rows are first written to a local Parquet file (an input that
  fails midway stops here), loaded into a staging table, then one multi-statement transaction
  deletes the partition and inserts the staged rows.
* ``replace_partition_from_queries``: each SELECT runs in BigQuery into a staging table, then
  one transaction swaps the partition of every target table, so the three split tables of a
  training date change together.
* ``write_table``: one load job with WRITE_TRUNCATE, which BigQuery commits atomically.

Transient errors are retried with exponential backoff: every API call with ``retry=`` (429,
5xx, ``rateLimitExceeded``/``backendError``-style reasons, dropped connections; see
:func:`~twotower_assets.warehouse.errors.is_transient_bigquery_error`), and every query job
with ``job_retry=`` (a job that failed for a transient reason is run again; the writes are
idempotent: staging tables have fresh names and the partition swap is one transaction). Permanent errors (400, 403 ``accessDenied``, 404) are
raised at once. Dagster's step-level RetryPolicy (retrying on
:func:`~twotower_assets.warehouse.errors.is_transient_warehouse_error`) is the second line for
outages longer than ``retry_deadline_s``.

Staging tables expire after ``staging_expiration_hours`` in case the process dies before it
drops them. A load job to ``table$YYYYMMDD`` with WRITE_TRUNCATE would also be atomic on
BigQuery, but it covers one table only and bqemulator 1.4 ignores partition decorators (it
would truncate the whole table), so the transaction is the path that is tested.

bqemulator does not bind query parameters inside multi-statement scripts, so the swap script
carries the partition date as a typed literal rendered from a ``datetime.date`` (never from a
string; :func:`~twotower_assets.warehouse.bigquery_types.date_literal`); every other value is a
query parameter.

The column and parameter types are in ``bigquery_types.py``, the VECTOR_SEARCH SQL in ``sql.py``,
the TWOTOWER_* variables ``from_env`` reads in ``twotower_assets/settings.py``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from dagster_gcp import BigQueryResource
from dagster_gcp.bigquery.utils import setup_gcp_creds
from google.api_core import retry as api_retry
from google.api_core.client_options import ClientOptions
from google.api_core.exceptions import NotFound
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery
from google.cloud.bigquery import retry as bigquery_retry
from pydantic import Field, PrivateAttr

from twotower_assets import settings
from twotower_assets.warehouse.base import ArrowData, QueryParams, WarehouseResource, as_batches
from twotower_assets.warehouse.bigquery_types import (
    arrow_schema,
    bigquery_schema,
    date_literal,
    query_parameters,
    standard_type,
)
from twotower_assets.warehouse.errors import WarehouseError, is_transient_bigquery_error
from twotower_assets.identifiers import check_identifier, check_project_id, check_table_name, quote_identifier
from twotower_assets.warehouse.sql import (
    BIGQUERY,
    Dialect,
    NeighborSearch,
    bigquery_vector_index_statement,
    bigquery_vector_search_query,
)

EMULATOR_HOST_VARIABLE = "BIGQUERY_EMULATOR_HOST"
DAY_MS = 86_400_000


def normalise_endpoint(endpoint: str) -> str:
    """``host:port`` (as BIGQUERY_EMULATOR_HOST is often written) becomes ``http://host:port``."""
    endpoint = endpoint.strip().rstrip("/")
    return endpoint if "://" in endpoint else f"http://{endpoint}"


class BigQueryWarehouse(WarehouseResource):
    """Tables in one BigQuery dataset (created on first use if missing)."""

    bigquery: BigQueryResource = Field(
        description="dagster-gcp's BigQuery resource: project, location and credentials."
    )
    dataset: str = Field(description="Dataset of the pipeline's tables, e.g. ml_preproc_prod.")
    endpoint: str | None = Field(
        default=None,
        description="REST endpoint of a BigQuery emulator (anonymous credentials); "
        "default: BIGQUERY_EMULATOR_HOST when set, else real BigQuery.",
    )
    external_tables: dict[str, str] = Field(
        default={},
        description="Tables read in place of the dataset's own: {table name the pipeline asks for: "
        "project.dataset.table}, e.g. the production click events (TWOTOWER_BQ_CLICK_EVENTS_TABLE).",
    )
    partition_expiration_days: int = Field(
        default=183, gt=0, description="Partition expiration of the partitioned tables (about six months)."
    )
    staging_expiration_hours: int = Field(
        default=24, gt=0, description="Lifetime of a staging table a crashed write left behind."
    )
    use_storage_read_api: bool = Field(
        default=True, description="Stream large query results with the Storage Read API (never on an emulator)."
    )
    native_vector_search: bool = Field(
        default=True,
        description="VECTOR_SEARCH and CREATE VECTOR INDEX; emulators lack them, so similar items are scored locally instead.",
    )

    retry_initial_s: float = Field(default=1.0, gt=0, description="First backoff after a transient error.")
    retry_maximum_s: float = Field(default=32.0, gt=0, description="Longest backoff between two tries.")
    retry_deadline_s: float = Field(
        default=600.0,
        gt=0,
        description="How long one API call is retried (google-cloud-bigquery's default: 10 minutes).",
    )
    job_retry_deadline_s: float = Field(
        default=2400.0,
        gt=0,
        description="How long a query job that failed for a transient reason is re-run (the "
        "library's default; keep it well above twice retry_deadline_s).",
    )

    _dataset_checked: bool = PrivateAttr(default=False)

    @classmethod
    def from_env(cls) -> "BigQueryWarehouse":
        """The warehouse the TWOTOWER_* variables describe (read and listed in settings.py)."""
        configured = settings.bigquery_settings()
        credentials = configured.credentials_variable
        warehouse = cls(
            bigquery=BigQueryResource(
                project=configured.project,
                location=configured.location,
                gcp_credentials=dg.EnvVar(credentials) if credentials else None,
            ),
            dataset=configured.dataset,
            endpoint=configured.endpoint,
            external_tables=configured.external_tables,
            partition_expiration_days=configured.partition_expiration_days,
        )
        warehouse.check_names()  # a bad name stops the code location from loading, before any job
        return warehouse

    def check_names(self) -> None:
        """Refuse a project, dataset or external table that is not a plain name
        (:mod:`twotower_assets.warehouse.sql`), before anything is sent to BigQuery."""
        if self.bigquery.project:
            check_project_id(self.bigquery.project)
        check_identifier(self.dataset, "dataset name")
        for table in self.external_tables.values():
            check_table_name(table)

    # -- retries ------------------------------------------------------------------------------

    @property
    def api_retry(self) -> api_retry.Retry:
        """``retry=`` of every API call: transient errors only, exponential backoff."""
        return self._transient_only(bigquery.DEFAULT_RETRY, self.retry_deadline_s)

    @property
    def job_retry(self) -> api_retry.Retry:
        """``job_retry=`` of query jobs: a job that failed for a transient reason runs again."""
        return self._transient_only(bigquery_retry.DEFAULT_JOB_RETRY, self.job_retry_deadline_s)

    def _transient_only(self, retry: api_retry.Retry, deadline_s: float) -> api_retry.Retry:
        return (
            retry.with_predicate(is_transient_bigquery_error)
            .with_delay(initial=self.retry_initial_s, maximum=self.retry_maximum_s, multiplier=2.0)
            .with_deadline(deadline_s)
        )

    def _run_query(self, client: bigquery.Client, sql: str, job_config, **result_kwargs):
        """Start a query job and wait for it, both retried (API calls and the job itself)."""
        job = client.query(sql, job_config=job_config, retry=self.api_retry, job_retry=self.job_retry)
        return job.result(retry=self.api_retry, job_retry=self.job_retry, **result_kwargs)

    # -- connection ---------------------------------------------------------------------------

    @property
    def emulator_endpoint(self) -> str | None:
        endpoint = self.endpoint or os.environ.get(EMULATOR_HOST_VARIABLE)
        return normalise_endpoint(endpoint) if endpoint else None

    @property
    def storage_read_enabled(self) -> bool:
        return self.use_storage_read_api and self.emulator_endpoint is None

    @property
    def native_vector_search_enabled(self) -> bool:
        return self.native_vector_search and self.emulator_endpoint is None

    @contextlib.contextmanager
    def client(self) -> Iterator[bigquery.Client]:
        self.check_names()
        endpoint = self.emulator_endpoint
        if endpoint is not None:
            if not self.bigquery.project:
                raise WarehouseError("a BigQuery emulator needs an explicit project (TWOTOWER_BQ_PROJECT)")
            # Anonymous, unless a key is configured: then the same path as production
            # (dagster-gcp's temporary key file, read as application default credentials).
            keyed = bool(self.bigquery.gcp_credentials)
            with setup_gcp_creds(self.bigquery.gcp_credentials) if keyed else contextlib.nullcontext():
                client = bigquery.Client(
                    project=self.bigquery.project,
                    location=self.bigquery.location,
                    credentials=None if keyed else AnonymousCredentials(),
                    client_options=ClientOptions(api_endpoint=endpoint),
                )
                try:
                    yield client
                finally:
                    client.close()
            return
        with self.bigquery.get_client() as client:
            try:
                yield client
            finally:
                client.close()

    @property
    def dialect(self) -> Dialect:
        return BIGQUERY

    def table_name(self, name: str) -> str:
        """``project.dataset.name`` for a pipeline table, or the external table configured in its
        place; qualified names pass through."""
        if name in self.external_tables:
            return check_table_name(self.external_tables[name])
        if "." in name:
            return check_table_name(name)
        prefix = f"{self.bigquery.project}." if self.bigquery.project else ""
        return check_table_name(f"{prefix}{quote_identifier(self.dataset)}.{quote_identifier(name)}")

    def _sibling(self, table: str, name: str) -> str:
        """A table named ``name`` in the dataset of ``table``."""
        return check_table_name(".".join([*check_table_name(table).split(".")[:-1], name]))

    def _ensure_dataset(self, client: bigquery.Client) -> None:
        if self._dataset_checked:
            return
        reference = bigquery.DatasetReference(client.project, self.dataset)
        try:
            client.get_dataset(reference, retry=self.api_retry)
        except NotFound:
            dataset = bigquery.Dataset(reference)
            dataset.location = self.bigquery.location
            client.create_dataset(dataset, exists_ok=True, retry=self.api_retry)
        self._dataset_checked = True

    def _job_config(self, params: QueryParams | None, **kwargs) -> bigquery.QueryJobConfig:
        return bigquery.QueryJobConfig(query_parameters=query_parameters(params), use_legacy_sql=False, **kwargs)

    # -- reads ----------------------------------------------------------------------------------

    def query(self, sql: str, params: QueryParams | None = None) -> pa.Table:
        with self.client() as client:
            rows = self._run_query(client, sql, self._job_config(params))
            return rows.to_arrow(create_bqstorage_client=self.storage_read_enabled)

    def query_batches(
        self, sql: str, params: QueryParams | None = None, batch_size: int = 65_536
    ) -> Iterator[pa.RecordBatch]:
        """Record batches as BigQuery sends them: Storage Read API streams, or REST pages."""
        with self.client() as client:
            rows = self._run_query(client, sql, self._job_config(params), page_size=batch_size)
            storage_client = None
            if self.storage_read_enabled:
                from google.cloud import bigquery_storage

                storage_client = bigquery_storage.BigQueryReadClient(credentials=client._credentials)
            yield from rows.to_arrow_iterable(bqstorage_client=storage_client)

    def execute(self, sql: str, params: QueryParams | None = None) -> None:
        with self.client() as client:
            self._run_query(client, sql, self._job_config(params))

    def table_exists(self, name: str) -> bool:
        with self.client() as client:
            try:
                client.get_table(check_table_name(name), retry=self.api_retry)
            except NotFound:
                return False
            return True

    def get_table(self, name: str) -> bigquery.Table:
        """The table's metadata (schema, partitioning, expiration) as BigQuery reports it."""
        with self.client() as client:
            try:
                return client.get_table(check_table_name(name), retry=self.api_retry)
            except NotFound as exc:
                raise WarehouseError(f"table {name} does not exist") from exc

    def table_schema(self, name: str) -> pa.Schema:
        return arrow_schema(self.get_table(name).schema)

    # -- writes ---------------------------------------------------------------------------------

    def write_table(self, name: str, data: ArrowData, schema: pa.Schema | None = None) -> int:
        check_table_name(name)
        reader = as_batches(data, schema)
        with tempfile.TemporaryDirectory(prefix="twotower-bq-") as tmp:
            path, rows = _write_parquet(reader, Path(tmp) / "rows.parquet")
            columns = bigquery_schema(reader.schema)
            with self.client() as client:
                self._ensure_dataset(client)
                self._load(client, path, check_table_name(name), columns, "WRITE_TRUNCATE")
        return rows

    def replace_partition(
        self,
        name: str,
        partition_column: str,
        partition_value: dt.date,
        data: ArrowData,
        schema: pa.Schema | None = None,
    ) -> int:
        check_table_name(name)
        literal = date_literal(partition_value)
        reader = as_batches(data, schema)
        with tempfile.TemporaryDirectory(prefix="twotower-bq-") as tmp:
            path, _ = _write_parquet(
                reader, Path(tmp) / "rows.parquet", partition=(quote_identifier(partition_column), partition_value)
            )
            columns = bigquery_schema(reader.schema)
            with self.client() as client:
                self._ensure_dataset(client)
                self._ensure_partitioned_table(client, name, columns, partition_column)
                staging = self._create_staging_table(client, name, columns)
                try:
                    self._load(client, path, staging, columns, "WRITE_TRUNCATE")
                    self._swap_partitions(client, {name: staging}, {name: columns}, partition_column, literal)
                finally:
                    client.delete_table(staging, not_found_ok=True, retry=self.api_retry)
        return self._partition_rows(name, partition_column, partition_value)

    def replace_partition_from_queries(
        self,
        selects: Mapping[str, str],
        partition_column: str,
        partition_value: dt.date,
        params: QueryParams,
    ) -> dict[str, int]:
        for target in selects:
            check_table_name(target)
        literal = date_literal(partition_value)
        column = quote_identifier(partition_column)
        job_params = {**params, "partition_value": partition_value}
        staged: dict[str, str] = {}
        columns: dict[str, list[bigquery.SchemaField]] = {}
        with self.client() as client:
            self._ensure_dataset(client)
            try:
                for target, select in selects.items():
                    staging = self._staging_name(target)
                    staged[target] = staging
                    self._run_query(
                        client,
                        f"CREATE TABLE {BIGQUERY.table(staging)} OPTIONS(expiration_timestamp = "
                        f"TIMESTAMP_ADD(CURRENT_TIMESTAMP(), INTERVAL {self.staging_expiration_hours} HOUR)) AS "
                        f"SELECT CAST(@partition_value AS DATE) AS {column}, source.* FROM ({select}) AS source",
                        self._job_config(job_params),
                    )
                    columns[target] = list(client.get_table(staging, retry=self.api_retry).schema)
                    self._ensure_partitioned_table(client, target, columns[target], partition_column)
                self._swap_partitions(client, staged, columns, partition_column, literal)
            finally:
                for staging in staged.values():
                    client.delete_table(staging, not_found_ok=True, retry=self.api_retry)
        return {target: self._partition_rows(target, partition_column, partition_value) for target in selects}

    def drop_view(self, name: str) -> None:
        with self.client() as client:
            try:
                table = client.get_table(check_table_name(name), retry=self.api_retry)
            except NotFound:
                return
            if table.table_type == "VIEW":
                client.delete_table(table, retry=self.api_retry, not_found_ok=True)

    # -- vector search --------------------------------------------------------------------------

    @property
    def has_vector_search(self) -> bool:
        return self.native_vector_search_enabled

    def nearest_neighbors_query(self, search: NeighborSearch) -> str:
        if self.native_vector_search_enabled:
            return bigquery_vector_search_query(search)
        return super().nearest_neighbors_query(search)

    def ensure_vector_index(self, table: str, column: str, metric: str, min_rows: int) -> bool:
        if not self.native_vector_search_enabled:
            return False
        if (self.get_table(table).num_rows or 0) < min_rows:
            return False
        self.execute(bigquery_vector_index_statement(table, column, metric))
        return True

    # -- helpers --------------------------------------------------------------------------------

    def _partition_rows(self, name: str, partition_column: str, partition_value: dt.date) -> int:
        result = self.query(
            f"SELECT COUNT(*) AS row_count FROM {BIGQUERY.table(name)} "
            f"WHERE {quote_identifier(partition_column)} = @partition_value",
            {"partition_value": partition_value},
        )
        return result["row_count"][0].as_py()

    def _staging_name(self, target: str) -> str:
        short_name = check_table_name(target).split(".")[-1]
        return self._sibling(target, f"_staging_{short_name}_{uuid.uuid4().hex[:12]}")

    def _create_staging_table(self, client: bigquery.Client, target: str, columns) -> str:
        name = self._staging_name(target)
        table = bigquery.Table(_reference(client, name), schema=columns)
        table.expires = dt.datetime.now(dt.UTC) + dt.timedelta(hours=self.staging_expiration_hours)
        client.create_table(table, retry=self.api_retry)
        return name

    def _ensure_partitioned_table(self, client: bigquery.Client, name: str, columns, partition_column: str) -> None:
        """Create ``name`` DAY-partitioned on the column, or check an existing table matches."""
        try:
            existing = client.get_table(name, retry=self.api_retry)
        except NotFound:
            table = bigquery.Table(_reference(client, name), schema=columns)
            table.time_partitioning = bigquery.TimePartitioning(
                type_=bigquery.TimePartitioningType.DAY,
                field=partition_column,
                expiration_ms=self.partition_expiration_days * DAY_MS,
            )
            client.create_table(table, exists_ok=True, retry=self.api_retry)
            return
        partitioning = existing.time_partitioning
        if partitioning is None or partitioning.field != partition_column:
            raise WarehouseError(f"table {name} exists but is not partitioned on {partition_column}")
        have = {f.name: (standard_type(f.field_type), f.mode == "REPEATED") for f in existing.schema}
        want = {f.name: (standard_type(f.field_type), f.mode == "REPEATED") for f in columns}
        if have != want:
            raise WarehouseError(
                f"table {name} has columns {sorted(have.items())}, the new rows have {sorted(want.items())}; "
                "drop or migrate the table first"
            )

    def _load(self, client: bigquery.Client, path: Path, destination: str, columns, disposition: str) -> None:
        config = bigquery.LoadJobConfig(
            source_format=bigquery.SourceFormat.PARQUET,
            schema=columns,
            write_disposition=disposition,
            create_disposition=bigquery.CreateDisposition.CREATE_IF_NEEDED,
        )
        # Parquet LIST columns load as REPEATED only with list inference on.
        parquet_options = bigquery.ParquetOptions()
        parquet_options.enable_list_inference = True
        config.parquet_options = parquet_options
        with open(path, "rb") as source:
            # No ``size``: the client then always uses a resumable upload. Its small-file
            # multipart upload sends the media part as */*, which bqemulator 1.4 rejects.
            # The upload retries its own chunks (num_retries); the job is then polled with retry.
            job = client.load_table_from_file(source, destination, job_config=config)
            job.result(retry=self.api_retry)

    def _swap_partitions(self, client: bigquery.Client, staged: Mapping[str, str], columns, partition_column, literal):
        """In one transaction, replace each target's partition by its staging table's rows."""
        column = quote_identifier(partition_column)
        statements = ["BEGIN TRANSACTION;"]
        for target, staging in staged.items():
            names = ", ".join(quote_identifier(f.name) for f in columns[target])
            statements.append(f"DELETE FROM {BIGQUERY.table(target)} WHERE {column} = {literal};")
            statements.append(
                f"INSERT INTO {BIGQUERY.table(target)} ({names}) SELECT {names} FROM {BIGQUERY.table(staging)};"
            )
        statements.append("COMMIT TRANSACTION;")
        # job_retry may run the script again: it is one transaction, so it applied fully or not at all.
        self._run_query(client, "\n".join(statements), self._job_config(None))


def _reference(client: bigquery.Client, name: str) -> bigquery.TableReference:
    return bigquery.TableReference.from_string(check_table_name(name), default_project=client.project)


def _write_parquet(
    reader: pa.RecordBatchReader, path: Path, partition: tuple[str, dt.date] | None = None
) -> tuple[Path, int]:
    """Spool the batches to a Parquet file; with ``partition``, every row must be in it."""
    rows = 0
    with pq.ParquetWriter(path, reader.schema) as writer:
        for batch in reader:
            if partition is not None:
                column, value = partition
                if column not in batch.schema.names:
                    raise WarehouseError(f"rows have no partition column {column!r}")
                values = batch.column(column)
                matches = pc.equal(values, pa.scalar(value, values.type))
                if values.null_count or not pc.all(matches).as_py():
                    raise WarehouseError(f"rows outside partition {column}={value} in a write of that partition")
            writer.write_batch(batch)
            rows += batch.num_rows
    return path, rows
