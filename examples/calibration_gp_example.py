"""Calibration of the GP view (FunctionalLaplace) against a weight-space Laplace.

A small synthetic classification task: three interleaved noisy spirals in 2-D. The
steps:

1. train an ordinary MLP to its MAP (it ends up over-confident, as networks do);
2. fit two Laplace approximations around it:
   - ``hessian_structure="kron"`` over all weights (a weight-space Gaussian),
   - ``hessian_structure="gp"`` (FunctionalLaplace): GP inference in the linearized
     network on ``--n-subset`` training points, no structure imposed on the
     weight-space precision;
3. tune each one's prior precision by its marginal likelihood;
4. compare the MAP and both predictives (probit link) on held-out data: accuracy,
   negative log-likelihood (NLL) and expected calibration error (ECE, 10 bins of
   confidence).

It prints a table and saves a reliability diagram (accuracy against confidence per
bin, one panel per method) to a PNG file whose path it prints. Runs in about ten
seconds on a laptop CPU, no download: ``python examples/calibration_gp_example.py``
(``--help`` for the options).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace

matplotlib.use("Agg")  # draw into files only: no display needed
DEFAULT_OUT = Path(__file__).resolve().parent / "output" / "calibration_gp_example.png"
N_CLASSES = 3
N_BINS = 10


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
# Metrics
# ----------------------------------------------------------------------------------


def calibration_bins(probs: torch.Tensor, y: torch.Tensor):
    """Per confidence bin: mean confidence, accuracy and count."""
    confidence, prediction = probs.max(dim=1)
    correct = (prediction == y).to(probs.dtype)
    edges = torch.linspace(1 / N_CLASSES, 1, N_BINS + 1)
    which = torch.bucketize(confidence, edges[1:-1])
    bins = []
    for b in range(N_BINS):
        mask = which == b
        n = int(mask.sum())
        if n:
            bins.append(
                (float(confidence[mask].mean()), float(correct[mask].mean()), n)
            )
        else:
            bins.append((float(edges[b : b + 2].mean()), float("nan"), 0))
    return bins


def evaluate(probs: torch.Tensor, y: torch.Tensor) -> dict:
    bins = calibration_bins(probs, y)
    ece = sum(n * abs(acc - conf) for conf, acc, n in bins if n) / len(y)
    nll = F.nll_loss(probs.clamp_min(1e-12).log(), y).item()
    accuracy = (probs.argmax(1) == y).float().mean().item()
    return {"accuracy": accuracy, "nll": nll, "ece": ece, "bins": bins}


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


def save_diagram(results: dict, out: Path) -> None:
    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 4))
    width = (1 - 1 / N_CLASSES) / N_BINS
    for ax, (name, r) in zip(axes, results.items()):
        filled = [(b, conf, acc) for b, (conf, acc, n) in enumerate(r["bins"]) if n]
        centers = [1 / N_CLASSES + width * (b + 0.5) for b, _, _ in filled]
        accs = [acc for _, _, acc in filled]
        confs = [conf for _, conf, _ in filled]
        ax.bar(centers, accs, width=width, edgecolor="k", label="accuracy")
        ax.bar(  # from accuracy to mean confidence, whichever is larger
            centers,
            [abs(c - a) for c, a in zip(confs, accs)],
            bottom=[min(c, a) for c, a in zip(confs, accs)],
            width=width,
            color="tab:red",
            alpha=0.35,
            label="gap to mean confidence",
        )
        ax.plot([1 / N_CLASSES, 1], [1 / N_CLASSES, 1], "k--", lw=1)
        ax.set(
            xlim=(1 / N_CLASSES, 1),
            ylim=(0, 1),
            xlabel="confidence",
            title=f"{name}\nNLL {r['nll']:.3f}, ECE {r['ece']:.3f}",
        )
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG path")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    x, y = make_spirals(args.n_train, args.noise, g)
    x_test, y_test = make_spirals(args.n_test, args.noise, g)
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

    print(f"{'method':<24}{'accuracy':>10}{'NLL':>8}{'ECE':>8}  prior precision")
    for name, r in results.items():
        prior = f"{r['prior_precision']:.3g}" if "prior_precision" in r else "-"
        print(
            f"{name:<24}{r['accuracy']:>10.3f}{r['nll']:>8.3f}{r['ece']:>8.3f}  {prior}"
        )
    for name, seconds in timings.items():
        print(f"{name}: fit and prior tuning in {seconds:.2f} s")
    save_diagram(results, args.out)
    print(f"reliability diagram written to {args.out}")
    return results


if __name__ == "__main__":
    main()
