"""Tests written to kill the survivors of the ``lowrank_factor`` mutation stage
(``tools/mutation/lowrank_factor.cfg``: laplace/utils/lowrank_factor.py). Each test
names the mutants it kills; the oracles are dense matrices (``U diag(s) U^T + c I``
with an explicit identity, sums of explicit matrices), ``torch.linalg.eigh`` for
truncations and ``torch.logdet`` / ``torch.linalg.inv`` for the decomposed blocks.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch.testing import assert_close

from laplace.utils import Kron, LowRankFactor
from laplace.utils.lowrank_factor import (
    LowRankSpec,
    add_factor_,
    add_factors,
    is_low_rank,
)

DTYPE = torch.float64


# -- oracles ---------------------------------------------------------------------------
def dense(F: torch.Tensor | LowRankFactor) -> torch.Tensor:
    """A factor of any storage as a matrix, from its definition."""
    if isinstance(F, LowRankFactor):
        eye = torch.eye(F.n, dtype=F.U.dtype, device=F.U.device)
        return F.U @ torch.diag(F.s) @ F.U.T + F.c * eye
    return torch.diag(F) if F.ndim == 1 else F


def low_rank(n, k, c, g, device, rank=None, dtype=DTYPE):
    """A ``LowRankFactor`` with ``k`` random orthonormal columns."""
    U = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=DTYPE))[0]
    s = torch.rand(k, generator=g, dtype=DTYPE) + 0.5
    return LowRankFactor(U, s, c, rank).to(device, dtype)


def psd(n, g, device):
    X = torch.randn(n, 2 * n, generator=g, dtype=DTYPE)
    return (X @ X.T / (2 * n) + 0.1 * torch.eye(n, dtype=DTYPE)).to(device)


def top_truncation(M: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-``rank`` truncation with the trace kept, from ``eigh``: the leading
    eigenpairs of ``M`` and the mean of its other eigenvalues on their complement."""
    lam, Q = torch.linalg.eigh(M)
    lam, Q = lam.flip(0), Q.flip(1)
    c = lam[rank:].mean()
    eye = torch.eye(len(M), dtype=M.dtype, device=M.device)
    Qk = Q[:, :rank]
    return Qk @ torch.diag(lam[:rank] - c) @ Qk.T + c * eye


def identity_columns(n, k, device, dtype):
    """``k`` columns of the identity: orthonormal exactly in any dtype."""
    return torch.eye(n, dtype=dtype, device=device)[:, :k]


# -- the zero factor -------------------------------------------------------------------
def test_the_sum_of_two_zero_factors_is_the_zero_factor(device):
    """Two factors without columns (a layer that saw no data, the prior-only
    curvature) add to the zero factor, in place or not, which then takes a nonzero
    factor exactly. Kills ``truncate`` 6-12 (the shapes of the no-column result)."""
    Z1 = LowRankFactor.zeros(5, 2, dtype=DTYPE, device=device)
    Z2 = LowRankFactor.zeros(5, 2, dtype=DTYPE, device=device)
    zero = torch.zeros(5, 5, dtype=DTYPE, device=device)
    for Z in (Z1 + Z2, Z1.clone().add_(Z2)):
        assert Z.U.shape == (5, 0) and Z.s.shape == (0,) and Z.rank == 2
        assert_close(dense(Z), zero)
        F = low_rank(5, 2, 0.3, torch.Generator().manual_seed(0), device)
        assert_close(dense(Z + F), dense(F))


def test_from_rows_of_no_rows_is_the_zero_factor(device):
    """``V^T V`` of a ``(0, n)`` ``V`` is the zero matrix. Kills ``from_rows``
    23/25/27 (the starting ``U`` and ``s`` of other shapes)."""
    V = torch.zeros(0, 6, dtype=DTYPE, device=device)
    F = LowRankFactor.from_rows(V, rank=2)
    assert F.U.shape == (6, 0) and F.rank == 2
    assert_close(dense(F), V.T @ V)


def test_rows_that_are_all_zero_give_the_zero_factor(device):
    """``V^T V`` of zero rows (a layer whose inputs are all zero) is the zero
    factor, without columns. Kills ``truncate`` 21 (eigenvalues ``>=`` a zero
    threshold counted: ``0 / 0`` columns)."""
    V = torch.zeros(3, 6, dtype=DTYPE, device=device)
    F = LowRankFactor.from_rows(V, rank=2)
    assert F.U.shape == (6, 0)
    assert_close(dense(F), V.T @ V)


