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

Exceptions: the harness gives the guest an IDT, a GDT and a 64-bit TSS of its own
(:func:`write_system_tables`, in the harness memslot's second page; the third page is
the handlers' stack).  Every exception vector 0-31 enters a CPL0 stub on that stack
(IST1, so even a guest whose ``rsp`` is garbage is caught) that stores the vector
and then CR2 to the *exception doorbell* (:data:`EXC_DOORBELL_FROM_CODE` past the code
page: the doorbell + 0x100, no memslot), as the arm64/riscv harnesses do.  Without
this a guest exception looked up an IDT at linear 0, which a TDP (EPT/NPT) host
turns into ``KVM_EXIT_INTERNAL_ERROR`` / ``KVM_INTERNAL_ERROR_DELIVERY_EV`` when no
memslot covers that gpa (an MMIO access during event delivery cannot be emulated:
``svm_check_emulate_instruction`` / ``vmx_check_emulate_instruction`` return
``X86EMUL_UNHANDLEABLE_VECTORING``, upstream 6.14), or a triple fault otherwise.  A
PVM host delivers a CPL3 guest's exceptions its own way and ignores the IDT (a triple
fault: ``KVM_EXIT_SHUTDOWN``), as before.

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
VECTORS = 32
"""Exception vectors the IDT handles (the architectural exceptions 0-31)."""
VECTOR_OFFSET = 0xC00
"""Where the exception stubs start in the code page (the routines end below it)."""
VECTOR_STRIDE = 0x10
"""Bytes per exception stub; the common handler follows the last one."""
EXC_DOORBELL_FROM_CODE = (2 << 20) + 0x1000 + 0x100
"""The exception doorbell's distance from the code page: the harness window's doorbell
(2 MiB + 4 KiB past the slot start) + 0x100, as on arm64/riscv.  The handler reaches it
RIP-relative, so the code stays position independent."""

SYSTEM_OFFSET = 0x1000
"""The harness memslot's page with the IDT (+0), GDT (+0x800) and TSS (+0xC00)."""
IDT_OFFSET = SYSTEM_OFFSET
GDT_OFFSET = SYSTEM_OFFSET + 0x800
TSS_OFFSET = SYSTEM_OFFSET + 0xC00
STACK_TOP_OFFSET = 0x3000
"""The exception stack is the slot's third page; IST1 and RSP0 point at its top."""
TABLES_OFFSET = 0x3000
"""The guest page tables start at the slot's fourth page."""

KERNEL_CS, KERNEL_DS, USER_DS, USER_CS, TSS_SEL = 0x08, 0x10, 0x2B, 0x33, 0x40
GDT_ENTRIES = 10
TSS_LIMIT = 0x67
VECTOR_NAMES = ("#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "#CSO",
                "#TS", "#NP", "#SS", "#GP", "#PF", "#15", "#MF", "#AC", "#MC", "#XM",
                "#VE", "#CP", "#22", "#23", "#24", "#25", "#26", "#27", "#HV", "#VC",
                "#SX", "#31")
"""Mnemonics of vectors 0-31 (``abort`` names)."""


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


# --- descriptor tables ------------------------------------------------------------------


def _seg_descriptor(access: int, flags: int) -> int:
    """A flat code/data descriptor: base 0, limit 0xFFFFF, ``access`` byte, ``flags``
    nibble (G, D/B, L)."""
    return 0xFFFF | (access << 40) | (0xF << 48) | (flags << 52)


