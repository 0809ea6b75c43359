"""ELLA and VaLLA (laplace-torch 0.3's function-space methods), run by BOTH libraries.

``scenarios.py`` runs these scenarios in both processes, as its own; ``compare.py``
compares what they record with the harness's tolerances. Each scenario makes the
public calls a user of laplace-torch 0.3 makes (``Laplace(...,
functional_approximation="nystrom" | "variational")``, ``fit``, the GP predictive with
every link, ``predictive_moments``, ``functional_samples`` and
``predictive_samples`` with a generator, the explicit-Jacobian covariances, tuning,
checkpoints), before and after ``fit``, on tiny float64 and float32 MLPs with tensor
and mapping batches, for classification, regression and reward modeling; the bad
input of ``ella_valla_facts.md`` and the factory's routing and errors are scenarios
of their own.

Quantities that do not depend on a choice the libraries make differently are
recorded as they are; the others through what does not depend on it: ELLA's basis
directions are eigenvectors, each defined up to its sign, so the basis is compared
as ``V V^T``, ``|V|``, ``V G V^T`` and ``G``'s spectrum, not ``V`` and ``G`` entry by
entry; its Cholesky factor is read after a prediction (laplace-torch refactors it
lazily, at the next prediction after a hyperparameter changes). Keys under
``trajectory/`` depend on how a strategy orders or places VaLLA's inducing inputs
(``"random"``: the same inputs as laplace-torch's, in another order; ``"kmeans"``:
other centres) or on ELLA's balanced basis; ``compare.KNOWN`` lists them.

Importing this module imports neither torch nor laplace (``SCENARIOS`` lists names).
"""

from __future__ import annotations

import itertools

LIKELIHOODS = ("classification", "regression", "reward_modeling")
#: ELLA's basis on the 24 training inputs: subsample_size, n_eigenvalues
SUBSAMPLE, EIGENVALUES = 12, 6
#: VaLLA: inducing inputs, Adam iterations (four passes over three batches), lr
INDUCING, ITERATIONS, LR = 6, 12, 1e-2
GRID = dict(grid_size=8, log_prior_prec_min=-2, log_prior_prec_max=2)
N_DRAWS = 5  # functional samples compared draw by draw


def _scenarios() -> dict[str, dict]:
    table = {}
    for method, lik in itertools.product(("ella", "valla"), LIKELIHOODS):
        for dtype, batch in (
            ("float64", "tensor"),
            ("float32", "tensor"),
            ("float64", "dict"),
        ):
            table[f"{method}/{lik}/{dtype}/{batch}"] = dict(
                kind=method, likelihood=lik, dtype=dtype, batch=batch
            )
    # VaLLA's inducing strategies (single inputs: not for reward modeling) and its
    # other objectives; ELLA's balanced basis
    for lik in ("classification", "regression"):
        for strategy in ("random", "kmeans"):
            table[f"valla/{lik}/{strategy}"] = dict(
                kind="valla_strategy", likelihood=lik, strategy=strategy
            )
    table["valla/regression/alpha0"] = dict(
        kind="valla", likelihood="regression", dtype="float64", batch="tensor",
        options=dict(alpha=0.0),
    )  # fmt: skip
    table["valla/regression/alpha0.5"] = dict(
        kind="valla", likelihood="regression", dtype="float64", batch="tensor",
        options=dict(alpha=0.5, temperature=0.5, prior_precision=2.0,
                     sigma_noise=0.7),
    )  # fmt: skip
    table["valla/classification/mc"] = dict(
        kind="valla", likelihood="classification", dtype="float64", batch="tensor",
        options=dict(alpha=0.5, mc_softmax_samples=8, seed=3),
    )  # fmt: skip
    table["ella/classification/balanced"] = dict(kind="ella_balanced")
    table["ella/regression/hyperparameters"] = dict(
        kind="ella", likelihood="regression", dtype="float64", batch="tensor",
        options=dict(prior_precision=2.5, sigma_noise=0.7, temperature=0.5),
    )  # fmt: skip
    for case in ELLA_ERRORS:
        table[f"ella-errors/{case}"] = dict(kind="ella_errors", case=case)
    for case in VALLA_ERRORS:
        table[f"valla-errors/{case}"] = dict(kind="valla_errors", case=case)
    for case in FACTORY:
        table[f"factory/{case}"] = dict(kind="factory", case=case)
    return table


