"""``mmap(2)``, ``munmap(2)`` and ``exit_mmap`` (``mm/mmap.c``, ``mm/vma.c``):
placement (``get_unmapped_area``), the checks of ``do_mmap``, MAP_FIXED
replacement, MAP_POPULATE, removing a range and tearing the mm down."""

from __future__ import annotations

from typing import Any

import numpy as np

from kvmmem.errors import ArgumentError, InputError, KernelError
from kvmmem.host.args import ULONG_MAX, bool_arg, page_align, ulong_arg
from kvmmem.host.file import File, FileKind
from kvmmem.host.huge_memory import split_huge_pmd_address_op, thp_suitable
from kvmmem.host.hugetlb import hugetlb_vm_op_split
from kvmmem.host.memfd import create_dmabuf, memfd_create, open_device, open_file, open_vfio_bar
from kvmmem.host.memory import free_pgtables, remap_pfn_range, tlb_finish_mmu, zap_page_range_op
from kvmmem.host.mm_types import (
    MMAP_MIN_ADDR,
    MMAP_READ_LOCK,
    MMAP_READ_UNLOCK,
    MMAP_WRITE_LOCK,
    MMAP_WRITE_UNLOCK,
    TASK_SIZE,
    HostSignal,
    MmStruct,
    invalidate_range_end_op,
    invalidate_range_start_op,
    mm_changing,
)
from kvmmem.host.notifier import NotifierEvent
from kvmmem.host.pagetable import (
    PFN_SHIFT,
    PTE_DIRTY,
    PTE_PRESENT,
    PTE_SPECIAL,
    PTE_WRITE,
    PTE_YOUNG,
)
from kvmmem.host.physmem import PG_ANON, PG_ANON_EXCLUSIVE, RAM_BASE_PFN
from kvmmem.host.rmap import anon_vma_prepare
from kvmmem.host.uaccess import fault_in_op
from kvmmem.host.vfio import vfio_pci_core_mmap, vfio_region_pgoff
from kvmmem.host.vma import (
    PROT_WRITE,
    VM_ACCESS_FLAGS,
    VM_ACCOUNT,
    VM_ALLOW_ANY_UNCACHED,
    VM_DONTDUMP,
    VM_DONTEXPAND,
    VM_HUGEPAGE,
    VM_HUGETLB,
    VM_IO,
    VM_MAYEXEC,
    VM_MAYREAD,
    VM_MAYSHARE,
    VM_MAYWRITE,
    VM_MTE_ALLOWED,
    VM_NORESERVE,
    VM_PFNMAP,
    VM_SHARED,
    VM_WRITE,
    Vma,
    VmaKind,
    calc_vm_prot_bits,
)
from kvmmem.host.vma_tree import split_vma, vma_link, vma_merge, vma_unlink
from kvmmem.sync import Op, drive
from kvmmem.types import Hva, format_size

_P, _W, _D, _Y, _S = PTE_PRESENT, PTE_WRITE, PTE_DIRTY, PTE_YOUNG, PTE_SPECIAL

_MAX_LFS_FILESIZE = (1 << 63) - 1


def unmapped_area_topdown(mm: MmStruct, length: int, align: int) -> int | None:
    """``unmapped_area_topdown``: the highest free gap below mmap_base fitting ``length``.

    The kernel finds it in O(log n) with the maple tree's gap tracking; the
    model keeps the pre-v3.x ``free_area_cache`` / ``cached_hole_size`` pair
    (search downward from the last allocation unless a skipped hole could
    fit), which yields the same address."""
    start = mm.free_area_cache
    if length <= mm.cached_hole_size or start > mm.mmap_base:
        start = mm.mmap_base
        mm.cached_hole_size = 0
    got = _scan_down(mm, start, length, align)
    if got is None and start != mm.mmap_base:
        mm.cached_hole_size = 0
        got = _scan_down(mm, mm.mmap_base, length, align)
    if got is not None:
        mm.free_area_cache = got
    return got


