"""Tests written to kill surviving mutants of the mutmut stages glm, kron_assembly,
parametric_base and curvature (tools/mutation/run.sh).

Each test states a property of the library against an independent oracle; the
mutants it was written for are named in its docstring. The survivors that are
equivalent are listed in docs/mutation-testing.md.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from laplace.curvature.kron_assembly import LayerFactors, assemble_kron, kfac_layers
from laplace.predictive import glm

DTYPE = torch.float64


# ---- laplace/predictive/glm.py -------------------------------------------------------


def _orthogonal(n, g):
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DTYPE))[0]


def _glm_case(T, n_in, N=5, C=3, n_out=2, rotated=True):
    """Factors of a weight ``(n_out, n_in)`` with ``T`` shared positions and a bias,
    eigenbases and eigenvalues of their blocks, and the dense oracle ``J P^-1 J^T``."""
    g = torch.Generator().manual_seed(T * 10 + n_in)
    a = torch.randn(N, T, n_in, generator=g, dtype=DTYPE)
    gw = torch.randn(C, N, T, n_out, generator=g, dtype=DTYPE)
    gb = torch.randn(C, N, n_out, generator=g, dtype=DTYPE)
    lam_w = torch.rand(n_out, n_in, generator=g, dtype=DTYPE) + 0.5
    lam_b = torch.rand(n_out, generator=g, dtype=DTYPE) + 0.5
    if rotated:
        Q_out, Q_in, Q_b = (_orthogonal(n, g) for n in (n_out, n_in, n_out))
    else:
        Q_out = Q_in = Q_b = None
    # dense oracle: J_c = sum_t g_ct a_t^T, P = (Q_out (x) Q_in) diag(lam) (...)^T
    J_w = torch.einsum("cnto,nti->ncoi", gw, a).reshape(N, C, -1)
    J = torch.cat([J_w, gb.permute(1, 0, 2)], dim=-1)
    eye = torch.eye
    K_w = torch.kron(
        eye(n_out, dtype=DTYPE) if Q_out is None else Q_out,
        eye(n_in, dtype=DTYPE) if Q_in is None else Q_in,
    )
    K_b = eye(n_out, dtype=DTYPE) if Q_b is None else Q_b
    P = torch.block_diag(
        K_w @ torch.diag(lam_w.flatten()) @ K_w.T, K_b @ torch.diag(lam_b) @ K_b.T
    )
    oracle = J @ torch.linalg.solve(P, J.mT)
    factors = [(a, gw), (None, gb)]
    bases = [(Q_out, Q_in), (Q_b,)]
    return factors, bases, [1 / lam_w, 1 / lam_b], oracle


@pytest.mark.parametrize("rotated", [True, False])
@pytest.mark.parametrize("T,n_in", [(1, 3), (2, 3), (3, 1), (1, 1)])
def test_glm_inv_square_form_is_J_Pinv_Jt_for_any_sharing(T, n_in, rotated):
    """rotate + inv_square_form equal the dense ``J P^-1 J^T`` with or without weight
    sharing, also for one input feature and for two shared positions.

    Kills inv_square_form 21 (``a.shape[2] == 1``: a shared weight with one input
    feature takes the unshared path) and 23 (``a.shape[1] == 2``: two shared
    positions take the unshared path and keep only the first).
    """
    factors, bases, inv, oracle = _glm_case(T, n_in, rotated=rotated)
    assert_close(glm.inv_square_form(glm.rotate(factors, bases), inv), oracle)


def test_glm_shared_weight_term_in_several_uneven_chunks(monkeypatch):
    """The per-example Jacobians of a shared weight, computed in chunks of 2 examples
    (5 examples: chunks 2, 2, 1), give the dense ``J P^-1 J^T``.

    Kills _shared_weight_term 15 (``range(N, chunk)``) and 16 (``range(0, chunk)``),
    which only timed out (one empty chunk per integer up to 2**24) with the default
    chunk size.
    """
    factors, bases, inv, oracle = _glm_case(3, 2, N=5, C=3, n_out=2)
    C, numel = 3, inv[0].numel()
    monkeypatch.setattr(glm, "_CHUNK_ENTRIES", 2 * C * numel)
    assert_close(glm.inv_square_form(glm.rotate(factors, bases), inv), oracle)


def test_glm_refuses_factors_and_blocks_of_different_lengths():
    """One block too few (or too many) is an error, not a silently dropped parameter.

    Kills rotate 4/7/8 and inv_square_form 4/7/8 (``zip(..., strict=True)`` relaxed).
    """
    factors, bases, inv, _ = _glm_case(1, 3)
    with pytest.raises(ValueError):
        glm.rotate(factors, bases[:1])
    with pytest.raises(ValueError):
        glm.rotate(factors[:1], bases)
    with pytest.raises(ValueError):
        glm.inv_square_form(factors, inv[:1])
    with pytest.raises(ValueError):
        glm.inv_square_form(factors[:1], inv)


# ---- laplace/curvature/kron_assembly.py ----------------------------------------------


def test_kfac_refuses_a_layer_without_kronecker_factors_with_its_name_and_remedies():
    """A trainable LayerNorm has no KFAC form: the error names the layer, its type and
    what would work; the same layer frozen is skipped.

    Kills kfac_layers 12-22 (message dropped, type of None, text altered).
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(ValueError) as err:
        kfac_layers(model, list(model.parameters()))
    assert str(err.value) == (
        "KFAC cannot handle layer '1' (LayerNorm) whose parameters require grad: "
        "only nn.Linear and nn.Conv2d have Kronecker factors. Use "
        "hessian_structure='diag' or 'full', freeze the layer, or use last-layer "
        "Laplace."
    )
    params = [p for n, p in model.named_parameters() if not n.startswith("1.")]
    assert [name for name, _ in kfac_layers(model, params)] == ["0", "2"]


