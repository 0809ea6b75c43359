"""A Kronecker-factored Laplace approximation over ALL weights of a transformer.

A synthetic sequence-classification task that a bag of tokens cannot solve: every
sequence holds each of three marker tokens exactly once, at random positions among
filler tokens, and its class is the marker that comes *first*. The token counts are
the same in every sequence, so only a model that sees the order (attention with
position embeddings) beats chance; ``--label-noise`` of the training and test labels
are flipped, so that even a perfect model cannot be certain.

The steps:

1. train a small transformer classifier (token and position ``nn.Embedding``, a
   stack of ``nn.TransformerEncoderLayer``, a final ``nn.LayerNorm``, mean pooling,
   a linear head) long enough that it starts fitting the flipped labels: its MAP
   predictions become over-confident;
2. fit ``Laplace(model, "classification", subset_of_weights="all",
   hessian_structure="kron")`` over every weight of it (embeddings, attention,
   feed-forward, layer norms, head): the default backend, ``NativeGGN``, gives each
   parameter a Kronecker-factored block, or an exact dense block where no Kronecker
   structure exists (biases, layer-norm scales), and prints how it served them
   (``la.structure_table``);
3. tune the prior precision by the marginal likelihood;
4. compare the MAP network and the Laplace predictive (linearized, ``"glm"``, with
   the probit link) on held-out data: accuracy, negative log-likelihood (NLL),
   Brier score and expected calibration error (ECE, 10 bins of confidence; the
   metrics are those of ``examples/_calibration.py``).

Laplace corrects over-confidence; it does not make an already calibrated network
better: with ``--label-noise 0`` the MAP network is right and sure, and the Laplace
predictive is under-confident (its prior, tuned by the evidence, is weak).

It prints the tables and saves the reliability diagrams (accuracy against
confidence per bin, one panel per predictive) to a PNG file whose path it prints.
No download; it runs in under a minute on a 2-core CPU:
``python examples/transformer_example.py`` (``--help`` for the options, e.g.
``--kfac-approx reduce`` for KFAC-reduce on the weights shared over positions).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
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

DEFAULT_OUT = Path(__file__).resolve().parent / "output" / "transformer_example.png"
MARKERS = (0, 1, 2)  # token ids of the markers; class c: marker c comes first
N_CLASSES = len(MARKERS)


# ----------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------


def make_sequences(
    n: int, length: int, vocab: int, label_noise: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` token sequences ``(n, length)`` and their classes ``(n,)``.

    Every sequence holds each marker exactly once, at random distinct positions,
    and filler tokens (ids ``len(MARKERS)`` to ``vocab - 1``) elsewhere; its class is
    the marker that comes first. A fraction ``label_noise`` of the labels is replaced
    by one of the other classes.
    """
    x = torch.randint(len(MARKERS), vocab, (n, length), generator=generator)
    positions = torch.rand(n, length, generator=generator).argsort(dim=1)
    positions = positions[:, : len(MARKERS)]  # distinct positions, one per marker
    x.scatter_(1, positions, torch.tensor(MARKERS).expand(n, -1))
    y = positions.argmin(dim=1)  # the marker at the smallest position
    flip = torch.rand(n, generator=generator) < label_noise
    shift = torch.randint(1, N_CLASSES, (n,), generator=generator)
    y = torch.where(flip, (y + shift) % N_CLASSES, y)
    return x, y


# ----------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------


