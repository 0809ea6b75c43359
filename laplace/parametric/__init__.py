"""Parametric Laplace approximations: a Gaussian over the weights, one module per
structure of the posterior precision."""

from laplace.parametric.base import ParametricLaplace
from laplace.parametric.diag import DiagLaplace
from laplace.parametric.full import FullLaplace
from laplace.parametric.kron import KronLaplace
from laplace.parametric.lowrank import LowRankLaplace

__all__ = [
    "ParametricLaplace",
    "FullLaplace",
    "KronLaplace",
    "DiagLaplace",
    "LowRankLaplace",
]
