r"""Inner products of network Jacobians, ``J(X) J(X')^T``, without the Jacobians.

The kernel of the GP view is ``k(x, x') = J(x) P0^-1 J(x')^T`` (scalar prior:
``J J^T / p0``). For a parameter of an ``nn.Linear`` layer the Jacobian of output
``c`` at datum ``n`` is ``g_{cn} a_n^T`` (weight) and ``g_{cn}`` (bias), with ``a_n``
the layer input and ``g_{cn}`` the derivative of output ``c`` w.r.t. the layer
output (``laplace.curvature.backprop_factor.backprop_to_layers``). So

$$
    \langle J_{cn}, J'_{dm} \rangle_{\text{layer}}
    = (g_{cn}^\top g'_{dm}) \, (a_n^\top a'_m + 1):
$$

one ``(N C, out) @ (out, M C)`` and one ``(N, in) @ (in, M)`` product per layer
instead of ``(N C, P) @ (P, M C)``, and never the ``(N, C, P)`` Jacobian. A layer
whose weight is shared over positions (``nn.Conv2d``) keeps its per-example weight
Jacobian ``(N, C, out * in)``; a model with other parameters uses the Jacobian from
``torch.func`` for all of them. A ``JacobianSet`` holds either form for a set
of inputs; ``gram`` and ``JacobianSet.self_blocks`` give the inner
products, ordered datum-major ``(n, c)`` -- or, for independent outputs, only the
``c = d`` blocks, shape ``(C, N, M)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from laplace.curvature import backprop_factor, engine, structures
from laplace.curvature.rules import Outer

Tensor = torch.Tensor


@dataclass
class LayerJacobian:
    """The Jacobian of all outputs w.r.t. one layer's treated parameters, factored.

    Attributes
    ----------
    module : the layer (``weight`` and ``bias`` are read from it).
    n : the number of data ``N``.
    g : ``(C, N, out)`` derivative of each output w.r.t. the layer output (summed
        over positions for a shared weight: the bias Jacobian); None when the layer
        output is the network output (``g_c = e_c``, a last layer).
    a : ``(N, in)`` layer input, when the weight is treated and not shared.
    shared : ``(N, C, out * in)`` per-example weight Jacobian, when the weight is
        treated and shared over positions.
    bias : whether the bias is treated.
    dtype : the dtype of the entries when they are not the module's (a 16-bit
        model's Jacobians taken to float32: ``JacobianSet.to``), else None.
    """

    module: nn.Module
    n: int
    g: Tensor | None
    a: Tensor | None = None
    shared: Tensor | None = None
    bias: bool = False
    dtype: torch.dtype | None = None

    def select(self, rows: slice) -> LayerJacobian:
        return LayerJacobian(
            self.module,
            len(range(*rows.indices(self.n))),
            None if self.g is None else self.g[:, rows],
            None if self.a is None else self.a[rows],
            None if self.shared is None else self.shared[rows],
            self.bias,
            self.dtype,
        )

    def to(self, dtype: torch.dtype) -> LayerJacobian:
        """The same Jacobian with its entries in ``dtype``."""
        g, a, shared = (
            None if t is None else t.to(dtype) for t in (self.g, self.a, self.shared)
        )
        return LayerJacobian(self.module, self.n, g, a, shared, self.bias, dtype)

    def _ones_like_entries(self, shape: tuple[int, ...]) -> Tensor:
        """Ones in the entries' dtype, on the module's device."""
        ref = self.module.bias if self.module.bias is not None else self.module.weight
        return torch.ones(shape, dtype=self.dtype or ref.dtype, device=ref.device)

    def numel(self) -> int:
        return sum(t.numel() for t in (self.g, self.a, self.shared) if t is not None)

    def dense(self, n_outputs: int) -> dict[int, Tensor]:
        """``{id(param): (N, C, numel)}`` explicit Jacobian columns."""
        g = self._g(n_outputs)
        out: dict[int, Tensor] = {}
        if self.a is not None:
            term = Outer(self.a[:, None], g[:, :, None])  # one position
            J = structures.term_vectors(term, g.shape[-1] * self.a.shape[-1])
            out[id(self.module.weight)] = J.transpose(0, 1)
        if self.shared is not None:
            out[id(self.module.weight)] = self.shared
        if self.bias:
            out[id(self.module.bias)] = g.permute(1, 0, 2)
        return out

    def _g(self, n_outputs: int) -> Tensor:
        if self.g is not None:
            return self.g
        ref = self.module.weight
        eye = torch.eye(n_outputs, dtype=self.dtype or ref.dtype, device=ref.device)
        return eye[:, None, :].expand(n_outputs, self.n, n_outputs)


@dataclass
class JacobianSet:
    """The Jacobians ``(N, C, P)`` of the outputs at ``N`` inputs, in a form whose
    inner products are cheap: factored layers, explicit columns, or both."""

    n: int
    n_outputs: int
    layers: list[LayerJacobian]
    #: ``(N, C, P)`` explicit Jacobian in parameter order (generic models), or None
    explicit: Tensor | None = None

    def numel(self) -> int:
        total = sum(layer.numel() for layer in self.layers)
        return total + (0 if self.explicit is None else self.explicit.numel())

    def select(self, rows: slice) -> JacobianSet:
        n = len(range(*rows.indices(self.n)))
        explicit = None if self.explicit is None else self.explicit[rows]
        return JacobianSet(
            n, self.n_outputs, [la.select(rows) for la in self.layers], explicit
        )

    def to(self, dtype: torch.dtype) -> JacobianSet:
        """The same Jacobians with their entries in ``dtype`` (a 16-bit model's
        taken to float32 for the linear algebra that follows)."""
        explicit = None if self.explicit is None else self.explicit.to(dtype)
        layers = [layer.to(dtype) for layer in self.layers]
        return JacobianSet(self.n, self.n_outputs, layers, explicit)

    def dense(self, params: Sequence[nn.Parameter]) -> Tensor:
        """The explicit Jacobian ``(N, C, P)`` in the order of ``params``."""
        if self.explicit is not None:
            return self.explicit
        columns: dict[int, Tensor] = {}
        for layer in self.layers:
            columns.update(layer.dense(self.n_outputs))
        return torch.cat([columns[id(p)] for p in params], dim=-1)

    def self_blocks(self, independent: bool) -> Tensor:
        """``J_n J_n^T`` per datum: ``(N, C, C)``, or its diagonal ``(N, C)``."""
        C = self.n_outputs
        total = None
        for layer in self.layers:
            scale = _input_products(layer, layer, diagonal=True)  # (N,) or None
            if scale is None:
                term = 0
            elif layer.g is None:
                eye = torch.eye(C, dtype=scale.dtype, device=scale.device)
                term = scale[:, None] if independent else scale[:, None, None] * eye
                term = term.expand(self.n, C) if independent else term
            else:
                term = _g_products(layer.g, layer.g, independent, diagonal=True)
                term = term * (scale[:, None] if independent else scale[:, None, None])
            if layer.shared is not None:
                term = term + _explicit_products(
                    layer.shared, layer.shared, independent, diagonal=True
                )
            total = term if total is None else total + term
        if self.explicit is not None:
            term = _explicit_products(
                self.explicit, self.explicit, independent, diagonal=True
            )
            total = term if total is None else total + term
        return total


def gram(
    A: JacobianSet,
    B: JacobianSet,
    independent: bool,
    params: Sequence[nn.Parameter] | None = None,
) -> Tensor:
    """``J_A J_B^T``: ``(N_A C, N_B C)`` datum-major, or ``(C, N_A, N_B)`` with
    ``independent`` (only equal outputs).

    Sets of different forms (one explicit, e.g. given Jacobians) are compared via
    their explicit Jacobians in the order of ``params``.
    """
    C = A.n_outputs
    if not _same_form(A, B):
        if params is None:
            raise ValueError("params are needed to compare Jacobians of two forms.")
        A = JacobianSet(A.n, C, [], A.dense(params))
        B = JacobianSet(B.n, C, [], B.dense(params))
    shape = (C, A.n, B.n) if independent else (A.n * C, B.n * C)
    ref = A.explicit if A.explicit is not None else _any_tensor(A.layers[0])
    total = ref.new_zeros(shape)
    for la, lb in zip(A.layers, B.layers, strict=True):
        scale = _input_products(la, lb, diagonal=False)  # (N_A, N_B) or None
        if scale is not None:
            if la.g is None:  # output layer: g_c = e_c
                _add_identity_outputs(total, scale, independent)
            else:
                gg = _g_products(la.g, lb.g, independent, diagonal=False)
                _add_scaled(total, gg, scale, independent)
        if la.shared is not None:
            total += _explicit_products(la.shared, lb.shared, independent, False)
    if A.explicit is not None:
        total += _explicit_products(A.explicit, B.explicit, independent, False)
    return total


def project(X: JacobianSet, V: Tensor, params: Sequence[nn.Parameter]) -> Tensor:
    """``J V`` ``(N, C, k)`` for directions ``V`` ``(P, k)`` in the order of
    ``params``, without the Jacobian: a factored weight gives ``sum_o g_{cno}
    (a_n^T V_o)`` (``(N, out, k)`` in between instead of ``(N, C, out in)``)."""
    if X.explicit is not None:
        return X.explicit @ V
    rows = _param_rows(params)
    k = V.shape[-1]
    total = V.new_zeros(X.n, X.n_outputs, k)
    for layer in X.layers:
        g = layer._g(X.n_outputs)  # (C, N, out)
        if layer.a is not None:
            Vw = V[rows[id(layer.module.weight)]].reshape(g.shape[-1], -1, k)
            total += torch.einsum(
                "cno,nok->nck", g, torch.einsum("ni,oik->nok", layer.a, Vw)
            )
        if layer.shared is not None:
            total += layer.shared @ V[rows[id(layer.module.weight)]]
        if layer.bias:
            total += torch.einsum("cno,ok->nck", g, V[rows[id(layer.module.bias)]])
    return total


def selected_rows(
    X: JacobianSet, outputs: Tensor, params: Sequence[nn.Parameter]
) -> Tensor:
    """The Jacobian row ``(N, P)`` of one output per datum (``outputs`` ``(N,)``),
    in the order of ``params``, without the other outputs' rows."""
    n = torch.arange(X.n, device=outputs.device)
    if X.explicit is not None:
        return X.explicit[n, outputs]
    columns: dict[int, Tensor] = {}
    for layer in X.layers:
        g = layer._g(X.n_outputs)[outputs, n]  # (N, out)
        if layer.a is not None:
            outer = g[:, :, None] * layer.a[:, None, :]
            columns[id(layer.module.weight)] = outer.reshape(X.n, -1)
        if layer.shared is not None:
            columns[id(layer.module.weight)] = layer.shared[n, outputs]
        if layer.bias:
            columns[id(layer.module.bias)] = g
    return torch.cat([columns[id(p)] for p in params], dim=-1)


