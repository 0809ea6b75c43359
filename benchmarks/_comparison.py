"""What the benchmarks that compare results with laplace-torch share.

Those benchmarks (``lllaplace_benchmark.py``, ``functional_benchmark.py``) run each
measurement in a fresh, memory-limited worker (see ``_measure.py``) that hands its
results to the main process through a ``--dump`` file, so that the two libraries'
results can be compared; they can take laplace-torch's figures from an earlier run
(``--reuse-lt``) and write a report with the raw figures beside it. Here:

- the worker side: :func:`dump`, :func:`in_phase`, :func:`limit_memory` and the
  entry point :func:`worker`;
- the main side: :func:`start` (which libraries to run, what is reused),
  :func:`measure` (the loop over the workloads), :func:`library_lines`,
  :func:`command` and :func:`save`;
- the report: :func:`failure`, :func:`seconds`, :func:`memory_ratio`,
  :func:`fmt_memory_ratio`, :func:`verdict`, :func:`fastest`, :func:`error_lines`,
  :func:`decode`, :func:`max_abs_diff`, :func:`rel_diff` and :func:`max_rel_diff`.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shlex
import struct
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import Measurement, measure_in_subprocess, worker_main  # noqa: E402
from laplace_benchmark import (  # noqa: E402
    LT,
    OURS,
    ROOT,
    best_of,
    checkout,
    fmt_ratio,
    load_raw,
    mb,
    ok,
    run_probe,
    select_library,
)


# -- the worker ----------------------------------------------------------------------
def in_phase(phase: str, fn):
    """``fn``, its exceptions re-raised with the phase they happened in."""

    def wrapped():
        try:
            fn()
        except Exception as err:
            raise RuntimeError(f"{phase}: {type(err).__name__}: {err}") from err

    return wrapped


def dump(values: dict) -> None:
    """Hand ``values`` (tensors, as float32 arrays, or JSON values) to the main
    process, through the file ``--dump`` names, to compare the two libraries'
    results."""
    if "--dump" not in sys.argv:
        return
    out = {}
    for name, v in values.items():
        if not hasattr(v, "detach"):
            out[name] = v
        else:
            flat = v.detach().to("cpu").float().contiguous().flatten().tolist()
            out[name] = {
                "shape": list(v.shape),
                "f32": base64.b64encode(struct.pack(f"<{len(flat)}f", *flat)).decode(),
            }
    with open(sys.argv[sys.argv.index("--dump") + 1], "w") as f:
        json.dump(out, f)


def _vm_size_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmSize not in /proc/self/status")


def limit_memory(gb: float) -> None:
    """Let this process map at most ``gb`` GB more than it has mapped now."""
    import resource

    limit = _vm_size_bytes() + int(gb * 2**30)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def worker(workloads: Callable[[], dict]) -> None:
    """Entry point of a worker (``--worker NAME``, ``NAME`` ending in ``|SIDE``):
    the library of its side, ``--threads`` torch threads, at most
    ``--memory-limit-gb`` mapped beyond the imported libraries."""
    name = sys.argv[sys.argv.index("--worker") + 1]
    import torch

    torch.set_num_threads(int(sys.argv[sys.argv.index("--threads") + 1]))
    select_library(name.rsplit("|", 1)[1])
    import laplace.curvature  # noqa: F401  (mapped before the limit is taken)

    if "--memory-limit-gb" in sys.argv:
        limit_memory(float(sys.argv[sys.argv.index("--memory-limit-gb") + 1]))
    worker_main(workloads())


# -- the main process ----------------------------------------------------------------
def add_memory_limit(parser: argparse.ArgumentParser, default_gb: float) -> None:
    parser.add_argument(
        "--memory-limit-gb",
        type=float,
        default=default_gb,
        help="address space a worker may map beyond its imported libraries; an "
        "allocation beyond it is reported as out of memory",
    )


@dataclass
class Sides:
    """The libraries a run measures (``pythons``: side -> interpreter), their
    versions (``probes``; a string says why one cannot be imported), and the
    figures and dumped results it starts from (laplace-torch's, with
    ``--reuse-lt``)."""

    results: dict[str, Measurement]
    outputs: dict[str, dict]
    pythons: dict[str, str]
    probes: dict[str, dict | str]
    lt_note: str | None
    #: the commit at which laplace-torch's figures were measured
    lt_commit: str | None = None
    #: the commit of each measurement reused by ``--resume``
    commits: dict[str, str] = field(default_factory=dict)


def start(args, raw_path: str) -> Sides:
    """The sides to measure, from the options of ``common_arguments``."""
    results: dict[str, Measurement] = {}
    outputs: dict[str, dict] = {}
    pythons = {OURS: sys.executable}
    probes = {OURS: run_probe(sys.executable, OURS)}
    lt_note = lt_commit = None
    resume = getattr(args, "resume", False)
    earlier = load_raw(raw_path, args.quick) if args.reuse_lt or resume else None
    if earlier is not None and resume:
        # a failed measurement is measured again where --only selects it
        results = {
            k: Measurement(**v)
            for k, v in earlier["results"].items()
            if not v.get("error") or args.only not in k
        }
        outputs = {k: v for k, v in earlier.get("outputs", {}).items() if k in results}
        probes.update(earlier["probes"])
        lt_commit = earlier.get("lt_commit", earlier["commit"])
        commits = {
            k: earlier.get("commits", {}).get(k, earlier["commit"]) for k in results
        }
        by_commit: dict[str, list[str]] = {}
        for k, c in commits.items():
            by_commit.setdefault(c, []).append(f"`{k}`")
        lt_note = (
            "measurements reused from earlier runs (`--resume`): "
            + "; ".join(
                f"at commit {c}: {', '.join(ks)}" for c, ks in by_commit.items()
            )
            + "; the others measured at this commit."
        )
        if not args.ours_only:
            pythons[LT] = args.lt_python
    elif earlier is not None:
        results = {
            k: Measurement(**v)
            for k, v in earlier["results"].items()
            if k.endswith("|" + LT)
        }
        outputs = {
            k: v for k, v in earlier.get("outputs", {}).items() if k.endswith("|" + LT)
        }
        probes[LT] = earlier["probes"].get(LT, "unknown")
        lt_commit = earlier.get("lt_commit", earlier["commit"])
        lt_note = (
            f"laplace-torch figures reused from the run at commit "
            f"{lt_commit} (`--reuse-lt`); only those missing were measured."
        )
        pythons[LT] = args.lt_python
    elif args.ours_only:
        lt_note = "laplace-torch not run (`--ours-only`)."
    else:
        probes[LT] = run_probe(args.lt_python, LT)
        if isinstance(probes[LT], str):
            lt_note = f"laplace-torch not run: {probes.pop(LT)}."
        else:
            pythons[LT] = args.lt_python
    if isinstance(probes[OURS], str):
        print(f"our library cannot be imported: {probes[OURS]}", file=sys.stderr)
    reused = commits if earlier is not None and resume else {}
    return Sides(results, outputs, pythons, probes, lt_note, lt_commit, reused)


def worker_arguments(args, repeats: int, budget: float) -> list[str]:
    """The options every worker of a memory-limited comparison run gets."""
    return [
        *(["--quick"] if args.quick else []),
        *("--threads", str(args.threads)),
        *("--repeats", str(repeats)),
        *("--budget", str(budget)),
        *("--memory-limit-gb", str(args.memory_limit_gb)),
    ]


def measure(
    script: str,
    names: list[str],
    sides: Sides,
    extra: list[str],
    timeout: float,
    rounds: int,
) -> None:
    """Measure ``names`` (``rounds`` interleaved passes, each workload in a fresh
    worker of ``script``) into ``sides.results``, keeping the best of the rounds,
    and what the workers dumped into ``sides.outputs``: that of the best run, or,
    while no run succeeded, what the last failed one dumped before it failed."""
    results, outputs = sides.results, sides.outputs
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(1, rounds + 1):
            for i, name in enumerate(names, 1):
                side = name.rsplit("|", 1)[1]
                path = os.path.join(tmp, f"{i}.json")
                m = measure_in_subprocess(
                    script, name, [*extra, "--dump", path], timeout, sides.pythons[side]
                )
                old = results.get(name)
                better = ok(m) and (not ok(old) or m.seconds <= old.seconds)
                if better:
                    outputs.pop(name, None)
                if os.path.exists(path) and (better or not (ok(m) or ok(old))):
                    with open(path) as f:
                        outputs[name] = json.load(f)
                results[name] = best_of(results.get(name), m)
                if os.path.exists(path):
                    os.remove(path)
                shown = m.error or f"{m.seconds:.3g} s, {mb(m)} MB, {m.runs} runs"
                where = f"round {r}/{rounds}, {i}/{len(names)}"
                print(f"[{where}] {name}: {shown}", file=sys.stderr, flush=True)


def command(script: str) -> str:
    """How the script was run, relative to the repository."""
    return " ".join(
        ["python", os.path.relpath(script, ROOT), *map(shlex.quote, sys.argv[1:])]
    )


def library_lines(sides: Sides) -> list[str]:
    """The header's list of the libraries compared (and what was not run)."""
    lines = []
    for side, info in sides.probes.items():
        if isinstance(info, str):
            lines.append(f"- {side}: cannot be imported: {info}")
        else:
            lines.append(
                f"- {side}: {info['laplace']} (`{info['path']}`), torch "
                f"{info['torch']}, Python {info['python']}"
            )
    if sides.lt_note:
        lines.append(f"- {sides.lt_note}")
    return lines


