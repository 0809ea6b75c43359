"""Prior precision structures against their explicit per-parameter expansion."""

from __future__ import annotations

import pytest
import torch

from laplace.prior import (
    as_prior_precision,
    expand_prior_precision,
    parameters_per_layer,
    prior_precision_of_structure,
)

PARAMS = [torch.zeros(3, 2), torch.zeros(3), torch.zeros(1, 3)]  # P = 12, L = 3


def explicit_diag(values):
    """Per-parameter precisions written out entry by entry."""
    out = []
    for value, p in zip(values, PARAMS, strict=True):
        out += [value] * p.numel()
    return torch.tensor(out, dtype=torch.float64)


def test_parameters_per_layer():
    assert parameters_per_layer(PARAMS) == [6, 3, 3]


@pytest.mark.parametrize(
    "value, expected",
    [
        (2.0, explicit_diag([2.0, 2.0, 2.0])),
        (torch.tensor([2.0, 3.0, 5.0]), explicit_diag([2.0, 3.0, 5.0])),
        (torch.arange(1.0, 13.0), torch.arange(1.0, 13.0)),
    ],
    ids=["scalar", "layerwise", "diag"],
)
def test_expand_each_structure(value, expected, device):
    prec = as_prior_precision(value, 3, 12, dtype=torch.float64, device=device)
    params = [p.to(device) for p in PARAMS]
    torch.testing.assert_close(
        expand_prior_precision(prec, params), expected.to(device, torch.float64)
    )


def test_gradients_reach_the_structured_precision(device):
    layerwise = torch.tensor(
        [2.0, 3.0, 5.0], dtype=torch.float64, device=device, requires_grad=True
    )
    prec = as_prior_precision(layerwise, 3, 12)
    params = [p.to(device) for p in PARAMS]
    expand_prior_precision(prec, params).log().sum().backward()
    torch.testing.assert_close(
        layerwise.grad, torch.tensor([6 / 2, 3 / 3, 3 / 5]).to(device, torch.float64)
    )


@pytest.mark.parametrize(
    "structure, length", [("scalar", 1), ("layerwise", 3), ("diag", 12)]
)
def test_initial_precision_of_each_structure(structure, length, device):
    prec = prior_precision_of_structure(
        0.5, structure, 3, 12, dtype=torch.float64, device=device
    )
    assert prec.shape == (length,)
    expected = torch.full((length,), 0.5, dtype=torch.float64, device=device)
    torch.testing.assert_close(prec, expected)


@pytest.mark.parametrize(
    "value, match",
    [
        (torch.ones(5), "length 1.*3.*12"),
        (torch.ones(2, 2), "shape"),
        (-1.0, "positive"),
        (torch.tensor([1.0, 0.0, 1.0]), "positive"),
        (float("nan"), "positive and finite"),
    ],
)
def test_bad_prior_precision(value, match):
    with pytest.raises(ValueError, match=match):
        as_prior_precision(value, 3, 12)


def test_bad_structure_names_the_allowed_ones():
    with pytest.raises(ValueError, match="prior_structure.*'scalar'"):
        prior_precision_of_structure(1.0, "blockwise", 3, 12)
    with pytest.raises(ValueError, match="needs 12"):
        prior_precision_of_structure(torch.ones(3), "diag", 3, 12)


# -- grid search: the default regression loss ------------------------------------------
GRID_CASES = [
    ("all", "full"),
    ("all", "kron"),
    ("all", "diag"),
    ("last_layer", "full"),
    ("all", "gp"),
]


def regression_problem(device):
    """The MLP 3-8-2 fit a little on 8 noisy points, and 20 validation points."""
    from torch import nn

    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 3, generator=g, dtype=torch.float64)
    y = torch.stack([x[:, 0].sin(), x[:, 1] * x[:, 2]], 1)
    y = y + 0.3 * torch.randn(50, 2, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        ((model(x[:8]) - y[:8]) ** 2).sum().backward()
        opt.step()
    x, y = x.to(device), y.to(device)
    return model.to(device), (x[:8], y[:8]), (x[30:], y[30:])


@pytest.mark.parametrize("subset, structure", GRID_CASES)
def test_regression_gridsearch_maximises_the_predictive_likelihood(
    subset, structure, device
):
    """Brute force: for every grid value, the log-likelihood of the validation
    targets under ``N(f_mu, f_var + sigma^2 I)`` from the public predictive; the
    default loss picks its maximiser (an interior one), where the mean squared
    error of ``f_mu`` is the same for every value."""
    from torch.distributions import MultivariateNormal
    from torch.utils.data import DataLoader, TensorDataset

    from laplace import Laplace

    model, (x, y), (xv, yv) = regression_problem(device)
    kwargs = {"n_subset": 8} if structure == "gp" else {}
    la = Laplace(model, "regression", subset, structure, sigma_noise=0.4, **kwargs)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=10))
    grid = torch.logspace(-3, 3, 13, dtype=torch.float64)
    log_liks, mses = [], []
    for value in grid:
        la.prior_precision = float(value)
        f_mu, f_var = la(xv, pred_type="glm")
        cov = f_var + 0.16 * torch.eye(2, dtype=f_var.dtype, device=device)
        log_liks.append(MultivariateNormal(f_mu, cov).log_prob(yv).sum().item())
        mses.append(((f_mu - yv) ** 2).mean().item())
    log_liks = torch.tensor(log_liks)
    best = int(log_liks.argmax())
    assert 0 < best < len(grid) - 1
    assert log_liks.sort(descending=True).values[1] < log_liks[best] - 1e-6
    assert max(mses) - min(mses) < 1e-12  # laplace-torch's default cannot choose

    la.prior_precision = 1.0
    la.optimize_prior_precision(
        method="gridsearch",
        val_loader=DataLoader(TensorDataset(xv, yv), batch_size=7),
        log_prior_prec_min=-3,
        log_prior_prec_max=3,
        grid_size=13,
    )
    torch.testing.assert_close(
        la.prior_precision.cpu(), grid[best].reshape(1).to(la.prior_precision.dtype)
    )


@pytest.mark.parametrize("full", [True, False], ids=["covariance", "diagonal"])
def test_running_gaussian_nll_is_the_mean_negative_log_density(full, device):
    from torch.distributions import MultivariateNormal

    from laplace.utils.metrics import RunningGaussianNLLMetric

    g = torch.Generator().manual_seed(4)
    mean = torch.randn(9, 3, generator=g, dtype=torch.float64)
    A = torch.randn(9, 3, 3, generator=g, dtype=torch.float64)
    cov = A @ A.mT + 0.1 * torch.eye(3, dtype=torch.float64)
    if not full:
        cov = torch.diag_embed(cov.diagonal(dim1=-2, dim2=-1))
    y = torch.randn(9, 3, generator=g, dtype=torch.float64)
    expected = -MultivariateNormal(mean, cov).log_prob(y).mean()
    var = cov if full else cov.diagonal(dim1=-2, dim2=-1)
    metric = RunningGaussianNLLMetric().to(device)
    for rows in (slice(0, 4), slice(4, 9)):
        metric.update(mean[rows].to(device), var[rows].to(device), y[rows].to(device))
    torch.testing.assert_close(metric.compute().cpu(), expected)
