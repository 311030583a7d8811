"""The items' category columns, read from the date's training table: what the evaluation's
embedding plots are coloured by and what the retrieval server filters on."""

from twotower_assets.lib import layout
from twotower_assets.warehouse.base import WarehouseResource
from twotower_assets.warehouse.queries import item_attributes_query

CATEGORY_COLUMNS = ("offer_category_id", "offer_subcategory_id")
"""Item columns read when the training table has them (MovieLens: the first genre is its
offer_category_id)."""

CATEGORY_LABELS = {"offer_category_id": "category", "offer_subcategory_id": "subcategory"}
"""What a person reads for each of :data:`CATEGORY_COLUMNS` (plot titles, legends)."""

MOVIELENS_GENRES_COLUMN = "item_genres"
"""The column MovieLens's click events have and the production schema does not: there the
category column holds the movie's first genre."""


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


def category_labels(warehouse: WarehouseResource) -> dict[str, str]:
    """Column -> what to call it, for each of :data:`CATEGORY_COLUMNS` the training table has:
    ``genre`` for MovieLens's offer_category_id (its first genre), else :data:`CATEGORY_LABELS`."""
    names = warehouse.table_schema(warehouse.table_name(layout.TRAINING_EVENTS)).names
    movielens = MOVIELENS_GENRES_COLUMN in names
    return {c: "genre" if movielens and c == "offer_category_id" else CATEGORY_LABELS[c]
            for c in CATEGORY_COLUMNS if c in names}
