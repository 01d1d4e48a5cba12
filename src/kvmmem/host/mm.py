"""The address space: ``struct mm_struct`` with its VMAs, page table and notifiers.

:class:`Mm` is the public face of one process address space: the state and
VMA lookups of :class:`~kvmmem.host.mm_types.MmStruct`, plus one thin method
per operation.  The operations themselves are free functions taking the mm
first, each in the module named after the kernel file it mirrors:

==========================  =====================================================
``mm_types``                the state, ``find_vma`` / ``vma_lookup``, VM_FAULT_*
``vma_tree``                ``mm/vma.c``: link, ``__split_vma``, ``vma_merge``
``memory``                  ``mm/memory.c``: ``handle_mm_fault``, zap, page tables
``huge_memory``             ``mm/huge_memory.c``: THP faults and splitting
``hugetlb``                 ``mm/hugetlb.c``: the hugetlb fault
``uaccess``                 userspace loads and stores (``do_user_addr_fault``)
``mmap``                    ``mm/mmap.c``: mmap, munmap, ``exit_mmap``
``mprotect``                ``mm/mprotect.c``
``madvise``                 ``mm/madvise.c``
``mremap``                  ``mm/mremap.c``
``truncate``                ``mm/truncate.c``: ftruncate, hole punching
``migrate``, ``rmap``       ``mm/migrate.c``, ``mm/rmap.c``, the young notifiers
``memfd``                   ``memfd_create`` and the other files a process maps
``gup``                     ``mm/gup.c``: what KVM uses to turn an hva into a pfn
==========================  =====================================================

Every operation that changes the address space is written once, as a
generator (``*_op``) that yields :mod:`kvmmem.sync` pauses at the kernel's
synchronisation points; the plain method of the same name drives it to
completion (``mm.munmap(a, n) == drive(mm.munmap_op(a, n))``).  Inside an
operation that removes or downgrades host PTEs the order is the kernel's::

    acquire mmap_lock -> [point mmu_notifier_start] invalidate_range_start
    (each subscriber) -> PTE change -> [point pte_changed] ->
    invalidate_range_end (each subscriber) -> frames freed -> release mmap_lock

A call that fails raises :class:`~kvmmem.errors.KernelError` with the
kernel's errno name before changing anything -- except where the kernel
itself applies part of a request and then reports the error (mprotect and
madvise over a hole or onto a VMA that refuses the request: the VMAs before
it are changed, see ``do_mprotect_pkey`` and ``madvise_walk_vmas``).

Wrong Python types (a non-int address, a bool length, a non-File file) raise
:class:`~kvmmem.errors.ArgumentError`: a KernelError EINVAL (EBADF for the
file) that is also an InputError, and nothing changes.  Other API misuse (an
unknown mapping kind, a fill byte out of range) is an
:class:`~kvmmem.errors.InputError`.  Negative ints are read as the ``unsigned
long`` the syscall would receive.
"""

from __future__ import annotations

from typing import Any

from kvmmem.errors import KernelError
from kvmmem.host import (
    gup,
    huge_memory,
    madvise,
    memfd,
    memory,
    migrate,
    mmap,
    mprotect,
    mremap,
    rmap,
    truncate,
    uaccess,
)
from kvmmem.host.args import ulong_arg
from kvmmem.host.file import File
from kvmmem.host.madvise import MADVICE
from kvmmem.host.mm_types import (
    DEFAULT_MAX_MAP_COUNT,
    MMAP_BASE,
    MMAP_MIN_ADDR,
    TASK_SIZE,
    VM_FAULT_ERROR,
    VM_FAULT_HWPOISON,
    VM_FAULT_OK,
    VM_FAULT_OOM,
    VM_FAULT_RETRY,
    VM_FAULT_SIGBUS,
    VM_FAULT_SIGSEGV,
    HostSignal,
    MmStruct,
)
from kvmmem.host.notifier import MmuNotifier
from kvmmem.host.pagetable import PTE_MIGRATION, HostPte, decode
from kvmmem.host.pagetable import mapping_size as pt_mapping_size
from kvmmem.host.vma import Vma, VmaKind
from kvmmem.sync import Op
from kvmmem.types import Hva, Pfn

