"""Curvature from BackPACK (https://backpack.pt).

BackPACK extends ``backward`` with quantities gathered per layer:

- GGN ``diag``: ``DiagGGNExact`` (``DiagGGNMC`` with ``stochastic=True``);
- GGN ``full``: ``SqrtGGNExact`` (``SqrtGGNMC``), a factor ``V`` with ``H = V^T V``;
- GGN ``kron``: ``KFLR`` (``KFAC`` with ``stochastic=True``);
- EF ``diag`` and ``full``: ``SumGradSquared`` and ``BatchGrad``.

BackPACK needs its own module hooks: the model (or, with ``last_layer=True``, the last
layer) is copied once, sharing its parameters and buffers, and the copy is extended
with ``backpack.extend``: BackPACK's hooks never touch the user's model. The model
must be built from modules BackPACK knows (for anything else use Curvlinops, the
default). Mapping (dict) batches are not supported.

BackPACK works with ``torch.nn.MSELoss``, whose GGN is twice ours (DESIGN.md
section 3), so its results are multiplied by ``factor`` (``factor**2`` for
gradients). For ``Conv2d``, BackPACK's own ``KFLR``/``KFAC`` factor sums the
backpropagated GGN square root over the output positions before the outer product
(``sum_n (sum_t g)(sum_t g)^T``, the bias's exact GGN) and its input factor sums
over positions. ``kron`` keeps BackPACK's backpropagation but registers, on its
extension, a ``Conv2d`` module extension whose output factor is the KFC (*expand*)
one, ``sum_{n,t} g_t g_t^T``, and brings the input factor to the mean over
positions: the canonical factors of DESIGN.md section 3, which Curvlinops and ASDL
give too (laplace-torch 0.3 keeps both of BackPACK's sums; see docs/differences.md).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import warnings
import weakref
from typing import Any

import torch
from torch import nn

from laplace.curvature.backprop_factor import RowCounter
from laplace.curvature.curvature import (
    CurvatureInterface,
    EFInterface,
    GGNInterface,
    _scaled,
    import_library,
)
from laplace.curvature.kron_assembly import LayerFactors, assemble_kron, kfac_layers
from laplace.data import Inputs
from laplace.utils.enums import Likelihood
from laplace.utils.matrix import Kron


def _backpack():
    """The ``backpack`` package, with its ``extensions`` loaded."""
    import_library("backpack.extensions", "backpack-for-pytorch", "BackPACK")
    return import_library("backpack", "backpack-for-pytorch", "BackPACK")


#: the losses BackPACK's second-order extensions know
LIBRARY_LOSSES = (nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss)


class BackPackInterface(CurvatureInterface):
    """Interface for the BackPACK backend (arguments as ``CurvatureInterface``).

    BackPACK's GGN extensions know ``MSELoss``, ``CrossEntropyLoss`` and
    ``BCEWithLogitsLoss`` ('binary', 'multilabel'); the GGN of another likelihood is
    refused up front. Its first-order extensions (the empirical Fisher) only
    backpropagate the loss's gradient and take every likelihood."""

    supports_dict_inputs = False

    @classmethod
    def check_likelihood(cls, likelihood, structure, stochastic) -> None:
        super().check_likelihood(likelihood, structure, stochastic)
        if issubclass(cls, GGNInterface) and likelihood.library_loss not in (
            LIBRARY_LOSSES
        ):
            cls._refuse_likelihood(
                likelihood,
                "the GGN",
                "MSELoss, CrossEntropyLoss and BCEWithLogitsLoss",
            )

    def _backward(
        self, x: Inputs, y: torch.Tensor, *extensions, target=None, per_example=True
    ) -> torch.Tensor:
        """One forward and backward pass with BackPACK ``extensions`` active.

        The results stay on the parameters (read them with ``_collect``);
        returns the summed loss of DESIGN.md section 3. ``target`` is
        ``_target`` of ``x`` when the caller has it already.

        Raises
        ------
        ValueError
            with ``per_example`` (full and diag), when a layer sees more rows than
            the batch has examples (a model that flattens items per example):
            BackPACK would take each row for an example.
        """
        module, inputs = target or self._target(x)
        module = self._extended(module)
        params = self.params
        try:
            return self._run_backpack(
                module, inputs, y, params, extensions, per_example
            )
        except BaseException:
            for p in params:  # results of a failed pass must not stay on the model
                for ext in extensions:
                    if hasattr(p, ext.savefield):
                        delattr(p, ext.savefield)
            raise

    def _run_backpack(self, module, inputs, y, params, extensions, per_example):
        bp = _backpack()
        lossfunc = bp.extend(self.lik.loss_module())
        with self._rng(), bp.backpack(*extensions), warnings.catch_warnings():
            # BackPACK's hooks fire on outputs when inputs need no grad, as intended
            warnings.filterwarnings("ignore", "Full backward hook is firing")
            with RowCounter(module) as rows:
                f = module(inputs)
            y = self.lik.check_targets(f, y)
            if (
                isinstance(self, GGNInterface)
                and isinstance(lossfunc, nn.BCEWithLogitsLoss)
                and f.shape[-1] != 1
            ):
                raise ValueError(
                    f"{type(self).__name__}: BackPACK's GGN of BCEWithLogitsLoss "
                    f"takes one output (likelihood='binary'); the model has "
                    f"{f.shape[-1]} (likelihood={self.lik.name!r}). Use NativeGGN "
                    "(the default) or CurvlinopsGGN."
                )
            if per_example and not rows.per_example(f.shape[0]):
                raise ValueError(
                    f"{type(self).__name__} takes every row a layer sees for an "
                    f"example, but the layers see {sorted(set(rows.rows))} rows for "
                    f"a batch of {f.shape[0]} (the model flattens items per example)"
                    "; use CurvlinopsGGN/CurvlinopsEF (the default) or the Asdl "
                    "backends for the full and diagonal curvature of this model."
                )
            torch.autograd.grad(lossfunc(f, y), params)
        return self.lik.loss(f.detach(), y)

    def _extended(self, module: nn.Module) -> nn.Module:
        """A BackPACK-extended twin of ``module`` sharing its parameters and
        buffers, made once; BackPACK's hooks never touch the user's model (they
        would break ``torch.func`` on it)."""
        cached = getattr(self, "_twin", None)
        if cached is not None and cached[0] is module:
            return cached[1]
        shared = {id(t): t for t in (*module.parameters(), *module.buffers())}
        twin = _backpack().extend(copy.deepcopy(module, shared))
        self._twin = (module, twin)
        return twin

    def _rng(self):
        """Draw BackPACK's Monte-Carlo samples from ``generator`` when one is set."""
        generator = getattr(self, "generator", None)
        if generator is None:
            return contextlib.nullcontext()
        seed = int(
            torch.randint(2**62, (), generator=generator, device=generator.device)
        )
        devices = [] if self.params[0].device.type == "cpu" else [self.params[0].device]
        stack = contextlib.ExitStack()
        stack.enter_context(torch.random.fork_rng(devices=devices))
        torch.manual_seed(seed)
        return stack

    def _collect(self, attribute: str) -> list[Any]:
        """Remove BackPACK's ``attribute`` from every parameter and return them."""
        values = []
        for p in self.params:
            values.append(getattr(p, attribute))
            delattr(p, attribute)
        return values

    def _diag(self, x, y, extension, attribute: str, scale: float):
        loss = self._backward(x, y, extension)
        diag = torch.cat([d.flatten() for d in self._collect(attribute)])
        return loss, _scaled(self._subnet(diag), scale)

    def _full_from_rows(self, loss, rows: torch.Tensor, scale: float):
        """``H = scale * V^T V`` from rows ``V`` of shape ``(K, P)``."""
        idx = self.subnetwork_indices
        if idx is not None:
            rows = rows[:, idx]
        return loss, _scaled(rows.T @ rows, scale)


