"""Helpers about state: comparing configurations, keeping a model's gradients."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["preserve_model_gradients", "same_configuration"]


def same_configuration(left: Any, right: Any) -> bool:
    """Whether two configurations (numbers, strings, tensors, and mappings, lists
    and tuples of them) are equal.

    Tensors are equal when their shapes and values are (``torch.equal``; NaN differs
    from itself); a tensor never equals a non-tensor; mappings need the same keys,
    sequences the same type and length; anything else is compared with ``==``.
    """
    if isinstance(left, torch.Tensor) or isinstance(right, torch.Tensor):
        if not (isinstance(left, torch.Tensor) and isinstance(right, torch.Tensor)):
            return False
        if left.shape != right.shape:
            return False
        return torch.equal(left.detach().cpu(), right.detach().cpu().to(left.dtype))
    if isinstance(left, Mapping) or isinstance(right, Mapping):
        if not (isinstance(left, Mapping) and isinstance(right, Mapping)):
            return False
        if set(left) != set(right):
            return False
        return all(same_configuration(left[k], right[k]) for k in left)
    if isinstance(left, (list, tuple)) or isinstance(right, (list, tuple)):
        if type(left) is not type(right) or len(left) != len(right):
            return False
        return all(same_configuration(a, b) for a, b in zip(left, right))
    try:
        return bool(left == right)
    except Exception:  # e.g. ambiguous truth values of array-likes
        return False


def preserve_model_gradients(fit: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a method of an object with a ``model`` so that the ``.grad`` of
    every parameter of ``self.model`` is, after the call (returned or raised), the
    tensor it was before (``None`` stays ``None``). During the call the gradients
    start at ``None``, so backward passes cannot accumulate into the saved ones."""

    @functools.wraps(fit)
    def wrapper(self, *args: Any, **kwargs: Any) -> Any:
        saved = [(p, p.grad) for p in self.model.parameters()]
        for p, _ in saved:
            p.grad = None
        try:
            return fit(self, *args, **kwargs)
        finally:
            for p, grad in saved:
                p.grad = grad

    return wrapper
