"""laplace-torch's module-level names and the helpers of ``laplace.utils``.

Each helper is checked against a dense oracle or against numbers measured by running
laplace-torch 0.3 (``/work/main/.lt-venv``) on the same input, hard-coded below with
the call that produced them.
"""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
from collections import OrderedDict, UserDict

import numpy as np
import pytest
import torch
from torch import nn
from torch.testing import assert_close
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    SequentialSampler,
    SubsetRandomSampler,
    TensorDataset,
)

import laplace
import laplace.utils as U
from laplace.curvature import AsdlEF, AsdlGGN, AsdlHessian

D = torch.float64


# ------------------------------------------------------------------- the surface

SPEC_UTILS = [
    "SoDSampler", "_is_batchnorm", "_is_valid_scalar", "batch_size", "block_diag",
    "classification_targets", "concatenate_rows", "diagonal_add_scalar",
    "draw_gaussian", "expand_prior_precision", "fit_diagonal_swag_var",
    "fix_prior_prec_structure", "get_nll", "invsqrt_precision", "kron",
    "normal_samples", "parameters_per_layer", "preserve_model_gradients",
    "regression_targets", "same_configuration", "select_rows", "split_batch",
    "subset_loader", "symeig", "to_device", "training_indices", "validate",
]  # fmt: skip

MODULE_NAMES = {
    "laplace.utils.utils": [
        "SoDSampler", "block_diag", "diagonal_add_scalar", "expand_prior_precision",
        "get_nll", "invsqrt_precision", "kron", "parameters_per_layer", "symeig",
        "validate",
    ],
    "laplace.curvature.asdl": [
        "CurvatureInterface", "EFInterface", "EPS", "FISHER_EMP", "FISHER_EXACT",
        "FISHER_MC", "GGNInterface", "Kron", "LOSS_CROSS_ENTROPY", "LOSS_MSE",
        "Likelihood", "SHAPE_DIAG", "SHAPE_FULL", "SHAPE_KRON",
    ],
    "laplace.curvature.asdfghjkl": [
        "AsdfghjklInterface", "AsdfghjklGGN", "AsdfghjklEF", "AsdfghjklHessian",
        "CurvatureInterface", "EFInterface", "EPS", "GGNInterface", "Kron",
        "Likelihood",
    ],
    "laplace.curvature.backpack": [
        "CurvatureInterface", "EFInterface", "GGNInterface", "Kron", "Likelihood",
    ],
    "laplace.curvature.curvlinops": [
        "CurvatureInterface", "EFInterface", "GGNInterface", "Kron", "Likelihood",
    ],
    "laplace.curvature.curvature": ["Kron"],
    "laplace.laplace": [
        "BaseLaplace", "FunctionalApproximation", "HessianStructure", "Likelihood",
        "SubsetOfWeights",
    ],
    "laplace.marglik_training": [
        "AsdlGGN", "BaseLaplace", "CurvatureInterface", "HessianStructure",
        "Laplace", "Likelihood", "PriorStructure", "SubsetOfWeights",
        "expand_prior_precision", "fix_prior_prec_structure",
    ],
    "laplace.baselaplace": [
        "ParametricLaplace", "FullLaplace", "KronLaplace", "DiagLaplace",
        "LowRankLaplace", "FunctionalLaplace", "BaseFunctionalLaplace",
    ],
}  # fmt: skip


def test_laplace_utils_exports_every_name_of_the_spec():
    missing = [n for n in SPEC_UTILS if not hasattr(U, n)]
    assert missing == []
    assert set(SPEC_UTILS) <= set(U.__all__)


@pytest.mark.parametrize("module", sorted(MODULE_NAMES))
def test_module_level_names_are_real_attributes(module):
    mod = importlib.import_module(module)
    names = MODULE_NAMES[module]
    # real attributes: in the module's namespace, listed by dir()
    assert [n for n in names if n not in vars(mod)] == []
    assert set(names) <= set(dir(mod))


def test_module_level_names_are_the_library_objects():
    bl = importlib.import_module("laplace.baselaplace")
    asdl_mod = importlib.import_module("laplace.curvature.asdl")
    # (the package attribute laplace.marglik_training is the function)
    mt = importlib.import_module("laplace.marglik_training")

    assert bl.FullLaplace is laplace.FullLaplace
    assert bl.FunctionalLaplace is laplace.FunctionalLaplace
    assert asdl_mod.Kron is U.Kron and asdl_mod.Likelihood is U.Likelihood
    assert mt.expand_prior_precision is U.expand_prior_precision
    assert mt.Laplace is laplace.Laplace


