"""Running metrics for tuning the prior precision on a validation set."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "RunningNLLMetric",
    "RunningGaussianNLLMetric",
    "RunningPredictiveNLLMetric",
    "gaussian_nll",
]


class RunningNLLMetric(Metric):
    r"""Running negative log-likelihood of predicted class probabilities.

    Accumulates over calls of ``update``

    $$
        \mathrm{NLL} = \frac{1}{|\mathcal V|}\sum_{n \in \mathcal V} -\log p_{n, y_n},
        \qquad \mathcal V = \{n : y_n \neq \texttt{ignore\_index}\},
    $$

    so the whole validation set never has to be held in memory. It is the default
    loss of ``optimize_prior_precision(method="gridsearch")`` for classification.

    Parameters
    ----------
    ignore_index : int, default=-100
        targets equal to this value are skipped, as in
        ``torch.nn.CrossEntropyLoss``.
    **kwargs
        passed on to ``torchmetrics.Metric``.

    Notes
    -----
    The inputs are *probabilities*, not logits: a probability of exactly zero on
    the target gives an infinite NLL. ``compute`` returns ``nan`` when no
    target has been counted.
    """

    is_differentiable = True
    higher_is_better = False
    full_state_update = False

    nll_sum: Tensor
    n_valid_labels: Tensor

    def __init__(self, ignore_index: int = -100, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        self.add_state("nll_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("n_valid_labels", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, probs: Tensor, targets: Tensor) -> None:
        """Add a batch.

        Parameters
        ----------
        probs : torch.Tensor, shape (N, C) or (..., C)
            predicted class probabilities (rows on the simplex).
        targets : torch.Tensor of ints, shape (N,) or (...)
            class indices in ``[0, C)``, or ``ignore_index``. Leading dimensions
            must match those of ``probs``; they are flattened (e.g. per-token
            predictions of shape ``(B, L, C)`` with targets ``(B, L)``).
        """
        if probs.dim() < 1 or tuple(targets.shape) != tuple(probs.shape[:-1]):
            raise ValueError(
                "RunningNLLMetric.update expects probs of shape (N, C) and targets "
                f"of shape (N,); got probs {tuple(probs.shape)} and targets "
                f"{tuple(targets.shape)}."
            )
        if targets.is_floating_point() or targets.is_complex():
            raise ValueError(
                f"targets must hold integer class indices, got dtype {targets.dtype}."
            )
        n_classes = probs.shape[-1]
        probs = probs.reshape(-1, n_classes)
        targets = targets.reshape(-1).long()
        valid = targets != self.ignore_index
        y = targets[valid]
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
            raise ValueError(
                f"targets must lie in [0, {n_classes}) or equal ignore_index="
                f"{self.ignore_index}; got values in [{int(y.min())}, {int(y.max())}]."
            )
        p_y = probs[valid].gather(1, y.unsqueeze(1)).squeeze(1)
        # out of place, so the state takes the (possibly higher) precision of probs
        self.nll_sum = self.nll_sum - torch.log(p_y).sum()
        self.n_valid_labels = self.n_valid_labels + valid.sum()

    def compute(self) -> Tensor:
        """The mean NLL over all counted targets so far (a scalar tensor)."""
        return self.nll_sum / self.n_valid_labels


def gaussian_nll(mean: Tensor, var: Tensor, targets: Tensor) -> Tensor:
    r"""``-log N(y_n; mean_n, var_n)`` per datum.

    Parameters
    ----------
    mean : torch.Tensor, shape (N, C)
    var : torch.Tensor, shape (N, C, C) or (N, C)
        predictive covariance per datum, or its diagonal (independent outputs);
        positive definite.
    targets : torch.Tensor, shape (N, C) or any shape of ``N * C`` entries

    Returns
    -------
    torch.Tensor, shape (N,)
        ``0.5 (C log 2 pi + log det var_n + r_n^T var_n^-1 r_n)``, ``r_n = y_n -
        mean_n``.
    """
    r = targets.reshape(mean.shape).to(mean.dtype) - mean
    C = mean.shape[-1]
    if var.shape == mean.shape:
        quad_logdet = (r.square() / var + var.log()).sum(-1)
    else:
        L = torch.linalg.cholesky(var)
        w = torch.linalg.solve_triangular(L, r.unsqueeze(-1), upper=False)
        quad_logdet = w.square().sum((-2, -1)) + 2 * L.diagonal(
            dim1=-2, dim2=-1
        ).log().sum(-1)
    return 0.5 * (C * math.log(2 * math.pi) + quad_logdet)


class RunningGaussianNLLMetric(Metric):
    r"""Running mean negative log-likelihood of targets under Gaussian predictives.

    Accumulates ``gaussian_nll(mean, var, targets)`` over calls of ``update`` and
    returns its mean over the data. It is the default loss of
    ``optimize_prior_precision(method="gridsearch")`` for regression, with ``var``
    the predictive variance of a new observation, ``f_var + sigma_noise^2 I``.
    """

    is_differentiable = True
    higher_is_better = False
    full_state_update = False

    nll_sum: Tensor
    n_data: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("nll_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("n_data", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, mean: Tensor, var: Tensor, targets: Tensor) -> None:
        """Add a batch: ``mean`` ``(N, C)``, ``var`` ``(N, C, C)`` or ``(N, C)``,
        ``targets`` of ``N * C`` entries."""
        if targets.numel() != mean.numel() or var.shape[:2] != mean.shape:
            raise ValueError(
                "RunningGaussianNLLMetric.update expects mean (N, C), var (N, C, C) "
                f"or (N, C) and N * C targets; got mean {tuple(mean.shape)}, var "
                f"{tuple(var.shape)}, targets {tuple(targets.shape)}."
            )
        # out of place, so the state takes the (possibly higher) precision of mean
        self.nll_sum = self.nll_sum + gaussian_nll(mean, var, targets).sum()
        self.n_data = self.n_data + mean.shape[0]

    def compute(self) -> Tensor:
        """The mean NLL per datum so far (a scalar tensor)."""
        return self.nll_sum / self.n_data


class RunningPredictiveNLLMetric(Metric):
    r"""Running mean negative log-likelihood of targets under a likelihood's
    predictive (``OutputLikelihood.predictive_nll``).

    The default loss of ``optimize_prior_precision(method="gridsearch")`` for the
    likelihoods other than regression and classification: 'binary' and
    'multilabel' score the Bernoulli NLL of the predicted probabilities, 'poisson'
    the Poisson NLL at the predictive mean rate, 'heteroscedastic_regression' the
    Gaussian NLL of the predictive mean and variance of ``y``.

    Parameters
    ----------
    likelihood : laplace.likelihood.OutputLikelihood
    **kwargs
        passed on to ``torchmetrics.Metric``.
    """

    is_differentiable = True
    higher_is_better = False
    full_state_update = False

    nll_sum: Tensor
    n_data: Tensor

    def __init__(self, likelihood, **kwargs) -> None:
        super().__init__(**kwargs)
        self.likelihood = likelihood
        self.add_state("nll_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("n_data", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, *prediction_and_targets: Tensor) -> None:
        """Add a batch: the parts of a prediction (probabilities, or a mean and a
        variance), then the targets."""
        *parts, targets = prediction_and_targets
        prediction = parts[0] if len(parts) == 1 else tuple(parts)
        nll = self.likelihood.predictive_nll(prediction, targets)
        self.nll_sum = self.nll_sum + nll.sum()
        self.n_data = self.n_data + nll.shape[0]

    def compute(self) -> Tensor:
        """The mean NLL per datum so far (a scalar tensor)."""
        return self.nll_sum / self.n_data
