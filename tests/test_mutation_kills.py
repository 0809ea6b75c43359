"""Tests written to kill surviving mutants of a mutmut run (tools/mutation/run.sh).

Each test states a property of the library (against an oracle where there is a
computation); the mutants it was written for are named in its docstring. The
survivors that are equivalent (or only reachable on a GPU) are listed in
docs/mutation-testing.md.
"""

from __future__ import annotations

import pytest
import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace
from laplace.predictive.links import (
    bridge,
    bridge_norm,
    dirichlet_from_gaussian,
    link,
    mc,
    mc_gaussian,
    probit,
    sample_outputs,
)
from laplace.prior import (
    as_prior_precision,
    check_gridsearch_arguments,
    check_marglik_arguments,
    expand_prior_precision,
    prior_precision_of_structure,
)

DTYPE = torch.float64


def _model(n_out=2, seed=0, device="cpu"):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, n_out)).to(
        device=device, dtype=DTYPE
    )


def _loader(likelihood, n=16, n_out=2, seed=1, device="cpu", y_shape=None):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g, dtype=DTYPE)
    if likelihood == "classification":
        y = torch.randint(0, n_out, (n,), generator=g)
    else:
        y = torch.randn(n, n_out, generator=g, dtype=DTYPE)
        y = y.reshape(y_shape or y.shape)
    return DataLoader(TensorDataset(X.to(device), y.to(device)), batch_size=8)


def _fitted(structure, likelihood, device="cpu", n_out=2, **kwargs):
    la = Laplace(
        _model(n_out, device=device),
        likelihood,
        subset_of_weights="all",
        hessian_structure=structure,
        **kwargs,
    )
    kind = "classification" if likelihood == "reward_modeling" else likelihood
    la.fit(_loader(kind, n_out=n_out, device=device))
    return la


# -- laplace.prior: validation -------------------------------------------------------
def test_prior_precision_is_built_on_the_requested_device_not_the_default_one():
    """A number becomes a tensor on ``device`` and the layer counts are made on the
    precision's device, even when torch's default device is another one (mutants
    dropping ``device=``: as_prior_precision 7/10, expand_prior_precision 16/18,
    prior_precision_of_structure 17/23); on a GPU a given tensor is moved to
    ``device`` (as_prior_precision 14/17/19/21)."""
    params = [torch.zeros(3), torch.zeros(4)]
    precision = torch.tensor([1.0, 2.0])
    with torch.device("meta"):
        scalar = as_prior_precision(2.0, 2, 7, dtype=DTYPE, device="cpu")
        layerwise = expand_prior_precision(precision, params)
        init = prior_precision_of_structure(3.0, "layerwise", 2, 7, device="cpu")
    for t in [scalar, layerwise, init]:
        assert t.device == torch.device("cpu")
    torch.testing.assert_close(layerwise, torch.tensor([1.0] * 3 + [2.0] * 4))
    torch.testing.assert_close(init, torch.full((2,), 3.0))
    if torch.cuda.is_available():
        cuda = torch.device("cuda", torch.cuda.current_device())
        assert as_prior_precision(torch.ones(1), 2, 7, device=cuda).device == cuda
        assert as_prior_precision(torch.ones(1), 2, 7, device="cuda").is_cuda


def test_any_length_is_accepted_before_the_parameters_are_known():
    """With ``n_params=None`` a 1-D precision of any length passes (mutant 29)."""
    value = as_prior_precision(torch.ones(5), None, None)
    assert value.shape == (5,)


def test_errors_name_the_argument_and_the_sizes():
    """Error messages start with the argument's name and give the sizes that would
    work (as_prior_precision 1/2, expand_prior_precision 20-22,
    prior_precision_of_structure 8/18/24-26)."""
    with pytest.raises(ValueError, match=r"^prior_precision must be positive"):
        as_prior_precision(-1.0, 2, 7)
    with pytest.raises(ValueError, match=r"^prior_precision must be a scalar"):
        as_prior_precision(torch.ones(3), 2, 7)
    params = [torch.zeros(3), torch.zeros(4)]
    with pytest.raises(ValueError, match=r"3 entries .* 2 layers nor 7 parameters\.$"):
        expand_prior_precision(torch.ones(3), params)
    with pytest.raises(ValueError, match=r"^prior_structure='x' is not valid"):
        prior_precision_of_structure(1.0, "x", 2, 7)
    with pytest.raises(ValueError, match=r"^init_prior_prec must be positive"):
        prior_precision_of_structure(0.0, "scalar", 2, 7)


