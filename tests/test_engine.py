"""The curvature engine's rules against dense oracles (float64).

Each model puts one rule to work inside a small classifier or regressor; the
engine's dense GGN, diagonal and per-example gradients must equal the oracles of
``tests/oracles.py`` (torch.func Jacobians, one example at a time), and its
Kronecker factors must equal KFAC-expand / -reduce computed from their definitions.
"""

from __future__ import annotations

import copy

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


class _Keywords(nn.Module):
    """Every rule's module called with its input as a keyword argument."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.conv = nn.Conv1d(4, 4, 2)
        self.norm = nn.LayerNorm(4)
        self.proj = _hf_conv1d()(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, idx):
        h = self.emb(input=idx)  # (N, T, 4)
        h = self.conv(input=h.transpose(1, 2)).transpose(1, 2)
        h = self.proj(x=torch.tanh(self.norm(input=h)))
        return self.head(input=torch.tanh(h).mean(1))


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
            nn.Linear(3, 4),
            nn.LayerNorm(4, eps=0.1),
            nn.Tanh(),
            nn.Linear(4, 3),
            Pool(),
        )  # eps: not the default, so that the rule must read it
        x = torch.randn(N, 6, 3)
    elif name == "batchnorm":
        m = nn.Sequential(
            nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), Flat(), nn.LazyLinear(3)
        )
        x = torch.randn(N, 2, 5, 5)
    elif name == "groupnorm":
        m = nn.Sequential(
            nn.Conv2d(2, 4, 3),
            nn.GroupNorm(2, 4, eps=0.1),
            nn.Tanh(),
            Flat(),
            nn.LazyLinear(3),
        )
        x = torch.randn(N, 2, 5, 5)
    elif name == "batchnorm1d":  # channels without positions
        m = nn.Sequential(
            nn.Linear(3, 4), nn.BatchNorm1d(4, eps=0.1), nn.Tanh(), nn.Linear(4, 3)
        )
        x = torch.randn(N, 3)
    elif name == "instancenorm":
        m = nn.Sequential(
            nn.Conv2d(2, 4, 3),
            nn.InstanceNorm2d(4, affine=True, eps=0.1),
            nn.Tanh(),
            Flat(),
            nn.LazyLinear(3),
        )
        x = torch.randn(N, 2, 5, 5)
    elif name == "instancenorm-stats":
        m = nn.Sequential(
            nn.Conv2d(2, 4, 3),
            nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
            nn.Tanh(),
            Flat(),
            nn.LazyLinear(3),
        )
        x = torch.randn(N, 2, 5, 5)
    elif name == "conv-same-valid":
        m = nn.Sequential(
            nn.Conv2d(2, 3, (5, 3), padding="same", dilation=(1, 2)),
            nn.Tanh(),
            nn.Conv2d(3, 2, 3, padding="valid"),
            Flat(),
            nn.LazyLinear(3),
        )
        x = torch.randn(N, 2, 6, 7)
    elif name == "two-fallbacks":
        m = nn.Sequential(
            nn.Linear(3, 4), _Scale(4), nn.Tanh(), _Scale(4), nn.Linear(4, 3)
        )
        x = torch.randn(N, 3)
    elif name == "keywords":
        m = _Keywords()
        x = torch.randint(0, 7, (N, 4))
    elif name == "rmsnorm":
        m = nn.Sequential(
            nn.Linear(3, 4), nn.RMSNorm(4, eps=0.1), nn.Tanh(), nn.Linear(4, 3)
        )
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
        norms = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.InstanceNorm2d)
        if isinstance(module, norms) or type(module).__name__.endswith("RMSNorm"):
            with torch.no_grad():
                module.weight.normal_()
                if getattr(module, "bias", None) is not None:
                    module.bias.normal_()
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm2d)) and (
            module.running_mean is not None
        ):
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
    "two-fallbacks",
    "keywords",
    "conv-same-valid",
    "batchnorm1d",
    "instancenorm",
    "instancenorm-stats",
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
    """Input ``a`` ``(N, T, in)`` and, per output column, the gradient w.r.t. the
    layer output ``(K, N, T, out)`` (one call of ``layer``)."""
    ((a, g, _, _),) = _uses_of(m, x, [layer])
    return a, g


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
    blocks = _dense_blocks(ggn, m)
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
    assert expected[0] > 0
    expected[0] = 0  # the padding row: no gradient, no count
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
    with pytest.raises(ValueError) as err:
        backprop_factor.outer_product_diag(m, _params(m), x, _ggn_factor)
    assert str(err.value) == (
        "BatchNorm2d normalizes with the statistics of the batch (training mode, or "
        "track_running_stats=False), which couples the examples: their curvature is "
        "not a sum over examples. Call model.eval() (Laplace.fit does) with running "
        "statistics."
    )
    assert not any(mod._forward_hooks_with_kwargs for mod in m.modules())


class _Branchy(nn.Module):
    """No rule, and a forward that branches on the data: torch.func cannot map it."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.w if bool(x.sum() > 0) else x - self.w


