"""The subnetwork Laplace / marglik_training benchmark script runs and reports (a
smoke test; timings are not tested, and laplace-torch is not run), and its report
checks the targets against laplace-torch's default and fastest backends."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "subnet_benchmark.py"


def table_rows(text: str, first: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith(f"| {first} |")
    ]


@pytest.mark.slow  # ~15 s: three fresh processes import torch
def test_subnet_benchmark_quick_run_ours_only(tmp_path):
    output = tmp_path / "subnet.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--ours-only",
            "--only",
            "S1000|default|ours",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    rows = table_rows(proc.stdout, "1,000")
    timing = [r for r in rows if len(r) == 11]
    assert len(timing) == 1, proc.stdout  # ours only, fit and predictive
    cells = timing[0]
    assert cells[1:3] == ["ours", "default (NativeGGN)"]
    assert float(cells[3]) > 0 and float(cells[7]) > 0  # measured, no error
    assert cells[4] == cells[8] == ""  # no speed-up: laplace-torch not run
    # the memory table: S² and 128 · 9 · S float32 entries in MB, 4 × their sum
    # + 300 MB, and our peak within it
    memory = [r for r in rows if len(r) == 6]
    assert len(memory) == 1 and memory[0][1:4] == ["4", "4", "333"]
    assert 0 <= float(memory[0][4]) <= 333 and memory[0][5] == "–"
    assert "290 GB" in proc.stdout
    assert "at every S: **met**." in proc.stdout
    # the results to compare: ours only
    compared = table_rows(proc.stdout, "fit") + table_rows(proc.stdout, "predictive")
    assert [r[:2] for r in compared] == [
        ["fit", "S = 1,000"],
        ["predictive", "S = 1,000"],
    ]
    assert compared[0][3].startswith("log marglik -")
    assert compared[0][4] == compared[1][4] == "–"
    assert "laplace-torch not run (`--ours-only`)" in proc.stdout
    assert "### Errors" not in proc.stdout
    assert output.read_text() == proc.stdout.rstrip("\n") + "\n"
    raw = json.loads(output.with_suffix(".json").read_text())
    assert list(raw["results"]) == [
        "fit|S1000|default|ours",
        "predictive|S1000|default|ours",
    ]


@pytest.mark.slow  # ~10 s
def test_subnet_benchmark_quick_marglik_training_ours_only(tmp_path):
    output = tmp_path / "subnet.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--ours-only",
            "--only",
            "marglik|kron|default",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    rows = table_rows(proc.stdout, "kron")
    assert len(rows) == 1, proc.stdout
    assert rows[0][1:3] == ["ours", "default (AsdlGGN)"]
    assert float(rows[0][3]) > 0
    assert "### Errors" not in proc.stdout
    raw = json.loads(output.with_suffix(".json").read_text())
    assert list(raw["results"]) == ["marglik|kron|default|ours"]


def load_script():
    spec = importlib.util.spec_from_file_location("subnet_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # its dataclass looks its module up while the module is being executed
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_subnet_benchmark_report_targets():
    sb = load_script()
    M, Case, OURS, LT = sb.Measurement, sb.Case, sb.OURS, sb.LT
    small, large = sb.SUBNETS

    def fit(s, backend=None):
        return Case("fit", subnet=s, backend=backend)

    kron = Case("marglik", structure="kron")
    results = {
        # S small: ours 1 s, laplace-torch's default 4 s, BackPACK 0.5 s, ASDL fails
        fit(small).key(OURS): M("o", 1.0, 50.0),
        fit(small).key(LT): M("l", 4.0, 4000.0),
        fit(small, "BackPackGGN").key(LT): M("b", 0.5, 1000.0),
        fit(small, "AsdlGGN").key(LT): M("a", None, None, "timed out after 900 s"),
        # S large: ours over the memory bound
        fit(large).key(OURS): M("o", 2.0, sb.bound_mb(large) + 1),
        fit(large).key(LT): M("l", 8.0, 4000.0),
        # marglik_training: laplace-torch's default is its fastest
        kron.key(OURS): M("o", 1.0, 10.0),
        kron.key(LT): M("l", 2.0, 20.0),
        Case("marglik", structure="kron", backend="BackPackGGN").key(LT): M(
            "b", 3.0, 20.0
        ),
    }
    text = sb.report(results, {}, [])
    lines = text.splitlines()
    rows = table_rows(text, f"{small:,}")
    assert [r[1:3] for r in rows if len(r) == 11] == [
        ["ours", "default (NativeGGN)"],
        [LT, "default (CurvlinopsGGN)"],
        [LT, "BackPackGGN"],
        [LT, "AsdlGGN"],
    ]
    assert [r[4] for r in rows if len(r) == 11] == ["", "4×", "0.5×", "–"]
    assert [r[3] for r in rows if len(r) == 11][-1] == "timeout"
    small_fit = next(
        ln for ln in lines if ln.startswith(f"- Target: subnetwork fit, S = {small:,}")
    )
    assert "default (CurvlinopsGGN, 4 s): 4×, **met**" in small_fit
    assert small_fit.endswith(
        "as its fastest backend (BackPackGGN, 0.5 s): 0.5×, **NOT met** "
        "(laplace-torch's AsdlGGN: timeout)."
    )
    large_fit = next(
        ln for ln in lines if ln.startswith(f"- Target: subnetwork fit, S = {large:,}")
    )
    assert large_fit.endswith("4×, **met**.")  # no other backend measured
    memory = next(ln for ln in lines if ln.startswith("- Target: our subnetwork fit"))
    assert memory.endswith(f"**NOT met** (S = {large:,}).")
    ml = next(ln for ln in lines if ln.startswith("- Target: `marglik_training`, Kron"))
    assert (
        "default (AsdlGGN, 2 s): 2×, **met**; its default is its fastest backend." in ml
    )
    assert "### Errors" in text and "timed out after 900 s" in text
