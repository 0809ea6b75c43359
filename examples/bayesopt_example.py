"""Bayesian optimisation with a Laplace-approximated neural network as the surrogate.

Bayesian optimisation (BO) looks for the maximum of an expensive black-box function
in few evaluations. It fits a probabilistic *surrogate* to the points evaluated so
far and evaluates next where an *acquisition function* of the surrogate's predictive
mean and uncertainty is largest: where the surrogate predicts high values, or where
it does not know. Gaussian processes are the classic surrogate; here it is a small
MLP made Bayesian by a Laplace approximation. The steps:

1. the black box: a 1-D function on [-3, 3] with three local maxima
   (``objective``), evaluated at a few random points to start;
2. at every iteration, the surrogate:

   - an MLP trained from scratch on the points evaluated so far (outputs
     standardized),
   - a Laplace approximation over all its weights (full GGN by default) built with
     ``enable_backprop=True``, which keeps its predictive differentiable with
     respect to the INPUT ``x`` (without it the predictive is detached),
   - its prior precision and observation noise tuned together by maximizing the
     Laplace marginal likelihood;

3. the acquisition, computed from the linearized predictive
   ``f_mu, f_var = la(x, pred_type="glm")``: expected improvement (EI) over the
   best value so far, or an upper confidence bound (UCB) ``f_mu + beta * f_std``;
4. its maximization by gradient ascent on ``x``: Adam steps on a batch of starting
   points (the best of many random ones), through the Laplace predictive by
   autograd, each point clamped to the domain; the best end point is evaluated
   next;
5. the result: every iteration's proposal and best value so far, the final regret
   (the gap between the true maximum and the best value found), and the same for
   random search with as many evaluations (the mean over many runs).

A network is a smooth interpolator: between two distant evaluations the surrogate
can be confident and wrong, and BO then settles in a local maximum, as it can with
any surrogate and few evaluations (try other ``--seed`` values; the mean over many
random-search runs is there to compare with).

It saves a figure to a PNG file whose path it prints: the surrogate's predictive
band and the acquisition at a few iterations, and the best value so far against the
number of evaluations for BO and random search. No download; it runs in about half
a minute on a laptop CPU: ``python examples/bayesopt_example.py`` (``--help`` for the
options).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import torch
from matplotlib.ticker import MaxNLocator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace
from laplace.baselaplace import BaseLaplace

# The modules shared by the examples live next to this file. ``python examples/...``
# puts this folder on the import path, runpy (which the tests use) does not: do it.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_arguments, torch_threads  # noqa: E402

matplotlib.use("Agg")  # draw into files only: no display needed
DEFAULT_OUT = Path(__file__).resolve().parent / "output" / "bayesopt_example.png"
LOW, HIGH = -3.0, 3.0  # the domain of the black box


# ----------------------------------------------------------------------------------
# The black box
# ----------------------------------------------------------------------------------


def objective(x: torch.Tensor) -> torch.Tensor:
    """The function to maximize, (n, 1) -> (n, 1): a sine wave on a rising trend,
    with three local maxima on the domain: 0.53 at x = -1.54, 1.16 at x = 0.56 and
    the global one, 1.79 at x = 2.65."""
    return torch.sin(3 * x) + 0.3 * x


def true_maximum() -> float:
    """The maximum of ``objective``, on a fine grid of the domain."""
    return objective(torch.linspace(LOW, HIGH, 100_001).unsqueeze(1)).max().item()


def uniform(n: int) -> torch.Tensor:
    """``n`` points (n, 1) drawn uniformly from the domain."""
    return LOW + (HIGH - LOW) * torch.rand(n, 1)


# ----------------------------------------------------------------------------------
# The surrogate
# ----------------------------------------------------------------------------------


def make_model(width: int) -> nn.Module:
    """A tanh MLP 1-width-width-1."""
    return nn.Sequential(
        nn.Linear(1, width),
        nn.Tanh(),
        nn.Linear(width, width),
        nn.Tanh(),
        nn.Linear(width, 1),
    )


def tune_by_marglik(la, steps: int, lr: float = 0.1) -> None:
    """Maximize the log marginal likelihood in the prior precision and the noise.

    ``la.log_marginal_likelihood(prior_precision, sigma_noise)`` is differentiable
    in both; Adam steps on their logarithms keep them positive. The observation
    noise matters as much as the prior here: the surrogate has to say how closely it
    fits the evaluated points.
    """
    log_hypers = torch.zeros(2, requires_grad=True)  # log prior prec., log sigma
    optimizer = torch.optim.Adam([log_hypers], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        prior_precision, sigma_noise = log_hypers.exp()
        (-la.log_marginal_likelihood(prior_precision, sigma_noise)).backward()
        optimizer.step()
    la.prior_precision, la.sigma_noise = log_hypers.detach().exp()


@dataclass
class Surrogate:
    """A Laplace-approximated MLP fitted to standardized outputs ``(y - shift) /
    scale``; ``predict`` undoes the standardization."""

    la: BaseLaplace
    shift: float
    scale: float

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The predictive mean and std (n,) of ``f(x)`` at ``x`` (n, 1),
        differentiable in ``x`` (``enable_backprop=True``)."""
        f_mu, f_var = self.la(x, pred_type="glm")  # (n, 1) and (n, 1, 1)
        mean = self.shift + self.scale * f_mu.squeeze(1)
        return mean, self.scale * f_var.reshape(-1).clamp_min(1e-12).sqrt()