def save(
    table: str,
    output: str,
    raw_path: str,
    quick: bool,
    sides: Sides,
    raw_outputs_of: tuple[str, ...] = (LT,),
) -> None:
    """Print the report, write it to ``output`` and the raw figures to ``raw_path``
    (with what the workers of the sides ``raw_outputs_of`` dumped; laplace-torch's
    are what ``--reuse-lt`` compares against)."""
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        f.write(table)
    with open(raw_path, "w") as f:
        raw = {
            "quick": quick,
            "commit": checkout(),
            # a later --reuse-lt run credits laplace-torch's figures to this commit
            "lt_commit": sides.lt_commit or checkout(),
            "probes": sides.probes,
            "results": {k: m.__dict__ for k, m in sides.results.items()},
            # the commit of each measurement (--resume keeps earlier ones)
            "commits": {k: sides.commits.get(k, checkout()) for k in sides.results},
            "outputs": {
                k: v
                for k, v in sides.outputs.items()
                if k.rsplit("|", 1)[1] in raw_outputs_of
            },
        }
        json.dump(raw, f, indent=1)


# -- the report ----------------------------------------------------------------------
def failure(m: Measurement | None) -> str | None:
    """Why a measurement has no figures, in a word or two (None if it has)."""
    if m is None or not m.error:
        return None
    e = m.error
    if "timed out" in e:
        return "timeout"
    memory = ("can't allocate memory", "MemoryError", "out of memory", "SIGKILL")
    if not any(s in e for s in memory):
        return "error"
    asked = re.search(r"tried to allocate (\d+) bytes", e)
    return (
        f"out of memory (asked {int(asked[1]) / 1e9:.3g} GB)"
        if asked
        else ("out of memory")
    )


