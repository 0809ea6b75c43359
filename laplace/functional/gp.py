r"""The linear algebra of the GP posterior, in its symmetric form.

On the subset of ``M`` data the kernel is ``K = G / p0`` with ``G = J J^T``
(``M C x M C``, or ``C`` blocks ``M x M`` for independent outputs) and the likelihood
precision is ``L = l D``: ``D`` the diagonal of the output Hessians (ones for
regression), ``l`` the likelihood scale. Every posterior quantity needs
``(K + L^-1)^-1``; with ``L^1/2`` it is ``L^1/2 B^-1 L^1/2`` where

$$
    B = I + L^{1/2} K L^{1/2} = I + c S, \qquad S = D^{1/2} G D^{1/2},
    \qquad c = l / p_0 .
$$

``B`` has eigenvalues ``>= 1``: its Cholesky factor exists and is well conditioned,
and ``D`` is never inverted (it vanishes for confident classifications). ``S`` does
not depend on the hyperparameters, so one eigendecomposition of ``S`` gives
``log det B = sum log(1 + c s_i)`` and ``B^-1`` for every ``c`` (prior tuning).
"""

from __future__ import annotations

import torch

from laplace.utils.matrix import linalg_dtype

Tensor = torch.Tensor


class KernelSystem:
    """``B(c) = I + c S`` for a fixed positive semi-definite ``S`` ``(n, n)`` or a
    stack of them ``(C, n, n)``, with its factorizations cached.

    The Cholesky factor is kept for the last ``c`` it was needed for; the spectrum
    of ``S``, once computed, serves every ``c``. A 16-bit ``S`` is held and factored
    in float32 (``laplace.utils.matrix.linalg_dtype``); results come back in the
    dtype of what is whitened (``logdet``: of ``S``).
    """

    def __init__(self, S: Tensor) -> None:
        self.dtype = S.dtype
        self.S = S.to(linalg_dtype(S.dtype))
        self._cholesky: tuple[float, Tensor] | None = None
        self._eigenvalues: Tensor | None = None
        self._eigenvectors: Tensor | None = None

    def spectrum(self, vectors: bool = False) -> tuple[Tensor, Tensor | None]:
        """Eigenvalues of ``S`` (clamped at 0) and, with ``vectors``, eigenvectors."""
        if vectors and self._eigenvectors is None:
            values, self._eigenvectors = torch.linalg.eigh(self.S)
            self._eigenvalues = values.clamp_min(0)
            self._cholesky = None  # the spectrum now serves every c
        elif self._eigenvalues is None:
            self._eigenvalues = torch.linalg.eigvalsh(self.S).clamp_min(0)
        return self._eigenvalues, self._eigenvectors

    def logdet(self, c: Tensor) -> Tensor:
        """``log det B(c)``, summed over a stack; differentiable in ``c``.

        From the spectrum when it is known or ``c`` is differentiated (each further
        value then costs ``O(n)``), else from the Cholesky factor.
        """
        if self._eigenvalues is not None or c.requires_grad:
            values, _ = self.spectrum()
            return torch.log1p(c * values).sum().to(self.dtype)
        R = self.cholesky(c)
        return (2 * R.diagonal(dim1=-2, dim2=-1).log().sum()).to(self.dtype)

    def cholesky(self, c: Tensor) -> Tensor:
        """Lower Cholesky factor of ``B(c)`` (cached for the last value of ``c``)."""
        value = float(c)
        if self._cholesky is None or self._cholesky[0] != value:
            self._cholesky = None  # release the previous factor first
            self._cholesky = (value, _cholesky(self.S, value))
        return self._cholesky[1]

    def whiten(self, c: Tensor, Z: Tensor) -> Tensor:
        """``W`` with ``W^T W = Z^T B(c)^-1 Z``, for ``Z`` ``(..., n, k)``."""
        if self._eigenvectors is not None:
            return self.scale_rotated(c, self.rotate(Z))
        if c.requires_grad:  # a fresh, differentiable factor
            R = torch.linalg.cholesky(_shifted(self.S, c))
        else:
            R = self.cholesky(c)
        W = torch.linalg.solve_triangular(R, Z.to(self.S.dtype), upper=False)
        return W.to(Z.dtype)

    def rotate(self, Z: Tensor) -> Tensor:
        """``U^T Z`` in the eigenbasis of ``S`` (computed once, reused for any c)."""
        _, vectors = self.spectrum(vectors=True)
        return (vectors.mT @ Z.to(vectors.dtype)).to(Z.dtype)

    def scale_rotated(self, c: Tensor, Z_rotated: Tensor) -> Tensor:
        """``whiten`` of a rotated ``Z``: ``diag(1 + c s)^-1/2 U^T Z``."""
        values = self._eigenvalues
        scale = torch.rsqrt(1 + c * values)[..., None]
        return (Z_rotated.to(scale.dtype) * scale).to(Z_rotated.dtype)


def _shifted(S: Tensor, c: Tensor) -> Tensor:
    B = c.to(S.dtype) * S
    return B + torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)


def _cholesky(S: Tensor, c: float) -> Tensor:
    B = S * c
    B.diagonal(dim1=-2, dim2=-1).add_(1)
    R, info = torch.linalg.cholesky_ex(B)
    del B
    if bool((info != 0).any()):
        raise RuntimeError(
            "The Cholesky factorization of I + L^1/2 K L^1/2 failed: the kernel of "
            "the subset is not positive semi-definite in this precision (NaN/inf in "
            "the Jacobians, or float16). Use float32/float64 or a larger prior "
            "precision."
        )
    return R
