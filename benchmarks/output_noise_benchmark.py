"""What one noise per output costs: time and peak memory of regression with
``sigma_noise`` a scalar against ``sigma_noise`` of shape ``(C,)``, this library only
(laplace-torch takes a scalar noise only, so there is no peer to run).

Regression with ``C`` outputs on ``N`` random inputs in batches of 256 through the
MLP ``16-32-32-C`` (fixed seeds; ``1,600 + 33 C`` weights), for
``hessian_structure`` ``'kron'``, ``'diag'`` and ``'full'``, all weights, the default
backend (NativeGGN, the curvature engine):

- ``fit``: ``Laplace(...)`` and ``.fit(loader)``;
- ``evidence step``: one ``log_marginal_likelihood(prior_precision,
  sigma_noise)`` and its backward in both (what each step of
  ``optimize_prior_precision`` or ``marglik_training`` does), on a fitted Laplace
  that has taken one step before (untimed: what is computed once per fit, such as
  the spectrum of a full ``H``, is not counted), at other noises than the fit's
  and the step's (a per-output Kron re-decomposes its output-side factors for
  each);
- ``predictive``: ``la(x)`` on 500 inputs (glm), on a fitted Laplace.

With a ``(C,)`` noise the curvature is that of each output alone, fitted one output
at a time (``C`` backend passes) and kept per output: ``C`` curvatures for full and
diag, the output-side factors only for Kron (the input-side ones are shared). Each
measurement runs in a fresh process (``_measure.py``).

    python benchmarks/output_noise_benchmark.py           # N = 4,000, C = 1, 4, 16
    python benchmarks/output_noise_benchmark.py --quick   # a smoke run
    python benchmarks/output_noise_benchmark.py --only kron   # one structure

The table is printed and written to ``benchmarks/output/output_noise.md`` (or
``--output``).
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))

import torch  # noqa: E402
from _measure import Timed, measure_in_subprocess, worker_main  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

STRUCTURES = ("kron", "diag", "full")
NOISES = ("scalar", "per-output")
QUICK = "--quick" in sys.argv
N_DATA = 500 if QUICK else 4000
OUTPUTS = (3,) if QUICK else (1, 4, 16)
PHASES = ("fit", "evidence step", "predictive")


def problem(C: int):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, C)
    )
    X = torch.randn(N_DATA, 16)
    y = model(X).detach() + 0.3 * torch.randn(N_DATA, C)
    loader = DataLoader(TensorDataset(X, y), batch_size=256)
    return model, loader, X[:500]


def noise(kind: str, C: int, scale: float = 0.3) -> torch.Tensor | float:
    if kind == "scalar":
        return scale
    return scale * torch.linspace(0.5, 1.5, C)


def fitted(structure: str, kind: str, C: int):
    from laplace import Laplace

    model, loader, x = problem(C)
    la = Laplace(model, "regression", "all", structure, sigma_noise=noise(kind, C))
    la.fit(loader)
    return la, loader, x


def workload(structure: str, kind: str, C: int, phase: str):
    def setup() -> Timed:
        from laplace import Laplace

        model, loader, x = problem(C)
        state: dict = {}

        if phase == "fit":

            def run() -> None:
                la = Laplace(
                    model, "regression", "all", structure, sigma_noise=noise(kind, C)
                )
                la.fit(loader)
                state["la"] = la

            return Timed(run, summary=lambda: f"P={state['la'].n_params}")

        def step(prior: float, scale: float) -> None:
            prior = torch.tensor(prior, requires_grad=True)
            sigma = torch.as_tensor(noise(kind, C, scale)).clone()
            sigma.requires_grad_(True)
            lml = state["la"].log_marginal_likelihood(prior, sigma)
            lml.backward()
            state["value"] = float(lml)

        def prepare() -> None:
            state["la"] = fitted(structure, kind, C)[0]
            if phase == "evidence step":
                step(0.9, 0.35)

        if phase == "evidence step":

            def run() -> None:
                step(1.3, 0.4)

            return Timed(
                run, before_each=prepare, summary=lambda: f"{state['value']:.4g}"
            )

        def run() -> None:
            state["pred"] = state["la"](x)

        return Timed(run, before_each=prepare)

    return setup


WORKLOADS = {
    f"{structure}|{kind}|C={C}|{phase}": workload(structure, kind, C, phase)
    for structure in STRUCTURES
    for kind in NOISES
    for C in OUTPUTS
    for phase in PHASES
}


def fmt(m) -> str:
    if m.seconds is None:
        return f"failed: {m.error}"
    return f"{m.seconds * 1e3:.1f} ms / {m.peak_mb:.0f} MB"


def main() -> None:
    output = os.path.join(HERE, "output", "output_noise.md")
    if "--output" in sys.argv:
        output = sys.argv[sys.argv.index("--output") + 1]
    extra = ["--quick"] if QUICK else []
    repeats = ["--repeats", "2" if QUICK else "5"]
    from laplace_benchmark import checkout

    command = "python benchmarks/output_noise_benchmark.py" + (
        " --quick" if QUICK else ""
    )
    lines = [
        "## One noise per output against a scalar noise (ours alone)",
        "",
        f"Command: `{command}`, at commit {checkout()}.",
        "",
        f"Regression, MLP 16-32-32-C, N = {N_DATA} in batches of 256, NativeGGN, "
        "float32; time (best of 5 runs, each in a fresh process) / peak resident "
        "memory added, for `sigma_noise` a scalar and of shape `(C,)` (with `C = 1` "
        "that is a scalar); the ratio is per-output / scalar. laplace-torch takes a "
        "scalar noise only. Fit: the curvature of each output alone, one backend "
        "pass per output. Evidence step: `log_marginal_likelihood(prior, sigma)` "
        "and its backward on a Laplace that took one step before (the spectrum of a "
        "scalar-noise curvature is then cached; one noise per output needs a new "
        "factorization per noise: the output-side factors for Kron, the Cholesky "
        "factor of `P` for full). Predictive: glm on 500 inputs. With `C = 1` both "
        "columns run the same code: their ratios show the noise of these "
        "millisecond timings.",
        "",
        "| structure | C | phase | scalar noise | per-output noise | time ratio |",
        "|---|---|---|---|---|---|",
    ]
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
    for structure in STRUCTURES:
        if only is not None and structure != only:
            continue
        for C in OUTPUTS:
            for phase in PHASES:
                m = {
                    kind: measure_in_subprocess(
                        __file__,
                        f"{structure}|{kind}|C={C}|{phase}",
                        extra + repeats,
                        timeout=600,
                    )
                    for kind in NOISES
                }
                s, p = m["scalar"], m["per-output"]
                ratio = (
                    f"{p.seconds / s.seconds:.1f}x"
                    if s.seconds and p.seconds is not None
                    else "-"
                )
                row = f"| {structure} | {C} | {phase} | {fmt(s)} | {fmt(p)} | {ratio} |"
                print(row, flush=True)
                lines.append(row)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker_main(WORKLOADS)
    else:
        main()
