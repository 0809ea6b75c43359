"""Between the streaming states and the Laplace objects (``laplace.streaming.
convert``), and continual learning in both APIs: against ``Laplace(...).fit`` on the
same data (itself tested against the dense oracles) and against closed forms."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace
from laplace.curvature import NativeGGN
from laplace.streaming import convert, dense_ggn, diag_ggn, kron_ggn

STATE_MODULES = {"full": dense_ggn, "diag": diag_ggn}


def _model(device, likelihood="classification"):
    torch.manual_seed(0)
    out = 3  # not 2, the size of the loaders' last batch
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, out)).to(
        device, torch.float64
    )


def _loader(device, likelihood="classification", n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64).to(device)
    if likelihood == "classification":
        y = torch.randint(0, 3, (n,), generator=g).to(device)
    else:
        y = torch.randn(n, 3, generator=g, dtype=torch.float64).to(device)
    return DataLoader(TensorDataset(x, y), batch_size=5)


def _functions(model, likelihood, sigma=1.0):
    def forward(params, batch):
        return functional_call(model, params, (batch[0],)), torch.tensor([])

    def outer_log_likelihood(f, batch):
        if likelihood == "classification":
            return -nn.functional.cross_entropy(f, batch[1], reduction="sum")
        return -0.5 * (f - batch[1]).square().sum() / sigma**2

    return forward, outer_log_likelihood


def _streamed(structure, model, loader, likelihood, prior, sigma=1.0):
    module = STATE_MODULES[structure]
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = module.init(params, prior)
    for batch in loader:
        state = module.update(state, batch, *_functions(model, likelihood, sigma))
    return state


def _fitted(structure, model, loader, likelihood, prior, **kwargs):
    la = Laplace(
        model,
        likelihood,
        subset_of_weights="all",
        hessian_structure=structure,
        prior_precision=prior,
        backend=NativeGGN,
        **kwargs,
    )
    la.fit(loader)
    return la


@pytest.mark.parametrize("structure", ["full", "diag"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_a_state_as_laplace_is_the_laplace_fitted_on_the_same_data(
    structure, likelihood, device
):
    """Posterior precision, evidence and predictive of ``to_laplace`` equal those
    of ``Laplace(...).fit`` on the batches the state saw, with sigma_noise 0.7."""
    model, loader = _model(device, likelihood), _loader(device, likelihood)
    sigma = 0.7 if likelihood == "regression" else 1.0
    kwargs = {"sigma_noise": sigma} if likelihood == "regression" else {}
    state = _streamed(structure, model, loader, likelihood, 0.5, sigma)
    la = convert.to_laplace(
        state, model, likelihood, 0.5, train_loader=loader, backend=NativeGGN, **kwargs
    )
    ref = _fitted(structure, model, loader, likelihood, 0.5, **kwargs)
    assert type(la) is type(ref)
    torch.testing.assert_close(la.posterior_precision, ref.posterior_precision)
    torch.testing.assert_close(la.mean, ref.mean)
    torch.testing.assert_close(
        la.log_marginal_likelihood(), ref.log_marginal_likelihood()
    )
    x = next(iter(loader))[0]
    for a, b in zip(la(x, pred_type="glm"), ref(x, pred_type="glm")):
        torch.testing.assert_close(a, b)
    assert la.n_data == ref.n_data == 12


def test_without_data_the_evidence_is_nan_and_the_predictive_works(device):
    model, loader = _model(device), _loader(device)
    state = _streamed("full", model, loader, "classification", 1.0)
    la = convert.to_laplace(state, model, "classification", 1.0)
    assert math.isnan(float(la.log_marginal_likelihood()))
    assert la.n_data == 0 and la.n_outputs is None
    ref = _fitted("full", model, loader, "classification", 1.0)
    x = next(iter(loader))[0]
    torch.testing.assert_close(la(x), ref(x))


def test_to_laplace_sets_the_models_weights_to_the_states_params(device):
    model, loader = _model(device), _loader(device)
    state = _streamed("diag", model, loader, "classification", 1.0)
    shifted = {k: v + 0.1 for k, v in state.params.items()}
    state = diag_ggn.DiagLaplaceState(shifted, state.prec_diag)
    la = convert.to_laplace(state, model, "classification", 1.0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), shifted[name])
    torch.testing.assert_close(
        la.mean,
        torch.cat([shifted[n].reshape(-1) for n, _ in model.named_parameters()]),
    )


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_a_fitted_laplace_as_a_state_is_the_streamed_state(structure, device):
    model, loader = _model(device), _loader(device)
    la = _fitted(structure, model, loader, "classification", 0.5)
    state = convert.from_laplace(la)
    ref = _streamed(structure, model, loader, "classification", 0.5)
    assert type(state) is type(ref)
    for name in ref.params:
        torch.testing.assert_close(state.params[name], ref.params[name])
    if structure == "full":
        torch.testing.assert_close(state.prec, ref.prec)
    else:
        for name in ref.params:
            torch.testing.assert_close(state.prec_diag[name], ref.prec_diag[name])
    # and back: the same posterior
    back = convert.to_laplace(state, model, "classification", 0.5, train_loader=loader)
    torch.testing.assert_close(back.posterior_precision, la.posterior_precision)


def test_conversions_refuse_what_they_cannot_convert(device):
    model, loader = _model(device), _loader(device)
    state = _streamed("full", model, loader, "classification", 1.0)
    with pytest.raises(TypeError, match="state must be one of DenseLaplaceState"):
        convert.to_laplace(object(), model, "classification", 1.0)
    wrong = dense_ggn.DenseLaplaceState({"w": torch.zeros(3)}, state.prec)
    with pytest.raises(
        ValueError, match=r"state.params must map the names.*got \['w'\]"
    ):
        convert.to_laplace(wrong, model, "classification", 1.0)
    listed = dense_ggn.DenseLaplaceState([torch.zeros(3)], state.prec)
    with pytest.raises(ValueError, match=r"must map the names.*got list"):
        convert.to_laplace(listed, model, "classification", 1.0)
    shapes = {k: v.reshape(-1) for k, v in state.params.items()}
    with pytest.raises(
        ValueError, match=r"state.params\['0.weight'\] has shape \(15,\)"
    ):
        convert.to_laplace(
            dense_ggn.DenseLaplaceState(shapes, state.prec),
            model,
            "classification",
            1.0,
        )
    with pytest.raises(TypeError, match=r"state must be one of .*; got dict"):
        convert.neg_log_prior({}, state.params)
    with pytest.raises(ValueError, match=r"params must be a tree like state.params"):
        convert.neg_log_prior(state, {k: v for k, v in list(state.params.items())[:2]})
    with pytest.raises(ValueError, match=r"params must be a tree like state.params"):
        convert.neg_log_prior(state, shapes)
    la = Laplace(model, "classification", "last_layer", "full")
    la.fit(loader)
    with pytest.raises(TypeError, match="la must be a FullLaplace, DiagLaplace or"):
        convert.from_laplace(la)
    with pytest.raises(ValueError, match="prior_precision is needed for a Dense"):
        convert.to_laplace(state, model, "classification")
    unfitted = Laplace(model, "classification", "all", "full")
    with pytest.raises(RuntimeError, match="not fitted"):
        convert.from_laplace(unfitted)
    low_rank = Laplace(
        model, "classification", "all", "kron", low_rank_factors=1,
        low_rank_threshold=1,
    )  # fmt: skip
    low_rank.fit(loader)
    with pytest.raises(ValueError, match=r"keeps low-rank factors \(low_rank_f"):
        convert.from_laplace(low_rank)


# -- the state as a prior ------------------------------------------------------------
@pytest.mark.parametrize("structure", ["full", "diag"])
def test_neg_log_prior_is_the_normal_density_and_differentiable(structure, device):
    model, loader = _model(device), _loader(device)
    state = _streamed(structure, model, loader, "classification", 0.5)
    mean = torch.cat([state.params[n].reshape(-1) for n in sorted(state.params)])
    if structure == "full":
        prec = state.prec
    else:
        prec = torch.diag(
            torch.cat([state.prec_diag[n].reshape(-1) for n in sorted(state.params)])
        )
    g = torch.Generator().manual_seed(3)
    theta = {
        k: (v + 0.3 * torch.randn(v.shape, generator=g, dtype=v.dtype).to(device))
        .detach()
        .requires_grad_()
        for k, v in state.params.items()
    }
    flat = torch.cat([theta[n].reshape(-1) for n in sorted(theta)])
    normal = torch.distributions.MultivariateNormal(mean, precision_matrix=prec)
    value = convert.neg_log_prior(state, theta, normalized=True)
    torch.testing.assert_close(value, -normal.log_prob(flat))
    penalty = convert.neg_log_prior(state, theta)
    torch.testing.assert_close(penalty, 0.5 * (flat - mean) @ prec @ (flat - mean))
    penalty.backward()
    grad = torch.cat([theta[n].grad.reshape(-1) for n in sorted(theta)])
    torch.testing.assert_close(grad, prec @ (flat.detach() - mean))


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_continual_learning_the_posterior_of_one_task_is_the_prior_of_the_next(
    structure, device
):
    """Both APIs give ``P_2 = H_2(theta_2) + P_1`` around the new MAP ``theta_2``:
    the Laplace object by ``fit(task 2, override=False)``, the streaming state by
    ``init_prec`` = the previous precision; the penalties are the previous
    posterior's ``-log p``."""
    model = _model(device)
    task1, task2 = _loader(device, seed=1), _loader(device, seed=2)
    la = _fitted(structure, model, task1, "classification", 0.5)
    prior_state = convert.from_laplace(la)
    P1 = la.posterior_precision.clone()
    theta1 = la.mean.clone()
    with torch.no_grad():  # "training on task 2" moves the weights
        for p in model.parameters():
            p.add_(0.05)
    theta = torch.nn.utils.parameters_to_vector(model.parameters())
    # the penalties of both APIs agree (and are the previous posterior's)
    params = dict(model.named_parameters())
    torch.testing.assert_close(
        -la.log_prob(theta, normalized=False),
        convert.neg_log_prior(prior_state, params),
    )
    H2 = _fitted(structure, model, task2, "classification", 1.0).H
    # Laplace API
    la.fit(task2, override=False)
    torch.testing.assert_close(la.mean, theta.detach())
    torch.testing.assert_close(la.posterior_precision, H2 + P1)
    assert not torch.allclose(la.mean, theta1)
    # streaming API: the previous posterior precision as init_prec
    module = STATE_MODULES[structure]
    init = prior_state.prec if structure == "full" else prior_state.prec_diag
    state = module.init({k: v.detach().clone() for k, v in params.items()}, init)
    for batch in task2:
        state = module.update(state, batch, *_functions(model, "classification"))
    back = convert.to_laplace(state, model, "classification", 0.5)
    torch.testing.assert_close(back.posterior_precision, H2 + P1)


