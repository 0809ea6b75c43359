"""laplace-torch's model-level prior-precision helpers, on ``laplace.prior``.

``laplace.prior`` works on the list of treated parameters; these take the model and
treat, as every Laplace class does, the parameters that require grad."""

from __future__ import annotations

import torch
from torch import nn

from laplace import prior
from laplace.utils.enums import PriorStructure

Tensor = torch.Tensor

__all__ = ["expand_prior_precision", "fix_prior_prec_structure", "parameters_per_layer"]


def _treated(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def parameters_per_layer(model: nn.Module) -> list[int]:
    """Number of entries of each parameter tensor of ``model`` that requires grad,
    in ``model.parameters()`` order: the layers of a layer-wise prior precision."""
    return prior.parameters_per_layer(_treated(model))


def expand_prior_precision(prior_prec: Tensor, model: nn.Module) -> Tensor:
    """The diagonal ``p_0`` ``(P,)`` of a scalar ``(1,)`` (or 0-d), layer-wise
    ``(L,)`` or diagonal ``(P,)`` prior precision over the ``P`` parameters, in
    ``L`` tensors, of ``model`` that require grad. Differentiable in ``prior_prec``.

    Raises
    ------
    ValueError
        for a precision of another length.
    """
    return prior.expand_prior_precision(prior_prec, _treated(model))


def fix_prior_prec_structure(
    prior_prec_init: float | Tensor,
    prior_structure: PriorStructure | str,
    n_layers: int,
    n_params: int,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> Tensor:
    """An initial prior precision of ``prior_structure``: a scalar
    ``prior_prec_init`` repeated to length 1 ('scalar'), ``n_layers``
    ('layerwise') or ``n_params`` ('diag'), on ``device`` in ``dtype``. A 1-D
    tensor of the structure's length is taken as it is (detached, copied).

    Raises
    ------
    ValueError
        for an unknown structure, a tensor of another length, or a non-positive or
        non-finite value.
    """
    return prior.prior_precision_of_structure(
        prior_prec_init,
        prior_structure,
        n_layers,
        n_params,
        dtype=dtype,
        device=device,
    )
