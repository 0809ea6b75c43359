"""Subnetwork masks and diagonal SWAG against independent oracles: brute-force sorts,
index ranges from ``named_parameters``, the DiagLaplace variances, and a hand-written
SGD loop with the snapshot variance; state restored; bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from laplace import DiagLaplace, DiagLLLaplace, KronLaplace
from laplace.likelihood import OutputLikelihood
from laplace.utils import (
    LargestMagnitudeSubnetMask,
    LargestVarianceDiagLaplaceSubnetMask,
    LargestVarianceSWAGSubnetMask,
    LastLayerSubnetMask,
    ModuleNameSubnetMask,
    ParamNameSubnetMask,
    RandomSubnetMask,
    ScoreBasedSubnetMask,
    SubnetMask,
    fit_diagonal_swag_var,
)
from tests.models import NaturalHead, SoftplusPoisson

DT = torch.float64


def mlp(frozen=False):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)
    ).to(DT)
    if frozen:
        model[2].bias.requires_grad_(False)
    return model


def batches(regression=False, n=10, size=4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, generator=g, dtype=DT)
    y = (
        torch.randn(n, 3, generator=g, dtype=DT)
        if regression
        else torch.randint(0, 3, (n,), generator=g)
    )
    return [(x[i : i + size], y[i : i + size]) for i in range(0, n, size)]


def data_loader(regression=False):
    """The same batches as ``batches`` from a DataLoader (no shuffling)."""
    x, y = map(torch.cat, zip(*batches(regression)))
    return DataLoader(TensorDataset(x, y), batch_size=4)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def ranges(model, names):
    """Indices of the named parameters, from the sizes in ``named_parameters``."""
    out, start = [], 0
    for name, p in model.named_parameters():
        if name in names:
            out.extend(range(start, start + p.numel()))
        start += p.numel()
    return torch.tensor(out)


def top_k(scores, k):
    """Brute force: sort (score, -index) pairs, keep the k largest, ascending."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:k]))


def check_indices(idx, expected, n_params):
    assert idx.dtype == torch.int64 and idx.ndim == 1
    torch.testing.assert_close(idx, expected.to(idx))
    assert bool((idx.diff() > 0).all()) and int(idx.max()) < n_params


# -- oracle of diagonal SWAG ----------------------------------------------------------
def swag_oracle(model, loader, loss_fn, K, f, lr, momentum, wd):
    """SGD written out (heavy-ball momentum, L2 decay on trainable weights); the
    snapshots after epochs 1, 1 + f, ...; their population variance."""
    names = [n for n, _ in model.named_parameters()]
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    buf = {}
    snapshots = []
    for epoch in range(K * f):
        for x, y in loader:
            params = {n: t.requires_grad_(n in trainable) for n, t in theta.items()}
            loss = loss_fn(functional_call(model, params, (x,)), y)
            grads = torch.autograd.grad(loss, [params[n] for n in trainable])
            with torch.no_grad():
                for n, g in zip(trainable, grads):
                    d = g + wd * theta[n]
                    buf[n] = d if n not in buf else momentum * buf[n] + d
                    theta[n] = (theta[n] - lr * buf[n]).detach()
        if epoch % f == 0:
            snapshots.append(torch.cat([theta[n].reshape(-1) for n in names]))
    S = torch.stack(snapshots)
    assert len(S) == K
    return ((S - S.mean(0)) ** 2).mean(0)


@pytest.mark.parametrize("K, f", [(3, 1), (3, 2)])
def test_swag_variance_against_hand_written_sgd(K, f):
    model = mlp(frozen=True)
    loader = batches()
    theta0 = flat(model)
    var = fit_diagonal_swag_var(
        model,
        loader,
        nn.CrossEntropyLoss(),
        K,
        f,
        lr=0.1,
        momentum=0.8,
        weight_decay=0.01,
    )
    oracle = swag_oracle(model, loader, nn.CrossEntropyLoss(), K, f, 0.1, 0.8, 0.01)
    torch.testing.assert_close(var, oracle.clamp(min=1e-30), rtol=1e-9, atol=1e-14)
    assert var.shape == (model_size(model),) and var.dtype == DT
    # the frozen bias does not move: exactly min_var; the others do
    frozen = ranges(model, {"2.bias"})
    assert bool((var[frozen] == 1e-30).all())
    moving = torch.ones_like(var, dtype=torch.bool)
    moving[frozen] = False
    assert bool((var[moving] > 1e-12).all())
    torch.testing.assert_close(flat(model), theta0, rtol=0, atol=0)


