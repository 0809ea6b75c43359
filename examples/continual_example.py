"""Continual learning: the Laplace posterior of each task is the prior of the next.

Online Laplace: with each task's posterior as the next task's prior, training on a
new task does not undo the old ones.

A sequence of tasks, learnt one after the other by the same network, with only the
current task's data at hand: plain fine-tuning fits each new task and forgets the
earlier ones. A Laplace approximation remembers them in a Gaussian: after task
``t`` the posterior ``N(theta_t, P_t^-1)`` (mean the trained weights, precision
the curvature of the tasks so far plus the prior's) is the prior of task ``t + 1``,
whose training minimizes

    loss_{t+1}(theta) + lambda * 0.5 (theta - theta_t)^T P_t (theta - theta_t)

(the negative log density of that prior, up to a constant; ``lambda = 1`` is the
Bayesian recursion, a larger ``--prior-strength`` holds harder, as EWC's lambda).
After training, the curvature of task ``t + 1`` at its new weights is added:
``P_{t+1} = H_{t+1}(theta_{t+1}) + P_t``. The steps:

1. the tasks: four Gaussian blobs in 2-D, one per class, on a circle around the
   origin; task ``t`` (from 0) rotates the inputs by ``t`` times ``--angle``
   degrees (five tasks of 15 degrees by default: each class drifts by 60 degrees
   in all, and its last position comes close to where the next class was at
   first). One network can classify the data of all tasks, but a network trained
   on the last task alone puts the borders between the classes where the first
   task's points are;
2. a ReLU MLP trained on task 1 with an isotropic Gaussian prior (weight decay of
   ``--prior-precision``), then on every following task with one of the priors:

   - fine-tuning: the same isotropic prior on every task, no memory of the past;
   - Laplace with the streaming API (``laplace.streaming``): a dense GGN
     precision, ``dense_ggn.init(theta_t, init_prec=state.prec)`` and ``update``
     over the task's batches, and ``neg_log_prior(state, params)`` as penalty;
   - Laplace with the ``Laplace`` API over all weights, Kronecker-factored (KFAC)
     and diagonal: ``la.fit(loader, override=False)`` after each task and
     ``-la.log_prob(weights, normalized=False)`` as penalty;

3. after each task, the accuracy on the test data of every task seen so far.

What to expect: every method learns the current task. Fine-tuning forgets the first
task entirely (accuracy near 0: the rotated borders give its points the neighbouring
class) and half of the second one. The Laplace priors keep the second task, about
half to three quarters of the first, and the highest average accuracy over the tasks
seen. The dense GGN gives nearly the same numbers through either API
(``--structures full kron diag`` adds the ``Laplace`` API's ``'full'``). Which
structure keeps most is not a matter of exactness: each prior is a quadratic
approximation of the earlier tasks' loss, good near their weights only; here KFAC
keeps most of task 1, the exact dense GGN least. A ``--prior-strength`` above 1
keeps more with every structure (task 1 at 0.82 to 0.94 with 10).

It prints two tables (the accuracy on each task after the last one; the average over
the tasks seen after each task) and saves a figure (accuracy on task 1 and average
accuracy against the number of tasks trained; the decision regions after the last
task with and without the prior) to a PNG file whose path it prints. No download;
it runs in about ten seconds on a laptop CPU: ``python
examples/continual_example.py`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.nn.utils import parameters_to_vector
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace
from laplace.streaming import dense_ggn, neg_log_prior

# The modules shared by the examples live next to this file. ``python examples/...``
# puts this folder on the import path, runpy (which the tests use) does not: do it.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_arguments, torch_threads  # noqa: E402

matplotlib.use("Agg")  # draw into files only: no display needed
DEFAULT_OUT = Path(__file__).resolve().parent / "output" / "continual_example.png"
N_CLASSES = 4
RADIUS = 3.0  # the blobs' centers, on a circle around the origin ...
BLOB_STD = 0.35  # ... and their standard deviation
BATCH_SIZE = 50
FINE_TUNING = "fine-tuning (no prior)"
DENSE = "Laplace, streaming dense GGN"


# ----------------------------------------------------------------------------------
# Data and network
# ----------------------------------------------------------------------------------


def make_blobs(n: int, generator: torch.Generator):
    """``n`` points of the four blobs, class ``k`` centered at angle ``90 k``."""
    y = torch.randint(0, N_CLASSES, (n,), generator=generator)
    angle = 2 * math.pi * y / N_CLASSES
    centers = RADIUS * torch.stack([angle.cos(), angle.sin()], dim=1)
    return centers + BLOB_STD * torch.randn(n, 2, generator=generator), y


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """The points ``x`` ``(n, 2)`` rotated counter-clockwise about the origin."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return x @ torch.tensor([[c, s], [-s, c]])


