"""Small dense linear-algebra helpers of the public API (laplace-torch's
``laplace.utils``): Kronecker and block-diagonal products, a shifted diagonal, a
clamped symmetric eigendecomposition and the square root of a covariance given by
its precision."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Tensor = torch.Tensor

__all__ = ["block_diag", "diagonal_add_scalar", "invsqrt_precision", "kron", "symeig"]


def kron(t1: Tensor, t2: Tensor) -> Tensor:
    r"""Kronecker product ``t1 (m, n) ⊗ t2 (p, q)``, shape ``(m p, n q)``:
    $(A \otimes B)_{(i p + k), (j q + l)} = A_{ij} B_{kl}$.

    Raises
    ------
    ValueError
        unless both are matrices.
    """
    if t1.ndim != 2 or t2.ndim != 2:
        raise ValueError(
            f"kron takes two matrices; got shapes {tuple(t1.shape)} and "
            f"{tuple(t2.shape)}."
        )
    return torch.kron(t1, t2)


def block_diag(blocks: Sequence[Tensor]) -> Tensor:
    """The block-diagonal matrix ``(sum m_i, sum n_i)`` of matrices ``(m_i, n_i)``.

    Raises
    ------
    ValueError
        for no blocks.
    """
    if len(blocks) == 0:
        raise ValueError("block_diag needs at least one block; got none.")
    return torch.block_diag(*blocks)


def diagonal_add_scalar(X: Tensor, value: Tensor | float) -> Tensor:
    """``X + value I`` (out of place) for ``X`` of shape ``(..., m, n)``; ``value``
    is a scalar or a vector ``(min(m, n),)`` of the diagonal. The result keeps the
    dtype of ``X``; gradients flow to ``X`` and ``value``."""
    out = X.clone()
    diagonal = out.diagonal(dim1=-2, dim2=-1)
    diagonal.add_(torch.as_tensor(value, dtype=X.dtype, device=X.device))
    return out


def symeig(M: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues ``(..., n)`` (ascending, negative ones clamped to 0) and
    eigenvectors ``(..., n, n)`` of a positive semi-definite ``M`` ``(..., n, n)``.

    As in laplace-torch, ``M``'s upper triangle is read (``UPLO='U'``); round-off
    below zero is clamped, so the factorisation suits curvature matrices.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(M, UPLO="U")
    return eigenvalues.clamp(min=0.0), eigenvectors


def invsqrt_precision(M: Tensor) -> Tensor:
    """The lower Cholesky factor ``L`` of the covariance ``M^{-1}`` of a precision
    ``M`` ``(..., n, n)``: ``L L^T = M^{-1}``.

    Raises
    ------
    torch.linalg.LinAlgError
        when ``M`` is not positive definite.
    """
    covariance = torch.cholesky_inverse(torch.linalg.cholesky(M))
    return torch.linalg.cholesky(covariance)
