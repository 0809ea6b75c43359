"""Last-layer Laplace against dense oracles: curvature blocks, the closed-form
functional variance, feature extraction, dict batches and reward modeling."""

from __future__ import annotations

import copy
from collections import UserDict

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import oracles
from laplace import (
    DiagLaplace,
    DiagLLLaplace,
    FullLLLaplace,
    KronLaplace,
    KronLLLaplace,
    Laplace,
    LLLaplace,
)
from laplace.curvature import CurvlinopsEF
from laplace.utils import FeatureExtractor

DT = torch.float64
STRUCTURES = ("full", "kron", "diag")


def gen(seed, device="cpu"):
    return torch.Generator(device).manual_seed(seed)


def mlp(n_out=3, bias=True, n_in=4, hidden=6, *, device):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out, bias=bias)
    ).to(device, DT)


def loader(likelihood, n_out=3, n=20, n_in=4, batch_size=8, seed=1, *, device):
    g = gen(seed)
    x = torch.randn(n, n_in, generator=g, dtype=DT)
    if likelihood == "classification":
        y = torch.randint(0, n_out, (n,), generator=g)
    else:
        y = torch.randn(n, n_out, generator=g, dtype=DT)
    return DataLoader(TensorDataset(x.to(device), y.to(device)), batch_size=batch_size)


def all_inputs(dl):
    return torch.cat([x for x, _ in dl])


def frozen_but_last(model):
    """A copy with every parameter frozen except those of the last layer."""
    m = copy.deepcopy(model)
    for p in m.parameters():
        p.requires_grad_(False)
    for p in m[-1].parameters():
        p.requires_grad_(True)
    return m


def dense(la):
    pp = la.posterior_precision
    if isinstance(la, KronLaplace):
        return pp.to_matrix()
    if isinstance(la, DiagLaplace):
        return torch.diag(pp)
    return pp


def queries(n=5, n_in=4, seed=7, *, device):
    return torch.randn(n, n_in, generator=gen(seed), dtype=DT).to(device)


