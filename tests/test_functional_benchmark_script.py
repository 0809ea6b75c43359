"""The FunctionalLaplace benchmark script runs and reports (a smoke test; timings
are not tested, and laplace-torch is not run), and reports laplace-torch's failures
with lower bounds on its time."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "functional_benchmark.py"


def table_rows(text: str, first: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith(f"| {first} |")
    ]


@pytest.mark.slow  # ~10 s: two fresh processes import torch
def test_functional_benchmark_quick_run_ours_only(tmp_path):
    output = tmp_path / "functional.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--ours-only",
            "--only",
            "M300|",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    rows = table_rows(proc.stdout, "300")
    timing = [r for r in rows if len(r) == 7]
    assert [r[1] for r in timing] == ["fit", "marglik", "predictive", "total"]
    for cells in timing:
        assert float(cells[2]) > 0  # a time was measured, no error
        assert cells[3] == cells[4] == cells[6] == "–"  # laplace-torch not run
        assert float(cells[5].replace(",", "")) >= 0
    # the memory table: the kernel, (300 · 10)², and the Jacobians, 300 · 10 ·
    # 269,322 float32 entries, in MB
    memory = [r for r in rows if len(r) == 5 and r[4] == "3,082"]
    assert len(memory) == 1 and memory[0][1] == "34"
    # the results to compare: ours only
    compared = [r for r in rows if len(r) == 5 and r[4].startswith("the whole")]
    assert len(compared) == 1 and float(compared[0][1]) < 0
    assert compared[0][2] == compared[0][3] == "–"
    assert "- Target (c)" in proc.stdout
    assert "laplace-torch not run (`--ours-only`)" in proc.stdout
    assert "### Errors" not in proc.stdout
    assert output.read_text() == proc.stdout.rstrip("\n") + "\n"
    raw = json.loads(output.with_suffix(".json").read_text())
    assert list(raw["results"]) == ["gp|M300|ours"]
    dumped = raw["outputs"]["gp|M300|ours"]
    assert set(dumped["phases"]) == {"fit", "marglik", "predictive"}
    assert dumped["probs"]["shape"] == [50, 10]


def load_script():
    spec = importlib.util.spec_from_file_location("functional_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_functional_benchmark_reports_failures_with_lower_bounds():
    fb = load_script()
    M = fb.Measurement
    phases = {"fit": 1.0, "marglik": 0.5, "predictive": 1.5}
    results = {
        # laplace-torch runs out of memory 5 s into its fit: ours (3 s in total) is
        # not well under that
        fb.key(500, fb.OURS): M("ours500", 3.0, 100.0),
        fb.key(500, fb.LT): M(
            "lt500",
            None,
            None,
            "RuntimeError: fit: can't "
            "allocate memory: you tried to allocate 2150000000 bytes",
        ),
        # laplace-torch's fit takes 1,000 s, then it times out 700 s into marglik
        fb.key(2000, fb.OURS): M("ours2000", 3.0, 100.0),
        fb.key(2000, fb.LT): M("lt2000", None, None, "timed out after 3600 s"),
    }
    outputs = {
        fb.key(500, fb.OURS): {"phases": phases, "peaks": {"fit": 100.0}},
        fb.key(500, fb.LT): {"phases": {}, "running": "fit", "failed after": 5.0},
        fb.key(2000, fb.OURS): {"phases": phases, "peaks": {"fit": 100.0}},
        fb.key(2000, fb.LT): {
            "phases": {"fit": 1000.0},
            "running": "marglik",
            "running since": 10_000.0,
            "deadline": 10_700.0,
        },
    }
    text = fb.report(results, outputs, [])
    at_500 = {r[1]: r for r in table_rows(text, "500") if len(r) == 7}
    assert at_500["fit"][3] == "≥ 5 (out of memory (asked 2.15 GB))"
    assert at_500["fit"][4] == "≥ 5×"
    assert at_500["marglik"][3] == "–"  # not reached
    assert at_500["total"][3] == "≥ 5 (out of memory (asked 2.15 GB))"
    assert at_500["total"][4] == "≥ 1.67×"
    at_2000 = {r[1]: r for r in table_rows(text, "2,000") if len(r) == 7}
    assert at_2000["fit"][3] == "1,000"
    assert at_2000["marglik"][3] == "≥ 700 (timeout)"
    assert at_2000["total"][3] == "≥ 1,700 (timeout)"
    assert at_2000["total"][4] == "≥ 567×"
    lines = text.splitlines()
    a_500 = next(line for line in lines if line.startswith("- Target (a), M = 500"))
    assert a_500.endswith("**NOT met** (total).")  # fit 5/1 s, but total 5/3 s < 2×
    a_2000 = next(line for line in lines if line.startswith("- Target (a), M = 2,00"))
    assert a_2000.endswith("not measured.")  # laplace-torch's predictive never ran
    b = next(line for line in lines if line.startswith("- Target (b)"))
    assert b.endswith("≥ 567×, **met**.")
    assert "### Errors" in text
