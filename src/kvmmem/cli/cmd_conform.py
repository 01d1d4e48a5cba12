"""``kvmmem conform``: each scenario on the model and on a real KVM (this host's
/dev/kvm, one machine, or every fetched machine with ``--matrix``), compared
step by step.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from kvmmem.cli.common import _dumps, _fail, app
from kvmmem.errors import InputError


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
