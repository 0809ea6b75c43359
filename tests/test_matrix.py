"""Kron and KronDecomposed against dense matrices built independently in the test."""

import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from laplace.utils.matrix import Kron, KronDecomposed

DTYPE = torch.float64
# Block structure: a Kronecker pair (3 x 4), a dense block (5), another pair (2 x 3).
SHAPES = [(3, 4), (5,), (2, 3)]
N_PARAMS = 12 + 5 + 6


def random_psd(n, generator):
    X = torch.randn(n, 2 * n, generator=generator, dtype=DTYPE)
    return X @ X.T / (2 * n) + 0.1 * torch.eye(n, dtype=DTYPE)


def make_kfacs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[random_psd(n, g) for n in shape] for shape in SHAPES]


def dense(kfacs):
    """Block-diagonal dense form: torch.kron of a pair, the block itself otherwise."""
    return torch.block_diag(
        *[torch.kron(b[0], b[1]) if len(b) == 2 else b[0] for b in kfacs]
    )


def dense_power(M, exponent):
    lam, Q = torch.linalg.eigh(M)
    return Q @ torch.diag(lam**exponent) @ Q.T


def eye(n):
    return torch.eye(n, dtype=DTYPE)


def dense_with_deltas(kfacs, deltas, damping):
    """Dense precision with one delta per block, damped or exact, built by hand."""
    blocks = []
    for b, d in zip(kfacs, deltas, strict=True):
        if len(b) == 1:
            blocks.append(b[0] + d * eye(b[0].shape[0]))
        elif damping:
            G, A = b
            s = d.sqrt()
            blocks.append(torch.kron(G + s * eye(len(G)), A + s * eye(len(A))))
        else:
            K = torch.kron(b[0], b[1])
            blocks.append(K + d * eye(len(K)))
    return torch.block_diag(*blocks)


@pytest.fixture
def kfacs():
    return make_kfacs()


@pytest.fixture
def W():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, N_PARAMS, generator=g, dtype=DTYPE)


# --------------------------------------------------------------------------- Kron


def test_init_from_model_skips_frozen_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 4),
        nn.Conv2d(4, 2, kernel_size=2),
        nn.Flatten(),
        nn.Linear(8, 2, bias=False),
    ).to(DTYPE)
    model[1].bias.requires_grad_(False)
    for arg in (model, model.parameters()):
        kron = Kron.init_from_model(arg, torch.device("cpu"))
        shapes = [[tuple(f.shape) for f in b] for b in kron.kfacs]
        assert shapes == [
            [(4, 4), (3, 3)],
            [(4, 4)],
            [(2, 2), (16, 16)],
            [(2, 2), (8, 8)],
        ]
        assert len(kron) == 4
        for block in kron.kfacs:
            for f in block:
                assert f.dtype == DTYPE
                assert_close(f, torch.zeros_like(f))
    kron = Kron.init_from_model(model, "cpu", dtype=torch.float32)
    assert kron.kfacs[0][0].dtype == torch.float32


def test_to_matrix_and_diag(kfacs):
    kron = Kron(kfacs)
    M = dense(kfacs)
    assert_close(kron.to_matrix(), M)
    assert_close(kron.diag(), M.diagonal())
    assert len(kron) == len(SHAPES)


def test_add_is_factorwise(kfacs):
    other = make_kfacs(seed=5)
    total = Kron(kfacs) + Kron(other)
    expected = [
        [f + g for f, g in zip(a, b, strict=True)]
        for a, b in zip(kfacs, other, strict=True)
    ]
    assert_close(total.to_matrix(), dense(expected))
    with pytest.raises(ValueError, match="shapes"):
        Kron(kfacs) + Kron(other[:-1])
    with pytest.raises(TypeError):
        Kron(kfacs) + 1.0


def test_inplace_add_accumulates_like_add(kfacs):
    other = make_kfacs(seed=5)
    expected = (Kron(kfacs) + Kron(other)).to_matrix()
    total = Kron([[f.clone() for f in block] for block in kfacs])
    alias = total
    total += Kron(other)
    assert total is alias
    assert_close(total.to_matrix(), expected)
    with pytest.raises(ValueError, match="shapes"):
        total += Kron(other[:-1])