@pytest.mark.parametrize("N", [0, -3])
def test_assemble_kron_refuses_a_data_set_without_points(N):
    """Kills assemble_kron 1 (``N < 0``: N = 0 divides by zero) and 3 (no message)."""
    layer = nn.Linear(3, 2).to(DTYPE)
    factors = {"l": LayerFactors(torch.eye(2, dtype=DTYPE), torch.eye(3, dtype=DTYPE))}
    with pytest.raises(
        ValueError, match=f"N must be the positive size of the data set; got {N}"
    ):
        assemble_kron(list(layer.parameters()), [("l", layer)], factors, N)


@pytest.mark.parametrize("N", [1, 4])
@pytest.mark.parametrize("g_scale,a_scale", [(1.0, 1.0), (2.0, 3.0), (0.5, 2.0)])
def test_assemble_kron_scales_the_factors_and_averages_A_over_N(N, g_scale, a_scale):
    """The weight block is ``kron(g_scale G, a_scale A / N)`` and the bias block
    ``g_scale G`` (its own copy), in parameter order, for one datum as for several.

    Kills assemble_kron 2 (``N <= 1`` refuses a data set of one point) and 10
    (``g_scale == 2`` skips the scale 2).
    """
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(3, 2).to(DTYPE)
    B = torch.randn(2, 2, generator=g, dtype=DTYPE)
    X = torch.randn(3, 3, generator=g, dtype=DTYPE)
    G, A = B @ B.T, X @ X.T
    factors = {"l": LayerFactors(G.clone(), A.clone(), g_scale, a_scale)}
    kron = assemble_kron(list(layer.parameters()), [("l", layer)], factors, N)
    expected = torch.block_diag(torch.kron(g_scale * G, a_scale * A / N), g_scale * G)
    assert_close(kron.to_matrix(), expected)
    assert kron.kfacs[1][0].data_ptr() != kron.kfacs[0][0].data_ptr()
    # parameter order: bias first
    kron = assemble_kron(
        [layer.bias, layer.weight],
        [("l", layer)],
        {"l": LayerFactors(G.clone(), A.clone(), g_scale, a_scale)},
        N,
    )
    assert_close(
        kron.to_matrix(),
        torch.block_diag(g_scale * G, torch.kron(g_scale * G, a_scale * A / N)),
    )


