"""VaLLA (``laplace.functional.valla``, ``laplace.functional.inducing``) against
dense float64 oracles: its covariance is the weight-space Gaussian ``(delta I +
J_Z^T A J_Z)^-1`` pushed through torch.func Jacobians, its objective the KL of
two dense Gaussians plus alpha-energies by quadrature, and with the inducing
points at the training inputs the exact linearized Laplace posterior is its
optimum; and its fit, strategies, checkpoints and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import VaLLA
from laplace.functional import inducing
from laplace.functional.nystrom import basis_inputs
from laplace.likelihood import OutputLikelihood
from laplace.predictive import links
from tests import oracles


def _net(C, device, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, C))
    return net.to(device, torch.float64)


def _data(likelihood, n=20, C=3, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 2, generator=g, dtype=torch.float64)
    if likelihood == "classification":
        y = torch.randint(C, (n,), generator=g)
    elif likelihood in ("binary", "multilabel"):
        y = torch.randint(2, (n, C), generator=g).to(torch.float64)
    elif likelihood == "poisson":
        y = torch.poisson(torch.full((n, C), 1.5), generator=g).to(torch.float64)
    else:
        y = torch.randn(n, C, generator=g, dtype=torch.float64)
    return X.to(device), y.to(device)


def _loader(X, y, batch_size=5):
    return DataLoader(TensorDataset(X, y), batch_size=batch_size)


def _weight_covariance(model, Z, classes, L, delta):
    """``(delta I + J_Z^T A J_Z)^-1`` with ``A = L L^T``."""
    J_Z = oracles.jacobian(model, Z)[torch.arange(len(Z)), classes]
    A = L @ L.T
    P = J_Z.shape[1]
    return torch.linalg.inv(delta * torch.eye(P).to(A) + J_Z.T @ A @ J_Z)


def _random_state(la, seed=0):
    """A random lower-triangular factor and prior, set in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        la.L.copy_(0.5 * torch.randn(la.L.shape, generator=g, dtype=la.L.dtype))
    la.prior_precision = 1.7


@pytest.mark.parametrize("likelihood,C", [("regression", 2), ("classification", 3)])
def test_the_covariance_is_the_weight_space_gaussian_of_the_inducing_outputs(
    device, likelihood, C
):
    model = _net(C, device)
    X, y = _data(likelihood, C=C, device=device)
    classes = torch.tensor([0, C - 1, 1, 0])
    la = VaLLA(model, likelihood, X[:4].clone(), inducing_classes=classes)
    la.fit(_loader(X, y), iterations=3, lr=1e-2)
    _random_state(la)
    Z = la.inducing_locations.detach()
    L = inducing.unpack_tril(la.L.detach(), 4)
    Sigma = _weight_covariance(model, Z, classes.to(device), L, 1.7)
    Xs = torch.randn(3, 2, dtype=torch.float64, device=device)
    Js = oracles.jacobian(model, Xs)
    expected = torch.einsum("ncp,pq,ndq->ncd", Js, Sigma, Js)
    mean, var = la.predictive_moments(Xs)
    torch.testing.assert_close(var, expected)
    torch.testing.assert_close(mean, model(Xs).detach())
    flat = Js.reshape(3 * C, -1)
    torch.testing.assert_close(
        la.predictive_moments(Xs, joint=True)[1], flat @ Sigma @ flat.T
    )
    torch.testing.assert_close(la.functional_variance(Js), expected)
    torch.testing.assert_close(la.functional_covariance(Js), flat @ Sigma @ flat.T)


def _gauss_hermite_energy(y, m, v, s2, alpha, n=80):
    """``(1/alpha) log E[N(y | f, s2)^alpha]`` (alpha 0: ``E log N``) by
    Gauss-Hermite quadrature over ``f ~ N(m, v)``."""
    import numpy as np

    nodes, weights = np.polynomial.hermite_e.hermegauss(n)
    nodes = torch.as_tensor(nodes).to(m)
    weights = torch.as_tensor(weights / weights.sum()).to(m)
    f = m[..., None] + v.sqrt()[..., None] * nodes
    log_n = -0.5 * (math.log(2 * math.pi) + math.log(s2) + (y[..., None] - f) ** 2 / s2)
    if alpha == 0:
        return (weights * log_n).sum(-1)
    return torch.logsumexp(alpha * log_n + weights.log(), -1) / alpha


def _gauss_hermite_mean(fn, m, v, n=80):
    """``E[fn(f)]`` elementwise for ``f ~ N(m, v)`` by Gauss-Hermite quadrature
    (``fn`` maps ``(..., n)`` nodes to values)."""
    import numpy as np

    nodes, weights = np.polynomial.hermite_e.hermegauss(n)
    nodes = torch.as_tensor(nodes).to(m)
    weights = torch.as_tensor(weights / weights.sum()).to(m)
    return (weights * fn(m[..., None] + v.sqrt()[..., None] * nodes)).sum(-1)


