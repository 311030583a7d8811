"""ANN item index (LanceDB) against exact blocked brute force: recall@100 and queries/s.

The data look like trained embeddings rather than uniform noise: item and query vectors are
float32 unit vectors drawn from one mixture of ``--centres`` (1,000) Gaussian clusters in
``--dim`` (64) dimensions, seeded: a centre uniform on the sphere plus isotropic noise of
norm ~``--noise`` (0.75) times the centre's, then normalised. Two items of one cluster then
have a cosine of ~0.64, of two clusters ~0 +- 0.13; the 100 best items of a query score
~0.77 down to ~0.64, so recall@100 depends on ranking within the query's own cluster and
its neighbours, not only on finding the right cluster.

Measured in one run, on the same vectors:

* building the index (``ItemIndex.build``, defaults unless given): seconds, size on disk;
* recall@100 of ``ItemIndex.search`` against exact search (the top 100 by float32 matmul);
* queries/s of the index with 1 and with 2 calling threads, issuing single-query searches,
  and batched (each thread passes its share of the queries in one ``search`` call);
* queries/s of exact blocked brute force, the baseline: numpy float32 matmul of blocks of 64
  queries against the whole catalogue, ``argpartition`` top 100, then sorted; BLAS pinned to
  one thread (threadpoolctl) and 1 or 2 worker threads each taking whole blocks;

and prints the table with the ratio index / exact (target: recall@100 >= 0.95 and >= 10x
exact's queries/s). LanceDB runs its share of a search on its own thread pool, which no
calling-thread count limits; the CPU milliseconds per query (process CPU time over the
timed section) are printed beside every rate so that the rates can be compared per core.

    python -m bench.serving                      # 200,000 x 64, 2,000 queries, defaults
    python -m bench.serving --sweep              # the grid the defaults were chosen from
    python -m bench.serving --items 20000 --queries 500 --nprobes 30
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from bench._common import load_average, markdown_table, print_header

from twotower_assets.serving.ann_index import ItemIndex

EXACT_BLOCK = 64
"""Queries per matmul block of the exact baseline: the fastest of 8..1024 on this machine
(larger blocks spill the score matrix out of cache before argpartition reads it back)."""


def clustered_unit_vectors(
    rng: np.random.Generator, n: int, centres: np.ndarray, noise: float
) -> np.ndarray:
    """n float32 unit vectors from the mixture: a random centre plus noise, normalised."""
    dim = centres.shape[1]
    which = rng.integers(0, len(centres), n)
    vectors = centres[which] + noise / np.sqrt(dim) * rng.standard_normal((n, dim), dtype=np.float32)
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def make_data(items: int, queries: int, dim: int, centres: int, noise: float, seed: int):
    rng = np.random.default_rng(seed)
    centre_vectors = rng.standard_normal((centres, dim), dtype=np.float32)
    centre_vectors /= np.linalg.norm(centre_vectors, axis=1, keepdims=True)
    item_vectors = clustered_unit_vectors(rng, items, centre_vectors, noise)
    query_vectors = clustered_unit_vectors(rng, queries, centre_vectors, noise)
    item_ids = np.array([f"item{i:07d}" for i in range(items)])
    return item_ids, item_vectors, query_vectors


def exact_top_k(items: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Positions of each query's k best items, best first: blocked matmul + argpartition."""
    n = len(items)
    out = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), EXACT_BLOCK):
        scores = queries[start : start + EXACT_BLOCK] @ items.T
        top = np.argpartition(scores, n - k, axis=1)[:, n - k :]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        out[start : start + EXACT_BLOCK] = np.take_along_axis(top, order, axis=1)
    return out


