"""The address space: ``struct mm_struct`` with its VMAs, page table and notifiers.

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

The function each part mirrors is named in its docstring; the kernel sources
are ``mm/mmap.c``, ``mm/vma.c``, ``mm/mprotect.c``, ``mm/mremap.c``,
``mm/madvise.c``, ``mm/memory.c``, ``mm/huge_memory.c``, ``mm/hugetlb.c``,
``mm/filemap.c``, ``mm/shmem.c``, ``mm/migrate.c`` and ``mm/rmap.c``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
from sortedcontainers import SortedDict

from kvmmem.errors import ArgumentError, InputError, KernelError, KvmmemError
from kvmmem.host import gup
from kvmmem.host.file import File, FileKind
from kvmmem.host.notifier import (
    MmuNotifier,
    MmuNotifierRange,
    MmuNotifierSubscriptions,
    NotifierEvent,
)
from kvmmem.host.pagetable import (
    PFN_SHIFT,
    PTE_DIRTY,
    PTE_MIGRATION,
    PTE_PRESENT,
    PTE_PROTNONE,
    PTE_SPECIAL,
    PTE_WRITE,
    PTE_YOUNG,
    HostPte,
    PageTable,
    decode,
)
from kvmmem.host.physmem import (
    PG_ANON,
    PG_ANON_EXCLUSIVE,
    PG_DIRTY,
    PG_HUGETLB,
    RAM_BASE_PFN,
    PhysMem,
)
from kvmmem.host.vma import (
    PROT_EXEC,
    PROT_GROWSDOWN,
    PROT_GROWSUP,
    PROT_READ,
    PROT_SEM,
    PROT_WRITE,
    VM_ACCESS_FLAGS,
    VM_ACCOUNT,
    VM_DONTDUMP,
    VM_DONTEXPAND,
    VM_EXEC,
    VM_HUGEPAGE,
    VM_HUGETLB,
    VM_IO,
    VM_LOCKED,
    VM_MAYEXEC,
    VM_MAYREAD,
    VM_MAYSHARE,
    VM_MAYWRITE,
    VM_NO_KHUGEPAGED,
    VM_NOHUGEPAGE,
    VM_NORESERVE,
    VM_PFNMAP,
    VM_READ,
    VM_SHARED,
    VM_SOFTDIRTY,
    VM_SPECIAL,
    VM_WRITE,
    Vma,
    VmaKind,
    calc_vm_prot_bits,
)
from kvmmem.sync import Op, acquire, drive, point, release
from kvmmem.types import PAGE_SHIFT, PAGE_SIZE, PAGES_PER_PMD, PMD_SIZE, Hva, Pfn

TASK_SIZE = 0x7FFFFFFFF000
"""x86-64 user address-space top with 4-level paging (``TASK_SIZE_MAX``)."""
MMAP_BASE = 0x7F0000000000
"""Where top-down placement starts (``mm->mmap_base``, without randomisation)."""
MMAP_MIN_ADDR = 0x10000
"""Lowest address top-down placement hands out (``mmap_min_addr``)."""
DEFAULT_MAX_MAP_COUNT = 65530
"""``sysctl_max_map_count`` default."""

_ULONG = (1 << 64) - 1
_MAX_LFS_FILESIZE = (1 << 63) - 1
_PAGE_MASK = ~(PAGE_SIZE - 1)
_HPAGE_MASK = ~(PMD_SIZE - 1)

# handle_mm_fault() results (the VM_FAULT_* bits that matter here)
VM_FAULT_OK = 0
VM_FAULT_OOM = 0x1
VM_FAULT_SIGBUS = 0x2
VM_FAULT_HWPOISON = 0x10
VM_FAULT_SIGSEGV = 0x40
VM_FAULT_RETRY = 0x400
VM_FAULT_ERROR = VM_FAULT_OOM | VM_FAULT_SIGBUS | VM_FAULT_HWPOISON | VM_FAULT_SIGSEGV

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

_P, _W, _D, _Y, _S = PTE_PRESENT, PTE_WRITE, PTE_DIRTY, PTE_YOUNG, PTE_SPECIAL
_MMAP_LOCK = "mmap_lock"
_LOCK_W = acquire(_MMAP_LOCK)
_UNLOCK_W = release(_MMAP_LOCK)
_LOCK_R = acquire(_MMAP_LOCK, shared=True)
_UNLOCK_R = release(_MMAP_LOCK, shared=True)
_PTE_CHANGED = point("pte_changed")
_MIGRATION_WAIT = point("migration_entry_wait")


class HostSignal(KvmmemError):
    """A userspace access got a signal: ``signal`` is ``"SIGSEGV"`` or ``"SIGBUS"``.

    ``addr`` is the faulting address (``si_addr``).  The access changed no
    memory content."""

    def __init__(self, signal: str, addr: int) -> None:
        self.signal = signal
        self.addr = Hva(addr)
        super().__init__(f"{signal} at {addr:#x}")


# --- argument checking (a wrong type -> ArgumentError, EINVAL) -------------------


def _ulong(value: object, what: str) -> int:
    """An ``unsigned long`` syscall argument: ints only, negatives wrap like C."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ArgumentError(what, f"expected an int, got {type(value).__name__} {value!r}")
    return value & _ULONG


def _flag(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise ArgumentError(what, f"expected a bool, got {value!r}")
    return value


def _page_align(n: int) -> int:
    """``PAGE_ALIGN`` on an unsigned long (wraps to 0 on overflow)."""
    return (n + PAGE_SIZE - 1) & _PAGE_MASK & _ULONG


def _cat(parts: list[npt.NDArray[np.int64]]) -> npt.NDArray[np.int64]:
    if not parts:
        return np.zeros(0, dtype=np.int64)
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts)


