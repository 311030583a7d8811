"""Embedding extraction and export: tower outputs for every user and item, written out.

Production size: 1,000,000 users and 200,000 items (synthetic universe, default-features
config, an untrained model: the cost of a forward pass does not depend on the weights).

1. **Tower outputs**: ``tower_outputs`` over the saved one-row-per-user / per-item datasets,
   ``--batch-size`` rows per call: rows/second.
2. **Warehouse write**: the embedding history rows (``history_rows``, what the publishing
   assets write: FLOAT64 REPEATED, run ids, date) through ``WarehouseResource.replace_partition``
   into DuckDB: rows/second, and the same rows at ``--bq-rows`` into the BigQuery emulator
   (bqemulator, started by ``bench._bqemulator``; skipped when the ``test`` extra, which
   installs it, is not).
3. **Baseline**: a plain numpy + pyarrow write of the same arrays (ids + float32 vectors to a
   Parquet file). The ratio warehouse / plain says what the warehouse path costs.

    python -m bench.embeddings_export
    python -m bench.embeddings_export --users 100000 --items 20000 --bq-rows 5000
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench._common import RssSampler, load_average, markdown_table, print_header

import twotower_assets  # noqa: F401  (TF environment switches)

TRAIN_DATE = dt.date(2026, 6, 1)
SUMMARY = {"mlflow_run_id": "bench-run", "mlflow_experiment_name": "bench", "mlflow_run_name": "bench"}


def feature_tables(num_users: int, num_items: int) -> tuple[pa.Table, pa.Table]:
    """One row per user and per item with the default-features columns (synthetic universe)."""
    from twotower_assets.data.synthetic import SyntheticSpec, build_universe

    universe = build_universe(
        SyntheticSpec(end_date=TRAIN_DATE, num_users=num_users, num_items=num_items, num_events=1, days=1, seed=7)
    )
    users = pa.table(
        {
            "user_id": universe.user_columns["user_id"],
            "user_theoretical_remaining_credit": pa.array(universe.user_base["credit"], pa.float64()),
            "has_added_offer_to_favorites": pa.array(universe.user_base["has_added_offer_to_favorites"]),
            "consult_offer": pa.array(universe.user_base["consult_offer"]),
            "booking_cnt": pa.array(universe.user_base["booking_cnt"]),
        }
    )
    return users, pa.table(universe.item_columns)


def plain_write(ids: np.ndarray, vectors: np.ndarray, path: Path) -> None:
    table = pa.table({"id": pa.array(ids, pa.string()),
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1])})
    pq.write_table(table, path)


def emulator_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) for name in ("bqemulator", "duckdb_extension_spatial"))


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--embedding-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16_384)
    parser.add_argument("--bq-rows", type=int, default=20_000, help="rows written to the BigQuery emulator (0: skip)")
    args = parser.parse_args()

    import tensorflow as tf  # noqa: F401

    from twotower_assets.defs.publishing.embeddings import history_rows, history_schema
    from twotower_assets.model.datasets import FeatureStatsBuilder, feature_kinds, load_blocks, save_dataset
    from twotower_assets.model.features import load_feature_config
    from twotower_assets.model.recipes import load_recipe
    from twotower_assets.model.training import TrainingParams, build_model, tower_outputs
    from twotower_assets.warehouse.duckdb import DuckDBWarehouse

    print_header("Embedding extraction and export", "python -m bench.embeddings_export " + " ".join(sys.argv[1:]))
    work = Path(tempfile.mkdtemp(prefix="twotower-export-"))
    config = load_feature_config("default-features")
    users, items = feature_tables(args.users, args.items)
    kinds = feature_kinds(config)
    user_kinds = {c: kinds[c] for c in config.user_columns if c in kinds}
    item_kinds = {c: kinds[c] for c in config.item_columns if c in kinds}
    # Statistics from rows that pair every user with an item (each tower's columns side by side).
    pairs = pa.Table.from_arrays(
        [*users.columns, *items.take(pa.array(np.arange(args.users) % args.items)).columns],
        names=[*users.column_names, *items.column_names],
    )
    builder = FeatureStatsBuilder(config)
    for batch in pairs.to_batches(max_chunksize=65_536):
        builder.update(batch)
    params = TrainingParams(recipe=load_recipe("production", {"towers": {"embedding_size": args.embedding_size}}))
    model = build_model(config, builder.build(), params)
    save_dataset(users.to_batches(max_chunksize=65_536), user_kinds, work / "users")
    save_dataset(items.to_batches(max_chunksize=65_536), item_kinds, work / "items")
    print(f"{args.users:,} users, {args.items:,} items, embedding {args.embedding_size}, batches of {args.batch_size:,} rows.\n", flush=True)

    rows = []
    outputs = {}
    for entity, tower, key, count in (("user", model.user_tower, "user_id", args.users), ("item", model.item_tower, "item_id", args.items)):
        tower_outputs(tower, load_blocks(work / f"{entity}s").take(4), [key], batch_size=args.batch_size)  # trace once
        with RssSampler() as rss:
            started = time.perf_counter()
            ids, vectors = tower_outputs(tower, load_blocks(work / f"{entity}s"), [key], batch_size=args.batch_size)
            seconds = time.perf_counter() - started
        assert len(vectors) == count
        outputs[entity] = (ids[key], vectors)
        rows.append([f"{entity} tower outputs", f"{count:,}", f"{seconds:.1f}", f"{count / seconds:,.0f}", "", f"{rss.peak_mb:,.0f}", f"{load_average():.1f}"])
        print(f"  {entity} tower outputs: {count / seconds:,.0f} rows/s", file=sys.stderr, flush=True)

    warehouse = DuckDBWarehouse(path=str(work / "warehouse.duckdb"))

    def export(target, entity: str, ids: np.ndarray, vectors: np.ndarray, label: str) -> None:
        table = f"bench_{entity}_embedding_history"
        plain = timed(lambda: plain_write(ids, vectors, work / f"{entity}_{len(ids)}.parquet"))
        with RssSampler() as rss:
            seconds = timed(lambda: target.replace_partition(
                target.table_name(table), "train_date", TRAIN_DATE,
                history_rows(entity, TRAIN_DATE, SUMMARY, ids, vectors), schema=history_schema(entity),
            ))
        counted = target.partition_row_counts(table, "train_date")[TRAIN_DATE]
        assert counted == len(ids), (counted, len(ids))
        rows.append([f"{entity} embeddings -> {label}", f"{len(ids):,}", f"{seconds:.1f}", f"{len(ids) / seconds:,.0f}",
                     f"{plain / seconds:.2f}", f"{rss.peak_mb:,.0f}", f"{load_average():.1f}"])
        rows.append([f"{entity} embeddings -> Parquet (numpy + pyarrow, baseline)", f"{len(ids):,}", f"{plain:.1f}",
                     f"{len(ids) / plain:,.0f}", "1.00", "", ""])
        print(f"  {entity} -> {label}: {len(ids) / seconds:,.0f} rows/s (plain {len(ids) / plain:,.0f})", file=sys.stderr, flush=True)

    for entity, (ids, vectors) in outputs.items():
        export(warehouse, entity, ids, vectors, "DuckDB (replace_partition)")

    bq_note = ""
    if args.bq_rows and emulator_installed():
        from dagster_gcp import BigQueryResource

        from bench._bqemulator import PROJECT, start_emulator
        from twotower_assets.warehouse.bigquery import BigQueryWarehouse

        emulator = start_emulator(work / "bqemulator")
        try:
            bigquery = BigQueryWarehouse(bigquery=BigQueryResource(project=PROJECT, location="EU"),
                                         dataset="bench_export", endpoint=emulator.endpoint)
            for entity, (ids, vectors) in outputs.items():
                n = min(args.bq_rows, len(ids))
                export(bigquery, entity, ids[:n], vectors[:n], "BigQuery emulator (replace_partition)")
        finally:
            emulator.stop()
    else:
        bq_note = " BigQuery emulator skipped (--bq-rows 0, or bqemulator not installed: the `test` extra)."

    print(markdown_table(["step", "rows", "seconds", "rows/s", "x plain write", "peak RSS MB (step)", "load avg"], rows))
    print(f"\n'x plain write' = plain numpy+pyarrow Parquet seconds / warehouse seconds for the same rows (1.00 = as fast).{bq_note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
