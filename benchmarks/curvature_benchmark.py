"""Time and peak memory of the curvature of every backend, and of its library.

For each model and structure, the curvature of a classification loss is accumulated
over random data in batches of 128 (as ``Laplace.fit`` does), by

- each backend of :mod:`laplace.curvature`: ``NativeGGN`` (the default, the
  library's own curvature engine) and the adapters of Curvlinops, BackPACK and ASDL,
- each library called directly, as its documentation shows, doing the same work.

``CurvlinopsGGN``'s diagonal is not measured: Curvlinops has no exact diagonal, so
the adapter multiplies its GGN operator with every unit vector (one operator product
per parameter: hours on these models).

Two ratios are then printed: (a) adapter / its library (the adapter's overhead) and
(b) the default backend / the fastest backend for that structure. Each measurement
runs in a fresh process (see ``_measure.py``).

    python benchmarks/curvature_benchmark.py            # the full run (~15 minutes)
    python benchmarks/curvature_benchmark.py --quick    # a smoke run on less data

The table is printed and written to ``benchmarks/output/curvature.md``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import Measurement, measure_in_subprocess, worker_main  # noqa: E402

QUICK = "--quick" in sys.argv
N_DATA = 256 if QUICK else 2000
BATCH = 128
ADAPTERS = ("NativeGGN", "CurvlinopsGGN", "BackPackGGN", "AsdlGGN")
DEFAULT = "NativeGGN"
#: (adapter, structure) pairs not measured (see the module's docstring)
SKIPPED = {("CurvlinopsGGN", "diag")}


# -- models and data -------------------------------------------------------------
def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


def small_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(196, 8), nn.ReLU(), nn.Linear(8, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 5 * 5, 10),
    )


MODELS = {
    "MLP 784-256-256-10": (mlp, (784,)),
    "MLP 196-8-10": (small_mlp, (196,)),
    "CNN 2 conv/pool + linear": (cnn, (1, 28, 28)),
    "MLP 784-256-256-10, last layer": (mlp, (784,)),
}
#: (model, structure) pairs measured
CASES = [
    ("MLP 784-256-256-10", "kron"),
    ("MLP 784-256-256-10", "diag"),
    ("MLP 196-8-10", "full"),
    ("MLP 784-256-256-10, last layer", "full"),
    ("CNN 2 conv/pool + linear", "kron"),
    ("CNN 2 conv/pool + linear", "diag"),
]


def batches(model_name: str):
    g = torch.Generator().manual_seed(0)
    shape = MODELS[model_name][1]
    x = torch.randn(N_DATA, *shape, generator=g)
    y = torch.randint(0, 10, (N_DATA,), generator=g)
    return list(zip(x.split(BATCH), y.split(BATCH)))


def build(model_name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[model_name][0]()


def differentiated(model_name: str, model: nn.Sequential):
    """The module whose curvature is taken and the (frozen) map to its inputs."""
    if model_name.endswith("last layer"):
        return model[-1], model[:-1]
    return model, nn.Identity()


def fit_loop(data, step):
    """``run()`` adding up ``step(x, y)`` over the batches in place, as a fit does."""

    def run():
        total = None
        for x, y in data:
            H = step(x, y)
            if total is None:
                total = H
            else:
                total += H

    return run


# -- the adapters ------------------------------------------------------------------
def adapter_workload(model_name: str, structure: str, backend_name: str):
    import laplace.curvature as curvature

    model = build(model_name)
    data = batches(model_name)
    last_layer = model_name.endswith("last layer")
    backend = getattr(curvature, backend_name)(
        model, "classification", last_layer=last_layer
    )

    def step(x, y):
        if structure == "kron":
            return backend.kron(x, y, N=N_DATA)[1]
        return getattr(backend, structure)(x, y)[1]

    return fit_loop(data, step), lambda: step(*data[0])


# -- the libraries, called directly --------------------------------------------------
def curvlinops_workload(model_name: str, structure: str):
    import curvlinops

    model = build(model_name)
    data = batches(model_name)
    params = [p for p in model.parameters() if p.requires_grad]
    if model_name.endswith("last layer"):
        params = list(model[-1].parameters())
    lossfunc = nn.CrossEntropyLoss(reduction="sum")
    P = sum(p.numel() for p in params)

    if structure == "kron":

        def run():
            op = curvlinops.KFACLinearOperator(
                model,
                lossfunc,
                params,
                data,
                fisher_type="type-2",
                check_deterministic=False,
            )
            op.compute_kronecker_factors()

        return run, None
    if structure == "full":

        def run():
            op = curvlinops.GGNLinearOperator(
                model, lossfunc, params, data, check_deterministic=False
            )
            columns = [op @ block for block in torch.eye(P).split(512, dim=1)]
            torch.cat(columns, dim=1)

        return run, None
    raise NotImplementedError("Curvlinops offers no exact diagonal")


def backpack_workload(model_name: str, structure: str):
    from backpack import backpack, extend
    from backpack.extensions import KFLR, DiagGGNExact, SqrtGGNExact

    from laplace.utils.matrix import Kron

    model = build(model_name)
    data = batches(model_name)
    module, features = differentiated(model_name, model)
    module = extend(copy.deepcopy(module))
    lossfunc = extend(nn.CrossEntropyLoss(reduction="sum"))
    params = list(module.parameters())
    extension, attribute = {
        "kron": (KFLR, "kflr"),
        "diag": (DiagGGNExact, "diag_ggn_exact"),
        "full": (SqrtGGNExact, "sqrt_ggn_exact"),
    }[structure]

    def step(x, y):
        with torch.no_grad():
            x = features(x)
        with backpack(extension()):
            lossfunc(module(x), y).backward()
        values = [getattr(p, attribute) for p in params]
        for p in params:
            p.grad = None
        if structure == "diag":
            return torch.cat([v.flatten() for v in values])
        if structure == "full":
            V = torch.cat([v.flatten(2) for v in values], dim=2).flatten(0, 1)
            return V.T @ V
        return Kron(values)  # only to add the factors up as the adapter does

    return fit_loop(data, step), lambda: step(*data[0])


def asdl_workload(model_name: str, structure: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import asdl

    model = build(model_name)
    data = batches(model_name)
    module, features = differentiated(model_name, model)
    shape = {
        "kron": asdl.SHAPE_KRON,
        "diag": asdl.SHAPE_DIAG,
        "full": asdl.SHAPE_FULL,
    }[structure]
    config = asdl.FisherConfig(
        fisher_type=asdl.FISHER_EXACT,
        fisher_shapes=[shape],
        loss_type=asdl.LOSS_CROSS_ENTROPY,
        data_size=1,
    )
    maker = asdl.get_fisher_maker(module, config)
    lossfunc = nn.CrossEntropyLoss(reduction="sum")

    def step(x, y, accumulate):
        with torch.no_grad():
            x = features(x)
        dummy = maker.setup_model_call(module, x)
        maker.setup_loss_call(lossfunc, dummy, y)
        maker.forward_and_backward(accumulate=accumulate)

    def run():
        for i, (x, y) in enumerate(data):
            step(x, y, accumulate=i > 0)

    return run, lambda: step(*data[0], accumulate=False)


LIBRARIES = {
    "curvlinops": curvlinops_workload,
    "backpack": backpack_workload,
    "asdl": asdl_workload,
}
LIBRARY_OF = {
    "CurvlinopsGGN": "curvlinops",
    "BackPackGGN": "backpack",
    "AsdlGGN": "asdl",
}


def workloads() -> dict:
    table = {}
    for model_name, structure in CASES:
        for name in ADAPTERS:
            if (name, structure) in SKIPPED:
                continue
            key = f"{model_name}|{structure}|{name}"
            table[key] = lambda m=model_name, s=structure, n=name: adapter_workload(
                m, s, n
            )
        for lib, make in LIBRARIES.items():
            if lib == "curvlinops" and structure == "diag":
                continue  # Curvlinops has no exact diagonal to call
            key = f"{model_name}|{structure}|{lib} (direct)"
            table[key] = lambda m=model_name, s=structure, f=make: f(m, s)
    return table


# -- the report ----------------------------------------------------------------------
def fmt(m: Measurement | None, what: str) -> str:
    if m is None:
        return "–"
    if m.error:
        return "error" if what == "time" else ""
    if what == "time":
        return f"{m.seconds:.2f}"
    return "n/a" if m.peak_mb is None else f"{m.peak_mb:.0f}"


def ratio(a: Measurement | None, b: Measurement | None) -> str:
    if a is None or b is None or a.error or b.error:
        return "–"
    return f"{a.seconds / b.seconds:.2f}"


def best_of(a: Measurement | None, b: Measurement) -> Measurement:
    """The faster of two measurements of one workload, with the larger peak."""
    if a is None or a.error:
        return b
    if b.error:
        return a
    fast = a if a.seconds <= b.seconds else b
    peaks = [m.peak_mb for m in (a, b) if m.peak_mb is not None]
    return Measurement(fast.name, fast.seconds, max(peaks) if peaks else None)


def report(results: dict[str, Measurement], rounds: int) -> str:
    lines = [
        f"Curvature of a classification loss over {N_DATA} random samples in batches "
        f"of {BATCH}: best time in seconds of {rounds} interleaved rounds of 5 runs, "
        "peak memory above the set-up in MB.",
        "",
        "| model | structure | backend | time (s) | peak MB | library direct (s) "
        "| peak MB | (a) adapter / library | (b) / fastest backend |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    errors = []
    for model_name, structure in CASES:
        rows = {n: results.get(f"{model_name}|{structure}|{n}") for n in ADAPTERS}
        if not any(k.startswith(f"{model_name}|{structure}|") for k in results):
            continue  # not measured in this run (--only)
        ok = [m for m in rows.values() if m is not None and not m.error]
        fastest = min(ok, key=lambda m: m.seconds) if ok else None
        for name in ADAPTERS:
            if (name, structure) in SKIPPED:
                continue
            mine = rows[name]
            library = LIBRARY_OF.get(name)
            direct = library and results.get(
                f"{model_name}|{structure}|{library} (direct)"
            )
            label = f"**{name}** (default)" if name == DEFAULT else name
            lines.append(
                f"| {model_name} | {structure} | {label} | {fmt(mine, 'time')} | "
                f"{fmt(mine, 'mem')} | {fmt(direct, 'time')} | {fmt(direct, 'mem')} | "
                f"{ratio(mine, direct)} | {ratio(mine, fastest)} |"
            )
            for m in (mine, direct):
                if m is not None and m.error:
                    errors.append(f"- {m.name}: {m.error}")
    lines += [
        "",
        "NativeGGN is this library's own engine (no library to call directly); "
        "CurvlinopsGGN's diagonal is not measured (an operator product per "
        "parameter, hours here: Curvlinops has no exact diagonal).",
    ]
    if errors:
        lines += ["", "Errors:", *errors]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="less data, a smoke run")
    parser.add_argument("--only", default="", help="run workloads containing this")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument(
        "--output",
        default=os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "output", "curvature.md"
        ),
        help="path of the report (Markdown)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="passes over all workloads; each reports its best pass (the machine "
        "is shared and noisy, and interleaving spreads slow spells over all)",
    )
    args = parser.parse_args()
    names = [n for n in workloads() if args.only in n]
    extra = ["--quick"] if args.quick else []
    rounds = 1 if args.quick else args.rounds
    results: dict[str, Measurement] = {}
    for r in range(1, rounds + 1):
        for i, name in enumerate(names, 1):
            m = measure_in_subprocess(__file__, name, extra, args.timeout)
            results[name] = best_of(results.get(name), m)
            shown = m.error or f"{m.seconds:.2f} s, {fmt(m, 'mem')} MB"
            where = f"round {r}/{rounds}, {i}/{len(names)}"
            print(f"[{where}] {name}: {shown}", file=sys.stderr, flush=True)
    table = report(results, rounds)
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker_main(workloads())
    else:
        main()
