"""The Laplace() factory, the argument contract, bad input and serialization."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import laplace
from laplace import (
    BaseLaplace,
    DiagLaplace,
    FullLaplace,
    KronLaplace,
    Laplace,
    LowRankLaplace,
    ParametricLaplace,
)
from laplace.curvature import AsdlGGN, BackPackGGN, CurvlinopsEF, CurvlinopsGGN
from laplace.utils import RunningNLLMetric

STRUCTURES = {
    "full": FullLaplace,
    "kron": KronLaplace,
    "diag": DiagLaplace,
    "lowrank": LowRankLaplace,
}
DTYPE = torch.float64


def _model(n_out=3, seed=0, *, device):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, n_out))
    return model.to(device, DTYPE)


def _loader(likelihood, n=20, n_out=3, batch_size=8, seed=1, *, device):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=g, dtype=DTYPE)
    if likelihood == "classification":
        y = torch.randint(0, n_out, (n,), generator=g)
    else:
        y = torch.randn(n, n_out, generator=g, dtype=DTYPE)
    return DataLoader(TensorDataset(X.to(device), y.to(device)), batch_size=batch_size)


def _fitted(structure, likelihood="classification", *, device, **kwargs):
    la = Laplace(
        _model(device=device),
        likelihood,
        subset_of_weights="all",
        hessian_structure=structure,
        **kwargs,
    )
    la.fit(_loader(likelihood, device=device))
    return la


# -- the factory --------
@pytest.mark.parametrize("structure", STRUCTURES)
def test_factory_builds_the_registered_class(structure, device):
    la = Laplace(_model(device=device), "classification", "all", structure)
    assert type(la) is STRUCTURES[structure]
    assert isinstance(la, ParametricLaplace) and isinstance(la, BaseLaplace)


def test_factory_accepts_enums_and_passes_arguments(device):
    la = Laplace(
        _model(device=device),
        laplace.Likelihood.REGRESSION,
        laplace.SubsetOfWeights.ALL,
        laplace.HessianStructure.KRON,
        sigma_noise=0.5,
        damping=True,
    )
    assert isinstance(la, KronLaplace) and la.damping
    assert float(la.sigma_noise) == 0.5


def test_factory_refuses_unknown_combinations_listing_valid_ones(device):
    with pytest.raises(ValueError, match="valid combinations: .*'all', 'diag'"):
        Laplace(_model(device=device), "classification", "subnetwork", "gp")
    with pytest.raises(ValueError, match="hessian_structure='foo' is not valid"):
        Laplace(_model(device=device), "classification", "all", "foo")


def test_public_names_import():
    from laplace.baselaplace import DiagLaplace as D
    from laplace.baselaplace import FullLaplace as F

    assert D is DiagLaplace and F is FullLaplace
    for name in ["Laplace", "FullLaplace", "KronLaplace", "DiagLaplace"]:
        assert name in laplace.__all__


# -- arguments --------
def test_only_parameters_requiring_grad_are_treated(device):
    model = _model(device=device)
    model[0].bias.requires_grad_(False)
    la = DiagLaplace(model, "classification")
    expected = sum(p.numel() for p in model.parameters()) - 6
    assert la.n_params == expected and la.n_layers == 3
    la.fit(_loader("classification", device=device))
    assert la.posterior_precision.shape == (expected,)


def test_backend_kwargs_and_asdl_fisher_kwargs_reach_the_backend(device):
    la = DiagLaplace(
        _model(device=device),
        "classification",
        backend_kwargs={"stochastic": True, "num_samples": 3},
    )
    assert la.backend.stochastic and la.backend.num_samples == 3
    # ASDL's FisherConfig(scale=3) multiplies the curvature it returns by 3
    fits = {}
    for kwargs in ({}, {"scale": 3.0}):
        la = DiagLaplace(
            _model(device=device),
            "classification",
            backend=AsdlGGN,
            asdl_fisher_kwargs=kwargs,
        )
        assert isinstance(la.backend, AsdlGGN) and la.backend.fisher_kwargs == kwargs
        la.fit(_loader("classification", device=device))
        fits[len(kwargs)] = la.H
    assert fits[0].abs().max() > 0
    torch.testing.assert_close(fits[1], 3 * fits[0])


@pytest.mark.parametrize("backend", [CurvlinopsGGN, CurvlinopsEF, BackPackGGN, AsdlGGN])
def test_each_backend_fits(backend, device):
    la = Laplace(
        _model(device=device), "classification", "all", "diag", backend=backend
    )
    la.fit(_loader("classification", device=device))
    assert torch.isfinite(la.log_marginal_likelihood())


def test_backend_must_be_a_curvature_class(device):
    with pytest.raises(TypeError, match="CurvatureInterface subclass"):
        DiagLaplace(
            _model(device=device),
            "classification",
            backend=CurvlinopsGGN(_model(device=device), "regression"),
        )


def test_hyperparameters_are_validated(device):
    with pytest.raises(ValueError, match="sigma_noise must be 1"):
        DiagLaplace(_model(device=device), "classification", sigma_noise=2.0)
    la = DiagLaplace(_model(device=device), "classification")
    with pytest.raises(ValueError, match="sigma_noise must be 1"):
        la.sigma_noise = 0.5
    with pytest.raises(ValueError, match="positive"):
        DiagLaplace(_model(device=device), "regression", sigma_noise=-1.0)
    with pytest.raises(ValueError, match="prior_precision must be a scalar or a 1-D"):
        DiagLaplace(
            _model(device=device),
            "regression",
            prior_precision=torch.ones(7, device=device),
        )
    with pytest.raises(ValueError, match="positive and finite"):
        DiagLaplace(_model(device=device), "regression", prior_precision=0.0)
    with pytest.raises(ValueError, match="prior_mean"):
        DiagLaplace(
            _model(device=device), "regression", prior_mean=torch.ones(3, device=device)
        )
    with pytest.raises(ValueError, match="temperature"):
        DiagLaplace(_model(device=device), "regression", temperature=0)
    with pytest.raises(ValueError, match="likelihood='gamma' is not valid"):
        DiagLaplace(_model(device=device), "gamma")
    with pytest.raises(ValueError, match="KronLaplace takes a scalar prior"):
        KronLaplace(
            _model(device=device),
            "regression",
            prior_precision=torch.ones(51, device=device),
        )


def test_prior_precision_structures_are_kept(device):
    la = DiagLaplace(
        _model(device=device),
        "regression",
        prior_precision=torch.tensor(2.0, device=device),
    )
    assert la.prior_precision.shape == (1,)
    la.prior_precision = torch.arange(1.0, 5.0, device=device)
    assert la.prior_precision.shape == (4,)
    assert la.prior_precision_diag.shape == (la.n_params,)
    assert la.prior_precision_diag[0] == 1 and la.prior_precision_diag[-1] == 4


def test_a_failed_setter_leaves_the_object_as_it_was(device):
    la = _fitted("diag", "regression", device=device)
    before = la.log_marginal_likelihood().item()
    with pytest.raises(ValueError):
        la.prior_precision = -1.0
    assert la.log_marginal_likelihood().item() == before


# -- before fit --------
@pytest.mark.parametrize("structure", STRUCTURES)
def test_evidence_and_tuning_before_fit_are_refused(structure, device):
    la = Laplace(_model(device=device), "classification", "all", structure)
    for call in [
        lambda: la.log_marginal_likelihood(),
        lambda: la.optimize_prior_precision(),
    ]:
        with pytest.raises(RuntimeError, match="not fitted: call fit"):
            call()


@pytest.mark.parametrize("structure", ["kron", "lowrank"])
def test_posterior_before_fit_is_refused_without_an_empty_curvature(structure, device):
    # laplace-torch refuses these too (Kron: "not fitted"; LowRank cannot be built)
    la = Laplace(_model(device=device), "classification", "all", structure)
    x = torch.randn(2, 4, dtype=DTYPE, device=device)
    for call in [lambda: la(x), lambda: la.sample(2), lambda: la.functional_samples(x)]:
        with pytest.raises(RuntimeError, match="not fitted: call fit"):
            call()


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_before_fit_the_posterior_is_the_prior(structure, device):
    """As laplace-torch: before fit the mean is the prior mean and the posterior
    precision the prior's; the predictive is the prior predictive J P0^-1 J^T."""
    torch.manual_seed(0)
    model = _model(device=device)
    mu0 = torch.randn(sum(p.numel() for p in model.parameters()), dtype=DTYPE)
    la = Laplace(
        model,
        "regression",
        "all",
        structure,
        prior_precision=2.0,
        prior_mean=mu0.to(device),
    )
    P = la.n_params
    torch.testing.assert_close(la.mean, mu0.to(device))
    expected = torch.full((P,), 2.0, dtype=DTYPE, device=device)
    prec = la.posterior_precision
    torch.testing.assert_close(prec if prec.ndim == 1 else prec.diagonal(), expected)
    torch.testing.assert_close(
        la.log_det_posterior_precision,
        torch.tensor(P * math.log(2.0), dtype=DTYPE, device=device),
    )
    assert la.log_likelihood.item() == 0.0  # no data seen
    x = torch.randn(3, 4, dtype=DTYPE, device=device)
    J = torch.func.jacrev(
        lambda p: torch.func.functional_call(
            model,
            dict(zip([n for n, _ in model.named_parameters()], _split(p, model))),
            (x,),
        )
    )(torch.nn.utils.parameters_to_vector(model.parameters()).detach())
    f_mu, f_var = la(x)
    torch.testing.assert_close(f_mu, model(x).detach())
    torch.testing.assert_close(f_var, torch.einsum("ncp,ndp->ncd", J, J) / 2.0)
    g = torch.Generator(device=device).manual_seed(0)
    samples = la.sample(20000, generator=g)
    torch.testing.assert_close(samples.mean(0), mu0.to(device), atol=0.05, rtol=0)
    torch.testing.assert_close(
        samples.var(0),
        torch.full((P,), 0.5, dtype=DTYPE, device=device),
        atol=0.05,
        rtol=0,
    )
    # a prior-only state loads back as prior-only, the model untouched
    before = torch.nn.utils.parameters_to_vector(model.parameters()).clone()
    other = Laplace(model, "regression", "all", structure, prior_precision=2.0)
    other.load_state_dict(la.state_dict())
    assert not other.fitted
    torch.testing.assert_close(other.mean, mu0.to(device))
    torch.testing.assert_close(
        torch.nn.utils.parameters_to_vector(model.parameters()), before
    )


