"""Time and peak memory of one streaming Laplace ``update``, this library's
``laplace.streaming`` against posteriors 0.1.3's ``posteriors.laplace``.

Both libraries share the functional API ``build(forward, outer_log_likelihood,
init_prec)``, ``init(params)``, ``update(state, batch)`` (ours returns the state,
posteriors ``(state, aux)``). The same workload, ``dense_ggn`` and ``diag_ggn`` on
10-class classification, runs with this library (this interpreter, the repository's
``laplace``) and with posteriors (the interpreter of another virtual environment:
``--posteriors-python``, else ``$POSTERIORS_PYTHON``, else
``.posteriors-venv/bin/python``), each measurement in a fresh, memory-limited process
(see ``_measure.py``). The MLPs take 32 inputs (tanh or ReLU, built with
``torch.func.functional_call`` on an ``nn.Module``; the parameters a dict of detached
tensors), with P of about 5,000, 20,000 and 50,000 weights; one batch of 128 random
inputs; float32; fixed seeds, so both sides see the same weights and data:

    forward(params, batch) = (functional_call(model, params, x), torch.tensor([]))
    outer_log_likelihood(logits, batch) = -cross_entropy(logits, y, reduction="sum")

``dense_ggn`` runs at P ~ 5k and 20k (at 50k its P x P float32 precision alone takes
10 GB, and an update makes another: only with ``--dense-50k``), ``diag_ggn`` at all
three. What is timed is one ``update(state, batch)`` (not in place, each library's
default) on a state fresh from ``init`` (the ``init`` not timed), after one warm-up
update: the best of 3 runs; memory is the peak resident memory the update adds to the
state it starts from.

The precisions the two libraries compute must agree: each worker hands the main
process the diagonal of its precision and (dense) 20,000 off-diagonal entries at fixed
positions, and the report gives their largest relative difference. Targets, per row:
ours at least 5x as fast as posteriors and at a fraction (under 1x) of its peak.

    python benchmarks/streaming_benchmark.py                # the full run
    python benchmarks/streaming_benchmark.py --quick        # a smoke run, tiny MLPs
    python benchmarks/streaming_benchmark.py --ours-only    # without posteriors
    python benchmarks/streaming_benchmark.py --reuse-peer   # posteriors' figures
                                            # from the last run, ours measured anew
    python benchmarks/streaming_benchmark.py --dense-50k --memory-limit-gb 40

The table is printed and written to ``benchmarks/output/streaming.md`` (or
``--output``), the raw figures beside it (``streaming.json``, which also keeps
posteriors' precision entries, to compare against with ``--reuse-peer``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

SCRIPT = os.path.abspath(__file__)
sys.path.insert(0, os.path.dirname(SCRIPT))
from _comparison import (  # noqa: E402
    Sides,
    add_memory_limit,
    command,
    decode,
    dump,
    error_lines,
    in_phase,
    limit_memory,
    measure,
    seconds,
    worker_arguments,
)
from _measure import Measurement, Timed, worker_main  # noqa: E402
from laplace_benchmark import (  # noqa: E402
    ROOT,
    checkout,
    fmt_ratio,
    load_raw,
    ok,
    run_probe,
    speed_up,
)

QUICK = "--quick" in sys.argv
OURS, PEER = "ours", "posteriors"
DEFAULT_PEER_PYTHON = os.path.join(ROOT, ".posteriors-venv", "bin", "python")
BATCH, INPUTS, CLASSES = 128, 32, 10
METHODS = ("dense_ggn", "diag_ggn")
#: the off-diagonal entries of a dense precision compared between the libraries
N_ENTRIES = 20_000
#: targets: ours at least this many times as fast as posteriors, and its peak
#: memory under posteriors' (memory ratio posteriors / ours above 1)
SPEED_TARGET, MEMORY_TARGET = 5.0, 1.0
#: the check that both precisions agree: largest relative difference of an entry
#: (entries below ``FLOOR`` times the largest in magnitude are compared as if they
#: were that large: float32 rounding of sums that cancel is not a disagreement).
#: Each library's float32 precision is itself ~1e-4 from the float64 one on the
#: entries near the floor (the quick 698-weight MLP: ours 1.3e-4, posteriors 9e-5),
#: so the two may differ by a few times that.
AGREE_RTOL, FLOOR = 5e-4, 1e-4
DEFAULT_MEMORY_LIMIT_GB = 16.0


@dataclass(frozen=True)
class Size:
    label: str  # the nominal size, e.g. "5k"
    hidden: tuple[int, ...]
    activation: str  # tanh | relu

    @property
    def layers(self) -> tuple[int, ...]:
        return (INPUTS, *self.hidden, CLASSES)

    @property
    def n_params(self) -> int:
        return sum((a + 1) * b for a, b in zip(self.layers, self.layers[1:]))

    @property
    def mlp(self) -> str:
        return f"{'-'.join(map(str, self.layers))} {self.activation}"


#: P = 4,998, 19,975 and 50,151 (quick: 698, 1,642 and 3,370)
SIZES = (
    (
        Size("5k", (16,), "tanh"),
        Size("20k", (24, 24), "relu"),
        Size("50k", (40, 40), "relu"),
    )
    if QUICK
    else (
        Size("5k", (116,), "tanh"),
        Size("20k", (121, 121), "relu"),
        Size("50k", (203, 203), "relu"),
    )
)
#: the sizes dense_ggn runs at without ``--dense-50k``
DENSE_DEFAULT = ("5k", "20k")


@dataclass(frozen=True)
class Case:
    method: str  # dense_ggn | diag_ggn
    size: Size

    def key(self, side: str) -> str:
        return f"update|{self.method}|P{self.size.n_params}|{side}"


CASES = [Case(method, size) for method in METHODS for size in SIZES]


def cases(dense_50k: bool) -> list[Case]:
    return [
        c
        for c in CASES
        if c.method == "diag_ggn" or dense_50k or c.size.label in DENSE_DEFAULT
    ]


# -- the workload (the same code for both libraries) ---------------------------------
def problem(size: Size):
    """``(model, params, batch)``: the MLP with weights drawn from a seeded generator
    (uniform in +-1/sqrt(fan-in), as ``nn.Linear``'s default) and a batch of random
    data, the same in any process."""
    import torch
    from torch import nn

    act = {"tanh": nn.Tanh, "relu": nn.ReLU}[size.activation]
    modules: list = []
    for a, b in zip(size.layers, size.layers[1:]):
        modules += [nn.Linear(a, b), act()]
    model = nn.Sequential(*modules[:-1])
    g = torch.Generator().manual_seed(0)
    params = {}
    for name, p in model.named_parameters():
        bound = 1.0 / size.layers[int(name.split(".")[0]) // 2] ** 0.5
        params[name] = ((torch.rand(p.shape, generator=g) * 2 - 1) * bound).detach()
    n = sum(p.numel() for p in params.values())
    if n != size.n_params:
        raise RuntimeError(f"the MLP has {n} weights, not {size.n_params}")
    x = torch.randn(BATCH, INPUTS, generator=g)
    y = torch.randint(0, CLASSES, (BATCH,), generator=g)
    return model, params, (x, y)


def library(method: str, side: str):
    if side == OURS:
        import laplace.streaming as lib
    else:
        import posteriors.laplace as lib
    return getattr(lib, method)


def entry_positions(n: int) -> tuple[list[int], list[int]]:
    """``N_ENTRIES`` fixed (row, column) positions of an ``n x n`` matrix."""
    import random

    rng = random.Random(0)
    rows = [rng.randrange(n) for _ in range(N_ENTRIES)]
    return rows, [rng.randrange(n) for _ in range(N_ENTRIES)]


def compared_entries(case: Case, state):
    """The entries of the precision the libraries' results are compared on: its
    diagonal (over the parameters in sorted-name order) and, dense, the entries at
    ``entry_positions``."""
    import torch

    if case.method == "diag_ggn":
        prec = state.prec_diag
        return torch.cat([prec[k].reshape(-1) for k in sorted(prec)])
    prec = state.prec
    rows, cols = entry_positions(prec.shape[0])
    return torch.cat([prec.diagonal(), prec[torch.tensor(rows), torch.tensor(cols)]])


def update_workload(case: Case, side: str) -> Timed:
    import gc

    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    model, params, batch = problem(case.size)

    def forward(p, b):
        return functional_call(model, p, (b[0],)), torch.tensor([])

    def outer_log_likelihood(logits, b):
        return -F.cross_entropy(logits, b[1], reduction="sum")

    transform = library(case.method, side).build(forward, outer_log_likelihood, 0.0)
    st: dict = {}

    def before_each():
        st.clear()  # free the last state and its update first
        gc.collect()
        st["state"] = transform.init(params)

    def run():
        out = transform.update(st["state"], batch, inplace=False)
        st["out"] = out[0] if side == PEER else out  # posteriors: (state, aux)

    def summary():
        values = compared_entries(case, st["out"])
        dump({"precision": values})
        n = case.size.n_params
        diag = values[:n]
        return f"trace {diag.sum().item():.6g}, max diag {diag.max().item():.6g}"

    return Timed(
        in_phase("update", run),
        in_phase("warm-up (one update)", run),
        summary,
        in_phase("init", before_each),
    )


def workloads() -> dict:
    return {
        case.key(side): (lambda c=case, s=side: update_workload(c, s))
        for case in CASES
        for side in (OURS, PEER)
    }


# -- the worker and the probe: the library of a side -------------------------------
def import_side(side: str):
    """Import this checkout's ``laplace.streaming`` (ours) or ``posteriors``;
    returns the module of the library."""
    if side == OURS:
        sys.path.insert(0, ROOT)
        import laplace

        here = os.path.join(ROOT, "laplace") + os.sep
        if not os.path.abspath(laplace.__file__).startswith(here):
            raise RuntimeError(f"ours imported laplace from {laplace.__file__}")
        import laplace.streaming  # noqa: F401

        return laplace
    import posteriors
    import posteriors.laplace  # noqa: F401

    return posteriors


def worker() -> None:
    """``--worker NAME``: ``--threads`` torch threads, at most ``--memory-limit-gb``
    mapped beyond the imported libraries."""
    import torch

    name = sys.argv[sys.argv.index("--worker") + 1]
    torch.set_num_threads(int(sys.argv[sys.argv.index("--threads") + 1]))
    import_side(name.rsplit("|", 1)[1])
    if "--memory-limit-gb" in sys.argv:
        limit_memory(float(sys.argv[sys.argv.index("--memory-limit-gb") + 1]))
    worker_main(workloads())


def probe() -> None:
    """``--probe SIDE``: print the versions this interpreter runs."""
    from importlib import metadata

    import torch

    side = sys.argv[sys.argv.index("--probe") + 1]
    lib = import_side(side)
    dist = "laplace" if side == OURS else "posteriors"
    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "library": f"{dist} {metadata.version(dist)}",
        "path": os.path.dirname(lib.__file__),
    }
    print("PROBE " + json.dumps(info))


# -- the main process ----------------------------------------------------------------
def start(args, raw_path: str) -> Sides:
    """The sides to measure, and posteriors' figures of the last run with
    ``--reuse-peer``."""
    results: dict[str, Measurement] = {}
    outputs: dict[str, dict] = {}
    pythons = {OURS: sys.executable}
    probes: dict = {OURS: run_probe(sys.executable, OURS, SCRIPT)}
    note = commit = None
    earlier = load_raw(raw_path, args.quick) if args.reuse_peer else None
    if earlier is not None:
        mine = "|" + PEER
        results = {
            k: Measurement(**v)
            for k, v in earlier["results"].items()
            if k.endswith(mine)
        }
        outputs = {
            k: v for k, v in earlier.get("outputs", {}).items() if k.endswith(mine)
        }
        probes[PEER] = earlier["probes"].get(PEER, "unknown")
        commit = earlier.get("peer_commit", earlier["commit"])
        note = (
            f"posteriors' figures reused from the run at commit {commit} "
            "(`--reuse-peer`); only those missing were measured."
        )
        pythons[PEER] = args.posteriors_python
    elif args.ours_only:
        note = "posteriors not run (`--ours-only`)."
    else:
        probes[PEER] = run_probe(args.posteriors_python, PEER, SCRIPT)
        if isinstance(probes[PEER], str):
            note = f"posteriors not run: {probes.pop(PEER)}."
        else:
            pythons[PEER] = args.posteriors_python
    if isinstance(probes[OURS], str):
        print(f"our library cannot be imported: {probes[OURS]}", file=sys.stderr)
    return Sides(results, outputs, pythons, probes, note, commit)


def library_lines(sides: Sides) -> list[str]:
    lines = []
    for side, info in sides.probes.items():
        if isinstance(info, str):
            lines.append(f"- {side}: cannot be imported: {info}")
        else:
            lines.append(
                f"- {side}: {info['library']} (`{info['path']}`), torch "
                f"{info['torch']}, Python {info['python']}"
            )
    if sides.lt_note:
        lines.append(f"- {sides.lt_note}")
    return lines


def save(table: str, output: str, raw_path: str, quick: bool, sides: Sides) -> None:
    """Print the report, write it to ``output`` and the raw figures (with
    posteriors' precision entries, for ``--reuse-peer``) to ``raw_path``."""
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        f.write(table)
    raw = {
        "quick": quick,
        "commit": checkout(),
        # a later --reuse-peer run credits posteriors' figures to this commit
        "peer_commit": sides.lt_commit or checkout(),
        "probes": sides.probes,
        "results": {k: m.__dict__ for k, m in sides.results.items()},
        "outputs": {k: v for k, v in sides.outputs.items() if k.endswith("|" + PEER)},
    }
    with open(raw_path, "w") as f:
        json.dump(raw, f, indent=1)


# -- the report ----------------------------------------------------------------------
def max_rel_diff(a: dict | None, b: dict | None) -> float | None:
    """The largest relative difference between two dumped vectors of entries, each
    entry's taken against the larger of the two in magnitude, and at least ``FLOOR``
    times the largest entry of either."""
    if not a or not b or a.get("shape") != b.get("shape"):
        return None
    x, y = decode(a), decode(b)
    scale = max((abs(v) for v in (*x, *y)), default=0.0)
    floor = max(FLOOR * scale, 1e-30)
    return max(
        (abs(u - v) / max(abs(u), abs(v), floor) for u, v in zip(x, y)), default=0.0
    )


def memory_ratio(ours: Measurement | None, peer: Measurement | None) -> float | None:
    """posteriors' peak / ours (ours at least 1 MB, what RSS resolves); None if not
    both measured or both under 1 MB."""
    if not (ok(ours) and ok(peer)) or ours.peak_mb is None or peer.peak_mb is None:
        return None
    if max(ours.peak_mb, peer.peak_mb) < 1.0:
        return None
    return peer.peak_mb / max(ours.peak_mb, 1.0)


def fmt_mb(m: Measurement | None) -> str:
    if not ok(m) or m.peak_mb is None:
        return "–"
    return f"{max(m.peak_mb, 0.0):,.0f}"


def mark(met: bool | None) -> str:
    return "–" if met is None else "**met**" if met else "**NOT met**"


def report(
    results: dict[str, Measurement],
    outputs: dict[str, dict],
    header: list[str],
    measured: list[Case],
) -> str:
    lines = [
        *header,
        "| method | P | MLP | ours (s) | posteriors (s) | speed-up | ours MB "
        "| posteriors MB | memory ratio | max rel. diff. "
        f"| ≥ {SPEED_TARGET:g}× faster | smaller peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    diffs, verdicts = [], []
    for case in measured:
        ours, peer = results.get(case.key(OURS)), results.get(case.key(PEER))
        if ours is None and peer is None:
            continue
        r, m = speed_up(ours, peer), memory_ratio(ours, peer)
        a = outputs.get(case.key(OURS), {}).get("precision")
        b = outputs.get(case.key(PEER), {}).get("precision")
        d = max_rel_diff(a, b)
        if d is not None:
            diffs.append(d)
        fast = None if r is None else r >= SPEED_TARGET
        small = None if m is None else m > MEMORY_TARGET
        if ours is not None and peer is not None:
            verdicts += [fast, small]
        shown_m = (
            "–" if m is None else ("> " if ours.peak_mb < 1 else "") + fmt_ratio(m)
        )
        lines.append(
            "| "
            + " | ".join(
                [
                    case.method,
                    f"{case.size.n_params:,}",
                    case.size.mlp,
                    seconds(ours),
                    seconds(peer),
                    fmt_ratio(r),
                    fmt_mb(ours),
                    fmt_mb(peer),
                    shown_m,
                    "–" if d is None else f"{d:.2g}",
                    mark(fast),
                    mark(small),
                ]
            )
            + " |"
        )
    lines += [
        "",
        "Speed-up and memory ratio: posteriors / ours (above 1: ours is faster or "
        "smaller); memory: the peak resident memory the update adds, in MB (under "
        "1 MB counts as 1 MB, the ratio then reads '>'). Max rel. diff.: the largest "
        "relative difference between the two precisions over their diagonal and, "
        f"dense, {N_ENTRIES:,} off-diagonal entries at fixed positions (an entry under "
        f"{FLOOR:g} × the largest taken as that large).",
        "",
    ]
    if verdicts:
        missed = verdicts.count(False)
        overall = False if missed else None if None in verdicts else True
        lines.append(
            f"- Targets: ours at least {SPEED_TARGET:g}× as fast as posteriors and at "
            "a fraction (under 1×) of its peak memory, in every row: "
            + {None: "not measured", True: "**met**", False: "**NOT met**"}[overall]
            + (f" ({missed} of {len(verdicts)} missed)" if missed else "")
            + "."
        )
    if any(c.method == "dense_ggn" for c in measured):
        lines.append(
            "- dense_ggn: an update adds a Gram matrix `S^T S` of `M` rows "
            "(examples x classes) to the `P x P` precision, at least `P^2 M / 2` "
            "multiply-adds in any exact method; ours computes only those (the "
            "blocks on and below the diagonal) and drops the softmax's direction "
            "of zero curvature (`M = N (C - 1)`), posteriors' time is that of the "
            "full product `P^2 N C` and its Jacobian: the speed-up is bounded by "
            "about `2 C / (C - 1)` = 2.2 plus the Jacobian's share, so the 5x "
            "target cannot be met by an exact dense GGN."
        )
    if diffs:
        worst = max(diffs)
        lines.append(
            f"- Check: the precisions of both libraries agree within {AGREE_RTOL:g} "
            f"(max rel. diff. {worst:.2g}): "
            + ("**met**" if worst <= AGREE_RTOL else "**NOT met**")
            + "."
        )
    lines.append("")
    lines += error_lines(
        [results.get(c.key(side)) for c in measured for side in (OURS, PEER)]
    )
    return "\n".join(lines).rstrip() + "\n"


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny MLPs, a smoke run")
    parser.add_argument("--only", default="", help="run workloads containing this")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="passes over all workloads; each reports its best pass",
    )
    parser.add_argument(
        "--ours-only", action="store_true", help="do not run posteriors"
    )
    parser.add_argument(
        "--reuse-peer",
        action="store_true",
        help="take posteriors' figures from the last run's raw results (the output's "
        ".json) instead of measuring them again; measure only what that run lacks",
    )
    parser.add_argument(
        "--posteriors-python",
        default=os.environ.get("POSTERIORS_PYTHON", DEFAULT_PEER_PYTHON),
        help="interpreter with posteriors installed",
    )
    parser.add_argument(
        "--dense-50k",
        action="store_true",
        help="also dense_ggn at P ~ 50k (10 GB a precision: raise --memory-limit-gb)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds per measurement"
    )
    parser.add_argument(
        "--output", default=os.path.join(ROOT, "benchmarks", "output", "streaming.md")
    )
    add_memory_limit(parser, DEFAULT_MEMORY_LIMIT_GB)
    return parser


def main() -> None:
    args = arguments().parse_args()
    timeout = args.timeout or (300.0 if args.quick else 1800.0)
    repeats, budget = (3, 10.0) if args.quick else (3, 600.0)

    raw_path = os.path.splitext(args.output)[0] + ".json"
    sides = start(args, raw_path)
    measured = cases(args.dense_50k)
    names = [
        case.key(side)
        for case in measured
        for side in sides.pythons
        if args.only in case.key(side) and case.key(side) not in sides.results
    ]
    extra = worker_arguments(args, repeats, budget)
    measure(SCRIPT, names, sides, extra, timeout, args.rounds)

    header = [
        "## Streaming Laplace: laplace.streaming (ours) against posteriors",
        "",
        f"Command: `{command(SCRIPT)}`, at commit {checkout()}.",
        "",
        f"One `update(state, batch)` (not in place) of `dense_ggn` and `diag_ggn` "
        f"on a state fresh from `init` (not timed), 10-class classification, one "
        f"batch of {BATCH} random inputs, MLPs on {INPUTS} inputs built with "
        "`torch.func.functional_call` (the parameters a dict of detached tensors), "
        "`outer_log_likelihood = -cross_entropy(logits, y, reduction='sum')`, "
        f"`init_prec` 0, float32, {args.threads} torch threads; fixed seeds, the same "
        "weights and data on both sides. Each measurement runs in a fresh process: "
        f"after a warm-up update, the best time of {repeats} runs (no further run "
        f"once the runs took {budget:g} s)"
        + (f", best of {args.rounds} interleaved rounds" if args.rounds > 1 else "")
        + "; memory is the peak resident memory an update adds to its state, in MB. "
        f"Each worker may map at most {args.memory_limit_gb:g} GB beyond its "
        f"imported libraries (`RLIMIT_AS`) and run {timeout:.0f} s; beyond, it is "
        "reported as out of memory or timeout.",
        "",
        *library_lines(sides),
    ]
    if not args.dense_50k:
        header.append(
            "- `dense_ggn` not run at P ~ 50k (its P × P float32 precision takes "
            "10 GB; `--dense-50k` runs it)."
        )
    header.append("")
    table = report(sides.results, sides.outputs, header, measured)
    save(table, args.output, raw_path, args.quick, sides)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker()
    elif "--probe" in sys.argv:
        probe()
    else:
        main()
