"""laplace-torch's backends on the old ``asdfghjkl`` API (a git-only build of
asdfghjkl, before it became ASDL).

The module imports without that library so that ``laplace.curvature.asdfghjkl``
and its names exist; constructing a backend needs the library and raises an
``ImportError`` naming it, and the ASDL backends (``AsdlGGN``, ``AsdlEF``,
``AsdlHessian``, on the released asdfghjkl 0.1a4 imported as ``asdl``) are the
working alternative.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from laplace.curvature._constants import EPS
from laplace.curvature.curvature import CurvatureInterface, EFInterface, GGNInterface
from laplace.utils.enums import Likelihood
from laplace.utils.matrix import Kron

__all__ = [
    "AsdfghjklInterface",
    "AsdfghjklGGN",
    "AsdfghjklEF",
    "AsdfghjklHessian",
    "CurvatureInterface",
    "EFInterface",
    "GGNInterface",
    "EPS",
    "Kron",
    "Likelihood",
]


def _require_asdfghjkl(backend: str) -> None:
    """Raise the ``ImportError`` that says what ``backend`` needs and what works.

    laplace-torch's asdfghjkl backends compute with a git-only build of asdfghjkl
    (its API before it became ASDL), which no package index carries; this package
    computes the same curvature with the released ASDL instead, so the backends of
    this module never run: constructing one raises, whether or not that build is
    installed."""
    raise ImportError(
        f"{backend} needs the git-only asdfghjkl library with its old API (not on "
        "the package index; laplace-torch's asdfghjkl backends are written against "
        "it). Use AsdlGGN, AsdlEF or AsdlHessian from laplace.curvature instead: "
        "they compute the same curvature with the released ASDL (pip install "
        "asdfghjkl==0.1a4, imported as asdl)."
    )


class AsdfghjklInterface(CurvatureInterface):
    """Interface of laplace-torch's asdfghjkl backends (needs the git-only
    asdfghjkl; see the module's notes). Parameters as ``CurvatureInterface``."""

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
    ) -> None:
        _require_asdfghjkl(type(self).__name__)
        super().__init__(
            model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y
        )


class AsdfghjklGGN(AsdfghjklInterface, GGNInterface):
    """GGN on the old asdfghjkl API (needs the git-only asdfghjkl); ``AsdlGGN``
    is the working alternative."""

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        stochastic: bool = False,
    ) -> None:
        _require_asdfghjkl(type(self).__name__)


class AsdfghjklEF(AsdfghjklInterface, EFInterface):
    """Empirical Fisher on the old asdfghjkl API (needs the git-only asdfghjkl);
    ``AsdlEF`` is the working alternative."""

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        last_layer: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
    ) -> None:
        _require_asdfghjkl(type(self).__name__)


class AsdfghjklHessian(AsdfghjklInterface):
    """Hessian on the old asdfghjkl API (needs the git-only asdfghjkl);
    ``AsdlHessian`` is the working alternative."""

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        last_layer: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        low_rank: int = 10,
    ) -> None:
        _require_asdfghjkl(type(self).__name__)

    def eig_lowrank(self, data_loader: Any) -> Any:
        """Top eigenpairs of the Hessian (needs the git-only asdfghjkl)."""
        _require_asdfghjkl(type(self).__name__)
