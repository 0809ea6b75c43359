"""The calls the compatibility harness makes, run by BOTH libraries.

This script is the one source of truth for the differential harness: the pytest side
(``test_compat.py``) runs it twice, once with this checkout's interpreter and once with
laplace-torch 0.3's (``.lt-venv``), and compares what the two runs wrote. Two families
of scenarios live in modules of their own, run through this script: laplace-torch's
example workflows (``workflows.py``) and the function-space methods ELLA and VaLLA
(``ella_valla.py``).

``python scenarios.py --out DIR [--only GLOB ...] [--readme FILE]`` imports whichever
``laplace`` the interpreter finds, runs every scenario (or those matching a glob) and
writes ``DIR/<scenario>.pt``: a dict from a quantity's name to ``("ok", value)`` or
``("error", type name, message)``. ``DIR/meta.pt`` records the torch version, where
``laplace`` came from and the first model's weights, so the comparing side can check
that both processes built the same models.

Enumerating the scenarios (``scenario_names()``) imports neither torch nor laplace, so
pytest can parametrize over them cheaply.
"""

from __future__ import annotations

import argparse
import fnmatch
import itertools
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ella_valla  # noqa: E402 (this directory's, whichever interpreter runs this)
import workflows  # noqa: E402

#: (subset_of_weights, hessian_structure) the factory offers
CLASSES = [
    ("all", "full"),
    ("all", "kron"),
    ("all", "diag"),
    ("all", "lowrank"),
    ("all", "gp"),
    ("last_layer", "full"),
    ("last_layer", "kron"),
    ("last_layer", "diag"),
    ("last_layer", "gp"),
    ("subnetwork", "full"),
    ("subnetwork", "diag"),
]
LIKELIHOODS = ["classification", "regression", "reward_modeling"]
BACKENDS = [
    "CurvlinopsGGN",
    "CurvlinopsEF",
    "CurvlinopsHessian",
    "BackPackGGN",
    "BackPackEF",
    "AsdlGGN",
    "AsdlEF",
    "AsdlHessian",
]
N_TRAIN = 24
N_TEST = 5
N_SAMPLES = 1000  # Monte Carlo samples: moments are compared, not raw draws
GRID = dict(grid_size=8, log_prior_prec_min=-2, log_prior_prec_max=2)


def scenario_table() -> dict[str, dict]:
    """Every scenario's name and parameters (no torch import)."""
    table = {}
    # every class x likelihood, float64 tensors, the default backend: the full set
    # of quantities, before and after fit
    for (subset, structure), lik in itertools.product(CLASSES, LIKELIHOODS):
        for dtype, batch in [("float64", "tensor"), ("float32", "tensor")]:
            name = f"cls/{subset}-{structure}/{lik}/{dtype}/{batch}"
            table[name] = dict(
                kind="class", subset=subset, structure=structure, likelihood=lik,
                dtype=dtype, batch=batch, backend=None, model="mlp",
            )  # fmt: skip
        name = f"cls/{subset}-{structure}/{lik}/float64/dict"
        table[name] = dict(
            kind="class", subset=subset, structure=structure, likelihood=lik,
            dtype="float64", batch="dict", backend=None, model="mlp",
        )  # fmt: skip
    # every backend x structure: the curvature and what follows from it
    for backend, (subset, structure), lik in itertools.product(
        BACKENDS,
        [("all", "full"), ("all", "kron"), ("all", "diag"), ("last_layer", "diag")],
        ["classification", "regression"],
    ):
        name = f"backend/{backend}/{subset}-{structure}/{lik}"
        table[name] = dict(
            kind="backend", subset=subset, structure=structure, likelihood=lik,
            dtype="float64", batch="tensor", backend=backend, model="mlp",
        )  # fmt: skip
    # a model that reshapes (convolution, flatten): full and diag curvature
    for backend, structure in itertools.product(
        ["CurvlinopsGGN", "BackPackGGN", "AsdlGGN", "CurvlinopsEF"],
        ["full", "kron", "diag"],
    ):
        name = f"backend/{backend}/all-{structure}/classification/conv"
        table[name] = dict(
            kind="backend", subset="all", structure=structure,
            likelihood="classification", dtype="float64", batch="tensor",
            backend=backend, model="conv",
        )  # fmt: skip
    # bad input: the error types
    for case in BAD_INPUT:
        table[f"errors/{case}"] = dict(kind="errors", case=case)
    # laplace-torch's example workflows, written anew (workflows.py)
    for name in workflows.WORKFLOWS:
        table[f"workflow/{name}"] = dict(kind="workflow", workflow=name)
    # ELLA and VaLLA (ella_valla.py)
    for name in ella_valla.SCENARIOS:
        table[name] = dict(kind="ella_valla")
    return table