@pytest.mark.parametrize("n_steps", [0, -1, True, 1.5, "3"])
def test_marglik_refuses_a_non_positive_or_non_integer_n_steps(n_steps):
    """check_marglik_arguments mutants 1/2/6."""
    with pytest.raises(ValueError, match=r"^n_steps must be a positive integer"):
        check_marglik_arguments(n_steps, 0.1)


@pytest.mark.parametrize("lr", [0, 0.0, -0.1, "0.1"])
def test_marglik_refuses_a_non_positive_lr(lr):
    """check_marglik_arguments mutants 7/10/12."""
    with pytest.raises(ValueError, match=r"^lr must be a positive number"):
        check_marglik_arguments(5, lr)


def test_the_smallest_valid_tuning_arguments_are_accepted():
    """One step, one grid point and an empty log range are valid
    (check_marglik_arguments 4/5, check_gridsearch_arguments 18/19/22)."""
    check_marglik_arguments(1, 1e-3)
    check_gridsearch_arguments([()], None, 0.0, 0.0, 1)


@pytest.mark.parametrize("grid_size", [0, True, 2.5])
def test_gridsearch_refuses_a_non_positive_or_non_integer_grid_size(grid_size):
    """check_gridsearch_arguments mutants 15/16/20."""
    with pytest.raises(ValueError, match=r"^grid_size must be a positive integer"):
        check_gridsearch_arguments([()], None, -1.0, 1.0, grid_size)


def test_gridsearch_argument_errors_name_what_is_wrong():
    """check_gridsearch_arguments mutants 3/4/10-14/23."""
    with pytest.raises(
        ValueError, match=r"^method='gridsearch' needs val_loader=, a DataLoader"
    ):
        check_gridsearch_arguments(None, None, -1.0, 1.0, 3)
    with pytest.raises(
        TypeError, match=r"^loss must be a torchmetrics\.Metric .*int\.$"
    ):
        check_gridsearch_arguments([()], 3, -1.0, 1.0, 3)
    with pytest.raises(
        ValueError, match=r"log_prior_prec_min \(2\.0\) must not exceed"
    ):
        check_gridsearch_arguments([()], None, 2.0, 1.0, 3)


# -- laplace.prior: tuning -------------------------------------------------------------
def test_marglik_tuning_reaches_the_evidence_maximum(device):
    """With the given ``lr`` Adam reaches the maximiser of the evidence over a
    scalar prior precision, found by brute force on a fine grid (tune_by_marglik 9:
    Adam's default lr would not get there in the steps given)."""
    la = _fitted("full", "regression", device=device)
    la.optimize_prior_precision(method="marglik", n_steps=150, lr=0.1)
    tuned = la.prior_precision.log().item()
    grid = torch.linspace(-4, 6, 1001, dtype=DTYPE, device=device)
    evidence = torch.stack(
        [la.log_marginal_likelihood(prior_precision=g.exp()) for g in grid]
    )
    best = grid[evidence.argmax()].item()
    assert -4 < best < 6  # an interior maximum
    assert abs(tuned - best) < 0.05


def test_a_non_finite_evidence_stops_marglik_tuning_and_keeps_the_prior(
    device, monkeypatch
):
    """The evidence turning NaN at step 2: the error names the step and the
    previous prior precision is kept (tune_by_marglik 1/25/26/28)."""
    la = _fitted("diag", "regression", device=device, prior_precision=0.5)
    evidence, calls = la.log_marginal_likelihood, []

    def failing(*args, **kwargs):
        calls.append(None)
        value = evidence(*args, **kwargs)
        return value * float("nan") if len(calls) == 3 else value

    monkeypatch.setattr(la, "log_marginal_likelihood", failing)
    with pytest.raises(RuntimeError, match=r"became nan at step 2; try a smaller lr"):
        la.optimize_prior_precision(method="marglik", n_steps=5)
    torch.testing.assert_close(
        la.prior_precision, torch.tensor([0.5], dtype=DTYPE, device=device)
    )


def test_an_overflowing_marglik_tuning_keeps_the_prior(device):
    """An lr so large that the first step overflows the precision: the refusal of
    the infinite precision propagates and the previous prior precision is kept."""
    la = _fitted("diag", "regression", device=device, prior_precision=0.5)
    with pytest.raises(ValueError, match="positive and finite"):
        la.optimize_prior_precision(method="marglik", n_steps=5, lr=1e4)
    torch.testing.assert_close(
        la.prior_precision, torch.tensor([0.5], dtype=DTYPE, device=device)
    )


