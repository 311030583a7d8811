"""Local files of the graph (saved datasets, models) under ``$TWOTOWER_HOME/artifacts``.

Each materialisation of an asset partition writes a new, immutable **version**: a directory
``<asset>/<date>.versions/<version>`` (``<UTC time>-<12 hex of the SHA-256 of its
checksums.json>``) that is never changed afterwards. ``<asset>/<date>`` is a symbolic link to
the newest version, swapped atomically (``os.replace``) when a version is complete, so a run
that dies midway leaves the previous version current, and two runs writing the same date never
share a scratch directory (each fills its own ``.partial-<id>``).

Readers call :meth:`ArtifactStore.require`, which resolves the link once and returns the
version directory itself: a step keeps reading the version it started with even when another
run publishes a newer one meanwhile. Every version carries
``checksums.json`` (SHA-256 of each file, written last, ``lib/checksums.py``), verified by
``require`` before a reader sees the directory.

Garbage collection (:meth:`ArtifactStore.collect_garbage`, run after each write of a partition):
a version is deleted only when it is not current, not protected (the caller's set, e.g. what
the champion uses) and older than ``keep_versions_hours`` (default 48 h, longer than any step,
so a running step's version is never deleted under it). The ``.partial-<host>-<pid>-<id>``
scratch directory of a killed writer goes as soon as its process is gone (same host), else by
the same age rule.
"""


import contextlib
import datetime as dt
import hashlib
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import dagster as dg
from pydantic import Field

from twotower_assets.lib.checksums import CHECKSUMS_FILE, verify_checksums, write_checksums
from twotower_assets.lib.mlflow_tracking import process_is_gone
from twotower_assets.preflight import check_writable_directory

VERSIONS_SUFFIX = ".versions"
PARTIAL_PREFIX = ".partial-"


class ArtifactStore(dg.ConfigurableResource):
    """Directories for file-based assets: immutable versions per asset and partition."""

    base_dir: str
    base_dir_setting: str = Field(
        default="TWOTOWER_HOME", description="The variable base_dir comes from, named in errors."
    )
    keep_versions_hours: float = Field(
        default=48.0, gt=0,
        description="Superseded versions younger than this are kept (a running step may still read them).",
    )

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # At the start of the run, before any step writes (twotower_assets/preflight.py).
        check_writable_directory(self.base_dir, self.base_dir_setting, "the artifacts directory")

    def path(self, asset: str, partition_key: str) -> Path:
        """The date's path: a link to its current version (what people and tools open)."""
        return Path(self.base_dir) / asset / partition_key

    def versions_dir(self, asset: str, partition_key: str) -> Path:
        return Path(self.base_dir) / asset / f"{partition_key}{VERSIONS_SUFFIX}"

    def version_path(self, asset: str, partition_key: str, version: str) -> Path:
        return self.versions_dir(asset, partition_key) / version

    @staticmethod
    def version_of(directory: Path) -> str:
        """The version a directory returned by :meth:`require` holds."""
        return Path(directory).name

    def current_version(self, asset: str, partition_key: str) -> str | None:
        """The version the date's link points at; None when the date has none."""
        link = self.path(asset, partition_key)
        if link.is_symlink():
            return Path(os.readlink(link)).name
        return partition_key if link.is_dir() else None  # a directory written before versions

    def versions(self, asset: str, partition_key: str) -> list[str]:
        """Every complete version of the partition, oldest first."""
        root = self.versions_dir(asset, partition_key)
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def require(self, asset: str, partition_key: str, version: str | None = None) -> Path:
        """The directory of an upstream partition's version (default: the current one), verified.

        Resolved once: the caller keeps this exact, immutable version whatever is published
        after. A clear error if it is missing, or if a file differs from what its writer
        recorded (:func:`~twotower_assets.lib.checksums.verify_checksums`).
        """
        link = self.path(asset, partition_key)
        if version is not None:
            root = self.version_path(asset, partition_key, version)
            if not root.is_dir():
                raise FileNotFoundError(
                    f"{asset} partition {partition_key} has no version {version} (current: "
                    f"{self.current_version(asset, partition_key)}); re-materialise {asset} for {partition_key}"
                )
        else:
            root = link.resolve()
            if not root.is_dir():
                raise FileNotFoundError(
                    f"{asset} has no materialisation for partition {partition_key} "
                    f"(expected {link}); materialise it first"
                )
        verify_checksums(root, asset, partition_key)
        return root

    @contextlib.contextmanager
    def writing(self, asset: str, partition_key: str) -> Iterator[Path]:
        """A fresh scratch directory; on success it becomes a new version and the current one."""
        versions = self.versions_dir(asset, partition_key)
        versions.mkdir(parents=True, exist_ok=True)
        # Named by its writer: a killed writer's scratch is collected as soon as its process is gone.
        partial = versions / f"{PARTIAL_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        partial.mkdir()
        try:
            yield partial
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        write_checksums(partial)
        digest = hashlib.sha256((partial / CHECKSUMS_FILE).read_bytes()).hexdigest()[:12]
        version = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%fZ}-{digest}"
        final = versions / version
        partial.rename(final)
        self._point_at(asset, partition_key, final)
        with contextlib.suppress(OSError):  # collection is housekeeping: never fail a write for it
            self.collect_garbage(asset, partition_key)

    def _point_at(self, asset: str, partition_key: str, final: Path) -> None:
        link = self.path(asset, partition_key)
        if link.is_dir() and not link.is_symlink():  # written before versions: keep it as one
            link.rename(self.versions_dir(asset, partition_key) / f"00000000-{partition_key}-unversioned")
        staged = link.with_name(f".{partition_key}.link-{uuid.uuid4().hex}")
        os.symlink(os.path.relpath(final, link.parent), staged)
        os.replace(staged, link)

    def partials(self, asset: str, partition_key: str) -> list[Path]:
        """Scratch directories of writers of the partition (running, or killed and not yet collected)."""
        root = self.versions_dir(asset, partition_key)
        return sorted(root.glob(f"{PARTIAL_PREFIX}*")) if root.is_dir() else []

    def collect_garbage(
        self, asset: str, partition_key: str, protected: Iterable[str] = (), now: float | None = None
    ) -> list[str]:
        """Delete the superseded versions the module docstring's rule allows; returns their names."""
        root = self.versions_dir(asset, partition_key)
        if not root.is_dir():
            return []
        keep = {self.current_version(asset, partition_key), *protected}
        cutoff = (now if now is not None else time.time()) - self.keep_versions_hours * 3600
        removed = []
        for entry in sorted(root.iterdir()):
            if entry.name in keep or not entry.is_dir():
                continue
            if entry.stat().st_mtime >= cutoff and not _writer_is_gone(entry.name):
                continue
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.name.startswith(PARTIAL_PREFIX):
                removed.append(entry.name)
        return removed


def _writer_is_gone(name: str) -> bool:
    """Whether ``name`` is the scratch directory of a writer process on this host that has died."""
    if not name.startswith(PARTIAL_PREFIX):
        return False
    host, _, rest = name[len(PARTIAL_PREFIX):].rpartition("-")[0].rpartition("-")
    return host == socket.gethostname() and rest.isdigit() and process_is_gone(int(rest))
