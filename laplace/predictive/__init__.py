"""Predictive distributions: link approximations of the GLM predictive."""

from laplace.predictive.links import (
    LINKS,
    SAMPLING_LINKS,
    bridge,
    bridge_norm,
    condition_sum_zero,
    dirichlet_from_gaussian,
    link,
    lognormal_moments,
    marginal_variances,
    mc,
    mc_gaussian,
    natural_gaussian_moments,
    probit,
    sample_outputs,
    sigmoid_mc,
    sigmoid_probit,
)

__all__ = [
    "LINKS",
    "SAMPLING_LINKS",
    "bridge",
    "bridge_norm",
    "condition_sum_zero",
    "dirichlet_from_gaussian",
    "link",
    "lognormal_moments",
    "marginal_variances",
    "mc",
    "mc_gaussian",
    "natural_gaussian_moments",
    "probit",
    "sample_outputs",
    "sigmoid_mc",
    "sigmoid_probit",
]
