"""The code location: every definition under ``twotower_assets/defs``, loaded as a dg project.

Loaded by ``dagster dev`` (workspace.yaml / pyproject ``[tool.dagster]``), ``dg`` (pyproject
``[tool.dg]``), ``dagster definitions validate`` and
``dagster asset materialize -m twotower_assets.definitions``.
"""

import warnings
from pathlib import Path

import dagster as dg

from twotower_assets import settings
from twotower_assets.lib import layout


TRAINING_DATE_HEALTH = (
    " Partitions are training dates on a daily calendar; only the dates trained (weekly by default) "
    "fill, so most dates show as missing (grey), not failed (red)."
)
"""Said on every training-date asset: the UI's partition health counts every date of the calendar."""


def with_owners_and_tags(spec: dg.AssetSpec) -> dg.AssetSpec:
    """Every asset's owners and tags, from the environment (``settings.asset_owners/asset_tags``),
    and on training-date assets how their partition health reads (:data:`TRAINING_DATE_HEALTH`)."""
    spec = spec.merge_attributes(owners=settings.asset_owners(), tags=settings.asset_tags())
    if spec.partitions_def is not None and spec.key != dg.AssetKey(layout.CLICK_EVENTS):
        spec = spec.replace_attributes(description=(spec.description or "").rstrip() + TRAINING_DATE_HEALTH)
    return spec


with warnings.catch_warnings():
    # map_asset_specs is a preview API in Dagster 1.13; it is the one place owners and tags are set.
    warnings.simplefilter("ignore", dg.PreviewWarning)
    # One process runs a whole run: TensorFlow loads once, and DuckDB's single-writer file is
    # never opened by two steps of the same run at once (docs/decisions.md).
    defs = dg.Definitions.merge(
        dg.load_from_defs_folder(path_within_project=Path(__file__).parent),
        dg.Definitions(executor=dg.in_process_executor),
    ).map_asset_specs(func=with_owners_and_tags)

# Dagster's own parser of an asset selection ("--select '*'", the UI's selection box) calls a
# beta parameter of AssetSelection.all and warns about it on every CLI run; nothing here uses it.
warnings.filterwarnings(
    "ignore", message="Parameter `include_sources` of function `AssetSelection.all`", category=dg.BetaWarning
)

ALL_ASSETS = list(defs.assets or [])
"""The assets, for materialising the graph in process (tests, benches)."""

ALL_CHECKS = list(defs.asset_checks or [])
"""The asset checks: split data checks and the quality gate."""
