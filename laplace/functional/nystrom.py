r"""ELLA's Nyström feature map of the linearized network's kernel, and the Gaussian
posterior over its features: the pure functions of the accelerated linearized
Laplace approximation (Deng, Zhou and Zhu, 2022).

The linearized network ``f(x) = f_MAP(x) + J(x) (theta - theta_MAP)`` with the prior
``theta ~ N(0, I / delta)`` is a Gaussian process whose kernel is
``kappa(x, x') = J(x) J(x')^T / delta``. ELLA approximates it from ``M`` basis rows
``J_M`` ``(M, P)`` (one output coordinate of each basis input): with the eigenpairs
``K U = U Lambda`` of ``K = J_M J_M^T`` and the ``k`` largest (positive) kept, the
directions ``V = J_M^T U_k Lambda_k^{-1/2}`` ``(P, k)`` give the features
``phi(x) = V^T J(x)^T / sqrt(delta)`` ``(k, C)``, whose inner products are the
Nyström kernel ``kappa(x, X_M) K_k^+ kappa(X_M, x')``. Here ``V`` is computed for a
unit prior precision and ``delta`` applied where it enters, so that tuning it needs
no new basis.

On the features, ``f(x) = f_MAP(x) + phi(x)^T beta`` with ``beta ~ N(0, I)``; the data
add ``G = sum_n Phi_n^T Lambda_n Phi_n`` (``Phi_n = J_n V`` ``(C, k)``, ``Lambda_n``
the output Hessian of example ``n``, before the likelihood's factor ``h = 1 /
(sigma^2 T)``), so that the posterior covariance of the outputs is

$$
    \operatorname{Cov} f(x) = J(x) V (\delta I + h G)^{-1} V^T J(x)^T .
$$

When the basis spans the parameters' directions seen by the data (all training
inputs and output coordinates, every positive eigen-direction, ``P <= rank``), this
is the exact linearized Laplace posterior ``J(x) (h J^T Lambda J + delta I)^{-1}
J(x)^T``.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def basis_inputs(
    n_data: int, subsample_size: int, seed: int, labels: Tensor | None = None
) -> Tensor:
    """The ``subsample_size`` training inputs (indices into the data set) of the
    basis, drawn as laplace-torch 0.3's ELLA draws them (observed by running it):
    the first ``subsample_size`` of a random permutation of the data seeded with
    ``seed``, so that the same seed gives the same basis in both libraries and a
    smaller subsample is a prefix of a larger one. Drawn on the CPU whatever the
    model's device (they index the data set; a CUDA generator draws another
    stream), independent of the global random state.

    With the class ``labels`` ``(n_data,)`` of the data (balanced sampling), the
    permutation is walked taking each input while its class is below an even
    share of ``subsample_size`` (classes in the order of their first appearance,
    the first ``subsample_size mod n_classes`` one more); the shares of classes
    with too few data go to the earliest inputs left.

    Raises
    ------
    ValueError
        if ``subsample_size`` is not in ``1..n_data``.
    """
    if not 1 <= subsample_size <= n_data:
        raise ValueError(
            f"subsample_size must be between 1 and the training set size {n_data}; "
            f"got {subsample_size}."
        )
    order = torch.randperm(n_data, generator=torch.Generator().manual_seed(seed))
    if labels is None:
        return order[:subsample_size]
    ordered = labels.reshape(-1)[order].tolist()
    classes = list(dict.fromkeys(ordered))
    q, r = divmod(subsample_size, len(classes))
    share = {c: q + (i < r) for i, c in enumerate(classes)}
    picked, rest = [], []
    for index, label in zip(order.tolist(), ordered):
        if share[label] > 0:
            share[label] -= 1
            picked.append(index)
        else:
            rest.append(index)
    picked += rest[: subsample_size - len(picked)]
    return torch.tensor(picked, dtype=order.dtype)


def basis_coordinates(subsample_size: int, n_outputs: int, seed: int) -> Tensor:
    """The output coordinate of each basis input whose Jacobian row enters the
    basis: uniform over the ``n_outputs``, seeded with ``seed + 1`` (laplace-torch
    0.3's rule, observed), on the CPU and independent of the global random
    state."""
    return torch.randint(
        n_outputs, (subsample_size,), generator=torch.Generator().manual_seed(seed + 1)
    )


def nystrom_basis(J_M: Tensor, n_eigenvalues: int) -> tuple[Tensor, Tensor]:
    """``(V, eigenvalues)``: the directions ``V`` ``(P, k)`` of the ``k =
    n_eigenvalues`` largest eigenvalues of ``K = J_M J_M^T`` (a unit prior
    precision), ``V = J_M^T U_k Lambda_k^{-1/2}``, and those eigenvalues in
    descending order.

    Raises
    ------
    ValueError
        if ``n_eigenvalues`` is not in ``1..M``, or if fewer than ``n_eigenvalues``
        eigenvalues are positive beyond round-off (``M eps`` times the largest):
        a numerically rank-deficient basis cannot supply them.
    """
    if J_M.dim() != 2:
        raise ValueError(
            f"J_M must hold one Jacobian row per basis point, shape (M, P); got "
            f"shape {tuple(J_M.shape)}."
        )
    M = J_M.shape[0]
    if not 1 <= n_eigenvalues <= M:
        raise ValueError(
            f"n_eigenvalues must be between 1 and the basis size {M}; got "
            f"{n_eigenvalues}."
        )
    K = J_M @ J_M.T
    values, vectors = torch.linalg.eigh(K)  # ascending
    values, vectors = values.flip(0), vectors.flip(1)
    tol = M * torch.finfo(values.dtype).eps * values[0].clamp_min(0)
    positive = int((values > tol).sum())
    if positive < n_eigenvalues:
        raise ValueError(
            f"The basis of {M} rows is numerically rank-deficient: it has "
            f"{positive} positive kernel eigenvalues (beyond round-off, "
            f"{float(tol):.3g}), fewer than n_eigenvalues={n_eigenvalues}. Lower "
            "n_eigenvalues or draw a larger or more diverse subsample."
        )
    values, vectors = values[:n_eigenvalues], vectors[:, :n_eigenvalues]
    return J_M.T @ (vectors / values.sqrt()), values


def project(V: Tensor, J: Tensor) -> Tensor:
    """``Phi = J V``: the features (at a unit prior precision) of Jacobians ``J``
    ``(..., C, P)``, shape ``(..., C, k)``."""
    return J @ V


def feature_gram(Phi: Tensor, hessians: Tensor) -> Tensor:
    """``G = sum_n Phi_n^T Lambda_n Phi_n`` ``(k, k)`` for features ``Phi``
    ``(N, C, k)`` and output Hessians ``Lambda`` ``(N, C, C)``."""
    return torch.einsum("nck,ncd,ndl->kl", Phi, hessians, Phi)


def precision_cholesky(G: Tensor, prior_precision: float | Tensor, h: float | Tensor):
    """The lower Cholesky factor of the features' posterior precision ``delta I + h
    G`` (``delta`` the prior precision, ``h`` the likelihood's factor)."""
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return torch.linalg.cholesky(prior_precision * eye + h * G)


def functional_covariance(Phi: Tensor, L: Tensor) -> Tensor:
    """The joint covariance ``(B C, B C)`` of the outputs at features ``Phi``
    ``(B, C, k)``: ``Phi (delta I + h G)^{-1} Phi^T`` with ``L`` its Cholesky
    factor."""
    W = torch.linalg.solve_triangular(L, Phi.reshape(-1, Phi.shape[-1]).T, upper=False)
    return W.T @ W


def functional_variance(Phi: Tensor, L: Tensor) -> Tensor:
    """The covariance ``(B, C, C)`` of each input's outputs (the diagonal blocks of
    ``functional_covariance``)."""
    B, C, k = Phi.shape
    W = torch.linalg.solve_triangular(L, Phi.reshape(-1, k).T, upper=False)
    W = W.T.reshape(B, C, k)
    return W @ W.mT


__all__ = [
    "basis_inputs",
    "basis_coordinates",
    "nystrom_basis",
    "project",
    "feature_gram",
    "precision_cholesky",
    "functional_covariance",
    "functional_variance",
]
