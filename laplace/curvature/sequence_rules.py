r"""Rules of the curvature engine for sequence modules: ``nn.MultiheadAttention``,
``nn.LSTM`` and ``nn.GRU`` (see ``laplace.curvature.rules`` for what a rule is).

These modules use their weights inside fused kernels, at many positions, and (the
recurrent ones) at every time step. Each rule's forward hook therefore *replaces*
the module's output by a recomputation of the same values from torch operations
whose graph passes through tensors the rule keeps (taps): the pre-activations of
every linear map inside the module. One backward pass then gives their gradients
``g``, and every weight ``W`` used as ``u_t = W a_t + b`` at positions ``t`` of an
example has the per-example gradient ``sum_t g_t a_t^T``: an ``Outer`` term.

- ``MultiheadAttentionRule``: taps the query, key and value projections and the
  output projection. The packed ``in_proj_weight`` ``(3E, E)`` gets one term whose
  row side is ``[g_q, g_k, g_v]``; when query, key and value are different tensors
  (cross-attention) the inputs are concatenated along the positions and each
  input's gradient block is placed in its third of the row side (zeros elsewhere),
  which is exactly ``sum_t g_{q,t} q_t^T`` etc. stacked.
- ``LSTMRule`` / ``GRURule``: unroll every layer and direction over time. An LSTM
  step adds the input part ``x_t W_ih^T + b_ih`` and the hidden part
  ``h_{t-1} W_hh^T + b_hh`` before its nonlinearities, so one tap of the input
  parts of all steps gives the gradients of both. A GRU multiplies the hidden part
  of its new gate by the reset gate, so the hidden parts are tapped per step.

The recomputations follow ``torch.nn.functional.multi_head_attention_forward`` and
the cell equations of ``nn.LSTM``/``nn.GRU``; the tests check them against the
modules' own outputs. Dropout inside these modules is refused (put the model in
eval mode), as are configurations without a rule here (``add_bias_kv``,
``add_zero_attn``, ``kdim/vdim != embed_dim``, ``proj_size > 0``), which the
engine's generic fallback serves instead.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence

from laplace.curvature.rules import Outer, Record, Rule, Term, _bias_term

Tensor = torch.Tensor


def _bound(forward, module, args, kwargs) -> dict:
    """The arguments of one call of ``module``, by name, defaults filled in."""
    call = inspect.signature(forward).bind(module, *args, **kwargs)
    call.apply_defaults()
    return call.arguments


def _refuse_dropout(module: nn.Module, p: float, active: bool) -> None:
    if module.training and p > 0 and active:
        raise RuntimeError(
            f"{type(module).__name__} is in training mode with dropout={p}: its "
            "outputs are random and the curvature engine cannot recompute them. "
            "Call model.eval() before computing the curvature (or set dropout=0)."
        )


def _batched(module: nn.Module, x, name: str) -> None:
    if isinstance(x, PackedSequence):
        raise TypeError(
            f"The curvature engine's rule for {type(module).__name__} takes padded "
            f"tensors, not a PackedSequence as {name}. Pass the padded batch (with "
            "a mask where the model needs one), or freeze this module."
        )
    if x.ndim != 3:
        raise ValueError(
            f"The curvature engine's rule for {type(module).__name__} needs a "
            f"batched 3-D {name}; got shape {tuple(x.shape)}. Add the batch "
            "dimension."
        )


# -- multi-head attention ------------------------------------------------------------
class MultiheadAttentionRule(Rule):
    """``nn.MultiheadAttention`` with packed in-projections (``kdim == vdim ==
    embed_dim``), without ``add_bias_kv`` and ``add_zero_attn``: self- and
    cross-attention, any ``batch_first``, key-padding and attention masks,
    ``is_causal``, with or without the attention weights.

    Covers ``in_proj_weight``, ``in_proj_bias`` and the parameters of the child
    ``out_proj`` (whose own forward the module never calls).
    """

    name = "multihead-attention"

    def applies(self, module):
        return (
            isinstance(module, nn.MultiheadAttention)
            and module._qkv_same_embed_dim
            and module.bias_k is None
            and module.bias_v is None
            and not module.add_zero_attn
        )

    def parameters(self, module):
        return dict(module.named_parameters())

    def forward(self, module, args, kwargs, output):
        c = _bound(nn.MultiheadAttention.forward, module, args, kwargs)
        _refuse_dropout(module, module.dropout, True)
        inputs = [c["query"], c["key"], c["value"]]
        for name, x in zip(("query", "key", "value"), inputs):
            _batched(module, x, name)
        # the distinct input tensors, batch first, and which projections use each
        groups: list[tuple[Tensor, list[int]]] = []
        for j, x in enumerate(inputs):
            same = next((g for g in groups if g[0] is x), None)
            if same is None:
                groups.append((x, [j]))
            else:
                same[1].append(j)
        if not module.batch_first:
            groups = [(x.transpose(0, 1), uses) for x, uses in groups]
        first = {j: x for x, uses in groups for j in uses}
        W = module.in_proj_weight.chunk(3)
        b = (None,) * 3 if module.in_proj_bias is None else module.in_proj_bias.chunk(3)
        q, k, v = (F.linear(first[j], W[j], b[j]) for j in range(3))
        mask = attention_mask(
            c["attn_mask"],
            c["key_padding_mask"],
            c["is_causal"] and c["key_padding_mask"] is None and not c["need_weights"],
            q.shape[0],
            module.num_heads,
            q.shape[1],
            k.shape[1],
            q.dtype,
        )
        heads, weights = attention(q, k, v, module.num_heads, mask)
        out = F.linear(heads, module.out_proj.weight, module.out_proj.bias)
        new_out = out if module.batch_first else out.transpose(0, 1)
        if not c["need_weights"]:
            weights = None
        elif c["average_attn_weights"]:
            weights = weights.mean(1)
        record = Record([q, k, v, out], (groups, heads), q.shape[0])
        return record, (new_out, weights)

    def terms(self, module, record, grads):
        groups, heads = record.data
        g_proj, g_out = grads[:3], grads[3]
        a, g = _packed_projection(groups, g_proj)
        out: dict[str, Term] = {"in_proj_weight": Outer(a, g)}
        if module.in_proj_bias is not None:
            out["in_proj_bias"] = _bias_term(g)
        out["out_proj.weight"] = Outer(heads, g_out)
        if module.out_proj.bias is not None:
            out["out_proj.bias"] = _bias_term(g_out)
        return out


def _packed_projection(groups, g_proj: list[Tensor]) -> tuple[Tensor, Tensor]:
    """The forward side ``a`` ``(N, T, E)`` and row side ``g`` ``(K, N, T, 3E)`` of
    the packed in-projection: each distinct input at its positions, with the
    gradients of the projections it feeds in their thirds of the row side."""
    a_parts, g_parts = [], []
    for x, uses in groups:
        ref = g_proj[uses[0]]
        blocks = [g_proj[j] if j in uses else torch.zeros_like(ref) for j in range(3)]
        a_parts.append(x)
        g_parts.append(torch.cat(blocks, -1))
    if len(groups) == 1:
        return a_parts[0], g_parts[0]
    return torch.cat(a_parts, 1), torch.cat(g_parts, 2)


def attention_mask(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    causal: bool,
    N: int,
    heads: int,
    L: int,
    S: int,
    dtype: torch.dtype,
) -> Tensor | None:
    """The additive mask ``(N or 1, heads or 1, L, S)`` of the attention scores, as
    ``nn.MultiheadAttention`` builds it: boolean masks (True = excluded) become
    ``-inf``, float masks are added; ``causal`` (the ``is_causal`` hint where
    ``F.multi_head_attention_forward`` follows it) stands for ``attn_mask``."""
    if causal:
        device = attn_mask.device
        keep = torch.ones(L, S, dtype=torch.bool, device=device).tril()
        attn_mask = ~keep
    mask = None
    if attn_mask is not None:
        mask = _additive(attn_mask, dtype)
        mask = mask[None, None] if mask.ndim == 2 else mask.reshape(N, heads, L, S)
    if key_padding_mask is not None:
        pad = _additive(key_padding_mask, dtype)[:, None, None, :]
        mask = pad if mask is None else mask + pad
    return mask


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf")
        )
    return mask.to(dtype)


def attention(
    q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Scaled dot-product attention of projections ``(N, L|S, E)`` split into
    ``heads``: the concatenated heads ``(N, L, E)`` and the weights
    ``(N, heads, L, S)``."""
    N, L, E = q.shape
    d = E // heads

    def split(t):
        return t.reshape(N, t.shape[1], heads, d).transpose(1, 2)

    scores = split(q) @ split(k).transpose(-2, -1) / math.sqrt(d)
    if mask is not None:
        scores = scores + mask
    weights = torch.softmax(scores, -1)
    heads_out = (weights @ split(v)).transpose(1, 2).reshape(N, L, E)
    return heads_out, weights


