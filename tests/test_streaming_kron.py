"""The streaming KFAC Laplace approximation (``laplace.streaming.kron_ggn``) against
``KronLaplace.fit`` on the concatenated batches and, for one datum, the dense GGN
oracle of ``tests/oracles.py`` (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace.curvature.native import NativeGGN
from laplace.parametric.kron import KronLaplace
from laplace.streaming import kron_ggn
from tests import models, oracles

INIT_PREC = 0.7


def _model(kind, device, n_out=4, dtype=torch.float64):
    if kind == "norm":  # a layer with no Kronecker form (the engine's dense block)
        torch.manual_seed(0)  # and a dropout: the curvature is taken in eval mode
        m = nn.Sequential(
            nn.Linear(3, 5),
            nn.LayerNorm(5),
            nn.Tanh(),
            nn.Dropout(0.5),
            nn.Linear(5, 4),
        )
        return m.to(device, dtype)
    return models.model(kind, n_out=n_out, dtype=dtype, device=device)


def _trainable(model):
    return {
        k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad
    }


def _splits(x, y, sizes=(3, 5, 2)):
    starts = torch.tensor([0, *sizes]).cumsum(0).tolist()
    return [(x[a:b], y[a:b]) for a, b in zip(starts, starts[1:])]


def _stream(model, likelihood, batches, init_prec=INIT_PREC, **kwargs):
    transform = kron_ggn.build(model, likelihood, init_prec=init_prec, **kwargs)
    state = transform.init(_trainable(model))
    for batch in batches:
        state = transform.update(state, batch)
    return state


def _fit(model, likelihood, x, y, kfac_approx="expand"):
    la = KronLaplace(
        model,
        likelihood,
        prior_precision=INIT_PREC,
        backend=NativeGGN,
        backend_kwargs={"kfac_approx": kfac_approx},
    )
    la.fit(DataLoader(TensorDataset(x, y), batch_size=len(x)))
    return la


def _assert_same_kron(actual, expected):
    assert actual.averaged == expected.averaged
    assert actual._shapes() == expected._shapes()
    for block, other in zip(actual.kfacs, expected.kfacs, strict=True):
        for F, G in zip(block, other, strict=True):
            torch.testing.assert_close(F, G)


@pytest.mark.parametrize(
    "kind, likelihood, kfac_approx",
    [
        ("mlp", "classification", "expand"),
        ("mlp", "regression", "expand"),
        ("cnn", "classification", "expand"),
        ("cnn", "regression", "expand"),
        ("cnn", "classification", "reduce"),
        ("norm", "classification", "expand"),
    ],
)
def test_updates_equal_kron_laplace_fit_on_the_concatenated_batches(
    device, kind, likelihood, kfac_approx
):
    model = _model(kind, device)
    x, y = models.data(kind, likelihood, n=10, device=device)
    batches = _splits(x, y)
    state = _stream(model, likelihood, batches, kfac_approx=kfac_approx)
    la = _fit(model, likelihood, x, y, kfac_approx)

    _assert_same_kron(state.kron, la.H)
    torch.testing.assert_close(
        kron_ggn.precision(state), la.posterior_precision.to_matrix()
    )
    torch.testing.assert_close(state.loss, la.loss)
    assert state.n_data == la.n_data == 10 and int(state.step) == 3
    assert list(state.params) == [
        k for k, v in model.named_parameters() if v.requires_grad
    ]
    with torch.no_grad():
        torch.testing.assert_close(state.aux, model(batches[-1][0]))


def test_kfac_reduce_differs_from_expand_on_a_convolution(device):
    """Guards the test above: ``kfac_approx`` must reach the engine."""
    model = _model("cnn", device)
    x, y = models.data("cnn", "classification", n=4, device=device)
    expand = _stream(model, "classification", [(x, y)], kfac_approx="expand")
    reduce = _stream(model, "classification", [(x, y)], kfac_approx="reduce")
    assert not torch.allclose(expand.kron.kfacs[0][0], reduce.kron.kfacs[0][0])


def test_mapping_batches_with_custom_keys(device):
    model = models.DictModel().to(device, torch.float64)
    x, y = models.data("mlp", "classification", n=7, device=device)
    scale = torch.linspace(0.5, 1.5, 7, dtype=torch.float64, device=device)[:, None]
    batches = [
        {"input_ids": x[a:b], "scale": scale[a:b], "targets": y[a:b]}
        for a, b in [(0, 4), (4, 7)]
    ]
    transform = kron_ggn.build(
        model, "classification", init_prec=INIT_PREC, dict_key_y="targets"
    )
    state = transform.init(_trainable(model))
    for batch in batches:
        state = transform.update(state, batch)

    rows = [{"input_ids": x[i], "scale": scale[i], "targets": y[i]} for i in range(7)]
    la = KronLaplace(
        model,
        "classification",
        prior_precision=INIT_PREC,
        backend=NativeGGN,
        dict_key_y="targets",
    )
    la.fit(DataLoader(rows, batch_size=7))
    _assert_same_kron(state.kron, la.H)
    assert state.n_data == 7


def _block_diagonal(matrix, sizes):
    """``matrix`` with the blocks between different parameters set to zero."""
    mask = torch.block_diag(*[torch.ones(s, s) for s in sizes]).to(matrix.device)
    return matrix * mask


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_one_datum_gives_the_dense_ggn_on_each_parameter_block(device, likelihood):
    """KFAC is exact for a single datum within each parameter's block (it drops the
    blocks between parameters)."""
    model = _model("mlp", device)
    x, y = models.data("mlp", likelihood, n=1, device=device)
    state = _stream(model, likelihood, [(x, y)])
    ggn = oracles.ggn(model, x, likelihood)
    sizes = [t.numel() for t in state.params.values()]
    expected = _block_diagonal(ggn, sizes)
    assert expected.abs().sum() < 0.9 * ggn.abs().sum()  # KFAC drops something
    eye = torch.eye(ggn.shape[0], dtype=ggn.dtype, device=device)
    torch.testing.assert_close(kron_ggn.precision(state), expected + INIT_PREC * eye)


def test_init_is_the_prior_and_needs_no_data(device):
    model = _model("mlp", device)
    state = kron_ggn.init(_trainable(model), model, init_prec=2)
    P = sum(t.numel() for t in state.params.values())
    eye = torch.eye(P, dtype=torch.float64, device=device)
    torch.testing.assert_close(kron_ggn.precision(state), 2.0 * eye)
    assert state.n_data == 0 and int(state.step) == 0 and state.aux is None
    assert state.loss.dtype == torch.float64 and float(state.loss) == 0.0
    assert isinstance(state.init_prec, float)


def _snapshot(state):
    return (
        [[F.clone() for F in block] for block in state.kron.kfacs],
        state.n_data,
        state.loss.clone(),
        int(state.step),
        state.aux,
    )


def _assert_snapshot(state, snap):
    factors, n_data, loss, step, aux = snap
    for block, saved in zip(state.kron.kfacs, factors, strict=True):
        for F, G in zip(block, saved, strict=True):
            assert torch.equal(F, G)
    assert state.n_data == n_data and torch.equal(state.loss, loss)
    assert int(state.step) == step and state.aux is aux


def test_inplace_changes_the_state_and_otherwise_leaves_it_unchanged(device):
    model = _model("mlp", device)
    x, y = models.data("mlp", "classification", n=10, device=device)
    b1, b2, _ = _splits(x, y)
    transform = kron_ggn.build(model, "classification", init_prec=INIT_PREC)

    s0 = transform.init(_trainable(model))
    snap0 = _snapshot(s0)
    s1 = transform.update(s0, b1)
    assert s1 is not s0
    _assert_snapshot(s0, snap0)
    snap1 = _snapshot(s1)
    s2 = transform.update(s1, b2)
    assert s2 is not s1
    _assert_snapshot(s1, snap1)

    t = transform.init(_trainable(model))
    assert transform.update(t, b1, inplace=True) is t
    assert transform.update(t, b2, inplace=True) is t
    _assert_same_kron(t.kron, s2.kron)
    torch.testing.assert_close(t.loss, s2.loss)
    assert t.n_data == s2.n_data == 8 and int(t.step) == int(s2.step) == 2
    torch.testing.assert_close(t.aux, s2.aux)
    _assert_snapshot(s1, snap1)  # s2's in-place updates did not reach s1


def _model_state(model):
    return {k: (v.clone(), v.data_ptr()) for k, v in model.state_dict().items()}


def _assert_model_unchanged(model, saved):
    now = model.state_dict()
    assert list(now) == list(saved)
    for k, (value, ptr) in saved.items():
        assert torch.equal(now[k], value) and now[k].data_ptr() == ptr, k
    for m in model.modules():
        assert m.training  # put in train mode before the call
        assert not m._forward_hooks and not m._forward_pre_hooks
        assert not m._backward_hooks


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_curvature_at_state_params_leaves_the_model_bitwise_unchanged(device, kind):
    model = _model(kind, device).train()
    x, y = models.data(kind, "regression", n=10, device=device)
    g = torch.Generator().manual_seed(3)
    shifted = {
        k: v + 0.3 * torch.randn(v.shape, generator=g, dtype=v.dtype).to(device)
        for k, v in _trainable(model).items()
    }
    saved = _model_state(model)
    transform = kron_ggn.build(model, "regression", init_prec=INIT_PREC)
    state = transform.init(shifted)
    for batch in _splits(x, y):
        state = transform.update(state, batch)
    _assert_model_unchanged(model, saved)

    moved = copy.deepcopy(model)
    moved.load_state_dict(shifted, strict=False)
    expected = _fit(moved, "regression", x, y)
    _assert_same_kron(state.kron, expected.H)
    at_model = _fit(model, "regression", x, y)  # the shift matters
    assert not torch.allclose(state.kron.kfacs[0][0], at_model.H.kfacs[0][0])


def test_the_model_is_restored_when_the_engine_fails(device):
    model = _model("mlp", device).train()
    x, _ = models.data("mlp", "classification", n=4, device=device)
    saved = _model_state(model)
    state = kron_ggn.init(
        {k: v + 1.0 for k, v in _trainable(model).items()}, model, INIT_PREC
    )
    bad_targets = torch.zeros(4, 2, 2, device=device)  # not class indices
    with pytest.raises(Exception):  # noqa: B017 - the engine's own error
        kron_ggn.update(state, (x, bad_targets), model, "classification")
    _assert_model_unchanged(model, saved)


def test_a_non_finite_batch_raises_and_leaves_the_state(device):
    model = _model("mlp", device)
    x, y = models.data("mlp", "regression", n=4, device=device)
    state = kron_ggn.init(_trainable(model), model, INIT_PREC)
    state = kron_ggn.update(state, (x, y), model, "regression")
    snap = _snapshot(state)
    y_bad = y.clone()
    y_bad[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="The loss of .*not finite"):
        kron_ggn.update(state, (x, y_bad), model, "regression", inplace=True)
    _assert_snapshot(state, snap)


def test_sample_shapes_and_dtypes(device):
    model = _model("cnn", device)
    x, y = models.data("cnn", "classification", n=4, device=device)
    state = _stream(model, "classification", [(x, y)])
    for shape in [(), (5,), (2, 3)]:
        draws = kron_ggn.sample(state, torch.Size(shape))
        assert list(draws) == list(state.params)
        for k, v in draws.items():
            assert v.shape == (*shape, *state.params[k].shape), k
            assert v.dtype == torch.float64 and v.device == x.device
    one = kron_ggn.sample(state)
    assert not torch.equal(one["0.weight"], state.params["0.weight"])


def test_sample_mean_and_covariance_match_the_inverse_precision(device):
    """With ``n`` draws whitened by the Cholesky factor ``L`` of the precision
    (``P = L L^T``), ``z = (theta - mean) L`` is standard normal if the draws have
    covariance ``P^{-1}``: each entry of the sample mean of ``z`` has standard
    deviation ``1/sqrt(n)``, each entry of its sample covariance minus ``I`` at most
    ``sqrt(2/n)``; the tolerances are 6 such standard deviations (``n = 20000``:
    0.042 and 0.060) over ``P = 69`` and ``69^2`` entries."""
    model = _model("mlp", device)
    x, y = models.data("mlp", "regression", n=10, device=device)
    state = _stream(model, "regression", _splits(x, y), init_prec=0.3)
    prec = kron_ggn.precision(state)
    eigenvalues = torch.linalg.eigvalsh(prec)
    assert eigenvalues.max() / eigenvalues.min() > 20  # far from isotropic

    n = 20_000
    torch.manual_seed(0)
    draws = kron_ggn.sample(state, (n,))
    theta = torch.cat([draws[k].reshape(n, -1) for k in state.params], 1)
    mean = torch.cat([v.reshape(-1) for v in state.params.values()])
    L = torch.linalg.cholesky(prec)
    z = (theta - mean) @ L
    P = z.shape[1]
    assert P == 69
    assert z.mean(0).abs().max() < 6 / n**0.5
    cov = torch.cov(z.T, correction=1)
    eye = torch.eye(P, dtype=cov.dtype, device=device)
    assert (cov - eye).abs().max() < 6 * (2 / n) ** 0.5


def test_sample_refuses_a_singular_precision(device):
    model = _model("mlp", device)
    x, y = models.data("mlp", "regression", n=10, device=device)
    empty = kron_ggn.init(_trainable(model), model, init_prec=0.0)
    with pytest.raises(ValueError, match="singular.*init_prec > 0"):
        kron_ggn.sample(empty)
    # two data for an input side of 3: the first layer's A has rank 2
    few = kron_ggn.update(empty, (x[:2], y[:2]), model, "regression")
    with pytest.raises(ValueError, match="singular"):
        kron_ggn.sample(few)
    # regression on ten data: every factor has full rank
    full = _stream(model, "regression", _splits(x, y), init_prec=0.0)
    draws = kron_ggn.sample(full, (3,))
    assert all(bool(torch.isfinite(v).all()) for v in draws.values())


@pytest.mark.filterwarnings("ignore:Kronecker factor has clearly negative")
def test_bfloat16_model_keeps_float32_factors(device):
    """(The engine computes a bfloat16 model's factors in bfloat16, which can make
    them slightly indefinite: ``sample`` then warns and clamps.)"""
    model = _model("mlp", device, dtype=torch.bfloat16)
    x, y = models.data("mlp", "classification", n=10, dtype=torch.bfloat16)
    state = _stream(model, "classification", _splits(x, y))
    assert all(F.dtype == torch.float32 for b in state.kron.kfacs for F in b)
    assert state.loss.dtype == torch.float32
    assert all(v.dtype == torch.bfloat16 for v in state.params.values())
    assert kron_ggn.precision(state).dtype == torch.float32
    draws = kron_ggn.sample(state, (2,))
    assert all(v.dtype == torch.bfloat16 for v in draws.values())

    reference = _stream(model.double(), "classification", _splits(x.double(), y))
    P = kron_ggn.precision(reference)
    torch.testing.assert_close(
        kron_ggn.precision(state).double(), P, atol=0.03 * P.abs().max(), rtol=0.03
    )


def test_bad_inputs_raise_clear_errors(device):
    model = _model("mlp", device)  # '2.bias' is frozen
    params = _trainable(model)
    x, y = models.data("mlp", "classification", n=4, device=device)

    with pytest.raises(TypeError, match="params must be a dict"):
        kron_ggn.init(list(params.values()), model)
    with pytest.raises(ValueError, match=r"missing \['0.bias'\]"):
        kron_ggn.init({k: v for k, v in params.items() if k != "0.bias"}, model)
    every = dict(model.named_parameters())
    with pytest.raises(ValueError, match=r"unexpected \['2.bias'\] \(frozen"):
        kron_ggn.init(every, model)
    with pytest.raises(ValueError, match=r"params\['0.weight'\].*shape \(5, 3\)"):
        kron_ggn.init({**params, "0.weight": params["0.weight"].T}, model)
    with pytest.raises(ValueError, match=r"params\['0.bias'\].*dtype"):
        kron_ggn.init({**params, "0.bias": params["0.bias"].float()}, model)
    with pytest.raises(TypeError, match=r"params\['0.bias'\] must be a tensor"):
        kron_ggn.init({**params, "0.bias": [0.0] * 5}, model)
    with pytest.raises(TypeError, match="init_prec must be a float.*float\\(t\\)"):
        kron_ggn.init(params, model, init_prec=torch.tensor(1.0))
    with pytest.raises(TypeError, match="init_prec must be a float"):
        kron_ggn.build(model, init_prec="1.0")
    with pytest.raises(ValueError, match="init_prec must be a finite float >= 0"):
        kron_ggn.build(model, init_prec=-1.0)
    with pytest.raises(ValueError, match="likelihood='reward_modeling'.*'regression'"):
        kron_ggn.build(model, "reward_modeling")
    with pytest.raises(ValueError, match="likelihood='gauss'"):
        kron_ggn.build(model, "gauss")
    with pytest.raises(ValueError, match=r"kfac_approx must be one of.*'mean'"):
        kron_ggn.build(model, kfac_approx="mean")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        kron_ggn.build(lambda p, b: p)

    state = kron_ggn.init(params, model)
    with pytest.raises(TypeError, match="pair \\(x, y\\) or a mapping"):
        kron_ggn.update(state, x, model)
    with pytest.raises(TypeError, match="state must be a KronLaplaceState"):
        kron_ggn.update({"params": params}, (x, y), model)
    other = _model("cnn", device)
    with pytest.raises(ValueError, match="state.params must hold exactly"):
        kron_ggn.update(state, (x, y), other)


def test_the_default_initial_precision_is_zero(device):
    model = _model("mlp", device)
    state = kron_ggn.build(model).init(_trainable(model))
    assert state.init_prec == 0.0 and not kron_ggn.precision(state).any()
    assert kron_ggn.init(_trainable(model), model).init_prec == 0.0
