r"""Log-determinants of ``c * H + d`` for fixed eigenvalues, fast to differentiate.

While hyperparameters are tuned, the eigenvalues ``h`` of the curvature are fixed and
only the scale ``c = 1 / (sigma^2 T)`` and the prior precision ``d`` change. Then

$$
    \ell = \sum_i \log(c h_i + d), \qquad
    \frac{\partial \ell}{\partial d} = \sum_i \frac{1}{c h_i + d}, \qquad
    \frac{\partial \ell}{\partial c} = \sum_i \frac{h_i}{c h_i + d},
$$

so one pass over the ``n`` eigenvalues gives the value and both derivatives, and the
backward pass costs nothing. For a Kronecker block the eigenvalues are the outer
product ``h = g a^T`` of the factors' eigenvalues, formed only inside the pass.

The derivative in ``c`` is summed term by term: the equivalent
``(n - d \partial \ell / \partial d) / c`` subtracts two sums of about ``n`` that
cancel wherever most ``h_i`` are (numerically) zero, as they are for the curvature of
an over-parameterised network, and loses every digit in float32. The sums are
accumulated in ``h``'s dtype by torch's pairwise summation (relative error about
``eps log n``); a float64 accumulation doubled the cost of a tuning step.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


class _AffineLogSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, c: Tensor, d: Tensor, h: Tensor, a: Tensor | None) -> Tensor:
        with torch.no_grad():
            ha = h if a is None else torch.outer(h, a)
            lam = torch.add(d, ha, alpha=float(c))
            value = lam.log().sum()
            inv = lam.reciprocal_()
            inv_sum = inv.sum()
            h_sum = inv.mul_(ha).sum()  # sum h / (c h + d)
        ctx.save_for_backward(inv_sum.to(h.dtype), h_sum.to(h.dtype))
        return value.to(h.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        inv_sum, h_sum = ctx.saved_tensors
        grad_c = grad * h_sum if ctx.needs_input_grad[0] else None
        grad_d = grad * inv_sum if ctx.needs_input_grad[1] else None
        return grad_c, grad_d, None, None


def _scalar_like(value, h: Tensor) -> Tensor:
    """``value`` as a 0-dim tensor of ``h``'s dtype and device: a number exactly (not
    through the default dtype), a tensor by a differentiable cast."""
    if not isinstance(value, Tensor):
        return torch.tensor(value, dtype=h.dtype, device=h.device)
    return value.to(device=h.device, dtype=h.dtype).reshape(())


def affine_log_sum(c: Tensor, d: Tensor, h: Tensor, a: Tensor | None = None) -> Tensor:
    """``sum_i log(c h_i + d)`` (or ``sum_ij log(c h_i a_j + d)`` with ``a`` given),
    differentiable in the 0-dim tensors ``c > 0`` and ``d``.

    Parameters
    ----------
    c, d : torch.Tensor or float
        0-dim; may require grad. Cast to ``h``'s dtype (gradients flow back through
        the cast).
    h : torch.Tensor
        ``(n,)`` eigenvalues. Every ``c h_i + d`` must be positive, else the result
        is NaN (or ``-inf``). Constant unless it requires grad (e.g.
        ``spectral_eigenvalues``): then the sum is formed by autograd, without the
        one-pass backward above.
    a : torch.Tensor, optional
        ``(m,)`` second factor's eigenvalues; differentiated like ``h``.

    Returns
    -------
    torch.Tensor
        0-dim, of ``h``'s dtype.
    """
    c = _scalar_like(c, h)
    d = _scalar_like(d, h)
    if h.requires_grad or (a is not None and a.requires_grad):
        ha = h if a is None else torch.outer(h, a)
        return torch.add(d, c * ha).log().sum()
    return _AffineLogSum.apply(c, d, h.detach(), None if a is None else a.detach())


def spectral_eigenvalues(F: Tensor, Q: Tensor | None, lam: Tensor) -> Tensor:
    r"""The eigenvalues ``lam`` of the symmetric ``F = Q diag(lam) Q^T`` (found
    without gradient), differentiable in ``F`` as the argument of a spectral
    function.

    A function ``phi(F) = sum_i f(lam_i)`` of the eigenvalues (e.g. a log
    determinant) has the gradient ``Q diag(f'(lam)) Q^T``, i.e.
    ``d lam_i = q_i^T dF q_i`` inside it, at repeated eigenvalues too (any
    orthonormal basis of their eigenspace gives the same sum). The value returned
    is ``lam``, and its gradient is that of ``diag(Q^T F Q)`` with ``Q`` held
    constant: exact for such functions, and finite where the backward of
    ``torch.linalg.eigh`` (which differentiates the eigenvectors as well) divides by
    differences of equal eigenvalues. It is not the gradient of the eigenvalues
    one by one, nor of a function of the eigenvectors.

    Parameters
    ----------
    F : torch.Tensor
        ``(n, n)``, or ``(n,)`` standing for ``diag(F)``; may require grad.
    Q : torch.Tensor or None
        ``(n, n)`` eigenvectors of ``F`` in columns; None for a diagonal ``F`` (the
        identity).
    lam : torch.Tensor
        ``(n,)`` eigenvalues of ``F`` in the order of ``Q``'s columns (e.g. clamped
        at 0).

    Returns
    -------
    torch.Tensor
        ``(n,)``, equal to ``lam``.
    """
    if not isinstance(F, Tensor):
        raise TypeError(
            "spectral_eigenvalues takes a dense or diagonal factor (a tensor); got "
            f"{type(F).__name__}. A LowRankFactor's eigenvalues are exact already "
            "(laplace.utils.lowrank_factor)."
        )
    if not F.requires_grad:
        return lam
    first = F if Q is None else (Q * (F @ Q)).sum(0)  # q_i^T F q_i
    return lam.detach() + (first - first.detach())


__all__ = ["affine_log_sum", "spectral_eigenvalues"]
