"""ELLA (``laplace.functional.ella``) against dense float64 oracles: the exact
linearized Laplace posterior when the basis spans every parameter direction, the
Nyström posterior built from torch.func Jacobians and a dense eigendecomposition
otherwise; and its fit history, tuning, checkpoints and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import ELLA, FunctionalLaplace, Laplace, VaLLA
from laplace.functional import nystrom
from tests import oracles


def _net(C, device, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, C))
    return net.to(device, torch.float64)


def _data(likelihood, n=30, C=3, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 2, generator=g, dtype=torch.float64)
    if likelihood == "classification":
        y = torch.randint(C, (n,), generator=g)
    else:
        y = torch.randn(n, C, generator=g, dtype=torch.float64)
    return X.to(device), y.to(device)


def _loader(X, y, batch_size=7, shuffle=False):
    return DataLoader(TensorDataset(X, y), batch_size=batch_size, shuffle=shuffle)


def _exact_covariance(model, X, likelihood, Xs, delta, h):
    """``J* (h GGN + delta I)^-1 J*^T`` per test input, from torch.func Jacobians."""
    G = oracles.ggn(model, X, likelihood)
    P = h * G + delta * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    Js = oracles.jacobian(model, Xs)
    return torch.einsum("ncp,pq,ndq->ncd", Js, torch.linalg.inv(P), Js)


def _dense_directions(model, X, inputs, coords, k):
    """``V`` of the basis rows by a dense eigendecomposition (any column signs)."""
    J_M = oracles.jacobian(model, X[inputs])[torch.arange(len(inputs)), coords]
    values, vectors = torch.linalg.eigh(J_M @ J_M.T)
    U, lam = vectors.flip(1)[:, :k], values.flip(0)[:k]
    return J_M.T @ U / lam.sqrt()


@pytest.mark.parametrize(
    "likelihood,C,sigma,T,delta",
    [("regression", 1, 0.7, 0.5, 2.5), ("classification", 3, 1.0, 2.0, 0.3)],
)
def test_whole_training_set_and_all_directions_is_the_exact_linearized_gp(
    device, likelihood, C, sigma, T, delta
):
    model = _net(C, device)
    X, y = _data(likelihood, C=C, device=device)
    P = sum(p.numel() for p in model.parameters())
    la = ELLA(
        model,
        likelihood,
        subsample_size=len(X),
        n_eigenvalues=P,
        sigma_noise=sigma,
        temperature=T,
        prior_precision=delta,
    )
    la.fit(_loader(X, y))
    Xs = torch.randn(4, 2, dtype=torch.float64, device=device)
    expected = _exact_covariance(model, X, likelihood, Xs, delta, 1 / (sigma**2 * T))
    mean, var = la.predictive_moments(Xs)
    torch.testing.assert_close(var, expected)
    torch.testing.assert_close(mean, model(Xs).detach())
    # joint: the same per-input blocks, and the cross-covariances of the exact GP
    Js = oracles.jacobian(model, Xs).reshape(4 * C, -1)
    G = oracles.ggn(model, X, likelihood) / (sigma**2 * T)
    joint = Js @ torch.linalg.solve(G + delta * torch.eye(P).to(G), Js.T)
    flat_mean, cov = la.predictive_moments(Xs, joint=True)
    torch.testing.assert_close(cov, joint)
    torch.testing.assert_close(flat_mean, model(Xs).detach().flatten())
    # from explicit Jacobians
    Jx = oracles.jacobian(model, Xs)
    torch.testing.assert_close(la.functional_variance(Jx), expected)
    torch.testing.assert_close(la.functional_covariance(Jx), joint)


@pytest.mark.parametrize("likelihood,C", [("regression", 2), ("classification", 3)])
def test_a_partial_basis_gives_the_nystrom_posterior(device, likelihood, C):
    """With fewer directions than parameters ELLA is the Gaussian posterior over
    the Nyström features: ``J* V (delta I + h V^T GGN V)^-1 V^T J*^T`` with ``V``
    from a dense eigendecomposition of the basis rows' kernel."""
    model = _net(C, device)
    X, y = _data(likelihood, C=C, device=device)
    la = ELLA(model, likelihood, subsample_size=12, n_eigenvalues=6, seed=7)
    la.prior_precision = 1.7
    la.fit(_loader(X, y, batch_size=5))
    inputs = nystrom.basis_inputs(len(X), 12, seed=7)
    coords = nystrom.basis_coordinates(12, C, seed=7)
    V = _dense_directions(model, X, inputs, coords, 6)
    # the same directions up to their signs: the same projection
    torch.testing.assert_close(
        la.dual_directions @ la.dual_directions.T, V @ V.T, rtol=1e-7, atol=1e-9
    )
    G = V.T @ oracles.ggn(model, X, likelihood) @ V
    torch.testing.assert_close(
        la.feature_gram.abs().diagonal(), G.abs().diagonal(), rtol=1e-7, atol=1e-9
    )
    Xs = torch.randn(3, 2, dtype=torch.float64, device=device)
    Phi = oracles.jacobian(model, Xs) @ V
    Sigma = torch.linalg.inv(1.7 * torch.eye(6).to(G) + G)
    expected = Phi @ Sigma @ Phi.mT
    torch.testing.assert_close(la.predictive_moments(Xs)[1], expected)
    L = la.chol_precision
    torch.testing.assert_close(L @ L.T, 1.7 * torch.eye(6).to(G) + la.feature_gram)


