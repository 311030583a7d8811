#!/usr/bin/env bash
# Materialise one partition of the whole graph on the BigQuery warehouse, from the CLI,
# against a bqemulator process on free loopback ports, then read the tables back through
# the BigQuery client and check them (schema, DAY partitioning, expiration, the _latest tables).
#
#   .ci/bigquery.sh            (from the repository root; about a minute on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
DAGSTER=${DAGSTER:-.venv/bin/dagster}
PARTITION=2026-06-01
work=$(mktemp -d)
emulator_pid=""

cleanup() {
    if [[ -n "$emulator_pid" ]]; then
        kill "$emulator_pid" 2>/dev/null || true
        wait "$emulator_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

"$PYTHON" tests/bigquery/emulator.py --workdir "$work/emulator" --endpoint-file "$work/endpoint" &
emulator_pid=$!
for _ in $(seq 600); do
    [[ -s "$work/endpoint" ]] && break
    kill -0 "$emulator_pid" 2>/dev/null || { echo "bqemulator failed to start" >&2; exit 1; }
    sleep 0.2
done
[[ -s "$work/endpoint" ]] || { echo "bqemulator did not start in 120 s" >&2; exit 1; }

export TWOTOWER_WAREHOUSE=bigquery
export BIGQUERY_EMULATOR_HOST
BIGQUERY_EMULATOR_HOST=$(cat "$work/endpoint")
export TWOTOWER_BQ_PROJECT=twotower-ci
export TWOTOWER_ENV=dev
export TWOTOWER_BQ_DATASET=ml_preproc_ci
export TWOTOWER_HOME="$work/home"
export DAGSTER_HOME="$work/dagster"
mkdir -p "$TWOTOWER_HOME" "$DAGSTER_HOME"

"$DAGSTER" asset materialize -m twotower_assets.definitions --select '*' \
    --partition "$PARTITION" -c configs/run/tiny.yaml

"$PYTHON" - "$PARTITION" <<'PY'
"""Read the emulator's tables back through the BigQuery client and check them."""
import datetime as dt
import sys

from twotower_assets.defs.resources import default_warehouse
from twotower_assets.lib import layout as tables
from twotower_assets.lib.layout import SIMILAR_ITEMS

day = dt.date.fromisoformat(sys.argv[1])
warehouse = default_warehouse()
partitioned = [*tables.SPLIT_TABLES.values(), tables.USER_EMBEDDING_HISTORY, tables.ITEM_EMBEDDING_HISTORY,
               SIMILAR_ITEMS]
with warehouse.client() as client:
    for name in partitioned:
        table = client.get_table(warehouse.table_name(name))
        partitioning = table.time_partitioning
        assert partitioning.type_ == "DAY" and partitioning.field == "train_date", (name, partitioning)
        assert partitioning.expiration_ms == warehouse.partition_expiration_days * 86_400_000, name
        counts = warehouse.partition_row_counts(warehouse.table_name(name), "train_date")
        assert list(counts) == [day] and counts[day] > 0, (name, counts)
        print(f"{name}: {counts[day]} rows in partition {day}, DAY-partitioned, expiration "
              f"{partitioning.expiration_ms // 86_400_000} days")
    for entity, history, latest in (("user", tables.USER_EMBEDDING_HISTORY, tables.USER_EMBEDDING_LATEST),
                                    ("item", tables.ITEM_EMBEDDING_HISTORY, tables.ITEM_EMBEDDING_LATEST)):
        columns = [(f.name, f.field_type, f.mode) for f in client.get_table(warehouse.table_name(history)).schema]
        assert columns[-1] == (f"{entity}_embedding", "FLOAT64", "REPEATED"), columns
        assert client.get_table(warehouse.table_name(latest)).table_type == "TABLE", latest
    # The _latest tables are the champion's rows (the only date here).
    for latest in tables.LATEST_TABLES.values():
        dates = warehouse.query(f"SELECT DISTINCT train_date FROM `{warehouse.table_name(latest)}`")["train_date"].to_pylist()
        assert dates == [day], (latest, dates)
print("BigQuery (emulator) tables OK")
PY
