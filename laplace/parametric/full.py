"""FullLaplace: a dense ``(P, P)`` posterior precision."""

from __future__ import annotations

import torch

from laplace.parametric.base import ParametricLaplace
from laplace.parametric.precision import DensePrecision, not_positive_definite
from laplace.utils.logdet import affine_log_sum

Tensor = torch.Tensor


def symmetric_eigenvalues(H: Tensor) -> Tensor | None:
    """Eigenvalues ``(P,)`` of the symmetric ``H``, ascending, in float64 (whatever
    ``H``'s dtype); None where the solver does not converge.

    Float64 because the evidence sums ``log(factor * lambda_i + p0)`` over all of
    them: the curvature of an over-parameterised network has many eigenvalues near
    0, and a float32 solver returns them with errors of ``eps * max|lambda|`` (1e-3
    for a GGN of norm 1e4), of the order of small prior precisions.
    """
    try:
        return torch.linalg.eigvalsh(H.to(torch.float64))
    except torch.linalg.LinAlgError:
        return None


class FullLaplace(ParametricLaplace):
    """Laplace approximation with a dense curvature ``H`` ``(P, P)`` (e.g. the GGN),
    so ``P = factor * H + diag(p0)``; see ``ParametricLaplace``.

    With a scalar prior precision the log determinant comes from the eigenvalues of
    ``H``, computed once per fit: ``log det P = sum_i log(factor * lambda_i + p0)``,
    so each step of tuning the prior (or the noise) costs ``O(P)``.
    """

    key = ("all", "full")
    supports_output_noise = True

    def _init_H(self) -> Tensor:
        return torch.zeros(
            self.n_params,
            self.n_params,
            dtype=self._curvature_dtype,
            device=self._device,
        )

    def _curvature_of(self, backend, x, y, N):
        return backend.full(x, y)

    def _add_curvature(self, H, H_batch):
        return H.add_(H_batch)

    def _on_new_curvature(self) -> None:
        super()._on_new_curvature()
        #: eigenvalues of ``H`` in float64 (``symmetric_eigenvalues``), once per fit;
        #: None where the solver failed
        self._H_eigenvalues: Tensor | None = None
        self._H_spectrum_tried = False

    def _build_form(self) -> DensePrecision:
        P = self._scaled_H() + torch.diag(self.prior_precision_diag)
        return DensePrecision(P)

    @property
    def log_det_posterior_precision(self) -> Tensor:
        """``log det P``.

        For a scalar prior ``p0`` (reported or being tuned alike, so that the
        evidence a tuner maximises is the one reported afterwards) it is
        ``sum_i log(factor * lambda_i + p0)`` over the eigenvalues of ``H``, taken as
        they are: negative ones (a Hessian away from a minimum, or round-off) are
        not clamped, and a ``P`` that is not positive definite raises, as the
        Cholesky factor does for the other priors.

        Raises
        ------
        NotPositiveDefiniteError
            if some ``factor * lambda_i + p0 <= 0``.
        """
        # before fit the posterior is the prior: its Cholesky factor (super)
        if self.fitted and self.prior_precision.numel() == 1 and not self._per_output:
            if not self._H_spectrum_tried:
                self._H_eigenvalues = symmetric_eigenvalues(self.H.detach())
                self._H_spectrum_tried = True
            lam = self._H_eigenvalues
            if lam is not None:  # else: no spectrum, use the Cholesky factor
                with torch.no_grad():
                    smallest = self._h_factor * lam[0] + self.prior_precision[0]
                if not smallest > 0:
                    raise not_positive_definite(
                        f"its smallest eigenvalue is {float(smallest):.3g}"
                    )
                logdet = affine_log_sum(self._h_factor, self.prior_precision[0], lam)
                return logdet.to(self._curvature_dtype)
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
