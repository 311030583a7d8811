"""The raw click events, one partition per event day, written to the warehouse in use.

Run config ``source`` picks where they come from: ``synthetic`` (default; a seeded generator,
``twotower_assets/data/synthetic.py``, that fills any day deterministically) or ``movielens``
(MovieLens 100K ratings as events).

Which days a run writes (docs/operations.md, "Backfilling events vs backfilling trainings"):

* a run of ``click_events`` alone (an events backfill: one day, or a range in one run through
  ``BackfillPolicy.single_run()``) rewrites every day of its partitions;
* a run that also targets the training assets (``--select '*' --partition D``, "Materialize
  all" on D) writes only the days of D's event window ``[D - event_day_number, D]`` that have
  not been materialised yet, up to ``end_date``: a training run never rewrites an event day.

Writing a day replaces that day's rows and nothing else (one transaction per day), so runs of
different sizes only ever touch the days they write.

On BigQuery the click-event table can be an existing production table instead
(``TWOTOWER_BQ_CLICK_EVENTS_TABLE``, docs/bigquery.md): ``click_events`` is then an observable
source asset with the same key and partitions, whose observation records each event day's row
count as its data version, so the graph downstream does not change and new days show up as new
data. Without that variable the events are loaded into BigQuery like into DuckDB (dev, CI, the
emulator).
"""


import datetime as dt
import itertools
from collections.abc import Iterator
from typing import Literal

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

# Public dagster has no other way to turn an observable_source_asset into an AssetsDefinition.
from dagster._core.definitions.external_asset import create_external_asset_from_source_asset

from twotower_assets import settings
from twotower_assets.data.movielens import MovieLensOptions
from twotower_assets.data.synthetic import CLICK_EVENT_SCHEMA, SyntheticParams, SyntheticSpec, generate_days
from twotower_assets.lib import layout
from twotower_assets.lib.metadata import column_schema
from twotower_assets.lib.partitions import EVENT_WINDOW_DAYS, day_range, describe_days, event_day_partitions
from twotower_assets.lib.retries import WAREHOUSE_RETRY_POLICY, StepConfig, retry_transient_errors_only
from twotower_assets.warehouse.base import WarehouseResource
from twotower_assets.warehouse.event_days import event_day_counts_query
from twotower_assets.warehouse.sql import DATE_COLUMN


class ClickEventsConfig(SyntheticParams, MovieLensOptions, StepConfig):
    """Where the events come from and, for generated events, their daily volume
    (``num_events / days``; the defaults live in
    :class:`~twotower_assets.data.synthetic.SyntheticParams` and
    :class:`~twotower_assets.data.movielens.MovieLensOptions`). The default materialises the
    graph in a few minutes on 2 CPU cores; ``configs/run/production-scale.yaml`` is 10M events."""

    source: Literal["synthetic", "movielens"] = Field(
        default="synthetic",
        description="'movielens': load MovieLens 100K from movielens_path instead of generating "
        "events (docs/benchmarks-movielens.md); the size fields are then unused.",
    )
    end_date: str | None = Field(
        default=None,
        description="Last day with events (YYYY-MM-DD); default: today (UTC). A training run fills "
        "no day after it; an events backfill writes the days it is asked for.",
    )

    def last_event_date(self) -> dt.date:
        return dt.date.fromisoformat(self.end_date) if self.end_date else dt.datetime.now(dt.UTC).date()

    def spec(self) -> SyntheticSpec:
        return SyntheticSpec(end_date=self.last_event_date(), **self.model_dump(include=set(SyntheticParams.model_fields)))


def _window_of_this_run(context: dg.AssetExecutionContext) -> int:
    """Event days the run's split reads: its ``event_day_number`` when the run config sets one."""
    ops = (context.run.run_config or {}).get("ops") or {}
    split = (ops.get("split_tables") or {}).get("config") or {}
    return int(split.get("event_day_number") or EVENT_WINDOW_DAYS)