# -- Kronecker-factored states (kron_ggn) ----------------------------------------------
def _kron_streamed(model, loader, likelihood, prior):
    transform = kron_ggn.build(model, likelihood, init_prec=prior)
    state = transform.init({k: v.detach().clone() for k, v in model.named_parameters()})
    for batch in loader:
        state = transform.update(state, batch)
    return state


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_a_kron_state_as_laplace_is_the_kron_laplace_fitted_on_the_same_data(
    likelihood, device
):
    """No data needed: the state knows its loss, number of data and prior."""
    model, loader = _model(device, likelihood), _loader(device, likelihood)
    state = _kron_streamed(model, loader, likelihood, 0.5)
    la = convert.to_laplace(state, model, likelihood, backend=NativeGGN)
    ref = _fitted("kron", model, loader, likelihood, 0.5)
    assert type(la) is type(ref)
    torch.testing.assert_close(
        la.posterior_precision.to_matrix(), ref.posterior_precision.to_matrix()
    )
    torch.testing.assert_close(
        la.log_marginal_likelihood(), ref.log_marginal_likelihood()
    )
    x = next(iter(loader))[0]
    for a, b in zip(la(x, pred_type="glm"), ref(x, pred_type="glm")):
        torch.testing.assert_close(a, b)
    with pytest.raises(
        ValueError, match=r"prior_precision must be the KronLaplaceState"
    ):
        convert.to_laplace(state, model, likelihood, 2.0)


