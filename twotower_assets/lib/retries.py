"""Step retries of the assets that touch the warehouse: the one place they are set.

Two lines of defence against a warehouse that is briefly unavailable:

1. **Inside each call**: the BigQuery warehouse retries every API call and query job on a
   transient error (429, 5xx, ``rateLimitExceeded``, dropped connections) with exponential
   backoff for up to ``retry_deadline_s`` (:func:`~twotower_assets.warehouse.errors.is_transient_warehouse_error`).
   DuckDB waits for another writer's lock (``warehouse/duckdb.py``).
2. **The whole step**: when that is not enough (an outage longer than the client's deadline),
   :data:`WAREHOUSE_RETRY_POLICY` re-runs the step after an exponential backoff. Every
   warehouse write replaces a whole table or partition in one transaction, so a re-run never
   duplicates rows.

Only transient errors are retried. A permanent error (a 403 ``accessDenied``, a 404, a bad
query, an empty training window, a missing feature column) fails the step at once: it is
raised as ``dagster.Failure(allow_retries=False)`` carrying the original error (as the cause,
and its type and message in the description), because a retry would only fail again.

Every asset that uses the ``warehouse`` resource says so where it is defined::

    @dg.asset(..., retry_policy=WAREHOUSE_RETRY_POLICY)
    @retry_transient_errors_only
    def split_tables(context, config, warehouse): ...

(``tests/bigquery/test_retries.py`` checks that none is missed.) The training step does not
use the warehouse and gets no retry policy: on a Dagster run termination (SIGTERM) a retry
policy would restart training instead of stopping it.

Dagster builds a step's config object before the step's function runs, so a value its
pydantic constraints refuse (``num_users: -5``) would fail outside the function and be
retried like an outage. The config classes of these assets derive from :class:`StepConfig`,
which raises such an error as :class:`RunConfigError`: a ``Failure(allow_retries=False)``
naming every bad field, so the step fails once.
"""

from __future__ import annotations

import functools
import inspect

import dagster as dg
import pydantic

from twotower_assets.warehouse.errors import is_transient_warehouse_error

WAREHOUSE_RETRY_POLICY = dg.RetryPolicy(
    max_retries=3,
    delay=30,  # seconds: then ~60 and ~120 (exponential, +/- jitter)
    backoff=dg.Backoff.EXPONENTIAL,
    jitter=dg.Jitter.PLUS_MINUS,
)
"""Three more tries after 30 s, 60 s and 120 s (each +/- jitter): with the BigQuery client's
own 10 minutes of retries per call, a step rides out roughly a quarter of an hour of outage."""

def retry_transient_errors_only(fn):
    """``fn``, raising its non-transient errors as ``Failure(allow_retries=False)``.

    Put it under ``@dg.asset(retry_policy=...)``: Dagster's policy retries any error, this
    keeps it to the ones a retry can fix.
    """

    def final(exc: Exception) -> Exception:
        if isinstance(exc, (dg.Failure, dg.RetryRequested, dg.DagsterError)) or is_transient_warehouse_error(exc):
            return exc
        failure = dg.Failure(
            description=f"{type(exc).__name__}: {exc}",
            metadata={"retried": False, "reason": "permanent error (not retried)"},
            allow_retries=False,
        )
        failure.__cause__ = exc
        return failure

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:
                error = final(exc)
                if error is exc:
                    raise
                raise error from exc

        return generator

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            error = final(exc)
            if error is exc:
                raise
            raise error from exc

    return call


class RunConfigError(dg.Failure, ValueError):
    """A step's run config is invalid: the step fails at once, not retried. ``field_errors``:
    pydantic's errors (``loc``, ``msg``), one per bad field."""

    def __init__(self, description: str, field_errors: list[dict]):
        super().__init__(description=description, metadata={"retried": False, "reason": "invalid run config"},
                         allow_retries=False)
        self.field_errors = field_errors


class StepConfig(dg.Config):
    """The run config of a step with a retry policy: invalid values fail the step once."""

    def __init__(self, **values):
        try:
            super().__init__(**values)
        except pydantic.ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in problem['loc']) or 'config'}: {problem['msg']}"
                for problem in error.errors()
            )
            raise RunConfigError(f"invalid run config ({type(self).__name__}): {problems}",
                                 [dict(problem) for problem in error.errors()]) from None
