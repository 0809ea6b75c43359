"""laplace-torch's example workflows, written anew, run by BOTH libraries.

Each workflow is what a laplace-torch user writes for one of its example topics
(regression, calibration, Bayesian optimization, expectations by Monte Carlo, a
Hugging Face model, reward modeling), on small seeded synthetic data, using only the
public calls laplace-torch documents. The same text runs on this library and on
laplace-torch 0.3 (``scenarios.py`` runs it in both processes); ``rec`` records the
quantities each produces, which ``compare.py`` compares with the harness's
tolerances. Keys containing ``~`` are Monte Carlo estimates, each recorded with its
standard error (``~@se``); keys under ``optimize/`` depend on tuned hyperparameters
and are held to the tuning tolerance.

A workflow that needs a package the interpreter lacks records ``skipped`` (both
libraries must have it for the comparison to mean anything; the test then skips).

Importing this module imports neither torch nor laplace (``WORKFLOWS`` lists names).
"""

from __future__ import annotations

#: scenario name (after ``workflow/``) -> (function name, keyword arguments)
WORKFLOWS = {
    "regression": ("regression", {}),
    "calibration/last_layer-kron": ("calibration", dict(subset="last_layer",
                                                        structure="kron")),
    "calibration/all-diag": ("calibration", dict(subset="all", structure="diag")),
    "calibration/all-kron": ("calibration", dict(subset="all", structure="kron")),
    "bayesopt": ("bayesopt", {}),
    "expectation/regression": ("expectation", dict(task="regression")),
    "expectation/classification": ("expectation", dict(task="classification")),
    "huggingface/last_layer-kron": ("huggingface", dict(structure="kron")),
    "huggingface/last_layer-diag": ("huggingface", dict(structure="diag")),
    "huggingface/last_layer-full": ("huggingface", dict(structure="full")),
    "huggingface/token_level-pick_last": ("huggingface_tokens", {}),
    "reward_modeling/all-full": ("reward_modeling", dict(subset="all",
                                                         structure="full")),
    "reward_modeling/last_layer-kron": ("reward_modeling", dict(subset="last_layer",
                                                                structure="kron")),
}  # fmt: skip

N_MC = 2000  # Monte Carlo draws of the expectation workflow


def _torch():
    import torch

    return torch


def _fit_map(model, inputs, targets, loss_fn, steps: int, lr: float = 0.02):
    """Brief full-batch Adam training (deterministic: same seed, torch, CPU)."""
    torch = _torch()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(inputs), targets).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model


def _mc(rec, name: str, draws):
    """An expectation estimated from draws along dim 0, with its standard error."""
    n = draws.shape[0]
    rec(f"{name}~", lambda: draws.mean(0))
    rec(f"{name}~@se", lambda: draws.std(0) / n**0.5)


