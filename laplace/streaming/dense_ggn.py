"""A Laplace approximation with a dense precision: the generalized Gauss-Newton
matrix, streamed over batches (posteriors' ``laplace.dense_ggn``).

``G = J^T H J`` per batch, with ``J`` the Jacobian of ``forward``'s output w.r.t.
the parameters and ``H = -d^2 l / dz^2`` the Hessian of the negative outer
log-likelihood w.r.t. that output; the precision is ``init_prec I + sum of G``.

Differences from posteriors 0.1.3 (documented in docs/differences.md):
``update`` returns the state (posteriors returns ``(state, aux)``; the aux is the
state's ``aux``); the state is a dataclass with ``params``, ``prec``, ``aux`` and
``step``; ``sample`` keeps every parameter's shape (posteriors' fails on a
parameter of two or more dimensions) and works in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from laplace.streaming import ggn
from laplace.streaming.tree import TensorTree, Transform, flatten, precision_dtype
from laplace.utils import distributed

Tensor = torch.Tensor
#: ``sample``'s default: one draw, without a leading sample dimension
EMPTY = torch.Size([])


@dataclass
class DenseLaplaceState:
    """A Normal over the parameters: mean ``params`` (a tree), precision ``prec``
    ``(P, P)`` over the flattened parameters (leaves in posteriors' order: a list's
    or tuple's in order, a dict's by sorted keys, an ``OrderedDict``'s in insertion
    order; each leaf row-major), the ``aux`` of the last ``forward`` call, and the
    number of updates ``step``."""

    params: TensorTree
    prec: Tensor
    aux: Any = None
    step: Tensor = field(default_factory=lambda: torch.tensor(0))


def build(
    forward: Callable,
    outer_log_likelihood: Callable,
    init_prec: Tensor | float = 0.0,
) -> Transform:
    """The transform ``(init, update)`` of a dense GGN Laplace approximation.

    Parameters
    ----------
    forward : callable
        ``forward(params, batch) -> (output, aux)``: the output (e.g. logits) not
        reduced over the batch, and any auxiliary information.
    outer_log_likelihood : callable
        ``outer_log_likelihood(output, batch) -> scalar``: the log-likelihood of
        the batch given the output of ``forward``, summed over its examples.
    init_prec : float or tensor ``(P, P)``, default=0.0
        the initial precision: a float means that float times the identity.
    """
    return Transform(
        init=partial(init, init_prec=init_prec),
        update=partial(
            update, forward=forward, outer_log_likelihood=outer_log_likelihood
        ),
    )


def init(params: TensorTree, init_prec: Tensor | float = 0.0) -> DenseLaplaceState:
    """The state before any data: mean ``params``, precision ``init_prec``."""
    theta, _ = flatten(params)
    P = theta.numel()
    if isinstance(init_prec, Tensor):
        if init_prec.shape != (P, P):
            raise ValueError(
                f"init_prec must be a float or a ({P}, {P}) tensor for these "
                f"{P} parameters; got shape {tuple(init_prec.shape)}."
            )
        prec = init_prec.to(theta.device, precision_dtype(theta.dtype)).clone()
        tol = torch.finfo(prec.dtype).eps ** 0.5 * float(prec.abs().max())
        if P and not torch.allclose(prec, prec.T, rtol=0.0, atol=tol):
            raise ValueError(
                "init_prec must be a symmetric matrix (a precision); got one whose "
                f"largest asymmetry is {float((prec - prec.T).abs().max()):.3g}."
            )
    else:
        dtype = precision_dtype(theta.dtype)
        prec = float(init_prec) * torch.eye(P, dtype=dtype, device=theta.device)
    return DenseLaplaceState(params, prec)


def update(
    state: DenseLaplaceState,
    batch: Any,
    forward: Callable,
    outer_log_likelihood: Callable,
    inplace: bool = False,
) -> DenseLaplaceState:
    """Add the GGN of ``batch`` to the precision; returns the state (the same
    object, changed, with ``inplace``; a new one otherwise)."""
    with distributed.agreement(distributed.reduction(), "update"):
        aux, pieces = ggn.terms(forward, outer_log_likelihood, state.params, batch)
    return add_to_precision(state, pieces, aux, inplace)


def add_to_precision(
    state: DenseLaplaceState,
    pieces: Iterable,
    aux: Any,
    inplace: bool,
    once: Tensor | None = None,
) -> DenseLaplaceState:
    """``state`` with ``pieces`` added to its precision, ``aux`` and one more step:
    the same object, changed, with ``inplace``; a new one otherwise. Each piece is
    a matrix ``(P, P)``, added, or a pair ``(A, B)`` of rows ``(R, P)``, whose
    ``A^T B`` is added without a ``(P, P)`` temporary; a pair of one tensor twice,
    ``(S, S)``, adds the Gram matrix ``S^T S`` at half the cost (its blocks below
    the diagonal, copied above it at the end).

    Under a process group (``laplace.utils.distributed``) the pieces of every
    rank's batch are added (summed over the ranks in a ``(P, P)`` buffer); the
    matrix ``once`` (e.g. a damping) is added once, not once per rank."""
    red = distributed.reduction()
    with distributed.agreement(red, "update"):
        prec = state.prec if inplace else state.prec.clone()
        target = prec if red is None else torch.zeros_like(prec)
        _add_pieces(target, pieces)
    if red is not None:
        distributed.all_reduce_([target], red)
        prec.add_(target)
    if once is not None:
        prec.add_(once.to(prec.dtype))
    if inplace:
        state.aux = aux
        state.step.add_(1)
        return state
    return DenseLaplaceState(state.params, prec, aux, state.step + 1)


def _add_pieces(prec: Tensor, pieces: Iterable) -> None:
    """Add the pieces of ``add_to_precision`` to ``prec`` in place."""
    gram = False
    for piece in pieces:
        if isinstance(piece, Tensor):
            prec.add_(piece.to(prec.dtype))
            continue
        A, B = piece
        if A is B:
            add_lower_gram(prec, A.to(prec.dtype))
            gram = True
        else:
            prec.addmm_(A.T.to(prec.dtype), B.to(prec.dtype))
    if gram:
        mirror_lower(prec)


#: the side of the blocks of ``add_lower_gram``
GRAM_BLOCK = 1024


def add_lower_gram(prec: Tensor, S: Tensor, block: int | None = None) -> None:
    """Add ``S^T S`` to the blocks of ``prec`` on and below the diagonal (blocks of
    ``block`` rows, default ``GRAM_BLOCK``), in place; those above are left for
    ``mirror_lower``."""
    P, block = prec.shape[0], block or GRAM_BLOCK
    for start in range(0, P, block):
        stop = min(start + block, P)
        prec[start:stop, :stop].addmm_(S[:, start:stop].T, S[:, :stop])


def mirror_lower(prec: Tensor, block: int | None = None) -> None:
    """Copy the blocks below the diagonal (of ``add_lower_gram``) above it."""
    P, block = prec.shape[0], block or GRAM_BLOCK
    for start in range(block, P, block):
        stop = min(start + block, P)
        prec[:start, start:stop] = prec[start:stop, :start].T


def sample(
    state: DenseLaplaceState, sample_shape: torch.Size | tuple = EMPTY
) -> TensorTree:
    """Draws from ``N(params, prec^{-1})``: a tree like ``params`` whose leaves have
    shape ``sample_shape + leaf.shape``."""
    theta, unflatten = flatten(state.params)
    L = torch.linalg.cholesky(state.prec)  # prec = L L^T
    shape = torch.Size(sample_shape)
    eps = torch.randn(*shape, theta.numel(), dtype=L.dtype, device=L.device)
    # x = theta + L^{-T} eps has covariance (L L^T)^{-1}
    steps = torch.linalg.solve_triangular(
        L.T, eps.reshape(-1, theta.numel()).T, upper=True
    ).T
    return unflatten(theta + steps.reshape(*shape, theta.numel()).to(theta.dtype))


__all__ = ["DenseLaplaceState", "build", "init", "update", "sample"]