def _is_training_run(context: dg.AssetExecutionContext) -> bool:
    """Whether the run materialises more than ``click_events`` (a run without an asset
    selection, None or empty, runs its whole job)."""
    selection = context.run.asset_selection
    if not selection:
        selection = context.job_def.asset_layer.selected_asset_keys
    return any(key != context.asset_key for key in selection)


def _days_with_events(warehouse: WarehouseResource, days: list[dt.date]) -> set[dt.date]:
    table = warehouse.table_name(layout.CLICK_EVENTS)
    if not days or not warehouse.table_exists(table):
        return set()
    counts = warehouse.query(
        event_day_counts_query(warehouse.dialect, table), {"first_day": min(days), "last_day": max(days)}
    )
    return set(counts["event_date"].to_pylist())


def days_to_write(
    context: dg.AssetExecutionContext, config: ClickEventsConfig, warehouse: WarehouseResource
) -> tuple[list[dt.date], list[dt.date]]:
    """(days to write, days of the window kept as they are) for this run (module docstring).

    A training run keeps a day that has a materialisation or has rows in the warehouse (a
    warehouse reused with a fresh DAGSTER_HOME): it only fills days that have neither.
    """
    window = context.partition_time_window
    first, last = window.start.date(), window.end.date() - dt.timedelta(days=1)
    if not _is_training_run(context):
        # No day after end_date, as a training run: both ways of backfilling give the same data.
        return [d for d in day_range(first, last) if d <= config.last_event_date()], []
    # A training run for D: the window of D plus D itself (the partition this step records).
    wanted = [d for d in day_range(last - dt.timedelta(days=_window_of_this_run(context)), last)
              if d <= config.last_event_date()]
    recorded = context.instance.get_materialized_partitions(context.asset_key)
    present = _days_with_events(warehouse, wanted)
    kept = [d for d in wanted if d.isoformat() in recorded or d in present]
    return [d for d in wanted if d not in kept], kept


def _synthetic_days(config: ClickEventsConfig, days: list[dt.date]) -> Iterator[tuple[dt.date, pa.Table]]:
    return generate_days(config.spec(), days)


def movielens_path(config: ClickEventsConfig) -> str | None:
    """The run config's ``movielens_path``, else ``TWOTOWER_MOVIELENS_PATH``."""
    return config.movielens_path or settings.movielens_path()


def _movielens_days(config: ClickEventsConfig, days: list[dt.date]) -> Iterator[tuple[dt.date, pa.Table]]:
    """MovieLens ratings as click events, shifted so the last one falls on end_date, by day."""
    from twotower_assets.data.movielens import click_event_table, load_movielens

    events = click_event_table(
        load_movielens(movielens_path(config)), config.last_event_date(), config.movielens_recent_items
    )
    dates = events[DATE_COLUMN]
    for day in days:
        yield day, events.filter(pc.equal(dates, pa.scalar(day, pa.date32())))