@pytest.mark.parametrize("method", ["marglik", "gridsearch"])
def test_the_progress_bar_shows_only_when_asked(method, capsys):
    """``progress_bar`` switches a tqdm bar labelled with the method (tune_by_marglik
    11/12/14/15/17-19, tune_by_gridsearch 18/19/21/22/24-26)."""
    la = _fitted("diag", "classification")
    kwargs = {"n_steps": 2} if method == "marglik" else {"grid_size": 2}
    if method == "gridsearch":
        kwargs["val_loader"] = _loader("classification", seed=3)
    la.optimize_prior_precision(method=method, progress_bar=False, **kwargs)
    assert capsys.readouterr().err == ""
    la.optimize_prior_precision(method=method, progress_bar=True, **kwargs)
    assert f"{method}: 100%" in capsys.readouterr().err


@pytest.mark.parametrize("pred_type", ["glm", "nn"])
def test_gridsearch_default_regression_loss_is_the_predictive_nll(pred_type, device):
    """Regression without a loss: the grid value minimising the Gaussian NLL of the
    validation targets under ``N(f_mu, f_var + sigma^2 I)``, brute force over the
    public predictive; 'glm' gives the full (N, C, C) f_var, 'nn' its sampled
    diagonal (N, C) (_loss_inputs 19)."""
    la = _fitted("full", "regression", device=device, sigma_noise=0.3)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 3, generator=g, dtype=DTYPE).to(device)
    with torch.no_grad():  # targets near the network: an interior optimal prior
        y = la.model(x) + 0.5 * torch.randn(16, 2, generator=g, dtype=DTYPE).to(device)
    val = DataLoader(TensorDataset(x, y), batch_size=8)
    torch.manual_seed(0)
    la.optimize_prior_precision(
        method="gridsearch",
        val_loader=val,
        grid_size=9,
        pred_type=pred_type,
        link_approx="mc",
        n_samples=2000,
    )
    tuned = la.prior_precision.clone()
    grid = torch.logspace(-4, 4, 9, dtype=DTYPE, device=device)
    nlls = []
    for value in grid:
        la.prior_precision = float(value)
        f_mu, f_var = la(x, pred_type=pred_type, link_approx="mc", n_samples=2000)
        f_var = f_var if f_var.ndim == 3 else torch.diag_embed(f_var)
        cov = f_var + 0.3**2 * torch.eye(2, dtype=DTYPE, device=device)
        dist = torch.distributions.MultivariateNormal(f_mu, cov)
        nlls.append(-dist.log_prob(y).mean().item())
    assert len(set(nlls)) == len(nlls)
    best = int(torch.tensor(nlls).argmin())
    assert 0 < best < 8  # an interior minimum, so the noise term matters
    torch.testing.assert_close(tuned, grid[best].reshape(1))


def test_gridsearch_gives_a_metric_targets_in_the_prediction_shape(device):
    """One regression output with targets of shape (N,): the metric sees them as
    (N, 1) like f_mu (torchmetrics refuses mismatched shapes) (_evaluate 4)."""
    la = _fitted("diag", "regression", device=device, n_out=1)
    val = _loader("regression", n_out=1, seed=5, device=device, y_shape=(-1,))
    la.optimize_prior_precision(
        method="gridsearch",
        val_loader=val,
        grid_size=2,
        loss=torchmetrics.MeanSquaredError(),
    )
    assert la.prior_precision.shape == (1,)


def test_gridsearch_with_sampled_predictions_uses_n_samples():
    """``n_samples`` reaches the sampled ('nn') predictive (tune_by_gridsearch 11)."""
    la = _fitted("diag", "classification")
    la.optimize_prior_precision(
        method="gridsearch",
        pred_type="nn",
        link_approx="mc",
        n_samples=3,
        val_loader=_loader("classification", seed=3),
        grid_size=2,
    )
    assert la.prior_precision.shape == (1,)


@pytest.mark.parametrize("failure", ["raises", "nan"])
def test_a_failing_gridsearch_keeps_the_prior(failure):
    """A loss that raises, or that is NaN for every grid value: the previous prior
    precision is kept (tune_by_gridsearch 6/41/50/51)."""
    la = _fitted("diag", "classification", prior_precision=0.5)

    def loss(p, y):
        if failure == "raises":
            raise KeyError("boom")
        return float("nan")

    expected = (
        (KeyError, "boom")
        if failure == "raises"
        else (RuntimeError, "^The validation loss is not finite")
    )
    with pytest.raises(expected[0], match=expected[1]):
        la.optimize_prior_precision(
            method="gridsearch",
            val_loader=_loader("classification", seed=3),
            grid_size=2,
            loss=loss,
        )
    torch.testing.assert_close(la.prior_precision, torch.tensor([0.5], dtype=DTYPE))