def test_a_fallback_that_torch_func_cannot_map_is_refused_with_what_to_do(device):
    m = nn.Sequential(nn.Linear(3, 3), _Branchy(), nn.Linear(3, 2))
    m = m.to(device, torch.float64)
    x = torch.randn(4, 3, device=device, dtype=torch.float64)
    with pytest.raises(RuntimeError) as err:
        backprop_factor.outer_product_diag(m, _params(m), x, _ggn_factor)
    message = str(err.value)
    assert message.startswith(
        "The curvature engine has no rule for _Branchy and could not compute the "
        "per-example gradients of its parameters ['w'] with torch.func ("
    )
    assert message.endswith(
        "Freeze these parameters (requires_grad=False), use last-layer or subnetwork "
        "Laplace, or a library backend."
    )


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


# -- Kronecker factors of weights with several uses, against the definition ----------
class _EmbeddedTwice(nn.Module):
    """One embedding called on both halves of the sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, idx):
        h = self.emb(idx[:, :3]).mean(1) * self.emb(idx[:, 3:]).mean(1)
        return self.head(torch.tanh(h))


class _EmbeddingAndConv1D(nn.Module):
    """An embedding whose weight ``(vocab, dim)`` a GPT-2 ``Conv1D`` also uses, the
    vocabulary on the forward side of both (one-hot for the embedding)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.proj = _hf_conv1d()(4, 7)  # weight (7, 4): 7 inputs, 4 outputs
        self.proj.weight = self.emb.weight
        self.head = nn.Linear(4, 3)

    def forward(self, idx):
        share = nn.functional.one_hot(idx, 7).to(self.emb.weight.dtype).mean(1)
        h = torch.tanh(self.emb(idx)).mean(1) + self.proj(share[:, None]).squeeze(1)
        return self.head(torch.tanh(h))


def _shared_weight_case(name, device):
    """``(model, x, the modules using its first parameter)``."""
    if name in ("embedded-twice", "embedding-and-conv1d"):
        torch.manual_seed(0)
        cls = _EmbeddedTwice if name == "embedded-twice" else _EmbeddingAndConv1D
        m = cls().to(device, torch.float64)
        x = torch.randint(0, 7, (5, 6), device=device)
        uses = [m.emb] if name == "embedded-twice" else [m.emb, m.proj]
        return m, x, uses
    m, x = build(name, device)
    if name == "tied":
        return m, x, [m.emb, m.head]
    if name == "hf-conv1d":
        return m, x[:, :2].contiguous(), [m[0]]  # two positions
    return m, x, [m[0]]


def _uses_of(m, x, modules):
    """Each call of ``modules``: ``(a (N, T, n_a), g (K, N, T, n_g), g_rows, one_hot)``
    with ``g`` the gradient of the output along each column of the GGN factor."""
    calls = []
    hooks = [
        mod.register_forward_hook(lambda mod, i, o: calls.append((mod, i[0], o)))
        for mod in modules
    ]
    f = m(x)
    for h in hooks:
        h.remove()
    M = _ggn_factor(f.detach())
    outs = [o for _, _, o in calls]
    gs = [[] for _ in calls]
    for k in range(M.shape[-1]):
        for i, g in enumerate(
            torch.autograd.grad(f, outs, M[..., k], retain_graph=True)
        ):
            gs[i].append(g)
    uses = []
    for (mod, a, _), g in zip(calls, gs):
        g = torch.stack(g)
        if isinstance(mod, nn.Embedding):
            if mod.padding_idx is not None:  # a padding position adds nothing
                g = g * (a != mod.padding_idx)[..., None].to(g.dtype)
            a = nn.functional.one_hot(a, mod.num_embeddings).to(g.dtype)
            if mod.padding_idx is not None:
                a[..., mod.padding_idx] = 0
        if a.ndim == 2:  # one position
            a, g = a[:, None], g[:, :, None]
        uses.append(
            (a.detach(), g, isinstance(mod, nn.Linear), isinstance(mod, nn.Embedding))
        )
    return uses


def _kfac_definition(uses, N_data, approx):
    """KFAC of one weight over all its uses: the row-side factor
    ``L = sum_i u_i u_i^T`` and the column-side ``R / (K T N_data)`` over the terms
    ``i = (k, n, t)`` of every use (a forward-side vector once per column ``k``),
    ``T`` the positions per example of all uses; under 'reduce' a use that is not an
    embedding first sums ``g`` and averages ``a`` over its positions."""
    L = R = 0
    T = 0
    for a, g, g_rows, one_hot in uses:
        K = g.shape[0]
        if approx == "reduce" and not one_hot:
            a, g = a.mean(1, keepdim=True), g.sum(2, keepdim=True)
        T += a.shape[1]
        gg = torch.einsum("knto,kntp->op", g, g)
        aa = K * torch.einsum("nti,ntj->ij", a, a)
        L, R = (L + gg, R + aa) if g_rows else (L + aa, R + gg)
    return L, R / (K * T * N_data)


