"""Address and frame-number types, page sizes and size parsing.

The four address spaces KVM juggles have a name each: a guest physical address
(:data:`Gpa`), a guest frame number (:data:`Gfn`), a host virtual address
(:data:`Hva`) and a host physical frame number (:data:`Pfn`), as
``typing.NewType`` over ``int`` (free at run time), with named conversions here
(``gpa_to_gfn``, ``gfn_to_gpa``, ...), the way rust-vmm's ``GuestAddress`` does.

What they cover today: the memslot's fields and its translations
(``MemorySlot.base_gfn``/``userspace_addr``, ``gfn_to_hva``, ``hva_to_gfn``) and
the host mm's address arguments, where ``mypy --strict`` refuses an ``Hva`` in a
``Gfn``'s place.  The stage-2 fault paths (``kvm/x86.py``, ``kvm/arm64.py``,
``kvm/riscv.py``, ``kvm/faultin.py``) and the page-table engine (``kvmmem.arch``)
work on plain ``int`` gpas, gfns and pfns, so inside them the types catch nothing:
a mix-up there is found by the tests and the invariants, not by mypy.

Sizes follow the scenario contract (SCENARIOS.md): an integer, hex
(``0x1000``) or a power-of-two suffix (``4K``, ``2M``, ``1G``, ``1T``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NewType

from kvmmem.errors import InputError

Gpa = NewType("Gpa", int)
"""Guest physical address."""
Gfn = NewType("Gfn", int)
"""Guest frame number: ``gpa >> PAGE_SHIFT``."""
Hva = NewType("Hva", int)
"""Host (userspace) virtual address."""
Vpn = NewType("Vpn", int)
"""Host virtual page number: ``hva >> PAGE_SHIFT``."""
Pfn = NewType("Pfn", int)
"""Host physical frame number."""

PAGE_SHIFT = 12
"""The 4 KiB page of x86, riscv and arm64's default build.  Code whose answer depends on
the host's page size reads the :class:`PageGeometry` of its mm or VM instead (``mm.pg``,
``vm.pg``); these constants stay for what is 4 KiB whatever the host (x86 EPT and the
riscv G-stage, guest page tables, the real-KVM harness's own layouts)."""
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = ~(PAGE_SIZE - 1)
PMD_SHIFT = 21
PMD_SIZE = 1 << PMD_SHIFT
PUD_SHIFT = 30
PUD_SIZE = 1 << PUD_SHIFT
PAGES_PER_PMD = PMD_SIZE // PAGE_SIZE

EXEC_FETCH_SIZE = 4
"""Bytes a ``guest_exec`` step fetches (one instruction)."""

CPU_FEATURES = ("fwb", "dic", "mte")
"""Optional host CPU features the kernel asks about (a scenario's ``cpu_features``):
arm64 FEAT_S2FWB (``fwb``), ``CTR_EL0.DIC`` (``dic``) and the Memory Tagging Extension
(``mte``: ``system_supports_mte``); other architectures ignore them."""

VM_TYPES: dict[str, int] = {"default": 0, "sw_protected": 1}
"""``KVM_CREATE_VM`` types by name (a scenario's ``vm_type``): x86 KVM_X86_DEFAULT_VM and
KVM_X86_SW_PROTECTED_VM (v6.8: private memory without a confidential-computing CPU)."""

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40


# --- the host page size (a property of the kernel build) -----------------------------


@dataclass(frozen=True, slots=True)
class PageGeometry:
    """The page-size constants of one kernel build: ``PAGE_SHIFT`` and what follows from
    it (``arch/arm64/include/asm/pgtable-hwdef.h``, ``asm/page-def.h``; x86 and riscv
    have 4 KiB pages only).

    arm64 is built with 4 KiB, 16 KiB or 64 KiB pages (``CONFIG_ARM64_{4K,16K,64K}_PAGES``);
    a table page holds ``PAGE_SIZE / 8`` entries, so each level translates
    ``PAGE_SHIFT - 3`` bits: the PMD maps 2 MiB, 32 MiB or 512 MiB.  The contiguous hint
    groups ``CONT_PTES`` / ``CONT_PMDS`` entries (``CONFIG_ARM64_CONT_PTE_SHIFT`` 4, 7, 5;
    ``CONFIG_ARM64_CONT_PMD_SHIFT`` 4, 5, 5): 64 KiB / 32 MiB with 4 KiB pages, 2 MiB /
    1 GiB with 16 KiB, 2 MiB / 16 GiB with 64 KiB; arm64's hugetlb sizes
    (``hugetlbpage_init``) are those four levels, PUD only with 4 KiB pages
    (``pud_sect_supported``).  ``PUD_SHIFT`` is that of a 48- or 52-bit VA build: 30
    (4 levels), 36 (16 KiB, 4 levels), 42 (64 KiB, 3 levels: the PUD folded into the
    PGD); the PMD is never folded there (``__PAGETABLE_PMD_FOLDED`` unset).

    The same instance is shared by everything of one host (:data:`PAGES_4K` ...); get
    one with :func:`page_geometry`."""

    name: str
    """``4K``, ``16K`` or ``64K``."""
    page_shift: int
    page_size: int
    page_mask: int
    """``PAGE_MASK``: ``~(PAGE_SIZE - 1)``."""
    pmd_shift: int
    pmd_size: int
    pud_shift: int
    pud_size: int
    pgdir_shift: int
    """What one entry of the level above the PUD maps (the P4D, folded into the PGD):
    512 GiB with 4 KiB pages (x86-64's 4 levels), 128 TiB with 16 KiB pages (4 levels),
    4 TiB with 64 KiB pages (3 levels: the same as the folded PUD)."""
    ptrs_per_pte: int
    """Entries of a PTE table (``PTRS_PER_PTE``), also the pages a PMD maps."""
    cont_pte_shift: int
    """``CONT_PTE_SHIFT``: the size a run of contiguous-hint PTEs maps (arm64)."""
    cont_pmd_shift: int
    """``CONT_PMD_SHIFT`` (arm64)."""

    @property
    def pages_per_pmd(self) -> int:
        """Base pages in one PMD-sized (huge) page: ``HPAGE_PMD_NR``."""
        return self.ptrs_per_pte

    @property
    def hpage_mask(self) -> int:
        """``HPAGE_PMD_MASK``: ``~(PMD_SIZE - 1)``."""
        return ~(self.pmd_size - 1)

    def __repr__(self) -> str:
        return f"PageGeometry({self.name})"

    def __copy__(self) -> PageGeometry:
        return self

    def __deepcopy__(self, memo: object) -> PageGeometry:
        return self  # one instance per page size (identity comparisons hold in copies)


def _geometry(name: str, page_shift: int, pud_shift: int, pgdir_shift: int, cont_ptes: int,
              cont_pmds: int) -> PageGeometry:
    pmd_shift = page_shift + page_shift - 3
    return PageGeometry(name, page_shift, 1 << page_shift, ~((1 << page_shift) - 1),
                        pmd_shift, 1 << pmd_shift, pud_shift, 1 << pud_shift, pgdir_shift,
                        1 << (page_shift - 3), page_shift + cont_ptes, pmd_shift + cont_pmds)


PAGES_4K = _geometry("4K", 12, 30, 39, 4, 4)
PAGES_16K = _geometry("16K", 14, 36, 47, 7, 5)
PAGES_64K = _geometry("64K", 16, 42, 42, 5, 5)
PAGE_GEOMETRIES: dict[int, PageGeometry] = {g.page_size: g for g in (PAGES_4K, PAGES_16K,
                                                                      PAGES_64K)}
"""The host page sizes a kernel can be built with, by page size in bytes."""


def page_geometry(page_size: int | PageGeometry) -> PageGeometry:
    """The :class:`PageGeometry` of a page size in bytes (4096, 16384, 65536; a
    geometry is returned as is).  Raises :class:`InputError` for any other value."""
    if isinstance(page_size, PageGeometry):
        return page_size
    g = PAGE_GEOMETRIES.get(page_size) if isinstance(page_size, int) \
        and not isinstance(page_size, bool) else None
    if g is None:
        raise InputError(f"page_size: {page_size!r} is not a host page size (4K, 16K or 64K)")
    return g


# --- conversions (each names the kernel helper it mirrors) -------------------


def gpa_to_gfn(gpa: Gpa) -> Gfn:
    """``gpa_to_gfn()``: the frame holding ``gpa``."""
    return Gfn(gpa >> PAGE_SHIFT)


def gfn_to_gpa(gfn: Gfn) -> Gpa:
    """``gfn_to_gpa()``: the first address of frame ``gfn``."""
    return Gpa(gfn << PAGE_SHIFT)


def hva_to_vpn(hva: Hva) -> Vpn:
    """The host virtual page holding ``hva``."""
    return Vpn(hva >> PAGE_SHIFT)


def vpn_to_hva(vpn: Vpn) -> Hva:
    """The first address of host virtual page ``vpn``."""
    return Hva(vpn << PAGE_SHIFT)


def pfn_to_phys(pfn: Pfn) -> int:
    """``PFN_PHYS()``: the host physical address of frame ``pfn``."""
    return pfn << PAGE_SHIFT


def phys_to_pfn(phys: int) -> Pfn:
    """``PHYS_PFN()``: the host physical frame holding ``phys``."""
    return Pfn(phys >> PAGE_SHIFT)


# --- alignment -----------------------------------------------------------------


def is_power_of_two(n: int) -> bool:
    """True for 1, 2, 4, ...; false for zero and negatives."""
    return n > 0 and (n & (n - 1)) == 0


def align_down(value: int, alignment: int) -> int:
    """``ALIGN_DOWN()``: the largest multiple of ``alignment`` <= ``value``.

    ``alignment`` must be a power of two (as in the kernel macro)."""
    return value & ~(alignment - 1)


def align_up(value: int, alignment: int) -> int:
    """``ALIGN()``: the smallest multiple of ``alignment`` >= ``value``."""
    return (value + alignment - 1) & ~(alignment - 1)


def is_aligned(value: int, alignment: int) -> bool:
    """``IS_ALIGNED()``."""
    return value & (alignment - 1) == 0


def page_aligned(value: int) -> bool:
    """``PAGE_ALIGNED()``."""
    return value & (PAGE_SIZE - 1) == 0


def pages(size: int) -> int:
    """Number of 4 KiB pages in ``size`` bytes (rounded up)."""
    return (size + PAGE_SIZE - 1) >> PAGE_SHIFT


# --- size parsing ----------------------------------------------------------------

_SUFFIX = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB}
_SIZE_RE = re.compile(r"^\s*(0[xX][0-9a-fA-F_]+|[0-9][0-9_]*)\s*([KMGT]?)(?:[iI]?[bB])?\s*$")


