"""The retrieval endpoint under load: ``mlflow models serve`` on loopback against exact search.

What is measured, in one run, on one data set (1,000,000 users x 200,000 items by default):

* the cost of the size: generating the data, the Parquet inputs, ``ItemIndex.build``
  (default settings), ``log_retriever`` into a temporary sqlite MLflow store (MLflow loads
  the model once while logging, to check the input example), loading the model in-process,
  starting the server (seconds to ``/ping``, seconds until every worker has loaded, resident
  memory of the server's processes);
* the server, started as docs/serving.md says (``mlflow models serve -m
  models:/two_tower_retriever@champion --env-manager local -h 127.0.0.1 -p <free port>``),
  once with the default workers and once per ``--workers`` value given (default: also 2):
  correctness first (the server's answers for ``--recall-users`` users against exact search:
  recall@k, and identity with the in-process model's answers), then load: 1, 8 and 32
  concurrent clients (threads, one ``requests.Session`` each, keep-alive), each call one user
  request ``{"dataframe_records": [{"user_id": <random known user>, "k": 100}]}``, and,
  reported separately, calls of ``--batch`` (32) such requests. Every configuration is
  bounded: ``--requests`` single calls or ``--batched-calls`` batched calls, and at most
  ``--seconds`` seconds (the calls in flight at the deadline are finished and counted).
  Latency is per call, client side (send to last byte of the answer);
* the baseline, in this process, with one calling thread, on the same requests (the same
  users in the same order): exact search (numpy float32 matmul of the user vector, or of a
  block of ``--batch`` user vectors, against all items, the user's seen items set to -inf,
  ``argpartition`` top k, sorted, ids and scores as Python lists; BLAS pinned to one thread
  with threadpoolctl), and ``model.predict`` of the same retriever loaded in-process (a
  DataFrame of the records in, a DataFrame out: the search plus the model's request
  checks, without HTTP or JSON), and MLflow's scoring function ``invocations()`` called
  directly with the JSON body (everything the server does but HTTP), so the HTTP overhead,
  MLflow's per-request overhead and the search cost can be told apart;
* where the time goes: the steps of one single-request call (JSON in, signature check, the
  retriever's predict, ``ItemIndex.search``, JSON out), each timed alone; and the parts of
  the model load that can be called alone (the rest by difference).

Every row carries /proc/loadavg (1, 5, 15 minutes); the process CPU time of the server's process
group and of this (client) process over each configuration is printed per request, because
on a small machine the clients and the server share the cores. No timing is asserted.

The data: float32 unit vectors in ``--dim`` (64) dimensions from ``bench/serving.py``'s
generator (``make_data``: one mixture of ``--centres`` Gaussian clusters, seed ``--seed``;
the items are the very items of that bench, the users are its "queries"). Seen pairs:
``--seen-per-user`` (10) distinct items per user, for every user, drawn uniformly from the
items of the user's own cluster (the mixture centre nearest to the user), so that seen items
are items the user would otherwise be recommended (about half of them fall in a user's
unfiltered exact top 100) and excluding them changes the answer. Popularity counts: the
number of users who saw each item.

    python -m bench.serving_load                                  # 1M users x 200k items
    python -m bench.serving_load --users 20000 --items 20000 --centres 100 --seconds 5 --workers default
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import requests
from threadpoolctl import threadpool_limits

from bench._common import RssSampler, current_rss_mb, markdown_table, print_header
from bench.serving import make_data  # the clustered-vector generator

MLFLOW_CLI = Path(sys.executable).with_name("mlflow")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
JSON_HEADERS = {"Content-Type": "application/json"}


def loadavg() -> str:
    """/proc/loadavg's three averages, as printed beside every number."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {loadavg()}] {message}", file=sys.stderr, flush=True)


