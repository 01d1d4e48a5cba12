"""What every benchmark module shares: the progress callback and its bar.

A measurement function takes ``tick``, called with a short label after each
piece of work; :func:`progress` turns that into a rich progress bar on one
stream (stdout for the ``bench/*.py`` scripts, stderr for ``kvmmem bench``),
shown only when that stream is a terminal and silent when it is piped.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

Tick = Callable[[str], None]
"""Called with a label after each piece of a measurement."""


def no_tick(_label: str) -> None:
    """A :data:`Tick` that shows nothing."""


@contextmanager
def progress(label: str, total: int, stream: TextIO | None = None) -> Iterator[Tick]:
    """A :data:`Tick` advancing a transient rich progress bar of ``total`` steps on
    ``stream`` (default stdout) when it is a terminal; :func:`no_tick` otherwise."""
    out = sys.stdout if stream is None else stream
    if not out.isatty():
        yield no_tick
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(file=out), transient=True) as bar:
        task = bar.add_task(label, total=total)

        def step(text: str) -> None:
            bar.update(task, advance=1, description=text)

        yield step
