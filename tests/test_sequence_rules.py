"""The curvature engine's rules for nn.MultiheadAttention, nn.LSTM and nn.GRU against
the modules themselves (recomputed outputs) and against dense oracles (GGN by
torch.func Jacobians, per-example gradients one example at a time)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import oracles
from laplace import Laplace
from laplace.curvature import NativeGGN, backprop_factor, engine
from laplace.curvature.sequence_rules import (
    GRURule,
    LSTMRule,
    MultiheadAttentionRule,
)
from laplace.likelihood import get_likelihood

DTYPE = torch.float64
N, T, D_IN, E, HEADS, H, C = 4, 5, 3, 4, 2, 3, 3


def ggn_factor(f):
    return get_likelihood("classification").hessian_sqrt(f)


def _transposed(tensors):
    """Swap the first two dimensions of each tensor, keeping identical tensors
    identical (nn.MultiheadAttention tells self-attention by identity)."""
    out = []
    for t in tensors:
        same = next((o for s, o in zip(tensors, out) if s is t), None)
        out.append(same if same is not None else t.transpose(0, 1))
    return out


# -- models --------------------------------------------------------------------------
class AttentionNet(nn.Module):
    """Linear -> MultiheadAttention -> mean over positions -> Linear(., 3).

    ``mode``: ``'self'``, ``'kv'`` (keys = values from another tensor) or
    ``'cross'`` (query, key and value three different tensors). ``masks`` adds a
    data-dependent key-padding mask and (self-attention) a causal mask with the
    ``is_causal`` hint.
    """

    def __init__(
        self, batch_first=True, mode="self", masks=False, need_weights=True, bias=True
    ):
        super().__init__()
        self.batch_first, self.mode, self.masks = batch_first, mode, masks
        self.need_weights = need_weights
        self.inp = nn.Linear(D_IN, E)
        self.mem = nn.Linear(D_IN, E)
        self.val = nn.Linear(D_IN, E)
        self.attn = nn.MultiheadAttention(E, HEADS, bias=bias, batch_first=batch_first)
        self.head = nn.Linear(E, C)

    def forward(self, x):
        q = self.inp(x)
        if self.mode == "self":
            k = v = q
        else:
            k = self.mem(x[:, 1:])
            v = k if self.mode == "kv" else self.val(x[:, 1:])
        kwargs = {"need_weights": self.need_weights}
        if self.masks:
            kpm = x[:, -k.shape[1] :, 0] > 0.3
            kpm[:, 0] = False  # every query sees at least one key
            kwargs["key_padding_mask"] = kpm
            if self.mode == "self":
                L = q.shape[1]
                kwargs["attn_mask"] = torch.ones(
                    L, L, dtype=torch.bool, device=x.device
                ).triu(1)
                kwargs["is_causal"] = True
        if not self.batch_first:
            q, k, v = _transposed([q, k, v])
        out = self.attn(q, k, v, **kwargs)[0]
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.head(out.mean(1))


class EncoderNet(nn.Module):
    """Linear -> 2 nn.TransformerEncoderLayer (causal, key padding) -> mean -> Linear:
    the attention called by torch's own layers, with LayerNorms and Linears around."""

    def __init__(self, batch_first=True):
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(D_IN, E)
        layer = nn.TransformerEncoderLayer(E, HEADS, 8, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(E, C)

    def forward(self, x):
        h = self.inp(x)
        kpm = x[:, :, 0] > 0.3
        kpm[:, 0] = False
        kpm = torch.zeros_like(x[:, :, 0]).masked_fill(kpm, float("-inf"))
        mask = nn.Transformer.generate_square_subsequent_mask(
            x.shape[1], device=x.device, dtype=x.dtype
        )
        if not self.batch_first:
            h = h.transpose(0, 1)
        out = self.enc(h, mask=mask, src_key_padding_mask=kpm, is_causal=True)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.head(out.mean(1))


class RecurrentNet(nn.Module):
    """(Embedding | Linear) -> LSTM | GRU -> mean over time -> Linear(., 3); with
    ``init`` the initial states are computed from the first input."""

    def __init__(
        self,
        kind,
        batch_first=True,
        bidirectional=True,
        layers=2,
        init=False,
        embed=False,
        bias=True,
    ):
        super().__init__()
        self.batch_first, self.init, self.kind = batch_first, init, kind
        self.inp = nn.Embedding(7, E) if embed else nn.Linear(D_IN, E)
        self.rnn = kind(
            E,
            H,
            layers,
            bias=bias,
            batch_first=batch_first,
            bidirectional=bidirectional,
        )
        self.states = layers * (2 if bidirectional else 1)
        self.h0 = nn.Linear(E, self.states * H)
        self.head = nn.Linear(H * (2 if bidirectional else 1), C)

    def forward(self, x):
        h = self.inp(x)
        hx = None
        if self.init:
            h0 = torch.tanh(self.h0(h[:, 0])).reshape(-1, self.states, H)
            h0 = h0.transpose(0, 1).contiguous()
            hx = (h0, 0.5 * h0) if self.kind is nn.LSTM else h0
        if not self.batch_first:
            h = h.transpose(0, 1)
        out = self.rnn(h, hx)[0]
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.head(out.mean(1))


def inputs(device, n=N, t=T, embed=False):
    g = torch.Generator().manual_seed(3)
    if embed:
        return torch.randint(0, 7, (n, t), generator=g).to(device)
    return torch.randn(n, t, D_IN, generator=g, dtype=DTYPE).to(device)


def labels(device, n=N):
    return torch.arange(n, device=device) % C


def build(cls, device, *args, **kwargs):
    torch.manual_seed(0)
    return cls(*args, **kwargs).to(device, DTYPE).eval()


MODELS = {
    "mha-self": (AttentionNet, {}),
    "mha-self-masks": (AttentionNet, {"masks": True}),
    "mha-self-masks-weights": (AttentionNet, {"masks": True, "need_weights": False}),
    "mha-kv": (AttentionNet, {"mode": "kv", "masks": True}),
    "mha-cross": (AttentionNet, {"mode": "cross"}),
    "mha-cross-nobias": (AttentionNet, {"mode": "cross", "bias": False}),
    "encoder": (EncoderNet, {}),
    "lstm": (RecurrentNet, {"kind": nn.LSTM}),
    "lstm-init": (RecurrentNet, {"kind": nn.LSTM, "init": True}),
    "lstm-init-embed": (RecurrentNet, {"kind": nn.LSTM, "init": True, "embed": True}),
    "lstm-1-layer-nobias": (
        RecurrentNet,
        {"kind": nn.LSTM, "layers": 1, "bidirectional": False, "bias": False},
    ),
    "gru": (RecurrentNet, {"kind": nn.GRU}),
    "gru-init": (RecurrentNet, {"kind": nn.GRU, "init": True}),
    "gru-embed-nobias": (RecurrentNet, {"kind": nn.GRU, "embed": True, "bias": False}),
}


def model_and_data(name, batch_first, device, n=N, t=T):
    cls, kwargs = MODELS[name]
    m = build(cls, device, batch_first=batch_first, **kwargs)
    return m, inputs(device, n, t, embed=kwargs.get("embed", False))


# -- the recomputed outputs equal the modules' own ---------------------------------
def _mha_calls(device, batch_first):
    """``(name, args, kwargs)`` of calls of an E=4, 2-head attention."""
    g = torch.Generator().manual_seed(5)

    def seq(n_pos):
        t = torch.randn(N, n_pos, E, generator=g, dtype=DTYPE).to(device)
        return t if batch_first else t.transpose(0, 1)

    x, mem, other = seq(T), seq(T - 2), seq(T - 2)
    kpm = torch.zeros(N, T - 2, dtype=torch.bool, device=device)
    kpm[1, -1] = kpm[2, 1:] = True
    causal = torch.ones(T, T, dtype=torch.bool, device=device).triu(1)
    float_mask = torch.randn(N * HEADS, T, T - 2, generator=g, dtype=DTYPE).to(device)
    float_kpm = torch.randn(N, T, generator=g, dtype=DTYPE).to(device)
    float_kpm_mem = torch.randn(N, T - 2, generator=g, dtype=DTYPE).to(device)
    return [
        ("self", (x, x, x), {}),
        ("self-no-weights", (x, x, x), {"need_weights": False}),
        ("self-per-head", (x, x, x), {"average_attn_weights": False}),
        ("causal-hint", (x, x, x), {"attn_mask": causal, "is_causal": True}),
        (
            "causal-hint-no-weights",
            (x, x, x),
            {"attn_mask": causal, "is_causal": True, "need_weights": False},
        ),
        ("float-kpm", (x, x, x), {"key_padding_mask": float_kpm}),
        ("kv", (x, mem, mem), {"key_padding_mask": kpm}),
        (
            "cross-3d-mask",
            (x, mem, other),
            {
                "attn_mask": float_mask,
                "key_padding_mask": float_kpm_mem,
                "need_weights": False,
            },
        ),
        ("kwargs", (), {"query": x, "key": mem, "value": other, "attn_mask": None}),
    ]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_recomputation_equals_the_module(batch_first, bias, device):
    torch.manual_seed(0)
    m = nn.MultiheadAttention(E, HEADS, bias=bias, batch_first=batch_first)
    m = m.to(device, DTYPE).eval()
    rule = MultiheadAttentionRule()
    assert rule.applies(m)
    for name, args, kwargs in _mha_calls(device, batch_first):
        out, weights = m(*args, **kwargs)
        record, (new_out, new_weights) = rule.forward(m, args, kwargs, (out, weights))
        torch.testing.assert_close(new_out, out, msg=name)
        if weights is None:
            assert new_weights is None, name
        else:
            torch.testing.assert_close(new_weights, weights, msg=name)
        assert all(t.shape[0] == N for t in record.taps), name


RNN_CASES = [
    pytest.param(kind, layers, bidirectional, bias, init, id=f"{kind.__name__}-{i}")
    for kind in (nn.LSTM, nn.GRU)
    for i, (layers, bidirectional, bias, init) in enumerate(
        [(1, False, True, False), (2, True, True, True), (3, True, False, True)]
    )
]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind,layers,bidirectional,bias,init", RNN_CASES)
def test_recurrent_recomputation_equals_the_module(
    kind, layers, bidirectional, bias, init, batch_first, device
):
    torch.manual_seed(0)
    m = kind(
        D_IN, H, layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional
    )
    m = m.to(device, DTYPE).eval()
    rule = LSTMRule() if kind is nn.LSTM else GRURule()
    assert rule.applies(m)
    x = torch.randn(N, T, D_IN, dtype=DTYPE, device=device)
    if not batch_first:
        x = x.transpose(0, 1)
    args = (x,)
    if init:
        states = layers * (2 if bidirectional else 1)
        h0 = torch.randn(states, N, H, dtype=DTYPE, device=device)
        args = (x, (h0, torch.randn_like(h0)) if kind is nn.LSTM else h0)
    out = m(*args)
    _, new_out = rule.forward(m, args, {}, out)
    torch.testing.assert_close(new_out, out)


# -- structures against the dense oracles --------------------------------------------
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("name", list(MODELS))
def test_full_and_diag_equal_the_ggn(name, batch_first, device):
    m, x = model_and_data(name, batch_first, device)
    params = [p for p in m.parameters() if p.requires_grad]
    plan = engine.plan(m, params)
    assert not any(isinstance(e.rule, engine.Fallback) for e in plan.entries)
    expected = oracles.ggn(m, x, "classification")
    assert expected.abs().max() > 0
    f, full = backprop_factor.outer_product_full(m, params, x, ggn_factor)
    torch.testing.assert_close(f, m(x).detach())
    torch.testing.assert_close(full, expected)
    _, diag = backprop_factor.outer_product_diag(m, params, x, ggn_factor)
    torch.testing.assert_close(diag, expected.diagonal())


@pytest.mark.parametrize(
    "name", ["mha-self-masks", "mha-cross", "lstm-init-embed", "gru"]
)
def test_per_example_gradients(name, device):
    m, x = model_and_data(name, False, device)
    y = labels(device)
    params = list(m.parameters())

    def loss_gradient(f):
        return (torch.softmax(f, -1) - F.one_hot(y, C).to(f.dtype))[:, :, None]

    _, V = backprop_factor.per_example_vectors(m, params, x, loss_gradient)
    expected = oracles.per_example_gradients(m, x, y, "classification")
    torch.testing.assert_close(V[0], expected)


def _blocks(matrix, params):
    sizes = [p.numel() for p in params]
    starts = torch.tensor([0] + sizes).cumsum(0).tolist()
    return [matrix[a:b, a:b] for a, b in zip(starts[:-1], starts[1:])]


@pytest.mark.parametrize("name", ["mha-self", "lstm", "lstm-init", "gru", "gru-init"])
def test_kfac_is_exact_for_one_datum_of_one_position(name, device):
    # no weight sharing: every parameter's Kronecker block is its exact GGN block
    m, x = model_and_data(name, True, device, n=1, t=1)
    params = list(m.parameters())
    loss, kron = NativeGGN(m, "classification").kron(x, labels(device, 1), N=1)
    expected = oracles.ggn(m, x, "classification")
    for got, want in zip(_blocks(kron.to_matrix(), params), _blocks(expected, params)):
        torch.testing.assert_close(got, want)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", ["mha-self-masks", "mha-cross", "lstm", "gru"])
def test_kron_runs_on_sequences_and_laplace_fits(name, device):
    m, x = model_and_data(name, False, device)
    y = labels(device)
    params = list(m.parameters())
    _, kron = NativeGGN(m, "classification").kron(x, y, N=N)
    K = kron.to_matrix()
    P = sum(p.numel() for p in params)
    assert K.shape == (P, P) and torch.isfinite(K).all()
    # every Kronecker block is positive semi-definite
    assert torch.linalg.eigvalsh(K).min() > -1e-10
    la = Laplace(m, "classification", hessian_structure="kron")
    la.fit(DataLoader(TensorDataset(x, y), batch_size=2))
    assert torch.isfinite(la.log_marginal_likelihood())
    probs = la(x, pred_type="glm", link_approx="probit")
    assert probs.shape == (N, C) and torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(N, dtype=DTYPE, device=device))


