"""The ``kvmmem`` command line."""

from __future__ import annotations

import sys

import typer

from kvmmem import __version__
from kvmmem.errors import InputError, KernelError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="kvmmem: an executable model of how Linux KVM maps guest memory onto host memory.",
)


@app.callback()
def _root() -> None:
    """kvmmem: an executable model of how Linux KVM maps guest memory onto host memory."""


@app.command()
def version() -> None:
    """Print the kvmmem version."""
    typer.echo(__version__)


def main() -> None:
    """Console entry point: turns kvmmem's own errors into one line, exit 2."""
    try:
        app()
    except (InputError, KernelError) as exc:
        typer.echo(f"kvmmem: error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
