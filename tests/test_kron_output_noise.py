"""One noise per output (``sigma_noise`` of shape ``(C,)``) with Kronecker-factored
curvature, all weights and last layer, against independent dense oracles:

- the combined Kron is the scalar-noise KFAC of a user's weighted Gaussian
  ``0.5 sum_c r_c (f_c - y_c)^2`` (an ``OutputLikelihood`` with ``hessian_sqrt =
  diag(sqrt r)``) at the noise ``mean(w)^-1/2``, ``w = 1 / sigma^2`` (damped and
  not, several backends, and a layout whose shared factor is not the averaged one);
- for a model whose only layer is linear, and for the last layer, where KFAC is
  exact, the posterior precision is the dense ``blockdiag(sum_c J_c^T J_c /
  sigma_c^2) + delta I`` from ``torch.func`` Jacobians, and the evidence and its
  gradient in each ``sigma_c`` (autograd) are those of the dense Gaussian evidence,
  also at equal noises (repeated eigenvalues);
- a new noise without refitting equals a refit, two halves with ``override=False``
  one fit, a state dict round trip the original; ``marglik_training`` learns two
  very different noises; the refusals.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import oracles
from laplace import KronLaplace, KronLLLaplace, Laplace, marglik_training
from laplace.curvature import AsdlGGN, BackPackGGN, CurvlinopsGGN, NativeEF, NativeGGN
from laplace.curvature.output_kron import OutputKron
from laplace.likelihood import OutputLikelihood
from laplace.utils.logdet import affine_log_sum, spectral_eigenvalues
from laplace.utils.matrix import Kron
from models import mlp

DTYPE = torch.float64
SIGMA = (0.5, 1.0, 2.0)


class WeightedGaussian(OutputLikelihood):
    """``0.5 sum_n sum_c r_c (f_nc - y_nc)^2``: output Hessian ``diag(r)``."""

    name = "weighted_gaussian"
    has_noise = True  # the posterior scales its curvature by 1 / sigma^2

    def __init__(self, r: torch.Tensor) -> None:
        self.r = r

    def loss(self, f, y):
        return 0.5 * (self.r * (f - y).square()).sum()

    def hessian_sqrt(self, f):
        return torch.diag(self.r.sqrt()).to(f).expand(f.shape[0], -1, -1)


def loader(x, y, batch_size=4):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def regression_data(device, n=13, d=3, C=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=DTYPE)
    y = torch.randn(n, C, generator=g, dtype=DTYPE)
    return x.to(device), y.to(device)


def sigma_of(values, device):
    return torch.tensor(values, dtype=DTYPE, device=device)


class TokenModel(nn.Module):
    """An embedding (the engine's pair ``[token counts, G]``: the averaged factor is
    the output side, the shared one the counts) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.embedding(x)).mean(1))


def model_and_data(kind, device):
    torch.manual_seed(0)
    if kind == "tokens":
        g = torch.Generator().manual_seed(1)
        x = torch.randint(0, 7, (13, 5), generator=g).to(device)
        return TokenModel().to(device, DTYPE), x, regression_data(device)[1]
    return mlp(3, 5, 3).to(device, DTYPE), *regression_data(device)


def fit_oracle(model, x, y, sigma, subset="all", **kwargs):
    """The scalar-noise Kron of the weighted Gaussian with weights ``r = w / mean(w)``
    at the noise ``mean(w)^-1/2``: what one noise per output must equal."""
    w = 1 / sigma.square()
    la = Laplace(
        model,
        WeightedGaussian(w / w.mean()),
        subset,
        "kron",
        sigma_noise=w.mean().rsqrt(),
        **kwargs,
    )
    la.fit(loader(x, y))
    return la


