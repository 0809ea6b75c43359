"""Time and peak memory of ELLA and VaLLA, this library against laplace-torch, and
how far apart their predictives are against each method's own seed-to-seed spread.

The same workload, written against the public laplace-torch 0.3 API that both
libraries share (``Laplace(model, "classification", "all", "gp",
functional_approximation="nystrom" | "variational", ...)``, ``.fit``, the GP
predictive, ELLA's ``optimize_prior_precision``, ``predictive_moments``), runs with
this library (this interpreter, the repository's ``laplace``) and with laplace-torch
(the interpreter of another virtual environment: ``--lt-python``, else
``$LAPLACE_TORCH_PYTHON``, else ``.lt-venv/bin/python``), each workload in a fresh,
memory-limited process (see ``_measure.py`` and ``_comparison.py``). 10-class
classification of synthetic data (Gaussian inputs labelled by a random linear teacher
with noise) with the MLP 32-128-128-10 (tanh, 22,026 parameters), trained for 100
full-batch Adam steps in the worker (not timed; fixed seeds and the same torch, so
both sides see the same weights, which the workers check), float32:

- ELLA at (N, subsample_size, n_eigenvalues) = (1,000, 50, 20), (5,000, 200, 50) and
  (20,000, 500, 100), batches of 128: three phases of one pipeline, timed one by
  one: ``fit`` (``Laplace(...)`` and ``.fit(loader)``), ``predictive`` (the first
  ``la(x, pred_type="gp", link_approx="probit")`` on 500 test inputs) and
  ``gridsearch`` (``optimize_prior_precision(method="gridsearch")`` over 20 prior
  precisions, scored on 500 validation inputs);
- VaLLA at (N, num_inducing) = (1,000, 20), (5,000, 50) and (20,000, 100), inducing
  inputs drawn by ``inducing_locations="random"``: ``fit`` (``Laplace(...)`` and 200
  Adam iterations, ``lr=0.01``, on minibatches of 32: laplace-torch takes 0.5-1.5 s
  a step on them here, 2-3 s on minibatches of 128) and ``predictive`` (as ELLA's).

A process runs the whole pipeline again on a fresh Laplace (at most 5 times) only
while its runs so far took less than 100 s (20 s with ``--quick``); the times are
those of the fastest run, the memory the largest peak of a phase above what was
resident before the pipeline. A worker that runs out of memory or time reports the
phases it finished and a lower bound on the one it was in (as the GP benchmark).

Agreement. Each method's predictive depends on a seed (ELLA's basis inputs and
output coordinates, VaLLA's inducing inputs), and the issue asks that the two
libraries' predictives differ by less than that. So each library's predictive is
also computed with two more seeds (a ``seeds|...`` worker, not timed): the seed
changes the predictive by some amount, and at the same seed the two libraries should
differ by much less. Compared: the probit probabilities at the test inputs (before
tuning) and the latent variances (the diagonal of ``predictive_moments``).

    python benchmarks/ella_valla_benchmark.py               # the full run (~45 min)
    python benchmarks/ella_valla_benchmark.py --quick       # a smoke run, small sizes
    python benchmarks/ella_valla_benchmark.py --ours-only   # without laplace-torch
    python benchmarks/ella_valla_benchmark.py --reuse-lt    # laplace-torch's figures
                                            # from the last run, ours measured anew
    python benchmarks/ella_valla_benchmark.py --no-seeds    # timings only

The tables, with the targets checked and the agreement measured, are printed and
written to ``benchmarks/output/ella_valla.md`` (or ``--output``), the raw figures
beside it (``ella_valla.json``: each side's phases and predictives, to compare
against with ``--reuse-lt``).
"""

from __future__ import annotations

import gc
import itertools
import os
import sys
import time
from dataclasses import dataclass

#: when this process started (see functional_benchmark.STARTED)
STARTED = time.time() - 1.0
SCRIPT = os.path.abspath(__file__)
sys.path.insert(0, os.path.dirname(SCRIPT))
from _comparison import (  # noqa: E402
    add_memory_limit,
    command,
    dump,
    error_lines,
    in_phase,
    library_lines,
    max_abs_diff,
    measure,
    save,
    start,
    verdict,
    worker,
    worker_arguments,
)
from _measure import Measurement, Timed  # noqa: E402
from functional_benchmark import (  # noqa: E402
    TOTAL,
    Phases,
    Side,
    fmt_mb,
    fmt_speed_up,
    met,
    speed_up,
)
from laplace_benchmark import LT, OURS, checkout, common_arguments  # noqa: E402

