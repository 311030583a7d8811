#!/usr/bin/env bash
# Reproduces docs/asset-graph.png: the Dagster UI's asset graph after one tiny run.
#
#   docs/screenshot.sh [output.png]
#
# Materialises the whole graph for 2026-06-01 with configs/run/tiny.yaml (temporary
# TWOTOWER_HOME and DAGSTER_HOME, about a minute), starts `dagster dev` on a free loopback port
# and takes a headless Chromium screenshot of the global asset graph. Needs Debian's chromium
# (`apt-get install -y chromium`) and docs/screenshot_graph.py. Everything it starts is stopped
# and its temporary files are removed.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(realpath -m "${1:-$REPO/docs/asset-graph.png}")"
PY="${PYTHON:-$REPO/.venv/bin/python}"
BIN="$(dirname "$PY")"
CHROMIUM="${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}"
[ -x "$CHROMIUM" ] || { echo "chromium not found: apt-get install -y chromium" >&2; exit 1; }

WORK="$(mktemp -d)"
DEV_PID=""
cleanup() {
  if [ -n "$DEV_PID" ] && kill -0 "$DEV_PID" 2>/dev/null; then
    kill -TERM -- "-$DEV_PID" 2>/dev/null || true   # dagster dev's own process group
    for _ in $(seq 30); do kill -0 "$DEV_PID" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$DEV_PID" 2>/dev/null || true   # whatever is left of the group
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

export DAGSTER_HOME="$WORK/dagster_home" TWOTOWER_HOME="$WORK/home" DAGSTER_DISABLE_TELEMETRY=yes
mkdir -p "$DAGSTER_HOME"
# No telemetry (the shipped configs/dagster.yaml already turns off the community dialog).
{ cat "$REPO/configs/dagster.yaml"; printf 'telemetry:\n  enabled: false\n'; } > "$DAGSTER_HOME/dagster.yaml"
cd "$REPO"

echo "materialising the tiny graph (log: $WORK/materialize.log)"
"$BIN/dagster" asset materialize -m twotower_assets.definitions --select '*' \
  --partition 2026-06-01 -c configs/run/tiny.yaml > "$WORK/materialize.log" 2>&1

PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
echo "starting dagster dev on 127.0.0.1:$PORT"
# A background job of a script starts with SIGINT ignored, and `dagster dev` then ignores SIGTERM
# too (docs/operations.md, "Stopping dagster dev"): env restores both, so cleanup() stops it.
setsid env --default-signal=INT,TERM "$BIN/dagster" dev -w workspace.yaml -h 127.0.0.1 -p "$PORT" \
  > "$WORK/dev.log" 2>&1 &
DEV_PID=$!
disown "$DEV_PID"   # stopped by cleanup(), no job-status noise from bash

QUERY='{"query":"{ locationStatusesOrError { ... on WorkspaceLocationStatusEntries { entries { loadStatus } } } }"}'
for _ in $(seq 120); do
  if curl -sf -H 'Content-Type: application/json' -d "$QUERY" "http://127.0.0.1:$PORT/graphql" | grep -q '"LOADED"'; then
    break
  fi
  sleep 1
done
curl -sf -H 'Content-Type: application/json' -d "$QUERY" "http://127.0.0.1:$PORT/graphql" | grep -q '"LOADED"' \
  || { echo "dagster dev did not load the code location:" >&2; tail -40 "$WORK/dev.log" >&2; exit 1; }

echo "screenshot of the asset graph -> $OUT"
# Plain `chromium --headless --screenshot` cannot expand the graph's collapsed groups, so
# docs/screenshot_graph.py drives the same headless Chromium over the DevTools protocol.
CHROMIUM="$CHROMIUM" "$PY" "$REPO/docs/screenshot_graph.py" "http://127.0.0.1:$PORT/asset-groups" "$OUT"
echo "done"
