"""Every backend x structure x likelihood against independent dense oracles."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import oracles
from laplace.curvature import (
    BACKENDS,
    CurvlinopsEF,
    CurvlinopsGGN,
    CurvlinopsHessian,
    EFInterface,
    GGNInterface,
    support_table,
)
from models import DictModel, data, model

LIKELIHOODS = ("regression", "classification")


def kind_of(backend) -> str:
    if issubclass(backend, GGNInterface):
        return "ggn"
    if issubclass(backend, EFInterface):
        return "ef"
    return "hessian"


def oracle(kind, structure, m, x, y, likelihood, N=None, backend_cls=None):
    if structure == "kron":
        # every backend gives the KFC (expand) factors on convolutions
        ef_targets = y if kind == "ef" else None
        return torch.block_diag(*oracles.kfac_blocks(m, x, likelihood, N, ef_targets))
    if kind == "ggn":
        H = oracles.ggn(m, x, likelihood)
    elif kind == "ef":
        H = oracles.empirical_fisher(m, x, y, likelihood)
    else:
        H = oracles.true_hessian(m, x, y, likelihood)
    return H.diag() if structure == "diag" else H


def compute(backend, structure, x, y, N=None):
    if structure == "kron":
        loss, H = backend.kron(x, y, N=N or len(y))
        return loss, H.to_matrix()
    return getattr(backend, structure)(x, y)


CASES = [
    pytest.param(b, s, id=f"{b.__name__}-{s}")
    for b in BACKENDS
    for s in ("full", "kron", "diag")
    if s in b.supported_structures
]


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("backend_cls,structure", CASES)
def test_curvature_matches_oracle(backend_cls, structure, arch, likelihood, device):
    m = model(arch, n_out=3, device=device)
    x, y = data(arch, likelihood, n_out=3, device=device)
    loss, H = compute(backend_cls(m, likelihood), structure, x, y)
    kind = kind_of(backend_cls)
    expected = oracle(kind, structure, m, x, y, likelihood, backend_cls=backend_cls)
    torch.testing.assert_close(H, expected)
    torch.testing.assert_close(loss, oracles.loss(likelihood, m(x), y).detach())


@pytest.mark.parametrize("backend_cls,structure", CASES)
def test_last_layer_is_the_last_block(backend_cls, structure, device):
    m = model("mlp", device=device)
    x, y = data("mlp", "classification", device=device)
    _, H = compute(backend_cls(m, "classification", last_layer=True), structure, x, y)
    full = oracle(kind_of(backend_cls), structure, m, x, y, "classification")
    n_last = sum(p.numel() for p in m[-1].parameters())
    expected = full[-n_last:] if structure == "diag" else full[-n_last:, -n_last:]
    torch.testing.assert_close(H, expected)


@pytest.mark.parametrize(
    "backend_cls,structure",
    [c for c in CASES if c.values[1] != "kron"],
)
def test_subnetwork_is_a_submatrix(backend_cls, structure, device):
    m = model("mlp", device=device)
    x, y = data("mlp", "regression", device=device)
    idx = torch.tensor([0, 3, 17, 30, 41, 50], device=device)
    backend = backend_cls(m, "regression", subnetwork_indices=idx)
    _, H = compute(backend, structure, x, y)
    full = oracle(kind_of(backend_cls), "full", m, x, y, "regression")
    sub = full[idx][:, idx]
    torch.testing.assert_close(H, sub.diag() if structure == "diag" else sub)


@pytest.mark.parametrize(
    "backend_cls,structure",
    [c for c in CASES if c.values[0].supports_dict_inputs],
)
def test_dict_batches(backend_cls, structure, device):
    torch.manual_seed(0)
    m = DictModel().to(device, torch.float64)
    x, y = data("mlp", "classification", device=device)
    batch = {
        "input_ids": x,
        "scale": torch.full((len(x), 1), 0.5, dtype=x.dtype, device=device),
    }
    _, H = compute(backend_cls(m, "classification"), structure, batch, y)
    expected = oracle(kind_of(backend_cls), structure, m, batch, y, "classification")
    torch.testing.assert_close(H, expected)


@pytest.mark.parametrize("backend_cls,structure", CASES)
def test_float32(backend_cls, structure, device):
    m = model("mlp", dtype=torch.float32, device=device)
    x, y = data("mlp", "classification", dtype=torch.float32, device=device)
    _, H = compute(backend_cls(m, "classification"), structure, x, y)
    m64 = model("mlp", device=device)
    expected = oracle(
        kind_of(backend_cls), structure, m64, x.double(), y, "classification"
    )
    assert H.dtype == torch.float32
    torch.testing.assert_close(H.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "backend_cls", [b for b in BACKENDS if "kron" in b.supported_structures]
)
def test_kron_accumulates_over_batches(backend_cls, device):
    """Two batches of a data set of N give the KFAC of the whole data set."""
    m = model("mlp", device=device)
    x, y = data("mlp", "classification", n=8, device=device)
    backend = backend_cls(m, "classification")
    _, K1 = backend.kron(x[:3], y[:3], N=8)
    _, K2 = backend.kron(x[3:], y[3:], N=8)
    _, K = backend.kron(x, y, N=8)
    torch.testing.assert_close((K1 + K2).to_matrix(), K.to_matrix())
    K1 += K2  # in place, as a fit accumulates: no factor may be shared
    torch.testing.assert_close(K1.to_matrix(), K.to_matrix())
    kind = kind_of(backend_cls)
    expected = oracle(kind, "kron", m, x, y, "classification")
    torch.testing.assert_close(K.to_matrix(), expected)


def test_kfac_is_exact_for_one_datum(device):
    m = model("mlp", n_out=3, device=device)
    x, y = data("mlp", "classification", n=1, n_out=3, device=device)
    _, K = CurvlinopsGGN(m, "classification").kron(x, y, N=1)
    ggn = oracles.ggn(m, x, "classification")
    torch.testing.assert_close(K.to_matrix(), _block_diagonal(ggn, m))


def test_kfac_is_exact_for_deep_linear_networks(device):
    """Without nonlinearities the output Jacobian of a layer's output does not
    depend on the input, so KFAC equals each diagonal block of the GGN."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    m = m.to(device, torch.float64)
    x, y = data("mlp", "regression", n=7, n_out=2, device=device)
    _, K = CurvlinopsGGN(m, "regression").kron(x, y, N=7)
    ggn = oracles.ggn(m, x, "regression")
    torch.testing.assert_close(K.to_matrix(), _block_diagonal(ggn, m))


