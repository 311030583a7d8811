"""Moving ``champion``: the registry alias of both published models and the ``_latest`` views.

Used by the ``champion`` asset after a date is published and by the ``rollback_champion`` job.
Consumers follow what it moves: the server (``models:/two_tower_retriever@champion``),
``models:/two_tower_match@champion``, and the ``_latest`` views of the embedding and
recommendation tables, which show the champion's training date rather than the newest one.
"""

import datetime as dt
from dataclasses import dataclass

from mlflow import MlflowClient

from twotower_assets.lib import layout
from twotower_assets.serving.registry import TRAIN_DATE_TAG, promote, version_of_date
from twotower_assets.warehouse.base import WarehouseResource


@dataclass(frozen=True)
class Champion:
    train_date: str
    match_model: str
    match_version: str
    retriever: str | None
    retriever_version: str | None


def move_champion(
    warehouse: WarehouseResource,
    client: MlflowClient,
    match_model: str,
    match_version: str,
    retriever: str,
) -> Champion:
    """Make ``match_model`` version ``match_version`` (and the retriever of its date) champion.

    Refuses a version the quality gate did not pass. The views move last: a failure before
    them leaves consumers on the previous champion's tables.
    """
    version = client.get_model_version(match_model, match_version)
    train_date = version.tags.get(TRAIN_DATE_TAG)
    if not train_date:
        raise ValueError(f"{match_model} version {match_version} has no {TRAIN_DATE_TAG} tag: not a version this graph registered")
    promote(client, match_model, match_version)
    served = version_of_date(client, retriever, train_date, mlflow_run_id=version.run_id)
    if served is not None:
        promote(client, retriever, served.version)
    point_latest_views(warehouse, dt.date.fromisoformat(train_date))
    return Champion(train_date, match_model, str(match_version), retriever if served else None,
                    served.version if served else None)


def point_latest_views(warehouse: WarehouseResource, train_date: dt.date) -> list[str]:
    """Point each ``_latest`` view at ``train_date``'s partition (tables that exist only)."""
    moved = []
    for table, view in layout.LATEST_VIEWS.items():
        name = warehouse.table_name(table)
        if warehouse.table_exists(name):
            warehouse.create_latest_view(warehouse.table_name(view), name, layout.PARTITION_COLUMN, train_date)
            moved.append(warehouse.table_name(view))
    return moved
