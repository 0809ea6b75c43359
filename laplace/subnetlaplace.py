r"""Subnetwork Laplace: a Gaussian over chosen entries of the weight vector.

The posterior is ``N(theta_S, P_S^-1)`` over the entries ``S`` of the weight vector
(``subnetwork_indices``), with ``P_S = factor * H_SS + diag(p0_S)``: the curvature of
the selected entries only, computed without a ``(P, P)`` matrix or ``(N, C, P)``
Jacobian (only the selected columns of the per-example vectors are formed). Every
other weight stays at its MAP value: in samples, in both predictives and in the
evidence, whose scatter and log determinant run over ``S``. Select the entries with
the masks of ``laplace.utils.subnetmask``.

Indices, ``mean`` and samples refer to the flattened vector of **all** the model's
parameters, ``parameters_to_vector(model.parameters())``, the numbering of the masks
(``laplace.utils.subnetmask``); selected entries must require grad. (With frozen
parameters laplace-torch numbers its subnetwork by the trainable ones only, and its
masks by all: here both use all.)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from laplace.curvature import backprop_factor
from laplace.curvature.curvature import CurvatureInterface
from laplace.data import Inputs
from laplace.parametric.base import GLMTerms, ParametricLaplace
from laplace.parametric.diag import DiagLaplace
from laplace.parametric.full import FullLaplace
from laplace.parametric.precision import DiagPrecision
from laplace.utils._checks import check_n_samples
from laplace.utils.enums import Likelihood

Tensor = torch.Tensor


class SubnetLaplace(ParametricLaplace):
    """Base class of the subnetwork Laplace approximations.

    Parameters
    ----------
    model : torch.nn.Module
    likelihood : str or laplace.likelihood.OutputLikelihood
        any likelihood but 'reward_modeling' (see ``laplace.likelihood``).
    subnetwork_indices : torch.LongTensor ``(S,)``
        distinct entries of ``parameters_to_vector(model.parameters())`` to treat,
        each of a parameter that requires grad; the posterior's rows and columns
        follow their order.
    sigma_noise, prior_precision, prior_mean, temperature, backend, backend_kwargs,
    asdl_fisher_kwargs, enable_backprop, dict_key_x, dict_key_y
        as ``laplace.baselaplace.BaseLaplace``; the prior precision may be a
        scalar, one value per parameter tensor or one per weight (all weights; the
        entries of ``S`` are used); "all" counts every parameter of the model.

    Attributes
    ----------
    mean : the MAP of all weights ``(n_params,)``; ``mean_subnet`` its entries
        ``S``. ``H``, the posterior precision and ``posterior_variance`` are over
        ``S``; samples are of all weights, those outside ``S`` at the MAP.
    """

    supports_reward_modeling = False

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        subnetwork_indices: torch.LongTensor,
        sigma_noise: float | Tensor = 1.0,
        prior_precision: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        temperature: float = 1.0,
        backend: type[CurvatureInterface] | None = None,
        backend_kwargs: dict[str, Any] | None = None,
        asdl_fisher_kwargs: dict[str, Any] | None = None,
        enable_backprop: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        curvature_dtype: torch.dtype | None = None,
    ) -> None:
        self.subnetwork_indices = _as_indices(subnetwork_indices)
        super().__init__(
            model,
            likelihood,
            sigma_noise=sigma_noise,
            prior_precision=prior_precision,
            prior_mean=prior_mean,
            temperature=temperature,
            enable_backprop=enable_backprop,
            dict_key_x=dict_key_x,
            dict_key_y=dict_key_y,
            backend=backend,
            backend_kwargs=backend_kwargs,
            asdl_fisher_kwargs=asdl_fisher_kwargs,
            curvature_dtype=curvature_dtype,
        )

    def _select_params(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def _on_bind(self) -> None:
        super()._on_bind()
        idx = self.subnetwork_indices.to(self._device)
        if int(idx.max()) >= self.n_params:
            raise ValueError(
                f"subnetwork_indices must lie in [0, {self.n_params}) (the number of "
                f"weights of the model); got {int(idx.max())}."
            )
        # the curvature and Jacobians are taken over the trainable parameters only:
        # the selected entries' positions among those
        position = torch.full(
            (self.n_params,), -1, dtype=torch.long, device=self._device
        )
        start = count = 0
        for p in self.params:
            if p.requires_grad:
                position[start : start + p.numel()] = torch.arange(
                    count, count + p.numel(), device=self._device
                )
                count += p.numel()
            start += p.numel()
        treated = position[idx]
        if bool((treated < 0).any()):
            frozen = idx[treated < 0][:10].tolist()
            names = sorted(
                {
                    name
                    for name, lo, hi in _ranges(self.model)
                    for i in frozen
                    if lo <= i < hi
                }
            )
            raise ValueError(
                f"subnetwork_indices {frozen} are entries of parameters that do not "
                f"require grad ({', '.join(names)}); select trainable weights."
            )
        self.subnetwork_indices = idx
        self._trainable = [p for p in self.params if p.requires_grad]
        self._trainable_indices = treated

    def _backend_arguments(self) -> dict[str, Any]:
        return {"subnetwork_indices": self._trainable_indices}

    @property
    def n_params_subnet(self) -> int:
        return len(self.subnetwork_indices)

    @property
    def mean_subnet(self) -> Tensor:
        """The MAP of the selected entries ``(S,)``."""
        return self.mean[self.subnetwork_indices]

    @property
    def prior_precision_diag(self) -> Tensor:
        """The prior precision of the selected entries ``(S,)``."""
        return super().prior_precision_diag[self.subnetwork_indices]

    def _prior_mean_subnet(self) -> Tensor:
        mu0 = self.prior_mean
        return mu0 if mu0.ndim == 0 else mu0[self.subnetwork_indices]

    # -- evidence over the subnetwork ------------------------------------------------
    @property
    def scatter(self) -> Tensor:
        """``(theta_S - mu0_S)^T P0_S (theta_S - mu0_S)``."""
        delta = self.mean_subnet - self._prior_mean_subnet()
        return (delta.square() * self.prior_precision_diag).sum()

    @property
    def log_det_prior_precision(self) -> Tensor:
        """``log det P0_S``."""
        return self.prior_precision_diag.log().sum()

    @property
    def log_det_posterior_precision(self) -> Tensor:
        if self.prior_precision.numel() == 1:  # the structure's fast path holds
            return super().log_det_posterior_precision
        return self._posterior.logdet()

    # -- weights and predictives -----------------------------------------------------
    def sample(
        self, n_samples: int = 100, generator: torch.Generator | None = None
    ) -> Tensor:
        """Weights ``(n_samples, n_params)``: the entries ``S`` drawn from the
        posterior, all others at the MAP."""
        check_n_samples(n_samples)
        return self.assemble_full_samples(
            self.mean_subnet + self._posterior.sample(n_samples, generator)
        )

    def assemble_full_samples(self, subnet_samples: Tensor) -> Tensor:
        """Weights ``(n_samples, n_params)`` from samples of the subnetwork
        ``(n_samples, S)``: the entries ``S`` from ``subnet_samples``, all others at
        the posterior mean (the MAP after ``fit``)."""
        S = self.n_params_subnet
        if (
            not isinstance(subnet_samples, Tensor)
            or subnet_samples.ndim != 2
            or subnet_samples.shape[1] != S
        ):
            raise ValueError(
                f"subnet_samples must have shape (n_samples, {S}); got "
                f"{getattr(subnet_samples, 'shape', type(subnet_samples).__name__)}."
            )
        samples = self.mean.expand(subnet_samples.shape[0], -1).clone()
        samples[:, self.subnetwork_indices] = subnet_samples.to(samples)
        return samples

    def square_norm(self, value: Tensor) -> Tensor:
        """``(value_S - theta_S)^T P_S (value_S - theta_S)`` for weights ``value``
        ``(n_params,)`` or ``(n, n_params)``."""
        delta = self._check_weights(value)[..., self.subnetwork_indices]
        return self._posterior.square_form(delta - self.mean_subnet)

    def log_prob(self, value: Tensor, normalized: bool = True) -> Tensor:
        """Log density of the entries ``S`` of ``value`` under ``N(theta_S,
        P_S^-1)``."""
        log_prob = -0.5 * self.square_norm(value)
        if normalized:
            log_prob = log_prob + 0.5 * (
                self.log_det_posterior_precision
                - self.n_params_subnet * math.log(2 * math.pi)
            )
        return log_prob

    def _jacobians(self, x: Inputs) -> tuple[Tensor, Tensor]:
        """Jacobians of the selected entries ``(N, C, S)`` and outputs ``(N, C)``."""
        model = self._forward_model
        if self.enable_backprop:
            J, f = backprop_factor.jacobian(model, self._trainable, x, True)
            return J[..., self._trainable_indices], f
        f, V = backprop_factor.per_example_vectors(
            model,
            self._trainable,
            x,
            backprop_factor.identity_factor,
            self._trainable_indices,
        )
        return V.transpose(0, 1), f

    def functional_variance(self, Js: Tensor) -> Tensor:
        """``J_S P_S^-1 J_S^T`` per datum: ``Js`` ``(N, C, S)`` -> ``(N, C, C)``."""
        return self._functional(Js, covariance=False)

    def functional_covariance(self, Js: Tensor) -> Tensor:
        """Joint ``J_S P_S^-1 J_S^T``: ``Js`` ``(N, C, S)`` -> ``(N C, N C)``."""
        return self._functional(Js, covariance=True)

    def _functional(self, Js: Tensor, covariance: bool) -> Tensor:
        S = self.n_params_subnet
        if Js.shape[-1] != S or Js.ndim != 3:
            raise ValueError(
                f"Js must be the Jacobians of the {S} subnetwork weights, of shape "
                f"(batch, outputs, {S}); got {tuple(Js.shape)}."
            )
        if covariance:
            return self._posterior.inv_square_form(Js.reshape(1, -1, S))[0]
        return self._posterior.inv_square_form(Js)

    def _glm_terms(self, x: Inputs) -> GLMTerms:
        J, f = self._jacobians(x)
        return GLMTerms(f, J=J)

    # -- serialization ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["subnetwork_indices"] = self.subnetwork_indices
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a fitted state of the same subnetwork (see
        ``ParametricLaplace.load_state_dict``)."""
        idx = state_dict.get("subnetwork_indices")
        if idx is None or not torch.equal(idx.cpu(), self.subnetwork_indices.cpu()):
            raise ValueError(
                "The state dict is of another subnetwork: its subnetwork_indices "
                "differ from this object's."
            )
        super().load_state_dict(state_dict)


