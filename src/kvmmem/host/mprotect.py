"""``mprotect(2)`` (``mm/mprotect.c``): ``do_mprotect_pkey`` -> ``mprotect_fixup``
-> ``change_protection``, with the notifier ranges ``change_pud_range`` starts."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from kvmmem.errors import KernelError
from kvmmem.host.args import ULONG_MAX, page_align, ulong_arg
from kvmmem.host.huge_memory import split_huge_pmd_op
from kvmmem.host.mm_types import (
    MMAP_WRITE_LOCK,
    MMAP_WRITE_UNLOCK,
    MmStruct,
    invalidate_range_end_op,
    invalidate_range_start_op,
    mm_changing,
)
from kvmmem.host.notifier import NotifierEvent
from kvmmem.host.pagetable import (
    PFN_SHIFT,
    PTE_DIRTY,
    PTE_MIGRATION,
    PTE_PRESENT,
    PTE_PROTNONE,
    PTE_PUD,
    PTE_SPECIAL,
    PTE_WRITE,
    PTE_YOUNG,
)
from kvmmem.host.physmem import PG_ANON_EXCLUSIVE, RAM_BASE_PFN
from kvmmem.host.vma import (
    PROT_EXEC,
    PROT_GROWSDOWN,
    PROT_GROWSUP,
    PROT_READ,
    PROT_SEM,
    PROT_WRITE,
    VM_ACCESS_FLAGS,
    VM_ACCOUNT,
    VM_EXEC,
    VM_HUGETLB,
    VM_NORESERVE,
    VM_READ,
    VM_SHARED,
    VM_WRITE,
    Vma,
    calc_vm_prot_bits,
)
from kvmmem.host.vma_tree import vma_modify_flags_op
from kvmmem.sync import Op, drive

_P, _W, _D, _Y, _S = PTE_PRESENT, PTE_WRITE, PTE_DIRTY, PTE_YOUNG, PTE_SPECIAL


def mprotect_op(mm: MmStruct, addr: int, length: int, prot: int) -> Op[None]:
    """``mprotect(2)`` (``do_mprotect_pkey`` -> ``mprotect_fixup`` -> ``change_protection``).

    Raises KernelError EINVAL (unaligned start, unknown prot bits, cut
    inside a hugetlb page), ENOMEM (a hole in the range; the VMAs before
    it were changed, as in the kernel), EACCES (a right the VMA may not
    have, e.g. PROT_WRITE on a shared mapping of a read-only file; earlier
    VMAs changed)."""
    start = ulong_arg(addr, "mprotect: addr")
    length = ulong_arg(length, "mprotect: length")
    prot = ulong_arg(prot, "mprotect: prot")
    call = f"mprotect({start:#x}, {length:#x}, {prot:#x})"
    if start & (mm.page_size - 1):
        raise KernelError("EINVAL", call, "address not page aligned")
    if not length:
        return
    length = page_align(length, mm.page_size)
    end = start + length
    if length == 0 or end > ULONG_MAX or end <= start:
        raise KernelError("ENOMEM", call, "range wraps")
    if prot & (PROT_GROWSDOWN | PROT_GROWSUP):
        raise KernelError("EINVAL", call, "no stack VMA to grow")
    if prot & ~(PROT_READ | PROT_WRITE | PROT_EXEC | PROT_SEM):
        raise KernelError("EINVAL", call, "unknown prot bits")
    yield MMAP_WRITE_LOCK
    err: KernelError | None = None
    first = mm.find_vma(start)
    if first is None or first.start >= end or first.start > start:
        err = KernelError("ENOMEM", call, "range starts in a hole")
    nstart = start
    with mm_changing(mm, (start, end)):
        while err is None and nstart < end:
            vma = mm.vma_lookup(nstart)
            if vma is None:
                err = KernelError("ENOMEM", call, "hole in the range")
                break
            newflags = calc_vm_prot_bits(prot) | (vma.flags & ~VM_ACCESS_FLAGS)
            if (newflags & ~(newflags >> 4)) & VM_ACCESS_FLAGS:
                err = KernelError("EACCES", call, "VMA may not get these rights (VM_MAY*)")
                break
            tmp = min(end, vma.end)
            huge = vma.pg.pmd_size
            if vma.is_hugetlb() and (nstart % huge or (tmp < vma.end and tmp % huge)):
                err = KernelError("EINVAL", call, "splitting a hugetlb VMA inside a huge page")
                break
            if newflags != vma.flags and (nstart > vma.start or tmp < vma.end) and (
                    len(mm.mm_mt) >= mm.max_map_count):
                err = KernelError("ENOMEM", call, "max_map_count reached")
                break
            yield from mprotect_fixup_op(mm, vma, nstart, tmp, newflags)
            nstart = tmp
    yield MMAP_WRITE_UNLOCK
    if err is not None:
        raise err


def mprotect(mm: MmStruct, addr: int, length: int, prot: int) -> None:
    """Sequential :func:`mprotect_op`."""
    drive(mprotect_op(mm, addr, length, prot))


def mprotect_fixup_op(mm: MmStruct, vma: Vma, start: int, end: int, newflags: int) -> Op[None]:
    """``mprotect_fixup``: new flags for ``[start, end)`` of ``vma``, then its PTEs."""
    old = vma.flags
    if newflags == old:
        return
    if newflags & VM_WRITE:
        if not old & (VM_ACCOUNT | VM_WRITE | VM_HUGETLB | VM_SHARED | VM_NORESERVE):
            newflags |= VM_ACCOUNT  # a private mapping becomes writable: charge it
    elif old & VM_ACCOUNT and vma.is_anonymous() and not vma.anon_vma:
        newflags &= ~VM_ACCOUNT  # never written: unaccount (v6.1+)
    vma = yield from vma_modify_flags_op(mm, vma, start, end, newflags)
    yield from change_protection_op(mm, vma, start, end)


def _notify_ranges_protection(
    mm: MmStruct, vma: Vma, start: int, end: int
) -> list[tuple[int, int]]:
    """Where ``change_pud_range`` starts MMU_NOTIFY_PROTECTION_VMA ranges.

    Per P4D chunk (512 GiB with 4 KiB pages): from the first populated PUD (1 GiB)
    to the chunk end; hugetlb (``hugetlb_change_protection``) notifies the whole
    range."""
    if vma.is_hugetlb():
        return [(start, end)]
    out: list[tuple[int, int]] = []
    p4d = 1 << mm.pg.pgdir_shift
    pud_shift = mm.pg.pud_shift
    addr = start
    while addr < end:
        chunk_end = min(end, (addr & ~(p4d - 1)) + p4d)
        pud = addr >> pud_shift
        while (pud << pud_shift) < chunk_end:
            if mm.pt.pud_populated(pud):
                out.append((max(addr, pud << pud_shift), chunk_end))
                break
            pud += 1
        addr = chunk_end
    return out


def _new_write_bits(mm: MmStruct, vma: Vma, ents: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    """Which present entries may be writable under the VMA's new flags.

    ``change_pte_range``: ``pte_modify`` with the new ``vm_page_prot``
    (writable only for shared mappings without write-notify), then
    ``can_change_pte_writable``: exclusive anonymous pages of a private
    writable VMA, dirty pages of a write-notified shared one."""
    n = len(ents)
    if not vma.flags & VM_WRITE or not vma.flags & (VM_READ | VM_WRITE | VM_EXEC):
        return np.zeros(n, dtype=bool)
    if vma.flags & VM_SHARED:
        f = vma.file
        if f is not None and f.writenotify:
            return np.asarray((ents & _D) != 0)
        return np.ones(n, dtype=bool)
    if vma.is_hugetlb():
        return np.zeros(n, dtype=bool)
    normal = (ents & _S) == 0
    out = np.zeros(n, dtype=bool)
    nm = np.flatnonzero(normal)
    if nm.size:
        flags = np.frombuffer(mm.physmem._flags, dtype=np.uint8)
        pf = ents[nm] >> PFN_SHIFT
        out[nm] = (flags[pf - RAM_BASE_PFN] & PG_ANON_EXCLUSIVE) != 0
    return out


def change_protection_op(mm: MmStruct, vma: Vma, start: int, end: int) -> Op[None]:
    """``change_protection``: rewrite the PTEs of ``[start, end)`` for the VMA's flags."""
    ranges = _notify_ranges_protection(mm, vma, start, end)
    for lo, hi in ranges:
        rng = yield from invalidate_range_start_op(mm, lo, hi, NotifierEvent.PROTECTION_VMA)
        yield from change_pte_range_op(mm, vma, lo, hi)
        yield from invalidate_range_end_op(mm, rng)


