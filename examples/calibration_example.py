"""Calibration of a classifier: the MAP network against five Laplace approximations.

A trained network is usually over-confident: its predictions are right less often
than their confidence says, and far away from its training data it is just as sure
as anywhere else. A Laplace approximation adds the uncertainty about the weights
that the training data leave, around the same trained weights and at little cost.
The steps:

1. synthetic data in 2-D: four overlapping Gaussian blobs, one per class, with a
   fraction of the labels made random (no model can be sure near the borders), a
   held-out test set from the same distribution, and an out-of-distribution (OOD)
   set of points on a circle far from all the blobs;
2. train a ReLU MLP to its MAP with a weak weight decay: it fits the noisy labels
   and ends over-confident;
3. fit Laplace approximations around it, each with its prior precision tuned by
   maximizing the marginal likelihood (no validation data needed):

   - the last layer with a Kronecker-factored (KFAC) GGN: ``Laplace()``'s default;
   - the last layer with the full GGN;
   - all the weights, Kronecker-factored;
   - all the weights, diagonal;
   - a subnetwork of the ``--subnet-size`` weights of largest magnitude, full GGN;

4. predict with the linearized network (``pred_type="glm"``) and the probit
   approximation of the softmax integral (``link_approx="probit"``, the default),
   and for two of them another way:

   - the last-layer Kron posterior with the softmax averaged over Monte-Carlo
     samples of the linearized logits (``link_approx="mc"``) instead of the probit;
   - the all-weights Kron posterior by averaging the *network* over weight samples
     (``pred_type="nn"``), which is known to underfit: over the spread of such a
     posterior the network is far from its linearization, the model that the
     GGN posterior was fitted for;

5. compare them on the test set: accuracy, mean confidence, negative
   log-likelihood (NLL), Brier score and expected calibration error (ECE, over 10
   bins of confidence), and the mean confidence on the OOD points (lower is better:
   a point far from every class deserves an uncertain prediction).

What to expect: every linearized predictive keeps the MAP's accuracy, improves its
NLL and is far less confident far from the data. In distribution, the probit link
overshoots: the MAP's over-confidence turns into under-confidence (mean confidence
below accuracy, bars above the diagonal), enough for the ECE of some variants to end
above the MAP's. The probit approximation shrinks each logit by its own variance,
including the variance of a common shift of all the logits, which does not change
the softmax; the MC link does not, and is the best calibrated. The 'nn' predictive
of the all-weights posterior loses accuracy, as expected.

It prints a table and saves reliability diagrams (accuracy against confidence, one
panel per method) to a PNG file whose path it prints. No download; it runs in about
fifteen seconds on a laptop CPU: ``python examples/calibration_example.py``
(``--help`` for the options).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace
from laplace.utils.subnetmask import LargestMagnitudeSubnetMask

# The modules shared by the examples live next to this file. ``python examples/...``
# puts this folder on the import path, runpy (which the tests use) does not: do it.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _calibration import evaluate, save_reliability_diagram  # noqa: E402
from _common import add_common_arguments, torch_threads  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "output" / "calibration_example.png"
N_CLASSES = 4
CENTERS = torch.tensor([[1.5, 1.5], [-1.5, 1.5], [-1.5, -1.5], [1.5, -1.5]])
OOD_RADIUS = 12.0  # the OOD points: far from every blob (of standard deviation 1)

# The Laplace approximations: name -> (subset_of_weights, hessian_structure).
VARIANTS = {
    "LL Kron (default)": ("last_layer", "kron"),
    "LL Full": ("last_layer", "full"),
    "All Kron": ("all", "kron"),
    "All Diag": ("all", "diag"),
    "Subnet Full": ("subnetwork", "full"),
}
# The other predictives shown: variant -> (row name, arguments of ``la(x, ...)``);
# ``n_samples`` is set from the command line.
OTHER_PREDICTIVES = {
    "LL Kron (default)": ("LL Kron, MC link", {"link_approx": "mc"}),
    "All Kron": ("All Kron, 'nn'", {"pred_type": "nn", "link_approx": "mc"}),
}


# ----------------------------------------------------------------------------------
# Data and network
# ----------------------------------------------------------------------------------


def make_blobs(n: int, label_noise: float, generator: torch.Generator):
    """``n`` points of the four blobs, ``label_noise`` of them with random labels."""
    y = torch.randint(0, N_CLASSES, (n,), generator=generator)
    x = CENTERS[y] + torch.randn(n, 2, generator=generator)
    noisy = torch.rand(n, generator=generator) < label_noise
    y[noisy] = torch.randint(0, N_CLASSES, (int(noisy.sum()),), generator=generator)
    return x, y


def make_ood(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` points on the circle of radius ``OOD_RADIUS``."""
    angle = 2 * math.pi * torch.rand(n, generator=generator)
    return OOD_RADIUS * torch.stack([angle.cos(), angle.sin()], dim=1)


def make_model(width: int) -> nn.Module:
    """A ReLU MLP 2-width-width-4. Its logits grow linearly away from the data, so
    the MAP's confidence tends to one there."""
    return nn.Sequential(
        nn.Linear(2, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, N_CLASSES),
    )


