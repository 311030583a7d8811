"""The items' category columns, read from the date's training table: what the evaluation's
embedding plots are coloured by and what the retrieval server filters on."""

from twotower_assets.lib import layout
from twotower_assets.warehouse.base import WarehouseResource
from twotower_assets.warehouse.queries import item_attributes_query

CATEGORY_COLUMNS = ("offer_category_id", "offer_subcategory_id")
"""Item columns read when the training table has them (MovieLens: the first genre is its
offer_category_id)."""


def item_categories(warehouse: WarehouseResource, params: dict) -> dict[str, dict[str, str | None]]:
    """Column -> {item_id: value} for each of :data:`CATEGORY_COLUMNS` the training table has
    (``params``: the query's ``train_date``)."""
    table = warehouse.table_name(layout.TRAINING_EVENTS)
    present = [c for c in CATEGORY_COLUMNS if c in warehouse.table_schema(table).names]
    if not present:
        return {}
    rows = warehouse.query(item_attributes_query(warehouse.dialect, table, present), params)
    ids = rows["item_id"].to_pylist()
    return {c: dict(zip(ids, rows[c].to_pylist())) for c in present}
