"""The one place that handles batches and loaders: tensors or mappings
(``dict_key_x/y``), their sizes, device moves, rows, targets, and subsets of data."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    Sampler,
    Subset,
    SubsetRandomSampler,
)

Tensor = torch.Tensor
Inputs = Tensor | MutableMapping[str, Any]


# ------------------------------------------------------------------------ batches


def input_tensor(x: Inputs, dict_key_x: str) -> Tensor:
    """The tensor that carries the batch dimension of ``x``."""
    if isinstance(x, Mapping):
        if dict_key_x not in x:
            raise KeyError(
                f"The batch has no key dict_key_x={dict_key_x!r}; its keys are "
                f"{sorted(map(str, x.keys()))}. Pass dict_key_x= to name the input."
            )
        return x[dict_key_x]
    if not isinstance(x, Tensor):
        raise TypeError(
            f"Inputs must be a tensor or a mapping of tensors; got {type(x).__name__}."
        )
    return x


def batch_size(inputs: Inputs, dict_key_x: str) -> int:
    """Number of data points ``B`` in ``inputs``: the leading dimension of the
    tensor, or of ``inputs[dict_key_x]`` for a mapping.

    Raises
    ------
    KeyError
        for a mapping without ``dict_key_x``.
    TypeError
        for inputs that are neither a tensor nor a mapping.
    ValueError
        for a 0-dimensional tensor (no batch dimension).
    """
    x = input_tensor(inputs, dict_key_x)
    if x.ndim == 0:
        raise ValueError("Inputs need a batch dimension; got a 0-dimensional tensor.")
    return x.shape[0]


def dataset_size(loader: Any) -> int:
    """Number of training data ``N``: the length of ``loader.dataset``.

    Raises
    ------
    TypeError
        for a loader without a dataset of known length (e.g. an iterable dataset).
    """
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError) as err:
        raise TypeError(
            "train_loader must be a DataLoader whose dataset has a length (the "
            "number of training data N)."
        ) from err


def unpack_batch(batch: Any, dict_key_y: str) -> tuple[Inputs, Any]:
    """Split a data-loader item into ``(x, y)``.

    A mapping keeps the whole mapping as ``x`` (models taking a dict need all of it)
    and takes ``y = batch[dict_key_y]``; a sequence ``(x, y, ...)`` gives its first
    two items (further items, e.g. sample indices, are ignored).

    Raises
    ------
    KeyError
        for a mapping without ``dict_key_y``.
    TypeError
        for anything else (a tensor, or a sequence of fewer than two items).
    """
    if isinstance(batch, Mapping):
        if dict_key_y not in batch:
            raise KeyError(
                f"The batch has no key dict_key_y={dict_key_y!r}; its keys are "
                f"{sorted(map(str, batch.keys()))}. Pass dict_key_y= to name targets."
            )
        return batch, batch[dict_key_y]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(
        "Each batch must be a pair (x, y) or a mapping with keys dict_key_x and "
        f"dict_key_y; got {type(batch).__name__}."
    )


def split_batch(batch: Any, dict_key_x: str, dict_key_y: str) -> tuple[Inputs, Any]:
    """``unpack_batch``, also checking that a mapping holds ``dict_key_x``."""
    x, y = unpack_batch(batch, dict_key_y)
    if isinstance(x, Mapping):
        input_tensor(x, dict_key_x)
    return x, y


def to_device(
    value: Any, device: torch.device | str | None, dtype: torch.dtype | None = None
) -> Any:
    """Move the tensors in ``value`` to ``device``; cast floating-point ones to
    ``dtype`` (when given). Mappings, lists and tuples are copied with their
    entries moved (their types kept); anything else is returned as it is."""
    if isinstance(value, Tensor):
        if dtype is not None and value.is_floating_point():
            return value.to(device=device, dtype=dtype)
        return value.to(device=device)
    if isinstance(value, Mapping):
        moved = copy.copy(value)
        for key, entry in value.items():
            moved[key] = to_device(entry, device, dtype)
        return moved
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(entry, device, dtype) for entry in value)
    return value


def concatenate_rows(chunks: Sequence[Any]) -> Any:
    """Concatenate batches along their rows.

    Tensors are concatenated along dimension 0, mappings key by key (recursively),
    lists and tuples are joined; other values (per-batch metadata) must be equal
    across the chunks and are kept once.

    Raises
    ------
    ValueError
        for no chunks, mappings of different keys, or metadata that differs.
    """
    if len(chunks) == 0:
        raise ValueError("concatenate_rows needs at least one chunk; got none.")
    first = chunks[0]
    if isinstance(first, Tensor):
        return torch.cat(list(chunks), dim=0)
    if isinstance(first, Mapping):
        keys = list(first.keys())
        if any(list(chunk.keys()) != keys for chunk in chunks):
            raise ValueError("Mapping batches must have matching input keys.")
        return {key: concatenate_rows([chunk[key] for chunk in chunks]) for key in keys}
    if isinstance(first, (list, tuple)):
        return type(first)(item for chunk in chunks for item in chunk)
    if any(chunk != first for chunk in chunks[1:]):
        raise ValueError("Cannot combine non-batched mapping metadata across batches.")
    return first


def select_rows(inputs: Any, indices: Tensor, batch_size: int) -> Any:
    """The rows ``indices`` of a batch of ``batch_size`` rows.

    Tensors whose leading dimension is ``batch_size`` are indexed; mappings are
    handled entry by entry (recursively); everything else (metadata, tensors of
    another length) is kept as it is.
    """
    if isinstance(inputs, Tensor):
        if inputs.ndim > 0 and inputs.shape[0] == batch_size:
            return inputs[torch.as_tensor(indices, device=inputs.device)]
        return inputs
    if isinstance(inputs, Mapping):
        return {k: select_rows(v, indices, batch_size) for k, v in inputs.items()}
    return inputs


def classification_targets(targets: Tensor) -> Tensor:
    """Class indices ``(B,)`` (int64) from targets ``(B,)``, ``(B, 1)`` or one-hot /
    probability rows ``(B, C)`` (their argmax).

    Raises
    ------
    ValueError
        for targets of another shape.
    """
    if targets.ndim == 2 and targets.shape[1] == 1:
        targets = targets[:, 0]
    elif targets.ndim == 2:
        targets = targets.argmax(dim=1)
    elif targets.ndim != 1:
        raise ValueError(
            "Classification targets must have shape [B] or [B, C]; got "
            f"{list(targets.shape)}."
        )
    return targets.long()


def regression_targets(targets: Tensor, outputs: Tensor) -> Tensor:
    """Targets in the shape of the outputs: ``(B,)`` becomes ``(B, 1)`` for outputs
    ``(B, 1)``; otherwise the shapes must already agree.

    Raises
    ------
    ValueError
        for targets that do not fit the outputs.
    """
    if targets.ndim == 1 and outputs.ndim == 2 and outputs.shape[1] == 1:
        targets = targets.unsqueeze(-1)
    if targets.shape != outputs.shape:
        raise ValueError(
            f"Regression targets have shape {tuple(targets.shape)}; expected "
            f"{tuple(outputs.shape)}."
        )
    return targets


# ------------------------------------------------------------------------ loaders


def subset_indices(N: int, M: int, seed: int = 0) -> np.ndarray:
    """``M`` distinct indices of ``range(N)`` drawn by
    ``numpy.random.default_rng(seed).choice(N, M, replace=False)`` (laplace-torch's
    subset of data), in the order drawn.

    Raises
    ------
    ValueError
        for ``M > N``.
    """
    if M > N:
        raise ValueError(f"Cannot choose M={M} of N={N} data without replacement.")
    return np.random.default_rng(seed).choice(N, M, replace=False)


class SoDSampler(Sampler):
    """A sampler of a subset of ``M`` of ``N`` data (``subset_indices(N, M, seed)``),
    the same indices in every epoch.

    Parameters
    ----------
    N : int
        number of data.
    M : int
        size of the subset, ``M <= N``.
    seed : int, default=0
    """

    def __init__(self, N: int, M: int, seed: int = 0) -> None:
        self.indices = torch.from_numpy(subset_indices(N, M, seed))

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _batches_sampler(loader: DataLoader) -> Any:
    """The sampler whose indices feed the loader's batches."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    if batch_sampler is None:  # automatic batching off (batch_size=None)
        return loader.sampler
    if type(batch_sampler) is BatchSampler:
        return batch_sampler.sampler
    return None