def test_a_fitted_kron_laplace_as_a_state_has_its_posterior_precision(device):
    model, loader = _model(device), _loader(device)
    la = _fitted("kron", model, loader, "classification", 0.5)
    state = convert.from_laplace(la)
    torch.testing.assert_close(
        kron_ggn.precision(state), la.posterior_precision.to_matrix()
    )
    assert list(state.params) == [n for n, _ in model.named_parameters()]
    assert state.n_data == 12 and state.init_prec == 0.5
    back = convert.to_laplace(state, model, "classification")
    torch.testing.assert_close(
        back.log_marginal_likelihood(), la.log_marginal_likelihood()
    )
    layerwise = _fitted("kron", model, loader, "classification", torch.ones(4))
    with pytest.raises(ValueError, match="needs a scalar prior_precision"):
        convert.from_laplace(layerwise)


def test_kron_neg_log_prior_is_the_normal_density_and_differentiable(device):
    model, loader = _model(device), _loader(device)
    state = _kron_streamed(model, loader, "classification", 0.5)
    prec = kron_ggn.precision(state)
    mean = torch.cat([v.reshape(-1) for v in state.params.values()])
    theta = {k: (v + 0.1).detach().requires_grad_() for k, v in state.params.items()}
    flat = torch.cat([v.reshape(-1) for v in theta.values()])
    normal = torch.distributions.MultivariateNormal(mean, precision_matrix=prec)
    value = convert.neg_log_prior(state, theta, normalized=True)
    torch.testing.assert_close(value, -normal.log_prob(flat))
    convert.neg_log_prior(state, theta).backward()
    grad = torch.cat([v.grad.reshape(-1) for v in theta.values()])
    torch.testing.assert_close(grad, prec @ (flat.detach() - mean))