def model_size(model):
    return sum(p.numel() for p in model.parameters())


def test_swag_regression_dataloader_min_var():
    model = mlp()
    data, loader = batches(regression=True), data_loader(regression=True)
    var = fit_diagonal_swag_var(model, loader, nn.MSELoss(), 4, lr=0.05, min_var=1e-3)
    oracle = swag_oracle(model, data, nn.MSELoss(), 4, 1, 0.05, 0.9, 3e-4)
    torch.testing.assert_close(var, oracle.clamp(min=1e-3), rtol=1e-9, atol=1e-14)
    assert bool((var >= 1e-3).all()) and bool((var > 1e-3).any())


def test_swag_dict_batches():
    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, batch):
            return self.net(batch["features"])

    model = DictModel()
    data = batches()
    dict_loader = [{"features": x, "target": y} for x, y in data]
    var = fit_diagonal_swag_var(
        model,
        dict_loader,
        nn.CrossEntropyLoss(),
        3,
        lr=0.1,
        dict_key_x="features",
        dict_key_y="target",
    )
    oracle = swag_oracle(model.net, data, nn.CrossEntropyLoss(), 3, 1, 0.1, 0.9, 3e-4)
    torch.testing.assert_close(var, oracle, rtol=1e-9, atol=1e-14)


def test_swag_restores_weights_buffers_grads_and_modes():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 3)
    ).to(DT)
    model.eval()
    model[2].train()  # mixed modes must come back as they were
    grad = torch.ones_like(model[0].weight)
    model[0].weight.grad = grad
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    fit_diagonal_swag_var(model, batches(), nn.CrossEntropyLoss(), 2, lr=0.1)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    assert [m.training for m in model.modules()] == [False, False, False, True, False]
    assert model[0].weight.grad is grad and bool((grad == 1).all())
    assert all(p.grad is None for p in params[1:])
    assert list(model.parameters()) == params  # trained in place, same objects


def test_swag_restores_after_exception_in_loader():
    model = mlp()
    model.eval()
    theta0 = flat(model)
    data = batches()

    class Failing:
        def __iter__(self):
            yield data[0]
            raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        fit_diagonal_swag_var(model, Failing(), nn.CrossEntropyLoss(), 2, lr=0.1)
    torch.testing.assert_close(flat(model), theta0, rtol=0, atol=0)
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_swag_bad_input():
    model, loader, ce = mlp(), batches(), nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="n_snapshots_total"):
        fit_diagonal_swag_var(model, loader, ce, n_snapshots_total=1)
    with pytest.raises(TypeError, match="n_snapshots_total"):
        fit_diagonal_swag_var(model, loader, ce, n_snapshots_total=2.0)
    with pytest.raises(ValueError, match="snapshot_freq"):
        fit_diagonal_swag_var(model, loader, ce, snapshot_freq=0)
    with pytest.raises(ValueError, match="lr"):
        fit_diagonal_swag_var(model, loader, ce, lr=0.0)
    with pytest.raises(ValueError, match="momentum"):
        fit_diagonal_swag_var(model, loader, ce, momentum=-0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        fit_diagonal_swag_var(model, loader, ce, weight_decay=float("nan"))
    with pytest.raises(TypeError, match="criterion"):
        fit_diagonal_swag_var(model, loader, "cross_entropy")
    theta0 = flat(model)
    with pytest.raises(ValueError, match="no batches in epoch 2"):
        fit_diagonal_swag_var(model, iter(loader), ce, 2, lr=0.1)
    with pytest.raises(ValueError, match="no batches in epoch 1"):
        fit_diagonal_swag_var(model, [], ce, 2)
    with pytest.raises(RuntimeError, match="diverged"):
        fit_diagonal_swag_var(model, loader, ce, 2, lr=1e200)
    torch.testing.assert_close(flat(model), theta0, rtol=0, atol=0)
    frozen = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="require grad"):
        fit_diagonal_swag_var(frozen, loader, ce, 2)


