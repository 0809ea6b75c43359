"""Low-rank-plus-diagonal precisions and the top eigenpairs they are built from.

A low-rank Laplace approximation keeps the ``k`` largest eigenpairs of the (already
likelihood-scaled) curvature, ``H ~= U diag(l) U^T`` with ``U`` of shape ``(P, k)``
and ``l >= 0`` of shape ``(k,)``, and adds a diagonal prior precision ``d > 0`` of
shape ``(P,)``:

.. math::

    \\mathbf{P} = U \\operatorname{diag}(l) U^\\top + \\operatorname{diag}(d).

Nothing here forms a ``(P, P)`` matrix (except :meth:`LowRankPlusDiagonal.to_matrix`,
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

:func:`top_eigenpairs` computes ``(l, U)`` matrix-free from a closure ``X -> H X``
by block Lanczos or randomized subspace iteration.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from numbers import Integral, Real

import torch

__all__ = ["LowRankPlusDiagonal", "top_eigenpairs"]

Tensor = torch.Tensor
MatMat = Callable[[Tensor], Tensor]

_METHODS = ("lanczos", "randomized")
_DEFAULT_N_ITER = {"lanczos": 30, "randomized": 50}


def _check_int(
    value: object, name: str, minimum: int, maximum: int | None = None
) -> int:
    """Return ``value`` as an ``int`` in ``[minimum, maximum]`` or raise naming it."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        allowed = (
            f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        )
        raise ValueError(f"{name} must be {allowed}, got {value}.")
    return value


def _describe(x: object) -> str:
    """Shape and dtype of a tensor, else the type name (for error messages)."""
    if isinstance(x, Tensor):
        return f"shape {tuple(x.shape)}, dtype {x.dtype}"
    return type(x).__name__


