"""Calibration metrics and reliability diagrams, shared by the classification examples.

A classifier is *calibrated* when its confidence (the largest predicted class
probability) matches how often it is right: of all predictions made with 80%
confidence, 80% should be correct. The helpers here measure that on a test set:

* ``evaluate(probs, y)``: accuracy, mean confidence, negative log-likelihood (NLL),
  Brier score and expected calibration error (ECE), plus the per-bin numbers behind
  the ECE;
* ``calibration_bins(probs, y)``: the predictions grouped into ``N_BINS`` bins of
  equal width in confidence, with each bin's mean confidence, accuracy and count;
* ``save_reliability_diagram(results, out)``: one panel per method, the accuracy of
  each bin against its confidence (a calibrated model sits on the diagonal).

The confidence of a ``C``-class prediction is at least ``1 / C``, so the bins split
``[1 / C, 1]`` (not ``[0, 1]``, where the lowest bins would always be empty).

The examples import this module as ``from _calibration import ...`` after putting
their own folder on ``sys.path`` (the leading underscore says it is no example).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import torch

matplotlib.use("Agg")  # draw into files only: no display needed
N_BINS = 10


@dataclass
class Bin:
    """The predictions whose confidence falls in ``(lower, upper]``."""

    lower: float
    upper: float
    count: int
    confidence: float  # mean confidence in the bin (nan when empty)
    accuracy: float  # fraction correct in the bin (nan when empty)


def calibration_bins(
    probs: torch.Tensor, y: torch.Tensor, n_bins: int = N_BINS
) -> list[Bin]:
    """Group the predictions ``probs`` (N, C) of labels ``y`` (N,) by confidence."""
    confidence, prediction = probs.max(dim=1)
    correct = (prediction == y).to(probs.dtype)
    edges = torch.linspace(1 / probs.shape[1], 1, n_bins + 1).tolist()
    # bucketize puts a confidence c in bin b when edges[b] < c <= edges[b + 1]
    # (the lowest bin also takes c = 1 / C exactly)
    which = torch.bucketize(confidence, torch.tensor(edges[1:-1], dtype=probs.dtype))
    bins = []
    for b in range(n_bins):
        inside = which == b
        count = int(inside.sum())
        mean_conf = confidence[inside].mean().item() if count else float("nan")
        accuracy = correct[inside].mean().item() if count else float("nan")
        bins.append(Bin(edges[b], edges[b + 1], count, mean_conf, accuracy))
    return bins


def expected_calibration_error(bins: list[Bin]) -> float:
    """ECE: the gap between accuracy and confidence, averaged over the bins with
    weights proportional to their counts."""
    total = sum(b.count for b in bins)
    return sum(b.count * abs(b.accuracy - b.confidence) for b in bins if b.count) / (
        total
    )


def nll(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Mean negative log-probability of the true labels (lower is better)."""
    return -probs.gather(1, y[:, None]).clamp_min(1e-12).log().mean().item()


def brier(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Mean squared distance between ``probs`` and the one-hot labels (in [0, 2])."""
    one_hot = torch.nn.functional.one_hot(y, probs.shape[1]).to(probs.dtype)
    return (probs - one_hot).square().sum(dim=1).mean().item()


def evaluate(probs: torch.Tensor, y: torch.Tensor) -> dict:
    """Accuracy, mean confidence, NLL, Brier score and ECE of the predictions
    ``probs`` (N, C), and the confidence ``bins`` behind the ECE (for
    ``save_reliability_diagram``). A confidence above the accuracy means that the
    predictions are over-confident on average, below it under-confident."""
    probs = probs.detach()
    bins = calibration_bins(probs, y)
    return {
        "accuracy": (probs.argmax(dim=1) == y).float().mean().item(),
        "confidence": probs.max(dim=1).values.mean().item(),
        "nll": nll(probs, y),
        "brier": brier(probs, y),
        "ece": expected_calibration_error(bins),
        "bins": bins,
    }


def plot_reliability(ax, bins: list[Bin], title: str = "") -> None:
    """Draw one reliability diagram on ``ax``: a bar per non-empty bin up to its
    accuracy, with its number of predictions written at its foot, a hatched box
    from the accuracy to the bin's mean confidence (above the bar: over-confident,
    inside it: under-confident), and the diagonal of perfect calibration."""
    filled = [b for b in bins if b.count]
    centers = [(b.lower + b.upper) / 2 for b in filled]
    width = bins[0].upper - bins[0].lower
    ax.bar(
        centers,
        [b.accuracy for b in filled],
        width=width,
        color="tab:blue",
        edgecolor="k",
        label="accuracy",
    )
    ax.bar(
        centers,
        [b.confidence - b.accuracy for b in filled],
        bottom=[b.accuracy for b in filled],
        width=width,
        fill=False,
        hatch="///",
        edgecolor="tab:red",
        label="gap to mean confidence",
    )
    for center, b in zip(centers, filled):
        ax.text(center, 0.02, b.count, ha="center", fontsize=6)
    low = bins[0].lower
    ax.plot([low, 1], [low, 1], "k--", lw=1, label="perfect calibration")
    ax.set(xlim=(low, 1), ylim=(0, 1), xlabel="confidence", title=title)


def save_reliability_diagram(results: dict, out: Path, columns: int = 0) -> None:
    """Save one reliability diagram per method of ``results`` ({name: the result of
    ``evaluate``}) to the PNG file ``out``, in rows of ``columns`` panels (all in one
    row by default)."""
    columns = columns or len(results)
    rows = -(-len(results) // columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(3.6 * columns, 3.6 * rows), squeeze=False
    )
    for ax, (name, r) in zip(axes.flat, results.items()):
        title = f"{name}\nNLL {r['nll']:.3f}, ECE {r['ece']:.3f}"
        plot_reliability(ax, r["bins"], title)
    for ax in axes.flat[len(results) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)
    fig.tight_layout(rect=(0, 0.3 / fig.get_figheight(), 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
