"""x86 two-dimensional paging in EPT format, as KVM's TDP MMU builds it.

Format (Intel SDM Vol. 3C, chapter 29 "VMX Support for Address
Translation", 29.3.2 "EPT Translation Mechanism" and its tables of EPT
paging-structure entries; kernel ``arch/x86/include/asm/vmx.h`` and
``arch/x86/kvm/mmu/spte.h`` / ``spte.c``):

* 4-level (PML4, 48-bit guest-physical addresses) or 5-level (PML5, 57 bits);
  512 entries of 8 bytes per table; leaves at level 1 (4K), 2 (2M) and 3
  (1G), levels numbered as KVM's ``PG_LEVEL_*``;
* bit 0 read, 1 write, 2 execute (``VMX_EPT_READABLE/WRITABLE/EXECUTABLE_MASK``);
  leaf bits 5:3 memory type (``VMX_EPT_MT_EPTE_SHIFT``: 0 UC, 6 WB), bit 6
  ignore PAT (``VMX_EPT_IPAT_BIT``), bit 7 page size on levels 2-3
  (``PT_PAGE_SIZE_MASK``), bit 8 accessed, bit 9 dirty
  (``VMX_EPT_ACCESS_BIT``/``VMX_EPT_DIRTY_BIT``), physical address bits 51:12;
* KVM's software bits, which the hardware ignores but which are part of
  every SPTE KVM writes: bit 11 ``SPTE_MMU_PRESENT_MASK``, bit 57
  ``EPT_SPTE_HOST_WRITABLE``, bit 58 ``EPT_SPTE_MMU_WRITABLE``, bits 53:52 the
  A/D type (0 = A/D enabled);
* since v6.10 every present SPTE and every non-present one carries bit 63
  ``VMX_EPT_SUPPRESS_VE_BIT`` (``shadow_present_mask``,
  ``SHADOW_NONPRESENT_VALUE``); ``suppress_ve=False`` gives the older zero
  non-present value.

``make_spte`` (TDP, A/D bits enabled, exec-only supported): present bit 11
(+ bit 63), accessed unless the fault is a prefetch, X if executable, R
(``shadow_user_mask``), PS for huge levels, memory type from
``vmx_get_mt_mask`` (UC for host MMIO, WB with IPAT otherwise), Host-writable
if the host page is writable, and for a writable entry W, MMU-writable and
the dirty bit.  ``make_nonleaf_spte``: present | R | W | X | A.

KVM changes present SPTEs in place (no break-before-make on x86) and flushes
after a change that removes access or replaces a page table.
"""

from __future__ import annotations

from kvmmem.arch.pgtable import MemAttr, Perm, Stage2
from kvmmem.errors import InputError
from kvmmem.types import PAGE_SHIFT

VMX_EPT_READABLE_MASK = 1 << 0
VMX_EPT_WRITABLE_MASK = 1 << 1
VMX_EPT_EXECUTABLE_MASK = 1 << 2
VMX_EPT_RWX_MASK = 0x7
VMX_EPT_MT_EPTE_SHIFT = 3
VMX_EPT_MT_MASK = 0x7 << VMX_EPT_MT_EPTE_SHIFT
VMX_EPT_IPAT_BIT = 1 << 6
PT_PAGE_SIZE_MASK = 1 << 7
VMX_EPT_ACCESS_BIT = 1 << 8
VMX_EPT_DIRTY_BIT = 1 << 9
SPTE_MMU_PRESENT_MASK = 1 << 11
SPTE_TDP_AD_SHIFT = 52
SPTE_TDP_AD_MASK = 3 << SPTE_TDP_AD_SHIFT
EPT_SPTE_HOST_WRITABLE = 1 << 57
EPT_SPTE_MMU_WRITABLE = 1 << 58
VMX_EPT_SUPPRESS_VE_BIT = 1 << 63
PT64_BASE_ADDR_MASK = ((1 << 52) - 1) & ~((1 << PAGE_SHIFT) - 1)

MTRR_TYPE_UNCACHABLE = 0
MTRR_TYPE_WRCOMB = 1
MTRR_TYPE_WRTHROUGH = 4
MTRR_TYPE_WRPROT = 5
MTRR_TYPE_WRBACK = 6
_MT_NAMES = {0: "UC", 1: "WC", 4: "WT", 5: "WP", 6: "WB"}

PG_LEVEL_4K = 1
PG_LEVEL_2M = 2
PG_LEVEL_1G = 3


