r"""Exact outer-product curvatures and Jacobians from the curvature engine.

The GGN, the Monte-Carlo Fisher and the empirical Fisher of a summed loss all take the
form

$$
    H = \sum_n \sum_k v_{nk} v_{nk}^\top, \qquad v_{nk} = J_n^\top M_n[:, k],
$$

with $J_n$ the Jacobian ``(C, P)`` of the network output for datum ``n`` and a
factor ``M`` of shape ``(N, C, K)``: a square root of the output Hessian (GGN), sampled
loss gradients (MC Fisher) or the loss gradient itself (EF, ``K = 1``). These
entry points take ``(model, params, x, factor_fn)`` and compute with
``laplace.curvature.engine`` (module hooks and per-module rules, one batched
backward pass of ``M``); the Jacobian is the case ``M = I``. Only the last layer
``f = W phi + b`` has its own closed forms here (``linear_layer_full``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from laplace.curvature import engine, structures

FactorFn = Callable[[torch.Tensor], torch.Tensor]


def per_example_vectors(model, params, x, factor_fn: FactorFn, indices=None):
    """Outputs ``f`` ``(N, C)`` and the vectors ``V`` ``(K, N, P)`` (or
    ``(K, N, len(indices))`` of the entries ``indices`` of the concatenated
    parameters, without forming the others)."""
    if indices is None:
        tape = engine.run(model, params, x, factor_fn)
        return tape.f, structures.vectors(tape)
    # only the parameters holding a selected entry are reached
    groups = structures.index_groups(params, indices)
    tape = engine.run(model, [p for p, _, _ in groups], x, factor_fn)
    return tape.f, structures.selected_vectors(tape, groups, len(indices))


def outer_product_diag(model, params, x, factor_fn: FactorFn):
    """Outputs ``f`` ``(N, C)`` and ``diag(sum_nk v_nk v_nk^T)`` ``(P,)``."""
    tape = engine.run(model, params, x, factor_fn)
    return tape.f, structures.diagonal(tape)


def outer_product_full(model, params, x, factor_fn: FactorFn, indices=None):
    """Outputs ``f`` and ``sum_nk v_nk v_nk^T`` ``(P, P)`` (or its submatrix over
    ``indices``) as one symmetric rank-``KN`` update."""
    f, V = per_example_vectors(model, params, x, factor_fn, indices)
    return f, structures.symmetric_gram(V.reshape(-1, V.shape[-1]))


def jacobian(
    model: nn.Module, params: Sequence[nn.Parameter], x, create_graph: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Jacobian ``(N, C, P)`` of the outputs w.r.t. ``params`` and outputs ``(N, C)``
    (the vectors of ``M = I``); ``create_graph`` keeps both differentiable w.r.t.
    ``x``."""
    tape = engine.run(model, params, x, identity_factor, keep_graph=create_graph)
    return structures.vectors(tape).transpose(0, 1), tape.f


def jacobian_factors(model: nn.Module, params: Sequence[nn.Parameter], x):
    r"""The Jacobian of every output, parameter by parameter, factored.

    For a weight used as a linear map at positions ``t`` the Jacobian of output ``c``
    is ``sum_t g_{ct} a_t^T``: one backward pass of the identity gives every ``g``.

    Returns
    -------
    ``(f, factors)`` with ``f`` the detached outputs ``(N, C)`` and one entry per
    parameter: ``(a, g)`` with ``a`` ``(N, T, in)`` and ``g`` ``(C, N, T, out)`` for a
    weight viewed as ``(out, in)``; ``(a, g, True)`` for a weight viewed as
    ``(in, out)`` (``transformers``' ``Conv1D``); ``(None, J)`` with ``J``
    ``(C, N, numel)`` for any other parameter (its Jacobian itself, e.g. a bias
    summed over positions). None when the outputs are not ``(N, C)``.
    """
    tape = engine.run(model, params, x, identity_factor)
    if tape.f.ndim != 2:
        return None
    return tape.f, [structures.jacobian_factor(tape, p) for p in params]


class RowCounter:
    """Forward hooks that record the leading dimension of the inputs of every
    ``nn.Linear``/``nn.Conv2d`` layer of ``model`` (the rows it treats as a batch).

    ``per_example(N)`` says whether every layer saw exactly the ``N`` examples of
    the batch; a model that flattens items, ``(N, K, d) -> (N K, d)``, does not.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = [
            m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
        ]
        self.rows: list[int] = []

    def __enter__(self) -> RowCounter:
        def hook(module, inputs, output):
            self.rows.append(inputs[0].shape[0])

        self.handles = [m.register_forward_hook(hook) for m in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def per_example(self, N: int) -> bool:
        return all(r == N for r in self.rows)


def linear_layer_full(
    layer: nn.Linear, phi: torch.Tensor, factor_fn: FactorFn, indices=None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Outputs and ``sum_n Lambda_n (x) phi~_n phi~_n^T`` for one linear layer.

    For ``f = W phi + b`` every vector ``v_nk = J_n^T M_n[:, k]`` is
    ``M_n[:, k] (x) phi~_n`` with ``phi~ = [phi, 1]``, so the outer products sum to
    ``Lambda_n (x) phi~_n phi~_n^T`` with ``Lambda_n = M_n M_n^T``: ``N C^2 D^2``
    multiply-adds instead of the ``N C (C D)^2`` of ``V^T V``. The result is ordered as
    the layer's trainable parameters (weight row-major, then bias) or restricted to
    ``indices`` of them.
    """
    with torch.no_grad():
        f = layer(phi)
        M = factor_fn(f)  # (N, C, K)
        Lam = M @ M.transpose(1, 2)  # (N, C, C)
    N, C = Lam.shape[:2]
    has_bias = layer.bias is not None and layer.bias.requires_grad
    if has_bias:
        phi = torch.cat([phi, phi.new_ones(N, 1)], dim=1)
    D = phi.shape[1]
    # H[(c, c'), d, d'] = sum_n Lam[n, c, c'] phi[n, d] phi[n, d'], in chunks of data
    # whose intermediate (n, C^2, D) stays below the size of the result
    H = phi.new_zeros(C * C * D, D)
    chunk = max(D, 32)
    for start in range(0, N, chunk):
        lam, ph = Lam[start : start + chunk], phi[start : start + chunk]
        Z = (lam.reshape(-1, C * C, 1) * ph[:, None, :]).reshape(len(ph), -1)
        H.addmm_(Z.T, ph)
    H = H.reshape(C, C, D, D).permute(0, 2, 1, 3).reshape(C * D, C * D)
    order = linear_parameter_order(layer, C, D, has_bias, phi.device)
    if indices is not None:
        order = order[torch.as_tensor(indices, device=order.device)]
    return f, H[order][:, order]


def linear_parameter_order(layer, C, D, has_bias, device) -> torch.Tensor:
    """Positions in the ``(class, feature~)`` layout ``(C, D)`` (``D`` counting the
    bias column when ``has_bias``) of the layer's trainable parameters, in parameter
    order (weight row-major, then bias)."""
    grid = torch.arange(C * D, device=device).reshape(C, D)
    pieces = []
    if layer.weight.requires_grad:
        pieces.append((grid[:, :-1] if has_bias else grid).flatten())
    if has_bias:
        pieces.append(grid[:, -1])
    return torch.cat(pieces)


def identity_factor(f: torch.Tensor) -> torch.Tensor:
    """``M = I`` ``(N, C, C)``: backpropagating it gives every output's gradient."""
    eye = torch.eye(f.shape[-1], dtype=f.dtype, device=f.device)
    return eye.expand(f.shape[0], -1, -1)
