"""Prior precision structures against their explicit per-parameter expansion."""

from __future__ import annotations

import pytest
import torch

from laplace.prior import (
    as_prior_precision,
    expand_prior_precision,
    parameters_per_layer,
    prior_precision_of_structure,
)

PARAMS = [torch.zeros(3, 2), torch.zeros(3), torch.zeros(1, 3)]  # P = 12, L = 3


def explicit_diag(values):
    """Per-parameter precisions written out entry by entry."""
    out = []
    for value, p in zip(values, PARAMS, strict=True):
        out += [value] * p.numel()
    return torch.tensor(out, dtype=torch.float64)


def test_parameters_per_layer():
    assert parameters_per_layer(PARAMS) == [6, 3, 3]


@pytest.mark.parametrize(
    "value, expected",
    [
        (2.0, explicit_diag([2.0, 2.0, 2.0])),
        (torch.tensor([2.0, 3.0, 5.0]), explicit_diag([2.0, 3.0, 5.0])),
        (torch.arange(1.0, 13.0), torch.arange(1.0, 13.0)),
    ],
    ids=["scalar", "layerwise", "diag"],
)
def test_expand_each_structure(value, expected):
    prec = as_prior_precision(value, 3, 12, dtype=torch.float64)
    torch.testing.assert_close(expand_prior_precision(prec, PARAMS), expected.double())


def test_gradients_reach_the_structured_precision():
    layerwise = torch.tensor([2.0, 3.0, 5.0], dtype=torch.float64, requires_grad=True)
    prec = as_prior_precision(layerwise, 3, 12)
    expand_prior_precision(prec, PARAMS).log().sum().backward()
    torch.testing.assert_close(
        layerwise.grad, torch.tensor([6 / 2, 3 / 3, 3 / 5]).double()
    )


@pytest.mark.parametrize(
    "structure, length", [("scalar", 1), ("layerwise", 3), ("diag", 12)]
)
def test_initial_precision_of_each_structure(structure, length):
    prec = prior_precision_of_structure(0.5, structure, 3, 12, dtype=torch.float64)
    assert prec.shape == (length,)
    torch.testing.assert_close(prec, torch.full((length,), 0.5, dtype=torch.float64))


@pytest.mark.parametrize(
    "value, match",
    [
        (torch.ones(5), "length 1.*3.*12"),
        (torch.ones(2, 2), "shape"),
        (-1.0, "positive"),
        (torch.tensor([1.0, 0.0, 1.0]), "positive"),
        (float("nan"), "positive and finite"),
    ],
)
def test_bad_prior_precision(value, match):
    with pytest.raises(ValueError, match=match):
        as_prior_precision(value, 3, 12)


def test_bad_structure_names_the_allowed_ones():
    with pytest.raises(ValueError, match="prior_structure.*'scalar'"):
        prior_precision_of_structure(1.0, "blockwise", 3, 12)
    with pytest.raises(ValueError, match="needs 12"):
        prior_precision_of_structure(torch.ones(3), "diag", 3, 12)
