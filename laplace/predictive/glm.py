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
    for (a, g), basis in zip(factors, bases, strict=True):
        if a is None:
            Q = basis[0]
            rotated.append((None, g if Q is None else g @ Q))
            continue
        Q_out, Q_in = basis
        rotated.append(
            (a if Q_in is None else a @ Q_in, g if Q_out is None else g @ Q_out)
        )
    return rotated


def inv_square_form(factors: Sequence[Factor], inv_eigenvalues: Sequence[Tensor]):
    """``J P^-1 J^T`` ``(N, C, C)`` from rotated factors and ``1 / lam`` per block.

    ``inv_eigenvalues`` holds ``(out, in)`` for weights and ``(n,)`` for vectors.
    """
    f_var = None
    for (a, g), inv in zip(factors, inv_eigenvalues, strict=True):
        if a is None:
            term = torch.einsum("cno,dno,o->ncd", g, g, inv)
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
        J = torch.einsum(
            "cnto,nti->ncoi", g[:, start : start + chunk], a[start : start + chunk]
        )
        pieces.append(torch.einsum("ncoi,ndoi,oi->ncd", J, J, inv))
    return torch.cat(pieces)
