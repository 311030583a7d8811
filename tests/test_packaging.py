"""The wheel: an installed copy of the package, away from the source tree, has the configs.

The feature and run configs live in the top-level configs/ directory and are installed as
the package ``twotower_assets.configs``; this builds the wheel of a copy of the source tree,
installs it into a bare directory and reads the configs from a process that cannot see the
source tree. (The editable install is what every other test runs on: tests/test_features.py.)
"""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FEATURE_CONFIGS = [
    # The eight production feature configs.
    "default-features",
    "pretrained-feature-with-ts",
    "pretrained-features",
    "test-1-features",
    "test-2-features",
    "test-3-features",
    "test-4-features",
    "user-qpi-features",
    # This project's own.
    "default-features-history",
    "movielens-features",
    "movielens-one-vector-features",
    "tiny-features",
]

# Runs in the installed copy: what it found, as one JSON line.
INSTALLED_CONFIGS = textwrap.dedent(
    """
    import json
    from importlib import resources
    import twotower_assets
    from twotower_assets.model.features import available_configs, load_feature_config

    configs = resources.files("twotower_assets.configs")
    default = load_feature_config("default-features")
    print(json.dumps({
        "package": twotower_assets.__file__,
        "configs": str(configs),
        "feature_configs": available_configs(),
        "default": [default.name, default.user_id_feature, list(default.item_embedding_layers)],
        "run_configs": {e.name: e.read_text(encoding="utf-8") for e in configs.joinpath("run").iterdir()},
        "recipes": {e.name: e.read_text(encoding="utf-8") for e in configs.joinpath("models").iterdir()
                    if e.name.endswith(".yaml")},
    }))
    """
)


def _source_copy(destination: Path) -> Path:
    """What the build reads, copied, so the build writes nothing into the checkout."""
    destination.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO / name, destination / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("twotower_assets", "configs"):
        shutil.copytree(REPO / name, destination / name, ignore=ignore)
    return destination


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
    return completed


def test_installed_wheel_has_the_feature_and_run_configs(tmp_path):
    source = _source_copy(tmp_path / "source")
    # --no-build-isolation: the build uses this environment's setuptools, no download.
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(source)])
    (wheel,) = dist.glob("twotower_assets-*.whl")
    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel)])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # PYTHONPATH comes before the environment's editable install on sys.path, and the working
    # directory is neither the checkout nor the copy.
    environment = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    completed = _run([sys.executable, "-c", INSTALLED_CONFIGS], cwd=elsewhere, env=environment)
    found = json.loads(completed.stdout.strip().splitlines()[-1])

    assert Path(found["package"]).is_relative_to(site)
    assert Path(found["configs"]) == site / "twotower_assets" / "configs"
    assert found["feature_configs"] == sorted(FEATURE_CONFIGS)
    default_source = json.loads((REPO / "configs" / "default-features.json").read_text())
    assert found["default"] == ["default-features", "user_id", list(default_source["item_embedding_layers"])]
    shipped = {path.name: path.read_text(encoding="utf-8") for path in (REPO / "configs" / "run").glob("*.yaml")}
    assert set(shipped) == {"movielens.yaml", "production-scale.yaml", "quickstart.yaml", "quickstart-history.yaml", "tiny.yaml"}
    assert found["run_configs"] == shipped
    recipes = {path.name: path.read_text(encoding="utf-8") for path in (REPO / "configs" / "models").glob("*.yaml")}
    assert set(recipes) == {"production.yaml", "movielens.yaml", "movielens-one-vector.yaml"}
    assert found["recipes"] == recipes
