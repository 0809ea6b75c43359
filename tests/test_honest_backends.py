"""A backend named after a library computes with that library, for every structure
that ``support_table()`` says it supports.

The project's own curvature routines (the engine's pass, the entry points of
``backprop_factor``, the outer-product curvature of ``GGNInterface``/``EFInterface``
and the likelihood's output-Hessian factors) are made to raise; every structure a
library backend claims is then computed on all weights, the last layer, a
subnetwork and mapping batches (where claimed), recorded to have called the
library's own routine, and checked against dense float64 oracles.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import oracles
from laplace import likelihood as likelihoods
from laplace.curvature import (
    BACKENDS,
    AsdlEF,
    AsdlGGN,
    AsdlHessian,
    BackPackEF,
    BackPackGGN,
    CurvlinopsEF,
    CurvlinopsGGN,
    CurvlinopsHessian,
    EFInterface,
    GGNInterface,
    backprop_factor,
    curvature,
    engine,
    support_table,
)
from models import DictModel, data, model

#: the library each library backend is named after
LIBRARY = {
    CurvlinopsGGN: "curvlinops",
    CurvlinopsEF: "curvlinops",
    CurvlinopsHessian: "curvlinops",
    BackPackGGN: "backpack",
    BackPackEF: "backpack",
    AsdlGGN: "asdl",
    AsdlEF: "asdl",
    AsdlHessian: "asdl",
}

#: the library routine that computes each claimed structure (exact, Monte Carlo)
ROUTINE = {
    (CurvlinopsGGN, "full"): ("GGNLinearOperator", "FisherMCLinearOperator"),
    (CurvlinopsGGN, "diag"): ("GGNLinearOperator", "FisherMCLinearOperator"),
    (CurvlinopsGGN, "kron"): ("KFACLinearOperator:type-2", "KFACLinearOperator:mc"),
    (CurvlinopsEF, "full"): ("EFLinearOperator",),
    (CurvlinopsEF, "diag"): ("EFLinearOperator",),
    (CurvlinopsEF, "kron"): ("KFACLinearOperator:empirical",),
    (CurvlinopsHessian, "full"): ("HessianLinearOperator",),
    (CurvlinopsHessian, "diag"): ("HessianLinearOperator",),
    (BackPackGGN, "full"): ("SqrtGGNExact", "SqrtGGNMC"),
    (BackPackGGN, "diag"): ("DiagGGNExact", "DiagGGNMC"),
    (BackPackGGN, "kron"): ("KFLR", "KFAC"),
    (BackPackEF, "full"): ("BatchGrad",),
    (BackPackEF, "diag"): ("SumGradSquared",),
    # the exact full GGN from ASDL's per-example gradients of f^T m_k (asdl.py)
    (AsdlGGN, "full"): ("save_batch_gradient", "FisherMaker:fisher_mc:full"),
    (AsdlGGN, "diag"): ("FisherMaker:fisher_exact:diag", "FisherMaker:fisher_mc:diag"),
    (AsdlGGN, "kron"): ("FisherMaker:fisher_exact:kron", "FisherMaker:fisher_mc:kron"),
    (AsdlEF, "full"): ("FisherMaker:fisher_emp:full",),
    (AsdlEF, "diag"): ("FisherMaker:fisher_emp:diag",),
    (AsdlEF, "kron"): ("FisherMaker:fisher_emp:kron",),
    (AsdlHessian, "full"): ("HessianMaker:full",),
    (AsdlHessian, "diag"): ("HessianMaker:diag",),
}

CLAIMS = [
    pytest.param(b, s, id=f"{b.__name__}-{s}")
    for b in LIBRARY
    for s, claimed in support_table()[b.__name__].items()
    if claimed and s != "dict inputs"
]


def test_every_library_backend_and_claim_is_checked():
    """A new library backend, or a new claim, must enter the tables above."""
    library_backends = {b for b in BACKENDS if not b.__name__.startswith("Native")}
    assert library_backends == set(LIBRARY)
    claims = {(p.values[0], p.values[1]) for p in CLAIMS}
    assert claims == set(ROUTINE)


# -- the project's routines raise; the library's are recorded -----------------------
def _forbidden(name):
    def raiser(*args, **kwargs):
        raise AssertionError(f"the project's {name} was called")

    return raiser


def _forbid_project_routines(monkeypatch, allow_output_factor: bool):
    routines = [(engine, "run")]
    routines += [
        (backprop_factor, name)
        for name in (
            "per_example_vectors",
            "outer_product_diag",
            "outer_product_full",
            "kfac_factors",
            "backprop_to_layers",
            "linear_layer_full",
            "jacobian",
            "jacobian_factors",
        )
        if hasattr(backprop_factor, name)
    ]
    outer = curvature._OuterProductCurvature
    routines += [
        (outer, name)
        for name in (
            "_outer_product",
            "_last_layer_diag",
            "last_layer_moments",
            "_output_moments",
        )
    ]
    routines += [(GGNInterface, "_output_moments")]
    if not allow_output_factor:
        routines += [(GGNInterface, "_output_factor"), (EFInterface, "_output_factor")]
        routines += [
            (cls, name)
            for cls in (
                likelihoods.RegressionLikelihood,
                likelihoods.ClassificationLikelihood,
            )
            for name in (
                "hessian_sqrt",
                "hessian_moments",
                "sampled_gradients",
                "loss_gradient",
            )
        ]
    for owner, name in routines:
        monkeypatch.setattr(owner, name, _forbidden(name))


def _record_library_calls(monkeypatch, library: str) -> list[str]:
    calls: list[str] = []
    if library == "curvlinops":
        import curvlinops

        for name in (
            "GGNLinearOperator",
            "FisherMCLinearOperator",
            "EFLinearOperator",
            "HessianLinearOperator",
            "KFACLinearOperator",
        ):
            cls = getattr(curvlinops, name)

            def make(*args, _cls=cls, _name=name, **kwargs):
                kind = kwargs.get("fisher_type")
                calls.append(_name if kind is None else f"{_name}:{kind}")
                return _cls(*args, **kwargs)

            monkeypatch.setattr(curvlinops, name, make)
    elif library == "backpack":
        import backpack

        original = backpack.backpack

        def recording(*extensions, **kwargs):
            calls.extend(type(e).__name__ for e in extensions)
            return original(*extensions, **kwargs)

        monkeypatch.setattr(backpack, "backpack", recording)
    else:
        import asdl

        get_fisher_maker, hessian_maker = asdl.get_fisher_maker, asdl.HessianMaker
        save_batch_gradient = asdl.save_batch_gradient

        def fisher(module, config):
            (shape,) = config.fisher_shapes
            calls.append(f"FisherMaker:{config.fisher_type}:{shape}")
            return get_fisher_maker(module, config)

        def hessian(module, config):
            (shape,) = config.hessian_shapes
            calls.append(f"HessianMaker:{shape}")
            return hessian_maker(module, config)

        def gradients(*args, **kwargs):
            calls.append("save_batch_gradient")
            return save_batch_gradient(*args, **kwargs)

        monkeypatch.setattr(asdl, "get_fisher_maker", fisher)
        monkeypatch.setattr(asdl, "HessianMaker", hessian)
        monkeypatch.setattr(asdl, "save_batch_gradient", gradients)
    return calls


#: ASDL's per-example gradients of ``f^T m_k`` for the columns ``m_k`` of the
#: likelihood's output-Hessian factor (``AsdlFisher._by_examples``): the only route
#: that takes the output factor from the likelihood rather than from the library
PER_EXAMPLE_ROUTE = "save_batch_gradient"


@pytest.fixture
def honest(monkeypatch):
    """``check(backend_cls, structure, stochastic=False, route=None) -> done``:
    forbid the project's routines and record the library's for one backend and
    structure; ``done()`` asserts that the library routine of ``ROUTINE`` (or
    ``route``) computed it."""

    def check(backend_cls, structure, stochastic=False, route=None):
        expected = route or ROUTINE[backend_cls, structure][1 if stochastic else 0]
        _forbid_project_routines(monkeypatch, expected == PER_EXAMPLE_ROUTE)
        calls = _record_library_calls(monkeypatch, LIBRARY[backend_cls])

        def done():
            assert expected in calls, f"{expected} not among library calls {calls}"

        return done

    return check


# -- oracles ------------------------------------------------------------------------
def _kind(backend_cls) -> str:
    if issubclass(backend_cls, GGNInterface):
        return "ggn"
    return "ef" if issubclass(backend_cls, EFInterface) else "hessian"


def _dense_oracle(kind, m, x, y, likelihood):
    if kind == "ggn":
        return oracles.ggn(m, x, likelihood)
    if kind == "ef":
        return oracles.empirical_fisher(m, x, y, likelihood)
    return oracles.true_hessian(m, x, y, likelihood)


def _oracle(kind, structure, m, x, y, likelihood):
    if structure == "kron":
        ef_targets = y if kind == "ef" else None
        return torch.block_diag(
            *oracles.kfac_blocks(m, x, likelihood, y=ef_targets, N=len(y))
        )
    H = _dense_oracle(kind, m, x, y, likelihood)
    return H.diagonal() if structure == "diag" else H


def _compute(backend, structure, x, y):
    if structure == "kron":
        loss, K = backend.kron(x, y, N=len(y))
        return loss, K.to_matrix()
    return getattr(backend, structure)(x, y)


# -- every claim, computed by the library and right -----------------------------------
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("backend_cls,structure", CLAIMS)
def test_all_weights(backend_cls, structure, arch, likelihood, honest, device):
    m = model(arch, n_out=3, device=device)
    x, y = data(arch, likelihood, n_out=3, device=device)
    expected = _oracle(_kind(backend_cls), structure, m, x, y, likelihood)
    done = honest(backend_cls, structure)
    loss, H = _compute(backend_cls(m, likelihood), structure, x, y)
    done()
    assert_close(H, expected)
    assert_close(loss, oracles.loss(likelihood, m(x), y).detach())


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("backend_cls,structure", CLAIMS)
def test_last_layer(backend_cls, structure, likelihood, honest, device):
    """The last layer's block of the all-weights oracle (its KFAC block for kron)."""
    m = model("mlp", device=device)
    x, y = data("mlp", likelihood, device=device)
    kind = _kind(backend_cls)
    n_last = sum(p.numel() for p in m[-1].parameters())
    full = _oracle(kind, structure, m, x, y, likelihood)
    expected = full[-n_last:] if structure == "diag" else full[-n_last:, -n_last:]
    done = honest(backend_cls, structure)
    backend = backend_cls(m, likelihood, last_layer=True)
    loss, H = _compute(backend, structure, x, y)
    done()
    assert_close(H, expected)
    assert_close(loss, oracles.loss(likelihood, m(x), y).detach())