def timed(work: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    result = work()
    return time.perf_counter() - started, result


# ------------------------------------------------------------------------------ data


def nearest_centre(vectors: np.ndarray, centres: np.ndarray, block: int = 65_536) -> np.ndarray:
    out = np.empty(len(vectors), np.int32)
    for start in range(0, len(vectors), block):
        out[start : start + block] = np.argmax(vectors[start : start + block] @ centres.T, axis=1)
    return out


def mixture_centres(centres: int, dim: int, seed: int) -> np.ndarray:
    """The centres ``make_data`` drew: its generator's first draw (checked against the items)."""
    rng = np.random.default_rng(seed)
    centre_vectors = rng.standard_normal((centres, dim), dtype=np.float32)
    return centre_vectors / np.linalg.norm(centre_vectors, axis=1, keepdims=True)


def seen_in_own_cluster(
    rng: np.random.Generator, user_cluster: np.ndarray, item_cluster: np.ndarray, per_user: int
) -> np.ndarray:
    """(users, per_user) item positions: distinct items of each user's cluster (Floyd's sampling).

    A cluster with fewer items than per_user cannot occur at the default sizes (~200 items a
    cluster); it is refused rather than padded.
    """
    order = np.argsort(item_cluster, kind="stable")
    sizes = np.bincount(item_cluster, minlength=user_cluster.max() + 1)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    size = sizes[user_cluster]
    if (size < per_user).any():
        raise SystemExit(f"a cluster has fewer than {per_user} items; lower --seen-per-user")
    chosen = np.empty((len(user_cluster), per_user), np.int64)
    for j in range(per_user):  # Floyd: draw in [0, size - per_user + j]; on a repeat take the top
        top = size - per_user + j
        draw = (rng.random(len(size)) * (top + 1)).astype(np.int64)
        repeat = (chosen[:, :j] == draw[:, None]).any(axis=1)
        chosen[:, j] = np.where(repeat, top, draw)
    return order[starts[user_cluster][:, None] + chosen].astype(np.int32)


@dataclass
class Data:
    item_ids: np.ndarray
    items: np.ndarray
    user_ids: list[str]
    users: np.ndarray
    seen: np.ndarray  # (users, per_user) item positions
    paths: dict = field(default_factory=dict)


def write_inputs(args, workdir: Path, costs: list) -> Data:
    (seconds, (item_ids, items, users)) = timed(
        lambda: make_data(args.items, args.users, args.dim, args.centres, args.noise, args.seed)
    )
    costs.append(["generate vectors (make_data)", f"{seconds:.1f} s", f"{args.users:,} users + {args.items:,} items x {args.dim}", loadavg()])
    say(f"vectors: {seconds:.1f} s")

    def seen_pairs():
        centres = mixture_centres(args.centres, args.dim, args.seed)
        item_cluster = nearest_centre(items, centres)
        fit = float(np.mean(np.max(items[:2000] @ centres.T, axis=1)))
        if fit < 0.6:  # make_data no longer draws its centres first: the clusters would be noise
            raise SystemExit(f"items' mean cosine to the nearest centre is {fit:.2f}; update mixture_centres")
        user_cluster = nearest_centre(users, centres)
        return seen_in_own_cluster(np.random.default_rng(args.seed + 2), user_cluster, item_cluster, args.seen_per_user)

    seconds, seen = timed(seen_pairs)
    say(f"seen pairs: {seconds:.1f} s")
    user_ids = [f"user{i:07d}" for i in range(args.users)]

    def write() -> dict:
        users_path = workdir / "user_vectors.parquet"
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(users.ravel()), args.dim)
        pq.write_table(pa.table({"user_id": pa.array(user_ids, pa.string()), "embedding": embedding}), users_path)
        seen_path = workdir / "seen_pairs.parquet"
        per_user = seen.shape[1]
        pairs = pa.table({
            "user_id": pc.take(pa.array(user_ids, pa.string()), pa.array(np.repeat(np.arange(len(users)), per_user))),
            "item_id": pc.take(pa.array(item_ids, pa.string()), pa.array(seen.ravel())),
        })
        pq.write_table(pairs, seen_path)
        return {"user_embeddings_path": users_path, "seen_pairs_path": seen_path}

    seconds, paths = timed(write)
    sizes = ", ".join(f"{Path(p).name} {Path(p).stat().st_size / 2**20:,.0f} MiB" for p in paths.values())
    costs.append([
        "seen pairs + write Parquet", f"{seconds:.1f} s",
        f"{len(users) * seen.shape[1]:,} seen pairs ({seen.shape[1]} per user, all users); {sizes}", loadavg(),
    ])
    say(f"parquet: {seconds:.1f} s ({sizes})")
    return Data(item_ids, items, user_ids, users, seen, paths)


