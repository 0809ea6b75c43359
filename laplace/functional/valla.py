r"""VaLLA: the variational linearized Laplace approximation (Ortega, Santana and
Hernández-Lobato, 2024), laplace-torch 0.3's ``VaLLA``.

The network stays at its trained weights and gives the posterior mean; ``fit``
optimises the covariance of the decoupled basis on ``M`` inducing outputs (the
factor ``L``, the inducing inputs when they are floating-point), the prior
precision and, for regression, the noise, by Adam on an alpha-divergence objective
over minibatches (``laplace.functional.inducing`` has the formulas).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from laplace.curvature.curvature import CurvatureInterface
from laplace.data import (
    batch_size,
    concatenate_rows,
    dataset_size,
    split_batch,
    to_device,
)
from laplace.functional import inducing, kernel, subset
from laplace.functional.nystrom import basis_inputs
from laplace.functional.scalable import ScalableFunctionalLaplace, check_scalar_hyper
from laplace.likelihood import (
    BinaryLikelihood,
    ClassificationLikelihood,
    HeteroscedasticRegressionLikelihood,
    MultilabelLikelihood,
    OutputLikelihood,
    PoissonLikelihood,
    RegressionLikelihood,
    RewardModelingLikelihood,
)
from laplace.predictive.links import sample_outputs
from laplace.utils import distributed
from laplace.utils._checks import _check_int
from laplace.utils.matrix import linalg_dtype

Tensor = torch.Tensor

#: the strategies that draw the inducing inputs from the training data
STRATEGIES = ("random", "kmeans")


# -- the alpha-energies ------------------------------------------------------------
def _gaussian(la: VaLLA, f: Tensor, v: Tensor, y: Tensor) -> Tensor:
    noise = la.sigma_noise.square()
    return inducing.gaussian_energy(y, f, v, noise, la.alpha).sum(-1)


def _softmax_probit(la: VaLLA, f: Tensor, v: Tensor, y: Tensor) -> Tensor:
    return inducing.probit_energy(f, v, y)


def _bernoulli_probit(la: VaLLA, f: Tensor, v: Tensor, y: Tensor) -> Tensor:
    return inducing.bernoulli_probit_energy(f, v, y)


def _poisson(la: VaLLA, f: Tensor, v: Tensor, y: Tensor) -> Tensor:
    return inducing.poisson_expected_log_likelihood(f, v, y)


#: the energies in closed form, by the likelihood's class (exactly: a subclass may
#: change the loss): ``(alphas, exact, energy)``, ``alphas`` the values it holds
#: for (None: any), ``exact`` False for an approximation (the probit), used only
#: without Monte-Carlo samples; ``energy(la, f, v, y)`` from the outputs, their
#: variances ``(B, C)`` and the checked targets. Any other case is Monte Carlo.
CLOSED_FORM_ENERGIES = {
    RegressionLikelihood: (None, True, _gaussian),
    PoissonLikelihood: ((0.0,), True, _poisson),
    ClassificationLikelihood: ((1.0,), False, _softmax_probit),
    RewardModelingLikelihood: ((1.0,), False, _softmax_probit),
    BinaryLikelihood: ((1.0,), False, _bernoulli_probit),
    MultilabelLikelihood: ((1.0,), False, _bernoulli_probit),
}


def _closed_form_energy(lik: OutputLikelihood, alpha: float, mc_samples: int):
    """The closed-form energy VaLLA uses, or None for Monte Carlo."""
    entry = CLOSED_FORM_ENERGIES.get(type(lik))
    if entry is None:
        return None
    alphas, exact, energy = entry
    if alphas is not None and alpha not in alphas:
        return None
    return energy if exact or mc_samples == 0 else None


def _check_energy(lik: OutputLikelihood, alpha: float, mc_samples: int) -> None:
    """Refuse a likelihood and alpha whose energy VaLLA cannot compute."""
    if isinstance(lik, HeteroscedasticRegressionLikelihood):
        raise ValueError(
            "VaLLA is not available for likelihood='heteroscedastic_regression': its "
            "Gaussian posterior over the natural parameters puts mass on eta2 >= 0, "
            "where the likelihood is undefined, so the energies E_q[p(y | f)^alpha] "
            "do not exist. Use ELLA (functional_approximation='nystrom') or a "
            "weight-space Laplace."
        )
    if mc_samples > 0 or _closed_form_energy(lik, alpha, 0) is not None:
        return
    entry = CLOSED_FORM_ENERGIES.get(type(lik))
    if entry is None:
        reason = "it has no closed-form energy"
    else:
        reason = f"its closed-form energy is that of alpha = {entry[0][0]:g}"
    raise ValueError(
        f"alpha={alpha} with likelihood={lik.name!r} needs mc_softmax_samples > 0 "
        f"(Monte-Carlo samples of the energy): {reason}."
    )


class VaLLA(ScalableFunctionalLaplace):
    r"""Variational linearized Laplace with inducing outputs; the network's
    weights stay fixed.

    The posterior of the outputs is ``GP(f(x), Sigma)`` with

    $$
        \Sigma(x, x') = K_{xx'} - K_{xZ} (K_{ZZ} + (L L^\top)^{-1})^{-1} K_{Zx'},
        \qquad K = J J^\top / \delta,
    $$

    ``Z`` the inducing inputs, each with one output coordinate
    (``inducing_classes``). With the inducing outputs at every training output
    (regression: the training inputs) the family holds the linearized Laplace
    posterior, and with ``alpha = 0`` (the ELBO) it is the optimum for the
    regression likelihood.

    Parameters
    ----------
    model : torch.nn.Module
        the pretrained network; it is not changed.
    likelihood : str or OutputLikelihood
        laplace-torch's 'classification', 'regression' and 'reward_modeling', and
        'binary', 'multilabel', 'poisson' or a likelihood object of your own;
        'heteroscedastic_regression' is refused (its energies do not exist, see
        ``_check_energy``).
    inducing_locations : torch.Tensor, mapping, or {'random', 'kmeans'}
        the inducing inputs ``(M, ...)``, or a strategy drawing ``num_inducing``
        of them from the training data in ``fit`` ('random': the first
        ``num_inducing`` of a permutation seeded with ``seed``; 'kmeans': k-means
        centres of the training inputs, tensors only). Floating-point tensors
        are optimised by ``fit``; integer tensors (token ids) and mappings stay
        fixed.
    num_inducing : int, optional
        ``M``; needed by a strategy, and checked against explicit inputs.
    inducing_classes : torch.Tensor ``(M,)`` of ints, optional
        the output coordinate of each inducing input; default 0 for explicit
        inputs, and with a strategy the training labels (classification), 0
        (regression, as laplace-torch) or the outputs in turn, ``m mod C`` (the
        other likelihoods).
    sigma_noise, prior_precision, temperature, enable_backprop, dict_key_x,
    dict_key_y
        as ``BaseLaplace``; ``sigma_noise`` and ``prior_precision`` are the
        starting values of their optimisation.
    prior_mean : float, default=0
        must be zero.
    backend, backend_kwargs
        a GGN backend, recorded and checked; the Jacobians are computed by this
        library whichever is named.
    seed : int, default=0
        seed of the inducing-input strategies and of ``generator``.
    alpha : float in [0, 1], default=1
        the alpha-divergence; 0 is the ELBO (KL(q || p)).
    mc_softmax_samples : int, default=0
        Monte-Carlo samples of the energy ``(1/alpha) log E_q[p(y | f)^alpha]``
        (from the likelihood's ``datum_losses``); 0 uses its closed form,
        ``CLOSED_FORM_ENERGIES``: the probit approximation for the softmax and the
        Bernoulli likelihoods (``alpha = 1`` only), the exact Poisson energy of
        ``alpha = 0``. The Gaussian's and the Poisson's exact closed forms are
        used whatever the number of samples; other likelihoods and alphas need
        samples.

    Attributes
    ----------
    L : torch.nn.Parameter ``(M (M + 1) / 2,)``
        the packed lower-triangular factor (``torch.tril_indices`` order).
    inducing_locations : torch.Tensor, nn.Parameter, mapping or None
        None before ``fit`` with a strategy.
    inducing_classes : torch.Tensor ``(M,)``
    log_prior_precision : torch.nn.Parameter ``(1,)``
    log_noise_variance : torch.nn.Parameter ``()`` or None
        likelihoods with observation noise (``has_noise``: regression) only.
    generator : torch.Generator
        on the model's device, seeded with ``seed``: the Monte-Carlo draws of
        ``fit``.
    fit_history_ : dict
        ``objective`` (the minibatch objective before each step) and ``val_nll``.
    """

    key = ("all", "gp")

    def __init__(
        self,
        model: nn.Module,
        likelihood,
        inducing_locations: Tensor | MutableMapping | str,
        num_inducing: int | None = None,
        inducing_classes: Tensor | None = None,
        sigma_noise: float | Tensor = 1.0,
        prior_precision: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend: type[CurvatureInterface] | None = None,
        backend_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
        alpha: float = 1.0,
        mc_softmax_samples: int = 0,
    ) -> None:
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or not 0 <= alpha <= 1
        ):
            raise ValueError(f"alpha must be a number in [0, 1]; got {alpha!r}.")
        self.alpha = float(alpha)
        self.mc_softmax_samples = _check_int(
            mc_softmax_samples, "mc_softmax_samples", minimum=0
        )
        self.seed = _check_int(seed, "seed", minimum=-(2**63))
        self.log_prior_precision: nn.Parameter | None = None
        self.log_noise_variance: nn.Parameter | None = None
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
        )
        _check_energy(self.lik, self.alpha, self.mc_softmax_samples)
        self._strategy, self.num_inducing = _inducing_spec(
            inducing_locations, num_inducing, dict_key_x
        )
        self._initial_locations = None if self._strategy else inducing_locations
        self._initial_classes = _inducing_classes(
            inducing_classes, self.num_inducing, explicit=self._strategy is None
        )
        self.inducing_locations = (
            None if self._strategy else _as_locations(inducing_locations)
        )
        self.inducing_classes = self._initial_classes.clone()
        self.L = nn.Parameter(
            inducing.identity_packed(
                self.num_inducing, dtype=self._work_dtype, device=self._device
            )
        )
        self.generator = torch.Generator(device=self._device).manual_seed(self.seed)
        self.fit_history_ = {"objective": [], "val_nll": []}
        self._cache: tuple[tuple, Any] | None = None

    # -- hyperparameters: trainable logarithms ---------------------------------------
    @property
    def prior_precision(self) -> Tensor:
        """``exp(log_prior_precision)``, shape ``(1,)`` (differentiable)."""
        return self.log_prior_precision.exp()

    @prior_precision.setter
    def prior_precision(self, value: float | Tensor) -> None:
        self._check_prior_precision(value)
        value = check_scalar_hyper(value, "prior_precision")
        log = torch.tensor(
            [math.log(value)], dtype=self._work_dtype, device=self._device
        )
        if self.log_prior_precision is None:
            self.log_prior_precision = nn.Parameter(log)
        else:
            with torch.no_grad():
                self.log_prior_precision.copy_(log)

    @property
    def sigma_noise(self) -> Tensor:
        """``exp(log_noise_variance / 2)`` for regression, else 1 (0-dim)."""
        if self.log_noise_variance is None:
            return torch.ones((), dtype=self._work_dtype, device=self._device)
        return (0.5 * self.log_noise_variance).exp()

    @sigma_noise.setter
    def sigma_noise(self, value: float | Tensor) -> None:
        if isinstance(value, Tensor) and value.numel() != 1:
            raise ValueError(
                f"sigma_noise must be a scalar; got shape {tuple(value.shape)}."
            )
        value = check_scalar_hyper(value, "sigma_noise")
        if not self.lik.has_noise:
            if value != 1:
                raise ValueError(
                    "sigma_noise must be 1 for likelihood="
                    f"{self.lik.name!r}; only regression has observation "
                    f"noise (got {value})."
                )
            return
        log = torch.tensor(
            2 * math.log(value), dtype=self._work_dtype, device=self._device
        )
        if self.log_noise_variance is None:
            self.log_noise_variance = nn.Parameter(log)
        else:
            with torch.no_grad():
                self.log_noise_variance.copy_(log)

    def optimize_prior_precision(self, *args: Any, **kwargs: Any) -> None:
        """Not separate: ``fit`` learns the prior precision with the posterior.

        Raises
        ------
        NotImplementedError
            always.
        """
        raise NotImplementedError(
            "VaLLA learns the prior precision jointly with the variational "
            "posterior in fit; there is no separate tuning step."
        )

    # -- fit -------------------------------------------------------------------------
    def fit(
        self,
        train_loader: DataLoader,
        *,
        iterations: int = 100,
        lr: float = 1e-3,
        val_loader: DataLoader | None = None,
        val_steps: int | None = None,
        progress_bar: bool = False,
        override: bool = True,
    ) -> None:
        """Optimise the variational posterior and the hyperparameters by Adam on
        minibatches of ``train_loader`` (cycled over ``iterations`` steps).

        Parameters
        ----------
        train_loader : DataLoader
            its dataset must have a length (``N`` scales the minibatch energy).
        iterations : int, default=100
        lr : float, default=1e-3
        val_loader : DataLoader, optional
            scores the predictive (mean NLL, appended to
            ``fit_history_['val_nll']``) at the end, or every ``val_steps``
            iterations.
        val_steps : int, optional
        progress_bar : bool, default=False
        override : bool, default=True
            start from ``L = I`` and the initial inducing inputs (drawn again for a
            strategy) and a new history; ``False`` continues the previous fit
            (and starts one if there is none). The hyperparameters start from their
            current values either way.

        Raises
        ------
        ValueError
            for a non-positive ``iterations``, ``lr`` or ``val_steps``, more
            inducing inputs than training data, or inducing classes out of range
            of the model's outputs. The approximation is left as it was.
        """
        iterations = _check_int(iterations, "iterations", minimum=1)
        if (
            isinstance(lr, bool)
            or not isinstance(lr, (int, float))
            or not math.isfinite(lr)
            or lr <= 0
        ):
            raise ValueError(f"lr must be a positive finite number; got {lr!r}.")
        if val_steps is not None:
            _check_int(val_steps, "val_steps", minimum=1)
        red = distributed.reduction()
        if red is not None:
            raise ValueError(
                f"VaLLA cannot fit over a process group of {red.world_size} ranks "
                "yet: its variational objective is optimized on minibatches, whose "
                "steps are not reduced over the ranks. Fit it in one process, or "
                "turn the reduction off with "
                "laplace.utils.distributed_reduction(False) for per-rank posteriors."
            )
        N = dataset_size(train_loader)
        self.model.eval()
        previous = self._snapshot()
        try:
            if override or self.inducing_locations is None:
                self._start(train_loader, N)
            else:
                self.fit_history_ = {
                    key: list(values) for key, values in self.fit_history_.items()
                }
            self._optimize(
                train_loader, N, iterations, lr, val_loader, val_steps, progress_bar
            )
        except BaseException:
            self._restore(previous)  # leave it as it was
            raise
        finally:
            self._cache = None

    def _optimize(
        self, train_loader, N, iterations, lr, val_loader, val_steps, progress_bar
    ) -> None:
        """``iterations`` Adam steps on minibatches, scored on the validation data
        every ``val_steps`` steps (or at the end)."""
        trained = [self.L, self.log_prior_precision]
        if isinstance(self.inducing_locations, nn.Parameter):
            trained.append(self.inducing_locations)
        if self.log_noise_variance is not None:
            trained.append(self.log_noise_variance)
        optimizer = torch.optim.Adam(trained, lr=lr)
        batches = _epochs(train_loader)
        steps = tqdm(range(1, iterations + 1), disable=not progress_bar, desc="VaLLA")
        # fixed inducing inputs: their Jacobians once
        fixed = None
        if not isinstance(self.inducing_locations, nn.Parameter):
            fixed = self._inducing_rows(create_graph=False)
        self.fitted = True  # the validation scores use the current state
        for step in steps:
            x, y = split_batch(next(batches), self.dict_key_x, self.dict_key_y)
            x, y = to_device(x, self._device), y.to(self._device)
            self._check_fit_batch(x, y)
            with torch.no_grad():
                f, X = self._jacobian_set(x)
            self.n_outputs = f.shape[-1]  # of the training data (pairs: 2)
            J_Z = fixed if fixed is not None else self._inducing_rows(True)
            objective = self._objective(f, X, y, J_Z, N)
            if not bool(torch.isfinite(objective)):
                raise RuntimeError(
                    f"The objective of step {step} is not finite (NaN or inf in the "
                    "batch, the model's outputs or Jacobians, or a diverging "
                    "optimization: try a smaller lr). The approximation was left as "
                    "it was before fit."
                )
            # gradients of the trained tensors only: the model's .grad stays as it is
            grads = torch.autograd.grad(objective, trained)
            for tensor, grad in zip(trained, grads, strict=True):
                tensor.grad = grad
            optimizer.step()
            for tensor in trained:
                tensor.grad = None
            self._cache = None
            self.fit_history_["objective"].append(float(objective.detach()))
            if val_loader is not None and val_steps and step % val_steps == 0:
                self.fit_history_["val_nll"].append(self._validation_nll(val_loader))
        # at the end: without val_steps, or when the last step was not scored
        if val_loader is not None and (val_steps is None or iterations % val_steps):
            self.fit_history_["val_nll"].append(self._validation_nll(val_loader))

    def _snapshot(self) -> dict[str, Any]:
        """Copies of everything a fit changes."""
        state = {name: getattr(self, name) for name in _FITTED_STATE}
        for name in ("L", "log_prior_precision", "log_noise_variance"):
            tensor = getattr(self, name)
            state[name] = None if tensor is None else tensor.detach().clone()
        state["inducing_locations"] = _plain(self.inducing_locations)
        state["fit_history_"] = {k: list(v) for k, v in self.fit_history_.items()}
        state["generator"] = self.generator.get_state()
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for name in ("L", "log_prior_precision", "log_noise_variance"):
                if state[name] is not None:
                    getattr(self, name).copy_(state[name])
        self.generator.set_state(state.pop("generator"))
        for name in ("L", "log_prior_precision", "log_noise_variance"):
            state.pop(name)
        locations = state.pop("inducing_locations")
        self.inducing_locations = (
            None if locations is None else _as_locations(locations)
        )
        for name, value in state.items():
            setattr(self, name, value)

    def _start(self, train_loader: DataLoader, N: int) -> None:
        """The initial state: ``L = I``, the inducing inputs, a new history."""
        if self._strategy is not None:
            if self.num_inducing > N:
                raise ValueError(
                    f"num_inducing={self.num_inducing} exceeds the {N} training data."
                )
            locations, labels = self._draw_inducing(train_loader, N)
        else:
            locations, labels = self._initial_locations, None
        locations = _as_locations(to_device(locations, self._device))
        with torch.no_grad():
            C = self._forward_model(self._model_input(locations)).shape[-1]
        classes = (
            self._initial_classes if labels is None else self._coordinates(labels, C)
        )
        classes = classes.to(self._device)
        if int(classes.max()) >= C:
            raise ValueError(
                f"inducing_classes must be output coordinates in 0..{C - 1}; got "
                f"{int(classes.max())}."
            )
        self.n_outputs = C
        self.n_data = N
        self.inducing_locations, self.inducing_classes = locations, classes
        with torch.no_grad():
            self.L.copy_(inducing.identity_packed(self.num_inducing, **_like(self.L)))
        self.fit_history_ = {"objective": [], "val_nll": []}

    def _draw_inducing(self, train_loader: DataLoader, N: int):
        """Inducing inputs drawn from the training data, and their targets."""
        if self.lik.pairs:
            raise ValueError(
                "Inducing strategies draw single inputs from the training data; "
                "reward-modeling data are pairs. Give inducing_locations "
                "explicitly (inputs of the reward model)."
            )
        if self._strategy == "random":
            indices = basis_inputs(N, self.num_inducing, self.seed)
            data = subset.batches_of(
                train_loader, indices, self.dict_key_x, self.dict_key_y, "cpu"
            )
            locations = concatenate_rows([x for x, _ in data])
            labels = torch.cat([y.reshape(len(y), -1) for _, y in data])
        else:
            data = subset.batches_of(
                train_loader, range(N), self.dict_key_x, self.dict_key_y, "cpu"
            )
            X = [x for x, _ in data]
            if not all(isinstance(x, Tensor) and x.is_floating_point() for x in X):
                raise ValueError(
                    "inducing_locations='kmeans' clusters floating-point tensor "
                    "inputs; use 'random' for mappings or token ids."
                )
            X = torch.cat(X)
            generator = torch.Generator(device=X.device).manual_seed(self.seed)
            centres = inducing.kmeans(X.flatten(1), self.num_inducing, generator)
            locations = centres.reshape(-1, *X.shape[1:])
            labels = torch.cat([y.reshape(len(y), -1) for _, y in data])
            labels = labels[torch.cdist(centres, X.flatten(1)).argmin(1)]
        return locations, labels

    def _coordinates(self, labels: Tensor, C: int) -> Tensor:
        """The output coordinate of each drawn inducing input: its label
        (classification), 0 (regression, as laplace-torch), or the outputs in turn
        ``m mod C`` (the other likelihoods, so that every output has inducing
        points)."""
        M = self.num_inducing
        if type(self.lik) is ClassificationLikelihood:
            return labels.reshape(M).long()
        if type(self.lik) is RegressionLikelihood:
            return torch.zeros(M, dtype=torch.long)
        return torch.arange(M) % C

    # -- the kernel and the objective ------------------------------------------------
    def _model_input(self, locations):
        """The inducing inputs as the model takes them: trained floating-point ones,
        held in float32 for a 16-bit model, cast to its dtype (differentiably)."""
        if isinstance(locations, Tensor) and locations.is_floating_point():
            return locations.to(self._dtype)
        return locations

    def _inducing_rows(self, create_graph: bool) -> Tensor:
        """``J_Z`` ``(M, P)``: the Jacobian row of each inducing output
        (differentiable in the inducing inputs with ``create_graph``)."""
        with torch.set_grad_enabled(create_graph):
            Z_in = self._model_input(self.inducing_locations)
            _, Z = self._jacobian_set(Z_in, create_graph)
            classes = self.inducing_classes.to(self._device)
            return kernel.selected_rows(Z, classes, self.params)

    def _system(self, J_Z: Tensor) -> tuple[inducing.InducingSystem, Tensor]:
        """The factored system of ``K_ZZ = J_Z J_Z^T / delta``, and ``delta``."""
        delta = self.prior_precision[0]
        L = inducing.unpack_tril(self.L, self.num_inducing)
        return inducing.InducingSystem(J_Z @ J_Z.T / delta, L), delta

    def _cross(self, X: kernel.JacobianSet, J_Z: Tensor, delta) -> Tensor:
        """``K_Zx`` ``(M, N C)``, datum-major columns, from the factored ``X``."""
        K = kernel.project(X, J_Z.T, self.params)  # (N, C, M)
        return K.reshape(-1, K.shape[-1]).T / delta

    def _objective(self, f, X, y, J_Z, N: int) -> Tensor:
        """``-(N / (B T) sum_b E_alpha - KL)`` on the minibatch."""
        system, delta = self._system(J_Z)
        prior_blocks = X.self_blocks(False) / delta  # (B, C, C)
        var = inducing.blocks(prior_blocks, system.whiten(self._cross(X, J_Z, delta)))
        energy = self._energy(f, var, y)
        B = f.shape[0]
        return -(N / (B * self.temperature) * energy.sum() - system.kl())

    def _energy(self, f: Tensor, var: Tensor, y: Tensor) -> Tensor:
        """``E_alpha`` per datum ``(B,)``: in closed form where the likelihood has
        one (``CLOSED_FORM_ENERGIES``), else by Monte Carlo."""
        y = self.lik.check_targets(f, y)
        closed_form = _closed_form_energy(self.lik, self.alpha, self.mc_softmax_samples)
        if closed_form is not None:
            return closed_form(self, f, var.diagonal(dim1=-2, dim2=-1), y)
        samples = sample_outputs(f, var, self.mc_softmax_samples, self.generator)
        return inducing.sampled_energy(self._log_likelihoods(samples, y), self.alpha)

    def _log_likelihoods(self, samples: Tensor, y: Tensor) -> Tensor:
        """``log p(y_n | f_s)`` ``(S, B)`` of output samples ``(S, B, C)``, from the
        likelihood's ``datum_losses`` (scaled by the noise where it has one)."""
        S, B, C = samples.shape
        targets = y.expand(S, *y.shape).reshape(S * B, *y.shape[1:])
        losses = self.lik.datum_losses(samples.reshape(S * B, C), targets)
        log_lik = -losses.reshape(S, B)
        if self.lik.has_noise:
            sigma = self.sigma_noise
            log_lik = log_lik / sigma.square() + self.lik.log_normalizer(sigma, 1, C)
        return log_lik

    # -- the posterior ---------------------------------------------------------------
    def _posterior(self) -> tuple[Tensor, inducing.InducingSystem, Tensor]:
        """The inducing set and the factored system, cached while ``L``, the
        inducing inputs and the prior precision are unchanged."""
        tensors = [self.L, self.log_prior_precision]
        if isinstance(self.inducing_locations, Tensor):
            tensors.append(self.inducing_locations)
        key = tuple((id(t), t._version) for t in tensors)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                Z = self._inducing_rows(create_graph=False)
                system, delta = self._system(Z)
            self._cache = (key, (Z, system, delta))
        return self._cache[1]

    def _set_covariance(self, X: kernel.JacobianSet, joint: bool) -> Tensor:
        Z, system, delta = self._posterior()
        W = system.whiten(self._cross(X, Z, delta))
        if joint:
            return inducing.covariance(kernel.gram(X, X, False) / delta, W)
        return inducing.blocks(X.self_blocks(False) / delta, W)

    # -- checkpoints -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The fitted state as plain tensors, numbers and strings: the factor, the
        inducing inputs and classes (current and initial), the hyperparameters'
        logarithms, the history, the generator's state and the pretrained model's
        fingerprint (not its weights).

        Raises
        ------
        RuntimeError
            before ``fit``.
        """
        self._check_fitted("state_dict")
        backend = self._backend_cls
        return {
            "cls_name": type(self).__name__,
            "n_params": self.n_params,
            "model_fingerprint": self._model_fingerprint(),
            "likelihood": self.lik.name,
            "inducing_locations": _plain(self.inducing_locations),
            "inducing_classes": self.inducing_classes.detach().clone(),
            "inducing_strategy": self._strategy,
            "initial_inducing_locations": _plain(self._initial_locations),
            "initial_inducing_classes": self._initial_classes.clone(),
            "L": self.L.detach().clone(),
            "log_prior_precision": self.log_prior_precision.detach().clone(),
            "log_noise_variance": _plain(self.log_noise_variance),
            "temperature": self.temperature,
            "alpha": self.alpha,
            "mc_softmax_samples": self.mc_softmax_samples,
            "n_data": self.n_data,
            "n_outputs": self.n_outputs,
            "fitted": True,
            "fit_history": {k: list(v) for k, v in self.fit_history_.items()},
            "seed": self.seed,
            "generator_state": self.generator.get_state(),
            "dict_key_x": self.dict_key_x,
            "dict_key_y": self.dict_key_y,
            "backend_class": f"{backend.__module__}.{backend.__qualname__}",
            "backend_kwargs": dict(self.backend_kwargs),
            "enable_backprop": self.enable_backprop,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a fitted state of the same pretrained model (checked against the
        stored fingerprint; the model's weights are not changed).

        Raises
        ------
        ValueError
            for a checkpoint of another class, unfitted, of another likelihood or
            of another pretrained model (nothing is changed then).
        """
        self._check_checkpoint(
            state_dict, {"cls_name", "likelihood", "model_fingerprint", "L"}
        )
        M = state_dict["inducing_classes"].shape[0]
        to = {"device": self._device, "dtype": self._work_dtype}
        self.num_inducing = M
        self._strategy = state_dict["inducing_strategy"]
        self._initial_locations = state_dict["initial_inducing_locations"]
        self._initial_classes = state_dict["initial_inducing_classes"].clone()
        self.inducing_locations = _as_locations(
            to_device(state_dict["inducing_locations"], self._device)
        )
        self.inducing_classes = state_dict["inducing_classes"].to(self._device)
        self.L = nn.Parameter(state_dict["L"].to(**to).clone())
        self.log_prior_precision = nn.Parameter(
            state_dict["log_prior_precision"].to(**to).clone()
        )
        noise = state_dict["log_noise_variance"]
        self.log_noise_variance = (
            None if noise is None else nn.Parameter(noise.to(**to).clone())
        )
        self.temperature = state_dict["temperature"]
        self.alpha = state_dict["alpha"]
        self.mc_softmax_samples = state_dict["mc_softmax_samples"]
        self.n_data, self.n_outputs = state_dict["n_data"], state_dict["n_outputs"]
        self.fit_history_ = {k: list(v) for k, v in state_dict["fit_history"].items()}
        self.seed = state_dict["seed"]
        self.generator.set_state(state_dict["generator_state"])
        self.enable_backprop = state_dict["enable_backprop"]
        self._cache = None
        self.fitted = True


#: what a fit sets besides the trained tensors, restored when it fails
_FITTED_STATE = ("inducing_classes", "n_data", "n_outputs", "fitted")


def _epochs(loader):
    """The batches of ``loader``, epoch after epoch (iterated again each time, so
    a shuffling loader reshuffles)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("train_loader yielded no batches.")


def _inducing_spec(locations, num_inducing, dict_key_x) -> tuple[str | None, int]:
    """``(strategy or None, M)``, checked."""
    if isinstance(locations, str):
        if locations not in STRATEGIES:
            raise ValueError(
                "inducing_locations must be inputs (a tensor or a mapping) or one of "
                f"{STRATEGIES}; got {locations!r}."
            )
        if num_inducing is None:
            raise ValueError(
                f"inducing_locations={locations!r} draws num_inducing inputs: give "
                "num_inducing (a positive int)."
            )
        return locations, _check_int(num_inducing, "num_inducing", minimum=1)
    if isinstance(locations, Tensor):
        M = locations.shape[0] if locations.ndim else 0
    elif isinstance(locations, Mapping):
        M = batch_size(locations, dict_key_x)
    else:
        raise ValueError(
            "inducing_locations must be inputs (a tensor or a mapping) or one of "
            f"{STRATEGIES}; got {type(locations).__name__}."
        )
    if M == 0:
        raise ValueError("inducing_locations must hold at least one input.")
    if num_inducing is not None and _check_int(num_inducing, "num_inducing", 1) != M:
        raise ValueError(
            f"num_inducing={num_inducing} does not match the {M} inducing_locations."
        )
    return None, M


def _inducing_classes(classes, M: int, explicit: bool) -> Tensor:
    if classes is None:
        return torch.zeros(M, dtype=torch.long)
    classes = torch.as_tensor(classes)
    if classes.shape != (M,):
        raise ValueError(
            f"inducing_classes must have one entry per inducing input, shape ({M},); "
            f"got {tuple(classes.shape)}."
        )
    if (
        classes.is_floating_point()
        or classes.is_complex()
        or classes.dtype == torch.bool
    ):
        raise ValueError(
            f"inducing_classes must be integer output coordinates; got {classes.dtype}."
        )
    if bool((classes < 0).any()):
        raise ValueError("inducing_classes must be non-negative output coordinates.")
    if not explicit:
        raise ValueError(
            "inducing_classes are taken from the training labels with a strategy; "
            "give them only with explicit inducing_locations."
        )
    return classes.long().cpu()


def _as_locations(locations):
    """Floating-point tensors become a trainable copy (float32 for 16-bit inputs:
    Adam's moments underflow in half precision; the model sees them cast back,
    ``VaLLA._model_input``); others stay fixed."""
    if isinstance(locations, Tensor) and locations.is_floating_point():
        work = linalg_dtype(locations.dtype)
        return nn.Parameter(locations.detach().to(work, copy=True))
    return locations


def _plain(value):
    if value is None:
        return None
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, Mapping):
        return {k: _plain(v) if isinstance(v, Tensor) else v for k, v in value.items()}
    return value


def _like(t: Tensor) -> dict[str, Any]:
    return {"dtype": t.dtype, "device": t.device}


__all__ = ["VaLLA"]
