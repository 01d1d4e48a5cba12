"""The ``kvmmem`` Typer application and what its commands share: the root
options (``--version``), ``kvmmem version``, the one-line error and exit status 2
(:func:`_fail`, :class:`_OneLineUsage`) and the checks of the options several
commands take (``--arch``, ``--variant``, ``--plot``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from kvmmem import __version__

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's help: paragraphs rewrapped, no <bool> after flags
    help="kvmmem: an executable model of how Linux KVM maps guest memory onto host memory.",
)

SHOWS = ("stage2", "maps", "stats", "events")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"kvmmem: error: {message}", err=True)
    raise typer.Exit(code)


PLOT_FORMATS = (".png", ".svg", ".pdf")


def _check_plot(plot: Path) -> None:
    """``--plot PATH`` names an image file matplotlib writes (one line and exit 2 if not)."""
    if plot.is_dir():
        _fail(f"--plot {plot}: is a directory; give a file name ending in .png")
    if plot.suffix.lower() not in PLOT_FORMATS:
        what = f"{plot.suffix!r} is not an image format" if plot.suffix else "no file suffix"
        _fail(f"--plot {plot}: {what} (give a file name ending in "
              f"{', '.join(PLOT_FORMATS)})")


def _dumps(obj: Any) -> str:
    """One line of JSON, with the exact hex twins of 64-bit values (report.jsonout)."""
    from kvmmem.report.jsonout import dumps

    return dumps(obj)


def _applicable(scenario: Any, arches: list[str], explicit: bool, command: str) -> list[str]:
    """The architectures of ``arches`` the scenario can run on.  One the user named
    that cannot is bad input (exit 2); one the file names is skipped with a line on
    stderr saying why; none left is exit 2."""
    from kvmmem.scenario.runner import arch_unsupported

    left = []
    for a in arches:
        reason = arch_unsupported(scenario, a)
        if reason is None:
            left.append(a)
        elif explicit or len(arches) == 1:
            _fail(reason)
        else:
            typer.echo(f"kvmmem {command}: {a}: not applicable: {reason}", err=True)
    if not left:
        _fail(f"{scenario.source}: runs on none of {', '.join(arches)}")
    return left


def _split(value: str | None, known: tuple[str, ...] | None, what: str) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        _fail(f"--{what}: empty list")
    if known is not None:
        for item in items:
            if item not in known:
                _fail(f"--{what}: unknown {what} {item!r} (known: {', '.join(known)})")
    return items


def _variants(value: str | None) -> list[str] | None:
    """``--variant``: a comma list of variants (releases such as 6.1, upstream, linux-5.4,
    mutations, RELEASE+MUTATION); one line and exit 2 for one that is not."""
    from kvmmem.errors import InputError
    from kvmmem.variants import get_variant

    items = _split(value, None, "variant")
    for item in items or ():
        try:
            get_variant(item)
        except InputError as exc:
            _fail(f"--variant: {exc}")
    return items


def _variant_pairs(scenario: Any, arches: list[str], variants: list[str] | None,
                   explicit: bool, command: str) -> list[tuple[str, str | None]]:
    """The (architecture, variant) runs: an architecture that did not exist at a variant's
    release (riscv before v5.16) is bad input when the user named it (or it is the only
    one), else skipped with a line on stderr."""
    from kvmmem.variants import get_variant

    pairs: list[tuple[str, str | None]] = []
    for a in arches:
        each: list[str | None] = list(variants) if variants else [None]
        for v in each:
            why = get_variant(v or scenario.variant).arch_unsupported(a)
            if why is None:
                pairs.append((a, v))
            elif explicit or len(arches) == 1:
                _fail(why)
            else:
                typer.echo(f"kvmmem {command}: {a}: not applicable: {why}", err=True)
    if not pairs:
        _fail(f"{scenario.source}: runs on none of {', '.join(arches)}")
    return pairs


def _print_version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="print the kvmmem version and exit")] = False,
) -> None:
    """kvmmem: an executable model of how Linux KVM maps guest memory onto host memory."""


@app.command()
def version() -> None:
    """Print the kvmmem version."""
    typer.echo(__version__)


class _OneLineUsage(TyperCommand):
    """A command whose usage errors (unknown option, bad or missing value, extra
    argument) are one ``kvmmem: error:`` line and exit status 2, like :func:`_fail`."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except Exception as exc:
            # click's UsageError (typer vendors its own click; match it by shape)
            message = getattr(exc, "format_message", None)
            if getattr(exc, "exit_code", None) != 2 or not callable(message):
                raise
            typer.echo(f"kvmmem: error: {message()}", err=True)
            raise typer.Exit(2) from None
