"""Checks run when a Dagster run starts, before any step writes: fail early, name the setting.

A run whose MLflow store cannot be written used to split the events and replace the datasets,
and only then fail in training with ``sqlite3.OperationalError: unable to open database
file``; a ``TWOTOWER_HOME`` that is a file gave a bare ``FileExistsError``. The resources call
these checks in ``setup_for_execution``, which the in-process executor runs once for every
resource of the run before its first step, so such a run now fails at once with one line
naming the variable and the path (docs/reliability.md).

Plain Python (no Dagster, no MLflow import), so both ``lib/`` and ``warehouse/`` can use it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

HTTP_PROBE_TIMEOUT_S = 10.0


class PreflightError(RuntimeError):
    """A setting that makes the run fail later; the message names the variable and the path."""


def _blocking_ancestor(path: Path) -> str:
    """Why ``path`` cannot be a directory: the first part of it that exists and is not one."""
    for part in [path, *path.parents]:
        if part.exists():
            return f"{part} is a file, not a directory" if not part.is_dir() else f"{part} is not writable"
    return "no part of it exists"


def check_writable_directory(path: str | Path, setting: str, what: str) -> None:
    """``path`` is (or can be made) a directory this process can create files in.

    Missing directories are created, as the writers would. Writability is proven by creating
    and removing a temporary file (``os.access`` says yes to root on a read-only mount).
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as exc:
        reason = _blocking_ancestor(path) if not path.is_dir() else f"{exc.strerror or exc}"
        raise PreflightError(
            f"{setting}: {what} {path} is not a writable directory ({reason}); point {setting} at a writable directory"
        ) from None


def _check_writable_file(path: Path, setting: str, what: str) -> None:
    check_writable_directory(path.parent, setting, f"the directory of {what}")
    if path.exists():
        try:
            with path.open("r+b"):
                pass
        except OSError as exc:
            raise PreflightError(
                f"{setting}: {what} {path} cannot be written ({exc.strerror or exc}); point {setting} at a writable file"
            ) from None


def check_mlflow_store(uri: str, setting: str) -> None:
    """The MLflow tracking store of ``uri`` is writable (local) or answers (HTTP).

    ``sqlite:///path`` and ``file:`` / plain paths: the database file and its directory can be
    written. ``http(s)://``: the server answers at all (any HTTP status; no run is created, so
    server-side permissions are only seen when the first run is logged). Other schemes
    (``postgresql://``, ``databricks``) are left to MLflow's own first call.
    """
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "sqlite":
        location = unquote(uri.split("://", 1)[1])
        location = location[1:] if location.startswith("/") else location  # sqlite:///abs -> /abs
        if location in ("", ":memory:"):
            return
        _check_writable_file(Path(location), setting, f"the MLflow store ({uri})")
    elif scheme in ("", "file"):
        location = unquote(parts.path) if scheme == "file" else uri
        check_writable_directory(Path(location), setting, "the MLflow store directory")
    elif scheme in ("http", "https"):
        import requests

        netloc = parts.hostname or ""
        if parts.port:
            netloc = f"{netloc}:{parts.port}"
        shown = f"{scheme}://{netloc}{parts.path}"  # never the user or password
        try:
            requests.get(f"{shown.rstrip('/')}/health", timeout=HTTP_PROBE_TIMEOUT_S)
        except requests.exceptions.RequestException as exc:
            raise PreflightError(
                f"{setting}: the MLflow tracking server {shown} cannot be reached ({type(exc).__name__}); "
                f"start it or point {setting} at a reachable server"
            ) from None


def check_artifact_root(uri: str, setting: str) -> None:
    """A local (``file:``) MLflow artifact root is a writable directory; remote roots are not probed."""
    parts = urlsplit(uri)
    if uri and parts.scheme.lower() in ("", "file"):
        check_writable_directory(Path(unquote(parts.path) if parts.scheme else uri), setting, "the MLflow artifact root")
