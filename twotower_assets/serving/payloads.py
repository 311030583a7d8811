"""Request bodies of the retrieval server read into request dicts, without pandas.

``POST /invocations`` takes what ``mlflow models serve`` takes for this model, so a client
switches servers by changing the port: a JSON object with exactly one of
``dataframe_records`` (a list of request objects), ``dataframe_split`` (``columns`` and
``data`` rows), ``inputs`` or ``instances`` (a list of request objects, or an object of
columns). As there, fields a request does not use may be left out or null, fields the model
does not know are dropped, and a batch where no request has ``k`` is refused with MLflow's
own words. ``POST /recommend`` is the lean path: one request object, or ``{"requests":
[...]}``, where an unknown field is an error rather than dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from twotower_assets.serving.retrieval import REQUEST_FIELDS

RECORDS, SPLIT, INPUTS, INSTANCES = "dataframe_records", "dataframe_split", "inputs", "instances"
INVOCATION_FORMATS = (RECORDS, SPLIT, INPUTS, INSTANCES)


@dataclass
class PayloadError(Exception):
    """A body the server cannot read as requests: answered with ``status`` and this JSON."""

    status: int
    error_code: str
    message: str


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise PayloadError(
            400, "BAD_REQUEST", f"Invalid input. Ensure that input is a valid JSON formatted string. Error: '{error!r}'"
        ) from None


def _rows_of_columns(columns: Any, data: Any, where: str) -> list[dict]:
    if not isinstance(columns, list) or not isinstance(data, list) or any(not isinstance(r, list) for r in data):
        raise PayloadError(400, "BAD_REQUEST", f"{where} needs 'columns' (a list) and 'data' (a list of rows)")
    if any(len(r) != len(columns) for r in data):
        raise PayloadError(400, "BAD_REQUEST", f"{where}: every row of 'data' must have one value per column ({len(columns)})")
    return [dict(zip(columns, row)) for row in data]


def _records(value: Any, where: str) -> list[dict]:
    if isinstance(value, dict):  # columns: {"user_id": [...], "k": [...]}
        lengths = {len(v) if isinstance(v, list) else -1 for v in value.values()}
        if len(lengths) > 1 or -1 in lengths:
            raise PayloadError(400, "BAD_REQUEST", f"{where} as columns needs lists of one length")
        return _rows_of_columns(list(value), [list(r) for r in zip(*value.values())], where)
    if not isinstance(value, list) or any(not isinstance(r, dict) for r in value):
        raise PayloadError(400, "BAD_REQUEST", f"{where} must be a list of request objects")
    return value


def invocation_rows(body: bytes) -> list[dict]:
    """The requests of an ``/invocations`` body; PayloadError when it cannot be read as such."""
    data = _json(body)
    formats = set(data) & set(INVOCATION_FORMATS) if isinstance(data, dict) else set()
    if len(formats) != 1:
        received = list(data) if isinstance(data, dict) else type(data).__name__
        raise PayloadError(
            400, "BAD_REQUEST",
            f"The input must be a JSON dictionary with exactly one of the input fields {set(INVOCATION_FORMATS)}. "
            f"Received dictionary with input fields: {received}.",
        )
    (form,) = formats
    if form == SPLIT:
        split = data[SPLIT]
        if not isinstance(split, dict):
            raise PayloadError(400, "BAD_REQUEST", f"{SPLIT} must be an object with 'columns' and 'data'")
        rows = _rows_of_columns(split.get("columns"), split.get("data"), SPLIT)
    else:
        rows = _records(data[form], form)
    if not any("k" in row for row in rows):
        # What MLflow's signature check answers when the k column is missing altogether.
        raise PayloadError(400, "INVALID_PARAMETER_VALUE", "Model is missing inputs ['k'].")
    return [{key: row[key] for key in REQUEST_FIELDS if key in row} for row in rows]


def recommend_rows(body: bytes) -> tuple[list[dict], bool]:
    """(the requests of a ``/recommend`` body, whether it was one request rather than a list)."""
    data = _json(body)
    single = isinstance(data, dict) and "requests" not in data
    if single:
        rows = [data]
    elif isinstance(data, dict) and set(data) == {"requests"} and isinstance(data["requests"], list):
        rows = data["requests"]
    else:
        raise PayloadError(
            400, "BAD_REQUEST", 'the body must be one request object or {"requests": [request objects]}'
        )
    for position, row in enumerate(rows):
        if not isinstance(row, dict):
            raise PayloadError(400, "BAD_REQUEST", f"requests[{position}] must be an object, got {type(row).__name__}")
        unknown = [key for key in row if key not in REQUEST_FIELDS]
        if unknown:
            raise PayloadError(
                400, "INVALID_PARAMETER_VALUE",
                f"requests[{position}]: unknown fields {unknown}; the fields are {', '.join(REQUEST_FIELDS)}",
            )
    return rows, single
