"""A model's dtype is kept through fit, predictive, evidence, tuning and sampling.

laplace-torch 0.3 (measured on CPU with ``.double()``, ``.half()``, ``.bfloat16()``
MLPs, classification and regression) works in float64 everywhere; in float16 and
bfloat16 its Diag works throughout, its Full fits only (the predictive, the evidence,
tuning and sampling fail: no half Cholesky/logdet on the CPU) and its Kron (all
weights and last layer) exits the process during the fit. Here all of them work,
LowRank and the GP view (all weights and last layer) included,
with outputs and tuned precisions in the model's dtype (the decompositions run in
float32, ``laplace.utils.matrix.linalg_dtype``).

Values: float64 equals float32 to ``rtol=1e-4`` (the float32 round-off of these
small problems, ~1e-6, with margin); float16/bfloat16 equal float32 to the few
digits they carry (``rtol=atol=0.05``/``0.1``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace

CASES = [
    ("all", "full"),
    ("all", "kron"),
    ("all", "diag"),
    ("last_layer", "kron"),
    ("all", "lowrank"),
    ("all", "gp"),
    ("last_layer", "gp"),
]
LIKELIHOODS = ["classification", "regression"]
HALF_TOL = {torch.float16: 0.05, torch.bfloat16: 0.1}


def _problem(likelihood, device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(device)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(16, 3, generator=g)
    if likelihood == "classification":
        y = torch.randint(0, 2, (16,), generator=g)
    else:
        y = torch.randn(16, 2, generator=g)
    return model, X.to(device), y.to(device)


def _fit(model, X, y, likelihood, subset, structure, dtype, **kwargs):
    """A copy of ``model`` in ``dtype`` and its Laplace approximation, fitted."""
    model = copy.deepcopy(model).to(dtype)
    X = X.to(dtype)
    y = y.to(dtype) if y.is_floating_point() else y
    if structure == "gp":
        kwargs["n_subset"] = 16  # the GP on all data
    la = Laplace(model, likelihood, subset, structure, **kwargs)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=8))
    return la, X


def _run(model, X, y, likelihood, subset, structure, dtype, **kwargs):
    """Everything a user calls, in ``dtype``: the outputs, by name."""
    la, X = _fit(model, X, y, likelihood, subset, structure, dtype, **kwargs)
    out = {"pred": la(X[:4]), "lml": la.log_marginal_likelihood()}
    la.optimize_prior_precision(method="marglik", n_steps=20)
    out["prior_precision"] = la.prior_precision
    out["lml_tuned"] = la.log_marginal_likelihood()
    if structure != "gp":  # the GP view has no weight-space posterior to sample
        out["sample"] = la.sample(3)
    if likelihood == "regression":
        out["f_mu"], out["f_var"] = out.pop("pred")
    return out


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize(("subset", "structure"), CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_outputs_keep_the_model_dtype_and_values(
    dtype, subset, structure, likelihood, device
):
    model, X, y = _problem(likelihood, device)
    got = _run(model, X, y, likelihood, subset, structure, dtype)
    reference = _run(model, X, y, likelihood, subset, structure, torch.float32)
    for name, value in got.items():
        assert value.dtype == dtype, name
        assert value.device.type == device.type, name
        assert torch.isfinite(value).all(), name
    tol = HALF_TOL.get(dtype, None)
    for name in got:
        if name == "sample":  # draws differ between dtypes; dtype checked above
            continue
        expected = reference[name].to(dtype)
        if tol is None:
            torch.testing.assert_close(got[name], expected, rtol=1e-4, atol=1e-6)
        elif name not in ("lml", "lml_tuned", "prior_precision"):
            torch.testing.assert_close(got[name], expected, rtol=tol, atol=tol)
        else:  # evidences of ~10 and tuned precisions: relative digits only
            torch.testing.assert_close(got[name], expected, rtol=tol, atol=0)


def _tensors(H) -> list:
    """The tensors a curvature holds (a tensor, a Kron's factors, a tuple's)."""
    if isinstance(H, torch.Tensor):
        return [H]
    if hasattr(H, "kfacs"):
        return [F for block in H.kfacs for F in block]
    return [t for part in H for t in _tensors(part)]


CURVATURE_DTYPE_CASES = [
    ("all", "full"),
    ("all", "kron"),
    ("all", "diag"),
    ("all", "lowrank"),
    ("last_layer", "full"),
    ("last_layer", "kron"),
    ("last_layer", "diag"),
]


@pytest.mark.parametrize(("subset", "structure"), CURVATURE_DTYPE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_curvature_dtype_float64_holds_the_curvature_in_float64(
    dtype, subset, structure, device
):
    """``curvature_dtype=torch.float64``: the curvature and the posterior precision
    are float64; the predictive, the evidence, the tuned prior and the samples
    come in the model's dtype and equal the default's (float32 curvature) to the
    digits of that dtype."""
    model, X, y = _problem("regression", device)
    wide = torch.float64
    la, _ = _fit(model, X, y, "regression", subset, structure, dtype,
                 curvature_dtype=wide)  # fmt: skip
    assert all(t.dtype == wide for t in _tensors(la.H))
    if structure in ("full", "diag"):
        assert la.posterior_precision.dtype == wide
    got = _run(model, X, y, "regression", subset, structure, dtype,
               curvature_dtype=wide)  # fmt: skip
    reference = _run(model, X, y, "regression", subset, structure, dtype)
    tol = HALF_TOL.get(dtype, 1e-4)
    for name, value in got.items():
        assert value.dtype == dtype, name
        if name != "sample":  # draws differ between dtypes
            torch.testing.assert_close(value, reference[name], rtol=tol, atol=tol)


@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
def test_curvature_dtype_float64_sums_a_float32_models_batches_in_float64(
    structure, device
):
    """Over 32 batches of a float32 model, ``curvature_dtype=torch.float64`` sums
    the batches' float32 curvatures in float64: their exact sum, closer to it than
    the default float32 sum."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(device)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(128, 3, generator=g).to(device)
    y = torch.randn(128, 2, generator=g).to(device)
    loader = DataLoader(TensorDataset(X, y), batch_size=4)
    fits = {}
    for dtype in (None, torch.float64):
        la = Laplace(model, "regression", "all", structure, curvature_dtype=dtype)
        la.fit(loader)
        fits[dtype] = la
    batches = _batch_curvatures(fits[None], loader, structure, 128)
    flat = _flat if structure == "kron" else (lambda H: H)
    exact = sum(flat(H).double() for H in batches)
    wide, default = flat(fits[torch.float64].H), flat(fits[None].H)
    assert wide.dtype == torch.float64 and default.dtype == torch.float32
    torch.testing.assert_close(wide, exact, rtol=1e-12, atol=1e-12)
    assert (wide - exact).norm() < 1e-3 * (default.double() - exact).norm()