# -- score-based masks ----------------------------------------------------------------
def test_largest_magnitude_against_brute_force_sort():
    model = mlp(frozen=True)
    with torch.no_grad():  # a tie: the lower index wins
        model[0].weight[0, :2] = 7.0
    theta = flat(model)
    for k in (1, 2, 5, model_size(model)):
        mask = LargestMagnitudeSubnetMask(model, k)
        assert mask.n_params_subnet == k
        idx = mask.select()
        check_indices(idx, top_k(theta.abs().tolist(), k), model_size(model))
        assert mask.indices is idx and mask.n_params_subnet == k
    m = LargestMagnitudeSubnetMask(model, 1)
    check_indices(m.select(), torch.tensor([0]), model_size(model))
    boolean = LargestMagnitudeSubnetMask(model, 6).get_subnet_mask(None)
    assert boolean.dtype == torch.bool and int(boolean.sum()) == 6
    torch.testing.assert_close(
        boolean.nonzero().flatten(), top_k(theta.abs().tolist(), 6)
    )


def test_random_mask_reproducible_and_distinct():
    model = mlp()
    n = model_size(model)
    torch.manual_seed(3)
    a = RandomSubnetMask(model, 10).select()
    torch.manual_seed(3)
    b = RandomSubnetMask(model, 10).select()
    c = RandomSubnetMask(model, 10).select()
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    for idx in (a, c):
        assert len(idx) == 10 and len(torch.unique(idx)) == 10
        check_indices(idx, idx.sort().values, n)
    torch.manual_seed(4)
    covered = torch.cat([RandomSubnetMask(model, 10).select() for _ in range(50)])
    assert len(torch.unique(covered)) == n  # every weight can be drawn


def variances_in_full_vector(model, la):
    """``la.posterior_variance`` at the weights it treats, -inf elsewhere."""
    full = torch.full((model_size(model),), -torch.inf, dtype=DT)
    treated = {id(p) for p in la.params}
    start, pieces = 0, iter(la.posterior_variance.split([p.numel() for p in la.params]))
    for p in model.parameters():
        if id(p) in treated:
            full[start : start + p.numel()] = next(pieces)
        start += p.numel()
    return full


def test_diag_laplace_variance_mask_fitted_and_unfitted():
    model, loader = mlp(frozen=True), data_loader()
    reference = DiagLaplace(model, "classification", prior_precision=0.7)
    reference.fit(loader)
    scores = variances_in_full_vector(model, reference)
    assert int(torch.isinf(scores).sum()) == 4  # the frozen bias has no variance

    la = DiagLaplace(model, "classification", prior_precision=0.7)
    mask = LargestVarianceDiagLaplaceSubnetMask(model, 9, la)
    with pytest.raises(ValueError, match="not fitted"):
        mask.select()
    idx = mask.select(loader)  # fits it
    assert la.fitted
    torch.testing.assert_close(la.posterior_variance, reference.posterior_variance)
    check_indices(idx, top_k(scores.tolist(), 9), model_size(model))
    torch.testing.assert_close(mask.compute_param_scores(None), scores)

    # fitted: used as it is, no loader needed; all treated weights can be chosen
    n_treated = sum(p.numel() for p in reference.params)
    full = LargestVarianceDiagLaplaceSubnetMask(model, n_treated, reference).select()
    check_indices(full, top_k(scores.tolist(), n_treated), model_size(model))
    too_many = LargestVarianceDiagLaplaceSubnetMask(model, n_treated + 1, reference)
    with pytest.raises(ValueError, match=f"only {n_treated} of the"):
        too_many.select()
    with pytest.raises(RuntimeError, match="not selected"):
        _ = too_many.indices


def test_diag_last_layer_laplace_variance_mask():
    model, loader = mlp(), data_loader()
    la = DiagLLLaplace(model, "classification", prior_precision=0.5)
    la.fit(loader)
    scores = variances_in_full_vector(model, la)
    idx = LargestVarianceDiagLaplaceSubnetMask(model, 5, la).select()
    check_indices(idx, top_k(scores.tolist(), 5), model_size(model))
    assert set(idx.tolist()) <= set(ranges(model, {"4.weight", "4.bias"}).tolist())


def test_diag_laplace_mask_bad_input():
    model = mlp()
    with pytest.raises(TypeError, match="DiagLaplace"):
        LargestVarianceDiagLaplaceSubnetMask(
            model, 3, KronLaplace(model, "classification")
        )
    other = DiagLaplace(mlp(), "classification")
    with pytest.raises(ValueError, match="not the model's"):
        LargestVarianceDiagLaplaceSubnetMask(model, 3, other)