# -- laplace.predictive.links --------------------------------------------------------
def _singular_covariances():
    """Rank one, zero and the sum-zero centring matrix (PSD, singular)."""
    v = torch.tensor([1.0, -2.0, 0.5], dtype=DTYPE)
    centring = torch.eye(3, dtype=DTYPE) - 1 / 3
    return torch.stack([torch.outer(v, v), torch.zeros(3, 3, dtype=DTYPE), centring])


def test_sampling_singular_covariances_is_differentiable():
    """Singular PSD covariances are factored by the jittered Cholesky, whose
    gradient is finite (the eigh fallback's is not at a zero covariance: mutants
    sending them to it, _psd_sqrt 23/24/57/70/71/74/75)."""
    f_var = _singular_covariances().requires_grad_(True)
    f_mu = torch.zeros(3, 3, dtype=DTYPE, requires_grad=True)
    s = sample_outputs(f_mu, f_var, 50, torch.Generator().manual_seed(0))
    s.square().sum().backward()
    assert torch.isfinite(f_var.grad).all() and torch.isfinite(f_mu.grad).all()


def test_an_indefinite_covariance_is_clipped_to_its_psd_part():
    """Covariances too indefinite for the jitter (eigenvalue -1e-2) are factored by
    eigh with the negative eigenvalues clipped: the samples have covariance
    ``Q diag(max(lam, 0)) Q^T``; two such rows among positive definite ones
    (_psd_sqrt 90-107)."""
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=DTYPE)).Q
    lam = torch.tensor([1.0, -1e-2, 2.0], dtype=DTYPE)
    bad = Q @ torch.diag(lam) @ Q.T
    clipped = Q @ torch.diag(lam.clamp_min(0.0)) @ Q.T
    pd = torch.eye(3, dtype=DTYPE) + 0.3
    f_var = torch.stack([pd, bad, pd, 2 * bad])
    f_mu = torch.zeros(4, 3, dtype=DTYPE)
    s = sample_outputs(f_mu, f_var, 40_000, torch.Generator().manual_seed(1))
    expected = torch.stack([pd, clipped, pd, 2 * clipped])
    cov = torch.einsum("sni,snj->nij", s, s) / s.shape[0]
    torch.testing.assert_close(cov, expected, atol=0.06, rtol=0)
    null = Q[:, 1]  # no sample leaves the PSD part
    torch.testing.assert_close(
        s[:, [1, 3]] @ null, torch.zeros(40_000, 2, dtype=DTYPE), atol=1e-7, rtol=0
    )


def test_sampling_works_on_the_inputs_device_not_the_default_one():
    """The identity and the jitter of the Cholesky retries are made on the
    covariance's device, even when torch's default device is another one
    (_psd_sqrt 8/11/15/18)."""
    f_mu = torch.zeros(3, 3, dtype=DTYPE)
    f_var = _singular_covariances()
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        s = sample_outputs(f_mu, f_var, 4, g)
    assert s.device == torch.device("cpu") and torch.isfinite(s).all()


def test_sampling_one_output_and_the_documented_defaults():
    """One output (C = 1) is a valid Gaussian (_check_gaussian 1); one sample is
    valid and the default is 100 samples, for ``sample_outputs``, ``mc_gaussian``
    and ``link('mc')`` (sample_outputs 1/9/10, mc_gaussian 1, link 1)."""
    f_mu = torch.zeros(2, 1, dtype=DTYPE)
    assert sample_outputs(f_mu, torch.ones(2, 1, 1, dtype=DTYPE), 1).shape == (1, 2, 1)
    mu = torch.tensor([[0.5, -0.2, 0.1]], dtype=DTYPE)
    var = torch.eye(3, dtype=DTYPE)[None]
    assert sample_outputs(mu, var).shape == (100, 1, 3)
    expected = mc(sample_outputs(mu, var, 100, torch.Generator().manual_seed(3)))
    for out in [
        mc_gaussian(mu, var, generator=torch.Generator().manual_seed(3)),
        link("mc", mu, var, generator=torch.Generator().manual_seed(3)),
    ]:
        torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("n_samples", [0, True, 2.0])
