"""The examples run end to end."""

from __future__ import annotations

import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_curvature_example(capsys):
    runpy.run_path(str(EXAMPLES / "curvature_example.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "structure" in out and "CurvlinopsGGN" in out