def test_baselaplace_imports_without_a_cycle_in_a_fresh_interpreter():
    code = (
        "from laplace.baselaplace import FullLaplace, FunctionalLaplace, BaseLaplace;"
        "import laplace.utils.utils, laplace.curvature.asdfghjkl;"
        "assert issubclass(FullLaplace, BaseLaplace)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_asdl_constants_do_not_import_asdl_and_equal_its_values():
    code = (
        "import sys, laplace, laplace.curvature.asdl as m;"
        "assert 'asdl' not in sys.modules, 'asdl imported eagerly';"
        "print(m.FISHER_EXACT)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    asdl = pytest.importorskip("asdl")
    import laplace.curvature.asdl as m

    for name in [
        "FISHER_EMP", "FISHER_EXACT", "FISHER_MC", "LOSS_CROSS_ENTROPY",
        "LOSS_MSE", "SHAPE_DIAG", "SHAPE_FULL", "SHAPE_KRON",
    ]:  # fmt: skip
        assert getattr(m, name) == getattr(asdl, name), name
    # laplace-torch 0.3: laplace.curvature.asdl.EPS == asdfghjkl.EPS == 1e-06
    assert m.EPS == 1e-6


def test_marglik_training_defaults_to_asdl_ggn():
    default = inspect.signature(laplace.marglik_training).parameters["backend"]
    assert default.default is AsdlGGN


# ----------------------------------------------------------- asdfghjkl backends


@pytest.mark.parametrize(
    "name", ["AsdfghjklInterface", "AsdfghjklGGN", "AsdfghjklEF", "AsdfghjklHessian"]
)
def test_asdfghjkl_backends_need_the_git_only_library(name, device):
    import laplace.curvature.asdfghjkl as m

    cls = getattr(m, name)
    assert issubclass(cls, m.CurvatureInterface)
    model = nn.Linear(2, 2).to(device)
    with pytest.raises(ImportError, match="git-only asdfghjkl") as err:
        cls(model, "classification")
    message = str(err.value)
    for alternative in (AsdlGGN, AsdlEF, AsdlHessian):
        assert alternative.__name__ in message
    # the model is untouched
    assert not hasattr(model, "_original_requires_grad")


def test_asdfghjkl_signatures_match_the_spec():
    import laplace.curvature.asdfghjkl as m

    params = lambda c: list(inspect.signature(c).parameters)  # noqa: E731
    common = ["model", "likelihood", "last_layer"]
    keys = ["dict_key_x", "dict_key_y"]
    assert params(m.AsdfghjklInterface) == [*common, "subnetwork_indices", *keys]
    assert params(m.AsdfghjklGGN) == [
        *common,
        "subnetwork_indices",
        *keys,
        "stochastic",
    ]
    assert params(m.AsdfghjklEF) == [*common, *keys]
    assert params(m.AsdfghjklHessian) == [*common, *keys, "low_rank"]
    assert issubclass(m.AsdfghjklGGN, m.GGNInterface)
    assert issubclass(m.AsdfghjklEF, m.EFInterface)


# ------------------------------------------------------------------ batches


def test_split_batch_pairs_sequences_and_mappings(device):
    x = torch.arange(6.0, device=device).reshape(3, 2)
    y = torch.tensor([0, 1, 0], device=device)
    assert U.split_batch((x, y), "labels") == (x, y)
    assert U.split_batch([x, y], "labels") == (x, y)
    # laplace-torch: a triple gives its first two items
    assert U.split_batch((x, y, y), "labels") == (x, y)
    batch = {"input_ids": x, "labels": y}
    xb, yb = U.split_batch(batch, "labels")
    assert xb is batch and yb is y
    with pytest.raises(KeyError, match="dict_key_y='labels'"):
        U.split_batch({"input_ids": x}, "labels")
    with pytest.raises(TypeError, match="pair"):
        U.split_batch(x, "labels")


def test_internal_split_batch_also_checks_the_input_key():
    from laplace.data import split_batch

    with pytest.raises(KeyError, match="dict_key_x='input_ids'"):
        split_batch(
            {"x": torch.ones(2), "labels": torch.ones(2)}, "input_ids", "labels"
        )


def test_batch_size(device):
    x = torch.zeros(5, 3, device=device)
    assert U.batch_size(x, "input_ids") == 5
    assert U.batch_size({"input_ids": x, "mask": x[:1]}, "input_ids") == 5
    with pytest.raises(KeyError):
        U.batch_size({"mask": x}, "input_ids")
    with pytest.raises(TypeError):
        U.batch_size([x], "input_ids")
    with pytest.raises(ValueError, match="batch dimension"):
        U.batch_size(torch.tensor(1.0), "input_ids")


def test_to_device_casts_floating_tensors_only(device):
    x = torch.arange(6.0).reshape(3, 2)
    y = torch.tensor([0, 1, 0])
    out = U.to_device({"a": x, "b": y, "c": "s", "d": [x, (y,)]}, device, D)
    assert out["a"].dtype == D and out["a"].device.type == device.type
    assert out["b"].dtype == torch.int64 and out["b"].device.type == device.type
    assert out["c"] == "s"
    assert isinstance(out["d"], list) and isinstance(out["d"][1], tuple)
    assert out["d"][0].dtype == D and out["d"][1][0].dtype == torch.int64
    assert_close(out["a"].cpu(), x.to(D))
    # no dtype: the dtype is kept; the caller's mapping is not modified
    batch = {"a": x}
    moved = U.to_device(batch, device, None)
    assert moved["a"].dtype == torch.float32 and batch["a"] is x
    assert U.to_device(x, "cpu", torch.float32) is x


def test_to_device_keeps_the_mapping_type():
    class Encoding(UserDict):
        pass

    out = U.to_device(Encoding(a=torch.ones(2)), "cpu", D)
    assert type(out) is Encoding and out["a"].dtype == D
    assert type(U.to_device(OrderedDict(a=torch.ones(1)), "cpu", None)) is OrderedDict


def test_classification_targets(device):
    # laplace-torch 0.3 on the same inputs: [0, 1, 0], [2, 3], [1, 0], [0, 1]
    cases = [
        (torch.tensor([0, 1, 0]), [0, 1, 0]),
        (torch.tensor([[2.7], [3.2]]), [2, 3]),
        (torch.tensor([[0.2, 0.8], [0.9, 0.1]]), [1, 0]),
        (torch.tensor([0.5, 1.7]), [0, 1]),
        (torch.tensor([0, 1], dtype=torch.int32), [0, 1]),
    ]
    for targets, expected in cases:
        out = U.classification_targets(targets.to(device))
        assert out.dtype == torch.int64 and out.device.type == device.type
        assert out.tolist() == expected
    for bad in (torch.zeros(2, 3, 4), torch.tensor(1)):
        with pytest.raises(ValueError, match=r"\[B\] or \[B, C\]"):
            U.classification_targets(bad)


def test_regression_targets(device):
    t = torch.tensor([1.0, 2.0, 3.0], device=device)
    out = U.regression_targets(t, torch.zeros(3, 1, dtype=D, device=device))
    assert out.shape == (3, 1) and out.dtype == torch.float32  # dtype kept
    assert_close(out[:, 0], t)
    assert U.regression_targets(t, torch.zeros(3, device=device)) is t
    ok = torch.ones(3, 2, device=device)
    assert U.regression_targets(ok, torch.zeros(3, 2, device=device)) is ok
    # laplace-torch refuses all of these with the same message
    for targets, outputs in [
        (torch.ones(3), torch.zeros(3, 2)),
        (torch.ones(6), torch.zeros(3, 2)),
        (torch.ones(4, 2), torch.zeros(3, 2)),
        (torch.ones(3, 1), torch.zeros(3)),
    ]:
        with pytest.raises(ValueError, match="Regression targets have shape"):
            U.regression_targets(targets, outputs)


def test_concatenate_rows(device):
    a = torch.arange(4.0, device=device).reshape(2, 2)
    b = torch.arange(6.0, device=device).reshape(3, 2)
    assert_close(U.concatenate_rows([a, b]), torch.cat([a, b]))
    out = U.concatenate_rows(
        [
            {"x": a, "m": {"k": a[:, 0]}, "s": "tag"},
            {"x": b, "m": {"k": b[:, 0]}, "s": "tag"},
        ]
    )
    assert_close(out["x"], torch.cat([a, b]))
    assert_close(out["m"]["k"], torch.cat([a[:, 0], b[:, 0]]))
    assert out["s"] == "tag"
    assert U.concatenate_rows([[a], [b]]) == [a, b]
    assert U.concatenate_rows([(a,), (b,)]) == (a, b)
    with pytest.raises(ValueError, match="matching input keys"):
        U.concatenate_rows([{"x": a}, {"y": b}])
    with pytest.raises(ValueError, match="metadata"):
        U.concatenate_rows([{"x": a, "s": "p"}, {"x": b, "s": "q"}])
    with pytest.raises(ValueError, match="at least one"):
        U.concatenate_rows([])


def test_select_rows(device):
    x = torch.arange(6.0, device=device).reshape(3, 2)
    idx = torch.tensor([2, 0])
    assert_close(U.select_rows(x, idx, 3), x[[2, 0]])
    assert U.select_rows(x, idx, 2) is x  # another batch size: kept
    out = U.select_rows(
        {
            "a": x,
            "n": {"b": x[:, 0]},
            "w": torch.ones(4),
            "c": torch.tensor(5.0),
            "s": "x",
        },
        idx,
        3,
    )
    assert_close(out["a"], x[[2, 0]])
    assert_close(out["n"]["b"], x[[2, 0], 0])
    assert out["w"].shape == (4,) and out["c"].ndim == 0 and out["s"] == "x"
    mask = torch.tensor([True, False, True])
    assert_close(U.select_rows(x, mask, 3), x[[0, 2]])


# ------------------------------------------------------------------ loaders


def _data(n=10):
    return TensorDataset(torch.arange(2.0 * n).reshape(n, 2), torch.arange(n))


def test_sod_sampler_draws_laplace_torchs_indices():
    # laplace-torch 0.3: list(SoDSampler(10, 4, seed=3)) == [2, 0, 1, 5];
    # list(SoDSampler(10, 4)) == [2, 4, 5, 7]
    assert [int(i) for i in U.SoDSampler(10, 4, seed=3)] == [2, 0, 1, 5]
    sampler = U.SoDSampler(10, 4)
    assert len(sampler) == 4
    assert [int(i) for i in sampler] == [2, 4, 5, 7] == [int(i) for i in sampler]
    expected = np.random.default_rng(3).choice(10, 4, replace=False)
    assert [int(i) for i in U.SoDSampler(10, 4, seed=3)] == expected.tolist()
    with pytest.raises(ValueError, match="M=5 of N=3"):
        U.SoDSampler(3, 5)
    loader = DataLoader(_data(), batch_size=2, sampler=U.SoDSampler(10, 4, seed=3))
    assert torch.cat([y for _, y in loader]).tolist() == [2, 0, 1, 5]


def test_training_indices():
    ds = _data()
    assert U.training_indices(DataLoader(ds, batch_size=4)).tolist() == list(range(10))
    # drop_last without shuffling: the indices visited (laplace-torch: 0..7)
    assert U.training_indices(
        DataLoader(ds, batch_size=4, drop_last=True)
    ).tolist() == [*range(8)]
    # shuffling: the permuted set in a fixed order, whatever the seed
    for seed in range(3):
        torch.manual_seed(seed)
        loader = DataLoader(ds, batch_size=4, shuffle=True, drop_last=True)
        assert U.training_indices(loader).tolist() == list(range(10))
        subset = DataLoader(ds, batch_size=2, sampler=SubsetRandomSampler([5, 2, 8, 1]))
        assert U.training_indices(subset).tolist() == [5, 2, 8, 1]
    assert U.training_indices(
        DataLoader(ds, batch_size=2, sampler=[9, 3, 3])
    ).tolist() == [
        9,
        3,
        3,
    ]
    assert U.training_indices(DataLoader(ds, batch_sampler=[[4, 1], [0]])).tolist() == [
        4,
        1,
        0,
    ]
    assert U.training_indices(DataLoader(ds, batch_size=None)).tolist() == list(
        range(10)
    )
    out = U.training_indices(DataLoader(ds, batch_size=4))
    assert out.dtype == torch.int64


def test_training_indices_of_a_batch_sampler_are_the_ones_it_visits():
    # docs/differences.md: laplace-torch gives 0..9 (the dataset), though the loader
    # visits only 0..4
    loader = DataLoader(
        _data(), batch_sampler=BatchSampler(SequentialSampler(range(5)), 2, False)
    )
    visited = torch.cat([y for _, y in loader])
    assert U.training_indices(loader).tolist() == visited.tolist() == [0, 1, 2, 3, 4]


def test_training_indices_refuses_an_iterable_dataset():
    class Stream(IterableDataset):
        def __iter__(self):
            yield from _data()

    with pytest.raises(TypeError, match="map-style"):
        U.training_indices(DataLoader(Stream(), batch_size=2))


def test_subset_loader():
    def collate(rows):
        return {
            "x": torch.stack([r[0] for r in rows]),
            "labels": torch.stack([r[1] for r in rows]),
        }

    loader = DataLoader(_data(), batch_size=2, shuffle=True, collate_fn=collate)
    sub = U.subset_loader(loader, torch.tensor([7, 1, 3]))
    batches = list(sub)
    assert [b["labels"].tolist() for b in batches] == [[7, 1], [3]]
    assert_close(batches[0]["x"], torch.tensor([[14.0, 15.0], [2.0, 3.0]]))
    assert list(U.subset_loader(loader, [2])) and sub.batch_size == 2
    # laplace-torch: no batch size gives batches of one
    assert (
        U.subset_loader(
            DataLoader(_data(), batch_size=None), torch.tensor([1])
        ).batch_size
        == 1
    )
    with pytest.raises(TypeError, match="integer"):
        U.subset_loader(loader, torch.zeros(10, dtype=torch.bool))


# --------------------------------------------------------------- linear algebra


def test_kron_block_diag_diagonal_add_scalar(device):
    A = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=D, device=device)
    B = torch.tensor([[0.0, 1.0, 2.0]], dtype=D, device=device)
    K = U.kron(A, B)
    oracle = torch.stack(
        [torch.cat([A[i, j] * B for j in range(2)], dim=1) for i in range(2)]
    ).reshape(2, 6)
    assert_close(K, oracle)
    with pytest.raises(ValueError, match="two matrices"):
        U.kron(torch.ones(2, device=device), A)
    C = torch.tensor([[5.0]], dtype=D, device=device)
    bd = U.block_diag([A, C])
    assert_close(
        bd, torch.tensor([[1, 2, 0], [3, 4, 0], [0, 0, 5.0]], dtype=D, device=device)
    )
    with pytest.raises(ValueError, match="at least one"):
        U.block_diag([])
    X = A.clone()
    out = U.diagonal_add_scalar(X, torch.tensor(2.0))
    assert_close(out, A + 2 * torch.eye(2, dtype=D, device=device))
    assert_close(X, A)  # out of place
    assert_close(
        U.diagonal_add_scalar(torch.zeros(2, 3, device=device), 1.0),
        torch.eye(2, 3, device=device),
    )
    assert (
        U.diagonal_add_scalar(A.float(), torch.tensor(2.0, dtype=D)).dtype
        == torch.float32
    )
    value = torch.tensor(2.0, dtype=D, requires_grad=True)
    U.diagonal_add_scalar(A, value).sum().backward()
    assert value.grad.item() == 2.0


def test_symeig_and_invsqrt_precision(device):
    A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=D, device=device)
    values, vectors = U.symeig(A)
    assert_close(vectors @ torch.diag(values) @ vectors.T, A)
    # laplace-torch reads the upper triangle and clamps at 0: [[1, 2], [0, 1]] ->
    # eigenvalues [0, 3] (those of [[1, 2], [2, 1]] are -1 and 3)
    values, _ = U.symeig(torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=D, device=device))
    assert_close(values, torch.tensor([0.0, 3.0], dtype=D, device=device))
    L = U.invsqrt_precision(A)
    assert_close(L @ L.T, torch.linalg.inv(A))
    assert torch.equal(L, L.tril())
    # laplace-torch 0.3: invsqrt_precision([[4, 1], [1, 3]])
    expected = torch.tensor(
        [[0.5222329679, 0.0], [-0.1740776560, 0.5773502692]], dtype=D
    )
    assert_close(L.cpu(), expected)
    assert U.invsqrt_precision(A.float()).dtype == torch.float32
    with pytest.raises(torch.linalg.LinAlgError):
        U.invsqrt_precision(-A)


