"""Time and peak memory of the Laplace workflows, this library against laplace-torch.

The same workload functions, written against the public laplace-torch 0.3 API that
both libraries share (``Laplace(...)``, ``.fit``, the glm predictive,
``optimize_prior_precision``), run once with this library (this interpreter, the
repository's ``laplace``) and once with laplace-torch (the interpreter of another
virtual environment: ``--lt-python``, else ``$LAPLACE_TORCH_PYTHON``, else
``.lt-venv/bin/python``), each measurement in a fresh process (see
``_measure.py``). 10-class classification on random data and randomly initialized
MLPs (fixed seeds, so both sides see the same model and data):

1. ``fit``: ``Laplace(...).fit(loader)``, Kron and Diag on the MLP 784-256-256-10
   and Full on the MLP 196-24-10 (4,978 parameters), with each backend;
2. ``predictive``: one glm/probit call on a batch of inputs; the memory is what the
   call adds to the fitted Laplace;
3. ``marglik``: ``optimize_prior_precision(method="marglik")`` with a scalar prior;
4. ``gridsearch``: ``optimize_prior_precision(method="gridsearch")`` with the glm
   probit predictive on a validation loader.

In 2-4, each timed run starts on a freshly fitted Laplace (the fit is not timed, and
the warm-up runs on another), so that work deferred from the fit to the first use
(a decomposition, say) is timed, and nothing cached by an earlier run is reused.

    python benchmarks/laplace_benchmark.py               # the full run (~20 minutes)
    python benchmarks/laplace_benchmark.py --quick       # a smoke run on less data
    python benchmarks/laplace_benchmark.py --ours-only   # without laplace-torch
    python benchmarks/laplace_benchmark.py --reuse-lt    # laplace-torch's figures
                                            # from the last run, ours measured anew

The tables, with the targets of the issue checked, are printed and written to
``benchmarks/output/laplace.md`` (or ``--output``), the raw figures beside it
(``laplace.json``). laplace-torch takes ~17 of the ~20 minutes of a full run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass

SCRIPT = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(SCRIPT))
sys.path.insert(0, os.path.dirname(SCRIPT))
from _measure import (  # noqa: E402
    Measurement,
    Timed,
    measure_in_subprocess,
    worker_main,
)

QUICK = "--quick" in sys.argv
BATCH = 128
N_DATA = 256 if QUICK else 1000
N_PREDICT = 50 if QUICK else 200
#: steps of the marginal-likelihood tuning; laplace-torch's Full takes 3-13 s a step
#: on the 4,978-parameter MLP (this 2-core machine), so it gets one run of 5-20
#: minutes (fewer steps would flatter it: what is done once per tuning weighs more)
MARGLIK_STEPS = (
    {"kron": 20, "diag": 20, "full": 2}
    if QUICK
    else dict.fromkeys(("kron", "diag", "full"), 100)
)
GRID_SIZE = 5 if QUICK else 20
#: validation points of the grid search; laplace-torch's Kron glm predictive takes
#: 0.2-0.35 s per input on the big MLP, so 20 grid values on 200 inputs would take
#: 15-25 minutes a run: Kron searches on fewer
N_VAL = {"diag": 50 if QUICK else 200, "kron": 20 if QUICK else 32}
#: the environment `make bench` (run_all.py) builds
DEFAULT_LT_PYTHON = os.path.join(ROOT, ".lt-venv", "bin", "python")
OURS, LT = "ours", "laplace-torch"
BIG, SMALL = "MLP 784-256-256-10", "MLP 196-24-10"


# -- models and data -------------------------------------------------------------
def build(model_name: str):
    from torch import manual_seed, nn

    manual_seed(0)
    if model_name == BIG:
        return nn.Sequential(
            nn.Linear(784, 256),
            nn.ReLU(),
            nn.Linear(256, 256),
            nn.ReLU(),
            nn.Linear(256, 10),
        )
    return nn.Sequential(nn.Linear(196, 24), nn.ReLU(), nn.Linear(24, 10))


def data(model_name: str, n: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 784 if model_name == BIG else 196, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def loader(model_name: str, n: int, seed: int = 0):
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(*data(model_name, n, seed)), batch_size=BATCH)


# -- the workloads (the same code for both libraries) -------------------------------
@dataclass(frozen=True)
class Case:
    group: str  # fit | predictive | marglik | gridsearch
    model: str
    structure: str
    #: a class of ``laplace.curvature``; None is the library's default
    backend: str | None = None

    def key(self, side: str) -> str:
        backend = self.backend or "default"
        return f"{self.group}|{self.model}|{self.structure}|{backend}|{side}"


def laplace_of(case: Case, model):
    from laplace import Laplace

    kwargs = {}
    if case.backend is not None:
        import laplace.curvature

        kwargs["backend"] = getattr(laplace.curvature, case.backend)
    return Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure=case.structure,
        **kwargs,
    )


def fresh_fit(case: Case):
    """``(state, before_each)``: ``before_each()`` puts a freshly fitted Laplace in
    ``state["la"]`` (untimed), so every timed run starts right after a fit, and
    work a library defers from the fit to its first use is timed where it
    happens."""
    import gc

    train = loader(case.model, N_DATA)
    state = {}

    def before_each():
        state["la"] = None  # free the last one first
        gc.collect()
        la = laplace_of(case, build(case.model))
        la.fit(train)
        state["la"] = la

    return state, before_each


def fit_workload(case: Case):
    template = build(case.model)
    train = loader(case.model, N_DATA)
    one_batch = [next(iter(train))]
    last = {}

    def fit(batches):
        # a fresh copy each time: BackPACK and ASDL hook into the model they see
        la = laplace_of(case, copy.deepcopy(template))
        la.fit(batches)
        last["la"] = la

    def warm_up():
        from torch.utils.data import DataLoader, TensorDataset

        fit(DataLoader(TensorDataset(*one_batch[0]), batch_size=BATCH))

    def summary():
        return f"log marglik {last['la'].log_marginal_likelihood().item():.6g}"

    return Timed(lambda: fit(train), warm_up, summary)


def predictive_workload(case: Case):
    state, before_each = fresh_fit(case)
    x = data(case.model, N_PREDICT, seed=1)[0]

    def run():
        state["p"] = state["la"](x, pred_type="glm", link_approx="probit")

    def warm_up():
        state["la"](x[:2], pred_type="glm", link_approx="probit")

    def summary():
        p = state["p"]
        return f"mean max prob {p.amax(-1).mean().item():.6g}, p[0,0] {p[0, 0]:.6g}"

    return Timed(run, warm_up, summary, before_each)


def prior_precision(state) -> str:
    return f"prior precision {state['la'].prior_precision.flatten()[0].item():.6g}"


def marglik_workload(case: Case):
    state, before_each = fresh_fit(case)

    def tune(n_steps):
        state["la"].optimize_prior_precision(
            pred_type="glm",
            method="marglik",
            n_steps=n_steps,
            init_prior_prec=1.0,
            prior_structure="scalar",
        )

    return Timed(
        lambda: tune(MARGLIK_STEPS[case.structure]),
        lambda: tune(1),
        lambda: prior_precision(state),
        before_each,
    )


def gridsearch_workload(case: Case):
    state, before_each = fresh_fit(case)
    val = loader(case.model, N_VAL[case.structure], seed=2)

    def tune(grid_size):
        state["la"].optimize_prior_precision(
            pred_type="glm",
            method="gridsearch",
            val_loader=val,
            grid_size=grid_size,
            link_approx="probit",
            prior_structure="scalar",
        )

    return Timed(
        lambda: tune(GRID_SIZE),
        lambda: tune(1),
        lambda: prior_precision(state),
        before_each,
    )


MAKE = {
    "fit": fit_workload,
    "predictive": predictive_workload,
    "marglik": marglik_workload,
    "gridsearch": gridsearch_workload,
}

#: The fits of the tuning and predictive workloads are set-up, not timed. Diag uses
#: ASDL there on both sides: laplace-torch's default (Curvlinops) takes ~2 minutes
#: for it, and the backend does not change the timed part (the predictive's
#: Jacobians are the same for every backend, within noise, in laplace-torch).
SETUP_BACKEND = {"kron": None, "diag": "AsdlGGN", "full": None}
FIT_CASES = [
    Case("fit", model, structure, backend)
    for model, structure in ((BIG, "kron"), (BIG, "diag"), (SMALL, "full"))
    for backend in (None, "BackPackGGN", "AsdlGGN")
]
CASES = [
    *FIT_CASES,
    *(
        Case(group, model, s, SETUP_BACKEND[s])
        for group in ("predictive", "marglik")
        for model, s in ((BIG, "kron"), (BIG, "diag"), (SMALL, "full"))
    ),
    Case("gridsearch", BIG, "diag", SETUP_BACKEND["diag"]),
    Case("gridsearch", BIG, "kron", SETUP_BACKEND["kron"]),
]


def workloads() -> dict:
    return {
        case.key(side): (lambda c=case: MAKE[c.group](c))
        for case in CASES
        for side in (OURS, LT)
    }


# -- the worker: pick the library of its side ------------------------------------------
def _is_ours(path: str) -> bool:
    # this checkout's package (not anything under ROOT: .lt-venv lies there too)
    return os.path.abspath(path).startswith(os.path.join(ROOT, "laplace") + os.sep)


def select_library(side: str) -> None:
    """Put this repository first on the path for our side, off it for the other."""
    here = [p for p in sys.path if os.path.abspath(p or ".") == ROOT]
    sys.path[:] = [p for p in sys.path if p not in here]
    if side == OURS:
        sys.path.insert(0, ROOT)
    import laplace

    if _is_ours(laplace.__file__) != (side == OURS):
        raise RuntimeError(f"{side} side imported laplace from {laplace.__file__}")


def worker() -> None:
    name = sys.argv[sys.argv.index("--worker") + 1]
    import torch

    torch.set_num_threads(int(sys.argv[sys.argv.index("--threads") + 1]))
    select_library(name.rsplit("|", 1)[1])
    worker_main(workloads())


def probe() -> None:
    """Print the versions this interpreter runs (``--probe SIDE``)."""
    from importlib import metadata

    import torch

    side = sys.argv[sys.argv.index("--probe") + 1]
    select_library(side)
    import laplace

    dist = "laplace" if side == OURS else "laplace-torch"
    print(
        "PROBE "
        + json.dumps(
            {
                "python": sys.version.split()[0],
                "torch": torch.__version__,
                "laplace": f"{dist} {metadata.version(dist)}",
                "path": os.path.dirname(laplace.__file__),
            }
        )
    )


def checkout() -> str:
    """The commit of this repository, and whether the library differs from it."""
    try:
        git = ["git", "-C", ROOT]
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "laplace"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (head or "unknown") + (
        " with uncommitted changes to laplace/" if dirty else ""
    )


def run_probe(python: str, side: str, script: str = SCRIPT) -> dict | str:
    """The answer of ``script``'s probe (``--probe SIDE``) run by ``python``, or why
    it failed."""
    if not os.path.exists(python):
        return f"{python} does not exist"
    try:
        proc = subprocess.run(
            [python, script, "--probe", side],
            capture_output=True,
            text=True,
            timeout=120,
            env=dict(os.environ, PYTHONWARNINGS="ignore"),
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"{python}: {err}"
    for line in proc.stdout.splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[len("PROBE ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return f"{python}: {tail[0]}"


# -- the report -------------------------------------------------------------------
def seconds(m: Measurement | None) -> str:
    if m is None:
        return "–"
    return "error" if m.error else f"{m.seconds:.3g}"


def mb(m: Measurement | None, scale: float = 1.0) -> str:
    if m is None or m.error or m.peak_mb is None:
        return "–"
    return f"{m.peak_mb * scale:.0f}"


def ok(m: Measurement | None) -> bool:
    return m is not None and not m.error


def speed_up(ours: Measurement | None, lt: Measurement | None) -> float | None:
    return lt.seconds / ours.seconds if ok(ours) and ok(lt) else None


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "–"
    return f"{r:.0f}×" if r >= 100 else f"{r:.3g}×"


def mem_ratio(ours: Measurement | None, lt: Measurement | None) -> str:
    if not (ok(ours) and ok(lt)) or ours.peak_mb is None or lt.peak_mb is None:
        return "–"
    if ours.peak_mb < 1:  # below what RSS resolves
        return f"> {lt.peak_mb:.0f}×" if lt.peak_mb >= 1 else "–"
    return fmt_ratio(lt.peak_mb / ours.peak_mb)


def verdict(r: float | None, target: float) -> str:
    if r is None:
        return "not measured"
    return "**met**" if r >= target else "**NOT met**"


def best_of(a: Measurement | None, b: Measurement) -> Measurement:
    """The faster of two measurements of one workload, with the larger peak."""
    if a is None or a.error:
        return b
    if b.error:
        return a
    fast = a if a.seconds <= b.seconds else b
    peaks = [m.peak_mb for m in (a, b) if m.peak_mb is not None]
    return Measurement(
        fast.name,
        fast.seconds,
        max(peaks) if peaks else None,
        note=fast.note,
        runs=(a.runs or 0) + (b.runs or 0),
    )


class Report:
    def __init__(self, results: dict[str, Measurement]):
        self.results = results
        self.lines: list[str] = []
        self.slower: list[str] = []  # workloads where laplace-torch was faster

    def get(self, case: Case, side: str) -> Measurement | None:
        return self.results.get(case.key(side))

    def measured(self, cases) -> list[Case]:
        return [c for c in cases if self.get(c, OURS) or self.get(c, LT)]

    def note_slower(self, case: Case) -> None:
        r = speed_up(self.get(case, OURS), self.get(case, LT))
        if r is not None and r < 1:
            what = f"{case.group} {case.structure} ({case.backend or 'default'})"
            self.slower.append(f"{what}: {r:.2f}×")

    def fits(self) -> None:
        cases = self.measured(FIT_CASES)
        if not cases:
            return
        self.lines += [
            f"### Fit: `Laplace(...)` and `.fit` on {N_DATA} samples",
            "",
            "| model | structure | backend | ours (s) | laplace-torch (s) | speed-up "
            "| ours MB | laplace-torch MB | memory ratio |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in cases:
            ours, lt = self.get(c, OURS), self.get(c, LT)
            backend = c.backend or "default"
            self.lines.append(
                f"| {c.model} | {c.structure} | {backend} | {seconds(ours)} | "
                f"{seconds(lt)} | {fmt_ratio(speed_up(ours, lt))} | {mb(ours)} | "
                f"{mb(lt)} | {mem_ratio(ours, lt)} |"
            )
            self.note_slower(c)
        self.lines.append("")
        self.lines += [
            "`default`: NativeGGN in this library, CurvlinopsGGN in laplace-torch.",
            "",
        ]
        for structure, target in (("kron", 1), ("diag", 1), ("full", 2)):
            default = next(
                (c for c in cases if c.structure == structure and not c.backend), None
            )
            if default is None:
                continue
            ours = self.get(default, OURS)
            lts = [
                (c.backend or "CurvlinopsGGN", self.get(c, LT))
                for c in cases
                if c.structure == structure and ok(self.get(c, LT))
            ]
            if not lts:
                continue
            name, fastest = min(lts, key=lambda t: t[1].seconds)
            r = speed_up(ours, fastest)
            r_default = speed_up(ours, self.get(default, LT))
            self.lines.append(
                f"- Target: {structure.capitalize()} fit, our default backend at "
                f"least {target}× as fast as laplace-torch's fastest backend "
                f"({name}, {fastest.seconds:.3g} s): {fmt_ratio(r)}, "
                f"{verdict(r, target)} (against laplace-torch's default: "
                f"{fmt_ratio(r_default)})."
            )
        self.lines.append("")

    def simple(self, group: str, title: str, targets: dict[str, float]) -> None:
        cases = self.measured([c for c in CASES if c.group == group])
        if not cases:
            return
        per_1000 = group == "predictive"
        extra = " | ours MB / 1000 inputs" if per_1000 else ""
        self.lines += [
            title,
            "",
            "| model | structure | fit backend | ours (s) | laplace-torch (s) | "
            f"speed-up | ours MB | laplace-torch MB | memory ratio{extra} |",
            "|---|---|---|---|---|---|---|---|---|" + ("---|" if per_1000 else ""),
        ]
        for c in cases:
            ours, lt = self.get(c, OURS), self.get(c, LT)
            row = (
                f"| {c.model} | {c.structure} | {c.backend or 'default'} | "
                f"{seconds(ours)} | {seconds(lt)} | {fmt_ratio(speed_up(ours, lt))} | "
                f"{mb(ours)} | {mb(lt)} | {mem_ratio(ours, lt)} |"
            )
            if per_1000:
                row += f" {mb(ours, 1000 / N_PREDICT)} |"
            self.lines.append(row)
            self.note_slower(c)
        self.lines.append("")
        for c in cases:
            if c.structure not in targets:
                continue
            ours = self.get(c, OURS)
            r = speed_up(ours, self.get(c, LT))
            line = (
                f"- Target: {c.structure.capitalize()} {group} at least "
                f"{targets[c.structure]:g}× faster: {fmt_ratio(r)}, "
                f"{verdict(r, targets[c.structure])}"
            )
            if per_1000:
                per = (
                    ours.peak_mb * 1000 / N_PREDICT
                    if ok(ours) and ours.peak_mb is not None
                    else None
                )
                if per is None:
                    met = "not measured"
                else:
                    met = "**met**" if per < 100 else "**NOT met**"
                line += (
                    "; under 100 MB extra per 1,000 inputs: "
                    f"{mb(ours, 1000 / N_PREDICT)} MB, {met}"
                )
            self.lines.append(line + ".")
        self.lines.append("")

    def agreement_and_errors(self) -> None:
        rows, errors = [], []
        for c in CASES:
            ours, lt = self.get(c, OURS), self.get(c, LT)
            for m in (ours, lt):
                if m is not None and m.error:
                    errors.append(f"- `{m.name}`: {m.error}")
            if (ours and ours.note) or (lt and lt.note):
                rows.append(
                    f"| {c.group} | {c.model} | {c.structure} | "
                    f"{c.backend or 'default'} | {(ours and ours.note) or '–'} | "
                    f"{(lt and lt.note) or '–'} |"
                )
        if rows:
            self.lines += [
                "### Results of the last run, to compare (same model, data, seed)",
                "",
                "| workload | model | structure | backend | ours | laplace-torch |",
                "|---|---|---|---|---|---|",
                *rows,
                "",
            ]
        if errors:
            self.lines += ["### Errors", "", *errors, ""]


def report(results, header: list[str], lt_available: bool) -> str:
    rep = Report(results)
    rep.lines += header
    rep.fits()
    rep.simple(
        "predictive",
        f"### glm predictive, probit link, one call on {N_PREDICT} inputs",
        {"kron": 100, "diag": 100},
    )
    rep.simple(
        "marglik",
        "### Prior precision by marginal likelihood (scalar prior; "
        + ", ".join(f"{s.capitalize()} {n} steps" for s, n in MARGLIK_STEPS.items())
        + ")",
        {"kron": 2, "diag": 2, "full": 20},
    )
    rep.simple(
        "gridsearch",
        f"### Prior precision by grid search ({GRID_SIZE} values, glm probit, "
        f"{N_VAL['diag']} validation inputs for Diag, {N_VAL['kron']} for Kron)",
        {"diag": 1, "kron": 1},
    )
    if lt_available:
        both = [
            c for c in CASES if speed_up(rep.get(c, OURS), rep.get(c, LT)) is not None
        ]
        verdict_line = (
            "**met**"
            if both and not rep.slower
            else "**NOT met**: " + "; ".join(rep.slower)
        )
        if not both:
            verdict_line = "not measured"
        rep.lines += [
            f"- Target: every workload at least as fast as laplace-torch "
            f"({len(both)} compared): {verdict_line}.",
            "",
        ]
    rep.agreement_and_errors()
    return "\n".join(rep.lines).rstrip() + "\n"


def common_arguments(description: str, output_name: str) -> argparse.ArgumentParser:
    """The options every benchmark against laplace-torch takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="less data, a smoke run")
    parser.add_argument("--only", default="", help="run workloads containing this")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="passes over all workloads; each reports its best pass",
    )
    parser.add_argument(
        "--ours-only", action="store_true", help="do not run laplace-torch"
    )
    parser.add_argument(
        "--reuse-lt",
        action="store_true",
        help="take laplace-torch's figures from the last run's raw results (the "
        "output's .json) instead of measuring them again (they do not change with "
        "this library); measure only what that run lacks",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="take every measurement that succeeded in the last run's raw results "
        "(both libraries; the report names that run's commit) and measure only "
        "those that failed or are missing (e.g. again with a longer --timeout)",
    )
    parser.add_argument(
        "--lt-python",
        default=os.environ.get("LAPLACE_TORCH_PYTHON", DEFAULT_LT_PYTHON),
        help="interpreter with laplace-torch installed",
    )
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads"
    )
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds per measurement"
    )
    parser.add_argument(
        "--output", default=os.path.join(ROOT, "benchmarks", "output", output_name)
    )
    return parser