def _param_rows(params: Sequence[nn.Parameter]) -> dict[int, slice]:
    """The rows of each parameter in a vector over ``params``."""
    rows, start = {}, 0
    for p in params:
        rows[id(p)] = slice(start, start + p.numel())
        start += p.numel()
    return rows


def _same_form(A: JacobianSet, B: JacobianSet) -> bool:
    if (A.explicit is None) != (B.explicit is None) or len(A.layers) != len(B.layers):
        return False
    return all(
        _held(la) == _held(lb)
        and (la.a is None) == (lb.a is None)
        and (la.shared is None) == (lb.shared is None)
        and (la.g is None) == (lb.g is None)
        for la, lb in zip(A.layers, B.layers)
    )


def _held(layer: LayerJacobian) -> tuple[int, int]:
    """Which parameters a layer entry holds (by identity)."""
    return id(getattr(layer.module, "weight", None)), id(layer.module.bias)


def _any_tensor(layer: LayerJacobian) -> Tensor:
    for t in (layer.a, layer.g, layer.shared):
        if t is not None:
            return t
    raise ValueError("empty layer Jacobian")


def _input_products(la: LayerJacobian, lb: LayerJacobian, diagonal: bool):
    """``a a'^T (+ 1 for a bias)``: the factor that multiplies ``g g'^T``; None when
    neither a non-shared weight nor the bias is treated."""
    if la.a is None and not la.bias:
        return None
    if la.a is None:
        return la._ones_like_entries((la.n,) if diagonal else (la.n, lb.n))
    prod = la.a.square().sum(-1) if diagonal else la.a @ lb.a.T
    return prod + 1 if la.bias else prod


