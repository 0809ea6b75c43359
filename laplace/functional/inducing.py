r"""VaLLA's variational posterior over the outputs of the linearized network, pure
functions (Ortega, Santana and Hernández-Lobato, 2024).

The prior is the linearized network's GP, kernel ``K(x, x') = J(x) J(x')^T /
delta``. The posterior keeps the network's output as its mean and takes the
covariance of Cheng and Boots' decoupled basis on ``M`` inducing outputs ``u = f_c(z)``
(an input ``z_m`` and one output coordinate ``c_m`` each):

$$
    \Sigma(x, x') = K_{xx'} - K_{xZ} (K_{ZZ} + A^{-1})^{-1} K_{Zx'}, \qquad
    A = L L^\top,
$$

``L`` lower triangular. Written as ``K_{xZ} L B^{-1} L^T K_{Zx'}`` with ``B = I + L^T
K_ZZ L`` it needs no inverse of ``A`` or ``K_ZZ`` (``B >= I``). In weight space it is
``N(theta_MAP, (delta I + J_Z^T A J_Z)^{-1})``: a Laplace posterior whose curvature
``J_Z^T A J_Z`` lives on the inducing outputs; with the inducing outputs at every
training output and ``A`` the output Hessians over ``sigma^2 T`` it is the
linearized Laplace posterior.

Its KL divergence from the prior (of the covariance; the mean is not a
variational parameter) is

$$
    \mathrm{KL} = \tfrac12 \left(\log\det B - M + \operatorname{tr} B^{-1}\right),
$$

and the objective minimised by ``fit`` is ``-(N / (|b| T) sum_{n in b}
E_alpha(n) - KL)`` on a minibatch ``b``, with the alpha-energy ``E_alpha(n) =
(1 / alpha) log E_q[p(y_n | f_n)^alpha]`` (``alpha -> 0``: the expected log
likelihood of the ELBO): in closed form for the Gaussian (any alpha) and the
Poisson (``alpha = 0``), by the probit approximation for the softmax and the
Bernoulli (``alpha = 1``), and by Monte Carlo from the log-likelihoods of output
samples for any likelihood.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def packed_size(M: int) -> int:
    """Entries of a packed ``M x M`` lower triangle."""
    return M * (M + 1) // 2


def unpack_tril(packed: Tensor, M: int) -> Tensor:
    """The ``M x M`` lower-triangular matrix whose entries, in the order of
    ``torch.tril_indices(M, M)`` (row-major), are ``packed``."""
    if packed.shape != (packed_size(M),):
        raise ValueError(
            f"A packed {M} x {M} lower triangle has {packed_size(M)} entries; got "
            f"shape {tuple(packed.shape)}."
        )
    rows, cols = torch.tril_indices(M, M, device=packed.device)
    L = packed.new_zeros(M, M)
    return L.index_put((rows, cols), packed)


def identity_packed(M: int, **like) -> Tensor:
    """The packed identity: ``L = I`` (``A = I``)."""
    rows, cols = torch.tril_indices(M, M)
    return (rows == cols).to(**like)


class InducingSystem:
    """``B = I + L^T K_ZZ L`` factored once: the covariance, its whitened cross
    terms and the KL for given ``K_ZZ`` ``(M, M)`` and ``L`` ``(M, M)``."""

    def __init__(self, Kzz: Tensor, L: Tensor) -> None:
        M = Kzz.shape[0]
        eye = torch.eye(M, dtype=Kzz.dtype, device=Kzz.device)
        self.L = L
        B = eye + L.mT @ Kzz @ L
        self.chol = torch.linalg.cholesky(0.5 * (B + B.mT))

    def whiten(self, Kzx: Tensor) -> Tensor:
        """``W = chol(B)^{-1} L^T K_Zx`` ``(M, n)``: ``K_xZ (K_ZZ + A^{-1})^{-1}
        K_Zx = W^T W``."""
        return torch.linalg.solve_triangular(self.chol, self.L.mT @ Kzx, upper=False)

    def kl(self) -> Tensor:
        """``KL(q || p)`` of the covariance: ``(log det B - M + tr B^{-1}) / 2``."""
        M = self.chol.shape[0]
        logdet = 2 * self.chol.diagonal().log().sum()
        eye = torch.eye(M, dtype=self.chol.dtype, device=self.chol.device)
        inv_chol = torch.linalg.solve_triangular(self.chol, eye, upper=False)
        return 0.5 * (logdet - M + inv_chol.square().sum())


def covariance(Kxx: Tensor, W: Tensor) -> Tensor:
    """Joint covariance ``K_xx - W^T W`` ``(n, n)``."""
    return Kxx - W.mT @ W


def blocks(Kxx_blocks: Tensor, W: Tensor) -> Tensor:
    """Per-datum covariance ``(N, C, C)`` from the prior blocks ``(N, C, C)`` and
    ``W`` ``(M, N C)`` (datum-major columns)."""
    N, C, _ = Kxx_blocks.shape
    Wn = W.reshape(W.shape[0], N, C)
    return Kxx_blocks - torch.einsum("mnc,mnd->ncd", Wn, Wn)


def gaussian_energy(
    y: Tensor, mean: Tensor, var: Tensor, noise_var: Tensor, alpha: float
) -> Tensor:
    r"""``(1 / alpha) log E_q[N(y | f, s^2)^alpha]`` elementwise for ``f ~ N(mean,
    var)``, ``s^2 = noise_var``:

    $$
        \frac1\alpha\Big(\frac{1-\alpha}2 \log 2\pi s^2 - \frac12\log\alpha
        + \log N(y \mid \mu, s^2/\alpha + v)\Big),
    $$

    and for ``alpha = 0`` the limit ``log N(y | mu, s^2) - v / (2 s^2)``.
    """
    r2 = (y - mean).square()
    if alpha == 0:
        return -0.5 * (math.log(2 * math.pi) + noise_var.log() + (r2 + var) / noise_var)
    total = noise_var / alpha + var
    log_normal = -0.5 * (math.log(2 * math.pi) + total.log() + r2 / total)
    return (
        0.5 * (1 - alpha) * (math.log(2 * math.pi) + noise_var.log())
        - 0.5 * math.log(alpha)
        + log_normal
    ) / alpha


def probit_energy(logits: Tensor, variances: Tensor, y: Tensor) -> Tensor:
    """``log`` of the probit approximation of ``E_q[softmax(f)_y]`` ``(N,)`` (the
    energy of ``alpha = 1``): ``log_softmax(mu / sqrt(1 + pi v / 8))_y``."""
    scaled = logits / (1 + math.pi / 8 * variances).sqrt()
    return torch.log_softmax(scaled, dim=-1).gather(-1, y[:, None]).squeeze(-1)


def bernoulli_probit_energy(logits: Tensor, variances: Tensor, y: Tensor) -> Tensor:
    """``log`` of the probit approximation of ``E_q[prod_c Bernoulli(y_c |
    sigmoid(f_c))]`` ``(N,)`` (the energy of ``alpha = 1``), each label from its own
    marginal: ``sum_c log sigmoid((2 y_c - 1) mu_c / sqrt(1 + pi v_c / 8))``."""
    scaled = logits / (1 + math.pi / 8 * variances).sqrt()
    return torch.nn.functional.logsigmoid((2 * y - 1) * scaled).sum(-1)


def poisson_expected_log_likelihood(
    log_rates: Tensor, variances: Tensor, y: Tensor
) -> Tensor:
    """``E_q[log Poisson(y | exp(f))]`` ``(N,)`` for ``f ~ N(mu, v)`` per output (the
    energy of ``alpha = 0``), in closed form by the lognormal mean ``E[exp(f)] =
    exp(mu + v / 2)``: ``sum_c y_c mu_c - exp(mu_c + v_c / 2) - log(y_c!)``."""
    rate = (log_rates + variances / 2).exp()
    return (y * log_rates - rate - torch.lgamma(y + 1)).sum(-1)


def sampled_energy(log_lik: Tensor, alpha: float) -> Tensor:
    """Monte-Carlo energy ``(N,)`` from the log-likelihoods ``log p(y_n | f_s)``
    ``(S, N)`` of ``S`` output samples: ``(1/alpha) log mean_s p(y | f_s)^alpha``,
    and ``mean_s log p(y | f_s)`` for ``alpha = 0``."""
    if alpha == 0:
        return log_lik.mean(0)
    S = log_lik.shape[0]
    return (torch.logsumexp(alpha * log_lik, dim=0) - math.log(S)) / alpha


def kmeans(X: Tensor, k: int, generator: torch.Generator, n_iter: int = 50) -> Tensor:
    """``k`` centres ``(k, D)`` of the rows of ``X`` ``(N, D)`` by Lloyd's algorithm
    from a k-means++ start drawn with ``generator`` (on ``X``'s device); a centre
    left without points stays where it is."""
    N = X.shape[0]
    first = torch.randint(N, (1,), generator=generator, device=generator.device)
    centres = X[first.to(X.device)]
    for _ in range(1, k):
        d2 = torch.cdist(X, centres).square().min(1).values
        weights = d2 if bool(d2.sum() > 0) else torch.ones_like(d2)
        pick = torch.multinomial(weights.to(generator.device), 1, generator=generator)
        centres = torch.cat([centres, X[pick.to(X.device)]])
    for _ in range(n_iter):
        assign = torch.cdist(X, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, X)
        counts = torch.bincount(assign, minlength=k).to(X.dtype)[:, None]
        moved = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
        if torch.equal(moved, centres):
            break
        centres = moved
    return centres


__all__ = [
    "packed_size",
    "unpack_tril",
    "identity_packed",
    "InducingSystem",
    "covariance",
    "blocks",
    "gaussian_energy",
    "probit_energy",
    "bernoulli_probit_energy",
    "poisson_expected_log_likelihood",
    "sampled_energy",
    "kmeans",
]
