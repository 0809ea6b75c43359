"""Subnetwork Laplace against dense oracles: the precision is the submatrix of the
dense curvature at the chosen entries, the predictive is the oracle's with every
other weight fixed, and the evidence runs over the subnetwork."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import oracles
from laplace import DiagSubnetLaplace, FullSubnetLaplace, Laplace, SubnetLaplace
from laplace.curvature import (
    AsdlGGN,
    BackPackGGN,
    CurvlinopsEF,
    backprop_factor,
    structures,
)

DT = torch.float64
STRUCTURES = {"full": FullSubnetLaplace, "diag": DiagSubnetLaplace}


def gen(seed, device="cpu"):
    return torch.Generator(device).manual_seed(seed)


def mlp(n_out=3, frozen=True, *, device):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, n_out)
    ).to(device, DT)
    if frozen:
        model[2].bias.requires_grad_(False)
    return model


def cnn(n_out=3, *, device):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 2, 2, stride=2),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, n_out),
    ).to(device, DT)


class Scaled(nn.Module):
    """A parameter outside nn.Linear: the generic (torch.func) route."""

    def __init__(self, *, device):
        super().__init__()
        self.net = mlp(device=device)
        scale = torch.tensor([0.5, 1.0, 1.5], dtype=DT, device=device)
        self.scale = nn.Parameter(scale)

    def forward(self, x):
        return self.net(x) * self.scale


def data(likelihood, n=12, image=False, seed=1, *, device):
    g = gen(seed)
    x = torch.randn(n, *((2, 6, 6) if image else (4,)), generator=g, dtype=DT)
    if likelihood == "classification":
        y = torch.randint(0, 3, (n,), generator=g)
    else:
        y = torch.randn(n, 3, generator=g, dtype=DT)
    return x.to(device), y.to(device)


def loader(x, y):
    return DataLoader(TensorDataset(x, y), batch_size=5)


def trainable_positions(model):
    """Positions of the trainable entries in the vector of all parameters."""
    mask = torch.cat(
        [
            torch.full((p.numel(),), p.requires_grad, device=p.device)
            for p in model.parameters()
        ]
    )
    return mask.nonzero().flatten()


def pick(model, n, seed=0):
    """``n`` random trainable entries, numbered among all parameters."""
    positions = trainable_positions(model)
    return positions[torch.randperm(len(positions), generator=gen(seed))[:n]]


def among_trainable(model, idx):
    """The entries ``idx`` (all parameters) numbered among the trainable ones, as the
    oracles number them."""
    lookup = {int(a): i for i, a in enumerate(trainable_positions(model))}
    return torch.tensor([lookup[int(i)] for i in idx], device=idx.device)


def all_weights(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def fitted(structure, model, likelihood, idx, **kwargs):
    x, y = data(likelihood, device=next(model.parameters()).device)
    la = STRUCTURES[structure](model, likelihood, idx, **kwargs)
    la.fit(loader(x, y))
    return la, x


# -- the precision is the submatrix of the dense curvature ----------------------------
@pytest.mark.parametrize("structure", ["full", "diag"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("backend", [None, BackPackGGN, AsdlGGN])
def test_precision_is_the_submatrix_of_the_dense_curvature(
    structure, likelihood, backend, device
):
    model = mlp(frozen=backend is None, device=device)
    idx = pick(model, 9)
    kw = {"sigma_noise": 0.7} if likelihood == "regression" else {}
    la, x = fitted(
        structure, model, likelihood, idx, backend=backend, prior_precision=0.5, **kw
    )
    t = among_trainable(model, idx)
    G = oracles.ggn(model, x, likelihood)[t][:, t]
    factor = 1 / 0.7**2 if likelihood == "regression" else 1.0
    P = factor * G + 0.5 * torch.eye(9, dtype=DT, device=device)
    if structure == "full":
        torch.testing.assert_close(la.H, G)
        torch.testing.assert_close(la.posterior_precision, P)
    else:
        torch.testing.assert_close(la.H, G.diagonal())
        torch.testing.assert_close(la.posterior_precision, P.diagonal())
    assert la.n_params == sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(la.mean, all_weights(model))
    torch.testing.assert_close(la.mean_subnet, all_weights(model)[idx])


def test_empirical_fisher_submatrix(device):
    model = mlp(device=device)
    idx = pick(model, 7)
    la, x = fitted("full", model, "classification", idx, backend=CurvlinopsEF)
    _, y = data("classification", device=device)
    t = among_trainable(model, idx)
    G = oracles.empirical_fisher(model, x, y, "classification")[t][:, t]
    torch.testing.assert_close(la.H, G)


# -- predictives with every other weight fixed ----------------------------------------
@pytest.mark.parametrize("structure", ["full", "diag"])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "generic"])
def test_glm_predictive_equals_the_oracle(structure, kind, device):
    model = {"mlp": mlp, "cnn": cnn, "generic": Scaled}[kind](device=device)
    idx = pick(model, 8, seed=3)
    image = kind == "cnn"
    x, y = data("regression", image=image, device=device)
    la = STRUCTURES[structure](model, "regression", idx, prior_precision=1.3)
    la.fit(loader(x, y))
    xt = data("regression", n=4, image=image, seed=9, device=device)[0]
    t = among_trainable(model, idx)
    J = oracles.jacobian(model, xt)[..., t]
    G = oracles.ggn(model, x, "regression")[t][:, t]
    P = G + 1.3 * torch.eye(8, dtype=DT, device=device)
    if structure == "diag":
        P = torch.diag(P.diagonal())
    f_var = J @ torch.linalg.solve(P, J.transpose(1, 2))
    f_mu, var = la(xt)
    torch.testing.assert_close(var, f_var)
    torch.testing.assert_close(f_mu, model(xt).detach())
    torch.testing.assert_close(la.functional_variance(J), f_var)
    Jf = J.reshape(-1, 8)
    f, joint = la(xt, joint=True)
    torch.testing.assert_close(joint, Jf @ torch.linalg.solve(P, Jf.T))


def test_classification_probit_and_nn_predictive(device):
    model = mlp(device=device)
    idx = pick(model, 10)
    la, x = fitted("full", model, "classification", idx, prior_precision=2.0)
    xt = data("classification", n=3, seed=9, device=device)[0]
    J = oracles.jacobian(model, xt)[..., among_trainable(model, idx)]
    var = (J @ la.posterior_covariance @ J.transpose(1, 2)).diagonal(dim1=1, dim2=2)
    expected = torch.softmax(model(xt).detach() / torch.sqrt(1 + math.pi / 8 * var), -1)
    torch.testing.assert_close(la(xt), expected)
    # the nn predictive runs the network at samples that move only the subnetwork
    samples = la.sample(50, generator=gen(4, device))
    outside = torch.ones(la.n_params, dtype=torch.bool, device=device)
    outside[idx] = False
    assert torch.equal(samples[:, outside], la.mean.expand(50, -1)[:, outside])
    assert (samples[:, idx] != la.mean[idx]).all()
    probs = la(
        xt, pred_type="nn", link_approx="mc", n_samples=50, generator=gen(4, device)
    )
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    outs = []
    for theta in samples:
        pieces = torch.split(theta, [p.numel() for p in params])
        weights = {n: t.view(p.shape) for n, t, p in zip(names, pieces, params)}
        outs.append(torch.func.functional_call(model, weights, (xt,)))
    torch.testing.assert_close(probs, torch.softmax(torch.stack(outs), -1).mean(0))


def test_samples_follow_the_subnetwork_posterior(device):
    model = mlp(device=device)
    idx = pick(model, 4)
    la, _ = fitted("full", model, "regression", idx, prior_precision=3.0)
    s = la.sample(40000, generator=gen(0, device))[:, idx]
    cov = torch.cov(s.T)
    torch.testing.assert_close(s.mean(0), la.mean[idx], atol=0.02, rtol=0)
    torch.testing.assert_close(
        cov,
        la.posterior_covariance,
        atol=0.05 * la.posterior_covariance.abs().max(),
        rtol=0,
    )


# -- evidence, tuning ------------------------------------------------------------------
@pytest.mark.parametrize("structure", ["full", "diag"])
@pytest.mark.parametrize("prior", ["scalar", "layerwise", "diag"])
def test_evidence_and_gradients_equal_the_oracle(structure, prior, device):
    model = mlp(device=device)
    idx = pick(model, 9)
    la, x = fitted(structure, model, "regression", idx)
    sizes = [p.numel() for p in model.parameters()]
    n = {"scalar": 1, "layerwise": len(sizes), "diag": sum(sizes)}[prior]
    p0 = torch.linspace(0.5, 2.0, n, dtype=DT, device=device).requires_grad_(True)
    sigma = torch.tensor(0.8, dtype=DT, device=device, requires_grad=True)
    ours = la.log_marginal_likelihood(p0, sigma)

    _, y = data("regression", device=device)
    t = among_trainable(model, idx)
    G = oracles.ggn(model, x, "regression")[t][:, t]
    if structure == "diag":
        G = torch.diag(G.diagonal())
    full_p0 = (
        p0.expand(sum(sizes))
        if n == 1
        else (
            p0.repeat_interleave(torch.tensor(sizes, device=device))
            if prior == "layerwise"
            else p0
        )
    )
    p0_s = full_p0[idx]
    theta = all_weights(model)[idx]
    with torch.no_grad():
        f = model(x)
    loglik = -oracles.loss("regression", f, y) / sigma**2 - y.numel() * torch.log(
        sigma * math.sqrt(2 * math.pi)
    )
    P = G / sigma**2 + torch.diag(p0_s)
    expected = loglik - 0.5 * (
        torch.logdet(P) - p0_s.log().sum() + (p0_s * theta**2).sum()
    )
    torch.testing.assert_close(ours, expected)
    for a, b in zip(
        torch.autograd.grad(ours, [p0, sigma]),
        torch.autograd.grad(expected, [p0, sigma]),
    ):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("prior_structure", ["scalar", "layerwise", "diag"])
def test_marglik_tuning_increases_the_evidence(prior_structure, device):
    model = mlp(device=device)
    la, _ = fitted("full", model, "classification", pick(model, 12))
    before = la.log_marginal_likelihood().item()
    la.optimize_prior_precision(prior_structure=prior_structure, n_steps=30)
    assert la.log_marginal_likelihood().item() > before


def test_gridsearch_tunes_the_prior(device):
    model = mlp(device=device)
    la, x = fitted("diag", model, "classification", pick(model, 12))
    xv, yv = data("classification", seed=5, device=device)
    grid = torch.logspace(-4, 4, 5, dtype=xv.dtype, device=device)
    nlls = []
    for (
        value
    ) in grid:  # brute force: the default loss, the NLL of the probit predictive
        la.prior_precision = float(value)
        nlls.append(-la(xv).gather(1, yv.reshape(-1, 1)).log().mean().item())
    la.optimize_prior_precision(
        method="gridsearch", val_loader=loader(xv, yv), grid_size=5
    )
    assert len(set(nlls)) == len(nlls)  # the prior matters
    best = grid[int(torch.tensor(nlls).argmin())]
    torch.testing.assert_close(la.prior_precision, best.reshape(1))


# -- the fit never forms a (P, P) matrix or (N, C, P) vectors --------------------------
def test_fit_works_on_subnetwork_columns_only(monkeypatch, device):
    model = mlp(device=device)
    idx = pick(model, 6)
    widths = []
    original = structures.symmetric_gram

    def spy(V, *args, **kwargs):
        widths.append(V.shape[-1])
        return original(V, *args, **kwargs)

    monkeypatch.setattr(structures, "symmetric_gram", spy)
    fitted("full", model, "classification", idx)
    assert widths and set(widths) == {6}


@pytest.mark.parametrize("kind", ["mlp", "cnn", "generic"])
def test_selected_per_example_vectors_equal_the_selected_columns(kind, device):
    model = {"mlp": mlp, "cnn": cnn, "generic": Scaled}[kind](device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    x = data("classification", n=4, image=kind == "cnn", device=device)[0]
    idx = among_trainable(model, pick(model, 11, seed=2))  # among params
    f, V = backprop_factor.per_example_vectors(
        model, params, x, backprop_factor.identity_factor
    )
    f_s, V_s = backprop_factor.per_example_vectors(
        model, params, x, backprop_factor.identity_factor, idx
    )
    torch.testing.assert_close(V_s, V[..., idx])
    torch.testing.assert_close(f_s, f)


# -- serialization and bad input ------------------------------------------------------
def test_state_dict_round_trip(device):
    model = mlp(device=device)
    idx = pick(model, 8)
    la, _ = fitted("full", model, "classification", idx, prior_precision=0.7)
    state = la.state_dict()
    other = mlp(device=device)
    la2 = FullSubnetLaplace(other, "classification", idx)
    la2.load_state_dict(state)
    xt = data("classification", n=3, seed=9, device=device)[0]
    torch.testing.assert_close(la2(xt), la(xt))
    torch.testing.assert_close(
        la2.log_marginal_likelihood(), la.log_marginal_likelihood()
    )
    with pytest.raises(ValueError, match="another subnetwork"):
        FullSubnetLaplace(
            mlp(device=device), "classification", idx.flip(0)
        ).load_state_dict(state)


def test_bad_input_is_refused_clearly(device):
    model = mlp(device=device)
    P = sum(p.numel() for p in model.parameters())

    def at(values, **kwargs):
        return torch.tensor(values, device=device, **kwargs)

    make = lambda idx: Laplace(  # noqa: E731
        model, "classification", "subnetwork", "full", subnetwork_indices=idx
    )
    with pytest.raises(ValueError, match=rf"\[0, {P}\)"):
        make(at([0, P]))
    frozen = ~torch.isin(torch.arange(P, device=device), trainable_positions(model))
    with pytest.raises(ValueError, match=r"do not require grad \(2.bias\)"):
        make(torch.cat([at([0]), frozen.nonzero().flatten()[:2]]))
    with pytest.raises(ValueError, match="non-negative"):
        make(at([-1, 2]))
    with pytest.raises(ValueError, match="distinct.*\\[3\\]"):
        make(at([3, 1, 3]))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        make(at([], dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        make(at([[0, 1]]))
    with pytest.raises(TypeError, match="integers"):
        make(at([0.0, 1.0]))
    with pytest.raises(TypeError, match="LongTensor"):
        make([0, 1])
    with pytest.raises(TypeError, match="subnetwork_indices"):
        Laplace(model, "classification", "subnetwork", "full")
    with pytest.raises(ValueError, match="valid combinations"):
        Laplace(
            model,
            "classification",
            "subnetwork",
            "kron",
            subnetwork_indices=at([0]),
        )
    with pytest.raises(ValueError, match="reward_modeling"):
        FullSubnetLaplace(model, "reward_modeling", at([0]))
    la = FullSubnetLaplace(model, "classification", at([0, 1]))
    la.fit(loader(*data("classification", device=device)))
    with pytest.raises(ValueError, match=r"\(batch, outputs, 2\)"):
        la.functional_variance(torch.zeros(2, 3, P, dtype=DT, device=device))
    assert isinstance(la, SubnetLaplace)


def test_mask_indices_select_the_same_weights_in_a_model_with_frozen_parameters(device):
    from laplace.utils import ParamNameSubnetMask

    model = mlp(device=device)  # model[2].bias is frozen and comes before "4.weight"
    indices = ParamNameSubnetMask(model, ["4.weight"]).select()
    la, x = fitted("full", model, "classification", indices)
    start = sum(p.numel() for p in list(model.parameters())[:4])
    assert indices.tolist() == list(range(start, start + 15))
    t = among_trainable(model, indices)
    torch.testing.assert_close(la.H, oracles.ggn(model, x, "classification")[t][:, t])
    torch.testing.assert_close(la.mean_subnet, model[4].weight.detach().flatten())
