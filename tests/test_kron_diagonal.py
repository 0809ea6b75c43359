"""Diagonal factors and blocks in Kron / KronDecomposed / KronLaplace.

A 1-D factor ``d`` stands for ``diag(d)``. Every operation is compared with the
same operation on the *dense equivalent* (the factors as ``torch.diag(d)``) and with
a dense oracle built here with ``torch.diag`` and ``torch.kron``. KronLaplace is fit
with a stub backend whose Kron has the backend's own layout (diagonal blocks,
diagonal factors, pairs split otherwise than ``(out, in)``), and checked against the
same backend returning the dense equivalent and against dense oracles.
"""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace
from laplace.curvature import CurvlinopsGGN
from laplace.parametric.precision import KronPrecision
from laplace.utils.matrix import Kron, KronDecomposed

DTYPE = torch.float64

# (size, diagonal?) of each factor of each block
SPEC = [
    [(3, True), (4, False)],  # diag(a) (x) G
    [(5, True)],  # a diagonal block
    [(2, False), (3, True)],  # G (x) diag(a)
    [(2, True), (3, True)],  # both factors diagonal
    [(4, False)],  # a dense block
    [(3, False), (2, False)],  # a dense pair
]
N_PARAMS = sum(math.prod(n for n, _ in block) for block in SPEC)


def random_factor(n, diagonal, g, device):
    if diagonal:
        F = torch.rand(n, generator=g, dtype=DTYPE) + 0.2
    else:
        X = torch.randn(n, 2 * n, generator=g, dtype=DTYPE)
        F = X @ X.T / (2 * n) + 0.1 * torch.eye(n, dtype=DTYPE)
    return F.to(device)


def make_kfacs(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[random_factor(n, d, g, device) for n, d in block] for block in SPEC]


def densified(kfacs):
    """The dense equivalent: every 1-D factor as ``torch.diag``."""
    return [[torch.diag(F) if F.ndim == 1 else F for F in block] for block in kfacs]


def oracle(kfacs):
    """Dense block-diagonal matrix, built with torch.diag / torch.kron."""
    blocks = []
    for block in densified(kfacs):
        blocks.append(torch.kron(*block) if len(block) == 2 else block[0])
    return torch.block_diag(*blocks)


def eye(n, like):
    return torch.eye(n, dtype=like.dtype, device=like.device)


def oracle_with_deltas(kfacs, c, deltas, damping):
    """``c H + d`` per block, or the damped ``c (F1 + sqrt(d/c)) (x) (F2 +
    sqrt(d/c))`` for pairs, built by hand from dense factors."""
    blocks = []
    for block, d in zip(densified(kfacs), deltas, strict=True):
        if len(block) == 1:
            blocks.append(c * block[0] + d * eye(len(block[0]), d))
        elif damping:
            s = (d / c).sqrt()
            F1, F2 = block
            blocks.append(
                c * torch.kron(F1 + s * eye(len(F1), d), F2 + s * eye(len(F2), d))
            )
        else:
            K = torch.kron(*block)
            blocks.append(c * K + d * eye(len(K), d))
    return torch.block_diag(*blocks)


def power(M, exponent):
    lam, Q = torch.linalg.eigh(M)
    return (Q * lam**exponent) @ Q.T


def W_batch(device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 2, N_PARAMS, generator=g, dtype=DTYPE).to(device)


# ------------------------------------------------------------------------- Kron
def test_kron_operations_equal_the_dense_oracle(device):
    kfacs = make_kfacs(device)
    kron, dense_kron, M = Kron(kfacs), Kron(densified(kfacs)), oracle(kfacs)
    W = W_batch(device)
    assert_close(kron.to_matrix(), M)
    assert_close(dense_kron.to_matrix(), M)
    assert_close(kron.bmm(W), W @ M.T)
    assert_close(kron.bmm(W[0]), W[0] @ M.T)
    assert_close(kron.bmm(W), dense_kron.bmm(W))
    assert_close(kron.logdet(), torch.linalg.slogdet(M)[1])
    assert_close(kron.logdet(), dense_kron.logdet())
    assert_close(kron.diag(), M.diagonal())
    assert_close(kron.diag(), dense_kron.diag())
    assert kron.block_sizes() == [math.prod(n for n, _ in b) for b in SPEC]