def test_columns_only_for_the_eigenvalues_the_gram_resolves(device):
    """Rows whose Gram has the eigenvalues ``1``, ``1e-16`` (below ``eps`` of the
    largest: round-off for the Gram of ``B``) and ``0``, rank 4: one column, ``k =
    min(rank, rank of B)``, and ``V^T V`` up to that round-off. Kills ``truncate``
    17 (eigenvalues clamped at 1: every direction kept) and 23 (the round-off
    threshold divided by ``m``: the ``1e-16`` direction kept)."""
    V = torch.zeros(3, 8, dtype=DTYPE, device=device)
    V[0, 0], V[1, 1] = 1.0, 1e-8
    F = LowRankFactor.from_rows(V, rank=4)
    assert F.U.shape == (8, 1)
    assert_close(dense(F), V.T @ V)
    W = torch.zeros(3, 8, dtype=DTYPE, device=device)
    W[0, :2], W[1, 2] = torch.tensor([1.0, 2.0], dtype=DTYPE, device=device), 3.0
    G = LowRankFactor.from_rows(W, rank=4)
    assert G.U.shape == (8, 2)
    assert_close(dense(G), W.T @ W)


def test_an_eigh_that_fails_in_float32_is_retried_in_float64(device, monkeypatch):
    """Where float32's ``eigh`` does not converge (simulated: it raises for every
    float32 matrix), the truncation of float32 rows is computed by float64
    eigenproblems and returned in float32: the factor of the float64 truncation of
    the same rows. A float64 failure propagates. Kills ``_eigh_wide`` 2-7 (the
    float32 failure re-raised, the retry without a matrix or in float32, its
    results left in float64)."""
    g = torch.Generator().manual_seed(13)
    V = torch.randn(12, 10, generator=g, dtype=torch.float32).to(device)
    expected = dense(LowRankFactor.from_rows(V.to(DTYPE), rank=3)).float()
    eigh, dtypes = torch.linalg.eigh, []

    def eigh_failing_in_float32(A, *args, **kwargs):
        dtypes.append(A.dtype)
        if A.dtype != torch.float64:
            raise torch.linalg.LinAlgError("eigh: the algorithm failed to converge")
        return eigh(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", eigh_failing_in_float32)
    F = LowRankFactor.from_rows(V, rank=3)
    assert {torch.float32, torch.float64} <= set(dtypes)
    assert all(t.dtype == torch.float32 for t in F.tensors())
    scale = expected.abs().max().item()
    assert_close(dense(F), expected, rtol=1e-5, atol=1e-5 * scale)

    def eigh_failing(A, *args, **kwargs):
        raise torch.linalg.LinAlgError("eigh: the algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", eigh_failing)
    # failing in float64 too: the truncation falls back to an SVD, the same factor
    F = LowRankFactor.from_rows(V.to(DTYPE), rank=3)
    assert_close(dense(F), expected.to(DTYPE), rtol=1e-5, atol=1e-5 * scale)


def test_the_zero_factor_keeps_its_rank_when_a_dense_factor_is_added(device):
    """``zeros(n, r)`` plus a dense PSD factor keeps ``r`` eigenpairs (the top ones,
    the trace kept), in place or not. Kills ``zeros`` 14/18 (the zero factor built
    without its rank: it then keeps one eigenpair)."""
    g = torch.Generator().manual_seed(1)
    M = psd(6, g, device)
    for total in (
        LowRankFactor.zeros(6, 3, dtype=DTYPE, device=device) + M,
        LowRankFactor.zeros(6, 3, dtype=DTYPE, device=device).add_(M),
    ):
        assert total.U.shape == (6, 3) and total.rank == 3
        assert_close(dense(total), top_truncation(M, 3))


def test_zeros_takes_the_dtype_and_device_asked_for(device):
    """Kills ``zeros`` 4/8 (the default dtype instead of the one asked for); 5/9
    (``device``) on a GPU."""
    for dtype in (torch.float64, torch.float16):
        Z = LowRankFactor.zeros(4, 2, dtype=dtype, device=device)
        for t in Z.tensors():
            assert t.dtype == dtype and t.device.type == device.type
        assert_close(Z.to_dense(), torch.zeros(4, 4, dtype=dtype, device=device))


# -- the constructor -------------------------------------------------------------------
def test_c_is_held_in_the_dtype_and_on_the_device_of_u(device):
    """``c`` given as a float, an int or a float32 CPU tensor is held as a 0-dim
    tensor in ``U``'s dtype and on its device, with its value. Kills ``_isotropic``
    3/6 (``c`` in the default dtype or its own); 4/7 (``device``) on a GPU."""
    U = identity_columns(4, 2, device, DTYPE)
    s = torch.tensor([2.0, 1.0], dtype=DTYPE, device=device)
    for c, value in ((0.1, 0.1), (2, 2.0), (torch.tensor(0.5), 0.5)):
        F = LowRankFactor(U, s, c)
        assert_close(F.c, torch.tensor(value, dtype=DTYPE, device=device))


def test_zero_eigenvalues_are_accepted(device):
    """A PSD factor may have zero eigenvalues: ``s`` with a zero, and the
    truncation of a singular factor, whose kept ``s`` has exact zeros. Kills
    ``__init__`` 29 (``s <= 0`` refused)."""
    U = identity_columns(4, 2, device, DTYPE)
    s = torch.tensor([1.5, 0.0], dtype=DTYPE, device=device)
    F = LowRankFactor(U, s, 0.2)
    expected = torch.diag(torch.tensor([1.7, 0.2, 0.2, 0.2], dtype=DTYPE))
    assert_close(dense(F), expected.to(device))
    M = torch.diag(torch.tensor([3.0, 0.0, 0.0, 0.0], dtype=DTYPE, device=device))
    G = LowRankFactor.from_dense(M, rank=2)
    assert_close(dense(G), M)


def test_the_default_rank_is_the_number_of_columns_and_at_least_one(device):
    """A factor built without ``rank`` keeps ``k`` eigenpairs (at least one): the
    sum of two one-column factors is the rank-1 truncation of the dense sum, trace
    kept. Kills ``__init__`` 47 (a default of at least 2)."""
    g = torch.Generator().manual_seed(2)
    F1, F2 = low_rank(6, 1, 0.1, g, device), low_rank(6, 1, 0.05, g, device)
    assert F1.rank == 1
    assert LowRankFactor.zeros(6, 1, dtype=DTYPE, device=device).rank == 1
    total = F1 + F2
    assert total.U.shape == (6, 1) and total.rank == 1
    assert_close(dense(total), top_truncation(dense(F1) + dense(F2), 1))


def test_sums_conversions_and_states_keep_the_rank(device):
    """``rank`` above the number of columns survives a sum, ``to``, ``detach``,
    ``clone`` and a state round trip: adding a dense factor afterwards keeps up to
    ``rank`` eigenpairs (exactly, for ``rank = n``). Kills ``__add__`` 6/10,
    ``to`` 1/3, ``detach`` 4/8 and ``from_state`` 17/21 (the rank dropped: it
    falls back to the number of columns)."""
    g = torch.Generator().manual_seed(3)
    F1 = low_rank(6, 1, 0.1, g, device, rank=6)
    F2 = low_rank(6, 1, 0.2, g, device, rank=6)
    M = psd(6, g, device)
    total = F1 + F2
    for F in (
        total,
        F1.to(DTYPE),
        F1.detach(),
        F1.clone(),
        LowRankFactor.from_state(F1.state()),
    ):
        assert F.rank == 6
        assert_close(dense(F + M), dense(F) + M)


def test_to_casts_like_tensor_to(device):
    """``to`` takes a dtype (or device) positionally and by keyword, as
    ``Tensor.to``. Kills ``to`` 4/5 (the positional or the keyword arguments
    dropped)."""
    g = torch.Generator().manual_seed(4)
    F = low_rank(5, 2, 0.3, g, device)
    for G in (F.to(torch.float32), F.to(dtype=torch.float32)):
        assert all(t.dtype == torch.float32 for t in G.tensors())
        assert_close(dense(G), dense(F).float())


def test_detach_keeps_the_values_and_drops_the_graph(device):
    """``detach`` of a factor whose ``s`` and ``c`` require grad: the same matrix,
    the same rank, no graph; and its spectrum's ``detach`` and ``to`` keep the
    eigenvalues ``s + c`` and ``c`` of multiplicity ``n - k``. Kills
    ``LowRankFactor.detach`` 1-8, ``LowRankSpectrum.detach`` 1-6 and
    ``LowRankSpectrum.to`` 1-10 (no test reached them)."""
    U = identity_columns(5, 2, device, DTYPE)
    s = torch.tensor([2.0, 1.0], dtype=DTYPE, device=device, requires_grad=True)
    c = torch.tensor(0.25, dtype=DTYPE, device=device, requires_grad=True)
    F = LowRankFactor(U, s, c, rank=4)
    D = F.detach()
    assert D.rank == 4 and not any(t.requires_grad for t in D.tensors())
    expected = torch.diag(torch.tensor([2.25, 1.25, 0.25, 0.25, 0.25], dtype=DTYPE))
    assert_close(dense(D), expected.to(device))
    eigenvalues = expected.diagonal().to(device)
    spectrum = F.eigenvalues().detach()
    assert spectrum.n == 5 and not spectrum.values.requires_grad
    assert not spectrum.rest.requires_grad
    assert_close(spectrum.expanded(), eigenvalues)
    for cast in (spectrum.to(torch.float32), spectrum.to(dtype=torch.float32)):
        assert cast.n == 5 and cast.shape == (5,)
        assert_close(cast.expanded(), eigenvalues.float())


def test_repr_names_the_size_columns_rank_and_isotropic_part(device):
    """Kills ``__repr__`` 1 (no test reached it)."""
    U = identity_columns(6, 2, device, DTYPE)
    F = LowRankFactor(U, torch.ones(2, dtype=DTYPE, device=device), 0.3, rank=4)
    assert repr(F) == "LowRankFactor(n=6, k=2, rank=4, c=0.3, dtype=torch.float64)"


# -- bad input -------------------------------------------------------------------------
def test_refusals_name_what_they_got(device):
    """Every refusal names the argument, what it got and what would work. Kills
    ``__init__`` 5-7/9 and 16-18/20 (what ``U`` and ``s`` were), 35/36/38/39 (the
    PSD message, with ``min(s)=None`` for a factor without columns), 50 (a
    non-integer ``rank`` accepted), ``_check_scale`` 3-7/20 and ``_sum`` 41-45 (the
    messages of a bad scale and of a bad summand)."""
    U = identity_columns(5, 2, device, DTYPE)
    s = torch.ones(2, dtype=DTYPE, device=device)

    def refused(error, message, call, *args, **kwargs):
        with pytest.raises(error, match="^" + re.escape(message) + "$"):
            call(*args, **kwargs)

    matrix = "U must be a matrix (n, k); got "
    refused(ValueError, matrix + "(5,).", LowRankFactor, U[:, 0], s, 0.1)
    refused(ValueError, matrix + "list.", LowRankFactor, [[1.0]], s, 0.1)
    shape = "s must have shape (2,), one per column of U; got "
    refused(ValueError, shape + "(1,).", LowRankFactor, U, s[:1], 0.1)
    refused(ValueError, shape + "list.", LowRankFactor, U, [1.0, 1.0], 0.1)
    psd_message = "A LowRankFactor is PSD: s and c must be >= 0; got min(s)="
    refused(ValueError, psd_message + "-1.0 and c=0.1.", LowRankFactor, U, -s, 0.1)
    no_column = U[:, :0], s[:0], -0.1
    refused(ValueError, psd_message + "None and c=-0.1.", LowRankFactor, *no_column)
    rank = "rank must be an int >= the {} columns of U (and >= 1); got {}."
    refused(ValueError, rank.format(2, "2.5"), LowRankFactor, U, s, 0.1, rank=2.5)
    one_column = U[:, :1], s[:1], 0.1
    refused(ValueError, rank.format(1, "True"), LowRankFactor, *one_column, rank=True)
    F = LowRankFactor(U, s, 0.1)
    refused(
        ValueError,
        "A LowRankFactor can only be scaled by a scalar; got a tensor of shape (2,).",
        F.__mul__,
        s,
    )
    refused(
        TypeError,
        "A LowRankFactor can only be scaled by a real number; got str.",
        F.__mul__,
        "2",
    )
    refused(
        TypeError,
        "Can only add a LowRankFactor, a dense (n, n) factor or a diagonal one (a "
        "vector) to a LowRankFactor; got float.",
        F.__add__,
        2.0,
    )


def test_scales_zero_and_below_one_are_accepted_negative_ones_refused(device):
    """A factor scaled by ``0`` (a number or a tensor) is the zero matrix, by a
    tensor ``0.5`` half of it; a negative tensor is refused. Kills ``_check_scale``
    10/11 (a negative tensor accepted), 12/17 (zero refused), 13 (a tensor below 1
    refused)."""
    g = torch.Generator().manual_seed(5)
    F = low_rank(5, 2, 0.3, g, device)
    M = dense(F)
    half = torch.tensor(0.5, dtype=DTYPE, device=device)
    zero = torch.zeros((), dtype=DTYPE, device=device)
    assert_close(dense(F * 0.0), torch.zeros_like(M))
    assert_close(dense(F * 0), torch.zeros_like(M))
    assert_close(dense(F * zero), torch.zeros_like(M))
    assert_close(dense(F * half), 0.5 * M)
    assert_close(dense(F.clone().mul_(half)), 0.5 * M)
    assert_close(dense(F / (half * 4)), 0.5 * M)
    with pytest.raises(ValueError, match="scaled by a number >= 0"):
        F * -half


# -- negative eigenvalues of a dense factor --------------------------------------------
def _with_spectrum(eigenvalues, device, seed=6):
    g = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DTYPE))[0]
    lam = torch.tensor(eigenvalues, dtype=DTYPE)
    return (Q @ torch.diag(lam) @ Q.T).to(device), Q.to(device), lam.to(device)


