"""Utilities: Kronecker matrices, feature extraction, metrics, enums, subnetwork masks,
diagonal SWAG, and the helpers of laplace-torch's ``laplace.utils`` (batches and
loaders, dense linear algebra, Gaussian samples, prior precisions, validation)."""

from laplace.data import SoDSampler
from laplace.utils._checks import _is_batchnorm, _is_valid_scalar
from laplace.utils.answer_tokens import AnswerTokenModel
from laplace.utils.batches import (
    batch_size,
    classification_targets,
    concatenate_rows,
    regression_targets,
    select_rows,
    split_batch,
    subset_loader,
    to_device,
    training_indices,
)
from laplace.utils.distributed import distributed_reduction
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
from laplace.utils.feature_extractor import FeatureExtractor
from laplace.utils.linalg import (
    block_diag,
    diagonal_add_scalar,
    invsqrt_precision,
    kron,
    symeig,
)
from laplace.utils.lowrank_factor import LowRankFactor
from laplace.utils.matrix import Kron, KronDecomposed
from laplace.utils.memory import (
    MemoryPlanError,
    available_memory,
    memory_limit,
    memory_plan,
)
from laplace.utils.metrics import RunningNLLMetric
from laplace.utils.prior_precision import (
    expand_prior_precision,
    fix_prior_prec_structure,
    parameters_per_layer,
)
from laplace.utils.sampling import draw_gaussian, normal_samples
from laplace.utils.state import preserve_model_gradients, same_configuration
from laplace.utils.subnetmask import (
    LargestMagnitudeSubnetMask,
    LargestVarianceDiagLaplaceSubnetMask,
    LargestVarianceSWAGSubnetMask,
    LastLayerSubnetMask,
    ModuleNameSubnetMask,
    ParamNameSubnetMask,
    RandomSubnetMask,
    ScoreBasedSubnetMask,
    SubnetMask,
)
from laplace.utils.swag import fit_diagonal_swag_var
from laplace.utils.validation import get_nll, validate

__all__ = [
    "AnswerTokenModel",
    "FeatureExtractor",
    "FeatureReduction",
    "FunctionalApproximation",
    "HessianStructure",
    "Kron",
    "KronDecomposed",
    "LargestMagnitudeSubnetMask",
    "LargestVarianceDiagLaplaceSubnetMask",
    "LargestVarianceSWAGSubnetMask",
    "LastLayerSubnetMask",
    "Likelihood",
    "LinkApprox",
    "LowRankFactor",
    "MemoryPlanError",
    "ModuleNameSubnetMask",
    "ParamNameSubnetMask",
    "PredType",
    "PriorStructure",
    "RandomSubnetMask",
    "RunningNLLMetric",
    "ScoreBasedSubnetMask",
    "SoDSampler",
    "SubnetMask",
    "SubsetOfWeights",
    "TuningMethod",
    "_is_batchnorm",
    "_is_valid_scalar",
    "available_memory",
    "batch_size",
    "block_diag",
    "classification_targets",
    "concatenate_rows",
    "diagonal_add_scalar",
    "distributed_reduction",
    "draw_gaussian",
    "expand_prior_precision",
    "fit_diagonal_swag_var",
    "fix_prior_prec_structure",
    "get_nll",
    "invsqrt_precision",
    "kron",
    "memory_limit",
    "memory_plan",
    "normal_samples",
    "parameters_per_layer",
    "preserve_model_gradients",
    "regression_targets",
    "same_configuration",
    "select_rows",
    "split_batch",
    "subset_loader",
    "symeig",
    "to_device",
    "training_indices",
    "validate",
]