def test_kron_scaling_add_clone(device):
    kfacs, other = make_kfacs(device), make_kfacs(device, seed=5)
    kron = Kron(kfacs)
    c = torch.tensor(2.5, dtype=DTYPE, device=device)
    assert_close((kron * c).to_matrix(), c * oracle(kfacs))
    assert_close((0.5 * kron).to_matrix(), 0.5 * oracle(kfacs))
    summed = [[f + g for f, g in zip(a, b)] for a, b in zip(kfacs, other)]
    assert_close((kron + Kron(other)).to_matrix(), oracle(summed))
    copy = kron.clone()
    copy += Kron(other)
    assert_close(copy.to_matrix(), oracle(summed))
    assert_close(kron.to_matrix(), oracle(kfacs))  # the original is untouched
    # a diagonal factor and its dense form are different layouts
    with pytest.raises(ValueError, match="different factor shapes"):
        kron + Kron(densified(other))


def test_kron_averaged_travels_and_is_checked(device):
    kfacs = make_kfacs(device)
    default = Kron(kfacs).averaged
    assert default == [1 if len(b) == 2 else None for b in SPEC]
    averaged = [0, None, 1, 0, 0, None]
    kron = Kron(kfacs, averaged)
    for derived in (kron.clone(), kron * 2.0, kron + Kron(kfacs, averaged)):
        assert derived.averaged == averaged
    with pytest.raises(ValueError, match="averaged factors differ"):
        kron + Kron(kfacs)
    with pytest.raises(ValueError, match="averaged must hold one entry per block"):
        Kron(kfacs, [2, None, 1, 0, 0, None])  # a pair has no factor 2
    with pytest.raises(ValueError, match="averaged must hold one entry per block"):
        Kron(kfacs, averaged[:-1])


def test_kron_refuses_factors_that_are_neither_vectors_nor_square(device):
    bad = torch.zeros(2, 3, dtype=DTYPE, device=device)
    with pytest.raises(ValueError, match=r"kfacs\[0\]\[1\] must be a square matrix"):
        Kron([[torch.ones(2, dtype=DTYPE, device=device), bad]])
    with pytest.raises(ValueError, match=r"kfacs\[0\]\[0\].*got \(\)"):
        Kron([[torch.ones((), dtype=DTYPE, device=device)]])


# --------------------------------------------------------------- KronDecomposed
def test_decompose_keeps_diagonal_factors_as_vectors(device):
    kfacs = make_kfacs(device)
    K = Kron(kfacs).decompose()
    for block, vecs, vals in zip(kfacs, K.eigenvectors, K.eigenvalues, strict=True):
        for F, Q, lam in zip(block, vecs, vals, strict=True):
            if F.ndim == 1:
                assert Q is None
                assert_close(lam, F)
            else:
                assert Q.shape == F.shape
                assert_close((Q * lam) @ Q.T, F)


def test_decompose_clamps_a_negative_diagonal_factor(device):
    d = torch.tensor([1.0, -0.5, 2.0], dtype=DTYPE, device=device)
    with pytest.warns(UserWarning, match="clearly negative eigenvalues"):
        K = Kron([[d]]).decompose()
    assert_close(K.eigenvalues[0][0], d.clamp(min=0))
    tiny = torch.tensor([1.0, -1e-15, 2.0], dtype=DTYPE, device=device)
    assert_close(Kron([[tiny]]).decompose().eigenvalues[0][0], tiny.clamp(min=0))


