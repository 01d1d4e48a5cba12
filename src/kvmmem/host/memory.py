"""``mm/memory.c``: the page-fault handler (``handle_mm_fault``), zapping a range
of PTEs (``unmap_page_range``), freeing page tables and ``remap_pfn_range``.

``handle_mm_fault_op`` returns a VM_FAULT_* code (declared in
:mod:`kvmmem.host.mm_types`); THP and hugetlb faults are handed to
:mod:`kvmmem.host.huge_memory` and :mod:`kvmmem.host.hugetlb`."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from kvmmem.host.args import concat_pfns
from kvmmem.host.file import FileKind
from kvmmem.host.huge_memory import (
    do_huge_pmd_anonymous_page,
    huge_pmd_fault_op,
    is_hugetlb_leaf,
    split_huge_pmd_op,
    thp_suitable,
)
from kvmmem.host.hugetlb import hugetlb_fault_op
from kvmmem.host.mm_types import (
    MIGRATION_WAIT,
    VM_FAULT_FALLBACK,
    VM_FAULT_OK,
    VM_FAULT_RETRY,
    VM_FAULT_SIGBUS,
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
    set_pte,
)
from kvmmem.host.physmem import PG_ANON, PG_ANON_EXCLUSIVE, PG_DIRTY, RAM_BASE_PFN
from kvmmem.host.rmap import anon_vma_prepare
from kvmmem.host.vfio import is_vfio_bar, vfio_pci_mmap_fault, vfio_pci_mmap_huge_fault
from kvmmem.host.vma import VM_HUGETLB, VM_SHARED, VM_WRITE, Vma, VmaKind
from kvmmem.sync import Op

_P, _W, _D, _Y, _S = PTE_PRESENT, PTE_WRITE, PTE_DIRTY, PTE_YOUNG, PTE_SPECIAL


def zap_page_range_op(
    mm: MmStruct, start: int, end: int, *, cache_only: bool = False
) -> Op[list[npt.NDArray[np.int64]]]:
    """``unmap_page_range`` / ``zap_pte_range``: clear every entry in ``[start, end)``.

    Splits a THP leaf the range cuts (with its own CLEAR notification),
    drops each page's mapcount now, and returns the pfns whose references
    must be dropped after the notifier end (``tlb_finish_mmu``).
    ``cache_only`` keeps private anonymous (COW) pages (``even_cows=0``)."""
    pt = mm.pt
    pm = mm.physmem
    pmd_shift, pmd_size, page_shift = pt.pmd_shift, pt.pmd_size, pt.page_shift
    puts: list[npt.NDArray[np.int64]] = []
    for idx in pt.indices(start, end):
        slot = pt.pmd.get(idx)
        if slot is None:
            continue
        base = idx << pmd_shift
        lo = max(start, base)
        hi = min(end, base + pmd_size)
        if isinstance(slot, int):
            if slot & PTE_PUD:
                # zap_pud_range: a PUD leaf the range does not cover is split (a
                # special one is cleared whole); a covered one goes slot by slot below
                pud_base = base & ~(mm.pg.pud_size - 1)
                if start > pud_base or end < pud_base + mm.pg.pud_size:
                    yield from split_huge_pmd_op(mm, idx)
                    continue
            if hi - lo != pmd_size:
                if is_hugetlb_leaf(mm, slot):
                    continue  # callers align hugetlb ranges
                yield from split_huge_pmd_op(mm, idx)
                slot = pt.pmd.get(idx)
                if slot is None or isinstance(slot, int):
                    continue
            else:
                head = slot >> PFN_SHIFT
                if cache_only and pm.is_anon(head):
                    continue
                del pt.pmd[idx]
                if not slot & _S:
                    pm.add_mapcount(np.arange(head, head + pm.pages_per_pmd, dtype=np.int64),
                                    -1)
                    puts.append(np.array([head], dtype=np.int64))
                continue
        arr = pt.view(slot)[(lo - base) >> page_shift : (hi - base) >> page_shift]
        nzi = np.flatnonzero(arr)
        if not nzi.size:
            continue
        ents = arr[nzi]
        normal = (ents & _S) == 0
        if cache_only:
            pfns_all = ents >> PFN_SHIFT
            anon = np.zeros(len(ents), dtype=bool)
            nm = np.flatnonzero(normal)
            if nm.size:
                flags = np.frombuffer(pm._flags, dtype=np.uint8)
                anon[nm] = (flags[pfns_all[nm] - RAM_BASE_PFN] & PG_ANON) != 0
            keep = anon
            nzi = nzi[~keep]
            ents = ents[~keep]
            normal = normal[~keep]
        arr[nzi] = 0
        pfns = ents[normal] >> PFN_SHIFT
        if pfns.size:
            pm.add_mapcount(pfns, -1)
            puts.append(pfns)
    return puts


def tlb_finish_mmu(mm: MmStruct, puts: list[npt.NDArray[np.int64]]) -> None:
    """Drop the page references collected by a zap (``tlb_finish_mmu`` -> ``folio_put``)."""
    if puts:
        mm.physmem.put_pages(concat_pfns(puts))


def free_pgtables(mm: MmStruct, start: int, end: int, *, only_empty_full: bool = False) -> None:
    """``free_pgtables``: drop PTE tables in ``[start, end)`` no VMA covers any more.

    With ``only_empty_full`` (MADV_DONTNEED, ``CONFIG_PT_RECLAIM``) drop
    the tables whose whole PMD range (2 MiB with 4 KiB pages) was zapped instead."""
    pt = mm.pt
    pmd_shift, pmd_size = pt.pmd_shift, pt.pmd_size
    for idx in pt.indices(start, end):
        slot = pt.pmd.get(idx)
        if slot is None or isinstance(slot, int):
            continue
        base = idx << pmd_shift
        if only_empty_full:
            if start <= base and base + pmd_size <= end and not pt.view(slot).any():
                del pt.pmd[idx]
        elif not mm.vmas_in(base, base + pmd_size):
            del pt.pmd[idx]


def handle_mm_fault_op(mm: MmStruct, vma: Vma, hva: int, write: bool) -> Op[int]:
    """``handle_mm_fault()``: resolve a fault at ``hva`` in ``vma`` (access already checked).

    Returns ``VM_FAULT_OK`` or a VM_FAULT_* error bit (SIGBUS beyond EOF or
    with an empty hugetlb pool, RETRY while a migration entry is there).
    The caller holds ``mmap_lock`` for read."""
    mm.stats["faults"] += 1
    if vma.flags & VM_HUGETLB:
        return (yield from hugetlb_fault_op(mm, vma, hva, write))
    pt = mm.pt
    idx = hva >> pt.pmd_shift
    slot = pt.pmd.get(idx)
    if isinstance(slot, int):
        return (yield from huge_pmd_fault_op(mm, vma, hva, write, slot))
    if slot is None:
        if thp_suitable(mm, vma, hva):
            return do_huge_pmd_anonymous_page(mm, vma, hva, write)
        # create_huge_pud / create_huge_pmd -> vm_ops->huge_fault(vmf, PUD_ORDER, then
        # PMD_ORDER): a PFNMAP VMA with a huge_fault handler gets those orders on a page
        # fault whatever the THP sysfs setting (v6.12, "mm: Allow THP orders for
        # PFNMAPs"); the PUD order only while the PUD is empty (pud_none: the model
        # reads that as no PMD slot in the PUD's range)
        if is_vfio_bar(vma.file):
            if "pud" in mm.huge_pfnmap \
                    and not pt.pud_populated(hva >> mm.pg.pud_shift) \
                    and vfio_pci_mmap_huge_fault(mm, vma, hva, mm.pg.pud_size) \
                    != VM_FAULT_FALLBACK:
                return VM_FAULT_OK
            if "pmd" in mm.huge_pfnmap and vfio_pci_mmap_huge_fault(
                    mm, vma, hva, pt.pmd_size) != VM_FAULT_FALLBACK:
                return VM_FAULT_OK
        slot = pt.new_table(idx)
    i = (hva >> pt.page_shift) & pt.pte_mask
    e = slot[i]
    if not e:
        return do_pte_missing(mm, vma, hva, write, slot, i)
    if e & PTE_MIGRATION:
        yield MIGRATION_WAIT
        return VM_FAULT_RETRY
    if write and not e & _W:
        return (yield from do_wp_page_op(mm, vma, hva, slot, i, e))
    slot[i] = e | _Y | (_D if write else 0)
    return VM_FAULT_OK


def do_pte_missing(mm: MmStruct, vma: Vma, hva: int, write: bool, tbl: Any, i: int) -> int:
    """``do_anonymous_page`` / ``do_read_fault`` / ``do_cow_fault`` / ``do_shared_fault``."""
    pm = mm.physmem
    if vma.is_anonymous():
        if not write:
            # do_anonymous_page: map the shared zero page read-only
            tbl[i] = (pm.zero_pfn << PFN_SHIFT) | _P | _S | _Y
            mm.stats["zero_page_maps"] += 1
            return VM_FAULT_OK
        anon_vma_prepare(mm, vma)
        pfn = pm.alloc_page()
        pm.set_flags(pfn, PG_ANON | PG_ANON_EXCLUSIVE)
        pm._map[pfn - RAM_BASE_PFN] = 1
        tbl[i] = (pfn << PFN_SHIFT) | _P | _W | _D | _Y
        return VM_FAULT_OK
    f = vma.file
    if f is None:
        return VM_FAULT_SIGBUS
    if f.vfio_bar:
        return vfio_pci_mmap_fault(mm, vma, hva)  # vm_ops->fault; vm_pgoff is no index
    index = vma.pgoff_of(hva)
    if index >= f.npages():
        return VM_FAULT_SIGBUS  # beyond EOF: filemap_fault / shmem_fault
    if vma.kind is VmaKind.DMABUF:
        # drm_gem_shmem_fault / udmabuf_vm_fault: vmf_insert_pfn of the pinned page
        # with vm_page_prot, writable at once in a writable shared mapping (a
        # VM_PFNMAP VMA wants no write notification)
        pfn = f.get_page(index)
        tbl[i] = (pfn << PFN_SHIFT) | _P | _S | _Y | \
            ((_W | _D) if vma.flags & VM_WRITE else 0)
        return VM_FAULT_OK
    if f.fault is not None:
        # the file's own vm_ops->fault (kvm_gmem_fault_user_mapping): a page-cache page,
        # mapped as a shared mapping maps it (no write notification)
        gpfn = f.fault(index)
        if gpfn is None:
            return VM_FAULT_SIGBUS
        pm.map_one(gpfn)
        bits = _P | _Y
        if vma.flags & VM_WRITE:
            bits |= _W | (_D if write else 0)
        tbl[i] = (gpfn << PFN_SHIFT) | bits
        return VM_FAULT_OK
    if f.kind is FileKind.DEVICE:
        if not f.device_lazy:
            return VM_FAULT_SIGBUS  # remap_pfn_range VMAs have no fault handler
        # the driver's .fault: vmf_insert_pfn_prot, read-only unless a write fault
        dpfn = f.device_base + index
        tbl[i] = (dpfn << PFN_SHIFT) | _P | _S | _Y | ((_W | _D) if write else 0)
        return VM_FAULT_OK
    if write and not vma.flags & VM_SHARED:
        # do_cow_fault: a private copy of the page-cache page
        src = f.get_page(index)
        anon_vma_prepare(mm, vma)
        pfn = pm.alloc_page()
        pm.copy_page(pfn, src)
        pm.set_flags(pfn, PG_ANON | PG_ANON_EXCLUSIVE)
        pm._map[pfn - RAM_BASE_PFN] = 1
        tbl[i] = (pfn << PFN_SHIFT) | _P | _W | _D | _Y
        mm.stats["cow"] += 1
        return VM_FAULT_OK
    pfn = f.get_page(index)
    pm.map_one(pfn)
    bits = _P | _Y
    if vma.flags & VM_SHARED:
        if write:
            bits |= _W | _D  # do_shared_fault: page_mkwrite, then writable + dirty
            pm.set_flags(pfn, PG_DIRTY)
        elif vma.flags & VM_WRITE and not f.writenotify:
            bits |= _W  # vm_page_prot of a shared writable mapping without writenotify
    tbl[i] = (pfn << PFN_SHIFT) | bits
    return VM_FAULT_OK


def do_wp_page_op(mm: MmStruct, vma: Vma, hva: int, tbl: Any, i: int, e: int) -> Op[int]:
    """``do_wp_page``: a write hit a present read-only PTE (VMA is writable)."""
    pm = mm.physmem
    pfn = e >> PFN_SHIFT
    if e & _S and pfn != pm.zero_pfn:
        tbl[i] = e | _W | _D | _Y  # wp_pfn_shared / pfn_mkwrite (device-lazy)
        return VM_FAULT_OK
    if vma.flags & VM_SHARED:
        tbl[i] = e | _W | _D | _Y  # wp_page_shared: page_mkwrite, reuse
        pm.set_flags(pfn, PG_DIRTY)
        return VM_FAULT_OK
    if not e & _S and pm._flags[pfn - RAM_BASE_PFN] & PG_ANON_EXCLUSIVE:
        tbl[i] = e | _W | _D | _Y  # wp_page_reuse: exclusive anonymous page
        return VM_FAULT_OK
    return (yield from wp_page_copy_op(mm, vma, hva, tbl, i, e))


def wp_page_copy_op(mm: MmStruct, vma: Vma, hva: int, tbl: Any, i: int, e: int) -> Op[int]:
    """``wp_page_copy``: break COW (zero page or page-cache page) into a new anon page.

    Notifies MMU_NOTIFY_CLEAR for the page around the PTE switch; the old
    page's reference is dropped after the notifier end."""
    pm = mm.physmem
    old = e >> PFN_SHIFT
    anon_vma_prepare(mm, vma)
    new = pm.alloc_page()
    if old != pm.zero_pfn:
        pm.copy_page(new, old)
    pm.set_flags(new, PG_ANON | PG_ANON_EXCLUSIVE)
    page = hva & mm.pg.page_mask
    rng = yield from invalidate_range_start_op(mm, page, page + mm.page_size,
                                               NotifierEvent.CLEAR)
    if id(mm.pt.pmd.get(hva >> mm.pt.pmd_shift)) != id(tbl) or tbl[i] != e:
        pm.put_page(new)  # !pte_same: somebody else resolved it
        yield from invalidate_range_end_op(mm, rng)
        return VM_FAULT_OK
    pm._map[new - RAM_BASE_PFN] = 1
    tbl[i] = (new << PFN_SHIFT) | _P | _W | _D | _Y
    mm.stats["cow"] += 1
    yield from invalidate_range_end_op(mm, rng)
    if not e & _S:
        pm._map[old - RAM_BASE_PFN] -= 1
        pm.put_page(old)
    return VM_FAULT_OK


def remap_pfn_range(mm: MmStruct, vma: Vma) -> None:
    """``remap_pfn_range``: map every device frame of the VMA now (special PTEs)."""
    f = vma.file
    if f is None:
        return
    writable = _W if vma.flags & VM_WRITE and vma.flags & VM_SHARED else 0
    base_pfn = f.device_base + vma.pgoff
    vma.pgoff = base_pfn  # pci_mmap_resource_range / /dev/mem: vm_pgoff holds the pfn
    for hva in range(vma.start, vma.end, mm.page_size):
        pfn = base_pfn + ((hva - vma.start) >> mm.page_shift)
        set_pte(mm.pt, hva, (pfn << PFN_SHIFT) | _P | _S | writable)
