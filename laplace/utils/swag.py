r"""Diagonal SWAG: the variance of each weight along an SGD trajectory.

SWAG (Maddox et al., 2019) runs SGD from the trained weights and treats the iterates
as samples of the posterior; its diagonal part is the per-weight variance of the
snapshots, ``var_i = E[theta_i^2] - E[theta_i]^2``. The subnetwork masks use it to
pick the weights that are most uncertain
(``laplace.utils.subnetmask.LargestVarianceSWAGSubnetMask``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from itertools import chain
from numbers import Real
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

from laplace.data import split_batch, to_device
from laplace.utils._checks import _check_int

Tensor = torch.Tensor


def fit_diagonal_swag_var(
    model: nn.Module,
    train_loader: Iterable[Any],
    criterion: Callable[[Tensor, Tensor], Tensor],
    n_snapshots_total: int = 40,
    snapshot_freq: int = 1,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 3e-4,
    min_var: float = 1e-30,
    *,
    dict_key_x: str = "input_ids",
    dict_key_y: str = "labels",
) -> Tensor:
    r"""Per-weight variance of the SGD iterates started at the current weights.

    SGD (``lr``, ``momentum``, ``weight_decay``; ``torch.optim.SGD`` over the
    parameters that require grad, ``model.train()``) runs epochs over
    ``train_loader``, one step per batch on ``criterion(model(x), y)``. A snapshot
    ``theta_k`` ``(n_params,)`` of all parameters (``parameters_to_vector(
    model.parameters())``) is taken after epochs ``1, 1 + f, 1 + 2f, ...`` with
    ``f = snapshot_freq``, ``K = n_snapshots_total`` in all; the first is after one
    epoch, not the starting weights. The result is

    $$
        \mathrm{var}_i = \max\Big(\frac1K \sum_k \theta_{k,i}^2
        - \Big(\frac1K \sum_k \theta_{k,i}\Big)^2,\ \text{min\_var}\Big),
    $$

    accumulated over the snapshots as a running mean and running centred second
    moment (Welford's update: the same quantity without the cancellation of the two
    moments in low precision). Parameters that do not require grad do not move:
    their variance is ``min_var``.

    This is laplace-torch's schedule: it runs ``K * f`` epochs, of which the last
    ``f - 1`` come after the last snapshot and cannot change the result; they are
    skipped here (``1 + (K - 1) f`` epochs). The model's weights, buffers (e.g.
    batch-norm statistics), gradients and the train/eval mode of every submodule
    are restored afterwards, also when an exception is raised; the model is trained
    in place (no copy of it is made).

    Parameters
    ----------
    model : torch.nn.Module
    train_loader : iterable of batches
        re-iterable (e.g. a ``DataLoader``); batches ``(x, y)`` or mappings with
        the keys ``dict_key_x`` and ``dict_key_y`` (the whole mapping is passed to
        the model). They are moved to the parameters' device.
    criterion : callable ``(outputs, y) -> scalar loss``
        e.g. ``nn.CrossEntropyLoss()`` or ``nn.MSELoss()`` (batch means; the
        SWAG subnetwork mask uses its likelihood's loss per datum averaged over
        the batch).
    n_snapshots_total : int, default=40
        ``K >= 2`` (one snapshot has no variance).
    snapshot_freq : int, default=1
        ``f >= 1`` epochs between snapshots.
    lr : float, default=0.01
        learning rate ``> 0``.
    momentum : float, default=0.9
        ``>= 0``.
    weight_decay : float, default=3e-4
        ``>= 0``.
    min_var : float, default=1e-30
        lower clamp of the variances, ``>= 0``.
    dict_key_x : str, default='input_ids'
        key of the inputs in mapping (dict-like) batches.
    dict_key_y : str, default='labels'
        key of the targets in mapping (dict-like) batches.

    Returns
    -------
    torch.Tensor ``(n_params,)``
        the variances, in the parameters' dtype and on their device.

    Raises
    ------
    TypeError, ValueError
        for a bad argument (naming it), a model without trainable parameters or a
        loader that yields no batches in an epoch (e.g. an exhausted generator).
    RuntimeError
        if SGD diverged (non-finite weights): lower ``lr``.
    """
    _check_swag_arguments(n_snapshots_total, snapshot_freq, lr, momentum)
    for name, value in (("weight_decay", weight_decay), ("min_var", min_var)):
        _check_real(value, name, positive=False)
    if not callable(criterion):
        raise TypeError(
            "criterion must be a callable (outputs, targets) -> loss such as "
            f"nn.CrossEntropyLoss(); got {type(criterion).__name__}."
        )
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError(
            "The model has no parameters that require grad: SWAG needs "
            "at least one to train."
        )
    device = params[0].device

    with _restored(model):
        model.train()
        optimizer = torch.optim.SGD(
            trainable, lr=lr, momentum=momentum, weight_decay=weight_decay
        )
        mean = torch.zeros_like(parameters_to_vector(params)).detach()
        m2 = torch.zeros_like(mean)
        n_epochs = 1 + (n_snapshots_total - 1) * snapshot_freq
        for epoch in range(n_epochs):
            n_batches = 0
            for batch in train_loader:
                x, y = split_batch(batch, dict_key_x, dict_key_y)
                x, y = to_device(x, device), y.to(device)
                optimizer.zero_grad(set_to_none=True)
                criterion(model(x), y).backward()
                optimizer.step()
                n_batches += 1
            if n_batches == 0:
                raise ValueError(
                    f"train_loader yielded no batches in epoch {epoch + 1}; SWAG "
                    "needs a non-empty loader that can be iterated again every epoch "
                    "(a DataLoader or a list, not a generator)."
                )
            if epoch % snapshot_freq == 0:
                # Welford: mean_k = mean_{k-1} + d / k, M2 += d * (theta - mean_k)
                k = epoch // snapshot_freq + 1
                theta = parameters_to_vector(params).detach()
                delta = theta - mean
                mean.add_(delta, alpha=1 / k)
                m2.addcmul_(delta, theta - mean)
        var = m2.div_(n_snapshots_total)
    if not bool(torch.isfinite(var).all()):
        raise RuntimeError(
            f"SGD diverged: the SWAG snapshots are not finite (lr={lr}); lower lr."
        )
    return var.clamp_(min=min_var)


def _check_swag_arguments(
    n_snapshots_total: Any, snapshot_freq: Any, lr: Any, momentum: Any
) -> None:
    """Validate the SWAG schedule (shared with the SWAG subnetwork mask)."""
    _check_int(n_snapshots_total, "n_snapshots_total", 2)
    _check_int(snapshot_freq, "snapshot_freq", 1)
    _check_real(lr, "lr", positive=True)
    _check_real(momentum, "momentum", positive=False)


def _check_real(value: Any, name: str, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}.")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(
            f"{name} must be finite and {'> 0' if positive else '>= 0'}, got {value}."
        )


class _restored:
    """Context manager that puts back a model's parameters, buffers, gradients and
    the train/eval mode of each submodule as they were on entry."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        tensors = chain(self.model.parameters(), self.model.buffers())
        self.values = [(t, t.detach().clone()) for t in tensors]
        self.grads = [(p, p.grad) for p in self.model.parameters()]
        self.modes = [(m, m.training) for m in self.model.modules()]
        for p, _ in self.grads:  # training must not write into the saved gradients
            p.grad = None

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for t, value in self.values:
                t.copy_(value)
        for p, grad in self.grads:
            p.grad = grad
        for m, training in self.modes:
            m.training = training