def training_indices(loader: DataLoader) -> Tensor:
    """The dataset indices ``(n,)`` (int64) one epoch of ``loader`` visits.

    A sampler that permutes a fixed set of indices (``shuffle=True`` without
    replacement over the whole dataset, ``SubsetRandomSampler``) gives that set in
    a fixed order (``0..N-1``, or the subset's own order), so the result does not
    depend on the shuffling; any other sampler gives the indices of one pass.

    Raises
    ------
    TypeError
        for a loader without a sampler of indices (e.g. of an iterable dataset).
    """
    if isinstance(getattr(loader, "dataset", None), IterableDataset):
        raise TypeError(
            "training_indices needs a DataLoader over a map-style dataset; an "
            "iterable dataset has no indices."
        )
    sampler = _batches_sampler(loader)
    if isinstance(sampler, RandomSampler) and not sampler.replacement:
        if sampler.num_samples == len(sampler.data_source):
            return torch.arange(len(sampler.data_source))
    if isinstance(sampler, SubsetRandomSampler):
        return torch.as_tensor(sampler.indices, dtype=torch.long).reshape(-1)
    source = getattr(loader, "batch_sampler", None) or getattr(loader, "sampler", None)
    try:
        flat = [int(i) for item in source for i in np.atleast_1d(item)]
    except TypeError as err:
        raise TypeError(
            "training_indices needs a DataLoader over a map-style dataset (with a "
            f"sampler of indices); got {type(loader).__name__}."
        ) from err
    return torch.tensor(flat, dtype=torch.long)


def subset_loader(loader: DataLoader, indices: Tensor | Sequence[int]) -> DataLoader:
    """A loader of the data ``indices`` of ``loader.dataset``, in that order, batched
    as ``loader`` batches (its batch size, 1 without one, and ``collate_fn``), not
    shuffled.

    Raises
    ------
    TypeError
        for boolean or floating-point indices.
    """
    indices = torch.as_tensor(indices)
    if indices.dtype == torch.bool or indices.is_floating_point():
        raise TypeError(
            f"indices must be integer dataset indices; got dtype {indices.dtype}."
        )
    return DataLoader(
        Subset(loader.dataset, indices.reshape(-1).cpu().tolist()),
        batch_size=loader.batch_size or 1,
        shuffle=False,
        collate_fn=loader.collate_fn,
    )
