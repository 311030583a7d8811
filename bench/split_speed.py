"""The split (training / validation / test) against DuckDB's own sort/window over the same table.

The split SQL (:func:`twotower_assets.warehouse.sql.split_queries`, run as the ``split_tables``
asset runs it: ``replace_partition_from_queries`` on a DuckDB warehouse with the same memory
limit) is timed beside a yardstick measured in the same run on the same events table: one
``CREATE TABLE AS`` that numbers every user's events in time order and counts them (the
window every chronological per-user split needs) and writes every row once. The yardstick is
the least a split can cost in DuckDB: one sort by user and time, one write of every row.
Target: split / yardstick <= 3.

    python -m bench.split_speed                                  # 3M events, 300k users, 60k items
    python -m bench.split_speed --events 10000000 --users 1000000 --items 200000

Events come from the project's synthetic generator (all 27 columns, as ``click_events``
writes them) and are kept in ``--db`` for reruns (``--keep``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

from bench._common import load_average, machine
from twotower_assets.data.synthetic import SyntheticSpec, generate_click_events
from twotower_assets.warehouse.duckdb import DuckDBWarehouse
from twotower_assets.warehouse.sql import DUCKDB, EVENT_ORDER, split_queries

END_DATE = dt.date(2026, 5, 31)
TRAIN_DATE = END_DATE + dt.timedelta(days=1)

# DuckDB's own window over the same rows: what the split's per-user ranking costs at least.
YARDSTICK = f"""
CREATE OR REPLACE TABLE split_yardstick AS
SELECT *, ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY {EVENT_ORDER}) AS event_rank,
  COUNT(*) OVER (PARTITION BY user_id) AS user_event_count
FROM click_events WHERE event_date >= $start_date AND event_date < $train_date"""


def load_events(warehouse: DuckDBWarehouse, spec: SyntheticSpec) -> None:
    with warehouse.connect() as con:
        con.execute("DROP TABLE IF EXISTS click_events")
        for day in generate_click_events(spec):
            con.register("day", day)
            con.execute("CREATE TABLE IF NOT EXISTS click_events AS SELECT * FROM day LIMIT 0")
            con.execute("INSERT INTO click_events SELECT * FROM day")
            con.unregister("day")


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=3_000_000)
    parser.add_argument("--users", type=int, default=300_000)
    parser.add_argument("--items", type=int, default=60_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--db", default="/tmp/twotower-split-bench/warehouse.duckdb")
    parser.add_argument("--keep", action="store_true", help="reuse the events already in --db")
    parser.add_argument("--memory-limit", default="2GB", help="DuckDB memory_limit, as the graph runs it")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; the best is kept")
    args = parser.parse_args()

    Path(args.db).parent.mkdir(parents=True, exist_ok=True)
    warehouse = DuckDBWarehouse(path=args.db, memory_limit=args.memory_limit)
    spec = SyntheticSpec(num_users=args.users, num_items=args.items, num_events=args.events, days=args.days,
                         end_date=END_DATE)
    if not args.keep:
        print(f"generating {args.events:,} events into {args.db} ...", flush=True)
        load_events(warehouse, spec)
    params = {"start_date": TRAIN_DATE - dt.timedelta(days=args.days), "train_date": TRAIN_DATE}
    columns = warehouse.table_schema("click_events").names
    events = warehouse.query("SELECT COUNT(*) AS n FROM click_events")["n"][0].as_py()

    def yardstick():
        with warehouse.connect() as con:
            con.execute(YARDSTICK, params)

    def split():
        warehouse.replace_partition_from_queries(
            {f"split_{name}": sql for name, sql in split_queries(DUCKDB, "click_events", columns).items()},
            "train_date", TRAIN_DATE, {**params, "train_set_size": 0.95},
        )

    loads, yard, split_s = [load_average()], [], []
    for _ in range(args.repeat):
        yard.append(timed(yardstick))
        split_s.append(timed(split))
        loads.append(load_average())
    counts = {name: warehouse.query(f"SELECT COUNT(*) AS n FROM split_{name}")["n"][0].as_py()
              for name in ("training", "validation", "test")}
    best_yard, best_split = min(yard), min(split_s)
    print(f"\nMachine: {machine()}")
    print(f"Command: `python -m bench.split_speed {' '.join(sys.argv[1:])}`; DuckDB memory_limit {args.memory_limit}; "
          f"load average (1 min) {', '.join(f'{x:.1f}' for x in loads)}")
    print(f"{events:,} events ({len(columns)} columns); split rows {counts}\n")
    print("| step | best s | runs s | x yardstick |")
    print("|---|---|---|---|")
    print(f"| yardstick: one window (ROW_NUMBER + COUNT per user) over every row, written once "
          f"| {best_yard:.1f} | {', '.join(f'{s:.1f}' for s in yard)} | 1.00 |")
    print(f"| split_queries: training + validation + test, as split_tables writes them "
          f"| {best_split:.1f} | {', '.join(f'{s:.1f}' for s in split_s)} | {best_split / best_yard:.2f} |")


if __name__ == "__main__":
    main()