# ---- laplace/parametric/base.py and lowrank.py ---------------------------------------


def _laplace(model, likelihood, **kwargs):
    from laplace import Laplace

    return Laplace(model, likelihood, subset_of_weights="all", **kwargs)


def _pl_model(n_out=2, seed=0, device="cpu"):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, n_out)).to(
        device=device, dtype=DTYPE
    )


def _pl_data(likelihood, n=12, n_out=2, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g, dtype=DTYPE)
    if likelihood == "classification":
        y = torch.randint(0, n_out, (n,), generator=g)
    else:
        y = torch.randn(n, n_out, generator=g, dtype=DTYPE)
    return X.to(device), y.to(device)


def _loader(X, y, batch_size=5):
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(X, y), batch_size=batch_size)


def test_lowrank_defaults_and_forwarded_arguments():
    """LowRankLaplace keeps laplace-torch's defaults (prior precision 1, rank 20,
    input_ids/labels) and forwards what it is given to the base class and backend.

    Kills LowRankLaplace.__init__ 2/6-10/22-26/34-38, fit 2 (progress bar default).
    """
    from laplace.curvature import CurvlinopsEF

    big = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).to(DTYPE)
    la = _laplace(big, "regression", hessian_structure="lowrank")
    assert la.rank == 20 and la.eig_method == "lanczos" and la.eig_kwargs == {}
    assert_close(la.prior_precision, torch.ones(1, dtype=DTYPE))
    assert (la.dict_key_x, la.dict_key_y) == ("input_ids", "labels")
    assert (la.backend.dict_key_x, la.backend.dict_key_y) == ("input_ids", "labels")
    import inspect

    assert inspect.signature(type(la).fit).parameters["progress_bar"].default is False
    la = _laplace(
        big,
        "regression",
        hessian_structure="lowrank",
        backend=CurvlinopsEF,
        dict_key_x="a",
        dict_key_y="b",
        asdl_fisher_kwargs={"n_mc_samples": 2},
        rank=3,
    )
    assert isinstance(la.backend, CurvlinopsEF) and la.rank == 3
    assert (la.dict_key_x, la.dict_key_y) == ("a", "b")
    assert (la.backend.dict_key_x, la.backend.dict_key_y) == ("a", "b")
    assert la.asdl_fisher_kwargs == {"n_mc_samples": 2}
    la = _laplace(
        big,
        "regression",
        hessian_structure="lowrank",
        backend_kwargs={"stochastic": True},
    )
    assert la.backend.stochastic and la.backend_kwargs == {"stochastic": True}


@pytest.mark.parametrize("rank", [0, -1, True, 1.5, "2"])
def test_lowrank_refuses_a_bad_rank_and_accepts_one(rank):
    """Kills LowRankLaplace.__init__ 39/40/43/44/45 (rank check relaxed or off by
    one, message dropped)."""
    with pytest.raises(
        ValueError,
        match="rank must be a positive integer; got " + re.escape(repr(rank)),
    ):
        _laplace(_pl_model(), "regression", hessian_structure="lowrank", rank=rank)
    la = _laplace(_pl_model(), "regression", hessian_structure="lowrank", rank=1)
    assert la.rank == 1


def test_lowrank_eig_method_randomized_is_accepted_and_others_named():
    """Kills LowRankLaplace.__init__ 49/50/51."""
    la = _laplace(
        _pl_model(), "regression", hessian_structure="lowrank", eig_method="randomized"
    )
    assert la.eig_method == "randomized"
    with pytest.raises(
        ValueError, match="eig_method must be 'lanczos' or 'randomized'; got 'qr'"
    ):
        _laplace(
            _pl_model(), "regression", hessian_structure="lowrank", eig_method="qr"
        )