def _split(theta, model):
    out, start = [], 0
    for p in model.parameters():
        out.append(theta[start : start + p.numel()].view(p.shape))
        start += p.numel()
    return out


# -- predictive arguments --------
def test_predictive_argument_errors_come_before_work(device):
    la = _fitted("diag", device=device)
    x = torch.randn(2, 4, dtype=DTYPE, device=device)
    with pytest.raises(ValueError, match="link_approx='mc'"):
        la(x, pred_type="nn")
    with pytest.raises(ValueError, match="link_approx='foo' is not valid"):
        la(x, link_approx="foo")
    with pytest.raises(ValueError, match="pred_type='gp' is not available"):
        la(x, pred_type="gp")
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        la(x, link_approx="mc", n_samples=0)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_predictive_shapes(structure, device):
    x = torch.randn(5, 4, dtype=DTYPE, device=device)
    la = _fitted(structure, device=device)
    for link in ["probit", "bridge", "bridge_norm", "mc"]:
        p = la(x, link_approx=link, n_samples=10)
        assert p.shape == (5, 3)
        torch.testing.assert_close(p.sum(-1), torch.ones(5, dtype=DTYPE, device=device))
    assert la(x, pred_type="nn", link_approx="mc", n_samples=4).shape == (5, 3)
    assert la(x, diagonal_output=True).shape == (5, 3)
    assert la.predictive_samples(x, n_samples=6).shape == (6, 5, 3)
    assert la.predictive_samples(x, "nn", n_samples=6).shape == (6, 5, 3)
    lr = _fitted(structure, "regression", device=device)
    f_mu, f_var = lr(x)
    assert f_mu.shape == (5, 3) and f_var.shape == (5, 3, 3)
    f_mu, f_cov = lr(x, joint=True)
    assert f_mu.shape == (15,) and f_cov.shape == (15, 15)
    f_mu, f_var = lr(x, pred_type="nn", link_approx="mc", n_samples=4)
    assert f_mu.shape == (5, 3) and f_var.shape == (5, 3)
    assert lr(x, diagonal_output=True)[1].shape == (5, 3)