# ------------------------------------------------------------------- sampling


def test_normal_samples_reproduce_laplace_torch(device):
    mean = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=D)
    var = torch.tensor([[4.0, 9.0], [1.0, 16.0]], dtype=D)
    gen = torch.Generator().manual_seed(0)
    out = U.normal_samples(mean, var, 2, gen)
    # laplace-torch 0.3: normal_samples(mean, var, 2, Generator().manual_seed(0))
    expected = torch.tensor(
        [
            [[4.0819922165, -4.5363681462], [4.5409961082, -4.7151575283]],
            [[0.4131421885, 3.7052938318], [2.7065710942, 6.2737251091]],
        ],
        dtype=D,
    )
    assert_close(out, expected)
    cov = torch.tensor([[[2.0, 0.5], [0.5, 1.0]], [[1.0, 0.0], [0.0, 4.0]]], dtype=D)
    out = U.normal_samples(mean, cov, 2, torch.Generator().manual_seed(0))
    expected = torch.tensor(
        [
            [[3.1792975958, 0.5067535525], [4.5409961082, -0.3575787641]],
            [[0.5850288619, 2.4279759873], [2.7065710942, 5.1368625546]],
        ],
        dtype=D,
    )
    assert_close(out, expected)
    on_device = U.normal_samples(mean.to(device), var.to(device), 3)
    assert on_device.shape == (3, 2, 2) and on_device.device.type == device.type
    assert U.normal_samples(mean.float(), var.float(), 1).dtype == torch.float32
    assert U.normal_samples(mean, var, 0).shape == (0, 2, 2)
    with pytest.raises(ValueError, match="f_var"):
        U.normal_samples(mean, torch.ones(3, 2, dtype=D), 1)