def _scan_down(mm: MmStruct, start: int, length: int, align: int) -> int | None:
    """Walk the gaps from the one holding ``start`` downward; first fit wins."""
    vmas = mm.mm_mt
    i = vmas.bisect_left(start)
    high = mm.mmap_base
    if i < len(vmas):
        high = min(high, vmas.peekitem(i)[1].start)
    # a VMA may straddle the start point
    if i and vmas.peekitem(i - 1)[1].end > high:
        high = vmas.peekitem(i - 1)[1].start
        i -= 1
    while True:
        low = vmas.peekitem(i - 1)[1].end if i else MMAP_MIN_ADDR
        low = max(low, MMAP_MIN_ADDR)
        if high - low >= length:
            addr = (high - length) & ~(align - 1)
            if addr >= low:
                # alignment may leave free space above the new mapping
                left = high - (addr + length)
                mm.cached_hole_size = max(mm.cached_hole_size, left)
                return addr
        if high > low:
            mm.cached_hole_size = max(mm.cached_hole_size, high - low)
        if not i:
            return None
        high = vmas.peekitem(i - 1)[1].start
        i -= 1


def arch_unmap_area(mm: MmStruct, end: int) -> None:
    """``arch_unmap_area_topdown``: a gap now ends at (or after) ``end``."""
    if end > mm.free_area_cache:
        nxt = mm.find_vma(end)
        mm.free_area_cache = min(mm.mmap_base, nxt.start if nxt else mm.mmap_base)


def get_unmapped_area(
    mm: MmStruct, length: int, *, hint: int = 0, align: int | None = None
) -> int | None:
    """``arch_get_unmapped_area_topdown``: use ``hint`` (rounded up) if free, else top-down.
    ``align`` defaults to the page size."""
    if align is None:
        align = mm.page_size
    if hint:
        hint = page_align(hint, mm.page_size)
        if hint & (align - 1) == 0 and hint <= TASK_SIZE - length and not mm.vmas_in(
            hint, hint + length
        ):
            return hint
    return unmapped_area_topdown(mm, length, align)


