"""The examples run end to end."""

from __future__ import annotations

import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_curvature_example(capsys):
    runpy.run_path(str(EXAMPLES / "curvature_example.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "structure" in out and "CurvlinopsGGN" in out


def test_regression_example(tmp_path, capsys):
    example = runpy.run_path(str(EXAMPLES / "regression_example.py"))
    out = tmp_path / "plots" / "regression.png"
    argv = ["--epochs", "300", "--tune-steps", "30", "--n-test", "200"]
    result = example["main"]([*argv, "--out", str(out)])
    printed = capsys.readouterr().out

    assert out.read_bytes().startswith(b"\x89PNG")
    assert f"plot written to {out}" in printed
    assert printed.count("log marginal likelihood:") == 2
    assert printed.count("test NLL:") == 2
    before, after = result["before"], result["after"]
    assert after["log_marglik"] > before["log_marglik"]
    assert after["test_nll"] < before["test_nll"]
    assert after["sigma_noise"] < 1.0  # the data's noise is 0.3


def test_calibration_gp_example(tmp_path, capsys):
    example = runpy.run_path(str(EXAMPLES / "calibration_gp_example.py"))
    out = tmp_path / "reliability.png"
    results = example["main"](
        ["--n-test", "1000", "--tune-steps", "50", "--out", str(out)]
    )
    printed = capsys.readouterr().out

    assert out.read_bytes().startswith(b"\x89PNG")
    assert f"reliability diagram written to {out}" in printed
    assert set(results) == {"MAP", "Kron Laplace", "GP (FunctionalLaplace)"}
    gp, map_ = results["GP (FunctionalLaplace)"], results["MAP"]
    # the over-confident MAP is what the GP predictive corrects
    assert gp["nll"] < map_["nll"] and gp["ece"] < map_["ece"]


def test_marglik_training_example(tmp_path, capsys):
    example = runpy.run_path(str(EXAMPLES / "marglik_training_example.py"))
    out = tmp_path / "marglik.png"
    argv = ["--epochs", "60", "--width", "16", "--n-train", "100"]
    result = example["main"]([*argv, "--out", str(out)])
    printed = capsys.readouterr().out

    assert out.read_bytes().startswith(b"\x89PNG")
    assert f"plot written to {out}" in printed
    history = result["history"]
    assert history.epochs == list(range(5, 61, 5))  # every 5 epochs
    assert len(result["prior_precision"]) == 6  # one per parameter tensor
    assert result["sigma_noise"] < 0.5  # from 1 towards the true 0.2
    assert history.log_marglik[-1] > history.log_marglik[0] + 50
    assert len(result["losses"]) == 60 and len(result["margliks"]) == 12 * 10
