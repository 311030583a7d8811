"""A bqemulator process for the test session, and a fresh dataset per test."""

import pytest

from twotower_assets.warehouse.bigquery import BigQueryWarehouse

from .emulator import Emulator, emulator_warehouse, start_emulator


@pytest.fixture(scope="session")
def bq_emulator(tmp_path_factory) -> Emulator:
    emulator = start_emulator(tmp_path_factory.mktemp("bqemulator"))
    yield emulator
    emulator.stop()


@pytest.fixture
def bq_warehouse(bq_emulator, monkeypatch) -> BigQueryWarehouse:
    """A warehouse on the emulator with a dataset of its own (created on first write)."""
    monkeypatch.delenv("BIGQUERY_EMULATOR_HOST", raising=False)
    return emulator_warehouse(bq_emulator)


@pytest.fixture
def bq_client(bq_warehouse):
    """The real google-cloud-bigquery client the warehouse uses, for reading metadata back."""
    with bq_warehouse.client() as client:
        yield client
