"""Memory plans (``laplace.utils.memory``): the terms that are exact byte counts equal
the sizes of what the library allocates, the checks raise before any batch is
processed with a message naming the estimate, its dominant term and alternatives
that fit, they can be turned off or given a limit, ``memory_plan`` prints a row
per approximation, and planning leaves the model as it found it."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace, marglik_training
from laplace.utils import (
    MemoryPlanError,
    available_memory,
    memory,
    memory_limit,
    memory_plan,
)

N, D_IN, WIDTH, C, B = 24, 5, 7, 3, 8


def mlp(device, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(D_IN, WIDTH), nn.Tanh(), nn.Linear(WIDTH, C)
    )  # fmt: skip
    return model.to(device, dtype)


def data(device, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, D_IN, generator=g).to(device, dtype)
    y = torch.randint(0, C, (N,), generator=g).to(device)
    return X, y


class CountingLoader(DataLoader):
    """A DataLoader that counts the batches it has yielded."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.yielded = 0

    def __iter__(self):
        for batch in super().__iter__():
            self.yielded += 1
            yield batch


def loader_of(X, y, counting=False) -> DataLoader:
    cls = CountingLoader if counting else DataLoader
    return cls(TensorDataset(X, y), batch_size=B)


def problem(la, X, batch=B):
    x1, n = memory._one_example(X[:batch], la)
    return memory.problem_of(la, x1, n, len(X))


def term(est: memory.Estimate, name: str) -> memory.Term:
    (found,) = [t for t in est.terms if t.name == name]
    return found


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# -- exact terms -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_full_curvature_term_is_the_fitted_curvature(device, dtype):
    X, y = data(device, dtype)
    la = Laplace(mlp(device, dtype), "classification", "all", "full")
    est = memory.estimate("fit", "all", "full", problem(la, X))
    la.fit(loader_of(X, y))
    P = n_params(la.model)
    curvature = term(est, "curvature")
    # 16-bit models accumulate the curvature in float32
    assert curvature.nbytes == P * P * la.H.element_size() == la.H.nbytes
    assert la.H.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
    # the per-example vectors (K, B, P): classification's K = C - 1 columns
    vectors = term(est, "per-example vectors")
    assert vectors.nbytes == (C - 1) * B * P * dtype.itemsize


def test_kron_factor_term_is_the_fitted_factors(device):
    X, y = data(device)
    la = Laplace(mlp(device), "classification", "all", "kron")
    pb = problem(la, X)
    fitted = memory._kron_factor_bytes(pb.blocks, pb.work_itemsize)[0]
    la.fit(loader_of(X, y))
    actual = sum(F.nbytes for block in la.H.kfacs for F in block)
    assert fitted == actual
    # (out^2 + in^2) per weight and out^2 per bias, float64
    expected = sum((o * o + i * i + o * o) * 8 for o, i in ((WIDTH, D_IN), (C, WIDTH)))
    assert fitted == expected


def test_diag_and_lowrank_terms_are_exact(device):
    X, y = data(device)
    la = Laplace(mlp(device), "classification", "all", "diag")
    est = memory.estimate("fit", "all", "diag", problem(la, X))
    la.fit(loader_of(X, y))
    assert term(est, "curvature diagonal").nbytes == la.H.nbytes
    P = n_params(la.model)
    st = memory.Settings(rank=4, eig_iterations=3)
    basis = term(
        memory.estimate("fit", "all", "lowrank", problem(la, X), st), "Lanczos basis"
    )
    assert basis.nbytes == 2 * P * min(P, (4 + 10) * 3) * 8


def test_jacobian_term_is_the_predictives_jacobians(device):
    X, y = data(device)
    la = Laplace(mlp(device), "classification", "all", "full")
    la.fit(loader_of(X, y))
    est = memory.estimate("glm predictive", "all", "full", problem(la, X))
    J, _ = la._jacobians(X[:B])
    assert term(est, "Jacobians").nbytes == J.nbytes  # (B, C, P)
    built = memory.Settings(posterior_built=True)
    cached = memory.estimate("glm predictive", "all", "full", problem(la, X), built)
    assert not [t for t in cached.terms if t.name == "posterior precision"]


