"""A reward model with uncertainty: Laplace with ``likelihood="reward_modeling"``.

A reward model scores single items (e.g. the responses of a language model) but is
trained on preferences between two items: "item 0 is better than item 1". Under the
Bradley-Terry model, item 0 is preferred with probability ``sigmoid(r(x0) - r(x1))``,
which is the softmax of the two rewards seen as the logits of a 2-class problem.

Laplace's ``"reward_modeling"`` likelihood follows this: it FITS with the
classification likelihood on pairs and PREDICTS as a regression on single items. The
model must therefore accept both shapes (see ``RewardModel``):

* fitting: ``x`` of shape (batch, 2, dim), a pair per row; the target ``y`` of shape
  (batch,) is the index (0 or 1) of the preferred item; the model returns the two
  rewards, (batch, 2), used as logits;
* prediction: ``x`` of shape (batch, dim), single items; the model returns their
  rewards, (batch, 1), and ``la(x)`` returns a Gaussian over them: a mean (batch, 1)
  and a variance (batch, 1, 1).

The script draws preference pairs from a hidden true reward on 2-D inputs near the
origin, trains an MLP reward model on them, fits Laplace approximations (over the
last layer, Kronecker-factored and exact; over all weights, diagonal) with their
prior precision tuned by marginal likelihood, and prints a table of the predicted
reward's standard deviation in distribution and farther and farther from the
training data, where it grows. It saves a figure of the same to a PNG file whose
path it prints: the mean predicted std against the distance from the origin, for
each approximation, and a map of the std of the exact last-layer one over the
plane, with the training items.

Run with ``python examples/reward_modeling_example.py`` (``--help`` for the options).
It runs in a few seconds on a laptop CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace

# The modules shared by the examples live next to this file. ``python examples/...``
# puts this folder on the import path, runpy (which the tests use) does not: do it.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_arguments, torch_threads  # noqa: E402

matplotlib.use("Agg")  # draw into files only: no display needed
DEFAULT_OUT = Path(__file__).resolve().parent / "output" / "reward_modeling_example.png"
DIM = 2  # the items are points in the plane ...
SPREAD = 1.0  # ... drawn from N(0, SPREAD**2 I) for training
OOD_RADII = (3.0, 6.0, 12.0)  # test rings far from the training data

# The Laplace approximations shown: (subset_of_weights, hessian_structure). This
# library also has a diagonal one over the last layer ("last_layer", "diag"); it is
# left out so that the script runs unchanged with laplace-torch 0.3, which cannot
# build last-layer Jacobians from the pair features (batch, 2, width).
CONFIGS = [("last_layer", "kron"), ("last_layer", "full"), ("all", "diag")]


# ----------------------------------------------------------------------------------
# Data and model
# ----------------------------------------------------------------------------------


def true_reward(x: torch.Tensor) -> torch.Tensor:
    """The hidden reward that the preferences come from, (..., DIM) -> (...)."""
    return 2.0 * torch.sin(x[..., 0]) + x[..., 1]


def make_pairs(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` pairs (n, 2, DIM) and the index (n,) of the preferred item of each.

    Bradley-Terry: item 0 is preferred with probability sigmoid(r(x0) - r(x1)).
    """
    pairs = SPREAD * torch.randn(n, 2, DIM, generator=generator)
    rewards = true_reward(pairs)
    p_first = torch.sigmoid(rewards[:, 0] - rewards[:, 1])
    preferred = (torch.rand(n, generator=generator) >= p_first).long()
    return pairs, preferred


