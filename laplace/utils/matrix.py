"""Block-diagonal Kronecker-factored curvature matrices.

A network with parameter tensors ("layers") ``theta_1, ..., theta_L`` gets a
block-diagonal curvature ``H = blockdiag(H_1, ..., H_L)`` of size ``(P, P)``, with the
blocks in ``model.parameters()`` order and each parameter flattened row-major (as
``torch.nn.utils.parameters_to_vector`` does). A block is either

* a Kronecker pair ``H_l = F1 (x) F2`` of an ``(n1, n1)`` and an ``(n2, n2)`` factor:
  the parameter flattened row-major and viewed as an ``(n1, n2)`` matrix ``X``, so
  that ``(F1 (x) F2) vec(X) = vec(F1 X F2^T)``. ``Kron.init_from_model`` and the
  built-in backends use ``[G, A]`` for a weight of shape ``(p_out, ...)``: ``G``
  ``(p_out, p_out)`` on the output side, ``A`` ``(p_in, p_in)`` on the input side,
  ``p_in = prod(...)``; another split (e.g. ``[A, G]`` for a weight stored as
  ``(in, out)``) means the same by the rule above; or
* a single block ``H_l = B`` of shape ``(n, n)`` (biases, norm weights, ...).

Any factor may be *diagonal*: a 1-D tensor ``d`` stands for ``diag(d)``, which is
never formed. ``[d]`` is a diagonal block (a large parameter without Kronecker
structure) and ``[a, G]`` is ``diag(a) (x) G`` (e.g. an embedding whose input-side
factor is the diagonal of token counts); both factors of a pair may be diagonal.
Every operation below works on the factors (diagonal ones as vectors) and never
forms a Kronecker product, except in the ``to_matrix`` methods meant for testing.

A large factor may also be *low rank plus isotropic*, ``F = U diag(s) U^T + c I``
(``laplace.utils.lowrank_factor.LowRankFactor``, ``O(r n)`` memory). The complement
of ``span(U)`` is one eigenspace of ``F``, so the eigenbasis of a block is still a
Kronecker product of the factors' eigenbases, each ``U`` plus a complement that is
never formed: every operation below stays exact for that representation, damped
or not (``laplace.utils.lowrank_factor`` holds the formulas; this module only
dispatches to them).

``Kron`` holds the factors; ``KronDecomposed`` holds their eigenpairs plus
additive ``deltas`` (e.g. a prior precision) and supports arbitrary real powers.
The eigenvalues of a diagonal factor are its entries and its eigenvectors the
identity, stored as ``None`` (which ``laplace.predictive.glm.rotate`` also reads
as the identity).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from numbers import Number

import torch
from torch import nn

from laplace.utils.lowrank_factor import (
    LowRankFactor,
    LowRankSpec,
    add_factor_,
    add_factors,
    is_low_rank,
    spectral_diagonal,
    spectral_grid,
    spectral_logdet,
    spectral_matmul,
)

#: half-precision dtypes have no linear algebra (eigh, Cholesky, solves) on the CPU
_HALF = (torch.float16, torch.bfloat16)


def linalg_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype linear algebra runs in for tensors of ``dtype``: float32 for
    float16 and bfloat16 (which have no decompositions on the CPU and too few
    digits for them anyway), ``dtype`` itself otherwise. Results go back to
    ``dtype``."""
    return torch.float32 if dtype in _HALF else dtype


__all__ = ["Kron", "KronDecomposed", "damped_factor_eigenvalues"]

Tensor = torch.Tensor
_Blocks = list[list[Tensor]]


def _check_blocks(blocks: Sequence[Sequence[Tensor]], name: str) -> _Blocks:
    """Return ``blocks`` as a list of lists, checking each has one or two entries."""
    out = [list(block) for block in blocks]
    for i, block in enumerate(out):
        if len(block) not in (1, 2):
            raise ValueError(
                f"{name}[{i}] must hold 1 (single block) or 2 (Kronecker pair) "
                f"tensors, got {len(block)}."
            )
    return out


def _check_factors(kfacs: _Blocks) -> None:
    """Every factor is a vector (a diagonal factor), a square matrix or a
    ``LowRankFactor``."""
    for i, block in enumerate(kfacs):
        for j, F in enumerate(block):
            if isinstance(F, LowRankFactor):
                continue
            if not isinstance(F, Tensor) or not (
                F.ndim == 1 or (F.ndim == 2 and F.shape[0] == F.shape[1])
            ):
                got = tuple(F.shape) if isinstance(F, Tensor) else type(F).__name__
                raise ValueError(
                    f"kfacs[{i}][{j}] must be a square matrix (n, n), a vector "
                    f"(n,) standing for its diagonal or a LowRankFactor; got {got}."
                )