def test_the_poisson_energy_is_the_expected_log_likelihood():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(5, 3, generator=g, dtype=torch.float64)
    v = torch.rand(5, 3, generator=g, dtype=torch.float64) + 0.1
    y = torch.poisson(torch.full((5, 3), 2.0), generator=g).to(torch.float64)

    def log_lik(f, y=y[..., None]):
        return torch.distributions.Poisson(f.exp()).log_prob(y.expand_as(f))

    expected = _gauss_hermite_mean(log_lik, m, v).sum(-1)
    got = inducing.poisson_expected_log_likelihood(m, v, y)
    torch.testing.assert_close(got, expected)


def test_the_bernoulli_probit_energy_is_the_log_probit_predictive():
    f = torch.tensor([[0.0, 1.0, -1.0], [2.0, -0.5, 0.0]], dtype=torch.float64)
    v = torch.tensor([[1.0, 0.0, 4.0], [0.5, 2.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    p = links.sigmoid_probit(f, v)
    expected = torch.where(y == 1, p, 1 - p).log().sum(-1)
    torch.testing.assert_close(inducing.bernoulli_probit_energy(f, v, y), expected)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_the_gaussian_energy_is_the_quadrature_of_its_definition(alpha):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(6, generator=g, dtype=torch.float64)
    m = torch.randn(6, generator=g, dtype=torch.float64)
    v = torch.rand(6, generator=g, dtype=torch.float64) + 0.1
    s2 = 0.49
    expected = _gauss_hermite_energy(y, m, v, s2, alpha)
    got = inducing.gaussian_energy(y, m, v, torch.tensor(s2).to(m), alpha)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_the_sampled_energy_averages_the_likelihood_power(alpha):
    g = torch.Generator().manual_seed(0)
    p = torch.rand(4, 3, generator=g, dtype=torch.float64) + 0.01  # (S, N)
    if alpha == 0:
        expected = p.log().mean(0)
    else:
        expected = (p**alpha).mean(0).log() / alpha
    torch.testing.assert_close(inducing.sampled_energy(p.log(), alpha), expected)


@pytest.mark.parametrize(
    "likelihood,C,alpha,T",
    [
        ("regression", 1, 0.0, 1.0),
        ("regression", 2, 0.5, 0.5),
        ("classification", 3, 1.0, 2.0),
        ("binary", 1, 1.0, 1.0),
        ("multilabel", 3, 1.0, 0.5),
        ("poisson", 2, 0.0, 2.0),
    ],
)
def test_the_objective_is_minus_the_scaled_energy_plus_the_dense_kl(
    device, likelihood, C, alpha, T
):
    """``fit_history_['objective'][0]``: at the start (``L = I``), on the first
    minibatch, ``-(N / (B T) sum E_alpha - KL)`` with the KL of the weight-space
    Gaussians (their covariances: the mean is not variational)."""
    model = _net(C, device)
    X, y = _data(likelihood, C=C, device=device)
    Z = X[:4].clone()
    la = VaLLA(
        model,
        likelihood,
        Z,
        alpha=alpha,
        temperature=T,
        prior_precision=2.0,
        sigma_noise=0.7 if likelihood == "regression" else 1.0,
    )
    la.fit(_loader(X, y), iterations=1, lr=1e-3)
    delta = 2.0
    Sigma = _weight_covariance(
        model, Z, torch.zeros(4, dtype=torch.long), torch.eye(4).to(Z), delta
    )
    P = Sigma.shape[0]
    kl = 0.5 * (delta * Sigma.trace() - P - torch.logdet(delta * Sigma))
    Jb = oracles.jacobian(model, X[:5])
    var = torch.einsum("ncp,pq,ndq->ncd", Jb, Sigma, Jb)
    f = model(X[:5]).detach()
    if likelihood == "regression":
        v = var.diagonal(dim1=-2, dim2=-1)
        energy = _gauss_hermite_energy(y[:5], f, v, 0.49, alpha).sum()
    elif likelihood in ("binary", "multilabel"):
        # the probit predictive's probability of each label (links.sigmoid_probit)
        p = links.sigmoid_probit(f, var.diagonal(dim1=-2, dim2=-1))
        energy = (y[:5] * p.log() + (1 - y[:5]) * (1 - p).log()).sum()
    elif likelihood == "poisson":
        v = var.diagonal(dim1=-2, dim2=-1)
        energy = _gauss_hermite_mean(
            lambda f, y=y[:5, :, None]: y * f - f.exp() - torch.lgamma(y + 1), f, v
        ).sum()
    else:
        scaled = f / torch.sqrt(1 + math.pi / 8 * var.diagonal(dim1=-2, dim2=-1))
        energy = torch.log_softmax(scaled, -1)[torch.arange(5), y[:5]].sum()
    expected = -(20 / (5 * T) * energy - kl)
    assert la.fit_history_["objective"][0] == pytest.approx(float(expected), rel=1e-9)


def test_with_the_training_inputs_as_inducing_points_the_exact_gp_is_the_optimum(
    device,
):
    """Regression, ``alpha = 0`` (the ELBO): with ``Z`` the training inputs and ``A
    = I / (sigma^2 T)`` the posterior is the linearized Laplace posterior, and the
    objective on the whole data set is stationary there in ``L`` and ``Z``; from
    ``L = I``, ``fit`` converges to it (at the hyperparameters it learns)."""
    model = _net(1, device)
    X, y = _data("regression", n=10, C=1, device=device)
    sigma, T, delta = 0.6, 0.5, 2.0
    la = VaLLA(
        model,
        "regression",
        X.clone(),
        alpha=0.0,
        sigma_noise=sigma,
        temperature=T,
        prior_precision=delta,
    )
    la.fit(_loader(X, y, batch_size=10), iterations=1, lr=1e-12)
    star = inducing.identity_packed(10, dtype=torch.float64, device=device)
    with torch.no_grad():
        la.L.copy_(star / math.sqrt(sigma**2 * T))
        la.inducing_locations.copy_(X)
        la.prior_precision, la.sigma_noise = delta, sigma
    G = oracles.ggn(model, X, "regression") / (sigma**2 * T)
    exact = torch.linalg.inv(G + delta * torch.eye(G.shape[0]).to(G))
    Xs = torch.randn(4, 2, dtype=torch.float64, device=device)
    Js = oracles.jacobian(model, Xs)
    torch.testing.assert_close(
        la.predictive_moments(Xs)[1], torch.einsum("ncp,pq,ndq->ncd", Js, exact, Js)
    )
    f, Xset = la._jacobian_set(X)
    objective = la._objective(f.detach(), Xset, y, la._inducing_rows(True), 10)
    gL, gZ = torch.autograd.grad(objective, [la.L, la.inducing_locations])
    assert float(gL.abs().max()) < 1e-9 and float(gZ.abs().max()) < 1e-9
    # and a step away is worse
    with torch.no_grad():
        la.L.add_(1e-3 * torch.randn_like(la.L))
    worse = la._objective(
        f.detach(), la._jacobian_set(X)[1], y, la._inducing_rows(False), 10
    )
    assert float(worse.detach()) > float(objective.detach())

    # fit from L = I with the hyperparameters learnt too
    fitted = VaLLA(
        model,
        "regression",
        X.clone(),
        alpha=0.0,
        sigma_noise=sigma,
        temperature=T,
        prior_precision=delta,
    )
    fitted.fit(_loader(X, y, batch_size=10), iterations=300, lr=0.1)
    d = float(fitted.prior_precision.detach())
    s = float(fitted.sigma_noise.detach())
    G = oracles.ggn(model, X, "regression") / (s**2 * T)
    exact = torch.linalg.inv(G + d * torch.eye(G.shape[0]).to(G))
    torch.testing.assert_close(
        fitted.predictive_moments(Xs)[1],
        torch.einsum("ncp,pq,ndq->ncd", Js, exact, Js),
        rtol=2e-3,
        atol=1e-5,
    )


def test_fit_history_val_steps_and_continuing(device):
    model = _net(3, device)
    X, y = _data("classification", device=device)
    val = _loader(X[:6], y[:6])
    la = VaLLA(model, "classification", X[:4].clone())
    la.fit(_loader(X, y), iterations=4, lr=1e-2, val_loader=val, val_steps=2)
    assert len(la.fit_history_["objective"]) == 4
    assert len(la.fit_history_["val_nll"]) == 2
    mean, var = la.predictive_moments(X[:6])
    probs = torch.softmax(
        mean / torch.sqrt(1 + math.pi / 8 * var.diagonal(dim1=-2, dim2=-1)), -1
    )
    nll = float(-probs[torch.arange(6), y[:6]].log().mean())
    assert la.fit_history_["val_nll"][-1] == pytest.approx(nll, rel=1e-12)
    L, Z = la.L.detach().clone(), la.inducing_locations.detach().clone()
    la.fit(_loader(X, y), iterations=2, lr=1e-2, override=False)
    assert len(la.fit_history_["objective"]) == 6
    assert not torch.equal(la.L.detach(), L)
    # two steps continued equal six in one go
    once = VaLLA(model, "classification", X[:4].clone())
    once.fit(_loader(X, y), iterations=4, lr=1e-2)
    once.fit(_loader(X, y), iterations=2, lr=1e-2, override=False)
    torch.testing.assert_close(once.L, la.L)
    # a new fit starts again from L = I and the initial inputs
    la.fit(_loader(X, y), iterations=1, lr=1e-2, val_loader=val)
    assert len(la.fit_history_["objective"]) == 1
    assert len(la.fit_history_["val_nll"]) == 1
    assert not torch.equal(la.inducing_locations.detach(), Z)
    fresh = VaLLA(model, "classification", X[:4].clone())
    fresh.fit(_loader(X, y), iterations=1, lr=1e-2)
    torch.testing.assert_close(la.L, fresh.L)


def test_learned_hyperparameters_and_their_setters(device):
    model = _net(1, device)
    X, y = _data("regression", C=1, device=device)
    la = VaLLA(model, "regression", X[:5].clone(), sigma_noise=0.5, prior_precision=3.0)
    assert float(la.sigma_noise) == pytest.approx(0.5)
    assert la.prior_precision.shape == (1,)
    assert float(la.prior_precision) == pytest.approx(3.0)
    la.fit(_loader(X, y), iterations=20, lr=0.05)
    assert float(la.log_prior_precision) != pytest.approx(math.log(3.0))
    assert float(la.log_noise_variance) != pytest.approx(math.log(0.25))
    torch.testing.assert_close(la.sigma_noise, (0.5 * la.log_noise_variance).exp())
    la.prior_precision = 2.0
    assert float(la.log_prior_precision) == pytest.approx(math.log(2.0))
    cls = VaLLA(_net(3, device), "classification", X[:4].clone())
    assert cls.log_noise_variance is None and float(cls.sigma_noise) == 1.0
    with pytest.raises(NotImplementedError, match="learns the prior precision"):
        la.optimize_prior_precision()


def test_fixed_inducing_inputs_stay_and_the_model_is_left_as_it_was(device):
    from tests.models import DictModel

    torch.manual_seed(0)
    model = DictModel(3, 2).to(device, torch.float64)
    x = torch.randn(12, 3, dtype=torch.float64, device=device)

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 12

        def __getitem__(self, i):
            return {
                "input_ids": x[i],
                "scale": torch.ones(1).to(x),
                "labels": torch.tensor(i % 2, device=device),
            }

    Z = {"input_ids": x[:3].clone(), "scale": torch.ones(3, 1).to(x)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    la = VaLLA(model, "classification", Z)
    la.fit(DataLoader(Rows(), batch_size=4), iterations=3, lr=0.1)
    assert torch.equal(la.inducing_locations["input_ids"], x[:3])
    assert la(Z).shape == (3, 2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())


def test_strategies_draw_from_the_training_data(device):
    model = _net(3, device)
    X, y = _data("classification", device=device)
    la = VaLLA(model, "classification", "random", num_inducing=6, seed=3)
    assert la.inducing_locations is None
    la.fit(_loader(X, y), iterations=1, lr=1e-12)
    picked = basis_inputs(20, 6, seed=3)
    torch.testing.assert_close(la.inducing_locations.detach(), X[picked])
    assert torch.equal(la.inducing_classes.cpu(), y[picked].cpu())
    # k-means: each centre the mean of its points, its class the nearest datum's
    separated = torch.cat([X[:10] * 0.1 + 5, X[10:] * 0.1 - 5])
    la = VaLLA(model, "classification", "kmeans", num_inducing=2, seed=0)
    la.fit(_loader(separated, y), iterations=1, lr=1e-12)
    centres = la.inducing_locations.detach()
    assign = torch.cdist(separated, centres).argmin(1)
    for k in range(2):
        torch.testing.assert_close(
            centres[k], separated[assign == k].mean(0), atol=1e-9, rtol=0
        )
        nearest = torch.cdist(centres[k : k + 1], separated).argmin()
        assert int(la.inducing_classes[k]) == int(y[nearest])
    reg = VaLLA(_net(1, device), "regression", "random", num_inducing=4)
    reg.fit(_loader(X, torch.randn(20, 1).to(X)), iterations=1, lr=1e-3)
    assert not reg.inducing_classes.any()
    with pytest.raises(ValueError, match="num_inducing=30 exceeds the 20"):
        VaLLA(model, "classification", "random", num_inducing=30).fit(_loader(X, y))


def test_monte_carlo_energies_fit_classification_with_any_alpha(device):
    model = _net(3, device)
    X, y = _data("classification", device=device)
    fits = []
    for alpha in (0.0, 0.5):
        la = VaLLA(
            model,
            "classification",
            X[:4].clone(),
            alpha=alpha,
            mc_softmax_samples=8,
            seed=1,
        )
        la.fit(_loader(X, y), iterations=3, lr=1e-2)
        fits.append(la.fit_history_["objective"])
        again = VaLLA(
            model,
            "classification",
            X[:4].clone(),
            alpha=alpha,
            mc_softmax_samples=8,
            seed=1,
        )
        again.fit(_loader(X, y), iterations=3, lr=1e-2)
        assert again.fit_history_["objective"] == la.fit_history_["objective"]
    assert fits[0] != fits[1]


def test_state_dict_restores_the_fit_and_its_random_stream(device):
    model = _net(3, device)
    X, y = _data("classification", device=device)
    la = VaLLA(
        model, "classification", X[:4].clone(), mc_softmax_samples=4, alpha=0.5, seed=2
    )
    la.fit(_loader(X, y), iterations=3, lr=1e-2)
    state = la.state_dict()
    other = VaLLA(
        model, "classification", X[5:9].clone(), mc_softmax_samples=4, alpha=0.5
    )
    other.load_state_dict(state)
    assert torch.equal(other(X[:5]), la(X[:5]))
    assert other.fit_history_ == la.fit_history_
    la.fit(_loader(X, y), iterations=2, lr=1e-2, override=False)
    other.fit(_loader(X, y), iterations=2, lr=1e-2, override=False)
    assert other.fit_history_["objective"] == la.fit_history_["objective"]
    with pytest.raises(ValueError, match="parameters and buffers differ"):
        VaLLA(_net(3, device, seed=4), "classification", X[:4]).load_state_dict(state)
    with pytest.raises(RuntimeError, match="not fitted"):
        VaLLA(model, "classification", X[:4]).state_dict()


def test_bad_input_is_refused_before_any_work(device):
    model = _net(3, device)
    X, y = _data("classification", device=device)
    Z = X[:4]
    for alpha in (1.5, -0.1, True):
        with pytest.raises(ValueError, match="alpha must be a number in"):
            VaLLA(model, "classification", Z, alpha=alpha)
    with pytest.raises(ValueError, match="needs mc_softmax_samples > 0"):
        VaLLA(model, "classification", Z, alpha=0.5)
    with pytest.raises(ValueError, match="mc_softmax_samples must be >= 0"):
        VaLLA(model, "classification", Z, mc_softmax_samples=-1)
    with pytest.raises(ValueError, match="num_inducing=3 does not match the 4"):
        VaLLA(model, "classification", Z, num_inducing=3)
    with pytest.raises(ValueError, match="give num_inducing"):
        VaLLA(model, "classification", "random")
    with pytest.raises(ValueError, match="or one of"):
        VaLLA(model, "classification", "foo", num_inducing=3)
    with pytest.raises(ValueError, match=r"one entry per inducing input, shape \(4,\)"):
        VaLLA(model, "classification", Z, inducing_classes=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer output coordinates"):
        VaLLA(model, "classification", Z, inducing_classes=torch.zeros(4))
    with pytest.raises(ValueError, match="only with explicit inducing_locations"):
        VaLLA(
            model,
            "classification",
            "random",
            num_inducing=4,
            inducing_classes=torch.zeros(4, dtype=torch.long),
        )
    with pytest.raises(ValueError, match="zero prior mean"):
        VaLLA(model, "classification", Z, prior_mean=1.0)
    with pytest.raises(ValueError, match="scalar prior precision"):
        VaLLA(model, "classification", Z, prior_precision=torch.ones(2))
    with pytest.raises(ValueError, match="prior_precision must be positive"):
        VaLLA(model, "classification", Z, prior_precision=-1.0)
    with pytest.raises(ValueError, match="sigma_noise must be 1"):
        VaLLA(model, "classification", Z, sigma_noise=2.0)
    la = VaLLA(model, "classification", Z, inducing_classes=torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"output coordinates in 0..2; got 3"):
        la.fit(_loader(X, y), iterations=1)
    la = VaLLA(model, "classification", Z)
    with pytest.raises(RuntimeError, match="not fitted"):
        la(X[:2])
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        la.fit(_loader(X, y), iterations=0)
    with pytest.raises(ValueError, match="lr must be a positive finite"):
        la.fit(_loader(X, y), lr=0)
    with pytest.raises(ValueError, match="val_steps must be >= 1"):
        la.fit(_loader(X, y), val_loader=_loader(X, y), val_steps=0)
    with pytest.raises(NotImplementedError, match="marginal likelihood"):
        la.log_marginal_likelihood()
    la.fit(_loader(X, y), iterations=3, lr=0.1)
    # a fit that fails half-way leaves the previous fit as it was
    before = (la(X[:3]), dict(la.fit_history_), la.L.detach().clone())
    bad = X.clone()
    bad[12, 0] = float("nan")
    for override in (True, False):
        with pytest.raises(RuntimeError, match="objective of step 3 is not finite"):
            la.fit(_loader(bad, y), iterations=4, lr=0.1, override=override)
        assert torch.equal(la(X[:3]), before[0]) and la.fit_history_ == before[1]
        assert torch.equal(la.L.detach(), before[2]) and la.fitted
    with pytest.raises(ValueError, match="at least one input"):
        la(X[:0])
    with pytest.raises(ValueError, match="pred_type='nn' is not available"):
        la(X[:2], pred_type="nn")
    with pytest.raises(NotImplementedError, match="no weight-space posterior"):
        la.sample(2)
    reward = VaLLA(_net(1, device), "reward_modeling", "random", num_inducing=2)
    with pytest.raises(ValueError, match="reward-modeling data are pairs"):
        reward.fit(_loader(torch.randn(6, 2, 2).to(X), torch.zeros(6).long()))


def test_reward_models_fit_on_pairs_and_predict_rewards(device):
    """Pairs ``(B, 2, D)`` give pair logits ``(B, 2)`` (the classification
    likelihood of the preference); the inducing outputs are single rewards. The
    objective is the oracle's on the pairs and the rewards' covariance the
    weight-space Gaussian's."""
    torch.manual_seed(0)
    reward = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1), nn.Flatten(-2))
    reward = reward.to(device, torch.float64)
    pairs = torch.randn(12, 2, 3, dtype=torch.float64, device=device)
    prefs = torch.randint(2, (12,), device=device)
    Z = torch.randn(4, 1, 3, dtype=torch.float64, device=device)
    la = VaLLA(reward, "reward_modeling", Z, prior_precision=2.0)
    la.fit(_loader(pairs, prefs, batch_size=4), iterations=1, lr=1e-3)
    Sigma = _weight_covariance(
        reward, Z, torch.zeros(4, dtype=torch.long), torch.eye(4).to(Z), 2.0
    )
    kl = 0.5 * (2.0 * Sigma.trace() - Sigma.shape[0] - torch.logdet(2.0 * Sigma))
    Jb = oracles.jacobian(reward, pairs[:4])  # (4, 2, P)
    var = torch.einsum("ncp,pq,ndq->ncd", Jb, Sigma, Jb).diagonal(dim1=-2, dim2=-1)
    f = reward(pairs[:4]).detach()
    energy = torch.log_softmax(f / torch.sqrt(1 + math.pi / 8 * var), -1)
    energy = energy[torch.arange(4), prefs[:4]].sum()
    expected = -(12 / 4 * energy - kl)
    assert la.fit_history_["objective"][0] == pytest.approx(float(expected), rel=1e-9)
    la.fit(_loader(pairs, prefs, batch_size=4), iterations=5, lr=1e-2)
    single = torch.randn(3, 1, 3, dtype=torch.float64, device=device)
    mean, var = la(single)
    assert mean.shape == (3, 1) and var.shape == (3, 1, 1)
    Zt = la.inducing_locations.detach()
    L = inducing.unpack_tril(la.L.detach(), 4)
    Sigma = _weight_covariance(
        reward,
        Zt,
        torch.zeros(4, dtype=torch.long),
        L,
        float(la.prior_precision.detach()),
    )
    Js = oracles.jacobian(reward, single)
    torch.testing.assert_close(var, torch.einsum("ncp,pq,ndq->ncd", Js, Sigma, Js))
    assert la(pairs[:2], fitting=True).shape == (2, 2)


def test_packed_factors_unpack_row_major_and_refuse_other_sizes():
    packed = torch.arange(1.0, 7.0)
    L = inducing.unpack_tril(packed, 3)
    assert L.tolist() == [[1, 0, 0], [2, 3, 0], [4, 5, 6]]
    assert inducing.packed_size(3) == 6 and isinstance(inducing.packed_size(3), int)
    with pytest.raises(
        ValueError, match=r"3 x 3 lower triangle has 6 entries; .*\(5,\)"
    ):
        inducing.unpack_tril(torch.ones(5), 3)


def _lloyd_fixed_point(X, centres):
    """Every centre with points is their mean."""
    assign = torch.cdist(X, centres).argmin(1)
    for k in range(len(centres)):
        if bool((assign == k).any()):
            torch.testing.assert_close(centres[k], X[assign == k].mean(0))


def test_kmeans_returns_k_centres_at_a_fixed_point_of_lloyds_algorithm():
    g = torch.Generator().manual_seed(0)
    X = torch.rand(12, 2, generator=g, dtype=torch.float64)
    for seed in range(5):
        centres = inducing.kmeans(X, 6, torch.Generator().manual_seed(seed))
        assert centres.shape == (6, 2)
        _lloyd_fixed_point(X, centres)


def test_kmeans_keeps_an_empty_centre_where_it_is():
    """Duplicate points: k-means++ may pick a point twice; the second copy gets no
    points and stays (a data point), instead of moving to the origin."""
    X = torch.tensor([[7.0], [7.0], [7.0], [9.0]], dtype=torch.float64)
    duplicated = 0
    for seed in range(10):
        centres = inducing.kmeans(X, 3, torch.Generator().manual_seed(seed))
        assert centres.shape == (3, 1)
        assert set(centres.flatten().tolist()) <= {7.0, 9.0}
        duplicated += len(set(centres.flatten().tolist())) < 3
    assert duplicated > 0  # the case arose


def test_kmeans_plus_plus_draws_far_points_and_its_own_random_stream():
    X = torch.zeros(101, 1, dtype=torch.float64)
    X[50] = 0.5  # D^2 weighting picks the far point second (or first)
    for seed in range(5):
        start = inducing.kmeans(X, 2, torch.Generator().manual_seed(seed), n_iter=0)
        assert sorted(start.flatten().tolist()) == [0.0, 0.5]
    # the same generator seed, whatever the global stream; the first pick uniform
    Y = torch.rand(40, 1, generator=torch.Generator().manual_seed(1))
    picks = set()
    for seed in range(30):
        torch.manual_seed(seed)
        first = inducing.kmeans(Y, 3, torch.Generator().manual_seed(3), n_iter=0)
        torch.manual_seed(seed + 100)
        again = inducing.kmeans(Y, 3, torch.Generator().manual_seed(3), n_iter=0)
        assert torch.equal(first, again)
        picks.add(
            float(inducing.kmeans(Y, 1, torch.Generator().manual_seed(seed), n_iter=0))
        )
    assert len(picks) > 10  # over all 40 points, not the first D of them
    identical = torch.ones(5, 2, dtype=torch.float64)
    assert torch.equal(
        inducing.kmeans(identical, 3, torch.Generator()),
        torch.ones(3, 2, dtype=torch.float64),
    )


def test_probit_energy_is_one_log_probability_per_datum():
    f = torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]], dtype=torch.float64)
    v = torch.tensor([[1.0, 0.0, 4.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([1, 0])
    energy = inducing.probit_energy(f, v, y)
    assert energy.shape == (2,)
    scaled = f / torch.sqrt(1 + math.pi / 8 * v)
    torch.testing.assert_close(energy, torch.log_softmax(scaled, -1)[[0, 1], [1, 0]])


def test_validation_after_the_last_step_and_strategies_for_many_outputs(device):
    model = _net(2, device)
    X, y = _data("regression", C=2, device=device)
    la = VaLLA(model, "regression", "random", num_inducing=5)
    la.fit(_loader(X, y), iterations=5, lr=1e-2, val_loader=_loader(X, y), val_steps=2)
    assert len(la.fit_history_["val_nll"]) == 3  # after steps 2, 4 and 5
    assert la.inducing_classes.tolist() == [0] * 5
    # reward models: the training outputs are pairs
    torch.manual_seed(0)
    reward = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1), nn.Flatten(-2))
    reward = reward.to(device, torch.float64)
    pairs = torch.randn(8, 2, 3, dtype=torch.float64, device=device)
    rl = VaLLA(reward, "reward_modeling", torch.randn(3, 1, 3).to(pairs))
    rl.fit(_loader(pairs, torch.randint(2, (8,), device=device)), iterations=2)
    assert rl.n_outputs == 2 and rl.state_dict()["n_outputs"] == 2
    J = oracles.jacobian(reward, torch.randn(4, 1, 3).to(pairs))
    assert rl.functional_variance(J).shape == (4, 1, 1)


class UserPoisson(OutputLikelihood):
    """A user's Poisson likelihood: the loss and the output Hessian only."""

    def loss(self, f, y):
        return (f.exp() - y * f + torch.lgamma(y + 1)).sum()

    def hessian(self, f):
        return torch.diag_embed(f.exp())


class UserGaussian(OutputLikelihood):
    """A user's Gaussian with observation noise (``has_noise``)."""

    has_noise = True
    returns_moments = True

    def loss(self, f, y):
        return 0.5 * (f - y).square().sum()

    def hessian(self, f):
        return torch.eye(f.shape[1]).to(f).expand(f.shape[0], -1, -1)

    def predictive(self, f_mu, f_var, link_approx=None, n_samples=100, generator=None):
        return f_mu, f_var

    def log_normalizer(self, sigma_noise, n_data, n_outputs):
        return -n_data * n_outputs * torch.log(sigma_noise * math.sqrt(2 * math.pi))


@pytest.mark.parametrize(
    "likelihood,C,alpha",
    [
        ("poisson", 2, 0.5),
        ("multilabel", 3, 0.0),
        ("binary", 1, 0.5),
        ("user_poisson", 2, 1.0),
        ("user_gaussian", 2, 0.5),
    ],
)
def test_monte_carlo_energies_are_the_sampled_log_likelihoods(
    device, likelihood, C, alpha
):
    """With ``mc_softmax_samples`` the energy is ``(1/alpha) log mean_s p(y |
    f_s)^alpha`` over output samples drawn with the seeded generator: the
    objective of the first step against the dense covariance and
    ``torch.distributions`` log-probabilities of the same samples (a user's
    likelihood through the protocol's ``datum_losses``, its noise included)."""
    model = _net(C, device)
    data_lik = {"user_poisson": "poisson", "user_gaussian": "regression"}
    X, y = _data(data_lik.get(likelihood, likelihood), C=C, device=device)
    lik = {"user_poisson": UserPoisson(), "user_gaussian": UserGaussian()}.get(
        likelihood, likelihood
    )
    sigma = 0.6 if likelihood == "user_gaussian" else 1.0
    Z, S, delta = X[:4].clone(), 7, 2.0
    la = VaLLA(
        model,
        lik,
        Z,
        alpha=alpha,
        mc_softmax_samples=S,
        seed=3,
        prior_precision=delta,
        sigma_noise=sigma,
    )
    la.fit(_loader(X, y), iterations=1, lr=1e-3)
    Sigma = _weight_covariance(
        model, Z, torch.zeros(4, dtype=torch.long), torch.eye(4).to(Z), delta
    )
    kl = 0.5 * (delta * Sigma.trace() - Sigma.shape[0] - torch.logdet(delta * Sigma))
    Jb = oracles.jacobian(model, X[:5])
    var = torch.einsum("ncp,pq,ndq->ncd", Jb, Sigma, Jb)
    f = model(X[:5]).detach()
    generator = torch.Generator(device=device).manual_seed(3)
    samples = links.sample_outputs(f, var, S, generator)  # (S, 5, C)
    targets = y[:5].expand_as(samples)
    if likelihood in ("poisson", "user_poisson"):
        log_p = torch.distributions.Poisson(samples.exp()).log_prob(targets)
    elif likelihood == "user_gaussian":
        log_p = torch.distributions.Normal(samples, sigma).log_prob(targets)
    else:
        log_p = torch.distributions.Bernoulli(logits=samples).log_prob(targets)
    log_p = log_p.sum(-1)
    if alpha == 0:
        energy = log_p.mean(0)
    else:
        energy = (torch.logsumexp(alpha * log_p, 0) - math.log(S)) / alpha
    expected = -(20 / 5 * energy.sum() - kl)
    assert la.fit_history_["objective"][0] == pytest.approx(float(expected), rel=1e-9)


def test_a_users_likelihood_fits_as_the_built_in_it_writes(device):
    """Monte Carlo through the protocol's default ``datum_losses`` (vmap of the
    user's ``loss``) gives the built-in Poisson's trajectory, step for step."""
    model = _net(2, device)
    X, y = _data("poisson", C=2, device=device)
    fits = []
    for lik in ("poisson", UserPoisson()):
        la = VaLLA(model, lik, X[:4].clone(), alpha=0.5, mc_softmax_samples=5)
        la.fit(_loader(X, y), iterations=4, lr=0.05)
        fits.append((la.fit_history_["objective"], la.predictive_moments(X[:3])[1]))
    assert fits[0][0] == pytest.approx(fits[1][0], rel=1e-12)
    torch.testing.assert_close(fits[0][1], fits[1][1])


@pytest.mark.parametrize(
    "likelihood,C", [("binary", 1), ("multilabel", 3), ("poisson", 2)]
)
def test_the_other_likelihoods_fit_from_drawn_inducing_outputs(device, likelihood, C):
    """Inducing outputs drawn by a strategy take the outputs in turn (every output
    gets some), the objective falls, the predictive is the likelihood's and the
    model is left as it was."""
    model = _net(C, device)
    X, y = _data(likelihood, n=40, C=C, device=device)
    before = [p.detach().clone() for p in model.parameters()]
    alpha = 0.0 if likelihood == "poisson" else 1.0
    la = VaLLA(model, likelihood, "random", num_inducing=6, alpha=alpha)
    la.fit(_loader(X, y, batch_size=10), iterations=60, lr=0.05)
    assert la.inducing_classes.tolist() == [m % C for m in range(6)]
    objective = la.fit_history_["objective"]
    assert sum(objective[-8:]) / 8 < sum(objective[:8]) / 8
    pred = la(X[:4])
    if likelihood == "poisson":
        mean, var = pred
        assert mean.shape == (4, C) and bool((mean > 0).all())
    else:
        assert pred.shape == (4, C) and bool(((pred > 0) & (pred < 1)).all())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_exact_closed_forms_are_used_even_with_samples(device):
    """The Poisson energy of alpha = 0 is exact: Monte-Carlo samples do not replace
    it (the probit, an approximation, is replaced: see the classification tests)."""
    model = _net(2, device)
    X, y = _data("poisson", C=2, device=device)
    fits = []
    for samples in (0, 5):
        la = VaLLA(
            model, "poisson", X[:4].clone(), alpha=0.0, mc_softmax_samples=samples
        )
        la.fit(_loader(X, y), iterations=3, lr=0.05)
        fits.append(la.fit_history_["objective"])
    assert fits[0] == fits[1]


def test_likelihoods_without_an_energy_are_refused(device):
    model = _net(2, device)
    Z = torch.randn(4, 2, dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match="heteroscedastic_regression.*eta2 >= 0"):
        VaLLA(model, "heteroscedastic_regression", Z)
    with pytest.raises(ValueError, match="closed-form energy is that of alpha = 0"):
        VaLLA(model, "poisson", Z)  # alpha = 1
    with pytest.raises(ValueError, match="closed-form energy is that of alpha = 1"):
        VaLLA(model, "multilabel", Z, alpha=0.0)
    with pytest.raises(ValueError, match="custom.*no closed-form energy"):
        VaLLA(model, UserPoisson(), Z)
    # with samples, any alpha
    VaLLA(model, "poisson", Z, mc_softmax_samples=2)
    VaLLA(model, UserPoisson(), Z, alpha=0.3, mc_softmax_samples=2)
