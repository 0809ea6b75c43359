"""Validation losses of a Laplace predictive (laplace-torch's ``get_nll`` and
``validate``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from laplace.data import split_batch, to_device
from laplace.utils import distributed
from laplace.utils._checks import check_n_samples
from laplace.utils.enums import LinkApprox, PredType, parse_enum

if TYPE_CHECKING:  # pragma: no cover
    from laplace.baselaplace import BaseLaplace

Tensor = torch.Tensor

__all__ = ["get_nll", "validate"]


def get_nll(out_dist: Tensor, targets: Tensor) -> Tensor:
    r"""Mean negative log-likelihood of class probabilities:
    $-\frac{1}{N}\sum_n \log p_{n, y_n}$ (targets equal to -100 are skipped).

    Parameters
    ----------
    out_dist : torch.Tensor, shape (N, C) or (C,)
        class probabilities.
    targets : torch.Tensor of int64, shape (N,) or ()
        class indices.

    Returns
    -------
    nll : torch.Tensor, shape ()
    """
    return F.nll_loss(torch.log(out_dist), targets)


def validate(
    laplace: BaseLaplace,
    val_loader: DataLoader,
    loss: Any,
    pred_type: PredType | str = PredType.GLM,
    link_approx: LinkApprox | str = LinkApprox.PROBIT,
    n_samples: int = 100,
    dict_key_y: str = "labels",
) -> float:
    """The loss of ``laplace``'s predictive on ``val_loader``.

    Classification predicts class probabilities ``(N, C)``; regression the mean
    ``f_mu`` ``(N, C)`` and variance ``f_var`` ``(N, C)`` (the diagonal of a full
    predictive covariance).

    Parameters
    ----------
    laplace : BaseLaplace
        a fitted Laplace approximation.
    val_loader : DataLoader
        validation batches ``(x, y)`` or mappings holding ``dict_key_y``.
    loss : torchmetrics.Metric or callable
        a Metric is updated batch by batch with ``(prediction, y)`` (the mean for
        regression) and computed; a callable gets all predictions at once:
        ``loss(probs, y)`` for classification, ``loss(f_mu, y, f_var)`` for
        regression. Under a process group (``laplace.utils.distributed``) the
        callable gets the predictions of every rank's validation shard, in rank
        order; a Metric syncs its states by its own settings
        (``sync_on_compute``, ``process_group``).
    pred_type : {'glm', 'nn'}
    link_approx : {'probit', 'bridge', 'bridge_norm', 'mc'}
    n_samples : int
        samples of the 'mc' link and of the 'nn' predictive.
    dict_key_y : str
        key of the targets in mapping batches (the inputs are the whole mapping).

    Returns
    -------
    loss : float
    """
    from torchmetrics import Metric

    pred_type = parse_enum(PredType, pred_type, "pred_type")
    link_approx = parse_enum(LinkApprox, link_approx, "link_approx")
    check_n_samples(n_samples)
    if not callable(loss):
        raise TypeError(
            "loss must be a torchmetrics.Metric or a callable; got "
            f"{type(loss).__name__}."
        )
    regression = laplace._predicts_regression
    if isinstance(loss, Metric):
        loss.reset()
    means, variances, targets = [], [], []
    with torch.no_grad():
        for batch in val_loader:
            x, y = split_batch(batch, laplace.dict_key_x, dict_key_y)
            out = laplace(
                to_device(x, laplace._device),
                pred_type=pred_type,
                link_approx=link_approx,
                n_samples=n_samples,
            )
            mean, var = out if regression else (out, None)
            y = y.to(mean.device)
            if isinstance(loss, Metric):
                loss.update(mean, y.reshape(mean.shape) if regression else y)
                continue
            means.append(mean)
            targets.append(y)
            if regression:
                variances.append(_marginal(var, mean))
    if isinstance(loss, Metric):
        return float(loss.compute())
    red = distributed.reduction()  # a callable sees all ranks' predictions
    mean = distributed.all_gather_rows(torch.cat(means), red)
    y = distributed.all_gather_rows(torch.cat(targets), red)
    if regression:
        variance = distributed.all_gather_rows(torch.cat(variances), red)
        return float(loss(mean, y, variance))
    return float(loss(mean, y))


def _marginal(var: Tensor, mean: Tensor) -> Tensor:
    """The predictive variances ``(N, C)`` of a covariance ``(N, C, C)`` or of
    variances already ``(N, C)``."""
    return var.diagonal(dim1=-2, dim2=-1) if var.ndim == mean.ndim + 1 else var