def test_profile_counts_the_graph_and_the_engines_records(device):
    """One example through Linear(5, 7), Tanh, Linear(7, 3) in float64: autograd
    saves the input (5) and tanh's output (7); the engine taps both linear outputs
    (7 + 3), which the graph does not hold, and keeps both inputs (5 + 7)."""
    model = mlp(device)
    x1 = torch.randn(1, D_IN, dtype=torch.float64, device=device)
    pr = memory.profile(model, x1)
    assert pr.graph == (D_IN + WIDTH) * 8
    assert pr.taps == pr.kept == (WIDTH + C) * 8
    assert pr.inputs == (D_IN + WIDTH) * 8
    assert pr.outputs == C and pr.last_layer == (C, WIDTH, True)
    assert pr.explicit == WIDTH + C  # the biases
    assert memory.profile(model, x1) is pr  # cached


def test_planning_leaves_the_model_as_found(device):
    model = mlp(device)
    model[0].train()
    model[2].eval()
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    X, y = data(device)
    with memory_limit("1kB"):
        la = Laplace(model, "classification", "all", "full")
        with pytest.raises(MemoryPlanError):
            la.fit(loader_of(X, y))
    memory_plan(model, "classification", X[:B], verbose=False)
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
        assert not m._backward_hooks
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)


# -- the checks ----------------------------------------------------------------------
@pytest.mark.parametrize("structure", ["full", "kron", "diag", "lowrank"])
def test_fit_raises_before_any_batch(device, structure):
    X, y = data(device)
    loader = loader_of(X, y, counting=True)
    la = Laplace(mlp(device), "classification", "all", structure)
    with memory_limit(100), pytest.raises(MemoryPlanError) as info:
        la.fit(loader)
    assert loader.yielded == 0
    assert not la.fitted
    assert info.value.estimate.operation == "fit"
    assert info.value.estimate.nbytes > 100 == info.value.available.nbytes


def test_gp_fit_raises_before_any_batch(device):
    X, y = data(device)
    loader = loader_of(X, y, counting=True)
    la = Laplace(mlp(device), "classification", "all", "gp", n_subset=N)
    with memory_limit(100), pytest.raises(MemoryPlanError):
        la.fit(loader)
    assert loader.yielded == 0


def test_message_names_estimate_dominant_term_and_alternatives_that_fit(device):
    X, y = data(device)
    la = Laplace(mlp(device), "classification", "all", "full")
    pb = problem(la, X)
    full = memory.estimate("fit", "all", "full", pb)
    kron = memory.estimate("fit", "all", "kron", pb)
    assert kron.nbytes < full.nbytes
    limit = (kron.nbytes + full.nbytes) // 2
    with memory_limit(limit), pytest.raises(MemoryPlanError) as info:
        la.fit(loader_of(X, y))
    err = info.value
    text = str(err)
    assert memory.format_bytes(full.nbytes) in text
    assert f"Dominant term: {full.dominant}" in text
    assert full.dominant.name == "curvature"
    assert "memory_limit()" in text  # where the available figure comes from
    assert "hessian_structure='kron'" in text
    assert "subset_of_weights='all', hessian_structure='full'" not in text
    assert err.alternatives and all(e.nbytes <= limit for _, e in err.alternatives)
    for label, _ in err.alternatives:
        assert label in text
    # the subnetwork offered is the largest that fits
    (S,) = [
        int(label.split("at most ")[1].split(" ")[0].replace(",", ""))
        for label, _ in err.alternatives
        if "subnetwork" in label
    ]

    def sub(n):
        st = memory.Settings(subnet_size=n)
        return memory.estimate("fit", "subnetwork", "full", pb, st).nbytes

    assert sub(S) <= limit < sub(S + 1)


