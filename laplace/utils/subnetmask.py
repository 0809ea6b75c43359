r"""Subnetwork selection: which entries of the weight vector get a posterior.

A mask selects indices into the flattened vector of **all** the model's parameters,
``parameters_to_vector(model.parameters())`` (a parameter shared by several modules
counts once, at its first position), as laplace-torch's masks do. Pass them to
``Laplace(..., subset_of_weights='subnetwork', subnetwork_indices=...)``, which
numbers weights the same way (and refuses entries of frozen parameters).

Two families:

- score-based (``ScoreBasedSubnetMask``): one score per weight ``(n_params,)``,
  the ``n_params_subnet`` largest are selected (ties go to the lower index):
  random, magnitude ``|theta|``, diagonal-Laplace or diagonal-SWAG variance;
- name-based: every weight of the named parameters (``ParamNameSubnetMask``),
  modules (``ModuleNameSubnetMask``) or of the last ``nn.Linear``
  (``LastLayerSubnetMask``).

``select(train_loader)`` computes the indices once and stores them in ``indices``;
a mask selects only once (a second ``select`` raises, as in laplace-torch: make a new
mask to select again).
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable, MutableMapping, Sequence
from numbers import Integral
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from laplace.data import to_device
from laplace.likelihood import OutputLikelihood, get_likelihood
from laplace.utils.enums import Likelihood, parse_enum
from laplace.utils.feature_extractor import FeatureExtractor
from laplace.utils.swag import _check_swag_arguments, fit_diagonal_swag_var

if TYPE_CHECKING:
    from laplace.parametric.diag import DiagLaplace

Tensor = torch.Tensor

__all__ = [
    "SubnetMask",
    "ScoreBasedSubnetMask",
    "RandomSubnetMask",
    "LargestMagnitudeSubnetMask",
    "LargestVarianceDiagLaplaceSubnetMask",
    "LargestVarianceSWAGSubnetMask",
    "ParamNameSubnetMask",
    "ModuleNameSubnetMask",
    "LastLayerSubnetMask",
]


class SubnetMask:
    """Base class of the subnetwork masks.

    Parameters
    ----------
    model : torch.nn.Module

    Attributes
    ----------
    indices : torch.LongTensor ``(n_params_subnet,)``
        the selected entries of ``parameters_to_vector(model.parameters())``,
        ascending, on the parameters' device; set by ``select``.
    n_params : int
        the number of entries of that vector (all parameters, frozen ones too).
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module; got {type(model).__name__}."
            )
        self.model = model
        params = list(model.parameters())
        if not params:
            raise ValueError("The model has no parameters: there is nothing to select.")
        self._device = params[0].device
        #: position of each parameter (by identity) in the flattened vector
        self._slices = _parameter_slices(model)
        self.n_params = sum(p.numel() for p in params)
        self._indices: Tensor | None = None

    @property
    def indices(self) -> torch.LongTensor:
        """The selected indices ``(n_params_subnet,)``; needs ``select``."""
        if self._indices is None:
            raise RuntimeError(
                f"{type(self).__name__}: the subnetwork is not selected yet; call "
                "select(train_loader) first."
            )
        return self._indices

    @property
    def n_params_subnet(self) -> int:
        """Number of selected weights (needs ``select`` for name-based masks)."""
        return len(self.indices)

    def select(self, train_loader: Iterable[Any] | None = None) -> torch.LongTensor:
        """Select the subnetwork; return and store its ``indices``.

        Parameters
        ----------
        train_loader : iterable of batches, optional
            needed by masks whose choice depends on data (the SWAG and an unfitted
            diagonal-Laplace variance, the last layer when it is not named).

        Returns
        -------
        torch.LongTensor ``(n_params_subnet,)``, ascending.

        Raises
        ------
        ValueError
            if this mask has selected already (make a new mask to select again) or
            the selection is empty.
        """
        if self._indices is not None:
            raise ValueError(
                f"{type(self).__name__} has selected its subnetwork already (see "
                ".indices); make a new mask to select again."
            )
        indices = self.convert_subnet_mask_to_indices(
            self.get_subnet_mask(train_loader)
        )
        if indices.numel() == 0:
            raise ValueError(f"{type(self).__name__} selected no weights.")
        self._indices = indices
        return indices

    def get_subnet_mask(self, train_loader: Iterable[Any] | None) -> Tensor:
        """Boolean mask ``(n_params,)``: ``True`` at the selected weights."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement get_subnet_mask(train_loader)."
        )

    def convert_subnet_mask_to_indices(self, subnet_mask: Tensor) -> torch.LongTensor:
        """Indices ``(S,)`` (ascending, int64) of the ones in a 0/1 or boolean mask
        ``(n_params,)``."""
        if not isinstance(subnet_mask, Tensor):
            raise TypeError(
                f"subnet_mask must be a tensor; got {type(subnet_mask).__name__}."
            )
        if subnet_mask.dtype.is_floating_point or subnet_mask.dtype.is_complex:
            raise ValueError(
                "subnet_mask must be boolean or integer; got dtype "
                f"{subnet_mask.dtype}."
            )
        if subnet_mask.shape != (self.n_params,):
            raise ValueError(
                f"subnet_mask must have shape ({self.n_params},) (one entry per "
                f"weight of parameters_to_vector(model.parameters())); got "
                f"{tuple(subnet_mask.shape)}."
            )
        if subnet_mask.dtype != torch.bool:
            if not bool(((subnet_mask == 0) | (subnet_mask == 1)).all()):
                raise ValueError("subnet_mask must hold only 0 and 1.")
            subnet_mask = subnet_mask.bool()
        return subnet_mask.nonzero().flatten()

    def _mask_of(self, params: Iterable[nn.Parameter]) -> Tensor:
        """Boolean mask of every weight of ``params``."""
        mask = torch.zeros(self.n_params, dtype=torch.bool, device=self._device)
        for p in params:
            mask[self._slices[id(p)]] = True
        return mask


# -- score-based ----------------------------------------------------------------------
class ScoreBasedSubnetMask(SubnetMask):
    """Select the ``n_params_subnet`` weights of largest score.

    Subclasses implement ``compute_param_scores``. A score of ``-inf`` marks a
    weight that cannot be selected.

    Parameters
    ----------
    model : torch.nn.Module
    n_params_subnet : int
        ``1 <= n_params_subnet <= n_params``.
    """

    def __init__(self, model: nn.Module, n_params_subnet: int) -> None:
        super().__init__(model)
        if isinstance(n_params_subnet, bool) or not isinstance(
            n_params_subnet, Integral
        ):
            raise TypeError(
                f"n_params_subnet must be an int; got {type(n_params_subnet).__name__}."
            )
        if not 1 <= n_params_subnet <= self.n_params:
            raise ValueError(
                f"n_params_subnet must be between 1 and the model's number of "
                f"parameters, {self.n_params}; got {n_params_subnet}."
            )
        self._n_params_subnet = int(n_params_subnet)

    @property
    def n_params_subnet(self) -> int:
        """The number of weights to select (known before ``select``)."""
        return self._n_params_subnet

    def compute_param_scores(self, train_loader: Iterable[Any] | None) -> Tensor:
        """One score per weight ``(n_params,)``."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement compute_param_scores(train_loader)."
        )

    def _check_param_scores(self, param_scores: Tensor) -> None:
        if param_scores.shape != (self.n_params,):
            raise ValueError(
                f"{type(self).__name__}: the parameter scores have shape "
                f"{tuple(param_scores.shape)}; expected ({self.n_params},)."
            )
        if bool(torch.isnan(param_scores).any()):
            raise ValueError(f"{type(self).__name__}: the parameter scores hold NaN.")

    def get_subnet_mask(self, train_loader: Iterable[Any] | None) -> Tensor:
        """``True`` at the ``n_params_subnet`` largest scores (ties: lower index)."""
        scores = self.compute_param_scores(train_loader).detach()
        self._check_param_scores(scores)
        eligible = int((scores > -torch.inf).sum())
        if self.n_params_subnet > eligible:
            raise ValueError(
                f"n_params_subnet={self.n_params_subnet} but {type(self).__name__} "
                f"can select only {eligible} of the {self.n_params} weights (the "
                "others have no score)."
            )
        top = torch.argsort(scores, descending=True, stable=True)[
            : self.n_params_subnet
        ]
        mask = torch.zeros(self.n_params, dtype=torch.bool, device=scores.device)
        mask[top] = True
        return mask.to(self._device)