QUICK = "--quick" in sys.argv
INPUTS, HIDDEN, CLASSES = 32, 128, 10
LAYERS = (INPUTS, HIDDEN, HIDDEN, CLASSES)
N_PARAMS = sum((a + 1) * b for a, b in zip(LAYERS, LAYERS[1:]))
#: full-batch Adam steps that train the MAP network in each worker (not timed)
TRAIN_STEPS = 20 if QUICK else 100
BATCH = 128
#: VaLLA's minibatches (its fit is SGD over them)
VALLA_BATCH = 32
N_TEST = 100 if QUICK else 500
N_VAL = 100 if QUICK else 500
GRID_SIZE = 5 if QUICK else 20
ITERATIONS = 20 if QUICK else 200
VALLA_LR = 1e-2
#: the seed of the timed pipeline first, then those of the ``seeds|`` workers
SEEDS = (0, 1, 2)
#: (N, subsample_size, n_eigenvalues)
ELLA_SIZES = (
    ((300, 20, 10), (600, 50, 20))
    if QUICK
    else ((1000, 50, 20), (5000, 200, 50), (20000, 500, 100))
)
#: (N, num_inducing)
VALLA_SIZES = (
    ((300, 10), (600, 20)) if QUICK else ((1000, 20), (5000, 50), (20000, 100))
)
#: the warm-up pipeline: N, subsample_size, n_eigenvalues / num_inducing, predictive
#: inputs, grid size, iterations
N_WARM, S_WARM, K_WARM, M_WARM, X_WARM, GRID_WARM, ITER_WARM = 64, 8, 4, 4, 2, 2, 2
DEFAULT_MEMORY_LIMIT_GB = 12.0
ELLA_PHASES = ("fit", "predictive", "gridsearch")
VALLA_PHASES = ("fit", "predictive")
#: what the agreement compares: the dumped name, and how the report calls it
QUANTITIES = (("probs", "probit probabilities"), ("var", "latent variances"))
METHODS = {"ella": "ELLA", "valla": "VaLLA"}


@dataclass(frozen=True)
class Case:
    method: str  # ella | valla
    n_data: int
    #: ELLA: (subsample_size, n_eigenvalues); VaLLA: (num_inducing,)
    shape: tuple[int, ...]

    def fields(self) -> str:
        if self.method == "ella":
            return f"N{self.n_data}|s{self.shape[0]}|k{self.shape[1]}"
        return f"N{self.n_data}|Z{self.shape[0]}"

    def key(self, side: str) -> str:
        """The timed pipeline's workload."""
        return f"{self.method}|{self.fields()}|{side}"

    def seeds_key(self, side: str) -> str:
        """The workload of the predictives at the other seeds (not timed)."""
        return f"seeds|{self.method}|{self.fields()}|{side}"

    @property
    def phases(self) -> tuple[str, ...]:
        return ELLA_PHASES if self.method == "ella" else VALLA_PHASES

    def label(self) -> str:
        if self.method == "ella":
            s, k = self.shape
            return f"N = {self.n_data:,}, s = {s}, k = {k}"
        return f"N = {self.n_data:,}, M = {self.shape[0]}"


CASES = [Case("ella", n, (s, k)) for n, s, k in ELLA_SIZES] + [
    Case("valla", n, (m,)) for n, m in VALLA_SIZES
]