@pytest.mark.parametrize(
    "name, approx",
    [
        ("tied", "expand"),
        ("tied", "reduce"),
        ("embedded-twice", "expand"),
        ("embedding-and-conv1d", "expand"),
        ("embedding-and-conv1d", "reduce"),
        ("hf-conv1d", "expand"),
        ("hf-conv1d", "reduce"),
        ("embedding", "reduce"),
    ],
)
def test_kron_of_a_weight_with_several_uses_follows_the_definition(
    name, approx, device
):
    """A weight-tied head, an embedding called twice, an embedding shared with a
    ``Conv1D``, and (one use) a ``Conv1D`` and an embedding: the first parameter's
    Kronecker factors are the sums of every use's, a one-hot side exact, a diagonal
    where every use of that side is one-hot."""
    m, x, modules = _shared_weight_case(name, device)
    N_data = 9
    n_out = m(x).shape[-1]
    y = torch.zeros(len(x), dtype=torch.long, device=device)
    assert n_out > 1
    _, kron = NativeGGN(m, "classification", kfac_approx=approx).kron(x, y, N=N_data)
    F0, F1 = kron.kfacs[0]
    uses = _uses_of(m, x, modules)
    L, R = _kfac_definition(uses, N_data, approx)
    assert (F0.ndim == 1) == all(one_hot for *_, one_hot in uses)
    F0 = torch.diag(F0) if F0.ndim == 1 else F0
    torch.testing.assert_close(F0, L)
    torch.testing.assert_close(torch.kron(F0, F1), torch.kron(L, R))
    if name == "hf-conv1d":  # the bias: the summed products of its outputs' side
        ((a, g, _, _),) = uses
        g = g.sum(2, keepdim=True) if approx == "reduce" else g
        (G,) = kron.kfacs[1]
        torch.testing.assert_close(G, torch.einsum("knto,kntp->op", g, g))


# -- the fallbacks of the structures, and their chunks -------------------------------
@pytest.mark.parametrize("name", ["hf-conv1d", "embedding"])
def test_diagonal_of_a_transposed_weight_at_one_position_equals_the_oracle(
    name, device
):
    """A weight whose rows are its forward side (``Conv1D``, an embedding) at one
    position takes the diagonal's shortcut: the same order as the oracle's."""
    m, x = build(name, device)
    x = x[:, :1].contiguous()
    ggn = oracles.ggn(m, x, "classification")
    _, d = backprop_factor.outer_product_diag(m, _params(m), x, _ggn_factor)
    torch.testing.assert_close(d, ggn.diagonal())


@pytest.mark.parametrize("name", ["tied", "reused", "fallback"])
def test_diagonal_in_chunks_of_examples_equals_the_oracle(name, device, monkeypatch):
    """Where the diagonal forms per-example gradients (weights with several uses, a
    parameter no rule covers) it does so a few examples at a time."""
    m, x = build(name, device)
    ggn = oracles.ggn(m, x, "classification")
    monkeypatch.setattr(structures, "_CHUNK_ENTRIES", 1)  # one example per chunk
    _, d = backprop_factor.outer_product_diag(m, _params(m), x, _ggn_factor)
    torch.testing.assert_close(d, ggn.diagonal())