def _g_products(ga: Tensor, gb: Tensor, independent: bool, diagonal: bool) -> Tensor:
    """``g g'^T``: ``(C, N_A, N_B)`` (independent), ``(N_A C, N_B C)``; with
    ``diagonal`` (``ga is gb``) per datum ``(N, C)`` or ``(N, C, C)``."""
    if diagonal:
        if independent:
            return ga.square().sum(-1).T
        return torch.einsum("cno,dno->ncd", ga, gb)
    if independent:
        return ga @ gb.transpose(1, 2)
    C = ga.shape[0]
    left = ga.transpose(0, 1).reshape(-1, ga.shape[-1])
    right = gb.transpose(0, 1).reshape(-1, gb.shape[-1])
    return (left @ right.T).reshape(ga.shape[1], C, gb.shape[1], C)


def _add_scaled(total: Tensor, gg: Tensor, scale: Tensor, independent: bool) -> None:
    if independent:
        total.addcmul_(gg, scale)
        return
    total.view(gg.shape).addcmul_(gg, scale[:, None, :, None])


def _add_identity_outputs(total: Tensor, scale: Tensor, independent: bool) -> None:
    """The layer output is the network output: ``<J_c, J'_d> = delta_cd scale``."""
    if independent:
        total += scale
        return
    C = total.shape[0] // scale.shape[0]
    view = total.view(scale.shape[0], C, scale.shape[1], C)
    view.diagonal(dim1=1, dim2=3).add_(scale[:, :, None])


