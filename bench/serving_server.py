"""The retrieval server against ``mlflow models serve`` and a minimal FastAPI + numpy app, in one run.

On one generated data set (bench/serving_load.py's: clustered unit vectors, 10 seen items per
user from the user's own cluster), one retriever version is logged into a temporary sqlite
registry and given the alias ``champion``; then, each in its own process group on loopback:

* ``python -m twotower_assets.serving`` (the retrieval server; ``/invocations`` with
  MLflow's request shape and the lean ``/recommend``), plus, with ``--ann-too``, a second
  one forced onto the ANN index (``--exact-max-elements 0``);
* ``mlflow models serve -m models:/two_tower_retriever@champion --env-manager local``;
* ``bench/serving_baseline_app.py``, ~60 lines of FastAPI holding the same vectors in numpy,
  started with ``OPENBLAS_NUM_THREADS=1`` as the retrieval server pins its BLAS to one thread
  (with OpenBLAS's default threads both spent 8-16 CPU ms a request at 200,000 items on this
  busy machine instead of ~2); ``mlflow models serve`` runs as shipped.

Correctness first: each server's top ``k`` for ``--recall-users`` users against exact search
(recall@k; 1.000 means the same items). Then load: 1 and 8 client threads (keep-alive), each
call one user request of ``k`` items, the same users in the same order for every server,
``--requests`` calls or ``--seconds`` per row, in ``--rounds`` interleaved rounds (each row
shows its round with the least server CPU per request). Latency is per call, client side. Server CPU
is the process group's CPU time over the row, per request; "req/s per server core" divides
the rate by the server's CPU share. Last, a promotion under load: a second version is logged
and the alias moved while 8 clients call the retrieval server; every answer is counted.

Every row carries /proc/loadavg; the clients share the 2 cores with the servers, so compare
ratios and CPU per request more than absolute rates. No timing is asserted anywhere.

    python -m bench.serving_server                                   # quickstart size: 2,000 users x 1,000 items
    python -m bench.serving_server --users 200000 --items 200000 --centres 1000 --ann-too
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import requests

from bench._common import machine, markdown_table
from bench.serving_load import (
    Measured,
    exact_answers,
    free_port,
    loadavg,
    over_http,
    recall,
    run_in_workdir,
    say,
    start_server,
    stop,
    write_inputs,
)

PYTHON = sys.executable
POLL_INTERVAL_S = 5
"""The retrieval server's look at the registry (30 s by default): keeps the promotion row short."""


def start_process(name: str, command: list[str], env: dict, workdir: Path, ready_url: str, timeout_s: float = 300):
    """A server in its own process group; returns once ready_url answers 200."""
    log_path = workdir / f"{name}.log"
    say(f"starting {name}: {' '.join(command)}")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if requests.get(ready_url, timeout=2).status_code == 200:
                return process
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    stop(process)
    raise RuntimeError(f"{name} was not ready in {timeout_s} s:\n{log_path.read_text()[-3000:]}")


def top_k_of(url: str, route: str, user_ids: list[str], k: int) -> list[list[str]]:
    found = []
    for user in user_ids:
        if route == "/recommend":
            body = requests.post(url + route, json={"user_id": user, "k": k}, timeout=60).json()
            found.append(body["item_ids"])
        else:
            body = requests.post(url + route, json={"dataframe_records": [{"user_id": user, "k": k}]}, timeout=60).json()
            found.append(body["predictions"][0]["item_ids"])
    return found


