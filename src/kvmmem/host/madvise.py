"""``madvise(2)`` (``mm/madvise.c``): the advice the model implements."""

from __future__ import annotations

from kvmmem.errors import ArgumentError, KernelError
from kvmmem.host.args import ULONG_MAX, page_align, ulong_arg
from kvmmem.host.file import FileKind
from kvmmem.host.memory import free_pgtables, tlb_finish_mmu, zap_page_range_op
from kvmmem.host.mm_types import (
    MMAP_LOCK,
    MmStruct,
    invalidate_range_end_op,
    invalidate_range_start_op,
    mm_changing,
)
from kvmmem.host.notifier import NotifierEvent
from kvmmem.host.truncate import punch_hole_op
from kvmmem.host.vma import (
    VM_HUGEPAGE,
    VM_HUGETLB,
    VM_LOCKED,
    VM_MAYWRITE,
    VM_NO_KHUGEPAGED,
    VM_NOHUGEPAGE,
    VM_PFNMAP,
    VM_SHARED,
    Vma,
)
from kvmmem.host.vma_tree import vma_modify_flags_op
from kvmmem.sync import Op, acquire, drive, release
from kvmmem.types import format_size

MADV_NORMAL = 0
MADV_WILLNEED = 3
MADV_DONTNEED = 4
MADV_REMOVE = 9
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
MADV_PAGEOUT = 21
MADVICE: dict[str, int] = {
    "normal": MADV_NORMAL,
    "willneed": MADV_WILLNEED,
    "dontneed": MADV_DONTNEED,
    "remove": MADV_REMOVE,
    "hugepage": MADV_HUGEPAGE,
    "nohugepage": MADV_NOHUGEPAGE,
    "pageout": MADV_PAGEOUT,
}
"""The madvise advice the model implements, by name (the scenario spelling)."""


def madvise_op(mm: MmStruct, addr: int, length: int, advice: str | int) -> Op[None]:
    """``madvise(2)`` (``do_madvise``): ``dontneed``, ``remove``, ``hugepage``, ``nohugepage``,
    ``pageout`` (a no-op without swap), ``willneed``, ``normal``.

    DONTNEED zaps (MMU_NOTIFY_CLEAR per VMA): private pages are dropped
    (anonymous memory reads zero again, private file mappings re-read the
    file), shared pages stay in the page cache.  REMOVE punches a hole in
    the file (every mapping of it is zapped).  Raises KernelError EINVAL
    (unaligned start, unknown advice, VM_PFNMAP/hugetlb misuse, REMOVE on
    anonymous memory), EACCES (REMOVE without a shared writable mapping),
    ENOMEM (a hole: the VMAs around it are still advised, as in the kernel)."""
    start = ulong_arg(addr, "madvise: addr")
    length = ulong_arg(length, "madvise: length")
    if isinstance(advice, bool) or not isinstance(advice, str | int):
        raise ArgumentError("madvise: advice", f"expected a name or number, got {advice!r}")
    behavior = MADVICE.get(advice, -1) if isinstance(advice, str) else advice
    call = f"madvise({start:#x}, {length:#x}, {advice!r})"
    if behavior not in MADVICE.values():
        raise KernelError("EINVAL", call, "unknown or unmodelled advice")
    if start & (mm.page_size - 1):
        raise KernelError("EINVAL", call, "address not page aligned")
    alen = page_align(length, mm.page_size)
    if length and not alen:
        raise KernelError("EINVAL", call, "length overflows")
    end = start + alen
    if end > ULONG_MAX:
        raise KernelError("EINVAL", call, "range wraps")
    if end == start:
        return
    write_lock = behavior in (MADV_HUGEPAGE, MADV_NOHUGEPAGE)
    yield acquire(MMAP_LOCK, shared=not write_lock)
    err: KernelError | None = None
    unmapped = False
    cur = start
    with mm_changing(mm, (start, end)):
        while True:
            vma = mm.find_vma(cur)
            if vma is None:
                err = KernelError("ENOMEM", call, "range not mapped")
                break
            if cur < vma.start:
                unmapped = True
                cur = vma.start
                if cur >= end:
                    break
            tmp = min(vma.end, end)
            try:
                yield from madvise_vma_behavior_op(mm, vma, cur, tmp, behavior, call)
            except KernelError as e:
                err = e
                break
            cur = tmp
            if cur >= end:
                break
    yield release(MMAP_LOCK, shared=not write_lock)
    if err is not None:
        raise err
    if unmapped:
        raise KernelError("ENOMEM", call, "part of the range is not mapped")


