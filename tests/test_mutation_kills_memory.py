"""Tests written to kill the survivors of the mutation stage ``memory_plan``
(``laplace/utils/memory.py``; ``tools/mutation/run.sh memory_plan``): the byte
counts of every estimator, term by term, against the formulas their docstrings
state (for problems where each phase of a peak is the largest), the sizes and
units, the limits (``memory_limit``, ``LAPLACE_MEMORY_LIMIT``), where the memory
available comes from (CUDA, ``/proc/meminfo``, a cgroup, psutil), the
alternatives offered and the message, the settings read from a Laplace object and
what the library's checks pass on."""

from __future__ import annotations

import collections
import math
import random
import sys
import types
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace
from laplace.utils import memory
from laplace.utils.memory import (
    Available,
    Estimate,
    MemoryPlanError,
    Problem,
    Profile,
    Settings,
    Term,
    memory_limit,
)

CHUNK = 2**24


# -- sizes -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "value"),
    [("1kb", 10**3), ("1mb", 10**6), ("1gb", 10**9), ("1tb", 10**12),
     ("1k", 10**3), ("1m", 10**6), ("1g", 10**9), ("1t", 10**12),
     ("1K", 10**3), ("2 M", 2 * 10**6), ("1 T", 10**12),
     ("1kib", 2**10), ("1MiB", 2**20), ("1GIB", 2**30), ("1tib", 2**40),
     ("7b", 7), ("7 B", 7), (" 3 k b ", 3000), ("1", 1), (1, 1), (2.5, 2)],
)  # fmt: skip
def test_parse_bytes_reads_every_unit(text, value):
    assert memory.parse_bytes(text) == value


@pytest.mark.parametrize(
    ("bad", "shown"),
    [(-5, "got -5"), (True, "got True"), (None, "got None"), (0.0, "got 0.0"),
     (float("inf"), "got inf"), ("5 parsecs", "got '5parsecs'"), ("kb", "got 'kb'")],
)  # fmt: skip
def test_a_refused_limit_names_what_it_got(bad, shown):
    with pytest.raises(ValueError) as info:
        memory.parse_bytes(bad)
    assert str(info.value).endswith(shown + ".")
    assert str(info.value).startswith("A memory limit must be a positive number")


@pytest.mark.parametrize(
    ("n", "text"),
    [(None, "unknown"), (0, "0 B"), (999, "999 B"), (1000, "1.0 kB"),
     (1499, "1.5 kB"), (999_999, "1000.0 kB"), (10**6, "1.0 MB"),
     (1_250_000, "1.2 MB"), (10**9, "1.0 GB"), (2_500_000_000, "2.5 GB"),
     (10**12, "1.0 TB"), (3 * 10**13, "30.0 TB")],
)  # fmt: skip
def test_format_bytes_in_decimal_units(n, text):
    assert memory.format_bytes(n) == text


def test_dtype_names_of_the_itemsizes():
    assert memory._dtype_name(2) == "16-bit"
    assert memory._dtype_name(4) == "float32"
    assert memory._dtype_name(8) == "float64"
    assert memory._dtype_name(3) == "3-byte"


def test_term_and_estimate_text():
    a = Term("curvature", 2_000_000, "(10 x 10, float64)")
    b = Term("gradients", 1500)
    z = Term("empty", 0, "(nothing)")
    assert str(a) == "curvature (10 x 10, float64): 2.0 MB"
    assert str(b) == "gradients: 1.5 kB"
    est = Estimate("fit", "all/full", (a, z, b), 8)
    assert est.nbytes == 2_001_500
    assert est.dominant is a
    assert str(est) == (
        "fit of all/full: 2.0 MB (curvature (10 x 10, float64): 2.0 MB; "
        "gradients: 1.5 kB)"
    )
    # the first of equal terms is the dominant one
    assert Estimate("fit", "x", (b, replace(b, name="other")), 1).dominant is b


# -- limits and the memory available ---------------------------------------------------
def test_memory_limit_values_and_sources(monkeypatch):
    monkeypatch.delenv(memory.ENV_VAR, raising=False)
    with memory_limit("1 kB"):
        assert memory.available_memory("cpu") == Available(1000, "memory_limit()")
        assert memory._user_limit() == (1000, "memory_limit()")
        for off in ("off", "OFF", "false", "no", "disable", "Disabled", False):
            with memory_limit(off):
                assert not memory.checks_enabled()
                assert memory.available_memory("cpu") == Available(
                    None, "checks turned off by memory_limit()"
                )
            assert memory.checks_enabled()
        with memory_limit(None):  # the default again, inside a limit
            assert memory._user_limit() == (memory._DEFAULT, "")
        assert memory.available_memory("cpu").nbytes == 1000
    assert memory._user_limit() == (memory._DEFAULT, "")


@pytest.mark.parametrize("value", ["off", " No ", "DISABLE", "false", "disabled"])
def test_the_environment_turns_the_checks_off(monkeypatch, value):
    monkeypatch.setenv(memory.ENV_VAR, value)
    assert memory._user_limit() == (False, memory.ENV_VAR)
    assert not memory.checks_enabled()
    assert memory.available_memory("cpu") == Available(
        None, "checks turned off by LAPLACE_MEMORY_LIMIT"
    )


@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_environment_variable_is_no_limit(monkeypatch, value):
    monkeypatch.setenv(memory.ENV_VAR, value)
    assert memory._user_limit() == (memory._DEFAULT, "")
    assert memory.checks_enabled()


def test_a_bad_environment_limit_names_the_variable_and_its_value(monkeypatch):
    monkeypatch.setenv(memory.ENV_VAR, "heaps")
    with pytest.raises(ValueError) as info:
        memory._user_limit()
    assert str(info.value).startswith(
        "The environment variable LAPLACE_MEMORY_LIMIT='heaps': A memory limit"
    )
    assert info.value.__cause__ is None and info.value.__suppress_context__


class _FakeCuda:
    def __init__(self):
        self.calls = []

    def is_available(self):
        return True

    def mem_get_info(self, device):
        self.calls.append(("mem_get_info", device))
        return 5000, 10**9

    def memory_reserved(self, device):
        self.calls.append(("memory_reserved", device))
        return 700

    def memory_allocated(self, device):
        self.calls.append(("memory_allocated", device))
        return 200


