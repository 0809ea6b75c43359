"""The likelihoods beyond classification and regression (issue 17): 'binary',
'multilabel', 'poisson', 'heteroscedastic_regression', one noise per output, and a
user's likelihood object, against closed forms and dense oracles.

- the output Hessian ``Lambda(f)`` of each likelihood: its closed form and
  ``torch.func.hessian`` of the negative log-likelihood in the outputs
  (``tests/oracles.py``, written with ``torch.distributions``);
- the curvature of every backend and structure: ``sum_n J_n^T Lambda_n J_n`` from
  ``torch.func`` Jacobians, KFAC from explicit factors, the empirical Fisher from
  per-example gradients, the true Hessian;
- evidence and predictive on linear models: Bayesian linear regression with one
  noise per output (exact), the probit approximation of the sigmoid, lognormal
  moments against Monte Carlo.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import hessian
from torch.utils.data import DataLoader, TensorDataset

import oracles
from laplace import Laplace, marglik_training
from laplace.curvature import (
    AsdlEF,
    AsdlGGN,
    AsdlHessian,
    BackPackEF,
    BackPackGGN,
    CurvlinopsEF,
    CurvlinopsGGN,
    CurvlinopsHessian,
    NativeEF,
    NativeGGN,
)
from laplace.likelihood import OutputLikelihood, get_likelihood
from laplace.predictive import links
from models import NaturalHead, mlp

FAMILIES = ("binary", "multilabel", "poisson", "heteroscedastic_regression")
DTYPE = torch.float64


def n_outputs(family: str, C: int = 3) -> int:
    return {"binary": 1, "heteroscedastic_regression": 2 * C}.get(family, C)


def family_model(family: str, device, C: int = 3, frozen: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = mlp(3, 5, n_outputs(family, C), frozen=frozen)
    if family == "heteroscedastic_regression":
        model = nn.Sequential(*model, NaturalHead())
    return model.to(device, DTYPE)


def family_data(family: str, device, n: int = 7, C: int = 3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, generator=g, dtype=DTYPE)
    if family == "binary":
        y = torch.randint(0, 2, (n,), generator=g)
    elif family == "multilabel":
        y = torch.randint(0, 2, (n, C), generator=g).to(DTYPE)
    elif family == "poisson":
        y = torch.poisson(torch.full((n, C), 2.0), generator=g).to(DTYPE)
    else:  # heteroscedastic_regression and regression
        y = torch.randn(n, C, generator=g, dtype=DTYPE)
    return x.to(device), y.to(device)


def outputs(family: str, device, n: int = 6, C: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    f = torch.randn(n, n_outputs(family, C), generator=g, dtype=DTYPE)
    if family == "heteroscedastic_regression":
        f = NaturalHead()(f)
    return f.to(device)


def loader(x, y, batch_size=3):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


# -- the likelihood objects ------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_output_hessian_is_the_closed_form_and_the_autograd_hessian(family, device):
    lik = get_likelihood(family)
    f = outputs(family, device)
    _, y = family_data(family, device, n=f.shape[0])
    L = lik.hessian_sqrt(f)
    closed = oracles.output_hessian(family, f)
    torch.testing.assert_close(L @ L.mT, closed)
    torch.testing.assert_close(lik.hessian(f), closed)
    # torch.func: the Hessian of each datum's negative log-likelihood in its outputs
    for n in range(f.shape[0]):
        yn = y[n : n + 1]
        H = hessian(lambda fn, yn=yn: oracles.loss(family, fn[None], yn))(f[n])
        torch.testing.assert_close(H, closed[n])


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_gradient_are_the_negative_log_likelihood(family, device):
    lik = get_likelihood(family)
    f = outputs(family, device).requires_grad_(True)
    x, y = family_data(family, device, n=f.shape[0])
    y = lik.check_targets(f.detach(), y)
    expected = oracles.loss(family, f, y)
    torch.testing.assert_close(lik.loss(f, y), expected)
    (grad,) = torch.autograd.grad(expected, f)
    torch.testing.assert_close(lik.loss_gradient(f.detach(), y), grad)


@pytest.mark.parametrize("family", FAMILIES + ("classification", "regression"))
def test_datum_losses_are_each_datums_negative_log_likelihood(family, device):
    """``datum_losses``: the oracle's ``-log p(y_n | f_n)`` row by row, summing to
    ``loss``; the protocol's default (vmap of ``loss`` over rows, or one row at a
    time for a loss that cannot be vmapped) gives the same for a likelihood object
    that only has ``loss``."""
    lik = get_likelihood(family)
    f = outputs(family, device)
    if family == "classification":
        y = torch.tensor([0, 2, 1, 1, 0, 2], device=device)
    else:
        y = family_data(family, device, n=f.shape[0])[1]
    y = lik.check_targets(f, y)
    expected = torch.stack(
        [oracles.loss(family, f[n : n + 1], y[n : n + 1]) for n in range(len(f))]
    )
    torch.testing.assert_close(lik.datum_losses(f, y), expected)
    torch.testing.assert_close(lik.datum_losses(f, y).sum(), lik.loss(f, y))

    class OnlyLoss(OutputLikelihood):
        def loss(self, f, y):
            return lik.loss(f, y)

    class NotVmappable(OutputLikelihood):
        def loss(self, f, y):
            assert f.shape[0] == int(torch.tensor(f.shape[0]).item())
            return lik.loss(f, y) + 0 * float(f.detach().sum().item())

    torch.testing.assert_close(OnlyLoss().datum_losses(f, y), expected)
    torch.testing.assert_close(NotVmappable().datum_losses(f, y), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_hessian_moments_are_diagonals_and_sum(family, device):
    f = outputs(family, device)
    closed = oracles.output_hessian(family, f)
    diag, total = get_likelihood(family).hessian_moments(f)
    torch.testing.assert_close(diag, closed.diagonal(dim1=1, dim2=2))
    torch.testing.assert_close(total, closed.sum(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_sampled_gradients_estimate_the_fisher(family, device):
    """The Monte-Carlo factor: loss gradients at targets drawn from the model; their
    covariance is the Fisher, here the output Hessian (200,000 samples: the error
    of each entry is about ``3 sd / sqrt(S) ~ 0.01`` for these outputs)."""
    f = outputs(family, device, n=3).clamp(-1.5, 1.5)
    if family == "heteroscedastic_regression":
        f = outputs(family, device, n=3)
        f[:, :3] = f[:, :3].clamp(-1, 1)
        f[:, 3:] = -0.6
    g = torch.Generator(device).manual_seed(0)
    M = get_likelihood(family).sampled_gradients(f, 200_000, g)
    torch.testing.assert_close(
        M @ M.mT, oracles.output_hessian(family, f), atol=0.03, rtol=0.02
    )


def test_binary_is_multilabel_with_one_logit(device):
    f = outputs("binary", device)
    _, y = family_data("binary", device, n=f.shape[0])
    binary, multilabel = get_likelihood("binary"), get_likelihood("multilabel")
    assert binary.check_targets(f, y).shape == (f.shape[0], 1)
    assert binary.check_targets(f, y[:, None]).shape == (f.shape[0], 1)
    torch.testing.assert_close(
        binary.loss(f, binary.check_targets(f, y)),
        multilabel.loss(f, y[:, None].to(DTYPE)),
    )


def test_targets_are_validated(device):
    f1, f3 = outputs("binary", device), outputs("poisson", device)
    n = f1.shape[0]
    with pytest.raises(ValueError, match="one logit"):
        get_likelihood("binary").check_targets(f3, torch.zeros(n, device=device))
    with pytest.raises(ValueError, match="0 or 1"):
        get_likelihood("binary").check_targets(f1, torch.full((n,), 2, device=device))
    with pytest.raises(ValueError, match="shape"):
        get_likelihood("multilabel").check_targets(f3, torch.zeros(n, device=device))
    with pytest.raises(ValueError, match="counts"):
        get_likelihood("poisson").check_targets(f3, -torch.ones_like(f3))
    with pytest.raises(ValueError, match="counts"):
        get_likelihood("poisson").check_targets(f3, torch.full_like(f3, 0.5))
    het = get_likelihood("heteroscedastic_regression")
    with pytest.raises(ValueError, match="2 C"):
        het.check_targets(f3, torch.zeros(n, 1, device=device))
    with pytest.raises(ValueError, match="eta2"):
        het.check_targets(
            torch.ones(n, 2, device=device), torch.zeros(n, device=device)
        )


# -- the curvature of every backend ----------------------------------------------------
def _kind(backend) -> str:
    if backend in (NativeEF, CurvlinopsEF, BackPackEF, AsdlEF):
        return "ef"
    if backend in (CurvlinopsHessian, AsdlHessian):
        return "hessian"
    return "ggn"


def _oracle(kind, structure, model, x, y, family):
    if structure == "kron":
        blocks = oracles.kfac_blocks(model, x, family, y=y if kind == "ef" else None)
        return torch.block_diag(*blocks)
    if kind == "ggn":
        H = oracles.ggn(model, x, family)
    elif kind == "ef":
        H = oracles.empirical_fisher(model, x, y, family)
    else:
        H = oracles.true_hessian(model, x, y, family)
    return H.diag() if structure == "diag" else H


#: (family, backend, structure) that compute; the rest are refused (below)
SUPPORTED = [
    (family, backend, structure)
    for family in FAMILIES
    for backend, structures in [
        (NativeGGN, ("full", "kron", "diag")),
        (NativeEF, ("full", "kron", "diag")),
        (CurvlinopsGGN, ("full", "kron", "diag")),
        (CurvlinopsEF, ("full", "kron", "diag")),
        (CurvlinopsHessian, ("full", "diag")),
        (BackPackGGN, ("full", "kron", "diag")),
        (BackPackEF, ("full", "diag")),
        (AsdlGGN, ("full", "kron", "diag")),
        (AsdlEF, ("full", "kron", "diag")),
        (AsdlHessian, ("full", "diag")),
    ]
    for structure in structures
    if not (
        # the library knows only some losses
        (
            backend is CurvlinopsEF
            and family in ("poisson", "heteroscedastic_regression")
        )
        or (backend is BackPackGGN and family != "binary")
        or (backend in (AsdlGGN, AsdlEF) and structure == "kron")
    )
]


@pytest.mark.parametrize(
    "family,backend,structure",
    [pytest.param(*c, id=f"{c[0]}-{c[1].__name__}-{c[2]}") for c in SUPPORTED],
)
def test_curvature_matches_the_dense_oracle(family, backend, structure, device):
    model = family_model(family, device)
    x, y = family_data(family, device)
    b = backend(model, family)
    if structure == "kron":
        loss, H = b.kron(x, y, N=len(x))
        H = H.to_matrix()
    else:
        loss, H = getattr(b, structure)(x, y)
    expected = _oracle(_kind(backend), structure, model, x, y, family)
    torch.testing.assert_close(H, expected)
    torch.testing.assert_close(loss, oracles.loss(family, model(x), y).detach())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", [NativeGGN, CurvlinopsGGN])
def test_last_layer_and_subnetwork_curvature(family, backend, device):
    if family == "heteroscedastic_regression":
        pytest.skip("the natural-parameter head follows the last linear layer")
    model = family_model(family, device)
    x, y = family_data(family, device)
    full = oracles.ggn(model, x, family)
    n_last = sum(p.numel() for p in model[-1].parameters())
    for structure in ("full", "diag"):
        _, H = getattr(backend(model, family, last_layer=True), structure)(x, y)
        block = full[-n_last:, -n_last:]
        torch.testing.assert_close(H, block.diag() if structure == "diag" else block)
    _, K = backend(model, family, last_layer=True).kron(x, y, N=len(x))
    blocks = oracles.kfac_blocks(model, x, family)[-2:]  # the last weight and bias
    torch.testing.assert_close(K.to_matrix(), torch.block_diag(*blocks))
    idx = torch.tensor([0, 4, 11, 30, 40], device=device)
    _, H = backend(model, family, subnetwork_indices=idx).full(x, y)
    torch.testing.assert_close(H, full[idx][:, idx])


@pytest.mark.parametrize("family", FAMILIES)
def test_stochastic_ggn_is_the_fisher_in_expectation(family, device):
    model = family_model(family, device)
    x, y = family_data(family, device, n=3)
    g = torch.Generator(device).manual_seed(0)
    b = NativeGGN(model, family, stochastic=True, num_samples=20_000, generator=g)
    _, H = b.diag(x, y)
    expected = oracles.ggn(model, x, family).diag()
    torch.testing.assert_close(H, expected, rtol=0.1, atol=0.02 * expected.max())


# -- every structure and subset of the Laplace classes ---------------------------------
STRUCTURES = [
    ("all", "full"),
    ("all", "kron"),
    ("all", "diag"),
    ("last_layer", "full"),
    ("last_layer", "kron"),
    ("last_layer", "diag"),
    ("subnetwork", "full"),
    ("subnetwork", "diag"),
]


def _dense_precision(la, model, x, family, subset, structure, p0):
    """The posterior precision of ``la`` from the dense oracles."""
    if subset == "last_layer":
        n_last = sum(p.numel() for p in model[-1].parameters())
        sel = slice(-n_last, None)
    else:
        sel = slice(None)
    if structure == "kron":
        blocks = oracles.kfac_blocks(model, x, family)
        H = torch.block_diag(*blocks)
        H = H[sel, sel]
    else:
        H = oracles.ggn(model, x, family)[sel, sel]
    if subset == "subnetwork":
        idx = la.subnetwork_indices
        H = H[idx][:, idx]
    if structure == "diag":
        H = torch.diag(H.diag())
    return H + p0 * torch.eye(H.shape[0], dtype=DTYPE, device=H.device)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("subset,structure", STRUCTURES)
def test_laplace_posterior_and_evidence_match_the_oracle(
    family, subset, structure, device
):
    if family == "heteroscedastic_regression" and subset == "last_layer":
        pytest.skip("the natural-parameter head follows the last linear layer")
    model = family_model(family, device, frozen=False)
    x, y = family_data(family, device)
    kwargs = {"prior_precision": 0.5}
    if subset == "subnetwork":
        kwargs["subnetwork_indices"] = torch.tensor(
            [1, 5, 8, 20, 33, 47], device=device
        )
    la = Laplace(model, family, subset, structure, **kwargs)
    la.fit(loader(x, y))
    P = _dense_precision(la, model, x, family, subset, structure, 0.5)
    got = la.posterior_precision
    got = got.to_matrix() if hasattr(got, "to_matrix") else got
    if structure == "diag":
        got = torch.diag(got)
    torch.testing.assert_close(got, P)
    theta = la.mean if subset != "subnetwork" else la.mean[la.subnetwork_indices]
    log_lik = -oracles.loss(family, model(x), y).detach()
    expected = log_lik - 0.5 * (
        torch.logdet(P) - P.shape[0] * math.log(0.5) + 0.5 * theta.square().sum()
    )
    torch.testing.assert_close(la.log_marginal_likelihood(), expected)


@pytest.mark.parametrize("family", ["binary", "multilabel", "poisson"])
def test_gp_view_with_all_data_is_the_full_laplace(family, device):
    """The GP view uses the diagonal of the output Hessians, which is all of it for
    these likelihoods: with ``n_subset = N`` its evidence and predictive variance
    are the FullLaplace's (weight space)."""
    model = family_model(family, device, frozen=False)
    x, y = family_data(family, device)
    gp = Laplace(model, family, "all", "gp", n_subset=len(x), prior_precision=0.5)
    gp.fit(loader(x, y))
    full = Laplace(model, family, "all", "full", prior_precision=0.5)
    full.fit(loader(x, y))
    torch.testing.assert_close(
        gp.log_marginal_likelihood(), full.log_marginal_likelihood()
    )
    torch.testing.assert_close(gp(x[:3]), full(x[:3]))


