"""The examples run end to end, in reduced sizes, and show what they claim."""

from __future__ import annotations

import math
import runpy
import warnings
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, argv: list[str], out: Path, capsys):
    """Run the ``main`` of ``examples/NAME`` on ``argv`` and ``--out OUT``, and check
    that it wrote a PNG file there and printed its path. Returns the example's
    namespace, what ``main`` returned and what it printed."""
    example = runpy.run_path(str(EXAMPLES / name))
    result = example["main"]([*argv, "--out", str(out)])
    printed = capsys.readouterr().out
    assert out.read_bytes().startswith(b"\x89PNG")
    assert f" written to {out}\n" in printed
    return example, result, printed


def test_curvature_example(tmp_path, capsys):
    out = tmp_path / "curvature.png"
    _, results, printed = run_example("curvature_example.py", [], out, capsys)
    assert "structure" in printed and "CurvlinopsGGN" in printed
    exact, kron, diag = (results[s][0] for s in ("full", "kron", "diag"))
    # the diagonal structure keeps the exact diagonal
    torch.testing.assert_close(diag, torch.diag(exact.diagonal()))
    assert (kron - exact).norm() < exact.norm()


def test_regression_example(tmp_path, capsys):
    out = tmp_path / "plots" / "regression.png"
    argv = ["--epochs", "300", "--tune-steps", "30", "--n-test", "200"]
    _, result, printed = run_example("regression_example.py", argv, out, capsys)

    assert f"plot written to {out}" in printed
    assert printed.count("log marginal likelihood:") == 2
    assert printed.count("test NLL:") == 2
    before, after = result["before"], result["after"]
    assert after["log_marglik"] > before["log_marglik"]
    assert after["test_nll"] < before["test_nll"]
    assert after["sigma_noise"] < 1.0  # the data's noise is 0.3


def test_calibration_gp_example(tmp_path, capsys):
    out = tmp_path / "reliability.png"
    argv = ["--n-test", "1000", "--tune-steps", "50"]
    _, results, printed = run_example("calibration_gp_example.py", argv, out, capsys)

    assert f"reliability diagram written to {out}" in printed
    assert set(results) == {
        "MAP",
        "Kron Laplace",
        "GP (FunctionalLaplace)",
        "ELLA",
        "VaLLA",
    }
    map_ = results["MAP"]
    # the over-confident MAP is what the GP predictives correct
    for name in ("GP (FunctionalLaplace)", "ELLA", "VaLLA"):
        assert results[name]["nll"] < map_["nll"], name
    gp = results["GP (FunctionalLaplace)"]
    assert gp["ece"] < map_["ece"]


def test_marglik_training_example(tmp_path, capsys):
    out = tmp_path / "marglik.png"
    argv = ["--epochs", "60", "--width", "16", "--n-train", "100"]
    _, result, printed = run_example("marglik_training_example.py", argv, out, capsys)

    assert f"plot written to {out}" in printed
    history = result["history"]
    assert history.epochs == list(range(5, 61, 5))  # every 5 epochs
    assert len(result["prior_precision"]) == 6  # one per parameter tensor
    assert result["sigma_noise"] < 0.5  # from 1 towards the true 0.2
    assert history.log_marglik[-1] > history.log_marglik[0] + 50
    assert len(result["losses"]) == 60 and len(result["margliks"]) == 12 * 10


# ----------------------------------------------------------------------------------
# The shared calibration metrics
# ----------------------------------------------------------------------------------