class X86Tdp(Stage2):
    """A VM's TDP MMU root in EPT format.

    ``levels``: 4 (default) or 5; ``ipa_bits`` defaults to 48 / 57 (a
    smaller MAXPHYADDR may be given).  ``suppress_ve``: bit 63 in present and
    non-present SPTEs (v6.10+).  ``ignore_guest_pat``: WB leaves carry IPAT
    (no non-coherent DMA; ``vmx_get_mt_mask``).  ``max_huge_level``: 3 when
    the CPU has 1G EPT pages, else 2.
    """

    arch = "x86"

    def __init__(self, *, levels: int | None = None, ipa_bits: int | None = None,
                 suppress_ve: bool = True, ignore_guest_pat: bool = True,
                 max_huge_level: int = PG_LEVEL_1G, granule: int = 4096,
                 record_history: bool = False) -> None:
        if granule != 4096:
            raise InputError(f"granule: x86 EPT uses 4K pages, not {granule}")
        n = 4 if levels is None else levels
        if n not in (4, 5):
            raise InputError(f"levels: EPT has 4 or 5 levels, not {n}")
        top = 48 if n == 4 else 57
        ipa = top if ipa_bits is None else ipa_bits
        if not top - 9 < ipa <= top:
            raise InputError(f"ipa_bits: {n}-level EPT translates {top - 8}..{top} bits, "
                             f"not {ipa}")
        if max_huge_level not in (PG_LEVEL_2M, PG_LEVEL_1G):
            raise InputError(f"max_huge_level: {max_huge_level} is not 2 or 3")
        self.suppress_ve = suppress_ve
        self.ignore_guest_pat = ignore_guest_pat
        sve = VMX_EPT_SUPPRESS_VE_BIT if suppress_ve else 0
        level_numbers = list(range(n, 0, -1))
        leaf_depths = [d for d, lv in enumerate(level_numbers) if lv <= max_huge_level]
        type_bits = [PT_PAGE_SIZE_MASK if lv > PG_LEVEL_4K else 0 for lv in level_numbers]
        table_bits = (SPTE_MMU_PRESENT_MASK | sve | VMX_EPT_READABLE_MASK
                      | VMX_EPT_WRITABLE_MASK | VMX_EPT_EXECUTABLE_MASK | VMX_EPT_ACCESS_BIT)
        super().__init__(
            granule=4096, ia_bits=ipa, nlevels=n, level_numbers=level_numbers,
            leaf_depths=leaf_depths, valid_mask=VMX_EPT_RWX_MASK, table_mask=PT_PAGE_SIZE_MASK,
            table_value=0, oa_mask=PT64_BASE_ADDR_MASK, oa_rshift=0, empty=sve,
            table_bits=table_bits, young_bit=VMX_EPT_ACCESS_BIT, dirty_bit=VMX_EPT_DIRTY_BIT,
            write_bit=VMX_EPT_WRITABLE_MASK, type_bits=type_bits, type_mask=PT_PAGE_SIZE_MASK,
            max_pa_bits=52,
            record_history=record_history)

    def get_mt_mask(self, attr: MemAttr) -> int:
        """``vmx_get_mt_mask``: UC for host MMIO (no IPAT), WB (+ IPAT unless
        guest PAT is honoured) for RAM."""
        if attr is MemAttr.DEVICE:
            return MTRR_TYPE_UNCACHABLE << VMX_EPT_MT_EPTE_SHIFT
        if attr is MemAttr.NORMAL_NC:
            raise InputError("attr: KVM's EPT entries are UC or WB (vmx_get_mt_mask); "
                             "there is no Normal-NC mapping on x86")
        mt = MTRR_TYPE_WRBACK << VMX_EPT_MT_EPTE_SHIFT
        return mt | VMX_EPT_IPAT_BIT if self.ignore_guest_pat else mt

    def _encode_leaf(self, prot: Perm, attr: MemAttr, depth: int, prefetch: bool,
                     host_writable: bool | None) -> int:
        # make_spte with TDP, A/D bits on, exec-only EPT supported
        if not (prot.read or prot.write or prot.execute):
            raise InputError("prot: an EPT entry with R=W=X=0 is not present")
        if prot.write and not prot.read:
            raise InputError("prot: write without read is an EPT misconfiguration")
        hw = prot.write if host_writable is None else host_writable
        if prot.write and not hw:
            raise InputError("prot: a writable SPTE must be Host-writable")
        spte = SPTE_MMU_PRESENT_MASK
        if self.suppress_ve:
            spte |= VMX_EPT_SUPPRESS_VE_BIT
        if not prefetch:
            spte |= VMX_EPT_ACCESS_BIT
        if prot.execute:
            spte |= VMX_EPT_EXECUTABLE_MASK
        if prot.read:
            spte |= VMX_EPT_READABLE_MASK
        spte |= self._type_bits[depth]
        spte |= self.get_mt_mask(attr)
        if hw:
            spte |= EPT_SPTE_HOST_WRITABLE
        if prot.write:
            spte |= VMX_EPT_WRITABLE_MASK | EPT_SPTE_MMU_WRITABLE | VMX_EPT_DIRTY_BIT
        return spte

    def _decode_leaf(self, bits: int) -> tuple[Perm, MemAttr, bool, bool, bool]:
        perm = Perm(bool(bits & VMX_EPT_READABLE_MASK), bool(bits & VMX_EPT_WRITABLE_MASK),
                    bool(bits & VMX_EPT_EXECUTABLE_MASK))
        mt = (bits & VMX_EPT_MT_MASK) >> VMX_EPT_MT_EPTE_SHIFT
        attr = (MemAttr.NORMAL if mt == MTRR_TYPE_WRBACK else
                MemAttr.DEVICE if mt == MTRR_TYPE_UNCACHABLE else MemAttr.NORMAL_NC)
        return perm, attr, bool(bits & VMX_EPT_ACCESS_BIT), bool(bits & VMX_EPT_DIRTY_BIT), True

    def _relax_bits(self, prot: Perm) -> tuple[int, int]:
        # fast_page_fault: restore W on an MMU-writable SPTE (no flush)
        bits = ((VMX_EPT_READABLE_MASK if prot.read else 0)
                | (VMX_EPT_WRITABLE_MASK | EPT_SPTE_MMU_WRITABLE | EPT_SPTE_HOST_WRITABLE
                   if prot.write else 0)
                | (VMX_EPT_EXECUTABLE_MASK if prot.execute else 0))
        return bits, 0

    def _map_over_leaf(self, slot: int, idx: int, old: int, new: int, d: int, gpa: int) -> None:
        # tdp_mmu_map_handle_target_level: same SPTE -> spurious; a flush only
        # when the change removes access or moves the pfn
        if old == new:
            return
        self._write(slot, idx, old, new, gpa, d)
        if (old ^ new) & PT64_BASE_ADDR_MASK or (old & ~new & VMX_EPT_RWX_MASK):
            size = self._size[d]
            self.flush_tlb_gpa(gpa & ~(size - 1), size)

    def describe_entry(self, raw: int, level: int) -> str:
        """The decoded fields of ``raw`` read at ``level``."""
        return describe_entry(raw, level)


