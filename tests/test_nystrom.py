"""ELLA's Nyström features and feature-space posterior (``laplace.functional.
nystrom``) against dense oracles in float64: the eigendecomposition of the kernel
matrix, the Nyström kernel, and the exact linearized Laplace posterior when the
basis spans every direction the data see."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from laplace.functional import nystrom
from tests import oracles


def _rows(n, p, rank=None, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(n, p, generator=g, dtype=torch.float64).to(device)
    A = torch.randn(n, rank, generator=g, dtype=torch.float64)
    B = torch.randn(rank, p, generator=g, dtype=torch.float64)
    return (A @ B).to(device)


def test_the_basis_holds_the_largest_eigenpairs_of_the_kernel_matrix(device):
    J_M = _rows(6, 10, device=device)
    V, values = nystrom.nystrom_basis(J_M, 4)
    dense_values, dense_vectors = torch.linalg.eigh(J_M @ J_M.T)
    top = dense_values.flip(0)[:4]
    torch.testing.assert_close(values, top)
    U = dense_vectors.flip(1)[:, :4]
    # the basis rows' features reproduce the kernel's top-4 part U_k Lambda_k U_k^T
    Phi = nystrom.project(V, J_M)
    torch.testing.assert_close(Phi @ Phi.T, U @ torch.diag(top) @ U.T)
    assert V.shape == (10, 4)


def test_features_give_the_nystrom_kernel_at_any_inputs(device):
    """``J(x) V V^T J(y)^T = kappa(x, X_M) K_k^+ kappa(X_M, y)``."""
    J_M = _rows(6, 10, device=device)
    Jx, Jy = _rows(3, 10, seed=1, device=device), _rows(2, 10, seed=2, device=device)
    V, _ = nystrom.nystrom_basis(J_M, 5)
    values, vectors = torch.linalg.eigh(J_M @ J_M.T)
    U, lam = vectors.flip(1)[:, :5], values.flip(0)[:5]
    pinv = U @ torch.diag(1 / lam) @ U.T
    expected = (Jx @ J_M.T) @ pinv @ (J_M @ Jy.T)
    torch.testing.assert_close(
        nystrom.project(V, Jx) @ nystrom.project(V, Jy).T, expected
    )


def test_a_rank_deficient_basis_cannot_supply_more_directions_than_its_rank(device):
    J_M = _rows(6, 10, rank=3, device=device)
    V, values = nystrom.nystrom_basis(J_M, 3)
    assert V.shape == (10, 3) and bool((values > 0).all())
    with pytest.raises(ValueError, match=r"rank-deficient: it has 3 positive"):
        nystrom.nystrom_basis(J_M, 4)
    with pytest.raises(ValueError, match=r"n_eigenvalues must be between 1 and .* 6"):
        nystrom.nystrom_basis(J_M, 7)
    with pytest.raises(ValueError, match=r"n_eigenvalues must be between 1"):
        nystrom.nystrom_basis(J_M, 0)
    with pytest.raises(ValueError, match=r"J_M must hold one Jacobian row"):
        nystrom.nystrom_basis(J_M[None], 2)


def _model_and_data(likelihood, device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2))
    model = model.to(device, torch.float64)
    g = torch.Generator().manual_seed(3)
    X = torch.randn(20, 2, generator=g, dtype=torch.float64).to(device)
    x = torch.randn(5, 2, generator=g, dtype=torch.float64).to(device)
    return model, X, x


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_a_basis_of_every_training_row_gives_the_exact_linearized_laplace(
    likelihood, device
):
    """All training inputs and output coordinates as the basis and every positive
    direction (P = 17 <= rank): the feature posterior's covariance is the exact
    ``J(x) (h J^T Lambda J + delta I)^{-1} J(x)^T``, joint and per input."""
    model, X, x = _model_and_data(likelihood, device)
    J_X, J_x = oracles.jacobian(model, X), oracles.jacobian(model, x)
    with torch.no_grad():
        Lam = oracles.output_hessian(likelihood, model(X))
    P = J_X.shape[-1]
    delta, h = 0.7, 1 / 0.5**2
    V, _ = nystrom.nystrom_basis(J_X.reshape(-1, P), P)
    G = nystrom.feature_gram(nystrom.project(V, J_X), Lam)
    L = nystrom.precision_cholesky(G, delta, h)
    Phi = nystrom.project(V, J_x)
    ggn = torch.einsum("ncp,ncd,ndq->pq", J_X, Lam, J_X)
    eye = torch.eye(P, dtype=ggn.dtype, device=device)
    Sigma = torch.linalg.inv(h * ggn + delta * eye)
    flat = J_x.reshape(-1, P)
    torch.testing.assert_close(
        nystrom.functional_covariance(Phi, L), flat @ Sigma @ flat.T
    )
    torch.testing.assert_close(
        nystrom.functional_variance(Phi, L), J_x @ Sigma @ J_x.mT
    )


def test_fewer_directions_give_the_nystrom_kernels_gp_posterior(device):
    """A basis of 6 training rows and 4 directions: the feature posterior is the
    GP posterior of the Nyström kernel ``kappa_k`` given all the training data,
    ``kappa_k(x, x) - kappa_k(x, X) (Lambda^{-1} / h + kappa_k(X, X))^{-1}
    kappa_k(X, x)`` (regression, ``Lambda = I``)."""
    model, X, x = _model_and_data("regression", device)
    J_X, J_x = oracles.jacobian(model, X), oracles.jacobian(model, x)
    P = J_X.shape[-1]
    delta, h = 2.0, 1 / 0.3**2
    J_M = J_X[:3].reshape(-1, P)
    V, _ = nystrom.nystrom_basis(J_M, 4)
    Lam = torch.eye(2, dtype=J_X.dtype, device=device).expand(20, 2, 2)
    L = nystrom.precision_cholesky(
        nystrom.feature_gram(nystrom.project(V, J_X), Lam), delta, h
    )

    def kappa(A, B):  # the Nystrom kernel at prior precision delta
        return (A @ V) @ (B @ V).T / delta

    A, B = J_x.reshape(-1, P), J_X.reshape(-1, P)
    noise = torch.eye(B.shape[0], dtype=B.dtype, device=device) / h
    expected = kappa(A, A) - kappa(A, B) @ torch.linalg.solve(
        noise + kappa(B, B), kappa(B, A)
    )
    got = nystrom.functional_covariance(nystrom.project(V, J_x), L)
    torch.testing.assert_close(got, expected)


def test_basis_rows_are_a_seeded_permutations_prefix_and_seeded_coordinates():
    """The rule laplace-torch 0.3's ELLA was observed to follow
    (tests/compat/ella_valla_facts.md): the same seed, the same rows whatever the
    global random state; a smaller subsample, a prefix."""
    torch.manual_seed(123)
    inputs = nystrom.basis_inputs(20, 6, seed=1234)
    coords = nystrom.basis_coordinates(6, 3, seed=1234)
    torch.manual_seed(7)
    again = nystrom.basis_inputs(20, 6, seed=1234)
    coords_again = nystrom.basis_coordinates(6, 3, seed=1234)
    assert torch.equal(inputs, again) and torch.equal(coords, coords_again)
    expected = torch.randperm(20, generator=torch.Generator().manual_seed(1234))[:6]
    assert torch.equal(inputs, expected)
    expected = torch.randint(3, (6,), generator=torch.Generator().manual_seed(1235))
    assert torch.equal(coords, expected)
    assert sorted(set(inputs.tolist())) == sorted(inputs.tolist())  # distinct
    fewer = nystrom.basis_inputs(20, 4, seed=1234)
    assert torch.equal(fewer, inputs[:4])
    assert torch.equal(nystrom.basis_coordinates(4, 3, seed=1234), coords[:4])
    assert not torch.equal(nystrom.basis_inputs(20, 6, seed=1), inputs)
    assert not nystrom.basis_coordinates(6, 1, seed=1234).any()  # one output: 0
    with pytest.raises(ValueError, match=r"subsample_size must be between 1 and .* 20"):
        nystrom.basis_inputs(20, 21, seed=0)


def test_balanced_basis_inputs_take_even_shares_of_the_classes_in_seeded_order():
    order = torch.randperm(30, generator=torch.Generator().manual_seed(5))
    labels = torch.arange(30) % 3
    picked = nystrom.basis_inputs(30, 7, seed=5, labels=labels)
    assert len(set(picked.tolist())) == 7
    counts = torch.bincount(labels[picked], minlength=3).tolist()
    first = list(dict.fromkeys(labels[order].tolist()))
    assert counts[first[0]] == 3 and counts[first[1]] == 2 and counts[first[2]] == 2
    # within a class, the earliest of the permutation
    for c in range(3):
        mine = [i for i in order.tolist() if labels[i] == c][: counts[c]]
        assert sorted(mine) == sorted(i for i in picked.tolist() if labels[i] == c)
    # a class with too few data leaves its share to the earliest others
    rare = torch.zeros(30, dtype=torch.long)
    rare[order[-1]] = 1
    picked = nystrom.basis_inputs(30, 6, seed=5, labels=rare)
    others = [i for i in order.tolist() if i != int(order[-1])][:5]
    assert sorted(picked.tolist()) == sorted([*others, int(order[-1])])


def test_the_smallest_and_largest_sizes_are_accepted():
    assert nystrom.basis_inputs(5, 1, seed=0).shape == (1,)
    assert nystrom.basis_inputs(5, 5, seed=0).sort().values.tolist() == list(range(5))
    J_M = _rows(4, 6)
    assert nystrom.nystrom_basis(J_M, 1)[0].shape == (6, 1)
    assert nystrom.nystrom_basis(J_M, 4)[0].shape == (6, 4)


def test_round_off_is_judged_relative_to_the_largest_eigenvalue():
    """``K = diag(1, 1e-17)``: the second eigenvalue is below round-off of the first
    (``2 eps``), so it is not a direction; a tiny but well-conditioned kernel keeps
    all of its directions; a zero kernel has none."""
    J_M = torch.diag(torch.tensor([1.0, 1e-17**0.5], dtype=torch.float64))
    assert nystrom.nystrom_basis(J_M, 1)[1].tolist() == [1.0]
    with pytest.raises(ValueError, match="it has 1 positive kernel eigenvalues"):
        nystrom.nystrom_basis(J_M, 2)
    tiny = 1e-12 * _rows(3, 5)
    V, values = nystrom.nystrom_basis(tiny, 3)
    assert V.shape == (5, 3) and bool((values > 0).all())
    with pytest.raises(ValueError, match="it has 0 positive .* draw a larger or more"):
        nystrom.nystrom_basis(torch.zeros(3, 5, dtype=torch.float64), 1)
