"""The streaming Laplace approximations (``laplace.streaming``) against dense
oracles in float64: the GGN of ``tests/oracles.py`` (per-example ``torch.func``
Jacobians and the analytic softmax Hessian), summed over batches."""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn
from torch.func import functional_call

from laplace.streaming import (
    dense_fisher,
    dense_ggn,
    dense_hessian,
    diag_fisher,
    diag_ggn,
    ggn,
)
from tests import oracles


def _mlp(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    return model.to(device, torch.float64)


def _data(device, n=9):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64).to(device)
    y = torch.randint(0, 3, (n,), generator=g).to(device)
    return x, y


def _functions(model):
    def forward(params, batch):
        x, _ = batch
        return functional_call(model, params, (x,)), torch.tensor([])

    def outer_log_likelihood(logits, batch):
        _, y = batch
        return -nn.functional.cross_entropy(logits, y, reduction="sum")

    return forward, outer_log_likelihood


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _sorted(ggn, model):
    """The oracle's matrix (parameters in ``named_parameters`` order) with the
    parameters in sorted name order, as a dict's leaves are flattened."""
    names = [k for k, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    starts = torch.tensor([0, *sizes]).cumsum(0).tolist()
    index = {n: torch.arange(a, b) for n, a, b in zip(names, starts, starts[1:])}
    order = torch.cat([index[n] for n in sorted(names)]).to(ggn.device)
    return ggn[order][:, order]


def _batches(x, y):
    return [(x[:3], y[:3]), (x[3:7], y[3:7]), (x[7:], y[7:])]


def test_dense_precision_after_several_updates_is_the_sum_over_all_batches(device):
    model = _mlp(device)
    x, y = _data(device)
    transform = dense_ggn.build(*_functions(model), init_prec=0.5)
    state = transform.init(_params(model))
    for batch in _batches(x, y):
        state = transform.update(state, batch)
    ggn = _sorted(oracles.ggn(model, x, "classification"), model)
    eye = torch.eye(ggn.shape[0], dtype=ggn.dtype, device=device)
    torch.testing.assert_close(state.prec, 0.5 * eye + ggn)
    assert int(state.step) == 3 and state.aux.numel() == 0


def test_diagonal_precision_is_the_dense_ones_diagonal_as_a_tree(device):
    model = _mlp(device)
    x, y = _data(device)
    params = _params(model)
    prior = {k: torch.full_like(v, 0.25) for k, v in params.items()}
    transform = diag_ggn.build(*_functions(model), init_prec_diag=prior)
    state = transform.init(params)
    for batch in _batches(x, y):
        state = transform.update(state, batch)
    expected = 0.25 + oracles.ggn(model, x, "classification").diagonal()
    got = torch.cat([state.prec_diag[k].reshape(-1) for k in params])
    torch.testing.assert_close(got, expected)
    assert {k: v.shape for k, v in state.prec_diag.items()} == {
        k: v.shape for k, v in params.items()
    }


@pytest.mark.parametrize("form", ["list", "tuple", "nested", "tensor"])
def test_any_tree_of_parameters_gives_the_precision_of_the_flat_vector(form, device):
    """A list, a tuple, a nested dict or one flat tensor: the precision is over the
    leaves in tree order, each flattened row-major."""
    model = _mlp(device)
    x, y = _data(device)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]
    names = [k for k, _ in model.named_parameters()]

    def as_dict(params):
        if form == "tensor":
            parts = params.split([s.numel() for s in shapes])
            leaves = [p.reshape(s) for p, s in zip(parts, shapes, strict=True)]
        elif form == "nested":
            leaves = [params["first"]["w"], params["first"]["b"], *params["second"]]
        else:
            leaves = list(params)
        return dict(zip(names, leaves, strict=True))

    leaves = [p.detach().clone() for p in model.parameters()]
    params = {
        "list": leaves,
        "tuple": tuple(leaves),
        "nested": {"first": {"w": leaves[0], "b": leaves[1]}, "second": leaves[2:]},
        "tensor": flat.clone(),
    }[form]
    forward, oll = _functions(model)
    state = dense_ggn.init(params, 0.0)
    state = dense_ggn.update(
        state, (x, y), lambda p, b: forward(as_dict(p), b), oll, inplace=False
    )
    ggn = oracles.ggn(model, x, "classification")
    if form == "nested":  # {"first": {"b", "w"}, ...}: a dict's keys sorted
        perm = torch.cat([torch.arange(12, 16), torch.arange(12), torch.arange(16, 31)])
        ggn = ggn[perm.to(device)][:, perm.to(device)]
    torch.testing.assert_close(state.prec, ggn)