def describe_entry(raw: int, level: int) -> str:
    """An EPT entry at ``level`` (PG_LEVEL numbering) decoded."""
    sw = []
    if raw & SPTE_MMU_PRESENT_MASK:
        sw.append("MMU-present")
    if raw & EPT_SPTE_HOST_WRITABLE:
        sw.append("Host-writable")
    if raw & EPT_SPTE_MMU_WRITABLE:
        sw.append("MMU-writable")
    if raw & SPTE_TDP_AD_MASK:
        sw.append(f"AD-type={(raw & SPTE_TDP_AD_MASK) >> SPTE_TDP_AD_SHIFT}")
    sve = " SVE" if raw & VMX_EPT_SUPPRESS_VE_BIT else ""
    if not raw & VMX_EPT_RWX_MASK:
        return "not-present" + sve
    rwx = "".join(c if raw & b else "-" for c, b in (("R", 1), ("W", 2), ("X", 4)))
    pa = raw & PT64_BASE_ADDR_MASK
    names = {5: "PML5E", 4: "PML4E", 3: "PDPTE", 2: "PDE", 1: "PTE"}
    if level > PG_LEVEL_4K and not raw & PT_PAGE_SIZE_MASK:
        fields = [f"{names.get(level, 'L' + str(level))} TABLE next={pa:#x}", rwx,
                  f"A={int(bool(raw & VMX_EPT_ACCESS_BIT))}"]
    else:
        size = {1: "4K", 2: "2M", 3: "1G"}.get(level, "?")
        mt = (raw & VMX_EPT_MT_MASK) >> VMX_EPT_MT_EPTE_SHIFT
        fields = [f"{names.get(level, 'L' + str(level))} {size}", f"PA={pa:#x}", rwx,
                  f"MT={mt}({_MT_NAMES.get(mt, 'reserved')})",
                  f"IPAT={int(bool(raw & VMX_EPT_IPAT_BIT))}",
                  f"A={int(bool(raw & VMX_EPT_ACCESS_BIT))}",
                  f"D={int(bool(raw & VMX_EPT_DIRTY_BIT))}"]
    return " ".join(fields + sw) + sve