def _is_diag(F: Tensor | LowRankFactor) -> bool:
    """Whether a factor is stored as its diagonal: a vector ``d`` for ``diag(d)``."""
    return isinstance(F, Tensor) and F.ndim == 1


def _dims(block: Sequence[Tensor]) -> tuple[int, ...]:
    """Sizes ``(n1, n2)`` or ``(n,)`` of a block's factors (or eigenvalue vectors)."""
    return tuple(F.shape[0] for F in block)


def _block_sizes(blocks: _Blocks) -> list[int]:
    """Number of parameters of each block: ``n1 * n2`` for a pair, else ``n``."""
    return [math.prod(_dims(block)) for block in blocks]


def _dense(F: Tensor | None, n: int, like: Tensor) -> Tensor:
    """A factor as a dense ``(n, n)`` matrix: ``diag(F)`` for a vector, the identity
    for ``None`` (on ``like``'s device and dtype). For testing only."""
    if F is None:
        return torch.eye(n, dtype=like.dtype, device=like.device)
    if isinstance(F, LowRankFactor):
        return F.to_dense()
    # contiguous: torch.kron of an identity and a strided eigh basis fails
    return torch.diag(F) if _is_diag(F) else F.contiguous()


def _left(F: Tensor | None, X: Tensor) -> Tensor:
    """``F X`` over the second-to-last axis of ``X``; ``None`` is the identity."""
    if F is None:
        return X
    if isinstance(F, LowRankFactor):
        return F.matmul(X)
    return F[:, None] * X if _is_diag(F) else F @ X


def _right(X: Tensor, F: Tensor | None) -> Tensor:
    """``X F^T`` over the last axis of ``X``; ``None`` is the identity."""
    if F is None:
        return X
    if isinstance(F, LowRankFactor):
        return F.rmatmul(X)
    return X * F if _is_diag(F) else X @ F.mT


def _block_matmul(
    factors: Sequence[Tensor | None], X: Tensor, dims: tuple[int, ...]
) -> Tensor:
    """``K x`` for each row ``x`` of ``X`` (``(..., n)``) with ``K`` the block of
    ``factors`` (dense, diagonal or ``None`` for the identity) of sizes ``dims``.

    A pair ``(F1, F2)`` reshapes rows to ``(n1, n2)`` and computes ``F1 X F2^T``.
    """
    if len(factors) == 1:
        return _right(X, factors[0])
    Xm = X.reshape(*X.shape[:-1], *dims)
    return _right(_left(factors[0], Xm), factors[1]).reshape(X.shape)


def _transpose(Q: Tensor | None) -> Tensor | None:
    return None if Q is None else Q.mT


def _square(Q: Tensor | None) -> Tensor | None:
    """Entrywise square of an eigenbasis (the identity's is itself)."""
    return None if Q is None else Q.square()


def _eigen_matmul(
    Qs: Sequence[Tensor | None], lam: Tensor, X: Tensor, dims: tuple[int, ...]
) -> Tensor:
    """``Q diag(lam) Q^T x`` for each row ``x`` of ``X``, with ``Q = Q1 (x) Q2``."""
    rotated = _block_matmul([_transpose(Q) for Q in Qs], X, dims)
    return _block_matmul(Qs, rotated * lam.flatten(), dims)


def _factor_logdet(F: Tensor | LowRankFactor) -> Tensor:
    """``log det F`` (``sum log d`` for a diagonal factor), in ``linalg_dtype``."""
    if isinstance(F, LowRankFactor):
        return F.logdet()
    F = F.to(linalg_dtype(F.dtype))
    return F.log().sum() if _is_diag(F) else torch.logdet(F)


def _factor_diagonal(F: Tensor | LowRankFactor) -> Tensor:
    if isinstance(F, LowRankFactor):
        return F.diagonal()
    return F if _is_diag(F) else F.diagonal()


