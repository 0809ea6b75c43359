"""The fused log-determinant of c * H + d against plain autograd."""

from __future__ import annotations

import pytest
import torch

from laplace.utils.logdet import affine_log_sum


@pytest.mark.parametrize("kron", [False, True])
def test_value_and_gradients_match_autograd(kron):
    g = torch.Generator().manual_seed(0)
    h = torch.rand(7, generator=g, dtype=torch.float64)
    a = torch.rand(5, generator=g, dtype=torch.float64) if kron else None
    c = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    d = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    lam = torch.outer(h, a) if kron else h
    expected = torch.log(c * lam + d).sum()
    dc, dd = torch.autograd.grad(expected, (c, d))
    value = affine_log_sum(c, d, h, a)
    torch.testing.assert_close(value, expected)
    gc, gd = torch.autograd.grad(value, (c, d))
    torch.testing.assert_close(gc, dc)
    torch.testing.assert_close(gd, dd)


def test_constants_and_plain_numbers():
    h = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    value = affine_log_sum(2.0, 1.0, h)
    torch.testing.assert_close(value, torch.log(2 * h + 1).sum())
    assert not value.requires_grad


@pytest.mark.parametrize("kron", [False, True])
def test_float32_gradient_in_the_scale_has_no_cancellation(kron, device):
    """``d/dc sum log(c h + d) = sum h / (c h + d)``: with most ``h`` zero (the
    curvature of an over-parameterised network) the form ``(n - d sum 1/(c h + d))/c``
    subtracts two numbers of about ``n`` and keeps no correct digit in float32."""
    h = torch.zeros(100_003, dtype=torch.float64)
    h[:3] = torch.tensor([2.0, 5.0, 11.0], dtype=torch.float64)
    a = torch.tensor([1.0, 1e-9], dtype=torch.float64) if kron else None
    lam = torch.outer(h, a).flatten() if kron else h
    c, d = 0.7, 1e-3
    expected_dc = (lam / (c * lam + d)).sum()
    expected_value = torch.log(c * lam + d).sum()
    c32 = torch.tensor(c, device=device, requires_grad=True)
    d32 = torch.tensor(d, device=device, requires_grad=True)
    h32 = h.float().to(device)
    a32 = None if a is None else a.float().to(device)
    value = affine_log_sum(c32, d32, h32, a32)
    assert value.dtype == torch.float32
    (dc,) = torch.autograd.grad(value, c32)
    torch.testing.assert_close(dc.double().cpu(), expected_dc, rtol=1e-5, atol=0)
    torch.testing.assert_close(value.double().cpu(), expected_value, rtol=1e-6, atol=0)


def test_affine_log_sum_takes_plain_numbers_at_the_eigenvalues_precision():
    """``c`` and ``d`` given as Python numbers enter in ``h``'s dtype exactly (not
    rounded through the default float32 first)."""
    h = torch.tensor([0.5, 2.0, 7.0], dtype=torch.float64)
    expected = torch.log(0.1 * h + 0.3).sum()
    torch.testing.assert_close(
        affine_log_sum(0.1, 0.3, h), expected, rtol=1e-15, atol=0
    )
