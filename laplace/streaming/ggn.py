r"""The generalized Gauss-Newton matrix of one batch, ``G = J^T H J``, as a sum of
terms ``J_r^T (H J)_r`` over chunks of rows: the pure functions behind
``dense_ggn`` and ``diag_ggn``.

``J`` ``(M, P)`` is the Jacobian of the flattened output ``z = forward(params,
batch)[0]`` w.r.t. the flattened parameters and ``H = -d^2 l / dz^2`` ``(M, M)``
the Hessian of the negative outer log-likelihood ``l(z, batch)``. Two ways:

- **per example**, when the batch is a batch of independent examples: every tensor
  of it has the output's leading dimension ``N``, the forward of each example alone
  (a batch of one) gives that example's row of the batched output, and ``H`` is
  block diagonal over the examples (the log-likelihood a sum of per-example terms).
  Then ``G = sum_n J_n^T H_n J_n`` with ``J_n`` ``(C, P)`` from one ``vmap`` over
  the examples of the Jacobian of a batch of one, and ``H_n`` ``(C, C)`` from the
  log-likelihood of example ``n``: ``N`` times fewer backward passes than the
  Jacobian of the whole batch (whose every row runs the backward of all ``N``
  examples), no ``(M, M)`` Hessian, and rows in chunks of at most
  ``CHUNK_ENTRIES`` Jacobian entries, whatever the batch size.
- **whole batch** otherwise (examples coupled by the model, e.g. a batch norm in
  training mode, or by the log-likelihood, e.g. a mean over the batch; a forward
  that ``vmap`` cannot run): ``J`` of the batched forward and ``H`` of the batched
  log-likelihood, both dense.

The conditions are checked, not assumed: the per-example outputs against the
batched ones (to ``sqrt(eps)`` of the output's dtype, relative) and the block
diagonal ``H`` against one product of the batched Hessian with a fixed random
vector (to ``sqrt(eps)``); either failing selects the whole-batch way, which is
exact for any ``forward`` and ``outer_log_likelihood``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils import _pytree as pytree

from laplace.streaming.tree import TensorTree, flatten, pair

Tensor = torch.Tensor
#: the most Jacobian entries held at once on the per-example way (32 MB in float32;
#: larger chunks were slower, out of the caches, on a 2-core CPU)
CHUNK_ENTRIES = 2**23


def terms(
    forward: Callable,
    outer_log_likelihood: Callable,
    params: TensorTree,
    batch: Any,
    chunk_entries: int | None = None,
) -> tuple[Any, Iterator[tuple[Tensor, Tensor]]]:
    """``(aux, pieces)``: the ``aux`` of ``forward`` on ``batch`` and an iterator
    of pairs ``(J_r, (H J)_r)`` of rows ``(R, P)`` with ``sum_r J_r^T (H J)_r = J^T
    H J``, the GGN of the batch (see the module docstring)."""
    theta, unflatten = flatten(params)
    with torch.no_grad():
        z, aux = pair(forward(unflatten(theta), batch), "forward", "output")
    z = z.detach()
    _check_scalar(outer_log_likelihood(z, batch))
    N = _examples(batch, z)
    if N is not None:
        blocks = _hessian_blocks(outer_log_likelihood, z, batch, N)
        if blocks is not None and _splits(forward, unflatten, theta, batch, z):
            chunk = CHUNK_ENTRIES if chunk_entries is None else chunk_entries
            return aux, _per_example(forward, unflatten, theta, batch, blocks, chunk)
    return aux, _whole_batch(forward, outer_log_likelihood, unflatten, theta, batch)


def _check_scalar(value: Any) -> None:
    if not (isinstance(value, Tensor) and value.numel() == 1):
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value)
        raise ValueError(
            "outer_log_likelihood must return a scalar (the log-likelihood of the "
            f"batch, summed over its examples); it returned {shape}."
        )


def _working(z: Tensor) -> Tensor:
    """``z`` in the dtype the output Hessian is taken in: float32 at least."""
    return z if z.dtype in (torch.float32, torch.float64) else z.float()


def _tolerance(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps ** 0.5


def _examples(batch: Any, z: Tensor) -> int | None:
    """``N``, the output's leading dimension, when every leaf of ``batch`` is a
    tensor with that leading dimension; None otherwise."""
    if z.dim() == 0:
        return None
    N = z.shape[0]
    flat = pytree.tree_leaves(batch)
    if flat and all(
        isinstance(t, Tensor) and t.dim() and t.shape[0] == N for t in flat
    ):
        return N
    return None


def _one(example: Any) -> Any:
    """An example as a batch of one."""
    return pytree.tree_map(lambda t: t.unsqueeze(0), example)


def _hessian_blocks(
    outer_log_likelihood: Callable, z: Tensor, batch: Any, N: int
) -> Tensor | None:
    """``H_n`` ``(N, C, C)``, the Hessians of ``-l`` of each example alone, if
    they are the diagonal blocks of the batch's ``H`` and it has no others (checked
    on one product with a random vector); None otherwise."""
    work = _working(z)
    C = work[0].numel()

    def loss(out, data):
        return -outer_log_likelihood(out, data).sum()

    def block(out, example):
        h = torch.func.hessian(lambda o: loss(o.unsqueeze(0), _one(example)))(out)
        return h.reshape(C, C)

    try:
        blocks = torch.func.vmap(block)(work, batch)
    except Exception:  # a log-likelihood vmap cannot run: the whole-batch way
        return None
    g = torch.Generator(device=work.device).manual_seed(0)
    v = torch.randn(work.shape, generator=g, device=work.device, dtype=work.dtype)
    _, hv = torch.func.jvp(torch.func.grad(lambda o: loss(o, batch)), (work,), (v,))
    bv = torch.bmm(blocks, v.reshape(N, C, 1))
    error = (hv.reshape(N, C, 1) - bv).norm()
    if error <= _tolerance(work.dtype) * (hv.norm() + bv.norm()):
        return blocks
    return None


def _single(forward: Callable, unflatten: Callable) -> Callable:
    """``theta, example -> output row``: the forward of one example alone."""

    def output(theta, example):
        out, _ = pair(forward(unflatten(theta), _one(example)), "forward", "output")
        return out[0]

    return output


def _splits(forward, unflatten, theta, batch, z) -> bool:
    """Whether each example alone gives its row of the batched output ``z``."""
    try:
        with torch.no_grad():
            rows = torch.func.vmap(_single(forward, unflatten), in_dims=(None, 0))(
                theta, batch
            )
    except Exception:  # a forward vmap cannot run: the whole-batch way
        return False
    if rows.shape != z.shape:
        return False
    tol = _tolerance(z.dtype)
    scale = z.abs().max().clamp_min(torch.finfo(z.dtype).tiny)
    return bool(((rows - z).abs() <= tol * scale).all())


def _per_example(forward, unflatten, theta, batch, blocks, chunk_entries):
    """The pieces of ``sum_n J_n^T H_n J_n``: ``(S, S)``, one tensor twice, with
    ``S_n = L_n^T J_n`` where every ``H_n = L_n L_n^T`` is positive semi-definite
    (as for a cross-entropy or a Gaussian log-likelihood), else ``(J, H J)``.

    ``S_n``'s rows are vector-Jacobian products of example ``n``'s output with the
    columns of ``L_n`` (one backward pass per column, no ``J_n``); ``J_n``'s, with
    the unit vectors (``jacrev``)."""
    N, C, _ = blocks.shape
    P = theta.numel()
    single = _single(forward, unflatten)
    factors = _square_roots(blocks)
    if factors is None:
        rows_of = torch.func.vmap(torch.func.jacrev(single), in_dims=(None, 0))
        K = C
    else:

        def products(vector, example, cotangents):
            _, pull = torch.func.vjp(lambda v: single(v, example).reshape(-1), vector)
            return torch.func.vmap(pull)(cotangents)[0]

        rows_of = torch.func.vmap(products, in_dims=(None, 0, 0))
        K = factors.shape[-1]
    step = max(1, chunk_entries // (K * P))
    for start in range(0, N, step):
        rows = slice(start, start + step)
        part = pytree.tree_map(lambda t, rows=rows: t[rows], batch)
        if factors is None:
            J = rows_of(theta, part).reshape(-1, C, P).to(blocks.dtype)
            yield J.reshape(-1, P), torch.bmm(blocks[rows], J).reshape(-1, P)
        else:
            cotangents = factors[rows].mT.to(theta.dtype)  # (n, K, C): L_n^T
            S = rows_of(theta, part, cotangents).reshape(-1, P).to(blocks.dtype)
            yield S, S


def _square_roots(blocks: Tensor) -> Tensor | None:
    """``L_n`` ``(N, C, K)`` with ``H_n = L_n L_n^T``, if every block is positive
    semi-definite (no eigenvalue below ``-C eps`` times the largest, the rounding
    of ``eigh``); else None. ``K <= C`` leaves out the eigen-directions of zero
    curvature (within that rounding of 0) in every block."""
    # in float64: a float32 eigh loses the small eigenvalues' relative accuracy
    values, vectors = torch.linalg.eigh(blocks.double())
    # the blocks' rounding: eigenvalues within it of 0 are 0
    tol = blocks.shape[-1] * torch.finfo(blocks.dtype).eps * values.abs().max()
    if bool((values < -tol).any()):
        return None
    # directions of zero curvature in every example (the softmax's constant
    # direction: eigh sorts it first) add nothing: fewer rows of S
    keep = (values > tol).any(0)
    roots = vectors[..., keep] * values[:, keep].clamp_min(0).sqrt().unsqueeze(-2)
    return roots.to(blocks.dtype)


def _whole_batch(forward, outer_log_likelihood, unflatten, theta, batch):
    def output(vector):
        out, _ = pair(forward(unflatten(vector), batch), "forward", "output")
        return out, out.detach()

    J, z = torch.func.jacrev(output, has_aux=True)(theta)
    work = _working(z)
    H = torch.func.hessian(lambda out: -outer_log_likelihood(out, batch).sum())(work)
    M = z.numel()
    J = J.reshape(M, -1).to(work.dtype)
    yield J, H.reshape(M, M) @ J


__all__ = ["terms", "CHUNK_ENTRIES"]