def test_a_dicts_leaves_are_in_sorted_key_order_as_in_posteriors(device):
    """``{"weight": w, "bias": b}`` of ``y = w x + b`` with a unit Gaussian
    likelihood: the GGN is ``sum z z^T`` with ``z = [1, x]`` (the bias first, its
    key sorts first), as posteriors 0.1.3 gives it."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 2, generator=g, dtype=torch.float64).to(device)
    y = torch.randn(6, generator=g, dtype=torch.float64).to(device)
    w = torch.randn(1, 2, dtype=torch.float64, device=device)
    params = {"weight": w, "bias": torch.zeros(1, dtype=torch.float64, device=device)}

    def forward(p, b):
        return b[0] @ p["weight"].T + p["bias"], torch.tensor([])

    def oll(out, b):
        return -0.5 * (out[:, 0] - b[1]).square().sum()

    state = dense_ggn.update(dense_ggn.init(params), (x, y), forward, oll)
    z = torch.cat([torch.ones(6, 1, dtype=x.dtype, device=device), x], 1)
    torch.testing.assert_close(state.prec, z.T @ z)
    draws = dense_ggn.sample(dense_ggn.init(params, 1.0), (3,))
    assert draws["weight"].shape == (3, 1, 2) and draws["bias"].shape == (3, 1)


def test_update_in_place_changes_the_state_and_otherwise_leaves_it(device):
    model = _mlp(device)
    x, y = _data(device)
    forward, oll = _functions(model)
    for module in (dense_ggn, diag_ggn):
        state = module.init(_params(model), 1.0)
        before = state.prec if module is dense_ggn else state.prec_diag["0.weight"]
        before = before.clone()
        new = module.update(state, (x, y), forward, oll)
        after = state.prec if module is dense_ggn else state.prec_diag["0.weight"]
        assert new is not state and torch.equal(after, before) and int(state.step) == 0
        same = module.update(state, (x, y), forward, oll, inplace=True)
        after = state.prec if module is dense_ggn else state.prec_diag["0.weight"]
        assert same is state and not torch.equal(after, before)
        assert int(state.step) == 1


def _regression(device):
    """A linear model ``y = w x + b`` with a unit Gaussian likelihood: its GGN is
    ``sum [x, 1][x, 1]^T`` exactly."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(20, 1, generator=g, dtype=torch.float64).to(device)
    y = 2 * x[:, 0] + 0.5

    def forward(params, batch):
        return batch[0] @ params["w"] + params["b"], torch.tensor([])

    def oll(out, batch):
        return -0.5 * (out - batch[1]).square().sum()

    params = {
        "w": torch.tensor([1.5], dtype=torch.float64, device=device),
        "b": torch.tensor(0.2, dtype=torch.float64, device=device),
    }
    return params, (x, y), forward, oll


def test_samples_have_the_parameters_shapes_and_the_posteriors_moments(device):
    params, batch, forward, oll = _regression(device)
    state = dense_ggn.update(dense_ggn.init(params, 1.0), batch, forward, oll)
    diag = diag_ggn.update(diag_ggn.init(params, 1.0), batch, forward, oll)
    torch.manual_seed(3)
    n = 40_000
    for module, st, cov in (
        (dense_ggn, state, torch.linalg.inv(state.prec)),
        (
            diag_ggn,
            diag,
            torch.diag(1 / torch.stack([diag.prec_diag["w"][0], diag.prec_diag["b"]])),
        ),
    ):
        draws = module.sample(st, (n,))
        assert draws["w"].shape == (n, 1) and draws["b"].shape == (n,)
        assert draws["w"].dtype == torch.float64
        X = torch.stack([draws["w"][:, 0], draws["b"]], -1)
        mean = torch.stack([params["w"][0], params["b"]])
        sd = cov.diagonal().sqrt()
        assert ((X.mean(0) - mean).abs() < 5 * sd / n**0.5).all()
        torch.testing.assert_close(
            X.T.cov(), cov, rtol=0.05, atol=5 * sd.max() ** 2 / n**0.5
        )
    one = dense_ggn.sample(state)
    assert one["w"].shape == (1,) and one["b"].shape == ()


def test_sample_keeps_the_shape_of_a_matrix_parameter(device):
    model = _mlp(device)
    x, y = _data(device)
    state = dense_ggn.update(
        dense_ggn.init(_params(model), 1.0), (x, y), *_functions(model)
    )
    draws = dense_ggn.sample(state, (7, 2))
    assert draws["0.weight"].shape == (7, 2, 4, 3)
    assert draws["2.bias"].shape == (7, 2, 3)


