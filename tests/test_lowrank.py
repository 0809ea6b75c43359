"""LowRankPlusDiagonal and top_eigenpairs against dense torch.linalg oracles.

Every oracle builds the dense ``P = U diag(l) U^T + diag(d)`` itself (``dense``
below) and uses torch.linalg on it; nothing here calls ``to_matrix`` for an oracle.
"""

import warnings

import pytest
import torch
from torch.testing import assert_close

from laplace.utils.lowrank import LowRankPlusDiagonal, top_eigenpairs

DTYPE = torch.float64
P, K = 9, 3
CASES = ["orthonormal", "general", "zero_eigenvalue"]


def make_parts(case="orthonormal", seed=0, n=P, k=K):
    """``U`` (n, k), ``l`` (k,) >= 0 and ``d`` (n,) > 0 in float64."""
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(n, k, generator=g, dtype=DTYPE)
    if case != "general":
        U = torch.linalg.qr(U).Q
    l = 0.5 + 5 * torch.rand(k, generator=g, dtype=DTYPE)
    if case == "zero_eigenvalue":
        l[-1] = 0.0
    d = 0.2 + torch.rand(n, generator=g, dtype=DTYPE)
    return U, l, d


def dense(U, l, d):
    return U @ torch.diag(l) @ U.T + torch.diag(d)


def randn(*shape, seed=1):
    return torch.randn(
        *shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE
    )


# ---- LowRankPlusDiagonal against the dense matrix ----------------------------------


@pytest.mark.parametrize("case", CASES)
def test_dense_form_diag_and_matmul(case):
    U, l, d = make_parts(case)
    A, M = LowRankPlusDiagonal(U, l, d), dense(U, l, d)
    assert (A.num_params, A.rank, A.dtype) == (P, K, DTYPE)
    assert_close(A.to_matrix(), M)
    assert_close(A.diag(), torch.diagonal(M))
    X = randn(P, 4)
    assert_close(A.matmul(X), M @ X)
    assert_close(A.matmul(X[:, 0]), M @ X[:, 0])


@pytest.mark.parametrize("case", CASES)
def test_solve_logdet_inv_diag(case):
    U, l, d = make_parts(case)
    A, M = LowRankPlusDiagonal(U, l, d), dense(U, l, d)
    X = randn(P, 4)
    assert_close(A.solve(X), torch.linalg.solve(M, X))
    assert_close(A.solve(X[:, 1]), torch.linalg.solve(M, X[:, 1]))
    sign, logabsdet = torch.linalg.slogdet(M)
    assert sign == 1
    assert_close(A.logdet(), logabsdet)
    assert_close(A.inv_diag(), torch.diagonal(torch.linalg.inv(M)))


@pytest.mark.parametrize("case", CASES)
def test_inv_square_form(case):
    U, l, d = make_parts(case)
    A, Minv = LowRankPlusDiagonal(U, l, d), torch.linalg.inv(dense(U, l, d))
    J = randn(5, 2, P)
    expected = torch.stack([Jn @ Minv @ Jn.T for Jn in J])
    assert_close(A.inv_square_form(J), expected)
    assert_close(A.inv_square_form(J[0]), J[0] @ Minv @ J[0].T)


def test_scalar_diagonal_is_broadcast():
    U, l, _ = make_parts()
    for d in (0.7, torch.tensor(0.7, dtype=DTYPE), torch.tensor([0.7], dtype=DTYPE)):
        A = LowRankPlusDiagonal(U, l, d)
        assert_close(A.diagonal, torch.full((P,), 0.7, dtype=DTYPE))
        assert_close(A.logdet(), torch.linalg.slogdet(dense(U, l, A.diagonal))[1])


def test_with_diagonal_and_scaled():
    U, l, d = make_parts()
    A = LowRankPlusDiagonal(U, l, d)
    d_new = 2.0 + d.flip(0)
    B = A.with_diagonal(d_new)
    assert_close(B.logdet(), torch.linalg.slogdet(dense(U, l, d_new))[1])
    assert_close(B.inv_diag(), torch.diagonal(torch.linalg.inv(dense(U, l, d_new))))
    C = A.scaled(0.3)
    X = randn(P, 2)
    assert_close(C.solve(X), torch.linalg.solve(dense(U, 0.3 * l, d), X))
    assert_close(C.logdet(), torch.linalg.slogdet(dense(U, 0.3 * l, d))[1])
    assert_close(A.scaled(0.0).logdet(), torch.log(d).sum())
    # A is unchanged.
    assert_close(A.logdet(), torch.linalg.slogdet(dense(U, l, d))[1])