class _AlsoRaw(nn.Module):
    """A Linear whose weight the forward also uses outside the module."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.head = nn.Linear(3, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x) + x @ self.lin.weight))


def _dense_blocks(ggn, m):
    sizes = [p.numel() for p in _params(m)]
    starts = torch.tensor([0, *sizes]).cumsum(0).tolist()
    return [ggn[a:b, a:b] for a, b in zip(starts, starts[1:])]


def test_weight_used_by_a_module_and_outside_any_gets_its_dense_block(device):
    torch.manual_seed(0)
    m = _AlsoRaw().to(device, torch.float64)
    x = torch.randn(5, 3, device=device, dtype=torch.float64)
    y = torch.zeros(5, dtype=torch.long, device=device)
    _, kron = NativeGGN(m, "classification").kron(x, y, N=5)
    (block,) = kron.kfacs[0]
    assert block.shape == (9, 9)
    torch.testing.assert_close(
        block, _dense_blocks(oracles.ggn(m, x, "classification"), m)[0]
    )


def test_large_parameter_without_a_rule_gets_its_exact_diagonal(device, monkeypatch):
    m, x = build("fallback", device)
    monkeypatch.setattr(structures, "DENSE_BLOCK_LIMIT", 1)
    y = torch.zeros(len(x), dtype=torch.long, device=device)
    _, kron = NativeGGN(m, "classification").kron(x, y, N=len(x))
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    blocks = _dense_blocks(oracles.ggn(m, x, "classification"), m)
    i = names.index("1.scale")
    (diag,) = kron.kfacs[i]
    assert diag.ndim == 1
    torch.testing.assert_close(diag, blocks[i].diagonal())


def test_gram_of_a_wide_factor_is_its_gram_matrix(device):
    """Above 1,024 columns a factor's gram is formed by blocks."""
    gen = torch.Generator(device).manual_seed(0)
    V = torch.randn(6, 1100, device=device, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(structures._gram(V), V.T @ V)


class _Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.spare = nn.Linear(3, 2)  # never called

    def forward(self, x):
        return self.lin(x)


def test_selected_entries_of_a_parameter_the_forward_never_uses_are_zero(device):
    torch.manual_seed(0)
    m = _Unused().to(device, torch.float64)
    x = torch.randn(5, 3, device=device, dtype=torch.float64)
    idx = torch.tensor([1, 14, 17, 20], device=device)  # lin, lin, spare, spare
    _, V = backprop_factor.per_example_vectors(
        m, _params(m), x, backprop_factor.identity_factor, idx
    )
    J = oracles.jacobian(m, x)
    torch.testing.assert_close(V.transpose(0, 1), J[:, :, idx])
    assert not V[..., 2:].any()


def test_the_padding_row_of_an_embedding_gets_no_curvature(device):
    """The padding row gets no gradient, so its GGN block is zero; KFAC counts no
    padding token, so its Kronecker block is zero too, next to a token that gives
    the other factor a value."""
    m, _ = build("embedding", device)
    x = torch.tensor([[0, 3]], device=device)  # the padding id and a token
    y = torch.zeros(1, dtype=torch.long, device=device)
    _, kron = NativeGGN(m, "classification").kron(x, y, N=1)
    counts, G = kron.kfacs[0]
    block = torch.kron(torch.diag(counts), G)
    assert not oracles.ggn(m, x, "classification")[:4, :28].any()
    assert not block[:4].any() and G.any() and counts[3] > 0


class _DeadEnd(nn.Module):
    """A Linear whose output never reaches the model's output: no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.dead = nn.Linear(3, 2)

    def forward(self, x):
        self.dead(x)
        return self.lin(x)


@pytest.mark.parametrize("columns", ["batched", "one by one", "one column"])
@pytest.mark.parametrize("name", ["linear-seq", "tied", "dead-end"])
def test_gradients_of_every_column_path_equal_the_oracle(
    name, columns, device, monkeypatch
):
    """The columns of ``M`` backpropagated in one batched pass, one by one (a model
    without batching rules), or a single column (a plain backward pass); a module
    whose output never reaches the outputs gets zero gradients."""
    if name == "dead-end":
        torch.manual_seed(0)
        m = _DeadEnd().to(device, torch.float64)
        x = torch.randn(5, 3, device=device, dtype=torch.float64)
    else:
        m, x = build(name, device)
    if columns == "one by one":
        monkeypatch.setattr(engine, "_UNBATCHED", {m})
    factor = _ggn_factor
    if columns == "one column":
        C = m(x).shape[-1]
        w = torch.randn(C, 1, device=device, dtype=torch.float64)

        def factor(f):  # M_n = w: one column
            return w.expand(f.shape[0], C, 1)

    J = oracles.jacobian(m, x)  # (N, C, P)
    M = factor(m(x).detach())
    V = torch.einsum("ncp,nck->nkp", J, M)
    _, H = backprop_factor.outer_product_full(m, _params(m), x, factor)
    torch.testing.assert_close(H, torch.einsum("nkp,nkq->pq", V, V))
    if name == "dead-end":
        assert not H[-8:].any()  # dead.weight, dead.bias


def test_jacobian_one_column_at_a_time_is_differentiable_in_the_inputs(
    device, monkeypatch
):
    m, x = build("linear-seq", device)
    monkeypatch.setattr(engine, "_UNBATCHED", {m})
    x = x.clone().requires_grad_()
    J, f = backprop_factor.jacobian(m, _params(m), x, create_graph=True)
    (gx,) = torch.autograd.grad(J.square().sum() + f.sum(), x)

    def total(x):
        return oracles.jacobian(m, x).square().sum() + m(x).sum()

    (ox,) = torch.autograd.grad(total(x), x)
    torch.testing.assert_close(gx, ox)


class _FlatTokens(nn.Module):
    """An embedding of the tokens of all examples flattened into one row each."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4, padding_idx=0)
        self.head = nn.Linear(4, 3)

    def forward(self, idx):
        N, T = idx.shape
        h = self.emb(idx.reshape(-1)).reshape(N, T, -1)
        return self.head(torch.tanh(h).mean(1))


def test_embedding_of_flattened_tokens_equals_the_oracle(device):
    """The embedding sees ``N T`` rows; its terms are brought back to ``N`` examples,
    its ids with them."""
    torch.manual_seed(0)
    m = _FlatTokens().to(device, torch.float64)
    x = torch.randint(0, 7, (5, 3), device=device)
    ggn = oracles.ggn(m, x, "classification")
    _, H = backprop_factor.outer_product_full(m, _params(m), x, _ggn_factor)
    torch.testing.assert_close(H, ggn)
    _, d = backprop_factor.outer_product_diag(m, _params(m), x, _ggn_factor)
    torch.testing.assert_close(d, ggn.diagonal())
    y = torch.zeros(len(x), dtype=torch.long, device=device)
    _, kron = NativeGGN(m, "classification").kron(x, y, N=len(x))
    counts = kron.kfacs[0][0]
    assert (x == 0).any() and counts[0] == 0  # the padding id, flattened too
    assert counts[1:].sum() == 2 * int((x != 0).sum())  # K = 2 columns a token


class _Coupled(nn.Module):
    """Items flattened into rows, then the examples mixed (centred over the batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        N = x.shape[0]
        h = self.lin(x.reshape(-1, 3)).reshape(N, -1, 4).mean(1)
        return self.head(h - h.mean(0))


class _ReturnsDict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return {"logits": self.lin(x)}


def test_bad_models_are_refused_with_what_to_do(device):
    x = torch.randn(4, 2, 3, device=device, dtype=torch.float64)
    m = _Coupled().to(device, torch.float64)
    with pytest.raises(ValueError) as err:
        backprop_factor.outer_product_diag(m, _params(m), x, _ggn_factor)
    assert str(err.value) == (
        "The curvature engine cannot tell which entries of the output of module "
        "'lin' (Linear, shape (8, 4)) belong to which of the 4 examples: each "
        "example's outputs must depend on its own rows only (a batch dimension, "
        "possibly flattened with others). Put the model in eval mode (batch "
        "statistics couple examples) or freeze this module."
    )
    m = _ReturnsDict().to(device, torch.float64)
    with pytest.raises(TypeError, match=r"returned a dict\. Wrap it"):
        backprop_factor.outer_product_diag(m, _params(m), x[:, 0], _ggn_factor)
    stranger = nn.Parameter(torch.zeros(2, device=device))
    with pytest.raises(ValueError, match="1 of the parameters are not parameters"):
        engine.plan(m, [*_params(m), stranger])


class _PositionIds1D(nn.Module):
    """nanoGPT's position embedding: ids ``arange(T)`` of shape ``(T,)``, one output
    ``(T, d)`` broadcast over the examples; ``pool`` as written by the model."""

    def __init__(self, pool: str = "add") -> None:
        super().__init__()
        self.tok = nn.Embedding(7, 4)
        self.pos = nn.Embedding(3, 4)
        self.head = nn.Linear(4, 2)
        self.pool = pool

    def forward(self, idx):
        pos = self.pos(torch.arange(idx.shape[1], device=idx.device))
        if self.pool == "mean over positions":  # reads pos's first dimension
            pos = pos.mean(0)
        if self.pool == "unsqueeze":  # (1, T, d) of its own: copies add a dimension
            pos = pos[None]
        h = self.tok(idx) + pos
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize("N", [2, 5])
def test_position_embedding_of_one_dimensional_ids_equals_the_oracle(N, device):
    """The position embedding's one output serves every example: the engine learns
    it (no batch dimension found), passes it on as one copy per example and gets
    each example's gradient; dense, diagonal and Kronecker-vector products are
    exact."""
    torch.manual_seed(0)
    m = _PositionIds1D().to(device, torch.float64)
    x = torch.randint(0, 7, (N, 3), device=device)
    ggn = oracles.ggn(m, x, "classification")
    _, H = backprop_factor.outer_product_full(m, _params(m), x, _ggn_factor)
    torch.testing.assert_close(H, ggn)
    _, d = backprop_factor.outer_product_diag(m, _params(m), x, _ggn_factor)
    torch.testing.assert_close(d, ggn.diagonal())
    tape = engine.run(m, _params(m), x, _ggn_factor)
    X = torch.randn(ggn.shape[0], 2, device=device, dtype=ggn.dtype)
    torch.testing.assert_close(structures.gram_matmat(tape, X), ggn @ X)
    assert not any(mod._forward_hooks for mod in m.modules())


def test_a_shared_output_the_model_reduces_over_its_rows_is_refused(device):
    """Copies per example would change what the model computes: refused, naming the
    module and what works."""
    torch.manual_seed(0)
    m = _PositionIds1D("mean over positions").to(device, torch.float64)
    x = torch.randint(0, 7, (5, 3), device=device)
    for _ in range(2):  # refused again, not learnt
        with pytest.raises(ValueError) as err:
            backprop_factor.outer_product_diag(m, _params(m), x, _ggn_factor)
        assert str(err.value) == (
            "Module 'pos' (Embedding) computes one output of shape (3, 4) for all 5 "
            "examples; the curvature engine passes it on as one copy per example "
            "(shape (5, 3, 4)) so that their gradients stay apart, and the model's "
            "outputs then change (shape (5, 2) -> (5, 2)). Give the module a batch "
            "dimension (e.g. ids of shape (1, T)) or freeze it."
        )


def test_a_shared_output_in_a_random_model_is_not_refused(device):
    """Dropout makes two forward passes differ: that is not taken for a change."""
    torch.manual_seed(0)
    m = nn.Sequential(_PositionIds1D(), nn.Dropout(0.5)).to(device, torch.float64)
    x = torch.randint(0, 7, (5, 3), device=device)
    f, d = backprop_factor.outer_product_diag(m.train(), _params(m), x, _ggn_factor)
    assert f.shape == (5, 2) and d.shape == (sum(p.numel() for p in _params(m)),)
    # but a change of the outputs' shape is refused, random or not
    m = nn.Sequential(_PositionIds1D("unsqueeze"), nn.Dropout(0.5))
    m = m.to(device, torch.float64).train()
    with pytest.raises(ValueError, match=r"outputs then change \(shape \(5, 2\) ->"):
        backprop_factor.outer_product_diag(m, _params(m), x, _ggn_factor)


def _outside_the_library(filename: str) -> bool:
    """The test's own file (or, under mutation testing, mutmut's trampoline that
    calls into the library)."""
    return filename == __file__ or "mutmut" in filename


def test_structure_table_of_shared_outside_and_large_parameters(device, monkeypatch):
    """A tied weight lists both modules and rules; a weight used outside its module
    is the model's, after a forward pass has shown it; a parameter no rule covers
    gets its dense block, or its diagonal above ``DENSE_BLOCK_LIMIT``."""
    m, _ = build("tied", device)
    rows = {r["parameter"]: r for r in engine.structure_table(m, _params(m))}
    assert rows["emb.weight"] == {
        "parameter": "emb.weight",
        "modules": "emb (Embedding), head (Linear)",
        "rules": "embedding, linear",
        "kron": "kronecker",
    }
    torch.manual_seed(0)
    raw = _AlsoRaw().to(device, torch.float64)
    x = torch.randn(4, 3, device=device, dtype=torch.float64)
    assert engine.structure_table(raw, _params(raw))[0]["rules"] == "linear"
    y = torch.zeros(4, dtype=torch.long, device=device)
    with pytest.warns(UserWarning, match=r"uses lin\.weight outside the module") as w:
        NativeGGN(raw, "classification").diag(x, y)
    assert str(w[0].message) == (
        "The model uses lin.weight outside the module(s) serving it in the "
        "curvature engine (e.g. a head written F.linear(h, emb.weight)); no rule "
        "sees all its uses, so its exact per-example gradients now come from "
        "torch.func over the whole model."
    )
    assert _outside_the_library(w[0].filename)  # the user's line
    (row, *_) = engine.structure_table(raw, _params(raw))
    assert row == {
        "parameter": "lin.weight",
        "modules": "(model) (_AlsoRaw)",
        "rules": "fallback",
        "kron": "dense",
    }
    m, _ = build("fallback", device)
    monkeypatch.setattr(engine, "DENSE_BLOCK_LIMIT", 3)
    rows = {r["parameter"]: r["kron"] for r in engine.structure_table(m, _params(m))}
    assert rows["1.scale"] == "diagonal" and rows["1.shift"] == "diagonal"
    monkeypatch.setattr(engine, "DENSE_BLOCK_LIMIT", 4)
    rows = {r["parameter"]: r["kron"] for r in engine.structure_table(m, _params(m))}
    assert rows["1.scale"] == "dense"


def test_the_fallback_warning_lists_every_parameter_it_serves(device):
    m, x = build("fallback", device)
    y = torch.zeros(len(x), dtype=torch.long, device=device)
    with pytest.warns(UserWarning) as caught:
        NativeGGN(m, "classification").diag(x, y)
    (w,) = caught
    assert str(w.message) == (
        "The curvature engine has no rule for some modules; their parameters get "
        "exact per-example gradients from torch.func on the module alone, and in a "
        "Kronecker-factored curvature their exact dense block or diagonal: "
        "1.scale in 1 (_Scale): dense; 1.shift in 1 (_Scale): dense."
    )
    assert _outside_the_library(w.filename)  # the user's line, not the library's


def test_jacobian_of_one_output_is_differentiable_in_the_inputs(device):
    """One output: a plain backward pass (one column), kept differentiable."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    m = m.to(device, torch.float64)
    x = torch.randn(5, 3, device=device, dtype=torch.float64, requires_grad=True)
    J, f = backprop_factor.jacobian(m, _params(m), x, create_graph=True)
    (gx,) = torch.autograd.grad(J.square().sum() + f.sum(), x)

    def total(x):
        return oracles.jacobian(m, x).square().sum() + m(x).sum()

    (ox,) = torch.autograd.grad(total(x), x)
    torch.testing.assert_close(gx, ox)


