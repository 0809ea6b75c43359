"""A Laplace approximation with a dense precision: the empirical Fisher of a log
posterior, streamed over batches (posteriors' ``laplace.dense_fisher``).

``update`` adds ``G^T G`` with ``G`` the per-example gradients of
``log_posterior`` (see ``tree.example_gradients`` for ``per_sample``, whose
semantics are posteriors 0.1.x's). The state and ``sample`` are ``dense_ggn``'s.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from laplace.streaming.dense_ggn import (
    DenseLaplaceState,
    add_to_precision,
    init,
    sample,
)
from laplace.streaming.tree import Transform, example_gradients
from laplace.utils import distributed


def build(
    log_posterior: Callable, per_sample: bool = False, init_prec: Any = 0.0
) -> Transform:
    """The transform ``(init, update)`` of an empirical-Fisher Laplace
    approximation.

    Parameters
    ----------
    log_posterior : callable
        ``log_posterior(params, batch) -> (value, aux)``.
    per_sample : bool, default=False
        False: the batch is split into its examples and each one's gradient taken
        (whatever ``value`` is); True: ``value`` holds one log posterior per example.
    init_prec : float or tensor ``(P, P)``, default=0.0
    """
    return Transform(
        init=partial(init, init_prec=init_prec),
        update=partial(update, log_posterior=log_posterior, per_sample=per_sample),
    )


def update(
    state: DenseLaplaceState,
    batch: Any,
    log_posterior: Callable,
    per_sample: bool = False,
    inplace: bool = False,
) -> DenseLaplaceState:
    """Add the empirical Fisher of ``batch`` to the precision; returns the state
    (the same object, changed, with ``inplace``)."""
    with distributed.agreement(distributed.reduction(), "update"):
        G, aux = example_gradients(log_posterior, state.params, batch, per_sample)
    return add_to_precision(state, [(G, G)], aux, inplace)  # a Gram matrix


__all__ = ["DenseLaplaceState", "build", "init", "update", "sample"]