def mmap_op(
    mm: MmStruct,
    length: int,
    prot: int,
    kind: VmaKind | str,
    *,
    addr: int | None = None,
    fixed: bool = False,
    noreplace: bool = False,
    file: File | None = None,
    offset: int = 0,
    fill: int | None = None,
    populate: bool = False,
    noreserve: bool = False,
) -> Op[Hva]:
    """``mmap(2)`` (``do_mmap`` -> ``__mmap_region``); returns the address mapped.

    ``kind`` picks the mapping (see :class:`VmaKind`); memfd/file/
    file-shared/hugetlb/device map ``file`` (None: a fresh file of
    ``length``).  ``fixed`` is MAP_FIXED (replaces what was there, notifying
    MMU_NOTIFY_UNMAP for the range), ``noreplace`` MAP_FIXED_NOREPLACE.
    ``fill`` makes userspace store that byte everywhere right after the
    mmap (the mapping must be writable; a store beyond EOF raises HostSignal
    SIGBUS after the mapping was made, as the process would get it);
    ``populate`` is MAP_POPULATE (stops silently where a fault would fail);
    ``noreserve`` MAP_NORESERVE.

    Raises KernelError: EINVAL (length 0, unaligned offset or fixed
    address, hugetlb alignment), ENOMEM (no room, beyond TASK_SIZE,
    hugetlb pool short, too many VMAs), EEXIST (noreplace overlap),
    EACCES (PROT_WRITE shared mapping of a read-only file)."""
    # --- argument checks (the syscall, before mmap_lock) ---
    vkind = VmaKind.parse(kind)
    length = ulong_arg(length, "mmap: length")
    prot = ulong_arg(prot, "mmap: prot")
    a = 0 if addr is None else ulong_arg(addr, "mmap: addr")
    fixed = bool_arg(fixed, "mmap: fixed")
    noreplace = bool_arg(noreplace, "mmap: noreplace")
    populate = bool_arg(populate, "mmap: populate")
    noreserve = bool_arg(noreserve, "mmap: noreserve")
    offset = ulong_arg(offset, "mmap: offset")
    if fill is not None and (not isinstance(fill, int) or isinstance(fill, bool)
                             or not 0 <= fill <= 255):
        raise InputError(f"mmap: fill must be a byte 0..255, got {fill!r}")
    if file is not None and not isinstance(file, File):
        raise ArgumentError("mmap: file", f"expected a File, got {file!r}", "EBADF")
    if fill is not None and not prot & PROT_WRITE:
        raise InputError("mmap: fill needs PROT_WRITE (userspace cannot store into a "
                         "read-only mapping: map rw, fill, then mprotect)")
    file = _mmap_file_arg(vkind, file)
    call = f"mmap({a:#x}, {length:#x}, {vkind.value})"
    pg = mm.pg
    huge = format_size(pg.pmd_size)
    if offset & (pg.page_size - 1):
        raise KernelError("EINVAL", call, "offset not page aligned")
    if vkind is VmaKind.HUGETLB and file is None:
        length = (length + pg.pmd_size - 1) & pg.hpage_mask & ULONG_MAX  # ksys_mmap_pgoff
    if length == 0:
        raise KernelError("EINVAL", call, "length 0")
    length = page_align(length, pg.page_size)
    if length == 0 or length > TASK_SIZE:
        raise KernelError("ENOMEM", call, "length too large")
    if vkind is VmaKind.VFIO_BAR and file is None and length & (length - 1):
        raise InputError(f"mmap: kind vfio-bar maps a whole PCI BAR, whose size is a power "
                         f"of two, not {length:#x}")
    pgoff = offset >> pg.page_shift
    if pgoff + (length >> pg.page_shift) > ULONG_MAX:
        raise KernelError("EOVERFLOW", call, "offset + length overflows")
    hugetlb = vkind is VmaKind.HUGETLB
    if hugetlb and file is not None and length % pg.pmd_size:
        raise KernelError("EINVAL", call, f"hugetlbfs length not {huge} aligned")
    if hugetlb and pgoff % pg.pages_per_pmd:
        raise KernelError("EINVAL", call, f"hugetlbfs offset not {huge} aligned")
    if fixed or noreplace:
        if a & (pg.page_size - 1):
            raise KernelError("EINVAL", call, "fixed address not page aligned")
        if a == 0 or a > TASK_SIZE - length:
            raise KernelError("ENOMEM", call, "fixed range outside the address space")
        if hugetlb and a % pg.pmd_size:
            raise KernelError("EINVAL", call, f"hugetlb address not {huge} aligned")

    yield MMAP_WRITE_LOCK
    try:
        start, flags = _mmap_checks(mm, vkind, file, length, prot, a, fixed, noreplace,
                                         noreserve, pgoff, call)
    except KernelError:
        yield MMAP_WRITE_UNLOCK
        raise
    end = start + length

    # --- MAP_FIXED: take out what was there (vms_gather_munmap_vmas + vms_clean_up_area)
    old = mm.vmas_in(start, end)
    if old:
        with mm_changing(mm, (start, end)):
            yield from detach_range_op(mm, start, end, old)

    # --- the new VMA (__mmap_new_vma)
    if file is None and vkind in (VmaKind.MEMFD, VmaKind.FILE, VmaKind.FILE_SHARED,
                                  VmaKind.HUGETLB, VmaKind.DEVICE, VmaKind.DEVICE_LAZY,
                                  VmaKind.DMABUF, VmaKind.VFIO_BAR, VmaKind.DEVICE_CACHEABLE):
        file = _anon_file(mm, vkind, length)
    if vkind in (VmaKind.ANON, VmaKind.THP):
        pgoff = start >> pg.page_shift  # do_mmap: anonymous vm_pgoff is the address
    if vkind is VmaKind.VFIO_BAR:
        pgoff += vfio_region_pgoff(pg)  # the VMM mmaps the region's file offset
    vma = Vma(start, end, flags, vkind, file, pgoff, pg=pg)
    if hugetlb and not flags & VM_NORESERVE:
        first = pgoff >> (pg.pmd_shift - pg.page_shift)
        keys = range(first, first + (length >> pg.pmd_shift))
        if flags & VM_MAYSHARE and file is not None:
            for k in keys:
                if k not in file.cache:
                    file.resv[k] = None
        else:
            vma.resv = dict.fromkeys(keys)
    vma_link(mm, vma)
    if vkind in (VmaKind.DEVICE, VmaKind.DEVICE_CACHEABLE):
        # remap_pfn_range (DEVICE_CACHEABLE: nvgrace_gpu_mmap's usemem region, v6.9,
        # which also sets vm_pgoff to the start pfn)
        remap_pfn_range(mm, vma)
    elif vkind is VmaKind.VFIO_BAR:
        vfio_pci_core_mmap(mm, vma)
    vma = vma_merge(mm, vma)
    yield MMAP_WRITE_UNLOCK

    if populate or fill is not None:
        yield from populate_op(mm, start, end, fill)
    return Hva(start)


