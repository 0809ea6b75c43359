r"""Marginal-likelihood training: the weights and their hyperparameters together.

Online model selection after Immer et al. (2021), *Scalable marginal likelihood
estimation for model selection in deep learning*. Training alternates between

1. MAP steps on the weights with the current hyperparameters (prior precision
   ``p0`` and, for regression, observation noise ``sigma``): a minibatch estimate of
   the negative log joint of the tempered posterior that Laplace approximates,
   $\ell(\theta) / (\sigma^2 T) + \tfrac12 \theta^\top \mathrm{diag}(p_0)\theta$
   with $\ell$ the summed loss of DESIGN.md section 3;
2. every ``marglik_frequency`` epochs after a burn-in, a Laplace fit at the current
   weights and ``n_hypersteps`` Adam steps on ``log p0`` (and ``log sigma``) that
   increase the Laplace evidence ``la.log_marginal_likelihood(p0, sigma)``.

The Laplace approximation with the best evidence is returned with the weights it was
fitted at. The evidence is a training objective for the hyperparameters that needs no
validation data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from laplace import prior
from laplace.baselaplace import BaseLaplace
from laplace.curvature.asdl import AsdlGGN
from laplace.curvature.curvature import CurvatureInterface, check_backend
from laplace.data import batch_size, dataset_size, split_batch, to_device
from laplace.laplace import Laplace
from laplace.likelihood import OutputLikelihood, get_likelihood
from laplace.utils import distributed
from laplace.utils.enums import (
    HessianStructure,
    Likelihood,
    PriorStructure,
    SubsetOfWeights,
    parse_enum,
)
from laplace.utils.memory import check_marglik_training
from laplace.utils.prior_precision import (
    expand_prior_precision,
    fix_prior_prec_structure,
)

Tensor = torch.Tensor

#: the posterior structures whose evidence marglik_training tunes
STRUCTURES = (HessianStructure.FULL, HessianStructure.KRON, HessianStructure.DIAG)
#: the weights it can treat
SUBSETS = (SubsetOfWeights.ALL, SubsetOfWeights.LAST_LAYER)


def marglik_training(
    model: nn.Module,
    train_loader: DataLoader,
    likelihood: Likelihood | str = Likelihood.CLASSIFICATION,
    hessian_structure: HessianStructure | str = HessianStructure.KRON,
    subset_of_weights: SubsetOfWeights | str = SubsetOfWeights.ALL,
    backend: type[CurvatureInterface] | None = AsdlGGN,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.Adam,
    optimizer_kwargs: Mapping[str, Any] | None = None,
    scheduler_cls: type[torch.optim.lr_scheduler.LRScheduler] | None = None,
    scheduler_kwargs: Mapping[str, Any] | None = None,
    n_epochs: int = 300,
    lr_hyp: float = 1e-1,
    prior_structure: PriorStructure | str = PriorStructure.LAYERWISE,
    n_epochs_burnin: int = 0,
    n_hypersteps: int = 10,
    marglik_frequency: int = 1,
    prior_prec_init: float = 1.0,
    sigma_noise_init: float | Tensor = 1.0,
    temperature: float = 1.0,
    fix_sigma_noise: bool = False,
    progress_bar: bool = False,
    enable_backprop: bool = False,
    dict_key_x: str = "input_ids",
    dict_key_y: str = "labels",
    callback: Callable[[int, BaseLaplace], Any] | None = None,
) -> tuple[BaseLaplace, nn.Module, list[float], list[float]]:
    r"""Train ``model`` and tune its prior precision (and noise) by the evidence.

    **MAP steps.** With ``N`` training data, the summed loss
    $\ell = \sum_n \ell_n$ (``0.5 * ||f - y||^2`` for regression, the
    cross-entropy otherwise), ``gamma = 1/2`` for regression and ``1`` otherwise,
    each batch ``B`` of ``M`` data takes an optimizer step on

    $$
        J_B(\theta) = \frac{\sigma^2 T}{\gamma N}\Big[\frac{N}{M}
        \sum_{n \in B} \frac{\ell_n(\theta)}{\sigma^2 T}
        + \tfrac12 \theta^\top \mathrm{diag}(p_0)\, \theta\Big]
        = \frac{1}{\gamma M} \sum_{n \in B} \ell_n(\theta)
        + \frac{\sigma^2 T}{2 \gamma N} \theta^\top \mathrm{diag}(p_0)\, \theta,
    $$

    an unbiased estimate of the tempered negative log joint scaled so that its data
    term is the batch mean of the squared error summed over outputs (regression) or
    of the cross-entropy, whatever the hyperparameters. ``theta`` are the parameters
    that require grad; each epoch trains in ``model.train()`` mode. At ``T = 1``
    with one regression output, or for classification, this is laplace-torch's
    objective exactly. (With ``C > 1`` regression outputs laplace-torch averages the
    squared error over the outputs too, weakening the data against the prior by
    ``C``; with ``T != 1`` it divides the prior term by ``T`` and starts the prior at
    ``T * prior_prec_init``. Ours is the mode of the posterior that the Laplace
    approximation describes in every case. laplace-torch also leaves the model in
    eval mode after the first fit.)

    **Hyperparameter steps.** After epoch ``e`` (counted from 1) with
    ``e >= n_epochs_burnin`` and ``e % marglik_frequency == 0``, a Laplace
    approximation is fitted at the current weights and ``n_hypersteps`` steps of one
    Adam optimizer (learning rate ``lr_hyp``, its state kept across epochs) on
    ``log p0`` and, for regression unless ``fix_sigma_noise``, ``log sigma`` maximize
    ``la.log_marginal_likelihood(p0, sigma)``.

    Parameters
    ----------
    model : torch.nn.Module
        the network, trained in place; its parameters that require grad are trained.
    train_loader : DataLoader
        batches ``(x, y)`` or mappings with ``dict_key_x``/``dict_key_y``; its
        ``dataset`` gives ``N``. Used for training and for every Laplace fit.
    likelihood : {'classification', 'regression', 'reward_modeling'}
        'reward_modeling' trains with the cross-entropy of the two outputs of each
        pair ``x`` ``(batch, 2, ...)`` (the Bradley-Terry loss) and fits Laplace with
        that likelihood.
    hessian_structure : {'kron', 'diag', 'full'}, default='kron'
        structure of the posterior precision ('lowrank' and 'gp' are refused).
    subset_of_weights : {'all', 'last_layer'}, default='all'
        the weights under the Laplace approximation and the tuned prior. For
        'last_layer' the last ``nn.Linear`` is found on the first Laplace fit; until
        then every weight has the prior ``prior_prec_init``, and afterwards the
        other weights keep it (a fixed weight decay) while the last layer's prior is
        tuned.
    backend : subclass of CurvatureInterface, default=AsdlGGN
        curvature backend (as in laplace-torch); ``None`` means the library's
        default, ``laplace.curvature.NativeGGN`` (the curvature engine: the same
        numbers, faster, and over transformers). Both support every structure and
        mapping batches.
    optimizer_cls : type of torch.optim.Optimizer, default=torch.optim.Adam
        built as ``optimizer_cls(params, **optimizer_kwargs)``.
    optimizer_kwargs : dict, optional
    scheduler_cls : type of torch.optim.lr_scheduler.LRScheduler, optional
        built as ``scheduler_cls(optimizer, **scheduler_kwargs)`` and stepped after
        every batch (so a ``T_max`` counts batches), as in laplace-torch.
    scheduler_kwargs : dict, optional
    n_epochs : int, default=300
        passes over ``train_loader``.
    lr_hyp : float, default=0.1
        learning rate of the Adam optimizer of the log hyperparameters.
    prior_structure : {'layerwise', 'scalar', 'diag'}, default='layerwise'
        one prior precision per parameter tensor, one for all, or one per parameter
        ('diag' needs hessian_structure 'diag' or 'full').
    n_epochs_burnin : int, default=0
        no hyperparameter steps before epoch ``n_epochs_burnin``.
    n_hypersteps : int, default=10
        Adam steps on the hyperparameters per Laplace fit.
    marglik_frequency : int, default=1
        fit Laplace and tune every ``marglik_frequency`` epochs.
    prior_prec_init : float, default=1
        initial prior precision, for every entry of ``prior_structure``.
    sigma_noise_init : float or torch.Tensor, default=1
        initial observation noise (regression only; ignored otherwise); a tensor
        ``(C,)`` starts and tunes one noise per output (hessian_structure 'full',
        'diag' or 'kron'; 'kron' needs a backend that computes KFAC for one output
        alone, ``NativeGGN`` or ``CurvlinopsGGN``, not the default ``AsdlGGN``),
        with the MAP objective's data term weighting output ``c`` by
        ``sigma_bar^2 / sigma_c^2`` and ``sigma_bar^2 = 1 / mean_c(1 / sigma_c^2)``
        in place of ``sigma^2`` above.
    temperature : float, default=1
        the likelihood is tempered as in ``laplace.baselaplace.BaseLaplace``
        (curvature divided by ``T``), and so is the MAP objective above, whose mode
        the Laplace approximation is then centred at.
    fix_sigma_noise : bool, default=False
        keep ``sigma_noise_init`` (regression).
    progress_bar : bool, default=False
        show a progress bar over epochs with the loss and the evidence.
    enable_backprop : bool, default=False
        passed to the Laplace approximation (a predictive differentiable in ``x``).
    dict_key_x : str, default='input_ids'
        key of the inputs in mapping (dict-like) batches.
    dict_key_y : str, default='labels'
        key of the targets in mapping (dict-like) batches.
    callback : callable, optional
        ``callback(epoch, la)`` after each hyperparameter phase, with ``la`` fitted at
        that epoch's weights and holding the hyperparameters of the last evidence
        recorded (``la.prior_precision``, ``la.sigma_noise``). Its result is ignored.
        Not in laplace-torch; it exposes the hyperparameter trajectory.

    Returns
    -------
    la : BaseLaplace
        the Laplace approximation of the best (highest) evidence recorded at the end
        of a phase: fitted at the weights of that epoch, with the hyperparameters at
        which that evidence was evaluated, so ``-la.log_marginal_likelihood()`` equals
        ``min`` of the phase-final entries of ``margliks``.
    model : torch.nn.Module
        ``model`` itself, with the weights (state dict) of that epoch, in eval mode.
    margliks : list of float
        the **negative** log marginal likelihood before each hyperparameter step
        (``n_hypersteps`` per phase), as laplace-torch records it; it decreases as
        training works.
    losses : list of float
        per epoch, ``sum_B M_B J_B / N``: the mean over the data of the MAP objective
        above (prior term included).

    Raises
    ------
    ValueError, TypeError
        for invalid arguments, before any training: unknown or unsupported
        likelihood/structure/subset/prior structure (e.g. ``prior_structure='diag'``
        with ``hessian_structure='kron'``), a backend without the structure (or
        without the curvature of one output alone, for a ``(C,)`` noise),
        non-positive counts or rates, or a schedule in which no epoch tunes the
        hyperparameters (``n_epochs_burnin`` or ``marglik_frequency`` beyond
        ``n_epochs``); targets or batches of the wrong form on the first batch.
    RuntimeError
        when the training loss or the evidence becomes NaN or inf (naming the epoch).
    """
    s = _Settings.check(**locals())  # every argument, before any work
    trainable = [p for p in model.parameters() if p.requires_grad]
    device, dtype = trainable[0].device, trainable[0].dtype
    red = distributed.reduction()
    built: dict[str, BaseLaplace] = {}
    with distributed.agreement(
        red, "marglik_training", lambda: distributed.signature(built["la"])
    ):
        _check_data_parallel(model, red)
        la = built["la"] = Laplace(
            model,
            s.likelihood,
            subset_of_weights=s.subset,
            hessian_structure=s.structure,
            sigma_noise=s.sigma_noise_init,
            prior_precision=s.prior_prec_init,
            temperature=s.temperature,
            enable_backprop=enable_backprop,
            dict_key_x=dict_key_x,
            dict_key_y=dict_key_y,
            backend=s.backend,
        )
        if la.sigma_noise.ndim == 1:  # the per-output curvature, before training
            la._check_output_fit()
        check_marglik_training(la, train_loader)  # the memory plan, before training
    distributed.check_loader(train_loader, red)
    hyper = _Hyperparameters(s, dtype, device)
    optimizer = optimizer_cls(trainable, **s.optimizer_kwargs)
    scheduler = (
        None
        if scheduler_cls is None
        else scheduler_cls(optimizer, **s.scheduler_kwargs)
    )
    objective = _MapObjective(s, len(train_loader.dataset), dict_key_x)
    margliks: list[float] = []
    losses: list[float] = []
    best: _Best | None = None

    epochs = tqdm(
        range(1, s.n_epochs + 1), disable=not progress_bar, desc="marglik training"
    )
    for epoch in epochs:
        model.train()
        prior_groups = hyper.prior_groups(la, trainable)
        _set_epoch(train_loader, epoch)
        batches = _batches(train_loader, s, dict_key_x, dict_key_y, device, epoch)
        sum_loss = 0.0
        for i, (x, y) in enumerate(batches):
            optimizer.zero_grad()
            loss, M = objective(model, x, y, prior_groups, hyper.sigma_noise)
            if not _finite_everywhere(loss, red):
                raise RuntimeError(
                    f"The training loss became {loss.item()} at epoch {epoch}, batch "
                    f"{i}; try a smaller learning rate (optimizer_kwargs) or check the "
                    "data of that batch."
                )
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            sum_loss += loss.item() * M
        if red is not None:  # the loss of all ranks' batches
            total = torch.tensor(sum_loss, dtype=torch.float64, device=device)
            sum_loss = distributed.all_reduce_sum(total, red).item()
        losses.append(sum_loss / objective.N)

        if epoch < s.n_epochs_burnin or epoch % s.marglik_frequency != 0:
            epochs.set_postfix(loss=losses[-1])
            continue
        la.fit(train_loader)
        values = hyper.tune(la, epoch)
        margliks.extend(values)
        if best is None or values[-1] < best.neg_log_marglik:
            best = _Best.of(values[-1], epoch, model, la)
        if callback is not None:
            callback(epoch, la)
        epochs.set_postfix(loss=losses[-1], neg_log_marglik=values[-1])

    # the schedule check guarantees a phase, hence a best one
    model.load_state_dict(best.state)
    la.prior_precision, la.sigma_noise = best.prior_precision, best.sigma_noise
    if best.epoch != s.n_epochs:  # the weights moved since that fit: fit again
        la.fit(train_loader)
    model.eval()
    return la, model, margliks, losses


# ----------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------


@dataclass
class _Settings:
    """The validated arguments."""

    likelihood: Likelihood | OutputLikelihood
    lik: OutputLikelihood
    structure: HessianStructure
    subset: SubsetOfWeights
    prior_structure: PriorStructure
    backend: type[CurvatureInterface]
    optimizer_kwargs: dict[str, Any]
    scheduler_kwargs: dict[str, Any]
    n_epochs: int
    n_epochs_burnin: int
    n_hypersteps: int
    marglik_frequency: int
    lr_hyp: float
    prior_prec_init: float
    sigma_noise_init: float | Tensor
    temperature: float
    tune_sigma: bool

    @classmethod
    def check(cls, **a: Any) -> _Settings:
        """Validate every argument, before any work; raise naming the argument."""
        model = a["model"]
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module; got {type(model).__name__}."
            )
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(
                "The model has no parameters that require grad: nothing to train."
            )
        if not isinstance(a["train_loader"], DataLoader):
            raise TypeError(
                "train_loader must be a torch.utils.data.DataLoader; got "
                f"{type(a['train_loader']).__name__}."
            )
        if dataset_size(a["train_loader"]) == 0:
            raise ValueError("train_loader's dataset is empty.")
        lik = get_likelihood(a["likelihood"])
        likelihood = (
            a["likelihood"]
            if isinstance(a["likelihood"], OutputLikelihood)
            else parse_enum(Likelihood, a["likelihood"], "likelihood")
        )
        structure = parse_enum(
            HessianStructure, a["hessian_structure"], "hessian_structure"
        )
        if structure not in STRUCTURES:
            raise ValueError(
                f"marglik_training supports hessian_structure 'kron', 'diag' or "
                f"'full'; got {structure.value!r}."
            )
        subset = parse_enum(
            SubsetOfWeights, a["subset_of_weights"], "subset_of_weights"
        )
        if subset not in SUBSETS:
            raise ValueError(
                "marglik_training supports subset_of_weights 'all' or 'last_layer'; "
                f"got {subset.value!r}."
            )
        prior_structure = parse_enum(
            PriorStructure, a["prior_structure"], "prior_structure"
        )
        if (
            prior_structure == PriorStructure.DIAG
            and structure == HessianStructure.KRON
        ):
            raise ValueError(
                "prior_structure='diag' (one prior precision per parameter) cannot "
                "be used with hessian_structure='kron': the Kronecker-factored "
                "posterior takes a scalar or layer-wise prior. Use prior_structure="
                "'scalar' or 'layerwise', or hessian_structure='diag' or 'full'."
            )
        backend = check_backend(a["backend"])
        if structure.value not in backend.supported_structures:
            from laplace.curvature import backends_supporting

            raise ValueError(
                f"backend {backend.__name__} cannot compute hessian_structure="
                f"{structure.value!r}; backends that can: "
                f"{', '.join(backends_supporting(structure.value))}."
            )
        if not callable(a["optimizer_cls"]):
            raise TypeError(
                "optimizer_cls must be a torch.optim.Optimizer class; got "
                f"{a['optimizer_cls']!r}."
            )
        if a["scheduler_cls"] is not None and not callable(a["scheduler_cls"]):
            raise TypeError(
                "scheduler_cls must be None or a torch.optim.lr_scheduler class; got "
                f"{a['scheduler_cls']!r}."
            )
        if a["scheduler_cls"] is None and a["scheduler_kwargs"]:
            raise ValueError("scheduler_kwargs were given without a scheduler_cls.")
        if a["callback"] is not None and not callable(a["callback"]):
            raise TypeError(f"callback must be callable; got {a['callback']!r}.")
        counts = {
            name: _integer(a[name], name, minimum)
            for name, minimum in (
                ("n_epochs", 1),
                ("n_epochs_burnin", 0),
                ("n_hypersteps", 1),
                ("marglik_frequency", 1),
            )
        }
        _check_schedule(**counts)
        return cls(
            likelihood=likelihood,
            lik=lik,
            structure=structure,
            subset=subset,
            prior_structure=prior_structure,
            backend=backend,
            optimizer_kwargs=_kwargs(a["optimizer_kwargs"], "optimizer_kwargs"),
            scheduler_kwargs=_kwargs(a["scheduler_kwargs"], "scheduler_kwargs"),
            lr_hyp=_positive(a["lr_hyp"], "lr_hyp"),
            prior_prec_init=_positive(a["prior_prec_init"], "prior_prec_init"),
            sigma_noise_init=(_noise(a["sigma_noise_init"]) if lik.has_noise else 1.0),
            temperature=_positive(a["temperature"], "temperature"),
            tune_sigma=lik.has_noise and not bool(a["fix_sigma_noise"]),
            **counts,
        )


def _integer(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")
    return value


def _positive(value: Any, name: str) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if (
        isinstance(value, bool)
        or not isinstance(value, Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a positive finite number; got {value!r}.")
    return float(value)


def _noise(value: Any) -> float | Tensor:
    """``sigma_noise_init``: a positive number, or a tensor ``(C,)`` of positive
    values (one noise per output)."""
    if isinstance(value, Tensor) and value.ndim == 1 and value.numel() > 1:
        if not bool(torch.isfinite(value).all()) or not bool((value > 0).all()):
            raise ValueError(
                f"sigma_noise_init must hold positive finite values; got {value}."
            )
        return value.detach().clone()
    return _positive(value, "sigma_noise_init")


def _kwargs(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict or None; got {type(value).__name__}.")
    return dict(value)


def _check_schedule(
    n_epochs: int, n_epochs_burnin: int, n_hypersteps: int, marglik_frequency: int
) -> None:
    """Refuse a schedule in which no epoch tunes the hyperparameters."""
    first = math.ceil(max(n_epochs_burnin, 1) / marglik_frequency) * marglik_frequency
    if first > n_epochs:
        raise ValueError(
            f"No epoch would tune the hyperparameters: the first would be epoch "
            f"{first} (the first multiple of marglik_frequency={marglik_frequency} "
            f"from n_epochs_burnin={n_epochs_burnin} on) but n_epochs={n_epochs}. "
            "Lower n_epochs_burnin or marglik_frequency, or raise n_epochs."
        )


def _check_data_parallel(model: nn.Module, red) -> None:
    """Under a reduction the ranks' gradients must be averaged: the model must be
    a ``DistributedDataParallel``."""
    if red is None or isinstance(model, nn.parallel.DistributedDataParallel):
        return
    raise ValueError(
        f"marglik_training under a process group of {red.world_size} ranks trains "
        f"each rank's model on its shard: got a {type(model).__name__}, whose "
        "ranks' weights would drift apart. Wrap it in "
        "torch.nn.parallel.DistributedDataParallel (the Laplace fits then reduce "
        "over the ranks), or turn the reduction off with "
        "laplace.utils.distributed_reduction(False) to train each rank alone."
    )


def _set_epoch(loader, epoch: int) -> None:
    """A ``DistributedSampler`` shuffles anew each epoch (``set_epoch``)."""
    from torch.utils.data.distributed import DistributedSampler

    for sampler in (
        getattr(loader, "sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
    ):
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)


def _finite_everywhere(loss: Tensor, red) -> bool:
    """Whether the batch's loss is finite on every rank (one small all-reduce
    under a reduction, so that the ranks stop together)."""
    bad = (~torch.isfinite(loss.detach())).to(torch.float64).reshape(1)
    return not bool(distributed.all_reduce_sum(bad, red).item())


def _batches(loader, s: _Settings, dict_key_x, dict_key_y, device, epoch):
    """``(x, y)`` of each batch on ``device``; on the very first batch, what the
    Laplace fit would refuse later is refused before any training step."""
    for i, batch in enumerate(loader):
        x, y = split_batch(batch, dict_key_x, dict_key_y)
        x, y = to_device(x, device), y.to(device)
        if epoch == 1 and i == 0:
            if isinstance(x, MutableMapping) and not s.backend.supports_dict_inputs:
                raise ValueError(
                    f"backend {s.backend.__name__} cannot take mapping (dict) batches; "
                    "use AsdlGGN (the default), NativeGGN or CurvlinopsGGN."
                )
        yield x, y


# ----------------------------------------------------------------------------------
# The two objectives
# ----------------------------------------------------------------------------------


class _MapObjective:
    """The batch objective ``J_B`` of ``marglik_training`` and the batch size."""

    def __init__(self, s: _Settings, N: int, dict_key_x: str) -> None:
        self.lik: OutputLikelihood = s.lik
        self.pairs = s.lik.pairs
        self.temperature = s.temperature
        self.N = N
        self.dict_key_x = dict_key_x

    def __call__(self, model, x, y, prior_groups, sigma: Tensor):
        M = batch_size(x, self.dict_key_x)
        f = model(x)
        if self.pairs and (f.ndim != 2 or f.shape[1] != 2):
            # any input the model maps to a pair's two rewards, as Laplace.fit takes
            raise ValueError(
                "likelihood='reward_modeling' trains on pairs: the model must map "
                "each training input to the rewards of its two items, outputs of "
                f"shape (batch, 2); got outputs of shape {tuple(f.shape)}."
            )
        y = self.lik.check_targets(f, y)
        if sigma.ndim == 1:  # one noise per output: weights sigma_bar^2 / sigma_c^2
            weights = 1 / sigma.square()
            sigma = weights.mean().rsqrt()
            weights = weights / weights.mean()
            losses = [self.lik.output_column(c).loss(f, y) for c in range(len(weights))]
            data = (weights * torch.stack(losses)).sum() / (self.lik.factor * M)
        else:
            data = self.lik.loss(f, y) / (self.lik.factor * M)
        weighted = sum(_weighted_square_norm(p, d) for p, d in prior_groups)
        scale = sigma.square() * self.temperature / (2 * self.lik.factor * self.N)
        return data + scale * weighted, M


def _weighted_square_norm(params: list[nn.Parameter], precision: Tensor) -> Tensor:
    """``theta^T diag(p0) theta`` for a precision of 1, ``len(params)`` or
    ``n_params`` entries."""
    if precision.numel() == 1:
        return precision[0] * sum(p.square().sum() for p in params)
    if precision.numel() == len(params):
        return (precision * torch.stack([p.square().sum() for p in params])).sum()
    theta = torch.cat([p.reshape(-1) for p in params])
    return (precision * theta.square()).sum()


class _Hyperparameters:
    """``log p0`` and ``log sigma`` and the one Adam optimizer that tunes them.

    ``log p0`` has the shape of ``prior_structure`` over the Laplace's treated
    parameters, so it is made on the first Laplace fit (which finds a last layer).
    """

    def __init__(self, s: _Settings, dtype: torch.dtype, device: torch.device):
        self.s = s
        self.init = torch.tensor([s.prior_prec_init], dtype=dtype, device=device)
        self.log_prior_prec: Tensor | None = None
        self.log_sigma = (
            torch.as_tensor(s.sigma_noise_init, dtype=dtype, device=device)
            .log()
            .detach()
            .requires_grad_(s.tune_sigma)
        )
        self.optimizer: torch.optim.Adam | None = None

    @property
    def sigma_noise(self) -> Tensor:
        return self.log_sigma.detach().exp()

    def prior_groups(
        self, la: BaseLaplace, trainable: list[nn.Parameter]
    ) -> list[tuple[list[nn.Parameter], Tensor]]:
        """``(parameters, precision)`` pairs of the MAP prior: ``prior_prec_init``
        everywhere until the first fit, then the tuned ``p0`` over the treated
        parameters and ``prior_prec_init`` over the others."""
        if self.log_prior_prec is None:
            return [(trainable, self.init)]
        treated = {id(p) for p in la.params}
        rest = [p for p in trainable if id(p) not in treated]
        groups = [(la.params, self.log_prior_prec.detach().exp())]
        return groups + [(rest, self.init)] if rest else groups

    def tune(self, la: BaseLaplace, epoch: int) -> list[float]:
        """``n_hypersteps`` Adam steps on the evidence of the fitted ``la``; returns
        the negative log evidence before each step and leaves ``la`` with the
        hyperparameters of the last one evaluated."""
        if self.log_prior_prec is None:
            init = prior.prior_precision_of_structure(
                self.init,
                self.s.prior_structure,
                la.n_layers,
                la.n_params,
                dtype=self.init.dtype,
                device=self.init.device,
            )
            self.log_prior_prec = init.log().requires_grad_(True)
            self.optimizer = torch.optim.Adam(
                [self.log_prior_prec, self.log_sigma], lr=self.s.lr_hyp
            )
        values = []
        try:
            for step in range(self.s.n_hypersteps):
                self.optimizer.zero_grad()
                precision = self.log_prior_prec.exp()
                sigma = self.log_sigma.exp() if self.s.tune_sigma else None
                neg_marglik = -la.log_marginal_likelihood(precision, sigma)
                if not torch.isfinite(neg_marglik):
                    raise RuntimeError(
                        f"The log marginal likelihood became {-neg_marglik.item()} at "
                        f"epoch {epoch}, hyperparameter step {step}; try a smaller "
                        "lr_hyp or another prior_prec_init/sigma_noise_init."
                    )
                neg_marglik.backward()
                self.optimizer.step()
                values.append(neg_marglik.item())
        finally:  # keep no autograd history in la
            la.prior_precision = la.prior_precision.detach()
            la.sigma_noise = la.sigma_noise.detach()
        return values


@dataclass
class _Best:
    """The phase of the best evidence: the weights and hyperparameters to return."""

    neg_log_marglik: float
    epoch: int
    state: dict[str, Any]
    prior_precision: Tensor
    sigma_noise: Tensor

    @classmethod
    def of(cls, value: float, epoch: int, model: nn.Module, la: BaseLaplace) -> _Best:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return cls(
            value, epoch, state, la.prior_precision.clone(), la.sigma_noise.clone()
        )


__all__ = [
    "marglik_training",
    # laplace-torch's module-level names
    "AsdlGGN",
    "BaseLaplace",
    "CurvatureInterface",
    "HessianStructure",
    "Laplace",
    "Likelihood",
    "PriorStructure",
    "SubsetOfWeights",
    "expand_prior_precision",
    "fix_prior_prec_structure",
]
