"""``python -m twotower_assets.serving`` (or ``twotower-serve``): the retrieval server on uvicorn.

    MLFLOW_TRACKING_URI=sqlite:///$PWD/data/mlflow.db python -m twotower_assets.serving --host 127.0.0.1 --port 5002

Every option can also be set by an environment variable (the flag wins), so a container or a
replica set is configured without changing its command. Logs are JSON lines on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.config
import os
import sys
import time

from threadpoolctl import threadpool_limits

from twotower_assets.serving.app import ServerSettings, create_app

ENV_PREFIX = "TWOTOWER_SERVING_"


class JsonLines(logging.Formatter):
    """One JSON object per record: time, level, logger, event and the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def logging_config(level: str) -> dict:
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonLines}},
        "handlers": {"stderr": handler},
        "root": {"handlers": ["stderr"], "level": level.upper()},
        "loggers": {name: {"handlers": [], "propagate": True} for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
    }


def _env(name: str, default):
    return os.environ.get(ENV_PREFIX + name.upper(), default)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = ServerSettings()
    parser = argparse.ArgumentParser(prog="python -m twotower_assets.serving", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default=_env("host", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(_env("port", 5002)))
    parser.add_argument("--model", default=_env("model", defaults.model),
                        help="models:/<name>@<alias> (followed) or models:/<name>/<version> (pinned)")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="the MLflow registry (default: MLFLOW_TRACKING_URI)")
    parser.add_argument("--poll-interval", type=float, default=float(_env("poll_interval_s", defaults.poll_interval_s)),
                        help="seconds between looks at the registry alias")
    parser.add_argument("--exact-max-elements", type=int,
                        default=int(_env("exact_max_elements", defaults.exact_max_elements)),
                        help="exact search while items x dimensions is at most this; the ANN index above")
    parser.add_argument("--max-body-bytes", type=int, default=int(_env("max_body_bytes", defaults.max_body_bytes)))
    parser.add_argument("--cache-dir", default=_env("cache_dir", None),
                        help="where model versions are downloaded (default: a temporary directory)")
    parser.add_argument("--blas-threads", type=int, default=int(_env("blas_threads", 1)),
                        help="threads of the exact search's matrix product (BLAS)")
    parser.add_argument("--log-level", default=_env("log_level", "info"))
    parser.add_argument("--access-log", action="store_true", help="log every request (costs latency)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = parse_args(argv)
    # MLflow draws a progress bar per download; the server logs JSON lines instead.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if not args.tracking_uri:
        print("set MLFLOW_TRACKING_URI (or --tracking-uri) to the registry the model is registered in", file=sys.stderr)
        return 2
    settings = ServerSettings(
        model=args.model, tracking_uri=args.tracking_uri, poll_interval_s=args.poll_interval,
        exact_max_elements=args.exact_max_elements, max_body_bytes=args.max_body_bytes, cache_dir=args.cache_dir,
    )
    # One request's matrix-vector product gains nothing from more BLAS threads, and OpenBLAS's
    # idle threads spin: at 200,000 x 64 on 2 busy cores an exact query cost 8-11 CPU ms with
    # the default threads and ~2 ms with one (docs/benchmarks-serving.md).
    threadpool_limits(limits=args.blas_threads, user_api="blas")
    config = logging_config(args.log_level)
    logging.config.dictConfig(config)
    try:
        app = create_app(settings)
    except ValueError as error:  # a malformed --model or setting: say so, no traceback
        print(error, file=sys.stderr)
        return 2
    # uvicorn stops on SIGTERM / SIGINT: it stops accepting, lets in-flight requests finish
    # (at most timeout_graceful_shutdown seconds), then runs the lifespan's shutdown.
    uvicorn.run(
        app, host=args.host, port=args.port, log_config=config, access_log=args.access_log,
        timeout_graceful_shutdown=10, server_header=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