def test_bad_input_is_refused_naming_the_argument(device):
    model = _mlp(device)
    x, y = _data(device)
    forward, oll = _functions(model)
    params = _params(model)
    state = dense_ggn.init(params, 1.0)

    def no_aux(p, b):
        return functional_call(model, p, (b[0],))

    with pytest.raises(
        ValueError,
        match=r"forward must return a pair \(output, aux\), e.g. \(logits.*a Tensor",
    ):
        dense_ggn.update(state, (x, y), no_aux, oll)

    def per_example(logits, batch):
        return -nn.functional.cross_entropy(logits, batch[1], reduction="none")

    with pytest.raises(
        ValueError,
        match=r"outer_log_likelihood must return a scalar .* returned \(9,\)",
    ):
        diag_ggn.update(diag_ggn.init(params, 1.0), (x, y), forward, per_example)
    with pytest.raises(ValueError, match=r"it returned <class 'float'>"):
        diag_ggn.update(diag_ggn.init(params, 1.0), (x, y), forward, lambda f, b: 1.0)
    with pytest.raises(ValueError, match=r"init_prec must be a float or a \(31, 31\)"):
        dense_ggn.init(params, torch.eye(3))
    skewed = torch.eye(31, dtype=torch.float64, device=device)
    skewed[0, 1] = 0.5
    with pytest.raises(ValueError, match=r"init_prec must be a symmetric matrix"):
        dense_ggn.init(params, skewed)
    with pytest.raises(ValueError, match=r"init_prec_diag must be a float or a tree"):
        diag_ggn.init(params, {"0.weight": torch.ones(4, 3)})
    with pytest.raises(
        TypeError, match=r"params must be a tensor or a tree.*type float"
    ):
        dense_ggn.init({"w": 3.0})
    with pytest.raises(TypeError, match=r"leaves of type nothing"):
        dense_ggn.init({})
    reshaped = {k: v.reshape(-1) for k, v in params.items()}
    with pytest.raises(ValueError, match=r"init_prec_diag must be a float or a tree"):
        diag_ggn.init(params, reshaped)


def _gaussian_linear(device, n=4):
    """``y = w x + b`` with a unit Gaussian likelihood: example ``n``'s gradient of
    the log posterior is ``r_n z_n`` with ``z_n = [1, x_n]`` (the bias first)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64).to(device)
    y = torch.randn(n, generator=g, dtype=torch.float64).to(device)
    params = {
        "weight": torch.randn(1, 2, generator=g, dtype=torch.float64).to(device),
        "bias": torch.randn(1, generator=g, dtype=torch.float64).to(device),
    }
    out = x @ params["weight"][0] + params["bias"]
    z = torch.cat([torch.ones(n, 1, dtype=x.dtype, device=device), x], 1)
    G = (y - out)[:, None] * z
    return params, (x, y), G


def _log_posteriors():
    def per_example(p, batch):
        x, y = batch
        return -0.5 * (x @ p["weight"][0] + p["bias"] - y).square(), torch.tensor([])

    def total(p, batch):
        v, a = per_example(p, batch)
        return v.sum(), a

    def mean(p, batch):
        v, a = per_example(p, batch)
        return v.mean(), a

    return {"per-example": per_example, "sum": total, "mean": mean}


@pytest.mark.parametrize("value", ["per-example", "sum", "mean"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_fisher_follows_posteriors_per_sample_semantics(value, per_sample, device):
    """per_sample=False: the batch split into examples, ``sum g_n g_n^T`` whatever
    the log posterior returns; True: its value taken per example (a sum gives the
    rank-one ``(sum g)(sum g)^T``, a mean that over ``N^2``), as posteriors 0.1.3."""
    params, batch, G = _gaussian_linear(device)
    log_posterior = _log_posteriors()[value]
    empirical = G.T @ G
    if per_sample and value != "per-example":
        total = G.sum(0)
        empirical = torch.outer(total, total) / (16 if value == "mean" else 1)
    transform = dense_fisher.build(log_posterior, per_sample=per_sample, init_prec=0.5)
    state = transform.update(transform.init(params), batch)
    eye = torch.eye(3, dtype=G.dtype, device=device)
    torch.testing.assert_close(state.prec, 0.5 * eye + empirical)
    diag = diag_fisher.update(
        diag_fisher.init(params, 0.5), batch, log_posterior, per_sample
    )
    got = torch.cat([diag.prec_diag["bias"], diag.prec_diag["weight"].reshape(-1)])
    torch.testing.assert_close(got, 0.5 + empirical.diagonal())
    assert int(state.step) == 1 and int(diag.step) == 1


def test_fisher_refuses_a_log_posterior_without_aux(device):
    params, batch, _ = _gaussian_linear(device)

    def no_aux(p, b):
        return _log_posteriors()["sum"](p, b)[0]

    for per_sample in (False, True):
        with pytest.raises(ValueError, match=r"log_posterior must return a pair"):
            dense_fisher.update(dense_fisher.init(params), batch, no_aux, per_sample)


def _nonquadratic(device):
    g = torch.Generator().manual_seed(6)
    params = {
        "b": torch.randn(2, generator=g, dtype=torch.float64).to(device),
        "a": torch.randn(1, generator=g, dtype=torch.float64).to(device),
    }
    x = torch.randn(5, 3, generator=g, dtype=torch.float64).to(device)

    def per_example(p, batch):
        v = torch.cat([p["a"], p["b"]])  # sorted keys: a, then b
        return -(torch.tanh(batch @ v) ** 2 + 0.1 * (v**4).sum()), torch.tensor([])

    def log_posterior(p, batch):
        values, aux = per_example(p, batch)
        return values.sum(), aux

    def oracle(v):  # the same function of the flat vector [a, b]
        return log_posterior({"a": v[:1], "b": v[1:]}, x)[0]

    flat = torch.cat([params["a"], params["b"]])
    return params, x, log_posterior, per_example, torch.func.hessian(oracle)(flat)


@pytest.mark.parametrize("epsilon, rescale", [(0.0, 1.0), (0.3, 2.0)])
def test_hessian_precision_is_the_rescaled_negative_hessian_plus_epsilon(
    epsilon, rescale, device
):
    """``-rescale * H + epsilon * I`` per update (posteriors 0.1.3's, observed on
    this log posterior), the Hessian of the oracle's own flat function."""
    params, x, log_posterior, _, H = _nonquadratic(device)
    transform = dense_hessian.build(log_posterior, 0.5, epsilon, rescale)
    state = transform.init(params)
    for _ in range(2):
        state = transform.update(state, x)
    eye = torch.eye(3, dtype=H.dtype, device=device)
    torch.testing.assert_close(
        state.prec, 0.5 * eye + 2 * (-rescale * H + epsilon * eye)
    )
    assert int(state.step) == 2