def train(model: nn.Module, loader: DataLoader, epochs: int, weight_decay: float):
    """Adam on the cross-entropy with a weight decay (a Gaussian prior), long enough
    to fit the random labels too. Returns the last batch's loss."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=weight_decay)
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
    model.eval()
    return loss.item()


# ----------------------------------------------------------------------------------
# Laplace
# ----------------------------------------------------------------------------------


def fit_laplace(model, loader, subset: str, structure: str, subnet_size: int):
    """Fit a Laplace approximation and tune its prior precision by marglik.

    A subnetwork Laplace needs the indices of its weights (in the flattened vector
    of all the parameters): here those of the largest magnitude at the MAP.
    """
    kwargs = {}
    if subset == "subnetwork":
        mask = LargestMagnitudeSubnetMask(model, n_params_subnet=subnet_size)
        kwargs["subnetwork_indices"] = mask.select()
    la = Laplace(model, "classification", subset, structure, **kwargs)
    la.fit(loader)
    la.optimize_prior_precision(method="marglik")
    return la


# ----------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=300, help="training points")
    parser.add_argument("--n-test", type=int, default=5000, help="test points")
    parser.add_argument("--n-ood", type=int, default=1000, help="OOD points")
    parser.add_argument(
        "--label-noise", type=float, default=0.1, help="fraction of random labels"
    )
    parser.add_argument("--width", type=int, default=64, help="hidden layer width")
    parser.add_argument("--epochs", type=int, default=800, help="training epochs")
    parser.add_argument(
        "--weight-decay", type=float, default=1e-5, help="weight decay of the MAP"
    )
    parser.add_argument(
        "--subnet-size", type=int, default=500, help="weights of the subnetwork"
    )
    parser.add_argument(
        "--n-samples", type=int, default=1000, help="samples of 'mc' and 'nn'"
    )
    add_common_arguments(parser, DEFAULT_OUT)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Run the example; returns the scores of each method (the rows of the table)."""
    args = parse_args(argv)
    with torch_threads(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> dict[str, dict]:
    start = time.perf_counter()
    torch.manual_seed(args.seed)  # initial weights, shuffling, predictive samples
    generator = torch.Generator().manual_seed(args.seed)  # data

    # 1. Data.
    x, y = make_blobs(args.n_train, args.label_noise, generator)
    x_test, y_test = make_blobs(args.n_test, args.label_noise, generator)
    x_ood = make_ood(args.n_ood, generator)
    print(
        f"data: {N_CLASSES} Gaussian blobs in 2-D, {args.label_noise:.0%} random "
        f"labels; {args.n_train} training and {args.n_test} test points, "
        f"{args.n_ood} OOD points at radius {OOD_RADIUS:g}"
    )

    # 2. The MAP network.
    clock = time.perf_counter()
    model = make_model(args.width)
    train_loader = DataLoader(TensorDataset(x, y), batch_size=50, shuffle=True)
    loss = train(model, train_loader, args.epochs, args.weight_decay)
    print(
        f"MLP 2-{args.width}-{args.width}-{N_CLASSES} "
        f"({sum(p.numel() for p in model.parameters())} parameters), {args.epochs} "
        f"epochs: last batch loss {loss:.3f} ({time.perf_counter() - clock:.1f} s)\n"
    )

    def score(predict) -> dict:
        """Test scores and mean OOD confidence of ``predict``: inputs -> probs."""
        with torch.no_grad():
            result = evaluate(predict(x_test), y_test)
            result["ood_confidence"] = predict(x_ood).max(dim=1).values.mean().item()
        return result

    results = {"MAP": score(lambda inputs: model(inputs).softmax(dim=1))}

    # 3.-4. The Laplace approximations and their predictives.
    fit_loader = DataLoader(TensorDataset(x, y), batch_size=100)
    for name, (subset, structure) in VARIANTS.items():
        clock = time.perf_counter()
        la = fit_laplace(model, fit_loader, subset, structure, args.subnet_size)
        seconds = time.perf_counter() - clock
        results[name] = score(partial(la, link_approx="probit"))
        results[name].update(
            weights=getattr(la, "n_params_subnet", la.n_params),
            prior_precision=la.prior_precision.item(),
            seconds=seconds,
        )
        if name in OTHER_PREDICTIVES:
            row, kwargs = OTHER_PREDICTIVES[name]
            results[row] = score(partial(la, n_samples=args.n_samples, **kwargs))

    # 5. The table and the reliability diagrams.
    print_table(results)
    save_reliability_diagram(results, args.out, columns=4)
    print(f"\nreliability diagrams written to {args.out}")
    print(f"total time: {time.perf_counter() - start:.1f} s")
    return results


def print_table(results: dict[str, dict]) -> None:
    """One row per method; the last three columns for the fitted approximations."""
    print(
        f"{'method':<20}{'accuracy':>9}{'confidence':>11}{'NLL':>7}{'Brier':>7}"
        f"{'ECE':>7}{'OOD conf.':>10}{'weights':>9}{'prior prec.':>12}{'fit (s)':>8}"
    )
    for name, r in results.items():
        fitted = ""
        if "weights" in r:
            fitted = (
                f"{r['weights']:>9}{r['prior_precision']:>12.3g}{r['seconds']:>8.1f}"
            )
        print(
            f"{name:<20}{r['accuracy']:>9.3f}{r['confidence']:>11.3f}{r['nll']:>7.3f}"
            f"{r['brier']:>7.3f}{r['ece']:>7.3f}{r['ood_confidence']:>10.3f}{fitted}"
        )


if __name__ == "__main__":
    main()