def parse_size(text: int | str, what: str = "size") -> int:
    """Parse ``2M``, ``0x1000``, ``4096`` or an int into a byte count.

    Suffixes are powers of two (``K`` = 1024) as SCENARIOS.md fixes; a hex
    number may carry a suffix too (``0x2M`` = 2 MiB).  Returns a non-negative
    int; raises :class:`InputError` naming ``what`` for anything else
    (negative, fractional, bool, unknown suffix).
    """
    if isinstance(text, bool):
        raise InputError(f"{what}: expected a size, got a boolean {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise InputError(f"{what}: a size cannot be negative ({text})")
        return text
    if not isinstance(text, str):
        raise InputError(f"{what}: expected a size, got {type(text).__name__} {text!r}")
    m = _SIZE_RE.match(text.upper().replace("0X", "0x"))
    if m is None:
        raise InputError(
            f"{what}: {text!r} is not a size (use an integer, hex like 0x1000, "
            "or a K/M/G/T suffix like 2M)"
        )
    number, suffix = m.group(1), m.group(2)
    base = int(number, 16) if number.lower().startswith("0x") else int(number, 10)
    return base * _SUFFIX[suffix]


def format_size(size: int) -> str:
    """Inverse of :func:`parse_size` for display: ``2M``, ``4K``, ``0x1234``."""
    for suffix in ("T", "G", "M", "K"):
        unit = _SUFFIX[suffix]
        if size >= unit and size % unit == 0:
            return f"{size // unit}{suffix}"
    return hex(size) if size >= 16 else str(size)
