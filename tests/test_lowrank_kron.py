"""Low-rank plus isotropic Kronecker factors, ``F = U diag(s) U^T + c I``, against
dense oracles built in the test: the factor's construction and truncation, every
Kron/KronDecomposed operation on blocks holding such factors, and KronLaplace /
KronLLLaplace with ``low_rank_factors`` on an MLP and on a GPT-2 with LoRA adapters.

A dense oracle of a low-rank factor is formed from a *complete* orthonormal basis
(or from ``U diag(s) U^T + c I`` with an explicit identity); its Kronecker blocks
with ``torch.kron`` and their powers with ``torch.linalg.eigh``.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset

import laplace.utils.lowrank_factor as lowrank_factor
from laplace import KronLaplace, KronLLLaplace, Laplace
from laplace.utils import Kron, KronDecomposed, LowRankFactor
from oracles import jacobian

DTYPE = torch.float64


# -- dense oracles ------------------------------------------------------------------
def dense_factor(F: torch.Tensor | LowRankFactor) -> torch.Tensor:
    """A factor as a matrix, from its definition."""
    if isinstance(F, LowRankFactor):
        eye = torch.eye(F.n, dtype=F.U.dtype, device=F.U.device)
        return F.U @ torch.diag(F.s) @ F.U.T + F.c * eye
    return torch.diag(F) if F.ndim == 1 else F


def dense_blocks(kfacs, scale=1.0, deltas=None, damping=False) -> torch.Tensor:
    """``blockdiag(c F1 (x) F2 + d I)`` (damped: ``c (F1 + sqrt(d/c)) (x) (F2 +
    sqrt(d/c))``) of the factors, built explicitly."""
    blocks = []
    deltas = [0.0] * len(kfacs) if deltas is None else deltas
    for block, d in zip(kfacs, deltas, strict=True):
        Fs = [dense_factor(F) for F in block]
        eyes = [torch.eye(len(M), dtype=DTYPE, device=M.device) for M in Fs]
        if len(Fs) == 1:
            blocks.append(scale * Fs[0] + d * eyes[0])
        elif damping:
            root = math.sqrt(d / scale)
            blocks.append(
                scale * torch.kron(Fs[0] + root * eyes[0], Fs[1] + root * eyes[1])
            )
        else:
            K = torch.kron(Fs[0], Fs[1])
            blocks.append(
                scale * K + d * torch.eye(len(K), dtype=DTYPE, device=K.device)
            )
    return torch.block_diag(*blocks)


def dense_power(M: torch.Tensor, exponent: float) -> torch.Tensor:
    lam, Q = torch.linalg.eigh(M)
    return Q @ torch.diag(lam**exponent) @ Q.T


def random_low_rank(n, k, c, generator, device):
    """A ``LowRankFactor`` with ``k`` columns and its dense form from a complete
    orthonormal basis ``Q`` ``(n, n)``: eigenvalues ``s + c`` on ``Q[:, :k]``, ``c``
    on the rest."""
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=DTYPE))
    s = torch.rand(k, generator=generator, dtype=DTYPE) + 0.5
    eigenvalues = torch.cat([s + c, torch.full((n - k,), c, dtype=DTYPE)])
    dense = Q @ torch.diag(eigenvalues) @ Q.T
    factor = LowRankFactor(Q[:, :k].contiguous(), s, torch.tensor(c, dtype=DTYPE))
    return factor.to(device), dense.to(device)


def random_psd(n, generator, device):
    X = torch.randn(n, 2 * n, generator=generator, dtype=DTYPE)
    return (X @ X.T / (2 * n) + 0.1 * torch.eye(n, dtype=DTYPE)).to(device)


def mixed_kron(device, seed=0):
    """Blocks with low-rank factors everywhere they can be: both factors of a pair,
    one of them (beside a dense or a diagonal factor), a single block; and a dense
    block. Returns the factors and their dense forms."""
    g = torch.Generator().manual_seed(seed)

    def lr(n, k, c):
        return random_low_rank(n, k, c, g, device)

    def dense(n):
        M = random_psd(n, g, device)
        return M, M

    def diagonal(n):
        d = (torch.rand(n, generator=g, dtype=DTYPE) + 0.2).to(device)
        return d, torch.diag(d)

    layout = [
        [lr(5, 2, 0.3), lr(4, 1, 0.2)],
        [lr(6, 2, 0.1)],
        [dense(3), lr(5, 2, 0.4)],
        [lr(6, 3, 0.5), diagonal(4)],
        [diagonal(3), lr(4, 2, 0.25)],
        [dense(3)],
    ]
    kfacs = [[f for f, _ in block] for block in layout]
    denses = [[m for _, m in block] for block in layout]
    return kfacs, denses


def block_dense(denses) -> torch.Tensor:
    return torch.block_diag(
        *[torch.kron(b[0], b[1]) if len(b) == 2 else b[0] for b in denses]
    )


# -- the factor ------------------------------------------------------------------------
def test_random_low_rank_factor_matches_its_dense_form(device):
    g = torch.Generator().manual_seed(0)
    F, M = random_low_rank(7, 3, 0.4, g, device)
    assert_close(dense_factor(F), M)
    assert_close(F.to_dense(), M)
    assert_close(F.diagonal(), M.diagonal())
    assert_close(F.logdet(), torch.logdet(M))
    X = torch.randn(7, 4, generator=g, dtype=DTYPE).to(device)
    assert_close(F.matmul(X), M @ X)
    assert_close(F.rmatmul(X.T), X.T @ M)


def test_from_rows_within_the_rank_is_exact(device):
    g = torch.Generator().manual_seed(1)
    V = torch.randn(4, 9, generator=g, dtype=DTYPE).to(device)
    F = LowRankFactor.from_rows(V, rank=6)
    assert F.U.shape == (9, 4) and F.rank == 6
    assert_close(F.to_dense(), V.T @ V)
    assert_close(F.c, torch.zeros((), dtype=DTYPE, device=device))


def test_from_rows_keeps_the_top_eigenpairs_and_the_trace(device):
    """Rows within one truncation step (fewer than ``n - r``): the leading
    eigenpairs of ``V^T V`` exactly, the rest of its spectrum as their mean."""
    g = torch.Generator().manual_seed(2)
    n, r = 12, 3
    V = torch.randn(8, n, generator=g, dtype=DTYPE).to(device)
    F = LowRankFactor.from_rows(V, rank=r)
    lam, Q = torch.linalg.eigh(V.T @ V)
    lam, Q = lam.flip(0), Q.flip(1)
    assert_close(F.s + F.c, lam[:r])  # the leading eigenvalues, exact
    assert_close(F.U @ F.U.T, Q[:, :r] @ Q[:, :r].T)  # and their eigenspace
    assert_close(F.c, lam[r:].mean())  # the mean of the rest
    assert_close(torch.trace(F.to_dense()), torch.trace(V.T @ V))
    assert_close(F.U.T @ F.U, torch.eye(r, dtype=DTYPE, device=device))


def test_streaming_truncation_within_the_rank_is_exact(device, monkeypatch):
    """Many batches of few rows (two rows per truncation step, then added factor
    by factor): the leading eigenpairs of the summed factor, exactly, when its
    rank is at most r."""
    monkeypatch.setattr(lowrank_factor, "ROWS_PER_STEP", 2)
    g = torch.Generator().manual_seed(3)
    n, true_rank, r = 10, 4, 5
    basis = torch.randn(true_rank, n, generator=g, dtype=DTYPE)
    batches = [
        (torch.randn(7, true_rank, generator=g, dtype=DTYPE) @ basis).to(device)
        for _ in range(6)
    ]
    total = LowRankFactor.from_rows(batches[0], r)
    for V in batches[1:]:
        total.add_(LowRankFactor.from_rows(V, r))
    V_all = torch.cat(batches)
    assert total.U.shape[1] <= r
    assert_close(total.to_dense(), V_all.T @ V_all)
    lam = torch.linalg.eigvalsh(V_all.T @ V_all).flip(0)
    assert_close(torch.sort(total.s + total.c, descending=True)[0][:true_rank], lam[:4])


def test_streaming_truncation_keeps_the_trace(device, monkeypatch):
    monkeypatch.setattr(lowrank_factor, "ROWS_PER_STEP", 3)
    g = torch.Generator().manual_seed(4)
    n, r = 10, 2
    batches = [torch.randn(5, n, generator=g, dtype=DTYPE).to(device) for _ in range(5)]
    total = LowRankFactor.from_rows(batches[0], r)
    for V in batches[1:]:
        total = total + LowRankFactor.from_rows(V, r)
    V_all = torch.cat(batches)
    assert total.U.shape == (n, r)
    assert_close(torch.trace(total.to_dense()), torch.trace(V_all.T @ V_all))
    assert bool((total.s >= 0).all()) and bool(total.c >= 0)
    assert_close(total.U.T @ total.U, torch.eye(r, dtype=DTYPE, device=device))


def test_from_dense_keeps_the_top_eigenpairs_and_the_trace(device):
    g = torch.Generator().manual_seed(5)
    M = random_psd(8, g, device)
    F = LowRankFactor.from_dense(M, rank=3)
    lam, Q = torch.linalg.eigh(M)
    lam, Q = lam.flip(0), Q.flip(1)
    assert_close(F.s + F.c, lam[:3])
    assert_close(F.U @ F.U.T, Q[:, :3] @ Q[:, :3].T)
    assert_close(F.c, lam[3:].mean())
    assert_close(torch.trace(F.to_dense()), torch.trace(M))


def test_sums_with_every_kind_of_factor_are_exact_within_the_rank(device):
    g = torch.Generator().manual_seed(6)
    F1, M1 = random_low_rank(6, 2, 0.3, g, device)
    F2, M2 = random_low_rank(6, 1, 0.2, g, device)
    F1.rank = F2.rank = 6
    dense = random_psd(6, g, device)
    diag = (torch.rand(6, generator=g, dtype=DTYPE) + 0.1).to(device)
    assert_close((F1 + F2).to_dense(), M1 + M2)
    assert_close((F1 + dense).to_dense(), M1 + dense)
    assert_close((dense + F1).to_dense(), M1 + dense)
    assert_close((F1 + diag).to_dense(), M1 + torch.diag(diag))
    assert_close((2.5 * F1).to_dense(), 2.5 * M1)
    assert_close((F1 / 4).to_dense(), M1 / 4)
    acc = F1.clone()
    acc.add_(F2, alpha=0.5)
    assert_close(acc.to_dense(), M1 + 0.5 * M2)
    assert_close(F1.to_dense(), M1)  # the clone was added to, not F1


def test_low_rank_factor_refuses_bad_input(device):
    U = torch.linalg.qr(torch.randn(5, 2, dtype=DTYPE))[0].to(device)
    s = torch.ones(2, dtype=DTYPE, device=device)
    with pytest.raises(ValueError, match="U must be a matrix"):
        LowRankFactor(U[:, 0], s, 0.1)
    with pytest.raises(ValueError, match=r"s must have shape \(2,\)"):
        LowRankFactor(U, s[:1], 0.1)
    with pytest.raises(ValueError, match="s and c must be >= 0"):
        LowRankFactor(U, -s, 0.1)
    with pytest.raises(ValueError, match="s and c must be >= 0"):
        LowRankFactor(U, s, -0.1)
    with pytest.raises(ValueError, match="rank must be an int >= the 2 columns"):
        LowRankFactor(U, s, 0.1, rank=1)
    F = LowRankFactor(U, s, 0.1)
    with pytest.raises(ValueError, match="scaled by a number >= 0"):
        F * -2.0
    with pytest.raises(TypeError, match="real number"):
        F * "2"
    with pytest.raises(ValueError, match="sizes 5 and 4"):
        F + LowRankFactor(U[:4], s, 0.1)
    with pytest.raises(ValueError, match=r"shape \(4, 4\)"):
        F + torch.eye(4, dtype=DTYPE, device=device)
    with pytest.raises(ValueError, match="needs the keys"):
        LowRankFactor.from_state({"U": U})


# -- Kron and KronDecomposed -------------------------------------------------------
def test_kron_operations_equal_the_dense_oracle(device):
    kfacs, denses = mixed_kron(device)
    K, M = Kron(kfacs), block_dense(denses)
    W = torch.randn(2, 3, M.shape[0], dtype=DTYPE).to(device)
    assert_close(K.to_matrix(), M)
    assert_close(K.bmm(W), W @ M)
    assert_close(K.logdet(), torch.logdet(M))
    assert_close(K.diag(), M.diagonal())
    assert K.block_sizes() == [20, 6, 15, 24, 12, 3]


def test_kron_add_scale_and_clone_equal_the_dense_oracle(device):
    kfacs, denses = mixed_kron(device, seed=0)
    other, other_denses = mixed_kron(device, seed=1)
    for block in kfacs + other:  # enough rank for exact sums
        for factor in block:
            if isinstance(factor, LowRankFactor):
                factor.rank = factor.n
    K, L = Kron(kfacs), Kron(other)
    summed = [
        [a + b for a, b in zip(x, y, strict=True)]
        for x, y in zip(denses, other_denses, strict=True)
    ]
    assert_close((K + L).to_matrix(), block_dense(summed))
    scale = torch.tensor(2.5, dtype=DTYPE, device=device)
    assert_close((K * scale).to_matrix(), 2.5 * block_dense(denses))
    assert_close((0.5 * K).to_matrix(), 0.5 * block_dense(denses))
    acc = K.clone()
    acc += L
    assert_close(acc.to_matrix(), block_dense(summed))
    assert_close(K.to_matrix(), block_dense(denses))  # the clone took the sum


@pytest.mark.parametrize("damping", [False, True])
@pytest.mark.parametrize("deltas", ["scalar", "per_block"])
def test_decomposed_operations_equal_the_dense_oracle(damping, deltas, device):
    kfacs, denses = mixed_kron(device)
    scale = 2.5
    d = (
        torch.full((len(kfacs),), 0.7, dtype=DTYPE, device=device)
        if deltas == "scalar"
        else torch.linspace(0.2, 1.5, len(kfacs), dtype=DTYPE, device=device)
    )
    K = Kron(kfacs).decompose(damping=damping) * scale + (
        d[0] if deltas == "scalar" else d
    )
    M = dense_blocks(kfacs, scale, d.tolist(), damping)
    W = torch.randn(2, 3, M.shape[0], dtype=DTYPE).to(device)
    assert_close(K.logdet(), torch.logdet(M))
    for exponent in (1, -1, -0.5, 0.5, 2):
        assert_close(K.bmm(W, exponent), W @ dense_power(M, exponent))
        assert_close(K.diag(exponent), dense_power(M, exponent).diagonal())
    assert_close(K.to_matrix(), M)
    assert_close(K.to_matrix(-1), torch.linalg.inv(M))
    assert_close(K.inv_square_form(W), W @ torch.linalg.inv(M) @ W.mT)
    spectrum = torch.cat([K.block_eigenvalues(i).flatten() for i in range(len(K))])
    assert_close(torch.sort(spectrum)[0], torch.linalg.eigvalsh(M))
    assert K.low_rank


def test_decompose_of_a_low_rank_factor_is_itself(device):
    g = torch.Generator().manual_seed(7)
    F, _ = random_low_rank(6, 2, 0.3, g, device)
    K = Kron([[F]]).decompose()
    (U,), (spectrum,) = K.eigenvectors[0], K.eigenvalues[0]
    assert U is F.U
    assert_close(spectrum.values, F.s + F.c)
    assert_close(spectrum.rest, F.c)
    assert spectrum.shape == (6,)


def test_decomposed_refuses_a_spectrum_without_its_vectors(device):
    g = torch.Generator().manual_seed(8)
    F, _ = random_low_rank(6, 2, 0.3, g, device)
    with pytest.raises(ValueError, match=r"must be U of shape \(6, 2\)"):
        KronDecomposed([[None]], [[F.eigenvalues()]])


def test_rank_at_least_n_gives_exactly_the_dense_kron(device):
    g = torch.Generator().manual_seed(9)
    Vs = [torch.randn(9, n, generator=g, dtype=DTYPE).to(device) for n in (4, 5, 3)]
    low = [LowRankFactor.from_rows(V, rank=V.shape[1]) for V in Vs]
    dense = [V.T @ V for V in Vs]
    for factor in low:
        assert factor.U.shape == (factor.n, factor.n)
        assert_close(factor.c, torch.zeros((), dtype=DTYPE, device=device))
    K_low, K_dense = Kron([low[:2], low[2:]]), Kron([dense[:2], dense[2:]])
    W = torch.randn(3, 23, dtype=DTYPE).to(device)
    assert_close(K_low.to_matrix(), K_dense.to_matrix())
    assert_close(K_low.bmm(W), K_dense.bmm(W))
    assert_close(K_low.logdet(), K_dense.logdet())
    for damping in (False, True):
        D_low = K_low.decompose(damping) * 1.7 + 0.3
        D_dense = K_dense.decompose(damping) * 1.7 + 0.3
        assert_close(D_low.logdet(), D_dense.logdet())
        assert_close(D_low.bmm(W, -0.5), D_dense.bmm(W, -0.5))
        assert_close(D_low.diag(-1), D_dense.diag(-1))


# -- KronLaplace -----------------------------------------------------------------------
def mlp(device, n_in=12, n_hidden=10, n_out=3):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(n_in, n_hidden), nn.Tanh(), nn.Linear(n_hidden, n_out)
    ).to(device, DTYPE)


def loader(likelihood, device, n=40, n_in=12, n_out=3, batch_size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, n_in, generator=g, dtype=DTYPE)
    if likelihood == "classification":
        y = torch.randint(0, n_out, (n,), generator=g)
    else:
        y = torch.randn(n, n_out, generator=g, dtype=DTYPE)
    return DataLoader(TensorDataset(X.to(device), y.to(device)), batch_size=batch_size)


def oracle_log_lik(model, data, likelihood, sigma):
    X, y = data.dataset.tensors
    with torch.no_grad():
        f = model(X)
    if likelihood == "classification":
        return -F.cross_entropy(f, y, reduction="sum")
    n_terms = f.numel()
    return -0.5 * ((y - f) ** 2).sum() / sigma**2 - n_terms * torch.log(
        sigma * math.sqrt(2 * math.pi)
    )


def oracle_log_marglik(la, data, likelihood, prior, sigma, damping):
    """``log p(D | theta_MAP) - 0.5 (log det P - log det P0 + p0 |theta|^2)`` with
    ``P`` dense from the fitted factors, differentiable in ``prior`` and ``sigma``."""
    c = 1 / sigma**2
    P = dense_blocks_grad(la.H.kfacs, c, prior, damping)
    n = P.shape[0]
    theta = la.mean
    log_det_ratio = torch.logdet(P) - n * torch.log(prior)
    scatter = prior * theta.square().sum()
    log_lik = oracle_log_lik(la.model, data, likelihood, sigma)
    return log_lik - 0.5 * (log_det_ratio + scatter)


def dense_blocks_grad(kfacs, c, d, damping):
    """``dense_blocks`` for tensors ``c`` and ``d`` that may require grad."""
    blocks = []
    for block in kfacs:
        Fs = [dense_factor(F) for F in block]
        eyes = [torch.eye(len(M), dtype=DTYPE, device=M.device) for M in Fs]
        if len(Fs) == 1:
            blocks.append(c * Fs[0] + d * eyes[0])
        elif damping:
            root = (d / c).sqrt()
            blocks.append(
                c * torch.kron(Fs[0] + root * eyes[0], Fs[1] + root * eyes[1])
            )
        else:
            K = torch.kron(Fs[0], Fs[1])
            blocks.append(c * K + d * torch.eye(len(K), dtype=DTYPE, device=K.device))
    return torch.block_diag(*blocks)


def fitted(device, likelihood="classification", damping=False, rank=3, **kw):
    model = mlp(device)
    data = loader(likelihood, device)
    sigma = {"sigma_noise": 0.8} if likelihood == "regression" else {}
    la = KronLaplace(
        model,
        likelihood,
        prior_precision=0.5,
        damping=damping,
        low_rank_factors=rank,
        low_rank_threshold=5,
        **sigma,
        **kw,
    )
    la.fit(data)
    return la, model, data


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("damping", [False, True])
def test_kron_laplace_evidence_and_gradients_equal_the_dense_oracle(
    likelihood, damping, device
):
    la, _, data = fitted(device, likelihood, damping)
    kinds = [[type(F).__name__ for F in block] for block in la.H.kfacs]
    # every factor above the threshold (5) is low rank, the 3 x 3 ones dense
    assert kinds == [
        ["LowRankFactor", "LowRankFactor"],
        ["LowRankFactor"],
        ["Tensor", "LowRankFactor"],
        ["Tensor"],
    ]
    prior = torch.tensor(0.9, dtype=DTYPE, device=device, requires_grad=True)
    sigma = torch.tensor(0.7, dtype=DTYPE, device=device, requires_grad=True)
    kw = {"sigma_noise": sigma} if likelihood == "regression" else {}
    value = la.log_marginal_likelihood(prior.reshape(1), **kw)
    oracle = oracle_log_marglik(
        la, data, likelihood, prior, sigma if kw else torch.ones_like(sigma), damping
    )
    assert_close(value, oracle)
    wrt = [prior, sigma] if kw else [prior]
    assert_close(torch.autograd.grad(value, wrt), torch.autograd.grad(oracle, wrt))


def test_kron_laplace_per_layer_prior_equals_the_dense_oracle(device):
    la, _, data = fitted(device)
    prior = torch.tensor([0.3, 0.9, 1.7, 2.2], dtype=DTYPE, device=device)
    la.prior_precision = prior
    sizes = [p.numel() for p in la.params]
    P = dense_blocks(la.H.kfacs, 1.0, prior.tolist()).to(device)
    p0 = torch.repeat_interleave(prior, torch.tensor(sizes, device=device))
    expected = oracle_log_lik(la.model, data, "classification", None) - 0.5 * (
        torch.logdet(P) - p0.log().sum() + (p0 * la.mean.square()).sum()
    )
    assert_close(la.log_marginal_likelihood(), expected)


@pytest.mark.parametrize("damping", [False, True])
def test_kron_laplace_predictives_and_samples_equal_the_dense_oracle(damping, device):
    la, model, data = fitted(device, damping=damping)
    P = dense_blocks(la.H.kfacs, 1.0, [0.5] * 4, damping)
    cov = torch.linalg.inv(P)
    X = data.dataset.tensors[0][:5]
    J = jacobian(model, X)
    f_var = J @ cov @ J.mT
    assert_close(la.functional_variance(J), f_var)
    assert_close(la.posterior_precision.to_matrix(), P)
    assert_close(la.posterior_variance, cov.diagonal())
    with torch.no_grad():
        f = model(X)
    probit = torch.softmax(
        f / (1 + math.pi / 8 * f_var.diagonal(dim1=-2, dim2=-1)).sqrt(), -1
    )
    assert_close(la(X, pred_type="glm", link_approx="probit"), probit)
    f_mu, f_var_glm = la._glm_distribution(X, joint=False, diagonal_output=False)
    assert_close(f_var_glm, f_var)
    # the NN predictive: the network averaged over the posterior's weight samples
    thetas = la.sample(4, generator=torch.Generator(device=device).manual_seed(2))
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    expected = torch.stack(
        [
            torch.softmax(
                torch.func.functional_call(
                    model,
                    {
                        n: t.reshape(s)
                        for n, t, s in zip(
                            names, theta.split([math.prod(s) for s in shapes]), shapes
                        )
                    },
                    (X,),
                ),
                -1,
            )
            for theta in thetas
        ]
    ).mean(0)
    predictive = la(
        X,
        pred_type="nn",
        link_approx="mc",
        n_samples=4,
        generator=torch.Generator(device=device).manual_seed(2),
    )
    assert_close(predictive, expected)
    # samples: covariance P^-1 (20000 draws: each entry within 7 standard errors)
    g = torch.Generator(device=device).manual_seed(0)
    samples = la.sample(20000, generator=g)
    empirical = torch.cov(samples.T)
    scale = cov.diagonal().max()
    assert_close(empirical, cov, atol=0.05 * scale.item(), rtol=0)
    assert_close(samples.mean(0), la.mean, atol=0.05 * scale.sqrt().item(), rtol=0)


def test_low_rank_within_the_rank_equals_dense_kron_laplace(device):
    """Two data (one per batch): every factor has rank at most 6 (the output side
    3 columns per datum), so rank 6 keeps them exactly, low rank as they are."""
    model = mlp(device)
    data = loader("classification", device, n=2, batch_size=1)
    low = KronLaplace(model, "classification", low_rank_factors=6, low_rank_threshold=5)
    low.fit(data)
    dense = KronLaplace(model, "classification")
    dense.fit(data)
    assert isinstance(low.H.kfacs[0][0], LowRankFactor)
    assert isinstance(low.H.kfacs[0][1], LowRankFactor)
    for a, b in zip(low.H.kfacs, dense.H.kfacs, strict=True):
        for F_low, F_dense in zip(a, b, strict=True):
            assert_close(dense_factor(F_low), F_dense)
    _same_posterior(low, dense, data, device)


def test_rank_above_every_dimension_equals_dense_kron_laplace(device):
    model = mlp(device)
    data = loader("classification", device)
    low = KronLaplace(
        model, "classification", low_rank_factors=12, low_rank_threshold=5
    )
    low.fit(data)
    dense = KronLaplace(model, "classification")
    dense.fit(data)
    _same_posterior(low, dense, data, device)


def _same_posterior(low, dense, data, device):
    assert_close(low.log_marginal_likelihood(), dense.log_marginal_likelihood())
    X = data.dataset.tensors[0][:2]
    assert_close(
        low(X, pred_type="glm", link_approx="probit"),
        dense(X, pred_type="glm", link_approx="probit"),
    )
    draws = [
        la.sample(3, generator=torch.Generator(device=device).manual_seed(0))
        for la in (low, dense)
    ]
    assert_close(draws[0], draws[1])
    nn_predictives = [
        la(
            X,
            pred_type="nn",
            link_approx="mc",
            n_samples=3,
            generator=torch.Generator(device=device).manual_seed(1),
        )
        for la in (low, dense)
    ]
    assert_close(nn_predictives[0], nn_predictives[1])


def test_fit_never_forms_a_large_dense_factor(device):
    """Spying on every torch function of ``fit``: no ``(n, n)`` tensor for the
    factors of dimension 30 and 40 (rank 4), and the fitted factors hold no
    tensor of more than ``r n`` entries."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 3))
    model = model.to(device, DTYPE)
    data = loader("classification", device, n=32, n_in=40, batch_size=16)
    la = KronLaplace(model, "classification", low_rank_factors=4, low_rank_threshold=20)
    large = {(30, 30), (40, 40)}
    seen = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple) else (out,):
                if isinstance(t, torch.Tensor) and tuple(t.shape[-2:]) in large:
                    seen.append((getattr(func, "__name__", func), tuple(t.shape)))
            return out

    with Spy():
        la.fit(data)
    assert not seen, seen
    _assert_compact(la.H, 4, 20)


