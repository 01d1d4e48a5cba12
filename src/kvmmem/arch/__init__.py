"""Stage-2 page tables for arm64, x86 (EPT) and RISC-V (G-stage), bit-exact.

Uses only the base modules (types, errors).  Entry points:

* :func:`make_stage2` - a fresh, empty second-stage table for an
  architecture (see :mod:`kvmmem.arch.pgtable` for the operations:
  ``map``, ``unmap_range``, ``walk``, ``wrprotect_range``,
  ``test_clear_young``, ``collect_dirty``, ``split``, ``collapse``,
  ``for_each_leaf``, ``counters``, ``tlbi_listeners``, ``history``);
* :data:`ARCHES` - per architecture its :class:`ArchInfo`: the table class,
  its entry printer and its table rules (break-before-make, freeing empty
  tables);
* :mod:`kvmmem.arch.printer` - entries as hex plus decoded fields;
* :mod:`kvmmem.arch.validate` - ``validate_bbm`` (invariant 7) and
  ``validate_tables``.

The stage-2 fault policy (mapping size, huge mappings, permissions, memory type)
is not here: it has one copy, in the fault path that uses it (``kvm/arm64.py``
``user_mem_abort``, ``kvm/x86.py`` ``kvm_mmu_hugepage_adjust``, ``kvm/riscv.py``
``kvm_riscv_mmu_map``, and ``kvm/arch_common.py`` for what they share).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvmmem.arch import arm64, riscv, x86
from kvmmem.arch.arm64 import Arm64Stage2
from kvmmem.arch.pgtable import (
    PERM_NONE,
    PERM_R,
    PERM_RW,
    PERM_RWX,
    PERM_RX,
    Counters,
    Leaf,
    MemAttr,
    Perm,
    PteWrite,
    Stage2,
    Tlbi,
    TlbiKind,
    WalkStep,
)
from kvmmem.arch.riscv import RiscvGstage
from kvmmem.arch.x86 import X86Tdp
from kvmmem.errors import InputError

__all__ = [
    "ARCHES",
    "PERM_NONE",
    "PERM_R",
    "PERM_RW",
    "PERM_RWX",
    "PERM_RX",
    "Arch",
    "ArchInfo",
    "Arm64Stage2",
    "Counters",
    "Leaf",
    "MemAttr",
    "Perm",
    "PteWrite",
    "RiscvGstage",
    "Stage2",
    "Tlbi",
    "TlbiKind",
    "WalkStep",
    "X86Tdp",
    "make_stage2",
]


@dataclass(frozen=True)
class ArchInfo:
    """One architecture: its stage-2 class, entry printer and table rules."""

    name: str
    stage2: type[Stage2]
    describe_entry: Callable[..., str]
    """(raw, level) -> decoded fields (printer)."""
    frees_empty_tables: bool
    break_before_make: bool


Arch = ArchInfo

ARCHES: dict[str, ArchInfo] = {
    "x86": ArchInfo("x86", X86Tdp, x86.describe_entry, X86Tdp.FREES_EMPTY_TABLES,
                    X86Tdp.BREAK_BEFORE_MAKE),
    "arm64": ArchInfo("arm64", Arm64Stage2, arm64.describe_entry,
                      Arm64Stage2.FREES_EMPTY_TABLES, Arm64Stage2.BREAK_BEFORE_MAKE),
    "riscv": ArchInfo("riscv", RiscvGstage, riscv.describe_entry,
                      RiscvGstage.FREES_EMPTY_TABLES, RiscvGstage.BREAK_BEFORE_MAKE),
}


def make_stage2(arch: str, *, granule: int = 4096, ipa_bits: int | None = None,
                levels: int | None = None, **options: Any) -> Stage2:
    """A fresh, empty stage-2 table for ``arch`` (``x86``, ``arm64``, ``riscv``).

    ``granule``: 4K (all), 16K/64K (arm64).  ``ipa_bits``: input-address
    width (arm64 default 40; x86 48 for 4 levels; riscv fixed by the mode:
    41 for Sv39x4).  ``levels``: override (arm64 2-4, x86 4/5, riscv 3/4/5).
    ``options`` go to the class (arm64 ``fwb``; x86 ``suppress_ve``,
    ``ignore_guest_pat``, ``max_huge_level``; riscv ``mode``, ``svpbmt``,
    ``svadu``; all: ``record_history=True`` records every entry write and TLBI
    from the start, which ``validate_bbm`` needs).  Raises InputError for an
    unknown architecture or geometry.
    """
    info = ARCHES.get(arch)
    if info is None:
        raise InputError(f"arch: unknown architecture {arch!r} (known: {', '.join(ARCHES)})")
    factory: Callable[..., Stage2] = info.stage2
    try:
        s2 = factory(granule=granule, ipa_bits=ipa_bits, levels=levels, **options)
    except TypeError as err:
        raise InputError(f"{arch} stage-2: {err}") from None
    return s2
