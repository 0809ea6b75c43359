r"""ELLA: the accelerated linearized Laplace approximation (Deng, Zhou and Zhu,
2022), laplace-torch 0.3's ``ELLA``.

The kernel ``K = J J^T / delta`` of the linearized network is approximated by a
Nyström feature map built from ``subsample_size`` basis rows (training inputs, one
output coordinate each) and its ``n_eigenvalues`` leading eigen-directions; the
posterior over the features is Gaussian with the precision ``delta I + G / (sigma^2
T)``, ``G`` the GGN of all training data projected on the features
(``laplace.functional.nystrom`` has the formulas). Fitting is one pass over the
basis rows and one over the training data; tuning the prior precision or the noise
changes only a ``k x k`` factor.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from laplace.curvature.curvature import CurvatureInterface
from laplace.data import batch_size, dataset_size, split_batch, to_device
from laplace.functional import kernel, nystrom, subset
from laplace.functional.scalable import (
    ScalableFunctionalLaplace,
    _mean_of,
    check_scalar_hyper,
)
from laplace.likelihood import OutputLikelihood
from laplace.utils import distributed
from laplace.utils._checks import _check_int
from laplace.utils.enums import (
    Likelihood,
    LinkApprox,
    PredType,
    PriorStructure,
    TuningMethod,
    parse_enum,
)

Tensor = torch.Tensor


class ELLA(ScalableFunctionalLaplace):
    r"""Accelerated linearized Laplace: a Nyström feature map of the linearized
    network's kernel and a Gaussian posterior over its features.

    With the basis rows ``J_M`` ``(M, P)`` (``M = subsample_size`` training inputs,
    one output coordinate of each) and the ``k = n_eigenvalues`` leading eigenpairs
    ``(U_k, Lambda_k)`` of ``J_M J_M^T``, the directions ``V = J_M^T U_k
    Lambda_k^{-1/2}`` ``(P, k)`` (``dual_directions``) give the posterior
    covariance of the outputs

    $$
        \operatorname{Cov} f(x) = J(x) V (\delta I + G / (\sigma^2 T))^{-1} V^T
        J(x)^T, \qquad G = \sum_n V^T J_n^T \Lambda_n J_n V
    $$

    over all training data (``feature_gram``), ``Lambda_n`` the output Hessian. With
    the whole training set as basis and every positive eigen-direction it is the
    linearized Laplace posterior ``J(x) (J^T Lambda J / (sigma^2 T) + delta
    I)^{-1} J(x)^T`` wherever ``J(x)`` lies in the span of the training Jacobians.

    Parameters
    ----------
    model : torch.nn.Module
        the pretrained network; it is not changed.
    likelihood : {'classification', 'regression', 'reward_modeling'}
    subsample_size : int
        number of training inputs of the basis (drawn from ``seed``).
    n_eigenvalues : int
        number of kernel directions kept, ``1 <= n_eigenvalues <= subsample_size``.
    sigma_noise, prior_precision, temperature, enable_backprop, dict_key_x,
    dict_key_y
        as ``BaseLaplace``; the prior precision is a scalar.
    prior_mean : float, default=0
        must be zero.
    backend : a GGN backend class, optional
        recorded and checked (the GGN's curvature); the Jacobians are computed by
        this library whichever is named.
    backend_kwargs : dict, optional
    seed : int, default=1234
        seed of the basis inputs and their output coordinates: the first
        ``subsample_size`` of ``torch.randperm(N)`` seeded with ``seed``, and
        coordinates ``torch.randint(C)`` seeded with ``seed + 1`` (as laplace-torch
        0.3 draws them, so that a seed gives the same basis in both).

    Attributes
    ----------
    dual_directions : torch.Tensor ``(P, n_eigenvalues)`` or None
    feature_gram : torch.Tensor ``(n_eigenvalues, n_eigenvalues)`` or None
        ``G``, before the noise and the temperature.
    chol_precision : torch.Tensor ``(n_eigenvalues, n_eigenvalues)`` or None
        the lower Cholesky factor of ``delta I + G / (sigma^2 T)``.
    fit_history_ : dict
        ``processed_examples`` (cumulative counts after each batch of the curvature
        pass, as floats), ``val_nll`` (validation scores during ``fit``) and
        ``tuning`` (one ``{'prior_precision', 'sigma_noise', 'val_nll'}`` per
        candidate of a tuning run).
    """

    key = ("all", "gp")

    def __init__(
        self,
        model: nn.Module,
        likelihood,
        subsample_size: int,
        n_eigenvalues: int,
        sigma_noise: float | Tensor = 1.0,
        prior_precision: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend: type[CurvatureInterface] | None = None,
        backend_kwargs: dict[str, Any] | None = None,
        seed: int = 1234,
    ) -> None:
        self.subsample_size = _check_int(subsample_size, "subsample_size", minimum=1)
        self.n_eigenvalues = _check_int(
            n_eigenvalues, "n_eigenvalues", minimum=1, maximum=self.subsample_size
        )
        self.seed = _check_int(seed, "seed", minimum=-(2**63))
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
        )
        self.dual_directions: Tensor | None = None
        self.feature_gram: Tensor | None = None
        self.fit_history_ = _empty_history()

    # -- fit -----------------------------------------------------------------------
    def fit(
        self,
        train_loader: DataLoader,
        *,
        val_loader: DataLoader | None = None,
        val_steps: int | None = None,
        balanced: bool = False,
        progress_bar: bool = False,
    ) -> None:
        """Build the basis from ``subsample_size`` training inputs and project the
        GGN of all training data onto it.

        Parameters
        ----------
        train_loader : DataLoader
            its dataset must have a length and be indexable (the basis inputs are
            taken from it by index, so the loader's order and shuffling do not
            change them); the curvature pass iterates the loader once.
        val_loader : DataLoader, optional
            scores the predictive (mean NLL, appended to ``fit_history_['val_nll']``)
            at the end, or every ``val_steps`` batches of the curvature pass.
        val_steps : int, optional
        balanced : bool, default=False
            classification: draw the basis inputs evenly over the classes (walking
            the seeded permutation, each class up to its share of
            ``subsample_size``; classes with too few data leave their share to the
            others).
        progress_bar : bool, default=False

        Raises
        ------
        ValueError
            for ``subsample_size`` larger than the training set, ``balanced`` with
            another likelihood than classification, a non-positive ``val_steps``,
            a basis with fewer than ``n_eigenvalues`` positive kernel directions,
            or a curvature pass without data. The approximation is left as it was.
        """
        red = distributed.reduction()

        def signature() -> dict:  # the basis is drawn from the data set by index
            return {
                **distributed.signature(self),
                "subsample_size": self.subsample_size,
                "seed": self.seed,
                "len(train_loader.dataset)": dataset_size(train_loader),
            }

        with distributed.agreement(red, "fit", signature):
            if val_steps is not None:
                _check_int(val_steps, "val_steps", minimum=1)
                if red is not None:
                    raise ValueError(
                        "val_steps scores the posterior of the data seen so far, "
                        f"which under a process group of {red.world_size} ranks is "
                        "each rank's own: use val_steps=None (the validation at the "
                        "end sees all ranks' data), or turn the reduction off with "
                        "laplace.utils.distributed_reduction(False)."
                    )
            if balanced and self.likelihood != Likelihood.CLASSIFICATION:
                raise ValueError(
                    "balanced=True draws the basis evenly over the classes; it needs "
                    f"likelihood='classification', not {self.lik.name!r}."
                )
            N = dataset_size(train_loader)
            if self.subsample_size > N:
                raise ValueError(
                    f"subsample_size={self.subsample_size} exceeds the {N} training "
                    f"data; choose subsample_size <= {N}."
                )
        distributed.check_loader(train_loader, red)
        self.model.eval()
        V = self._basis(train_loader, N, balanced, progress_bar)
        previous = {name: getattr(self, name) for name in _FITTED_STATE}
        try:
            self._accumulate(train_loader, V, val_loader, val_steps, progress_bar, red)
        except BaseException:
            for name, value in previous.items():  # leave it as it was
                setattr(self, name, value)
            raise

    def _accumulate(
        self, train_loader, V, val_loader, val_steps, progress_bar, red=None
    ):
        """The curvature pass: ``G`` over the training data, scored on the
        validation data every ``val_steps`` batches (or at the end); under a
        reduction ``red``, ``G`` and the count summed over the ranks."""
        history = _empty_history()
        G = torch.zeros(V.shape[1], V.shape[1], dtype=V.dtype, device=V.device)
        self.dual_directions, self.feature_gram = V, G  # G grows in place
        with distributed.agreement(red, "fit") as agreed:
            n_seen, step = self._curvature_pass(
                train_loader, G, history, val_loader, val_steps, progress_bar
            )
            agreed.report(seen=n_seen)
        if red is not None:
            distributed.all_reduce_([G], red)
            n_seen = self.n_data = agreed.total("seen")
            history["processed_examples"] = [float(n_seen)]
        if not bool(torch.isfinite(G).all()):
            raise RuntimeError(
                "The projected curvature is not finite (NaN or inf in the model's "
                "outputs or Jacobians)."
            )
        self._posterior_cache = None
        # at the end: without val_steps, or when the last batch was not scored
        if val_loader is not None and (val_steps is None or step % val_steps):
            history["val_nll"].append(self._validation_nll(val_loader))
        self.fit_history_ = history

    def _curvature_pass(
        self, train_loader, G, history, val_loader, val_steps, progress_bar
    ) -> tuple[int, int]:
        """This process's batches added to ``G`` in place: ``(examples, steps)``."""
        lik = self.lik
        n_seen, step = 0, 0
        batches = tqdm(train_loader, disable=not progress_bar, desc="curvature")
        for step, batch in enumerate(batches, 1):
            x, y = split_batch(batch, self.dict_key_x, self.dict_key_y)
            x = to_device(x, self._device)
            self._check_fit_batch(x, y)
            with torch.no_grad():
                f, X = self._jacobian_set(x)
                S = lik.hessian_sqrt(f).mT @ self._features(X)  # (B, K, k)
                G += torch.einsum("bki,bkj->ij", S, S)
            n_seen += batch_size(x, self.dict_key_x)
            history["processed_examples"].append(float(n_seen))
            # the posterior of the data seen so far
            self.n_data, self.n_outputs, self.fitted = n_seen, f.shape[-1], True
            self._posterior_cache = None
            if val_loader is not None and val_steps and step % val_steps == 0:
                history["val_nll"].append(self._validation_nll(val_loader))
        if n_seen == 0:
            raise ValueError("train_loader yielded no data for the curvature pass.")
        return n_seen, step

    def _basis(self, train_loader, N: int, balanced: bool, progress_bar: bool):
        """The directions ``V`` ``(P, k)`` of the basis rows."""
        labels = _labels(train_loader, self) if balanced else None
        inputs = nystrom.basis_inputs(N, self.subsample_size, self.seed, labels)
        data = subset.batches_of(
            train_loader, inputs, self.dict_key_x, self.dict_key_y, self._device
        )
        rows, coords, start = [], None, 0
        for x, _ in tqdm(data, disable=not progress_bar, desc="basis"):
            with torch.no_grad():
                _, X = self._jacobian_set(x)
                if coords is None:
                    coords = nystrom.basis_coordinates(
                        self.subsample_size, X.n_outputs, self.seed
                    ).to(self._device)
                picked = coords[start : start + X.n]
                rows.append(kernel.selected_rows(X, picked, self.params))
            start += X.n
        V, _ = nystrom.nystrom_basis(torch.cat(rows), self.n_eigenvalues)
        return V

    # -- the posterior ---------------------------------------------------------------
    @property
    def chol_precision(self) -> Tensor | None:
        """Lower Cholesky factor ``(k, k)`` of ``delta I + G / (sigma^2 T)``; None
        before ``fit``. Rebuilt when a hyperparameter changes."""
        if self.feature_gram is None:
            return None
        if self._posterior_cache is None:
            self._posterior_cache = nystrom.precision_cholesky(
                self.feature_gram, self.prior_precision[0], self._h_factor
            )
        return self._posterior_cache

    def _features(self, X: kernel.JacobianSet) -> Tensor:
        """``Phi = J V`` ``(N, C, k)`` of the inputs of ``X`` (from the factored
        Jacobians: never ``(N, C, P)``)."""
        return kernel.project(X, self.dual_directions, self.params)

    def _set_covariance(self, X: kernel.JacobianSet, joint: bool) -> Tensor:
        return self._feature_covariance(self._features(X), joint)

    def _feature_covariance(self, Phi: Tensor, joint: bool) -> Tensor:
        if joint:
            return nystrom.functional_covariance(Phi, self.chol_precision)
        return nystrom.functional_variance(Phi, self.chol_precision)

    # -- tuning ----------------------------------------------------------------------
    def optimize_prior_precision(
        self,
        pred_type: PredType | str = PredType.GP,
        method: TuningMethod | str = TuningMethod.GRIDSEARCH,
        n_steps: int = 100,
        lr: float = 1e-1,
        init_prior_prec: float | Tensor = 1.0,
        prior_structure: PriorStructure | str = PriorStructure.SCALAR,
        val_loader: DataLoader | None = None,
        loss: Any = None,
        log_prior_prec_min: float = -4,
        log_prior_prec_max: float = 4,
        grid_size: int = 100,
        link_approx: LinkApprox | str = LinkApprox.PROBIT,
        n_samples: int = 100,
        verbose: bool = False,
        progress_bar: bool = False,
    ) -> None:
        """Set the scalar prior precision to the value of ``logspace(
        log_prior_prec_min, log_prior_prec_max, grid_size)`` with the lowest
        validation NLL (probit predictive; regression: ``N(f, f_var + sigma^2)``).
        Each candidate is appended to ``fit_history_['tuning']``; no refit: a
        candidate costs one ``k x k`` eigendecomposition-free rescaling.

        Only 'gridsearch' on the GP predictive is defined (ELLA has no marginal
        likelihood); the marginal-likelihood options ``n_steps``, ``lr`` and
        ``init_prior_prec``, and ``loss``, ``link_approx`` and ``n_samples``, are
        accepted at their defaults only.

        Raises
        ------
        NotImplementedError
            for ``method='marglik'`` or a non-default option above.
        ValueError
            for ``pred_type='nn'``, a missing ``val_loader``, a non-scalar
            ``prior_structure`` or an invalid grid.
        RuntimeError
            before ``fit``.
        """
        self._parse_pred_type(pred_type)
        method = parse_enum(TuningMethod, method, "method")
        if method == TuningMethod.MARGLIK:
            raise NotImplementedError(
                "ELLA has no marginal likelihood to tune by; use "
                "method='gridsearch' with a val_loader."
            )
        structure = parse_enum(PriorStructure, prior_structure, "prior_structure")
        if structure != PriorStructure.SCALAR:
            raise ValueError(
                "ELLA takes a scalar prior precision; got prior_structure="
                f"{structure.value!r}. Use prior_structure='scalar'."
            )
        link = parse_enum(LinkApprox, link_approx, "link_approx")
        defaults = {
            "n_steps": n_steps == 100,
            "lr": lr == 1e-1,
            "init_prior_prec": _is_one(init_prior_prec),
            "loss": loss is None,
            "link_approx": link == LinkApprox.PROBIT,
            "n_samples": n_samples == 100,
        }
        changed = [name for name, default in defaults.items() if not default]
        if changed:
            raise NotImplementedError(
                f"ELLA's grid search scores the probit (or Gaussian) validation NLL "
                f"and takes no {', '.join(changed)}; leave them at their defaults."
            )
        if val_loader is None:
            raise ValueError("method='gridsearch' needs a val_loader.")
        grid_size = _check_int(grid_size, "grid_size", minimum=1)
        self._check_fitted("optimize_prior_precision")
        grid = torch.logspace(
            float(log_prior_prec_min), float(log_prior_prec_max), grid_size
        ).tolist()
        if not all(map(_finite_positive, grid)):
            raise ValueError(
                "The prior-precision grid must be finite and positive; got "
                f"10 ** [{log_prior_prec_min}, {log_prior_prec_max}]."
            )
        self._grid_search(val_loader, [(p, None) for p in grid], progress_bar)
        if verbose:
            print(f"Optimized prior precision: {self.prior_precision}")

    def optimize_hyperparameters(self, val_loader: DataLoader, grid) -> None:
        """Set the prior precision (and, for regression, the noise) to the grid
        candidate with the lowest validation NLL; each candidate is appended to
        ``fit_history_['tuning']``.

        Parameters
        ----------
        val_loader : DataLoader
        grid : iterable of numbers, or of ``(prior_precision, sigma_noise)`` pairs
            a number keeps the current noise.

        Raises
        ------
        ValueError
            for an empty grid, a non-positive candidate, a pair for another
            likelihood than regression, or if no candidate scores finitely.
        RuntimeError
            before ``fit``.
        """
        self._check_fitted("optimize_hyperparameters")
        candidates = [_candidate(c, self.lik) for c in grid]
        if not candidates:
            raise ValueError(
                "grid is empty; give prior precisions, or (prior_precision, "
                "sigma_noise) pairs for regression."
            )
        self._grid_search(val_loader, candidates, False)

    def _grid_search(self, val_loader, candidates, progress_bar) -> None:
        """Score each ``(prior_precision, sigma_noise or None)`` candidate on the
        validation data and keep the best; the validation features and the
        eigendecomposition of ``G`` are computed once."""
        scorer = _GridScorer(self, val_loader)
        old = (self.prior_precision, self.sigma_noise)
        best, best_nll = None, float("inf")
        for delta, sigma in tqdm(candidates, disable=not progress_bar, desc="grid"):
            sigma = float(old[1]) if sigma is None else sigma
            nll = scorer.nll(delta, sigma)
            self.fit_history_["tuning"].append(
                {"prior_precision": delta, "sigma_noise": sigma, "val_nll": nll}
            )
            if nll < best_nll:
                best, best_nll = (delta, sigma), nll
        if best is None:
            raise ValueError(
                "No candidate of the grid gave a finite validation NLL; the "
                "hyperparameters were left as they were."
            )
        self.prior_precision, self.sigma_noise = best

    # -- checkpoints -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The fitted posterior as plain tensors, numbers and strings: the basis
        directions, ``G``, the hyperparameters, the history, the seed, and the
        pretrained model's fingerprint (not its weights). The Cholesky factor is
        rebuilt on loading.

        Raises
        ------
        RuntimeError
            before ``fit``.
        """
        self._check_fitted("state_dict")
        backend = self._backend_cls
        return {
            "cls_name": type(self).__name__,
            "n_params": self.n_params,
            "model_fingerprint": self._model_fingerprint(),
            "likelihood": self.lik.name,
            "subsample_size": self.subsample_size,
            "n_eigenvalues": self.n_eigenvalues,
            "dual_directions": self.dual_directions.detach(),
            "feature_gram": self.feature_gram.detach(),
            "prior_precision": self.prior_precision.detach(),
            "sigma_noise": self.sigma_noise.detach(),
            "temperature": self.temperature,
            "n_data": self.n_data,
            "n_outputs": self.n_outputs,
            "fitted": True,
            "fit_history": _copy_history(self.fit_history_),
            "seed": self.seed,
            "dict_key_x": self.dict_key_x,
            "dict_key_y": self.dict_key_y,
            "backend_class": f"{backend.__module__}.{backend.__qualname__}",
            "backend_kwargs": dict(self.backend_kwargs),
            "enable_backprop": self.enable_backprop,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a fitted posterior of the same pretrained model (checked against
        the stored fingerprint; the model's weights are not changed). The basis
        configuration, hyperparameters and history become the checkpoint's.

        Raises
        ------
        ValueError
            for a checkpoint of another class, unfitted, of another likelihood or
            of another pretrained model (nothing is changed then).
        """
        self._check_checkpoint(
            state_dict,
            {"cls_name", "likelihood", "model_fingerprint", "dual_directions"},
        )
        V = state_dict["dual_directions"]
        if V.shape[0] != self.n_params or V.shape[1] != state_dict["n_eigenvalues"]:
            raise ValueError(
                f"dual_directions of shape {tuple(V.shape)} do not fit this model's "
                f"{self.n_params} parameters and n_eigenvalues="
                f"{state_dict['n_eigenvalues']}."
            )
        to = {"device": self._device, "dtype": self._work_dtype}
        self.subsample_size = state_dict["subsample_size"]
        self.n_eigenvalues = state_dict["n_eigenvalues"]
        self.seed = state_dict["seed"]
        self.dual_directions = V.to(**to)
        self.feature_gram = state_dict["feature_gram"].to(**to)
        self.temperature = state_dict["temperature"]
        self.prior_precision = state_dict["prior_precision"].to(**to)
        self.sigma_noise = state_dict["sigma_noise"].to(**to)
        self.n_data, self.n_outputs = state_dict["n_data"], state_dict["n_outputs"]
        self.fit_history_ = _copy_history(state_dict["fit_history"])
        self.enable_backprop = state_dict["enable_backprop"]
        self._posterior_cache = None
        self.fitted = True


class _GridScorer:
    """Validation NLL of ELLA at any ``(delta, sigma)``: the validation features
    are rotated once into the eigenbasis ``G = Q D Q^T``, after which the
    covariance ``Phi Q diag(1 / (delta + h d)) Q^T Phi^T`` costs no factorization."""

    def __init__(self, la: ELLA, val_loader: Iterable) -> None:
        self.la = la
        d, Q = torch.linalg.eigh(la.feature_gram)
        self.d = d.clamp_min(0)
        self.batches = []
        with torch.no_grad():
            for batch in val_loader:
                x, y = split_batch(batch, la.dict_key_x, la.dict_key_y)
                x = to_device(x, la._device)
                f, X = la._jacobian_set(x)
                self.batches.append((f, la._features(X) @ Q, y.to(la._device)))
        if not self.batches:
            raise ValueError("val_loader yielded no data.")

    def nll(self, delta: float, sigma: float) -> float:
        la = self.la
        h = 1 / (sigma**2 * la.temperature)
        scale = 1 / (delta + h * self.d)
        noise = la._sigma_noise
        la._sigma_noise = torch.as_tensor(sigma, dtype=noise.dtype, device=noise.device)
        try:
            score = la._new_score()
            for f, R, y in self.batches:
                var = torch.einsum("nck,k,ndk->ncd", R, scale, R)
                la._add_to_score(score, f, var, y)
            return _mean_of(score)
        finally:
            la._sigma_noise = noise


def _labels(train_loader: DataLoader, la: ELLA) -> Tensor:
    """The class label of every training datum, in data-set order."""
    N = dataset_size(train_loader)
    labels = [
        y.reshape(-1)
        for _, y in subset.batches_of(
            train_loader, range(N), la.dict_key_x, la.dict_key_y, "cpu"
        )
    ]
    return torch.cat(labels)


def _candidate(value: Any, lik: OutputLikelihood) -> tuple[float, float | None]:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != 2:
            raise ValueError(
                "A grid candidate is a prior precision or a (prior_precision, "
                f"sigma_noise) pair; got {value!r}."
            )
        if not lik.has_noise:
            raise ValueError(
                "(prior_precision, sigma_noise) pairs tune the noise of regression; "
                f"with likelihood={lik.name!r} give prior precisions only."
            )
        return (
            check_scalar_hyper(value[0], "prior_precision"),
            check_scalar_hyper(value[1], "sigma_noise"),
        )
    return check_scalar_hyper(value, "prior_precision"), None


#: what a fit sets, restored when it fails
_FITTED_STATE = (
    "dual_directions",
    "feature_gram",
    "n_data",
    "n_outputs",
    "fitted",
    "fit_history_",
    "_posterior_cache",
)


def _empty_history() -> dict[str, list[Any]]:
    return {"processed_examples": [], "val_nll": [], "tuning": []}


def _copy_history(history: dict[str, list[Any]]) -> dict[str, list[Any]]:
    return {
        key: [dict(v) if isinstance(v, dict) else v for v in values]
        for key, values in history.items()
    }


def _is_one(value: Any) -> bool:
    return (
        bool(torch.as_tensor(value).eq(1).all()) and torch.as_tensor(value).numel() == 1
    )


def _finite_positive(value: float) -> bool:
    return value > 0 and value != float("inf")


__all__ = ["ELLA"]
