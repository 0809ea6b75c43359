r"""Memory plans: the peak memory an operation will add, estimated before any work.

``fit``, the predictives, the grid search of ``optimize_prior_precision`` and
``marglik_training`` first estimate the peak memory they will *add* to what is
resident, as a sum of named terms (``Term``): the curvature ``(P, P)``, the
per-example vectors ``(K, B, P)`` of the curvature engine, the Jacobians
``(B, C, P)`` of the GLM predictive, the activations of the batch times the ``K``
backpropagated columns, and so on. When the estimate exceeds the memory available
(``available_memory``: the device's, or a limit set with ``memory_limit``) they
raise ``MemoryPlanError`` at once, before any batch is processed, naming the
estimate, its dominant term and the cheaper approximations that fit.

The estimates model the curvature engine (``NativeGGN``/``NativeEF``, the default
backend) and read

- the treated parameters (their shapes and how the engine serves them,
  ``laplace.curvature.engine.plan``) and the dtypes: the model's, and the
  curvature's (float32 for a 16-bit model, ``laplace.utils.matrix.linalg_dtype``);
- the batch size ``B`` and the number of outputs ``C``;
- the number ``K`` of backpropagated columns (the likelihood's factor of the output
  Hessian: ``C - 1`` for classification, ``C`` for regression, 1 for the empirical
  Fisher, ``num_samples`` for the Monte-Carlo Fisher, ``C`` for Jacobians);
- the activations of one example (``Profile``): one forward pass of a single
  example, with forward hooks and ``torch.autograd.graph.saved_tensors_hooks``
  that are removed afterwards, scaled by ``B``. It is cached per model and input
  shape, so a planned call costs one small forward pass the first time and a few
  multiplications afterwards.

Each estimator is a pure function of a ``Problem`` (the sizes above) and returns
the terms that coexist at the operation's peak; ``ESTIMATORS`` maps each
structure to its estimators. ``memory_plan`` prints them for every structure and
subset of weights of a model.

Limits: ``memory_limit("20GB")`` (a setter, and a context manager restoring the
previous limit on exit), or the environment variable ``LAPLACE_MEMORY_LIMIT``
(``"20GB"``, ``"512MiB"``, a number of bytes); ``"off"`` turns the checks off.
Without a limit the checks compare with what the device can give:
``torch.cuda.mem_get_info`` (plus what torch's caching allocator holds unused) on
CUDA, ``MemAvailable`` of ``/proc/meminfo`` (and a cgroup's ``memory.max``) on the
CPU, else ``psutil``, else there is no limit.
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from laplace.curvature import engine, rules
from laplace.curvature.structures import DENSE_BLOCK_LIMIT
from laplace.data import input_tensor, select_rows, split_batch, to_device
from laplace.utils.matrix import linalg_dtype

Tensor = torch.Tensor

#: the environment variable of a memory limit ("20GB", "512MiB", bytes, or "off")
ENV_VAR = "LAPLACE_MEMORY_LIMIT"
#: entries of the chunks that the engine, the GLM predictive and the last-layer
#: predictive form at a time (``structures._CHUNK_ENTRIES`` and its peers)
_CHUNK = 1 << 24
#: KFAC backpropagates as many columns at once as keep their gradients below this
#: many entries (``engine._COLUMN_ENTRIES``)
_COLUMN_ENTRIES = 1 << 24
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_OFF = ("off", "false", "no", "disable", "disabled")


# -- sizes ---------------------------------------------------------------------------
def parse_bytes(value: int | float | str) -> int:
    """A number of bytes from ``value``: a number, or a string such as ``"20GB"``,
    ``"1.5 GiB"``, ``"512MB"`` (decimal ``kB MB GB TB``, binary ``KiB MiB GiB
    TiB``; case-insensitive; ``G``/``M``/``K`` alone are read as GB, MB, kB).

    Raises
    ------
    ValueError
        for anything else, or a size that is not positive.
    """
    text = value
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(number) :]
        unit = unit + "b" if unit in ("k", "m", "g", "t") else unit
        try:
            amount = float(number) * _UNITS[unit or "b"]
        except (KeyError, ValueError):
            amount = None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        amount = float(value)
    else:
        amount = None
    if amount is None or not math.isfinite(amount) or amount <= 0:
        raise ValueError(
            f"A memory limit must be a positive number of bytes or a size such as "
            f"'20GB', '512MiB' ('off' turns the checks off); got {text!r}."
        )
    return int(amount)


def format_bytes(n: int | None) -> str:
    """``n`` bytes in decimal units, e.g. ``'1.2 GB'``."""
    if n is None:
        return "unknown"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


# -- the memory available ------------------------------------------------------------
@dataclass(frozen=True)
class Available:
    """The memory an operation may add: ``nbytes`` (None: no limit known, or the
    checks are off) and where the figure comes from."""

    nbytes: int | None
    source: str


_DEFAULT = object()
_state: dict[str, Any] = {"limit": _DEFAULT}


class memory_limit:
    """Set the memory the checks compare the estimates with.

    Usable as a plain setter, ``memory_limit("20GB")``, and as a context manager,
    ``with memory_limit("20GB"): ...``, which restores the previous setting on
    exit.

    Parameters
    ----------
    limit : int, float, str, bool or None
        a number of bytes or a size such as ``"20GB"`` (``parse_bytes``): the
        operations may add at most this much (it replaces the device's figure);
        ``"off"`` or ``False``: no checks; ``None``: the default, the
        environment variable ``LAPLACE_MEMORY_LIMIT`` (same values) if set, else
        what the device can give (``available_memory``).
    """

    def __init__(self, limit: int | float | str | bool | None) -> None:
        if limit is None:
            value: Any = _DEFAULT
        elif limit is False or (isinstance(limit, str) and limit.lower() in _OFF):
            value = False
        else:
            value = parse_bytes(limit)
        self._previous = _state["limit"]
        _state["limit"] = value

    def __enter__(self) -> memory_limit:
        return self

    def __exit__(self, *exc: object) -> None:
        _state["limit"] = self._previous


def _user_limit() -> tuple[Any, str]:
    """``(limit, source)``: False (off), a number of bytes, or ``_DEFAULT``."""
    if _state["limit"] is not _DEFAULT:
        return _state["limit"], "memory_limit()"
    env = os.environ.get(ENV_VAR)
    if env is None or not env.strip():
        return _DEFAULT, ""
    if env.strip().lower() in _OFF:
        return False, ENV_VAR
    try:
        return parse_bytes(env), f"${ENV_VAR}"
    except ValueError as err:
        raise ValueError(f"The environment variable {ENV_VAR}={env!r}: {err}") from None


def checks_enabled() -> bool:
    """Whether the memory checks run (not turned off by ``memory_limit`` or
    ``LAPLACE_MEMORY_LIMIT``)."""
    return _user_limit()[0] is not False


def available_memory(device: torch.device | str | None = None) -> Available:
    """The memory an operation on ``device`` may add.

    A limit set with ``memory_limit`` or ``LAPLACE_MEMORY_LIMIT`` when there is one;
    else on CUDA the free memory of ``torch.cuda.mem_get_info`` plus what torch's
    caching allocator holds unused on that device; on the CPU ``MemAvailable`` of
    ``/proc/meminfo`` (bounded by a cgroup v2 ``memory.max`` where one is set),
    else ``psutil.virtual_memory().available`` if psutil is installed, else no
    limit (``nbytes`` None).
    """
    limit, source = _user_limit()
    if limit is False:
        return Available(None, f"checks turned off by {source}")
    if limit is not _DEFAULT:
        return Available(limit, source)
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(
            device
        )
        return Available(
            int(free + cached), f"torch.cuda.mem_get_info({device}) + cached"
        )
    if device.type == "cpu":
        found = _meminfo_available()
        if found is not None:
            return found
        try:
            import psutil
        except ImportError:
            return Available(None, "unknown (no /proc/meminfo, no psutil)")
        return Available(int(psutil.virtual_memory().available), "psutil")
    return Available(None, f"unknown for device {device}")


def _meminfo_available() -> Available | None:
    try:
        with open("/proc/meminfo") as info:
            fields = dict(line.split(":", 1) for line in info if ":" in line)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    source = "MemAvailable of /proc/meminfo"
    try:  # a container's own limit (cgroup v2)
        with open("/sys/fs/cgroup/memory.max") as f:
            cap = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if cap != "max" and int(cap) - used < available:
            available, source = int(cap) - used, "cgroup memory.max - memory.current"
    except (OSError, ValueError):
        pass
    return Available(available, source)


# -- estimates -----------------------------------------------------------------------
@dataclass(frozen=True)
class Term:
    """One named allocation of an estimate: ``nbytes`` bytes of ``name`` (e.g.
    ``'curvature'``), ``detail`` its shape and dtype."""

    name: str
    nbytes: int
    detail: str = ""

    def __str__(self) -> str:
        detail = f" {self.detail}" if self.detail else ""
        return f"{self.name}{detail}: {format_bytes(self.nbytes)}"


@dataclass(frozen=True)
class Estimate:
    """The peak memory an operation adds: the sum of the terms that coexist at
    its peak.

    Attributes
    ----------
    operation : str
        'fit', 'glm predictive', 'nn predictive', 'gridsearch' or
        'marglik_training'.
    approximation : str
        ``'subset/structure'``, e.g. ``'all/full'``, ``'last_layer/kron'``.
    terms : tuple of Term
    batch_size : int
    """

    operation: str
    approximation: str
    terms: tuple[Term, ...]
    batch_size: int

    @property
    def nbytes(self) -> int:
        """The estimated peak, in bytes."""
        return sum(t.nbytes for t in self.terms)

    @property
    def dominant(self) -> Term:
        """The largest term."""
        return max(self.terms, key=lambda t: t.nbytes)

    def __str__(self) -> str:
        terms = "; ".join(str(t) for t in self.terms if t.nbytes)
        total = format_bytes(self.nbytes)
        return f"{self.operation} of {self.approximation}: {total} ({terms})"


class MemoryPlanError(MemoryError):
    """An operation would need more memory than is available; raised before any
    work.

    Attributes
    ----------
    estimate : Estimate
        the estimate of the refused operation (``estimate.dominant`` its largest
        term).
    available : Available
        the memory it was compared with, and where that figure comes from.
    alternatives : list of (str, Estimate)
        cheaper settings that fit, each with its estimate for the same model and
        batch.
    """

    def __init__(
        self,
        message: str,
        estimate: Estimate,
        available: Available,
        alternatives: list[tuple[str, Estimate]],
    ) -> None:
        super().__init__(message)
        self.estimate = estimate
        self.available = available
        self.alternatives = alternatives


# -- one example through the model ---------------------------------------------------
@dataclass(frozen=True)
class Profile:
    """Bytes (model dtype) that one example puts through the model, from a hooked
    forward pass; the estimates scale them by the batch size.

    Attributes
    ----------
    graph : tensors autograd saves for the backward pass (parameters excluded).
    kept : outputs of the engine's modules that the graph does not hold (the
        engine's records keep them).
    largest : the largest saved tensor or module output (a backward pass handles
        its gradient at one time).
    taps : outputs of the modules the curvature engine hooks, every call (the
        engine backpropagates ``K`` columns to each).
    inputs : inputs of the engine's linear and convolution modules, which its
        terms keep once the graph is freed.
    records : what the rules record beyond the graph (normalized inputs of
        normalization layers) and the input patches of convolutions.
    conv_taps : outputs of convolutions (KFAC copies their gradients).
    factored_taps : outputs of the linear and convolution modules (their
        gradients are the Jacobian factors of the GLM predictive).
    explicit : entries of the treated parameters whose Jacobian the GLM predictive
        forms explicitly (biases, normalization and embedding weights, weights used
        more than once or by no rule).
    shared : ``(numel, positions, outputs)`` of each weight shared over positions
        (convolutions, sequences): its per-example vectors are formed in chunks.
    outputs : ``C``, the outputs of one example.
    last_layer : ``(C, D, bias)`` of the last ``nn.Linear`` called (the last-layer
        Laplace's parameters), or None.
    """

    graph: int
    kept: int
    largest: int
    taps: int
    inputs: int
    records: int
    conv_taps: int
    factored_taps: int
    explicit: int
    shared: tuple[tuple[int, int, int], ...]
    outputs: int
    last_layer: tuple[int, int, bool] | None


#: per model: ``{signature: Profile}`` (the model is not kept alive by it)
_PROFILES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def profile(
    model: nn.Module, x1: Any, params: list[nn.Parameter] | None = None
) -> Profile:
    """The ``Profile`` of one example ``x1`` (a batch of one) through ``model`` for
    the treated ``params`` (default: those that require grad).

    The forward pass runs in eval mode with gradients enabled, under forward hooks
    on the engine's modules and ``saved_tensors_hooks``; afterwards every hook is
    removed and every module's training flag restored. Cached per model, input
    shapes and treated parameters.
    """
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    leaves = torch.utils._pytree.tree_leaves(x1)
    signature = (
        tuple((tuple(t.shape), t.dtype) for t in leaves if isinstance(t, Tensor)),
        tuple((id(p), p.requires_grad) for p in params),
    )
    cache = _PROFILES.setdefault(model, {})
    if signature not in cache:
        cache[signature] = _hooked_forward(model, x1, params)
    return cache[signature]


def _storage(t: Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _hooked_forward(model: nn.Module, x1: Any, params: list[nn.Parameter]) -> Profile:
    """One forward pass of ``x1`` that notes what the engine and autograd hold.

    Every output and input the hooks see is held until the end (as the engine's
    records hold them), so that the storages compared are all alive and distinct.
    """
    the_plan = engine.plan(model, params)
    weights = {_storage(p)[0] for p in model.parameters()}
    saved: dict[int, int] = {}
    held: list[Tensor] = []
    taps: dict[int, int] = {}
    tally = dict.fromkeys(("inputs", "records", "conv_taps", "factored_taps"), 0)
    factored = (rules.LinearRule, rules.TransposedLinearRule, rules.ConvRule)
    calls: dict[int, int] = {}
    positions: dict[int, tuple[int, int]] = {}
    last: list[nn.Linear] = []

    def pack(t: Tensor) -> Tensor:
        ptr, size = _storage(t)
        if ptr not in weights:
            saved[ptr] = size
        return t

    def entry_hook(entry: engine.Entry):
        def hook(module, args, output):
            leaves = torch.utils._pytree.tree_leaves(output)
            out = next((t for t in leaves if isinstance(t, Tensor)), None)
            a = args[0] if args and isinstance(args[0], Tensor) else None
            if out is None:
                return
            held.extend(t for t in (out, a) if t is not None)
            size = out.numel() * out.element_size()
            taps[len(taps)] = size
            calls[id(module)] = calls.get(id(module), 0) + 1
            if isinstance(entry.rule, rules.NormRule) and a is not None:
                tally["records"] += a.numel() * a.element_size()
            elif isinstance(entry.rule, factored) and a is not None:
                tally["inputs"] += a.numel() * a.element_size()
                tally["factored_taps"] += size
                if isinstance(entry.rule, rules.ConvRule) and out.ndim > 2:
                    spots = math.prod(out.shape[2:])
                    k = math.prod(module.kernel_size) * module.in_channels
                    tally["records"] += spots * k * out.element_size()
                    tally["conv_taps"] += size
                    positions[id(module)] = (spots, out.shape[1])
                elif out.ndim > 2:
                    n_out = out.shape[-1]
                    positions[id(module)] = (out.numel() // n_out, n_out)

        return hook

    def linear_hook(module, args, output):
        last.append(module)

    handles = []
    modes = [(m, m.training) for m in model.modules()]
    try:
        for entry in the_plan.entries:
            handles.append(entry.module.register_forward_hook(entry_hook(entry)))
        for m in model.modules():
            if isinstance(m, nn.Linear):
                handles.append(m.register_forward_hook(linear_hook))
        model.eval()
        with (
            torch.enable_grad(),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            f = model(x1)
        outputs = f.shape[-1] if isinstance(f, Tensor) and f.ndim else 1
        kept = {}
        for t in held:
            ptr, size = _storage(t)
            if ptr not in saved and ptr not in weights:
                kept[ptr] = size
        del f
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
        held.clear()
    explicit, shared = 0, []
    for entry in the_plan.entries:
        for p in entry.params.values():
            one_use = calls.get(id(entry.module), 0) <= 1
            if isinstance(entry.rule, factored) and p.ndim >= 2 and one_use:
                spots, n_out = positions.get(id(entry.module), (1, 0))
                if spots > 1:
                    shared.append((p.numel(), spots, n_out))
            else:
                explicit += p.numel()
    layer = last[-1] if last else None
    return Profile(
        graph=sum(saved.values()),
        kept=sum(kept.values()),
        largest=max([0, *taps.values(), *saved.values()]),
        taps=sum(taps.values()),
        explicit=explicit,
        shared=tuple(shared),
        outputs=outputs,
        last_layer=None
        if layer is None
        else (layer.out_features, layer.in_features, layer.bias is not None),
        **tally,
    )


# -- what the estimates read ---------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    """The sizes an estimate reads (see the module docstring).

    Attributes
    ----------
    shapes : shapes of the parameters that require grad (an all-weights Laplace).
    blocks : per parameter, the sizes of its Kronecker factors as the engine builds
        them; a negative size stands for a diagonal factor.
    profile : one example through the model (``Profile``).
    batch : ``B``.
    outputs : ``C``.
    columns : ``K``, the backpropagated columns of the curvature.
    itemsize : bytes per entry of the model's dtype.
    work_itemsize : bytes per entry of the curvature's dtype.
    n_data : training data (None: unknown).
    """

    shapes: tuple[tuple[int, ...], ...]
    blocks: tuple[tuple[int, ...], ...]
    profile: Profile
    batch: int
    outputs: int
    columns: int
    itemsize: int
    work_itemsize: int
    n_data: int | None = None

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def n_batches(self) -> int:
        """Batches of a fit (2 when the data set's size is not known)."""
        if self.n_data is None:
            return 2
        return max(1, math.ceil(self.n_data / self.batch))


@dataclass(frozen=True)
class Settings:
    """Options of an estimate beyond the sizes: ``rank`` (LowRank), ``low_rank``
    (``(r, threshold)``: Kron factors above ``threshold`` kept as rank ``r`` plus
    isotropic, KronLaplace's ``low_rank_factors``), ``subnet_size``,
    ``n_subset`` (GP), ``n_samples`` (nn predictive), ``joint`` (joint predictive),
    ``per_output`` (one noise per output), ``posterior_built`` (the predictive's
    posterior form is cached already), ``n_val`` (validation data of the grid
    search), ``eig_iterations`` (products of LowRank's eigensolver)."""

    rank: int = 20
    low_rank: tuple[int, int] | None = None
    subnet_size: int | None = None
    n_subset: int | None = None
    n_samples: int = 100
    joint: bool = False
    per_output: bool = False
    posterior_built: bool = False
    n_val: int | None = None
    eig_iterations: int = 30


def kron_blocks(
    model: nn.Module, params: list[nn.Parameter]
) -> tuple[tuple[int, ...], ...]:
    """Per parameter, the factor sizes of its block in the engine's ``Kron``: a pair
    ``(out, in)`` for a weight served by linear rules (an embedding's token side is
    diagonal, given negative), ``(n,)`` for a bias, and the exact block of any other
    parameter, dense up to ``DENSE_BLOCK_LIMIT`` entries, else diagonal (``-n``)."""
    the_plan = engine.plan(model, params)
    out = []
    for p in params:
        users = [e for e in the_plan.entries if any(q is p for q in e.params.values())]
        outer = bool(users) and all(e.rule.produces is rules.Outer for e in users)
        n = p.numel()
        if outer and p.ndim >= 2:
            rows, cols = p.shape[0], n // p.shape[0]
            if any(isinstance(e.rule, rules.EmbeddingRule) for e in users):
                rows = -rows  # token counts: a diagonal factor
            out.append((rows, cols))
        elif outer:
            out.append((n,))
        else:
            out.append((n,) if n <= DENSE_BLOCK_LIMIT else (-n,))
    return tuple(out)


# -- the terms every estimate shares --------------------------------------------------
def _dtype_name(itemsize: int) -> str:
    return {2: "16-bit", 4: "float32", 8: "float64"}.get(itemsize, f"{itemsize}-byte")


def _run_terms(pb: Problem, K: int) -> list[Term]:
    """A batch through the curvature engine, forward and backward of ``K``
    columns: the graph and the outputs the records keep, the records, the
    gradients of the tapped outputs and one gradient of the largest activation in
    flight."""
    B, pr = pb.batch, pb.profile
    return [
        Term("activations", B * (pr.graph + pr.kept), f"(forward graph, batch {B})"),
        Term("recorded inputs", B * pr.records, f"(batch {B})"),
        Term("backpropagated gradients", K * B * pr.taps, f"({K} columns x {B})"),
        Term("backward workspace", K * B * pr.largest),
    ]


def _tape_terms(pb: Problem, K: int) -> list[Term]:
    """What the engine's terms hold once the graph is freed: the modules' inputs,
    the records and the gradients of the tapped outputs."""
    B, pr = pb.batch, pb.profile
    return [
        Term("recorded inputs", B * (pr.inputs + pr.records), f"(batch {B})"),
        Term("backpropagated gradients", K * B * pr.taps, f"({K} columns x {B})"),
    ]


def _chunk_terms(pb: Problem, K: int, name: str) -> tuple[Term, Term]:
    """Per-example vectors of the weights shared over positions, formed for as many
    examples ``n`` at a time as keep ``K x n x numel`` below ``2**24`` entries:
    ``(chunk, vectors)``, the chunk counting the copy of its gradients' slice and
    the vectors ``(K, n, numel)``, and the vectors alone."""
    worst = (0, 0, "")
    for numel, spots, n_out in pb.profile.shared:
        n = min(pb.batch, max(1, _CHUNK // (K * numel)))
        vectors = n * K * numel * pb.itemsize
        size = n * K * spots * n_out * pb.itemsize + vectors
        if size > worst[0]:
            worst = (size, vectors, f"({K}, {n}, {numel:,})")
    return Term(name, worst[0], worst[2]), Term(name, worst[1], worst[2])


def _kron_columns(pb: Problem) -> int:
    """The columns KFAC backpropagates at once (``engine.kron_by_columns``)."""
    taps = pb.batch * pb.profile.taps // max(1, pb.itemsize)
    return max(1, min(pb.columns, _COLUMN_ENTRIES // max(1, taps)))


def _square(n: int, itemsize: int, name: str) -> Term:
    return Term(name, n * n * itemsize, f"({n:,} x {n:,}, {_dtype_name(itemsize)})")


def _peak(*phases: list[Term]) -> list[Term]:
    """The phase whose terms add up to the most."""
    return max(phases, key=lambda terms: sum(t.nbytes for t in terms))


def _treated(pb: Problem, subset: str, st: Settings) -> int:
    """The number of treated weights ``P`` of a subset."""
    if subset == "last_layer":
        C, D, bias = pb.profile.last_layer
        return C * D + (C if bias else 0)
    if subset == "subnetwork":
        return st.subnet_size or pb.n_params
    return pb.n_params


def _feature_terms(pb: Problem) -> list[Term]:
    """The last layer's batch: the features' forward pass (with its graph, as the
    backends run it) and the features ``(B, D)``."""
    D = pb.profile.last_layer[1]
    B, s = pb.batch, pb.itemsize
    return [
        Term("activations", B * pb.profile.graph, f"(feature forward, batch {B})"),
        Term("features", B * D * s, f"({B}, {D})"),
    ]


# -- fit -------------------------------------------------------------------------------
def fit_full(pb: Problem, subset: str = "all", st: Settings = Settings()) -> list[Term]:
    """A dense ``(P, P)`` curvature: the accumulator and, from the second batch on,
    the previous batch's curvature (held until the next one is computed); per
    batch the engine's pass, the per-example vectors ``(K, B, P)`` (their pieces and
    their concatenation), then the batch's ``V^T V``. The last layer's closed form
    ``sum_n Lambda_n (x) phi_n phi_n^T`` is reordered through three ``(P, P)``."""
    P, K, s, ws = _treated(pb, subset, st), pb.columns, pb.itemsize, pb.work_itemsize
    copies = pb.outputs if st.per_output else 1
    acc = Term("curvature", copies * P * P * ws, f"({P:,} x {P:,}, {_dtype_name(ws)})")
    held = [_square(P, s, "previous batch's curvature")] if pb.n_batches > 1 else []
    if subset == "last_layer":
        batch = Term("batch curvature and its reorderings", 3 * P * P * s)
        return _peak([acc, *held, *_feature_terms(pb)], [acc, *held, batch])
    V = Term("per-example vectors", K * pb.batch * P * s, f"({K}, {pb.batch}, {P:,})")
    return _peak(
        [acc, *held, *_run_terms(pb, K)],
        [acc, *held, *_tape_terms(pb, K), V, replace(V, name="their concatenation")],
        [acc, *held, V, _square(P, s, "batch curvature")],
    )


def _kron_factor_bytes(
    blocks, itemsize: int, low_rank: tuple[int, int] | None = None
) -> tuple[int, int, int]:
    """``(factors, eigendecompositions, largest)``: bytes of the factors and of
    their eigendecompositions, and the size of the largest dense factor. With
    ``low_rank = (r, threshold)`` a factor of size ``n > threshold`` and ``n > r``
    is ``U diag(s) U^T + c I`` (``laplace.utils.LowRankFactor``): ``r (n + 1) + 1``
    numbers, its eigendecomposition too."""
    factors = vectors = largest = 0
    for block in blocks:
        for n in block:
            if n < 0:  # diagonal
                size = dense = -n
            elif low_rank is not None and n > max(low_rank):
                r = low_rank[0]
                size = dense = r * (n + 1) + 1
            else:
                size, dense = n * n, n * n + n
                largest = max(largest, n)
            factors += size * itemsize
            vectors += dense * itemsize
    return factors, vectors, largest


def fit_kron(pb: Problem, subset: str = "all", st: Settings = Settings()) -> list[Term]:
    """Kronecker factors: the accumulated factors and a batch's products on top,
    with the engine's pass of as many columns at a time as KFAC backpropagates
    (gradients of convolutions copied to rows); then the eigendecomposition
    (eigenvectors, and the workspace of the largest factor's ``eigh``). With
    ``low_rank_factors=r`` a factor above ``low_rank_threshold`` is rank ``r``
    plus isotropic, ``O(r n)``, and is built from the batch's side vectors
    without an ``(n, n)`` matrix."""
    ws = pb.work_itemsize
    blocks = pb.blocks
    if subset == "last_layer":
        C, D, bias = pb.profile.last_layer
        blocks = ((C, D), (C,)) if bias else ((C, D),)
    factors, vectors, largest = _kron_factor_bytes(blocks, ws, st.low_rank)
    F = Term("Kronecker factors", factors, f"({len(blocks)} blocks)")
    if subset == "last_layer":
        batch = _feature_terms(pb)
    else:
        K = _kron_columns(pb)
        conv = K * pb.batch * pb.profile.conv_taps
        batch = [*_run_terms(pb, K), Term("convolution gradients (rows)", conv)]
    return _peak(
        [F, replace(F, name="batch factors"), *batch],
        [
            F,
            Term("eigendecomposition", vectors, "(of the factors)"),
            Term("eigh workspace", 3 * largest * largest * ws, f"(3 x {largest:,}^2)"),
        ],
    )


def fit_diag(pb: Problem, subset: str = "all", st: Settings = Settings()) -> list[Term]:
    """The diagonal ``(P,)``; per batch the engine's pass, then the squared
    per-example vectors of the weights shared over positions, in chunks."""
    P, K = _treated(pb, subset, st), pb.columns
    copies = pb.outputs if st.per_output else 1
    acc = Term("curvature diagonal", copies * P * pb.work_itemsize, f"({P:,},)")
    if subset == "last_layer":
        return [acc, *_feature_terms(pb)]
    chunk, vectors = _chunk_terms(pb, K, "per-example vectors (chunk)")
    return _peak(
        [acc, *_run_terms(pb, K)],
        [acc, *_tape_terms(pb, K), chunk, replace(vectors, name="their squares")],
    )


def fit_lowrank(
    pb: Problem, subset: str = "all", st: Settings = Settings()
) -> list[Term]:
    """Block Lanczos: a basis ``(P, b * n_iter)`` (``b = rank + 10``), grown by
    concatenation, at most ``n_iter`` blocks (the bound); per product the engine's
    pass."""
    P, ws = _treated(pb, subset, st), pb.work_itemsize
    b = min(P, st.rank + 10)
    m = min(P, b * st.eig_iterations)
    basis = Term("Lanczos basis", 2 * P * m * ws, f"({P:,}, {m}) and its extension")
    return [basis, *_run_terms(pb, pb.columns), Term("products", 3 * P * b * ws)]


def fit_gp(pb: Problem, subset: str = "all", st: Settings = Settings()) -> list[Term]:
    """The GP view on ``M`` subset points: the subset's Jacobians (factored per
    layer: gradients and inputs; explicit ``(M, C, numel)`` for the other
    parameters, at most ``(M, C, P)``) and the kernel ``(M C, M C)``, with a copy
    while it is factored."""
    M, C, s = st.n_subset or 1, pb.outputs, pb.itemsize
    P = _treated(pb, subset, st)
    pr = pb.profile
    if subset == "last_layer":
        jac = M * (pr.last_layer[1] + 1) * s
        kernel = C * M * M * s
    else:
        factored = C * pr.taps + pr.inputs
        explicit = (pr.explicit + sum(n for n, _, _ in pr.shared)) * C * s
        jac = M * min(factored + explicit, C * P * s)
        kernel = (M * C) ** 2 * s
    return [
        Term("subset Jacobians", jac, f"({M} points)"),
        Term("kernel", kernel, f"({M * C:,} x {M * C:,})"),
        Term("kernel factorization", kernel),
        *(
            _feature_terms(pb)
            if subset == "last_layer"
            else _run_terms(replace(pb, batch=min(pb.batch, M)), C)
        ),
    ]


# -- predictives ---------------------------------------------------------------------
def predictive_dense(
    pb: Problem, subset: str = "all", st: Settings = Settings()
) -> list[Term]:
    """The GLM predictive of a dense (or low-rank) posterior: forming ``P = factor
    H + diag(p0)`` (three ``(P, P)``) and its Cholesky factor unless cached; the
    Jacobians ``(B, C, P)`` (pieces and concatenation), then the triangular solve
    (two more copies). The last layer's closed form needs the covariance, and a
    reordered copy of it per call."""
    P, C, B, s, ws = (
        _treated(pb, subset, st),
        pb.outputs,
        pb.batch,
        pb.itemsize,
        pb.work_itemsize,
    )
    form = (
        []
        if st.posterior_built
        else [_square(P, ws, "posterior precision"), _square(P, ws, "Cholesky factor")]
    )
    build = (
        []
        if st.posterior_built
        else [
            _square(P, ws, "posterior precision"),
            _square(P, ws, "scaled curvature"),
            _square(P, ws, "diag(prior precision)"),
        ]
    )
    if subset == "last_layer":
        C, D, bias = pb.profile.last_layer
        Dt = D + bias
        n = min(B, max(1, _CHUNK // (C * C * Dt)))
        cov = _square(P, ws, "covariance")
        reordered = replace(cov, name="covariance reordered (two copies)")
        reordered = replace(reordered, nbytes=2 * cov.nbytes)
        chunk = Term("chunk", n * C * C * Dt * s, f"({n}, {C}, {C}, {Dt})")
        forward = _forward_term(pb)
        return _peak(build, [*form, forward], [*form, cov, reordered, chunk])
    J = Term("Jacobians", B * C * P * s, f"({B}, {C}, {P:,})")
    joint = [Term("joint covariance", (B * C) ** 2 * s)] if st.joint else []
    return _peak(
        build,
        [*form, *_run_terms(pb, C)],
        [*form, *_tape_terms(pb, C), J, replace(J, name="their concatenation")],
        [*form, J, replace(J, name="solve copies", nbytes=2 * J.nbytes), *joint],
    )


def predictive_blocks(
    pb: Problem, subset: str = "all", st: Settings = Settings(), rotated: bool = True
) -> list[Term]:
    """The GLM predictive of Kron (``rotated``) and Diag: one backward pass of
    ``C`` columns gives the Jacobian factors and the explicit Jacobians of the other
    parameters; Kron rotates all into its eigenbasis (copies); then per-example
    Jacobians of weights shared over positions, in chunks. The last layer's
    closed form needs only the features."""
    C, B, s = pb.outputs, pb.batch, pb.itemsize
    if subset == "last_layer":
        D = pb.profile.last_layer[1]
        return _peak(
            [_forward_term(pb)],
            [
                Term("features", 2 * B * D * s, f"({B}, {D}) and rotated"),
                Term("variances", 2 * B * C * C * s, f"({B}, {C}, {C})"),
            ],
        )
    if st.low_rank is not None and any(
        n > max(st.low_rank) for block in pb.blocks for n in block
    ):  # no complete eigenbasis to rotate the factors into: the Jacobians
        return predictive_lowrank(pb, subset, st)
    pr = pb.profile
    tape = _tape_terms(pb, C)
    explicit = Term("explicit Jacobians", C * B * pr.explicit * s, f"({C}, {B}, ...)")
    factors = Term("rotated factors", B * pr.inputs + C * B * pr.factored_taps)
    copies = [factors, replace(explicit, name="explicit Jacobians rotated")]
    copies = copies if rotated else []
    chunk = _chunk_terms(pb, C, "per-example Jacobians (chunk)")[0]
    return _peak(
        _run_terms(pb, C),
        [*tape, explicit, *copies],
        [*(copies or [*tape, explicit]), chunk],
    )


def predictive_lowrank(
    pb: Problem, subset: str = "all", st: Settings = Settings()
) -> list[Term]:
    """The GLM predictive of ``U diag(l) U^T + diag(p0)``: the Jacobians ``(B, C,
    P)`` (pieces and concatenation), then Woodbury's ``J D^-1 J^T - (J U) K (J
    U)^T`` (a scaled copy of the Jacobians)."""
    P, C, B, s = _treated(pb, subset, st), pb.outputs, pb.batch, pb.itemsize
    J = Term("Jacobians", B * C * P * s, f"({B}, {C}, {P:,})")
    return _peak(
        _run_terms(pb, C),
        [*_tape_terms(pb, C), J, replace(J, name="their concatenation")],
        [J, replace(J, name="J / p0")],
    )


def predictive_diag(
    pb: Problem, subset: str = "all", st: Settings = Settings()
) -> list[Term]:
    """``predictive_blocks`` without the rotation (a diagonal's eigenbasis is the
    identity)."""
    return predictive_blocks(pb, subset, st, rotated=False)


def predictive_gp(
    pb: Problem, subset: str = "all", st: Settings = Settings()
) -> list[Term]:
    """The GP predictive: the batch's Jacobians and the cross-kernel with the ``M``
    subset points ``(B C, M C)`` (and its whitened copy)."""
    M, C, B, s = st.n_subset or 1, pb.outputs, pb.batch, pb.itemsize
    cross = Term("cross-kernel", 3 * B * C * M * C * s, f"({B * C}, {M * C}) x 3")
    if subset == "last_layer":
        return [cross, _forward_term(pb)]
    return [cross, *_run_terms(pb, C)]


def _forward_term(pb: Problem) -> Term:
    """A forward pass of the batch without graph: the largest activation and the
    one it is computed from."""
    return Term(
        "forward pass", 2 * pb.batch * pb.profile.largest, f"(batch {pb.batch})"
    )


def predictive_nn(
    pb: Problem, subset: str = "all", st: Settings = Settings()
) -> list[Term]:
    """The nn predictive: ``n_samples`` weight samples ``(n, P)`` (noise, solve and
    shift) and a forward pass without graph per sample, the outputs stacked."""
    P, S, B, s = _treated(pb, subset, st), st.n_samples, pb.batch, pb.itemsize
    return [
        Term("weight samples", 3 * S * P * pb.work_itemsize, f"({S}, {P:,}) x 3"),
        _forward_term(pb),
        Term("outputs", S * B * pb.outputs * s, f"({S}, {B}, {pb.outputs})"),
    ]


def kept_jacobians(pb: Problem, subset: str, st: Settings = Settings()) -> Term:
    """What the GLM predictive keeps per batch independently of the prior (the
    grid search holds it for every validation batch): the Jacobians ``(B, C,
    P)``; the last layer's features ``(B, D)``."""
    if subset == "last_layer":
        return _kept_features(pb)
    P, C, B = _treated(pb, subset, st), pb.outputs, pb.batch
    return Term("Jacobians", B * C * P * pb.itemsize, f"({B}, {C}, {P:,})")


def kept_factors(pb: Problem, subset: str, st: Settings = Settings()) -> Term:
    """``kept_jacobians`` of Kron and Diag: the (rotated) Jacobian factors, inputs
    and output gradients, and the explicit Jacobians of the other parameters."""
    if subset == "last_layer":
        return _kept_features(pb)
    B, C, pr = pb.batch, pb.outputs, pb.profile
    size = B * pr.inputs + C * B * (pr.factored_taps + pr.explicit * pb.itemsize)
    return Term("Jacobian factors", size, f"(batch {B})")


def kept_gp(pb: Problem, subset: str, st: Settings = Settings()) -> Term:
    """``kept_jacobians`` of the GP: the rotated cross-kernel ``(M C, B C)``."""
    M, C, B = st.n_subset or 1, pb.outputs, pb.batch
    return Term("rotated cross-kernel", M * C * B * C * pb.itemsize)


def _kept_features(pb: Problem) -> Term:
    D = pb.profile.last_layer[1]
    return Term("features", pb.batch * D * pb.itemsize, f"({pb.batch}, {D})")


@dataclass(frozen=True)
class Estimators:
    """The estimators of one structure: the terms of ``fit`` and of the GLM
    predictive at their peaks, and what the predictive keeps per batch
    independently of the prior (``Term``)."""

    fit: Callable[[Problem, str, Settings], list[Term]]
    predictive: Callable[[Problem, str, Settings], list[Term]]
    kept: Callable[[Problem, str, Settings], Term]


#: structure -> its estimators (an explicit table: one entry per structure)
ESTIMATORS: dict[str, Estimators] = {
    "full": Estimators(fit_full, predictive_dense, kept_jacobians),
    "kron": Estimators(fit_kron, predictive_blocks, kept_factors),
    "diag": Estimators(fit_diag, predictive_diag, kept_factors),
    "lowrank": Estimators(fit_lowrank, predictive_lowrank, kept_jacobians),
    "gp": Estimators(fit_gp, predictive_gp, kept_gp),
}


def estimate(
    operation: str,
    subset: str,
    structure: str,
    pb: Problem,
    st: Settings = Settings(),
) -> Estimate:
    """The ``Estimate`` of ``operation`` ('fit', 'glm predictive', 'nn predictive',
    'gridsearch' or 'marglik_training') for ``subset``/``structure`` on ``pb``."""
    table = ESTIMATORS[structure]
    if operation == "fit":
        terms = table.fit(pb, subset, st)
    elif operation == "glm predictive":
        terms = table.predictive(pb, subset, st)
    elif operation == "nn predictive":
        terms = predictive_nn(pb, subset, st)
    elif operation == "gridsearch":
        terms = _gridsearch(pb, subset, structure, st)
    elif operation == "marglik_training":
        terms = _marglik_training(pb, subset, structure, st)
    else:
        raise ValueError(f"Unknown operation {operation!r}.")
    return Estimate(operation, f"{subset}/{structure}", tuple(terms), pb.batch)


def _gridsearch(pb: Problem, subset: str, structure: str, st: Settings) -> list[Term]:
    """The grid search keeps the prior-independent terms of every validation batch
    (Jacobians, factors or features) and predicts one batch per grid value."""
    table = ESTIMATORS[structure]
    one = table.predictive(pb, subset, replace(st, posterior_built=False))
    if not st.n_val:
        return one
    kept = table.kept(pb, subset, st)
    others = max(1, math.ceil(st.n_val / pb.batch)) - 1
    return [
        *one,
        Term(f"{kept.name} of the other validation batches", others * kept.nbytes),
    ]


def _marglik_training(
    pb: Problem, subset: str, structure: str, st: Settings
) -> list[Term]:
    """marglik_training: MAP steps (activations, gradients, Adam's two moments)
    and, every few epochs, a fit while the previous curvature is held, then the
    evidence's steps (a dense curvature's spectrum in float64)."""
    P_all, s, B = pb.n_params, pb.itemsize, pb.batch
    state = Term("optimizer state", 2 * P_all * s, "(Adam's moments)")
    grads = Term("gradients", P_all * s)
    best = Term("best weights", P_all * s, "(a copy of the state)")
    step = [state, grads, Term("activations", B * pb.profile.graph, f"(batch {B})")]
    fitted = ESTIMATORS[structure].fit(pb, subset, st)
    held = max(fitted, key=lambda t: t.nbytes)
    previous = replace(held, name=f"previous {held.name}")
    phases = [step, [state, best, previous, *fitted]]
    if structure == "full":
        P = _treated(pb, subset, st)
        spectrum = Term("spectrum", 2 * P * P * 8, f"(two {P:,} x {P:,}, float64)")
        phases.append([state, best, held, spectrum])
    return _peak(*phases)


# -- from a Laplace object ---------------------------------------------------------
def _structure_of(la) -> tuple[str, str] | None:
    """``(subset, structure)`` of ``la`` for the table, None where no estimator
    applies (ELLA and VaLLA have their own)."""
    from laplace.functional.scalable import ScalableFunctionalLaplace

    key = getattr(type(la), "key", None)
    if key is None or isinstance(la, ScalableFunctionalLaplace):
        return None
    return key if key[1] in ESTIMATORS else None


def _columns(la, f1: Tensor) -> int:
    """``K``: the columns of the output-Hessian factor the backend backpropagates."""
    from laplace.curvature.curvature import EFInterface

    if issubclass(la._backend_cls, EFInterface):
        return 1
    if la.backend_kwargs.get("stochastic"):
        return int(la.backend_kwargs.get("num_samples", 1))
    try:
        return int(la.lik.hessian_sqrt(f1.detach()).shape[-1])
    except (NotImplementedError, RuntimeError, ValueError):
        return f1.shape[-1]


def _inner_model(la) -> nn.Module:
    from laplace.utils.feature_extractor import FeatureExtractor

    model = la.model
    return model.model if isinstance(model, FeatureExtractor) else model


def problem_of(la, x1: Any, batch: int, n_data: int | None = None) -> Problem:
    """The ``Problem`` of ``la`` for batches of ``batch`` inputs like ``x1`` (one
    example, on the model's device)."""
    model = _inner_model(la)
    params = [p for p in model.parameters() if p.requires_grad]
    pr = profile(model, x1, params)
    from laplace.utils.feature_extractor import FeatureExtractor

    layer = la.model.last_layer if isinstance(la.model, FeatureExtractor) else None
    if layer is not None:  # the last-layer Laplace's own layer
        pr = replace(
            pr,
            last_layer=(layer.out_features, layer.in_features, layer.bias is not None),
        )
    f1 = torch.zeros(1, pr.outputs, dtype=la._dtype, device=la._device)
    dtype = la._dtype
    blocks = _PROFILES[model].get(("blocks", *(id(p) for p in params)))
    if blocks is None:
        blocks = kron_blocks(model, params)
        _PROFILES[model][("blocks", *(id(p) for p in params))] = blocks
    return Problem(
        shapes=tuple(tuple(p.shape) for p in params),
        blocks=blocks,
        profile=pr,
        batch=batch,
        outputs=pr.outputs,
        columns=_columns(la, f1),
        itemsize=dtype.itemsize,
        work_itemsize=getattr(la, "_curvature_dtype", linalg_dtype(dtype)).itemsize,
        n_data=n_data,
    )


def settings_of(la, **kwargs: Any) -> Settings:
    """The ``Settings`` read from ``la`` (rank, subnetwork size, subset size, ...)."""
    subnet = getattr(la, "n_params_subnet", None)
    spec = getattr(la, "low_rank", None)  # KronLaplace's low_rank_factors
    return Settings(
        rank=getattr(la, "rank", 20),
        low_rank=None if spec is None else (spec.rank, spec.threshold),
        subnet_size=subnet if subnet else None,
        n_subset=getattr(la, "n_subset", None),
        per_output=la.sigma_noise.ndim == 1,
        posterior_built=getattr(la, "_posterior_cache", None) is not None,
        **kwargs,
    )


# -- peeking at a loader -----------------------------------------------------------
def first_example(
    loader: Any, dict_key_x: str, dict_key_y: str
) -> tuple[Any, int, Any]:
    """``(x1, B, loader)``: the inputs of one example of the loader's first batch,
    the size ``B`` of that batch, and the loader to use from now on.

    A DataLoader over a map-style dataset is not iterated: its first item is
    collated alone. Another iterable is iterated once with torch's random state
    restored afterwards; a one-shot iterator gets its first batch put back (the
    returned loader is then an ``itertools.chain``).
    """
    dataset = getattr(loader, "dataset", None)
    size = getattr(loader, "batch_size", None)
    collate = getattr(loader, "collate_fn", None)
    if size and collate is not None and hasattr(dataset, "__getitem__"):
        try:
            batch = collate([dataset[0]])
            x, _ = split_batch(batch, dict_key_x, dict_key_y)
            return x, min(size, len(dataset)), loader
        except Exception:  # noqa: BLE001 - an unusual dataset: iterate instead
            pass
    if iter(loader) is loader:
        try:
            first = next(loader)
        except StopIteration:
            return None, 0, iter(())
        loader = itertools.chain([first], loader)
    else:
        with torch.random.fork_rng(devices=[]):
            first = next(iter(loader), None)
        if first is None:
            return None, 0, loader
    x, _ = split_batch(first, dict_key_x, dict_key_y)
    B = input_tensor(x, dict_key_x).shape[0]
    return select_rows(x, torch.tensor([0]), B), B, loader


def _dataset_size(loader: Any) -> int | None:
    try:
        return len(loader.dataset) or None
    except (AttributeError, TypeError):
        return None


def _one_example(x: Any, la) -> tuple[Any, int]:
    B = input_tensor(x, la.dict_key_x).shape[0]
    index = torch.tensor([0], device=input_tensor(x, la.dict_key_x).device)
    return select_rows(x, index, B), B


# -- the checks the library runs -----------------------------------------------------
def check(la, operation: str, x1: Any, batch: int, **settings: Any) -> None:
    """Raise ``MemoryPlanError`` if ``operation`` of ``la`` on batches of ``batch``
    inputs like ``x1`` would add more than ``available_memory``; nothing when the
    checks are off or no estimator applies."""
    key = _structure_of(la)
    if key is None or x1 is None or not checks_enabled() or not la._bound:
        return
    available = available_memory(la._device)
    if available.nbytes is None:
        return
    x1 = to_device(x1, la._device)
    try:
        pb = problem_of(la, x1, batch, settings.pop("n_data", None))
    except Exception as err:  # noqa: BLE001 - a plan must not break a workload
        warnings.warn(
            f"The memory plan of {operation} was skipped: one example through the "
            f"model failed ({type(err).__name__}: {err}). Turn the plans off with "
            "laplace.utils.memory_limit('off').",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    st = settings_of(la, **settings)
    est = estimate(operation, *key, pb, st)
    if est.nbytes <= available.nbytes:
        return
    alternatives = _alternatives(operation, key, pb, st, available.nbytes)
    raise MemoryPlanError(
        _message(la, est, available, alternatives), est, available, alternatives
    )


def check_fit(la, train_loader: Any) -> Any:
    """``check`` of ``fit`` on the loader's first batch; returns the loader to
    iterate (a one-shot iterator gets its peeked batch back)."""
    if _structure_of(la) is None or not checks_enabled() or not la._bound:
        return train_loader
    x1, B, train_loader = first_example(train_loader, la.dict_key_x, la.dict_key_y)
    check(la, "fit", x1, B, n_data=_dataset_size(train_loader))
    return train_loader


def check_predictive(la, x: Any, pred_type: Any, joint: bool, n_samples: int) -> None:
    """``check`` of the predictive ``la(x)`` ('glm'/'gp' or 'nn')."""
    if _structure_of(la) is None or not checks_enabled():
        return
    x1, B = _one_example(x, la)
    operation = (
        "nn predictive"
        if str(getattr(pred_type, "value", pred_type)) == "nn"
        else "glm predictive"
    )
    check(la, operation, x1, B, joint=joint, n_samples=n_samples)


def check_gridsearch(la, val_loader: Any, pred_type: Any, n_samples: int) -> None:
    """``check`` of the grid search on ``val_loader`` (its terms kept for all
    validation data)."""
    if _structure_of(la) is None or not checks_enabled():
        return
    x1, B, _ = first_example(val_loader, la.dict_key_x, la.dict_key_y)
    if str(getattr(pred_type, "value", pred_type)) == "nn":
        check(la, "nn predictive", x1, B, n_samples=n_samples)
        return
    check(la, "gridsearch", x1, B, n_val=_dataset_size(val_loader))


def check_marglik_training(la, train_loader: Any) -> None:
    """``check`` of ``marglik_training``: its MAP steps, fits and evidence steps."""
    if _structure_of(la) is None or not checks_enabled():
        return
    x1, B, _ = first_example(train_loader, la.dict_key_x, la.dict_key_y)
    if not la._bound:  # a last layer not found yet: find it on the one example
        la._find_last_layer([(to_device(x1, la._device), None)])
    check(la, "marglik_training", x1, B)


# -- alternatives and the message ----------------------------------------------------
#: the approximations offered instead, in order of preference
_OFFERS = (
    ("all", "kron"),
    ("all", "diag"),
    ("all", "lowrank"),
    ("last_layer", "full"),
    ("last_layer", "kron"),
    ("last_layer", "diag"),
)


def _alternatives(
    operation: str, key: tuple[str, str], pb: Problem, st: Settings, limit: int
) -> list[tuple[str, Estimate]]:
    """Cheaper settings that fit ``limit``: other structures and subsets, a
    subnetwork of the largest size that fits, a smaller batch."""
    found = []
    plain = replace(st, posterior_built=False, per_output=False)
    op = "glm predictive" if operation == "gridsearch" else operation
    for subset, structure in _OFFERS:
        if (subset, structure) == tuple(key) or (
            subset == "last_layer" and pb.profile.last_layer is None
        ):
            continue
        if op == "marglik_training" and structure == "lowrank":
            continue
        est = estimate(op, subset, structure, pb, plain)
        if est.nbytes <= limit:
            label = f"subset_of_weights={subset!r}, hessian_structure={structure!r}"
            found.append((label, est))
    if op != "marglik_training":
        S = _largest(
            lambda n: estimate(
                op, "subnetwork", "full", pb, replace(plain, subnet_size=n)
            ),
            limit,
            pb.n_params,
        )
        if S:
            label = (
                f"subset_of_weights='subnetwork', hessian_structure='full' with at "
                f"most {S:,} weights (e.g. LargestMagnitudeSubnetMask(model, "
                f"n_params_subnet={S}))"
            )
            found.append(
                (
                    label,
                    estimate(
                        op, "subnetwork", "full", pb, replace(plain, subnet_size=S)
                    ),
                )
            )
    B = _largest(
        lambda b: estimate(operation, *key, replace(pb, batch=b), st),
        limit,
        pb.batch - 1,
    )
    if B:
        found.append(
            (
                f"a batch size of {B} (now {pb.batch})",
                estimate(operation, *key, replace(pb, batch=B), st),
            )
        )
    return found


def _largest(cost: Callable[[int], Estimate], limit: int, upper: int) -> int | None:
    """The largest ``n`` in ``[1, upper]`` with ``cost(n).nbytes <= limit`` (the
    estimates grow with ``n``), or None."""
    if upper < 1 or cost(1).nbytes > limit:
        return None
    lo, hi = 1, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid).nbytes <= limit else (lo, mid - 1)
    return lo


def _message(la, est: Estimate, available: Available, alternatives) -> str:
    what = {
        "fit": f"{type(la).__name__}.fit",
        "glm predictive": f"The GLM predictive of {type(la).__name__}",
        "nn predictive": f"The nn predictive of {type(la).__name__}",
        "gridsearch": f"{type(la).__name__}.optimize_prior_precision(method="
        "'gridsearch')",
        "marglik_training": f"marglik_training with {type(la).__name__}",
    }[est.operation]
    lines = [
        f"{what} would need about {format_bytes(est.nbytes)} of memory (batch of "
        f"{est.batch_size}); {format_bytes(available.nbytes)} are available "
        f"({available.source}, {la._device}). Dominant term: {est.dominant}.",
    ]
    if alternatives:
        lines.append("Cheaper settings that fit (estimated for this model and batch):")
        lines += [f"  - {label}: {format_bytes(e.nbytes)}" for label, e in alternatives]
    else:
        lines.append(
            "No cheaper setting fits: none of Kron, Diag, LowRank, the last layer, "
            "a subnetwork or a smaller batch."
        )
    lines.append(
        "Set another limit with laplace.utils.memory_limit('64GB') or "
        f"${ENV_VAR}=64GB, or turn the check off with memory_limit('off')."
    )
    return "\n".join(lines)


# -- the plan for a model ------------------------------------------------------------
def memory_plan(
    model: nn.Module,
    likelihood: Any,
    batch: Any,
    *,
    subnetwork_size: int | None = None,
    n_subset: int | None = None,
    rank: int = 20,
    backend: type | None = None,
    backend_kwargs: dict[str, Any] | None = None,
    dict_key_x: str = "input_ids",
    dict_key_y: str = "labels",
    n_data: int | None = None,
    verbose: bool = True,
) -> list[dict[str, Any]]:
    """Estimate ``fit`` and the GLM predictive of every structure and subset of
    weights for ``model`` and a batch like ``batch``, and print them as a table.

    Parameters
    ----------
    model : torch.nn.Module
    likelihood : str or laplace.likelihood.OutputLikelihood
    batch : torch.Tensor, mapping, ``(x, y)`` or DataLoader
        the inputs of one batch (its leading dimension is the batch size ``B``),
        a batch ``(x, y)``, or a loader (its first batch is peeked at).
    subnetwork_size : int, optional
        the size ``S`` of the 'subnetwork' rows (default: a tenth of the weights).
    n_subset : int, optional
        ``M`` of the 'gp' rows (default: ``B``).
    rank : int, default=20
        the rank of 'lowrank'.
    backend, backend_kwargs, dict_key_x, dict_key_y
        as for ``laplace.Laplace``.
    n_data : int, optional
        training data (not needed by the estimates; shown for reference).
    verbose : bool, default=True
        print the table.

    Returns
    -------
    rows : list of dict
        one per approximation: ``subset``, ``structure``, ``fit`` and
        ``predictive`` (``Estimate``), ``dominant`` (the fit's largest ``Term``),
        ``fits`` (bool, or None without a known limit), ``available``.
    """
    from laplace.baselaplace import BaseLaplace

    if isinstance(batch, (Tensor, Mapping)):
        x = batch
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        x = split_batch(batch, dict_key_x, dict_key_y)[0]
    else:
        x1, B, _ = first_example(batch, dict_key_x, dict_key_y)
        x = None
    probe = BaseLaplace(
        model,
        likelihood,
        dict_key_x=dict_key_x,
        dict_key_y=dict_key_y,
        backend=backend,
        backend_kwargs=backend_kwargs,
    )
    if x is not None:
        x1, B = _one_example(x, probe)
    x1 = to_device(x1, probe._device)
    pb = problem_of(probe, x1, B, n_data)
    S = subnetwork_size or max(1, pb.n_params // 10)
    st = Settings(rank=rank, subnet_size=S, n_subset=n_subset or B)
    available = available_memory(probe._device)
    rows = []
    offers = [("all", s) for s in ("full", "kron", "diag", "lowrank", "gp")]
    offers += [("last_layer", s) for s in ("full", "kron", "diag", "gp")]
    offers += [("subnetwork", s) for s in ("full", "diag")]
    for subset, structure in offers:
        if subset == "last_layer" and pb.profile.last_layer is None:
            continue
        fit = estimate("fit", subset, structure, pb, st)
        pred = estimate("glm predictive", subset, structure, pb, st)
        peak = max(fit.nbytes, pred.nbytes)
        rows.append(
            {
                "subset": subset,
                "structure": structure,
                "fit": fit,
                "predictive": pred,
                "dominant": fit.dominant,
                "fits": None if available.nbytes is None else peak <= available.nbytes,
                "available": available,
            }
        )
    if verbose:
        print(format_plan(rows, pb, S))
    return rows


def format_plan(rows: list[dict[str, Any]], pb: Problem, S: int) -> str:
    """The rows of ``memory_plan`` as a markdown table."""
    available = rows[0]["available"] if rows else Available(None, "")
    lines = [
        f"Memory plan: {pb.n_params:,} weights, batch {pb.batch}, {pb.outputs} "
        f"outputs, {pb.columns} backpropagated columns; available "
        f"{format_bytes(available.nbytes)} ({available.source}).",
        "",
        "| subset | structure | fit | predictive | dominant term of fit | fits |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        subset = r["subset"] + (f" (S = {S:,})" if r["subset"] == "subnetwork" else "")
        fits = {True: "yes", False: "**no**", None: "?"}[r["fits"]]
        lines.append(
            f"| {subset} | {r['structure']} | {format_bytes(r['fit'].nbytes)} | "
            f"{format_bytes(r['predictive'].nbytes)} | {r['dominant']} | {fits} |"
        )
    return "\n".join(lines)


__all__ = [
    "ENV_VAR",
    "ESTIMATORS",
    "Available",
    "Estimate",
    "MemoryPlanError",
    "Problem",
    "Profile",
    "Settings",
    "Term",
    "available_memory",
    "checks_enabled",
    "estimate",
    "format_bytes",
    "memory_limit",
    "memory_plan",
    "parse_bytes",
    "profile",
]