def test_hessian_refuses_a_value_that_is_not_a_scalar(device):
    params, x, _, per_example, _ = _nonquadratic(device)
    with pytest.raises(ValueError, match=r"must return a scalar value.*shape \(5,\)"):
        dense_hessian.update(dense_hessian.init(params), x, per_example)


# -- the two ways of the GGN (laplace.streaming.ggn) --------------------------------
def _flat_oracle(forward, outer_log_likelihood, params, batch):
    """``J^T H J`` of the whole batch from ``torch.func``: the Jacobian of the
    batched output w.r.t. the flat parameters (dict leaves in sorted order) and
    the Hessian of the batched negative log-likelihood w.r.t. that output."""
    names = sorted(params)
    shapes = [params[n].shape for n in names]
    theta = torch.cat([params[n].reshape(-1) for n in names])

    def output(vector):
        parts = vector.split([s.numel() for s in shapes])
        tree = {n: p.reshape(s) for n, p, s in zip(names, parts, shapes, strict=True)}
        return forward(tree, batch)[0]

    z = output(theta).detach()
    J = torch.func.jacrev(output)(theta).reshape(z.numel(), -1)
    H = torch.func.hessian(lambda o: -outer_log_likelihood(o, batch))(z)
    return J.T @ H.reshape(z.numel(), z.numel()) @ J


def _spy(monkeypatch, name):
    calls = []
    original = getattr(ggn, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(ggn, name, spy)
    return calls


@pytest.mark.parametrize("chunk_entries", [None, 31 * 2 * 2])
def test_independent_examples_take_the_per_example_way_in_chunks(
    chunk_entries, device, monkeypatch
):
    """An MLP with a summed cross-entropy: one Jacobian per example (no Jacobian
    of the whole batch), in chunks of two examples when ``chunk_entries`` says
    so; the GGN equals the whole batch's."""
    model = _mlp(device)
    x, y = _data(device)
    forward, oll = _functions(model)
    per_example = _spy(monkeypatch, "_per_example")
    whole = _spy(monkeypatch, "_whole_batch")
    aux, pieces = ggn.terms(forward, oll, _params(model), (x, y), chunk_entries)
    pieces = list(pieces)
    total = sum(J.T @ HJ for J, HJ in pieces)
    torch.testing.assert_close(
        total, _flat_oracle(forward, oll, _params(model), (x, y))
    )
    assert per_example and not whole
    assert all(A is B for A, B in pieces)  # S_n = L_n^T J_n, H_n = L_n L_n^T
    assert len(pieces) == (1 if chunk_entries is None else 5)  # 9 examples, 2 a chunk
    assert aux.numel() == 0


def _coupled_cases(device):
    """Forward/log-likelihood pairs whose examples are not independent, each with
    the reason: the whole-batch way must be taken, and be exact."""
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Linear(3, 4),
        nn.BatchNorm1d(4, track_running_stats=False),
        nn.Tanh(),
        nn.Linear(4, 3),
    )
    model = model.to(device, torch.float64).train()
    mlp = _mlp(device)
    forward, oll = _functions(mlp)
    bn_forward, _ = _functions(model)

    def mean_oll(logits, batch):  # H is the per-example blocks over N
        return -nn.functional.cross_entropy(logits, batch[1])

    def coupled_oll(logits, batch):  # H couples every pair of examples
        return oll(logits, batch) - logits.sum().square()

    def scalar_in_batch(params, batch):
        x, _, scale = batch
        return functional_call(mlp, params, (scale * x,)), torch.tensor([])

    def with_scale(logits, batch):
        return oll(logits, batch[:2])

    x, y = _data(device)
    scale = torch.tensor(2.0, dtype=torch.float64, device=device)
    return {
        "batch statistics": (bn_forward, oll, _params(model), (x, y)),
        "mean over the batch": (forward, mean_oll, _params(mlp), (x, y)),
        "log-likelihood coupling examples": (
            forward,
            coupled_oll,
            _params(mlp),
            (x, y),
        ),
        "a batch leaf without examples": (
            scalar_in_batch,
            with_scale,
            _params(mlp),
            (x, y, scale),
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "batch statistics",
        "mean over the batch",
        "log-likelihood coupling examples",
        "a batch leaf without examples",
    ],
)
def test_coupled_examples_take_the_exact_whole_batch_way(case, device, monkeypatch):
    forward, oll, params, batch = _coupled_cases(device)[case]
    per_example = _spy(monkeypatch, "_per_example")
    state = dense_ggn.update(dense_ggn.init(params), batch, forward, oll)
    torch.testing.assert_close(state.prec, _flat_oracle(forward, oll, params, batch))
    assert not per_example
    diag = diag_ggn.update(diag_ggn.init(params), batch, forward, oll)
    flat = torch.cat([diag.prec_diag[n].reshape(-1) for n in sorted(params)])
    torch.testing.assert_close(flat, state.prec.diagonal())