SUBNET_CLAIMS = [p for p in CLAIMS if p.values[1] != "kron"]


@pytest.mark.parametrize("last_layer", [False, True])
@pytest.mark.parametrize("backend_cls,structure", SUBNET_CLAIMS)
def test_subnetwork(backend_cls, structure, last_layer, honest, device):
    m = model("mlp", device=device)
    x, y = data("mlp", "classification", device=device)
    full = _dense_oracle(_kind(backend_cls), m, x, y, "classification")
    n_last = sum(p.numel() for p in m[-1].parameters())
    if last_layer:
        full = full[-n_last:, -n_last:]
    idx = torch.tensor([n_last - 1, 0, 7, 3], device=device)
    if not last_layer:
        idx = torch.cat([idx, torch.tensor([30, 41, 50], device=device)])
    sub = full[idx][:, idx]
    done = honest(backend_cls, structure)
    backend = backend_cls(
        m, "classification", last_layer=last_layer, subnetwork_indices=idx
    )
    _, H = _compute(backend, structure, x, y)
    done()
    assert_close(H, sub.diagonal() if structure == "diag" else sub)


@pytest.mark.parametrize("backend_cls,structure", CLAIMS)
def test_mapping_batches(backend_cls, structure, honest, device):
    """Backends that claim mapping (dict) batches compute them with the library;
    the others refuse them."""
    torch.manual_seed(0)
    m = DictModel().to(device, torch.float64)
    x, y = data("mlp", "classification", device=device)
    batch = {"input_ids": x, "scale": torch.full_like(x[:, :1], 0.5)}
    if not support_table()[backend_cls.__name__]["dict inputs"]:
        with pytest.raises(ValueError, match="mapping"):
            _compute(backend_cls(m, "classification"), structure, batch, y)
        return
    expected = _oracle(_kind(backend_cls), structure, m, batch, y, "classification")
    done = honest(backend_cls, structure)
    _, H = _compute(backend_cls(m, "classification"), structure, batch, y)
    done()
    assert_close(H, expected)