#: ELLA's bad input and undefined calls (see ella_valla_facts.md)
ELLA_ERRORS = [
    "n_eigenvalues_above_subsample",
    "n_eigenvalues_zero",
    "subsample_above_data",
    "rank_deficient_basis",
    "prior_mean_nonzero",
    "vector_prior_precision",
    "sigma_noise_classification",
    "predict_before_fit",
    "moments_before_fit",
    "state_dict_before_fit",
    "empty_input",
    "balanced_regression",
    "tuning_marglik",
    "tuning_without_val_loader",
    "tuning_pred_type_nn",
    "tuning_n_steps",
    "tuning_before_fit",
    "hyperparameters_empty_grid",
    "hyperparameters_pairs_classification",
    "hyperparameters_before_fit",
    "pred_type_nn",
    "load_other_weights",
    "load_other_architecture",
    "load_other_likelihood",
    "load_other_configuration",
    "load_unfitted",
]
#: VaLLA's
VALLA_ERRORS = [
    "alpha_above_one",
    "alpha_negative",
    "classification_alpha_without_mc",
    "mc_samples_negative",
    "num_inducing_mismatch",
    "strategy_without_num_inducing",
    "unknown_strategy",
    "classes_wrong_length",
    "num_inducing_above_data",
    "classes_out_of_range",
    "classes_float",
    "classes_with_strategy",
    "strategy_reward_modeling",
    "prior_mean_nonzero",
    "vector_prior_precision",
    "prior_precision_negative",
    "predict_before_fit",
    "state_dict_before_fit",
    "log_marginal_likelihood",
    "log_likelihood",
    "optimize_prior_precision",
    "iterations_zero",
    "lr_negative",
    "val_steps_zero",
    "pred_type_nn",
    "sample",
    "empty_input",
    "load_other_weights",
]
#: the factory's routing to the function-space methods, and its errors
FACTORY = [
    "nystrom",
    "nystrom_enum",
    "variational",
    "sod",
    "sod_default",
    "nystrom_last_layer",
    "variational_last_layer",
    "nystrom_subnetwork",
    "nystrom_kron",
    "nystrom_missing_arguments",
    "variational_missing_locations",
    "unknown_approximation",
    "enum_members",
]

SCENARIOS = _scenarios()


# -- building blocks -----------------------------------------------------------------
class Problem:
    """A trained tiny MLP of a likelihood and its data, as ``scenarios.run_class``
    builds them (the helpers ``h`` are that module's)."""

    def __init__(self, h, likelihood: str, dtype: str, batch: str):
        torch = h._torch()
        self.h, self.torch = h, torch
        self.likelihood, self.batch = likelihood, batch
        self.dtype = getattr(torch, dtype)
        self.dict_input = batch == "dict"
        self.model = h.make_model(
            "mlp", likelihood, self.dtype, dict_input=self.dict_input
        )
        self.X, self.y = h.make_data("mlp", likelihood, self.dtype, h.N_TRAIN, seed=1)
        self.loader = h.make_loader(self.X, self.y, batch)
        Xv, yv = h.make_data("mlp", likelihood, self.dtype, 12, seed=2)
        self.val_loader = h.make_loader(Xv, yv, batch)
        self.x = h.test_inputs(dict(model="mlp", batch=batch), self.dtype)
        h.train(self.model, self.X, self.y, likelihood, self.dict_input)
        self.keys = dict(dict_key_x="x", dict_key_y="y") if self.dict_input else {}

    def single_inputs(self, n: int):
        """``n`` training inputs as the model takes one (a reward model's first
        items), in the batch's form."""
        X = self.X[:n, 0] if self.likelihood == "reward_modeling" else self.X[:n]
        return {"x": X} if self.dict_input else X

    def jacobians(self):
        """``(B, C, P)`` Jacobians of the outputs at the test inputs, by torch.func
        (the same in both processes)."""
        torch = self.torch
        from torch.func import functional_call, jacrev

        names = [n for n, _ in self.model.named_parameters()]
        params = tuple(p.detach() for _, p in self.model.named_parameters())

        def f(*values):
            return functional_call(self.model, dict(zip(names, values)), (self.x,))

        blocks = jacrev(f, argnums=tuple(range(len(params))))(*params)
        B, C = blocks[0].shape[:2]
        return torch.cat([b.reshape(B, C, -1) for b in blocks], dim=-1)


def _dense(history: dict, dtype, torch) -> dict:
    """A fit history with its lists of numbers as tensors of the scenario's dtype
    (so that float32 scenarios are compared at float32 tolerances)."""
    out = {}
    for key, values in history.items():
        if values and isinstance(values[0], dict):
            out[key] = {
                name: torch.tensor([v[name] for v in values], dtype=dtype)
                for name in values[0]
            }
        else:
            out[key] = torch.tensor([float(v) for v in values], dtype=dtype)
    return out


