"""SHA-256 checksums of an artifact directory, written with it and verified before it is read.

Every file-based asset partition (datasets, model, MatchModel, evaluation, index, retriever)
gets a ``checksums.json`` listing each file's size and SHA-256, written by
:meth:`~twotower_assets.lib.artifacts.ArtifactStore.writing` just before the directory moves
into place. :meth:`~twotower_assets.lib.artifacts.ArtifactStore.require` verifies it before a
downstream step reads anything, so a truncated shard or SavedModel fails with the asset, the
partition, the file and the fix, instead of a ``DataLossError`` 80 lines deep in TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

CHECKSUMS_FILE = "checksums.json"
CHUNK_BYTES = 1 << 20


class ArtifactIntegrityError(RuntimeError):
    """An artifact file that differs from what its writer recorded."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != CHECKSUMS_FILE)


def write_checksums(root: Path) -> dict[str, dict]:
    """Record size and SHA-256 of every file under ``root`` in ``root/checksums.json``."""
    entries = {
        path.relative_to(root).as_posix(): {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
        for path in _files(root)
    }
    (root / CHECKSUMS_FILE).write_text(json.dumps({"algorithm": "sha256", "files": entries}, indent=1))
    return entries


def verify_checksums(root: Path, asset: str, partition: str) -> None:
    """Every file ``checksums.json`` lists is there with its recorded size and SHA-256.

    Raises :class:`ArtifactIntegrityError` (changed or truncated file, no checksums) or
    ``FileNotFoundError`` (a listed file is gone), naming the asset, partition and file and
    saying what to re-materialise. Files not listed are ignored (nothing writes them).
    """
    fix = f"re-materialise {asset} for {partition}"
    where = f"{asset} partition {partition} ({root})"
    listing = root / CHECKSUMS_FILE
    if not listing.is_file():
        raise ArtifactIntegrityError(f"{where} has no {CHECKSUMS_FILE}, so it cannot be verified; {fix}")
    try:
        entries = json.loads(listing.read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactIntegrityError(f"{where}: {CHECKSUMS_FILE} is unreadable ({exc}); {fix}") from None
    for name, expected in entries.items():
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"{where}: file {name} is missing (listed in {CHECKSUMS_FILE}); {fix}")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise ArtifactIntegrityError(
                f"{where}: file {name} has {size} bytes, {expected['bytes']} were written (truncated or "
                f"changed); {fix}"
            )
        if sha256_of(path) != expected["sha256"]:
            raise ArtifactIntegrityError(
                f"{where}: file {name} does not match its SHA-256 in {CHECKSUMS_FILE} (corrupted or changed); {fix}"
            )


def artifact_checksums(artifacts: dict[str, str]) -> dict[str, dict[str, dict]]:
    """Size and SHA-256 of every file of each local artifact (a file or a directory), by
    artifact name then path relative to it; what a logged model records at registration."""
    listed = {}
    for name, location in artifacts.items():
        path = Path(location)
        if path.is_file():
            listed[name] = {path.name: {"bytes": path.stat().st_size, "sha256": sha256_of(path)}}
        elif path.is_dir():
            listed[name] = {p.relative_to(path).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
                            for p in _files(path)}
    return listed


def verify_artifacts(artifacts: dict[str, str], listed: dict[str, dict[str, dict]], what: str) -> None:
    """Every file :func:`artifact_checksums` recorded is in ``artifacts`` (the loaded copies)
    with its size and SHA-256; raises :class:`ArtifactIntegrityError` naming ``what``, the
    artifact and the file."""
    for name, files in listed.items():
        path = Path(artifacts[name])
        for relative, expected in files.items():
            file = path if path.is_file() else path / relative
            if not file.is_file():
                raise ArtifactIntegrityError(f"{what}: artifact {name}, file {relative} is missing")
            if file.stat().st_size != expected["bytes"] or sha256_of(file) != expected["sha256"]:
                raise ArtifactIntegrityError(
                    f"{what}: artifact {name}, file {relative} does not match the SHA-256 recorded at registration "
                    "(corrupted or changed in the model store); refusing to load it"
                )
