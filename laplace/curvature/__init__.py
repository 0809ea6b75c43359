"""Curvature backends.

Each backend is a ``CurvatureInterface``; what it supports is declared on the
class (``supported_structures``, ``supports_dict_inputs``) and tabulated by
``support_table``. Optional libraries are imported when a backend is used, so a
missing library never breaks ``import laplace``.
"""

from laplace.curvature.asdl import AsdlEF, AsdlGGN, AsdlHessian, AsdlInterface
from laplace.curvature.backpack import BackPackEF, BackPackGGN, BackPackInterface
from laplace.curvature.curvature import (
    STRUCTURES,
    CurvatureInterface,
    EFInterface,
    GGNInterface,
)
from laplace.curvature.curvlinops import (
    CurvlinopsEF,
    CurvlinopsGGN,
    CurvlinopsHessian,
    CurvlinopsInterface,
)
from laplace.curvature.native import NativeEF, NativeGGN, NativeInterface

#: every concrete backend, the explicit table behind support messages
BACKENDS = (
    NativeGGN,
    NativeEF,
    CurvlinopsGGN,
    CurvlinopsEF,
    CurvlinopsHessian,
    BackPackGGN,
    BackPackEF,
    AsdlGGN,
    AsdlEF,
    AsdlHessian,
)


def backends_supporting(structure: str) -> list[str]:
    """Names of the backends that can compute ``structure``."""
    return [b.__name__ for b in BACKENDS if structure in b.supported_structures]


def support_table() -> dict[str, dict[str, bool]]:
    """``{backend: {structure or 'dict inputs': supported}}`` for every backend."""
    return {
        b.__name__: {
            **{s: s in b.supported_structures for s in STRUCTURES},
            "dict inputs": b.supports_dict_inputs,
        }
        for b in BACKENDS
    }


__all__ = [
    "CurvatureInterface",
    "GGNInterface",
    "EFInterface",
    "NativeInterface",
    "NativeGGN",
    "NativeEF",
    "CurvlinopsInterface",
    "CurvlinopsGGN",
    "CurvlinopsEF",
    "CurvlinopsHessian",
    "BackPackInterface",
    "BackPackGGN",
    "BackPackEF",
    "AsdlInterface",
    "AsdlGGN",
    "AsdlEF",
    "AsdlHessian",
    "BACKENDS",
    "backends_supporting",
    "support_table",
]