class _RegisteredTwice(nn.Module):
    """ALBERT-style sharing: one Linear and one rule-less module, each registered
    under two names and called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = self.a
        self.s = _Scale(3)
        self.t = self.s
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.s(self.a(x)))
        return self.head(torch.tanh(self.t(self.b(h))))


def test_modules_registered_under_two_names_count_each_call_once(device):
    torch.manual_seed(0)
    m = _RegisteredTwice().to(device, torch.float64)
    x = torch.randn(5, 3, device=device, dtype=torch.float64)
    # on a copy: torch.func's functional_call leaves a module registered twice with
    # its parameters detached
    ggn = oracles.ggn(copy.deepcopy(m), x, "classification")
    _, H = backprop_factor.outer_product_full(m, _params(m), x, _ggn_factor)
    torch.testing.assert_close(H, ggn)


class _SharedQuery(nn.Module):
    """A learned query vector ``(d,)`` projected once for the whole batch."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Parameter(torch.randn(4))
        self.proj = nn.Linear(4, 4)
        self.inp = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.inp(x) + self.proj(self.q)))


def test_a_linear_layer_on_one_vector_shared_by_the_batch_equals_the_oracle(device):
    torch.manual_seed(0)
    m = _SharedQuery().to(device, torch.float64)
    x = torch.randn(5, 3, device=device, dtype=torch.float64)
    ggn = oracles.ggn(m, x, "classification")
    _, H = backprop_factor.outer_product_full(m, _params(m), x, _ggn_factor)
    torch.testing.assert_close(H, ggn)


