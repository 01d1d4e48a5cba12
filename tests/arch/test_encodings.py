"""Golden encodings of stage-2 entries, bit by bit, per architecture.

Every expected value below was worked out by hand from the named source,
not produced by the code under test:

* arm64: Arm ARM (DDI 0487) D8 "VMSAv8-64 translation table format
  descriptors" and the stage 2 Block/Page attribute fields (MemAttr[3:0]
  bits 5:2, S2AP bits 7:6, SH bits 9:8, AF bit 10, XN[1:0] bits 54:53);
  kernel ``arch/arm64/include/asm/kvm_pgtable.h`` (``KVM_PTE_*``),
  ``arch/arm64/kvm/hyp/pgtable.c`` (``KVM_PTE_LEAF_ATTR_*``,
  ``stage2_set_prot_attr``, ``kvm_init_table_pte``) and
  ``arch/arm64/include/asm/memory.h`` (``MT_S2_*``, ``MT_S2_FWB_*``).
* x86: Intel SDM Vol. 3C 29.3.2 and its tables "Format of an EPT PML4 /
  PDPTE / PDE / PTE" (R/W/X bits 2:0, memory type 5:3, ignore PAT 6, page
  size 7, accessed 8, dirty 9, suppress #VE 63); kernel
  ``arch/x86/include/asm/vmx.h`` (``VMX_EPT_*``) and
  ``arch/x86/kvm/mmu/spte.h``/``spte.c`` (``SPTE_MMU_PRESENT_MASK`` bit 11,
  ``EPT_SPTE_HOST_WRITABLE`` 57, ``EPT_SPTE_MMU_WRITABLE`` 58,
  ``SHADOW_NONPRESENT_VALUE``, ``make_spte``, ``make_nonleaf_spte``,
  ``kvm_mmu_set_ept_masks``, ``vmx_get_mt_mask``).
* riscv: RISC-V Privileged Architecture, Sv39 page-table entry (V R W X U G
  A D, PPN at bit 10), the Hypervisor extension's Sv39x4 G-stage, and the
  Svpbmt PBMT field (bits 62:61: 0 PMA, 1 NC, 2 IO); kernel
  ``arch/riscv/include/asm/pgtable-bits.h`` and ``arch/riscv/kvm/gstage.c``
  (``kvm_riscv_gstage_map_page``: ``PAGE_*`` prots with ``_PAGE_BASE`` =
  V|A|U, then ``pte_mkdirty``).
"""

from __future__ import annotations

import itertools

import pytest

from kvmmem.arch import (
    PERM_R,
    PERM_RW,
    PERM_RWX,
    PERM_RX,
    Arm64Stage2,
    MemAttr,
    Perm,
    RiscvGstage,
    X86Tdp,
    make_stage2,
)
from kvmmem.arch.pgtable import TABLE_BASE
from kvmmem.errors import InputError

K4, M2, G1 = 4096, 2 << 20, 1 << 30


def raw_at(s2: object, gpa: int) -> int:
    leaf = s2.walk(gpa)  # type: ignore[attr-defined]
    assert leaf is not None
    raw: int = leaf.raw
    return raw


# --- arm64 ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gpa", "pfn", "size", "prot", "attr", "expected"),
    [
        # page: valid|page 0b11, MemAttr 0b1111<<2, S2AP RW (0xc0), SH IS (0x300),
        # AF (0x400), XN=0b10 (bit 54)
        (0x40000000, 0x40000, K4, PERM_RW, MemAttr.NORMAL, 0x0040_0000_4000_07FF),
        # read-only page: S2AP=0b01
        (0x40001000, 0x40001, K4, PERM_R, MemAttr.NORMAL, 0x0040_0000_4000_177F),
        # executable read-only page: XN=0b00
        (0x40002000, 0x40002, K4, PERM_RX, MemAttr.NORMAL, 0x0000_0000_4000_277F),
        # 2M block at level 2: bit 1 clear (block), RWX
        (0x80000000, 0x80000, M2, PERM_RWX, MemAttr.NORMAL, 0x0000_0000_8000_07FD),
        # 1G block at level 1, Device-nGnRE (MemAttr 0b0001 -> 0x4), RW, XN
        (0xC0000000, 0xC0000, G1, PERM_RW, MemAttr.DEVICE, 0x0040_0000_C000_07C5),
        # Normal non-cacheable page (MemAttr 0b0101 -> 0x14)
        (0x1000, 0x1, K4, PERM_RW, MemAttr.NORMAL_NC, 0x0040_0000_0000_17D7),
    ],
)
def test_arm64_leaf_encodings_arm_arm_d8_and_kvm_pgtable(
        gpa: int, pfn: int, size: int, prot: Perm, attr: MemAttr, expected: int) -> None:
    """Arm ARM stage-2 descriptor fields; ``stage2_set_prot_attr`` always sets
    AF and SH=inner-shareable, XN unless executable (kvm_pgtable.h/pgtable.c)."""
    s2 = Arm64Stage2()
    s2.map(gpa, pfn, size, prot, attr)
    assert raw_at(s2, gpa) == expected