# -- tuning --------
def test_gridsearch_needs_a_validation_loader(device):
    la = _fitted("diag", device=device)
    with pytest.raises(ValueError, match="needs val_loader"):
        la.optimize_prior_precision(method="gridsearch")
    with pytest.raises(ValueError, match="method='grid' is not valid"):
        la.optimize_prior_precision(method="grid")


def test_kron_refuses_a_diagonal_prior_structure_before_work(device):
    la = _fitted("kron", device=device)
    before = la.prior_precision.clone()
    with pytest.raises(ValueError, match="KronLaplace takes a scalar prior"):
        la.optimize_prior_precision(prior_structure="diag")
    torch.testing.assert_close(la.prior_precision, before)


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
@pytest.mark.parametrize("prior_structure", ["scalar", "layerwise", "diag"])
def test_marglik_tuning_increases_the_evidence(structure, prior_structure, device):
    if structure == "kron" and prior_structure == "diag":
        pytest.skip("refused, see above")
    la = _fitted(structure, device=device)
    before = la.log_marginal_likelihood().item()
    la.optimize_prior_precision(n_steps=30, prior_structure=prior_structure)
    n = {"scalar": 1, "layerwise": la.n_layers, "diag": la.n_params}[prior_structure]
    assert la.prior_precision.shape == (n,) and not la.prior_precision.requires_grad
    assert la.log_marginal_likelihood().item() > before


