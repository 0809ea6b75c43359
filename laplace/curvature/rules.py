r"""Per-module rules of the curvature engine (``laplace.curvature.engine``).

A rule knows how one kind of module uses its parameters. On the forward pass it
records what it needs (``Rule.forward``) and names the tensors ("taps") whose
gradients it needs; after one batched backward pass of the columns of a factor
``M`` ``(N, C, K)`` of the output Hessian it turns the recorded inputs and the
backpropagated gradients into *terms* (``Rule.terms``), one per parameter:

- ``Outer(a, g, g_rows)``: the parameter viewed as a matrix has per-example
  gradients ``sum_t g_{knt} a_{nt}^T`` (``g_rows``: the view is ``(n_g, n_a)``) or
  their transpose ``sum_t a_{nt} g_{knt}^T`` (the view is ``(n_a, n_g)``), with
  ``a`` ``(N, T, n_a)`` from the forward pass (``T`` positions sharing the weight)
  and ``g`` ``(K, N, T, n_g)`` from the backward pass. ``a`` may be given as
  one-hot token ids (``index`` ``(N, T)``, an embedding), never formed densely.
- ``Vectors(V)``: the per-example gradients ``V`` ``(K, N, numel)`` themselves
  (elementwise affine parameters of normalization layers, the generic fallback).

The engine derives every structure from the terms alone (per-example gradients,
the exact diagonal, the dense matrix, Kronecker factors, Jacobian factors), so a
rule holds no formula of any structure. The table ``RULES`` is searched in order;
the first rule whose ``applies`` is true handles the module (the table is
``laplace.curvature.engine.RULES``). A parameter no rule
covers gets the generic ``Fallback``: per-example gradients of its module by
``torch.func`` on that module alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

Tensor = torch.Tensor


@dataclass
class Outer:
    """Per-example gradients ``sum_t g_t a_t^T`` (or the transpose) of a parameter
    viewed as an ``(n_g, n_a)`` (``g_rows``) or ``(n_a, n_g)`` matrix.

    Attributes
    ----------
    a : ``(N, T, n_a)`` forward-side factor, or None when ``index`` is given
    g : ``(K, N, T, n_g)`` backpropagated factor
    g_rows : whether ``g`` indexes the rows of the parameter's matrix view
    index : ``(N, T)`` integer ids: ``a`` is ``one_hot(index, n_a)``
    n_a : size of the forward side (needed with ``index``)
    skip : an id not counted in the forward side's factor (an embedding's
        ``padding_idx``: its row gets no gradient, and ``g`` is zero there), or None
    """

    a: Tensor | None
    g: Tensor
    g_rows: bool = True
    index: Tensor | None = None
    n_a: int = 0
    skip: int | None = None

    def __post_init__(self) -> None:
        if self.a is not None:
            self.n_a = self.a.shape[-1]

    @property
    def view(self) -> tuple[int, int]:
        """The ``(rows, columns)`` of the parameter's matrix view."""
        n_g = self.g.shape[-1]
        return (n_g, self.n_a) if self.g_rows else (self.n_a, n_g)

    @property
    def positions(self) -> int:
        return self.g.shape[2]

    def dense_a(self) -> Tensor:
        """The forward-side factor ``(N, T, n_a)`` (one-hot formed if needed)."""
        if self.a is not None:
            return self.a
        return F.one_hot(self.index, self.n_a).to(self.g.dtype)

    def rows(self, n: slice) -> Outer:
        """The term restricted to the examples ``n``."""
        return Outer(
            None if self.a is None else self.a[n],
            self.g[:, n],
            self.g_rows,
            None if self.index is None else self.index[n],
            self.n_a,
            self.skip,
        )


@dataclass
class Vectors:
    """Per-example gradients ``V`` ``(K, N, numel)`` of a parameter."""

    V: Tensor

    def rows(self, n: slice) -> Vectors:
        return Vectors(self.V[:, n])


Term = Outer | Vectors


@dataclass
class Record:
    """What a rule keeps from one call of its module."""

    #: the tensors whose gradients the rule needs (output of the call by default)
    taps: list[Tensor]
    #: rule-specific data (inputs, normalized inputs, ...)
    data: Any = None
    #: leading dimension of the module's input (rows it treats as a batch)
    rows: int = 0