# -- 1. regression -------------------------------------------------------------------
def regression(laplace, rec):
    """Sine regression: full Laplace over all weights; the prior precision and the
    observation noise tuned by the evidence with Adam on their logs; the prior
    precision again by ``optimize_prior_precision``; the GLM predictive."""
    torch = _torch()
    from torch.utils.data import DataLoader, TensorDataset

    dt = torch.float64
    g = torch.Generator().manual_seed(0)
    X = (torch.rand(60, 1, generator=g, dtype=dt) * 8 - 4).sort(0).values
    y = torch.sin(X) + 0.3 * torch.randn(60, 1, generator=g, dtype=dt)
    loader = DataLoader(TensorDataset(X, y), batch_size=20)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
    ).to(dt)
    _fit_map(model, X, y, torch.nn.functional.mse_loss, steps=300, lr=0.02)
    x = torch.linspace(-6, 6, 13, dtype=dt).unsqueeze(-1)

    la = laplace.Laplace(
        model, "regression", subset_of_weights="all", hessian_structure="full"
    )
    la.fit(loader)
    rec("posterior_precision", lambda: la.posterior_precision)
    rec("lml", lambda: la.log_marginal_likelihood())
    rec("pred/glm", lambda: la(x, pred_type="glm"))

    log_prior = torch.ones(1, dtype=dt, requires_grad=True)
    log_sigma = torch.ones(1, dtype=dt, requires_grad=True)
    hyper = torch.optim.Adam([log_prior, log_sigma], lr=1e-1)
    trace = []
    for _ in range(50):
        hyper.zero_grad()
        neg = -la.log_marginal_likelihood(log_prior.exp(), log_sigma.exp())
        neg.backward()
        hyper.step()
        trace.append(neg.detach())
    rec("optimize/adam/neg_lml_trace", lambda: torch.stack(trace).flatten())
    rec("optimize/adam/prior_precision", lambda: log_prior.detach().exp())
    rec("optimize/adam/sigma_noise", lambda: log_sigma.detach().exp())
    rec("optimize/adam/la.prior_precision", lambda: la.prior_precision)
    rec("optimize/adam/la.sigma_noise", lambda: la.sigma_noise)
    rec("optimize/adam/pred/glm", lambda: la(x, pred_type="glm"))
    rec("optimize/adam/lml", lambda: la.log_marginal_likelihood())

    # the prior alone, by the library's tuner, on a fresh fit (the one above now
    # holds hyperparameters attached to the Adam graph, as the pattern leaves them)
    la = laplace.Laplace(
        model, "regression", subset_of_weights="all", hessian_structure="full"
    )
    la.fit(loader)
    rec("optimize/marglik", lambda: (la.optimize_prior_precision(
        method="marglik", pred_type="glm", n_steps=100, lr=0.1),
        la.prior_precision)[1])  # fmt: skip
    rec("optimize/marglik/pred/glm", lambda: la(x, pred_type="glm"))
    rec("optimize/marglik/lml", lambda: la.log_marginal_likelihood())


# -- 2. calibration ------------------------------------------------------------------
def _blobs(n: int, seed: int, dt):
    torch = _torch()
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 2.0], [-1.7, -1.0], [1.7, -1.0]], dtype=dt)
    y = torch.randint(0, 3, (n,), generator=g)
    X = centres[y] + 1.2 * torch.randn(n, 2, generator=g, dtype=dt)
    return X, y


def _calibration_metrics(probs, y, bins: int = 5):
    """NLL, accuracy and expected calibration error of class probabilities."""
    torch = _torch()
    nll = -probs[torch.arange(len(y)), y].clamp_min(1e-12).log().mean()
    conf, pred = probs.max(-1)
    correct = (pred == y).to(probs.dtype)
    edges = torch.linspace(0, 1, bins + 1, dtype=probs.dtype)
    ece = probs.new_zeros(())
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            gap = (conf[inside].mean() - correct[inside].mean()).abs()
            ece = ece + inside.to(probs.dtype).mean() * gap
    return {"nll": nll, "acc": correct.mean(), "ece": ece}


