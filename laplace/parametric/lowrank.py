r"""LowRankLaplace: ``P = factor * U diag(l) U^T + diag(p0)`` from the top eigenpairs.

The eigenpairs of the curvature of the whole training set are computed matrix-free
(block Lanczos or randomized subspace iteration, ``top_eigenpairs``) from
curvature-matrix products that iterate over the data loader: those of the curvature
engine (``laplace.curvature.structures.gram_matmat``: module hooks and one batched
backward pass per batch, no forward-mode AD) for the engine's backends, those of
Curvlinops' linear operators for the library backends. Sampling, the functional
variance and the log-determinant then use the Woodbury identities of
``laplace.utils.lowrank.LowRankPlusDiagonal``: ``O(P k^2)`` and no ``(P, P)``
matrix.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.utils import parameters_to_vector
from torch.utils.data import DataLoader

from laplace.curvature import engine, structures
from laplace.curvature.curvature import (
    CurvatureInterface,
    EFInterface,
    GGNInterface,
    import_library,
)
from laplace.curvature.native import NativeInterface
from laplace.data import batch_size, dataset_size, split_batch, to_device
from laplace.parametric.base import ParametricLaplace
from laplace.parametric.precision import LowRankPrecision
from laplace.utils import distributed
from laplace.utils._checks import check_positive_int
from laplace.utils.lowrank import LowRankPlusDiagonal, top_eigenpairs
from laplace.utils.memory import check_fit

Tensor = torch.Tensor


class LowRankLaplace(ParametricLaplace):
    """Laplace approximation with a rank-``k`` curvature plus the diagonal prior.

    Parameters
    ----------
    rank : int, default=20
        number of eigenpairs ``k`` kept.
    eig_method : {'lanczos', 'randomized'}, default='lanczos'
        eigensolver of ``laplace.utils.lowrank.top_eigenpairs``.
    eig_kwargs : dict, optional
        further arguments of the eigensolver (``n_iter``, ``tol``, ``oversampling``,
        ``generator``).

    Notes
    -----
    The curvature is the one of ``backend``: the GGN (default; the Monte-Carlo Fisher
    with ``backend_kwargs={"stochastic": True}``), the empirical Fisher for EF
    backends, or the Hessian for Hessian backends (negative eigenvalues are clipped
    to 0). Its products come from the curvature engine for ``NativeGGN``/``NativeEF``
    (the default) and from Curvlinops for the library backends.
    See ``ParametricLaplace`` for the other parameters.
    """

    key = ("all", "lowrank")
    #: refused rather than unverified: its matrix-free fit is not tested on pairs
    supports_reward_modeling = False

    def __init__(
        self,
        model,
        likelihood,
        backend: type[CurvatureInterface] | None = CurvatureInterface,
        sigma_noise=1.0,
        prior_precision=1.0,
        prior_mean=0.0,
        temperature=1.0,
        enable_backprop=False,
        dict_key_x="input_ids",
        dict_key_y="labels",
        backend_kwargs=None,
        asdl_fisher_kwargs=None,
        *,
        rank: int = 20,
        eig_method: str = "lanczos",
        eig_kwargs: dict[str, Any] | None = None,
        curvature_dtype: torch.dtype | None = None,
    ) -> None:
        if backend is CurvatureInterface:  # laplace-torch's default: none chosen
            backend = None
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
        check_positive_int(rank, "rank")
        if eig_method not in ("lanczos", "randomized"):
            raise ValueError(
                f"eig_method must be 'lanczos' or 'randomized'; got {eig_method!r}."
            )
        self.rank = min(rank, self.n_params)
        self.eig_method = eig_method
        self.eig_kwargs = dict(eig_kwargs or {})

    def fit(
        self,
        train_loader: DataLoader,
        override: bool = True,
        progress_bar: bool = False,
    ) -> None:
        """Top eigenpairs of the curvature of the whole of ``train_loader``.

        ``override=False`` is refused: eigenpairs of two data sets do not add.
        """
        red = distributed.reduction()
        with distributed.agreement(red, "fit", lambda: distributed.signature(self)):
            if not override:
                raise ValueError(
                    "LowRankLaplace cannot accumulate fits (override=False): the "
                    "eigenpairs are of one data set's curvature. Fit once on all the "
                    "data."
                )
            N = dataset_size(train_loader)
            train_loader = check_fit(self, train_loader)  # raises before any batch
        distributed.check_loader(train_loader, red)
        self.model.eval()
        data = _CheckedData(train_loader, self.backend, self._device)
        with distributed.agreement(red, "fit") as agreed:
            loss, n_outputs = data.loss_and_outputs()
            agreed.report(seen=data.seen)
        if red is not None:  # the products below are summed over the ranks too
            loss, N = distributed.all_reduce_sum(loss, red), agreed.total("seen")
        if not torch.isfinite(loss):
            raise RuntimeError(
                "The training loss is not finite (NaN or inf); check the data and the "
                "model's outputs. The Laplace approximation was left as it was."
            )
        operator, scale = self._operator(data, N, progress_bar)

        # the eigensolver and the eigenpairs in the curvature's dtype (float32 for
        # a 16-bit model: no half QR on the CPU); the products in the model's
        work = self._curvature_dtype

        def matmat(X: Tensor) -> Tensor:
            Y = (scale * (operator @ X.to(self._dtype))).to(work)
            return distributed.all_reduce_sum(Y, red)

        eig_kwargs = dict(self.eig_kwargs)
        seed = distributed.shared_seed(red)
        if seed is not None and eig_kwargs.get("generator") is None:
            # every rank starts the iteration from the same block
            generator = torch.Generator(self._device).manual_seed(seed)
            eig_kwargs["generator"] = generator
        eigenvalues, U = top_eigenpairs(
            matmat,
            self.n_params,
            self.rank,
            dtype=work,
            device=self._device,
            method=self.eig_method,
            **eig_kwargs,
        )
        if not (torch.isfinite(eigenvalues).all() and torch.isfinite(U).all()):
            raise RuntimeError(
                "The curvature's eigenpairs are not finite (NaN or inf)."
            )
        self.H = (U, eigenvalues)
        self.loss, self.n_data, self.n_outputs = loss, N, n_outputs
        self.mean = parameters_to_vector(self.params).detach()
        self.fitted = True
        self._on_new_curvature()

    def _check_backend_likelihood(self, lik) -> None:
        """The products of a library backend are Curvlinops' (``_operator``): its
        rules for the likelihood apply, whatever the backend's library."""
        backend = self._backend_cls
        if issubclass(backend, NativeInterface) or backend in (
            GGNInterface,
            EFInterface,
        ):
            return super()._check_backend_likelihood(lik)
        from laplace.curvature.curvlinops import (
            CurvlinopsEF,
            CurvlinopsGGN,
            CurvlinopsHessian,
        )

        twin = (
            CurvlinopsEF
            if issubclass(backend, EFInterface)
            else CurvlinopsGGN
            if issubclass(backend, GGNInterface)
            else CurvlinopsHessian
        )
        try:
            twin.check_likelihood(
                lik, "full", bool(self.backend_kwargs.get("stochastic"))
            )
        except ValueError as err:
            message = str(err).replace(twin.__name__, backend.__name__, 1)
            raise ValueError(
                f"{message} (LowRankLaplace takes the products of "
                f"{backend.__name__} from Curvlinops.)"
            ) from None

    def _operator(self, data, N: int, progress_bar: bool):
        """The operator of the backend's curvature and its scale to the loss
        convention of DESIGN.md section 3."""
        backend = self.backend
        if isinstance(backend, NativeInterface) or type(backend) in (
            GGNInterface,
            EFInterface,
        ):
            return _EngineOperator(self.params, data, backend), 1.0
        lib = import_library("curvlinops", "curvlinops-for-pytorch", "Curvlinops")
        backend = self.backend
        kwargs: dict[str, Any] = {
            "check_deterministic": False,
            "num_data": N,
            "progressbar": progress_bar,
        }
        if data.mapping:
            key = self.dict_key_x
            kwargs["batch_size_fn"] = lambda x: x[key].shape[0]
        args = (self.model, backend.lossfunc, self.params, data)
        from laplace.curvature.curvlinops import LIBRARY_LOSSES, _WhitenedOutputs

        if (
            isinstance(backend, GGNInterface)
            and not backend.stochastic
            and not isinstance(backend.lossfunc, LIBRARY_LOSSES)
        ):
            # the GGN of a loss Curvlinops does not know: MSELoss on L^T f
            model = _WhitenedOutputs(self.model, backend.lik)
            whitened = _WhitenedData(data, model)
            args = (model, torch.nn.MSELoss(reduction="sum"), self.params, whitened)
            return lib.GGNLinearOperator(*args, **kwargs), 0.5
        if isinstance(backend, EFInterface):
            return lib.EFLinearOperator(*args, **kwargs), backend.factor**2
        if isinstance(backend, GGNInterface) and backend.stochastic:
            op = lib.FisherMCLinearOperator(
                *args, mc_samples=backend.num_samples, **kwargs
            )
            return op, backend.factor
        if isinstance(backend, GGNInterface):
            return lib.GGNLinearOperator(*args, **kwargs), backend.factor
        return lib.HessianLinearOperator(*args, **kwargs), backend.factor

    def _build_form(self) -> LowRankPrecision:
        U, eigenvalues = self.H
        M = LowRankPlusDiagonal(
            U, self._h_factor * eigenvalues, self.prior_precision_diag.to(U.dtype)
        )
        return LowRankPrecision(M)

    @property
    def V(self) -> Tensor:
        """Eigenvectors ``U`` ``(n_params, rank)`` of the curvature."""
        self._check_fitted("V")
        return self.H[0]

    @property
    def Kinv(self) -> Tensor:
        r"""The inverse ``(k, k)`` of the Woodbury core
        ``K = diag(1 / (factor * l)) + U^T diag(p0)^-1 U``, so that

        $$ P^{-1} = D^{-1} - D^{-1} U K^{-1} U^T D^{-1}, \qquad D = diag(p_0). $$

        Eigenvalues ``l`` that are zero drop out of ``P``; their rows and columns of
        ``K^{-1}`` are zero (the limit ``1 / l -> inf``).
        """
        (U, lam), p0 = self.posterior_precision
        scaled = U / p0[:, None]
        kept = lam > 0
        core = U[:, kept].mT @ scaled[:, kept] + torch.diag(1 / lam[kept])
        Kinv = lam.new_zeros(len(lam), len(lam))
        idx = kept.nonzero().squeeze(-1)
        Kinv[idx[:, None], idx[None, :]] = torch.linalg.inv(core)
        return Kinv

    @property
    def posterior_precision(self) -> tuple[tuple[Tensor, Tensor], Tensor]:
        """``((U, factor * l), p0)``: ``P = U diag(factor * l) U^T + diag(p0)``."""
        self._check_fitted("posterior_precision")
        U, eigenvalues = self.H
        prior = self.prior_precision_diag.to(U.dtype)
        return (U, self._h_factor * eigenvalues), prior

    def _H_state(self) -> dict[str, Tensor]:
        U, eigenvalues = self.H
        return {"eigenvectors": U, "eigenvalues": eigenvalues}

    def _load_H(self, state: Any) -> tuple[Tensor, Tensor]:
        U = state["eigenvectors"].to(self._device, self._curvature_dtype)
        eigenvalues = state["eigenvalues"].to(self._device, self._curvature_dtype)
        if U.shape[0] != self.n_params or eigenvalues.shape != U.shape[1:]:
            raise ValueError("The state dict's eigenpairs do not fit this model.")
        return U, eigenvalues