@pytest.mark.parametrize(
    "loss",
    [
        None,
        RunningNLLMetric(),
        lambda p, y: -p[torch.arange(len(y), device=y.device), y].log().mean(),
    ],
)
def test_gridsearch_with_metric_or_callable(loss, capsys, device):
    la = _fitted("kron", device=device)
    la.optimize_prior_precision(
        method="gridsearch",
        val_loader=_loader("classification", seed=5, device=device),
        grid_size=7,
        loss=loss,
        verbose=True,
    )
    tuned = la.prior_precision.clone()
    grid = torch.logspace(-4, 4, 7, dtype=DTYPE, device=device)
    x_val, y_val = next(
        iter(_loader("classification", seed=5, batch_size=10**6, device=device))
    )
    nlls = []
    for value in grid:  # brute force over the public probit predictive
        la.prior_precision = float(value)
        nlls.append(
            -la(x_val)[torch.arange(len(y_val), device=device), y_val]
            .log()
            .mean()
            .item()
        )
    assert len(set(nlls)) == len(nlls)  # the prior matters
    torch.testing.assert_close(tuned, grid[int(torch.tensor(nlls).argmin())].reshape(1))
    assert "prior precision" in capsys.readouterr().out


def test_gridsearch_regression_uses_mean_squared_error(device):
    la = _fitted("diag", "regression", device=device)
    la.optimize_prior_precision(
        method="gridsearch",
        val_loader=_loader("regression", seed=5, device=device),
        grid_size=3,
        loss=torchmetrics.MeanSquaredError(),
    )
    # a user loss gets f_mu, the network's output: every grid value ties and the
    # first (smallest) is kept, as in laplace-torch
    torch.testing.assert_close(
        la.prior_precision, torch.tensor([1e-4], dtype=DTYPE, device=device)
    )


# -- non-finite data --------
@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_nan_in_a_batch_is_named_and_the_fit_kept(structure, device):
    la = _fitted(structure, "regression", device=device)
    before = la.log_marginal_likelihood().item()
    X = torch.randn(12, 4, dtype=DTYPE, device=device)
    X[9, 0] = float("nan")
    y = torch.randn(12, 3, dtype=DTYPE, device=device)
    bad = DataLoader(TensorDataset(X, y), batch_size=4)
    with pytest.raises(RuntimeError, match="batch 2 is not finite"):
        la.fit(bad)
    assert la.log_marginal_likelihood().item() == before


# -- accumulation --------
@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_two_fits_on_halves_equal_one_fit_on_the_whole(structure, device):
    X = torch.randn(16, 4, dtype=DTYPE, device=device)
    y = torch.randint(0, 3, (16,), device=device)
    whole = Laplace(_model(device=device), "classification", "all", structure)
    whole.fit(DataLoader(TensorDataset(X, y), batch_size=5))
    halves = Laplace(_model(device=device), "classification", "all", structure)
    halves.fit(DataLoader(TensorDataset(X[:6], y[:6]), batch_size=4))
    halves.fit(DataLoader(TensorDataset(X[6:], y[6:]), batch_size=3), override=False)
    assert halves.n_data == whole.n_data == 16
    torch.testing.assert_close(halves.loss, whole.loss)
    torch.testing.assert_close(
        halves._posterior.to_matrix(), whole._posterior.to_matrix()
    )
    torch.testing.assert_close(
        halves.log_marginal_likelihood(), whole.log_marginal_likelihood()
    )


def test_lowrank_refuses_to_accumulate(device):
    la = _fitted("lowrank", device=device)
    with pytest.raises(ValueError, match="cannot accumulate"):
        la.fit(_loader("classification", device=device), override=False)


