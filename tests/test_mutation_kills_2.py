"""Tests written to kill surviving mutants of the mutmut stages glm, kron_assembly,
parametric_base and curvature (tools/mutation/run.sh).

Each test states a property of the library against an independent oracle; the
mutants it was written for are named in its docstring. The survivors that are
equivalent are listed in docs/mutation-testing.md.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from laplace.curvature.kron_assembly import LayerFactors, assemble_kron, kfac_layers
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


# ---- laplace/curvature/kron_assembly.py ----------------------------------------------


def test_kfac_refuses_a_layer_without_kronecker_factors_with_its_name_and_remedies():
    """A trainable LayerNorm has no KFAC form: the error names the layer, its type and
    what would work; the same layer frozen is skipped.

    Kills kfac_layers 12-22 (message dropped, type of None, text altered).
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(ValueError) as err:
        kfac_layers(model, list(model.parameters()))
    assert str(err.value) == (
        "KFAC cannot handle layer '1' (LayerNorm) whose parameters require grad: "
        "only nn.Linear and nn.Conv2d have Kronecker factors. Use "
        "hessian_structure='diag' or 'full', freeze the layer, or use last-layer "
        "Laplace."
    )
    params = [p for n, p in model.named_parameters() if not n.startswith("1.")]
    assert [name for name, _ in kfac_layers(model, params)] == ["0", "2"]


@pytest.mark.parametrize("N", [0, -3])
def test_assemble_kron_refuses_a_data_set_without_points(N):
    """Kills assemble_kron 1 (``N < 0``: N = 0 divides by zero) and 3 (no message)."""
    layer = nn.Linear(3, 2).to(DTYPE)
    factors = {"l": LayerFactors(torch.eye(2, dtype=DTYPE), torch.eye(3, dtype=DTYPE))}
    with pytest.raises(
        ValueError, match=f"N must be the positive size of the data set; got {N}"
    ):
        assemble_kron(list(layer.parameters()), [("l", layer)], factors, N)


@pytest.mark.parametrize("N", [1, 4])
@pytest.mark.parametrize("g_scale,a_scale", [(1.0, 1.0), (2.0, 3.0), (0.5, 2.0)])
def test_assemble_kron_scales_the_factors_and_averages_A_over_N(N, g_scale, a_scale):
    """The weight block is ``kron(g_scale G, a_scale A / N)`` and the bias block
    ``g_scale G`` (its own copy), in parameter order, for one datum as for several.

    Kills assemble_kron 2 (``N <= 1`` refuses a data set of one point) and 10
    (``g_scale == 2`` skips the scale 2).
    """
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(3, 2).to(DTYPE)
    B = torch.randn(2, 2, generator=g, dtype=DTYPE)
    X = torch.randn(3, 3, generator=g, dtype=DTYPE)
    G, A = B @ B.T, X @ X.T
    factors = {"l": LayerFactors(G.clone(), A.clone(), g_scale, a_scale)}
    kron = assemble_kron(list(layer.parameters()), [("l", layer)], factors, N)
    expected = torch.block_diag(torch.kron(g_scale * G, a_scale * A / N), g_scale * G)
    assert_close(kron.to_matrix(), expected)
    assert kron.kfacs[1][0].data_ptr() != kron.kfacs[0][0].data_ptr()
    # parameter order: bias first
    kron = assemble_kron(
        [layer.bias, layer.weight],
        [("l", layer)],
        {"l": LayerFactors(G.clone(), A.clone(), g_scale, a_scale)},
        N,
    )
    assert_close(
        kron.to_matrix(),
        torch.block_diag(g_scale * G, torch.kron(g_scale * G, a_scale * A / N)),
    )