def _jacobian_from_factors(factors):
    """``J`` ``(C, N, P)`` from ``backprop_factor.jacobian_factors``' entries."""
    parts = []
    for factor in factors:
        if factor[0] is None:
            parts.append(factor[1])
            continue
        a, g = factor[0], factor[1]
        J = torch.einsum("cnto,nti->cnoi", g, a)  # the (out, in) view
        if len(factor) == 3:  # the (in, out) view
            J = J.transpose(-1, -2)
        parts.append(J.reshape(J.shape[0], J.shape[1], -1))
    return torch.cat(parts, -1)


@pytest.mark.parametrize(
    "name", ["linear-seq", "hf-conv1d", "tied", "embedding", "layernorm", "reused"]
)
def test_jacobian_factors_of_the_glm_predictive_equal_the_oracle(name, device):
    """Factored where a weight has one linear use (``(a, g)``, transposed for
    ``Conv1D``), the Jacobian itself otherwise (a tied or reused weight, a bias, a
    norm's scale)."""
    m, x = build(name, device)
    f, factors = backprop_factor.jacobian_factors(m, _params(m), x)
    J = oracles.jacobian(m, x)  # (N, C, P)
    torch.testing.assert_close(_jacobian_from_factors(factors), J.transpose(0, 1))
    torch.testing.assert_close(f, m(x).detach())
    kinds = [len(fa) if fa[0] is not None else 0 for fa in factors]
    if name == "hf-conv1d":
        assert kinds[0] == 3  # factored, transposed
    if name in ("tied", "reused"):
        assert kinds[0] == 0  # several uses: the Jacobian itself


