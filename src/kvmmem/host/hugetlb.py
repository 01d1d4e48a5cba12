"""hugetlb (``mm/hugetlb.c``): the fault (``hugetlb_fault``) and the rule that a
hugetlb VMA is only cut at huge-page boundaries (``hugetlb_vm_op_split``).

PMD-sized pages only (the default hstate, ``HPAGE_SIZE``: 2 MiB with 4 KiB base pages,
32 MiB with arm64's 16 KiB, 512 MiB with 64 KiB), reservations per huge page index, no
PMD sharing."""

from __future__ import annotations

import numpy as np

from kvmmem.errors import KernelError
from kvmmem.host.mm_types import (
    MIGRATION_WAIT,
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
    PTE_SPECIAL,
    PTE_WRITE,
    PTE_YOUNG,
)
from kvmmem.host.physmem import PG_ANON, PG_ANON_EXCLUSIVE, RAM_BASE_PFN
from kvmmem.host.rmap import anon_vma_prepare
from kvmmem.host.vma import VM_MAYSHARE, VM_SHARED, VM_WRITE, Vma
from kvmmem.sync import Op

_P, _W, _D, _Y, _S = PTE_PRESENT, PTE_WRITE, PTE_DIRTY, PTE_YOUNG, PTE_SPECIAL


def hugetlb_fault_op(mm: MmStruct, vma: Vma, hva: int, write: bool) -> Op[int]:
    """``hugetlb_fault`` -> ``hugetlb_no_page`` / ``hugetlb_wp``."""
    pm = mm.physmem
    pg = mm.pg
    ppm = pg.pages_per_pmd
    idx = hva >> pg.pmd_shift
    haddr = hva & pg.hpage_mask
    leaf = mm.pt.pmd.get(idx)
    f = vma.file
    if f is None:
        return VM_FAULT_SIGBUS
    hindex = vma.pgoff_of(haddr) >> (pg.pmd_shift - pg.page_shift)
    if not isinstance(leaf, int) or not leaf:
        if hindex >= f.npages():
            return VM_FAULT_SIGBUS
        shared = bool(vma.flags & VM_MAYSHARE)
        if shared:
            head = f.cache.get(hindex)
            if head is None:
                reserved = hindex in f.resv
                got = pm.alloc_hugetlb(reserved=reserved)
                if got is None:
                    return VM_FAULT_SIGBUS
                f.resv.pop(hindex, None)
                f.add_huge_page(hindex, got)
                head = got
            pm.get_page(head)
            writable = bool(vma.flags & VM_WRITE and vma.flags & VM_SHARED)
            bits = _P | _Y | ((_W | (_D if write else 0)) if writable else 0)
        else:
            reserved = hindex in vma.resv
            got = pm.alloc_hugetlb(reserved=reserved)
            if got is None:
                return VM_FAULT_SIGBUS
            vma.resv.pop(hindex, None)
            head = got
            anon_vma_prepare(mm, vma)
            pm.set_flags_bulk(np.arange(head, head + ppm, dtype=np.int64),
                              PG_ANON | PG_ANON_EXCLUSIVE)
            bits = _P | _Y | ((_W | _D) if write else 0)
        pm.add_mapcount(np.arange(head, head + ppm, dtype=np.int64), 1)
        mm.pt.pmd[idx] = (head << PFN_SHIFT) | bits
        return VM_FAULT_OK
    if leaf & PTE_MIGRATION:
        yield MIGRATION_WAIT
        return VM_FAULT_RETRY
    if write and not leaf & _W:
        head = leaf >> PFN_SHIFT
        if vma.flags & VM_SHARED or pm._flags[head - RAM_BASE_PFN] & PG_ANON_EXCLUSIVE:
            mm.pt.pmd[idx] = leaf | _W | _D | _Y
            return VM_FAULT_OK
        # hugetlb_wp copy of a page-cache page in a private mapping
        new = pm.alloc_hugetlb(reserved=False)
        if new is None:
            return VM_FAULT_SIGBUS
        rng = yield from invalidate_range_start_op(mm, haddr, haddr + pg.pmd_size,
                                                   NotifierEvent.CLEAR)
        for k in range(ppm):
            pm.copy_page(new + k, head + k)
        pfns_new = np.arange(new, new + ppm, dtype=np.int64)
        pm.set_flags_bulk(pfns_new, PG_ANON | PG_ANON_EXCLUSIVE)
        pm.add_mapcount(pfns_new, 1)
        mm.pt.pmd[idx] = (new << PFN_SHIFT) | _P | _W | _D | _Y
        yield from invalidate_range_end_op(mm, rng)
        pm.add_mapcount(np.arange(head, head + ppm, dtype=np.int64), -1)
        pm.put_page(head)
        return VM_FAULT_OK
    mm.pt.pmd[idx] = leaf | _Y | (_D if write else 0)
    return VM_FAULT_OK


def hugetlb_vm_op_split(vmas: list[Vma], start: int, end: int, call: str) -> None:
    """``hugetlb_vm_op_split``: a hugetlb VMA can only be cut at huge page boundaries."""
    first, last = vmas[0], vmas[-1]
    if first.start < start and first.is_hugetlb() and start % first.pg.pmd_size:
        raise KernelError("EINVAL", call, "splitting a hugetlb VMA inside a huge page")
    if last.end > end and last.is_hugetlb() and end % last.pg.pmd_size:
        raise KernelError("EINVAL", call, "splitting a hugetlb VMA inside a huge page")
