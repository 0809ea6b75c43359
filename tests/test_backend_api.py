"""The public backend API of laplace-torch 0.3 and the numbers behind it.

Where laplace-torch's numbers are hard-coded, they were measured by running
laplace-torch 0.3 (``/work/main/.lt-venv``) on the same model and data (built by
``peer_case``) and printing the results.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import oracles
from laplace import Laplace
from laplace.curvature import (
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
)
from models import data, model

DTYPE = torch.float64
ALL = (
    CurvlinopsGGN,
    CurvlinopsEF,
    CurvlinopsHessian,
    BackPackGGN,
    BackPackEF,
    AsdlGGN,
    AsdlEF,
    AsdlHessian,
)
EF_BACKENDS = (CurvlinopsEF, BackPackEF, AsdlEF, EFInterface)


def peer_case(device, likelihood):
    """A 3-4-2 tanh MLP and five points, as in the laplace-torch runs."""
    torch.manual_seed(0)
    x = torch.randn(5, 3, dtype=DTYPE)
    y = (
        torch.randn(5, 2, dtype=DTYPE)
        if likelihood == "regression"
        else torch.tensor([0, 1, 1, 0, 1])
    )
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)
    return m.to(device), x.to(device), y.to(device)


OUTPUTS = torch.tensor([1, 0, 1, 1, 0])

# laplace-torch 0.3, every backend (CurvlinopsGGN/EF, BackPackGGN/EF, AsdlGGN/EF):
# gradients(x, y) -> (Gs, loss): Gs.sum(), Gs[0, 0], loss
PEER_GRADIENTS = {
    "regression": (-4.45541852, 0.048540945, 7.6987153265),
    "classification": (-0.2953617795, -0.0120933701, 3.4644622382),
}
# functorch_jacobians(x)[0].sum(); selected_output_jacobians(x, OUTPUTS): Js.sum(),
# f.sum(), Js of shape (5, 1, 26)
PEER_JACOBIAN_SUMS = (4.8416228187, 3.4301264732, -1.5347435907)
# GGNInterface / EFInterface used directly: (loss, H.sum(), H.flatten()[7])
PEER_GENERIC = {
    (GGNInterface, "regression", "full"): (3.8493576633, 6.3915184255, 0.093750212),
    (GGNInterface, "regression", "diag"): (3.8493576633, 25.3512941219, 0.3054656027),
    (GGNInterface, "classification", "full"): (3.4644622382, 0.5475566096, 0.0010282),
    (GGNInterface, "classification", "diag"): (3.4644622382, 5.8663822747, 0.033796),
    (EFInterface, "classification", "full"): (3.4644622382, 0.486673437, 0.0010553),
    (EFInterface, "classification", "diag"): (3.4644622382, 6.0285401217, 0.0314327),
    # regression EF: laplace-torch's is twice ours (docs/differences.md)
    (EFInterface, "regression", "full"): (3.8493576633, 5.6494899516, 0.057812047),
    (EFInterface, "regression", "diag"): (3.8493576633, 35.4069479135, 0.5899092899),
}


def _peer(value, device):
    return torch.tensor(value, dtype=DTYPE, device=device)


# -- Jacobians --------------------------------------------------------------------
@pytest.mark.parametrize("backend_cls", ALL, ids=lambda b: b.__name__)
def test_functorch_and_selected_output_jacobians(backend_cls, device):
    m, x, _ = peer_case(device, "classification")
    backend = backend_cls(m, "classification")
    J_oracle = oracles.jacobian(m, x)
    J, f = backend.functorch_jacobians(x)
    assert_close(J, J_oracle)
    assert_close(f, m(x).detach())
    outputs = OUTPUTS.to(device)
    Js, f = backend.selected_output_jacobians(x, outputs)
    assert Js.shape == (5, 1, J_oracle.shape[-1])
    assert_close(Js[:, 0], J_oracle[torch.arange(5), outputs])
    assert_close(f, m(x).detach())
    peer = PEER_JACOBIAN_SUMS
    assert_close(J.sum(), _peer(peer[0], device))
    assert_close(Js.sum(), _peer(peer[1], device))
    assert_close(f.sum(), _peer(peer[2], device))


def test_selected_output_jacobians_backprop_and_bad_input(device):
    m, x, _ = peer_case(device, "classification")
    x = x.requires_grad_()
    backend = CurvlinopsGGN(m, "classification")
    outputs = OUTPUTS.to(device)
    Js, f = backend.selected_output_jacobians(x, outputs, enable_backprop=True)
    (grad,) = torch.autograd.grad(Js.square().sum() + f.sum(), x)
    Jx, fx = backend.jacobians(x, enable_backprop=True)
    sel = Jx[torch.arange(5), outputs]
    (expected,) = torch.autograd.grad(sel.square().sum() + fx.sum(), x)
    assert_close(grad, expected)
    for bad in (outputs[:3], outputs.double(), [1, 0, 1, 1, 0]):
        with pytest.raises(ValueError, match="outputs"):
            backend.selected_output_jacobians(x, bad)
    with pytest.raises(ValueError, match="outputs"):
        backend.selected_output_jacobians(x, outputs + 1)


@pytest.mark.parametrize("backend_cls", [AsdlGGN, AsdlEF, AsdlHessian])
def test_asdl_loss_type(backend_cls, device):
    m, _, _ = peer_case(device, "classification")
    # laplace-torch 0.3: 'mse' and 'cross_entropy' (ASDL's LOSS_MSE and
    # LOSS_CROSS_ENTROPY)
    assert backend_cls(m, "regression").loss_type == "mse"
    assert backend_cls(m, "classification").loss_type == "cross_entropy"
    assert backend_cls(m, "reward_modeling").loss_type == "cross_entropy"


# -- gradients: of lossfunc, as laplace-torch -----------------------------------------
@pytest.mark.parametrize("likelihood", ["regression", "classification"])
@pytest.mark.parametrize(
    "backend_cls",
    (*ALL, GGNInterface, EFInterface),
    ids=lambda b: b.__name__,
)
def test_gradients_are_those_of_lossfunc(backend_cls, likelihood, device):
    m, x, y = peer_case(device, likelihood)
    backend = backend_cls(m, likelihood)
    Gs, loss = backend.gradients(x, y)
    lossfunc = {"regression": nn.MSELoss, "classification": nn.CrossEntropyLoss}
    lossfunc = lossfunc[likelihood](reduction="sum")
    params = oracles.trainable(m)
    rows = []
    for i in range(5):
        g = torch.func.grad(
            lambda th, i=i: lossfunc(
                torch.func.functional_call(m, th, (x[i : i + 1],)), y[i : i + 1]
            )
        )(params)
        rows.append(oracles.flat(g[k] for k in params))
    assert_close(Gs, torch.stack(rows))
    assert_close(loss, lossfunc(m(x), y).detach())
    total, first, peer_loss = PEER_GRADIENTS[likelihood]
    assert_close(Gs.sum(), _peer(total, device))
    assert_close(Gs[0, 0], _peer(first, device))
    assert_close(loss, _peer(peer_loss, device))


# -- GGNInterface and EFInterface as backends ---------------------------------------
@pytest.mark.parametrize("key", PEER_GENERIC, ids=lambda k: "-".join(map(str, k[1:])))
def test_generic_interfaces_full_and_diag(key, device):
    backend_cls, likelihood, structure = key
    m, x, y = peer_case(device, likelihood)
    loss, H = getattr(backend_cls(m, likelihood), structure)(x, y)
    if backend_cls is GGNInterface:
        oracle = oracles.ggn(m, x, likelihood)
    else:
        oracle = oracles.empirical_fisher(m, x, y, likelihood)
    assert_close(H, oracle if structure == "full" else oracle.diagonal())
    peer_loss, peer_sum, peer_entry = PEER_GENERIC[key]
    assert_close(loss, _peer(peer_loss, device))
    scale = 2.0 if (backend_cls, likelihood) == (EFInterface, "regression") else 1.0
    assert_close(scale * H.sum(), _peer(peer_sum, device))
    assert_close(scale * H.flatten()[7], _peer(peer_entry, device), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend_cls", [GGNInterface, EFInterface])
def test_generic_interfaces_in_laplace_and_kron_refused(backend_cls, device):
    m, x, y = peer_case(device, "classification")
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=2
    )
    for structure in ("full", "diag"):
        la_generic = Laplace(m, "classification", "all", structure, backend=backend_cls)
        la_generic.fit(loader)
        if backend_cls is GGNInterface:
            oracle = oracles.ggn(m, x, "classification")
        else:
            oracle = oracles.empirical_fisher(m, x, y, "classification")
        H = la_generic.H if structure == "full" else torch.diag(la_generic.H)
        assert_close(H, oracle if structure == "full" else torch.diag(oracle.diag()))
    with pytest.raises(ValueError, match="kron.*CurvlinopsGGN"):
        Laplace(m, "classification", "all", "kron", backend=backend_cls)


# -- every adapter leaves the model as found, whatever ran before ---------------------
def _state(m: nn.Module):
    """Everything a library could leave on the model: module attributes (by
    identity or value), hook tables, parameter attributes and flags."""
    modules = {}
    for name, mod in m.named_modules():
        attrs = {}
        for key, value in vars(mod).items():
            if isinstance(value, dict):
                attrs[key] = tuple(value)
            elif isinstance(value, (bool, int, float, str, type(None))):
                attrs[key] = value
            else:
                attrs[key] = id(value)
        modules[name] = attrs
    params = {
        name: (tuple(sorted(vars(p))), p.requires_grad, p.grad is None)
        for name, p in m.named_parameters()
    }
    return modules, params


def _run_all(backend, x, y):
    results = []
    for structure in ("full", "diag", "kron"):
        if structure not in backend.supported_structures:
            continue
        if structure == "kron":
            results.append(backend.kron(x, y, N=len(y))[1].to_matrix())
        else:
            results.append(getattr(backend, structure)(x, y)[1])
    return results


@pytest.mark.parametrize(
    "first,second",
    list(itertools.permutations(ALL, 2)),
    ids=lambda b: b.__name__,
)
def test_ordered_pairs_of_backends_leave_the_model_as_found(first, second, device):
    m = model("mlp").to(device)
    x, y = data("mlp", "classification")
    x, y = x.to(device), y.to(device)
    expected = _run_all(second(model("mlp").to(device), "classification"), x, y)
    before = _state(m)
    _run_all(first(m, "classification"), x, y)
    assert _state(m) == before
    got = _run_all(second(m, "classification"), x, y)
    assert _state(m) == before
    for a, b in zip(got, expected, strict=True):
        assert_close(a, b)
    for mod in m.modules():
        assert not mod._forward_hooks and not mod._backward_hooks
        assert mod._is_full_backward_hook is None


# -- regression EF: ours is the Fisher of N(f, 1) in expectation ---------------------
@pytest.mark.parametrize("backend_cls", EF_BACKENDS, ids=lambda b: b.__name__)
def test_regression_ef_equals_ggn_in_expectation_over_model_targets(
    backend_cls, device
):
    """E_{y ~ N(f, I)} EF(y) = sum_n J_n^T E[(f_n - y_n)(f_n - y_n)^T] J_n = GGN.

    The expectation is taken exactly: the residuals ``e = y - f`` run over the
    ``2C`` points ``+-sqrt(C) u_c`` (``u_c`` the unit vectors), whose second moment
    is exactly ``I``, and the EF is a sum over examples of per-example terms.
    laplace-torch's regression EF, twice ours, averages to twice the GGN.
    """
    m, x, _ = peer_case(device, "regression")
    with torch.no_grad():
        f = m(x)
    C = f.shape[1]
    ggn = oracles.ggn(m, x, "regression")
    backend = backend_cls(m, "regression")
    total = torch.zeros_like(ggn)
    points = [s * C**0.5 * u for u in torch.eye(C, dtype=DTYPE) for s in (1, -1)]
    for e in points:
        total += backend.full(x, f + e.to(device))[1]
    assert_close(total / len(points), ggn)
    # Monte Carlo with the stated tolerance: 4000 draws, relative error ~ 4/sqrt(S)
    g = torch.Generator(device=device).manual_seed(0)
    S, mc = 4000, torch.zeros_like(ggn)
    for _ in range(S // 200):
        eps = torch.randn(200, *f.shape, dtype=DTYPE, device=device, generator=g)
        for e in eps:
            mc += backend.diag(x, f + e)[1].diag()
    mc_diag = mc.diagonal() / S
    assert ((mc_diag - ggn.diagonal()).norm() / ggn.diagonal().norm()) < 0.06


# -- last-layer Diag EF (classification): ours is the per-sample oracle ----------
# laplace-torch 0.3, DiagLLLaplace on peer_case's 3-4-3 variant below:
# log_marginal_likelihood() with AsdlEF and BackPackEF -12.263628813106397; with
# CurvlinopsEF -8.932766460342258, because its last-layer diagonal EF is zero.
PEER_LL_DIAG_EF_LML = -12.263628813106397


@pytest.mark.parametrize("backend_cls", [CurvlinopsEF, AsdlEF, BackPackEF])
def test_last_layer_diag_ef_is_the_per_sample_gradient_oracle(backend_cls, device):
    torch.manual_seed(0)
    x = torch.randn(8, 3, dtype=DTYPE).to(device)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 2, 1]).to(device)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DTYPE)
    m = m.to(device)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=4
    )
    la = Laplace(m, "classification", "last_layer", "diag", backend=backend_cls)
    la.fit(loader)
    rows = []
    for i in range(8):
        loss = nn.functional.cross_entropy(m(x[i : i + 1]), y[i : i + 1])
        rows.append(oracles.flat(torch.autograd.grad(loss, [m[2].weight, m[2].bias])))
    assert_close(la.H, torch.stack(rows).square().sum(0))
    assert_close(la.log_marginal_likelihood(), _peer(PEER_LL_DIAG_EF_LML, device))


# -- models that flatten items per example -----------------------------------------
class FlattenItems(nn.Module):
    """``(B, K, d) -> (B K, d) -> net -> (B, K)``: a reward model or a
    multiple-choice head."""

    def __init__(self, d=3, reshape_inside=False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 4), nn.Tanh(), nn.Linear(4, 1))
        self.reshape_inside = reshape_inside

    def forward(self, x):
        B, K = x.shape[:2]
        if self.reshape_inside:
            return self.net(x.reshape(-1, x.shape[-1])).view(B, K)
        return self.net(x.flatten(0, 1)).unflatten(0, (B, K)).squeeze(-1)


ITEM_CASES = {
    "classification": (4, "classification"),
    "regression": (3, "regression"),
    "reward_modeling": (2, "classification"),
}


@pytest.mark.parametrize("reshape_inside", [False, True])
@pytest.mark.parametrize("likelihood", ITEM_CASES)
@pytest.mark.parametrize("structure", ["full", "diag"])
@pytest.mark.parametrize(
    "backend_cls",
    [CurvlinopsGGN, CurvlinopsEF, AsdlGGN, AsdlEF, GGNInterface, EFInterface],
    ids=lambda b: b.__name__,
)
def test_items_flattened_per_example(
    backend_cls, structure, likelihood, reshape_inside, device
):
    K, oracle_lik = ITEM_CASES[likelihood]
    torch.manual_seed(0)
    m = FlattenItems(reshape_inside=reshape_inside).to(DTYPE).to(device)
    x = torch.randn(5, K, 3, dtype=DTYPE).to(device)
    if oracle_lik == "classification":
        y = torch.randint(0, K, (5,)).to(device)
    else:
        y = torch.randn(5, K, dtype=DTYPE).to(device)
    _, H = getattr(backend_cls(m, likelihood), structure)(x, y)
    if "EF" in backend_cls.__name__:
        oracle = oracles.empirical_fisher(m, x, y, oracle_lik)
    else:
        oracle = oracles.ggn(m, x, oracle_lik)
    assert_close(H, oracle if structure == "full" else oracle.diagonal())


def test_items_flattened_kron_and_backpack(device):
    """Kron keeps the rows as KFAC's batch (as laplace-torch); BackPACK, which
    would take rows for examples in full/diag, refuses and names the others."""
    torch.manual_seed(0)
    m = FlattenItems().to(DTYPE).to(device)
    x = torch.randn(5, 3, 3, dtype=DTYPE).to(device)
    y = torch.randint(0, 3, (5,)).to(device)
    _, K1 = CurvlinopsGGN(m, "classification").kron(x, y, N=5)
    _, K2 = AsdlGGN(m, "classification").kron(x, y, N=5)
    assert_close(K1.to_matrix(), K2.to_matrix())
    for backend_cls in (BackPackGGN, BackPackEF):
        with pytest.raises((ValueError, NotImplementedError)):
            backend_cls(m, "classification").diag(x, y)
