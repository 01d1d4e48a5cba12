"""The ``kvmmem`` command line.

Exit status (SCENARIOS.md): 0 all held; 1 an expectation failed; 2 bad input
(the message says what and where); 3 an invariant was violated; 4 skipped.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperCommand

from kvmmem import __version__
from kvmmem.errors import InputError, KernelError

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
) -> None:
    """Run a scenario on the model, step by step, checking every invariant.

    With several architectures (or variants), each runs in turn; an architecture
    the file names that cannot run the scenario (an x86-only step) is skipped
    with a line on stderr saying why.

    Exit status: 0 all held; 1 an expectation failed; 2 bad input (one line);
    3 an invariant was violated."""
    from kvmmem.kvm.vm import ARCHES
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
    runs = _applicable(scenario, arches or list(scenario.arches), arches is not None, "run")
    status = 0
    # Piped output is not cut at 80 columns (hex values are wide).
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    results = []
    for a, v in _variant_pairs(scenario, runs, variants, arches is not None, "run"):
        if trace is not None or "events" in shows:
            result = run_traced(scenario, a, v)
        else:
            result = run_scenario(scenario, a, v)
        results.append(result)
        if as_json:
            typer.echo(_dumps(result.to_json()))
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
        help="variants, comma list: releases 5.4..7.3 (6.1), upstream, linux-5.4, "
             "mutations, RELEASE+MUTATION; e.g. 5.10,6.1,upstream (default: the file's)")]
    = None,
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

    arches = _split(arch, ARCHES, "arch")
    variants = _variants(variant)
    scenario = load_scenario(file)
    if scenario.steps is None:
        _fail(f"{file}: this scenario has threads; run it with `kvmmem explore`")
    cmp = compare_runs(scenario, arches or list(scenario.arches),
                       variants or [scenario.variant])
    if not any(c.applicable for c in cmp.columns):
        _fail(str(cmp.columns[0].reason))
    if as_json:
        typer.echo(_dumps(cmp.to_json()))
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
             "emulated (KVM's instruction emulator; this host only)")] = "native",
    arch: Annotated[str | None, typer.Option(
        help="the real KVM's architecture: x86 (this host, or an x86 machine), arm64, "
             "riscv (a machine: give --kernel)")] = None,
    kernel: Annotated[str | None, typer.Option(
        help="run on the machine ARCH-KERNEL (kvmmem machine list) instead of this "
             "host's /dev/kvm")] = None,
    matrix: Annotated[bool, typer.Option(
        "--matrix", help="run the files on every fetched machine; one table of "
                         "scenario x machine")] = False,
) -> None:
    """Run each scenario on the model and on a real KVM and compare the outcomes step
    by step: a TAP report (or --json) with a verdict per scenario.  The real KVM is
    this host's /dev/kvm, or with --kernel a machine (a Debian kernel under QEMU,
    fetched with kvmmem machine fetch); --matrix runs every fetched machine.

    A file that cannot be read or is not a valid scenario is reported as an
    error (TAP: not ok, with the one-line message) and the others still run.

    Exit status: 0 all agree (unsupported ones skipped); 1 a difference; 2 bad
    input; 3 the model violated an invariant; 4 skipped (no usable /dev/kvm or
    machine, or nothing it can run)."""
    from kvmmem import conform as cf
    from kvmmem.kvm.vm import ARCHES
    from kvmmem.scenario.loader import load_scenario

    if path not in cf.PATHS:
        _fail(f"--path: unknown path {path!r} (known: {', '.join(cf.PATHS)})")
    if arch is not None and arch not in ARCHES:
        _fail(f"--arch: unknown arch {arch!r} (known: {', '.join(ARCHES)})")
    if matrix and (arch is not None or kernel is not None):
        _fail("--matrix runs every fetched machine: give neither --arch nor --kernel")
    if kernel is None and not matrix and arch not in (None, cf.HOST_ARCH):
        _fail(f"--arch {arch}: this host's KVM is {cf.HOST_ARCH}; give --kernel VERSION to "
              f"run on an {arch} machine (kvmmem machine list)")
    scenarios: list[Any] = []
    for f in files:
        try:
            scenarios.append(load_scenario(f))
        except InputError as exc:
            scenarios.append(_BadFile(str(f), str(exc)))
    if matrix:
        _conform_matrix(scenarios, as_json, path)
    if kernel is not None:
        results = _conform_machine(scenarios, arch or cf.HOST_ARCH, kernel, as_json, path)
    else:
        results = _conform_host(scenarios, as_json, path)
    compared = [r for r in results if not isinstance(r, _BadFile)]
    errors = len(results) - len(compared)
    if as_json:
        typer.echo(_dumps({"results": [r.to_json() for r in results]}))
    else:
        totals = cf.tap_totals(compared)
        typer.echo(totals.replace(" error:0", f" error:{errors}") if errors else totals)
    status = cf.exit_status(compared)
    raise typer.Exit(max(0 if status == 4 else status, 2) if errors else status)


class _BadFile:
    """A file given to conform that is not a scenario: its name and the one-line
    message; reported as an error (TAP ``not ok``, JSON verdict ``error``)."""

    def __init__(self, source: str, message: str) -> None:
        self.source = source
        self.message = message

    def tap(self, number: int) -> list[str]:
        return [f"not ok {number} - {self.source}", f"# error: {self.message}"]

    def to_json(self) -> dict[str, Any]:
        return {"scenario": self.source, "verdict": "error", "steps": [],
                "reason": self.message, "source": self.source}


def _conform_each(scenarios: list[Any], target: Any, as_json: bool, path: str) -> list[Any]:
    """Conform every scenario on ``target``, printing TAP lines as they come."""
    from kvmmem import conform as cf

    results: list[Any] = []
    if not as_json:
        for line in cf.tap_header(len(scenarios)):
            typer.echo(line)
        if target.name != "host":
            typer.echo(f"# machine {target.name}: Linux {target.release}")
    for number, scenario in enumerate(scenarios, 1):
        if isinstance(scenario, _BadFile):
            results.append(scenario)
            if not as_json:
                for line in scenario.tap(number):
                    typer.echo(line)
            continue
        try:
            result = cf.conform_scenario(scenario, path, target=target)
        except InputError as exc:
            _fail(str(exc))
        results.append(result)
        if not as_json:
            for line in cf.tap_result(number, result):
                typer.echo(line)
    return results


def _conform_host(scenarios: list[Any], as_json: bool, path: str) -> list[Any]:
    from kvmmem import conform as cf
    from kvmmem.realkvm import EXIT_UNAVAILABLE, Kvm, probe_kvm

    reason = probe_kvm()
    if reason is not None:
        typer.echo(f"kvmmem conform: skipped: no usable /dev/kvm: {reason}")
        raise typer.Exit(EXIT_UNAVAILABLE)
    with Kvm() as kvm:
        return _conform_each(scenarios, cf.HostTarget(kvm), as_json, path)


@contextmanager
def _booted(arch: str, version: str) -> Iterator[Any]:
    """The machine ARCH-VERSION, booted (one line on stderr while it boots, on a
    terminal); exit 4 when it is not fetched or QEMU is missing, 2 for an unknown one."""
    from kvmmem.machine import Machine, MachineError, MachineUnavailable, UnknownMachine

    try:
        if sys.stderr.isatty():
            typer.echo(f"booting {arch}-{version} ...", err=True)
        with Machine(arch, version) as machine:
            yield machine
    except UnknownMachine as exc:
        _fail(str(exc))
    except MachineUnavailable as exc:
        typer.echo(f"kvmmem: skipped: {exc}", err=True)
        raise typer.Exit(4) from None
    except MachineError as exc:
        _fail(str(exc))


def _conform_machine(scenarios: list[Any], arch: str, version: str, as_json: bool,
                     path: str) -> list[Any]:
    from kvmmem import conform as cf

    with _booted(arch, version) as machine:
        return _conform_each(scenarios, cf.MachineTarget(machine), as_json, path)


def _conform_matrix(scenarios: list[Any], as_json: bool, path: str) -> None:
    """Every fetched machine in turn; one table (or JSON object) at the end; exits."""
    from kvmmem import conform as cf
    from kvmmem.machine import fetched_machines

    bad = [s for s in scenarios if isinstance(s, _BadFile)]
    for b in bad:
        typer.echo(f"kvmmem: error: {b.message}", err=True)
    scenarios = [s for s in scenarios if not isinstance(s, _BadFile)]
    specs = fetched_machines()
    if not specs:
        typer.echo("kvmmem: skipped: no machine is fetched (kvmmem machine fetch ARCH VERSION)",
                   err=True)
        raise typer.Exit(4)
    from kvmmem.machine import Machine, MachineError

    columns: list[tuple[str, str, list[cf.Conformance]]] = []
    broken: list[str] = []
    for spec in specs:
        # One machine that fails (a guest that hangs, QEMU that dies) is reported
        # under the table; the others still run.
        try:
            if sys.stderr.isatty():
                typer.echo(f"booting {spec.name} ...", err=True)
            with Machine(spec.arch, spec.version) as machine:
                target = cf.MachineTarget(machine)
                results = []
                for scenario in scenarios:
                    try:
                        results.append(cf.conform_scenario(scenario, path, target=target))
                    except InputError as exc:
                        _fail(str(exc))
                columns.append((spec.name, machine.release, results))
        except MachineError as exc:
            broken.append(f"{spec.name}: {exc}")
    every = [r for _, _, rs in columns for r in rs]
    if as_json:
        typer.echo(_dumps({"matrix": [
            {"machine": name, "kernel": release, **cf.to_json(rs)}
            for name, release, rs in columns]}))
    else:
        table = cf.matrix_table(scenarios, columns)
        # Piped, the table keeps its natural width instead of rich's 80 columns.
        width = None if sys.stdout.isatty() else 40 + 14 * len(columns)
        Console(highlight=False, width=width).print(table)
    for line in broken:
        typer.echo(f"kvmmem: error: {line}", err=True)
    status = max(cf.exit_status(every), 1 if broken else 0)
    raise typer.Exit(max(0 if status == 4 else status, 2) if bad else status)


@app.command()
def explore(
    file: Annotated[Path, typer.Argument(help="scenario file with threads (YAML, format v1)")],
    arch: Annotated[str | None, typer.Option(
        help="architectures, comma list (default: the file's)")] = None,
    variant: Annotated[str | None, typer.Option(
        help="variants, comma list: releases 5.4..7.3 (6.1), upstream, linux-5.4, "
             "mutations, RELEASE+MUTATION (default: the file's)")] = None,
    strategy: Annotated[str, typer.Option(help="dfs, dpor, random or pct")] = "dpor",
    preemptions: Annotated[int | None, typer.Option(
        help="preemption bound (dfs, dpor; default none) or bug depth - 1 (pct; default 2)")]
    = None,
    max_executions: Annotated[int | None, typer.Option(
        help="execution budget (default 200000 for dfs/dpor, 1000 for random/pct)")] = None,
    seed: Annotated[int, typer.Option(help="seed of random and pct")] = 0,
    workers: Annotated[int, typer.Option(help="local worker processes")] = 1,
    dask: Annotated[str | None, typer.Option(
        help="run the search on the Dask cluster whose scheduler is at this address "
             "(pip install 'kvmmem[dask]')")] = None,
    replay: Annotated[str | None, typer.Option(
        help="replay a schedule: a token printed by explore, or its .replay file")] = None,
    replay_dir: Annotated[Path, typer.Option(
        help="where the replay token of a violation is written")] = Path("."),
    determinism: Annotated[int, typer.Option(
        help="first run N random schedules twice each and compare the state after "
             "every transition (prints what it compared on stderr)")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object per run")]
    = False,
) -> None:
    """Explore every interleaving of a scenario's threads at the kernel's
    synchronisation points, checking every invariant after every step.

    Verdicts: exhausted (every schedule explored, no violation), budget (the
    budget ran out first), violation (the failing execution is printed, one
    column per thread, with a replay token, also written to a file).  A step
    expectation that fails in some interleaving is reported the same way.

    Progress (on a terminal): executions done out of the schedules counted
    (dfs) or the budget.  Ctrl-C stops the search and prints what it explored,
    verdict interrupted.

    Exit status: 0 no violation; 1 an expectation failed; 2 bad input; 3 an
    invariant was violated; 130 interrupted."""
    from kvmmem.explore import (
        NondeterminismError,
        SearchParams,
        Token,
        check_determinism,
        read_token,
        write_token,
    )
    from kvmmem.explore import explore as run_explore
    from kvmmem.explore import replay as run_replay
    from kvmmem.explore.report import print_replay, print_result, replay_json
    from kvmmem.kvm.vm import ARCHES
    from kvmmem.scenario.loader import load_scenario

    arches = _split(arch, ARCHES, "arch")
    variants = _variants(variant)
    if workers < 1:
        _fail("--workers: must be >= 1")
    if determinism < 0:
        _fail("--determinism: must be >= 0")
    if dask is not None and workers != 1:
        _fail("--dask and --workers: give one of them")
    params = SearchParams(strategy=strategy, preemptions=preemptions,
                          max_executions=max_executions, seed=seed)
    params.check()
    token = read_token(replay) if replay is not None else None
    scenario = load_scenario(file)
    if scenario.threads is None:
        _fail(f"{file}: this scenario has steps, not threads; run it with `kvmmem run`")
    # Piped output is not cut at 80 columns: a trace has a column per thread.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
    if token is not None:
        if arches is not None or variants is not None:
            _fail("--replay: the token names its architecture and variant; "
                  "drop --arch and --variant")
        replayed = run_replay(scenario, token)
        if as_json:
            typer.echo(_dumps(replay_json(scenario.name, token, replayed)))
        else:
            print_replay(console, scenario.name, token, replayed)
        raise typer.Exit(replayed.exit_status)
    status = 0
    try:
        runs = _variant_pairs(scenario, arches or list(scenario.arches), variants,
                              arches is not None, "explore")
        for a, v0 in runs:
            v = v0 or scenario.variant
            if determinism:
                checked = check_determinism(scenario, a, v, samples=determinism, seed=seed)
                typer.echo(f"determinism: {scenario.name} {a} {v}: {checked.schedules} "
                           f"random schedules (seed {seed}) each run twice, the state "
                           f"fingerprint after every one of {checked.transitions} "
                           "transitions compared: identical", err=True)
            with _progress_bar(f"{scenario.name} {a} {v}") as progress:
                result = run_explore(scenario, a, v, params, workers=workers, dask=dask,
                                     progress=progress)
            if result.token is not None:
                try:
                    path = write_token(replay_dir, Token.decode(result.token))
                except OSError as err:
                    _fail(f"--replay-dir: cannot write the replay token: {err}")
                result.replay_file = str(path)
            if as_json:
                typer.echo(_dumps(result.to_json()))
            else:
                print_result(console, result, source=str(file))
            status = max(status, result.exit_status)
            if result.verdict == "interrupted":
                raise typer.Exit(result.exit_status)
    except NondeterminismError as err:
        _fail(f"the model is not deterministic: {err}", 3)
    raise typer.Exit(status)


@contextmanager
def _progress_bar(label: str) -> Iterator[Callable[[Any], None] | None]:
    """The progress of a search on stderr when it is a terminal (executions done
    and what they are out of: explore.report.progress_text); nothing when piped."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from kvmmem.explore.report import progress_text

    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                  TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(f"{label}: counting schedules", total=None)

        def update(p: Any) -> None:
            # dpor's budget is only a bound: the bar pulses
            bar.update(task, completed=p.executions,
                       total=None if p.kind == "bound" else p.total,
                       description=f"{label}: {progress_text(p)}")

        yield update


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


