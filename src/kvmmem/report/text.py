"""Text reports of a run: the step table, memory maps in QEMU ``info mtree``
style with /proc/PID/maps flags, decoded stage-2 entries and counters."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from kvmmem.arch.printer import format_entry
from kvmmem.host.physmem import PhysMem
from kvmmem.scenario.runner import RunResult
from kvmmem.types import format_size

_STYLE = {"ok": "green", "mmio": "cyan", "fault": "red", "error": "yellow", "signal": "magenta",
          "abort": "red", "violation": "bold red"}


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:#x}"
    if isinstance(value, list):
        return f"[{', '.join(hex(v) for v in value)}]"
    return str(value)


def _details(outcome: dict[str, Any]) -> str:
    return " ".join(f"{key}={_value(value)}" for key, value in outcome.items()
                    if key not in ("step", "op", "result"))


def outcome_text(outcome: dict[str, Any]) -> str:
    """An outcome (or an expectation) in the table's notation: ``result=fault
    gpa=0x1000 size=0x8``; integers in hex, errnos and signals by name."""
    return " ".join(f"{key}={_value(value)}" for key, value in outcome.items()
                    if key not in ("step", "op"))


def steps_table(result: RunResult) -> Table:
    """One row per setup memslot (numbered ``s0``, ``s1``, ...) and per step
    (``0``, ``1``, ...): op, result, details, and the step's expectation, marked
    ``✓`` when met and ``✗`` (red) when not."""
    pages = "" if result.page_size == 4096 else f"  page_size={format_size(result.page_size)}"
    table = Table(title=f"{result.scenario}  arch={result.arch}  variant={result.variant}"
                        f"{pages}", title_justify="left", expand=False)
    table.add_column("#", justify="right")
    table.add_column("step")
    table.add_column("result")
    # values are never cut: a long one folds onto the next line
    table.add_column("details", overflow="fold")
    table.add_column("expected", overflow="fold")
    failed = {("setup" if m.setup else "step", m.step) for m in result.mismatches}
    rows = [("setup", o) for o in result.setup] + [("step", o) for o in result.steps]
    for kind, outcome in rows:
        idx = outcome["step"]
        res = outcome["result"]
        expect = result.expects.get((kind, idx))
        expected = Text("")
        if expect is not None:
            # in the notation of the details column (hex), so the two compare at a glance
            if (kind, idx) in failed:
                expected = Text("✗ " + outcome_text(expect), style="bold red")
            else:
                expected = Text("✓ " + outcome_text(expect), style="green")
        number = f"s{idx}" if kind == "setup" else str(idx)
        label = f"setup {outcome['op']}" if kind == "setup" else outcome["op"]
        table.add_row(number, label, Text(res, style=_STYLE.get(res, "")), _details(outcome),
                      expected)
    return table


def maps_text(result: RunResult) -> str:
    """The guest physical map (memslots, marked KVM) and the host VMAs, mtree style."""
    vm = result.vm
    assert vm is not None
    lines = ["address-space: guest physical memory"]
    for slot in vm.memslots.all_slots():
        gpa = slot.base_gfn << 12
        end = gpa + (slot.npages << 12) - 1
        flags = ",".join(f for f, on in (("readonly", slot.readonly),
                                         ("log_dirty", slot.dirty_bitmap is not None)) if on)
        lines.append(f"  {gpa:016x}-{end:016x} (prio 0, ram): slot{slot.id} KVM "
                     f"hva {slot.userspace_addr:#x}{' ' + flags if flags else ''}")
    lines.append("")
    lines.append("host mappings (/proc/PID/maps):")
    for vma in vm.mm.for_each_vma():
        flags = " ".join(vma.vm_flags_names())
        # show_map_vma: the offset column is vm_pgoff << PAGE_SHIFT for a file
        # mapping, 0 for anonymous memory (whose vm_pgoff is its address).
        offset = vma.pgoff << 12 if vma.file is not None else 0
        lines.append(f"  {vma.start:012x}-{vma.end:012x} {vma.maps_perms()} "
                     f"{offset:08x} {vma.maps_name():<24} [{flags}]")
    return "\n".join(lines)


def frame_kind(physmem: PhysMem, pfn: int) -> str:
    """What backs host frame ``pfn``: ``RAM`` (a struct page), ``device`` (no struct page:
    a BAR), ``device, cacheable`` (coherent device memory), ``other`` (none of the
    model's frames: a guessed premap's)."""
    if physmem.pfn_valid(pfn):
        return "RAM"
    if physmem.is_cacheable_device(pfn):
        return "device, cacheable"
    return "device" if physmem.is_device(pfn) else "other"


def stage2_text(result: RunResult) -> str:
    """The stage-2 table's geometry (granule: the host page size on arm64; input size;
    levels and start level; concatenated root pages), then every leaf as the hardware
    holds it: the entry in hex, then its decoded fields
    (:func:`~kvmmem.arch.printer.format_entry`), after the kind of memory its first
    frame is (:func:`frame_kind`: the memory type decoded in the entry is what the guest
    gets for it; with FWB, arm64 prints the FWB forms)."""
    vm = result.vm
    assert vm is not None
    s2 = vm.stage2
    fwb = " (FEAT_S2FWB encodings)" if getattr(s2, "fwb", False) else ""
    lines = [f"stage-2 ({vm.arch_name}): granule {format_size(s2.granule)}, "
             f"{s2.ipa_bits}-bit input, {s2.nlevels} levels from level {s2.levels[0]}"
             f"{f', {s2.root_pages} concatenated root pages' if s2.root_pages > 1 else ''}, "
             f"leaf sizes {', '.join(format_size(x) for x in s2.leaf_sizes)}",
             f"stage-2 ({vm.arch_name}) leaves{fwb}:"]
    pm = vm.mm.physmem
    for leaf in vm.stage2.for_each_leaf():
        lines.append(f"  gpa {leaf.gpa:#014x} size {leaf.size:#x} -> pfn {leaf.pfn:#x} "
                     f"({frame_kind(pm, leaf.pfn)})  "
                     f"{format_entry(vm.stage2, leaf.raw, leaf.level)}")
    if len(lines) == 2:
        lines.append("  (none)")
    return "\n".join(lines)


def stats_text(result: RunResult) -> str:
    """The VM counters and the stage-2 engine counters."""
    vm = result.vm
    assert vm is not None
    lines = ["counters:"]
    for name, value in vm.stats_dict().items():
        lines.append(f"  {name:<28} {value}")
    return "\n".join(lines)


def print_run(console: Console, result: RunResult, show: list[str]) -> None:
    """The human report of one run."""
    console.print(steps_table(result))
    for m in result.mismatches:
        where = f"setup memslot s{m.step}" if m.setup else f"step {m.step}"
        console.print(Text(f"{where} ({m.op}, line {m.line}): expected "
                           f"{outcome_text(m.expected)}, got {outcome_text(m.actual)}",
                           style="bold red"))
    for v in result.violations:
        where = f"setup memslot s{v['step']}" if v.get("setup") else f"step {v['step']}"
        console.print(f"[bold red]invariant {v['invariant']} violated after {where}: "
                      f"{v['detail']}[/]")
    for note in result.notes:
        console.print(f"[yellow]note ({note['invariant']}): {note['detail']}[/]")
    for what in show:
        text = {"stage2": stage2_text, "maps": maps_text, "stats": stats_text}[what](result)
        console.print(text, highlight=False, markup=False, soft_wrap=True)