def predictions(p: Problem, la, rec, prefix: str = "") -> None:
    """The GP predictive (every link, joint for regression), the moments, the
    samples and the explicit-Jacobian covariances of a fitted ``la``."""
    h, torch, x = p.h, p.torch, p.x
    if p.likelihood == "classification":
        for link in ("probit", "bridge", "bridge_norm"):
            rec(f"{prefix}pred/gp/{link}", lambda link=link: la(
                x, pred_type="gp", link_approx=link))  # fmt: skip
        gen = torch.Generator().manual_seed(7)
        probs = rec(f"{prefix}pred/gp/mc~", lambda: la(
            x, pred_type="gp", link_approx="mc", n_samples=h.N_SAMPLES,
            generator=gen))  # fmt: skip
        if probs is not None:
            rec(f"{prefix}pred/gp/mc~@se", lambda: h.mc_se(probs, "probs"))
        rec(f"{prefix}pred/glm/probit", lambda: la(
            x, pred_type="glm", link_approx="probit"))  # fmt: skip
    else:
        rec(f"{prefix}pred/gp", lambda: la(x, pred_type="gp"))
        rec(f"{prefix}pred/gp/joint", lambda: la(x, pred_type="gp", joint=True))
        rec(f"{prefix}pred/glm", lambda: la(x, pred_type="glm"))
    rec(f"{prefix}pred/nn", lambda: la(x, pred_type="nn", link_approx="mc"))
    rec(f"{prefix}moments", lambda: la.predictive_moments(x))
    rec(f"{prefix}moments/joint", lambda: la.predictive_moments(x, joint=True))
    if prefix:
        return
    for name in ("functional_samples", "predictive_samples"):
        draw = getattr(la, name)
        gen = torch.Generator().manual_seed(11)
        rec(f"{name}/draws", lambda draw=draw, gen=gen: draw(
            x, pred_type="gp", n_samples=N_DRAWS, generator=gen))  # fmt: skip
        gen = torch.Generator().manual_seed(12)
        s = rec(f"{name}/many/shape", lambda draw=draw, gen=gen: tuple(
            draw(x, pred_type="gp", n_samples=h.N_SAMPLES, generator=gen).shape
        ))  # fmt: skip
        if s is not None:
            gen = torch.Generator().manual_seed(12)
            d = draw(x, pred_type="gp", n_samples=h.N_SAMPLES, generator=gen)
            rec(f"{name}/mean~", lambda d=d: d.mean(0))
            rec(f"{name}/std~", lambda d=d: d.std(0))
            se = h.mc_se((d.mean(0), d.std(0)), "sample")
            rec(f"{name}/mean~@se", lambda se=se: se[0])
            rec(f"{name}/std~@se", lambda se=se: se[1])
    gen = torch.Generator().manual_seed(13)
    rec("functional_samples/nn/shape", lambda: tuple(la.functional_samples(
        x, pred_type="nn", n_samples=7, generator=gen).shape))  # fmt: skip
    gen = torch.Generator().manual_seed(14)
    rec("functional_samples/joint/shape", lambda: tuple(la.functional_samples(
        x, pred_type="gp", n_samples=7, generator=gen, joint=True).shape))  # fmt: skip
    J = p.jacobians()
    rec("functional_variance", lambda: la.functional_variance(J))
    rec("functional_covariance", lambda: la.functional_covariance(J))


def undefined(la, rec) -> None:
    """What neither method defines."""
    rec("log_marginal_likelihood", lambda: la.log_marginal_likelihood())
    rec("log_likelihood", lambda: la.log_likelihood)
    rec("sample", lambda: la.sample(3))


def checkpoint(p: Problem, la, rec, build, names: tuple[str, ...]) -> None:
    """The state dict's keys and plain values (its fit history's numbers as
    tensors), and a round trip into a fresh object of the same configuration."""
    state = rec("state_dict/keys", lambda: sorted(la.state_dict()))
    if state is None:
        return
    sd = la.state_dict()
    for name in names:
        value = sd[name]
        if name == "fit_history":
            value = _dense(value, p.dtype, p.torch)
        rec(f"state_dict/{name}", lambda value=value: value)
    rec("state_dict/model_fingerprint", lambda: sorted(sd["model_fingerprint"]))

    def round_trip():
        other = build()
        other.load_state_dict(sd)
        return other(p.x, pred_type="gp")

    rec("state_dict/round_trip", round_trip)


# -- ELLA ------------------------------------------------------------------------------
ELLA_STATE = (
    "cls_name", "n_params", "likelihood", "subsample_size", "n_eigenvalues",
    "prior_precision", "sigma_noise", "temperature", "n_data", "n_outputs", "fitted",
    "seed", "dict_key_x", "dict_key_y", "backend_class", "enable_backprop",
)  # fmt: skip


