r"""Exact outer-product curvatures from a backpropagated factor of the output Hessian.

The GGN, the Monte-Carlo Fisher and the empirical Fisher of a summed loss all take the
form

$$
    H = \sum_n \sum_k v_{nk} v_{nk}^\top, \qquad v_{nk} = J_n^\top M_n[:, k],
$$

with $J_n$ the Jacobian ``(C, P)`` of the network output for datum ``n`` and a
factor ``M`` of shape ``(N, C, K)``: a square root of the output Hessian (GGN), sampled
loss gradients (MC Fisher) or the loss gradient itself (EF, ``K = 1``).

Instead of building the Jacobian ``(N, C, P)``, one batched backward pass carries the
``K`` columns of ``M`` to the output of every ``nn.Linear``/``nn.Conv2d`` layer
(``g``, shape ``(K, N, out...)``). With the layer input ``a`` captured on the forward
pass, the per-example vectors of a linear layer are ``g a^T`` and

- the diagonal is ``sum_{n} (sum_k g_{nk}^2) (a_n^2)^T``: one ``(out, N) @ (N, in)``
  product per layer, no per-example tensor at all;
- the dense matrix is ``V^T V`` with ``V`` ``(K N, P)``: one symmetric rank-``KN``
  update per batch.

Models with parameters in other layers (or layers called twice) fall back to the
Jacobian computed by ``torch.func``; the result is the same.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping, Sequence

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap
from torch.nn import functional as F

FactorFn = Callable[[torch.Tensor], torch.Tensor]


def _is_fast_layer(module: nn.Module) -> bool:
    if type(module) is nn.Linear:
        return True
    return (
        type(module) is nn.Conv2d
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def _owners(model: nn.Module, params: Sequence[nn.Parameter]) -> dict[int, nn.Module]:
    """Map ``id(param)`` to the module that holds it directly."""
    wanted = {id(p) for p in params}
    owner: dict[int, nn.Module] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in wanted:
                owner.setdefault(id(p), module)
    return owner


class _Tape:
    """Forward hooks that record the input and output of the given layers."""

    def __init__(self, layers: Sequence[nn.Module], keep_graph: bool = False) -> None:
        self.layers = list(layers)
        self.keep_graph = keep_graph
        self.records: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {
            id(m): [] for m in self.layers
        }

    def __enter__(self) -> _Tape:
        def hook(module, inputs, output):
            a = inputs[0] if self.keep_graph else inputs[0].detach()
            self.records[id(module)].append((a, output))

        self.handles = [m.register_forward_hook(hook) for m in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def single_calls(self) -> bool:
        return all(len(r) == 1 for r in self.records.values())


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


def _unfold(module: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    """Input patches ``(N, in*kh*kw, T)`` of a Conv2d layer."""
    return F.unfold(
        a,
        module.kernel_size,
        dilation=module.dilation,
        padding=module.padding,
        stride=module.stride,
    )


def layer_terms(
    module: nn.Module, a: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring a layer to the form of a linear map ``out = W a`` over positions ``T``.

    Returns ``a`` as ``(N, T, in)`` and ``g`` as ``(K, N, T, out)``.
    """
    K, N = g.shape[:2]
    if isinstance(module, nn.Conv2d):
        a = _unfold(module, a).transpose(1, 2)
        g = g.flatten(start_dim=3).transpose(2, 3)
        return a, g
    return a.reshape(N, -1, a.shape[-1]), g.reshape(K, N, -1, g.shape[-1])


def _layer_diag(module: nn.Module, a: torch.Tensor, g: torch.Tensor):
    """Diagonal contributions ``{param_name: (numel,)}`` of one layer."""
    a, g = layer_terms(module, a, g)
    out: dict[str, torch.Tensor] = {}
    if a.shape[1] == 1:  # no weight sharing: never form per-example gradients
        s = g[:, :, 0].square().sum(0)  # (N, out)
        out["weight"] = (s.T @ a[:, 0].square()).flatten()
        if module.bias is not None:
            out["bias"] = s.sum(0)
        return out
    vectors = _layer_vectors(module, a, g, prepared=True)
    return {name: v.square().sum((0, 1)) for name, v in vectors.items()}


def _layer_vectors(module, a, g, prepared: bool = False):
    """Per-example vectors ``{param_name: (K, N, numel)}`` of one layer."""
    if not prepared:
        a, g = layer_terms(module, a, g)
    K, N = g.shape[:2]
    out = {"weight": torch.einsum("knto,nti->knoi", g, a).reshape(K, N, -1)}
    if module.bias is not None:
        out["bias"] = g.sum(2)
    return out