def test_curvature_dtype_refuses_what_it_cannot_hold(device):
    model, _, _ = _problem("regression", device)
    for bad in (torch.float16, torch.bfloat16, torch.int64, "float64"):
        with pytest.raises(ValueError, match="curvature_dtype must be None"):
            Laplace(model, "regression", "all", "full", curvature_dtype=bad)
    with pytest.raises(ValueError, match="less precise than the torch.float64"):
        Laplace(
            copy.deepcopy(model).double(), "regression", "all", "kron",
            curvature_dtype=torch.float32,
        )  # fmt: skip


def _batch_curvatures(la, loader, structure, N):
    """The backend's curvature of each batch, as the fit sees it (model dtype)."""
    out = []
    for x, y in loader:
        if structure == "kron":
            out.append(la.backend.kron(x, y, N=N)[1])
        else:
            out.append(getattr(la.backend, structure)(x, y)[1])
    return out


def _flat(H):
    """A Kron's factors, one vector (the fit adds the batches factor by factor)."""
    return torch.cat([F.flatten() for block in H.kfacs for F in block])


@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_16_bit_models_curvature_is_summed_in_float32(dtype, structure, device):
    """Over 32 batches the curvature is the float32 sum of the batches' curvatures
    (each computed in the model's dtype): closer to their exact sum than a sum in
    the model's dtype, which keeps two or three digits."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    model = model.to(device, dtype)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(128, 3, generator=g).to(device, dtype)
    y = torch.randn(128, 2, generator=g).to(device, dtype)
    loader = DataLoader(TensorDataset(X, y), batch_size=4)
    la = Laplace(model, "regression", "all", structure)
    la.fit(loader)
    batches = _batch_curvatures(la, loader, structure, 128)
    if structure == "kron":
        assert all(F.dtype == torch.float32 for b in la.H.kfacs for F in b)
        exact = sum(_flat(H).double() for H in batches)
        in_float32 = _flat(la.H).double()
        low = batches[0].clone()
        for H in batches[1:]:
            low += H
        in_low = _flat(low).double()
    else:
        assert la.H.dtype == torch.float32
        exact = sum(H.double() for H in batches)
        in_float32 = la.H.double()
        in_low = sum(batches[1:], batches[0].clone()).double()
    torch.testing.assert_close(in_float32, exact, rtol=1e-5, atol=1e-5)
    assert (in_float32 - exact).norm() < 0.1 * (in_low - exact).norm()
    # and the posterior is seen in the model's dtype
    assert la(X[:2])[1].dtype == dtype and la.sample(2).dtype == dtype


@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_one_noise_per_output_in_16_bits_equals_float32(dtype, structure, device):
    """A ``(C,)`` noise: the per-output curvatures in float32, the predictive and the
    evidence in the model's dtype, equal to float32's to the digits it carries."""
    model, X, y = _problem("regression", device)
    results = {}
    for run_dtype in (dtype, torch.float32):
        m = copy.deepcopy(model).to(run_dtype)
        sigma = torch.tensor([0.5, 2.0], device=device)
        la = Laplace(m, "regression", "all", structure, sigma_noise=sigma)
        data = TensorDataset(X.to(run_dtype), y.to(run_dtype))
        la.fit(DataLoader(data, batch_size=8))
        f_mu, f_var = la(X[:4].to(run_dtype))
        results[run_dtype] = (f_var, la.log_marginal_likelihood())
    f_var, lml = results[dtype]
    assert f_var.dtype == dtype and lml.dtype == dtype
    tol = HALF_TOL[dtype]
    ref_var, ref_lml = results[torch.float32]
    torch.testing.assert_close(f_var, ref_var.to(dtype), rtol=tol, atol=tol)
    torch.testing.assert_close(lml, ref_lml.to(dtype), rtol=tol, atol=0)


def _scalable(model, X, y, approximation, dtype):
    """ELLA or VaLLA of ``model`` in ``dtype``, fitted; and its predictive at X[:4]."""
    m = copy.deepcopy(model).to(dtype)
    Xd = X.to(dtype)
    if approximation == "nystrom":
        kwargs = {"subsample_size": 16, "n_eigenvalues": 4}
        fit_kwargs = {}
    else:  # explicit inducing inputs: trained by Adam with the posterior
        kwargs = {"inducing_locations": Xd[:4]}
        fit_kwargs = {"iterations": 10, "lr": 1e-2}
    la = Laplace(
        m, "classification", "all", "gp", functional_approximation=approximation,
        **kwargs,
    )  # fmt: skip
    la.fit(DataLoader(TensorDataset(Xd, y), batch_size=8), **fit_kwargs)
    return la, la(Xd[:4]), la._glm_distribution(Xd[:4], False, False)[1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("approximation", ["nystrom", "variational"])
def test_ella_and_valla_take_16_bit_models_and_equal_float32(
    approximation, dtype, device
):
    """The Jacobians are taken to float32, and the fitted posterior (ELLA's dual
    directions, VaLLA's factor, prior precision and trained inducing inputs) is
    held in float32: the predictive comes back in the model's dtype and equals
    float32's to the digits it carries. In float16, inducing inputs trained in the
    model's dtype overflow (Adam's moments underflow): they stay finite here."""
    model, X, y = _problem("classification", device)
    la, probs, var = _scalable(model, X, y, approximation, dtype)
    _, ref_probs, ref_var = _scalable(model, X, y, approximation, torch.float32)
    assert probs.dtype == dtype and var.dtype == dtype
    if approximation == "nystrom":
        assert la.dual_directions.dtype == torch.float32
    else:
        held = (la.L, la.log_prior_precision, la.inducing_locations)
        assert all(t.dtype == torch.float32 for t in held)
        assert bool(torch.isfinite(la.inducing_locations).all())
    tol = HALF_TOL[dtype]
    torch.testing.assert_close(var, ref_var.to(dtype), rtol=tol, atol=tol)
    torch.testing.assert_close(probs, ref_probs.to(dtype), rtol=tol, atol=tol)


@pytest.mark.parametrize("structure", ["full", "kron"])
def test_a_fitted_16_bit_laplace_copies_and_pickles(structure, device):
    """With its float32 posterior built (``CastForm``), a bfloat16 Laplace object
    deep-copies and pickles, and the copies predict as it does."""
    import pickle

    model, X, y = _problem("classification", device)
    model = copy.deepcopy(model).to(torch.bfloat16)
    la = Laplace(model, "classification", "all", structure)
    la.fit(DataLoader(TensorDataset(X.to(torch.bfloat16), y), batch_size=8))
    expected = la(X[:3].to(torch.bfloat16))
    for other in (copy.deepcopy(la), pickle.loads(pickle.dumps(la))):
        torch.testing.assert_close(other(X[:3].to(torch.bfloat16)), expected)