class _EngineOperator:
    """``H X`` over the whole data set from the curvature engine, one batch at a time
    (``structures.gram_matmat``); Monte-Carlo targets are drawn with a fixed seed per
    batch, so that every product is with the same matrix."""

    def __init__(self, params, data, backend) -> None:
        self.params, self.data, self.backend = params, data, backend

    def __matmul__(self, X: Tensor) -> Tensor:
        backend = self.backend
        total = torch.zeros_like(X)
        for i, (x, y) in enumerate(self.data):
            module, inputs = backend._target(x)

            def factor(f, y=y, i=i):
                if getattr(backend, "stochastic", False):
                    gen = torch.Generator(f.device).manual_seed(7919 * (i + 1))
                    return backend.lik.sampled_gradients(f, backend.num_samples, gen)
                return backend._output_factor(f, y)

            tape = engine.run(module, self.params, inputs, factor)
            total += structures.gram_matmat(tape, X)
        return total


class _WhitenedData:
    """``(x, 0)`` over ``data``, the zero targets of ``MSELoss`` on the whitened
    outputs of ``model`` (their number of columns from the first batch)."""

    def __init__(self, data: _CheckedData, model) -> None:
        self.data, self.model = data, model
        self.columns: int | None = None

    def __iter__(self):
        for x, _ in self.data:
            if self.columns is None:
                with torch.no_grad():
                    self.columns = self.model(x).shape[-1]
            ref = next(self.model.parameters())
            n = batch_size(x, self.data.backend.dict_key_x)
            yield x, torch.zeros(n, self.columns, dtype=ref.dtype, device=ref.device)


