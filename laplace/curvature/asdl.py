"""Curvature from ASDL (being written)."""

from laplace.curvature.curvature import CurvatureInterface, EFInterface, GGNInterface


class AsdlInterface(CurvatureInterface):
    pass


class AsdlGGN(AsdlInterface, GGNInterface):
    pass


class AsdlEF(AsdlInterface, EFInterface):
    pass


class AsdlHessian(AsdlInterface):
    pass
