"""Parametric Laplace (full, kron, diag, lowrank) against dense brute-force oracles.

Every expected number is computed here, independently of the library, from
``tests/oracles.py`` (Jacobians by ``torch.func.jacrev``, the GGN ``sum J^T Lambda J``
with the closed-form output Hessian, KFAC blocks from explicit layer inputs and output
gradients) and dense ``torch.linalg`` on the resulting ``(P, P)`` posterior precision

    P = factor * H + diag(p0),   factor = 1 / (sigma_noise^2 * temperature).

The library's own dense forms are only ever compared, never used as oracles. The
models are the float64 MLP 3-5-4 with a frozen bias and the tiny CNN of
``tests/models.py``; the training data (N = 12) come in uneven batches of 5, so every
comparison against the all-at-once oracle also proves independence of the batching.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from torch import nn
from torch.distributions import MultivariateNormal
from torch.func import functional_call
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset

import oracles
from laplace import DiagLaplace, FullLaplace, KronLaplace, Laplace, LowRankLaplace
from models import data, model

DT = torch.float64
N, BATCH = 12, 5
STRUCTURES = ("full", "kron", "diag", "lowrank")
LIKELIHOODS = ("regression", "classification")
PRIORS = ("scalar", "layerwise", "diag")
TEMPERATURE = 0.8
N_OUT = {"mlp": 4, "cnn": 3}
#: (arch, structure) of the functional-variance cases: the CNN (weight sharing) for
#: the structures with a layer-wise fast path, not for lowrank (slow eigensolver)
ARCH_STRUCTURES = [
    (a, s) for a in ("mlp", "cnn") for s in STRUCTURES if (a, s) != ("cnn", "lowrank")
]
#: (structure, prior kind) pairs a Laplace accepts: kron refuses a per-parameter prior
STRUCTURE_PRIORS = [
    (s, k) for s in STRUCTURES for k in PRIORS if (s, k) != ("kron", "diag")
]


# ---- problem set-up ------------------------------------------------------------------


def gen(seed: int, device="cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed(seed)


def device_of(m: nn.Module) -> torch.device:
    return next(m.parameters()).device


def sigma_of(likelihood: str) -> float:
    return 0.7 if likelihood == "regression" else 1.0


def factor_of(sigma, temperature=TEMPERATURE):
    return 1 / (sigma**2 * temperature)


def make_model(arch: str, device) -> nn.Module:
    return model(arch, N_OUT[arch]).to(device)


def trainable_params(m: nn.Module) -> list[nn.Parameter]:
    return [p for p in m.parameters() if p.requires_grad]


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in trainable_params(m))


def theta_of(m: nn.Module) -> torch.Tensor:
    return oracles.flat(oracles.trainable(m).values())


def loader(x, y, batch_size=BATCH) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


@functools.cache
def train_data(arch: str, likelihood: str, device):
    x, y = data(arch, likelihood, n=N, n_out=N_OUT[arch])
    return x.to(device), y.to(device)


@functools.cache
def query_inputs(arch: str, device) -> torch.Tensor:
    shape = (4, 3) if arch == "mlp" else (3, 2, 6, 6)
    return torch.randn(*shape, generator=gen(2), dtype=DT).to(device)


@functools.cache
def query_jacobian(arch: str, device) -> torch.Tensor:
    """Oracle Jacobian ``(n, C, P)`` at the query inputs."""
    return oracles.jacobian(make_model(arch, device), query_inputs(arch, device))


@functools.cache
def train_loss(arch: str, likelihood: str, device) -> torch.Tensor:
    x, y = train_data(arch, likelihood, device)
    with torch.no_grad():
        return oracles.loss(likelihood, make_model(arch, device)(x), y)


@functools.cache
def oracle_ggn(arch: str, likelihood: str, device) -> torch.Tensor:
    x, _ = train_data(arch, likelihood, device)
    return oracles.ggn(make_model(arch, device), x, likelihood)


@functools.cache
def oracle_curvature(
    arch: str, likelihood: str, structure: str, device
) -> torch.Tensor:
    """Dense ``H`` of a structure: the GGN (full; lowrank with rank = P), its
    diagonal (diag), the block diagonal of ``kron(G, A)`` blocks (kron)."""
    if structure == "kron":
        x, _ = train_data(arch, likelihood, device)
        blocks = oracles.kfac_blocks(make_model(arch, device), x, likelihood)
        return torch.block_diag(*blocks).detach()
    H = oracle_ggn(arch, likelihood, device)
    return torch.diag(H.diagonal()) if structure == "diag" else H


def prior_of(kind: str, m: nn.Module):
    """A scalar, layer-wise or per-parameter prior precision for model ``m``."""
    if kind == "scalar":
        return 0.5
    if kind == "layerwise":
        n = len(trainable_params(m))
        return torch.linspace(0.3, 1.5, n, dtype=DT, device=device_of(m))
    return 0.2 + torch.rand(n_params(m), generator=gen(3), dtype=DT).to(device_of(m))


def p0_of(prior, m: nn.Module) -> torch.Tensor:
    """Oracle expansion of a prior precision to the diagonal ``(P,)``."""
    params = trainable_params(m)
    dev = device_of(m)
    prior = torch.as_tensor(prior, dtype=DT, device=dev).reshape(-1)
    if prior.numel() == 1:
        return prior * torch.ones(n_params(m), dtype=DT, device=dev)
    if prior.numel() == len(params):
        return torch.cat(
            [
                v * torch.ones(p.numel(), dtype=DT, device=dev)
                for v, p in zip(prior, params)
            ]
        )
    assert prior.numel() == n_params(m)
    return prior


def oracle_precision(
    arch, likelihood, structure, prior, sigma=None, temperature=TEMPERATURE, *, device
):
    sigma = sigma_of(likelihood) if sigma is None else sigma
    H = oracle_curvature(arch, likelihood, structure, device)
    factor = factor_of(sigma, temperature)
    return factor * H + torch.diag(p0_of(prior, make_model(arch, device)))


def oracle_log_marglik(
    arch,
    likelihood,
    structure,
    prior,
    sigma=None,
    prior_mean=0.0,
    temperature=TEMPERATURE,
    *,
    device,
):
    """``log_lik - 0.5 (log det P - log det P0 + scatter)`` from the dense ``P``."""
    m = make_model(arch, device)
    sigma = torch.as_tensor(sigma_of(likelihood) if sigma is None else sigma)
    sigma = sigma.to(device)
    factor = factor_of(sigma, temperature)
    log_lik = -factor * train_loss(arch, likelihood, device)
    if likelihood == "regression":
        n_terms = N * N_OUT[arch]
        log_lik = log_lik - n_terms * torch.log(sigma * math.sqrt(2 * math.pi))
    p0 = p0_of(prior, m)
    P = factor * oracle_curvature(arch, likelihood, structure, device) + torch.diag(p0)
    sign, logdet = torch.linalg.slogdet(P)
    assert sign == 1
    scatter = (p0 * (theta_of(m) - prior_mean) ** 2).sum()
    return log_lik - 0.5 * (logdet - p0.log().sum() + scatter)


def fitted(arch, likelihood, structure, device, batch_size=BATCH, **kwargs):
    """A Laplace of ``structure`` fit on the training data in batches."""
    m = make_model(arch, device)
    kwargs.setdefault("sigma_noise", sigma_of(likelihood))
    kwargs.setdefault("temperature", TEMPERATURE)
    if structure == "lowrank":
        kwargs.setdefault("rank", n_params(m))
    la = Laplace(m, likelihood, "all", structure, **kwargs)
    la.fit(loader(*train_data(arch, likelihood, device), batch_size=batch_size))
    return la


def dense_precision(la) -> torch.Tensor:
    """The library's posterior precision as a dense ``(P, P)`` matrix."""
    pp = la.posterior_precision
    if isinstance(la, FullLaplace):
        return pp
    if isinstance(la, DiagLaplace):
        return torch.diag(pp)
    if isinstance(la, KronLaplace):
        return pp.to_matrix()
    assert isinstance(la, LowRankLaplace)
    (U, eigenvalues), p0 = pp
    return U @ torch.diag(eigenvalues) @ U.T + torch.diag(p0)