@pytest.mark.parametrize("family", FAMILIES)
def test_lowrank_keeps_the_top_eigenpairs(family, device):
    model = family_model(family, device, frozen=False)
    x, y = family_data(family, device)
    la = Laplace(model, family, "all", "lowrank", rank=4)
    la.fit(loader(x, y))
    U, lam = la.H
    expected = torch.linalg.eigvalsh(oracles.ggn(model, x, family)).flip(0)[:4]
    torch.testing.assert_close(lam.sort(descending=True).values, expected)


# -- predictives on linear models ------------------------------------------------------
def _linear_posterior(family, device, n=20, D=2, C=1, p0=0.8):
    """A fitted FullLaplace on ``f = W x + b`` and its dense posterior covariance
    from the closed-form output Hessian."""
    torch.manual_seed(3)
    model = nn.Linear(D, n_outputs(family, C))
    if family == "heteroscedastic_regression":
        model = nn.Sequential(model, NaturalHead())
    model = model.to(device, DTYPE)
    x, y = family_data(family, device, n=n, C=C)
    x = x[:, :D]
    la = Laplace(model, family, "all", "full", prior_precision=p0)
    la.fit(loader(x, y, batch_size=7))
    J = oracles.jacobian(model, x)
    Lam = oracles.output_hessian(family, model(x).detach())
    P = torch.einsum("ncp,ncd,ndq->pq", J, Lam, J) + p0 * torch.eye(
        J.shape[-1], dtype=DTYPE, device=device
    )
    return la, model, x, torch.linalg.inv(P)


