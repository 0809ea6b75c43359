"""Last-layer Laplace: a Gaussian over the weights of the last ``nn.Linear`` only.

The network up to the last layer is a fixed feature map ``phi(x)``; the posterior is
that of the linear model ``f = W phi + b`` under the likelihood. The classes here are
thin: they say which parameters are treated (those of the last layer, found on the
first forward pass unless named), where the features come from
(``laplace.utils.FeatureExtractor``), and that the predictive is formed from the
features in closed form (``laplace.predictive.last_layer``), never from a
Jacobian. Curvature, evidence, tuning, sampling and serialization are those of
``laplace.parametric.ParametricLaplace`` and of each structure.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from laplace.curvature.backpack import BackPackGGN
from laplace.curvature.curvature import CurvatureInterface, last_layer_jacobian
from laplace.data import Inputs, split_batch, to_device
from laplace.functional import kernel
from laplace.functional.base import FunctionalLaplace
from laplace.parametric.base import GLMTerms, ParametricLaplace
from laplace.parametric.diag import DiagLaplace
from laplace.parametric.full import FullLaplace
from laplace.parametric.kron import KronLaplace
from laplace.parametric.precision import DensePrecision
from laplace.predictive import last_layer as closed_form
from laplace.utils.enums import FeatureReduction, Likelihood
from laplace.utils.feature_extractor import FeatureExtractor

Tensor = torch.Tensor


def _feature_extractor(
    model: nn.Module,
    last_layer_name: str | None,
    enable_backprop: bool,
    feature_reduction: FeatureReduction | str | None,
) -> FeatureExtractor:
    """``model`` as a ``FeatureExtractor`` (kept if it is one)."""
    if isinstance(model, FeatureExtractor):
        if last_layer_name is not None:
            model.set_last_layer(last_layer_name)
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    return FeatureExtractor(
        model,
        last_layer_name=last_layer_name,
        enable_backprop=enable_backprop,
        feature_reduction=feature_reduction,
    )


class LastLayerMixin:
    """What every last-layer class shares: the treated parameters are those of the
    model's last ``nn.Linear`` (found on the first training batch unless named),
    the features come from the ``FeatureExtractor`` ``self.model``, and the
    state dict names the layer."""

    @property
    def last_layer(self) -> nn.Linear | None:
        return self.model.last_layer

    def _select_params(self) -> list[nn.Parameter] | None:
        layer = self.model.last_layer
        if layer is None:
            return None
        return [p for p in layer.parameters() if p.requires_grad]

    def _backend_arguments(self) -> dict[str, Any]:
        return {"last_layer": True}

    def _find_last_layer(self, train_loader: DataLoader) -> None:
        """Bind the parameters: find the last layer on the first training batch."""
        for batch in train_loader:
            x, _ = split_batch(batch, self.dict_key_x, self.dict_key_y)
            with torch.no_grad():
                f, _ = self.model.find_last_layer(to_device(x, self._device))
            if f.ndim > 2 and not self.lik.pairs:
                # e.g. logits at every position: the curvature would come from the
                # reduced features, the predictive could not be formed
                raise ValueError(
                    f"The model's output has shape {tuple(f.shape)}; a last-layer "
                    "Laplace needs outputs of shape (batch, outputs). Return the "
                    "outputs of the position the task uses (e.g. logits[:, -1])."
                )
            self._bind_params(self._select_params())
            return
        raise ValueError("train_loader yielded no batches.")

    def fit(self, train_loader: DataLoader, *args: Any, **kwargs: Any) -> None:
        """Fit on the last layer; it is found on the first batch unless named (the
        arguments are those of the all-weights class)."""
        if not self._bound:
            self._find_last_layer(train_loader)
        super().fit(train_loader, *args, **kwargs)

    def _features(self, x: Inputs) -> tuple[Tensor, Tensor]:
        """Outputs ``(N, C)`` and last-layer features ``(N, D)``, with their graph
        only when ``enable_backprop``."""
        with torch.set_grad_enabled(self.enable_backprop and torch.is_grad_enabled()):
            f, phi = self.model.forward_with_features(x, **self._model_kwargs)
        if not self.enable_backprop:
            f, phi = f.detach(), phi.detach()
        return f, phi

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["last_layer_name"] = self.model.last_layer_name
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a fitted state; the last layer is set by its stored name when it
        is not known yet."""
        name = state_dict.get("last_layer_name")
        if name is None:
            raise ValueError(
                "Not a last-layer Laplace state dict: it has no last_layer_name."
            )
        if not self._bound:
            self.model.set_last_layer(name)
            self._bind_params(self._select_params())
        elif name != self.model.last_layer_name:
            raise ValueError(
                f"The state dict is for the last layer {name!r}, this Laplace treats "
                f"{self.model.last_layer_name!r}."
            )
        super().load_state_dict(state_dict)