#: bad input, each a small call that both libraries should refuse
BAD_INPUT = [
    "unknown_likelihood",
    "unknown_subset",
    "unknown_structure",
    "negative_prior_precision",
    "prior_precision_wrong_length",
    "sigma_noise_classification",
    "unknown_pred_type",
    "unknown_link_approx",
    "lml_before_fit",
    "predict_before_fit",
    "sample_before_fit",
    "gridsearch_without_val_loader",
    "unknown_tuning_method",
    "load_state_dict_other_class",
]


def scenario_names() -> list[str]:
    return list(scenario_table())


# -- building blocks (torch from here on) ------------------------------------------
def _torch():
    import torch

    return torch


def make_model(kind: str, likelihood: str, dtype, seed: int = 0, dict_input=False):
    torch = _torch()
    nn = torch.nn
    torch.manual_seed(seed)
    out = {"classification": 3, "regression": 2, "reward_modeling": 1}[likelihood]
    if kind == "conv":
        net = nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, out)
        )
    elif likelihood == "reward_modeling":
        # on the last dimension: pairs (B, 2, D) -> (B, 2); items (B, D) -> (B, 1)
        net = nn.Sequential(
            nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1), nn.Flatten(start_dim=1)
        )
    else:
        net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, out))
    net = net.to(dtype)
    if dict_input:
        return DictModel(net)
    return net


def _dict_model_class():
    torch = _torch()

    class DictModel(torch.nn.Module):
        """A model called with the whole batch mapping, as Hugging Face's are."""

        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, data):
            return self.net(data["x"])

    return DictModel


def DictModel(net):  # noqa: N802 (a class built on first use)
    return _dict_model_class()(net)


def make_data(kind: str, likelihood: str, dtype, n: int, seed: int):
    torch = _torch()
    g = torch.Generator().manual_seed(seed)
    shape = (1, 4, 4) if kind == "conv" else (3,)
    if likelihood == "reward_modeling":
        X = torch.randn(n, 2, *shape, generator=g, dtype=dtype)
        y = torch.randint(0, 2, (n,), generator=g)
    elif likelihood == "classification":
        X = torch.randn(n, *shape, generator=g, dtype=dtype)
        y = torch.randint(0, 3, (n,), generator=g)
    else:
        X = torch.randn(n, *shape, generator=g, dtype=dtype)
        y = torch.randn(n, 2, generator=g, dtype=dtype)
    return X, y


def train(model, X, y, likelihood: str, dict_input: bool, steps: int = 100):
    """A few deterministic full-batch Adam steps, so the weights are near a mode (the
    same in both processes: same seed, same torch, CPU)."""
    torch = _torch()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    inputs = {"x": X} if dict_input else X
    for _ in range(steps):
        opt.zero_grad()
        f = model(inputs)
        if likelihood == "regression":
            loss = torch.nn.functional.mse_loss(f, y)
        else:
            loss = torch.nn.functional.cross_entropy(f, y)
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)