def _mmap_file_arg(kind: VmaKind, file: File | None) -> File | None:
    if file is None:
        return None
    fk = file.kind
    ok = {
        VmaKind.ANON: (),
        VmaKind.THP: (),
        VmaKind.MEMFD: (FileKind.SHMEM,),
        VmaKind.FILE: (FileKind.SHMEM, FileKind.REGULAR),
        VmaKind.FILE_SHARED: (FileKind.SHMEM, FileKind.REGULAR),
        VmaKind.HUGETLB: (FileKind.HUGETLBFS,),
        VmaKind.DEVICE: (FileKind.DEVICE,),
        VmaKind.DEVICE_LAZY: (FileKind.DEVICE,),
        VmaKind.DMABUF: (FileKind.SHMEM,),
        VmaKind.GUEST_MEMFD: (FileKind.GUEST_MEMFD,),
        VmaKind.VFIO_BAR: (FileKind.DEVICE,),
        VmaKind.DEVICE_CACHEABLE: (FileKind.DEVICE,),
    }[kind]
    if fk not in ok or (kind is VmaKind.DMABUF) != file.dmabuf \
            or (kind is VmaKind.VFIO_BAR) != file.vfio_bar:
        what = "a dma-buf" if file.dmabuf else "a vfio-pci BAR" if file.vfio_bar \
            else f"a {fk.value} file"
        raise InputError(f"mmap: kind {kind.value} cannot map {what}")
    if kind is VmaKind.DEVICE_CACHEABLE and (file.device_lazy or not
                                             file.physmem.is_cacheable_device(
                                                 file.device_base)):
        raise InputError("mmap: kind device-cacheable needs a device opened with "
                         "cacheable=True, lazy=False")
    if kind is VmaKind.DEVICE and file.device_lazy:
        raise InputError("mmap: kind device needs a device opened with lazy=False")
    if kind is VmaKind.DEVICE_LAZY and not file.device_lazy:
        raise InputError("mmap: kind device-lazy needs a device opened with lazy=True")
    return file


def _anon_file(mm: MmStruct, kind: VmaKind, length: int) -> File:
    if kind is VmaKind.MEMFD:
        return memfd_create(mm, f"kvmmem-{mm.ino_seq + 1}", length)
    if kind is VmaKind.HUGETLB:
        f = File(mm.physmem, mm.new_ino(), "anon_hugepage", FileKind.HUGETLBFS, length,
                 anon_hugetlb=True)
        return f
    if kind is VmaKind.DMABUF:
        return create_dmabuf(mm, f"dmabuf:kvmmem-{mm.ino_seq + 1}", length)
    if kind in (VmaKind.DEVICE, VmaKind.DEVICE_LAZY, VmaKind.DEVICE_CACHEABLE):
        return open_device(mm, f"/dev/kvmmem-bar{mm.ino_seq + 1}",
                           length >> mm.page_shift, lazy=kind is VmaKind.DEVICE_LAZY,
                           cacheable=kind is VmaKind.DEVICE_CACHEABLE)
    if kind is VmaKind.VFIO_BAR:
        return open_vfio_bar(mm, f"/dev/vfio/devices/kvmmem{mm.ino_seq + 1}", length)
    return open_file(mm, f"/tmp/kvmmem-file-{mm.ino_seq + 1}", length)


