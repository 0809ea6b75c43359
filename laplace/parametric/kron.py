"""KronLaplace: a Kronecker-factored (KFAC) posterior precision."""

from __future__ import annotations

from typing import Any

import torch

from laplace.curvature.kron_assembly import merge_data_sets
from laplace.parametric.base import ParametricLaplace, _all_finite
from laplace.parametric.precision import KronPrecision
from laplace.utils.logdet import affine_log_sum
from laplace.utils.matrix import Kron, KronDecomposed, damped_factor_eigenvalues

Tensor = torch.Tensor


class KronLaplace(ParametricLaplace):
    """Laplace approximation with a Kronecker-factored curvature: per parameter
    tensor ``G (x) A`` (a dense block for biases), see ``laplace.utils.Kron``.

    The layout of the blocks is the backend's: ``fit`` keeps that of the first
    batch's ``Kron`` (pairs, single blocks, diagonal factors, any split of a
    parameter into a pair) and adds the later batches to it; it needs one block per
    parameter tensor of the parameter's size. Before ``fit`` the curvature is zero
    in the layout of ``Kron.init_from_model``.

    The factors are eigendecomposed once per fit (``KronDecomposed``); the prior
    precision (a scalar or one value per parameter tensor) and the factor
    ``1 / (sigma^2 T)`` then act on the eigenvalues, so the evidence, its gradients
    and the predictive never refactorize.

    Parameters
    ----------
    damping : bool, default=False
        add the prior precision to the factors, ``c (G + sqrt(d/c)) (x)
        (A + sqrt(d/c))`` for the curvature scaled by ``c`` (``(G + sqrt(d)) (x)
        (A + sqrt(d))`` at ``c = 1``), instead of to their product
        (``c G (x) A + d``).

    Notes
    -----
    See ``ParametricLaplace`` for the other parameters. ``fit(...,
    override=False)`` adds the summed factors (output side) and averages the
    factor marked ``Kron.averaged`` (input side) over all data seen, so fits on two
    halves equal one fit on the whole; both fits must have the same layout.
    """

    key = ("all", "kron")

    def __init__(
        self,
        model,
        likelihood,
        sigma_noise=1.0,
        prior_precision=1.0,
        prior_mean=0.0,
        temperature=1.0,
        enable_backprop=False,
        dict_key_x="input_ids",
        dict_key_y="labels",
        backend=None,
        damping: bool = False,
        backend_kwargs=None,
        asdl_fisher_kwargs=None,
    ) -> None:
        self.damping = bool(damping)
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

    def _check_prior_precision(self, value: Tensor) -> None:
        if value.numel() not in (1, self.n_layers):
            raise ValueError(
                f"KronLaplace takes a scalar prior precision or one per parameter "
                f"tensor ({self.n_layers}); got {value.numel()} values. Use "
                "hessian_structure='diag' or 'full' for a per-parameter prior."
            )

    def _init_H(self) -> Kron:
        return Kron.init_from_model(self.params, self._device, self._dtype)

    def _curvature_of(self, backend, x, y, N):
        into = getattr(self, "_accumulating", None)
        if into is not None and getattr(backend, "accumulates_kron", False):
            # the batch's factors are added in place: no second Kron in memory
            return backend.kron(x, y, N=N, into=into)
        return backend.kron(x, y, N=N)

    def _fit_accumulator(self) -> None:
        self._accumulating: Kron | None = None
        return None  # the first batch's Kron gives the layout

    def _add_curvature(self, H: Kron | None, H_batch: Kron) -> Kron:
        if H is None:
            self._check_layout(H_batch, "The backend's Kron")
            # the engine hands over fresh tensors; others may keep (and reuse) theirs
            fresh = getattr(self.backend, "accumulates_kron", False)
            H = H_batch if fresh else H_batch.clone()
            self._accumulating = H
            return H
        if H_batch is not H:
            H += H_batch
        return H

    def _check_layout(self, H: Kron, what: str) -> None:
        """One block per parameter tensor, each of the parameter's size."""
        if not isinstance(H, Kron):
            raise TypeError(f"{what} must be a Kron, got {type(H).__name__}.")
        sizes = [p.numel() for p in self.params]
        if H.block_sizes() != sizes:
            raise ValueError(
                f"{what} does not fit the parameters: it needs one block per "
                f"parameter tensor of the parameter's number of entries {sizes}, got "
                f"blocks of {H.block_sizes()} entries (factor shapes {H._shapes()})."
            )

    def _combine_fits(self, H_old: Kron, H_new: Kron, n_old: int, n_new: int) -> Kron:
        if H_old._shapes() != H_new._shapes() or H_old.averaged != H_new.averaged:
            raise ValueError(
                "fit(override=False) needs the Kron layout of the previous fit, "
                f"factor shapes {H_old._shapes()} with averaged {H_old.averaged}; the "
                f"backend gave {H_new._shapes()} with averaged {H_new.averaged}. "
                "Use fit(override=True) or the same backend."
            )
        return merge_data_sets(H_old, H_new, n_old, n_new)

    @staticmethod
    def _is_finite(H: Kron) -> bool:
        return all(_all_finite(F) for block in H.kfacs for F in block)

    def _on_new_curvature(self) -> None:
        super()._on_new_curvature()
        self._accumulating = None  # a finished fit accumulates no more
        self._decomposed: KronDecomposed | None = None
        self._flat: Tensor | None = None

    @property
    def H_decomposed(self) -> KronDecomposed:
        """Eigendecomposition of the fitted factors (computed once per fit)."""
        self._check_fitted("H_decomposed")
        return self._decompose()

    def _flat_eigenvalues(self) -> Tensor:
        """All eigenvalues of the fitted curvature ``(n_params,)`` (once per fit)."""
        if self._flat is None:
            pieces = [
                torch.outer(*values).flatten() if len(values) == 2 else values[0]
                for values in self._decompose().eigenvalues
            ]
            self._flat = torch.cat(pieces)
        return self._flat

    def _decompose(self) -> KronDecomposed:
        if self._decomposed is None:
            self._decomposed = self.H.decompose(damping=self.damping)
        return self._decomposed

    def fit(self, train_loader, override: bool = True, progress_bar: bool = False):
        super().fit(train_loader, override=override, progress_bar=progress_bar)
        self._decompose()  # eigendecompose the factors once, as part of the fit

    @property
    def log_det_posterior_precision(self) -> Tensor:
        """``log det P`` from the factors' eigenvalues, one pass per block
        (``laplace.utils.logdet.affine_log_sum``)."""
        K, c = self.H_decomposed, self._h_factor
        if not self.damping and self.prior_precision.numel() == 1:
            # every eigenvalue of P is c * h + d with the same d: one pass over all
            return affine_log_sum(c, self.prior_precision[0], self._flat_eigenvalues())
        deltas = (
            self.prior_precision.expand(len(K))
            if self.prior_precision.numel() == 1
            else self.prior_precision
        )
        total = torch.zeros((), dtype=self._dtype, device=self._device)
        for values, delta in zip(K.eigenvalues, deltas):
            if len(values) == 1:
                total = total + affine_log_sum(c, delta, values[0])
            elif self.damping:
                # the damped eigenvalues g_i a_j separate over i and j
                g, a = damped_factor_eigenvalues(c * values[0], values[1], delta, c)
                total = total + len(a) * g.log().sum() + len(g) * a.log().sum()
            else:
                total = total + affine_log_sum(c, delta, values[0], values[1])
        return total

    def _build_form(self) -> KronPrecision:
        return KronPrecision(
            self.H_decomposed * self._h_factor + self.prior_precision,
            [p.shape for p in self.params],
        )

    @property
    def posterior_precision(self) -> KronDecomposed:
        """``P`` as a ``KronDecomposed``."""
        return self._posterior.K

    def _H_state(self) -> dict[str, Any]:
        return {
            "kfacs": [list(block) for block in self.H.kfacs],
            "averaged": list(self.H.averaged),
        }

    def _load_H(self, state: Any) -> Kron:
        kfacs = [
            [F.to(self._device, self._dtype) for F in block] for block in state["kfacs"]
        ]
        try:
            H = Kron(kfacs, state.get("averaged"))
        except ValueError as err:
            raise ValueError(f"The state dict's Kronecker factors: {err}") from None
        self._check_layout(H, "The Kron of the state dict")
        return H
