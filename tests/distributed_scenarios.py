"""Scenarios of data-parallel fitting, run by ``tests/test_distributed.py``: once in
each of 2 gloo processes (this file as a script) and once in the test's own
process without a process group, the reference of one process on all the data.

Each scenario is a function ``(rank, world, device) -> dict`` of tensors, numbers or
strings. With ``world == 1`` (no process group) the loader yields all the data;
with ``world == 2`` a ``DistributedSampler`` gives rank ``r`` the examples ``r,
r + 2, ...``. Every data set has a size divisible by 2 (no padding).

    python tests/distributed_scenarios.py --rank R --world 2 --init URL --out DIR
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from datetime import timedelta

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from laplace import Laplace
from laplace.utils import distributed_reduction

N, D, C, BATCH = 24, 4, 3, 4
#: a subnetwork's weights (indices into the flattened parameters)
SUBNET = torch.tensor([0, 3, 7, 12, 20, 31, 40, 45, 49, 50])


def model(device, hidden: int = 6) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D, hidden), nn.Tanh(), nn.Linear(hidden, C))
    return net.to(device=device, dtype=torch.float64)


def dataset(likelihood: str, n: int = N, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, D, generator=g, dtype=torch.float64)
    if likelihood == "classification":
        y = torch.randint(0, C, (n,), generator=g)
    else:
        y = torch.randn(n, C, generator=g, dtype=torch.float64)
    return TensorDataset(X, y)


class DictData(Dataset):
    """Mapping batches, as Hugging Face data sets give."""

    def __init__(self, base: TensorDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return {"input_ids": x, "labels": y}


class DictModel(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, batch):
        return self.net(batch["input_ids"])


def loader(data, rank: int, world: int, sampler: bool = True) -> DataLoader:
    """All of ``data`` in one process; rank ``rank``'s shard under ``world``."""
    if world == 1 or not sampler:
        return DataLoader(data, batch_size=BATCH)
    shard = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
    return DataLoader(data, batch_size=BATCH, sampler=shard)


def x_test(device) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.randn(5, D, generator=g, dtype=torch.float64).to(device)


def summary(la, device, x=None) -> dict:
    """What must agree with one process on all the data (the predictive at ``x``,
    by default ``x_test``)."""
    out = {
        "loss": la.loss.detach(),
        "n_data": la.n_data,
        "log_marglik": la.log_marginal_likelihood(
            prior_precision=torch.tensor(0.7, dtype=torch.float64, device=device)
        ).detach(),
    }
    H = la.H if hasattr(la, "H") else None
    if isinstance(H, tuple):  # LowRankLaplace: (U, eigenvalues)
        U, e = H
        out["H"] = (U * e) @ U.T
    elif hasattr(H, "to_matrix"):
        out["H"] = H.to_matrix()
    elif isinstance(H, torch.Tensor):
        out["H"] = H
    pred = la(x_test(device) if x is None else x, pred_type="glm")
    if isinstance(pred, tuple):
        out["f_mu"], out["f_var"] = pred[0].detach(), pred[1].detach()
    else:
        out["probs"] = pred.detach()
    return {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in out.items()}


def fit(
    subset: str,
    structure: str,
    likelihood: str = "regression",
    **kwargs,
):
    def scenario(rank, world, device):
        la = Laplace(model(device), likelihood, subset, structure, **kwargs)
        la.fit(loader(dataset(likelihood), rank, world))
        return summary(la, device)

    return scenario


def backend(name: str, structure: str = "kron"):
    def scenario(rank, world, device):
        import laplace.curvature as curvature

        cls = getattr(curvature, name)
        la = Laplace(model(device), "classification", "all", structure, backend=cls)
        la.fit(loader(dataset("classification"), rank, world))
        return summary(la, device)

    return scenario


def output_noise(rank, world, device):
    sigma = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64, device=device)
    la = Laplace(model(device), "regression", "all", "kron", sigma_noise=sigma)
    la.fit(loader(dataset("regression"), rank, world))
    return summary(la, device)