# ------------------------------------------------------------------------------ exact search


def exact_answers(data: Data, rows: np.ndarray, k: int) -> list[tuple[list[str], list[float]]]:
    """Top k unseen items of each user in ``rows`` by float32 matmul against every item."""
    scores = data.users[rows] @ data.items.T
    scores[np.arange(len(rows))[:, None], data.seen[rows]] = -np.inf
    n = scores.shape[1]
    top = np.argpartition(scores, n - k, axis=1)[:, n - k :]
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.argsort(-top_scores, axis=1)
    best = np.take_along_axis(top, order, axis=1)
    best_scores = np.take_along_axis(top_scores, order, axis=1)
    return [(data.item_ids[best[i]].tolist(), best_scores[i].tolist()) for i in range(len(rows))]


# ------------------------------------------------------------------------------ measuring


@dataclass
class Measured:
    calls: int
    requests: int
    wall_s: float
    latencies_s: np.ndarray
    errors: list[str]
    client_cpu_s: float
    server_cpu_s: float | None = None
    load: str = ""

    @property
    def rate(self) -> float:
        return self.requests / self.wall_s

    def p(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q)) * 1e3 if len(self.latencies_s) else float("nan")


def in_process(calls: Sequence, answer: Callable[[object], object], per_call: int, max_calls: int, seconds: float) -> Measured:
    """One calling thread: answer(call) for each call, until max_calls or seconds."""
    latencies = []
    started, cpu = time.perf_counter(), time.process_time()
    deadline = started + seconds
    for i in range(max_calls):
        t0 = time.perf_counter()
        if t0 > deadline:
            break
        answer(calls[i % len(calls)])
        latencies.append(time.perf_counter() - t0)
    wall = time.perf_counter() - started
    return Measured(len(latencies), len(latencies) * per_call, wall, np.array(latencies), [],
                    time.process_time() - cpu, load=loadavg())


def over_http(url: str, payloads: Sequence[bytes], per_call: int, clients: int, max_calls: int,
              seconds: float, server_pgid: int) -> Measured:
    """`clients` threads, one keep-alive session each, posting payloads until max_calls or seconds."""
    counter = itertools.count()
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    ready = threading.Barrier(clients + 1)
    deadline = [0.0]

    def client(j: int) -> None:
        session = requests.Session()
        mine = latencies[j]
        ready.wait()
        try:
            while True:
                i = next(counter)
                if i >= max_calls or time.perf_counter() > deadline[0]:
                    return
                t0 = time.perf_counter()
                response = session.post(url, data=payloads[i % len(payloads)], headers=JSON_HEADERS, timeout=300)
                body = response.content
                mine.append(time.perf_counter() - t0)
                # Cheap check that the answer has one row per request (no JSON decode in the loop).
                if response.status_code != 200 or body.count(b'"source"') != per_call:
                    errors.append(f"{response.status_code}: {body[:200]!r}")
        except Exception as error:  # noqa: BLE001  (reported in the table, not lost in a thread)
            errors.append(repr(error))
        finally:
            session.close()

    threads = [threading.Thread(target=client, args=(j,), daemon=True) for j in range(clients)]
    for thread in threads:
        thread.start()
    server_cpu = group_cpu_s(server_pgid)
    cpu = time.process_time()
    started = time.perf_counter()
    deadline[0] = started + seconds
    ready.wait()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    all_latencies = np.array([x for mine in latencies for x in mine])
    return Measured(len(all_latencies), len(all_latencies) * per_call, wall, all_latencies, errors,
                    time.process_time() - cpu, group_cpu_s(server_pgid) - server_cpu, loadavg())


# ------------------------------------------------------------------------------ the server