@pytest.mark.parametrize("damping", [False, True])
@pytest.mark.parametrize("per_block", [False, True])
@pytest.mark.parametrize("exponent", [1, -1, -0.5, 0.5])
def test_decomposed_operations_equal_the_dense_oracle(
    device, damping, per_block, exponent
):
    kfacs = make_kfacs(device)
    c = torch.tensor(1.7, dtype=DTYPE, device=device)
    if per_block:
        deltas = torch.linspace(0.3, 1.5, len(SPEC), dtype=DTYPE, device=device)
    else:
        deltas = torch.tensor(0.6, dtype=DTYPE, device=device)
    K = Kron(kfacs).decompose(damping=damping) * c + deltas
    K_dense = Kron(densified(kfacs)).decompose(damping=damping) * c + deltas
    M = oracle_with_deltas(kfacs, c, deltas.expand(len(SPEC)), damping)
    Me = power(M, exponent)
    W = W_batch(device)
    assert_close(K.bmm(W, exponent), W @ Me)
    assert_close(K.bmm(W[1], exponent), W[1] @ Me)
    assert_close(K.bmm(W, exponent), K_dense.bmm(W, exponent))
    assert_close(K.diag(exponent), Me.diagonal())
    assert_close(K.diag(exponent), K_dense.diag(exponent))
    assert_close(K.to_matrix(exponent), Me)
    assert_close(K.to_matrix(exponent), K_dense.to_matrix(exponent))
    assert_close(K.logdet(), torch.linalg.slogdet(M)[1])
    assert_close(K.logdet(), K_dense.logdet())
    assert_close(K.inv_square_form(W), W @ torch.linalg.inv(M) @ W.mT)
    for i in range(len(K)):
        lam = K.block_eigenvalues(i, exponent).flatten().sort().values
        lam_dense = K_dense.block_eigenvalues(i, exponent).flatten().sort().values
        assert_close(lam, lam_dense)
    assert K.block_sizes() == Kron(kfacs).block_sizes()


def test_decomposed_detach_and_deltas(device):
    kfacs = make_kfacs(device)
    for block in kfacs:
        for F in block:
            F.requires_grad_(True)
    K = Kron(kfacs).decompose() * torch.tensor(2.0, dtype=DTYPE, device=device)
    detached = (K + 0.5).detach()
    assert all(
        Q is None or not Q.requires_grad for b in detached.eigenvectors for Q in b
    )
    assert not any(lam.requires_grad for b in detached.eigenvalues for lam in b)
    M = oracle_with_deltas(
        [[F.detach() for F in b] for b in kfacs],
        torch.tensor(2.0, dtype=DTYPE, device=device),
        torch.full((len(SPEC),), 0.5, dtype=DTYPE, device=device),
        damping=False,
    )
    assert_close(detached.to_matrix(), M)
    assert isinstance(detached, KronDecomposed)


def test_no_dense_diagonal_factor_is_formed(device, monkeypatch):
    """An embedding ``diag(a) (x) G`` with 50,000 tokens and a (65 * 256) diagonal
    block: every operation but ``to_matrix`` runs with torch.diag / eye / kron
    forbidden (dense forms would need 10^10 entries)."""
    g = torch.Generator().manual_seed(3)
    V, D, n_pos = 50_000, 4, 65 * 256
    a = (torch.rand(V, generator=g) + 0.1).to(device, torch.float32)
    G = random_factor(D, False, g, device).float()
    d = (torch.rand(n_pos, generator=g) + 0.1).to(device, torch.float32)
    W = torch.randn(2, V * D + n_pos, generator=g).to(device, torch.float32)

    def forbidden(*args, **kwargs):
        raise AssertionError("a dense matrix was formed")

    for name in ("diag", "eye", "kron", "diag_embed"):
        monkeypatch.setattr(torch, name, forbidden)
    kron = Kron([[a, G], [d]], averaged=[0, None])
    HW = kron.bmm(W)
    # (diag(a) (x) G) vec(X) = vec(diag(a) X G^T) for X of shape (V, D)
    X = W[:, : V * D].reshape(2, V, D)
    assert_close(HW[:, : V * D], (a[:, None] * X @ G.T).reshape(2, -1))
    assert_close(HW[:, V * D :], W[:, V * D :] * d)
    expected = D * a.double().log().sum() + V * torch.logdet(G.double())
    expected = expected + d.double().log().sum()
    assert_close(kron.logdet().double(), expected, rtol=1e-5, atol=1e-3)
    assert_close(kron.diag()[V * D :], d)
    total = kron + kron.clone() * 2.0
    K = total.decompose(damping=True) + 0.1
    assert K.eigenvectors[0][0] is None and K.eigenvectors[1][0] is None
    # powers compose, and the square form and diagonal agree with them
    half = K.bmm(W, -0.5)
    assert_close(K.bmm(half, -0.5), K.bmm(W, -1), rtol=1e-4, atol=1e-5)
    assert_close(K.bmm(K.bmm(W, -1), 1), W, rtol=1e-4, atol=1e-4)
    assert_close(K.inv_square_form(W), half @ half.T, rtol=1e-4, atol=1e-4)
    e = torch.zeros(1, W.shape[-1], device=device)
    e[0, 7] = 1.0
    assert_close(K.diag(-1)[7], K.bmm(e, -1)[0, 7])
    assert torch.isfinite(K.logdet())


