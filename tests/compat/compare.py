"""Comparing what ``scenarios.py`` wrote for this library and for laplace-torch 0.3.

Pure functions over the two result dicts (no laplace import): the tolerances, the
table of known, accepted differences, each row's status and the markdown report.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import torch

#: statuses that fail the harness; the others are reported only
FAILING = {"differs", "error-ours", "error-type", "missing"}

#: quantities whose error stops a scenario (what follows is not recorded)
STOPPERS = ("construct", "fit", "harness", "run", "sample/shape")

#: Known, accepted differences: (scenario glob, quantity glob, reason, the entry in
#: docs/differences.md). A failing row that matches one is reported as "known".
KNOWN = [
    (
        "cls/*-gp/*", "lml*",
        "GP evidence counts the data fit once (laplace-torch counts it twice)",
        "differences.md#fixed-behaviour (GP evidence)",
    ),
    (
        "cls/*-gp/*", "optimize/marglik*",
        "prior tuned by the GP evidence, which differs (see above)",
        "differences.md#fixed-behaviour (GP evidence)",
    ),
    (
        "cls/*-gp/*", "state_dict/round_trip_lml",
        "GP evidence differs (see above); the round trip itself is checked on ours",
        "differences.md#fixed-behaviour (GP evidence)",
    ),
    (
        "cls/*-gp/*", "log_likelihood",
        "the GP view's log_likelihood is that of all the training data",
        "differences.md#smaller-differences (GP view)",
    ),
    (
        "cls/last_layer-diag/reward_modeling/*", "*",
        "last-layer Diag for reward modeling works here; laplace-torch 0.3 crashes",
        "differences.md#fixed-behaviour (Last-layer Diag for reward modeling)",
    ),
    (
        "cls/*", "before_fit/[lp]*",
        "predicting or computing the evidence before fit raises, naming fit "
        "(laplace-torch predicts with the prior, or fails with an AttributeError)",
        "differences.md#clearer-errors",
    ),
    (
        "errors/*", "result",
        "bad input is refused early with a clear error (a ValueError naming the "
        "argument) where laplace-torch raises another type or nothing",
        "differences.md#clearer-errors",
    ),
    (
        "backend/BackPackGGN/all-kron/*/conv", "*",
        "BackPackGGN Kron on a convolution is the KFC pair of every backend; "
        "laplace-torch keeps BackPACK's position sums (T times larger, reduce G)",
        "differences.md#fixed-behaviour (Kron with BackPackGGN on convolutions)",
    ),
    (
        "backend/[CA]*Hessian/all-kron/*", "*",
        "Kron with an exact-Hessian backend is refused at construction; "
        "laplace-torch builds it and fails in fit with NotImplementedError",
        "differences.md#clearer-errors",
    ),
    (
        "backend/BackPackEF/all-kron/*", "*",
        "Kron with BackPackEF is refused at construction; laplace-torch builds it "
        "and fails in fit with NotImplementedError",
        "differences.md#clearer-errors",
    ),
    (
        "cls/*", "before_fit/mean",
        "la.mean before fit is the prior mean expanded to (n_params,); laplace-torch "
        "keeps the prior mean as given (often 0-dim, so its sample fails)",
        "differences.md#smaller-differences (Before fit)",
    ),
    (
        "backend/*EF/*/regression", "*",
        "the regression empirical Fisher is that of N(f, 1), which equals the GGN in "
        "expectation over the model's targets; laplace-torch's is twice that",
        "differences.md#fixed-behaviour (Regression empirical Fisher)",
    ),
    (
        "backend/CurvlinopsEF/last_layer-diag/classification", "*",
        "laplace-torch's last-layer Diag with CurvlinopsEF is zero; ours is the "
        "per-sample-gradient empirical Fisher, as its AsdlEF and BackPackEF",
        "differences.md#fixed-behaviour (Last-layer Diag with CurvlinopsEF)",
    ),
    (
        "cls/*/regression/*", "optimize/gridsearch*",
        "the regression grid search scores the Gaussian predictive NLL by default "
        "(laplace-torch's MSE of the mean does not depend on the prior)",
        "differences.md#fixed-behaviour (Regression grid search)",
    ),
    (
        "backend/*Hessian/all-full/regression", "[lp]*",
        "an indefinite posterior precision raises NotPositiveDefiniteError (a "
        "LinAlgError) on every path; laplace-torch returns NaN or a wrong number",
        "differences.md#fixed-behaviour (Full evidence: one definition)",
    ),
    (
        "cls/*-lowrank/reward_modeling/*", "construct",
        "LowRank with reward modeling is refused at construction with a ValueError; "
        "laplace-torch fails too, with another type",
        "differences.md#clearer-errors",
    ),
    (
        "cls/subnetwork-*/reward_modeling/*", "construct",
        "subnetworks with reward modeling are refused at construction with a "
        "ValueError; laplace-torch fails too, with another type",
        "differences.md#clearer-errors",
    ),
    (
        "cls/*-gp/reward_modeling/*", "construct",
        "the GP view with reward modeling is refused at construction; laplace-torch "
        "builds it and fails in fit",
        "differences.md#clearer-errors",
    ),
    (
        "workflow/huggingface/last_layer-kron", "[lpo]*",
        "KFAC of a head applied at every position takes the features of the position "
        "the model uses (feature_reduction); laplace-torch's input factor sums all",
        "differences.md#fixed-behaviour (KFAC of a head applied at every position)",
    ),
    (
        "workflow/calibration/*", "optimize/gridsearch*",
        "the grid search picks the value of lowest validation NLL, scored afresh for "
        "each value; laplace-torch's metric is not reset between grid values",
        "differences.md#fixed-behaviour (Grid search with a running metric)",
    ),
    (
        "cls/all-full/regression/float32/*", "pred/nn~*",
        "float32 nn predictive: ours is within sampling error of exact float64 draws "
        "from the same posterior, laplace-torch's variance about 6 standard errors off",
        "differences.md#fixed-behaviour (float32 weight samples)",
    ),
    (
        "[ev]*lla/*", "state_dict/backend_class",
        "the default backend is NativeGGN (laplace-torch: CurvlinopsGGN); the "
        "checkpoint names it",
        "differences.md#smaller-differences (The default backend is NativeGGN)",
    ),
    (
        "ella/classification/balanced", "trajectory/*",
        "ELLA's balanced basis takes each class's even share walking the seeded "
        "permutation; laplace-torch's rule (not learnt) draws other inputs",
        "differences.md#ella-and-valla (balanced=True)",
    ),
    (
        "valla/*/random", "trajectory/*",
        "VaLLA's 'random' draws the same inducing inputs in the permutation's order "
        "(laplace-torch orders them otherwise); the packed factor's Adam steps "
        "depend on the order",
        "differences.md#ella-and-valla (VaLLA's strategies)",
    ),
    (
        "valla/*/kmeans", "trajectory/*",
        "VaLLA's 'kmeans' runs its own k-means++ and Lloyd's algorithm: other "
        "centres than laplace-torch's",
        "differences.md#ella-and-valla (VaLLA's strategies)",
    ),
    (
        "valla-errors/classes_float", "result",
        "inducing_classes of a floating-point dtype are refused; laplace-torch "
        "accepts them",
        "differences.md#ella-and-valla (Refused here, accepted by laplace-torch)",
    ),
    (
        "valla-errors/classes_with_strategy", "result",
        "inducing_classes given with a strategy (which takes the training labels) "
        "are refused; laplace-torch accepts them",
        "differences.md#ella-and-valla (Refused here, accepted by laplace-torch)",
    ),
    (
        "valla-errors/strategy_reward_modeling", "result",
        "inducing strategies are refused for reward modeling (its training inputs "
        "are pairs); laplace-torch draws from them",
        "differences.md#ella-and-valla (VaLLA's strategies)",
    ),
    (
        "workflow/huggingface/token_level-pick_last", "fit",
        "logits at every position are refused with a ValueError when the last layer "
        "is found; laplace-torch fails in fit with a shape mismatch",
        "differences.md#clearer-errors",
    ),
]  # fmt: skip


@dataclass
class Row:
    scenario: str
    key: str
    status: str  # same | same-error | differs | error-ours | error-type | ours-only
    #            | peer-only-error | missing | known | skipped
    detail: str = ""
    max_abs: float | None = None
    max_rel: float | None = None

    @property
    def failing(self) -> bool:
        return self.status in FAILING


def tolerance(key: str, dtype: torch.dtype | None) -> tuple[float, float]:
    """``(rtol, atol)`` for a quantity: each entry ``|ours - peer| <= atol * max|peer|
    + rtol * |peer|`` (the absolute part relative to the largest entry, so a matrix's
    near-zero entries are held to its scale). Prior tuning to its optimizer's
    precision, the rest to rounding. Monte Carlo quantities (keys with ``~``) are
    held to their standard errors instead (``mc_close``)."""
    single = dtype in (torch.float32, torch.float16, torch.bfloat16)
    if "@se" in key:  # the standard errors themselves: estimates
        return (0.5, 0.0)
    if key.startswith("optimize/"):
        return (1e-2, 1e-4) if single else (1e-3, 1e-6)
    if "joint" in key:  # J P^-1 J^T of an ill-conditioned P: the solve's rounding
        return (2e-4, 1e-5) if single else (1e-5, 1e-7)
    return (2e-4, 1e-5) if single else (1e-6, 1e-8)


#: a Monte Carlo estimate agrees when within this many combined standard errors
MC_SIGMAS = 5.0


def _describe(entry) -> str:
    if entry[0] == "error":
        return f"{entry[1]}: {entry[2][:160]}"
    value = entry[1]
    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            dtype, shape = str(value.dtype)[6:], tuple(value.shape)
            return f"{value.item():.6g} ({dtype}, shape {shape})"
        return f"tensor {tuple(value.shape)} {str(value.dtype)[6:]}"
    return repr(value)[:120]


def compare_values(
    key: str, ours, peer, se=None
) -> tuple[str, str, float | None, float | None]:
    """Status, detail and max abs/rel difference of two recorded values; ``se`` is
    the pair of standard errors of a Monte Carlo estimate."""
    if isinstance(ours, torch.Tensor) and isinstance(peer, torch.Tensor):
        if ours.dtype != peer.dtype:
            return "differs", f"dtype ours {ours.dtype}, peer {peer.dtype}", None, None
        if ours.shape != peer.shape:
            return (
                "differs",
                f"shape ours {tuple(ours.shape)}, peer {tuple(peer.shape)}",
                None,
                None,
            )
        if not ours.is_floating_point():
            same = torch.equal(ours, peer)
            return ("same" if same else "differs"), "", None, None
        a, b = ours.double(), peer.double()
        finite = torch.isfinite(a) & torch.isfinite(b)
        if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
            return "differs", "non-finite entries differ", None, None
        diff = (a - b).abs()[finite]
        max_abs = diff.max().item() if diff.numel() else 0.0
        scale = b.abs()[finite]
        max_rel = (diff / scale.clamp_min(1e-300)).max().item() if diff.numel() else 0.0
        if se is not None and "@se" not in key:
            bound = MC_SIGMAS * (se[0].double() ** 2 + se[1].double() ** 2).sqrt()
            how = f"within {MC_SIGMAS:g} standard errors"
        else:
            rtol, atol = tolerance(key, ours.dtype)
            top = b.abs()[finite].max().item() if finite.any() else 0.0
            bound = atol * top + rtol * b.abs() + 1e-300
            how = f"rtol {rtol:g}, atol {atol:g} x max"
        ok = bool(((a - b).abs() <= bound)[finite].all())
        return ("same" if ok else "differs"), how, max_abs, max_rel
    if isinstance(ours, torch.Tensor) or isinstance(peer, torch.Tensor):
        return (
            "differs",
            f"type ours {type(ours).__name__}, peer {type(peer).__name__}",
            None,
            None,
        )
    if isinstance(ours, float) and isinstance(peer, float):
        if math.isclose(ours, peer, rel_tol=1e-9, abs_tol=1e-12):
            return "same", "", abs(ours - peer), None
        return "differs", f"{ours!r} vs {peer!r}", abs(ours - peer), None
    same = ours == peer and type(ours) is type(peer)
    return (
        ("same" if same else "differs"),
        "" if same else f"{ours!r} vs {peer!r}",
        None,
        None,
    )


def compare_scenario(scenario: str, ours: dict, peer: dict) -> list[Row]:
    skipped = [f"{side}: {res['skipped'][1]}" for side, res in
               [("ours", ours), ("peer", peer)] if "skipped" in res]  # fmt: skip
    if skipped:  # a workflow needing a package one interpreter lacks
        return [Row(scenario, "skipped", "skipped", "; ".join(skipped))]
    rows = []
    keys = list(dict.fromkeys([*peer, *ours]))
    for key in keys:
        if "@se" in key:  # standard errors: the tolerance of their estimate's row
            continue
        o, p = ours.get(key), peer.get(key)
        base = key.rsplit(".", 1)[0]
        if p is None and base != key and peer.get(base, ("ok",))[0] == "error":
            continue  # a part of a result the peer raised on: on the row of the whole
        if o is None and p[0] == "error" and any(k.startswith(key + ".") for k in ours):
            # ours recorded the result in parts (a tuple), the peer raised
            rows.append(Row(scenario, key, "ours-only", f"peer {_describe(p)}"))
            continue
        if o is None or p is None:
            side = "ours" if o is None else "peer"
            row = Row(scenario, key, "missing", f"not recorded by {side}: "
                      f"{_describe(p if o is None else o)}")  # fmt: skip
            # a quantity only one side got to (the other stopped earlier) is reported
            # on the row that stopped it
            stopped = peer if side == "peer" else ours
            if any(stopped.get(k, ("ok",))[0] == "error" for k in STOPPERS):
                continue  # reported on the row that stopped it
        elif o[0] == "error" and p[0] == "error":
            same = o[1] == p[1]
            row = Row(
                scenario,
                key,
                "same-error" if same else "error-type",
                f"ours {_describe(o)} | peer {_describe(p)}",
            )
        elif o[0] == "error":
            row = Row(
                scenario,
                key,
                "error-ours",
                f"ours {_describe(o)} | peer {_describe(p)}",
            )
        elif p[0] == "error":
            row = Row(
                scenario, key, "ours-only", f"peer {_describe(p)} | ours {_describe(o)}"
            )
        else:
            se = None
            se_key = key.replace("~", "~@se", 1)
            if "~" in key and "@se" not in key:
                so, sp = ours.get(se_key, ("",)), peer.get(se_key, ("",))
                if so[0] == "ok" and sp[0] == "ok":
                    se = (so[1], sp[1])
            status, detail, max_abs, max_rel = compare_values(key, o[1], p[1], se)
            if status != "same":
                detail = f"{detail}; ours {_describe(o)} | peer {_describe(p)}"
            row = Row(scenario, key, status, detail, max_abs, max_rel)
        if row.failing:
            for s_glob, k_glob, reason, anchor in KNOWN:
                if fnmatch.fnmatch(scenario, s_glob) and fnmatch.fnmatch(key, k_glob):
                    row.status, row.detail = (
                        "known",
                        f"{reason} [{anchor}]; {row.detail}",
                    )
                    break
        rows.append(row)
    return rows


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.2e}"


def summary(rows: list[Row]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    return dict(sorted(counts.items()))


def write_report(path: str, rows: list[Row], meta: dict, command: str) -> None:
    """The markdown report: the summary, every scenario's status, then every row
    that is not plainly the same."""
    by_scenario: dict[str, list[Row]] = {}
    for r in rows:
        by_scenario.setdefault(r.scenario, []).append(r)
    lines = [
        "# Compatibility report: this library against laplace-torch 0.3",
        "",
        f"Written by `{command}` (tests/compat). {meta}",
        "",
        "Statuses: `same` (within the tolerance of `compare.tolerance`), "
        "`same-error` (both raise the same type), `differs`, `error-ours` (only ours "
        "raises), `error-type` (both raise, different types), `missing` (a quantity "
        "only one side recorded), `ours-only` (laplace-torch raises, ours works), "
        "`known` (an accepted difference listed in `compare.KNOWN`). The first four "
        "fail the harness.",
        "",
        "## Summary",
        "",
        "| status | quantities |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in summary(rows).items()],
        "",
        "## Scenarios",
        "",
        "| scenario | status | quantities | max abs diff | max rel diff "
        "| first failure |",
        "|---|---|---|---|---|---|",
    ]
    for name, rs in by_scenario.items():
        failing = [r for r in rs if r.failing]
        status = "FAIL" if failing else (
            "known" if any(r.status == "known" for r in rs) else "ok")  # fmt: skip
        abs_ = [r.max_abs for r in rs if r.max_abs is not None]
        rel = [r.max_rel for r in rs if r.max_rel is not None]
        first = f"`{failing[0].key}` {failing[0].status}" if failing else ""
        lines.append(
            f"| {name} | {status} | {len(rs)} | {_fmt(max(abs_, default=None))} "
            f"| {_fmt(max(rel, default=None))} | {first} |"
        )
    lines += [
        "",
        "## Every quantity that is not the same",
        "",
        "| scenario | quantity | status | max abs | max rel | detail |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.status in ("same", "same-error"):
            continue
        detail = r.detail.replace("|", "/").replace("\n", " ")
        lines.append(
            f"| {r.scenario} | `{r.key}` | {r.status} | {_fmt(r.max_abs)} "
            f"| {_fmt(r.max_rel)} | {detail} |"
        )
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


#: the last comparison (rows, meta, report path), for the terminal summary
LAST: dict = {}