# -- (a) the combined Kron is KFAC of the weighted loss ------------------------------
@pytest.mark.parametrize(
    "backend,kind,damping",
    [
        (NativeGGN, "mlp", False),
        (NativeGGN, "mlp", True),
        (CurvlinopsGGN, "mlp", False),
        (CurvlinopsGGN, "mlp", True),
        # the engine splits an embedding's pair as (K counts) (x) (G / K), K the
        # columns of the output-Hessian factor (C for all outputs, 1 for one):
        # the per-output factors are brought to the split of all outputs
        (NativeGGN, "tokens", False),
        (NativeGGN, "tokens", True),
    ],
    ids=[
        "native",
        "native-damped",
        "curvlinops",
        "curvlinops-damped",
        "native-embedding",
        "native-embedding-damped",
    ],
)
def test_the_combined_kron_is_the_kfac_of_the_weighted_loss(
    backend, kind, damping, device
):
    model, x, y = model_and_data(kind, device)
    sigma = sigma_of(SIGMA, device)
    n_layers = sum(p.requires_grad for p in model.parameters())
    prior = torch.linspace(0.5, 2.0, n_layers, dtype=DTYPE, device=device)
    kwargs = {"backend": backend, "damping": damping, "prior_precision": prior}
    la = Laplace(model, "regression", "all", "kron", sigma_noise=sigma, **kwargs)
    la.fit(loader(x, y))
    assert isinstance(la, KronLaplace) and isinstance(la.H, OutputKron)
    if kind == "tokens":  # the shared factor of the embedding is not the averaged one
        assert la.H.shared[0] == 0 and la.H.averaged[0] == 1
    ref = fit_oracle(model, x, y, sigma, **kwargs)
    torch.testing.assert_close(
        la.posterior_precision.to_matrix(), ref.posterior_precision.to_matrix()
    )
    torch.testing.assert_close(
        la.log_det_posterior_precision, ref.log_det_posterior_precision
    )
    # the curvature at the noise: sum_c H_c / sigma_c^2, the undamped KFAC
    w = 1 / sigma.square()
    torch.testing.assert_close(
        la.H.weighted(w).to_matrix(),
        (ref.H * (w.mean())).to_matrix(),
    )


def test_output_kron_weights_each_outputs_factor_on_its_side():
    """Synthetic outputs' Krons sharing their first factor (position 0, not the
    averaged one) or their second: ``weighted(w)`` is ``sum_c w_c K_c`` densely."""
    g = torch.Generator().manual_seed(0)

    def spd(n):
        M = torch.randn(n, n, generator=g, dtype=DTYPE)
        return M @ M.T

    A, B = spd(3), spd(4)
    columns = [Kron([[A, spd(2)], [spd(4), B], [spd(2)]]) for _ in range(3)]
    H = OutputKron.from_columns(columns)
    assert H.shared == [0, 1, None]
    w = torch.tensor([0.3, 1.0, 4.0], dtype=DTYPE)
    expected = sum(wc * K.to_matrix() for wc, K in zip(w, columns))
    torch.testing.assert_close(H.weighted(w).to_matrix(), expected)


def test_batches_whose_shared_side_is_undetermined_are_aligned():
    """A batch whose outputs agree on both sides of a pair (e.g. no gradient through
    the layer) takes the side the other batch shares; sides that disagree are
    refused."""
    g = torch.Generator().manual_seed(0)

    def spd(n):
        M = torch.randn(n, n, generator=g, dtype=DTYPE)
        return M @ M.T

    tie = [Kron([[spd(2), spd(3)]], averaged=[1])] * 3  # both sides agree
    A = spd(2)
    varied = [Kron([[A, spd(3)]], averaged=[1]) for _ in range(3)]  # shares side 0
    w = torch.tensor([0.3, 1.0, 4.0], dtype=DTYPE)
    for first, second in ((tie, varied), (varied, tie)):
        H = OutputKron.from_columns(first).add_(OutputKron.from_columns(second))
        assert H.shared == [0]
        expected = sum(
            wc * (K1 + K2).to_matrix() for wc, K1, K2 in zip(w, first, second)
        )
        torch.testing.assert_close(H.weighted(w).to_matrix(), expected)
    B = spd(3)
    shares_side_1 = [Kron([[spd(2), B]], averaged=[1]) for _ in range(3)]
    with pytest.raises(ValueError, match="changed sides"):
        OutputKron.from_columns(varied).add_(OutputKron.from_columns(shares_side_1))