# ------------------------------------------------------------------- KronLaplace
# A layout per parameter of nn.Sequential(nn.Linear(3, 4), nn.Tanh(),
# nn.Linear(4, 2)) (W1 (4, 3), b1 (4,), W2 (2, 4), b2 (2,)): its factors
# (size, diagonal?) and the position of the data-averaged factor.
LAYOUTS = {
    # (out, in) pairs with diagonal factors: the glm predictive's factor route
    "out_in": [
        ([(4, True), (3, False)], 1),
        ([(4, True)], None),
        ([(2, False), (4, True)], 1),
        ([(2, False)], None),
    ],
    # a diagonal block for a weight, a pair of diagonals: still the factor route
    "diag_weight": [
        ([(12, True)], None),
        ([(4, False)], None),
        ([(2, True), (4, True)], 1),
        ([(2, True)], None),
    ],
    # a dense single block for a weight: no (out, in) eigenbasis, Jacobian route
    "dense_weight": [
        ([(12, False)], None),
        ([(4, True)], None),
        ([(2, False), (4, False)], 1),
        ([(2, False)], None),
    ],
    # the backend's own splits: a pair over a bias, W2 viewed as (4, 2) with the
    # averaged diagonal factor first
    "backend": [
        ([(4, False), (3, True)], 1),
        ([(2, True), (2, True)], 0),
        ([(4, True), (2, False)], 0),
        ([(2, True)], None),
    ],
}
#: layouts whose blocks all have an (out, in) eigenbasis
FACTOR_ROUTE = {"out_in", "diag_weight"}


def layout_kron(layout, x, N, densify=False):
    """A data-dependent Kron: summed factors ``sum_n u u^T`` (``sum_n u^2`` when
    diagonal) of features ``u = tanh(x R)``, the averaged one divided by ``N``."""
    blocks, averaged = [], []
    for i, (factors, mean) in enumerate(layout):
        block = []
        for j, (n, diagonal) in enumerate(factors):
            g = torch.Generator().manual_seed(100 * i + j)
            R = torch.randn(x.shape[1], n, generator=g, dtype=DTYPE).to(x.device)
            u = torch.tanh(x @ R)
            if diagonal:
                F = u.square().sum(0) + 0.5 * len(x)
                if densify:
                    F = torch.diag(F)
            else:
                F = u.T @ u + 0.5 * len(x) * eye(n, u)
            block.append(F / N if j == mean else F)
        blocks.append(block)
        averaged.append(mean)
    return Kron(blocks, averaged)


def stub_backend(layout, densify=False):
    class Stub(CurvlinopsGGN):
        """The default backend's loss with a Kron in the layout above."""

        def kron(self, x, y, N, **kwargs):
            loss, _ = super().kron(x, y, N, **kwargs)
            return loss, layout_kron(layout, x, N, densify)

    return Stub


