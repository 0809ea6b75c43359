"""laplace-torch's ``laplace.utils.utils``: the module path of its helpers, each
implemented in the module of its responsibility."""

from laplace.data import SoDSampler
from laplace.utils.linalg import (
    block_diag,
    diagonal_add_scalar,
    invsqrt_precision,
    kron,
    symeig,
)
from laplace.utils.prior_precision import (
    expand_prior_precision,
    fix_prior_prec_structure,
    parameters_per_layer,
)
from laplace.utils.validation import get_nll, validate

__all__ = [
    "SoDSampler",
    "block_diag",
    "diagonal_add_scalar",
    "expand_prior_precision",
    "fix_prior_prec_structure",
    "get_nll",
    "invsqrt_precision",
    "kron",
    "parameters_per_layer",
    "symeig",
    "validate",
]