def _mmap_checks(
    mm: MmStruct, kind: VmaKind, file: File | None, length: int, prot: int, a: int,
    fixed: bool, noreplace: bool, noreserve: bool, pgoff: int, call: str,
) -> tuple[int, int]:
    """The part of ``do_mmap`` that needs the address space: placement and VM flags."""
    hugetlb = kind is VmaKind.HUGETLB
    pg = mm.pg
    if fixed or noreplace:
        start = a
        if noreplace and mm.vmas_in(start, start + length):
            raise KernelError("EEXIST", call, "MAP_FIXED_NOREPLACE over a mapping")
    else:
        align = pg.page_size
        if hugetlb or (kind in (VmaKind.ANON, VmaKind.THP) and not a
                       and length % pg.pmd_size == 0 and mm.thp != "never"):
            align = pg.pmd_size  # hugetlb_get_unmapped_area / thp_get_unmapped_area
        got = get_unmapped_area(mm, length, hint=a, align=align)
        if got is None:
            raise KernelError("ENOMEM", call, "no free range")
        start = got
    flags = calc_vm_prot_bits(prot) | VM_MAYREAD | VM_MAYWRITE | VM_MAYEXEC
    shared = kind in (VmaKind.MEMFD, VmaKind.FILE_SHARED, VmaKind.DEVICE,
                      VmaKind.DEVICE_LAZY, VmaKind.DMABUF, VmaKind.GUEST_MEMFD,
                      VmaKind.VFIO_BAR, VmaKind.DEVICE_CACHEABLE) \
        or (hugetlb and file is not None)
    if shared:
        if prot & PROT_WRITE and file is not None and not file.writable:
            raise KernelError("EACCES", call, "PROT_WRITE shared mapping of a read-only file")
        flags |= VM_SHARED | VM_MAYSHARE
        if file is not None and not file.writable:
            flags &= ~(VM_MAYWRITE | VM_SHARED)
    elif file is not None and not file.writable:
        pass  # MAP_PRIVATE of an O_RDONLY file keeps VM_MAYWRITE (COW)
    if noreserve:
        flags |= VM_NORESERVE
    if hugetlb:
        flags |= VM_HUGETLB | VM_DONTEXPAND  # hugetlbfs_file_mmap
    elif (flags & (VM_NORESERVE | VM_SHARED | VM_WRITE)) == VM_WRITE:
        flags |= VM_ACCOUNT  # accountable_mapping
    if kind is VmaKind.THP:
        flags |= VM_HUGEPAGE  # the madvise(MADV_HUGEPAGE) that defines the kind
    if kind in (VmaKind.DEVICE, VmaKind.DEVICE_LAZY, VmaKind.DEVICE_CACHEABLE,
                VmaKind.VFIO_BAR):
        # remap_pfn_range's flags; vfio_pci_core_mmap and nvgrace_gpu_mmap set the same
        # (vfio-pci since v6.9 with VM_ALLOW_ANY_UNCACHED, a39d3a966a09)
        flags |= VM_IO | VM_PFNMAP | VM_DONTEXPAND | VM_DONTDUMP
        if kind is VmaKind.VFIO_BAR and mm.vfio_allow_any_uncached:
            flags |= VM_ALLOW_ANY_UNCACHED
        if file is not None and (pgoff + (length >> pg.page_shift)) > file.npages():
            raise KernelError("EINVAL", call, "beyond the device region")
    flags |= arch_calc_vm_flag_bits(mm, kind)
    if kind is VmaKind.GUEST_MEMFD and (file is None or file.mmap_refused is not None):
        # kvm_gmem_mmap: only a guest_memfd created with GUEST_MEMFD_FLAG_MMAP
        raise KernelError("ENODEV", call, "guest_memfd without GUEST_MEMFD_FLAG_MMAP"
                          if file is not None else "kind guest_memfd needs its file")
    if kind is VmaKind.DMABUF:
        # drm_gem_shmem_mmap / udmabuf mmap: no VM_IO (the pages are RAM)
        flags |= VM_PFNMAP | VM_DONTEXPAND | VM_DONTDUMP
        if file is not None and (pgoff + (length >> pg.page_shift)) > file.npages():
            raise KernelError("EINVAL", call, "beyond the buffer")
    if kind not in (VmaKind.ANON, VmaKind.THP) and (length > _MAX_LFS_FILESIZE or
                             pgoff > (_MAX_LFS_FILESIZE - length) >> pg.page_shift):
        raise KernelError("EOVERFLOW", call, "offset + length beyond the largest file")
    if len(mm.mm_mt) > mm.max_map_count:
        raise KernelError("ENOMEM", call, "max_map_count reached")
    replaced = mm.vmas_in(start, start + length)
    if replaced:
        hugetlb_vm_op_split(replaced, start, start + length, call)
        if (replaced[0].start < start < replaced[0].end and
                replaced[-1].start < start + length < replaced[-1].end
                and len(mm.mm_mt) >= mm.max_map_count):
            raise KernelError("ENOMEM", call, "max_map_count reached")
    if hugetlb and not noreserve:
        # hugetlb_reserve_pages: the last check, so nothing needs undoing after it
        need = length >> pg.pmd_shift
        if file is not None:
            first = pgoff >> (pg.pmd_shift - pg.page_shift)
            need = sum(1 for k in range(first, first + need)
                       if k not in file.cache and k not in file.resv)
        if not mm.physmem.hugetlb_reserve(need):
            raise KernelError("ENOMEM", call, "hugetlb pool too small (nr_hugepages)")
    return start, flags


