"""Time and peak memory of one workload, each in a fresh Python process.

A workload is a function ``setup() -> run`` registered by name; the worker process
builds it, runs it once on a small warm-up if it offers one, then, five times,
resets the kernel's peak-RSS counter and times ``run()``; it reports the best time
and the largest peak resident memory added above what was resident before a run.
A fresh process per workload keeps allocator caches and imported libraries of one
workload from flattering or penalizing another.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

#: ``name -> setup``; ``setup()`` returns ``(run, warm_up)`` (``warm_up`` may be None)
Workload = Callable[[], tuple[Callable[[], None], Callable[[], None] | None]]


@dataclass
class Measurement:
    name: str
    seconds: float | None
    peak_mb: float | None
    error: str | None = None


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def measure_here(name: str, workload: Workload, repeats: int = 5) -> Measurement:
    """Run ``workload`` in this process; the best time of ``repeats`` runs (this
    shared 2-core machine is noisy) and the largest peak memory of any run."""
    run, warm_up = workload()
    if warm_up is not None:
        warm_up()
    best, peak = float("inf"), None
    for _ in range(repeats):
        can_reset = _reset_peak_rss()
        before = _status_kb("VmRSS")
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
        if can_reset:
            added = (_status_kb("VmHWM") - before) / 1024
            peak = added if peak is None else max(peak, added)
    return Measurement(name, best, peak)


def worker_main(workloads: dict[str, Workload]) -> None:
    """Entry point of a worker: ``script --worker NAME`` prints one JSON line."""
    name = sys.argv[sys.argv.index("--worker") + 1]
    try:
        result = measure_here(name, workloads[name])
    except Exception as err:  # reported in the table, not raised
        result = Measurement(name, None, None, f"{type(err).__name__}: {err}")
    print("RESULT " + json.dumps(result.__dict__), flush=True)


def measure_in_subprocess(
    script: str, name: str, extra_args: list[str], timeout: float
) -> Measurement:
    """Run ``script --worker name`` and parse its measurement."""
    cmd = [sys.executable, script, "--worker", name, *extra_args]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired:
        return Measurement(name, None, None, f"timed out after {timeout:.0f} s")
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return Measurement(**json.loads(line[len("RESULT ") :]))
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return Measurement(name, None, None, f"worker failed: {tail[0]}")
