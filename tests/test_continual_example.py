"""The continual-learning example runs end to end, in a reduced size, and shows what
it claims: fine-tuning forgets the first tasks, a Laplace prior keeps them."""

from __future__ import annotations

import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, argv: list[str], out: Path, capsys):
    """As ``tests/test_examples.py``'s: run ``main`` of ``examples/NAME`` on ``argv``
    and ``--out OUT``, check the PNG file and its printed path; returns the
    example's namespace, what ``main`` returned and what it printed."""
    example = runpy.run_path(str(EXAMPLES / name))
    result = example["main"]([*argv, "--out", str(out)])
    printed = capsys.readouterr().out
    assert out.read_bytes().startswith(b"\x89PNG")
    assert f" written to {out}\n" in printed
    return example, result, printed


FINE_TUNING = "fine-tuning (no prior)"
DENSE = "Laplace, streaming dense GGN"
LAPLACE = [DENSE, "Laplace API, Full", "Laplace API, Kron", "Laplace API, Diag"]


def test_continual_example(tmp_path, capsys):
    out = tmp_path / "continual.png"
    argv = ["--n-train", "100", "--n-test", "300", "--epochs", "60"]
    argv += ["--structures", "full", "kron", "diag", "--seed", "0"]
    _, results, printed = run_example("continual_example.py", argv, out, capsys)

    assert "accuracy on each task after the last (task 5)" in printed
    assert "average accuracy over the tasks seen, after each task" in printed
    assert list(results) == [FINE_TUNING, *LAPLACE]
    for r in results.values():
        history = r["accuracy"]
        # after task t, the accuracy on each of the tasks 1..t
        assert [len(row) for row in history] == [1, 2, 3, 4, 5]
        assert all(0.0 <= a <= 1.0 for row in history for a in row)
        # every method learns the current task
        assert all(row[-1] > 0.95 for row in history)
        assert r["seen"] == [sum(row) / len(row) for row in history]
        assert r["earlier"] == sum(history[-1][:-1]) / 4
    # task 1 is the same for all: the isotropic prior
    assert len({r["accuracy"][0][0] for r in results.values()}) == 1

    tuned = results[FINE_TUNING]
    assert tuned["accuracy"][-1][0] < 0.2  # fine-tuning forgot task 1
    assert tuned["earlier"] < 0.8
    for name in LAPLACE:
        r = results[name]
        assert r["accuracy"][-1][0] > tuned["accuracy"][-1][0] + 0.3, name
        assert r["earlier"] > tuned["earlier"] + 0.15, name
        assert r["seen"][-1] > tuned["seen"][-1] + 0.1, name
    # the dense GGN through either API: the same prior, the same batches
    full = results["Laplace API, Full"]
    assert abs(full["earlier"] - results[DENSE]["earlier"]) < 0.02