def test_the_basis_and_curvature_do_not_depend_on_the_loaders_order(device):
    model = _net(3, device)
    X, y = _data("classification", device=device)
    fits = []
    for batch_size, shuffle in ((3, False), (30, False), (7, True)):
        torch.manual_seed(batch_size)
        la = ELLA(model, "classification", subsample_size=10, n_eigenvalues=4)
        la.fit(_loader(X, y, batch_size, shuffle))
        fits.append((la.dual_directions, la.feature_gram))
    for V, G in fits[1:]:
        torch.testing.assert_close(V, fits[0][0])
        torch.testing.assert_close(G, fits[0][1])


def test_the_classification_predictive_is_the_probit_of_the_gp(device):
    model = _net(3, device)
    X, y = _data("classification", device=device)
    la = ELLA(model, "classification", subsample_size=15, n_eigenvalues=8)
    la.fit(_loader(X, y))
    Xs = X[:4]
    mean, var = la.predictive_moments(Xs)
    kappa = 1 / torch.sqrt(1 + math.pi / 8 * var.diagonal(dim1=-2, dim2=-1))
    torch.testing.assert_close(la(Xs), torch.softmax(mean * kappa, -1))
    torch.testing.assert_close(la(Xs, pred_type="glm"), la(Xs))
    with pytest.raises(ValueError, match="pred_type='nn' is not available"):
        la(Xs, pred_type="nn")
    g = torch.Generator(device=device)
    f = la.functional_samples(Xs, n_samples=5, generator=g.manual_seed(3))
    p = la.predictive_samples(Xs, n_samples=5, generator=g.manual_seed(3))
    assert f.shape == (5, 4, 3)
    torch.testing.assert_close(p, torch.softmax(f, -1))
    # 'nn' draws from the GP too: the same samples
    again = la.functional_samples(
        Xs, pred_type="nn", n_samples=5, generator=g.manual_seed(3)
    )
    torch.testing.assert_close(again, f)
    # joint samples: their covariance over many draws is the joint covariance
    draws = la.functional_samples(
        Xs[:2], n_samples=40000, generator=g.manual_seed(0), joint=True
    )
    flat = draws.reshape(40000, -1)
    _, joint = la.predictive_moments(Xs[:2], joint=True)
    torch.testing.assert_close(flat.T.cov(), joint, atol=0.02, rtol=0.1)


def test_regression_returns_latent_moments_and_scores_with_the_noise(device):
    model = _net(1, device)
    X, y = _data("regression", C=1, device=device)
    la = ELLA(model, "regression", subsample_size=20, n_eigenvalues=8, sigma_noise=0.5)
    val = _loader(X[:10], y[:10])
    la.fit(_loader(X, y), val_loader=val)
    mean, var = la(X[:10])
    assert mean.shape == (10, 1) and var.shape == (10, 1, 1)
    s2 = var[:, 0, 0] + 0.25
    nll = 0.5 * (math.log(2 * math.pi) + s2.log() + (y[:10, 0] - mean[:, 0]) ** 2 / s2)
    assert la.fit_history_["val_nll"] == [pytest.approx(float(nll.mean()), rel=1e-12)]