def _assert_compact(H, rank, threshold):
    for block in H.kfacs:
        for F_ in block:
            if F_.shape[0] > threshold:
                assert isinstance(F_, LowRankFactor)
                for t in F_.tensors():
                    stored = t.untyped_storage().nbytes() // t.element_size()
                    assert max(t.numel(), stored) <= rank * F_.n


def test_fit_merges_low_rank_fits_as_one_fit_on_the_whole(device):
    """fit(override=False): within the rank, two halves equal the dense merge (the
    averaged input side weighted by the counts); beyond it the traces agree."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 3))
    model = model.to(device, DTYPE)
    first = loader("classification", device, n=3, n_in=20, batch_size=2, seed=1)
    second = loader("classification", device, n=1, n_in=20, batch_size=1, seed=2)
    results = {}
    for rank in (12, 2, None):
        la = KronLaplace(
            model, "classification", low_rank_factors=rank, low_rank_threshold=5
        )
        la.fit(first)
        la.fit(second, override=False)
        results[rank] = la
    exact, truncated, dense = results[12], results[2], results[None]
    assert isinstance(exact.H.kfacs[0][1], LowRankFactor)
    assert exact.n_data == 4
    for a, b, c in zip(exact.H.kfacs, truncated.H.kfacs, dense.H.kfacs, strict=True):
        for F_exact, F_trunc, F_dense in zip(a, b, c, strict=True):
            assert_close(dense_factor(F_exact), F_dense)
            assert_close(
                torch.trace(dense_factor(F_trunc)), torch.trace(dense_factor(F_dense))
            )
    assert_close(exact.log_marginal_likelihood(), dense.log_marginal_likelihood())


def _roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # plain tensors and numbers only


def test_state_dict_round_trip(device):
    la, model, data = fitted(device)
    state = _roundtrip(la.state_dict())
    other = KronLaplace(
        model, "classification", low_rank_factors=3, low_rank_threshold=5
    )
    other.load_state_dict(state)
    for a, b in zip(la.H.kfacs, other.H.kfacs, strict=True):
        for F_a, F_b in zip(a, b, strict=True):
            assert type(F_a) is type(F_b)
            assert_close(dense_factor(F_a), dense_factor(F_b))
    assert_close(other.log_marginal_likelihood(), la.log_marginal_likelihood())
    X = data.dataset.tensors[0][:3]
    assert_close(other(X, link_approx="probit"), la(X, link_approx="probit"))


def test_prior_before_fit_holds_no_dense_large_factor(device):
    la = KronLaplace(
        mlp(device), "classification", low_rank_factors=3, low_rank_threshold=5
    )
    state = la.state_dict()  # the zero curvature of the prior-only posterior
    _assert_compact(la.H, 3, 5)
    assert isinstance(state["H"]["kfacs"][0][0], dict)
    assert_close(la.H.to_matrix(), torch.zeros_like(la.H.to_matrix()))


def test_optimize_prior_precision_by_marglik_and_gridsearch(device):
    la, _, data = fitted(device)

    def oracle(p):
        p = torch.as_tensor(p, dtype=DTYPE, device=device)
        return oracle_log_marglik(
            la, data, "classification", p, torch.ones_like(p), False
        )

    la.optimize_prior_precision(method="marglik", n_steps=300, lr=0.1)
    best = la.prior_precision.detach()[0]
    grid = torch.logspace(-2, 2, 41, dtype=DTYPE).tolist()
    tuned = oracle(best)
    assert all(bool(tuned >= oracle(p) - 1e-4 * tuned.abs()) for p in grid)

    # gridsearch: the grid value of the smallest validation NLL under the oracle
    val = loader("classification", device, n=16, seed=5)
    X, y = val.dataset.tensors
    J = jacobian(la.model, X)
    with torch.no_grad():
        f = la.model(X)
    values = torch.logspace(-2, 2, 5, dtype=DTYPE).tolist()

    def nll(p):
        P = dense_blocks(la.H.kfacs, 1.0, [p] * 4)
        var = (J @ torch.linalg.inv(P) @ J.mT).diagonal(dim1=-2, dim2=-1)
        probs = torch.softmax(f / (1 + math.pi / 8 * var).sqrt(), -1)
        return -probs[torch.arange(len(y)), y].log().sum()

    la.optimize_prior_precision(
        method="gridsearch",
        val_loader=val,
        grid_size=5,
        log_prior_prec_min=-2,
        log_prior_prec_max=2,
    )
    expected = min(values, key=lambda p: float(nll(p)))
    assert_close(la.prior_precision[0].item(), expected)


def test_kron_ll_laplace_from_the_factory_equals_the_dense_oracle(device):
    model = mlp(device)
    data = loader("classification", device)
    la = Laplace(
        model,
        "classification",
        subset_of_weights="last_layer",
        hessian_structure="kron",
        low_rank_factors=3,
        low_rank_threshold=5,
        prior_precision=0.5,
    )
    assert isinstance(la, KronLLLaplace) and la.low_rank.rank == 3
    la.fit(data)
    (G, A), (B,) = la.H.kfacs
    assert isinstance(A, LowRankFactor) and A.U.shape == (10, 3)
    assert isinstance(G, torch.Tensor) and isinstance(B, torch.Tensor)
    # A: the features' phi^T phi / N, its trace kept by the truncation
    X, _ = data.dataset.tensors
    with torch.no_grad():
        phi = model[1](model[0](X))
    assert_close(torch.trace(dense_factor(A)), phi.square().sum() / len(X))
    P = dense_blocks(la.H.kfacs, 1.0, [0.5, 0.5])
    lml = oracle_log_lik(model, data, "classification", None) - 0.5 * (
        torch.logdet(P) - P.shape[0] * math.log(0.5) + 0.5 * la.mean.square().sum()
    )
    assert_close(la.log_marginal_likelihood(), lml)
    Xt = X[:4]
    Jt = jacobian(model[2], phi[:4])
    f_var = Jt @ torch.linalg.inv(P) @ Jt.mT
    f_mu, f_var_la = la._glm_distribution(Xt, joint=False, diagonal_output=False)
    assert_close(f_var_la, f_var)
    assert_close(la.functional_variance_fast(Xt), f_var.diagonal(dim1=-2, dim2=-1))


def test_kron_ll_laplace_within_the_rank_equals_the_dense_one(device):
    model = mlp(device)
    data = loader("classification", device, n=3, batch_size=2)
    low = KronLLLaplace(
        model, "classification", low_rank_factors=4, low_rank_threshold=3
    )
    low.fit(data)
    dense = KronLLLaplace(model, "classification")
    dense.fit(data)
    assert isinstance(low.H.kfacs[0][1], LowRankFactor)
    _same_posterior(low, dense, data, device)


def test_another_backend_is_truncated_as_it_arrives(device):
    """A backend handing dense factors (BackPACK): within the rank the factors and
    the evidence are those of the dense fit."""
    from laplace.curvature import BackPackGGN

    model = mlp(device)
    data = loader("classification", device, n=2, batch_size=1)
    kw = {"backend": BackPackGGN}
    low = KronLaplace(
        model, "classification", low_rank_factors=6, low_rank_threshold=5, **kw
    )
    low.fit(data)
    dense = KronLaplace(model, "classification", **kw)
    dense.fit(data)
    assert isinstance(low.H.kfacs[0][1], LowRankFactor)
    for a, b in zip(low.H.kfacs, dense.H.kfacs, strict=True):
        for F_low, F_dense in zip(a, b, strict=True):
            assert_close(dense_factor(F_low), F_dense)
    assert_close(low.log_marginal_likelihood(), dense.log_marginal_likelihood())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_models_keep_float32_low_rank_factors(dtype, device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3)).to(device)
    data64 = loader("classification", device)
    X, y = data64.dataset.tensors
    data = DataLoader(TensorDataset(X.to(dtype), y), batch_size=8)
    la = KronLaplace(
        model.to(dtype), "classification", low_rank_factors=3, low_rank_threshold=5
    )
    la.fit(data)
    lows = [F for block in la.H.kfacs for F in block if isinstance(F, LowRankFactor)]
    assert lows and all(t.dtype == torch.float32 for F in lows for t in F.tensors())
    assert torch.isfinite(la.log_marginal_likelihood())
    assert la(X[:2].to(dtype), link_approx="probit").dtype == dtype


# -- a GPT-2 with LoRA adapters ------------------------------------------------------
class Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(input_ids=x).logits


def gpt2_lora(device):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=1, n_embd=12, n_head=2, vocab_size=11, n_positions=8,
        num_labels=3, pad_token_id=0,
    )  # fmt: skip
    body = transformers.GPT2ForSequenceClassification(config)
    lora = peft.LoraConfig(
        r=2, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False
    )
    model = Logits(peft.get_peft_model(body, lora)).to(device, DTYPE).eval()
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(1, 11, (4, 5), generator=g)
    y = torch.randint(0, 3, (4,), generator=g)
    data = DataLoader(TensorDataset(x.to(device), y.to(device)), batch_size=2)
    return model, data


def test_gpt2_lora_low_rank_equals_the_dense_oracle_of_its_factors(device):
    model, data = gpt2_lora(device)
    la = KronLaplace(
        model, "classification", low_rank_factors=3, low_rank_threshold=8,
        prior_precision=0.5,
    )  # fmt: skip
    la.fit(data)
    # lora_A (2, 12): the 12 x 12 input side low rank; lora_B (36, 2): the 36 x 36
    # output side low rank
    shapes = [[tuple(F.shape) for F in block] for block in la.H.kfacs]
    assert shapes == [[(2, 2), (12, 12)], [(36, 36), (2, 2)]]
    assert isinstance(la.H.kfacs[0][1], LowRankFactor)
    assert isinstance(la.H.kfacs[1][0], LowRankFactor)
    _assert_compact(la.H, 3, 8)
    P = dense_blocks(la.H.kfacs, 1.0, [0.5, 0.5])
    lml = oracle_log_lik(model, data, "classification", None) - 0.5 * (
        torch.logdet(P) - P.shape[0] * math.log(0.5) + 0.5 * la.mean.square().sum()
    )
    assert_close(la.log_marginal_likelihood(), lml)
    X = data.dataset.tensors[0]
    J = jacobian(model, X)
    cov = torch.linalg.inv(P)
    f_mu, f_var = la._glm_distribution(X, joint=False, diagonal_output=False)
    assert_close(f_var, J @ cov @ J.mT)
    g = torch.Generator(device=device).manual_seed(0)
    samples = la.sample(20000, generator=g)
    assert_close(
        torch.cov(samples.T), cov, atol=0.05 * cov.diagonal().max().item(), rtol=0
    )


def test_gpt2_lora_within_the_rank_equals_dense_kron_laplace(device):
    """Two examples, one per batch: the 36-dimensional output side of lora_B has
    rank at most 30 (3 columns x 2 examples x 5 positions), so rank 30 keeps it
    exactly, low rank; rank 36 keeps every factor dense."""
    model, data = gpt2_lora(device)
    small = DataLoader(TensorDataset(*[t[:2] for t in data.dataset.tensors]))
    for rank, fit_data in ((30, small), (36, data)):
        low = KronLaplace(
            model, "classification", low_rank_factors=rank, low_rank_threshold=8
        )
        low.fit(fit_data)
        dense = KronLaplace(model, "classification")
        dense.fit(fit_data)
        assert isinstance(low.H.kfacs[1][0], LowRankFactor) == (rank == 30)
        _same_posterior(low, dense, fit_data, device)


# -- bad input ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"low_rank_factors": 0}, ValueError, "low_rank_factors must be a positive"),
        ({"low_rank_factors": -2}, ValueError, "low_rank_factors must be a positive"),
        ({"low_rank_factors": 2.5}, ValueError, "low_rank_factors must be a positive"),
        ({"low_rank_factors": True}, ValueError, "low_rank_factors must be a positive"),
        ({"low_rank_threshold": -1}, ValueError, "low_rank_threshold must be >= 0"),
        ({"low_rank_threshold": 1.5}, TypeError, "low_rank_threshold must be an int"),
    ],
)
def test_bad_options_are_refused_up_front(kwargs, error, match, device):
    with pytest.raises(error, match=match):
        KronLaplace(mlp(device), "classification", **{"low_rank_factors": 3, **kwargs})


def test_one_noise_per_output_is_refused_before_any_work(device):
    model = mlp(device)
    la = KronLaplace(
        model,
        "regression",
        sigma_noise=torch.tensor([0.5, 0.7, 0.9], dtype=DTYPE, device=device),
        low_rank_factors=3,
        low_rank_threshold=5,
    )
    with pytest.raises(ValueError, match="low_rank_factors is not available with one"):
        la.fit(loader("regression", device))
    assert not la.fitted


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_sum_of_16_bit_factors_is_taken_in_float32(dtype, device):
    """The square roots of 16-bit factors are taken after the cast to float32: the
    sum equals the float32 sum of the same (16-bit) values to float32 round-off."""
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(12, 3, generator=g))
    one = LowRankFactor(Q.to(device), torch.tensor([3.1, 1.7, 0.3], device=device), 0.1)
    two = LowRankFactor(
        Q.flip(1).to(device), torch.tensor([2.3, 0.9, 0.7], device=device), 0.2
    )
    low = [F.to(dtype) for F in (one, two)]
    total = low[0] + low[1]
    exact = sum(F.to(torch.float32).to_dense() for F in low)
    torch.testing.assert_close(total.to_dense().float(), exact, rtol=1e-5, atol=1e-5)


def test_a_rank_below_one_is_refused_before_any_decomposition(device):
    V = torch.randn(4, 6, device=device)
    for build in (
        LowRankFactor.from_rows,
        lambda V, r: LowRankFactor.from_dense(V.T @ V, r),
    ):
        with pytest.raises(ValueError, match="rank must be an int >= 1; got 0"):
            build(V, 0)


def test_truncation_falls_back_to_an_svd_where_the_gram_fails(device, monkeypatch):
    """Where the Gram's eigendecomposition fails (or gives non-finite values), the
    truncation comes from a float64 SVD of the square root: the same top
    eigenpairs and trace."""
    g = torch.Generator().manual_seed(3)
    V = torch.randn(9, 14, generator=g, dtype=torch.float64).to(device)
    expected = LowRankFactor.from_rows(V, 3)

    def fails(*args):
        raise torch.linalg.LinAlgError("not converged")

    monkeypatch.setattr(lowrank_factor, "_truncate_by_gram", fails)
    got = LowRankFactor.from_rows(V, 3)
    torch.testing.assert_close(got.to_dense(), expected.to_dense())
    F = V.T @ V
    torch.testing.assert_close(got.to_dense().trace(), F.trace())
    top = torch.linalg.eigvalsh(F).flip(0)[:3]
    torch.testing.assert_close(got.s + got.c, top)
