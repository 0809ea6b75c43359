"""Dense brute-force oracles, written independently of the code under test.

Everything here works on small models in float64: Jacobians by ``torch.func.jacrev``
one example at a time, output Hessians in closed form, the true Hessian by
``torch.func.hessian``, per-example gradients by autograd one example at a time, and
KFAC factors from explicit layer inputs and backpropagated output gradients.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev
from torch.nn import functional as F


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _rows(x, i):
    if isinstance(x, dict):
        return {k: v[i : i + 1] for k, v in x.items()}
    return x[i : i + 1]


def _n(x):
    return next(iter(x.values())).shape[0] if isinstance(x, dict) else x.shape[0]


def jacobian(model, x) -> torch.Tensor:
    """``(N, C, P)``, one example at a time."""
    params = trainable(model)
    rows = []
    for i in range(_n(x)):

        def f(theta, i=i):
            return functional_call(model, theta, (_rows(x, i),))[0]

        jac = jacrev(f)(params)
        rows.append(torch.cat([jac[k].reshape(jac[k].shape[0], -1) for k in params], 1))
    return torch.stack(rows)


def output_hessian(likelihood: str, f: torch.Tensor) -> torch.Tensor:
    """Hessian ``(N, C, C)`` of the per-example loss w.r.t. the output, in closed
    form (the Fisher of the natural parameters for heteroscedastic regression)."""
    if likelihood == "regression":  # 0.5 * ||f - y||^2
        return torch.eye(f.shape[1], dtype=f.dtype, device=f.device).expand(
            f.shape[0], -1, -1
        )
    if likelihood in ("binary", "multilabel"):
        p = torch.sigmoid(f)
        return torch.diag_embed(p * (1 - p))
    if likelihood == "poisson":
        return torch.diag_embed(torch.exp(f))
    if likelihood == "heteroscedastic_regression":
        return natural_gaussian_fisher(f)
    p = torch.softmax(f, -1)
    return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]


def natural_gaussian_fisher(f: torch.Tensor) -> torch.Tensor:
    """``(N, 2C, 2C)``: per output ``c`` the covariance of the sufficient statistics
    ``(y, y^2)`` of ``N(mu, s2)`` on the entries ``(c, C + c)``: ``Var y = s2``,
    ``Cov(y, y^2) = 2 mu s2``, ``Var y^2 = 4 mu^2 s2 + 2 s2^2``."""
    C = f.shape[1] // 2
    s2 = -1 / (2 * f[:, C:])
    mu = f[:, :C] * s2
    H = f.new_zeros(f.shape[0], 2 * C, 2 * C)
    for c in range(C):
        H[:, c, c] = s2[:, c]
        H[:, c, C + c] = H[:, C + c, c] = 2 * mu[:, c] * s2[:, c]
        H[:, C + c, C + c] = 4 * mu[:, c] ** 2 * s2[:, c] + 2 * s2[:, c] ** 2
    return H


def loss(likelihood, f, y):
    """The summed negative log-likelihood, written with ``torch.distributions`` (up
    to the constant of regression's ``0.5 ||f - y||^2``)."""
    if likelihood == "regression":
        return 0.5 * ((f - y.reshape(f.shape)) ** 2).sum()
    if likelihood in ("binary", "multilabel"):
        dist = torch.distributions.Bernoulli(logits=f)
        return -dist.log_prob(y.reshape(f.shape).to(f.dtype)).sum()
    if likelihood == "poisson":
        dist = torch.distributions.Poisson(torch.exp(f))
        return -dist.log_prob(y.reshape(f.shape).to(f.dtype)).sum()
    if likelihood == "heteroscedastic_regression":
        C = f.shape[1] // 2
        s2 = -1 / (2 * f[:, C:])
        dist = torch.distributions.Normal(f[:, :C] * s2, s2.sqrt())
        return -dist.log_prob(y.reshape(s2.shape).to(f.dtype)).sum()
    return F.cross_entropy(f, y, reduction="sum")


def ggn(model, x, likelihood) -> torch.Tensor:
    J = jacobian(model, x)
    with torch.no_grad():
        f = model(x)
    L = output_hessian(likelihood, f)
    return torch.einsum("ncp,ncd,ndq->pq", J, L, J)


def per_example_gradients(model, x, y, likelihood) -> torch.Tensor:
    params = trainable(model)
    rows = []
    for i in range(_n(x)):

        def l(theta, i=i):
            f = functional_call(model, theta, (_rows(x, i),))
            return loss(likelihood, f, y[i : i + 1])

        g = torch.func.grad(l)(params)
        rows.append(flat(g[k] for k in params))
    return torch.stack(rows)


def empirical_fisher(model, x, y, likelihood) -> torch.Tensor:
    G = per_example_gradients(model, x, y, likelihood)
    return G.T @ G


def true_hessian(model, x, y, likelihood) -> torch.Tensor:
    params = trainable(model)
    names = list(params)
    sizes = [params[k].numel() for k in names]

    def l(vec):
        theta = {k: v.reshape(params[k].shape) for k, v in zip(names, vec.split(sizes))}
        return loss(likelihood, functional_call(model, theta, (x,)), y)

    return hessian(l)(flat(params[k] for k in names))


def kfac_blocks(
    model, x, likelihood, N=None, y=None, reduce_positions=False
) -> list[torch.Tensor]:
    """Dense KFAC blocks in parameter order, from explicit A and G per layer.

    ``G = sum_n sum_t J_n^T Lambda_n J_n`` at the layer output, ``A`` the mean over
    data of the (position-averaged) input outer products; a bias block is ``G``.
    With targets ``y`` the empirical Fisher's ``Lambda_n = r_n r_n^T`` is used, ``r_n``
    the loss gradient w.r.t. the output.
    With ``reduce_positions`` a conv layer's ``G`` sums ``J`` over positions before
    the outer product (BackPACK's flavour). Only for models of Linear/Conv2d layers
    on 2-D features.
    """
    records = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o: records.__setitem__(m, (i[0], o)))
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    f = model(x)
    for h in hooks:
        h.remove()
    if y is None:
        L = output_hessian(likelihood, f.detach())
    else:
        fd = f.detach().requires_grad_()
        (r,) = torch.autograd.grad(loss(likelihood, fd, y), fd)
        L = r[:, :, None] * r[:, None, :]
    N = N or f.shape[0]
    blocks = {}
    for m, (a, out) in records.items():
        # J_n^T wrt layer output, row by row of the output
        rows = []
        for c in range(f.shape[1]):
            (g,) = torch.autograd.grad(f[:, c].sum(), out, retain_graph=True)
            rows.append(g)
        Jout = torch.stack(rows, 1)  # (N, C, *out)
        if isinstance(m, nn.Conv2d):
            Jout = Jout.flatten(3)  # (N, C, out, T)
            u = F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride)
            T = u.shape[-1]
            if reduce_positions:
                Js = Jout.sum(-1)
                G = torch.einsum("nco,ncd,ndp->op", Js, L, Js)
            else:
                G = torch.einsum("ncot,ncd,ndpt->op", Jout, L, Jout)
            A = torch.einsum("nit,njt->ij", u, u) / T / N
        else:
            G = torch.einsum("nco,ncd,ndp->op", Jout, L, Jout)
            A = a.T @ a / N
        if m.weight.requires_grad:
            blocks[id(m.weight)] = torch.kron(G.contiguous(), A.contiguous())
        if m.bias is not None and m.bias.requires_grad:
            blocks[id(m.bias)] = G
    return [blocks[id(p)] for p in model.parameters() if p.requires_grad]