def arch_calc_vm_flag_bits(mm: MmStruct, kind: VmaKind) -> int:
    """arm64 ``arch_calc_vm_flag_bits`` (with ``shmem_mmap`` before v6.13) on a CPU with
    MTE (``system_supports_mte``): VM_MTE_ALLOWED for memory that can hold tags:
    anonymous mappings (MAP_ANONYMOUS), shmem (a memfd) and anonymous hugetlb
    (MAP_ANONYMOUS | MAP_HUGETLB: ``hugetlb_mte_allowed``, which the 5.10.y-6.12.y
    stable kernels dropped); never a regular file, a device or a dma-buf (9f3419315f3c,
    v5.10).  0 without MTE."""
    if not mm.mte:
        return 0
    if kind in (VmaKind.ANON, VmaKind.THP, VmaKind.MEMFD) \
            or (kind is VmaKind.HUGETLB and mm.hugetlb_mte_allowed):
        return VM_MTE_ALLOWED
    return 0


def detach_range_op(mm: MmStruct, start: int, end: int, vmas: list[Vma]) -> Op[None]:
    """Remove ``[start, end)`` from the address space (VMAs already known to intersect).

    ``vms_gather_munmap_vmas`` (split at the edges, detach) then
    ``vms_clear_ptes`` (one MMU_NOTIFY_UNMAP range for the request) and
    ``free_pgtables``.  The caller holds mmap_lock for write."""
    first, last = vmas[0], vmas[-1]
    if first.start < start:
        yield from split_huge_pmd_address_op(mm, start)
        upper = split_vma(mm, first, start)
        if last is first:
            last = upper
    if last.end > end:
        yield from split_huge_pmd_address_op(mm, end)
        split_vma(mm, last, end)
    detached = mm.vmas_in(start, end)
    for vma in detached:
        vma_unlink(mm, vma)
        if vma.resv:
            mm.physmem.hugetlb_unreserve(len(vma.resv))
            vma.resv = {}
    arch_unmap_area(mm, end)
    rng = yield from invalidate_range_start_op(mm, start, end, NotifierEvent.UNMAP)
    puts = yield from zap_page_range_op(mm, start, end)
    yield from invalidate_range_end_op(mm, rng)
    tlb_finish_mmu(mm, puts)
    free_pgtables(mm, start, end)


