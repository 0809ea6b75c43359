"""The benchmark report: one Markdown file from the outputs of every benchmark.

``run_all.py`` runs the benchmarks; each writes a Markdown report and, for those
against laplace-torch, the raw figures beside it (``NAME.json``). This module reads
them back and writes ``benchmarks/REPORT.md``, which the documentation's benchmark
page shows:

1. a summary table with one row per workload: this library's default against
   laplace-torch's default and against laplace-torch's fastest backend, in time and
   in peak memory (ratios are laplace-torch / this library, so above 1 is better);
2. each benchmark's own report, whole (every backend, the targets, the errors).

A workload's result keys read ``phase|...|backend|side``; the backend field is
optional (the GP benchmark has none). Rows are grouped by what precedes the backend.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

#: (name, title) of the benchmarks, in the order of the report
BENCHMARKS = (
    ("curvature", "Curvature backends against their libraries"),
    ("laplace", "All weights: Full, Kron and Diag Laplace"),
    ("lllaplace", "Last layer"),
    ("functional", "The GP view (FunctionalLaplace)"),
    ("subnet", "Subnetworks and marglik_training"),
    ("transformer", "Transformers: all weights"),
    ("lora", "LoRA adapters of a GPT-2: Kron against one fine-tuning epoch"),
    ("streaming", "Streaming (posteriors): one update of dense_ggn and diag_ggn"),
    ("ella_valla", "ELLA and VaLLA (scalable function-space methods)"),
    ("output_noise", "One noise per output (ours alone)"),
    ("memory_plan", "Memory plans: estimates against measured peaks (ours alone)"),
    ("distributed", "Data-parallel fitting: 1 and 2 processes (ours alone)"),
)
OURS, LT = "ours", "laplace-torch"
#: the library a benchmark compares with, where it is not laplace-torch (its figures
#: fill laplace-torch's columns of the summary; the workload names it)
PEERS = {"streaming": "posteriors"}
#: the section of the report that docs/benchmarks.md includes
SECTION = "report"
BACKENDS = {"default", "CurvlinopsGGN", "BackPackGGN", "AsdlGGN"}
PHASES = {
    "fit": "fit",
    "predictive": "glm predictive",
    "marglik": "prior tuning by marglik",
    "gridsearch": "prior tuning by grid search",
    "gp": "fit + evidence + predictive",
}
#: phases named otherwise in one benchmark
PHASES_OF = {
    "subnet": {"marglik": "marglik_training, 5 epochs"},
    "transformer": {"epoch": "one fine-tuning epoch (SGD), the targets' reference"},
    "streaming": {"update": "one update"},
    "ella_valla": {
        "ella": "ELLA fit + predictive + grid search",
        "valla": "VaLLA fit + predictive",
    },
}
#: workloads whose figures are not timings (e.g. predictives at further seeds, to
#: compare results): left out of the summary
UNTIMED = {"seeds"}
TOKENS = (
    (re.compile(r"^C(\d+)$"), "{} classes"),
    (re.compile(r"^S(\d+)$"), "subnetwork of {} weights"),
    (re.compile(r"^M(\d+)$"), "n_subset {}"),
    (re.compile(r"^P(\d+)$"), "{} weights"),
    (re.compile(r"^N(\d+)$"), "{} samples"),
    (re.compile(r"^s(\d+)$"), "subsample_size {}"),
    (re.compile(r"^k(\d+)$"), "n_eigenvalues {}"),
    (re.compile(r"^Z(\d+)$"), "num_inducing {}"),
)


@dataclass
class Row:
    benchmark: str
    workload: str
    ours_s: float | None
    ours_mb: float | None
    lt_s: float | None
    lt_mb: float | None
    #: laplace-torch's fastest backend on the workload, and its time
    lt_fastest: tuple[str, float] | None
    #: why laplace-torch's default has no time (a timeout, out of memory), if so
    lt_failure: str | None


def workload_label(fields: list[str], benchmark: str = "") -> str:
    """``["fit", "C100", "kron"]`` -> ``"fit, 100 classes, kron"``."""
    phases = {**PHASES, **PHASES_OF.get(benchmark, {})}
    words = [phases.get(fields[0], fields[0])]
    for field in fields[1:]:
        for pattern, template in TOKENS:
            m = pattern.match(field)
            if m:
                field = template.format(f"{int(m[1]):,}")
                break
        words.append(field)
    return ", ".join(words)


def split_key(key: str) -> tuple[tuple[str, ...], str | None, str]:
    """``"fit|C100|kron|default|ours"`` -> ``(("fit", "C100", "kron"), "default",
    "ours")``."""
    *fields, side = key.split("|")
    backend = fields.pop() if fields and fields[-1] in BACKENDS else None
    return tuple(fields), backend, side


def short_failure(error: str) -> str:
    if "refused" in error:  # the library declined the model (its own exception)
        return "refused"
    if "timed out" in error:
        m = re.search(r"after (\d+)", error)
        return f"> {m[1]} s (timed out)" if m else "timed out"
    if any(s in error for s in ("memory", "MemoryError", "SIGKILL", "allocate")):
        return "out of memory"
    return "error"


def rows_of(name: str, raw: dict) -> list[Row]:
    """The summary rows of one benchmark's raw figures: one per workload, this
    library's default backend against laplace-torch's (or, for a workload run with
    another backend only, that backend on both sides; or against the library of
    ``PEERS``, for a benchmark that compares with another)."""
    peer = PEERS.get(name, LT)
    groups: dict[tuple[str, ...], dict[tuple[str | None, str], dict]] = {}
    for key, m in raw["results"].items():
        fields, backend, side = split_key(key)
        if fields[0] in UNTIMED:
            continue
        groups.setdefault(fields, {})[(backend, side)] = m
    rows = []
    for fields, runs in groups.items():
        ours_backends = [b for (b, side) in runs if side == OURS]
        if not ours_backends:
            continue
        # the default backend where it ran, else the one both sides ran with
        backend = "default" if "default" in ours_backends else ours_backends[0]
        ours, lt = runs[(backend, OURS)], runs.get((backend, peer))
        lt_ok = {
            b or "default": m["seconds"]
            for (b, side), m in runs.items()
            if side == peer and not m["error"]
        }
        fastest = min(lt_ok.items(), key=lambda t: t[1]) if lt_ok else None
        good = lt is not None and not lt["error"]
        label = workload_label(list(fields), name)
        if backend not in (None, "default"):
            label += f" ({backend} on both sides)"
        if peer != LT:
            label += f" (against {peer})"
        rows.append(
            Row(
                benchmark=name,
                workload=label,
                ours_s=None if ours["error"] else ours["seconds"],
                ours_mb=None if ours["error"] else ours["peak_mb"],
                lt_s=lt["seconds"] if good else None,
                lt_mb=lt["peak_mb"] if good else None,
                lt_fastest=fastest,
                lt_failure=short_failure(lt["error"]) if lt and lt["error"] else None,
            )
        )
    return rows


def fmt_s(s: float | None) -> str:
    return "–" if s is None else f"{s:.3g} s"


def fmt_mb(v: float | None) -> str:
    return "–" if v is None else f"{v:,.0f} MB"


def ratio(a: float | None, b: float | None, floor: float = 0.0) -> str:
    """``a / b`` as a factor (``b`` clamped to ``floor``; "> " when it was)."""
    if a is None or b is None or max(b, floor) <= 0:
        return "–"
    r = a / max(b, floor)
    bound = "> " if b < floor else ""
    return bound + (f"{r:,.0f}×" if r >= 100 else f"{r:.2g}×")


def summary_table(rows: list[Row]) -> list[str]:
    lines = [
        "| benchmark | workload | this library | laplace-torch | speed-up "
        "| laplace-torch (fastest backend) | speed-up vs fastest | peak memory, "
        "this library / laplace-torch | memory ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fastest = (
            f"{fmt_s(r.lt_fastest[1])} ({r.lt_fastest[0]})" if r.lt_fastest else "–"
        )
        lt_time = r.lt_failure or fmt_s(r.lt_s)
        if r.lt_failure and r.lt_failure.startswith(">") and r.ours_s:
            seconds = float(re.search(r"\d+", r.lt_failure)[0])
            speed_up = "> " + ratio(seconds, r.ours_s)
        else:
            speed_up = ratio(r.lt_s, r.ours_s)
        memory = f"{fmt_mb(r.ours_mb)} / {fmt_mb(r.lt_mb)}"
        lines.append(
            f"| {r.benchmark} | {r.workload} | {fmt_s(r.ours_s)} | {lt_time} | "
            f"{speed_up} | {fastest} | "
            f"{ratio(r.lt_fastest[1] if r.lt_fastest else None, r.ours_s)} | "
            f"{memory} | {ratio(r.lt_mb, r.ours_mb, floor=1.0)} |"
        )
    return lines


def demote(markdown: str) -> str:
    """Headings one level down, so a benchmark's report nests under the summary."""
    return re.sub(r"^(#+) ", r"#\1 ", markdown, flags=re.M)


