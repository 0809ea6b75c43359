"""Differential harness: this library and laplace-torch 0.3 on the same public calls.

Both libraries run ``scenarios.py`` (the one source of truth for the calls), each in
its own process: this checkout with this interpreter, laplace-torch with the one in
``.lt-venv`` (``make compat`` builds it; ``LT_PYTHON`` names another). Each writes
its results to files; the tests here load both and compare them with the tolerances
of ``compare.tolerance``. A difference fails its scenario's test unless it is listed
in ``compare.KNOWN`` (each entry pointing to docs/differences.md). Without
laplace-torch, or without ``COMPAT=1`` (which ``make compat`` sets), every test here
is skipped, so ``make test`` passes while differences remain.

``make compat`` also writes ``tests/compat/REPORT.md`` (``COMPAT_REPORT``) and prints
a summary. ``COMPAT_RESULTS=DIR`` keeps the two processes' results in ``DIR``.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
import compare  # noqa: E402
import scenarios  # noqa: E402

TIMEOUT = 1800  # seconds for each library's run of every scenario


def peer_python() -> str | None:
    python = os.environ.get("LT_PYTHON") or str(ROOT / ".lt-venv" / "bin" / "python")
    return python if os.path.exists(python) else None


def readme_blocks() -> list[str]:
    """The python code blocks of laplace-torch's README (its package METADATA), read
    at run time from the peer's environment; none without it."""
    python = peer_python()
    if python is None:
        return []
    venv = Path(python).parent.parent
    found = glob.glob(
        str(venv / "lib" / "python3*" / "site-packages" / "laplace_torch-*.dist-info")
        + "/METADATA"
    )
    if not found:
        return []
    text = Path(found[0]).read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


README = scenarios.readme_variants(readme_blocks())
SCENARIOS = scenarios.scenario_names()


def _run(python: str, out: Path, only: list[str], readme: Path, env: dict, cwd: Path):
    cmd = [python, str(HERE / "scenarios.py"), "--out", str(out), "--readme"]
    cmd += [str(readme), "--only", *only]
    return subprocess.Popen(
        cmd,
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _selected(session) -> list[str]:
    """The scenarios of the collected tests (so ``-k`` narrows the runs too)."""
    names = []
    for item in session.items:
        spec = getattr(item, "callspec", None)
        if spec is not None and "name" in spec.params:
            names.append(spec.params["name"])
    return names or ["*"]


@pytest.fixture(scope="session")
def results(request, tmp_path_factory):
    """Run every selected scenario with both libraries (concurrently) and compare."""
    if not os.environ.get("COMPAT"):
        pytest.skip(
            "the harness fails on every difference from laplace-torch, so it runs "
            "only on request: `make compat` (or COMPAT=1)"
        )
    python = peer_python()
    if python is None:
        pytest.skip(
            "laplace-torch 0.3 is absent (no .lt-venv/bin/python, no LT_PYTHON): "
            "`make compat` builds it and runs this harness"
        )
    base = Path(os.environ.get("COMPAT_RESULTS") or tmp_path_factory.mktemp("compat"))
    base.mkdir(parents=True, exist_ok=True)
    readme = base / "readme.json"
    readme.write_text(json.dumps(README))
    only = _selected(request.session)
    common = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    ours_env = dict(common, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))  # fmt: skip
    peer_env = {k: v for k, v in common.items() if k != "PYTHONPATH"}
    procs = {
        "ours": _run(sys.executable, base / "ours", only, readme, ours_env, ROOT),
        "peer": _run(python, base / "peer", only, readme, peer_env, base),
    }
    for side, proc in procs.items():
        output, _ = proc.communicate(timeout=TIMEOUT)
        if proc.returncode != 0:
            pytest.fail(f"{side}'s run failed:\n{output[-3000:]}")
    meta = {side: torch.load(base / side / "meta.pt") for side in procs}
    rows = []
    for name in [*SCENARIOS, *README]:
        file = name.replace("/", "__") + ".pt"
        if not (base / "ours" / file).exists():
            continue
        ours = torch.load(base / "ours" / file, weights_only=False)
        peer = torch.load(base / "peer" / file, weights_only=False)
        rows += compare.compare_scenario(name, ours, peer)
    compare.LAST.update(rows=rows, meta=meta)
    report = os.environ.get("COMPAT_REPORT")
    if report:
        described = (
            f"torch {meta['ours']['torch']} in both; this library "
            f"{meta['ours']['laplace_version']}, laplace-torch from `"
            f"{os.path.relpath(meta['peer']['laplace_file'], ROOT)}`."
        )
        compare.write_report(report, rows, described, "make compat")
        compare.LAST["report"] = report
    return meta, rows


def test_same_torch_same_weights(results):
    """Both processes run the same torch, import the intended library and build the
    same model weights from the same seed."""
    meta, _ = results
    assert meta["ours"]["torch"] == meta["peer"]["torch"]
    assert Path(meta["ours"]["laplace_file"]) == ROOT / "laplace" / "__init__.py"
    assert not Path(meta["peer"]["laplace_file"]).is_relative_to(ROOT / "laplace")
    assert torch.equal(
        meta["ours"]["first_model_params"], meta["peer"]["first_model_params"]
    )


def _check(results, name: str):
    _, rows = results
    mine = [r for r in rows if r.scenario == name]
    assert mine, f"no results for {name}"
    if mine[0].status == "skipped":
        pytest.skip(f"{name}: {mine[0].detail}")
    failing = [r for r in mine if r.failing]
    if failing:
        pytest.fail(
            f"{len(failing)} of {len(mine)} quantities differ from laplace-torch:\n"
            + "\n".join(f"  {r.key}: {r.status}: {r.detail}" for r in failing),
            pytrace=False,
        )


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario(results, name):
    _check(results, name)


@pytest.mark.parametrize("name", list(README) or ["readme/absent"])
def test_readme_block(results, name):
    """laplace-torch's README usage runs on this library as on laplace-torch."""
    if name == "readme/absent":
        pytest.skip("laplace-torch's README (its METADATA) was not found")
    _check(results, name)