class Rule:
    """How a module type uses its parameters (see the module docstring)."""

    name = "rule"
    #: what its terms are: ``Outer`` (a Kronecker-factored block) or ``Vectors``
    produces: type = Outer

    def applies(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def positionwise(self, module: nn.Module) -> bool:
        """Whether the module acts alike on every entry of its input's leading
        dimensions, so that the batch may sit in any of them (sequence-first)."""
        return False

    def parameters(self, module: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters this rule covers for ``module``, by name."""
        return dict(module.named_parameters(recurse=False))

    def forward(self, module, args, kwargs, output) -> tuple[Record, Any]:
        """A ``Record`` of one call and the output to pass on (None keeps it)."""
        raise NotImplementedError

    def terms(self, module, record: Record, grads: list[Tensor]) -> dict[str, Term]:
        """Terms ``{name: Outer | Vectors}`` for the covered parameters."""
        raise NotImplementedError


def _first_tensor(args, kwargs, name: str) -> Tensor:
    if args:
        return args[0]
    return kwargs[name]


def _flat_positions(t: Tensor) -> Tensor:
    """``(L, ..., d)`` -> ``(L, T, d)``."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _bias_term(g: Tensor) -> Outer:
    """A bias: ``a = 1`` at every position."""
    ones = g.new_ones(g.shape[1], g.shape[2], 1)
    return Outer(ones, g)


class LinearRule(Rule):
    """``nn.Linear`` over any leading dimensions: ``out = a W^T + b``."""

    name = "linear"

    def positionwise(self, module):
        return True

    def applies(self, module):
        return isinstance(module, nn.Linear)

    def forward(self, module, args, kwargs, output):
        a = _first_tensor(args, kwargs, "input")
        return Record([output], a, a.shape[0] if a.ndim > 1 else 1), None

    def terms(self, module, record, grads):
        a = record.data
        if a.ndim == 1:  # a single unbatched vector
            a = a[None]
        (g,) = grads
        g = g.reshape(g.shape[0], a.shape[0], -1, g.shape[-1])
        a = _flat_positions(a)
        out: dict[str, Term] = {"weight": Outer(a, g)}
        if module.bias is not None:
            out["bias"] = _bias_term(g)
        return out


class TransposedLinearRule(Rule):
    """``transformers``' ``Conv1D`` (GPT-2): ``out = a W + b``, ``W`` ``(in, out)``."""

    name = "conv1d-transposed"

    def positionwise(self, module):
        return True

    def applies(self, module):
        return type(module).__name__ == "Conv1D" and hasattr(module, "nf")

    def forward(self, module, args, kwargs, output):
        a = _first_tensor(args, kwargs, "x")
        return Record([output], a, a.shape[0]), None

    def terms(self, module, record, grads):
        a = _flat_positions(record.data)
        (g,) = grads
        g = g.reshape(g.shape[0], a.shape[0], -1, g.shape[-1])
        return {"weight": Outer(a, g, g_rows=False), "bias": _bias_term(g)}


class ConvRule(Rule):
    """``nn.Conv1d/2d/3d`` (any stride, padding, dilation; ``groups == 1``):
    a linear map of the input patches at every output position."""

    name = "conv"

    def applies(self, module):
        return (
            isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups == 1
        )

    def forward(self, module, args, kwargs, output):
        a = _first_tensor(args, kwargs, "input")
        unbatched = a.ndim == len(module.kernel_size) + 1  # (in, *size): one row
        return Record([output], a, 1 if unbatched else a.shape[0]), None

    def terms(self, module, record, grads):
        a = conv_patches(module, record.data)  # (N, T, in * prod(k))
        (g,) = grads
        if g.ndim == len(module.kernel_size) + 2:  # an unbatched output: one row
            g = g[:, None]
        g = g.flatten(start_dim=3).transpose(2, 3)  # (K, N, T, out)
        out: dict[str, Term] = {"weight": Outer(a, g)}
        if module.bias is not None:
            out["bias"] = _bias_term(g)
        return out


def conv_patches(module: nn.Module, x: Tensor) -> Tensor:
    """Input patches ``(N, T, in * prod(kernel))`` of a convolution, ordered as
    its flattened weight ``(out, in, *kernel)``; ``T`` output positions."""
    d = x.ndim - 2
    unbatched = d < len(module.kernel_size)
    if unbatched:
        x = x[None]
        d += 1
    x = _pad(module, x)
    k, s, dil = module.kernel_size, module.stride, module.dilation
    patches = x
    for i in range(d):
        span = dil[i] * (k[i] - 1) + 1
        patches = patches.unfold(2 + i, span, s[i])
        if dil[i] > 1:
            patches = patches[..., :: dil[i]]
    # (N, in, out_1..out_d, k_1..k_d) -> (N, out positions, in * k)
    N, C = patches.shape[:2]
    positions = patches.shape[2 : 2 + d]
    patches = patches.permute(0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d))
    return patches.reshape(N, math.prod(positions), C * math.prod(k))


def _pad(module: nn.Module, x: Tensor) -> Tensor:
    d = x.ndim - 2
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return x
        pads: list[int] = []
        for i in reversed(range(d)):  # 'same'
            total = module.dilation[i] * (module.kernel_size[i] - 1)
            pads += [total // 2, total - total // 2]
    else:
        pads = [p for i in reversed(range(d)) for p in (module.padding[i],) * 2]
    if not any(pads):
        return x
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, pads, mode=mode)


class EmbeddingRule(Rule):
    """``nn.Embedding``: ``out_t = W[i_t]``, the weight ``(V, D)`` viewed with the
    one-hot ids on its rows. ``max_norm`` renormalizes rows and is refused."""

    name = "embedding"

    def positionwise(self, module):
        return True

    def applies(self, module):
        return isinstance(module, nn.Embedding) and module.max_norm is None

    def forward(self, module, args, kwargs, output):
        idx = _first_tensor(args, kwargs, "input")
        # ids (L,): L rows of one position (flattened examples, or positions shared
        # by all examples: the engine tells which)
        return Record([output], idx, idx.shape[0] if idx.ndim else 1), None

    def terms(self, module, record, grads):
        idx = record.data
        idx = idx.reshape(idx.shape[0] if idx.ndim else 1, -1)
        (g,) = grads
        g = g.reshape(g.shape[0], idx.shape[0], -1, g.shape[-1])
        if module.padding_idx is not None:  # its row gets no gradient
            g = g * (idx != module.padding_idx)[None, :, :, None].to(g.dtype)
        term = Outer(
            None,
            g,
            g_rows=False,
            index=idx,
            n_a=module.num_embeddings,
            skip=module.padding_idx,
        )
        return {"weight": term}


class NormRule(Rule):
    """Elementwise affine parameters of normalization layers, ``out = w * xhat + b``
    (``nn.LayerNorm``, ``nn.BatchNorm*``, ``nn.GroupNorm``, ``nn.InstanceNorm*``,
    ``nn.RMSNorm``, and RMSNorm classes of ``transformers``): per-example gradients
    ``sum over positions of g * xhat`` and ``sum of g``."""

    name = "norm"
    produces = Vectors
    _TORCH = (
        nn.LayerNorm,
        nn.GroupNorm,
        nn.modules.batchnorm._BatchNorm,
        nn.modules.instancenorm._InstanceNorm,
        nn.RMSNorm,
    )

    def applies(self, module):
        if isinstance(module, self._TORCH):
            return True
        return _is_rms_norm(module)

    def positionwise(self, module):
        return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or _is_rms_norm(module)

    def forward(self, module, args, kwargs, output):
        x = _first_tensor(args, kwargs, "input")
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
            module.training or module.running_mean is None
        ):
            raise ValueError(
                f"{type(module).__name__} normalizes with the statistics of the batch "
                "(training mode, or track_running_stats=False), which couples the "
                "examples: their curvature is not a sum over examples. Call "
                "model.eval() (Laplace.fit does) with running statistics."
            )
        with torch.no_grad():
            xhat = normalized(module, x, output)
        return Record([output], xhat, x.shape[0]), None

    def terms(self, module, record, grads):
        xhat = record.data
        (g,) = grads
        if not self.positionwise(
            module
        ):  # channel first  # (N, C, ...): parameters per channel
            dims = tuple(range(3, g.ndim))
            w = (g * xhat).sum(dims) if dims else g * xhat
            b = g.sum(dims) if dims else g
        else:  # (N, ..., *shape): parameters over the trailing shape
            shape = module.weight.shape if module.weight is not None else None
            shape = shape or module.bias.shape
            lead = g.ndim - len(shape)
            dims = tuple(range(2, lead))
            w = (g * xhat).sum(dims) if dims else g * xhat
            b = g.sum(dims) if dims else g
        K, N = g.shape[:2]
        out: dict[str, Term] = {}
        if getattr(module, "weight", None) is not None:
            out["weight"] = Vectors(w.reshape(K, N, -1))
        if getattr(module, "bias", None) is not None:
            out["bias"] = Vectors(b.reshape(K, N, -1))
        return out


