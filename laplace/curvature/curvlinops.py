"""Curvature from Curvlinops, the default backend.

- ``kron`` of the GGN/EF (type-2 Fisher = exact GGN factors, Monte-Carlo with
  ``stochastic=True``, empirical for the EF): the same factors as Curvlinops'
  ``KFACLinearOperator`` from one batched backward pass of the output-Hessian factor
  (``laplace.curvature.backprop_factor.kfac_factors``); for models outside that
  route (a layer called twice) Curvlinops' ``KFACLinearOperator`` itself;
- ``full`` and ``diag`` of the GGN/EF: one backward pass of a factor of the output
  Hessian (``laplace.curvature.backprop_factor``), exact and far cheaper than
  multiplying Curvlinops' ``GGNLinearOperator`` with ``P`` unit vectors;
- ``full`` and ``diag`` of the Hessian: Curvlinops' ``HessianLinearOperator``
  applied to blocks of unit vectors.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import MutableMapping
from typing import Any

import torch

from laplace.curvature import backprop_factor
from laplace.curvature.curvature import (
    CurvatureInterface,
    EFInterface,
    GGNInterface,
    _OuterProductCurvature,
    import_library,
)
from laplace.curvature.kron_assembly import LayerFactors, assemble_kron, kfac_layers
from laplace.data import Inputs, batch_size
from laplace.utils.enums import Likelihood
from laplace.utils.matrix import Kron


def _curvlinops():
    return import_library("curvlinops", "curvlinops-for-pytorch", "Curvlinops")


class CurvlinopsInterface(CurvatureInterface):
    """Interface for the Curvlinops backend (https://github.com/f-dangel/curvlinops)."""

    supported_structures = frozenset({"full", "kron", "diag"})
    supports_dict_inputs = True
    #: Curvlinops' ``fisher_type`` of the Kronecker factors
    _fisher_type = "type-2"
    _seeds = itertools.count(2147483647, -1)

    def _library_inputs(self, x: Inputs, y: torch.Tensor):
        """Arguments shared by every Curvlinops operator for one batch."""
        module, inputs = self._target(x)
        kwargs: dict[str, Any] = {
            "check_deterministic": False,
            "num_data": batch_size(x, self.dict_key_x),
        }
        if isinstance(inputs, MutableMapping):
            key = self.dict_key_x
            kwargs["batch_size_fn"] = lambda batch: batch[key].shape[0]
        return module, inputs, kwargs

    def kron(self, x: Inputs, y: torch.Tensor, N: int, **kwargs: Any):
        self._check_structure("kron")
        self._check_batch(x, y)
        module, inputs, lib_kwargs = self._library_inputs(x, y)
        params = self.params
        layers = kfac_layers(module, params)
        found = self._kron_by_backprop(module, inputs, y, params, layers, N)
        if found is not None:
            return found
        y = self._checked_targets(module, inputs, y)
        stochastic = getattr(self, "stochastic", False)
        operator = _curvlinops().KFACLinearOperator(
            module,
            self.lossfunc,
            params,
            [(inputs, y)],
            fisher_type="mc" if stochastic else self._fisher_type,
            mc_samples=getattr(self, "num_samples", 1) if stochastic else 1,
            seed=next(self._seeds),
            separate_weight_and_bias=True,
            num_per_example_loss_terms=1,
            **lib_kwargs,
        )
        with _last_output(module) as output:
            operator.compute_kronecker_factors()
        state = operator.state_dict()
        G, A = state["gradient_covariances"], state["input_covariances"]
        # Curvlinops: A = batch mean of patches averaged over positions, G = sum of
        # gradient outer products of lossfunc, whereas our loss is factor * lossfunc.
        g_scale = self.factor**2 if self._fisher_type == "empirical" else self.factor
        M = lib_kwargs["num_data"]
        factors = {
            name: LayerFactors(G[name], A.get(name), g_scale, a_scale=M)
            for name, _ in layers
        }
        loss = self.lik.loss(output["f"], y)
        return loss, assemble_kron(params, layers, factors, N)

    def _kron_by_backprop(self, module, inputs, y, params, layers, N: int):
        """KFAC from one batched backward pass of the output-Hessian factor of the
        GGN / MC Fisher / EF (``backprop_factor.kfac_factors``): the factors of
        Curvlinops' ``KFACLinearOperator`` without its per-column passes. ``None``
        when the model is outside that route (then Curvlinops computes them)."""
        if not isinstance(self, _OuterProductCurvature):
            return None
        if self._is_linear_last_layer(module, inputs):
            # G = sum_n Lambda_n, A = phi^T phi: no factor per datum
            _, loss, (_, G) = self.last_layer_moments(module, inputs, y)
            A = inputs.T @ inputs if module.weight.requires_grad else None
            factors = {name: LayerFactors(G, A) for name, _ in layers}
            return loss, assemble_kron(params, layers, factors, N)
        targets: dict[str, torch.Tensor] = {}

        def factor(f):
            targets["y"] = self.lik.check_targets(f, y)
            return self._output_factor(f, targets["y"])

        found = backprop_factor.kfac_factors(module, params, inputs, factor)
        if found is None:
            return None
        f, per_module = found
        factors = {name: LayerFactors(*per_module[id(m)]) for name, m in layers}
        loss = self.lik.loss(f, targets["y"])
        return loss, assemble_kron(params, layers, factors, N)

    def _checked_targets(self, module, inputs, y: torch.Tensor) -> torch.Tensor:
        """Targets validated against the output shape, which is found by one forward
        pass on the first batch and remembered (the library makes its own pass)."""
        if getattr(self, "_output_shape", None) is None:
            with torch.no_grad():
                self._output_shape = module(inputs).shape[1:]
        f = torch.empty((len(y), *self._output_shape), device="meta")
        return self.lik.check_targets(f, y)


@contextlib.contextmanager
def _last_output(module: torch.nn.Module):
    """``{"f": output}`` of the last forward pass of ``module`` inside the context."""
    output: dict[str, torch.Tensor] = {}
    handle = module.register_forward_hook(
        lambda mod, inp, out: output.__setitem__("f", out.detach())
    )
    try:
        yield output
    finally:
        handle.remove()


class CurvlinopsGGN(CurvlinopsInterface, GGNInterface):
    """GGN (or Monte-Carlo Fisher with ``stochastic=True``) through Curvlinops."""


class CurvlinopsEF(CurvlinopsInterface, EFInterface):
    """Empirical Fisher through Curvlinops."""

    _fisher_type = "empirical"


class CurvlinopsHessian(CurvlinopsInterface):
    """The exact Hessian of the summed loss through Curvlinops (full and diag)."""

    supported_structures = frozenset({"full", "diag"})
    #: unit vectors multiplied per Hessian-matrix product (bounds memory at P x this)
    block_size = 512

    def _hessian_blocks(self, x: Inputs, y: torch.Tensor):
        """Summed loss, the indices of the columns, and a generator of
        ``(chunk, H[:, chunk])`` column blocks over them."""
        module, inputs, lib_kwargs = self._library_inputs(x, y)
        params = self.params
        indices = self._indices()
        with torch.no_grad():
            f = module(inputs)
        y = self.lik.check_targets(f, y)
        operator = _curvlinops().HessianLinearOperator(
            module, self.lossfunc, params, [(inputs, y)], **lib_kwargs
        )
        P = sum(p.numel() for p in params)
        ref = params[0]

        def blocks():
            for chunk in indices.split(self.block_size):
                E = torch.zeros(P, len(chunk), dtype=ref.dtype, device=ref.device)
                E[chunk, torch.arange(len(chunk), device=ref.device)] = 1.0
                yield chunk, self.factor * (operator @ E)

        return self.lik.loss(f, y), indices, blocks()

    def _indices(self) -> torch.Tensor:
        if self.subnetwork_indices is not None:
            return torch.as_tensor(self.subnetwork_indices)
        P = sum(p.numel() for p in self.params)
        return torch.arange(P, device=self.params[0].device)

    def full(self, x: Inputs, y: torch.Tensor, **kwargs: Any):
        self._check_structure("full")
        self._check_batch(x, y)
        loss, idx, blocks = self._hessian_blocks(x, y)
        H = torch.cat([columns[idx] for _, columns in blocks], dim=1)
        return loss, (H + H.T) / 2

    def diag(self, x: Inputs, y: torch.Tensor, **kwargs: Any):
        self._check_structure("diag")
        self._check_batch(x, y)
        loss, idx, blocks = self._hessian_blocks(x, y)
        cols = torch.arange(len(idx), device=idx.device)
        diag = [columns[chunk, cols[: len(chunk)]] for chunk, columns in blocks]
        return loss, torch.cat(diag)


__all__ = [
    "CurvlinopsInterface",
    "CurvlinopsGGN",
    "CurvlinopsEF",
    "CurvlinopsHessian",
    # laplace-torch's module-level names
    "CurvatureInterface",
    "EFInterface",
    "GGNInterface",
    "Kron",
    "Likelihood",
]