def group_stats(pgid: int) -> list[tuple[int, list[str]]]:
    """(pid, /proc/<pid>/stat fields after the command name) of every process in group pgid."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            rest = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(rest[2]) == pgid:
            found.append((int(entry), rest))
    return found


def group_cpu_s(pgid: int) -> float:
    return sum(int(rest[11]) + int(rest[12]) for _, rest in group_stats(pgid)) / CLOCK_TICKS


def group_rss_mb(pgid: int) -> tuple[float, float]:
    """(total, largest process) resident MiB of the group."""
    sizes = [current_rss_mb(pid) for pid, _ in group_stats(pgid)]
    return sum(sizes), max(sizes, default=0.0)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the server's own process group (as tests/test_model_serving.py)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            continue
    # Workers outliving the CLI (SIGTERM went to the group; this catches stragglers).
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log_path: Path
    to_ping_s: float = 0.0
    to_idle_s: float = 0.0


class ServerKilled(RuntimeError):
    """The server died of a signal from outside the bench (the machine is shared): worth a retry."""


def start_server(workers: str, tracking_uri: str, workdir: Path, timeout_s: float, max_rss_mb: float) -> Server:
    """``mlflow models serve`` on the champion alias; returns once /ping answers and the group is idle.

    "Idle" (the server's processes together below 5% of a core for 3 s) is when every worker
    has loaded the model: /ping answers as soon as the first one has.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(MLFLOW_CLI), "models", "serve", "-m", "models:/two_tower_retriever@champion",
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    if workers != "default":
        command += ["--workers", workers]
    server_tmp = workdir / f"server-tmp-{workers}"
    server_tmp.mkdir(exist_ok=True)
    log_path = workdir / f"server-{workers}.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "TMPDIR": str(server_tmp),
           "PATH": f"{MLFLOW_CLI.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    say("starting: " + " ".join(command[1:]))
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(process, url, log_path)
    try:
        pinged, quiet, last_cpu = None, 0, 0.0
        while True:
            elapsed = time.perf_counter() - started
            if process.poll() is not None:
                if process.returncode < 0:  # a signal this bench did not send
                    raise ServerKilled(f"the server was ended by signal {-process.returncode} while loading")
                raise RuntimeError(f"the server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            if elapsed > timeout_s:
                raise RuntimeError(f"the server was not up and idle in {timeout_s} s:\n{log_path.read_text()[-3000:]}")
            rss, _ = group_rss_mb(process.pid)
            if rss > max_rss_mb:
                raise RuntimeError(f"the server's processes hold {rss:,.0f} MiB, above --max-server-rss-mb")
            if pinged is None:
                try:
                    if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                        pinged = elapsed
                        say(f"/ping answered after {pinged:.1f} s")
                except requests.ConnectionError:
                    pass
            cpu = group_cpu_s(process.pid)
            quiet = quiet + 1 if cpu - last_cpu < 0.05 else 0
            last_cpu = cpu
            if pinged is not None and quiet >= 3:
                server.to_ping_s, server.to_idle_s = pinged, elapsed
                return server
            time.sleep(1.0)
    except BaseException:
        stop(process)
        raise


# ------------------------------------------------------------------------------ main


def payload(records: list[dict]) -> bytes:
    return json.dumps({"dataframe_records": records}).encode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--centres", type=int, default=1_000)
    parser.add_argument("--noise", type=float, default=0.75)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seen-per-user", type=int, default=10)
    parser.add_argument("-k", type=int, default=100)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--batch", type=int, default=32, help="requests per call in the batched variant")
    parser.add_argument("--requests", type=int, default=2_000, help="single-request calls per configuration, at most")
    parser.add_argument("--batched-calls", type=int, default=200, help="batched calls per configuration, at most")
    parser.add_argument("--seconds", type=float, default=20.0, help="per configuration, at most")
    parser.add_argument("--workers", nargs="+", default=["default", "2"],
                        help="'default' (no --workers flag) and/or worker counts, one server each")
    parser.add_argument("--recall-users", type=int, default=200)
    parser.add_argument("--start-timeout", type=float, default=1800.0, help="seconds for a server to load")
    parser.add_argument("--max-server-rss-mb", type=float, default=14_000.0,
                        help="stop the bench when a server's processes hold more (the machine is shared)")
    parser.add_argument("--dir", help="work here and keep it (default: a temporary directory, removed)")
    args = parser.parse_args()

    print_header("Retrieval endpoint (mlflow models serve) under load vs exact search in-process",
                 ".venv/bin/python -m bench.serving_load " + " ".join(sys.argv[1:]))
    print(f"/proc/loadavg at start: {loadavg()}\n", flush=True)
    run_in_workdir(args.dir, "serving-load-bench-", lambda workdir: run(args, workdir))
    return 0


def run_in_workdir(directory: str | None, prefix: str, work: Callable[[Path], None]) -> None:
    """``work(workdir)`` in ``directory`` (kept) or a temporary directory (removed after), then
    the load average. Everything MLflow copies (artifact downloads for an in-process model, a
    server's own copy) lands under workdir and goes with it."""
    workdir = Path(directory or tempfile.mkdtemp(prefix=prefix)).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "tmp").mkdir(exist_ok=True)
    os.environ["TMPDIR"] = str(workdir / "tmp")
    tempfile.tempdir = str(workdir / "tmp")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # also the servers'
    try:
        work(workdir)
    finally:
        if not directory:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n/proc/loadavg at end: {loadavg()}")


def run(args: argparse.Namespace, workdir: Path) -> None:
    import mlflow
    from mlflow import MlflowClient

    from twotower_assets.serving.ann_index import ItemIndex
    from twotower_assets.serving.registry import CHAMPION
    from twotower_assets.serving.retriever import REGISTERED_MODEL_NAME, log_retriever, set_alias

    costs: list[list[str]] = []
    data = write_inputs(args, workdir, costs)

    index_uri = str(workdir / "item_index")
    seconds, _ = timed(lambda: ItemIndex.build(index_uri, data.item_ids, data.items))
    info = ItemIndex.open(index_uri).info()
    costs.append(["ItemIndex.build (defaults)", f"{seconds:.1f} s",
                  f"{info['index_type']}, {info['num_partitions']} partitions, {info['num_sub_vectors']} sub-vectors, "
                  f"nprobes {info['nprobes']}, refine {info['refine_factor']}; {info['size_bytes'] / 2**20:,.0f} MiB", loadavg()])
    say(f"index: {seconds:.1f} s")

    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = client.create_experiment("serving_load", artifact_location=(workdir / "mlartifacts").as_uri())
    run_id = client.create_run(experiment_id, run_name="bench").info.run_id
    popular = np.bincount(data.seen.ravel(), minlength=len(data.item_ids))
    popular_items = {data.item_ids[i]: int(c) for i, c in enumerate(popular) if c}
    with RssSampler(0.2) as rss:
        seconds, (model_uri, version) = timed(lambda: log_retriever(
            tracking_uri, run_id, data.paths["user_embeddings_path"], index_uri,
            data.paths["seen_pairs_path"], popular_items))
    set_alias(client, REGISTERED_MODEL_NAME, CHAMPION, version)
    stored = sum(f.stat().st_size for f in (workdir / "mlartifacts").rglob("*") if f.is_file())
    costs.append(["log_retriever + alias", f"{seconds:.1f} s",
                  f"{model_uri}; artifacts {stored / 2**20:,.0f} MiB; this process peak {rss.peak_mb:,.0f} MiB "
                  "(MLflow loads the model once to check the input example)", loadavg()])
    say(f"logged {model_uri} in {seconds:.1f} s")

    mlflow.set_tracking_uri(tracking_uri)
    seconds, model = timed(lambda: mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL_NAME}@{CHAMPION}"))
    costs.append(["load the model in-process", f"{seconds:.1f} s",
                  f"this process now {current_rss_mb():,.0f} MiB resident (the data above + the model)", loadavg()])
    say(f"in-process load: {seconds:.1f} s")
    load_parts = load_breakdown(data, index_uri, seconds)

    # The requests: the same users, in the same order, for every configuration and baseline.
    batch = args.batch
    rng = np.random.default_rng(args.seed + 1)
    sequence = rng.integers(0, args.users, max(args.requests, args.batched_calls * batch))
    single_rows = [sequence[i : i + 1] for i in range(args.requests)]
    batched_rows = [sequence[i * batch : (i + 1) * batch] for i in range(args.batched_calls)]

    def records(rows) -> list[dict]:
        return [{"user_id": data.user_ids[r], "k": args.k} for r in rows]

    single_payloads = [payload(records(rows)) for rows in single_rows]
    batched_payloads = [payload(records(rows)) for rows in batched_rows]

    # Correctness reference: exact answers (seen removed) for the first recall users.
    import pandas as pd

    check_rows = sequence[: args.recall_users]
    exact_check = exact_answers(data, check_rows, args.k)
    unfiltered = data.users[check_rows] @ data.items.T
    n = unfiltered.shape[1]
    top_unfiltered = np.argpartition(unfiltered, n - args.k, axis=1)[:, n - args.k :]
    seen_in_top = float(np.mean([len(np.intersect1d(top_unfiltered[i], data.seen[r])) for i, r in enumerate(check_rows)]))
    inproc_check = model.predict(pd.DataFrame(records(check_rows)))
    inproc_recall = recall(inproc_check["item_ids"].tolist(), exact_check, args.k)

    # Baselines, one thread, BLAS on one thread for the exact search.
    say("baselines")
    baselines: dict[str, Measured] = {}
    with threadpool_limits(limits=1, user_api="blas"):
        exact_answers(data, batched_rows[0], args.k)
        baselines["exact, single"] = in_process(single_rows, lambda rows: exact_answers(data, rows, args.k), 1, args.requests, args.seconds)
        baselines["exact, batched"] = in_process(batched_rows, lambda rows: exact_answers(data, rows, args.k), batch, args.batched_calls, args.seconds)
    for rows in batched_rows[:3]:
        model.predict(pd.DataFrame(records(rows)))
    baselines["predict, single"] = in_process(single_rows, lambda rows: model.predict(pd.DataFrame(records(rows))), 1, args.requests, args.seconds)
    baselines["predict, batched"] = in_process(batched_rows, lambda rows: model.predict(pd.DataFrame(records(rows))), batch, args.batched_calls, args.seconds)
    # What the server does with a request body, minus HTTP: MLflow's scoring function
    # (JSON body -> DataFrame -> signature check -> predict -> JSON text), called directly.
    from mlflow.pyfunc.scoring_server import invocations

    input_schema = model.metadata.get_input_schema()

    def score(body: bytes) -> None:
        result = invocations(body, "application/json", model, input_schema)
        if result.status != 200:
            raise RuntimeError(result.response[:300])

    baselines["invocations, single"] = in_process(single_payloads, score, 1, args.requests, args.seconds)
    baselines["invocations, batched"] = in_process(batched_payloads, score, batch, args.batched_calls, args.seconds)
    call_parts = call_breakdown(model, single_payloads[: min(300, args.requests)], args.k)
    for name, m in baselines.items():
        say(f"  {name}: {m.rate:,.0f} req/s, p50 {m.p(50):.2f} ms")

    notes: list[str] = []
    servers: list[tuple[str, Server, float, float, float, float, dict[str, Measured]]] = []
    for workers in args.workers:
        try:
            server = start_server(workers, tracking_uri, workdir, args.start_timeout, args.max_server_rss_mb)
        except ServerKilled as killed:  # once; a second time is an error
            notes.append(f"workers {workers}: {killed}; started again")
            say(notes[-1])
            server = start_server(workers, tracking_uri, workdir, args.start_timeout, args.max_server_rss_mb)
        try:
            rss_total, rss_largest = group_rss_mb(server.process.pid)
            url = f"{server.url}/invocations"
            response = requests.post(url, data=payload(records(check_rows)), headers=JSON_HEADERS, timeout=600)
            response.raise_for_status()
            served = response.json()["predictions"]
            served_ids = [p["item_ids"] for p in served]
            served_recall = recall(served_ids, exact_check, args.k)
            same = float(np.mean([a == list(b) for a, b in zip(served_ids, inproc_check["item_ids"])]))
            for p in single_payloads[:20]:  # warm every worker's LanceDB cache a little
                requests.post(url, data=p, headers=JSON_HEADERS, timeout=60).raise_for_status()
            results: dict[str, Measured] = {}
            for form, payloads, per_call, max_calls in (("single", single_payloads, 1, args.requests),
                                                         ("batched", batched_payloads, batch, args.batched_calls)):
                for clients in args.clients:
                    m = over_http(url, payloads, per_call, clients, max_calls, args.seconds, server.process.pid)
                    results[f"{form}/{clients}"] = m
                    say(f"  workers {workers}, {form}, {clients} clients: {m.rate:,.0f} req/s, "
                        f"p50 {m.p(50):.1f} ms, p99 {m.p(99):.1f} ms, errors {len(m.errors)}")
            rss_after, _ = group_rss_mb(server.process.pid)
        finally:
            stop(server.process)
        costs.append([f"server start, workers {workers}", f"{server.to_ping_s:.1f} s to /ping, {server.to_idle_s:.1f} s to idle",
                      f"server processes {rss_total:,.0f} MiB resident (largest {rss_largest:,.0f}); "
                      f"{rss_after:,.0f} MiB after the load runs", loadavg()])
        servers.append((workers, server, served_recall, same, rss_total, rss_after, results))
        shutil.rmtree(workdir / f"server-tmp-{workers}", ignore_errors=True)

    # ---- report
    print(f"{args.users:,} users, {args.items:,} items, {args.dim} dims (make_data of bench/serving.py: "
          f"{args.centres:,} centres, noise {args.noise}, seed {args.seed}); {args.seen_per_user} seen items per user "
          f"(all users, from the user's own cluster; {seen_in_top:.1f} of them on average in a user's unfiltered "
          f"exact top {args.k}); k = {args.k}; batched calls carry {batch} requests.\n")
    print("Costs of the size:\n")
    print(markdown_table(["step", "time", "what", "/proc/loadavg after"], costs))

    print(f"\nCorrectness, {args.recall_users} users (one call), recall@{args.k} against exact search with seen items "
          f"removed: in-process model {inproc_recall:.4f}; " + "; ".join(
              f"server (workers {w}) {r:.4f}, identical to the in-process answers for {s:.1%}"
              for w, _, r, s, *_ in servers) + ".\n")

    headers = ["answered by", "calls carry", "clients", "calls", "req/s", "p50 ms / call", "p99 ms / call",
               "server CPU ms / req", "client CPU ms / req", "req/s / exact", "p50 / exact p50",
               "req/s / predict", "errors", "load (1/5/15)"]
    rows = []
    names = {"exact": "exact search", "predict": "model.predict", "invocations": "MLflow invocations()"}
    for name, m in baselines.items():
        form = name.split(", ")[1]
        rows.append([f"in-process {names[name.split(', ')[0]]}",
                     "1 request" if form == "single" else f"{batch} requests", 1, m.calls, f"{m.rate:,.0f}",
                     f"{m.p(50):.2f}", f"{m.p(99):.2f}", "-", f"{m.client_cpu_s / m.requests * 1e3:.2f}",
                     f"{m.rate / baselines[f'exact, {form}'].rate:.2f}x",
                     f"{m.p(50) / baselines[f'exact, {form}'].p(50):.2f}x",
                     f"{m.rate / baselines[f'predict, {form}'].rate:.2f}x", "-", m.load])
    for workers, _, _, _, _, _, results in servers:
        for key, m in results.items():
            form, clients = key.split("/")
            exact, predict = baselines[f"exact, {form}"], baselines[f"predict, {form}"]
            rows.append([f"server, workers {workers}", "1 request" if form == "single" else f"{batch} requests",
                         clients, m.calls, f"{m.rate:,.0f}", f"{m.p(50):.2f}", f"{m.p(99):.2f}",
                         f"{m.server_cpu_s / m.requests * 1e3:.2f}", f"{m.client_cpu_s / m.requests * 1e3:.2f}",
                         f"{m.rate / exact.rate:.2f}x", f"{m.p(50) / exact.p(50):.2f}x",
                         f"{m.rate / predict.rate:.2f}x", len(m.errors), m.load])
    print(markdown_table(headers, rows))
    for note in notes:
        print(f"\nNote: {note}.")
    print(f"\nWhere one single-request call's time goes in-process: each part timed alone over the first "
          f"{min(300, args.requests)} single requests, one thread (MLflow's scoring steps called directly):\n")
    print(markdown_table(["part", "median ms", "mean ms", "/proc/loadavg"], call_parts))
    print("\nWhere the model load's time goes: the steps of TwoTowerRetriever.load_context that are functions, "
          "timed alone on the same files; the rest of the load is by difference:\n")
    print(markdown_table(["part", "seconds", "/proc/loadavg"], load_parts))
    for workers, *_, results in servers:
        for key, m in results.items():
            if m.errors:
                print(f"\nworkers {workers}, {key}: {len(m.errors)} errors, first: {m.errors[0]}")


def call_breakdown(model, bodies: Sequence[bytes], k: int) -> list[list[str]]:
    """Median / mean ms of each step of a single-request call, each timed alone.

    The steps are those of MLflow's scoring function (``scoring_server.invocations``): the
    JSON body to a DataFrame (``_parse_json_data``), ``PyFuncModel.predict`` (the signature
    check, then the model's predict), the answer to JSON (``predictions_to_json``); and,
    inside, the retriever's own ``predict`` without MLflow's signature check and the
    ``ItemIndex.search`` call alone. Private MLflow functions: a bench may call them.
    """
    from io import StringIO

    from mlflow.pyfunc.scoring_server import _parse_json_data, predictions_to_json

    schema = model.metadata.get_input_schema()
    retriever = model.unwrap_python_model()
    times: dict[str, list[float]] = {}

    def clock(name: str, work: Callable[[], object]) -> object:
        started = time.perf_counter()
        result = work()
        times.setdefault(name, []).append(time.perf_counter() - started)
        return result

    for body in bodies:
        parsed = clock("JSON body -> DataFrame (_parse_json_data)", lambda: _parse_json_data(body, model.metadata, schema))
        answer = clock("PyFuncModel.predict (signature check + retriever)", lambda: model.predict(parsed.data, params=parsed.params))
        clock("answer -> JSON (predictions_to_json)", lambda: predictions_to_json(answer, StringIO()))
        clock("  TwoTowerRetriever.predict alone (no signature check)", lambda: retriever.predict(None, parsed.data))
        user_id = parsed.data["user_id"].iloc[0]
        vector = retriever.user_vectors[retriever.user_rows[user_id]][None, :]
        seen = [retriever.seen_items.get(user_id, frozenset())]
        clock("    ItemIndex.search alone (LanceDB candidates + exact re-rank)", lambda: retriever.index.search(vector, k, seen))
    load = loadavg()
    return [[name, f"{np.median(t) * 1e3:.2f}", f"{np.mean(t) * 1e3:.2f}", load] for name, t in times.items()]


def load_breakdown(data: Data, index_uri: str, load_s: float) -> list[list[str]]:
    """Seconds of the parts of TwoTowerRetriever.load_context that can be called alone."""
    from twotower_assets.serving.ann_index import ItemIndex
    from twotower_assets.serving.retriever import read_user_vectors

    rows = []
    parts = [
        ("read_user_vectors (Parquet -> ids + float32 matrix, id checks)", lambda: read_user_vectors(data.paths["user_embeddings_path"])),
        ("ItemIndex.open", lambda: ItemIndex.open(index_uri)),
        ("seen pairs: pq.read_table(...).to_pandas()", lambda: pq.read_table(data.paths["seen_pairs_path"], columns=["user_id", "item_id"]).to_pandas()),
    ]
    spent = 0.0
    for name, work in parts:
        seconds, result = timed(work)
        del result
        spent += seconds
        rows.append([name, f"{seconds:.1f}", loadavg()])
    rows.append(["the rest, by difference: grouping the seen pairs into a frozenset per user (groupby), "
                 "the popular list, MLflow's artifact download and model import",
                 f"{load_s - spent:.1f}", loadavg()])
    return rows


def recall(found: Sequence[Sequence[str]], exact: list[tuple[list[str], list[float]]], k: int) -> float:
    return float(np.mean([len(set(list(f)[:k]) & set(e[0])) / k for f, e in zip(found, exact)]))


if __name__ == "__main__":
    raise SystemExit(main())