def timed(work: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    started, cpu = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - started, time.process_time() - cpu


def in_threads(threads: int, work: Callable[[np.ndarray], object], queries: np.ndarray) -> Callable[[], None]:
    """A callable running work on `threads` threads, each on its contiguous share of queries."""
    shares = np.array_split(queries, threads)

    def run() -> None:
        if threads == 1:
            work(shares[0])
            return
        pool = [threading.Thread(target=work, args=(share,)) for share in shares]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()

    return run


def best_of(repeats: int, work: Callable[[], object]) -> tuple[float, float]:
    return min((timed(work) for _ in range(repeats)), key=lambda t: t[0])


def recall_at(found: list[tuple[list[str], list[float]]], exact: np.ndarray, item_ids: np.ndarray) -> float:
    k = exact.shape[1]
    hits = [len(set(ids[:k]) & set(item_ids[exact[i]].tolist())) for i, (ids, _) in enumerate(found)]
    return float(np.mean(hits)) / k


def run_main(args: argparse.Namespace) -> None:
    item_ids, items, queries = make_data(args.items, args.queries, args.dim, args.centres, args.noise, args.seed)
    print(
        f"{args.items:,} items x {args.dim} dims, {args.queries:,} queries, k = {args.k}; "
        f"mixture of {args.centres:,} Gaussian centres, noise {args.noise}, seed {args.seed}.\n",
        flush=True,
    )
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="item-index-bench-"))
    uri = str(workdir / "index")
    try:
        build_s, build_cpu = timed(
            lambda: ItemIndex.build(
                uri, item_ids, items, index_type=args.index_type, num_partitions=args.num_partitions,
                num_sub_vectors=args.num_sub_vectors, nprobes=args.nprobes, refine_factor=args.refine_factor,
            )
        )
        index = ItemIndex.open(uri)
        info = index.info()
        print(f"build: {build_s:.1f} s ({build_cpu:.1f} CPU s), {info}\n", flush=True)

        with threadpool_limits(limits=1, user_api="blas"):
            exact = exact_top_k(items, queries, args.k)
        recall = recall_at(index.search(queries, args.k), exact, item_ids)

        def exact_work(share: np.ndarray) -> None:
            exact_top_k(items, share, args.k)

        def single_work(share: np.ndarray) -> None:
            for i in range(len(share)):
                index.search(share[i : i + 1], args.k)

        def batch_work(share: np.ndarray) -> None:
            index.search(share, args.k)

        index.search(queries[:64], args.k)  # warm: index partitions into LanceDB's cache
        rows = []
        exact_rate = {}
        n = len(queries)
        with threadpool_limits(limits=1, user_api="blas"):
            for threads in (1, 2):
                wall, cpu = best_of(args.repeats, in_threads(threads, exact_work, queries))
                exact_rate[threads] = (n / wall, cpu / n * 1e3, load_average())
            for mode, work in (("single-query searches", single_work), ("batched (one search per thread)", batch_work)):
                for threads in (1, 2):
                    wall, cpu = best_of(args.repeats, in_threads(threads, work, queries))
                    rate, exact_qps = n / wall, exact_rate[threads][0]
                    rows.append([
                        mode, threads, f"{rate:,.0f}", f"{cpu / n * 1e3:.2f}",
                        f"{exact_qps:,.0f}", f"{exact_rate[threads][1]:.2f}",
                        f"{rate / exact_qps:.2f}x", f"{load_average():.2f}",
                    ])
                    print(f"  {mode}, {threads} thread(s): {rate:,.0f} q/s", file=sys.stderr, flush=True)

        print(
            f"Index: {info['index_type']}, {info['num_partitions']} partitions, "
            f"{info['num_sub_vectors']} sub-vectors, nprobes {info['nprobes']}, refine_factor "
            f"{info['refine_factor']}; build {build_s:.1f} s ({build_cpu:.1f} CPU s); "
            f"{info['size_bytes'] / 2**20:.1f} MiB on disk (raw vectors "
            f"{items.nbytes / 2**20:.1f} MiB); recall@{args.k} = {recall:.4f}.\n"
        )
        print(markdown_table(
            ["index mode", "calling threads", "index q/s", "index CPU ms/q", "exact q/s",
             "exact CPU ms/q", "index / exact", "load (1 min)"],
            rows,
        ))
        best = max(float(r[6][:-1]) for r in rows)
        print(
            f"\nTargets: recall@{args.k} >= 0.95: {'met' if recall >= 0.95 else 'NOT met'} "
            f"({recall:.4f}); >= 10x exact's queries/s: {'met' if best >= 10 else 'NOT met'} "
            f"(best {best:.2f}x).  Load average now: {' '.join(f'{x:.2f}' for x in os.getloadavg())}."
        )
    finally:
        if not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)


