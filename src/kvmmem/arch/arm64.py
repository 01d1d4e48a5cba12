"""arm64 stage-2 translation tables, as KVM builds them.

Format (Arm ARM DDI 0487, chapter D8 "The AArch64 Virtual Memory System
Architecture": VMSAv8-64 stage 2 descriptors; kernel
``arch/arm64/include/asm/kvm_pgtable.h`` and ``arch/arm64/kvm/hyp/pgtable.c``):

* granule 4K, 16K or 64K (stage-2 uses the host ``PAGE_SIZE``); a table page
  holds ``granule / 8`` entries;
* ``ipa_bits`` (VTCR_EL2.T0SZ) picks the number of levels as
  ``stage2_pgtable_levels`` does, at least 2 (``kvm_get_vtcr``); the start
  level is ``4 - levels`` and the first-level table may be up to 16 pages
  *concatenated* (``kvm_pgd_pages``), e.g. 40-bit IPA with 4K pages: 3 levels
  from level 1 with two concatenated level-1 pages;
* descriptor bit 0 = valid, bit 1 = table (levels 0-2) / page (level 3),
  0 = block; output address bits [47:granule shift];
* leaf attributes: MemAttr[3:0] bits 5:2 (``KVM_PTE_LEAF_ATTR_LO_S2_MEMATTR``),
  S2AP read bit 6 / write bit 7, SH bits 9:8 (inner shareable, 0b11), AF bit
  10, DBM bit 51, contiguous bit 52, XN[1:0] bits 54:53 (0b10 = execute
  never; ``KVM_PTE_LEAF_ATTR_HI_S2_XN``), software bits 58:55;
* MemAttr without FEAT_S2FWB: Normal WB 0b1111 (``MT_S2_NORMAL``), Normal NC
  0b0101 (``MT_S2_NORMAL_NC``), Device-nGnRE 0b0001 (``MT_S2_DEVICE_nGnRE``);
  with FWB (``fwb=True``): 0b0110, 0b0101, 0b0001
  (``arch/arm64/include/asm/memory.h``);
* blocks only from ``KVM_PGTABLE_MIN_BLOCK_LEVEL``: level 1 (1G) and 2 (2M)
  with 4K pages, level 2 only with 16K (32M) and 64K (512M).

Every leaf KVM writes has AF and SH=IS set (``stage2_set_prot_attr``).

Break-before-make: a valid entry is never overwritten by another valid entry
unless only permission/AF/DBM/software bits change.  Otherwise the kernel
writes zero, issues a TLBI (``stage2_try_break_pte``: by IPA with the level
for a leaf, ``kvm_tlb_flush_vmid_range`` for a table) and then the new entry.
The Arm ARM rule is "Using break-before-make when updating translation table
entries" (DDI 0487, in the TLB maintenance requirements of chapter D8): it is
required when the output address, memory type, shareability or block size
changes, or a table becomes a block or the reverse; changing only the
permissions or the access flag does not need it.  ``map`` over a valid leaf
that differs only in permissions changes nothing (the kernel returns -EAGAIN;
``user_mem_abort`` uses ``relax_perms`` for permission faults).

The fault-path policy (``user_mem_abort``) is at the end: block size,
memory attribute, permissions.
"""

from __future__ import annotations

from kvmmem.arch.arm64_pte import (
    AF,
    CONTIG,
    DBM,
    KVM_PTE_TYPE,
    KVM_PTE_VALID,
    MT_S2_FWB_NORMAL,
    MT_S2_FWB_NORMAL_NC,
    MT_S2_NORMAL,
    MT_S2_NORMAL_NC,
    S2_MEMATTR_MASK,
    S2_MEMATTR_SHIFT,
    S2_PERMS,
    S2AP_R,
    S2AP_W,
    SH_IS,
    SH_MASK,
    SH_SHIFT,
    SW_MASK,
    XN_MASK,
    XN_SHIFT,
    XN_XN,
    MT_S2_DEVICE_nGnRE,
    MT_S2_FWB_DEVICE_nGnRE,
)
from kvmmem.arch.pgtable import MemAttr, Perm, Stage2, TlbiKind
from kvmmem.errors import InputError

