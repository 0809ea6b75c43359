r"""Data-parallel fitting: what a fit accumulates, reduced over the ranks of a
``torch.distributed`` process group.

Under an initialised process group of more than one rank (``torchrun``; gloo on
the CPU, NCCL on GPUs), every rank runs the same ``fit`` on its shard of the data
(a ``DistributedSampler``). Each rank accumulates its shard's curvature, loss and
number of examples as one process would; ``fit`` then sums them over the ranks,
so that every rank holds the posterior of one process on all the data. The rules,
one per kind of accumulated value (``reduce_curvature``):

- a tensor (Full, Diag, the subnetwork's and the last layer's curvature, one
  curvature per output stacked): the sum;
- a Kronecker factor summed over the data (``G``): the sum; the factor averaged
  over the data (the input side ``A``, marked ``Kron.averaged``): rank ``r``
  averaged over ``N_r``, the number its loader reports (``len(dataset)``), so its
  factor is first scaled by ``N_r / N`` with ``N = sum_r m_r`` the examples the
  ranks saw, then summed. With a ``DistributedSampler`` every ``N_r`` is the data
  set's size and the scale is 1; with one data set per rank it is the count
  weighting of ``merge_data_sets``;
- a low-rank factor (``LowRankFactor``): the ranks' square roots gathered (the same
  scaling) and truncated once more, exact where the total rank is at most ``r``;
- the loss and the number of data: the sums (``n_data`` becomes the number of
  examples the curvature holds).

Only ``torch.distributed`` collectives are used: ``all_reduce`` of the tensors
(coalesced into buckets of at most ``BUCKET_BYTES``), ``all_gather`` of low-rank
square roots and ``all_gather_object`` of small records (each rank's model
signature, errors and counts). A rank that fails (bad input, a non-finite batch)
makes every rank raise at the next agreement point instead of leaving the others
waiting in a collective: ``agreement``.

``distributed_reduction(False)`` turns the reduction off (per-rank posteriors);
``distributed_reduction(group=...)`` reduces over a sub-group. A process that
fits alone under a process group (e.g. only rank 0) must turn it off: the other
ranks would never join its collectives.
"""

from __future__ import annotations

import hashlib
import pickle
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

Tensor = torch.Tensor

#: the most bytes one ``all_reduce`` moves: the tensors of a fit are coalesced into
#: buckets of at most this (one large tensor goes alone, in place)
BUCKET_BYTES = 64 * 2**20

_state: dict[str, Any] = {"enabled": True, "group": None}
#: the counters of the ``traffic`` contexts open now
_counters: list[Traffic] = []


class distributed_reduction:
    """Turn the reduction over the ranks of a process group on or off.

    Usable as a plain setter, ``distributed_reduction(False)``, and as a context
    manager, ``with distributed_reduction(False): la.fit(loader)``, which restores
    the previous setting on exit. On by default: under an initialised process
    group of more than one rank, ``fit``, ``marglik_training``, the grid search's
    validation and the streaming ``update`` reduce over the ranks.

    Parameters
    ----------
    enabled : bool, default=True
        ``False``: each rank fits its own data alone (per-rank posteriors).
    group : torch.distributed.ProcessGroup, optional
        the group to reduce over; None: the default (world) group.
    """

    def __init__(self, enabled: bool = True, group: Any = None) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(
                f"enabled must be True or False; got {type(enabled).__name__} "
                f"{enabled!r}."
            )
        self._previous = dict(_state)
        _state["enabled"], _state["group"] = enabled, group

    def __enter__(self) -> distributed_reduction:
        return self

    def __exit__(self, *exc: object) -> None:
        _state.update(self._previous)


@dataclass(frozen=True)
class Reduction:
    """The process group a fit reduces over: ``group`` (None: the world), this
    process's ``rank`` in it and its ``world_size`` (at least 2)."""

    group: Any
    rank: int
    world_size: int