def run_sweep(args: argparse.Namespace) -> None:
    """Recall@k and queries/s over a grid of index settings: where the defaults came from."""
    item_ids, items, queries = make_data(args.items, args.queries, args.dim, args.centres, args.noise, args.seed)
    with threadpool_limits(limits=1, user_api="blas"):
        exact = exact_top_k(items, queries, args.k)
    single_sample = queries[: min(300, len(queries))]
    rows = []
    for partitions, sub_vectors in itertools.product(args.sweep_partitions, args.sweep_sub_vectors):
        workdir = Path(tempfile.mkdtemp(prefix="item-index-sweep-"))
        try:
            build_s, _ = timed(lambda: ItemIndex.build(
                str(workdir / "index"), item_ids, items, index_type=args.index_type,
                num_partitions=partitions, num_sub_vectors=sub_vectors,
            ))
            index = ItemIndex.open(str(workdir / "index"))
            size_mib = index.info()["size_bytes"] / 2**20
            codes = index.info()["num_sub_vectors"] or "-"
            for nprobes, refine in itertools.product(args.sweep_nprobes, args.sweep_refine):
                if nprobes > partitions:
                    continue
                index._settings.update(nprobes=nprobes, refine_factor=refine)  # bench-only override
                index.search(queries[:64], args.k)
                found: list = []
                wall, cpu = timed(lambda: found.extend(index.search(queries, args.k)))

                def singles() -> None:
                    for i in range(len(single_sample)):
                        index.search(single_sample[i : i + 1], args.k)

                single_wall, _ = timed(singles)
                rows.append([
                    partitions, codes, f"{build_s:.0f}", f"{size_mib:.1f}", nprobes, refine,
                    f"{recall_at(found, exact, item_ids):.4f}", f"{len(queries) / wall:,.0f}",
                    f"{cpu / len(queries) * 1e3:.2f}", f"{len(single_sample) / single_wall:,.0f}",
                    f"{load_average():.2f}",
                ])
                print("  " + " | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    print(markdown_table(
        ["partitions", "sub-vectors", "build s", "MiB", "nprobes", "refine", f"recall@{args.k}",
         "batched q/s", "batched CPU ms/q", "single q/s (1 thread)", "load"],
        rows,
    ))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=2_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--centres", type=int, default=1_000)
    parser.add_argument("--noise", type=float, default=0.75)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-k", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many timings per row")
    parser.add_argument("--index-type", default="IVF_PQ")
    parser.add_argument("--num-partitions", type=int)
    parser.add_argument("--num-sub-vectors", type=int)
    parser.add_argument("--nprobes", type=int)
    parser.add_argument("--refine-factor", type=int)
    parser.add_argument("--dir", help="build here and keep it (default: a temporary directory, removed)")
    parser.add_argument("--sweep", action="store_true", help="grid of settings instead of the main table")
    parser.add_argument("--sweep-partitions", type=int, nargs="+", default=[200, 400, 800])
    parser.add_argument("--sweep-sub-vectors", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--sweep-nprobes", type=int, nargs="+", default=[5, 10, 20, 40])
    parser.add_argument("--sweep-refine", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()

    title = "ANN item index (LanceDB) sweep" if args.sweep else "ANN item index (LanceDB) vs exact brute force"
    print_header(title, ".venv/bin/python -m bench.serving " + " ".join(sys.argv[1:]))
    (run_sweep if args.sweep else run_main)(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
