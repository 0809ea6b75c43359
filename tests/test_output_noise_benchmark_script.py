"""The per-output noise benchmark script runs and reports both noises for every
phase (a smoke test; timings are not tested)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "output_noise_benchmark.py"


@pytest.mark.slow  # ~20 s: six fresh processes import torch
def test_output_noise_benchmark_quick_run(tmp_path):
    output = tmp_path / "output_noise.md"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--only", "kron", "--output", output],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in output.read_text().splitlines()
        if line.startswith("| kron |")
    ]
    assert [r[2] for r in rows] == ["fit", "evidence step", "predictive"]
    for row in rows:
        assert row[1] == "3"
        assert " ms / " in row[3] and " ms / " in row[4], row
        assert row[5].endswith("x"), row
