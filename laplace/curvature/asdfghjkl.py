"""laplace-torch's backends on the old ``asdfghjkl`` API (a git-only build of
asdfghjkl, before it became ASDL).

The module imports without that library so that ``laplace.curvature.asdfghjkl``
and its names exist; constructing a backend needs the library and raises an
``ImportError`` naming it, and the ASDL backends (``AsdlGGN``, ``AsdlEF``,
``AsdlHessian``, on the released asdfghjkl 0.1a4 imported as ``asdl``) are the
working alternative.
"""

from __future__ import annotations

import importlib
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

#: functions of the old asdfghjkl API these backends are written against
_OLD_API = ("fisher_for_cross_entropy", "batch_gradient")

_INSTALL = (
    "pip install git+https://github.com/wiseodd/asdl@asdfghjkl (a git-only build "
    "of asdfghjkl with its old API)"
)


def _require_asdfghjkl(backend: str) -> None:
    """Raise ``ImportError`` unless an ``asdfghjkl`` with the old API imports."""
    try:
        library = importlib.import_module("asdfghjkl")
    except ImportError as err:
        raise ImportError(
            f"{backend} needs the git-only asdfghjkl library ({_INSTALL}), which is "
            "not installed. Use AsdlGGN, AsdlEF or AsdlHessian from "
            "laplace.curvature instead: they compute the same curvature with the "
            "released ASDL (pip install asdfghjkl==0.1a4)."
        ) from err
    missing = [name for name in _OLD_API if not hasattr(library, name)]
    if missing:
        raise ImportError(
            f"{backend} needs the git-only asdfghjkl library ({_INSTALL}); the "
            f"installed asdfghjkl lacks {missing}. Use AsdlGGN, AsdlEF or "
            "AsdlHessian from laplace.curvature instead."
        )
    raise NotImplementedError(
        f"{backend} is not implemented on the old asdfghjkl API in this package; "
        "use AsdlGGN, AsdlEF or AsdlHessian from laplace.curvature instead."
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
