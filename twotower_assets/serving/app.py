"""The retrieval server: a FastAPI app answering from the version its :class:`AliasFollower`
holds.

Routes:

* ``POST /invocations``: MLflow's scoring protocol for the retriever (payloads.py); answers
  ``{"predictions": [...], "model_version": "<v>"}``.
* ``POST /recommend``: one request object (answer: the result object with ``model_version``)
  or ``{"requests": [...]}`` (answer: ``{"results": [...], "model_version": "<v>"}``).
* ``GET /ping`` and ``GET /ready``: 200 once a version is loaded, 503 before.
* ``GET /health``: 200 while the process runs, with the served version, refusals and the
  last look at the registry.
* ``GET /metrics``: Prometheus text format.

Every answer to a POST carries the version that produced it, in the body and in the
``X-Model-Version`` header. Each request reads the served version once, so a swap never
splits a request between two versions. Handlers are ``async`` and search inline: the search
takes well under a millisecond at the quickstart's size, less than a hand-off to a thread pool.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from twotower_assets.serving.follower import AliasFollower, ModelRef
from twotower_assets.serving.payloads import PayloadError, invocation_rows, recommend_rows
from twotower_assets.serving.retrieval import DEFAULT_EXACT_MAX_ELEMENTS, BadRequest
from twotower_assets.serving.server_metrics import ServerMetrics

log = logging.getLogger("twotower_assets.serving")

JSON = "application/json"


@dataclass(frozen=True)
class ServerSettings:
    model: str = "models:/two_tower_retriever@champion"
    tracking_uri: str | None = None
    poll_interval_s: float = 30.0
    exact_max_elements: int = DEFAULT_EXACT_MAX_ELEMENTS
    max_body_bytes: int = 4 * 1024 * 1024
    cache_dir: str | None = None


def _json_response(payload: dict, status: int = 200, version: str | None = None) -> Response:
    headers = {"X-Model-Version": version} if version is not None else None
    return Response(orjson.dumps(payload), status_code=status, media_type=JSON, headers=headers)


def _error(status: int, error_code: str, message: str, version: str | None = None) -> Response:
    return _json_response({"error_code": error_code, "message": message}, status, version)


def create_app(settings: ServerSettings) -> FastAPI:
    """The app; its lifespan starts the follower (first load in the background) and stops it."""
    import mlflow

    metrics = ServerMetrics()
    follower = AliasFollower(
        ModelRef.parse(settings.model),
        settings.tracking_uri or mlflow.get_tracking_uri(),
        poll_interval_s=settings.poll_interval_s,
        exact_max_elements=settings.exact_max_elements,
        cache_dir=settings.cache_dir,
        on_event=metrics.on_follower_event,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        follower.start()
        log.info("started", extra={"fields": {"model": settings.model, "tracking_uri": follower.tracking_uri,
                                              "poll_interval_s": settings.poll_interval_s}})
        yield
        follower.stop()
        log.info("stopped", extra={"fields": {}})

    app = FastAPI(title="two-tower retrieval", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.follower = follower
    app.state.metrics = metrics

    async def read_body(request: Request) -> bytes:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != JSON:
            raise PayloadError(
                415, "UNSUPPORTED_MEDIA_TYPE",
                f"This server only supports Content-Type {JSON}. Got {content_type or 'none'!r}.",
            )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > settings.max_body_bytes:  # refused before reading a byte of it
                raise PayloadError(413, "REQUEST_TOO_LARGE", _too_large(int(declared), settings.max_body_bytes))
            return await request.body()
        body = bytearray()  # chunked: counted as it arrives
        async for chunk in request.stream():
            body += chunk
            if len(body) > settings.max_body_bytes:
                raise PayloadError(413, "REQUEST_TOO_LARGE", _too_large(len(body), settings.max_body_bytes))
        return bytes(body)

    async def answer(route: str, request: Request, respond) -> Response:
        started = time.perf_counter()
        served = follower.current  # read once: this request is answered by this version only
        version = served.version if served is not None else None
        try:
            if served is None:
                raise PayloadError(503, "MODEL_NOT_LOADED", "no model version is loaded yet; see /health")
            response = respond(served, await read_body(request))
        except PayloadError as error:
            response = _error(error.status, error.error_code, error.message, version)
        except BadRequest as error:
            response = _error(400, "INVALID_PARAMETER_VALUE", str(error), version)
        except Exception as error:  # noqa: BLE001 (answer 500, log it, keep serving)
            log.exception("request_failed", extra={"fields": {"route": route, "version": version}})
            response = _error(500, "INTERNAL_ERROR", f"{type(error).__name__}: {error}", version)
        metrics.observe(route, response.status_code, time.perf_counter() - started)
        if response.status_code >= 400:
            metrics.errors.labels(route, orjson.loads(response.body)["error_code"]).inc()
        return response

    def invocations(served, body: bytes) -> Response:
        predictions = served.answer(served.check(invocation_rows(body)))
        return _json_response({"predictions": predictions, "model_version": served.version}, version=served.version)

    def recommend(served, body: bytes) -> Response:
        rows, single = recommend_rows(body)
        results = served.answer(served.check(rows))
        if single:
            return _json_response({**results[0], "model_version": served.version}, version=served.version)
        return _json_response({"results": results, "model_version": served.version}, version=served.version)

    async def invocations_route(request: Request) -> Response:
        return await answer("/invocations", request, invocations)

    async def recommend_route(request: Request) -> Response:
        return await answer("/recommend", request, recommend)

    # Plain Starlette routes for the two hot paths: FastAPI's dependency resolution has
    # nothing to do for a handler that reads the raw body, and cost ~10% of a request.
    app.add_route("/invocations", invocations_route, methods=["POST"])
    app.add_route("/recommend", recommend_route, methods=["POST"])

    def readiness() -> Response:
        served = follower.current
        if served is None:
            return _error(503, "MODEL_NOT_LOADED", "no model version is loaded yet; see /health")
        return _json_response({"ready": True, "model_version": served.version}, version=served.version)

    @app.get("/ping")
    async def ping() -> Response:
        return readiness()

    @app.get("/ready")
    async def ready() -> Response:
        return readiness()

    @app.get("/health")
    async def health() -> Response:
        served = follower.current
        state = follower.state
        return _json_response({
            "status": "serving" if served is not None else "waiting_for_a_model",
            "model": str(follower.model),
            "model_version": served.version if served is not None else None,
            "served": served.describe() if served is not None else None,
            "loading": state.loading,
            "refused": state.refused,
            "last_refusal": state.last_refusal,
            "swaps": state.swaps,
            "poll_interval_s": follower.poll_interval_s,
            "last_poll_unix": state.last_poll_unix,
            "last_poll_error": state.last_poll_error,
        })

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _too_large(size: int, limit: int) -> str:
    return f"the body has {size} bytes, above the limit of {limit} bytes; send smaller batches"
