"""The x86 guest's machine state: its page tables and long-mode registers.

The routines themselves are encoded by :mod:`kvmmem.realkvm.x86_code` with
iced-x86 on the host (no hand-written instruction bytes); this module is
stdlib-only, so the agent inside an emulated x86 machine can build the rest.

The guest is a 64-bit long-mode program whose every routine ends in a
*doorbell*: a store of ``rax`` to a guest physical address that no memslot
covers, which leaves the VM as ``KVM_EXIT_MMIO`` (kvm-on-this-host.md §2).  The
host sets the registers, enters the guest, and the doorbell exit tells it the
routine is done (with the value read in the exit's data).  A routine performs
exactly one scenario access, so host operations interleave with guest
accesses exactly where a scenario puts them.

Two execution modes of the same code (:data:`PATHS`):

* ``native`` - CPL3 (user mode, ``U=1`` in every guest page-table entry).  On
  a PVM host this runs on KVM's shadow page tables and its accesses take
  KVM's real fault path; on VMX/SVM hosts any mode would.
* ``emulated`` - CPL0 long mode.  On a PVM host KVM's instruction emulator
  runs every instruction (guest memory reached through
  ``kvm_vcpu_read/write_guest``, failures become MMIO exits).

Registers a routine uses: ``rsi`` address, ``rax`` value, ``rdi`` doorbell,
``rcx`` count, ``rdx`` stride, ``rbx`` a second MMIO address.

Guest page tables identity-map guest physical memory with 2 MiB pages
(``PDE = gpa | P | RW | U | A | D | PS``), one page directory per GiB that a scenario
touches, so THP/hugetlb-backed slots can get 2 MiB SPTEs.  Guest virtual
address = guest physical address below 2^47; a GiB above it is reached through
an alias GiB of the lower half (a PVM guest's user mode cannot touch the upper
half), chosen by the harness.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

from kvmmem.realkvm.structs import kvm_segment, kvm_sregs
from kvmmem.types import PAGE_SIZE, GiB

PATHS = ("native", "emulated")

# Long-mode control state (Intel SDM vol. 3, 2.5 / 4.5): PE|MP|ET|NE|WP|AM|PG,
# CR4.PAE, EFER.SCE|LME|LMA|NXE.
CR0_LONG = 0x80050033
CR4_PAE = 0x20
EFER_LONG = 0xD01
RFLAGS_DEFAULT = 0x202
RFLAGS_TF = 0x100

PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_US = 1 << 2
PTE_A = 1 << 5
PTE_D = 1 << 6
PTE_PS = 1 << 7
TABLE_FLAGS = PTE_P | PTE_RW | PTE_US | PTE_A
PDE_2M_FLAGS = PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D | PTE_PS
"""Leaf entries are created accessed and dirty: with shadow paging KVM write-protects
the SPTE of a clean guest PTE so that it can set D on the first write
(``FNAME(protect_clean_gpte)``), which a TDP (EPT/NPT) host never does.  Pre-set A/D
bits make a read fault map as a TDP host would (a writable SPTE where the host page is
writable, marked dirty in a dirty-logged slot: ``make_spte``)."""

ROUTINE_STRIDE = 0x80
"""Bytes reserved per routine in the code page."""


# --- addresses -----------------------------------------------------------------------


LOWER_HALF = 1 << 47
"""Guest virtual addresses below this are canonical lower-half (user) addresses."""


# --- page tables ---------------------------------------------------------------------


@dataclass(slots=True)
class PageTables:
    """Identity-mapping guest page tables built in host memory that backs guest
    physical ``[base_gpa, base_gpa + size)`` at host address ``base_hva``.

    The PML4 is the first page; PDPTs and page directories are allocated as
    :meth:`map_gib` needs them.  Tables only ever gain entries (a non-present
    entry becoming present needs no TLB flush)."""

    base_gpa: int
    base_hva: int
    size: int
    next_page: int = 1
    pdpts: dict[int, int] = field(default_factory=dict)
    pds: dict[int, int] = field(default_factory=dict)
    targets: dict[int, int] = field(default_factory=dict)
    """Virtual GiB -> the guest physical GiB it maps."""

    def __post_init__(self) -> None:
        ctypes.memset(self.base_hva, 0, PAGE_SIZE)

    @property
    def cr3(self) -> int:
        """The guest physical address of the PML4."""
        return self.base_gpa

    def _alloc(self) -> int:
        offset = self.next_page * PAGE_SIZE
        if offset + PAGE_SIZE > self.size:
            raise MemoryError("the harness page-table area is full")
        self.next_page += 1
        ctypes.memset(self.base_hva + offset, 0, PAGE_SIZE)
        return offset

    def _set(self, table_offset: int, index: int, value: int) -> None:
        ctypes.c_uint64.from_address(self.base_hva + table_offset + index * 8).value = value

    def is_mapped(self, va_gib: int) -> bool:
        """Whether virtual GiB number ``va_gib`` is mapped."""
        return va_gib in self.pds

    def map_gib(self, va_gib: int, pa_gib: int | None = None) -> None:
        """Map guest virtual GiB ``va_gib`` (a lower-half address: ``va_gib < 2^17``) onto
        guest physical GiB ``pa_gib`` (default: the same, an identity map) with 2 MiB
        pages.  Idempotent.  Raises ``MemoryError`` when the table area is full."""
        if va_gib in self.pds:
            return
        if pa_gib is None:
            pa_gib = va_gib
        pml4_index = (va_gib >> 9) & 0x1FF
        if pml4_index not in self.pdpts:
            pdpt = self._alloc()
            self.pdpts[pml4_index] = pdpt
            self._set(0, pml4_index, (self.base_gpa + pdpt) | TABLE_FLAGS)
        pd = self._alloc()
        for i in range(512):
            self._set(pd, i, (pa_gib * GiB + i * (2 << 20)) | PDE_2M_FLAGS)
        self._set(self.pdpts[pml4_index], va_gib & 0x1FF, (self.base_gpa + pd) | TABLE_FLAGS)
        self.pds[va_gib] = pd
        self.targets[va_gib] = pa_gib


# --- segment state ----------------------------------------------------------------------


def _segment(seg: kvm_segment, selector: int, code: bool, dpl: int) -> None:
    seg.base = 0
    seg.limit = 0xFFFFFFFF
    seg.selector = selector
    seg.type = 11 if code else 3
    seg.present = 1
    seg.dpl = dpl
    seg.db = 0 if code else 1
    seg.s = 1
    seg.l = 1 if code else 0
    seg.g = 1
    seg.avl = 0
    seg.unusable = 0


def long_mode_sregs(sregs: kvm_sregs, cr3: int, path: str) -> kvm_sregs:
    """Set ``sregs`` (a vCPU's reset state) up for 64-bit paging with page tables at
    ``cr3``: CPL3 for ``native`` (CS 0x33, data 0x2b), CPL0 for ``emulated`` (CS 0x08,
    data 0x10).  Returns ``sregs``."""
    user = path == "native"
    dpl = 3 if user else 0
    _segment(sregs.cs, 0x33 if user else 0x08, True, dpl)
    for name in ("ds", "es", "fs", "gs", "ss"):
        _segment(getattr(sregs, name), 0x2B if user else 0x10, False, dpl)
    sregs.cr0 = CR0_LONG
    sregs.cr3 = cr3
    sregs.cr4 = CR4_PAE
    sregs.efer = EFER_LONG
    return sregs
