"""``mremap(2)`` (``mm/mremap.c``, v6.17+): shrink in place, grow in place, or move
the VMA and its page tables (``move_vma``, ``move_page_tables``)."""

from __future__ import annotations

import numpy as np

from kvmmem.errors import KernelError
from kvmmem.host.args import bool_arg, page_align, ulong_arg
from kvmmem.host.huge_memory import is_hugetlb_leaf, split_huge_pmd_op
from kvmmem.host.mm_types import (
    MMAP_WRITE_LOCK,
    MMAP_WRITE_UNLOCK,
    TASK_SIZE,
    MmStruct,
    invalidate_range_end_op,
    invalidate_range_start_op,
    mm_changing,
)
from kvmmem.host.mmap import detach_range_op, do_munmap_op, get_unmapped_area
from kvmmem.host.notifier import NotifierEvent
from kvmmem.host.pagetable import PTE_PUD, set_pte
from kvmmem.host.vma import VM_DONTEXPAND, VM_MAYSHARE, VM_PFNMAP, VM_SHARED, Vma
from kvmmem.host.vma_tree import vma_link, vma_merge
from kvmmem.sync import Op, drive
from kvmmem.types import Hva


def mremap_op(
    mm: MmStruct, old_addr: int, old_len: int, new_len: int, *, maymove: bool = False,
    fixed_addr: int | None = None,
) -> Op[Hva]:
    """``mremap(2)`` (``do_mremap``, v6.17+): shrink in place, grow in place, or move
    (MREMAP_MAYMOVE; MREMAP_FIXED when ``fixed_addr`` is given).  Returns the address.

    A move notifies MMU_NOTIFY_UNMAP on the old range while the PTEs move
    (``move_page_tables``) and again when the old range is unmapped.  A
    MREMAP_FIXED move without resize may span several VMAs and the gaps
    between them (``remap_move``, v6.17), as long as the range starts in a
    VMA.  Raises KernelError EINVAL (unaligned, new_len 0, FIXED without
    MAYMOVE, overlapping ranges, hugetlb misuse, duplicating a private
    mapping), EFAULT (no VMA at old_addr, a grown or resized-and-moved range
    spanning several VMAs, growing VM_PFNMAP/VM_DONTEXPAND), ENOMEM (cannot
    grow in place and may not move; no room)."""
    addr = ulong_arg(old_addr, "mremap: old_addr")
    old_len = ulong_arg(old_len, "mremap: old_len")
    new_len = ulong_arg(new_len, "mremap: new_len")
    maymove = bool_arg(maymove, "mremap: maymove")
    fixed = fixed_addr is not None
    new_addr = 0 if fixed_addr is None else ulong_arg(fixed_addr, "mremap: fixed_addr")
    call = f"mremap({addr:#x}, {old_len:#x}, {new_len:#x})"
    # check_mremap_params
    page_size = mm.page_size
    old_len = page_align(old_len, page_size)
    new_len = page_align(new_len, page_size)
    if addr & (page_size - 1):
        raise KernelError("EINVAL", call, "old address not page aligned")
    if not new_len:
        raise KernelError("EINVAL", call, "new length 0")
    if new_len > TASK_SIZE:
        raise KernelError("EINVAL", call, "new length beyond TASK_SIZE")
    if fixed:
        if new_addr > TASK_SIZE - new_len:
            raise KernelError("EINVAL", call, "new range outside the address space")
        if new_addr & (page_size - 1):
            raise KernelError("EINVAL", call, "new address not page aligned")
        if not maymove:
            raise KernelError("EINVAL", call, "MREMAP_FIXED without MREMAP_MAYMOVE")
        if addr + old_len > new_addr and new_addr + new_len > addr:
            raise KernelError("EINVAL", call, "old and new ranges overlap")
    yield MMAP_WRITE_LOCK
    changing = [(addr, addr + old_len)] + ([(new_addr, new_addr + new_len)] if fixed else [])
    try:
        with mm_changing(mm, *changing):
            if len(mm.mm_mt) + 4 > mm.max_map_count:
                raise KernelError("ENOMEM", call, "max_map_count headroom")
            if fixed and old_len == new_len:
                result = yield from remap_move_op(mm, addr, old_len, new_addr, call)
            else:
                vma, old_len, new_len = check_prep_vma(
                    mm.vma_lookup(addr), addr, old_len, new_len, fixed, new_addr, call)
                if fixed:
                    result = yield from mremap_to_op(mm, addr, old_len, new_len, new_addr,
                                                     call)
                else:
                    result = yield from mremap_at_op(mm, vma, addr, old_len, new_len,
                                                     maymove, call)
    except KernelError:
        yield MMAP_WRITE_UNLOCK
        raise
    yield MMAP_WRITE_UNLOCK
    return Hva(result)