KVM_PGTABLE_MAX_LEVELS = 4


def stage2_pgtable_levels(ipa_bits: int, page_shift: int) -> int:
    """``stage2_pgtable_levels``: ``ARM64_HW_PGTABLE_LEVELS(ipa - 4)``, raised
    to 2 as ``kvm_get_vtcr`` does."""
    return max(2, (ipa_bits - 4 - 4) // (page_shift - 3))


def kvm_granule_shift(level: int, page_shift: int) -> int:
    """``kvm_granule_shift``: bits translated below an entry at ``level``."""
    return (page_shift - 3) * (KVM_PGTABLE_MAX_LEVELS - level) + 3


def kvm_pgd_pages(ipa_bits: int, start_level: int, page_shift: int) -> int:
    """``kvm_pgd_pages``: concatenated pages of the first-level table."""
    shift = kvm_granule_shift(start_level - 1, page_shift)
    return (((1 << ipa_bits) - 1) >> shift) + 1


def min_block_level(granule: int) -> int:
    """``KVM_PGTABLE_MIN_BLOCK_LEVEL``: 1 with 4K pages, else 2."""
    return 1 if granule == 4096 else 2


class Arm64Stage2(Stage2):
    """A VM's stage-2 table (``struct kvm_pgtable`` of ``kvm->arch.mmu``).

    ``granule``: 4096, 16384 or 65536.  ``ipa_bits``: 32..48 (default 40,
    ``KVM_PHYS_SHIFT``); ``levels`` overrides the level count.  ``fwb``:
    the CPU has FEAT_S2FWB (``stage2_has_fwb``), which changes the MemAttr
    encodings.  Raises InputError for an impossible geometry.
    """

    arch = "arm64"
    FREES_EMPTY_TABLES = True
    BREAK_BEFORE_MAKE = True

    def __init__(self, *, granule: int = 4096, ipa_bits: int | None = None,
                 levels: int | None = None, fwb: bool = False,
                 record_history: bool = False) -> None:
        if granule not in (4096, 16384, 65536):
            raise InputError(f"granule: {granule} is not 4K, 16K or 64K")
        page_shift = granule.bit_length() - 1
        ipa = 40 if ipa_bits is None else ipa_bits
        if not 32 <= ipa <= 48:
            raise InputError(f"ipa_bits: {ipa} is outside 32..48 (52-bit LPA is not modelled)")
        n = stage2_pgtable_levels(ipa, page_shift) if levels is None else levels
        if not 2 <= n <= KVM_PGTABLE_MAX_LEVELS:
            raise InputError(f"levels: {n} is not 2..4")
        start = KVM_PGTABLE_MAX_LEVELS - n
        if kvm_pgd_pages(ipa, start, page_shift) > 16:
            raise InputError(f"ipa_bits: {ipa} bits from level {start} need more than 16 "
                             "concatenated first-level pages")
        self.fwb = fwb
        self.start_level = start
        level_numbers = list(range(start, KVM_PGTABLE_MAX_LEVELS))
        mbl = min_block_level(granule)
        leaf_depths = [d for d, lv in enumerate(level_numbers) if lv >= mbl]
        type_bits = [KVM_PTE_TYPE if lv == KVM_PGTABLE_MAX_LEVELS - 1 else 0
                     for lv in level_numbers]
        oa_mask = ((1 << 48) - 1) & ~(granule - 1)
        super().__init__(
            granule=granule, ia_bits=ipa, nlevels=n, level_numbers=level_numbers,
            leaf_depths=leaf_depths, valid_mask=KVM_PTE_VALID, table_mask=KVM_PTE_TYPE,
            table_value=KVM_PTE_TYPE, oa_mask=oa_mask, oa_rshift=0, empty=0,
            table_bits=KVM_PTE_VALID | KVM_PTE_TYPE, young_bit=AF, dirty_bit=0,
            write_bit=S2AP_W, type_bits=type_bits, type_mask=KVM_PTE_TYPE, max_pa_bits=48,
            record_history=record_history)

    # --- format --------------------------------------------------------------------

    def memattr(self, attr: MemAttr) -> int:
        """The MemAttr[3:0] value KVM writes for ``attr`` (``KVM_S2_MEMATTR``)."""
        if self.fwb:
            return {MemAttr.NORMAL: MT_S2_FWB_NORMAL, MemAttr.NORMAL_NC: MT_S2_FWB_NORMAL_NC,
                    MemAttr.DEVICE: MT_S2_FWB_DEVICE_nGnRE}[attr]
        return {MemAttr.NORMAL: MT_S2_NORMAL, MemAttr.NORMAL_NC: MT_S2_NORMAL_NC,
                MemAttr.DEVICE: MT_S2_DEVICE_nGnRE}[attr]

    def _encode_leaf(self, prot: Perm, attr: MemAttr, depth: int, prefetch: bool,
                     host_writable: bool | None) -> int:
        # stage2_set_prot_attr + kvm_init_valid_leaf_pte
        bits = KVM_PTE_VALID | self._type_bits[depth]
        bits |= self.memattr(attr) << S2_MEMATTR_SHIFT
        if not prot.execute:
            bits |= XN_XN << XN_SHIFT
        if prot.read:
            bits |= S2AP_R
        if prot.write:
            bits |= S2AP_W
        bits |= SH_IS << SH_SHIFT
        bits |= AF
        return bits

    def _decode_leaf(self, bits: int) -> tuple[Perm, MemAttr, bool, bool, bool]:
        perm = Perm(bool(bits & S2AP_R), bool(bits & S2AP_W), not bits & XN_MASK)
        young = bool(bits & AF)
        return perm, decode_memattr((bits & S2_MEMATTR_MASK) >> S2_MEMATTR_SHIFT,
                                    self.fwb)[0], young, False, young

    def _relax_bits(self, prot: Perm) -> tuple[int, int]:
        # kvm_pgtable_stage2_relax_perms: only adds
        set_bits = (S2AP_R if prot.read else 0) | (S2AP_W if prot.write else 0)
        clear = XN_MASK if prot.execute else 0
        return set_bits, clear

    def _after_relax(self, gpa: int, d: int) -> None:
        # __kvm_tlb_flush_vmid_ipa_nsh after the relaxation
        size = self._size[d]
        self._tlbi(TlbiKind.ADDR, gpa & ~(size - 1), size)

    # --- break-before-make hooks ----------------------------------------------------

    def _map_into_block(self, slot: int, idx: int, pte: int, d: int, gpa: int) -> int:
        # stage2_map_walk_leaf: break the block, install an empty table; the
        # rest of the block is mapped again lazily by later faults.
        self._break(slot, idx, pte, gpa, d)
        child = self._alloc_table()
        self._write(slot, idx, self._EMPTY, self._table_pte(child), gpa, d)
        return child

    def _replace_table(self, slot: int, idx: int, old: int, new: int, d: int, gpa: int) -> None:
        # stage2_map_walk_table_pre: break the table entry (range TLBI), free
        # the unlinked table, then the block.
        self._break(slot, idx, old, gpa, d)
        self._free_subtree(self._slot_of(old), d + 1)
        self._write(slot, idx, self._EMPTY, new, gpa, d)

    def _map_over_leaf(self, slot: int, idx: int, old: int, new: int, d: int, gpa: int) -> None:
        # stage2_map_walker_try_leaf: no update if only permissions differ
        if not (old ^ new) & ~S2_PERMS:
            return
        self._break(slot, idx, old, gpa, d)
        self._write(slot, idx, self._EMPTY, new, gpa, d)

    def _zap_leaf(self, slot: int, idx: int, pte: int, d: int, gpa: int) -> bool:
        # stage2_unmap_put_pte: clear + TLBI by IPA and level
        self._break(slot, idx, pte, gpa, d)
        return False

    def _zap_table(self, slot: int, idx: int, pte: int, d: int, gpa: int) -> bool:
        # stage2_unmap_put_pte on a table: clear + kvm_tlb_flush_vmid_range
        self._break(slot, idx, pte, gpa, d)
        return False

    def _link_split(self, slot: int, idx: int, old: int, child: int, d: int, gpa: int) -> None:
        # stage2_split_walker: break the block, then install the populated table
        self._break(slot, idx, old, gpa, d)
        self._write(slot, idx, self._EMPTY, self._table_pte(child), gpa, d)

    # --- printer ---------------------------------------------------------------------

    def describe_entry(self, raw: int, level: int) -> str:
        """The decoded fields of ``raw`` read at ``level``."""
        return describe_entry(raw, level, granule=self.granule, fwb=self.fwb)


# --- decoding (also used by the printer) --------------------------------------------------

_CACHE = {0b01: "NC", 0b10: "WT", 0b11: "WB"}
_DEVICE = {0b00: "nGnRnE", 0b01: "nGnRE", 0b10: "nGRE", 0b11: "GRE"}


def decode_memattr(memattr: int, fwb: bool = False) -> tuple[MemAttr, str]:
    """The memory type of stage-2 MemAttr[3:0] (Arm ARM "Stage 2 memory type
    and Cacheability attributes", with or without FEAT_S2FWB)."""
    if fwb:
        if not memattr & 0b100:
            return MemAttr.DEVICE, f"Device-{_DEVICE[memattr & 3]}"
        low = memattr & 3
        if low == 0b10:
            return MemAttr.NORMAL, "Normal-WB (FWB)"
        if low == 0b11:
            return MemAttr.NORMAL, "as stage 1 (FWB)"
        if low == 0b01:
            return MemAttr.NORMAL_NC, "Normal-NC (FWB)"
        return MemAttr.DEVICE, "reserved (FWB)"
    outer, inner = memattr >> 2, memattr & 3
    if outer == 0:
        return MemAttr.DEVICE, f"Device-{_DEVICE[inner]}"
    if inner == 0:
        return MemAttr.NORMAL_NC, "reserved"
    kind = MemAttr.NORMAL if (outer, inner) == (3, 3) else MemAttr.NORMAL_NC
    return kind, f"Normal-o{_CACHE[outer]}-i{_CACHE[inner]}"


def describe_entry(raw: int, level: int, *, granule: int = 4096, fwb: bool = False) -> str:
    """``raw`` at stage-2 ``level`` decoded: kind, output address, fields."""
    if not raw & KVM_PTE_VALID:
        return "invalid"
    oa = raw & ((1 << 48) - 1) & ~(granule - 1)
    if level < 3 and raw & KVM_PTE_TYPE:
        return f"L{level} TABLE next={oa:#x}"
    if level == 3 and not raw & KVM_PTE_TYPE:
        return f"L{level} RESERVED (block type at level 3)"
    kind = "PAGE" if level == 3 else "BLOCK"
    memattr = (raw & S2_MEMATTR_MASK) >> S2_MEMATTR_SHIFT
    _a, mname = decode_memattr(memattr, fwb)
    s2ap = ("R" if raw & S2AP_R else "-") + ("W" if raw & S2AP_W else "-")
    xn = (raw & XN_MASK) >> XN_SHIFT
    sh = {0: "NSH", 2: "OSH", 3: "ISH"}.get((raw & SH_MASK) >> SH_SHIFT, "RES")
    fields = [f"L{level} {kind}", f"OA={oa:#x}", f"S2AP={s2ap}", f"XN={xn:#04b}",
              f"AF={int(bool(raw & AF))}", f"SH={sh}", f"MemAttr={memattr:#06b}({mname})"]
    if raw & DBM:
        fields.append("DBM=1")
    if raw & CONTIG:
        fields.append("Contig=1")
    if raw & SW_MASK:
        fields.append(f"SW={(raw & SW_MASK) >> 55:#x}")
    return " ".join(fields)
