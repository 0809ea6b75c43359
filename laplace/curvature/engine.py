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

Every structure is then a pure function of the terms, written once here:
``vectors`` (the ``v_nk``, optionally of selected entries), ``diagonal``,
``symmetric_gram`` (``V^T V``, the dense matrix), ``kron`` (KFAC-expand or
-reduce), and the Jacobian factors of the GLM predictive and the GP kernel
(``M = I``).

Rows. A rule sees the leading dimension of its module's input as its rows. When a
module sees the batch elsewhere (sequence-first transformers, ``(T, N, d)``) or
flattened (``(N K, d)``), the engine finds where, by backpropagating the first and
the last example alone, and brings the terms to ``N`` examples.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from laplace.curvature import rules, sequence_rules
from laplace.curvature.rules import Fallback, Outer, Record, Rule, Term, Vectors

Tensor = torch.Tensor
FactorFn = Callable[[Tensor], Tensor]

#: a parameter without Kronecker structure gets a dense block up to this size,
#: its diagonal above
DENSE_BLOCK_LIMIT = 4096
#: entries of one chunk of per-example gradients formed at a time
_CHUNK_ENTRIES = 1 << 24
#: KFAC backpropagates as many columns at once as keep their gradients below this
#: many entries (one column at a time for large models: memory; all at once for
#: small ones: speed)
_COLUMN_ENTRIES = 1 << 24
KFAC_APPROXIMATIONS = ("expand", "reduce")


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
    params: list[nn.Parameter]
    names: dict[int, str] = field(default_factory=dict)


def plan(model: nn.Module, params: Sequence[nn.Parameter]) -> Plan:
    """The modules to hook and their rules, for the parameters ``params``.

    Every module whose rule covers one of ``params`` is hooked (a parameter shared
    by several modules, e.g. a weight-tied embedding and head, by all of them);
    parameters no rule covers are served by ``Fallback`` on the modules holding
    them directly.
    """
    wanted = {id(p) for p in params}
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
        mine = {n: p for n, p in rule.parameters(module).items() if id(p) in wanted}
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
            if id(p) in wanted and id(p) not in covered
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
    return Plan(entries, list(params), names)