def backprop_to_layers(
    model,
    params,
    x,
    factor_fn,
    outputs_2d: bool = False,
    create_graph: bool = False,
    per_example: bool = True,
):
    """One batched backward pass of the columns of ``M = factor_fn(f)`` ``(N, C, K)``
    to the output of every layer holding ``params``.

    Returns None when a parameter lives outside ``nn.Linear``/``nn.Conv2d`` layers
    called once (or, with ``outputs_2d``, when the outputs are not ``(N, C)``);
    otherwise ``(f, [(module, a, g)])`` with the outputs ``f``, the layer input ``a``
    and the backpropagated ``g`` ``(K, N, out...)`` of each layer (in the order of
    ``model.modules()``). The forward pass records a graph even inside
    ``torch.no_grad()``. All are detached unless ``create_graph``, which keeps them
    differentiable w.r.t. the inputs.

    A layer may see ``L != N`` rows, as when a model flattens ``K`` items per
    example, ``(N, K, d) -> (N K, d)``, runs a network and reshapes back. With
    ``per_example`` (for per-example quantities), the rows of a linear layer are then
    grouped as ``a`` ``(N, L/N, ..., in)`` and ``g`` ``(K, N, L/N, ..., out)``: the
    items of one example become positions of a weight-shared layer. The grouping
    assumes that example ``n`` owns rows ``n L/N, ..., (n+1) L/N - 1`` (what
    ``reshape``/``flatten`` of a batch-first tensor gives); this is checked by
    backpropagating the first and the last example alone, and None is returned
    when it fails (or for a convolution with ``L != N``), so that the caller
    falls back to the per-example ``torch.func`` Jacobian. Without
    ``per_example`` (KFAC) the ``L`` rows are returned as they are.
    """
    owner = _owners(model, params)
    layers = list({id(m): m for m in owner.values()}.values())
    if len(owner) < len(params) or not all(_is_fast_layer(m) for m in layers):
        return None
    with _Tape(layers, keep_graph=create_graph) as tape, torch.enable_grad():
        f = model(x)
    if outputs_2d and f.ndim != 2:
        return None
    if not tape.single_calls() or not all(
        tape.records[id(m)][0][1].requires_grad for m in layers
    ):
        return None
    f_detached = f.detach()
    M = factor_fn(f_detached)  # (N, C, K)
    outputs = [tape.records[id(m)][0][1] for m in layers]
    inputs = [tape.records[id(m)][0][0] for m in layers]
    N = f.shape[0]
    regroup = per_example and any(a.shape[0] != N for a in inputs)
    if regroup and not _rows_grouped_by_example(f, layers, inputs, outputs):
        return None
    grads = torch.autograd.grad(
        f,
        outputs,
        grad_outputs=M.permute(2, 0, 1),
        is_grads_batched=True,
        create_graph=create_graph,
    )
    per_layer = list(zip(layers, inputs, grads))
    if regroup:
        per_layer = [_group_rows(m, a, g, N) for m, a, g in per_layer]
    return (f if create_graph else f_detached), per_layer


def _group_rows(module, a: torch.Tensor, g: torch.Tensor, N: int):
    """``a`` ``(L, ..., in)`` and ``g`` ``(K, L, ..., out)`` of a linear layer as
    ``(N, L/N, ..., in)`` and ``(K, N, L/N, ..., out)``."""
    if a.shape[0] == N:
        return module, a, g
    return module, a.unflatten(0, (N, -1)), g.unflatten(1, (N, -1))


def _rows_grouped_by_example(f, layers, inputs, outputs) -> bool:
    """Whether every layer's rows split into ``N`` consecutive equal groups, one per
    example: the output gradients of the first and of the last example alone must
    vanish outside their group (one batched backward pass of two vectors).

    Convolutions with ``L != N`` rows are not grouped (False).
    """
    N = f.shape[0]
    for m, a in zip(layers, inputs):
        if a.shape[0] != N and (a.shape[0] % N or not isinstance(m, nn.Linear)):
            return False
    probe = torch.zeros(2, *f.shape, dtype=f.dtype, device=f.device)
    probe[0, 0] = 1.0 + torch.rand(f.shape[1:], dtype=f.dtype, device=f.device)
    probe[1, -1] = 1.0 + torch.rand(f.shape[1:], dtype=f.dtype, device=f.device)
    grads = torch.autograd.grad(
        f, outputs, grad_outputs=probe, is_grads_batched=True, retain_graph=True
    )
    for a, g in zip(inputs, grads):
        group = a.shape[0] // N
        outside_first = g[0, group:]
        outside_last = g[1, : a.shape[0] - group]
        if bool(outside_first.ne(0).any()) or bool(outside_last.ne(0).any()):
            return False
    return True


