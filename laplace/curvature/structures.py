r"""Every structure of the curvature as a pure function of the engine's terms.

``laplace.curvature.engine`` runs the model and hands over a ``Tape``: the outputs
and, per parameter, its terms (``Outer`` per-example gradients ``sum_t g_t a_t^T`` or
``Vectors``) of the ``v_nk = J_n^T M_n[:, k]``. From them, each formula written once:

- ``term_vectors`` / ``param_vectors`` / ``vectors`` / ``selected_vectors``: the
  ``v_nk`` (of all entries or of selected ones: subnetworks);
- ``diagonal``: ``diag(sum v v^T)`` without forming the ``v`` where no weight is
  shared;
- ``symmetric_gram``: ``V^T V`` (the dense matrix);
- ``gram_matmat``: matrix-free products ``(sum v v^T) X`` (LowRank's eigensolver);
- ``param_kron``: Kronecker factors, KFAC-expand or -reduce;
- ``jacobian_factor``: the Jacobian factors of the GLM predictive and the GP kernel
  (``M = I``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from laplace.curvature.rules import Outer, Term, Vectors
from laplace.utils.lowrank_factor import LowRankFactor, LowRankSpec, add_factors

Tensor = torch.Tensor

#: a parameter without Kronecker structure gets a dense block up to this size,
#: its diagonal above
DENSE_BLOCK_LIMIT = 4096
#: entries of one chunk of per-example gradients formed at a time
_CHUNK_ENTRIES = 1 << 24
KFAC_APPROXIMATIONS = ("expand", "reduce")


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


# -- per-example gradients -----------------------------------------------------------
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
    if term.a.shape[-1] == 1 and term.positions == 1:  # a bias (a = 1), say
        V = term.g[:, :, 0] * term.a[None, :, 0]
    elif term.a.shape[-1] == 1:  # over positions: one batched sum
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


def vectors(tape: Tape) -> Tensor:
    """``V`` ``(K, N, P)``: the ``v_nk`` of all parameters in order (of selected
    entries only: ``selected_vectors``)."""
    return torch.cat([param_vectors(tape, p) for p in tape.params], dim=-1)


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
def param_kron(
    tape: Tape,
    p: nn.Parameter,
    N_data: int,
    approx: str,
    grams: dict,
    low_rank: LowRankSpec | None = None,
) -> list[Tensor | LowRankFactor]:
    """The block of ``p`` in ``laplace.utils.matrix.Kron`` for one batch (the engine's
    ``kron_by_columns`` runs it over the parameters and chunks of columns).

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
    diagonal (a 1-D block). ``grams`` (a dict, empty at first) remembers the
    products of the backpropagated sides over the parameters of one batch, so that
    a weight and its bias compute theirs once.

    With ``low_rank`` every dense factor (or dense block) of a dimension it applies
    to is built as a ``LowRankFactor`` directly from its side vectors
    (``LowRankSpec.gram``: ``V^T V`` is never formed); diagonal factors stay
    diagonal.
    """
    terms = tape.of(p)
    outer = [t for t in terms if isinstance(t, Outer)]
    views = {t.view for t in outer}
    if terms and len(outer) == len(terms) and len(views) == 1:
        (view,) = views
        if p.ndim == 1 and view[1] == 1 and all(t.g_rows for t in outer):
            return [_side_sum(outer, tape.K, "g", approx, grams, low_rank)]
        return _kron_pair(outer, tape.K, N_data, approx, grams, low_rank)
    if p.numel() <= DENSE_BLOCK_LIMIT:
        V = param_vectors(tape, p)
        return [_gram_of(V.reshape(-1, V.shape[-1]), low_rank, symmetric_gram)]
    return [param_diagonal(tape, p)]


def _gram_of(V: Tensor, low_rank: LowRankSpec | None, dense=None):
    """``V^T V`` of rows ``V`` ``(m, n)``: ``dense(V)`` (default ``_gram``), or a
    ``LowRankFactor`` where ``low_rank`` applies to ``n``."""
    dense = dense or _gram
    return dense(V) if low_rank is None else low_rank.gram(V, dense)


def _reduced(term: Outer, approx: str) -> Outer:
    if approx == "expand" or term.positions == 1 or term.index is not None:
        return term
    return Outer(term.a.mean(1, keepdim=True), term.g.sum(2, keepdim=True), term.g_rows)


def _side_sum(
    terms: list[Outer],
    K: int,
    side: str,
    approx: str,
    grams: dict,
    low_rank: LowRankSpec | None = None,
) -> Tensor | LowRankFactor:
    """``sum_i u_i u_i^T`` over the vectors ``u`` of one side of the terms: the
    backpropagated side (``'g'``) or the forward side (``'a'``, counted ``K`` times);
    a diagonal (1-D) when every forward side is one-hot. ``grams`` remembers the
    products of the backpropagated sides by tensor (a weight and its bias share
    one), handing out copies (the blocks are accumulated in place). With
    ``low_rank``, a ``LowRankFactor`` from the vectors where it applies."""
    total = None
    for term in terms:
        if side == "g":
            key = (same_tensor_key(term.g), approx)
            if key not in grams:
                g = _reduced(term, approx).g
                grams[key] = (_gram_of(g.reshape(-1, g.shape[-1]), low_rank), term.g)
                part = grams[key][0]
            else:
                part = grams[key][0].clone()
        elif term.index is not None:
            counts = torch.bincount(term.index.flatten(), minlength=term.n_a)
            if term.skip is not None:  # the padding row: no gradient, no count
                counts[term.skip] = 0
            part = K * counts.to(term.g.dtype)
        else:
            a = _reduced(term, approx).a
            part = _gram_of(a.reshape(-1, a.shape[-1]), low_rank).mul_(K)
        total = part if total is None else add_factors(total, part)
    return total


def same_tensor_key(t: Tensor) -> tuple:
    """Equal for views of the same memory with the same layout (a weight's and its
    bias's ``g`` are detached separately)."""
    return (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


def _gram(V: Tensor) -> Tensor:
    """``V^T V`` for a factor: one product up to 1,024 columns (faster than blocks),
    the lower blocks only above."""
    return V.T @ V if V.shape[1] <= 1024 else symmetric_gram(V)


def _kron_pair(
    terms: list[Outer],
    K: int,
    N_data: int,
    approx: str,
    grams: dict,
    low_rank: LowRankSpec | None = None,
):
    rows_side = [t for t in terms if t.g_rows]
    cols_side = [t for t in terms if not t.g_rows]
    # the row factor: g of row-g terms, a of the others; the column factor likewise
    left = _mixed_sum(rows_side, "g", cols_side, "a", K, approx, grams, low_rank)
    right = _mixed_sum(rows_side, "a", cols_side, "g", K, approx, grams, low_rank)
    T = sum(1 if approx == "reduce" and t.index is None else t.positions for t in terms)
    right = right / (K * T * N_data)  # out of place: the gram may be shared
    return [left, right]


def _mixed_sum(first, side1, second, side2, K, approx, grams, low_rank=None):
    parts = []
    if first:
        parts.append(_side_sum(first, K, side1, approx, grams, low_rank))
    if second:
        parts.append(_side_sum(second, K, side2, approx, grams, low_rank))
    return parts[0] if len(parts) == 1 else add_factors(*parts)


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


__all__ = [
    "DENSE_BLOCK_LIMIT",
    "KFAC_APPROXIMATIONS",
    "Tape",
    "term_vectors",
    "param_vectors",
    "vectors",
    "selected_vectors",
    "index_groups",
    "diagonal",
    "param_diagonal",
    "symmetric_gram",
    "gram_matmat",
    "param_kron",
    "jacobian_factor",
]