def fit_surrogate(
    x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace
) -> Surrogate:
    """Train an MLP on the evaluated points, fit a Laplace approximation over all
    its weights around it, and tune the approximation's hyperparameters."""
    shift, scale = y.mean().item(), y.std().item()
    y_std = (y - shift) / scale
    model = make_model(args.width)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(args.train_steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y_std).backward()
        optimizer.step()
    la = Laplace(
        model,
        "regression",
        subset_of_weights="all",
        hessian_structure=args.hessian_structure,
        enable_backprop=True,  # the acquisition is maximized by gradients in x
    )
    la.fit(DataLoader(TensorDataset(x, y_std), batch_size=len(x)))
    tune_by_marglik(la, args.tune_steps)
    return Surrogate(la, shift, scale)


# ----------------------------------------------------------------------------------
# The acquisition and its maximization
# ----------------------------------------------------------------------------------


def acquisition(
    surrogate: Surrogate, x: torch.Tensor, best: float, args: argparse.Namespace
):
    """The acquisition (n,) at ``x`` (n, 1), differentiable in ``x``.

    EI: the expected amount by which ``f(x)`` exceeds ``best`` under the
    predictive ``N(mean, std^2)``, ``(mean - best) Phi(z) + std phi(z)`` with
    ``z = (mean - best) / std``. UCB: ``mean + beta * std``.
    """
    mean, std = surrogate.predict(x)
    if args.acquisition == "ucb":
        return mean + args.beta * std
    normal = torch.distributions.Normal(0.0, 1.0)
    z = (mean - best) / std
    return (mean - best) * normal.cdf(z) + std * normal.log_prob(z).exp()


def maximize_acquisition(
    surrogate: Surrogate, best: float, args: argparse.Namespace
) -> torch.Tensor:
    """The point (1, 1) of largest acquisition found by gradient ascent on ``x``.

    The acquisition has narrow peaks between flat regions where its gradient
    vanishes, so the ascent starts from the ``args.restarts`` best of
    ``args.candidates`` random points (one batched evaluation, no gradients), and
    refines them together: each point's acquisition depends on that point only, so
    the gradient of their sum gives every point its own gradient.
    """
    with torch.no_grad():
        candidates = uniform(args.candidates)
        values = acquisition(surrogate, candidates, best, args)
    x = candidates[values.topk(args.restarts).indices].requires_grad_()
    optimizer = torch.optim.Adam([x], lr=args.ascent_lr)
    for _ in range(args.ascent_steps):
        # only x needs a gradient: autograd.grad leaves the weights' .grad alone
        (x.grad,) = torch.autograd.grad(-acquisition(surrogate, x, best, args).sum(), x)
        optimizer.step()
        with torch.no_grad():
            x.clamp_(LOW, HIGH)
    with torch.no_grad():
        values = acquisition(surrogate, x, best, args)
    return x.detach()[values.argmax()].reshape(1, 1)