def test_arm64_fwb_memattr_encodings_memory_h() -> None:
    """With FEAT_S2FWB: ``MT_S2_FWB_NORMAL`` 0b0110, ``MT_S2_FWB_NORMAL_NC``
    0b0101, ``MT_S2_FWB_DEVICE_nGnRE`` 0b0001 (arch/arm64/include/asm/memory.h)."""
    s2 = Arm64Stage2(fwb=True)
    s2.map(0x2000, 0x2, K4, PERM_RX)
    assert raw_at(s2, 0x2000) == 0x275B  # 0x3 | 0x6<<2 | S2AP R | SH IS | AF
    s2.map(0x3000, 0x3, K4, PERM_RW, MemAttr.NORMAL_NC)
    assert raw_at(s2, 0x3000) == 0x0040_0000_0000_37D7
    s2.map(0x4000, 0x4, K4, PERM_RW, MemAttr.DEVICE)
    assert raw_at(s2, 0x4000) == 0x0040_0000_0000_47C7


def test_arm64_table_descriptor_kvm_init_table_pte() -> None:
    """A table descriptor is the next table's address | 0b11
    (``kvm_init_table_pte``: ``KVM_PTE_TYPE_TABLE | KVM_PTE_VALID``)."""
    s2 = Arm64Stage2()
    s2.map(0, 0x100, K4, PERM_RW)
    path = s2.walk_path(0)
    assert [step.level for step in path] == [1, 2, 3]
    for step, nxt in itertools.pairwise(path):
        assert step.raw & 3 == 3
        assert step.raw & ~0xFFF == nxt.table_pa
        assert nxt.table_pa >= TABLE_BASE


def test_arm64_16k_and_64k_output_address_fields() -> None:
    """OA is bits [47:granule shift] (``KVM_PTE_ADDR_MASK`` GENMASK(47, PAGE_SHIFT));
    16K: 32M blocks at level 2; 64K: 512M blocks at level 2.  Pfns count granules (the
    host's pages: stage-2 uses the host ``PAGE_SIZE``)."""
    s16 = Arm64Stage2(granule=16384)
    s16.map(0x4000, 0x1, 16384, PERM_RW)
    assert raw_at(s16, 0x4000) == 0x0040_0000_0000_47FF
    assert s16.walk(0x4000) is not None and s16.walk(0x4000).pfn == 1  # type: ignore[union-attr]
    s16.map(32 << 20, (32 << 20) >> 14, 32 << 20, PERM_RWX)
    assert raw_at(s16, 32 << 20) == 0x0200_07FD
    s64 = Arm64Stage2(granule=65536)
    s64.map(512 << 20, (512 << 20) >> 16, 512 << 20, PERM_RWX)
    assert raw_at(s64, 512 << 20) == 0x2000_07FD
    with pytest.raises(InputError, match="leaf size"):
        s64.map(0, 0, 2 << 20, PERM_RW)