def test_smaller_batch_offered_when_the_batch_dominates(device):
    X, y = data(device)
    la = Laplace(mlp(device), "classification", "all", "diag")
    pb = problem(la, X)
    at = {
        b: memory.estimate("fit", "all", "diag", memory.replace(pb, batch=b))
        for b in (2, 3, B)
    }
    limit = at[2].nbytes
    assert at[3].nbytes > limit
    with memory_limit(limit), pytest.raises(MemoryPlanError) as info:
        la.fit(loader_of(X, y))
    assert f"a batch size of 2 (now {B})" in str(info.value)


def test_predictive_gridsearch_and_marglik_training_raise_before_work(device):
    X, y = data(device)
    la = Laplace(mlp(device), "classification", "all", "full")
    la.fit(loader_of(X, y))
    with memory_limit(100):
        for pred_type in ("glm", "nn"):
            with pytest.raises(MemoryPlanError) as info:
                la(X[:B], pred_type=pred_type, link_approx="mc")
            assert info.value.estimate.operation == f"{pred_type} predictive"
        val = loader_of(X, y, counting=True)
        prior = la.prior_precision.clone()
        with pytest.raises(MemoryPlanError) as info:
            la.optimize_prior_precision(method="gridsearch", val_loader=val)
        assert info.value.estimate.operation == "gridsearch"
        assert val.yielded == 0
        torch.testing.assert_close(la.prior_precision, prior)
        model = mlp(device)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        train = loader_of(X, y, counting=True)
        with pytest.raises(MemoryPlanError) as info:
            marglik_training(model, train, hessian_structure="kron", n_epochs=1)
        assert info.value.estimate.operation == "marglik_training"
        assert train.yielded == 0
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, state[k], rtol=0, atol=0)


def test_gridsearch_keeps_the_terms_of_all_validation_data(device):
    X, y = data(device)
    la = Laplace(mlp(device), "classification", "all", "full")
    pb = problem(la, X)
    one = memory.estimate("glm predictive", "all", "full", pb)
    st = memory.Settings(n_val=N)
    grid = memory.estimate("gridsearch", "all", "full", pb, st)
    kept = term(grid, "Jacobians of the other validation batches")
    J = term(one, "Jacobians").nbytes
    assert kept.nbytes == J * (math.ceil(N / B) - 1)
    assert grid.nbytes == one.nbytes + kept.nbytes


# -- limits ----------------------------------------------------------------------------
def test_checks_can_be_turned_off(device, monkeypatch):
    X, y = data(device)
    with memory_limit(100):
        with memory_limit("off"):
            Laplace(mlp(device), "classification", "all", "full").fit(loader_of(X, y))
        with memory_limit(False):
            assert not memory.checks_enabled()
    monkeypatch.setenv(memory.ENV_VAR, "off")
    la = Laplace(mlp(device), "classification", "all", "full")
    la.fit(loader_of(X, y))
    la(X[:B])
    assert available_memory(device).nbytes is None


def test_environment_variable_and_context_manager(device, monkeypatch):
    X, y = data(device)
    monkeypatch.setenv(memory.ENV_VAR, "1kB")
    la = Laplace(mlp(device), "classification", "all", "full")
    with pytest.raises(MemoryPlanError, match=r"\$LAPLACE_MEMORY_LIMIT"):
        la.fit(loader_of(X, y))
    assert available_memory(device) == memory.Available(1000, "$LAPLACE_MEMORY_LIMIT")
    with memory_limit("2 GiB"):  # the setting in code wins over the variable
        assert available_memory(device).nbytes == 2 * 2**30
        la.fit(loader_of(X, y))
    assert available_memory(device).nbytes == 1000  # restored on exit
    setter = memory_limit("3MB")  # a plain setter, too
    try:
        assert available_memory(device).nbytes == 3_000_000
    finally:
        setter.__exit__(None, None, None)
    monkeypatch.delenv(memory.ENV_VAR)
    found = available_memory(device)
    assert found.nbytes is None or found.nbytes > 0
    assert found.source != "memory_limit()"


