"""DuckDB's memory limit: bounded by default, set from the environment, never raw SQL."""

import pydantic
import pytest

from twotower_assets.defs.resources import default_warehouse
from twotower_assets.warehouse.duckdb import DuckDBWarehouse


def _limit(warehouse: DuckDBWarehouse) -> str:
    return warehouse.query("SELECT current_setting('memory_limit') AS m")["m"][0].as_py()


def test_every_connection_gets_the_limit(tmp_path):
    assert _limit(DuckDBWarehouse(path=str(tmp_path / "w.duckdb"))) == "1.8 GiB"  # 2GB, DuckDB's spelling
    assert _limit(DuckDBWarehouse(path=str(tmp_path / "w.duckdb"), memory_limit="512MB")) == "488.2 MiB"


def test_environment_sets_the_default_warehouse_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("TWOTOWER_HOME", str(tmp_path))
    monkeypatch.setenv("TWOTOWER_DUCKDB_MEMORY_LIMIT", "1GB")
    assert _limit(default_warehouse()) == "953.6 MiB"


@pytest.mark.parametrize("value", ["4GB'; DROP TABLE x; --", "lots", "4 gigabytes", ""])
def test_anything_but_a_size_is_refused(tmp_path, value):
    with pytest.raises(pydantic.ValidationError, match="memory_limit"):
        DuckDBWarehouse(path=str(tmp_path / "w.duckdb"), memory_limit=value)