def reduction() -> Reduction | None:
    """The group to reduce over now, or None: no initialised process group, a
    group of one rank, or the reduction turned off (``distributed_reduction``)."""
    if not _state["enabled"]:
        return None
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = _state["group"]
    world = dist.get_world_size(group)
    if world < 2:
        return None
    return Reduction(group, dist.get_rank(group), world)


def unwrap(model: nn.Module) -> nn.Module:
    """The module a ``DistributedDataParallel`` (or ``DataParallel``) wraps; any
    other model as it is."""
    parallel = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, parallel):
        model = model.module
    return model


# -- counting what is communicated -------------------------------------------------
@dataclass
class Traffic:
    """What the collectives of this library sent while a ``traffic`` context was
    open: ``bytes``, the payload of each call summed (the size of the tensors
    reduced by this rank, or of what a gather collects from all ranks, pickled
    records included; a ring all-reduce sends about ``2 (W - 1) / W`` times its
    payload over the network), and ``calls``, per kind of collective."""

    bytes: int = 0
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes += int(nbytes)
        self.calls[kind] = self.calls.get(kind, 0) + 1


@contextmanager
def traffic() -> Iterator[Traffic]:
    """Count the bytes this library's collectives send inside the block::

    with traffic() as sent:
        la.fit(loader)
    print(sent.bytes, sent.calls)
    """
    counter = Traffic()
    _counters.append(counter)
    try:
        yield counter
    finally:
        _counters.remove(counter)


def _count(kind: str, nbytes: int) -> None:
    for counter in _counters:
        counter.add(kind, nbytes)


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


# -- agreement: errors and models compared before any collective on tensors ------------
class RankError(RuntimeError):
    """Another rank failed where this one did not: this rank stops too (no rank is
    left waiting in a collective)."""


@dataclass
class Agreement:
    """What ``agreement`` gathered from every rank: ``records[r]`` is rank ``r``'s
    ``report`` (a dict), empty before the block ends."""

    records: list[dict] = field(default_factory=list)
    _report: dict = field(default_factory=dict)

    def report(self, **values: Any) -> None:
        """Add ``values`` (small picklable objects) to this rank's record."""
        self._report.update(values)

    def total(self, key: str) -> Any:
        """The sum over the ranks of ``key`` in their records."""
        return sum(record[key] for record in self.records)


@contextmanager
def agreement(
    red: Reduction | None, what: str, signature: Any = None
) -> Iterator[Agreement]:
    """Run the block on every rank, then gather one record per rank
    (``all_gather_object``): whether the block raised, ``signature`` (compared:
    the ranks must fit the same model) and what the block ``report``-ed.

    An error of the block is re-raised on its rank once every rank has reported;
    the other ranks raise ``RankError`` naming it. Different signatures raise
    ``ValueError`` on every rank, naming the ranks and what differs. Without a
    reduction (``red`` None) the block simply runs.
    """
    agreed = Agreement()
    if red is None:
        yield agreed
        return
    error: BaseException | None = None
    try:
        yield agreed
    except Exception as err:  # reported to the other ranks, then re-raised
        error = err
    sig = None
    if error is None and signature is not None:
        sig = signature() if callable(signature) else signature
    record = {
        "error": None if error is None else f"{type(error).__name__}: {error}",
        "signature": sig,
        **agreed._report,
    }
    records: list[Any] = [None] * red.world_size
    torch.distributed.all_gather_object(records, record, group=red.group)
    _count("all_gather_object", len(pickle.dumps(record)) * red.world_size)
    agreed.records = records
    if error is not None:
        raise error
    failed = [(r, rec["error"]) for r, rec in enumerate(records) if rec["error"]]
    if failed:
        r, message = failed[0]
        raise RankError(
            f"{what} failed on rank {r} of {red.world_size} ({message}); rank "
            f"{red.rank} stops with it. Fix the input of rank {r}: every rank runs "
            "the same steps (or turn the reduction off with "
            "laplace.utils.distributed_reduction(False) for per-rank posteriors)."
        )
    if signature is not None:
        _compare_signatures(records, red, what)