def test_detach_and_to():
    U, l, d = make_parts()
    d = d.clone().requires_grad_(True)
    A = LowRankPlusDiagonal(U, l, d)
    assert A.logdet().requires_grad
    assert not A.detach().logdet().requires_grad
    A32 = A.detach().to(torch.float32)
    assert A32.dtype == torch.float32
    assert A32.logdet().dtype == torch.float32
    assert_close(A32.logdet().double(), A.logdet().detach(), rtol=1e-5, atol=1e-5)


# ---- gradients ---------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_gradients_match_dense(case):
    """d/dd and d/dl of log det P + x^T P^{-1} x + sum(J P^{-1} J^T)."""
    U, l0, d0 = make_parts(case)
    x, J = randn(P, seed=2), randn(3, 2, P, seed=3)

    def grads(objective):
        l = l0.clone().requires_grad_(True)
        d = d0.clone().requires_grad_(True)
        torch.autograd.backward(objective(l, d))
        return l.grad, d.grad

    def structured(l, d):
        A = LowRankPlusDiagonal(U, l, d)
        return A.logdet() + x @ A.solve(x) + A.inv_square_form(J).sum()

    def oracle(l, d):
        M = dense(U, l, d)
        quad = x @ torch.linalg.solve(M, x)
        forms = torch.einsum("ncp,pq,nbq->", J, torch.linalg.inv(M), J)
        return torch.linalg.slogdet(M)[1] + quad + forms

    g_l, g_d = grads(structured)
    o_l, o_d = grads(oracle)
    assert torch.isfinite(g_l).all() and torch.isfinite(g_d).all()
    assert_close(g_l, o_l)
    assert_close(g_d, o_d)


def test_gradients_through_with_diagonal_and_scaled():
    """Marginal-likelihood style use: a fixed fit, a prior and a scale to optimise."""
    U, l, d0 = make_parts()
    base = LowRankPlusDiagonal(U, l, d0)

    def run(build):
        log_prior = torch.zeros(P, dtype=DTYPE, requires_grad=True)
        log_c = torch.tensor(0.2, dtype=DTYPE, requires_grad=True)
        build(log_prior.exp(), log_c.exp()).backward()
        return log_prior.grad, log_c.grad

    def structured(d, c):
        return base.with_diagonal(d).scaled(c).logdet()

    def oracle(d, c):
        return torch.linalg.slogdet(dense(U, c * l, d))[1]

    for g, o in zip(run(structured), run(oracle)):
        assert_close(g, o)


def test_cache_does_not_break_autograd():
    """Values computed without grad are not reused for graphs, and graphs can be
    rebuilt for repeated backward passes."""
    U, l, d = make_parts()
    d = d.clone().requires_grad_(True)
    A = LowRankPlusDiagonal(U, l, d)
    with torch.no_grad():
        value = A.logdet()
    for _ in range(2):
        d.grad = None
        A.logdet().backward()
        assert d.grad is not None
    M = dense(U, l, d)
    expected = torch.autograd.grad(torch.linalg.slogdet(M)[1], d)[0]
    assert_close(d.grad, expected)
    assert_close(value, torch.linalg.slogdet(M)[1].detach())


# ---- sampling ----------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_sampling_factor_is_exact(case):
    """F = inv_factor_matmul(I) satisfies F F^T = P^{-1} to 1e-10."""
    U, l, d = make_parts(case)
    A = LowRankPlusDiagonal(U, l, d)
    F = A.inv_factor_matmul(torch.eye(P, dtype=DTYPE))
    assert_close(F @ F.T, torch.linalg.inv(dense(U, l, d)), rtol=0, atol=1e-10)
    v = randn(P)
    assert_close(A.inv_factor_matmul(v), F @ v)


def test_sampling_factor_exact_when_rank_exceeds_size():
    """k > P (U wide, reduced QR gives Q of shape (P, P))."""
    g = torch.Generator().manual_seed(4)
    U = torch.randn(4, 6, generator=g, dtype=DTYPE)
    l, d = torch.rand(6, generator=g, dtype=DTYPE), 0.5 + torch.rand(4, dtype=DTYPE)
    F = LowRankPlusDiagonal(U, l, d).inv_factor_matmul(torch.eye(4, dtype=DTYPE))
    assert_close(F @ F.T, torch.linalg.inv(dense(U, l, d)), rtol=0, atol=1e-10)


