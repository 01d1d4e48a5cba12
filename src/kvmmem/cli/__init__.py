"""The ``kvmmem`` command line.

Exit status (SCENARIOS.md): 0 all held; 1 an expectation failed; 2 bad input
(the message says what and where); 3 an invariant was violated; 4 skipped.

The commands live in one module per group, each registering on :data:`app`
(:mod:`kvmmem.cli.common`): ``run`` and ``compare`` in :mod:`~kvmmem.cli.cmd_run`,
``conform`` in :mod:`~kvmmem.cli.cmd_conform`, ``explore`` in
:mod:`~kvmmem.cli.cmd_explore`, ``bench`` and ``schema`` in
:mod:`~kvmmem.cli.cmd_bench`, ``machine ...`` in :mod:`~kvmmem.cli.cmd_machine`.
"""

from __future__ import annotations

import sys

import typer

from kvmmem.errors import InputError, KernelError

# Each command module registers its commands on ``app`` when imported: this order
# is the order of the commands in ``kvmmem --help`` (kept out of import sorting).
# isort: off
from kvmmem.cli.common import PLOT_FORMATS, SHOWS, app, version
from kvmmem.cli.cmd_run import compare, run
from kvmmem.cli.cmd_conform import conform
from kvmmem.cli.cmd_explore import explore
from kvmmem.cli.cmd_bench import bench, schema
from kvmmem.cli.cmd_machine import (
    machine_app,
    machine_fetch,
    machine_list,
    machine_ping,
    machine_shell,
)
# isort: on

__all__ = [
    "PLOT_FORMATS",
    "SHOWS",
    "app",
    "bench",
    "compare",
    "conform",
    "explore",
    "machine_app",
    "machine_fetch",
    "machine_list",
    "machine_ping",
    "machine_shell",
    "main",
    "run",
    "schema",
    "version",
]


OPTIONAL_VALUE = {"--explain": "all"}
"""Options whose value may be left out (``run FILE --explain`` or ``--explain 3,4``),
with the value they then take.  The command-line parser wants a value for every
non-flag option, so :func:`optional_values` writes them as ``--explain=VALUE``."""


def optional_values(argv: list[str]) -> list[str]:
    """``argv`` with each option of :data:`OPTIONAL_VALUE` joined to its value: the next
    argument when it is a comma list of numbers, else the option's default value."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in OPTIONAL_VALUE:
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            if nxt and all(part.strip().isdigit() for part in nxt.split(",")):
                out.append(f"{arg}={nxt}")
                i += 2
                continue
            out.append(f"{arg}={OPTIONAL_VALUE[arg]}")
        elif arg == "--":
            out.extend(argv[i:])
            break
        else:
            out.append(arg)
        i += 1
    return out


def main() -> None:
    """Console entry point: kvmmem's own errors become one line and exit 2."""
    try:
        sys.argv[1:] = optional_values(sys.argv[1:])
        app()
    except (InputError, KernelError) as exc:
        typer.echo(f"kvmmem: error: {exc}", err=True)
        sys.exit(2)