class _Pairs(nn.Module):
    """A reward model: ``(batch, 2, d)`` -> ``(batch, 2)``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)


class _Sequence(nn.Module):
    """A Linear layer shared over positions (weight sharing), then mean pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.embed(x)).mean(1))


def _linear_kfac_oracle(m, x, y, kind) -> list[torch.Tensor]:
    """Dense KFAC blocks (parameter order) of a model of ``nn.Linear`` layers over
    any leading dimensions ``(N, T..., in)``: ``G = sum_{n,t} J_nt^T Lambda_n J_nt``
    with ``J_nt`` the Jacobian of the output w.r.t. the layer output at position
    ``t``, and ``A`` the mean over the data of the mean over positions of
    ``a a^T``; a bias block is ``G``."""
    records = {}
    hooks = [
        layer.register_forward_hook(
            lambda mod, i, o: records.__setitem__(mod, (i[0], o))
        )
        for layer in m.modules()
        if isinstance(layer, nn.Linear)
    ]
    f = m(x)
    for h in hooks:
        h.remove()
    if kind == "ef":
        fd = f.detach().requires_grad_()
        (r,) = torch.autograd.grad(oracles.loss("classification", fd, y), fd)
        Lam = r[:, :, None] * r[:, None, :]
    else:
        Lam = oracles.output_hessian("classification", f.detach())
    N, C = f.shape
    blocks = {}
    for layer, (a, out) in records.items():
        rows = [
            torch.autograd.grad(f[:, c].sum(), out, retain_graph=True)[0]
            for c in range(C)
        ]
        J = torch.stack(rows, 1).reshape(N, C, -1, out.shape[-1])  # (N, C, T, out)
        a = a.reshape(N, -1, a.shape[-1])  # (N, T, in)
        G = torch.einsum("ncto,ncd,ndtp->op", J, Lam, J)
        A = torch.einsum("nti,ntj->ij", a, a) / a.shape[1] / N
        blocks[layer.weight] = torch.kron(G.contiguous(), A.contiguous())
        blocks[layer.bias] = G
    return [blocks[p] for p in m.parameters()]


