"""Time and peak memory of subnetwork Laplace and of marginal-likelihood training,
this library against laplace-torch.

The same workload functions, written against the public laplace-torch 0.3 API that
both libraries share, run with this library (this interpreter, the repository's
``laplace``) and with laplace-torch (the interpreter of another virtual environment:
``--lt-python``, else ``$LAPLACE_TORCH_PYTHON``, else ``.lt-venv/bin/python``),
each measurement in a fresh process (see ``_measure.py``). 10-class classification on
1,000 random samples in batches of 128 with the randomly initialized MLP
784-256-256-10 of ``laplace_benchmark.py`` (P = 269,322 weights; fixed seeds: both
sides see the same model and data):

1. subnetwork Laplace, ``Laplace(model, "classification",
   subset_of_weights="subnetwork", hessian_structure="full",
   subnetwork_indices=idx)`` over S = 1,000 and 5,000 weights drawn at random
   (``torch.randperm(P, generator=torch.Generator().manual_seed(0))[:S]``, the same
   on both sides):

   - ``fit``: ``Laplace(...)`` and ``.fit(loader)``;
   - ``predictive``: one glm/probit call on 100 inputs; each timed run starts on a
     freshly fitted Laplace (the fit, with the same backend, is not timed), so that
     work deferred from the fit to the first use is timed and nothing cached by an
     earlier run is reused; the memory is what the call adds to the fitted Laplace;

2. ``marglik``: ``marglik_training(model, loader, likelihood="classification",
   hessian_structure=..., n_epochs=5)`` (all weights, the other arguments at their
   defaults), Kron and Diag, the whole call on a fresh model; memory is its peak.

Ours runs with its default backends (NativeGGN, its curvature engine, for ``Laplace``;
AsdlGGN for ``marglik_training``, as laplace-torch's spec, computed with ASDL) and,
for ``marglik_training``, also with ``backend=NativeGGN``; laplace-torch with its
default (CurvlinopsGGN for ``Laplace``, AsdlGGN for ``marglik_training``) and its
other backends, so that ours is compared with its fastest: what it was seen to take
here (2 cores): the subnetwork fit at S = 5,000 ~60 s and 4 GB with its default, ~40 s
with BackPackGGN and ~30 s with AsdlGGN (whose predictive maps another ~2 GB);
``marglik_training`` 1.5 s with its default (AsdlGGN), Kron ~11 s with Curvlinops or
BackPack, Diag ~1 s with BackPack and ~6.5 minutes and ~5 GB with Curvlinops (so that
one is measured only with ``--lt-slow``).

Every worker runs under an address-space limit (``RLIMIT_AS``, ``--memory-limit-gb``
above what the worker has mapped once its libraries are imported): an allocation
beyond it fails in that worker, which is reported as "out of memory" instead of
taking the machine down; a worker that outlives ``--timeout`` is reported as
"timeout".

    python benchmarks/subnet_benchmark.py               # the full run (~15 min)
    python benchmarks/subnet_benchmark.py --quick       # a smoke run, less data
    python benchmarks/subnet_benchmark.py --ours-only   # without laplace-torch
    python benchmarks/subnet_benchmark.py --reuse-lt    # laplace-torch's figures
                                            # from the last run, ours measured anew

The tables, with the targets checked and the two libraries' results compared, are
printed and written to ``benchmarks/output/subnet.md`` (or ``--output``), the raw
figures beside it (``subnet.json``, which also keeps laplace-torch's results, to
compare against with ``--reuse-lt``).
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
    error_lines,
    failure,
    fastest,
    fmt_memory_ratio,
    in_phase,
    library_lines,
    max_abs_diff,
    max_rel_diff,
    measure,
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
    BATCH,
    BIG,
    LT,
    OURS,
    build,
    checkout,
    common_arguments,
    data,
    fmt_ratio,
    loader,
    ok,
    speed_up,
)

QUICK = "--quick" in sys.argv
#: the MLP 784-256-256-10 of ``laplace_benchmark.build(BIG)``
LAYERS = (784, 256, 256, 10)
CLASSES = LAYERS[-1]
N_PARAMS = sum((n_in + 1) * n_out for n_in, n_out in zip(LAYERS, LAYERS[1:]))
N_DATA = 256 if QUICK else 1000
#: the sizes S of the subnetwork
SUBNETS = (200, 1000) if QUICK else (1000, 5000)
N_PREDICT = 50 if QUICK else 100
N_EPOCHS = 2 if QUICK else 5
MARGLIK_STRUCTURES = ("kron", "diag")
DEFAULT_MEMORY_LIMIT_GB = 14.0
#: what each library's default backend is (``Laplace``, ``marglik_training``)
DEFAULT_BACKEND = {
    "laplace": {OURS: "NativeGGN", LT: "CurvlinopsGGN"},
    "marglik": {OURS: "AsdlGGN", LT: "AsdlGGN"},
}
#: our backends besides our default, measured to show what they cost: marglik_training
#: keeps laplace-torch's default (AsdlGGN, computed with ASDL); NativeGGN is the engine
OUR_BACKENDS = {"laplace": (), "marglik": ("NativeGGN",)}
#: laplace-torch's backends besides its default, measured to find its fastest
LT_BACKENDS = {
    "laplace": ("BackPackGGN", "AsdlGGN"),
    "marglik": ("CurvlinopsGGN", "BackPackGGN"),
}
#: the memory target of the subnetwork fit: our peak at most this multiple of the
#: dense S x S matrix and a batch of per-example vectors over S, plus this many MB
MEMORY_FACTOR, MEMORY_CONSTANT_MB = 4.0, 300.0
#: the check that both libraries' subnetwork predictives agree
AGREE_ATOL = 1e-4
MIB = 2**20


# -- the workloads (the same code for both libraries) -------------------------------
@dataclass(frozen=True)
class Case:
    group: str  # fit | predictive | marglik
    #: the size S of the subnetwork (fit, predictive); 0 for marglik
    subnet: int = 0
    #: the Hessian structure (marglik; the subnetwork's is full)
    structure: str = "full"
    #: a class of ``laplace.curvature``; None is the library's default
    backend: str | None = None

    def key(self, side: str) -> str:
        what = f"S{self.subnet}" if self.subnet else self.structure
        return f"{self.group}|{what}|{self.backend or 'default'}|{side}"

    @property
    def api(self) -> str:
        return "marglik" if self.group == "marglik" else "laplace"

    @property
    def sides(self) -> tuple[str, ...]:
        """Both sides run their defaults; ours its other backends of
        ``OUR_BACKENDS``, laplace-torch those of ``LT_BACKENDS``."""
        if self.backend is None:
            return (OURS, LT)
        return (OURS,) if self.backend in OUR_BACKENDS[self.api] else (LT,)

    def backend_label(self, side: str) -> str:
        if self.backend is not None:
            return self.backend
        return f"default ({DEFAULT_BACKEND[self.api][side]})"


def backend_kwargs(backend: str | None) -> dict:
    if backend is None:
        return {}
    import laplace.curvature

    return {"backend": getattr(laplace.curvature, backend)}


def subnetwork_indices(subnet: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randperm(N_PARAMS, generator=g)[:subnet]


def laplace_of(case: Case, model, indices):
    from laplace import Laplace

    n_params = sum(p.numel() for p in model.parameters())
    if n_params != N_PARAMS:
        raise RuntimeError(f"the model has {n_params} weights, not {N_PARAMS}")
    return Laplace(
        model,
        "classification",
        subset_of_weights="subnetwork",
        hessian_structure="full",
        subnetwork_indices=indices,
        **backend_kwargs(case.backend),
    )


def backend_name(la) -> str:
    return type(la.backend).__name__


def fit_workload(case: Case):
    from torch.utils.data import DataLoader, TensorDataset

    template = build(BIG)
    indices = subnetwork_indices(case.subnet)
    train = loader(BIG, N_DATA)
    one_batch = DataLoader(TensorDataset(*next(iter(train))), batch_size=BATCH)
    last = {}

    def fit(batches):
        # a fresh copy each time: BackPACK and ASDL hook into the model they see
        la = laplace_of(case, copy.deepcopy(template), indices)
        la.fit(batches)
        last["la"] = la

    def summary():
        la = last["la"]
        values = {"log marglik": la.log_marginal_likelihood().item()}
        dump({**values, "backend": backend_name(la)})
        return f"log marglik {values['log marglik']:.6g} ({backend_name(la)})"

    return Timed(
        in_phase("fit", lambda: fit(train)),
        in_phase("warm-up (a fit on one batch)", lambda: fit(one_batch)),
        summary,
    )


def predictive_workload(case: Case):
    import gc

    indices = subnetwork_indices(case.subnet)
    train = loader(BIG, N_DATA)
    x = data(BIG, N_PREDICT, seed=1)[0]
    state = {}

    def before_each():
        state["la"] = state["p"] = None  # free the last ones first
        gc.collect()
        la = laplace_of(case, build(BIG), indices)
        la.fit(train)
        state["la"] = la

    def run():
        state["p"] = state["la"](x, pred_type="glm", link_approx="probit")

    def warm_up():
        state["la"](x[:2], pred_type="glm", link_approx="probit")

    def summary():
        p = state["p"]
        dump({"probs": p, "backend": backend_name(state["la"])})
        return f"mean max prob {p.amax(-1).mean().item():.6g}, p[0,0] {p[0, 0]:.6g}"

    return Timed(
        in_phase("run", run),
        in_phase("warm-up (2 inputs)", warm_up),
        summary,
        in_phase(f"set-up fit on {N_DATA} samples", before_each),
    )


def marglik_workload(case: Case):
    import gc

    from torch.utils.data import DataLoader, TensorDataset

    from laplace.marglik_training import marglik_training

    train = loader(BIG, N_DATA)
    one_batch = DataLoader(TensorDataset(*next(iter(train))), batch_size=BATCH)
    state = {}

    def before_each():
        state.clear()  # free the last model and Laplace first
        gc.collect()
        state["model"] = build(BIG)

    def train_(batches, n_epochs):
        state["out"] = marglik_training(
            state["model"],
            batches,
            likelihood="classification",
            hessian_structure=case.structure,
            n_epochs=n_epochs,
            **backend_kwargs(case.backend),
        )

    def summary():
        la, _, margliks, losses = state["out"]
        values = {
            "prior precision": la.prior_precision.flatten(),
            "marglik": float(margliks[-1]) if len(margliks) else None,
            "loss": float(losses[-1]) if len(losses) else None,
            "backend": backend_name(la),
        }
        dump(values)
        p0 = values["prior precision"]
        return (
            f"prior precision {p0.min().item():.4g}-{p0.max().item():.4g} "
            f"({p0.numel()} values), last marglik {values['marglik']:.6g}, last loss "
            f"{values['loss']:.6g} ({values['backend']})"
        )

    return Timed(
        in_phase("marglik_training", lambda: train_(train, N_EPOCHS)),
        in_phase("warm-up (1 epoch on one batch)", lambda: train_(one_batch, 1)),
        summary,
        before_each,
    )


MAKE = {
    "fit": fit_workload,
    "predictive": predictive_workload,
    "marglik": marglik_workload,
}

SUBNET_CASES = [
    Case(group, subnet=subnet, backend=backend)
    for group in ("fit", "predictive")
    for subnet in SUBNETS
    for backend in (None, *LT_BACKENDS["laplace"])
]
MARGLIK_CASES = [
    Case("marglik", structure=structure, backend=backend)
    for structure in MARGLIK_STRUCTURES
    for backend in (None, *OUR_BACKENDS["marglik"], *LT_BACKENDS["marglik"])
]
CASES = [*SUBNET_CASES, *MARGLIK_CASES]
#: measured only with ``--lt-slow`` (~6.5 minutes and ~5 GB)
LT_SLOW = Case("marglik", structure="diag", backend="CurvlinopsGGN").key(LT)


def workloads() -> dict:
    return {
        case.key(side): (lambda c=case: MAKE[c.group](c))
        for case in CASES
        for side in case.sides
    }


# -- the report ----------------------------------------------------------------------
def dense_mb(subnet: int) -> float:
    """The dense S x S float32 matrix."""
    return subnet**2 * 4 / MIB


def vectors_mb(subnet: int) -> float:
    """A batch of per-example vectors over S: C - 1 float32 columns an example."""
    return BATCH * (CLASSES - 1) * subnet * 4 / MIB


def bound_mb(subnet: int) -> float:
    return MEMORY_FACTOR * (dense_mb(subnet) + vectors_mb(subnet)) + MEMORY_CONSTANT_MB


def fmt_mb(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


class Report:
    def __init__(self, results: dict[str, Measurement], outputs: dict[str, dict]):
        self.results, self.outputs = results, outputs
        self.lines: list[str] = []

    def get(self, case: Case, side: str) -> Measurement | None:
        return self.results.get(case.key(side))

    @staticmethod
    def row_order(api: str) -> list[tuple[str | None, str]]:
        """(backend, side) of the rows of a workload: ours (its default backend, then
        its others), then laplace-torch's default and its other backends."""
        return [
            (None, OURS),
            *((b, OURS) for b in OUR_BACKENDS[api]),
            (None, LT),
            *((b, LT) for b in LT_BACKENDS[api]),
        ]

    def has(self, case: Case, side: str) -> bool:
        return case.key(side) in self.results

    def target(self, what: str, default: Case, cases: list[Case]) -> str | None:
        """Ours (``default``) at least as fast as laplace-torch's default and as its
        fastest backend (of ``cases``, the same workload with other backends)."""
        ours, lt = self.get(default, OURS), self.get(default, LT)
        if ours is None or lt is None:
            return None

        def against(label: str, m: Measurement) -> str:
            r = speed_up(ours, m)
            met = False if not ok(ours) else None if r is None else r >= 1
            shown = f"{m.seconds:.3g} s" if ok(m) else seconds(m)
            return f"({label}, {shown}): {fmt_ratio(r)}, {verdict(met)}"

        line = (
            f"- Target: {what}: ours at least as fast as laplace-torch's default "
            + against(DEFAULT_BACKEND[default.api][LT], lt)
        )
        others = [
            (c.backend, self.get(c, LT))
            for c in cases
            if c.backend
            and self.has(c, LT)
            and (c.group, c.subnet, c.structure)
            == (default.group, default.subnet, default.structure)
        ]
        best = fastest([(DEFAULT_BACKEND[default.api][LT], lt), *others])
        if best is not None and best[1] is not lt:
            line += "; as its fastest backend " + against(*best)
        elif best is not None and any(ok(m) for _, m in others):
            line += "; its default is its fastest backend"
        failed = [f"{name}: {failure(m)}" for name, m in others if not ok(m)]
        if failed:
            line += f" (laplace-torch's {', '.join(failed)})"
        return line + "."

    def subnetworks(self) -> None:
        rows = [
            (subnet, backend, side)
            for subnet in SUBNETS
            for backend, side in self.row_order("laplace")
            if any(
                self.has(Case(group, subnet=subnet, backend=backend), side)
                for group in ("fit", "predictive")
            )
        ]
        if not rows:
            return
        self.lines += [
            f"### Subnetwork Laplace (full over S weights): `Laplace(...)` and `.fit` "
            f"on {N_DATA:,} samples; one glm probit predictive on {N_PREDICT} inputs",
            "",
            "| S | library | backend | fit (s) | speed-up | fit MB | memory ratio "
            "| predictive (s) | speed-up | predictive MB | memory ratio |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for subnet, backend, side in rows:
            cells = [f"{subnet:,}", side]
            for group in ("fit", "predictive"):
                c = Case(group, subnet=subnet, backend=backend)
                if group == "fit":
                    cells.append(c.backend_label(side))
                cells += self.cells(
                    self.get(c, side), self.get(Case(group, subnet=subnet), OURS), side
                )
            self.lines.append("| " + " | ".join(cells) + " |")
        self.targets(
            self.target(f"subnetwork {c.group}, S = {c.subnet:,}", c, SUBNET_CASES)
            for c in SUBNET_CASES
            if c.backend is None
        )

    def targets(self, lines) -> None:
        """End a table with its note and the target lines (None: not compared)."""
        self.lines += [
            "",
            "Speed-up and memory ratio: laplace-torch / ours (our default backend).",
            "",
        ]
        targets = [line for line in lines if line]
        if targets:
            self.lines += [*targets, ""]

    @staticmethod
    def cells(m: Measurement | None, ours: Measurement | None, side: str) -> list[str]:
        peak = fmt_mb(max(m.peak_mb, 0.0) if ok(m) and m.peak_mb is not None else None)
        if side == OURS:
            return [seconds(m), "", peak, ""]
        r = speed_up(ours, m)
        return [seconds(m), fmt_ratio(r), peak, fmt_memory_ratio(ours, m)]

    def memory(self) -> None:
        subnets = [
            s for s in SUBNETS if Case("fit", subnet=s).key(OURS) in self.results
        ]
        if not subnets:
            return
        p2 = N_PARAMS**2 * 4
        self.lines += [
            "### Memory of the subnetwork fit against the subnetwork's size",
            "",
            f"Dense S×S: S² float32 entries; per-batch vectors: {BATCH} × "
            f"{CLASSES - 1} × S float32 entries (the rank C - 1 factors of a batch, "
            f"over S); bound: {MEMORY_FACTOR:g} × (dense S×S + per-batch vectors) + "
            f"{MEMORY_CONSTANT_MB:g} MB; for scale, the dense matrix over all P = "
            f"{N_PARAMS:,} weights, P² float32 entries, takes {p2 / 1e9:,.0f} GB "
            f"({p2 / MIB:,.0f} MB). MB: 2²⁰ bytes.",
            "",
            "| S | dense S×S MB | per-batch vectors MB | bound MB | ours peak MB "
            "| laplace-torch peak MB (default) |",
            "|---|---|---|---|---|---|",
        ]
        within = []
        for subnet in subnets:
            ours = self.get(Case("fit", subnet=subnet), OURS)
            lt = self.get(Case("fit", subnet=subnet), LT)
            peak = ours.peak_mb if ok(ours) else None
            within.append(
                False
                if not ok(ours)
                else None
                if peak is None
                else peak <= bound_mb(subnet)
            )
            self.lines.append(
                f"| {subnet:,} | {fmt_mb(dense_mb(subnet))} | "
                f"{fmt_mb(vectors_mb(subnet))} | {fmt_mb(bound_mb(subnet))} | "
                f"{fmt_mb(peak)} | {fmt_mb(lt.peak_mb if ok(lt) else None)} |"
            )
        over = [f"S = {s:,}" for s, w in zip(subnets, within) if w is False]
        result = False if over else None if None in within else True
        self.lines += [
            "",
            "- Target: our subnetwork fit's peak bounded by the subnetwork's size, at "
            f"most {MEMORY_FACTOR:g} × (dense S×S + per-batch vectors) + "
            f"{MEMORY_CONSTANT_MB:g} MB at every S: {verdict(result)}"
            + (f" ({', '.join(over)})" if over else "")
            + ".",
            "",
        ]

    def margliks(self) -> None:
        cases = [
            c for c in MARGLIK_CASES if any(c.key(s) in self.results for s in c.sides)
        ]
        if not cases:
            return
        self.lines += [
            f"### `marglik_training`, {N_EPOCHS} epochs on {N_DATA:,} samples (all "
            "weights, layerwise prior), the whole call",
            "",
            "| structure | library | backend | time (s) | speed-up | peak MB "
            "| memory ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for structure in MARGLIK_STRUCTURES:
            ours = self.get(Case("marglik", structure=structure), OURS)
            for backend, side in self.row_order("marglik"):
                c = Case("marglik", structure=structure, backend=backend)
                if not self.has(c, side):
                    continue
                m = self.get(c, side)
                cells = [structure, side, c.backend_label(side)]
                cells += self.cells(m, ours, side)
                self.lines.append("| " + " | ".join(cells) + " |")
        self.targets(
            self.target(
                f"`marglik_training`, {structure.capitalize()}",
                Case("marglik", structure=structure),
                MARGLIK_CASES,
            )
            for structure in MARGLIK_STRUCTURES
        )
        for structure in MARGLIK_STRUCTURES:
            default = self.get(Case("marglik", structure=structure), OURS)
            for backend in OUR_BACKENDS["marglik"]:
                case = Case("marglik", structure=structure, backend=backend)
                m = self.get(case, OURS)
                if ok(m) and ok(default):
                    self.lines.append(
                        f"- Ours, {structure.capitalize()}, `backend={backend}`: "
                        f"{m.seconds:.3g} s, {fmt_ratio(speed_up(m, default))} faster "
                        f"than our default ({DEFAULT_BACKEND['marglik'][OURS]}, "
                        f"{default.seconds:.3g} s)."
                    )
        self.lines.append("")

    def agreement(self) -> None:
        rows, worst, trained = [], None, False
        for c in CASES:
            if c.backend and not self.has(c, LT):
                continue  # ours runs only its default
            default = Case(c.group, c.subnet, c.structure)
            ours, lt = self.get(default, OURS), self.get(c, LT)
            if not ((ours and ours.note) or (lt and lt.note)):
                continue
            a, b = self.outputs.get(default.key(OURS)), self.outputs.get(c.key(LT))
            if c.group == "predictive":
                d = max_abs_diff(a and a.get("probs"), b and b.get("probs"))
                if d is not None:
                    worst = d if worst is None else max(worst, d)
                diff = "–" if d is None else f"max \\|Δp\\| {d:.2g}"
            elif c.group == "fit":
                d = rel_diff(a and a.get("log marglik"), b and b.get("log marglik"))
                diff = "–" if d is None else f"log marglik rel. diff. {d:.2g}"
            else:
                trained = True
                d = max_rel_diff(
                    a and a.get("prior precision"), b and b.get("prior precision")
                )
                e = rel_diff(a and a.get("marglik"), b and b.get("marglik"))
                diff = ", ".join(
                    f"{what} {v:.2g}"
                    for what, v in (
                        ("prior precision max rel. diff.", d),
                        ("last marglik rel. diff.", e),
                    )
                    if v is not None
                )
            what = f"S = {c.subnet:,}" if c.subnet else c.structure
            rows.append(
                f"| {c.group} | {what} | {c.backend_label(LT)} | "
                f"{(ours and ours.note) or '–'} | {(lt and lt.note) or '–'} | "
                f"{diff or '–'} |"
            )
        if not rows:
            return
        self.lines += [
            "### Results of the last run, to compare (same model, data, seed)",
            "",
            "| workload | size | laplace-torch backend | ours (default backend) "
            "| laplace-torch | difference |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
        ]
        if worst is not None:
            self.lines.append(
                "- Check: the subnetwork predictive probabilities of both libraries "
                f"agree within {AGREE_ATOL:g} (max \\|Δp\\| {worst:.2g}): "
                f"{verdict(worst <= AGREE_ATOL)}."
            )
        if trained:
            self.lines.append(
                "- `marglik_training`: the weights and hyperparameters are trained on "
                "each side; where the trainings differ (optimizer steps, order of "
                "operations) so do the prior precisions and evidences: reported, no "
                "target."
            )
        self.lines.append("")

    def errors(self) -> None:
        self.lines += error_lines(
            [self.get(c, side) for c in CASES for side in c.sides]
        )


def report(results, outputs, header: list[str]) -> str:
    rep = Report(results, outputs)
    rep.lines += header
    rep.subnetworks()
    rep.memory()
    rep.margliks()
    rep.agreement()
    rep.errors()
    return "\n".join(rep.lines).rstrip() + "\n"


def main() -> None:
    parser = common_arguments(__doc__.splitlines()[0], "subnet.md")
    parser.set_defaults(threads=2)
    parser.add_argument(
        "--lt-slow",
        action="store_true",
        help="also time laplace-torch's Diag marglik_training with CurvlinopsGGN "
        "(minutes, ~5 GB)",
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
        for side in case.sides
        if side in sides.pythons
        and args.only in case.key(side)
        and case.key(side) not in sides.results
        and (case.key(side) != LT_SLOW or args.lt_slow)
    ]
    extra = worker_arguments(args, repeats, budget)
    measure(SCRIPT, names, sides, extra, timeout, args.rounds)

    header = [
        "## Subnetwork Laplace and marglik_training: laplace (ours) against "
        "laplace-torch",
        "",
        f"Command: `{command(SCRIPT)}`, at commit {checkout()}.",
        "",
        f"10-class classification on {N_DATA:,} random samples with the MLP "
        f"{'-'.join(map(str, LAYERS))} (P = {N_PARAMS:,} weights), batches of "
        f"{BATCH} without shuffling, {args.threads} torch threads. Subnetwork "
        '`Laplace(model, "classification", subset_of_weights="subnetwork", '
        'hessian_structure="full", subnetwork_indices=idx)` over S weights drawn '
        "at random (`torch.randperm(P, generator=torch.Generator().manual_seed(0))"
        "[:S]`, the same on both sides); `marglik_training(model, loader, "
        f'likelihood="classification", hessian_structure=..., n_epochs={N_EPOCHS})`'
        ", the other arguments at their defaults. Ours runs its default backend, "
        "laplace-torch its default and its other backends. Each measurement runs "
        "in a fresh process: after set-up and a warm-up, the best time of up to "
        f"{repeats} runs (no further run once the runs took {budget:g} s)"
        + (f", best of {args.rounds} interleaved rounds" if args.rounds > 1 else "")
        + "; memory is the peak resident memory a run adds to the set-up, in MB. "
        "The predictive times each run on a freshly fitted Laplace (the fit, with "
        "the same backend, not timed); `marglik_training` each run on a fresh "
        "model. Each worker may map at most "
        f"{args.memory_limit_gb:g} GB beyond its imported libraries (`RLIMIT_AS`) "
        f"and run {timeout:.0f} s; beyond, it is reported as out of memory or "
        "timeout.",
        "",
        *library_lines(sides),
    ]
    if LT in sides.pythons and LT_SLOW not in sides.results:
        header.append(
            "- laplace-torch's Diag `marglik_training` with CurvlinopsGGN not timed "
            "(it takes minutes and ~5 GB; `--lt-slow` times it)."
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
