"""FullLaplace: a dense ``(P, P)`` posterior precision."""

from __future__ import annotations

import torch

from laplace.parametric.base import ParametricLaplace
from laplace.parametric.precision import DensePrecision

Tensor = torch.Tensor


def symmetric_eigenvalues(H: Tensor) -> Tensor | bool:
    """Eigenvalues of the symmetric ``H``, in float64 where the solver does not
    converge in ``H``'s dtype (it can fail on the ill-conditioned float32 GGN of a
    few data); False where it does not converge at all."""
    for dtype in dict.fromkeys((H.dtype, torch.float64)):
        try:
            return torch.linalg.eigvalsh(H.to(dtype)).to(H.dtype)
        except torch.linalg.LinAlgError:
            continue
    return False


class FullLaplace(ParametricLaplace):
    """Laplace approximation with a dense curvature ``H`` ``(P, P)`` (e.g. the GGN),
    so ``P = factor * H + diag(p0)``; see ``ParametricLaplace``.

    For tuning a scalar prior precision (or the noise with a scalar prior), the log
    determinant comes from the eigenvalues of ``H``, computed once per fit:
    ``log det P = sum_i log(factor * lambda_i + p0)``, so each step costs ``O(P)``.
    """

    key = ("all", "full")

    def _init_H(self) -> Tensor:
        return torch.zeros(
            self.n_params, self.n_params, dtype=self._dtype, device=self._device
        )

    def _curvature_batch(self, x, y, N):
        return self.backend.full(x, y)

    def _add_curvature(self, H, H_batch):
        return H.add_(H_batch)

    def _on_new_curvature(self) -> None:
        super()._on_new_curvature()
        self._H_eigenvalues: Tensor | bool | None = None

    def _build_form(self) -> DensePrecision:
        P = self._h_factor * self.H + torch.diag(self.prior_precision_diag)
        return DensePrecision(P)

    @property
    def log_det_posterior_precision(self) -> Tensor:
        """``log det P``."""
        iterating = self.prior_precision.requires_grad or self.sigma_noise.requires_grad
        if iterating and self.prior_precision.numel() == 1:
            self._check_fitted("log_det_posterior_precision")
            if self._H_eigenvalues is None:
                self._H_eigenvalues = symmetric_eigenvalues(self.H.detach())
            if self._H_eigenvalues is not False:  # else: no spectrum, use Cholesky
                lam = self._H_eigenvalues.clamp(min=0)
                return torch.log(self._h_factor * lam + self.prior_precision).sum()
        return super().log_det_posterior_precision

    @property
    def posterior_precision(self) -> Tensor:
        """``P`` ``(n_params, n_params)``."""
        return self._posterior.to_matrix()

    @property
    def posterior_covariance(self) -> Tensor:
        """``P^-1`` ``(n_params, n_params)``."""
        return self._posterior.covariance()

    @property
    def posterior_scale(self) -> Tensor:
        """Lower-triangular ``S`` with ``S S^T = P^-1`` ``(n_params, n_params)``."""
        return torch.linalg.cholesky(self.posterior_covariance)
