"""Transparent huge pages (``mm/huge_memory.c``): the anonymous PMD fault, the
write fault on a PMD leaf, and splitting a PMD leaf into ``PTRS_PER_PTE`` PTEs (512 with
4 KiB pages: a 2 MiB THP; 2048 with arm64's 16 KiB pages: 32 MiB; 8192 with 64 KiB:
512 MiB).  Only PMD-sized THPs are modelled (not mTHP)."""

from __future__ import annotations

import numpy as np

from kvmmem.errors import KernelError
from kvmmem.host.args import ulong_arg
from kvmmem.host.mm_types import (
    MIGRATION_WAIT,
    MMAP_READ_LOCK,
    MMAP_READ_UNLOCK,
    VM_FAULT_OK,
    VM_FAULT_RETRY,
    MmStruct,
    invalidate_range_end_op,
    invalidate_range_start_op,
)
from kvmmem.host.notifier import NotifierEvent
from kvmmem.host.pagetable import (
    PFN_SHIFT,
    PTE_DIRTY,
    PTE_MIGRATION,
    PTE_PRESENT,
    PTE_PUD,
    PTE_SPECIAL,
    PTE_WRITE,
    PTE_YOUNG,
    pud_slot_range,
)
from kvmmem.host.physmem import PG_ANON, PG_ANON_EXCLUSIVE, PG_HUGETLB, RAM_BASE_PFN
from kvmmem.host.rmap import anon_vma_prepare
from kvmmem.host.vma import VM_HUGEPAGE, VM_NOHUGEPAGE, Vma
from kvmmem.sync import Op, drive

_P, _W, _D, _Y, _S = PTE_PRESENT, PTE_WRITE, PTE_DIRTY, PTE_YOUNG, PTE_SPECIAL


def split_huge_pmd_op(mm: MmStruct, idx: int) -> Op[None]:
    """``__split_huge_pmd()``: turn the THP leaf at PMD ``idx`` into PTEs.

    Notifies MMU_NOTIFY_CLEAR over the PMD.  The folio stays compound
    (refcount + one per PTE after the first); the huge zero page becomes
    zero-page PTEs."""
    leaf = mm.pt.pmd.get(idx)
    if not isinstance(leaf, int) or is_hugetlb_leaf(mm, leaf):
        return
    if leaf & PTE_PUD:
        yield from split_huge_pud_op(mm, idx)
        return
    pg = mm.pg
    haddr = idx << pg.pmd_shift
    rng = yield from invalidate_range_start_op(mm, haddr, haddr + pg.pmd_size,
                                               NotifierEvent.CLEAR)
    leaf = mm.pt.pmd.get(idx)
    if isinstance(leaf, int) and is_pfnmap_leaf(mm, leaf):
        # __split_huge_pmd_locked on a special huge PFNMAP leaf (vma_is_special_huge):
        # the entry is only cleared; the driver's fault handler refills the range
        del mm.pt.pmd[idx]
    elif isinstance(leaf, int):
        head = leaf >> PFN_SHIFT
        bits = leaf & ((1 << PFN_SHIFT) - 1)
        tbl = mm.pt.new_table(idx)
        arr = mm.pt.view(tbl)
        if mm.physmem.is_huge_zero(head):
            arr[:] = (mm.physmem.zero_pfn << PFN_SHIFT) | (bits & ~_W) | _S
        else:
            ppm = pg.pages_per_pmd
            arr[:] = ((np.arange(ppm, dtype=np.int64) + head) << PFN_SHIFT) | bits
            if not bits & PTE_MIGRATION:
                mm.physmem.get_pages(np.array([head], dtype=np.int64), ppm - 1)
    yield from invalidate_range_end_op(mm, rng)


def split_huge_pud_op(mm: MmStruct, idx: int) -> Op[None]:
    """``__split_huge_pud()`` on a special PFNMAP PUD leaf (the only PUD leaves the
    model holds; PMD index ``idx`` lies in it): MMU_NOTIFY_CLEAR over the PUD, then the
    entry is cleared (``__split_huge_pud_locked``: ``vma_is_special_huge``), all of its
    PMD slots; the driver's fault handler refills the range."""
    pt = mm.pt
    slots = pud_slot_range(pt, idx)
    haddr = slots.start << pt.pmd_shift
    rng = yield from invalidate_range_start_op(mm, haddr, haddr + mm.pg.pud_size,
                                               NotifierEvent.CLEAR)
    for i in slots:
        leaf = pt.pmd.get(i)
        if isinstance(leaf, int) and leaf & PTE_PUD:
            del pt.pmd[i]
    yield from invalidate_range_end_op(mm, rng)


def split_huge_pmd_address_op(mm: MmStruct, addr: int) -> Op[None]:
    """``split_huge_pmd_address``: split a THP leaf that ``addr`` cuts in two."""
    pt = mm.pt
    if addr & (pt.pmd_size - 1):
        slot = pt.pmd.get(addr >> pt.pmd_shift)
        if isinstance(slot, int):
            yield from split_huge_pmd_op(mm, addr >> pt.pmd_shift)


def is_pfnmap_leaf(mm: MmStruct, leaf: int) -> bool:
    """The huge leaf is a special PFNMAP entry over device memory (``pmd_special``
    outside RAM: a driver's ``huge_fault`` inserted it, v6.12), not a THP."""
    return bool(leaf & _S) and not mm.physmem.pfn_valid(leaf >> PFN_SHIFT)


