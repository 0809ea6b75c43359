"""How close the memory plans are: the peak memory ``laplace.utils.memory`` estimates
for ``fit`` and the GLM predictive against the peak measured, this library only.

For each case a fresh process (``_measure.py``) builds the model and the data
(fixed seeds, float32, eval mode), estimates the operation as the library's own
check does (``laplace.utils.memory`` on the Laplace object and the first batch),
then resets the kernel's peak-RSS counter (``/proc/self/clear_refs``) and runs the
operation once: the measured figure is the peak resident memory it added
(``VmHWM`` minus the resident memory before it). The judged figure is taken with
glibc returning every freed block above 64 kB to the kernel at once
(``MALLOC_MMAP_THRESHOLD_=65536``), so that the peak is that of live allocations,
what the estimates count; by default glibc keeps freed blocks of up to 32 MB for
reuse, which a peak then also counts (reported beside it, in a second fresh
process, not judged). On CUDA (``--device cuda``) the figure is
``torch.cuda.max_memory_allocated`` above the memory allocated before the run.
The predictive runs on a freshly fitted Laplace (the fit is not measured), so the
posterior it builds on first use is part of its cost.

Cases (classification; ``B`` the batch size):

- ``mlp``: the MLP 32-128-96-10 (17,578 weights: a dense ``P x P`` float32 is
  1.2 GB), all weights, ``full``; ``N = 512``, ``B = 64``; predictive on 256 inputs;
- ``cnn``: two 3x3 convolutions (3-32-64 channels, 32x32 images, ReLU, average
  pooling) and a linear head to 10 classes, all weights, ``kron`` and ``diag``;
  ``N = 256``, ``B = 128``; predictive on 128 inputs;
- ``gpt2``: ``GPT2ForSequenceClassification`` of a tiny config (2 layers, width
  128, 4 heads, 64 positions, vocabulary 1,000, 10 labels), all weights ``kron``
  and ``diag``, and the last layer ``kron`` (features of the last token), on 64
  token sequences of length 64, ``B = 32``; predictive on 32 sequences;
- ``wide``: the MLP 64-512-20, the last layer ``full`` (10,260 weights);
  ``N = 512``, ``B = 128``; predictive on 256 inputs.

The target of the issue: every estimate within 25% of the measured peak where that
peak is above 200 MB; smaller peaks are dominated by the allocator and by what
torch and the libraries allocate lazily, and are reported but not judged.

    python benchmarks/memory_plan_benchmark.py            # every case (~10 min)
    python benchmarks/memory_plan_benchmark.py --quick    # narrow layers, a smoke run
    python benchmarks/memory_plan_benchmark.py --only mlp # the cases whose name
                                                          # contains 'mlp'
    python benchmarks/memory_plan_benchmark.py --terms    # each estimate's terms

The table is printed and written to ``benchmarks/output/memory_plan.md`` (or
``--output``).
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))

from _measure import Timed, measure_in_subprocess, worker_main  # noqa: E402

QUICK = "--quick" in sys.argv
DEVICE = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cpu"
#: peaks below this are reported but not judged (allocator noise)
JUDGED_MB = 200.0
#: the estimate must be within this fraction of the measured peak
TOLERANCE = 0.25
#: (model, subset, structure) of every case
CASES = (
    ("mlp", "all", "full"),
    ("cnn", "all", "kron"),
    ("cnn", "all", "diag"),
    ("gpt2", "all", "kron"),
    ("gpt2", "all", "diag"),
    ("gpt2", "last_layer", "kron"),
    ("wide", "last_layer", "full"),
)
OPERATIONS = ("fit", "predictive")


def build(name: str):
    """``(model, train_loader, x_test)`` of a case, on ``DEVICE``."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    # --quick: narrower layers and less data (a smoke run of a few MB)
    w = 4 if QUICK else 1
    if name == "mlp":
        model = nn.Sequential(
            nn.Linear(32, 128 // w), nn.Tanh(), nn.Linear(128 // w, 96 // w),
            nn.Tanh(), nn.Linear(96 // w, 10),
        )  # fmt: skip
        n, batch, n_test = (128, 64, 64) if QUICK else (512, 64, 256)
        X = torch.randn(n + n_test, 32, generator=g)
    elif name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(3, 32 // w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32 // w, 64 // w, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64 // w, 10),
        )  # fmt: skip
        n, batch, n_test = (32, 16, 16) if QUICK else (256, 128, 128)
        X = torch.randn(n + n_test, 3, 32, 32, generator=g)
    elif name == "wide":
        model = nn.Sequential(
            nn.Linear(64, 512 // w), nn.ReLU(), nn.Linear(512 // w, 20)
        )
        n, batch, n_test = (128, 64, 64) if QUICK else (512, 128, 256)
        X = torch.randn(n + n_test, 64, generator=g)
    elif name == "gpt2":
        import transformers

        class Logits(nn.Module):
            def __init__(self, model: nn.Module) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids):
                return self.model(input_ids=input_ids).logits

        config = transformers.GPT2Config(
            n_layer=2, n_embd=128 // w, n_head=4, n_positions=64, vocab_size=1000,
            num_labels=10, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, summary_first_dropout=0.0,
        )  # fmt: skip
        model = Logits(transformers.GPT2ForSequenceClassification(config))
        n, batch, n_test = (8, 4, 4) if QUICK else (64, 32, 32)
        X = torch.randint(1, 1000, (n + n_test, 64), generator=g)
    else:
        raise ValueError(name)
    model = model.to(DEVICE).eval()
    y = torch.randint(0, 20 if name == "wide" else 10, (n,), generator=g)
    loader = DataLoader(TensorDataset(X[:n], y), batch_size=batch)
    return model, loader, X[n:].to(DEVICE)


def laplace_of(model, subset: str, structure: str):
    from laplace import Laplace

    # the features of the sequence classifier's head: those of the last token
    reduction = {"feature_reduction": "pick_last"} if subset == "last_layer" else {}
    return Laplace(
        model,
        "classification",
        subset_of_weights=subset,
        hessian_structure=structure,
        **reduction,
    )


def plan(la, operation: str, loader, x) -> dict:
    """The library's estimate of ``operation``, as its check computes it."""
    from laplace.utils import memory

    if operation == "fit":
        x1, B, _ = memory.first_example(loader, la.dict_key_x, la.dict_key_y)
        if not la._bound:  # a last layer: found as fit finds it
            la._find_last_layer(loader)
        op = "fit"
    else:
        x1, B = memory._one_example(x, la)
        op = "glm predictive"
    x1 = memory.to_device(x1, la._device)
    pb = memory.problem_of(la, x1, B, len(loader.dataset))
    est = memory.estimate(op, *memory._structure_of(la), pb, memory.settings_of(la))
    return {
        "estimate_mb": est.nbytes / 1e6,
        "dominant": str(est.dominant),
        "terms": [str(t) for t in est.terms if t.nbytes],
    }


def workload(name: str, subset: str, structure: str, operation: str):
    def setup() -> Timed:
        import torch

        from laplace.utils import memory_limit

        memory_limit("off")  # measure the operation, not the check
        model, loader, x = build(name)
        state: dict = {}

        def prepare() -> None:
            state.pop("la", None)
            la = laplace_of(model, subset, structure)
            if operation == "predictive":
                la.fit(loader)
            state["plan"] = plan(la, operation, loader, x)
            state["la"] = la
            if DEVICE == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                state["base"] = torch.cuda.memory_allocated()

        def run() -> None:
            la = state["la"]
            if operation == "fit":
                la.fit(loader)
            else:
                with torch.no_grad():
                    la(x)

        def peak_mb() -> float | None:
            if DEVICE != "cuda":
                return None
            torch.cuda.synchronize()
            # MiB, as _measure reports resident memory
            return (torch.cuda.max_memory_allocated() - state["base"]) / 2**20

        return Timed(
            run,
            before_each=prepare,
            summary=lambda: json.dumps(state["plan"]),
            peak_mb=peak_mb if DEVICE == "cuda" else None,
        )

    return setup


WORKLOADS = {
    f"{name}|{subset}|{structure}|{operation}": workload(
        name, subset, structure, operation
    )
    for name, subset, structure in CASES
    for operation in OPERATIONS
}


def verdict(estimate_mb: float, measured_mb: float) -> str:
    if measured_mb < JUDGED_MB:
        return "not judged (< 200 MB)"
    ok = abs(estimate_mb / measured_mb - 1) <= TOLERANCE
    return "**met**" if ok else "**NOT met**"


#: glibc returns every allocation above 64 kB to the kernel when it is freed, so
#: that the peak resident memory is that of live allocations (what the estimates
#: count, and what ``max_memory_allocated`` counts on CUDA); by default it keeps
#: freed blocks of up to 32 MB for reuse, which the peak then also counts
ALLOCATOR_CACHE_OFF = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def measure_case(name: str, extra: list[str], cache_off: bool):
    """The measurement of one case in a fresh process, its peak in MB."""
    saved = {k: os.environ.get(k) for k in ALLOCATOR_CACHE_OFF}
    if cache_off:
        os.environ.update(ALLOCATOR_CACHE_OFF)
    try:
        m = measure_in_subprocess(__file__, name, extra, timeout=600)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if m.peak_mb is not None:
        m.peak_mb *= 2**20 / 1e6  # _measure reports MiB
    return m


def main() -> None:
    output = os.path.join(HERE, "output", "memory_plan.md")
    if "--output" in sys.argv:
        output = sys.argv[sys.argv.index("--output") + 1]
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
    extra = ["--repeats", "1", "--device", DEVICE] + (["--quick"] if QUICK else [])
    from laplace_benchmark import checkout

    command = "python benchmarks/memory_plan_benchmark.py" + (
        " --quick" if QUICK else ""
    )
    cuda = DEVICE == "cuda"
    measured = (
        "`torch.cuda.max_memory_allocated` added"
        if cuda
        else "peak resident memory added (VmHWM), with glibc returning freed "
        "blocks above 64 kB at once (`MALLOC_MMAP_THRESHOLD_=65536`: the peak of "
        "live allocations); the last column is the peak with glibc's default, "
        "which also counts freed blocks it keeps for reuse (not judged)"
    )
    lines = [
        "## Memory plans: estimated against measured peak memory (ours alone)",
        "",
        f"Command: `{command}`, at commit {checkout()}, on {DEVICE}.",
        "",
        "Each row: one operation in a fresh process; the estimate is the library's "
        f"check (`laplace.utils.memory`), the measured figure the {measured}. "
        "Target: within 25% where the measured peak is above 200 MB.",
        "",
        "| case | operation | estimate | measured | estimate / measured | verdict "
        "| dominant term |" + ("" if cuda else " default glibc |"),
        "|---|---|---|---|---|---|---|" + ("" if cuda else "---|"),
    ]
    failures, judged, met = [], 0, 0
    for name in WORKLOADS:
        if only is not None and only not in name:
            continue
        m = measure_case(name, extra, cache_off=not cuda)
        model, subset, structure, operation = name.split("|")
        case = f"{model} {subset}/{structure}"
        if m.peak_mb is None or m.note is None or m.note.startswith("no summary"):
            failures.append(f"- {name}: {m.error or m.note}")
            lines.append(f"| {case} | {operation} | – | – | – | failed | |")
            continue
        p = json.loads(m.note)
        est, peak = p["estimate_mb"], m.peak_mb
        ratio = est / peak if peak > 0 else float("inf")
        judgement = verdict(est, peak)
        judged += "judged" not in judgement
        met += judgement == "**met**"
        row = (
            f"| {case} | {operation} | {est:,.0f} MB | {peak:,.0f} MB | "
            f"{ratio:.2f} | {judgement} | {p['dominant']} |"
        )
        if not cuda:
            d = measure_case(name, extra, cache_off=False)
            if d.peak_mb is None:
                row += " – |"
            elif d.peak_mb < 1:
                row += f" {d.peak_mb:,.0f} MB |"
            else:
                row += f" {d.peak_mb:,.0f} MB ({est / d.peak_mb:.2f}) |"
        print(row, flush=True)
        if "--terms" in sys.argv:
            print("   " + "; ".join(p["terms"]), flush=True)
        lines.append(row)
    outcome = (
        "none above 200 MB (nothing judged)"
        if judged == 0
        else f"{met} of {judged}, " + ("**met**." if met == judged else "**NOT met**.")
    )
    lines += [
        "",
        "- Target: every estimate within 25% of the measured peak above 200 MB: "
        + outcome,
    ]
    if failures:
        lines += ["", "### Errors", "", *failures]
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker_main(WORKLOADS)
    else:
        main()
