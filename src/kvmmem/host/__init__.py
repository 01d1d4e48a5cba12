"""The host side of kvmmem: frames, VMAs, the host page table, GUP and MMU notifiers.

Public API (the contract in HOST_API.md)::

    from kvmmem.host import (Mm, PhysMem, File, Vma, VmaKind, HostSignal, NotifierEvent,
                             MmuNotifierRange, MmuNotifier, PROT_NONE, PROT_READ,
                             PROT_WRITE, PROT_EXEC)

Modules, after the kernel files they mirror: ``physmem`` (struct page, the page
allocator), ``file`` (the page cache, ``mm/filemap.c``, ``mm/shmem.c``), ``vma``
(``struct vm_area_struct``, VM_* flags, smaps), ``pagetable`` (PTE tables and PMD
leaves, and the helpers that read them), ``mm_types`` (``struct mm_struct``: the
state, ``find_vma`` / ``vma_lookup``, the VM_FAULT_* codes), ``vma_tree``
(``mm/vma.c``: link, split, merge), ``memory`` (``mm/memory.c``:
``handle_mm_fault``, zap, ``remap_pfn_range``), ``huge_memory``, ``hugetlb``,
``uaccess`` (userspace loads and stores), ``mmap`` (``mm/mmap.c``: mmap, munmap,
``exit_mmap``), ``mprotect``, ``madvise``, ``mremap``, ``truncate``, ``migrate``,
``rmap`` (each after its ``mm/*.c``), ``memfd`` (the files a process maps), ``gup``
(``mm/gup.c``), ``notifier`` (``include/linux/mmu_notifier.h``), ``validate``
(consistency checks) and ``mm``: :class:`Mm`, one thin method per operation over
the free functions (each takes the mm first).  No module imports another that
imports it back (``tests/host/test_layout.py``).

Behaviour follows this host's kernel (6.18, x86-64, THP ``madvise``,
``use_zero_page=1``, no hugetlb pool); the differential test in
``tests/host/test_differential.py`` checks it against the real mm.

What the model leaves out or simplifies (by design, so far):

* one process per Mm and no fork: anonymous pages are always exclusive (COW only
  from the zero page, the huge zero page and page-cache pages of private file
  mappings); no KSM, swap, writeback, reclaim (MADV_PAGEOUT changes nothing),
  khugepaged collapse or deferred THP splitting (a partly unmapped THP stays
  allocated until its last PTE goes); no userfaultfd, mlock, mseal, protection
  keys (PROT_EXEC-only memory is readable, as on x86 without PKU) or soft-dirty;
  no MAP_SHARED anonymous memory, no MREMAP_DONTUNMAP;
* VMA merging follows ``vma_merge``'s rules (equal flags, same file, contiguous
  pgoff, compatible anon_vma, never VM_SPECIAL) at the edges of the range an
  operation changed; anon_vma chains, ``anon_name`` and uffd contexts are not
  modelled;
* page tables: one PTE table per 2 MiB; ``free_pgtables`` frees a table when no
  VMA overlaps its 2 MiB, MADV_DONTNEED frees tables it emptied entirely
  (``CONFIG_PT_RECLAIM``); mprotect's notifier range starts at the first 1 GiB
  region holding a table, as ``change_pud_range`` does;
* placement: fixed ``mmap_base`` (no randomisation), 2 MiB alignment for
  anonymous mappings whose length is a multiple of 2 MiB;
* hugetlb: 2 MiB pages only, reservations per page index, no PMD sharing;
* migration: order-0 pages and PMD-mapped folios (a PTE-mapped THP is EBUSY);
* hwpoison only marks a frame (accesses SIGBUS, GUP EHWPOISON), nothing is unmapped;
* device memory: ``remap_pfn_range`` maps 4 KiB PTEs (no huge PFNMAP) and sets
  ``vm_pgoff`` to the base pfn; device-lazy VMAs keep the file offset;
* content: a frame is one fill byte until a non-uniform store makes its 4 KiB
  bytearray.
"""

from kvmmem.host.file import File, FileKind
from kvmmem.host.mm import MADVICE, MMAP_BASE, TASK_SIZE, HostSignal, Mm
from kvmmem.host.notifier import (
    MmuNotifier,
    MmuNotifierRange,
    MmuNotifierSubscriptions,
    NotifierEvent,
    RecordingNotifier,
)
from kvmmem.host.pagetable import HostPte
from kvmmem.host.physmem import PhysMem
from kvmmem.host.vma import (
    PROT_EXEC,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    VM_ACCOUNT,
    VM_DONTDUMP,
    VM_DONTEXPAND,
    VM_EXEC,
    VM_HUGEPAGE,
    VM_HUGETLB,
    VM_IO,
    VM_MAYEXEC,
    VM_MAYREAD,
    VM_MAYSHARE,
    VM_MAYWRITE,
    VM_MIXEDMAP,
    VM_NOHUGEPAGE,
    VM_NORESERVE,
    VM_PFNMAP,
    VM_READ,
    VM_SHARED,
    VM_WRITE,
    Vma,
    VmaKind,
)

__all__ = [
    "MADVICE",
    "MMAP_BASE",
    "PROT_EXEC",
    "PROT_NONE",
    "PROT_READ",
    "PROT_WRITE",
    "TASK_SIZE",
    "VM_ACCOUNT",
    "VM_DONTDUMP",
    "VM_DONTEXPAND",
    "VM_EXEC",
    "VM_HUGEPAGE",
    "VM_HUGETLB",
    "VM_IO",
    "VM_MAYEXEC",
    "VM_MAYREAD",
    "VM_MAYSHARE",
    "VM_MAYWRITE",
    "VM_MIXEDMAP",
    "VM_NOHUGEPAGE",
    "VM_NORESERVE",
    "VM_PFNMAP",
    "VM_READ",
    "VM_SHARED",
    "VM_WRITE",
    "File",
    "FileKind",
    "HostPte",
    "HostSignal",
    "Mm",
    "MmuNotifier",
    "MmuNotifierRange",
    "MmuNotifierSubscriptions",
    "NotifierEvent",
    "PhysMem",
    "RecordingNotifier",
    "Vma",
    "VmaKind",
]