def test_clearly_negative_eigenvalues_warn_and_are_clamped(device):
    """A dense factor with an eigenvalue of ``-0.5`` next to ``5``: a warning that
    names the smallest eigenvalue, and the truncation of the factor with it clamped
    to 0 (from ``from_dense`` and from a sum with a dense factor). Kills
    ``_top_eigenpairs`` 10 (never warns), 14-16 and 18-20 (the warning's text,
    ``stacklevel=None``)."""
    M, Q, lam = _with_spectrum([5.0, 2.0, -0.5, 1.0, 0.1], device)
    clamped = Q @ torch.diag(lam.clamp(min=0)) @ Q.T
    message = re.escape(
        "Kronecker factor has clearly negative eigenvalues (min -0.5); clamping "
        "them to 0."
    )
    with pytest.warns(UserWarning, match="^" + message + "$"):
        F = LowRankFactor.from_dense(M, rank=2)
    assert_close(dense(F), top_truncation(clamped, 2))
    Z = LowRankFactor.zeros(5, 2, dtype=DTYPE, device=device)
    with pytest.warns(UserWarning, match="^" + message + "$"):
        G = Z + M
    assert_close(dense(G), top_truncation(clamped, 2))


def test_round_off_negative_eigenvalues_do_not_warn_at_any_scale(device):
    """Eigenvalues negative by a relative ``1e-9`` of the largest (round-off of a
    sum of PSD matrices) and zero ones are clamped without a warning, whatever the
    factor's scale: "clearly negative" is relative to ``sqrt(eps)`` times the
    largest eigenvalue. Kills ``_top_eigenpairs`` 6/8 (a threshold below
    round-off), 9 (always warns), 12 (threshold divided by the scale) and 13 (zero
    eigenvalues warn)."""
    for scale in (1.0, 100.0):
        M, Q, lam = _with_spectrum([scale, 0.5 * scale, 0.0, -1e-9 * scale], device)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            F = LowRankFactor.from_dense(M, rank=2)
        assert_close(
            dense(F), top_truncation(Q @ torch.diag(lam.clamp(min=0)) @ Q.T, 2)
        )


