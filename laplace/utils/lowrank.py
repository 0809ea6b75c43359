"""Low-rank-plus-diagonal precisions and the top eigenpairs they are built from.

A low-rank Laplace approximation keeps the ``k`` largest eigenpairs of the (already
likelihood-scaled) curvature, ``H ~= U diag(l) U^T`` with ``U`` of shape ``(P, k)``
and ``l >= 0`` of shape ``(k,)``, and adds a diagonal prior precision ``d > 0`` of
shape ``(P,)``:

$$
    \\mathbf{P} = U \\operatorname{diag}(l) U^\\top + \\operatorname{diag}(d).
$$

Nothing here forms a ``(P, P)`` matrix (except ``LowRankPlusDiagonal.to_matrix``,
meant for tests). With ``D = diag(d)``, ``L = diag(l)``, ``V = D^{-1} U`` (``(P, k)``)
and ``M = U^T D^{-1} U`` (``(k, k)``), every operation uses

* Woodbury: ``P^{-1} = D^{-1} - V K V^T`` with ``K = (I_k + L M)^{-1} L``, which
  equals ``(L^{-1} + M)^{-1}`` when ``L`` is invertible but stays finite (and
  differentiable) when some ``l_i = 0``;
* the matrix determinant lemma: ``log det P = sum(log d) + log det(I_k + L M)``; the
  ``k x k`` matrix ``I_k + L M`` is similar to the SPD ``I_k + L^{1/2} M L^{1/2}``,
  so its determinant is ``>= 1``.

Both cost ``O(P k^2)`` and are differentiable with respect to ``d``, ``l`` and ``U``,
so a marginal likelihood can be optimised in the prior precision.

``laplace.utils.eigensolvers.top_eigenpairs`` (re-exported here) computes
``(l, U)`` matrix-free from a closure ``X -> H X``.
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Real

import torch

from laplace.utils._checks import _check_int, _check_scalar, _describe
from laplace.utils.eigensolvers import top_eigenpairs
from laplace.utils.matrix import linalg_dtype

__all__ = ["LowRankPlusDiagonal", "top_eigenpairs"]

Tensor = torch.Tensor


class LowRankPlusDiagonal:
    """The SPD matrix ``P = U diag(l) U^T + diag(d)``, kept in factored form.

    With ``D = diag(d)``, ``L = diag(l)``, ``V = D^{-1} U`` and ``M = U^T D^{-1} U``:

    * ``P^{-1} = D^{-1} - V K V^T`` with ``K = (I_k + L M)^{-1} L`` (Woodbury);
    * ``log det P = sum_i log d_i + log det(I_k + L M)`` (determinant lemma).

    All methods cost at most ``O(P k^2)`` (plus the size of their operand) and never
    form a ``(P, P)`` matrix except ``to_matrix``. ``U`` need not be orthonormal.
    ``matmul``, ``solve``, ``inv_square_form``, ``inv_diag``, ``diag`` and ``logdet``
    are differentiable in ``U``, ``l`` and ``d`` (also at ``l_i = 0``); intermediate
    results are cached only when no autograd graph is being recorded through them.

    Parameters
    ----------
    U : torch.Tensor
        ``(P, k)`` floating, finite; typically orthonormal eigenvectors.
    eigenvalues : torch.Tensor
        ``l``, ``(k,)``, finite and ``>= 0``, dtype and device of ``U``.
    diagonal : torch.Tensor or float
        ``d``, ``(P,)``, or a scalar (or one-element tensor) broadcast to ``(P,)``;
        finite and ``> 0``.
    """

    def __init__(
        self, U: Tensor, eigenvalues: Tensor, diagonal: Tensor | float
    ) -> None:
        if not isinstance(U, Tensor) or U.ndim != 2 or not U.is_floating_point():
            got = _describe(U)
            raise ValueError(f"U must be a floating tensor of shape (P, k), got {got}.")
        P, k = U.shape
        if isinstance(diagonal, Real) and not isinstance(diagonal, bool):
            diagonal = torch.tensor(float(diagonal), dtype=U.dtype, device=U.device)
        if (
            isinstance(diagonal, Tensor)
            and diagonal.numel() == 1
            and diagonal.ndim <= 1
        ):
            diagonal = diagonal.reshape(()).expand(P)
        for name, t, shape in (
            ("eigenvalues", eigenvalues, (k,)),
            ("diagonal", diagonal, (P,)),
        ):
            if not isinstance(t, Tensor) or t.shape != shape:
                raise ValueError(
                    f"{name} must be a tensor of shape {shape} to match U of shape "
                    f"{tuple(U.shape)}, got {_describe(t)}."
                )
            if t.dtype != U.dtype or t.device != U.device:
                raise ValueError(
                    f"{name} must have the dtype and device of U ({U.dtype}, "
                    f"{U.device}), got ({t.dtype}, {t.device})."
                )
        if P == 0 or not bool(torch.isfinite(U.detach()).all()):
            raise ValueError("U must have P >= 1 rows and be finite (no NaN or inf).")
        l_, d_ = eigenvalues.detach(), diagonal.detach()
        if not bool(torch.isfinite(l_).all()) or bool((l_ < 0).any()):
            raise ValueError(f"eigenvalues must be finite and >= 0, got {l_}.")
        if not bool(torch.isfinite(d_).all()) or bool((d_ <= 0).any()):
            raise ValueError(
                "diagonal (the prior precision) must be finite and > 0, got min "
                f"{float(d_.min()):.3g}."
            )
        self.U = U
        self.eigenvalues = eigenvalues
        self.diagonal = diagonal
        self._cache: dict[str, object] = {}

    @property
    def num_params(self) -> int:
        """``P``."""
        return self.U.shape[0]

    @property
    def rank(self) -> int:
        """``k``, the number of columns of ``U``."""
        return self.U.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.U.dtype

    @property
    def device(self) -> torch.device:
        return self.U.device

    def __repr__(self) -> str:
        return (
            f"LowRankPlusDiagonal(num_params={self.num_params}, rank={self.rank}, "
            f"dtype={self.dtype}, device={self.device})"
        )

    def _tracks_grad(self) -> bool:
        return torch.is_grad_enabled() and any(
            t.requires_grad for t in (self.U, self.eigenvalues, self.diagonal)
        )

    def _cached(self, name: str, fn: Callable[[], object]) -> object:
        """``fn()``, memoised unless an autograd graph is being recorded through it
        (a cached graph could not be backpropagated through twice)."""
        if self._tracks_grad():
            return fn()
        if name not in self._cache:
            self._cache[name] = fn()
        return self._cache[name]

    def _factors(self) -> tuple[Tensor, Tensor, Tensor]:
        """``A = I_k + L M`` (``(k, k)``), ``V = D^{-1} U`` (``(P, k)``) and the
        symmetrised ``K = A^{-1} L`` (``(k, k)``): ``P^{-1} = D^{-1} - V K V^T``."""

        def compute() -> tuple[Tensor, Tensor, Tensor]:
            V = self.U / self.diagonal.unsqueeze(-1)
            A = self.eigenvalues.unsqueeze(-1) * (self.U.mT @ V)
            A = A + torch.eye(self.rank, dtype=self.dtype, device=self.device)
            w = linalg_dtype(self.dtype)  # float32 for 16-bit factors
            K = torch.linalg.solve(A.to(w), torch.diag(self.eigenvalues).to(w))
            return A, V, (0.5 * (K + K.mT)).to(self.dtype)

        return self._cached("factors", compute)

    def _sampling_factor(self) -> tuple[Tensor, Tensor, Tensor]:
        """``D^{-1/2}`` (``(P,)``), ``Z`` (``(P, r)``), ``c`` (``(r,)``) with
        ``F = D^{-1/2} (I + Z diag(c) Z^T)``; see ``inv_factor_matmul``."""

        def compute() -> tuple[Tensor, Tensor, Tensor]:
            with torch.no_grad():
                d_isqrt = self.diagonal.rsqrt()
                w = linalg_dtype(self.dtype)  # float32 for 16-bit factors
                Q, R = torch.linalg.qr((self.U * d_isqrt.unsqueeze(-1)).to(w))
                C = (R * self.eigenvalues.to(w)) @ R.mT
                S, Vs = torch.linalg.eigh(0.5 * (C + C.mT))
                c = (1.0 + S.clamp_min(0.0)).rsqrt() - 1.0
                return d_isqrt, (Q @ Vs).to(self.dtype), c.to(self.dtype)

        if "sampling_factor" not in self._cache:
            self._cache["sampling_factor"] = compute()
        return self._cache["sampling_factor"]

    def _check_operand(self, X: object, name: str) -> Tensor:
        """Check ``X`` (``(P,)``/``(P, m)``) or ``J`` (``(C, P)``/``(N, C, P)``)."""
        if not isinstance(X, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(X).__name__}.")
        ndims, axis, shapes = {
            "X": ((1, 2), 0, "(P,) or (P, m)"),
            "J": ((2, 3), -1, "(N, C, P) or (C, P)"),
        }[name]
        if X.ndim not in ndims or X.shape[axis] != self.num_params:
            raise ValueError(
                f"{name} must have shape {shapes} with P = {self.num_params}, got "
                f"{tuple(X.shape)}."
            )
        if X.dtype != self.dtype or X.device != self.device:
            raise ValueError(
                f"{name} must have dtype {self.dtype} on {self.device}, got "
                f"{X.dtype} on {X.device}."
            )
        return X

    def matmul(self, X: Tensor) -> Tensor:
        """``P X = d * X + U (l * (U^T X))``.

        Parameters
        ----------
        X : torch.Tensor
            ``(P,)`` or ``(P, m)``.

        Returns
        -------
        torch.Tensor
            Shape of ``X``.
        """
        X = self._check_operand(X, "X")
        X2 = X.unsqueeze(-1) if X.ndim == 1 else X
        out = self.diagonal.unsqueeze(-1) * X2 + self.U @ (
            self.eigenvalues.unsqueeze(-1) * (self.U.mT @ X2)
        )
        return out.reshape(X.shape)

    def solve(self, X: Tensor) -> Tensor:
        """``P^{-1} X = D^{-1} X - V K (V^T X)`` (Woodbury).

        Parameters
        ----------
        X : torch.Tensor
            ``(P,)`` or ``(P, m)``.

        Returns
        -------
        torch.Tensor
            Shape of ``X``.
        """
        X = self._check_operand(X, "X")
        X2 = X.unsqueeze(-1) if X.ndim == 1 else X
        _, V, K = self._factors()
        out = X2 / self.diagonal.unsqueeze(-1) - V @ (K @ (V.mT @ X2))
        return out.reshape(X.shape)

    def inv_square_form(self, J: Tensor) -> Tensor:
        """``J P^{-1} J^T = (J D^{-1}) J^T - (J V) K (J V)^T`` for each batch entry.

        Parameters
        ----------
        J : torch.Tensor
            ``(N, C, P)`` (e.g. Jacobians) or ``(C, P)``.

        Returns
        -------
        torch.Tensor
            ``(N, C, C)`` or ``(C, C)``, symmetric.
        """
        J = self._check_operand(J, "J")
        _, V, K = self._factors()
        JV = J @ V
        S = (J / self.diagonal) @ J.mT - JV @ K @ JV.mT
        return 0.5 * (S + S.mT)

    def inv_diag(self) -> Tensor:
        """``diag(P^{-1})_i = 1 / d_i - sum_{ab} V_ia K_ab V_ib``, shape ``(P,)``."""
        _, V, K = self._factors()
        return self.diagonal.reciprocal() - ((V @ K) * V).sum(-1)

    def diag(self) -> Tensor:
        """``diag(P)_i = d_i + sum_a l_a U_ia^2``, shape ``(P,)``."""
        return self.diagonal + (self.U.square() * self.eigenvalues).sum(-1)

    def logdet(self) -> Tensor:
        """``log det P = sum_i log d_i + log det(I_k + L M)``, a 0-dim tensor.

        The ``k x k`` factor is similar to the SPD ``I + L^{1/2} M L^{1/2}``, so its
        determinant is positive; its log is taken through an LU factorisation
        (``torch.linalg.slogdet``), differentiable in ``d``, ``l`` and ``U``.
        """

        def compute() -> Tensor:
            A, _, _ = self._factors()
            w = linalg_dtype(self.dtype)  # float32 for 16-bit factors
            logdet_A = torch.linalg.slogdet(A.to(w)).logabsdet.to(self.dtype)
            return self.diagonal.log().sum() + logdet_A

        return self._cached("logdet", compute)

    def inv_factor_matmul(self, X: Tensor) -> Tensor:
        """``F X`` for a factor ``F`` (``(P, P)``, not formed) with ``F F^T = P^{-1}``.

        Write ``P = D^{1/2} (I + W L W^T) D^{1/2}`` with ``W = D^{-1/2} U``. Take the
        thin QR ``W = Q R`` (``Q``: ``(P, r)``, ``r = min(P, k)``) and the
        eigendecomposition ``R L R^T = V_s diag(s) V_s^T`` (``(r, r)``, ``s >= 0``).
        Then ``Z = Q V_s`` has orthonormal columns, ``I + W L W^T = I + Z diag(s)
        Z^T``, and

        $$
            F = D^{-1/2} \\left(I + Z \\operatorname{diag}(c) Z^\\top\\right),
            \\qquad c = (1 + s)^{-1/2} - 1,
        $$

        is exact: ``F F^T = D^{-1/2} (I + Z diag(s) Z^T)^{-1} D^{-1/2} = P^{-1}``
        because ``(1 + c)^2 - 1 = -s / (1 + s)``. Setup ``O(P k^2)``, then
        ``O(P k m)``. Not differentiable (computed on detached tensors).

        Parameters
        ----------
        X : torch.Tensor
            ``(P,)`` or ``(P, m)``.

        Returns
        -------
        torch.Tensor
            Shape of ``X``.
        """
        X = self._check_operand(X, "X")
        X2 = X.unsqueeze(-1) if X.ndim == 1 else X
        d_isqrt, Z, c = self._sampling_factor()
        out = d_isqrt.unsqueeze(-1) * (X2 + Z @ (c.unsqueeze(-1) * (Z.mT @ X2)))
        return out.reshape(X.shape)

    def sample(
        self, n_samples: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """Exact draws from ``N(0, P^{-1})``: rows of ``(F eps)^T``, ``eps ~ N(0, I)``.

        ``F`` is the factor of ``inv_factor_matmul``, ``F F^T = P^{-1}``.

        Parameters
        ----------
        n_samples : int
            ``>= 1``.
        generator : torch.Generator, optional
            On the device of this matrix.

        Returns
        -------
        torch.Tensor
            ``(n_samples, P)``.
        """
        n_samples = _check_int(n_samples, "n_samples", 1)
        eps = torch.randn(
            self.num_params,
            n_samples,
            generator=generator,
            dtype=self.dtype,
            device=self.device,
        )
        return self.inv_factor_matmul(eps).mT

    def with_diagonal(self, diagonal: Tensor | float) -> LowRankPlusDiagonal:
        """``U diag(l) U^T + diag(diagonal)``: same low-rank part, another diagonal.

        Parameters
        ----------
        diagonal : torch.Tensor or float
            ``(P,)`` or scalar, ``> 0``; may require grad.
        """
        return LowRankPlusDiagonal(self.U, self.eigenvalues, diagonal)

    def scaled(self, c: float | Tensor) -> LowRankPlusDiagonal:
        """``U diag(c l) U^T + diag(d)``: the low-rank part scaled, ``d`` kept.

        Parameters
        ----------
        c : float or torch.Tensor
            Scalar ``>= 0`` (a tensor may require grad, e.g. ``1 / sigma^2``).
        """
        c = _check_scalar(c, "c")
        return LowRankPlusDiagonal(self.U, c * self.eigenvalues, self.diagonal)

    def to_matrix(self) -> Tensor:
        """Dense ``(P, P)`` form ``U diag(l) U^T + diag(d)`` (for tests and tiny P)."""
        return (self.U * self.eigenvalues) @ self.U.mT + torch.diag(self.diagonal)

    def detach(self) -> LowRankPlusDiagonal:
        """The same matrix with all tensors detached from autograd."""
        return LowRankPlusDiagonal(
            self.U.detach(), self.eigenvalues.detach(), self.diagonal.detach()
        )

    def to(self, *args: object, **kwargs: object) -> LowRankPlusDiagonal:
        """A copy with every tensor moved by ``Tensor.to(*args, **kwargs)``."""
        return LowRankPlusDiagonal(
            self.U.to(*args, **kwargs),
            self.eigenvalues.to(*args, **kwargs),
            self.diagonal.to(*args, **kwargs),
        )