def mc_se(value, kind: str):
    """Standard errors of a Monte Carlo estimate from N_SAMPLES draws, from the
    estimate itself: class probabilities (bounded by ``p (1 - p)``), a regression
    predictive ``(mean, var)``, or a sample ``(mean, std)``."""
    n = N_SAMPLES
    if kind == "probs":
        return (value * (1 - value) / n).clamp_min(0).sqrt()
    first, second = value
    if kind == "regression":
        var = (
            second.diagonal(dim1=-2, dim2=-1) if second.dim() > first.dim() else second
        )
        return ((var / n).sqrt(), var * (2 / n) ** 0.5)
    return (second / n**0.5, second / (2 * n) ** 0.5)  # a sample's mean and std


def make_loader(X, y, batch: str, batch_size: int = 8):
    torch = _torch()
    from torch.utils.data import DataLoader, Dataset, TensorDataset

    if batch == "tensor":
        return DataLoader(TensorDataset(X, y), batch_size=batch_size)

    class Pairs(Dataset):
        def __len__(self):
            return len(X)

        def __getitem__(self, i):
            return {"x": X[i], "y": y[i]}

    del torch
    return DataLoader(Pairs(), batch_size=batch_size)


def test_inputs(spec, dtype):
    """Inputs to predict on: single items (reward models score one item each)."""
    torch = _torch()
    g = torch.Generator().manual_seed(123)
    shape = (1, 4, 4) if spec["model"] == "conv" else (3,)
    X = torch.randn(N_TEST, *shape, generator=g, dtype=dtype)
    return {"x": X} if spec["batch"] == "dict" else X


def dense(M):
    """A precision (or curvature) in its dense form, whichever object holds it."""
    torch = _torch()
    if isinstance(M, torch.Tensor):
        return M
    if hasattr(M, "to_matrix"):
        return M.to_matrix()
    if isinstance(M, tuple) and len(M) == 2 and isinstance(M[0], tuple):
        (U, eigvals), diag = M  # low rank: U diag(l) U^T + diag(p)
        return U @ torch.diag(eigvals) @ U.T + torch.diag(diag)
    if isinstance(M, tuple) and len(M) == 2:
        U, eigvals = M  # low rank: U diag(l) U^T
        return U @ torch.diag(eigvals) @ U.T
    raise TypeError(f"no dense form for {type(M).__name__}")


class Recorder:
    """Records quantities; an exception is recorded in place of the value."""

    def __init__(self):
        self.results: dict[str, tuple] = {}

    def __call__(self, name: str, fn):
        try:
            value = fn()
        except Exception as err:  # noqa: BLE001 (the error is the result)
            self.results[name] = ("error", type(err).__name__, str(err)[:300])
            return None
        self._store(name, value)
        return value

    def _store(self, name, value):
        torch = _torch()
        if isinstance(value, torch.Tensor):
            self.results[name] = ("ok", value.detach().cpu().clone())
        elif isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
            for i, v in enumerate(value):
                self._store(f"{name}.{i}", v)
        elif isinstance(value, dict):
            for k, v in value.items():
                self._store(f"{name}.{k}", v)
        elif isinstance(value, (bool, int, float, str, torch.Size, type(None))):
            self.results[name] = (
                "ok",
                tuple(value) if isinstance(value, torch.Size) else value,
            )
        else:
            self.results[name] = ("ok", f"<{type(value).__name__}>")


def build(laplace, spec, model, **extra):
    torch = _torch()
    kwargs = dict(subset_of_weights=spec["subset"], hessian_structure=spec["structure"])
    if spec["backend"] is not None:
        kwargs["backend"] = getattr(laplace.curvature, spec["backend"])
    if spec["batch"] == "dict":
        kwargs.update(dict_key_x="x", dict_key_y="y")
    if spec["structure"] == "gp":
        kwargs["n_subset"] = N_TRAIN
    if spec["subset"] == "subnetwork":
        kwargs["subnetwork_indices"] = torch.tensor([0, 3, 7, 10, 15, 20, 23, 26])
    if spec["backend"] and "Hessian" in spec["backend"]:
        # the exact Hessian is indefinite away from a mode: a prior that keeps the
        # posterior precision positive definite, so the numbers can be compared
        kwargs["prior_precision"] = 10.0
    kwargs.update(extra)
    return laplace.Laplace(model, spec["likelihood"], **kwargs)