__all__ = [
    "DEFAULT_MAX_MAP_COUNT",
    "MADVICE",
    "MMAP_BASE",
    "MMAP_MIN_ADDR",
    "TASK_SIZE",
    "VM_FAULT_ERROR",
    "VM_FAULT_HWPOISON",
    "VM_FAULT_OK",
    "VM_FAULT_OOM",
    "VM_FAULT_RETRY",
    "VM_FAULT_SIGBUS",
    "VM_FAULT_SIGSEGV",
    "HostSignal",
    "Mm",
]


class Mm(MmStruct):
    """One process address space: VMAs, host page table, MMU-notifier subscribers.

    ``physmem`` is shared by every address space of a host (a fresh one is made
    when omitted).  ``thp`` is ``/sys/kernel/mm/transparent_hugepage/enabled``
    (this host: ``"madvise"``).  Each method below runs the free function of
    the same kernel name on this mm."""

    # --- files ------------------------------------------------------------------

    def memfd_create(self, name: str, size: int, *, hugetlb: bool = False) -> File:
        """:func:`kvmmem.host.memfd.memfd_create` for this process."""
        return memfd.memfd_create(self, name, size, hugetlb=hugetlb)

    def open_file(
        self, name: str, size: int, *, writable: bool = True, fill: int | None = None
    ) -> File:
        """:func:`kvmmem.host.memfd.open_file` for this process."""
        return memfd.open_file(self, name, size, writable=writable, fill=fill)

    def open_device(self, name: str, npages: int, *, lazy: bool = False,
                    cacheable: bool = False) -> File:
        """:func:`kvmmem.host.memfd.open_device` for this process."""
        return memfd.open_device(self, name, npages, lazy=lazy, cacheable=cacheable)

    def open_vfio_bar(self, name: str, size: int) -> File:
        """:func:`kvmmem.host.memfd.open_vfio_bar` for this process."""
        return memfd.open_vfio_bar(self, name, size)

    def create_dmabuf(self, name: str, size: int) -> File:
        """:func:`kvmmem.host.memfd.create_dmabuf` for this process."""
        return memfd.create_dmabuf(self, name, size)

    # --- notifiers --------------------------------------------------------------

    def mmu_notifier_register(self, sub: MmuNotifier) -> None:
        """``mmu_notifier_register()``: ``sub`` gets every later invalidation of this mm."""
        if self.closed:
            raise KernelError("ESRCH", "mmu_notifier_register", "mm already torn down")
        self.notifiers.register(sub)

    def mmu_notifier_unregister(self, sub: MmuNotifier) -> None:
        """``mmu_notifier_unregister()``: calls ``sub.release()`` if the mm is still alive."""
        if self.notifiers.unregister(sub):
            sub.release()

    # --- the host page table ----------------------------------------------------

    def host_pte(self, hva: int) -> HostPte | None:
        """The host page-table entry mapping ``hva`` (None when none is present).

        ``pfn`` is the frame behind ``hva`` (the subpage inside a PMD leaf;
        ``leaf_pfn`` is the leaf's first frame).  Migration entries are not
        present; PROT_NONE entries are, with ``protnone`` set."""
        e, huge = self.pt.entry(ulong_arg(hva, "host_pte: hva"))
        if not e or e & PTE_MIGRATION:
            return None
        return decode(e, hva, huge, self.pg)

    def host_mapping_size(self, hva: int) -> int:
        """``host_pfn_mapping_level`` as bytes: ``PMD_SIZE`` for a huge leaf, ``PAGE_SIZE``
        for a PTE, 0 if none."""
        return pt_mapping_size(self.pt, ulong_arg(hva, "host_mapping_size: hva"))

    def mapping_size(self, addr: int) -> int:
        """:meth:`host_mapping_size` of an address already checked (KVM's
        ``host_pfn_mapping_level`` on a slot's hva)."""
        return pt_mapping_size(self.pt, addr)

    # --- faults and userspace accesses ------------------------------------------

    def handle_mm_fault_op(self, vma: Vma, hva: int, write: bool) -> Op[int]:
        """:func:`kvmmem.host.memory.handle_mm_fault_op` on this mm."""
        return memory.handle_mm_fault_op(self, vma, hva, write)

    def fault_in_op(self, addr: int, write: bool) -> Op[int | str]:
        """:func:`kvmmem.host.uaccess.fault_in_op` on this mm."""
        return uaccess.fault_in_op(self, addr, write)

    def host_read_op(self, hva: int, size: int) -> Op[int]:
        """:func:`kvmmem.host.uaccess.host_read_op`: a userspace load."""
        return uaccess.host_read_op(self, hva, size)

    def host_write_op(self, hva: int, size: int, value: int) -> Op[None]:
        """:func:`kvmmem.host.uaccess.host_write_op`: a userspace store."""
        return uaccess.host_write_op(self, hva, size, value)

    def host_read(self, hva: int, size: int) -> int:
        """Sequential :meth:`host_read_op`."""
        return uaccess.host_read(self, hva, size)

    def host_write(self, hva: int, size: int, value: int) -> None:
        """Sequential :meth:`host_write_op`."""
        uaccess.host_write(self, hva, size, value)

    def host_read_bytes(self, hva: int, size: int) -> bytes:
        """A userspace load of ``size`` bytes as bytes (same faults as host_read)."""
        return uaccess.host_read_bytes(self, hva, size)

    # --- mmap, munmap -------------------------------------------------------------

    def get_unmapped_area(
        self, length: int, *, hint: int = 0, align: int | None = None
    ) -> int | None:
        """:func:`kvmmem.host.mmap.get_unmapped_area` on this mm."""
        return mmap.get_unmapped_area(self, length, hint=hint, align=align)

    def mmap_op(
        self,
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
        """``mmap(2)``: :func:`kvmmem.host.mmap.mmap_op`."""
        return mmap.mmap_op(self, length, prot, kind, addr=addr, fixed=fixed,
                            noreplace=noreplace, file=file, offset=offset, fill=fill,
                            populate=populate, noreserve=noreserve)

    def mmap(self, length: int, prot: int, kind: VmaKind | str, **kw: Any) -> Hva:
        """Sequential :meth:`mmap_op` (same keyword arguments)."""
        return mmap.mmap(self, length, prot, kind, **kw)

    def munmap_op(self, addr: int, length: int) -> Op[None]:
        """``munmap(2)``: :func:`kvmmem.host.mmap.munmap_op`."""
        return mmap.munmap_op(self, addr, length)

    def munmap(self, addr: int, length: int) -> None:
        """Sequential :meth:`munmap_op`."""
        mmap.munmap(self, addr, length)

    # --- mprotect, madvise, ftruncate, mremap ---------------------------------------

    def mprotect_op(self, addr: int, length: int, prot: int) -> Op[None]:
        """``mprotect(2)``: :func:`kvmmem.host.mprotect.mprotect_op`."""
        return mprotect.mprotect_op(self, addr, length, prot)

    def mprotect(self, addr: int, length: int, prot: int) -> None:
        """Sequential :meth:`mprotect_op`."""
        mprotect.mprotect(self, addr, length, prot)

    def madvise_op(self, addr: int, length: int, advice: str | int) -> Op[None]:
        """``madvise(2)``: :func:`kvmmem.host.madvise.madvise_op`."""
        return madvise.madvise_op(self, addr, length, advice)

    def madvise(self, addr: int, length: int, advice: str | int) -> None:
        """Sequential :meth:`madvise_op`."""
        madvise.madvise(self, addr, length, advice)

    def ftruncate_op(self, file: File, size: int) -> Op[None]:
        """``ftruncate(2)``: :func:`kvmmem.host.truncate.ftruncate_op`."""
        return truncate.ftruncate_op(self, file, size)

    def ftruncate(self, file: File, size: int) -> None:
        """Sequential :meth:`ftruncate_op`."""
        truncate.ftruncate(self, file, size)

    def mremap_op(
        self, old_addr: int, old_len: int, new_len: int, *, maymove: bool = False,
        fixed_addr: int | None = None,
    ) -> Op[Hva]:
        """``mremap(2)``: :func:`kvmmem.host.mremap.mremap_op`."""
        return mremap.mremap_op(self, old_addr, old_len, new_len, maymove=maymove,
                                fixed_addr=fixed_addr)

    def mremap(self, old_addr: int, old_len: int, new_len: int, *, maymove: bool = False,
               fixed_addr: int | None = None) -> Hva:
        """Sequential :meth:`mremap_op`."""
        return mremap.mremap(self, old_addr, old_len, new_len, maymove=maymove,
                             fixed_addr=fixed_addr)

    # --- THP split, migration, aging ------------------------------------------------

    def split_huge_pmd_op(self, hva: int) -> Op[None]:
        """:func:`kvmmem.host.huge_memory.split_huge_pmd_hva_op` on this mm."""
        return huge_memory.split_huge_pmd_hva_op(self, hva)

    def split_huge_pmd(self, hva: int) -> None:
        """Sequential :meth:`split_huge_pmd_op`."""
        huge_memory.split_huge_pmd_hva(self, hva)

    def migrate_op(self, hva: int) -> Op[Pfn]:
        """:func:`kvmmem.host.migrate.migrate_op` on this mm."""
        return migrate.migrate_op(self, hva)

    def migrate(self, hva: int) -> Pfn:
        """Sequential :meth:`migrate_op`."""
        return migrate.migrate(self, hva)

    def clear_young(self, start: int, end: int) -> bool:
        """:func:`kvmmem.host.rmap.clear_young` on this mm."""
        return rmap.clear_young(self, start, end)

    def clear_flush_young(self, start: int, end: int) -> bool:
        """:func:`kvmmem.host.rmap.clear_flush_young` on this mm."""
        return rmap.clear_flush_young(self, start, end)

    def test_young(self, start: int, end: int) -> bool:
        """:func:`kvmmem.host.rmap.test_young` on this mm."""
        return rmap.test_young(self, start, end)

    # --- what KVM uses (mm/gup.c) -------------------------------------------------------

    def get_user_page_fast_only(self, hva: int, write: bool) -> Pfn | None:
        """:func:`kvmmem.host.gup.get_user_page_fast_only` on this mm."""
        return gup.get_user_page_fast_only(self, hva, write)

    def get_user_pages_op(self, hva: int, write: bool) -> Op[Pfn]:
        """:func:`kvmmem.host.gup.get_user_pages_op` on this mm."""
        return gup.get_user_pages_op(self, hva, write)

    def get_user_pages(self, hva: int, write: bool) -> Pfn:
        """Sequential :meth:`get_user_pages_op`."""
        return gup.get_user_pages(self, hva, write)

    def follow_pfnmap(self, hva: int) -> tuple[Pfn, bool] | None:
        """:func:`kvmmem.host.gup.follow_pfnmap` on this mm."""
        return gup.follow_pfnmap(self, hva)

    def fixup_user_fault_op(self, hva: int, write: bool) -> Op[None]:
        """:func:`kvmmem.host.gup.fixup_user_fault_op` on this mm (caller holds mmap_lock)."""
        return gup.fixup_user_fault_op(self, hva, write)

    def fixup_user_fault(self, hva: int, write: bool) -> None:
        """Sequential :meth:`fixup_user_fault_op`."""
        gup.fixup_user_fault(self, hva, write)

    # --- exit_mmap ----------------------------------------------------------------------

    def close_op(self) -> Op[None]:
        """:func:`kvmmem.host.mmap.exit_mmap_op` on this mm."""
        return mmap.exit_mmap_op(self)

    def close(self) -> None:
        """Sequential :meth:`close_op`."""
        mmap.exit_mmap(self)
