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
from laplace.likelihood import OutputLikelihood
from laplace.parametric.kron import KronLaplace
from laplace.streaming import convert, kron_ggn
from tests import models, oracles
from tests.models import NaturalHead, SoftplusPoisson

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


# -- every likelihood of laplace.likelihood ----------------------------------------
#: the likelihoods beyond classification and regression; "user" is SoftplusPoisson()
FAMILIES = [
    "binary",
    "multilabel",
    "poisson",
    "heteroscedastic_regression",
    "reward_modeling",
    "user",
]


def _likelihood(family):
    return SoftplusPoisson() if family == "user" else family


def _family_model(family, device, hidden=True):
    """An MLP (``hidden``) or a single linear layer with the family's outputs:
    one logit for binary, ``2 C`` natural parameters behind ``NaturalHead`` for
    heteroscedastic regression, the two rewards of a pair for reward modeling."""
    torch.manual_seed(0)
    n_out = 1 if family in ("binary", "reward_modeling") else 4
    if hidden:
        layers = [nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, n_out)]
    else:
        layers = [nn.Linear(3, n_out)]
    if family == "heteroscedastic_regression":
        layers.append(NaturalHead())
    if family == "reward_modeling":  # (batch, 2, 3) -> (batch, 2, 1) -> (batch, 2)
        layers.append(nn.Flatten(start_dim=1))
    return nn.Sequential(*layers).to(device, torch.float64)


def _family_data(family, device, n=10):
    """Drawn on the CPU, moved to ``device``: inputs ``(n, 3)`` (pairs ``(n, 2,
    3)`` for reward modeling) and targets the family's ``check_targets`` takes."""
    g = torch.Generator().manual_seed(1)
    shape = (n, 2, 3) if family == "reward_modeling" else (n, 3)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if family in ("binary", "reward_modeling"):
        y = torch.randint(0, 2, (n,), generator=g)
    elif family == "multilabel":
        y = torch.randint(0, 2, (n, 4), generator=g).to(torch.float64)
    elif family in ("poisson", "user"):
        y = torch.poisson(torch.full((n, 4), 2.0), generator=g).to(torch.float64)
    else:  # heteroscedastic regression: C = 2 targets for 2 C = 4 outputs
        y = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return x.to(device), y.to(device)


def _output_hessian(family, f):
    """``Lambda(f)`` ``(N, C, C)`` in closed form (the user likelihood's Fisher
    written out here, the built-ins' in ``tests/oracles.py``)."""
    if family == "user":
        return torch.diag_embed(torch.sigmoid(f) ** 2 / nn.functional.softplus(f))
    return oracles.output_hessian(family, f)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_likelihood_streams_as_kron_laplace_fits(device, family):
    """Names and a likelihood object of one's own: the updates over three batches
    give ``KronLaplace.fit`` on the whole (``reward_modeling``: pairs the model maps
    to their two logits, the classification of pairs)."""
    model = _family_model(family, device)
    x, y = _family_data(family, device)
    likelihood = _likelihood(family)
    state = _stream(model, likelihood, _splits(x, y))
    la = _fit(model, likelihood, x, y)

    _assert_same_kron(state.kron, la.H)
    torch.testing.assert_close(
        kron_ggn.precision(state), la.posterior_precision.to_matrix()
    )
    torch.testing.assert_close(state.loss, la.loss)
    assert state.n_data == la.n_data == 10 and int(state.step) == 3
    with torch.no_grad():
        f = model(x)
    if family == "user":
        rate = nn.functional.softplus(f)
        expected = (rate - y * rate.log() + torch.lgamma(y + 1)).sum()
    elif family == "reward_modeling":
        expected = nn.functional.cross_entropy(f, y, reduction="sum")
    else:
        expected = oracles.loss(family, f, y)
    torch.testing.assert_close(state.loss, expected)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "reward_modeling"])
