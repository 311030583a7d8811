"""Shared helpers of the bench scripts: machine description, per-process peak memory, tables.

Every bench prints a Markdown table (pasted into docs/benchmarks-scale.md) headed by the
machine it ran on, because the numbers only mean something next to the hardware and the
load that produced them: this project's machines are shared, so the load average is
printed with every table.
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def machine() -> str:
    """One line: CPU model, cores, memory, load average, Python / TF-free library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{cpu}, {os.cpu_count()} cores, {memory_gb:.0f} GiB RAM, "
        f"load average {load} (1/5/15 min), Python {platform.python_version()}"
    )


def load_average() -> float:
    return os.getloadavg()[0]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb(pid: int | None = None) -> float:
    """Resident memory now, from /proc (0 when the process is gone)."""
    try:
        for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return 0.0
    return 0.0


class RssSampler:
    """Samples this process's resident memory in a thread: the peak of one code section.

    ``ru_maxrss`` only ever grows, so measuring a section of a long process needs sampling;
    used as ``with RssSampler() as s: ...; s.peak_mb``.
    """

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, current_rss_mb())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self.peak_mb = current_rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, current_rss_mb())


@dataclass
class ProcessResult:
    returncode: int
    wall_s: float
    peak_rss_mb: float
    cpu_s: float
    output: str


def run_measured(
    command: Sequence[str],
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
    kill_above_mb: float | None = None,
    timeout_s: float | None = None,
) -> ProcessResult:
    """Run a command to completion; wall time, its own peak RSS and CPU time (os.wait4).

    ``wait4`` reports the rusage of exactly this child (peak RSS included), unlike
    ``RUSAGE_CHILDREN``, which is the maximum over every child this process ever waited for.
    ``kill_above_mb``: a watchdog kills the child when its resident memory passes this (the
    machine is shared; a runaway step must not take the others down). It then exits -9.
    ``timeout_s``: the same watchdog kills it after this many seconds.
    """
    log = open(log_path, "w") if log_path else subprocess.PIPE  # noqa: SIM115
    started = time.perf_counter()
    process = subprocess.Popen(
        list(command), env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True
    )
    finished = threading.Event()

    def watchdog() -> None:
        while not finished.wait(0.5):
            too_big = kill_above_mb and current_rss_mb(process.pid) > kill_above_mb
            if too_big or (timeout_s and time.perf_counter() - started > timeout_s):
                process.kill()
                return

    if kill_above_mb or timeout_s:
        threading.Thread(target=watchdog, daemon=True).start()
    output = ""
    if log is subprocess.PIPE:
        output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    finished.set()
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if log_path:
        log.close()
        output = log_path.read_text(errors="replace")
    return ProcessResult(
        returncode=process.returncode,
        wall_s=wall,
        peak_rss_mb=usage.ru_maxrss / 1024,
        cpu_s=usage.ru_utime + usage.ru_stime,
        output=output,
    )


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def print_header(title: str, command: str) -> None:
    print(f"## {title}\n")
    print(f"Machine: {machine()}  ")
    print(f"Command: `{command}`\n")


def float32_matmul_rate(size: int = 2048, repeats: int = 3) -> dict[str, float]:
    """This machine's float32 matrix-product rate in GFLOP/s: numpy (BLAS) and TensorFlow.

    The best of a few square products; the rate a tuned kernel reaches on this CPU now
    (under whatever load the machine carries), the yardstick of bench/topk.py.
    """
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    out = np.empty((size, size), np.float32)
    flops = 2 * size**3
    best = {}
    np.matmul(a, b, out=out)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        np.matmul(a, b, out=out)
        times.append(time.perf_counter() - started)
    best["numpy"] = flops / min(times) / 1e9
    try:
        import twotower_assets  # noqa: F401  (TF environment switches)
        import tensorflow as tf

        ta, tb = tf.constant(a), tf.constant(b)
        tf.matmul(ta, tb).numpy()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            tf.matmul(ta, tb).numpy()
            times.append(time.perf_counter() - started)
        best["tensorflow"] = flops / min(times) / 1e9
    except ImportError:
        pass
    return best
