"""Between the two APIs: a streaming state as a fitted ``Laplace`` object (for its
predictives, evidence and prior tuning), a fitted ``Laplace`` object as a streaming
state (to go on streaming, or as the prior of the next task), and the negative log
density of a state, a differentiable penalty for training on the next task.

The structure follows the state's class, by the tables below: a dense state is a
``FullLaplace``, a diagonal one a ``DiagLaplace``, a Kronecker-factored one
(``kron_ggn``) a ``KronLaplace``, all over all the weights of the model
(``subset_of_weights='all'``). A state's ``params`` are then the model's weights
that require grad, a mapping from their names (as ``dict(model.named_parameters())``;
a dict's leaves are flattened in sorted key order in a dense or diagonal state, the
Laplace object's in the model's order: the conversions permute).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from laplace.streaming.dense_ggn import DenseLaplaceState
from laplace.streaming.diag_ggn import DiagLaplaceState
from laplace.streaming.kron_ggn import KronLaplaceState
from laplace.streaming.tree import flatten, leaves

Tensor = torch.Tensor

#: the Laplace structure of each state class
STRUCTURES: dict[type, str] = {
    DenseLaplaceState: "full",
    DiagLaplaceState: "diag",
    KronLaplaceState: "kron",
}


def _structure(state: Any) -> str:
    structure = STRUCTURES.get(type(state))
    if structure is None:
        known = ", ".join(cls.__name__ for cls in STRUCTURES)
        raise TypeError(f"state must be one of {known}; got {type(state).__name__}.")
    return structure


def _trainable(model: nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _order(params: Any, model: nn.Module, model_order: bool) -> Tensor:
    """For each entry of the model's flat parameter vector, its index in the flat
    vector of ``params`` (a state's: dict leaves by sorted key, or, with
    ``model_order`` as a Kronecker-factored state's, in the model's order)."""
    names = list(_trainable(model))
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
    flat_names = list(params) if model_order else sorted(names)
    sizes = {n: params[n].numel() for n in names}
    starts, at = {}, 0
    for n in flat_names:
        starts[n] = at
        at += sizes[n]
    device = params[names[0]].device
    return torch.cat(
        [torch.arange(starts[n], starts[n] + sizes[n], device=device) for n in names]
    )


def to_laplace(
    state: Any,
    model: nn.Module,
    likelihood: str,
    prior_precision: float | Tensor | None = None,
    *,
    train_loader: Any = None,
    **laplace_kwargs: Any,
):
    """The fitted ``Laplace`` object of ``state``: mean ``state.params``, posterior
    precision the state's precision, of which ``prior_precision`` is the prior part
    and the rest the curvature ``H``.

    Parameters
    ----------
    state : DenseLaplaceState, DiagLaplaceState or KronLaplaceState
        with ``params`` the model's weights that require grad by name.
    model : nn.Module
        its weights are set to ``state.params`` (the Laplace object's mean, where
        its predictives evaluate the model).
    likelihood : str, Likelihood or OutputLikelihood
        the state's likelihood, any that ``Laplace`` takes (a ``kron_ggn`` state's:
        the one it was built with).
    prior_precision : float or tensor, optional
        the prior part of the state's precision: the ``init_prec`` it was built
        with (a float, or a tensor ``(P,)`` in the model's parameter order). Needed
        for a dense or diagonal state; a Kronecker-factored one knows its
        ``init_prec``, the default.
    train_loader : DataLoader, optional
        the training data: its summed loss at ``state.params`` and its size give
        the log-likelihood of the evidence (and prior tuning by marginal
        likelihood). A Kronecker-factored state has them (``loss``, ``n_data``);
        without it a dense or diagonal state's are unknown: the log-likelihood is
        NaN (the predictives work).
    **laplace_kwargs
        for ``Laplace(...)`` (``sigma_noise``, ``temperature``, ``prior_mean``,
        ``backend``, ...). ``H`` is the state's curvature divided by the
        likelihood's factor (``1 / (sigma_noise^2 temperature)``), so that the
        posterior precision is the state's.
    """
    from laplace import Laplace

    structure = _structure(state)
    if prior_precision is None:
        if structure != "kron":
            raise ValueError(
                f"prior_precision is needed for a {type(state).__name__}: the "
                "init_prec it was built with (a float or a tensor of one precision "
                "per parameter), the prior part of its precision."
            )
        prior_precision = state.init_prec
    index = _order(state.params, model, isinstance(state, KronLaplaceState))
    la = Laplace(
        model,
        likelihood,
        subset_of_weights="all",
        hessian_structure=structure,
        prior_precision=prior_precision,
        **laplace_kwargs,
    )
    if la.sigma_noise.ndim == 1:
        raise ValueError(
            "to_laplace takes a scalar sigma_noise: a state's precision holds the "
            "curvature of all outputs together, which one noise per output would "
            "have to split. Fit Laplace(..., sigma_noise=vector) on the data instead."
        )
    theta = torch.cat([t.detach().reshape(-1) for t in _leaves_in_order(state)])
    mean = theta[index].to(la._device, la._dtype)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(mean, la.params)
    H = CURVATURES[structure](state, index, la)
    if train_loader is not None or structure != "kron":
        loss, n_data, n_outputs = _training_loss(la, train_loader)
    else:
        loss, n_data = state.loss.to(la._device, la._dtype), state.n_data
        n_outputs = None if state.aux is None else state.aux.shape[-1]
        if n_outputs is None and la.lik.has_noise:
            raise ValueError(
                "A regression's log-likelihood (Gaussian noise, "
                f"likelihood={la.lik.name!r}) needs the number of outputs, which "
                "this KronLaplaceState does not know (no update since from_laplace): "
                "pass train_loader."
            )
    state_dict = la.state_dict()
    state_dict.update(
        mean=mean, H=H, loss=loss, n_data=n_data, n_outputs=n_outputs, fitted=True
    )
    la.load_state_dict(state_dict)
    return la


def _leaves_in_order(state: Any) -> list[Tensor]:
    """The leaves of ``state.params`` in the order of its flat precision."""
    if isinstance(state, KronLaplaceState):
        return list(state.params.values())
    return leaves(state.params)[0]


def _dense_curvature(state: DenseLaplaceState, index: Tensor, la: Any) -> Tensor:
    prec = state.prec[index][:, index].to(la._device, la._dtype)
    return (prec - torch.diag(la.prior_precision_diag.detach())) / la._h_factor.detach()


def _diag_curvature(state: DiagLaplaceState, index: Tensor, la: Any) -> Tensor:
    diagonal, _ = flatten(state.prec_diag)
    diagonal = diagonal[index].to(la._device, la._dtype)
    return (diagonal - la.prior_precision_diag.detach()) / la._h_factor.detach()


def _kron_curvature(state: KronLaplaceState, index: Tensor, la: Any) -> dict:
    prior = la.prior_precision.detach()
    if prior.numel() != 1 or float(prior) != state.init_prec:
        raise ValueError(
            "prior_precision must be the KronLaplaceState's init_prec "
            f"({state.init_prec}), the prior part of its precision; got {prior}."
        )
    K = state.kron * (1.0 / float(la._h_factor))
    return {"kfacs": [list(block) for block in K.kfacs], "averaged": K.averaged}


#: the curvature ``H`` of a Laplace object of each structure, from a state
CURVATURES: dict[str, Callable] = {
    "full": _dense_curvature,
    "diag": _diag_curvature,
    "kron": _kron_curvature,
}


def _training_loss(la: Any, train_loader: Any) -> tuple[Tensor, int, int | None]:
    """The summed loss of ``train_loader`` at the model's weights (``la``'s own,
    with the model in eval mode, its mode restored), its number of data and of
    outputs (NaN, 0 and None without one)."""
    from laplace.data import dataset_size

    if train_loader is None:
        return torch.full((), math.nan, dtype=la._dtype, device=la._device), 0, None
    training = la.model.training
    la.model.eval()
    try:
        loss, n_outputs, _ = la._training_loss(train_loader, progress_bar=False)
    finally:
        la.model.train(training)
    return loss, dataset_size(train_loader), n_outputs


#: a fitted Laplace object's state class, by the name of its class
STATES: dict[str, type] = {
    "FullLaplace": DenseLaplaceState,
    "DiagLaplace": DiagLaplaceState,
    "KronLaplace": KronLaplaceState,
}


def from_laplace(la: Any):
    """The streaming state of a fitted ``FullLaplace``, ``DiagLaplace`` or
    ``KronLaplace`` over all weights: ``params`` its mean as a dict like
    ``dict(model.named_parameters())`` (the weights that require grad, copies), and
    its posterior precision (prior included), dense, diagonal or
    Kronecker-factored as the object's. A ``KronLaplace`` needs a scalar prior
    precision (the state's ``init_prec``)."""
    cls = STATES.get(type(la).__name__)
    if cls is None:
        raise TypeError(
            "la must be a FullLaplace, DiagLaplace or KronLaplace over all weights "
            "(Laplace(..., subset_of_weights='all', hessian_structure='full', 'diag' "
            f"or 'kron')); got {type(la).__name__}."
        )
    la._check_fitted("from_laplace")
    names = [n for n, p in la.model.named_parameters() if p.requires_grad]
    shapes = [p.shape for p in la.params]
    parts = la.mean.detach().split([math.prod(s) for s in shapes])
    params = {
        n: p.reshape(s).clone() for n, p, s in zip(names, parts, shapes, strict=True)
    }
    if cls is KronLaplaceState:
        return _kron_state(la, params)
    index = _order(params, la.model, model_order=False)
    inverse = torch.empty_like(index)
    inverse[index] = torch.arange(index.numel(), device=index.device)
    precision = la.posterior_precision.detach()
    if cls is DenseLaplaceState:
        return DenseLaplaceState(params, precision[inverse][:, inverse].clone())
    _, unflatten = flatten(params)
    return DiagLaplaceState(params, unflatten(precision[inverse].clone()))


def _kron_state(la: Any, params: dict[str, Tensor]) -> KronLaplaceState:
    if getattr(la, "low_rank", None) is not None:
        raise ValueError(
            "from_laplace takes a KronLaplace with dense factors; this one keeps "
            f"low-rank factors (low_rank_factors={la.low_rank.rank}), which the "
            "streaming updates (kron_ggn) do not build. Fit it without "
            "low_rank_factors, or keep using the KronLaplace."
        )
    prior = la.prior_precision.detach()
    if prior.numel() != 1:
        raise ValueError(
            "A KronLaplaceState's prior is init_prec * I: the KronLaplace needs a "
            f"scalar prior_precision; it has {prior.numel()} (one per layer)."
        )
    return KronLaplaceState(
        params,
        la.H.clone() * float(la._h_factor),
        init_prec=float(prior),
        n_data=la.n_data,
        loss=la.loss.detach().clone(),
    )


# -- the state as a prior ----------------------------------------------------------
def _dense_square(state: DenseLaplaceState, delta: Tensor) -> Tensor:
    return delta @ (state.prec.to(delta.dtype) @ delta)


def _diag_square(state: DiagLaplaceState, delta: Tensor) -> Tensor:
    diagonal, _ = flatten(state.prec_diag)
    return (diagonal.to(delta.dtype) * delta.square()).sum()


def _kron_square(state: KronLaplaceState, delta: Tensor) -> Tensor:
    K = state.kron.bmm(delta.to(state.kron.kfacs[0][0].dtype).reshape(1, -1))
    return delta @ K.reshape(-1).to(delta.dtype) + state.init_prec * delta @ delta


def _dense_logdet(state: DenseLaplaceState) -> Tensor:
    return torch.linalg.slogdet(state.prec)[1]


def _diag_logdet(state: DiagLaplaceState) -> Tensor:
    diagonal, _ = flatten(state.prec_diag)
    return diagonal.log().sum()


def _kron_logdet(state: KronLaplaceState) -> Tensor:
    return (state.kron.decompose() + state.init_prec).logdet()


#: ``delta^T prec delta`` and ``log det prec`` of each state class
SQUARE_FORMS: dict[type, Callable] = {
    DenseLaplaceState: _dense_square,
    DiagLaplaceState: _diag_square,
    KronLaplaceState: _kron_square,
}
LOG_DETS: dict[type, Callable] = {
    DenseLaplaceState: _dense_logdet,
    DiagLaplaceState: _diag_logdet,
    KronLaplaceState: _kron_logdet,
}


def neg_log_prior(state: Any, params: Any, normalized: bool = False) -> Tensor:
    """``-log N(params; state.params, prec^-1)``, differentiable w.r.t. ``params``
    (a tree like ``state.params``): the penalty to add to the next task's training
    loss when ``state`` (the posterior of the tasks before) is its prior. Without
    ``normalized``, only ``0.5 (params - mean)^T prec (params - mean)``, the term
    that depends on ``params``."""
    _structure(state)
    flat, spec = leaves(params)
    ref, ref_spec = leaves(state.params)
    if spec != ref_spec or [t.shape for t in flat] != [t.shape for t in ref]:
        raise ValueError(
            f"params must be a tree like state.params ({ref_spec}); got {spec}."
        )
    means = _leaves_in_order(state)
    if isinstance(state, KronLaplaceState):  # the model's order, not sorted
        flat = [params[n] for n in state.params]
    for t, m in zip(flat, means, strict=True):
        if t.untyped_storage().data_ptr() == m.untyped_storage().data_ptr():
            raise ValueError(
                "params share memory with state.params, the prior's mean: training "
                "them moves the mean along and the penalty stays 0. Build the state "
                "from copies, e.g. {k: v.detach().clone() for k, v in "
                "model.named_parameters()}."
            )
    mean = torch.cat([t.detach().reshape(-1) for t in means])
    theta = torch.cat([t.reshape(-1) for t in flat])
    value = 0.5 * SQUARE_FORMS[type(state)](state, theta - mean.to(theta))
    if normalized:
        P = mean.numel()
        value = value + 0.5 * (P * math.log(2 * math.pi) - LOG_DETS[type(state)](state))
    return value


__all__ = ["to_laplace", "from_laplace", "neg_log_prior", "STRUCTURES", "STATES"]