@app.command(cls=_OneLineUsage)
def bench(
    quick: Annotated[bool, typer.Option(
        "--quick", help="small sizes (1,000 pages, 200 repeats): a few seconds in all")]
    = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help='print {"model": {...}, "kvm": {...} or null}')] = False,
    no_kvm: Annotated[bool, typer.Option(
        "--no-kvm", help="measure the model only (kvm: null)")] = False,
    arch: Annotated[str, typer.Option(
        help="model architecture of the fault, MMIO and memslot measurements")] = "x86",
    pages: Annotated[int | None, typer.Option(
        help="4K pages per fault measurement (default 10000; 1000 with --quick)")] = None,
) -> None:
    """Take the same measurements on the model and on this host's /dev/kvm in one
    run and show them side by side: guest 4K faults (fresh, host page present),
    memslot create/delete with 32,000 slots, MMIO exit, stage-2 bytes per 4K page.

    Real KVM is null (and stderr says why in one line) when /dev/kvm is missing
    or unusable.  Exit status: 0; 1 a model measurement failed; 2 bad input."""
    from kvmmem.benchmarks.common import progress
    from kvmmem.benchmarks.suite import (
        KVM_TICKS,
        MODEL_TICKS,
        Sizes,
        bench_json,
        bench_table,
        measure_kvm,
        measure_model,
    )
    from kvmmem.kvm.vm import ARCHES

    if arch not in ARCHES:
        _fail(f"--arch: unknown architecture {arch!r} (known: {', '.join(ARCHES)})")
    if pages is not None and not 1 <= pages <= 100_000:
        _fail(f"--pages: must be 1..100000, got {pages}")
    sizes = Sizes.for_run(quick, pages)
    kvm: dict[str, float] | None = None
    why: str | None = "skipped (--no-kvm)" if no_kvm else None
    with progress("kvmmem bench", MODEL_TICKS + (0 if no_kvm else KVM_TICKS),
                  sys.stderr) as tick:
        try:
            model = measure_model(sizes, arch, tick)
        except RuntimeError as exc:
            _fail(f"model measurement failed: {exc}", 1)
        if not no_kvm:
            from kvmmem.realkvm import KvmUnavailable

            try:
                kvm = measure_kvm(sizes, tick)
            except KvmUnavailable as exc:
                why = f"skipped: no usable /dev/kvm: {exc}"
            except (OSError, RuntimeError) as exc:
                why = f"failed: {type(exc).__name__}: {exc}"
    if why is not None:
        typer.echo(f"kvmmem bench: real KVM {why}", err=True)
    if as_json:
        typer.echo(json.dumps(bench_json(model, kvm)))
    else:
        width = None if sys.stdout.isatty() else 200
        Console(highlight=False, width=width).print(
            bench_table(model, kvm, arch=arch, kvm_note=why))