# -- recurrent layers -----------------------------------------------------------------
def lstm_step(
    gi: Tensor, gh: Tensor, state: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor]:
    """One LSTM step from the input and hidden parts of the gates ``(N, 4H)``
    (order i, f, g, o): the new ``(h, c)``."""
    i, f, g, o = (gi + gh).chunk(4, -1)
    c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def gru_step(gi: Tensor, gh: Tensor, h: Tensor) -> Tensor:
    """One GRU step from the input and hidden parts ``(N, 3H)`` (order r, z, n):
    ``h' = (1 - z) n + z h`` with ``n = tanh(i_n + r * h_n)``."""
    ir, iz, in_ = gi.chunk(3, -1)
    hr, hz, hn = gh.chunk(3, -1)
    r = torch.sigmoid(ir + hr)
    z = torch.sigmoid(iz + hz)
    n = torch.tanh(in_ + r * hn)
    return (1 - z) * n + z * h


class _RecurrentRule(Rule):
    """Multi-layer, optionally bidirectional ``nn.LSTM``/``nn.GRU`` unrolled over
    time (padded tensors, ``proj_size == 0``)."""

    kind: type = nn.RNNBase
    #: whether the hidden parts need taps of their own (else they share the input
    #: parts' gradients)
    hidden_taps = True

    def applies(self, module):
        return isinstance(module, self.kind) and getattr(module, "proj_size", 0) == 0

    def initial_state(self, module, hx, N: int, x: Tensor):
        raise NotImplementedError

    def step(self, gi: Tensor, gh: Tensor, state):
        raise NotImplementedError

    def final(self, states: list) -> tuple:
        raise NotImplementedError

    def forward(self, module, args, kwargs, output):
        c = _bound(type(module).forward, module, args, kwargs)
        x = c["input"]
        _batched(module, x, "input")
        _refuse_dropout(module, module.dropout, module.num_layers > 1)
        if not module.batch_first:
            x = x.transpose(0, 1)
        N, T = x.shape[:2]
        D = 2 if module.bidirectional else 1
        state0 = self.initial_state(module, c["hx"], N, x)
        taps: list[Tensor] = []
        uses: list[tuple[str, Tensor, Tensor, int]] = []
        finals = []
        layer_in = x
        for layer in range(module.num_layers):
            outs = []
            for d in range(D):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                state = tuple(s[layer * D + d] for s in state0)
                W_ih, W_hh = (
                    getattr(module, "weight_ih" + sfx),
                    getattr(module, "weight_hh" + sfx),
                )
                b_ih = getattr(module, "bias_ih" + sfx) if module.bias else None
                b_hh = getattr(module, "bias_hh" + sfx) if module.bias else None
                gi = F.linear(layer_in, W_ih, b_ih)  # (N, T, G)
                first = len(taps)
                taps.append(gi)
                hs: list[Tensor | None] = [None] * T
                prev: list[Tensor | None] = [None] * T
                gh_taps: list[Tensor | None] = [None] * T
                for t in reversed(range(T)) if d else range(T):
                    prev[t] = state[0]
                    gh = F.linear(state[0], W_hh, b_hh)
                    gh_taps[t] = gh
                    state = self.step(gi[:, t], gh, state)
                    hs[t] = state[0]
                if self.hidden_taps:
                    taps.extend(gh_taps)
                finals.append(state)
                outs.append(torch.stack(hs, 1))
                uses.append((sfx, layer_in, torch.stack(prev, 1), first))
            layer_in = torch.cat(outs, -1) if D > 1 else outs[0]
        out = layer_in if module.batch_first else layer_in.transpose(0, 1)
        finals = [torch.stack(s, 0) for s in zip(*finals)]
        return Record(taps, uses, N), (out, self.final(finals))

    def terms(self, module, record, grads):
        out: dict[str, Term] = {}
        for sfx, a_in, h_prev, first in record.data:
            g_in = grads[first]  # (K, N, T, G)
            if self.hidden_taps:
                T = g_in.shape[2]
                g_hid = torch.stack(grads[first + 1 : first + 1 + T], 2)
            else:
                g_hid = g_in
            out["weight_ih" + sfx] = Outer(a_in, g_in)
            out["weight_hh" + sfx] = Outer(h_prev, g_hid)
            if module.bias:
                out["bias_ih" + sfx] = _bias_term(g_in)
                out["bias_hh" + sfx] = _bias_term(g_hid)
        return out