def run_class(laplace, spec, rec: Recorder, full: bool):
    torch = _torch()
    dtype = getattr(torch, spec["dtype"])
    lik = spec["likelihood"]
    dict_input = spec["batch"] == "dict"
    model = make_model(spec["model"], lik, dtype, dict_input=dict_input)
    X, y = make_data(spec["model"], lik, dtype, N_TRAIN, seed=1)
    loader = make_loader(X, y, spec["batch"])
    Xv, yv = make_data(spec["model"], lik, dtype, 12, seed=2)
    val_loader = make_loader(Xv, yv, spec["batch"])
    x = test_inputs(spec, dtype)
    train(model, X, y, lik, dict_input)
    params = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    rec("model_params", lambda: params)

    la = rec("construct", lambda: build(laplace, spec, model))
    if la is None:
        return
    rec("construct", lambda: type(la).__name__)
    if full:  # before fit
        rec("before_fit/mean", lambda: la.mean)
        rec("before_fit/prior_precision_diag", lambda: la.prior_precision_diag)
        rec("before_fit/log_det_prior_precision", lambda: la.log_det_prior_precision)
        rec("before_fit/lml", lambda: type(la.log_marginal_likelihood()).__name__)
        rec("before_fit/predict", lambda: type(la(x)).__name__)
    fit = rec("fit", lambda: la.fit(loader) or "fitted")
    if fit is None:
        return
    rec("model_params_after_fit", lambda: torch.nn.utils.parameters_to_vector(
        model.parameters()).detach().clone())  # fmt: skip
    if spec["structure"] != "gp":
        rec("H", lambda: dense(la.H))
        rec("posterior_precision", lambda: dense(la.posterior_precision))
        rec("log_det_ratio", lambda: la.log_det_ratio)
        rec("log_det_prior_precision", lambda: la.log_det_prior_precision)
        rec("log_det_posterior_precision", lambda: la.log_det_posterior_precision)
        rec("scatter", lambda: la.scatter)
    rec("mean", lambda: la.mean)
    rec("n_data", lambda: la.n_data)
    rec("n_params", lambda: la.n_params)
    rec("loss", lambda: la.loss)
    rec("log_likelihood", lambda: la.log_likelihood)
    rec("lml", lambda: la.log_marginal_likelihood())
    rec("lml(prior_precision=0.5)", lambda: la.log_marginal_likelihood(
        prior_precision=torch.tensor(0.5, dtype=dtype)))  # fmt: skip
    if lik == "regression":
        rec("lml(0.5, sigma_noise=0.7)", lambda: la.log_marginal_likelihood(
            torch.tensor(0.5, dtype=dtype),
            torch.tensor(0.7, dtype=dtype)))  # fmt: skip
    pred_type = "gp" if spec["structure"] == "gp" else "glm"
    if lik == "classification":
        for link in ["probit", "bridge", "bridge_norm"]:
            rec(f"pred/{pred_type}/{link}", lambda link=link: la(
                x, pred_type=pred_type, link_approx=link))  # fmt: skip
        gen = torch.Generator().manual_seed(7)
        p = rec(f"pred/{pred_type}/mc~", lambda: la(
            x, pred_type=pred_type, link_approx="mc", n_samples=N_SAMPLES,
            generator=gen))  # fmt: skip
        if p is not None:
            rec(f"pred/{pred_type}/mc~@se", lambda: mc_se(p, "probs"))
    else:
        rec(f"pred/{pred_type}", lambda: la(x, pred_type=pred_type))
        if full:
            rec(f"pred/{pred_type}/joint", lambda: la(
                x, pred_type=pred_type, joint=True))  # fmt: skip
    if not full:
        return
    if spec["structure"] not in ("gp",):
        gen = torch.Generator().manual_seed(8)
        p = rec("pred/nn~", lambda: la(
            x, pred_type="nn", link_approx="mc", n_samples=N_SAMPLES,
            generator=gen))  # fmt: skip
        if p is not None:
            kind = "probs" if lik == "classification" else "regression"
            rec("pred/nn~@se", lambda: mc_se(p, kind))
        gen = torch.Generator().manual_seed(9)
        samples = rec(
            "sample/shape", lambda: tuple(la.sample(N_SAMPLES, generator=gen).shape)
        )
        if samples is not None:
            gen = torch.Generator().manual_seed(9)
            s = la.sample(N_SAMPLES, generator=gen)
            rec("sample/mean~", lambda: s.mean(0))
            rec("sample/std~", lambda: s.std(0))
            se = mc_se((s.mean(0), s.std(0)), "sample")
            rec("sample/mean~@se", lambda: se[0])
            rec("sample/std~@se", lambda: se[1])
            rec("sample/dtype", lambda: str(s.dtype))
    gen = torch.Generator().manual_seed(10)
    rec("predictive_samples/shape", lambda: tuple(la.predictive_samples(
        x, pred_type=pred_type, n_samples=7, generator=gen).shape))  # fmt: skip

    # state_dict round trip into a fresh object of the same class
    def round_trip():
        other = build(laplace, spec, model)
        other.load_state_dict(la.state_dict())
        return other.log_marginal_likelihood()

    rec("state_dict/round_trip_lml", round_trip)
    # prior tuning: marglik on this fit, a grid search on a fresh one
    rec("optimize/marglik", lambda: (la.optimize_prior_precision(
        method="marglik", n_steps=30, lr=0.1, pred_type=pred_type),
        la.prior_precision)[1])  # fmt: skip
    rec("optimize/marglik/lml", lambda: la.log_marginal_likelihood())

    def grid():
        other = build(laplace, spec, model)
        other.fit(loader)
        other.optimize_prior_precision(
            method="gridsearch", val_loader=val_loader, pred_type=pred_type, **GRID
        )
        return other.prior_precision

    rec("optimize/gridsearch", grid)