@app.command(cls=_OneLineUsage)
def schema(
    output: Annotated[Path | None, typer.Option(
        help="write it to this file (docs/scenario.schema.json) instead of stdout")] = None,
) -> None:
    """Print the JSON Schema of scenario files (format v1), generated from the
    declarations the loader checks files with (kvmmem.scenario.schema); point an
    editor's YAML support at it for completion and checking."""
    from kvmmem.scenario.schema import json_schema_text

    text = json_schema_text()
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        output.write_text(text)
    except OSError as err:
        _fail(f"--output {output}: cannot write: {err.strerror}")


# -- kvmmem machine: emulated machines with real KVM (src/kvmmem/machine) ------------

machine_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Emulated machines (QEMU TCG) running real arm64, riscv and x86 KVM of Debian "
         "kernels: list, fetch, shell, ping.",
)
app.add_typer(machine_app, name="machine")


@contextmanager
def _machine_errors() -> Iterator[None]:
    """MachineError -> one line: exit 2, or ``kvmmem: skipped:`` and exit 4 when the
    machine cannot run on this host (not fetched, QEMU or a tool missing)."""
    from kvmmem.machine import MachineError, MachineUnavailable

    try:
        yield
    except MachineUnavailable as exc:
        typer.echo(f"kvmmem: skipped: {exc}", err=True)
        raise typer.Exit(exc.exit_status) from None
    except MachineError as exc:
        _fail(str(exc), exc.exit_status)