def test_spectral_eigenvalues_give_the_gradient_of_a_log_determinant():
    """``d/dF sum_ij log(c l_i(F) a_j + d) = sum_j c a_j (c a_j F + d)^-1``, the
    closed form, at a matrix with a repeated eigenvalue as well."""
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=DTYPE))
    a = torch.tensor([0.5, 2.0, 3.0], dtype=DTYPE)
    c, d = 1.7, 0.3
    for lam in ([1.0, 1.0, 1.0, 4.0], [0.2, 1.0, 2.5, 4.0]):
        F = ((Q * torch.tensor(lam, dtype=DTYPE)) @ Q.T).requires_grad_(True)
        values, vectors = torch.linalg.eigh(F.detach())
        tracked = spectral_eigenvalues(F, vectors, values)
        torch.testing.assert_close(tracked, values)
        (grad,) = torch.autograd.grad(affine_log_sum(c, d, tracked, a), F)
        eye = torch.eye(4, dtype=DTYPE)
        expected = sum(
            c * aj * torch.linalg.inv(c * aj * F.detach() + d * eye) for aj in a
        )
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad, expected)
    # a diagonal factor (a vector) is its own eigenvalues
    f = torch.tensor([0.5, 1.5], dtype=DTYPE, requires_grad=True)
    (grad,) = torch.autograd.grad(
        affine_log_sum(c, d, spectral_eigenvalues(f, None, f.detach())), f
    )
    torch.testing.assert_close(grad, c / (c * f.detach() + d))


def test_a_pair_that_differs_on_both_sides_is_refused():
    g = torch.Generator().manual_seed(0)
    columns = [
        Kron([[torch.rand(2, 2, generator=g), torch.rand(3, 3, generator=g)]])
        for _ in range(2)
    ]
    with pytest.raises(ValueError, match="cannot be split by output"):
        OutputKron.from_columns(columns)


# -- (b, c, h) exact KFAC: the dense precision and the dense evidence ---------------
def linear_case(subset, device):
    """The model, data, the treated layer and its inputs: a model whose only layer
    is linear (all weights), or an MLP's last layer on its features."""
    torch.manual_seed(0)
    x, y = regression_data(device, n=17)
    if subset == "all":
        model = nn.Linear(3, 3).to(device, DTYPE)
        return model, x, y, model, x
    model = mlp(3, 5, 3, frozen=False).to(device, DTYPE)
    with torch.no_grad():
        phi = model[:-1](x)
    return model, x, y, model[-1], phi


def dense_precision(layer, inputs, sigma, delta):
    """``blockdiag(sum_c J_c^T J_c / sigma_c^2) + delta I`` over (weight, bias):
    KFAC drops the weight-bias blocks, and is exact within them for a linear
    layer under a Gaussian likelihood."""
    J = oracles.jacobian(layer, inputs)
    ggn = torch.einsum("ncp,c,ncq->pq", J, 1 / sigma.square(), J)
    n_weight = layer.weight.numel()
    mask = torch.zeros_like(ggn, dtype=torch.bool)
    mask[:n_weight, :n_weight] = True
    mask[n_weight:, n_weight:] = True
    eye = torch.eye(len(ggn), dtype=DTYPE, device=ggn.device)
    return torch.where(mask, ggn, 0) + delta * eye


