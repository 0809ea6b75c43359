"""Predictive distributions: link approximations of the GLM predictive."""

from laplace.predictive.links import (
    LINKS,
    SAMPLING_LINKS,
    bridge,
    bridge_norm,
    condition_sum_zero,
    dirichlet_from_gaussian,
    link,
    marginal_variances,
    mc,
    mc_gaussian,
    probit,
    sample_outputs,
)

__all__ = [
    "LINKS",
    "SAMPLING_LINKS",
    "bridge",
    "bridge_norm",
    "condition_sum_zero",
    "dirichlet_from_gaussian",
    "link",
    "marginal_variances",
    "mc",
    "mc_gaussian",
    "probit",
    "sample_outputs",
]