def test_swag_mask_against_oracle():
    model, loader = mlp(), batches()
    mask = LargestVarianceSWAGSubnetMask(
        model, 6, swag_n_snapshots=3, swag_snapshot_freq=2, swag_lr=0.1
    )
    idx = mask.select(loader)
    oracle = swag_oracle(model, loader, nn.CrossEntropyLoss(), 3, 2, 0.1, 0.9, 3e-4)
    check_indices(idx, top_k(oracle.tolist(), 6), model_size(model))

    reg, data = mlp(), batches(regression=True)
    m = LargestVarianceSWAGSubnetMask(reg, 4, "regression", 3, swag_lr=0.05)
    torch.testing.assert_close(
        m.compute_param_scores(data),
        swag_oracle(reg, data, nn.MSELoss(), 3, 1, 0.05, 0.9, 3e-4),
        rtol=1e-9,
        atol=1e-14,
    )
    with pytest.raises(ValueError, match="train_loader"):
        m.select()
    with pytest.raises(ValueError, match="likelihood='gauss' is not valid"):
        LargestVarianceSWAGSubnetMask(reg, 4, likelihood="gauss")
    with pytest.raises(ValueError, match="n_snapshots_total"):
        LargestVarianceSWAGSubnetMask(reg, 4, swag_n_snapshots=1)
    with pytest.raises(ValueError, match="lr"):
        LargestVarianceSWAGSubnetMask(reg, 4, swag_lr=-1.0)


@pytest.mark.parametrize("count", [0, -3, 10_000])
def test_score_mask_count_out_of_range(count):
    model = mlp()
    with pytest.raises(ValueError, match=f"between 1 and .*{model_size(model)}"):
        LargestMagnitudeSubnetMask(model, count)


@pytest.mark.parametrize("count", [2.0, "3", True, None])
def test_score_mask_count_not_int(count):
    with pytest.raises(TypeError, match="n_params_subnet must be an int"):
        RandomSubnetMask(mlp(), count)


def test_score_mask_bad_scores_and_base_classes():
    class Short(ScoreBasedSubnetMask):
        def compute_param_scores(self, train_loader):
            return torch.ones(3)

    class WithNaN(ScoreBasedSubnetMask):
        def compute_param_scores(self, train_loader):
            return torch.full((self.n_params,), torch.nan)

    with pytest.raises(ValueError, match="shape"):
        Short(mlp(), 2).select()
    with pytest.raises(ValueError, match="NaN"):
        WithNaN(mlp(), 2).select()
    with pytest.raises(NotImplementedError):
        SubnetMask(mlp()).select()
    with pytest.raises(NotImplementedError):
        ScoreBasedSubnetMask(mlp(), 2).select()
    with pytest.raises(TypeError, match="model"):
        SubnetMask("model")
    with pytest.raises(ValueError, match="no parameters"):
        SubnetMask(nn.ReLU())


# -- name-based masks -----------------------------------------------------------------
def test_param_names_select_their_ranges():
    model = mlp(frozen=True)
    names = ["4.weight", "0.bias", "2.bias"]
    mask = ParamNameSubnetMask(model, names)
    with pytest.raises(RuntimeError, match="call select"):
        _ = mask.n_params_subnet
    idx = mask.select()
    check_indices(idx, ranges(model, set(names)), model_size(model))
    assert mask.n_params_subnet == 12 + 4 + 4
    assert mask.n_params_subnet == len(ranges(model, set(names)))


def test_module_names_select_their_ranges_including_children():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4)),
        nn.Linear(4, 2),
    ).to(DT)
    idx = ModuleNameSubnetMask(model, ["1"]).select()
    check_indices(idx, ranges(model, {"1.weight", "1.bias"}), model_size(model))
    idx = ModuleNameSubnetMask(model, ["0", "0.2"]).select()  # overlap: union
    expected = ranges(model, {"0.0.weight", "0.0.bias", "0.2.weight", "0.2.bias"})
    check_indices(idx, expected, model_size(model))
    idx = ModuleNameSubnetMask(model, ["0.0", "1"]).select()
    expected = ranges(model, {"0.0.weight", "0.0.bias", "1.weight", "1.bias"})
    check_indices(idx, expected, model_size(model))