def gdt_entries(tss_base: int) -> list[int]:
    """The GDT as 8-byte words: 0x08 CPL0 64-bit code, 0x10 CPL0 data, 0x2b CPL3 data,
    0x33 CPL3 64-bit code (the selectors :func:`long_mode_sregs` loads), 0x40 the
    64-bit TSS (busy, as ``TR`` holds it)."""
    entries = [0] * GDT_ENTRIES
    entries[KERNEL_CS >> 3] = _seg_descriptor(0x9B, 0xA)
    entries[KERNEL_DS >> 3] = _seg_descriptor(0x93, 0xC)
    entries[USER_DS >> 3] = _seg_descriptor(0xF3, 0xC)
    entries[USER_CS >> 3] = _seg_descriptor(0xFB, 0xA)
    entries[TSS_SEL >> 3] = (TSS_LIMIT | (tss_base & 0xFFFFFF) << 16 | 0x8B << 40
                             | ((tss_base >> 24) & 0xFF) << 56)
    entries[(TSS_SEL >> 3) + 1] = tss_base >> 32
    return entries


def idt_gate(handler: int) -> tuple[int, int]:
    """A 64-bit interrupt gate (P, DPL0, type 0xE) to ``KERNEL_CS:handler`` on IST1, as
    two 8-byte words."""
    low = ((handler & 0xFFFF) | KERNEL_CS << 16 | 1 << 32 | 0x8E << 40
           | ((handler >> 16) & 0xFFFF) << 48)
    return low, handler >> 32


def write_system_tables(base_gpa: int, base_hva: int) -> None:
    """Write the IDT, GDT and TSS into the harness memslot (guest physical ``base_gpa``
    at host address ``base_hva``; guest virtual = guest physical there)."""
    def put(offset: int, value: int) -> None:
        ctypes.c_uint64.from_address(base_hva + offset).value = value

    ctypes.memset(base_hva + SYSTEM_OFFSET, 0, 2 * PAGE_SIZE)
    for vector in range(VECTORS):
        low, high = idt_gate(base_gpa + VECTOR_OFFSET + vector * VECTOR_STRIDE)
        put(IDT_OFFSET + 16 * vector, low)
        put(IDT_OFFSET + 16 * vector + 8, high)
    for i, entry in enumerate(gdt_entries(base_gpa + TSS_OFFSET)):
        put(GDT_OFFSET + 8 * i, entry)
    stack = base_gpa + STACK_TOP_OFFSET
    # 64-bit TSS: RSP0 at +4, IST1 at +36 (unaligned), I/O map base at +102 (none).
    for field_offset in (4, 36):
        ctypes.c_uint64.from_address(base_hva + TSS_OFFSET + field_offset).value = stack
    ctypes.c_uint16.from_address(base_hva + TSS_OFFSET + 102).value = TSS_LIMIT + 1


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


def long_mode_sregs(sregs: kvm_sregs, cr3: int, path: str,
                    system_base: int | None = None) -> kvm_sregs:
    """Set ``sregs`` (a vCPU's reset state) up for 64-bit paging with page tables at
    ``cr3``: CPL3 for ``native`` (CS 0x33, data 0x2b), CPL0 for ``emulated`` (CS 0x08,
    data 0x10).  ``system_base``: the harness memslot's guest address, whose
    :func:`write_system_tables` the IDTR, GDTR and TR then point at.  Returns
    ``sregs``."""
    user = path == "native"
    dpl = 3 if user else 0
    _segment(sregs.cs, USER_CS if user else KERNEL_CS, True, dpl)
    for name in ("ds", "es", "fs", "gs", "ss"):
        _segment(getattr(sregs, name), USER_DS if user else KERNEL_DS, False, dpl)
    if system_base is not None:
        sregs.idt.base, sregs.idt.limit = system_base + IDT_OFFSET, 16 * VECTORS - 1
        sregs.gdt.base, sregs.gdt.limit = system_base + GDT_OFFSET, 8 * GDT_ENTRIES - 1
        tr = sregs.tr
        tr.base, tr.limit, tr.selector = system_base + TSS_OFFSET, TSS_LIMIT, TSS_SEL
        tr.type, tr.present, tr.dpl, tr.s, tr.l, tr.g = 11, 1, 0, 0, 0, 0
        tr.db = tr.avl = tr.unusable = 0
    sregs.cr0 = CR0_LONG
    sregs.cr3 = cr3
    sregs.cr4 = CR4_PAE
    sregs.efer = EFER_LONG
    return sregs