def test_fit_history_counts_examples_and_scores_every_val_steps(device):
    model = _net(3, device)
    X, y = _data("classification", n=28, device=device)
    val = _loader(X[:8], y[:8])
    la = ELLA(model, "classification", subsample_size=10, n_eigenvalues=4)
    la.fit(_loader(X, y, batch_size=7), val_loader=val, val_steps=2)
    assert la.fit_history_["processed_examples"] == [7.0, 14.0, 21.0, 28.0]
    assert len(la.fit_history_["val_nll"]) == 2 and la.fit_history_["tuning"] == []
    # the last score is that of the fitted posterior
    mean, var = la.predictive_moments(X[:8])
    probs = torch.softmax(
        mean / torch.sqrt(1 + math.pi / 8 * var.diagonal(dim1=-2, dim2=-1)), -1
    )
    nll = -probs[torch.arange(8), y[:8]].log().mean()
    assert la.fit_history_["val_nll"][-1] == pytest.approx(float(nll), rel=1e-12)
    # the first: the posterior of the first two batches
    half = ELLA(model, "classification", subsample_size=10, n_eigenvalues=4)
    half.fit(_loader(X[:14], y[:14], batch_size=7), val_loader=val)
    # the basis is drawn from another data set size: compare the curvature on the
    # same basis instead
    half.dual_directions = la.dual_directions
    Phi = oracles.jacobian(model, X[:14]) @ la.dual_directions
    f = model(X[:14]).detach()
    H = oracles.output_hessian("classification", f)
    half.feature_gram = torch.einsum("nck,ncd,ndl->kl", Phi, H, Phi)
    half._posterior_cache = None
    assert half.n_data == 14
    assert half._validation_nll(val) == pytest.approx(la.fit_history_["val_nll"][0])
    assert la.n_data == 28 and la.n_outputs == 3


def test_grid_search_rescales_without_refitting_and_records_every_candidate(
    device, capsys
):
    model = _net(3, device)
    X, y = _data("classification", device=device)
    val = _loader(X[20:], y[20:])
    la = ELLA(model, "classification", subsample_size=15, n_eigenvalues=6)
    la.fit(_loader(X[:20], y[:20]))
    V, G = la.dual_directions.clone(), la.feature_gram.clone()
    la.optimize_prior_precision(val_loader=val, grid_size=5)
    assert torch.equal(la.dual_directions, V) and torch.equal(la.feature_gram, G)
    tuning = la.fit_history_["tuning"]
    grid = torch.logspace(-4, 4, 5).tolist()
    assert [t["prior_precision"] for t in tuning] == pytest.approx(grid)
    assert all(t["sigma_noise"] == 1.0 for t in tuning)
    best = min(tuning, key=lambda t: t["val_nll"])
    assert float(la.prior_precision) == pytest.approx(best["prior_precision"])
    # each score is that of the posterior at that prior
    for t in tuning:
        la.prior_precision = t["prior_precision"]
        assert la._validation_nll(val) == pytest.approx(t["val_nll"], rel=1e-10)
    # a second run appends; verbose prints the choice (laplace-torch refuses it)
    la.optimize_hyperparameters(val, [0.5, 2.0])
    assert len(la.fit_history_["tuning"]) == 7
    la.optimize_prior_precision(val_loader=val, grid_size=2, verbose=True)
    assert capsys.readouterr().out.startswith("Optimized prior precision")
    assert len(la.fit_history_["tuning"]) == 9


def test_regression_tunes_prior_and_noise_pairs(device):
    model = _net(1, device)
    X, y = _data("regression", C=1, device=device)
    la = ELLA(model, "regression", subsample_size=15, n_eigenvalues=6)
    la.fit(_loader(X[:20], y[:20]))
    val = _loader(X[20:], y[20:])
    grid = [(p, s) for p in (0.1, 1.0, 10.0) for s in (0.3, 1.0, 3.0)]
    la.optimize_hyperparameters(val, grid)
    scores = {
        (t["prior_precision"], t["sigma_noise"]): t["val_nll"]
        for t in la.fit_history_["tuning"]
    }
    best = min(scores, key=scores.get)
    assert (float(la.prior_precision), float(la.sigma_noise)) == pytest.approx(best)
    la.prior_precision, la.sigma_noise = 10.0, 0.3
    assert la._validation_nll(val) == pytest.approx(scores[(10.0, 0.3)], rel=1e-10)
    # a number keeps the current noise, also after a pair in the same grid
    la.optimize_hyperparameters(val, [1.0])
    assert float(la.sigma_noise) == pytest.approx(0.3)
    la.optimize_hyperparameters(val, [(1.0, 3.0), 2.0])
    assert la.fit_history_["tuning"][-1]["sigma_noise"] == pytest.approx(0.3)


