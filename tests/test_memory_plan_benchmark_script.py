"""The memory-plan benchmark script runs and reports the estimate, the measured peak
and their ratio (a smoke test on narrow layers; the figures are not judged)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "memory_plan_benchmark.py"


@pytest.mark.slow  # ~15 s: two fresh processes import torch
def test_memory_plan_benchmark_quick_run(tmp_path):
    output = tmp_path / "memory_plan.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--only",
            "mlp|all|full|fit",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    text = output.read_text()
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("| mlp ")
    ]
    assert len(rows) == 1, text
    case, operation, estimate, measured, ratio, verdict, dominant, default = rows[0]
    assert (case, operation) == ("mlp all/full", "fit")
    est, peak = (
        float(v.removesuffix(" MB").replace(",", "")) for v in (estimate, measured)
    )
    assert est > 0 and peak > 0
    assert float(ratio) == pytest.approx(est / peak, abs=0.01)
    assert verdict == "not judged (< 200 MB)"  # narrow layers: a few MB
    assert dominant.startswith("curvature (")
    assert default.endswith(")") and " MB (" in default
    assert "none above 200 MB (nothing judged)" in text
    assert "### Errors" not in text
