"""Plain helpers the tests import (``from helpers.graph import materialize_all``).

Fixtures live in tests/conftest.py (and tests/bigquery/conftest.py), where pytest finds them
without an import. tests/ is on ``sys.path`` because tests/conftest.py sits in a directory
without ``__init__.py`` (pytest's default "prepend" import mode), so ``helpers`` is importable
from every test module, tests/bigquery's included.
"""
