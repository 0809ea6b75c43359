"""Names laplace-torch's curvature modules expose, defined without importing the
optional libraries: ASDL's option strings (equal to ``asdl.FISHER_EXACT`` etc. of
asdfghjkl 0.1a4, checked in ``tests/test_utils_api.py``) and ``EPS``."""

#: laplace-torch's small constant of its ASDL-based backends
EPS = 1e-6

# ASDL's Fisher types, loss types and curvature shapes
FISHER_EXACT = "fisher_exact"
FISHER_MC = "fisher_mc"
FISHER_EMP = "fisher_emp"
LOSS_CROSS_ENTROPY = "cross_entropy"
LOSS_MSE = "mse"
SHAPE_FULL = "full"
SHAPE_KRON = "kron"
SHAPE_DIAG = "diag"

__all__ = [
    "EPS",
    "FISHER_EMP",
    "FISHER_EXACT",
    "FISHER_MC",
    "LOSS_CROSS_ENTROPY",
    "LOSS_MSE",
    "SHAPE_DIAG",
    "SHAPE_FULL",
    "SHAPE_KRON",
]
