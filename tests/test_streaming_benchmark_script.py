"""The streaming benchmark script (one ``update`` of ``laplace.streaming`` against
posteriors' ``dense_ggn`` and ``diag_ggn``) runs and reports (a smoke test; timings
are not tested); with posteriors' environment, both libraries' precisions agree; its
report checks the targets; ``run_all.py`` and ``report.py`` take it in."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "streaming_benchmark.py"
POSTERIORS_PYTHON = ROOT / ".posteriors-venv" / "bin" / "python"
#: the smallest quick MLP, 32-16-10: both methods run at it
SMALLEST = "P698|"


def table_rows(text: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith(("| dense_ggn |", "| diag_ggn |"))
    ]


def run_quick(
    tmp_path: Path, *options: str
) -> tuple[subprocess.CompletedProcess, Path]:
    output = tmp_path / "streaming.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--only",
            SMALLEST,
            "--output",
            str(output),
            *options,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    return proc, output


@pytest.mark.slow  # ~20-30 s: three fresh processes import laplace (6 s each)
def test_streaming_benchmark_quick_run_ours_only(tmp_path):
    proc, output = run_quick(tmp_path, "--ours-only")
    rows = table_rows(proc.stdout)
    assert [r[:3] for r in rows] == [
        ["dense_ggn", "698", "32-16-10 tanh"],
        ["diag_ggn", "698", "32-16-10 tanh"],
    ]
    for cells in rows:
        assert len(cells) == 12
        assert float(cells[3]) > 0 and float(cells[6]) >= 0  # measured, no error
        # posteriors not run: no figures, no comparison, no verdict
        assert cells[4:6] == ["–", "–"] and cells[7:] == ["–"] * 5
    assert "posteriors not run (`--ours-only`)" in proc.stdout
    assert "- ours: laplace " in proc.stdout
    assert "### Errors" not in proc.stdout and "- Targets" not in proc.stdout
    assert output.read_text() == proc.stdout.rstrip("\n") + "\n"
    raw = json.loads(output.with_suffix(".json").read_text())
    assert raw["quick"] is True
    assert list(raw["results"]) == [
        "update|dense_ggn|P698|ours",
        "update|diag_ggn|P698|ours",
    ]
    assert all(m["runs"] == 3 and m["note"] for m in raw["results"].values())
    assert raw["outputs"] == {}  # only posteriors' results are kept


@pytest.mark.slow  # ~40 s: six fresh processes import laplace or posteriors
@pytest.mark.skipif(
    not POSTERIORS_PYTHON.exists(), reason="no .posteriors-venv with posteriors"
)
def test_streaming_benchmark_quick_run_agrees_with_posteriors(tmp_path):
    proc, output = run_quick(tmp_path, "--posteriors-python", str(POSTERIORS_PYTHON))
    assert "### Errors" not in proc.stdout, proc.stdout
    assert "- posteriors: posteriors 0.1.3" in proc.stdout
    rows = table_rows(proc.stdout)
    assert [r[0] for r in rows] == ["dense_ggn", "diag_ggn"]
    for cells in rows:
        assert float(cells[3]) > 0 and float(cells[4]) > 0
        assert float(cells[9]) <= 5e-4  # max rel. diff. of the precisions
        assert cells[10] in ("**met**", "**NOT met**")
    assert "- Check: the precisions of both libraries agree within 0.0005" in (
        proc.stdout
    )
    assert "**met**." in proc.stdout.split("- Check:")[1].splitlines()[0]
    # posteriors' entries are kept for --reuse-peer, which then measures ours only
    raw = json.loads(output.with_suffix(".json").read_text())
    assert sorted(raw["outputs"]) == [
        "update|dense_ggn|P698|posteriors",
        "update|diag_ggn|P698|posteriors",
    ]
    n = 698
    assert raw["outputs"]["update|diag_ggn|P698|posteriors"]["precision"]["shape"] == [
        n
    ]
    assert raw["outputs"]["update|dense_ggn|P698|posteriors"]["precision"]["shape"] == [
        n + 20_000
    ]


def load_script():
    spec = importlib.util.spec_from_file_location("streaming_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # its dataclasses look their module up while the module is being executed
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_streaming_benchmark_sizes_and_problem():
    sb = load_script()
    assert [s.n_params for s in sb.SIZES] == [4_998, 19_975, 50_151]
    assert [s.mlp for s in sb.SIZES] == [
        "32-116-10 tanh",
        "32-121-121-10 relu",
        "32-203-203-10 relu",
    ]
    # dense at 5k and 20k unless asked for 50k; diag at every size
    keys = [c.key("ours") for c in sb.cases(dense_50k=False)]
    assert keys == [
        "update|dense_ggn|P4998|ours",
        "update|dense_ggn|P19975|ours",
        "update|diag_ggn|P4998|ours",
        "update|diag_ggn|P19975|ours",
        "update|diag_ggn|P50151|ours",
    ]
    assert len(sb.cases(dense_50k=True)) == 6
    # the same weights and data in every process
    model, params, (x, y) = sb.problem(sb.SIZES[0])
    _, again, (x2, y2) = sb.problem(sb.SIZES[0])
    assert sorted(params) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert all((params[k] == again[k]).all() for k in params)
    assert (x == x2).all() and (y == y2).all() and x.shape == (128, 32)
    assert params["0.weight"].abs().max() <= 32**-0.5


def test_streaming_benchmark_report_targets_and_agreement():
    sb = load_script()
    M = sb.Measurement
    dense, diag = sb.Case("dense_ggn", sb.SIZES[0]), sb.Case("diag_ggn", sb.SIZES[0])
    results = {
        # dense: 10× as fast, a tenth of the memory
        dense.key("ours"): M("o", 0.1, 10.0),
        dense.key("posteriors"): M("p", 1.0, 100.0),
        # diag: 2× as fast, more memory
        diag.key("ours"): M("o", 0.1, 20.0),
        diag.key("posteriors"): M("p", 0.2, 10.0),
    }

    def entries(values):
        import base64
        import struct

        raw = struct.pack(f"<{len(values)}f", *values)
        f32 = base64.b64encode(raw).decode()
        return {"precision": {"shape": [len(values)], "f32": f32}}

    outputs = {
        # under 1e-4 x the largest entry: compared as if that large, 5e-6
        dense.key("ours"): entries([1.0, 2.0, 1e-9]),
        dense.key("posteriors"): entries([1.0, 2.0, 0.0]),
        diag.key("ours"): entries([1.0, 4.0]),
        diag.key("posteriors"): entries([1.0, 4.01]),
    }
    text = sb.report(results, outputs, [], [dense, diag])
    rows = table_rows(text)
    assert rows[0][3:] == [
        "0.1",
        "1",
        "10×",
        "10",
        "100",
        "10×",
        "5e-06",
        "**met**",
        "**met**",
    ]
    assert rows[1][5] == "2×" and rows[1][8] == "0.5×" and rows[1][9] == "0.0025"
    assert rows[1][10:] == ["**NOT met**", "**NOT met**"]
    assert "every row: **NOT met** (2 of 4 missed)." in text
    assert "agree within 0.0005 (max rel. diff. 0.0025): **NOT met**." in text
    # a posteriors failure is shown and listed
    results[diag.key("posteriors")] = M("p", None, None, "timed out after 300 s")
    text = sb.report(results, {}, [], [dense, diag])
    assert table_rows(text)[1][4] == "timeout"
    assert "### Errors" in text and "timed out after 300 s" in text


def test_run_all_and_report_take_in_the_streaming_benchmark(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report
    import run_all

    assert "streaming" in [name for name, _ in report.BENCHMARKS]
    args = SimpleNamespace(output=str(tmp_path), quick=True, reuse_lt=True)
    alone = run_all.benchmark_command("streaming", args, "lt/python", None)
    assert alone[-1] == "--ours-only" and "--lt-python" not in alone
    cmd = run_all.benchmark_command("streaming", args, None, "p/python")
    assert cmd[cmd.index("--posteriors-python") + 1] == "p/python"
    assert "--reuse-peer" in cmd and "--ours-only" not in cmd
    assert "--quick" in cmd and "--lt-python" not in cmd

    def m(name, seconds, mb):
        return {"name": name, "seconds": seconds, "peak_mb": mb, "error": None}

    raw = {
        "results": {
            "update|dense_ggn|P4998|ours": m("o", 0.5, 20.0),
            "update|dense_ggn|P4998|posteriors": m("p", 5.0, 80.0),
        }
    }
    (row,) = report.rows_of("streaming", raw)
    assert row.workload == "one update, dense_ggn, 4,998 weights (against posteriors)"
    assert (row.ours_s, row.lt_s, row.lt_mb) == (0.5, 5.0, 80.0)
    cells = [c.strip() for c in report.summary_table([row])[-1].split("|")[1:-1]]
    assert cells[2:5] == ["0.5 s", "5 s", "10×"] and cells[-1] == "4×"