def change_pte_range_op(mm: MmStruct, vma: Vma, start: int, end: int) -> Op[None]:
    """``change_pte_range`` / ``change_huge_pmd``: rewrite the entries of ``[start, end)``
    for the VMA's flags (splitting a THP the range cuts)."""
    pt = mm.pt
    pmd_shift, pmd_size, page_shift = pt.pmd_shift, pt.pmd_size, pt.page_shift
    accessible = bool(vma.flags & VM_ACCESS_FLAGS)
    for idx in pt.indices(start, end):
        slot = pt.pmd.get(idx)
        if slot is None:
            continue
        base = idx << pmd_shift
        lo, hi = max(start, base), min(end, base + pmd_size)
        if isinstance(slot, int):
            if slot & PTE_PUD:
                # change_pud_range: a PUD leaf the range does not cover is split (a
                # special one is cleared whole); change_huge_pud rewrites a covered one
                pud_base = base & ~(mm.pg.pud_size - 1)
                if start > pud_base or end < pud_base + mm.pg.pud_size:
                    yield from split_huge_pmd_op(mm, idx)
                    continue
            if hi - lo != pmd_size and not vma.is_hugetlb():
                yield from split_huge_pmd_op(mm, idx)
                slot = pt.pmd.get(idx)
                if slot is None or isinstance(slot, int):
                    continue
            else:
                if slot & PTE_MIGRATION:
                    continue
                ents = np.array([slot], dtype=np.int64)
                if vma.is_anonymous() and not slot & _S:
                    head = slot >> PFN_SHIFT
                    excl = mm.physmem._flags[head - RAM_BASE_PFN] & PG_ANON_EXCLUSIVE
                    w = bool(excl) and bool(vma.flags & VM_WRITE) and accessible
                else:
                    w = bool(_new_write_bits(mm, vma, ents)[0]) and accessible
                new = slot & ~(_W | PTE_PROTNONE)
                if not accessible:
                    new |= PTE_PROTNONE
                if w:
                    new |= _W
                pt.pmd[idx] = new
                continue
        arr = pt.view(slot)[(lo - base) >> page_shift : (hi - base) >> page_shift]
        nzi = np.flatnonzero((arr & _P) != 0)
        if not nzi.size:
            continue
        ents = arr[nzi]
        nents = ents & ~(_W | PTE_PROTNONE)
        if not accessible:
            nents |= PTE_PROTNONE
        else:
            nents |= np.where(_new_write_bits(mm, vma, ents), _W, 0)
        arr[nzi] = nents