@pytest.mark.parametrize(
    ("text", "value"),
    [("20GB", 20 * 10**9), ("1.5 GiB", int(1.5 * 2**30)), ("512mb", 512 * 10**6),
     ("4G", 4 * 10**9), (1024, 1024), ("100", 100)],
)  # fmt: skip
def test_parse_bytes(text, value):
    assert memory.parse_bytes(text) == value


@pytest.mark.parametrize("bad", ["lots", "-5GB", 0, "5 parsecs", True, None])
def test_bad_limits_are_refused(bad):
    with pytest.raises(ValueError, match="memory limit"):
        memory.parse_bytes(bad)


# -- peeking and planning -------------------------------------------------------------
def test_first_example_puts_a_one_shot_iterators_batch_back(device):
    X, y = data(device)
    batches = [(X[i : i + B], y[i : i + B]) for i in range(0, N, B)]
    x1, size, rest = memory.first_example(iter(batches), "input_ids", "labels")
    assert size == B
    torch.testing.assert_close(x1, X[:1])
    again = list(rest)
    assert len(again) == len(batches)
    for (a, b), (c, d) in zip(again, batches):
        assert a is c and b is d


def test_first_example_of_a_shuffled_loader_leaves_the_rng(device):
    X, y = data(device)
    loader = DataLoader(TensorDataset(X, y), batch_size=B, shuffle=True)
    state = torch.get_rng_state()
    x1, size, same = memory.first_example(loader, "input_ids", "labels")
    assert same is loader and size == B
    torch.testing.assert_close(x1, X[:1])
    assert torch.equal(torch.get_rng_state(), state)
    generator = itertools.islice(iter(loader), 1)  # iterable only
    x1, size, _ = memory.first_example(list(generator), "input_ids", "labels")
    assert size == B and x1.shape == (1, D_IN)


def test_memory_plan_prints_a_row_per_approximation(device, capsys):
    X, _ = data(device)
    model = mlp(device)
    rows = memory_plan(model, "classification", X[:B], subnetwork_size=10)
    printed = capsys.readouterr().out
    expected = (
        [("all", s) for s in ("full", "kron", "diag", "lowrank", "gp")]
        + [("last_layer", s) for s in ("full", "kron", "diag", "gp")]
        + [("subnetwork", s) for s in ("full", "diag")]
    )
    assert [(r["subset"], r["structure"]) for r in rows] == expected
    table = [line for line in printed.splitlines() if line.startswith("| ")][1:]
    assert len(table) == len(expected)
    for r, line in zip(rows, table):
        assert line.startswith(f"| {r['subset']}")
        assert f"| {r['structure']} |" in line
        assert memory.format_bytes(r["fit"].nbytes) in line
        assert r["fits"] is True  # a small model
    assert "S = 10" in printed
    assert f"{n_params(model):,} weights, batch {B}" in printed


def test_memory_plan_takes_a_loader_and_a_batch_pair(device):
    X, y = data(device)
    by_loader = memory_plan(
        mlp(device), "classification", loader_of(X, y), verbose=False
    )
    by_pair = memory_plan(mlp(device), "classification", (X[:B], y[:B]), verbose=False)
    assert [r["fit"].nbytes for r in by_loader] == [r["fit"].nbytes for r in by_pair]


def test_last_layer_and_subnetwork_estimates_use_their_sizes(device):
    X, y = data(device)
    la = Laplace(mlp(device), "classification", "last_layer", "full")
    la.fit(loader_of(X, y))
    est = memory.estimate("fit", "last_layer", "full", problem(la, X))
    P = C * WIDTH + C
    assert term(est, "curvature").nbytes == P * P * 8 == la.H.nbytes
    indices = torch.arange(0, 30, 3)
    sub = Laplace(
        mlp(device), "classification", "subnetwork", "full", subnetwork_indices=indices
    )
    st = memory.settings_of(sub)
    est = memory.estimate("fit", "subnetwork", "full", problem(sub, X), st)
    sub.fit(loader_of(X, y))
    assert term(est, "curvature").nbytes == sub.H.nbytes == 10 * 10 * 8


