"""Bad input fails early with a message that names the problem (DESIGN.md 5)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from laplace.curvature import CurvlinopsGGN, CurvlinopsHessian
from models import DictModel, data, model


def test_unknown_likelihood_lists_the_valid_ones():
    with pytest.raises(
        ValueError, match="'regression', 'classification', 'reward_modeling'"
    ):
        CurvlinopsGGN(model("mlp"), "gamma")


def test_structure_the_backend_cannot_give_names_those_that_can():
    m = model("mlp")
    x, y = data("mlp", "regression")
    with pytest.raises(ValueError, match="CurvlinopsGGN") as err:
        CurvlinopsHessian(m, "regression").kron(x, y, N=len(x))
    assert "'kron'" in str(err.value)


def test_kfac_names_the_layer_it_cannot_handle():
    m = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    x, y = data("mlp", "classification", n_out=2)
    with pytest.raises(ValueError, match=r"layer '1' \(LayerNorm\)"):
        CurvlinopsGGN(m, "classification").kron(x, y, N=len(x))


@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
def test_regression_targets_must_fit_outputs(structure):
    m = model("mlp", n_out=4)
    x, _ = data("mlp", "regression")
    y = torch.randn(len(x), 3, dtype=x.dtype)
    with pytest.raises(ValueError, match=r"do not fit model outputs of shape \(6, 4\)"):
        _call(CurvlinopsGGN(m, "regression"), structure, x, y)


@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
def test_classification_targets_must_be_class_indices(structure):
    m = model("mlp", n_out=4)
    x, _ = data("mlp", "classification")
    with pytest.raises(ValueError, match="integer class indices"):
        _call(CurvlinopsGGN(m, "classification"), structure, x, torch.rand(len(x)))
    with pytest.raises(ValueError, match="do not match a batch of 6"):
        _call(CurvlinopsGGN(m, "classification"), structure, x, torch.zeros(5).long())


@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
def test_empty_batch(structure):
    m = model("mlp")
    x = torch.zeros(0, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="batch is empty"):
        _call(CurvlinopsGGN(m, "classification"), structure, x, torch.zeros(0).long())


def test_missing_dict_key_names_the_keys():
    m = DictModel().double()
    x, y = data("mlp", "classification")
    batch = {"inputs": x, "scale": torch.ones(len(x), 1, dtype=x.dtype)}
    with pytest.raises(KeyError, match="dict_key_x='input_ids'.*'inputs', 'scale'"):
        CurvlinopsGGN(m, "classification").diag(batch, y)


def test_num_samples_must_be_positive():
    with pytest.raises(ValueError, match="num_samples"):
        CurvlinopsGGN(model("mlp"), "classification", stochastic=True, num_samples=0)


def test_model_without_linear_output_for_last_layer():
    m = nn.Sequential(nn.Linear(3, 4), nn.Softmax(dim=-1)).double()
    x, y = data("mlp", "classification")
    with pytest.raises(ValueError, match="last_layer_name"):
        CurvlinopsGGN(m, "classification", last_layer=True).diag(x, y)


def _call(backend, structure, x, y):
    if structure == "kron":
        return backend.kron(x, y, N=max(len(y), 1))
    return getattr(backend, structure)(x, y)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_a_backend_without_the_structure_is_refused_when_the_laplace_is_built(subset):
    from laplace import Laplace
    from laplace.curvature import BackPackEF, CurvlinopsHessian

    for backend in (CurvlinopsHessian, BackPackEF):
        with pytest.raises(ValueError, match="cannot compute the 'kron'") as err:
            Laplace(model("mlp"), "classification", subset, "kron", backend=backend)
        assert "backends that can: NativeGGN, NativeEF, CurvlinopsGGN" in str(err.value)
