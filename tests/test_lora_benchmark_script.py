"""The LoRA benchmark script: its count of the dense Kronecker factors is that of a
fitted Kron, its report checks the targets against the fine-tuning epoch and
compares the two libraries, and its quick run runs (a smoke test; timings are not
tested, and laplace-torch is not run)."""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "lora_benchmark.py"

pytest.importorskip("transformers")
pytest.importorskip("peft")


def load_script():
    spec = importlib.util.spec_from_file_location("lora_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # its dataclass looks its module up while the module is being executed
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lb():
    return load_script()


def table_rows(text: str, first: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith(f"| {first} |")
    ]


@pytest.mark.parametrize("model", ["c_attn", "all"])
def test_the_dense_factor_count_is_that_of_a_fitted_kron(lb, model, device):
    from laplace import Laplace

    layers, width, positions = 2, 64, 8
    net = lb.lora_classifier(layers, width, positions, lb.TARGETS[model])
    net = net.to(device=device, dtype=torch.float64)
    x = torch.randint(1, lb.VOCAB, (3, positions), device=device)
    y = torch.tensor([0, 1, 1], device=device)
    la = Laplace(
        net, "classification", subset_of_weights="all", hessian_structure="kron"
    )
    la.fit(torch.utils.data.DataLoader(list(zip(x, y)), batch_size=3))

    # the oracle: each adapter of a layer in -> out is A (r x in), factors r x r
    # and in x in, then B (out x r), factors out x out and r x r; the head score
    # (width -> 2, no bias) gets 2 x 2 and width x width
    r = lb.RANK
    expected = [(2, 2), (width, width)]
    for _ in range(layers):
        for n_in, n_out in lb.lora_shapes(width, lb.TARGETS[model]):
            expected += [(r, r), (n_in, n_in), (n_out, n_out), (r, r)]
    fitted = [tuple(F.shape) for block in la.H.kfacs for F in block]
    assert sorted(fitted) == sorted(expected)
    entries = sum(F.numel() for block in la.H.kfacs for F in block)
    assert entries == lb.dense_factor_entries(width, layers, lb.TARGETS[model])
    # only the adapters and the head are covered
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert la.n_params == trainable
    assert (
        trainable
        == layers
        * sum(
            r * (n_in + n_out)
            for n_in, n_out in lb.lora_shapes(width, lb.TARGETS[model])
        )
        + 2 * width
    )


def test_the_wide_width_is_the_first_whose_dense_factors_exceed_24_gib(lb):
    targets = lb.TARGETS["wide"]
    width = lb.width_beyond(24 * 2**30, 4, targets)
    assert width % 512 == 0
    assert lb.dense_factor_bytes(width - 512, 4, targets) <= 24 * 2**30
    assert lb.dense_factor_bytes(width, 4, targets) > 24 * 2**30
    # per block 46 width^2 entries (c_attn 1 + 9, attention c_proj 1 + 1, c_fc
    # 1 + 16, MLP c_proj 16 + 1) and 8 r^2, the head width^2 + 4, 4 bytes each
    assert lb.dense_factor_bytes(width, 4, targets) == 4 * (
        4 * (46 * width**2 + 8 * lb.RANK**2) + width**2 + 4
    )
    assert width == 6144 == lb.DENSE_BEYOND


def test_the_report_checks_the_targets_and_compares_the_libraries(lb):
    M, Case, OURS, LT = lb.Measurement, lb.Case, lb.OURS, lb.LT
    results = {
        # LoRA on c_attn: the Kron fit 1.5× the epoch's time and 2× its peak
        Case("epoch", "c_attn").key(OURS): M("e", 10.0, 100.0),
        Case("fit", "c_attn", "kron").key(OURS): M("k", 15.0, 200.0),
        Case("fit", "c_attn", "kron").key(LT): M("l", 45.0, 400.0),
        Case("fit", "c_attn", "diag").key(OURS): M("d", 5.0, 50.0),
        Case("fit", "c_attn", "diag").key(LT): M(
            "l", None, None, "fit: refused, ValueError: no diag"
        ),
        # all three adapters: no target, laplace-torch out of memory
        Case("epoch", "all").key(OURS): M("e", 20.0, 100.0),
        Case("fit", "all", "kron").key(OURS): M("k", 30.0, 120.0),
        Case("fit", "all", "kron").key(LT): M(
            "l", None, None, "fit: RuntimeError: can't allocate memory"
        ),
    }
    outputs = {
        Case("fit", "c_attn", "kron").key(OURS): {
            "log marglik": -100.0,
            "n_params": 66560,
            "factors MB": 80.0,
        },
        Case("fit", "c_attn", "kron").key(LT): {"log marglik": -100.01},
        Case("fit", "all", "kron").key(OURS): {"log marglik": -5.0},
    }
    text = lb.report(results, outputs, [], "not run.")
    lines = text.splitlines()

    def line(start: str) -> str:
        return next(ln for ln in lines if ln.startswith(start))

    attn = text[text.index("### LoRA on c_attn (") : text.index("### LoRA on c_attn,")]
    assert "(4 layers, width 512, 66,560 weights)" in attn
    assert table_rows(attn, "epoch (reference)") == [
        ["epoch (reference)", OURS, "AdamW, lr 0.0001", "10", "1×", "100", "1×", "", ""]
    ]
    kron = table_rows(attn, "kron")
    assert kron[0] == [
        "kron",
        OURS,
        "default (NativeGGN)",
        "15",
        "1.5×",
        "200",
        "2×",
        "",
        "",
    ]
    assert kron[1][1:4] == [LT, "default (CurvlinopsGGN)", "45"]
    assert kron[1][7:] == ["3×", "2×"]  # laplace-torch / ours
    assert [r[3] for r in table_rows(attn, "diag")] == ["5", "refused"]
    assert line("- Target (LoRA on c_attn): the time of our Kron fit").endswith(
        "at most 2× the epoch's: 1.5×, **met**."
    )
    assert line("- Target (LoRA on c_attn): the peak memory of our Kron fit").endswith(
        "at most 1.3× the epoch's: 2×, **NOT met**."
    )
    assert line("- LoRA on c_attn: our fitted Kron factors alone take 80.0 MB")
    assert line("- laplace-torch's diag fit (LoRA on c_attn): refused.")
    assert line("- Check (LoRA on c_attn, kron): both libraries agree").endswith(
        "largest relative difference 0.0001, **met**."
    )

    three = text[text.index("### LoRA on c_attn,") : text.index("### The dense")]
    assert "- Target" not in three
    assert line("- LoRA on c_attn, c_proj and c_fc (no target)").endswith(
        "our Kron fit takes 1.5× the epoch's time and 1.2× its peak memory."
    )
    assert line(
        "- laplace-torch's kron fit (LoRA on c_attn, c_proj and c_fc)"
    ).endswith("out of memory.")
    assert "- Check (LoRA on c_attn, c_proj" not in text  # laplace-torch failed
    assert "### LoRA on c_attn, c_proj and c_fc, wide" not in text  # not run

    assert "| 6,144 | 5.77 | 26.02 |" in text
    assert line("- The dense factors of LoRA on c_attn, c_proj and c_fc exceed 24 GB")
    assert line("- Low-rank factors (`low_rank_factors=32`): not run.")
    assert "### Errors" in text and "no diag" in text and "allocate" in text


def test_the_low_rank_workloads_run_only_when_asked_and_say_why_not(lb):
    M = lb.Measurement
    cases = {c.key(s): c for c in lb.CASES for s in c.sides}
    assert {k for k, c in cases.items() if c.low_rank} == {
        "fit|all|kron-lowrank|default|ours",
        "epoch|wide|ours",
        "fit|wide|kron-lowrank|default|ours",
    }

    class Args:
        low_rank = False

    assert "not run (`--low-rank`" in lb.low_rank_status(Args, {})
    Args.low_rank = True
    refused = M("f", None, None, "RuntimeError: refused, KronLaplace takes no "
                "low_rank_factors (...)")  # fmt: skip
    results = {
        "fit|all|kron-lowrank|default|ours": refused,
        "fit|wide|kron-lowrank|default|ours": refused,
    }
    assert "takes no `low_rank_factors` yet" in lb.low_rank_status(Args, results)
    results["fit|all|kron-lowrank|default|ours"] = M("f", 1.0, 2.0)
    assert lb.low_rank_status(Args, results) == "measured above."
    # the flag checks this library's KronLaplace before building the model
    from laplace import KronLaplace

    accepts = "low_rank_factors" in inspect.signature(KronLaplace).parameters
    assert lb.accepts_low_rank_factors() is accepts


@pytest.mark.slow  # ~1 minute: fresh processes import torch, transformers and peft
def test_lora_benchmark_quick_run_ours_only(tmp_path):
    output = tmp_path / "lora.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--ours-only",
            "--only",
            "|c_attn|",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "### LoRA on c_attn (2 layers, width 128, 8,448 weights)" in text
    assert "### LoRA on c_attn, c_proj" not in text  # not selected
    epoch = table_rows(text, "epoch (reference)")
    kron, diag = table_rows(text, "kron"), table_rows(text, "diag")
    assert len(epoch) == len(kron) == len(diag) == 1, text  # ours only
    assert epoch[0][4] == epoch[0][6] == "1×"
    for row in (kron[0], diag[0]):
        assert row[1:3] == ["ours", "default (NativeGGN)"]
        assert float(row[3]) > 0 and float(row[5]) >= 0  # measured, no error
    for what, target in (("time", "2"), ("peak memory", "1.3")):
        assert re.search(
            rf"- Target \(LoRA on c_attn\): the {what} of our Kron fit at most "
            rf"{target}× the epoch's: [\d.]+×, \*\*(NOT )?met\*\*\.",
            text,
        )
    assert "laplace-torch not run (`--ours-only`)" in text
    assert "### Errors" not in text
    assert output.read_text() == text.rstrip("\n") + "\n"
    raw = json.loads(output.with_suffix(".json").read_text())
    assert list(raw["results"]) == [
        "epoch|c_attn|ours",
        "fit|c_attn|kron|default|ours",
        "fit|c_attn|diag|default|ours",
    ]
    summary = raw["outputs"]["fit|c_attn|kron|default|ours"]
    assert summary["backend"] == "NativeGGN" and summary["n_params"] == 8448
    assert summary["factors MB"] > 0