class RandomSubnetMask(ScoreBasedSubnetMask):
    """Uniformly random weights: scores ``torch.rand(n_params)`` in the parameters'
    dtype and device (reproducible under ``torch.manual_seed``; the same draw as
    laplace-torch's)."""

    def compute_param_scores(self, train_loader: Iterable[Any] | None) -> Tensor:
        p = next(iter(self.model.parameters()))
        return torch.rand(self.n_params, dtype=p.dtype, device=p.device)


class LargestMagnitudeSubnetMask(ScoreBasedSubnetMask):
    """The weights of largest magnitude: scores ``|theta|`` ``(n_params,)``."""

    def compute_param_scores(self, train_loader: Iterable[Any] | None) -> Tensor:
        return _flat_parameters(self.model).abs()


class LargestVarianceDiagLaplaceSubnetMask(ScoreBasedSubnetMask):
    """The weights of largest marginal posterior variance under a diagonal Laplace
    approximation.

    Scores are ``diag_laplace_model.posterior_variance`` placed at the weights it
    treats (its ``params``: those that require grad, or the last layer for a
    ``laplace.DiagLLLaplace``); the other weights get ``-inf`` and are never
    selected. An unfitted ``diag_laplace_model`` is fitted on ``train_loader``; a
    fitted one is used as it is (laplace-torch refits it on every ``select``).

    Parameters
    ----------
    model : torch.nn.Module
    n_params_subnet : int
    diag_laplace_model : DiagLaplace
        a diagonal Laplace approximation of ``model``.
    """

    def __init__(
        self, model: nn.Module, n_params_subnet: int, diag_laplace_model: DiagLaplace
    ) -> None:
        from laplace.parametric.diag import DiagLaplace

        super().__init__(model, n_params_subnet)
        if not isinstance(diag_laplace_model, DiagLaplace):
            raise TypeError(
                "diag_laplace_model must be a DiagLaplace (e.g. Laplace(model, "
                "likelihood, hessian_structure='diag')); got "
                f"{type(diag_laplace_model).__name__}."
            )
        self.diag_laplace_model = diag_laplace_model
        if diag_laplace_model.params is not None:
            self._check_treated(diag_laplace_model.params)

    def _check_treated(self, params: Sequence[nn.Parameter]) -> None:
        foreign = [i for i, p in enumerate(params) if id(p) not in self._slices]
        if foreign:
            raise ValueError(
                "diag_laplace_model treats parameters that are not the model's "
                f"(positions {foreign} of its params): build it on the same model."
            )

    def compute_param_scores(self, train_loader: Iterable[Any] | None) -> Tensor:
        la = self.diag_laplace_model
        if not la.fitted:
            if train_loader is None:
                raise ValueError(
                    "diag_laplace_model is not fitted: pass train_loader to select() "
                    "to fit it, or fit it first."
                )
            la.fit(train_loader)
        self._check_treated(la.params)
        variance = la.posterior_variance.detach()
        sizes = [p.numel() for p in la.params]
        if variance.shape != (sum(sizes),):
            raise ValueError(
                f"diag_laplace_model's posterior_variance has shape "
                f"{tuple(variance.shape)}, not one entry per weight of its params "
                f"({sum(sizes)})."
            )
        scores = torch.full(
            (self.n_params,), -torch.inf, dtype=variance.dtype, device=variance.device
        )
        for p, v in zip(la.params, variance.split(sizes)):
            scores[self._slices[id(p)]] = v
        return scores