def is_hugetlb_leaf(mm: MmStruct, leaf: int) -> bool:
    """The huge leaf maps a hugetlb page (those are never split)."""
    head = leaf >> PFN_SHIFT
    return mm.physmem.pfn_valid(head) and bool(
        mm.physmem._flags[head - RAM_BASE_PFN] & PG_HUGETLB)


def thp_suitable(mm: MmStruct, vma: Vma, hva: int) -> bool:
    """``thp_vma_allowable_order`` + ``thp_vma_suitable_order`` for an anonymous PMD."""
    if not vma.is_anonymous() or vma.flags & VM_NOHUGEPAGE or mm.thp == "never":
        return False
    if mm.thp == "madvise" and not vma.flags & VM_HUGEPAGE:
        return False
    pg = mm.pg
    haddr = hva & pg.hpage_mask
    return haddr >= vma.start and haddr + pg.pmd_size <= vma.end


def do_huge_pmd_anonymous_page(mm: MmStruct, vma: Vma, hva: int, write: bool) -> int:
    """``do_huge_pmd_anonymous_page``: map a PMD-sized THP (or the huge zero page on a
    read)."""
    pm = mm.physmem
    idx = hva >> mm.pt.pmd_shift
    mm.stats["thp_faults"] += 1
    if not write:
        mm.pt.pmd[idx] = (pm.huge_zero_pfn << PFN_SHIFT) | _P | _S | _Y
        return VM_FAULT_OK
    anon_vma_prepare(mm, vma)
    head = pm.alloc_huge()
    pfns = np.arange(head, head + pm.pages_per_pmd, dtype=np.int64)
    pm.set_flags_bulk(pfns, PG_ANON | PG_ANON_EXCLUSIVE)
    pm.add_mapcount(pfns, 1)
    mm.pt.pmd[idx] = (head << PFN_SHIFT) | _P | _W | _D | _Y
    return VM_FAULT_OK


def huge_pmd_fault_op(mm: MmStruct, vma: Vma, hva: int, write: bool, leaf: int) -> Op[int]:
    """``huge_pmd_set_accessed`` / ``do_huge_pmd_wp_page`` / ``do_huge_zero_wp_pmd``."""
    pm = mm.physmem
    pg = mm.pg
    idx = hva >> pg.pmd_shift
    if leaf & PTE_MIGRATION:
        yield MIGRATION_WAIT
        return VM_FAULT_RETRY
    if not write or leaf & _W:
        mm.pt.pmd[idx] = leaf | _Y | (_D if write else 0)
        return VM_FAULT_OK
    if is_pfnmap_leaf(mm, leaf):
        # wp_huge_pmd on a shared PFNMAP VMA: the driver's huge_fault finds the PMD
        # present and leaves it (vmf_insert_pfn_pmd without write); a writable VMA has
        # writable leaves (change_huge_pmd), so this is not reached through mprotect.
        # Modelled as __split_huge_pmd's zap and a retry at the page level.
        yield from split_huge_pmd_op(mm, idx)
        return VM_FAULT_RETRY
    head = leaf >> PFN_SHIFT
    if pm.is_huge_zero(head):
        # do_huge_zero_wp_pmd (v6.12+): a fresh THP replaces the huge zero page
        anon_vma_prepare(mm, vma)
        new = pm.alloc_huge()
        haddr = hva & pg.hpage_mask
        rng = yield from invalidate_range_start_op(mm, haddr, haddr + pg.pmd_size,
                                                   NotifierEvent.CLEAR)
        if mm.pt.pmd.get(idx) != leaf:
            pm.put_page(new)
            yield from invalidate_range_end_op(mm, rng)
            return VM_FAULT_OK
        pfns = np.arange(new, new + pg.pages_per_pmd, dtype=np.int64)
        pm.set_flags_bulk(pfns, PG_ANON | PG_ANON_EXCLUSIVE)
        pm.add_mapcount(pfns, 1)
        mm.pt.pmd[idx] = (new << PFN_SHIFT) | _P | _W | _D | _Y
        yield from invalidate_range_end_op(mm, rng)
        return VM_FAULT_OK
    if pm._flags[head - RAM_BASE_PFN] & PG_ANON_EXCLUSIVE:
        mm.pt.pmd[idx] = leaf | _W | _D | _Y
        return VM_FAULT_OK
    # not exclusive (cannot happen without fork): fall back to a page-sized COW
    yield from split_huge_pmd_op(mm, idx)
    return VM_FAULT_RETRY


def split_huge_pmd_hva_op(mm: MmStruct, hva: int) -> Op[None]:
    """``split_huge_pmd_address``: split the THP mapping ``hva`` into PTEs.

    MMU_NOTIFY_CLEAR over the PMD; nothing happens if ``hva`` is not
    THP-mapped.  Raises KernelError EINVAL for a hugetlb mapping."""
    a = ulong_arg(hva, "split_huge_pmd: hva")
    yield MMAP_READ_LOCK
    vma = mm.vma_lookup(a)
    if vma is not None and vma.is_hugetlb():
        yield MMAP_READ_UNLOCK
        raise KernelError("EINVAL", f"split_huge_pmd({a:#x})", "hugetlb pages do not split")
    if isinstance(mm.pt.pmd.get(a >> mm.pt.pmd_shift), int):
        yield from split_huge_pmd_op(mm, a >> mm.pt.pmd_shift)
    yield MMAP_READ_UNLOCK


def split_huge_pmd_hva(mm: MmStruct, hva: int) -> None:
    """Sequential :func:`split_huge_pmd_hva_op`."""
    drive(split_huge_pmd_hva_op(mm, hva))
