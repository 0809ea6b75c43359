"""Shared fixtures: every test that builds a model takes ``device``, so the suite runs
on the CPU and, where CUDA is present, on the GPU too."""

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """``cpu``, and ``cuda`` when a GPU is present."""
    return torch.device(request.param)