def _block_diagonal(H, m):
    """The diagonal blocks of ``H`` over the parameter tensors of ``m``."""
    sizes = [p.numel() for p in m.parameters() if p.requires_grad]
    starts = torch.tensor([0, *sizes]).cumsum(0).tolist()
    return torch.block_diag(*(H[a:b, a:b] for a, b in zip(starts, starts[1:])))


@pytest.mark.parametrize("structure", ["full", "diag"])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_monte_carlo_fisher_approaches_ggn(structure, likelihood, device):
    m = model("mlp", n_out=3, device=device)
    x, y = data("mlp", likelihood, n=4, n_out=3, device=device)
    exact = oracle("ggn", structure, m, x, y, likelihood)
    errors = []
    for num_samples in (1, 10_000):
        torch.manual_seed(0)
        backend = CurvlinopsGGN(m, likelihood, stochastic=True, num_samples=num_samples)
        _, H = getattr(backend, structure)(x, y)
        errors.append(((H - exact).norm() / exact.norm()).item())
    assert errors[1] < errors[0]
    assert errors[1] < 0.05  # 1/sqrt(10^4) Monte-Carlo error with margin


def test_monte_carlo_kron_approaches_exact_kron(device):
    m = model("mlp", n_out=3, device=device)
    x, y = data("mlp", "classification", n=4, n_out=3, device=device)
    exact = oracle("ggn", "kron", m, x, y, "classification")
    backend = CurvlinopsGGN(m, "classification", stochastic=True, num_samples=5_000)
    _, K = backend.kron(x, y, N=4)
    err = (K.to_matrix() - exact).norm() / exact.norm()
    assert err < 0.05


def test_jacobians_and_gradients_match_oracle(device):
    m = model("cnn", device=device)
    x, y = data("cnn", "classification", n_out=4, device=device)
    backend = CurvlinopsGGN(m, "classification")
    J, f = backend.jacobians(x)
    torch.testing.assert_close(J, oracles.jacobian(m, x))
    torch.testing.assert_close(f, m(x).detach())
    G, loss = backend.gradients(x, y)
    torch.testing.assert_close(
        G, oracles.per_example_gradients(m, x, y, "classification")
    )
    torch.testing.assert_close(loss, oracles.loss("classification", m(x), y).detach())


def test_last_layer_jacobians_closed_form(device):
    m = model("mlp", device=device)
    x, _ = data("mlp", "regression", device=device)
    J, f = CurvlinopsGGN(m, "regression", last_layer=True).last_layer_jacobians(x)
    n_last = sum(p.numel() for p in m[-1].parameters())
    torch.testing.assert_close(J, oracles.jacobian(m, x)[:, :, -n_last:])
    torch.testing.assert_close(f, m(x).detach())


def test_jacobians_enable_backprop_to_inputs(device):
    m = model("mlp", device=device)
    x, _ = data("mlp", "regression", device=device)
    x = x.requires_grad_()
    J, f = CurvlinopsGGN(m, "regression").jacobians(x, enable_backprop=True)
    (grad,) = torch.autograd.grad((J**2).sum() + f.sum(), x)
    params = oracles.trainable(m)

    def objective(inputs):
        total = 0.0
        for i in range(len(inputs)):
            jac = torch.func.jacrev(
                lambda th, i=i: torch.func.functional_call(m, th, (inputs[i : i + 1],))[
                    0
                ]
            )(params)
            total = total + sum((v**2).sum() for v in jac.values())
        return total + m(inputs).sum()

    (expected,) = torch.autograd.grad(objective(x), x)
    torch.testing.assert_close(grad, expected)


