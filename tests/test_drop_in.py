"""laplace-torch 0.3 members and behaviours: functional samples, predictive keyword
arguments, ``fitting``, GP moments, grid base, subnetwork samples, ``Kinv``, argument
checks and the Hugging Face last layer. Each is checked against a dense oracle."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parameters_to_vector
from torch.utils.data import DataLoader, TensorDataset

import oracles
from laplace import (
    FunctionalLaplace,
    FunctionalLLLaplace,
    Laplace,
    LowRankLaplace,
)
from laplace.curvature import BackPackGGN

DTYPE = torch.float64


class Scaled(nn.Module):
    """An MLP whose forward takes a keyword argument."""

    def __init__(self, n_out=2):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 5), nn.Tanh())
        self.head = nn.Linear(5, n_out)

    def forward(self, x, shift=0.0):
        return self.head(self.body(x + shift))


def _data(likelihood, n=16, n_out=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g, dtype=DTYPE)
    if likelihood == "classification":
        y = torch.randint(0, n_out, (n,), generator=g)
    else:
        y = torch.randn(n, n_out, generator=g, dtype=DTYPE)
    return X, y


def _fitted(likelihood, subset, structure, device, **kwargs):
    torch.manual_seed(0)
    model = Scaled().to(device, DTYPE)
    X, y = _data(likelihood)
    la = Laplace(model, likelihood, subset, structure, **kwargs)
    la.fit(DataLoader(TensorDataset(X.to(device), y.to(device)), batch_size=8))
    return la, model


CASES = [
    ("all", "full", {}),
    ("all", "diag", {}),
    ("all", "kron", {}),
    ("last_layer", "full", {}),
    ("last_layer", "kron", {}),
    ("subnetwork", "full", {"subnetwork_indices": torch.tensor([0, 3, 20, 29, 31])}),
    ("all", "gp", {"n_subset": 16}),
]


def _glm_moments(la, x):
    """The GLM (or GP) output moments by the class's own documented formula on
    dense Jacobians (the oracle's), ``f_var = J Sigma J^T``."""
    if la.likelihood.value == "regression":
        return la(x, pred_type="gp" if hasattr(la, "n_subset") else "glm")
    f_mu, f_var = la._glm_distribution(x, False, False)
    return f_mu, f_var


@pytest.mark.parametrize(("subset", "structure", "kwargs"), CASES)
def test_functional_samples_have_the_glm_moments(subset, structure, kwargs, device):
    la, model = _fitted("regression", subset, structure, device, **kwargs)
    x = torch.randn(3, 3, dtype=DTYPE, device=device)
    f_mu, f_var = _glm_moments(la, x)
    n = 40000
    g = torch.Generator(device=device).manual_seed(1)
    f = la.functional_samples(x, n_samples=n, generator=g)
    assert f.shape == (n, 3, 2)
    # mean: 5 standard errors; covariance: within 5% of the largest variance
    sd = f_var.diagonal(dim1=-2, dim2=-1).sqrt()
    assert ((f.mean(0) - f_mu).abs() <= 5 * sd / n**0.5).all()
    centred = f - f.mean(0)
    cov = torch.einsum("snc,snd->ncd", centred, centred) / (n - 1)
    torch.testing.assert_close(cov, f_var, atol=0.05 * float(f_var.max()), rtol=0)
    # reproducible with a generator
    again = la.functional_samples(
        x, n_samples=5, generator=torch.Generator(device=device).manual_seed(7)
    )
    torch.testing.assert_close(
        again,
        la.functional_samples(
            x, n_samples=5, generator=torch.Generator(device=device).manual_seed(7)
        ),
    )


def test_functional_samples_glm_moments_match_the_dense_oracle(device):
    la, model = _fitted("regression", "all", "full", device)
    x = torch.randn(2, 3, dtype=DTYPE, device=device)
    J = oracles.jacobian(model, x)
    f_var = J @ la.posterior_covariance @ J.mT
    n = 40000
    f = la.functional_samples(
        x, n_samples=n, generator=torch.Generator(device=device).manual_seed(0)
    )
    centred = f - model(x).detach()
    cov = torch.einsum("snc,snd->ncd", centred, centred) / n
    torch.testing.assert_close(cov, f_var, atol=0.05 * float(f_var.max()), rtol=0)


def test_joint_functional_samples_have_the_joint_covariance(device):
    la, model = _fitted("regression", "all", "full", device)
    x = torch.randn(2, 3, dtype=DTYPE, device=device)
    J = oracles.jacobian(model, x).reshape(4, -1)
    cov_oracle = J @ la.posterior_covariance @ J.T
    n = 40000
    f = la.functional_samples(
        x,
        n_samples=n,
        joint=True,
        generator=torch.Generator(device=device).manual_seed(0),
    )
    assert f.shape == (n, 2, 2)
    centred = (f - model(x).detach()).reshape(n, 4)
    cov = centred.T @ centred / n
    torch.testing.assert_close(
        cov, cov_oracle, atol=0.05 * float(cov_oracle.max()), rtol=0
    )


@pytest.mark.parametrize(("subset", "structure", "kwargs"), CASES[:-1])
def test_nn_functional_samples_are_the_network_at_weight_samples(
    subset, structure, kwargs, device
):
    la, model = _fitted("classification", subset, structure, device, **kwargs)
    x = torch.randn(3, 3, dtype=DTYPE, device=device)
    f = la.functional_samples(
        x,
        pred_type="nn",
        n_samples=4,
        generator=torch.Generator(device=device).manual_seed(3),
    )
    thetas = la.sample(4, generator=torch.Generator(device=device).manual_seed(3))
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    if subset == "last_layer":
        names, params = (
            ["head.weight", "head.bias"],
            [model.head.weight, model.head.bias],
        )
    for s, theta in enumerate(thetas):
        weights, start = {}, 0
        for n, p in zip(names, params):
            weights[n] = theta[start : start + p.numel()].view(p.shape)
            start += p.numel()
        torch.testing.assert_close(f[s], functional_call(model, weights, (x,)))
    # the predictive samples are their softmax (classification)
    ps = la.predictive_samples(
        x,
        pred_type="nn",
        n_samples=4,
        generator=torch.Generator(device=device).manual_seed(3),
    )
    torch.testing.assert_close(ps, torch.softmax(f, -1))


def test_monte_carlo_expectation_as_in_laplace_torch_example(device):
    """laplace-torch's expectation example: E[h(f)] by Monte Carlo over functional
    samples; for h = identity it is the GLM mean, for h = f^2 mean^2 + var."""
    la, model = _fitted("classification", "last_layer", "kron", device)
    la.optimize_prior_precision()
    x = torch.randn(4, 3, dtype=DTYPE, device=device)
    f_mu, f_var = la._glm_distribution(x, False, True)
    f = la.functional_samples(
        x,
        pred_type="glm",
        n_samples=40000,
        generator=torch.Generator(device=device).manual_seed(0),
    )
    second = (f**2).mean(0)
    torch.testing.assert_close(second, f_mu**2 + f_var, rtol=0.05, atol=0.01)
    probs = torch.softmax(f, -1).mean(0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, dtype=DTYPE, device=device))


