r"""Log-determinants of ``c * H + d`` for fixed eigenvalues, fast to differentiate.

While hyperparameters are tuned, the eigenvalues ``h`` of the curvature are fixed and
only the scale ``c = 1 / (sigma^2 T)`` and the prior precision ``d`` change. Then

$$
    \ell = \sum_i \log(c h_i + d), \qquad
    \frac{\partial \ell}{\partial d} = \sum_i \frac{1}{c h_i + d}, \qquad
    \frac{\partial \ell}{\partial c} = \frac{n - d\, \partial \ell / \partial d}{c},
$$

so one pass over the ``n`` eigenvalues gives the value and both derivatives, and the
backward pass costs nothing. For a Kronecker block the eigenvalues are the outer
product ``h = g a^T`` of the factors' eigenvalues, formed only inside the pass.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


class _AffineLogSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, c: Tensor, d: Tensor, h: Tensor, a: Tensor | None) -> Tensor:
        with torch.no_grad():
            if a is None:
                lam = torch.add(d, h, alpha=float(c))
            else:
                lam = torch.outer(h, a).mul_(c).add_(d)
            value = lam.log().sum()
            inv_sum = lam.reciprocal_().sum()
        ctx.save_for_backward(c, d, inv_sum)
        ctx.n = lam.numel()
        return value

    @staticmethod
    def backward(ctx, grad: Tensor):
        c, d, inv_sum = ctx.saved_tensors
        grad_d = grad * inv_sum if ctx.needs_input_grad[1] else None
        grad_c = None
        if ctx.needs_input_grad[0]:
            grad_c = grad * (ctx.n - d * inv_sum) / c
        return grad_c, grad_d, None, None


def affine_log_sum(c: Tensor, d: Tensor, h: Tensor, a: Tensor | None = None) -> Tensor:
    """``sum_i log(c h_i + d)`` for constant ``h`` (or ``sum_ij log(c h_i a_j + d)``
    with ``a`` given), differentiable in the 0-dim tensors ``c > 0`` and ``d``.

    Parameters
    ----------
    c, d : torch.Tensor
        0-dim; may require grad.
    h : torch.Tensor
        ``(n,)`` eigenvalues ``>= 0``; not differentiated.
    a : torch.Tensor, optional
        ``(m,)`` second factor's eigenvalues; not differentiated.

    Returns
    -------
    torch.Tensor
        0-dim.
    """
    c = torch.as_tensor(c, dtype=h.dtype, device=h.device).reshape(())
    d = torch.as_tensor(d, dtype=h.dtype, device=h.device).reshape(())
    return _AffineLogSum.apply(c, d, h.detach(), None if a is None else a.detach())


__all__ = ["affine_log_sum"]