def test_lowrank_fit_errors_say_what_happened():
    """Kills LowRankLaplace.fit 5-10 (accumulation message) and 23-29 (non-finite
    loss message), _CheckedData.loss_and_outputs 19-21 (no batch message)."""
    X, y = _pl_data("regression")
    la = _laplace(_pl_model(), "regression", hessian_structure="lowrank", rank=2)
    la.fit(_loader(X, y))
    with pytest.raises(ValueError) as err:
        la.fit(_loader(X, y), override=False)
    assert str(err.value) == (
        "LowRankLaplace cannot accumulate fits (override=False): the eigenpairs are "
        "of one data set's curvature. Fit once on all the data."
    )
    y_bad = y.clone()
    y_bad[0, 0] = float("nan")
    with pytest.raises(RuntimeError) as err:
        la.fit(_loader(X, y_bad))
    assert str(err.value) == (
        "The training loss is not finite (NaN or inf); check the data and the "
        "model's outputs. The Laplace approximation was left as it was."
    )
    with pytest.raises(ValueError, match="^train_loader yielded no batches.$"):
        la.fit(_loader(X[:0], y[:0]))


@pytest.mark.parametrize("likelihood", ["regression", "classification"])
def test_lowrank_ef_eigenvalues_are_those_of_the_empirical_fisher(likelihood):
    """Full-rank LowRankLaplace with an EF backend: its eigenvalues are those of the
    dense empirical Fisher of the loss of DESIGN.md (regression: ``N(f, 1)``).

    Kills LowRankLaplace._operator 33/34 (``factor * 2``, ``factor ** 3``: the
    regression scale 1/4 becomes 1 or 1/8).
    """
    from laplace.curvature import CurvlinopsEF
    from oracles import empirical_fisher

    m = _pl_model()
    X, y = _pl_data(likelihood)
    P = sum(p.numel() for p in m.parameters())
    la = _laplace(
        m, likelihood, hessian_structure="lowrank", backend=CurvlinopsEF, rank=P
    )
    la.fit(_loader(X, y))
    U, lam = la.H
    EF = empirical_fisher(m, X, y, likelihood)
    assert_close(U @ torch.diag(lam) @ U.T, EF, atol=1e-6, rtol=1e-6)


def test_lowrank_with_mapping_batches_equals_tensor_batches():
    """Batches as mappings (``dict_key_x``/``dict_key_y``) give the eigenpairs of the
    same data as tuples.

    Kills LowRankLaplace._operator 24-28 (batch size of a mapping batch) and
    _CheckedData.__iter__ 4/5 (keys dropped).
    """

    class DictModel(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, batch):
            return self.net(batch["x"])

    X, y = _pl_data("regression")
    dense = _laplace(_pl_model(), "regression", hessian_structure="lowrank", rank=3)
    dense.fit(_loader(X, y))
    batches = [{"x": X[i : i + 5], "y": y[i : i + 5]} for i in range(0, len(X), 5)]

    class Loader(list):
        dataset = X

    la = _laplace(
        DictModel(_pl_model()),
        "regression",
        hessian_structure="lowrank",
        rank=3,
        dict_key_x="x",
        dict_key_y="y",
    )
    la.fit(Loader(batches))
    assert_close(la.H[1], dense.H[1])
    assert_close(la.loss, dense.loss)


