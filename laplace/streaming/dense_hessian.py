"""A Laplace approximation with a dense precision: the negative Hessian of a log
posterior, streamed over batches (posteriors' ``laplace.dense_hessian``).

``update`` adds ``-rescale * d^2 log_posterior / dparams^2 + epsilon * I`` for the
batch, as posteriors 0.1.3 does (observed on a non-quadratic log posterior). The
state and ``sample`` are ``dense_ggn``'s. The value must be a scalar: posteriors
0.1.3 takes a vector and returns a matrix that is neither the Hessian of its sum nor
of any entry; this refuses it, naming ``log_posterior``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from laplace.streaming.dense_ggn import (
    DenseLaplaceState,
    add_to_precision,
    init,
    sample,
)
from laplace.streaming.tree import Transform, flatten, pair
from laplace.utils import distributed


def build(
    log_posterior: Callable,
    init_prec: Any = 0.0,
    epsilon: float = 0.0,
    rescale: float = 1.0,
) -> Transform:
    """The transform ``(init, update)`` of a Hessian Laplace approximation.

    Parameters
    ----------
    log_posterior : callable
        ``log_posterior(params, batch) -> (value, aux)``, ``value`` a scalar.
    init_prec : float or tensor ``(P, P)``, default=0.0
    epsilon : float, default=0.0
        added to the diagonal at every update.
    rescale : float, default=1.0
        multiplies the negative Hessian at every update.
    """
    return Transform(
        init=partial(init, init_prec=init_prec),
        update=partial(
            update, log_posterior=log_posterior, epsilon=epsilon, rescale=rescale
        ),
    )


def update(
    state: DenseLaplaceState,
    batch: Any,
    log_posterior: Callable,
    epsilon: float = 0.0,
    rescale: float = 1.0,
    inplace: bool = False,
) -> DenseLaplaceState:
    """Add ``-rescale * H + epsilon * I`` of ``batch`` to the precision; returns the
    state (the same object, changed, with ``inplace``)."""
    theta, unflatten = flatten(state.params)

    def value(vector):
        out, aux = pair(log_posterior(unflatten(vector), batch), "log_posterior")
        if out.numel() != 1:
            raise ValueError(
                "log_posterior must return a scalar value for the Hessian (the log "
                f"posterior of the batch); it returned shape {tuple(out.shape)}."
            )
        return out.reshape(()), aux

    with distributed.agreement(distributed.reduction(), "update"):
        hessian = torch.func.jacfwd(
            torch.func.jacrev(value, has_aux=True), has_aux=True
        )
        H, aux = hessian(theta)
    eye = torch.eye(theta.numel(), dtype=theta.dtype, device=theta.device)
    # epsilon once per update, also when the ranks' Hessians are summed
    return add_to_precision(state, [-rescale * H], aux, inplace, once=epsilon * eye)


__all__ = ["DenseLaplaceState", "build", "init", "update", "sample"]
