"""The curvature engine's rules against dense oracles (float64).

Each model puts one rule to work inside a small classifier or regressor; the
engine's dense GGN, diagonal and per-example gradients must equal the oracles of
``tests/oracles.py`` (torch.func Jacobians, one example at a time), and its
Kronecker factors must equal KFAC-expand / -reduce computed from their definitions.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from laplace.curvature import backprop_factor, engine, rules, structures
from laplace.curvature.native import NativeGGN
from laplace.likelihood import get_likelihood
from tests import oracles


class Pool(nn.Module):
    """Mean over all dimensions between the batch and the features."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return x.mean(self.dim)


class Flat(nn.Module):
    def forward(self, x):
        return x.flatten(1)


class TiedLM(nn.Module):
    """Embedding and output head sharing one weight; output: the last token's
    logits."""

    def __init__(self, vocab: int = 7, dim: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        h = torch.tanh(self.mix(self.emb(idx)))
        return self.head(h.mean(1))


def _rms_norm_class():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    del transformers
    return LlamaRMSNorm


def _hf_conv1d():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def build(name: str, device):
    """``(model, x)`` for one rule, float64 on ``device``."""
    torch.manual_seed(0)
    N = 5
    if name == "linear-seq":
        m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), Pool())
        x = torch.randn(N, 6, 3)
    elif name == "linear-4d":
        m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), Pool(1), Pool(1), nn.Linear(4, 3))
        x = torch.randn(N, 2, 3, 3)
    elif name == "conv1d":
        m = nn.Sequential(
            nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=2),
            nn.Tanh(),
            nn.Conv1d(3, 2, 2, padding="same", padding_mode="reflect"),
            Flat(),
            nn.LazyLinear(3),
        )
        x = torch.randn(N, 2, 9)
    elif name == "conv2d":
        m = nn.Sequential(
            nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
            nn.Tanh(),
            nn.Conv2d(3, 2, 3, padding=1, padding_mode="circular", bias=False),
            Flat(),
            nn.LazyLinear(3),
        )
        x = torch.randn(N, 2, 6, 7)
    elif name == "conv3d":
        m = nn.Sequential(
            nn.Conv3d(1, 2, 2, stride=(1, 2, 1)), nn.Tanh(), Flat(), nn.LazyLinear(3)
        )
        x = torch.randn(N, 1, 3, 4, 3)
    elif name == "hf-conv1d":
        Conv1D = _hf_conv1d()
        m = nn.Sequential(Conv1D(4, 3), nn.Tanh(), Conv1D(3, 4), Pool())
        x = torch.randn(N, 5, 3)
    elif name == "embedding":
        m = nn.Sequential(
            nn.Embedding(7, 4, padding_idx=0), nn.Tanh(), Pool(), nn.Linear(4, 3)
        )
        x = torch.randint(0, 7, (N, 6))
    elif name == "layernorm":
        m = nn.Sequential(
            nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3), Pool()
        )
        x = torch.randn(N, 6, 3)
    elif name == "batchnorm":
        m = nn.Sequential(
            nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), Flat(), nn.LazyLinear(3)
        )
        x = torch.randn(N, 2, 5, 5)
    elif name == "groupnorm":
        m = nn.Sequential(
            nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), Flat(), nn.LazyLinear(3)
        )
        x = torch.randn(N, 2, 5, 5)
    elif name == "rmsnorm":
        m = nn.Sequential(nn.Linear(3, 4), nn.RMSNorm(4), nn.Tanh(), nn.Linear(4, 3))
        x = torch.randn(N, 3)
    elif name == "hf-rmsnorm":
        RMSNorm = _rms_norm_class()
        m = nn.Sequential(nn.Linear(3, 4), RMSNorm(4), nn.Tanh(), nn.Linear(4, 3))
        x = torch.randn(N, 3)
    elif name == "tied":
        m = TiedLM()
        x = torch.randint(0, 7, (N, 5))
    elif name == "flattened-rows":
        m = nn.Sequential(
            _Items(), nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), _Unitems(4), Pool()
        )
        x = torch.randn(N, 4, 3)
    elif name == "reused":  # one module called twice
        m = _Twice()
        x = torch.randn(N, 3)
    elif name == "fallback":
        m = nn.Sequential(nn.Linear(3, 4), _Scale(4), nn.Tanh(), nn.Linear(4, 3))
        x = torch.randn(N, 3)
    else:
        raise ValueError(name)
    m = m.to(device, torch.float64)
    x = x.to(device, torch.float64) if x.is_floating_point() else x.to(device)
    with torch.no_grad():
        m(x)  # materialize lazy layers
    for module in m.modules():  # non-trivial affine parameters and running stats
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or type(
            module
        ).__name__.endswith("RMSNorm"):
            with torch.no_grad():
                module.weight.normal_()
                if getattr(module, "bias", None) is not None:
                    module.bias.normal_()
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2)
                module.weight.normal_()
                module.bias.normal_()
    return m.eval(), x