@pytest.mark.parametrize("structure", ["full", "lowrank"])
def test_a_float32_state_loads_into_a_float64_laplace(structure):
    """The curvature of a state dict is moved to the model's dtype.

    Kills ParametricLaplace._load_H 2/4 and LowRankLaplace._load_H 3/5/10/12.
    """
    X, y = _pl_data("regression")
    kw = {"rank": 3} if structure == "lowrank" else {}
    la32 = _laplace(
        _pl_model().float(), "regression", hessian_structure=structure, **kw
    )
    la32.fit(_loader(X.float(), y.float()))
    la64 = _laplace(_pl_model(), "regression", hessian_structure=structure, **kw)
    la64.load_state_dict(la32.state_dict())
    H = la64.H if structure == "full" else la64.H[0]
    assert H.dtype == DTYPE
    if structure == "lowrank":
        assert la64.H[1].dtype == DTYPE
        bad = la32.state_dict()
        bad["H"] = {
            "eigenvectors": bad["H"]["eigenvectors"][:-1],
            "eigenvalues": bad["H"]["eigenvalues"],
        }
        with pytest.raises(ValueError, match="^The state dict.s eigenpairs do not fit"):
            la64.load_state_dict(bad)
        bad["H"] = {"eigenvectors": la32.H[0], "eigenvalues": la32.H[1][:-1]}
        with pytest.raises(ValueError, match="do not fit this model"):
            la64.load_state_dict(bad)


def test_a_prior_only_state_keeps_the_prior_mean_and_enable_backprop():
    """Loading the state of an unfitted Laplace leaves the posterior at the prior
    (its mean is the prior mean); enable_backprop travels with the state.

    Kills ParametricLaplace.load_state_dict 50 and 60.
    """
    src = _laplace(
        _pl_model(),
        "regression",
        hessian_structure="diag",
        prior_mean=0.5,
        enable_backprop=True,
    )
    dst = _laplace(_pl_model(), "regression", hessian_structure="diag")
    dst.load_state_dict(src.state_dict())
    assert dst.enable_backprop is True
    assert_close(dst.mean, torch.full((dst.n_params,), 0.5, dtype=DTYPE))


def test_weight_and_jacobian_shape_errors_name_the_expected_shape():
    """Kills ParametricLaplace._check_weights 1/6-15, functional_variance 1/7/8,
    functional_covariance 1/8/9."""
    X, y = _pl_data("regression")
    la = _laplace(_pl_model(), "regression", hessian_structure="diag")
    la.fit(_loader(X, y))
    P = la.n_params
    with pytest.raises(ValueError) as err:
        la.log_prob(torch.zeros(P + 1, dtype=DTYPE))
    assert str(err.value) == (
        f"Expected weights of shape ({P},) or (n, {P}); got torch.Size([{P + 1}])."
    )
    with pytest.raises(ValueError) as err:
        la.log_prob([0.0] * P)
    assert str(err.value) == f"Expected weights of shape ({P},) or (n, {P}); got list."
    with pytest.raises(ValueError) as err:
        la.functional_variance(torch.zeros(2, P, dtype=DTYPE))
    assert str(err.value) == f"Js must have shape (batch, outputs, {P}); got (2, {P})."
    with pytest.raises(ValueError):
        la.functional_variance(torch.zeros(2, 2, P + 1, dtype=DTYPE))
    with pytest.raises(ValueError) as err:
        la.functional_covariance(torch.zeros(1, 2, 2, P, dtype=DTYPE))
    assert str(err.value) == (
        f"Js must have shape (batch, outputs, {P}) or (batch * outputs, {P}); got "
        f"(1, 2, 2, {P})."
    )
    with pytest.raises(ValueError):
        la.functional_covariance(torch.zeros(2, 2, P + 1, dtype=DTYPE))