def _compare_signatures(records: list[dict], red: Reduction, what: str) -> None:
    first = records[0]["signature"]
    differ = [r for r, rec in enumerate(records) if rec["signature"] != first]
    if not differ:
        return
    other = records[differ[0]]["signature"]
    keys = [k for k in {**first, **other} if first.get(k) != other.get(k)]
    shown = "; ".join(
        f"rank {r}: "
        + ", ".join(f"{k}={records[r]['signature'].get(k)!r}" for k in keys)
        for r in [0, *differ]
    )
    raise ValueError(
        f"{what}: the ranks hold different models or settings, which cannot be "
        f"reduced into one posterior ({shown}). Build the same model and Laplace "
        "object on every rank (the same seed, subset of weights and structure), or "
        "turn the reduction off with laplace.utils.distributed_reduction(False) for "
        "per-rank posteriors."
    )


def signature(la: Any) -> dict:
    """What must agree between the ranks for their fits to be reduced: the class,
    backend and dtypes, the treated parameters' shapes (a digest) and number, the
    subnetwork's indices (a digest), the noise's shape."""
    params = la.params or []
    shapes = [tuple(p.shape) for p in params]
    sig = {
        "class": type(la).__name__,
        "backend": getattr(la._backend_cls, "__name__", str(la._backend_cls)),
        "dtype": str(la._dtype),
        "weights": int(sum(p.numel() for p in params)),
        "parameter tensors": len(shapes),
        "shapes": _digest(repr(shapes).encode()),
        "sigma_noise shape": tuple(la.sigma_noise.shape),
    }
    indices = getattr(la, "subnetwork_indices", None)
    if isinstance(indices, Tensor):
        sig["subnetwork"] = _digest(indices.detach().cpu().numpy().tobytes())
    return sig


def _digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()[:12]


# -- reductions ----------------------------------------------------------------------
def all_reduce_(tensors: Iterable[Tensor], red: Reduction) -> None:
    """Sum each tensor over the ranks, in place: tensors of one dtype and device
    coalesced into buckets of at most ``BUCKET_BYTES`` (one ``all_reduce`` each);
    a larger tensor alone, without a copy where it is contiguous."""
    groups: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        for bucket in _buckets(group):
            _all_reduce_bucket(bucket, red)


def _buckets(tensors: list[Tensor]) -> Iterator[list[Tensor]]:
    bucket: list[Tensor] = []
    size = 0
    for t in tensors:
        if bucket and size + _nbytes(t) > BUCKET_BYTES:
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += _nbytes(t)
    if bucket:
        yield bucket


def _all_reduce_bucket(bucket: list[Tensor], red: Reduction) -> None:
    dist = torch.distributed
    if len(bucket) == 1 and bucket[0].is_contiguous():
        t = bucket[0]
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=red.group)
        _count("all_reduce", _nbytes(t))
        return
    flat = torch.cat([t.reshape(-1) for t in bucket])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=red.group)
    _count("all_reduce", _nbytes(flat))
    for t, part in zip(bucket, flat.split([t.numel() for t in bucket]), strict=True):
        t.copy_(part.view_as(t))


def all_reduce_sum(t: Tensor, red: Reduction | None) -> Tensor:
    """``t`` summed over the ranks (a new tensor; ``t`` itself without a
    reduction)."""
    if red is None:
        return t
    out = t.detach().clone().contiguous()
    all_reduce_([out], red)
    return out


