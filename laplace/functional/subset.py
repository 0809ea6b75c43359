"""The subset of data of the GP view: its inputs and its kernel ``G = J_M J_M^T``."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from laplace.data import Inputs, batch_size, split_batch, to_device
from laplace.functional import kernel

Tensor = torch.Tensor
JacobianFn = Callable[[Inputs], tuple[Tensor, kernel.JacobianSet]]


def inputs_of(
    train_loader: DataLoader, indices, dict_key_x: str, dict_key_y: str, device
) -> list[Inputs]:
    """The inputs of the data at ``indices``, batched as the training loader batches
    (its batch size and ``collate_fn``)."""
    return [
        x for x, _ in batches_of(train_loader, indices, dict_key_x, dict_key_y, device)
    ]


def batches_of(
    train_loader: DataLoader, indices, dict_key_x: str, dict_key_y: str, device
) -> list[tuple[Inputs, Tensor]]:
    """The data ``(x, y)`` at ``indices`` of the training set, in that order, batched
    as the training loader batches (its batch size and ``collate_fn``)."""
    indices = indices.tolist() if hasattr(indices, "tolist") else list(indices)
    loader = DataLoader(
        Subset(train_loader.dataset, indices),
        batch_size=train_loader.batch_size or 64,
        shuffle=False,
        collate_fn=train_loader.collate_fn,
    )
    batches = []
    for batch in loader:
        x, y = split_batch(batch, dict_key_x, dict_key_y)
        batches.append((to_device(x, device), y))
    return batches


def gram(
    jacobian_set: JacobianFn,
    inputs: Sequence[Inputs],
    cached: Sequence[kernel.JacobianSet] | None,
    C: int,
    independent: bool,
    *,
    dtype: torch.dtype,
    device: torch.device,
    block_entries: int,
    dict_key_x: str,
    share: tuple[int, int] | None = None,
) -> Tensor:
    """``G = J_M J_M^T``: ``(M C, M C)`` datum-major, or ``(C, M, M)``.

    From the ``cached`` Jacobian sets of the batches of ``inputs``: the lower block
    rows, of at most ``block_entries`` entries, mirrored. Without them, every set
    is recomputed with ``jacobian_set``, pair by pair.

    ``share=(rank, world)``: only the blocks ``k`` with ``k % world == rank`` (in
    the order above), the others zero, so that the sum of the ``world`` ranks'
    results is ``G`` (``laplace.utils.distributed``).
    """
    sizes = [batch_size(x, dict_key_x) for x in inputs]
    M = sum(sizes)
    shape = (C, M, M) if independent else (M * C, M * C)
    rank, world = share if share is not None else (0, 1)
    make = torch.empty if world == 1 else torch.zeros
    G = make(shape, dtype=dtype, device=device)
    blocks = itertools.count()

    def mine() -> bool:
        return next(blocks) % world == rank

    def put(rows: slice, cols: slice, block: Tensor) -> None:
        """Write the block and its transpose (symmetric)."""
        if independent:
            G[:, rows, cols] = block
            G[:, cols, rows] = block.mT
        else:
            r = slice(rows.start * C, rows.stop * C)
            c = slice(cols.start * C, cols.stop * C)
            G[r, c] = block
            G[c, r] = block.T

    if cached is not None:
        U = kernel.cat(cached)
        step = max(1, block_entries // (M * C * C))
        for start in range(0, M, step):
            if not mine():
                continue
            rows = slice(start, min(start + step, M))
            cols = slice(0, rows.stop)
            put(rows, cols, kernel.gram(U.select(rows), U.select(cols), independent))
        return G
    offsets = np.cumsum([0, *sizes])
    for i, xi in enumerate(inputs):
        pairs = [j for j in range(i + 1) if mine()]
        if not pairs:
            continue
        _, Ji = jacobian_set(xi)
        rows = slice(int(offsets[i]), int(offsets[i + 1]))
        for j in pairs:
            Jj = Ji if j == i else jacobian_set(inputs[j])[1]
            cols = slice(int(offsets[j]), int(offsets[j + 1]))
            put(rows, cols, kernel.gram(Ji, Jj, independent))
    return G


def scale_by_hessian(G: Tensor, sqrt_D: Tensor, independent: bool) -> None:
    """``S = D^1/2 G D^1/2`` in place (``sqrt_D`` ``(M, C)``)."""
    if independent:
        d = sqrt_D.T  # (C, M)
        G.mul_(d[:, :, None]).mul_(d[:, None, :])
    else:
        d = sqrt_D.reshape(-1)
        G.mul_(d[:, None]).mul_(d[None, :])
