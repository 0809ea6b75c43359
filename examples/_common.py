"""What the examples share besides the calibration metrics: their common command-line
options and the number of torch threads they run with.

The examples import this module as ``from _common import ...`` after putting their
own folder on ``sys.path`` (the leading underscore says it is no example).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def add_common_arguments(parser: argparse.ArgumentParser, default_out: Path) -> None:
    """Add ``--threads``, ``--seed`` and ``--out`` (the path of the PNG figure)."""
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (tiny model: 1 is best)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=default_out, help="PNG path")


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads, then restore the previous number.

    The networks of the examples are tiny: more threads only add overhead, and
    contention on a busy machine.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
