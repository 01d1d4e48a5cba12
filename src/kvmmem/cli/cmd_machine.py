"""``kvmmem machine``: emulated machines with real KVM (:mod:`kvmmem.machine`):
list, fetch, shell, ping.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.console import Console

from kvmmem.cli.common import _fail, _OneLineUsage, app

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