def _explicit_products(Ja: Tensor, Jb: Tensor, independent: bool, diagonal: bool):
    if diagonal:
        if independent:
            return Ja.square().sum(-1)
        return Ja @ Ja.transpose(1, 2)
    if independent:
        return torch.einsum("ncp,mcp->cnm", Ja, Jb)
    return Ja.flatten(0, 1) @ Jb.flatten(0, 1).T


def jacobian_set(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    x,
    create_graph: bool = False,
    output_layer: nn.Module | None = None,
) -> tuple[Tensor, JacobianSet]:
    """Outputs ``(N, C)`` and the ``JacobianSet`` of ``model`` at ``x``.

    ``output_layer``: a layer whose output is the network output (a last layer
    applied to features ``x``); its output gradients are the identity and are not
    backpropagated. ``create_graph`` keeps both differentiable w.r.t. ``x``.
    """
    if output_layer is not None:
        with torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):
            return _output_layer_set(output_layer, params, x)
    tape = engine.run(
        model, params, x, backprop_factor.identity_factor, keep_graph=create_graph
    )
    n, C = tape.f.shape
    return tape.f, JacobianSet(n, C, _param_layers(tape, params))


def _param_layers(tape: structures.Tape, params) -> list[LayerJacobian]:
    """One entry per parameter, except that a bias joins the entry of its weight
    when both are factored over the same output gradients: ``(a a'^T + 1) g g'^T``,
    one product of the ``g`` for the two."""
    layers: list[LayerJacobian] = []
    weights: dict[tuple, int] = {}  # the g of a factored weight -> its entry
    for p in params:
        layer, g_key = _param_layer(tape, p)
        at = weights.pop(g_key, None) if layer.bias else None
        if at is not None:
            w = layers[at]
            holder = SimpleNamespace(weight=w.module.weight, bias=p)
            layers[at] = LayerJacobian(holder, w.n, w.g, w.a, bias=True)
            continue
        if layer.a is not None:
            weights[g_key] = len(layers)
        layers.append(layer)
    return layers


def _param_layer(tape: structures.Tape, p: nn.Parameter) -> tuple[LayerJacobian, tuple]:
    """One parameter's Jacobian: factored for a linear weight used at one position
    (``g a^T``) or a bias (``g``), explicit ``(N, C, numel)`` otherwise; and the key
    of the output gradients it is factored over."""
    terms = tape.of(p)
    n = tape.N
    if len(terms) == 1 and isinstance(terms[0], Outer) and terms[0].g_rows:
        term = terms[0]
        key = structures.same_tensor_key(term.g)
        if p.ndim == 1 and term.n_a == 1:
            holder = SimpleNamespace(weight=None, bias=p)
            return LayerJacobian(holder, n, term.g.sum(2), bias=True), key
        if term.positions == 1 and term.index is None:
            holder = SimpleNamespace(weight=p, bias=None)
            return LayerJacobian(holder, n, term.g[:, :, 0], term.a[:, 0]), key
    J = structures.param_vectors(tape, p).transpose(0, 1)
    layer = LayerJacobian(SimpleNamespace(weight=p, bias=None), n, None, shared=J)
    return layer, ()


def _output_layer_set(layer: nn.Module, params, phi: Tensor):
    if not isinstance(layer, nn.Linear):
        raise TypeError(
            f"The output layer must be nn.Linear; got {type(layer).__name__}."
        )
    wanted = {id(p) for p in params}
    f = layer(phi)
    weight = id(layer.weight) in wanted
    bias = layer.bias is not None and id(layer.bias) in wanted
    entry = LayerJacobian(layer, f.shape[0], None, phi if weight else None, bias=bias)
    return f, JacobianSet(f.shape[0], f.shape[1], [entry])


def cat(sets: Sequence[JacobianSet]) -> JacobianSet:
    """The union of sets of the same model, in order."""
    first = sets[0]
    explicit = None
    if first.explicit is not None:
        explicit = torch.cat([s.explicit for s in sets])
    layers = []
    for i, layer in enumerate(first.layers):
        pieces = [s.layers[i] for s in sets]

        def join(name, dim, pieces=pieces):
            if getattr(pieces[0], name) is None:
                return None
            return torch.cat([getattr(p, name) for p in pieces], dim=dim)

        n = sum(p.n for p in pieces)
        layers.append(
            LayerJacobian(
                layer.module,
                n,
                join("g", 1),
                join("a", 0),
                join("shared", 0),
                layer.bias,
                layer.dtype,
            )
        )
    return JacobianSet(sum(s.n for s in sets), first.n_outputs, layers, explicit)
