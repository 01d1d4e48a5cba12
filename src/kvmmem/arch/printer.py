"""Stage-2 entries as the hardware holds them: hex plus decoded fields.

* :func:`format_entry` - one entry, e.g. (arm64, 4K page)
  ``0x00400000400007ff  L3 PAGE OA=0x40000000 S2AP=RW XN=0b10 AF=1 SH=ISH
  MemAttr=0b1111(Normal-oWB-iWB)``;
* :func:`format_walk` - every entry a walk reads for one gpa, with the
  physical address of each entry;
* :func:`dump_stage2` - every valid entry of a table, indented by level.

The decoding per architecture lives next to each format
(``kvmmem.arch.arm64.describe_entry`` and the x86 / riscv equivalents);
:func:`decode_entry` reaches them by architecture name.
"""

from __future__ import annotations

from kvmmem.arch import arm64, riscv, x86
from kvmmem.arch.pgtable import Stage2
from kvmmem.errors import InputError


def decode_entry(arch: str, raw: int, level: int, *, granule: int = 4096,
                 fwb: bool = False) -> str:
    """The decoded fields of entry ``raw`` at ``level`` of architecture ``arch``
    (``arm64``, ``x86``, ``riscv``; levels in that architecture's numbering).
    Raises InputError for an unknown architecture."""
    if arch == "arm64":
        return arm64.describe_entry(raw, level, granule=granule, fwb=fwb)
    if arch == "x86":
        return x86.describe_entry(raw, level)
    if arch == "riscv":
        return riscv.describe_entry(raw, level)
    raise InputError(f"arch: unknown architecture {arch!r}")


def format_entry(s2: Stage2, raw: int, level: int) -> str:
    """``0x<16 hex digits>  <decoded fields>`` for ``raw`` at ``level`` of ``s2``."""
    return f"{raw:#018x}  {s2.describe_entry(raw, level)}"


def format_walk(s2: Stage2, gpa: int) -> list[str]:
    """One line per entry the hardware reads translating ``gpa``: level, the
    entry's physical address and index, its value and decoding."""
    return [f"L{step.level} [{step.idx:4d}] @{step.entry_pa:#014x}  "
            f"{format_entry(s2, step.raw, step.level)}" for step in s2.walk_path(gpa)]


def dump_stage2(s2: Stage2, *, leaves_only: bool = False, limit: int | None = None) -> list[str]:
    """Every valid entry of ``s2`` in gpa order (tables before their
    children, indented by depth): gpa range, value, decoding.  ``limit`` caps
    the number of lines (a last line says how many were left out)."""
    lines: list[str] = []
    left = 0
    for level, gpa, _epa, raw in s2.iter_entries():
        kind = s2.entry_kind(raw, level)
        if leaves_only and kind != "leaf":
            continue
        if limit is not None and len(lines) >= limit:
            left += 1
            continue
        d = s2.depth_of_level(level)
        size = s2.size_of_level(level)
        lines.append(f"{'  ' * d}{gpa:#014x}-{gpa + size - 1:#014x}  "
                     f"{format_entry(s2, raw, level)}")
    if left:
        lines.append(f"... {left} more entries")
    return lines