class _Items(nn.Module):
    def forward(self, x):
        return x.flatten(0, 1)


class _Unitems(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.d = d

    def forward(self, x):
        return x.reshape(-1, 4, self.d)


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.norm = nn.LayerNorm(3)

    def forward(self, x):
        h = self.norm(torch.tanh(self.lin(x)))
        return self.lin(self.norm(torch.tanh(h)))


class _Scale(nn.Module):
    """A module no rule knows: an elementwise scale and a shift."""

    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d))
        self.shift = nn.Parameter(torch.randn(1, d))

    def forward(self, x):
        return x * self.scale + self.shift**2


MODELS = [
    "linear-seq",
    "linear-4d",
    "conv1d",
    "conv2d",
    "conv3d",
    "hf-conv1d",
    "embedding",
    "layernorm",
    "batchnorm",
    "groupnorm",
    "rmsnorm",
    "hf-rmsnorm",
    "tied",
    "flattened-rows",
    "reused",
    "fallback",
]


def _ggn_factor(f):
    return get_likelihood("classification").hessian_sqrt(f)


def _params(m):
    return [p for p in m.parameters() if p.requires_grad]


@pytest.mark.parametrize("name", MODELS)
def test_dense_ggn_and_diagonal_equal_the_oracle(name, device):
    m, x = build(name, device)
    ggn = oracles.ggn(m, x, "classification")
    _, H = backprop_factor.outer_product_full(m, _params(m), x, _ggn_factor)
    _, d = backprop_factor.outer_product_diag(m, _params(m), x, _ggn_factor)
    # transformers' RMSNorm normalizes in float32 whatever the model's dtype
    tol = {"atol": 1e-6, "rtol": 1e-5} if name == "hf-rmsnorm" else {}
    torch.testing.assert_close(H, ggn, **tol)
    torch.testing.assert_close(d, ggn.diagonal(), **tol)


@pytest.mark.parametrize("name", MODELS)
def test_jacobians_and_selected_entries_equal_the_oracle(name, device):
    m, x = build(name, device)
    J = oracles.jacobian(m, x)
    Jb, f = backprop_factor.jacobian(m, _params(m), x)
    torch.testing.assert_close(Jb, J)
    torch.testing.assert_close(f, m(x).detach())
    idx = torch.randperm(J.shape[-1], device=device)[:7]
    _, V = backprop_factor.per_example_vectors(
        m, _params(m), x, backprop_factor.identity_factor, idx
    )
    torch.testing.assert_close(V.transpose(0, 1), J[:, :, idx])


@pytest.mark.parametrize("name", ["linear-seq", "hf-conv1d", "embedding", "conv2d"])
def test_jacobian_is_differentiable_in_the_inputs(name, device):
    m, x = build(name, device)
    if x.is_floating_point():
        x = x.clone().requires_grad_()
        J, f = backprop_factor.jacobian(m, _params(m), x, create_graph=True)
        (gx,) = torch.autograd.grad(J.square().sum() + f.sum(), x)

        def total(x):
            return oracles.jacobian(m, x).square().sum() + m(x).sum()

        (ox,) = torch.autograd.grad(total(x), x)
        torch.testing.assert_close(gx, ox)


