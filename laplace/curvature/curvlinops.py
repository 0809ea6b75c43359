"""Curvature from Curvlinops (https://github.com/f-dangel/curvlinops).

Every structure is computed by Curvlinops' public linear operators:

- ``full`` and ``diag``: the operator of the curvature (``GGNLinearOperator``, or
  ``FisherMCLinearOperator`` with ``stochastic=True``; ``EFLinearOperator``;
  ``HessianLinearOperator``) multiplied with blocks of ``block_size`` unit vectors,
  only those of the selected ``subnetwork_indices`` when given; ``diag`` keeps the
  diagonal of each block (Curvlinops' diagonal estimators, ``hutchinson_diag`` and
  ``xdiag``, are stochastic). This costs one operator product per parameter (per
  selected entry): exact, but slower than one backward pass of an output-Hessian
  factor.
- ``kron``: ``KFACLinearOperator`` with ``fisher_type`` ``'type-2'`` (the exact GGN
  factors), ``'mc'`` (``stochastic=True``) or ``'empirical'`` (EF).

The module and inputs are those of ``_target``: the model, or for the last layer
the last ``nn.Linear`` (``PairedLinear`` for reward modeling) on its features.

Curvlinops works with the sum-reduced ``lossfunc`` (``MSELoss`` for regression);
the curvature of the loss ``factor * lossfunc`` is ``factor`` times its GGN, Monte-
Carlo Fisher and Hessian and ``factor**2`` times its empirical Fisher. Monte-Carlo
samples are drawn by Curvlinops' generator, seeded once per batch from ``generator``
(or torch's default generator when None), so a seed reproduces them.

Likelihoods: Curvlinops' operators and KFAC know ``MSELoss``,
``CrossEntropyLoss`` and ``BCEWithLogitsLoss`` ('binary', 'multilabel'). The GGN
(``full``, ``diag`` and type-2 ``kron``) of any other likelihood is that of
``MSELoss`` on the whitened outputs ``g = L^T f``, ``L`` the likelihood's
output-Hessian factor at the current outputs, held constant: ``J_g^T J_g = J^T L
L^T J``, and KFAC backpropagates the columns of ``L``. (Curvlinops' GGN of the loss
module itself would use the loss's Hessian in the outputs, which for a user's
likelihood may differ from the ``Lambda`` it gives, e.g. its Fisher.) Its Hessian
operator differentiates any loss module. The Monte-Carlo and empirical Fisher of
the other likelihoods are refused up front.
"""

from __future__ import annotations

import contextlib
from collections.abc import MutableMapping
from typing import Any

import torch

from laplace.curvature.curvature import (
    CurvatureInterface,
    EFInterface,
    GGNInterface,
    import_library,
)
from laplace.curvature.kron_assembly import LayerFactors, assemble_kron, kfac_layers
from laplace.data import Inputs, batch_size
from laplace.likelihood import OutputLikelihood
from laplace.utils.enums import Likelihood
from laplace.utils.matrix import Kron

#: the losses Curvlinops' KFAC, Monte-Carlo Fisher and empirical Fisher know
LIBRARY_LOSSES = (
    torch.nn.MSELoss,
    torch.nn.CrossEntropyLoss,
    torch.nn.BCEWithLogitsLoss,
)
_KNOWN = "MSELoss, CrossEntropyLoss and BCEWithLogitsLoss"


def _curvlinops():
    return import_library("curvlinops", "curvlinops-for-pytorch", "Curvlinops")


def _library_seed(generator: torch.Generator | None) -> int:
    """A seed for the library's own random generator, drawn from ``generator``
    (torch's default generator when None): seeding either reproduces the Monte-Carlo
    samples, and every call draws fresh ones."""
    if generator is None:
        return int(torch.randint(2**62, ()))
    return int(torch.randint(2**62, (), generator=generator, device=generator.device))


