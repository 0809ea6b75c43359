"""Posterior precisions ``P = factor * H + diag(p0)`` behind one small interface.

``ParametricLaplace`` never asks which structure it holds: every form below
offers the same operations, each stated with its shapes, so that sampling, the
functional variance, ``log_prob`` and the log-determinants are written once.

=====================  ==============================================================
``logdet()``           ``log det P`` (0-dim)
``square_form(d)``     ``d^T P d`` for ``d`` ``(P,)`` or ``(n, P)`` -> ``()``/``(n,)``
``inv_square_form(J)`` ``J P^-1 J^T`` for ``J`` ``(N, C, P)`` -> ``(N, C, C)``
``inv_diag()``         ``diag(P^-1)`` ``(P,)``
``sample(n, gen)``     ``n`` draws of ``N(0, P^-1)``, ``(n, P)``
``to_matrix()``        dense ``P`` ``(P, P)``: for tests and small models
=====================  ==============================================================

Forms that are block diagonal over the parameter tensors with a Kronecker eigenbasis
per block (Kron and Diag) also give ``eigenbases()`` and ``inverse_eigenvalues()``, so
that ``J P^-1 J^T`` can be formed layer by layer from the backpropagated factors of
the Jacobian (``laplace.predictive.glm``) instead of from the Jacobian itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from laplace.utils.lowrank import LowRankPlusDiagonal
from laplace.utils.lowrank_factor import is_low_rank
from laplace.utils.matrix import KronDecomposed, linalg_dtype

Tensor = torch.Tensor
#: per parameter tensor: ``(Q_out, Q_in)`` for a matrix block, ``(Q,)`` otherwise;
#: ``None`` stands for the identity
Basis = tuple[Tensor | None, ...]


class NotPositiveDefiniteError(torch.linalg.LinAlgError):
    """The posterior precision is not positive definite.

    A ``torch.linalg.LinAlgError`` (so a ``RuntimeError``), as the failed Cholesky
    factorization laplace-torch lets through: ``except`` clauses written for it
    catch this too."""


def not_positive_definite(what: str) -> NotPositiveDefiniteError:
    return NotPositiveDefiniteError(
        f"The posterior precision is not positive definite ({what}). The curvature "
        "has negative eigenvalues (e.g. the exact Hessian away from a minimum) or the "
        "prior precision is too small: use a GGN/EF backend or a larger prior "
        "precision."
    )


class PrecisionForm:
    """Base of the forms; see the module docstring for the operations."""

    def logdet(self) -> Tensor:
        raise NotImplementedError

    def square_form(self, delta: Tensor) -> Tensor:
        raise NotImplementedError

    def inv_square_form(self, J: Tensor) -> Tensor:
        raise NotImplementedError

    def inv_diag(self) -> Tensor:
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def to_matrix(self) -> Tensor:
        raise NotImplementedError

    def eigenbases(self) -> list[Basis] | None:
        """Per-parameter eigenbases, or ``None`` if the form has none."""
        return None

    def inverse_eigenvalues(self) -> list[Tensor]:
        raise NotImplementedError


class DensePrecision(PrecisionForm):
    """A dense ``(P, P)`` precision, used through its Cholesky factor ``L``.

    A float16/bfloat16 ``P`` is factorised in float32 (``linalg_dtype``: half
    precision has no Cholesky on the CPU); results come back in ``P``'s dtype."""

    def __init__(self, P: Tensor) -> None:
        self.P = P
        self._work = linalg_dtype(P.dtype)
        self._chol: Tensor | None = None
        self._cov: Tensor | None = None

    @property
    def cholesky(self) -> Tensor:
        """Lower ``L`` with ``L L^T = P`` (computed once)."""
        if self._chol is None:
            L, info = torch.linalg.cholesky_ex(self.P.to(self._work))
            if int(info) != 0:
                raise not_positive_definite(f"Cholesky failed at column {int(info)}")
            self._chol = L
        return self._chol

    def logdet(self) -> Tensor:
        return (2 * self.cholesky.diagonal().log().sum()).to(self.P.dtype)

    def square_form(self, delta: Tensor) -> Tensor:
        return ((delta @ self.P) * delta).sum(-1)

    def inv_square_form(self, J: Tensor) -> Tensor:
        N, C, P = J.shape
        # W = L^-1 J^T, so that J P^-1 J^T = W^T W
        W = torch.linalg.solve_triangular(
            self.cholesky, J.reshape(N * C, P).T.to(self._work), upper=False
        )
        W = W.T.reshape(N, C, P)
        return (W @ W.mT).to(J.dtype)

    def inv_diag(self) -> Tensor:
        return self.covariance().diagonal()

    def covariance(self) -> Tensor:
        """``P^-1`` ``(P, P)`` (computed once)."""
        if self._cov is None:
            self._cov = torch.cholesky_inverse(self.cholesky).to(self.P.dtype)
        return self._cov

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        L = self.cholesky
        eps = torch.randn(
            L.shape[0], n, dtype=L.dtype, device=L.device, generator=generator
        )
        # x = L^-T eps has covariance L^-T L^-1 = P^-1
        theta = torch.linalg.solve_triangular(L.mT, eps, upper=True).T
        return theta.to(self.P.dtype)

    def to_matrix(self) -> Tensor:
        return self.P