#: ASDL's Fisher takes the positions of a Linear layer for examples: its full and
#: diagonal curvature there come from its per-example gradients
def _route_over_positions(backend_cls, structure):
    if backend_cls in (AsdlGGN, AsdlEF) and structure != "kron":
        return PER_EXAMPLE_ROUTE
    return None


@pytest.mark.parametrize("backend_cls,structure", CLAIMS)
def test_reward_modeling_last_layer(backend_cls, structure, honest, device):
    """The head shared by the two items of a pair (``PairedLinear``): its KFAC sums
    ``G`` over the items and averages ``A``. BackPACK's GGN extensions refuse the
    module (its EF extensions take it)."""
    torch.manual_seed(0)
    m = _Pairs().to(device, torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64, device=device)
    y = torch.tensor([0, 1, 1, 0, 1], device=device)
    kind = _kind(backend_cls)
    if structure == "kron":
        expected = torch.block_diag(*_linear_kfac_oracle(m, x, y, kind)[-2:])
    else:
        n_last = sum(p.numel() for p in m.net[-1].parameters())
        full = _dense_oracle(kind, m, x, y, "classification")[-n_last:, -n_last:]
        expected = full.diagonal() if structure == "diag" else full
    done = honest(
        backend_cls, structure, route=_route_over_positions(backend_cls, structure)
    )
    backend = backend_cls(m, "reward_modeling", last_layer=True)
    if backend_cls is BackPackGGN:
        with pytest.raises(NotImplementedError, match="PairedLinear"):
            _compute(backend, structure, x, y)  # BackPACK knows no PairedLinear
        return
    _, H = _compute(backend, structure, x, y)
    done()
    assert_close(H, expected)


