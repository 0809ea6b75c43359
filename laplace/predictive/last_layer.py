r"""``J P^-1 J^T`` of a linear last layer in closed form, from its input features.

For ``f = W phi + b`` with ``W`` ``(C, D)`` the Jacobian of datum ``n`` is
``J_n = [I_C (x) phi_n^T, I_C]`` (weight row-major, then bias), so the functional
variance needs the features ``phi`` ``(N, D)`` and the posterior, never the Jacobian
``(N, C, C (D + 1))``: memory ``O(N C)`` plus the posterior's own size.

Block forms (Kron, Diag): the weight's precision is
``(Q_out (x) Q_in) diag(lam) (Q_out (x) Q_in)^T`` (identities for Diag) and the
bias's ``Q diag(mu) Q^T``. With the rotated features ``a = phi Q_in``,

$$
    \mathrm{Cov}(f_{nc}, f_{md}) = \sum_o Q_{co} Q_{do}
        \Big(\sum_i a_{ni} a_{mi} / \lambda_{oi}\Big)
        + \sum_o Q^b_{co} Q^b_{do} / \mu_o ,
$$

so the variance of datum ``n`` is ``Q_out diag(s_n) Q_out^T + Q diag(1/mu) Q^T`` with
``s_n = (a_n * a_n) lam^-1^T`` ``(C,)``, and its diagonal needs no ``(C, C)`` matrix
per datum (3,000 classes cost ``O(N C + C^2)``).

Dense form (Full): with the covariance ``Sigma`` laid out as ``(C, D~, C, D~)`` over
the augmented features ``phi~ = [phi, 1]`` (``D~ = D + 1`` with a bias),
``Cov(f_nc, f_md) = phi~_n^T Sigma[c, :, d, :] phi~_m``.

Every function takes ``mode``: ``"full"`` -> ``(N, C, C)``, ``"diag"`` -> ``(N, C)``,
``"joint"`` -> ``(N C, N C)`` ordered datum-major.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from laplace.curvature.backprop_factor import linear_parameter_order

Tensor = torch.Tensor
MODES = ("full", "diag", "joint")

#: entries of the largest intermediate of the dense form, chunked over the data
_CHUNK_ENTRIES = 1 << 24


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}.")


def block_variance(
    phi: Tensor,
    layer: nn.Linear,
    params: Sequence[nn.Parameter],
    bases: Sequence[tuple],
    inv_eigenvalues: Sequence[Tensor],
    mode: str = "full",
) -> Tensor:
    """Functional (co)variance for a block form over the layer's trainable
    ``params`` (``weight`` and/or ``bias``), given per parameter its eigenbasis
    ``(Q_out, Q_in)`` / ``(Q,)`` (``None`` for the identity) and its inverse
    eigenvalues ``(C, D)`` / ``(C,)``."""
    _check_mode(mode)
    N, C = phi.shape[0], layer.out_features
    total: Tensor | None = None
    for p, basis, inv in zip(params, bases, inv_eigenvalues, strict=True):
        if p is layer.weight:
            Q_out, Q_in = basis
            a = phi if Q_in is None else phi @ Q_in
            term = _weight_term(a, Q_out, inv, mode)
        else:
            term = _bias_term(basis[0], inv, N, mode)
        total = term if total is None else total + term
    assert total is not None and total.shape[-1] == (C if mode != "joint" else N * C)
    return total


def _weight_term(a: Tensor, Q: Tensor | None, inv: Tensor, mode: str) -> Tensor:
    if mode == "joint":
        N, C = a.shape[0], inv.shape[0]
        B = torch.einsum("ni,oi,mi->onm", a, inv, a)  # (C, N, N)
        if Q is None:
            eye = torch.eye(C, dtype=a.dtype, device=a.device)
            cov = torch.einsum("cnm,cd->ncmd", B, eye)
        else:
            cov = torch.einsum("co,do,onm->ncmd", Q, Q, B)
        return cov.reshape(N * C, N * C)
    s = a.square() @ inv.mT  # (N, C) in the output eigenbasis
    if mode == "diag":
        return s if Q is None else s @ Q.square().mT
    if Q is None:
        return torch.diag_embed(s)
    return torch.einsum("co,no,do->ncd", Q, s, Q)


def _bias_term(Q: Tensor | None, inv: Tensor, N: int, mode: str) -> Tensor:
    if mode == "diag":
        var = inv if Q is None else Q.square() @ inv
        return var.expand(N, -1)
    K = torch.diag(inv) if Q is None else (Q * inv) @ Q.mT  # (C, C)
    if mode == "full":
        return K.expand(N, -1, -1)
    C = K.shape[0]
    return K.repeat(N, N).reshape(N * C, N * C)


def augmented(phi: Tensor, layer: nn.Linear) -> Tensor:
    """``phi~ = [phi, 1]`` when the layer has a trainable bias, else ``phi``."""
    if layer.bias is None or not layer.bias.requires_grad:
        return phi
    return torch.cat([phi, phi.new_ones(phi.shape[0], 1)], dim=1)


def dense_layout(Sigma: Tensor, layer: nn.Linear) -> Tensor:
    """The covariance ``(P, P)`` of the layer's trainable parameters (weight
    row-major, then bias) laid out as ``(C, D~, C, D~)`` over ``phi~``; entries of
    frozen parameters are zero."""
    C, D = layer.out_features, layer.in_features
    has_bias = layer.bias is not None and layer.bias.requires_grad
    Dt = D + int(has_bias)
    order = linear_parameter_order(layer, C, Dt, has_bias, Sigma.device)
    if order.numel() == C * Dt:  # every entry trainable: a permutation
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        laid = Sigma[inverse][:, inverse]
    else:
        laid = Sigma.new_zeros(C * Dt, C * Dt)
        laid[order[:, None], order[None, :]] = Sigma
    return laid.reshape(C, Dt, C, Dt)


def dense_variance(
    phi: Tensor, layer: nn.Linear, Sigma4: Tensor, mode: str = "full"
) -> Tensor:
    """Functional (co)variance from the covariance in ``dense_layout``."""
    _check_mode(mode)
    pt = augmented(phi, layer)
    N, Dt = pt.shape
    C = Sigma4.shape[0]
    if mode == "diag":
        blocks = Sigma4.diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (C, D~, D~)
        return torch.einsum("nj,cji,ni->nc", pt, blocks, pt)
    if mode == "joint":
        T = torch.einsum("nj,cjki->ncki", pt, Sigma4)
        return torch.einsum("ncki,mi->ncmk", T, pt).reshape(N * C, N * C)
    chunk = max(1, _CHUNK_ENTRIES // (C * C * Dt))
    pieces = []
    for start in range(0, N, chunk):
        p = pt[start : start + chunk]
        T = torch.einsum("nj,cjki->ncki", p, Sigma4)
        pieces.append(torch.einsum("ncki,ni->nck", T, p))
    return torch.cat(pieces)
