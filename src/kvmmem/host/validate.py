"""Consistency checks of the host model, kept apart from the fast paths.

Each ``validate_*`` raises :class:`~kvmmem.errors.ValidationError` naming the
broken rule; the tests and the explorer call them after every step.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from kvmmem.errors import ValidationError
from kvmmem.host.file import File
from kvmmem.host.mm_types import MmStruct
from kvmmem.host.pagetable import PFN_SHIFT, PTE_MIGRATION, PTE_PRESENT, PTE_SPECIAL
from kvmmem.host.physmem import PG_FREE, RAM_BASE_PFN
from kvmmem.types import format_size


def validate_vmas(mm: MmStruct) -> None:
    """The VMA tree is sorted, non-overlapping, page aligned; hugetlb VMAs aligned to the
    huge page size (2 MiB with 4 KiB pages)."""
    prev_end = 0
    page_size, huge = mm.page_size, mm.pg.pmd_size
    for vma in mm.for_each_vma():
        if vma.start >= vma.end:
            raise ValidationError("vma-order", f"{vma!r} is empty or inverted")
        if vma.start % page_size or vma.end % page_size:
            raise ValidationError("vma-aligned", f"{vma!r} is not page aligned")
        if vma.start < prev_end:
            raise ValidationError("vma-overlap", f"{vma!r} overlaps the VMA before it")
        if vma.is_hugetlb() and (vma.start % huge or vma.end % huge):
            raise ValidationError("vma-hugetlb",
                                  f"{vma!r} is not {format_size(huge)} aligned")
        if vma.file is not None and not any(
            v is vma and m is mm for m, v in vma.file.mappings
        ):
            raise ValidationError("vma-i_mmap", f"{vma!r} missing from its file's i_mmap")
        prev_end = vma.end


def validate_page_table(
    mm: MmStruct, *, extra_files: Iterable[File] = (), exact: bool = True
) -> None:
    """Every present entry lies inside a VMA and maps a live frame; mapcounts and
    refcounts agree with the page table and the page caches.

    ``exact`` demands refcount == mappings + page-cache references (true when no
    GUP reference is outstanding); otherwise refcount >= that."""
    pm = mm.physmem
    pg = mm.pg
    maps: dict[int, int] = {}
    refs: dict[int, int] = {}
    for idx in sorted(mm.pt.pmd):
        slot = mm.pt.pmd[idx]
        base = idx << pg.pmd_shift
        if isinstance(slot, int):
            entries = [(base, slot, True)]
        else:
            arr = np.frombuffer(slot, dtype=np.int64)
            nz = np.flatnonzero(arr)
            entries = [(base + int(i) * pg.page_size, int(arr[i]), False) for i in nz]
        for hva, e, huge in entries:
            vma = mm.vma_lookup(hva)
            if vma is None or (huge and vma.end < hva + pg.pmd_size):
                raise ValidationError("pte-outside-vma", f"entry {e:#x} at {hva:#x} has no VMA")
            if not e & (PTE_PRESENT | PTE_MIGRATION) or e & PTE_SPECIAL:
                continue
            pfn = e >> PFN_SHIFT
            if not pm.pfn_valid(pfn) or pm.page_flags(pfn) & PG_FREE:
                raise ValidationError("pte-maps-free", f"{hva:#x} maps free frame {pfn:#x}")
            head = int(pm.compound_head(pfn))
            refs[head] = refs.get(head, 0) + 1
            for k in range(pg.pages_per_pmd if huge else 1):
                maps[pfn + k] = maps.get(pfn + k, 0) + 1
    files: dict[int, File] = {f.ino: f for f in extra_files}
    for vma in mm.for_each_vma():
        if vma.file is not None:
            files[vma.file.ino] = vma.file
    for f in files.values():
        for index, pfn in f.cache.items():
            if pm.page_flags(pfn) & PG_FREE:
                raise ValidationError("cache-maps-free", f"{f.name}[{index}] is free {pfn:#x}")
            refs[pfn] = refs.get(pfn, 0) + 1
    for pfn, n in maps.items():
        if pm.page_mapcount(pfn) != n:
            raise ValidationError(
                "mapcount", f"pfn {pfn:#x}: mapcount {pm.page_mapcount(pfn)}, {n} mappings"
            )
    for head, n in refs.items():
        count = pm.page_count(head)
        if count < n or (exact and count != n):
            raise ValidationError("refcount", f"folio {head:#x}: refcount {count}, expected {n}")


def validate_physmem_free_lists(mm: MmStruct) -> None:
    """Every frame on a free list is marked free and has refcount 0."""
    pm = mm.physmem
    for pfn in pm._free:
        if not pm.page_flags(pfn) & PG_FREE or pm._ref[pfn - RAM_BASE_PFN]:
            raise ValidationError("free-list", f"free-listed pfn {pfn:#x} is in use")


def validate_mm(mm: MmStruct, *, extra_files: Iterable[File] = (), exact: bool = True) -> None:
    """All host-model checks for one address space."""
    validate_vmas(mm)
    validate_page_table(mm, extra_files=extra_files, exact=exact)
    validate_physmem_free_lists(mm)