def mremap(mm: MmStruct, old_addr: int, old_len: int, new_len: int, *, maymove: bool = False,
           fixed_addr: int | None = None) -> Hva:
    """Sequential :func:`mremap_op`."""
    return drive(mremap_op(mm, old_addr, old_len, new_len, maymove=maymove,
                                fixed_addr=fixed_addr))


def check_prep_vma(vma: Vma | None, addr: int, old_len: int, new_len: int,
                   fixed: bool, new_addr: int, call: str) -> tuple[Vma, int, int]:
    """``check_prep_vma``: per-VMA checks; returns the VMA and the (hugetlb-aligned)
    lengths."""
    if vma is None:
        raise KernelError("EFAULT", call, "no VMA at the old address")
    if vma.is_hugetlb():  # align_hugetlb
        huge = vma.pg.pmd_size
        old_len = (old_len + huge - 1) & ~(huge - 1)
        new_len = (new_len + huge - 1) & ~(huge - 1)
        if addr % huge or (fixed and new_addr % huge) or new_len > old_len:
            raise KernelError("EINVAL", call, "hugetlb: unaligned or growing")
    if not (new_len > old_len or fixed):
        return vma, old_len, new_len  # shrink / no-op in place: no more checks
    if not old_len and not vma.flags & (VM_SHARED | VM_MAYSHARE):
        raise KernelError("EINVAL", call, "duplicating a private mapping")
    span = new_len if old_len > new_len else old_len
    if span > vma.end - addr:
        raise KernelError("EFAULT", call, "old range spans several VMAs")
    if new_len != span and vma.flags & (VM_DONTEXPAND | VM_PFNMAP):
        raise KernelError("EFAULT", call, "VM_DONTEXPAND/VM_PFNMAP cannot grow")
    return vma, old_len, new_len


def mremap_at_op(mm: MmStruct, vma: Vma, addr: int, old_len: int, new_len: int,
                 maymove: bool, call: str) -> Op[int]:
    """``mremap_at``: no resize, shrink in place, or ``expand_vma``."""
    if old_len == new_len:
        return addr
    if old_len > new_len:
        yield from do_munmap_op(mm, addr + new_len, old_len - new_len, call)
        return addr
    delta_end = vma.end + (new_len - old_len)
    if (vma.end - addr == old_len and delta_end <= TASK_SIZE
            and not mm.vmas_in(vma.end, delta_end)):
        vma.end = Hva(delta_end)  # vma_merge_extend
        vma_merge(mm, vma)
        return addr
    if not maymove:
        raise KernelError("ENOMEM", call, "cannot grow in place without MREMAP_MAYMOVE")
    align = mm.page_size
    if vma.is_anonymous() and new_len % mm.pg.pmd_size == 0 and mm.thp != "never":
        align = mm.pg.pmd_size
    got = get_unmapped_area(mm, new_len, align=align)
    if got is None:
        raise KernelError("ENOMEM", call, "no free range to move to")
    yield from move_vma_op(mm, vma, addr, old_len, new_len, got, call)
    return got


def mremap_to_op(mm: MmStruct, addr: int, old_len: int, new_len: int, new_addr: int,
                 call: str) -> Op[int]:
    """``mremap_to``: unmap the target, shrink the source if asked, move."""
    yield from do_munmap_op(mm, new_addr, new_len, call)
    if mm.vma_lookup(addr) is None:
        raise KernelError("EFAULT", call, "source gone")
    if old_len > new_len:
        yield from do_munmap_op(mm, addr + new_len, old_len - new_len, call)
        old_len = new_len
    vma = mm.vma_lookup(addr)
    if vma is None:
        raise KernelError("EFAULT", call, "source gone")
    yield from move_vma_op(mm, vma, addr, old_len, new_len, new_addr, call)
    return new_addr