def ella_of(laplace, p: Problem, **kw):
    kw = {"subsample_size": SUBSAMPLE, "n_eigenvalues": EIGENVALUES, **p.keys, **kw}
    return laplace.Laplace(
        p.model, p.likelihood, "all", "gp", functional_approximation="nystrom", **kw
    )


def basis(la, rec, prefix: str = "") -> None:
    """ELLA's basis and posterior, through what does not depend on the signs of
    the directions."""
    import torch

    V, G = la.dual_directions, la.feature_gram
    rec(f"{prefix}dual_directions/shape", lambda: tuple(V.shape))
    rec(f"{prefix}dual_directions/dtype", lambda: str(V.dtype))
    rec(f"{prefix}dual_directions/VVt", lambda: V @ V.T)
    rec(f"{prefix}dual_directions/abs", lambda: V.abs())
    rec(f"{prefix}feature_gram/diag", lambda: G.diagonal())
    rec(f"{prefix}feature_gram/VGVt", lambda: V @ G @ V.T)
    rec(f"{prefix}feature_gram/eigvalsh", lambda: torch.linalg.eigvalsh(G))
    rec(f"{prefix}chol_precision/diag", lambda: la.chol_precision.diagonal())


def run_ella(laplace, spec: dict, rec, h) -> None:
    p = Problem(h, spec["likelihood"], spec["dtype"], spec["batch"])
    torch, x, options = p.torch, p.x, spec.get("options", {})

    def build(**kw):
        return ella_of(laplace, p, **{**options, **kw})

    la = rec("construct", build)
    if la is None:
        return
    rec("construct", lambda: type(la).__name__)
    rec("before_fit/fit_history", lambda: sorted(la.fit_history_))
    for name in ("dual_directions", "feature_gram", "chol_precision"):
        rec(f"before_fit/{name}", lambda name=name: getattr(la, name))
    for name in ("prior_precision", "sigma_noise", "temperature", "prior_mean"):
        rec(f"before_fit/{name}", lambda name=name: getattr(la, name))
    rec("before_fit/predict", lambda: la(x, pred_type="gp"))
    rec("before_fit/moments", lambda: la.predictive_moments(x))
    rec("before_fit/state_dict", lambda: sorted(la.state_dict()))
    if rec("fit", lambda: la.fit(p.loader) or "fitted") is None:
        return
    for name in ("n_data", "n_outputs", "n_params", "prior_precision", "sigma_noise"):
        rec(name, lambda name=name: getattr(la, name))
    rec("fit_history", lambda: _dense(la.fit_history_, p.dtype, torch))
    basis(la, rec)
    predictions(p, la, rec)
    undefined(la, rec)
    checkpoint(p, la, rec, build, ELLA_STATE + ("fit_history",))

    def other_seed():
        other = build(seed=7)
        other.fit(p.loader)
        return other.dual_directions @ other.dual_directions.T

    rec("seed7/VVt", other_seed)
    # a new prior precision (and noise) rebuilds the posterior, without a refit
    la.prior_precision = 2.0
    if p.likelihood == "regression":
        la.sigma_noise = 0.5
    predictions(p, la, rec, prefix="rescaled/")
    # read after a prediction: laplace-torch refactors lazily, at the next one
    rec("rescaled/chol_precision/diag", lambda: la.chol_precision.diagonal())
    # validation during fit
    val = build()
    if rec("val/fit", lambda: val.fit(p.loader, val_loader=p.val_loader) or "ok"):
        rec("val/fit_history", lambda: _dense(val.fit_history_, p.dtype, torch))
    # every 2 of the 3 batches: laplace-torch scores after the 2nd and the last
    val = build()
    if rec("val/steps", lambda: val.fit(
            p.loader, val_loader=p.val_loader, val_steps=2) or "ok"):  # fmt: skip
        rec("val/steps/fit_history", lambda: _dense(val.fit_history_, p.dtype, torch))
    # tuning: a grid search on the GP predictive, then a grid of candidates
    tuned = build()
    tuned.fit(p.loader)
    if rec("optimize/gridsearch", lambda: tuned.optimize_prior_precision(
            pred_type="gp", method="gridsearch", val_loader=p.val_loader,
            **GRID) or "ok"):  # fmt: skip
        rec("optimize/gridsearch/prior_precision", lambda: tuned.prior_precision)
        rec("optimize/gridsearch/history", lambda: _dense(
            tuned.fit_history_, p.dtype, torch))  # fmt: skip
        basis(tuned, rec, prefix="optimize/gridsearch/")
    rec("optimize/marglik", lambda: tuned.optimize_prior_precision(method="marglik"))
    rec("optimize/verbose", lambda: tuned.optimize_prior_precision(
        val_loader=p.val_loader, grid_size=3, verbose=True) or "ok")  # fmt: skip
    grids = {"scalars": [0.1, 1.0, 10.0]}
    if p.likelihood == "regression":
        grids["pairs"] = [(0.1, 0.5), (1.0, 1.0), (10.0, 2.0), (3.0, 0.7)]
    for kind, grid in grids.items():
        key = f"optimize/hyperparameters/{kind}"
        hyper = build()
        hyper.fit(p.loader)
        if rec(key, lambda hyper=hyper, grid=grid: hyper.optimize_hyperparameters(
                p.val_loader, grid) or "ok"):  # fmt: skip
            rec(f"{key}/prior_precision", lambda hyper=hyper: hyper.prior_precision)
            rec(f"{key}/sigma_noise", lambda hyper=hyper: hyper.sigma_noise)
            rec(f"{key}/history", lambda hyper=hyper: _dense(
                hyper.fit_history_, p.dtype, torch))  # fmt: skip
            rec(f"{key}/pred", lambda hyper=hyper: hyper(x, pred_type="gp"))


