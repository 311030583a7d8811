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

Retention by reference (:meth:`ArtifactStore.collect_garbage`, run after each write of a
partition): a superseded version is deleted only when nothing refers to it:

* it is not the current version, nor in the caller's ``protected`` set;
* no step holds a **lease** on it: :meth:`~ArtifactStore.require` leases the version it
  returns (a file in ``<asset>/<date>.versions/.leases/`` naming the Dagster run, host and
  process, with an expiry that a background thread renews while the step runs); the lease
  is released when the step's resources are torn down, and a lease whose process is gone
  (same host) or whose expiry passed (another host) counts no more;
* no other version records it in its ``references.json`` (:func:`write_references`): a
  model names the datasets version it trained on, a registration the model version it
  published, so what a registered model or the champion was built from stays while its
  record does. A running writer's scratch directory counts too;
* it is older than ``keep_versions_hours`` (default 48 h): age is a floor, not the rule.

The ``.partial-<host>-<pid>-<id>`` scratch directory of a killed writer goes as soon as its
process is gone (same host), else by the age rule.
"""


import atexit
import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import dagster as dg
from pydantic import Field

from twotower_assets.lib.checksums import CHECKSUMS_FILE, verify_checksums, write_checksums
from twotower_assets.lib.mlflow_tracking import process_is_gone
from twotower_assets.lib.run_liveness import record_run_host
from twotower_assets.preflight import check_writable_directory

VERSIONS_SUFFIX = ".versions"
PARTIAL_PREFIX = ".partial-"
LEASES_DIR = ".leases"
REFERENCES_FILE = "references.json"


class ArtifactStore(dg.ConfigurableResource):
    """Directories for file-based assets: immutable versions per asset and partition."""

    base_dir: str
    base_dir_setting: str = Field(
        default="TWOTOWER_HOME", description="The variable base_dir comes from, named in errors."
    )
    keep_versions_hours: float = Field(
        default=48.0, gt=0,
        description="The floor: a superseded version younger than this is kept even when nothing refers to it.",
    )
    lease_seconds: float = Field(
        default=600.0, gt=0,
        description="A reader's lease on a version lasts this long unless renewed (every third of it while "
        "the step runs); a lease of a dead process on this host ends at once.",
    )

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # At the start of the run, before any step writes (twotower_assets/preflight.py).
        check_writable_directory(self.base_dir, self.base_dir_setting, "the artifacts directory")
        record_run_host(context)
        _LEASES.holder = getattr(context, "run_id", None) or _LEASES.holder

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        # The step (or in-process run) is over: what it read may be collected.
        _LEASES.release_all()

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
        Leased: the version is not collected while this process's step runs (module docstring).
        """
        link = self.path(asset, partition_key)
        root = self.version_path(asset, partition_key, version) if version is not None else link.resolve()
        if root.is_dir():
            _LEASES.take(self.versions_dir(asset, partition_key), root.name, self.lease_seconds)
        # Checked after leasing: a collection that ran in between has deleted it, or it stays.
        if version is not None and not root.is_dir():
            raise FileNotFoundError(
                f"{asset} partition {partition_key} has no version {version} (current: "
                f"{self.current_version(asset, partition_key)}); re-materialise {asset} for {partition_key}"
            )
        if not root.is_dir():
            raise FileNotFoundError(
                f"{asset} has no materialisation for partition {partition_key} "
                f"(expected {link}); materialise it first"
            )
        verify_checksums(root, asset, partition_key)
        return root

    def leases(self, asset: str, partition_key: str) -> dict[str, list[dict]]:
        """The live leases of the partition's versions: version -> the holders' records."""
        live: dict[str, list[dict]] = {}
        for path, record in _lease_records(self.versions_dir(asset, partition_key)):
            if _lease_is_live(record):
                live.setdefault(record["version"], []).append(record)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()  # a dead step's lease: nothing will release it
        return live

    def referenced_versions(self, asset: str, partition_key: str) -> dict[str, list[str]]:
        """The partition's versions that another version (or a running writer) records in its
        ``references.json``: version -> the referring directories."""
        referenced: dict[str, list[str]] = {}
        for path in Path(self.base_dir).glob(f"*/*{VERSIONS_SUFFIX}/*/{REFERENCES_FILE}"):
            try:
                references = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # a writer still writing it, or a damaged file: its own checksums will say
            for reference in references:
                if reference.get("asset") == asset and reference.get("partition") == partition_key:
                    referenced.setdefault(reference.get("version"), []).append(str(path.parent))
        return referenced

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
        """Delete the superseded versions the module docstring's rule allows; returns their names.

        ``now`` moves the age floor's clock (tests); leases expire by the real clock."""
        root = self.versions_dir(asset, partition_key)
        if not root.is_dir():
            return []
        keep = {
            self.current_version(asset, partition_key), *protected,
            *self.leases(asset, partition_key), *self.referenced_versions(asset, partition_key),
        }
        cutoff = (now if now is not None else time.time()) - self.keep_versions_hours * 3600
        removed = []
        for entry in sorted(root.iterdir()):
            if entry.name in keep or entry.name == LEASES_DIR or not entry.is_dir():
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


