"""A Laplace approximation with a diagonal precision: the diagonal of the empirical
Fisher of a log posterior, streamed over batches (posteriors'
``laplace.diag_fisher``). ``per_sample`` as in ``dense_fisher``; the state and
``sample`` are ``diag_ggn``'s."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from laplace.streaming.diag_ggn import (
    DiagLaplaceState,
    add_to_diagonal,
    init,
    sample,
)
from laplace.streaming.tree import Transform, example_gradients
from laplace.utils import distributed


def build(
    log_posterior: Callable, per_sample: bool = False, init_prec_diag: Any = 0.0
) -> Transform:
    """The transform ``(init, update)`` of a diagonal empirical-Fisher Laplace
    approximation (arguments as in ``dense_fisher.build``; ``init_prec_diag`` a
    float or a tree like the parameters)."""
    return Transform(
        init=partial(init, init_prec_diag=init_prec_diag),
        update=partial(update, log_posterior=log_posterior, per_sample=per_sample),
    )


def update(
    state: DiagLaplaceState,
    batch: Any,
    log_posterior: Callable,
    per_sample: bool = False,
    inplace: bool = False,
) -> DiagLaplaceState:
    """Add the diagonal of the empirical Fisher of ``batch`` to the precision."""
    with distributed.agreement(distributed.reduction(), "update"):
        G, aux = example_gradients(log_posterior, state.params, batch, per_sample)
    return add_to_diagonal(state, G.square().sum(0), aux, inplace)


__all__ = ["DiagLaplaceState", "build", "init", "update", "sample"]