def test_state_dict_restores_the_posterior_of_the_same_model(device):
    model = _net(3, device)
    X, y = _data("classification", device=device)
    la = ELLA(model, "classification", subsample_size=12, n_eigenvalues=5)
    la.fit(_loader(X, y), val_loader=_loader(X[:5], y[:5]))
    la.prior_precision = 3.0
    state = la.state_dict()
    assert "chol_precision" not in state
    assert state["prior_precision"].shape == (1,) and state["cls_name"] == "ELLA"
    other = ELLA(model, "classification", subsample_size=20, n_eigenvalues=2, seed=9)
    other.load_state_dict(state)
    assert (other.subsample_size, other.n_eigenvalues, other.seed) == (12, 5, 1234)
    assert torch.equal(other(X[:4]), la(X[:4]))
    assert other.fit_history_ == la.fit_history_ and other.n_data == 30
    torch.save(state, buffer := __import__("io").BytesIO())
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["n_eigenvalues"] == 5
    # another model's weights, another architecture, another likelihood
    changed = _net(3, device, seed=5)
    with pytest.raises(ValueError, match="parameters and buffers differ"):
        ELLA(changed, "classification", 12, 5).load_state_dict(state)
    with pytest.raises(ValueError, match="module structure differ"):
        ELLA(
            nn.Sequential(nn.Linear(2, 3)).to(device, torch.float64),
            "classification",
            12,
            5,
        ).load_state_dict(state)
    with pytest.raises(ValueError, match="likelihood='classification'"):
        ELLA(model, "regression", 12, 5).load_state_dict(state)
    with pytest.raises(ValueError, match="is of a ELLA, not of a VaLLA"):
        VaLLA(model, "classification", X[:3]).load_state_dict(state)


def test_the_model_is_left_as_it_was(device):
    model = _net(3, device)
    X, y = _data("classification", device=device)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    la = ELLA(model, "classification", subsample_size=10, n_eigenvalues=4)
    la.fit(_loader(X, y), val_loader=_loader(X, y))
    la.optimize_prior_precision(val_loader=_loader(X, y), grid_size=3)
    la(X[:3])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())


def test_dict_batches_and_reward_pairs(device):
    from tests.models import DictModel

    torch.manual_seed(0)
    model = DictModel(3, 2).to(device, torch.float64)
    x = torch.randn(12, 3, dtype=torch.float64, device=device)
    batches = [
        {
            "input_ids": x[i : i + 4],
            "scale": torch.ones(4, 1).to(x),
            "labels": torch.arange(4, device=device) % 2,
        }
        for i in range(0, 12, 4)
    ]

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 12

        def __getitem__(self, i):
            b = batches[i // 4]
            return {k: v[i % 4] for k, v in b.items()}

    loader = DataLoader(Rows(), batch_size=4)
    la = ELLA(model, "classification", subsample_size=8, n_eigenvalues=4)
    la.fit(loader)
    probs = la(batches[0])
    assert probs.shape == (4, 2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4).to(probs))

    # reward modeling: pairs (batch, 2, dim) -> pair logits, rewards on (batch, dim)
    torch.manual_seed(0)
    reward = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1), nn.Flatten(-2))
    reward = reward.to(device, torch.float64)
    pairs = torch.randn(20, 2, 3, dtype=torch.float64, device=device)
    prefs = torch.randint(2, (20,), device=device)
    la = ELLA(reward, "reward_modeling", subsample_size=20, n_eigenvalues=16)
    la.fit(_loader(pairs, prefs, batch_size=6))
    single = torch.randn(5, 3, dtype=torch.float64, device=device)

    class Single(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = reward

        def forward(self, x):
            return self.net(x[:, None]).reshape(-1, 1)

    mean, var = la(single[:, None])
    # exact: the GGN of the pairs' softmax likelihood, all 16 directions spanned
    G = oracles.ggn(reward, pairs, "classification")
    cov_w = torch.linalg.inv(G + torch.eye(16).to(G))
    Js = oracles.jacobian(Single(), single)
    torch.testing.assert_close(
        var.reshape(5), torch.einsum("ncp,pq,ncq->n", Js, cov_w, Js)
    )
    probs = la(pairs[:3], fitting=True)
    assert probs.shape == (3, 2)


def test_enable_backprop_differentiates_the_predictive_in_the_inputs(device):
    model = _net(1, device)
    X, y = _data("regression", C=1, device=device)
    la = ELLA(model, "regression", 20, 8, enable_backprop=True)
    la.fit(_loader(X, y))
    xs = torch.randn(2, 2, dtype=torch.float64, device=device, requires_grad=True)
    mean, var = la(xs)
    (grad,) = torch.autograd.grad(var.sum() + mean.sum(), xs)

    def value(z):
        Jz = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (z,)))(
            dict(model.named_parameters())
        )
        J = torch.cat([v.reshape(z.shape[0], 1, -1) for v in Jz.values()], -1)
        Phi = J @ la.dual_directions.detach()
        L = la.chol_precision.detach()
        W = torch.linalg.solve_triangular(L, Phi[:, 0].T, upper=False)
        return W.square().sum() + model(z).sum()

    torch.testing.assert_close(grad, torch.func.grad(value)(xs.detach()))


