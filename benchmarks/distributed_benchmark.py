"""Data-parallel fitting: fit time and bytes communicated for 1 and 2 processes on
the CPU (gloo, 1 thread each), and the communication of each structure against one
gradient all-reduce of the same weights (ours alone: laplace-torch has no
data-parallel fit).

Two MLPs on random data (float32, classification with 10 classes):

- ``small``: 20 -> 48 -> 48 -> 10 (3,562 weights), 4,096 examples, batches of 128
  per process; Full, Kron, Diag, LowRank (rank 20), last-layer Kron and Full, and the
  GP (``n_subset=256``);
- ``wide``: 256 -> 512 -> 512 -> 10 (399,882 weights), 8,192 examples, batches of
  128; Kron and Diag (Full would hold 640 GB).

Each configuration runs in fresh processes: ``W`` workers (``W = 1``: one process
without a process group, the reference; ``W = 2``: a gloo group over a file
rendezvous) each build the model (seed 0) and the data, take a ``DistributedSampler``
shard (``W = 2``), run one warm-up fit on one batch, then time ``la.fit(loader)``
(best of 2) under ``laplace.utils.distributed.traffic()``, which counts the payload of
every collective this library calls (the tensors reduced or gathered by one rank; a
ring all-reduce sends about ``2 (W - 1) / W`` times that over the wire, which here is
the payload itself). The reported time is the slowest rank's. One gradient
all-reduce of the model is ``4 P`` bytes (float32).

    python benchmarks/distributed_benchmark.py           # ~5 minutes
    python benchmarks/distributed_benchmark.py --quick   # smaller data

The table is printed and written to ``benchmarks/output/distributed.md`` (or
``--output``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
QUICK = "--quick" in sys.argv

#: name -> (layer widths, examples, batch per process)
MODELS = {
    "small": ((20, 48, 48, 10), 1024 if QUICK else 4096, 128),
    "wide": ((256, 512, 512, 10), 1024 if QUICK else 8192, 128),
}
#: (model, subset, structure, extra Laplace arguments)
CASES = [
    ("small", "all", "full", {}),
    ("small", "all", "kron", {}),
    ("small", "all", "diag", {}),
    ("small", "all", "lowrank", {"backend": None, "rank": 20}),
    ("small", "last_layer", "kron", {}),
    ("small", "last_layer", "full", {}),
    ("small", "all", "gp", {"n_subset": 128 if QUICK else 256}),
    ("wide", "all", "kron", {}),
    ("wide", "all", "diag", {}),
]
WORLDS = (1, 2)
REPEATS = 2


def case_name(case) -> str:
    model, subset, structure, _ = case
    return f"{model}|{subset}|{structure}"


# -- the worker ----------------------------------------------------------------------
def worker(args) -> None:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    from laplace import Laplace
    from laplace.utils import distributed_reduction
    from laplace.utils.distributed import traffic

    torch.set_num_threads(1)
    if args.world > 1:
        torch.distributed.init_process_group(
            "gloo", init_method=args.init, rank=args.rank, world_size=args.world
        )
    model_name, subset, structure, extra = next(
        c for c in CASES if case_name(c) == args.case
    )
    widths, n, batch = MODELS[model_name]
    torch.manual_seed(0)
    layers = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers[:-1])
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, widths[0], generator=g)
    y = torch.randint(0, widths[-1], (n,), generator=g)
    data = TensorDataset(X, y)
    sampler = (
        DistributedSampler(data, args.world, args.rank, shuffle=False)
        if args.world > 1
        else None
    )
    loader = DataLoader(data, batch_size=batch, sampler=sampler)
    kwargs = dict(extra)
    warm = max(batch, kwargs.get("n_subset", 0))  # the GP's subset must fit in it
    first = DataLoader(TensorDataset(X[:warm], y[:warm]), batch_size=batch)
    if structure == "lowrank":
        kwargs.pop("backend")

    def build():
        return Laplace(model, "classification", subset, structure, **kwargs)

    with distributed_reduction(False):
        build().fit(first)  # warm-up, each process alone
    seconds, sent = [], None
    for _ in range(REPEATS):
        la = build()
        if args.world > 1:
            torch.distributed.barrier()
        start = time.perf_counter()
        with traffic() as counted:
            la.fit(loader)
        seconds.append(time.perf_counter() - start)
        sent = counted
    P = sum(p.numel() for p in model.parameters())
    result = {
        "seconds": min(seconds),
        "bytes": sent.bytes,
        "calls": sent.calls,
        "weights": P,
        "treated": int(la.n_params) if la.n_params else None,
        "n_data": int(la.n_data),
        "loss": float(la.loss),
    }
    with open(args.out, "w") as f:
        json.dump(result, f)
    if args.world > 1:
        torch.distributed.destroy_process_group()


# -- the driver ----------------------------------------------------------------------
def run(case, world: int, timeout: float) -> dict:
    """The case on ``world`` fresh processes: the slowest rank's time, rank 0's
    bytes (every rank sends as much)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
        procs = []
        for rank in range(world):
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--worker",
                "--case",
                case_name(case),
                "--rank",
                str(rank),
                "--world",
                str(world),
                "--init",
                f"file://{tmp}/rendezvous",
                "--out",
                os.path.join(tmp, f"{rank}.json"),
            ] + (["--quick"] if QUICK else [])
            procs.append(
                subprocess.Popen(
                    cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
                )
            )
        logs = []
        try:
            for p in procs:
                logs.append(p.communicate(timeout=timeout)[0].decode())
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            return {"error": f"timeout after {timeout:.0f} s"}
        failed = [
            (r, log) for r, (p, log) in enumerate(zip(procs, logs)) if p.returncode
        ]
        if failed:
            rank, log = failed[0]
            return {"error": f"rank {rank}: " + log.strip().splitlines()[-1]}
        results = []
        for rank in range(world):
            with open(os.path.join(tmp, f"{rank}.json")) as f:
                results.append(json.load(f))
    out = dict(results[0])
    out["seconds"] = max(r["seconds"] for r in results)
    return out