class FullSubnetLaplace(SubnetLaplace, FullLaplace):
    """Subnetwork Laplace with a dense precision ``(S, S)`` over the selected
    weights (see ``SubnetLaplace``)."""

    key = ("subnetwork", "full")

    def _init_H(self) -> Tensor:
        S = self.n_params_subnet
        return torch.zeros(S, S, dtype=self._curvature_dtype, device=self._device)


class DiagSubnetLaplace(SubnetLaplace, DiagLaplace):
    """Subnetwork Laplace with a diagonal precision ``(S,)`` over the selected
    weights (see ``SubnetLaplace``)."""

    key = ("subnetwork", "diag")

    def _init_H(self) -> Tensor:
        return torch.zeros(
            self.n_params_subnet, dtype=self._curvature_dtype, device=self._device
        )

    def _build_form(self) -> DiagPrecision:
        p = self._scaled_H() + self.prior_precision_diag
        return DiagPrecision(p, [p.shape])


def _ranges(model: nn.Module):
    """``(name, start, stop)`` of every parameter in the flattened vector."""
    start = 0
    for name, p in model.named_parameters():
        yield name, start, start + p.numel()
        start += p.numel()


def _as_indices(indices: Any) -> torch.LongTensor:
    if not isinstance(indices, torch.Tensor):
        raise TypeError(
            "subnetwork_indices must be a 1-D torch.LongTensor of weight indices "
            f"(e.g. from a SubnetMask's select()); got {type(indices).__name__}."
        )
    if indices.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8):
        raise TypeError(
            f"subnetwork_indices must hold integers; got dtype {indices.dtype}."
        )
    if indices.ndim != 1 or indices.numel() == 0:
        raise ValueError(
            "subnetwork_indices must be a non-empty 1-D tensor; got shape "
            f"{tuple(indices.shape)}."
        )
    indices = indices.long()
    if int(indices.min()) < 0:
        raise ValueError(
            f"subnetwork_indices must be non-negative; got {int(indices.min())}."
        )
    if len(torch.unique(indices)) != len(indices):
        values, counts = torch.unique(indices, return_counts=True)
        raise ValueError(
            "subnetwork_indices must be distinct; repeated: "
            f"{values[counts > 1][:10].tolist()}."
        )
    return indices


__all__ = ["SubnetLaplace", "FullSubnetLaplace", "DiagSubnetLaplace"]
