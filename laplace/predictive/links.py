"""Link approximations: from a Gaussian over logits to class probabilities.

The GLM predictive of a classifier is a Gaussian over the logits of each input,
``f ~ N(f_mu, f_var)`` with ``f_mu`` of shape ``(N, C)`` and ``f_var`` of shape
``(N, C, C)``. The predictive class probabilities ``E[softmax(f)]`` have no closed
form; the functions here approximate them. Each one is a pure function of
``(f_mu, f_var)`` that keeps autograd intact, so a predictive can be differentiated
with respect to the inputs of the network (e.g. for Bayesian optimisation).

Every function also accepts ``f_var`` in diagonal form, shape ``(N, C)`` with
``diag(Sigma_i)`` in row ``i``; it stands for the covariance
``torch.diag_embed(f_var)``, i.e. independent outputs. ``probit`` reads only
the marginal variances, so both forms give the same result there; the bridges also
use the row sums of the covariance (they condition on the logits summing to zero)
and ``sample_outputs`` uses the whole matrix, so for them the diagonal form is
an approximation whenever the outputs are correlated.

========================  ===================================================
name (``LinkApprox``)     function
========================  ===================================================
``"probit"``              ``probit``
``"bridge"``              ``bridge``
``"bridge_norm"``         ``bridge_norm``
``"mc"``                  ``mc_gaussian`` (= ``mc`` of ``sample_outputs``)
========================  ===================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from laplace.utils._checks import check_positive_int
from laplace.utils.enums import LinkApprox

__all__ = [
    "LINKS",
    "bridge",
    "bridge_norm",
    "condition_sum_zero",
    "dirichlet_from_gaussian",
    "link",
    "lognormal_moments",
    "marginal_variances",
    "mc",
    "mc_gaussian",
    "natural_gaussian_moments",
    "probit",
    "sample_outputs",
    "sigmoid_mc",
    "sigmoid_probit",
    "SAMPLING_LINKS",
]


# ---------------------------------------------------------------------- shapes


def _check_gaussian(f_mu: Tensor, f_var: Tensor, *, min_classes: int = 1) -> None:
    """Raise ``ValueError`` unless ``f_mu`` is ``(N, C)`` and ``f_var`` is
    ``(N, C, C)`` or ``(N, C)``."""
    if not isinstance(f_mu, Tensor) or not isinstance(f_var, Tensor):
        raise TypeError(
            "f_mu and f_var must be torch.Tensors, got "
            f"{type(f_mu).__name__} and {type(f_var).__name__}."
        )
    if f_mu.dim() != 2:
        raise ValueError(f"f_mu must have shape (N, C), got {tuple(f_mu.shape)}.")
    n, c = f_mu.shape
    if tuple(f_var.shape) not in ((n, c, c), (n, c)):
        raise ValueError(
            f"f_var must have shape (N, C, C) = {(n, c, c)} or, diagonal, "
            f"(N, C) = {(n, c)} to match f_mu; got {tuple(f_var.shape)}."
        )
    if c < min_classes:
        raise ValueError(f"this link needs at least {min_classes} classes, got C={c}.")


def marginal_variances(f_mu: Tensor, f_var: Tensor) -> Tensor:
    """Marginal variances ``Var[f_ik]`` of the Gaussian, shape ``(N, C)``.

    ``f_var`` is either the full covariance ``(N, C, C)``, whose diagonal is taken,
    or already the diagonal ``(N, C)``, which is returned as it is.
    """
    _check_gaussian(f_mu, f_var)
    if f_var.dim() == 3:
        return torch.diagonal(f_var, dim1=-2, dim2=-1)
    return f_var


# ---------------------------------------------------------------------- probit


def probit(f_mu: Tensor, f_var: Tensor) -> Tensor:
    r"""Extended probit approximation of ``E[softmax(f)]``.

    $$
        p_{ik} = \operatorname{softmax}_k\left(
            \frac{\mu_{ik}}{\sqrt{1 + \frac{\pi}{8}\,\Sigma_{i,kk}}}\right)
    $$

    Each logit is shrunk towards zero by its own marginal standard deviation;
    off-diagonal covariances are ignored.

    Parameters
    ----------
    f_mu : torch.Tensor, shape (N, C)
        predictive mean of the logits.
    f_var : torch.Tensor, shape (N, C, C) or (N, C)
        predictive covariance of the logits, or its diagonal.

    Returns
    -------
    probs : torch.Tensor, shape (N, C)
        rows sum to one.
    """
    var = marginal_variances(f_mu, f_var)
    kappa = torch.rsqrt(1.0 + (math.pi / 8.0) * var)
    return torch.softmax(kappa * f_mu, dim=-1)


# ---------------------------------------------------------------------- bridge


def condition_sum_zero(f_mu: Tensor, f_var: Tensor) -> tuple[Tensor, Tensor]:
    r"""Condition ``N(f_mu, f_var)`` on the logits summing to zero.

    The softmax is invariant to adding a constant to every logit, and the Laplace
    bridge is derived for Gaussians on the sum-zero subspace
    $\mathbf 1^\top f = 0$. With the row sums
    $r_i = \Sigma_i \mathbf 1$ and $s_i = \mathbf 1^\top \Sigma_i
    \mathbf 1 = \operatorname{Var}[\mathbf 1^\top f_i]$, Gaussian conditioning gives

    $$
        \mu'_i = \mu_i - r_i\,\frac{\mathbf 1^\top \mu_i}{s_i}, \qquad
        \Sigma'_{i,kk} = \Sigma_{i,kk} - \frac{r_{ik}^2}{s_i}.
    $$

    A row with $s_i = 0$ already has a deterministic sum (then
    $r_i = 0$ too) and is returned unchanged.

    Parameters
    ----------
    f_mu : torch.Tensor, shape (N, C)
    f_var : torch.Tensor, shape (N, C, C) or (N, C)
        covariance, or its diagonal (then the outputs are taken as independent and
        $r_i = \operatorname{diag}\Sigma_i$).

    Returns
    -------
    mu : torch.Tensor, shape (N, C)
        conditional mean.
    var : torch.Tensor, shape (N, C)
        conditional marginal variances (the diagonal of the conditional covariance).
    """
    var = marginal_variances(f_mu, f_var)
    rows = f_var.sum(dim=-1) if f_var.dim() == 3 else f_var
    total = rows.sum(dim=-1, keepdim=True)
    degenerate = total <= torch.finfo(total.dtype).tiny
    total = torch.where(degenerate, torch.ones_like(total), total)
    rows = torch.where(degenerate, torch.zeros_like(rows), rows)
    mu = f_mu - rows * (f_mu.sum(dim=-1, keepdim=True) / total)
    return mu, var - rows.square() / total


def _bridge_log_alpha(mu: Tensor, var: Tensor) -> Tensor:
    r"""``log alpha`` of the Laplace bridge, in a form that cannot overflow.

    With $b_k = e^{\mu_k} \sum_l e^{-\mu_l} / C^2$ and
    $a = 1 - 2/C$, $\alpha_k = (a + b_k) / \Sigma_{kk}$, so

    $$
        \log\alpha_k = \log b_k + \operatorname{log1p}(a / b_k) - \log\Sigma_{kk},
        \qquad \log b_k = \mu_k + \operatorname{logsumexp}_l(-\mu_l) - 2\log C.
    $$

    Since $\operatorname{logsumexp}(-\mu) \ge -\mu_k$, $b_k \ge 1/C^2$
    and ``a / b_k`` lies in ``[0, C^2]``; nothing is exponentiated unboundedly.
    Variances are floored at the smallest positive normal number of the dtype, so a
    zero variance gives a huge but finite ``alpha``.
    """
    c = mu.shape[-1]
    log_b = mu + torch.logsumexp(-mu, dim=-1, keepdim=True) - 2.0 * math.log(c)
    a = 1.0 - 2.0 / c
    tiny = torch.finfo(var.dtype).tiny
    return log_b + torch.log1p(a * torch.exp(-log_b)) - torch.log(var.clamp_min(tiny))


def dirichlet_from_gaussian(mu: Tensor, var: Tensor) -> Tensor:
    r"""The Laplace-bridge map from a Gaussian to Dirichlet parameters.

    $$
        \alpha_{ik} = \frac{1}{\Sigma_{i,kk}}\left(1 - \frac{2}{C}
            + \frac{e^{\mu_{ik}}}{C^2} \sum_{l=1}^{C} e^{-\mu_{il}}\right)
    $$

    (the Gaussian-to-Dirichlet direction of the bridge of Hobbhahn, Kristiadi &
    Hennig, 2022). This is the raw map; ``bridge`` first conditions the
    Gaussian on the sum-zero subspace.

    Parameters
    ----------
    mu : torch.Tensor, shape (N, C)
        Gaussian mean, ``C >= 2``.
    var : torch.Tensor, shape (N, C)
        marginal variances (floored at the dtype's smallest normal number).

    Returns
    -------
    alpha : torch.Tensor, shape (N, C)
    """
    _check_gaussian(mu, var, min_classes=2)
    return _bridge_log_alpha(mu, var).exp()


def bridge(f_mu: Tensor, f_var: Tensor) -> Tensor:
    r"""Laplace bridge: the mean of the Dirichlet matched to ``N(f_mu, f_var)``.

    The bridge of Hobbhahn, Kristiadi & Hennig (2022) is stated for a Gaussian on
    the sum-zero subspace of the logits, so the Gaussian is first conditioned on
    $\mathbf 1^\top f = 0$ (``condition_sum_zero``, giving $\mu'$
    and $\Sigma'_{kk}$) and then mapped to a Dirichlet with parameters

    $$
        \alpha_{ik} = \frac{1}{\Sigma'_{i,kk}}\left(1 - \frac{2}{C}
            + \frac{e^{\mu'_{ik}}}{C^2} \sum_{l=1}^{C} e^{-\mu'_{il}}\right),
    $$

    and the predictive probabilities are the Dirichlet mean
    $p_{ik} = \alpha_{ik} / \sum_l \alpha_{il}$. It is computed in log space
    (``softmax(log alpha)``), which is exact and does not overflow for large logits.
    The full covariance matters through the conditioning; with a diagonal ``f_var``
    the outputs are taken as independent. This is the convention of laplace-torch
    0.3, checked numerically in ``tests/test_links.py``.

    Parameters
    ----------
    f_mu : torch.Tensor, shape (N, C)
        predictive mean of the logits, ``C >= 2``.
    f_var : torch.Tensor, shape (N, C, C) or (N, C)
        predictive covariance of the logits, or its diagonal. Conditional variances
        should be positive; zeros are floored at the dtype's smallest normal number.

    Returns
    -------
    probs : torch.Tensor, shape (N, C)
        rows sum to one.

    See Also
    --------
    bridge_norm : the same after normalising the scale of the Gaussian.
    dirichlet_from_gaussian : the raw map, without conditioning.
    """
    _check_gaussian(f_mu, f_var, min_classes=2)
    mu, var = condition_sum_zero(f_mu, f_var)
    return torch.softmax(_bridge_log_alpha(mu, var), dim=-1)


def bridge_norm(f_mu: Tensor, f_var: Tensor) -> Tensor:
    r"""Laplace bridge after normalising the scale of the Gaussian.

    A variant of ``bridge`` that fixes the overall scale of the Gaussian before
    mapping it to a Dirichlet. After conditioning on the sum-zero subspace
    (``condition_sum_zero``, giving $\mu'$ and $\Sigma'_{kk}$), with
    the mean conditional variance $\bar\sigma^2_i = \frac1C\sum_k
    \Sigma'_{i,kk}$ and the scale

    $$
        s_i = \bar\sigma^2_i \,/\, \sqrt{C/2},
    $$

    the Gaussian is rescaled as

    $$
        \tilde\mu_{ik} = \mu'_{ik} / \sqrt{s_i}, \qquad
        \tilde\Sigma_{i,kk} = \Sigma'_{i,kk} / s_i,
    $$

    so that the rescaled variances average to $\sqrt{C/2}$, and the bridge
    of ``bridge`` (without a second conditioning) is applied to
    $(\tilde\mu, \tilde\Sigma)$. This is the convention of laplace-torch
    0.3, checked numerically in ``tests/test_links.py``.

    Parameters
    ----------
    f_mu : torch.Tensor, shape (N, C)
        predictive mean of the logits, ``C >= 2``.
    f_var : torch.Tensor, shape (N, C, C) or (N, C)
        predictive covariance of the logits, or its diagonal; the mean conditional
        variance of every row should be positive (it is floored at the dtype's
        smallest normal number).

    Returns
    -------
    probs : torch.Tensor, shape (N, C)
        rows sum to one.
    """
    _check_gaussian(f_mu, f_var, min_classes=2)
    mu, var = condition_sum_zero(f_mu, f_var)
    c = var.shape[-1]
    scale = var.mean(dim=-1, keepdim=True) / math.sqrt(c / 2.0)
    scale = scale.clamp_min(torch.finfo(var.dtype).tiny)
    return torch.softmax(_bridge_log_alpha(mu / scale.sqrt(), var / scale), dim=-1)


# ----------------------------------------------------------------- Monte Carlo


_MAX_RELATIVE_JITTER = 1e-4


def _psd_sqrt(cov: Tensor) -> Tensor:
    """A factor ``L`` with ``L @ L.mT ~= cov`` for a batch ``(N, C, C)`` of PSD
    matrices.

    The Cholesky factor is tried first. Matrices on which it fails (PSD but
    singular, or slightly indefinite from round-off) get a jitter
    ``eps * 10**k * mean(|diag|)`` on the diagonal (``mean(|diag|)`` taken as 1 for
    a zero diagonal), growing until the factorisation succeeds or the relative
    jitter would pass ``1e-4``; those still failing are factored by ``eigh`` with
    negative eigenvalues clipped to zero (whose gradient is undefined at repeated
    eigenvalues). The jitter is chosen without autograd; the final factorisation is
    differentiable in ``cov``.
    """
    n, c = cov.shape[0], cov.shape[-1]
    eye = torch.eye(c, dtype=cov.dtype, device=cov.device)
    jitter = torch.zeros(n, dtype=cov.dtype, device=cov.device)
    with torch.no_grad():
        failed = torch.linalg.cholesky_ex(cov).info != 0
        if bool(failed.any()):
            idx = failed.nonzero(as_tuple=True)[0]
            sub = cov[idx]
            diag = torch.diagonal(sub, dim1=-2, dim2=-1).abs().mean(-1)
            level = torch.where(diag > 0, diag, torch.ones_like(diag))
            rel = torch.finfo(cov.dtype).eps
            while rel <= _MAX_RELATIVE_JITTER:
                todo = failed[idx]
                if not bool(todo.any()):
                    break
                trial = torch.where(todo, rel * level, jitter[idx])
                info = torch.linalg.cholesky_ex(sub + trial[:, None, None] * eye).info
                jitter[idx] = trial
                failed[idx] = info != 0
                rel *= 10.0
    safe = torch.where(failed[:, None, None], eye, cov + jitter[:, None, None] * eye)
    L = torch.linalg.cholesky(safe)
    if bool(failed.any()):
        idx = failed.nonzero(as_tuple=True)[0]
        evals, evecs = torch.linalg.eigh(cov[idx])
        L = L.index_put((idx,), evecs * evals.clamp_min(0.0).sqrt().unsqueeze(-2))
    return L


def sample_outputs(
    f_mu: Tensor,
    f_var: Tensor,
    n_samples: int = 100,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Reparameterised samples ``f = f_mu + L eps`` of ``N(f_mu, f_var)``.

    $$
        f^{(s)}_i = \mu_i + L_i\,\varepsilon^{(s)}_i, \qquad
        \varepsilon^{(s)}_i \sim \mathcal N(0, I_C), \qquad L_i L_i^\top = \Sigma_i.
    $$

    ``L`` is the Cholesky factor, with jitter retries (and an ``eigh`` fallback) for
    covariances that are positive semi-definite but singular. With a diagonal
    ``f_var`` of shape ``(N, C)`` the outputs are independent and
    ``L = diag(sqrt(f_var))``. Gradients flow to ``f_mu`` and ``f_var``.

    Parameters
    ----------
    f_mu : torch.Tensor, shape (N, C)
    f_var : torch.Tensor, shape (N, C, C) or (N, C)
    n_samples : int, default=100
    generator : torch.Generator, optional
        source of randomness for ``eps``, for reproducible samples; it must live on
        the device of ``f_mu``.

    Returns
    -------
    samples : torch.Tensor, shape (n_samples, N, C)
    """
    _check_gaussian(f_mu, f_var)
    check_positive_int(n_samples, "n_samples")
    eps = torch.randn(
        (n_samples, *f_mu.shape),
        generator=generator,
        dtype=f_mu.dtype,
        device=f_mu.device,
    )
    if f_var.dim() == 2:
        return f_mu + f_var.clamp_min(0.0).sqrt() * eps
    L = _psd_sqrt(f_var)
    return f_mu + torch.einsum("nij,snj->sni", L, eps)


def mc(f_samples: Tensor) -> Tensor:
    r"""Monte-Carlo estimate of ``E[softmax(f)]`` from samples of the logits.

    $$
        p_{ik} \approx \frac{1}{S}\sum_{s=1}^{S} \operatorname{softmax}_k(f^{(s)}_i)
    $$

    Parameters
    ----------
    f_samples : torch.Tensor, shape (S, N, C)
        ``S`` samples of the logits, e.g. from ``sample_outputs`` or from a
        network evaluated at sampled parameters.

    Returns
    -------
    probs : torch.Tensor, shape (N, C)
    """
    if not isinstance(f_samples, Tensor) or f_samples.dim() != 3:
        shape = tuple(f_samples.shape) if isinstance(f_samples, Tensor) else None
        raise ValueError(f"f_samples must have shape (S, N, C), got {shape}.")
    return torch.softmax(f_samples, dim=-1).mean(dim=0)


def mc_gaussian(
    f_mu: Tensor,
    f_var: Tensor,
    n_samples: int = 100,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``mc`` of ``n_samples`` draws from ``sample_outputs``, shape (N, C)."""
    return mc(sample_outputs(f_mu, f_var, n_samples, generator))


# ------------------------------------------------- other likelihoods' links


def sigmoid_probit(f_mu: Tensor, f_var: Tensor) -> Tensor:
    r"""Probit approximation of ``E[sigmoid(f)]`` for independent labels.

    $$
        p_{ik} = \sigma\left(\frac{\mu_{ik}}{\sqrt{1 + \frac{\pi}{8}\,\Sigma_{i,kk}}}
        \right)
    $$

    (MacKay, 1992): the sigmoid is replaced by the probit ``Phi(sqrt(pi/8) f)``,
    whose Gaussian expectation is closed form. Each label reads its own variance.

    Parameters
    ----------
    f_mu : torch.Tensor, shape (N, C)
    f_var : torch.Tensor, shape (N, C, C) or (N, C)

    Returns
    -------
    probs : torch.Tensor, shape (N, C)
        the probability of each label being 1.
    """
    var = marginal_variances(f_mu, f_var)
    return torch.sigmoid(f_mu * torch.rsqrt(1.0 + (math.pi / 8.0) * var))


def sigmoid_mc(
    f_mu: Tensor,
    f_var: Tensor,
    n_samples: int = 100,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Monte-Carlo estimate ``(N, C)`` of ``E[sigmoid(f)]`` from ``n_samples`` draws
    of each label's marginal ``N(mu_ik, Sigma_i,kk)`` (a label's expectation does not
    depend on the covariances)."""
    var = marginal_variances(f_mu, f_var)
    return torch.sigmoid(sample_outputs(f_mu, var, n_samples, generator)).mean(0)


def lognormal_moments(f_mu: Tensor, f_var: Tensor) -> tuple[Tensor, Tensor]:
    r"""Mean and covariance of ``exp(f)`` for Gaussian ``f ~ N(mu, S)``.

    $$
        E[e^{f_k}] = m_k = e^{\mu_k + S_{kk}/2}, \qquad
        \mathrm{Cov}(e^{f_k}, e^{f_l}) = m_k m_l \left(e^{S_{kl}} - 1\right).
    $$

    Parameters
    ----------
    f_mu : torch.Tensor, shape (N, C), or (M,) for one joint Gaussian
    f_var : torch.Tensor, shape (N, C, C) or its diagonal (N, C); (M, M) for
        ``f_mu`` (M,)

    Returns
    -------
    mean : torch.Tensor, the shape of ``f_mu``
    var : torch.Tensor, the shape of ``f_var`` (variances for a diagonal ``f_var``)
    """
    if f_mu.ndim == 1:
        if f_var.shape != (f_mu.shape[0], f_mu.shape[0]):
            raise ValueError(
                f"A joint f_var must have shape {(f_mu.shape[0],) * 2} to match f_mu "
                f"{tuple(f_mu.shape)}; got {tuple(f_var.shape)}."
            )
        mean = torch.exp(f_mu + f_var.diagonal() / 2)
        return mean, torch.outer(mean, mean) * torch.expm1(f_var)
    var = marginal_variances(f_mu, f_var)
    mean = torch.exp(f_mu + var / 2)
    if f_var.ndim == 2:
        return mean, mean.square() * torch.expm1(var)
    return mean, mean.unsqueeze(-1) * mean.unsqueeze(-2) * torch.expm1(f_var)


def natural_gaussian_moments(f_mu: Tensor, f_var: Tensor) -> tuple[Tensor, Tensor]:
    r"""Mean and covariance of ``y`` for a Gaussian over natural parameters, by the
    delta method.

    The outputs are ``f = (eta1, eta2)`` ``(N, 2C)`` with ``y_c ~ N(mu_c, s_c^2)``,
    ``mu = -eta1 / (2 eta2)``, ``s^2 = -1 / (2 eta2)``. With ``f ~ N(m, S)`` and
    ``G`` ``(C, 2C)`` the Jacobian of ``mu`` at ``m`` (``d mu_c / d eta1_c = s_c^2``,
    ``d mu_c / d eta2_c = 2 mu_c s_c^2``):

    $$ E[y] \approx \mu(m), \qquad \mathrm{Cov}[y] \approx \mathrm{diag}(s^2(m))
       + G S G^\top. $$

    Parameters
    ----------
    f_mu : torch.Tensor, shape (N, 2C), with ``f_mu[:, C:] < 0``
    f_var : torch.Tensor, shape (N, 2C, 2C)

    Returns
    -------
    mean : torch.Tensor, shape (N, C)
    cov : torch.Tensor, shape (N, C, C)
    """
    n, d = f_mu.shape
    if d % 2 or f_var.shape != (n, d, d):
        raise ValueError(
            f"f_mu must be (N, 2C) and f_var (N, 2C, 2C); got {tuple(f_mu.shape)} and "
            f"{tuple(f_var.shape)}."
        )
    C = d // 2
    var = -0.5 / f_mu[:, C:]
    mu = f_mu[:, :C] * var
    G = torch.cat([torch.diag_embed(var), torch.diag_embed(2 * mu * var)], dim=-1)
    return mu, torch.diag_embed(var) + G @ f_var @ G.mT


# -------------------------------------------------------------------- dispatch

#: The link approximation for each ``laplace.utils.enums.LinkApprox`` value.
#: The closed forms take ``(f_mu, f_var)``; ``"mc"`` also takes ``n_samples`` and
#: ``generator`` (see ``SAMPLING_LINKS``).
LINKS: dict[str, Callable[..., Tensor]] = {
    LinkApprox.PROBIT.value: probit,
    LinkApprox.BRIDGE.value: bridge,
    LinkApprox.BRIDGE_NORM.value: bridge_norm,
    LinkApprox.MC.value: mc_gaussian,
}

#: The links of ``LINKS`` that draw samples.
SAMPLING_LINKS: frozenset[str] = frozenset({LinkApprox.MC.value})


def link(
    name: LinkApprox | str,
    f_mu: Tensor,
    f_var: Tensor,
    n_samples: int = 100,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Predictive class probabilities ``(N, C)`` under the link approximation
    ``name`` (a ``laplace.utils.enums.LinkApprox`` or its string).

    ``n_samples`` and ``generator`` are used by ``"mc"`` only.

    Raises
    ------
    ValueError
        if ``name`` is not a known link (the message lists the valid ones), or if
        the shapes of ``f_mu`` and ``f_var`` do not match.
    """
    key = name.value if isinstance(name, LinkApprox) else name
    fn = LINKS.get(key) if isinstance(key, str) else None
    if fn is None:
        allowed = ", ".join(repr(k) for k in LINKS)
        raise ValueError(
            f"link_approx={name!r} is not valid; expected one of {allowed}."
        )
    if key in SAMPLING_LINKS:
        return fn(f_mu, f_var, n_samples=n_samples, generator=generator)
    return fn(f_mu, f_var)
