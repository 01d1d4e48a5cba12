"""VMAs: ``struct vm_area_struct``, the VM_* flags and how /proc shows them.

Bit values are those of ``include/linux/mm.h``; :meth:`Vma.vm_flags_names`
gives the ``VmFlags:`` mnemonics of ``/proc/PID/smaps`` in bit order
(``show_smap_vma_flags`` in ``fs/proc/task_mmu.c``) and
:meth:`Vma.maps_perms` the permission column of ``/proc/PID/maps``
(``show_map_vma``).
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

from kvmmem.errors import InputError
from kvmmem.types import PAGES_4K, Hva, PageGeometry

if TYPE_CHECKING:
    from kvmmem.host.file import File

# --- mmap(2) protections (include/uapi/asm-generic/mman-common.h) ---------------
PROT_NONE = 0x0
PROT_READ = 0x1
PROT_WRITE = 0x2
PROT_EXEC = 0x4
PROT_SEM = 0x8
PROT_GROWSDOWN = 0x01000000
PROT_GROWSUP = 0x02000000

# --- VM_* flags (include/linux/mm.h) -----------------------------------------
VM_NONE = 0x00000000
VM_READ = 0x00000001
VM_WRITE = 0x00000002
VM_EXEC = 0x00000004
VM_SHARED = 0x00000008
VM_MAYREAD = 0x00000010
VM_MAYWRITE = 0x00000020
VM_MAYEXEC = 0x00000040
VM_MAYSHARE = 0x00000080
VM_GROWSDOWN = 0x00000100
VM_UFFD_MISSING = 0x00000200
VM_PFNMAP = 0x00000400
VM_UFFD_WP = 0x00001000
VM_LOCKED = 0x00002000
VM_IO = 0x00004000
VM_SEQ_READ = 0x00008000
VM_RAND_READ = 0x00010000
VM_DONTCOPY = 0x00020000
VM_DONTEXPAND = 0x00040000
VM_LOCKONFAULT = 0x00080000
VM_ACCOUNT = 0x00100000
VM_NORESERVE = 0x00200000
VM_HUGETLB = 0x00400000
VM_SYNC = 0x00800000
VM_ARCH_1 = 0x01000000
VM_WIPEONFORK = 0x02000000
VM_DONTDUMP = 0x04000000
VM_SOFTDIRTY = 0x08000000
VM_MIXEDMAP = 0x10000000
VM_HUGEPAGE = 0x20000000
VM_NOHUGEPAGE = 0x40000000
VM_MERGEABLE = 0x80000000
# the high flags of 64-bit kernels (VM_HIGH_ARCH_n = bit 32 + n)
VM_MTE = 1 << 32
"""arm64 ``VM_MTE`` (``VM_HIGH_ARCH_0``): the mapping uses tagged memory (PROT_MTE)."""
VM_MTE_ALLOWED = 1 << 33
"""arm64 ``VM_MTE_ALLOWED`` (``VM_HIGH_ARCH_1``): the memory can hold MTE tags
(``arch_calc_vm_flag_bits``: anonymous memory, shmem; hugetlb as the release has it)."""
VM_ALLOW_ANY_UNCACHED = 1 << 39
"""``VM_ALLOW_ANY_UNCACHED`` (v6.9, 5c656fcdd6c6 "mm: Introduce new flag to indicate wc
safe"): KVM may map the device memory with any non-cacheable type (arm64 Normal-NC)."""

VM_ACCESS_FLAGS = VM_READ | VM_WRITE | VM_EXEC
VM_SPECIAL = VM_IO | VM_DONTEXPAND | VM_PFNMAP | VM_MIXEDMAP
"""Never merged, never mlocked, never THP (``VM_SPECIAL``)."""
VM_NO_KHUGEPAGED = VM_SPECIAL | VM_HUGETLB

# show_smap_vma_flags(): one two-letter mnemonic per bit, printed in bit order
SMAPS_MNEMONICS: dict[int, str] = {
    VM_READ: "rd",
    VM_WRITE: "wr",
    VM_EXEC: "ex",
    VM_SHARED: "sh",
    VM_MAYREAD: "mr",
    VM_MAYWRITE: "mw",
    VM_MAYEXEC: "me",
    VM_MAYSHARE: "ms",
    VM_GROWSDOWN: "gd",
    VM_UFFD_MISSING: "um",
    VM_PFNMAP: "pf",
    VM_UFFD_WP: "uw",
    VM_LOCKED: "lo",
    VM_IO: "io",
    VM_SEQ_READ: "sr",
    VM_RAND_READ: "rr",
    VM_DONTCOPY: "dc",
    VM_DONTEXPAND: "de",
    VM_LOCKONFAULT: "lf",
    VM_ACCOUNT: "ac",
    VM_NORESERVE: "nr",
    VM_HUGETLB: "ht",
    VM_SYNC: "sf",
    VM_ARCH_1: "ar",
    VM_WIPEONFORK: "wf",
    VM_DONTDUMP: "dd",
    VM_SOFTDIRTY: "sd",
    VM_MIXEDMAP: "mm",
    VM_HUGEPAGE: "hg",
    VM_NOHUGEPAGE: "nh",
    VM_MERGEABLE: "mg",
}


def calc_vm_prot_bits(prot: int) -> int:
    """``calc_vm_prot_bits()``: PROT_* to VM_READ/WRITE/EXEC."""
    return prot & (PROT_READ | PROT_WRITE | PROT_EXEC)  # same bit positions


def vm_flags_names(flags: int) -> list[str]:
    """The smaps ``VmFlags:`` mnemonics of ``flags``, in bit order."""
    return [name for bit, name in SMAPS_MNEMONICS.items() if flags & bit]


class VmaKind(StrEnum):
    """The kinds of host mapping SCENARIOS.md names."""

    ANON = "anon"  # MAP_PRIVATE|MAP_ANONYMOUS
    MEMFD = "memfd"  # MAP_SHARED of a memfd (shmem)
    FILE = "file"  # MAP_PRIVATE of a file
    FILE_SHARED = "file-shared"  # MAP_SHARED of a file
    HUGETLB = "hugetlb"  # MAP_HUGETLB (PMD-sized pages: 2 MiB with 4 KiB base pages)
    THP = "thp"  # anonymous + MADV_HUGEPAGE
    DEVICE = "device"  # VM_IO|VM_PFNMAP, every frame remapped at mmap (remap_pfn_range)
    DEVICE_LAZY = "device-lazy"  # VM_IO|VM_PFNMAP, frames inserted by the fault handler
    DMABUF = "dmabuf"  # VM_PFNMAP over RAM pages a driver pinned, inserted on fault
    VFIO_BAR = "vfio-bar"  # a PCI BAR mapped through vfio-pci (kvmmem.host.vfio)
    DEVICE_CACHEABLE = "device-cacheable"  # cacheable device memory, remapped at mmap
    GUEST_MEMFD = "guest_memfd"  # MAP_SHARED of a guest_memfd (kvm_gmem_mmap)

    @classmethod
    def parse(cls, kind: object) -> VmaKind:
        """A :class:`VmaKind` from itself or its scenario name; InputError otherwise."""
        if isinstance(kind, VmaKind):
            return kind
        if isinstance(kind, str):
            try:
                return cls(kind)
            except ValueError:
                pass
        names = ", ".join(k.value for k in cls)
        raise InputError(f"kind: {kind!r} is not a mapping kind ({names})")


class Vma:
    """``struct vm_area_struct``: one mapping ``[start, end)`` of an address space.

    ``flags`` holds VM_* bits, ``pgoff`` is ``vm_pgoff`` (file offset in pages;
    for private anonymous memory the page number of the address it was first
    mapped at, as ``do_mmap`` sets it), ``anon_vma`` identifies the anon_vma
    (0: none yet; assigned on the first anonymous page, ``anon_vma_prepare``).
    ``resv`` lists the hugetlb page indices still reserved (private hugetlb).
    ``pg`` is the host's page geometry (what ``PAGE_SHIFT`` and the hugetlb size are).
    """

    __slots__ = ("anon_vma", "end", "file", "flags", "kind", "pg", "pgoff", "resv", "start")

    def __init__(
        self,
        start: int,
        end: int,
        flags: int,
        kind: VmaKind,
        file: File | None = None,
        pgoff: int = 0,
        anon_vma: int = 0,
        *,
        pg: PageGeometry = PAGES_4K,
    ) -> None:
        self.start = Hva(start)
        self.end = Hva(end)
        self.flags = flags
        self.kind = kind
        self.file = file
        self.pgoff = pgoff
        self.anon_vma = anon_vma
        self.pg = pg
        self.resv: dict[int, None] = {}

    @property
    def cacheable(self) -> bool:
        """The memory type of ``vm_page_prot`` is cacheable: everything but a device
        driver's mapping (``pgprot_device`` / ``pgprot_noncached``: vfio-pci's BARs
        too); a dma-buf of RAM pages and Grace-style device memory (``device-cacheable``,
        nvgrace-gpu's usemem region) keep the default cacheable type."""
        return self.kind not in (VmaKind.DEVICE, VmaKind.DEVICE_LAZY, VmaKind.VFIO_BAR)

    def __repr__(self) -> str:
        return (
            f"Vma({self.start:#x}-{self.end:#x} {self.maps_perms()} {self.kind.value}"
            f" pgoff={self.pgoff:#x} [{' '.join(self.vm_flags_names())}])"
        )

    # --- geometry ----------------------------------------------------------------

    @property
    def npages(self) -> int:
        """Size in (base) pages."""
        return (self.end - self.start) >> self.pg.page_shift

    @property
    def page_shift(self) -> int:
        """``vma_kernel_pagesize`` as a shift: the hstate's for hugetlb (the PMD's: 21 with
        4 KiB pages), else ``PAGE_SHIFT``."""
        return self.pg.pmd_shift if self.flags & VM_HUGETLB else self.pg.page_shift

    def contains(self, hva: int) -> bool:
        """``start <= hva < end``."""
        return self.start <= hva < self.end

    def pgoff_of(self, hva: int) -> int:
        """``linear_page_index()``: the file page (or anon index) mapped at ``hva``."""
        return self.pgoff + ((hva - self.start) >> self.pg.page_shift)

    def hva_of(self, pgoff: int) -> Hva:
        """The address at which file page ``pgoff`` is mapped (may lie outside the VMA)."""
        return Hva(self.start + ((pgoff - self.pgoff) << self.pg.page_shift))

    # --- flags -------------------------------------------------------------------

    @property
    def prot(self) -> int:
        """The PROT_* bits (VM_READ/WRITE/EXEC)."""
        return self.flags & (VM_READ | VM_WRITE | VM_EXEC)

    def is_shared(self) -> bool:
        """``VM_SHARED``: writes reach the page cache (a writable shared mapping)."""
        return bool(self.flags & VM_SHARED)

    def is_pfnmap(self) -> bool:
        """``VM_IO | VM_PFNMAP``: no struct-page mapping (GUP refuses it)."""
        return bool(self.flags & (VM_IO | VM_PFNMAP))

    def is_hugetlb(self) -> bool:
        """``is_vm_hugetlb_page()``."""
        return bool(self.flags & VM_HUGETLB)

    def is_anonymous(self) -> bool:
        """``vma_is_anonymous()``: private anonymous memory (no file, no vm_ops)."""
        return self.kind is VmaKind.ANON or self.kind is VmaKind.THP

    def vm_flags_names(self) -> list[str]:
        """The smaps ``VmFlags:`` mnemonics in bit order, e.g. ``["rd", "wr", "mr", "mw"]``."""
        return vm_flags_names(self.flags)

    def maps_perms(self) -> str:
        """The /proc/PID/maps permission column, e.g. ``"rw-p"`` (``s`` for VM_MAYSHARE)."""
        f = self.flags
        return (
            ("r" if f & VM_READ else "-")
            + ("w" if f & VM_WRITE else "-")
            + ("x" if f & VM_EXEC else "-")
            + ("s" if f & VM_MAYSHARE else "p")
        )

    def maps_name(self) -> str:
        """The pathname column of /proc/PID/maps (``""`` for anonymous memory)."""
        if self.file is None:
            return ""
        return self.file.maps_name()

    def snapshot(self) -> tuple[object, ...]:
        """A comparable picture of this VMA."""
        return (
            self.start,
            self.end,
            self.flags,
            self.kind.value,
            None if self.file is None else self.file.ino,
            self.pgoff,
            self.anon_vma,
            tuple(self.resv),
        )