def test_calibration_metrics():
    metrics = runpy.run_path(str(EXAMPLES / "_calibration.py"))
    # 10 two-class predictions at confidence 0.8, of which 8 (then 5) are right
    probs = torch.tensor([[0.8, 0.2]] * 10)
    y = torch.tensor([0] * 8 + [1] * 2)
    result = metrics["evaluate"](probs, y)
    assert result["accuracy"] == pytest.approx(0.8)
    assert result["confidence"] == pytest.approx(0.8)
    assert result["ece"] == pytest.approx(0.0, abs=1e-6)  # calibrated
    assert result["nll"] == pytest.approx(-(8 * math.log(0.8) + 2 * math.log(0.2)) / 10)
    assert result["brier"] == pytest.approx((8 * 2 * 0.2**2 + 2 * 2 * 0.8**2) / 10)
    bins = result["bins"]
    assert len(bins) == 10 and bins[0].lower == 0.5 and bins[-1].upper == 1.0
    assert sum(b.count for b in bins) == 10
    assert [b.count for b in bins if b.lower < 0.8 <= b.upper] == [10]

    over = metrics["evaluate"](probs, torch.tensor([0] * 5 + [1] * 5))
    assert over["ece"] == pytest.approx(0.3)  # confidence 0.8, accuracy 0.5
    perfect = metrics["evaluate"](torch.eye(3), torch.arange(3))
    assert perfect["nll"] == pytest.approx(0.0) and perfect["brier"] == 0.0
    assert perfect["ece"] == pytest.approx(0.0)


# ----------------------------------------------------------------------------------
# Classification calibration
# ----------------------------------------------------------------------------------


def test_calibration_example(tmp_path, capsys):
    out = tmp_path / "calibration.png"
    argv = [
        "--n-test",
        "2000",
        "--n-ood",
        "200",
        "--epochs",
        "400",
        "--n-samples",
        "200",
    ]
    example, results, printed = run_example("calibration_example.py", argv, out, capsys)

    assert f"reliability diagrams written to {out}" in printed
    others = [row for row, _ in example["OTHER_PREDICTIVES"].values()]
    assert set(results) == {"MAP", *example["VARIANTS"], *others}
    for name in results:
        assert f"\n{name} " in printed  # a row of the table
    map_ = results["MAP"]
    assert map_["confidence"] > map_["accuracy"] + 0.05  # the MAP is over-confident
    assert map_["ood_confidence"] > 0.9  # ... and sure far from the data
    for name in example["VARIANTS"]:
        la = results[name]
        assert abs(la["accuracy"] - map_["accuracy"]) < 0.03
        assert la["nll"] < map_["nll"]  # every Laplace predictive improves the NLL
        assert la["ood_confidence"] < map_["ood_confidence"] - 0.15
        assert la["prior_precision"] > 0
    assert results["Subnet Full"]["weights"] == 500
    assert results["LL Kron (default)"]["weights"] == 64 * 4 + 4
    # sampling the logits instead of the probit: the best calibrated
    assert results["LL Kron, MC link"]["ece"] < map_["ece"]
    assert results["LL Kron, MC link"]["nll"] < map_["nll"]


# ----------------------------------------------------------------------------------
# Bayesian optimisation
# ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bayesopt():
    return runpy.run_path(str(EXAMPLES / "bayesopt_example.py"))


