"""Laplace approximation for 1-D regression, with hyper-parameters tuned by marglik.

The steps of a typical post-hoc Laplace workflow, on a toy problem:

1. train an ordinary network (an MLP) on noisy samples of ``sin(x)``;
2. fit a Laplace approximation around its weights with ``Laplace(...).fit(...)``;
3. tune the prior precision and the observation noise by maximizing the Laplace
   approximation of the log marginal likelihood (no validation data needed);
4. predict with the linearized ("glm") predictive, which gives a mean and a
   variance for every input.

The script prints the log marginal likelihood and the test negative log-likelihood
(NLL) before and after tuning, and saves a plot of the predictive mean with its 95%
band in both cases to a PNG file whose path it prints.

Run with ``make demo`` (or ``python examples/regression_example.py --help`` for the
options). It needs no download and runs in a few seconds on a laptop CPU.
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
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace

matplotlib.use("Agg")  # draw into files only: no display needed
DEFAULT_OUT = Path(__file__).resolve().parent / "output" / "regression_example.png"
NOISE_STD = 0.3  # the true observation noise; Laplace has to find it from the data
X_RANGE = 4.0  # inputs are drawn from [-4, 4] ...
GAP = 1.0  # ... except for the gap (-1, 1), where there is no training data


# ----------------------------------------------------------------------------------
# Data and network
# ----------------------------------------------------------------------------------


def make_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points ``y = sin(x) + noise`` with ``x`` in [-4, -1] or [1, 4]."""
    side = torch.where(torch.rand(n, 1, generator=generator) < 0.5, -1.0, 1.0)
    x = side * (GAP + (X_RANGE - GAP) * torch.rand(n, 1, generator=generator))
    y = torch.sin(x) + NOISE_STD * torch.randn(n, 1, generator=generator)
    return x, y


def make_model(width: int) -> nn.Module:
    """A small tanh MLP 1-width-width-1."""
    return nn.Sequential(
        nn.Linear(1, width),
        nn.Tanh(),
        nn.Linear(width, width),
        nn.Tanh(),
        nn.Linear(width, 1),
    )


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> float:
    """Ordinary full-batch training with Adam on the mean squared error.

    Laplace is *post hoc*: it does not care how the network was trained, only that
    its weights sit at a minimum of a regularized loss, which is what a small weight
    decay (an L2 penalty, i.e. a Gaussian prior) and a decaying learning rate give.
    Returns the final training MSE.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        schedule.step()
    return loss.item()


# ----------------------------------------------------------------------------------
# Predictions and scores
# ----------------------------------------------------------------------------------


def predict(la, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Predictive mean, and standard deviations of ``f(x)`` and of ``y``, at ``x``.

    For regression, ``la(x, pred_type="glm")`` returns the mean ``f_mu`` of shape
    (N, 1) and the variance ``f_var`` of shape (N, 1, 1) of the network output under
    the linearized network: the uncertainty about the *function*, which shrinks
    where there is data. A new observation ``y`` also carries the noise, so its
    variance adds ``sigma_noise**2``.
    """
    f_mu, f_var = la(x, pred_type="glm")
    f_var = f_var.detach().reshape(-1, 1)
    y_var = f_var + la.sigma_noise.detach() ** 2
    return f_mu.detach(), f_var.sqrt(), y_var.sqrt()


def gaussian_nll(y: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> float:
    """Average negative log-likelihood of ``y`` under N(mean, std**2)."""
    var = std**2
    nll = 0.5 * (torch.log(2 * math.pi * var) + (y - mean) ** 2 / var)
    return nll.mean().item()


def evaluate(la, x_test: torch.Tensor, y_test: torch.Tensor) -> dict[str, float]:
    """Hyper-parameters, log marginal likelihood and test NLL of ``la`` as it is."""
    mean, _, std = predict(la, x_test)
    return {
        "prior_precision": la.prior_precision.item(),
        "sigma_noise": la.sigma_noise.item(),
        "log_marglik": la.log_marginal_likelihood().item(),
        "test_nll": gaussian_nll(y_test, mean, std),
    }


def report(title: str, result: dict[str, float]) -> None:
    print(f"{title}:")
    print(
        f"  prior precision {result['prior_precision']:.4g}, "
        f"sigma_noise {result['sigma_noise']:.4g}"
    )
    print(f"  log marginal likelihood: {result['log_marglik']:.2f}")
    print(f"  test NLL: {result['test_nll']:.3f}")


# ----------------------------------------------------------------------------------
# Tuning the hyper-parameters
# ----------------------------------------------------------------------------------


def tune_hyperparameters(la, steps: int, lr: float = 0.1) -> None:
    """Maximize the log marginal likelihood in the prior precision and sigma_noise.

    ``la.log_marginal_likelihood(prior_precision, sigma_noise)`` is differentiable in
    both arguments, so any PyTorch optimizer can tune them. We optimize their
    logarithms, which keeps both positive and makes the steps scale-free.

    (``la.optimize_prior_precision(method="marglik", pred_type="glm")`` does the same
    for the prior precision alone; for regression the noise matters just as much:
    with the default ``sigma_noise=1`` the predictive band would be far too wide for
    data whose noise is 0.3.)
    """
    log_prior_prec = torch.tensor(la.prior_precision.item()).log().requires_grad_()
    log_sigma = torch.tensor(la.sigma_noise.item()).log().requires_grad_()
    optimizer = torch.optim.Adam([log_prior_prec, log_sigma], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        neg_marglik = -la.log_marginal_likelihood(
            prior_precision=log_prior_prec.exp(), sigma_noise=log_sigma.exp()
        )
        neg_marglik.backward()
        optimizer.step()
    # store the final values, without their autograd history, for prediction
    la.prior_precision = log_prior_prec.detach().exp()
    la.sigma_noise = log_sigma.detach().exp()


# ----------------------------------------------------------------------------------
# Plot
# ----------------------------------------------------------------------------------


def save_plot(curves, x_train, y_train, x_plot, out: Path) -> None:
    """One panel per ``(title, predict(la, x_plot))`` pair, side by side, as a PNG."""
    x = x_plot.squeeze(1)
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.5))
    for ax, (title, (mean, f_std, y_std)) in zip(axes, curves):
        mean, f_std, y_std = mean.squeeze(1), f_std.squeeze(1), y_std.squeeze(1)
        ax.fill_between(
            x,
            mean - 1.96 * y_std,
            mean + 1.96 * y_std,
            color="tab:blue",
            alpha=0.2,
            label="95% band of y (function + noise)",
        )
        ax.fill_between(
            x,
            mean - 1.96 * f_std,
            mean + 1.96 * f_std,
            color="tab:blue",
            alpha=0.4,
            label="95% band of f(x) (function only)",
        )
        ax.plot(x, torch.sin(x), "k--", lw=1, label="true function sin(x)")
        ax.plot(x, mean, color="tab:blue", lw=2, label="predictive mean")
        ax.scatter(x_train, y_train, s=8, c="tab:red", alpha=0.7, label="training data")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("x")
        ax.set_ylim(-4, 4)
    axes[0].set_ylabel("y")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def panel_title(name: str, result: dict[str, float]) -> str:
    return (
        f"{name}: prior prec. {result['prior_precision']:.3g}, "
        f"$\\sigma$ {result['sigma_noise']:.3g}\n"
        f"log marglik {result['log_marglik']:.1f}, test NLL {result['test_nll']:.3f}"
    )