def run_ella_balanced(laplace, rec, h) -> None:
    p = Problem(h, "classification", "float64", "tensor")
    la = ella_of(laplace, p)
    if rec("fit", lambda: la.fit(p.loader, balanced=True) or "fitted") is None:
        return
    basis(la, rec, prefix="trajectory/")
    rec("trajectory/pred", lambda: la(p.x, pred_type="gp"))


# -- VaLLA -----------------------------------------------------------------------------
VALLA_STATE = (
    "cls_name", "n_params", "likelihood", "inducing_classes", "inducing_strategy",
    "initial_inducing_classes", "L", "log_prior_precision", "log_noise_variance",
    "temperature", "alpha", "mc_softmax_samples", "n_data", "n_outputs", "fitted",
    "seed", "dict_key_x", "dict_key_y", "backend_class", "enable_backprop",
    "fit_history",
)  # fmt: skip


def valla_of(laplace, p: Problem, locations, **kw):
    return laplace.Laplace(
        p.model, p.likelihood, "all", "gp", functional_approximation="variational",
        inducing_locations=locations, **p.keys, **kw,
    )  # fmt: skip


def hyperparameters(la, rec, prefix: str) -> None:
    for name in (
        "prior_precision", "log_prior_precision", "sigma_noise", "log_noise_variance",
    ):  # fmt: skip
        rec(f"{prefix}{name}", lambda name=name: getattr(la, name))


def run_valla(laplace, spec: dict, rec, h) -> None:
    p = Problem(h, spec["likelihood"], spec["dtype"], spec["batch"])
    torch, x, options = p.torch, p.x, dict(spec.get("options", {}))
    Z = p.single_inputs(INDUCING)
    if p.likelihood == "classification":
        options.setdefault("inducing_classes", p.y[:INDUCING].clone())

    def build(**kw):
        return valla_of(laplace, p, Z, **{**options, **kw})

    la = rec("construct", build)
    if la is None:
        return
    rec("construct", lambda: type(la).__name__)
    rec("before_fit/L", lambda: la.L)
    rec("before_fit/inducing_locations", lambda: la.inducing_locations)
    rec("before_fit/inducing_classes", lambda: la.inducing_classes)
    rec("before_fit/fit_history", lambda: sorted(la.fit_history_))
    hyperparameters(la, rec, "before_fit/")
    rec("before_fit/predict", lambda: la(x, pred_type="gp"))
    rec("before_fit/state_dict", lambda: sorted(la.state_dict()))
    fit = rec("fit", lambda: la.fit(
        p.loader, iterations=ITERATIONS, lr=LR) or "fitted")  # fmt: skip
    if fit is None:
        return
    rec("fit_history", lambda: _dense(la.fit_history_, p.dtype, torch))
    rec("L", lambda: la.L)
    rec("inducing_locations", lambda: la.inducing_locations)
    rec("inducing_classes", lambda: la.inducing_classes)
    hyperparameters(la, rec, "")
    for name in ("n_data", "n_outputs", "n_params"):
        rec(name, lambda name=name: getattr(la, name))
    predictions(p, la, rec)
    undefined(la, rec)
    rec("optimize_prior_precision", lambda: la.optimize_prior_precision())
    checkpoint(p, la, rec, build, VALLA_STATE)
    # a set prior precision is the posterior's at once
    la.prior_precision = 2.0
    predictions(p, la, rec, prefix="rescaled/")
    # continuing a fit, and validation during one
    if rec("continue", lambda: la.fit(
            p.loader, iterations=3, lr=LR, override=False) or "ok"):  # fmt: skip
        rec("continue/fit_history", lambda: _dense(la.fit_history_, p.dtype, torch))
        rec("continue/L", lambda: la.L)
        hyperparameters(la, rec, "continue/")
    # every 2 of 5 steps: laplace-torch scores after the 2nd, 4th and last
    val = build()
    if rec("val/steps", lambda: val.fit(
            p.loader, iterations=5, lr=LR, val_loader=p.val_loader,
            val_steps=2) or "ok"):  # fmt: skip
        rec("val/steps/fit_history", lambda: _dense(val.fit_history_, p.dtype, torch))
    val = build()
    if rec("val/end", lambda: val.fit(
            p.loader, iterations=2, lr=LR, val_loader=p.val_loader
    ) or "ok"):  # fmt: skip
        rec("val/end/fit_history", lambda: _dense(val.fit_history_, p.dtype, torch))


