"""Tests written to kill the survivors of the ``output_kron`` mutation stage
(``tools/mutation/output_kron.cfg``: laplace/curvature/output_kron.py,
laplace/utils/logdet.py, laplace/parametric/kron.py). Each test names the mutants it
kills; the oracles are dense matrices (``Kron.to_matrix``, sums over the outputs'
``Kron``), closed-form derivatives and the scalar-noise posterior.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace
from laplace.curvature.output_kron import OutputKron
from laplace.utils.logdet import affine_log_sum
from laplace.utils.matrix import Kron
from models import mlp

DTYPE = torch.float64
USE = "Use hessian_structure='full' or 'diag', or a scalar sigma_noise."


def spd_maker(seed=0):
    g = torch.Generator().manual_seed(seed)

    def spd(n):
        M = torch.randn(n, n, generator=g, dtype=DTYPE)
        return M @ M.T + 0.1 * torch.eye(n, dtype=DTYPE)

    return spd


def weights(C):
    return torch.tensor([0.3, 1.0, 4.0, 2.5][:C], dtype=DTYPE)


def dense_sum(w, columns):
    return sum(wc * K.to_matrix() for wc, K in zip(w, columns))


def loader(x, y, batch_size=5):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


# -- _agree: the tolerance -------------------------------------------------------------
def test_factors_equal_up_to_round_off_are_shared_and_zero_factors_agree():
    """Factors that differ by a relative 1e-12 of their largest entry (round-off)
    are shared, at any scale; exactly equal zero factors (a layer whose inputs are
    zero) agree too. Kills ``_agree`` 4 (tolerance divided by the scale), 5 and 7
    (``eps * 0.5``, ``eps ** 1.5``: below round-off) and 12 (``<``: zero factors
    never agree)."""
    spd = spd_maker()
    A = 1e3 * spd(3)
    columns = [
        Kron([[spd(2), A + (1e-12 * 1e3 * c) * torch.ones(3, 3, dtype=DTYPE)]])
        for c in range(3)
    ]
    H = OutputKron.from_columns(columns)
    assert H.shared == [1]
    torch.testing.assert_close(
        H.weighted(weights(3)).to_matrix(), dense_sum(weights(3), columns)
    )
    zero = torch.zeros(3, 3, dtype=DTYPE)
    columns = [Kron([[spd(2), zero.clone()]]) for _ in range(3)]
    H = OutputKron.from_columns(columns)
    assert H.shared == [1]
    torch.testing.assert_close(H.kfacs[0][1], zero)


# -- from_columns ----------------------------------------------------------------------
def test_the_kron_of_one_output_alone_is_gathered():
    """``from_columns`` of a single output: the input side is shared (the factor as
    it is), and ``weighted(w)`` is ``w K``. Kills ``from_columns`` 2 and 43 (the
    second column read)."""
    spd = spd_maker()
    K = Kron([[spd(2), spd(3)], [spd(2)]])
    H = OutputKron.from_columns([K])
    assert H.shared == [1, None] and H.n_outputs == 1
    torch.testing.assert_close(H.kfacs[0][1], K.kfacs[0][1])
    w = torch.tensor([2.5], dtype=DTYPE)
    torch.testing.assert_close(H.weighted(w).to_matrix(), 2.5 * K.to_matrix())


def test_outputs_of_different_layouts_are_refused():
    """A second column of other shapes, or of the same shapes with another
    ``averaged``, is refused with the layouts named. Kills ``from_columns`` 3 (the
    second column not checked), 4 (``and``: a differing ``averaged`` alone passes)
    and 7-10 (the message)."""
    spd = spd_maker()
    first = Kron([[spd(2), spd(3)]])
    for second in (Kron([[spd(2), spd(4)]]), Kron([[spd(2), spd(3)]], averaged=[0])):
        message = (
            "The Kronecker factors of the outputs have different layouts: "
            f"{first._shapes()} (averaged {first.averaged}) and {second._shapes()} "
            f"(averaged {second.averaged})."
        )
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            OutputKron.from_columns([first, second])


def test_a_pair_that_differs_on_both_sides_is_refused_with_the_remedy():
    """Kills ``from_columns`` 35/36/38/39 (the message and its remedy)."""
    spd = spd_maker()
    columns = [Kron([[spd(2), spd(3)]]) for _ in range(2)]
    message = (
        "The Kronecker factors of block 0 (shapes [(2, 2), (3, 3)]) differ between "
        f"the outputs on both sides, so its KFAC cannot be split by output. {USE}"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        OutputKron.from_columns(columns)


def test_a_pair_without_an_averaged_factor_shares_its_input_side_unscaled():
    """``averaged=[None]`` (both factors summed): the agreeing input side (position
    1) is shared as it is, no count moves, and ``weighted`` keeps the marks. Kills
    ``from_columns`` 22/25 (``1 - None``), 24 (position 2) and ``weighted`` 16/18
    (the default marks, 1 for a pair)."""
    spd = spd_maker()
    A = spd(3)
    columns = [Kron([[spd(2), A]], averaged=[None]) for _ in range(3)]
    H = OutputKron.from_columns(columns)
    assert H.shared == [1]
    torch.testing.assert_close(H.kfacs[0][1], A)
    K = H.weighted(weights(3))
    assert K.averaged == [None]
    torch.testing.assert_close(K.to_matrix(), dense_sum(weights(3), columns))


def test_when_both_sides_agree_the_averaged_factor_is_the_shared_one():
    """Outputs that agree on both sides of a pair whose averaged factor is the first
    (``averaged=[0]``): that factor is shared as it is and the other weighted, with
    no count moved between them (the damped factors see the fit's split). Kills
    ``from_columns`` 23 (position 1 always preferred: the count of outputs moved)."""
    spd = spd_maker()
    F0, F1 = spd(2), spd(3)
    columns = [Kron([[F0, F1]], averaged=[0])] * 3
    H = OutputKron.from_columns(columns)
    assert H.shared == [0]
    w = weights(3)
    K = H.weighted(w)
    torch.testing.assert_close(K.kfacs[0][0], F0)
    torch.testing.assert_close(K.kfacs[0][1], w.sum() * F1)


def test_a_shared_summed_factor_after_the_averaged_one_takes_the_outputs_count():
    """``averaged=[0]`` with the outputs agreeing on the summed factor at position 1
    (the mirror of the engine's embeddings): the shared factor is ``C`` times the
    output's, the averaged ones divided by ``C``, and the weighted Kron is ``sum_c
    w_c K_c``. Kills ``from_columns`` 55/58 (``1 + position``)."""
    spd = spd_maker()
    S = spd(3)
    columns = [Kron([[spd(2), S]], averaged=[0]) for _ in range(3)]
    H = OutputKron.from_columns(columns)
    assert H.shared == [1]
    torch.testing.assert_close(H.kfacs[0][1], 3 * S)
    torch.testing.assert_close(
        H.kfacs[0][0], torch.stack([K.kfacs[0][0] for K in columns]) / 3
    )
    torch.testing.assert_close(
        H.weighted(weights(3)).to_matrix(), dense_sum(weights(3), columns)
    )


def test_block_sizes_of_diagonal_factors_are_those_of_the_outputs_kron():
    """Diagonal (vector) factors, shared ``(n,)`` and per output ``(C, m)``: the block
    sizes are the parameters' counts, as ``Kron.block_sizes``. Kills
    ``block_sizes`` 2 (``shape[+1]``) and 3 (``shape[-2]``: the number of outputs)."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, generator=g, dtype=DTYPE) + 0.5
    columns = [
        Kron(
            [
                [torch.rand(2, generator=g, dtype=DTYPE) + 0.5, a],
                [torch.rand(4, generator=g, dtype=DTYPE) + 0.5],
            ]
        )
        for _ in range(3)
    ]
    H = OutputKron.from_columns(columns)
    assert H.shared == [1, None]
    assert H.block_sizes() == columns[0].block_sizes() == [6, 4]
    torch.testing.assert_close(
        H.weighted(weights(3)).to_matrix(), dense_sum(weights(3), columns)
    )


def test_decompose_is_undamped_by_default():
    """``decompose(w) + d`` is ``sum_c w_c K_c + d I`` (dense), the damped form only
    when asked. Kills ``decompose`` 1 (``damping=True`` by default)."""
    spd = spd_maker()
    A = spd(3)
    columns = [Kron([[spd(2), A], [spd(2)]]) for _ in range(3)]
    H = OutputKron.from_columns(columns)
    w = weights(3)
    eye = torch.eye(8, dtype=DTYPE)
    torch.testing.assert_close(
        (H.decompose(w) + 0.5).to_matrix(), dense_sum(w, columns) + 0.5 * eye
    )
    damped = (H.decompose(w, damping=True) + 0.5).to_matrix()
    assert not torch.allclose(damped, dense_sum(w, columns) + 0.5 * eye)


# -- __init__ and _align: refusals ---------------------------------------------------
def test_an_output_kron_of_inconsistent_entries_is_refused():
    """Kills ``__init__`` 10-12 (the message on the number of entries), 16 (``> 2``:
    two output counts pass) and 17-21 (the message on the output counts)."""
    spd = spd_maker()
    A = spd(3)
    message = (
        "kfacs, shared and averaged must have one entry per block; got 1, 2 and 1."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        OutputKron([[torch.stack([spd(2)] * 2), A]], [1, None], [1])
    message = (
        "The factors of the outputs must all have the same leading (output) "
        "dimension; got [2, 3]."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        OutputKron(
            [[torch.stack([spd(2)] * 2), A], [torch.stack([spd(2)] * 3)]],
            [1, None],
            [1, None],
        )


def test_per_output_curvatures_of_different_layouts_are_not_combined():
    """``add_`` refuses another ``averaged`` (same shapes), another number of outputs,
    other factor shapes and a shared factor that changed sides, each with its
    message. Kills ``_align`` 1 (``and``: another number of outputs reaches the shapes'
    message), 2 (``and``: another ``averaged`` alone passes), 6-9 (the layouts'
    message), 23-30 (the changed sides' message) and 32-35 (the shapes' message)."""
    spd = spd_maker()
    A, B = spd(2), spd(3)

    def make(C=3, averaged=1, n=3, side=0):
        if side == 0:
            columns = [Kron([[A, spd(n)]], averaged=[averaged]) for _ in range(C)]
        else:
            columns = [Kron([[spd(2), B]], averaged=[averaged]) for _ in range(C)]
        return OutputKron.from_columns(columns)

    def layouts(a, b):
        return re.escape(
            "Cannot combine per-output Kronecker curvatures of different layouts: "
            f"{a._shapes()} (averaged {a.averaged}) and {b._shapes()} "
            f"(averaged {b.averaged})."
        )

    for other in (make(averaged=0), make(C=2)):
        first = make()
        with pytest.raises(ValueError, match=f"^{layouts(first, other)}$"):
            first.add_(other)
    first, other = make(), make(n=4)
    shapes = re.escape(
        "Cannot combine per-output Kronecker curvatures of different factor shapes: "
        f"{first._shapes()} and {other._shapes()}."
    )
    with pytest.raises(ValueError, match=f"^{shapes}$"):
        first.add_(other)
    sides = re.escape(
        "The factor of block 0 that the outputs share changed sides between two "
        f"batches or data sets; its KFAC cannot be split by output. {USE}"
    )
    with pytest.raises(ValueError, match=f"^{sides}$"):
        make(side=0).add_(make(side=1))


# -- _align and _swap: batches brought to one split ----------------------------------
@pytest.mark.parametrize("averaged", [1, None], ids=["averaged", "summed"])
@pytest.mark.parametrize("order", ["tie-first", "tie-second"])
def test_accumulated_batches_equal_the_split_of_their_summed_outputs(averaged, order):
    """Two outputs, two pairs of 3x3 and 4x4 factors. In the first pair both batches
    share the same side; in the second one batch agrees on both sides (no gradient
    difference) and the other on side 0 only, so the tie is brought to side 0. The
    sum equals ``from_columns`` of the summed outputs' Krons, factor by factor (the
    count of outputs moved for an averaged pair, not for a summed one), and the
    aligned batch keeps its curvature and its decomposition. Kills ``_align`` 16
    (``break``: the second pair not aligned), ``_swap`` 10 (the factor's size read as
    the number of outputs), 13 and 15 (the count moved for a summed pair) and 32
    (the shared eigenpairs' cache left unusable)."""
    spd = spd_maker(3)
    C = 2
    A0, A1, T0, T1 = spd(3), spd(3), spd(3), spd(4)
    both = [Kron([[A0, spd(4)], [T0, T1]], averaged=[averaged] * 2) for _ in range(C)]
    varied = [
        Kron([[A0, spd(4)], [A1, spd(4)]], averaged=[averaged] * 2) for _ in range(C)
    ]
    first, second = (both, varied) if order == "tie-first" else (varied, both)
    H1, H2 = OutputKron.from_columns(first), OutputKron.from_columns(second)
    w = weights(C)
    before = H2.decompose(w).to_matrix()  # fills the cache of the shared eigenpairs
    H = H1.add_(H2)
    summed = [
        Kron(
            [[F + G for F, G in zip(a, b)] for a, b in zip(K1.kfacs, K2.kfacs)],
            averaged=[averaged] * 2,
        )
        for K1, K2 in zip(first, second)
    ]
    expected = OutputKron.from_columns(summed)
    assert H.shared == expected.shared == [0, 0]
    for block, ref in zip(H.kfacs, expected.kfacs):
        for F, F_ref in zip(block, ref):
            torch.testing.assert_close(F, F_ref)
    torch.testing.assert_close(H.weighted(w).to_matrix(), dense_sum(w, summed))
    torch.testing.assert_close(H2.weighted(w).to_matrix(), dense_sum(w, second))
    torch.testing.assert_close(H2.decompose(w).to_matrix(), before)


# -- KronLaplace ----------------------------------------------------------------------
def test_a_noise_that_requires_grad_keeps_the_damped_precision(device):
    """While ``sigma_noise`` requires grad the decomposition is built afresh: it is
    the damped one of the detached noise. Kills ``_output_decomposed`` 1/3 (no
    weights) and 2/4 (the damping dropped)."""
    torch.manual_seed(0)
    model = mlp(3, 4, 2).to(device, DTYPE)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(11, 3, generator=g, dtype=DTYPE).to(device)
    y = torch.randn(11, 2, generator=g, dtype=DTYPE).to(device)
    sigma = torch.tensor([0.5, 2.0], dtype=DTYPE, device=device)
    la = Laplace(model, "regression", "all", "kron", sigma_noise=sigma, damping=True)
    la.fit(loader(x, y))
    expected = la.posterior_precision.to_matrix()
    la.sigma_noise = sigma.clone().requires_grad_(True)
    P = la.posterior_precision.to_matrix()
    assert P.requires_grad
    torch.testing.assert_close(P.detach(), expected)


def test_a_per_output_state_dict_of_inconsistent_entries_is_refused(device):
    """Entries of different lengths, or a block missing. Kills
    ``KronLaplace._load_H`` 30 (the state dict's error without its cause) and 36
    (the layout error's subject in lower case)."""
    torch.manual_seed(0)
    model = mlp(3, 4, 2).to(device, DTYPE)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, generator=g, dtype=DTYPE).to(device)
    y = torch.randn(8, 2, generator=g, dtype=DTYPE).to(device)
    sigma = torch.tensor([0.5, 2.0], dtype=DTYPE, device=device)
    la = Laplace(model, "regression", "all", "kron", sigma_noise=sigma)
    la.fit(loader(x, y))
    state = la.state_dict()
    n = len(state["H"]["kfacs"])
    state["H"]["shared"] = state["H"]["shared"][:-1]
    message = (
        "The state dict's Kronecker factors: kfacs, shared and averaged must have "
        f"one entry per block; got {n}, {n - 1} and {n}."
    )
    other = Laplace(model, "regression", "all", "kron")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        other.load_state_dict(state)
    state = la.state_dict()  # a block missing: the layout does not fit
    for key in ("kfacs", "shared", "averaged"):
        state["H"][key] = state["H"][key][:-1]
    with pytest.raises(
        ValueError, match="^The Kron of the state dict does not fit the parameters"
    ):
        other.load_state_dict(state)


# -- affine_log_sum ------------------------------------------------------------------
def test_affine_log_sum_differentiates_the_scale_alone_and_the_shift_alone():
    """``d/dc sum log(c h + d) = sum h / (c h + d)`` with only ``c`` requiring grad,
    ``d/dd = sum 1 / (c h + d)`` with only ``d``. Kills ``_AffineLogSum.backward`` 6
    (the gradient in ``c`` given only where ``d`` requires grad)."""
    h = torch.tensor([0.0, 0.5, 2.0, 7.0], dtype=DTYPE)
    a = torch.tensor([1.0, 3.0], dtype=DTYPE)
    for factors in ((h,), (h, a)):
        ha = h if len(factors) == 1 else torch.outer(h, a)
        c = torch.tensor(0.7, dtype=DTYPE, requires_grad=True)
        (grad,) = torch.autograd.grad(affine_log_sum(c, 1.3, *factors), c)
        torch.testing.assert_close(grad, (ha / (0.7 * ha + 1.3)).sum())
        d = torch.tensor(1.3, dtype=DTYPE, requires_grad=True)
        (grad,) = torch.autograd.grad(affine_log_sum(0.7, d, *factors), d)
        torch.testing.assert_close(grad, (1 / (0.7 * ha + 1.3)).sum())


def small_regression(device, C=2, n=12):
    torch.manual_seed(0)
    model = mlp(3, 4, C).to(device, DTYPE)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, generator=g, dtype=DTYPE).to(device)
    y = torch.randn(n, C, generator=g, dtype=DTYPE).to(device)
    return model, x, y


def test_a_later_fit_in_other_factor_shapes_of_the_same_marks_is_refused(device):
    """``fit(override=False)`` after a backend's switch from the last layer's dense
    output-side factor to its diagonal: the same ``averaged`` marks, other shapes;
    refused with both layouts and the remedy. Kills ``KronLaplace._combine_fits`` 7
    (``and``: equal marks let other shapes through) and 10-16 (the message)."""
    from laplace.curvature import NativeGGN

    class Switching(NativeGGN):
        diagonal = False

        def kron(self, x, y, N, **kwargs):
            loss, K = super().kron(x, y, N)
            if Switching.diagonal:
                K.kfacs[-2][0] = K.kfacs[-2][0].diagonal().clone()
            return loss, K

    model, x, y = small_regression(device)
    la = Laplace(model, "regression", "all", "kron", backend=Switching)
    la.fit(loader(x, y))
    old = la.H
    Switching.diagonal = True
    new = Switching(model, la.lik).kron(x, y, N=len(x))[1]
    assert new.averaged == old.averaged and new._shapes() != old._shapes()
    message = (
        "fit(override=False) needs the Kron layout of the previous fit, factor shapes "
        f"{old._shapes()} with averaged {old.averaged}; the backend gave "
        f"{new._shapes()} with averaged {new.averaged}. Use fit(override=True) or "
        "the same backend."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        la.fit(loader(x, y), override=False)


def test_a_per_output_fit_names_the_backends_kron_that_does_not_fit(device):
    """One noise per output with a backend whose curvature is not a Kron, or a Kron
    missing a block: refused, naming the backend's Kron. Kills
    ``KronLaplace._stack_outputs`` 2/6-8 and ``_check_layout`` 2/3 (the messages)."""
    from laplace.curvature import NativeGGN

    class NotKron(NativeGGN):
        def kron(self, x, y, N, **kwargs):
            loss, K = super().kron(x, y, N)
            return loss, K.to_matrix()

    class MissingBlock(NativeGGN):
        def kron(self, x, y, N, **kwargs):
            loss, K = super().kron(x, y, N)
            return loss, Kron(K.kfacs[:-1], K.averaged[:-1])

    model, x, y = small_regression(device)
    sigma = torch.tensor([0.5, 2.0], dtype=DTYPE, device=device)
    for noise in (sigma, 0.5):  # one per output, and a scalar
        la = Laplace(
            model, "regression", "all", "kron", sigma_noise=noise, backend=NotKron
        )
        with pytest.raises(
            TypeError, match="^The backend's Kron must be a Kron, got Tensor.$"
        ):
            la.fit(loader(x, y))
        assert not la.fitted
    la = Laplace(
        model, "regression", "all", "kron", sigma_noise=sigma, backend=MissingBlock
    )
    sizes = [p.numel() for p in la.params]
    with pytest.raises(
        ValueError,
        match=re.escape(
            "The backend's Kron does not fit the parameters: it needs one block per "
            f"parameter tensor of the parameter's number of entries {sizes}, got "
            f"blocks of {sizes[:-1]} entries"
        ),
    ):
        la.fit(loader(x, y))