@pytest.mark.parametrize("backend_cls,structure", CLAIMS)
def test_linear_layer_over_positions(backend_cls, structure, honest, device):
    """Weight sharing: a Linear layer applied at every position of a sequence.
    BackPACK refuses the model (no extension for its container)."""
    torch.manual_seed(0)
    m = _Sequence().to(device, torch.float64)
    x = torch.randn(6, 5, 3, dtype=torch.float64, device=device)
    y = torch.randint(0, 3, (6,), device=device)
    kind = _kind(backend_cls)
    if structure == "kron":
        expected = torch.block_diag(*_linear_kfac_oracle(m, x, y, kind))
    else:
        expected = _oracle(kind, structure, m, x, y, "classification")
    done = honest(
        backend_cls, structure, route=_route_over_positions(backend_cls, structure)
    )
    backend = backend_cls(m, "classification")
    if backend_cls is BackPackGGN:
        with pytest.raises(NotImplementedError):
            _compute(backend, structure, x, y)
        return
    _, H = _compute(backend, structure, x, y)
    done()
    assert_close(H, expected)


# -- Monte-Carlo Fisher: the library's samples ---------------------------------------
MC_CLAIMS = [p for p in CLAIMS if issubclass(p.values[0], GGNInterface)]


@pytest.mark.parametrize("backend_cls,structure", MC_CLAIMS)
def test_monte_carlo_fisher(backend_cls, structure, honest, device):
    """Drawn by the library: many samples approach the exact curvature, one sample
    is far from it, and a generator's seed reproduces the samples."""
    m = model("mlp", n_out=3, device=device)
    x, y = data("mlp", "classification", n=4, n_out=3, device=device)
    exact = _oracle("ggn", structure, m, x, y, "classification")
    done = honest(backend_cls, structure, stochastic=True)

    def draw(num_samples, seed):
        g = torch.Generator(device=device).manual_seed(seed)
        backend = backend_cls(
            m, "classification", stochastic=True, num_samples=num_samples, generator=g
        )
        return _compute(backend, structure, x, y)[1]

    def error(H):
        return ((H - exact).norm() / exact.norm()).item()

    many = draw(4000, 0)
    done()
    assert error(many) < 0.08  # about 3 / sqrt(4000)
    assert error(draw(1, 0)) > 2 * error(many)
    assert_close(draw(3, 5), draw(3, 5))
    assert not torch.equal(draw(3, 5), draw(3, 6))


@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
def test_curvlinops_monte_carlo_follows_torch_seed(structure, device):
    """Without a generator the samples follow torch's default generator."""
    m = model("mlp", n_out=3, device=device)
    x, y = data("mlp", "classification", n_out=3, device=device)
    backend = CurvlinopsGGN(m, "classification", stochastic=True)

    def draw(seed):
        torch.manual_seed(seed)
        return _compute(backend, structure, x, y)[1]

    assert_close(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


# -- memory: column blocks ----------------------------------------------------------
@pytest.mark.parametrize("structure", ["full", "diag"])
@pytest.mark.parametrize(
    "backend_cls", [CurvlinopsGGN, CurvlinopsEF, CurvlinopsHessian]
)
def test_curvlinops_multiplies_only_selected_columns_in_blocks(
    backend_cls, structure, monkeypatch, device
):
    """The operator sees at most ``block_size`` columns at a time, and only the
    selected ones for a subnetwork; the blocks assemble the oracle's entries."""
    import curvlinops

    from laplace.curvature import curvlinops as adapter

    widths = []
    for name in ("GGNLinearOperator", "EFLinearOperator", "HessianLinearOperator"):
        cls = getattr(curvlinops, name)

        class Counting(cls):
            def __matmul__(self, X):
                widths.append(X.shape[1])
                return super().__matmul__(X)

        monkeypatch.setattr(curvlinops, name, Counting)
    assert adapter._curvlinops() is curvlinops
    m = model("mlp", device=device)
    x, y = data("mlp", "regression", device=device)
    idx = torch.tensor([40, 2, 17, 30, 41, 50, 5], device=device)
    backend = backend_cls(m, "regression", subnetwork_indices=idx)
    backend.block_size = 3
    _, H = getattr(backend, structure)(x, y)
    assert widths == [3, 3, 1]
    sub = _dense_oracle(_kind(backend_cls), m, x, y, "regression")[idx][:, idx]
    assert_close(H, sub.diagonal() if structure == "diag" else sub)
