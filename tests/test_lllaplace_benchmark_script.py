"""The last-layer Laplace benchmark script runs and reports (a smoke test; timings
are not tested, and laplace-torch is not run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~10 s: two fresh processes import torch
def test_lllaplace_benchmark_quick_run_ours_only(tmp_path):
    script = ROOT / "benchmarks" / "lllaplace_benchmark.py"
    output = tmp_path / "lllaplace.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            "--quick",
            "--ours-only",
            "--only",
            "predictive|C100|kron",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 100 |")]
    assert len(rows) == 1, proc.stdout  # only the workload asked for
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[:4] == ["100", "kron", "10", "default"]
    assert float(cells[4]) > 0  # a time was measured, no error
    assert cells[5] == "–"  # laplace-torch not run
    assert "laplace-torch not run (`--ours-only`)" in proc.stdout
    assert "### Errors" not in proc.stdout
    assert output.read_text() == proc.stdout.rstrip("\n") + "\n"
    raw = json.loads(output.with_suffix(".json").read_text())
    assert list(raw["results"]) == ["predictive|C100|kron|default|ours"]
