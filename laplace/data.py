"""The one place that unpacks a batch: tensors or mappings (``dict_key_x/y``)."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch

Inputs = torch.Tensor | MutableMapping[str, Any]


def input_tensor(x: Inputs, dict_key_x: str) -> torch.Tensor:
    """The tensor that carries the batch dimension of ``x``."""
    if isinstance(x, MutableMapping):
        if dict_key_x not in x:
            raise KeyError(
                f"The batch has no key dict_key_x={dict_key_x!r}; its keys are "
                f"{sorted(map(str, x.keys()))}. Pass dict_key_x= to name the input."
            )
        return x[dict_key_x]
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"Inputs must be a tensor or a mapping of tensors; got {type(x).__name__}."
        )
    return x


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


def batch_size(x: Inputs, dict_key_x: str) -> int:
    """Number of data points in ``x``."""
    return input_tensor(x, dict_key_x).shape[0]


def check_pairs(x: Inputs, dict_key_x: str) -> None:
    """Refuse reward-modeling training inputs that are not pairs ``(batch, 2, ...)``."""
    shape = tuple(input_tensor(x, dict_key_x).shape)
    if len(shape) < 3 or shape[1] != 2:
        raise ValueError(
            "likelihood='reward_modeling' fits on pairs: training inputs of shape "
            "(batch, 2, ...) with targets (batch,) naming the preferred item (0 or "
            f"1); got inputs of shape {shape}."
        )


def split_batch(batch: Any, dict_key_x: str, dict_key_y: str) -> tuple[Inputs, Any]:
    """Split a data-loader item into ``(x, y)``.

    A mapping batch keeps the whole mapping as ``x`` (models taking a dict need all of
    it) and takes ``y`` from ``dict_key_y``.
    """
    if isinstance(batch, MutableMapping):
        if dict_key_y not in batch:
            raise KeyError(
                f"The batch has no key dict_key_y={dict_key_y!r}; its keys are "
                f"{sorted(map(str, batch.keys()))}. Pass dict_key_y= to name targets."
            )
        input_tensor(batch, dict_key_x)
        return batch, batch[dict_key_y]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        "Each batch must be a pair (x, y) or a mapping with keys dict_key_x and "
        f"dict_key_y; got {type(batch).__name__}."
    )


def to_device(x: Inputs, device: torch.device) -> Inputs:
    """Move a tensor, or the tensors of a mapping, to ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, MutableMapping):
        moved = x.__class__(x) if not hasattr(x, "to") else x.to(device)
        if not hasattr(x, "to"):
            for key, value in x.items():
                if isinstance(value, torch.Tensor):
                    moved[key] = value.to(device)
        return moved
    return x
