"""``kvmmem bench`` (the model and this host's /dev/kvm measured side by side)
and ``kvmmem schema`` (the JSON Schema of scenario files).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from kvmmem.cli.common import _fail, _OneLineUsage, app


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