def make_model(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    return model.to(device, DTYPE)


def make_data(device, n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g, dtype=DTYPE)
    y = torch.randn(n, 2, generator=g, dtype=DTYPE)
    return X.to(device), y.to(device)


def loader(X, y, batch_size=7):
    return DataLoader(TensorDataset(X, y), batch_size=batch_size)


PRIOR = [0.5, 1.0, 2.0, 3.0]
SIGMA = 0.7


def fitted(model, layout, densify=False, damping=False, subset="all", **kw):
    X, y = make_data(next(model.parameters()).device)
    prior = PRIOR if subset == "all" else PRIOR[2:]  # one per parameter tensor
    la = Laplace(
        model,
        "regression",
        subset_of_weights=subset,
        hessian_structure="kron",
        backend=stub_backend(layout, densify),
        damping=damping,
        sigma_noise=SIGMA,
        prior_precision=torch.tensor(prior, dtype=DTYPE, device=X.device),
        **kw,
    )
    la.fit(loader(X, y))
    return la


def oracle_precision(layout, params, X, damping, prior):
    """``c H + diag(p0)`` (or the damped form) from the layout's dense factors over
    all data, built with torch.kron."""
    kron = layout_kron(layout, X, len(X), densify=True)
    c = torch.tensor(1 / SIGMA**2, dtype=DTYPE, device=X.device)
    P = oracle_with_deltas(kron.kfacs, c, prior, damping)
    assert P.shape[0] == sum(p.numel() for p in params)
    return P


def jacobians(model, X):
    """Jacobians ``(N, C, P)`` of the model's outputs, by jacrev."""
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())

    def f(theta, x):
        return functional_call(model, dict(zip(names, theta)), (x[None],))[0]

    rows = []
    for x in X:
        J = jacrev(lambda theta, x=x: f(theta, x))(params)
        rows.append(torch.cat([j.reshape(j.shape[0], -1) for j in J], dim=1))
    return torch.stack(rows)


@pytest.mark.parametrize("damping", [False, True])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_kron_laplace_with_the_backends_layout(device, name, damping):
    layout = LAYOUTS[name]
    model = make_model(device)
    la = fitted(model, layout, damping=damping)
    la_dense = fitted(model, layout, densify=True, damping=damping)
    X, _ = make_data(device)
    X_test, _ = make_data(device, n=5, seed=1)
    prior = torch.tensor(PRIOR, dtype=DTYPE, device=device)

    # the fitted curvature keeps the backend's layout
    shapes = [[(n,) if d else (n, n) for n, d in factors] for factors, _ in layout]
    assert la.H._shapes() == shapes
    assert la.H.averaged == [mean for _, mean in layout]

    P = oracle_precision(layout, la.params, X, damping, prior)
    assert_close(la.posterior_precision.to_matrix(), P)
    assert_close(la_dense.posterior_precision.to_matrix(), P)
    assert_close(la.log_det_posterior_precision, torch.linalg.slogdet(P)[1])
    assert_close(la.posterior_variance, torch.linalg.inv(P).diagonal())

    # the evidence and its gradients in the prior precision and the noise
    grads = []
    for lap in (la, la_dense):
        p0 = prior.clone().requires_grad_(True)
        s = torch.tensor(SIGMA, dtype=DTYPE, device=device, requires_grad=True)
        lml = lap.log_marginal_likelihood(p0, s)
        grads.append((lml.detach(), *torch.autograd.grad(lml, (p0, s))))
    for a, b in zip(*grads):
        assert_close(a, b)
    la.prior_precision, la.sigma_noise = prior, SIGMA
    la_dense.prior_precision, la_dense.sigma_noise = prior, SIGMA

    # glm predictive against J P^-1 J^T with jacrev Jacobians
    J = jacobians(model, X_test)
    f_var_oracle = J @ torch.linalg.inv(P) @ J.mT
    f_mu, f_var = la(X_test, pred_type="glm")
    f_mu_dense, f_var_dense = la_dense(X_test, pred_type="glm")
    assert_close(f_mu, model(X_test).detach())
    assert_close(f_var, f_var_oracle)
    assert_close(f_var_dense, f_var_oracle)
    assert_close(f_mu_dense, f_mu)
    assert_close(la.functional_variance(J), f_var_oracle)

    # sampling: the symmetric square root of P^-1 is unique, so equal draws
    g1 = torch.Generator(device).manual_seed(7)
    g2 = torch.Generator(device).manual_seed(7)
    assert_close(la.sample(4, generator=g1), la_dense.sample(4, generator=g2))
    samples = la.sample(20_000, generator=g1) - la.mean
    cov = samples.T @ samples / len(samples)
    assert_close(cov, torch.linalg.inv(P), atol=0.05, rtol=0.2)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_the_glm_factor_route_is_taken_only_for_out_in_blocks(device, name):
    bases = fitted(make_model(device), LAYOUTS[name])._posterior.eigenbases()
    assert (bases is not None) == (name in FACTOR_ROUTE)


