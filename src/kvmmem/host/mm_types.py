"""``struct mm_struct``: the state of one address space and the lookups on its VMAs.

:class:`MmStruct` holds what ``include/linux/mm_types.h`` declares for an mm: the
VMA tree (``mm_mt``), the host page table, the MMU-notifier subscriptions,
placement state and counters, with the read-only VMA lookups (``find_vma``,
``vma_lookup``).  Everything that changes the address space is a free function
taking the mm first, in the module named after the kernel file it mirrors
(``mmap``, ``mprotect``, ``madvise``, ``mremap``, ``truncate``, ``memory``,
``huge_memory``, ``hugetlb``, ``migrate``, ``rmap``, ``uaccess``); the public
:class:`~kvmmem.host.mm.Mm` adds one method per operation on top.

Also here, because every operation needs them: the ``VM_FAULT_*`` results of
``handle_mm_fault`` (``enum vm_fault_reason``), the ``mmap_lock`` pause tokens,
:class:`HostSignal`, and the MMU-notifier start/end pair each operation wraps
around a PTE change (``mmu_notifier_invalidate_range_start`` / ``_end``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sortedcontainers import SortedDict

from kvmmem.errors import InputError, KvmmemError
from kvmmem.host.file import File
from kvmmem.host.notifier import MmuNotifierRange, MmuNotifierSubscriptions, NotifierEvent
from kvmmem.host.pagetable import PageTable
from kvmmem.host.physmem import PhysMem
from kvmmem.host.vma import Vma
from kvmmem.sync import Op, acquire, point, release
from kvmmem.types import Hva, PageGeometry, page_geometry

TASK_SIZE = 0x7FFFFFFFF000
"""x86-64 user address-space top with 4-level paging (``TASK_SIZE_MAX``)."""
MMAP_BASE = 0x7F0000000000
"""Where top-down placement starts (``mm->mmap_base``, without randomisation)."""
MMAP_MIN_ADDR = 0x10000
"""Lowest address top-down placement hands out (``mmap_min_addr``)."""
DEFAULT_MAX_MAP_COUNT = 65530
"""``sysctl_max_map_count`` default."""

# handle_mm_fault() results (the VM_FAULT_* bits that matter here)
VM_FAULT_OK = 0
VM_FAULT_OOM = 0x1
VM_FAULT_SIGBUS = 0x2
VM_FAULT_HWPOISON = 0x10
VM_FAULT_SIGSEGV = 0x40
VM_FAULT_RETRY = 0x400
VM_FAULT_FALLBACK = 0x800
"""A ``huge_fault`` handler declined the size: the fault goes on at the next level."""
VM_FAULT_ERROR = VM_FAULT_OOM | VM_FAULT_SIGBUS | VM_FAULT_HWPOISON | VM_FAULT_SIGSEGV

MMAP_LOCK = "mmap_lock"
MMAP_WRITE_LOCK = acquire(MMAP_LOCK)
MMAP_WRITE_UNLOCK = release(MMAP_LOCK)
MMAP_READ_LOCK = acquire(MMAP_LOCK, shared=True)
MMAP_READ_UNLOCK = release(MMAP_LOCK, shared=True)
PTE_CHANGED = point("pte_changed")
MIGRATION_WAIT = point("migration_entry_wait")


@contextmanager
def mm_changing(mm: MmStruct, *ranges: tuple[int, int]) -> Iterator[None]:
    """Publish ``ranges`` in :attr:`MmStruct.changes_in_flight` for the block (an
    operation holding ``mmap_lock`` around its VMA and PTE changes)."""
    mm.changes_in_flight.extend(ranges)
    try:
        yield
    finally:
        for r in ranges:
            mm.changes_in_flight.remove(r)


class HostSignal(KvmmemError):
    """A userspace access got a signal: ``signal`` is ``"SIGSEGV"`` or ``"SIGBUS"``.

    ``addr`` is the faulting address (``si_addr``).  The access changed no
    memory content."""

    def __init__(self, signal: str, addr: int) -> None:
        self.signal = signal
        self.addr = Hva(addr)
        super().__init__(f"{signal} at {addr:#x}")


class MmStruct:
    """One process address space: VMAs, host page table, MMU-notifier subscribers.

    ``physmem`` is shared by every address space of a host (a fresh one is made
    when omitted).  ``thp`` is ``/sys/kernel/mm/transparent_hugepage/enabled``
    (this host: ``"madvise"``).  ``mm_mt`` is the VMA tree (start -> Vma).

    ``page_size`` is the host kernel's ``PAGE_SIZE`` (4096; 16384 or 65536 for an arm64
    kernel built with 16 KiB or 64 KiB pages), a property of the host: it must match
    ``physmem``'s when both are given (InputError), and is ``physmem``'s when only that
    is.  Every path whose answer depends on it reads :attr:`pg`."""

    def __init__(
        self,
        physmem: PhysMem | None = None,
        *,
        thp: str = "madvise",
        mmap_base: int = MMAP_BASE,
        max_map_count: int = DEFAULT_MAX_MAP_COUNT,
        page_size: int | PageGeometry | None = None,
    ) -> None:
        if physmem is not None and not isinstance(physmem, PhysMem):
            raise InputError(f"physmem: expected a PhysMem, got {physmem!r}")
        if thp not in ("always", "madvise", "never"):
            raise InputError(f"thp: expected always|madvise|never, got {thp!r}")
        if physmem is None:
            physmem = PhysMem() if page_size is None else PhysMem(page_size=page_size)
        elif page_size is not None and page_geometry(page_size) is not physmem.pg:
            raise InputError(f"page_size: {page_geometry(page_size).name} differs from the "
                             f"physmem's {physmem.pg.name} pages (one page size per host)")
        self.physmem = physmem
        self.pg: PageGeometry = physmem.pg
        """The host's page geometry (``PAGE_SIZE``, ``PMD_SIZE``, ...: kvmmem.types)."""
        self.page_size = self.pg.page_size
        self.page_shift = self.pg.page_shift
        self.thp = thp
        self.mmap_base = mmap_base
        self.max_map_count = max_map_count
        self.hugetlb_madv_dontneed = True
        """``MADV_DONTNEED`` works on hugetlb VMAs (v5.18, 90e7e7f5ef3f "mm: enable
        MADV_DONTNEED for hugetlb mappings"); before, EINVAL.  A VM sets it from its
        variant's release (kvmmem.variants, ``hugetlb_madv_dontneed``)."""
        # --- the host kernel's release and CPU, as a VM sets them (kvmmem.kvm.vm) ---
        self.vfio_pci_mmap = 3
        """How vfio-pci maps a BAR (kvmmem.host.vfio, variant switch ``vfio_pci_mmap``)."""
        self.vfio_huge_fault_pfn_check = True
        """vfio-pci's huge_fault checks the pfn's alignment (v6.13, 09dfc8a5f2ce)."""
        self.vfio_huge_fault_align = True
        """vfio-pci's huge_fault aligns the address down to the order (v6.15,
        c1d9dac0db16)."""
        self.vfio_allow_any_uncached = True
        """vfio-pci sets VM_ALLOW_ANY_UNCACHED on its BAR mappings (v6.9, a39d3a966a09)."""
        self.huge_pfnmap: tuple[str, ...] = ("pmd",)
        """The levels of special huge leaves a driver's ``huge_fault`` may insert
        (``CONFIG_ARCH_SUPPORTS_PUD_PFNMAP``: x86; ``_PMD_PFNMAP``: x86 and arm64)."""
        self.mte = False
        """``system_supports_mte()``: the CPU has MTE (arm64 ``cpu_features`` mte)."""
        self.hugetlb_mte_allowed = True
        """Anonymous MAP_HUGETLB gets VM_MTE_ALLOWED (variant ``hugetlb_mte_allowed``)."""
        self.pt = PageTable(self.pg)
        self.notifiers = MmuNotifierSubscriptions()
        self.mm_mt: Any = SortedDict()  # start -> Vma
        self.anon_vma_seq = 0
        self.ino_seq = 0
        self._vmacache: Vma | None = None  # last VMA found; a memo, left out of state fingerprints
        self.fdtable: dict[int, object] = {}
        """The process's open files that are not mappings' own (``current->files``): a
        guest_memfd is installed here (kvmmem.kvm.guest_memfd) for REGION2 to name."""
        self.changes_in_flight: list[tuple[int, int]] = []
        """Host ranges ``[start, end)`` an address-space change is working on while
        it holds ``mmap_lock`` (:func:`mm_changing`).  Not kernel state: what a
        checker of half-done states reads (the VMAs may already say what the
        PTEs only say after the invalidation).  Left out of state fingerprints:
        it follows from where the changing thread is paused."""
        self.free_area_cache = mmap_base
        self.cached_hole_size = 0
        self.closed = False
        self.stats: dict[str, int] = {
            "faults": 0,
            "cow": 0,
            "thp_faults": 0,
            "zero_page_maps": 0,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.mm_mt)} vmas)"

    def install_fd(self, obj: object) -> int:
        """``get_unused_fd_flags`` + ``fd_install``: the lowest fd above stdin, stdout and
        stderr that is free (also the first free one the model hands out)."""
        fd = 3
        while fd in self.fdtable:
            fd += 1
        self.fdtable[fd] = obj
        return fd

    def find_vma(self, hva: int) -> Vma | None:
        """``find_vma()``: the first VMA with ``end > hva``, or None."""
        vmas = self.mm_mt
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
        vmas = self.mm_mt
        i = vmas.bisect_right(hva)
        if i:
            vma: Vma = vmas.peekitem(i - 1)[1]
            if vma.end > hva:
                self._vmacache = vma
                return vma
        return None

    def vmacache_invalidate(self) -> None:
        """``vmacache_invalidate``: forget the last VMA found (after any unlink)."""
        self._vmacache = None

    def for_each_vma(self) -> Iterator[Vma]:
        """``for_each_vma()``: every VMA in address order."""
        return iter(list(self.mm_mt.values()))

    def vmas_in(self, start: int, end: int) -> list[Vma]:
        """The VMAs intersecting ``[start, end)``, in address order."""
        out: list[Vma] = []
        vmas = self.mm_mt
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

    def vma_prev(self, vma: Vma) -> Vma | None:
        i = self.mm_mt.index(vma.start)
        if i == 0:
            return None
        prev: Vma = self.mm_mt.peekitem(i - 1)[1]
        return prev

    def vma_next(self, vma: Vma) -> Vma | None:
        i = self.mm_mt.index(vma.start)
        if i + 1 >= len(self.mm_mt):
            return None
        nxt: Vma = self.mm_mt.peekitem(i + 1)[1]
        return nxt

    @property
    def map_count(self) -> int:
        """``mm->map_count``: number of VMAs."""
        return len(self.mm_mt)

    def new_ino(self) -> int:
        """The next inode number for a file this process creates."""
        self.ino_seq += 1
        return self.ino_seq

    def snapshot(self) -> tuple[object, ...]:
        """A comparable picture of the whole host state this mm can reach: VMAs, page
        table, struct pages, page caches of mapped files (for "changed nothing" checks)."""
        files: dict[int, File] = {}
        for v in self.mm_mt.values():
            if v.file is not None:
                files[v.file.ino] = v.file
        return (
            tuple(v.snapshot() for v in self.mm_mt.values()),
            self.pt.snapshot(),
            self.physmem.snapshot(),
            tuple(files[k].snapshot() for k in sorted(files)),
            self.anon_vma_seq,
        )


# --- the MMU-notifier pair around a PTE change -----------------------------------


def invalidate_range_start_op(
    mm: MmStruct, start: int, end: int, event: NotifierEvent
) -> Op[MmuNotifierRange]:
    """``mmu_notifier_invalidate_range_start``: every subscriber's start callback for
    ``[start, end)``; returns the range to end."""
    rng = MmuNotifierRange(Hva(start), Hva(end), event)
    yield from mm.notifiers.invalidate_range_start(rng)
    return rng


def invalidate_range_end_op(mm: MmStruct, rng: MmuNotifierRange) -> Op[None]:
    """``mmu_notifier_invalidate_range_end`` after the PTE change (the ``pte_changed``
    pause comes first)."""
    yield PTE_CHANGED
    yield from mm.notifiers.invalidate_range_end(rng)
