"""The curvature layer on a small trained classifier.

Trains an MLP on a synthetic 3-class problem, then computes the GGN of the summed
cross-entropy with every structure of the default backend (Curvlinops) and prints
what each approximation keeps of the exact curvature: its size, the time it took,
its trace and log-determinant (with a unit prior added, as a Laplace posterior
would), and how far it is from the dense matrix. It saves the three matrices side by
side (magnitudes on a log scale) to a PNG file whose path it prints.

Run with ``python examples/curvature_example.py`` (``--out PATH`` for the figure).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

from laplace.curvature import CurvlinopsGGN, support_table

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _common, run any way
from _common import add_common_arguments, torch_threads  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "output" / "curvature_example.png"


def make_data(n: int = 600, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    y = torch.randint(0, 3, (n,), generator=g)
    x = centers[y] + 0.8 * torch.randn(n, 2, generator=g)
    return x, y


def train(model, x, y, epochs: int = 200):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def save_matrices(results: dict, out: Path) -> None:
    """The three curvature matrices side by side, ``log10 |H_ij|``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4))
    floor = results["full"][0].abs().max().item() * 1e-6
    for ax, (structure, (dense, _, _)) in zip(axes, results.items()):
        image = ax.imshow(dense.abs().clamp(min=floor).log10(), cmap="viridis")
        ax.set_title(f"{structure}: log10 |H|")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=axes, shrink=0.8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, DEFAULT_OUT)
    args = parser.parse_args(argv)
    with torch_threads(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    x, y = make_data(seed=args.seed)
    model = train(nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 3)), x, y)
    accuracy = (model(x).argmax(-1) == y).float().mean().item()
    P = sum(p.numel() for p in model.parameters())
    print(f"MLP 2-32-3 with {P} parameters, training accuracy {accuracy:.3f}")
    print(f"data: {len(x)} points in batches of 100\n")

    backend = CurvlinopsGGN(model, "classification")
    batches = list(zip(x.split(100), y.split(100)))
    results = {}
    for structure in ("full", "kron", "diag"):
        # one untimed call first: the backend's library is imported on first use
        first = (*batches[0], len(y)) if structure == "kron" else batches[0]
        getattr(backend, structure)(*first)
        start = time.perf_counter()
        total, H = 0.0, None
        for xb, yb in batches:
            if structure == "kron":
                loss, Hb = backend.kron(xb, yb, N=len(x))
            else:
                loss, Hb = getattr(backend, structure)(xb, yb)
            total, H = total + loss.item(), Hb if H is None else H + Hb
        seconds = time.perf_counter() - start
        dense = {"full": lambda H: H, "kron": lambda H: H.to_matrix()}.get(
            structure, torch.diag
        )(H)
        results[structure] = (dense, seconds, total)

    exact = results["full"][0]
    eye = torch.eye(P)
    print(
        f"{'structure':<10}{'time (ms)':>10}{'trace':>10}{'logdet(H+I)':>13}"
        f"{'rel. error':>12}"
    )
    for structure, (dense, seconds, _) in results.items():
        logdet = torch.logdet(dense + eye).item()
        error = ((dense - exact).norm() / exact.norm()).item()
        print(
            f"{structure:<10}{1000 * seconds:>10.1f}{dense.trace().item():>10.2f}"
            f"{logdet:>13.2f}{error:>12.3f}"
        )
    print(f"\nsummed cross-entropy on the training data: {results['full'][2]:.2f}")
    print(
        "(diag keeps the exact diagonal, so its trace is exact; KFAC keeps the "
        "per-layer blocks up to the Kronecker approximation)\n"
    )

    print("What each backend offers (full / kron / diag / dict inputs):")
    for name, row in support_table().items():
        marks = "  ".join("yes" if v else " - " for v in row.values())
        print(f"  {name:<18}{marks}")
    save_matrices(results, args.out)
    print(f"\nfigure written to {args.out}")
    return results


if __name__ == "__main__":
    main()