def test_bad_input_is_refused_before_any_work(device):
    model = _net(3, device)
    X, y = _data("classification", n=12, device=device)
    with pytest.raises(ValueError, match="n_eigenvalues must be between 1 and 5"):
        ELLA(model, "classification", subsample_size=5, n_eigenvalues=6)
    with pytest.raises(ValueError, match="n_eigenvalues must be between 1"):
        ELLA(model, "classification", subsample_size=5, n_eigenvalues=0)
    with pytest.raises(ValueError, match="zero prior mean"):
        ELLA(model, "classification", 5, 2, prior_mean=1.0)
    for n in (2, 21):  # any length, before the base's message on lengths
        with pytest.raises(ValueError, match=f"scalar prior precision .* got {n}"):
            ELLA(model, "classification", 5, 2, prior_precision=torch.ones(n))
    with pytest.raises(ValueError, match="sigma_noise must be 1"):
        ELLA(model, "classification", 5, 2, sigma_noise=2.0)
    with pytest.raises(ValueError, match="energy is that of alpha = 1"):
        VaLLA(model, "multilabel", torch.zeros(2, 2).to(X), alpha=0.5)
    la = ELLA(model, "classification", subsample_size=13, n_eigenvalues=2)
    with pytest.raises(ValueError, match="subsample_size=13 exceeds the 12"):
        la.fit(_loader(X, y))
    with pytest.raises(RuntimeError, match="not fitted"):
        la(X)
    with pytest.raises(RuntimeError, match="not fitted"):
        la.predictive_moments(X)
    with pytest.raises(RuntimeError, match="not fitted"):
        la.state_dict()
    with pytest.raises(NotImplementedError, match="marginal likelihood"):
        la.log_marginal_likelihood()
    with pytest.raises(NotImplementedError, match="training log likelihood"):
        la.log_likelihood  # noqa: B018
    # 12 rows of a 13-parameter model at 6 distinct inputs: rank 6
    Xd = X[:6].repeat(2, 1)
    la = ELLA(_net(1, device), "regression", subsample_size=12, n_eigenvalues=7)
    with pytest.raises(ValueError, match="rank-deficient: it has 6 positive"):
        la.fit(_loader(Xd, torch.zeros(12, 1).to(Xd)))
    assert la.dual_directions is None and not la.fitted
    with pytest.raises(
        ValueError, match="balanced=True .* likelihood='classification'"
    ):
        ELLA(_net(1, device), "regression", 5, 2).fit(
            _loader(*_data("regression", C=1, device=device)), balanced=True
        )
    # a refit that fails half-way leaves the previous fit as it was
    la = ELLA(model, "classification", subsample_size=8, n_eigenvalues=3)
    la.fit(_loader(X, y, batch_size=4))
    before = (la(X[:3]), la.fit_history_, la.n_data)
    bad = X.clone()
    bad[9, 0] = float("nan")  # the basis (seeded) avoids it; the curvature does not
    assert 9 not in nystrom.basis_inputs(12, 8, seed=1234).tolist()
    with pytest.raises(RuntimeError, match="not finite"):
        la.fit(_loader(bad, y, batch_size=4), val_loader=_loader(X, y))
    assert torch.equal(la(X[:3]), before[0])
    assert la.fit_history_ is before[1] and la.n_data == before[2] and la.fitted
    with pytest.raises(ValueError, match="val_steps must be >= 1"):
        la.fit(_loader(X, y), val_loader=_loader(X, y), val_steps=0)
    la.fit(_loader(X, y), balanced=True)
    with pytest.raises(ValueError, match="at least one input"):
        la(X[:0])
    with pytest.raises(NotImplementedError, match="no marginal likelihood"):
        la.optimize_prior_precision(method="marglik")
    with pytest.raises(NotImplementedError, match="takes no n_steps"):
        la.optimize_prior_precision(val_loader=_loader(X, y), n_steps=5)
    with pytest.raises(ValueError, match="needs a val_loader"):
        la.optimize_prior_precision()
    with pytest.raises(ValueError, match="pred_type='nn' is not available"):
        la.optimize_prior_precision(pred_type="nn", val_loader=_loader(X, y))
    with pytest.raises(ValueError, match="grid is empty"):
        la.optimize_hyperparameters(_loader(X, y), [])
    with pytest.raises(ValueError, match="pairs tune the noise of regression"):
        la.optimize_hyperparameters(_loader(X, y), [(1.0, 2.0)])
    with pytest.raises(ValueError, match="jacobians must have shape"):
        la.functional_variance(torch.zeros(2, 3, 5, dtype=torch.float64))