class DictModel(nn.Module):
    """The MLP on mapping batches: it reads ``x['input_ids']``."""

    def __init__(self, device) -> None:
        super().__init__()
        self.net = mlp(device)

    def forward(self, x):
        return self.net(x["input_ids"])


def test_mapping_batches_are_planned_from_dict_key_x(device):
    X, y = data(device)
    rows = [{"input_ids": X[i], "labels": y[i]} for i in range(N)]
    loader = DataLoader(rows, batch_size=B)
    la = Laplace(DictModel(device), "classification", "all", "kron")
    x1, size, same = memory.first_example(loader, "input_ids", "labels")
    assert same is loader and size == B and set(x1) == {"input_ids", "labels"}
    assert x1["input_ids"].shape == (1, D_IN)
    est = memory.estimate("fit", "all", "kron", memory.problem_of(la, x1, size))
    plain = Laplace(mlp(device), "classification", "all", "kron")
    assert est.nbytes == memory.estimate("fit", "all", "kron", problem(plain, X)).nbytes
    with memory_limit(100), pytest.raises(MemoryPlanError):
        la.fit(loader)
    la.fit(loader)  # the default limit: a small model fits


class NeedsPairs(nn.Module):
    """A model that refuses a batch of one (as some models with ``squeeze`` do)."""

    def __init__(self, device) -> None:
        super().__init__()
        self.net = mlp(device)

    def forward(self, x):
        if x.shape[0] < 2:
            raise RuntimeError("needs two examples")
        return self.net(x)


def test_a_plan_that_cannot_run_the_model_is_skipped_with_a_warning(device):
    X, y = data(device)
    la = Laplace(NeedsPairs(device), "classification", "all", "diag")
    with memory_limit(100), pytest.warns(RuntimeWarning, match="plan of fit was"):
        la.fit(loader_of(X, y))
    assert la.fitted


def test_a_bad_environment_limit_is_named(device, monkeypatch):
    X, y = data(device)
    monkeypatch.setenv(memory.ENV_VAR, "plenty")
    la = Laplace(mlp(device), "classification", "all", "diag")
    with pytest.raises(ValueError, match="LAPLACE_MEMORY_LIMIT='plenty'"):
        la.fit(loader_of(X, y))
    assert not la.fitted


def test_low_rank_kron_factors_are_counted_as_kept(device):
    """KronLaplace(low_rank_factors=r): a factor above the threshold holds ``U``
    ``(n, r)``, ``s`` ``(r,)`` and ``c``; the others stay dense."""
    from laplace.utils import LowRankFactor

    X, y = data(device)
    la = Laplace(
        mlp(device),
        "classification",
        "all",
        "kron",
        low_rank_factors=2,
        low_rank_threshold=4,
    )
    st = memory.settings_of(la)
    assert st.low_rank == (2, 4)
    pb = problem(la, X)
    estimated = memory._kron_factor_bytes(pb.blocks, pb.work_itemsize, st.low_rank)[0]
    la.fit(loader_of(X, y))
    actual, low = 0, 0
    for block in la.H.kfacs:
        for F in block:
            if isinstance(F, LowRankFactor):
                low += 1
                actual += sum(F.state()[k].nbytes for k in ("U", "s", "c"))
            else:
                actual += F.nbytes
    assert low > 0 and estimated == actual
    est = memory.estimate("fit", "all", "kron", pb, st)
    assert term(est, "Kronecker factors").nbytes == actual
    # the predictive takes the Jacobian route (no complete eigenbasis)
    pred = memory.estimate("glm predictive", "all", "kron", pb, st)
    assert pred.terms == tuple(memory.predictive_lowrank(pb, "all", st))
    dense = memory.estimate("glm predictive", "all", "kron", pb)
    assert dense.terms == tuple(memory.predictive_blocks(pb, "all"))
