"""Local files of the graph (saved datasets, models) under ``$TWOTOWER_HOME/artifacts``.

Each asset partition owns one directory. Writers fill a sibling ``.partial`` directory and
rename it into place at the end, so a run that dies midway leaves the previous version, not
a half-written one.
"""


import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import dagster as dg


class ArtifactStore(dg.ConfigurableResource):
    """Directories for file-based assets, one per asset and partition."""

    base_dir: str

    def path(self, asset: str, partition_key: str) -> Path:
        return Path(self.base_dir) / asset / partition_key

    def require(self, asset: str, partition_key: str) -> Path:
        """The directory of an upstream asset partition, or a clear error if it is missing."""
        path = self.path(asset, partition_key)
        if not path.is_dir():
            raise FileNotFoundError(
                f"{asset} has no materialisation for partition {partition_key} "
                f"(expected {path}); materialise it first"
            )
        return path

    @contextlib.contextmanager
    def writing(self, asset: str, partition_key: str) -> Iterator[Path]:
        final = self.path(asset, partition_key)
        partial = final.with_name(final.name + ".partial")
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        try:
            yield partial
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        previous = final.with_name(final.name + ".previous")
        if final.exists():
            shutil.rmtree(previous, ignore_errors=True)
            final.rename(previous)
        partial.rename(final)
        shutil.rmtree(previous, ignore_errors=True)