def test_tied_parameter_counts_once_under_either_name():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(3, 3, bias=False)
            self.hidden = nn.Linear(3, 3)
            self.head = nn.Linear(3, 3, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, x):
            return self.head(torch.tanh(self.hidden(self.embed(x))))

    model = Tied().to(DT)
    n = model_size(model)
    assert n == 9 + 12  # the tied weight counts once
    expected = torch.arange(9)
    check_indices(ParamNameSubnetMask(model, ["head.weight"]).select(), expected, n)
    check_indices(ModuleNameSubnetMask(model, ["head"]).select(), expected, n)


def test_last_layer_found_from_a_batch_or_named():
    class HeadFirst(nn.Module):  # the head is defined before the body
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)
            self.body = nn.Linear(3, 4)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    model = HeadFirst().to(DT)
    expected = ranges(model, {"head.weight", "head.bias"})
    mask = LastLayerSubnetMask(model)
    with pytest.raises(ValueError, match="train_loader"):
        mask.select()
    check_indices(mask.select(batches()), expected, model_size(model))
    assert mask.last_layer_name == "head" and mask.module_names == ["head"]
    named = LastLayerSubnetMask(model, "head")
    check_indices(named.select(), expected, model_size(model))
    seq = mlp()
    dict_batches = [{"input_ids": x, "labels": y} for x, y in batches()]

    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = seq

        def forward(self, batch):
            return self.net(batch["input_ids"])

    idx = LastLayerSubnetMask(DictModel()).select(dict_batches)
    check_indices(idx, ranges(seq, {"4.weight", "4.bias"}), model_size(seq))


def test_last_layer_bad_input():
    model = mlp()
    with pytest.raises(ValueError, match="no parameters"):
        LastLayerSubnetMask(model, "1")  # a Tanh
    with pytest.raises(ValueError, match=r"closest module names are \['4'"):
        LastLayerSubnetMask(model, "4 ")
    with pytest.raises(TypeError, match="last_layer_name"):
        LastLayerSubnetMask(model, 4)
    conv_last = nn.Sequential(nn.Linear(3, 4), nn.Conv1d(1, 1, 1))
    with pytest.raises(ValueError, match="Conv1d"):
        LastLayerSubnetMask(conv_last, "1")


def test_unknown_names_list_the_closest():
    model = nn.Sequential()
    model.add_module("encoder", nn.Linear(3, 4))
    model.add_module("decoder", nn.Linear(4, 3))
    with pytest.raises(ValueError) as err:
        ParamNameSubnetMask(model, ["encoder.weight", "decoder.wieght"])
    assert "'decoder.wieght'" in str(err.value)
    assert "['decoder.weight'" in str(err.value)
    with pytest.raises(ValueError, match=r"'encodr'.*\['encoder'"):
        ModuleNameSubnetMask(model, ["encodr"])
    with pytest.raises(ValueError, match=r"include \['', 'encoder', 'decoder'\]"):
        ModuleNameSubnetMask(model, ["zzz"])


def test_name_masks_bad_input():
    model = mlp()
    with pytest.raises(ValueError, match="parameter_names is empty"):
        ParamNameSubnetMask(model, [])
    with pytest.raises(ValueError, match="module_names is empty"):
        ModuleNameSubnetMask(model, [])
    with pytest.raises(TypeError, match="wrap it in a list"):
        ParamNameSubnetMask(model, "0.weight")
    with pytest.raises(TypeError, match="module_names must hold str"):
        ModuleNameSubnetMask(model, [0])
    with pytest.raises(ValueError, match=r"modules \['1', '3'\] have no parameters"):
        ModuleNameSubnetMask(model, ["0", "1", "3"])