@dg.asset(
    key=layout.CLICK_EVENTS,
    group_name="source",
    kinds={settings.warehouse_kind(), "python"},
    description="Click events with the production schema, one partition per event day: generated "
    "(seeded synthetic data) or loaded from MovieLens 100K, by run config.",
    partitions_def=event_day_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    code_version="2",
    retry_policy=WAREHOUSE_RETRY_POLICY,
)
@retry_transient_errors_only
def click_events(
    context: dg.AssetExecutionContext, config: ClickEventsConfig, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    days, kept = days_to_write(context, config, warehouse)
    days_of = _movielens_days if config.source == "movielens" else _synthetic_days
    if config.source == "movielens" and not movielens_path(config):
        raise ValueError(
            "source is 'movielens' but neither movielens_path nor TWOTOWER_MOVIELENS_PATH is set: point one "
            "of them at the unzipped ml-100k directory (README, MovieLens 100K)"
        )
    table = warehouse.table_name(layout.CLICK_EVENTS)
    schema = None
    rows: dict[dt.date, int] = {}
    context.log.info(
        f"Writing {len(days)} event days ({describe_days(days) or 'none'}) from {config.source}; "
        f"{len(kept)} already materialised and kept"
    )
    own_keys = set(context.partition_keys)
    generated = iter(days_of(config, days))
    first = next(generated, None)
    if first is not None:
        schema = first[1].schema
        # One stream of every day's rows: the warehouse writes them in one transaction.
        batches = (batch for _, events in itertools.chain([first], generated) for batch in events.to_batches())
        rows = warehouse.replace_partitions(table, DATE_COLUMN, days, batches, schema=schema)
    for day, count in rows.items():
        key = day.isoformat()
        if key not in own_keys and event_day_partitions.has_partition_key(key):
            # A day of the training window: recorded as that day's partition (the run's own
            # partitions are recorded by the result below).
            context.log_event(dg.AssetMaterialization(
                asset_key=context.asset_key, partition=key,
                metadata={"dagster/row_count": count, "source": config.source, "written_by_training_run": True},
            ))
    after_end = [d for d in (context.partition_time_window.start.date() + dt.timedelta(days=n)
                             for n in range((context.partition_time_window.end - context.partition_time_window.start).days))
                 if d > config.last_event_date()]
    if after_end:
        context.log.info(f"{describe_days(after_end)}: after end_date {config.last_event_date()}, no events written")
    metadata = {
        "dagster/row_count": sum(rows.values()),
        "source": config.source,
        "written_days": describe_days(list(rows)) or "none",
        "days_after_end_date": describe_days(after_end) or "none",
        "kept_days": describe_days(kept) or "none",
        "dagster/column_schema": column_schema(schema or CLICK_EVENT_SCHEMA),
    }
    if config.source == "movielens":
        metadata["movielens_path"] = movielens_path(config)
    else:
        metadata.update({"num_users": config.num_users, "num_items": config.num_items, "seed": config.seed,
                         "events_per_day": config.num_events / config.days})
    if rows:
        metadata.update({"first_event_date": min(rows).isoformat(), "last_event_date": max(rows).isoformat()})
    return dg.MaterializeResult(metadata=metadata)


def external_click_events(table: str) -> dg.AssetsDefinition:
    """The production click events as an observed input: read by the split SQL, never written.

    Observing it records each event day's row count as that partition's data version, so a
    new day (or a late-arriving correction) is new data for the training dates whose window
    holds it; the ``first_event_date`` / ``last_event_date`` metadata say what the table has.
    """

    @dg.observable_source_asset(
        key=layout.CLICK_EVENTS,
        group_name="source",
        description=f"Production click events in {table} (external, observed; TWOTOWER_BQ_CLICK_EVENTS_TABLE).",
        metadata={"table": table},
        partitions_def=event_day_partitions,
    )
    def click_events(context: dg.AssetExecutionContext, warehouse: WarehouseResource) -> dg.DataVersionsByPartition:
        keys = event_day_partitions.get_partition_keys()
        counts = warehouse.query(
            event_day_counts_query(warehouse.dialect, warehouse.table_name(layout.CLICK_EVENTS)),
            {"first_day": dt.date.fromisoformat(keys[0]), "last_day": dt.date.fromisoformat(keys[-1])},
        )
        days = counts["event_date"].to_pylist()
        context.log.info(f"{table}: events on {len(days)} days ({describe_days(days) or 'none'})")
        return dg.DataVersionsByPartition(
            {day.isoformat(): dg.DataVersion(str(n)) for day, n in zip(days, counts["n"].to_pylist())}
        )

    # As an AssetsDefinition (an observable external asset): Definitions.map_asset_specs, which
    # sets every asset's owners and tags, maps AssetsDefinitions and AssetSpecs only.
    return create_external_asset_from_source_asset(click_events)


@dg.definitions
def source() -> dg.Definitions:
    """The generated events, or the external production table when one is configured.

    Chosen when the code location loads (not when this module is imported), so the
    environment of the process that loads the definitions decides.
    """
    table = settings.bigquery_click_events_table()
    return dg.Definitions(assets=[external_click_events(table) if table else click_events])
