"""Curvature from BackPACK (being written)."""

from laplace.curvature.curvature import CurvatureInterface, EFInterface, GGNInterface


class BackPackInterface(CurvatureInterface):
    supports_dict_inputs = False


class BackPackGGN(BackPackInterface, GGNInterface):
    pass


class BackPackEF(BackPackInterface, EFInterface):
    pass
