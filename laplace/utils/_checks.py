"""Argument checks shared across the library (errors name the argument)."""

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


def check_positive_int(value: object, name: str) -> int:
    """``value`` if it is an ``int`` (not a bool) of at least 1, else a ValueError
    naming ``name`` (the one place of this check)."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    return int(value)


def check_n_samples(n_samples: int) -> None:
    check_positive_int(n_samples, "n_samples")


def check_state(la, state: dict, required: set[str]) -> None:
    """Refuse a state dict for the Laplace object ``la`` that lacks ``required``
    keys or is of another class, likelihood or parameter layout, before anything is
    changed."""
    missing = required - set(state)
    if missing:
        raise ValueError(
            f"Not a state dict of {type(la).__name__}: missing keys {sorted(missing)}."
        )
    if state["cls_name"] != type(la).__name__:
        raise ValueError(
            f"The state dict is of a {state['cls_name']}, not of a "
            f"{type(la).__name__}: create the Laplace object with the structure and "
            "subset it was saved with."
        )
    if state["likelihood"] != str(la.lik.name):
        raise ValueError(
            f"The state dict is for likelihood={state['likelihood']!r}, not "
            f"{str(la.lik.name)!r}."
        )
    shapes = [list(p.shape) for p in la.params]
    if state["param_shapes"] != shapes:
        raise ValueError(
            "The state dict belongs to another model: its treated parameters have "
            f"shapes {state['param_shapes']}, this model's have {shapes}."
        )


#: the module types ``_is_batchnorm`` recognises (laplace-torch's; lazy and
#: synchronised batch norms are not among them)
_BATCHNORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


def _is_batchnorm(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a ``BatchNorm1d/2d/3d`` (or a subclass)."""
    return isinstance(module, _BATCHNORMS)


def _is_valid_scalar(scalar: object) -> bool:
    """Whether ``scalar`` is one real number: a Python or NumPy real (``bool``
    included) or a tensor of one element with at most one dimension. Its value
    (sign, finiteness) is not checked."""
    if isinstance(scalar, Tensor):
        return scalar.ndim <= 1 and scalar.numel() == 1
    return isinstance(scalar, Real)