# -- running the model --------------------------------------------------------------
@dataclass
class Tape:
    """The outputs ``f`` and the terms of every parameter, ``terms[id(p)]``."""

    f: Tensor
    params: list[nn.Parameter]
    terms: dict[int, list[Term]]
    K: int

    @property
    def N(self) -> int:
        return self.f.shape[0]

    def of(self, p: nn.Parameter) -> list[Term]:
        return self.terms.get(id(p), [])


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

    for i, entry in enumerate(the_plan.entries):

        def hook(module, args, kwargs, output, i=i, entry=entry):
            if busy[0]:
                return None
            busy[0] = True
            try:
                record, new_output = entry.rule.forward(module, args, kwargs, output)
            finally:
                busy[0] = False
            if (
                new_output is None
                and n_examples > 1
                and record.rows == 1
                and entry.rule.positionwise(module)
                and isinstance(output, Tensor)
                and output.ndim > 1
                and output.shape[0] == 1
            ):
                record, new_output = _per_example_copy(record, output, n_examples)
            if not keep_graph:
                record.data = _detached(record.data)
            records[i].append(record)
            return new_output

        handles.append(entry.module.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.enable_grad():
            f = model(x)
    finally:
        for h in handles:
            h.remove()
    if not isinstance(f, Tensor):
        raise TypeError(
            f"The model must return a tensor of outputs; it returned a "
            f"{type(f).__name__}. Wrap it so that forward returns the logits."
        )
    calls = [(e, r) for e, recs in zip(the_plan.entries, records) for r in recs]
    taps = [t for _, r in calls for t in r.taps]
    layouts = _layouts(f, calls, taps, f.shape[0]) if taps else []
    return Recording(f, list(params), calls, layouts, keep_graph, model)


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


def _per_example_copy(record: Record, output: Tensor, N: int):
    """A positionwise module applied once for the whole batch (e.g. a position
    embedding of ``position_ids`` ``(1, T)``, broadcast over the examples): its
    output is passed on as ``N`` copies, so that each example's gradient is
    backpropagated apart; the record's input is repeated alike."""
    copies = output.expand(N, *output.shape[1:]).clone()
    data = record.data
    if isinstance(data, Tensor) and data.ndim > 0 and data.shape[0] == 1:
        data = data.expand(N, *data.shape[1:])
    return Record([copies], data, N), copies


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


def _layouts(f: Tensor, calls, taps, N: int) -> list[_Layout]:
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
        _probe(f, calls, taps, unsure, out, N)
    return out


def _probe(f, calls, taps, unsure, out, N) -> None:
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
        if dim is None:
            raise ValueError(
                f"The curvature engine cannot tell which entries of the output of "
                f"module {entry.name!r} ({type(entry.module).__name__}, shape "
                f"{tuple(record.taps[0].shape)}) belong to which of the {N} examples: "
                "each example's outputs must depend on its own rows only (a batch "
                "dimension, possibly flattened with others). Put the model in eval "
                "mode (batch statistics couple examples) or freeze this module."
            )
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
    return Outer(a, g, term.g_rows, index, term.n_a)


def _detached(data):
    return torch.utils._pytree.tree_map(
        lambda t: t.detach() if isinstance(t, Tensor) else t, data
    )


def _detached_term(term: Term) -> Term:
    if isinstance(term, Vectors):
        return Vectors(term.V.detach())
    a = None if term.a is None else term.a.detach()
    return Outer(a, term.g.detach(), term.g_rows, term.index, term.n_a)


# -- structures from the terms -----------------------------------------------------
def term_vectors(term: Term, numel: int) -> Tensor:
    """Per-example gradients ``(K, N, numel)`` of one term."""
    if isinstance(term, Vectors):
        return term.V
    K, N = term.g.shape[:2]
    if term.index is not None:
        rows, cols = term.view
        V = term.g.new_zeros(K, N, term.n_a, term.g.shape[-1])
        idx = term.index[None, :, :, None].expand(K, -1, -1, term.g.shape[-1])
        V.scatter_add_(2, idx, term.g)
        return V.reshape(K, N, numel)
    if term.a.shape[-1] == 1:  # a bias (a = 1): a sum over positions, batched
        V = term.a.transpose(1, 2)[None] @ term.g  # (K, N, 1, n_g)
    elif term.g_rows:
        V = torch.einsum("knto,nti->knoi", term.g, term.a)
    else:
        V = torch.einsum("nti,knto->knio", term.a, term.g)
    return V.reshape(K, N, numel)


def param_vectors(tape: Tape, p: nn.Parameter, rows: slice = slice(None)) -> Tensor:
    """Per-example gradients ``(K, N, numel)`` of ``p``: the sum of its terms."""
    terms = [t.rows(rows) for t in tape.of(p)]
    if not terms:
        n = len(range(*rows.indices(tape.N)))
        return tape.f.new_zeros(tape.K, n, p.numel())
    V = term_vectors(terms[0], p.numel())
    for t in terms[1:]:
        V = V + term_vectors(t, p.numel())
    return V


def vectors(tape: Tape, indices: Tensor | None = None) -> Tensor:
    """``V`` ``(K, N, P)``: the ``v_nk`` of all parameters in order, or
    ``(K, N, len(indices))`` of the entries ``indices`` only."""
    if indices is None:
        return torch.cat([param_vectors(tape, p) for p in tape.params], dim=-1)
    return selected_vectors(tape, index_groups(tape.params, indices), len(indices))


def selected_vectors(tape: Tape, groups, n: int) -> Tensor:
    """``V`` ``(K, N, n)`` of the entries named by ``groups`` (``index_groups``)."""
    out = None
    for p, local, cols in groups:
        part = _selected(tape, p, local)
        if out is None:
            out = part.new_zeros(part.shape[0], part.shape[1], n)
        out[:, :, cols] = part
    return out


def _selected(tape: Tape, p: nn.Parameter, local: Tensor) -> Tensor:
    """``V[..., local]`` of ``p`` without forming all of its per-example entries."""
    total = None
    for term in tape.of(p):
        if isinstance(term, Vectors) or term.index is not None:
            part = term_vectors(term, p.numel())[..., local]
        else:
            rows, cols = term.view
            r, c = local // cols, local % cols
            gi, ai = (r, c) if term.g_rows else (c, r)
            part = torch.einsum("knts,nts->kns", term.g[..., gi], term.a[..., ai])
        total = part if total is None else total + part
    if total is None:
        return tape.f.new_zeros(tape.K, tape.N, len(local))
    return total


def index_groups(params, indices):
    """``[(param, positions in it, columns of the result)]`` for ``indices`` into
    the concatenated parameters."""
    indices = torch.as_tensor(indices)
    columns = torch.arange(len(indices), device=indices.device)
    groups, start = [], 0
    for p in params:
        stop = start + p.numel()
        mask = (indices >= start) & (indices < stop)
        if bool(mask.any()):
            groups.append((p, indices[mask] - start, columns[mask]))
        start = stop
    return groups


def diagonal(tape: Tape) -> Tensor:
    """``diag(sum_nk v_nk v_nk^T)`` ``(P,)``."""
    return torch.cat([param_diagonal(tape, p) for p in tape.params])


def param_diagonal(tape: Tape, p: nn.Parameter) -> Tensor:
    terms = tape.of(p)
    if len(terms) == 1 and isinstance(terms[0], Outer) and terms[0].positions == 1:
        term = terms[0]
        s = term.g[:, :, 0].square().sum(0)  # (N, n_g)
        a2 = term.dense_a()[:, 0].square()  # (N, n_a)
        d = s.T @ a2 if term.g_rows else a2.T @ s
        return d.flatten()
    if len(terms) == 1 and isinstance(terms[0], Vectors):
        return terms[0].V.square().sum((0, 1))
    total = tape.f.new_zeros(p.numel())
    for rows in _chunks(tape, p.numel()):
        total += param_vectors(tape, p, rows).square().sum((0, 1))
    return total


def _chunks(tape: Tape, numel: int):
    step = max(1, _CHUNK_ENTRIES // max(1, tape.K * numel))
    for start in range(0, tape.N, step):
        yield slice(start, min(start + step, tape.N))


def symmetric_gram(V: Tensor, block: int = 512) -> Tensor:
    """``V^T V`` ``(P, P)`` for ``V`` ``(M, P)`` at about half the cost of ``V.T @ V``:
    only the blocks on and below the diagonal are multiplied, the rest copied."""
    P = V.shape[1]
    if P <= block:
        return V.T @ V
    H = V.new_empty(P, P)
    for start in range(0, P, block):
        stop = min(start + block, P)
        H[start:stop, :stop] = V[:, start:stop].T @ V[:, :stop]
    for start in range(block, P, block):
        stop = min(start + block, P)
        H[:start, start:stop] = H[start:stop, :start].T
    return H


# -- matrix-free products ----------------------------------------------------------
def gram_matmat(tape: Tape, X: Tensor) -> Tensor:
    """``sum_nk v_nk v_nk^T X`` ``(P, b)`` for ``X`` ``(P, b)``, from the terms,
    without forming the ``v_nk``: ``U = V X`` ``(K, N, b)`` then ``V^T U``."""
    pieces = X.split([p.numel() for p in tape.params])
    U = None
    for p, Xp in zip(tape.params, pieces, strict=True):
        for term in tape.of(p):
            part = _term_apply(term, Xp)
            U = part if U is None else U + part
    if U is None:
        return torch.zeros_like(X)
    out = []
    for p in tape.params:
        total = X.new_zeros(p.numel(), X.shape[1])
        for term in tape.of(p):
            total += _term_apply_transposed(term, U)
        out.append(total)
    return torch.cat(out)


def _term_apply(term: Term, Xp: Tensor) -> Tensor:
    """``V X`` ``(K, N, b)`` of one term, ``Xp`` ``(numel, b)``."""
    if isinstance(term, Vectors):
        return term.V @ Xp
    R, C = term.view
    W = Xp.T.reshape(-1, R, C)  # (b, R, C)
    if not term.g_rows:
        W = W.transpose(1, 2)  # (b, n_g, n_a)
    if term.index is not None:
        Wa = W.permute(0, 2, 1)[:, term.index]  # (b, N, T, n_g): rows picked by id
        return torch.einsum("knto,bnto->knb", term.g, Wa)
    Wa = torch.einsum("boi,nti->bnto", W, term.a)
    return torch.einsum("knto,bnto->knb", term.g, Wa)


def _term_apply_transposed(term: Term, U: Tensor) -> Tensor:
    """``V^T U`` ``(numel, b)`` of one term, ``U`` ``(K, N, b)``."""
    if isinstance(term, Vectors):
        return torch.einsum("knp,knb->pb", term.V, U)
    gU = torch.einsum("knto,knb->bnto", term.g, U)  # (b, N, T, n_g)
    if term.index is not None:
        b = U.shape[-1]
        out = U.new_zeros(b, term.n_a, term.g.shape[-1])
        idx = term.index.reshape(1, -1, 1).expand(b, -1, term.g.shape[-1])
        out.scatter_add_(1, idx, gU.reshape(b, -1, term.g.shape[-1]))
        M = out  # (b, n_a, n_g): the (n_a, n_g) view of an embedding
    else:
        M = torch.einsum("bnto,nti->boi", gU, term.a)  # (b, n_g, n_a)
        if not term.g_rows:
            M = M.transpose(1, 2)
    return M.reshape(M.shape[0], -1).T


# -- Kronecker factors ----------------------------------------------------------------
def kron_blocks(tape: Tape, N_data: int, approx: str = "expand") -> list[list[Tensor]]:
    """The blocks of ``laplace.utils.matrix.Kron`` for one batch, in parameter order.

    A parameter with ``Outer`` terms of one matrix view ``(R, C)`` gets the pair
    ``[L, R_sum / (K T N_data)]`` (a vector parameter ``[L]``), ``L`` and ``R_sum`` the
    sums over all terms ``i = (k, n, t)`` of the outer products of the row-side and
    column-side vectors (a forward-side vector counted once per column ``k``), and
    ``T`` the positions per example over all the parameter's uses. For one use this
    is ``(sum g g^T) (x) (mean a a^T)``; over the ``N_data`` points of a data set the
    second factor is averaged, the first summed (KFAC-expand). With
    ``approx='reduce'`` each use first sums ``g`` and averages ``a`` over its
    positions (KFAC-reduce). A one-hot forward side (an embedding) gives a diagonal
    factor (a 1-D tensor: the token counts). Any other parameter gets its exact
    dense block ``sum v v^T`` up to ``DENSE_BLOCK_LIMIT`` entries, else its exact
    diagonal (a 1-D block).
    """
    if approx not in KFAC_APPROXIMATIONS:
        raise ValueError(
            f"kfac_approx must be one of {KFAC_APPROXIMATIONS}; got {approx!r}."
        )
    grams: dict = {}  # a weight's output-side factor serves its bias too
    return [param_kron(tape, p, N_data, approx, grams) for p in tape.params]


def kron_by_columns(
    recording: Recording,
    M: Tensor,
    N_data: int,
    approx: str = "expand",
    into: list[list[Tensor]] | None = None,
) -> list[list[Tensor]]:
    """``kron_blocks`` of all columns of ``M`` ``(N, C, K)``, as many columns per
    backward pass as keep their gradients below ``_COLUMN_ENTRIES`` entries (one at a
    time for a large model), added
    block by block ``into`` the blocks of an accumulating ``Kron`` (in place) when
    given.

    The blocks of the chunks of ``c`` columns add factor by factor (each chunk counts
    its forward side ``c`` times, so that the sums are those of ``kron_blocks`` over
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
            block = param_kron(tape, p, N_data, approx, grams)
            if len(block) == 2 and cols.shape[-1] != K:
                block[1].mul_(cols.shape[-1] / K)  # a fresh tensor (_kron_pair)
            if total is None:
                column.append(block)
            else:
                for acc, part in zip(total[i], block, strict=True):
                    acc.add_(part)
        if total is None:
            total = column
        del tape, grams
    return total if total is not None else []


def param_kron(tape: Tape, p: nn.Parameter, N_data: int, approx: str, grams=None):
    grams = {} if grams is None else grams
    terms = tape.of(p)
    outer = [t for t in terms if isinstance(t, Outer)]
    views = {t.view for t in outer}
    if terms and len(outer) == len(terms) and len(views) == 1:
        (view,) = views
        if p.ndim == 1 and view[1] == 1 and all(t.g_rows for t in outer):
            return [_side_sum(outer, tape.K, "g", approx, grams)]
        return _kron_pair(outer, tape.K, N_data, approx, grams)
    if p.numel() <= DENSE_BLOCK_LIMIT:
        V = param_vectors(tape, p)
        return [symmetric_gram(V.reshape(-1, V.shape[-1]))]
    return [param_diagonal(tape, p)]


def _reduced(term: Outer, approx: str) -> Outer:
    if approx == "expand" or term.positions == 1 or term.index is not None:
        return term
    return Outer(term.a.mean(1, keepdim=True), term.g.sum(2, keepdim=True), term.g_rows)


def _side_sum(
    terms: list[Outer], K: int, side: str, approx: str, grams: dict
) -> Tensor:
    """``sum_i u_i u_i^T`` over the vectors ``u`` of one side of the terms: the
    backpropagated side (``'g'``) or the forward side (``'a'``, counted ``K`` times);
    a diagonal (1-D) when every forward side is one-hot. ``grams`` remembers the
    products of the backpropagated sides by tensor (a weight and its bias share
    one), handing out copies (the blocks are accumulated in place)."""
    total = None
    for term in terms:
        if side == "g":
            key = (_same_tensor_key(term.g), approx)
            if key not in grams:
                g = _reduced(term, approx).g
                grams[key] = (_gram(g.reshape(-1, g.shape[-1])), term.g)
                part = grams[key][0]
            else:
                part = grams[key][0].clone()
        elif term.index is not None:
            counts = torch.bincount(term.index.flatten(), minlength=term.n_a)
            part = K * counts.to(term.g.dtype)
        else:
            a = _reduced(term, approx).a
            part = _gram(a.reshape(-1, a.shape[-1])).mul_(K)
        if total is None:
            total = part
        elif total.ndim != part.ndim:
            total = _as_matrix(total) + _as_matrix(part)
        else:
            total = total + part
    return total


def _same_tensor_key(t: Tensor) -> tuple:
    """Equal for views of the same memory with the same layout (a weight's and its
    bias's ``g`` are detached separately)."""
    return (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


def _gram(V: Tensor) -> Tensor:
    """``V^T V`` for a factor: one product up to 1,024 columns (faster than blocks),
    the lower blocks only above."""
    return V.T @ V if V.shape[1] <= 1024 else symmetric_gram(V)


def _as_matrix(F: Tensor) -> Tensor:
    return torch.diag(F) if F.ndim == 1 else F


def _kron_pair(terms: list[Outer], K: int, N_data: int, approx: str, grams: dict):
    rows_side = [t for t in terms if t.g_rows]
    cols_side = [t for t in terms if not t.g_rows]
    # the row factor: g of row-g terms, a of the others; the column factor likewise
    left = _mixed_sum(rows_side, "g", cols_side, "a", K, approx, grams)
    right = _mixed_sum(rows_side, "a", cols_side, "g", K, approx, grams)
    T = sum(1 if approx == "reduce" and t.index is None else t.positions for t in terms)
    right = right / (K * T * N_data)  # out of place: the gram may be shared
    return [left, right]


def _mixed_sum(first, side1, second, side2, K, approx, grams):
    parts = []
    if first:
        parts.append(_side_sum(first, K, side1, approx, grams))
    if second:
        parts.append(_side_sum(second, K, side2, approx, grams))
    if len(parts) == 1:
        return parts[0]
    a, b = parts
    if a.ndim != b.ndim:
        return _as_matrix(a) + _as_matrix(b)
    return a + b


# -- Jacobian factors (M = I) ----------------------------------------------------------
def jacobian_factor(tape: Tape, p: nn.Parameter):
    """The Jacobian of ``p`` for the GLM predictive: ``(a, g)`` (view ``(out, in)``),
    ``(a, g, True)`` (view ``(in, out)``) for one linear use, else ``(None, J)``
    with ``J`` ``(C, N, numel)`` (see ``backprop_factor.jacobian_factors``)."""
    terms = tape.of(p)
    if (
        len(terms) == 1
        and isinstance(terms[0], Outer)
        and terms[0].index is None
        and p.ndim >= 2
    ):
        term = terms[0]
        return (term.a, term.g) if term.g_rows else (term.a, term.g, True)
    return None, param_vectors(tape, p)


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
        stacklevel=3,
    )


__all__ = [
    "DENSE_BLOCK_LIMIT",
    "KFAC_APPROXIMATIONS",
    "Plan",
    "Tape",
    "plan",
    "run",
    "record",
    "backprop",
    "kron_by_columns",
    "vectors",
    "param_vectors",
    "diagonal",
    "symmetric_gram",
    "kron_blocks",
    "structure_table",
    "warn_fallbacks",
]