def reduce_curvature(H: Any, red: Reduction, n_local: int, n_total: int) -> Any:
    """The curvature of all ranks from this rank's ``H`` (see the module
    docstring): summed; averaged Kronecker factors scaled by ``n_local / n_total``
    first (``n_local`` the data count this rank's factors are averaged over,
    ``n_total`` the examples of all ranks). Tensors are reduced in place; returns
    the reduced curvature."""
    for kinds, rule in _rules():
        if isinstance(H, kinds):
            return rule(H, red, n_local, n_total)
    raise TypeError(
        f"Cannot reduce a curvature of type {type(H).__name__} over the ranks; "
        "expected a tensor, a Kron or an OutputKron."
    )


def layout(H: Any) -> Any:
    """The shapes of a curvature's tensors (``agreement`` compares them between
    the ranks before they are summed)."""
    if isinstance(H, Tensor):
        return tuple(H.shape)
    kfacs = getattr(H, "kfacs", None)
    if kfacs is None:
        return type(H).__name__
    return [[tuple(F.shape) for F in block] for block in kfacs]


def reduce_accumulated(
    H: Any, red: Reduction, n_local: int, agreed: Agreement, what: str
) -> tuple[Any, int]:
    """``(H of all ranks, examples of all ranks)`` after an ``agreement`` whose
    records ``report``-ed ``seen`` (this rank's examples) and ``layout(H)``:
    different layouts are refused on every rank, then ``reduce_curvature``."""
    layouts = {repr(record["layout"]) for record in agreed.records}
    if len(layouts) > 1:
        raise ValueError(
            f"{what}: the ranks gave curvatures of different layouts "
            f"({sorted(layouts)}), which cannot be summed. Use the same model and "
            "backend on every rank."
        )
    n_total = agreed.total("seen")
    return reduce_curvature(H, red, n_local, n_total), n_total


def _reduce_tensor(H: Tensor, red: Reduction, n_local: int, n_total: int) -> Tensor:
    all_reduce_([H], red)
    return H


def _reduce_kron(K: Any, red: Reduction, n_local: int, n_total: int) -> Any:
    from laplace.utils.lowrank_factor import LowRankFactor

    scale = n_local / n_total
    dense: list[Tensor] = []
    low_rank: list[tuple[int, int, float]] = []
    for i, (block, mean) in enumerate(zip(K.kfacs, K.averaged, strict=True)):
        for j, F in enumerate(block):
            weight = scale if j == mean else 1.0
            if isinstance(F, LowRankFactor):
                low_rank.append((i, j, weight))
                continue
            if weight != 1.0:
                F.mul_(weight)
            dense.append(F)
    all_reduce_(dense, red)
    for i, j, weight in low_rank:
        K.kfacs[i][j] = _reduce_low_rank(K.kfacs[i][j], red, weight)
    return K


def _reduce_low_rank(F: Any, red: Reduction, weight: float) -> Any:
    """``sum_r w_r F_r`` over the ranks for ``F = U diag(s) U^T + c I``: the square
    roots ``U sqrt(w s)`` gathered (padded to the largest rank with zero columns,
    which add nothing), stacked and truncated to ``F.rank``; ``c`` summed."""
    from laplace.utils.lowrank_factor import LowRankFactor, truncate

    dist = torch.distributed
    root = F.U * (weight * F.s).sqrt()
    c = (weight * F.c).reshape(1).clone()
    width = torch.tensor([root.shape[1]], dtype=torch.int64, device=root.device)
    widths = [torch.empty_like(width) for _ in range(red.world_size)]
    dist.all_gather(widths, width, group=red.group)
    _count("all_gather", _nbytes(width) * red.world_size)
    k = int(max(int(w) for w in widths))
    padded = torch.zeros(F.n, k, dtype=root.dtype, device=root.device)
    padded[:, : root.shape[1]] = root
    roots = [torch.empty_like(padded) for _ in range(red.world_size)]
    dist.all_gather(roots, padded, group=red.group)
    _count("all_gather", _nbytes(padded) * red.world_size)
    all_reduce_([c], red)
    B = torch.cat([R[:, : int(w)] for R, w in zip(roots, widths, strict=True)], dim=1)
    U, s, c_new = truncate(B, c.reshape(()), F.rank)
    return LowRankFactor(U, s, c_new, F.rank)


