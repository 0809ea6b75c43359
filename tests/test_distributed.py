"""Data-parallel fitting (``laplace.utils.distributed``): two gloo processes, each
fitting its shard of the data, hold the posterior of one process on all of it.

The scenarios (``distributed_scenarios.py``) run once in 2 processes spawned by the
module's fixture (one spawn for all of them: a process group costs seconds) and
once here, without a process group, on all the data: the reference. Everything
in float64, compared to 1e-10.
"""

from __future__ import annotations

import os
import subprocess
import sys

import distributed_scenarios as scenarios
import pytest
import torch

from laplace.utils import distributed
from laplace.utils.distributed import distributed_reduction

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORLD = 2
#: the devices of the ``device`` fixture (conftest.py), for the spawned ranks
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
#: how long the two processes may take for all the scenarios
TIMEOUT = 600

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not built in"
)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Every scenario's results on each of the 2 ranks."""
    out = tmp_path_factory.mktemp("distributed")
    init = f"file://{out}/rendezvous"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    script = os.path.join(HERE, "distributed_scenarios.py")
    procs = [
        subprocess.Popen(
            [sys.executable, script, "--rank", str(r), "--world", str(WORLD)]
            + ["--init", init, "--out", str(out), "--devices", ",".join(DEVICES)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(WORLD)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=TIMEOUT)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"the {WORLD} processes did not finish in {TIMEOUT} s")
    for r, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{log}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _result(ranks, rank, device, name) -> dict:
    result = ranks[rank][(str(device), name)]
    assert "crash" not in result, f"rank {rank}, {name}:\n{result['crash']}"
    return result


def _assert_same(got: dict, expected: dict, rtol: float = 1e-10) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if torch.is_tensor(value):
            torch.testing.assert_close(
                got[key], value, rtol=rtol, atol=rtol, msg=lambda m, k=key: f"{k}: {m}"
            )
        else:
            assert got[key] == value, key


NUMERIC = [
    name
    for name in scenarios.SCENARIOS
    if name not in scenarios.PER_RANK | scenarios.ERRORS
]


@pytest.mark.parametrize("name", NUMERIC)
def test_every_rank_holds_the_posterior_of_all_the_data(ranks, device, name):
    """Each structure, subset, backend and option reduced over 2 ranks equals
    one process on all the data (loss, number of data, curvature, evidence,
    predictive)."""
    expected = scenarios.SCENARIOS[name](0, 1, device)
    # Lanczos iterates on products summed in another order: round-off, amplified
    rtol = 1e-8 if "lowrank" in name else 1e-10
    for rank in range(WORLD):
        got = _result(ranks, rank, device, name)
        if name == "ddp":
            assert got.pop("unwrapped") == "Sequential"
            expected.pop("unwrapped", None)
        got = {k: v for k, v in got.items() if k != "warnings"}  # tests below
        expected.pop("warnings", None)
        _assert_same(got, expected, rtol)


def test_low_rank_factors_are_reduced_as_low_rank_factors(ranks, device):
    for rank in range(WORLD):
        assert _result(ranks, rank, device, "low-rank-factors")["low rank blocks"] == 1


def test_the_switch_gives_each_rank_its_own_posterior(ranks, device):
    """``distributed_reduction(False)``: rank r holds the posterior of its shard,
    which differs between the ranks."""
    results = [_result(ranks, r, device, "per-rank") for r in range(WORLD)]
    for rank in range(WORLD):
        _assert_same(results[rank], scenarios.per_rank(rank, WORLD, device))
    # each holds about half the curvature of all the data (laplace-torch's
    # posterior under torchrun: docs/differences.md)
    whole = scenarios.SCENARIOS["all-full-regression"](0, 1, device)["H"]
    errors = [(r["H"] - whole).norm() / whole.norm() for r in results]
    assert all(0.45 < e < 0.6 for e in errors), errors


def test_ranks_with_different_models_are_refused_naming_them(ranks, device):
    for rank in range(WORLD):
        result = _result(ranks, rank, device, "different-models")
        message = result["error"]
        assert "rank 0" in message and "rank 1" in message
        assert "weights=" in message and "different models" in message
        assert result["fitted"] is False


def test_a_failing_rank_stops_every_rank(ranks, device):
    own = _result(ranks, 1, device, "failing-rank")["error"]
    other = _result(ranks, 0, device, "failing-rank")["error"]
    assert own.startswith("RuntimeError: The loss of batch") and "not finite" in own
    assert other.startswith("RankError: fit failed on rank 1 of 2")
    assert "not finite" in other
    for rank in range(WORLD):
        assert _result(ranks, rank, device, "failing-rank")["fitted"] is False


def test_marglik_training_refuses_a_model_without_ddp(ranks, device):
    for rank in range(WORLD):
        message = _result(ranks, rank, device, "marglik-without-ddp")["error"]
        assert "wrap it in" in message.lower() and "DistributedDataParallel" in message
        assert "got a Sequential" in message


def test_valla_is_refused_under_a_process_group(ranks, device):
    for rank in range(WORLD):
        message = _result(ranks, rank, device, "valla-refused")["error"]
        assert message.startswith("VaLLA cannot fit over a process group of 2 ranks")


def test_a_loader_without_a_sampler_warns(ranks, device):
    for rank in range(WORLD):
        warning = _result(ranks, rank, device, "no-sampler")["warnings"]
        assert "no DistributedSampler" in warning and "2 times" in warning


def test_a_padding_sampler_warns(ranks, device):
    for rank in range(WORLD):
        warning = _result(ranks, rank, device, "padded")["warnings"]
        assert "pads 23 examples to 24" in warning


# -- without a process group -----------------------------------------------------
def test_without_a_process_group_nothing_is_reduced():
    assert distributed.reduction() is None


def test_the_switch_is_a_setter_and_a_context_manager():
    assert distributed._state["enabled"] is True
    with distributed_reduction(False):
        assert distributed._state["enabled"] is False
        with distributed_reduction(True, group="g"):
            assert distributed._state == {"enabled": True, "group": "g"}
        assert distributed._state == {"enabled": False, "group": None}
    assert distributed._state == {"enabled": True, "group": None}
    distributed_reduction(False)
    try:
        assert distributed._state["enabled"] is False
    finally:
        distributed_reduction(True)


def test_the_switch_refuses_what_is_not_a_bool():
    with pytest.raises(TypeError, match="enabled must be True or False; got int 1"):
        distributed_reduction(1)


def test_a_ddp_model_is_unwrapped():
    net = torch.nn.Linear(2, 2)
    wrapped = torch.nn.DataParallel(torch.nn.DataParallel(net))
    assert distributed.unwrap(wrapped) is net
    assert distributed.unwrap(net) is net
