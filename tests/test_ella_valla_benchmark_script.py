"""The ELLA and VaLLA benchmark script runs and reports (a smoke test; timings are
not tested, and laplace-torch is not run); its report compares the two libraries'
predictives with each one's seed-to-seed spread; ``run_all.py`` and ``report.py``
take it in."""

from __future__ import annotations

import base64
import importlib.util
import json
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "ella_valla_benchmark.py"


def table_rows(text: str, first: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith(f"| {first}")
    ]


def run_quick(tmp_path: Path, only: str) -> tuple[subprocess.CompletedProcess, Path]:
    output = tmp_path / "ella_valla.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--ours-only",
            "--only",
            only,
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    return proc, output


@pytest.mark.slow  # ~20-30 s: three fresh processes import laplace
def test_ella_valla_benchmark_quick_run_ours_only(tmp_path):
    proc, output = run_quick(tmp_path, "N300|s20|k10|")
    timing = table_rows(proc.stdout, "N = 300, s = 20, k = 10 |")
    assert [r[1] for r in timing] == ["fit", "predictive", "gridsearch", "total"]
    for cells in timing:
        assert len(cells) == 7
        assert float(cells[2]) > 0  # a time was measured, no error
        assert cells[3] == cells[4] == cells[6] == "–"  # laplace-torch not run
        assert float(cells[5].replace(",", "")) >= 0
    # VaLLA was not asked for
    assert "### VaLLA" not in proc.stdout
    # the agreement table: ours' seed-to-seed spread only
    agreement = table_rows(proc.stdout, "ELLA |")
    assert [r[2] for r in agreement] == ["probit probabilities", "latent variances"]
    for cells in agreement:
        assert float(cells[3]) > 0  # the seeds change the predictive
        assert cells[4] == "–" and cells[5] == "– (0 seeds)" and cells[6] == "–"
    assert "seed to another: not measured." in proc.stdout
    assert "laplace-torch not run (`--ours-only`)" in proc.stdout
    assert "### Errors" not in proc.stdout
    assert output.read_text() == proc.stdout.rstrip("\n") + "\n"
    raw = json.loads(output.with_suffix(".json").read_text())
    assert list(raw["results"]) == [
        "ella|N300|s20|k10|ours",
        "seeds|ella|N300|s20|k10|ours",
    ]
    timed = raw["outputs"]["ella|N300|s20|k10|ours"]
    assert set(timed["phases"]) == {"fit", "predictive", "gridsearch"}
    assert timed["probs"]["shape"] == timed["var"]["shape"] == [100, 10]
    assert timed["prior precision"] > 0 and "model checksum" in timed
    seeds = raw["outputs"]["seeds|ella|N300|s20|k10|ours"]
    assert {"probs@1", "probs@2", "var@1", "var@2"} <= set(seeds)