def test_normal_samples_have_the_moments(device):
    mean = torch.tensor([[1.0, -2.0]], dtype=D, device=device)
    cov = torch.tensor([[[2.0, 0.8], [0.8, 1.0]]], dtype=D, device=device)
    s = U.normal_samples(mean, cov, 200_000, torch.Generator(device).manual_seed(1))[
        :, 0
    ]
    assert_close(s.mean(0), mean[0], atol=0.02, rtol=0)
    assert_close(torch.cov(s.T), cov[0], atol=0.03, rtol=0)


def test_draw_gaussian_is_the_cholesky_reparameterisation(device):
    mean = torch.tensor([1.0, 2.0], dtype=D)
    cov = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=D)
    out = U.draw_gaussian(mean, cov, 3, torch.Generator().manual_seed(0))
    # laplace-torch 0.3: draw_gaussian(mean, cov, 3, Generator().manual_seed(0))
    expected = torch.tensor(
        [
            [3.1792975958, 2.2703467908],
            [-2.0812734937, 1.7614003985],
            [-0.5337462054, 0.3082972506],
        ],
        dtype=D,
    )
    assert_close(out, expected)
    eps = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=D)
    assert_close(out, mean + eps @ torch.linalg.cholesky(cov).T)
    batched = U.draw_gaussian(
        torch.zeros(4, 2, device=device),
        torch.eye(2, device=device).expand(4, 2, 2),
        3,
        None,
    )
    assert batched.shape == (3, 4, 2) and batched.device.type == device.type
    # a singular covariance: the samples lie on its range
    singular = U.draw_gaussian(mean, torch.ones(2, 2, dtype=D), 5, None)
    assert_close(
        singular[:, 1] - singular[:, 0], torch.ones(5, dtype=D), atol=1e-6, rtol=0
    )
    with pytest.raises(ValueError, match="covariance"):
        U.draw_gaussian(mean, torch.eye(3, dtype=D), 2, None)