# -- 16-bit factors --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_factors_are_computed_in_float32(dtype, device):
    """16-bit factors (``U`` exactly orthonormal: identity columns) keep their
    dtype in ``to_dense``; their log-determinant, their sums (with a weight) with
    16-bit low-rank and dense factors and the truncation of a 16-bit dense factor
    are computed in float32 (the 16-bit values taken exactly), against float64
    oracles. The ``s`` of the low-rank summands, times their weight, are squares
    of 16-bit numbers: ``_sum`` takes their square roots before the cast to
    float32 (rounded in 16 bits otherwise). Kills ``to_dense`` 3/6 (the identity
    in the default dtype), ``logdet`` 2-5, ``_sum`` 13/14/20/28 and 55/56/65
    (16-bit linear algebra or a 16-bit weighted term), ``from_dense`` 1/2/8 (a
    16-bit ``eigh``)."""
    n = 6
    U = identity_columns(n, 3, device, dtype)
    F = LowRankFactor(U, torch.tensor([4.0, 9.0, 16.0], device=device).to(dtype), 0.5)
    G = LowRankFactor(
        U.flip(1), torch.tensor([25.0, 100.0, 6.25], device=device).to(dtype), 0.75
    )
    F.rank = G.rank = n  # sums exact within the rank
    MF, MG = dense(F.to(DTYPE)), dense(G.to(DTYPE))
    assert_close(F.to_dense(), MF.to(dtype))
    assert_close(F.logdet(), torch.logdet(MF).float())

    total = F.clone().add_(G, alpha=0.36)
    assert total.dtype == torch.float32
    assert_close(dense(total), (MF + 0.36 * MG).float())

    g = torch.Generator().manual_seed(7)
    D = psd(n, g, device).to(dtype)
    for weighted, expected in (
        (F.clone().add_(D, alpha=0.3), MF + 0.3 * D.to(DTYPE)),
        (F.to(torch.float32).add_(D, alpha=0.3), MF + 0.3 * D.to(DTYPE)),
        (F + D, MF + D.to(DTYPE)),
    ):
        assert weighted.dtype == torch.float32
        assert_close(dense(weighted), expected.float())

    truncated = LowRankFactor.from_dense(D, rank=2)
    assert truncated.dtype == torch.float32
    assert_close(dense(truncated), top_truncation(D.to(DTYPE), 2).float())


