"""Between the two APIs: a streaming state as a fitted ``Laplace`` object (for its
predictives, evidence and prior tuning), a fitted ``Laplace`` object as a streaming
state (to go on streaming, or as the prior of the next task), and the negative log
density of a state, a differentiable penalty for training on the next task.

The structure follows the state's class, by the tables below: a dense state is a
``FullLaplace``, a diagonal one a ``DiagLaplace``, both over all the weights of the
model (``subset_of_weights='all'``). A state's ``params`` are then the model's
weights that require grad, a mapping from their names (as
``dict(model.named_parameters())``; a dict's leaves are flattened in sorted key
order, the Laplace object's in the model's order: the conversions permute).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from laplace.streaming.dense_ggn import DenseLaplaceState
from laplace.streaming.diag_ggn import DiagLaplaceState
from laplace.streaming.tree import flatten, leaves

Tensor = torch.Tensor

#: the Laplace structure of each state class
STRUCTURES: dict[type, str] = {DenseLaplaceState: "full", DiagLaplaceState: "diag"}


def _structure(state: Any) -> str:
    structure = STRUCTURES.get(type(state))
    if structure is None:
        known = ", ".join(cls.__name__ for cls in STRUCTURES)
        raise TypeError(f"state must be one of {known}; got {type(state).__name__}.")
    return structure


def _trainable(model: nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _order(state: Any, model: nn.Module) -> tuple[list[str], Tensor]:
    """The model's trainable names and, for each entry of the model's flat
    parameter vector, its index in the state's flat vector."""
    names = list(_trainable(model))
    params = state.params
    if not isinstance(params, Mapping) or set(params) != set(names):
        got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(
            "state.params must map the names of the model's parameters that require "
            f"grad to tensors, as dict(model.named_parameters()): {names}; got {got}."
        )
    model_params = _trainable(model)
    for n in names:
        if tuple(params[n].shape) != tuple(model_params[n].shape):
            raise ValueError(
                f"state.params[{n!r}] has shape {tuple(params[n].shape)}; the model's "
                f"parameter has {tuple(model_params[n].shape)}."
            )
    flat_names = sorted(names)
    sizes = {n: params[n].numel() for n in names}
    starts, at = {}, 0
    for n in flat_names:
        starts[n] = at
        at += sizes[n]
    device = params[names[0]].device
    index = torch.cat(
        [torch.arange(starts[n], starts[n] + sizes[n], device=device) for n in names]
    )
    return names, index


def to_laplace(
    state: Any,
    model: nn.Module,
    likelihood: str,
    prior_precision: float | Tensor,
    *,
    train_loader: Any = None,
    **laplace_kwargs: Any,
):
    """The fitted ``Laplace`` object of ``state``: mean ``state.params``, posterior
    precision the state's precision, of which ``prior_precision`` is the prior part
    (the ``init_prec`` the state was built with; a float, or a tensor ``(P,)`` in
    the model's parameter order) and the rest the curvature ``H``.

    Parameters
    ----------
    state : DenseLaplaceState or DiagLaplaceState
        with ``params`` the model's weights that require grad by name.
    model : nn.Module
        its weights are set to ``state.params`` (the Laplace object's mean, where
        its predictives evaluate the model).
    likelihood : {'classification', 'regression'}
    prior_precision : float or tensor
    train_loader : DataLoader, optional
        the training data: its summed loss at ``state.params`` and its size give
        the log-likelihood of the evidence (and prior tuning by marginal
        likelihood). Without it they are unknown: the log-likelihood is NaN.
    **laplace_kwargs
        for ``Laplace(...)`` (``sigma_noise``, ``temperature``, ``prior_mean``,
        ``backend``, ...). ``H`` is the state's curvature divided by the
        likelihood's factor (``1 / (sigma_noise^2 temperature)``), so that the
        posterior precision is the state's.
    """
    from laplace import Laplace
    from laplace.likelihood import get_likelihood

    structure = _structure(state)
    names, index = _order(state, model)
    la = Laplace(
        model,
        likelihood,
        subset_of_weights="all",
        hessian_structure=structure,
        prior_precision=prior_precision,
        **laplace_kwargs,
    )
    theta, _ = flatten(state.params)
    mean = theta[index].to(la._device, la._dtype)
    prior = la.prior_precision_diag.detach()
    if structure == "full":
        prec = state.prec[index][:, index].to(la._device, la._dtype)
        H = (prec - torch.diag(prior)) / la._h_factor.detach()
    else:
        diagonal, _ = flatten(state.prec_diag)
        H = (diagonal[index].to(la._device, la._dtype) - prior) / la._h_factor.detach()
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(mean, la.params)
    loss, n_data, n_outputs = _training_loss(
        model, get_likelihood(likelihood), train_loader, la
    )
    state_dict = la.state_dict()
    state_dict.update(
        mean=mean, H=H, loss=loss, n_data=n_data, n_outputs=n_outputs, fitted=True
    )
    la.load_state_dict(state_dict)
    return la