# ------------------------------------------------------------ prior precision


def _mlp(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)).to(device, D)


def test_parameters_per_layer_and_expand_prior_precision(device):
    model = _mlp(device)
    assert U.parameters_per_layer(model) == [6, 3, 3, 1]
    layer = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=D, device=device)
    expected = torch.tensor(
        [1.0] * 6 + [2.0] * 3 + [3.0] * 3 + [4.0], dtype=D, device=device
    )
    assert_close(U.expand_prior_precision(layer, model), expected)
    assert_close(
        U.expand_prior_precision(torch.tensor([2.0], dtype=D, device=device), model),
        torch.full((13,), 2.0, dtype=D, device=device),
    )
    diag = torch.arange(1.0, 14.0, dtype=D, device=device)
    assert_close(U.expand_prior_precision(diag, model), diag)
    with pytest.raises(ValueError, match="5 entries"):
        U.expand_prior_precision(torch.ones(5, dtype=D, device=device), model)
    # differentiable in the precision
    p = layer.clone().requires_grad_(True)
    U.expand_prior_precision(p, model).sum().backward()
    assert p.grad.tolist() == [6.0, 3.0, 3.0, 1.0]


def test_frozen_parameters_are_not_a_layer(device):
    # docs/differences.md: laplace-torch's parameters_per_layer also counts frozen
    # tensors ([6, 3, 3, 1]) while its expand_prior_precision skips them
    model = _mlp(device)
    model[0].bias.requires_grad_(False)
    assert U.parameters_per_layer(model) == [6, 3, 1]
    # laplace-torch 0.3: expand_prior_precision(tensor([1., 2., 3.]), model) ->
    # [1]*6 + [2]*3 + [3] with the first bias frozen, the same as ours
    out = U.expand_prior_precision(
        torch.tensor([1.0, 2.0, 3.0], dtype=D, device=device), model
    )
    assert out.tolist() == [1.0] * 6 + [2.0] * 3 + [3.0]
    assert len(U.parameters_per_layer(model)) == 3