@pytest.fixture
def one_thread():
    """One torch thread, as the examples' ``main`` sets: many threads only slow down
    such tiny networks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_bayesopt_acquisition_is_differentiable_in_the_input(bayesopt, one_thread):
    """``enable_backprop=True`` makes the Laplace predictive, and so the
    acquisition, differentiable in ``x``: the gradient that the ascent follows is
    finite, non-zero and that of finite differences."""
    torch.manual_seed(0)
    x = bayesopt["uniform"](6)
    y = bayesopt["objective"](x)
    args = bayesopt["parse_args"](["--train-steps", "300", "--tune-steps", "30"])
    surrogate = bayesopt["fit_surrogate"](x, y, args)
    query = torch.tensor([[-2.5], [-0.5], [1.0], [2.5]])
    for acquisition in ("ei", "ucb"):
        args.acquisition = acquisition

        def acq(at):
            return bayesopt["acquisition"](surrogate, at, y.max().item(), args)

        query.grad = None
        acq(query.requires_grad_()).sum().backward()
        grad = query.grad.squeeze(1)
        assert torch.isfinite(grad).all() and (grad != 0).all()
        with torch.no_grad():
            h = 1e-2
            finite_difference = (acq(query + h) - acq(query - h)) / (2 * h)
        assert torch.allclose(grad, finite_difference, rtol=0.05, atol=1e-3)

    # without enable_backprop the predictive is detached from the input
    detached = bayesopt["Laplace"](surrogate.la.model, "regression", "all", "full")
    detached.fit(torch.utils.data.DataLoader(list(zip(x, y)), batch_size=6))
    f_mu, f_var = detached(query)
    assert not f_mu.requires_grad and not f_var.requires_grad


def test_bayesopt_example(tmp_path, capsys):
    out = tmp_path / "bayesopt.png"
    argv = ["--n-iter", "10", "--train-steps", "500", "--tune-steps", "50"]
    _, result, printed = run_example(
        "bayesopt_example.py", [*argv, "--random-runs", "200"], out, capsys
    )

    assert f"figure written to {out}" in printed
    assert printed.count("  iteration ") == 10
    assert len(result["x"]) == len(result["y"]) == 4 + 10
    assert ((-3 <= result["x"]) & (result["x"] <= 3)).all()  # clamped to the domain
    assert result["optimum"] == pytest.approx(1.79, abs=0.01)
    # BO finds the global maximum (at x = 2.65; the next best is 1.16) ...
    best_x = result["x"][result["y"].argmax()].item()
    assert best_x == pytest.approx(2.65, abs=0.1)
    assert result["regret"] < 0.05
    # ... where random search with as many evaluations is still far on average
    assert result["random_regret"] > 2 * result["regret"] + 0.05


# ----------------------------------------------------------------------------------
# A transformer, Laplace over all its weights
# ----------------------------------------------------------------------------------


def test_transformer_example_sequences_need_the_order():
    example = runpy.run_path(str(EXAMPLES / "transformer_example.py"))
    g = torch.Generator().manual_seed(0)
    x, y = example["make_sequences"](500, 8, 16, 0.0, g)
    assert x.shape == (500, 8) and x.min() >= 0 and x.max() < 16
    markers = torch.tensor(example["MARKERS"])
    # every marker exactly once: the token counts carry no information
    counts = (x[:, :, None] == markers).sum(dim=1)
    assert (counts == 1).all()
    # the class is the marker at the smallest position
    first = torch.stack([(x == m).float().argmax(dim=1) for m in markers], 1)
    assert torch.equal(y, first.argmin(dim=1))
    assert torch.bincount(y, minlength=3).min() > 100  # every class occurs

    # a fraction of the labels flipped, each to another class
    g = torch.Generator().manual_seed(0)
    x_noisy, y_noisy = example["make_sequences"](2000, 8, 16, 0.2, g)
    first = torch.stack([(x_noisy == m).float().argmax(dim=1) for m in markers], 1)
    flipped = (y_noisy != first.argmin(dim=1)).float().mean().item()
    assert flipped == pytest.approx(0.2, abs=0.03)


def test_transformer_example(tmp_path, capsys):
    out = tmp_path / "transformer.png"
    argv = ["--n-train", "800", "--n-test", "1000", "--dim", "16", "--epochs", "60"]
    with warnings.catch_warnings():
        # every parameter has a rule: the fallback's warning would be an error
        warnings.filterwarnings("error", message="The curvature engine has no rule")
        _, result, printed = run_example("transformer_example.py", argv, out, capsys)

    assert f"reliability diagrams written to {out}" in printed
    # the structure table covers every weight of the model, none by the fallback
    structure = result["structure"]
    assert structure["weights"] == structure["model"] == result["n_params"]
    rules = {rule for rule, _ in structure["rows"]}
    assert rules == {"embedding", "linear", "multihead-attention", "norm"}
    blocks = {rule: block for (rule, block) in structure["rows"] if block != "dense"}
    assert set(blocks.values()) == {"kronecker"}
    assert set(blocks) == {"embedding", "linear", "multihead-attention"}
    assert f"{structure['model']} of the model's {structure['model']} weights" in (
        printed
    )
    # the MAP is over-confident; the Laplace predictive keeps its accuracy and
    # improves its NLL and calibration
    results = result["results"]
    map_ = results.pop("MAP")
    (la,) = results.values()
    assert map_["confidence"] > map_["accuracy"] + 0.1
    assert abs(la["accuracy"] - map_["accuracy"]) < 0.03
    assert la["nll"] < map_["nll"] and la["ece"] < map_["ece"]
    assert la["confidence"] < map_["confidence"]
    assert la["prior_precision"] > 0
