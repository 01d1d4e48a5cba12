"""The pieces of stage-2 fault handling the architectures share:
``fault_supports_stage2_huge_mapping`` (arm64; riscv's
``fault_supports_gstage_huge_mapping`` is the same rule),
``transparent_hugepage_adjust`` (arm64; riscv's copy) and ``memslot_is_logging``.

What every architecture provides (:class:`~kvmmem.kvm.kvm_host.ArchKvm`, the
``kvm_arch_*`` hooks, and :class:`~kvmmem.kvm.kvm_host.MemslotHookContext`) is
in :mod:`kvmmem.kvm.kvm_host`; this module re-exports those names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmmem.kvm.kvm_host import PG_LEVEL_2M, PG_LEVEL_4K, ArchKvm, MemslotHookContext
from kvmmem.types import align_down

__all__ = [
    "PG_LEVEL_2M", "PG_LEVEL_4K", "ArchKvm", "MemslotHookContext",
    "fault_supports_stage2_huge_mapping", "memslot_is_logging", "transparent_hugepage_adjust",
]

if TYPE_CHECKING:
    from kvmmem.host import Mm
    from kvmmem.kvm.memslot import MemorySlot


def fault_supports_stage2_huge_mapping(slot: MemorySlot, hva: int, map_size: int) -> bool:
    """``fault_supports_stage2_huge_mapping`` (arm64; riscv's
    ``fault_supports_gstage_huge_mapping`` is the same rule): a block of
    ``map_size`` is allowed only if gpa and hva are congruent modulo the
    block and the block around ``hva`` lies inside the slot.  ``PAGE_SIZE`` is the host's
    (the slot's ``page_shift``)."""
    page_shift = slot.page_shift
    if map_size == 1 << page_shift:
        return True
    gpa_start = slot.base_gfn << page_shift
    uaddr_start = slot.userspace_addr
    uaddr_end = uaddr_start + (slot.npages << page_shift)
    if (gpa_start & (map_size - 1)) != (uaddr_start & (map_size - 1)):
        return False
    block = align_down(hva, map_size)
    return block >= uaddr_start and block + map_size <= uaddr_end


def transparent_hugepage_adjust(mm: Mm, slot: MemorySlot, hva: int) -> int:
    """``transparent_hugepage_adjust`` (arm64; riscv's copy since its THP support,
    ed7ae7a34bea) for a page-sized, cacheable fault: PMD when the slot allows a PMD
    block around ``hva`` and the host maps it with a huge leaf
    (``get_user_mapping_size``); else a page.  The caller aligns the IPA and pfn.
    ``PMD_SIZE`` is the host's (2 MiB with 4 KiB pages, 32 MiB with 16 KiB, 512 MiB
    with 64 KiB: only PMD-sized THPs are considered)."""
    pmd_size = mm.pg.pmd_size
    if fault_supports_stage2_huge_mapping(slot, hva, pmd_size) \
            and mm.mapping_size(hva) >= pmd_size:
        return pmd_size
    return mm.page_size


def memslot_is_logging(slot: MemorySlot) -> bool:
    """``memslot_is_logging`` (arm64/riscv): a dirty bitmap and not read-only."""
    return slot.dirty_bitmap is not None and not slot.readonly