def test_model_left_as_found(device):
    m, x = build("fallback", device)
    before = {k: dict(vars(mod)) for k, mod in m.named_modules()}
    backprop_factor.outer_product_diag(m, _params(m), x, _ggn_factor)
    for k, mod in m.named_modules():
        assert set(vars(mod)) == set(before[k])
        assert not mod._forward_hooks and not mod._forward_hooks_with_kwargs


# -- Kronecker factors against their definitions -------------------------------------
def _layer_records(m, x, layer):
    """Input ``a`` and, per output column, the gradient w.r.t. the layer output."""
    store = {}
    h = layer.register_forward_hook(lambda mod, i, o: store.update(a=i[0], out=o))
    f = m(x)
    h.remove()
    M = _ggn_factor(f.detach())  # (N, C, K)
    gs = []
    for k in range(M.shape[-1]):
        (g,) = torch.autograd.grad(f, store["out"], M[..., k], retain_graph=True)
        gs.append(g)
    return store["a"].detach(), torch.stack(gs)  # (N, T, in), (K, N, T, out)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kron_expand_and_reduce_follow_their_definitions(approx, device):
    m, x = build("linear-seq", device)
    N_data = 11
    _, K = NativeGGN(m, "classification", kfac_approx=approx).kron(
        x, torch.zeros(len(x), dtype=torch.long, device=device), N=N_data
    )
    blocks = iter(K.kfacs)
    for layer in (m[0], m[2]):
        a, g = _layer_records(m, x, layer)
        T = a.shape[1]
        if approx == "expand":
            G = torch.einsum("knto,kntp->op", g, g)
            A = torch.einsum("nti,ntj->ij", a, a) / (T * N_data)
        else:
            gs, am = g.sum(2), a.mean(1)
            G = torch.einsum("kno,knp->op", gs, gs)
            A = am.T @ am / N_data
        weight, bias = next(blocks), next(blocks)
        torch.testing.assert_close(weight[0], G)
        torch.testing.assert_close(weight[1], A)
        G_bias = G if approx == "reduce" else torch.einsum("knto,kntp->op", g, g)
        torch.testing.assert_close(bias[0], G_bias)


@pytest.mark.parametrize(
    "name", ["linear-4d", "layernorm", "rmsnorm", "hf-conv1d", "embedding", "fallback"]
)
def test_kron_is_exact_for_one_datum_without_weight_sharing(name, device):
    m, x = build(name, device)
    x = x[:1]
    if name in ("layernorm", "hf-conv1d", "embedding"):
        x = x[:, :1]  # one position: no weight sharing
    if name == "linear-4d":
        x = x[:, :1, :1]
    ggn = oracles.ggn(m, x, "classification")
    y = torch.zeros(1, dtype=torch.long, device=device)
    _, K = NativeGGN(m, "classification").kron(x, y, N=1)
    sizes = [p.numel() for p in _params(m)]
    starts = torch.tensor([0, *sizes]).cumsum(0).tolist()
    blocks = [ggn[a:b, a:b] for a, b in zip(starts, starts[1:])]
    dense = []
    for factors in K.kfacs:
        mats = [torch.diag(f) if f.ndim == 1 else f for f in factors]
        dense.append(torch.kron(*mats) if len(mats) == 2 else mats[0])
    for got, want in zip(dense, blocks, strict=True):
        torch.testing.assert_close(got, want)


