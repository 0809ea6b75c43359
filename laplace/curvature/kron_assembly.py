r"""Kronecker-factored curvature assembled once for every backend.

Each backend reports, per layer and batch, the two KFAC factors in one canonical
normalization:

- ``G``: the output-side factor summed over the batch,
  ``sum_{n,k,t} g_{nkt} g_{nkt}^T`` (``k`` indexes the columns of the output-Hessian
  factor, ``t`` the positions of a weight-shared layer);
- ``A_sum``: the input-side factor summed over the batch and averaged over positions,
  ``sum_n (1/T) sum_t a_{nt} a_{nt}^T``.

``assemble_kron`` then averages the input side over the ``N`` points of the data
set, so that a batch of ``M`` contributes ``M/N`` of its batch mean, and orders the
blocks as the parameters: a weight gets ``[G, A_sum / N]`` (``kron(G, A)`` is its
block in row-major order) and a bias gets ``[G]``. Adding the ``Kron`` of all batches
factor by factor gives ``(sum G) (x) (mean A)``, which is exact for a single datum.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from laplace.utils.lowrank_factor import LowRankFactor, add_factor_, add_factors
from laplace.utils.matrix import Kron

KFAC_LAYERS = (nn.Linear, nn.Conv2d)


def kfac_layers(
    model: nn.Module, params: Sequence[nn.Parameter]
) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` of every layer holding ``params``, in model order.

    Raises
    ------
    ValueError
        naming the first layer that holds a parameter but has no KFAC form.
    """
    wanted = {id(p) for p in params}
    layers = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) in wanted]
        if not own:
            continue
        if not isinstance(module, KFAC_LAYERS):
            raise ValueError(
                f"KFAC cannot handle layer {name!r} ({type(module).__name__}) whose "
                "parameters require grad: only nn.Linear and nn.Conv2d have Kronecker "
                "factors. Use hessian_structure='diag' or 'full', freeze the layer, "
                "or use last-layer Laplace."
            )
        layers.append((name, module))
    return layers


@dataclass
class LayerFactors:
    """The two KFAC factors of one layer for one batch, as a backend reports them.

    ``g_scale * G`` and ``a_scale * A`` must be the canonical ``G`` and ``A_sum``
    above; ``assemble_kron`` applies the scales in place, so the tensors must be
    the caller's to give away. ``A`` is None for a layer whose weight is frozen.
    """

    G: torch.Tensor
    A: torch.Tensor | None
    g_scale: float = 1.0
    a_scale: float = 1.0


def assemble_kron(
    params: Sequence[nn.Parameter],
    layers: Sequence[tuple[str, nn.Module]],
    factors: Mapping[str, LayerFactors],
    N: int,
) -> Kron:
    """Build the ``Kron`` of one batch from the per-layer factors of a backend.

    Parameters
    ----------
    params : the parameters, in model order
    layers : ``(name, module)`` pairs from ``kfac_layers``
    factors : ``{name: LayerFactors}``, brought to the canonical normalization by
        their scales (in place)
    N : number of data points of the whole data set
    """
    if N <= 0:
        raise ValueError(f"N must be the positive size of the data set; got {N}.")
    blocks: dict[int, list[torch.Tensor]] = {}
    for name, module in layers:
        layer = factors[name]
        G = layer.G if layer.g_scale == 1 else layer.G.mul_(layer.g_scale)
        weight, bias = module.weight, getattr(module, "bias", None)
        if layer.A is not None:
            blocks[id(weight)] = [G, layer.A.mul_(layer.a_scale / N)]
        if bias is not None:
            # its own copy: Kron accumulates in place, block by block
            blocks[id(bias)] = [G.clone() if layer.A is not None else G]
    return Kron([blocks[id(p)] for p in params])


def merge_data_sets(
    old: Kron, new: Kron, n_old: int, n_new: int, inplace: bool = False
) -> Kron:
    """The ``Kron`` of ``n_old + n_new`` data from those of two disjoint data sets
    of ``n_old`` and ``n_new`` data (the same layout): the factors marked
    ``Kron.averaged`` weighted by the counts, the summed ones added. With
    ``inplace``, ``old``'s factors are updated in place (and returned in a new
    ``Kron``)."""
    blocks = merge_factors(
        old.kfacs, new.kfacs, old.averaged, n_old, n_new, inplace=inplace
    )
    return Kron(blocks, old.averaged)


def merge_factors(
    old: Sequence[Sequence[torch.Tensor | LowRankFactor]],
    new: Sequence[Sequence[torch.Tensor | LowRankFactor]],
    averaged: Sequence[int | None],
    n_old: int,
    n_new: int,
    inplace: bool = False,
) -> list[list[torch.Tensor | LowRankFactor]]:
    """The factors of ``n_old + n_new`` data from the factors ``old`` and ``new``
    (lists of blocks, as ``Kron.kfacs``) of two disjoint data sets: the factor at
    position ``averaged[i]`` of block ``i`` is the count-weighted mean of the two,
    every other factor their sum. Factors may carry leading dimensions (e.g. one
    per output, ``laplace.curvature.output_kron``); the rule is entrywise. A
    ``LowRankFactor`` (``laplace.utils.lowrank_factor``) takes the same rule: the
    weighted mean or the sum, truncated to its rank (trace kept). With
    ``inplace``, ``old``'s tensors are updated in place."""
    w_old, w_new = n_old / (n_old + n_new), n_new / (n_old + n_new)
    blocks = []
    for block, other, mean in zip(old, new, averaged, strict=True):
        merged = []
        for j, (f, g) in enumerate(zip(block, other, strict=True)):
            if inplace:
                merged.append(
                    add_factor_(f.mul_(w_old), g, alpha=w_new)
                    if j == mean
                    else add_factor_(f, g)
                )
            else:
                merged.append(
                    add_factors(w_old * f, w_new * g)
                    if j == mean
                    else add_factors(f, g)
                )
        blocks.append(merged)
    return blocks