# --- x86 EPT ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gpa", "pfn", "size", "prot", "attr", "kw", "expected"),
    [
        # 4K RWX WB: SVE(63) | MMU-writable(58) | Host-writable(57) | PA |
        # MMU-present(11) | D(9) | A(8) | IPAT(6) | WB(6<<3) | XWR
        (0x40000000, 0x40000, K4, PERM_RWX, MemAttr.NORMAL, {}, 0x8600_0000_4000_0B77),
        # 2M: + page size bit 7
        (0x80000000, 0x80000, M2, PERM_RWX, MemAttr.NORMAL, {}, 0x8600_0000_8000_0BF7),
        # 1G UC device, RW, no X: memory type 0, no IPAT
        (0xC0000000, 0xC0000, G1, PERM_RW, MemAttr.DEVICE, {}, 0x8600_0000_C000_0B83),
        # read-only, host page not writable: no W, no D, no bits 57/58
        (0x100000, 0x100, K4, PERM_RX, MemAttr.NORMAL, {}, 0x8000_0000_0010_0975),
        # prefetch (KVM_PRE_FAULT_MEMORY): no accessed bit
        (0x200000, 0x200, K4, PERM_RWX, MemAttr.NORMAL, {"prefetch": True},
         0x8600_0000_0020_0A77),
        # read-only mapping of a host-writable page: Host-writable kept
        (0x300000, 0x300, K4, PERM_RX, MemAttr.NORMAL, {"host_writable": True},
         0x8200_0000_0030_0975),
    ],
)
def test_x86_ept_leaf_encodings_sdm_29_3_2_and_make_spte(
        gpa: int, pfn: int, size: int, prot: Perm, attr: MemAttr, kw: dict[str, bool],
        expected: int) -> None:
    """Intel SDM EPT entry formats plus KVM's software bits (``make_spte``,
    ``vmx_get_mt_mask``: WB+IPAT for RAM, UC for host MMIO)."""
    s2 = X86Tdp()
    s2.map(gpa, pfn, size, prot, attr, **kw)
    assert raw_at(s2, gpa) == expected


def test_x86_nonleaf_and_nonpresent_make_nonleaf_spte() -> None:
    """``make_nonleaf_spte``: present(11) | R | W | X | A (+ SVE via
    ``shadow_present_mask`` since v6.10); empty entries are
    ``SHADOW_NONPRESENT_VALUE`` = bit 63 (0 before v6.10)."""
    s2 = X86Tdp()
    s2.map(0, 0x100, K4, PERM_RWX)
    path = s2.walk_path(0)
    assert [step.level for step in path] == [4, 3, 2, 1]
    for step, nxt in itertools.pairwise(path):
        assert step.raw == 0x8000_0000_0000_0907 | nxt.table_pa
    empty = s2.walk_path(1 << 39)[0].raw
    assert empty == 0x8000_0000_0000_0000
    old = X86Tdp(suppress_ve=False)
    old.map(0, 0x100, K4, PERM_RWX)
    assert old.walk_path(0)[0].raw & 0xFFF == 0x907
    assert old.walk_path(0)[0].raw >> 63 == 0
    assert old.walk_path(1 << 39)[0].raw == 0
    assert raw_at(old, 0) == 0x0600_0000_0010_0B77


def test_x86_5_level_ept_pml5() -> None:
    """5-level EPT (PML5): 57-bit guest-physical addresses, levels 5..1."""
    s2 = X86Tdp(levels=5)
    assert s2.ipa_bits == 57
    s2.map(1 << 50, 0x1234, K4, PERM_RW)
    assert [st.level for st in s2.walk_path(1 << 50)] == [5, 4, 3, 2, 1]


def test_x86_rejects_encodings_kvm_never_makes() -> None:
    """W without R is an EPT misconfiguration (SDM 29.3.3.1); KVM's EPT
    memory types are UC/WB only (``vmx_get_mt_mask``)."""
    s2 = X86Tdp()
    with pytest.raises(InputError, match="misconfiguration"):
        s2.map(0, 0, K4, Perm(False, True, False))
    with pytest.raises(InputError, match="Normal-NC"):
        s2.map(0, 0, K4, PERM_RW, MemAttr.NORMAL_NC)
    with pytest.raises(InputError, match="Host-writable"):
        s2.map(0, 0, K4, PERM_RW, host_writable=False)
    assert s2.counters.entries_written == 0