class Twice(nn.Module):
    """One Linear applied twice (a reused module): its weight has two terms."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.head = nn.Linear(3, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


def test_kron_of_a_module_used_twice_sums_both_uses(device):
    """KFAC-expand over all uses: ``G = sum g g^T`` and ``A = sum a a^T / (T N)`` with
    ``T = 2`` uses per example."""
    torch.manual_seed(0)
    m = Twice().to(device=device, dtype=torch.float64)
    x = torch.randn(5, 3, device=device, dtype=torch.float64)
    N_data = 7
    y = torch.zeros(len(x), dtype=torch.long, device=device)
    _, K = NativeGGN(m, "classification").kron(x, y, N=N_data)
    store = []
    h = m.lin.register_forward_hook(lambda mod, i, o: store.append((i[0], o)))
    f = m(x)
    h.remove()
    M = _ggn_factor(f.detach())
    A = sum(a.T @ a for a, _ in store) / (2 * N_data)
    G = 0
    for k in range(M.shape[-1]):
        gs = torch.autograd.grad(f, [o for _, o in store], M[..., k], retain_graph=True)
        G = G + sum(g.T @ g for g in gs)
    weight, bias = K.kfacs[0], K.kfacs[1]
    torch.testing.assert_close(weight[0], G)
    torch.testing.assert_close(weight[1], A.detach())
    torch.testing.assert_close(bias[0], G)


def test_embedding_input_factor_is_the_token_counts(device):
    m, x = build("embedding", device)
    y = torch.zeros(len(x), dtype=torch.long, device=device)
    _, K = NativeGGN(m, "classification").kron(x, y, N=len(x))
    counts, G = K.kfacs[0]
    assert counts.ndim == 1
    C = _ggn_factor(m(x)).shape[-1]  # columns of the GGN factor
    expected = C * torch.bincount(x.flatten(), minlength=7).to(torch.float64)
    torch.testing.assert_close(counts, expected)  # in the model's dtype
    assert G.shape == (4, 4)


def test_structure_table_and_one_warning_for_the_fallback(device):
    m, x = build("fallback", device)
    backend = NativeGGN(m, "classification")
    table = {row["parameter"]: row for row in backend.structure_table()}
    assert table["0.weight"]["kron"] == "kronecker"
    assert table["1.scale"]["rules"] == "fallback"
    assert table["1.scale"]["kron"] == "dense"
    y = torch.zeros(len(x), dtype=torch.long, device=device)
    with pytest.warns(UserWarning, match=r"1\.scale in 1 \(_Scale\): dense"):
        backend.diag(x, y)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backend.diag(x, y)  # warned once


def test_parameter_used_outside_any_module_gets_the_documented_fallback(device):
    class Raw(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 2))
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            return self.lin(torch.tanh(x @ self.w))

    m = Raw().to(device, torch.float64)
    x = torch.randn(4, 3, device=device, dtype=torch.float64)
    ggn = oracles.ggn(m, x, "classification")
    _, H = backprop_factor.outer_product_full(m, _params(m), x, _ggn_factor)
    torch.testing.assert_close(H, ggn)


@pytest.mark.parametrize(
    "name", ["linear-seq", "hf-conv1d", "embedding", "tied", "layernorm", "conv2d"]
)
def test_matrix_free_products_equal_the_dense_ggn(name, device):
    m, x = build(name, device)
    ggn = oracles.ggn(m, x, "classification")
    tape = engine.run(m, _params(m), x, _ggn_factor)
    X = torch.randn(ggn.shape[0], 3, device=device, dtype=ggn.dtype)
    torch.testing.assert_close(structures.gram_matmat(tape, X), ggn @ X)


def test_lowrank_eigenpairs_come_from_the_engine(device, monkeypatch):
    """LowRank's products are the engine's (no Curvlinops, no forward-mode AD):
    its eigenvalues are the top ones of the dense GGN."""
    from laplace import Laplace
    from laplace.parametric import lowrank

    def refuse(*args, **kwargs):
        raise AssertionError("Curvlinops was called")

    monkeypatch.setattr(lowrank, "import_library", refuse)
    monkeypatch.setattr(torch.func, "jvp", refuse)
    m, x = build("tied", device)
    y = torch.randint(0, 7, (len(x),), device=device)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=2
    )
    la = Laplace(
        m,
        "classification",
        subset_of_weights="all",
        hessian_structure="lowrank",
        rank=4,
    )
    la.fit(loader)
    ggn = oracles.ggn(m, x, "classification")
    lam = torch.linalg.eigvalsh(ggn).flip(0)[:4]
    (U, eigenvalues), _ = la.posterior_precision
    torch.testing.assert_close(eigenvalues, lam, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(U.T @ ggn @ U, torch.diag(lam), rtol=1e-5, atol=1e-8)


def test_laplace_exposes_the_structure_table(device):
    from laplace import Laplace
    from laplace.curvature import CurvlinopsGGN

    m, _ = build("layernorm", device)
    la = Laplace(m, "classification", subset_of_weights="all", hessian_structure="kron")
    rows = {r["parameter"]: (r["rules"], r["kron"]) for r in la.structure_table}
    assert rows == {
        "0.weight": ("linear", "kronecker"),
        "0.bias": ("linear", "dense"),
        "1.weight": ("norm", "dense"),
        "1.bias": ("norm", "dense"),
        "3.weight": ("linear", "kronecker"),
        "3.bias": ("linear", "dense"),
    }
    other = Laplace(m, "classification", subset_of_weights="all", backend=CurvlinopsGGN)
    with pytest.raises(ValueError, match="backend=NativeGGN"):
        _ = other.structure_table


def test_batch_statistics_are_refused(device):
    m, x = build("batchnorm", device)
    m.train()
    with pytest.raises(ValueError, match=r"statistics of the batch.*model\.eval\(\)"):
        backprop_factor.outer_product_diag(m, _params(m), x, _ggn_factor)
    assert not any(mod._forward_hooks_with_kwargs for mod in m.modules())


@pytest.mark.parametrize("columns", [1, 2])
@pytest.mark.parametrize("name", ["linear-seq", "embedding", "tied", "layernorm"])
def test_kron_in_chunks_of_columns_equals_all_columns_at_once(
    name, columns, device, monkeypatch
):
    """A large model's KFAC backpropagates one (or a few) columns at a time and adds
    the chunks; the factors are those of all columns at once."""
    m, x = build(name, device)
    n_out = m(x).shape[-1]
    y = torch.randint(0, n_out, (len(x),), device=device)
    _, whole = NativeGGN(m, "classification").kron(x, y, N=9)
    taps = engine.record(m, _params(m), x)
    n_taps = sum(t.numel() for _, r in taps.calls for t in r.taps)
    monkeypatch.setattr(engine, "_COLUMN_ENTRIES", columns * n_taps)
    _, chunked = NativeGGN(m, "classification").kron(x, y, N=9)
    for a, b in zip(whole.kfacs, chunked.kfacs, strict=True):
        for fa, fb in zip(a, b, strict=True):
            torch.testing.assert_close(fa, fb)


def test_weight_and_bias_share_one_output_side_product(device, monkeypatch):
    """A Linear's bias block is its weight's output-side factor: computed once per
    chunk of columns, equal in value, and not the same tensor (the blocks are
    accumulated in place)."""
    m = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    m = m.to(device=device, dtype=torch.float64)
    x = torch.randn(6, 5, device=device, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), device=device)
    calls = []
    gram = structures._gram
    monkeypatch.setattr(structures, "_gram", lambda V: calls.append(V.shape) or gram(V))
    _, kron = NativeGGN(m, "classification").kron(x, y, N=6)
    # two layers: a forward-side and an output-side product each, none for a bias
    assert len(calls) == 4
    (W1, b1), (W2, b2) = kron.kfacs[0:2], kron.kfacs[2:4]
    for W, b in ((W1, b1), (W2, b2)):
        torch.testing.assert_close(b[0], W[0])
        assert b[0].data_ptr() != W[0].data_ptr()


@pytest.mark.parametrize("positions", [1, 3])
@pytest.mark.parametrize("g_rows", [True, False])
def test_term_vectors_of_a_one_column_input_follow_the_definition(
    positions, g_rows, device
):
    """A bias (a = 1) or a weight of one input feature (``nn.Linear(1, out)``): the
    per-example gradients ``sum_t g_t a_t^T`` without a general product."""
    gen = torch.Generator(device).manual_seed(3)
    kw = dict(device=device, dtype=torch.float64, generator=gen)
    a = torch.randn(4, positions, 1, **kw)  # not ones: a weight of one feature
    g = torch.randn(2, 4, positions, 5, **kw)
    V = structures.term_vectors(rules.Outer(a, g, g_rows=g_rows), 5)
    expected = torch.einsum("knto,nti->knoi", g, a).reshape(2, 4, 5)
    torch.testing.assert_close(V, expected)