def main() -> None:
    parser = common_arguments(__doc__.splitlines()[0], "laplace.md")
    args = parser.parse_args()
    timeout = args.timeout or (300.0 if args.quick else 1800.0)
    repeats, budget = (3, 10.0) if args.quick else (10, 20.0)

    raw_path = os.path.splitext(args.output)[0] + ".json"
    results: dict[str, Measurement] = {}
    pythons = {OURS: sys.executable}
    probes = {OURS: run_probe(sys.executable, OURS)}
    lt_note = None
    earlier = load_raw(raw_path, args.quick) if args.reuse_lt else None
    if earlier is not None:
        results = {
            k: Measurement(**v)
            for k, v in earlier["results"].items()
            if k.endswith("|" + LT)
        }
        probes[LT] = earlier["probes"].get(LT, "unknown")
        lt_note = (
            f"laplace-torch figures reused from the run at commit "
            f"{earlier['commit']} (`--reuse-lt`); only those missing were measured."
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

    names = [
        case.key(side)
        for case in CASES
        for side in pythons
        if args.only in case.key(side) and case.key(side) not in results
    ]
    extra = [
        *(["--quick"] if args.quick else []),
        *("--threads", str(args.threads)),
        *("--repeats", str(repeats)),
        *("--budget", str(budget)),
    ]
    for r in range(1, args.rounds + 1):
        for i, name in enumerate(names, 1):
            side = name.rsplit("|", 1)[1]
            m = measure_in_subprocess(SCRIPT, name, extra, timeout, pythons[side])
            results[name] = best_of(results.get(name), m)
            shown = m.error or f"{m.seconds:.3g} s, {mb(m)} MB, {m.runs} runs"
            where = f"round {r}/{args.rounds}, {i}/{len(names)}"
            print(f"[{where}] {name}: {shown}", file=sys.stderr, flush=True)

    command = " ".join(
        ["python", os.path.relpath(SCRIPT, ROOT), *map(shlex.quote, sys.argv[1:])]
    )
    header = [
        "## laplace (ours) against laplace-torch",
        "",
        f"Command: `{command}`, at commit {checkout()}.",
        "",
        f"10-class classification on random data, batches of {BATCH}, "
        f"{args.threads} torch threads. Each measurement runs in a fresh process: "
        f"after set-up and a warm-up, the best time of up to {repeats} runs "
        f"(no further run once the runs took {budget:g} s)"
        + (f", best of {args.rounds} interleaved rounds" if args.rounds > 1 else "")
        + "; memory is the peak resident memory a run adds to the set-up, in MB. "
        "Speed-up and memory ratio are laplace-torch / ours. The predictive and "
        "tuning workloads time each run on a freshly fitted Laplace (the fit not "
        "timed), so nothing deferred from the fit or cached by an earlier run is "
        "left out; those fits use the default backend, but AsdlGGN for Diag on both "
        "sides (laplace-torch's default takes about a minute for it, and its "
        "predictive was found equally fast with every backend).",
        "",
    ]
    for side, info in probes.items():
        if isinstance(info, str):
            header.append(f"- {side}: cannot be imported: {info}")
        else:
            header.append(
                f"- {side}: {info['laplace']} (`{info['path']}`), torch "
                f"{info['torch']}, Python {info['python']}"
            )
    if lt_note:
        header.append(f"- {lt_note}")
    header.append("")
    table = report(results, header, any(k.endswith("|" + LT) for k in results))
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        f.write(table)
    with open(raw_path, "w") as f:
        raw = {
            "quick": args.quick,
            "commit": checkout(),
            "probes": probes,
            "results": {k: m.__dict__ for k, m in results.items()},
        }
        json.dump(raw, f, indent=1)


def load_raw(path: str, quick: bool) -> dict | None:
    """The raw results of an earlier run of the same size, if there is one."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return None
    return raw if raw.get("quick") == quick else None


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker()
    elif "--probe" in sys.argv:
        probe()
    else:
        main()
