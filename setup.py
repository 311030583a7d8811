"""The package list; the rest of the build configuration is in pyproject.toml.

Every package under twotower_assets/ (namespace packages included, as packages.find with
namespaces would find them), plus twotower_assets.configs: the top-level configs/ directory
(feature configs and run configs; the docs and commands name configs/run/*.yaml), mapped by
pyproject.toml's package-dir. packages.find cannot add a package that lives outside the
tree it searches, so the list is built here.
"""

from setuptools import find_namespace_packages, setup

setup(packages=[*find_namespace_packages(include=["twotower_assets*"]), "twotower_assets.configs"])