def _is_rms_norm(module: nn.Module) -> bool:
    """A ``transformers``-style RMSNorm: a class named ``*RMSNorm`` holding one
    vector ``weight`` and no other parameter."""
    if not type(module).__name__.endswith("RMSNorm"):
        return False
    params = dict(module.named_parameters(recurse=False))
    return list(params) == ["weight"] and params["weight"].ndim == 1


def normalized(module: nn.Module, x: Tensor, output: Tensor) -> Tensor:
    """``xhat``, the input normalized as the module does before its affine map."""
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, eps=module.eps)
    if isinstance(module, nn.RMSNorm):
        return F.rms_norm(x, module.normalized_shape, eps=module.eps)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, eps=module.eps)
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        use_stats = module.track_running_stats and not module.training
        return F.instance_norm(
            x,
            module.running_mean if use_stats else None,
            module.running_var if use_stats else None,
            use_input_stats=not use_stats,
            eps=module.eps,
        )
    if isinstance(module, nn.modules.batchnorm._BatchNorm):  # running statistics
        return F.batch_norm(
            x, module.running_mean, module.running_var, training=False, eps=module.eps
        )
    # an RMSNorm of another library: affine in its weight, so the difference of
    # the outputs at ``w + 1`` and ``w`` is ``xhat`` (also for ``(1 + w) xhat``)
    w = module.weight
    shifted = torch.func.functional_call(module, {"weight": w.detach() + 1}, (x,))
    return (shifted - output).detach()


