"""Gaussian prior precision: its three structures, their expansion, and tuning.

The prior is ``N(mu_0, diag(p_0)^-1)`` over the ``P`` parameters that require grad.
Its precision is given in one of three structures (``PriorStructure``):

- ``scalar``: a tensor of shape ``(1,)``, the same precision for every parameter;
- ``layerwise``: shape ``(L,)``, one precision per parameter tensor ("layer");
- ``diag``: shape ``(P,)``, one precision per parameter.

Everything downstream works with the expanded diagonal ``p_0`` of shape ``(P,)``;
``expand_prior_precision`` is the one place that builds it, so gradients w.r.t.
the structured precision flow through it.

Tuning (``tune_by_marglik``, ``tune_by_gridsearch``) works on any Laplace
object through its public evidence and predictive; the object supplies the parts that
do not depend on the prior precision so that they are computed once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from laplace.utils import distributed
from laplace.utils._checks import check_positive_int
from laplace.utils.enums import (
    LinkApprox,
    PredType,
    PriorStructure,
    parse_enum,
)

if TYPE_CHECKING:  # pragma: no cover
    from laplace.baselaplace import BaseLaplace


def parameters_per_layer(params: Sequence[torch.Tensor]) -> list[int]:
    """Number of entries of each parameter tensor, in order."""
    return [p.numel() for p in params]


def as_prior_precision(
    value: float | torch.Tensor,
    n_layers: int | None,
    n_params: int | None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    name: str = "prior_precision",
) -> torch.Tensor:
    """Validate ``value`` and return it as a 1-D tensor of a valid structure.

    Accepts a Python number, a 0-d tensor (both become shape ``(1,)``), or a 1-D
    tensor of length 1, ``n_layers`` or ``n_params``. Differentiable tensors are kept
    as they are (only reshaped), so marginal-likelihood gradients reach them.

    Raises
    ------
    ValueError
        for a wrong shape or a non-positive or non-finite entry, naming ``name``.
    """
    if not isinstance(value, torch.Tensor):
        value = torch.tensor(float(value), dtype=dtype, device=device)
    elif dtype is not None or device is not None:
        value = value.to(dtype=dtype or value.dtype, device=device or value.device)
    if value.ndim == 0:
        value = value.reshape(1)
    # the sizes are None while the treated parameters are not known yet
    valid = {1, n_layers, n_params} if n_params is not None else {value.numel()}
    if value.ndim != 1 or value.numel() not in valid:
        raise ValueError(
            f"{name} must be a scalar or a 1-D tensor of length 1 (scalar), "
            f"{n_layers} (one per parameter tensor) or {n_params} (one per "
            f"parameter); got shape {tuple(value.shape)}."
        )
    with torch.no_grad():
        if not torch.isfinite(value).all() or (value <= 0).any():
            raise ValueError(f"{name} must be positive and finite; got {value}.")
    return value


def expand_prior_precision(
    prior_precision: torch.Tensor, params: Sequence[torch.Tensor]
) -> torch.Tensor:
    """The diagonal ``p_0`` ``(P,)`` of a scalar, layer-wise or diagonal precision.

    A precision of length equal to both the number of layers and of parameters (one
    parameter per layer) is the same either way.
    """
    sizes = parameters_per_layer(params)
    P, L = sum(sizes), len(sizes)
    n = prior_precision.numel()
    if n == 1:
        return prior_precision.reshape(1).expand(P)
    if n == P:
        return prior_precision.reshape(P)
    if n == L:
        counts = torch.tensor(sizes, device=prior_precision.device)
        return prior_precision.repeat_interleave(counts)
    raise ValueError(
        f"A prior precision of {n} entries fits neither 1, {L} layers nor {P} "
        "parameters."
    )


def prior_precision_of_structure(
    init: float | torch.Tensor,
    structure: PriorStructure | str,
    n_layers: int,
    n_params: int,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """An initial precision of ``structure`` for tuning.

    A scalar ``init`` is broadcast to the structure; a tensor ``init`` keeps its own
    structure, which must then be the requested one.
    """
    structure = parse_enum(PriorStructure, structure, "prior_structure")
    length = {
        PriorStructure.SCALAR: 1,
        PriorStructure.LAYERWISE: n_layers,
        PriorStructure.DIAG: n_params,
    }[structure]
    value = as_prior_precision(
        init, n_layers, n_params, dtype=dtype, device=device, name="init_prior_prec"
    )
    if value.numel() == 1:
        return value.detach().expand(length).clone()
    if value.numel() != length:
        raise ValueError(
            f"init_prior_prec has {value.numel()} entries but prior_structure="
            f"{structure.value!r} needs {length}."
        )
    return value.detach().clone()


def check_marglik_arguments(n_steps: int, lr: float) -> None:
    check_positive_int(n_steps, "n_steps")
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive number; got {lr!r}.")


def check_gridsearch_arguments(
    val_loader: Any, loss: Any, log_min: float, log_max: float, grid_size: int
) -> None:
    if val_loader is None:
        raise ValueError(
            "method='gridsearch' needs val_loader=, a DataLoader of validation data."
        )
    if loss is not None and not callable(loss):
        raise TypeError(
            "loss must be a torchmetrics.Metric or a callable(predictions, targets); "
            f"got {type(loss).__name__}."
        )
    check_positive_int(grid_size, "grid_size")
    if not log_min <= log_max:
        raise ValueError(
            f"log_prior_prec_min ({log_min}) must not exceed log_prior_prec_max "
            f"({log_max})."
        )


def tune_by_marglik(
    la: BaseLaplace, init: torch.Tensor, n_steps: int, lr: float, progress_bar: bool
) -> None:
    """Maximise the Laplace evidence over the log prior precision with Adam.

    On a non-finite evidence the previous prior precision is restored and a
    ``RuntimeError`` names the step.
    """
    previous = la.prior_precision
    log_prec = init.log().requires_grad_(True)
    optimizer = torch.optim.Adam([log_prec], lr=lr)
    try:
        for step in tqdm(range(n_steps), disable=not progress_bar, desc="marglik"):
            optimizer.zero_grad()
            neg_marglik = -la.log_marginal_likelihood(prior_precision=log_prec.exp())
            if not torch.isfinite(neg_marglik):
                value = -neg_marglik.detach().item()
                raise RuntimeError(
                    f"The log marginal likelihood became {value} at step "
                    f"{step}; try a smaller lr or another init_prior_prec."
                )
            neg_marglik.backward()
            optimizer.step()
    except BaseException:
        la.prior_precision = previous
        raise
    la.prior_precision = log_prec.detach().exp()


def default_loss(la: BaseLaplace):
    """The grid search's loss when none is given, on the model's device: the
    likelihood's ``default_metric``.

    Classification: the running NLL of the predicted probabilities
    (``RunningNLLMetric``). Regression: the running Gaussian NLL of the targets
    under the predictive of a new observation, ``N(f_mu, f_var + sigma_noise^2 I)``
    (``RunningGaussianNLLMetric``); laplace-torch's mean squared error of ``f_mu``
    does not depend on the prior precision at all (``f_mu`` is the network's
    output). Reward modeling: the running NLL of its validation pairs, scored as
    the classification it was fitted with (laplace-torch's default). The other
    likelihoods: the running NLL of the targets under their predictive
    (``RunningPredictiveNLLMetric``).
    """
    return distributed_metric(la._predictive_lik(fitting=True)).to(la._device)


def distributed_metric(lik):
    """``lik.default_metric()``, summed over the ranks at ``compute`` where the
    reduction is on (``laplace.utils.distributed``), this rank's alone where it
    is off."""
    red = distributed.reduction()
    return lik.default_metric(
        sync_on_compute=red is not None,
        process_group=None if red is None else red.group,
    )


def _loss_inputs(
    la: BaseLaplace, loss: Any, prediction: Any
) -> tuple[torch.Tensor, ...]:
    """What ``loss`` reads of a validation prediction (before the targets): the
    likelihood's ``metric_inputs``.

    Regression predictions are ``(f_mu, f_var)``: the Gaussian NLL reads the mean
    and the variance of a new observation ``f_var + sigma^2`` (``f_var`` of shape
    ``(N, C, C)`` or its diagonal ``(N, C)``); any other loss reads ``f_mu``, as in
    laplace-torch. Classification predictions (and reward modeling's pairs) are the
    probabilities.
    """
    lik = la._predictive_lik(fitting=True)
    return lik.metric_inputs(prediction, loss, la.sigma_noise)


def _evaluate(loss: Any, batches: list[tuple[tuple[torch.Tensor, ...], Any]]) -> float:
    """The loss of all validation batches ``(inputs, y)``: running (a Metric, updated
    batch by batch) or at once (a callable of the concatenated inputs)."""
    from torchmetrics import Metric

    if isinstance(loss, Metric):
        loss.reset()
        for inputs, y in batches:
            first = inputs[0]
            y = y.reshape(first.shape) if y.numel() == first.numel() else y
            loss.update(*inputs, y)
        return float(loss.compute())
    inputs, targets = zip(*batches)
    red = distributed.reduction()  # a callable sees all ranks' predictions
    columns = [distributed.all_gather_rows(torch.cat(c), red) for c in zip(*inputs)]
    targets = distributed.all_gather_rows(torch.cat(targets), red)
    return float(loss(*columns, targets))


def tune_by_gridsearch(
    la: BaseLaplace,
    grid: torch.Tensor,
    length: int,
    val_loader: Any,
    loss: Any,
    pred_type: PredType,
    link_approx: LinkApprox,
    n_samples: int,
    progress_bar: bool,
) -> None:
    """Pick the value of ``grid`` (as a precision of ``length`` entries) with the
    lowest validation ``loss`` (``default_loss`` if None; a torchmetrics Metric is
    moved to the model's device); non-finite losses are skipped."""
    from torchmetrics import Metric

    if loss is None:
        loss = default_loss(la)
    elif isinstance(loss, Metric):
        loss = loss.to(la._device)
    previous = la.prior_precision
    predictions = la._validation_predictions(
        val_loader, pred_type, link_approx, n_samples
    )
    results = []
    try:
        for i in tqdm(range(len(grid)), disable=not progress_bar, desc="gridsearch"):
            la.prior_precision = grid[i].expand(length).clone()
            batches = [(_loss_inputs(la, loss, pred), y) for pred, y in predictions()]
            results.append(_evaluate(loss, batches))
    except BaseException:
        la.prior_precision = previous
        raise
    values = torch.tensor(results, dtype=torch.float64)
    finite = torch.isfinite(values)
    if not finite.any():
        la.prior_precision = previous
        raise RuntimeError("The validation loss is not finite for any grid value.")
    best = int(torch.where(finite, values, torch.inf).argmin())
    la.prior_precision = grid[best].expand(length).clone()


__all__ = [
    "parameters_per_layer",
    "as_prior_precision",
    "expand_prior_precision",
    "prior_precision_of_structure",
    "tune_by_marglik",
    "tune_by_gridsearch",
]