@machine_app.command("list", cls=_OneLineUsage)
def machine_list(
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per machine")]
    = False,
) -> None:
    """Every machine of the catalog: fetched or not, its kernel, cache path and size."""
    from kvmmem.machine import load_manifest, machine_dir, machines

    rows: list[dict[str, Any]] = []
    for spec in machines():
        manifest = load_manifest(spec)
        rows.append({
            "arch": spec.arch, "version": spec.version, "suite": spec.suite,
            "fetched": manifest is not None,
            "kernel_package": manifest.kernel_package if manifest else None,
            "kernel_release": manifest.kernel_release if manifest else None,
            "path": str(machine_dir(spec)),
            "size": manifest.size if manifest else None,
        })
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for col in ("arch", "version", "suite", "fetched", "kernel", "size", "path"):
        table.add_column(col, justify="right" if col == "size" else "left")
    for row in rows:
        size = row["size"]
        table.add_row(str(row["arch"]), str(row["version"]), str(row["suite"]),
                      "yes" if row["fetched"] else "no", str(row["kernel_package"] or "-"),
                      f"{size / 2**20:.0f} MiB" if isinstance(size, int) else "-",
                      str(row["path"]))
    width = None if sys.stdout.isatty() else 200
    Console(highlight=False, width=width).print(table)