def test_sample_statistics():
    """20k draws, P = 6: every entry of the sample mean within 5 standard errors
    (sqrt(S_ii / n)) of 0 and of the sample covariance within 5 standard errors
    (sqrt((S_ii S_jj + S_ij^2) / n), Gaussian fourth moments) of S = P^{-1}."""
    n = 20_000
    U, l, d = make_parts(n=6, k=2, seed=5)
    A = LowRankPlusDiagonal(U, l, d)
    samples = A.sample(n, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (n, 6)
    Sigma = torch.linalg.inv(dense(U, l, d))
    var = torch.diagonal(Sigma)
    assert (samples.mean(0).abs() <= 5 * (var / n).sqrt()).all()
    cov = torch.cov(samples.T)
    se = ((var[:, None] * var[None, :] + Sigma**2) / n).sqrt()
    assert ((cov - Sigma).abs() <= 5 * se).all()


def test_sample_is_reproducible_with_generator():
    A = LowRankPlusDiagonal(*make_parts())
    s1 = A.sample(3, generator=torch.Generator().manual_seed(0))
    s2 = A.sample(3, generator=torch.Generator().manual_seed(0))
    assert s1.shape == (3, P)
    assert_close(s1, s2, rtol=0, atol=0)


# ---- top_eigenpairs ----------------------------------------------------------------


def spectrum_operator(n=400, top=(10.0, 8.0, 8.0, 5.0, 4.0), seed=7):
    """Symmetric PSD ``Q diag(lam) Q^T``: ``top`` then eigenvalues in [0, 1)."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DTYPE)).Q
    rest = torch.rand(n - len(top), generator=g, dtype=DTYPE)
    lam = torch.cat([torch.tensor(top, dtype=DTYPE), rest])
    return (Q * lam) @ Q.T


def counting(H):
    calls = []

    def matmat(X):
        calls.append(X.shape[1])
        return H @ X

    return matmat, calls


def projector(V):
    return V @ V.T


@pytest.mark.parametrize("method", ["lanczos", "randomized"])
def test_top_eigenpairs_match_eigh(method):
    """Eigenvalues to 1e-8 relative and the projector onto the top-5 space to 1e-8
    (the top space contains a double eigenvalue, so single vectors are not unique)."""
    H, k = spectrum_operator(), 5
    matmat, calls = counting(H)
    g = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lam, V = top_eigenpairs(matmat, 400, k, dtype=DTYPE, method=method, generator=g)
    evals, evecs = torch.linalg.eigh(H)
    assert lam.shape == (k,) and V.shape == (400, k) and V.dtype == DTYPE
    assert (lam[:-1] >= lam[1:]).all()
    assert_close(lam, evals.flip(0)[:k], rtol=1e-8, atol=0)
    assert_close(projector(V), projector(evecs[:, -k:]), rtol=0, atol=1e-8)
    assert_close(V.T @ V, torch.eye(k, dtype=DTYPE), rtol=0, atol=1e-12)
    # Every call got a block of k + oversampling columns; Lanczos converged long
    # before its basis could fill the space.
    assert set(calls) == {15}
    if method == "lanczos":
        assert 15 * len(calls) <= 400 // 2


@pytest.mark.parametrize("method", ["lanczos", "randomized"])
def test_top_eigenpairs_rank_deficient_operator(method):
    """Rank 2 < k = 4: the extra eigenvalues are 0 (clamped, never negative)."""
    g = torch.Generator().manual_seed(8)
    B = torch.randn(60, 2, generator=g, dtype=DTYPE)
    H = B @ B.T
    lam, V = top_eigenpairs(
        lambda X: H @ X, 60, 4, dtype=DTYPE, method=method, generator=g
    )
    evals, evecs = torch.linalg.eigh(H)
    assert (lam >= 0).all()
    assert_close(lam[:2], evals.flip(0)[:2], rtol=1e-10, atol=0)
    assert_close(lam[2:], torch.zeros(2, dtype=DTYPE), rtol=0, atol=1e-10 * lam[0])
    assert_close(projector(V[:, :2]), projector(evecs[:, -2:]), rtol=0, atol=1e-10)
    assert_close(H @ V, V * lam, rtol=0, atol=1e-10 * lam[0])


@pytest.mark.parametrize("method", ["lanczos", "randomized"])
def test_top_eigenpairs_full_rank_request(method):
    """k = P returns the whole eigendecomposition."""
    H = spectrum_operator(n=8, top=(3.0, 2.0))
    g = torch.Generator().manual_seed(1)
    lam, V = top_eigenpairs(
        lambda X: H @ X, 8, 8, dtype=DTYPE, method=method, generator=g
    )
    assert_close(lam, torch.linalg.eigvalsh(H).flip(0))
    assert_close(V @ torch.diag(lam) @ V.T, H)


def test_top_eigenpairs_float32_and_reproducible():
    H = spectrum_operator()
    H32 = H.float()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = torch.Generator().manual_seed(2)
        lam, _ = top_eigenpairs(
            lambda X: H32 @ X, 400, 3, dtype=torch.float32, generator=g
        )
    assert lam.dtype == torch.float32
    assert_close(lam.double(), torch.linalg.eigvalsh(H).flip(0)[:3], rtol=1e-4, atol=0)
    runs = [
        top_eigenpairs(
            lambda X: H @ X,
            400,
            3,
            dtype=DTYPE,
            generator=torch.Generator().manual_seed(3),
        )
        for _ in range(2)
    ]
    assert_close(runs[0][0], runs[1][0], rtol=0, atol=0)
    assert_close(runs[0][1], runs[1][1], rtol=0, atol=0)


def test_top_eigenpairs_warns_when_not_converged():
    H = spectrum_operator()
    with pytest.warns(RuntimeWarning, match="n_iter=1"):
        top_eigenpairs(
            lambda X: H @ X, 400, 5, dtype=DTYPE, method="randomized", n_iter=1
        )


# ---- bad input ---------------------------------------------------------------------


def identity_matmat(X):
    return X


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"k": 0}, ValueError, "k must be between 1 and 5"),
        ({"k": 6}, ValueError, "k must be between 1 and 5"),
        ({"k": 2.5}, TypeError, "k must be an int"),
        ({"num_params": 0}, ValueError, "num_params must be >= 1"),
        ({"method": "arnoldi"}, ValueError, "method must be one of"),
        ({"oversampling": -1}, ValueError, "oversampling must be >= 0"),
        ({"n_iter": 0}, ValueError, "n_iter must be >= 1"),
        ({"tol": 0.0}, ValueError, "tol must be a real number > 0"),
        ({"dtype": torch.int64}, ValueError, "dtype must be a floating"),
        ({"matmat": lambda X: X[:-1]}, ValueError, "matmat must map a tensor"),
        ({"matmat": lambda X: X * float("nan")}, ValueError, "non-finite"),
        ({"matmat": None}, TypeError, "matmat must be callable"),
    ],
)
def test_top_eigenpairs_bad_input(kwargs, error, match):
    args = {"matmat": identity_matmat, "num_params": 5, "k": 2, "dtype": DTYPE}
    args.update(kwargs)
    matmat, n, k = args.pop("matmat"), args.pop("num_params"), args.pop("k")
    with pytest.raises(error, match=match):
        top_eigenpairs(matmat, n, k, **args)


def test_constructor_bad_input():
    U, l, d = make_parts()
    cases = [
        ((U[:, 0], l, d), "U must be a floating tensor of shape"),
        ((U.long(), l, d), "U must be a floating tensor of shape"),
        ((U, l[:2], d), r"eigenvalues must be a tensor of shape \(3,\)"),
        ((U, l, d[:4]), r"diagonal must be a tensor of shape \(9,\)"),
        ((U, l.float(), d), "eigenvalues must have the dtype"),
        ((U, -l, d), "eigenvalues must be finite and >= 0"),
        ((U, l, d - 5), r"diagonal \(the prior precision\) must be finite and > 0"),
        ((U, l, 0.0), r"diagonal \(the prior precision\) must be finite and > 0"),
        ((U, l, d * float("nan")), "diagonal .* must be finite"),
        ((U * float("inf"), l, d), "U must have P >= 1 rows and be finite"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            LowRankPlusDiagonal(*args)


def test_method_bad_input():
    A = LowRankPlusDiagonal(*make_parts())
    with pytest.raises(ValueError, match=r"X must have shape \(P,\) or \(P, m\)"):
        A.solve(torch.zeros(P + 1, dtype=DTYPE))
    with pytest.raises(ValueError, match=r"X must have shape"):
        A.matmul(torch.zeros(2, P, 1, dtype=DTYPE))
    with pytest.raises(ValueError, match="X must have dtype torch.float64"):
        A.solve(torch.zeros(P, dtype=torch.float32))
    with pytest.raises(TypeError, match="X must be a tensor"):
        A.inv_factor_matmul([0.0] * P)
    with pytest.raises(ValueError, match=r"J must have shape \(N, C, P\) or \(C, P\)"):
        A.inv_square_form(torch.zeros(2, 3, P - 1, dtype=DTYPE))
    with pytest.raises(ValueError, match="c must be finite and >= 0"):
        A.scaled(-1.0)
    with pytest.raises(ValueError, match="c must be a scalar"):
        A.scaled(torch.ones(2, dtype=DTYPE))
    with pytest.raises(ValueError, match="n_samples must be >= 1"):
        A.sample(0)
    with pytest.raises(ValueError, match="diagonal .* must be finite and > 0"):
        A.with_diagonal(torch.zeros(P, dtype=DTYPE))