@pytest.mark.parametrize("model", [_DeadEnd, _Unused])
def test_matrix_free_products_of_parameters_without_gradient_are_zero(model, device):
    """A module called off the path to the outputs (zero terms), or never called
    (no terms at all)."""
    torch.manual_seed(0)
    m = model().to(device, torch.float64)
    x = torch.randn(5, 3, device=device, dtype=torch.float64)
    idle = list((m.dead if model is _DeadEnd else m.spare).parameters())
    tape = engine.run(m, idle, x, _ggn_factor)
    X = torch.randn(8, 2, device=device, dtype=torch.float64)
    product = structures.gram_matmat(tape, X)
    assert product.shape == X.shape and not product.any()


@pytest.mark.parametrize(
    "name",
    [
        "layernorm",
        "groupnorm",
        "rmsnorm",
        "hf-rmsnorm",
        "batchnorm",
        "batchnorm1d",
        "instancenorm",
        "keywords",
        "conv-same-valid",
    ],
)
def test_every_layer_of_the_rule_table_is_served_by_its_rule(name, device):
    """The numbers would be right through the fallback too: the table says that the
    rule, not the fallback, serves each layer."""
    m, _ = build(name, device)
    rules_of = {
        r["parameter"]: r["rules"] for r in engine.structure_table(m, _params(m))
    }
    assert "fallback" not in rules_of.values()
    norms = {n for n, r in rules_of.items() if r == "norm"}
    if name not in ("keywords", "conv-same-valid"):
        assert norms  # the normalization layer's parameters


def test_kron_added_into_an_earlier_batch_equals_the_kron_of_both(device):
    m, x = build("linear-seq", device)
    y = torch.randint(0, 3, (len(x),), device=device)
    backend = NativeGGN(m, "classification")
    _, whole = backend.kron(x, y, N=7)
    _, first = backend.kron(x[:2], y[:2], N=7)
    _, both = backend.kron(x[2:], y[2:], N=7, into=first)
    assert both is first  # added in place
    for a, b in zip(whole.kfacs, both.kfacs, strict=True):
        for fa, fb in zip(a, b, strict=True):
            torch.testing.assert_close(fb, fa)