def test_fix_prior_prec_structure(device):
    # laplace-torch 0.3: fix_prior_prec_structure(2.0, s, 4, 13, device, float64)
    # gives [2.], [2.]*4 and [2.]*13
    for structure, length in [("scalar", 1), ("layerwise", 4), ("diag", 13)]:
        for init in (2.0, torch.tensor(2.0)):
            out = U.fix_prior_prec_structure(init, structure, 4, 13, device, D)
            assert out.shape == (length,) and out.dtype == D
            assert out.device.type == device.type
            assert_close(out, torch.full((length,), 2.0, dtype=D, device=device))
    layer = torch.arange(1.0, 5.0)
    assert_close(
        U.fix_prior_prec_structure(layer, "layerwise", 4, 13, device, D),
        layer.to(device, D),
    )
    with pytest.raises(ValueError, match="prior_structure"):
        U.fix_prior_prec_structure(1.0, "foo", 4, 13, device, D)
    with pytest.raises(ValueError, match="positive"):
        U.fix_prior_prec_structure(-1.0, "scalar", 4, 13, device, D)


# ------------------------------------------------------------- small predicates


def test_is_batchnorm():
    # laplace-torch 0.3: True for BatchNorm1d/2d/3d (and subclasses) only
    for module in (nn.BatchNorm1d(2), nn.BatchNorm2d(2), nn.BatchNorm3d(2)):
        assert U._is_batchnorm(module)

    class MyNorm(nn.BatchNorm1d):
        pass

    assert U._is_batchnorm(MyNorm(2))
    for module in (
        nn.SyncBatchNorm(2),
        nn.LayerNorm(2),
        nn.GroupNorm(1, 2),
        nn.Linear(1, 1),
    ):
        assert not U._is_batchnorm(module)