def test_functional_samples_defaults_and_forwarded_options():
    """100 samples per datum by default, per-datum unless ``joint``; ``joint`` and
    ``diagonal_output`` are forwarded (a diagonal output has independent outputs).

    Kills ParametricLaplace.functional_samples 1/2/3/7/9/15 and sample 1.
    """
    X, y = _pl_data("regression", n=40)
    la = _laplace(
        _pl_model(), "regression", hessian_structure="full", prior_precision=0.01
    )
    la.fit(_loader(X, y))
    x = X[:3]
    assert la.sample().shape == (100, la.n_params)
    assert la.functional_samples(x).shape == (100, 3, 2)
    g = torch.Generator().manual_seed(0)
    joint = la.functional_samples(x, n_samples=20000, generator=g, joint=True)
    g = torch.Generator().manual_seed(0)
    per_datum = la.functional_samples(x, n_samples=20000, generator=g)
    g = torch.Generator().manual_seed(0)
    diag = la.functional_samples(x, n_samples=20000, generator=g, diagonal_output=True)
    f_mu, f_var = la(x)
    _, f_cov = la(x, joint=True)

    def cov(s):  # (S, ..., C) -> covariance of the flattened outputs
        s = s.reshape(s.shape[0], -1)
        return torch.cov(s.T)

    scale = f_cov.abs().max()
    # joint: the cross-datum covariances; per datum: none
    assert_close(cov(joint), f_cov, atol=0.05 * scale, rtol=0)
    blocks = torch.block_diag(*f_var)
    assert_close(cov(per_datum), blocks, atol=0.05 * scale, rtol=0)
    assert_close(cov(diag), torch.diag(blocks.diagonal()), atol=0.05 * scale, rtol=0)
    assert (f_cov - blocks).abs().max() > 0.2 * scale
    assert (blocks - torch.diag(blocks.diagonal())).abs().max() > 0.2 * scale


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_a_non_finite_loss_with_a_finite_curvature_is_refused_naming_the_loss(
    structure,
):
    """A NaN regression target makes the loss NaN but not the GGN: fit still
    refuses, says it is the loss of that batch, and keeps the previous state.

    Kills ParametricLaplace.fit 52 (``and``: both must be non-finite) and 57-72
    (what / message altered).
    """
    X, y = _pl_data("regression")
    la = _laplace(_pl_model(), "regression", hessian_structure=structure)
    la.fit(_loader(X, y))
    H = la.H.clone()
    y_bad = y.clone()
    y_bad[7, 0] = float("nan")
    with pytest.raises(RuntimeError) as err:
        la.fit(_loader(X, y_bad))
    assert str(err.value) == (
        "The loss of batch 1 is not finite (NaN or inf); check the inputs and "
        "targets of that batch and the model's outputs. The Laplace approximation "
        "was left as it was."
    )
    assert_close(la.H, H)
    with pytest.raises(ValueError, match="^train_loader yielded no batches.$"):
        la.fit(_loader(X[:0], y[:0]))


def test_a_curvature_whose_sum_overflows_is_still_finite():
    """``_all_finite`` is exact when the sum of finite entries overflows.

    Kills _all_finite 4 and 5 (the element-wise fallback dropped).
    """
    from laplace.parametric.base import _all_finite

    assert _all_finite(torch.full((4,), 1e308, dtype=DTYPE))
    assert not _all_finite(torch.tensor([1.0, float("nan")], dtype=DTYPE))
    assert not _all_finite(torch.tensor([1e308, float("inf")], dtype=DTYPE))


@pytest.mark.parametrize("structure", ["diag", "lowrank"])
def test_fit_shows_its_progress_bar_only_when_asked(structure, capsys):
    """Kills ParametricLaplace.fit 15/18/20/21 (bar description) and
    LowRankLaplace.fit 2 (bar on by default)."""
    X, y = _pl_data("regression")
    kw = {"rank": 2} if structure == "lowrank" else {}
    la = _laplace(_pl_model(), "regression", hessian_structure=structure, **kw)
    la.fit(_loader(X, y))
    assert capsys.readouterr().err == ""
    if structure == "diag":
        la.fit(_loader(X, y), progress_bar=True)
        assert "fit: 100%" in capsys.readouterr().err


