"""The host side of kvmmem: frames, VMAs, the host page table, GUP and MMU notifiers.

Public API (the contract in HOST_API.md)::

    from kvmmem.host import (Mm, PhysMem, File, Vma, VmaKind, HostSignal, NotifierEvent,
                             MmuNotifierRange, MmuNotifier, PROT_NONE, PROT_READ,
                             PROT_WRITE, PROT_EXEC)
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