def test_support_table_is_as_documented():
    """The README's support matrix; changing a backend must change both."""
    yes, no = True, False
    expected = {
        "NativeGGN": (yes, yes, yes, yes),
        "NativeEF": (yes, yes, yes, yes),
        "CurvlinopsGGN": (yes, yes, yes, yes),
        "CurvlinopsEF": (yes, yes, yes, yes),
        "CurvlinopsHessian": (yes, no, yes, yes),
        "BackPackGGN": (yes, yes, yes, no),
        "BackPackEF": (yes, no, yes, no),
        "AsdlGGN": (yes, yes, yes, yes),
        "AsdlEF": (yes, yes, yes, yes),
        "AsdlHessian": (yes, no, yes, yes),
    }
    table = support_table()
    got = {
        name: (row["full"], row["kron"], row["diag"], row["dict inputs"])
        for name, row in table.items()
    }
    assert got == expected


def test_hessian_backend_is_not_a_ggn():
    assert not issubclass(CurvlinopsHessian, (GGNInterface, EFInterface))
    assert issubclass(CurvlinopsEF, EFInterface)


class SequenceModel(nn.Module):
    """A Linear layer shared over positions (weight sharing), then mean pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.embed(x)).mean(1))


def with_layernorm() -> nn.Module:
    """A layer without a fast route: the Jacobian from torch.func is used."""
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3))


@pytest.mark.parametrize("make", [SequenceModel, with_layernorm])
@pytest.mark.parametrize("structure", ["full", "diag"])
@pytest.mark.parametrize("backend_cls", [CurvlinopsGGN, CurvlinopsEF])
def test_weight_sharing_and_fallback_layers(make, structure, backend_cls, device):
    torch.manual_seed(0)
    m = make().to(device, torch.float64)
    shape = (6, 5, 3) if make is SequenceModel else (6, 3)
    x = torch.randn(*shape, dtype=torch.float64).to(device)
    y = torch.randint(0, 3, (6,)).to(device)
    _, H = getattr(backend_cls(m, "classification"), structure)(x, y)
    expected = oracle(kind_of(backend_cls), structure, m, x, y, "classification")
    torch.testing.assert_close(H, expected)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("structure", ["full", "diag"])
def test_default_backend_never_builds_the_jacobian(
    monkeypatch, arch, structure, device
):
    """For Linear/Conv2d networks the full and diagonal GGN come from the
    backpropagated factor, not from a (batch, outputs, params) Jacobian."""
    from laplace.curvature import backprop_factor

    def forbidden(*args, **kwargs):
        raise AssertionError("the Jacobian was built")

    monkeypatch.setattr(backprop_factor, "jacobian", forbidden)
    m = model(arch, n_out=3, device=device)
    x, y = data(arch, "classification", n_out=3, device=device)
    _, H = getattr(CurvlinopsGGN(m, "classification"), structure)(x, y)
    torch.testing.assert_close(H, oracle("ggn", structure, m, x, y, "classification"))


@pytest.mark.parametrize("freeze", [None, "bias", "weight"])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("backend_cls", [CurvlinopsGGN, CurvlinopsEF])
def test_last_layer_full_closed_form(backend_cls, likelihood, freeze, device):
    """The last layer's full curvature from Lambda (x) phi phi^T equals the block of
    the oracle, with a frozen bias or weight, and restricted to a subnetwork."""
    m = model("mlp", n_out=3, device=device)
    if freeze is not None:
        getattr(m[-1], freeze).requires_grad_(False)
    x, y = data(
        "mlp", likelihood, n=40, n_out=3, device=device
    )  # more data than one chunk
    _, H = backend_cls(m, likelihood, last_layer=True).full(x, y)
    full = oracle(kind_of(backend_cls), "full", m, x, y, likelihood)
    n_last = sum(p.numel() for p in m[-1].parameters() if p.requires_grad)
    torch.testing.assert_close(H, full[-n_last:, -n_last:])
    idx = torch.tensor([n_last - 1, 0, 2], device=device)
    backend = backend_cls(m, likelihood, last_layer=True, subnetwork_indices=idx)
    _, H_sub = backend.full(x, y)
    torch.testing.assert_close(H_sub, full[-n_last:, -n_last:][idx][:, idx])


@pytest.mark.parametrize("P", [5, 512, 513, 1500])
@pytest.mark.parametrize("block", [7, 512])
def test_symmetric_gram_is_the_gram_matrix(P, block, device):
    from laplace.curvature.structures import symmetric_gram

    V = torch.randn(37, P, dtype=torch.float64, device=device)
    torch.testing.assert_close(symmetric_gram(V, block), V.T @ V)