def test_select_once_and_mask_conversion():
    model = mlp()
    n = model_size(model)
    mask = ParamNameSubnetMask(model, ["0.bias"])
    with pytest.raises(RuntimeError, match="select"):
        _ = mask.indices
    idx = mask.select()
    with pytest.raises(ValueError, match="already"):
        mask.select()
    assert mask.indices is idx  # unchanged by the refused second call
    binary = torch.zeros(n, dtype=torch.long)
    binary[[5, 1, 7]] = 1
    torch.testing.assert_close(
        mask.convert_subnet_mask_to_indices(binary), torch.tensor([1, 5, 7])
    )
    torch.testing.assert_close(
        mask.convert_subnet_mask_to_indices(binary.bool()), torch.tensor([1, 5, 7])
    )
    with pytest.raises(ValueError, match="0 and 1"):
        mask.convert_subnet_mask_to_indices(2 * binary)
    with pytest.raises(ValueError, match="boolean or integer"):
        mask.convert_subnet_mask_to_indices(binary.to(DT))
    with pytest.raises(ValueError, match=rf"shape \({n},\)"):
        mask.convert_subnet_mask_to_indices(binary[:-1])
    with pytest.raises(TypeError, match="tensor"):
        mask.convert_subnet_mask_to_indices([0, 1])


# -- the SWAG mask with every likelihood ---------------------------------------------
def _per_datum_mean(nll):
    """``(f, y) -> mean_n sum_c nll(f, y)[n, c]``, the criterion written out."""
    return lambda f, y: nll(f, y).reshape(len(f), -1).sum(1).mean()


def _heteroscedastic_nll(f, y):
    s2 = -1 / (2 * f[:, 2:])
    return -torch.distributions.Normal(f[:, :2] * s2, s2.sqrt()).log_prob(y)


#: family -> (outputs, the SGD loss written with torch's own losses and
#: distributions, independently of laplace.likelihood)
SWAG_FAMILIES = {
    "binary": (1, nn.BCEWithLogitsLoss()),
    "multilabel": (
        3,
        _per_datum_mean(nn.BCEWithLogitsLoss(reduction="none")),
    ),
    "poisson": (
        3,
        _per_datum_mean(nn.PoissonNLLLoss(log_input=True, reduction="none")),
    ),
    "heteroscedastic_regression": (4, _per_datum_mean(_heteroscedastic_nll)),
    "reward_modeling": (1, nn.CrossEntropyLoss()),
    "user": (
        3,
        _per_datum_mean(
            lambda f, y: (
                -torch.distributions.Poisson(nn.functional.softplus(f)).log_prob(y)
            )
        ),
    ),
}


def _swag_family(family, device, n=10, size=4):
    """A model and batches for ``family`` on ``device``: the targets as the
    likelihood takes them, the oracle's (binary: ``(N, 1)`` floats for
    ``BCEWithLogitsLoss``) and the likelihood to give the mask."""
    n_out, _ = SWAG_FAMILIES[family]
    torch.manual_seed(0)
    layers = [nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, n_out)]
    if family == "heteroscedastic_regression":
        layers.append(NaturalHead())
    if family == "reward_modeling":  # pairs (N, 2, 3) -> their rewards (N, 2)
        layers.append(nn.Flatten(start_dim=1))
    model = nn.Sequential(*layers).to(device, DT)
    g = torch.Generator().manual_seed(1)
    x = torch.randn((n, 2, 3) if family == "reward_modeling" else (n, 3), generator=g)
    if family in ("binary", "reward_modeling"):
        y = torch.randint(0, 2, (n,), generator=g)
        oracle_y = y.to(DT)[:, None] if family == "binary" else y
    elif family == "multilabel":
        y = oracle_y = torch.randint(0, 2, (n, 3), generator=g).to(DT)
    elif family in ("poisson", "user"):
        y = oracle_y = torch.poisson(torch.full((n, 3), 2.0), generator=g).to(DT)
    else:
        y = oracle_y = torch.randn(n, 2, generator=g, dtype=DT)
    x, y, oracle_y = x.to(device, DT), y.to(device), oracle_y.to(device)

    def split(y):
        return [(x[i : i + size], y[i : i + size]) for i in range(0, n, size)]

    likelihood = SoftplusPoisson() if family == "user" else family
    return model, split(y), split(oracle_y), likelihood


