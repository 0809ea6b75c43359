"""``make bench``: the report of all benchmarks (``benchmarks/report.py``) and the
runner (``benchmarks/run_all.py``), without running a benchmark."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import report  # noqa: E402
import run_all  # noqa: E402


def _m(name: str, seconds: float | None, mb: float | None = 10.0, error=None):
    return {"name": name, "seconds": seconds, "peak_mb": mb, "error": error}


def _raw(results: dict) -> dict:
    return {"results": {k: _m(k, *v) for k, v in results.items()}}


def test_rows_compare_defaults_and_laplace_torchs_fastest_backend():
    raw = _raw(
        {
            "fit|C100|kron|default|ours": (0.5, 20.0),
            "fit|C100|kron|default|laplace-torch": (4.0, 40.0),
            "fit|C100|kron|BackPackGGN|laplace-torch": (2.0, 30.0),
            "fit|C100|kron|BackPackGGN|ours": (0.4, 10.0),
        }
    )
    (row,) = report.rows_of("lllaplace", raw)
    assert row.workload == "fit, 100 classes, kron"
    assert (row.ours_s, row.ours_mb, row.lt_s, row.lt_mb) == (0.5, 20.0, 4.0, 40.0)
    assert row.lt_fastest == ("BackPackGGN", 2.0)
    line = report.summary_table([row])[-1]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2:] == [
        "0.5 s",
        "4 s",
        "8×",
        "2 s (BackPackGGN)",
        "4×",
        "20 MB / 40 MB",
        "2×",
    ]


def test_rows_of_workloads_run_with_another_backend_and_without_one():
    raw = _raw(
        {
            "predictive|C100|diag|BackPackGGN|ours": (0.001, 0.2),
            "predictive|C100|diag|BackPackGGN|laplace-torch": (5.0, 4000.0),
            "gp|M2000|ours": (27.0, 4700.0),
            "gp|M2000|laplace-torch": (None, None, "timed out after 600 s"),
            "fit|S5|default|laplace-torch": (1.0,),  # not run by this library
        }
    )
    diag, gp = report.rows_of("b", raw)
    assert (
        diag.workload == "glm predictive, 100 classes, diag (BackPackGGN on both sides)"
    )
    assert gp.workload == "fit + evidence + predictive, n_subset 2,000"
    assert gp.lt_failure == "> 600 s (timed out)" and gp.lt_fastest is None
    diag_line, gp_line = report.summary_table([diag, gp])[2:]
    assert diag_line.endswith("| 0 MB / 4,000 MB | > 4,000× |")  # under 1 MB
    assert "| > 600 s (timed out) | > 22× |" in gp_line


def test_report_holds_the_summary_and_every_section(tmp_path):
    (tmp_path / "laplace.md").write_text("## laplace (ours) against laplace-torch\n")
    raw = _raw(
        {"fit|m|kron|default|ours": (1.0,), "fit|m|kron|default|laplace-torch": (3.0,)}
    )
    (tmp_path / "laplace.json").write_text(json.dumps(raw))
    out = tmp_path / "REPORT.md"
    text = report.write_report(str(tmp_path), str(out), ["- a header line"])
    assert out.read_text() == text
    lines = text.splitlines()
    start = lines.index("<!-- --8<-- [start:report] -->")
    assert lines[0] == "# Benchmark report" and start < lines.index("- a header line")
    assert lines[-1] == "<!-- --8<-- [end:report] -->"
    assert "| laplace | fit, m, kron | 1 s | 3 s | 3× |" in text
    assert "### laplace (ours) against laplace-torch" in lines  # nested one level
    assert text.count("_not run_") == len(report.BENCHMARKS) - 1


def test_committed_report_has_the_section_the_docs_include():
    text = (BENCHMARKS / "REPORT.md").read_text()
    assert "<!-- --8<-- [start:report] -->" in text
    assert "<!-- --8<-- [end:report] -->" in text
    assert "## Summary" in text


@pytest.fixture
def recorded(monkeypatch):
    """run_all's subprocesses recorded instead of run (each exits 0)."""
    calls: list[list[str]] = []

    def fake_run(cmd, *args, **kwargs):
        calls.append(list(cmd))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(run_all.subprocess, "run", fake_run)
    return calls


def test_without_laplace_torch_the_benchmarks_run_alone_and_say_so(tmp_path, recorded):
    missing = tmp_path / "no-such-python"
    argv = ["--lt-python", str(missing), "--output", str(tmp_path)]
    assert run_all.main([*argv, "--report", str(tmp_path / "R.md")]) == 0
    scripts = [Path(c[1]).name for c in recorded]
    assert scripts == [f"{name}_benchmark.py" for name, _ in report.BENCHMARKS]
    for cmd in recorded:
        assert "--lt-python" not in cmd
        # curvature compares backends with their own libraries, streaming with
        # posteriors (its own environment, found independently of laplace-torch)
        if "streaming_benchmark" not in cmd[1]:
            alone = any(name in cmd[1] for name in run_all.WITHOUT_LAPLACE_TORCH)
            assert ("--ours-only" in cmd) == (not alone)
    text = (tmp_path / "R.md").read_text()
    assert "laplace-torch could not be run, this library alone" in text
    assert str(missing) in text


def test_with_laplace_torch_each_comparison_gets_its_interpreter(
    tmp_path, recorded, monkeypatch
):
    monkeypatch.setattr(run_all, "lt_ready", lambda python: None)
    python = str(tmp_path / "lt" / "python")  # stands for one with laplace-torch
    options = ["--only", "functional", "subnet", "--output", str(tmp_path)]
    report_path = tmp_path / "R.md"
    assert (
        run_all.main(
            [
                *options,
                "--lt-python",
                python,
                "--reuse-lt",
                "--report",
                str(report_path),
            ]
        )
        == 0
    )
    assert [Path(c[1]).name for c in recorded] == [
        "functional_benchmark.py",
        "subnet_benchmark.py",
    ]
    functional, subnet = recorded
    for cmd in recorded:
        assert cmd[cmd.index("--lt-python") + 1] == python
        assert "--reuse-lt" in cmd and "--ours-only" not in cmd
    assert functional[functional.index("--timeout") + 1] == "600"  # a full run
    assert f"laplace-torch from `{python}`" in report_path.read_text()


def test_a_failed_install_of_laplace_torch_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(run_all, "LT_VENV", str(tmp_path / "venv"))

    def failing(cmd, *args, **kwargs):
        if "pip" in cmd:
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: no matching dist\n")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(run_all.subprocess, "run", failing)
    python, note = run_all.build_lt_venv("torch==2.13.0")
    assert python is None
    assert "torch==2.13.0" in note and "no matching dist" in note
