"""Tests written to kill surviving mutants of the mutmut stages glm, kron_assembly,
parametric_base and curvature (tools/mutation/run.sh).

Each test states a property of the library against an independent oracle; the
mutants it was written for are named in its docstring. The survivors that are
equivalent are listed in docs/mutation-testing.md.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from laplace.predictive import glm

DTYPE = torch.float64


# ---- laplace/predictive/glm.py -------------------------------------------------------


def _orthogonal(n, g):
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DTYPE))[0]


def _glm_case(T, n_in, N=5, C=3, n_out=2, rotated=True):
    """Factors of a weight ``(n_out, n_in)`` with ``T`` shared positions and a bias,
    eigenbases and eigenvalues of their blocks, and the dense oracle ``J P^-1 J^T``."""
    g = torch.Generator().manual_seed(T * 10 + n_in)
    a = torch.randn(N, T, n_in, generator=g, dtype=DTYPE)
    gw = torch.randn(C, N, T, n_out, generator=g, dtype=DTYPE)
    gb = torch.randn(C, N, n_out, generator=g, dtype=DTYPE)
    lam_w = torch.rand(n_out, n_in, generator=g, dtype=DTYPE) + 0.5
    lam_b = torch.rand(n_out, generator=g, dtype=DTYPE) + 0.5
    if rotated:
        Q_out, Q_in, Q_b = (_orthogonal(n, g) for n in (n_out, n_in, n_out))
    else:
        Q_out = Q_in = Q_b = None
    # dense oracle: J_c = sum_t g_ct a_t^T, P = (Q_out (x) Q_in) diag(lam) (...)^T
    J_w = torch.einsum("cnto,nti->ncoi", gw, a).reshape(N, C, -1)
    J = torch.cat([J_w, gb.permute(1, 0, 2)], dim=-1)
    eye = torch.eye
    K_w = torch.kron(
        eye(n_out, dtype=DTYPE) if Q_out is None else Q_out,
        eye(n_in, dtype=DTYPE) if Q_in is None else Q_in,
    )
    K_b = eye(n_out, dtype=DTYPE) if Q_b is None else Q_b
    P = torch.block_diag(
        K_w @ torch.diag(lam_w.flatten()) @ K_w.T, K_b @ torch.diag(lam_b) @ K_b.T
    )
    oracle = J @ torch.linalg.solve(P, J.mT)
    factors = [(a, gw), (None, gb)]
    bases = [(Q_out, Q_in), (Q_b,)]
    return factors, bases, [1 / lam_w, 1 / lam_b], oracle


@pytest.mark.parametrize("rotated", [True, False])
@pytest.mark.parametrize("T,n_in", [(1, 3), (2, 3), (3, 1), (1, 1)])
def test_glm_inv_square_form_is_J_Pinv_Jt_for_any_sharing(T, n_in, rotated):
    """rotate + inv_square_form equal the dense ``J P^-1 J^T`` with or without weight
    sharing, also for one input feature and for two shared positions.

    Kills inv_square_form 21 (``a.shape[2] == 1``: a shared weight with one input
    feature takes the unshared path) and 23 (``a.shape[1] == 2``: two shared
    positions take the unshared path and keep only the first).
    """
    factors, bases, inv, oracle = _glm_case(T, n_in, rotated=rotated)
    assert_close(glm.inv_square_form(glm.rotate(factors, bases), inv), oracle)


def test_glm_shared_weight_term_in_several_uneven_chunks(monkeypatch):
    """The per-example Jacobians of a shared weight, computed in chunks of 2 examples
    (5 examples: chunks 2, 2, 1), give the dense ``J P^-1 J^T``.

    Kills _shared_weight_term 15 (``range(N, chunk)``) and 16 (``range(0, chunk)``),
    which only timed out (one empty chunk per integer up to 2**24) with the default
    chunk size.
    """
    factors, bases, inv, oracle = _glm_case(3, 2, N=5, C=3, n_out=2)
    C, numel = 3, inv[0].numel()
    monkeypatch.setattr(glm, "_CHUNK_ENTRIES", 2 * C * numel)
    assert_close(glm.inv_square_form(glm.rotate(factors, bases), inv), oracle)


def test_glm_refuses_factors_and_blocks_of_different_lengths():
    """One block too few (or too many) is an error, not a silently dropped parameter.

    Kills rotate 4/7/8 and inv_square_form 4/7/8 (``zip(..., strict=True)`` relaxed).
    """
    factors, bases, inv, _ = _glm_case(1, 3)
    with pytest.raises(ValueError):
        glm.rotate(factors, bases[:1])
    with pytest.raises(ValueError):
        glm.rotate(factors[:1], bases)
    with pytest.raises(ValueError):
        glm.inv_square_form(factors, inv[:1])
    with pytest.raises(ValueError):
        glm.inv_square_form(factors[:1], inv)