def run_errors(laplace, case: str, rec: Recorder):
    torch = _torch()
    dt = torch.float64
    model = make_model("mlp", "classification", dt)
    X, y = make_data("mlp", "classification", dt, N_TRAIN, seed=1)
    loader = make_loader(X, y, "tensor")
    L = laplace.Laplace

    def fitted(**kw):
        la = L(model, "classification", **kw)
        la.fit(loader)
        return la

    calls = {
        "unknown_likelihood": lambda: L(model, "poisson"),
        "unknown_subset": lambda: L(model, "classification", subset_of_weights="some"),
        "unknown_structure": lambda: L(model, "classification", hessian_structure="x"),
        "negative_prior_precision": lambda: L(
            model, "classification", prior_precision=-1.0),
        "prior_precision_wrong_length": lambda: L(
            model, "classification", hessian_structure="diag",
            prior_precision=torch.ones(5, dtype=dt)),
        "sigma_noise_classification": lambda: L(
            model, "classification", sigma_noise=0.5),
        "unknown_pred_type": lambda: fitted()(X[:3], pred_type="bayes"),
        "unknown_link_approx": lambda: fitted()(X[:3], link_approx="logit"),
        "lml_before_fit": lambda: L(model, "classification").log_marginal_likelihood(),
        "predict_before_fit": lambda: L(model, "classification")(X[:3]),
        "sample_before_fit": lambda: L(model, "classification").sample(3),
        "gridsearch_without_val_loader": lambda: fitted().optimize_prior_precision(
            method="gridsearch", pred_type="glm"),
        "unknown_tuning_method": lambda: fitted().optimize_prior_precision(
            method="bayes", pred_type="glm"),
        "load_state_dict_other_class": lambda: L(
            model, "classification", hessian_structure="diag").load_state_dict(
                fitted(hessian_structure="full").state_dict()),
    }  # fmt: skip
    rec("result", lambda: f"no error ({type(calls[case]()).__name__})")


