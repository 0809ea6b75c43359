"""Time and peak memory of last-layer Laplace, this library against laplace-torch.

The same workload functions, written against the public laplace-torch 0.3 API that
both libraries share (``Laplace(model, "classification",
subset_of_weights="last_layer", hessian_structure=...)``, ``.fit``, the glm
predictive), run once with this library (this interpreter, the repository's
``laplace``) and once with laplace-torch (the interpreter of another virtual
environment: ``--lt-python``, else ``$LAPLACE_TORCH_PYTHON``, else
``.lt-venv/bin/python``), each measurement in a fresh process (see
``_measure.py``). Classification on random data with a randomly initialized MLP
64-512-C, so that the last layer sees a 512-wide penultimate layer (fixed seeds: both
sides see the same model and data):

1. ``fit``: ``Laplace(...).fit(loader)`` on 1,000 samples, Kron and Diag with 100
   classes (51,300 last-layer weights) and Full with 10 classes (5,130), with each
   backend;
2. ``predictive``: one glm/probit call on 100 inputs, Kron and Diag with 100 classes
   and Full with 10; and Kron with 3,000 classes (1,539,000 last-layer weights) on
   32 inputs, where laplace-torch's Jacobians alone would take 18 GB an input. The
   memory is what the call adds to the fitted Laplace; each timed run starts on a
   freshly fitted Laplace (the fit is not timed), so that work deferred from the fit
   to the first use is timed and nothing cached by an earlier run is reused.

Every worker runs under an address-space limit (``RLIMIT_AS``, ``--memory-limit-gb``
above what the worker has mapped once its libraries are imported): an allocation
beyond it fails in that worker, which is reported as "out of memory" instead of
taking the machine down; a worker that outlives ``--timeout`` is reported as
"timeout".

What laplace-torch 0.3 was seen to take here (2 cores): the Diag fit with its default
backend (Curvlinops) ~4.5 minutes and ~8 GB for 1,000 samples (so it is measured
only with ``--lt-diag-default``; BackPACK takes ~2 s), the Kron fit with 3,000
classes ~1.5 minutes and 3 GB for 32 samples (for 1,000, over 10 minutes with every
backend, and 10-15 GB with Curvlinops and BackPACK; hence the 32 samples of the
set-up fit there), the Kron
predictive with 100 classes ~0.2 s and ~80 MB an input (2 threads).

    python benchmarks/lllaplace_benchmark.py               # the full run (~10 min)
    python benchmarks/lllaplace_benchmark.py --quick       # a smoke run, less data
    python benchmarks/lllaplace_benchmark.py --ours-only   # without laplace-torch
    python benchmarks/lllaplace_benchmark.py --reuse-lt    # laplace-torch's figures
                                            # from the last run, ours measured anew

The tables, with the targets of the issue checked and the two libraries' results
compared, are printed and written to ``benchmarks/output/lllaplace.md`` (or
``--output``), the raw figures beside it (``lllaplace.json``, which also keeps
laplace-torch's predictive probabilities, to compare against with ``--reuse-lt``).
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass

SCRIPT = os.path.abspath(__file__)
sys.path.insert(0, os.path.dirname(SCRIPT))
from _comparison import (  # noqa: E402
    add_memory_limit,
    command,
    dump,
    failure,
    fmt_memory_ratio,
    in_phase,
    library_lines,
    max_abs_diff,
    measure,
    memory_ratio,
    rel_diff,
    save,
    seconds,
    start,
    verdict,
    worker,
    worker_arguments,
)
from _measure import Measurement, Timed  # noqa: E402
from laplace_benchmark import (  # noqa: E402
    LT,
    OURS,
    checkout,
    common_arguments,
    fmt_ratio,
    mb,
    ok,
    speed_up,
)

QUICK = "--quick" in sys.argv
BATCH = 128
IN_FEATURES, WIDTH = 64, 512
N_DATA = 256 if QUICK else 1000
#: samples of the set-up fit of the 3,000-class predictive: laplace-torch's Kron fit
#: there takes ~1.5 minutes for 32 (and over 10 for 1,000); the predictive's cost
#: does not depend on them
N_DATA_WIDE = 32
#: inputs of the predictive call, by number of classes
N_PREDICT = {10: 10, 100: 10, 3000: 8} if QUICK else {10: 100, 100: 100, 3000: 32}
WIDE = 3000
DEFAULT_MEMORY_LIMIT_GB = 12.0
#: the speed-up of the predictive at 100 classes, and the memory ratio
PREDICTIVE_SPEED_UP, PREDICTIVE_MEMORY_RATIO = 100.0, 20.0
#: laplace-torch "takes minutes" where it takes at least this long
MINUTES_S = 60.0
#: both libraries agree where the probabilities differ by at most this
AGREE_ATOL = 1e-4


# -- model and data ------------------------------------------------------------------
def build(classes: int):
    from torch import manual_seed, nn

    manual_seed(0)
    return nn.Sequential(
        nn.Linear(IN_FEATURES, WIDTH), nn.ReLU(), nn.Linear(WIDTH, classes)
    )


def data(classes: int, n: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN_FEATURES, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def loader(classes: int, n: int, seed: int = 0):
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(*data(classes, n, seed)), batch_size=BATCH)


# -- the workloads (the same code for both libraries) -------------------------------
@dataclass(frozen=True)
class Case:
    group: str  # fit | predictive
    classes: int
    structure: str
    #: a class of ``laplace.curvature``; None is the library's default
    backend: str | None = None

    def key(self, side: str) -> str:
        backend = self.backend or "default"
        return f"{self.group}|C{self.classes}|{self.structure}|{backend}|{side}"

    @property
    def n_data(self) -> int:
        return N_DATA_WIDE if self.classes == WIDE else N_DATA

    @property
    def n_predict(self) -> int:
        return N_PREDICT[self.classes]


def laplace_of(case: Case, model):
    from laplace import Laplace

    kwargs = {}
    if case.backend is not None:
        import laplace.curvature

        kwargs["backend"] = getattr(laplace.curvature, case.backend)
    return Laplace(
        model,
        "classification",
        subset_of_weights="last_layer",
        hessian_structure=case.structure,
        **kwargs,
    )


def fit_workload(case: Case):
    template = build(case.classes)
    train = loader(case.classes, case.n_data)
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
        la = last["la"]
        values = {"log marglik": la.log_marginal_likelihood().item()}
        values["log det posterior precision"] = la.log_det_posterior_precision.item()
        dump(values)
        return ", ".join(f"{k} {v:.6g}" for k, v in values.items())

    return Timed(
        in_phase("fit", lambda: fit(train)),
        in_phase("warm-up (a fit on one batch)", warm_up),
        summary,
    )


def predictive_workload(case: Case):
    import gc

    train = loader(case.classes, case.n_data)
    x = data(case.classes, case.n_predict, seed=1)[0]
    state = {}

    def before_each():
        state["la"] = state["p"] = None  # free the last ones first
        gc.collect()
        la = laplace_of(case, build(case.classes))
        la.fit(train)
        state["la"] = la

    def run():
        state["p"] = state["la"](x, pred_type="glm", link_approx="probit")

    def warm_up():
        state["la"](x[:2], pred_type="glm", link_approx="probit")

    def summary():
        p = state["p"]
        dump({"probs": p})
        return f"mean max prob {p.amax(-1).mean().item():.6g}, p[0,0] {p[0, 0]:.6g}"

    return Timed(
        in_phase("run", run),
        in_phase("warm-up (2 inputs)", warm_up),
        summary,
        in_phase(f"set-up fit on {case.n_data} samples", before_each),
    )


MAKE = {"fit": fit_workload, "predictive": predictive_workload}

#: The fits of the predictive workloads are set-up, not timed. Diag uses BackPACK
#: there on both sides: laplace-torch's default (Curvlinops) takes minutes for it,
#: and the backend does not change the timed part.
SETUP_BACKEND = {"kron": None, "diag": "BackPackGGN", "full": None}
FIT_CASES = [
    Case("fit", classes, structure, backend)
    for classes, structure in ((100, "kron"), (100, "diag"), (10, "full"))
    for backend in (None, "BackPackGGN", "AsdlGGN")
]
PREDICTIVE_CASES = [
    Case("predictive", classes, s, SETUP_BACKEND[s])
    for classes, s in ((100, "kron"), (100, "diag"), (10, "full"), (WIDE, "kron"))
]
CASES = [*FIT_CASES, *PREDICTIVE_CASES]
#: measured for laplace-torch only with ``--lt-diag-default`` (minutes and ~8 GB)
LT_SLOW = Case("fit", 100, "diag").key(LT)


def workloads() -> dict:
    return {
        case.key(side): (lambda c=case: MAKE[c.group](c))
        for case in CASES
        for side in (OURS, LT)
    }


# -- the report ----------------------------------------------------------------------
class Report:
    def __init__(self, results: dict[str, Measurement], outputs: dict[str, dict]):
        self.results = results
        self.outputs = outputs
        self.lines: list[str] = []

    def get(self, case: Case, side: str) -> Measurement | None:
        return self.results.get(case.key(side))

    def measured(self, cases) -> list[Case]:
        return [c for c in cases if self.get(c, OURS) or self.get(c, LT)]

    def fits(self) -> None:
        cases = self.measured(FIT_CASES)
        if not cases:
            return
        self.lines += [
            f"### Fit: `Laplace(...)` and `.fit` on {N_DATA} samples",
            "",
            "| classes | structure | backend | ours (s) | laplace-torch (s) | speed-up "
            "| ours MB | laplace-torch MB | memory ratio |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in cases:
            ours, lt = self.get(c, OURS), self.get(c, LT)
            backend = c.backend or "default"
            self.lines.append(
                f"| {c.classes} | {c.structure} | {backend} | {seconds(ours)} | "
                f"{seconds(lt)} | {fmt_ratio(speed_up(ours, lt))} | {mb(ours)} | "
                f"{mb(lt)} | {fmt_memory_ratio(ours, lt)} |"
            )
        self.lines.append("")
        self.lines += [
            "`default`: NativeGGN in this library, CurvlinopsGGN in laplace-torch.",
            "",
        ]
        for structure in ("kron", "diag", "full"):
            default = next(
                (c for c in cases if c.structure == structure and not c.backend), None
            )
            if default is None:
                continue
            lts = [
                (c.backend or "CurvlinopsGGN", self.get(c, LT))
                for c in cases
                if c.structure == structure and ok(self.get(c, LT))
            ]
            if not lts:
                continue
            name, fastest = min(lts, key=lambda t: t[1].seconds)
            r = speed_up(self.get(default, OURS), fastest)
            r_default = speed_up(self.get(default, OURS), self.get(default, LT))
            against_default = (
                f" (against laplace-torch's default: {fmt_ratio(r_default)})"
                if r_default is not None and name != "CurvlinopsGGN"
                else ""
            )
            self.lines.append(
                f"- Target: {structure.capitalize()} fit ({default.classes} classes), "
                "our default backend at least as fast as laplace-torch's fastest "
                f"backend ({name}, {fastest.seconds:.3g} s): {fmt_ratio(r)}, "
                f"{verdict(None if r is None else r >= 1)}{against_default}."
            )
        self.lines.append("")

    def predictives(self) -> None:
        cases = self.measured(PREDICTIVE_CASES)
        if not cases:
            return
        self.lines += [
            "### glm predictive, probit link, one call",
            "",
            "| classes | structure | inputs | fit backend | ours (s) "
            "| laplace-torch (s) | speed-up | ours MB | laplace-torch MB "
            "| memory ratio |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in cases:
            ours, lt = self.get(c, OURS), self.get(c, LT)
            self.lines.append(
                f"| {c.classes} | {c.structure} | {c.n_predict} | "
                f"{c.backend or 'default'} | {seconds(ours)} | {seconds(lt)} | "
                f"{fmt_ratio(speed_up(ours, lt))} | {mb(ours)} | {mb(lt)} | "
                f"{fmt_memory_ratio(ours, lt)} |"
            )
        self.lines.append("")
        for c in cases:
            ours, lt = self.get(c, OURS), self.get(c, LT)
            if c.classes == 100:
                r, mr = speed_up(ours, lt), memory_ratio(ours, lt)
                self.lines.append(
                    f"- Target: {c.structure.capitalize()} predictive at 100 classes "
                    f"at least {PREDICTIVE_SPEED_UP:g}× faster: {fmt_ratio(r)}, "
                    f"{verdict(None if r is None else r >= PREDICTIVE_SPEED_UP)}; "
                    f"at most 1/{PREDICTIVE_MEMORY_RATIO:g} of the peak memory "
                    f"(memory ratio at least {PREDICTIVE_MEMORY_RATIO:g}×): "
                    f"{fmt_memory_ratio(ours, lt)}, "
                    f"{verdict(None if mr is None else mr >= PREDICTIVE_MEMORY_RATIO)}."
                )
            elif c.classes == WIDE:
                self.lines.append(self.wide_target(c, ours, lt))
        if self.lines[-1]:
            self.lines.append("")

    @staticmethod
    def wide_target(c: Case, ours, lt) -> str:
        if ok(ours):
            us = f"ours runs ({ours.seconds:.3g} s, {mb(ours)} MB)"
        elif ours is None:
            us = "ours not measured"
        else:
            us = f"ours: {failure(ours)}"
        if lt is None:
            them, lt_fails = "laplace-torch not measured", None
        elif ok(lt):
            them = f"laplace-torch takes {lt.seconds:.3g} s"
            lt_fails = lt.seconds >= MINUTES_S
        else:
            them, lt_fails = f"laplace-torch: {failure(lt)}", True
        met = None if lt_fails is None or ours is None else ok(ours) and lt_fails
        return (
            f"- Target: Kron predictive at {c.classes:,} classes ({c.n_predict} "
            "inputs) runs for us, while laplace-torch runs out of memory or takes "
            f"minutes: {us}, {them}; {verdict(met)}."
        )

    def agreement(self) -> None:
        rows, worst = [], None
        for c in CASES:
            ours, lt = self.get(c, OURS), self.get(c, LT)
            if not ((ours and ours.note) or (lt and lt.note)):
                continue
            a, b = self.outputs.get(c.key(OURS)), self.outputs.get(c.key(LT))
            if c.group == "predictive":
                d = max_abs_diff(a and a.get("probs"), b and b.get("probs"))
                if d is not None:
                    worst = d if worst is None else max(worst, d)
                diff = "–" if d is None else f"max \\|Δp\\| {d:.2g}"
            else:
                d = rel_diff(a and a.get("log marglik"), b and b.get("log marglik"))
                diff = "–" if d is None else f"log marglik rel. diff. {d:.2g}"
            rows.append(
                f"| {c.group} | {c.classes} | {c.structure} | "
                f"{c.backend or 'default'} | {(ours and ours.note) or '–'} | "
                f"{(lt and lt.note) or '–'} | {diff} |"
            )
        if not rows:
            return
        self.lines += [
            "### Results of the last run, to compare (same model, data, seed)",
            "",
            "| workload | classes | structure | backend | ours | laplace-torch "
            "| difference |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
        if worst is not None:
            self.lines += [
                "- Check: the predictive probabilities of both libraries agree "
                f"within {AGREE_ATOL:g} (max \\|Δp\\| {worst:.2g}): "
                f"{verdict(worst <= AGREE_ATOL)}.",
                "",
            ]

    def errors(self) -> None:
        errors = [
            f"- `{m.name}`: {m.error}"
            for c in CASES
            for m in (self.get(c, OURS), self.get(c, LT))
            if m is not None and m.error
        ]
        if errors:
            self.lines += ["### Errors", "", *errors, ""]


def report(results, outputs, header: list[str]) -> str:
    rep = Report(results, outputs)
    rep.lines += header
    rep.fits()
    rep.predictives()
    rep.agreement()
    rep.errors()
    return "\n".join(rep.lines).rstrip() + "\n"


def main() -> None:
    parser = common_arguments(__doc__.splitlines()[0], "lllaplace.md")
    parser.add_argument(
        "--lt-diag-default",
        action="store_true",
        help="also time laplace-torch's Diag fit with its default backend (minutes, "
        "~8 GB)",
    )
    add_memory_limit(parser, DEFAULT_MEMORY_LIMIT_GB)
    args = parser.parse_args()
    timeout = args.timeout or (300.0 if args.quick else 900.0)
    repeats, budget = (3, 10.0) if args.quick else (10, 20.0)

    raw_path = os.path.splitext(args.output)[0] + ".json"
    sides = start(args, raw_path)
    names = [
        case.key(side)
        for case in CASES
        for side in sides.pythons
        if args.only in case.key(side)
        and case.key(side) not in sides.results
        and (case.key(side) != LT_SLOW or args.lt_diag_default)
    ]
    extra = worker_arguments(args, repeats, budget)
    measure(SCRIPT, names, sides, extra, timeout, args.rounds)

    header = [
        "## Last-layer Laplace: laplace (ours) against laplace-torch",
        "",
        f"Command: `{command(SCRIPT)}`, at commit {checkout()}.",
        "",
        "Classification on random data with the MLP "
        f"{IN_FEATURES}-{WIDTH}-C (a {WIDTH}-wide penultimate layer, C classes), "
        f'`subset_of_weights="last_layer"`, batches of {BATCH}, {args.threads} '
        "torch threads. Each measurement runs in a fresh process: after set-up and "
        f"a warm-up, the best time of up to {repeats} runs (no further run once the "
        f"runs took {budget:g} s)"
        + (f", best of {args.rounds} interleaved rounds" if args.rounds > 1 else "")
        + "; memory is the peak resident memory a run adds to the set-up, in MB. "
        "Speed-up and memory ratio are laplace-torch / ours. The predictive times "
        "each run on a freshly fitted Laplace (the fit not timed; on "
        f"{N_DATA} samples, {N_DATA_WIDE} at {WIDE:,} classes), with the default "
        "backend but BackPackGGN for Diag on both sides (laplace-torch's default "
        "takes minutes for it). Each worker may map at most "
        f"{args.memory_limit_gb:g} GB beyond its imported libraries (`RLIMIT_AS`) "
        f"and run {timeout:.0f} s; beyond, it is reported as out of memory or "
        "timeout.",
        "",
        *library_lines(sides),
    ]
    if LT in sides.pythons and LT_SLOW not in sides.results:
        header.append(
            "- laplace-torch's Diag fit with its default backend not timed (it "
            "takes minutes and ~8 GB; `--lt-diag-default` times it)."
        )
    header.append("")
    table = report(sides.results, sides.outputs, header)
    # with laplace-torch's dumped results, to compare ours against with --reuse-lt
    save(table, args.output, raw_path, args.quick, sides)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker(workloads)
    else:
        main()