# ----------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=150, help="training points")
    parser.add_argument("--n-test", type=int, default=1000, help="test points")
    parser.add_argument("--width", type=int, default=32, help="hidden layer width")
    parser.add_argument("--epochs", type=int, default=1000, help="Adam steps (MAP)")
    parser.add_argument(
        "--hessian-structure",
        default="full",
        choices=["full", "kron"],
        help="structure of the posterior precision: full (exact GGN, the default) or "
        "kron (KFAC, for larger networks). A diagonal one ignores the correlations "
        "between weights and overestimates the log-determinant in the marglik.",
    )
    parser.add_argument(
        "--tune-steps", type=int, default=100, help="Adam steps for the marglik"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG path")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Run the example; returns the numbers it prints, before and after tuning."""
    args = parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(args.seed)  # for the network's initial weights
    generator = torch.Generator().manual_seed(args.seed)  # for the data

    # 1. Data: a training set with a gap, and a test set from the same distribution.
    x_train, y_train = make_data(args.n_train, generator)
    x_test, y_test = make_data(args.n_test, generator)
    print(
        f"data: y = sin(x) + {NOISE_STD:g} * noise, x in [-{X_RANGE:g}, {X_RANGE:g}] "
        f"without (-{GAP:g}, {GAP:g}); {args.n_train} training and "
        f"{args.n_test} test points"
    )

    # 2. The network, trained as usual: its weights are the MAP estimate.
    clock = time.perf_counter()
    model = make_model(args.width)
    n_params = sum(p.numel() for p in model.parameters())
    mse = train(model, x_train, y_train, args.epochs)
    print(
        f"MLP 1-{args.width}-{args.width}-1 ({n_params} parameters), "
        f"{args.epochs} Adam steps: training MSE {mse:.4f} "
        f"({time.perf_counter() - clock:.1f} s)"
    )

    # 3. The Laplace approximation around the trained weights. Its curvature, the
    #    generalized Gauss-Newton matrix, is summed over the training loader; the
    #    loader's dataset tells Laplace the number of data points.
    clock = time.perf_counter()
    train_loader = DataLoader(TensorDataset(x_train, y_train), batch_size=50)
    la = Laplace(
        model,
        "regression",
        subset_of_weights="all",
        hessian_structure=args.hessian_structure,
    )
    la.fit(train_loader)
    print(
        f"Laplace: {args.hessian_structure} GGN over all weights "
        f"({time.perf_counter() - clock:.1f} s)\n"
    )

    # Before tuning, Laplace uses its defaults prior_precision=1 and sigma_noise=1.
    # We keep the predictive on a grid twice as wide as the data for the plot.
    x_plot = torch.linspace(-2 * X_RANGE, 2 * X_RANGE, 400).unsqueeze(1)
    before = evaluate(la, x_test, y_test)
    curve_before = predict(la, x_plot)
    report("before tuning", before)

    # 4. Tune both hyper-parameters by maximizing the log marginal likelihood. The
    #    fitted curvature is reused: nothing is recomputed from the data.
    clock = time.perf_counter()
    tune_hyperparameters(la, args.tune_steps)
    seconds = time.perf_counter() - clock
    after = evaluate(la, x_test, y_test)
    curve_after = predict(la, x_plot)
    report(f"after tuning ({args.tune_steps} Adam steps, {seconds:.1f} s)", after)

    # 5. The plot: the untuned and the tuned predictive side by side.
    curves = [
        (panel_title("before tuning", before), curve_before),
        (panel_title("after tuning", after), curve_after),
    ]
    save_plot(curves, x_train, y_train, x_plot, args.out)
    print(f"\nplot written to {args.out}")
    print(f"total time: {time.perf_counter() - start:.1f} s")
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