def _rules() -> tuple:
    """The dispatch table of ``reduce_curvature``: (types, rule) (imported on use:
    the matrix classes import this package)."""
    from laplace.curvature.output_kron import OutputKron
    from laplace.utils.matrix import Kron

    return (((Tensor,), _reduce_tensor), ((Kron, OutputKron), _reduce_kron))


def all_gather_rows(t: Tensor, red: Reduction | None) -> Tensor:
    """The rows of every rank's ``t`` (leading dimensions may differ), in rank
    order: ``torch.cat`` of the ranks' tensors."""
    if red is None:
        return t
    dist = torch.distributed
    t = t.contiguous()
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    counts = [torch.empty_like(n) for _ in range(red.world_size)]
    dist.all_gather(counts, n, group=red.group)
    _count("all_gather", _nbytes(n) * red.world_size)
    longest = max(int(c) for c in counts)
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(red.world_size)]
    dist.all_gather(parts, padded, group=red.group)
    _count("all_gather", _nbytes(padded) * red.world_size)
    return torch.cat([p[: int(c)] for p, c in zip(parts, counts, strict=True)])


def shared_seed(red: Reduction | None) -> int | None:
    """A seed drawn on rank 0 (from torch's global generator) and broadcast: the
    same random start on every rank (eigensolvers iterating in step). None
    without a reduction."""
    if red is None:
        return None
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    objects = [int(seed)]
    torch.distributed.broadcast_object_list(
        objects, src=_global_rank(red, 0), group=red.group
    )
    _count("broadcast_object_list", len(pickle.dumps(objects[0])))
    return int(objects[0])


def _global_rank(red: Reduction, rank: int) -> int:
    if red.group is None:
        return rank
    return torch.distributed.get_global_rank(red.group, rank)


# -- loaders -------------------------------------------------------------------------
def check_loader(
    loader: Any, red: Reduction | None, what: str = "train_loader"
) -> None:
    """Warn where a loader will not shard the data over the ranks: no
    ``DistributedSampler`` (each rank sees all of it: the data counted once per
    rank), or one that pads the last examples (``len(dataset)`` not a multiple of
    the number of ranks: those examples counted twice)."""
    if red is None:
        return
    from torch.utils.data.distributed import DistributedSampler

    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    inner = getattr(batch_sampler, "sampler", None)
    found = next(
        (s for s in (sampler, inner) if isinstance(s, DistributedSampler)), None
    )
    if found is None:
        warnings.warn(
            f"{what} has no DistributedSampler under a process group of "
            f"{red.world_size} ranks: unless each rank's loader holds a different "
            "shard, every rank fits all the data and the reduced posterior counts "
            f"each example {red.world_size} times. Use "
            "DataLoader(dataset, sampler=DistributedSampler(dataset)), or "
            "laplace.utils.distributed_reduction(False) for per-rank posteriors.",
            UserWarning,
            stacklevel=3,
        )
        return
    n = len(found.dataset)
    if not found.drop_last and n % found.num_replicas:
        extra = found.num_replicas - n % found.num_replicas
        warnings.warn(
            f"{what}'s DistributedSampler pads {n} examples to {n + extra} "
            f"({found.num_replicas} ranks): {extra} example(s) enter the posterior "
            "twice. Use a data set whose size is a multiple of the number of ranks "
            "for the exact posterior.",
            UserWarning,
            stacklevel=3,
        )


__all__ = [
    "BUCKET_BYTES",
    "Reduction",
    "RankError",
    "Traffic",
    "agreement",
    "all_gather_rows",
    "all_reduce_",
    "all_reduce_sum",
    "check_loader",
    "layout",
    "distributed_reduction",
    "reduce_accumulated",
    "reduce_curvature",
    "reduction",
    "shared_seed",
    "signature",
    "traffic",
    "unwrap",
]