def dense_evidence(layer, inputs, y, sigma, delta):
    """The Laplace evidence from the dense precision, with the Gaussian
    log-likelihood of one noise per output."""
    with torch.no_grad():
        f = layer(inputs)
    N, C = y.shape
    log_lik = (
        -0.5 * ((f - y).square() / sigma.square()).sum()
        - N * torch.log(sigma * math.sqrt(2 * math.pi)).sum()
    )
    P = dense_precision(layer, inputs, sigma, delta)
    theta = oracles.flat(p.detach() for p in layer.parameters())
    log_det_prior = len(theta) * math.log(delta)
    scatter = delta * theta.square().sum()
    return log_lik - 0.5 * (torch.linalg.slogdet(P)[1] - log_det_prior + scatter)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize(
    "values", [SIGMA, (0.7, 0.7, 0.7)], ids=["distinct", "equal-noises"]
)
def test_precision_evidence_and_its_gradient_are_the_dense_ones(subset, values, device):
    model, x, y, layer, inputs = linear_case(subset, device)
    sigma, delta = sigma_of(values, device), 0.6
    la = Laplace(
        model,
        "regression",
        subset,
        "kron",
        sigma_noise=sigma,
        prior_precision=delta,
        backend=NativeGGN,
    )
    la.fit(loader(x, y))
    if subset == "last_layer":
        assert isinstance(la, KronLLLaplace)
    torch.testing.assert_close(
        la.posterior_precision.to_matrix(),
        dense_precision(layer, inputs, sigma, delta),
    )
    torch.testing.assert_close(
        la.log_marginal_likelihood(), dense_evidence(layer, inputs, y, sigma, delta)
    )
    # d evidence / d sigma_c by autograd through both, at repeated eigenvalues of
    # G_w = N diag(w) too (equal noises)
    sig = sigma.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(la.log_marginal_likelihood(sigma_noise=sig), sig)
    sig = sigma.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(dense_evidence(layer, inputs, y, sig, delta), sig)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, expected)
    # and in the prior precision with the noise, as marglik_training tunes them
    sig = sigma.clone().requires_grad_(True)
    prior = torch.tensor(delta, dtype=DTYPE, device=device, requires_grad=True)
    value = la.log_marginal_likelihood(prior_precision=prior, sigma_noise=sig)
    grads = torch.autograd.grad(value, (prior, sig))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("damping", [False, True], ids=["undamped", "damped"])
@pytest.mark.parametrize(
    "values", [SIGMA, (0.7, 0.7, 0.7)], ids=["distinct", "equal-noises"]
)
def test_the_evidence_gradient_is_that_of_finite_differences(values, damping, device):
    """An MLP: at equal noises the last layer's output-side factor ``N diag(w)`` has
    repeated eigenvalues while the hidden layers make the outputs unlike, so the
    gradient is not zero by symmetry."""
    model, x, y = model_and_data("mlp", device)
    sigma = sigma_of(values, device)
    la = Laplace(model, "regression", "all", "kron", sigma_noise=sigma, damping=damping)
    la.fit(loader(x, y))
    sig = sigma.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(la.log_marginal_likelihood(sigma_noise=sig), sig)
    eps = 1e-6
    for c in range(len(sigma)):
        step = torch.zeros_like(sigma)
        step[c] = eps
        hi = la.log_marginal_likelihood(sigma_noise=sigma + step)
        lo = la.log_marginal_likelihood(sigma_noise=sigma - step)
        torch.testing.assert_close(grad[c], (hi - lo) / (2 * eps), rtol=1e-5, atol=0)


# -- (d) a new noise without refitting ----------------------------------------------
@pytest.mark.parametrize("damping", [False, True], ids=["undamped", "damped"])
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_a_new_noise_equals_a_refit(subset, damping, device):
    model, x, y = model_and_data("mlp", device)
    other = sigma_of((1.5, 0.3, 0.9), device)
    kwargs = {"damping": damping, "prior_precision": 0.8}
    la = Laplace(
        model,
        "regression",
        subset,
        "kron",
        sigma_noise=sigma_of(SIGMA, device),
        **kwargs,
    )
    la.fit(loader(x, y))
    la.log_marginal_likelihood()  # the cache of the first noise
    la.sigma_noise = other
    ref = Laplace(model, "regression", subset, "kron", sigma_noise=other, **kwargs)
    ref.fit(loader(x, y))
    torch.testing.assert_close(
        la.posterior_precision.to_matrix(), ref.posterior_precision.to_matrix()
    )
    torch.testing.assert_close(
        la.log_marginal_likelihood(), ref.log_marginal_likelihood()
    )
    for a, b in zip(la(x), ref(x)):
        torch.testing.assert_close(a, b)
    draws = [
        m.sample(4, generator=torch.Generator(device).manual_seed(0)) for m in (la, ref)
    ]
    torch.testing.assert_close(*draws)
    nn_pred = [
        m(
            x,
            pred_type="nn",
            link_approx="mc",
            n_samples=3,
            generator=torch.Generator(device).manual_seed(0),
        )
        for m in (la, ref)
    ]
    torch.testing.assert_close(nn_pred[0][1], nn_pred[1][1])
    # the evidence of yet another noise, given to log_marginal_likelihood
    third = sigma_of((0.4, 0.4, 3.0), device)
    ref.sigma_noise = third
    torch.testing.assert_close(
        la.log_marginal_likelihood(sigma_noise=third), ref.log_marginal_likelihood()
    )


