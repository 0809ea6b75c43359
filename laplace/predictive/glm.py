r"""The functional variance ``J P^-1 J^T`` layer by layer, without the Jacobian.

For a weight ``W`` ``(out, in)`` of a linear layer the Jacobian of output ``c`` is
``J_c = sum_t g_{ct} a_t^T`` (see
``laplace.curvature.backprop_factor.jacobian_factors``).
If the posterior precision of ``W`` is ``(Q_out (x) Q_in) diag(lam) (Q_out (x) Q_in)^T``
(KFAC in its eigenbasis, or a diagonal with identity bases) then, with the rotated
factors ``g^ = g Q_out`` and ``a^ = a Q_in``,

$$
    (J P^{-1} J^T)_{cd} = \sum_{o,i} \hat J_{c,oi} \hat J_{d,oi} / \lambda_{oi},
    \qquad \hat J_c = \sum_t \hat g_{ct} \hat a_t^T .
$$

Without weight sharing (``T = 1``) this is ``sum_o g^_co g^_do s_o`` with
``s = (a^ * a^) lam^-1^T``: memory ``O(N C out)`` per layer instead of the
``O(N C P)`` of the Jacobian. The rotation does not depend on the prior precision,
so it is done once (``rotate``) and reused, e.g. across a grid search.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from laplace.curvature.rules import Outer
from laplace.curvature.structures import term_vectors

Tensor = torch.Tensor
#: ``(a, g)``: ``a`` ``(N, T, in)`` and ``g`` ``(C, N, T, out)`` for a weight,
#: ``(None, g)`` with ``g`` ``(C, N, out)`` for a bias or vector parameter
Factor = tuple[Tensor | None, Tensor]

#: largest number of entries of one per-example Jacobian chunk (weight sharing only)
_CHUNK_ENTRIES = 1 << 24


def rotate(factors: Sequence[Factor], bases: Sequence[tuple]) -> list[Factor]:
    """Express each parameter's Jacobian factors in the eigenbasis of its block.

    ``bases`` holds ``(Q_out, Q_in)`` for weights and ``(Q,)`` for vectors, ``None``
    standing for the identity.
    """
    rotated = []
    for factor, basis in zip(factors, bases, strict=True):
        a, g = factor[:2]
        if a is None and len(basis) == 1:
            Q = basis[0]
            rotated.append((None, g if Q is None else g @ Q))
        elif a is None:  # a Jacobian (C, N, rows * cols) in a pair's eigenbasis
            rotated.append((None, _rotate_matrix(g, *basis)))
        elif len(factor) == 3:  # a weight viewed as (in, out): Q_1 acts on a
            Q_in, Q_out = basis
            rotated.append((_apply(a, Q_in), _apply(g, Q_out), True))
        else:
            Q_out, Q_in = basis
            rotated.append((_apply(a, Q_in), _apply(g, Q_out)))
    return rotated


def _apply(x: Tensor, Q: Tensor | None) -> Tensor:
    return x if Q is None else x @ Q


def _rotate_matrix(J: Tensor, Q1: Tensor | None, Q2: Tensor | None) -> Tensor:
    """``Q1^T J_cn Q2`` for Jacobians ``(C, N, r * c)`` of an ``(r, c)`` parameter
    (None: the identity)."""
    if Q1 is None and Q2 is None:
        return J
    r = Q1.shape[0] if Q1 is not None else J.shape[-1] // Q2.shape[0]
    Jm = J.reshape(*J.shape[:2], r, -1)
    if Q1 is not None:
        Jm = torch.einsum("cnrs,ri->cnis", Jm, Q1)
    if Q2 is not None:
        Jm = Jm @ Q2
    return Jm.flatten(start_dim=2)


def inv_square_form(factors: Sequence[Factor], inv_eigenvalues: Sequence[Tensor]):
    """``J P^-1 J^T`` ``(N, C, C)`` from rotated factors and ``1 / lam`` per block.

    ``inv_eigenvalues`` holds ``(out, in)`` for weights and ``(n,)`` for vectors.
    """
    f_var = None
    for factor, inv in zip(factors, inv_eigenvalues, strict=True):
        a, g = factor[:2]
        if len(factor) == 3:  # viewed as (in, out): the eigenvalues transposed
            inv = inv.mT
        if a is None:
            term = torch.einsum("cno,dno,o->ncd", g, g, inv.flatten())
        elif a.shape[1] == 1:
            g1 = g[:, :, 0]
            s = a[:, 0].square() @ inv.mT  # (N, out)
            term = torch.einsum("cno,dno,no->ncd", g1, g1, s)
        else:
            term = _shared_weight_term(a, g, inv)
        f_var = term if f_var is None else f_var + term
    return f_var


def _shared_weight_term(a: Tensor, g: Tensor, inv: Tensor) -> Tensor:
    """The weight-sharing case (convolutions): per-example Jacobians in chunks."""
    C, N = g.shape[:2]
    chunk = max(1, _CHUNK_ENTRIES // (C * inv.numel()))
    pieces = []
    for start in range(0, N, chunk):
        rows = slice(start, start + chunk)
        term = Outer(a[rows], g[:, rows])
        J = term_vectors(term, inv.numel()).reshape(C, -1, *inv.shape)  # (C, n, o, i)
        pieces.append(torch.einsum("cnoi,dnoi,oi->ncd", J, J, inv))
    return torch.cat(pieces)