def promotion_under_load(url: str, promote, clients: int, seconds: float, k: int, user_ids: list[str]) -> dict:
    """Clients post /recommend without pause while ``promote()`` moves the alias; the tally."""
    stop_event = threading.Event()
    tally = {"answers": 0, "failed": [], "versions": {}}
    lock = threading.Lock()

    def client(j: int) -> None:
        session = requests.Session()
        i = j
        while not stop_event.is_set():
            try:
                response = session.post(f"{url}/recommend", json={"user_id": user_ids[i % len(user_ids)], "k": k}, timeout=60)
                ok = response.status_code == 200
                version = response.json().get("model_version") if ok else None
            except requests.RequestException as error:
                ok, version = False, repr(error)
            with lock:
                if ok:
                    tally["answers"] += 1
                    tally["versions"][version] = tally["versions"].get(version, 0) + 1
                else:
                    tally["failed"].append(version or response.status_code)
            i += clients

    threads = [threading.Thread(target=client, args=(j,), daemon=True) for j in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(seconds / 3)
    started = time.monotonic()
    new_version = promote()
    while requests.get(f"{url}/health", timeout=10).json()["model_version"] != new_version:
        if time.monotonic() - started > 300:
            break
        time.sleep(0.05)
    tally["switch_s"] = time.monotonic() - started
    time.sleep(seconds / 3)
    stop_event.set()
    for thread in threads:
        thread.join(timeout=60)
    tally["new_version"] = new_version
    return tally


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--items", type=int, default=1_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--centres", type=int, default=20)
    parser.add_argument("--noise", type=float, default=0.75)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seen-per-user", type=int, default=10)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests", type=int, default=3_000, help="calls per row, at most")
    parser.add_argument("--seconds", type=float, default=6.0, help="per row, at most")
    parser.add_argument("--recall-users", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2, help="measurements per row, interleaved; the best is kept")
    parser.add_argument("--ann-too", action="store_true", help="also a retrieval server forced onto the ANN index")
    parser.add_argument("--skip-mlflow", action="store_true", help="leave out mlflow models serve")
    parser.add_argument("--dir", help="work here and keep it (default: a temporary directory, removed)")
    args = parser.parse_args()

    command = ".venv/bin/python -m bench.serving_server " + " ".join(sys.argv[1:])
    print("## Retrieval server vs mlflow models serve vs minimal FastAPI\n")
    print(f"Machine: {machine()}  \nCommand: `{command}`  \n/proc/loadavg at start: {loadavg()}\n", flush=True)
    run_in_workdir(args.dir, "serving-server-bench-", lambda workdir: run(args, workdir))
    return 0


