r"""Kronecker factors kept as low rank plus an isotropic diagonal.

A Kronecker factor of a wide layer is too large to store densely: the input-side
factor of a LoRA ``A`` matrix is ``width x width``, the output-side factor of its
``B`` matrix ``(3 width) x (3 width)`` (tens of GB over a 7B model).
``LowRankFactor`` keeps such an ``(n, n)`` factor as

$$
    F = U \operatorname{diag}(s) U^\top + c I, \qquad
    U^\top U = I_k, \quad s \ge 0, \quad c \ge 0,
$$

with ``U`` ``(n, k)``, ``k <= r`` (the rank kept), in ``O(r n)`` memory, as
Laplace-LoRA does. Its eigenvalues are ``s_i + c`` on the columns of ``U`` and ``c``
on the orthogonal complement of ``span(U)``, with multiplicity ``n - k``.

**Why the diagonal is isotropic.** The complement of ``span(U)`` is one eigenspace
of ``F`` (eigenvalue ``c``), so ``F``'s eigenbasis is ``U`` plus *any* orthonormal
basis of the complement, which is never formed. Every function of ``F``, and of a
Kronecker pair ``F1 (x) F2`` plus ``d I``, damped (``(F1 + a I) (x) (F2 + b I)``)
or not, acts on ``span(U)`` through ``U`` and on the complement as a multiple of
the projector ``I - U U^T``: powers, solves, square roots, log-determinants and
diagonals of the Kronecker-factored curvature stay *exact for the
representation*. (A general diagonal would break the shared eigenbasis.)

**Building.** From side vectors ``V`` ``(m, n)`` (activations or backpropagated
gradients: ``F = V^T V``) the factor is built without forming ``V^T V``: rows are
taken in chunks, the square root of what is kept stacked with them,
``B = [U sqrt(s), V_chunk^T]`` ``(n, k + m')``, and the thin SVD of ``B`` gives
the eigenpairs of ``B B^T``; the ``r`` leading ones are kept (``truncate``).
Adding two factors stacks their square roots likewise, with ``c = c_1 + c_2``.
The trace that truncation discards goes into the isotropic part: ``c`` becomes the
mean of the discarded spectrum of ``F`` (``n - k`` eigenvalues), so the trace is
kept exactly and the kept eigenpairs are exact eigenpairs of the untruncated
sum. When the total rank is at most ``r`` nothing is discarded and the factor is
exact.

The second half of the module applies functions of a block's eigenvalues in
the eigenbasis of its factors when a factor has such a complement
(``EigenPart``, ``spectral_matmul``, ``spectral_diagonal``, ``spectral_logdet``,
``spectral_grid``): ``laplace.utils.matrix.KronDecomposed`` calls them for blocks
with a low-rank factor.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Number
from typing import NamedTuple

import torch

Tensor = torch.Tensor

#: side-vector rows taken into one truncation, beside the ``r`` kept columns (also
#: fewer than ``n - r``, so that no ``(n, n)`` matrix is formed for ``r < n / 2``)
ROWS_PER_STEP = 1024


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    from laplace.utils.matrix import linalg_dtype  # matrix.py imports this module

    return linalg_dtype(dtype)


# -- the factor's formulas ---------------------------------------------------------
def truncate(B: Tensor, c: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """The rank-``rank`` form of ``F = B B^T + c I``, trace kept.

    Parameters
    ----------
    B : torch.Tensor
        ``(n, m)`` a square root of the low-rank part.
    c : torch.Tensor
        0-dim, ``>= 0``: the isotropic part.
    rank : int
        the number of eigenpairs kept, ``>= 1``.

    Returns
    -------
    U, s, c_new : torch.Tensor
        ``U`` ``(n, k)`` with ``k = min(rank, rank of B)``: the eigenvectors of the
        ``k`` largest eigenvalues ``lam`` of ``B B^T`` (from the eigenpairs of the
        Gram ``B^T B``; ``m <= n`` in practice); ``c_new = c + sum(lam[k:]) /
        (n - k)``, the mean of the other ``n - k`` eigenvalues of ``F``;
        ``s = lam[:k] + c - c_new >= 0``, so that ``U diag(s) U^T + c_new I`` has
        the eigenpairs ``(lam_i + c, u_i)`` of ``F`` and its trace.
    """
    try:
        U, s, c_new = _truncate_by_gram(B, c, rank)
        if bool(torch.isfinite(s).all()) and bool(torch.isfinite(U).all()):
            return U, s, c_new
    except torch.linalg.LinAlgError:
        pass
    return _truncate_by_svd(B, c, rank)  # the slower, more robust way


def _truncate_by_gram(B: Tensor, c: Tensor, rank: int):
    """``truncate`` from the eigenpairs of the Gram ``B^T B``."""
    n, m = B.shape
    if m == 0:  # nothing to keep (a zero factor)
        return B.new_zeros(n, 0), B.new_zeros(0), c
    # the eigenpairs of B B^T from the small Gram B^T B (m <= n here: an
    # eigendecomposition of (m, m) and products of (n, m), several times faster
    # than an SVD of B), the kept columns re-orthonormalized by a thin QR
    lam, V = _eigh_wide(B.mT @ B)
    lam, V = lam.flip(0).clamp(min=0), V.flip(1)
    resolved = lam > lam[0] * m * torch.finfo(lam.dtype).eps  # the rest is round-off
    k = min(rank, int(resolved.sum()), n)
    W = B @ (V[:, :k] / lam[:k].sqrt())  # (n, k): orthonormal up to round-off
    Q, R = torch.linalg.qr(W)
    mu, Z = _eigh_wide((R * lam[:k]) @ R.mT)
    mu, U = mu.flip(0).clamp(min=0), Q @ Z.flip(1)
    # the trace B B^T loses: all of it but the kept eigenvalues' (not a sum of the
    # small ones, which the Gram resolves only to round-off of the largest)
    lost = (B.square().sum() - mu.sum()).clamp(min=0)
    spread = lost / (n - k) if n > k else lam.new_zeros(())
    return U, (mu - spread).clamp(min=0), c + spread


def _truncate_by_svd(B: Tensor, c: Tensor, rank: int):
    """``truncate`` from a thin SVD of ``B`` in float64, where the Gram's
    eigendecomposition fails (a Gram of an ill-conditioned square root)."""
    n = B.shape[0]
    W, sigma, _ = torch.linalg.svd(B.to(torch.float64), full_matrices=False)
    lam = sigma.square()
    k = min(rank, lam.shape[0])
    spread = lam[k:].sum() / (n - k) if n > k else lam.new_zeros(())
    U = W[:, :k].to(B.dtype)
    s = (lam[:k] - spread).clamp(min=0).to(B.dtype)
    return U, s, c + spread.to(B.dtype)


def _eigh_wide(G: Tensor) -> tuple[Tensor, Tensor]:
    """``eigh`` of a small symmetric ``G``, retried in float64 where float32's does
    not converge (the Gram of an ill-conditioned square root can defeat it); in
    ``G``'s dtype."""
    try:
        return torch.linalg.eigh(G)
    except torch.linalg.LinAlgError:
        if G.dtype == torch.float64:
            raise
    lam, V = torch.linalg.eigh(G.to(torch.float64))
    return lam.to(G.dtype), V.to(G.dtype)


