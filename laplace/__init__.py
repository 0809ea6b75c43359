"""laplace: post-hoc Laplace approximations for PyTorch networks.

The curvature layer (:mod:`laplace.curvature`) and the Kronecker matrices
(:mod:`laplace.utils.matrix`) are in place; the Laplace classes build on them.
"""

from laplace.utils.enums import (
    FeatureReduction,
    FunctionalApproximation,
    HessianStructure,
    Likelihood,
    LinkApprox,
    PredType,
    PriorStructure,
    SubsetOfWeights,
    TuningMethod,
)

__version__ = "0.1.0"

__all__ = [
    "FeatureReduction",
    "FunctionalApproximation",
    "HessianStructure",
    "Likelihood",
    "LinkApprox",
    "PredType",
    "PriorStructure",
    "SubsetOfWeights",
    "TuningMethod",
]
