"""Gaussian prior precision: its three structures and their expansion.

The prior is ``N(mu_0, diag(p_0)^-1)`` over the ``P`` parameters that require grad.
Its precision is given in one of three structures (:class:`PriorStructure`):

- ``scalar``: a tensor of shape ``(1,)``, the same precision for every parameter;
- ``layerwise``: shape ``(L,)``, one precision per parameter tensor ("layer");
- ``diag``: shape ``(P,)``, one precision per parameter.

Everything downstream works with the expanded diagonal ``p_0`` of shape ``(P,)``;
:func:`expand_prior_precision` is the one place that builds it, so gradients w.r.t.
the structured precision flow through it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from laplace.utils.enums import PriorStructure, parse_enum


def parameters_per_layer(params: Sequence[torch.Tensor]) -> list[int]:
    """Number of entries of each parameter tensor, in order."""
    return [p.numel() for p in params]


def as_prior_precision(
    value: float | torch.Tensor,
    n_layers: int,
    n_params: int,
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
    valid = {1, n_layers, n_params}
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


__all__ = [
    "parameters_per_layer",
    "as_prior_precision",
    "expand_prior_precision",
    "prior_precision_of_structure",
]