def _factor_eigh(
    F: Tensor, computed_in: torch.dtype | None = None
) -> tuple[Tensor | None, Tensor]:
    """Eigenpairs ``(Q, l)`` of a PSD factor, ``l`` clamped at 0; a diagonal factor
    gives ``(None, d)`` (``None``: the identity). Float16/bfloat16 factors are
    decomposed in float32, the result cast back. Warns about clearly negative
    eigenvalues (more than the round-off of ``computed_in``, the dtype the factor's
    entries were computed in: by default its own). A ``LowRankFactor`` is its own
    eigendecomposition: ``(U, LowRankSpectrum)``."""
    if isinstance(F, LowRankFactor):
        return F.U, F.eigenvalues()
    if _is_diag(F):
        Q, lam = None, F
    else:
        lam, Q = torch.linalg.eigh(F.to(linalg_dtype(F.dtype)))
        lam, Q = lam.to(F.dtype), Q.to(F.dtype)
    tol = torch.finfo(computed_in or lam.dtype).eps ** 0.5
    if lam.numel() and bool((lam < -tol * lam.abs().max()).any()):
        warnings.warn(
            "Kronecker factor has clearly negative eigenvalues "
            f"(min {lam.min().item():.3g}); clamping them to 0.",
            stacklevel=3,
        )
    return Q, lam.clamp(min=0)


def _as_scalar(scalar: Number | Tensor) -> Number | Tensor:
    """Validate a multiplier: a real number or a one-element tensor (made 0-dim)."""
    if isinstance(scalar, Tensor):
        if scalar.numel() != 1:
            raise ValueError(
                f"Can only multiply by a scalar, got a tensor of shape "
                f"{tuple(scalar.shape)}."
            )
        return scalar.reshape(())
    if isinstance(scalar, Number) and not isinstance(scalar, complex):
        return scalar
    raise TypeError(f"Can only multiply by a scalar, got {type(scalar).__name__}.")


def _apply_blockwise(
    W: Tensor, sizes: list[int], fns: list[Callable[[Tensor], Tensor]]
) -> Tensor:
    """Apply ``fns[l]`` to the columns of ``W`` that belong to block ``l``.

    ``W`` is ``(batch, k, P)`` or ``(k, P)``; ``fns[l]`` maps ``(..., sizes[l])`` to
    the same shape, so the result has the shape of ``W``.
    """
    if W.ndim not in (2, 3):
        raise ValueError(
            f"W must have shape (batch, k, P) or (k, P), got {tuple(W.shape)}."
        )
    if W.shape[-1] != sum(sizes):
        raise ValueError(
            f"The last dimension of W ({W.shape[-1]}) must equal the number of "
            f"parameters ({sum(sizes)})."
        )
    parts = torch.split(W, sizes, dim=-1)
    return torch.cat([fn(part) for fn, part in zip(fns, parts, strict=True)], dim=-1)


def damped_factor_eigenvalues(
    l_G: Tensor, l_A: Tensor, delta: Tensor, scale: Tensor | float = 1.0
) -> tuple[Tensor, Tensor]:
    r"""Eigenvalues of the two factors of the damped ``c G (x) A + d I``.

    The damped form of a scaled pair is

    $$
        c \, (G + \sqrt{d/c} \, I) \otimes (A + \sqrt{d/c} \, I)
        = (c G + \sqrt{c d} \, I) \otimes (A + \sqrt{d/c} \, I),
    $$

    which expands to ``c G (x) A + sqrt(c d) (G (x) I + I (x) A) + d I``: it depends
    on the represented matrix ``c G (x) A`` only, not on which factor holds ``c``,
    and is ``(G + sqrt(d)) (x) (A + sqrt(d))`` for ``c = 1``.

    Parameters
    ----------
    l_G : torch.Tensor
        ``(p_out,)`` eigenvalues of the scaled output-side factor ``c G``
    l_A : torch.Tensor
        ``(p_in,)`` eigenvalues of ``A``
    delta : torch.Tensor
        the addend ``d`` (0-dim), e.g. a prior precision
    scale : float or torch.Tensor, default=1
        ``c > 0``, already applied to ``l_G``

    Returns
    -------
    tuple of torch.Tensor
        ``(l_G + sqrt(c d), l_A + sqrt(d / c))``: their outer product is the
        spectrum of the damped block.
    """
    return l_G + (scale * delta).sqrt(), l_A + (delta / scale).sqrt()