def _machine_spec(arch: str, version: str) -> Any:
    from kvmmem.machine import UnknownMachine, get_machine

    try:
        return get_machine(arch, version)
    except UnknownMachine as exc:
        _fail(str(exc))


@machine_app.command("fetch", cls=_OneLineUsage)
def machine_fetch(
    arch: Annotated[str, typer.Argument(help="arm64, riscv, x86, or all")],
    version: Annotated[str | None, typer.Argument(
        help="kernel version (kvmmem machine list); omitted with all")] = None,
    force: Annotated[bool, typer.Option("--force", help="fetch again even if cached")]
    = False,
) -> None:
    """Download a machine's Debian kernel, busybox and Python (never installed) and
    build its initramfs in the cache ($KVMMEM_CACHE_DIR, else
    ~/.cache/kvmmem/machines).  `kvmmem machine fetch all` fetches every machine."""
    from kvmmem.machine import fetch, machines

    if arch == "all" and version is None:
        specs = machines()
    elif version is None:
        _fail("VERSION missing (or use: kvmmem machine fetch all)")
        return
    else:
        specs = [_machine_spec(arch, version)]
    with _machine_errors():
        for spec in specs:
            manifest = fetch(spec.arch, spec.version, force=force)
            typer.echo(f"{spec.name}: {manifest.kernel_release} ({manifest.kernel_package}), "
                       f"{manifest.size / 2**20:.0f} MiB")