# -- the problem (the same in every process) -----------------------------------------
def draw(n: int, seed: int, teacher):
    """``n`` inputs ``N(0, I)`` and their labels: the arg-max of the teacher's logits
    plus noise."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, INPUTS, generator=g)
    logits = 3.0 * x @ teacher / INPUTS**0.5 + torch.randn(n, CLASSES, generator=g)
    return x, logits.argmax(-1)


def problem(n_data: int) -> dict:
    """The trained MLP and its data: ``model``, ``train`` ``(x, y)``, ``val``
    ``(x, y)``, ``test`` (inputs)."""
    import torch
    from torch import nn

    teacher = torch.randn(INPUTS, CLASSES, generator=torch.Generator().manual_seed(0))
    x, y = draw(n_data, 1, teacher)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(INPUTS, HIDDEN),
        nn.Tanh(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.Tanh(),
        nn.Linear(HIDDEN, CLASSES),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(TRAIN_STEPS):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return {
        "model": model,
        "train": (x, y),
        "val": draw(N_VAL, 2, teacher),
        "test": draw(N_TEST, 3, teacher)[0],
    }


def loader(data, batch_size: int):
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(*data), batch_size=batch_size)


def model_checksum(model) -> float:
    """The sum of the weights in float64: both sides must see the same model."""
    return float(sum(p.detach().double().sum() for p in model.parameters()))


# -- the workload (the same code for both libraries) ---------------------------------
def laplace_of(case: Case, model, seed: int, shape: tuple[int, ...] | None = None):
    from laplace import Laplace

    shape = shape or case.shape
    if case.method == "ella":
        extra = dict(
            functional_approximation="nystrom",
            subsample_size=shape[0],
            n_eigenvalues=shape[1],
        )
    else:
        extra = dict(
            functional_approximation="variational",
            inducing_locations="random",
            num_inducing=shape[0],
        )
    return Laplace(model, "classification", "all", "gp", seed=seed, **extra)


def pipeline(
    case: Case, prob: dict, seed: int, phase, small: bool = False, tune: bool = True
) -> dict:
    """Fit, the first GP probit predictive and (ELLA, with ``tune``) the grid search;
    ``phase(name, fn)`` runs each. ``small``: the warm-up's sizes."""
    out: dict = {}
    if small:
        shape = (S_WARM, K_WARM) if case.method == "ella" else (M_WARM,)
        n, x_test = N_WARM, prob["test"][:X_WARM]
        grid, iterations = GRID_WARM, ITER_WARM
    else:
        shape, n, x_test = case.shape, case.n_data, prob["test"]
        grid, iterations = GRID_SIZE, ITERATIONS
    train = tuple(t[:n] for t in prob["train"])

    def fit():
        out["la"] = laplace_of(case, prob["model"], seed, shape)
        if case.method == "ella":
            out["la"].fit(loader(train, BATCH))
        else:
            out["la"].fit(
                loader(train, VALLA_BATCH), iterations=iterations, lr=VALLA_LR
            )

    def predictive():
        out["probs"] = out["la"](x_test, pred_type="gp", link_approx="probit")

    def gridsearch():
        out["la"].optimize_prior_precision(
            pred_type="gp",
            method="gridsearch",
            val_loader=loader(prob["val"], BATCH),
            grid_size=grid,
        )

    phase("fit", fit)
    phase("predictive", predictive)
    if case.method == "ella" and tune:
        phase("gridsearch", gridsearch)
    return out


def latent_variances(la, x):
    """The diagonal ``(B, C)`` of the GP's covariance at ``x``."""
    _, cov = la.predictive_moments(x)
    return cov.diagonal(dim1=-2, dim2=-1)


def deadline() -> float | None:
    if "--timeout" not in sys.argv:
        return None
    return STARTED + float(sys.argv[sys.argv.index("--timeout") + 1])


def pipeline_workload(case: Case) -> Timed:
    prob = problem(case.n_data)
    phases = Phases(deadline())
    state: dict = {}
    seed = SEEDS[0]

    def before_each():
        state.clear()  # free the last Laplace first
        gc.collect()

    def run():
        phases.start()
        out = pipeline(case, prob, seed, phases.phase)
        phases.values = {"probs": out["probs"]}
        state["la"] = out["la"]
        phases.finish()

    def warm_up():
        def phase(name, fn):
            in_phase(f"warm-up {name}", fn)()

        pipeline(case, prob, seed, phase, small=True)

    def summary():
        la = state["la"]
        prior = float(la.prior_precision.detach().reshape(-1)[0])
        if case.method == "ella":
            la.prior_precision = 1.0  # the variances of the predictive timed above
        with_var = {
            **phases.values,
            "var": latent_variances(la, prob["test"]).detach(),
            "model checksum": model_checksum(prob["model"]),
            "prior precision": prior,
        }
        phases.values = with_var
        phases.save()
        how = "tuned" if case.method == "ella" else "learnt"
        p = with_var["probs"]
        return (
            f"{how} prior precision {prior:.6g}, mean max prob "
            f"{p.amax(-1).mean().item():.6g}, mean latent variance "
            f"{with_var['var'].mean().item():.6g}"
        )

    return Timed(run, warm_up, summary, before_each, peak_mb=phases.run_peak)


