r"""Likelihoods: the public protocol and the built-in ones.

A likelihood is everything a Laplace approximation needs to know about
``p(y | f)``, with ``f`` the network's outputs ``(batch, C)``. Every class of the
library takes either the name of a built-in (a string or a
``laplace.utils.enums.Likelihood``) or a likelihood object, a subclass of
``OutputLikelihood``::

    la = Laplace(model, "poisson", "all", "full")
    la = Laplace(model, MyLikelihood(), "all", "diag")

What an object provides (conventions of DESIGN.md section 3):

- ``loss(f, y)``: the negative log-likelihood summed over the batch (0-dim), up to
  a constant only where ``has_noise`` (regression); ``datum_losses(f, y)``, the
  terms of that sum ``(batch,)``, is derived from it (``torch.func.vmap``) unless
  a subclass gives it;
- ``hessian_sqrt(f)``: ``L`` ``(batch, C, K)`` with ``L L^T`` the output Hessian
  ``Lambda(f)`` of the loss (or its Fisher), per datum; or ``hessian(f)``,
  ``Lambda(f)`` ``(batch, C, C)`` itself: a subclass gives either, the other is
  derived (``eigh`` for the factor);
- ``predictive(f_mu, f_var, ...)``: the GLM predictive from ``N(f_mu, f_var)``,
  the link; ``predictive_from_samples``: the ``nn`` predictive from output samples
  ``(S, N, C)``;
- ``check_targets(f, y)``: validate ``y`` against the outputs, return it reshaped.

``loss_gradient`` (autograd by default), ``hessian_moments`` and the Monte-Carlo
factor ``sampled_gradients`` (for ``stochastic=True`` backends) have defaults or
closed forms. The curvature of the summed loss is then the generalized Gauss-Newton
``H = sum_n J_n^T Lambda(f_n) J_n`` for every structure, and the posterior precision
``P = H / (sigma_noise^2 T) + diag(p0)`` (``sigma_noise`` only where ``has_noise``).

Built-ins (``get_likelihood(name)``), loss per datum and ``Lambda(f)``:

- ``regression``: ``0.5 ||f - y||^2``, ``I``;
- ``classification``: ``-log softmax(f)_y``, ``diag(p) - p p^T``;
- ``reward_modeling``: the classification of pairs;
- ``binary``: ``softplus(f) - y f`` (one logit), ``p (1 - p)``;
- ``multilabel``: ``sum_c softplus(f_c) - y_c f_c``, ``diag(p (1 - p))``;
- ``poisson``: ``sum_c exp(f_c) - y_c f_c + log(y_c!)``, ``diag(exp(f))``;
- ``heteroscedastic_regression``: ``-log N(y; mu, s^2)`` in the natural parameters
  ``(mu / s^2, -1 / (2 s^2))``, the Gaussian's Fisher in them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from laplace.predictive import links
from laplace.utils.enums import Likelihood, LinkApprox, parse_enum

Tensor = torch.Tensor

#: every link approximation
ALL_LINKS = frozenset(LinkApprox)


class OutputLikelihood:
    r"""The likelihood protocol: subclass it to use a likelihood of your own.

    A subclass implements ``loss`` and one of ``hessian_sqrt`` or ``hessian``, and
    usually ``predictive`` (the default averages ``inverse_link`` over Monte-Carlo
    samples of the outputs). Everything else has a default.

    Attributes
    ----------
    name : str
        the name in state dicts and messages.
    factor : float
        ``loss = factor * loss_module()(f, y)``: the conversion from the sum-reduced
        torch loss that the library backends see (``0.5`` for regression's
        ``MSELoss``, 1 otherwise).
    has_noise : bool
        the loss is scaled by ``1 / sigma_noise^2`` (Gaussian observation noise):
        only then may ``sigma_noise`` differ from 1.
    pairs : bool
        inputs are pairs whose two outputs are the logits (reward modeling).
    returns_moments : bool
        the predictive returns ``(mean, variance)`` (regression-like) rather than
        one tensor (probabilities); ``joint`` and ``diagonal_output`` then shape
        the variance.
    supports_joint : bool
        with ``returns_moments``: ``predictive`` also takes the joint Gaussian over a
        batch (``f_mu`` ``(N C,)``, ``f_var`` ``(N C, N C)``).
    links : frozenset of LinkApprox
        the ``link_approx`` values the GLM predictive takes; others are refused.
    """

    name: str = "custom"
    factor: float = 1.0
    has_noise: bool = False
    pairs: bool = False
    returns_moments: bool = False
    supports_joint: bool = False
    links: frozenset[LinkApprox] = ALL_LINKS

    # -- what a subclass provides ------------------------------------------------------
    def loss(self, f: Tensor, y: Tensor) -> Tensor:
        """Negative log-likelihood of targets ``y`` at outputs ``f`` ``(batch, C)``,
        summed over the batch (0-dim)."""
        raise NotImplementedError

    def hessian_sqrt(self, f: Tensor) -> Tensor:
        r"""A factor ``L`` ``(batch, C, K)`` with ``L L^T = Lambda(f)``, the Hessian of
        the per-datum loss in the outputs (or its Fisher).

        By default from ``hessian`` by an eigendecomposition: ``L = Q
        diag(sqrt(max(lambda, 0)))`` (``K = C``)."""
        if type(self).hessian is OutputLikelihood.hessian:
            raise NotImplementedError(
                f"{type(self).__name__} must implement hessian_sqrt(f) or hessian(f)."
            )
        H = self.hessian(f)
        H = (H + H.mT) / 2
        evals, evecs = torch.linalg.eigh(H.to(torch.float64))
        L = evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)
        return L.to(f.dtype)

    def hessian(self, f: Tensor) -> Tensor:
        """The output Hessians ``Lambda(f)`` ``(batch, C, C)``; by default ``L L^T``
        of ``hessian_sqrt``."""
        if type(self).hessian_sqrt is OutputLikelihood.hessian_sqrt:
            raise NotImplementedError(
                f"{type(self).__name__} must implement hessian_sqrt(f) or hessian(f)."
            )
        L = self.hessian_sqrt(f)
        return L @ L.mT

    def predictive(
        self,
        f_mu: Tensor,
        f_var: Tensor,
        link_approx: LinkApprox | str = LinkApprox.MC,
        n_samples: int = 100,
        generator: torch.Generator | None = None,
    ) -> Any:
        r"""The GLM predictive of the outputs ``f ~ N(f_mu, f_var)``.

        Parameters
        ----------
        f_mu : torch.Tensor ``(N, C)``
        f_var : torch.Tensor ``(N, C, C)``, or its diagonal ``(N, C)`` unless
            ``needs_covariance``
        link_approx : LinkApprox, one of ``links``
        n_samples : int
        generator : torch.Generator, optional

        By default the Monte-Carlo average of ``inverse_link`` over ``n_samples``
        samples of ``f``.
        """
        f = links.sample_outputs(f_mu, f_var, n_samples, generator)
        return self.inverse_link(f).mean(0)

    # -- defaults ----------------------------------------------------------------------
    def datum_losses(self, f: Tensor, y: Tensor) -> Tensor:
        """The loss of each datum ``(batch,)``, whose sum is ``loss(f, y)`` (the
        negative log-likelihood ``-log p(y_n | f_n)``, up to ``log_normalizer``
        where ``has_noise``); VaLLA's Monte-Carlo energies read it.

        By default ``loss`` of each row alone, batched by ``torch.func.vmap`` (or
        one row at a time where the loss cannot be vmapped, e.g. it calls
        ``.item()``)."""

        def one(f_n: Tensor, y_n: Tensor) -> Tensor:
            return self.loss(f_n.unsqueeze(0), y_n.unsqueeze(0))

        try:
            return torch.func.vmap(one)(f, y)
        except RuntimeError:
            return torch.stack([one(f_n, y_n) for f_n, y_n in zip(f, y)])

    def check_targets(self, f: Tensor, y: Tensor) -> Tensor:
        """Validate ``y`` against outputs ``f`` ``(batch, C)`` and return it as
        ``loss`` takes it (by default: one target row per datum)."""
        if y.shape[:1] != f.shape[:1]:
            raise ValueError(
                f"Targets of shape {tuple(y.shape)} do not fit model outputs of shape "
                f"{tuple(f.shape)}: one target per datum is needed."
            )
        return y

    def check_fit_targets(self, y: Tensor) -> None:
        """Refuse training targets before any work (by default: nothing)."""

    def loss_gradient(self, f: Tensor, y: Tensor) -> Tensor:
        """Gradient ``(batch, C)`` of the summed loss w.r.t. ``f`` (autograd)."""
        with torch.enable_grad():
            f = f.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.loss(f, y), f)
        return grad

    def hessian_moments(self, f: Tensor) -> tuple[Tensor, Tensor]:
        """The diagonals ``(batch, C)`` of the output Hessians and their sum over the
        batch ``(C, C)``."""
        L = self.hessian_sqrt(f)
        return L.square().sum(-1), torch.einsum("nck,ndk->cd", L, L)

    def sampled_gradients(
        self, f: Tensor, num_samples: int, generator: torch.Generator | None
    ) -> Tensor:
        """Monte-Carlo factor ``(batch, C, S)`` whose outer product estimates the
        output Hessian: loss gradients at ``S`` targets drawn from ``p(y | f)``,
        scaled by ``1/sqrt(S)``. Needed only by ``stochastic=True`` backends."""
        raise NotImplementedError(
            f"{type(self).__name__} draws no targets (sampled_gradients): the "
            "Monte-Carlo Fisher (backend_kwargs={'stochastic': True}) is not "
            "available for it; use the exact GGN (stochastic=False)."
        )

    @property
    def samples_targets(self) -> bool:
        """Whether ``sampled_gradients`` is implemented (Monte-Carlo Fisher)."""
        return type(self).sampled_gradients is not OutputLikelihood.sampled_gradients

    def inverse_link(self, f: Tensor) -> Tensor:
        """The mean of ``y`` given the outputs (``predictive_samples`` maps output
        samples through it); the identity by default."""
        return f

    def predictive_from_samples(self, f_samples: Tensor) -> Any:
        """The ``nn`` predictive from output samples ``(S, N, C)`` at weight samples:
        by default the average of ``inverse_link``."""
        return self.inverse_link(f_samples).mean(0)

    def needs_covariance(self, link_approx: LinkApprox, diagonal_output: bool) -> bool:
        """Whether ``predictive`` with ``link_approx`` needs the covariances between
        outputs, ``f_var`` ``(N, C, C)``; otherwise it gets the variances ``(N,
        C)`` (a diagonal ``f_var`` stands for independent outputs). By default only
        with ``diagonal_output=False``."""
        return not diagonal_output

    def predictive_likelihood(self, fitting: bool) -> OutputLikelihood:
        """The likelihood whose predictive the Laplace returns (reward modeling
        predicts as regression, or with ``fitting`` as the classification of pairs
        it was fitted with); ``self`` otherwise."""
        return self

    def check_link(self, link_approx: LinkApprox) -> None:
        """Refuse a ``link_approx`` outside ``links``."""
        if link_approx not in self.links:
            allowed = ", ".join(sorted(repr(k.value) for k in self.links))
            raise ValueError(
                f"link_approx={link_approx.value!r} is not available for "
                f"likelihood={self.name!r}; use {allowed}."
            )

    def log_normalizer(self, sigma_noise: Tensor, n_data: int, n_outputs: int):
        """What the log-likelihood adds to ``-loss / (sigma^2 T)``: 0 unless the
        loss leaves out a normalizer that depends on the noise (regression)."""
        return 0.0

    def loss_module(self) -> nn.Module:
        """A sum-reduced ``torch.nn`` loss with ``loss = factor * module(f, y)``, for
        the library backends (Curvlinops' generic operators take any module)."""
        return LikelihoodLoss(self)

    @property
    def library_loss(self) -> type[nn.Module] | None:
        """The ``torch.nn`` loss class the likelihood is, for backends that know only
        some (``None``: a loss of its own)."""
        module = self.loss_module()
        return None if isinstance(module, LikelihoodLoss) else type(module)

    def default_metric(self, **kwargs):
        """The running loss of the grid search over the prior precision: the
        negative log-likelihood of the validation targets under the predictive
        (``kwargs``: torchmetrics' ``Metric`` options, e.g. ``sync_on_compute``)."""
        from laplace.utils.metrics import RunningPredictiveNLLMetric

        return RunningPredictiveNLLMetric(self, **kwargs)

    def predictive_nll(self, prediction: Any, y: Tensor) -> Tensor:
        """Negative log-likelihood ``(N,)`` of targets ``y`` under a prediction of
        ``predictive`` (for ``default_metric``)."""
        raise NotImplementedError(
            f"{type(self).__name__} has no predictive_nll: pass a loss to the grid "
            "search (optimize_prior_precision(method='gridsearch', loss=...))."
        )

    def metric_inputs(self, prediction: Any, metric: Any, sigma_noise: Tensor):
        """What a validation loss reads of a prediction (before the targets)."""
        return (prediction,)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LikelihoodLoss(nn.Module):
    """A likelihood's ``loss`` as a sum-reduced ``torch.nn`` module (what the
    library backends call), ``loss = factor * module(f, y)``."""

    def __init__(self, likelihood: OutputLikelihood) -> None:
        super().__init__()
        self.likelihood = likelihood
        self.reduction = "sum"

    def forward(self, f: Tensor, y: Tensor) -> Tensor:
        return self.likelihood.loss(f, y) / self.likelihood.factor


# ---------------------------------------------------------------------------------
# regression
# ---------------------------------------------------------------------------------


class RegressionLikelihood(OutputLikelihood):
    """Gaussian ``y ~ N(f, sigma^2 I)``: loss ``0.5 ||f - y||^2`` (scaled by
    ``1 / sigma^2`` in the posterior), ``Lambda = I``; the predictive is the mean and
    (co)variance of ``f`` (no noise added). ``sigma_noise`` may be one value per
    output (``output_column`` splits the curvature by output)."""

    name = Likelihood.REGRESSION.value
    factor = 0.5
    has_noise = True
    returns_moments = True
    supports_joint = True

    def loss_module(self) -> nn.Module:
        return nn.MSELoss(reduction="sum")

    def loss(self, f: Tensor, y: Tensor) -> Tensor:
        return self.factor * F.mse_loss(f, y, reduction="sum")

    def datum_losses(self, f: Tensor, y: Tensor) -> Tensor:
        return self.factor * F.mse_loss(f, y, reduction="none").sum(-1)

    def check_targets(self, f: Tensor, y: Tensor) -> Tensor:
        if y.shape == f.shape:
            return y
        if f.ndim == 2 and f.shape[1] == 1 and y.shape == f.shape[:1]:
            return y.unsqueeze(1)
        raise ValueError(
            f"Regression targets of shape {tuple(y.shape)} do not fit model outputs "
            f"of shape {tuple(f.shape)}; expected targets of shape {tuple(f.shape)}."
        )

    def check_fit_targets(self, y: Tensor) -> None:
        # laplace-torch refuses a 1-D y rather than guessing
        if y.ndim == 1:
            raise ValueError(
                f"Regression targets y of shape {tuple(y.shape)} must have the shape "
                "of the model's outputs, (batch, outputs); for a model with one "
                "output pass y of shape (batch, 1), e.g. y.unsqueeze(-1)."
            )

    def loss_gradient(self, f: Tensor, y: Tensor) -> Tensor:
        return f - y

    def hessian_sqrt(self, f: Tensor) -> Tensor:
        eye = torch.eye(f.shape[-1], dtype=f.dtype, device=f.device)
        return eye.expand(f.shape[0], -1, -1)

    def hessian_moments(self, f):
        N, C = f.shape
        eye = torch.eye(C, dtype=f.dtype, device=f.device)
        return torch.ones_like(f), N * eye

    def sampled_gradients(self, f, num_samples, generator=None):
        # y ~ N(f, I)  =>  gradient f - y = -eps with eps ~ N(0, I)
        eps = torch.randn(
            (*f.shape, num_samples), dtype=f.dtype, device=f.device, generator=generator
        )
        return -eps / math.sqrt(num_samples)

    def predictive(self, f_mu, f_var, link_approx=None, n_samples=100, generator=None):
        return f_mu, f_var

    def predictive_from_samples(self, f_samples):
        return f_samples.mean(0), f_samples.var(0)

    def log_normalizer(self, sigma_noise, n_data, n_outputs):
        """``-N sum_c log(sigma_c sqrt(2 pi))`` (``C`` equal terms for a scalar)."""
        log_terms = torch.log(sigma_noise * math.sqrt(2 * math.pi))
        if log_terms.numel() == 1:
            return -n_data * n_outputs * log_terms.reshape(())
        return -n_data * log_terms.sum()

    def default_metric(self, **kwargs):
        from laplace.utils.metrics import RunningGaussianNLLMetric

        return RunningGaussianNLLMetric(**kwargs)

    def metric_inputs(self, prediction, metric, sigma_noise):
        """The Gaussian NLL reads the mean and the variance of a new observation
        ``f_var + sigma^2``; any other loss reads ``f_mu``, as in laplace-torch."""
        from laplace.utils.metrics import RunningGaussianNLLMetric

        f_mu, f_var = prediction
        if not isinstance(metric, RunningGaussianNLLMetric):
            return (f_mu,)
        noise = sigma_noise.square().to(f_var.dtype)
        if f_var.ndim == 3:
            return f_mu, f_var + torch.diag_embed(noise.expand(f_var.shape[-1]))
        return f_mu, f_var + noise

    def output_column(self, c: int) -> OutputLikelihood:
        """The regression likelihood of output ``c`` alone: the curvature of output
        ``c``, ``H_c``, so that a per-output noise gives ``H = sum_c H_c /
        sigma_c^2``."""
        return _RegressionColumn(c)


class _RegressionColumn(RegressionLikelihood):
    """``0.5 sum_n (f_nc - y_nc)^2`` for one output ``c`` (``output_column``)."""

    def __init__(self, column: int) -> None:
        self.column = column

    def _mask(self, f: Tensor) -> Tensor:
        return F.one_hot(torch.tensor(self.column), f.shape[-1]).to(f)

    def loss_module(self) -> nn.Module:
        return LikelihoodLoss(self)

    def loss(self, f, y):
        return self.datum_losses(f, y).sum()

    def datum_losses(self, f, y):
        c = self.column
        return 0.5 * (f[:, c] - y[:, c]).square()

    def loss_gradient(self, f, y):
        return (f - y) * self._mask(f)

    def hessian_sqrt(self, f):
        return self._mask(f)[:, None].expand(f.shape[0], -1, 1)

    def hessian_moments(self, f):
        m = self._mask(f)
        return m.expand_as(f).clone(), f.shape[0] * torch.diag(m)

    def sampled_gradients(self, f, num_samples, generator=None):
        eps = torch.randn(
            (f.shape[0], 1, num_samples),
            dtype=f.dtype,
            device=f.device,
            generator=generator,
        )
        return -eps * self._mask(f)[:, None] / math.sqrt(num_samples)

    def __repr__(self) -> str:
        return f"RegressionLikelihood().output_column({self.column})"


# ---------------------------------------------------------------------------------
# classification and reward modeling
# ---------------------------------------------------------------------------------


class ClassificationLikelihood(OutputLikelihood):
    """Categorical ``y ~ softmax(f)``: summed cross-entropy, ``Lambda = diag(p) -
    p p^T``; the predictive is the class probabilities by a link approximation."""

    name = Likelihood.CLASSIFICATION.value

    def loss_module(self) -> nn.Module:
        return nn.CrossEntropyLoss(reduction="sum")

    def loss(self, f: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(f, y, reduction="sum")

    def datum_losses(self, f: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(f, y, reduction="none")

    def check_targets(self, f: Tensor, y: Tensor) -> Tensor:
        if f.ndim != 2:
            raise ValueError(
                f"Classification needs outputs of shape (batch, classes); got "
                f"{tuple(f.shape)}."
            )
        if y.shape != f.shape[:1]:
            raise ValueError(
                f"Classification targets must be class indices of shape "
                f"{tuple(f.shape[:1])}; got shape {tuple(y.shape)}."
            )
        if y.is_floating_point() or y.is_complex():
            raise ValueError(
                f"Classification targets must be integer class indices; got dtype "
                f"{y.dtype}."
            )
        return y

    def loss_gradient(self, f: Tensor, y: Tensor) -> Tensor:
        return torch.softmax(f, dim=-1) - F.one_hot(y, f.shape[-1]).to(f.dtype)

    def hessian_sqrt(self, f: Tensor) -> Tensor:
        """A factor ``(batch, C, C - 1)`` of ``diag(p) - p p^T`` (rank ``C - 1``).

        ``L = diag(s) - p s^T`` with ``s = sqrt(p)`` has ``L L^T = diag(p) - p p^T``
        and ``L s = 0``. The Householder reflection ``R`` that swaps the unit vector
        ``s`` and the last basis vector is orthogonal, so ``(L R)(L R)^T = L L^T``,
        and the last column of ``L R`` is ``L s = 0``: dropping it leaves ``C - 1``
        columns, one backpropagated vector fewer per datum.
        """
        p = torch.softmax(f, dim=-1)
        s = p.sqrt()
        L = torch.diag_embed(s) - p.unsqueeze(-1) * s.unsqueeze(-2)
        C = f.shape[-1]
        if C == 1:
            return L
        u = s.clone()
        u[..., -1] -= 1
        norm2 = u.square().sum(-1, keepdim=True)
        # s = e_C already (u = 0): the reflection is the identity
        scale = torch.where(norm2 > 1e-30, 2 / norm2.clamp_min(1e-30), 0.0)
        Lu = (L @ u.unsqueeze(-1)).squeeze(-1)  # (batch, C)
        LR = L - (scale * Lu).unsqueeze(-1) * u.unsqueeze(-2)
        return LR[..., : C - 1]

    def hessian_moments(self, f):
        # sum_n diag(p_n) - p_n p_n^T
        p = torch.softmax(f, dim=-1)
        return p - p.square(), torch.diag(p.sum(0)) - p.T @ p

    def sampled_gradients(self, f, num_samples, generator=None):
        p = torch.softmax(f, dim=-1)
        y = torch.multinomial(p, num_samples, replacement=True, generator=generator)
        onehot = F.one_hot(y, f.shape[-1]).to(f.dtype)  # (batch, S, C)
        return (p.unsqueeze(1) - onehot).transpose(1, 2) / math.sqrt(num_samples)

    def inverse_link(self, f: Tensor) -> Tensor:
        return torch.softmax(f, dim=-1)

    def predictive(
        self,
        f_mu: Tensor,
        f_var: Tensor,
        link_approx: LinkApprox | str = LinkApprox.PROBIT,
        n_samples: int = 100,
        generator: torch.Generator | None = None,
    ):
        """Class probabilities ``(N, C)`` by ``laplace.predictive.links.link``."""
        return links.link(link_approx, f_mu, f_var, n_samples, generator)

    def needs_covariance(self, link_approx: LinkApprox, diagonal_output: bool) -> bool:
        # probit reads only the output variances: no (N, C, C) where avoidable
        return not (diagonal_output or link_approx == LinkApprox.PROBIT)

    def default_metric(self, **kwargs):
        from laplace.utils.metrics import RunningNLLMetric

        return RunningNLLMetric(**kwargs)


class RewardModelingLikelihood(ClassificationLikelihood):
    """Reward modeling: the classification of pairs ``(batch, 2, ...)`` whose two
    rewards are the logits (Bradley-Terry); it predicts rewards as regression, or
    with ``fitting=True`` the pairs' probabilities."""

    name = Likelihood.REWARD_MODELING.value
    pairs = True

    def predictive_likelihood(self, fitting: bool) -> OutputLikelihood:
        return ClassificationLikelihood() if fitting else RegressionLikelihood()


# ---------------------------------------------------------------------------------
# Bernoulli: binary and multi-label classification
# ---------------------------------------------------------------------------------


def _binary_values(y: Tensor, what: str) -> None:
    if y.is_complex() or not bool(((y == 0) | (y == 1)).all()):
        raise ValueError(f"{what} targets must be 0 or 1; got other values.")


class MultilabelLikelihood(OutputLikelihood):
    r"""``C`` independent Bernoulli labels ``y_c ~ Bernoulli(sigmoid(f_c))``: the
    summed binary cross-entropy with logits, ``Lambda = diag(p (1 - p))``; the
    predictive is the probability of each label, ``(N, C)``, by the probit
    approximation ``sigmoid(mu / sqrt(1 + pi/8 var))`` or Monte Carlo."""

    name = Likelihood.MULTILABEL.value
    links = frozenset({LinkApprox.PROBIT, LinkApprox.MC})

    def loss_module(self) -> nn.Module:
        return nn.BCEWithLogitsLoss(reduction="sum")

    def loss(self, f: Tensor, y: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(f, y, reduction="sum")

    def datum_losses(self, f: Tensor, y: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(f, y, reduction="none").sum(-1)

    def check_targets(self, f: Tensor, y: Tensor) -> Tensor:
        if f.ndim != 2 or y.shape != f.shape:
            raise ValueError(
                f"Multi-label targets must have the outputs' shape {tuple(f.shape)} "
                f"(one 0/1 label per output); got shape {tuple(y.shape)}."
            )
        _binary_values(y, "Multi-label")
        return y.to(f.dtype)

    def loss_gradient(self, f: Tensor, y: Tensor) -> Tensor:
        return torch.sigmoid(f) - y

    def hessian_sqrt(self, f: Tensor) -> Tensor:
        p = torch.sigmoid(f)
        return torch.diag_embed((p * (1 - p)).sqrt())

    def hessian_moments(self, f):
        p = torch.sigmoid(f)
        d = p * (1 - p)
        return d, torch.diag(d.sum(0))

    def sampled_gradients(self, f, num_samples, generator=None):
        p = torch.sigmoid(f).unsqueeze(-1).expand(*f.shape, num_samples)
        y = torch.bernoulli(p, generator=generator)
        return (p - y) / math.sqrt(num_samples)

    def inverse_link(self, f: Tensor) -> Tensor:
        return torch.sigmoid(f)

    def predictive(
        self,
        f_mu: Tensor,
        f_var: Tensor,
        link_approx: LinkApprox | str = LinkApprox.PROBIT,
        n_samples: int = 100,
        generator: torch.Generator | None = None,
    ):
        """Probabilities ``(N, C)`` of ``y_c = 1``: ``links.sigmoid_probit`` or
        ``links.sigmoid_mc`` (each label reads only its own variance)."""
        if parse_enum(LinkApprox, link_approx, "link_approx") == LinkApprox.MC:
            return links.sigmoid_mc(f_mu, f_var, n_samples, generator)
        return links.sigmoid_probit(f_mu, f_var)

    def needs_covariance(self, link_approx: LinkApprox, diagonal_output: bool) -> bool:
        return False

    def predictive_nll(self, prediction: Tensor, y: Tensor) -> Tensor:
        p = prediction.clamp(1e-12, 1 - 1e-12)
        y = y.reshape(p.shape).to(p.dtype)
        return -(y * p.log() + (1 - y) * (1 - p).log()).sum(-1)


class BinaryLikelihood(MultilabelLikelihood):
    """A binary classifier with one logit per input: ``multilabel`` with ``C = 1``,
    targets 0/1 of shape ``(N,)`` or ``(N, 1)``; predicts ``P(y = 1)`` ``(N, 1)``."""

    name = Likelihood.BINARY.value

    def check_targets(self, f: Tensor, y: Tensor) -> Tensor:
        if f.ndim != 2 or f.shape[1] != 1:
            raise ValueError(
                "likelihood='binary' needs one logit per input, outputs of shape "
                f"(batch, 1); got {tuple(f.shape)}. For several independent labels "
                "use likelihood='multilabel', for several classes 'classification'."
            )
        if y.shape not in (f.shape, f.shape[:1]):
            raise ValueError(
                f"Binary targets must have shape {tuple(f.shape[:1])} or "
                f"{tuple(f.shape)}; got shape {tuple(y.shape)}."
            )
        _binary_values(y, "Binary")
        return y.reshape(f.shape).to(f.dtype)


# ---------------------------------------------------------------------------------
# Poisson counts
# ---------------------------------------------------------------------------------


class PoissonLoss(nn.Module):
    """``sum(exp(f) - y f + log(y!))``: the Poisson negative log-likelihood of
    counts ``y`` at log-rates ``f``, sum-reduced (``nn.PoissonNLLLoss`` leaves out
    ``log(y!)``)."""

    reduction = "sum"

    @staticmethod
    def terms(f: Tensor, y: Tensor) -> Tensor:
        """The loss of each count, elementwise."""
        return f.exp() - y * f + torch.lgamma(y + 1)

    def forward(self, f: Tensor, y: Tensor) -> Tensor:
        return self.terms(f, y).sum()


class PoissonLikelihood(OutputLikelihood):
    r"""Counts ``y_c ~ Poisson(exp(f_c))`` with log-rate outputs: loss ``sum exp(f)
    - y f + log(y!)``, ``Lambda = diag(exp(f))``.

    The GLM predictive gives the mean and (co)variance of the rates ``exp(f)`` under
    ``f ~ N(mu, S)``, the lognormal moments ``E = exp(mu + diag(S)/2)``, ``Cov =
    E E^T (exp(S) - 1)`` (``links.lognormal_moments``), or with
    ``link_approx='mc'`` their Monte-Carlo estimate; the ``nn`` predictive the
    mean and variance of the rates over weight samples.
    """

    name = Likelihood.POISSON.value
    returns_moments = True
    supports_joint = True
    links = frozenset({LinkApprox.PROBIT, LinkApprox.MC})

    def loss_module(self) -> nn.Module:
        return PoissonLoss()

    def loss(self, f: Tensor, y: Tensor) -> Tensor:
        return PoissonLoss()(f, y)

    def datum_losses(self, f: Tensor, y: Tensor) -> Tensor:
        return PoissonLoss.terms(f, y).sum(-1)

    def check_targets(self, f: Tensor, y: Tensor) -> Tensor:
        if f.ndim == 2 and f.shape[1] == 1 and y.shape == f.shape[:1]:
            y = y.unsqueeze(1)
        if y.shape != f.shape:
            raise ValueError(
                f"Poisson targets must have the outputs' shape {tuple(f.shape)} (one "
                f"count per output); got shape {tuple(y.shape)}."
            )
        if y.is_complex() or not bool(((y >= 0) & (y == y.round())).all()):
            raise ValueError(
                "Poisson targets must be counts (non-negative integers); got other "
                "values."
            )
        return y.to(f.dtype)

    def loss_gradient(self, f: Tensor, y: Tensor) -> Tensor:
        return f.exp() - y

    def hessian_sqrt(self, f: Tensor) -> Tensor:
        return torch.diag_embed((f / 2).exp())

    def hessian_moments(self, f):
        rate = f.exp()
        return rate, torch.diag(rate.sum(0))

    def sampled_gradients(self, f, num_samples, generator=None):
        rate = f.exp().unsqueeze(-1).expand(*f.shape, num_samples)
        y = torch.poisson(rate, generator=generator)
        return (rate - y) / math.sqrt(num_samples)

    def inverse_link(self, f: Tensor) -> Tensor:
        return f.exp()

    def predictive(
        self,
        f_mu: Tensor,
        f_var: Tensor,
        link_approx: LinkApprox | str = LinkApprox.PROBIT,
        n_samples: int = 100,
        generator: torch.Generator | None = None,
    ):
        """``(mean, var)`` of the rates: lognormal moments (``f_var`` ``(N, C, C)``
        gives the covariance, ``(N, C)`` the variances, a joint ``(N C, N C)`` with
        ``f_mu`` ``(N C,)`` the joint covariance), or with ``'mc'`` their
        Monte-Carlo estimate."""
        if parse_enum(LinkApprox, link_approx, "link_approx") != LinkApprox.MC:
            return links.lognormal_moments(f_mu, f_var)
        if f_mu.ndim == 1:  # a joint Gaussian over the batch
            samples = links.sample_outputs(
                f_mu[None], f_var[None], n_samples, generator
            )
            rates = samples[:, 0].exp()
            return rates.mean(0), rates.T.cov(correction=0)
        rates = links.sample_outputs(f_mu, f_var, n_samples, generator).exp()
        mean = rates.mean(0)
        if f_var.ndim == 2:
            return mean, rates.var(0, correction=0)
        d = rates - mean
        return mean, torch.einsum("snc,snd->ncd", d, d) / n_samples

    def predictive_from_samples(self, f_samples):
        rates = f_samples.exp()
        return rates.mean(0), rates.var(0)

    def predictive_nll(self, prediction, y):
        """The Poisson NLL of the counts at the predictive mean rate (plug-in)."""
        mean = prediction[0]
        y = y.reshape(mean.shape).to(mean.dtype)
        return (mean - y * mean.log() + torch.lgamma(y + 1)).sum(-1)

    def metric_inputs(self, prediction, metric, sigma_noise):
        return tuple(prediction) if _is_predictive_nll(metric) else (prediction[0],)


def _is_predictive_nll(metric: Any) -> bool:
    from laplace.utils.metrics import RunningPredictiveNLLMetric

    return isinstance(metric, RunningPredictiveNLLMetric)


# ---------------------------------------------------------------------------------
# heteroscedastic regression in the natural parameters
# ---------------------------------------------------------------------------------


class HeteroscedasticLoss(nn.Module):
    """``-sum log N(y; mu, s^2)`` with ``f = (eta1, eta2)`` the natural parameters
    ``eta1 = mu / s^2``, ``eta2 = -1 / (2 s^2)`` (``f[:, :C]`` and ``f[:, C:]``)."""

    reduction = "sum"

    @staticmethod
    def terms(f: Tensor, y: Tensor) -> Tensor:
        """The loss of each target ``(batch, C)``."""
        C = f.shape[-1] // 2
        eta1, eta2 = f[:, :C], f[:, C:]
        log_lik = (
            eta1 * y
            + eta2 * y.square()
            + eta1.square() / (4 * eta2)
            + 0.5 * torch.log(-2 * eta2)
            - 0.5 * math.log(2 * math.pi)
        )
        return -log_lik

    def forward(self, f: Tensor, y: Tensor) -> Tensor:
        return self.terms(f, y).sum()


def natural_to_moments(f: Tensor) -> tuple[Tensor, Tensor]:
    """``(mu, s^2)`` ``(N, C)`` of natural parameters ``f = (eta1, eta2)`` ``(N,
    2 C)``: ``mu = -eta1 / (2 eta2)``, ``s^2 = -1 / (2 eta2)``."""
    C = f.shape[-1] // 2
    eta1, eta2 = f[..., :C], f[..., C:]
    var = -0.5 / eta2
    return eta1 * var, var


class HeteroscedasticRegressionLikelihood(OutputLikelihood):
    r"""Gaussian ``y_c ~ N(mu_c, s_c^2)`` whose mean and noise the network outputs,
    as the natural parameters ``f = (eta1, eta2)`` ``(N, 2 C)``: ``eta1 = mu /
    s^2`` (``f[:, :C]``), ``eta2 = -1 / (2 s^2) < 0`` (``f[:, C:]``; end the network
    with e.g. ``-softplus`` on those outputs).

    In natural parameters the loss's Hessian is the Fisher, independent of ``y``:
    per output the ``2 x 2`` block ``[[s^2, 2 mu s^2], [2 mu s^2, 4 mu^2 s^2 + 2
    s^4]]`` (the covariance of the sufficient statistics ``(y, y^2)``), with the
    factor ``[[s, 0], [2 mu s, sqrt(2) s^2]]``. The GLM predictive is the mean and
    variance of ``y`` by the delta method: ``E[y] = mu(m)``, ``Var[y] = s^2(m) +
    g^T S g`` with ``g = (s^2, 2 mu s^2)`` the gradient of ``mu`` in ``(eta1,
    eta2)`` (``links.natural_gaussian_moments``); the ``nn`` predictive the mixture's
    ``E[mu]`` and ``E[s^2] + Var[mu]`` over weight samples.
    """

    name = Likelihood.HETEROSCEDASTIC_REGRESSION.value
    returns_moments = True
    links = frozenset({LinkApprox.PROBIT})

    def loss_module(self) -> nn.Module:
        return HeteroscedasticLoss()

    def loss(self, f: Tensor, y: Tensor) -> Tensor:
        return HeteroscedasticLoss()(f, y)

    def datum_losses(self, f: Tensor, y: Tensor) -> Tensor:
        return HeteroscedasticLoss.terms(f, y).sum(-1)

    def check_targets(self, f: Tensor, y: Tensor) -> Tensor:
        self._check_outputs(f)
        C = f.shape[1] // 2
        if C == 1 and y.shape == f.shape[:1]:
            y = y.unsqueeze(1)
        if y.shape != (f.shape[0], C):
            raise ValueError(
                f"Heteroscedastic regression targets must have shape {(f.shape[0], C)} "
                f"for outputs {tuple(f.shape)} (eta1 and eta2 per target); got shape "
                f"{tuple(y.shape)}."
            )
        return y.to(f.dtype)

    @staticmethod
    def _check_outputs(f: Tensor) -> None:
        if f.ndim != 2 or f.shape[1] % 2:
            raise ValueError(
                "likelihood='heteroscedastic_regression' needs outputs (batch, 2 C): "
                f"eta1 then eta2 per target; got {tuple(f.shape)}."
            )
        if f.device.type != "meta" and not bool((f[:, f.shape[1] // 2 :] < 0).all()):
            raise ValueError(
                "likelihood='heteroscedastic_regression' needs eta2 = -1/(2 s^2) < 0 "
                "in the outputs f[:, C:]; end the network with e.g. -softplus on "
                "them."
            )

    def loss_gradient(self, f: Tensor, y: Tensor) -> Tensor:
        mu, var = natural_to_moments(f)
        # E[T(y)] - T(y) with T(y) = (y, y^2)
        return torch.cat([mu - y, mu.square() + var - y.square()], dim=-1)

    def hessian_sqrt(self, f: Tensor) -> Tensor:
        self._check_outputs(f)
        mu, var = natural_to_moments(f)
        s = var.sqrt()
        top = torch.diag_embed(s)  # (N, C, C): d eta1 rows, first columns
        zeros = torch.zeros_like(top)
        bottom_left = torch.diag_embed(2 * mu * s)
        bottom_right = torch.diag_embed(math.sqrt(2) * var)
        return torch.cat(
            [torch.cat([top, zeros], -1), torch.cat([bottom_left, bottom_right], -1)],
            dim=-2,
        )

    def hessian_moments(self, f):
        mu, var = natural_to_moments(f)
        a, b, d = var, 2 * mu * var, 4 * mu.square() * var + 2 * var.square()
        C = mu.shape[1]
        total = f.new_zeros(2 * C, 2 * C)
        idx = torch.arange(C, device=f.device)
        total[idx, idx] = a.sum(0)
        total[idx, idx + C] = b.sum(0)
        total[idx + C, idx] = b.sum(0)
        total[idx + C, idx + C] = d.sum(0)
        return torch.cat([a, d], -1), total

    def sampled_gradients(self, f, num_samples, generator=None):
        mu, var = natural_to_moments(f)
        eps = torch.randn(
            (*mu.shape, num_samples),
            dtype=f.dtype,
            device=f.device,
            generator=generator,
        )
        y = mu.unsqueeze(-1) + var.sqrt().unsqueeze(-1) * eps
        grad = torch.cat(
            [mu.unsqueeze(-1) - y, (mu.square() + var).unsqueeze(-1) - y.square()], 1
        )
        return grad / math.sqrt(num_samples)

    def inverse_link(self, f: Tensor) -> Tensor:
        return natural_to_moments(f)[0]

    def predictive(
        self,
        f_mu: Tensor,
        f_var: Tensor,
        link_approx: LinkApprox | str = LinkApprox.PROBIT,
        n_samples: int = 100,
        generator: torch.Generator | None = None,
    ):
        self._check_outputs(f_mu)
        return links.natural_gaussian_moments(f_mu, f_var)

    def needs_covariance(self, link_approx: LinkApprox, diagonal_output: bool) -> bool:
        # the variance of mu reads the covariance of eta1 and eta2
        return True

    def predictive_from_samples(self, f_samples):
        mu, var = natural_to_moments(f_samples)
        return mu.mean(0), var.mean(0) + mu.var(0)

    def predictive_nll(self, prediction, y):
        mean, var = prediction
        if var.ndim == 3:
            var = var.diagonal(dim1=-2, dim2=-1)
        y = y.reshape(mean.shape).to(mean.dtype)
        return 0.5 * ((y - mean).square() / var + (2 * math.pi * var).log()).sum(-1)

    def metric_inputs(self, prediction, metric, sigma_noise):
        return tuple(prediction) if _is_predictive_nll(metric) else (prediction[0],)


# ---------------------------------------------------------------------------------
# lookup
# ---------------------------------------------------------------------------------

_LIKELIHOODS: dict[Likelihood, type[OutputLikelihood]] = {
    Likelihood.REGRESSION: RegressionLikelihood,
    Likelihood.CLASSIFICATION: ClassificationLikelihood,
    Likelihood.REWARD_MODELING: RewardModelingLikelihood,
    Likelihood.BINARY: BinaryLikelihood,
    Likelihood.MULTILABEL: MultilabelLikelihood,
    Likelihood.POISSON: PoissonLikelihood,
    Likelihood.HETEROSCEDASTIC_REGRESSION: HeteroscedasticRegressionLikelihood,
}


def get_likelihood(likelihood: Likelihood | str | OutputLikelihood) -> OutputLikelihood:
    """The likelihood object of ``likelihood``: a built-in's by its name (a string or
    a ``Likelihood``), or the given ``OutputLikelihood`` itself.

    Raises
    ------
    ValueError
        for an unknown name (listing the built-ins).
    TypeError
        for an object that is not an ``OutputLikelihood`` or implements neither
        ``hessian_sqrt`` nor ``hessian``.
    """
    if isinstance(likelihood, OutputLikelihood):
        cls = type(likelihood)
        if cls.loss is OutputLikelihood.loss or (
            cls.hessian_sqrt is OutputLikelihood.hessian_sqrt
            and cls.hessian is OutputLikelihood.hessian
        ):
            raise TypeError(
                f"likelihood {cls.__name__} must implement loss(f, y) and one of "
                "hessian_sqrt(f) or hessian(f) (see laplace.likelihood."
                "OutputLikelihood)."
            )
        return likelihood
    if isinstance(likelihood, (str, Likelihood)):
        return _LIKELIHOODS[parse_enum(Likelihood, likelihood, "likelihood")]()
    raise TypeError(
        "likelihood must be a name ('classification', 'regression', ...), a "
        "laplace.Likelihood or an OutputLikelihood object; got "
        f"{type(likelihood).__name__}."
    )


__all__ = [
    "OutputLikelihood",
    "LikelihoodLoss",
    "RegressionLikelihood",
    "ClassificationLikelihood",
    "RewardModelingLikelihood",
    "BinaryLikelihood",
    "MultilabelLikelihood",
    "PoissonLikelihood",
    "PoissonLoss",
    "HeteroscedasticRegressionLikelihood",
    "HeteroscedasticLoss",
    "natural_to_moments",
    "get_likelihood",
]
