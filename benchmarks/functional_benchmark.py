"""Time and peak memory of FunctionalLaplace (the GP view), this library against
laplace-torch.

The same workload, written against the public laplace-torch 0.3 API that both
libraries share (``Laplace(model, "classification", subset_of_weights="all",
hessian_structure="gp", n_subset=M)``, ``.fit``, ``.log_marginal_likelihood()``, the
GP predictive), runs with this library (this interpreter, the repository's
``laplace``) and with laplace-torch (the interpreter of another virtual environment:
``--lt-python``, else ``$LAPLACE_TORCH_PYTHON``, else ``.lt-venv/bin/python``),
each (library, M) in a fresh process (see ``_measure.py``). 10-class classification
on 2,000 random samples with the randomly initialized MLP 784-256-256-10 (269,322
parameters; fixed seeds: both sides see the same model and data), for ``n_subset``
M = 100, 500 and 2,000. One pipeline on a fresh Laplace, its three phases timed and
their peak memory taken one by one:

1. ``fit``: ``Laplace(...)`` and ``.fit(loader)``;
2. ``marglik``: the first ``.log_marginal_likelihood()``;
3. ``predictive``: the first ``la(x, pred_type="gp", link_approx="probit")`` on 100
   test inputs.

laplace-torch takes minutes here (2 cores: at M = 100 a 16 s fit and a 12 s
predictive, 5.2 GB; at M = 500 128 s and 42 s, 6.3 GB; at M = 2,000 half an hour or
more), so nothing is refitted for a phase: a process runs the whole pipeline again
(a fresh Laplace, at most 5 times) only while its runs so far took less than 100 s
(20 s with ``--quick``): ours a few times, laplace-torch once where it takes
minutes. A worker runs
under an address-space limit (``RLIMIT_AS``, ``--memory-limit-gb`` beyond its
imported libraries) and ``--timeout``; beyond either it is reported as out of memory
or timeout, with what it had finished, and how long it ran in the phase that failed:
a lower bound on laplace-torch's time.

At M = N both libraries condition on the whole data set, and their predictive
probabilities agree; at M < N they differ by design (this library scales the
likelihood of the subset by N / M so that it stands for the whole data set,
laplace-torch scales the prior instead), as do the log marginal likelihoods at every
M (this library's is that of all N data with the weight-space scatter
``p0 |theta|^2``, the exact evidence of a linear-Gaussian model).

    python benchmarks/functional_benchmark.py               # the full run (~1 hour)
    python benchmarks/functional_benchmark.py --quick       # a smoke run, less data
    python benchmarks/functional_benchmark.py --ours-only   # without laplace-torch
    python benchmarks/functional_benchmark.py --reuse-lt    # laplace-torch's figures
                                            # from the last run, ours measured anew

The tables, with the targets checked and the two libraries' results compared, are
printed and written to ``benchmarks/output/functional.md`` (or ``--output``), the
raw figures beside it (``functional.json``: each side's phases, and laplace-torch's
predictive probabilities, to compare against with ``--reuse-lt``).
"""

from __future__ import annotations

import os
import sys
import time

#: when this process started (give or take its interpreter's start-up, hence the
#: second taken off): a worker is killed ``--timeout`` seconds after it was started,
#: so the phase it is in then ran at least until this plus the timeout
STARTED = time.time() - 1.0
SCRIPT = os.path.abspath(__file__)
sys.path.insert(0, os.path.dirname(SCRIPT))
from _comparison import (  # noqa: E402
    add_memory_limit,
    command,
    dump,
    failure,
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
from _measure import Measurement, Timed, _reset_peak_rss, _status_kb  # noqa: E402
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
)

QUICK = "--quick" in sys.argv
#: the MLP 784-256-256-10 of ``laplace_benchmark.build(BIG)``
LAYERS = (784, 256, 256, 10)
CLASSES = LAYERS[-1]
N_PARAMS = sum((n_in + 1) * n_out for n_in, n_out in zip(LAYERS, LAYERS[1:]))
N_DATA = 300 if QUICK else 2000
SUBSETS = (50, 100, 300) if QUICK else (100, 500, 2000)
N_TEST = 50 if QUICK else 100
#: the warm-up pipeline: M of N samples, predictive on 2 inputs
N_WARM, M_WARM = 32, 8
DEFAULT_MEMORY_LIMIT_GB = 18.0
PHASES = ("fit", "marglik", "predictive")
TOTAL = "total"
#: target (b): the speed-up of the whole pipeline at the largest M
SPEED_UP_AT_LARGEST = 2.0
#: where laplace-torch failed, its time is only bounded below; a speed-up target is
#: then met only if ours took at most this fraction of that bound
WELL_UNDER = 2.0
#: target (c): our peak at most this multiple of the kernel, plus this many MB
KERNEL_FACTOR, KERNEL_CONSTANT_MB = 4.0, 300.0
#: both libraries agree (at M = N) where the probabilities differ by at most this
AGREE_ATOL = 1e-4
MIB = 2**20