class Mm:
    """One process address space: VMAs, host page table, MMU-notifier subscribers.

    ``physmem`` is shared by every address space of a host (a fresh one is made
    when omitted).  ``thp`` is ``/sys/kernel/mm/transparent_hugepage/enabled``
    (this host: ``"madvise"``)."""

    def __init__(
        self,
        physmem: PhysMem | None = None,
        *,
        thp: str = "madvise",
        mmap_base: int = MMAP_BASE,
        max_map_count: int = DEFAULT_MAX_MAP_COUNT,
    ) -> None:
        if physmem is not None and not isinstance(physmem, PhysMem):
            raise InputError(f"physmem: expected a PhysMem, got {physmem!r}")
        if thp not in ("always", "madvise", "never"):
            raise InputError(f"thp: expected always|madvise|never, got {thp!r}")
        self.physmem = physmem if physmem is not None else PhysMem()
        self.thp = thp
        self.mmap_base = mmap_base
        self.max_map_count = max_map_count
        self.hugetlb_madv_dontneed = True
        """``MADV_DONTNEED`` works on hugetlb VMAs (v5.18, 90e7e7f5ef3f "mm: enable
        MADV_DONTNEED for hugetlb mappings"); before, EINVAL.  A VM sets it from its
        variant's release (kvmmem.variants, ``hugetlb_madv_dontneed``)."""
        self.pt = PageTable()
        self.notifiers = MmuNotifierSubscriptions()
        self._vmas: Any = SortedDict()  # start -> Vma
        self._anon_vma_seq = 0
        self._ino_seq = 0
        self._vmacache: Vma | None = None  # last VMA found (vmacache); None on any unlink
        self._free_area_cache = mmap_base
        self._cached_hole_size = 0
        self.closed = False
        self.stats: dict[str, int] = {
            "faults": 0,
            "cow": 0,
            "thp_faults": 0,
            "zero_page_maps": 0,
        }

    def __repr__(self) -> str:
        return f"Mm({len(self._vmas)} vmas)"

    # ==================================================================================
    # files
    # ==================================================================================

    def _ino(self) -> int:
        self._ino_seq += 1
        return self._ino_seq

    def memfd_create(self, name: str, size: int, *, hugetlb: bool = False) -> File:
        """``memfd_create(name)`` + ``ftruncate(size)``: a shmem (or hugetlbfs) file.

        Raises :class:`KernelError` EINVAL for a hugetlbfs size that is not a
        multiple of 2 MiB; InputError for wrong types."""
        if not isinstance(name, str):
            raise InputError(f"memfd_create: name must be a str, got {name!r}")
        size = self._size_arg(size, "memfd_create")
        _flag(hugetlb, "memfd_create: hugetlb")
        if hugetlb:
            if size % PMD_SIZE:
                raise KernelError("EINVAL", f"ftruncate({name}, {size:#x})", "hugetlbfs size")
            return File(self.physmem, self._ino(), name, FileKind.HUGETLBFS, size)
        return File(self.physmem, self._ino(), name, FileKind.SHMEM, size)

    def open_file(
        self, name: str, size: int, *, writable: bool = True, fill: int | None = None
    ) -> File:
        """A regular file of ``size`` bytes on a disk filesystem, opened O_RDWR (or O_RDONLY).

        ``fill`` is the byte every byte of the file holds on disk (None: zero).
        Its page cache is shared by every mapping of the returned File."""
        if not isinstance(name, str):
            raise InputError(f"open_file: name must be a str, got {name!r}")
        size = self._size_arg(size, "open_file")
        _flag(writable, "open_file: writable")
        if fill is not None and (not isinstance(fill, int) or isinstance(fill, bool)
                                 or not 0 <= fill <= 255):
            raise InputError(f"open_file: fill must be a byte 0..255, got {fill!r}")
        return File(self.physmem, self._ino(), name, FileKind.REGULAR, size,
                    writable=writable, fill=fill)

    def open_device(self, name: str, npages: int, *, lazy: bool = False) -> File:
        """A device node over a fresh device region of ``npages`` frames (a PCI BAR).

        mmap kind ``device`` remaps every frame up front (``remap_pfn_range``);
        kind ``device-lazy`` inserts them from the fault handler."""
        if not isinstance(name, str):
            raise InputError(f"open_device: name must be a str, got {name!r}")
        base = self.physmem.add_device_region(npages)
        return File(self.physmem, self._ino(), name, FileKind.DEVICE, npages * PAGE_SIZE,
                    device_base=base, device_lazy=lazy)

    def create_dmabuf(self, name: str, size: int) -> File:
        """A dma-buf over shmem pages a driver pins when it exports the buffer: a DRM
        shmem dumb buffer (``drm_gem_shmem_get_pages``) or a udmabuf over a memfd.

        Every page is allocated now.  The kernel promises no physical contiguity;
        the model allocates the pages from the last index down, so no page's next
        frame is the buffer's next page (a mapping that assumes contiguity shows)."""
        if not isinstance(name, str):
            raise InputError(f"create_dmabuf: name must be a str, got {name!r}")
        size = self._size_arg(size, "create_dmabuf")
        if size == 0 or size % PAGE_SIZE:
            raise KernelError("EINVAL", f"create_dmabuf({name}, {size:#x})",
                              "size must be a positive multiple of the page size")
        f = File(self.physmem, self._ino(), name, FileKind.SHMEM, size, dmabuf=True)
        for index in reversed(range(size >> PAGE_SHIFT)):
            f.get_page(index)
        return f

    @staticmethod
    def _size_arg(size: object, call: str) -> int:
        if not isinstance(size, int) or isinstance(size, bool):
            raise ArgumentError(f"{call}: size", f"expected an int, got {size!r}")
        if size < 0:
            raise KernelError("EINVAL", call, "negative size")
        return size

    # ==================================================================================
    # the VMA tree (maple tree): lookups
    # ==================================================================================

    def find_vma(self, hva: int) -> Vma | None:
        """``find_vma()``: the first VMA with ``end > hva``, or None."""
        vmas = self._vmas
        i = vmas.bisect_right(hva)
        if i:
            vma: Vma = vmas.peekitem(i - 1)[1]
            if vma.end > hva:
                return vma
        if i < len(vmas):
            nxt: Vma = vmas.peekitem(i)[1]
            return nxt
        return None

    def vma_lookup(self, hva: int) -> Vma | None:
        """``vma_lookup()``: the VMA containing ``hva``, or None."""
        c = self._vmacache
        if c is not None and c.start <= hva < c.end:
            return c
        vmas = self._vmas
        i = vmas.bisect_right(hva)
        if i:
            vma: Vma = vmas.peekitem(i - 1)[1]
            if vma.end > hva:
                self._vmacache = vma
                return vma
        return None

    def for_each_vma(self) -> Iterator[Vma]:
        """``for_each_vma()``: every VMA in address order."""
        return iter(list(self._vmas.values()))

    def vmas_in(self, start: int, end: int) -> list[Vma]:
        """The VMAs intersecting ``[start, end)``, in address order."""
        out: list[Vma] = []
        vmas = self._vmas
        i = vmas.bisect_right(start)
        if i:
            i -= 1
        n = len(vmas)
        while i < n:
            vma: Vma = vmas.peekitem(i)[1]
            if vma.start >= end:
                break
            if vma.end > start:
                out.append(vma)
            i += 1
        return out

    def _prev(self, vma: Vma) -> Vma | None:
        i = self._vmas.index(vma.start)
        if i == 0:
            return None
        prev: Vma = self._vmas.peekitem(i - 1)[1]
        return prev

    def _next(self, vma: Vma) -> Vma | None:
        i = self._vmas.index(vma.start)
        if i + 1 >= len(self._vmas):
            return None
        nxt: Vma = self._vmas.peekitem(i + 1)[1]
        return nxt

    @property
    def map_count(self) -> int:
        """``mm->map_count``: number of VMAs."""
        return len(self._vmas)

    # ==================================================================================
    # VMA tree: changes (vma_link, __split_vma, vma_merge)
    # ==================================================================================

    def _link(self, vma: Vma) -> None:
        self._vmas[vma.start] = vma
        if vma.file is not None:
            vma.file.mappings.append((self, vma))

    def _unlink(self, vma: Vma) -> None:
        self._vmacache = None
        del self._vmas[vma.start]
        if vma.file is not None:
            maps = vma.file.mappings
            for i, (mm, v) in enumerate(maps):
                if v is vma and mm is self:
                    del maps[i]
                    break

    def _split_at(self, vma: Vma, addr: int) -> Vma:
        """``__split_vma(new_below=0)``: cut ``vma`` at ``addr``; returns the upper part.

        The caller has checked hugetlb alignment and that a THP straddling
        ``addr`` was split (``vma_adjust_trans_huge``)."""
        upper = Vma(addr, vma.end, vma.flags, vma.kind, vma.file,
                    vma.pgoff + ((addr - vma.start) >> PAGE_SHIFT), vma.anon_vma)
        if vma.resv:
            cut = upper.pgoff >> 9
            upper.resv = {k: None for k in vma.resv if k >= cut}
            vma.resv = {k: None for k in vma.resv if k < cut}
        vma.end = Hva(addr)
        self._link(upper)
        return upper

    def _new_anon_vma(self) -> int:
        self._anon_vma_seq += 1
        return self._anon_vma_seq

    def _anon_vma_prepare(self, vma: Vma) -> None:
        """``anon_vma_prepare()``: give the VMA an anon_vma on its first anonymous page,
        reusing an adjacent VMA's where the two could merge but for their protections
        (``find_mergeable_anon_vma``), so a later mprotect that makes them equal merges
        them, as the kernel does."""
        if not vma.anon_vma:
            vma.anon_vma = self._mergeable_anon_vma(vma) or self._new_anon_vma()

    def _mergeable_anon_vma(self, vma: Vma) -> int:
        """``find_mergeable_anon_vma``: the anon_vma of the next, else the previous, VMA
        when it is adjacent, of the same file, pgoff-contiguous and of the same flags
        apart from VM_READ/WRITE/EXEC and VM_SOFTDIRTY (``anon_vma_compatible``); 0
        when neither is.  (The kernel also wants the neighbour's anon_vma to be its
        only one, ``list_is_singular``; the model has no fork, so it always is.)"""
        def compatible(a: Vma, b: Vma) -> bool:
            ignore = VM_ACCESS_FLAGS | VM_SOFTDIRTY
            return (a.end == b.start and a.file is b.file
                    and (a.flags ^ b.flags) & ~ignore == 0
                    and a.pgoff + a.npages == b.pgoff)
        nxt = self._next(vma)
        if nxt is not None and nxt.anon_vma and compatible(vma, nxt):
            return nxt.anon_vma
        prev = self._prev(vma)
        if prev is not None and prev.anon_vma and compatible(prev, vma):
            return prev.anon_vma
        return 0

    @staticmethod
    def _mergeable(a: Vma, b: Vma) -> bool:
        """``is_mergeable_vma`` + ``is_mergeable_anon_vma`` + pgoff contiguity, a before b."""
        if a.end != b.start or a.flags != b.flags or a.file is not b.file:
            return False
        if a.flags & VM_SPECIAL:
            return False
        if a.anon_vma and b.anon_vma and a.anon_vma != b.anon_vma:
            return False
        return a.pgoff + a.npages == b.pgoff

    def _merge_pair(self, a: Vma, b: Vma) -> Vma:
        """Fold ``b`` into ``a`` (``vma_expand`` + ``vma_complete``)."""
        self._unlink(b)
        a.end = b.end
        if not a.anon_vma:
            a.anon_vma = b.anon_vma
        if b.resv:
            a.resv.update(b.resv)
        return a

    def _merge_around(self, vma: Vma) -> Vma:
        """``vma_merge``: merge ``vma`` with its neighbours where the kernel would."""
        prev = self._prev(vma)
        if prev is not None and self._mergeable(prev, vma):
            vma = self._merge_pair(prev, vma)
        nxt = self._next(vma)
        if nxt is not None and self._mergeable(vma, nxt):
            vma = self._merge_pair(vma, nxt)
        return vma

    # ==================================================================================
    # notifiers
    # ==================================================================================

    def mmu_notifier_register(self, sub: MmuNotifier) -> None:
        """``mmu_notifier_register()``: ``sub`` gets every later invalidation of this mm."""
        if self.closed:
            raise KernelError("ESRCH", "mmu_notifier_register", "mm already torn down")
        self.notifiers.register(sub)

    def mmu_notifier_unregister(self, sub: MmuNotifier) -> None:
        """``mmu_notifier_unregister()``: calls ``sub.release()`` if the mm is still alive."""
        if self.notifiers.unregister(sub):
            sub.release()

    def _notify_op(self, start: int, end: int, event: NotifierEvent) -> Op[MmuNotifierRange]:
        rng = MmuNotifierRange(Hva(start), Hva(end), event)
        yield from self.notifiers.invalidate_range_start(rng)
        return rng

    def _notify_end_op(self, rng: MmuNotifierRange) -> Op[None]:
        yield _PTE_CHANGED
        yield from self.notifiers.invalidate_range_end(rng)

    # ==================================================================================
    # page-table helpers
    # ==================================================================================

    def host_pte(self, hva: int) -> HostPte | None:
        """The host page-table entry mapping ``hva`` (None when none is present).

        ``pfn`` is the 4 KiB frame behind ``hva`` (the subpage inside a 2 MiB
        leaf; ``leaf_pfn`` is the leaf's first frame).  Migration entries are not
        present; PROT_NONE entries are, with ``protnone`` set."""
        e, huge = self.pt.entry(_ulong(hva, "host_pte: hva"))
        if not e or e & PTE_MIGRATION:
            return None
        return decode(e, hva, huge)

    def host_mapping_size(self, hva: int) -> int:
        """``host_pfn_mapping_level`` as bytes: 2 MiB for a huge leaf, 4096 for a PTE, 0 if none."""
        return self.mapping_size(_ulong(hva, "host_mapping_size: hva"))

    def mapping_size(self, addr: int) -> int:
        """:meth:`host_mapping_size` of an address already checked (KVM's
        ``host_pfn_mapping_level`` on a slot's hva)."""
        e, huge = self.pt.entry(addr)
        if not e & PTE_PRESENT or e & PTE_MIGRATION:
            return 0
        return PMD_SIZE if huge else PAGE_SIZE

    def _split_huge_pmd_op(self, idx: int) -> Op[None]:
        """``__split_huge_pmd()``: turn the THP leaf at PMD ``idx`` into 512 PTEs.

        Notifies MMU_NOTIFY_CLEAR over the 2 MiB.  The folio stays compound
        (refcount +511, one per PTE); the huge zero page becomes 512 zero-page
        PTEs."""
        leaf = self.pt.pmd.get(idx)
        if not isinstance(leaf, int) or self._is_hugetlb_leaf_at(leaf):
            return
        haddr = idx << 21
        rng = yield from self._notify_op(haddr, haddr + PMD_SIZE, NotifierEvent.CLEAR)
        leaf = self.pt.pmd.get(idx)
        if isinstance(leaf, int):
            head = leaf >> PFN_SHIFT
            bits = leaf & ((1 << PFN_SHIFT) - 1)
            tbl = self.pt.new_table(idx)
            arr = self.pt.view(tbl)
            if self.physmem.is_huge_zero(head):
                arr[:] = (self.physmem.zero_pfn << PFN_SHIFT) | (bits & ~_W) | _S
            else:
                arr[:] = ((np.arange(PAGES_PER_PMD, dtype=np.int64) + head) << PFN_SHIFT) | bits
                if not bits & PTE_MIGRATION:
                    self.physmem.get_pages(np.array([head], dtype=np.int64), PAGES_PER_PMD - 1)
        yield from self._notify_end_op(rng)

    def _split_thp_at_op(self, addr: int) -> Op[None]:
        """``split_huge_pmd_address``: split a THP leaf that ``addr`` cuts in two."""
        if addr & (PMD_SIZE - 1):
            slot = self.pt.pmd.get(addr >> 21)
            if isinstance(slot, int):
                yield from self._split_huge_pmd_op(addr >> 21)

    def _is_hugetlb_leaf_at(self, leaf: int) -> bool:
        """The huge leaf maps a hugetlb page (those are never split)."""
        head = leaf >> PFN_SHIFT
        return self.physmem.pfn_valid(head) and bool(
            self.physmem._flags[head - RAM_BASE_PFN] & PG_HUGETLB)

    def _zap_op(
        self, start: int, end: int, *, cache_only: bool = False
    ) -> Op[list[npt.NDArray[np.int64]]]:
        """``unmap_page_range`` / ``zap_pte_range``: clear every entry in ``[start, end)``.

        Splits a THP leaf the range cuts (with its own CLEAR notification),
        drops each page's mapcount now, and returns the pfns whose references
        must be dropped after the notifier end (``tlb_finish_mmu``).
        ``cache_only`` keeps private anonymous (COW) pages (``even_cows=0``)."""
        pt = self.pt
        pm = self.physmem
        puts: list[npt.NDArray[np.int64]] = []
        for idx in pt.indices(start, end):
            slot = pt.pmd.get(idx)
            if slot is None:
                continue
            base = idx << 21
            lo = max(start, base)
            hi = min(end, base + PMD_SIZE)
            if isinstance(slot, int):
                if hi - lo != PMD_SIZE:
                    if self._is_hugetlb_leaf_at(slot):
                        continue  # callers align hugetlb ranges
                    yield from self._split_huge_pmd_op(idx)
                    slot = pt.pmd.get(idx)
                    if slot is None or isinstance(slot, int):
                        continue
                else:
                    head = slot >> PFN_SHIFT
                    if cache_only and pm.is_anon(head):
                        continue
                    del pt.pmd[idx]
                    if not slot & _S:
                        pm.add_mapcount(np.arange(head, head + PAGES_PER_PMD, dtype=np.int64), -1)
                        puts.append(np.array([head], dtype=np.int64))
                    continue
            arr = pt.view(slot)[(lo - base) >> PAGE_SHIFT : (hi - base) >> PAGE_SHIFT]
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

    def _release(self, puts: list[npt.NDArray[np.int64]]) -> None:
        """Drop the page references collected by a zap (``tlb_finish_mmu`` -> ``folio_put``)."""
        if puts:
            self.physmem.put_pages(_cat(puts))

    def _free_pgtables(self, start: int, end: int, *, only_empty_full: bool = False) -> None:
        """``free_pgtables``: drop PTE tables in ``[start, end)`` no VMA covers any more.

        With ``only_empty_full`` (MADV_DONTNEED, ``CONFIG_PT_RECLAIM``) drop
        the tables whose whole 2 MiB was zapped instead."""
        pt = self.pt
        for idx in pt.indices(start, end):
            slot = pt.pmd.get(idx)
            if slot is None or isinstance(slot, int):
                continue
            base = idx << 21
            if only_empty_full:
                if start <= base and base + PMD_SIZE <= end and not pt.view(slot).any():
                    del pt.pmd[idx]
            elif not self.vmas_in(base, base + PMD_SIZE):
                del pt.pmd[idx]

    def _set_entry(self, hva: int, entry: int) -> None:
        idx = hva >> 21
        slot = self.pt.pmd.get(idx)
        if slot is None or isinstance(slot, int):
            slot = self.pt.new_table(idx)
        slot[(hva >> PAGE_SHIFT) & 511] = entry

    # ==================================================================================
    # the fault path (handle_mm_fault)
    # ==================================================================================

    def _thp_suitable(self, vma: Vma, hva: int) -> bool:
        """``thp_vma_allowable_order`` + ``thp_vma_suitable_order`` for an anonymous PMD."""
        if not vma.is_anonymous() or vma.flags & VM_NOHUGEPAGE or self.thp == "never":
            return False
        if self.thp == "madvise" and not vma.flags & VM_HUGEPAGE:
            return False
        haddr = hva & _HPAGE_MASK
        return haddr >= vma.start and haddr + PMD_SIZE <= vma.end

    def handle_mm_fault_op(self, vma: Vma, hva: int, write: bool) -> Op[int]:
        """``handle_mm_fault()``: resolve a fault at ``hva`` in ``vma`` (access already checked).

        Returns ``VM_FAULT_OK`` or a VM_FAULT_* error bit (SIGBUS beyond EOF or
        with an empty hugetlb pool, RETRY while a migration entry is there).
        The caller holds ``mmap_lock`` for read."""
        self.stats["faults"] += 1
        if vma.flags & VM_HUGETLB:
            return (yield from self._hugetlb_fault_op(vma, hva, write))
        idx = hva >> 21
        slot = self.pt.pmd.get(idx)
        if isinstance(slot, int):
            return (yield from self._huge_pmd_fault_op(vma, hva, write, slot))
        if slot is None:
            if self._thp_suitable(vma, hva):
                return self._do_huge_pmd_anonymous_page(vma, hva, write)
            slot = self.pt.new_table(idx)
        i = (hva >> PAGE_SHIFT) & 511
        e = slot[i]
        if not e:
            return self._do_fault_none(vma, hva, write, slot, i)
        if e & PTE_MIGRATION:
            yield _MIGRATION_WAIT
            return VM_FAULT_RETRY
        if write and not e & _W:
            return (yield from self._do_wp_page_op(vma, hva, slot, i, e))
        slot[i] = e | _Y | (_D if write else 0)
        return VM_FAULT_OK

    def _do_fault_none(self, vma: Vma, hva: int, write: bool, tbl: Any, i: int) -> int:
        """``do_anonymous_page`` / ``do_read_fault`` / ``do_cow_fault`` / ``do_shared_fault``."""
        pm = self.physmem
        if vma.is_anonymous():
            if not write:
                # do_anonymous_page: map the shared zero page read-only
                tbl[i] = (pm.zero_pfn << PFN_SHIFT) | _P | _S | _Y
                self.stats["zero_page_maps"] += 1
                return VM_FAULT_OK
            self._anon_vma_prepare(vma)
            pfn = pm.alloc_page()
            pm.set_flags(pfn, PG_ANON | PG_ANON_EXCLUSIVE)
            pm._map[pfn - RAM_BASE_PFN] = 1
            tbl[i] = (pfn << PFN_SHIFT) | _P | _W | _D | _Y
            return VM_FAULT_OK
        f = vma.file
        if f is None:
            return VM_FAULT_SIGBUS
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
            self._anon_vma_prepare(vma)
            pfn = pm.alloc_page()
            pm.copy_page(pfn, src)
            pm.set_flags(pfn, PG_ANON | PG_ANON_EXCLUSIVE)
            pm._map[pfn - RAM_BASE_PFN] = 1
            tbl[i] = (pfn << PFN_SHIFT) | _P | _W | _D | _Y
            self.stats["cow"] += 1
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

    def _do_wp_page_op(self, vma: Vma, hva: int, tbl: Any, i: int, e: int) -> Op[int]:
        """``do_wp_page``: a write hit a present read-only PTE (VMA is writable)."""
        pm = self.physmem
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
        return (yield from self._wp_page_copy_op(vma, hva, tbl, i, e))

    def _wp_page_copy_op(self, vma: Vma, hva: int, tbl: Any, i: int, e: int) -> Op[int]:
        """``wp_page_copy``: break COW (zero page or page-cache page) into a new anon page.

        Notifies MMU_NOTIFY_CLEAR for the page around the PTE switch; the old
        page's reference is dropped after the notifier end."""
        pm = self.physmem
        old = e >> PFN_SHIFT
        self._anon_vma_prepare(vma)
        new = pm.alloc_page()
        if old != pm.zero_pfn:
            pm.copy_page(new, old)
        pm.set_flags(new, PG_ANON | PG_ANON_EXCLUSIVE)
        page = hva & _PAGE_MASK
        rng = yield from self._notify_op(page, page + PAGE_SIZE, NotifierEvent.CLEAR)
        if id(self.pt.pmd.get(hva >> 21)) != id(tbl) or tbl[i] != e:
            pm.put_page(new)  # !pte_same: somebody else resolved it
            yield from self._notify_end_op(rng)
            return VM_FAULT_OK
        pm._map[new - RAM_BASE_PFN] = 1
        tbl[i] = (new << PFN_SHIFT) | _P | _W | _D | _Y
        self.stats["cow"] += 1
        yield from self._notify_end_op(rng)
        if not e & _S:
            pm._map[old - RAM_BASE_PFN] -= 1
            pm.put_page(old)
        return VM_FAULT_OK

    def _do_huge_pmd_anonymous_page(self, vma: Vma, hva: int, write: bool) -> int:
        """``do_huge_pmd_anonymous_page``: map a 2 MiB THP (or the huge zero page on a read)."""
        pm = self.physmem
        idx = hva >> 21
        self.stats["thp_faults"] += 1
        if not write:
            self.pt.pmd[idx] = (pm.huge_zero_pfn << PFN_SHIFT) | _P | _S | _Y
            return VM_FAULT_OK
        self._anon_vma_prepare(vma)
        head = pm.alloc_huge()
        pfns = np.arange(head, head + PAGES_PER_PMD, dtype=np.int64)
        pm.set_flags_bulk(pfns, PG_ANON | PG_ANON_EXCLUSIVE)
        pm.add_mapcount(pfns, 1)
        self.pt.pmd[idx] = (head << PFN_SHIFT) | _P | _W | _D | _Y
        return VM_FAULT_OK

    def _huge_pmd_fault_op(self, vma: Vma, hva: int, write: bool, leaf: int) -> Op[int]:
        """``huge_pmd_set_accessed`` / ``do_huge_pmd_wp_page`` / ``do_huge_zero_wp_pmd``."""
        pm = self.physmem
        idx = hva >> 21
        if leaf & PTE_MIGRATION:
            yield _MIGRATION_WAIT
            return VM_FAULT_RETRY
        if not write or leaf & _W:
            self.pt.pmd[idx] = leaf | _Y | (_D if write else 0)
            return VM_FAULT_OK
        head = leaf >> PFN_SHIFT
        if pm.is_huge_zero(head):
            # do_huge_zero_wp_pmd (v6.12+): a fresh THP replaces the huge zero page
            self._anon_vma_prepare(vma)
            new = pm.alloc_huge()
            haddr = hva & _HPAGE_MASK
            rng = yield from self._notify_op(haddr, haddr + PMD_SIZE, NotifierEvent.CLEAR)
            if self.pt.pmd.get(idx) != leaf:
                pm.put_page(new)
                yield from self._notify_end_op(rng)
                return VM_FAULT_OK
            pfns = np.arange(new, new + PAGES_PER_PMD, dtype=np.int64)
            pm.set_flags_bulk(pfns, PG_ANON | PG_ANON_EXCLUSIVE)
            pm.add_mapcount(pfns, 1)
            self.pt.pmd[idx] = (new << PFN_SHIFT) | _P | _W | _D | _Y
            yield from self._notify_end_op(rng)
            return VM_FAULT_OK
        if pm._flags[head - RAM_BASE_PFN] & PG_ANON_EXCLUSIVE:
            self.pt.pmd[idx] = leaf | _W | _D | _Y
            return VM_FAULT_OK
        # not exclusive (cannot happen without fork): fall back to 4K COW
        yield from self._split_huge_pmd_op(idx)
        return VM_FAULT_RETRY

    def _hugetlb_fault_op(self, vma: Vma, hva: int, write: bool) -> Op[int]:
        """``hugetlb_fault`` -> ``hugetlb_no_page`` / ``hugetlb_wp``."""
        pm = self.physmem
        idx = hva >> 21
        haddr = hva & _HPAGE_MASK
        leaf = self.pt.pmd.get(idx)
        f = vma.file
        if f is None:
            return VM_FAULT_SIGBUS
        hindex = vma.pgoff_of(haddr) >> 9
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
                self._anon_vma_prepare(vma)
                pm.set_flags_bulk(np.arange(head, head + PAGES_PER_PMD, dtype=np.int64),
                                  PG_ANON | PG_ANON_EXCLUSIVE)
                bits = _P | _Y | ((_W | _D) if write else 0)
            pm.add_mapcount(np.arange(head, head + PAGES_PER_PMD, dtype=np.int64), 1)
            self.pt.pmd[idx] = (head << PFN_SHIFT) | bits
            return VM_FAULT_OK
        if leaf & PTE_MIGRATION:
            yield _MIGRATION_WAIT
            return VM_FAULT_RETRY
        if write and not leaf & _W:
            head = leaf >> PFN_SHIFT
            if vma.flags & VM_SHARED or pm._flags[head - RAM_BASE_PFN] & PG_ANON_EXCLUSIVE:
                self.pt.pmd[idx] = leaf | _W | _D | _Y
                return VM_FAULT_OK
            # hugetlb_wp copy of a page-cache page in a private mapping
            new = pm.alloc_hugetlb(reserved=False)
            if new is None:
                return VM_FAULT_SIGBUS
            rng = yield from self._notify_op(haddr, haddr + PMD_SIZE, NotifierEvent.CLEAR)
            for k in range(PAGES_PER_PMD):
                pm.copy_page(new + k, head + k)
            pfns_new = np.arange(new, new + PAGES_PER_PMD, dtype=np.int64)
            pm.set_flags_bulk(pfns_new, PG_ANON | PG_ANON_EXCLUSIVE)
            pm.add_mapcount(pfns_new, 1)
            self.pt.pmd[idx] = (new << PFN_SHIFT) | _P | _W | _D | _Y
            yield from self._notify_end_op(rng)
            pm.add_mapcount(np.arange(head, head + PAGES_PER_PMD, dtype=np.int64), -1)
            pm.put_page(head)
            return VM_FAULT_OK
        self.pt.pmd[idx] = leaf | _Y | (_D if write else 0)
        return VM_FAULT_OK

    # ==================================================================================
    # userspace loads and stores
    # ==================================================================================

    def _access_ok(self, vma: Vma, write: bool) -> bool:
        """x86 ``access_error()`` inverted: writes need VM_WRITE, reads any of R/W/X."""
        if write:
            return bool(vma.flags & VM_WRITE)
        return bool(vma.flags & VM_ACCESS_FLAGS)

    def _present_pfn(self, addr: int, write: bool) -> int:
        """The pfn a user access at ``addr`` can use right now, or -1."""
        slot = self.pt.pmd.get(addr >> 21)
        if slot is None:
            return -1
        if isinstance(slot, int):
            e = slot
            sub = (addr >> PAGE_SHIFT) & 511
        else:
            e = slot[(addr >> PAGE_SHIFT) & 511]
            sub = 0
        if not e & _P or e & (PTE_PROTNONE | PTE_MIGRATION) or (write and not e & _W):
            return -1
        return (e >> PFN_SHIFT) + sub

    def _touch(self, addr: int, write: bool) -> None:
        """The MMU sets the accessed (and dirty) bit of the entry used."""
        idx = addr >> 21
        slot = self.pt.pmd.get(idx)
        bits = _Y | (_D if write else 0)
        if isinstance(slot, int):
            self.pt.pmd[idx] = slot | bits
        elif slot is not None:
            i = (addr >> PAGE_SHIFT) & 511
            slot[i] |= bits

    def fault_in_op(self, addr: int, write: bool) -> Op[int | str]:
        """A user access at ``addr``: ``do_user_addr_fault`` until the PTE allows it.

        Returns the 4 KiB pfn to use, or the signal name (``"SIGSEGV"``,
        ``"SIGBUS"``).  The caller holds ``mmap_lock`` for read (so the VMA
        stays; the PTE may change under a concurrent zap, hence the re-check)."""
        pm = self.physmem
        vma = self.vma_lookup(addr)
        if vma is None or not self._access_ok(vma, write):
            return "SIGSEGV"
        tries = 0
        while True:
            pfn = self._present_pfn(addr, write)
            if pfn >= 0:
                if pm.is_hwpoison(pfn):
                    return "SIGBUS"
                self._touch(addr, write)
                return pfn
            if tries >= 64:  # pragma: no cover - a fault that never resolves
                raise RuntimeError(f"fault at {addr:#x} did not resolve")
            code = yield from self.handle_mm_fault_op(vma, addr, write)
            if code & (VM_FAULT_SIGBUS | VM_FAULT_HWPOISON | VM_FAULT_OOM):
                return "SIGBUS"
            if code & VM_FAULT_SIGSEGV:
                return "SIGSEGV"
            if not code & VM_FAULT_RETRY:
                tries += 1

    def _access_op(self, hva: int, size: int, write: bool) -> Op[list[tuple[int, int, int]]]:
        """Fault in every page an access touches; returns ``(pfn, offset, n)`` chunks.

        Raises HostSignal (lock still held by the caller)."""
        if (hva & (PAGE_SIZE - 1)) + size <= PAGE_SIZE:
            r = yield from self.fault_in_op(hva, write)
            if isinstance(r, str):
                raise HostSignal(r, hva)
            return [(r, hva & (PAGE_SIZE - 1), size)]
        chunks: list[tuple[int, int]] = []
        addr, left = hva, size
        while left:
            n = min(left, PAGE_SIZE - (addr & (PAGE_SIZE - 1)))
            chunks.append((addr, n))
            addr += n
            left -= n
        while True:
            out: list[tuple[int, int, int]] = []
            for a, n in chunks:
                r = yield from self.fault_in_op(a, write)
                if isinstance(r, str):
                    raise HostSignal(r, a)
                out.append((r, a & (PAGE_SIZE - 1), n))
            if len(out) == 1 or all(
                self._present_pfn(a, write) == pfn for (a, _), (pfn, _, _) in zip(
                    chunks, out, strict=True)
            ):
                return out

    def _check_access(self, hva: object, size: object, call: str) -> tuple[int, int]:
        a = _ulong(hva, f"{call}: hva")
        if not isinstance(size, int) or isinstance(size, bool):
            raise ArgumentError(f"{call}: size", f"expected an int, got {size!r}")
        if size <= 0:
            raise InputError(f"{call}: size must be a positive int, got {size!r}")
        if a + size > _ULONG + 1:
            raise InputError(f"{call}: access wraps the address space")
        return a, size

    def host_read_op(self, hva: int, size: int) -> Op[int]:
        """A userspace load of ``size`` bytes at ``hva``: returns the little-endian value.

        Faults pages in like the kernel (zero page for untouched private
        anonymous memory, page cache for files).  Raises :class:`HostSignal`
        SIGSEGV (no VMA, no access right) or SIGBUS (beyond EOF, empty hugetlb
        pool, device without handler, poisoned page)."""
        hva, size = self._check_access(hva, size, "host_read")
        yield _LOCK_R
        try:
            chunks = yield from self._access_op(hva, size, False)
        except HostSignal:
            yield _UNLOCK_R
            raise
        pm = self.physmem
        if len(chunks) == 1:
            pfn, off, n = chunks[0]
            value = pm.read_int(pfn, off, n)
        else:
            data = b"".join(pm.read(pfn, off, n) for pfn, off, n in chunks)
            value = int.from_bytes(data, "little")
        yield _UNLOCK_R
        return value

    def host_write_op(self, hva: int, size: int, value: int) -> Op[None]:
        """A userspace store of ``value`` (``size`` bytes, little-endian) at ``hva``.

        Breaks COW (zero page, page-cache page of a private mapping) with a
        CLEAR notification.  Raises :class:`HostSignal` like host_read; no byte
        is stored then."""
        hva, size = self._check_access(hva, size, "host_write")
        if not isinstance(value, int) or isinstance(value, bool):
            raise ArgumentError("host_write: value", f"expected an int, got {value!r}")
        if not -(1 << (8 * size - 1)) <= value < (1 << (8 * size)):
            raise InputError(f"host_write: value {value:#x} does not fit in {size} bytes")
        value &= (1 << (8 * size)) - 1
        yield _LOCK_R
        try:
            chunks = yield from self._access_op(hva, size, True)
        except HostSignal:
            yield _UNLOCK_R
            raise
        pm = self.physmem
        if len(chunks) == 1:
            pfn, off, n = chunks[0]
            pm.write_int(pfn, off, n, value)
        else:
            data = value.to_bytes(size, "little")
            pos = 0
            for pfn, off, n in chunks:
                pm.write(pfn, off, data[pos : pos + n])
                pos += n
        yield _UNLOCK_R

    def host_read(self, hva: int, size: int) -> int:
        """Sequential :meth:`host_read_op`."""
        return drive(self.host_read_op(hva, size))

    def host_write(self, hva: int, size: int, value: int) -> None:
        """Sequential :meth:`host_write_op`."""
        drive(self.host_write_op(hva, size, value))

    def host_read_bytes(self, hva: int, size: int) -> bytes:
        """A userspace load of ``size`` bytes as bytes (same faults as host_read)."""
        return self.host_read(hva, size).to_bytes(size, "little")

    # ==================================================================================
    # mmap
    # ==================================================================================

    def _unmapped_area_topdown(self, length: int, align: int) -> int | None:
        """``unmapped_area_topdown``: the highest free gap below mmap_base fitting ``length``.

        The kernel finds it in O(log n) with the maple tree's gap tracking; the
        model keeps the pre-v3.x ``free_area_cache`` / ``cached_hole_size`` pair
        (search downward from the last allocation unless a skipped hole could
        fit), which yields the same address."""
        start = self._free_area_cache
        if length <= self._cached_hole_size or start > self.mmap_base:
            start = self.mmap_base
            self._cached_hole_size = 0
        got = self._scan_down(start, length, align)
        if got is None and start != self.mmap_base:
            self._cached_hole_size = 0
            got = self._scan_down(self.mmap_base, length, align)
        if got is not None:
            self._free_area_cache = got
        return got

    def _scan_down(self, start: int, length: int, align: int) -> int | None:
        """Walk the gaps from the one holding ``start`` downward; first fit wins."""
        vmas = self._vmas
        i = vmas.bisect_left(start)
        high = self.mmap_base
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
                    self._cached_hole_size = max(self._cached_hole_size, left)
                    return addr
            if high > low:
                self._cached_hole_size = max(self._cached_hole_size, high - low)
            if not i:
                return None
            high = vmas.peekitem(i - 1)[1].start
            i -= 1

    def _area_freed(self, end: int) -> None:
        """``arch_unmap_area_topdown``: a gap now ends at (or after) ``end``."""
        if end > self._free_area_cache:
            nxt = self.find_vma(end)
            self._free_area_cache = min(self.mmap_base, nxt.start if nxt else self.mmap_base)

    def get_unmapped_area(
        self, length: int, *, hint: int = 0, align: int = PAGE_SIZE
    ) -> int | None:
        """``arch_get_unmapped_area_topdown``: use ``hint`` (rounded up) if free, else top-down."""
        if hint:
            hint = _page_align(hint)
            if hint & (align - 1) == 0 and hint <= TASK_SIZE - length and not self.vmas_in(
                hint, hint + length
            ):
                return hint
        return self._unmapped_area_topdown(length, align)

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
        length = _ulong(length, "mmap: length")
        prot = _ulong(prot, "mmap: prot")
        a = 0 if addr is None else _ulong(addr, "mmap: addr")
        fixed = _flag(fixed, "mmap: fixed")
        noreplace = _flag(noreplace, "mmap: noreplace")
        populate = _flag(populate, "mmap: populate")
        noreserve = _flag(noreserve, "mmap: noreserve")
        offset = _ulong(offset, "mmap: offset")
        if fill is not None and (not isinstance(fill, int) or isinstance(fill, bool)
                                 or not 0 <= fill <= 255):
            raise InputError(f"mmap: fill must be a byte 0..255, got {fill!r}")
        if file is not None and not isinstance(file, File):
            raise ArgumentError("mmap: file", f"expected a File, got {file!r}", "EBADF")
        if fill is not None and not prot & PROT_WRITE:
            raise InputError("mmap: fill needs PROT_WRITE (userspace cannot store into a "
                             "read-only mapping: map rw, fill, then mprotect)")
        file = self._mmap_file_arg(vkind, file)
        call = f"mmap({a:#x}, {length:#x}, {vkind.value})"
        if offset & (PAGE_SIZE - 1):
            raise KernelError("EINVAL", call, "offset not page aligned")
        if vkind is VmaKind.HUGETLB and file is None:
            length = (length + PMD_SIZE - 1) & _HPAGE_MASK & _ULONG  # ksys_mmap_pgoff
        if length == 0:
            raise KernelError("EINVAL", call, "length 0")
        length = _page_align(length)
        if length == 0 or length > TASK_SIZE:
            raise KernelError("ENOMEM", call, "length too large")
        pgoff = offset >> PAGE_SHIFT
        if pgoff + (length >> PAGE_SHIFT) > _ULONG:
            raise KernelError("EOVERFLOW", call, "offset + length overflows")
        hugetlb = vkind is VmaKind.HUGETLB
        if hugetlb and file is not None and length % PMD_SIZE:
            raise KernelError("EINVAL", call, "hugetlbfs length not 2M aligned")
        if hugetlb and pgoff % PAGES_PER_PMD:
            raise KernelError("EINVAL", call, "hugetlbfs offset not 2M aligned")
        if fixed or noreplace:
            if a & (PAGE_SIZE - 1):
                raise KernelError("EINVAL", call, "fixed address not page aligned")
            if a == 0 or a > TASK_SIZE - length:
                raise KernelError("ENOMEM", call, "fixed range outside the address space")
            if hugetlb and a % PMD_SIZE:
                raise KernelError("EINVAL", call, "hugetlb address not 2M aligned")

        yield _LOCK_W
        try:
            start, flags = self._mmap_checks(vkind, file, length, prot, a, fixed, noreplace,
                                             noreserve, pgoff, call)
        except KernelError:
            yield _UNLOCK_W
            raise
        end = start + length

        # --- MAP_FIXED: take out what was there (vms_gather_munmap_vmas + vms_clean_up_area)
        old = self.vmas_in(start, end)
        if old:
            yield from self._detach_range_op(start, end, old)

        # --- the new VMA (__mmap_new_vma)
        if file is None and vkind in (VmaKind.MEMFD, VmaKind.FILE, VmaKind.FILE_SHARED,
                                      VmaKind.HUGETLB, VmaKind.DEVICE, VmaKind.DEVICE_LAZY,
                                      VmaKind.DMABUF):
            file = self._anon_file(vkind, length)
        if vkind in (VmaKind.ANON, VmaKind.THP):
            pgoff = start >> PAGE_SHIFT  # do_mmap: anonymous vm_pgoff is the address
        vma = Vma(start, end, flags, vkind, file, pgoff)
        if hugetlb and not flags & VM_NORESERVE:
            first = pgoff >> 9
            keys = range(first, first + (length >> 21))
            if flags & VM_MAYSHARE and file is not None:
                for k in keys:
                    if k not in file.cache:
                        file.resv[k] = None
            else:
                vma.resv = dict.fromkeys(keys)
        self._link(vma)
        if vkind is VmaKind.DEVICE:
            self._remap_pfn_range(vma)
        vma = self._merge_around(vma)
        yield _UNLOCK_W

        if populate or fill is not None:
            yield from self._populate_op(start, end, fill)
        return Hva(start)

    def _mmap_file_arg(self, kind: VmaKind, file: File | None) -> File | None:
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
        }[kind]
        if fk not in ok or (kind is VmaKind.DMABUF) != file.dmabuf:
            what = "a dma-buf" if file.dmabuf else f"a {fk.value} file"
            raise InputError(f"mmap: kind {kind.value} cannot map {what}")
        if kind is VmaKind.DEVICE and file.device_lazy:
            raise InputError("mmap: kind device needs a device opened with lazy=False")
        if kind is VmaKind.DEVICE_LAZY and not file.device_lazy:
            raise InputError("mmap: kind device-lazy needs a device opened with lazy=True")
        return file

    def _anon_file(self, kind: VmaKind, length: int) -> File:
        if kind is VmaKind.MEMFD:
            return self.memfd_create(f"kvmmem-{self._ino_seq + 1}", length)
        if kind is VmaKind.HUGETLB:
            f = File(self.physmem, self._ino(), "anon_hugepage", FileKind.HUGETLBFS, length,
                     anon_hugetlb=True)
            return f
        if kind is VmaKind.DMABUF:
            return self.create_dmabuf(f"dmabuf:kvmmem-{self._ino_seq + 1}", length)
        if kind in (VmaKind.DEVICE, VmaKind.DEVICE_LAZY):
            return self.open_device(f"/dev/kvmmem-bar{self._ino_seq + 1}",
                                    length >> PAGE_SHIFT, lazy=kind is VmaKind.DEVICE_LAZY)
        return self.open_file(f"/tmp/kvmmem-file-{self._ino_seq + 1}", length)

    def _mmap_checks(
        self, kind: VmaKind, file: File | None, length: int, prot: int, a: int,
        fixed: bool, noreplace: bool, noreserve: bool, pgoff: int, call: str,
    ) -> tuple[int, int]:
        """The part of ``do_mmap`` that needs the address space: placement and VM flags."""
        hugetlb = kind is VmaKind.HUGETLB
        if fixed or noreplace:
            start = a
            if noreplace and self.vmas_in(start, start + length):
                raise KernelError("EEXIST", call, "MAP_FIXED_NOREPLACE over a mapping")
        else:
            align = PAGE_SIZE
            if hugetlb or (kind in (VmaKind.ANON, VmaKind.THP) and not a
                           and length % PMD_SIZE == 0 and self.thp != "never"):
                align = PMD_SIZE  # hugetlb_get_unmapped_area / thp_get_unmapped_area
            got = self.get_unmapped_area(length, hint=a, align=align)
            if got is None:
                raise KernelError("ENOMEM", call, "no free range")
            start = got
        flags = calc_vm_prot_bits(prot) | VM_MAYREAD | VM_MAYWRITE | VM_MAYEXEC
        shared = kind in (VmaKind.MEMFD, VmaKind.FILE_SHARED, VmaKind.DEVICE,
                          VmaKind.DEVICE_LAZY, VmaKind.DMABUF) or (hugetlb and file is not None)
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
        if kind in (VmaKind.DEVICE, VmaKind.DEVICE_LAZY):
            flags |= VM_IO | VM_PFNMAP | VM_DONTEXPAND | VM_DONTDUMP
            if file is not None and (pgoff + (length >> PAGE_SHIFT)) > file.npages():
                raise KernelError("EINVAL", call, "beyond the device region")
        if kind is VmaKind.DMABUF:
            # drm_gem_shmem_mmap / udmabuf mmap: no VM_IO (the pages are RAM)
            flags |= VM_PFNMAP | VM_DONTEXPAND | VM_DONTDUMP
            if file is not None and (pgoff + (length >> PAGE_SHIFT)) > file.npages():
                raise KernelError("EINVAL", call, "beyond the buffer")
        if kind not in (VmaKind.ANON, VmaKind.THP) and (length > _MAX_LFS_FILESIZE or
                                 pgoff > (_MAX_LFS_FILESIZE - length) >> PAGE_SHIFT):
            raise KernelError("EOVERFLOW", call, "offset + length beyond the largest file")
        if len(self._vmas) > self.max_map_count:
            raise KernelError("ENOMEM", call, "max_map_count reached")
        replaced = self.vmas_in(start, start + length)
        if replaced:
            self._check_splits(replaced, start, start + length, call)
            if (replaced[0].start < start < replaced[0].end and
                    replaced[-1].start < start + length < replaced[-1].end
                    and len(self._vmas) >= self.max_map_count):
                raise KernelError("ENOMEM", call, "max_map_count reached")
        if hugetlb and not noreserve:
            # hugetlb_reserve_pages: the last check, so nothing needs undoing after it
            need = length >> 21
            if file is not None:
                first = pgoff >> 9
                need = sum(1 for k in range(first, first + need)
                           if k not in file.cache and k not in file.resv)
            if not self.physmem.hugetlb_reserve(need):
                raise KernelError("ENOMEM", call, "hugetlb pool too small (nr_hugepages)")
        return start, flags

    def _check_splits(self, vmas: list[Vma], start: int, end: int, call: str) -> None:
        """``hugetlb_vm_op_split``: a hugetlb VMA can only be cut at 2 MiB boundaries."""
        first, last = vmas[0], vmas[-1]
        if first.start < start and first.is_hugetlb() and start % PMD_SIZE:
            raise KernelError("EINVAL", call, "splitting a hugetlb VMA inside a huge page")
        if last.end > end and last.is_hugetlb() and end % PMD_SIZE:
            raise KernelError("EINVAL", call, "splitting a hugetlb VMA inside a huge page")

    def _remap_pfn_range(self, vma: Vma) -> None:
        """``remap_pfn_range``: map every device frame of the VMA now (special PTEs)."""
        f = vma.file
        if f is None:
            return
        writable = _W if vma.flags & VM_WRITE and vma.flags & VM_SHARED else 0
        base_pfn = f.device_base + vma.pgoff
        vma.pgoff = base_pfn  # pci_mmap_resource_range / /dev/mem: vm_pgoff holds the pfn
        for hva in range(vma.start, vma.end, PAGE_SIZE):
            pfn = base_pfn + ((hva - vma.start) >> PAGE_SHIFT)
            self._set_entry(hva, (pfn << PFN_SHIFT) | _P | _S | writable)

    def _detach_range_op(self, start: int, end: int, vmas: list[Vma]) -> Op[None]:
        """Remove ``[start, end)`` from the address space (VMAs already known to intersect).

        ``vms_gather_munmap_vmas`` (split at the edges, detach) then
        ``vms_clear_ptes`` (one MMU_NOTIFY_UNMAP range for the request) and
        ``free_pgtables``.  The caller holds mmap_lock for write."""
        first, last = vmas[0], vmas[-1]
        if first.start < start:
            yield from self._split_thp_at_op(start)
            upper = self._split_at(first, start)
            if last is first:
                last = upper
        if last.end > end:
            yield from self._split_thp_at_op(end)
            self._split_at(last, end)
        detached = self.vmas_in(start, end)
        for vma in detached:
            self._unlink(vma)
            if vma.resv:
                self.physmem.hugetlb_unreserve(len(vma.resv))
                vma.resv = {}
        self._area_freed(end)
        rng = yield from self._notify_op(start, end, NotifierEvent.UNMAP)
        puts = yield from self._zap_op(start, end)
        yield from self._notify_end_op(rng)
        self._release(puts)
        self._free_pgtables(start, end)

    def _populate_op(self, start: int, end: int, fill: int | None) -> Op[None]:
        """MAP_POPULATE (``populate_vma_page_range``) and the userspace ``fill`` stores.

        Fresh private-anonymous and shmem ranges are populated in bulk; the
        rest page by page through the fault path."""
        yield _LOCK_R
        addr = start
        pm = self.physmem
        while addr < end:
            vma = self.vma_lookup(addr)
            if vma is None:
                break
            stop = min(end, vma.end)
            write = fill is not None or (vma.flags & (VM_WRITE | VM_SHARED)) == VM_WRITE
            if not vma.flags & VM_ACCESS_FLAGS:
                addr = stop
                continue
            if self._bulk_populate(vma, addr, stop, write, fill):
                addr = stop
                continue
            step = PMD_SIZE if vma.is_hugetlb() else PAGE_SIZE
            while addr < stop:
                r = yield from self.fault_in_op(addr, write)
                if isinstance(r, str):
                    if fill is not None:  # the userspace store gets the signal
                        yield _UNLOCK_R
                        raise HostSignal(r, addr)
                    break  # populate_vma_page_range stops silently
                if fill is not None:
                    if step == PMD_SIZE:
                        head = r & ~(PAGES_PER_PMD - 1)
                        for k in range(PAGES_PER_PMD):
                            pm.fill(head + k, fill)
                    else:
                        pm.fill(r, fill)
                addr = (addr & ~(step - 1)) + step
            addr = stop
        yield _UNLOCK_R

    def _bulk_populate(self, vma: Vma, start: int, end: int, write: bool,
                       fill: int | None) -> bool:
        """Vectorised first touch of a range with no PTE tables yet (anon or shmem).

        Same end state as faulting each page in turn; returns False when the
        range does not qualify."""
        pm = self.physmem
        if vma.is_hugetlb() or vma.is_pfnmap() or self.pt.indices(start, end):
            return False
        anon = vma.is_anonymous()
        if anon:
            if not write or self._thp_suitable(vma, start) or self._thp_suitable(vma, end - 1):
                return False
        else:
            f = vma.file
            if (f is None or f.kind is not FileKind.SHMEM or not vma.flags & VM_SHARED
                    or vma.pgoff_of(end - 1) >= f.npages()):
                return False
            first = vma.pgoff_of(start)
            n = (end - start) >> PAGE_SHIFT
            if any(first <= k < first + n for k in f.cache) if len(f.cache) < n else any(
                    k in f.cache for k in range(first, first + n)):
                return False
        f = vma.file
        n = (end - start) >> PAGE_SHIFT
        pfns = pm.alloc_pages_bulk(n)
        if fill:
            pm.set_fill_bulk(pfns, fill)
        idx = pfns - RAM_BASE_PFN
        if anon or f is None:
            self._anon_vma_prepare(vma)
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
            idx_pmd = addr >> 21
            base = idx_pmd << 21
            hi = min(end, base + PMD_SIZE)
            k = (hi - addr) >> PAGE_SHIFT
            tbl = self.pt.new_table(idx_pmd)
            lo_i = (addr - base) >> PAGE_SHIFT
            self.pt.view(tbl)[lo_i : lo_i + k] = ents[pos : pos + k]
            pos += k
            addr = hi
        return True

    def mmap(self, length: int, prot: int, kind: VmaKind | str, **kw: Any) -> Hva:
        """Sequential :meth:`mmap_op` (same keyword arguments)."""
        return drive(self.mmap_op(length, prot, kind, **kw))

    # ==================================================================================
    # munmap
    # ==================================================================================

    def munmap_op(self, addr: int, length: int) -> Op[None]:
        """``munmap(2)`` (``do_vmi_munmap``): unmap ``[addr, addr+length)``, splitting VMAs.

        One MMU_NOTIFY_UNMAP for the (page-aligned) range when a VMA
        intersects it; frames freed after the notifier end.  Raises
        KernelError EINVAL (unaligned, length 0, beyond TASK_SIZE, cut inside a
        hugetlb page) or ENOMEM (split beyond max_map_count)."""
        start = _ulong(addr, "munmap: addr")
        length = _ulong(length, "munmap: length")
        call = f"munmap({start:#x}, {length:#x})"
        if start & (PAGE_SIZE - 1) or start > TASK_SIZE or length > TASK_SIZE - start:
            raise KernelError("EINVAL", call, "bad address or length")
        length = _page_align(length)
        if length == 0:
            raise KernelError("EINVAL", call, "length 0")
        end = start + length
        yield _LOCK_W
        vmas = self.vmas_in(start, end)
        if vmas:
            try:
                self._check_splits(vmas, start, end, call)
                if (vmas[0].start < start and vmas[-1].end > end
                        and len(self._vmas) >= self.max_map_count):
                    raise KernelError("ENOMEM", call, "max_map_count reached")
            except KernelError:
                yield _UNLOCK_W
                raise
            yield from self._detach_range_op(start, end, vmas)
        yield _UNLOCK_W

    def munmap(self, addr: int, length: int) -> None:
        """Sequential :meth:`munmap_op`."""
        drive(self.munmap_op(addr, length))

    # ==================================================================================
    # mprotect
    # ==================================================================================

    def mprotect_op(self, addr: int, length: int, prot: int) -> Op[None]:
        """``mprotect(2)`` (``do_mprotect_pkey`` -> ``mprotect_fixup`` -> ``change_protection``).

        Raises KernelError EINVAL (unaligned start, unknown prot bits, cut
        inside a hugetlb page), ENOMEM (a hole in the range; the VMAs before
        it were changed, as in the kernel), EACCES (a right the VMA may not
        have, e.g. PROT_WRITE on a shared mapping of a read-only file; earlier
        VMAs changed)."""
        start = _ulong(addr, "mprotect: addr")
        length = _ulong(length, "mprotect: length")
        prot = _ulong(prot, "mprotect: prot")
        call = f"mprotect({start:#x}, {length:#x}, {prot:#x})"
        if start & (PAGE_SIZE - 1):
            raise KernelError("EINVAL", call, "address not page aligned")
        if not length:
            return
        length = _page_align(length)
        end = start + length
        if length == 0 or end > _ULONG or end <= start:
            raise KernelError("ENOMEM", call, "range wraps")
        if prot & (PROT_GROWSDOWN | PROT_GROWSUP):
            raise KernelError("EINVAL", call, "no stack VMA to grow")
        if prot & ~(PROT_READ | PROT_WRITE | PROT_EXEC | PROT_SEM):
            raise KernelError("EINVAL", call, "unknown prot bits")
        yield _LOCK_W
        err: KernelError | None = None
        first = self.find_vma(start)
        if first is None or first.start >= end or first.start > start:
            err = KernelError("ENOMEM", call, "range starts in a hole")
        nstart = start
        while err is None and nstart < end:
            vma = self.vma_lookup(nstart)
            if vma is None:
                err = KernelError("ENOMEM", call, "hole in the range")
                break
            newflags = calc_vm_prot_bits(prot) | (vma.flags & ~VM_ACCESS_FLAGS)
            if (newflags & ~(newflags >> 4)) & VM_ACCESS_FLAGS:
                err = KernelError("EACCES", call, "VMA may not get these rights (VM_MAY*)")
                break
            tmp = min(end, vma.end)
            if vma.is_hugetlb() and (nstart % PMD_SIZE or (tmp < vma.end and tmp % PMD_SIZE)):
                err = KernelError("EINVAL", call, "splitting a hugetlb VMA inside a huge page")
                break
            if newflags != vma.flags and (nstart > vma.start or tmp < vma.end) and (
                    len(self._vmas) >= self.max_map_count):
                err = KernelError("ENOMEM", call, "max_map_count reached")
                break
            yield from self._mprotect_fixup_op(vma, nstart, tmp, newflags)
            nstart = tmp
        yield _UNLOCK_W
        if err is not None:
            raise err

    def mprotect(self, addr: int, length: int, prot: int) -> None:
        """Sequential :meth:`mprotect_op`."""
        drive(self.mprotect_op(addr, length, prot))

    def _mprotect_fixup_op(self, vma: Vma, start: int, end: int, newflags: int) -> Op[None]:
        """``mprotect_fixup``: new flags for ``[start, end)`` of ``vma``, then its PTEs."""
        old = vma.flags
        if newflags == old:
            return
        if newflags & VM_WRITE:
            if not old & (VM_ACCOUNT | VM_WRITE | VM_HUGETLB | VM_SHARED | VM_NORESERVE):
                newflags |= VM_ACCOUNT  # a private mapping becomes writable: charge it
        elif old & VM_ACCOUNT and vma.is_anonymous() and not vma.anon_vma:
            newflags &= ~VM_ACCOUNT  # never written: unaccount (v6.1+)
        vma = yield from self._vma_modify_op(vma, start, end, newflags)
        yield from self._change_protection_op(vma, start, end)

    def _vma_modify_op(self, vma: Vma, start: int, end: int, newflags: int) -> Op[Vma]:
        """``vma_modify_flags``: split off ``[start, end)``, set flags, merge around."""
        if start > vma.start:
            yield from self._split_thp_at_op(start)
            vma = self._split_at(vma, start)
        if end < vma.end:
            yield from self._split_thp_at_op(end)
            self._split_at(vma, end)
        vma.flags = newflags
        if vma.is_anonymous():
            vma.kind = VmaKind.THP if newflags & VM_HUGEPAGE else VmaKind.ANON
        return self._merge_around(vma)

    def _notify_ranges_protection(self, vma: Vma, start: int, end: int) -> list[tuple[int, int]]:
        """Where ``change_pud_range`` starts MMU_NOTIFY_PROTECTION_VMA ranges.

        Per 512 GiB P4D chunk: from the first populated 1 GiB PUD to the chunk
        end; hugetlb (``hugetlb_change_protection``) notifies the whole range."""
        if vma.is_hugetlb():
            return [(start, end)]
        out: list[tuple[int, int]] = []
        p4d = 1 << 39
        addr = start
        while addr < end:
            chunk_end = min(end, (addr & ~(p4d - 1)) + p4d)
            pud = addr >> 30
            while (pud << 30) < chunk_end:
                if self.pt.pud_populated(pud):
                    out.append((max(addr, pud << 30), chunk_end))
                    break
                pud += 1
            addr = chunk_end
        return out

    def _new_write_bits(self, vma: Vma, ents: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
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
            flags = np.frombuffer(self.physmem._flags, dtype=np.uint8)
            pf = ents[nm] >> PFN_SHIFT
            out[nm] = (flags[pf - RAM_BASE_PFN] & PG_ANON_EXCLUSIVE) != 0
        return out

    def _change_protection_op(self, vma: Vma, start: int, end: int) -> Op[None]:
        """``change_protection``: rewrite the PTEs of ``[start, end)`` for the VMA's flags."""
        ranges = self._notify_ranges_protection(vma, start, end)
        for lo, hi in ranges:
            rng = yield from self._notify_op(lo, hi, NotifierEvent.PROTECTION_VMA)
            yield from self._change_ptes_op(vma, lo, hi)
            yield from self._notify_end_op(rng)

    def _change_ptes_op(self, vma: Vma, start: int, end: int) -> Op[None]:
        pt = self.pt
        accessible = bool(vma.flags & VM_ACCESS_FLAGS)
        for idx in pt.indices(start, end):
            slot = pt.pmd.get(idx)
            if slot is None:
                continue
            base = idx << 21
            lo, hi = max(start, base), min(end, base + PMD_SIZE)
            if isinstance(slot, int):
                if hi - lo != PMD_SIZE and not vma.is_hugetlb():
                    yield from self._split_huge_pmd_op(idx)
                    slot = pt.pmd.get(idx)
                    if slot is None or isinstance(slot, int):
                        continue
                else:
                    if slot & PTE_MIGRATION:
                        continue
                    ents = np.array([slot], dtype=np.int64)
                    if vma.is_anonymous() and not slot & _S:
                        head = slot >> PFN_SHIFT
                        excl = self.physmem._flags[head - RAM_BASE_PFN] & PG_ANON_EXCLUSIVE
                        w = bool(excl) and bool(vma.flags & VM_WRITE) and accessible
                    else:
                        w = bool(self._new_write_bits(vma, ents)[0]) and accessible
                    new = slot & ~(_W | PTE_PROTNONE)
                    if not accessible:
                        new |= PTE_PROTNONE
                    if w:
                        new |= _W
                    pt.pmd[idx] = new
                    continue
            arr = pt.view(slot)[(lo - base) >> PAGE_SHIFT : (hi - base) >> PAGE_SHIFT]
            nzi = np.flatnonzero((arr & _P) != 0)
            if not nzi.size:
                continue
            ents = arr[nzi]
            nents = ents & ~(_W | PTE_PROTNONE)
            if not accessible:
                nents |= PTE_PROTNONE
            else:
                nents |= np.where(self._new_write_bits(vma, ents), _W, 0)
            arr[nzi] = nents

    # ==================================================================================
    # madvise
    # ==================================================================================

    def madvise_op(self, addr: int, length: int, advice: str | int) -> Op[None]:
        """``madvise(2)``: ``dontneed``, ``remove``, ``hugepage``, ``nohugepage``,
        ``pageout`` (a no-op without swap), ``willneed``, ``normal``.

        DONTNEED zaps (MMU_NOTIFY_CLEAR per VMA): private pages are dropped
        (anonymous memory reads zero again, private file mappings re-read the
        file), shared pages stay in the page cache.  REMOVE punches a hole in
        the file (every mapping of it is zapped).  Raises KernelError EINVAL
        (unaligned start, unknown advice, VM_PFNMAP/hugetlb misuse, REMOVE on
        anonymous memory), EACCES (REMOVE without a shared writable mapping),
        ENOMEM (a hole: the VMAs around it are still advised, as in the kernel)."""
        start = _ulong(addr, "madvise: addr")
        length = _ulong(length, "madvise: length")
        if isinstance(advice, bool) or not isinstance(advice, str | int):
            raise ArgumentError("madvise: advice", f"expected a name or number, got {advice!r}")
        behavior = MADVICE.get(advice, -1) if isinstance(advice, str) else advice
        call = f"madvise({start:#x}, {length:#x}, {advice!r})"
        if behavior not in MADVICE.values():
            raise KernelError("EINVAL", call, "unknown or unmodelled advice")
        if start & (PAGE_SIZE - 1):
            raise KernelError("EINVAL", call, "address not page aligned")
        alen = _page_align(length)
        if length and not alen:
            raise KernelError("EINVAL", call, "length overflows")
        end = start + alen
        if end > _ULONG:
            raise KernelError("EINVAL", call, "range wraps")
        if end == start:
            return
        write_lock = behavior in (MADV_HUGEPAGE, MADV_NOHUGEPAGE)
        yield acquire(_MMAP_LOCK, shared=not write_lock)
        err: KernelError | None = None
        unmapped = False
        cur = start
        while True:
            vma = self.find_vma(cur)
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
                yield from self._madvise_vma_op(vma, cur, tmp, behavior, call)
            except KernelError as e:
                err = e
                break
            cur = tmp
            if cur >= end:
                break
        yield release(_MMAP_LOCK, shared=not write_lock)
        if err is not None:
            raise err
        if unmapped:
            raise KernelError("ENOMEM", call, "part of the range is not mapped")

    def madvise(self, addr: int, length: int, advice: str | int) -> None:
        """Sequential :meth:`madvise_op`."""
        drive(self.madvise_op(addr, length, advice))

    def _madvise_vma_op(self, vma: Vma, start: int, end: int, behavior: int,
                        call: str) -> Op[None]:
        if behavior == MADV_DONTNEED:
            if vma.flags & VM_LOCKED:
                raise KernelError("EINVAL", call, "VM_LOCKED")
            if vma.is_hugetlb():
                if not self.hugetlb_madv_dontneed:
                    # madvise_dontneed_free_valid_vma before v5.18: VM_HUGETLB is refused
                    raise KernelError("EINVAL", call, "MADV_DONTNEED on hugetlb before v5.18")
                if start % PMD_SIZE:
                    raise KernelError("EINVAL", call, "hugetlb start not 2M aligned")
                end = end & _HPAGE_MASK  # madvise_dontneed_free_valid_vma rounds down
                if end <= start:
                    return
            elif vma.flags & VM_PFNMAP:
                raise KernelError("EINVAL", call, "MADV_DONTNEED on VM_PFNMAP")
            rng = yield from self._notify_op(start, end, NotifierEvent.CLEAR)
            puts = yield from self._zap_op(start, end)
            yield from self._notify_end_op(rng)
            self._release(puts)
            self._free_pgtables(start, end, only_empty_full=True)
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
                first = (first + PAGES_PER_PMD - 1) // PAGES_PER_PMD * PAGES_PER_PMD
                last = (last + 1) // PAGES_PER_PMD * PAGES_PER_PMD - 1
            yield from self._punch_hole_op(f, first, last)
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
            if vma.is_hugetlb() and (start % PMD_SIZE or (end < vma.end and end % PMD_SIZE)):
                raise KernelError("EINVAL", call, "splitting a hugetlb VMA inside a huge page")
            yield from self._vma_modify_op(vma, start, end, newflags)
        elif behavior == MADV_PAGEOUT and vma.flags & (VM_LOCKED | VM_PFNMAP | VM_HUGETLB):
            raise KernelError("EINVAL", call, "MADV_PAGEOUT cannot reclaim this VMA")
        # MADV_PAGEOUT otherwise: no swap in the model, nothing is reclaimed;
        # MADV_NORMAL / MADV_WILLNEED: no visible effect

    # ==================================================================================
    # files: hole punching and truncation (unmap_mapping_range)
    # ==================================================================================

    def _unmap_mapping_range_op(self, f: File, first: int, last: int | None,
                                *, even_cows: bool) -> Op[None]:
        """``unmap_mapping_range``: zap file pages ``first..last`` in every VMA mapping ``f``.

        One MMU_NOTIFY_CLEAR per VMA (``zap_page_range_single``), in ``i_mmap``
        order, whatever address space the VMA belongs to."""
        for mm, vma in list(f.mappings):
            vba = vma.pgoff
            vea = vba + vma.npages - 1
            lo = max(first, vba)
            hi = vea if last is None else min(last, vea)
            if lo > hi:
                continue
            s: int = vma.hva_of(lo)
            e: int = vma.hva_of(hi + 1)
            if vma.is_hugetlb():
                s &= _HPAGE_MASK
                e = (e + PMD_SIZE - 1) & _HPAGE_MASK
            rng = yield from mm._notify_op(s, e, NotifierEvent.CLEAR)
            puts = yield from mm._zap_op(s, e, cache_only=not even_cows)
            yield from mm._notify_end_op(rng)
            mm._release(puts)

    def _punch_hole_op(self, f: File, first: int, last: int) -> Op[None]:
        """``fallocate(PUNCH_HOLE)`` (``shmem_fallocate``, ``ext4_punch_hole``)."""
        if last < first:
            return
        yield acquire(f"i_rwsem:{f.ino}")
        yield from self._unmap_mapping_range_op(f, first, last, even_cows=False)
        if f.kind is FileKind.HUGETLBFS:
            f.drop_pages(first // PAGES_PER_PMD, last // PAGES_PER_PMD, hole=True)
        else:
            f.drop_pages(first, last, hole=True)
        yield release(f"i_rwsem:{f.ino}")

    def ftruncate_op(self, file: File, size: int) -> Op[None]:
        """``ftruncate(2)``: shrinking unmaps pages past EOF from every mapping (even
        private COW copies, ``truncate_pagecache``: twice, as the kernel does) and
        drops them from the page cache; later accesses there are SIGBUS.

        Raises KernelError EINVAL (negative size, hugetlbfs size not 2M
        aligned) or EBADF-like InputError for a read-only or device file."""
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
        if file.kind is FileKind.HUGETLBFS and size % PMD_SIZE:
            raise KernelError("EINVAL", call, "hugetlbfs size not 2M aligned")
        yield acquire(f"i_rwsem:{file.ino}")
        old = file.size
        if size < old:
            unit = 1 << file.unit_shift
            holebegin = (size + unit - 1) // unit
            first4k = holebegin * (unit >> PAGE_SHIFT)
            yield from self._unmap_mapping_range_op(file, first4k, None, even_cows=True)
            file.set_size(size)
            file.drop_pages(holebegin, None, hole=False)
            yield from self._unmap_mapping_range_op(file, first4k, None, even_cows=True)
            if file.resv:
                stale = [k for k in file.resv if k >= holebegin]
                for k in stale:
                    del file.resv[k]
                self.physmem.hugetlb_unreserve(len(stale))
        else:
            file.size = size
        yield release(f"i_rwsem:{file.ino}")

    def ftruncate(self, file: File, size: int) -> None:
        """Sequential :meth:`ftruncate_op`."""
        drive(self.ftruncate_op(file, size))

    # ==================================================================================
    # mremap
    # ==================================================================================

    def mremap_op(
        self, old_addr: int, old_len: int, new_len: int, *, maymove: bool = False,
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
        addr = _ulong(old_addr, "mremap: old_addr")
        old_len = _ulong(old_len, "mremap: old_len")
        new_len = _ulong(new_len, "mremap: new_len")
        maymove = _flag(maymove, "mremap: maymove")
        fixed = fixed_addr is not None
        new_addr = 0 if fixed_addr is None else _ulong(fixed_addr, "mremap: fixed_addr")
        call = f"mremap({addr:#x}, {old_len:#x}, {new_len:#x})"
        # check_mremap_params
        old_len = _page_align(old_len)
        new_len = _page_align(new_len)
        if addr & (PAGE_SIZE - 1):
            raise KernelError("EINVAL", call, "old address not page aligned")
        if not new_len:
            raise KernelError("EINVAL", call, "new length 0")
        if new_len > TASK_SIZE:
            raise KernelError("EINVAL", call, "new length beyond TASK_SIZE")
        if fixed:
            if new_addr > TASK_SIZE - new_len:
                raise KernelError("EINVAL", call, "new range outside the address space")
            if new_addr & (PAGE_SIZE - 1):
                raise KernelError("EINVAL", call, "new address not page aligned")
            if not maymove:
                raise KernelError("EINVAL", call, "MREMAP_FIXED without MREMAP_MAYMOVE")
            if addr + old_len > new_addr and new_addr + new_len > addr:
                raise KernelError("EINVAL", call, "old and new ranges overlap")
        yield _LOCK_W
        try:
            if len(self._vmas) + 4 > self.max_map_count:
                raise KernelError("ENOMEM", call, "max_map_count headroom")
            if fixed and old_len == new_len:
                result = yield from self._remap_move_op(addr, old_len, new_addr, call)
            else:
                vma, old_len, new_len = self._check_prep_vma(
                    self.vma_lookup(addr), addr, old_len, new_len, fixed, new_addr, call)
                if fixed:
                    result = yield from self._mremap_to_op(addr, old_len, new_len, new_addr,
                                                           call)
                else:
                    result = yield from self._mremap_at_op(vma, addr, old_len, new_len,
                                                           maymove, call)
        except KernelError:
            yield _UNLOCK_W
            raise
        yield _UNLOCK_W
        return Hva(result)

    def mremap(self, old_addr: int, old_len: int, new_len: int, *, maymove: bool = False,
               fixed_addr: int | None = None) -> Hva:
        """Sequential :meth:`mremap_op`."""
        return drive(self.mremap_op(old_addr, old_len, new_len, maymove=maymove,
                                    fixed_addr=fixed_addr))

    def _check_prep_vma(self, vma: Vma | None, addr: int, old_len: int, new_len: int,
                        fixed: bool, new_addr: int, call: str) -> tuple[Vma, int, int]:
        """``check_prep_vma``: per-VMA checks; returns the VMA and the (hugetlb-aligned)
        lengths."""
        if vma is None:
            raise KernelError("EFAULT", call, "no VMA at the old address")
        if vma.is_hugetlb():  # align_hugetlb
            old_len = (old_len + PMD_SIZE - 1) & _HPAGE_MASK
            new_len = (new_len + PMD_SIZE - 1) & _HPAGE_MASK
            if addr % PMD_SIZE or (fixed and new_addr % PMD_SIZE) or new_len > old_len:
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

    def _munmap_locked_op(self, start: int, length: int, call: str) -> Op[None]:
        """``do_munmap`` with mmap_lock held (the checks of munmap, then the unmap)."""
        vmas = self.vmas_in(start, start + length)
        if not vmas:
            return
        self._check_splits(vmas, start, start + length, call)
        yield from self._detach_range_op(start, start + length, vmas)

    def _mremap_at_op(self, vma: Vma, addr: int, old_len: int, new_len: int,
                      maymove: bool, call: str) -> Op[int]:
        """``mremap_at``: no resize, shrink in place, or ``expand_vma``."""
        if old_len == new_len:
            return addr
        if old_len > new_len:
            yield from self._munmap_locked_op(addr + new_len, old_len - new_len, call)
            return addr
        delta_end = vma.end + (new_len - old_len)
        if (vma.end - addr == old_len and delta_end <= TASK_SIZE
                and not self.vmas_in(vma.end, delta_end)):
            vma.end = Hva(delta_end)  # vma_merge_extend
            self._merge_around(vma)
            return addr
        if not maymove:
            raise KernelError("ENOMEM", call, "cannot grow in place without MREMAP_MAYMOVE")
        align = PAGE_SIZE
        if vma.is_anonymous() and new_len % PMD_SIZE == 0 and self.thp != "never":
            align = PMD_SIZE
        got = self.get_unmapped_area(new_len, align=align)
        if got is None:
            raise KernelError("ENOMEM", call, "no free range to move to")
        yield from self._move_vma_op(vma, addr, old_len, new_len, got, call)
        return got

    def _mremap_to_op(self, addr: int, old_len: int, new_len: int, new_addr: int,
                      call: str) -> Op[int]:
        """``mremap_to``: unmap the target, shrink the source if asked, move."""
        yield from self._munmap_locked_op(new_addr, new_len, call)
        if self.vma_lookup(addr) is None:
            raise KernelError("EFAULT", call, "source gone")
        if old_len > new_len:
            yield from self._munmap_locked_op(addr + new_len, old_len - new_len, call)
            old_len = new_len
        vma = self.vma_lookup(addr)
        if vma is None:
            raise KernelError("EFAULT", call, "source gone")
        yield from self._move_vma_op(vma, addr, old_len, new_len, new_addr, call)
        return new_addr

    def _remap_move_op(self, start: int, length: int, new_addr: int, call: str) -> Op[int]:
        """``remap_move``: a MREMAP_FIXED move without resize, across every VMA in the
        range, keeping the gaps between them; the range must start inside a VMA."""
        end = start + length
        pieces = [(v.start, v.end) for v in self.vmas_in(start, end)]
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
            vma = self.vma_lookup(sub)
            self._check_prep_vma(vma, sub, sub_len, sub_len, True, dest, call)
            got = yield from self._mremap_to_op(sub, sub_len, sub_len, dest, call)
            if result < 0:
                result = got
            target = got + sub_len
        return result

    def _move_vma_op(self, vma: Vma, old_addr: int, old_len: int, new_len: int,
                     new_addr: int, call: str = "mremap") -> Op[None]:
        """``move_vma``: ``copy_vma`` at the new place, ``move_page_tables``, unmap the old."""
        if len(self._vmas) + 2 > self.max_map_count:
            raise KernelError("ENOMEM", call, "max_map_count headroom")
        new_pgoff = vma.pgoff_of(old_addr)
        if vma.is_anonymous() and not vma.anon_vma:
            new_pgoff = new_addr >> PAGE_SHIFT  # copy_vma: never faulted, so it may merge
        new = Vma(new_addr, new_addr + new_len, vma.flags, vma.kind, vma.file, new_pgoff,
                  vma.anon_vma)
        if vma.resv:
            lo = new_pgoff >> 9
            hi = lo + (old_len >> 21)
            moved = [k for k in vma.resv if lo <= k < hi]
            for k in moved:
                del vma.resv[k]
            new.resv = dict.fromkeys(moved)
        self._link(new)
        if old_len:
            # move_page_tables: PTEs travel under MMU_NOTIFY_UNMAP of the old range
            rng = yield from self._notify_op(old_addr, old_addr + old_len, NotifierEvent.UNMAP)
            yield from self._move_ptes_op(old_addr, new_addr, old_len)
            yield from self._notify_end_op(rng)
        self._merge_around(new)
        olds = self.vmas_in(old_addr, old_addr + old_len) if old_len else []
        if olds:
            yield from self._detach_range_op(old_addr, old_addr + old_len, olds)

    def _move_ptes_op(self, old: int, new: int, length: int) -> Op[None]:
        """``move_page_tables``: whole THP PMDs move when both sides are 2 MiB aligned,
        other THPs are split first; PTEs move one by one."""
        pt = self.pt
        delta = new - old
        for idx in pt.indices(old, old + length):
            slot = pt.pmd.get(idx)
            base = idx << 21
            if isinstance(slot, int):
                if (base >= old and base + PMD_SIZE <= old + length
                        and (base + delta) % PMD_SIZE == 0):
                    del pt.pmd[idx]
                    pt.pmd[(base + delta) >> 21] = slot
                    continue
                if not self._is_hugetlb_leaf_at(slot):
                    yield from self._split_huge_pmd_op(idx)
        for idx in pt.indices(old, old + length):
            slot = pt.pmd.get(idx)
            if slot is None or isinstance(slot, int):
                continue
            base = idx << 21
            lo, hi = max(old, base), min(old + length, base + PMD_SIZE)
            arr = pt.view(slot)
            for i in np.flatnonzero(arr[(lo - base) >> PAGE_SHIFT : (hi - base) >> PAGE_SHIFT]):
                src = lo + (int(i) << PAGE_SHIFT)
                k = (src - base) >> PAGE_SHIFT
                e = int(arr[k])
                arr[k] = 0
                self._set_entry(src + delta, e)

    # ==================================================================================
    # THP split, migration
    # ==================================================================================

    def split_huge_pmd_op(self, hva: int) -> Op[None]:
        """``split_huge_pmd_address``: split the THP mapping ``hva`` into 4 KiB PTEs.

        MMU_NOTIFY_CLEAR over the 2 MiB; nothing happens if ``hva`` is not
        THP-mapped.  Raises KernelError EINVAL for a hugetlb mapping."""
        a = _ulong(hva, "split_huge_pmd: hva")
        yield _LOCK_R
        vma = self.vma_lookup(a)
        if vma is not None and vma.is_hugetlb():
            yield _UNLOCK_R
            raise KernelError("EINVAL", f"split_huge_pmd({a:#x})", "hugetlb pages do not split")
        if isinstance(self.pt.pmd.get(a >> 21), int):
            yield from self._split_huge_pmd_op(a >> 21)
        yield _UNLOCK_R

    def split_huge_pmd(self, hva: int) -> None:
        """Sequential :meth:`split_huge_pmd_op`."""
        drive(self.split_huge_pmd_op(hva))

    def migrate_op(self, hva: int) -> Op[Pfn]:
        """Migrate the folio mapped at ``hva`` to a new frame (``migrate_pages`` ->
        ``try_to_migrate_one`` -> ``remove_migration_ptes``); returns the new pfn
        mapped at ``hva``.

        Every mapping of the folio (this mm, or all mappings of a page-cache
        page) gets MMU_NOTIFY_CLEAR, its PTE becomes a migration entry, the
        content is copied, the PTEs point at the new frame.  Raises KernelError
        EFAULT (nothing migratable mapped there: no page, zero page, device
        memory), EBUSY (a PTE-mapped part of a THP), EAGAIN (the folio has
        references besides its mappings and the page cache, e.g. a GUP
        reference: the PTEs are restored, after the notifiers ran)."""
        a = _ulong(hva, "migrate: hva")
        call = f"migrate({a:#x})"
        pm = self.physmem
        yield _LOCK_R
        vma = self.vma_lookup(a)
        e, huge = self.pt.entry(a)
        err: KernelError | None = None
        if vma is None or not e & _P or e & (_S | PTE_MIGRATION):
            err = KernelError("EFAULT", call, "no migratable page mapped there")
        elif not huge and pm.is_compound(e >> PFN_SHIFT):
            err = KernelError("EBUSY", call, "PTE-mapped THP (split folios are not migrated)")
        yield _UNLOCK_R
        if err is not None:
            raise err
        old = e >> PFN_SHIFT
        return (yield from self._migrate_folio_op(old, huge, a))

    def migrate(self, hva: int) -> Pfn:
        """Sequential :meth:`migrate_op`."""
        return drive(self.migrate_op(hva))

    def _rmap_walk(self, head: int, huge: bool, hva: int) -> list[tuple[Mm, int]]:
        """``rmap_walk``: every (mm, address) mapping the folio ``head``."""
        pm = self.physmem
        out: list[tuple[Mm, int]] = []
        if pm.is_anon(head):
            return [(self, hva & (_HPAGE_MASK if huge else _PAGE_MASK))]
        vma = self.vma_lookup(hva)
        f = None if vma is None else vma.file
        if f is None:
            return [(self, hva & (_HPAGE_MASK if huge else _PAGE_MASK))]
        index = None
        for k, cached in f.cache.items():
            if cached == head:
                index = k
                break
        if index is None:
            return [(self, hva & (_HPAGE_MASK if huge else _PAGE_MASK))]
        pgoff = index * PAGES_PER_PMD if huge else index
        for mm, v in f.mappings:
            if v.pgoff <= pgoff < v.pgoff + v.npages:
                at = v.hva_of(pgoff)
                ent, _ = mm.pt.entry(at)
                if ent & _P and ent >> PFN_SHIFT == head:
                    out.append((mm, at))
        return out

    def _migrate_folio_op(self, old: int, huge: bool, hva: int) -> Op[Pfn]:
        pm = self.physmem
        lock = f"folio_lock:{old:#x}"
        yield acquire(lock)
        maps = self._rmap_walk(old, huge, hva)
        size = PMD_SIZE if huge else PAGE_SIZE
        # try_to_migrate: each mapping -> migration entry, under CLEAR notifications
        saved: list[tuple[Mm, int, int]] = []
        for mm, at in maps:
            rng = yield from mm._notify_op(at, at + size, NotifierEvent.CLEAR)
            ent, _ = mm.pt.entry(at)
            saved.append((mm, at, ent))
            mm._put_entry(at, huge, (ent & ~_P) | PTE_MIGRATION)
            yield from mm._notify_end_op(rng)
        # folio_migrate_mapping: refcount must be exactly mappings + page cache
        cached = 0 if pm.is_anon(old) else 1
        expected = len(maps) + cached
        if pm.page_count(old) != expected:
            for mm, at, ent in saved:  # remove_migration_ptes(folio, folio): undo
                mm._put_entry(at, huge, ent)
            yield release(lock)
            raise KernelError("EAGAIN", f"migrate({hva:#x})",
                              "folio has extra references (pinned or under GUP)")
        if huge:
            if pm.page_flags(old) & PG_HUGETLB:
                new = pm.alloc_hugetlb(reserved=False)
                if new is None:
                    for mm, at, ent in saved:
                        mm._put_entry(at, huge, ent)
                    yield release(lock)
                    raise KernelError("ENOMEM", f"migrate({hva:#x})", "hugetlb pool empty")
            else:
                new = pm.alloc_huge()
            n = PAGES_PER_PMD
        else:
            new = pm.alloc_page()
            n = 1
        keep = pm.page_flags(old) & (PG_ANON | PG_ANON_EXCLUSIVE | PG_DIRTY)
        for k in range(n):
            pm.copy_page(new + k, old + k)
            pm.set_flags(new + k, keep)
            pm._map[new + k - RAM_BASE_PFN] = pm._map[old + k - RAM_BASE_PFN]
            pm._map[old + k - RAM_BASE_PFN] = 0
        pm._ref[new - RAM_BASE_PFN] = expected
        if cached:
            vma = self.vma_lookup(hva)
            f = None if vma is None else vma.file
            if f is not None:
                for k, v in list(f.cache.items()):
                    if v == old:
                        f.cache[k] = new
        # remove_migration_ptes(folio, newfolio): no notification (a new mapping)
        for mm, at, ent in saved:
            mm._put_entry(at, huge, (new << PFN_SHIFT) | (ent & ((1 << PFN_SHIFT) - 1)))
        pm._ref[old - RAM_BASE_PFN] = 1
        pm.put_page(old)
        yield release(lock)
        return Pfn(new + ((hva >> PAGE_SHIFT) & (n - 1)))

    def _put_entry(self, at: int, huge: bool, ent: int) -> None:
        if huge:
            self.pt.pmd[at >> 21] = ent
        else:
            self._set_entry(at, ent)

    # ==================================================================================
    # aging (page_idle / reclaim): the young-bit notifiers
    # ==================================================================================

    def clear_young(self, start: int, end: int) -> bool:
        """``page_idle_clear_pte_refs`` / ``ptep_clear_young_notify`` over ``[start, end)``:
        clears the host accessed bits and asks every subscriber (``clear_young``);
        returns True if any was young."""
        s = _ulong(start, "clear_young: start")
        e = _ulong(end, "clear_young: end")
        young = self._clear_young_ptes(s, e)
        return self.notifiers.clear_young(Hva(s), Hva(e)) or young

    def clear_flush_young(self, start: int, end: int) -> bool:
        """``ptep_clear_flush_young_notify`` (reclaim's ``folio_referenced``)."""
        s = _ulong(start, "clear_flush_young: start")
        e = _ulong(end, "clear_flush_young: end")
        young = self._clear_young_ptes(s, e)
        return self.notifiers.clear_flush_young(Hva(s), Hva(e)) or young

    def test_young(self, start: int, end: int) -> bool:
        """``mmu_notifier_test_young`` or a host accessed bit in ``[start, end)``."""
        s = _ulong(start, "test_young: start")
        e = _ulong(end, "test_young: end")
        for idx in self.pt.indices(s, e):
            slot = self.pt.pmd[idx]
            if isinstance(slot, int):
                if slot & _Y:
                    return True
            else:
                base = idx << 21
                lo, hi = max(s, base), min(e, base + PMD_SIZE)
                if (self.pt.view(slot)[(lo - base) >> PAGE_SHIFT:(hi - base) >> PAGE_SHIFT]
                        & _Y).any():
                    return True
        return self.notifiers.test_young(Hva(s), Hva(e))

    def _clear_young_ptes(self, s: int, e: int) -> bool:
        young = False
        for idx in self.pt.indices(s, e):
            slot = self.pt.pmd[idx]
            if isinstance(slot, int):
                young |= bool(slot & _Y)
                self.pt.pmd[idx] = slot & ~_Y
            else:
                base = idx << 21
                lo, hi = max(s, base), min(e, base + PMD_SIZE)
                arr = self.pt.view(slot)[(lo - base) >> PAGE_SHIFT:(hi - base) >> PAGE_SHIFT]
                young |= bool((arr & _Y).any())
                arr &= ~_Y
        return young

    # ==================================================================================
    # what KVM uses (mm/gup.c); the functions live in kvmmem.host.gup
    # ==================================================================================

    def get_user_page_fast_only(self, hva: int, write: bool) -> Pfn | None:
        """:func:`kvmmem.host.gup.get_user_page_fast_only` on this mm."""
        return gup.get_user_page_fast_only(self, hva, write)

    def get_user_pages_op(self, hva: int, write: bool) -> Op[Pfn]:
        """:func:`kvmmem.host.gup.get_user_pages_op` on this mm."""
        return gup.get_user_pages_op(self, hva, write)

    def get_user_pages(self, hva: int, write: bool) -> Pfn:
        """Sequential :meth:`get_user_pages_op`."""
        return drive(gup.get_user_pages_op(self, hva, write))

    def follow_pfnmap(self, hva: int) -> tuple[Pfn, bool] | None:
        """:func:`kvmmem.host.gup.follow_pfnmap` on this mm."""
        return gup.follow_pfnmap(self, hva)

    def fixup_user_fault_op(self, hva: int, write: bool) -> Op[None]:
        """:func:`kvmmem.host.gup.fixup_user_fault_op` on this mm (caller holds mmap_lock)."""
        return gup.fixup_user_fault_op(self, hva, write)

    def fixup_user_fault(self, hva: int, write: bool) -> None:
        """Sequential :meth:`fixup_user_fault_op`."""
        drive(gup.fixup_user_fault_op(self, hva, write))

    # ==================================================================================
    # exit_mmap
    # ==================================================================================

    def close_op(self) -> Op[None]:
        """``exit_mmap``: ``mmu_notifier_release`` (every subscriber's ``release``, then
        the list is emptied), then everything is unmapped without further notifications."""
        if self.closed:
            return
        subs = self.notifiers.clear()
        for sub in subs:
            sub.release()
        yield _LOCK_W
        for vma in list(self._vmas.values()):
            self._unlink(vma)
            if vma.resv:
                self.physmem.hugetlb_unreserve(len(vma.resv))
                vma.resv = {}
        self._free_area_cache = self.mmap_base
        self._cached_hole_size = 0
        puts = yield from self._zap_op(0, TASK_SIZE)
        self._release(puts)
        self.pt.pmd.clear()
        self.closed = True
        yield _UNLOCK_W

    def close(self) -> None:
        """Sequential :meth:`close_op`."""
        drive(self.close_op())

    # ==================================================================================
    # state
    # ==================================================================================

    def snapshot(self) -> tuple[object, ...]:
        """A comparable picture of the whole host state this mm can reach: VMAs, page
        table, struct pages, page caches of mapped files (for "changed nothing" checks)."""
        files: dict[int, File] = {}
        for v in self._vmas.values():
            if v.file is not None:
                files[v.file.ino] = v.file
        return (
            tuple(v.snapshot() for v in self._vmas.values()),
            self.pt.snapshot(),
            self.physmem.snapshot(),
            tuple(files[k].snapshot() for k in sorted(files)),
            self._anon_vma_seq,
        )