def test_binary_probit_is_the_probit_approximation_of_the_sigmoid(device):
    la, model, x, Sigma = _linear_posterior("binary", device)
    xs = torch.randn(5, 2, dtype=DTYPE, device=device) * 2
    J = oracles.jacobian(model, xs)[:, 0]  # (N, P)
    mu, var = model(xs).detach()[:, 0], torch.einsum("np,pq,nq->n", J, Sigma, J)
    expected = torch.sigmoid(mu / torch.sqrt(1 + math.pi / 8 * var))
    probs = la(xs, link_approx="probit")
    assert probs.shape == (5, 1)
    torch.testing.assert_close(probs[:, 0], expected)
    # the probit approximation is within 0.02 of E[sigmoid(f)] (Gauss-Hermite)
    nodes, weights = _gauss_hermite(60, device)
    exact = (
        torch.sigmoid(mu[:, None] + math.sqrt(2) * var.sqrt()[:, None] * nodes)
        * weights
    ).sum(1) / math.sqrt(math.pi)
    torch.testing.assert_close(probs[:, 0], exact, atol=0.02, rtol=0)
    # and the MC link estimates E[sigmoid(f)]: 100,000 samples, sd < 0.0016
    g = torch.Generator(device).manual_seed(0)
    mc = la(xs, link_approx="mc", n_samples=100_000, generator=g)
    torch.testing.assert_close(mc[:, 0], exact, atol=0.006, rtol=0)


