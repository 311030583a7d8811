"""The warehouse's errors, and which errors may go away by themselves (worth retrying).

Two lines of defence use the transient predicates: the BigQuery client retries each API call
and query job on :func:`is_transient_bigquery_error` (``warehouse/bigquery.py``), and the step
retry policy of the assets retries a step only when :func:`is_transient_warehouse_error` holds
for what it raised.
"""

from __future__ import annotations

import requests.exceptions
from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions


class WarehouseError(RuntimeError):
    """A warehouse operation that failed with a message worth showing the user."""


class EmptyTableError(WarehouseError):
    """A table (or partition) that must have rows has none."""


# -- BigQuery ---------------------------------------------------------------------------------------

# Error reasons BigQuery documents as retryable (https://cloud.google.com/bigquery/docs/error-messages):
# API-level and, for a job whose status carries them, job-level.
BIGQUERY_TRANSIENT_REASONS = frozenset(
    {
        "rateLimitExceeded",
        "backendError",
        "internalError",
        "badGateway",
        "jobBackendError",
        "jobInternalError",
        "jobRateLimitExceeded",
    }
)
# HTTP 429 and 5xx, and the transport failing under the client.
BIGQUERY_TRANSIENT_TYPES = (
    api_exceptions.TooManyRequests,
    api_exceptions.InternalServerError,
    api_exceptions.BadGateway,
    api_exceptions.ServiceUnavailable,
    api_exceptions.GatewayTimeout,
    ConnectionError,
    TimeoutError,
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
    auth_exceptions.TransportError,
)


def is_transient_bigquery_error(exc: BaseException) -> bool:
    """Whether a BigQuery error may go away by itself: worth retrying.

    429 and 5xx answers, dropped connections and timeouts, and any answer whose error reason
    BigQuery documents as retryable (e.g. a 403 ``rateLimitExceeded``). Everything else (400
    ``invalidQuery``, 403 ``accessDenied``, 404 ``notFound``, a TLS failure) is permanent. A
    ``RetryError`` (the client's retry deadline ran out) is as transient as its cause.
    """
    if isinstance(exc, api_exceptions.RetryError):
        return exc.cause is not None and is_transient_bigquery_error(exc.cause)
    if isinstance(exc, requests.exceptions.SSLError):
        return False
    if isinstance(exc, BIGQUERY_TRANSIENT_TYPES):
        return True
    errors = getattr(exc, "errors", None) or []
    return any(isinstance(error, dict) and error.get("reason") in BIGQUERY_TRANSIENT_REASONS for error in errors)


# -- DuckDB -----------------------------------------------------------------------------------------

# What DuckDB says when another process holds the database file's lock.
DUCKDB_LOCK_MESSAGES = ("Could not set lock", "Conflicting lock")


def is_duckdb_lock_error(exc: BaseException) -> bool:
    """Whether ``exc`` is DuckDB's file lock held by another process (for longer than the
    warehouse waits for it)."""
    # DuckDB's exceptions live in its C extension module, ``_duckdb``.
    module = (type(exc).__module__ or "").lstrip("_")
    return module.startswith("duckdb") and any(m in str(exc) for m in DUCKDB_LOCK_MESSAGES)


# -- either warehouse -------------------------------------------------------------------------------


def is_transient_warehouse_error(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it was raised from, may go away by itself."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if is_transient_bigquery_error(exc) or is_duckdb_lock_error(exc):
            return True
        exc = exc.__cause__
    return False