def run(args: argparse.Namespace, workdir: Path) -> None:
    from mlflow import MlflowClient

    from twotower_assets.serving.ann_index import ItemIndex
    from twotower_assets.serving.registry import CHAMPION
    from twotower_assets.serving.retriever import REGISTERED_MODEL_NAME, log_retriever, set_alias

    data = write_inputs(args, workdir, [])
    index_uri = str(workdir / "item_index")
    index = ItemIndex.build(index_uri, data.item_ids, data.items)
    np.savez(workdir / "items.npz", item_ids=data.item_ids, vectors=data.items)
    # write_inputs put user_vectors.parquet and seen_pairs.parquet in workdir: the baseline reads them there.
    info = index.info()
    print(f"Data: {args.users:,} users x {args.items:,} items x {args.dim}, {args.seen_per_user} seen per user; "
          f"item index {info['index_type']} (nprobes {info['nprobes']}, refine {info['refine_factor']})\n")

    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = client.create_experiment("serving_server", artifact_location=(workdir / "mlartifacts").as_uri())
    run_id = client.create_run(experiment_id, run_name="bench").info.run_id
    counts = np.bincount(data.seen.ravel(), minlength=len(data.item_ids))
    popular = {data.item_ids[i]: int(c) for i, c in enumerate(counts) if c}

    def log_version() -> str:
        _, version = log_retriever(tracking_uri, run_id, data.paths["user_embeddings_path"], index_uri,
                                   data.paths["seen_pairs_path"], popular)
        return version

    set_alias(client, REGISTERED_MODEL_NAME, CHAMPION, log_version())
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}

    servers: dict[str, tuple[subprocess.Popen, str, list[str]]] = {}
    try:
        port = free_port()
        servers["retrieval server"] = (start_process(
            "retrieval-server", [PYTHON, "-m", "twotower_assets.serving", "--port", str(port), "--poll-interval", str(POLL_INTERVAL_S)],
            env, workdir,
            f"http://127.0.0.1:{port}/ready"), f"http://127.0.0.1:{port}", ["/invocations", "/recommend"])
        if args.ann_too:
            port = free_port()
            servers["retrieval server, ANN forced"] = (start_process(
                "retrieval-server-ann", [PYTHON, "-m", "twotower_assets.serving", "--port", str(port),
                                         "--exact-max-elements", "0"], env, workdir,
                f"http://127.0.0.1:{port}/ready"), f"http://127.0.0.1:{port}", ["/recommend"])
        if not args.skip_mlflow:
            mlflow_server = start_server("default", tracking_uri, workdir, 600, 14_000)
            servers["mlflow models serve"] = (mlflow_server.process, mlflow_server.url, ["/invocations"])
        port = free_port()
        servers["minimal FastAPI + numpy"] = (start_process(
            "baseline", [PYTHON, "-m", "bench.serving_baseline_app", "--port", str(port), "--data", str(workdir)],
            {**env, "OPENBLAS_NUM_THREADS": "1"}, workdir, f"http://127.0.0.1:{port}/ping"), f"http://127.0.0.1:{port}", ["/invocations"])

        rng = np.random.default_rng(args.seed + 1)
        sequence = rng.integers(0, args.users, args.requests)
        recall_rows = sequence[: args.recall_users]
        exact = exact_answers(data, recall_rows, args.k)
        recall_users = [data.user_ids[r] for r in recall_rows]
        bodies = {
            "/invocations": [json.dumps({"dataframe_records": [{"user_id": data.user_ids[r], "k": args.k}]}).encode()
                             for r in sequence],
            "/recommend": [json.dumps({"user_id": data.user_ids[r], "k": args.k}).encode() for r in sequence],
        }

        # Rounds interleave the servers, so a change in the machine's load (it is shared) falls
        # on all of them; each row keeps its round with the lowest server CPU per request.
        recalls = {(name, route): recall(top_k_of(url, route, recall_users, args.k), exact, args.k)
                   for name, (_, url, routes) in servers.items() for route in routes}
        results: dict[tuple, Measured] = {}
        for round_number in range(args.rounds):
            for clients in args.clients:
                for name, (process, url, routes) in servers.items():
                    for route in routes:
                        measured = over_http(url + route, bodies[route], 1, clients, args.requests,
                                             args.seconds, process.pid)
                        say(f"round {round_number + 1} {name} {route} {clients} clients: "
                            f"p50 {measured.p(50):.2f} ms, {measured.rate:,.0f} req/s, "
                            f"server {measured.server_cpu_s / measured.requests * 1e3:.3f} CPU ms/req")
                        best = results.get((name, route, clients))
                        if best is None or (measured.server_cpu_s / measured.requests
                                            < best.server_cpu_s / best.requests):
                            results[(name, route, clients)] = measured
        rows = []
        for (name, route, clients), measured in results.items():
            server_ms = measured.server_cpu_s / measured.requests * 1e3
            per_core = measured.requests / measured.server_cpu_s if measured.server_cpu_s else float("nan")
            rows.append([name, route, clients, f"{recalls[(name, route)]:.3f}", f"{measured.p(50):.2f}",
                         f"{measured.p(95):.2f}", f"{measured.p(99):.2f}", f"{measured.rate:,.0f}",
                         f"{server_ms:.3f}", f"{per_core:,.0f}", len(measured.errors), measured.load])
        print(markdown_table(
            ["server", "route", "clients", f"recall@{args.k}", "p50 ms", "p95 ms", "p99 ms", "req/s",
             "server CPU ms/req", "req/s per server core", "errors", "load (1/5/15)"], rows))

        print("\nRatios (retrieval server /invocations against each, same clients):\n")
        ratio_rows = []
        for other in ("mlflow models serve", "minimal FastAPI + numpy"):
            for clients in args.clients:
                ours = results.get(("retrieval server", "/invocations", clients))
                theirs = results.get((other, "/invocations", clients))
                if ours is None or theirs is None:
                    continue
                ratio_rows.append([other, clients, f"{ours.p(50) / theirs.p(50):.2f}x", f"{ours.rate / theirs.rate:.2f}x",
                                   f"{(ours.server_cpu_s / ours.requests) / (theirs.server_cpu_s / theirs.requests):.2f}x"])
        print(markdown_table(["against", "clients", "p50 ratio (lower is faster)", "req/s ratio",
                              "server CPU per request ratio"], ratio_rows))

        process, url, _ = servers["retrieval server"]
        say("promotion under load")
        tally = promotion_under_load(url, lambda: _promote(client, log_version), max(args.clients), args.seconds,
                                     args.k, [data.user_ids[r] for r in sequence])
        print(f"\nPromotion under load ({max(args.clients)} clients on /recommend, poll interval {POLL_INTERVAL_S} s): "
              f"{tally['answers']:,} answers, {len(tally['failed'])} failed, versions {tally['versions']}; "
              f"version {tally['new_version']} served {tally['switch_s']:.1f} s after the alias moved "
              f"(load {loadavg()})")
    finally:
        for process, _, _ in servers.values():
            stop(process)


def _promote(client, log_version) -> str:
    from twotower_assets.serving.registry import CHAMPION
    from twotower_assets.serving.retriever import REGISTERED_MODEL_NAME, set_alias

    version = log_version()
    set_alias(client, REGISTERED_MODEL_NAME, CHAMPION, version)
    return version


if __name__ == "__main__":
    sys.exit(main())