# --- riscv G-stage ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gpa", "pfn", "size", "prot", "attr", "expected"),
    [
        # PPN 0x80200 << 10 | D A U X W R V
        (0x80200000, 0x80200, K4, PERM_RWX, MemAttr.NORMAL, 0x2008_00DF),
        # PAGE_READ_EXEC: no W
        (0x80201000, 0x80201, K4, PERM_RX, MemAttr.NORMAL, 0x2008_04DB),
        # 2M superpage at level 1, PAGE_WRITE (no X)
        (0x80000000, 0x80000, M2, PERM_RW, MemAttr.NORMAL, 0x2000_00D7),
        # 1G, PBMT=IO (pgprot_noncached: kvm_riscv_mmu_ioremap)
        (0xC0000000, 0xC0000, G1, PERM_RW, MemAttr.DEVICE, 0x4000_0000_3000_00D7),
        # PBMT=NC
        (0x1000, 0x1, K4, PERM_RW, MemAttr.NORMAL_NC, 0x2000_0000_0000_04D7),
    ],
)
def test_riscv_gstage_leaf_encodings_priv_spec_sv39_and_gstage_c(
        gpa: int, pfn: int, size: int, prot: Perm, attr: MemAttr, expected: int) -> None:
    """Sv39 PTE layout and Svpbmt; KVM sets U, A and D on every G-stage leaf
    (``kvm_riscv_gstage_map_page``)."""
    s2 = RiscvGstage()
    s2.map(gpa, pfn, size, prot, attr)
    assert raw_at(s2, gpa) == expected


def test_riscv_table_pte_and_16k_root_sv39x4() -> None:
    """Non-leaf PTE = PPN << 10 | V (``_PAGE_TABLE``); the Sv39x4 root has 2048
    entries (16 KiB), indexed by GPA bits 40:30."""
    s2 = RiscvGstage()
    assert (s2.ipa_bits, s2.root_entries, s2.counters.table_bytes) == (41, 2048, 16384)
    gpa = (1 << 40) + 0x1000  # needs root index 1024: only the widened root has it
    s2.map(gpa, 0x42, K4, PERM_RW)
    path = s2.walk_path(gpa)
    assert path[0].idx == 1024
    for step, nxt in itertools.pairwise(path):
        assert step.raw == ((nxt.table_pa >> 12) << 10) | 1
    assert path[-1].raw == (0x42 << 10) | 0xD7


def test_riscv_without_svpbmt_noncached_is_zero() -> None:
    """Without Svpbmt ``_PAGE_IO``/``_PAGE_NOCACHE`` are 0: device memory
    encodes like RAM (the PMAs decide)."""
    s2 = RiscvGstage(svpbmt=False)
    s2.map(0, 0x1, K4, PERM_RW, MemAttr.DEVICE)
    assert raw_at(s2, 0) == 0x4D7
    leaf = s2.walk(0)
    assert leaf is not None and leaf.attr is MemAttr.NORMAL


@pytest.mark.parametrize("mode,levels,bits", [("sv39x4", 3, 41), ("sv48x4", 4, 50),
                                               ("sv57x4", 5, 59)])
def test_riscv_modes_hgatp(mode: str, levels: int, bits: int) -> None:
    """Sv39x4 / Sv48x4 / Sv57x4: levels and guest-physical address width."""
    s2 = RiscvGstage(mode=mode)
    assert (s2.nlevels, s2.ipa_bits, s2.root_entries) == (levels, bits, 2048)
    top = (1 << bits) - G1
    s2.map(top, 0x40000, G1, PERM_RWX)
    leaf = s2.walk(top + 0x5000)
    assert leaf is not None and leaf.pfn == 0x40005 and leaf.level == 2


# --- decoding round trip ------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["arm64", "x86", "riscv"])
@pytest.mark.parametrize("prot", [PERM_R, PERM_RW, PERM_RX, PERM_RWX])
@pytest.mark.parametrize("attr", [MemAttr.NORMAL, MemAttr.DEVICE])
def test_decode_round_trip(arch: str, prot: Perm, attr: MemAttr) -> None:
    """Every encoding the engine writes decodes to the same permissions and
    memory type; young after a normal fault, pfn of the walked page."""
    s2 = make_stage2(arch)
    for size in s2.leaf_sizes:
        gpa = size * 3
        s2.map(gpa, gpa >> 12, size, prot, attr)
        leaf = s2.walk(gpa + size - K4)
        assert leaf is not None
        assert (leaf.perm, leaf.attr, leaf.size, leaf.young) == (prot, attr, size, True)
        assert leaf.pfn == (gpa + size - K4) >> 12
        assert leaf.base_pfn == gpa >> 12 and leaf.base_gpa == gpa
        assert leaf.level == s2.level_of_size(size)