def calibration(laplace, rec, subset: str, structure: str):
    """A classifier's calibration: MAP against the Laplace predictive (probit and
    the NN Monte Carlo), the prior tuned by the evidence and by a grid search on a
    validation set."""
    torch = _torch()
    from torch.utils.data import DataLoader, TensorDataset

    dt = torch.float64
    X, y = _blobs(90, seed=1, dt=dt)
    Xv, yv = _blobs(30, seed=2, dt=dt)
    Xt, yt = _blobs(40, seed=3, dt=dt)
    loader = DataLoader(TensorDataset(X, y), batch_size=30)
    val_loader = DataLoader(TensorDataset(Xv, yv), batch_size=15)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(2, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3)
    ).to(dt)
    _fit_map(model, X, y, torch.nn.functional.cross_entropy, steps=200, lr=0.05)
    with torch.no_grad():
        rec("map/metrics", lambda: _calibration_metrics(model(Xt).softmax(-1), yt))

    def make():
        if (subset, structure) == ("last_layer", "kron"):
            return laplace.Laplace(model, "classification")  # the defaults
        return laplace.Laplace(
            model, "classification", subset_of_weights=subset,
            hessian_structure=structure,
        )  # fmt: skip

    la = rec("construct", make)
    if la is None:
        return
    rec("construct", lambda: type(la).__name__)
    rec("fit", lambda: la.fit(loader) or "fitted")
    rec("lml", lambda: la.log_marginal_likelihood())
    rec("optimize/marglik", lambda: (la.optimize_prior_precision(
        method="marglik", pred_type="glm", n_steps=100, lr=0.1),
        la.prior_precision)[1])  # fmt: skip
    probs = rec("optimize/marglik/probit", lambda: la(Xt, link_approx="probit"))
    if probs is not None:
        rec("optimize/marglik/probit/metrics", lambda: _calibration_metrics(probs, yt))
    g = torch.Generator().manual_seed(5)
    mc = rec("optimize/marglik/nn/mc~", lambda: la(
        Xt, pred_type="nn", link_approx="mc", n_samples=1000, generator=g))  # fmt: skip
    if mc is not None:
        rec(
            "optimize/marglik/nn/mc~@se",
            lambda: (mc * (1 - mc) / 1000).clamp_min(0).sqrt(),
        )

    def grid():
        other = make()
        other.fit(loader)
        other.optimize_prior_precision(
            method="gridsearch", pred_type="glm", link_approx="probit",
            val_loader=val_loader, grid_size=10, log_prior_prec_min=-2,
            log_prior_prec_max=2,
        )  # fmt: skip
        return other.prior_precision, other(Xt, link_approx="probit")

    rec("optimize/gridsearch", grid)


# -- 3. Bayesian optimization --------------------------------------------------------
def bayesopt(laplace, rec):
    """A Laplace surrogate of a black-box function; acquisition functions (UCB and
    expected improvement) of the GLM predictive differentiated w.r.t. the input, as
    a Bayesian-optimization loop does to propose the next point."""
    torch = _torch()
    from torch.utils.data import DataLoader, TensorDataset

    dt = torch.float64
    g = torch.Generator().manual_seed(3)
    X = torch.rand(20, 2, generator=g, dtype=dt) * 4 - 2
    f = (X**2).sum(-1, keepdim=True) * 0.5 + torch.sin(3 * X[:, :1])
    loader = DataLoader(TensorDataset(X, f), batch_size=10)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(2, 10), torch.nn.Tanh(), torch.nn.Linear(10, 1)
    ).to(dt)
    _fit_map(model, X, f, torch.nn.functional.mse_loss, steps=300, lr=0.03)

    la = laplace.Laplace(
        model, "regression", "all", "full", enable_backprop=True
    )  # fmt: skip
    la.fit(loader)
    la.optimize_prior_precision(method="marglik", pred_type="glm", n_steps=50)
    rec("optimize/prior_precision", lambda: la.prior_precision)

    cand = torch.rand(6, 2, generator=g, dtype=dt) * 4 - 2
    best = f.min()

    def acquisitions():
        x = cand.clone().requires_grad_(True)
        mean, var = la(x, pred_type="glm")
        mean, std = mean.squeeze(-1), var.squeeze(-1).squeeze(-1).sqrt()
        ucb = -mean + 2.0 * std  # minimizing f
        z = (best - mean) / std
        normal = torch.distributions.Normal(torch.zeros_like(z), torch.ones_like(z))
        ei = std * (z * normal.cdf(z) + normal.log_prob(z).exp())
        (d_mean,) = torch.autograd.grad(mean.sum(), x, retain_graph=True)
        (d_var,) = torch.autograd.grad(var.sum(), x, retain_graph=True)
        (d_ucb,) = torch.autograd.grad(ucb.sum(), x, retain_graph=True)
        (d_ei,) = torch.autograd.grad(ei.sum(), x)
        return {"mean": mean, "var": var, "ucb": ucb, "ei": ei, "d_mean": d_mean,
                "d_var": d_var, "d_ucb": d_ucb, "d_ei": d_ei}  # fmt: skip

    rec("optimize/acquisition", acquisitions)

    def ascent():
        """A few gradient steps on UCB from the candidates (the proposal)."""
        x = cand.clone().requires_grad_(True)
        opt = torch.optim.SGD([x], lr=0.05)
        for _ in range(5):
            opt.zero_grad()
            mean, var = la(x, pred_type="glm")
            (mean.squeeze(-1) - 2.0 * var.reshape(-1).sqrt()).sum().backward()
            opt.step()
        return x.detach()

    rec("optimize/proposal", ascent)


