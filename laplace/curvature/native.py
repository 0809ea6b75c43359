"""The library's own backend: the curvature engine (``laplace.curvature.engine``).

``NativeGGN`` (exact GGN, or the Monte-Carlo Fisher with ``stochastic=True``) and
``NativeEF`` compute every structure with module hooks, one batched backward pass of
a factor of the output Hessian and the per-module rules of
``laplace.curvature.rules``: no Jacobian, no forward-mode AD, and no ``vmap`` over
the user's model. They are the default backend.

KFAC on layers shared over positions (sequences, convolutions) is KFAC-expand by
default; ``kfac_approx='reduce'`` sums the output gradients and averages the inputs
over the positions of each example first (Eschenhagen et al., 2023).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from laplace.curvature import engine, structures
from laplace.curvature.curvature import (
    CurvatureInterface,
    EFInterface,
    GGNInterface,
)
from laplace.curvature.kron_assembly import LayerFactors, assemble_kron, kfac_layers
from laplace.data import Inputs
from laplace.utils.enums import Likelihood
from laplace.utils.lowrank_factor import LowRankSpec
from laplace.utils.matrix import Kron


class NativeInterface(CurvatureInterface):
    """The curvature engine as a backend (full, Kronecker-factored and diagonal).

    Parameters
    ----------
    kfac_approx : {'expand', 'reduce'}, default='expand'
        how KFAC treats a weight shared over positions (see the module docstring).

    See ``CurvatureInterface`` for the other parameters.
    """

    supported_structures: ClassVar[frozenset[str]] = frozenset({"full", "kron", "diag"})
    supports_dict_inputs: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        kfac_approx: str = "expand",
        **kwargs: Any,
    ) -> None:
        if kfac_approx not in structures.KFAC_APPROXIMATIONS:
            raise ValueError(
                f"kfac_approx must be one of {structures.KFAC_APPROXIMATIONS}; got "
                f"{kfac_approx!r}."
            )
        super().__init__(
            model,
            likelihood,
            last_layer,
            subnetwork_indices,
            dict_key_x,
            dict_key_y,
            **kwargs,
        )
        self.kfac_approx = kfac_approx
        self._warned = False

    def structure_table(self) -> list[dict[str, str]]:
        """One row per parameter: the module(s) and rule(s) that serve it and the
        block it gets in a Kronecker-factored curvature."""
        module = self.model.last_layer if self.last_layer else self.model
        return engine.structure_table(module, self.params)

    def _warn_once(self, module: nn.Module | None) -> None:
        if not self._warned and not self.last_layer:
            self._warned = True
            engine.warn_fallbacks(module, self.params)

    #: ``kron(..., into=H)`` adds the batch's factors into ``H`` in place
    accumulates_kron: ClassVar[bool] = True
    #: ``kron(..., low_rank=spec)`` builds low-rank factors from the side vectors
    builds_low_rank_kron: ClassVar[bool] = True

    def kron(
        self,
        x: Inputs,
        y: torch.Tensor,
        N: int,
        into: Kron | None = None,
        low_rank: LowRankSpec | None = None,
        **kwargs,
    ):
        """Kronecker-factored curvature of the batch (see ``CurvatureInterface``);
        with ``into``, a ``Kron`` of the same layout (an earlier batch's), the
        batch's factors are added to it in place and it is returned. With
        ``low_rank`` the factors it applies to are ``LowRankFactor``s built from
        the side vectors (``engine.kron_by_columns``); a linear last layer's
        output-side factor, formed from the output moments ``(C, C)``, is
        truncated."""
        self._check_structure("kron")
        self._check_batch(x, y)
        if N <= 0:
            raise ValueError(f"N must be the positive size of the data set; got {N}.")
        module, inputs = self._target(x)
        params = self.params
        if self._is_linear_last_layer(module, inputs):
            # G = sum_n Lambda_n, A = phi^T phi: no factor per datum
            layers = kfac_layers(module, params)
            _, loss, (_, G) = self.last_layer_moments(module, inputs, y)
            A = None
            if module.weight.requires_grad:
                A = inputs.T @ inputs if low_rank is None else low_rank.gram(inputs)
            if low_rank is not None:
                G = low_rank.truncate(G)
            factors = {name: LayerFactors(G, A) for name, _ in layers}
            K = assemble_kron(params, layers, factors, N)
            if into is not None:
                into += K
                return loss, into
            return loss, K
        self._warn_once(module)
        targets: dict[str, torch.Tensor] = {}

        def factor(f):
            targets["y"] = self.lik.check_targets(f, y)
            return self._output_factor(f, targets["y"])

        recording = engine.record(module, params, inputs)
        M = factor(recording.f.detach())
        loss = self.lik.loss(recording.outputs, targets["y"])
        approx = self.kfac_approx
        if into is not None:
            engine.kron_by_columns(recording, M, N, approx, into.kfacs, low_rank)
            return loss, into
        return loss, Kron(
            engine.kron_by_columns(recording, M, N, approx, None, low_rank)
        )

    def full(self, x: Inputs, y: torch.Tensor, **kwargs: Any):
        self._warn_once(self._target_module())
        return super().full(x, y, **kwargs)

    def diag(self, x: Inputs, y: torch.Tensor, **kwargs: Any):
        self._warn_once(self._target_module())
        return super().diag(x, y, **kwargs)

    def _target_module(self) -> nn.Module | None:
        return None if self.last_layer else self.model


class NativeGGN(NativeInterface, GGNInterface):
    """GGN (or the Monte-Carlo Fisher with ``stochastic=True``) from the curvature
    engine: the default backend."""


class NativeEF(NativeInterface, EFInterface):
    """Empirical Fisher from the curvature engine."""


__all__ = ["NativeInterface", "NativeGGN", "NativeEF"]