def fmt_bytes(b: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= size:
            return f"{b / size:,.1f} {unit}"
    return f"{b:,.0f} B"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--output", default=os.path.join(HERE, "output", "distributed.md")
    )
    parser.add_argument("--only", default="")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    sys.path.insert(0, HERE)
    from laplace_benchmark import checkout

    rows = []
    for case in CASES:
        if args.only not in case_name(case):
            continue
        by_world = {w: run(case, w, args.timeout) for w in WORLDS}
        rows.append((case, by_world))
        one, two = by_world[1], by_world[2]
        print(case_name(case), json.dumps(one), json.dumps(two), flush=True)

    command = "python benchmarks/distributed_benchmark.py" + (
        " --quick" if args.quick else ""
    )
    lines = [
        "## Data-parallel fitting: 1 and 2 processes (ours alone)",
        "",
        f"Command: `{command}`, at commit {checkout()}, on the CPU: gloo, "
        "1 thread per process. Each fit `Laplace(mlp, 'classification', subset, "
        "structure).fit(loader)`, the loader sharded by a `DistributedSampler` with 2 "
        "processes; time: the slowest rank's best of "
        f"{REPEATS} fits after a warm-up; bytes: the payload of the library's "
        "collectives per rank (`laplace.utils.distributed.traffic`); a gradient "
        "all-reduce: 4 bytes per weight of the model. MLPs: "
        + "; ".join(
            f"`{name}` {' -> '.join(map(str, w))} on {n:,} examples, batches of {b}"
            for name, (w, n, b) in MODELS.items()
        )
        + ".",
        "",
        "| model | subset | structure | weights treated | 1 process (s) "
        "| 2 processes (s) | speed-up | bytes sent per rank | collectives "
        "| × one gradient all-reduce |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case, by_world in rows:
        model, subset, structure, _ = case
        one, two = by_world[1], by_world[2]
        if "error" in one or "error" in two:
            error = one.get("error") or two.get("error")
            cells = [model, subset, structure, *["–"] * 6, error]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        grad = 4 * two["weights"]
        calls = ", ".join(f"{k} {v}" for k, v in sorted(two["calls"].items()))
        treated = f"{two['treated']:,}" if two["treated"] else "–"
        lines.append(
            f"| {model} | {subset} | {structure} | {treated} "
            f"| {one['seconds']:.3g} | {two['seconds']:.3g} "
            f"| {one['seconds'] / two['seconds']:.2f}× | {fmt_bytes(two['bytes'])} "
            f"| {calls} | {two['bytes'] / grad:.2f} |"
        )
    lines += [
        "",
        "Both processes hold the posterior of one process on all the data (tested "
        "in `tests/test_distributed.py` to 1e-10 in float64); the number of "
        "examples `n_data` and the loss agree: "
        + ", ".join(f"{case_name(c)} {'yes' if _agree(w) else 'NO'}" for c, w in rows)
        + ".",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        f.write(text)


def _agree(by_world: dict) -> bool:
    one, two = by_world[1], by_world[2]
    if "error" in one or "error" in two:
        return False
    close = abs(one["loss"] - two["loss"]) <= 1e-4 * max(abs(one["loss"]), 1.0)
    return one["n_data"] == two["n_data"] and close


if __name__ == "__main__":
    if "--worker" in sys.argv:
        parser = argparse.ArgumentParser()
        parser.add_argument("--worker", action="store_true")
        parser.add_argument("--quick", action="store_true")
        parser.add_argument("--case", required=True)
        parser.add_argument("--rank", type=int, required=True)
        parser.add_argument("--world", type=int, required=True)
        parser.add_argument("--init", required=True)
        parser.add_argument("--out", required=True)
        worker(parser.parse_args())
    else:
        main()