def test_cuda_memory_is_the_free_memory_plus_the_unused_cache(monkeypatch):
    monkeypatch.delenv(memory.ENV_VAR, raising=False)
    fake = _FakeCuda()
    for name in ("is_available", "mem_get_info", "memory_reserved", "memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    found = memory.available_memory("cuda:1")
    assert found == Available(5500, "torch.cuda.mem_get_info(cuda:1) + cached")
    dev = torch.device("cuda:1")
    assert fake.calls == [
        ("mem_get_info", dev),
        ("memory_reserved", dev),
        ("memory_allocated", dev),
    ]


def test_memory_of_an_unknown_device(monkeypatch):
    monkeypatch.delenv(memory.ENV_VAR, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert memory.available_memory("cuda") == Available(None, "unknown for device cuda")
    assert memory.available_memory("meta") == Available(None, "unknown for device meta")


def _files(monkeypatch, contents):
    def fake_open(path, *args, **kwargs):
        if path not in contents:
            raise FileNotFoundError(path)
        import io

        return io.StringIO(contents[path])

    monkeypatch.setattr(memory, "open", fake_open, raising=False)


MEMINFO = "MemTotal:  9999 kB\nnot a field\nMemAvailable:    2048 kB\n"


def test_meminfo_without_a_cgroup_limit(monkeypatch):
    monkeypatch.delenv(memory.ENV_VAR, raising=False)
    _files(monkeypatch, {"/proc/meminfo": MEMINFO})
    expected = Available(2048 * 1024, "MemAvailable of /proc/meminfo")
    assert memory._meminfo_available() == expected
    assert memory.available_memory() == expected  # the CPU by default
    assert memory.available_memory("cpu") == expected
    cgroup = {
        "/sys/fs/cgroup/memory.max": "max\n",
        "/sys/fs/cgroup/memory.current": "5",
    }
    _files(monkeypatch, {"/proc/meminfo": MEMINFO, **cgroup})
    assert memory._meminfo_available() == expected


def test_a_cgroup_limit_bounds_meminfo(monkeypatch):
    avail = 2048 * 1024
    files = {
        "/proc/meminfo": MEMINFO,
        "/sys/fs/cgroup/memory.max": "1000000\n",
        "/sys/fs/cgroup/memory.current": " 400000\n",
    }
    _files(monkeypatch, files)
    assert memory._meminfo_available() == Available(
        600000, "cgroup memory.max - memory.current"
    )
    # room in the cgroup equal to MemAvailable, or more: MemAvailable
    files["/sys/fs/cgroup/memory.max"] = str(avail + 400000)
    _files(monkeypatch, files)
    assert memory._meminfo_available() == Available(
        avail, "MemAvailable of /proc/meminfo"
    )
    files["/sys/fs/cgroup/memory.current"] = "oops"
    _files(monkeypatch, files)
    assert memory._meminfo_available() == Available(
        avail, "MemAvailable of /proc/meminfo"
    )


def test_without_meminfo_psutil_or_nothing(monkeypatch):
    monkeypatch.delenv(memory.ENV_VAR, raising=False)
    _files(monkeypatch, {"/proc/meminfo": "MemTotal: 5 kB\n"})
    assert memory._meminfo_available() is None
    fake = types.ModuleType("psutil")
    fake.virtual_memory = lambda: types.SimpleNamespace(available=1234.0)
    monkeypatch.setitem(sys.modules, "psutil", fake)
    found = memory.available_memory("cpu")
    assert found == Available(1234, "psutil") and type(found.nbytes) is int
    monkeypatch.setitem(sys.modules, "psutil", None)  # not installed
    assert memory.available_memory("cpu") == Available(
        None, "unknown (no /proc/meminfo, no psutil)"
    )


# -- the estimators, term by term ------------------------------------------------------
def _dt(s):
    return {2: "16-bit", 4: "float32", 8: "float64"}[s]


WINS: collections.Counter = collections.Counter()


def _peak(label, *phases):
    """The phase with the largest sum (the first of equal sums), counted in WINS."""
    sums = [sum(t.nbytes for t in ph) for ph in phases]
    i = sums.index(max(sums))
    WINS[(label, i)] += 1
    return list(phases[i])


def _renamed(t, name, nbytes=None):
    return Term(name, t.nbytes if nbytes is None else nbytes, t.detail)


def _square(n, s, name):
    return Term(name, n * n * s, f"({n:,} x {n:,}, {_dt(s)})")


def _run(pb, K):
    B, p = pb.batch, pb.profile
    return [
        Term("activations", B * (p.graph + p.kept), f"(forward graph, batch {B})"),
        Term("recorded inputs", B * p.records, f"(batch {B})"),
        Term("backpropagated gradients", K * B * p.taps, f"({K} columns x {B})"),
        Term("backward workspace", K * B * p.largest),
    ]


def _tape(pb, K):
    B, p = pb.batch, pb.profile
    return [
        Term("recorded inputs", B * (p.inputs + p.records), f"(batch {B})"),
        Term("backpropagated gradients", K * B * p.taps, f"({K} columns x {B})"),
    ]


def _chunks(pb, K, name):
    """The weight shared over positions whose chunk (its gradients' slice and its
    vectors ``(K, n, numel)``, ``n`` examples keeping ``K n numel <= 2**24``) is the
    largest; (chunk, vectors)."""
    best = (0, 0, "")
    for numel, spots, n_out in pb.profile.shared:
        n = min(pb.batch, max(1, CHUNK // (K * numel)))
        vec = K * n * numel * pb.itemsize
        chunk = K * n * spots * n_out * pb.itemsize + vec
        if chunk > best[0]:
            best = (chunk, vec, f"({K}, {n}, {numel:,})")
    return Term(name, best[0], best[2]), Term(name, best[1], best[2])


def _features(pb):
    B, D = pb.batch, pb.profile.last_layer[1]
    return [
        Term("activations", B * pb.profile.graph, f"(feature forward, batch {B})"),
        Term("features", B * D * pb.itemsize, f"({B}, {D})"),
    ]


def _forward(pb):
    return Term(
        "forward pass", 2 * pb.batch * pb.profile.largest, f"(batch {pb.batch})"
    )


def _P(pb, subset, st):
    if subset == "last_layer":
        C, D, bias = pb.profile.last_layer
        return C * D + C * bias
    if subset == "subnetwork" and st.subnet_size:
        return st.subnet_size
    return sum(math.prod(s) for s in pb.shapes)


def _batches(pb):
    return 2 if pb.n_data is None else max(1, -(-pb.n_data // pb.batch))


def _fit_full(pb, subset, st):
    P, K, s, ws = _P(pb, subset, st), pb.columns, pb.itemsize, pb.work_itemsize
    copies = pb.outputs if st.per_output else 1
    acc = Term("curvature", copies * P * P * ws, f"({P:,} x {P:,}, {_dt(ws)})")
    held = [_square(P, s, "previous batch's curvature")] if _batches(pb) > 1 else []
    if subset == "last_layer":
        reorder = Term("batch curvature and its reorderings", 3 * P * P * s)
        return _peak("full ll", [acc, *held, *_features(pb)], [acc, *held, reorder])
    V = Term("per-example vectors", K * pb.batch * P * s, f"({K}, {pb.batch}, {P:,})")
    return _peak(
        "full",
        [acc, *held, *_run(pb, K)],
        [acc, *held, *_tape(pb, K), V, _renamed(V, "their concatenation")],
        [acc, *held, V, _square(P, s, "batch curvature")],
    )


def _factor_bytes(blocks, s, low_rank):
    factors = eig = largest = 0
    for block in blocks:
        for n in block:
            if n < 0:
                f = e = -n
            elif low_rank is not None and n > max(low_rank):
                f = e = low_rank[0] * n + low_rank[0] + 1
            else:
                f, e, largest = n * n, n * (n + 1), max(largest, n)
            factors, eig = factors + f * s, eig + e * s
    return factors, eig, largest


def _fit_kron(pb, subset, st):
    ws = pb.work_itemsize
    blocks = pb.blocks
    if subset == "last_layer":
        C, D, bias = pb.profile.last_layer
        blocks = ((C, D), (C,)) if bias else ((C, D),)
    factors, eig, n = _factor_bytes(blocks, ws, st.low_rank)
    F = Term("Kronecker factors", factors, f"({len(blocks)} blocks)")
    if subset == "last_layer":
        batch = _features(pb)
    else:
        taps = pb.batch * pb.profile.taps // pb.itemsize
        K = max(1, min(pb.columns, 2**24 // max(1, taps)))
        conv = Term("convolution gradients (rows)", K * pb.batch * pb.profile.conv_taps)
        batch = [*_run(pb, K), conv]
    return _peak(
        "kron",
        [F, _renamed(F, "batch factors"), *batch],
        [
            F,
            Term("eigendecomposition", eig, "(of the factors)"),
            Term("eigh workspace", 3 * n * n * ws, f"(3 x {n:,}^2)"),
        ],
    )


def _fit_diag(pb, subset, st):
    P, K = _P(pb, subset, st), pb.columns
    copies = pb.outputs if st.per_output else 1
    acc = Term("curvature diagonal", copies * P * pb.work_itemsize, f"({P:,},)")
    if subset == "last_layer":
        return [acc, *_features(pb)]
    chunk, vec = _chunks(pb, K, "per-example vectors (chunk)")
    return _peak(
        "diag",
        [acc, *_run(pb, K)],
        [acc, *_tape(pb, K), chunk, _renamed(vec, "their squares")],
    )


def _fit_lowrank(pb, subset, st):
    P, ws = _P(pb, subset, st), pb.work_itemsize
    b = min(P, st.rank + 10)
    m = min(P, b * st.eig_iterations)
    return [
        Term("Lanczos basis", 2 * P * m * ws, f"({P:,}, {m}) and its extension"),
        *_run(pb, pb.columns),
        Term("products", 3 * P * b * ws),
    ]


def _fit_gp(pb, subset, st):
    M, C, s, p = st.n_subset or 1, pb.outputs, pb.itemsize, pb.profile
    if subset == "last_layer":
        jac = M * (p.last_layer[1] + 1) * s
        kernel = C * M * M * s
        rest = _features(pb)
    else:
        explicit = (p.explicit + sum(n for n, _, _ in p.shared)) * C * s
        jac = M * min(C * p.taps + p.inputs + explicit, C * _P(pb, subset, st) * s)
        kernel = M * M * C * C * s
        rest = _run(replace(pb, batch=min(pb.batch, M)), C)
    return [
        Term("subset Jacobians", jac, f"({M} points)"),
        Term("kernel", kernel, f"({M * C:,} x {M * C:,})"),
        Term("kernel factorization", kernel),
        *rest,
    ]


def _pred_dense(pb, subset, st):
    P, C, B = _P(pb, subset, st), pb.outputs, pb.batch
    s, ws = pb.itemsize, pb.work_itemsize
    form, build = [], []
    if not st.posterior_built:
        form = [
            _square(P, ws, "posterior precision"),
            _square(P, ws, "Cholesky factor"),
        ]
        build = [
            _square(P, ws, "posterior precision"),
            _square(P, ws, "scaled curvature"),
            _square(P, ws, "diag(prior precision)"),
        ]
    if subset == "last_layer":
        C, D, bias = pb.profile.last_layer
        Dt = D + int(bias)
        n = min(B, max(1, CHUNK // (C * C * Dt)))
        cov = _square(P, ws, "covariance")
        two = _renamed(cov, "covariance reordered (two copies)", 2 * P * P * ws)
        chunk = Term("chunk", n * C * C * Dt * s, f"({n}, {C}, {C}, {Dt})")
        return _peak("dense ll", build, [*form, _forward(pb)], [*form, cov, two, chunk])
    J = Term("Jacobians", B * C * P * s, f"({B}, {C}, {P:,})")
    joint = [Term("joint covariance", B * C * B * C * s)] if st.joint else []
    return _peak(
        "dense",
        build,
        [*form, *_run(pb, C)],
        [*form, *_tape(pb, C), J, _renamed(J, "their concatenation")],
        [*form, J, _renamed(J, "solve copies", 2 * J.nbytes), *joint],
    )


def _pred_lowrank(pb, subset, st):
    P, C, B = _P(pb, subset, st), pb.outputs, pb.batch
    J = Term("Jacobians", B * C * P * pb.itemsize, f"({B}, {C}, {P:,})")
    return _peak(
        "lowrank pred",
        _run(pb, C),
        [*_tape(pb, C), J, _renamed(J, "their concatenation")],
        [J, _renamed(J, "J / p0")],
    )


def _pred_blocks(pb, subset, st, rotated):
    C, B, s, p = pb.outputs, pb.batch, pb.itemsize, pb.profile
    if subset == "last_layer":
        D = p.last_layer[1]
        return _peak(
            "blocks ll",
            [_forward(pb)],
            [
                Term("features", 2 * B * D * s, f"({B}, {D}) and rotated"),
                Term("variances", 2 * B * C * C * s, f"({B}, {C}, {C})"),
            ],
        )
    if st.low_rank is not None and max(max(b) for b in pb.blocks) > max(st.low_rank):
        return _pred_lowrank(pb, subset, st)
    explicit = Term("explicit Jacobians", C * B * p.explicit * s, f"({C}, {B}, ...)")
    copies = []
    if rotated:
        copies = [
            Term("rotated factors", B * p.inputs + C * B * p.factored_taps),
            _renamed(explicit, "explicit Jacobians rotated"),
        ]
    chunk = _chunks(pb, C, "per-example Jacobians (chunk)")[0]
    last = [*copies, chunk] if rotated else [*_tape(pb, C), explicit, chunk]
    return _peak(
        "blocks rotated" if rotated else "blocks",
        _run(pb, C),
        [*_tape(pb, C), explicit, *copies],
        last,
    )


def _pred_gp(pb, subset, st):
    M, C, B = st.n_subset or 1, pb.outputs, pb.batch
    cross = Term(
        "cross-kernel", 3 * B * C * M * C * pb.itemsize, f"({B * C}, {M * C}) x 3"
    )
    return [cross, _forward(pb)] if subset == "last_layer" else [cross, *_run(pb, C)]


def _pred_nn(pb, subset, st):
    P, S, B, C = _P(pb, subset, st), st.n_samples, pb.batch, pb.outputs
    return [
        Term("weight samples", 3 * S * P * pb.work_itemsize, f"({S}, {P:,}) x 3"),
        _forward(pb),
        Term("outputs", S * B * C * pb.itemsize, f"({S}, {B}, {C})"),
    ]


def _kept(structure, pb, subset, st):
    B, C, s, p = pb.batch, pb.outputs, pb.itemsize, pb.profile
    if structure == "gp":
        M = st.n_subset or 1
        return Term("rotated cross-kernel", M * C * B * C * s)
    if subset == "last_layer":
        D = p.last_layer[1]
        return Term("features", B * D * s, f"({B}, {D})")
    if structure in ("kron", "diag"):
        size = B * p.inputs + C * B * p.factored_taps + C * B * p.explicit * s
        return Term("Jacobian factors", size, f"(batch {B})")
    P = _P(pb, subset, st)
    return Term("Jacobians", B * C * P * s, f"({B}, {C}, {P:,})")


FIT = {
    "full": _fit_full,
    "kron": _fit_kron,
    "diag": _fit_diag,
    "lowrank": _fit_lowrank,
    "gp": _fit_gp,
}
PRED = {
    "full": _pred_dense,
    "kron": lambda pb, su, st: _pred_blocks(pb, su, st, True),
    "diag": lambda pb, su, st: _pred_blocks(pb, su, st, False),
    "lowrank": _pred_lowrank,
    "gp": _pred_gp,
}


def _expected(operation, subset, structure, pb, st):
    if operation == "fit":
        return FIT[structure](pb, subset, st)
    if operation == "glm predictive":
        return PRED[structure](pb, subset, st)
    if operation == "nn predictive":
        return _pred_nn(pb, subset, st)
    if operation == "gridsearch":
        one = PRED[structure](pb, subset, replace(st, posterior_built=False))
        if not st.n_val:
            return one
        kept = _kept(structure, pb, subset, st)
        others = -(-st.n_val // pb.batch) - 1
        name = f"{kept.name} of the other validation batches"
        return [*one, Term(name, max(0, others) * kept.nbytes)]
    assert operation == "marglik_training"
    n, s, B = sum(math.prod(x) for x in pb.shapes), pb.itemsize, pb.batch
    state = Term("optimizer state", 2 * n * s, "(Adam's moments)")
    best = Term("best weights", n * s, "(a copy of the state)")
    step = [
        state,
        Term("gradients", n * s),
        Term("activations", B * pb.profile.graph, f"(batch {B})"),
    ]
    fitted = FIT[structure](pb, subset, st)
    largest = fitted[[t.nbytes for t in fitted].index(max(t.nbytes for t in fitted))]
    phases = [
        step,
        [state, best, _renamed(largest, "previous " + largest.name), *fitted],
    ]
    if structure == "full":
        P = _P(pb, subset, st)
        spectrum = Term("spectrum", 16 * P * P, f"(two {P:,} x {P:,}, float64)")
        phases.append([state, best, largest, spectrum])
    return _peak("marglik " + structure, *phases)


def _log_int(rng, lo, hi):
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def _random_problem(rng):
    n_shared = rng.choice([0, 0, 1, 2, 3])
    shared = tuple(
        (_log_int(rng, 1, 10**7), _log_int(rng, 2, 5000), _log_int(rng, 1, 500))
        for _ in range(n_shared)
    )
    profile = Profile(
        graph=_log_int(rng, 1, 10**8),
        kept=_log_int(rng, 1, 10**8),
        largest=_log_int(rng, 1, 10**8),
        taps=_log_int(rng, 1, 10**8),
        inputs=_log_int(rng, 1, 10**8),
        records=_log_int(rng, 1, 10**8),
        conv_taps=rng.choice([0, _log_int(rng, 1, 10**8)]),
        factored_taps=_log_int(rng, 1, 10**8),
        explicit=_log_int(rng, 1, 10**6),
        shared=shared,
        outputs=_log_int(rng, 1, 1000),
        last_layer=(
            _log_int(rng, 1, 1000),
            _log_int(rng, 1, 5000),
            rng.random() < 0.5,
        ),
    )
    shapes = tuple(
        (_log_int(rng, 1, 3000), _log_int(rng, 1, 3000))
        for _ in range(rng.randint(1, 3))
    )
    blocks = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.random()
        if kind < 0.5:
            blocks.append((_log_int(rng, 1, 5000), _log_int(rng, 1, 5000)))
        elif kind < 0.75:
            blocks.append((_log_int(rng, 1, 5000),))
        else:
            blocks.append((-_log_int(rng, 1, 10**6), _log_int(rng, 1, 500)))
    return Problem(
        shapes=shapes,
        blocks=tuple(blocks),
        profile=profile,
        batch=_log_int(rng, 1, 4096),
        outputs=profile.outputs,
        columns=_log_int(rng, 1, 1000),
        itemsize=rng.choice([2, 4, 8]),
        work_itemsize=rng.choice([4, 8]),
        n_data=rng.choice([None, 1, _log_int(rng, 1, 10**6)]),
    )


def _random_settings(rng):
    return Settings(
        rank=_log_int(rng, 1, 300),
        low_rank=rng.choice([None, (_log_int(rng, 1, 50), _log_int(rng, 1, 3000))]),
        subnet_size=rng.choice([None, _log_int(rng, 1, 10**5)]),
        n_subset=rng.choice([None, _log_int(rng, 1, 5000)]),
        n_samples=_log_int(rng, 1, 1000),
        joint=rng.random() < 0.5,
        per_output=rng.random() < 0.5,
        posterior_built=rng.random() < 0.5,
        n_val=rng.choice([None, 0, _log_int(rng, 1, 10**5)]),
        eig_iterations=_log_int(rng, 1, 100),
    )


OPERATIONS = (
    "fit",
    "glm predictive",
    "nn predictive",
    "gridsearch",
    "marglik_training",
)


def test_every_estimate_is_the_sum_of_its_documented_terms():
    """For random problems and settings, every operation of every structure and
    subset has exactly the terms (name, bytes, shape) its docstring states, at the
    phase whose terms add up to the most; each phase of each peak is the largest
    for some of the problems."""
    rng = random.Random(0)
    WINS.clear()
    for _ in range(250):
        pb, st = _random_problem(rng), _random_settings(rng)
        for op in OPERATIONS:
            for subset in ("all", "last_layer", "subnetwork"):
                for structure in memory.ESTIMATORS:
                    got = memory.estimate(op, subset, structure, pb, st)
                    want = _expected(op, subset, structure, pb, st)
                    assert got.terms == tuple(want), (op, subset, structure, pb, st)
                    assert got.operation == op and got.batch_size == pb.batch
                    assert got.approximation == f"{subset}/{structure}"
    # phases that can be the largest (the others never are: the last layer's
    # dense predictive builds three (P, P) and holds five; LowRank's Woodbury
    # phase holds the Jacobians twice, as the concatenation phase plus the tape;
    # marglik_training's fit holds the batch's activations, except the GP's on
    # its M < B subset points)
    phases = {
        "full": 3, "full ll": 2, "kron": 2, "diag": 2, "dense": 4, "dense ll": 3,
        "lowrank pred": 2, "blocks ll": 2, "blocks": 3, "blocks rotated": 3,
        "marglik full": 3, "marglik kron": 2, "marglik diag": 2,
        "marglik gp": 2, "marglik lowrank": 2,
    }  # fmt: skip
    never = {("dense ll", 0), ("marglik full", 0), ("marglik kron", 0)}
    never |= {("marglik diag", 0), ("marglik lowrank", 0)}
    missing = [
        (k, i)
        for k, n in phases.items()
        for i in range(n)
        if not WINS[(k, i)] and (k, i) not in never
    ]
    assert not missing
    assert not [k for k in never if WINS[k]]


def test_estimators_with_default_settings_and_an_unknown_operation():
    pb = _random_problem(random.Random(3))
    st = Settings()
    assert (st.rank, st.n_samples, st.eig_iterations) == (20, 100, 30)
    assert not (st.joint or st.per_output or st.posterior_built)
    assert st.low_rank is st.subnet_size is st.n_subset is st.n_val is None
    for structure, table in memory.ESTIMATORS.items():
        assert table.fit(pb) == FIT[structure](pb, "all", st)
        assert table.predictive(pb) == PRED[structure](pb, "all", st)
        assert memory.estimate("fit", "all", structure, pb).terms == tuple(
            FIT[structure](pb, "all", st)
        )
        assert table.kept(pb, "all") == _kept(structure, pb, "all", st)
    assert memory.predictive_nn(pb) == _pred_nn(pb, "all", st)
    with pytest.raises(ValueError, match="Unknown operation 'fitt'"):
        memory.estimate("fitt", "all", "full", pb)


def _small_problem(**kw):
    profile = Profile(
        graph=100, kept=20, largest=30, taps=40, inputs=50, records=60,
        conv_taps=0, factored_taps=40, explicit=3, shared=(), outputs=2,
        last_layer=(2, 5, True),
    )  # fmt: skip
    fields = dict(
        shapes=((5, 4), (5,), (2, 5), (2,)),
        blocks=((5, 4), (5,), (2, 5), (2,)),
        profile=profile,
        batch=4,
        outputs=2,
        columns=2,
        itemsize=8,
        work_itemsize=8,
        n_data=16,
    )
    fields.update(kw)
    return Problem(**fields)


def test_a_small_full_fit_by_hand():
    """P = 20 + 5 + 10 + 2 = 37 float64 weights, B = 4, K = 2, 4 batches: the
    curvature and the previous batch's are 37^2 * 8 = 10952 bytes each, the vectors
    2 * 4 * 37 * 8 = 2368, the batch curvature 10952: the last phase is the peak."""
    pb = _small_problem()
    assert pb.n_params == 37 and pb.n_batches == 4
    est = memory.estimate("fit", "all", "full", pb)
    assert [(t.name, t.nbytes) for t in est.terms] == [
        ("curvature", 10952),
        ("previous batch's curvature", 10952),
        ("per-example vectors", 2368),
        ("batch curvature", 10952),
    ]
    assert est.terms[0].detail == "(37 x 37, float64)"
    assert est.terms[2].detail == "(2, 4, 37)"
    one_batch = memory.estimate("fit", "all", "full", replace(pb, n_data=3))
    assert replace(pb, n_data=3).n_batches == 1
    assert "previous batch's curvature" not in [t.name for t in one_batch.terms]
    assert replace(pb, n_data=None).n_batches == 2
    assert replace(pb, n_data=17).n_batches == 5


def test_kron_factor_bytes_by_hand():
    # (5, 4): 25 + 16 entries, eigenpairs 30 + 20; (-7,): 7 and 7; (3,): 9 and 12
    assert memory._kron_factor_bytes(((5, 4), (-7,), (3,)), 4) == (
        (25 + 16 + 7 + 9) * 4,
        (30 + 20 + 7 + 12) * 4,
        5,
    )
    # low rank (2, 4): 5 > 4 is 2 * 6 + 1 = 13 numbers; 4 is not above 4: dense
    assert memory._kron_factor_bytes(((5, 4),), 8, (2, 4)) == (
        (13 + 16) * 8,
        (13 + 20) * 8,
        4,
    )
    # a rank above the threshold: the factor must exceed both
    assert memory._kron_factor_bytes(((5,),), 8, (6, 2)) == (25 * 8, 30 * 8, 5)


def test_kron_columns_and_the_treated_weights():
    pb = _small_problem(columns=50)
    # 4 * 40 bytes of taps in float64: 20 entries; 2**24 // 20 columns fit
    assert memory._kron_columns(pb) == 50
    big = replace(pb, profile=replace(pb.profile, taps=2**27))  # 2**26 entries
    assert memory._kron_columns(big) == 1
    mid = replace(pb, batch=1, profile=replace(pb.profile, taps=8 * 2**20))
    assert memory._kron_columns(mid) == 16
    assert memory._treated(pb, "last_layer", Settings()) == 12
    nobias = replace(pb, profile=replace(pb.profile, last_layer=(2, 5, False)))
    assert memory._treated(nobias, "last_layer", Settings()) == 10
    assert memory._treated(pb, "subnetwork", Settings(subnet_size=9)) == 9
    assert memory._treated(pb, "subnetwork", Settings()) == 37
    assert memory._treated(pb, "all", Settings(subnet_size=9)) == 37


def test_chunks_of_weights_shared_over_positions():
    """``n = min(B, max(1, 2**24 // (K numel)))`` examples per chunk."""
    shared = ((2**20, 10, 3), (100, 50, 7))
    pb = _small_problem(
        batch=64, profile=replace(_small_problem().profile, shared=shared)
    )
    chunk, vectors = memory._chunk_terms(pb, 4, "c")
    # first weight: n = 2**24 // 2**22 = 4; chunk 4*4*10*3*8 + 4*4*2**20*8
    assert vectors == Term("c", 4 * 4 * 2**20 * 8, f"(4, 4, {2**20:,})")
    assert chunk == Term("c", 4 * 4 * 30 * 8 + vectors.nbytes, f"(4, 4, {2**20:,})")
    # the second weight: n = B = 64: 4*64*350*8 + 4*64*100*8, smaller
    empty = memory._chunk_terms(_small_problem(), 4, "c")
    assert empty == (Term("c", 0), Term("c", 0))


def test_the_peak_is_the_first_largest_phase():
    a, b = [Term("a", 3), Term("b", 4)], [Term("c", 7)]
    assert memory._peak(a, b) is a
    assert memory._peak(b, a) is b
    assert memory._peak([Term("d", 1)], a) is a


# -- alternatives and the message ------------------------------------------------------
def _brute_largest(cost, limit, upper):
    fits = [n for n in range(1, upper + 1) if cost(n) <= limit]
    return max(fits) if fits else None


@pytest.mark.parametrize(
    "operation", ["fit", "glm predictive", "gridsearch", "marglik_training"]
)
@pytest.mark.parametrize(
    "key", [("all", "full"), ("all", "kron"), ("last_layer", "diag")]
)
def test_alternatives_are_every_offer_that_fits(operation, key):
    pb = _small_problem(batch=7)
    st = Settings(per_output=True, posterior_built=True, n_val=30, rank=3)
    plain = replace(st, per_output=False, posterior_built=False)
    op = "glm predictive" if operation == "gridsearch" else operation
    current = memory.estimate(operation, *key, pb, st).nbytes
    costs = sorted(
        memory.estimate(op, s, t, pb, plain).nbytes for s, t in memory._OFFERS
    )
    for limit in {costs[0], costs[2], costs[-1], current - 1, 10**9}:
        found = memory._alternatives(operation, key, pb, st, limit)
        want = []
        for subset, structure in memory._OFFERS:
            if (subset, structure) == key:
                continue
            if op == "marglik_training" and structure == "lowrank":
                continue
            est = memory.estimate(op, subset, structure, pb, plain)
            if est.nbytes <= limit:
                label = f"subset_of_weights={subset!r}, hessian_structure={structure!r}"
                want.append((label, est))
        if op != "marglik_training":

            def sub(n):
                s = replace(plain, subnet_size=n)
                return memory.estimate(op, "subnetwork", "full", pb, s).nbytes

            S = _brute_largest(sub, limit, pb.n_params)
            if S:
                label = (
                    f"subset_of_weights='subnetwork', hessian_structure='full' with "
                    f"at most {S:,} weights (e.g. LargestMagnitudeSubnetMask(model, "
                    f"n_params_subnet={S}))"
                )
                s = replace(plain, subnet_size=S)
                want.append((label, memory.estimate(op, "subnetwork", "full", pb, s)))

        def bat(b):
            return memory.estimate(operation, *key, replace(pb, batch=b), st).nbytes

        b = _brute_largest(bat, limit, pb.batch - 1)
        if b:
            est = memory.estimate(operation, *key, replace(pb, batch=b), st)
            want.append((f"a batch size of {b} (now 7)", est))
        assert found == want, limit


def test_no_last_layer_offers_without_a_last_layer():
    pb = _small_problem()
    pb = replace(pb, profile=replace(pb.profile, last_layer=None))
    found = memory._alternatives("fit", ("all", "full"), pb, Settings(), 10**12)
    labels = [label for label, _ in found]
    assert labels[:3] == [
        "subset_of_weights='all', hessian_structure='kron'",
        "subset_of_weights='all', hessian_structure='diag'",
        "subset_of_weights='all', hessian_structure='lowrank'",
    ]
    assert not any("last_layer" in label for label in labels)
    assert any("'subnetwork'" in label for label in labels)
    assert labels[-1] == "a batch size of 3 (now 4)"


def test_largest_by_bisection_against_every_n():
    for limit in range(0, 40):
        for upper in range(0, 12):
            found = memory._largest(
                lambda n: Estimate("x", "y", (Term("t", 3 * n + 1),), 1), limit, upper
            )
            assert found == _brute_largest(lambda n: 3 * n + 1, limit, upper)


class FakeLaplace:
    _device = torch.device("cpu")


@pytest.mark.parametrize(
    ("operation", "what"),
    [("fit", "FakeLaplace.fit"),
     ("glm predictive", "The GLM predictive of FakeLaplace"),
     ("nn predictive", "The nn predictive of FakeLaplace"),
     ("gridsearch", "FakeLaplace.optimize_prior_precision(method='gridsearch')"),
     ("marglik_training", "marglik_training with FakeLaplace")],
)  # fmt: skip
def test_the_message_in_full(operation, what):
    est = Estimate(
        operation, "all/full", (Term("curvature", 5_000_000, "(x)"), Term("b", 7)), 16
    )
    available = Available(2_000_000, "memory_limit()")
    alt = Estimate(operation, "all/diag", (Term("d", 1_500_000),), 16)
    text = memory._message(FakeLaplace(), est, available, [("diag please", alt)])
    assert text == (
        f"{what} would need about 5.0 MB of memory (batch of 16); 2.0 MB are "
        "available (memory_limit(), cpu). Dominant term: curvature (x): 5.0 MB.\n"
        "Cheaper settings that fit (estimated for this model and batch):\n"
        "  - diag please: 1.5 MB\n"
        "Set another limit with laplace.utils.memory_limit('64GB') or "
        "$LAPLACE_MEMORY_LIMIT=64GB, or turn the check off with memory_limit('off')."
    )
    text = memory._message(FakeLaplace(), est, available, [])
    assert text.split("\n")[1] == (
        "No cheaper setting fits: none of Kron, Diag, LowRank, the last layer, "
        "a subnetwork or a smaller batch."
    )
    assert len(text.split("\n")) == 3


# -- the plan for a model --------------------------------------------------------------
N, D_IN, WIDTH, C, B = 24, 5, 7, 3, 8


def mlp(device, dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, WIDTH), nn.Tanh(), nn.Linear(WIDTH, C)).to(
        device, dtype
    )


def data(device, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, D_IN, generator=g).to(device, dtype)
    y = torch.randint(0, C, (N,), generator=g).to(device)
    return X, y


def test_format_plan_in_full(device):
    X, _ = data(device)
    rows = memory.memory_plan(
        mlp(device), "classification", X[:B], subnetwork_size=1234, verbose=False
    )
    pb = memory.problem_of(
        Laplace(mlp(device), "classification", "all", "full"), X[:1].clone(), B
    )
    rows = [dict(r, fits=f) for r, f in zip(rows, [True, False, None] * 5)]
    lines = memory.format_plan(rows, pb, 1234).split("\n")
    src = rows[0]["available"].source
    nb = memory.format_bytes(rows[0]["available"].nbytes)
    assert lines[0] == (
        f"Memory plan: 66 weights, batch {B}, {C} outputs, 2 backpropagated "
        f"columns; available {nb} ({src})."
    )
    assert lines[1:4] == [
        "",
        "| subset | structure | fit | predictive | dominant term of fit | fits |",
        "|---|---|---|---|---|---|",
    ]
    for r, line in zip(rows, lines[4:]):
        subset = r["subset"] + (" (S = 1,234)" if r["subset"] == "subnetwork" else "")
        fits = {True: "yes", False: "**no**", None: "?"}[r["fits"]]
        assert line == (
            f"| {subset} | {r['structure']} | "
            f"{memory.format_bytes(r['fit'].nbytes)} | "
            f"{memory.format_bytes(r['predictive'].nbytes)} | {r['dominant']} | "
            f"{fits} |"
        )
    assert len(lines) == 4 + len(rows)
    empty = memory.format_plan([], pb, 1).split("\n")
    assert empty[0].endswith("available unknown ().") and len(empty) == 4


def test_memory_plan_rows_against_the_estimates(device):
    X, _ = data(device)
    with memory_limit(10**9):
        rows = memory.memory_plan(
            mlp(device), "regression", X[:B], rank=3, n_data=100, verbose=False
        )
    la = Laplace(mlp(device), "regression", "all", "full")
    pb = memory.problem_of(la, X[:1].clone(), B, 100)
    assert pb.columns == C and pb.n_data == 100
    st = Settings(rank=3, subnet_size=66 // 10, n_subset=B)
    assert len(rows) == 11
    for r in rows:
        fit = memory.estimate("fit", r["subset"], r["structure"], pb, st)
        pred = memory.estimate("glm predictive", r["subset"], r["structure"], pb, st)
        assert r["fit"] == fit and r["predictive"] == pred
        assert r["dominant"] == fit.dominant
        assert r["fits"] is (max(fit.nbytes, pred.nbytes) <= 10**9)
        assert r["available"] == Available(10**9, "memory_limit()")
    limit = rows[0]["fit"].nbytes  # all/full's fit fits exactly, its predictive not?
    with memory_limit(limit):
        rows = memory.memory_plan(
            mlp(device), "regression", X[:B], rank=3, verbose=False
        )
    for r in rows:
        assert r["fits"] is (max(r["fit"].nbytes, r["predictive"].nbytes) <= limit)
    with memory_limit("off"):
        rows = memory.memory_plan(mlp(device), "regression", X[:B], verbose=False)
    assert all(r["fits"] is None for r in rows)
    # the default subnetwork size is a tenth of the weights, at least 1
    sub = [r for r in rows if r["subset"] == "subnetwork"][0]
    assert sub["fit"].terms[0].detail == "(6 x 6, float64)"


class KeyedModel(nn.Module):
    def __init__(self, device):
        super().__init__()
        self.net = mlp(device)

    def forward(self, x):
        return self.net(x["feats"])


def test_memory_plan_reads_its_keys_and_a_loader(device):
    X, y = data(device)
    ref = memory.memory_plan(mlp(device), "classification", X[:B], verbose=False)
    rows = [{"feats": X[i], "target": y[i]} for i in range(N)]
    loader = DataLoader(rows, batch_size=B)
    by_loader = memory.memory_plan(
        KeyedModel(device), "classification", loader, dict_key_x="feats",
        dict_key_y="target", verbose=False,
    )  # fmt: skip
    batch = {"feats": X[:B], "target": y[:B]}
    by_batch = memory.memory_plan(
        KeyedModel(device), "classification", batch, dict_key_x="feats",
        dict_key_y="target", verbose=False,
    )  # fmt: skip
    pair = memory.memory_plan(
        mlp(device), "classification", [X[:B], y[:B]], verbose=False
    )
    for other in (by_loader, by_batch, pair):
        assert [r["fit"] for r in other] == [r["fit"] for r in ref]


class NoLinear(nn.Module):
    def __init__(self, device):
        super().__init__()
        self.w = nn.Parameter(torch.ones(D_IN, C, dtype=torch.float64, device=device))

    def forward(self, x):
        return x @ self.w


def test_memory_plan_without_a_last_layer(device):
    X, _ = data(device)
    rows = memory.memory_plan(NoLinear(device), "regression", X[:B], verbose=False)
    assert [(r["subset"], r["structure"]) for r in rows] == [
        ("all", "full"), ("all", "kron"), ("all", "diag"), ("all", "lowrank"),
        ("all", "gp"), ("subnetwork", "full"), ("subnetwork", "diag"),
    ]  # fmt: skip


# -- profiles --------------------------------------------------------------------------
def test_profile_of_a_convolution_by_hand(device):
    """Conv2d(2, 3, 3) on a (1, 2, 6, 6) float64 input, then flatten and Linear(48, 4):
    16 positions of 3 channels; the convolution's records are its unfolded patches
    16 x (9 * 2); its taps its output 48, the linear's output 4."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(48, 4)).to(
        device, torch.float64
    )
    x1 = torch.randn(1, 2, 6, 6, dtype=torch.float64, device=device)
    pr = memory.profile(model, x1)
    s = 8
    assert pr.records == 16 * 18 * s
    assert pr.conv_taps == 48 * s
    assert pr.taps == pr.factored_taps == (48 + 4) * s
    assert pr.inputs == (72 + 48) * s
    assert pr.outputs == 4 and pr.last_layer == (4, 48, True)
    # the convolution's weight (3, 2, 3, 3) is shared over 16 positions, 3 outputs
    assert pr.shared == ((54, 16, 3),)
    assert pr.explicit == 3 + 4  # the biases
    assert pr.largest == max(72, 48) * s


class Twice(nn.Module):
    """One linear layer called on two halves of a sequence, and a LayerNorm."""

    def __init__(self, device):
        super().__init__()
        self.lin = nn.Linear(4, 4).to(device, torch.float64)
        self.norm = nn.LayerNorm(4).to(device, torch.float64)
        self.head = nn.Linear(4, 2).to(device, torch.float64)

    def forward(self, x):  # x: (1, 5, 4)
        h = self.lin(x)
        h = self.lin(self.norm(h))
        return self.head(h.mean(1))


def test_profile_of_a_layer_used_twice_and_a_norm(device):
    model = Twice(device)
    x1 = torch.randn(1, 5, 4, dtype=torch.float64, device=device)
    pr = memory.profile(model, x1)
    s = 8
    # the LayerNorm's input is recorded: 5 x 4
    assert pr.records == 20 * s
    # a weight called twice is explicit, not shared over positions
    assert pr.shared == ()
    assert pr.explicit == 16 + 4 + 4 + 4 + 2  # lin's weight and bias, norm, head bias
    assert pr.outputs == 2 and pr.last_layer == (2, 4, True)


class Seq(nn.Module):
    def __init__(self, device):
        super().__init__()
        self.lin = nn.Linear(4, 3).to(device, torch.float64)
        self.head = nn.Linear(3, 2, bias=False).to(device, torch.float64)

    def forward(self, x):  # (1, 5, 4)
        return self.head(self.lin(x).sum(1))


def test_profile_of_a_weight_shared_over_sequence_positions(device):
    pr = memory.profile(
        Seq(device), torch.ones(1, 5, 4, dtype=torch.float64, device=device)
    )
    assert pr.shared == ((12, 5, 3),)
    assert pr.explicit == 3
    assert pr.last_layer == (2, 3, False)
    assert pr.conv_taps == 0 and pr.records == 0


def test_profile_caches_by_shape_dtype_and_treated_weights(device):
    model = mlp(device)
    x = torch.ones(1, D_IN, dtype=torch.float64, device=device)
    pr = memory.profile(model, x)
    assert memory.profile(model, x.clone()) is pr
    assert (
        memory.profile(model, torch.ones(2, D_IN, dtype=torch.float64, device=device))
        is not pr
    )
    model[0].weight.requires_grad_(False)
    fewer = memory.profile(model, x)
    assert fewer is not pr and fewer.explicit == WIDTH + C
    params = [model[2].weight]
    only = memory.profile(model, x, params)
    assert only.explicit == 0 and only.inputs == WIDTH * 8


def test_kron_blocks_of_layers_embeddings_and_other_weights(device):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.lin = nn.Linear(4, 3)
            self.norm = nn.LayerNorm(3)
            self.extra = nn.Parameter(torch.ones(2, 3))

        def forward(self, x):
            return self.norm(self.lin(self.emb(x))).sum(1) @ self.extra.T

    model = M().to(device, torch.float64)
    params = [p for p in model.parameters()]
    blocks = memory.kron_blocks(model, params)
    # the module's own parameter first, then its children's
    assert blocks == ((6,), (-10, 4), (3, 4), (3,), (3,), (3,))
    big = nn.Module()
    big.lin = nn.Linear(2, 2).to(device, torch.float64)
    huge = nn.Parameter(torch.zeros(memory.DENSE_BLOCK_LIMIT + 1, device=device))
    exact = nn.Parameter(torch.zeros(memory.DENSE_BLOCK_LIMIT, device=device))
    big.huge, big.exact = huge, exact
    blocks = memory.kron_blocks(big, [big.lin.weight, huge, exact])
    assert blocks == ((2, 2), (-huge.numel(),), (exact.numel(),))


# -- from a Laplace object -------------------------------------------------------------
def test_settings_read_from_laplace_objects(device):
    X, y = data(device)
    la = Laplace(mlp(device), "classification", "all", "lowrank", rank=7)
    st = memory.settings_of(la, n_val=5, joint=True)
    assert st == Settings(rank=7, n_val=5, joint=True)
    full = Laplace(mlp(device), "classification", "all", "full")
    assert memory.settings_of(full) == Settings()
    full.fit(DataLoader(TensorDataset(X, y), batch_size=B))
    full(X[:2])  # builds the posterior
    assert memory.settings_of(full).posterior_built is True
    gp = Laplace(mlp(device), "classification", "all", "gp", n_subset=11)
    assert memory.settings_of(gp).n_subset == 11
    reg = Laplace(
        mlp(device), "regression", "all", "diag",
        sigma_noise=torch.ones(C, dtype=torch.float64, device=device),
    )  # fmt: skip
    assert memory.settings_of(reg).per_output is True
    sub = Laplace(
        mlp(device), "classification", "subnetwork", "full",
        subnetwork_indices=torch.arange(5, device=device),
    )  # fmt: skip
    assert memory.settings_of(sub).subnet_size == 5


def test_problem_of_reads_columns_dtypes_and_data(device):
    X, _ = data(device)
    la = Laplace(mlp(device), "classification", "all", "kron")
    pb = memory.problem_of(la, X[:1].clone(), B, 50)
    assert pb.n_data == 50 and pb.batch == B and pb.outputs == C
    assert pb.columns == C - 1
    assert (pb.itemsize, pb.work_itemsize) == (8, 8)
    assert pb.shapes == ((WIDTH, D_IN), (WIDTH,), (C, WIDTH), (C,))
    assert pb.blocks == ((WIDTH, D_IN), (WIDTH,), (C, WIDTH), (C,))
    assert memory.problem_of(la, X[:1].clone(), B).n_data is None
    from laplace.curvature.native import NativeEF

    ef = Laplace(mlp(device), "classification", "all", "kron", backend=NativeEF)
    assert memory.problem_of(ef, X[:1].clone(), B).columns == 1
    mc = Laplace(
        mlp(device), "classification", "all", "kron",
        backend_kwargs={"stochastic": True, "num_samples": 5},
    )  # fmt: skip
    assert memory.problem_of(mc, X[:1].clone(), B).columns == 5
    mc1 = Laplace(
        mlp(device), "classification", "all", "kron",
        backend_kwargs={"stochastic": True},
    )  # fmt: skip
    assert memory.problem_of(mc1, X[:1].clone(), B).columns == 1
    half = Laplace(mlp(device, torch.bfloat16), "classification", "all", "kron")
    pb16 = memory.problem_of(half, X[:1].bfloat16().clone(), B)
    assert (pb16.itemsize, pb16.work_itemsize) == (2, 4)


def test_problem_of_a_last_layer_laplace_reads_its_own_layer(device):
    X, y = data(device)
    model = nn.Sequential(
        nn.Linear(D_IN, WIDTH), nn.Tanh(), nn.Linear(WIDTH, 6), nn.Tanh(),
        nn.Linear(6, C, bias=False),
    ).to(device, torch.float64)  # fmt: skip
    la = Laplace(model, "regression", "last_layer", "full")
    la.fit(
        DataLoader(
            TensorDataset(X, y.double().unsqueeze(-1).expand(-1, C).clone()),
            batch_size=B,
        )
    )
    pb = memory.problem_of(la, X[:1].clone(), B)
    assert pb.profile.last_layer == (C, 6, False)
    assert pb.columns == C


# -- the checks the library runs -------------------------------------------------------
@pytest.fixture
def calls(monkeypatch):
    seen = []

    def spy(la, operation, x1, batch, **settings):
        seen.append((operation, x1, batch, settings))

    monkeypatch.setattr(memory, "check", spy)
    return seen


def test_check_predictive_and_gridsearch_pass_their_settings(device, calls):
    X, y = data(device)
    la = Laplace(mlp(device), "classification", "all", "full")
    memory.check_predictive(la, X[:5], "nn", True, 17)
    memory.check_predictive(la, X[:5], types.SimpleNamespace(value="glm"), False, 3)
    memory.check_predictive(la, X[:5], types.SimpleNamespace(value="nn"), False, 4)
    loader = DataLoader(TensorDataset(X, y), batch_size=B)
    memory.check_gridsearch(la, loader, "nn", 9)
    memory.check_gridsearch(la, loader, types.SimpleNamespace(value="nn"), 8)
    memory.check_gridsearch(la, loader, "glm", 9)
    ops = [(c[0], c[2], c[3]) for c in calls]
    assert ops == [
        ("nn predictive", 5, {"joint": True, "n_samples": 17}),
        ("glm predictive", 5, {"joint": False, "n_samples": 3}),
        ("nn predictive", 5, {"joint": False, "n_samples": 4}),
        ("nn predictive", B, {"n_samples": 9}),
        ("nn predictive", B, {"n_samples": 8}),
        ("gridsearch", B, {"n_val": N}),
    ]
    for c in calls:
        torch.testing.assert_close(c[1], X[:1])
    with memory_limit("off"):
        memory.check_predictive(la, X[:5], "nn", True, 17)
        memory.check_gridsearch(la, loader, "nn", 9)
        memory.check_marglik_training(la, loader)
        assert memory.check_fit(la, loader) is loader
    assert len(calls) == 6


def test_check_fit_and_marglik_training_pass_their_batch(device, calls):
    X, y = data(device)
    la = Laplace(mlp(device), "classification", "all", "diag")
    loader = DataLoader(TensorDataset(X, y), batch_size=B)
    assert memory.check_fit(la, loader) is loader
    memory.check_marglik_training(la, loader)
    rows = [{"feats": X[i], "target": y[i]} for i in range(N)]
    keyed = Laplace(
        KeyedModel(device), "classification", "all", "diag",
        dict_key_x="feats", dict_key_y="target",
    )  # fmt: skip
    keyed_loader = DataLoader(rows, batch_size=B)
    memory.check_gridsearch(keyed, keyed_loader, "glm", 1)
    memory.check_marglik_training(keyed, keyed_loader)
    memory.check_fit(keyed, keyed_loader)
    assert [(c[0], c[2], c[3]) for c in calls] == [
        ("fit", B, {"n_data": N}),
        ("marglik_training", B, {}),
        ("gridsearch", B, {"n_val": N}),
        ("marglik_training", B, {}),
        ("fit", B, {"n_data": N}),
    ]
    assert set(calls[2][1]) == {"feats", "target"}


def test_marglik_training_check_finds_an_unbound_last_layer(device, calls):
    X, y = data(device)
    la = Laplace(mlp(device), "classification", "last_layer", "kron")
    assert not la._bound
    memory.check_marglik_training(la, DataLoader(TensorDataset(X, y), batch_size=B))
    assert la._bound and calls[0][0] == "marglik_training"
    fresh = Laplace(mlp(device), "classification", "last_layer", "kron")
    loader = DataLoader(TensorDataset(X, y), batch_size=B)
    assert memory.check_fit(fresh, loader) is loader and calls[1:] == []


def test_check_compares_with_equality_allowed(device):
    X, y = data(device)
    la = Laplace(mlp(device), "classification", "all", "full")
    pb = memory.problem_of(la, X[:1].clone(), B, N)
    st = memory.settings_of(la)
    est = memory.estimate("fit", "all", "full", pb, Settings())
    assert st == Settings()
    with memory_limit(est.nbytes):
        memory.check(la, "fit", X[:1].clone(), B, n_data=N)  # exactly the limit: fits
    with memory_limit(est.nbytes - 1), pytest.raises(MemoryPlanError) as info:
        memory.check(la, "fit", X[:1].clone(), B, n_data=N)
    assert info.value.estimate == est
    assert info.value.available == Available(est.nbytes - 1, "memory_limit()")
    assert info.value.alternatives == memory._alternatives(
        "fit", ("all", "full"), pb, Settings(), est.nbytes - 1
    )
    # the settings passed on reach the estimate: a joint predictive
    joint = memory.estimate(
        "glm predictive",
        "all",
        "full",
        memory.problem_of(la, X[:1].clone(), B),
        Settings(joint=True),
    )
    with memory_limit(joint.nbytes - 1), pytest.raises(MemoryPlanError) as info:
        memory.check(la, "glm predictive", X[:1].clone(), B, joint=True)
    assert info.value.estimate == joint
    # no example or an unknown figure: nothing to check
    with memory_limit(1):
        memory.check(la, "fit", None, B)


def test_a_skipped_plan_names_the_error(device):
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp(device)

        def forward(self, x):
            raise KeyError("nope")

    la = Laplace(Broken(), "classification", "all", "diag")
    X, _ = data(device)
    with memory_limit(100), pytest.warns(RuntimeWarning) as record:
        memory.check(la, "fit", X[:1].clone(), B)
    (w,) = record
    assert str(w.message) == (
        "The memory plan of fit was skipped: one example through the model failed "
        "(KeyError: 'nope'). Turn the plans off with "
        "laplace.utils.memory_limit('off')."
    )


def test_structures_without_an_estimator_are_not_checked(device):
    X, _ = data(device)
    la = Laplace(mlp(device), "classification", "all", "full")
    assert memory._structure_of(la) == ("all", "full")

    class Other:
        key = ("all", "ella")

    class Keyless:
        pass

    assert memory._structure_of(Other()) is None
    assert memory._structure_of(Keyless()) is None


def test_first_example_of_empty_loaders(device):
    x1, size, rest = memory.first_example(iter([]), "input_ids", "labels")
    assert x1 is None and size == 0 and list(rest) == []
    x1, size, same = memory.first_example([], "input_ids", "labels")
    assert x1 is None and size == 0 and same == []


def test_first_example_of_a_loader_without_collate_keys(device):
    X, y = data(device)

    class Plain:
        """Iterable of mapping batches with a dataset but no collate function."""

        dataset = list(range(N))
        batch_size = B

        def __iter__(self):
            for i in range(0, N, B):
                yield {"feats": X[i : i + B], "target": y[i : i + B]}

    x1, size, same = memory.first_example(Plain(), "feats", "target")
    assert size == B and set(x1) == {"feats", "target"}
    torch.testing.assert_close(x1["feats"], X[:1])
    assert memory._dataset_size(Plain()) == N

    class Empty:
        dataset = []

    assert memory._dataset_size(Empty()) is None
    assert memory._dataset_size(object()) is None


def test_one_example_reads_dict_key_x(device):
    X, y = data(device)
    la = Laplace(
        KeyedModel(device), "classification", "all", "diag",
        dict_key_x="feats", dict_key_y="target",
    )  # fmt: skip
    x1, n = memory._one_example({"feats": X[3:9], "target": y[3:9]}, la)
    assert n == 6
    torch.testing.assert_close(x1["feats"], X[3:4])


# -- second round: the survivors of the first run with the tests above ----------------
def test_a_cgroup_limit_counts_what_the_cgroup_uses(monkeypatch):
    """Room in the cgroup is ``memory.max - memory.current``: 2.0 MB - 0.4 MB is
    below MemAvailable (2 MiB), although 2.0 MB + 0.4 MB is not."""
    _files(
        monkeypatch,
        {
            "/proc/meminfo": MEMINFO,
            "/sys/fs/cgroup/memory.max": "2000000",
            "/sys/fs/cgroup/memory.current": "400000",
        },
    )
    assert memory._meminfo_available() == Available(
        1_600_000, "cgroup memory.max - memory.current"
    )


def test_profile_cache_tells_the_treated_weights_apart(device):
    model = mlp(device)
    x = torch.ones(1, D_IN, dtype=torch.float64, device=device)
    first = memory.profile(model, x, [model[0].weight])
    last = memory.profile(model, x, [model[2].weight])
    assert first.inputs == D_IN * 8 and last.inputs == WIDTH * 8


class KeywordCalls(nn.Module):
    """Linear layers and a LayerNorm called with keyword inputs (no positional
    argument reaches the forward hooks)."""

    def __init__(self, device):
        super().__init__()
        self.lin = nn.Linear(D_IN, 4).to(device, torch.float64)
        self.norm = nn.LayerNorm(4).to(device, torch.float64)
        self.head = nn.Linear(4, 2).to(device, torch.float64)

    def forward(self, x):
        return self.head(self.norm(input=self.lin(input=x)))


def test_profile_of_modules_called_with_keywords(device):
    pr = memory.profile(KeywordCalls(device), torch.ones(1, D_IN, dtype=torch.float64))
    # only the head's input is seen (and its output counted as a factor); the
    # outputs of all three are tapped
    assert pr.inputs == 4 * 8 and pr.records == 0
    assert pr.taps == (4 + 4 + 2) * 8 and pr.factored_taps == 2 * 8


class ConvsAndNorms(nn.Module):
    def __init__(self, device):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(2, 3, 3), nn.Conv2d(3, 2, 3), nn.Flatten(), nn.LayerNorm(8),
            nn.Linear(8, 6), nn.LayerNorm(6), nn.Linear(6, 4),
        ).to(device, torch.float64)  # fmt: skip

    def forward(self, x):
        return self.body(x)


def test_profile_sums_over_several_convolutions_and_norms(device):
    """Conv2d(2, 3, 3) then Conv2d(3, 2, 3) on (1, 2, 6, 6): 16 positions of
    3 x 3 x 2 patches and 4 positions of 3 x 3 x 3 patches; the LayerNorms'
    inputs 8 and 6; the convolutions' outputs 48 and 8."""
    pr = memory.profile(
        ConvsAndNorms(device), torch.ones(1, 2, 6, 6, dtype=torch.float64)
    )
    s = 8
    assert pr.records == (16 * 18 + 4 * 27 + 8 + 6) * s
    assert pr.conv_taps == (48 + 8) * s
    assert pr.shared == ((54, 16, 3), (54, 4, 2))
    assert all(type(v) is int for t in pr.shared for v in t)


class Tokens(nn.Module):
    def __init__(self, device):
        super().__init__()
        self.emb = nn.Embedding(10, 4).to(device, torch.float64)
        self.head = nn.Linear(4, 2).to(device, torch.float64)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


def test_profile_does_not_count_an_embeddings_ids_as_factored_inputs(device):
    pr = memory.profile(Tokens(device), torch.zeros(1, 5, dtype=torch.long))
    assert pr.inputs == 4 * 8  # the head's input only
    assert pr.factored_taps == 2 * 8
    assert pr.taps == (20 + 2) * 8


class Conv1dNet(nn.Module):
    def __init__(self, device):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 2).to(device, torch.float64)
        self.head = nn.Linear(3, 2).to(device, torch.float64)

    def forward(self, x):  # (1, 2, 5)
        return self.head(self.conv(x).sum(-1))


def test_profile_of_a_one_dimensional_convolution(device):
    pr = memory.profile(Conv1dNet(device), torch.ones(1, 2, 5, dtype=torch.float64))
    # 4 positions of 2 x 2 patches; 3 output channels
    assert pr.records == 4 * 4 * 8 and pr.conv_taps == 12 * 8
    assert pr.shared == ((12, 4, 3),)


class Outputs(nn.Module):
    def __init__(self, device, kind, T=5):
        super().__init__()
        self.kind, self.T = kind, T
        self.lin = nn.Linear(4, 3).to(device, torch.float64)
        self.unused = nn.Linear(3, 3).to(device, torch.float64)

    def forward(self, x):
        h = self.lin(x)
        return h.sum() if self.kind == "scalar" else h


def test_profile_outputs_of_scalars_sequences_and_unused_layers(device):
    x = torch.ones(1, 5, 4, dtype=torch.float64)
    scalar = memory.profile(Outputs(device, "scalar"), x)
    assert scalar.outputs == 1
    seq = memory.profile(Outputs(device, "seq"), x)
    assert seq.outputs == 3  # the last dimension of (1, 5, 3)
    # both biases are explicit, lin's weight is shared over the 5 positions, the
    # unused layer's weight (never called) is neither
    assert seq.explicit == 3 + 3 and seq.shared == ((12, 5, 3),)
    assert all(type(v) is int for v in seq.shared[0])
    two = memory.profile(
        Outputs(device, "seq"), torch.ones(1, 2, 4, dtype=torch.float64)
    )
    assert two.shared == ((12, 2, 3),)


def test_kron_blocks_are_integers(device):
    model = mlp(device)
    blocks = memory.kron_blocks(model, list(model.parameters()))
    assert all(type(n) is int for b in blocks for n in b)


def test_the_first_of_equal_chunks_is_kept():
    # (10, 2, 5) and (15, 1, 5): chunks of equal size, vectors of 10 and 15
    shared = ((10, 2, 5), (15, 1, 5))
    pb = _small_problem(profile=replace(_small_problem().profile, shared=shared))
    chunk, vectors = memory._chunk_terms(pb, 2, "c")
    assert chunk == Term("c", 2 * 4 * (10 + 10) * 8, "(2, 4, 10)")
    assert vectors.nbytes == 2 * 4 * 10 * 8


def test_kron_columns_with_almost_no_taps():
    pb = _small_problem(columns=2**24, batch=1)
    one = replace(pb, profile=replace(pb.profile, taps=8))  # one entry
    assert memory._kron_columns(one) == 2**24
    none = replace(pb, profile=replace(pb.profile, taps=0))
    assert memory._kron_columns(none) == 2**24


def test_a_factor_at_the_low_rank_threshold_keeps_the_eigenbasis():
    pb = _small_problem(blocks=((5, 4), (5,)))
    st = Settings(low_rank=(2, 5))  # 5 is not above 5: every factor dense
    assert memory.predictive_blocks(pb, "all", st) == memory.predictive_blocks(pb)
    above = Settings(low_rank=(2, 4))
    assert memory.predictive_blocks(pb, "all", above) == memory.predictive_lowrank(
        pb, "all", above
    )


def test_kept_features_of_the_last_layer():
    pb = _small_problem()
    want = Term("features", 4 * 5 * 8, "(4, 5)")
    for structure in ("full", "kron", "diag", "lowrank"):
        assert memory.ESTIMATORS[structure].kept(pb, "last_layer") == want


def test_columns_when_the_likelihood_has_no_hessian_factor(device, monkeypatch):
    la = Laplace(mlp(device), "classification", "all", "kron")

    def refuse(f):
        raise NotImplementedError

    monkeypatch.setattr(la.lik, "hessian_sqrt", refuse)
    assert memory._columns(la, torch.zeros(1, C, dtype=torch.float64)) == C


def test_problem_of_reads_the_curvature_dtype_and_the_chosen_last_layer(device):
    X, _ = data(device)
    x1 = X[:1].float().clone()
    la = Laplace(
        mlp(device, torch.float32), "classification", "all", "diag",
        curvature_dtype=torch.float64,
    )  # fmt: skip
    pb = memory.problem_of(la, x1, B)
    assert (pb.itemsize, pb.work_itemsize) == (4, 8)
    model = nn.Sequential(
        nn.Linear(D_IN, WIDTH), nn.Tanh(), nn.Linear(WIDTH, 6), nn.Tanh(),
        nn.Linear(6, C, bias=False),
    ).to(device, torch.float64)  # fmt: skip
    ll = Laplace(model, "classification", "last_layer", "full", last_layer_name="2")
    assert memory.problem_of(ll, X[:1].clone(), B).profile.last_layer == (
        6,
        WIDTH,
        True,
    )


def test_check_with_the_plans_bound_or_not_and_without_an_estimator(device):
    import warnings

    X, _ = data(device)
    unbound = Laplace(mlp(device), "classification", "last_layer", "kron")
    assert not unbound._bound

    class Ella:
        key = ("all", "ella")
        _bound = True
        _device = torch.device("cpu")

    la = Laplace(mlp(device), "classification", "all", "full")
    with memory_limit(1), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert memory.check(unbound, "fit", X[:1].clone(), B) is None
        assert memory.check(Ella(), "fit", X[:1].clone(), B) is None
        assert memory.check(la, "fit", None, B) is None


def test_every_check_passes_the_laplace_object(device, monkeypatch):
    seen = []
    monkeypatch.setattr(memory, "check", lambda la, *a, **k: seen.append(la))
    X, y = data(device)
    la = Laplace(mlp(device), "classification", "all", "full")
    loader = DataLoader(TensorDataset(X, y), batch_size=B)
    memory.check_gridsearch(la, loader, "nn", 9)
    memory.check_gridsearch(la, loader, "glm", 9)
    memory.check_predictive(la, X[:3], "nn", False, 2)
    memory.check_fit(la, loader)
    memory.check_marglik_training(la, loader)
    assert len(seen) == 5 and all(o is la for o in seen)


class DefaultKeys(nn.Module):
    def __init__(self, device):
        super().__init__()
        self.net = mlp(device)

    def forward(self, x):
        return self.net(x["input_ids"])


def test_memory_plan_defaults(device):
    """rank 20, the keys 'input_ids' and 'labels', a tenth of the weights (at least
    one) for the subnetwork, no data size (two batches)."""
    X, y = data(device)
    la = Laplace(mlp(device), "classification", "all", "full")
    pb = memory.problem_of(la, X[:1].clone(), B)
    st = Settings(rank=20, subnet_size=6, n_subset=B)
    rows = memory.memory_plan(
        DefaultKeys(device), "classification", {"input_ids": X[:B]}, verbose=False
    )
    for r in rows:
        assert r["fit"] == memory.estimate("fit", r["subset"], r["structure"], pb, st)
    loader = DataLoader(
        [{"input_ids": X[i], "labels": y[i]} for i in range(N)], batch_size=B
    )
    by_loader = memory.memory_plan(
        DefaultKeys(device), "classification", loader, verbose=False
    )
    assert [r["fit"] for r in by_loader] == [r["fit"] for r in rows]
    # one batch of data: no previous batch's curvature is held
    one = memory.memory_plan(
        mlp(device), "classification", X[:B], n_data=B, verbose=False
    )
    pb1 = replace(pb, n_data=B)
    assert one[0]["fit"] == memory.estimate("fit", "all", "full", pb1, st)
    assert one[0]["fit"] != rows[0]["fit"]
    tiny = nn.Linear(1, 1).double().to(device)  # 2 weights: a subnetwork of 1
    rows = memory.memory_plan(
        tiny,
        "regression",
        torch.ones(3, 1, dtype=torch.float64, device=device),
        verbose=False,
    )
    sub = [r for r in rows if r["subset"] == "subnetwork"][0]
    assert sub["fit"].terms[0].detail == "(1 x 1, float64)"
    wide = nn.Linear(10, 10).double().to(device)  # 110 weights: 11
    rows = memory.memory_plan(
        wide,
        "regression",
        torch.ones(3, 10, dtype=torch.float64, device=device),
        verbose=False,
    )
    sub = [r for r in rows if r["subset"] == "subnetwork"][0]
    assert sub["fit"].terms[0].detail == "(11 x 11, float64)"


def test_memory_plan_uses_the_backend_and_its_keywords(device):
    from laplace.curvature.native import NativeEF, NativeGGN

    X, _ = data(device)
    for backend, kwargs, K in (
        (NativeEF, None, 1),
        (NativeGGN, {"stochastic": True, "num_samples": 5}, 5),
    ):
        rows = memory.memory_plan(
            mlp(device), "classification", X[:B], backend=backend,
            backend_kwargs=kwargs, verbose=False,
        )  # fmt: skip
        la = Laplace(
            mlp(device), "classification", "all", "full", backend=backend,
            backend_kwargs=kwargs,
        )  # fmt: skip
        pb = memory.problem_of(la, X[:1].clone(), B)
        assert pb.columns == K
        st = Settings(subnet_size=6, n_subset=B)
        assert rows[0]["fit"] == memory.estimate("fit", "all", "full", pb, st)
