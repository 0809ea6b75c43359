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