def seeds_workload(case: Case) -> Timed:
    """The predictives of the seeds after the first (fit, probit predictive, latent
    variances), dumped as each is done."""
    prob = problem(case.n_data)
    values: dict = {"model checksum": model_checksum(prob["model"])}

    def run():
        for seed in SEEDS[1:]:
            out = pipeline(case, prob, seed, lambda _, fn: fn(), tune=False)
            values[f"probs@{seed}"] = out["probs"]
            values[f"var@{seed}"] = latent_variances(out["la"], prob["test"]).detach()
            del out
            gc.collect()
            dump(values)

    return Timed(in_phase("seeds", run))


def workloads() -> dict:
    table = {}
    for case, side in itertools.product(CASES, (OURS, LT)):
        table[case.key(side)] = lambda c=case: pipeline_workload(c)
        table[case.seeds_key(side)] = lambda c=case: seeds_workload(c)
    return table


# -- the report ----------------------------------------------------------------------
def predictives(timed: dict, seeds: dict, name: str) -> dict[int, dict]:
    """``seed -> dumped tensor`` of one side's quantity ``name``."""
    found = {}
    if timed.get(name):
        found[SEEDS[0]] = timed[name]
    for seed in SEEDS[1:]:
        if seeds.get(f"{name}@{seed}"):
            found[seed] = seeds[f"{name}@{seed}"]
    return found


@dataclass
class Agreement:
    """One quantity of one case: each side's smallest seed-to-seed change and the
    largest difference between the sides at one seed (max over the entries)."""

    spread: dict[str, float | None]
    across: float | None
    #: the seeds compared across the sides
    n_common: int

    @property
    def within(self) -> bool | None:
        spreads = [s for s in self.spread.values() if s is not None]
        if self.across is None or not spreads:
            return None
        return self.across < min(spreads)


def agreement(outputs: dict, case: Case, name: str) -> Agreement:
    per_side = {
        side: predictives(
            outputs.get(case.key(side)) or {},
            outputs.get(case.seeds_key(side)) or {},
            name,
        )
        for side in (OURS, LT)
    }
    spread: dict[str, float | None] = {}
    for side, found in per_side.items():
        pairs = [
            max_abs_diff(found[a], found[b])
            for a, b in itertools.combinations(found, 2)
        ]
        pairs = [d for d in pairs if d is not None]
        spread[side] = min(pairs) if pairs else None
    common = [s for s in SEEDS if s in per_side[OURS] and s in per_side[LT]]
    diffs = [max_abs_diff(per_side[OURS][s], per_side[LT][s]) for s in common]
    diffs = [d for d in diffs if d is not None]
    return Agreement(spread, max(diffs) if diffs else None, len(diffs))


def fmt_diff(value: float | None) -> str:
    return "–" if value is None else f"{value:.2g}"


