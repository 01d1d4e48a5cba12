"""Break-before-make (DESIGN.md invariant 7; Arm ARM "Using break-before-make
when updating translation table entries"; kernel ``stage2_try_break_pte``).

``validate_bbm`` must flag a crafted valid -> valid change and a break not
followed by a TLB invalidation, and must pass every sequence the arm64
engine itself produces (the property test in test_properties.py checks the
latter on random operation sequences).
"""

from __future__ import annotations

import pytest

from kvmmem.arch import (
    PERM_R,
    PERM_RW,
    PERM_RWX,
    Arm64Stage2,
    PteWrite,
    Tlbi,
    TlbiKind,
    X86Tdp,
    make_stage2,
)
from kvmmem.arch.validate import validate_bbm
from kvmmem.errors import ValidationError

K4, M2, G1 = 4096, 2 << 20, 1 << 30
PAGE_A = 0x0040_0000_4000_07FF  # valid RW page at 0x40000000
PAGE_B = 0x0040_0000_5000_07FF  # same attributes, another output address
PAGE_A_RO = 0x0040_0000_4000_077F  # PAGE_A without S2AP W
BLOCK_A = 0x0040_0000_4000_07FD  # 2M block at 0x40000000
TABLE = 0x0000_2000_0000_3003


def test_crafted_valid_to_valid_output_change_is_caught() -> None:
    """A page's output address replaced in place: the classic BBM violation."""
    with pytest.raises(ValidationError, match="break-before-make") as err:
        validate_bbm([PteWrite(0x1000, K4, 0, PAGE_A), PteWrite(0x1000, K4, PAGE_A, PAGE_B)])
    assert "history[1]" in str(err.value)


def test_crafted_block_to_table_in_place_is_caught() -> None:
    """Changing a block into a table without breaking it first (size change)."""
    with pytest.raises(ValidationError, match="break-before-make"):
        validate_bbm([PteWrite(0, M2, BLOCK_A, TABLE)])


def test_break_without_tlbi_is_caught() -> None:
    """valid -> invalid -> valid with no TLB invalidation in between."""
    events = [PteWrite(0, K4, 0, PAGE_A), PteWrite(0, K4, PAGE_A, 0), PteWrite(0, K4, 0, PAGE_B)]
    with pytest.raises(ValidationError, match="no covering TLB invalidation"):
        validate_bbm(events)


def test_tlbi_elsewhere_does_not_count() -> None:
    events = [PteWrite(0, K4, PAGE_A, 0), Tlbi(TlbiKind.ADDR, 0x5000, K4),
              PteWrite(0, K4, 0, PAGE_B)]
    with pytest.raises(ValidationError):
        validate_bbm(events)


def test_new_leaf_overlapping_a_stale_one_is_caught() -> None:
    """A 4K page broken without TLBI, then a 2M block over it: the stale 4K
    translation and the block would coexist in the TLB."""
    events = [PteWrite(0x3000, K4, PAGE_A, 0), PteWrite(0, M2, 0, BLOCK_A)]
    with pytest.raises(ValidationError):
        validate_bbm(events)


def test_table_break_needs_a_range_covering_it() -> None:
    """A table may have cached leaves anywhere below it: a TLBI of one address
    is not enough, a range over all of it (or the whole VM) is."""
    bad = [PteWrite(0, M2, TABLE, 0), Tlbi(TlbiKind.ADDR, 0, K4), PteWrite(0, M2, 0, BLOCK_A)]
    with pytest.raises(ValidationError):
        validate_bbm(bad)
    for tlbi in (Tlbi(TlbiKind.RANGE, 0, M2), Tlbi(TlbiKind.VM, 0, 0)):
        validate_bbm([PteWrite(0, M2, TABLE, 0), tlbi, PteWrite(0, M2, 0, BLOCK_A)])


def test_correct_sequences_pass() -> None:
    """Break, TLBI (by address inside the leaf, a range meeting it, or all),
    make; and permission/AF-only changes in place (no BBM needed)."""
    for tlbi in (Tlbi(TlbiKind.ADDR, 0, K4), Tlbi(TlbiKind.RANGE, 0, M2),
                 Tlbi(TlbiKind.VM, 0, 0)):
        validate_bbm([PteWrite(0, K4, 0, PAGE_A), PteWrite(0, K4, PAGE_A, 0), tlbi,
                      PteWrite(0, K4, 0, PAGE_B)])
    validate_bbm([PteWrite(0, K4, PAGE_A, PAGE_A_RO), PteWrite(0, K4, PAGE_A_RO, PAGE_A),
                  PteWrite(0, K4, PAGE_A, PAGE_A & ~0x400)])


def test_engine_sequences_pass_and_are_checked_incrementally() -> None:
    """Every change the arm64 engine makes obeys BBM: remap, block over
    table, page inside block, split, collapse, unmap, unmap_all."""
    s2 = Arm64Stage2()
    s2.record_history()
    s2.map(G1, 0x40000, M2, PERM_RW)
    s2.map(G1, 0x50000, M2, PERM_RW)  # new output: break + TLBI + make
    s2.map(G1 + K4, 0x777, K4, PERM_R)  # page inside block
    validate_bbm(s2)
    s2.map(G1, 0x60000, M2, PERM_RWX)  # block over table
    s2.split(G1)
    s2.collapse(G1, M2)
    s2.relax_perms(G1, PERM_RWX)
    s2.test_clear_young(0, 2 * G1)
    s2.mkyoung(G1)
    s2.wrprotect_range(0, 2 * G1)
    s2.unmap_range(G1, K4)
    s2.map(G1 + K4, 0x888, K4, PERM_RW)
    s2.unmap_all()
    s2.map(G1, 0x40000, G1, PERM_RW)
    validate_bbm(s2)
    assert s2.history is not None and len(s2.history) > 512


def test_no_tlb_flush_mutation_is_caught() -> None:
    """The ``no-tlb-flush`` variant: the engine clears entries without
    invalidating; re-mapping the address violates break-before-make."""
    s2 = make_stage2("arm64", record_history=True)
    s2.map(0, 0x10, K4, PERM_RW)
    s2.skip_tlbi = True
    s2.unmap_range(0, K4)
    s2.map(0, 0x20, K4, PERM_RW)
    with pytest.raises(ValidationError, match="break-before-make"):
        validate_bbm(s2)


def test_other_architectures_have_no_bbm_rule() -> None:
    """x86 replaces present SPTEs in place; the check does not apply."""
    s2 = X86Tdp()
    s2.record_history()
    s2.map(0, 0x10, K4, PERM_RW)
    s2.map(0, 0x20, K4, PERM_RW)
    validate_bbm(s2)
    s2.validate_bbm()