def populate_op(mm: MmStruct, start: int, end: int, fill: int | None) -> Op[None]:
    """MAP_POPULATE (``populate_vma_page_range``) and the userspace ``fill`` stores.

    Fresh private-anonymous and shmem ranges are populated in bulk; the
    rest page by page through the fault path."""
    yield MMAP_READ_LOCK
    addr = start
    pm = mm.physmem
    while addr < end:
        vma = mm.vma_lookup(addr)
        if vma is None:
            break
        stop = min(end, vma.end)
        write = fill is not None or (vma.flags & (VM_WRITE | VM_SHARED)) == VM_WRITE
        if not vma.flags & VM_ACCESS_FLAGS:
            addr = stop
            continue
        if _bulk_populate(mm, vma, addr, stop, write, fill):
            addr = stop
            continue
        step = mm.pg.pmd_size if vma.is_hugetlb() else mm.page_size
        while addr < stop:
            r = yield from fault_in_op(mm, addr, write)
            if isinstance(r, str):
                if fill is not None:  # the userspace store gets the signal
                    yield MMAP_READ_UNLOCK
                    raise HostSignal(r, addr)
                break  # populate_vma_page_range stops silently
            if fill is not None:
                if step != mm.page_size:
                    ppm = mm.pg.pages_per_pmd
                    head = r & ~(ppm - 1)
                    for k in range(ppm):
                        pm.fill(head + k, fill)
                else:
                    pm.fill(r, fill)
            addr = (addr & ~(step - 1)) + step
        addr = stop
    yield MMAP_READ_UNLOCK


def _bulk_populate(mm: MmStruct, vma: Vma, start: int, end: int, write: bool,
                   fill: int | None) -> bool:
    """Vectorised first touch of a range with no PTE tables yet (anon or shmem).

    Same end state as faulting each page in turn; returns False when the
    range does not qualify."""
    pm = mm.physmem
    if vma.is_hugetlb() or vma.is_pfnmap() or mm.pt.indices(start, end):
        return False
    anon = vma.is_anonymous()
    if anon:
        if not write or thp_suitable(mm, vma, start) or thp_suitable(mm, vma, end - 1):
            return False
    else:
        f = vma.file
        if (f is None or f.kind is not FileKind.SHMEM or not vma.flags & VM_SHARED
                or vma.pgoff_of(end - 1) >= f.npages()):
            return False
        first = vma.pgoff_of(start)
        n = (end - start) >> mm.page_shift
        if any(first <= k < first + n for k in f.cache) if len(f.cache) < n else any(
                k in f.cache for k in range(first, first + n)):
            return False
    f = vma.file
    pt = mm.pt
    n = (end - start) >> pt.page_shift
    pfns = pm.alloc_pages_bulk(n)
    if fill:
        pm.set_fill_bulk(pfns, fill)
    idx = pfns - RAM_BASE_PFN
    if anon or f is None:
        anon_vma_prepare(mm, vma)
        pm.set_flags_bulk(pfns, PG_ANON | PG_ANON_EXCLUSIVE)
        np.frombuffer(pm._map, dtype=np.int32)[idx] = 1
        bits = _P | _W | _D | _Y
    else:
        first = vma.pgoff_of(start)
        f.cache.update(zip(range(first, first + n), pfns.tolist(), strict=True))
        np.frombuffer(pm._map, dtype=np.int32)[idx] = 1
        np.frombuffer(pm._ref, dtype=np.int32)[idx] = 2  # page cache + this PTE
        bits = _P | _Y | (_W if vma.flags & VM_WRITE else 0) | (_D if write else 0)
    ents = (pfns << PFN_SHIFT) | bits
    pos = 0
    addr = start
    while addr < end:
        idx_pmd = addr >> pt.pmd_shift
        base = idx_pmd << pt.pmd_shift
        hi = min(end, base + pt.pmd_size)
        k = (hi - addr) >> pt.page_shift
        tbl = pt.new_table(idx_pmd)
        lo_i = (addr - base) >> pt.page_shift
        pt.view(tbl)[lo_i : lo_i + k] = ents[pos : pos + k]
        pos += k
        addr = hi
    return True


