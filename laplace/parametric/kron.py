"""KronLaplace: a Kronecker-factored (KFAC) posterior precision."""

from __future__ import annotations

import math
from typing import Any

import torch

from laplace.curvature.kron_assembly import merge_data_sets
from laplace.curvature.output_kron import OutputKron
from laplace.parametric.base import ParametricLaplace, _all_finite
from laplace.parametric.precision import KronPrecision
from laplace.utils._checks import _check_int, check_positive_int
from laplace.utils.logdet import affine_log_sum, spectral_eigenvalues
from laplace.utils.lowrank_factor import LowRankFactor, LowRankSpec, spectral_groups
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

    With one noise per output (``sigma_noise`` of shape ``(C,)`` at ``fit``) the
    curvature is kept per output (``laplace.curvature.output_kron.OutputKron``: the
    output-side factor of each output, the input-side factor they share once), and
    the posterior of a noise is that of ``c K + p0`` with ``w = 1 / (sigma^2 T)``,
    ``c = mean_c w_c`` and ``K = sum_c (w_c / c) H_c``: exact KFAC of the weighted
    loss at every noise (equal noises give the posterior of that scalar noise,
    damping included). A new noise re-decomposes only the output-side factors of
    ``K``; the evidence is differentiable in each ``sigma_c`` through the
    eigenvalues (``laplace.utils.logdet.spectral_eigenvalues``), finite at repeated
    ones.

    **Low-rank factors** (``low_rank_factors=r``, the approach of Laplace-LoRA for
    the adapters of a language model, whose factors are ``width x width`` and
    ``3 width x 3 width``): every Kronecker factor (and dense single block) of
    dimension ``n > low_rank_threshold`` (and ``n > r``) is kept as
    ``F = U diag(s) U^T + c I`` (``laplace.utils.LowRankFactor``): its ``r``
    leading eigenpairs, exact, and ``c``, the mean of the rest of its spectrum, so
    that the trace is kept. Memory is ``O(r n)`` per factor; with the default
    backend (``NativeGGN``/``NativeEF``) no ``(n, n)`` factor is formed during
    ``fit``: each batch's factor is built from its side vectors (activations,
    backpropagated gradients) by a thin SVD of the stacked square roots, and
    batches are added by stacking square roots and truncating again. Other
    backends hand over dense per-batch factors, which are truncated as they arrive
    (the per-batch factor is then dense for a moment). Because the remainder is
    isotropic, ``G (x) A + d I`` and its damped form stay exactly
    eigendecomposable (the complement of ``span(U)`` is one eigenspace), so the
    evidence and its gradients, the predictives, sampling and the posterior
    precision are exact for the kept factors; the approximation is in the factors
    alone, and is exact where a factor has rank at most ``r`` (e.g. fewer data
    rows than ``r``). The GLM predictive then takes the Jacobian route (there is
    no complete eigenbasis to rotate the Jacobian factors into). One noise per
    output is refused.

    Parameters
    ----------
    damping : bool, default=False
        add the prior precision to the factors, ``c (G + sqrt(d/c)) (x)
        (A + sqrt(d/c))`` for the curvature scaled by ``c`` (``(G + sqrt(d)) (x)
        (A + sqrt(d))`` at ``c = 1``), instead of to their product
        (``c G (x) A + d``).
    low_rank_factors : int, optional
        ``r >= 1``, the number of eigenpairs kept per low-rank factor; None (the
        default) keeps every factor dense. Choose ``r`` by memory (``r (n + 1)``
        numbers per factor) and by how fast the factor's spectrum decays: what is
        beyond the ``r``-th eigenvalue is flattened into ``c``.
    low_rank_threshold : int, default=1024
        ``>= 0``: factors of dimension above it are low rank, smaller ones stay
        dense (exact).

    Notes
    -----
    See ``ParametricLaplace`` for the other parameters. ``fit(...,
    override=False)`` adds the summed factors (output side) and averages the
    factor marked ``Kron.averaged`` (input side) over all data seen, so fits on two
    halves equal one fit on the whole; both fits must have the same layout.
    Low-rank factors are merged the same way, truncated again.
    """

    key = ("all", "kron")
    supports_output_noise = True

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
        low_rank_factors: int | None = None,
        low_rank_threshold: int = 1024,
        curvature_dtype: torch.dtype | None = None,
    ) -> None:
        self.damping = bool(damping)
        #: which factors are kept as ``LowRankFactor`` (None: all dense)
        self.low_rank: LowRankSpec | None = _low_rank_spec(
            low_rank_factors, low_rank_threshold
        )
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
            curvature_dtype=curvature_dtype,
        )

    def _check_prior_precision(self, value: Tensor) -> None:
        if value.numel() not in (1, self.n_layers):
            raise ValueError(
                f"KronLaplace takes a scalar prior precision or one per parameter "
                f"tensor ({self.n_layers}); got {value.numel()} values. Use "
                "hessian_structure='diag' or 'full' for a per-parameter prior."
            )

    def _init_H(self) -> Kron:
        return Kron.init_from_model(
            self.params, self._device, self._curvature_dtype, low_rank=self.low_rank
        )

    def _curvature_of(self, backend, x, y, N):
        kwargs = {}
        if self.low_rank is not None and getattr(
            backend, "builds_low_rank_kron", False
        ):
            kwargs["low_rank"] = self.low_rank  # no dense factor is formed
        into = getattr(self, "_accumulating", None)
        if into is not None and getattr(backend, "accumulates_kron", False):
            # the batch's factors are added in place: no second Kron in memory
            return backend.kron(x, y, N=N, into=into, **kwargs)
        return backend.kron(x, y, N=N, **kwargs)

    def _fit_accumulator(self) -> None:
        self._accumulating: Kron | None = None
        return None  # the first batch's Kron gives the layout

    def _add_curvature(self, H: Kron | None, H_batch: Kron) -> Kron:
        if H is None:
            self._check_layout(H_batch, "The backend's Kron")
            # the engine hands over fresh tensors; others may keep (and reuse) theirs
            fresh = getattr(self.backend, "accumulates_kron", False)
            H = H_batch if fresh else H_batch.clone()
            if self.low_rank is not None:  # dense factors from another backend
                H = Kron(
                    [[self.low_rank.truncate(F) for F in block] for block in H.kfacs],
                    H.averaged,
                )
            H = _in_dtype(H, self._curvature_dtype)
            self._accumulating = H
            return H
        if H_batch is not H:
            H += H_batch
        return H

    def _stack_outputs(self, curvatures: list[Kron]) -> OutputKron | Kron:
        self._check_layout(curvatures[0], "The backend's Kron")
        broken = next((K for K in curvatures if not self._is_finite(K)), None)
        if broken is not None:
            return broken  # fit refuses it, naming the batch
        return OutputKron.from_columns(
            [_in_dtype(K, self._curvature_dtype) for K in curvatures]
        )

    def _check_layout(self, H: Kron | OutputKron, what: str) -> None:
        """One block per parameter tensor, each of the parameter's size."""
        if not isinstance(H, (Kron, OutputKron)):
            raise TypeError(f"{what} must be a Kron, got {type(H).__name__}.")
        sizes = [p.numel() for p in self.params]
        if H.block_sizes() != sizes:
            raise ValueError(
                f"{what} does not fit the parameters: it needs one block per "
                f"parameter tensor of the parameter's number of entries {sizes}, got "
                f"blocks of {H.block_sizes()} entries (factor shapes {H._shapes()})."
            )

    def _combine_fits(self, H_old: Kron, H_new: Kron, n_old: int, n_new: int) -> Kron:
        if self._per_output:  # fit checked that both fits are per output
            return H_old.merge_data_sets(H_new, n_old, n_new)
        if H_old._shapes() != H_new._shapes() or H_old.averaged != H_new.averaged:
            raise ValueError(
                "fit(override=False) needs the Kron layout of the previous fit, "
                f"factor shapes {H_old._shapes()} with averaged {H_old.averaged}; the "
                f"backend gave {H_new._shapes()} with averaged {H_new.averaged}. "
                "Use fit(override=True) or the same backend."
            )
        return merge_data_sets(H_old, H_new, n_old, n_new)

    def _check_output_fit(self) -> None:
        if self.low_rank is not None:
            raise ValueError(
                "low_rank_factors is not available with one sigma_noise per output "
                f"(shape {tuple(self.sigma_noise.shape)}): the per-output curvature "
                "keeps dense factors. Use a scalar sigma_noise or "
                "low_rank_factors=None."
            )
        super()._check_output_fit()

    @staticmethod
    def _is_finite(H: Kron | OutputKron) -> bool:
        if not isinstance(H, (Kron, OutputKron)):  # before its entries are read
            raise TypeError(
                f"The backend's Kron must be a Kron, got {type(H).__name__}."
            )
        return all(
            all(_all_finite(t) for t in F.tensors())
            if isinstance(F, LowRankFactor)
            else _all_finite(F)
            for block in H.kfacs
            for F in block
        )

    def _on_new_curvature(self) -> None:
        super()._on_new_curvature()
        self._accumulating = None  # a finished fit accumulates no more
        self._decomposed: KronDecomposed | None = None
        self._flat: Tensor | None = None
        #: one noise per output: the relative weights ``r`` and the decomposition of
        #: ``sum_c r_c H_c`` last built
        self._output_cache: tuple[Tensor, KronDecomposed] | None = None

    @property
    def H_decomposed(self) -> KronDecomposed:
        """Eigendecomposition of the fitted factors (computed once per fit); with one
        noise per output that of ``K = sum_c (w_c / mean(w)) H_c`` at the current
        noise, ``w = 1 / (sigma^2 T)`` (once per noise)."""
        self._check_fitted("H_decomposed")
        return self._decompose()

    def _curvature_scale(self) -> tuple[Tensor, Tensor | None]:
        """``(c, r)`` with ``P = c K + p0``: for a scalar noise ``c = 1 / (sigma^2 T)``
        and ``K = H`` (``r`` None); for one noise per output ``w = 1 / (sigma^2 T)``
        ``(C,)``, ``c = mean(w)`` and ``K = sum_c r_c H_c`` with ``r = w / c``, so
        that equal noises give the scalar noise's ``c`` and ``K``."""
        w = self._h_factor
        if not self._per_output:  # a vector before fit: H is zero, c only a scale
            return (w if w.ndim == 0 else w.mean()), None
        w = w.expand(self.H.n_outputs)  # a scalar after the fit: equal noises
        c = w.mean()
        return c, w / c

    def _output_decomposed(self, r: Tensor) -> KronDecomposed:
        """The decomposition of ``sum_c r_c H_c``: cached for the last ``r``; built
        afresh (differentiable through ``eigh``) while ``r`` requires grad."""
        if r.requires_grad:
            return self.H.decompose(r, self.damping, computed_in=self._dtype)
        cached = self._output_cache
        if cached is None or not torch.equal(cached[0], r):
            decomposed = self.H.decompose(r, self.damping, computed_in=self._dtype)
            cached = (r.clone(), decomposed)
            self._output_cache = cached
        return cached[1]

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
        if self._per_output:
            return self._output_decomposed(self._curvature_scale()[1])
        if self._decomposed is None:
            self._decomposed = self.H.decompose(
                damping=self.damping, computed_in=self._dtype
            )
        return self._decomposed

    def fit(self, train_loader, override: bool = True, progress_bar: bool = False):
        self._accumulating = None  # a per-output fit accumulates no Kron in place
        super().fit(train_loader, override=override, progress_bar=progress_bar)
        self._decompose()  # eigendecompose the factors once, as part of the fit

    @property
    def log_det_posterior_precision(self) -> Tensor:
        """``log det P`` from the factors' eigenvalues, one pass per block
        (``laplace.utils.logdet.affine_log_sum``); with one noise per output,
        differentiable in each noise through ``spectral_eigenvalues``."""
        if self._per_output:
            self._check_fitted("log_det_posterior_precision")
            return self._output_log_det()
        K, c = self.H_decomposed, self._h_factor
        if not self.damping and self.prior_precision.numel() == 1 and not K.low_rank:
            # every eigenvalue of P is c * h + d with the same d: one pass over all
            return affine_log_sum(c, self.prior_precision[0], self._flat_eigenvalues())
        return self._log_det(K.eigenvalues, c)

    def _output_log_det(self) -> Tensor:
        """``log det P`` for one noise per output: the eigenvectors of ``K`` at the
        current noise (cached), its eigenvalues differentiable in the noise as those
        of the spectral function ``log det`` (no ``eigh`` backward)."""
        c, r = self._curvature_scale()
        K = self._output_decomposed(r.detach())
        values = K.eigenvalues
        if r.requires_grad:
            weighted = self.H.weighted(r)
            values = [
                [spectral_eigenvalues(*term) for term in zip(Fs, Qs, lams)]
                for Fs, Qs, lams in zip(weighted.kfacs, K.eigenvectors, values)
            ]
        return self._log_det(values, c)

    def _log_det(self, eigenvalues: list[list[Tensor]], c: Tensor) -> Tensor:
        """``log det(c K + p0)`` (damped where ``damping``) from the eigenvalues of
        ``K``'s factors, block by block; a low-rank factor's by groups
        (``spectral_groups``: its ``U`` and its complement, counted with its
        multiplicity)."""
        deltas = (
            self.prior_precision.expand(len(eigenvalues))
            if self.prior_precision.numel() == 1
            else self.prior_precision
        )
        total = torch.zeros((), dtype=self._dtype, device=self._device)
        for values, delta in zip(eigenvalues, deltas):
            for group in spectral_groups([None] * len(values), values):
                times = math.prod(part.multiplicity for part in group)
                parts = [part.values for part in group]
                if len(parts) == 1:
                    term = affine_log_sum(c, delta, parts[0])
                elif self.damping:
                    # the damped eigenvalues g_i a_j separate over i and j
                    g, a = damped_factor_eigenvalues(c * parts[0], parts[1], delta, c)
                    term = len(a) * g.log().sum() + len(g) * a.log().sum()
                else:
                    term = affine_log_sum(c, delta, parts[0], parts[1])
                total = total + (term if times == 1 else times * term)
        return total

    def _build_form(self) -> KronPrecision:
        return KronPrecision(
            self.H_decomposed * self._curvature_scale()[0] + self.prior_precision,
            [p.shape for p in self.params],
        )

    @property
    def posterior_precision(self) -> KronDecomposed:
        """``P`` as a ``KronDecomposed``."""
        return self._posterior.K

    def _H_state(self) -> dict[str, Any]:
        if self._per_output:
            return self.H.state()
        return {  # a LowRankFactor as its plain state (a dict of tensors)
            "kfacs": [
                [F.state() if isinstance(F, LowRankFactor) else F for F in block]
                for block in self.H.kfacs
            ],
            "averaged": list(self.H.averaged),
        }

    def _load_H(self, state: Any) -> Kron | OutputKron:
        try:
            kfacs = [
                [
                    (LowRankFactor.from_state(F) if isinstance(F, dict) else F).to(
                        self._device, self._curvature_dtype
                    )
                    for F in block
                ]
                for block in state["kfacs"]
            ]
        except ValueError as err:
            raise ValueError(f"The state dict's Kronecker factors: {err}") from None
        try:
            if "shared" in state:  # one noise per output
                H = OutputKron(kfacs, state["shared"], state["averaged"])
            else:
                H = Kron(kfacs, state.get("averaged"))
        except ValueError as err:
            raise ValueError(f"The state dict's Kronecker factors: {err}") from None
        self._check_layout(H, "The Kron of the state dict")
        return H


def _low_rank_spec(rank: int | None, threshold: int) -> LowRankSpec | None:
    """The checked ``low_rank_factors`` and ``low_rank_threshold`` (None: dense)."""
    threshold = _check_int(threshold, "low_rank_threshold", minimum=0)
    if rank is None:
        return None
    return LowRankSpec(check_positive_int(rank, "low_rank_factors"), threshold)


def _in_dtype(K: Kron, dtype: torch.dtype) -> Kron:
    """``K`` with its factors in ``dtype`` (itself when they are)."""
    if all(F.dtype == dtype for block in K.kfacs for F in block):
        return K
    return Kron([[F.to(dtype) for F in block] for block in K.kfacs], K.averaged)