def low_rank_factors(rank, world, device):
    """The input-side factor of the first layer (6 x 6, of rank 2: the inputs lie
    in a plane) kept as a rank-2 LowRankFactor, every other factor (3 x 3) dense:
    exact, so the ranks' factors reduced (gathered square roots, truncated) equal
    one process's."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, C))
    net = net.to(device=device, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    X = torch.randn(N, 2, generator=g, dtype=torch.float64)
    X = X @ torch.randn(2, 6, generator=g, dtype=torch.float64)
    data = TensorDataset(X, torch.randn(N, C, generator=g, dtype=torch.float64))
    la = Laplace(
        net, "regression", "all", "kron", low_rank_factors=2, low_rank_threshold=3
    )
    la.fit(loader(data, rank, world))
    out = summary(la, device, x=X[:5].to(device))
    out["low rank blocks"] = sum(
        type(F).__name__ == "LowRankFactor" for block in la.H.kfacs for F in block
    )
    return out


def subnetwork(structure: str):
    def scenario(rank, world, device):
        la = Laplace(
            model(device),
            "classification",
            "subnetwork",
            structure,
            subnetwork_indices=SUBNET.to(device),
        )
        la.fit(loader(dataset("classification"), rank, world))
        return summary(la, device)

    return scenario


def gp(subset: str):
    def scenario(rank, world, device):
        la = Laplace(model(device), "regression", subset, "gp", n_subset=10)
        la.fit(loader(dataset("regression"), rank, world))
        return summary(la, device)

    return scenario


def ddp(rank, world, device):
    net = model(device)
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net)
    la = Laplace(net, "classification", "all", "kron")
    la.fit(loader(dataset("classification"), rank, world))
    out = summary(la, device)
    out["unwrapped"] = type(la.model).__name__
    return out


def dict_batches(rank, world, device):
    data = DictData(dataset("classification"))
    la = Laplace(DictModel(model(device)), "classification", "all", "full")
    la.fit(loader(data, rank, world))
    return summary(la, device, x={"input_ids": x_test(device)})


def two_fits(rank, world, device):
    """``fit(override=False)`` on a second data set: both reduced."""
    la = Laplace(model(device), "regression", "all", "kron")
    la.fit(loader(dataset("regression"), rank, world))
    second = dataset("regression", n=16, seed=2)
    la.fit(loader(second, rank, world), override=False)
    return summary(la, device)


def per_rank(rank, world, device):
    """The reduction turned off: the posterior of this rank's shard alone (the
    reference runs each rank's shard in one process)."""
    with distributed_reduction(False):
        la = Laplace(model(device), "regression", "all", "full")
        shard = DistributedSampler(
            dataset("regression"), num_replicas=2, rank=rank, shuffle=False
        )
        la.fit(DataLoader(dataset("regression"), batch_size=BATCH, sampler=shard))
    return summary(la, device)


def different_models(rank, world, device):
    """Rank 1 builds a wider model: every rank refuses before any batch."""
    net = model(device, hidden=6 if rank == 0 else 7)
    la = Laplace(net, "regression", "all", "diag")
    try:
        la.fit(loader(dataset("regression"), rank, world))
    except ValueError as err:
        return {"error": str(err), "fitted": la.fitted}
    return {"error": "", "fitted": la.fitted}


def failing_rank(rank, world, device):
    """Rank 1's data hold a NaN: rank 1 raises its error, rank 0 names rank 1."""
    data = dataset("regression")
    if rank == 1:
        data.tensors[0][5, 0] = float("nan")
    la = Laplace(model(device), "regression", "all", "diag")
    try:
        la.fit(loader(data, rank, world))
    except RuntimeError as err:
        return {"error": f"{type(err).__name__}: {err}", "fitted": la.fitted}
    return {"error": "", "fitted": la.fitted}


def no_sampler(rank, world, device):
    """Every rank iterates all the data: a warning, and the data counted on each
    rank (the reference: the data set twice in one process)."""
    data = dataset("regression")
    la = Laplace(model(device), "regression", "all", "diag")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if world == 1:
            twice = torch.utils.data.ConcatDataset([data, data])
            la.fit(DataLoader(twice, batch_size=BATCH))
        else:
            la.fit(loader(data, rank, world, sampler=False))
    out = summary(la, device)
    out["warnings"] = " | ".join(
        str(w.message) for w in caught if "DistributedSampler" in str(w.message)
    )
    return out


def padded(rank, world, device):
    """A data set of 23 on 2 ranks: the sampler pads one example, with a warning;
    the reference holds that example twice."""
    data = dataset("regression", n=23)
    la = Laplace(model(device), "regression", "all", "diag")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if world == 1:
            X, y = data.tensors
            twice = TensorDataset(torch.cat([X, X[:1]]), torch.cat([y, y[:1]]))
            la.fit(DataLoader(twice, batch_size=BATCH))
        else:
            la.fit(loader(data, rank, world))
    out = summary(la, device)
    out["warnings"] = " | ".join(str(w.message) for w in caught if "pads" in str(w))
    return out