def test_a_forward_vmap_cannot_run_takes_the_whole_batch_way(device, monkeypatch):
    """A forward with a data-dependent Python branch (``.item()``) cannot run under
    ``vmap``: the whole-batch way, exact."""
    model = _mlp(device)
    x, y = _data(device)
    forward, oll = _functions(model)

    def branching(params, batch):
        out, aux = forward(params, batch)
        return (out if out.sum().item() > -1e9 else -out), aux

    per_example = _spy(monkeypatch, "_per_example")
    state = dense_ggn.update(dense_ggn.init(_params(model)), (x, y), branching, oll)
    torch.testing.assert_close(
        state.prec, _flat_oracle(forward, oll, _params(model), (x, y))
    )
    assert not per_example


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_parameters_keep_a_float32_precision(dtype, device):
    """The precision of 16-bit parameters is kept in float32, close to the float64
    GGN at the rounded parameters (to the 16-bit forward's accuracy); samples come
    back in the parameters' dtype."""
    if dtype == torch.float16 and device.type == "cpu":
        pytest.skip("float16 matmuls are a GPU dtype")
    model = _mlp(device)
    x, y = _data(device)
    low = {k: v.to(dtype) for k, v in _params(model).items()}
    rounded = {k: v.to(torch.float64) for k, v in low.items()}
    forward, oll = _functions(model)

    def forward_low(params, batch):
        return forward(params, (batch[0].to(dtype), batch[1]))

    state = dense_ggn.update(dense_ggn.init(low, 1.0), (x, y), forward_low, oll)
    diag = diag_ggn.update(diag_ggn.init(low, 1.0), (x, y), forward_low, oll)
    assert state.prec.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in diag.prec_diag.values())
    exact = _flat_oracle(forward, oll, rounded, (x, y)) + torch.eye(31, device=device)
    torch.testing.assert_close(state.prec.double(), exact, rtol=0.05, atol=0.05)
    flat = torch.cat([diag.prec_diag[n].reshape(-1) for n in sorted(low)])
    torch.testing.assert_close(flat, state.prec.diagonal())
    for draw in (dense_ggn.sample(state, (3,)), diag_ggn.sample(diag, (3,))):
        assert all(v.dtype == dtype for v in draw.values())
        assert draw["0.weight"].shape == (3, 4, 3)


def test_a_gram_matrix_is_added_in_blocks_below_the_diagonal_then_mirrored(device):
    g = torch.Generator().manual_seed(4)
    S = torch.randn(6, 23, generator=g, dtype=torch.float64).to(device)
    start = torch.randn(23, 23, generator=g, dtype=torch.float64).to(device)
    start = start + start.T
    prec = start.clone()
    dense_ggn.add_lower_gram(prec, S, block=7)
    dense_ggn.mirror_lower(prec, block=7)
    torch.testing.assert_close(prec, start + S.T @ S)


def test_the_per_example_way_in_gram_blocks_equals_the_whole_batch(device, monkeypatch):
    """The precision of a model with more parameters than one Gram block (31 > 8)."""
    model = _mlp(device)
    x, y = _data(device)
    forward, oll = _functions(model)
    monkeypatch.setattr(dense_ggn, "GRAM_BLOCK", 8)
    gram = _spy(monkeypatch, "_square_roots")
    state = dense_ggn.update(dense_ggn.init(_params(model)), (x, y), forward, oll)
    torch.testing.assert_close(
        state.prec, _flat_oracle(forward, oll, _params(model), (x, y))
    )
    assert gram


