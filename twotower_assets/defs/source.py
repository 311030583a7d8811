"""The raw click events: a seeded synthetic data set with the production schema.

On BigQuery the click-event table can be an existing production table instead
(``TWOTOWER_BQ_CLICK_EVENTS_TABLE``, docs/bigquery.md): ``click_events`` is then an external
asset with the same key, so the graph downstream does not change. Without that variable the
synthetic events are loaded into BigQuery like into DuckDB (dev, CI, the emulator).
"""


import datetime as dt
from typing import Literal

import dagster as dg
from pydantic import Field

from twotower_assets import settings
from twotower_assets.data.synthetic import CLICK_EVENT_SCHEMA, SyntheticSpec, generate_click_events
from twotower_assets.defs import tables
from twotower_assets.defs.retries import WAREHOUSE_RETRY_POLICY, retry_transient_errors_only
from twotower_assets.warehouse.base import WarehouseResource


class SyntheticEventsConfig(dg.Config):
    """Size of the synthetic data set. The default materialises the graph in a few minutes
    on 2 CPU cores; ``configs/run/production-scale.yaml`` is the 10M-event size."""

    num_users: int = Field(default=2000, gt=0)
    num_items: int = Field(default=1000, gt=0)
    num_events: int = Field(default=100_000, gt=0)
    days: int = Field(default=120, gt=0, description="Days of events, ending at end_date.")
    end_date: str | None = Field(
        default=None, description="Last day with events (YYYY-MM-DD); default: today (UTC)."
    )
    seed: int = Field(default=7, ge=0)
    source: Literal["synthetic", "movielens"] = Field(
        default="synthetic",
        description="'movielens': load MovieLens 100K from movielens_path instead of generating "
        "events (docs/benchmarks-movielens.md); the size fields above are then unused.",
    )
    movielens_path: str | None = Field(
        default=None,
        description="Directory of GroupLens's u.data/u.user/u.item or RecBole's ml-100k.inter/.user/.item.",
    )
    movielens_recent_items: int = Field(
        default=10, ge=0, description="Length of the user_recent_items feature (earlier ratings, newest first)."
    )

    def last_event_date(self) -> dt.date:
        return dt.date.fromisoformat(self.end_date) if self.end_date else dt.datetime.now(dt.UTC).date()

    def spec(self) -> SyntheticSpec:
        return SyntheticSpec(
            end_date=self.last_event_date(),
            num_users=self.num_users,
            num_items=self.num_items,
            num_events=self.num_events,
            days=self.days,
            seed=self.seed,
        )


@dg.asset(
    key=tables.CLICK_EVENTS,
    group_name="source",
    kinds={"duckdb", "python"},
    description="Click events (synthetic, seeded) with the production schema.",
    code_version="1",
    retry_policy=WAREHOUSE_RETRY_POLICY,
)
@retry_transient_errors_only
def click_events(
    context: dg.AssetExecutionContext, config: SyntheticEventsConfig, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    if config.source == "movielens":
        return _movielens_click_events(context, config, warehouse)
    spec = config.spec()
    context.log.info(f"Generating {spec.num_events} events over {spec.days} days up to {spec.end_date}")
    rows = warehouse.write_table(
        warehouse.table_name(tables.CLICK_EVENTS),
        (batch for day in generate_click_events(spec) for batch in day.to_batches()),
        schema=CLICK_EVENT_SCHEMA,
    )
    first_day = spec.end_date - dt.timedelta(days=spec.days - 1)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": rows,
            "first_event_date": first_day.isoformat(),
            "last_event_date": spec.end_date.isoformat(),
            "num_users": spec.num_users,
            "num_items": spec.num_items,
            "seed": spec.seed,
            "dagster/column_schema": dg.TableSchema(
                columns=[dg.TableColumn(f.name, str(f.type)) for f in CLICK_EVENT_SCHEMA]
            ),
        }
    )


def _movielens_click_events(
    context: dg.AssetExecutionContext, config: SyntheticEventsConfig, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    """MovieLens ratings as click events, shifted so the last rating falls on end_date."""
    from twotower_assets.data.movielens import MOVIELENS_EVENT_SCHEMA, click_event_table, load_movielens

    if not config.movielens_path:
        raise ValueError("source is 'movielens' but movielens_path is not set (docs/benchmarks-movielens.md)")
    events = click_event_table(
        load_movielens(config.movielens_path), config.last_event_date(), config.movielens_recent_items
    )
    context.log.info(f"Loaded {events.num_rows} MovieLens ratings from {config.movielens_path}")
    rows = warehouse.write_table(
        warehouse.table_name(tables.CLICK_EVENTS), events.to_batches(), schema=MOVIELENS_EVENT_SCHEMA
    )
    dates = events["event_date"]
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": rows,
            "source": "movielens",
            "movielens_path": config.movielens_path,
            "first_event_date": dates[0].as_py().isoformat(),
            "last_event_date": dates[-1].as_py().isoformat(),
            "num_users": len(events["user_id"].unique()),
            "num_items": len(events["item_id"].unique()),
            "dagster/column_schema": dg.TableSchema(
                columns=[dg.TableColumn(f.name, str(f.type)) for f in MOVIELENS_EVENT_SCHEMA]
            ),
        }
    )


def external_click_events(table: str) -> dg.AssetSpec:
    """The production click events as an external input: read by the split SQL, never written."""
    return dg.AssetSpec(
        key=tables.CLICK_EVENTS,
        group_name="source",
        kinds={"bigquery"},
        description=f"Production click events in {table} (external; TWOTOWER_BQ_CLICK_EVENTS_TABLE).",
        metadata={"table": table},
    )


def click_events_asset() -> dg.AssetsDefinition | dg.AssetSpec:
    """The synthetic asset, or the external production table when one is configured."""
    table = settings.bigquery_click_events_table()
    return external_click_events(table) if table else click_events