def test_sampling_refuses_a_bad_n_samples(n_samples):
    """sample_outputs 7."""
    with pytest.raises(ValueError, match="n_samples must be a positive int"):
        sample_outputs(torch.zeros(1, 2), torch.ones(1, 2), n_samples)


@pytest.mark.parametrize("fn", [bridge, bridge_norm, dirichlet_from_gaussian])
def test_the_bridges_need_two_classes(fn):
    """The Laplace bridge needs C >= 2 and works for C = 2 (bridge_norm 6,
    dirichlet_from_gaussian 6/7)."""
    with pytest.raises(ValueError, match="at least 2 classes, got C=1"):
        fn(torch.zeros(2, 1, dtype=DTYPE), torch.ones(2, 1, dtype=DTYPE))
    out = fn(torch.tensor([[0.3, -0.3]], dtype=DTYPE), torch.ones(1, 2, dtype=DTYPE))
    assert out.shape == (1, 2) and torch.isfinite(out).all()


def test_link_input_errors_name_what_is_wrong():
    """_check_gaussian 2/5-10, mc 5-7, link 7/12."""
    var = torch.ones(1, 2)
    with pytest.raises(
        TypeError, match=r"^f_mu and f_var must be torch\.Tensors, got list and Tensor"
    ):
        probit([[0.0, 1.0]], var)
    with pytest.raises(TypeError, match=r"got Tensor and list\.$"):
        probit(torch.zeros(1, 2), [[1.0, 1.0]])
    with pytest.raises(
        ValueError, match=r"f_samples must have shape \(S, N, C\), got None"
    ):
        mc([[0.0]])
    with pytest.raises(ValueError, match=r"got \(2, 3\)\.$"):
        mc(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"expected one of 'probit', 'bridge', "):
        link(["probit"], torch.zeros(1, 2), var)


# -- laplace.parametric ----------------------------------------------------------------
def test_kron_laplace_defaults_and_forwarded_arguments():
    """KronLaplace has laplace-torch 0.3's defaults and hands its arguments to
    BaseLaplace (KronLaplace.__init__ 1/2/6-9/20-24/32-36)."""
    from laplace import KronLaplace
    from laplace.curvature import BackPackGGN

    la = KronLaplace(_model(), "regression")
    assert la.sigma_noise.item() == 1.0 and la.prior_precision.tolist() == [1.0]
    assert (la.dict_key_x, la.dict_key_y) == ("input_ids", "labels")
    la = KronLaplace(
        _model(),
        "regression",
        dict_key_x="x",
        dict_key_y="y",
        backend=BackPackGGN,
        backend_kwargs={"a": 1},
        asdl_fisher_kwargs={"b": 2},
    )
    assert (la.dict_key_x, la.dict_key_y) == ("x", "y")
    assert la.backend_kwargs == {"a": 1} and la.asdl_fisher_kwargs == {"b": 2}
    la = KronLaplace(_model(), "regression", backend=BackPackGGN)
    assert isinstance(la.backend, BackPackGGN)


def test_kron_laplace_refuses_a_per_parameter_prior_naming_the_alternatives():
    """KronLaplace._check_prior_precision 3-5."""
    from laplace import KronLaplace

    with pytest.raises(
        ValueError, match=r"Use hessian_structure='diag' or 'full' for a per-parameter"
    ):
        KronLaplace(_model(), "regression", prior_precision=torch.ones(32))


def test_kron_laplace_keeps_the_model_dtype_and_its_fit_progress_bar(capsys):
    """The Kron factors have the model's dtype (KronLaplace._init_H 3/6); ``fit``
    shows a bar only when asked (KronLaplace.fit 2/5/8)."""
    la = _fitted("kron", "regression")
    assert capsys.readouterr().err == ""
    assert all(f.dtype == DTYPE for fs in la.H.kfacs for f in fs)
    la.fit(_loader("regression"), progress_bar=True)
    assert "100%" in capsys.readouterr().err


def test_a_non_positive_definite_precision_says_what_to_do():
    """not_positive_definite 1-9: the message names the causes and the remedies."""
    la = _fitted("full", "regression", prior_precision=1e-3)
    la.H = -la.H.abs().sum() * torch.eye(la.n_params, dtype=DTYPE)
    la.prior_precision = torch.full((la.n_layers,), 1e-3, dtype=DTYPE)
    with pytest.raises(
        Exception,
        match=r"The curvature has negative eigenvalues \(e\.g\. the exact Hessian "
        r"away from a minimum\) or the prior precision is too small: use a GGN/EF "
        r"backend or a larger prior precision\.$",
    ):
        _ = la.log_det_posterior_precision
