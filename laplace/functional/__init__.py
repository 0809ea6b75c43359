"""The GP (function-space) view of the linearized network.

- ``laplace.functional.kernel``: Jacobian inner products ``J J'^T`` from
  backpropagated factors, without forming Jacobians;
- ``laplace.functional.gp``: the symmetric system ``I + L^1/2 K L^1/2`` and its
  Cholesky and spectral factorizations;
- ``laplace.functional.base``: FunctionalLaplace, GP inference on a subset of data;
- ``laplace.functional.nystrom`` and ``laplace.functional.ella``: ELLA's Nyström
  features;
- ``laplace.functional.inducing`` and ``laplace.functional.valla``: VaLLA's
  variational inducing outputs;
- ``laplace.functional.scalable``: what ELLA and VaLLA share.
"""

from laplace.functional.base import BaseFunctionalLaplace, FunctionalLaplace
from laplace.functional.ella import ELLA
from laplace.functional.valla import VaLLA

__all__ = ["BaseFunctionalLaplace", "FunctionalLaplace", "ELLA", "VaLLA"]