@pytest.mark.parametrize("name", ["mha-kv", "lstm-init-embed", "gru"])
def test_no_hooks_or_attributes_are_left(name, device):
    m, x = model_and_data(name, True, device)

    def state():
        return [
            (
                sorted(mod.__dict__),
                len(mod._forward_hooks),
                len(mod._forward_pre_hooks),
                len(mod._backward_hooks),
            )
            for mod in m.modules()
        ]

    before = state()
    f = m(x)
    backprop_factor.outer_product_full(m, list(m.parameters()), x, ggn_factor)
    assert state() == before
    torch.testing.assert_close(m(x), f)


# -- what the rules refuse -------------------------------------------------------------
def test_configurations_without_a_rule_go_to_the_fallback():
    rule = MultiheadAttentionRule()
    assert not rule.applies(nn.MultiheadAttention(E, HEADS, add_bias_kv=True))
    assert not rule.applies(nn.MultiheadAttention(E, HEADS, add_zero_attn=True))
    assert not rule.applies(nn.MultiheadAttention(E, HEADS, kdim=3, vdim=3))
    assert not LSTMRule().applies(nn.LSTM(3, 4, proj_size=2))
    assert not LSTMRule().applies(nn.GRU(3, 4))
    assert not GRURule().applies(nn.LSTM(3, 4))