class Kron:
    """Block-diagonal curvature whose blocks are Kronecker pairs or single blocks,
    any factor dense or diagonal (see the module docstring).

    Parameters
    ----------
    kfacs : list[list[torch.Tensor]]
        One entry per parameter tensor: a pair ``[F1, F2]`` representing
        ``F1 (x) F2`` over the parameter viewed row-major as ``(n1, n2)`` (``[G, A]``,
        output side first, from ``init_from_model`` and the built-in backends), or
        a single block ``[B]``. Each factor is a square matrix ``(n, n)``, a vector
        ``(n,)`` standing for the diagonal matrix ``diag(d)`` (``[d]`` is a diagonal
        block, ``[a, G]`` is ``diag(a) (x) G``) or a ``LowRankFactor``
        ``U diag(s) U^T + c I`` (``laplace.utils.lowrank_factor``).
    averaged : list[int or None], optional
        Per block, the position of the factor that is an average over the data set
        rather than a sum (``A`` of ``[G, A]``), or None where all factors are sums.
        Only ``KronLaplace.fit(override=False)`` reads it, to combine two data sets
        (sum the other factors, average this one weighted by the data sizes).
        Defaults to ``1`` for pairs (``[G, A]``) and None for single blocks.
    """

    def __init__(
        self,
        kfacs: Sequence[Sequence[Tensor]],
        averaged: Sequence[int | None] | None = None,
    ) -> None:
        self.kfacs = _check_blocks(kfacs, "kfacs")
        _check_factors(self.kfacs)
        if averaged is None:
            averaged = [1 if len(block) == 2 else None for block in self.kfacs]
        self.averaged = list(averaged)
        if len(self.averaged) != len(self.kfacs) or any(
            i is not None and i not in range(len(block))
            for i, block in zip(self.averaged, self.kfacs)
        ):
            raise ValueError(
                "averaged must hold one entry per block, each None or the position "
                f"of one of the block's factors; got {self.averaged} for blocks of "
                f"{[len(b) for b in self.kfacs]} factors."
            )

    @staticmethod
    def init_from_model(
        model: nn.Module | Iterable[nn.Parameter],
        device: torch.device | str | None,
        dtype: torch.dtype | None = None,
        low_rank: LowRankSpec | None = None,
    ) -> Kron:
        """Zero factors matching the parameters that require grad.

        A parameter of shape ``(p_out, *rest)`` with at least two dimensions gets the
        pair ``[zeros(p_out, p_out), zeros(p_in, p_in)]`` with ``p_in = prod(rest)``;
        a parameter with fewer dimensions gets one ``(n, n)`` block, ``n = numel``.

        Parameters
        ----------
        model : nn.Module or iterable of parameters, e.g. ``model.parameters()``
        device : torch.device
            Device of the factors; ``None`` keeps each parameter's device.
        dtype : torch.dtype, optional
            Dtype of the factors; defaults to each parameter's dtype.
        low_rank : laplace.utils.lowrank_factor.LowRankSpec, optional
            factors of the dimensions it applies to are zero ``LowRankFactor``s
            (no ``(n, n)`` matrix is formed).

        Returns
        -------
        kron : Kron
        """
        params = model.parameters() if isinstance(model, nn.Module) else model
        kfacs = []
        for p in params:
            if not p.requires_grad:
                continue
            kw = {"device": p.device if device is None else device}
            kw["dtype"] = p.dtype if dtype is None else dtype

            def zeros(n: int, kw=kw) -> Tensor | LowRankFactor:
                if low_rank is not None and low_rank.applies(n):
                    return LowRankFactor.zeros(n, low_rank.rank, **kw)
                return torch.zeros(n, n, **kw)

            if p.ndim >= 2:
                kfacs.append([zeros(p.shape[0]), zeros(p.numel() // p.shape[0])])
            else:
                kfacs.append([zeros(p.numel())])
        return Kron(kfacs)

    def __len__(self) -> int:
        return len(self.kfacs)

    def block_sizes(self) -> list[int]:
        """Number of parameters of each block (``n1 * n2`` for a pair, else ``n``)."""
        return _block_sizes(self.kfacs)

    def clone(self) -> Kron:
        """A copy whose factors are new tensors (``torch.Tensor.clone``), so that
        adding to one in place (``+=``) leaves the other as it was."""
        return Kron([[f.clone() for f in block] for block in self.kfacs], self.averaged)

    def __add__(self, other: Kron) -> Kron:
        """Add factor by factor: ``[F1 + F1', F2 + F2']`` and ``[B + B']`` (diagonal
        factors as vectors; a sum with a ``LowRankFactor`` is one, truncated to its
        rank).

        This accumulates factors over batches; it is *not* the sum of the two
        Kronecker products, ``F1 (x) F2 + F1' (x) F2'``.
        """
        self._check_addable(other)
        return Kron(
            [
                [add_factors(f, g) for f, g in zip(a, b, strict=True)]
                for a, b in zip(self.kfacs, other.kfacs, strict=True)
            ],
            self.averaged,
        )

    def __iadd__(self, other: Kron) -> Kron:
        """Accumulate ``other`` into these factors in place (as ``+`` does)."""
        self._check_addable(other)
        for a, b in zip(self.kfacs, other.kfacs, strict=True):
            for f, g in zip(a, b, strict=True):
                add_factor_(f, g)
        return self

    def _check_addable(self, other: Kron) -> None:
        if not isinstance(other, Kron):
            raise TypeError(f"Can only add Kron to Kron, got {type(other).__name__}.")
        if self._shapes() != other._shapes():
            raise ValueError(
                "Cannot add Kron objects with different factor shapes (a vector is a "
                f"diagonal factor): {self._shapes()} vs {other._shapes()}."
            )
        if self.averaged != other.averaged:
            raise ValueError(
                "Cannot add Kron objects whose averaged factors differ: "
                f"{self.averaged} vs {other.averaged}."
            )

    def _shapes(self) -> list[list[tuple[int, ...]]]:
        return [[tuple(f.shape) for f in block] for block in self.kfacs]

    def __mul__(self, scalar: Number | Tensor) -> Kron:
        """Scale the matrix: ``c (F1 (x) F2) = (c F1) (x) F2`` and ``c B``."""
        scalar = _as_scalar(scalar)
        return Kron(
            [[scalar * block[0], *block[1:]] for block in self.kfacs], self.averaged
        )

    __rmul__ = __mul__

    def decompose(
        self,
        damping: bool = False,
        known: Sequence[Sequence[tuple[Tensor | None, Tensor] | None]] | None = None,
        computed_in: torch.dtype | None = None,
    ) -> KronDecomposed:
        """Eigendecompose every factor, ``F = Q diag(l) Q^T`` (``torch.linalg.eigh``;
        float16/bfloat16 factors are decomposed in float32, the result cast back).
        A diagonal factor ``d`` gives ``l = d`` and ``Q = None`` (the identity); a
        ``LowRankFactor`` is its own decomposition, ``Q = U`` ``(n, k)`` and ``l`` a
        ``LowRankSpectrum`` (``s + c`` on ``U``, ``c`` on its complement).

        The factors are PSD by construction, so eigenvalues are clamped at zero to
        remove round-off; a warning is emitted if a clearly negative one is found.

        Parameters
        ----------
        damping : bool, default=False
            Use the damped combination with deltas, see ``KronDecomposed``.
        known : list[list[tuple or None]], optional
            Per block and factor, an eigenpair ``(Q, l)`` computed before (e.g. of a
            factor that several curvatures share), used as it is; None where the
            factor is to be decomposed.
        computed_in : torch.dtype, optional
            the dtype the factors' entries were computed in, if less precise than
            theirs (a 16-bit model's, summed in float32): negative eigenvalues
            within its round-off are clamped without a warning.

        Returns
        -------
        kron_decomposed : KronDecomposed
        """
        done: list[tuple[Tensor, tuple]] = []  # equal factors are decomposed once

        def eigh_once(F: Tensor | LowRankFactor) -> tuple:
            if isinstance(F, LowRankFactor):
                return _factor_eigh(F)
            for G, pair in done:
                if G.shape == F.shape and G.dtype == F.dtype and torch.equal(G, F):
                    return pair
            pair = _factor_eigh(F, computed_in)
            done.append((F, pair))
            return pair

        pairs = [
            [
                eigh_once(F) if known is None or known[i][j] is None else known[i][j]
                for j, F in enumerate(block)
            ]
            for i, block in enumerate(self.kfacs)
        ]
        eigvecs = [[Q for Q, _ in block] for block in pairs]
        eigvals = [[lam for _, lam in block] for block in pairs]
        return KronDecomposed(eigvecs, eigvals, damping=damping)

    def bmm(self, W: Tensor, exponent: float = 1) -> Tensor:
        """Compute ``H w`` for every row ``w`` of ``W``, block by block.

        Parameters
        ----------
        W : torch.Tensor
            ``(batch, k, P)`` or ``(k, P)``.
        exponent : float, default=1
            Must be 1; decompose first (``decompose``) for other powers.

        Returns
        -------
        SW : torch.Tensor
            Same shape as ``W``, ``SW[b, c] = H W[b, c]``.
        """
        if exponent != 1:
            raise ValueError(
                f"Kron.bmm only supports exponent=1, got {exponent}; use "
                "Kron.decompose().bmm(W, exponent) for other exponents."
            )
        fns = [lambda X, b=b: _block_matmul(b, X, _dims(b)) for b in self.kfacs]
        return _apply_blockwise(W, self.block_sizes(), fns)

    def logdet(self) -> Tensor:
        """Log determinant of ``H`` (0-dim), summed over the blocks.

        A pair contributes ``log det(F1 (x) F2) = n2 log det F1 + n1 log det F2``,
        a diagonal factor ``sum log d``. Float16/bfloat16 factors are taken in
        float32 (``linalg_dtype``), the sum returned in their dtype. An empty
        ``Kron`` has log determinant 0 (in the default dtype, on the CPU: there is
        no factor to take them from).
        """
        if not self.kfacs:  # no factor to take a dtype or device from
            return torch.zeros((), dtype=torch.get_default_dtype())
        terms = []
        for block in self.kfacs:
            if len(block) == 1:
                terms.append(_factor_logdet(block[0]))
            else:
                (F1, F2), (n1, n2) = block, _dims(block)
                terms.append(n2 * _factor_logdet(F1) + n1 * _factor_logdet(F2))
        return torch.stack(terms).sum().to(self.kfacs[0][0].dtype)

    def diag(self) -> Tensor:
        """Diagonal of ``H``, ``(P,)``; ``diag(F1 (x) F2) = diag(F1) (x) diag(F2)``."""
        diags = []
        for block in self.kfacs:
            d = [_factor_diagonal(F) for F in block]
            diags.append(torch.outer(*d).flatten() if len(d) == 2 else d[0])
        return torch.cat(diags)

    def to_matrix(self) -> Tensor:
        """Dense ``(P, P)`` block-diagonal matrix. Memory heavy: for testing only."""
        blocks = []
        for block in self.kfacs:
            dense = [_dense(F, F.shape[0], F) for F in block]
            blocks.append(torch.kron(*dense) if len(dense) == 2 else dense[0])
        return torch.block_diag(*blocks)


class KronDecomposed:
    """Eigendecomposed ``Kron`` plus additive per-block deltas.

    Block ``l`` with eigenpairs ``(Q_G, l_G), (Q_A, l_A)`` and delta ``d`` represents
    ``Q diag(lam) Q^T`` with ``Q = Q_G (x) Q_A`` and

    * ``lam = l_G (x) l_A + d`` (``damping=False``): the exact ``G (x) A + d I``;
    * ``damping=True``: the damped ``(G + sqrt(d) I) (x) (A + sqrt(d) I)``; after
      scaling by ``c`` (``c * K``) the damped form of ``c G (x) A + d I``,
      ``c (G + sqrt(d/c) I) (x) (A + sqrt(d/c) I)`` (``damped_factor_eigenvalues``).
      Adding deltas and scaling keep the damping.

    A single block ``(Q, l)`` always gives ``lam = l + d``. Powers act on ``lam``.
    Deltas can be added; other Kron or KronDecomposed cannot. Any eigenbasis may be
    ``None``, the identity: that of a diagonal factor (``Kron.decompose``), whose
    eigenvalues are its entries (neither sorted nor formed into a matrix).

    A low-rank factor ``U diag(s) U^T + c I`` (``LowRankFactor``) has the
    eigenvectors ``U`` ``(n, k)`` and, as eigenvalues, a ``LowRankSpectrum``:
    ``s + c`` on ``U`` and ``c`` on the complement of ``span(U)`` (multiplicity
    ``n - k``, its basis never formed). A block with such a factor is applied by
    splitting each vector into its part in ``span(U)`` and the residual (for a
    pair, four groups of eigenvalues: U or complement on each side;
    ``laplace.utils.lowrank_factor.spectral_matmul``), exactly, at any exponent,
    damped or not. Code that reads ``eigenvalues`` directly must handle a
    ``LowRankSpectrum`` (``eigen_parts`` gives the multiplicities) or refuse it.

    Parameters
    ----------
    eigenvectors : list[list[torch.Tensor or None]]
        ``[Q_G, Q_A]`` or ``[Q]`` per block, mirroring ``Kron.kfacs``; ``None`` for
        the identity; ``U`` ``(n, k)`` for a low-rank factor.
    eigenvalues : list[list[torch.Tensor or LowRankSpectrum]]
        ``[l_G, l_A]`` or ``[l]`` per block.
    deltas : torch.Tensor, optional
        Added to each block, e.g. a prior precision: a scalar (shape ``()`` or
        ``(1,)``) or one value per block, shape ``(n_blocks,)``. Defaults to zeros.
    damping : bool, default=False
        Combine deltas with the Kronecker pairs multiplicatively, as above.
    """

    def __init__(
        self,
        eigenvectors: Sequence[Sequence[Tensor]],
        eigenvalues: Sequence[Sequence[Tensor]],
        deltas: Tensor | float | None = None,
        damping: bool = False,
    ) -> None:
        self.eigenvectors = _check_blocks(eigenvectors, "eigenvectors")
        self.eigenvalues = _check_blocks(eigenvalues, "eigenvalues")
        if [len(b) for b in self.eigenvectors] != [len(b) for b in self.eigenvalues]:
            raise ValueError(
                "eigenvectors and eigenvalues must have the same structure."
            )
        for i, (Qs, lams) in enumerate(zip(self.eigenvectors, self.eigenvalues)):
            for j, (Q, lam) in enumerate(zip(Qs, lams)):
                shape = (lam.n, lam.values.shape[0]) if is_low_rank(lam) else None
                if shape is not None and (Q is None or tuple(Q.shape) != shape):
                    got = None if Q is None else tuple(Q.shape)
                    raise ValueError(
                        f"eigenvectors[{i}][{j}] of a LowRankSpectrum must be U of "
                        f"shape {shape}; got {got}."
                    )
        self.damping = damping
        self.deltas = self._check_deltas(0.0 if deltas is None else deltas)
        #: the product of the scalars this was multiplied by (``*``), which the
        #: damped form needs apart from the eigenvalues
        self.scale: Tensor | float = 1.0

    def _check_deltas(self, deltas: Tensor | float) -> Tensor:
        """Return ``deltas`` as a ``(n_blocks,)`` tensor on the factors' device."""
        ref = self.eigenvalues[0][0] if self.eigenvalues else torch.empty(0)
        deltas = torch.as_tensor(deltas, dtype=ref.dtype, device=ref.device)
        n = len(self)
        if deltas.numel() == 1 and deltas.ndim <= 1:
            return deltas.reshape(1).expand(n)
        if deltas.shape != (n,):
            raise ValueError(
                f"deltas must be a scalar or have shape ({n},) (one per block), got "
                f"shape {tuple(deltas.shape)}."
            )
        return deltas

    def __len__(self) -> int:
        return len(self.eigenvectors)

    def block_sizes(self) -> list[int]:
        """Number of parameters of each block (``n1 * n2`` for a pair, else ``n``)."""
        return _block_sizes(self.eigenvalues)

    def __add__(self, deltas: Tensor | float) -> KronDecomposed:
        """Copy with ``deltas`` (scalar or ``(n_blocks,)``) added to its deltas."""
        if isinstance(deltas, (Kron, KronDecomposed)):
            raise TypeError(
                "Can only add scalar or per-block deltas to KronDecomposed, not "
                f"{type(deltas).__name__}; add Kron objects before decomposing."
            )
        return self._like(
            self.eigenvectors,
            self.eigenvalues,
            self.deltas + self._check_deltas(deltas),
            self.scale,
        )

    __radd__ = __add__

    def _like(self, eigenvectors, eigenvalues, deltas, scale) -> KronDecomposed:
        out = KronDecomposed(eigenvectors, eigenvalues, deltas, self.damping)
        out.scale = scale
        return out

    def __mul__(self, scalar: Number | Tensor) -> KronDecomposed:
        """Scale the curvature part only: ``c H + d``, deltas unchanged.

        For a pair ``l_G`` is scaled, for a single block ``l``.
        """
        scalar = _as_scalar(scalar)
        if self.damping and not bool(torch.as_tensor(scalar) > 0):
            raise ValueError(
                f"A damped KronDecomposed can only be scaled by a positive number; "
                f"got {scalar}."
            )
        eigvals = [[scalar * block[0], *block[1:]] for block in self.eigenvalues]
        return self._like(self.eigenvectors, eigvals, self.deltas, scalar * self.scale)

    __rmul__ = __mul__

    def detach(self) -> KronDecomposed:
        """Copy with all tensors detached from the autograd graph."""
        scale = self.scale
        return self._like(
            [[None if Q is None else Q.detach() for Q in b] for b in self.eigenvectors],
            [[lam.detach() for lam in b] for b in self.eigenvalues],
            self.deltas.detach(),
            scale.detach() if isinstance(scale, Tensor) else scale,
        )

    @property
    def low_rank(self) -> bool:
        """Whether a factor is low rank (``LowRankSpectrum`` eigenvalues)."""
        return any(self._low_rank_block(i) for i in range(len(self)))

    def _low_rank_block(self, i: int) -> bool:
        return any(is_low_rank(lam) for lam in self.eigenvalues[i])

    def _combine(self, i: int, exponent: float = 1) -> Callable[..., Tensor]:
        """``lam ** exponent`` of block ``i`` as a function of its factors'
        eigenvalues (broadcast against each other): ``l + d`` for a single block,
        ``g a + d`` for a pair, ``damped_factor_eigenvalues`` multiplied when
        damped."""
        delta, n_factors = self.deltas[i], len(self.eigenvalues[i])

        def combine(*values: Tensor) -> Tensor:
            if n_factors == 1:
                lam = values[0] + delta
            elif self.damping:
                g, a = damped_factor_eigenvalues(*values, delta, self.scale)
                lam = g * a
            else:
                lam = values[0] * values[1] + delta
            return lam if exponent == 1 else lam**exponent

        return combine

    def block_eigenvalues(self, i: int, exponent: float = 1) -> Tensor:
        """``lam ** exponent`` of block ``i``: shape ``(n1, n2)`` or ``(n,)``. With a
        low-rank factor all of them, the complement's repeated (``spectral_grid``:
        one value per parameter of the block), in the order of the eigenbasis
        ``[U, U_perp]`` whose complement is never formed."""
        vals, combine = self.eigenvalues[i], self._combine(i, exponent)
        if self._low_rank_block(i):
            return spectral_grid(vals, combine)
        if len(vals) == 1:
            return combine(vals[0])
        return combine(vals[0][:, None], vals[1][None, :])

    def logdet(self) -> Tensor:
        """Log determinant ``sum log lam`` over all blocks, deltas included (0-dim);
        a low-rank factor's complement counts with its multiplicity."""
        return sum(
            (
                spectral_logdet(self.eigenvalues[i], self._combine(i))
                if self._low_rank_block(i)
                else self.block_eigenvalues(i).log().sum()
                for i in range(len(self))
            ),
            start=torch.zeros((), dtype=self.deltas.dtype, device=self.deltas.device),
        )

    def bmm(self, W: Tensor, exponent: float = -1) -> Tensor:
        """Compute ``M^exponent w`` for every row ``w`` of ``W``, in the eigenbasis.

        Parameters
        ----------
        W : torch.Tensor
            ``(batch, k, P)`` or ``(k, P)``.
        exponent : float, default=-1
            Any real power of the represented matrix ``M``.

        Returns
        -------
        SW : torch.Tensor
            Same shape as ``W``.
        """
        fns = [
            lambda X, i=i: self._apply_block(i, X, exponent) for i in range(len(self))
        ]
        return _apply_blockwise(W, self.block_sizes(), fns)

    def _apply_block(self, i: int, X: Tensor, exponent: float) -> Tensor:
        Qs, vals = self.eigenvectors[i], self.eigenvalues[i]
        if self._low_rank_block(i):
            return spectral_matmul(Qs, vals, self._combine(i, exponent), X)
        lam = self.block_eigenvalues(i, exponent)
        return _eigen_matmul(Qs, lam, X, _dims(vals))

    def inv_square_form(self, W: Tensor) -> Tensor:
        """``W M^-1 W^T`` per batch element, computed as ``V V^T``, ``V = W M^-1/2``.

        Parameters
        ----------
        W : torch.Tensor
            ``(batch, k, P)`` or ``(k, P)``, e.g. Jacobians.

        Returns
        -------
        torch.Tensor
            ``(batch, k, k)`` or ``(k, k)``, symmetric PSD.
        """
        V = self.bmm(W, exponent=-0.5)
        return V @ V.mT

    def diag(self, exponent: float = 1) -> Tensor:
        """Diagonal of ``M^exponent``, shape ``(P,)``, without forming blocks.

        ``diag(Q diag(lam) Q^T) = (Q * Q) lam``; for ``Q = Q_G (x) Q_A``,
        ``Q * Q = Q_G^2 (x) Q_A^2``: the block product with the squared bases.
        """
        diags = []
        for i, Qs in enumerate(self.eigenvectors):
            vals = self.eigenvalues[i]
            if self._low_rank_block(i):
                combine = self._combine(i, exponent)
                diags.append(spectral_diagonal(Qs, vals, combine))
                continue
            lam = self.block_eigenvalues(i, exponent).flatten()
            squares = [_square(Q) for Q in Qs]
            diags.append(_block_matmul(squares, lam, _dims(vals)))
        return torch.cat(diags)

    def to_matrix(self, exponent: float = 1) -> Tensor:
        """Dense ``(P, P)`` block-diagonal ``M^exponent``; memory heavy, for tests."""
        blocks = []
        for i, Qs in enumerate(self.eigenvectors):
            vals = self.eigenvalues[i]
            if self._low_rank_block(i):  # the complement's basis is never formed
                eye = torch.eye(
                    math.prod(_dims(vals)),
                    dtype=self.deltas.dtype,
                    device=self.deltas.device,
                )
                blocks.append(self._apply_block(i, eye, exponent))
                continue
            dense = [_dense(Q, l.shape[0], l) for Q, l in zip(Qs, vals, strict=True)]
            Q = torch.kron(*dense) if len(dense) == 2 else dense[0]
            lam = self.block_eigenvalues(i, exponent).flatten()
            blocks.append((Q * lam) @ Q.mT)
        return torch.block_diag(*blocks)