def remap_move_op(mm: MmStruct, start: int, length: int, new_addr: int, call: str) -> Op[int]:
    """``remap_move``: a MREMAP_FIXED move without resize, across every VMA in the
    range, keeping the gaps between them; the range must start inside a VMA."""
    end = start + length
    pieces = [(v.start, v.end) for v in mm.vmas_in(start, end)]
    if not pieces or pieces[0][0] > start:
        raise KernelError("EFAULT", call, "no VMA at the old address")
    result = -1
    target = new_addr
    last_end = 0
    for i, (vs, ve) in enumerate(pieces):
        sub = max(vs, start)
        sub_len = min(end, ve) - sub
        offset = vs - last_end if i else 0
        last_end = ve
        dest = target + offset
        vma = mm.vma_lookup(sub)
        check_prep_vma(vma, sub, sub_len, sub_len, True, dest, call)
        got = yield from mremap_to_op(mm, sub, sub_len, sub_len, dest, call)
        if result < 0:
            result = got
        target = got + sub_len
    return result


def move_vma_op(mm: MmStruct, vma: Vma, old_addr: int, old_len: int, new_len: int,
                new_addr: int, call: str = "mremap") -> Op[None]:
    """``move_vma``: ``copy_vma`` at the new place, ``move_page_tables``, unmap the old."""
    if len(mm.mm_mt) + 2 > mm.max_map_count:
        raise KernelError("ENOMEM", call, "max_map_count headroom")
    pg = mm.pg
    new_pgoff = vma.pgoff_of(old_addr)
    if vma.is_anonymous() and not vma.anon_vma:
        new_pgoff = new_addr >> pg.page_shift  # copy_vma: never faulted, so it may merge
    new = Vma(new_addr, new_addr + new_len, vma.flags, vma.kind, vma.file, new_pgoff,
              vma.anon_vma, pg=pg)
    if vma.resv:
        lo = new_pgoff >> (pg.pmd_shift - pg.page_shift)
        hi = lo + (old_len >> pg.pmd_shift)
        moved = [k for k in vma.resv if lo <= k < hi]
        for k in moved:
            del vma.resv[k]
        new.resv = dict.fromkeys(moved)
    vma_link(mm, new)
    if old_len:
        # move_page_tables: PTEs travel under MMU_NOTIFY_UNMAP of the old range
        rng = yield from invalidate_range_start_op(mm, old_addr, old_addr + old_len,
                                                   NotifierEvent.UNMAP)
        yield from move_page_tables_op(mm, old_addr, new_addr, old_len)
        yield from invalidate_range_end_op(mm, rng)
    vma_merge(mm, new)
    olds = mm.vmas_in(old_addr, old_addr + old_len) if old_len else []
    if olds:
        yield from detach_range_op(mm, old_addr, old_addr + old_len, olds)


def move_page_tables_op(mm: MmStruct, old: int, new: int, length: int) -> Op[None]:
    """``move_page_tables``: whole THP PMDs move when both sides are PMD aligned,
    other THPs are split first; PTEs move one by one."""
    pt = mm.pt
    pmd_shift, pmd_size, page_shift = pt.pmd_shift, pt.pmd_size, pt.page_shift
    delta = new - old
    for idx in pt.indices(old, old + length):
        slot = pt.pmd.get(idx)
        base = idx << pmd_shift
        if isinstance(slot, int):
            # a PUD leaf moves whole when its whole range moves PUD-aligned (move_pgt_entry
            # HPAGE_PUD), else it is split (cleared: special) first
            whole = pmd_size
            if slot & PTE_PUD:
                whole = mm.pg.pud_size
                base_w = base & ~(whole - 1)
            else:
                base_w = base
            if (base_w >= old and base_w + whole <= old + length
                    and (base_w + delta) % whole == 0):
                del pt.pmd[idx]
                pt.pmd[(base + delta) >> pmd_shift] = slot
                continue
            if not is_hugetlb_leaf(mm, slot):
                yield from split_huge_pmd_op(mm, idx)
    for idx in pt.indices(old, old + length):
        slot = pt.pmd.get(idx)
        if slot is None or isinstance(slot, int):
            continue
        base = idx << pmd_shift
        lo, hi = max(old, base), min(old + length, base + pmd_size)
        arr = pt.view(slot)
        for i in np.flatnonzero(arr[(lo - base) >> page_shift : (hi - base) >> page_shift]):
            src = lo + (int(i) << page_shift)
            k = (src - base) >> page_shift
            e = int(arr[k])
            arr[k] = 0
            set_pte(mm.pt, src + delta, e)