def test_a_linear_layer_gives_the_kfac_of_the_dense_ggn(device, family):
    """Independent oracle: ``H = sum_n J_n^T Lambda(f_n) J_n`` from ``jacrev``
    Jacobians and the closed-form output Hessian. For ``f = W x + b`` (then the
    natural-parameter head, for heteroscedastic regression) the bias block of ``H``
    is the output side ``G = sum_n J_n^T Lambda_n J_n`` at the layer's output, and
    KFAC's weight block is ``G (x) A``, ``A = sum_n x_n x_n^T / N``; with one datum
    that is ``H``'s weight block itself (KFAC is exact for one datum)."""
    model = _family_model(family, device, hidden=False)
    x, y = _family_data(family, device)
    likelihood = _likelihood(family)
    state = _stream(model, likelihood, _splits(x, y))

    def dense_ggn(x):
        with torch.no_grad():
            f = model(x)
        J = oracles.jacobian(model, x)
        return torch.einsum("ncp,ncd,ndq->pq", J, _output_hessian(family, f), J)

    ggn = dense_ggn(x)
    W = model[0].weight.numel()
    G = ggn[W:, W:].contiguous()
    A = x.T @ x / len(x)
    expected = torch.block_diag(torch.kron(G, A), G)
    eye = torch.eye(len(ggn), dtype=ggn.dtype, device=device)
    torch.testing.assert_close(kron_ggn.precision(state), expected + INIT_PREC * eye)
    assert not torch.allclose(ggn[:W, :W], torch.kron(G, A))  # KFAC approximates

    one = _stream(model, likelihood, [(x[:1], y[:1])])
    ggn = dense_ggn(x[:1])
    expected = torch.block_diag(ggn[:W, :W], ggn[W:, W:])
    torch.testing.assert_close(kron_ggn.precision(one), expected + INIT_PREC * eye)


def test_reward_modeling_gives_the_kfac_expand_of_the_pairs(device):
    """The two items of a pair are the positions of the shared reward layer
    (KFAC-expand): ``G = sum_n sum_t Lambda_n[t, t]`` with the softmax Hessian of
    the pair's two rewards ``Lambda_n``, ``A`` the mean over the ``2 N`` items of
    ``x x^T``; the bias's block is ``G``."""
    model = _family_model("reward_modeling", device, hidden=False)
    x, y = _family_data("reward_modeling", device)
    state = _stream(model, "reward_modeling", _splits(x, y))
    with torch.no_grad():
        f = model(x)  # (N, 2)
    p = torch.softmax(f, -1)
    Lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    G = Lam.diagonal(dim1=1, dim2=2).sum().reshape(1, 1)
    A = torch.einsum("nti,ntj->ij", x, x) / (2 * len(x))
    expected = torch.block_diag(torch.kron(G, A), G)
    eye = torch.eye(4, dtype=torch.float64, device=device)
    torch.testing.assert_close(kron_ggn.precision(state), expected + INIT_PREC * eye)


def test_a_likelihood_objects_state_converts_to_its_kron_laplace(device):
    """``to_laplace`` of a ``kron_ggn`` state takes the likelihood object: the
    ``KronLaplace`` fitted on the same data, evidence included, with the data (a
    streamed state) or without (a state of ``from_laplace``, which has no outputs
    to count: only a Gaussian noise's normalizer needs them)."""
    model = _family_model("user", device)
    x, y = _family_data("user", device)
    lik = SoftplusPoisson()
    state = _stream(model, lik, _splits(x, y))
    la = _fit(model, lik, x, y)
    streamed = convert.to_laplace(state, model, lik, backend=NativeGGN)
    torch.testing.assert_close(
        streamed.posterior_precision.to_matrix(), la.posterior_precision.to_matrix()
    )
    torch.testing.assert_close(
        streamed.log_marginal_likelihood(), la.log_marginal_likelihood()
    )
    back = convert.to_laplace(convert.from_laplace(la), model, lik)
    assert back.likelihood is lik
    torch.testing.assert_close(
        back.log_marginal_likelihood(), la.log_marginal_likelihood()
    )

    reg = _model("mlp", device)
    xr, yr = models.data("mlp", "regression", n=10, device=device)
    state = convert.from_laplace(_fit(reg, "regression", xr, yr))
    with pytest.raises(ValueError, match="needs the number of outputs"):
        convert.to_laplace(state, reg, "regression")


def test_likelihoods_that_are_none_are_refused_up_front(device):
    """An unknown name or an object that is not a likelihood, at ``build`` (before
    any data) and at ``update`` (the state unchanged)."""

    class NoCurvature(OutputLikelihood):
        def loss(self, f, y):
            return f.sum()

    model = _model("mlp", device)
    x, y = models.data("mlp", "regression", n=4, device=device)
    with pytest.raises(ValueError, match="likelihood='gauss' is not valid.*'poisson'"):
        kron_ggn.build(model, "gauss")
    with pytest.raises(TypeError, match="OutputLikelihood object; got function"):
        kron_ggn.build(model, nn.functional.mse_loss)
    with pytest.raises(TypeError, match="NoCurvature must implement .*hessian_sqrt"):
        kron_ggn.build(model, NoCurvature())
    state = kron_ggn.init(_trainable(model), model, INIT_PREC)
    snap = _snapshot(state)
    with pytest.raises(TypeError, match="NoCurvature must implement"):
        kron_ggn.update(state, (x, y), model, NoCurvature(), inplace=True)
    _assert_snapshot(state, snap)