def ring(n: int, radius: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` single items (n, DIM) on the circle of the given radius."""
    angle = 2 * torch.pi * torch.rand(n, generator=generator)
    return radius * torch.stack([angle.cos(), angle.sin()], dim=-1)


class RewardModel(nn.Module):
    """An MLP reward ``net: DIM -> 1`` that scores pairs and single items.

    On pairs (batch, 2, DIM) it returns the two rewards (batch, 2), the logits of
    "which item is preferred"; on single items (batch, DIM) it returns the rewards
    (batch, 1). The last layer ``net[-1]`` is the same in both cases, so last-layer
    Laplace uses the same weights for fitting and for prediction.

    The last layer has no bias: preferences only fix the rewards up to a constant
    (adding one to both rewards of a pair leaves ``sigmoid(r0 - r1)`` unchanged), so
    a bias would be left undetermined by the data, its posterior variance equal to
    the prior's everywhere (the reward heads of language models have none either).
    ReLU features grow linearly away from the data, and so does the reward's
    uncertainty that the Laplace approximation attaches to them.
    """

    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(DIM, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.net(x)
        return r.squeeze(-1) if x.ndim == 3 else r


def train(model: nn.Module, loader: DataLoader, epochs: int) -> float:
    """Cross-entropy on the pair logits: the Bradley-Terry negative log-likelihood."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(epochs):
        for pairs, preferred in loader:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(pairs), preferred)
            loss.backward()
            optimizer.step()
    return loss.item()


@torch.no_grad()
def pair_accuracy(model: nn.Module, pairs: torch.Tensor) -> float:
    """How often the model ranks a pair as the TRUE reward does (noise-free)."""
    truth = true_reward(pairs).argmax(-1)
    return (model(pairs).argmax(-1) == truth).float().mean().item()


# ----------------------------------------------------------------------------------
# Figure
# ----------------------------------------------------------------------------------


def reward_std(la, x: torch.Tensor) -> torch.Tensor:
    """The std (n,) of the predicted reward of the single items ``x`` (n, DIM)."""
    with torch.no_grad():
        _, f_var = la(x)
    return f_var.reshape(-1).sqrt()


def save_figure(approximations: dict, pairs, out: Path, generator) -> None:
    """Two panels: the mean predicted reward std on circles of growing radius, one
    curve per approximation, and a map of the std of ``"last_layer full"`` over the
    plane with (some of) the training items on it."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    radii = torch.linspace(0, max(OOD_RADII), 25)
    for name, la in approximations.items():
        stds = [reward_std(la, ring(200, float(r), generator)).mean() for r in radii]
        left.plot(radii, stds, marker="o", ms=3, label=name)
    left.axvspan(0, 2 * SPREAD, color="0.85", label="most training items (|x| < 2)")
    left.set(
        xlabel="distance |x| from the origin",
        ylabel="mean predicted reward std",
        yscale="log",
        title="The reward's uncertainty grows away from the training data",
    )
    left.legend(fontsize=8)

    extent = max(OOD_RADII) * 0.75
    grid = torch.linspace(-extent, extent, 121)
    g1, g2 = torch.meshgrid(grid, grid, indexing="xy")
    points = torch.stack([g1, g2], dim=-1).reshape(-1, DIM)
    std = reward_std(approximations["last_layer full"], points)
    image = right.contourf(g1, g2, std.reshape(g1.shape).log10(), levels=20)
    fig.colorbar(image, ax=right, label="log10 predicted reward std")
    items = pairs[:300].reshape(-1, DIM)
    right.scatter(items[:, 0], items[:, 1], s=3, c="w", alpha=0.6, label="items")
    right.set(
        xlabel="$x_1$",
        ylabel="$x_2$",
        aspect="equal",
        title="Predicted reward std, last layer full",
    )
    right.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=2000, help="training pairs")
    parser.add_argument("--n-test", type=int, default=500, help="test items per set")
    parser.add_argument("--width", type=int, default=32, help="hidden layer width")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=64)
    add_common_arguments(parser, DEFAULT_OUT)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Run the example; returns the reward model's scores and, per Laplace
    approximation ("last_layer kron", ...), its number of parameters, tuned prior
    precision and mean predicted reward std on each test set."""
    args = parse_args(argv)
    with torch_threads(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    start = time.perf_counter()
    torch.manual_seed(args.seed)  # initial weights
    generator = torch.Generator().manual_seed(args.seed)  # data and shuffling

    # 1. Preference data: pairs of items and the index of the preferred one.
    pairs, preferred = make_pairs(args.n_train, generator)
    test_pairs, _ = make_pairs(args.n_test, generator)
    loader = DataLoader(
        TensorDataset(pairs, preferred),
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    print(
        f"data: {args.n_train} preference pairs of items x ~ N(0, {SPREAD:g}^2 I) "
        f"in {DIM}-D, Bradley-Terry on the hidden reward 2 sin(x1) + x2"
    )

    # 2. The reward model, trained on the pairs.
    clock = time.perf_counter()
    model = RewardModel(args.width)
    loss = train(model, loader, args.epochs)
    accuracy = pair_accuracy(model, test_pairs)
    print(
        f"reward model: MLP {DIM}-{args.width}-{args.width}-1, {args.epochs} epochs: "
        f"last batch loss {loss:.3f}; {accuracy:.1%} of "
        f"the test pairs ranked as by the true reward "
        f"({time.perf_counter() - clock:.1f} s)\n"
    )

    # 3. Test sets of SINGLE items: in distribution, and on rings farther and
    #    farther from the training data.
    in_distribution = SPREAD * torch.randn(args.n_test, DIM, generator=generator)
    test_sets = {"in-distribution": in_distribution}
    for radius in OOD_RADII:
        test_sets[f"ring |x| = {radius:g}"] = ring(args.n_test, radius, generator)

    # 4. Laplace approximations, fitted on the pair loader (classification on the
    #    two rewards) and queried on single items (regression on the reward):
    #    Kronecker-factored and exact (full) over the last layer, diagonal over all
    #    the weights.
    results: dict[str, dict[str, float]] = {}
    approximations = {}
    for subset, structure in CONFIGS:
        clock = time.perf_counter()
        la = Laplace(
            model,
            "reward_modeling",
            subset_of_weights=subset,
            hessian_structure=structure,
        )
        la.fit(loader)
        la.optimize_prior_precision(method="marglik")
        result = {
            "n_params": int(la.n_params),
            "prior_precision": float(la.prior_precision.mean()),
        }
        for name, x in test_sets.items():
            f_mu, f_var = la(x)  # (n, 1) rewards and their (n, 1, 1) variances
            assert f_mu.shape == (len(x), 1) and f_var.shape == (len(x), 1, 1)
            result[name] = f_var.detach().reshape(-1).sqrt().mean().item()
        result["seconds"] = time.perf_counter() - clock
        results[f"{subset} {structure}"] = result
        approximations[f"{subset} {structure}"] = la

    # 5. The table: the predicted reward std grows away from the training data.
    #    The Kronecker factors treat the two items of a pair as two separate inputs
    #    of the head, so they also put curvature on the directions that move both
    #    rewards of a pair alike, which preferences cannot determine: KFAC is more
    #    confident than the exact (full) last-layer posterior.
    print("mean predicted reward std (Laplace, prior precision tuned by marglik):")
    print(f"  {'test items':<18}" + "".join(f"{key:>18}" for key in results))
    for name in test_sets:
        print(f"  {name:<18}" + "".join(f"{r[name]:>18.3f}" for r in results.values()))
    for label, key, fmt in [
        ("parameters", "n_params", "d"),
        ("prior precision", "prior_precision", ".3g"),
        ("time (s)", "seconds", ".1f"),
    ]:
        cells = "".join(f"{r[key]:>18{fmt}}" for r in results.values())
        print(f"  {label:<18}{cells}")

    # 6. The figure.
    save_figure(approximations, pairs, args.out, generator)
    print(f"\nfigure written to {args.out}")
    print(f"total time: {time.perf_counter() - start:.1f} s")
    return {"reward_model": {"loss": loss, "pair_accuracy": accuracy}, **results}


if __name__ == "__main__":
    main()