def test_an_indefinite_output_hessian_takes_the_per_example_product(
    device, monkeypatch
):
    """``-l`` concave in some outputs (``H_n`` indefinite): no square root, the
    per-example ``J_n^T (H_n J_n)``, still the GGN."""
    model = _mlp(device)
    x, y = _data(device)
    forward, oll = _functions(model)

    def indefinite(logits, batch):
        return oll(logits, batch) + logits[:, 0].square().sum()

    per_example = _spy(monkeypatch, "_per_example")
    pieces = list(ggn.terms(forward, indefinite, _params(model), (x, y))[1])
    assert per_example and all(A is not B for A, B in pieces)
    state = dense_ggn.update(
        dense_ggn.init(_params(model)), (x, y), forward, indefinite
    )
    oracle = _flat_oracle(forward, indefinite, _params(model), (x, y))
    torch.testing.assert_close(state.prec, oracle)


# -- defaults, aux, tree order, chunks and edge cases ------------------------------
def test_the_default_initial_precision_is_zero(device):
    model = _mlp(device)
    params = _params(model)
    assert not dense_ggn.build(*_functions(model)).init(params).prec.any()
    prec = diag_ggn.build(*_functions(model)).init(params).prec_diag
    assert not any(v.any() for v in prec.values())


@pytest.mark.parametrize("module", [dense_ggn, diag_ggn])
@pytest.mark.parametrize("inplace", [False, True])
def test_the_state_keeps_the_aux_of_the_last_forward(module, inplace, device):
    model = _mlp(device)
    x, y = _data(device)
    forward, oll = _functions(model)

    def with_aux(params, batch):
        out, _ = forward(params, batch)
        return out, {"logits": out.detach(), "n": batch[0].shape[0]}

    state = module.init(_params(model), 1.0)
    for batch in _batches(x, y):
        state = module.update(state, batch, with_aux, oll, inplace=inplace)
    assert state.aux["n"] == 2
    torch.testing.assert_close(
        state.aux["logits"], forward(_params(model), (x[7:], y[7:]))[0]
    )


@pytest.mark.parametrize("per_sample", [False, True])
def test_the_fisher_state_keeps_the_log_posteriors_aux(per_sample, device):
    """The aux as posteriors gives it: stacked over the examples for
    ``per_sample=False`` (each a batch of one), the batch's for True."""
    params, batch, _ = _gaussian_linear(device)

    def log_posterior(p, data):
        x, y = data
        r = x @ p["weight"][0] + p["bias"] - y
        return -0.5 * r.square(), {"r": r.detach()}

    state = dense_fisher.update(
        dense_fisher.init(params), batch, log_posterior, per_sample
    )
    x, y = batch
    r = x @ params["weight"][0] + params["bias"] - y
    torch.testing.assert_close(state.aux["r"], r[:, None] if not per_sample else r)


def _unsorted_tree(device):
    g = torch.Generator().manual_seed(6)
    Pair = collections.namedtuple("Pair", ["w", "b"])

    def t(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(device)

    return {"z": t(2), "a": [Pair(t(2, 2), t(1)), {"y": t(3), "c": t()}]}


def _tree_forward(params, batch):
    """A scalar-output model reading every leaf of ``_unsorted_tree``."""
    x = batch[0]
    pair, inner = params["a"]
    h = torch.tanh(x @ pair.w + pair.b + params["z"])
    out = (h * inner["y"][:2]).sum(-1) + inner["c"] + inner["y"][2]
    return out, torch.tensor([])


def _gaussian_oll(out, batch):
    return -0.5 * (out - batch[1]).square().sum()


@pytest.mark.parametrize("module", [dense_ggn, diag_ggn])
def test_trees_keep_the_parameters_key_order_and_containers(module, device):
    """``prec_diag`` and samples keep every dict's key order (not sorted), lists,
    namedtuples and 0-d leaves of the parameters."""
    params = _unsorted_tree(device)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 2, generator=g, dtype=torch.float64).to(device)
    y = torch.randn(6, generator=g, dtype=torch.float64).to(device)
    state = module.update(
        module.init(params, 1.0), (x, y), _tree_forward, _gaussian_oll
    )
    trees = [module.sample(state), module.sample(state, (3,))]
    if module is diag_ggn:
        trees += [state.prec_diag, module.init(params, 1.0).prec_diag]
    for tree in trees:
        assert list(tree) == ["z", "a"] and list(tree["a"][1]) == ["y", "c"]
        assert type(tree["a"][0]).__name__ == "Pair" and isinstance(tree["a"], list)
    assert trees[0]["a"][1]["c"].shape == () and trees[1]["a"][1]["c"].shape == (3,)