def _top_eigenpairs(F: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(U, s, c)`` of the dense PSD ``F`` ``(n, n)`` truncated as ``truncate``
    does (eigenvalues clamped at 0, with a warning for clearly negative ones)."""
    n = F.shape[0]
    lam, Q = torch.linalg.eigh(F)
    tol = torch.finfo(lam.dtype).eps ** 0.5
    if lam.numel() and bool((lam < -tol * lam.abs().max()).any()):
        warnings.warn(
            "Kronecker factor has clearly negative eigenvalues "
            f"(min {lam.min().item():.3g}); clamping them to 0.",
            stacklevel=4,
        )
    lam, Q = lam.clamp(min=0).flip(0), Q.flip(1)
    k = min(rank, n)
    c = lam[k:].mean() if n > k else lam.new_zeros(())
    return Q[:, :k].clone(), (lam[:k] - c).clamp(min=0), c


def _isotropic(value: Tensor | Number, like: Tensor) -> Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).reshape(())


class LowRankFactor:
    r"""A Kronecker factor ``F = U diag(s) U^T + c I`` kept in ``O(r n)`` memory.

    Used like a dense factor in ``laplace.utils.Kron`` (which dispatches on it) and
    built by ``KronLaplace(..., low_rank_factors=r)``; see the module docstring for
    the construction and why every Kronecker operation stays exact for this
    representation. Arithmetic mirrors a tensor's where a factor needs it: ``+``
    (with another ``LowRankFactor``, a dense ``(n, n)`` factor or a diagonal one,
    a vector; the sum is truncated to rank ``max`` of the ranks), ``add_``,
    ``*`` and ``/`` by a scalar ``>= 0``, ``mul_``, ``clone``, ``detach``, ``to``.
    "In place" rebinds the factor's tensors and never writes into them, so
    factors may share them.

    Parameters
    ----------
    U : torch.Tensor
        ``(n, k)``, orthonormal columns (not checked: built by the constructors).
    s : torch.Tensor
        ``(k,)``, ``>= 0``.
    c : torch.Tensor or float
        ``>= 0``, the isotropic part (0-dim).
    rank : int, optional
        the number of eigenpairs kept when the factor is added to, ``>= k``;
        defaults to ``k`` (at least 1).

    Attributes
    ----------
    n : int
        the size of the factor, which represents an ``(n, n)`` matrix (``shape``).
    """

    def __init__(
        self, U: Tensor, s: Tensor, c: Tensor | float, rank: int | None = None
    ) -> None:
        if not isinstance(U, Tensor) or U.ndim != 2:
            got = tuple(U.shape) if isinstance(U, Tensor) else type(U).__name__
            raise ValueError(f"U must be a matrix (n, k); got {got}.")
        k = U.shape[1]
        if not isinstance(s, Tensor) or s.shape != (k,):
            got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
            raise ValueError(
                f"s must have shape ({k},), one per column of U; got {got}."
            )
        c = _isotropic(c, U)
        if bool((s.detach() < 0).any()) or bool(c.detach() < 0):
            raise ValueError(
                "A LowRankFactor is PSD: s and c must be >= 0; got "
                f"min(s)={s.min().item() if k else None} and c={c.item()}."
            )
        rank = max(k, 1) if rank is None else rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < max(k, 1):
            raise ValueError(
                f"rank must be an int >= the {k} columns of U (and >= 1); got {rank!r}."
            )
        self.U, self.s, self.c, self.rank = U, s, c, rank
        self.n = U.shape[0]

    # -- constructors ------------------------------------------------------------
    @classmethod
    def from_rows(cls, V: Tensor, rank: int) -> LowRankFactor:
        """``V^T V`` for ``V`` ``(m, n)``, truncated to ``rank`` without forming it.

        The rows are taken ``ROWS_PER_STEP`` at a time (and fewer than ``n - rank``:
        no ``(n, n)`` matrix for ``rank < n / 2``), stacked with the square root
        kept so far and truncated (``truncate``): exact when ``V`` has rank at most
        ``rank``, trace-preserving always. Computed in float32 for float16 and
        bfloat16 ``V`` (``linalg_dtype``), and returned in that dtype.
        """
        _check_rank(rank)
        m, n = V.shape
        V = V.to(_work_dtype(V.dtype))
        step = min(ROWS_PER_STEP, max(n - rank - 1, rank, 1))
        U, s, c = V.new_zeros(n, 0), V.new_zeros(0), V.new_zeros(())
        for start in range(0, m, step):
            B = torch.cat([U * s.sqrt(), V[start : start + step].T], dim=1)
            U, s, c = truncate(B, c, rank)
        return cls(U, s, c, rank)

    @classmethod
    def from_dense(cls, F: Tensor, rank: int) -> LowRankFactor:
        """The dense PSD factor ``F`` ``(n, n)`` truncated to ``rank`` (its leading
        eigenpairs kept, the mean of the other eigenvalues as ``c``). Forms the
        eigendecomposition of ``F``: for factors that arrive dense."""
        _check_rank(rank)
        dtype = _work_dtype(F.dtype)
        U, s, c = _top_eigenpairs(F.to(dtype), rank)
        return cls(U, s, c, rank)

    @classmethod
    def zeros(
        cls,
        n: int,
        rank: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> LowRankFactor:
        """The zero ``(n, n)`` factor (no column) that keeps ``rank`` eigenpairs."""
        U = torch.zeros(n, 0, dtype=dtype, device=device)
        return cls(U, U.new_zeros(0), U.new_zeros(()), rank)

    # -- what it represents --------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        """``(n, n)``: the shape of the matrix represented."""
        return torch.Size((self.n, self.n))

    @property
    def dtype(self) -> torch.dtype:
        return self.U.dtype

    @property
    def device(self) -> torch.device:
        return self.U.device

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(U, s, c)``: everything the factor holds."""
        return self.U, self.s, self.c

    def eigenvalues(self) -> LowRankSpectrum:
        """Its spectrum: ``s + c`` on ``U``'s columns, ``c`` on their complement."""
        return LowRankSpectrum(self.s + self.c, self.c, self.n)

    def matmul(self, X: Tensor) -> Tensor:
        """``F X`` for ``X`` ``(..., n, m)``: ``U (s * U^T X) + c X``."""
        return self.U @ (self.s[:, None] * (self.U.mT @ X)) + self.c * X

    def rmatmul(self, X: Tensor) -> Tensor:
        """``X F`` for ``X`` ``(..., m, n)`` (``= X F^T``, ``F`` symmetric)."""
        return ((X @ self.U) * self.s) @ self.U.mT + self.c * X

    def logdet(self) -> Tensor:
        """``log det F = sum log(s + c) + (n - k) log c`` (0-dim), in float32 for
        16-bit factors; ``-inf`` for a singular factor."""
        s, c = self.s.to(_work_dtype(self.dtype)), self.c.to(_work_dtype(self.dtype))
        value = (s + c).log().sum()
        rest = self.n - s.shape[0]
        return value + rest * c.log() if rest else value

    def diagonal(self) -> Tensor:
        """``diag(F)`` ``(n,)``: ``sum_j U_ij^2 s_j + c``."""
        return (self.U.square() * self.s).sum(-1) + self.c

    def to_dense(self) -> Tensor:
        """``F`` as an ``(n, n)`` matrix: memory heavy, for tests and small factors."""
        eye = torch.eye(self.n, dtype=self.dtype, device=self.device)
        return (self.U * self.s) @ self.U.mT + self.c * eye

    # -- arithmetic ----------------------------------------------------------------
    def _sum(self, other: Tensor | LowRankFactor, alpha: Number = 1) -> tuple:
        """``(U, s, c, rank)`` of ``self + alpha * other``, truncated."""
        alpha = _check_scale(alpha)
        if isinstance(other, LowRankFactor):
            _check_size(self.n, other.n)
            rank = max(self.rank, other.rank)
            work = _work_dtype(torch.promote_types(self.dtype, other.dtype))
            roots = [
                F.U.to(work) * (a * F.s.to(work)).sqrt()
                for F, a in ((self, 1), (other, alpha))
            ]
            c = self.c.to(work) + alpha * other.c.to(work)
            return (*truncate(torch.cat(roots, dim=1), c, rank), rank)
        if not isinstance(other, Tensor):
            raise TypeError(
                "Can only add a LowRankFactor, a dense (n, n) factor or a diagonal "
                f"one (a vector) to a LowRankFactor; got {type(other).__name__}."
            )
        dense = torch.diag(other) if other.ndim == 1 else other
        if dense.shape != self.shape:
            raise ValueError(
                f"Cannot add a tensor of shape {tuple(other.shape)} to a "
                f"LowRankFactor of size {self.n}."
            )
        work = _work_dtype(torch.promote_types(self.dtype, dense.dtype))
        total = self.to_dense().to(work) + alpha * dense.to(work)
        return (*_top_eigenpairs(total, self.rank), self.rank)

    def __add__(self, other: Tensor | LowRankFactor) -> LowRankFactor:
        U, s, c, rank = self._sum(other)
        return LowRankFactor(U, s, c, rank)

    __radd__ = __add__

    def add_(self, other: Tensor | LowRankFactor, alpha: Number = 1) -> LowRankFactor:
        """``self += alpha * other`` (``alpha >= 0``), truncated; returns ``self``."""
        self.U, self.s, self.c, self.rank = self._sum(other, alpha)
        return self

    def __mul__(self, scalar: Number | Tensor) -> LowRankFactor:
        a = _check_scale(scalar)
        return LowRankFactor(self.U, a * self.s, a * self.c, self.rank)

    __rmul__ = __mul__

    def __truediv__(self, scalar: Number | Tensor) -> LowRankFactor:
        return self * (1 / _check_scale(scalar))

    def mul_(self, scalar: Number | Tensor) -> LowRankFactor:
        """``self *= scalar`` (``>= 0``); returns ``self``."""
        a = _check_scale(scalar)
        self.s, self.c = a * self.s, a * self.c
        return self

    def clone(self) -> LowRankFactor:
        return LowRankFactor(self.U.clone(), self.s.clone(), self.c.clone(), self.rank)

    def detach(self) -> LowRankFactor:
        return LowRankFactor(
            self.U.detach(), self.s.detach(), self.c.detach(), self.rank
        )

    def to(self, *args, **kwargs) -> LowRankFactor:
        """The factor with its tensors moved or cast (``torch.Tensor.to``)."""
        return LowRankFactor(
            *(t.to(*args, **kwargs) for t in self.tensors()), rank=self.rank
        )

    # -- serialization -------------------------------------------------------------
    def state(self) -> dict:
        """Plain tensors and the rank, for a state dict (``from_state``)."""
        return {"U": self.U, "s": self.s, "c": self.c, "rank": self.rank}

    @classmethod
    def from_state(cls, state: dict) -> LowRankFactor:
        missing = {"U", "s", "c", "rank"} - set(state)
        if missing:
            raise ValueError(f"A LowRankFactor state needs the keys {sorted(missing)}.")
        return cls(state["U"], state["s"], state["c"], state["rank"])

    def __repr__(self) -> str:
        return (
            f"LowRankFactor(n={self.n}, k={self.U.shape[1]}, rank={self.rank}, "
            f"c={self.c.item():.4g}, dtype={self.dtype})"
        )


def _check_scale(scalar: Number | Tensor) -> Number | Tensor:
    """A scalar ``>= 0`` (a number or a one-element tensor, made 0-dim)."""
    if isinstance(scalar, Tensor):
        if scalar.numel() != 1:
            raise ValueError(
                "A LowRankFactor can only be scaled by a scalar; got a tensor of "
                f"shape {tuple(scalar.shape)}."
            )
        scalar = scalar.reshape(())
        negative = bool(scalar.detach() < 0)
    elif isinstance(scalar, Number) and not isinstance(scalar, (bool, complex)):
        negative = scalar < 0
    else:
        raise TypeError(
            f"A LowRankFactor can only be scaled by a real number; got "
            f"{type(scalar).__name__}."
        )
    if negative:
        raise ValueError(
            f"A LowRankFactor is PSD and can only be scaled by a number >= 0; got "
            f"{scalar}."
        )
    return scalar


def _check_rank(rank: int) -> None:
    """``rank``: an int >= 1, checked before any decomposition."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1; got {rank!r}.")


def _check_size(n: int, m: int) -> None:
    if n != m:
        raise ValueError(f"Cannot add factors of sizes {n} and {m}.")


def is_low_rank(F: object) -> bool:
    """Whether ``F`` is a ``LowRankFactor`` or the spectrum of one."""
    return isinstance(F, (LowRankFactor, LowRankSpectrum))


def add_factors(F: Tensor | LowRankFactor, G: Tensor | LowRankFactor):
    """``F + G`` for factors of any storage: a ``LowRankFactor`` if either is one
    (truncated), a dense matrix for a dense and a diagonal (vector) one, else the
    sum of the two tensors."""
    if is_low_rank(F) or is_low_rank(G):
        return F + G if is_low_rank(F) else G + F
    if F.ndim != G.ndim:
        return (torch.diag(F) if F.ndim == 1 else F) + (
            torch.diag(G) if G.ndim == 1 else G
        )
    return F + G


def add_factor_(F: Tensor | LowRankFactor, G: Tensor | LowRankFactor, alpha=1):
    """``F += alpha * G`` in place, ``F`` and ``G`` of the same represented shape;
    returns ``F``. A dense ``F`` takes a ``LowRankFactor`` ``G`` densely."""
    if is_low_rank(F):
        return F.add_(G, alpha=alpha)
    return F.add_(G.to_dense() if is_low_rank(G) else G, alpha=alpha)


@dataclass(frozen=True)
class LowRankSpec:
    """Which Kronecker factors to keep in low rank, and how.

    Parameters
    ----------
    rank : int
        the number of eigenpairs kept, ``r >= 1``.
    threshold : int
        factors of dimension ``n > threshold`` (and ``n > rank``: otherwise the
        low-rank form is no smaller) are kept as ``LowRankFactor``; others stay
        dense.
    """

    rank: int
    threshold: int

    def applies(self, n: int) -> bool:
        """Whether a factor of dimension ``n`` is kept in low rank."""
        return n > self.threshold and n > self.rank

    def gram(
        self, V: Tensor, dense: Callable[[Tensor], Tensor] | None = None
    ) -> Tensor | LowRankFactor:
        """``V^T V`` for side vectors ``V`` ``(m, n)``: a ``LowRankFactor`` built
        from the rows where ``applies(n)``, else ``dense(V)`` (default
        ``V.T @ V``)."""
        if self.applies(V.shape[-1]):
            return LowRankFactor.from_rows(V, self.rank)
        return V.T @ V if dense is None else dense(V)

    def truncate(self, F: Tensor | LowRankFactor) -> Tensor | LowRankFactor:
        """A dense factor ``(n, n)`` as a ``LowRankFactor`` where ``applies(n)``;
        any other factor (diagonal, small, low rank already) as it is."""
        if isinstance(F, Tensor) and F.ndim == 2 and self.applies(F.shape[0]):
            return LowRankFactor.from_dense(F, self.rank)
        return F


# -- functions of a Kronecker block's eigenvalues --------------------------------
class LowRankSpectrum:
    """The eigenvalues of a ``LowRankFactor`` as ``KronDecomposed`` holds them:
    ``values`` ``(k,)`` on the columns of its ``U`` (the eigenvectors beside it)
    and ``rest`` (0-dim) on their complement, of dimension ``n - k``. ``*`` by a
    scalar scales both."""

    def __init__(self, values: Tensor, rest: Tensor, n: int) -> None:
        self.values, self.rest, self.n = values, rest.reshape(()), n

    @property
    def shape(self) -> torch.Size:
        """``(n,)``: as many eigenvalues as the factor's size."""
        return torch.Size((self.n,))

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def __mul__(self, scalar: Number | Tensor) -> LowRankSpectrum:
        return LowRankSpectrum(scalar * self.values, scalar * self.rest, self.n)

    __rmul__ = __mul__

    def detach(self) -> LowRankSpectrum:
        return LowRankSpectrum(self.values.detach(), self.rest.detach(), self.n)

    def to(self, *args, **kwargs) -> LowRankSpectrum:
        return LowRankSpectrum(
            self.values.to(*args, **kwargs), self.rest.to(*args, **kwargs), self.n
        )

    def expanded(self) -> Tensor:
        """All ``n`` eigenvalues: ``values``, then ``rest`` repeated ``n - k``
        times (``O(n)`` memory)."""
        k = self.values.shape[0]
        return torch.cat([self.values, self.rest.expand(self.n - k)])


class EigenPart(NamedTuple):
    """One family of eigenspaces of a decomposed factor.

    ``complement=False``: the columns of ``Q`` (``(n, k)``, or None for the
    identity) with eigenvalues ``values`` ``(k,)``, each of multiplicity 1;
    ``complement=True``: the orthogonal complement of ``span(Q)``, one eigenspace
    of dimension ``multiplicity`` with the eigenvalue ``values`` ``(1,)``.
    """

    Q: Tensor | None
    values: Tensor
    complement: bool
    multiplicity: int


def eigen_parts(Q: Tensor | None, lam: Tensor | LowRankSpectrum) -> list[EigenPart]:
    """The parts of a factor with eigenpairs ``(Q, lam)``: one for a dense or a
    diagonal factor (a complete basis), two for a ``LowRankSpectrum`` (its ``U``
    and, when ``k < n``, the complement)."""
    if not isinstance(lam, LowRankSpectrum):
        return [EigenPart(Q, lam, False, 1)]
    k = lam.values.shape[0]
    parts = [EigenPart(Q, lam.values, False, 1)]
    if lam.n > k:
        parts.append(EigenPart(Q, lam.rest.reshape(1), True, lam.n - k))
    return parts


#: block eigenvalues from the factors' eigenvalues: ``f(l)`` for a single block,
#: ``f(g, a)`` (broadcast, ``(k1, 1)`` and ``(1, k2)``) for a pair
Combine = Callable[..., Tensor]


def spectral_groups(
    Qs: Sequence[Tensor | None], lams: Sequence[Tensor | LowRankSpectrum]
) -> list[tuple[EigenPart, ...]]:
    """The eigenspace groups of a block: one part per factor, every combination
    (a pair of low-rank factors: four, U/complement x U/complement). A group's
    eigenvalues are ``combine`` of its parts' values (``group_values``), each of
    multiplicity ``prod(part.multiplicity)``."""
    return list(itertools.product(*(eigen_parts(Q, l) for Q, l in zip(Qs, lams))))


def group_values(group: Sequence[EigenPart], combine: Combine) -> Tensor:
    """The block eigenvalues of one group: ``(k1, k2)`` for a pair (``(1, .)``
    along a complement), ``(k,)`` for a single block."""
    if len(group) == 1:
        return combine(group[0].values)
    return combine(group[0].values[:, None], group[1].values[None, :])


def _multiplicity(group: Sequence[EigenPart]) -> int:
    return math.prod(p.multiplicity for p in group)


def _coords(part: EigenPart, X: Tensor, axis: int) -> Tensor:
    """``X`` along ``axis`` (-2 or -1) in the part's coordinates: ``Q^T x`` for
    explicit eigenvectors, the residual ``x - Q Q^T x`` for the complement."""
    Q = part.Q
    if Q is None:
        return X
    if axis == -1:
        C = X @ Q
        return X - C @ Q.mT if part.complement else C
    C = Q.mT @ X
    return X - Q @ C if part.complement else C


def _back(part: EigenPart, Y: Tensor, axis: int) -> Tensor:
    """Coordinates of ``_coords`` back to the factor's space (``Q y``); the
    complement's residual already is in it."""
    if part.Q is None or part.complement:
        return Y
    return Y @ part.Q.mT if axis == -1 else part.Q @ Y


def spectral_matmul(
    Qs: Sequence[Tensor | None],
    lams: Sequence[Tensor | LowRankSpectrum],
    combine: Combine,
    X: Tensor,
) -> Tensor:
    """``M x`` for each row ``x`` of ``X`` ``(..., n1 n2)`` (or ``(..., n)``), with
    ``M`` the block whose eigenvalues are ``combine`` of its factors'.

    ``x`` is split, factor by factor, into its coordinates on the explicit
    eigenvectors and its residual in their complement; each of the (up to four)
    pieces is scaled by its group's eigenvalues and mapped back. Costs
    ``O(n1 n2 (k1 + k2))`` per row.
    """
    parts = [eigen_parts(Q, l) for Q, l in zip(Qs, lams)]
    if len(parts) == 1:
        out = None
        for p in parts[0]:
            term = _back(p, _coords(p, X, -1) * combine(p.values), -1)
            out = term if out is None else out + term
        return out
    dims = (lams[0].shape[0], lams[1].shape[0])
    Xm = X.reshape(*X.shape[:-1], *dims)
    out = None
    for p1 in parts[0]:
        Y1 = _coords(p1, Xm, -2)
        for p2 in parts[1]:
            Y = _coords(p2, Y1, -1) * group_values((p1, p2), combine)
            term = _back(p1, _back(p2, Y, -1), -2)
            out = term if out is None else out + term
    return out.reshape(X.shape)


def _diagonal_map(part: EigenPart) -> Tensor | None:
    """``D`` ``(n, len(values))`` with ``diag(sum_j v_j P_j) = D v`` over the part's
    projectors ``P_j`` (None: the identity)."""
    if part.Q is None:
        return None
    squares = part.Q.square()
    return (1 - squares.sum(-1, keepdim=True)) if part.complement else squares


def _map(D: Tensor | None, v: Tensor) -> Tensor:
    return v if D is None else D @ v


def spectral_diagonal(
    Qs: Sequence[Tensor | None],
    lams: Sequence[Tensor | LowRankSpectrum],
    combine: Combine,
) -> Tensor:
    """``diag(M)`` ``(n1 n2,)`` (or ``(n,)``) of the block of ``spectral_matmul``:
    per group ``D1 lam D2^T``, with ``diag(A (x) B) = diag(A) (x) diag(B)``."""
    out = None
    for group in spectral_groups(Qs, lams):
        values = group_values(group, combine)
        maps = [_diagonal_map(p) for p in group]
        if len(group) == 1:
            term = _map(maps[0], values)
        else:
            term = _map(maps[1], _map(maps[0], values).mT).mT.flatten()
        out = term if out is None else out + term
    return out


def spectral_logdet(
    lams: Sequence[Tensor | LowRankSpectrum], combine: Combine
) -> Tensor:
    """``log det M = sum_groups multiplicity * sum log lam`` (0-dim)."""
    groups = spectral_groups([None] * len(lams), lams)
    return sum(_multiplicity(g) * group_values(g, combine).log().sum() for g in groups)


def spectral_grid(lams: Sequence[Tensor | LowRankSpectrum], combine: Combine) -> Tensor:
    """All ``n1 n2`` (or ``n``) eigenvalues of the block, complements repeated:
    ``(n1, n2)`` (or ``(n,)``), in the order of the eigenbasis ``[U, U_perp]``
    (``O(n1 n2)`` memory: one value per parameter)."""
    full = [l.expanded() if isinstance(l, LowRankSpectrum) else l for l in lams]
    if len(full) == 1:
        return combine(full[0])
    return combine(full[0][:, None], full[1][None, :])


__all__ = [
    "LowRankFactor",
    "LowRankSpectrum",
    "LowRankSpec",
    "EigenPart",
    "truncate",
    "is_low_rank",
    "add_factors",
    "add_factor_",
    "eigen_parts",
    "spectral_groups",
    "group_values",
    "spectral_matmul",
    "spectral_diagonal",
    "spectral_logdet",
    "spectral_grid",
]
