r"""A Laplace approximation with a Kronecker-factored (KFAC) generalized Gauss-Newton
precision, streamed over batches, from the library's curvature engine
(``laplace.curvature.native.NativeGGN``).

KFAC needs the model's layers, so ``build`` takes the ``nn.Module`` and a
likelihood, as ``laplace.Laplace`` does (a built-in's name or an
``laplace.likelihood.OutputLikelihood`` of your own), instead of posteriors'
``forward`` and ``outer_log_likelihood``. The curvature approximates the
generalized Gauss-Newton ``sum_n J_n^T Lambda(f_n) J_n`` of the likelihood's loss
summed over the data, ``Lambda(f)`` its output Hessian (``hessian_sqrt``). There
is no ``sigma_noise``: regression is the unit-variance Gaussian (``to_laplace``
divides the curvature by ``sigma_noise^2``). The state's ``kron`` is a
``laplace.utils.matrix.Kron`` in the library's normalisation: a weight's block is
``[G, A]`` with the output-side ``G`` summed over all data seen and the input-side
``A`` (the factor marked ``Kron.averaged``) averaged over them, a bias's block
``[G]``; a layer with no Kronecker form gets the engine's exact dense (or, when
large, diagonal) block, summed, as in ``KronLaplace``. The precision is

$$
    \mathrm{init\_prec} \, I + \mathrm{kron},
$$

and ``update`` combines batches as ``KronLaplace.fit(..., override=False)`` combines
fits: the summed factors add, the averaged ones are weighted by the numbers of data,
so that updates on the batches of a data set give ``KronLaplace.fit`` on the whole
(up to round-off).

The parameters are a dict ``name -> tensor`` of exactly the model's parameters that
require grad; the state keeps them in the model's order, which is also the order of
``kron``'s blocks and of ``precision``'s rows (unlike ``dense_ggn``, which orders a
dict's leaves by sorted key). ``update`` evaluates the curvature at
``state.params``: when they are not the model's own tensors they are put into the
model's parameters (``Parameter.data``) for the call and the model's own tensors put
back afterwards, also on error, so the model's values are bitwise unchanged. The
curvature is taken with the model in eval mode (as ``KronLaplace.fit``), each
module's ``training`` flag restored afterwards. Batches are moved to the model's
device.

Float16 and bfloat16 models keep their parameters and draws in their dtype and the
factors, the loss, ``precision`` and the linear algebra of ``sample`` in float32
(``laplace.streaming.tree.precision_dtype``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from numbers import Real
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from laplace.curvature import structures
from laplace.curvature.kron_assembly import merge_data_sets
from laplace.curvature.native import NativeGGN
from laplace.data import batch_size, split_batch, to_device
from laplace.likelihood import OutputLikelihood, get_likelihood
from laplace.streaming.tree import Transform, precision_dtype
from laplace.utils import distributed
from laplace.utils.enums import Likelihood
from laplace.utils.matrix import Kron

Tensor = torch.Tensor
#: ``sample``'s default: one draw, without a leading sample dimension
EMPTY = torch.Size([])


@dataclass
class KronLaplaceState:
    """A Normal over the parameters with precision ``init_prec * I + kron``.

    Attributes
    ----------
    params : dict[str, Tensor]
        the mean, one tensor per parameter of the model that requires grad, in the
        model's order.
    kron : Kron
        the curvature, one block per parameter in the order of ``params``: the
        output-side factors summed over the ``n_data`` examples seen, the averaged
        ones (``kron.averaged``) their mean. Before any update, zero (diagonal zero
        factors); the first update takes the engine's layout.
    init_prec : float
        the prior precision added to ``kron``'s diagonal.
    n_data : int
        the number of examples seen.
    loss : Tensor
        the likelihood's ``loss`` (the negative log-likelihood) summed over all
        batches (0-dim): e.g. the cross-entropy, or half the squared error for
        regression.
    aux : Any
        the model's output on the last batch (detached), or None before any update.
    step : Tensor
        the number of updates.
    """

    params: dict[str, Tensor]
    kron: Kron
    init_prec: float = 0.0
    n_data: int = 0
    loss: Tensor | None = None
    aux: Any = None
    step: Tensor = field(default_factory=lambda: torch.tensor(0))


def build(
    model: nn.Module,
    likelihood: Likelihood | str | OutputLikelihood = "classification",
    init_prec: float = 0.0,
    kfac_approx: str = "expand",
    dict_key_x: str = "input_ids",
    dict_key_y: str = "labels",
) -> Transform:
    """The transform ``(init, update)`` of a KFAC GGN Laplace approximation.

    Parameters
    ----------
    model : nn.Module
        the network; the curvature is over its parameters that require grad.
    likelihood : str, Likelihood or OutputLikelihood, default='classification'
        every likelihood of ``laplace.likelihood``, as ``laplace.Laplace`` takes
        it: a built-in's name ('classification', 'regression' (unit variance, ``0.5
        * ||f - y||^2``), 'binary', 'multilabel', 'poisson',
        'heteroscedastic_regression', 'reward_modeling': inputs are pairs
        ``(batch, 2, ...)`` that the model maps to the two logits ``(batch, 2)``),
        or an ``OutputLikelihood`` object of your own. Checked here: an unknown
        name raises ValueError, an object that is not a likelihood TypeError.
    init_prec : float, default=0.0
        the prior precision: ``init_prec * I`` is added to the curvature.
    kfac_approx : {'expand', 'reduce'}, default='expand'
        KFAC of a layer shared over positions (convolutions, sequences): see
        ``laplace.curvature.native``.
    dict_key_x, dict_key_y : str
        the keys of the inputs and targets when batches are mappings.
    """
    _check_model(model)
    likelihood = _check_likelihood(likelihood)
    _check_kfac_approx(kfac_approx)
    init_prec = _check_init_prec(init_prec)
    return Transform(
        init=partial(init, model=model, init_prec=init_prec),
        update=partial(
            update,
            model=model,
            likelihood=likelihood,
            kfac_approx=kfac_approx,
            dict_key_x=dict_key_x,
            dict_key_y=dict_key_y,
        ),
    )


def init(
    params: Mapping[str, Tensor], model: nn.Module, init_prec: float = 0.0
) -> KronLaplaceState:
    """The state before any data: mean ``params``, precision ``init_prec * I``.

    Parameters
    ----------
    params : dict[str, Tensor]
        exactly the model's parameters that require grad, by name, e.g.
        ``{k: v.detach().clone() for k, v in model.named_parameters()}`` (the
        tensors are kept, not copied).
    model : nn.Module
    init_prec : float, default=0.0
    """
    _check_model(model)
    init_prec = _check_init_prec(init_prec)
    ordered = _check_params(params, model)
    ref = next(iter(ordered.values()))
    dtype = precision_dtype(ref.dtype)
    # zero diagonal factors: the zero matrix in O(P) memory, whatever the layout
    kfacs = []
    for t in ordered.values():
        kw = {"dtype": dtype, "device": t.device}
        if t.ndim >= 2:
            kfacs.append(
                [torch.zeros(t.shape[0], **kw), torch.zeros(t[0].numel(), **kw)]
            )
        else:
            kfacs.append([torch.zeros(t.numel(), **kw)])
    loss = torch.zeros((), dtype=dtype, device=ref.device)
    return KronLaplaceState(ordered, Kron(kfacs), init_prec, 0, loss)


def update(
    state: KronLaplaceState,
    batch: Any,
    model: nn.Module,
    likelihood: Likelihood | str | OutputLikelihood = "classification",
    kfac_approx: str = "expand",
    dict_key_x: str = "input_ids",
    dict_key_y: str = "labels",
    inplace: bool = False,
) -> KronLaplaceState:
    """Add the KFAC GGN of ``batch`` at ``state.params``; returns the state (the same
    object, changed, with ``inplace``; a new one otherwise, the old unchanged).

    ``batch`` is ``(x, y)`` or a mapping with keys ``dict_key_x`` and ``dict_key_y``
    (the whole mapping goes to the model); ``likelihood`` as in ``build``, its
    ``check_targets`` validates the targets. Raises RuntimeError, the state
    unchanged, when the batch's loss or curvature is not finite.
    """
    if not isinstance(state, KronLaplaceState):
        raise TypeError(
            "state must be a KronLaplaceState from kron_ggn.init (or a previous "
            f"update); got {type(state).__name__}."
        )
    _check_model(model)
    likelihood = _check_likelihood(likelihood)
    _check_kfac_approx(kfac_approx)
    params = _check_params(state.params, model, "state.params")
    x, y = split_batch(batch, dict_key_x, dict_key_y)
    ref = next(iter(params.values()))
    x, y = to_device(x, ref.device), to_device(y, ref.device)
    n = batch_size(x, dict_key_x)
    backend = NativeGGN(
        model,
        likelihood,
        dict_key_x=dict_key_x,
        dict_key_y=dict_key_y,
        kfac_approx=kfac_approx,
    )
    red = distributed.reduction()
    with distributed.agreement(red, "update") as agreed:
        with _evaluated_at(model, params) as output:
            loss, K = backend.kron(x, y, N=n)
        dtype = precision_dtype(ref.dtype)
        loss = loss.detach().to(dtype)
        K = Kron(
            [[F.detach().to(dtype) for F in block] for block in K.kfacs], K.averaged
        )
        finite = [torch.isfinite(loss)] + [
            torch.isfinite(F).all() for block in K.kfacs for F in block
        ]
        if not bool(torch.stack(finite).all()):  # one synchronization
            what = "loss" if not bool(finite[0]) else "curvature"
            raise RuntimeError(
                f"The {what} of the batch is not finite (NaN or inf); check its "
                "inputs and targets and the model's outputs. The state was left as "
                "it was."
            )
        agreed.report(seen=n, layout=distributed.layout(K))
    if red is not None:  # every rank's batch: the Kron of their union
        K, total = distributed.reduce_accumulated(K, red, n, agreed, "update")
        loss, n = distributed.all_reduce_sum(loss, red), total
    aux = output[0] if output else None
    kron = _combine(state.kron, K, state.n_data, n, inplace)
    if inplace:
        state.params, state.kron = params, kron
        state.n_data += n
        state.loss = state.loss + loss
        state.aux = aux
        state.step.add_(1)
        return state
    return KronLaplaceState(
        params,
        kron,
        state.init_prec,
        state.n_data + n,
        state.loss + loss,
        aux,
        state.step + 1,
    )


def sample(
    state: KronLaplaceState, sample_shape: torch.Size | tuple = EMPTY
) -> dict[str, Tensor]:
    """Draws from ``N(params, (init_prec I + kron)^{-1})``: a dict like ``params``
    whose tensors have shape ``sample_shape + param.shape``, in the parameters'
    dtype.

    Each draw is ``params + P^{-1/2} eps``, ``eps`` standard normal, with
    ``P^{-1/2}`` from the eigendecomposition of the factors (``Kron.decompose``).

    Raises
    ------
    ValueError
        with ``init_prec == 0`` when the precision is singular: an eigenvalue at or
        below ``P * eps * `` the largest (``torch.linalg.matrix_rank``'s rule, ``eps``
        of the factors' dtype), e.g. before any update, with fewer data than a
        layer has inputs, or where the likelihood's output Hessian ``Lambda(f)``
        is singular: the softmax Hessian of classification and reward modeling has
        the constant direction in its null space, which makes the last layer's
        ``G`` singular whatever the data (binary, multilabel, Poisson and
        heteroscedastic regression have a positive definite ``Lambda(f)``). Give
        ``init_prec > 0``.
    """
    shape = torch.Size(sample_shape)
    means = list(state.params.values())
    sizes = [t.numel() for t in means]
    P = sum(sizes)
    decomposed = state.kron.decompose() + state.init_prec
    if state.init_prec == 0:
        _check_nonsingular(decomposed, P)
    ref = decomposed.eigenvalues[0][0]
    eps = torch.randn(shape.numel(), P, dtype=ref.dtype, device=ref.device)
    steps = decomposed.bmm(eps, exponent=-0.5).split(sizes, dim=-1)
    return {
        name: (m.detach().to(ref.dtype) + s.reshape(*shape, *m.shape)).to(m.dtype)
        for (name, m), s in zip(state.params.items(), steps, strict=True)
    }


def precision(state: KronLaplaceState) -> Tensor:
    """The dense precision ``init_prec * I + kron`` ``(P, P)``, rows in the order
    of ``state.params`` (the model's order), each parameter flattened row-major.
    Memory ``P^2``: for tests and small models."""
    H = state.kron.to_matrix()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return H + state.init_prec * eye


# -- helpers ----------------------------------------------------------------------
def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be an nn.Module (KFAC needs its layers); got "
            f"{type(model).__name__}."
        )


def _check_likelihood(likelihood: Any) -> OutputLikelihood:
    """The likelihood object of a name or an ``OutputLikelihood`` (as ``Laplace``):
    ValueError for an unknown name, TypeError for anything else."""
    return get_likelihood(likelihood)


def _check_kfac_approx(kfac_approx: Any) -> None:
    if kfac_approx not in structures.KFAC_APPROXIMATIONS:
        raise ValueError(
            f"kfac_approx must be one of {structures.KFAC_APPROXIMATIONS}; got "
            f"{kfac_approx!r}."
        )


def _check_init_prec(init_prec: Any) -> float:
    if isinstance(init_prec, bool) or not isinstance(init_prec, Real):
        raise TypeError(
            "init_prec must be a float (the prior precision, init_prec * I), e.g. "
            f"1.0; got {type(init_prec).__name__}"
            + (
                " (float(t) for a one-element tensor)."
                if isinstance(init_prec, Tensor)
                else "."
            )
        )
    value = float(init_prec)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(
            f"init_prec must be a finite float >= 0, e.g. 1.0; got {init_prec!r}."
        )
    return value


def _check_params(
    params: Any, model: nn.Module, name: str = "params"
) -> dict[str, Tensor]:
    """``params`` in the model's order, checked against the model's parameters that
    require grad (names, shapes, dtypes, devices)."""
    hint = (
        "e.g. {k: v.detach().clone() for k, v in model.named_parameters() if "
        "v.requires_grad}"
    )
    if not isinstance(params, Mapping):
        raise TypeError(
            f"{name} must be a dict name -> tensor of the model's parameters that "
            f"require grad, {hint}; got {type(params).__name__}."
        )
    all_params = dict(model.named_parameters())
    wanted = {k: p for k, p in all_params.items() if p.requires_grad}
    if not wanted:
        raise ValueError("The model has no parameter that requires grad.")
    missing = [k for k in wanted if k not in params]
    extra = [k for k in params if k not in wanted]
    if missing or extra:
        frozen = [k for k in extra if k in all_params]
        raise ValueError(
            f"{name} must hold exactly the model's parameters that require grad "
            f"{list(wanted)}, {hint}; "
            + (f"missing {missing}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unexpected {extra}" if extra else "")
            + (f" (frozen, requires_grad=False: {frozen})" if frozen else "")
            + "."
        )
    for k, p in wanted.items():
        t = params[k]
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{k!r}] must be a tensor; got {type(t).__name__}.")
        if t.shape != p.shape:
            raise ValueError(
                f"{name}[{k!r}] must have the parameter's shape {tuple(p.shape)}; "
                f"got {tuple(t.shape)}."
            )
        if t.dtype != p.dtype or t.device != p.device:
            raise ValueError(
                f"{name}[{k!r}] must have the parameter's dtype and device "
                f"({p.dtype}, {p.device}); got ({t.dtype}, {t.device}). Move the "
                "model or the parameters (.to) first."
            )
    return {k: params[k] for k in wanted}


@contextlib.contextmanager
def _evaluated_at(model: nn.Module, params: dict[str, Tensor]) -> Iterator[list]:
    """The model in eval mode with ``params`` as its parameters' data, and a list
    that receives the model's (detached) output of its first call; the model's
    tensors, ``training`` flags and hooks as they were afterwards, also on error."""
    modes = [(m, m.training) for m in model.modules()]
    swapped = []
    output: list = []

    def capture(module, args, result):
        if not output:
            output.append(pytree.tree_map(_detached, result))

    handle = model.register_forward_hook(capture)
    try:
        model.eval()
        for k, p in model.named_parameters():
            t = params.get(k)
            if t is None or t is p:
                continue
            swapped.append((p, p.data))
            p.data = t.detach()
        yield output
    finally:
        for p, data in swapped:
            p.data = data
        handle.remove()
        for m, mode in modes:
            m.training = mode


def _detached(value: Any) -> Any:
    return value.detach() if isinstance(value, Tensor) else value


def _combine(old: Kron, new: Kron, n_old: int, n_new: int, inplace: bool) -> Kron:
    """The curvature of ``n_old + n_new`` examples from those of ``n_old`` and
    ``n_new`` (``KronLaplace._combine_fits``): the averaged factors weighted by the
    counts, the others summed. With ``n_old == 0`` it is ``new``; with ``inplace``
    ``old``'s factors are updated in place."""
    if n_old == 0:
        return new
    if old._shapes() != new._shapes() or old.averaged != new.averaged:
        raise ValueError(
            "The batch's Kron does not have the layout of the state's: factor shapes "
            f"{new._shapes()} with averaged {new.averaged} against "
            f"{old._shapes()} with averaged {old.averaged}. Use the same model, "
            "kfac_approx and trainable parameters for every update."
        )
    return merge_data_sets(old, new, n_old, n_new, inplace)


def _check_nonsingular(decomposed, P: int) -> None:
    values = torch.cat(
        [decomposed.block_eigenvalues(i).flatten() for i in range(len(decomposed))]
    )
    largest = values.max()
    tol = P * torch.finfo(values.dtype).eps * largest
    if not bool(largest > 0) or bool((values <= tol).any()):
        raise ValueError(
            "The precision init_prec * I + kron is singular (init_prec is 0 and "
            f"{int((values <= tol).sum())} of its {P} eigenvalues are 0 to round-off), "
            "so there is no Normal to sample from; build with init_prec > 0."
        )


__all__ = ["KronLaplaceState", "build", "init", "update", "sample", "precision"]