class Fallback(Rule):
    """Any module: per-example gradients of the module alone by ``torch.func``
    (``vmap`` of ``vjp`` over its rows), for the parameters no rule covers.

    The module's own forward must treat its rows independently; the user's model
    as a whole is never mapped over, except when a parameter is used directly in
    the forward of the model itself.
    """

    name = "fallback"
    produces = Vectors

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)

    def applies(self, module):
        return True

    def parameters(self, module):
        # own parameters, or a submodule's by its dotted name (used outside it)
        own = dict(module.named_parameters(remove_duplicate=False))
        return {n: own[n] for n in self.names}

    def forward(self, module, args, kwargs, output):
        outputs = _tensors(output)
        keep = [t.requires_grad for t in outputs]
        taps = [t for t, k in zip(outputs, keep) if k]
        return Record(taps, (args, kwargs, keep), _rows(args, kwargs)), None

    def terms(self, module, record, grads):
        args, kwargs, keep = record.data
        L = record.rows
        served = self.parameters(module)
        holders = _holders(module, served)
        theta = {h: p.detach() for n, p in served.items() for h in holders[n]}
        leaves, spec = torch.utils._pytree.tree_flatten((args, kwargs))
        batched = [
            isinstance(t, Tensor) and t.ndim > 0 and t.shape[0] == L for t in leaves
        ]

        def row_gradient(row_leaves, cotangents):
            call = torch.utils._pytree.tree_unflatten(
                [x.unsqueeze(0) if b else x for x, b in zip(row_leaves, batched)],
                spec,
            )

            def outputs(th):
                out = torch.func.functional_call(
                    module, th, call[0], call[1], tie_weights=False
                )
                return [t for t, k in zip(_tensors(out), keep) if k]

            _, vjp_fn = torch.func.vjp(outputs, theta)
            return vjp_fn([c.unsqueeze(0) for c in cotangents])[0]

        leaf_dims = [0 if b else None for b in batched]
        over_rows = torch.func.vmap(row_gradient, in_dims=(leaf_dims, 0))
        over_columns = torch.func.vmap(over_rows, in_dims=(None, 0))
        try:
            V = over_columns(leaves, list(grads))
        except Exception as err:  # noqa: BLE001 - reported with the parameters
            raise RuntimeError(
                f"The curvature engine has no rule for {type(module).__name__} and "
                f"could not compute the per-example gradients of its parameters "
                f"{sorted(served)} with torch.func ({type(err).__name__}: {err}). "
                "Freeze these parameters (requires_grad=False), use last-layer "
                "or subnetwork Laplace, or a library backend."
            ) from err
        K = grads[0].shape[0]
        return {
            n: Vectors(sum(V[h] for h in holders[n]).reshape(K, L, -1)) for n in served
        }


def _holders(module: nn.Module, served: dict[str, nn.Parameter]) -> dict:
    """For each served parameter, one of its names per module object holding it
    (a weight tied between two modules has two; a module registered under two
    names holds it once). ``functional_call`` gets each holder once, untied:
    torch's own tying, or setting one module twice, leaves that module with a
    plain tensor in place of its parameter afterwards (torch 2.13)."""
    holders: dict[str, list[str]] = {n: [] for n in served}
    seen: set[tuple[int, str]] = set()
    for name, q in module.named_parameters(remove_duplicate=False):
        owner, _, attr = name.rpartition(".")
        key = (id(module.get_submodule(owner)), attr)
        for n, p in served.items():
            if q is p and key not in seen:
                seen.add(key)
                holders[n].append(name)
    return holders


def _tensors(obj) -> list[Tensor]:
    """The tensors of a (nested) output, in a fixed order."""
    leaves, _ = torch.utils._pytree.tree_flatten(obj)
    return [t for t in leaves if isinstance(t, Tensor)]


def _rows(args, kwargs) -> int:
    """The leading dimension of the first tensor argument (1 if there is none)."""
    for t in _tensors((args, kwargs)):
        if t.ndim > 0:
            return t.shape[0]
    return 1