def _check_scalar(value: object, name: str) -> Real | Tensor:
    """A real number or a one-element tensor (returned 0-dim), finite and >= 0."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}."
            )
        value = value.reshape(())
        bad = not bool(torch.isfinite(value.detach())) or bool(value.detach() < 0)
    elif isinstance(value, Real) and not isinstance(value, bool):
        bad = not math.isfinite(value) or value < 0
    else:
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}.")
    if bad:
        raise ValueError(f"{name} must be finite and >= 0, got {value}.")
    return value


def _orthonormal_extension(
    W: Tensor,
    Q_prev: Tensor | None,
    ncols: int,
    thresh: float,
    generator: torch.Generator | None,
) -> Tensor:
    """Orthonormal ``(P, ncols)`` block spanning ``range(W)``, orthogonal to ``Q_prev``.

    ``W`` (``(P, b)``, ``b >= ncols``) should already be orthogonal to ``Q_prev``
    (``(P, m)`` with orthonormal columns, ``m + ncols <= P``). The dominant left
    singular vectors of ``W`` with singular value above ``thresh`` are kept (at most
    ``ncols``, via ``W = Q_w R`` and an SVD of the small ``R``); missing columns
    (``W`` rank deficient: the Krylov space became invariant) are filled with random
    directions. Two projections against ``Q_prev`` followed by QR make the result
    orthogonal to ``Q_prev`` to working precision.
    """
    P = W.shape[0]
    Q_w, R = torch.linalg.qr(W)
    U_r, S, _ = torch.linalg.svd(R)
    keep = min(ncols, int((S > thresh).sum()))
    B = Q_w @ U_r[:, :keep]
    if keep < ncols:
        fill = torch.randn(
            P, ncols - keep, generator=generator, dtype=W.dtype, device=W.device
        )
        B = torch.cat([B, fill], dim=1)
    for _ in range(2):
        if Q_prev is not None:
            B = B - Q_prev @ (Q_prev.mT @ B)
        B = torch.linalg.qr(B).Q
    return B


def _lanczos_steps(
    apply: MatMat, Q: Tensor, eps: float, generator: torch.Generator | None
) -> Iterator[tuple[Tensor, Tensor, Tensor, int]]:
    """Block Lanczos with full reorthogonalisation, one ``apply`` per step.

    Grows an orthonormal basis ``Q = [Q_0, Q_1, ...]`` of the block Krylov space
    ``span{Q_0, H Q_0, H^2 Q_0, ...}``. Step ``j`` computes ``W = H Q_j``, the block
    column ``Q^T W`` of ``T = Q^T H Q`` (stored symmetrically) and ``R = (I - Q Q^T)
    W`` by two Gram-Schmidt passes. As ``H Q_i`` lies in ``span(Q_0..Q_{i+1})``, a
    Ritz pair ``(theta, Q s)`` of ``T`` has the exact residual ``H Q s - theta Q s =
    R s[start:]``, ``start`` being the first row of block ``j``. Yields
    ``(Q, T, R, start)``.
    """
    P, b = Q.shape
    Q_j, T, scale = Q, Q.new_zeros(0, 0), 0.0
    while True:
        W = apply(Q_j)
        scale = max(scale, float(W.norm(dim=0).max()))
        H = Q.mT @ W
        W = W - Q @ H
        H2 = Q.mT @ W
        W, H = W - Q @ H2, H + H2
        start, m = T.shape[0], Q.shape[1]
        T_new = Q.new_zeros(m, m)
        T_new[:start, :start] = T
        T_new[:, start:], T_new[start:, :] = H, H.mT
        T_new[start:, start:] = 0.5 * (H[start:] + H[start:].mT)
        T = T_new
        yield Q, T, W, start
        Q_j = _orthonormal_extension(W, Q, min(b, P - m), 10 * eps * scale, generator)
        Q = torch.cat([Q, Q_j], dim=1)


def _subspace_steps(
    apply: MatMat, Q: Tensor, eps: float, generator: torch.Generator | None
) -> Iterator[tuple[Tensor, Tensor, Tensor, int]]:
    """Randomized subspace iteration (Halko, Martinsson & Tropp, 2011, Alg. 4.4).

    Each step computes ``Y = H Q``, ``T = Q^T Y`` and yields ``(Q, T, Y - Q T, 0)``
    (a Ritz pair ``(theta, Q s)`` has residual ``(Y - Q T) s``); then
    ``Q <- orth(Y)``.
    """
    while True:
        Y = apply(Q)
        T = Q.mT @ Y
        yield Q, 0.5 * (T + T.mT), Y - Q @ T, 0
        thresh = 10 * eps * float(Y.norm(dim=0).max())
        Q = _orthonormal_extension(Y, None, Q.shape[1], thresh, generator)


def top_eigenpairs(
    matmat: MatMat,
    num_params: int,
    k: int,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    method: str = "lanczos",
    oversampling: int = 10,
    n_iter: int | None = None,
    tol: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Top-``k`` eigenpairs of a symmetric PSD operator given only by its products.

    Both methods work on blocks of ``b = min(num_params, k + oversampling)`` columns
    (one call of ``matmat`` per iteration) and finish with a Rayleigh-Ritz step: for
    an orthonormal basis ``Q`` (``(P, m)``) the Ritz pairs are ``(theta_i, Q s_i)``
    with ``(Q^T H Q) s_i = theta_i s_i``. Iteration stops once every one of the ``k``
    Ritz pairs has ``||H y_i - theta_i y_i|| <= tol * ||T||`` (``||T||``: the largest
    ``|theta|``, an estimate of ``||H||``). Then ``|theta_i - lambda_i| <= tol ||H||``
    and the angle between the computed and the true eigenspaces is at most
    ``tol ||H|| / gap`` (Davis-Kahan).

    * ``"lanczos"``: block Lanczos with full reorthogonalisation; the basis grows by
      ``b`` columns per iteration (memory ``P * b * n_iter``) and converges roughly
      like a degree-``n_iter`` Chebyshev polynomial in ``H`` -- few iterations.
    * ``"randomized"``: randomized subspace iteration (Halko et al., 2011) on a fixed
      ``(P, b)`` block (memory ``2 P b``); the error shrinks by about
      ``lambda_{b+1} / lambda_k`` per iteration.

    Parameters
    ----------
    matmat : callable
        ``X -> H X`` for ``X`` of shape ``(P, m)``, returning ``(P, m)``; ``H`` must
        be symmetric (positive semi-definite for the clamp below to be harmless).
        Outputs are detached: the result is not differentiable.
    num_params : int
        ``P``, the size of ``H``.
    k : int
        Number of eigenpairs, ``1 <= k <= P``.
    dtype : torch.dtype, optional
        Floating dtype of the iteration; defaults to ``torch.get_default_dtype()``.
    device : torch.device or str, optional
        Device of the iteration; defaults to the CPU.
    method : {"lanczos", "randomized"}
    oversampling : int, default 10
        Extra columns per block, ``>= 0``.
    n_iter : int, optional
        Maximum number of calls of ``matmat`` (``>= 1``); default 30 for Lanczos and
        50 for randomized subspace iteration. A ``RuntimeWarning`` reports a run that
        stops at ``n_iter`` without reaching ``tol``.
    tol : float, optional
        Relative residual tolerance ``> 0``; default ``eps ** (2/3)`` of ``dtype``
        (about ``3.7e-11`` for float64 and ``2.4e-5`` for float32).
    generator : torch.Generator, optional
        Source of the random start block (and of random fills when the Krylov space
        becomes invariant), on ``device``.

    Returns
    -------
    eigenvalues : torch.Tensor
        ``(k,)``, descending, negative values (round-off) clamped to 0.
    eigenvectors : torch.Tensor
        ``(P, k)`` with orthonormal columns; column ``i`` belongs to
        ``eigenvalues[i]``. Signs are arbitrary.
    """
    if not callable(matmat):
        raise TypeError(f"matmat must be callable, got {type(matmat).__name__}.")
    P = _check_int(num_params, "num_params", 1)
    k = _check_int(k, "k", 1, P)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}.")
    oversampling = _check_int(oversampling, "oversampling", 0)
    n_iter = _DEFAULT_N_ITER[method] if n_iter is None else n_iter
    n_iter = _check_int(n_iter, "n_iter", 1)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}.")
    device = torch.device("cpu") if device is None else torch.device(device)
    eps = torch.finfo(dtype).eps
    if tol is None:
        tol = eps ** (2 / 3)
    elif isinstance(tol, bool) or not isinstance(tol, Real) or not tol > 0:
        raise ValueError(f"tol must be a real number > 0, got {tol!r}.")

    def apply(X: Tensor) -> Tensor:
        Y = matmat(X)
        if not isinstance(Y, Tensor) or Y.shape != X.shape:
            got = tuple(Y.shape) if isinstance(Y, Tensor) else type(Y).__name__
            raise ValueError(
                f"matmat must map a tensor of shape {tuple(X.shape)} to one of the "
                f"same shape, got {got}."
            )
        Y = Y.detach().to(dtype=dtype, device=device)
        if not bool(torch.isfinite(Y).all()):
            raise ValueError("matmat returned non-finite values (NaN or inf).")
        return Y

    b = min(P, k + oversampling)
    Q0 = torch.randn(P, b, generator=generator, dtype=dtype, device=device)
    Q0 = _orthonormal_extension(Q0, None, b, 0.0, generator)
    steps = _lanczos_steps if method == "lanczos" else _subspace_steps
    for step, (Q, T, R, start) in enumerate(steps(apply, Q0, eps, generator), 1):
        theta, S = torch.linalg.eigh(T)
        theta, S = theta.flip(0)[:k], S.flip(1)[:, :k]
        ref = max(float(theta.abs().max()), torch.finfo(dtype).tiny)
        residual = float((R @ S[start:]).norm(dim=0).max()) / ref
        if residual <= tol or Q.shape[1] == P or step == n_iter:
            break
    U = Q @ S
    if residual > tol and Q.shape[1] < P:
        warnings.warn(
            f"top_eigenpairs(method={method!r}) stopped after n_iter={n_iter} "
            f"products with relative residual {residual:.2e} > tol={tol:.2e}; "
            "increase n_iter or oversampling.",
            RuntimeWarning,
            stacklevel=2,
        )
    return theta.clamp_min(0.0), U.contiguous()