class DiagPrecision(PrecisionForm):
    """A diagonal precision ``p`` ``(P,)``, laid out over parameters of ``shapes``."""

    def __init__(self, p: Tensor, shapes: Sequence[torch.Size]) -> None:
        self.p = p
        self.shapes = list(shapes)

    def logdet(self) -> Tensor:
        return self.p.log().sum()

    def square_form(self, delta: Tensor) -> Tensor:
        return (delta.square() * self.p).sum(-1)

    def inv_square_form(self, J: Tensor) -> Tensor:
        return torch.einsum("ncp,p,ndp->ncd", J, 1 / self.p, J)

    def inv_diag(self) -> Tensor:
        return 1 / self.p

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        p = self.p
        eps = torch.randn(
            n, p.numel(), dtype=p.dtype, device=p.device, generator=generator
        )
        return eps * p.rsqrt()

    def to_matrix(self) -> Tensor:
        return torch.diag(self.p)

    def eigenbases(self) -> list[Basis]:
        return [(None, None) if len(s) >= 2 else (None,) for s in self.shapes]

    def inverse_eigenvalues(self) -> list[Tensor]:
        inv = 1 / self.p
        out, start = [], 0
        for s in self.shapes:
            n = math.prod(s)
            block = inv[start : start + n]
            out.append(block.reshape(s[0], -1) if len(s) >= 2 else block)
            start += n
        return out