class LargestVarianceSWAGSubnetMask(ScoreBasedSubnetMask):
    """The weights of largest diagonal-SWAG variance
    (``laplace.utils.swag.fit_diagonal_swag_var``, with momentum 0.9 and weight
    decay 3e-4).

    Parameters
    ----------
    model : torch.nn.Module
    n_params_subnet : int
    likelihood : str, Likelihood or OutputLikelihood, default='classification'
        any likelihood of ``laplace.likelihood`` (a built-in's name or an object of
        your own); SGD runs on its negative log-likelihood per datum averaged over
        the batch, ``likelihood.loss(f, y) / batch`` on the targets that its
        ``check_targets`` validated. Classification and regression keep
        laplace-torch's losses, ``nn.CrossEntropyLoss()`` and ``nn.MSELoss()``
        (the mean over every entry of the squared error, ``loss / (0.5 batch
        C)`` with ``C`` outputs); reward modeling is the cross-entropy of pairs.
    swag_n_snapshots : int, default=40
    swag_snapshot_freq : int, default=1
    swag_lr : float, default=0.01
    dict_key_x : str, default='input_ids'
        key of the inputs in mapping (dict-like) batches.
    dict_key_y : str, default='labels'
        key of the targets in mapping (dict-like) batches.
    """

    def __init__(
        self,
        model: nn.Module,
        n_params_subnet: int,
        likelihood: Likelihood | str = Likelihood.CLASSIFICATION,
        swag_n_snapshots: int = 40,
        swag_snapshot_freq: int = 1,
        swag_lr: float = 0.01,
        *,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
    ) -> None:
        super().__init__(model, n_params_subnet)
        #: the likelihood object whose mean loss SGD minimises
        self.lik = get_likelihood(likelihood)
        #: the likelihood as given: a ``Likelihood`` for a name, else the object
        self.likelihood = (
            likelihood
            if isinstance(likelihood, OutputLikelihood)
            else parse_enum(Likelihood, likelihood, "likelihood")
        )
        _check_swag_arguments(swag_n_snapshots, swag_snapshot_freq, swag_lr, 0.0)
        self.swag_n_snapshots = swag_n_snapshots
        self.swag_snapshot_freq = swag_snapshot_freq
        self.swag_lr = swag_lr
        self.dict_key_x, self.dict_key_y = dict_key_x, dict_key_y

    def compute_param_scores(self, train_loader: Iterable[Any] | None) -> Tensor:
        if train_loader is None:
            raise ValueError("The SWAG mask needs train_loader: pass it to select().")
        return fit_diagonal_swag_var(
            self.model,
            train_loader,
            _MeanLoss(self.lik),
            n_snapshots_total=self.swag_n_snapshots,
            snapshot_freq=self.swag_snapshot_freq,
            lr=self.swag_lr,
            dict_key_x=self.dict_key_x,
            dict_key_y=self.dict_key_y,
        )