def _gauss_hermite(n, device):
    import numpy as np

    nodes, weights = np.polynomial.hermite.hermgauss(n)
    as_tensor = lambda a: torch.as_tensor(a, dtype=DTYPE, device=device)  # noqa: E731
    return as_tensor(nodes), as_tensor(weights)


def test_multilabel_predictive_is_the_probit_of_each_label(device):
    la, model, x, Sigma = _linear_posterior("multilabel", device, C=3)
    xs = torch.randn(4, 2, dtype=DTYPE, device=device)
    J = oracles.jacobian(model, xs)
    mu = model(xs).detach()
    var = torch.einsum("ncp,pq,ncq->nc", J, Sigma, J)
    expected = torch.sigmoid(mu / torch.sqrt(1 + math.pi / 8 * var))
    torch.testing.assert_close(la(xs), expected)
    samples = la.predictive_samples(xs, n_samples=3)
    assert samples.shape == (3, 4, 3) and bool(((samples > 0) & (samples < 1)).all())
    with pytest.raises(ValueError, match="link_approx='bridge'"):
        la(xs, link_approx="bridge")


def test_poisson_predictive_is_the_lognormal_moments(device):
    la, model, x, Sigma = _linear_posterior("poisson", device, C=2)
    xs = torch.randn(4, 2, dtype=DTYPE, device=device)
    J = oracles.jacobian(model, xs)
    mu = model(xs).detach()
    S = torch.einsum("ncp,pq,ndq->ncd", J, Sigma, J)
    mean, cov = la(xs)
    expected_mean = torch.exp(mu + S.diagonal(dim1=1, dim2=2) / 2)
    torch.testing.assert_close(mean, expected_mean)
    torch.testing.assert_close(
        cov, expected_mean[:, :, None] * expected_mean[:, None, :] * torch.expm1(S)
    )
    mean_d, var_d = la(xs, diagonal_output=True)
    torch.testing.assert_close(var_d, cov.diagonal(dim1=1, dim2=2))
    # Monte Carlo agrees: 400,000 samples, relative error of the variance < 1%
    g = torch.Generator(device).manual_seed(0)
    mc_mean, mc_cov = la(xs, link_approx="mc", n_samples=400_000, generator=g)
    torch.testing.assert_close(mc_mean, mean, rtol=3e-3, atol=0)
    torch.testing.assert_close(mc_cov, cov, rtol=0.03, atol=0.03 * cov.abs().max())
    # the joint covariance over the batch
    Jf = J.reshape(-1, J.shape[-1])
    S_joint = Jf @ Sigma @ Jf.T
    m_joint = torch.exp(mu.flatten() + S_joint.diagonal() / 2)
    mj, cj = la(xs, joint=True)
    torch.testing.assert_close(mj, m_joint)
    torch.testing.assert_close(cj, torch.outer(m_joint, m_joint) * torch.expm1(S_joint))