class LLLaplace(LastLayerMixin, ParametricLaplace):
    """Base class of the last-layer Laplace approximations.

    Only the parameters of the model's last ``nn.Linear`` layer (those that require
    grad) are treated: ``P = factor * H + diag(p0)`` over them, with ``H`` the
    curvature of the summed loss of the linear model on the last-layer features.

    Parameters
    ----------
    model : torch.nn.Module or FeatureExtractor
        the trained network; ``la.model`` is a ``FeatureExtractor`` around it.
    feature_reduction : FeatureReduction or str, optional
        'pick_first', 'pick_last' or 'average': how features of shape ``(batch,
        seq_len, dim)`` become ``(batch, dim)``; it must reproduce what the model
        does between those features and its output.
    last_layer_name : str, optional
        the name of the last layer in ``model.named_modules()``; by default it is
        found on the first forward pass (``fit``), and until then ``params``,
        ``n_params`` and ``mean`` are None.

    Notes
    -----
    The other parameters are those of ``BaseLaplace``; ``dict_key_x`` defaults to
    'input_ids', as the Hugging Face batches it is meant for.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        sigma_noise: float | Tensor = 1.0,
        prior_precision: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        feature_reduction: FeatureReduction | str | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend: type[CurvatureInterface] | None = None,
        last_layer_name: str | None = None,
        backend_kwargs: dict[str, Any] | None = None,
        asdl_fisher_kwargs: dict[str, Any] | None = None,
        **structure_kwargs: Any,
    ) -> None:
        super().__init__(
            _feature_extractor(
                model, last_layer_name, enable_backprop, feature_reduction
            ),
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
            **structure_kwargs,
        )

    def fit(
        self,
        train_loader: DataLoader,
        override: bool = True,
        progress_bar: bool = False,
    ) -> None:
        """Fit the Laplace approximation of the last layer at the current weights
        (see ``ParametricLaplace.fit``); the last layer is found on the first
        batch unless it was named."""
        super().fit(train_loader, override=override, progress_bar=progress_bar)

    # -- features and the closed-form predictive -----------------------------------
    def _feature_variance(self, phi: Tensor, mode: str) -> Tensor:
        """``J P^-1 J^T`` from the features (``laplace.predictive.last_layer``)."""
        form = self._posterior
        layer = self.model.last_layer
        if isinstance(form, DensePrecision):
            cov = closed_form.dense_layout(form.covariance(), layer)
            return closed_form.dense_variance(phi, layer, cov, mode)
        bases = form.eigenbases()
        if bases is None:  # blocks without (Q_out, Q_in) bases: from the Jacobian
            J = last_layer_jacobian(layer, phi)
            if mode == "joint":
                return form.inv_square_form(J.reshape(1, -1, J.shape[-1]))[0]
            var = form.inv_square_form(J)
            return var.diagonal(dim1=-2, dim2=-1) if mode == "diag" else var
        return closed_form.block_variance(
            phi, layer, self.params, bases, form.inverse_eigenvalues(), mode
        )

    def functional_variance_fast(self, X: Inputs) -> Tensor:
        """Output variances ``diag(J P^-1 J^T)`` ``(batch, outputs)`` at inputs
        ``X``, in closed form from the features."""
        self._check_fitted("functional_variance_fast")
        _, phi = self._features(to_device(X, self._device))
        return self._feature_variance(phi, "diag")

    def _jacobians(self, x: Inputs) -> tuple[Tensor, Tensor]:
        """Explicit last-layer Jacobians ``(N, C, P)`` (for tests and custom use;
        the predictive does not build them)."""
        f, phi = self._features(x)
        J = last_layer_jacobian(self.model.last_layer, phi)
        return J, f

    def _glm_terms(self, x: Inputs) -> GLMTerms:
        f, phi = self._features(x)
        return GLMTerms(f, features=phi)

    def _glm_variance(self, terms: GLMTerms, diagonal: bool = False) -> Tensor:
        return self._feature_variance(terms.features, "diag" if diagonal else "full")

    def _glm_distribution(self, x, joint, diagonal_output):
        f, phi = self._features(x)
        if joint:
            return f.flatten(), self._feature_variance(phi, "joint")
        return f, self._feature_variance(phi, "diag" if diagonal_output else "full")

    def _nn_samples(self, x, n_samples, generator):
        """Outputs ``(n_samples, N, C)`` of the last layer at weight samples, from
        the features computed once."""
        _, phi = self._features(x)
        layer = self.model.last_layer
        thetas = self.sample(n_samples, generator)
        weight = layer.weight.detach().expand(n_samples, -1, -1)
        bias = None if layer.bias is None else layer.bias.detach().expand(n_samples, -1)
        start = 0
        for p in self.params:
            block = thetas[:, start : start + p.numel()].reshape(n_samples, *p.shape)
            start += p.numel()
            if p is layer.weight:
                weight = block
            else:
                bias = block
        f = torch.einsum("nd,scd->snc", phi, weight)
        return f if bias is None else f + bias[:, None, :]


class FullLLLaplace(LLLaplace, FullLaplace):
    """Last-layer Laplace with a dense posterior precision ``(P, P)`` over the last
    layer (see ``LLLaplace`` and ``laplace.parametric.FullLaplace``)."""

    key = ("last_layer", "full")


class KronLLLaplace(LLLaplace, KronLaplace):
    """Last-layer Laplace with a Kronecker-factored precision: ``G (x) A`` for the
    weight (``C x C`` and ``D x D``), ``G`` for the bias; ``damping``,
    ``low_rank_factors`` and ``low_rank_threshold`` as in
    ``laplace.parametric.KronLaplace`` (with the default backend the low-rank
    ``A`` is built from the features, ``G`` truncated from the ``(C, C)`` output
    moments)."""

    key = ("last_layer", "kron")

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        sigma_noise: float | Tensor = 1.0,
        prior_precision: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        feature_reduction: FeatureReduction | str | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend: type[CurvatureInterface] | None = None,
        last_layer_name: str | None = None,
        damping: bool = False,
        backend_kwargs: dict[str, Any] | None = None,
        asdl_fisher_kwargs: dict[str, Any] | None = None,
        low_rank_factors: int | None = None,
        low_rank_threshold: int = 1024,
        curvature_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            model,
            likelihood,
            sigma_noise=sigma_noise,
            prior_precision=prior_precision,
            prior_mean=prior_mean,
            temperature=temperature,
            enable_backprop=enable_backprop,
            feature_reduction=feature_reduction,
            dict_key_x=dict_key_x,
            dict_key_y=dict_key_y,
            backend=backend,
            last_layer_name=last_layer_name,
            backend_kwargs=backend_kwargs,
            asdl_fisher_kwargs=asdl_fisher_kwargs,
            damping=damping,
            low_rank_factors=low_rank_factors,
            low_rank_threshold=low_rank_threshold,
            curvature_dtype=curvature_dtype,
        )


class DiagLLLaplace(LLLaplace, DiagLaplace):
    """Last-layer Laplace with a diagonal posterior precision (see
    ``LLLaplace`` and ``laplace.parametric.DiagLaplace``)."""

    key = ("last_layer", "diag")


class FunctionalLLLaplace(LastLayerMixin, FunctionalLaplace):
    """GP inference in the last layer: the kernel is the linear kernel of the
    features, ``K_c(x, x') = (phi^T phi' + 1) / p0`` for every output ``c`` (no
    cross-output terms, so the GP is ``C`` independent ones of ``M x M`` whatever
    ``independent_outputs`` says). See
    ``laplace.functional.BaseFunctionalLaplace`` and ``LLLaplace``.
    """

    key = ("last_layer", "gp")
    outputs_decouple = True

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        n_subset: int,
        sigma_noise: float | Tensor = 1.0,
        prior_precision: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        feature_reduction: FeatureReduction | str | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        last_layer_name: str | None = None,
        backend: type[CurvatureInterface] | None = BackPackGGN,
        backend_kwargs: dict[str, Any] | None = None,
        independent_outputs: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(
            _feature_extractor(
                model, last_layer_name, enable_backprop, feature_reduction
            ),
            likelihood,
            n_subset,
            sigma_noise=sigma_noise,
            prior_precision=prior_precision,
            prior_mean=prior_mean,
            temperature=temperature,
            enable_backprop=enable_backprop,
            dict_key_x=dict_key_x,
            dict_key_y=dict_key_y,
            backend=backend,
            backend_kwargs=backend_kwargs,
            independent_outputs=independent_outputs,
            seed=seed,
        )

    def _jacobian_set(self, x: Inputs, create_graph: bool = False):
        _, phi = self._features(x)
        return kernel.jacobian_set(
            self.model,
            self.params,
            phi,
            create_graph,
            output_layer=self.model.last_layer,
        )


__all__ = [
    "LLLaplace",
    "FullLLLaplace",
    "KronLLLaplace",
    "DiagLLLaplace",
    "FunctionalLLLaplace",
]