def own_shards(rank, world, device):
    """One data set per rank, of different sizes (16 and 8 examples), no sampler:
    each rank's input-side Kronecker factors average over its own 16 or 8, so the
    reduction weights them by the counts; the reference: all 24 in one process."""
    X, y = dataset("regression").tensors
    if world > 1:
        part = slice(0, 16) if rank == 0 else slice(16, N)
        X, y = X[part], y[part]
    la = Laplace(model(device), "regression", "all", "kron")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no DistributedSampler: shards by hand
        la.fit(DataLoader(TensorDataset(X, y), batch_size=BATCH))
    return summary(la, device)


def marglik(rank, world, device):
    """marglik_training of a DistributedDataParallel model, batches of 4 per rank:
    the same weights, evidences and losses as one process with batches of 8 (the
    union of the ranks' batches: DDP averages their gradients)."""
    from laplace import marglik_training
    from laplace.utils.distributed import unwrap

    net = model(device)
    data = dataset("classification")
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net)
        batches = loader(data, rank, world)
    else:
        batches = DataLoader(data, batch_size=2 * BATCH)
    la, net, margliks, losses = marglik_training(
        net,
        batches,
        "classification",
        "kron",
        n_epochs=3,
        n_epochs_burnin=1,
        marglik_frequency=1,
        n_hypersteps=5,
        optimizer_kwargs={"lr": 1e-2},
    )
    weights = torch.nn.utils.parameters_to_vector(unwrap(net).parameters())
    return {
        "weights": weights.detach().cpu(),
        "margliks": torch.tensor(margliks, dtype=torch.float64),
        "losses": torch.tensor(losses, dtype=torch.float64),
        "prior_precision": la.prior_precision.detach().cpu(),
        **summary(la, device),
    }


def marglik_without_ddp(rank, world, device):
    """marglik_training of a plain model under the process group: refused."""
    from laplace import marglik_training

    try:
        marglik_training(model(device), loader(dataset("regression"), rank, world))
    except ValueError as err:
        return {"error": str(err)}
    return {"error": ""}


def validation(rank, world, device):
    """validate and the grid search on a validation loader sharded over the
    ranks: the losses of all the validation data (the default running NLL, a
    torchmetrics Metric, and a callable), the prior precision of all of it."""
    from laplace.utils import validate

    la = Laplace(model(device), "classification", "all", "kron")
    la.fit(loader(dataset("classification"), rank, world))
    val = loader(dataset("classification", n=16, seed=4), rank, world)

    def nll(probs, y):
        return -probs.log().gather(1, y.reshape(-1, 1)).mean()

    from laplace.prior import default_loss

    out = {
        "metric": validate(la, val, default_loss(la)),  # the grid search's default
        "callable": validate(la, val, nll),
        "n_val": validate(la, val, lambda probs, y: torch.tensor(float(len(y)))),
    }
    la.optimize_prior_precision(method="gridsearch", val_loader=val, grid_size=21)
    out["gridsearch, metric"] = la.prior_precision.detach().cpu()
    la.optimize_prior_precision(
        method="gridsearch", val_loader=val, grid_size=21, loss=nll
    )
    out["gridsearch, callable"] = la.prior_precision.detach().cpu()
    return out


def streaming(kind: str):
    """The streaming ``update`` of each rank's batch of 4: the state of one
    process updated with batches of 8 (the union of the ranks' batches)."""

    def scenario(rank, world, device):
        from torch.func import functional_call

        from laplace.streaming import (
            dense_fisher,
            dense_ggn,
            dense_hessian,
            diag_fisher,
            diag_ggn,
            kron_ggn,
        )

        net = model(device)
        params = {k: v.detach().clone() for k, v in net.named_parameters()}

        def forward(p, batch):
            return functional_call(net, p, (batch[0],)), torch.tensor([])

        def outer_log_likelihood(logits, batch):
            return -nn.functional.cross_entropy(logits, batch[1], reduction="sum")

        def log_posterior(p, batch):
            value = outer_log_likelihood(forward(p, batch)[0], batch)
            return value, torch.tensor([])

        transform = {
            "dense_ggn": lambda: dense_ggn.build(forward, outer_log_likelihood, 0.5),
            "diag_ggn": lambda: diag_ggn.build(forward, outer_log_likelihood, 0.5),
            "dense_hessian": lambda: dense_hessian.build(log_posterior, 0.5, 0.3),
            "kron_ggn": lambda: kron_ggn.build(net, "classification", 0.5),
            "dense_fisher": lambda: dense_fisher.build(log_posterior, False, 0.5),
            "diag_fisher": lambda: diag_fisher.build(log_posterior, False, 0.5),
        }[kind]()
        data = dataset("classification")
        batches = (
            DataLoader(data, batch_size=2 * BATCH)
            if world == 1
            else loader(data, rank, world)
        )
        state = transform.init(params)
        for x, y in batches:
            state = transform.update(state, (x.to(device), y.to(device)))
        if kind == "kron_ggn":
            prec = kron_ggn.precision(state)
            extra = {"n_data": state.n_data, "loss": state.loss.detach().cpu()}
        elif kind in ("diag_ggn", "diag_fisher"):
            prec = torch.cat([v.reshape(-1) for v in state.prec_diag.values()])
            extra = {}
        else:
            prec, extra = state.prec, {}
        return {"prec": prec.detach().cpu(), "step": int(state.step), **extra}

    return scenario