# -- from_rows' steps ------------------------------------------------------------------
@pytest.mark.parametrize(("n", "rank"), [(10, 3), (3, 1)])
def test_from_rows_never_forms_an_n_by_n_matrix_below_half_rank(n, rank, device):
    """For ``rank < n / 2`` the rows are taken fewer than ``n - rank`` at a time,
    so no matrix of ``n`` rows and ``n`` columns or more is formed besides ``V``
    (spying on every torch function), and the trace of ``V^T V`` is kept. Kills
    ``from_rows`` 16 (``n - rank + 1`` rows per step) and 19 (2 rows per step for
    ``rank = 1``, ``n = 3``)."""
    g = torch.Generator().manual_seed(8)
    V = torch.randn(4 * n, n, generator=g, dtype=DTYPE).to(device)
    seen = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple) else (out,):
                if (
                    isinstance(t, torch.Tensor)
                    and t is not V
                    and t.ndim >= 2
                    and min(t.shape[-2:]) >= n
                ):
                    seen.append((getattr(func, "__name__", func), tuple(t.shape)))
            return out

    with Spy():
        F = LowRankFactor.from_rows(V, rank)
    assert not seen, seen
    assert F.U.shape == (n, rank)
    assert_close(torch.trace(dense(F)), torch.trace(V.T @ V))