class BackPackGGN(BackPackInterface, GGNInterface):
    """GGN (or Monte-Carlo Fisher with ``stochastic=True``) through BackPACK."""

    supported_structures = frozenset({"full", "kron", "diag"})

    def _extension(self, exact: str, sampled: str):
        ext = _backpack().extensions
        if self.stochastic:
            return getattr(ext, sampled)(mc_samples=self.num_samples)
        return getattr(ext, exact)()

    def _kron_extension(self):
        """BackPACK's ``KFLR`` (``KFAC`` when stochastic) with the KFC output factor
        on ``Conv2d`` (``_expand_conv2d``)."""
        extension = self._extension("KFLR", "KFAC")
        extension.set_module_extension(nn.Conv2d, _expand_conv2d()(), overwrite=True)
        return extension

    def diag(self, x: Inputs, y: torch.Tensor, **kwargs: Any):
        self._check_structure("diag")
        self._check_batch(x, y)
        extension = self._extension("DiagGGNExact", "DiagGGNMC")
        attribute = "diag_ggn_mc" if self.stochastic else "diag_ggn_exact"
        return self._diag(x, y, extension, attribute, self.factor)

    def full(self, x: Inputs, y: torch.Tensor, **kwargs: Any):
        self._check_structure("full")
        self._check_batch(x, y)
        extension = self._extension("SqrtGGNExact", "SqrtGGNMC")
        attribute = "sqrt_ggn_mc" if self.stochastic else "sqrt_ggn_exact"
        loss = self._backward(x, y, extension)
        # each factor is (K, batch, *param.shape): one row of V per (k, n)
        rows = torch.cat([V.flatten(2) for V in self._collect(attribute)], dim=2)
        return self._full_from_rows(loss, rows.flatten(0, 1), self.factor)

    def kron(self, x: Inputs, y: torch.Tensor, N: int, **kwargs: Any):
        self._check_structure("kron")
        self._check_batch(x, y)
        target = self._target(x)
        module = target[0]
        layers = kfac_layers(module, self.params)
        extension = self._kron_extension()
        attribute = "kfac" if self.stochastic else "kflr"
        twin_layers = kfac_layers(self._extended(module), self.params)
        with _output_positions(twin_layers) as positions:
            loss = self._backward(x, y, extension, target=target, per_example=False)
        M = len(y)
        factors = {}
        for name, layer in layers:
            weight, bias = layer.weight, getattr(layer, "bias", None)
            if weight.requires_grad:
                G, A = getattr(weight, attribute)
                # BackPACK: A = sum over batch and positions / batch size
                a_scale = M / positions.get(name, 1)
            else:
                (G,), A, a_scale = getattr(bias, attribute), None, 1.0
            for p in (weight, bias):
                if p is not None and p.requires_grad:
                    delattr(p, attribute)
            factors[name] = LayerFactors(G, A, self.factor, a_scale)
        return loss, assemble_kron(self.params, layers, factors, N)