def ella(rank, world, device):
    """ELLA: the basis from the data set (the same on every rank), the projected
    curvature summed over the ranks, the final validation on all ranks' data."""
    from laplace import ELLA

    la = ELLA(model(device), "classification", subsample_size=10, n_eigenvalues=6)
    val = loader(dataset("classification", n=16, seed=4), rank, world)
    la.fit(loader(dataset("classification"), rank, world), val_loader=val)
    return {
        "feature_gram": la.feature_gram.detach().cpu(),
        "n_data": la.n_data,
        "val_nll": torch.tensor(la.fit_history_["val_nll"]),
        "probs": la(x_test(device)).detach().cpu(),
    }


def valla_refused(rank, world, device):
    from laplace import VaLLA

    la = VaLLA(model(device), "classification", "random", num_inducing=4)
    try:
        la.fit(loader(dataset("classification"), rank, world), iterations=2)
    except ValueError as err:
        return {"error": str(err)}
    return {"error": ""}


SCENARIOS = {
    **{
        f"all-{structure}-{lik}": fit("all", structure, lik)
        for structure in ("full", "kron", "diag")
        for lik in ("regression", "classification")
    },
    "all-lowrank-regression": fit("all", "lowrank", "regression", backend=None),
    **{
        f"last_layer-{structure}-{lik}": fit("last_layer", structure, lik)
        for structure in ("full", "kron", "diag")
        for lik in ("regression", "classification")
    },
    "kron-damping": fit("all", "kron", "regression", damping=True),
    "subnetwork-full": subnetwork("full"),
    "subnetwork-diag": subnetwork("diag"),
    "gp": gp("all"),
    "last_layer-gp": gp("last_layer"),
    "output-noise-kron": output_noise,
    "low-rank-factors": low_rank_factors,
    **{
        f"backend-{name}": backend(name)
        for name in ("NativeEF", "CurvlinopsGGN", "BackPackGGN", "AsdlGGN")
    },
    "backend-CurvlinopsEF-diag": backend("CurvlinopsEF", "diag"),
    "ddp": ddp,
    "dict-batches": dict_batches,
    "two-fits": two_fits,
    "per-rank": per_rank,
    "different-models": different_models,
    "failing-rank": failing_rank,
    "own-shards-kron": own_shards,
    "marglik-training": marglik,
    "validation": validation,
    **{
        f"streaming-{kind}": streaming(kind)
        for kind in (
            "dense_ggn",
            "diag_ggn",
            "dense_hessian",
            "kron_ggn",
            "dense_fisher",
            "diag_fisher",
        )
    },
    "ella": ella,
    "marglik-without-ddp": marglik_without_ddp,
    "valla-refused": valla_refused,
    "no-sampler": no_sampler,
    "padded": padded,
}
#: scenarios whose reference is each rank's own (``per_rank``) or that check
#: errors rather than numbers
PER_RANK = {"per-rank"}
ERRORS = {"different-models", "failing-rank", "marglik-without-ddp", "valla-refused"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--init", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo",
        init_method=args.init,
        rank=args.rank,
        world_size=args.world,
        timeout=timedelta(seconds=120),
    )
    results = {}
    for device in args.devices.split(","):
        for name, scenario in SCENARIOS.items():
            try:
                results[(device, name)] = scenario(args.rank, args.world, device)
            except Exception:  # reported by the test
                results[(device, name)] = {"crash": traceback.format_exc()}
    torch.save(results, os.path.join(args.out, f"rank{args.rank}.pt"))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
