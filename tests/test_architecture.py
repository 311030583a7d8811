"""The layering docs/architecture.md promises, checked on the imports of the source files.

* model/ (TensorFlow code) imports nothing from Dagster, warehouse/, defs/ or lib/;
* warehouse/ imports nothing from defs/ or lib/ (storage does not know the pipeline);
* no module imports a module that defines assets or checks: asset modules share keys and
  file layouts through lib/layout.py, so the code an asset runs never goes through another
  asset's module.
"""

import ast
import subprocess
import sys

import pytest

from helpers.graph import REPO

PACKAGE = REPO / "twotower_assets"


def imports_of(path) -> set[str]:
    """Every module ``path`` imports (absolute names; relative imports are not used here)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def module_name(path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def sources(folder: str):
    return sorted((PACKAGE / folder).rglob("*.py"))


@pytest.mark.parametrize("path", sources("model"), ids=lambda p: p.name)
def test_model_code_is_plain_tensorflow(path):
    bad = {n for n in imports_of(path) if n.split(".")[0] == "dagster" or n.startswith(
        ("twotower_assets.warehouse", "twotower_assets.defs", "twotower_assets.lib"))}
    assert not bad, f"{module_name(path)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", sources("warehouse"), ids=lambda p: p.name)
def test_storage_does_not_know_the_pipeline(path):
    bad = {n for n in imports_of(path) if n.startswith(("twotower_assets.defs", "twotower_assets.lib"))}
    assert not bad, f"{module_name(path)} imports {sorted(bad)}"


def asset_modules() -> set[str]:
    """Modules under defs/ that define an asset or a check (found by loading them)."""
    script = (
        "import importlib, pathlib, sys, dagster as dg\n"
        "root = pathlib.Path(sys.argv[1])\n"
        "for path in sorted((root / 'twotower_assets' / 'defs').rglob('*.py')):\n"
        "    name = '.'.join(path.relative_to(root).with_suffix('').parts).removesuffix('.__init__')\n"
        "    module = importlib.import_module(name)\n"
        "    kinds = (dg.AssetsDefinition, dg.AssetSpec, dg.AssetChecksDefinition)\n"
        "    if any(isinstance(v, kinds) for v in vars(module).values()):\n"
        "        print(name)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(REPO)], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_no_module_imports_an_asset_module():
    assets = asset_modules()
    assert {"twotower_assets.defs.training.model", "twotower_assets.defs.evaluation.quality_gate"} <= assets
    crossings = {}
    for path in PACKAGE.rglob("*.py"):
        imported = {n for n in imports_of(path) if n in assets or n.rsplit(".", 1)[0] in assets}
        imported = {n if n in assets else n.rsplit(".", 1)[0] for n in imported} - {module_name(path)}
        if imported:
            crossings[module_name(path)] = sorted(imported)
    assert crossings == {}