def test_lognormal_moments_match_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([[0.3, -0.5]], dtype=DTYPE)
    S = torch.tensor([[[0.4, 0.1], [0.1, 0.2]]], dtype=DTYPE)
    mean, cov = links.lognormal_moments(mu, S)
    f = links.sample_outputs(mu, S, 1_000_000, g).exp()[:, 0]
    torch.testing.assert_close(mean[0], f.mean(0), rtol=3e-3, atol=0)
    torch.testing.assert_close(cov[0], f.T.cov(), rtol=0.03, atol=0)


def test_heteroscedastic_predictive_is_the_delta_method(device):
    la, model, x, Sigma = _linear_posterior(
        "heteroscedastic_regression", device, C=1, n=30
    )
    xs = torch.randn(3, 2, dtype=DTYPE, device=device) * 0.3
    eta = model(xs).detach()
    J = oracles.jacobian(model, xs)
    S = torch.einsum("ncp,pq,ndq->ncd", J, Sigma, J)
    s2 = -0.5 / eta[:, 1]
    mu = eta[:, 0] * s2
    g = torch.stack([s2, 2 * mu * s2], -1)  # d mu / d (eta1, eta2)
    mean, var = la(xs)
    torch.testing.assert_close(mean[:, 0], mu)
    torch.testing.assert_close(var[:, 0, 0], s2 + torch.einsum("ni,nij,nj->n", g, S, g))
    with pytest.raises(ValueError, match="joint=True"):
        la(xs, joint=True)


def test_heteroscedastic_nn_predictive_is_the_mixture_moments(device):
    model = family_model("heteroscedastic_regression", device, C=2)
    x, y = family_data("heteroscedastic_regression", device, C=2)
    la = Laplace(model, "heteroscedastic_regression", "all", "diag")
    la.fit(loader(x, y))
    g1, g2 = (torch.Generator(device).manual_seed(0) for _ in range(2))
    mean, var = la(x, pred_type="nn", link_approx="mc", n_samples=50, generator=g1)
    eta = la.functional_samples(x, pred_type="nn", n_samples=50, generator=g2)
    s2 = -0.5 / eta[..., 2:]
    mu = eta[..., :2] * s2
    torch.testing.assert_close(mean, mu.mean(0))
    torch.testing.assert_close(var, s2.mean(0) + mu.var(0))


def test_binary_nn_predictive_averages_the_sigmoid(device):
    la, model, x, _ = _linear_posterior("binary", device)
    g1, g2 = (torch.Generator(device).manual_seed(0) for _ in range(2))
    probs = la(x[:4], pred_type="nn", link_approx="mc", n_samples=30, generator=g1)
    f = la.functional_samples(x[:4], pred_type="nn", n_samples=30, generator=g2)
    torch.testing.assert_close(probs, torch.sigmoid(f).mean(0))


def test_binary_and_poisson_evidence_of_a_linear_model(device):
    """``log p(y | theta) + log p(theta) + P/2 log 2 pi - 1/2 log det P`` with ``P``
    the dense GGN posterior precision of ``f = W x + b``."""
    for family in ("binary", "poisson"):
        la, model, x, Sigma = _linear_posterior(family, device, C=2)
        _, y = family_data(family, device, n=20, C=2)
        theta = la.mean
        log_lik = -oracles.loss(family, model(x), y).detach()
        P0 = 0.8 * torch.eye(len(theta), dtype=DTYPE, device=device)
        expected = log_lik - 0.5 * (
            -torch.logdet(Sigma) - torch.logdet(P0) + theta @ P0 @ theta
        )
        torch.testing.assert_close(la.log_marginal_likelihood(), expected)


