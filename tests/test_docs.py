"""The documentation: its API reference covers every public name, and the code of the
getting-started page runs as written. (``make test`` also builds the site strictly.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import laplace
import laplace.curvature
import laplace.streaming
import laplace.utils

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _documented() -> set[str]:
    """Every dotted name an API page renders: ``::: name`` directives, and the
    ``members`` they list."""
    names = set()
    for page in (DOCS / "api").glob("*.md"):
        text = page.read_text()
        for block in re.finditer(r"^::: (\S+)((?:\n    .*)*)", text, re.M):
            module, options = block[1], block[2]
            names.add(module)
            members = re.search(r"members: \[(.*)\]", options)
            if members:
                names.update(f"{module}.{m.strip()}" for m in members[1].split(","))
    return names


@pytest.mark.parametrize(
    "module",
    [laplace, laplace.utils, laplace.curvature, laplace.streaming],
    ids=lambda m: m.__name__,
)
def test_api_reference_covers_every_public_name(module):
    documented = _documented()
    missing = []
    for name in module.__all__:
        obj = getattr(module, name)
        home = getattr(obj, "__module__", module.__name__)
        candidates = {f"{module.__name__}.{name}", f"{home}.{name}"}
        # a name re-exported by several packages counts once, wherever documented
        candidates |= {f"{m.__name__}.{name}" for m in (laplace, laplace.utils)}
        if not candidates & documented:
            missing.append(name)
    assert not missing, f"not in docs/api/*.md: {missing}"


def test_every_api_directive_names_something_that_exists():
    import importlib

    broken = []
    for name in _documented():
        parts = name.split(".")
        # the longest prefix that is a module (a missing one is ModuleNotFoundError
        # for exactly that name); every other ImportError is a broken directive
        for i in range(len(parts), 0, -1):
            module = ".".join(parts[:i])
            try:
                obj = importlib.import_module(module)
            except ModuleNotFoundError as error:
                if error.name is not None and module.startswith(error.name):
                    continue
                broken.append(f"{name}: {error!r}")
                break
            except ImportError as error:
                broken.append(f"{name}: {error!r}")
                break
            try:
                for attr in parts[i:]:
                    obj = getattr(obj, attr)
            except AttributeError as error:
                broken.append(f"{name}: {error!r}")
            break
        else:
            broken.append(f"{name}: no importable module")
    assert not broken, broken


def test_getting_started_runs_as_written(capsys):
    text = (DOCS / "getting-started.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 5
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/getting-started.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "torch.Size([8, 2])" in printed
    la = namespace["la2"]
    assert la.sigma_noise.item() < 0.3  # tuned towards the data's noise, 0.1


def test_transformers_page_runs_as_written(capsys):
    """The GPT-2 code of "Laplace on transformers" runs as printed."""
    pytest.importorskip("transformers")
    text = (DOCS / "guide" / "transformers.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/guide/transformers.md", "exec"), namespace)
    la = namespace["la"]
    assert la.fitted and torch.isfinite(la.log_marginal_likelihood())
    assert namespace["la_reduce"].fitted


def test_likelihoods_page_runs_as_written():
    """Every example of "Likelihoods", the user's likelihood of 20 lines included,
    runs as printed (issue 17)."""
    text = (DOCS / "guide" / "likelihoods.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 7
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/guide/likelihoods.md", "exec"), namespace)
    class_block = next(b for b in blocks if "class SoftplusPoisson" in b)
    lines = class_block.split("\n\n\nla = ")[0].strip().splitlines()
    assert len(lines) <= 20, len(lines)
    rates = namespace["rates"]
    assert rates.shape == (5, 2) and bool((rates > 0).all())
    la = namespace["la"]
    assert la.fitted and la.likelihood.name == "softplus_poisson"
    assert torch.isfinite(la.log_marginal_likelihood())


def test_every_image_the_pages_show_exists():
    """mkdocs does not check image links; the gallery's figures are committed by
    ``make gallery``."""
    shown = []
    for page in DOCS.rglob("*.md"):
        for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", page.read_text()):
            shown.append(target)
            assert (page.parent / target).is_file(), f"{page.name}: {target}"
    assert len(shown) >= 8  # one figure per example