@machine_app.command("shell", cls=_OneLineUsage)
def machine_shell(
    arch: Annotated[str, typer.Argument(help="arm64, riscv or x86")],
    version: Annotated[str, typer.Argument(help="kernel version (kvmmem machine list)")],
) -> None:
    """Boot a machine with its console on this terminal and a shell instead of the
    agent (the kvmmem package is at /mnt/kvmmem, on PYTHONPATH).  Leave with
    `poweroff -f` in the guest or Ctrl-A X."""
    from kvmmem.machine import Machine

    spec = _machine_spec(arch, version)
    with _machine_errors():
        status = Machine(spec.arch, spec.version).shell()
    raise typer.Exit(0 if status == 0 else 1)


@machine_app.command("ping", cls=_OneLineUsage)
def machine_ping(
    arch: Annotated[str, typer.Argument(help="arm64, riscv or x86")],
    version: Annotated[str, typer.Argument(help="kernel version (kvmmem machine list)")],
    timeout: Annotated[float, typer.Option(help="seconds to wait for the agent")] = 120.0,
    as_json: Annotated[bool, typer.Option("--json", help="print the timings as JSON")]
    = False,
) -> None:
    """Boot a machine, ping its agent, shut it down; print the kernel release and
    the timings (boot to agent ready, ping round trip, shutdown)."""
    import time

    from kvmmem.machine import Machine

    spec = _machine_spec(arch, version)
    with _machine_errors():
        if sys.stderr.isatty():
            typer.echo(f"booting {spec.name} ...", err=True)
        machine = Machine(spec.arch, spec.version, ready_timeout=timeout)
        with machine:
            ready = machine.ready or {}
            rtt = machine.ping()
            t0 = time.monotonic()
        closed = time.monotonic() - t0
    notes = [ln.strip() for ln in machine.console_output.splitlines()
             if ln.startswith("kvmmem:")]
    out = {"machine": spec.name, "release": ready.get("release"),
           "python": ready.get("python"), "kvm": ready.get("kvm"),
           "boot_to_ready_s": round(machine.boot_seconds or 0.0, 2),
           "ping_s": round(rtt, 4), "shutdown_s": round(closed, 2), "init": notes}
    if as_json:
        typer.echo(json.dumps(out))
    else:
        typer.echo(f"{spec.name}: {out['release']} ready in {out['boot_to_ready_s']} s, "
                   f"ping {out['ping_s'] * 1000:.1f} ms, shutdown {out['shutdown_s']} s; "
                   f"python {out['python']}; kvm: {out['kvm'] or 'usable'}")
        for note in notes:
            typer.echo(f"  console: {note}")


def main() -> None:
    """Console entry point: kvmmem's own errors become one line and exit 2."""
    try:
        app()
    except (InputError, KernelError) as exc:
        typer.echo(f"kvmmem: error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