@pytest.mark.parametrize("name", ["mha-self", "lstm", "gru"])
def test_training_mode_with_dropout_is_refused(name, device):
    m, x = model_and_data(name, True, device)
    core = m.attn if name.startswith("mha") else m.rnn
    core.dropout = 0.1
    m.train()
    with pytest.raises(RuntimeError, match=r"model\.eval\(\)"):
        backprop_factor.outer_product_diag(m, list(m.parameters()), x, ggn_factor)
    m.eval()  # in eval mode dropout is inactive: the exact GGN
    _, diag = backprop_factor.outer_product_diag(m, list(m.parameters()), x, ggn_factor)
    torch.testing.assert_close(diag, oracles.ggn(m, x, "classification").diagonal())


def test_packed_and_unbatched_inputs_are_refused(device):
    lstm = nn.LSTM(D_IN, H, batch_first=True).to(device, DTYPE)
    x = torch.randn(2, T, D_IN, dtype=DTYPE, device=device)
    packed = nn.utils.rnn.pack_padded_sequence(x, [T, 2], batch_first=True)
    with pytest.raises(TypeError, match="PackedSequence"):
        LSTMRule().forward(lstm, (packed,), {}, lstm(packed))
    with pytest.raises(ValueError, match="batched 3-D input"):
        LSTMRule().forward(lstm, (x[0],), {}, lstm(x[0]))
    mha = nn.MultiheadAttention(E, HEADS).to(device, DTYPE)
    q = torch.randn(T, E, dtype=DTYPE, device=device)
    with pytest.raises(ValueError, match="batched 3-D query"):
        MultiheadAttentionRule().forward(mha, (q, q, q), {}, mha(q, q, q))
