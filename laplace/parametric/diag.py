"""DiagLaplace: a diagonal posterior precision."""

from __future__ import annotations

import torch

from laplace.parametric.base import ParametricLaplace
from laplace.parametric.precision import DiagPrecision
from laplace.utils.logdet import affine_log_sum

Tensor = torch.Tensor


class DiagLaplace(ParametricLaplace):
    """Laplace approximation with the diagonal of the curvature, ``P = factor *
    diag(H) + diag(p0)``; see ``ParametricLaplace``."""

    key = ("all", "diag")
    supports_output_noise = True

    def _init_H(self) -> Tensor:
        return torch.zeros(
            self.n_params, dtype=self._curvature_dtype, device=self._device
        )

    def _curvature_of(self, backend, x, y, N):
        return backend.diag(x, y)

    def _add_curvature(self, H, H_batch):
        return H.add_(H_batch)

    def _build_form(self) -> DiagPrecision:
        p = self._scaled_H() + self.prior_precision_diag
        return DiagPrecision(p, [p_.shape for p_ in self.params])

    @property
    def log_det_posterior_precision(self) -> Tensor:
        """``log det P``; for a scalar or layer-wise prior one fused pass per layer
        (``laplace.utils.logdet.affine_log_sum``)."""
        prior = self.prior_precision
        if prior.numel() not in (1, self.n_layers) or prior.numel() == self.n_params:
            return super().log_det_posterior_precision
        self._ensure_H("log_det_posterior_precision")
        if self._per_output:  # differentiable in each sigma_c through H: the form's
            return super().log_det_posterior_precision
        c = self._h_factor
        if prior.numel() == 1:
            return affine_log_sum(c, prior[0], self.H)
        pieces = self.H.split([p.numel() for p in self.params])
        return sum(affine_log_sum(c, d, h) for d, h in zip(prior, pieces))

    @property
    def posterior_precision(self) -> Tensor:
        """Diagonal ``p`` of ``P`` ``(n_params,)``."""
        return self._posterior.p

    @property
    def posterior_scale(self) -> Tensor:
        """``p^-1/2`` ``(n_params,)``, in the model's dtype."""
        return self.posterior_precision.rsqrt().to(self._dtype)

    @property
    def posterior_variance(self) -> Tensor:
        """``p^-1`` ``(n_params,)``, in the model's dtype."""
        return (1 / self.posterior_precision).to(self._dtype)