def _sorted_rows(t):
    """The rows of ``t`` ``(M, D)`` in lexicographic order, and the permutation."""
    order = sorted(range(t.shape[0]), key=lambda i: t[i].tolist())
    return t[order], order


def run_valla_strategy(laplace, spec: dict, rec, h) -> None:
    """A strategy draws the inducing inputs: the same set as laplace-torch's for
    'random', in another order (what depends on the order is under
    ``trajectory/``); 'kmeans' differs (its centres are this library's own)."""
    p = Problem(h, spec["likelihood"], "float64", "tensor")
    strategy = spec["strategy"]

    def build():
        return valla_of(laplace, p, strategy, num_inducing=INDUCING)

    la = rec("construct", build)
    if la is None:
        return
    rec("construct", lambda: type(la).__name__)
    rec("before_fit/inducing_locations", lambda: la.inducing_locations)
    rec("before_fit/inducing_classes", lambda: la.inducing_classes)
    # one step of a vanishing rate: the drawn inputs, as drawn; with 'random' the
    # same set as laplace-torch's (hence the same first objective), in another order
    if rec("fit", lambda: la.fit(p.loader, iterations=1, lr=1e-12) or "ok") is None:
        return
    drawn = "drawn/" if strategy == "random" else "trajectory/"
    rec(f"{drawn}objective", lambda: la.fit_history_["objective"][0])
    rows, order = _sorted_rows(la.inducing_locations.detach())
    rec(f"{drawn}inducing_locations_sorted", lambda: rows)
    rec(f"{drawn}inducing_classes_sorted", lambda: la.inducing_classes[order])
    la.fit(p.loader, iterations=ITERATIONS, lr=LR)
    rec("trajectory/fit_history", lambda: _dense(la.fit_history_, p.dtype, p.torch))
    hyperparameters(la, rec, "trajectory/")
    rec("trajectory/pred", lambda: la(p.x, pred_type="gp"))