#: laplace-torch's SGD losses, kept as torch averages them (``MSELoss`` over every
#: entry, not per datum): the SWAG mask's numbers of before the likelihood protocol
_TORCH_MEAN_LOSSES = (nn.CrossEntropyLoss, nn.MSELoss)


class _MeanLoss(nn.Module):
    """The SGD loss of the SWAG mask: a likelihood's negative log-likelihood per
    datum averaged over the batch, ``likelihood.loss(f, y) / batch`` with ``f``
    ``(batch, C)`` and ``y`` validated by ``likelihood.check_targets``; or, where the
    likelihood's ``loss_module()`` is one of ``_TORCH_MEAN_LOSSES``, that module's
    mean (laplace-torch's ``nn.CrossEntropyLoss()`` and ``nn.MSELoss()``)."""

    def __init__(self, likelihood: OutputLikelihood) -> None:
        super().__init__()
        self.likelihood = likelihood
        module = likelihood.loss_module()
        self.torch_mean: nn.Module | None = None
        if type(module) in _TORCH_MEAN_LOSSES:
            self.torch_mean = copy.copy(module)  # its settings, batch-mean reduced
            self.torch_mean.reduction = "mean"

    def forward(self, f: Tensor, y: Tensor) -> Tensor:
        y = self.likelihood.check_targets(f, y)
        if self.torch_mean is not None:
            return self.torch_mean(f, y)
        return self.likelihood.loss(f, y) / f.shape[0]


# -- name-based -----------------------------------------------------------------------
class ParamNameSubnetMask(SubnetMask):
    """Every weight of the named parameters.

    Parameters
    ----------
    model : torch.nn.Module
    parameter_names : list of str
        names in ``model.named_parameters()`` (a tied parameter may be named by any
        of its names); checked here.
    """

    def __init__(self, model: nn.Module, parameter_names: Sequence[str]) -> None:
        super().__init__(model)
        named = dict(model.named_parameters(remove_duplicate=False))
        _check_names(parameter_names, named, "parameter_names", "parameter")
        self.parameter_names = list(parameter_names)
        self._params = [named[n] for n in self.parameter_names]

    def get_subnet_mask(self, train_loader: Iterable[Any] | None) -> Tensor:
        return self._mask_of(self._params)


class ModuleNameSubnetMask(SubnetMask):
    """Every weight of the named modules, their submodules included.

    Parameters
    ----------
    model : torch.nn.Module
    module_names : list of str
        names in ``model.named_modules()`` of modules that have parameters; checked
        here. (laplace-torch refuses modules with children; here a module stands
        for all its parameters.)
    """

    def __init__(self, model: nn.Module, module_names: Sequence[str]) -> None:
        super().__init__(model)
        self.module_names = self._check_module_names(module_names)

    def _check_module_names(self, module_names: Sequence[str]) -> list[str]:
        modules = dict(self.model.named_modules(remove_duplicate=False))
        _check_names(module_names, modules, "module_names", "module")
        empty = [n for n in module_names if next(modules[n].parameters(), None) is None]
        if empty:
            raise ValueError(
                f"module_names: the modules {empty} have no parameters; name modules "
                "with parameters."
            )
        return list(module_names)

    def get_subnet_mask(self, train_loader: Iterable[Any] | None) -> Tensor:
        modules = dict(self.model.named_modules(remove_duplicate=False))
        return self._mask_of(
            p for name in self.module_names for p in modules[name].parameters()
        )


