"""The data-parallel benchmark script runs 1 and 2 gloo processes and reports the
time, the bytes sent and their ratio to a gradient all-reduce (a smoke test on the
quick data; the times are not judged)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "distributed_benchmark.py"


@pytest.mark.slow  # ~20 s: three fresh processes import torch
@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_distributed_benchmark_quick_run(tmp_path):
    output = tmp_path / "distributed.md"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--only", "small|all|diag"]
        + ["--output", str(output)],
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
        if line.startswith("| small ")
    ]
    assert len(rows) == 1
    model, subset, structure, treated, one, two, _, sent, calls, ratio = rows[0]
    assert (model, subset, structure, treated) == ("small", "all", "diag", "3,850")
    assert float(one) > 0 and float(two) > 0
    # Diag sends its (P,) curvature and the loss (one gradient all-reduce, 15.4
    # kB) and two small records per rank (the agreement points, pickled)
    assert sent.endswith(" kB") and 15.4 < float(sent.split()[0]) < 17.0
    assert 1.0 < float(ratio) < 1.1
    assert "all_reduce" in calls
    assert "small|all|diag yes" in text
