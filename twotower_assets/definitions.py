"""The code location: every definition under ``twotower_assets/defs``, loaded as a dg project.

Loaded by ``dagster dev`` (workspace.yaml / pyproject ``[tool.dagster]``), ``dg`` (pyproject
``[tool.dg]``), ``dagster definitions validate`` and
``dagster asset materialize -m twotower_assets.definitions``.
"""

from pathlib import Path

import dagster as dg

# One process runs a whole run: TensorFlow loads once, and DuckDB's single-writer file is
# never opened by two steps of the same run at once (docs/decisions.md).
defs = dg.Definitions.merge(
    dg.load_from_defs_folder(path_within_project=Path(__file__).parent),
    dg.Definitions(executor=dg.in_process_executor),
)

ALL_ASSETS = list(defs.assets or [])
"""The assets, for materialising the graph in process (tests, benches)."""

ALL_CHECKS = list(defs.asset_checks or [])
"""The asset checks: split data checks and the quality gate."""