# -- bad input -------------------------------------------------------------------------
def run_ella_errors(laplace, case: str, rec, h) -> None:
    torch = h._torch()
    cls = Problem(h, "classification", "float64", "tensor")
    reg = Problem(h, "regression", "float64", "tensor")

    def fitted(p=cls, **kw):
        la = ella_of(laplace, p, **kw)
        la.fit(p.loader)
        return la

    def dup_loader():
        from torch.utils.data import DataLoader, TensorDataset

        X = cls.X[:1].repeat(cls.X.shape[0], 1)
        return DataLoader(TensorDataset(X, cls.y), batch_size=8)

    def other_model():
        p = Problem(h, "classification", "float64", "tensor")
        with torch.no_grad():
            p.model[0].weight.add_(0.1)
        return p

    def wider():
        p = Problem(h, "classification", "float64", "tensor")
        p.model = torch.nn.Sequential(
            torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
        ).double()
        return p

    calls = {
        "n_eigenvalues_above_subsample": lambda: ella_of(
            laplace, cls, subsample_size=4, n_eigenvalues=5),
        "n_eigenvalues_zero": lambda: ella_of(laplace, cls, n_eigenvalues=0),
        "subsample_above_data": lambda: ella_of(
            laplace, cls, subsample_size=30, n_eigenvalues=4).fit(cls.loader),
        "rank_deficient_basis": lambda: ella_of(laplace, cls).fit(dup_loader()),
        "prior_mean_nonzero": lambda: ella_of(laplace, cls, prior_mean=1.0),
        "vector_prior_precision": lambda: ella_of(
            laplace, cls, prior_precision=torch.ones(3, dtype=torch.float64)),
        "sigma_noise_classification": lambda: ella_of(laplace, cls, sigma_noise=0.5),
        "predict_before_fit": lambda: ella_of(laplace, cls)(cls.x, pred_type="gp"),
        "moments_before_fit": lambda: ella_of(laplace, cls).predictive_moments(cls.x),
        "state_dict_before_fit": lambda: ella_of(laplace, cls).state_dict(),
        "empty_input": lambda: fitted()(cls.x[:0], pred_type="gp"),
        "balanced_regression": lambda: ella_of(laplace, reg).fit(
            reg.loader, balanced=True),
        "tuning_marglik": lambda: fitted().optimize_prior_precision(method="marglik"),
        "tuning_without_val_loader": lambda: fitted().optimize_prior_precision(),
        "tuning_pred_type_nn": lambda: fitted().optimize_prior_precision(
            pred_type="nn", val_loader=cls.val_loader),
        "tuning_n_steps": lambda: fitted().optimize_prior_precision(
            val_loader=cls.val_loader, n_steps=5),
        "tuning_before_fit": lambda: ella_of(laplace, cls).optimize_prior_precision(
            val_loader=cls.val_loader),
        "hyperparameters_empty_grid": lambda: fitted().optimize_hyperparameters(
            cls.val_loader, []),
        "hyperparameters_pairs_classification": lambda: fitted(
            ).optimize_hyperparameters(cls.val_loader, [(1.0, 2.0)]),
        "hyperparameters_before_fit": lambda: ella_of(
            laplace, cls).optimize_hyperparameters(cls.val_loader, [1.0]),
        "pred_type_nn": lambda: fitted()(cls.x, pred_type="nn"),
        "load_other_weights": lambda: ella_of(laplace, other_model()).load_state_dict(
            fitted().state_dict()),
        "load_other_architecture": lambda: ella_of(laplace, wider()).load_state_dict(
            fitted().state_dict()),
        "load_other_likelihood": lambda: laplace.Laplace(
            cls.model, "regression", "all", "gp", functional_approximation="nystrom",
            subsample_size=SUBSAMPLE, n_eigenvalues=EIGENVALUES).load_state_dict(
                fitted().state_dict()),
        "load_unfitted": lambda: ella_of(laplace, cls).load_state_dict(
            {**fitted().state_dict(), "fitted": False}),
    }  # fmt: skip
    if case == "load_other_configuration":
        other = ella_of(
            laplace, cls, subsample_size=10, n_eigenvalues=2, seed=7,
            prior_precision=3.0,
        )  # fmt: skip
        if rec("result", lambda: other.load_state_dict(fitted().state_dict()) or "ok"):
            for name in ("subsample_size", "n_eigenvalues", "seed", "prior_precision"):
                rec(name, lambda name=name: getattr(other, name))
            rec("pred", lambda: other(cls.x, pred_type="gp"))
        return
    rec("result", lambda: f"no error ({type(calls[case]()).__name__})")


def run_valla_errors(laplace, case: str, rec, h) -> None:
    torch = h._torch()
    cls = Problem(h, "classification", "float64", "tensor")
    rew = Problem(h, "reward_modeling", "float64", "tensor")
    Z = cls.X[:INDUCING]

    def make(p=cls, locations=Z, **kw):
        return valla_of(laplace, p, locations, **kw)

    def fitted(**kw):
        la = make(**kw)
        la.fit(cls.loader, iterations=2, lr=LR)
        return la

    def other_model():
        p = Problem(h, "classification", "float64", "tensor")
        with torch.no_grad():
            p.model[0].weight.add_(0.1)
        return p

    long = torch.long
    calls = {
        "alpha_above_one": lambda: make(alpha=1.5),
        "alpha_negative": lambda: make(alpha=-0.1),
        "classification_alpha_without_mc": lambda: make(alpha=0.5),
        "mc_samples_negative": lambda: make(mc_softmax_samples=-1),
        "num_inducing_mismatch": lambda: make(num_inducing=INDUCING + 1),
        "strategy_without_num_inducing": lambda: make(locations="random"),
        "unknown_strategy": lambda: make(locations="grid", num_inducing=3),
        "classes_wrong_length": lambda: make(
            inducing_classes=torch.zeros(INDUCING + 1, dtype=long)),
        "num_inducing_above_data": lambda: make(
            locations="random", num_inducing=30).fit(cls.loader, iterations=1),
        "classes_out_of_range": lambda: make(
            inducing_classes=torch.full((INDUCING,), 5, dtype=long)).fit(
                cls.loader, iterations=1),
        "classes_float": lambda: make(
            inducing_classes=torch.zeros(INDUCING, dtype=torch.float64)).fit(
                cls.loader, iterations=1),
        "classes_with_strategy": lambda: make(
            locations="random", num_inducing=3,
            inducing_classes=torch.zeros(3, dtype=long)),
        "strategy_reward_modeling": lambda: make(
            rew, locations="random", num_inducing=3).fit(rew.loader, iterations=1),
        "prior_mean_nonzero": lambda: make(prior_mean=1.0),
        "vector_prior_precision": lambda: make(
            prior_precision=torch.ones(3, dtype=torch.float64)),
        "prior_precision_negative": lambda: make(prior_precision=-1.0),
        "predict_before_fit": lambda: make()(cls.x, pred_type="gp"),
        "state_dict_before_fit": lambda: make().state_dict(),
        "log_marginal_likelihood": lambda: fitted().log_marginal_likelihood(),
        "log_likelihood": lambda: fitted().log_likelihood,
        "optimize_prior_precision": lambda: fitted().optimize_prior_precision(),
        "iterations_zero": lambda: make().fit(cls.loader, iterations=0),
        "lr_negative": lambda: make().fit(cls.loader, iterations=1, lr=-1.0),
        "val_steps_zero": lambda: make().fit(
            cls.loader, iterations=1, val_loader=cls.val_loader, val_steps=0),
        "pred_type_nn": lambda: fitted()(cls.x, pred_type="nn"),
        "sample": lambda: fitted().sample(3),
        "empty_input": lambda: fitted()(cls.x[:0], pred_type="gp"),
        "load_other_weights": lambda: make(other_model()).load_state_dict(
            fitted().state_dict()),
    }  # fmt: skip
    rec("result", lambda: f"no error ({type(calls[case]()).__name__})")


