"""``kvmmem bench``: the same measurements on the model and on this host's real KVM.

:data:`MEASUREMENTS` names them (the names and units are stable: the JSON keys);
:func:`measure_model` and :func:`measure_kvm` take them, with the same sizes, in one
process; :func:`bench_json` and :func:`bench_table` present the two side by side.
``stage2_bytes_per_4k`` is measured on the model only; on real KVM it is what the
hardware holds, one 8-byte leaf per 4K page.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from rich.table import Table

from kvmmem.benchmarks import faults, memslots, stage2
from kvmmem.benchmarks.common import Tick, no_tick


@dataclass(frozen=True)
class Measurement:
    """One row of ``kvmmem bench``: JSON name, unit, what one sample is."""

    name: str
    unit: str
    what: str


MEASUREMENTS = (
    Measurement("fault_4k_fresh_us", "µs", "guest write fault, fresh anon page (host allocates)"),
    Measurement("fault_4k_present_us", "µs", "guest write fault, host page present"),
    Measurement("memslot_create_us", "µs", "create one slot, 32,000 present"),
    Measurement("memslot_delete_us", "µs", "delete one slot, 32,000 present"),
    Measurement("mmio_exit_us", "µs", "guest write to a gpa in no memslot: MMIO exit"),
    Measurement("stage2_bytes_per_4k", "B", "stage-2 memory per 4K page (model: worst arch)"),
)
NAMES = tuple(m.name for m in MEASUREMENTS)
PARAMETERS = ("fault_pages", "memslots_present")
"""Sizes reported next to the measurements, in both dicts."""


@dataclass(frozen=True)
class Sizes:
    """How much work each measurement does; the same for model and real KVM."""

    pages: int
    """4K pages touched by the fault measurements."""
    slot_repeats: int
    """Create/delete pairs timed (median) with :data:`memslots.SLOTS` slots present."""
    exits: int
    """MMIO exits timed."""
    stage2_pages: int
    """4K pages mapped per model stage-2 table for ``stage2_bytes_per_4k``."""
    slots: int = memslots.SLOTS

    @classmethod
    def for_run(cls, quick: bool, pages: int | None = None) -> Sizes:
        """Default sizes (``quick``: a few seconds in all), ``pages`` overriding
        the fault measurements' page count."""
        sizes = cls(pages=1000 if quick else 10000, slot_repeats=200 if quick else 1000,
                    exits=200 if quick else 2000, stage2_pages=stage2.bytes_pages(quick))
        return sizes if pages is None else replace(sizes, pages=pages)


MODEL_TICKS = 5
KVM_TICKS = 4


def measure_model(sizes: Sizes, arch: str = "x86", tick: Tick = no_tick) -> dict[str, float]:
    """Every measurement on the model (faults, MMIO exit and memslots on ``arch``;
    stage-2 memory on every architecture).  RuntimeError if the model did not
    take the path measured."""
    out: dict[str, float] = {}
    out["fault_4k_fresh_us"] = faults.fault_4k(arch, sizes.pages, populate=False)
    tick("model fault_4k_fresh")
    out["fault_4k_present_us"] = faults.fault_4k(arch, sizes.pages, populate=True)
    tick("model fault_4k_present")
    out["fault_pages"] = float(sizes.pages)
    ops = memslots.memslot_ops(sizes.slots, sizes.slot_repeats, arch)
    out.update(memslot_create_us=ops["create"], memslot_delete_us=ops["delete"],
               memslots_present=float(sizes.slots))
    tick("model memslots")
    out["mmio_exit_us"] = faults.mmio_exit(arch, sizes.exits)
    tick("model mmio_exit")
    out["stage2_bytes_per_4k"] = max(stage2.bytes_per_4k(a, sizes.stage2_pages)
                                     for a in stage2.ARCHES)
    tick("model stage-2 memory")
    return _ordered(out)


def measure_kvm(sizes: Sizes, tick: Tick = no_tick) -> dict[str, float]:
    """Every measurement on this host's /dev/kvm.  Raises
    :class:`~kvmmem.realkvm.kvm.KvmUnavailable` (one line saying why) when it is
    unusable, OSError or RuntimeError when a measurement fails."""
    from kvmmem.benchmarks import realkvm
    from kvmmem.realkvm import Kvm

    realkvm.require_kvm()
    out: dict[str, float] = {}
    with Kvm() as kvm:
        out["fault_4k_fresh_us"] = realkvm.fault_4k(kvm, sizes.pages, populate=False)
        tick("KVM fault_4k_fresh")
        out["fault_4k_present_us"] = realkvm.fault_4k(kvm, sizes.pages, populate=True)
        tick("KVM fault_4k_present")
        out["fault_pages"] = float(sizes.pages)
        create, delete = realkvm.memslot_ops(kvm, sizes.slots, sizes.slot_repeats)
        out.update(memslot_create_us=create, memslot_delete_us=delete,
                   memslots_present=float(sizes.slots))
        tick("KVM memslots")
        out["mmio_exit_us"] = realkvm.mmio_exit(kvm, sizes.exits, "native")
        tick("KVM mmio_exit")
    out["stage2_bytes_per_4k"] = stage2.HARDWARE_BYTES_PER_4K
    return _ordered(out)


def _ordered(figures: dict[str, float]) -> dict[str, float]:
    """The measurements in table order, then the sizes."""
    return {name: figures[name] for name in (*NAMES, *PARAMETERS)}


def bench_json(model: dict[str, float], kvm: dict[str, float] | None) -> dict[str, Any]:
    """``{"model": {...}, "kvm": {...} or None}``, the ``--json`` output; the counts
    (:data:`PARAMETERS`: pages, memslots) are integers, the measurements floats."""

    def typed(values: dict[str, float]) -> dict[str, float | int]:
        return {k: int(v) if k in PARAMETERS else v for k, v in values.items()}

    return {"model": typed(model), "kvm": typed(kvm) if kvm is not None else None}


def _cell(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 100 else f"{value:,.0f}"


def bench_table(model: dict[str, float], kvm: dict[str, float] | None, *, arch: str,
                kvm_note: str | None = None) -> Table:
    """Model and real KVM side by side, one row per measurement, with model/KVM."""
    title = f"kvmmem bench: model ({arch}) vs real KVM on this host"
    caption = (f"faults over {int(model['fault_pages']):,} pages; memslot ops with "
               f"{int(model['memslots_present']):,} slots present; real KVM stage-2: the "
               "hardware's 8 B leaf")
    if kvm is None:
        caption += f"; real KVM: {kvm_note or 'not measured'}"
    table = Table(title=title, caption=caption)
    table.add_column("measurement")
    table.add_column("unit")
    table.add_column("model", justify="right")
    table.add_column("real KVM", justify="right")
    table.add_column("model/KVM", justify="right")
    table.add_column("what")
    for m in MEASUREMENTS:
        mine = model[m.name]
        real = None if kvm is None else kvm[m.name]
        ratio = f"{mine / real:.1f}x" if real else "-"
        table.add_row(m.name, m.unit, _cell(mine), _cell(real), ratio, m.what)
    return table
