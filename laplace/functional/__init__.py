"""The GP (function-space) view of the linearized network: FunctionalLaplace.

- ``laplace.functional.kernel``: Jacobian inner products ``J J'^T`` from
  backpropagated factors, without forming Jacobians;
- ``laplace.functional.gp``: the symmetric system ``I + L^1/2 K L^1/2`` and its
  Cholesky and spectral factorizations;
- ``laplace.functional.base``: the classes.
"""

from laplace.functional.base import BaseFunctionalLaplace, FunctionalLaplace

__all__ = ["BaseFunctionalLaplace", "FunctionalLaplace"]