class _SequenceFirst(nn.Module):
    """A layer applied to ``(T, N, d)``; with ``T == N`` the leading dimension alone
    does not tell where the examples are."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        h = torch.tanh(self.lin(x.transpose(0, 1)))  # (T, N, 5)
        return self.head(h.mean(0))


def test_sequence_first_layer_with_as_many_positions_as_examples(device):
    torch.manual_seed(0)
    m = _SequenceFirst().to(device, torch.float64)
    x = torch.randn(4, 4, 3, device=device, dtype=torch.float64)  # N = T = 4
    ggn = oracles.ggn(m, x, "classification")
    _, H = backprop_factor.outer_product_full(m, _params(m), x, _ggn_factor)
    torch.testing.assert_close(H, ggn)


class _CoupledConv(nn.Module):
    """A convolution of items flattened into rows, then the examples mixed."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 2)
        self.head = nn.Linear(4, 2)

    def forward(self, x):  # (N, 2, 3, 5)
        N = x.shape[0]
        h = self.conv(x.reshape(-1, 3, 5)).reshape(N, 2, 4, 4).mean((1, 3))
        return self.head(h - h.mean(0))


def test_coupled_examples_behind_a_convolution_are_refused(device):
    m = _CoupledConv().to(device, torch.float64)
    x = torch.randn(3, 2, 3, 5, device=device, dtype=torch.float64)
    with pytest.raises(ValueError) as err:
        backprop_factor.outer_product_diag(m, _params(m), x, _ggn_factor)
    assert str(err.value).startswith(
        "The curvature engine cannot tell which entries of the output of module "
        "'conv' (Conv1d, shape (6, 4, 4)) belong to which of the 3 examples:"
    )


def test_parameters_of_modules_never_called_have_zero_curvature(device):
    """No tapped output at all: every structure is zero, in the outputs' dtype."""
    torch.manual_seed(0)
    m = _Unused().to(device, torch.float64)
    x = torch.randn(5, 3, device=device, dtype=torch.float64)
    spare = list(m.spare.parameters())
    f, d = backprop_factor.outer_product_diag(m, spare, x, _ggn_factor)
    assert d.shape == (8,) and d.dtype == torch.float64 and not d.any()
    torch.testing.assert_close(f, m(x).detach())
    idx = torch.tensor([0, 5], device=device)
    _, V = backprop_factor.per_example_vectors(m, spare, x, _ggn_factor, idx)
    K = _ggn_factor(m(x)).shape[-1]
    assert V.shape == (K, 5, 2) and not V.any()


class _UnbatchedConv(nn.Module):
    """One example; the convolution sees it without a batch dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 2, dilation=2)
        self.head = nn.Linear(9, 2)

    def forward(self, x):  # (1, 2, 5)
        return self.head(torch.tanh(self.conv(x[0])).flatten()[None])


def test_convolution_of_an_unbatched_input_equals_the_oracle(device):
    torch.manual_seed(0)
    m = _UnbatchedConv().to(device, torch.float64)
    x = torch.randn(1, 2, 5, device=device, dtype=torch.float64)
    ggn = oracles.ggn(m, x, "classification")
    _, H = backprop_factor.outer_product_full(m, _params(m), x, _ggn_factor)
    torch.testing.assert_close(H, ggn)
    _, d = backprop_factor.outer_product_diag(m, _params(m), x, _ggn_factor)
    torch.testing.assert_close(d, ggn.diagonal())


class _RegisteredTwiceAndRaw(nn.Module):
    """A Linear registered under two names whose weight the model also uses raw,
    and an embedding tied to a head and also used raw: both go to the model's
    fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = self.a
        self.emb = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        h = self.emb(idx).mean(1)
        h = torch.tanh(self.b(torch.tanh(self.a(h))) + h @ self.a.weight.T)
        return self.head(h) + nn.functional.linear(h, self.emb.weight)


def test_the_models_fallback_is_exact_and_leaves_shared_weights_as_found(device):
    torch.manual_seed(0)
    m = _RegisteredTwiceAndRaw().to(device, torch.float64)
    x = torch.randint(0, 7, (5, 3), device=device)
    ggn = oracles.ggn(copy.deepcopy(m), x, "classification")
    before = {n: p for n, p in m.named_parameters(remove_duplicate=False)}
    y = torch.zeros(5, dtype=torch.long, device=device)
    with pytest.warns(UserWarning, match=r"uses a\.weight, emb\.weight outside"):
        NativeGGN(m, "classification").diag(x, y)
    _, H = backprop_factor.outer_product_full(m, _params(m), x, _ggn_factor)
    torch.testing.assert_close(H, ggn)
    after = dict(m.named_parameters(remove_duplicate=False))
    assert after.keys() == before.keys()
    assert all(after[n] is p and isinstance(p, nn.Parameter) for n, p in before.items())
    assert m(x).requires_grad