class CurvlinopsInterface(CurvatureInterface):
    """Interface for the Curvlinops backend (https://github.com/f-dangel/curvlinops).

    Subclasses say which operator gives ``full`` and ``diag`` (``_operator_spec``)
    and which Fisher type gives ``kron`` (``_kfac_spec``).
    """

    supported_structures = frozenset({"full", "kron", "diag"})
    supports_dict_inputs = True
    #: unit vectors multiplied per operator product (bounds memory at P x this)
    block_size = 512

    @classmethod
    def check_likelihood(cls, likelihood, structure, stochastic) -> None:
        super().check_likelihood(likelihood, structure, stochastic)
        if likelihood.library_loss in LIBRARY_LOSSES:
            return
        if issubclass(cls, EFInterface):
            cls._refuse_likelihood(likelihood, "the empirical Fisher", _KNOWN)
        if stochastic:
            cls._refuse_likelihood(likelihood, "the Monte-Carlo Fisher", _KNOWN)

    @property
    def _whitened(self) -> bool:
        """Whether the GGN is that of ``MSELoss`` on the whitened outputs (a loss
        Curvlinops does not know; see the module docstring)."""
        return isinstance(self, GGNInterface) and not isinstance(
            self.lossfunc, LIBRARY_LOSSES
        )

    def _operator_spec(self) -> tuple[str, dict[str, Any], float]:
        """Name of the Curvlinops operator of ``full`` and ``diag``, its extra
        arguments, and the factor from its curvature of ``lossfunc`` to ours."""
        raise NotImplementedError

    def _kfac_spec(self) -> tuple[dict[str, Any], float]:
        """``KFACLinearOperator``'s ``fisher_type``, ``mc_samples`` and ``seed``, and
        the factor from its gradient covariances of ``lossfunc`` to ours."""
        raise NotImplementedError

    def _library_inputs(self, x: Inputs, y: torch.Tensor):
        """The module, its inputs and the arguments shared by every Curvlinops
        operator for one batch."""
        module, inputs = self._target(x)
        kwargs: dict[str, Any] = {
            "check_deterministic": False,
            "num_data": batch_size(x, self.dict_key_x),
        }
        if isinstance(inputs, MutableMapping):
            key = self.dict_key_x
            kwargs["batch_size_fn"] = lambda batch: batch[key].shape[0]
        return module, inputs, kwargs

    # -- full and diag: the operator on blocks of unit vectors -----------------------
    def _column_blocks(self, x: Inputs, y: torch.Tensor):
        """Summed loss, the indices of the columns, and a generator of
        ``(chunk, H[:, chunk])`` over consecutive chunks of them."""
        module, inputs, lib_kwargs = self._library_inputs(x, y)
        params = self.params
        with torch.no_grad():
            f = module(inputs)
        y = self.lik.check_targets(f, y)
        name, options, scale = self._operator_spec()
        op_module, lossfunc, targets = module, self.lossfunc, y
        if self._whitened:
            op_module = _WhitenedOutputs(module, self.lik)
            lossfunc, scale = torch.nn.MSELoss(reduction="sum"), 0.5
            with torch.no_grad():
                targets = torch.zeros_like(op_module(inputs))
        operator = getattr(_curvlinops(), name)(
            op_module, lossfunc, params, [(inputs, targets)], **options, **lib_kwargs
        )
        ref = params[0]
        P = sum(p.numel() for p in params)
        if self.subnetwork_indices is None:
            indices = torch.arange(P, device=ref.device)
        else:
            indices = torch.as_tensor(self.subnetwork_indices, device=ref.device)

        def blocks():
            for chunk in indices.split(self.block_size):
                E = torch.zeros(P, len(chunk), dtype=ref.dtype, device=ref.device)
                E[chunk, torch.arange(len(chunk), device=ref.device)] = 1.0
                yield chunk, (operator @ E).mul_(scale)

        return self.lik.loss(f, y), indices, blocks()

    def full(self, x: Inputs, y: torch.Tensor, **kwargs: Any):
        self._check_structure("full")
        self._check_batch(x, y)
        loss, idx, blocks = self._column_blocks(x, y)
        H = None
        start = 0
        for chunk, columns in blocks:
            if H is None:
                H = columns.new_empty(len(idx), len(idx))
            H[:, start : start + len(chunk)] = columns[idx]
            start += len(chunk)
        return loss, (H + H.T) / 2

    def diag(self, x: Inputs, y: torch.Tensor, **kwargs: Any):
        self._check_structure("diag")
        self._check_batch(x, y)
        loss, idx, blocks = self._column_blocks(x, y)
        cols = torch.arange(min(len(idx), self.block_size), device=idx.device)
        diag = [columns[chunk, cols[: len(chunk)]] for chunk, columns in blocks]
        return loss, torch.cat(diag)

    # -- kron: KFACLinearOperator ---------------------------------------------------
    def kron(self, x: Inputs, y: torch.Tensor, N: int, **kwargs: Any):
        self._check_structure("kron")
        self._check_batch(x, y)
        module, inputs, lib_kwargs = self._library_inputs(x, y)
        params = self.params
        y = self._checked_targets(module, inputs, y)
        options, g_scale = self._kfac_spec()
        kfac_module, lossfunc, targets = module, self.lossfunc, y
        if self._whitened:
            kfac_module = _WhitenedOutputs(module, self.lik)
            lossfunc, g_scale = torch.nn.MSELoss(reduction="sum"), 0.5
            with torch.no_grad():
                targets = torch.zeros_like(kfac_module(inputs))
        layers = kfac_layers(kfac_module, params)
        operator = _curvlinops().KFACLinearOperator(
            kfac_module,
            lossfunc,
            params,
            [(inputs, targets)],
            separate_weight_and_bias=True,
            num_per_example_loss_terms=1,
            **options,
            **lib_kwargs,
        )
        with _last_output(module) as output, torch.enable_grad():
            operator.compute_kronecker_factors()
        state = operator.state_dict()
        G, A = state["gradient_covariances"], state["input_covariances"]
        # Curvlinops: G = sum over the batch (and positions, averaged over MC
        # samples) of gradient outer products of lossfunc, A = batch mean of the
        # inputs (patches) averaged over positions
        M = lib_kwargs["num_data"]
        factors = {
            name: LayerFactors(G[name], A.get(name), g_scale, a_scale=M)
            for name, _ in layers
        }
        loss = self.lik.loss(output["f"], y)
        return loss, assemble_kron(params, layers, factors, N)

    def _checked_targets(self, module, inputs, y: torch.Tensor) -> torch.Tensor:
        """Targets validated against the output shape, which is found by one forward
        pass on the first batch and remembered (the library makes its own pass)."""
        if getattr(self, "_output_shape", None) is None:
            with torch.no_grad():
                f = module(inputs)
            self._output_shape, self._output_dtype = f.shape[1:], f.dtype
        f = torch.empty(
            (len(y), *self._output_shape), dtype=self._output_dtype, device="meta"
        )
        return self.lik.check_targets(f, y)


