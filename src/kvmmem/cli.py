"""The ``kvmmem`` command line.

Exit status (SCENARIOS.md): 0 all held; 1 an expectation failed; 2 bad input
(the message says what and where); 3 an invariant was violated; 4 skipped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from kvmmem import __version__
from kvmmem.errors import InputError, KernelError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="kvmmem: an executable model of how Linux KVM maps guest memory onto host memory.",
)

SHOWS = ("stage2", "maps", "stats", "events")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"kvmmem: error: {message}", err=True)
    raise typer.Exit(code)


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


@app.callback()
def _root() -> None:
    """kvmmem: an executable model of how Linux KVM maps guest memory onto host memory."""


@app.command()
def version() -> None:
    """Print the kvmmem version."""
    typer.echo(__version__)


@app.command()
def run(
    file: Annotated[Path, typer.Argument(help="scenario file (YAML, format v1)")],
    arch: Annotated[str | None, typer.Option(help="x86, arm64 or riscv (default: the file's)")]
    = None,
    variant: Annotated[str | None, typer.Option(help="behaviour set (default: the file's)")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the JSON outcome")] = False,
    show: Annotated[str | None, typer.Option(
        help="also show: stage2, maps, stats, events (comma list)")] = None,
    trace: Annotated[Path | None, typer.Option(
        help="write the event log as Chrome trace-event JSON (open it in Perfetto)")] = None,
    plot: Annotated[Path | None, typer.Option(
        help="draw the final guest physical map (slots, backings, stage-2 sizes) to a PNG")]
    = None,
) -> None:
    """Run a scenario on the model, step by step, checking every invariant."""
    from kvmmem.kvm.vm import ARCHES
    from kvmmem.report.text import print_run
    from kvmmem.report.trace import events_text, run_traced, write_chrome_trace
    from kvmmem.scenario.loader import load_scenario
    from kvmmem.scenario.runner import run_scenario
    from kvmmem.variants import get_variant

    arches = _split(arch, ARCHES, "arch")
    shows = _split(show, SHOWS, "show") or []
    if variant is not None:
        get_variant(variant)
    scenario = load_scenario(file)
    if scenario.steps is None:
        _fail(f"{file}: this scenario has threads; run it with `kvmmem explore`")
    status = 0
    console = Console(highlight=False)
    results = []
    for a in arches or list(scenario.arches):
        if trace is not None or "events" in shows:
            result = run_traced(scenario, a, variant)
        else:
            result = run_scenario(scenario, a, variant)
        results.append(result)
        if as_json:
            typer.echo(json.dumps(result.to_json()))
        else:
            print_run(console, result, [s for s in shows if s != "events"])
            if "events" in shows:
                console.print(events_text(result), highlight=False, markup=False,
                              soft_wrap=True)
        status = max(status, result.exit_status)  # 3 (violation) > 1 (expectation) > 0
    try:
        if trace is not None:
            write_chrome_trace(trace, scenario, results)
        if plot is not None:
            from kvmmem.report.plot import plot_guest_map

            plot_guest_map(results, plot)
    except OSError as err:
        _fail(f"cannot write {err.filename}: {err.strerror}")
    raise typer.Exit(status)


@app.command()
def compare(
    file: Annotated[Path, typer.Argument(help="scenario file (YAML, format v1)")],
    arch: Annotated[str | None, typer.Option(
        help="architectures, comma list (default: the file's)")] = None,
    variant: Annotated[str | None, typer.Option(
        help="variants, comma list, e.g. upstream,linux-5.4 (default: the file's)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the comparison as JSON")]
    = False,
) -> None:
    """Run one scenario on several architectures and variants; one table, a
    column per run, cells differing from the first column marked.

    Exit status: 3 if any run violated an invariant; 1 if a run the file
    claims (one of its architectures, its variant) failed an expectation;
    else 0 (differences alone are what compare is for)."""
    from kvmmem.kvm.vm import ARCHES
    from kvmmem.report.compare import compare_runs, comparison_table
    from kvmmem.scenario.loader import load_scenario
    from kvmmem.variants import VARIANTS

    arches = _split(arch, ARCHES, "arch")
    variants = _split(variant, tuple(VARIANTS), "variant")
    scenario = load_scenario(file)
    if scenario.steps is None:
        _fail(f"{file}: this scenario has threads; run it with `kvmmem explore`")
    cmp = compare_runs(scenario, arches or list(scenario.arches),
                       variants or [scenario.variant])
    if as_json:
        typer.echo(json.dumps(cmp.to_json()))
    else:
        # Piped output is not cut at 80 columns: a comparison is wide.
        width = None if sys.stdout.isatty() else 240
        Console(highlight=False, width=width).print(comparison_table(cmp))
    raise typer.Exit(cmp.exit_status)


@app.command()
def conform(
    files: Annotated[list[Path], typer.Argument(help="scenario files (YAML, format v1)")],
    as_json: Annotated[bool, typer.Option("--json", help="print the verdicts as JSON")]
    = False,
    path: Annotated[str, typer.Option(
        help="guest access path for steps naming none: native (KVM's fault path) or "
             "emulated (KVM's instruction emulator)")] = "native",
) -> None:
    """Run each scenario on the model and on this host's /dev/kvm and compare the
    outcomes step by step: a TAP report (or --json) with a verdict per scenario.

    Exit status: 0 all agree (unsupported ones skipped); 1 a difference; 2 bad
    input; 3 the model violated an invariant; 4 skipped (no usable /dev/kvm, or
    nothing this host can run)."""
    from kvmmem import conform as cf
    from kvmmem.realkvm import EXIT_UNAVAILABLE, Kvm, probe_kvm
    from kvmmem.scenario.loader import load_scenario

    if path not in cf.PATHS:
        _fail(f"--path: unknown path {path!r} (known: {', '.join(cf.PATHS)})")
    try:
        scenarios = [load_scenario(f) for f in files]
    except InputError as exc:
        _fail(str(exc))
    reason = probe_kvm()
    if reason is not None:
        typer.echo(f"kvmmem conform: skipped: no usable /dev/kvm: {reason}")
        raise typer.Exit(EXIT_UNAVAILABLE)
    results: list[cf.Conformance] = []
    if not as_json:
        for line in cf.tap_header(len(scenarios)):
            typer.echo(line)
    with Kvm() as kvm:
        for number, scenario in enumerate(scenarios, 1):
            try:
                result = cf.conform_scenario(scenario, path, kvm=kvm)
            except InputError as exc:
                _fail(str(exc))
            results.append(result)
            if not as_json:
                for line in cf.tap_result(number, result):
                    typer.echo(line)
    if as_json:
        typer.echo(json.dumps(cf.to_json(results)))
    else:
        typer.echo(cf.tap_totals(results))
    raise typer.Exit(cf.exit_status(results))


def main() -> None:
    """Console entry point: kvmmem's own errors become one line and exit 2."""
    try:
        app()
    except (InputError, KernelError) as exc:
        typer.echo(f"kvmmem: error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