@pytest.mark.parametrize("family", list(SWAG_FAMILIES))
def test_swag_mask_runs_sgd_on_the_likelihoods_mean_loss(family, device):
    """Every likelihood: the scores are the SWAG variances of SGD on its negative
    log-likelihood per datum averaged over the batch, as the hand-written SGD loop
    with the criterion written with torch's losses and distributions gives them
    (``BCEWithLogitsLoss`` for binary, ``PoissonNLLLoss(log_input=True)`` summed
    over the outputs for Poisson: its constant ``log y!`` left out changes no
    gradient); the selection is their top entries."""
    model, data, oracle_data, likelihood = _swag_family(family, device)
    _, criterion = SWAG_FAMILIES[family]
    theta0 = flat(model)
    mask = LargestVarianceSWAGSubnetMask(
        model, 5, likelihood, swag_n_snapshots=3, swag_snapshot_freq=2, swag_lr=0.05
    )
    scores = mask.compute_param_scores(data)
    oracle = swag_oracle(model, oracle_data, criterion, 3, 2, 0.05, 0.9, 3e-4)
    torch.testing.assert_close(scores, oracle.clamp(min=1e-30), rtol=1e-9, atol=1e-14)
    assert bool((oracle > 1e-12).all())  # every weight moved: the loss drives SGD
    idx = mask.select(data)
    check_indices(idx, top_k(oracle.tolist(), 5), model_size(model))
    torch.testing.assert_close(flat(model), theta0, rtol=0, atol=0)
    if isinstance(likelihood, OutputLikelihood):
        assert mask.likelihood is likelihood and mask.lik is likelihood
    else:
        assert mask.likelihood.value == family and mask.lik.name == family


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_swag_mask_keeps_laplace_torchs_losses(likelihood, device):
    """Classification and regression keep ``nn.CrossEntropyLoss()`` and
    ``nn.MSELoss()`` (the mean over all ``N C`` entries, not half the squared
    error per datum): bitwise the SWAG of those criteria, and the hand-written
    SGD loop's; with ``C = 3`` outputs the per-datum mean would differ."""
    regression = likelihood == "regression"
    model = mlp().to(device)
    data = [(x.to(device), y.to(device)) for x, y in batches(regression)]
    torch_loss = nn.MSELoss() if regression else nn.CrossEntropyLoss()
    mask = LargestVarianceSWAGSubnetMask(model, 4, likelihood, 3, swag_lr=0.05)
    scores = mask.compute_param_scores(data)
    expected = fit_diagonal_swag_var(model, data, torch_loss, 3, lr=0.05)
    assert torch.equal(scores, expected)
    oracle = swag_oracle(model, data, torch_loss, 3, 1, 0.05, 0.9, 3e-4)
    torch.testing.assert_close(scores, oracle, rtol=1e-9, atol=1e-14)
    if regression:
        half_squares = _per_datum_mean(lambda f, y: 0.5 * (f - y) ** 2)
        per_datum = swag_oracle(model, data, half_squares, 3, 1, 0.05, 0.9, 3e-4)
        assert not torch.allclose(scores, per_datum, rtol=1e-3)


def test_swag_mask_refuses_what_is_no_likelihood_and_bad_targets(device):
    """Up front: an unknown name (ValueError naming the built-ins) or an object
    that is not a likelihood (TypeError); at the first batch, before any SGD step,
    targets the likelihood's ``check_targets`` refuses (the model as it was)."""

    class NoCurvature(OutputLikelihood):
        def loss(self, f, y):
            return f.sum()

    model, data, _, _ = _swag_family("binary", device)
    with pytest.raises(ValueError, match="likelihood='gauss' is not valid.*'poisson'"):
        LargestVarianceSWAGSubnetMask(model, 4, "gauss")
    with pytest.raises(
        TypeError, match="OutputLikelihood object; got CrossEntropyLoss"
    ):
        LargestVarianceSWAGSubnetMask(model, 4, nn.CrossEntropyLoss())
    with pytest.raises(TypeError, match="NoCurvature must implement"):
        LargestVarianceSWAGSubnetMask(model, 4, NoCurvature())
    theta0 = flat(model)
    mask = LargestVarianceSWAGSubnetMask(model, 4, "binary", 2)
    bad = [(x, torch.full_like(y, 2)) for x, y in data]
    with pytest.raises(ValueError, match="Binary targets must be 0 or 1"):
        mask.select(bad)
    torch.testing.assert_close(flat(model), theta0, rtol=0, atol=0)
    mask = LargestVarianceSWAGSubnetMask(model, 4, "poisson", 2)
    with pytest.raises(ValueError, match="Poisson targets must have the outputs'"):
        mask.select(
            [(x, torch.ones(len(x), 3, dtype=DT, device=device)) for x, _ in data]
        )
