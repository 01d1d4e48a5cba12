"""arm64 stage-2 descriptor bits and memory-type encodings
(``arch/arm64/include/asm/kvm_pgtable.h``, ``arch/arm64/kvm/hyp/pgtable.c``,
``arch/arm64/include/asm/memory.h``): what :mod:`kvmmem.arch.arm64`'s format
encodes and :mod:`kvmmem.arch.validate`'s break-before-make check reads.
"""

from __future__ import annotations

# --- descriptor bits (kvm_pgtable.h / pgtable.c) -------------------------------------

KVM_PTE_VALID = 1 << 0
KVM_PTE_TYPE = 1 << 1
"""1: table (levels < 3) or page (level 3); 0: block."""
S2_MEMATTR_SHIFT = 2
S2_MEMATTR_MASK = 0xF << S2_MEMATTR_SHIFT
S2AP_R = 1 << 6
S2AP_W = 1 << 7
SH_SHIFT = 8
SH_MASK = 3 << SH_SHIFT
SH_IS = 3
"""``KVM_PTE_LEAF_ATTR_LO_S2_SH_IS``: inner shareable."""
AF = 1 << 10
DBM = 1 << 51
CONTIG = 1 << 52
XN_SHIFT = 53
XN_MASK = 3 << XN_SHIFT
XN_XN = 2
"""XN[1:0] = 0b10: not executable at EL1 or EL0 (``KVM_PTE_LEAF_ATTR_HI_S2_XN_XN``)."""
SW_MASK = 0xF << 55
S2_PERMS = S2AP_R | S2AP_W | XN_MASK
"""``KVM_PTE_LEAF_ATTR_S2_PERMS``: what ``stage2_pte_needs_update`` ignores."""
BBM_RELAXABLE = S2_PERMS | AF | DBM | SW_MASK
"""Bits a valid entry may change in place without break-before-make."""

MT_S2_NORMAL = 0xF
MT_S2_NORMAL_NC = 0x5
MT_S2_DEVICE_nGnRE = 0x1
MT_S2_FWB_NORMAL = 0x6
MT_S2_FWB_NORMAL_NC = 0x5
MT_S2_FWB_DEVICE_nGnRE = 0x1
