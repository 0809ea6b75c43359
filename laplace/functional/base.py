r"""The GP view of the linearized network: FunctionalLaplace.

Linearized at the MAP, the network is a linear model in its weights; under the prior
``N(mu0, P0^-1)`` it is a Gaussian process with kernel ``K(x, x') = J(x) P0^-1
J(x')^T`` (scalar ``p0``: ``J J^T / p0``) and mean ``f(x)`` at the MAP. Inference is
done in that GP on ``M = n_subset`` training data drawn without replacement (as
``numpy.random.default_rng(seed).choice(N, M, replace=False)``):

- likelihood precision ``L = l D`` with ``D`` the diagonal of the output Hessians
  (ones for regression, ``p (1 - p)`` for classification: the diagonal approximation)
  and ``l = N / (M sigma^2 T)``: each subset point stands for ``N / M`` training
  points, so that ``J_M^T L J_M`` estimates the GGN of the whole training set (with
  ``M = N`` it is that GGN);
- predictive ``f_var(x) = k(x, x) - K_{xM} (K_MM + L^-1)^-1 K_{Mx}``;
- evidence ``log p(D) = log_lik - 0.5 (log det(I + L^1/2 K_MM L^1/2) + scatter)``
  with the log likelihood of all ``N`` training data and
  ``scatter = p0 |theta_MAP - mu0|^2``. With ``M = N`` both equal the weight-space
  Laplace quantities of the GGN with diagonal output Hessians (for regression: the
  GGN itself, so FullLaplace's).

The linear algebra is ``laplace.functional.gp``; the kernel blocks come from
``laplace.functional.kernel`` without forming Jacobians.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from laplace.baselaplace import BaseLaplace
from laplace.curvature.backpack import BackPackGGN
from laplace.curvature.curvature import CurvatureInterface, GGNInterface
from laplace.data import Inputs, dataset_size, split_batch, subset_indices, to_device
from laplace.functional import kernel, subset
from laplace.functional.gp import KernelSystem
from laplace.utils import distributed
from laplace.utils._checks import _check_int, check_state
from laplace.utils.enums import (
    LinkApprox,
    PredType,
    PriorStructure,
    TuningMethod,
)
from laplace.utils.memory import check_fit

Tensor = torch.Tensor

#: largest number of entries of a cross-kernel block formed at once
_BLOCK_ENTRIES = 1 << 24
#: the subset's Jacobian sets are kept in memory up to this many entries, and
#: recomputed batch by batch from the stored inputs beyond it
_CACHE_ENTRIES = 1 << 27


@dataclass
class GPTerms:
    """What the GP predictive at some inputs needs that the prior does not change:
    outputs ``(N, C)``, the prior kernel per datum ``J J^T`` (``(N, C, C)``, or
    ``(N, C)`` when only variances are needed or outputs are independent) and
    ``D^1/2 J_M J^T`` in the eigenbasis of the kernel system."""

    f: Tensor
    prior: Tensor
    rotated: Tensor


class BaseFunctionalLaplace(BaseLaplace):
    r"""Laplace approximation as GP inference on a subset of the training data.

    Parameters
    ----------
    model : torch.nn.Module
    likelihood : str or laplace.likelihood.OutputLikelihood
        any likelihood but 'reward_modeling'; the likelihood precision is the
        diagonal of its output Hessians (exact for 'regression', 'binary',
        'multilabel' and 'poisson', whose output Hessians are diagonal).
    n_subset : int
        number of training data the GP is conditioned on (at most the size of the
        training set); drawn reproducibly from ``seed`` in ``fit``.
    sigma_noise, prior_precision, prior_mean, temperature, enable_backprop,
    dict_key_x, dict_key_y
        as ``laplace.baselaplace.BaseLaplace``; the prior precision is a
        scalar (the kernel is ``J J^T / p0``).
    backend : a GGN backend class, optional (``FunctionalLaplace``: BackPackGGN)
        the GP view is the GGN's: EF and Hessian backends are refused. The kernel
        itself is computed by this library from backpropagated factors (for every
        backend, so mapping (dict) batches work whichever is named).
    backend_kwargs : dict, optional
    asdl_fisher_kwargs : dict, optional
        kept for laplace-torch's signature (``BaseFunctionalLaplace``): the GP
        view computes no Fisher through ASDL.
    independent_outputs : bool, default=False
        keep only the ``c = c'`` blocks of the kernel: ``C`` independent GPs of
        ``M x M`` instead of one of ``M C x M C``.
    seed : int, default=0
        seed of the subset.
    """

    supports_reward_modeling = False
    pred_types: ClassVar[tuple[PredType, ...]] = (PredType.GP, PredType.GLM)
    #: ``(subset_of_weights, hessian_structure)``
    key: ClassVar[tuple[str, str]]
    #: whether the kernel has no cross-output terms whatever ``independent_outputs``
    #: says (the last layer)
    outputs_decouple: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        likelihood,
        n_subset: int,
        sigma_noise: float | Tensor = 1.0,
        prior_precision: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend: type[CurvatureInterface] | None = None,
        backend_kwargs: dict[str, Any] | None = None,
        independent_outputs: bool = False,
        seed: int = 0,
        asdl_fisher_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.n_subset = _check_int(n_subset, "n_subset", minimum=1)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an integer; got {seed!r}.")
        self.seed = int(seed)
        self.independent_outputs = bool(independent_outputs)
        #: the MAP ``(n_params,)``, None while the parameters are unknown
        self.mean: Tensor | None = None
        self._system: KernelSystem | None = None
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
        )
        _check_gp_backend(self._backend_cls, self.backend_kwargs)

    def _on_bind(self) -> None:
        self.mean = parameters_to_vector(self.params).detach()

    def _check_prior_precision(self, value: Tensor) -> None:
        if value.numel() != 1:
            raise ValueError(
                f"{type(self).__name__} takes a scalar prior precision (the GP kernel "
                f"is J J^T / p0); got {value.numel()} values. Use prior_structure="
                "'scalar', or a weight-space Laplace (hessian_structure='full', "
                "'kron' or 'diag') for layer-wise or per-parameter priors."
            )

    @property
    def _independent(self) -> bool:
        return self.independent_outputs or self.outputs_decouple

    # -- Jacobians: what a subclass may change ---------------------------------------
    def _jacobian_set(
        self, x: Inputs, create_graph: bool = False
    ) -> tuple[Tensor, kernel.JacobianSet]:
        """Outputs ``(N, C)`` and the Jacobians of the treated parameters at ``x``."""
        return kernel.jacobian_set(self._forward_model, self.params, x, create_graph)

    # -- fit ---------------------------------------------------------------------------
    def fit(
        self,
        train_loader: DataLoader,
        progress_bar: bool = False,
        *,
        override: bool = True,
    ) -> None:
        """Fit the GP posterior at the current weights of the model.

        The log likelihood is that of all training data; the kernel is built on
        ``n_subset`` of them, drawn from ``seed``.

        Parameters
        ----------
        train_loader : DataLoader
            ``train_loader.dataset`` must have a length and be indexable (the subset
            is taken from it, in batches of ``train_loader.batch_size`` with its
            ``collate_fn``).
        progress_bar : bool, default=False
        override : bool, default=True
            ``False`` (adding to a previous fit) is not possible for a GP posterior
            on a subset, and is refused.
        """
        if not override:
            raise ValueError(
                f"{type(self).__name__}.fit cannot add to a previous fit "
                "(override=False): the GP is conditioned on one subset. Fit once on "
                "all the training data."
            )
        red = distributed.reduction()
        with distributed.agreement(red, "fit", lambda: self._signature(train_loader)):
            N = dataset_size(train_loader)
            if self.n_subset > N:
                raise ValueError(
                    f"n_subset={self.n_subset} exceeds the {N} training data; choose "
                    f"n_subset <= {N}."
                )
            train_loader = check_fit(self, train_loader)  # raises before any batch
        distributed.check_loader(train_loader, red)
        self.model.eval()
        with distributed.agreement(red, "fit") as agreed:
            loss, n_outputs, seen = self._training_loss(train_loader, progress_bar)
            agreed.report(seen=seen)
        # the subset is drawn from the data set, the same on every rank: the
        # ranks share the kernel's blocks
        n_subset_of = N
        if red is not None:
            loss, N = distributed.all_reduce_sum(loss, red), agreed.total("seen")
        indices = subset_indices(n_subset_of, self.n_subset, self.seed)
        inputs = subset.inputs_of(
            train_loader, indices, self.dict_key_x, self.dict_key_y, self._device
        )
        sets, diagonals = [], []
        lik = self.lik
        for x in tqdm(inputs, disable=not progress_bar, desc="kernel"):
            f, J = self._jacobian_set(x)
            sets.append(J)
            diagonals.append(lik.hessian_moments(f)[0])
        sqrt_D = torch.cat(diagonals).clamp_min(0).sqrt()  # (M, C)
        cached = sets if sum(s.numel() for s in sets) <= _CACHE_ENTRIES else None
        G = subset.gram(
            self._jacobian_set,
            inputs,
            cached,
            n_outputs,
            self._independent,
            dtype=self._dtype,
            device=self._device,
            block_entries=_BLOCK_ENTRIES,
            dict_key_x=self.dict_key_x,
            share=None if red is None else (red.rank, red.world_size),
        )
        if red is not None:
            distributed.all_reduce_([G], red)
        if not bool(torch.isfinite(G.sum())):
            raise RuntimeError(
                "The kernel of the subset is not finite (NaN or inf in the Jacobians "
                "of the model); the Laplace approximation was left as it was."
            )
        subset.scale_by_hessian(G, sqrt_D, self._independent)
        self.mean = parameters_to_vector(self.params).detach()
        self.loss, self.n_data, self.n_outputs = loss, N, n_outputs
        self.subset_indices = torch.as_tensor(indices)
        self._subset_inputs = inputs
        self._subset_cache = kernel.cat(cached) if cached is not None else None
        self._sqrt_D = sqrt_D
        self._system = KernelSystem(G)
        self.fitted = True

    def _signature(self, train_loader: DataLoader) -> dict:
        """``distributed.signature`` and what draws the subset: it must be the same
        data on every rank."""
        return {
            **distributed.signature(self),
            "n_subset": self.n_subset,
            "seed": self.seed,
            "len(train_loader.dataset)": dataset_size(train_loader),
        }

    def _subset_sets(self) -> Iterator[tuple[slice, kernel.JacobianSet]]:
        """The subset's Jacobian sets with their rows (data), cached or recomputed."""
        if self._subset_cache is not None:
            yield slice(0, self._subset_cache.n), self._subset_cache
            return
        start = 0
        for x in self._subset_inputs:
            _, J = self._jacobian_set(x)
            yield slice(start, start + J.n), J
            start += J.n

    # -- the GP posterior ----------------------------------------------------------
    @property
    def gp_kernel_prior_variance(self) -> Tensor:
        """Prior variance ``1 / p0`` of the kernel ``J J^T / p0``, shape ``(1,)``."""
        return 1 / self.prior_precision

    @property
    def _likelihood_scale(self) -> Tensor:
        """``l = N / (M sigma^2 T)``: each subset point stands for ``N / M``."""
        return self._h_factor * (self.n_data / self.n_subset)

    def _c(self) -> Tensor:
        return self._likelihood_scale / self.prior_precision[0]

    @property
    def log_det_ratio(self) -> Tensor:
        """``log det(I + L^1/2 K_MM L^1/2)``; with ``M = N`` it is
        ``log det P - log det P0`` of the weight-space GGN posterior (diagonal
        output Hessians)."""
        self._check_fitted("log_det_ratio")
        return self._system.logdet(self._c())

    @property
    def scatter(self) -> Tensor:
        """``p0 |theta_MAP - mu0|^2``: the prior's share of the evidence, in weight
        space (equal to the GP's ``alpha^T K alpha`` at an exact MAP, and defined
        without inverting ``K``)."""
        self._check_fitted("scatter")
        delta = self.mean - self.prior_mean
        return self.prior_precision[0] * delta.square().sum()

    # -- predictive ----------------------------------------------------------------
    def _cross_gram(self, X: kernel.JacobianSet, params=None) -> Tensor:
        """``J_X J_M^T``: ``(N C, M C)`` or ``(C, N, M)``."""
        blocks = [
            (cols, kernel.gram(X, J, self._independent, params))
            for cols, J in self._subset_sets()
        ]
        if len(blocks) == 1:
            return blocks[0][1]
        return torch.cat([b for _, b in blocks], dim=-1)

    def _scaled_cross(self, X: kernel.JacobianSet, params=None) -> Tensor:
        """``Z = D^1/2 J_M J_X^T``: ``(M C, N C)`` or ``(C, M, N)``."""
        cross = self._cross_gram(X, params)
        if self._independent:
            return cross.mT * self._sqrt_D.T[:, :, None]
        return cross.T * self._sqrt_D.reshape(-1, 1)

    def _posterior_variance(
        self, prior: Tensor, W: Tensor, n: int, diagonal: bool
    ) -> Tensor:
        """``k_xx - K_xM (K + L^-1)^-1 K_Mx`` per datum from the prior kernel ``J J^T``
        and the whitened ``W`` (``W^T W = Z^T B^-1 Z``)."""
        p0 = self.prior_precision[0]
        C = self.n_outputs
        if self._independent:
            quad = W.square().sum(-2).T  # (N, C)
        elif diagonal:
            quad = W.reshape(-1, n, C).square().sum(0)
        else:
            Wn = W.reshape(-1, n, C)
            quad = torch.einsum("knc,knd->ncd", Wn, Wn)
        var = prior / p0 - (self._likelihood_scale / p0**2) * quad
        if self._independent and not diagonal:
            return torch.diag_embed(var)
        return var

    def _gp_variance(self, X: kernel.JacobianSet, diagonal: bool) -> Tensor:
        """Variance ``(N, C, C)`` (or ``(N, C)``) at the inputs of ``X``, in chunks."""
        C, M = self.n_outputs, self.n_subset
        step = max(1, _BLOCK_ENTRIES // (M * C * C))
        pieces = []
        for start in range(0, X.n, step):
            Xi = X.select(slice(start, min(start + step, X.n)))
            independent_or_diag = self._independent or diagonal
            prior = Xi.self_blocks(independent_or_diag)
            if diagonal and not self._independent and prior.ndim == 3:
                prior = prior.diagonal(dim1=-2, dim2=-1)
            W = self._system.whiten(self._c(), self._scaled_cross(Xi))
            pieces.append(self._posterior_variance(prior, W, Xi.n, diagonal))
        return torch.cat(pieces)

    def _gp_covariance(self, X: kernel.JacobianSet, params=None) -> Tensor:
        """Joint covariance ``(N C, N C)`` over the inputs of ``X``, datum-major."""
        p0 = self.prior_precision[0]
        scale = self._likelihood_scale / p0**2
        prior = kernel.gram(X, X, self._independent, params)
        W = self._system.whiten(self._c(), self._scaled_cross(X, params))
        cov = prior / p0 - scale * (W.mT @ W)
        if not self._independent:
            return cov
        C, N = cov.shape[0], X.n
        full = cov.new_zeros(N, C, N, C)
        full.diagonal(dim1=1, dim2=3).copy_(cov.permute(1, 2, 0))
        return full.reshape(N * C, N * C)

    def _glm_distribution(self, x, joint, diagonal_output):
        f, X = self._jacobian_set(x, create_graph=self.enable_backprop)
        if not self.enable_backprop:
            f = f.detach()
        if joint:
            return f.flatten(), self._gp_covariance(X)
        return f, self._gp_variance(X, diagonal_output)

    def __call__(
        self,
        x: Inputs,
        pred_type: PredType | str = PredType.GP,
        joint: bool = False,
        link_approx: LinkApprox | str = LinkApprox.PROBIT,
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        fitting: bool = False,
        **model_kwargs: Any,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The GP predictive at ``x`` (see ``BaseLaplace.__call__``; 'gp' and 'glm'
        are the same linearized predictive)."""
        return super().__call__(
            x,
            pred_type,
            joint,
            link_approx,
            n_samples,
            diagonal_output,
            generator,
            fitting,
            **model_kwargs,
        )

    predictive = __call__

    def predictive_moments(
        self, x: Inputs, joint: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Mean and covariance of the GP over the outputs ``f`` at ``x`` (logits for
        classification, no link).

        Returns
        -------
        ``(f_mu, f_var)``: ``(batch, C)`` and ``(batch, C, C)``; with ``joint``
        ``(batch * C,)`` and ``(batch * C, batch * C)``, datum-major.
        """
        self._check_predictable()
        return self._glm_distribution(to_device(x, self._device), joint, False)

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
        (per datum, or jointly over the batch with ``joint``); 'gp' and 'glm' are
        the same."""
        return super().functional_samples(
            x, pred_type, n_samples, diagonal_output, generator, joint=joint
        )

    def _as_jacobian_set(self, Js: Tensor, name: str = "Js_star") -> kernel.JacobianSet:
        self._check_fitted(f"functional_variance({name})")
        if Js.ndim == 2:
            Js = Js.reshape(-1, self.n_outputs, Js.shape[-1])
        if Js.ndim != 3 or Js.shape[1:] != (self.n_outputs, self.n_params):
            raise ValueError(
                f"{name} must have shape (batch, {self.n_outputs}, {self.n_params}); "
                f"got {tuple(Js.shape)}."
            )
        return kernel.JacobianSet(Js.shape[0], self.n_outputs, [], Js)

    def functional_variance(self, Js_star: Tensor) -> Tensor:
        """GP posterior variance per datum, ``k_** - K_*M (K_MM + L^-1)^-1 K_M*``.

        Parameters
        ----------
        Js_star : torch.Tensor ``(N*, C, P)``
            Jacobians at the test points.

        Returns
        -------
        f_var : torch.Tensor ``(N*, C, C)``
        """
        X = self._as_jacobian_set(Js_star)
        prior = kernel._explicit_products(X.explicit, X.explicit, False, True)
        if self._independent:
            prior = prior.diagonal(dim1=-2, dim2=-1)
        W = self._system.whiten(self._c(), self._scaled_cross(X, self.params))
        return self._posterior_variance(prior, W, X.n, diagonal=False)

    def functional_covariance(self, Js_star: Tensor) -> Tensor:
        """GP posterior covariance over all test points: ``Js_star`` ``(N*, C, P)``
        -> ``(N* C, N* C)``, datum-major."""
        return self._gp_covariance(self._as_jacobian_set(Js_star), self.params)

    # -- prior tuning --------------------------------------------------------------
    def optimize_prior_precision(
        self,
        pred_type: PredType | str = PredType.GP,
        method: TuningMethod | str = TuningMethod.MARGLIK,
        n_steps: int = 100,
        lr: float = 1e-1,
        init_prior_prec: float | Tensor = 1.0,
        prior_structure: PriorStructure | str = PriorStructure.SCALAR,
        val_loader: DataLoader | None = None,
        loss=None,
        log_prior_prec_min: float = -4,
        log_prior_prec_max: float = 4,
        grid_size: int = 100,
        link_approx: LinkApprox | str = LinkApprox.PROBIT,
        n_samples: int = 100,
        verbose: bool = False,
        progress_bar: bool = False,
        log_prior_prec_base: float = 10.0,
    ) -> None:
        """Tune the scalar prior precision (see
        ``BaseLaplace.optimize_prior_precision``) with the GP predictive.

        'marglik' works on the spectrum of the kernel system (one eigenvalue
        decomposition, then ``O(M C)`` per step); 'gridsearch' rotates the
        validation kernels into its eigenbasis once, so a grid value costs no
        factorization.
        """
        super().optimize_prior_precision(
            pred_type=pred_type,
            method=method,
            n_steps=n_steps,
            lr=lr,
            init_prior_prec=init_prior_prec,
            prior_structure=prior_structure,
            val_loader=val_loader,
            loss=loss,
            log_prior_prec_min=log_prior_prec_min,
            log_prior_prec_max=log_prior_prec_max,
            grid_size=grid_size,
            link_approx=link_approx,
            n_samples=n_samples,
            verbose=verbose,
            progress_bar=progress_bar,
            log_prior_prec_base=log_prior_prec_base,
        )

    def _validation_predictions(self, val_loader, pred_type, link_approx, n_samples):
        # e.g. probit reads only diag(f_var); regression yields the full (N, C, C)
        lik = self._predictive_lik(fitting=True)
        marginal = not lik.needs_covariance(link_approx, False)
        cached = []
        with torch.no_grad():
            for batch in val_loader:
                x, y = split_batch(batch, self.dict_key_x, self.dict_key_y)
                x = to_device(x, self._device)
                f, X = self._jacobian_set(x)
                prior = X.self_blocks(self._independent or marginal)
                if marginal and prior.ndim == 3:
                    prior = prior.diagonal(dim1=-2, dim2=-1)
                rotated = self._system.rotate(self._scaled_cross(X))
                cached.append((GPTerms(f, prior, rotated), y.to(self._device)))

        def predictions():
            with torch.no_grad():
                for terms, y in cached:
                    W = self._system.scale_rotated(self._c(), terms.rotated)
                    f_var = self._posterior_variance(
                        terms.prior, W, terms.f.shape[0], marginal
                    )
                    yield lik.predictive(terms.f, f_var, link_approx, n_samples), y

        return predictions

    # -- serialization -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The fitted state as plain tensors, numbers and strings: the hyperparameters,
        the MAP, the subset's inputs and the scaled kernel ``S`` with ``D^1/2``."""
        self._check_fitted("state_dict")
        return {
            "cls_name": type(self).__name__,
            "likelihood": str(self.lik.name),
            "param_shapes": [list(p.shape) for p in self.params],
            "mean": self.mean,
            "loss": self.loss.detach(),
            "n_data": self.n_data,
            "n_outputs": self.n_outputs,
            "n_subset": self.n_subset,
            "seed": self.seed,
            "independent_outputs": self.independent_outputs,
            "subset_indices": self.subset_indices,
            "subset_inputs": [_plain_inputs(x) for x in self._subset_inputs],
            "kernel": self._system.S,
            "sqrt_output_hessian": self._sqrt_D,
            "prior_precision": self.prior_precision.detach(),
            "prior_mean": self.prior_mean.detach(),
            "sigma_noise": self.sigma_noise.detach(),
            "temperature": self.temperature,
            "enable_backprop": self.enable_backprop,
            "fitted": True,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a fitted state onto this model's device and dtype; the model's
        treated weights are set to the stored MAP.

        Raises
        ------
        ValueError
            for a state of another class, likelihood, parameter layout, subset
            size or output structure.
        """
        check_state(
            self,
            state_dict,
            {"cls_name", "likelihood", "param_shapes", "mean", "kernel"},
        )
        for name in ("n_subset", "independent_outputs"):
            if state_dict[name] != getattr(self, name):
                raise ValueError(
                    f"The state dict was fitted with {name}={state_dict[name]!r}; "
                    f"this object has {name}={getattr(self, name)!r}."
                )
        to = {"device": self._device, "dtype": self._dtype}
        self.temperature = state_dict["temperature"]
        self.sigma_noise = state_dict["sigma_noise"].to(**to)
        self.prior_precision = state_dict["prior_precision"].to(**to)
        self.prior_mean = state_dict["prior_mean"].to(**to)
        self.mean = state_dict["mean"].to(**to)
        self.loss = state_dict["loss"].to(**to)
        self.n_data, self.n_outputs = state_dict["n_data"], state_dict["n_outputs"]
        self.seed = state_dict["seed"]
        self.subset_indices = state_dict["subset_indices"]
        self._subset_inputs = [
            to_device(x, self._device) for x in state_dict["subset_inputs"]
        ]
        self._sqrt_D = state_dict["sqrt_output_hessian"].to(**to)
        self._system = KernelSystem(state_dict["kernel"].to(**to))
        self.enable_backprop = state_dict["enable_backprop"]
        with torch.no_grad():
            vector_to_parameters(self.mean, self.params)
        self._subset_cache = None
        sets = [self._jacobian_set(x)[1] for x in self._subset_inputs]
        if sum(s.numel() for s in sets) <= _CACHE_ENTRIES:
            self._subset_cache = kernel.cat(sets)
        self.fitted = True


class FunctionalLaplace(BaseFunctionalLaplace):
    """GP inference in the linearized network over all weights that require grad
    (see ``BaseFunctionalLaplace``)."""

    key = ("all", "gp")

    def __init__(
        self,
        model: nn.Module,
        likelihood,
        n_subset: int,
        sigma_noise: float | Tensor = 1.0,
        prior_precision: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend: type[CurvatureInterface] | None = BackPackGGN,
        backend_kwargs: dict[str, Any] | None = None,
        independent_outputs: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(
            model,
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


def _check_gp_backend(backend: type, backend_kwargs: dict) -> None:
    if not issubclass(backend, GGNInterface):
        raise ValueError(
            f"{backend.__name__} cannot serve the GP view, whose kernel and "
            "likelihood precision are those of the GGN (Jacobians and the output "
            "Hessian); use a GGN backend such as CurvlinopsGGN, BackPackGGN or "
            "AsdlGGN."
        )
    if backend_kwargs.get("stochastic"):
        raise ValueError(
            "The GP view uses the exact output Hessian; backend_kwargs "
            "stochastic=True (a Monte-Carlo GGN) is not available for it."
        )


def _plain_inputs(x: Inputs):
    if isinstance(x, Tensor):
        return x.detach()
    return {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in x.items()}


__all__ = ["BaseFunctionalLaplace", "FunctionalLaplace"]