def test_fit_does_not_write_into_the_backends_tensors(device):
    """A backend may return the same Kron for every batch (e.g. a cache): the
    fit accumulates into a copy."""
    model = make_model(device)
    X, y = make_data(device)
    cached = layout_kron(LAYOUTS["out_in"], X, len(X))
    before = cached.clone()

    class Cached(CurvlinopsGGN):
        def kron(self, x, y, N, **kwargs):
            return super().kron(x, y, N, **kwargs)[0], cached

    la = Laplace(model, "regression", "all", hessian_structure="kron", backend=Cached)
    la.fit(loader(X, y, batch_size=7))  # 3 batches
    for a, b, c in zip(la.H.kfacs, cached.kfacs, before.kfacs, strict=True):
        for F, F_cached, F_before in zip(a, b, c, strict=True):
            assert_close(F_cached, F_before)
            assert_close(F, 3 * F_before)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_fit_override_false_on_halves_equals_one_fit(device, name):
    layout = LAYOUTS[name]
    model = make_model(device)
    X, y = make_data(device)
    whole = fitted(model, layout)
    kw = dict(
        subset_of_weights="all",
        hessian_structure="kron",
        backend=stub_backend(layout),
        sigma_noise=SIGMA,
        prior_precision=torch.tensor(PRIOR, dtype=DTYPE, device=device),
    )
    halves = Laplace(model, "regression", **kw)
    halves.fit(loader(X[:8], y[:8]))
    halves.fit(loader(X[8:], y[8:]), override=False)
    for a, b in zip(halves.H.kfacs, whole.H.kfacs, strict=True):
        for F, F_whole in zip(a, b, strict=True):
            assert_close(F, F_whole)
    assert_close(
        halves.posterior_precision.to_matrix(), whole.posterior_precision.to_matrix()
    )
    other = stub_backend(LAYOUTS["backend" if name == "out_in" else "out_in"])
    halves.backend.__class__ = other  # a later fit in another layout is refused
    with pytest.raises(ValueError, match="needs the Kron layout of the previous fit"):
        halves.fit(loader(X, y), override=False)


def test_state_dict_keeps_the_layout(device):
    model = make_model(device)
    la = fitted(model, LAYOUTS["backend"])
    X_test, _ = make_data(device, n=5, seed=1)
    fresh = Laplace(
        model, "regression", subset_of_weights="all", hessian_structure="kron"
    )
    fresh.load_state_dict(la.state_dict())
    assert fresh.H._shapes() == la.H._shapes()
    assert fresh.H.averaged == la.H.averaged
    for a, b in zip(la(X_test), fresh(X_test), strict=True):
        assert_close(a, b)
    bad = la.state_dict()
    bad["H"]["kfacs"][-1] = [torch.ones(3, dtype=DTYPE, device=device)]
    with pytest.raises(ValueError, match="state dict does not fit the parameters"):
        fresh.load_state_dict(bad)
    bad["H"]["kfacs"][0] = [torch.ones(12, dtype=DTYPE, device=device)]  # a pair's
    with pytest.raises(ValueError, match="Kronecker factors: averaged must hold"):
        fresh.load_state_dict(bad)


