"""Last-layer features in one forward pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from laplace.utils import FeatureExtractor


class Branchy(nn.Module):
    """Not a Sequential; the head is registered before the body."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 2)
        self.body = nn.Linear(3, 4)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_finds_the_layer_that_produces_the_output():
    torch.manual_seed(0)
    model = Branchy()
    x = torch.randn(5, 3)
    out, phi = FeatureExtractor(model).forward_with_features(x)
    torch.testing.assert_close(out, model(x))
    torch.testing.assert_close(phi, torch.relu(model.body(x)))


def test_named_last_layer_and_unknown_name():
    model = Branchy()
    extractor = FeatureExtractor(model, last_layer_name="head")
    assert extractor.last_layer is model.head
    with pytest.raises(ValueError, match=r"nn.Linear modules are \['head', 'body'\]"):
        FeatureExtractor(model, last_layer_name="classifier")


@pytest.mark.parametrize(
    "reduction,expected",
    [
        ("pick_first", lambda h: h[:, 0]),
        ("pick_last", lambda h: h[:, -1]),
        ("average", lambda h: h.mean(1)),
    ],
)
def test_feature_reduction(reduction, expected):
    """Sequence features ``(batch, seq_len, dim)`` are reduced to ``(batch, dim)``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    x = torch.randn(5, 7, 3)
    extractor = FeatureExtractor(model, feature_reduction=reduction)
    out, phi = extractor.forward_with_features(x)
    torch.testing.assert_close(out, model(x))
    torch.testing.assert_close(phi, expected(model[0](x)).detach())


def test_3d_features_without_reduction_are_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="feature_reduction"):
        FeatureExtractor(model).forward_with_features(torch.randn(5, 7, 3))