def run_factory(laplace, case: str, rec, h) -> None:
    p = Problem(h, "classification", "float64", "tensor")
    L, m = laplace.Laplace, p.model
    nystrom = dict(subsample_size=SUBSAMPLE, n_eigenvalues=EIGENVALUES)
    if case == "enum_members":
        members = laplace.FunctionalApproximation
        rec("result", lambda: [(e.name, e.value) for e in members])
        rec("from_string", lambda: members("nystrom").name)
        return
    calls = {
        "nystrom": lambda: L(m, "classification", "all", "gp",
                             functional_approximation="nystrom", **nystrom),
        "nystrom_enum": lambda: L(
            m, "classification", "all", "gp",
            functional_approximation=laplace.FunctionalApproximation.NYSTROM,
            **nystrom),
        "variational": lambda: L(m, "classification", "all", "gp",
                                 functional_approximation="variational",
                                 inducing_locations=p.X[:INDUCING]),
        "sod": lambda: L(m, "classification", "all", "gp",
                         functional_approximation="sod", n_subset=10),
        "sod_default": lambda: L(m, "classification", "last_layer", "gp",
                                 n_subset=10),
        "nystrom_last_layer": lambda: L(m, "classification", "last_layer", "gp",
                                        functional_approximation="nystrom",
                                        **nystrom),
        "variational_last_layer": lambda: L(
            m, "classification", "last_layer", "gp",
            functional_approximation="variational",
            inducing_locations=p.X[:INDUCING]),
        "nystrom_subnetwork": lambda: L(m, "classification", "subnetwork", "gp",
                                        functional_approximation="nystrom",
                                        **nystrom),
        "nystrom_kron": lambda: L(m, "classification", "all", "kron",
                                  functional_approximation="nystrom", **nystrom),
        "nystrom_missing_arguments": lambda: L(
            m, "classification", "all", "gp", functional_approximation="nystrom"),
        "variational_missing_locations": lambda: L(
            m, "classification", "all", "gp",
            functional_approximation="variational"),
        "unknown_approximation": lambda: L(m, "classification", "all", "gp",
                                           functional_approximation="exact"),
    }  # fmt: skip
    rec("result", lambda: type(calls[case]()).__name__)


#: the runner of each kind of scenario: ``(laplace, spec, rec, h)``
RUNNERS = {
    "ella": run_ella,
    "ella_balanced": lambda laplace, spec, rec, h: run_ella_balanced(laplace, rec, h),
    "valla": run_valla,
    "valla_strategy": run_valla_strategy,
    "ella_errors": lambda laplace, spec, rec, h: run_ella_errors(
        laplace, spec["case"], rec, h),
    "valla_errors": lambda laplace, spec, rec, h: run_valla_errors(
        laplace, spec["case"], rec, h),
    "factory": lambda laplace, spec, rec, h: run_factory(
        laplace, spec["case"], rec, h),
}  # fmt: skip


def run(laplace, name: str, rec, h) -> None:
    """Run the scenario ``name`` (a key of ``SCENARIOS``) with ``laplace``; ``h`` is
    the ``scenarios`` module (its model, data and recording helpers)."""
    spec = SCENARIOS[name]
    RUNNERS[spec["kind"]](laplace, spec, rec, h)
