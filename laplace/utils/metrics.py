"""Running metrics for tuning the prior precision on a validation set."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["RunningNLLMetric"]


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
