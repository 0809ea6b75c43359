"""The 16-bit paths against their float32 definitions (kill tests of the
``reduced_precision`` mutation stage): ``CastForm`` shows a float32 form in the
model's dtype, operation by operation; the GP's kernel system gives the same
whitening and log-determinant by its spectrum, its Cholesky factor and its
differentiable factor, for float32 and 16-bit operands; and 16-bit Laplace objects
answer every posterior query in the model's dtype."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace
from laplace.functional.gp import KernelSystem
from laplace.parametric.precision import CastForm, DensePrecision, DiagPrecision

F32 = torch.float32


def _spd(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g)
    return A @ A.T + n * torch.eye(n)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cast_form_is_the_float32_form_in_the_models_dtype(dtype):
    inner = DensePrecision(_spd(5))
    form = CastForm(inner, F32, dtype)
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(3, 5, generator=g).to(dtype)
    J = torch.randn(2, 3, 5, generator=g).to(dtype)
    assert form.logdet().dtype == F32 and form.to_matrix() is inner.to_matrix()
    expected = {
        "square_form": inner.square_form(delta.to(F32)),
        "inv_square_form": inner.inv_square_form(J.to(F32)),
        "inv_diag": inner.inv_diag(),
    }
    got = {
        "square_form": form.square_form(delta),
        "inv_square_form": form.inv_square_form(J),
        "inv_diag": form.inv_diag(),
    }
    for name, value in got.items():
        assert value.dtype == dtype, name
        torch.testing.assert_close(value, expected[name].to(dtype), msg=name)
    # the draws are the inner form's, with the generator given
    draws = form.sample(4, torch.Generator().manual_seed(3))
    assert draws.dtype == dtype
    reference = inner.sample(4, torch.Generator().manual_seed(3))
    torch.testing.assert_close(draws, reference.to(dtype))
    # other attributes are the inner form's
    assert form.P is inner.P and form.cholesky is inner.cholesky
    # a form without eigenbases has none; a diagonal one's come in the dtype
    assert form.eigenbases() is None
    diag = CastForm(DiagPrecision(torch.rand(6) + 1, [(2, 3)]), F32, dtype)
    assert diag.eigenbases() == [(None, None)]
    (inverse,) = diag.inverse_eigenvalues()
    assert inverse.dtype == dtype and inverse.shape == (2, 3)


@pytest.mark.parametrize("dtype", [F32, torch.bfloat16])
def test_the_kernel_systems_ways_agree_for_any_operand_dtype(dtype):
    """``B = I + c S``: whitening ``Z`` by the Cholesky factor, by a differentiable
    factor and by the spectrum gives ``W^T W = Z^T B^-1 Z`` (dense oracle), in
    ``Z``'s dtype; the log-determinant by the factor and by the spectrum is ``log
    det B``, in ``S``'s dtype."""
    S = _spd(6) / 6
    c = torch.tensor(0.7)
    B = torch.eye(6) + 0.7 * S
    Z = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    oracle = Z.T @ torch.linalg.solve(B, Z)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype != F32 else {}
    system = KernelSystem(S.to(dtype))
    assert system.S.dtype == F32 and system.dtype == dtype
    torch.testing.assert_close(system.logdet(c), torch.logdet(B).to(dtype), **tol)
    by_factor = system.whiten(c, Z.to(dtype))
    assert by_factor.dtype == dtype
    torch.testing.assert_close((by_factor.T @ by_factor).float(), oracle, **tol)
    c_grad = c.clone().requires_grad_(True)
    differentiable = system.whiten(c_grad, Z.to(dtype))
    torch.testing.assert_close(differentiable, by_factor)
    rotated = system.rotate(Z.to(dtype))  # the spectrum from now on
    assert rotated.dtype == dtype
    by_spectrum = system.whiten(c, Z.to(dtype))
    assert by_spectrum.dtype == dtype
    torch.testing.assert_close((by_spectrum.T @ by_spectrum).float(), oracle, **tol)
    torch.testing.assert_close(system.scale_rotated(c, rotated), by_spectrum)
    torch.testing.assert_close(system.logdet(c), torch.logdet(B).to(dtype), **tol)


@pytest.mark.parametrize("structure", ["full", "diag", "kron", "lowrank"])
def test_every_posterior_query_of_a_16_bit_model_comes_in_its_dtype(structure, device):
    """Beyond the predictive: the variances and ``log_prob`` in the model's dtype,
    the posterior precision and its log-determinant (terms of the evidence) in
    float32, against the float32 model's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(device)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(32, 3, generator=g).to(device)
    y = torch.randint(0, 2, (32,), generator=g).to(device)
    results = {}
    for dtype in (torch.bfloat16, F32):
        la = Laplace(copy.deepcopy(model).to(dtype), "classification", "all", structure)
        la.fit(DataLoader(TensorDataset(X.to(dtype), y), batch_size=8))
        theta = la.mean.to(dtype)
        results[dtype] = {
            "posterior_variance": la.posterior_variance,
            "log_prob": la.log_prob(theta),
            "log_det_posterior_precision": la.log_det_posterior_precision,
        }
        precision = la.posterior_precision
        if structure == "kron":
            assert precision.eigenvalues[0][0].dtype == F32
        elif structure == "lowrank":
            (U, values), prior = precision
            assert U.dtype == values.dtype == prior.dtype == F32
        else:
            assert precision.dtype == F32
    for name, value in results[torch.bfloat16].items():
        in_float32 = name == "log_det_posterior_precision"
        assert value.dtype == (F32 if in_float32 else torch.bfloat16), name
        expected = results[F32][name].to(value.dtype)
        torch.testing.assert_close(value, expected, rtol=0.1, atol=0.1, msg=name)


def test_a_16_bit_low_rank_plus_diagonal_computes_in_float32():
    """``LowRankPlusDiagonal`` built from bfloat16 tensors (``laplace.utils.lowrank``
    is public): its Woodbury factors, log-determinant and sampling factor run in
    float32 and agree with the float32 object's to bfloat16's digits, in
    bfloat16."""
    from laplace.utils.lowrank import LowRankPlusDiagonal

    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(8, 3, generator=g))
    values = torch.tensor([4.0, 2.0, 1.0])
    diagonal = torch.rand(8, generator=g) + 0.5
    X = torch.randn(8, 2, generator=g)
    J = torch.randn(2, 4, 8, generator=g)
    half = LowRankPlusDiagonal(U.bfloat16(), values.bfloat16(), diagonal.bfloat16())
    full = LowRankPlusDiagonal(
        U.bfloat16().float(), values, diagonal.bfloat16().float()
    )
    tol = {"rtol": 0.05, "atol": 0.05}
    for name, got, expected in (
        ("solve", half.solve(X.bfloat16()), full.solve(X.bfloat16().float())),
        (
            "inv_square_form",
            half.inv_square_form(J.bfloat16()),
            full.inv_square_form(J.bfloat16().float()),
        ),
        ("logdet", half.logdet(), full.logdet()),
    ):
        assert got.dtype == torch.bfloat16, name
        torch.testing.assert_close(got.float(), expected, **tol, msg=name)
    draws = half.sample(4000, torch.Generator().manual_seed(1))
    assert draws.dtype == torch.bfloat16
    covariance = draws.float().T.cov()
    dense = torch.linalg.inv(full.to_matrix())
    torch.testing.assert_close(covariance, dense, rtol=0.15, atol=0.05)