def test_the_factory_routes_functional_approximations(device):
    model = _net(3, device)
    Z = torch.randn(3, 2, dtype=torch.float64, device=device)
    la = Laplace(
        model,
        "classification",
        "all",
        "gp",
        functional_approximation="nystrom",
        subsample_size=6,
        n_eigenvalues=4,
    )
    assert type(la) is ELLA and la.subsample_size == 6
    la = Laplace(
        model,
        "classification",
        "all",
        "gp",
        functional_approximation="variational",
        inducing_locations=Z,
    )
    assert type(la) is VaLLA and la.num_inducing == 3
    assert type(Laplace(model, "classification", "all", "gp", n_subset=5)) is (
        FunctionalLaplace
    )
    with pytest.raises(ValueError, match="subset_of_weights='all'"):
        Laplace(
            model,
            "classification",
            "last_layer",
            "gp",
            functional_approximation="nystrom",
            subsample_size=6,
            n_eigenvalues=4,
        )
    with pytest.raises(ValueError, match="a method of hessian_structure='gp'"):
        Laplace(
            model, "classification", "all", "full", functional_approximation="nystrom"
        )
    with pytest.raises(ValueError, match="functional_approximation"):
        Laplace(model, "classification", "all", "gp", functional_approximation="x")
    with pytest.raises(TypeError, match="subsample_size"):
        Laplace(
            model, "classification", "all", "gp", functional_approximation="nystrom"
        )


