"""Calibration of the GP view (FunctionalLaplace, ELLA, VaLLA) against a
weight-space Laplace.

A small synthetic classification task: three interleaved noisy spirals in 2-D. The
steps:

1. train an ordinary MLP to its MAP (it ends up over-confident, as networks do);
2. fit two Laplace approximations around it:
   - ``hessian_structure="kron"`` over all weights (a weight-space Gaussian),
   - ``hessian_structure="gp"`` (FunctionalLaplace): GP inference in the linearized
     network on ``--n-subset`` training points, no structure imposed on the
     weight-space precision;
   - ELLA (``functional_approximation="nystrom"``): a Nyström feature map of the
     same GP's kernel from ``--ella-basis`` training points and ``--ella-k``
     directions, with the curvature of all the training data on it;
   - VaLLA (``functional_approximation="variational"``): ``--valla-inducing``
     inducing points, fitted by Adam for ``--valla-iterations`` steps;
3. tune each one's prior precision: by the marginal likelihood (Kron, GP), by a
   validation grid (ELLA, which has no marginal likelihood), or jointly with the
   posterior (VaLLA);
4. compare the MAP and both predictives (probit link) on held-out data: accuracy,
   negative log-likelihood (NLL), Brier score and expected calibration error (ECE,
   10 bins of confidence; the metrics are those of ``examples/_calibration.py``).

It prints a table and saves a reliability diagram (accuracy against confidence per
bin, one panel per method) to a PNG file whose path it prints. Runs in about ten
seconds on a laptop CPU, no download: ``python examples/calibration_gp_example.py``
(``--help`` for the options).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace

# The modules shared by the examples live next to this file. ``python examples/...``
# puts this folder on the import path, runpy (which the tests use) does not: do it.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _calibration import evaluate, save_reliability_diagram  # noqa: E402
from _common import add_common_arguments, torch_threads  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "output" / "calibration_gp_example.png"
N_CLASSES = 3


# ----------------------------------------------------------------------------------
# Data and network
# ----------------------------------------------------------------------------------


def make_spirals(n: int, noise: float, generator: torch.Generator):
    """``n`` points on three interleaved spirals with Gaussian noise; labels 0-2."""
    y = torch.randint(0, N_CLASSES, (n,), generator=generator)
    r = torch.rand(n, generator=generator)
    angle = 3.5 * r + 2 * math.pi * y / N_CLASSES
    x = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], dim=1)
    return x + noise * torch.randn(n, 2, generator=generator), y


def make_model(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(2, width),
        nn.Tanh(),
        nn.Linear(width, width),
        nn.Tanh(),
        nn.Linear(width, N_CLASSES),
    )


def train(model: nn.Module, loader: DataLoader, epochs: int) -> None:
    """Cross-entropy with a small weight decay (the MAP under a Gaussian prior)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    model.eval()


# ----------------------------------------------------------------------------------
# The two Laplace approximations
# ----------------------------------------------------------------------------------


def fit_and_tune(model, train_loader, structure: str, n_subset: int, steps: int):
    kwargs = {"n_subset": n_subset} if structure == "gp" else {}
    la = Laplace(model, "classification", "all", structure, **kwargs)
    start = time.perf_counter()
    la.fit(train_loader)
    la.optimize_prior_precision(method="marglik", n_steps=steps, lr=0.1)
    return la, time.perf_counter() - start


def fit_ella(model, train_loader, val_loader, basis: int, k: int):
    la = Laplace(
        model,
        "classification",
        "all",
        "gp",
        functional_approximation="nystrom",
        subsample_size=basis,
        n_eigenvalues=k,
    )
    start = time.perf_counter()
    la.fit(train_loader)
    la.optimize_prior_precision(val_loader=val_loader, grid_size=41)
    return la, time.perf_counter() - start


def fit_valla(model, train_loader, inducing: int, iterations: int):
    la = Laplace(
        model,
        "classification",
        "all",
        "gp",
        functional_approximation="variational",
        inducing_locations="random",
        num_inducing=inducing,
    )
    start = time.perf_counter()
    la.fit(train_loader, iterations=iterations, lr=0.02)
    return la, time.perf_counter() - start


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=300, help="training points")
    parser.add_argument("--n-test", type=int, default=2000, help="test points")
    parser.add_argument("--noise", type=float, default=0.25, help="input noise")
    parser.add_argument("--width", type=int, default=64, help="hidden layer width")
    parser.add_argument("--epochs", type=int, default=300, help="training epochs")
    parser.add_argument(
        "--n-subset", type=int, default=200, help="training points of the GP"
    )
    parser.add_argument(
        "--tune-steps", type=int, default=100, help="marglik steps of each prior"
    )
    parser.add_argument("--n-val", type=int, default=200, help="validation points")
    parser.add_argument("--ella-basis", type=int, default=200, help="ELLA's basis")
    parser.add_argument("--ella-k", type=int, default=50, help="ELLA's directions")
    parser.add_argument(
        "--valla-inducing", type=int, default=50, help="VaLLA's inducing points"
    )
    parser.add_argument(
        "--valla-iterations", type=int, default=300, help="VaLLA's Adam steps"
    )
    add_common_arguments(parser, DEFAULT_OUT)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the example; returns the scores of each method (the rows of the table)."""
    args = parse_args(argv)
    with torch_threads(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    x, y = make_spirals(args.n_train, args.noise, g)
    x_test, y_test = make_spirals(args.n_test, args.noise, g)
    x_val, y_val = make_spirals(args.n_val, args.noise, g)
    val_loader = DataLoader(TensorDataset(x_val, y_val), batch_size=128)
    train_loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    model = make_model(args.width)
    train(model, train_loader, args.epochs)
    fit_loader = DataLoader(TensorDataset(x, y), batch_size=128)

    with torch.no_grad():
        results = {"MAP": evaluate(torch.softmax(model(x_test), -1), y_test)}
    timings = {}
    for name, structure in (("Kron Laplace", "kron"), ("GP (FunctionalLaplace)", "gp")):
        n_subset = min(args.n_subset, args.n_train)
        la, seconds = fit_and_tune(
            model, fit_loader, structure, n_subset, args.tune_steps
        )
        results[name] = evaluate(la(x_test, link_approx="probit"), y_test)
        results[name]["prior_precision"] = la.prior_precision.item()
        timings[name] = seconds
    for name, (la, seconds) in (
        (
            "ELLA",
            fit_ella(
                model,
                fit_loader,
                val_loader,
                min(args.ella_basis, args.n_train),
                args.ella_k,
            ),
        ),
        (
            "VaLLA",
            fit_valla(model, train_loader, args.valla_inducing, args.valla_iterations),
        ),
    ):
        results[name] = evaluate(la(x_test, link_approx="probit"), y_test)
        results[name]["prior_precision"] = la.prior_precision.item()
        timings[name] = seconds

    print(
        f"{'method':<24}{'accuracy':>10}{'NLL':>8}{'Brier':>8}{'ECE':>8}"
        "  prior precision"
    )
    for name, r in results.items():
        prior = f"{r['prior_precision']:.3g}" if "prior_precision" in r else "-"
        print(
            f"{name:<24}{r['accuracy']:>10.3f}{r['nll']:>8.3f}{r['brier']:>8.3f}"
            f"{r['ece']:>8.3f}  {prior}"
        )
    for name, seconds in timings.items():
        print(f"{name}: fit and prior tuning in {seconds:.2f} s")
    save_reliability_diagram(results, args.out)
    print(f"reliability diagram written to {args.out}")
    return results


if __name__ == "__main__":
    main()
