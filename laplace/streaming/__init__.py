"""Streaming (functional) Laplace approximations over parameter trees, with the API of
posteriors 0.1.x: ``build(...)`` returns a transform whose ``init(params)`` starts a
state and whose ``update(state, batch)`` adds one batch's curvature to its
precision; ``sample(state, sample_shape)`` draws from the Normal it encodes.

Modules: ``dense_ggn``, ``dense_fisher`` and ``dense_hessian`` (a dense
precision), ``diag_ggn`` and
``diag_fisher`` (a diagonal one, a tree like the parameters), ``kron_ggn``
(Kronecker-factored, from the curvature engine, on an ``nn.Module``). Parameters are any
tree of tensors (a tensor, a dict, a list, a tuple, nested; the dict of
``torch.func.functional_call``).

``to_laplace`` and ``from_laplace`` convert between a state and a fitted ``Laplace``
object; ``neg_log_prior`` is a state's ``-log p(theta)``, the penalty of continual
learning (``laplace.streaming.convert``).
"""

from laplace.streaming import (
    convert,
    dense_fisher,
    dense_ggn,
    dense_hessian,
    diag_fisher,
    diag_ggn,
    kron_ggn,
)
from laplace.streaming.convert import from_laplace, neg_log_prior, to_laplace
from laplace.streaming.tree import Transform

__all__ = [
    "dense_ggn",
    "diag_ggn",
    "kron_ggn",
    "dense_fisher",
    "diag_fisher",
    "dense_hessian",
    "convert",
    "to_laplace",
    "from_laplace",
    "neg_log_prior",
    "Transform",
]