def load_script():
    spec = importlib.util.spec_from_file_location("ella_valla_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # its dataclasses look their module up while the module is being executed
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


def tensor(values: list[float]) -> dict:
    raw = struct.pack(f"<{len(values)}f", *values)
    return {"shape": [len(values)], "f32": base64.b64encode(raw).decode()}


def test_ella_valla_benchmark_cases_and_keys():
    eb = load_script()
    keys = [c.key("ours") for c in eb.CASES]
    assert keys == [
        "ella|N1000|s50|k20|ours",
        "ella|N5000|s200|k50|ours",
        "ella|N20000|s500|k100|ours",
        "valla|N1000|Z20|ours",
        "valla|N5000|Z50|ours",
        "valla|N20000|Z100|ours",
    ]
    seeds = eb.CASES[0].seeds_key("laplace-torch")
    assert seeds == "seeds|ella|N1000|s50|k20|laplace-torch"
    assert eb.N_PARAMS == 22_026
    # the same trained network and data in every process
    a, b = eb.problem(200), eb.problem(200)
    assert eb.model_checksum(a["model"]) == eb.model_checksum(b["model"])
    assert (a["train"][0] == b["train"][0]).all()
    assert (a["test"] == b["test"]).all() and a["test"].shape == (eb.N_TEST, 32)


def test_ella_valla_benchmark_report_agreement_and_targets():
    eb = load_script()
    M = eb.Measurement
    ella = eb.CASES[0]
    phases = {"fit": 1.0, "predictive": 0.5, "gridsearch": 2.0}
    results = {
        ella.key("ours"): M("o", 3.5, 10.0),
        ella.key("laplace-torch"): M("l", 10.0, 100.0),
    }
    # probabilities: ours and laplace-torch at most 0.05 apart at a seed; the seeds
    # move each one's by 0.1 at least
    outputs = {
        ella.key("ours"): {
            "phases": {**phases, "predictive": 2.0},
            "peaks": {"fit": 5.0},
            "probs": tensor([0.5, 0.5]),
            "model checksum": 1.5,
            "prior precision": 2.0,
        },
        ella.key("laplace-torch"): {
            "phases": phases,
            "peaks": {"fit": 50.0},
            "probs": tensor([0.500001, 0.499999]),
            "model checksum": 1.5,
            "prior precision": 2.0,
        },
        ella.seeds_key("ours"): {
            "probs@1": tensor([0.6, 0.4]),
            "probs@2": tensor([0.8, 0.2]),
        },
        ella.seeds_key("laplace-torch"): {
            "probs@1": tensor([0.6, 0.4]),
            "probs@2": tensor([0.75, 0.25]),
        },
    }
    text = eb.report(results, outputs, [])
    rows = {r[1]: r for r in table_rows(text, "N = 1,000, s = 50, k = 20 |")}
    assert rows["fit"][2:5] == ["1", "1", "1×"]
    assert rows["predictive"][4] == "0.25×"  # ours slower here
    assert rows["total"][4] == "2.86×"
    assert "(slower: predictive)." in text
    (probs,) = table_rows(text, "ELLA |")
    assert probs[3:] == ["0.1", "0.1", "0.05 (3 seeds)", "yes"]
    assert "seed to another: **met**." in text
    assert "sums of its weights are equal): **met**." in text
    assert "N = 1,000, s = 50, k = 20: 2 / 2" in text
    # laplace-torch's predictive at seed 0 farther from ours than a seed moves it
    outputs[ella.key("laplace-torch")]["probs"] = tensor([0.3, 0.7])
    text = eb.report(results, outputs, [])
    assert table_rows(text, "ELLA |")[0][6] == "**no**"
    assert "seed to another: **NOT met**." in text


def test_run_all_and_report_take_in_the_ella_valla_benchmark(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report
    import run_all

    assert "ella_valla" in [name for name, _ in report.BENCHMARKS]
    args = SimpleNamespace(output=str(tmp_path), quick=True, reuse_lt=True)
    cmd = run_all.benchmark_command("ella_valla", args, "lt/python")
    assert cmd[1].endswith("ella_valla_benchmark.py")
    assert cmd[cmd.index("--lt-python") + 1] == "lt/python"
    assert "--reuse-lt" in cmd and "--quick" in cmd
    assert run_all.benchmark_command("ella_valla", args, None)[-1] == "--ours-only"

    def m(name, seconds, mb):
        return {"name": name, "seconds": seconds, "peak_mb": mb, "error": None}

    raw = {
        "results": {
            "ella|N1000|s50|k20|ours": m("o", 2.0, 20.0),
            "ella|N1000|s50|k20|laplace-torch": m("l", 10.0, 80.0),
            "seeds|ella|N1000|s50|k20|ours": m("o", 5.0, 20.0),
            "valla|N1000|Z20|ours": m("o", 1.0, 10.0),
        }
    }
    ella, valla = report.rows_of("ella_valla", raw)  # the seeds' workload left out
    assert ella.workload == (
        "ELLA fit + predictive + grid search, 1,000 samples, subsample_size 50, "
        "n_eigenvalues 20"
    )
    assert (ella.ours_s, ella.lt_s, ella.lt_mb) == (2.0, 10.0, 80.0)
    assert valla.workload == "VaLLA fit + predictive, 1,000 samples, num_inducing 20"
    assert valla.lt_s is None