# -- predictive keyword arguments, fitting --------
@pytest.mark.parametrize(("subset", "structure", "kwargs"), CASES)
def test_model_kwargs_reach_the_forward(subset, structure, kwargs, device):
    """``la(x, shift=s)`` runs ``model(x, shift=s)``, i.e. ``model(x + s)``: both
    predictives equal those at ``x + s``."""
    la, model = _fitted("regression", subset, structure, device, **kwargs)
    x = torch.randn(3, 3, dtype=DTYPE, device=device)
    for a, b in zip(la(x, shift=0.5), la(x + 0.5)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(la(x, shift=0.5)[0], model(x + 0.5).detach())
    if structure != "gp":
        g = torch.Generator(device=device).manual_seed(0)
        got = la(x, pred_type="nn", link_approx="mc", generator=g, shift=0.5)
        g = torch.Generator(device=device).manual_seed(0)
        expected = la(x + 0.5, pred_type="nn", link_approx="mc", generator=g)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b)


def test_fitting_makes_reward_modeling_predict_pairs(device):
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))

        def forward(self, x):
            return self.f(x).squeeze(-1) if x.ndim == 3 else self.f(x)

    torch.manual_seed(0)
    model = Pair().to(device, DTYPE)
    Xp = torch.randn(12, 2, 3, dtype=DTYPE, device=device)
    yp = torch.randint(0, 2, (12,), device=device)
    la = Laplace(model, "reward_modeling", "all", "full")
    la.fit(DataLoader(TensorDataset(Xp, yp), batch_size=6))
    probs = la(Xp[:3], fitting=True)  # classification of pairs
    f_mu, f_var = la._glm_distribution(Xp[:3], False, True)
    kappa = 1 / torch.sqrt(1 + torch.pi / 8 * f_var)
    torch.testing.assert_close(probs, torch.softmax(kappa * f_mu, -1))
    mu, var = la(Xp[0])  # regression on items
    assert mu.shape == (2, 1) and var.shape == (2, 1, 1)
    # predictive samples: softmax with fitting, raw otherwise
    g = lambda: torch.Generator(device=device).manual_seed(0)  # noqa: E731
    fs = la.functional_samples(Xp[:3], n_samples=3, generator=g())
    ps = la.predictive_samples(Xp[:3], n_samples=3, generator=g(), fitting=True)
    torch.testing.assert_close(ps, torch.softmax(fs, -1))


