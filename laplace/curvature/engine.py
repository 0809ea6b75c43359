r"""The curvature engine: module hooks, one batched backward pass, per-module rules.

The generalized Gauss-Newton matrix, the Monte-Carlo Fisher and the empirical Fisher
of a summed loss are all

$$
    H = \sum_n \sum_k v_{nk} v_{nk}^\top, \qquad v_{nk} = J_n^\top M_n[:, k],
$$

with ``J_n`` the ``(C, P)`` Jacobian of the outputs of datum ``n`` and ``M`` a factor
``(N, C, K)`` of the output Hessian (its square root, sampled gradients, or the loss
gradient). ``run`` computes the per-parameter *terms* of the ``v_nk`` without any
Jacobian and without mapping over the user's model:

1. forward hooks on the modules holding the parameters record what each module's
   rule needs (``laplace.curvature.rules``);
2. one backward pass of the ``K`` columns of ``M`` (batched) gives the gradients
   of the tapped tensors;
3. each rule turns its records into terms (``Outer`` or ``Vectors``).

Every structure is then a pure function of the terms (the ``Tape``), written once in
``laplace.curvature.structures``; this module runs the model (``run``, ``record``,
``backprop``), backpropagates KFAC's columns in chunks (``kron_by_columns``) and says
which rule serves which parameter (``plan``, ``structure_table``).

Rows. A rule sees the leading dimension of its module's input as its rows. When a
module sees the batch elsewhere (sequence-first transformers, ``(T, N, d)``) or
flattened (``(N K, d)``), the engine finds where, by backpropagating the first and
the last example alone, and brings the terms to ``N`` examples.
"""

from __future__ import annotations

import os
import sys
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from laplace.curvature import rules, sequence_rules
from laplace.curvature.rules import Fallback, Outer, Record, Rule, Term, Vectors
from laplace.curvature.structures import DENSE_BLOCK_LIMIT, Tape, param_kron
from laplace.utils.lowrank_factor import LowRankSpec, add_factor_

Tensor = torch.Tensor
FactorFn = Callable[[Tensor], Tensor]

#: KFAC backpropagates as many columns at once as keep their gradients below this
#: many entries (one column at a time for large models: memory; all at once for
#: small ones: speed)
_COLUMN_ENTRIES = 1 << 24


#: the rule table, searched in order (BackPACK-style dispatch); parameters no rule
#: covers get ``rules.Fallback``
RULES: tuple[Rule, ...] = (
    sequence_rules.MultiheadAttentionRule(),
    sequence_rules.LSTMRule(),
    sequence_rules.GRURule(),
    rules.LinearRule(),
    rules.TransposedLinearRule(),
    rules.ConvRule(),
    rules.EmbeddingRule(),
    rules.NormRule(),
)


# -- the plan: which rule serves which parameter -----------------------------------
@dataclass
class Entry:
    """One hooked module: its rule and the parameters it serves."""

    name: str
    module: nn.Module
    rule: Rule
    params: dict[str, nn.Parameter]


@dataclass
class Plan:
    entries: list[Entry]
    names: dict[int, str] = field(default_factory=dict)


def plan(model: nn.Module, params: Sequence[nn.Parameter]) -> Plan:
    """The modules to hook and their rules, for the parameters ``params``.

    Every module whose rule covers one of ``params`` is hooked (a parameter shared
    by several modules, e.g. a weight-tied embedding and head, by all of them);
    parameters no rule covers are served by ``Fallback`` on the modules holding
    them directly. A parameter that a forward pass (``record``) saw used outside
    the modules serving it (``F.linear(h, self.emb.weight)`` for a tied head) is
    served by ``Fallback`` on the model itself: its per-example gradients then come
    from ``torch.func`` over the whole model, the only way to see all its uses.
    """
    wanted = {id(p) for p in params}
    outside = _USED_OUTSIDE.get(model, frozenset())
    entries: list[Entry] = []
    covered: set[int] = set()
    #: children whose parameters a parent's rule serves (MHA's ``out_proj``)
    served_by_parent: set[int] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in served_by_parent:
            continue
        rule = next((r for r in RULES if r.applies(module)), None)
        if rule is None:
            continue
        mine = {
            n: p
            for n, p in rule.parameters(module).items()
            if id(p) in wanted and id(p) not in outside
        }
        for pname in mine:
            if "." in pname:
                child = module.get_submodule(pname.rsplit(".", 1)[0])
                served_by_parent.add(id(child))
        if mine and not any(e.module is module and e.rule is rule for e in entries):
            entries.append(Entry(name, module, rule, mine))
            covered |= {id(p) for p in mine.values()}
    for name, module in model.named_modules(remove_duplicate=False):
        rest = [
            n
            for n, p in module.named_parameters(recurse=False)
            if id(p) in wanted and id(p) not in covered and id(p) not in outside
        ]
        if module is model:  # the weights used outside their modules: the model's
            rest += [
                n
                for n, p in model.named_parameters()
                if id(p) in wanted and id(p) in outside
            ]
        if rest and not any(
            e.module is module and isinstance(e.rule, Fallback) for e in entries
        ):
            rule = Fallback(rest)
            entries.append(Entry(name, module, rule, rule.parameters(module)))
    names = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), pname)
    missing = [p for p in params if id(p) not in names]
    if missing:
        raise ValueError(
            f"{len(missing)} of the parameters are not parameters of the model; "
            "the curvature is taken over parameters of the model only."
        )
    return Plan(entries, names)


