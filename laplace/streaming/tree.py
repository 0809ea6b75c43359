"""Parameter trees as flat vectors, and the per-example gradients of the Fisher:
the pure functions the streaming modules share."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch.utils import _pytree as pytree

Tensor = torch.Tensor
TensorTree = Any


class Transform(NamedTuple):
    """``init(params)`` and ``update(state, batch, inplace=False)`` of a built
    approximation."""

    init: Callable
    update: Callable


def _sorted_dicts(tree: TensorTree) -> TensorTree:
    """``tree`` with every plain ``dict`` rebuilt in sorted key order: posteriors
    (optree) orders a dict's leaves by sorted keys, an ``OrderedDict``'s by
    insertion, as here."""
    if type(tree) is dict:
        try:
            keys = sorted(tree)
        except TypeError:  # keys that do not sort: insertion order
            keys = list(tree)
        return {k: _sorted_dicts(tree[k]) for k in keys}
    if isinstance(tree, (list, tuple)) and not isinstance(tree, Tensor):
        items = [_sorted_dicts(t) for t in tree]
        if hasattr(tree, "_fields"):  # a namedtuple
            return type(tree)(*items)
        return type(tree)(items)
    if isinstance(tree, Mapping) and not isinstance(tree, Tensor):
        return type(tree)((k, _sorted_dicts(v)) for k, v in tree.items())
    return tree


def leaves(tree: TensorTree, name: str = "params") -> tuple[list[Tensor], Any]:
    """The tensors of ``tree`` in posteriors' order (a dict's by sorted keys), and
    its structure."""
    flat, spec = pytree.tree_flatten(_sorted_dicts(tree))
    if not flat or not all(isinstance(t, Tensor) for t in flat):
        kinds = sorted({type(t).__name__ for t in flat}) or ["nothing"]
        raise TypeError(
            f"{name} must be a tensor or a tree (dict, list, tuple) of tensors; got "
            f"leaves of type {', '.join(kinds)}."
        )
    return flat, spec


def in_order_of(tree: TensorTree, like: TensorTree) -> TensorTree:
    """``tree`` (built in posteriors' order, a dict's keys sorted) with every dict's
    keys in the order of the corresponding dict of ``like``, the user's tree."""
    if type(like) is dict:
        return {k: in_order_of(tree[k], like[k]) for k in like}
    if isinstance(like, (list, tuple)) and not isinstance(like, Tensor):
        items = [in_order_of(t, u) for t, u in zip(tree, like, strict=True)]
        return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)
    return tree


def rebuild(flat: list[Tensor], spec: Any, like: TensorTree) -> TensorTree:
    """The tree of the leaves ``flat`` (in posteriors' order, as ``leaves`` gives
    them with ``spec``), its dicts' keys in the order of ``like``'s."""
    return in_order_of(pytree.tree_unflatten(flat, spec), like)


def flatten(tree: TensorTree) -> tuple[Tensor, Callable[[Tensor], TensorTree]]:
    """``(theta, unflatten)``: the leaves of ``tree`` concatenated into one vector
    ``theta`` (P,), and the map from such a vector back to a tree like ``tree``."""
    flat, spec = leaves(tree)
    shapes = [t.shape for t in flat]
    sizes = [t.numel() for t in flat]
    theta = torch.cat([t.detach().reshape(-1) for t in flat])

    def unflatten(vector: Tensor) -> TensorTree:
        parts = vector.split(sizes, dim=-1)
        lead = vector.shape[:-1]
        return rebuild(
            [p.reshape((*lead, *s)) for p, s in zip(parts, shapes, strict=True)],
            spec,
            tree,
        )

    return theta, unflatten


def same_structure(tree: TensorTree, like: TensorTree, name: str) -> list[Tensor]:
    """The leaves of ``tree``, checked to have the structure and shapes of
    ``like``'s."""
    flat, spec = leaves(tree, name)
    ref, ref_spec = leaves(like)
    if spec != ref_spec or [t.shape for t in flat] != [t.shape for t in ref]:
        raise ValueError(
            f"{name} must be a float or a tree with the structure and shapes of the "
            f"parameters ({ref_spec}); got {spec} with shapes "
            f"{[tuple(t.shape) for t in flat]}."
        )
    return flat


def pair(result: Any, name: str, first: str = "value") -> tuple[Any, Any]:
    """``result`` of the user's function ``name``, checked to be ``(first, aux)``."""
    if not (isinstance(result, tuple) and len(result) == 2):
        example = "(logits" if first == "output" else "(log_post"
        raise ValueError(
            f"{name} must return a pair ({first}, aux), e.g. {example}, "
            f"torch.tensor([])); it returned a {type(result).__name__}."
        )
    return result


def precision_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a precision for parameters of ``dtype``: theirs, but float32 for
    16-bit floats, in which a sum over many batches keeps three digits and no
    Cholesky factorization runs."""
    return torch.float32 if torch.finfo(dtype).bits == 16 else dtype


def example_gradients(
    log_posterior: Callable, params: TensorTree, batch: Any, per_sample: bool
) -> tuple[Tensor, Any]:
    """``(G, aux)``: rows ``G`` ``(R, P)`` whose outer products sum to the empirical
    Fisher of ``log_posterior`` over ``batch``, with posteriors 0.1.x's semantics.

    - ``per_sample=False``: the batch is split into its examples (the leading
      dimension of every tensor in it, each example a batch of one) and ``G`` holds
      each example's gradient of ``log_posterior``, whatever it returns (per-example
      values, their sum or their mean): ``F = sum_n g_n g_n^T``.
    - ``per_sample=True``: ``log_posterior``'s value is taken as per-example values;
      ``G`` is its Jacobian (one row per value: a scalar sum gives the rank-one
      ``(sum g)(sum g)^T``, a mean that divided by ``N^2``).
    """
    theta, unflatten = flatten(params)

    def value(vector, data):
        return pair(log_posterior(unflatten(vector), data), "log_posterior")

    if per_sample:
        J, aux = torch.func.jacrev(value, has_aux=True)(theta, batch)
        return J.reshape(-1, theta.numel()), aux

    def gradient(example):
        def total(vector):
            out, aux = value(vector, pytree.tree_map(lambda t: t.unsqueeze(0), example))
            return out.sum(), aux

        return torch.func.grad(total, has_aux=True)(theta)

    G, aux = torch.func.vmap(gradient)(batch)
    return G, aux