def _fast_route(model, params, x, factor_fn, diagonal: bool):
    found = backprop_to_layers(model, params, x, factor_fn)
    if found is None:
        return None
    f, per_layer = found
    per_param: dict[int, torch.Tensor] = {}
    for module, a, g in per_layer:
        terms = (_layer_diag if diagonal else _layer_vectors)(module, a, g)
        for name, value in terms.items():
            per_param[id(getattr(module, name))] = value
    pieces = [per_param[id(p)] for p in params]
    return f, torch.cat(pieces, dim=-1)


def jacobian(
    model: nn.Module, params: Sequence[nn.Parameter], x, create_graph: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Jacobian ``(N, C, P)`` of the outputs w.r.t. ``params`` and outputs ``(N, C)``.

    Computed per example with ``torch.func`` (``vmap`` of ``jacrev``); mapping inputs
    are mapped over the leading dimension of every tensor they hold.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    primals = {names[id(p)]: p.detach() for p in params}
    rebuild = _mapping_rebuilder(x)

    def forward(theta, xi):
        xi = _unsqueeze(xi)
        out = functional_call(model, theta, (rebuild(xi),)).squeeze(0)
        return out, out

    data = dict(x) if isinstance(x, MutableMapping) else x
    jac, f = vmap(jacrev(forward, has_aux=True), in_dims=(None, 0))(primals, data)
    J = torch.cat([jac[name].flatten(start_dim=2) for name in primals], dim=-1)
    if not create_graph:
        J, f = J.detach(), f.detach()
    return J, f


def _unsqueeze(xi):
    if isinstance(xi, dict):
        return {k: v.unsqueeze(0) for k, v in xi.items()}
    return xi.unsqueeze(0)


def _mapping_rebuilder(x):
    if isinstance(x, MutableMapping) and type(x) is not dict:
        cls = type(x)
        return lambda d: cls(d)
    return lambda d: d


def _generic_route(model, params, x, factor_fn, diagonal: bool):
    J, f = jacobian(model, params, x)
    M = factor_fn(f)
    V = torch.einsum("ncp,nck->knp", J, M)
    return f, (V.square().sum((0, 1)) if diagonal else V)


def per_example_vectors(model, params, x, factor_fn: FactorFn, indices=None):
    """Return outputs ``f`` ``(N, C)`` and vectors ``V`` ``(K, N, P)``.

    With ``indices`` (into the concatenation of ``params``), only those entries of
    each vector, in that order: ``V`` is ``(K, N, len(indices))`` and no ``(K, N, P)``
    tensor is formed on the fast route (only the layers holding a selected entry are
    reached by the backward pass).
    """
    if indices is None:
        result = _fast_route(model, params, x, factor_fn, diagonal=False)
        return result or _generic_route(model, params, x, factor_fn, diagonal=False)
    groups = _index_groups(params, indices)
    held = [p for p, _, _ in groups]
    found = backprop_to_layers(model, held, x, factor_fn)
    if found is None:
        J, f = jacobian(model, held, x)
        local = torch.cat(
            [_offset(groups, i) + loc for i, (_, loc, _) in enumerate(groups)]
        )
        order = torch.cat([cols for _, _, cols in groups])
        V = J.new_empty(J.shape[0], J.shape[1], len(order))
        V[:, :, order] = J[:, :, local]
        return f, torch.einsum("ncs,nck->kns", V, factor_fn(f))
    f, per_layer = found
    by_param = {id(p): (loc, cols) for p, loc, cols in groups}
    V = None
    for module, a, g in per_layer:
        a, g = layer_terms(module, a, g)  # (N, T, in), (K, N, T, out)
        for name in ("weight", "bias"):
            p = getattr(module, name, None)
            if p is None or id(p) not in by_param:
                continue
            loc, cols = by_param[id(p)]
            if V is None:
                V = g.new_empty(g.shape[0], g.shape[1], len(indices))
            if name == "bias":
                V[:, :, cols] = g.sum(2)[..., loc]
                continue
            n_in = a.shape[-1]
            out_idx, in_idx = loc // n_in, loc % n_in
            V[:, :, cols] = torch.einsum(
                "knts,nts->kns", g[..., out_idx], a[..., in_idx]
            )
    return f, V


def _index_groups(params, indices):
    """Split ``indices`` into the parameters holding them: ``[(param, positions in
    the param, columns of the result)]`` in parameter order, empty groups dropped."""
    indices = torch.as_tensor(indices)
    columns = torch.arange(len(indices), device=indices.device)
    groups, start = [], 0
    for p in params:
        stop = start + p.numel()
        mask = (indices >= start) & (indices < stop)
        if bool(mask.any()):
            groups.append((p, indices[mask] - start, columns[mask]))
        start = stop
    return groups


def _offset(groups, i):
    return sum(p.numel() for p, _, _ in groups[:i])


def outer_product_diag(model, params, x, factor_fn: FactorFn):
    """Return outputs ``f`` ``(N, C)`` and ``diag(sum_nk v_nk v_nk^T)`` ``(P,)``."""
    result = _fast_route(model, params, x, factor_fn, diagonal=True)
    return result or _generic_route(model, params, x, factor_fn, diagonal=True)


def outer_product_full(model, params, x, factor_fn: FactorFn, indices=None):
    """Return outputs ``f`` and ``sum_nk v_nk v_nk^T`` ``(P, P)`` (or its submatrix
    over ``indices``) as one symmetric rank-``KN`` update."""
    f, V = per_example_vectors(model, params, x, factor_fn, indices)
    return f, symmetric_gram(V.reshape(-1, V.shape[-1]))


def symmetric_gram(V: torch.Tensor, block: int = 512) -> torch.Tensor:
    """``V^T V`` ``(P, P)`` for ``V`` ``(M, P)`` at about half the cost of ``V.T @ V``.

    Only the blocks on and below the diagonal are multiplied (``P^2 M (1 + block/P)
    / 2`` multiply-adds, the work of a symmetric rank-``M`` update); the upper
    triangle is then copied from the lower one.
    """
    P = V.shape[1]
    if P <= block:
        return V.T @ V
    H = V.new_empty(P, P)
    for start in range(0, P, block):
        stop = min(start + block, P)
        H[start:stop, :stop] = V[:, start:stop].T @ V[:, :stop]
    for start in range(block, P, block):
        stop = min(start + block, P)
        H[:start, start:stop] = H[start:stop, :start].T
    return H


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


def jacobian_factors(model: nn.Module, params: Sequence[nn.Parameter], x):
    r"""The Jacobian of every output, layer by layer, without forming it.

    For a weight of an ``nn.Linear``/``nn.Conv2d`` layer the Jacobian of output ``c``
    is ``sum_t g_{ct} a_t^T``, with ``a`` the layer input (patches for a convolution)
    at position ``t`` and ``g_c`` the derivative of output ``c`` w.r.t. the layer
    output; for its bias it is ``sum_t g_{ct}``. One batched backward pass of the
    identity gives every ``g``.

    Returns
    -------
    None, when a parameter lives outside such layers (or a layer is called twice);
    otherwise ``(f, factors)`` with ``f`` the detached outputs ``(N, C)`` and one
    entry per parameter of ``params``: ``(a, g)`` with ``a`` ``(N, T, in)`` and ``g``
    ``(C, N, T, out)`` for a weight, ``(None, g)`` with ``g`` ``(C, N, out)`` for a
    bias.
    """
    found = backprop_to_layers(model, params, x, identity_factor, outputs_2d=True)
    if found is None:
        return None
    f, per_layer = found
    per_param: dict[int, tuple] = {}
    for module, a, g in per_layer:
        a, g = layer_terms(module, a, g)
        if module.weight.requires_grad:
            per_param[id(module.weight)] = (a, g)
        if module.bias is not None and module.bias.requires_grad:
            per_param[id(module.bias)] = (None, g.sum(2))
    return f, [per_param[id(p)] for p in params]


def kfac_factors(model: nn.Module, params: Sequence[nn.Parameter], x, factor_fn):
    r"""KFAC factors of every layer from one batched backward pass of ``M``.

    With the layer input ``a`` (patches for a convolution, ``T`` positions) and the
    backpropagated columns ``g_k`` of the output-Hessian factor ``M``:
    ``G = sum_{n,k,t} g_{nkt} g_{nkt}^T`` and ``A_sum = sum_n (1/T) sum_t a_{nt}
    a_{nt}^T`` (the canonical form of ``laplace.curvature.kron_assembly``).

    Returns
    -------
    None when a parameter lives outside ``nn.Linear``/``nn.Conv2d`` layers called
    once; otherwise ``(f, {id(module): (G, A_sum or None)})`` with ``A_sum`` None
    for a layer whose weight is frozen.
    """
    found = backprop_to_layers(model, params, x, factor_fn, per_example=False)
    if found is None:
        return None
    f, per_layer = found
    factors = {}
    for module, a, g in per_layer:
        a, g = layer_terms(module, a, g)
        g = g.reshape(-1, g.shape[-1])
        G = g.T @ g
        A = None
        if module.weight.requires_grad:
            T = a.shape[1]
            a = a.reshape(-1, a.shape[-1])
            A = a.T @ a
            if T > 1:
                A.div_(T)
        factors[id(module)] = (G, A)
    return f, factors