def test_a_backend_layout_that_does_not_fit_the_parameters_is_refused(device):
    model = make_model(device)
    layout = list(LAYOUTS["out_in"])
    layout[0] = ([(4, True), (2, False)], 1)  # 8 entries for W1's 12
    with pytest.raises(ValueError, match="backend's Kron does not fit the parameters"):
        fitted(model, layout)
    with pytest.raises(ValueError, match="backend's Kron does not fit the parameters"):
        fitted(model, LAYOUTS["out_in"][:3])  # a block missing


# A last layer W2 (2, 4), b2 (2,) in the factor route's layout and split otherwise
LL_LAYOUTS = {
    "out_in": [([(2, False), (4, True)], 1), ([(2, True)], None)],
    "backend": [([(4, True), (2, False)], 0), ([(2, True)], None)],
}


@pytest.mark.parametrize("name", list(LL_LAYOUTS))
def test_last_layer_kron_with_the_backends_layout(device, name):
    layout = LL_LAYOUTS[name]
    model = make_model(device)
    la = fitted(model, layout, subset="last_layer", last_layer_name="2")
    X, _ = make_data(device)
    X_test, _ = make_data(device, n=5, seed=1)
    prior = torch.tensor(PRIOR[2:], dtype=DTYPE, device=device)
    P = oracle_precision(layout, la.params, X, False, prior)
    assert_close(la.posterior_precision.to_matrix(), P)
    # the last layer's Jacobian: [I (x) phi^T, I] with phi the hidden features
    phi = model[1](model[0](X_test)).detach()
    eye2 = eye(2, phi)
    J = torch.cat(
        [
            torch.einsum("ce,nd->nced", eye2, phi).reshape(5, 2, -1),
            eye2.expand(5, 2, 2),
        ],
        dim=-1,
    )
    f_var_oracle = J @ torch.linalg.inv(P) @ J.mT
    _, f_var = la(X_test, pred_type="glm")
    assert_close(f_var, f_var_oracle)
    assert_close(la.functional_variance_fast(X_test), f_var_oracle.diagonal(0, 1, 2))
    _, joint = la(X_test, pred_type="glm", joint=True)
    J2 = J.reshape(-1, J.shape[-1])
    assert_close(joint, J2 @ torch.linalg.inv(P) @ J2.T)


@pytest.mark.parametrize(
    ("factors", "shape", "basis"),
    [
        ([(2, False), (3, True)], (2, 3), "pair"),  # (out, in)
        ([(3, True), (2, False)], (2, 3), None),  # split as (3, 2)
        ([(6, True)], (2, 3), "identity"),  # a diagonal block of a weight
        ([(6, False)], (2, 3), None),  # a dense block of a weight
        ([(2, False), (3, False)], (6,), None),  # a pair over a vector
        ([(6, False)], (6,), "pair"),  # a dense block of a vector
        ([(6, True)], (6,), "pair"),
    ],
)
def test_kron_precision_bases_in_the_parameter_layout(device, factors, shape, basis):
    g = torch.Generator().manual_seed(0)
    kron = Kron([[random_factor(n, d, g, device) for n, d in factors]])
    K = kron.decompose() + 0.5
    form = KronPrecision(K, [torch.Size(shape)])
    bases = form.eigenbases()
    if basis is None:
        assert bases is None
        return
    expected = tuple(K.eigenvectors[0]) if basis == "pair" else (None, None)
    assert len(bases[0]) == len(expected)
    for Q, Q_expected in zip(bases[0], expected, strict=True):
        assert Q is Q_expected
    # the bases with the inverse eigenvalues give back the block's inverse
    inv = form.inverse_eigenvalues()[0]
    dense = [
        torch.eye(n, dtype=DTYPE, device=device) if Q is None else Q.contiguous()
        for Q, n in zip(bases[0], inv.shape)
    ]
    Q = torch.kron(*dense) if len(dense) == 2 else dense[0]
    M = oracle([kron.kfacs[0]]) + 0.5 * torch.eye(6, dtype=DTYPE, device=device)
    assert_close((Q * inv.flatten()) @ Q.T, torch.linalg.inv(M))
