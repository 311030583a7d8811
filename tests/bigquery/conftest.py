"""A bqemulator process for the test session, and a fresh dataset per test."""

import uuid

import pytest
from dagster_gcp import BigQueryResource

from twotower_assets.warehouse.bigquery import BigQueryWarehouse

from .emulator import PROJECT, Emulator, start_emulator


@pytest.fixture(scope="session")
def bq_emulator(tmp_path_factory) -> Emulator:
    emulator = start_emulator(tmp_path_factory.mktemp("bqemulator"))
    yield emulator
    emulator.stop()


def emulator_warehouse(emulator: Emulator, dataset: str | None = None, **fields) -> BigQueryWarehouse:
    return BigQueryWarehouse(
        bigquery=BigQueryResource(project=PROJECT, location="EU"),
        dataset=dataset or f"test_{uuid.uuid4().hex[:10]}",
        endpoint=emulator.endpoint,
        **fields,
    )


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