# -- 4. expectations by Monte Carlo --------------------------------------------------
def expectation(laplace, rec, task: str):
    """Expectations of functions of the network output under the posterior, from
    ``functional_samples`` (GLM and NN) and ``predictive_samples``."""
    torch = _torch()
    from torch.utils.data import DataLoader, TensorDataset

    dt = torch.float64
    if task == "regression":
        g = torch.Generator().manual_seed(4)
        X = torch.randn(40, 2, generator=g, dtype=dt)
        y = X[:, :1] * X[:, 1:] + 0.1 * torch.randn(40, 1, generator=g, dtype=dt)
        out, loss = 1, torch.nn.functional.mse_loss
    else:
        X, y = _blobs(60, seed=4, dt=dt)
        out, loss = 3, torch.nn.functional.cross_entropy
    loader = DataLoader(TensorDataset(X, y), batch_size=20)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, out)
    ).to(dt)
    _fit_map(model, X, y, loss, steps=150, lr=0.05)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(9), dtype=dt)

    la = laplace.Laplace(model, task, subset_of_weights="all", hessian_structure="full")
    la.fit(loader)
    for pred_type in ["glm", "nn"]:

        def shape(p=pred_type):
            g = torch.Generator().manual_seed(11)
            return tuple(la.functional_samples(x, pred_type=p, n_samples=7,
                                               generator=g).shape)  # fmt: skip

        fs = rec(f"functional_samples/{pred_type}/shape", shape)
        if fs is None:
            continue
        g = torch.Generator().manual_seed(12)
        f = la.functional_samples(
            x, pred_type=pred_type, n_samples=N_MC, generator=g
        ).detach()
        rec(f"functional_samples/{pred_type}/dtype", lambda f=f: str(f.dtype))
        _mc(rec, f"E[f]/{pred_type}", f)
        _mc(rec, f"E[f^2]/{pred_type}", f**2)
        _mc(rec, f"E[sin f]/{pred_type}", torch.sin(f))
        if task == "classification":
            _mc(rec, f"E[softmax f]/{pred_type}", f.softmax(-1))
            _mc(rec, f"E[max softmax f]/{pred_type}", f.softmax(-1).max(-1).values)
        else:
            _mc(rec, f"P[f > 0]/{pred_type}", (f > 0).to(dt))
    if task == "regression":
        rec("pred/glm", lambda: la(x, pred_type="glm"))  # the exact moments
    g = torch.Generator().manual_seed(13)
    ps = rec("predictive_samples/glm/shape", lambda: tuple(la.predictive_samples(
        x, pred_type="glm", n_samples=7, generator=g).shape))  # fmt: skip
    if ps is not None:
        g = torch.Generator().manual_seed(14)
        s = la.predictive_samples(x, pred_type="glm", n_samples=N_MC, generator=g)
        _mc(rec, "predictive_samples/glm/E", s.detach())