class LowRankPlusDiagonal:
    """The SPD matrix ``P = U diag(l) U^T + diag(d)``, kept in factored form.

    With ``D = diag(d)``, ``L = diag(l)``, ``V = D^{-1} U`` and ``M = U^T D^{-1} U``:

    * ``P^{-1} = D^{-1} - V K V^T`` with ``K = (I_k + L M)^{-1} L`` (Woodbury);
    * ``log det P = sum_i log d_i + log det(I_k + L M)`` (determinant lemma).

    All methods cost at most ``O(P k^2)`` (plus the size of their operand) and never
    form a ``(P, P)`` matrix except :meth:`to_matrix`. ``U`` need not be orthonormal.
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
            K = torch.linalg.solve(A, torch.diag(self.eigenvalues))
            return A, V, 0.5 * (K + K.mT)

        return self._cached("factors", compute)

    def _sampling_factor(self) -> tuple[Tensor, Tensor, Tensor]:
        """``D^{-1/2}`` (``(P,)``), ``Z`` (``(P, r)``), ``c`` (``(r,)``) with
        ``F = D^{-1/2} (I + Z diag(c) Z^T)``; see :meth:`inv_factor_matmul`."""

        def compute() -> tuple[Tensor, Tensor, Tensor]:
            with torch.no_grad():
                d_isqrt = self.diagonal.rsqrt()
                Q, R = torch.linalg.qr(self.U * d_isqrt.unsqueeze(-1))
                C = (R * self.eigenvalues) @ R.mT
                S, Vs = torch.linalg.eigh(0.5 * (C + C.mT))
                c = (1.0 + S.clamp_min(0.0)).rsqrt() - 1.0
                return d_isqrt, Q @ Vs, c

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
            return self.diagonal.log().sum() + torch.linalg.slogdet(A).logabsdet

        return self._cached("logdet", compute)

    def inv_factor_matmul(self, X: Tensor) -> Tensor:
        """``F X`` for a factor ``F`` (``(P, P)``, not formed) with ``F F^T = P^{-1}``.

        Write ``P = D^{1/2} (I + W L W^T) D^{1/2}`` with ``W = D^{-1/2} U``. Take the
        thin QR ``W = Q R`` (``Q``: ``(P, r)``, ``r = min(P, k)``) and the
        eigendecomposition ``R L R^T = V_s diag(s) V_s^T`` (``(r, r)``, ``s >= 0``).
        Then ``Z = Q V_s`` has orthonormal columns, ``I + W L W^T = I + Z diag(s)
        Z^T``, and

        .. math::

            F = D^{-1/2} \\left(I + Z \\operatorname{diag}(c) Z^\\top\\right),
            \\qquad c = (1 + s)^{-1/2} - 1,

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

        ``F`` is the factor of :meth:`inv_factor_matmul`, ``F F^T = P^{-1}``.

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
