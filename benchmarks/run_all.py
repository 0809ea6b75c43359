"""Every benchmark in one run, this library and laplace-torch 0.3 side by side.

``make bench`` runs this script. It

1. makes sure laplace-torch 0.3 can be run: it builds the virtual environment
   ``.lt-venv`` (git-ignored) with the same torch as this library's and the same
   curvature libraries, installed the way the Makefile installs them (no
   torchvision); ``--lt-python`` names another interpreter instead. When none can be
   built or imported, the benchmarks run this library alone and the report says so;
2. runs each benchmark script (``curvature``, ``laplace``, ``lllaplace``,
   ``functional``, ``subnet``, ``transformer``, ``lora``, ``streaming``, ``ella_valla``,
   ``output_noise``, ``memory_plan``, ``distributed``),
   each of which measures every workload in fresh, memory-limited processes and
   writes its report to ``benchmarks/output/``. ``streaming`` compares
   ``laplace.streaming`` with posteriors 0.1.3 instead, run with
   ``--posteriors-python`` (else ``$POSTERIORS_PYTHON``, else
   ``.posteriors-venv/bin/python``, which this script does not build); where there
   is none, or with ``--no-posteriors``, it runs this library alone;
3. writes ``benchmarks/REPORT.md`` (see ``report.py``): a summary table of time and
   peak-memory ratios over all workloads, then every benchmark's own report. The
   documentation's benchmark page shows that file.

A full run takes about an hour and three quarters on a 2-core machine, most of it spent
waiting for laplace-torch. ``--quick`` is a smoke run on small data (half an
hour); ``--reuse-lt`` measures only this library and takes laplace-torch's (and
posteriors') figures from the previous run of each benchmark; ``--only NAME`` runs
some benchmarks.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from laplace_benchmark import LT, run_probe  # noqa: E402
from report import BENCHMARKS, write_report  # noqa: E402

LT_VENV = os.path.join(ROOT, ".lt-venv")
LT_PACKAGE = "laplace-torch==0.3"
#: what laplace-torch imports, pinned as in requirements/lock.txt
LT_REQUIREMENTS = os.path.join(HERE, "laplace-torch-requirements.txt")
NODEPS = os.path.join(ROOT, "requirements", "nodeps.txt")
#: the interpreter with posteriors 0.1.3 that ``streaming`` compares with by default
POSTERIORS_PYTHON = os.environ.get(
    "POSTERIORS_PYTHON", os.path.join(ROOT, ".posteriors-venv", "bin", "python")
)
#: the benchmarks compared with posteriors, not laplace-torch
POSTERIORS_BENCHMARKS = ("streaming",)
#: the benchmarks that do not run laplace-torch: this library's backends against
#: their own libraries, and what laplace-torch does not have (one noise per output)
WITHOUT_LAPLACE_TORCH = ("curvature", "output_noise", "memory_plan", "distributed")
#: options of each benchmark in a full run (a quick run takes the scripts' own)
FULL_OPTIONS = {
    # laplace-torch's GP fit on 2,000 points takes more than 20 minutes
    "functional": ["--timeout", "600"],
    # one pass: three (the script's default, against a noisy machine) take 30 minutes
    "curvature": ["--rounds", "1"],
}


def log(message: str) -> None:
    print(
        f"[run_all {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True
    )


def lt_ready(python: str) -> str | None:
    """None if ``python`` imports laplace-torch, else why not (the benchmarks' own
    probe, which also refuses this checkout's laplace)."""
    probe = run_probe(python, LT)
    return probe if isinstance(probe, str) else None


def build_lt_venv(torch_requirement: str) -> tuple[str | None, str]:
    """Build ``.lt-venv`` (once; a stamp file records what it was built with) and
    return ``(python, note)``; ``python`` is None when it could not be built."""
    python = os.path.join(LT_VENV, "bin", "python")
    stamp = os.path.join(LT_VENV, ".installed")
    # the requirements' text is part of the stamp: editing them updates the venv
    with open(LT_REQUIREMENTS) as f:
        pins = " ".join(
            line.strip() for line in f if line.strip() and not line.startswith("#")
        )
    wanted = f"{LT_PACKAGE} {torch_requirement} {pins}"
    if os.path.exists(stamp) and open(stamp).read() == wanted:
        why = lt_ready(python)
        if why is None:
            return python, f"laplace-torch from `{os.path.relpath(LT_VENV, ROOT)}`"
    log(f"building {LT_VENV} with {wanted} (a few minutes, once)")
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    steps = [
        [sys.executable, "-m", "venv", "--clear", LT_VENV]
        if not os.path.exists(python)
        else None,
        [*pip, torch_requirement],
        # as the Makefile does: no torchvision (it has no CPU build here, and a
        # broken one breaks torchmetrics); laplace-torch imports it nowhere we use
        [*pip, "--no-deps", LT_PACKAGE, "-r", NODEPS],
        [*pip, "-r", LT_REQUIREMENTS],
    ]
    for step in filter(None, steps):
        proc = subprocess.run(step, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            return None, f"`{' '.join(step[-2:])}` failed: {tail}"
    why = lt_ready(python)
    if why is not None:
        return None, f"the environment built, but: {why}"
    with open(stamp, "w") as f:
        f.write(wanted)
    return python, f"laplace-torch from `{os.path.relpath(LT_VENV, ROOT)}`"


def benchmark_command(
    name: str, args, lt_python: str | None, posteriors_python: str | None = None
) -> list[str]:
    cmd = [sys.executable, os.path.join(HERE, f"{name}_benchmark.py")]
    cmd += ["--output", os.path.join(args.output, f"{name}.md")]
    if args.quick:
        cmd.append("--quick")
    else:
        cmd += FULL_OPTIONS.get(name, [])
    if name in WITHOUT_LAPLACE_TORCH:
        return cmd
    if name in POSTERIORS_BENCHMARKS:
        if posteriors_python is None:
            return [*cmd, "--ours-only"]
        cmd += ["--posteriors-python", posteriors_python]
        return [*cmd, "--reuse-peer"] if args.reuse_lt else cmd
    if lt_python is None:
        return [*cmd, "--ours-only"]
    cmd += ["--lt-python", lt_python]
    return [*cmd, "--reuse-lt"] if args.reuse_lt else cmd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument(
        "--only", nargs="+", choices=[n for n, _ in BENCHMARKS], help="benchmarks"
    )
    parser.add_argument("--lt-python", help="an interpreter with laplace-torch 0.3")
    parser.add_argument("--no-lt", action="store_true", help="run this library alone")
    parser.add_argument(
        "--posteriors-python",
        default=POSTERIORS_PYTHON,
        help="an interpreter with posteriors 0.1.3, for the streaming benchmark",
    )
    parser.add_argument(
        "--no-posteriors",
        action="store_true",
        help="run the streaming benchmark without posteriors",
    )
    parser.add_argument(
        "--reuse-lt",
        action="store_true",
        help="laplace-torch's figures from each benchmark's previous run",
    )
    parser.add_argument("--torch", default="torch==2.13.0", help="for .lt-venv")
    parser.add_argument(
        "--output",
        help="folder of the benchmarks' reports (benchmarks/output, or its quick/ "
        "folder for a smoke run)",
    )
    parser.add_argument(
        "--report",
        help="the report (benchmarks/REPORT.md, or REPORT.md in the output folder "
        "for a smoke run)",
    )
    args = parser.parse_args(argv)
    default_output = os.path.join(HERE, "output", *(["quick"] if args.quick else []))
    args.output = args.output or default_output
    if args.report is None:
        quick_report = os.path.join(args.output, "REPORT.md")
        args.report = quick_report if args.quick else os.path.join(HERE, "REPORT.md")
    os.makedirs(args.output, exist_ok=True)

    if args.no_lt:
        lt_python, lt_note = None, "laplace-torch not run (`--no-lt`)"
    elif args.lt_python:
        why = lt_ready(args.lt_python)
        lt_python = None if why else args.lt_python
        lt_note = why or f"laplace-torch from `{args.lt_python}`"
    else:
        lt_python, lt_note = build_lt_venv(args.torch)
    if lt_python is None:
        lt_note = f"**laplace-torch could not be run, this library alone**: {lt_note}"
    log(lt_note)
    if args.no_posteriors:
        posteriors_python = None
        posteriors_note = "posteriors not run (`--no-posteriors`)"
    elif not os.path.exists(args.posteriors_python):
        posteriors_python = None
        posteriors_note = (
            f"posteriors not run: {args.posteriors_python} does not exist (the "
            "streaming benchmark runs this library alone)"
        )
    else:
        posteriors_python = args.posteriors_python
        shown = posteriors_python
        if shown.startswith(ROOT + os.sep):
            shown = os.path.relpath(shown, ROOT)
        posteriors_note = f"posteriors from `{shown}` (the streaming benchmark)"
    log(posteriors_note)

    started = time.time()
    failed = []
    for name, _ in BENCHMARKS:
        if args.only and name not in args.only:
            continue
        cmd = benchmark_command(name, args, lt_python, posteriors_python)
        log(
            " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd)
        )
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            failed.append(name)
    minutes = (time.time() - started) / 60
    command = " ".join(["python benchmarks/run_all.py", *(argv or sys.argv[1:])])
    header = [
        f"Made by `make bench` (`{command}`) on {datetime.date.today()}, in "
        f"{minutes:.0f} minutes, on {platform.machine()} with {os.cpu_count()} CPU "
        "cores; each benchmark's section names the commit it measured.",
        "",
        f"- {lt_note}.",
        f"- {posteriors_note}.",
    ]
    if args.quick:
        header.append("- **A smoke run (`--quick`)**: small data, not for comparison.")
    if failed:
        header.append(f"- These benchmarks exited with an error: {', '.join(failed)}.")
    write_report(args.output, args.report, header)
    log(f"report written to {os.path.relpath(args.report, ROOT)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