# -- the curvature is the last block of the all-weights curvature -----------------
@pytest.mark.parametrize("backend", [None, CurvlinopsEF], ids=["ggn", "ef"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_last_layer_curvature_is_the_block_of_all_weights(
    structure, likelihood, backend, device
):
    model, dl = mlp(device=device), loader(likelihood, device=device)
    ll = Laplace(model, likelihood, "last_layer", structure, backend=backend)
    ll.fit(dl)
    full = Laplace(model, likelihood, "all", structure, backend=backend)
    full.fit(dl)
    P = ll.n_params
    assert P == 6 * 3 + 3
    H_all = dense(full) - torch.diag(full.prior_precision_diag)
    H_ll = dense(ll) - torch.diag(ll.prior_precision_diag)
    torch.testing.assert_close(H_ll, H_all[-P:, -P:])
    torch.testing.assert_close(ll.mean, full.mean[-P:])
    if structure != "kron" and backend is None:  # and the oracle GGN of the layer
        H = oracles.ggn(frozen_but_last(model), all_inputs(dl), likelihood)
        expected = H if structure == "full" else torch.diag(H.diagonal())
        torch.testing.assert_close(H_ll, expected)


# -- closed-form functional variance against explicit Jacobians -------------------
@pytest.mark.parametrize(
    "structure,damping",
    [("full", False), ("kron", False), ("kron", True), ("diag", False)],
)
@pytest.mark.parametrize(
    "n_out,bias,frozen",
    [(3, True, None), (3, False, None), (1, True, None), (3, True, "weight")],
    ids=["multi", "no-bias", "single-output", "frozen-weight"],
)
def test_closed_form_variance_equals_jacobian_oracle(
    structure, n_out, bias, frozen, damping, device
):
    likelihood = "regression" if n_out == 1 else "classification"
    model = mlp(n_out=n_out, bias=bias, device=device)
    if frozen == "weight":
        model[-1].weight.requires_grad_(False)
    kwargs = {"damping": True} if damping else {}
    la = Laplace(
        model, likelihood, "last_layer", structure, prior_precision=0.7, **kwargs
    )
    la.fit(loader(likelihood, n_out=n_out, device=device))
    x = queries(device=device)
    oracle_model = frozen_but_last(model)
    if frozen == "weight":
        oracle_model[-1].weight.requires_grad_(False)
    J = oracles.jacobian(oracle_model, x)  # (N, C, P), independent of the library
    Sigma = torch.linalg.inv(dense(la))
    expected = torch.einsum("ncp,pq,ndq->ncd", J, Sigma, J)

    f_mu, f_var = la._glm_distribution(x, joint=False, diagonal_output=False)
    torch.testing.assert_close(f_var, expected)
    torch.testing.assert_close(f_mu, model(x).detach())
    _, f_diag = la._glm_distribution(x, joint=False, diagonal_output=True)
    torch.testing.assert_close(f_diag, expected.diagonal(dim1=-2, dim2=-1))
    torch.testing.assert_close(la.functional_variance_fast(x), f_diag)
    _, joint = la._glm_distribution(x, joint=True, diagonal_output=False)
    Jf = J.reshape(-1, J.shape[-1])
    torch.testing.assert_close(joint, Jf @ Sigma @ Jf.T)
    # and the library's own Jacobian route agrees
    torch.testing.assert_close(la.functional_variance(J), expected)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_predictive_links_and_nn_samples(structure, device):
    model = mlp(device=device)
    la = Laplace(model, "classification", "last_layer", structure)
    la.fit(loader("classification", device=device))
    x = queries(device=device)
    _, f_var = la._glm_distribution(x, False, False)
    f_mu = model(x).detach()
    kappa = 1 / torch.sqrt(1 + torch.pi / 8 * f_var.diagonal(dim1=-2, dim2=-1))
    torch.testing.assert_close(
        la(x, link_approx="probit"), torch.softmax(f_mu * kappa, -1)
    )
    g = gen(0, device)
    mc = la(x, link_approx="mc", n_samples=20000, generator=g)
    # Monte Carlo over the same Gaussian, drawn independently: within 0.01 (the
    # standard error of 20000 draws is at most 0.5 / sqrt(20000) = 0.0035)
    dist = torch.distributions.MultivariateNormal(f_mu, f_var)
    torch.manual_seed(1)
    ref = torch.softmax(dist.sample((20000,)), -1).mean(0)
    torch.testing.assert_close(mc, ref, atol=0.01, rtol=0)
    # the nn predictive through the network at weight samples, run here by hand
    thetas = la.sample(3, generator=gen(5, device))
    f_nn = la._nn_samples(x, 3, gen(5, device))
    for theta, f in zip(thetas, f_nn):
        W = theta[:18].reshape(3, 6)
        b = theta[18:]
        torch.testing.assert_close(f, model[:-1](x).detach() @ W.T + b)


def test_regression_glm_is_bayesian_linear_regression_on_features(device):
    """Full last-layer Laplace for regression is exact Bayesian linear regression
    on the features: posterior and predictive in closed form."""
    model = mlp(n_out=1, device=device)
    dl = loader("regression", n_out=1, device=device)
    sigma, p0 = 0.4, 1.3
    la = Laplace(
        model, "regression", "last_layer", "full", sigma_noise=sigma, prior_precision=p0
    )
    la.fit(dl)
    phi = model[:-1](all_inputs(dl)).detach()
    Phi = torch.cat([phi, torch.ones(len(phi), 1, dtype=DT, device=device)], 1)
    P = Phi.T @ Phi / sigma**2 + p0 * torch.eye(7, dtype=DT, device=device)
    torch.testing.assert_close(la.posterior_precision, P)
    x = queries(device=device)
    q = model[:-1](x).detach()
    Q = torch.cat([q, torch.ones(len(q), 1, dtype=DT, device=device)], 1)
    _, f_var = la(x)
    torch.testing.assert_close(f_var[:, 0, 0], ((Q @ torch.linalg.inv(P)) * Q).sum(1))


def test_enable_backprop_gives_input_gradients(device):
    model = mlp(n_out=1, device=device)
    la = Laplace(model, "regression", "last_layer", "kron", enable_backprop=True)
    la.fit(loader("regression", n_out=1, device=device))
    x = queries(device=device).requires_grad_()
    f_mu, f_var = la(x)
    (f_mu.sum() + f_var.sum()).backward()

    def scalar(x_):
        phi = torch.cat(
            [model[:-1](x_), torch.ones(len(x_), 1, dtype=DT, device=device)], 1
        )
        Sigma = torch.linalg.inv(dense(la)).detach()
        # parameters ordered weight (6) then bias (1): phi~ is the Jacobian
        return model(x_).sum() + torch.einsum("np,pq,nq->", phi, Sigma, phi)

    x2 = x.detach().clone().requires_grad_()
    scalar(x2).backward()
    torch.testing.assert_close(x.grad, x2.grad)


# -- parameters found on the first forward pass ------------------------------------
class HeadFirst(nn.Module):
    """Not a Sequential; the head is registered before the body."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(6, 3)
        self.body = nn.Linear(4, 6)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


@pytest.mark.parametrize("make", [mlp, HeadFirst], ids=["sequential", "custom"])
def test_last_layer_is_found_on_the_first_forward_pass(make, device):
    torch.manual_seed(0)
    model = make(device=device) if make is mlp else make().to(device, DT)
    prior = torch.tensor([0.5, 2.0], device=device)
    la = Laplace(model, "classification", prior_precision=prior)
    assert isinstance(la, KronLLLaplace) and la.n_params is None and la.mean is None
    la.fit(loader("classification", device=device))
    head = model[-1] if isinstance(model, nn.Sequential) else model.head
    assert la.model.last_layer is head and la.n_params == 21
    torch.testing.assert_close(
        la.prior_precision, torch.tensor([0.5, 2.0], dtype=DT, device=device)
    )
    named = Laplace(model, "classification", last_layer_name=la.model.last_layer_name)
    assert named.n_params == 21


def test_prior_of_the_wrong_length_is_refused_when_the_layer_is_found(device):
    la = Laplace(
        mlp(device=device),
        "classification",
        prior_precision=torch.ones(5, device=device),
    )
    with pytest.raises(ValueError, match="prior_precision"):
        la.fit(loader("classification", device=device))


class SequenceHead(nn.Module):
    """A head applied at every position; the model returns one position."""

    def __init__(self, pick: str) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)
        self.pick = pick

    def forward(self, x):
        h = torch.tanh(self.embed(x))  # (N, T, 6)
        if self.pick == "average":
            return self.head(h.mean(1))
        out = self.head(h)  # (N, T, 3): the output is a view of it
        return out[:, 0] if self.pick == "pick_first" else out[:, -1]


@pytest.mark.parametrize("reduction", ["pick_first", "pick_last", "average"])
def test_feature_reduction_end_to_end(reduction, device):
    torch.manual_seed(0)
    model = SequenceHead(reduction).to(device, DT)
    g = gen(2)
    x = torch.randn(12, 5, 4, generator=g, dtype=DT).to(device)
    y = torch.randint(0, 3, (12,), generator=g).to(device)
    dl = DataLoader(TensorDataset(x, y), batch_size=5)
    kwargs = {} if reduction == "average" else {"feature_reduction": reduction}
    if reduction == "average":  # the model reduces before the head: 2-D features
        kwargs = {}
    la = Laplace(model, "classification", "last_layer", "full", **kwargs)
    la.fit(dl)
    assert la.model.last_layer is model.head
    h = torch.tanh(model.embed(x)).detach()
    phi = {"pick_first": h[:, 0], "pick_last": h[:, -1], "average": h.mean(1)}[
        reduction
    ]
    H = oracles.ggn(
        nn.Sequential(model.head).requires_grad_(True), phi, "classification"
    )
    torch.testing.assert_close(
        la.posterior_precision - torch.eye(21, dtype=DT, device=device), H
    )


# -- dict batches --------------------------------------------------------------------
class BatchEncoding(UserDict):
    """A Hugging Face-like batch: a mapping with ``.to``."""

    def to(self, device):
        return BatchEncoding({k: v.to(device) for k, v in self.data.items()})


class DictClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.classifier = nn.Linear(6, 3)

    def forward(self, batch):
        h = torch.tanh(self.body(batch["input_ids"] * batch["attention_mask"]))
        return self.classifier(h)


def dict_loader(device, n=20, seed=1):
    g = gen(seed)
    x = torch.randn(n, 4, generator=g, dtype=DT).to(device)
    mask = (torch.rand(n, 4, generator=g) > 0.2).to(device, DT)
    y = torch.randint(0, 3, (n,), generator=g).to(device)
    items = [
        {"input_ids": x[i], "attention_mask": mask[i], "labels": y[i]} for i in range(n)
    ]

    def collate(rows):
        return BatchEncoding({k: torch.stack([r[k] for r in rows]) for k in rows[0]})

    return DataLoader(items, batch_size=8, collate_fn=collate), x, mask, y


@pytest.mark.parametrize("structure", STRUCTURES)
def test_dict_batches_fit_predict_tune_and_serialize(structure, device):
    torch.manual_seed(0)
    model = DictClassifier().to(device, DT)
    dl, x, mask, y = dict_loader(device)
    la = Laplace(model, "classification", "last_layer", structure)
    la.fit(dl)
    # the same as a plain tensor model on the masked inputs
    plain = nn.Sequential(model.body, nn.Tanh(), model.classifier)
    ref = Laplace(plain, "classification", "last_layer", structure)
    ref.fit(DataLoader(TensorDataset(x * mask, y), batch_size=8))
    torch.testing.assert_close(
        la.log_marginal_likelihood(), ref.log_marginal_likelihood()
    )
    batch = next(iter(dl))
    probs = la(batch)
    torch.testing.assert_close(probs, ref(x[:8] * mask[:8]))
    la.optimize_prior_precision(method="marglik", n_steps=20)
    la.optimize_prior_precision(method="gridsearch", val_loader=dl, grid_size=4)
    state = la.state_dict()
    again = Laplace(model, "classification", "last_layer", structure)
    again.load_state_dict(state)
    torch.testing.assert_close(again(batch), la(batch))


def test_missing_dict_key_is_named(device):
    torch.manual_seed(0)
    dl, *_ = dict_loader(device)
    la = Laplace(
        DictClassifier().to(device, DT), "classification", dict_key_y="targets"
    )
    with pytest.raises(KeyError, match="dict_key_y='targets'"):
        la.fit(dl)


def test_parameter_efficient_fine_tuning_treats_only_trainable_weights(device):
    torch.manual_seed(0)
    model = DictClassifier().to(device, DT)
    model.body.weight.requires_grad_(False)  # "LoRA-like": most weights frozen
    dl, *_ = dict_loader(device)
    la = Laplace(model, "classification", "all", "diag")
    la.fit(dl)
    assert la.n_params == 6 + 18 + 3
    la.optimize_prior_precision(method="marglik", n_steps=10)
    assert la(next(iter(dl))).shape == (8, 3)


# -- reward modeling ----------------------------------------------------------------
class RewardModel(nn.Module):
    """``(batch, 2, dim)`` -> pair logits ``(batch, 2)``; ``(batch, dim)`` ->
    rewards ``(batch, 1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        r = self.head(self.body(x))
        return r.squeeze(-1) if x.ndim == 3 else r


def pair_loader(device, n=16, seed=3):
    g = gen(seed)
    x = torch.randn(n, 2, 4, generator=g, dtype=DT).to(device)
    y = torch.randint(0, 2, (n,), generator=g).to(device)
    return DataLoader(TensorDataset(x, y), batch_size=6), x, y


class PairsAsClasses(nn.Module):
    """The oracle's view: the pair model as a 2-class classifier on flat inputs."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x.reshape(-1, 2, 4))


@pytest.mark.parametrize("subset", ["last_layer", "all"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_reward_modeling_fits_pairs_and_predicts_rewards(subset, structure, device):
    torch.manual_seed(0)
    model = RewardModel().to(device, DT)
    dl, x, y = pair_loader(device)
    la = Laplace(model, "reward_modeling", subset, structure, prior_precision=0.8)
    la.fit(dl)
    oracle_model = copy.deepcopy(model)
    if subset == "last_layer":
        oracle_model.body.requires_grad_(False)
    pairs = PairsAsClasses(oracle_model)
    if structure == "kron":
        # one layer (last layer), or two: blocks of G (x) A with the pair as positions
        H = dense(la) - torch.diag(la.prior_precision_diag)
        assert torch.all(torch.linalg.eigvalsh(H) > -1e-10)
    else:
        G = oracles.ggn(pairs, x.reshape(len(x), 8), "classification")
        H = G if structure == "full" else torch.diag(G.diagonal())
        torch.testing.assert_close(dense(la) - torch.diag(la.prior_precision_diag), H)
    loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
    torch.testing.assert_close(la.log_likelihood, -loss.detach())
    # predict as regression on single items
    xq = queries(device=device)
    f_mu, f_var = la(xq)
    assert f_mu.shape == (5, 1) and f_var.shape == (5, 1, 1)
    J = oracles.jacobian(oracle_model, xq)
    Sigma = torch.linalg.inv(dense(la))
    torch.testing.assert_close(f_var, torch.einsum("ncp,pq,ndq->ncd", J, Sigma, J))
    torch.testing.assert_close(f_mu, model(xq).detach())


def test_reward_modeling_kron_last_layer_has_the_pair_factors(device):
    """KFAC of the reward head over pairs, the two items as the positions of a shared
    weight (KFAC-expand; laplace-torch gives the same numbers):
    ``G = sum_n sum_t Lambda_n[t, t]`` and ``A`` the mean over pairs of the
    item-averaged ``phi phi^T``."""
    torch.manual_seed(0)
    model = RewardModel().to(device, DT)
    dl, x, y = pair_loader(device)
    la = Laplace(model, "reward_modeling", "last_layer", "kron")
    la.fit(dl)
    phi = model.body(x).detach()  # (n, 2, 6)
    f = model(x).detach()
    L = oracles.output_hessian("classification", f)  # (n, 2, 2)
    G = L.diagonal(dim1=1, dim2=2).sum()
    A = torch.einsum("nti,ntj->ij", phi, phi) / (2 * len(x))
    H = dense(la) - torch.diag(la.prior_precision_diag)
    torch.testing.assert_close(H[:6, :6], G * A)
    torch.testing.assert_close(H[6, 6], G)


def test_reward_modeling_bad_input(device):
    torch.manual_seed(0)
    model = RewardModel().to(device, DT)
    la = Laplace(model, "reward_modeling", "last_layer", "kron")
    flat = DataLoader(
        TensorDataset(
            torch.randn(6, 4, dtype=DT, device=device),
            torch.zeros(6, dtype=torch.long, device=device),
        ),
        batch_size=3,
    )
    with pytest.raises(ValueError, match=r"pairs.*\(batch, 2, \.\.\.\)"):
        la.fit(flat)
    with pytest.raises(ValueError, match="reward_modeling"):
        Laplace(model, "reward_modeling", "all", "lowrank")


# -- bad input ---------------------------------------------------------------------
def test_no_linear_last_layer_says_how_to_name_one(device):
    model = nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=-1)).to(device, DT)
    la = Laplace(model, "classification", "last_layer", "diag")
    with pytest.raises(ValueError, match="last_layer_name"):
        la.fit(loader("classification", device=device))


def test_unknown_last_layer_name_lists_the_linear_modules(device):
    with pytest.raises(ValueError, match=r"nn.Linear modules are \['0', '2'\]"):
        Laplace(mlp(device=device), "classification", last_layer_name="classifier")


def test_sequence_features_without_reduction_are_refused(device):
    torch.manual_seed(0)
    model = SequenceHead("pick_last").to(device, DT)
    x = torch.randn(6, 5, 4, dtype=DT, device=device)
    y = torch.zeros(6, dtype=torch.long, device=device)
    dl = DataLoader(TensorDataset(x, y), batch_size=3)
    la = Laplace(model, "classification", "last_layer", "kron")
    with pytest.raises(ValueError, match="feature_reduction"):
        la.fit(dl)


def test_classes_and_feature_extractor_are_public(device):
    la = Laplace(mlp(device=device), "classification", "last_layer", "full")
    assert isinstance(la, FullLLLaplace) and isinstance(la, LLLaplace)
    assert isinstance(la.model, FeatureExtractor)
    assert isinstance(
        Laplace(mlp(device=device), "classification", "last_layer", "diag"),
        DiagLLLaplace,
    )


def test_outputs_at_every_position_are_refused_before_fitting(device):
    """A token-level model (logits at every position): refused when the last layer
    is found, before any curvature (it would be fit on reduced features and could
    not predict)."""

    class TokenLevel(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(3, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):  # (B, T, 3) -> (B, T, 2)
            return self.head(torch.tanh(self.body(x)))

    model = TokenLevel().to(device)
    x = torch.randn(6, 5, 3, device=device)
    y = torch.randint(0, 2, (6,), device=device)
    la = Laplace(model, "classification", feature_reduction="pick_last")
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    with pytest.raises(ValueError, match=r"\(6, 5, 2\)|\(3, 5, 2\)"):
        la.fit(loader)
    assert not la.fitted
