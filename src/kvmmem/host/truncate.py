"""Truncation and hole punching (``mm/truncate.c``, ``unmap_mapping_range`` in
``mm/memory.c``, ``shmem_fallocate``): zap a file range in every mapping of the
file, in any address space, then drop the pages from the page cache."""

from __future__ import annotations

from kvmmem.errors import ArgumentError, KernelError
from kvmmem.host.file import File, FileKind
from kvmmem.host.memory import tlb_finish_mmu, zap_page_range_op
from kvmmem.host.mm_types import MmStruct, invalidate_range_end_op, invalidate_range_start_op
from kvmmem.host.notifier import NotifierEvent
from kvmmem.host.rmap import for_each_mapping
from kvmmem.sync import Op, acquire, drive, release
from kvmmem.types import format_size


def unmap_mapping_range_op(f: File, first: int, last: int | None,
                           *, even_cows: bool) -> Op[None]:
    """``unmap_mapping_range``: zap file pages ``first..last`` in every VMA mapping ``f``.

    One MMU_NOTIFY_CLEAR per VMA (``zap_page_range_single``), in ``i_mmap``
    order, whatever address space the VMA belongs to."""
    for mm, vma in list(for_each_mapping(f)):
        vba = vma.pgoff
        vea = vba + vma.npages - 1
        lo = max(first, vba)
        hi = vea if last is None else min(last, vea)
        if lo > hi:
            continue
        s: int = vma.hva_of(lo)
        e: int = vma.hva_of(hi + 1)
        if vma.is_hugetlb():
            huge = vma.pg.pmd_size
            s &= ~(huge - 1)
            e = (e + huge - 1) & ~(huge - 1)
        rng = yield from invalidate_range_start_op(mm, s, e, NotifierEvent.CLEAR)
        puts = yield from zap_page_range_op(mm, s, e, cache_only=not even_cows)
        yield from invalidate_range_end_op(mm, rng)
        tlb_finish_mmu(mm, puts)


def punch_hole_op(f: File, first: int, last: int) -> Op[None]:
    """``fallocate(PUNCH_HOLE)`` (``shmem_fallocate``, ``ext4_punch_hole``)."""
    if last < first:
        return
    yield acquire(f"i_rwsem:{f.ino}")
    yield from unmap_mapping_range_op(f, first, last, even_cows=False)
    if f.kind is FileKind.HUGETLBFS:
        ppm = f.physmem.pages_per_pmd
        f.drop_pages(first // ppm, last // ppm, hole=True)
    else:
        f.drop_pages(first, last, hole=True)
    yield release(f"i_rwsem:{f.ino}")


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def vfs_fallocate_op(f: File, mode: int, offset: int, length: int) -> Op[None]:
    """``vfs_fallocate`` of hole punching (the only mode modelled): its generic checks,
    then the file's own ``fallocate`` (:attr:`File.fallocate`, a guest_memfd's) or
    shmem's / a disk filesystem's hole punch of the whole pages in the range.

    Raises KernelError EINVAL (negative offset, length not positive), EOPNOTSUPP
    (PUNCH_HOLE without KEEP_SIZE, a device file), EFBIG (the range wraps)."""
    call = f"fallocate({mode:#x}, {offset:#x}, {length:#x})"
    if offset < 0 or length <= 0:
        raise KernelError("EINVAL", call, "negative offset or length not positive")
    if mode & FALLOC_FL_PUNCH_HOLE and not mode & FALLOC_FL_KEEP_SIZE:
        raise KernelError("EOPNOTSUPP", call, "PUNCH_HOLE needs KEEP_SIZE")
    if offset + length >= 1 << 63:
        raise KernelError("EFBIG", call, "range beyond the largest file")
    if f.fallocate is not None:
        yield from f.fallocate(mode, offset, length)
        return
    if f.kind is FileKind.DEVICE or f.dmabuf:
        raise KernelError("EOPNOTSUPP", call, "the file has no fallocate")
    if mode != FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE:
        raise ArgumentError("fallocate: mode", "only PUNCH_HOLE | KEEP_SIZE is modelled")
    unit = 1 << f.unit_shift
    if offset % unit or length % unit:
        raise ArgumentError("fallocate: range", "a partial page is zeroed, not modelled: "
                            f"punch whole {unit >> 10}K pages")
    end = min(offset + length, f.npages() << f.unit_shift)
    if end <= offset:
        return
    page_shift = f.physmem.page_shift
    yield from punch_hole_op(f, offset >> page_shift, (end >> page_shift) - 1)


def ftruncate_op(mm: MmStruct, file: File, size: int) -> Op[None]:
    """``ftruncate(2)``: shrinking unmaps pages past EOF from every mapping (even
    private COW copies, ``truncate_pagecache``: twice, as the kernel does) and
    drops them from the page cache; later accesses there are SIGBUS.

    Raises KernelError EINVAL (negative size, hugetlbfs size not a multiple of the
    huge page size) or EBADF-like InputError for a read-only or device file."""
    if not isinstance(file, File):
        raise ArgumentError("ftruncate: file", f"expected a File, got {file!r}", "EBADF")
    if not isinstance(size, int) or isinstance(size, bool):
        raise ArgumentError("ftruncate: size", f"expected an int, got {size!r}")
    call = f"ftruncate({file.name}, {size:#x})"
    if size < 0:
        raise KernelError("EINVAL", call, "negative size")
    if not file.writable:
        raise KernelError("EINVAL", call, "file not open for writing")
    if file.kind is FileKind.DEVICE:
        raise KernelError("EINVAL", call, "not a regular file")
    huge = mm.pg.pmd_size
    if file.kind is FileKind.HUGETLBFS and size % huge:
        raise KernelError("EINVAL", call, f"hugetlbfs size not {format_size(huge)} aligned")
    yield acquire(f"i_rwsem:{file.ino}")
    old = file.size
    if size < old:
        unit = 1 << file.unit_shift
        holebegin = (size + unit - 1) // unit
        first_page = holebegin * (unit >> mm.page_shift)
        yield from unmap_mapping_range_op(file, first_page, None, even_cows=True)
        file.set_size(size)
        file.drop_pages(holebegin, None, hole=False)
        yield from unmap_mapping_range_op(file, first_page, None, even_cows=True)
        if file.resv:
            stale = [k for k in file.resv if k >= holebegin]
            for k in stale:
                del file.resv[k]
            mm.physmem.hugetlb_unreserve(len(stale))
    else:
        file.size = size
    yield release(f"i_rwsem:{file.ino}")


def ftruncate(mm: MmStruct, file: File, size: int) -> None:
    """Sequential :func:`ftruncate_op`."""
    drive(ftruncate_op(mm, file, size))