def make_tasks(args: argparse.Namespace, generator: torch.Generator) -> list[dict]:
    """The tasks: the same training and test points, rotated by ``t * angle``."""
    x, y = make_blobs(args.n_train, generator)
    x_test, y_test = make_blobs(args.n_test, generator)
    return [
        {
            "x": rotate(x, t * args.angle),
            "y": y,
            "x_test": rotate(x_test, t * args.angle),
            "y_test": y_test,
        }
        for t in range(args.n_tasks)
    ]


def make_model(width: int) -> nn.Module:
    """A ReLU MLP 2-width-width-4."""
    return nn.Sequential(
        nn.Linear(2, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, N_CLASSES),
    )


def isotropic_penalty(model: nn.Module, prior_precision: float) -> torch.Tensor:
    """``-log N(theta; 0, prior_precision^-1 I)`` up to a constant."""
    return 0.5 * prior_precision * sum(p.square().sum() for p in model.parameters())


def train(model: nn.Module, task: dict, epochs: int, penalty, seed: int) -> float:
    """Adam on the mean cross-entropy plus ``penalty(model) / N`` (the negative log
    posterior over ``N``: the prior's weight against ``N`` data), the batches
    shuffled by ``seed`` (the same for every method). Returns the last batch's
    loss."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = DataLoader(
        TensorDataset(task["x"], task["y"]),
        batch_size=BATCH_SIZE,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    n = len(task["y"])
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y) + penalty(model) / n
            loss.backward()
            optimizer.step()
    model.eval()
    return loss.item()


def accuracy(model: nn.Module, task: dict) -> float:
    with torch.no_grad():
        predictions = model(task["x_test"]).argmax(dim=1)
    return (predictions == task["y_test"]).float().mean().item()


# ----------------------------------------------------------------------------------
# The priors: one class per method. ``penalty(model)`` is the negative log density
# of the prior of the task being trained; ``update(model, loader)`` turns the prior
# into the posterior after the task (whose data ``loader`` yields).
# ----------------------------------------------------------------------------------


class FineTuning:
    """The isotropic prior on every task: no memory of the tasks before."""

    def __init__(self, prior_precision: float) -> None:
        self.prior_precision = prior_precision

    def penalty(self, model: nn.Module) -> torch.Tensor:
        return isotropic_penalty(model, self.prior_precision)

    def update(self, model: nn.Module, loader: DataLoader) -> None:
        pass


class StreamingDense:
    """The streaming API: a dense GGN precision over all the weights, its state's
    ``params`` a dict like ``dict(model.named_parameters())``."""

    def __init__(self, prior_precision: float, strength: float) -> None:
        self.prior_precision, self.strength = prior_precision, strength
        self.state: dense_ggn.DenseLaplaceState | None = None

    def penalty(self, model: nn.Module) -> torch.Tensor:
        if self.state is None:  # task 1
            return isotropic_penalty(model, self.prior_precision)
        return self.strength * neg_log_prior(self.state, dict(model.named_parameters()))

    def update(self, model: nn.Module, loader: DataLoader) -> None:
        def forward(params, batch):
            x, _ = batch
            return functional_call(model, params, (x,)), None

        def outer_log_likelihood(logits, batch):
            _, y = batch
            return -F.cross_entropy(logits, y, reduction="sum")

        # the mean: a copy of the trained weights (the live parameters would move
        # with the next task's training, and the penalty would stay zero)
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        prior = self.prior_precision if self.state is None else self.state.prec
        state = dense_ggn.init(params, init_prec=prior)
        for batch in loader:
            state = dense_ggn.update(state, batch, forward, outer_log_likelihood)
        self.state = state


class LaplaceAPI:
    """The ``Laplace`` API over all the weights: the first task's ``fit`` with the
    isotropic prior, each later one's added with ``override=False``."""

    def __init__(self, structure: str, prior_precision: float, strength: float):
        self.structure, self.strength = structure, strength
        self.prior_precision = prior_precision
        self.la = None

    def penalty(self, model: nn.Module) -> torch.Tensor:
        if self.la is None:  # task 1
            return isotropic_penalty(model, self.prior_precision)
        weights = parameters_to_vector(model.parameters())
        return -self.strength * self.la.log_prob(weights, normalized=False)

    def update(self, model: nn.Module, loader: DataLoader) -> None:
        if self.la is None:
            self.la = Laplace(
                model,
                "classification",
                subset_of_weights="all",
                hessian_structure=self.structure,
                prior_precision=self.prior_precision,
            )
            self.la.fit(loader)
        else:  # P_t = H_t(theta_t) + P_{t-1}, mean theta_t
            self.la.fit(loader, override=False)


