"""Top eigenpairs of a symmetric PSD operator, matrix-free.

``top_eigenpairs`` computes the ``k`` largest eigenpairs ``(l, U)`` of an operator
given only as a closure ``X -> H X`` on blocks of vectors, by block Lanczos with full
reorthogonalisation or by randomized subspace iteration, each finished with an exact
Rayleigh-Ritz step. A low-rank Laplace approximation builds its precision
(``laplace.utils.lowrank.LowRankPlusDiagonal``) from them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from numbers import Real

import torch

from laplace.utils._checks import _check_int

__all__ = ["top_eigenpairs"]

Tensor = torch.Tensor
MatMat = Callable[[Tensor], Tensor]

_METHODS = ("lanczos", "randomized")
_DEFAULT_N_ITER = {"lanczos": 30, "randomized": 50}


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
