"""BaseLaplace: the model, the likelihood, the hyperparameters and the predictive.

What every Laplace approximation shares lives here: validated hyperparameters
(``prior_precision``, ``prior_mean``, ``sigma_noise``, ``temperature``), the curvature
backend, the log likelihood and the Laplace evidence built from it, the predictive
entry point ``la(x, ...)`` with its argument checks, and prior-precision tuning.
Subclasses say how the posterior is represented (``laplace.parametric``).

Conventions (DESIGN.md section 3): the loss is summed over the data,
``0.5 * sum((f - y)^2)`` for regression and the cross-entropy for classification; the
posterior precision is ``P = H / (sigma_noise^2 * temperature) + diag(p0)``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from laplace import prior
from laplace.curvature.curvature import CurvatureInterface, check_backend
from laplace.data import Inputs, batch_size, split_batch, to_device
from laplace.likelihood import OutputLikelihood, get_likelihood
from laplace.predictive.links import sample_outputs
from laplace.utils import distributed
from laplace.utils._checks import check_n_samples
from laplace.utils.enums import (
    Likelihood,
    LinkApprox,
    PredType,
    PriorStructure,
    TuningMethod,
    parse_enum,
)
from laplace.utils.memory import check_gridsearch, check_predictive

Tensor = torch.Tensor


class BaseLaplace:
    """Base class of all Laplace approximations.

    Parameters
    ----------
    model : torch.nn.Module
        the trained network; its parameters that require grad are the ones treated.
    likelihood : Likelihood or str, or a laplace.likelihood.OutputLikelihood
        'classification', 'regression', 'reward_modeling', 'binary', 'multilabel',
        'poisson', 'heteroscedastic_regression' (``laplace.likelihood``), or an
        object of your own likelihood. 'reward_modeling' fits with the
        classification likelihood on pairs (``x`` of shape ``(batch, 2, dim)``,
        ``y`` of shape ``(batch,)``) and predicts as regression on ``(batch, dim)``.
    sigma_noise : float or torch.Tensor, default=1
        observation noise of regression: a scalar, or one value per output (shape
        ``(C,)``, for the structures with ``supports_output_noise``); must be 1 for
        likelihoods without noise.
    prior_precision : float or torch.Tensor, default=1
        precision of the Gaussian prior: a scalar, one value per parameter tensor, or
        one value per parameter.
    prior_mean : float or torch.Tensor, default=0
        mean of the prior: a scalar or one value per parameter.
    temperature : float, default=1
        temperature of the likelihood; the curvature is divided by it.
    enable_backprop : bool, default=False
        keep the predictive differentiable w.r.t. the input ``x``.
    dict_key_x : str, default='input_ids'
        key of the inputs in mapping (dict-like) batches.
    dict_key_y : str, default='labels'
        key of the targets in mapping (dict-like) batches.
    backend : subclass of CurvatureInterface, optional
        curvature backend; ``laplace.curvature.CurvlinopsGGN`` by default.
    backend_kwargs : dict, optional
        keyword arguments of the backend, e.g. ``{"stochastic": True}``.
    asdl_fisher_kwargs : dict, optional
        passed to ASDL backends as ``fisher_kwargs`` (ASDL's ``FisherConfig``).
    """

    #: the predictive types of the class; the first is the linearized one
    pred_types: tuple[PredType, ...] = (PredType.GLM, PredType.NN)
    #: whether ``sigma_noise`` may be one value per output (regression)
    supports_output_noise: bool = False

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        sigma_noise: float | Tensor = 1.0,
        prior_precision: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend: type[CurvatureInterface] | None = None,
        backend_kwargs: dict[str, Any] | None = None,
        asdl_fisher_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module; got {type(model).__name__}."
            )
        #: the likelihood object every formula dispatches on
        self.lik: OutputLikelihood = get_likelihood(likelihood)
        #: the likelihood as given: a ``Likelihood`` for a name, else the object
        self.likelihood = (
            likelihood
            if isinstance(likelihood, OutputLikelihood)
            else parse_enum(Likelihood, likelihood, "likelihood")
        )
        if self.lik.pairs and not getattr(self, "supports_reward_modeling", True):
            raise ValueError(
                f"{type(self).__name__} does not support likelihood='reward_modeling'; "
                "use hessian_structure='kron', 'diag' or 'full' (all weights or the "
                "last layer)."
            )
        # a DistributedDataParallel model: the module it wraps (the Laplace
        # approximation's passes must not trigger DDP's gradient reduction)
        model = distributed.unwrap(model)
        self.model = model
        self.enable_backprop = bool(enable_backprop)
        self.dict_key_x, self.dict_key_y = dict_key_x, dict_key_y
        structure = getattr(type(self), "key", (None, None))[1]
        self._backend_cls = check_backend(backend, structure)
        self.backend_kwargs = dict(backend_kwargs or {})
        self.asdl_fisher_kwargs = dict(asdl_fisher_kwargs or {})
        self._backend: CurvatureInterface | None = None
        self._posterior_cache: Any = None
        #: keyword arguments of the model's forward during a predictive call
        self._model_kwargs: dict[str, Any] = {}
        #: the treated parameters; None until known (a last layer found on the
        #: first forward pass), and so are ``n_params`` and ``n_layers``
        self.params: list[nn.Parameter] | None = None
        self.n_params: int | None = None
        self.n_layers: int | None = None
        first = next(iter(model.parameters()), None)
        self._device = first.device if first is not None else torch.device("cpu")
        self._dtype = first.dtype if first is not None else torch.get_default_dtype()
        #: hyperparameters given before the parameters are known, set on binding
        self._pending: dict[str, Any] = {}
        self.temperature = temperature
        self.sigma_noise = sigma_noise
        self.prior_precision = prior_precision
        self.prior_mean = prior_mean
        self.loss = torch.zeros((), dtype=self._dtype, device=self._device)
        self.n_data = 0
        self.n_outputs: int | None = None
        #: whether ``fit`` has run; predictives and tuning need it
        self.fitted = False
        params = self._select_params()
        if params is not None:
            self._bind_params(params)

    def _bind_params(self, params: list[nn.Parameter]) -> None:
        """Treat ``params``: fix the sizes and set the hyperparameters given so far
        (validated against the sizes now)."""
        if not params:
            raise ValueError(
                "The model has no parameters that require grad: nothing to treat."
            )
        self.params = list(params)
        self.n_params = sum(p.numel() for p in self.params)
        self.n_layers = len(self.params)
        self._device, self._dtype = self.params[0].device, self.params[0].dtype
        pending, self._pending = self._pending, {}
        for name, value in pending.items():
            setattr(self, name, value)
        self.loss = self.loss.to(self._device, self._dtype)
        self._on_bind()

    def _on_bind(self) -> None:
        """Set up what depends on the treated parameters (subclasses)."""

    @property
    def _bound(self) -> bool:
        return self.params is not None

    # -- what is treated -----------------------------------------------------------
    def _select_params(self) -> list[nn.Parameter] | None:
        """The parameters to treat, or None while they cannot be known yet."""
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def backend(self) -> CurvatureInterface:
        """The curvature backend, built on first use."""
        if self._backend is None:
            self._backend = self._make_backend(self.lik)
        return self._backend

    def _make_backend(self, lik: OutputLikelihood) -> CurvatureInterface:
        """A backend of the class's backend type for the likelihood ``lik``."""
        kwargs = dict(self.backend_kwargs)
        if self.asdl_fisher_kwargs:
            from laplace.curvature.asdl import AsdlInterface

            if issubclass(self._backend_cls, AsdlInterface):
                kwargs.setdefault("fisher_kwargs", self.asdl_fisher_kwargs)
        return self._backend_cls(
            self.model,
            lik,
            dict_key_x=self.dict_key_x,
            dict_key_y=self.dict_key_y,
            **self._backend_arguments(),
            **kwargs,
        )

    @property
    def structure_table(self) -> list[dict[str, str]]:
        """How the curvature engine serves each parameter: one row per parameter
        with its ``parameter`` name, the ``modules`` using it, the ``rules`` that
        compute its terms (``fallback``: per-example gradients by ``torch.func`` on
        its module alone) and the block it gets with ``hessian_structure='kron'``
        (``kronecker``, ``dense`` or ``diagonal``). Only for the engine's backends
        (``NativeGGN``, ``NativeEF``, the default)."""
        table = getattr(self.backend, "structure_table", None)
        if table is None:
            raise ValueError(
                f"structure_table describes the curvature engine; the backend "
                f"{type(self.backend).__name__} computes with its own library. Use "
                "backend=NativeGGN (the default) or NativeEF."
            )
        return table()

    def _backend_arguments(self) -> dict[str, Any]:
        """Extra backend arguments of a subclass (e.g. ``last_layer=True``)."""
        return {}

    # -- hyperparameters -----------------------------------------------------------
    @property
    def prior_precision(self) -> Tensor:
        """Prior precision: shape ``(1,)``, ``(n_layers,)`` or ``(n_params,)``."""
        if "prior_precision" in self._pending:
            return prior.as_prior_precision(
                self._pending["prior_precision"], None, None, dtype=self._dtype
            )
        return self._prior_precision

    @prior_precision.setter
    def prior_precision(self, value: float | Tensor) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
            raise ValueError(
                "prior_precision must be a positive number or a tensor of shape (), "
                f"(1,), (n_layers,) or (n_params,); got {type(value).__name__} "
                f"{value!r}."
            )
        if not self._bound:
            prior.as_prior_precision(value, None, None, dtype=self._dtype)
            self._pending["prior_precision"] = value
            return
        value = prior.as_prior_precision(
            value, self.n_layers, self.n_params, dtype=self._dtype, device=self._device
        )
        self._check_prior_precision(value)
        self._prior_precision = value
        self._posterior_cache = None

    def _check_prior_precision(self, value: Tensor) -> None:
        """Refuse prior structures the posterior form cannot hold (subclasses)."""

    @property
    def prior_precision_diag(self) -> Tensor:
        """The diagonal ``p0`` ``(n_params,)`` of the prior precision."""
        return prior.expand_prior_precision(self.prior_precision, self.params)

    @property
    def prior_mean(self) -> Tensor:
        """Prior mean: shape ``()`` or ``(n_params,)``."""
        if "prior_mean" in self._pending:
            return self._pending["prior_mean"]
        return self._prior_mean

    @prior_mean.setter
    def prior_mean(self, value: float | Tensor) -> None:
        value = torch.as_tensor(value, dtype=self._dtype, device=self._device)
        if value.numel() == 1:
            value = value.reshape(())
        elif not self._bound:
            self._pending["prior_mean"] = value
            return
        elif value.shape != (self.n_params,):
            raise ValueError(
                f"prior_mean must be a scalar or of shape ({self.n_params},); got "
                f"shape {tuple(value.shape)}."
            )
        if not torch.isfinite(value).all():
            raise ValueError("prior_mean must be finite.")
        self._prior_mean = value
        self._sq_distance = None  # squared distances of the MAP to the prior mean

    @property
    def sigma_noise(self) -> Tensor:
        """Observation noise standard deviation: 0-dim, or ``(C,)`` with one value
        per output."""
        return self._sigma_noise

    @sigma_noise.setter
    def sigma_noise(self, value: float | Tensor) -> None:
        value = torch.as_tensor(value, dtype=self._dtype, device=self._device)
        if value.ndim > 1 or value.numel() == 0:
            raise ValueError(
                "sigma_noise must be a scalar (a number, or a tensor of shape () or "
                f"(1,)) or one value per output (C,); got shape {tuple(value.shape)}."
            )
        if value.numel() == 1:
            value = value.reshape(())
        with torch.no_grad():
            if not bool(torch.isfinite(value).all()) or not bool((value > 0).all()):
                raise ValueError(
                    f"sigma_noise must be positive and finite; got {value}."
                )
            if not self.lik.has_noise and bool((value != 1).any()):
                raise ValueError(
                    f"sigma_noise must be 1 for likelihood={self.lik.name!r}; only "
                    f"regression has observation noise (got {value.tolist()})."
                )
        if value.ndim == 1:
            self._check_output_noise(value)
        self._sigma_noise = value
        self._posterior_cache = None

    def _check_output_noise(self, value: Tensor) -> None:
        """Refuse one noise per output where the structure cannot take it, or where
        it does not match the fitted outputs (per-output curvature)."""
        if not self.supports_output_noise:
            raise ValueError(
                f"sigma_noise with one value per output (shape {tuple(value.shape)}) "
                f"is not available for {type(self).__name__}: its curvature cannot "
                "be split by output. Use hessian_structure='full', 'diag' or 'kron' "
                "(all weights or last layer; 'full' and 'diag' also for a "
                "subnetwork), or a scalar sigma_noise."
            )
        fitted = getattr(self, "fitted", False)
        if fitted and not getattr(self, "_per_output", False):
            raise ValueError(
                "sigma_noise with one value per output needs the curvature of each "
                "output: this Laplace was fitted with a scalar sigma_noise. Set the "
                "vector sigma_noise before fit (e.g. torch.ones(C)) and fit again."
            )
        if fitted and value.numel() != self.n_outputs:
            raise ValueError(
                f"sigma_noise must have one value per output, shape "
                f"({self.n_outputs},); got shape {tuple(value.shape)}."
            )

    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        if (
            not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value <= 0
        ):
            raise ValueError(f"temperature must be a positive number; got {value!r}.")
        self._temperature = float(value)
        self._posterior_cache = None

    @property
    def _h_factor(self) -> Tensor:
        """``1 / (sigma_noise^2 * temperature)``, the scale of the curvature (0-dim;
        ``(C,)``, one per output, for a per-output noise)."""
        return 1 / (self.sigma_noise.square() * self.temperature)

    def _check_fit_batch(self, x: Inputs, y: Tensor | None = None) -> None:
        """Refuse training data of the wrong form before any work on them.

        The likelihood's ``check_fit_targets`` decides (regression targets must
        have the outputs' shape ``(batch, outputs)``: a 1-D ``y`` is refused, as
        laplace-torch does, rather than guessed). Reward-modeling inputs are not
        checked here: any input the model maps to pair logits ``(batch, 2)`` is
        valid (laplace-torch accepts them too).
        """
        if y is not None:
            self.lik.check_fit_targets(y)

    def _training_loss(self, train_loader, progress_bar) -> tuple[Tensor, int, int]:
        """Summed loss of all training data at the MAP, the number of outputs and
        the number of examples seen."""
        lik = self.lik
        loss, n_outputs, seen = torch.zeros_like(self.loss), None, 0
        batches = tqdm(train_loader, disable=not progress_bar, desc="loss")
        with torch.no_grad():
            for i, batch in enumerate(batches):
                x, y = split_batch(batch, self.dict_key_x, self.dict_key_y)
                x, y = to_device(x, self._device), y.to(self._device)
                self._check_fit_batch(x, y)
                f = self.model(x)
                loss_b = lik.loss(f, lik.check_targets(f, y))
                if not torch.isfinite(loss_b):
                    raise RuntimeError(
                        f"The loss of batch {i} is not finite (NaN or inf); check the "
                        "inputs and targets of that batch and the model's outputs. "
                        "The Laplace approximation was left as it was."
                    )
                loss = loss + loss_b
                n_outputs = f.shape[-1]
                seen += f.shape[0]
        if n_outputs is None:
            raise ValueError("train_loader yielded no batches.")
        return loss, n_outputs, seen

    # -- what subclasses provide -------------------------------------------------------
    def fit(self, train_loader: DataLoader) -> None:
        """Fit the approximation on ``train_loader`` (subclasses)."""
        raise NotImplementedError

    def sample(
        self, n_samples: int = 1, generator: torch.Generator | None = None
    ) -> Tensor:
        """Weight samples ``(n_samples, n_params)`` of the posterior (subclasses with
        a weight-space posterior)."""
        raise NotImplementedError(
            f"{type(self).__name__} has no weight-space posterior to sample; use "
            "functional_samples(x) for samples of the outputs."
        )

    # -- evidence ------------------------------------------------------------------
    def _check_fitted(self, action: str) -> None:
        if not self.fitted:
            raise RuntimeError(
                f"{type(self).__name__} is not fitted: call fit(train_loader) before "
                f"{action}."
            )

    @property
    def log_likelihood(self) -> Tensor:
        """Log likelihood of the training data at the MAP, from the summed loss.

        Classification and the other likelihoods without noise: ``-loss / T``;
        regression: ``-loss / (sigma^2 T) - N C log(sigma sqrt(2 pi))``, with one
        noise per output ``-sum_c loss_c / (sigma_c^2 T) - N sum_c log(sigma_c
        sqrt(2 pi))`` (``loss_c`` the loss of output ``c``). Differentiable in
        ``sigma_noise``.
        """
        factor = self._h_factor
        output_loss = getattr(self, "_output_loss", None)
        if factor.ndim == 1 and output_loss is not None:
            value = -(factor * output_loss).sum()
        else:  # 0 before fit: no data seen
            value = -(factor * self.loss).sum()
        if not self.n_data:
            return value
        return value + self.lik.log_normalizer(
            self.sigma_noise, self.n_data, self.n_outputs
        )

    @property
    def log_det_ratio(self) -> Tensor:
        """``log det P - log det P0``."""
        raise NotImplementedError

    @property
    def scatter(self) -> Tensor:
        raise NotImplementedError

    def log_marginal_likelihood(
        self, prior_precision: Tensor | None = None, sigma_noise: Tensor | None = None
    ) -> Tensor:
        """Laplace evidence ``log_lik - 0.5 (log det P - log det P0 + scatter)``.

        Parameters
        ----------
        prior_precision : torch.Tensor, optional
            replaces the current prior precision (kept as given, so the result is
            differentiable in it).
        sigma_noise : torch.Tensor, optional
            replaces the current observation noise (regression only).

        Returns
        -------
        log_marglik : torch.Tensor (0-dim)
        """
        self._check_fitted("log_marginal_likelihood")
        if prior_precision is not None:
            self.prior_precision = prior_precision
        if sigma_noise is not None:
            self.sigma_noise = sigma_noise
        value = self.log_likelihood - 0.5 * (self.log_det_ratio + self.scatter)
        return value.to(self._dtype)  # summed in the curvature's dtype

    # -- predictive ----------------------------------------------------------------
    def _parse_pred_type(self, pred_type: PredType | str) -> PredType:
        pred_type = parse_enum(PredType, pred_type, "pred_type")
        if pred_type not in self.pred_types:
            allowed = " or ".join(repr(p.value) for p in self.pred_types)
            raise ValueError(
                f"pred_type={pred_type.value!r} is not available for "
                f"{type(self).__name__}; use {allowed}."
            )
        return pred_type

    def _predictive_lik(self, fitting: bool = False) -> OutputLikelihood:
        """The likelihood whose predictive ``la(x)`` returns: reward modeling
        predicts as regression, except with ``fitting=True``, where it predicts as
        the classification of pairs it was fitted with (laplace-torch's meaning)."""
        return self.lik.predictive_likelihood(fitting)

    @property
    def _predicts_regression(self) -> bool:
        """Whether ``la(x)`` returns moments ``(mean, variance)``."""
        return self._predictive_lik().returns_moments

    def _regression_output(self, fitting: bool) -> bool:
        """Whether a predictive returns moments (see ``_predictive_lik``)."""
        return self._predictive_lik(fitting).returns_moments

    @property
    def _tunes_regression(self) -> bool:
        """Whether the grid search scores moments: reward modeling is tuned on its
        validation pairs, as the classification it was fitted with (laplace-torch's
        choice)."""
        return self._regression_output(fitting=True)

    def _check_predictable(self) -> None:
        """Refuse a predictive that needs a fit (subclasses may allow the
        prior-only predictive before ``fit``)."""
        self._check_fitted("predicting")

    @contextlib.contextmanager
    def _forward_kwargs(self, model_kwargs: dict[str, Any]) -> Iterator[None]:
        """Pass ``model_kwargs`` to every forward pass of the model in the block."""
        previous, self._model_kwargs = self._model_kwargs, dict(model_kwargs)
        try:
            yield
        finally:
            self._model_kwargs = previous

    @property
    def _forward_model(self) -> nn.Module:
        """The model, with the keyword arguments of the current predictive call bound
        to its forward (the same parameters and modules)."""
        if not self._model_kwargs:
            return self.model
        return _BoundKwargs(self.model, self._model_kwargs)

    def __call__(
        self,
        x: Inputs,
        pred_type: PredType | str = PredType.GLM,
        joint: bool = False,
        link_approx: LinkApprox | str = LinkApprox.PROBIT,
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        fitting: bool = False,
        **model_kwargs: Any,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Posterior predictive at ``x``.

        Parameters
        ----------
        x : torch.Tensor or MutableMapping
            inputs ``(batch, ...)``.
        pred_type : {'glm', 'nn'}
            linearized (GLM) predictive, or network evaluated at posterior samples.
        joint : bool
            regression (and 'poisson') with 'glm': the joint covariance over the
            batch, ``(batch * outputs, batch * outputs)``, with the mean flattened.
        link_approx : {'probit', 'bridge', 'bridge_norm', 'mc'}
            classification with 'glm'; 'nn' needs 'mc'. 'binary' and 'multilabel'
            take 'probit' (of the sigmoid) and 'mc'; 'poisson' gives the exact
            lognormal moments of the rates, or with 'mc' their Monte-Carlo
            estimate (the likelihood's ``links``).
        n_samples : int
            samples of 'mc' and of 'nn'.
        diagonal_output : bool
            'glm' only: keep only the output variances.
        generator : torch.Generator, optional
        fitting : bool, default=False
            reward modeling only: predict as the classification of pairs the
            approximation was fitted with (probabilities of ``x`` of pairs)
            instead of as regression; no effect for the other likelihoods.
        **model_kwargs
            keyword arguments of the model's forward, passed to every forward pass
            (both predictives).

        Returns
        -------
        classification: probabilities ``(batch, classes)``; regression: ``(f_mu,
        f_var)`` with ``f_mu`` ``(batch, outputs)`` and ``f_var`` ``(batch, outputs,
        outputs)`` ('glm'), ``(batch, outputs)`` ('nn' or ``diagonal_output``).
        The other likelihoods return their ``predictive``: 'binary' and
        'multilabel' the probabilities ``(batch, outputs)`` of ``y = 1``; 'poisson'
        the mean and (co)variance of the rates ``exp(f)``;
        'heteroscedastic_regression' the mean and (co)variance of ``y``.
        """
        pred_type = self._parse_pred_type(pred_type)
        link_approx = parse_enum(LinkApprox, link_approx, "link_approx")
        if pred_type == PredType.NN and link_approx != LinkApprox.MC:
            raise ValueError(
                "pred_type='nn' averages the network over posterior samples: it needs "
                f"link_approx='mc' (got {link_approx.value!r})."
            )
        check_n_samples(n_samples)
        lik = self._predictive_lik(fitting)
        if pred_type != PredType.NN:
            lik.check_link(link_approx)
        if joint and lik.returns_moments and not lik.supports_joint:
            raise ValueError(
                f"joint=True is not available for likelihood={lik.name!r}: its "
                "predictive is per datum. Use joint=False."
            )
        self._check_predictable()
        x = to_device(x, self._device)
        check_predictive(self, x, pred_type, joint, n_samples)  # raises before work
        with self._forward_kwargs(model_kwargs):
            if pred_type == PredType.NN:
                return lik.predictive_from_samples(
                    self._nn_samples(x, n_samples, generator)
                )
            joint = joint and lik.returns_moments
            diagonal = not joint and not lik.needs_covariance(
                link_approx, diagonal_output
            )
            f_mu, f_var = self._glm_distribution(x, joint, diagonal)
        prediction = lik.predictive(f_mu, f_var, link_approx, n_samples, generator)
        if diagonal_output and lik.returns_moments and not joint:
            mean, var = prediction
            if var.ndim == 3:
                prediction = mean, var.diagonal(dim1=-2, dim2=-1)
        return prediction

    predictive = __call__

    def functional_samples(
        self,
        x: Inputs,
        pred_type: PredType | str = PredType.GLM,
        n_samples: int = 1,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        joint: bool = False,
    ) -> Tensor:
        """Samples ``(n_samples, batch, outputs)`` of the network's outputs ``f`` at
        ``x`` (logits for classification: no link applied).

        'glm' draws from the Gaussian ``N(f_mu, f_var)`` of the linearized network
        (per datum, or jointly over the batch with ``joint``; ``diagonal_output``
        drops the covariances between outputs); 'nn' evaluates the network at
        weight samples ``theta ~ N(theta_MAP, P^-1)``. With ``generator`` the
        samples are reproducible.
        """
        pred_type = self._parse_pred_type(pred_type)
        check_n_samples(n_samples)
        self._check_predictable()
        x = to_device(x, self._device)
        if pred_type == PredType.NN:
            return self._nn_samples(x, n_samples, generator)
        f_mu, f_var = self._glm_distribution(x, joint, diagonal_output and not joint)
        if not joint:
            return sample_outputs(f_mu, f_var, n_samples, generator)
        # the joint Gaussian over the batch, ordered datum-major
        samples = sample_outputs(f_mu[None], f_var[None], n_samples, generator)
        return samples.reshape(n_samples, batch_size(x, self.dict_key_x), -1)

    def predictive_samples(
        self,
        x: Inputs,
        pred_type: PredType | str = PredType.GLM,
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        fitting: bool = False,
        joint: bool = False,
    ) -> Tensor:
        """Samples ``(n_samples, batch, outputs)`` of the predictive at ``x``: the
        ``functional_samples`` through the likelihood's ``inverse_link`` (the
        softmax for classification and for reward modeling with ``fitting=True``,
        the sigmoid for 'binary' and 'multilabel', ``exp`` for 'poisson'; none for
        regression)."""
        f = self.functional_samples(
            x, pred_type, n_samples, diagonal_output, generator, joint=joint
        )
        return self._predictive_lik(fitting).inverse_link(f)

    def _glm_distribution(
        self, x: Inputs, joint: bool, diagonal_output: bool
    ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _nn_samples(
        self, x: Inputs, n_samples: int, generator: torch.Generator | None
    ) -> Tensor:
        raise NotImplementedError

    def _validation_predictions(self, val_loader, pred_type, link_approx, n_samples):
        """A callable yielding ``(prediction, y)`` per validation batch at the current
        hyperparameters; regression: ``(f_mu, f_var)``, with ``f_var`` ``(N, C, C)``
        ('glm') or ``(N, C)`` ('nn'); reward modeling: the probabilities of the
        pairs (``fitting=True``)."""

        def predictions():
            with torch.no_grad():
                for batch in val_loader:
                    x, y = split_batch(batch, self.dict_key_x, self.dict_key_y)
                    pred = self(
                        x,
                        pred_type,
                        link_approx=link_approx,
                        n_samples=n_samples,
                        fitting=True,
                    )
                    yield pred, y.to(self._device)

        return predictions

    # -- prior tuning --------------------------------------------------------------
    def optimize_prior_precision(
        self,
        pred_type: PredType | str = PredType.GLM,
        method: TuningMethod | str = TuningMethod.MARGLIK,
        n_steps: int = 100,
        lr: float = 1e-1,
        init_prior_prec: float | Tensor = 1.0,
        prior_structure: PriorStructure | str = PriorStructure.SCALAR,
        val_loader: DataLoader | None = None,
        loss: Callable[[Tensor, Tensor], Tensor | float] | None = None,
        log_prior_prec_min: float = -4,
        log_prior_prec_max: float = 4,
        grid_size: int = 100,
        link_approx: LinkApprox | str = LinkApprox.PROBIT,
        n_samples: int = 100,
        verbose: bool = False,
        progress_bar: bool = False,
        log_prior_prec_base: float = 10.0,
    ) -> None:
        """Tune the prior precision post hoc.

        Parameters
        ----------
        pred_type : {'glm', 'nn'}
            predictive of the grid search.
        method : {'marglik', 'gridsearch'}
            'marglik': ``n_steps`` Adam steps of size ``lr`` on the log prior
            precision, maximising the Laplace evidence. 'gridsearch': the value of
            ``grid_size`` values ``log_prior_prec_base ** linspace(
            log_prior_prec_min, log_prior_prec_max, grid_size)`` with the lowest
            ``loss`` on ``val_loader``.
        init_prior_prec : float or torch.Tensor
            start of 'marglik'; a tensor keeps its own structure.
        prior_structure : {'scalar', 'layerwise', 'diag'}
            structure of the tuned precision when ``init_prior_prec`` is a scalar.
        val_loader : DataLoader
            validation data, needed by 'gridsearch'.
        loss : torchmetrics.Metric or callable, optional
            a Metric is updated batch by batch (a running value); a callable gets
            all predictions and targets at once; for regression it gets the
            predictive mean ``f_mu``. Defaults to the running NLL (classification)
            or, for regression, the running Gaussian NLL of the targets under
            ``N(f_mu, f_var + sigma_noise^2)`` (laplace-torch's mean squared error
            of ``f_mu`` does not depend on the prior precision).
        link_approx, n_samples : link approximation of the classification
            predictive and its number of samples.
        verbose : bool
            print the tuned prior precision.
        progress_bar : bool
            show progress over the steps or the grid.
        log_prior_prec_base : float, default=10
            base of the grid of 'gridsearch' (positive, not 1).
        """
        method = parse_enum(TuningMethod, method, "method")
        pred_type = self._parse_pred_type(pred_type)
        # the 'nn' predictive has one link: the average over weight samples
        link_approx = (
            LinkApprox.MC
            if pred_type == PredType.NN
            else parse_enum(LinkApprox, link_approx, "link_approx")
        )
        check_n_samples(n_samples)
        init = prior.prior_precision_of_structure(
            init_prior_prec,
            prior_structure,
            self.n_layers,
            self.n_params,
            dtype=self._dtype,
            device=self._device,
        )
        self._check_prior_precision(init)
        if method == TuningMethod.MARGLIK:
            prior.check_marglik_arguments(n_steps, lr)
            self._check_fitted("optimize_prior_precision")
            prior.tune_by_marglik(self, init, n_steps, lr, progress_bar)
        else:
            prior.check_gridsearch_arguments(
                val_loader, loss, log_prior_prec_min, log_prior_prec_max, grid_size
            )
            _check_grid_base(log_prior_prec_base)
            self._check_fitted("optimize_prior_precision")
            check_gridsearch(self, val_loader, pred_type, n_samples)
            grid = torch.logspace(
                log_prior_prec_min,
                log_prior_prec_max,
                grid_size,
                base=float(log_prior_prec_base),
                dtype=self._dtype,
                device=self._device,
            )
            prior.tune_by_gridsearch(
                self,
                grid,
                init.numel(),
                val_loader,
                loss,
                pred_type,
                link_approx,
                n_samples,
                progress_bar,
            )
        if verbose:
            print(f"Optimized prior precision: {self.prior_precision}")

    # -- serialization -------------------------------------------------------------
    def _parameter_names(self) -> list[str]:
        names = {id(p): n for n, p in self.model.named_parameters()}
        return [names.get(id(p), "?") for p in self.params]


class _BoundKwargs(nn.Module):
    """``model`` with keyword arguments bound to its forward: ``forward(x) =
    model(x, **kwargs)``; it holds the same modules and parameters."""

    def __init__(self, model: nn.Module, kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.kwargs = kwargs

    def forward(self, x: Inputs) -> Tensor:
        return self.model(x, **self.kwargs)


def _check_grid_base(base: Any) -> None:
    if (
        isinstance(base, bool)
        or not isinstance(base, (int, float))
        or not math.isfinite(base)
        or base <= 0
        or base == 1
    ):
        raise ValueError(
            "log_prior_prec_base must be a positive number other than 1 (the grid "
            f"is base ** linspace(min, max, grid_size)); got {base!r}."
        )


# the all-weights classes live in laplace.parametric and laplace.functional, whose
# modules subclass BaseLaplace: imported once BaseLaplace exists, they are real
# attributes of this module (laplace/__init__ imports this module first)
from laplace.functional import (  # noqa: E402
    ELLA,
    BaseFunctionalLaplace,
    FunctionalLaplace,
    VaLLA,
)
from laplace.parametric import (  # noqa: E402
    DiagLaplace,
    FullLaplace,
    KronLaplace,
    LowRankLaplace,
    ParametricLaplace,
)

__all__ = [
    "BaseLaplace",
    "ParametricLaplace",
    "FullLaplace",
    "KronLaplace",
    "DiagLaplace",
    "LowRankLaplace",
    "BaseFunctionalLaplace",
    "FunctionalLaplace",
    "ELLA",
    "VaLLA",
]
