"""The curvature interface: what every backend offers and what they share.

A backend computes, for one batch ``(x, y)``, the curvature of the summed loss of
DESIGN.md section 3 with respect to the parameters that require grad (or the last
layer's, or a subnetwork's), in one of three structures:

- ``full``: a dense ``(P, P)`` matrix;
- ``kron``: a ``laplace.utils.matrix.Kron`` with one factor pair per layer;
- ``diag``: its diagonal ``(P,)``.

Each method returns ``(loss, H)`` with ``loss`` the summed loss of the batch.
Subclasses state what they support in ``supported_structures`` and
``supports_dict_inputs``; unsupported use fails before any work is done.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Iterator, MutableMapping
from types import ModuleType
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from laplace.curvature import backprop_factor
from laplace.data import Inputs, batch_size
from laplace.likelihood import OutputLikelihood, get_likelihood
from laplace.utils._checks import check_positive_int
from laplace.utils.enums import Likelihood
from laplace.utils.feature_extractor import FeatureExtractor
from laplace.utils.matrix import Kron  # noqa: F401  (laplace-torch's module-level name)

STRUCTURES = ("full", "kron", "diag")


class CurvatureInterface:
    """Interface to the curvature of a model and likelihood.

    Parameters
    ----------
    model : nn.Module or FeatureExtractor
    likelihood : Likelihood or str, or a laplace.likelihood.OutputLikelihood
        reward modeling uses the classification curvature on pairs.
    last_layer : bool, default=False
        only the parameters of the last ``nn.Linear`` layer (the model is wrapped in a
        ``FeatureExtractor`` unless it is one).
    subnetwork_indices : torch.LongTensor, optional
        indices into the flattened parameter vector; ``full`` and ``diag`` then return
        the curvature of these entries only.
    dict_key_x : str, default='input_ids'
        key of the inputs when batches are mappings.
    dict_key_y : str, default='labels'
        key of the targets when batches are mappings.

    Attributes
    ----------
    lik : laplace.likelihood.OutputLikelihood
        the likelihood object (its loss, output-Hessian factor and loss gradient).
    lossfunc : torch.nn.Module (sum-reduced)
        the likelihood's ``loss_module()``: ``MSELoss``, ``CrossEntropyLoss``,
        ``BCEWithLogitsLoss``, or a module of its own.
    factor : float
        ``0.5`` for regression (from ``MSELoss`` to ``N(f, 1)``), ``1`` otherwise.
    """

    #: structures this backend can compute, a subset of ``STRUCTURES``
    supported_structures: ClassVar[frozenset[str]] = frozenset()
    #: whether batches may be mappings (Hugging Face style)
    supports_dict_inputs: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
    ) -> None:
        self.lik = get_likelihood(likelihood)
        #: the likelihood of the curvature (reward modeling: classification of pairs)
        self.likelihood = (
            Likelihood.CLASSIFICATION
            if self.lik.pairs
            else next((m for m in Likelihood if m.value == self.lik.name), self.lik)
        )
        #: inputs are pairs ``(batch, 2, ...)`` whose two outputs are the logits
        self.reward_modeling = self.lik.pairs
        if last_layer and not isinstance(model, FeatureExtractor):
            model = FeatureExtractor(model)
        self.model = model
        self.last_layer = last_layer
        self.subnetwork_indices = subnetwork_indices
        self.dict_key_x = dict_key_x
        self.dict_key_y = dict_key_y
        self.lossfunc = self.lik.loss_module()
        self.factor = self.lik.factor

    # -- what is differentiated -------------------------------------------------
    @property
    def params(self) -> list[nn.Parameter]:
        """The parameters the curvature is taken over, in model order."""
        module = self.model.last_layer if self.last_layer else self.model
        if module is None:
            raise RuntimeError(
                "The last layer is not known yet; it is found on the first forward "
                "pass (or name it with last_layer_name=...)."
            )
        return [p for p in module.parameters() if p.requires_grad]

    def _target(self, x: Inputs) -> tuple[nn.Module, Inputs]:
        """The module and inputs whose parameters the curvature is taken over.

        For the last layer these are the last ``nn.Linear`` and its input features,
        so that every structure of every backend works on the last layer alone.
        """
        if not self.last_layer:
            return self.model, x
        if self.reward_modeling:
            _, features = self.model.forward_with_features(x, reduce=False)
            pairs = _pair_features(self.model, features, batch_size(x, self.dict_key_x))
            return PairedLinear(self.model.last_layer), pairs.detach()
        _, features = self.model.forward_with_features(x)
        return self.model.last_layer, features.detach()

    def _check_batch(self, x: Inputs, y: torch.Tensor | None = None) -> None:
        if isinstance(x, MutableMapping) and not self.supports_dict_inputs:
            raise ValueError(
                f"{type(self).__name__} cannot take mapping (dict) inputs; use "
                "CurvlinopsGGN/CurvlinopsEF (the default) or the Asdl backends."
            )
        n = batch_size(x, self.dict_key_x)
        if n == 0:
            raise ValueError("The batch is empty: it must hold at least one datum.")
        if y is not None and y.shape[:1] != (n,):
            raise ValueError(
                f"Targets of shape {tuple(y.shape)} do not match a batch of {n} inputs."
            )

    @classmethod
    def check_likelihood(
        cls, likelihood: OutputLikelihood, structure: str | None, stochastic: bool
    ) -> None:
        """Refuse, before any work, a likelihood this backend cannot compute the
        ``structure`` of (``stochastic``: the Monte-Carlo Fisher), naming what can.

        The library's own computations take every likelihood with an output-Hessian
        factor; the Monte-Carlo Fisher needs one that draws targets
        (``sampled_gradients``). Library adapters refuse the losses their library
        does not know.
        """
        if stochastic and not likelihood.samples_targets:
            raise ValueError(
                f"backend_kwargs stochastic=True (the Monte-Carlo Fisher) needs a "
                f"likelihood that draws targets (sampled_gradients); "
                f"likelihood={likelihood.name!r} does not. Use stochastic=False."
            )

    @classmethod
    def _refuse_likelihood(
        cls, likelihood: OutputLikelihood, what: str, known: str
    ) -> None:
        raise ValueError(
            f"backend={cls.__name__} cannot compute {what} for likelihood="
            f"{likelihood.name!r}: its library knows only {known}. Use NativeGGN "
            "(the default) or NativeEF, which take every likelihood."
        )

    @classmethod
    def _check_structure(cls, structure: str) -> None:
        """Refuse a structure this backend cannot compute, naming those that can."""
        if structure not in cls.supported_structures:
            from laplace.curvature import backends_supporting

            others = ", ".join(backends_supporting(structure)) or "none"
            raise ValueError(
                f"{cls.__name__} cannot compute the {structure!r} structure "
                f"(it supports {sorted(cls.supported_structures)}); backends that "
                f"can: {others}."
            )

    def _subnet(self, H: torch.Tensor) -> torch.Tensor:
        idx = self.subnetwork_indices
        if idx is None:
            return H
        return H[idx] if H.ndim == 1 else H[idx][:, idx]

    # -- Jacobians and gradients --------------------------------------------------
    def jacobians(
        self, x: Inputs, enable_backprop: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Jacobians ``(batch, outputs, parameters)`` and outputs ``(batch, outputs)``
        at the current parameters, via ``torch.func``; with ``enable_backprop`` both
        stay differentiable w.r.t. ``x``."""
        self._check_batch(x)
        model = self.model
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.set_grad_enabled(enable_backprop or torch.is_grad_enabled()):
            return backprop_factor.jacobian(model, params, x, enable_backprop)

    def last_layer_jacobians(
        self, x: Inputs, enable_backprop: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Jacobians ``(batch, outputs, last-layer parameters)`` and outputs.

        For a linear last layer ``f = W phi + b`` the Jacobian is ``I (x) phi^T`` for
        ``W`` and ``I`` for ``b``; it is formed from the features, not by autodiff.
        """
        self._check_batch(x)
        model = self.model
        if not isinstance(model, FeatureExtractor):
            model = self.model = FeatureExtractor(model)
        f, phi = model.forward_with_features(x)
        if enable_backprop is False:
            f, phi = f.detach(), phi.detach()
        return last_layer_jacobian(model.last_layer, phi), f

    def functorch_jacobians(
        self, x: Inputs, enable_backprop: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Jacobians ``(batch, outputs, parameters)`` and outputs ``(batch, outputs)``
        via ``torch.func``, whatever the backend (``jacobians`` of this interface)."""
        return CurvatureInterface.jacobians(self, x, enable_backprop)

    def selected_output_jacobians(
        self, x: Inputs, outputs: torch.Tensor, enable_backprop: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Jacobians of one chosen output per example.

        Parameters
        ----------
        x : torch.Tensor or mapping
            inputs ``(batch, input_shape)``
        outputs : torch.LongTensor
            ``(batch,)``: the output ``c_n`` whose Jacobian is taken for example ``n``
        enable_backprop : bool, default=False
            keep both results differentiable w.r.t. ``x``

        Returns
        -------
        Js : torch.Tensor
            ``(batch, 1, parameters)``: ``d f_n[c_n] / d theta``
        f : torch.Tensor
            all outputs ``(batch, outputs)``
        """
        self._check_batch(x)
        n = batch_size(x, self.dict_key_x)
        if (
            not isinstance(outputs, torch.Tensor)
            or outputs.shape != (n,)
            or outputs.is_floating_point()
            or outputs.is_complex()
        ):
            raise ValueError(
                f"outputs must be an integer tensor of shape ({n},), one output index "
                f"per example; got {_describe(outputs)}."
            )
        params = [p for p in self.model.parameters() if p.requires_grad]

        def one_hot(f):
            if bool((outputs < 0).any()) or bool((outputs >= f.shape[-1]).any()):
                raise ValueError(
                    f"outputs must index the model's {f.shape[-1]} outputs; got "
                    f"values from {int(outputs.min())} to {int(outputs.max())}."
                )
            idx = outputs.to(f.device)
            return F.one_hot(idx, f.shape[-1]).to(f.dtype).unsqueeze(-1)

        if enable_backprop:
            J, f = self.functorch_jacobians(x, enable_backprop=True)
            return (J * one_hot(f)).sum(1, keepdim=True), f
        f, V = backprop_factor.per_example_vectors(self.model, params, x, one_hot)
        return V.transpose(0, 1), f

    def gradients(
        self, x: Inputs, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example gradients of ``lossfunc`` and its value on the batch.

        ``lossfunc`` is the sum-reduced torch loss (``MSELoss`` for regression,
        ``CrossEntropyLoss`` for classification), as in laplace-torch: for
        regression both are twice those of the loss ``factor * lossfunc`` that the
        curvature is taken of.

        Returns
        -------
        Gs : torch.Tensor
            ``(batch, parameters)``
        loss : torch.Tensor
            ``lossfunc(f, y)``
        """
        self._check_batch(x, y)
        module, inputs = self._target(x)
        targets: dict[str, torch.Tensor] = {}

        def factor(f):
            targets["y"] = self.lik.check_targets(f, y)
            return self.lik.loss_gradient(f, targets["y"]).unsqueeze(-1)

        f, V = backprop_factor.per_example_vectors(module, self.params, inputs, factor)
        to_lossfunc = 1 / self.factor
        loss = self.lik.loss(f, targets["y"]).detach()
        return _scaled(V[0], to_lossfunc), _scaled(loss, to_lossfunc)

    # -- structures ---------------------------------------------------------------
    def full(self, x: Inputs, y: torch.Tensor, **kwargs: Any):
        """Dense curvature ``(P, P)`` of the summed loss; returns ``(loss, H)``."""
        self._check_structure("full")
        raise NotImplementedError

    def kron(self, x: Inputs, y: torch.Tensor, N: int, **kwargs: Any):
        """Kronecker-factored curvature (KFAC) over a data set of ``N`` points;
        returns ``(loss, Kron)``, rescaled as DESIGN.md section 3 says."""
        self._check_structure("kron")
        raise NotImplementedError

    def diag(self, x: Inputs, y: torch.Tensor, **kwargs: Any):
        """Diagonal ``(P,)`` of the curvature; returns ``(loss, H)``."""
        self._check_structure("diag")
        raise NotImplementedError


class PairedLinear(nn.Module):
    """A last layer with one output applied to the two items of each pair: features
    ``(batch, 2, dim)`` -> logits ``(batch, 2)`` (reward modeling)."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        if layer.out_features != 1:
            raise ValueError(
                "Reward modeling needs a last layer with one output (the reward); "
                f"the last layer has {layer.out_features}."
            )
        self.layer = layer

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layer(features).squeeze(-1)


def _pair_features(
    extractor: FeatureExtractor, features: torch.Tensor, n_pairs: int
) -> torch.Tensor:
    """Last-layer features of pair inputs as ``(pairs, 2, dim)``, a sequence dimension
    (``(pairs, 2, seq_len, dim)``) reduced by the extractor's ``feature_reduction``."""
    dim = features.shape[-1]
    if features.numel() % (2 * n_pairs * dim) != 0:
        raise ValueError(
            f"Reward modeling takes pairs: inputs of shape (batch, 2, ...); the "
            f"last-layer features of {n_pairs} pairs have shape "
            f"{tuple(features.shape)}."
        )
    per_item = features.reshape(2 * n_pairs, -1, dim)
    if per_item.shape[1] == 1:
        return per_item.reshape(n_pairs, 2, dim)
    return extractor.reduce_features(per_item).reshape(n_pairs, 2, dim)


def import_library(module: str, package: str, backend: str) -> ModuleType:
    """Import an optional backend library when it is first used.

    Raises
    ------
    ImportError
        saying which package to install, so a missing library never breaks
        ``import laplace``, only the use of its backend.
    """
    try:
        with warnings.catch_warnings():  # some libraries warn on import
            warnings.simplefilter("ignore")
            return importlib.import_module(module)
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"The {backend} backend needs the package {package}: pip install {package}"
        ) from err


@contextlib.contextmanager
def model_left_as_found(model: nn.Module) -> Iterator[None]:
    """Undo what a library leaves on ``model`` inside the context.

    Libraries run hooks on the modules and store results and flags on modules and
    parameters; some flags outlive the hooks (ASDL's ``register_backward_hook``
    leaves ``_is_full_backward_hook = False``, after which BackPACK cannot register
    its own hooks). On exit every module and parameter of ``model`` gets back its
    attributes (added ones are removed, replaced ones restored), its hook
    dictionaries lose the hooks added inside, and parameters their
    ``requires_grad``. Tensor results a backend needs must be read inside.
    """
    modules = list(model.modules())
    params = list(model.parameters())
    saved_modules = [(m, dict(vars(m)), _hook_keys(m)) for m in modules]
    saved_params = [(p, dict(vars(p)), p.requires_grad) for p in params]
    try:
        yield
    finally:
        for m, attrs, hooks in saved_modules:
            _restore_attributes(m, attrs)
            for name, keys in hooks.items():
                table = vars(m)[name]
                for key in [k for k in table if k not in keys]:
                    del table[key]
        for p, attrs, requires_grad in saved_params:
            _restore_attributes(p, attrs)
            if p.requires_grad != requires_grad:
                p.requires_grad_(requires_grad)


def _hook_keys(module: nn.Module) -> dict[str, set]:
    """The keys of every dictionary in ``module.__dict__`` (hooks and the like)."""
    return {
        name: set(value)
        for name, value in vars(module).items()
        if isinstance(value, dict) and name not in _MODULE_CONTENT
    }


#: the module's own content, never touched by ``model_left_as_found``
_MODULE_CONTENT = frozenset({"_parameters", "_buffers", "_modules"})


def _restore_attributes(obj: Any, attrs: dict[str, Any]) -> None:
    current = vars(obj)
    for name in [k for k in current if k not in attrs]:
        del current[name]
    for name, value in attrs.items():
        if name not in _MODULE_CONTENT and current.get(name, _MISSING) is not value:
            current[name] = value


_MISSING = object()


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _scaled(H: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * H``, in place and only when ``scale`` is not 1 (``H`` is fresh)."""
    return H if scale == 1 else H.mul_(scale)


def last_layer_jacobian(layer: nn.Linear, phi: torch.Tensor) -> torch.Tensor:
    """Jacobian ``(N, C, C*D [+ C])`` of ``f = W phi + b`` w.r.t. ``(W, b)``."""
    N, C = phi.shape[0], layer.out_features
    eye = torch.eye(C, dtype=phi.dtype, device=phi.device)
    pieces = []
    if layer.weight.requires_grad:
        pieces.append(torch.einsum("ce,nd->nced", eye, phi).reshape(N, C, -1))
    if layer.bias is not None and layer.bias.requires_grad:
        pieces.append(eye.expand(N, C, C))
    return torch.cat(pieces, dim=-1)


class _OuterProductCurvature(CurvatureInterface):
    """Full and diagonal curvature as ``sum_nk v_nk v_nk^T`` with ``v = J^T M``
    (see ``laplace.curvature.backprop_factor``); subclasses choose ``M``.

    ``GGNInterface`` and ``EFInterface`` are backends of their own: their ``full``
    and ``diag`` need no library (one backward pass of ``M``, or the ``torch.func``
    Jacobian where that route does not apply); ``kron`` needs a library's backend.
    """

    supported_structures: ClassVar[frozenset[str]] = frozenset({"full", "diag"})

    def _output_factor(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _output_moments(self, f: torch.Tensor, y: torch.Tensor):
        """Diagonals ``(N, C)`` and batch sum ``(C, C)`` of ``M M^T``."""
        M = self._output_factor(f, y)
        return M.square().sum(-1), torch.einsum("nck,ndk->cd", M, M)

    def _is_linear_last_layer(self, module, inputs) -> bool:
        return self.last_layer and isinstance(module, nn.Linear) and inputs.ndim == 2

    def last_layer_moments(self, module: nn.Linear, phi: torch.Tensor, y):
        """For a linear last layer on features ``phi`` ``(N, D)``: the outputs, the
        summed loss, and the output moments of ``_output_moments``; with them the
        diagonal and KFAC curvature need no ``(N, C, K)`` factor (3,000 classes)."""
        with torch.no_grad():
            f = module(phi)
        y = self.lik.check_targets(f, y)
        return f, self.lik.loss(f, y), self._output_moments(f, y)

    def _last_layer_diag(self, module: nn.Linear, phi: torch.Tensor, y):
        """``diag(H)`` of ``f = W phi + b``: ``sum_n Lambda_n[c, c] phi_nd^2`` for
        ``W`` and ``sum_n Lambda_n[c, c]`` for ``b``."""
        _, loss, (d, _) = self.last_layer_moments(module, phi, y)
        pieces = []
        if module.weight.requires_grad:
            pieces.append((d.T @ phi.square()).flatten())
        if module.bias is not None and module.bias.requires_grad:
            pieces.append(d.sum(0))
        return loss, self._subnet(torch.cat(pieces))

    def _outer_product(self, x, y, diagonal: bool):
        module, inputs = self._target(x)
        if diagonal and self._is_linear_last_layer(module, inputs):
            return self._last_layer_diag(module, inputs, y)
        targets: dict[str, torch.Tensor] = {}

        def factor(f):
            targets["y"] = self.lik.check_targets(f, y)
            return self._output_factor(f, targets["y"])

        if self._is_linear_last_layer(module, inputs):
            f, H = backprop_factor.linear_layer_full(
                module, inputs, factor, self.subnetwork_indices
            )
        elif diagonal:
            f, H = backprop_factor.outer_product_diag(
                module, self.params, inputs, factor
            )
            H = self._subnet(H)
        else:
            f, H = backprop_factor.outer_product_full(
                module, self.params, inputs, factor, self.subnetwork_indices
            )
        return self.lik.loss(f, targets["y"]).detach(), H

    def full(self, x: Inputs, y: torch.Tensor, **kwargs: Any):
        self._check_structure("full")
        self._check_batch(x, y)
        return self._outer_product(x, y, diagonal=False)

    def diag(self, x: Inputs, y: torch.Tensor, **kwargs: Any):
        self._check_structure("diag")
        self._check_batch(x, y)
        return self._outer_product(x, y, diagonal=True)


class GGNInterface(_OuterProductCurvature):
    """Generalized Gauss-Newton ``sum_n J_n^T Lambda_n J_n`` (the Fisher for these
    likelihoods), or with ``stochastic=True`` its Monte-Carlo estimate from
    ``num_samples`` targets drawn per datum from the model's predictive."""

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        stochastic: bool = False,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        num_samples = check_positive_int(num_samples, "num_samples")
        super().__init__(
            model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y
        )
        self.stochastic = stochastic
        self.num_samples = int(num_samples)
        self.generator = generator

    def _output_factor(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.stochastic:
            return self.lik.sampled_gradients(f, self.num_samples, self.generator)
        return self.lik.hessian_sqrt(f)

    def _output_moments(self, f: torch.Tensor, y: torch.Tensor):
        if self.stochastic:
            return super()._output_moments(f, y)
        return self.lik.hessian_moments(f)


class EFInterface(_OuterProductCurvature):
    """Empirical Fisher ``sum_n g_n g_n^T`` of the per-example loss gradients."""

    def _output_factor(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.lik.loss_gradient(f, y).unsqueeze(-1)


def check_backend(
    backend: Any, structure: str | None = None
) -> type[CurvatureInterface]:
    """The backend class (the default for None); one that cannot compute
    ``structure`` is refused now rather than at fit."""
    if backend is None:
        from laplace.curvature.native import NativeGGN

        backend = NativeGGN
    if not (isinstance(backend, type) and issubclass(backend, CurvatureInterface)):
        raise TypeError(
            "backend must be a CurvatureInterface subclass such as CurvlinopsGGN, "
            f"BackPackGGN or AsdlGGN (the class, not an instance); got {backend!r}."
        )
    if structure in STRUCTURES:
        backend._check_structure(structure)
    return backend