# -- one noise per output --------------------------------------------------------------
def _blr(device, s=(0.5, 2.0), p0=0.7, N=20, D=3):
    """Bayesian linear regression with one noise per output, at the exact MAP;
    returns the model, data and the exact log evidence as a function of sigma."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, D, generator=g, dtype=DTYPE).to(device)
    Y = torch.randn(N, len(s), generator=g, dtype=DTYPE).to(device)
    sigma = torch.tensor(s, dtype=DTYPE, device=device)
    Xt = torch.cat([X, torch.ones(N, 1, dtype=DTYPE, device=device)], 1)
    eye = torch.eye(D + 1, dtype=DTYPE, device=device)
    W = torch.stack(
        [
            torch.linalg.solve(Xt.T @ Xt / sc**2 + p0 * eye, Xt.T @ Y[:, c] / sc**2)
            for c, sc in enumerate(sigma)
        ]
    )
    model = nn.Linear(D, len(s)).to(device, DTYPE)
    with torch.no_grad():
        model.weight.copy_(W[:, :D])
        model.bias.copy_(W[:, D])

    def evidence(sig):
        total = 0.0
        for c in range(len(s)):
            K = sig[c] ** 2 * torch.eye(N, dtype=DTYPE, device=device) + Xt @ Xt.T / p0
            mvn = torch.distributions.MultivariateNormal(torch.zeros_like(Y[:, c]), K)
            total = total + mvn.log_prob(Y[:, c])
        return total

    return model, X, Y, sigma, evidence


@pytest.mark.parametrize(
    "subset,structure",
    [("all", "full"), ("last_layer", "full"), ("subnetwork", "full")],
)
def test_per_output_noise_gives_the_exact_evidence_and_its_gradient(
    subset, structure, device
):
    model, X, Y, sigma, evidence = _blr(device)
    kwargs = {"subnetwork_indices": torch.arange(8)} if subset == "subnetwork" else {}
    la = Laplace(
        model,
        "regression",
        subset,
        structure,
        sigma_noise=sigma,
        prior_precision=0.7,
        **kwargs,
    )
    la.fit(loader(X, Y, batch_size=7))
    sig = sigma.clone().requires_grad_(True)
    value = la.log_marginal_likelihood(sigma_noise=sig)
    (grad,) = torch.autograd.grad(value, sig)
    sig2 = sigma.clone().requires_grad_(True)
    exact = evidence(sig2)
    (exact_grad,) = torch.autograd.grad(exact, sig2)
    torch.testing.assert_close(value.detach(), exact.detach())
    torch.testing.assert_close(grad, exact_grad)
    # another noise, no refit: the curvature is kept per output
    other = torch.tensor([1.3, 0.4], dtype=DTYPE, device=device)
    la.sigma_noise = other
    log_lik = (
        -0.5 * ((model(X) - Y).square() / other.square()).sum()
        - len(X) * torch.log(other * math.sqrt(2 * math.pi)).sum()
    )
    torch.testing.assert_close(la.log_likelihood, log_lik.detach())


def test_per_output_noise_diag_is_the_diagonal_of_the_weighted_ggn(device):
    model, X, Y, sigma, _ = _blr(device)
    la = Laplace(model, "regression", "all", "diag", sigma_noise=sigma)
    la.fit(loader(X, Y, batch_size=7))
    J = oracles.jacobian(model, X)
    ggn = torch.einsum("ncp,c,ncq->pq", J, 1 / sigma.square(), J)
    torch.testing.assert_close(la.posterior_precision, ggn.diag() + 1)
    # the evidence is differentiable in each noise (finite differences)
    sig = sigma.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(la.log_marginal_likelihood(sigma_noise=sig), sig)
    eps = 1e-6
    for c in range(2):
        step = torch.zeros_like(sigma)
        step[c] = eps
        hi = la.log_marginal_likelihood(sigma_noise=sigma + step)
        lo = la.log_marginal_likelihood(sigma_noise=sigma - step)
        torch.testing.assert_close(grad[c], (hi - lo) / (2 * eps), rtol=1e-5, atol=0)


def test_per_output_noise_with_curvlinops_and_asdl(device):
    model, X, Y, sigma, evidence = _blr(device)
    for backend in (CurvlinopsGGN, AsdlGGN, CurvlinopsHessian):
        la = Laplace(
            model,
            "regression",
            "all",
            "full",
            sigma_noise=sigma,
            backend=backend,
            prior_precision=0.7,
        )
        la.fit(loader(X, Y, batch_size=7))
        torch.testing.assert_close(la.log_marginal_likelihood(), evidence(sigma))


def test_per_output_noise_is_refused_where_it_cannot_be(device):
    model, X, Y, sigma, _ = _blr(device)
    # kron takes it too (tests/test_kron_output_noise.py)
    with pytest.raises(ValueError, match="hessian_structure='full', 'diag' or 'kron'"):
        Laplace(model, "regression", "all", "lowrank", sigma_noise=sigma)
    with pytest.raises(ValueError, match="hessian_structure='full', 'diag' or 'kron'"):
        Laplace(model, "regression", "all", "gp", n_subset=3, sigma_noise=sigma)
    with pytest.raises(ValueError, match="sigma_noise must be 1"):
        Laplace(model, "poisson", "all", "full", sigma_noise=sigma)
    la = Laplace(
        model, "regression", "all", "full", sigma_noise=sigma, backend=NativeEF
    )
    with pytest.raises(ValueError, match="empirical Fisher"):
        la.fit(loader(X, Y))
    assert not la.fitted
    la = Laplace(model, "regression", "all", "full", sigma_noise=torch.ones(3))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        la.fit(loader(X, Y))
    la = Laplace(model, "regression", "all", "full", backend=BackPackGGN)
    la.sigma_noise = sigma  # before fit: checked at fit
    with pytest.raises(ValueError, match="BackPackGGN cannot compute the GGN"):
        la.fit(loader(X, Y))
    la = Laplace(model, "regression", "all", "full")
    la.fit(loader(X, Y))
    with pytest.raises(ValueError, match="fitted with a scalar sigma_noise"):
        la.sigma_noise = sigma
    assert la.sigma_noise.shape == ()


def test_marglik_training_tunes_one_noise_per_output(device):
    """Two outputs of one linear model with noise 0.1 and 1.0: the tuned noises
    are close to them (400 data; the MLE's relative error is about 5%)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(400, 2, generator=g, dtype=DTYPE)
    W = torch.tensor([[1.0, -2.0], [0.5, 1.0]], dtype=DTYPE)
    Y = X @ W.T + torch.randn(400, 2, generator=g, dtype=DTYPE) * torch.tensor(
        [0.1, 1.0], dtype=DTYPE
    )
    torch.manual_seed(0)
    model = nn.Linear(2, 2).to(device, DTYPE)
    la, _, margliks, _ = marglik_training(
        model,
        DataLoader(TensorDataset(X.to(device), Y.to(device)), batch_size=200),
        likelihood="regression",
        hessian_structure="full",
        backend=NativeGGN,
        sigma_noise_init=torch.ones(2, dtype=DTYPE, device=device),
        n_epochs=40,
        lr_hyp=0.1,
        optimizer_kwargs={"lr": 0.05},
    )
    assert la.sigma_noise.shape == (2,)
    torch.testing.assert_close(
        la.sigma_noise,
        torch.tensor([0.1, 1.0], dtype=DTYPE, device=device),
        rtol=0.15,
        atol=0,
    )
    assert margliks[-1] < margliks[0]


# -- the protocol: a likelihood of one's own -------------------------------------------
class SoftplusPoisson(OutputLikelihood):
    """Counts ``y ~ Poisson(softplus(f))``, only its Fisher given (``hessian``)."""

    name = "softplus_poisson"

    def loss(self, f, y):
        rate = nn.functional.softplus(f)
        return (rate - y * rate.log() + torch.lgamma(y + 1)).sum()

    def hessian(self, f):
        rate, slope = nn.functional.softplus(f), torch.sigmoid(f)
        return torch.diag_embed(slope**2 / rate)

    def predictive(self, f_mu, f_var, link_approx="mc", n_samples=100, generator=None):
        f = links.sample_outputs(f_mu, f_var, n_samples, generator)
        return nn.functional.softplus(f).mean(0)


def test_a_user_likelihood_gives_the_ggn_of_its_hessian(device):
    model = family_model("poisson", device, frozen=False)
    x, y = family_data("poisson", device)
    lik = SoftplusPoisson()
    with torch.no_grad():
        f = model(x)
    Lam = lik.hessian(f)
    L = lik.hessian_sqrt(f)  # derived by eigh
    torch.testing.assert_close(L @ L.mT, Lam)
    J = oracles.jacobian(model, x)
    ggn = torch.einsum("ncp,ncd,ndq->pq", J, Lam, J)
    for backend in (NativeGGN, CurvlinopsGGN, AsdlGGN):
        _, H = backend(model, lik).full(x, y)
        torch.testing.assert_close(H, ggn)
    la = Laplace(model, lik, "all", "full", prior_precision=2.0)
    la.fit(loader(x, y))
    torch.testing.assert_close(
        la.posterior_precision,
        ggn + 2 * torch.eye(len(ggn), dtype=DTYPE, device=device),
    )
    g = torch.Generator(device).manual_seed(0)
    rates = la(x[:2], link_approx="mc", n_samples=10, generator=g)
    assert rates.shape == (2, 3) and bool((rates > 0).all())
    # autograd gives the loss gradient
    fr = f.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(lik.loss(fr, y), fr)
    torch.testing.assert_close(lik.loss_gradient(f, y), expected)
    # and the state dict names it
    assert la.state_dict()["likelihood"] == "softplus_poisson"
    assert la.likelihood is lik


def test_user_likelihood_is_refused_where_it_cannot_be(device):
    model = family_model("poisson", device)

    class NoCurvature(OutputLikelihood):
        def loss(self, f, y):
            return f.sum()

    with pytest.raises(TypeError, match="hessian_sqrt"):
        Laplace(model, NoCurvature(), "all", "full")
    with pytest.raises(TypeError, match="OutputLikelihood"):
        Laplace(model, object(), "all", "full")
    with pytest.raises(ValueError, match="draws targets"):
        Laplace(
            model, SoftplusPoisson(), "all", "full", backend_kwargs={"stochastic": True}
        )
    with pytest.raises(ValueError, match="BackPackGGN cannot compute the GGN"):
        Laplace(model, SoftplusPoisson(), "all", "diag", backend=BackPackGGN)


# -- what is refused, up front ---------------------------------------------------------
def test_library_backends_refuse_losses_they_do_not_know(device):
    model = family_model("poisson", device)
    cases = [
        ("poisson", "full", CurvlinopsEF, "empirical Fisher"),
        ("poisson", "full", BackPackGGN, "GGN"),
        ("multilabel", "kron", AsdlGGN, "KFAC"),
        ("heteroscedastic_regression", "lowrank", BackPackEF, "empirical Fisher"),
    ]
    for family, structure, backend, what in cases:
        with pytest.raises(
            ValueError, match=f"{backend.__name__} cannot compute (the )?{what}"
        ):
            Laplace(model, family, "all", structure, backend=backend)
    with pytest.raises(ValueError, match="draws targets|Monte-Carlo"):
        Laplace(
            model,
            "poisson",
            "all",
            "diag",
            backend=CurvlinopsGGN,
            backend_kwargs={"stochastic": True},
        )
    # BackPACK's GGN of BCEWithLogitsLoss takes one output: refused on the first batch
    x, y = family_data("multilabel", device)
    la = Laplace(
        family_model("multilabel", device),
        "multilabel",
        "all",
        "diag",
        backend=BackPackGGN,
    )
    with pytest.raises(ValueError, match="takes one output"):
        la.fit(loader(x, y))
    assert not la.fitted


def test_predictive_arguments_are_checked(device):
    la, model, x, _ = _linear_posterior("binary", device)
    for link in ("bridge", "bridge_norm"):
        with pytest.raises(ValueError, match=f"link_approx='{link}'.*'mc', 'probit'"):
            la(x, link_approx=link)
    x3, y3 = family_data("poisson", device)
    la = Laplace(family_model("poisson", device), "binary", "all", "diag")
    with pytest.raises(ValueError, match="one logit"):
        la.fit(loader(x3, y3))
    assert not la.fitted


def test_state_dict_round_trip(device):
    model, X, Y, sigma, _ = _blr(device)
    la = Laplace(model, "regression", "all", "diag", sigma_noise=sigma)
    la.fit(loader(X, Y))
    state = la.state_dict()
    other = Laplace(model, "regression", "all", "diag")
    other.load_state_dict(state)
    torch.testing.assert_close(
        other.log_marginal_likelihood(), la.log_marginal_likelihood()
    )
    torch.testing.assert_close(other.sigma_noise, sigma)
    binary = Laplace(family_model("binary", device), "binary", "all", "kron")
    binary.fit(loader(*family_data("binary", device)))
    multilabel = Laplace(family_model("binary", device), "multilabel", "all", "kron")
    with pytest.raises(ValueError, match="likelihood='binary'"):
        multilabel.load_state_dict(binary.state_dict())


def test_streaming_conversion_refuses_one_noise_per_output(device):
    from laplace.streaming import from_laplace, to_laplace

    model, X, Y, sigma, _ = _blr(device)
    la = Laplace(model, "regression", "all", "full", sigma_noise=sigma)
    la.fit(loader(X, Y))
    state = from_laplace(la)  # the posterior precision (in the tree's order)
    torch.testing.assert_close(torch.logdet(state.prec), la.log_det_posterior_precision)
    with pytest.raises(ValueError, match="scalar sigma_noise"):
        to_laplace(state, model, "regression", 1.0, sigma_noise=sigma)


@pytest.mark.parametrize("family", FAMILIES)
def test_gridsearch_default_loss_is_the_predictive_nll(family, device):
    """The default validation loss of the grid search: the NLL of the targets under
    the predictive (Bernoulli of the probabilities, Poisson at the mean rate,
    Gaussian of the mean and variance of ``y``), computed here from ``la(x)``."""
    model = family_model(family, device, frozen=False)
    x, y = family_data(family, device, n=12)
    la = Laplace(model, family, "all", "diag")
    la.fit(loader(x[:6], y[:6]))
    grid = torch.logspace(-2, 2, 5, dtype=DTYPE)

    def nll(prediction):
        if family in ("binary", "multilabel"):
            yy = y[6:].reshape(prediction.shape).to(DTYPE)
            return -(yy * prediction.log() + (1 - yy) * (1 - prediction).log()).sum()
        mean, var = prediction
        yy = y[6:].reshape(mean.shape)
        if family == "poisson":
            return -torch.distributions.Poisson(mean).log_prob(yy).sum()
        var = var.diagonal(dim1=1, dim2=2)
        return -torch.distributions.Normal(mean, var.sqrt()).log_prob(yy).sum()

    losses = []
    for p0 in grid:
        la.prior_precision = float(p0)
        losses.append(float(nll(la(x[6:]))))
    la.optimize_prior_precision(
        method="gridsearch",
        val_loader=loader(x[6:], y[6:]),
        log_prior_prec_min=-2,
        log_prior_prec_max=2,
        grid_size=5,
    )
    best = grid[torch.tensor(losses).argmin()]
    torch.testing.assert_close(la.prior_precision, best.reshape(1).to(device))
    assert len(set(losses)) > 1  # the loss does depend on the prior


def test_heteroscedastic_last_layer(device):
    """A last linear layer whose outputs are the natural parameters (its bias keeps
    ``eta2 < 0`` on the data): the last-layer curvature is that block of the GGN."""
    torch.manual_seed(0)
    model = mlp(3, 5, 2, frozen=False).to(device, DTYPE)
    with torch.no_grad():
        model[-1].weight[1].mul_(0.01)
        model[-1].bias[1] = -2.0
    x, y = family_data("heteroscedastic_regression", device, C=1)
    la = Laplace(model, "heteroscedastic_regression", "last_layer", "full")
    la.fit(loader(x, y))
    n_last = sum(p.numel() for p in model[-1].parameters())
    ggn = oracles.ggn(model, x, "heteroscedastic_regression")[-n_last:, -n_last:]
    torch.testing.assert_close(
        la.posterior_precision, ggn + torch.eye(n_last, dtype=DTYPE, device=device)
    )


def test_likelihood_attribute_keeps_what_was_given(device):
    model = family_model("poisson", device)
    la = Laplace(model, "poisson", "all", "diag")
    assert la.likelihood == "poisson" and la.likelihood.value == "poisson"
    lik = SoftplusPoisson()
    assert Laplace(model, lik, "all", "diag").likelihood is lik


@pytest.mark.parametrize("family", FAMILIES)
def test_marglik_training_takes_every_family(family, device):
    """A few epochs: the weights train on the likelihood's loss and the prior is
    tuned by its evidence (which improves)."""
    model = family_model(family, device, frozen=False)
    x, y = family_data(family, device, n=32)
    la, _, margliks, losses = marglik_training(
        model,
        loader(x, y, batch_size=16),
        likelihood=family,
        hessian_structure="diag",
        backend=NativeGGN,
        n_epochs=6,
        optimizer_kwargs={"lr": 0.01},
    )
    assert la.lik.name == family and la.fitted
    assert margliks[-1] < margliks[0] and all(map(math.isfinite, losses))
