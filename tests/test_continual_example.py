"""The continual-learning example runs end to end, in a reduced size, and shows what
it claims: fine-tuning forgets the first tasks, a Laplace prior keeps them."""

from __future__ import annotations

from tests.test_examples import run_example

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