def key(n_subset: int, side: str) -> str:
    return f"gp|M{n_subset}|{side}"


# -- the workload (the same code for both libraries) -------------------------------
def laplace_of(model, n_subset: int):
    from laplace import Laplace

    return Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure="gp",
        n_subset=n_subset,
    )


class Phases:
    """Time and peak resident memory of each phase of a pipeline, over its runs.

    A phase's peak is the largest resident memory during it (the kernel's counter
    reset as it starts) above that at the start of its run, the largest of any run;
    the times are those of the fastest complete run. What is known is dumped at the
    start and end of each phase, so that a worker that then times out or runs out of
    memory still reports the phases it finished, the one it was in and since when,
    and how long that one ran before it failed.
    """

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline
        self.best: dict[str, float] | None = None
        self.peaks: dict[str, float] = {}
        #: results to compare: "log marglik", "probs"
        self.values: dict = {}
        self.runs = 0
        self._times: dict[str, float] = {}
        self._peak: float | None = None
        self._base = 0

    def start(self) -> None:
        self._times, self._peak = {}, None
        self._base = _status_kb("VmRSS")

    def phase(self, name: str, fn) -> None:
        self.save(running=name, since=time.time())
        can_reset = _reset_peak_rss()
        began = time.perf_counter()
        try:
            fn()
        except Exception as err:
            self.save(running=name, failed_after=time.perf_counter() - began)
            raise RuntimeError(f"{name}: {type(err).__name__}: {err}") from err
        self._times[name] = time.perf_counter() - began
        if can_reset:
            peak = (_status_kb("VmHWM") - self._base) / 1024
            self.peaks[name] = max(self.peaks.get(name, peak), peak)
            self._peak = peak if self._peak is None else max(self._peak, peak)
        self.save()

    def finish(self) -> None:
        self.runs += 1
        if self.best is None or sum(self._times.values()) < sum(self.best.values()):
            self.best = self._times
        self.save()

    def run_peak(self) -> float | None:
        """The peak of the last run, over its phases."""
        return self._peak

    def save(self, running=None, since=None, failed_after=None) -> None:
        dump(
            {
                **self.values,
                "phases": self.best if self.best is not None else self._times,
                "peaks": self.peaks,
                "complete runs": self.runs,
                "running": running,
                "running since": since,
                "failed after": failed_after,
                "deadline": self.deadline,
            }
        )


def pipeline(model, train, n_subset: int, x, phase) -> dict:
    """Fit, first evidence, first GP predictive; ``phase(name, fn)`` runs each."""
    out = {}

    def fit():
        out["la"] = laplace_of(model, n_subset)
        out["la"].fit(train)

    def marglik():
        out["log marglik"] = out["la"].log_marginal_likelihood().item()

    def predictive():
        out["probs"] = out["la"](x, pred_type="gp", link_approx="probit")

    phase("fit", fit)
    phase("marglik", marglik)
    phase("predictive", predictive)
    return out


def pipeline_workload(n_subset: int):
    import gc

    timeout = (
        sys.argv[sys.argv.index("--timeout") + 1] if "--timeout" in sys.argv else None
    )
    phases = Phases(None if timeout is None else STARTED + float(timeout))
    train = loader(BIG, N_DATA)
    x = data(BIG, N_TEST, seed=1)[0]
    state = {}

    def before_each():
        state.clear()  # free the last Laplace first
        gc.collect()
        state["model"] = build(BIG)

    def run():
        phases.start()
        out = pipeline(state["model"], train, n_subset, x, phases.phase)
        phases.values = {k: out[k] for k in ("log marglik", "probs")}
        state["out"] = out
        phases.finish()

    def warm_up():
        def phase(name, fn):
            in_phase(f"warm-up {name}", fn)()

        pipeline(state["model"], loader(BIG, N_WARM), M_WARM, x[:2], phase)

    def summary():
        out = state["out"]
        p = out["probs"]
        return (
            f"log marglik {out['log marglik']:.6g}, mean max prob "
            f"{p.amax(-1).mean().item():.6g}, p[0,0] {p[0, 0]:.6g}"
        )

    return Timed(run, warm_up, summary, before_each, peak_mb=phases.run_peak)