def make_methods(args: argparse.Namespace) -> dict:
    methods = {
        FINE_TUNING: FineTuning(args.prior_precision),
        DENSE: StreamingDense(args.prior_precision, args.prior_strength),
    }
    for structure in args.structures:
        methods[f"Laplace API, {structure.capitalize()}"] = LaplaceAPI(
            structure, args.prior_precision, args.prior_strength
        )
    return methods


# ----------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-tasks", type=int, default=5, help="number of tasks")
    parser.add_argument(
        "--angle", type=float, default=15.0, help="rotation between tasks (degrees)"
    )
    parser.add_argument("--n-train", type=int, default=200, help="points per task")
    parser.add_argument("--n-test", type=int, default=1000, help="test points per task")
    parser.add_argument("--width", type=int, default=32, help="hidden layer width")
    parser.add_argument("--epochs", type=int, default=100, help="epochs per task")
    parser.add_argument(
        "--prior-precision",
        type=float,
        default=1.0,
        help="precision of the isotropic prior (task 1, and fine-tuning's)",
    )
    parser.add_argument(
        "--prior-strength",
        type=float,
        default=1.0,
        help="lambda, the weight of the Laplace prior (1: the Bayesian recursion)",
    )
    parser.add_argument(
        "--structures",
        nargs="*",
        default=["kron", "diag"],
        choices=["kron", "diag", "full"],
        help="hessian_structure of the Laplace API methods",
    )
    add_common_arguments(parser, DEFAULT_OUT)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Run the example; returns, per method, ``accuracy`` (``accuracy[t][s]`` on
    task ``s`` after training on task ``t``, for ``s <= t``), ``seen`` (the average
    over the tasks seen after each task), ``earlier`` (the average over the tasks
    before the last, after the last) and ``seconds``."""
    args = parse_args(argv)
    with torch_threads(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> dict[str, dict]:
    start = time.perf_counter()
    torch.manual_seed(args.seed)  # initial weights
    generator = torch.Generator().manual_seed(args.seed)  # data

    # 1. The tasks.
    tasks = make_tasks(args, generator)
    print(
        f"{args.n_tasks} tasks: {N_CLASSES} Gaussian blobs in 2-D rotated by "
        f"{args.angle:g} degrees from one task to the next; {args.n_train} training "
        f"and {args.n_test} test points per task"
    )

    # 2. Task 1, the same for every method: the isotropic prior.
    clock = time.perf_counter()
    first = make_model(args.width)
    isotropic = FineTuning(args.prior_precision).penalty
    loss = train(first, tasks[0], args.epochs, isotropic, seed=args.seed)
    print(
        f"MLP 2-{args.width}-{args.width}-{N_CLASSES} "
        f"({sum(p.numel() for p in first.parameters())} weights), {args.epochs} "
        f"epochs per task, prior precision {args.prior_precision:g}, Laplace prior "
        f"strength {args.prior_strength:g}; task 1: last batch loss {loss:.3f} "
        f"({time.perf_counter() - clock:.1f} s)\n"
    )

    # ... and the following tasks, with each method's prior.
    results, models = {}, {}
    for name, method in make_methods(args).items():
        clock = time.perf_counter()
        model = copy.deepcopy(first)
        history = [[accuracy(model, tasks[0])]]
        for t in range(1, args.n_tasks):
            method.update(model, fit_loader(tasks[t - 1]))
            train(model, tasks[t], args.epochs, method.penalty, seed=args.seed + t)
            history.append([accuracy(model, task) for task in tasks[: t + 1]])
        # 3. The accuracies.
        results[name] = {
            "accuracy": history,
            "seen": [sum(row) / len(row) for row in history],
            "earlier": sum(history[-1][:-1]) / max(1, args.n_tasks - 1),
            "seconds": time.perf_counter() - clock,
        }
        models[name] = model

    print_tables(results)
    save_figure(results, models, tasks, args.out)
    print(f"\nfigure written to {args.out}")
    print(f"total time: {time.perf_counter() - start:.1f} s")
    return results


def fit_loader(task: dict) -> DataLoader:
    return DataLoader(TensorDataset(task["x"], task["y"]), batch_size=BATCH_SIZE)


def print_tables(results: dict[str, dict]) -> None:
    T = len(next(iter(results.values()))["accuracy"])
    print(f"accuracy on each task after the last (task {T}):")
    header = "".join(f"{f'task {s + 1}':>8}" for s in range(T))
    print(f"{'method':<30}{header}{'earlier':>9}{'time (s)':>9}")
    for name, r in results.items():
        row = "".join(f"{a:>8.3f}" for a in r["accuracy"][-1])
        print(f"{name:<30}{row}{r['earlier']:>9.3f}{r['seconds']:>9.1f}")
    print("\naverage accuracy over the tasks seen, after each task:")
    header = "".join(f"{f'after {t + 1}':>9}" for t in range(T))
    print(f"{'method':<30}{header}")
    for name, r in results.items():
        print(f"{name:<30}" + "".join(f"{a:>9.3f}" for a in r["seen"]))


# ----------------------------------------------------------------------------------
# Figure
# ----------------------------------------------------------------------------------

CLASS_COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red"]


def save_figure(results: dict, models: dict, tasks: list[dict], out: Path) -> None:
    """Top: accuracy on task 1 and the average over the tasks seen, against the
    number of tasks trained. Bottom: the decision regions after the last task,
    without a prior, with the streaming dense Laplace prior and with the first
    other structure of the Laplace API (KFAC by default)."""
    fig = plt.figure(figsize=(13, 9))
    grid = fig.add_gridspec(2, 6, height_ratios=[1, 1.1])
    T = len(tasks)
    steps = range(1, T + 1)
    for column, (key, title) in enumerate(
        [("task 1", "accuracy on task 1"), ("seen", "average accuracy, tasks seen")]
    ):
        ax = fig.add_subplot(grid[0, 3 * column : 3 * column + 3])
        for name, r in results.items():
            values = [row[0] for row in r["accuracy"]] if key == "task 1" else r["seen"]
            style = "k--" if name == FINE_TUNING else "-"
            ax.plot(steps, values, style, marker="o", label=name)
        ax.set(title=title, xlabel="tasks trained", ylim=(-0.03, 1.03), xticks=steps)
    fig.axes[0].set_ylabel("test accuracy")
    fig.axes[0].legend(fontsize=8, loc="lower left")

    names = [FINE_TUNING, DENSE]
    names += [n for n in results if n not in (*names, "Laplace API, Full")][:1]
    span = 6 // len(names)
    lim = RADIUS + 1.5
    grid_x = torch.linspace(-lim, lim, 200)
    xx, yy = torch.meshgrid(grid_x, grid_x, indexing="xy")
    points = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)
    cmap = matplotlib.colors.ListedColormap(CLASS_COLORS)
    for column, name in enumerate(names):
        ax = fig.add_subplot(grid[1, span * column : span * (column + 1)])
        with torch.no_grad():
            regions = models[name](points).argmax(dim=1).reshape(xx.shape)
        ax.contourf(
            xx, yy, regions, levels=[-0.5, 0.5, 1.5, 2.5, 3.5], cmap=cmap, alpha=0.25
        )
        for t, task in enumerate(tasks):
            colors = [CLASS_COLORS[int(c)] for c in task["y"]]
            first = t == 0
            ax.scatter(
                *task["x"].T,
                c=colors,
                s=10 if first else 6,
                marker="o" if first else ".",
                edgecolors="k" if first else "none",
                linewidths=0.4,
                alpha=1.0 if first else 0.35 + 0.5 * t / T,
            )
        earlier = results[name]["earlier"]
        ax.set(
            title=f"{name}\n(earlier tasks: accuracy {earlier:.2f})",
            xlim=(-lim, lim),
            ylim=(-lim, lim),
            aspect="equal",
        )
        ax.set_xticks([])
        ax.set_yticks([])
    fig.text(
        0.5,
        0.01,
        "decision regions after the last task; points: the training "
        "data of every task (task 1 circled in black), colored by class",
        ha="center",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.025, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