def write_references(directory: Path, references: Mapping[str, tuple[str, str]]) -> None:
    """Record, in a version being written, the versions it was made from: ``{asset: (partition,
    version)}``. While this version exists (or is being written), they are not collected."""
    rows = [{"asset": asset, "partition": partition, "version": version}
            for asset, (partition, version) in sorted(references.items())]
    (Path(directory) / REFERENCES_FILE).write_text(json.dumps(rows, indent=2))


def _lease_records(versions_dir: Path) -> Iterator[tuple[Path, dict]]:
    leases = versions_dir / LEASES_DIR
    if not leases.is_dir():
        return
    for path in sorted(leases.glob("*.json")):
        try:
            yield path, json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being renewed (replaced atomically) or already released


def _lease_is_live(record: Mapping) -> bool:
    if record.get("host") == socket.gethostname() and process_is_gone(int(record.get("pid", 0))):
        return False  # its step died: nothing reads the version any more
    return float(record.get("expires", 0)) > time.time()


class _ProcessLeases:
    """The leases this process holds, renewed by one daemon thread until released."""

    def __init__(self) -> None:
        self.holder: str | None = None  # the Dagster run, once a run's resources are set up
        self._held: dict[Path, dict] = {}
        self._lock = threading.Lock()
        self._renewer: threading.Thread | None = None
        self._wake = threading.Event()  # a new lease may need renewing sooner than the thread planned
        atexit.register(self.release_all)

    def take(self, versions_dir: Path, version: str, seconds: float) -> None:
        directory = versions_dir / LEASES_DIR
        directory.mkdir(exist_ok=True)
        path = directory / f"{version}@{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        record = {"version": version, "run_id": self.holder, "host": socket.gethostname(), "pid": os.getpid(),
                  "seconds": seconds}
        with self._lock:
            if any(r["version"] == version and p.parent == directory for p, r in self._held.items()):
                return  # this process already holds one
            self._held[path] = record
            _write_lease(path, record)
            self._wake.set()
            if self._renewer is None or not self._renewer.is_alive():
                self._renewer = threading.Thread(target=self._renew, name="artifact-leases", daemon=True)
                self._renewer.start()

    def release_all(self) -> None:
        with self._lock:
            for path in self._held:
                with contextlib.suppress(OSError):
                    path.unlink()
            self._held.clear()

    def _renew(self) -> None:
        while True:
            with self._lock:
                if not self._held:
                    self._renewer = None
                    return
                wait = min(record["seconds"] for record in self._held.values()) / 3
                for path, record in self._held.items():
                    with contextlib.suppress(OSError):
                        _write_lease(path, record)
            self._wake.wait(wait)
            self._wake.clear()


def _write_lease(path: Path, record: dict) -> None:
    staged = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    staged.write_text(json.dumps({**record, "expires": time.time() + record["seconds"]}))
    os.replace(staged, path)


_LEASES = _ProcessLeases()
