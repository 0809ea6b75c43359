"""The harness's summary at the end of a pytest run (see test_compat.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402


def pytest_terminal_summary(terminalreporter):
    rows = compare.LAST.get("rows")
    if not rows:
        return
    tr = terminalreporter
    tr.section("laplace-torch compatibility")
    counts = compare.summary(rows)
    tr.write_line(", ".join(f"{k}: {v}" for k, v in counts.items()))
    failing = sorted({r.scenario for r in rows if r.failing})
    tr.write_line(f"{len(failing)} scenarios with differences")
    for name in failing:
        keys = [r.key for r in rows if r.scenario == name and r.failing]
        tr.write_line(
            f"  {name}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
        )
    if compare.LAST.get("report"):
        tr.write_line(f"report written to {compare.LAST['report']}")