def seconds(m: Measurement | None) -> str:
    if m is None:
        return "–"
    return failure(m) or f"{m.seconds:.3g}"


def memory_ratio(ours: Measurement | None, lt: Measurement | None) -> float | None:
    if not (ok(ours) and ok(lt)) or ours.peak_mb is None or lt.peak_mb is None:
        return None
    return lt.peak_mb / max(ours.peak_mb, 1.0)  # RSS resolves no less than ~1 MB


def fmt_memory_ratio(ours: Measurement | None, lt: Measurement | None) -> str:
    r = memory_ratio(ours, lt)
    if r is None:
        return "–"
    return ("> " if ours.peak_mb < 1 else "") + fmt_ratio(r)


def verdict(met: bool | None) -> str:
    return "not measured" if met is None else "**met**" if met else "**NOT met**"


def fastest(
    candidates: list[tuple[str, Measurement | None]],
) -> tuple[str, Measurement] | None:
    """The fastest ``(label, measurement)`` of those that have figures (None if
    none has)."""
    measured = [(label, m) for label, m in candidates if ok(m)]
    return min(measured, key=lambda t: t[1].seconds) if measured else None


def error_lines(measurements: list[Measurement | None]) -> list[str]:
    """The report's section of the measurements that failed, and why (no lines if
    none failed)."""
    errors = [f"- `{m.name}`: {m.error}" for m in measurements if m and m.error]
    return ["### Errors", "", *errors, ""] if errors else []


def decode(v) -> list[float]:
    raw = base64.b64decode(v["f32"])
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def max_abs_diff(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or a.get("shape") != b.get("shape"):
        return None
    return max((abs(x - y) for x, y in zip(decode(a), decode(b))), default=0.0)


def rel_diff(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def max_rel_diff(a: dict | None, b: dict | None) -> float | None:
    """The largest relative difference between two dumped tensors of one shape."""
    if not a or not b or a.get("shape") != b.get("shape"):
        return None
    return max((rel_diff(x, y) for x, y in zip(decode(a), decode(b))), default=0.0)
