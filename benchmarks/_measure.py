"""Time and peak memory of one workload, each in a fresh Python process.

A workload is a function ``setup() -> run`` registered by name; the worker process
builds it, runs it once on a small warm-up if it offers one, then, five times,
(optionally prepares a fresh state, untimed,) resets the kernel's peak-RSS counter
and times ``run()``; it reports the best time and the largest peak resident memory
added above what was resident before a run (or that the workload measured itself).
A fresh process per workload keeps allocator caches and imported libraries of one
workload from flattering or penalizing another. The worker may run under another
interpreter than the caller's (``python=``), e.g. that of a virtual environment
holding the library compared against.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Timed:
    """What a workload's set-up returns (a ``(run, warm_up)`` tuple also does)."""

    run: Callable[[], None]
    #: run once before the timed runs (untimed), e.g. on a small input
    warm_up: Callable[[], None] | None = None
    #: describes the result of the last run, to check that compared
    #: implementations computed the same thing
    summary: Callable[[], str] | None = None
    #: untimed work before the warm-up and before each run, e.g. a fresh object, so
    #: that each run starts from the same state and caches filled by an earlier run
    #: (lazy decompositions, say) are not reused
    before_each: Callable[[], None] | None = None
    #: the peak resident memory (MB) the last run added, for a workload that takes
    #: it itself (by phases, resetting the kernel's counter in between); by default
    #: it is taken around the whole run
    peak_mb: Callable[[], float | None] | None = None


#: ``name -> setup``; ``setup()`` returns a :class:`Timed` or ``(run, warm_up)``
#: (``warm_up`` may be None)
Workload = Callable[[], "Timed | tuple"]


@dataclass
class Measurement:
    name: str
    seconds: float | None
    peak_mb: float | None
    error: str | None = None
    #: what the workload's ``summary()`` said, if it offers one
    note: str | None = None
    #: how many timed runs the best time and the peak are taken over
    runs: int | None = None


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


def measure_here(
    name: str, workload: Workload, repeats: int = 5, budget_s: float | None = None
) -> Measurement:
    """Run ``workload`` in this process; the best time of ``repeats`` runs (this
    shared 2-core machine is noisy) and the largest peak memory of any run. With a
    ``budget_s``, no further run starts once the runs so far (with their untimed
    ``before_each``) took that long (at least one runs), so slow workloads are timed
    fewer times."""
    timed = workload()
    if not isinstance(timed, Timed):
        timed = Timed(*timed)
    if timed.warm_up is not None:
        if timed.before_each is not None:
            timed.before_each()
        timed.warm_up()
    best, peak, runs = float("inf"), None, 0
    began = time.perf_counter()
    for _ in range(repeats):
        if budget_s is not None and runs and time.perf_counter() - began >= budget_s:
            break
        if timed.before_each is not None:
            timed.before_each()
        can_reset = _reset_peak_rss()
        before = _status_kb("VmRSS")
        start = time.perf_counter()
        timed.run()
        best, runs = min(best, time.perf_counter() - start), runs + 1
        added = None
        if timed.peak_mb is not None:
            added = timed.peak_mb()
        elif can_reset:
            added = (_status_kb("VmHWM") - before) / 1024
        if added is not None:
            peak = added if peak is None else max(peak, added)
    try:
        note = timed.summary() if timed.summary is not None else None
    except Exception as err:  # the timing stands; say why there is no summary
        note = f"no summary: {type(err).__name__}: {err}"
    return Measurement(name, best, peak, note=note, runs=runs)


def _option(flag: str, default: str | None) -> str | None:
    return sys.argv[sys.argv.index(flag) + 1] if flag in sys.argv else default


def worker_main(workloads: dict[str, Workload]) -> None:
    """Entry point of a worker: ``script --worker NAME [--repeats R] [--budget S]``
    prints one JSON line."""
    name = sys.argv[sys.argv.index("--worker") + 1]
    repeats = int(_option("--repeats", "5"))
    budget = _option("--budget", None)
    try:
        result = measure_here(
            name,
            workloads[name],
            repeats=repeats,
            budget_s=None if budget is None else float(budget),
        )
    except Exception as err:  # reported in the table, not raised
        result = Measurement(name, None, None, f"{type(err).__name__}: {err}")
    print("RESULT " + json.dumps(result.__dict__), flush=True)


def measure_in_subprocess(
    script: str,
    name: str,
    extra_args: list[str],
    timeout: float,
    python: str | None = None,
) -> Measurement:
    """Run ``script --worker name`` (under ``python``, by default this interpreter)
    and parse its measurement."""
    cmd = [python or sys.executable, script, "--worker", name, *extra_args]
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
    if proc.returncode < 0:  # killed by a signal; SIGKILL is the kernel's OOM killer
        why = "SIGKILL, out of memory?" if proc.returncode == -9 else "a signal"
        return Measurement(
            name, None, None, f"worker killed by {why} ({proc.returncode})"
        )
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return Measurement(name, None, None, f"worker failed: {tail[0]}")
