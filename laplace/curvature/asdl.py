"""Curvature from ASDL (asdfghjkl 0.1a4, imported as ``asdl``).

- GGN: ASDL's ``FisherMaker`` with ``FISHER_EXACT`` (``FISHER_MC`` with
  ``stochastic=True``) in the shapes ``SHAPE_FULL``, ``SHAPE_KRON``, ``SHAPE_DIAG``;
  except the exact full GGN without ``fisher_kwargs``: ASDL's per-example gradients
  (``save_batch_gradient``) of ``sum_n f_n^T m_nk`` for the ``K = C - 1`` columns of
  the likelihood's Hessian factor ``M`` give ``v_nk = J_n^T m_nk``, and
  ``H = sum_nk v_nk v_nk^T`` is one symmetric rank-``KN`` update; ASDL's full
  ``FisherMaker`` instead multiplies a ``(P, P)`` matrix per class and batch
  (about 3.5x slower for 10 classes);
- EF: the same with ``FISHER_EMP``;
- Hessian: ASDL's ``HessianMaker`` in ``SHAPE_FULL`` and ``SHAPE_DIAG``.

ASDL's ``FisherMaker`` takes every row a layer sees, and every position of a
``nn.Linear`` layer over a sequence, for an example (wrong full and diagonal
curvature, or a failing full one); for such models (``_LayerRows``) the full and
diagonal GGN, MC Fisher and EF come from ASDL's per-example gradients as above,
with the likelihood's output factor (its Hessian factor, its sampled gradients for
the MC Fisher, its loss gradient for the EF). Its Kronecker input factor of such a
``nn.Linear`` layer sums over the positions and is brought to their mean (the
canonical factor of ``laplace.curvature.kron_assembly``).

ASDL leaves its results as attributes on the modules; they are read and removed after
every batch, so the model is left as it was. Its GGN of ``LOSS_MSE`` already is the
Gaussian ``N(f, 1)`` one of DESIGN.md section 3; its empirical Fisher and Hessian are
those of the summed ``MSELoss`` and are rescaled (by ``factor**2`` and ``factor``).
ASDL sums (rather than averages) Monte-Carlo samples twice over; the estimate is
brought back to an average over ``num_samples``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from laplace.curvature._constants import (
    EPS,
    FISHER_EMP,
    FISHER_EXACT,
    FISHER_MC,
    LOSS_CROSS_ENTROPY,
    LOSS_MSE,
    SHAPE_DIAG,
    SHAPE_FULL,
    SHAPE_KRON,
)
from laplace.curvature.backprop_factor import RowCounter
from laplace.curvature.curvature import (
    CurvatureInterface,
    EFInterface,
    GGNInterface,
    _scaled,
    import_library,
    model_left_as_found,
)
from laplace.curvature.kron_assembly import LayerFactors, assemble_kron, kfac_layers
from laplace.curvature.structures import symmetric_gram
from laplace.data import Inputs, batch_size
from laplace.utils.enums import Likelihood
from laplace.utils.matrix import Kron


def _asdl():
    return import_library("asdl", "asdfghjkl==0.1a4", "ASDL")


#: attribute ASDL leaves on every parameter after restoring ``requires_grad``
_ASDL_MARKER = "_original_requires_grad"


class _CheckedLoss(nn.Module):
    """The likelihood's loss module, validating targets first; ASDL reads and sets
    its ``reduction``."""

    def __init__(self, likelihood) -> None:
        super().__init__()
        self.lik = likelihood
        self.inner = likelihood.loss_module()
        self.reduction = self.inner.reduction

    def forward(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.inner.reduction = self.reduction
        return self.inner(f, self.lik.check_targets(f, y))


class _LayerRows(RowCounter):
    """``RowCounter`` that also records, for every ``nn.Linear`` layer, the number of
    positions per row of its input (the size of the dimensions between the first
    and the last): ASDL's full and diagonal Fisher take each position for an
    example there (and its full one fails), and its Kronecker input factor sums over
    the positions where the canonical one averages.

    ``per_example(N)`` is True only when every layer sees the ``N`` examples as
    rows of a single position.
    """

    def __enter__(self) -> _LayerRows:
        super().__enter__()
        self.positions: dict[int, int] = {}

        def hook(module, inputs, output):
            if isinstance(module, nn.Linear):
                self.positions[id(module)] = inputs[0].shape[1:-1].numel()

        self.handles += [m.register_forward_hook(hook) for m in self.layers]
        return self

    def per_example(self, N: int) -> bool:
        return super().per_example(N) and all(T == 1 for T in self.positions.values())


def _knows(likelihood) -> bool:
    """Whether ASDL's ``FisherMaker`` knows the likelihood's loss."""
    return likelihood.library_loss in (nn.MSELoss, nn.CrossEntropyLoss)


class AsdlInterface(CurvatureInterface):
    """Interface for the ASDL backends.

    Parameters
    ----------
    fisher_kwargs : dict, optional
        extra arguments of ASDL's ``FisherConfig`` (``asdl_fisher_kwargs`` of the
        Laplace classes), for example ``{"ignore_modules": [...]}``.

    Notes
    -----
    The other parameters are those of ``CurvatureInterface``.
    """

    supports_dict_inputs = True

    def __init__(
        self, *args: Any, fisher_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.fisher_kwargs = dict(fisher_kwargs or {})

    @property
    def loss_type(self) -> str:
        """ASDL's name of the loss: ``asdl.LOSS_MSE`` (``'mse'``) for regression,
        ``asdl.LOSS_CROSS_ENTROPY`` (``'cross_entropy'``) otherwise."""
        asdl = _asdl()
        if self.lik.library_loss is nn.MSELoss:
            return asdl.LOSS_MSE
        return asdl.LOSS_CROSS_ENTROPY

    @classmethod
    def check_likelihood(cls, likelihood, structure, stochastic) -> None:
        """ASDL's ``FisherMaker`` knows ``MSELoss`` and ``CrossEntropyLoss``; for
        every other likelihood the full and diagonal GGN, Monte-Carlo Fisher and
        empirical Fisher come from ASDL's per-example gradients of the
        likelihood's output factor, and KFAC is refused."""
        super().check_likelihood(likelihood, structure, stochastic)
        if structure == "kron" and not _knows(likelihood):
            cls._refuse_likelihood(
                likelihood, "KFAC", "MSELoss and CrossEntropyLoss (FisherMaker)"
            )

    # -- running ASDL -------------------------------------------------------------
    def _compute(self, x: Inputs, y: torch.Tensor, shape: str, target=None):
        """``(loss, results of shape)`` for one batch (see ``_run`` and ``_read``);
        the model is left exactly as found (ASDL's flags and results removed)."""
        target = target or self._target(x)
        with model_left_as_found(target[0]):
            module, maker, loss = self._run(x, y, shape, target)
            return loss, self._read(module, maker, shape)

    def _run(self, x: Inputs, y: torch.Tensor, shape: str, target=None):
        """Run ASDL's maker for ``shape`` on one batch; return ``(module, maker,
        loss)`` with the results left on ``module`` and its submodules. ``target``
        is ``_target`` of ``x`` when the caller has it already.

        ``self._rows_per_example`` then says whether every layer saw the batch's
        examples as its rows, one position each (ASDL takes a layer's rows for
        examples), and ``self._positions`` holds the positions per row of every
        ``nn.Linear`` layer (``_LayerRows``); both are set when ASDL fails too."""
        module, inputs = target or self._target(x)
        key = (id(module), shape)
        makers = self.__dict__.setdefault("_makers", {})
        if key not in makers:  # one maker per module and shape, reused over batches
            makers[key] = (module, self._maker(module, shape))
        maker = makers[key][1]
        loss_fn = _CheckedLoss(self.lik)
        N = batch_size(x, self.dict_key_x)
        self._rows_per_example, self._positions = True, {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dummy = maker.setup_model_call(module, inputs)
            maker.setup_loss_call(loss_fn, dummy, y)
            with _LayerRows(module) as rows:
                try:
                    out = maker.forward_and_backward()
                finally:  # known also when ASDL fails on such layers
                    self._rows_per_example = rows.per_example(N)
                    self._positions = rows.positions
        for p in module.parameters():  # ASDL's marker of the original flag
            if hasattr(p, _ASDL_MARKER):
                delattr(p, _ASDL_MARKER)
        if isinstance(out, tuple) and isinstance(out[0], torch.Tensor):
            f = out[0].detach()
        else:  # the Hessian maker returns nothing
            with torch.no_grad():
                f = module(inputs)
        return module, maker, self.lik.loss(f, self.lik.check_targets(f, y))

    def _maker(self, module: nn.Module, shape: str):
        raise NotImplementedError

    def _scale(self) -> float:
        """Factor from ASDL's normalization to DESIGN.md section 3."""
        raise NotImplementedError

    _attribute = "fisher"

    def full(self, x: Inputs, y: torch.Tensor, **kwargs: Any):
        self._check_structure("full")
        self._check_batch(x, y)
        shape = _asdl().SHAPE_FULL
        loss, H = self._compute(x, y, shape)
        return loss, _scaled(self._subnet(H), self._scale())

    def diag(self, x: Inputs, y: torch.Tensor, **kwargs: Any):
        self._check_structure("diag")
        self._check_batch(x, y)
        shape = _asdl().SHAPE_DIAG
        loss, per_param = self._compute(x, y, shape)
        pieces = []
        for p in self.params:
            sub, diag = per_param[id(p)]
            pieces.append((diag.weight if p is sub.weight else diag.bias).flatten())
        return loss, _scaled(self._subnet(torch.cat(pieces)), self._scale())

    def _read(self, module: nn.Module, maker, shape: str):
        """Results of ``shape`` in parameter order, removed from the modules."""
        asdl = _asdl()
        params = self.params
        try:
            if shape == asdl.SHAPE_FULL:
                return getattr(module, self._attribute).data
            per_param: dict[int, Any] = {}
            for sub in module.modules():
                result = getattr(sub, self._attribute, None)
                if result is None:
                    continue
                part = result.diag if shape == asdl.SHAPE_DIAG else result.kron
                if part is None:
                    continue
                for name in ("weight", "bias"):
                    p = getattr(sub, name, None)
                    if isinstance(p, nn.Parameter) and p.requires_grad:
                        per_param[id(p)] = (sub, part)
            missing = [i for i, p in enumerate(params) if id(p) not in per_param]
            if missing:
                raise ValueError(
                    f"ASDL returned no curvature for {len(missing)} parameter "
                    "tensor(s); it supports Linear, Conv2d, BatchNorm, LayerNorm and "
                    "Embedding layers. Use Curvlinops (the default) for this model."
                )
            return per_param
        finally:
            self._clean(maker)

    def _clean(self, maker) -> None:
        maker.zero_fisher()


class AsdlFisher(AsdlInterface):
    """GGN, Monte-Carlo Fisher and empirical Fisher through ASDL's ``FisherMaker``."""

    supported_structures = frozenset({"full", "kron", "diag"})

    def _fisher_type(self) -> str:
        raise NotImplementedError

    def _maker(self, module: nn.Module, shape: str):
        asdl = _asdl()
        config = {
            "fisher_type": self._fisher_type(),
            "fisher_shapes": [shape],
            "loss_type": self.loss_type,
            "data_size": 1,  # sums over the batch, as DESIGN.md section 3
            **self.fisher_kwargs,
        }
        if getattr(self, "stochastic", False):
            config["n_mc_samples"] = self.num_samples
            if self.generator is not None:
                g = self.generator
                seed = int(torch.randint(2**31, (), generator=g, device=g.device))
                config["seed"] = seed
        return asdl.get_fisher_maker(module, asdl.FisherConfig(**config))

    def _prefers_examples(self) -> bool:
        """Whether ``full`` goes through per-example gradients from the start (a
        loss ``FisherMaker`` does not know always does)."""
        return not _knows(self.lik)

    def full(self, x: Inputs, y: torch.Tensor, **kwargs: Any):
        self._check_structure("full")
        self._check_batch(x, y)
        if self._prefers_examples():
            return self._by_examples(x, y, diagonal=False)
        try:
            found = super().full(x, y, **kwargs)
        except RuntimeError:
            # ASDL's full FisherMaker fails on a Linear layer over positions
            if self._rows_per_example:
                raise
            return self._by_examples(x, y, diagonal=False)
        if not self._rows_per_example:
            return self._by_examples(x, y, diagonal=False)
        return found

    def diag(self, x: Inputs, y: torch.Tensor, **kwargs: Any):
        if not _knows(self.lik):
            self._check_structure("diag")
            self._check_batch(x, y)
            return self._by_examples(x, y, diagonal=True)
        found = super().diag(x, y, **kwargs)
        if not self._rows_per_example:
            return self._by_examples(x, y, diagonal=True)
        return found

    def _by_examples(self, x: Inputs, y: torch.Tensor, diagonal: bool):
        """``sum_nk v_nk v_nk^T`` (or its diagonal) from ASDL's per-example gradients
        ``v_nk = J_n^T M_n[:, k]`` of the output factor ``M`` of the GGN, MC Fisher
        or EF (``_output_factor``).

        Exact also when a layer sees more rows than examples (a model that flattens
        items) or positions per example (a Linear layer over a sequence), where
        ASDL's ``FisherMaker`` would take every row or position for an example.
        """
        module, inputs = self._target(x)
        with torch.no_grad():
            f = module(inputs)
        y = self.lik.check_targets(f, y)
        M = self._output_factor(f, y)  # (N, C, K)
        V = torch.cat(
            [
                self._per_example_gradients(module, inputs, M[..., k])
                for k in range(M.shape[-1])
            ]
        )
        if self.subnetwork_indices is not None:
            V = V[:, self.subnetwork_indices]
        H = V.square().sum(0) if diagonal else symmetric_gram(V)
        return self.lik.loss(f, y), H

    def _per_example_gradients(self, module, inputs, m: torch.Tensor):
        """``(N, P)``: the gradients of ``f_n^T m_n`` w.r.t. ``self.params``, one row
        per example, from ASDL; ``.grad`` of the parameters is left as it was."""
        params = self.params
        saved = [p.grad for p in params]

        def closure():
            f = module(inputs)
            (f * m).sum().backward()
            return f

        try:
            with warnings.catch_warnings(), model_left_as_found(module):
                warnings.simplefilter("ignore")
                _asdl().save_batch_gradient(module, closure)
                grads = [getattr(p, "batch_grad", None) for p in params]
        finally:
            for p, g in zip(params, saved):
                p.grad = g
        missing = sum(g is None for g in grads)
        if missing:
            raise ValueError(
                f"ASDL returned no per-example gradients for {missing} parameter "
                "tensor(s); it supports Linear, Conv2d, BatchNorm, LayerNorm and "
                "Embedding layers. Use Curvlinops (the default) for this model."
            )
        N = m.shape[0]
        # a layer that sees L = N K rows (items flattened per example): sum them
        return torch.cat([g.reshape(N, -1, g[0].numel()).sum(1) for g in grads], dim=1)

    def kron(self, x: Inputs, y: torch.Tensor, N: int, **kwargs: Any):
        self._check_structure("kron")
        self._check_batch(x, y)
        target = self._target(x)
        layers = kfac_layers(target[0], self.params)
        shape = _asdl().SHAPE_KRON
        loss, per_param = self._compute(x, y, shape, target)
        scale = self._scale()
        factors = {}
        for name, layer in layers:
            p = layer.weight if layer.weight.requires_grad else layer.bias
            _, kron = per_param[id(p)]
            # ASDL: B = output factor summed over the batch (and positions), A =
            # input factor summed over the batch, averaged over the positions of a
            # Conv2d but summed over those of a Linear layer: brought to the mean
            positions = self._positions.get(id(layer), 1)
            factors[name] = LayerFactors(
                kron.B, kron.A, g_scale=scale, a_scale=1 / positions
            )
        return loss, assemble_kron(self.params, layers, factors, N)


class AsdlGGN(AsdlFisher, GGNInterface):
    """GGN (or Monte-Carlo Fisher with ``stochastic=True``) through ASDL."""

    def _fisher_type(self) -> str:
        asdl = _asdl()
        return asdl.FISHER_MC if self.stochastic else asdl.FISHER_EXACT

    def _prefers_examples(self) -> bool:
        # the exact GGN from per-example gradients beats ASDL's full FisherMaker
        return super()._prefers_examples() or not (
            self.stochastic or self.fisher_kwargs
        )

    def _scale(self) -> float:
        return float(self.num_samples) if self.stochastic else 1.0


class AsdlEF(AsdlFisher, EFInterface):
    """Empirical Fisher through ASDL."""

    def _fisher_type(self) -> str:
        return _asdl().FISHER_EMP

    def _scale(self) -> float:
        return self.factor**2


class AsdlHessian(AsdlInterface):
    """The exact Hessian of the summed loss through ASDL (full and diag)."""

    supported_structures = frozenset({"full", "diag"})
    _attribute = "hessian"

    def _maker(self, module: nn.Module, shape: str):
        asdl = _asdl()
        return asdl.HessianMaker(module, asdl.HessianConfig(hessian_shapes=[shape]))

    def _clean(self, maker) -> None:
        maker.zero_hessian()

    def _scale(self) -> float:
        return self.factor


__all__ = [
    "AsdlInterface",
    "AsdlGGN",
    "AsdlEF",
    "AsdlHessian",
    # laplace-torch's module-level names
    "CurvatureInterface",
    "EFInterface",
    "GGNInterface",
    "Kron",
    "Likelihood",
    "EPS",
    "FISHER_EMP",
    "FISHER_EXACT",
    "FISHER_MC",
    "LOSS_CROSS_ENTROPY",
    "LOSS_MSE",
    "SHAPE_DIAG",
    "SHAPE_FULL",
    "SHAPE_KRON",
]
