"""A Laplace approximation with a diagonal precision: the diagonal of the
generalized Gauss-Newton matrix, streamed over batches (posteriors'
``laplace.diag_ggn``).

The precision ``prec_diag`` is a tree like the parameters: ``init_prec_diag`` plus
the sum over batches of ``diag(J^T H J)`` (see ``dense_ggn``). Differences from
posteriors 0.1.3 as in ``dense_ggn``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from laplace.streaming import ggn
from laplace.streaming.tree import (
    TensorTree,
    Transform,
    leaves,
    precision_dtype,
    rebuild,
    same_structure,
)
from laplace.utils import distributed

Tensor = torch.Tensor
#: ``sample``'s default: one draw, without a leading sample dimension
EMPTY = torch.Size([])


@dataclass
class DiagLaplaceState:
    """A Normal over the parameters with a diagonal precision: mean ``params`` and
    precision ``prec_diag``, both trees of the same structure, the ``aux`` of the
    last ``forward`` call, and the number of updates ``step``."""

    params: TensorTree
    prec_diag: TensorTree
    aux: Any = None
    step: Tensor = field(default_factory=lambda: torch.tensor(0))


def build(
    forward: Callable,
    outer_log_likelihood: Callable,
    init_prec_diag: TensorTree | float = 0.0,
) -> Transform:
    """The transform ``(init, update)`` of a diagonal GGN Laplace approximation
    (``forward`` and ``outer_log_likelihood`` as in ``dense_ggn.build``);
    ``init_prec_diag`` a float (for every parameter) or a tree like the
    parameters."""
    return Transform(
        init=partial(init, init_prec_diag=init_prec_diag),
        update=partial(
            update, forward=forward, outer_log_likelihood=outer_log_likelihood
        ),
    )


def init(
    params: TensorTree, init_prec_diag: TensorTree | float = 0.0
) -> DiagLaplaceState:
    """The state before any data: mean ``params``, precision ``init_prec_diag``."""
    flat, spec = leaves(params)
    if isinstance(init_prec_diag, (int, float)):
        prec = [
            torch.full_like(t, float(init_prec_diag), dtype=precision_dtype(t.dtype))
            for t in flat
        ]
    else:
        given = same_structure(init_prec_diag, params, "init_prec_diag")
        prec = [
            g.to(t.device, precision_dtype(t.dtype)).clone()
            for g, t in zip(given, flat, strict=True)
        ]
    return DiagLaplaceState(params, rebuild(prec, spec, params))


def update(
    state: DiagLaplaceState,
    batch: Any,
    forward: Callable,
    outer_log_likelihood: Callable,
    inplace: bool = False,
) -> DiagLaplaceState:
    """Add ``diag(J^T H J)`` of ``batch`` to the precision; returns the state (the
    same object, changed, with ``inplace``; a new one otherwise)."""
    with distributed.agreement(distributed.reduction(), "update"):
        aux, pieces = ggn.terms(forward, outer_log_likelihood, state.params, batch)
        diagonal = sum((J * HJ).sum(0) for J, HJ in pieces)
    return add_to_diagonal(state, diagonal, aux, inplace)


def add_to_diagonal(
    state: DiagLaplaceState, diagonal: Tensor, aux: Any, inplace: bool
) -> DiagLaplaceState:
    """``state`` with ``diagonal`` ``(P,)`` (over the flattened parameters) added to
    its precision tree, ``aux`` and one more step: the same object, changed, with
    ``inplace``; a new one otherwise. Under a process group
    (``laplace.utils.distributed``) the diagonals of every rank's batch are
    added."""
    diagonal = distributed.all_reduce_sum(diagonal, distributed.reduction())
    means, spec = leaves(state.params)
    parts = diagonal.split([m.numel() for m in means])
    added = [d.reshape(m.shape) for d, m in zip(parts, means, strict=True)]
    prec = same_structure(state.prec_diag, state.params, "prec_diag")
    if inplace:
        for p, a in zip(prec, added, strict=True):
            p.add_(a.to(p.dtype))
        state.aux = aux
        state.step.add_(1)
        return state
    total = [p + a.to(p.dtype) for p, a in zip(prec, added, strict=True)]
    return DiagLaplaceState(
        state.params, rebuild(total, spec, state.params), aux, state.step + 1
    )


def sample(
    state: DiagLaplaceState, sample_shape: torch.Size | tuple = EMPTY
) -> TensorTree:
    """Draws from ``N(params, diag(prec_diag)^{-1})``: a tree like ``params`` whose
    leaves have shape ``sample_shape + leaf.shape``."""
    shape = torch.Size(sample_shape)
    means, spec = leaves(state.params)
    precs, _ = leaves(state.prec_diag, "prec_diag")
    draws = [
        (
            m.detach()
            + torch.randn(shape + m.shape, dtype=p.dtype, device=m.device) / p.sqrt()
        ).to(m.dtype)
        for m, p in zip(means, precs, strict=True)
    ]
    return rebuild(draws, spec, state.params)


__all__ = ["DiagLaplaceState", "build", "init", "update", "sample"]