# -- factors of any storage ------------------------------------------------------------
def _storages(n, g, device):
    """A low-rank (rank ``n``: exact sums), a dense and a diagonal factor."""
    return {
        "low_rank": low_rank(n, 2, 0.3, g, device, rank=n),
        "dense": psd(n, g, device),
        "diagonal": (torch.rand(n, generator=g, dtype=DTYPE) + 0.2).to(device),
    }


def test_add_factors_of_every_pair_of_storages(device):
    """``add_factors(F, G)`` for every pair of low-rank, dense and diagonal
    factors equals the sum of their matrices: low rank if either is, a dense
    matrix for a dense and a diagonal one, a vector for two diagonal ones. Kills
    ``add_factors`` 1-5/7-20 (the low-rank factor only on one side, a difference,
    a diagonal taken of a dense factor)."""
    factors = _storages(5, torch.Generator().manual_seed(9), device)
    for (a, F), (b, G) in ((x, y) for x in factors.items() for y in factors.items()):
        total = add_factors(F, G)
        assert_close(dense(total), dense(F) + dense(G))
        assert is_low_rank(total) == ("low_rank" in (a, b))
        if not is_low_rank(total):
            assert total.ndim == (1 if a == b == "diagonal" else 2)


def test_add_factor_in_place_with_a_weight(device):
    """``add_factor_(F, G, alpha)`` is ``F + alpha G``, written into ``F`` (the
    count-weighted mean of Kron's merged fits): low-rank into low-rank, dense into
    low-rank, low-rank into dense, dense into dense. Kills ``add_factor_`` 6/10
    (``alpha`` dropped) and 11-13 (a low-rank ``G`` added to a dense ``F`` without
    ``to_dense``, or a dense one through it)."""
    factors = _storages(5, torch.Generator().manual_seed(10), device)
    pairs = [
        ("low_rank", "low_rank"),
        ("low_rank", "dense"),
        ("dense", "low_rank"),
        ("dense", "dense"),
    ]
    for a, b in pairs:
        F, G = factors[a].clone(), factors[b]
        expected = dense(F) + 0.25 * dense(G)
        out = add_factor_(F, G, alpha=0.25)
        assert out is F
        assert_close(dense(F), expected)


