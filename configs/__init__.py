"""The feature configs (*.json) and run configs (run/*.yaml), installed as the package
``twotower_assets.configs`` (pyproject.toml's package-dir) and read with importlib.resources,
so an installed wheel has them as well as a source checkout."""