# -- serialization --------
def _roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # plain tensors and numbers only


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_state_dict_round_trip(structure, likelihood, device):
    kw = {"sigma_noise": 0.7} if likelihood == "regression" else {}
    la = _fitted(
        structure, likelihood, prior_precision=0.5, temperature=0.9, **kw, device=device
    )
    la.optimize_prior_precision(n_steps=5, prior_structure="layerwise")
    x = torch.randn(3, 4, dtype=DTYPE, device=device)
    expected = la(x)
    state = _roundtrip(la.state_dict())
    model = _model(
        seed=123, device=device
    )  # other weights: the MAP comes from the state
    la2 = Laplace(model, likelihood, "all", structure)
    la2.load_state_dict(state)
    torch.testing.assert_close(la2(x), expected)
    torch.testing.assert_close(
        la2.log_marginal_likelihood(), la.log_marginal_likelihood()
    )
    torch.testing.assert_close(la2.prior_precision, la.prior_precision)


def test_state_dict_loads_onto_another_dtype(device):
    la = _fitted("kron", "regression", sigma_noise=0.5, device=device)
    model32 = _model(device=device).float()
    la32 = KronLaplace(model32, "regression")
    la32.load_state_dict(la.state_dict())
    x = torch.randn(3, 4, dtype=DTYPE, device=device)
    f64, v64 = la(x)
    f32, v32 = la32(x.float())
    assert v32.dtype == torch.float32
    torch.testing.assert_close(v32, v64.float(), rtol=1e-4, atol=1e-5)


def test_state_dict_mismatches_are_refused(device):
    la = _fitted("diag", device=device)
    state = la.state_dict()
    with pytest.raises(ValueError, match="is of a DiagLaplace, not of a FullLaplace"):
        FullLaplace(_model(device=device), "classification").load_state_dict(state)
    with pytest.raises(ValueError, match="likelihood='classification'"):
        DiagLaplace(_model(device=device), "regression").load_state_dict(state)
    other = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 3))
    other = other.to(device, DTYPE)
    with pytest.raises(ValueError, match="belongs to another model"):
        DiagLaplace(other, "classification").load_state_dict(state)
    with pytest.raises(ValueError, match="missing keys"):
        DiagLaplace(_model(device=device), "classification").load_state_dict(
            {"mean": 1}
        )


# -- dict batches --------
class _DictModel(nn.Module):
    def __init__(self, device):
        super().__init__()
        self.net = _model(device=device)

    def forward(self, batch):
        return self.net(batch["features"])


class _DictData(torch.utils.data.Dataset):
    def __init__(self, device, n=12):
        self.X = torch.randn(n, 4, dtype=DTYPE, device=device)
        self.y = torch.randint(0, 3, (n,), device=device)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"features": self.X[i], "target": self.y[i]}


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_dict_batches(structure, device):
    data = _DictData(device)
    loader = DataLoader(data, batch_size=5)
    la = Laplace(
        _DictModel(device),
        "classification",
        "all",
        structure,
        dict_key_x="features",
        dict_key_y="target",
    )
    la.fit(loader)
    ref = Laplace(_model(device=device), "classification", "all", structure)
    ref.fit(DataLoader(TensorDataset(data.X, data.y), batch_size=5))
    torch.testing.assert_close(
        la.log_marginal_likelihood(), ref.log_marginal_likelihood()
    )
    batch = next(iter(loader))
    torch.testing.assert_close(la(batch), ref(batch["features"]))
    la.optimize_prior_precision(method="gridsearch", val_loader=loader, grid_size=3)


# -- the glm predictive of Kron and Diag never forms the Jacobian ----------------------
@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_kron_and_diag_glm_predictive_never_form_the_jacobian(
    structure, monkeypatch, device
):
    from laplace.curvature import backprop_factor

    la = _fitted(structure, device=device)
    x = torch.randn(4, 4, dtype=DTYPE, device=device)
    expected = la.functional_variance(la._jacobians(x)[0])

    def refuse(*args, **kwargs):
        raise AssertionError("the Jacobian was formed")

    monkeypatch.setattr(backprop_factor, "per_example_vectors", refuse)
    monkeypatch.setattr(backprop_factor, "jacobian", refuse)
    with torch.no_grad():
        la(x)
        la.optimize_prior_precision(
            method="gridsearch",
            val_loader=_loader("classification", device=device),
            grid_size=2,
        )
    la.prior_precision = 1.0
    torch.testing.assert_close(la._glm_distribution(x, False, False)[1], expected)