def test_tuning_the_prior_with_one_noise_per_output(device):
    """'marglik' tunes to the oracle's prior (the same evidence); 'gridsearch' runs
    with the Gaussian NLL of the per-output noise."""
    model, x, y = model_and_data("mlp", device)
    sigma = sigma_of(SIGMA, device)
    la = Laplace(model, "regression", "all", "kron", sigma_noise=sigma)
    la.fit(loader(x, y))
    ref = fit_oracle(model, x, y, sigma)
    for m in (la, ref):
        m.optimize_prior_precision(method="marglik", prior_structure="layerwise")
    torch.testing.assert_close(la.prior_precision, ref.prior_precision)
    la.optimize_prior_precision(
        method="gridsearch", val_loader=loader(x, y), grid_size=5
    )
    grid = torch.logspace(-4, 4, 5, dtype=DTYPE, device=device)
    assert bool(torch.isclose(grid, la.prior_precision).any())


# -- (e) two data sets --------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "tokens"])
def test_two_halves_equal_one_fit(kind, device):
    model, x, y = model_and_data(kind, device)
    sigma = sigma_of(SIGMA, device)
    la = Laplace(model, "regression", "all", "kron", sigma_noise=sigma)
    la.fit(loader(x[:8], y[:8]))
    la.fit(loader(x[8:], y[8:]), override=False)
    ref = Laplace(model, "regression", "all", "kron", sigma_noise=sigma)
    ref.fit(loader(x, y))
    assert la.n_data == ref.n_data == len(x)
    torch.testing.assert_close(
        la.posterior_precision.to_matrix(), ref.posterior_precision.to_matrix()
    )
    torch.testing.assert_close(
        la.log_marginal_likelihood(), ref.log_marginal_likelihood()
    )