def test_is_valid_scalar():
    # laplace-torch 0.3 on the same values
    valid = [1, 1.5, True, -1, float("nan"), np.float64(2.0), np.int64(2)]
    valid += [torch.tensor(1.0), torch.tensor([1.0]), torch.tensor(1)]
    invalid = ["1.5", None, [1.0], np.array(1.0), 1 + 2j]
    invalid += [torch.tensor([1.0, 2.0]), torch.tensor([[1.0]])]
    assert all(U._is_valid_scalar(v) for v in valid)
    assert not any(U._is_valid_scalar(v) for v in invalid)


def test_same_configuration():
    # laplace-torch 0.3 on the same pairs
    t = torch.tensor([1.0, 2.0])
    equal = [
        (1, 1),
        (1, 1.0),
        (t, t.clone()),
        (t, t.double()),
        (None, None),
        ("a", "a"),
    ]
    equal += [({"a": t, "b": 1}, {"a": t.clone(), "b": 1}), ([t, 1], [t, 1])]
    different = [
        (1, 2),
        (t, torch.tensor([1.0, 3.0])),
        (t, t[None]),
        (torch.tensor(1.0), 1.0),
    ]
    different += [({"a": 1}, {"b": 1}), ((1, 2), [1, 2]), ([1, 2], [1, 2, 3])]
    different += [(torch.tensor([float("nan")]),) * 2, (object(), object())]
    assert all(U.same_configuration(a, b) for a, b in equal)
    assert not any(U.same_configuration(a, b) for a, b in different)


def test_preserve_model_gradients(device):
    model = _mlp(device)

    class Fitter:
        def __init__(self):
            self.model = model
            self.seen = None

        @U.preserve_model_gradients
        def fit(self, value, fail=False):
            """Fit."""
            self.seen = [p.grad for p in self.model.parameters()]
            self.model(torch.ones(1, 2, dtype=D, device=device)).sum().backward()
            if fail:
                raise RuntimeError("boom")
            return value

    saved = [torch.ones_like(p) for p in model.parameters()]
    for p, g in zip(model.parameters(), saved):
        p.grad = g
    fitter = Fitter()
    assert fitter.fit(3) == 3
    assert all(p.grad is g for p, g in zip(model.parameters(), saved))
    assert all(
        torch.equal(g, torch.ones_like(g)) for g in saved
    )  # not accumulated into
    assert fitter.seen == [None] * 4
    with pytest.raises(RuntimeError, match="boom"):
        fitter.fit(1, fail=True)
    assert all(p.grad is g for p, g in zip(model.parameters(), saved))
    for p in model.parameters():
        p.grad = None
    fitter.fit(0)
    assert all(p.grad is None for p in model.parameters())
    assert Fitter.fit.__name__ == "fit" and Fitter.fit.__doc__ == "Fit."


