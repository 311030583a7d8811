"""The raw click events, with the production schema, written to the warehouse in use.

Run config ``source`` picks where they come from: ``synthetic`` (default; a seeded generator,
``twotower_assets/data/synthetic.py``) or ``movielens`` (MovieLens 100K ratings as events).

On BigQuery the click-event table can be an existing production table instead
(``TWOTOWER_BQ_CLICK_EVENTS_TABLE``, docs/bigquery.md): ``click_events`` is then an external
asset with the same key, so the graph downstream does not change. Without that variable the
events are loaded into BigQuery like into DuckDB (dev, CI, the emulator).
"""


import datetime as dt
from typing import Literal

import dagster as dg
from pydantic import Field

from twotower_assets import settings
from twotower_assets.data.movielens import MovieLensOptions
from twotower_assets.data.synthetic import CLICK_EVENT_SCHEMA, SyntheticParams, SyntheticSpec, generate_click_events
from twotower_assets.lib import layout
from twotower_assets.lib.metadata import column_schema
from twotower_assets.lib.retries import WAREHOUSE_RETRY_POLICY, retry_transient_errors_only
from twotower_assets.warehouse.base import WarehouseResource


class ClickEventsConfig(SyntheticParams, MovieLensOptions, dg.Config):
    """Where the events come from and, for generated events, how many (the defaults live in
    :class:`~twotower_assets.data.synthetic.SyntheticParams` and
    :class:`~twotower_assets.data.movielens.MovieLensOptions`). The default materialises the
    graph in a few minutes on 2 CPU cores; ``configs/run/production-scale.yaml`` is 10M events."""

    source: Literal["synthetic", "movielens"] = Field(
        default="synthetic",
        description="'movielens': load MovieLens 100K from movielens_path instead of generating "
        "events (docs/benchmarks-movielens.md); the size fields are then unused.",
    )
    end_date: str | None = Field(
        default=None, description="Last day with events (YYYY-MM-DD); default: today (UTC)."
    )

    def last_event_date(self) -> dt.date:
        return dt.date.fromisoformat(self.end_date) if self.end_date else dt.datetime.now(dt.UTC).date()

    def spec(self) -> SyntheticSpec:
        return SyntheticSpec(end_date=self.last_event_date(), **self.model_dump(include=set(SyntheticParams.model_fields)))


@dg.asset(
    key=layout.CLICK_EVENTS,
    group_name="source",
    kinds={settings.warehouse_kind(), "python"},
    description="Click events with the production schema: generated (seeded synthetic data) or "
    "loaded from MovieLens 100K, by run config.",
    code_version="1",
    retry_policy=WAREHOUSE_RETRY_POLICY,
)
@retry_transient_errors_only
def click_events(
    context: dg.AssetExecutionContext, config: ClickEventsConfig, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    if config.source == "movielens":
        return _movielens_click_events(context, config, warehouse)
    spec = config.spec()
    context.log.info(f"Generating {spec.num_events} events over {spec.days} days up to {spec.end_date}")
    rows = warehouse.write_table(
        warehouse.table_name(layout.CLICK_EVENTS),
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
            "dagster/column_schema": column_schema(CLICK_EVENT_SCHEMA),
        }
    )


def _movielens_click_events(
    context: dg.AssetExecutionContext, config: ClickEventsConfig, warehouse: WarehouseResource
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
        warehouse.table_name(layout.CLICK_EVENTS), events.to_batches(), schema=MOVIELENS_EVENT_SCHEMA
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
            "dagster/column_schema": column_schema(MOVIELENS_EVENT_SCHEMA),
        }
    )


def external_click_events(table: str) -> dg.AssetSpec:
    """The production click events as an external input: read by the split SQL, never written."""
    return dg.AssetSpec(
        key=layout.CLICK_EVENTS,
        group_name="source",
        kinds={"bigquery"},
        description=f"Production click events in {table} (external; TWOTOWER_BQ_CLICK_EVENTS_TABLE).",
        metadata={"table": table},
    )


@dg.definitions
def source() -> dg.Definitions:
    """The generated events, or the external production table when one is configured.

    Chosen when the code location loads (not when this module is imported), so the
    environment of the process that loads the definitions decides.
    """
    table = settings.bigquery_click_events_table()
    return dg.Definitions(assets=[external_click_events(table) if table else click_events])