@pytest.mark.parametrize("scalar", [2.5, torch.tensor(0.3, dtype=DTYPE)])
def test_mul_scales_matrix(kfacs, scalar):
    kron = Kron(kfacs)
    assert_close((kron * scalar).to_matrix(), scalar * dense(kfacs))
    assert_close((scalar * kron).to_matrix(), scalar * dense(kfacs))


def test_mul_rejects_non_scalars(kfacs):
    with pytest.raises(ValueError):
        Kron(kfacs) * torch.ones(2, dtype=DTYPE)
    with pytest.raises(TypeError):
        Kron(kfacs) * "2"


def test_logdet(kfacs):
    assert_close(Kron(kfacs).logdet(), torch.linalg.slogdet(dense(kfacs))[1])


def test_bmm(kfacs, W):
    M = dense(kfacs)
    kron = Kron(kfacs)
    assert_close(kron.bmm(W), torch.einsum("pq,bcq->bcp", M, W))
    assert_close(kron.bmm(W[0]), W[0] @ M.T)
    assert kron.bmm(W[0]).shape == W[0].shape


def test_bmm_bad_input(kfacs, W):
    kron = Kron(kfacs)
    with pytest.raises(ValueError, match="decompose"):
        kron.bmm(W, exponent=-1)
    with pytest.raises(ValueError, match="number of parameters"):
        kron.bmm(W[..., :-1])
    with pytest.raises(ValueError):
        kron.bmm(W[None])


def test_bad_block_structure():
    with pytest.raises(ValueError):
        Kron([[eye(2), eye(2), eye(2)]])


# ---------------------------------------------------------------- KronDecomposed


def test_decompose_round_trip(kfacs):
    decomposed = Kron(kfacs).decompose()
    assert isinstance(decomposed, KronDecomposed)
    assert len(decomposed) == len(SHAPES)
    assert_close(decomposed.to_matrix(), dense(kfacs))
    assert_close(decomposed.logdet(), torch.linalg.slogdet(dense(kfacs))[1])


def test_decompose_decomposes_equal_factors_once(kfacs, monkeypatch):
    """A bias block repeating its weight's factor is eigendecomposed once; the
    decomposition is that of every factor."""
    shared = kfacs[0][0]
    blocks = [*kfacs, [shared.clone()]]
    calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda F: calls.append(1) or eigh(F))
    decomposed = Kron(blocks).decompose()
    assert len(calls) == sum(len(b) for b in kfacs)
    assert_close(decomposed.to_matrix(), dense(blocks))
    assert_close(decomposed.logdet(), torch.linalg.slogdet(dense(blocks))[1])


DELTAS = {
    "none": None,
    "scalar": torch.tensor(0.7, dtype=DTYPE),
    "scalar1": torch.tensor([0.7], dtype=DTYPE),
    "per_block": torch.tensor([0.2, 1.5, 0.9], dtype=DTYPE),
}


def expand_deltas(deltas):
    if deltas is None:
        return torch.zeros(len(SHAPES), dtype=DTYPE)
    return deltas.reshape(-1).expand(len(SHAPES))


@pytest.mark.parametrize("damping", [False, True])
@pytest.mark.parametrize("deltas", DELTAS.values(), ids=DELTAS.keys())
@pytest.mark.parametrize("exponent", [1, -1, -0.5, 0.5])
def test_powers_against_dense(kfacs, W, damping, deltas, exponent):
    decomposed = Kron(kfacs).decompose(damping=damping)
    if deltas is not None:
        decomposed = decomposed + deltas
    P = dense_with_deltas(kfacs, expand_deltas(deltas), damping)
    Pe = dense_power(P, exponent)
    assert_close(decomposed.to_matrix(exponent), Pe)
    assert_close(decomposed.diag(exponent), Pe.diagonal())
    assert_close(decomposed.bmm(W, exponent), torch.einsum("pq,bcq->bcp", Pe, W))
    assert_close(decomposed.bmm(W[1], exponent), W[1] @ Pe.T)
    assert_close(decomposed.logdet(), torch.linalg.slogdet(P)[1])