def _training_loss(model, lik, train_loader, la) -> tuple[Tensor, int, int | None]:
    """The summed loss, the number of data and of outputs of ``train_loader``
    (NaN, 0 and None without one)."""
    from laplace.data import dataset_size, split_batch, to_device

    nan = torch.full((), math.nan, dtype=la._dtype, device=la._device)
    if train_loader is None:
        return nan, 0, None
    loss, n_outputs = torch.zeros_like(nan), None
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in train_loader:
                x, y = split_batch(batch, la.dict_key_x, la.dict_key_y)
                f = model(to_device(x, la._device))
                loss = loss + lik.loss(f, y.to(la._device))
                n_outputs = f.shape[-1]
    finally:
        model.train(training)
    return loss, dataset_size(train_loader), n_outputs


#: a fitted Laplace object's state class, by the name of its class
STATES: dict[str, type] = {
    "FullLaplace": DenseLaplaceState,
    "DiagLaplace": DiagLaplaceState,
}


def from_laplace(la: Any):
    """The streaming state of a fitted ``FullLaplace`` or ``DiagLaplace`` over all
    weights: ``params`` its mean as a dict like ``dict(model.named_parameters())``
    (the weights that require grad), and its posterior precision (prior
    included), dense or diagonal as the object's."""
    cls = STATES.get(type(la).__name__)
    if cls is None:
        raise TypeError(
            "la must be a FullLaplace or DiagLaplace over all weights "
            "(Laplace(..., subset_of_weights='all', hessian_structure='full' or "
            f"'diag')); got {type(la).__name__}."
        )
    la._check_fitted("from_laplace")
    names = [n for n, p in la.model.named_parameters() if p.requires_grad]
    shapes = [p.shape for p in la.params]
    parts = la.mean.detach().split([math.prod(s) for s in shapes])
    params = {
        n: p.reshape(s).clone() for n, p, s in zip(names, parts, shapes, strict=True)
    }
    _, index = _order(DenseLaplaceState(params, torch.empty(0)), la.model)
    inverse = torch.empty_like(index)
    inverse[index] = torch.arange(index.numel(), device=index.device)
    precision = la.posterior_precision.detach()
    if cls is DenseLaplaceState:
        return DenseLaplaceState(params, precision[inverse][:, inverse].clone())
    _, unflatten = flatten(params)
    return DiagLaplaceState(params, unflatten(precision[inverse].clone()))


# -- the state as a prior ----------------------------------------------------------
def _dense_square(state: DenseLaplaceState, delta: Tensor) -> Tensor:
    return delta @ (state.prec.to(delta.dtype) @ delta)


def _diag_square(state: DiagLaplaceState, delta: Tensor) -> Tensor:
    diagonal, _ = flatten(state.prec_diag)
    return (diagonal.to(delta.dtype) * delta.square()).sum()


def _dense_logdet(state: DenseLaplaceState) -> Tensor:
    return torch.linalg.slogdet(state.prec)[1]


def _diag_logdet(state: DiagLaplaceState) -> Tensor:
    diagonal, _ = flatten(state.prec_diag)
    return diagonal.log().sum()


#: ``delta^T prec delta`` and ``log det prec`` of each state class
SQUARE_FORMS: dict[type, Callable] = {
    DenseLaplaceState: _dense_square,
    DiagLaplaceState: _diag_square,
}
LOG_DETS: dict[type, Callable] = {
    DenseLaplaceState: _dense_logdet,
    DiagLaplaceState: _diag_logdet,
}


def neg_log_prior(state: Any, params: Any, normalized: bool = False) -> Tensor:
    """``-log N(params; state.params, prec^-1)``, differentiable w.r.t. ``params``
    (a tree like ``state.params``): the penalty to add to the next task's training
    loss when ``state`` (the posterior of the tasks before) is its prior. Without
    ``normalized``, only ``0.5 (params - mean)^T prec (params - mean)``, the term
    that depends on ``params``."""
    square = SQUARE_FORMS.get(type(state))
    if square is None:
        known = ", ".join(cls.__name__ for cls in SQUARE_FORMS)
        raise TypeError(f"state must be one of {known}; got {type(state).__name__}.")
    mean, _ = flatten(state.params)
    flat, spec = leaves(params)
    _, ref_spec = leaves(state.params)
    if spec != ref_spec or sum(t.numel() for t in flat) != mean.numel():
        raise ValueError(
            f"params must be a tree like state.params ({ref_spec}); got {spec}."
        )
    theta = torch.cat([t.reshape(-1) for t in flat])
    value = 0.5 * square(state, theta - mean.to(theta))
    if normalized:
        P = mean.numel()
        value = value + 0.5 * (P * math.log(2 * math.pi) - LOG_DETS[type(state)](state))
    return value


__all__ = ["to_laplace", "from_laplace", "neg_log_prior", "STRUCTURES", "STATES"]
