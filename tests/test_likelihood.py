"""The likelihood objects against their closed forms."""

from __future__ import annotations

import pytest
import torch

import oracles
from laplace.curvature import NativeGGN
from laplace.likelihood import get_likelihood
from laplace.utils.enums import Likelihood


@pytest.mark.parametrize("name", ["regression", "classification"])
def test_hessian_sqrt_factors_the_output_hessian(name, device):
    f = torch.randn(5, 4, dtype=torch.float64, device=device)
    L = get_likelihood(name).hessian_sqrt(f)
    torch.testing.assert_close(L @ L.transpose(1, 2), oracles.output_hessian(name, f))


@pytest.mark.parametrize("name", ["regression", "classification"])
def test_loss_gradient_is_the_autograd_gradient(name, device):
    lik = get_likelihood(name)
    f = torch.randn(5, 4, dtype=torch.float64, device=device, requires_grad=True)
    if name == "classification":
        y = torch.randint(0, 4, (5,), device=device)
    else:
        y = torch.randn_like(f)
    (expected,) = torch.autograd.grad(oracles.loss(name, f, y), f)
    torch.testing.assert_close(lik.loss_gradient(f.detach(), y), expected)
    torch.testing.assert_close(lik.loss(f, y), oracles.loss(name, f, y))


@pytest.mark.parametrize("name", ["regression", "classification"])
def test_sampled_gradients_estimate_the_output_hessian(name, device):
    f = torch.randn(3, 4, dtype=torch.float64, device=device)
    g = torch.Generator(device).manual_seed(0)
    M = get_likelihood(name).sampled_gradients(f, 200_000, g)
    estimate = M @ M.transpose(1, 2)
    torch.testing.assert_close(
        estimate, oracles.output_hessian(name, f), atol=0.02, rtol=0.0
    )


def test_reward_modeling_uses_the_classification_curvature(device):
    lik = get_likelihood("reward_modeling")
    assert lik.pairs and lik.factor == 1.0
    f = torch.randn(5, 2, dtype=torch.float64, device=device)
    L = lik.hessian_sqrt(f)
    torch.testing.assert_close(L @ L.mT, oracles.output_hessian("classification", f))
    backend = NativeGGN(torch.nn.Linear(3, 1), "reward_modeling")
    assert backend.likelihood is Likelihood.CLASSIFICATION and backend.reward_modeling


def test_regression_accepts_flat_targets_for_one_output(device):
    lik = get_likelihood("regression")
    f, y = torch.randn(5, 1, device=device), torch.randn(5, device=device)
    assert lik.check_targets(f, y).shape == (5, 1)


def test_classification_hessian_factor_has_rank_c_minus_1_columns(device):
    lik = get_likelihood("classification")
    f = torch.randn(6, 4, dtype=torch.float64, device=device)
    f[0] = torch.tensor([-50.0, -50.0, -50.0, 50.0])  # p = e_C: no reflection needed
    f[1] = torch.tensor([50.0, -50.0, -50.0, -50.0])
    L = lik.hessian_sqrt(f)
    assert L.shape == (6, 4, 3)
    p = torch.softmax(f, -1)
    expected = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    torch.testing.assert_close(L @ L.mT, expected)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_hessian_moments_are_the_diagonals_and_sum_of_the_output_hessians(
    likelihood, device
):
    g = torch.Generator().manual_seed(0)
    f = torch.randn(7, 5, dtype=torch.float64, generator=g).to(device)
    L = oracles.output_hessian(likelihood, f)
    diag, total = get_likelihood(likelihood).hessian_moments(f)
    torch.testing.assert_close(diag, L.diagonal(dim1=1, dim2=2))
    torch.testing.assert_close(total, L.sum(0))