# -- 5. Hugging Face -----------------------------------------------------------------
def _tiny_gpt2_data(torch, n: int, seed: int, vocab: int, length: int):
    """Token sequences, left-padded with token 0 (attention mask 0), binary labels:
    whether token 1 occurs. Left padding: the model's sequence logits are those of
    the last position, the features ``feature_reduction='pick_last'`` takes."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (n, length), generator=g)
    lengths = torch.randint(3, length + 1, (n,), generator=g)
    where = torch.randint(0, length, (n,), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    mask = (torch.arange(length) >= length - lengths[:, None]).long()
    hit = labels.bool() & (where >= length - lengths)
    ids[hit, where[hit]] = 1
    labels = hit.long()
    ids = ids * mask
    return [
        {"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]}
        for i in range(n)
    ]


def _gpt2(torch, seed: int = 0):
    try:
        import transformers
    except ImportError:
        return None, None
    config = transformers.GPT2Config(
        vocab_size=20, n_positions=16, n_embd=16, n_layer=1, n_head=2,
        num_labels=2, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, summary_first_dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers, config


def huggingface(laplace, rec, structure: str):
    """A tiny GPT-2 sequence classifier (built from a config, nothing downloaded)
    behind a wrapper that takes the batch mapping; last-layer Laplace on mapping
    batches with the features of the last position (``feature_reduction``, as a
    head applied at every position needs), the evidence, tuning, predictive."""
    torch = _torch()
    from torch.utils.data import DataLoader

    transformers, config = _gpt2(torch)
    if transformers is None:
        rec.results["skipped"] = ("ok", "transformers is not installed")
        return

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hf = transformers.GPT2ForSequenceClassification(config)

        def forward(self, data):
            out = self.hf(
                input_ids=data["input_ids"], attention_mask=data["attention_mask"]
            )
            return out.logits

    model = Wrapper().double().eval()
    rec("model_params", lambda: torch.nn.utils.parameters_to_vector(
        model.parameters()).detach().clone())  # fmt: skip
    train = _tiny_gpt2_data(torch, 32, seed=1, vocab=20, length=8)
    test = _tiny_gpt2_data(torch, 6, seed=2, vocab=20, length=8)
    loader = DataLoader(train, batch_size=8)
    batch = next(iter(DataLoader(train, batch_size=32)))
    _fit_map(model, batch, batch["labels"], torch.nn.functional.cross_entropy,
             steps=30, lr=0.01)  # fmt: skip
    x = next(iter(DataLoader(test, batch_size=6)))

    la = rec("construct", lambda: laplace.Laplace(
        model, "classification", subset_of_weights="last_layer",
        hessian_structure=structure, feature_reduction="pick_last"))  # fmt: skip
    if la is None:
        return
    rec("construct", lambda: type(la).__name__)
    if rec("fit", lambda: la.fit(loader) or "fitted") is None:
        return
    rec("n_params", lambda: la.n_params)
    rec("n_data", lambda: la.n_data)
    rec("mean", lambda: la.mean)
    rec("lml", lambda: la.log_marginal_likelihood())
    rec("pred/probit", lambda: la(x, pred_type="glm", link_approx="probit"))
    rec("optimize/marglik", lambda: (la.optimize_prior_precision(
        method="marglik", pred_type="glm", n_steps=50, lr=0.1),
        la.prior_precision)[1])  # fmt: skip
    rec("optimize/pred/probit", lambda: la(x, pred_type="glm", link_approx="probit"))
    g = torch.Generator().manual_seed(6)
    mc = rec("optimize/pred/mc~", lambda: la(
        x, pred_type="glm", link_approx="mc", n_samples=1000, generator=g))  # fmt: skip
    if mc is not None:
        rec("optimize/pred/mc~@se", lambda: (mc * (1 - mc) / 1000).clamp_min(0).sqrt())


def huggingface_tokens(laplace, rec):
    """A token-level model (GPT-2 features at every position, a linear head at every
    position) made a sequence classifier by ``feature_reduction='pick_last'``."""
    torch = _torch()
    from torch.utils.data import DataLoader

    transformers, config = _gpt2(torch)
    if transformers is None:
        rec.results["skipped"] = ("ok", "transformers is not installed")
        return

    class TokenModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = transformers.GPT2Model(config)
            self.head = torch.nn.Linear(config.n_embd, 2)

        def forward(self, data):
            h = self.body(
                input_ids=data["input_ids"], attention_mask=data["attention_mask"]
            ).last_hidden_state
            return self.head(h)  # (batch, length, 2)

    model = TokenModel().double().eval()
    # sequences of full length (no padding): the last position is the last token
    train = _tiny_gpt2_data(torch, 32, seed=1, vocab=20, length=8)
    test = _tiny_gpt2_data(torch, 6, seed=2, vocab=20, length=8)
    for item in train + test:
        item["input_ids"] = item["input_ids"].clamp_min(1)
        item["attention_mask"] = torch.ones_like(item["attention_mask"])
    loader = DataLoader(train, batch_size=8)
    batch = next(iter(DataLoader(train, batch_size=32)))
    _fit_map(model, batch, batch["labels"],
             lambda out, t: torch.nn.functional.cross_entropy(out[:, -1], t),
             steps=30, lr=0.01)  # fmt: skip
    x = next(iter(DataLoader(test, batch_size=6)))
    rec("model(x)[:, -1]", lambda: model(x)[:, -1].detach())

    la = rec("construct", lambda: laplace.Laplace(
        model, "classification", subset_of_weights="last_layer",
        hessian_structure="kron", feature_reduction="pick_last"))  # fmt: skip
    if la is None:
        return
    rec("construct", lambda: type(la).__name__)
    if rec("fit", lambda: la.fit(loader) or "fitted") is None:
        return
    rec("n_params", lambda: la.n_params)
    rec("mean", lambda: la.mean)
    rec("lml", lambda: la.log_marginal_likelihood())
    rec("pred/probit", lambda: la(x, pred_type="glm", link_approx="probit"))


# -- 6. reward modeling --------------------------------------------------------------
def reward_modeling(laplace, rec, subset: str, structure: str):
    """A reward model trained on preference pairs (Bradley-Terry): Laplace fit on
    the pairs as a classification, rewards of single items predicted as a
    regression (mean and variance), and the pair predictive with ``fitting=True``."""
    torch = _torch()
    from torch.utils.data import DataLoader, TensorDataset

    dt = torch.float64
    g = torch.Generator().manual_seed(5)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=dt)
    pairs = torch.randn(48, 2, 3, generator=g, dtype=dt)
    utility = pairs @ w + 0.5 * torch.randn(48, 2, generator=g, dtype=dt)
    labels = (utility[:, 1] > utility[:, 0]).long()  # which of the two is preferred
    loader = DataLoader(TensorDataset(pairs, labels), batch_size=12)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1),
        torch.nn.Flatten(start_dim=1),
    ).to(dt)  # fmt: skip
    _fit_map(model, pairs, labels, torch.nn.functional.cross_entropy, 150, 0.05)
    items = torch.randn(6, 3, generator=g, dtype=dt)
    test_pairs = torch.randn(4, 2, 3, generator=g, dtype=dt)

    la = rec("construct", lambda: laplace.Laplace(
        model, "reward_modeling", subset_of_weights=subset,
        hessian_structure=structure))  # fmt: skip
    if la is None:
        return
    if rec("fit", lambda: la.fit(loader) or "fitted") is None:
        return
    rec("lml", lambda: la.log_marginal_likelihood())
    rec("rewards", lambda: la(items, pred_type="glm"))
    rec("pair_probs", lambda: la(test_pairs, pred_type="glm", fitting=True))
    rec("optimize/marglik", lambda: (la.optimize_prior_precision(
        method="marglik", pred_type="glm", n_steps=50, lr=0.1),
        la.prior_precision)[1])  # fmt: skip
    rec("optimize/rewards", lambda: la(items, pred_type="glm"))
    rec("optimize/pair_probs", lambda: la(test_pairs, pred_type="glm", fitting=True))


def run(laplace, name: str, rec) -> None:
    """Run the workflow ``name`` (a key of ``WORKFLOWS``) with ``laplace``."""
    function, kwargs = WORKFLOWS[name]
    globals()[function](laplace, rec, **kwargs)