# -- the spec --------------------------------------------------------------------------
def test_low_rank_spec_keeps_only_factors_above_the_threshold_and_the_rank(device):
    """``LowRankSpec(rank, threshold)`` keeps a factor of size ``n`` low rank iff
    ``n > threshold`` and ``n > rank``; others are ``V^T V`` (or ``dense(V)`` when
    given) and dense factors stay as they are. Kills ``applies`` 2 (``n ==
    threshold`` low rank) and ``gram`` 8-10 (``dense`` ignored or always called)."""
    g = torch.Generator().manual_seed(11)
    spec = LowRankSpec(rank=2, threshold=5)
    assert not spec.applies(5) and spec.applies(6)
    assert not LowRankSpec(rank=8, threshold=5).applies(6)
    V5 = torch.randn(4, 5, generator=g, dtype=DTYPE).to(device)
    assert_close(spec.gram(V5), V5.T @ V5)
    assert_close(spec.gram(V5, dense=lambda V: V.square().sum(0)), V5.square().sum(0))
    V6 = torch.randn(2, 6, generator=g, dtype=DTYPE).to(device)
    low = spec.gram(V6, dense=lambda V: V.square().sum(0))
    assert isinstance(low, LowRankFactor)
    assert_close(dense(low), V6.T @ V6)
    M5, M6 = psd(5, g, device), psd(6, g, device)
    assert spec.truncate(M5) is M5
    truncated = spec.truncate(M6)
    assert isinstance(truncated, LowRankFactor)
    assert_close(dense(truncated), top_truncation(M6, 2))


# -- a factor without a complement -----------------------------------------------------
def test_a_factor_with_as_many_columns_as_its_size_has_no_complement(device):
    """Factors of rank ``n`` built from rows (``c = 0`` exactly, no complement):
    the decomposed Kronecker block without a prior (no delta) has the dense
    block's log-determinant, inverse, inverse diagonal and products. Kills
    ``eigen_parts`` 25 (an empty complement of eigenvalue 0 added: ``0 * log 0``
    and ``1 / 0`` make NaNs)."""
    g = torch.Generator().manual_seed(12)
    F1 = LowRankFactor.from_rows(torch.randn(9, 4, generator=g, dtype=DTYPE), 4)
    F2 = LowRankFactor.from_rows(torch.randn(7, 3, generator=g, dtype=DTYPE), 3)
    F1, F2 = F1.to(device), F2.to(device)
    for F in (F1, F2):
        assert F.U.shape == (F.n, F.n)
        assert_close(F.c, torch.zeros((), dtype=DTYPE, device=device))
    M = torch.block_diag(torch.kron(dense(F1), dense(F2)), dense(F1))
    K = Kron([[F1, F2], [F1]]).decompose()
    W = torch.randn(2, M.shape[0], generator=g, dtype=DTYPE).to(device)
    assert_close(K.logdet(), torch.logdet(M))
    assert_close(K.to_matrix(-1), torch.linalg.inv(M))
    assert_close(K.diag(-1), torch.linalg.inv(M).diagonal())
    assert_close(K.bmm(W, -1), W @ torch.linalg.inv(M))