def madvise(mm: MmStruct, addr: int, length: int, advice: str | int) -> None:
    """Sequential :func:`madvise_op`."""
    drive(madvise_op(mm, addr, length, advice))


def madvise_vma_behavior_op(mm: MmStruct, vma: Vma, start: int, end: int, behavior: int,
                            call: str) -> Op[None]:
    """``madvise_vma_behavior``: apply ``behavior`` to ``[start, end)`` of one VMA."""
    if behavior == MADV_DONTNEED:
        if vma.flags & VM_LOCKED:
            raise KernelError("EINVAL", call, "VM_LOCKED")
        if vma.is_hugetlb():
            if not mm.hugetlb_madv_dontneed:
                # madvise_dontneed_free_valid_vma before v5.18: VM_HUGETLB is refused
                raise KernelError("EINVAL", call, "MADV_DONTNEED on hugetlb before v5.18")
            huge = vma.pg.pmd_size
            if start % huge:
                raise KernelError("EINVAL", call,
                                  f"hugetlb start not {format_size(huge)} aligned")
            end = end & ~(huge - 1)  # madvise_dontneed_free_valid_vma rounds down
            if end <= start:
                return
        elif vma.flags & VM_PFNMAP:
            raise KernelError("EINVAL", call, "MADV_DONTNEED on VM_PFNMAP")
        rng = yield from invalidate_range_start_op(mm, start, end, NotifierEvent.CLEAR)
        puts = yield from zap_page_range_op(mm, start, end)
        yield from invalidate_range_end_op(mm, rng)
        tlb_finish_mmu(mm, puts)
        free_pgtables(mm, start, end, only_empty_full=True)
    elif behavior == MADV_REMOVE:
        if vma.flags & VM_LOCKED:
            raise KernelError("EINVAL", call, "VM_LOCKED")
        f = vma.file
        if f is None:
            raise KernelError("EINVAL", call, "MADV_REMOVE needs a file mapping")
        if not (vma.flags & VM_SHARED and vma.flags & VM_MAYWRITE):
            raise KernelError("EACCES", call, "MADV_REMOVE needs a shared writable mapping")
        if f.kind is FileKind.DEVICE or f.dmabuf:
            raise KernelError("EOPNOTSUPP", call, "device files cannot punch holes")
        first = vma.pgoff_of(start)
        last = vma.pgoff_of(end - 1)
        if f.kind is FileKind.HUGETLBFS:
            # hugetlbfs_punch_hole removes whole huge pages only (partial ones are
            # zeroed in the kernel; not modelled)
            ppm = vma.pg.pages_per_pmd
            first = (first + ppm - 1) // ppm * ppm
            last = (last + 1) // ppm * ppm - 1
        yield from punch_hole_op(f, first, last)
    elif behavior in (MADV_HUGEPAGE, MADV_NOHUGEPAGE):
        flags = vma.flags
        if behavior == MADV_HUGEPAGE:
            if flags & VM_NO_KHUGEPAGED:
                return
            newflags = (flags & ~VM_NOHUGEPAGE) | VM_HUGEPAGE
        else:
            newflags = (flags & ~VM_HUGEPAGE) | VM_NOHUGEPAGE
        if newflags == flags:
            return
        huge = vma.pg.pmd_size
        if vma.is_hugetlb() and (start % huge or (end < vma.end and end % huge)):
            raise KernelError("EINVAL", call, "splitting a hugetlb VMA inside a huge page")
        yield from vma_modify_flags_op(mm, vma, start, end, newflags)
    elif behavior == MADV_PAGEOUT and vma.flags & (VM_LOCKED | VM_PFNMAP | VM_HUGETLB):
        raise KernelError("EINVAL", call, "MADV_PAGEOUT cannot reclaim this VMA")