def test_kron_continual_learning_streams_as_kron_laplace_fits_with_override_false(
    device,
):
    """Going on updating the state of task 1 at the MAP of task 2 is
    ``KronLaplace.fit(task 2, override=False)``: summed output-side factors, the
    input-side ones averaged over both tasks' data."""
    model = _model(device)
    task1, task2 = _loader(device, seed=1), _loader(device, seed=2)
    la = _fitted("kron", model, task1, "classification", 0.5)
    state = convert.from_laplace(la)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    la.fit(task2, override=False)
    state = dataclasses.replace(
        state, params={k: v.detach().clone() for k, v in model.named_parameters()}
    )
    for batch in task2:
        state = kron_ggn.update(state, batch, model)
    torch.testing.assert_close(
        kron_ggn.precision(state), la.posterior_precision.to_matrix()
    )


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_neg_log_prior_refuses_params_that_share_the_means_memory(structure, device):
    """A state built from the model's own tensors (or detached views of them)
    would follow the training, its penalty 0: refused, naming the fix."""
    model = _model(device)
    module = STATE_MODULES[structure]
    state = module.init({k: v.detach() for k, v in model.named_parameters()}, 1.0)
    with pytest.raises(ValueError, match=r"params share memory with state.params"):
        convert.neg_log_prior(state, dict(model.named_parameters()))


def test_a_kron_state_keeps_its_precision_under_any_noise_and_temperature(device):
    """``H`` is the state's curvature divided by the likelihood's factor ``1 /
    (sigma^2 T)``: the posterior precision stays the state's."""
    model, loader = _model(device, "regression"), _loader(device, "regression")
    state = _kron_streamed(model, loader, "regression", 0.5)
    la = convert.to_laplace(
        state, model, "regression", sigma_noise=0.7, temperature=2.0
    )
    torch.testing.assert_close(
        la.posterior_precision.to_matrix(), kron_ggn.precision(state)
    )