# ----------------------------------------------------------------------------------
# The loop and the baseline
# ----------------------------------------------------------------------------------


def bayesian_optimisation(args: argparse.Namespace) -> dict:
    """Run BO; returns the evaluated points, their values and the snapshots of the
    surrogate and the acquisition on a grid at the iterations to plot."""
    x = uniform(args.n_init)
    y = objective(x)
    grid = torch.linspace(LOW, HIGH, 300).unsqueeze(1)
    plotted = {1, (args.n_iter + 1) // 2, args.n_iter}
    snapshots = []
    for iteration in range(1, args.n_iter + 1):
        clock = time.perf_counter()
        best = y.max().item()
        surrogate = fit_surrogate(x, y, args)
        proposal = maximize_acquisition(surrogate, best, args)
        value = objective(proposal)
        if iteration in plotted:
            with torch.no_grad():
                mean, std = surrogate.predict(grid)
                acq = acquisition(surrogate, grid, best, args)
            snapshots.append(
                dict(
                    iteration=iteration,
                    x=x,
                    y=y,
                    proposal=proposal,
                    mean=mean,
                    std=std,
                    acquisition=acq,
                )
            )
        x, y = torch.cat([x, proposal]), torch.cat([y, value])
        print(
            f"  iteration {iteration:>2}: x = {proposal.item():+.3f}, "
            f"f(x) = {value.item():+.3f}, best so far {y.max().item():.3f} "
            f"({time.perf_counter() - clock:.1f} s)"
        )
    return {"x": x, "y": y, "grid": grid, "snapshots": snapshots}


def best_so_far(y: torch.Tensor) -> torch.Tensor:
    """The running maximum of the values along the last dimension."""
    return y.cummax(dim=-1).values


def random_search(n_evaluations: int, n_runs: int) -> torch.Tensor:
    """Best value so far (n_runs, n_evaluations) of random search, run by run."""
    return best_so_far(objective(uniform(n_runs * n_evaluations)).view(n_runs, -1))


# ----------------------------------------------------------------------------------
# The figure
# ----------------------------------------------------------------------------------


def save_figure(bo: dict, random_runs: torch.Tensor, optimum: float, args) -> None:
    """Per snapshot, the surrogate (top) and the acquisition (bottom); on the right,
    the best value so far of BO and of random search."""
    snapshots, grid = bo["snapshots"], bo["grid"].squeeze(1)
    fig = plt.figure(figsize=(4.2 * (len(snapshots) + 1.3), 6.5))
    panels = fig.add_gridspec(
        2,
        len(snapshots) + 1,
        height_ratios=(2, 1),
        width_ratios=[1] * len(snapshots) + [1.3],
    )
    for column, snap in enumerate(snapshots):
        top = fig.add_subplot(panels[0, column])
        mean, std = snap["mean"], snap["std"]
        top.fill_between(
            grid, mean - 2 * std, mean + 2 * std, alpha=0.3, label="mean ± 2 std"
        )
        top.plot(grid, mean, lw=2, label="surrogate mean")
        top.plot(grid, objective(grid), "k--", lw=1, label="black box")
        top.scatter(snap["x"], snap["y"], c="k", s=15, zorder=3, label="evaluated")
        top.axvline(snap["proposal"].item(), color="tab:red", lw=1, label="proposal")
        top.set(ylim=(-2.5, 2.5), title=f"iteration {snap['iteration']}")
        bottom = fig.add_subplot(panels[1, column], sharex=top)
        bottom.plot(grid, snap["acquisition"], color="tab:green")
        bottom.axvline(snap["proposal"].item(), color="tab:red", lw=1)
        bottom.set(xlabel="x", ylabel=args.acquisition.upper() if column == 0 else "")
    fig.axes[0].set_ylabel("f(x)")
    fig.axes[0].legend(loc="lower left", fontsize=7)

    curve = fig.add_subplot(panels[:, -1])
    evaluations = torch.arange(1, len(bo["y"]) + 1)
    low, high = random_runs.quantile(torch.tensor([0.25, 0.75]), dim=0)
    curve.fill_between(evaluations, low, high, color="0.8", label="random: quartiles")
    curve.plot(evaluations, random_runs.mean(0), color="0.4", label="random: mean")
    curve.plot(evaluations, best_so_far(bo["y"].squeeze(1)), "o-", label="BO")
    curve.axhline(optimum, color="k", ls="--", lw=1, label="true maximum")
    curve.axvline(args.n_init + 0.5, color="tab:red", lw=1, ls=":")
    curve.set(
        xlabel="evaluations",
        ylabel="best value so far",
        title=f"{args.n_init} random starting points, then BO",
    )
    curve.xaxis.set_major_locator(MaxNLocator(integer=True))
    curve.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-init", type=int, default=4, help="random first points")
    parser.add_argument("--n-iter", type=int, default=16, help="BO iterations")
    parser.add_argument(
        "--acquisition", default="ei", choices=["ei", "ucb"], help="EI or UCB"
    )
    parser.add_argument("--beta", type=float, default=2.0, help="UCB's std factor")
    parser.add_argument("--width", type=int, default=32, help="hidden layer width")
    parser.add_argument(
        "--hessian-structure", default="full", choices=["full", "kron", "diag"]
    )
    parser.add_argument(
        "--train-steps", type=int, default=1000, help="Adam steps of the MLP"
    )
    parser.add_argument(
        "--tune-steps", type=int, default=100, help="Adam steps of the marglik"
    )
    parser.add_argument(
        "--candidates", type=int, default=500, help="random points screened"
    )
    parser.add_argument(
        "--restarts", type=int, default=8, help="starting points of the ascent"
    )
    parser.add_argument(
        "--ascent-steps", type=int, default=50, help="Adam steps of the ascent"
    )
    parser.add_argument("--ascent-lr", type=float, default=0.02, help="its step size")
    parser.add_argument(
        "--random-runs", type=int, default=1000, help="runs of random search"
    )
    add_common_arguments(parser, DEFAULT_OUT)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the example; returns the evaluated points and values, the final regret
    of BO and the mean final regret of random search."""
    args = parse_args(argv)
    with torch_threads(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    optimum = true_maximum()
    n_evaluations = args.n_init + args.n_iter
    print(
        f"black box: 1-D, three local maxima on [{LOW:g}, {HIGH:g}], maximum "
        f"{optimum:.3f}; {args.n_init} random points, then {args.n_iter} BO "
        f"iterations ({args.acquisition.upper()}, MLP 1-{args.width}-{args.width}-1, "
        f"{args.hessian_structure} Laplace over all weights)"
    )
    bo = bayesian_optimisation(args)
    random_runs = random_search(n_evaluations, args.random_runs)

    regret = optimum - bo["y"].max().item()
    random_regret = (optimum - random_runs[:, -1]).mean().item()
    found = bo["x"][bo["y"].argmax()].item()
    print(
        f"\nafter {n_evaluations} evaluations: best f(x) = {bo['y'].max().item():.4f} "
        f"at x = {found:+.3f}, regret {regret:.4f}\n"
        f"random search, {n_evaluations} evaluations: mean regret "
        f"{random_regret:.4f} over {args.random_runs} runs"
    )
    save_figure(bo, random_runs, optimum, args)
    print(f"\nfigure written to {args.out}")
    print(f"total time: {time.perf_counter() - start:.1f} s")
    return {
        "x": bo["x"],
        "y": bo["y"],
        "optimum": optimum,
        "regret": regret,
        "random_regret": random_regret,
    }


if __name__ == "__main__":
    main()