def oracle_glm(arch, likelihood, structure, prior, device):
    """``f_mu`` ``(n, C)`` and ``f_var = J P^-1 J^T`` ``(n, C, C)`` at the queries."""
    J = query_jacobian(arch, device)
    Sigma = torch.linalg.inv(
        oracle_precision(arch, likelihood, structure, prior, device=device)
    )
    with torch.no_grad():
        f_mu = make_model(arch, device)(query_inputs(arch, device))
    return f_mu, torch.einsum("ncp,pq,ndq->ncd", J, Sigma, J)


def network_at(m: nn.Module, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The network with its trainable parameters replaced by the vector ``theta``."""
    named = oracles.trainable(m)
    chunks = torch.split(theta, [p.numel() for p in named.values()])
    weights = {k: c.view(p.shape) for (k, p), c in zip(named.items(), chunks)}
    with torch.no_grad():
        return functional_call(m, weights, (x,))


def a_prior_for(structure: str, m: nn.Module):
    """The richest prior a structure takes (kron: one value per layer)."""
    return prior_of("layerwise" if structure == "kron" else "diag", m)


# ---- 1. posterior precision ----------------------------------------------------------


@pytest.mark.parametrize("prior_kind", PRIORS)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_posterior_precision_is_factor_H_plus_prior(
    structure, likelihood, prior_kind, device
):
    prior = prior_of(prior_kind, make_model("mlp", device))
    if structure == "kron" and prior_kind == "diag":
        with pytest.raises(ValueError):
            fitted("mlp", likelihood, structure, device, prior_precision=prior)
        return
    la = fitted("mlp", likelihood, structure, device, prior_precision=prior)
    expected = oracle_precision("mlp", likelihood, structure, prior, device=device)
    assert_close(dense_precision(la), expected)
    Sigma = torch.linalg.inv(expected)
    assert_close(la.posterior_variance, Sigma.diagonal())
    if structure == "full":
        assert_close(la.posterior_covariance, Sigma)
        S = la.posterior_scale
        assert_close(S @ S.T, Sigma)


@pytest.mark.parametrize("batch_size", [1, 5, N])
@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_cnn_posterior_precision_does_not_depend_on_batching(
    structure, batch_size, device
):
    """Weight sharing: conv KFAC sums ``G`` over positions and averages ``A``."""
    prior = prior_of("layerwise", make_model("cnn", device))
    la = fitted(
        "cnn",
        "regression",
        structure,
        device,
        batch_size=batch_size,
        prior_precision=prior,
    )
    expected = oracle_precision("cnn", "regression", structure, prior, device=device)
    assert_close(dense_precision(la), expected)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_damped_kron_log_det_is_that_of_its_posterior_precision(likelihood, device):
    # with a scale c = 1 / (sigma^2 T) != 1 the damped block is
    # c (G + sqrt(d/c)) (x) (A + sqrt(d/c)); the bias blocks are c G + d
    prior = prior_of("layerwise", make_model("mlp", device))
    la = fitted("mlp", likelihood, "kron", device, prior_precision=prior, damping=True)
    c = factor_of(sigma_of(likelihood))
    blocks = []
    for kfac, d in zip(la.H.kfacs, la.prior_precision):
        if len(kfac) == 1:
            blocks.append(
                c * kfac[0]
                + d * torch.eye(len(kfac[0]), dtype=d.dtype, device=d.device)
            )
            continue
        G, A = kfac
        root = torch.sqrt(d / c)
        eye_G = torch.eye(len(G), dtype=G.dtype, device=G.device)
        eye_A = torch.eye(len(A), dtype=A.dtype, device=A.device)
        blocks.append(c * torch.kron(G + root * eye_G, A + root * eye_A))
    expected = torch.block_diag(*blocks)
    assert_close(dense_precision(la), expected)
    assert_close(la.log_det_posterior_precision, torch.linalg.slogdet(expected)[1])


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_lowrank_keeps_the_top_eigenpairs_of_the_ggn(likelihood, device):
    k = 10
    m = make_model("mlp", device)
    prior = prior_of("diag", m)
    la = fitted("mlp", likelihood, "lowrank", device, rank=k, prior_precision=prior)
    factor = factor_of(sigma_of(likelihood))
    lam, V = torch.linalg.eigh(oracle_ggn("mlp", likelihood, device))
    lam, V = lam.flip(0)[:k], V.flip(1)[:, :k]
    # a gap after the k-th eigenvalue makes the top-k eigenspace well defined
    assert (
        lam[-1]
        > 1.05 * torch.linalg.eigvalsh(oracle_ggn("mlp", likelihood, device))[-k - 1]
    )
    (U, eigenvalues), p0 = la.posterior_precision
    assert U.shape == (n_params(m), k)
    assert_close(eigenvalues, factor * lam)
    assert_close(U.T @ U, torch.eye(k, dtype=DT, device=device))
    assert_close(p0, p0_of(prior, m))
    expected = factor * V @ torch.diag(lam) @ V.T + torch.diag(p0_of(prior, m))
    assert_close(dense_precision(la), expected)
    Sigma = torch.linalg.inv(expected)
    assert_close(la.posterior_variance, Sigma.diagonal())
    # evidence and functional variance of the truncated precision
    p0 = p0_of(prior, m)
    log_lik = -factor * train_loss("mlp", likelihood, device)
    if likelihood == "regression":
        sigma = sigma_of(likelihood)
        log_lik = log_lik - N * N_OUT["mlp"] * math.log(sigma * math.sqrt(2 * math.pi))
    logdet = torch.linalg.slogdet(expected)[1]
    scatter = (p0 * theta_of(m) ** 2).sum()
    lml = log_lik - 0.5 * (logdet - p0.log().sum() + scatter)
    assert_close(la.log_det_posterior_precision, logdet)
    assert_close(la.log_marginal_likelihood(), lml)
    J = query_jacobian("mlp", device)
    assert_close(la.functional_variance(J), J @ Sigma @ J.mT)


# ---- 2. evidence terms ---------------------------------------------------------------


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("structure,prior_kind", STRUCTURE_PRIORS)
def test_evidence_terms_match_dense_formulas(structure, prior_kind, likelihood, device):
    m = make_model("mlp", device)
    prior = prior_of(prior_kind, m)
    mu0 = 0.1 * torch.randn(n_params(m), generator=gen(4), dtype=DT).to(device)
    la = fitted(
        "mlp", likelihood, structure, device, prior_precision=prior, prior_mean=mu0
    )

    sigma = sigma_of(likelihood)
    factor = factor_of(sigma)
    log_lik = -factor * train_loss("mlp", likelihood, device)
    if likelihood == "regression":
        log_lik = log_lik - N * N_OUT["mlp"] * math.log(sigma * math.sqrt(2 * math.pi))
    p0 = p0_of(prior, m)
    P = oracle_precision("mlp", likelihood, structure, prior, device=device)
    sign, logdet_P = torch.linalg.slogdet(P)
    assert sign == 1
    scatter = (p0 * (theta_of(m) - mu0) ** 2).sum()

    assert_close(la.log_likelihood, log_lik)
    assert_close(la.scatter, scatter)
    assert_close(la.log_det_posterior_precision, logdet_P)
    assert_close(la.log_det_prior_precision, p0.log().sum())
    assert_close(la.log_det_ratio, logdet_P - p0.log().sum())
    expected = log_lik - 0.5 * (logdet_P - p0.log().sum() + scatter)
    assert_close(la.log_marginal_likelihood(), expected)
    assert_close(
        expected,
        oracle_log_marglik(
            "mlp", likelihood, structure, prior, None, mu0, device=device
        ),
    )

    # new hyperparameters passed to log_marginal_likelihood replace the current ones
    new_prior = 2.5 * torch.as_tensor(prior, dtype=DT, device=device).reshape(-1)
    new_sigma = 1.3 if likelihood == "regression" else None
    value = la.log_marginal_likelihood(
        prior_precision=new_prior,
        sigma_noise=None
        if new_sigma is None
        else torch.tensor(new_sigma, dtype=DT, device=device),
    )
    assert_close(
        value,
        oracle_log_marglik(
            "mlp", likelihood, structure, new_prior, new_sigma, mu0, device=device
        ),
    )
    # a scalar prior mean
    la.prior_mean = 0.3
    assert_close(la.scatter, (p0_of(new_prior, m) * (theta_of(m) - 0.3) ** 2).sum())


# ---- 3. functional variance and the GLM predictive -----------------------------------


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("arch,structure", ARCH_STRUCTURES)
def test_functional_variance_is_J_Pinv_Jt(arch, structure, likelihood, device):
    m = make_model(arch, device)
    prior = a_prior_for(structure, m)
    la = fitted(arch, likelihood, structure, device, prior_precision=prior)
    J = query_jacobian(arch, device)
    f_mu, f_var = oracle_glm(arch, likelihood, structure, prior, device)
    assert_close(la.functional_variance(J), f_var)

    Sigma = torch.linalg.inv(
        oracle_precision(arch, likelihood, structure, prior, device=device)
    )
    J_flat = J.reshape(-1, J.shape[-1])
    f_cov = J_flat @ Sigma @ J_flat.T
    assert_close(la.functional_covariance(J), f_cov)
    assert_close(la.functional_covariance(J_flat), f_cov)

    if likelihood != "regression":
        return
    x = query_inputs(arch, device)
    mean, var = la(x)
    assert_close(mean, f_mu)
    assert_close(var, f_var)
    mean, var = la(x, diagonal_output=True)
    assert_close(mean, f_mu)
    assert_close(var, f_var.diagonal(dim1=-2, dim2=-1))
    mean, cov = la(x, joint=True)
    assert_close(mean, f_mu.flatten())
    assert_close(cov, f_cov)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_changed_hyperparameters_and_refits_reach_every_quantity(
    structure, likelihood, device
):
    """A posterior cached at an old curvature, prior, noise or temperature must not
    leak into the precision, the evidence (also its gradient path) or the
    predictive: each change is followed by a check against the oracle."""
    m = make_model("mlp", device)
    x, y = train_data("mlp", likelihood, device)
    xq, J = query_inputs("mlp", device), query_jacobian("mlp", device)
    with torch.no_grad():
        f_mu = m(xq)

    def check(prior, sigma, temperature):
        P = oracle_precision(
            "mlp", likelihood, structure, prior, sigma, temperature, device=device
        )
        assert_close(dense_precision(la), P)
        f_var = J @ torch.linalg.inv(P) @ J.mT
        assert_close(la.functional_variance(J), f_var)
        if likelihood == "regression":
            assert_close(la(xq)[1], f_var)
        else:
            var = f_var.diagonal(dim1=-2, dim2=-1)
            assert_close(
                la(xq), torch.softmax(f_mu / (1 + math.pi / 8 * var).sqrt(), -1)
            )
        args = ("mlp", likelihood, structure)
        expected = oracle_log_marglik(
            *args, prior, sigma, temperature=temperature, device=device
        )
        assert_close(la.log_marginal_likelihood(), expected)
        # differentiable priors (full + scalar: the eigenvalue path of the log-det)
        for value in (prior, 0.7):
            tracked = torch.as_tensor(value, dtype=DT, device=device)
            tracked = tracked.reshape(-1).clone()
            assert_close(
                la.log_marginal_likelihood(tracked.requires_grad_(True)),
                oracle_log_marglik(
                    *args, value, sigma, temperature=temperature, device=device
                ),
            )
        la.prior_precision = prior  # back from the tracked values ...
        assert_close(dense_precision(la), P)  # ... and the posterior cached again

    sigma = sigma_of(likelihood)
    la = fitted("mlp", likelihood, structure, device, prior_precision=0.5)
    la.fit(loader(x[:6], y[:6]))  # another curvature, used by every quantity ...
    dense_precision(la), la.functional_variance(J), la(xq), la.log_marginal_likelihood()
    for value in (0.5, 0.7):
        la.log_marginal_likelihood(
            torch.tensor([value], dtype=DT, device=device, requires_grad=True)
        )
    la.prior_precision = 0.5
    la.fit(loader(x, y))  # ... then a refit on all the data
    check(0.5, sigma, TEMPERATURE)
    prior = a_prior_for(structure, m)
    la.prior_precision = prior
    check(prior, sigma, TEMPERATURE)
    if likelihood == "regression":
        la.sigma_noise = sigma = 1.3
        check(prior, sigma, TEMPERATURE)
    la.temperature = 0.6
    check(prior, sigma, 0.6)


@pytest.mark.parametrize("structure", ["full", "kron"])
def test_glm_predictive_samples_have_the_glm_moments(structure, device):
    m = make_model("mlp", device)
    prior = a_prior_for(structure, m)
    la = fitted("mlp", "regression", structure, device, prior_precision=prior)
    x = query_inputs("mlp", device)
    f_mu, f_var = oracle_glm("mlp", "regression", structure, prior, device)
    n = 20_000
    f = la.predictive_samples(x, "glm", n_samples=n, generator=gen(18, device))
    assert f.shape == (n, *f_mu.shape)
    # mean within 5 and each covariance entry within 6 standard errors (see
    # test_samples_have_the_posterior_moments)
    var = f_var.diagonal(dim1=-2, dim2=-1)
    assert ((f.mean(0) - f_mu).abs() < 5 * (var / n).sqrt()).all()
    cov = torch.einsum("snc,snd->ncd", f - f.mean(0), f - f.mean(0)) / (n - 1)
    se = ((f_var**2 + var[:, :, None] * var[:, None, :]) / n).sqrt()
    assert ((cov - f_var).abs() < 6 * se).all()
    diag = la.predictive_samples(
        x, "glm", n_samples=n, diagonal_output=True, generator=gen(18, device)
    )
    assert ((diag.var(0) - var).abs() < 6 * (2 * var**2 / n).sqrt()).all()


# ---- 4. classification links ---------------------------------------------------------


@pytest.mark.parametrize("arch,structure", ARCH_STRUCTURES)
def test_probit_and_bridges(arch, structure, device):
    m = make_model(arch, device)
    prior = a_prior_for(structure, m)
    la = fitted(arch, "classification", structure, device, prior_precision=prior)
    x = query_inputs(arch, device)
    f_mu, f_var = oracle_glm(arch, "classification", structure, prior, device)
    kappa = 1 / torch.sqrt(1 + math.pi / 8 * f_var.diagonal(dim1=-2, dim2=-1))
    expected = torch.softmax(kappa * f_mu, dim=-1)
    assert_close(la(x, link_approx="probit"), expected)
    assert_close(la(x), expected)  # probit is the default
    assert_close(la(x, link_approx="probit", diagonal_output=True), expected)
    for link in ("bridge", "bridge_norm"):
        probs = la(x, link_approx=link)
        assert probs.shape == f_mu.shape
        assert ((probs >= 0) & (probs <= 1)).all()
        assert_close(probs.sum(-1), torch.ones(len(x), dtype=DT, device=device))


@pytest.mark.parametrize("structure", ["full", "kron"])
def test_mc_link_averages_softmax_over_the_glm_gaussian(structure, device):
    m = make_model("mlp", device)
    prior = a_prior_for(structure, m)
    la = fitted("mlp", "classification", structure, device, prior_precision=prior)
    x = query_inputs("mlp", device)
    f_mu, f_var = oracle_glm("mlp", "classification", structure, prior, device)

    # reference E[softmax(f)], f ~ N(f_mu, f_var), from many samples of our own
    S, S_ref = 20_000, 100_000
    lam, V = torch.linalg.eigh(f_var)
    root = V * lam.clamp_min(0).sqrt()[:, None, :]
    eps = torch.randn(S_ref, *f_mu.shape, generator=gen(6), dtype=DT).to(device)
    softmax = torch.softmax(f_mu + torch.einsum("ncd,snd->snc", root, eps), -1)
    reference, sd = softmax.mean(0), softmax.std(0)

    probs = la(x, link_approx="mc", n_samples=S, generator=gen(5, device))
    # both estimates are means of i.i.d. draws of softmax(f) with standard deviation
    # sd: a 5-standard-error band around the reference holds with overwhelming
    # probability for each of the n * C entries
    tol = 5 * sd * (1 / math.sqrt(S) + 1 / math.sqrt(S_ref))
    assert ((probs - reference).abs() <= tol).all(), (probs - reference).abs() / tol
    assert_close(probs.sum(-1), torch.ones(len(x), dtype=DT, device=device))
    again = la(x, link_approx="mc", n_samples=S, generator=gen(5, device))
    assert torch.equal(probs, again)


# ---- 5. log density ------------------------------------------------------------------


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_log_prob_is_the_gaussian_posterior_density(structure, likelihood, device):
    m = make_model("mlp", device)
    prior = a_prior_for(structure, m)
    la = fitted("mlp", likelihood, structure, device, prior_precision=prior)
    P = oracle_precision("mlp", likelihood, structure, prior, device=device)
    theta = theta_of(m)
    mvn = MultivariateNormal(theta, precision_matrix=P)
    eps = torch.randn(5, len(theta), generator=gen(8), dtype=DT)
    values = theta + 0.05 * eps.to(device)
    delta = values - theta
    square = ((delta @ P) * delta).sum(-1)

    assert_close(la.log_prob(values), mvn.log_prob(values))
    assert_close(la.log_prob(values[0]), mvn.log_prob(values[0]))
    assert_close(la.square_norm(values), square)
    assert_close(la.square_norm(values[0]), square[0])
    assert_close(la.log_prob(values, normalized=False), -0.5 * square)
    assert_close(la.log_prob(values[1], normalized=False), -0.5 * square[1])


# ---- 6. Bayesian linear regression in closed form ------------------------------------


def linear_problem(bias: bool, orthogonal: bool, device):
    """``y = X w + noise`` and the exact posterior of ``nn.Linear(D, 1)``.

    With ``orthogonal`` the columns of ``X`` are orthogonal to each other and to the
    ones column, so ``X~^T X~`` is diagonal: then the diagonal and the KFAC (whose
    only dropped term is the weight-bias cross term ``X^T 1``) curvatures are exact.
    Drawn on the CPU, everything moved to ``device``.
    """
    D, n, s, a = 3, 12, 0.4, 2.0
    g = gen(9)
    X = torch.randn(n, D, generator=g, dtype=DT)
    if orthogonal:
        ones = torch.ones(n, 1, dtype=DT)
        Q = torch.linalg.qr(torch.cat([ones, X], 1)).Q[:, 1:]
        X = Q * torch.tensor([3.0, 2.0, 1.5], dtype=DT)
    y = X @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=DT) + 0.3
    y = y + s * torch.randn(n, 1, generator=g, dtype=DT)

    def features(Z):  # X~: a column of ones for the bias
        ones = torch.ones(len(Z), 1, dtype=DT, device=Z.device)
        return torch.cat([Z, ones], 1) if bias else Z

    Xt = features(X)
    P = Xt.T @ Xt / s**2 + a * torch.eye(Xt.shape[1], dtype=DT)
    mean = torch.linalg.solve(P, Xt.T @ y / s**2)[:, 0]
    lin = nn.Linear(D, 1, bias=bias).to(DT)
    with torch.no_grad():
        lin.weight.copy_(mean[:D].reshape(1, D))
        if bias:
            lin.bias.copy_(mean[D:])
    evidence = MultivariateNormal(
        torch.zeros(n, dtype=DT), s**2 * torch.eye(n, dtype=DT) + Xt @ Xt.T / a
    ).log_prob(y[:, 0])
    X, y, P, mean, evidence = (t.to(device) for t in (X, y, P, mean, evidence))
    return lin.to(device), X, y, s, a, features, P, mean, evidence


@pytest.mark.parametrize(
    "structure,bias,orthogonal",
    [
        ("full", True, False),
        ("full", False, False),
        ("lowrank", True, False),
        ("kron", False, False),  # one output, no bias: kron(G, A) = X^T X exactly
        ("kron", True, True),
        ("diag", True, True),
    ],
)
def test_bayesian_linear_regression_is_exact(structure, bias, orthogonal, device):
    lin, X, y, s, a, features, P, mean, evidence = linear_problem(
        bias, orthogonal, device
    )
    kwargs = {"rank": len(mean)} if structure == "lowrank" else {}
    la = Laplace(
        lin, "regression", "all", structure, sigma_noise=s, prior_precision=a, **kwargs
    )
    la.fit(loader(X, y))
    assert_close(la.mean, mean)
    assert_close(dense_precision(la), P)
    xq = torch.randn(5, X.shape[1], generator=gen(10), dtype=DT).to(device)
    f_mu, f_var = la(xq)
    Xq = features(xq)
    assert_close(f_mu, Xq @ mean[:, None])
    assert_close(f_var, (Xq @ torch.linalg.solve(P, Xq.T)).diagonal()[:, None, None])
    # the Laplace evidence of a linear-Gaussian model at the exact MAP is exact
    assert_close(la.log_marginal_likelihood(), evidence)


# ---- 7. gradients of the evidence ----------------------------------------------------


def _directions(prior: torch.Tensor) -> list[torch.Tensor]:
    if prior.numel() <= 8:  # every coordinate
        return list(torch.eye(prior.numel(), dtype=DT, device=prior.device))
    g = gen(11)
    return [
        torch.randn(prior.numel(), generator=g, dtype=DT).to(prior.device)
        for _ in range(3)
    ]


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("structure,prior_kind", STRUCTURE_PRIORS)
def test_log_marglik_gradients_match_finite_differences(
    structure, prior_kind, likelihood, device
):
    m = make_model("mlp", device)
    prior0 = torch.as_tensor(prior_of(prior_kind, m), dtype=DT, device=device)
    prior0 = prior0.reshape(-1)
    sigma0 = torch.tensor(sigma_of(likelihood), dtype=DT, device=device)
    la = fitted("mlp", likelihood, structure, device, prior_precision=prior0)

    def oracle(prior, sigma):
        return oracle_log_marglik(
            "mlp", likelihood, structure, prior, sigma, device=device
        )

    prior = prior0.clone().requires_grad_(True)
    regression = likelihood == "regression"
    sigma = sigma0.clone().requires_grad_(True) if regression else None
    value = la.log_marginal_likelihood(prior_precision=prior, sigma_noise=sigma)
    assert_close(value, oracle(prior0, sigma0).detach())
    grads = torch.autograd.grad(value, [prior, sigma] if regression else [prior])

    # central differences of the dense oracle; float64, error O(h^2) + O(eps / h)
    h = 1e-5
    for v in _directions(prior0):
        fd = (oracle(prior0 + h * v, sigma0) - oracle(prior0 - h * v, sigma0)) / (2 * h)
        assert_close(grads[0] @ v, fd, rtol=1e-6, atol=1e-7)
    if regression:
        fd = (oracle(prior0, sigma0 + h) - oracle(prior0, sigma0 - h)) / (2 * h)
        assert_close(grads[1], fd, rtol=1e-6, atol=1e-7)


# ---- 8. backpropagation to the inputs ------------------------------------------------


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_glm_predictive_gradient_wrt_inputs(structure, likelihood, device):
    la = fitted("mlp", likelihood, structure, device, enable_backprop=True)
    x0 = query_inputs("mlp", device)[:3].clone()
    w = torch.randn(3, N_OUT["mlp"], generator=gen(12), dtype=DT).to(device)

    def outputs(x):
        if likelihood == "regression":
            f_mu, f_var = la(x)
            return [(w * f_mu).sum(), f_var.sum()]
        return [(w * la(x, link_approx="probit")).sum()]

    x = x0.clone().requires_grad_(True)
    values = outputs(x)
    grads = [torch.autograd.grad(v, x, retain_graph=True)[0] for v in values]
    h = 1e-6
    fd = [torch.zeros_like(x0) for _ in values]
    for i in range(x0.numel()):
        xp, xm = x0.clone(), x0.clone()
        xp.view(-1)[i] += h
        xm.view(-1)[i] -= h
        for k, (vp, vm) in enumerate(zip(outputs(xp), outputs(xm))):
            fd[k].view(-1)[i] = (vp.detach() - vm.detach()) / (2 * h)
    for g, f in zip(grads, fd):
        assert_close(g, f, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_predictive_does_not_track_the_input_without_enable_backprop(
    structure, likelihood, device
):
    la = fitted("mlp", likelihood, structure, device)
    x = query_inputs("mlp", device).clone().requires_grad_(True)
    outs = [la(x), la(x, pred_type="nn", link_approx="mc", n_samples=3)]
    if likelihood == "regression":
        outs.append(la(x, joint=True))
    else:
        outs += [la(x, link_approx=link) for link in ("bridge", "bridge_norm", "mc")]
    for out in outs:
        for t in out if isinstance(out, tuple) else (out,):
            assert not t.requires_grad


# ---- 9. sampling ---------------------------------------------------------------------


@pytest.mark.parametrize("structure", STRUCTURES)
def test_samples_have_the_posterior_moments(structure, device):
    m = make_model("mlp", device)
    prior = a_prior_for(structure, m)
    la = fitted("mlp", "regression", structure, device, prior_precision=prior)
    n = 20_000
    samples = la.sample(n, generator=gen(13, device))
    P = n_params(m)
    assert samples.shape == (n, P)
    Sigma = torch.linalg.inv(
        oracle_precision("mlp", "regression", structure, prior, device=device)
    )
    var = Sigma.diagonal()

    # mean: each coordinate within 5 standard errors sqrt(var_i / n)
    err = (samples.mean(0) - theta_of(m)).abs()
    assert (err < 5 * (var / n).sqrt()).all(), (err / (var / n).sqrt()).max()
    # covariance: Var(S_ij) = (Sigma_ij^2 + Sigma_ii Sigma_jj) / n for Gaussian draws,
    # so each entry within 6 standard errors (4761 entries; the largest |z| seen is
    # about 3.7), and the Frobenius error within 1.5 times its root mean square
    # sqrt(E ||S - Sigma||_F^2) = sqrt((||Sigma||_F^2 + tr(Sigma)^2) / n): the
    # squared error is a sum of P^2 weakly dependent terms and concentrates at its
    # mean (seen: 0.96-0.99 times the root mean square)
    S = torch.cov(samples.T)
    se = ((Sigma**2 + var[:, None] * var[None, :]) / n).sqrt()
    assert ((S - Sigma).abs() < 6 * se).all(), ((S - Sigma).abs() / se).max()
    rms = ((Sigma.square().sum() + var.sum() ** 2) / n).sqrt()
    assert torch.linalg.norm(S - Sigma) < 1.5 * rms

    assert torch.equal(
        la.sample(7, generator=gen(14, device)), la.sample(7, generator=gen(14, device))
    )


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_float32_samples_have_the_posterior_moments(structure, device):
    """float32 draws come from the float32 posterior: the sample covariance of a
    float32 Laplace is within sampling error of the inverse of its own precision
    (taken in float64), as a float64 one is (laplace-torch's float32 Full 'nn'
    predictive was 6 standard errors off such draws on the compat scenario)."""
    m = make_model("mlp", device).float().to(device)
    x, y = train_data("mlp", "regression", device)
    la = Laplace(
        m, "regression", "all", structure, sigma_noise=0.7, prior_precision=1.0
    )
    la.fit(loader(x.float().to(device), y.float().to(device)))
    n = 20_000
    samples = la.sample(n, generator=torch.Generator(device).manual_seed(13))
    assert samples.dtype == torch.float32
    Sigma = torch.linalg.inv(dense_precision(la).double())
    var = Sigma.diagonal()
    S = torch.cov(samples.double().T)
    rms = ((Sigma.square().sum() + var.sum() ** 2) / n).sqrt()
    assert torch.linalg.norm(S - Sigma) < 1.5 * rms


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_nn_predictive_is_the_network_at_posterior_samples(
    structure, likelihood, device
):
    m = make_model("mlp", device)
    la = fitted(
        "mlp", likelihood, structure, device, prior_precision=a_prior_for(structure, m)
    )
    x = query_inputs("mlp", device)
    S = 40
    thetas = la.sample(S, generator=gen(15, device))
    f = torch.stack([network_at(m, theta, x) for theta in thetas])  # (S, n, C)

    out = la(
        x, pred_type="nn", link_approx="mc", n_samples=S, generator=gen(15, device)
    )
    samples = la.predictive_samples(x, "nn", n_samples=S, generator=gen(15, device))
    if likelihood == "regression":
        assert_close(out[0], f.mean(0))
        assert_close(out[1], f.var(0))
        assert_close(samples, f)
    else:
        assert_close(out, torch.softmax(f, -1).mean(0))
        assert_close(samples, torch.softmax(f, -1))
    assert samples.shape == (S, len(x), N_OUT["mlp"])

    glm = la.predictive_samples(x, "glm", n_samples=S, generator=gen(16, device))
    assert glm.shape == (S, len(x), N_OUT["mlp"])
    again = la.predictive_samples(x, "glm", n_samples=S, generator=gen(16, device))
    assert torch.equal(glm, again)


# ---- 10. sequential fits -------------------------------------------------------------


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_fits_on_two_parts_equal_one_fit_on_the_whole(structure, likelihood, device):
    x, y = train_data("mlp", likelihood, device)
    m = make_model("mlp", device)
    prior = prior_of("layerwise", m)
    kwargs = dict(
        sigma_noise=sigma_of(likelihood), temperature=TEMPERATURE, prior_precision=prior
    )
    la = Laplace(m, likelihood, "all", structure, **kwargs)
    la.fit(loader(x[:5], y[:5], batch_size=2))
    la.fit(loader(x[5:], y[5:], batch_size=3), override=False)
    whole = fitted("mlp", likelihood, structure, device, **kwargs)

    assert la.n_data == N
    assert_close(dense_precision(la), dense_precision(whole))
    assert_close(
        dense_precision(la),
        oracle_precision("mlp", likelihood, structure, prior, device=device),
    )
    assert_close(la.log_likelihood, whole.log_likelihood)
    assert_close(la.log_marginal_likelihood(), whole.log_marginal_likelihood())
    assert_close(
        la.log_marginal_likelihood(),
        oracle_log_marglik("mlp", likelihood, structure, prior, device=device),
    )


def test_lowrank_refuses_to_accumulate_fits(device):
    la = fitted("mlp", "regression", "lowrank", device, rank=5)
    x, y = train_data("mlp", "regression", device)
    with pytest.raises(ValueError):
        la.fit(loader(x, y), override=False)


# ---- 11. prior precision tuning ------------------------------------------------------


def scalar_evidence_maximiser(likelihood: str, structure: str, device) -> float:
    """``log p*`` maximising the dense evidence over a scalar prior ``p``.

    ``d evidence / d log p = 0.5 (P - sum_i p / (f lam_i + p) - p ||theta||^2)``,
    with ``lam`` the eigenvalues of the oracle ``H`` and ``f`` the factor, decreases
    strictly in ``p``: its unique root is found by bisection.
    """
    lam = torch.linalg.eigvalsh(oracle_curvature("mlp", likelihood, structure, device))
    lam = lam.clamp_min(0) * factor_of(sigma_of(likelihood))
    r2 = theta_of(make_model("mlp", device)).square().sum()

    def slope(log_p):
        p = math.exp(log_p)
        return 0.5 * (len(lam) - (p / (lam + p)).sum() - p * r2)

    lo, hi = -12.0, 12.0
    assert slope(lo) > 0 > slope(hi)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if slope(mid) > 0 else (lo, mid)
    return 0.5 * (lo + hi)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_marglik_tuning_finds_the_scalar_optimum(structure, likelihood, device):
    la = fitted("mlp", likelihood, structure, device)
    la.optimize_prior_precision(
        method="marglik", n_steps=200, lr=0.1, prior_structure="scalar"
    )
    assert la.prior_precision.shape == (1,)
    assert not la.prior_precision.requires_grad
    log_p_star = scalar_evidence_maximiser(likelihood, structure, device)
    assert abs(la.prior_precision.log().item() - log_p_star) < 1e-3


@pytest.mark.parametrize("likelihood", ["regression"])
@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_marglik_tuning_layerwise_is_stationary(structure, likelihood, device):
    la = fitted("mlp", likelihood, structure, device)
    la.optimize_prior_precision(
        method="marglik", n_steps=200, lr=0.1, prior_structure="layerwise"
    )
    log_p = la.prior_precision.log()
    assert log_p.shape == (len(trainable_params(make_model("mlp", device))),)

    def oracle(log_prior):
        return oracle_log_marglik(
            "mlp", likelihood, structure, log_prior.exp(), device=device
        )

    h = 1e-5
    for i in range(len(log_p)):
        e = torch.zeros_like(log_p)
        e[i] = h
        slope = (oracle(log_p + e) - oracle(log_p - e)) / (2 * h)
        assert abs(slope) < 1e-2, (i, slope)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_gridsearch_picks_the_grid_minimiser_of_the_validation_loss(structure, device):
    la = fitted("mlp", "classification", structure, device)
    m = make_model("mlp", device)
    g = gen(17)
    x_val = torch.randn(9, 3, generator=g, dtype=DT).to(device)
    y_val = torch.randint(0, N_OUT["mlp"], (9,), generator=g).to(device)

    def nll(probs, y):
        return -probs[torch.arange(len(y), device=y.device), y].log().mean()

    J = oracles.jacobian(m, x_val)
    with torch.no_grad():
        f_mu = m(x_val)
    H = oracle_curvature("mlp", "classification", structure, device)
    grid = torch.logspace(-2, 2, 9, dtype=DT, device=device)
    losses = []
    for p in grid:
        Sigma = torch.linalg.inv(
            H / TEMPERATURE + p * torch.eye(len(H), dtype=DT, device=device)
        )
        f_var = torch.einsum("ncp,pq,ncq->nc", J, Sigma, J)
        losses.append(
            nll(torch.softmax(f_mu / (1 + math.pi / 8 * f_var).sqrt(), -1), y_val)
        )
    losses = torch.stack(losses)
    best = int(losses.argmin())
    assert losses.sort().values[1] - losses[best] > 1e-6  # a clear winner ...
    assert 0 < best < len(grid) - 1  # ... inside the grid

    la.optimize_prior_precision(
        pred_type="glm",
        method="gridsearch",
        val_loader=loader(x_val, y_val, batch_size=4),
        loss=nll,
        log_prior_prec_min=-2,
        log_prior_prec_max=2,
        grid_size=9,
        link_approx="probit",
        prior_structure="scalar",
    )
    assert_close(la.prior_precision, grid[best].reshape(1))


def _eigvalsh_failing_in(monkeypatch, dtypes: tuple[torch.dtype, ...]) -> None:
    """``torch.linalg.eigvalsh`` that does not converge for matrices of ``dtypes``."""
    eigvalsh = torch.linalg.eigvalsh

    def flaky(A):
        if A.dtype in dtypes:
            raise torch.linalg.LinAlgError("failed to converge")
        return eigvalsh(A)

    monkeypatch.setattr(torch.linalg, "eigvalsh", flaky)


def test_spectrum_is_computed_in_float64_and_none_where_it_does_not_converge(
    monkeypatch,
):
    from laplace.parametric.full import symmetric_eigenvalues

    A = torch.randn(6, 6, generator=gen(5), dtype=DT)
    H = (A @ A.T).float()
    lam = symmetric_eigenvalues(H)
    assert lam.dtype == torch.float64  # not float32's eps * max|lambda| errors
    assert_close(lam, torch.linalg.eigvalsh(H.double()), rtol=1e-12, atol=1e-12)
    _eigvalsh_failing_in(monkeypatch, (torch.float64,))
    assert symmetric_eigenvalues(H) is None


def test_full_evidence_without_a_spectrum_uses_the_cholesky_factor(monkeypatch, device):
    """The scalar-prior evidence of Full reads the spectrum of ``H``; where no
    eigensolver converges, the log-determinant and its gradient come from the
    Cholesky factor of the posterior precision."""
    la = fitted("mlp", "classification", "full", device)
    _eigvalsh_failing_in(monkeypatch, (torch.float32, torch.float64))
    prior = torch.tensor([0.7], dtype=DT, device=device, requires_grad=True)
    la.prior_precision = prior
    P = la._h_factor * la.H + 0.7 * torch.eye(la.n_params, dtype=DT, device=device)
    logdet = la.log_det_posterior_precision
    assert_close(logdet, torch.logdet(P))
    logdet.backward()  # d log det P / d p0 = tr(P^-1)
    assert_close(prior.grad, torch.linalg.inv(P).trace().reshape(1))


def trained_mlp_and_data(steps: int, n_out: int = 2):
    """The MLP 3-5-``n_out`` after ``steps`` Adam steps on its regression data."""
    m = model("mlp", n_out)
    x, y = data("mlp", "regression", n=N, n_out=n_out)
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        oracles.loss("regression", m(x), y).backward()
        opt.step()
    return m, x, y


def test_tuned_evidence_is_the_reported_one_for_an_indefinite_hessian(device):
    """The evidence the marglik tuner maximises (prior requiring grad) and the one
    reported after tuning are one function: ``log det P`` from the eigenvalues of the
    exact Hessian as they are, negative ones included, equal to the dense
    ``slogdet`` of ``factor * H + p I``."""
    from laplace.curvature import CurvlinopsHessian

    m, x, y = trained_mlp_and_data(200)
    H = oracles.true_hessian(m, x, y, "regression")
    lam = torch.linalg.eigvalsh(H)
    assert (lam < -1e-4).sum() >= 3  # genuinely indefinite, not round-off
    sigma = 0.5
    la = Laplace(
        m.to(device),
        "regression",
        "all",
        "full",
        sigma_noise=sigma,
        backend=CurvlinopsHessian,
    )
    la.fit(loader(x.to(device), y.to(device)))
    la.optimize_prior_precision(method="marglik", n_steps=300, lr=0.1)
    p = la.prior_precision.detach()
    tuned = la.log_marginal_likelihood(prior_precision=p.clone().requires_grad_())
    reported = la.log_marginal_likelihood(prior_precision=p)
    assert not reported.requires_grad
    assert_close(reported, tuned.detach(), rtol=1e-12, atol=1e-12)

    factor = 1 / sigma**2
    theta = theta_of(m).cpu()
    p = p.cpu().double()

    def oracle(p):
        sign, logdet = torch.linalg.slogdet(
            factor * H + p * torch.eye(len(H), dtype=DT)
        )
        assert sign == 1
        log_lik = -factor * oracles.loss("regression", m.cpu()(x), y).detach()
        log_lik = log_lik - y.numel() * math.log(sigma * math.sqrt(2 * math.pi))
        return log_lik - 0.5 * (logdet - len(H) * p.log() + p * theta.square().sum())

    assert_close(reported.cpu(), oracle(p)[0])
    # the tuner stopped at a stationary point of the dense evidence
    h = 1e-5
    slope = (oracle(p * math.exp(h)) - oracle(p * math.exp(-h))) / (2 * h)
    assert abs(slope.item()) < 1e-4


def test_indefinite_full_posterior_precision_raises_on_both_paths(device):
    """Where ``factor * H + p`` has a negative eigenvalue the evidence is undefined:
    the reported and the tuned evidence both raise (laplace-torch returns NaN, or a
    finite number where an even count of eigenvalues is negative)."""
    from laplace.curvature import CurvlinopsHessian
    from laplace.parametric.precision import NotPositiveDefiniteError

    m, x, y = trained_mlp_and_data(0)
    lam_min = torch.linalg.eigvalsh(oracles.true_hessian(m, x, y, "regression"))[0]
    assert lam_min < -1
    la = Laplace(m.to(device), "regression", "all", "full", backend=CurvlinopsHessian)
    la.fit(loader(x.to(device), y.to(device)))
    p = torch.tensor([0.5 * -lam_min.item()], dtype=DT, device=device)
    with pytest.raises(NotPositiveDefiniteError):
        la.log_marginal_likelihood(prior_precision=p)
    with pytest.raises(NotPositiveDefiniteError):
        la.log_marginal_likelihood(prior_precision=p.clone().requires_grad_())
    # a LinAlgError, as the failed Cholesky users of laplace-torch catch
    with pytest.raises(torch.linalg.LinAlgError):
        la.log_marginal_likelihood(prior_precision=p)


def sine_regression_mlp():
    """laplace-torch's regression example: 150 points ``y = sin(x) + 0.3 eps`` on
    ``[0, 8]``, an MLP 1-50-1 trained 1000 full-batch Adam steps in float32."""
    g = gen(711)
    x = 8 * torch.rand(150, 1, generator=g)
    y = torch.sin(x) + 0.3 * torch.randn(150, 1, generator=g)
    torch.manual_seed(711)
    m = nn.Sequential(nn.Linear(1, 50), nn.Tanh(), nn.Linear(50, 1))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(1000):
        opt.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()
        opt.step()
    return m, x, y


def tune_prior_and_noise(la, steps: int = 1000) -> tuple[float, float]:
    """The example's loop: Adam on the log prior precision and the log noise."""
    dt = la.mean.dtype
    log_p = torch.ones(1, dtype=dt, device=la.mean.device, requires_grad=True)
    log_s = torch.ones(1, dtype=dt, device=la.mean.device, requires_grad=True)
    opt = torch.optim.Adam([log_p, log_s], lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        (-la.log_marginal_likelihood(log_p.exp(), log_s.exp())).backward()
        opt.step()
    la.prior_precision, la.sigma_noise = log_p.detach().exp(), log_s.detach().exp()
    return la.prior_precision.item(), la.sigma_noise.item()


def test_float32_tuning_reaches_the_float64_optimum(device):
    """A float32 Full Laplace tunes the prior and the noise to the float64 optimum.

    The GGN has ~130 eigenvalues at round-off level; from a float32 solver they
    carry errors of ``eps * max|lambda|`` ~ 1e-3 (factor times that: 1% of the
    optimal prior 0.09), and clamping the negative ones at 0 biased the evidence
    one way: the prior came out 6% and the evidence 0.6% off."""
    m, x, y = sine_regression_mlp()
    result = {}
    for dt in (torch.float32, torch.float64):
        m_dt = copy.deepcopy(m).to(device, dt)
        la = Laplace(m_dt, "regression", "all", "full")
        la.fit(DataLoader(TensorDataset(x.to(device, dt), y.to(device, dt)), 150))
        prior, sigma = tune_prior_and_noise(la)
        assert la.log_marginal_likelihood().dtype == dt
        result[dt] = prior, sigma, la.log_marginal_likelihood().item(), la
    p32, s32, ev32, _ = result[torch.float32]
    p64, s64, ev64, la64 = result[torch.float64]
    assert abs(ev32 / ev64 - 1) < 2e-3
    assert abs(s32 / s64 - 1) < 2e-3
    assert abs(p32 / p64 - 1) < 1e-2
    # the float64 evidence at the float32 hyperparameters is the float64 optimum
    at32 = la64.log_marginal_likelihood(
        torch.tensor([p32], dtype=DT, device=device),
        torch.tensor(s32, dtype=DT, device=device),
    )
    assert abs(at32.item() / ev64 - 1) < 1e-5