def workloads() -> dict:
    return {
        key(n_subset, side): (lambda m=n_subset: pipeline_workload(m))
        for n_subset in SUBSETS
        for side in (OURS, LT)
    }


# -- the report ----------------------------------------------------------------------
def fmt_s(seconds: float) -> str:
    return f"{seconds:.3g}" if seconds < 1000 else f"{seconds:,.0f}"


def fmt_mb(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


class Side:
    """One library's figures at one M: the measurement and what its worker dumped."""

    def __init__(self, m: Measurement | None, out: dict | None) -> None:
        self.m, self.out = m, out or {}

    @property
    def failed(self) -> bool:
        return self.m is not None and not ok(self.m)

    @property
    def phases(self) -> dict[str, float]:
        return self.out.get("phases") or {}

    def bound(self) -> float | None:
        """How long the phase a failed worker was in ran before the failure (or the
        kill, for a timeout)."""
        if not self.failed:
            return None
        if self.out.get("failed after") is not None:
            return self.out["failed after"]
        since, deadline = self.out.get("running since"), self.out.get("deadline")
        if "timed out" in self.m.error and since and deadline:
            return max(deadline - since, 0.0)
        return None

    def seconds(self, phase: str) -> tuple[float, bool] | None:
        """``(seconds, only a lower bound)`` of a phase or the total; None if not
        known."""
        complete = set(self.phases) == set(PHASES)
        if phase == TOTAL:
            if complete:
                return sum(self.phases.values()), False
            if ok(self.m):
                return self.m.seconds, False
            bound = self.bound()
            return None if bound is None else (sum(self.phases.values()) + bound, True)
        if phase in self.phases:
            return self.phases[phase], False
        if self.out.get("running") == phase and self.bound() is not None:
            return self.bound(), True
        return None

    def fmt_seconds(self, phase: str) -> str:
        t = self.seconds(phase)
        if t is None:
            reached = phase == TOTAL or self.out.get("running") == phase
            return failure(self.m) if self.failed and reached else "–"
        if t[1]:
            return f"≥ {fmt_s(t[0])} ({failure(self.m)})"
        return fmt_s(t[0])

    def peak(self, phase: str) -> float | None:
        if phase == TOTAL:
            return self.m.peak_mb if ok(self.m) else None
        return (self.out.get("peaks") or {}).get(phase)


def speed_up(ours: Side, lt: Side, phase: str) -> tuple[float, bool] | None:
    """laplace-torch / ours, and whether it is only a lower bound."""
    a, b = ours.seconds(phase), lt.seconds(phase)
    if a is None or a[1] or b is None:
        return None
    return b[0] / max(a[0], 1e-9), b[1]


def fmt_speed_up(r: tuple[float, bool] | None) -> str:
    if r is None:
        return "–"
    return ("≥ " if r[1] else "") + fmt_ratio(r[0])


def met(ours: Side, r: tuple[float, bool] | None, target: float) -> bool | None:
    if ours.failed:
        return False
    if r is None:
        return None
    return r[0] >= (max(target, WELL_UNDER) if r[1] else target)


def kernel_mb(n_subset: int) -> float:
    return (n_subset * CLASSES) ** 2 * 4 / MIB


def jacobians_mb(n_subset: int) -> float:
    return n_subset * CLASSES * N_PARAMS * 4 / MIB


class Report:
    def __init__(self, results: dict[str, Measurement], outputs: dict[str, dict]):
        self.results, self.outputs = results, outputs
        self.lines: list[str] = []
        self.bounded = False  # some speed-up is only a lower bound

    def side(self, n_subset: int, side: str) -> Side:
        name = key(n_subset, side)
        return Side(self.results.get(name), self.outputs.get(name))

    def measured(self) -> list[int]:
        return [
            m
            for m in SUBSETS
            if key(m, OURS) in self.results or key(m, LT) in self.results
        ]

    def timings(self) -> None:
        subsets = self.measured()
        if not subsets:
            return
        self.lines += [
            f"### FunctionalLaplace (GP), {N_DATA} samples: fit, first "
            f"log_marginal_likelihood, first GP probit predictive on {N_TEST} inputs",
            "",
            "| M | phase | ours (s) | laplace-torch (s) | speed-up | ours peak MB "
            "| laplace-torch peak MB |",
            "|---|---|---|---|---|---|---|",
        ]
        for n_subset in subsets:
            ours, lt = self.side(n_subset, OURS), self.side(n_subset, LT)
            for phase in (*PHASES, TOTAL):
                r = speed_up(ours, lt, phase)
                self.bounded |= bool(r and r[1])
                self.lines.append(
                    f"| {n_subset:,} | {phase} | {ours.fmt_seconds(phase)} | "
                    f"{lt.fmt_seconds(phase)} | {fmt_speed_up(r)} | "
                    f"{fmt_mb(ours.peak(phase))} | {fmt_mb(lt.peak(phase))} |"
                )
        self.lines.append("")
        for n_subset in subsets:
            ours, lt = self.side(n_subset, OURS), self.side(n_subset, LT)
            if ours.m is None or lt.m is None:
                continue
            figures, verdicts, slower = [], [], []
            for phase in (*PHASES, TOTAL):
                r = speed_up(ours, lt, phase)
                figures.append(f"{phase} {fmt_speed_up(r)}")
                verdicts.append(met(ours, r, 1.0))
                if verdicts[-1] is False:
                    slower.append(phase)
            result = False if slower else None if None in verdicts else True
            self.lines.append(
                f"- Target (a), M = {n_subset:,}: ours at least as fast as "
                f"laplace-torch in each phase and in total: {', '.join(figures)}; "
                f"{verdict(result)}"
                + (f" ({', '.join(slower)})" if slower else "")
                + "."
            )
        largest = SUBSETS[-1]
        if largest in subsets:
            ours, lt = self.side(largest, OURS), self.side(largest, LT)
            r = speed_up(ours, lt, TOTAL)
            result = (
                None
                if lt.m is None or ours.m is None
                else met(ours, r, SPEED_UP_AT_LARGEST)
            )
            self.lines.append(
                f"- Target (b), M = {largest:,}: ours at least "
                f"{SPEED_UP_AT_LARGEST:g}× faster in total: {fmt_speed_up(r)}, "
                f"{verdict(result)}."
            )
        if self.bounded:
            self.lines.append(
                "- ≥: laplace-torch timed out or ran out of memory; its time is then "
                "only bounded below (by the phases it finished and how long it ran in "
                "the one it did not), and a speed-up target counts as met only if "
                f"that bound is at least {WELL_UNDER:g}× ours."
            )
        self.lines.append("")

    def memory(self) -> None:
        subsets = [m for m in self.measured() if key(m, OURS) in self.results]
        if not subsets:
            return
        self.lines += [
            "### Memory: our peak against the kernel and the subset's Jacobians",
            "",
            f"Kernel: (M·C)² float32 entries; Jacobians: M·C·P float32 entries "
            f"(C = {CLASSES}, P = {N_PARAMS:,}), what forming all of them at once "
            f"would take; bound: {KERNEL_FACTOR:g} × kernel + "
            f"{KERNEL_CONSTANT_MB:g} MB.",
            "",
            "| M | kernel MB | ours peak MB | bound MB | Jacobians MB |",
            "|---|---|---|---|---|",
        ]
        within = []
        for n_subset in subsets:
            m = self.results[key(n_subset, OURS)]
            bound = KERNEL_FACTOR * kernel_mb(n_subset) + KERNEL_CONSTANT_MB
            peak = m.peak_mb if ok(m) else None
            within.append(None if peak is None else peak <= bound)
            self.lines.append(
                f"| {n_subset:,} | {fmt_mb(kernel_mb(n_subset))} | {fmt_mb(peak)} | "
                f"{fmt_mb(bound)} | {fmt_mb(jacobians_mb(n_subset))} |"
            )
        self.lines.append("")
        over = [f"M = {n:,}" for n, w in zip(subsets, within) if w is False]
        result = False if over else None if None in within else True
        self.lines.append(
            "- Target (c): our peak grows like the kernel, at most "
            f"{KERNEL_FACTOR:g} × kernel + {KERNEL_CONSTANT_MB:g} MB at every M: "
            f"{verdict(result)}" + (f" ({', '.join(over)})" if over else "") + "."
        )
        largest = SUBSETS[-1]
        if largest in subsets:
            m = self.results[key(largest, OURS)]
            peak = m.peak_mb if ok(m) else None
            below = None if peak is None else peak < jacobians_mb(largest)
            self.lines.append(
                f"- Target (c), M = {largest:,}: our peak ({fmt_mb(peak)} MB) below "
                f"the size of the subset's Jacobians ({fmt_mb(jacobians_mb(largest))} "
                f"MB): {verdict(below)}."
            )
        self.lines.append("")

    def agreement(self) -> None:
        rows, at_n = [], None
        for n_subset in self.measured():
            a = self.outputs.get(key(n_subset, OURS)) or {}
            b = self.outputs.get(key(n_subset, LT)) or {}
            if not (a.get("probs") or b.get("probs")):
                continue
            d = max_abs_diff(a.get("probs"), b.get("probs"))
            if n_subset == N_DATA:
                at_n = d
                how = "the whole data set on both sides: should agree"
            else:
                how = "differ by design (a subset; see below)"
            lml = [
                "–" if s.get("log marglik") is None else f"{s['log marglik']:.6g}"
                for s in (a, b)
            ]
            rows.append(
                f"| {n_subset:,} | {lml[0]} | {lml[1]} | "
                f"{'–' if d is None else f'{d:.2g}'} | {how} |"
            )
        if not rows:
            return
        self.lines += [
            "### Results, to compare (same model, data, seed)",
            "",
            "| M | ours log marglik | laplace-torch log marglik | max \\|Δp\\| | |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
        if at_n is not None:
            self.lines.append(
                f"- Check: at M = N = {N_DATA:,} both libraries condition on the whole "
                f"data set; their GP predictive probabilities agree within "
                f"{AGREE_ATOL:g} (max \\|Δp\\| {at_n:.2g}): "
                f"{verdict(at_n <= AGREE_ATOL)}."
            )
        self.lines += [
            "- At M < N the predictives differ by design: this library scales the "
            "likelihood of the subset by N / M, so that the subset stands for the "
            "whole data set; laplace-torch scales the prior instead.",
            "- The log marginal likelihoods differ by design at every M: this "
            "library's is the log likelihood of all N data with the weight-space "
            "scatter p0·\\|θ\\|² (the exact evidence of a linear-Gaussian model); "
            "laplace-torch's is the subset's log likelihood with a data-fit term "
            "counted again.",
            "",
        ]

    def errors(self) -> None:
        errors = [
            f"- `{m.name}`: {m.error}"
            for n_subset in SUBSETS
            for side in (OURS, LT)
            if (m := self.results.get(key(n_subset, side))) is not None and m.error
        ]
        if errors:
            self.lines += ["### Errors", "", *errors, ""]


def report(results, outputs, header: list[str]) -> str:
    rep = Report(results, outputs)
    rep.lines += header
    rep.timings()
    rep.memory()
    rep.agreement()
    rep.errors()
    return "\n".join(rep.lines).rstrip() + "\n"


def main() -> None:
    parser = common_arguments(__doc__.splitlines()[0], "functional.md")
    parser.set_defaults(threads=2)
    add_memory_limit(parser, DEFAULT_MEMORY_LIMIT_GB)
    args = parser.parse_args()
    timeout = args.timeout or (600.0 if args.quick else 3600.0)
    repeats, budget = (5, 20.0) if args.quick else (5, 100.0)

    raw_path = os.path.splitext(args.output)[0] + ".json"
    sides = start(args, raw_path)
    names = [
        key(n_subset, side)
        for n_subset in SUBSETS
        for side in sides.pythons
        if args.only in key(n_subset, side) and key(n_subset, side) not in sides.results
    ]
    extra = [*worker_arguments(args, repeats, budget), "--timeout", str(timeout)]
    measure(SCRIPT, names, sides, extra, timeout, args.rounds)

    header = [
        "## FunctionalLaplace (GP): laplace (ours) against laplace-torch",
        "",
        f"Command: `{command(SCRIPT)}`, at commit {checkout()}.",
        "",
        f"10-class classification on {N_DATA:,} random samples with the MLP "
        f"{'-'.join(map(str, LAYERS))} (P = {N_PARAMS:,} parameters), "
        '`Laplace(model, "classification", subset_of_weights="all", '
        'hessian_structure="gp", n_subset=M)`, batches of '
        f"{BATCH} without shuffling, {args.threads} torch threads. Each (library, M) "
        "runs in a fresh process: after a warm-up pipeline (M = "
        f"{M_WARM} of {N_WARM} samples), the pipeline on a fresh model and Laplace "
        "(fit; first `log_marginal_likelihood()`; first "
        f'`la(x, pred_type="gp", link_approx="probit")` on {N_TEST} inputs), up to '
        f"{repeats} times (no further run once the runs took {budget:g} s: "
        "laplace-torch's slow ones run once)"
        + (f", best of {args.rounds} interleaved rounds" if args.rounds > 1 else "")
        + "; the times are those of the fastest run, the total their sum; memory is "
        "the peak resident memory during a phase above that before the fit (the "
        "largest of any run; total: of any phase), in MB. Speed-up is laplace-torch / "
        f"ours. Each worker may map at most {args.memory_limit_gb:g} GB beyond its "
        f"imported libraries (`RLIMIT_AS`) and run {timeout:.0f} s; beyond, it is "
        "reported as out of memory or timeout.",
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