@pytest.mark.parametrize("damping", [False, True])
def test_constructor_deltas_and_inv_square_form(kfacs, W, damping):
    base = Kron(kfacs).decompose()
    deltas = DELTAS["per_block"]
    decomposed = KronDecomposed(
        base.eigenvectors, base.eigenvalues, deltas=deltas, damping=damping
    )
    P = dense_with_deltas(kfacs, deltas, damping)
    Pinv = torch.linalg.inv(P)
    assert_close(decomposed.inv_square_form(W), W @ Pinv @ W.mT)
    assert_close(decomposed.inv_square_form(W[0]), W[0] @ Pinv @ W[0].T)
    assert_close(decomposed.bmm(W), torch.einsum("pq,bcq->bcp", Pinv, W))


def test_add_deltas_accumulates_and_copies(kfacs):
    decomposed = Kron(kfacs).decompose()
    once = decomposed + 0.5
    twice = once + torch.tensor([0.1, 0.2, 0.3], dtype=DTYPE)
    assert_close(decomposed.to_matrix(), dense(kfacs))  # unchanged
    expected = dense_with_deltas(kfacs, torch.tensor([0.6, 0.7, 0.8]).double(), False)
    assert_close(twice.to_matrix(), expected)


def block_deltas(deltas):
    """``diag`` of the deltas, one value repeated over each block's parameters."""
    sizes = [math.prod(shape) for shape in SHAPES]
    return torch.diag(torch.repeat_interleave(deltas, torch.tensor(sizes)))


def test_mul_scales_curvature_not_deltas(kfacs):
    # independent of how the scale is stored: c times the dense curvature, plus d
    deltas = DELTAS["per_block"]
    decomposed = Kron(kfacs).decompose() + deltas
    for c in (torch.tensor(3.0, dtype=DTYPE), 2.0):
        expected = c * dense(kfacs) + block_deltas(deltas)
        assert_close((decomposed * c).to_matrix(), expected)
        assert_close((c * decomposed).logdet(), torch.linalg.slogdet(expected)[1])
        # the prior added after scaling, as Laplace does
        scaled = Kron(kfacs).decompose() * c + deltas
        assert_close(scaled.to_matrix(), expected)


def damped(kfacs, deltas, c=1.0):
    """The damped ``c G (x) A + d I``: ``c (G + sqrt(d/c) I) (x) (A + sqrt(d/c) I)``
    from torch.kron; a dense block gets ``c B + d I``."""
    blocks = []
    for b, d in zip(kfacs, deltas, strict=True):
        if len(b) == 1:
            blocks.append(c * b[0] + d * eye(len(b[0])))
            continue
        G, A = b
        s = (d / c) ** 0.5
        blocks.append(c * torch.kron(G + s * eye(len(G)), A + s * eye(len(A))))
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("c", [1.0, 3.0, 0.25])
@pytest.mark.parametrize("deltas", ["scalar", "per_block"])
def test_damped_scaled_then_prior(kfacs, W, c, deltas):
    """decompose(damping=True), scale by c, add a prior: the damped form of
    ``c G (x) A + d I``, whichever factor holds ``c``."""
    d = expand_deltas(DELTAS[deltas])
    P = (Kron(kfacs).decompose(damping=True) * c) + DELTAS[deltas]
    expected = damped(kfacs, d, c)
    assert_close(P.to_matrix(), expected)
    assert_close(P.logdet(), torch.linalg.slogdet(expected)[1])
    assert_close(P.bmm(W, -1), torch.einsum("pq,bcq->bcp", expected.inverse(), W))
    assert_close(P.diag(), expected.diagonal())
    # the same matrix with c split evenly over the two factors, damped unscaled
    split = [
        [c**0.5 * b[0], c**0.5 * b[1]] if len(b) == 2 else [c * b[0]] for b in kfacs
    ]
    even = Kron(split).decompose(damping=True) + DELTAS[deltas]
    assert_close(even.to_matrix(), expected)


def peer_factors():
    """The factors of the laplace-torch comparison below (G 3x3, A 4x4, B 5x5)."""
    torch.manual_seed(0)

    def psd(n):
        X = torch.randn(n, 2 * n, dtype=DTYPE)
        return X @ X.T / (2 * n) + 0.1 * eye(n)

    G, A, B = psd(3), psd(4), psd(5)
    return [[G, A], [B]]