def test_fit_refuses_one_dimensional_regression_targets():
    """Kills ParametricLaplace.fit 37/38/39 (the targets not checked)."""
    X, y = _pl_data("regression")
    la = _laplace(_pl_model(), "regression", hessian_structure="diag")
    with pytest.raises(ValueError, match=r"Regression targets y of shape \(5,\)"):
        la.fit(_loader(X, y[:, 0]))


def test_positional_arguments_reach_the_base_class():
    """``FullLaplace(model, likelihood, sigma_noise, prior_precision)`` as in
    laplace-torch. Kills ParametricLaplace.__init__ 7 (``*args`` dropped)."""
    from laplace import FullLaplace

    la = FullLaplace(_pl_model(), "regression", 0.5, 2.0)
    assert_close(
        la.sigma_noise, torch.tensor(0.5, dtype=DTYPE).reshape(la.sigma_noise.shape)
    )
    assert_close(la.prior_precision, torch.tensor([2.0], dtype=DTYPE))


def test_lowrank_eig_kwargs_reach_the_eigensolver():
    """Kills LowRankLaplace.fit 51 (``eig_kwargs`` dropped)."""
    X, y = _pl_data("regression")
    la = _laplace(
        _pl_model(),
        "regression",
        hessian_structure="lowrank",
        rank=2,
        eig_kwargs={"no_such_option": 1},
    )
    with pytest.raises(TypeError, match="no_such_option"):
        la.fit(_loader(X, y))


# ---- laplace/curvature/curvature.py --------------------------------------------------


@pytest.mark.parametrize("bias", ["none", "frozen", "trained"])
def test_last_layer_jacobian_and_diag_with_a_missing_or_frozen_bias(bias):
    """The last-layer Jacobian has a bias block only for a trained bias, and equals
    jacrev of ``f = W phi + b`` w.r.t. the trained parameters; the last-layer GGN
    diagonal equals ``diag(J^T Lambda J)``.

    Kills last_layer_jacobian 28 and _OuterProductCurvature._last_layer_diag 10
    (``bias is not None or bias.requires_grad``).
    """
    from laplace.curvature.curvature import GGNInterface, last_layer_jacobian
    from oracles import output_hessian

    torch.manual_seed(0)
    layer = nn.Linear(4, 3, bias=bias != "none").to(DTYPE)
    if bias == "frozen":
        layer.bias.requires_grad_(False)
    phi = torch.randn(5, 4, dtype=DTYPE)
    params = {n: p for n, p in layer.named_parameters() if p.requires_grad}

    def f(theta, x):
        return torch.func.functional_call(layer, theta, (x[None],))[0]

    jac = torch.func.vmap(torch.func.jacrev(f), in_dims=(None, 0))(params, phi)
    J = torch.cat([jac[n].reshape(5, 3, -1) for n in params], -1)
    assert_close(last_layer_jacobian(layer, phi), J)

    model = nn.Sequential(nn.Identity(), layer)
    backend = GGNInterface(model, "classification", last_layer=True)
    y = torch.tensor([0, 1, 2, 0, 1])
    _, diag = backend.diag(phi, y)
    Lam = output_hessian("classification", layer(phi).detach())
    assert_close(diag, torch.einsum("ncp,ncd,ndp->p", J, Lam, J))


def test_stochastic_ggn_draws_from_the_given_generator():
    """The Monte-Carlo GGN is reproducible from its generator and changes with it.

    Kills GGNInterface._output_factor 3/6 (the generator dropped).
    """
    from laplace.curvature.curvature import GGNInterface

    torch.manual_seed(0)
    model = _pl_model()
    X, y = _pl_data("classification")

    def H(seed):
        torch.manual_seed(123)  # the global RNG must not matter
        g = torch.Generator().manual_seed(seed)
        backend = GGNInterface(model, "classification", stochastic=True, generator=g)
        return backend.full(X, y)[1]

    assert_close(H(1), H(1))
    assert (H(1) - H(2)).abs().max() > 1e-6
