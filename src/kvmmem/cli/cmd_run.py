"""``kvmmem run`` and ``kvmmem compare``: a sequential scenario on the model, on
one or several architectures and variants.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from kvmmem.cli.common import (
    SHOWS,
    _applicable,
    _check_plot,
    _dumps,
    _fail,
    _split,
    _variant_pairs,
    _variants,
    app,
)


@app.command()
def run(
    file: Annotated[Path, typer.Argument(help="scenario file (YAML, format v1)")],
    arch: Annotated[str | None, typer.Option(help="x86, arm64 or riscv (default: the file's)")]
    = None,
    variant: Annotated[str | None, typer.Option(
        help="variants, comma list: releases 5.4..7.3 (6.1), upstream, linux-5.4, "
             "mutations, RELEASE+MUTATION; e.g. 5.10,6.1,upstream (default: the file's)")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the JSON outcome")] = False,
    show: Annotated[str | None, typer.Option(
        help="also show: stage2, maps, stats, events (comma list)")] = None,
    trace: Annotated[Path | None, typer.Option(
        help="write the event log as Chrome trace-event JSON (open it in Perfetto)")] = None,
    plot: Annotated[Path | None, typer.Option(
        help="draw the final guest physical map (slots, backings, stage-2 sizes) to a PNG")]
    = None,
    explain: Annotated[str | None, typer.Option(
        metavar="[STEPS]",
        help="show the kernel functions each step went through, the facts each decided "
             "on and the one that decided the outcome (with --json: an explain object per "
             "step); STEPS: step numbers, comma list (default: every step and top-level "
             "memslot)")] = None,
) -> None:
    """Run a scenario on the model, step by step, checking every invariant.

    With several architectures (or variants), each runs in turn; an architecture
    the file names that cannot run the scenario (an x86-only step) is skipped
    with a line on stderr saying why.

    Exit status: 0 all held; 1 an expectation failed; 2 bad input (one line);
    3 an invariant was violated."""
    from kvmmem.kvm.vm import ARCHES
    from kvmmem.report.explain import explain_text, run_explained
    from kvmmem.report.text import print_run
    from kvmmem.report.trace import events_text, run_traced, write_chrome_trace
    from kvmmem.scenario.loader import load_scenario
    from kvmmem.scenario.runner import run_scenario

    arches = _split(arch, ARCHES, "arch")
    variants = _variants(variant)
    shows = _split(show, SHOWS, "show") or []
    if plot is not None:
        _check_plot(plot)
    scenario = load_scenario(file)
    if scenario.steps is None:
        _fail(f"{file}: this scenario has threads; run it with `kvmmem explore`")
    explained = _explain_steps(explain, len(scenario.steps or ()))
    runs = _applicable(scenario, arches or list(scenario.arches), arches is not None, "run")
    status = 0
    # Piped output is not cut at 80 columns (hex values are wide).
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    results = []
    for a, v in _variant_pairs(scenario, runs, variants, arches is not None, "run"):
        if explain is not None:
            result = run_explained(scenario, a, v, explained, events=trace is not None
                                   or "events" in shows)
        elif trace is not None or "events" in shows:
            result = run_traced(scenario, a, v)
        else:
            result = run_scenario(scenario, a, v)
        results.append(result)
        if as_json:
            typer.echo(_dumps(result.to_json()))
        else:
            print_run(console, result, [s for s in shows if s != "events"])
            for outcomes, trees, setup in ((result.setup, result.setup_explanations, True),
                                           (result.steps, result.explanations, False)):
                for outcome in outcomes:
                    tree = trees.get(outcome["step"])
                    if tree is not None:
                        console.print(explain_text(outcome, tree, setup), highlight=False,
                                      markup=False, soft_wrap=True)
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


def _explain_steps(value: str | None, nsteps: int) -> frozenset[int] | None:
    """``--explain``'s steps: None for every step (or no --explain); else the step
    numbers given, each checked against the file's ``nsteps`` steps."""
    if value is None or value == "all":
        return None
    out = set()
    for part in value.split(","):
        part = part.strip()
        if not part.isdigit():
            _fail(f"--explain: {part!r} is not a step number (0 .. {nsteps - 1})")
        if int(part) >= nsteps:
            _fail(f"--explain: the scenario has steps 0 .. {nsteps - 1}, not {part}")
        out.add(int(part))
    return frozenset(out)


@app.command()
def compare(
    file: Annotated[Path, typer.Argument(help="scenario file (YAML, format v1)")],
    arch: Annotated[str | None, typer.Option(
        help="architectures, comma list (default: the file's)")] = None,
    variant: Annotated[str | None, typer.Option(
        help="variants, comma list: releases 5.4..7.3 (6.1), upstream, linux-5.4, "
             "mutations, RELEASE+MUTATION; e.g. 5.10,6.1,upstream (default: the file's)")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the comparison as JSON")]
    = False,
    explain: Annotated[str | None, typer.Option(
        metavar="",
        help="for each step whose outcome differs, where the runs' kernel paths part and "
             "the function that decided each (kvmmem run --explain); in --json: "
             "divergences")] = None,
) -> None:
    """Run one scenario on several architectures and variants; one table, a
    column per run, cells differing from the first column marked.

    Exit status: 3 if any run violated an invariant; 1 if a run the file
    claims (one of its architectures, its variant) failed an expectation;
    else 0 (differences alone are what compare is for)."""
    from kvmmem.kvm.vm import ARCHES
    from kvmmem.report.compare import (
        compare_runs,
        comparison_table,
        divergences,
        divergences_text,
    )
    from kvmmem.scenario.loader import load_scenario

    arches = _split(arch, ARCHES, "arch")
    variants = _variants(variant)
    scenario = load_scenario(file)
    if scenario.steps is None:
        _fail(f"{file}: this scenario has threads; run it with `kvmmem explore`")
    cmp = compare_runs(scenario, arches or list(scenario.arches),
                       variants or [scenario.variant], explain=explain is not None)
    if not any(c.applicable for c in cmp.columns):
        _fail(str(cmp.columns[0].reason))
    if as_json:
        typer.echo(_dumps(cmp.to_json()))
    else:
        # Piped output is not cut at 80 columns: a comparison is wide.
        width = None if sys.stdout.isatty() else 240
        out = Console(highlight=False, width=width)
        out.print(comparison_table(cmp))
        if explain is not None:
            out.print(divergences_text(divergences(cmp)), highlight=False, markup=False,
                      soft_wrap=True)
    raise typer.Exit(cmp.exit_status)