def mmap(mm: MmStruct, length: int, prot: int, kind: VmaKind | str, **kw: Any) -> Hva:
    """Sequential :func:`mmap_op` (same keyword arguments)."""
    return drive(mmap_op(mm, length, prot, kind, **kw))


def munmap_op(mm: MmStruct, addr: int, length: int) -> Op[None]:
    """``munmap(2)`` (``do_vmi_munmap``): unmap ``[addr, addr+length)``, splitting VMAs.

    One MMU_NOTIFY_UNMAP for the (page-aligned) range when a VMA
    intersects it; frames freed after the notifier end.  Raises
    KernelError EINVAL (unaligned, length 0, beyond TASK_SIZE, cut inside a
    hugetlb page) or ENOMEM (split beyond max_map_count)."""
    start = ulong_arg(addr, "munmap: addr")
    length = ulong_arg(length, "munmap: length")
    call = f"munmap({start:#x}, {length:#x})"
    if start & (mm.page_size - 1) or start > TASK_SIZE or length > TASK_SIZE - start:
        raise KernelError("EINVAL", call, "bad address or length")
    length = page_align(length, mm.page_size)
    if length == 0:
        raise KernelError("EINVAL", call, "length 0")
    end = start + length
    yield MMAP_WRITE_LOCK
    vmas = mm.vmas_in(start, end)
    if vmas:
        try:
            hugetlb_vm_op_split(vmas, start, end, call)
            if (vmas[0].start < start and vmas[-1].end > end
                    and len(mm.mm_mt) >= mm.max_map_count):
                raise KernelError("ENOMEM", call, "max_map_count reached")
        except KernelError:
            yield MMAP_WRITE_UNLOCK
            raise
        with mm_changing(mm, (start, end)):
            yield from detach_range_op(mm, start, end, vmas)
    yield MMAP_WRITE_UNLOCK


def munmap(mm: MmStruct, addr: int, length: int) -> None:
    """Sequential :func:`munmap_op`."""
    drive(munmap_op(mm, addr, length))


def do_munmap_op(mm: MmStruct, start: int, length: int, call: str) -> Op[None]:
    """``do_munmap`` with mmap_lock held (the checks of munmap, then the unmap)."""
    vmas = mm.vmas_in(start, start + length)
    if not vmas:
        return
    hugetlb_vm_op_split(vmas, start, start + length, call)
    yield from detach_range_op(mm, start, start + length, vmas)


def exit_mmap_op(mm: MmStruct) -> Op[None]:
    """``exit_mmap``: ``mmu_notifier_release`` (every subscriber's ``release``, then
    the list is emptied), then everything is unmapped without further notifications."""
    if mm.closed:
        return
    subs = mm.notifiers.clear()
    for sub in subs:
        sub.release()
    yield MMAP_WRITE_LOCK
    for vma in list(mm.mm_mt.values()):
        vma_unlink(mm, vma)
        if vma.resv:
            mm.physmem.hugetlb_unreserve(len(vma.resv))
            vma.resv = {}
    mm.free_area_cache = mm.mmap_base
    mm.cached_hole_size = 0
    puts = yield from zap_page_range_op(mm, 0, TASK_SIZE)
    tlb_finish_mmu(mm, puts)
    mm.pt.pmd.clear()
    mm.closed = True
    yield MMAP_WRITE_UNLOCK


def exit_mmap(mm: MmStruct) -> None:
    """Sequential :func:`exit_mmap_op`."""
    drive(exit_mmap_op(mm))