def _zeros_state(module, N: int, x: Tensor) -> Tensor:
    D = 2 if module.bidirectional else 1
    return x.new_zeros(module.num_layers * D, N, module.hidden_size)


class LSTMRule(_RecurrentRule):
    """``nn.LSTM`` (``proj_size == 0``): one tap per layer and direction, the input
    parts of the gates at every step (whose gradients are the hidden parts' too)."""

    name = "lstm"
    kind = nn.LSTM
    hidden_taps = False

    def initial_state(self, module, hx, N, x):
        if hx is None:
            zeros = _zeros_state(module, N, x)
            return zeros, zeros
        return hx[0], hx[1]

    def step(self, gi, gh, state):
        return lstm_step(gi, gh, state)

    def final(self, states):
        return states[0], states[1]


class GRURule(_RecurrentRule):
    """``nn.GRU``: the input parts of every layer and direction (one tap) and the
    hidden parts of every step (one tap each)."""

    name = "gru"
    kind = nn.GRU

    def initial_state(self, module, hx, N, x):
        return (_zeros_state(module, N, x) if hx is None else hx,)

    def step(self, gi, gh, state):
        return (gru_step(gi, gh, state[0]),)

    def final(self, states):
        return states[0]


__all__ = [
    "MultiheadAttentionRule",
    "LSTMRule",
    "GRURule",
    "attention",
    "attention_mask",
    "lstm_step",
    "gru_step",
]
