"""marglik_training: an independent re-implementation as oracle, recovery of a known
noise, every structure and subset, dict batches, the returned best state, bad input.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector
from torch.utils.data import DataLoader, Dataset, TensorDataset

from laplace import (
    DiagLaplace,
    DiagLLLaplace,
    FullLaplace,
    FullLLLaplace,
    KronLaplace,
    KronLLLaplace,
    Laplace,
    marglik_training,
)

DTYPE = torch.float64
CLASSES = {
    ("all", "full"): FullLaplace,
    ("all", "kron"): KronLaplace,
    ("all", "diag"): DiagLaplace,
    ("last_layer", "full"): FullLLLaplace,
    ("last_layer", "kron"): KronLLLaplace,
    ("last_layer", "diag"): DiagLLLaplace,
}


def make_model(n_in=2, width=6, n_out=1, seed=0, *, device) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n_in, width), nn.Tanh(), nn.Linear(width, n_out))
    return model.to(device, DTYPE)


def make_loader(
    likelihood="regression", n=24, n_in=2, n_out=1, batch_size=8, *, device
):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, n_in, generator=g, dtype=DTYPE)
    if likelihood == "classification":
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    else:
        y = torch.sin(2 * x[:, :1]) + 0.1 * torch.randn(n, n_out, generator=g).to(x)
    return DataLoader(TensorDataset(x.to(device), y.to(device)), batch_size=batch_size)


def theta(model: nn.Module) -> torch.Tensor:
    return parameters_to_vector(model.parameters()).detach().clone()


def sgd(lr=0.05):
    """An optimizer class of fixed learning rate for reproducible comparisons."""

    class SGD(torch.optim.SGD):
        def __init__(self, params, **kwargs):
            super().__init__(params, lr=lr)

    return SGD


# ----------------------------------------------------------------------------------
# Oracle: the algorithm written out by hand with a fresh Laplace per phase
# ----------------------------------------------------------------------------------


def oracle(
    model,
    loader,
    likelihood,
    structure,
    subset,
    prior_structure,
    *,
    n_epochs,
    burnin,
    frequency,
    n_hypersteps,
    lr,
    lr_hyp,
    p0,
    s0,
    temperature,
    fix_sigma=False,
):
    """marglik_training as documented, from torch primitives and our Laplace."""
    N = len(loader.dataset)
    params = list(model.parameters())
    treated = params if subset == "all" else list(model[-1].parameters())
    treated_ids = [id(p) for p in treated]
    optimizer = torch.optim.SGD(params, lr=lr)
    regression = likelihood == "regression"
    tune_sigma = regression and not fix_sigma
    device = params[0].device
    log_s = torch.tensor(
        math.log(s0 if regression else 1.0), dtype=DTYPE, device=device
    )
    log_s.requires_grad_(tune_sigma)
    log_p, hyper_opt = None, None
    margliks, losses, best = [], [], None

    def prior_diagonal():
        """The prior precision of every parameter, entry by entry."""
        pieces = []
        for p in params:
            if log_p is None or id(p) not in treated_ids:
                pieces.append(torch.full((p.numel(),), p0, dtype=DTYPE, device=device))
                continue
            k = treated_ids.index(id(p))
            prec = log_p.detach().exp()
            if prior_structure == "scalar":
                pieces.append(prec[0].expand(p.numel()))
            elif prior_structure == "layerwise":
                pieces.append(prec[k].expand(p.numel()))
            else:
                start = sum(q.numel() for q in treated[:k])
                pieces.append(prec[start : start + p.numel()])
        return torch.cat(pieces)

    for epoch in range(1, n_epochs + 1):
        delta, sigma = prior_diagonal(), log_s.detach().exp()
        total = 0.0
        for x, y in loader:
            optimizer.zero_grad()
            f = model(x)
            if regression:
                data = (f - y).square().sum() / len(x)
                scale = sigma**2 * temperature / N
            else:
                data = nn.functional.cross_entropy(f, y, reduction="mean")
                scale = temperature / (2 * N)
            th = torch.cat([p.reshape(-1) for p in params])
            loss = data + scale * (delta * th * th).sum()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(x)
        losses.append(total / N)
        if epoch < burnin or epoch % frequency:
            continue
        la = Laplace(
            model,
            likelihood,
            subset,
            structure,
            sigma_noise=log_s.detach().exp(),
            prior_precision=p0,
            temperature=temperature,
        )
        la.fit(loader)
        if log_p is None:
            length = {
                "scalar": 1,
                "layerwise": len(treated),
                "diag": sum(p.numel() for p in treated),
            }[prior_structure]
            log_p = torch.full((length,), math.log(p0), dtype=DTYPE, device=device)
            log_p.requires_grad_(True)
            hyper_opt = torch.optim.Adam([log_p, log_s], lr=lr_hyp)
        for _ in range(n_hypersteps):
            hyper_opt.zero_grad()
            prec, s = log_p.exp(), log_s.exp()
            value = -la.log_marginal_likelihood(prec, s if tune_sigma else None)
            value.backward()
            hyper_opt.step()
            margliks.append(value.item())
        if best is None or margliks[-1] < best[0]:
            best = (margliks[-1], theta(model), prec.detach(), s.detach())
    torch.nn.utils.vector_to_parameters(best[1], model.parameters())
    sigma_best = (
        best[3]
        if tune_sigma
        else torch.tensor(s0 if regression else 1.0, device=device)
    )
    la = Laplace(
        model,
        likelihood,
        subset,
        structure,
        sigma_noise=sigma_best,
        prior_precision=best[2],
        temperature=temperature,
    )
    la.fit(loader)
    return la, margliks, losses


ORACLE_CASES = [
    # likelihood, structure, subset, prior structure, temperature, fix_sigma
    ("regression", "full", "all", "layerwise", 1.0, False),
    ("regression", "kron", "all", "scalar", 1.5, False),
    ("regression", "diag", "last_layer", "diag", 1.0, False),
    ("regression", "full", "last_layer", "layerwise", 0.5, True),
    ("classification", "kron", "last_layer", "layerwise", 1.0, False),
    ("classification", "diag", "all", "diag", 2.0, False),
]


@pytest.mark.parametrize(
    "likelihood, structure, subset, prior_structure, temperature, fix_sigma",
    ORACLE_CASES,
)
def test_equals_oracle(
    likelihood, structure, subset, prior_structure, temperature, fix_sigma, device
):
    n_out = 3 if likelihood == "classification" else 1
    loader = make_loader(likelihood, device=device)
    schedule = dict(n_epochs=7, burnin=2, frequency=2, n_hypersteps=3)
    hyper = dict(lr_hyp=0.2, p0=0.7, s0=0.6, temperature=temperature)
    expected_model = make_model(n_out=n_out, device=device)
    la_expected, margliks_expected, losses_expected = oracle(
        expected_model,
        loader,
        likelihood,
        structure,
        subset,
        prior_structure,
        lr=0.1,
        fix_sigma=fix_sigma,
        **schedule,
        **hyper,
    )
    phases = []
    la, model, margliks, losses = marglik_training(
        make_model(n_out=n_out, device=device),
        loader,
        likelihood=likelihood,
        hessian_structure=structure,
        subset_of_weights=subset,
        optimizer_cls=sgd(0.1),
        n_epochs=7,
        n_epochs_burnin=2,
        marglik_frequency=2,
        n_hypersteps=3,
        lr_hyp=0.2,
        prior_structure=prior_structure,
        prior_prec_init=0.7,
        sigma_noise_init=0.6,
        temperature=temperature,
        fix_sigma_noise=fix_sigma,
        callback=lambda epoch, la: phases.append(epoch),
    )
    assert phases == [2, 4, 6]
    assert len(margliks) == 3 * 3 and len(losses) == 7
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(losses_expected))
    torch.testing.assert_close(torch.tensor(margliks), torch.tensor(margliks_expected))
    torch.testing.assert_close(theta(model), theta(expected_model))
    torch.testing.assert_close(la.prior_precision, la_expected.prior_precision)
    torch.testing.assert_close(la.sigma_noise, la_expected.sigma_noise)
    torch.testing.assert_close(
        la.log_marginal_likelihood(), la_expected.log_marginal_likelihood()
    )
    # the returned Laplace reproduces the best phase-final value recorded
    best = min(margliks[2::3])
    torch.testing.assert_close(-la.log_marginal_likelihood().item(), best)


# ----------------------------------------------------------------------------------
# Behaviour
# ----------------------------------------------------------------------------------


def test_recovers_known_noise_and_evidence_increases(device):
    """y = sin(2x) + 0.2 eps on [-2, 2]: the noise is learned within 10% (the
    realized noise has a root mean square of 0.197 and the network fits to 0.195)
    and the evidence grows over training."""
    sigma_true, n = 0.2, 120
    g = torch.Generator().manual_seed(0)
    x = 2 * (2 * torch.rand(n, 1, generator=g, dtype=DTYPE) - 1)
    y = torch.sin(2 * x) + sigma_true * torch.randn(n, 1, generator=g, dtype=DTYPE)
    loader = DataLoader(TensorDataset(x.to(device), y.to(device)), batch_size=40)
    la, model, margliks, losses = marglik_training(
        make_model(n_in=1, width=20, device=device),
        loader,
        likelihood="regression",
        hessian_structure="full",
        prior_structure="layerwise",
        optimizer_kwargs={"lr": 3e-2},
        n_epochs=200,
        marglik_frequency=10,
        n_hypersteps=10,
    )
    sigma = la.sigma_noise.item()
    assert abs(sigma / sigma_true - 1) < 0.1, sigma
    phase_final = margliks[9::10]  # negative log evidence at the end of each phase
    assert len(phase_final) == 20
    assert phase_final[-1] < phase_final[0] - 50
    assert sum(phase_final[-5:]) < sum(phase_final[:5])
    assert losses[-1] < losses[0]


def test_returns_the_best_phase_not_the_last(device):
    """An 'optimizer' that makes the fit ever worse: the best evidence is an early
    one, and its weights and hyperparameters are what comes back."""
    loader = make_loader(batch_size=12, device=device)  # two steps per epoch
    ends = []

    class Worsening(torch.optim.Optimizer):
        def __init__(self, params, **kwargs):
            super().__init__(params, {})
            self.gen = torch.Generator().manual_seed(1)
            self.steps = 0

        @torch.no_grad()
        def step(self, closure=None):
            self.steps += 1
            for group in self.param_groups:
                for p in group["params"]:
                    noise = torch.randn(p.shape, generator=self.gen, dtype=DTYPE)
                    noise = noise.to(p.device)
                    p.add_(0.05 * self.steps**2 * noise)
            if self.steps % 2 == 0:
                ends.append(theta(model))

    model = make_model(device=device)
    la, returned, margliks, _ = marglik_training(
        model,
        loader,
        likelihood="regression",
        hessian_structure="full",
        optimizer_cls=Worsening,
        n_epochs=6,
        n_hypersteps=2,
        prior_structure="scalar",
    )
    finals = margliks[1::2]
    best = min(range(6), key=finals.__getitem__)
    assert best < 5  # not the last
    assert returned is model
    torch.testing.assert_close(theta(model), ends[best])
    torch.testing.assert_close(-la.log_marginal_likelihood().item(), finals[best])
    assert not model.training


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_structures_and_subsets(structure, subset, device):
    model = make_model(n_out=3, device=device)
    la, returned, margliks, losses = marglik_training(
        model,
        make_loader("classification", device=device),
        hessian_structure=structure,
        subset_of_weights=subset,
        n_epochs=2,
        n_hypersteps=2,
    )
    assert type(la) is CLASSES[(subset, structure)]
    assert returned is model and la.fitted
    assert len(margliks) == 4 and all(isinstance(v, float) for v in margliks)
    assert len(losses) == 2 and all(isinstance(v, float) for v in losses)
    n_layers = 2 if subset == "last_layer" else 4
    assert la.prior_precision.shape == (n_layers,)  # layer-wise by default
    if subset == "last_layer":
        assert la.params == list(model[-1].parameters())
    assert torch.isfinite(la(torch.randn(5, 2, dtype=DTYPE, device=device))).all()


@pytest.mark.parametrize(
    "prior_structure, subset, length",
    [
        ("scalar", "all", 1),
        ("layerwise", "all", 4),
        ("diag", "all", 2 * 6 + 6 + 6 + 1),
        ("scalar", "last_layer", 1),
        ("layerwise", "last_layer", 2),
        ("diag", "last_layer", 7),
    ],
)
def test_prior_structure_shapes(prior_structure, subset, length, device):
    la, *_ = marglik_training(
        make_model(device=device),
        make_loader(device=device),
        likelihood="regression",
        hessian_structure="diag",
        subset_of_weights=subset,
        prior_structure=prior_structure,
        n_epochs=1,
        n_hypersteps=2,
    )
    assert la.prior_precision.shape == (length,)
    assert not la.prior_precision.requires_grad and not la.sigma_noise.requires_grad


def test_fix_sigma_noise_keeps_the_initial_noise(device):
    la, *_ = marglik_training(
        make_model(device=device),
        make_loader(device=device),
        likelihood="regression",
        hessian_structure="kron",
        sigma_noise_init=0.37,
        fix_sigma_noise=True,
        n_epochs=2,
        n_hypersteps=3,
    )
    assert la.sigma_noise.item() == pytest.approx(0.37, rel=1e-12)
    la, *_ = marglik_training(
        make_model(n_out=3, device=device),
        make_loader("classification", device=device),
        n_epochs=1,
    )
    assert la.sigma_noise.item() == 1.0  # no noise to learn in classification


class DictData(Dataset):
    """Hugging Face-style items: a mapping with the input, a scale and the label."""

    def __init__(self, loader):
        self.x, self.y = loader.dataset.tensors

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        scale = torch.tensor(1.0, device=self.x.device)
        return {"input_ids": self.x[i], "scale": scale, "labels": self.y[i]}


class DictModel(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, batch):
        return self.net(batch["input_ids"] * batch["scale"].to(DTYPE).unsqueeze(-1))


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_dict_batches_equal_tensor_batches(subset, device):
    loader = make_loader("classification", device=device)
    common = dict(
        hessian_structure="kron",
        subset_of_weights=subset,
        n_epochs=3,
        n_hypersteps=2,
        optimizer_cls=sgd(),
    )
    _, tensor_model, margliks, losses = marglik_training(
        make_model(n_out=3, device=device), loader, **common
    )
    dict_loader = DataLoader(DictData(loader), batch_size=8)
    la, dict_model, dict_margliks, dict_losses = marglik_training(
        DictModel(make_model(n_out=3, device=device)), dict_loader, **common
    )
    torch.testing.assert_close(dict_margliks, margliks)
    torch.testing.assert_close(dict_losses, losses)
    torch.testing.assert_close(theta(dict_model), theta(tensor_model))
    # other keys
    keyed = DataLoader(
        [
            {"x": b["input_ids"], "scale": b["scale"], "y": b["labels"]}
            for b in DictData(loader)
        ],
        batch_size=8,
    )

    class Keyed(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = make_model(n_out=3, device=device)

        def forward(self, batch):
            return self.net(batch["x"])

    _, _, keyed_margliks, _ = marglik_training(
        Keyed(), keyed, dict_key_x="x", dict_key_y="y", **common
    )
    torch.testing.assert_close(keyed_margliks, margliks)


def test_missing_dict_key_fails_on_the_first_batch(device):
    loader = DataLoader(
        DictData(make_loader("classification", device=device)), batch_size=8
    )
    model = DictModel(make_model(n_out=3, device=device))
    before = theta(model)
    with pytest.raises(KeyError, match="dict_key_y='target'"):
        marglik_training(model, loader, dict_key_y="target", n_epochs=1)
    torch.testing.assert_close(theta(model), before)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_enable_backprop(subset, device):
    la, *_ = marglik_training(
        make_model(device=device),
        make_loader(device=device),
        likelihood="regression",
        hessian_structure="full",
        subset_of_weights=subset,
        enable_backprop=True,
        n_epochs=1,
        n_hypersteps=1,
    )
    assert la.enable_backprop
    x = torch.randn(4, 2, dtype=DTYPE, device=device, requires_grad=True)
    f_mu, f_var = la(x)
    (f_mu.sum() + f_var.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_reward_modeling(device):
    class Reward(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = make_model(n_in=2, n_out=1, device=device)

        def forward(self, x):
            r = self.net(x)
            return r.squeeze(-1) if x.ndim == 3 else r

    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 2, 2, generator=g, dtype=DTYPE).to(device)
    y = (x[:, 0, 0] < x[:, 1, 0]).long()  # the item with the larger x0 wins
    loader = DataLoader(TensorDataset(x, y), batch_size=10)
    for subset in ["all", "last_layer"]:
        la, model, margliks, losses = marglik_training(
            Reward(),
            loader,
            likelihood="reward_modeling",
            hessian_structure="kron",
            subset_of_weights=subset,
            n_epochs=2,
            n_hypersteps=2,
        )
        assert la.likelihood == "reward_modeling" and len(margliks) == 4
        f_mu, f_var = la(torch.randn(3, 2, dtype=DTYPE, device=device))
        assert f_mu.shape == (3, 1) and f_var.shape == (3, 1, 1)
    with pytest.raises(ValueError, match=r"pairs"):
        single = DataLoader(TensorDataset(x[:, 0], y), batch_size=10)
        marglik_training(Reward(), single, likelihood="reward_modeling", n_epochs=1)


def test_scheduler_steps_after_every_batch(device):
    calls = []
    la, *_ = marglik_training(
        make_model(n_out=3, device=device),
        make_loader("classification", device=device),  # three batches
        n_epochs=2,
        n_hypersteps=1,
        scheduler_cls=torch.optim.lr_scheduler.LambdaLR,
        scheduler_kwargs={"lr_lambda": lambda step: calls.append(step) or 1.0},
    )
    assert calls == list(range(7))  # once at construction, then per batch


def test_progress_bar_and_schedule(capsys, device):
    epochs = []
    marglik_training(
        make_model(n_out=3, device=device),
        make_loader("classification", device=device),
        n_epochs=7,
        n_epochs_burnin=3,
        marglik_frequency=2,
        n_hypersteps=1,
        progress_bar=True,
        callback=lambda epoch, la: epochs.append(epoch),
    )
    assert epochs == [4, 6]
    assert "marglik training" in capsys.readouterr().err


def test_import_styles():
    """As in laplace-torch: ``laplace.marglik_training`` is the function, the module
    of the same name stays importable."""
    import laplace

    module = importlib.import_module("laplace.marglik_training")
    from laplace.marglik_training import marglik_training as function

    assert callable(laplace.marglik_training) and not isinstance(
        laplace.marglik_training, type(module)
    )
    assert laplace.marglik_training is marglik_training is function
    assert module.marglik_training is function
    assert "marglik_training" in laplace.__all__


def test_non_finite_training_loss_names_the_epoch(device):
    loader = make_loader(device=device)
    x, y = loader.dataset.tensors
    y = y.clone()
    y[9] = float("nan")  # second batch
    bad = DataLoader(TensorDataset(x, y), batch_size=8)
    with pytest.raises(RuntimeError, match="epoch 1, batch 1"):
        marglik_training(
            make_model(device=device),
            bad,
            likelihood="regression",
            n_epochs=1,
        )


# ----------------------------------------------------------------------------------
# Bad input: refused before any training
# ----------------------------------------------------------------------------------

BAD = [
    (dict(likelihood="gamma"), ValueError, "likelihood='gamma'"),
    (dict(hessian_structure="lowrank"), ValueError, "'kron', 'diag' or 'full'"),
    (dict(hessian_structure="gp"), ValueError, "'kron', 'diag' or 'full'"),
    (dict(hessian_structure="block"), ValueError, "hessian_structure='block'"),
    (dict(subset_of_weights="subnetwork"), ValueError, "'all' or 'last_layer'"),
    (dict(prior_structure="diag"), ValueError, "prior_structure='diag'.*'kron'"),
    (dict(prior_structure="full"), ValueError, "prior_structure='full'"),
    (dict(backend="CurvlinopsGGN"), TypeError, "backend"),
    (dict(n_epochs=0), ValueError, "n_epochs must be an integer >= 1"),
    (dict(n_epochs=2.0), ValueError, "n_epochs"),
    (dict(n_hypersteps=0), ValueError, "n_hypersteps"),
    (dict(marglik_frequency=0), ValueError, "marglik_frequency"),
    (dict(n_epochs_burnin=-1), ValueError, "n_epochs_burnin"),
    (dict(n_epochs=3, n_epochs_burnin=4), ValueError, "No epoch would tune"),
    (dict(n_epochs=3, marglik_frequency=4), ValueError, "No epoch would tune"),
    (dict(lr_hyp=0.0), ValueError, "lr_hyp must be a positive"),
    (dict(lr_hyp=float("nan")), ValueError, "lr_hyp"),
    (dict(prior_prec_init=-1.0), ValueError, "prior_prec_init"),
    (dict(sigma_noise_init=0.0), ValueError, "sigma_noise_init"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(optimizer_kwargs=[("lr", 1)]), TypeError, "optimizer_kwargs"),
    (dict(scheduler_kwargs={"gamma": 0.9}), ValueError, "without a scheduler_cls"),
    (dict(callback=3), TypeError, "callback"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD)
def test_bad_input(kwargs, error, match, device):
    model = make_model(device=device)
    before = theta(model)
    kwargs = {"likelihood": "regression", "n_epochs": 2, **kwargs}
    with pytest.raises(error, match=match):
        marglik_training(model, make_loader(device=device), **kwargs)
    torch.testing.assert_close(theta(model), before)  # nothing trained


def test_bad_model_and_loader(device):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        marglik_training(lambda x: x, make_loader(device=device))
    frozen = make_model(device=device).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters that require grad"):
        marglik_training(frozen, make_loader(device=device))
    with pytest.raises(TypeError, match="train_loader must be a"):
        marglik_training(
            make_model(device=device),
            [(torch.ones(2, 2, device=device), torch.ones(2, device=device))],
        )


def test_backend_without_the_structure_or_dict_support(device):
    from laplace.curvature import BackPackGGN, CurvlinopsEF

    # CurvlinopsEF has no KFAC: refused up front, naming backends that have one
    if "kron" not in CurvlinopsEF.supported_structures:
        with pytest.raises(ValueError, match="CurvlinopsEF cannot compute"):
            marglik_training(
                make_model(device=device),
                make_loader(device=device),
                backend=CurvlinopsEF,
            )
    if not BackPackGGN.supports_dict_inputs:
        loader = DataLoader(
            DictData(make_loader("classification", device=device)), batch_size=8
        )
        model = DictModel(make_model(n_out=3, device=device))
        before = theta(model)
        with pytest.raises(ValueError, match="mapping"):
            marglik_training(model, loader, backend=BackPackGGN, n_epochs=1)
        torch.testing.assert_close(theta(model), before)


def test_targets_of_the_wrong_form_fail_on_the_first_batch(device):
    # float targets for classification
    loader = make_loader("regression", device=device)
    with pytest.raises(ValueError, match="class indices"):
        marglik_training(make_model(n_out=3, device=device), loader, n_epochs=1)


@pytest.mark.parametrize("structure", ["full", "kron"])
def test_structure_as_enum(structure, device):
    from laplace import HessianStructure, Likelihood, PriorStructure

    la, *_ = marglik_training(
        make_model(device=device),
        make_loader(device=device),
        likelihood=Likelihood.REGRESSION,
        hessian_structure=HessianStructure(structure),
        prior_structure=PriorStructure.SCALAR,
        n_epochs=1,
        n_hypersteps=1,
    )
    assert la.prior_precision.shape == (1,)


def test_model_is_trained_in_train_mode(device):
    """Laplace fits in eval mode; every epoch trains in train mode again (dropout
    is active while training)."""
    from laplace.utils import memory_limit

    modes = []
    model = make_model(device=device)
    model.register_forward_pre_hook(lambda m, args: modes.append(m.training))
    with memory_limit("off"):  # no memory plan: its forward of one example
        marglik_training(
            model,
            make_loader(batch_size=24, device=device),
            likelihood="regression",
            hessian_structure="diag",
            n_epochs=2,
            n_hypersteps=1,
        )
    assert modes[0] is True and modes.count(True) == 2  # one batch per epoch
    assert not model.training


def test_reward_modeling_takes_any_input_the_model_maps_to_pairs(device):
    """As Laplace.fit: flattened pairs ``(batch, 2 * d)`` train exactly as
    ``(batch, 2, d)`` when the model maps both to the pair's two rewards."""

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = make_model(n_in=2, n_out=1, device=device)

        def forward(self, x):
            if x.ndim == 3 or x.shape[-1] == 4:
                return self.net(x.reshape(-1, 2, 2)).squeeze(-1)
            return self.net(x)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 2, 2, generator=g, dtype=DTYPE).to(device)
    y = (x[:, 0, 0] < x[:, 1, 0]).long()
    results = []
    for inputs in (x, x.reshape(20, 4)):
        loader = DataLoader(TensorDataset(inputs, y), batch_size=10)
        la, model, margliks, _ = marglik_training(
            Flat(), loader, likelihood="reward_modeling", n_epochs=2, n_hypersteps=2
        )
        results.append((torch.stack([torch.as_tensor(m) for m in margliks]), la))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(
        results[0][1].prior_precision, results[1][1].prior_precision
    )
