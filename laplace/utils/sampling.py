"""Reparameterised samples of Gaussians (laplace-torch's ``normal_samples`` and
``draw_gaussian``). The factor ``L`` with ``L L^T = Σ`` is the one of the Monte-Carlo
link (``laplace.predictive.links``): Cholesky, with jitter and an ``eigh`` fallback
for singular covariances."""

from __future__ import annotations

import torch

from laplace.predictive.links import _check_gaussian, _psd_sqrt
from laplace.utils._checks import _check_int

Tensor = torch.Tensor

__all__ = ["draw_gaussian", "normal_samples"]


def normal_samples(
    mean: Tensor,
    var: Tensor,
    n_samples: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Samples of ``N(mean_b, var_b)`` for every row ``b`` of a batch.

    $$
        f^{(s)}_b = \mu_b + L_b\,\varepsilon^{(s)}, \qquad
        \varepsilon^{(s)} \sim \mathcal N(0, I_C), \qquad L_b L_b^\top = \Sigma_b,
    $$

    with ``L_b = diag(sqrt(var_b))`` for a diagonal ``var``. As in laplace-torch,
    one standard-normal draw ``ε^{(s)}`` (drawn as a ``(C, n_samples)`` tensor)
    serves every row of the batch: each row's samples have the right marginal
    distribution, and a seeded ``generator`` reproduces laplace-torch's numbers.

    Parameters
    ----------
    mean : torch.Tensor, shape (B, C)
    var : torch.Tensor, shape (B, C) or (B, C, C)
        variances, or covariances (positive semi-definite).
    n_samples : int
    generator : torch.Generator, optional
        on the device of ``mean``.

    Returns
    -------
    samples : torch.Tensor, shape (n_samples, B, C)
    """
    _check_gaussian(mean, var)
    n_samples = _check_int(n_samples, "n_samples", 0)
    eps = torch.randn(
        (mean.shape[1], n_samples),
        generator=generator,
        dtype=mean.dtype,
        device=mean.device,
    ).T
    if var.ndim == 2:
        return mean + var.clamp_min(0.0).sqrt() * eps[:, None, :]
    return mean + torch.einsum("bij,sj->sbi", _psd_sqrt(var), eps)


def draw_gaussian(
    mean: Tensor,
    covariance: Tensor,
    n_samples: int,
    generator: torch.Generator | None,
) -> Tensor:
    r"""Samples ``mean + L ε`` of ``N(mean, covariance)``, ``L L^T = covariance``,
    ``ε ~ N(0, I)`` drawn independently for every sample and batch entry.

    Parameters
    ----------
    mean : torch.Tensor, shape (..., d)
    covariance : torch.Tensor, shape (..., d, d)
        positive semi-definite.
    n_samples : int
    generator : torch.Generator or None
        on the device of ``mean``.

    Returns
    -------
    samples : torch.Tensor, shape (n_samples, ..., d)
    """
    d = mean.shape[-1] if mean.ndim else 0
    if mean.ndim == 0 or tuple(covariance.shape) != (*mean.shape, d):
        raise ValueError(
            "covariance must have shape (..., d, d) for a mean of shape (..., d); "
            f"got mean {tuple(mean.shape)} and covariance {tuple(covariance.shape)}."
        )
    n_samples = _check_int(n_samples, "n_samples", 0)
    eps = torch.randn(
        (n_samples, *mean.shape),
        generator=generator,
        dtype=mean.dtype,
        device=mean.device,
    )
    L = _psd_sqrt(covariance.reshape(-1, d, d)).reshape(covariance.shape)
    return mean + torch.einsum("...ij,s...j->s...i", L, eps)
