"""laplace-torch's batch and loader helpers, on ``laplace.data`` (the one place that
handles batches)."""

from __future__ import annotations

from typing import Any

from laplace.data import (
    Inputs,
    batch_size,
    classification_targets,
    concatenate_rows,
    regression_targets,
    select_rows,
    subset_loader,
    to_device,
    training_indices,
    unpack_batch,
)

__all__ = [
    "batch_size",
    "classification_targets",
    "concatenate_rows",
    "regression_targets",
    "select_rows",
    "split_batch",
    "subset_loader",
    "to_device",
    "training_indices",
]


def split_batch(batch: Any, dict_key_y: str) -> tuple[Inputs, Any]:
    """Split a data-loader item into ``(x, y)``: a mapping is kept whole as ``x``
    with ``y = batch[dict_key_y]``; a sequence ``(x, y, ...)`` gives its first two
    items (see ``laplace.data.unpack_batch``)."""
    return unpack_batch(batch, dict_key_y)