class _WhitenedOutputs(torch.nn.Module):
    """``g = L(f)^T f`` ``(N, K)`` for outputs ``f = module(x)`` ``(N, C)`` and the
    likelihood's output-Hessian factor ``L`` ``(N, C, K)`` at ``f``, held constant:
    the GGN of ``0.5 ||g - y||^2`` is ``J^T L L^T J``."""

    def __init__(self, module: torch.nn.Module, likelihood: OutputLikelihood) -> None:
        super().__init__()
        self.module = module
        self.likelihood = likelihood

    def forward(self, x):
        f = self.module(x)
        L = self.likelihood.hessian_sqrt(f.detach())
        return torch.einsum("nck,nc->nk", L, f)


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
    """GGN through Curvlinops' ``GGNLinearOperator`` and type-2 KFAC; with
    ``stochastic=True`` the Monte-Carlo Fisher of ``num_samples`` targets per datum
    (``FisherMCLinearOperator``, KFAC of type ``'mc'``)."""

    def _operator_spec(self):
        if self.stochastic:
            options = {
                "mc_samples": self.num_samples,
                "seed": _library_seed(self.generator),
            }
            return "FisherMCLinearOperator", options, self.factor
        return "GGNLinearOperator", {}, self.factor

    def _kfac_spec(self):
        if self.stochastic:
            options = {
                "fisher_type": "mc",
                "mc_samples": self.num_samples,
                "seed": _library_seed(self.generator),
            }
            return options, self.factor
        return {"fisher_type": "type-2"}, self.factor


class CurvlinopsEF(CurvlinopsInterface, EFInterface):
    """Empirical Fisher through Curvlinops' ``EFLinearOperator`` and empirical
    KFAC."""

    def _operator_spec(self):
        return "EFLinearOperator", {}, self.factor**2

    def _kfac_spec(self):
        return {"fisher_type": "empirical"}, self.factor**2


class CurvlinopsHessian(CurvlinopsInterface):
    """The exact Hessian of the summed loss through Curvlinops'
    ``HessianLinearOperator`` (full and diag)."""

    supported_structures = frozenset({"full", "diag"})

    def _operator_spec(self):
        return "HessianLinearOperator", {}, self.factor


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
