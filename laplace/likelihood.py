"""One small object per likelihood.

Each object knows the summed training loss, its gradient and the curvature of the
loss with respect to the network output, so that no other module needs an
``if likelihood == ...`` chain. Conventions (DESIGN.md section 3):

- regression: ``loss = 0.5 * sum((f - y)^2)``; the output Hessian is the identity;
- classification: ``loss = sum(cross_entropy(f, y))``; the output Hessian is
  ``diag(p) - p p^T`` with ``p = softmax(f)``.

The posterior precision later scales these curvatures by
``1 / (sigma_noise^2 * temperature)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from laplace.utils.enums import Likelihood, parse_enum


@dataclass(frozen=True)
class OutputLikelihood:
    """Base class: loss, gradient and output-Hessian factor of one likelihood."""

    name: Likelihood
    #: conversion between the ``torch.nn`` loss (sum-reduced) and the loss above
    factor: float

    def loss_module(self) -> nn.Module:
        raise NotImplementedError

    def check_targets(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Validate ``y`` against outputs ``f`` ``(batch, C)``; return it reshaped."""
        raise NotImplementedError

    def loss(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Summed loss of outputs ``f`` ``(batch, C)`` for targets ``y``."""
        return self.factor * self.loss_module()(f, y)

    def loss_gradient(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Gradient of the summed loss w.r.t. ``f``, shape ``(batch, C)``."""
        raise NotImplementedError

    def hessian_sqrt(self, f: torch.Tensor) -> torch.Tensor:
        """A factor ``L`` ``(batch, C, K)`` with ``L L^T`` the output Hessian."""
        raise NotImplementedError

    def hessian_moments(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The diagonals ``(batch, C)`` of the output Hessians and their sum over the
        batch ``(C, C)``, without a factor (``O(batch C + C^2)`` memory)."""
        raise NotImplementedError

    def sampled_gradients(
        self, f: torch.Tensor, num_samples: int, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Monte-Carlo factor ``(batch, C, S)`` whose outer product estimates the
        output Hessian: loss gradients at ``S`` targets drawn from the model's
        predictive distribution, scaled by ``1/sqrt(S)``."""
        raise NotImplementedError


class RegressionLikelihood(OutputLikelihood):
    def __init__(self) -> None:
        super().__init__(Likelihood.REGRESSION, 0.5)

    def loss_module(self) -> nn.Module:
        return nn.MSELoss(reduction="sum")

    def check_targets(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if y.shape == f.shape:
            return y
        if f.ndim == 2 and f.shape[1] == 1 and y.shape == f.shape[:1]:
            return y.unsqueeze(1)
        raise ValueError(
            f"Regression targets of shape {tuple(y.shape)} do not fit model outputs "
            f"of shape {tuple(f.shape)}; expected targets of shape {tuple(f.shape)}."
        )

    def loss_gradient(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return f - y

    def hessian_sqrt(self, f: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(f.shape[-1], dtype=f.dtype, device=f.device)
        return eye.expand(f.shape[0], -1, -1)

    def hessian_moments(self, f):
        N, C = f.shape
        eye = torch.eye(C, dtype=f.dtype, device=f.device)
        return torch.ones_like(f), N * eye

    def sampled_gradients(self, f, num_samples, generator=None):
        # y ~ N(f, I)  =>  gradient f - y = -eps with eps ~ N(0, I)
        eps = torch.randn(
            (*f.shape, num_samples), dtype=f.dtype, device=f.device, generator=generator
        )
        return -eps / math.sqrt(num_samples)


class ClassificationLikelihood(OutputLikelihood):
    def __init__(self) -> None:
        super().__init__(Likelihood.CLASSIFICATION, 1.0)

    def loss_module(self) -> nn.Module:
        return nn.CrossEntropyLoss(reduction="sum")

    def check_targets(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if f.ndim != 2:
            raise ValueError(
                f"Classification needs outputs of shape (batch, classes); got "
                f"{tuple(f.shape)}."
            )
        if y.shape != f.shape[:1]:
            raise ValueError(
                f"Classification targets must be class indices of shape "
                f"{tuple(f.shape[:1])}; got shape {tuple(y.shape)}."
            )
        if y.is_floating_point() or y.is_complex():
            raise ValueError(
                f"Classification targets must be integer class indices; got dtype "
                f"{y.dtype}."
            )
        return y

    def loss_gradient(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.softmax(f, dim=-1) - F.one_hot(y, f.shape[-1]).to(f.dtype)

    def hessian_sqrt(self, f: torch.Tensor) -> torch.Tensor:
        """A factor ``(batch, C, C - 1)`` of ``diag(p) - p p^T`` (rank ``C - 1``).

        ``L = diag(s) - p s^T`` with ``s = sqrt(p)`` has ``L L^T = diag(p) - p p^T``
        and ``L s = 0``. The Householder reflection ``R`` that swaps the unit vector
        ``s`` and the last basis vector is orthogonal, so ``(L R)(L R)^T = L L^T``,
        and the last column of ``L R`` is ``L s = 0``: dropping it leaves ``C - 1``
        columns, one backpropagated vector fewer per datum.
        """
        p = torch.softmax(f, dim=-1)
        s = p.sqrt()
        L = torch.diag_embed(s) - p.unsqueeze(-1) * s.unsqueeze(-2)
        C = f.shape[-1]
        if C == 1:
            return L
        u = s.clone()
        u[..., -1] -= 1
        norm2 = u.square().sum(-1, keepdim=True)
        # s = e_C already (u = 0): the reflection is the identity
        scale = torch.where(norm2 > 1e-30, 2 / norm2.clamp_min(1e-30), 0.0)
        Lu = (L @ u.unsqueeze(-1)).squeeze(-1)  # (batch, C)
        LR = L - (scale * Lu).unsqueeze(-1) * u.unsqueeze(-2)
        return LR[..., : C - 1]

    def hessian_moments(self, f):
        # sum_n diag(p_n) - p_n p_n^T
        p = torch.softmax(f, dim=-1)
        return p - p.square(), torch.diag(p.sum(0)) - p.T @ p

    def sampled_gradients(self, f, num_samples, generator=None):
        p = torch.softmax(f, dim=-1)
        y = torch.multinomial(p, num_samples, replacement=True, generator=generator)
        onehot = F.one_hot(y, f.shape[-1]).to(f.dtype)  # (batch, S, C)
        return (p.unsqueeze(1) - onehot).transpose(1, 2) / math.sqrt(num_samples)


_LIKELIHOODS = {
    Likelihood.REGRESSION: RegressionLikelihood,
    Likelihood.CLASSIFICATION: ClassificationLikelihood,
    # reward modeling is fit with the classification likelihood on pairs
    Likelihood.REWARD_MODELING: ClassificationLikelihood,
}


def get_likelihood(likelihood: Likelihood | str) -> OutputLikelihood:
    """Return the likelihood object for the curvature of ``likelihood``."""
    return _LIKELIHOODS[parse_enum(Likelihood, likelihood, "likelihood")]()