class KronPrecision(PrecisionForm):
    """A ``KronDecomposed`` (its deltas hold the prior precision) over parameters of
    ``shapes``, one block per parameter tensor."""

    def __init__(self, K: KronDecomposed, shapes: Sequence[torch.Size]) -> None:
        self.K = K
        self.shapes = list(shapes)

    def logdet(self) -> Tensor:
        return self.K.logdet()

    def square_form(self, delta: Tensor) -> Tensor:
        D = delta.reshape(-1, delta.shape[-1])
        return (self.K.bmm(D, exponent=1) * D).sum(-1).reshape(delta.shape[:-1])

    def inv_square_form(self, J: Tensor) -> Tensor:
        return self.K.inv_square_form(J)

    def inv_diag(self) -> Tensor:
        return self.K.diag(exponent=-1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        ref = self.K.deltas
        P = sum(self.K.block_sizes())
        eps = torch.randn(n, P, dtype=ref.dtype, device=ref.device, generator=generator)
        # the symmetric square root P^-1/2 has P^-1/2 P^-1/2 = P^-1
        return self.K.bmm(eps, exponent=-0.5)

    def to_matrix(self) -> Tensor:
        return self.K.to_matrix()

    def eigenbases(self) -> list[Basis] | None:
        """``(Q_out, Q_in)`` for a parameter of shape ``(out, ...)`` with at least two
        dimensions, ``(Q,)`` for the others (``None``: the identity), or ``None``
        when a block has no eigenbasis of that form: a pair not split as
        ``(out, prod(...))`` or over a vector parameter, a dense single block of a
        matrix parameter, or a low-rank factor, whose complement is never formed
        (see ``_parameter_basis``); the predictive then takes the Jacobian."""
        K = self.K
        bases = [
            _parameter_basis(Qs, values, shape)
            for Qs, values, shape in zip(
                K.eigenvectors, K.eigenvalues, self.shapes, strict=True
            )
        ]
        return None if any(b is None for b in bases) else bases

    def inverse_eigenvalues(self) -> list[Tensor]:
        """``1 / lam`` per parameter in the layout of ``eigenbases``: ``(out, in)``
        or ``(n,)``."""
        out = []
        for i, s in enumerate(self.shapes):
            inv = self.K.block_eigenvalues(i, -1)
            out.append(inv.reshape(s[0], -1) if len(s) >= 2 else inv.reshape(-1))
        return out


class CastForm(PrecisionForm):
    """A form held in a wider dtype ``work`` (float32 for a float16 or bfloat16
    model) seen in the model's ``dtype``: operands are cast to ``work``; what lives
    in parameter or output space (variances, draws, square forms, the predictive's
    terms) comes back in ``dtype``, while ``logdet`` and ``to_matrix``, terms of the
    evidence and the precision itself, stay in ``work`` (a 16-bit log-determinant
    of a few thousand would keep no digit after the point). Other attributes are
    the form's (e.g. ``K``)."""

    def __init__(self, form: PrecisionForm, work: torch.dtype, dtype: torch.dtype):
        self.form, self.work, self.dtype = form, work, dtype

    def __getattr__(self, name: str):
        form = self.__dict__.get("form")  # absent while copy or pickle rebuild it
        if form is None:
            raise AttributeError(name)
        return getattr(form, name)

    def logdet(self) -> Tensor:
        return self.form.logdet()

    def square_form(self, delta: Tensor) -> Tensor:
        return self.form.square_form(delta.to(self.work)).to(delta.dtype)

    def inv_square_form(self, J: Tensor) -> Tensor:
        return self.form.inv_square_form(J.to(self.work)).to(J.dtype)

    def inv_diag(self) -> Tensor:
        return self.form.inv_diag().to(self.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.form.sample(n, generator).to(self.dtype)

    def to_matrix(self) -> Tensor:
        return self.form.to_matrix()

    def eigenbases(self) -> list[Basis] | None:
        bases = self.form.eigenbases()
        if bases is None:
            return None
        return [
            tuple(None if Q is None else Q.to(self.dtype) for Q in b) for b in bases
        ]

    def inverse_eigenvalues(self) -> list[Tensor]:
        return [v.to(self.dtype) for v in self.form.inverse_eigenvalues()]


def _parameter_basis(
    Qs: Sequence[Tensor | None], eigenvalues: Sequence[Tensor], shape: torch.Size
) -> Basis | None:
    """The eigenbasis of a block in the layout of its parameter (see
    ``KronPrecision.eigenbases``), or ``None`` where there is none."""
    if any(is_low_rank(values) for values in eigenvalues):
        return None  # U and a complement without a basis
    if len(shape) < 2:
        return tuple(Qs) if len(Qs) == 1 else None
    if len(Qs) == 2:
        return tuple(Qs) if eigenvalues[0].shape[0] == shape[0] else None
    # a single block of a matrix parameter: only a diagonal one separates
    return (None, None) if Qs[0] is None else None


class LowRankPrecision(PrecisionForm):
    """A ``LowRankPlusDiagonal`` ``U diag(l) U^T + diag(p0)``."""

    def __init__(self, M: LowRankPlusDiagonal) -> None:
        self.M = M

    def logdet(self) -> Tensor:
        return self.M.logdet()

    def square_form(self, delta: Tensor) -> Tensor:
        D = delta.reshape(-1, delta.shape[-1])
        return (self.M.matmul(D.T).T * D).sum(-1).reshape(delta.shape[:-1])

    def inv_square_form(self, J: Tensor) -> Tensor:
        return self.M.inv_square_form(J)

    def inv_diag(self) -> Tensor:
        return self.M.inv_diag()

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.M.sample(n, generator)

    def to_matrix(self) -> Tensor:
        return self.M.to_matrix()
