r"""What ELLA and VaLLA share: a Gaussian process over the outputs of the
linearized network, ``f(x) ~ GP(f_MAP(x), K(x, x'))`` with the prior kernel
``K(x, x') = J(x) J(x')^T / delta`` (``delta`` a scalar prior precision, the prior
mean zero), approximated by a low-rank posterior that the subclass fits.

A subclass says how the posterior covariance of the outputs follows from their
Jacobians (``_set_covariance``, for the factored Jacobians of a batch of inputs or
explicit ones); this base class turns that into
the predictive, the samples, the validation score, and the checkpoint's identity
of the pretrained model. The mean is the network's output: neither method moves
it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from laplace.baselaplace import BaseLaplace
from laplace.curvature.curvature import CurvatureInterface
from laplace.data import Inputs, batch_size, split_batch, to_device
from laplace.functional import kernel
from laplace.functional.base import BaseFunctionalLaplace, _check_gp_backend
from laplace.utils.enums import LinkApprox, PredType, parse_enum
from laplace.utils.matrix import linalg_dtype

Tensor = torch.Tensor


class ScalableFunctionalLaplace(BaseFunctionalLaplace):
    """Base of the low-rank function-space methods ELLA and VaLLA (not for
    direct use). The prior mean must be zero and the prior precision a scalar:
    the kernel is ``J J^T / delta``."""

    pred_types: ClassVar[tuple[PredType, ...]] = (PredType.GP, PredType.GLM)
    supports_reward_modeling = True

    def __init__(
        self,
        model: nn.Module,
        likelihood,
        sigma_noise: float | Tensor = 1.0,
        prior_precision: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend: type[CurvatureInterface] | None = None,
        backend_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(prior_mean, (int, float)) and not isinstance(prior_mean, bool):
            nonzero = prior_mean != 0
        else:
            nonzero = bool(torch.as_tensor(prior_mean).ne(0).any())
        if nonzero:
            raise ValueError(
                f"{type(self).__name__} takes a zero prior mean (the GP's mean is the "
                f"network's output); got prior_mean={prior_mean!r}."
            )
        self.mean = None
        BaseLaplace.__init__(
            self,
            model,
            likelihood,
            sigma_noise=sigma_noise,
            prior_precision=prior_precision,
            prior_mean=0.0,
            temperature=temperature,
            enable_backprop=enable_backprop,
            dict_key_x=dict_key_x,
            dict_key_y=dict_key_y,
            backend=backend,
            backend_kwargs=backend_kwargs,
        )
        _check_gp_backend(self._backend_cls, self.backend_kwargs)
        self.fit_history_: dict[str, list[Any]] = {}

    @property
    def _work_dtype(self) -> torch.dtype:
        """The dtype the Jacobians, the fitted posterior and its linear algebra are
        held in: the model's, but float32 for float16 and bfloat16 models (which
        have no decompositions on the CPU and too few digits for a kernel's
        eigenvalues); the predictive comes back in the model's dtype."""
        return linalg_dtype(self._dtype)

    def _jacobian_set(
        self, x: Inputs, create_graph: bool = False
    ) -> tuple[Tensor, kernel.JacobianSet]:
        """Outputs and Jacobians at ``x`` (the model's), in ``_work_dtype``."""
        f, X = super()._jacobian_set(x, create_graph)
        if f.dtype == self._work_dtype:
            return f, X
        return f.to(self._work_dtype), X.to(self._work_dtype)

    @BaseFunctionalLaplace.prior_precision.setter
    def prior_precision(self, value: float | Tensor) -> None:
        self._check_prior_precision(value)  # before the base's message on lengths
        BaseFunctionalLaplace.prior_precision.fset(self, value)

    def _check_prior_precision(self, value: float | Tensor) -> None:
        if isinstance(value, Tensor) and value.numel() != 1:
            raise ValueError(
                f"{type(self).__name__} takes a scalar prior precision (the kernel is "
                f"J J^T / delta); got {value.numel()} values."
            )

    # -- what is not defined for these methods -----------------------------------
    @property
    def log_likelihood(self) -> Tensor:
        """Not tracked: the fit does not accumulate the training log likelihood.

        Raises
        ------
        NotImplementedError
            always.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not accumulate the training log likelihood; "
            "it has no Laplace marginal likelihood either. Tune on validation data."
        )

    def log_marginal_likelihood(self, *args: Any, **kwargs: Any) -> Tensor:
        """Not defined for this approximation.

        Raises
        ------
        NotImplementedError
            always; tune its hyperparameters on validation data.
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no Laplace marginal likelihood (its posterior "
            "is not the Laplace posterior of a subset or of the weights); tune its "
            "hyperparameters on validation data."
        )

    @property
    def log_det_ratio(self) -> Tensor:
        return self.log_marginal_likelihood()  # raises: not defined here

    @property
    def scatter(self) -> Tensor:
        return self.log_marginal_likelihood()  # raises: not defined here

    # -- the posterior of the outputs ----------------------------------------------
    def _set_covariance(self, X: kernel.JacobianSet, joint: bool) -> Tensor:
        """Covariance of the outputs at the inputs of ``X``: ``(N, C, C)``, or
        ``(N C, N C)`` datum-major with ``joint`` (subclasses)."""
        raise NotImplementedError

    def _jacobian_covariance(self, jacobians: Tensor, joint: bool) -> Tensor:
        """As ``_set_covariance`` from explicit Jacobians ``(N, C, P)``."""
        X = kernel.JacobianSet(*jacobians.shape[:2], [], jacobians)
        return self._set_covariance(X, joint).to(self._dtype)

    def _check_predictable(self) -> None:
        if not self.fitted:
            raise RuntimeError(
                f"{type(self).__name__} is not fitted: call fit(train_loader) before "
                "predicting."
            )

    def _glm_distribution(self, x, joint, diagonal_output):
        if batch_size(x, self.dict_key_x) == 0:
            raise ValueError(
                "Function-space predictions need at least one input; got an empty "
                "batch."
            )
        f, X = self._jacobian_set(x, create_graph=self.enable_backprop)
        if not self.enable_backprop:
            f = f.detach()
        with torch.set_grad_enabled(self.enable_backprop and torch.is_grad_enabled()):
            cov = self._set_covariance(X, joint)
        f, cov = f.to(self._dtype), cov.to(self._dtype)  # 16-bit models: theirs
        if joint:
            return f.flatten(), cov
        if diagonal_output:
            cov = cov.diagonal(dim1=-2, dim2=-1)
        return f, cov

    def _explicit_jacobians(self, jacobians: Tensor) -> Tensor:
        self._check_predictable()
        if jacobians.ndim != 3 or jacobians.shape[-1] != self.n_params:
            raise ValueError(
                "jacobians must have shape (batch, outputs, "
                f"{self.n_params}); got {tuple(jacobians.shape)}."
            )
        return jacobians.to(self._work_dtype)

    def functional_variance(self, jacobians: Tensor) -> Tensor:
        """Posterior covariance of each input's outputs from their Jacobians.

        Parameters
        ----------
        jacobians : torch.Tensor ``(batch, C, P)``

        Returns
        -------
        torch.Tensor ``(batch, C, C)``
        """
        return self._jacobian_covariance(self._explicit_jacobians(jacobians), False)

    def functional_covariance(self, jacobians: Tensor) -> Tensor:
        """Joint posterior covariance of the outputs of a batch from their
        Jacobians ``(batch, C, P)``: ``(batch * C, batch * C)``, datum-major."""
        return self._jacobian_covariance(self._explicit_jacobians(jacobians), True)

    def functional_samples(
        self,
        x: Inputs,
        pred_type: PredType | str = PredType.GLM,
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        joint: bool = False,
    ) -> Tensor:
        """Samples ``(n_samples, batch, C)`` of the GP over the outputs at ``x``
        (logits for classification; per input, or jointly over the batch with
        ``joint``). Every ``pred_type`` ('gp', 'glm', 'nn') draws from the GP: the
        approximation has no weight posterior."""
        parse_enum(PredType, pred_type, "pred_type")
        return BaseLaplace.functional_samples(
            self, x, PredType.GP, n_samples, diagonal_output, generator, joint=joint
        )

    # -- validation ------------------------------------------------------------------
    def _validation_nll(self, val_loader: Iterable) -> float:
        """Mean negative log predictive density of the validation data (the
        likelihood's ``default_metric``): the probit predictive for classification
        (reward modeling: of its pairs), ``N(f, f_var + sigma^2 I)`` for regression,
        the likelihood's own predictive otherwise."""
        score = self._new_score()
        with torch.no_grad():
            for batch in val_loader:
                x, y = split_batch(batch, self.dict_key_x, self.dict_key_y)
                x, y = to_device(x, self._device), y.to(self._device)
                f, var = self._glm_distribution(x, joint=False, diagonal_output=False)
                self._add_to_score(score, f, var, y)
        return _mean_of(score)

    def _new_score(self):
        """The running validation NLL (the likelihood's ``default_metric``)."""
        from laplace.prior import distributed_metric

        return distributed_metric(self._predictive_lik(fitting=True)).to(self._device)

    def _add_to_score(self, score, f: Tensor, var: Tensor, y: Tensor) -> None:
        """Add a batch of moments ``f`` ``(N, C)``, ``var`` ``(N, C, C)`` and targets
        to the running score, through the likelihood's predictive (the probit link
        where it has one)."""
        lik = self._predictive_lik(fitting=True)
        link = LinkApprox.PROBIT if LinkApprox.PROBIT in lik.links else LinkApprox.MC
        # regression scores each output by its own variance (laplace-torch's)
        if lik.has_noise or not lik.needs_covariance(link, False):
            var = var.diagonal(dim1=-2, dim2=-1)
        prediction = lik.predictive(f, var, link)
        score.update(*lik.metric_inputs(prediction, score, self.sigma_noise), y)

    # -- checkpoints -----------------------------------------------------------------
    def _model_fingerprint(self) -> dict[str, Any]:
        """What identifies the pretrained model: a digest of every parameter and
        buffer, the names of the treated parameters, and the module structure."""
        digest = {}
        for name, tensor in self.model.state_dict().items():
            data = tensor.detach().cpu().contiguous().reshape(-1)
            if data.dtype == torch.bool:
                data = data.to(torch.uint8)
            digest[name] = hashlib.sha256(
                data.view(torch.uint8).numpy().tobytes()
            ).hexdigest()
        return {
            "state_dict": digest,
            "active_parameters": self._parameter_names(),
            "module_structure": [
                (name, type(m).__name__) for name, m in self.model.named_modules()
            ],
        }

    def _check_checkpoint(self, state: dict[str, Any], required: set[str]) -> None:
        """Refuse a checkpoint that is not this class's, not fitted, of another
        likelihood, or of another pretrained model, before anything changes."""
        if state.get("cls_name", type(self).__name__) != type(self).__name__:
            raise ValueError(
                f"The state dict is of a {state['cls_name']}, not of a "
                f"{type(self).__name__}."
            )
        missing = required - set(state)
        if missing:
            raise ValueError(
                f"Not a state dict of {type(self).__name__}: missing keys "
                f"{sorted(missing)}."
            )
        if not state.get("fitted", False):
            raise ValueError("The state dict is of an unfitted approximation.")
        if state["likelihood"] != self.lik.name:
            raise ValueError(
                f"The state dict is for likelihood={state['likelihood']!r}, not "
                f"{self.lik.name!r}."
            )
        mine, theirs = self._model_fingerprint(), state["model_fingerprint"]
        for key, what in (
            ("module_structure", "module structure"),
            ("active_parameters", "treated parameters"),
            ("state_dict", "parameters and buffers"),
        ):
            if mine[key] != theirs[key]:
                raise ValueError(
                    f"The state dict was fitted to another pretrained model: its "
                    f"{what} differ from this model's. Load it into an approximation "
                    "of the model it was fitted to, unchanged."
                )


def _mean_of(score) -> float:
    if int(getattr(score, "n_data", getattr(score, "n_valid_labels", 1))) == 0:
        raise ValueError("val_loader yielded no data.")
    value = float(score.compute())
    return value if math.isfinite(value) else float("inf")


def check_scalar_hyper(value: Any, name: str) -> float:
    """A positive finite number (also a one-element tensor), or raise naming it."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a positive number; got {value!r}.")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be positive and finite; got {value!r}.")
    return float(value)


__all__ = ["ScalableFunctionalLaplace"]
