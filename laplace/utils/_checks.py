"""Argument checks shared by the low-rank modules (errors name the argument)."""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch

Tensor = torch.Tensor


def _check_int(
    value: object, name: str, minimum: int, maximum: int | None = None
) -> int:
    """Return ``value`` as an ``int`` in ``[minimum, maximum]`` or raise naming it."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        allowed = (
            f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        )
        raise ValueError(f"{name} must be {allowed}, got {value}.")
    return value


def _describe(x: object) -> str:
    """Shape and dtype of a tensor, else the type name (for error messages)."""
    if isinstance(x, Tensor):
        return f"shape {tuple(x.shape)}, dtype {x.dtype}"
    return type(x).__name__


def _check_scalar(value: object, name: str) -> Real | Tensor:
    """A real number or a one-element tensor (returned 0-dim), finite and >= 0."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}."
            )
        value = value.reshape(())
        bad = not bool(torch.isfinite(value.detach())) or bool(value.detach() < 0)
    elif isinstance(value, Real) and not isinstance(value, bool):
        bad = not math.isfinite(value) or value < 0
    else:
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}.")
    if bad:
        raise ValueError(f"{name} must be finite and >= 0, got {value}.")
    return value