def read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def write_report(output_dir: str, path: str, header: list[str]) -> str:
    """Write the report of the benchmarks in ``output_dir`` to ``path`` (with the
    lines ``header`` under its title) and return it."""
    rows: list[Row] = []
    sections: list[str] = []
    for name, title in BENCHMARKS:
        text = read(os.path.join(output_dir, f"{name}.md"))
        raw = read(os.path.join(output_dir, f"{name}.json"))
        if raw is not None:
            rows += rows_of(name, json.loads(raw))
        body = demote(text.strip()) if text else "_not run_"
        sections += [f"## {title}", "", body, ""]
    # the documentation includes what lies between the markers (not the title)
    lines = ["# Benchmark report", "", f"<!-- --8<-- [start:{SECTION}] -->", ""]
    lines += [*header, ""]
    if rows:
        lines += [
            "## Summary",
            "",
            "One row per workload: both libraries with their default backend "
            "(unless the row names another), and laplace-torch's fastest backend; "
            "ratios are laplace-torch / this library (above 1: this library is "
            "faster or smaller); a row against another library (posteriors) has "
            "its figures in laplace-torch's columns. Memory is the peak resident "
            "memory a run adds; under 1 MB counts as 1 MB (the ratio then reads "
            "'>'). The sections "
            "below give every backend and how each workload is measured.",
            "",
            *summary_table(rows),
            "",
        ]
    end = [f"<!-- --8<-- [end:{SECTION}] -->"]
    text = "\n".join(lines + sections).rstrip() + "\n\n" + end[0] + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text