# log det from laplace-torch 0.3 (``Kron(...).decompose(damping=True)``, ``* c``,
# ``+ deltas``; factors of ``peer_factors``): its ``*`` and ``+`` drop the damping,
# so these are the logdets of the exact ``c G (x) A + d I``.
PEER_EXACT_LOGDETS = {
    (1.0, "scalar"): 7.75839096266095,
    (1.0, "per_block"): 9.952116144957351,
    (3.0, "scalar"): 18.807938809477342,
    (3.0, "per_block"): 20.145498437053458,
}
# laplace-torch 0.3's KronDecomposed(eigenvectors, eigenvalues, deltas=[0.7, 1.5],
# damping=True).logdet(), the damped (G + sqrt(d)) (x) (A + sqrt(d)) at c = 1
PEER_DAMPED_CONSTRUCTOR_LOGDET = 18.460832366032413


@pytest.mark.parametrize("key", PEER_EXACT_LOGDETS)
def test_exact_path_matches_laplace_torch(key):
    c, kind = key
    deltas = {"scalar": torch.tensor(0.7, dtype=DTYPE)}.get(
        kind, torch.tensor([0.7, 1.5], dtype=DTYPE)
    )
    P = Kron(peer_factors()).decompose() * c + deltas
    assert_close(P.logdet(), torch.tensor(PEER_EXACT_LOGDETS[key], dtype=DTYPE))


def test_damped_constructor_matches_laplace_torch():
    base = Kron(peer_factors()).decompose(damping=True)
    deltas = torch.tensor([0.7, 1.5], dtype=DTYPE)
    P = KronDecomposed(base.eigenvectors, base.eigenvalues, deltas, damping=True)
    expected = torch.tensor(PEER_DAMPED_CONSTRUCTOR_LOGDET, dtype=DTYPE)
    assert_close(P.logdet(), expected)
    assert_close(P.logdet(), torch.linalg.slogdet(damped(peer_factors(), deltas))[1])
    # adding the same prior to the damped decomposition keeps the damping
    assert_close((base + deltas).logdet(), expected)


def test_damped_refuses_non_positive_scale(kfacs):
    with pytest.raises(ValueError, match="positive"):
        Kron(kfacs).decompose(damping=True) * 0.0


def test_clone_is_independent(kfacs):
    kron = Kron(kfacs)
    copy = kron.clone()
    assert_close(copy.to_matrix(), dense(kfacs))
    copy += Kron(make_kfacs(seed=5))
    assert_close(kron.to_matrix(), dense(kfacs))
    assert all(
        f is not g
        for a, b in zip(kron.kfacs, copy.kfacs, strict=True)
        for f, g in zip(a, b, strict=True)
    )


def test_detach(kfacs):
    deltas = DELTAS["per_block"].clone().requires_grad_(True)
    decomposed = Kron(kfacs).decompose() + deltas
    logdet = decomposed.logdet()
    assert logdet.requires_grad
    logdet.backward()
    assert deltas.grad is not None
    detached = decomposed.detach()
    assert not detached.logdet().requires_grad
    assert not detached.deltas.requires_grad
    assert_close(detached.to_matrix(), decomposed.to_matrix().detach())


def test_decomposed_bad_input(kfacs, W):
    decomposed = Kron(kfacs).decompose()
    with pytest.raises(TypeError, match="Kron"):
        decomposed + Kron(kfacs)
    with pytest.raises(TypeError):
        decomposed + decomposed
    with pytest.raises(ValueError, match="deltas"):
        decomposed + torch.ones(2, dtype=DTYPE)
    with pytest.raises(ValueError, match="deltas"):
        KronDecomposed(decomposed.eigenvectors, decomposed.eigenvalues, torch.ones(4))
    with pytest.raises(ValueError, match="number of parameters"):
        decomposed.bmm(W[..., 1:])
    with pytest.raises(ValueError, match="number of parameters"):
        decomposed.inv_square_form(W[..., 1:])
    with pytest.raises(ValueError):
        KronDecomposed(decomposed.eigenvectors, decomposed.eigenvalues[:-1])


def test_decompose_clamps_round_off_and_warns_on_negative():
    G = torch.tensor([[1.0, 0.0], [0.0, -1e-18]], dtype=DTYPE)
    lam = Kron([[G]]).decompose().eigenvalues[0][0]
    assert bool((lam >= 0).all())
    with pytest.warns(UserWarning, match="negative"):
        Kron([[torch.diag(torch.tensor([1.0, -0.5], dtype=DTYPE))]]).decompose()
