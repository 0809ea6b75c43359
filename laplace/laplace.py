"""The ``Laplace()`` factory: one explicit table from ``(subset_of_weights,
hessian_structure)`` to the class that implements it."""

from __future__ import annotations

from typing import Any

from torch import nn

from laplace.baselaplace import BaseLaplace
from laplace.functional import ELLA, FunctionalLaplace, VaLLA
from laplace.lllaplace import (
    DiagLLLaplace,
    FullLLLaplace,
    FunctionalLLLaplace,
    KronLLLaplace,
)
from laplace.parametric import DiagLaplace, FullLaplace, KronLaplace, LowRankLaplace
from laplace.subnetlaplace import DiagSubnetLaplace, FullSubnetLaplace
from laplace.utils.enums import (
    FunctionalApproximation,
    HessianStructure,
    Likelihood,
    SubsetOfWeights,
    parse_enum,
)

#: ``(subset_of_weights, hessian_structure) -> class``
REGISTRY: dict[tuple[SubsetOfWeights, HessianStructure], type[BaseLaplace]] = {
    (SubsetOfWeights.ALL, HessianStructure.FULL): FullLaplace,
    (SubsetOfWeights.ALL, HessianStructure.KRON): KronLaplace,
    (SubsetOfWeights.ALL, HessianStructure.DIAG): DiagLaplace,
    (SubsetOfWeights.ALL, HessianStructure.LOWRANK): LowRankLaplace,
    (SubsetOfWeights.ALL, HessianStructure.GP): FunctionalLaplace,
    (SubsetOfWeights.LAST_LAYER, HessianStructure.FULL): FullLLLaplace,
    (SubsetOfWeights.LAST_LAYER, HessianStructure.KRON): KronLLLaplace,
    (SubsetOfWeights.LAST_LAYER, HessianStructure.DIAG): DiagLLLaplace,
    (SubsetOfWeights.LAST_LAYER, HessianStructure.GP): FunctionalLLLaplace,
    (SubsetOfWeights.SUBNETWORK, HessianStructure.FULL): FullSubnetLaplace,
    (SubsetOfWeights.SUBNETWORK, HessianStructure.DIAG): DiagSubnetLaplace,
}


#: ``functional_approximation -> class`` of ``hessian_structure='gp'`` beyond the
#: subset of data (whose class is the REGISTRY's), all weights only
FUNCTIONAL_APPROXIMATIONS: dict[FunctionalApproximation, type[BaseLaplace]] = {
    FunctionalApproximation.NYSTROM: ELLA,
    FunctionalApproximation.VARIATIONAL: VaLLA,
}


def register(
    subset_of_weights: SubsetOfWeights | str,
    hessian_structure: HessianStructure | str,
    cls: type[BaseLaplace],
) -> None:
    """Add ``cls`` to the table of ``Laplace``."""
    key = (
        parse_enum(SubsetOfWeights, subset_of_weights, "subset_of_weights"),
        parse_enum(HessianStructure, hessian_structure, "hessian_structure"),
    )
    REGISTRY[key] = cls


def Laplace(
    model: nn.Module,
    likelihood: Likelihood | str,
    subset_of_weights: SubsetOfWeights | str = SubsetOfWeights.LAST_LAYER,
    hessian_structure: HessianStructure | str = HessianStructure.KRON,
    *args: Any,
    functional_approximation: FunctionalApproximation
    | str = FunctionalApproximation.SOD,
    **kwargs: Any,
) -> BaseLaplace:
    """Build the Laplace approximation for a subset of weights and a structure.

    Parameters
    ----------
    model : torch.nn.Module
    likelihood : {'classification', 'regression', 'reward_modeling'}
    subset_of_weights : {'last_layer', 'subnetwork', 'all'}, default='last_layer'
    hessian_structure : {'full', 'kron', 'diag', 'lowrank', 'gp'}, default='kron'
    *args, **kwargs
        passed to the class (see ``laplace.baselaplace.BaseLaplace``).
    functional_approximation : {'sod', 'nystrom', 'variational'}, default='sod'
        the function-space method of ``hessian_structure='gp'``: 'sod' is
        ``FunctionalLaplace`` (all weights, needs ``n_subset``) or
        ``FunctionalLLLaplace`` (last layer); 'nystrom' is ``ELLA`` (needs
        ``subsample_size`` and ``n_eigenvalues``) and 'variational' is ``VaLLA``
        (needs ``inducing_locations``), both for all weights.

    Raises
    ------
    ValueError
        for a combination without an implementation, listing the valid ones.
    """
    subset = parse_enum(SubsetOfWeights, subset_of_weights, "subset_of_weights")
    structure = parse_enum(HessianStructure, hessian_structure, "hessian_structure")
    approximation = parse_enum(
        FunctionalApproximation, functional_approximation, "functional_approximation"
    )
    if approximation != FunctionalApproximation.SOD:
        if structure != HessianStructure.GP:
            raise ValueError(
                f"functional_approximation={approximation.value!r} is a method of "
                "hessian_structure='gp'; got hessian_structure="
                f"{structure.value!r}."
            )
        if subset != SubsetOfWeights.ALL:
            raise ValueError(
                f"functional_approximation={approximation.value!r} treats all "
                f"weights: use subset_of_weights='all', not {subset.value!r}."
            )
        return FUNCTIONAL_APPROXIMATIONS[approximation](
            model, likelihood, *args, **kwargs
        )
    cls = REGISTRY.get((subset, structure))
    if cls is None:
        valid = ", ".join(
            f"({s.value!r}, {h.value!r})" for s, h in sorted(REGISTRY, key=str)
        )
        raise ValueError(
            f"No Laplace approximation for subset_of_weights={subset.value!r} with "
            f"hessian_structure={structure.value!r}; valid combinations: {valid}."
        )
    return cls(model, likelihood, *args, **kwargs)


__all__ = [
    "Laplace",
    "REGISTRY",
    "FUNCTIONAL_APPROXIMATIONS",
    "register",
    # laplace-torch's module-level names
    "BaseLaplace",
    "ELLA",
    "VaLLA",
    "FunctionalApproximation",
    "HessianStructure",
    "Likelihood",
    "SubsetOfWeights",
]