# ------------------------------------------------------------------ validation


def test_get_nll(device):
    p = torch.tensor([[0.2, 0.8], [0.6, 0.4]], dtype=D, device=device)
    y = torch.tensor([1, 0], device=device)
    nll = U.get_nll(p, y)
    assert_close(nll, -(torch.log(p[[0, 1], [1, 0]])).mean())
    # laplace-torch 0.3: get_nll(p, y) == 0.3669845875
    assert_close(nll.cpu(), torch.tensor(0.3669845875, dtype=D))
    assert U.get_nll(p.float(), y).dtype == torch.float32


def _fitted(likelihood, device, dict_batches=False):
    torch.manual_seed(0)
    n_out = 2 if likelihood == "classification" else 1
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, n_out)).to(device, D)
    X = torch.randn(8, 2, dtype=D)
    if likelihood == "classification":
        y = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1])
    else:
        y = torch.randn(8, 1, dtype=D)
    la = laplace.Laplace(model, likelihood, "all", "full")
    la.fit(DataLoader(TensorDataset(X.to(device), y.to(device)), batch_size=4))
    return la, X, y


def test_validate_classification(device):
    from laplace.utils import RunningNLLMetric

    la, X, y = _fitted("classification", device)
    loader = DataLoader(TensorDataset(X, y), batch_size=4)
    probs = la(X.to(device), link_approx="probit")
    oracle = float(-torch.log(probs[torch.arange(8), y.to(device)]).mean())
    assert U.validate(la, loader, U.get_nll) == pytest.approx(oracle, rel=1e-10)
    assert U.validate(la, loader, RunningNLLMetric()) == pytest.approx(oracle, rel=1e-6)
    # laplace-torch 0.3 on the same model, data and fit: 0.734745503023681
    assert U.validate(la, loader, U.get_nll) == pytest.approx(
        0.734745503023681, rel=1e-6
    )
    rows = [{"x": X[i], "target": y[i]} for i in range(8)]

    class DictModel(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, batch):
            return self.net(batch["x"])

    la_dict = laplace.Laplace(
        DictModel(la.model),
        "classification",
        "all",
        "full",
        dict_key_x="x",
        dict_key_y="target",
    )
    on_device = [{k: v.to(device) for k, v in r.items()} for r in rows]
    la_dict.fit(DataLoader(on_device, batch_size=4))
    value = U.validate(
        la_dict, DataLoader(rows, batch_size=4), U.get_nll, dict_key_y="target"
    )
    assert value == pytest.approx(oracle, rel=1e-8)


def test_validate_regression_passes_the_variance(device):
    la, X, y = _fitted("regression", device)
    loader = DataLoader(TensorDataset(X, y), batch_size=4)
    f_mu, f_var = la(X.to(device))
    seen = {}

    def loss(mean, target, var):
        seen.update(mean=mean, target=target, var=var)
        return ((mean - target) ** 2 / var).mean()

    value = U.validate(la, loader, loss)
    assert_close(seen["mean"], f_mu)
    assert_close(seen["var"], f_var.diagonal(dim1=-2, dim2=-1))
    assert_close(seen["target"], y.to(device))
    assert value == pytest.approx(
        float(((f_mu - y.to(device)) ** 2 / seen["var"]).mean())
    )
    import torchmetrics

    mse = U.validate(la, loader, torchmetrics.MeanSquaredError().to(device, D))
    assert mse == pytest.approx(float(((f_mu - y.to(device)) ** 2).mean()), rel=1e-6)


def test_validate_refuses_bad_arguments(device):
    la, X, y = _fitted("classification", device)
    loader = DataLoader(TensorDataset(X, y), batch_size=4)
    with pytest.raises(TypeError, match="loss"):
        U.validate(la, loader, "nll")
    with pytest.raises(ValueError, match="pred_type"):
        U.validate(la, loader, U.get_nll, pred_type="mlp")
    with pytest.raises(ValueError, match="n_samples"):
        U.validate(la, loader, U.get_nll, n_samples=0)