class _CheckedData:
    """Re-iterable ``(x, y)`` over a loader, on the device, with targets shaped as
    the backend's likelihood needs them (what Curvlinops' operators iterate over)."""

    def __init__(self, loader: DataLoader, backend: CurvatureInterface, device) -> None:
        self.loader, self.backend, self.device = loader, backend, device
        self.mapping = False
        self.output_shape: torch.Size | None = None
        #: the examples of the last ``loss_and_outputs`` pass
        self.seen = 0

    def __iter__(self):
        backend = self.backend
        for batch in self.loader:
            x, y = split_batch(batch, backend.dict_key_x, backend.dict_key_y)
            self.mapping = not isinstance(x, Tensor)
            x, y = to_device(x, self.device), y.to(self.device)
            backend._check_batch(x, y)
            if self.output_shape is None:
                with torch.no_grad():
                    f = backend.model(x)
                self.output_shape, self.output_dtype = f.shape[1:], f.dtype
            f = torch.empty(
                (len(y), *self.output_shape), dtype=self.output_dtype, device="meta"
            )
            yield x, backend.lik.check_targets(f, y)

    def loss_and_outputs(self) -> tuple[Tensor, int]:
        """Summed loss over the data and the number of outputs."""
        loss, n_outputs = None, None
        backend = self.backend
        self.seen = 0
        for x, y in self:
            with torch.no_grad():
                f = backend.model(x)
            n_outputs = f.shape[-1]
            self.seen += f.shape[0]
            value = backend.lik.loss(f, y)
            loss = value if loss is None else loss + value
        if loss is None:
            raise ValueError("train_loader yielded no batches.")
        return loss, n_outputs


__all__ = ["LowRankLaplace"]
