"""Top-k items per user and similar items per item, computed in the warehouse.

The same asset runs on both warehouses: each one turns a
:class:`~twotower_assets.warehouse.sql.NeighborSearch` into SQL. BigQuery uses VECTOR_SEARCH
(with a vector index on the item history table once it has ``index_min_rows`` rows) and
re-scores the candidates exactly; DuckDB, and a BigQuery emulator, which has no
VECTOR_SEARCH, score every (user, item) pair with array functions. Results never leave the
warehouse: both tables are filled by SELECTs, one partition per training date, replaced
together.
"""

from typing import Literal

import dagster as dg
from pydantic import Field

from twotower_assets.defs import tables
from twotower_assets.defs.automation import DOWNSTREAM_CONDITION
from twotower_assets.defs.partitions import training_date, training_date_partitions
from twotower_assets.warehouse.base import EmptyTableError, WarehouseResource
from twotower_assets.warehouse.sql import NeighborSearch

USER_TOP_ITEMS = "two_tower_user_top_items"
SIMILAR_ITEMS = "two_tower_similar_items"


class VectorSearchConfig(dg.Config):
    top_k: int = Field(default=50, ge=1, le=1000, description="Neighbours kept per user / per item.")
    metric: Literal["DOT_PRODUCT", "COSINE"] = Field(
        default="DOT_PRODUCT", description="The towers' vectors are L2-normalised, so both rank alike."
    )
    index_min_rows: int = Field(
        default=100_000,
        ge=1,
        description="Rows the item history table needs before a vector index is created (BigQuery "
        "does not build indexes on small tables; without one VECTOR_SEARCH is brute force).",
    )


def searches(warehouse: WarehouseResource, config: VectorSearchConfig) -> dict[str, NeighborSearch]:
    """The two searches, keyed by their (qualified) output table."""
    users = warehouse.table_name(tables.USER_EMBEDDING_HISTORY)
    items = warehouse.table_name(tables.ITEM_EMBEDDING_HISTORY)
    common = {"base_table": items, "base_key": "item_id", "base_vector": "item_embedding",
              "top_k": config.top_k, "metric": config.metric}
    return {
        warehouse.table_name(USER_TOP_ITEMS): NeighborSearch(
            query_table=users, query_key="user_id", query_vector="user_embedding",
            query_column="user_id", neighbor_column="item_id", **common,
        ),
        warehouse.table_name(SIMILAR_ITEMS): NeighborSearch(
            query_table=items, query_key="item_id", query_vector="item_embedding", exclude_same_key=True,
            query_column="item_id", neighbor_column="similar_item_id", **common,
        ),
    }


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            key=USER_TOP_ITEMS,
            deps=[tables.USER_EMBEDDING_HISTORY, tables.ITEM_EMBEDDING_HISTORY],
            group_name="publishing",
            kinds={"sql"},
            description="Top-k items per user by embedding similarity, one partition per training date.",
            automation_condition=DOWNSTREAM_CONDITION,
            code_version="1",
        ),
        dg.AssetSpec(
            key=SIMILAR_ITEMS,
            deps=[tables.ITEM_EMBEDDING_HISTORY],
            group_name="publishing",
            kinds={"sql"},
            description="Top-k similar items per item (itself excluded), one partition per training date.",
            automation_condition=DOWNSTREAM_CONDITION,
            code_version="1",
        ),
    ],
    partitions_def=training_date_partitions,
    can_subset=False,
)
def vector_search(context: dg.AssetExecutionContext, config: VectorSearchConfig, warehouse: WarehouseResource):
    train_date = training_date(context)
    items = warehouse.table_name(tables.ITEM_EMBEDDING_HISTORY)
    item_rows = warehouse.partition_row_counts(items, tables.PARTITION_COLUMN).get(train_date, 0)
    if item_rows == 0:
        # Checked before writing: an empty search must not replace a previous result.
        raise EmptyTableError(f"{items} has no item embeddings for {train_date}; materialise it first")
    indexed = warehouse.ensure_vector_index(items, "item_embedding", config.metric, config.index_min_rows)
    queries = searches(warehouse, config)
    counts = warehouse.replace_partition_from_queries(
        {table: warehouse.nearest_neighbors_query(search) for table, search in queries.items()},
        tables.PARTITION_COLUMN,
        train_date,
        {"train_date": train_date},
    )
    context.log.info(f"Vector search for {train_date}: {counts} (vector index: {indexed})")
    for key in (USER_TOP_ITEMS, SIMILAR_ITEMS):
        table = warehouse.table_name(key)
        yield dg.MaterializeResult(
            asset_key=key,
            metadata={
                "dagster/row_count": counts[table],
                "table": table,
                "top_k": config.top_k,
                "metric": config.metric,
                "vector_index": indexed,
            },
        )