# -- running the model --------------------------------------------------------------
@dataclass
class Recording:
    """A forward pass with the rules' records, ready to be backpropagated (once per
    set of columns of ``M``)."""

    f: Tensor
    params: list[nn.Parameter]
    calls: list[tuple[Entry, Record]]
    layouts: list
    keep_graph: bool
    model: nn.Module | None = None

    @property
    def outputs(self) -> Tensor:
        return self.f if self.keep_graph else self.f.detach()


def run(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    x,
    factor_fn: FactorFn,
    keep_graph: bool = False,
    the_plan: Plan | None = None,
) -> Tape:
    """Forward ``x`` with hooks, backpropagate the columns of ``M = factor_fn(f)``
    ``(N, C, K)`` and collect the terms of ``params``.

    With ``keep_graph`` the outputs and terms stay differentiable w.r.t. ``x``
    (for predictives with ``enable_backprop``); otherwise they are detached.
    """
    recording = record(model, params, x, keep_graph, the_plan)
    return backprop(recording, factor_fn(recording.f.detach()))


def record(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    x,
    keep_graph: bool = False,
    the_plan: Plan | None = None,
) -> Recording:
    """The forward pass of ``run``: the outputs and every rule's records."""
    the_plan = the_plan or plan(model, params)
    n_examples = _leading_dimension(x)
    records: list[list[Record]] = [[] for _ in the_plan.entries]
    handles = []
    busy = [False]  # a rule's own recomputation is not recorded
    watch = _UseWatch(the_plan)

    for i, entry in enumerate(the_plan.entries):

        def enter(module, args, kwargs):
            if not busy[0]:
                watch.inside.append(module)

        def hook(module, args, kwargs, output, i=i, entry=entry):
            if busy[0]:
                return None
            busy[0] = True
            try:
                record, new_output = entry.rule.forward(module, args, kwargs, output)
            finally:
                busy[0] = False
                watch.inside.pop()
            if (
                new_output is None
                and n_examples > 1
                and entry.rule.positionwise(module)
                and isinstance(output, Tensor)
            ):
                if record.rows == 1 and output.ndim > 1 and output.shape[0] == 1:
                    record, new_output = _per_example_copy(record, output, n_examples)
                elif tuple(output.shape) in _SHARED.get(module, ()):
                    record, new_output = _per_example_copy(
                        record, output, n_examples, new_dim=True
                    )
            if not keep_graph:
                record.data = _detached(record.data)
            records[i].append(record)
            return new_output

        handles.append(entry.module.register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(entry.module.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.enable_grad(), watch:
            f = model(x)
    finally:
        for h in handles:
            h.remove()
    known = _USED_OUTSIDE.get(model, frozenset())
    if watch.outside - known:  # learnt: plan again, these weights on the model's own
        _USED_OUTSIDE[model] = known | watch.outside
        names = sorted(the_plan.names[i] for i in watch.outside - known)
        warnings.warn(
            f"The model uses {', '.join(names)} outside the module(s) serving "
            "it in the curvature engine (e.g. a head written F.linear(h, "
            "emb.weight)); no rule sees all its uses, so its exact per-example "
            "gradients now come from torch.func over the whole model.",
            stacklevel=_caller_outside_the_library(sys._getframe()),
        )
        return record(model, params, x, keep_graph, plan(model, params))
    if not isinstance(f, Tensor):
        raise TypeError(
            f"The model must return a tensor of outputs; it returned a "
            f"{type(f).__name__}. Wrap it so that forward returns the logits."
        )
    calls = [(e, r) for e, recs in zip(the_plan.entries, records) for r in recs]
    taps = [t for _, r in calls for t in r.taps]
    try:
        layouts = _layouts(f, calls, f.shape[0]) if taps else []
    except _SharedOutput as shared:  # learnt: record again, with per-example copies
        return _record_with_copies(model, params, x, keep_graph, the_plan, f, shared)
    return Recording(f, list(params), calls, layouts, keep_graph, model)


def _record_with_copies(model, params, x, keep_graph, the_plan, f, shared):
    """``record`` again with ``shared``'s output passed on as one copy per example
    (``_SHARED``), refused where the copies do not part the examples or change the
    model's outputs ``f``."""
    _SHARED.setdefault(shared.module, set()).add(shared.shape)
    try:
        again = record(model, params, x, keep_graph, the_plan)
    except _Coupled as err:
        _SHARED[shared.module].discard(shared.shape)
        if err.module is not shared.module:
            raise
        # copies do not part the examples either: they are coupled
        raise _Coupled(shared.name, shared.module, shared.shape, f.shape[0]) from None
    changed = again.f.shape != f.shape
    if not changed and not _same(again.f, f):
        with torch.no_grad():  # unless the model is random (dropout)
            changed = _same(model(x), f)
    if changed:
        _SHARED[shared.module].discard(shared.shape)
        raise ValueError(
            f"Module {shared.name!r} ({type(shared.module).__name__}) computes "
            f"one output of shape {shared.shape} for all {f.shape[0]} examples; "
            "the curvature engine passes it on as one copy per example (shape "
            f"{(f.shape[0], *shared.shape)}) so that their gradients stay apart, "
            "and the model's outputs then change (shape "
            f"{tuple(f.shape)} -> {tuple(again.f.shape)}). Give the module a "
            "batch dimension (e.g. ids of shape (1, T)) or freeze it."
        ) from None
    return again


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(
        a.detach(), b.detach(), rtol=1e-4, atol=1e-6
    )


#: per model, the ids of weights a forward pass used outside the modules serving
#: them (see ``plan``); the model itself is left as it was
_USED_OUTSIDE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _UseWatch(torch.overrides.TorchFunctionMode):
    """Sees every torch function of a forward pass, and notes the planned weights
    that enter the graph outside all of the hooked modules serving them (``inside``:
    the hooked modules running)."""

    def __init__(self, the_plan: Plan) -> None:
        super().__init__()
        self.servers: dict[int, set[int]] = {}
        for e in the_plan.entries:
            for p in e.params.values():
                self.servers.setdefault(id(p), set()).add(id(e.module))
        self.inside: list[nn.Module] = []
        self.outside: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if isinstance(out, Tensor) and out.grad_fn is not None:
            for t in (*args, *kwargs.values()):
                servers = self.servers.get(id(t)) if isinstance(t, Tensor) else None
                if servers is not None and not any(
                    id(m) in servers for m in self.inside
                ):
                    self.outside.add(id(t))
        return out


def backprop(recording: Recording, M: Tensor) -> Tape:
    """The terms of every parameter for the columns of ``M`` ``(N, C, K)``; the
    recording's graph is kept, so that other columns can follow."""
    f, calls, keep_graph = recording.f, recording.calls, recording.keep_graph
    K = M.shape[-1]
    taps = [t for _, r in calls for t in r.taps]
    if not taps:
        return Tape(recording.outputs, recording.params, {}, K)
    grads = _backward(f, taps, M.permute(2, 0, 1), keep_graph, recording.model)
    N = f.shape[0]
    terms: dict[int, list[Term]] = {}
    start = 0
    for (entry, rec), layout in zip(calls, recording.layouts):
        g = grads[start : start + len(rec.taps)]
        start += len(rec.taps)
        if layout.batch_dim:
            rec = _batch_first(rec, layout.batch_dim)
            g = [t.movedim(layout.batch_dim + 1, 1) for t in g]
        for pname, term in entry.rule.terms(entry.module, rec, g).items():
            if pname not in entry.params:
                continue
            if not keep_graph:
                term = _detached_term(term)
            term = _to_examples(term, N, entry)
            terms.setdefault(id(entry.params[pname]), []).append(term)
    return Tape(recording.outputs, recording.params, terms, K)


def _leading_dimension(x) -> int:
    """The number of examples of a batch: the leading dimension of its (first)
    tensor."""
    leaves, _ = torch.utils._pytree.tree_flatten(x)
    for t in leaves:
        if isinstance(t, Tensor) and t.ndim > 0:
            return t.shape[0]
    return 1


def _per_example_copy(record: Record, output: Tensor, N: int, new_dim=False):
    """A positionwise module applied once for the whole batch (e.g. a position
    embedding of ``position_ids`` ``(1, T)``, broadcast over the examples): its
    output is passed on as ``N`` copies, so that each example's gradient is
    backpropagated apart; the record's input is repeated alike. With ``new_dim``
    the output has no batch dimension (ids ``(T,)``, learnt by ``_probe``) and the
    copies get one in front."""
    data = record.data
    if new_dim:
        copies = output.expand(N, *output.shape).clone()
        if isinstance(data, Tensor):
            data = data.expand(N, *data.shape)
        return Record([copies], data, N), copies
    copies = output.expand(N, *output.shape[1:]).clone()
    if isinstance(data, Tensor) and data.ndim > 0 and data.shape[0] == 1:
        data = data.expand(N, *data.shape[1:])
    return Record([copies], data, N), copies


#: positionwise modules seen computing one output for all examples (no batch
#: dimension: a position embedding of ids ``(T,)``), with those outputs' shapes
_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Coupled(ValueError):
    """No dimension of a module's output holds the examples apart."""

    def __init__(self, name: str, module: nn.Module, shape: tuple, N: int) -> None:
        self.module = module
        super().__init__(
            f"The curvature engine cannot tell which entries of the output of "
            f"module {name!r} ({type(module).__name__}, shape {shape}) belong to "
            f"which of the {N} examples: each example's outputs must depend on its "
            "own rows only (a batch dimension, possibly flattened with others). Put "
            "the model in eval mode (batch statistics couple examples) or freeze "
            "this module."
        )


class _SharedOutput(Exception):
    """A positionwise module's output holds no example apart (see ``_SHARED``)."""

    def __init__(self, name: str, module: nn.Module, shape: tuple) -> None:
        super().__init__(name)
        self.name, self.module, self.shape = name, module, shape


#: models whose backward pass has operations without a batching rule (torch falls
#: back to a slow loop, e.g. CPU flash attention): their columns are looped here
_UNBATCHED: weakref.WeakSet = weakref.WeakSet()
_NO_BATCHING_RULE = "we have not yet implemented the batching rule"


def _backward(
    f: Tensor,
    taps: list[Tensor],
    cotangents: Tensor,
    keep_graph: bool,
    model: nn.Module | None = None,
):
    """Gradients ``(K, *tap.shape)`` of ``<f, cotangents[k]>`` w.r.t. every tap
    (one column: a plain backward pass, no batching rules needed)."""
    if cotangents.shape[0] == 1:
        grads = torch.autograd.grad(
            f,
            taps,
            grad_outputs=cotangents[0],
            allow_unused=True,
            retain_graph=True,
            create_graph=keep_graph,
        )
        return [
            t.new_zeros(1, *t.shape) if g is None else g.unsqueeze(0)
            for t, g in zip(taps, grads, strict=True)
        ]
    try:
        if model is not None and model in _UNBATCHED:
            raise _Unbatched
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            grads = torch.autograd.grad(
                f,
                taps,
                grad_outputs=cotangents,
                is_grads_batched=True,
                allow_unused=True,
                retain_graph=True,
                create_graph=keep_graph,
            )
        if model is not None and any(
            _NO_BATCHING_RULE in str(w.message) for w in caught
        ):
            _UNBATCHED.add(model)  # looped from the next call on
    except (RuntimeError, _Unbatched):  # no batching rule: one pass per column
        columns = [
            torch.autograd.grad(
                f,
                taps,
                c,
                allow_unused=True,
                retain_graph=True,
                create_graph=keep_graph,
            )
            for c in cotangents
        ]
        grads = [
            None if col[0] is None else torch.stack(col)
            for col in zip(*columns, strict=True)
        ]
    K = cotangents.shape[0]
    return [
        t.new_zeros(K, *t.shape) if g is None else g
        for t, g in zip(taps, grads, strict=True)
    ]


class _Unbatched(Exception):
    """The columns of this model are backpropagated one by one."""


@dataclass
class _Layout:
    batch_dim: int = 0  # where the examples are in the tapped tensors


#: tapped layouts found by probing, per module and tap shape
_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _layouts(f: Tensor, calls, N: int) -> list[_Layout]:
    """Where each call's tapped tensors hold the examples (dimension 0 unless a
    probe says otherwise: a module applied sequence-first or to flattened rows)."""
    out: list[_Layout] = []
    unsure = []
    for i, (entry, record) in enumerate(calls):
        tap = record.taps[0]
        key = (tuple(tap.shape), N)
        known = _LAYOUTS.get(entry.module, {}).get(key)
        if known is not None:
            out.append(_Layout(known))
        elif tap.shape[0] == N and N not in tuple(tap.shape[1:]):
            out.append(_Layout(0))
        else:
            out.append(_Layout(0))
            unsure.append(i)
    if unsure and N > 1:
        _probe(f, calls, unsure, out, N)
    return out


def _probe(f, calls, unsure, out, N) -> None:
    """Backpropagate the first and the last example alone and find, for each unsure
    call, the dimension of its tap where their gradients live apart."""
    probe = torch.zeros(2, *f.shape, dtype=f.dtype, device=f.device)
    probe[0, 0] = 1.0 + torch.rand(f.shape[1:], dtype=f.dtype, device=f.device)
    probe[1, -1] = 1.0 + torch.rand(f.shape[1:], dtype=f.dtype, device=f.device)
    chosen = [calls[i][1].taps[0] for i in unsure]
    grads = _backward(f, chosen, probe, keep_graph=False)
    for i, g in zip(unsure, grads):
        entry, record = calls[i]
        dim = _batch_dim(g, N)
        shape = tuple(record.taps[0].shape)
        if (
            dim is None
            and entry.rule.positionwise(entry.module)
            and isinstance(record.data, Tensor)
            and shape not in _SHARED.get(entry.module, ())
        ):
            raise _SharedOutput(entry.name, entry.module, shape)
        if dim is None:
            raise _Coupled(entry.name, entry.module, shape, N)
        if dim and not entry.rule.positionwise(entry.module):
            raise ValueError(
                f"Module {entry.name!r} ({type(entry.module).__name__}) sees the "
                f"batch in dimension {dim} of its output; its rule needs the batch "
                "first."
            )
        _LAYOUTS.setdefault(entry.module, {})[(tuple(record.taps[0].shape), N)] = dim
        out[i] = _Layout(dim)


def _batch_dim(g: Tensor, N: int) -> int | None:
    """The dimension of a tap where example 0's gradient (``g[0]``) lives in the
    first of ``N`` equal groups and the last example's (``g[1]``) in the last."""
    for dim in range(g.ndim - 1):
        size = g.shape[dim + 1]
        if size % N:
            continue
        m = size // N
        first, last = g[0].movedim(dim, 0), g[1].movedim(dim, 0)
        if bool(first[m:].ne(0).any()) or bool(last[: size - m].ne(0).any()):
            continue
        return dim
    return None


def _batch_first(record: Record, dim: int) -> Record:
    """A record of a positionwise rule with its batch moved to dimension 0."""
    data = record.data
    if isinstance(data, Tensor):
        data = data.movedim(dim, 0)
    return Record(record.taps, data, record.rows)


def _to_examples(term: Term, N: int, entry: Entry) -> Term:
    """Bring a term over ``L = N m`` rows (flattened items) to ``N`` examples."""
    L = term.g.shape[1] if isinstance(term, Outer) else term.V.shape[1]
    if L == N:
        return term
    if L % N:
        raise ValueError(
            f"Module {entry.name!r} ({type(entry.module).__name__}) treats {L} rows "
            f"as its batch, which do not split into the {N} examples."
        )
    if isinstance(term, Vectors):
        V = term.V
        return Vectors(V.reshape(V.shape[0], N, L // N, V.shape[-1]).sum(2))
    a = None if term.a is None else term.a.reshape(N, -1, term.a.shape[-1])
    g = term.g.reshape(term.g.shape[0], N, -1, term.g.shape[-1])
    index = None if term.index is None else term.index.reshape(N, -1)
    return Outer(a, g, term.g_rows, index, term.n_a, term.skip)


def _detached(data):
    return torch.utils._pytree.tree_map(
        lambda t: t.detach() if isinstance(t, Tensor) else t, data
    )


def _detached_term(term: Term) -> Term:
    if isinstance(term, Vectors):
        return Vectors(term.V.detach())
    a = None if term.a is None else term.a.detach()
    return Outer(a, term.g.detach(), term.g_rows, term.index, term.n_a, term.skip)


# -- KFAC, column by column ----------------------------------------------------------
def kron_by_columns(
    recording: Recording,
    M: Tensor,
    N_data: int,
    approx: str = "expand",
    into: list[list[Tensor]] | None = None,
    low_rank: LowRankSpec | None = None,
) -> list[list[Tensor]]:
    """The Kronecker blocks (``structures.param_kron``) of all columns of ``M``
    ``(N, C, K)``, as many columns per backward pass as keep their gradients below
    ``_COLUMN_ENTRIES`` entries (one at a time for a large model), added block by
    block ``into`` the blocks of an accumulating ``Kron`` (in place) when given.
    With ``low_rank`` the factors it applies to are ``LowRankFactor``s built from
    the side vectors and added by stacking square roots (``add_factor_``): no
    ``(n, n)`` factor is formed.

    The blocks of the chunks of ``c`` columns add factor by factor (each chunk counts
    its forward side ``c`` times, so that the sums are those of ``param_kron`` over
    all columns); the second factor of a pair, divided by ``c T N_data`` per chunk, is
    rescaled by ``c / K``.
    """
    K = M.shape[-1]
    taps = sum(t.numel() for _, r in recording.calls for t in r.taps)
    step = max(1, min(K, _COLUMN_ENTRIES // max(1, taps)))
    total = into
    for k in range(0, K, step):
        cols = M[..., k : k + step]
        tape = backprop(recording, cols)
        grams: dict = {}
        column = []
        for i, p in enumerate(tape.params):
            block = param_kron(tape, p, N_data, approx, grams, low_rank)
            if len(block) == 2 and cols.shape[-1] != K:
                block[1].mul_(cols.shape[-1] / K)  # a fresh tensor (_kron_pair)
            if total is None:
                column.append(block)
            else:
                for acc, part in zip(total[i], block, strict=True):
                    add_factor_(acc, part)
        if total is None:
            total = column
        del tape, grams
    return total if total is not None else []


# -- what each parameter gets, for the user ---------------------------------------
def structure_table(
    model: nn.Module, params: Sequence[nn.Parameter]
) -> list[dict[str, str]]:
    """One row per parameter: its name, the module(s) and rule(s) serving it, and the
    block it gets in a Kronecker-factored curvature."""
    the_plan = plan(model, params)
    rows = []
    for p in params:
        users = [e for e in the_plan.entries if any(q is p for q in e.params.values())]
        rules = sorted({e.rule.name for e in users})
        outer = bool(users) and all(e.rule.produces is Outer for e in users)
        if outer:
            kron = "kronecker" if p.ndim >= 2 else "dense"
        else:
            kron = "dense" if p.numel() <= DENSE_BLOCK_LIMIT else "diagonal"
        rows.append(
            {
                "parameter": the_plan.names.get(id(p), "?"),
                "modules": ", ".join(
                    f"{e.name or '(model)'} ({type(e.module).__name__})" for e in users
                ),
                "rules": ", ".join(rules),
                "kron": kron,
            }
        )
    return rows


def warn_fallbacks(model: nn.Module, params: Sequence[nn.Parameter]) -> None:
    """One warning naming the modules served by ``Fallback`` and what they get."""
    rows = [r for r in structure_table(model, params) if "fallback" in r["rules"]]
    if not rows:
        return
    listing = "; ".join(
        f"{r['parameter']} in {r['modules']}: {r['kron']}" for r in rows
    )
    warnings.warn(
        "The curvature engine has no rule for some modules; their parameters get "
        "exact per-example gradients from torch.func on the module alone, and in a "
        f"Kronecker-factored curvature their exact dense block or diagonal: {listing}.",
        stacklevel=_caller_outside_the_library(sys._getframe()),
    )


def _caller_outside_the_library(frame) -> int:
    """The ``stacklevel`` of a warning issued in ``frame`` that points at the first
    frame outside the ``laplace`` package (the user's code)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


__all__ = [
    "RULES",
    "Plan",
    "Recording",
    "plan",
    "run",
    "record",
    "backprop",
    "kron_by_columns",
    "structure_table",
    "warn_fallbacks",
]
