"""The version the retrieval server answers with, following a registry alias.

:class:`AliasFollower` asks the MLflow registry every ``poll_interval_s`` which version
``<name>@<alias>`` points at. When that changes (a promotion, or a rollback to an older
version) it downloads and loads the new version in its own thread, probes it
(:meth:`Retrieval.probe`), and only then swaps it in: one assignment of :attr:`current`, so a
request that read ``current`` keeps the version it read to the end, and no request sees two.
A version that fails to download, load or probe is refused: the reason is logged, the
version in service stays, and the refused version is not tried again until the alias points
elsewhere and comes back.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from twotower_assets.serving.retrieval import DEFAULT_EXACT_MAX_ELEMENTS, Retrieval

log = logging.getLogger("twotower_assets.serving")


@dataclass(frozen=True)
class ModelRef:
    """``models:/<name>@<alias>`` (followed) or ``models:/<name>/<version>`` (pinned)."""

    name: str
    alias: str | None = None
    version: str | None = None

    @classmethod
    def parse(cls, uri: str) -> ModelRef:
        body = uri.removeprefix("models:/")
        if body == uri or not body:
            raise ValueError(f"model {uri!r}: give models:/<name>@<alias> or models:/<name>/<version>")
        if "@" in body:
            name, alias = body.split("@", 1)
            if name and alias and "/" not in body:
                return cls(name, alias=alias)
        elif body.count("/") == 1:
            name, version = body.split("/")
            if name and version.isdigit():
                return cls(name, version=version)
        raise ValueError(f"model {uri!r}: give models:/<name>@<alias> or models:/<name>/<version>")

    def __str__(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


@dataclass
class FollowerState:
    """What /health reports: the served version, refusals, the last look at the registry."""

    refused: dict[str, str] = field(default_factory=dict)
    last_poll_unix: float | None = None
    last_poll_error: str | None = None
    swaps: int = 0
    loading: str | None = None
    last_refusal: dict | None = None


class AliasFollower:
    """Loads the version the alias names, keeps serving it, and swaps when the alias moves."""

    def __init__(
        self,
        model: ModelRef,
        tracking_uri: str,
        *,
        poll_interval_s: float = 30.0,
        exact_max_elements: int = DEFAULT_EXACT_MAX_ELEMENTS,
        cache_dir: str | Path | None = None,
        on_event: Callable[[str, dict], None] | None = None,
    ):
        from mlflow import MlflowClient

        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be above 0, got {poll_interval_s}")
        self.model = model
        self.tracking_uri = tracking_uri
        self.poll_interval_s = poll_interval_s
        self.exact_max_elements = exact_max_elements
        self._client = MlflowClient(tracking_uri=tracking_uri)
        self._own_cache = cache_dir is None
        self._cache = Path(cache_dir or tempfile.mkdtemp(prefix="retrieval-server-"))
        self._on_event = on_event or (lambda event, fields: None)
        self.state = FollowerState()
        self.current: Retrieval | None = None
        self._previous_dir: Path | None = None
        self._current_dir: Path | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Look at the registry now (in the background) and then every poll interval."""
        self._thread = threading.Thread(target=self._run, name="alias-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._own_cache:
            shutil.rmtree(self._cache, ignore_errors=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            if self.model.version is not None and self.current is not None:
                return  # pinned: nothing to follow
            self._stop.wait(self.poll_interval_s)

    # ---------------------------------------------------------------- one look

    def poll_once(self) -> None:
        """Resolve the alias; load, probe and swap in its version if it is new and not refused."""
        try:
            version = self.model.version or self._client.get_model_version_by_alias(
                self.model.name, self.model.alias
            ).version
        except Exception as error:  # noqa: BLE001 (a registry outage must not stop serving)
            self.state.last_poll_error = f"{type(error).__name__}: {error}"
            self._event("poll_failed", error=self.state.last_poll_error)
            return
        finally:
            self.state.last_poll_unix = time.time()
        self.state.last_poll_error = None
        version = str(version)
        # A refusal holds while the alias points at that version; once it moves on, the
        # version may be tried again if the alias comes back to it.
        self.state.refused = {v: r for v, r in self.state.refused.items() if v == version}
        if (self.current is not None and self.current.version == version) or version in self.state.refused:
            return
        self._load_and_swap(version)

    def _load_and_swap(self, version: str) -> None:
        self.state.loading = version
        target = self._cache / f"v{version}-{time.time_ns()}"
        started = time.monotonic()
        self._event("loading", version=version)
        try:
            stage = "download"
            import mlflow

            # The version's own artifact location, so no process-wide registry URI is needed
            # (models:/ URIs resolve through MLflow's default registry).
            source = self._client.get_model_version_download_uri(self.model.name, version)
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=source, dst_path=str(target), tracking_uri=self.tracking_uri
            )
            stage = "load"
            retrieval = Retrieval.load(local, version, exact_max_elements=self.exact_max_elements)
            stage = "probe"
            retrieval.probe()
        except Exception as error:  # noqa: BLE001 (whatever went wrong, the version is refused)
            reason = f"{stage} failed: {type(error).__name__}: {error}"
            shutil.rmtree(target, ignore_errors=True)
            serving = self.current.version if self.current else None
            # Logged before /health shows it: whoever sees the refusal there finds its log line.
            self._event("refused", version=version, reason=reason, serving=serving)
            self.state.refused[version] = reason
            self.state.last_refusal = {"version": version, "reason": reason, "unix": time.time()}
            self.state.loading = None
            return
        previous = self.current.version if self.current else None
        self.current = retrieval  # the swap: requests read this attribute once each
        self.state.loading = None
        self.state.swaps += 1 if previous is not None else 0
        # The version before the previous one is no longer read by any request; the previous
        # one's files stay until the next swap (an in-flight ANN search may still read them).
        if self._previous_dir is not None:
            shutil.rmtree(self._previous_dir, ignore_errors=True)
        self._previous_dir, self._current_dir = self._current_dir, target
        self._event(
            "swapped" if previous is not None else "loaded", version=version, previous=previous,
            seconds=round(time.monotonic() - started, 3),
            **{k: v for k, v in retrieval.describe().items() if k != "version"},
        )

    def _event(self, event: str, **fields) -> None:
        level = logging.WARNING if event in ("refused", "poll_failed") else logging.INFO
        log.log(level, event, extra={"fields": {"model": str(self.model), **fields}})
        self._on_event(event, fields)