class TransformerClassifier(nn.Module):
    """Token and position embeddings, ``layers`` encoder layers (self-attention and
    a feed-forward block, each with a residual connection and a layer norm), a final
    layer norm, the mean over the positions, and a linear head.

    The positions are an ``nn.Embedding`` (not a bare ``nn.Parameter``), so that the
    curvature engine has a rule for every parameter (no ``torch.func`` fallback).
    It is called on the position ids with a batch dimension of one, ``(1, T)``: a
    row that every example shares, which the engine copies per example (called on
    ``(T,)`` its output would have no batch dimension at all, and the engine refuses
    it).
    """

    def __init__(self, vocab: int, length: int, dim: int, heads: int, layers: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(length, dim)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        where = torch.arange(x.shape[1], device=x.device)
        h = self.encoder(self.tokens(x) + self.positions(where[None]))
        return self.head(self.norm(h).mean(dim=1))


def train(model: nn.Module, loader: DataLoader, epochs: int, lr: float) -> list:
    """Cross-entropy with a small (decoupled) weight decay, long enough to fit the
    flipped labels too; returns the mean training loss of each epoch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, lr, total_steps=epochs * len(loader)
    )
    losses = []
    model.train()
    for _ in range(epochs):
        total = 0.0
        for x, y in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(x)
        losses.append(total / len(loader.dataset))
    model.eval()
    return losses


# ----------------------------------------------------------------------------------
# Laplace over all weights
# ----------------------------------------------------------------------------------


def structure_summary(la, model: nn.Module) -> dict:
    """How the curvature engine serves the parameters, from ``la.structure_table``:
    ``{(rule, block): [tensors, weights]}``, and the totals ``"weights"`` (served)
    and ``"model"`` (all trainable weights of the model)."""
    sizes = dict(model.named_parameters())
    summary: dict = defaultdict(lambda: [0, 0])
    for row in la.structure_table:
        key = (row["rules"], row["kron"])
        summary[key][0] += 1
        summary[key][1] += sizes[row["parameter"]].numel()
    served = sum(n for _, n in summary.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"rows": dict(summary), "weights": served, "model": trainable}


def print_structure(summary: dict) -> None:
    print(f"{'rule':<22}{'block in Kron':<16}{'tensors':>8}{'weights':>9}")
    for (rule, block), (tensors, weights) in sorted(summary["rows"].items()):
        print(f"{rule:<22}{block:<16}{tensors:>8}{weights:>9}")
    by_block: dict = defaultdict(int)
    for (_, block), (_, weights) in summary["rows"].items():
        by_block[block] += weights
    parts = ", ".join(f"{n} in {block} blocks" for block, n in sorted(by_block.items()))
    print(
        f"{summary['weights']} of the model's {summary['model']} weights covered: "
        f"{parts}"
    )


@torch.no_grad()
def map_probs(model: nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([torch.softmax(model(c), -1) for c in x.split(batch)])


def laplace_probs(la, x: torch.Tensor, batch: int) -> torch.Tensor:
    """The linearized predictive with the probit link, in chunks of ``batch``."""
    return torch.cat(
        [la(c, pred_type="glm", link_approx="probit") for c in x.split(batch)]
    )


# ----------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=4000, help="training sequences")
    parser.add_argument("--n-test", type=int, default=2000, help="test sequences")
    parser.add_argument("--length", type=int, default=8, help="tokens per sequence")
    parser.add_argument("--vocab", type=int, default=16, help="vocabulary size")
    parser.add_argument(
        "--label-noise", type=float, default=0.2, help="fraction of flipped labels"
    )
    parser.add_argument("--dim", type=int, default=32, help="model width")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--layers", type=int, default=2, help="encoder layers")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument(
        "--kfac-approx",
        choices=("expand", "reduce"),
        default="expand",
        help="KFAC on the weights shared over positions",
    )
    parser.add_argument(
        "--tune-steps", type=int, default=100, help="marglik steps of the prior"
    )
    add_common_arguments(parser, DEFAULT_OUT)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the example; returns the scores of the MAP and of the Laplace predictive
    (``"results"``), the structure summary (``"structure"``), the number of weights
    of the Laplace approximation (``"n_params"``) and the timings."""
    args = parse_args(argv)
    with torch_threads(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    data = (args.length, args.vocab, args.label_noise, g)
    x, y = make_sequences(args.n_train, *data)
    x_test, y_test = make_sequences(args.n_test, *data)

    model = TransformerClassifier(
        args.vocab, args.length, args.dim, args.heads, args.layers
    )
    start = time.perf_counter()
    losses = train(
        model,
        DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True),
        args.epochs,
        args.lr,
    )
    timings = {"training": time.perf_counter() - start}
    print(
        f"trained {sum(p.numel() for p in model.parameters())} weights for "
        f"{args.epochs} epochs in {timings['training']:.1f} s "
        f"(final training loss {losses[-1]:.3f})"
    )

    la = Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure="kron",
        backend_kwargs={"kfac_approx": args.kfac_approx},
    )
    start = time.perf_counter()
    la.fit(DataLoader(TensorDataset(x, y), batch_size=100))
    timings["fit"] = time.perf_counter() - start
    start = time.perf_counter()
    la.optimize_prior_precision(method="marglik", n_steps=args.tune_steps, lr=0.1)
    timings["prior tuning"] = time.perf_counter() - start

    print(f"\nbackend {type(la.backend).__name__}, KFAC-{args.kfac_approx}:")
    structure = structure_summary(la, model)
    print_structure(structure)

    results = {"MAP": evaluate(map_probs(model, x_test, 500), y_test)}
    start = time.perf_counter()
    name = f"Laplace (all weights, Kron, {args.kfac_approx})"
    results[name] = evaluate(laplace_probs(la, x_test, 500), y_test)
    timings["prediction"] = time.perf_counter() - start
    results[name]["prior_precision"] = la.prior_precision.item()
    results[name]["log_marglik"] = la.log_marginal_likelihood().item()

    print(
        f"\n{'method':<36}{'accuracy':>9}{'confidence':>11}{'NLL':>8}{'Brier':>8}"
        f"{'ECE':>8}"
    )
    for method, r in results.items():
        print(
            f"{method:<36}{r['accuracy']:>9.3f}{r['confidence']:>11.3f}"
            f"{r['nll']:>8.3f}{r['brier']:>8.3f}{r['ece']:>8.3f}"
        )
    print(
        f"tuned prior precision {results[name]['prior_precision']:.3g}, log "
        f"marginal likelihood {results[name]['log_marglik']:.1f}"
    )
    print(
        "seconds: "
        + ", ".join(f"{step} {seconds:.1f}" for step, seconds in timings.items())
    )
    save_reliability_diagram(results, args.out)
    print(f"reliability diagrams written to {args.out}")
    return {
        "results": results,
        "structure": structure,
        "n_params": la.n_params,
        "timings": timings,
    }


if __name__ == "__main__":
    main()