# -- the README blocks --------------------------------------------------------------
README_PRELUDE = """
import torch
from torch.utils.data import DataLoader, TensorDataset

_g = torch.Generator().manual_seed(1)
_X = torch.randn(24, 3, generator=_g, dtype=torch.float64)
_y = torch.randint(0, 3, (24,), generator=_g)

def load_map_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(_X), _y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model
train_loader = DataLoader(TensorDataset(_X, _y), batch_size=8)
val_loader = DataLoader(TensorDataset(_X[:12], _y[:12]), batch_size=6)
x = torch.randn(5, 3, generator=_g, dtype=torch.float64)
"""


def readme_variants(blocks: list[str]) -> dict[str, str]:
    """Each block as written, and (for the factory's block) each structure."""
    variants = {}
    for i, code in enumerate(blocks):
        variants[f"readme/block{i}"] = code
        if 'hessian_structure="diag"' in code:
            others = [("all", "kron"), ("all", "full"), ("last_layer", "kron"),
                      ("last_layer", "diag")]  # fmt: skip
            for subset, structure in others:
                variants[f"readme/block{i}/{subset}-{structure}"] = code.replace(
                    'hessian_structure="diag"', f'hessian_structure="{structure}"'
                ).replace('subset_of_weights="all"', f'subset_of_weights="{subset}"')
    return variants


def run_readme(code: str, rec: Recorder):
    scope: dict = {}

    def run():
        exec(compile(README_PRELUDE + code, "<readme>", "exec"), scope)  # noqa: S102
        return "ran"

    if rec("run", run) is None:
        return
    if "pred" in scope:
        rec("pred", lambda: scope["pred"])
    if "la" in scope:
        la = scope["la"]
        rec("la.prior_precision", lambda: la.prior_precision)
        rec("la.lml", lambda: la.log_marginal_likelihood())


# -- main ---------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", nargs="*", default=["*"])
    parser.add_argument("--readme", help="a JSON file: scenario name -> code")
    args = parser.parse_args(argv)
    torch = _torch()
    torch.set_num_threads(1)
    import laplace

    os.makedirs(args.out, exist_ok=True)
    first = make_model("mlp", "classification", torch.float64)
    torch.save(
        {
            "torch": str(torch.__version__),
            "laplace_file": laplace.__file__,
            "laplace_version": getattr(laplace, "__version__", "?"),
            "python": sys.version.split()[0],
            "first_model_params": torch.nn.utils.parameters_to_vector(
                first.parameters()
            ).detach(),
        },
        os.path.join(args.out, "meta.pt"),
    )
    table = scenario_table()
    readme = {}
    if args.readme:
        with open(args.readme) as f:
            readme = json.load(f)
    names = [
        n for n in [*table, *readme] if any(fnmatch.fnmatch(n, p) for p in args.only)
    ]
    for name in names:
        rec = Recorder()
        try:
            if name in readme:
                run_readme(readme[name], rec)
            elif table[name]["kind"] == "errors":
                run_errors(laplace, table[name]["case"], rec)
            elif table[name]["kind"] == "workflow":
                workflows.run(laplace, table[name]["workflow"], rec)
            elif table[name]["kind"] == "ella_valla":
                ella_valla.run(laplace, name, rec, sys.modules[__name__])
            else:
                spec = table[name]
                run_class(laplace, spec, rec, full=spec["kind"] == "class")
        except Exception as err:  # noqa: BLE001 (a harness bug: recorded, not fatal)
            rec.results["harness"] = (
                "error",
                type(err).__name__,
                traceback.format_exc()[-300:],
            )
        path = os.path.join(args.out, name.replace("/", "__") + ".pt")
        torch.save(rec.results, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