# -- (f) serialization --------------------------------------------------------------
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_state_dict_round_trip(subset, device):
    model, x, y = model_and_data("mlp", device)
    sigma = sigma_of(SIGMA, device)
    la = Laplace(model, "regression", subset, "kron", sigma_noise=sigma)
    la.fit(loader(x, y))
    buffer = io.BytesIO()
    torch.save(la.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # plain tensors only
    other = Laplace(model, "regression", subset, "kron")  # the state brings the noise
    other.load_state_dict(state)
    torch.testing.assert_close(other.sigma_noise, sigma)
    torch.testing.assert_close(
        other.posterior_precision.to_matrix(), la.posterior_precision.to_matrix()
    )
    torch.testing.assert_close(
        other.log_marginal_likelihood(), la.log_marginal_likelihood()
    )
    # the per-output factors came back: a new noise still gives the refit
    new = sigma_of((1.5, 0.3, 0.9), device)
    for m in (la, other):
        m.sigma_noise = new
    torch.testing.assert_close(
        other.posterior_precision.to_matrix(), la.posterior_precision.to_matrix()
    )


# -- (g) marglik_training -----------------------------------------------------------
def test_marglik_training_learns_one_noise_per_output(device):
    """Two outputs of a linear map with noise 0.1 and 1.0: the learnt noises are
    ordered and far apart (the exact ones have ratio 10)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(400, 2, generator=g, dtype=DTYPE)
    W = torch.tensor([[1.0, -2.0], [0.5, 1.0]], dtype=DTYPE)
    noise = torch.tensor([0.1, 1.0], dtype=DTYPE)
    Y = X @ W.T + torch.randn(400, 2, generator=g, dtype=DTYPE) * noise
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))
    la, _, margliks, _ = marglik_training(
        model.to(device, DTYPE),
        DataLoader(TensorDataset(X.to(device), Y.to(device)), batch_size=200),
        likelihood="regression",
        hessian_structure="kron",
        backend=NativeGGN,
        sigma_noise_init=torch.ones(2, dtype=DTYPE, device=device),
        n_epochs=40,
        lr_hyp=0.1,
        optimizer_kwargs={"lr": 0.05},
    )
    assert isinstance(la, KronLaplace) and la.sigma_noise.shape == (2,)
    assert la.sigma_noise[1] / la.sigma_noise[0] > 3
    assert margliks[-1] < margliks[0]


# -- (i) refusals ---------------------------------------------------------------------
def test_refusals(device):
    model, x, y = model_and_data("mlp", device)
    sigma = sigma_of(SIGMA, device)
    for structure, kwargs in (("lowrank", {}), ("gp", {"n_subset": 3})):
        with pytest.raises(ValueError, match="'full', 'diag' or 'kron'"):
            Laplace(model, "regression", "all", structure, sigma_noise=sigma, **kwargs)
    # backends without the KFAC of one output alone, refused before any work
    for backend, message in (
        (AsdlGGN, "cannot compute KFAC"),
        (BackPackGGN, "cannot compute the GGN"),
        (NativeEF, "empirical Fisher"),
    ):
        la = Laplace(
            model, "regression", "all", "kron", sigma_noise=sigma, backend=backend
        )
        with pytest.raises(ValueError, match=message):
            la.fit(loader(x, y))
        assert not la.fitted
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="cannot compute KFAC"):
        marglik_training(
            model,
            loader(x, y),
            likelihood="regression",
            hessian_structure="kron",
            sigma_noise_init=torch.ones(3, dtype=DTYPE, device=device),
            n_epochs=1,
        )
    for p, q in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), q)  # no training happened
    # the noise of the fit decides: a scalar fit takes no vector noise, and the
    # data set added to a vector fit needs a vector noise
    la = Laplace(model, "regression", "all", "kron")
    la.fit(loader(x, y))
    with pytest.raises(ValueError, match="fitted with a scalar sigma_noise"):
        la.sigma_noise = sigma
    la = Laplace(model, "regression", "all", "kron", sigma_noise=sigma)
    la.fit(loader(x, y))
    la.sigma_noise = 0.7  # a scalar after a vector fit: equal noises
    equal = Laplace(
        model, "regression", "all", "kron", sigma_noise=torch.full((3,), 0.7)
    )
    equal.fit(loader(x, y))
    torch.testing.assert_close(
        la.log_marginal_likelihood(), equal.log_marginal_likelihood()
    )
    with pytest.raises(ValueError, match="one sigma_noise per output in both"):
        la.fit(loader(x, y), override=False)
    x_nan = x.clone()
    x_nan[5, 0] = float("nan")
    la = Laplace(model, "regression", "all", "kron", sigma_noise=sigma)
    with pytest.raises(RuntimeError, match="batch 1 is not finite"):
        la.fit(loader(x_nan, y))
    assert not la.fitted
    la = Laplace(model, "regression", "all", "kron", sigma_noise=torch.ones(4))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        la.fit(loader(x, y))
    la = Laplace(model, "regression", "all", "kron", sigma_noise=sigma)
    la.fit(loader(x, y))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        la.sigma_noise = torch.ones(2)


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_a_per_output_noise_before_fit_gives_the_prior(structure, device):
    """Before ``fit`` the posterior is the prior ``N(0, P0^-1)``, whatever the
    noise: ``J P0^-1 J^T``."""
    model, x, _ = model_and_data("mlp", device)
    la = Laplace(
        model,
        "regression",
        "all",
        structure,
        sigma_noise=sigma_of(SIGMA, device),
        prior_precision=2.0,
    )
    _, f_var = la(x[:4])
    J = oracles.jacobian(model, x[:4])
    torch.testing.assert_close(f_var, J @ J.mT / 2.0)