def test_a_dict_with_keys_that_do_not_sort_keeps_their_order(device):
    g = torch.Generator().manual_seed(8)
    params = {
        2: torch.randn(2, generator=g, dtype=torch.float64),
        "w": torch.randn(2, generator=g, dtype=torch.float64),
    }
    x = torch.randn(5, 2, generator=g, dtype=torch.float64)

    def forward(p, batch):
        return batch[0] @ p["w"] + batch[0] @ p[2], torch.tensor([])

    state = dense_ggn.update(
        dense_ggn.init(params),
        (x, torch.zeros(5, dtype=x.dtype)),
        forward,
        _gaussian_oll,
    )
    z = torch.cat([x, x], 1)  # the Jacobian, leaves in insertion order
    torch.testing.assert_close(state.prec, z.T @ z)


def test_chunks_of_one_example_and_a_batch_of_one(device, monkeypatch):
    model = _mlp(device)
    x, y = _data(device)
    forward, oll = _functions(model)
    per_example = _spy(monkeypatch, "_per_example")
    pieces = list(ggn.terms(forward, oll, _params(model), (x, y), 31 * 3)[1])
    assert len(pieces) == 9
    oracle = _flat_oracle(forward, oll, _params(model), (x, y))
    torch.testing.assert_close(sum(A.T @ B for A, B in pieces), oracle)
    one = (x[:1], y[:1])
    state = dense_ggn.update(dense_ggn.init(_params(model)), one, forward, oll)
    torch.testing.assert_close(
        state.prec, _flat_oracle(forward, oll, _params(model), one)
    )
    assert len(per_example) == 2


def test_a_1d_output_and_a_large_loss_take_the_per_example_way(device, monkeypatch):
    """A regression output ``(N,)`` (a scalar per example) over a nested tree, and
    a cross-entropy scaled by ``1e6``: independent examples, whatever the
    output's rank and the loss's scale."""
    params = _unsorted_tree(device)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(7, 2, generator=g, dtype=torch.float64).to(device)
    y = torch.randn(7, generator=g, dtype=torch.float64).to(device)
    whole = _spy(monkeypatch, "_whole_batch")
    state = dense_ggn.update(
        dense_ggn.init(params), (x, y), _tree_forward, _gaussian_oll
    )
    torch.testing.assert_close(state.prec, _tree_oracle(params, (x, y), _gaussian_oll))
    model = _mlp(device)
    data = _data(device)
    forward, oll = _functions(model)

    def large(logits, batch):
        return 1e6 * oll(logits, batch)

    state = dense_ggn.update(dense_ggn.init(_params(model)), data, forward, large)
    oracle = _flat_oracle(forward, large, _params(model), data)
    torch.testing.assert_close(state.prec, oracle, rtol=1e-6, atol=1e-3)
    assert not whole


def test_a_forward_that_drops_a_batch_of_ones_dimension_takes_the_whole_batch_way(
    device, monkeypatch
):
    """``out.squeeze()`` gives ``(C,)`` for an example alone, not its row ``(1,
    C)``: the examples are not run alone, the whole batch is, exactly."""
    model = _mlp(device)
    x, y = _data(device)
    forward, oll = _functions(model)

    def squeezing(params, batch):
        out, aux = forward(params, batch)
        return out.squeeze(), aux

    per_example = _spy(monkeypatch, "_per_example")
    state = dense_ggn.update(dense_ggn.init(_params(model)), (x, y), squeezing, oll)
    oracle = _flat_oracle(forward, oll, _params(model), (x, y))
    torch.testing.assert_close(state.prec, oracle)
    assert not per_example