class LastLayerSubnetMask(ModuleNameSubnetMask):
    """Every weight of the model's last ``nn.Linear`` layer.

    Parameters
    ----------
    model : torch.nn.Module
    last_layer_name : str, optional
        its name in ``model.named_modules()``. When omitted, it is found on the first
        batch of the ``train_loader`` given to ``select`` (a forward pass: the
        ``nn.Linear`` that produces the output, see
        ``laplace.utils.FeatureExtractor.find_last_layer``). laplace-torch
        needs the loader even for a named layer; here it does not.
    """

    def __init__(self, model: nn.Module, last_layer_name: str | None = None) -> None:
        SubnetMask.__init__(self, model)
        self.last_layer_name = last_layer_name
        self.module_names: list[str] | None = None
        if last_layer_name is not None:
            self._set_last_layer(last_layer_name)

    def _set_last_layer(self, name: str) -> None:
        if not isinstance(name, str):
            raise TypeError(
                f"last_layer_name must be a str; got {type(name).__name__}."
            )
        self.module_names = self._check_module_names([name])
        layer = self.model.get_submodule(name)
        if not isinstance(layer, nn.Linear):
            raise ValueError(
                f"last_layer_name={name!r} is a {type(layer).__name__}; the last "
                "layer must be an nn.Linear."
            )
        self.last_layer_name = name

    def get_subnet_mask(self, train_loader: Iterable[Any] | None) -> Tensor:
        if self.module_names is None:
            if train_loader is None:
                raise ValueError(
                    "LastLayerSubnetMask needs train_loader to find the last layer "
                    "(a forward pass of one batch), or name it with last_layer_name."
                )
            extractor = FeatureExtractor(self.model)
            with torch.no_grad():
                extractor.find_last_layer(_first_inputs(train_loader, self._device))
            self._set_last_layer(extractor.last_layer_name)
        return super().get_subnet_mask(train_loader)


# -- helpers --------------------------------------------------------------------------
def _parameter_slices(model: nn.Module) -> dict[int, slice]:
    """``id(parameter) -> slice`` of it in ``parameters_to_vector(
    model.parameters())``."""
    slices, start = {}, 0
    for p in model.parameters():
        slices[id(p)] = slice(start, start + p.numel())
        start += p.numel()
    return slices


def _flat_parameters(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _check_names(names: Any, valid: dict[str, Any], argument: str, what: str) -> None:
    """Refuse a string, an empty list or unknown names (listing the closest)."""
    if isinstance(names, str) or not isinstance(names, (Sequence, set, frozenset)):
        raise TypeError(
            f"{argument} must be a list of {what} names; got {type(names).__name__}"
            + (f" {names!r} (wrap it in a list)." if isinstance(names, str) else ".")
        )
    if len(names) == 0:
        raise ValueError(f"{argument} is empty; name at least one {what}.")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(
                f"{argument} must hold str; got {type(name).__name__} {name!r}."
            )
        if name not in valid:
            close = difflib.get_close_matches(name, list(valid), n=5)
            hint = (
                f"the closest {what} names are {close}"
                if close
                else f"the model's {what} names include {list(valid)[:10]}"
            )
            raise ValueError(
                f"{argument}: {name!r} is not a {what} of the model; {hint}."
            )


def _first_inputs(train_loader: Iterable[Any], device: torch.device) -> Any:
    """The inputs of the first batch: ``x`` of ``(x, y)``, or the whole mapping."""
    batch = next(iter(train_loader), None)
    if batch is None:
        raise ValueError("train_loader yielded no batch to find the last layer.")
    if isinstance(batch, MutableMapping):
        x = batch
    elif isinstance(batch, (tuple, list)) and len(batch) > 0:
        x = batch[0]
    else:
        raise TypeError(
            "Each batch must be a pair (x, y) or a mapping; got "
            f"{type(batch).__name__}."
        )
    return to_device(x, device)