def test_fitting_does_not_change_other_likelihoods(device):
    la, _ = _fitted("regression", "all", "full", device)
    x = torch.randn(3, 3, dtype=DTYPE, device=device)
    for a, b in zip(la(x, fitting=True), la(x)):
        torch.testing.assert_close(a, b)


def test_reward_modeling_accepts_pairs_in_any_input_shape(device):
    """laplace-torch fits any input the model maps to pair logits (e.g. flattened
    pairs ``(batch, 2 * dim)``)."""

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))

        def forward(self, x):
            if x.ndim == 3 or x.shape[-1] == 6:
                return self.f(x.reshape(-1, 2, 3)).squeeze(-1)
            return self.f(x)

    torch.manual_seed(0)
    Xp = torch.randn(12, 2, 3, dtype=DTYPE, device=device)
    yp = torch.randint(0, 2, (12,), device=device)
    fitted = []
    for X in (Xp, Xp.reshape(12, 6)):
        torch.manual_seed(0)
        la = Laplace(Flat().to(device, DTYPE), "reward_modeling", "all", "full")
        la.fit(DataLoader(TensorDataset(X, yp), batch_size=6))
        fitted.append(la)
    torch.testing.assert_close(fitted[0].H, fitted[1].H)


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_reward_modeling_gridsearch_is_the_pair_nll_argmin(structure, device):
    """laplace-torch tunes reward modeling on its validation pairs as the
    classification it was fitted with: a loss gets the probabilities of the pairs
    (``la(x, fitting=True)``, ``(N, 2)``) and the default is the running NLL. The
    chosen value is the argmin of that NLL, computed by brute force over the grid
    with the public predictive."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1), nn.Flatten(start_dim=1)
    ).to(device, DTYPE)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, generator=g, dtype=DTYPE)
    X = torch.randn(64, 2, 3, generator=g, dtype=DTYPE)
    Xv = torch.randn(16, 2, 3, generator=g, dtype=DTYPE)
    y, yv = [((x @ w)[:, 1] > (x @ w)[:, 0]).long() for x in (X, Xv)]
    yv[:4] = 1 - yv[:4]  # some validation pairs the model gets wrong
    X, y, Xv, yv = X.to(device), y.to(device), Xv.to(device), yv.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    la = Laplace(model, "reward_modeling", "all", structure)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=16))
    val_loader = DataLoader(TensorDataset(Xv, yv), batch_size=8)
    grid = torch.logspace(-4, 4, 21, dtype=DTYPE)
    nll = []
    for prec in grid:
        la.prior_precision = prec.item()
        probs = la(Xv, fitting=True)
        nll.append(-probs[torch.arange(16), yv].log().mean().item())
    expected = grid[torch.tensor(nll).argmin()]
    seen = []

    def loss(probs, targets):
        seen.append(probs.shape)
        return nn.functional.nll_loss(probs.log(), targets)

    for kwargs in ({}, {"loss": loss}):
        la.optimize_prior_precision(
            method="gridsearch", val_loader=val_loader, grid_size=21, **kwargs
        )
        torch.testing.assert_close(la.prior_precision, expected.to(device).expand(1))
    assert seen[0] == (16, 2)
    if structure != "kron":  # an interior optimum: neither end of the grid
        assert 0 < torch.tensor(nll).argmin() < 20


# -- GP members --------
@pytest.mark.parametrize("cls", [FunctionalLaplace, FunctionalLLLaplace])
def test_gp_default_backend_and_predictive_moments(cls, device):
    assert cls.__init__.__defaults__ is not None
    torch.manual_seed(0)
    model = Scaled().to(device, DTYPE)
    X, y = _data("classification")
    la = cls(model, "classification", n_subset=16)
    assert la._backend_cls is BackPackGGN
    la.fit(DataLoader(TensorDataset(X.to(device), y.to(device)), batch_size=8))
    x = torch.randn(3, 3, dtype=DTYPE, device=device)
    f_mu, f_var = la.predictive_moments(x)
    torch.testing.assert_close(f_mu, model(x).detach())
    params = la.params
    J = oracles.jacobian(model, x)
    if cls is FunctionalLLLaplace:
        J = J[..., -sum(p.numel() for p in params) :]
    torch.testing.assert_close(f_var, la.functional_variance(J))
    mu_j, cov_j = la.predictive_moments(x, joint=True)
    torch.testing.assert_close(mu_j, f_mu.flatten())
    torch.testing.assert_close(cov_j, la.functional_covariance(J))
    with pytest.raises(NotImplementedError, match="functional_samples"):
        la.sample(2)


def test_gp_with_dict_batches_under_the_default_backend(device):
    class DictModel(Scaled):
        def forward(self, batch):
            return super().forward(batch["input_ids"])

    torch.manual_seed(0)
    model = DictModel().to(device, DTYPE)
    X, y = _data("regression")

    la = FunctionalLaplace(model, "regression", n_subset=8)
    ds = [{"input_ids": X[i].to(device), "labels": y[i].to(device)} for i in range(16)]
    la.fit(DataLoader(ds, batch_size=8))
    f_mu, f_var = la({"input_ids": X[:2].to(device)})
    torch.testing.assert_close(f_mu, model({"input_ids": X[:2].to(device)}).detach())


# -- tuning grid base, subnetwork, low rank, posterior precision --------
def test_gridsearch_uses_the_grid_base(device):
    """The grid is ``base ** linspace(min, max, grid_size)``: with a loss whose
    minimum is at the prior precision 2.5, base 2 picks 2 (of 1/8 ... 8) where base
    10 would pick 1 (of 1e-3 ... 1e3)."""
    la, _ = _fitted("regression", "all", "diag", device)
    X, y = _data("regression", seed=5)
    val = DataLoader(TensorDataset(X.to(device), y.to(device)), batch_size=8)

    def loss(pred, target):
        return abs(float(la.prior_precision.log()) - float(torch.tensor(2.5).log()))

    for base, expected in ((2.0, 2.0), (10.0, 1.0)):
        la.optimize_prior_precision(
            method="gridsearch",
            val_loader=val,
            loss=loss,
            log_prior_prec_min=-3,
            log_prior_prec_max=3,
            grid_size=7,
            log_prior_prec_base=base,
        )
        assert la.prior_precision.item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="log_prior_prec_base"):
        la.optimize_prior_precision(
            method="gridsearch", val_loader=val, loss=loss, log_prior_prec_base=1
        )


def test_assemble_full_samples(device):
    la, model = _fitted(
        "classification",
        "subnetwork",
        "full",
        device,
        subnetwork_indices=torch.tensor([0, 3, 20]),
    )
    sub = torch.randn(4, 3, dtype=DTYPE, device=device)
    full = la.assemble_full_samples(sub)
    theta = parameters_to_vector(model.parameters()).detach()
    expected = theta.expand(4, -1).clone()
    expected[:, [0, 3, 20]] = sub
    torch.testing.assert_close(full, expected)
    with pytest.raises(ValueError, match="subnet_samples"):
        la.assemble_full_samples(torch.randn(4, 5, dtype=DTYPE, device=device))


@pytest.mark.parametrize(
    ("subset", "kwargs"),
    [("last_layer", {}), ("subnetwork", {"subnetwork_indices": torch.tensor([1, 25])})],
)
def test_posterior_precision_member(subset, kwargs, device):
    la, _ = _fitted("classification", subset, "diag", device, **kwargs)
    torch.testing.assert_close(
        la.posterior_precision, la._h_factor * la.H + la.prior_precision_diag
    )


def test_lowrank_kinv_is_the_woodbury_core(device):
    torch.manual_seed(0)
    model = Scaled().to(device, DTYPE)
    X, y = _data("regression")
    la = LowRankLaplace(model, "regression", rank=4, prior_precision=0.7)
    la.fit(DataLoader(TensorDataset(X.to(device), y.to(device)), batch_size=8))
    (U, lam), p0 = la.posterior_precision
    P = U @ torch.diag(lam) @ U.T + torch.diag(p0)
    D_inv = torch.diag(1 / p0)
    cov = D_inv - D_inv @ U @ la.Kinv @ U.T @ D_inv
    torch.testing.assert_close(cov, torch.linalg.inv(P))
    import inspect

    from laplace.curvature.curvature import CurvatureInterface

    default = inspect.signature(LowRankLaplace).parameters["backend"].default
    assert default is CurvatureInterface


# -- argument checks as laplace-torch --------
def test_argument_checks_as_laplace_torch():
    model = Scaled().to(DTYPE)
    with pytest.raises(ValueError, match="sigma_noise must be a scalar"):
        Laplace(model, "regression", "all", "full", sigma_noise=torch.ones(1, 1))
    la = Laplace(model, "regression", "all", "full", sigma_noise=torch.ones(1) * 0.5)
    assert la.sigma_noise.shape == ()
    for bad in ("1.0", [1.0]):
        with pytest.raises(ValueError, match="prior_precision"):
            Laplace(model, "regression", "all", "full", prior_precision=bad)
    one = nn.Linear(3, 1).to(DTYPE)
    X = torch.randn(8, 3, dtype=DTYPE)
    la = Laplace(one, "regression", "all", "full")
    with pytest.raises(ValueError, match=r"y.unsqueeze\(-1\)"):
        la.fit(DataLoader(TensorDataset(X, torch.randn(8, dtype=DTYPE)), batch_size=4))
    assert not la.fitted


def test_last_layer_prior_mean_before_the_layer_is_found(device):
    torch.manual_seed(0)
    model = Scaled().to(device, DTYPE)
    mu0 = torch.randn(12, dtype=DTYPE, device=device)
    la = Laplace(model, "regression", "last_layer", "diag", prior_mean=mu0)
    torch.testing.assert_close(la.prior_mean, mu0)  # before the first forward pass
    X, y = _data("regression")
    la.fit(DataLoader(TensorDataset(X.to(device), y.to(device)), batch_size=8))
    torch.testing.assert_close(la.prior_mean, mu0)