def test_an_ordered_dicts_leaves_keep_their_insertion_order(device):
    """An ``OrderedDict`` is flattened in insertion order (a dict by sorted key)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(5, 2, generator=g, dtype=torch.float64).to(device)
    w, v = (torch.randn(2, generator=g, dtype=torch.float64).to(device) for _ in "wv")

    def forward(p, batch):
        return batch[0] @ p["w"] + 2 * batch[0] @ p["v"], torch.tensor([])

    y = torch.zeros(5, dtype=x.dtype, device=device)
    ordered = collections.OrderedDict([("w", w), ("v", v)])
    state = dense_ggn.update(dense_ggn.init(ordered), (x, y), forward, _gaussian_oll)
    z = torch.cat([x, 2 * x], 1)  # w's columns first
    torch.testing.assert_close(state.prec, z.T @ z)
    plain = dense_ggn.update(
        dense_ggn.init(dict(ordered)), (x, y), forward, _gaussian_oll
    )
    z = torch.cat([2 * x, x], 1)  # sorted: v first
    torch.testing.assert_close(plain.prec, z.T @ z)


def test_a_nearly_symmetric_initial_precision_is_taken_and_a_skewed_one_refused(
    device,
):
    """Asymmetry at rounding level (1e-12 of a matrix of norm 1e3) is taken; a
    skew of 0.1 between two non-zero entries is refused, and reported."""
    params = torch.zeros(3, dtype=torch.float64, device=device)
    prec = 1e3 * torch.eye(3, dtype=torch.float64, device=device)
    prec[0, 1], prec[1, 0] = 1.0, 1.0 + 1e-9
    torch.testing.assert_close(dense_ggn.init(params, prec).prec, prec)
    skewed = torch.eye(3, dtype=torch.float64, device=device)
    skewed[0, 1], skewed[1, 0] = 0.5, 0.4
    with pytest.raises(ValueError, match=r"largest asymmetry is 0.1\."):
        dense_ggn.init(params, skewed)


#: the leaves of ``_unsorted_tree`` in posteriors' order (dicts by sorted key)
SORTED_PATHS = (("a", 0, 0), ("a", 0, 1), ("a", 1, "c"), ("a", 1, "y"), ("z",))


def _at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _tree_oracle(params, batch, oll):
    """``J^T H J`` over ``_unsorted_tree``'s leaves in ``SORTED_PATHS`` order."""
    shapes = [_at(params, p).shape for p in SORTED_PATHS]
    theta = torch.cat([_at(params, p).reshape(-1) for p in SORTED_PATHS])
    Pair = type(params["a"][0])

    def output(vector):
        parts = vector.split([s.numel() for s in shapes])
        w, b, c, y, z = (p.reshape(s) for p, s in zip(parts, shapes, strict=True))
        tree = {"z": z, "a": [Pair(w, b), {"y": y, "c": c}]}
        return _tree_forward(tree, batch)[0]

    z = output(theta).detach()
    J = torch.func.jacrev(output)(theta).reshape(z.numel(), -1)
    H = torch.func.hessian(lambda o: -oll(o, batch))(z).reshape(z.numel(), z.numel())
    return J.T @ H @ J


def test_float32_models_take_the_per_example_way(device, monkeypatch):
    """Batched and per-example outputs differ by rounding in float32: still
    independent examples."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 10)).to(device)
    x = torch.randn(64, 20, device=device)
    y = torch.randint(0, 10, (64,), device=device)
    forward, oll = _functions(model)
    whole = _spy(monkeypatch, "_whole_batch")
    params = _params(model)
    state = diag_ggn.update(diag_ggn.init(params), (x, y), forward, oll)
    assert not whole
    exact = _flat_oracle(
        forward, oll, {k: v.double() for k, v in params.items()}, (x.double(), y)
    ).diagonal()
    flat = torch.cat([state.prec_diag[n].reshape(-1) for n in sorted(params)])
    torch.testing.assert_close(flat.double(), exact, rtol=1e-4, atol=1e-6)


def test_16_bit_outputs_through_the_whole_batch_way_use_float32(device):
    """A bfloat16 model whose log-likelihood couples the examples: ``H`` and the
    products in float32, close to the float64 GGN at the rounded parameters."""
    model = _mlp(device)
    x, y = _data(device)
    forward, oll = _functions(model)
    low = {k: v.to(torch.bfloat16) for k, v in _params(model).items()}

    def forward_low(params, batch):
        return forward(params, (batch[0].to(torch.bfloat16), batch[1]))

    def coupled(logits, batch):
        return oll(logits, batch) - 0.1 * logits.sum().square()

    state = dense_ggn.update(dense_ggn.init(low), (x, y), forward_low, coupled)
    rounded = {k: v.double() for k, v in low.items()}
    exact = _flat_oracle(forward, coupled, rounded, (x, y))
    torch.testing.assert_close(state.prec.double(), exact, rtol=0.05, atol=0.1)


def test_pieces_of_matrices_rows_and_grams_add_up_in_the_precisions_dtype(
    device, monkeypatch
):
    """A matrix, a pair ``(A, B)`` and a Gram ``(S, S)`` (in blocks of two rows),
    float64 pieces into a float32 precision."""
    monkeypatch.setattr(dense_ggn, "GRAM_BLOCK", 2)
    g = torch.Generator().manual_seed(10)
    state = dense_ggn.init(torch.zeros(5, dtype=torch.float32, device=device), 1.0)
    M, A, S = (
        torch.randn(n, 5, generator=g, dtype=torch.float64).to(device)
        for n in (5, 3, 3)
    )
    pieces = [M + M.T, (A, A.clone()), (S, S)]
    new = dense_ggn.add_to_precision(state, pieces, "aux", False)
    expected = torch.eye(5, device=device) + M + M.T + A.T @ A + S.T @ S
    assert new.prec.dtype == torch.float32 and new.aux == "aux"
    torch.testing.assert_close(new.prec, expected.float())
    assert not state.prec.any() or torch.equal(state.prec, torch.eye(5, device=device))
