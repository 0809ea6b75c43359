"""The benchmark script runs and reports (a smoke test; timings are not tested)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_curvature_benchmark_quick_run(tmp_path):
    script = ROOT / "benchmarks" / "curvature_benchmark.py"
    only = "MLP 196-8-10|full|"
    proc = subprocess.run(
        [
            *(sys.executable, str(script), "--quick", "--only", only + "NativeGGN"),
            *("--output", str(tmp_path / "curvature.md")),  # not benchmarks/output/
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| MLP")]
    assert len(rows) == 4  # one per backend, the others not measured
    row = next(line for line in rows if "NativeGGN" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:3] == ["MLP 196-8-10", "full", "**NativeGGN** (default)"]
    assert float(cells[3]) > 0  # a time was measured, no error
    assert cells[5] == "–"  # the engine is no other library: nothing direct
    assert (tmp_path / "curvature.md").exists()
