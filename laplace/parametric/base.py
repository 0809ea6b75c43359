r"""ParametricLaplace: a Gaussian ``N(theta_MAP, P^-1)`` over the treated weights.

The posterior precision is ``P = factor * H + diag(p0)`` with ``H`` the curvature of
the summed training loss, ``factor = 1 / (sigma_noise^2 * temperature)`` and ``p0``
the prior precision. A subclass says how ``H`` is stored and accumulated and which
``laplace.parametric.precision.PrecisionForm`` represents ``P``; everything else
(evidence terms, ``log_prob``, sampling, the functional variance and both
predictives, serialization) is written once here in terms of that form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.func import functional_call
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from laplace.baselaplace import BaseLaplace
from laplace.curvature import backprop_factor
from laplace.data import Inputs, batch_size, dataset_size, split_batch, to_device
from laplace.parametric.precision import CastForm, PrecisionForm
from laplace.predictive import glm
from laplace.utils import distributed
from laplace.utils._checks import check_n_samples, check_state
from laplace.utils.enums import PredType
from laplace.utils.matrix import linalg_dtype
from laplace.utils.memory import check_fit

Tensor = torch.Tensor


@dataclass
class GLMTerms:
    """What the GLM predictive at some inputs needs that the prior does not change:
    the outputs and either the Jacobian factors in the eigenbasis of the posterior
    (``laplace.predictive.glm``), the Jacobians ``(N, C, P)`` or the last-layer
    features."""

    f: Tensor
    factors: list | None = None
    J: Tensor | None = None
    #: last-layer features ``(N, D)`` (``laplace.lllaplace``)
    features: Tensor | None = None


#: the dtypes a curvature may be asked to be held in (``curvature_dtype``)
CURVATURE_DTYPES = (torch.float32, torch.float64)


def _check_curvature_dtype(dtype: Any) -> torch.dtype | None:
    """``curvature_dtype``: None (the default) or float32 or float64."""
    if dtype is None or dtype in CURVATURE_DTYPES:
        return dtype
    raise ValueError(
        f"curvature_dtype must be None (the model's dtype, float32 for 16-bit "
        f"models), torch.float32 or torch.float64; got {dtype!r}."
    )


class ParametricLaplace(BaseLaplace):
    """Laplace approximation with a posterior precision over the treated weights.

    See ``laplace.baselaplace.BaseLaplace`` for the other parameters. Subclasses
    implement ``_init_H``, ``_curvature_batch``, ``_add_curvature`` and
    ``_build_form``.

    Parameters
    ----------
    curvature_dtype : torch.dtype, optional
        the dtype the curvature is accumulated, decomposed and factored in, and
        ``H``, ``posterior_precision`` and ``posterior_covariance`` are held in:
        ``torch.float64`` on request (an ill-conditioned curvature, many batches),
        by default the model's dtype, float32 for float16 and bfloat16 models.
        The predictives, samples, variances and the evidence come back in the
        model's dtype. Less precise than the default is refused.
    """

    #: ``(subset_of_weights, hessian_structure)`` of the class, for the registry and
    #: for state dicts
    key: ClassVar[tuple[str, str]]

    def __init__(
        self,
        model,
        likelihood,
        *args: Any,
        curvature_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        self._requested_curvature_dtype = _check_curvature_dtype(curvature_dtype)
        self._mean: Tensor | None = None
        self.H: Any = None
        #: whether ``H`` holds one curvature per output ``(C, ...)`` (a per-output
        #: ``sigma_noise`` at fit) and the loss of each output ``(C,)``
        self._per_output = False
        self._output_loss: Tensor | None = None
        super().__init__(model, likelihood, *args, **kwargs)
        self._check_backend_likelihood(self.lik)
        if self._bound:  # a curvature_dtype less precise than the model's: now
            _ = self._curvature_dtype
        self._on_new_curvature()

    def _check_backend_likelihood(self, lik) -> None:
        """Refuse, before any work, a likelihood the backend cannot compute the
        structure's curvature of (``CurvatureInterface.check_likelihood``)."""
        structure = type(self).key[1] if hasattr(type(self), "key") else None
        stochastic = bool(self.backend_kwargs.get("stochastic"))
        self._backend_cls.check_likelihood(lik, structure, stochastic)

    @property
    def _curvature_dtype(self) -> torch.dtype:
        """The dtype the curvature is accumulated, decomposed and factored in: the
        ``curvature_dtype`` asked for, else the model's, but float32 for float16
        and bfloat16 models (a sum over many batches in 16 bits keeps two or three
        digits, and half precision has no decompositions on the CPU). The
        predictives, the evidence and the samples come back in the model's dtype
        (``CastForm``)."""
        default = linalg_dtype(self._dtype)
        requested = self._requested_curvature_dtype
        if requested is None or requested == default:
            return default
        if torch.finfo(requested).bits < torch.finfo(default).bits:
            raise ValueError(
                f"curvature_dtype={requested} is less precise than the {self._dtype} "
                f"model's curvature needs ({default}); use curvature_dtype=None or "
                "torch.float64."
            )
        return requested

    @property
    def mean(self) -> Tensor | None:
        """The posterior mean ``(n_params,)``: the MAP ``theta`` after ``fit``; before
        it the prior mean (the posterior is then the prior, as in laplace-torch);
        None while the treated parameters are unknown."""
        if self._mean is not None or not self._bound:
            return self._mean
        return self.prior_mean.expand(self.n_params)

    @mean.setter
    def mean(self, value: Tensor | None) -> None:
        self._mean = value

    def _ensure_H(self, action: str) -> None:
        """Before ``fit`` the curvature is zero and the posterior is the prior
        ``N(mu0, P0^-1)`` (what laplace-torch offers before fit); structures
        without an empty curvature (low rank) and unknown parameters (a last
        layer not found yet) are refused."""
        if self.fitted or self.H is not None:
            return
        if not self._bound:
            raise RuntimeError(
                f"{type(self).__name__} does not know its parameters yet (the last "
                f"layer is found by fit): call fit(train_loader) before {action}, or "
                "name the layer with last_layer_name=..."
            )
        try:
            self.H = self._init_H()
        except NotImplementedError:
            self._check_fitted(action)
        self._on_new_curvature()

    def _check_predictable(self) -> None:
        self._ensure_H("predicting")

    # -- curvature: what a structure supplies ----------------------------------------
    def _init_H(self) -> Any:
        raise NotImplementedError

    def _curvature_batch(self, x: Inputs, y: Tensor, N: int) -> tuple[Tensor, Any]:
        """Summed loss and curvature of one batch from ``self.backend``."""
        return self._curvature_of(self.backend, x, y, N)

    def _curvature_of(self, backend, x: Inputs, y: Tensor, N: int):
        """Summed loss and curvature of one batch from ``backend``."""
        raise NotImplementedError

    def _output_curvature_batch(self, x: Inputs, y: Tensor, N: int, C: int):
        """Losses ``(C,)`` and the curvatures of each output alone (the likelihood's
        ``output_column``), kept per output by ``_stack_outputs``: ``H = sum_c H_c
        / (sigma_c^2 T)``."""
        if (
            getattr(self, "_column_backends", None) is None
            or len(self._column_backends) != C
        ):
            self._column_backends = [
                self._make_backend(self.lik.output_column(c)) for c in range(C)
            ]
        parts = [self._curvature_of(b, x, y, N) for b in self._column_backends]
        losses = torch.stack([p[0] for p in parts])
        return losses, self._stack_outputs([p[1] for p in parts])

    def _stack_outputs(self, curvatures: list[Any]) -> Any:
        """The curvature of one batch kept per output, from the curvature of each
        output alone: ``(C, ...)`` stacked (a subclass may keep what the outputs
        share once)."""
        return torch.stack(curvatures).to(self._curvature_dtype)

    def _check_output_fit(self) -> None:
        """Refuse a per-output noise with a backend whose curvature is not linear in
        the outputs' precisions (the empirical Fisher), before any work."""
        from laplace.curvature.curvature import EFInterface

        if issubclass(self._backend_cls, EFInterface):
            raise ValueError(
                f"sigma_noise with one value per output is not available with "
                f"backend={self._backend_cls.__name__}: the empirical Fisher is not a "
                "sum of per-output curvatures (it is quadratic in 1/sigma_c^2). Use a "
                "GGN backend (NativeGGN, the default) or a Hessian backend."
            )
        self._check_backend_likelihood(self.lik.output_column(0))

    def _scaled_H(self) -> Any:
        """The curvature as it enters the precision, ``H / (sigma^2 T)``; with one
        curvature per output ``sum_c H_c / (sigma_c^2 T)``."""
        factor = self._h_factor
        if self._per_output:
            weights = factor.expand(self.H.shape[0]).to(self.H.dtype)
            return torch.tensordot(weights, self.H, dims=1)
        if factor.ndim == 1:  # one noise per output before fit: H is zero
            factor = factor.mean()
        return factor * self.H

    def _fit_accumulator(self) -> Any:
        """What ``fit`` adds the first batch's curvature to (``_add_curvature``):
        the zero curvature ``_init_H`` unless a subclass says otherwise."""
        return self._init_H()

    def _add_curvature(self, H: Any, H_batch: Any) -> Any:
        """``H + H_batch``; ``H`` is a fresh accumulator and may be updated in place."""
        raise NotImplementedError

    def _combine_fits(self, H_old: Any, H_new: Any, n_old: int, n_new: int) -> Any:
        """Curvature of two data sets fit one after the other (``override=False``)."""
        return self._add_curvature(H_old, H_new)

    def _build_form(self) -> PrecisionForm:
        raise NotImplementedError

    @staticmethod
    def _is_finite(H: Any) -> bool:
        return _all_finite(H)

    # -- fit ---------------------------------------------------------------------------
    def fit(
        self,
        train_loader: DataLoader,
        override: bool = True,
        progress_bar: bool = False,
    ) -> None:
        """Fit the Laplace approximation at the current parameters of the model.

        Parameters
        ----------
        train_loader : DataLoader
            batches ``(x, y)`` or mappings with ``dict_key_x``/``dict_key_y``;
            ``train_loader.dataset`` gives the number of data ``N``.
        override : bool, default=True
            start afresh; ``False`` adds this data set to the curvature, loss and
            number of data of the previous fits (a sequential posterior).
        progress_bar : bool, default=False

        Raises
        ------
        RuntimeError
            if the loss or curvature of a batch is not finite (naming the batch); the
            object keeps its previous state.
        """
        red = distributed.reduction()
        with distributed.agreement(red, "fit", lambda: distributed.signature(self)):
            N = dataset_size(train_loader)
            train_loader = check_fit(self, train_loader)  # raises before any batch
            accumulate = not override and self.fitted
            per_output = self.sigma_noise.ndim == 1
            if per_output:
                self._check_output_fit()
            if accumulate and per_output != self._per_output:
                raise ValueError(
                    "fit(override=False) needs the noise of the previous fit: one "
                    "sigma_noise per output in both fits or a scalar in both. Use "
                    "fit(override=True)."
                )
        distributed.check_loader(train_loader, red)
        self.model.eval()
        mean = parameters_to_vector(self.params).detach()
        with distributed.agreement(red, "fit") as agreed:
            H, loss, n_outputs, output_loss, seen = self._accumulate(
                train_loader, N, per_output, progress_bar
            )
            agreed.report(seen=seen, layout=distributed.layout(H))
        if red is not None:
            H, loss, output_loss, N = self._reduce_fit(
                red, H, loss, output_loss, N, agreed
            )
        if accumulate:
            H = self._combine_fits(self.H, H, self.n_data, N)
            loss, N = self.loss + loss, self.n_data + N
            if per_output:
                output_loss = self._output_loss + output_loss
        self.H, self.loss, self.n_data, self.n_outputs = H, loss, N, n_outputs
        self._per_output, self._output_loss = per_output, output_loss
        self.mean = mean
        self.fitted = True
        self._on_new_curvature()

    def _accumulate(self, train_loader, N: int, per_output: bool, progress_bar: bool):
        """``(H, loss, n_outputs, output_loss, seen)`` of this process's batches:
        the curvature and the summed loss (per output with one noise per output),
        the number of outputs and of examples seen."""
        H = None if per_output else self._fit_accumulator()
        loss, n_outputs, output_loss = torch.zeros_like(self.loss), None, None
        seen = 0
        batches = tqdm(train_loader, disable=not progress_bar, desc="fit")
        for i, batch in enumerate(batches):
            x, y = split_batch(batch, self.dict_key_x, self.dict_key_y)
            x, y = to_device(x, self._device), y.to(self._device)
            self._check_fit_batch(x, y)
            if n_outputs is None:
                with torch.no_grad():
                    n_outputs = self.model(x).shape[-1]
                if per_output and self.sigma_noise.numel() != n_outputs:
                    raise ValueError(
                        f"sigma_noise must have one value per output, shape "
                        f"({n_outputs},); got shape {tuple(self.sigma_noise.shape)}."
                    )
            if per_output:
                loss_b, H_b = self._output_curvature_batch(x, y, N, n_outputs)
            else:
                loss_b, H_b = self._curvature_batch(x, y, N)
            finite = bool(torch.isfinite(loss_b).all())
            if not finite or not self._is_finite(H_b):
                what = "loss" if not finite else "curvature"
                raise RuntimeError(
                    f"The {what} of batch {i} is not finite (NaN or inf); check the "
                    "inputs and targets of that batch and the model's outputs. The "
                    "Laplace approximation was left as it was."
                )
            if per_output:
                H = H_b if H is None else H.add_(H_b)
                loss_b = loss_b.detach()
                output_loss = loss_b if output_loss is None else output_loss + loss_b
                loss_b = loss_b.sum()
            else:
                H = self._add_curvature(H, H_b)
            loss = loss + loss_b.detach()
            seen += batch_size(x, self.dict_key_x)
        if n_outputs is None:
            raise ValueError("train_loader yielded no batches.")
        return H, loss, n_outputs, output_loss, seen

    def _reduce_fit(self, red, H, loss, output_loss, N: int, agreed):
        """The curvature, losses and number of data of all ranks from this rank's
        (``laplace.utils.distributed``): every rank then holds the same."""
        H, n_total = distributed.reduce_accumulated(H, red, N, agreed, "fit")
        extra = [] if output_loss is None else [output_loss]
        loss = loss.detach().clone()
        distributed.all_reduce_([loss, *extra], red)
        return H, loss, output_loss, n_total

    def _on_new_curvature(self) -> None:
        """Drop whatever was derived from the previous curvature (and mean)."""
        self._posterior_cache = None
        self._sq_distance: Tensor | None = None

    # -- the posterior -------------------------------------------------------------
    @property
    def _posterior(self) -> PrecisionForm:
        """The posterior precision form; cached unless a hyperparameter is being
        differentiated (then each call builds a fresh graph)."""
        self._ensure_H("using the posterior")
        tracking = self.prior_precision.requires_grad or self.sigma_noise.requires_grad
        if tracking:
            return self._model_form()
        if self._posterior_cache is None:
            self._posterior_cache = self._model_form()
        return self._posterior_cache

    def _model_form(self) -> PrecisionForm:
        """``_build_form`` seen in the model's dtype (a 16-bit model's curvature is
        held in float32: ``_curvature_dtype``)."""
        form = self._build_form()
        if self._curvature_dtype == self._dtype:
            return form
        return CastForm(form, self._curvature_dtype, self._dtype)

    @property
    def scatter(self) -> Tensor:
        """``(theta_MAP - mu0)^T P0 (theta_MAP - mu0)``; ``O(layers)`` for a scalar or
        layer-wise prior (the squared distances per layer are kept)."""
        prior = self.prior_precision
        if prior.numel() == self.n_params:
            delta = self.mean - self.prior_mean
            return (delta.square() * prior).sum()
        if self._sq_distance is None:
            delta = (self.mean - self.prior_mean).square()
            sizes = [p.numel() for p in self.params]
            self._sq_distance = torch.stack([d.sum() for d in delta.split(sizes)])
        if prior.numel() == 1:
            return prior[0] * self._sq_distance.sum()
        return (prior * self._sq_distance).sum()

    @property
    def log_det_prior_precision(self) -> Tensor:
        """``log det P0``."""
        prior = self.prior_precision
        if prior.numel() == self.n_params:
            return prior.log().sum()
        if prior.numel() == 1:
            return self.n_params * prior[0].log()
        sizes = torch.tensor([p.numel() for p in self.params], device=prior.device)
        return (sizes * prior.log()).sum()

    @property
    def log_det_posterior_precision(self) -> Tensor:
        """``log det P``."""
        return self._posterior.logdet()

    @property
    def log_det_ratio(self) -> Tensor:
        """``log det P - log det P0``."""
        return self.log_det_posterior_precision - self.log_det_prior_precision

    @property
    def posterior_precision(self) -> Any:
        """The posterior precision ``P``, in the structure of the class (a dense
        matrix where a subclass does not say otherwise)."""
        return self._posterior.to_matrix()

    @property
    def posterior_variance(self) -> Tensor:
        """Marginal posterior variances ``diag(P^-1)`` ``(n_params,)``."""
        return self._posterior.inv_diag()

    def square_norm(self, value: Tensor) -> Tensor:
        """``(value - theta_MAP)^T P (value - theta_MAP)`` for ``value`` ``(P,)`` or
        ``(n, P)``."""
        return self._posterior.square_form(self._check_weights(value) - self.mean)

    def log_prob(self, value: Tensor, normalized: bool = True) -> Tensor:
        """Log density of ``value`` (``(P,)`` or ``(n, P)``) under
        ``N(theta_MAP, P^-1)``; without ``normalized`` only the term that depends on
        ``value``."""
        log_prob = -0.5 * self.square_norm(value)
        if normalized:
            log_prob = log_prob + 0.5 * (
                self.log_det_posterior_precision - self.n_params * math.log(2 * math.pi)
            )
        return log_prob.to(self._dtype)  # log det P in the curvature's dtype

    def _check_weights(self, value: Tensor) -> Tensor:
        if not isinstance(value, Tensor) or value.shape[-1:] != (self.n_params,):
            raise ValueError(
                f"Expected weights of shape ({self.n_params},) or "
                f"(n, {self.n_params}); "
                f"got {getattr(value, 'shape', type(value).__name__)}."
            )
        return value.to(self._device, self._dtype)

    def sample(
        self, n_samples: int = 100, generator: torch.Generator | None = None
    ) -> Tensor:
        """Weights ``theta ~ N(theta_MAP, P^-1)``, shape ``(n_samples, n_params)``."""
        check_n_samples(n_samples)
        return self.mean + self._posterior.sample(n_samples, generator)

    def functional_samples(
        self,
        x: Inputs,
        pred_type: PredType | str = PredType.GLM,
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        joint: bool = False,
    ) -> Tensor:
        """Samples ``(n_samples, batch, outputs)`` of the outputs ``f`` (see
        ``BaseLaplace.functional_samples``)."""
        return super().functional_samples(
            x, pred_type, n_samples, diagonal_output, generator, joint=joint
        )

    def functional_variance(self, Js: Tensor) -> Tensor:
        """``J P^-1 J^T`` per datum: ``Js`` ``(N, C, P)`` -> ``(N, C, C)``."""
        if Js.ndim != 3 or Js.shape[-1] != self.n_params:
            raise ValueError(
                f"Js must have shape (batch, outputs, {self.n_params}); got "
                f"{tuple(Js.shape)}."
            )
        return self._posterior.inv_square_form(Js)

    def functional_covariance(self, Js: Tensor) -> Tensor:
        """Joint ``J P^-1 J^T`` over a batch: ``Js`` ``(N, C, P)`` or ``(N*C, P)`` ->
        ``(N*C, N*C)``, ordered datum-major."""
        if Js.shape[-1] != self.n_params or Js.ndim not in (2, 3):
            raise ValueError(
                f"Js must have shape (batch, outputs, {self.n_params}) or "
                f"(batch * outputs, {self.n_params}); got {tuple(Js.shape)}."
            )
        return self._posterior.inv_square_form(Js.reshape(1, -1, self.n_params))[0]

    # -- predictives ---------------------------------------------------------------
    def _jacobians(self, x: Inputs) -> tuple[Tensor, Tensor]:
        """Jacobians ``(N, C, P)`` and outputs ``(N, C)`` at the MAP."""
        model = self._forward_model
        if self.enable_backprop:
            return backprop_factor.jacobian(model, self.params, x, True)
        f, V = backprop_factor.per_example_vectors(
            model, self.params, x, backprop_factor.identity_factor
        )
        return V.transpose(0, 1), f

    def _glm_terms(self, x: Inputs) -> GLMTerms:
        bases = self._posterior.eigenbases()
        if bases is not None and not self.enable_backprop:
            found = backprop_factor.jacobian_factors(
                self._forward_model, self.params, x
            )
            if found is not None:
                f, factors = found
                return GLMTerms(f, factors=glm.rotate(factors, bases))
        J, f = self._jacobians(x)
        return GLMTerms(f, J=J)

    def _glm_variance(self, terms: GLMTerms, diagonal: bool = False) -> Tensor:
        """``J P^-1 J^T`` ``(N, C, C)``; a subclass may return only its diagonal
        ``(N, C)`` when ``diagonal`` (enough for the probit link)."""
        form = self._posterior
        if terms.factors is not None:
            return glm.inv_square_form(terms.factors, form.inverse_eigenvalues())
        return form.inv_square_form(terms.J)

    def _glm_distribution(self, x, joint, diagonal_output):
        if joint:
            J, f = self._jacobians(x)
            return f.flatten(), self.functional_covariance(J)
        terms = self._glm_terms(x)
        f_var = self._glm_variance(terms)
        if diagonal_output:
            f_var = f_var.diagonal(dim1=-2, dim2=-1)
        return terms.f, f_var

    def _nn_samples(self, x, n_samples, generator):
        names = self._parameter_names()
        shapes = [p.shape for p in self.params]
        outputs = []
        with torch.set_grad_enabled(self.enable_backprop and torch.is_grad_enabled()):
            for theta in self.sample(n_samples, generator):
                tensors = torch.split(theta, [math.prod(s) for s in shapes])
                weights = {n: t.view(s) for n, t, s in zip(names, tensors, shapes)}
                outputs.append(
                    functional_call(self.model, weights, (x,), self._model_kwargs)
                )
        return torch.stack(outputs)

    def _validation_predictions(self, val_loader, pred_type, link_approx, n_samples):
        """A callable yielding ``(prediction, y)`` per validation batch at the current
        prior (regression: ``(f_mu, f_var)``); for 'glm' the prior-independent terms
        are computed once."""
        if pred_type != PredType.GLM:
            return super()._validation_predictions(
                val_loader, pred_type, link_approx, n_samples
            )
        lik = self._predictive_lik(fitting=True)
        # e.g. probit reads only diag(f_var); regression yields the full (N, C, C)
        diagonal = not lik.needs_covariance(link_approx, False)
        cached = []
        with torch.no_grad():
            for batch in val_loader:
                x, y = split_batch(batch, self.dict_key_x, self.dict_key_y)
                x = to_device(x, self._device)
                cached.append((self._glm_terms(x), y.to(self._device)))

        def predictions():
            with torch.no_grad():
                for terms, y in cached:
                    f_var = self._glm_variance(terms, diagonal)
                    yield lik.predictive(terms.f, f_var, link_approx, n_samples), y

        return predictions

    # -- serialization -------------------------------------------------------------
    def _H_state(self) -> Any:
        return self.H

    def _load_H(self, state: Any) -> Any:
        return state.to(self._device, self._curvature_dtype)

    def state_dict(self) -> dict[str, Any]:
        """The state as plain tensors, numbers and strings (no pickled code); before
        ``fit`` that of the prior-only posterior."""
        self._ensure_H("state_dict")
        state = {
            "cls_name": type(self).__name__,
            "likelihood": str(self.lik.name),
            "param_shapes": [list(p.shape) for p in self.params],
            "mean": self.mean,
            "H": self._H_state(),
            "loss": self.loss.detach(),
            "n_data": self.n_data,
            "n_outputs": self.n_outputs,
            "prior_precision": self.prior_precision.detach(),
            "prior_mean": self.prior_mean.detach(),
            "sigma_noise": self.sigma_noise.detach(),
            "temperature": self.temperature,
            "enable_backprop": self.enable_backprop,
            "fitted": self.fitted,
        }
        if self._per_output:  # the loss of each output (one noise per output)
            state["output_loss"] = self._output_loss
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a fitted state (also onto another device or dtype: tensors are
        moved to this model's). The model's treated weights are set to the stored
        MAP ``mean``.

        Raises
        ------
        ValueError
            if the state is of another class, likelihood or parameter layout.
        """
        check_state(
            self, state_dict, {"cls_name", "likelihood", "param_shapes", "mean", "H"}
        )
        to = {"device": self._device, "dtype": self._dtype}
        H = self._load_H(state_dict["H"])
        output_loss = state_dict.get("output_loss")
        self._per_output = output_loss is not None
        self._output_loss = None if output_loss is None else output_loss.to(**to)
        self.n_outputs = state_dict["n_outputs"]  # a per-output noise is checked on it
        self.temperature = state_dict["temperature"]
        self.sigma_noise = state_dict["sigma_noise"].to(**to)
        self.prior_precision = state_dict["prior_precision"].to(**to)
        self.prior_mean = state_dict["prior_mean"].to(**to)
        self.H = H
        self.mean = state_dict["mean"].to(**to)
        self.loss = state_dict["loss"].to(**to)
        self.n_data, self.n_outputs = state_dict["n_data"], state_dict["n_outputs"]
        self.enable_backprop = state_dict["enable_backprop"]
        self.fitted = state_dict["fitted"]
        if self.fitted:
            with torch.no_grad():
                vector_to_parameters(self.mean, self.params)
        else:  # a prior-only state: the mean is the prior mean, the model unchanged
            self.mean = None
        self._on_new_curvature()


def _all_finite(t: Tensor) -> bool:
    """Whether ``t`` holds no NaN or inf.

    NaN and inf propagate into a sum, so a finite sum proves every entry finite; only
    a non-finite sum (an entry, or an overflow of the sum itself) needs the exact
    element-wise check.
    """
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


__all__ = ["ParametricLaplace", "GLMTerms"]
