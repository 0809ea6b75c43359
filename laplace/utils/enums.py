"""String-valued enums for every option of the public API.

Each enum subclasses ``str``, so ``HessianStructure.KRON == "kron"`` and every
argument that takes an enum also takes its string. ``parse_enum`` turns user
input into a member and fails with the list of valid values.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar


class _StrEnum(str, Enum):
    def __str__(self) -> str:
        return self.value


class SubsetOfWeights(_StrEnum):
    ALL = "all"
    LAST_LAYER = "last_layer"
    SUBNETWORK = "subnetwork"


class HessianStructure(_StrEnum):
    FULL = "full"
    KRON = "kron"
    DIAG = "diag"
    LOWRANK = "lowrank"
    GP = "gp"


class Likelihood(_StrEnum):
    REGRESSION = "regression"
    CLASSIFICATION = "classification"
    REWARD_MODELING = "reward_modeling"
    BINARY = "binary"
    MULTILABEL = "multilabel"
    POISSON = "poisson"
    HETEROSCEDASTIC_REGRESSION = "heteroscedastic_regression"


class PredType(_StrEnum):
    GLM = "glm"
    NN = "nn"
    GP = "gp"


class LinkApprox(_StrEnum):
    MC = "mc"
    PROBIT = "probit"
    BRIDGE = "bridge"
    BRIDGE_NORM = "bridge_norm"


class TuningMethod(_StrEnum):
    MARGLIK = "marglik"
    GRIDSEARCH = "gridsearch"


class PriorStructure(_StrEnum):
    SCALAR = "scalar"
    DIAG = "diag"
    LAYERWISE = "layerwise"


class FeatureReduction(_StrEnum):
    PICK_FIRST = "pick_first"
    PICK_LAST = "pick_last"
    AVERAGE = "average"


class FunctionalApproximation(_StrEnum):
    """The function-space method of ``hessian_structure='gp'``: 'sod' conditions
    the GP on a subset of the data (``FunctionalLaplace``), 'nystrom' is ELLA's
    Nyström feature map, 'variational' is VaLLA's inducing points."""

    SOD = "sod"
    NYSTROM = "nystrom"
    VARIATIONAL = "variational"


E = TypeVar("E", bound=_StrEnum)


def parse_enum(enum_cls: type[E], value: E | str, argument: str) -> E:
    """Return ``value`` as a member of ``enum_cls``.

    Raises
    ------
    ValueError
        naming ``argument`` and the allowed values when ``value`` is not one of them.
    """
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum_cls)
        raise ValueError(
            f"{argument}={value!r} is not valid; expected one of {allowed}."
        ) from None