def expand_output_factor(sqrt_ggn: torch.Tensor) -> torch.Tensor:
    """The KFC output factor ``sum_{k,n,t} g_{knt} g_{knt}^T`` of a convolution.

    Parameters
    ----------
    sqrt_ggn : ``(K, M, C_out, *positions)``, the square root of the GGN with
        respect to the layer output that BackPACK backpropagates (``K`` the number
        of classes for ``KFLR``, of Monte-Carlo samples for ``KFAC``).

    Returns
    -------
    ``(C_out, C_out)``
    """
    # one (C_out, T) x (T, C_out) product per (k, n), then the sum: a batched
    # matmul, ten times faster than the einsum over (k, n, t) on a CPU
    g = sqrt_ggn.flatten(start_dim=3).flatten(0, 1)
    return torch.bmm(g, g.transpose(1, 2)).sum(0)


@functools.cache
def _expand_conv2d():
    """BackPACK's ``Conv2d`` module extension for ``KFLR``/``KFAC`` with the KFC
    output factor ``expand_output_factor`` in place of BackPACK's sum over positions
    (the input factor is BackPACK's)."""
    import_library("backpack.extensions", "backpack-for-pytorch", "BackPACK")
    from backpack.extensions.secondorder.hbp.conv2d import HBPConv2d

    class ExpandConv2d(HBPConv2d):
        # weight and bias share the output factor of one backpropagated quantity
        # (held by a weak reference: no tensor of the pass outlives it)
        _last: tuple[weakref.ref, torch.Tensor] | None = None

        def _output_factor(self, backproped):
            if self._last is None or self._last[0]() is not backproped:
                self._last = (weakref.ref(backproped), expand_output_factor(backproped))
            return self._last[1]

        def weight(self, ext, module, g_inp, g_out, backproped):
            _, A = super().weight(ext, module, g_inp, g_out, backproped)
            return [self._output_factor(backproped), A]

        def bias(self, ext, module, g_inp, g_out, backproped):
            return [self._output_factor(backproped).clone()]  # never aliased

    return ExpandConv2d


@contextlib.contextmanager
def _output_positions(layers):
    """``{name: number of output positions}`` of the conv layers in ``layers``,
    filled during the forward passes inside the context."""
    positions: dict[str, int] = {}
    handles = [
        layer.register_forward_hook(
            lambda mod, inp, out, name=name: positions.__setitem__(
                name, out.shape[-1] * out.shape[-2]
            )
        )
        for name, layer in layers
        if isinstance(layer, nn.Conv2d)
    ]
    try:
        yield positions
    finally:
        for handle in handles:
            handle.remove()


class BackPackEF(BackPackInterface, EFInterface):
    """Empirical Fisher through BackPACK."""

    supported_structures = frozenset({"full", "diag"})

    def diag(self, x: Inputs, y: torch.Tensor, **kwargs: Any):
        self._check_structure("diag")
        self._check_batch(x, y)
        extension = _backpack().extensions.SumGradSquared()
        return self._diag(x, y, extension, "sum_grad_squared", self.factor**2)

    def full(self, x: Inputs, y: torch.Tensor, **kwargs: Any):
        self._check_structure("full")
        self._check_batch(x, y)
        loss = self._backward(x, y, _backpack().extensions.BatchGrad())
        rows = torch.cat([g.flatten(1) for g in self._collect("grad_batch")], dim=1)
        return self._full_from_rows(loss, rows, self.factor**2)


__all__ = [
    "BackPackInterface",
    "BackPackGGN",
    "BackPackEF",
    # laplace-torch's module-level names
    "CurvatureInterface",
    "EFInterface",
    "GGNInterface",
    "Kron",
    "Likelihood",
]
