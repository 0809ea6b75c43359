"""Small models and data shared by the tests (float64 unless asked otherwise)."""

from __future__ import annotations

import torch
from torch import nn

from laplace.likelihood import OutputLikelihood


def mlp(n_in=3, n_hidden=5, n_out=4, frozen=True) -> nn.Module:
    model = nn.Sequential(
        nn.Linear(n_in, n_hidden),
        nn.Tanh(),
        nn.Linear(n_hidden, n_hidden),
        nn.Tanh(),
        nn.Linear(n_hidden, n_out),
    )
    if frozen:  # a frozen parameter must be skipped everywhere
        model[2].bias.requires_grad_(False)
    return model


def cnn(n_out=3) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 2, 2, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, n_out),
    )


class DictModel(nn.Module):
    """A model that takes a mapping batch, as Hugging Face models do."""

    def __init__(self, n_in=3, n_out=4) -> None:
        super().__init__()
        self.net = mlp(n_in, 5, n_out, frozen=False)

    def forward(self, batch):
        return self.net(batch["input_ids"] * batch["scale"])


def data(
    kind: str,
    likelihood: str,
    n: int = 6,
    n_out: int = 4,
    dtype=torch.float64,
    device="cpu",
):
    """Drawn on the CPU (the same numbers on every device), moved to ``device``."""
    g = torch.Generator().manual_seed(1)
    x = (
        torch.randn(n, 2, 6, 6, generator=g)
        if kind == "cnn"
        else torch.randn(n, 3, generator=g)
    )
    x = x.to(dtype)
    if likelihood == "classification":
        y = torch.randint(0, n_out, (n,), generator=g)
    else:
        y = torch.randn(n, n_out, generator=g).to(dtype)
    return x.to(device), y.to(device)


def model(kind: str, n_out: int = 4, dtype=torch.float64, device="cpu") -> nn.Module:
    torch.manual_seed(0)
    m = cnn(n_out) if kind == "cnn" else mlp(n_out=n_out)
    return m.to(device, dtype)


class NaturalHead(nn.Module):
    """``(a, b) -> (a, -softplus(b) - 0.1)``: natural parameters with ``eta2 < 0``."""

    def forward(self, f):
        C = f.shape[1] // 2
        return torch.cat([f[:, :C], -nn.functional.softplus(f[:, C:]) - 0.1], 1)


class SoftplusPoisson(OutputLikelihood):
    """A likelihood of one's own: counts ``y ~ Poisson(softplus(f))``, of which only
    the Fisher ``diag(sigmoid(f)^2 / softplus(f))`` is given (``hessian``: the
    library derives its square-root factor)."""

    name = "softplus_poisson"

    def loss(self, f, y):
        rate = nn.functional.softplus(f)
        return (rate - y * rate.log() + torch.lgamma(y + 1)).sum()

    def hessian(self, f):
        return torch.diag_embed(torch.sigmoid(f) ** 2 / nn.functional.softplus(f))