class _Scaled(nn.Module):
    """A parameter no factored rule serves: explicit Jacobians."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(2))
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        return self.head(torch.tanh(x * self.scale))


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.layer(x).mean(1))


@pytest.mark.parametrize("likelihood", ["binary", "multilabel", "poisson"])
def test_the_other_likelihoods_give_their_exact_linearized_gp(device, likelihood):
    """ELLA takes any likelihood with an output Hessian: with the whole training
    set and every direction, ``J* (GGN + delta I)^-1 J*^T`` with the likelihood's
    closed-form ``Lambda``; its predictive and validation score are the
    likelihood's."""
    from laplace.likelihood import get_likelihood

    C = 1 if likelihood == "binary" else 2
    model = _net(C, device)
    g = torch.Generator().manual_seed(2)
    X = torch.randn(30, 2, generator=g, dtype=torch.float64).to(device)
    if likelihood == "poisson":
        y = torch.poisson(torch.full((30, C), 2.0), generator=g).to(X)
    else:
        y = torch.randint(2, (30, C), generator=g).to(X)
    if likelihood == "binary":
        y = y[:, 0]
    P = sum(p.numel() for p in model.parameters())
    la = ELLA(
        model, likelihood, subsample_size=30, n_eigenvalues=P, prior_precision=0.7
    )
    la.fit(_loader(X, y), val_loader=_loader(X[:10], y[:10]))
    lik = get_likelihood(likelihood)
    J = oracles.jacobian(model, X)
    Lam = lik.hessian(model(X).detach())
    G = torch.einsum("ncp,ncd,ndq->pq", J, Lam, J)
    Sigma = torch.linalg.inv(G + 0.7 * torch.eye(P).to(G))
    Xs = torch.randn(4, 2, dtype=torch.float64, device=device)
    Js = oracles.jacobian(model, Xs)
    expected = torch.einsum("ncp,pq,ndq->ncd", Js, Sigma, Js)
    mean, var = la.predictive_moments(Xs)
    torch.testing.assert_close(var, expected)
    # the predictive is the likelihood's, from the GP's moments
    marginal = var if likelihood == "poisson" else var.diagonal(dim1=-2, dim2=-1)
    expected_prediction = lik.predictive(mean, marginal)
    if likelihood == "poisson":  # (mean, variance) of the rates
        torch.testing.assert_close(la(Xs)[0], expected_prediction[0])
        torch.testing.assert_close(la(Xs)[1], expected_prediction[1])
    else:
        torch.testing.assert_close(la(Xs), expected_prediction)
    metric = lik.default_metric()
    m10, v10 = la.predictive_moments(X[:10])
    v10 = v10 if likelihood == "poisson" else v10.diagonal(dim1=-2, dim2=-1)
    prediction = lik.predictive(m10, v10)
    metric.update(*lik.metric_inputs(prediction, metric, la.sigma_noise), y[:10])
    assert la.fit_history_["val_nll"] == [pytest.approx(float(metric.compute()))]
    la.optimize_prior_precision(val_loader=_loader(X[:10], y[:10]), grid_size=3)
    assert len(la.fit_history_["tuning"]) == 3


@pytest.mark.parametrize("kind", ["mlp", "cnn", "explicit", "transformer"])
def test_projections_of_factored_jacobians_equal_the_dense_ones(device, kind):
    """``kernel.project`` (``J V`` from layer inputs and output gradients) and
    ``kernel.selected_rows`` (one output's row per datum) against torch.func."""
    from laplace.functional import kernel
    from tests.models import cnn, mlp

    torch.manual_seed(0)
    model, x = {
        "mlp": lambda: (mlp(3, 5, 3), torch.randn(5, 3)),
        "cnn": lambda: (cnn(3), torch.randn(5, 2, 6, 6)),
        "explicit": lambda: (_Scaled(), torch.randn(5, 2)),
        "transformer": lambda: (_Encoder(), torch.randn(5, 3, 4)),
    }[kind]()
    model = model.to(device, torch.float64).eval()
    x = x.to(device, torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]
    _, X = kernel.jacobian_set(model, params, x)
    J = oracles.jacobian(model, x)
    V = torch.randn(J.shape[-1], 4, dtype=torch.float64, device=device)
    torch.testing.assert_close(kernel.project(X, V, params), J @ V)
    outputs = torch.tensor([2, 0, 1, 1, 2], device=device)
    torch.testing.assert_close(
        kernel.selected_rows(X, outputs, params), J[torch.arange(5), outputs]
    )


def test_validation_scores_the_last_batch_and_each_output_on_its_own(device):
    """laplace-torch's rules: a score every ``val_steps`` batches and after the
    last; regression scores each output by its own variance (plus the noise)."""
    model = _net(2, device)
    X, y = _data("regression", n=24, C=2, device=device)
    la = ELLA(model, "regression", subsample_size=10, n_eigenvalues=6, sigma_noise=0.8)
    val = _loader(X[:9], y[:9])
    la.fit(_loader(X, y, batch_size=8), val_loader=val, val_steps=2)  # 3 batches
    assert len(la.fit_history_["val_nll"]) == 2
    mean, var = la.predictive_moments(X[:9])
    s2 = var.diagonal(dim1=-2, dim2=-1) + 0.64
    nll = 0.5 * (math.log(2 * math.pi) + s2.log() + (y[:9] - mean) ** 2 / s2)
    assert la.fit_history_["val_nll"][-1] == pytest.approx(
        float(nll.sum(-1).mean()), rel=1e-12
    )
    # explicit Jacobians of any number of outputs (reward models: one reward)
    J = oracles.jacobian(model, X[:3])[:, :1]
    assert la.functional_variance(J).shape == (3, 1, 1)
    assert la.functional_covariance(J).shape == (3, 3)