class Report:
    def __init__(self, results: dict[str, Measurement], outputs: dict[str, dict]):
        self.results, self.outputs = results, outputs
        self.lines: list[str] = []
        self.bounded = False

    def side(self, case: Case, side: str) -> Side:
        name = case.key(side)
        return Side(self.results.get(name), self.outputs.get(name))

    def measured(self, method: str) -> list[Case]:
        return [
            c
            for c in CASES
            if c.method == method
            and (c.key(OURS) in self.results or c.key(LT) in self.results)
        ]

    def timings(self, method: str, title: str) -> None:
        cases = self.measured(method)
        if not cases:
            return
        self.lines += [
            f"### {title}",
            "",
            "| size | phase | ours (s) | laplace-torch (s) | speed-up | ours peak MB "
            "| laplace-torch peak MB |",
            "|---|---|---|---|---|---|---|",
        ]
        verdicts = []
        for case in cases:
            ours, lt = self.side(case, OURS), self.side(case, LT)
            slower, missing = [], False
            for phase in (*case.phases, TOTAL):
                r = speed_up(ours, lt, phase)
                self.bounded |= bool(r and r[1])
                self.lines.append(
                    f"| {case.label()} | {phase} | {ours.fmt_seconds(phase)} | "
                    f"{lt.fmt_seconds(phase)} | {fmt_speed_up(r)} | "
                    f"{fmt_mb(ours.peak(phase))} | {fmt_mb(lt.peak(phase))} |"
                )
                result = met(ours, r, 1.0)
                slower += [phase] if result is False else []
                missing |= result is None
            if ours.m is not None and lt.m is not None:
                verdicts.append((case, slower, missing))
        self.lines.append("")
        for case, slower, missing in verdicts:
            result = False if slower else None if missing else True
            self.lines.append(
                f"- Target, {case.label()}: ours at least as fast as laplace-torch in "
                f"each phase and in total: {verdict(result)}"
                + (f" (slower: {', '.join(slower)})" if slower else "")
                + "."
            )
        self.lines.append("")

    def agreement(self) -> None:
        rows, verdicts, checks = [], [], []
        for case in CASES:
            if not any(
                self.outputs.get(k(side))
                for side in (OURS, LT)
                for k in (case.key, case.seeds_key)
            ):
                continue
            for name, label in QUANTITIES:
                a = agreement(self.outputs, case, name)
                if a.spread[OURS] is None and a.spread[LT] is None:
                    continue
                verdicts.append(a.within)
                rows.append(
                    f"| {METHODS[case.method]} | {case.label()} | {label} | "
                    f"{fmt_diff(a.spread[OURS])} | "
                    f"{fmt_diff(a.spread[LT])} | {fmt_diff(a.across)} "
                    f"({a.n_common} seeds) | "
                    + ("–" if a.within is None else "yes" if a.within else "**no**")
                    + " |"
                )
            sums = {
                side: (self.outputs.get(case.key(side)) or {}).get("model checksum")
                for side in (OURS, LT)
            }
            if None not in sums.values():
                checks.append(sums[OURS] == sums[LT])
        if not rows:
            return
        self.lines += [
            "### Agreement: the two libraries at one seed against each one's seed-to-"
            "seed spread",
            "",
            f"At {N_TEST} test inputs, the GP probit probabilities and the latent "
            "variances (the diagonal of `predictive_moments`), before tuning, with "
            f"the seeds {', '.join(map(str, SEEDS))} (ELLA's basis, VaLLA's inducing "
            "inputs). Seed-to-seed: the smallest, over pairs of seeds, of the "
            "largest change of an entry; ours vs laplace-torch: the largest "
            "difference of an entry at one seed, over the seeds both ran.",
            "",
            "| method | size | quantity | seed-to-seed, ours | seed-to-seed, "
            "laplace-torch | ours vs laplace-torch, same seed | within |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
        result = False if False in verdicts else None if None in verdicts else True
        self.lines += [
            "- Target: at every size, the predictives of the two libraries at one "
            "seed differ by less than either library's predictive changes from one "
            f"seed to another: {verdict(result)}.",
            "- ELLA's two predictives at one seed differ by float32 round-off only "
            '(the same basis inputs and coordinates). VaLLA\'s `"random"` draws the '
            "same inducing inputs in both libraries but orders them otherwise (see "
            "docs/differences.md), and the Adam steps of the packed factor depend on "
            "that order: its two predictives at one seed differ by more than "
            "round-off, still well within what another seed changes.",
        ]
        if checks:
            same = all(checks)
            self.lines.append(
                "- Check: both sides trained the same network (the sums of its "
                f"weights are equal): {verdict(same)}."
            )
        priors = []
        for case in CASES:
            values = [
                (self.outputs.get(case.key(side)) or {}).get("prior precision")
                for side in (OURS, LT)
            ]
            if None not in values:
                priors.append(
                    f"{METHODS[case.method]} {case.label()}: "
                    f"{values[0]:.4g} / {values[1]:.4g}"
                )
        if priors:
            self.lines.append(
                "- Prior precision, ours / laplace-torch (ELLA: picked by the grid "
                "search; VaLLA: learnt by fit): " + "; ".join(priors) + "."
            )
        self.lines.append("")

    def errors(self) -> None:
        self.lines += error_lines(
            [
                self.results.get(k(side))
                for case in CASES
                for side in (OURS, LT)
                for k in (case.key, case.seeds_key)
            ]
        )


def report(results, outputs, header: list[str]) -> str:
    rep = Report(results, outputs)
    rep.lines += header
    rep.timings("ella", "ELLA: fit, first GP probit predictive, grid search")
    rep.timings(
        "valla", f"VaLLA: fit ({ITERATIONS} iterations), first GP probit predictive"
    )
    if rep.bounded:
        rep.lines += [
            "- ≥: laplace-torch timed out or ran out of memory; its time is then only "
            "bounded below (the phases it finished and how long it ran in the one it "
            "did not).",
            "",
        ]
    rep.agreement()
    rep.errors()
    return "\n".join(rep.lines).rstrip() + "\n"


def main() -> None:
    parser = common_arguments(__doc__.splitlines()[0], "ella_valla.md")
    parser.set_defaults(threads=2)
    parser.add_argument(
        "--no-seeds",
        action="store_true",
        help="time only: no predictives at the other seeds (no agreement table)",
    )
    add_memory_limit(parser, DEFAULT_MEMORY_LIMIT_GB)
    args = parser.parse_args()
    timeout = args.timeout or (300.0 if args.quick else 1800.0)
    repeats, budget = (5, 20.0) if args.quick else (5, 100.0)

    raw_path = os.path.splitext(args.output)[0] + ".json"
    sides = start(args, raw_path)

    def wanted(keys):
        return [
            k
            for k in keys
            if args.only in k
            and k not in sides.results
            and k.rsplit("|", 1)[1] in sides.pythons
        ]

    timed = wanted([c.key(s) for c in CASES for s in (OURS, LT)])
    extra = [*worker_arguments(args, repeats, budget), "--timeout", str(timeout)]
    measure(SCRIPT, timed, sides, extra, timeout, args.rounds)
    if not args.no_seeds:
        seeds = wanted([c.seeds_key(s) for c in CASES for s in (OURS, LT)])
        extra = [*worker_arguments(args, 1, 0.0), "--timeout", str(timeout)]
        measure(SCRIPT, seeds, sides, extra, timeout, 1)

    header = [
        "## ELLA and VaLLA: laplace (ours) against laplace-torch",
        "",
        f"Command: `{command(SCRIPT)}`, at commit {checkout()}.",
        "",
        f"{CLASSES}-class classification of synthetic data (Gaussian inputs, labels "
        "from a random linear teacher with noise), the MLP "
        f"{'-'.join(map(str, LAYERS))} (tanh, P = {N_PARAMS:,}) trained by "
        f"{TRAIN_STEPS} full-batch Adam steps, float32, {args.threads} torch "
        "threads; the same network and data on both sides. ELLA: "
        '`Laplace(model, "classification", "all", "gp", '
        'functional_approximation="nystrom", subsample_size=s, n_eigenvalues=k, '
        f"seed={SEEDS[0]})`, `fit` on batches of {BATCH}, the first "
        f'`la(x, pred_type="gp", link_approx="probit")` on {N_TEST} test inputs, '
        '`optimize_prior_precision(method="gridsearch", grid_size='
        f"{GRID_SIZE})` on {N_VAL} validation inputs. VaLLA: "
        '`functional_approximation="variational", inducing_locations="random", '
        f"num_inducing=M, seed={SEEDS[0]}`, `fit(iterations={ITERATIONS}, "
        f"lr={VALLA_LR:g})` on minibatches of {VALLA_BATCH}, the same predictive. "
        "Each (library, size) runs in a fresh process: after a warm-up pipeline "
        f"(N = {N_WARM}), the pipeline on a fresh Laplace up to {repeats} times (no "
        f"further run once the runs took {budget:g} s: laplace-torch's slow ones "
        "run once)"
        + (f", best of {args.rounds} interleaved rounds" if args.rounds > 1 else "")
        + "; the times are those of the fastest run, the total their sum; memory is "
        "the peak resident memory during a phase above that before the pipeline "
        "(the largest of any run; total: of any phase), in MB. Speed-up is "
        f"laplace-torch / ours. Each worker may map at most {args.memory_limit_gb:g} "
        f"GB beyond its imported libraries (`RLIMIT_AS`) and run {timeout:.0f} s; "
        "beyond, it is reported as out of memory or timeout.",
        "",
        *library_lines(sides),
        "",
    ]
    table = report(sides.results, sides.outputs, header)
    save(table, args.output, raw_path, args.quick, sides, raw_outputs_of=(OURS, LT))


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker(workloads)
    else:
        main()
