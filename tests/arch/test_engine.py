"""The shared engine and what each architecture does differently.

Each test names the kernel function whose behaviour it pins down.
"""

from __future__ import annotations

import pytest

from kvmmem.arch import (
    ARCHES,
    PERM_R,
    PERM_RW,
    PERM_RWX,
    PERM_RX,
    Arm64Stage2,
    MemAttr,
    RiscvGstage,
    Stage2,
    Tlbi,
    TlbiKind,
    X86Tdp,
    make_stage2,
)
from kvmmem.arch.validate import validate_bbm, validate_tables
from kvmmem.errors import InputError
from kvmmem.types import PAGE_SIZE

K4, M2, G1 = 4096, 2 << 20, 1 << 30
ARCH_NAMES = list(ARCHES)


def leaves(s2: Stage2) -> list[tuple[int, int, int]]:
    return [(lf.gpa, lf.size, lf.pfn) for lf in s2.for_each_leaf()]


# --- geometry -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("granule", "ipa", "levels", "start", "pages", "sizes"),
    [
        (4096, 40, 3, 1, 2, (K4, M2, G1)),  # two concatenated level-1 pages
        (4096, 32, 2, 2, 4, (K4, M2)),  # levels raised to 2, four level-2 pages
        (4096, 36, 3, 1, 1, (K4, M2, G1)),
        (4096, 44, 4, 0, 1, (K4, M2, G1)),
        (4096, 48, 4, 0, 1, (K4, M2, G1)),
        (16384, 40, 2, 2, 16, (16384, 32 << 20)),  # 16 concatenated pages
        (16384, 48, 3, 1, 2, (16384, 32 << 20)),
        (65536, 40, 2, 2, 1, (65536, 512 << 20)),
        (65536, 48, 3, 1, 1, (65536, 512 << 20)),
    ],
)
def test_arm64_geometry_stage2_pgtable_levels_kvm_pgd_pages(
        granule: int, ipa: int, levels: int, start: int, pages: int,
        sizes: tuple[int, ...]) -> None:
    """``stage2_pgtable_levels`` (min 2, ``kvm_get_vtcr``), start level
    ``4 - levels``, ``kvm_pgd_pages`` concatenation, block sizes from
    ``KVM_PGTABLE_MIN_BLOCK_LEVEL``."""
    s2 = Arm64Stage2(granule=granule, ipa_bits=ipa)
    assert (s2.nlevels, s2.start_level, s2.root_pages) == (levels, start, pages)
    assert s2.leaf_sizes == sizes
    assert s2.counters.table_bytes == pages * granule
    top = (1 << ipa) - granule
    s2.map(top, 0x10, granule, PERM_RW)
    leaf = s2.walk(top)
    assert leaf is not None and leaf.pfn == 0x10 and leaf.level == 3


def test_bad_geometry_and_arguments_raise_input_error() -> None:
    with pytest.raises(InputError):
        make_stage2("sparc")
    with pytest.raises(InputError):
        make_stage2("arm64", granule=8192)
    with pytest.raises(InputError):
        make_stage2("arm64", ipa_bits=52)
    with pytest.raises(InputError):
        make_stage2("x86", levels=3)
    with pytest.raises(InputError):
        make_stage2("riscv", ipa_bits=48)
    with pytest.raises(InputError):
        make_stage2("x86", bogus=True)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_map_rejects_bad_arguments_and_changes_nothing(arch: str) -> None:
    s2 = make_stage2(arch)
    before = s2.counters.as_dict()
    with pytest.raises(InputError, match="aligned"):
        s2.map(0x1000, 0x1, M2, PERM_RW)
    with pytest.raises(InputError, match="aligned"):
        s2.map(0x200000, 0x1, M2, PERM_RW)
    with pytest.raises(InputError, match="leaf size"):
        s2.map(0, 0, 8192, PERM_RW)
    with pytest.raises(InputError, match="range"):
        s2.map(1 << s2.ipa_bits, 0, K4, PERM_RW)
    with pytest.raises(InputError, match="output address"):
        s2.map(0, 1 << 60, K4, PERM_RW)
    with pytest.raises(InputError, match="range"):
        s2.unmap_range(1 << s2.ipa_bits, K4)
    with pytest.raises(InputError):
        s2.walk(-1)
    assert s2.counters.as_dict() == before
    assert leaves(s2) == []


# --- mapping inside a block --------------------------------------------------------------


def test_arm64_map_inside_block_breaks_it_and_drops_the_rest_stage2_map_walk_leaf() -> None:
    """``stage2_map_walk_leaf``: a page inside a valid block -> break the block
    (invalid + TLBI by IPA at the block level), install an empty table; the
    rest of the block is not mapped any more."""
    s2 = Arm64Stage2()
    s2.record_history()
    s2.map(0x200000, 0x1000, M2, PERM_RW)
    s2.map(0x203000, 0x5555, K4, PERM_RWX)
    assert leaves(s2) == [(0x203000, K4, 0x5555)]
    assert s2.counters.tlbi_addr == 1
    assert s2.history is not None
    tlbis = [ev for ev in s2.history if isinstance(ev, Tlbi)]
    assert tlbis == [Tlbi(TlbiKind.ADDR, 0x200000, M2)]
    validate_bbm(s2)
    validate_tables(s2)


@pytest.mark.parametrize("cls", [X86Tdp, RiscvGstage])
def test_map_inside_block_splits_it_tdp_mmu_split_huge_page(cls: type[Stage2]) -> None:
    """x86 ``tdp_mmu_split_huge_page`` / riscv ``kvm_riscv_gstage_split_huge``:
    the block becomes a full table first; the other 511 pages stay mapped."""
    s2 = cls()
    s2.map(0x200000, 0x1000, M2, PERM_RW)
    s2.map(0x203000, 0x5555, K4, PERM_RWX)
    got = leaves(s2)
    assert len(got) == 512
    assert got[3] == (0x203000, K4, 0x5555)
    assert got[4] == (0x204000, K4, 0x1004)
    assert got[0] == (0x200000, K4, 0x1000)
    assert s2.counters.tlbi_addr == (1 if cls is RiscvGstage else 0) + 1
    validate_tables(s2)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_block_over_table_collapses_and_frees_the_tables(arch: str) -> None:
    """Mapping a block where a table is (arm64 ``stage2_map_walk_table_pre``,
    x86 ``tdp_mmu_map_handle_target_level`` + ``handle_removed_pt``): the
    table and everything below it are freed."""
    s2 = make_stage2(arch)
    s2.record_history()
    for i in range(8):
        s2.map(G1 + i * K4, 0x3000 + i, K4, PERM_RW)
    live = s2.tables_live
    freed = s2.counters.tables_freed
    s2.map(G1, 0x40000, M2, PERM_RWX)
    assert leaves(s2) == [(G1, M2, 0x40000)]
    assert s2.counters.tables_freed == freed + 1
    assert s2.tables_live == live - 1
    validate_tables(s2)
    validate_bbm(s2)


def test_arm64_permission_only_change_is_not_a_map_stage2_pte_needs_update() -> None:
    """``stage2_map_walker_try_leaf``: same output and attributes, only the
    permissions differ -> nothing written (-EAGAIN); ``relax_perms`` adds them
    in place (no BBM) and invalidates the IPA."""
    s2 = Arm64Stage2()
    s2.record_history()
    assert s2.map(0, 0x10, K4, PERM_R) == 3
    assert s2.map(0, 0x10, K4, PERM_RWX) == 0
    leaf = s2.walk(0)
    assert leaf is not None and leaf.perm == PERM_R
    assert s2.relax_perms(0, PERM_RWX)
    leaf = s2.walk(0)
    assert leaf is not None and leaf.perm == PERM_RWX
    assert s2.counters.tlbi_addr == 1
    # another output address does go through break-before-make
    assert s2.map(0, 0x20, K4, PERM_RW) == 2
    validate_bbm(s2)


@pytest.mark.parametrize("cls", [X86Tdp, RiscvGstage])
def test_same_size_remap_replaces_in_place_and_flushes(cls: type[Stage2]) -> None:
    """x86/riscv overwrite a present leaf in place (no BBM on these
    architectures) and flush its translation when the pfn changes."""
    s2 = cls()
    s2.map(0, 0x10, K4, PERM_RW)
    assert s2.map(0, 0x10, K4, PERM_RW) == 0
    assert s2.map(0, 0x20, K4, PERM_RW) == 1
    assert s2.counters.tlbi_addr == 1
    leaf = s2.walk(0)
    assert leaf is not None and leaf.pfn == 0x20


def test_riscv_smaller_leaf_with_same_frame_only_gets_new_protection() -> None:
    """``kvm_riscv_gstage_map_page``: a leaf at a smaller level whose frame,
    aligned to the requested size, is the one being mapped: the kernel only
    updates that leaf's protection (``kvm_riscv_gstage_update_pte_prot``)."""
    s2 = RiscvGstage()
    s2.map(0x200000, 0x1000, K4, PERM_R)
    s2.map(0x201000, 0x1001, K4, PERM_R)
    assert s2.map(0x200000, 0x1000, M2, PERM_RWX) == 1
    assert leaves(s2) == [(0x200000, K4, 0x1000), (0x201000, K4, 0x1001)]
    leaf = s2.walk(0x200000)
    assert leaf is not None and leaf.perm == PERM_RWX
    # a different frame replaces the table with the block
    assert s2.map(0x200000, 0x2000, M2, PERM_RWX) == 1
    assert leaves(s2) == [(0x200000, M2, 0x2000)]


# --- unmap -----------------------------------------------------------------------------


def test_arm64_unmap_frees_empty_tables_stage2_unmap_walker() -> None:
    """``kvm_pgtable_stage2_unmap``: each leaf cleared with its own TLBI, tables
    left empty are unlinked (range TLBI) and freed; no flush left to do."""
    s2 = Arm64Stage2()
    s2.record_history()
    s2.map(0x1000, 0x1, K4, PERM_RW)
    s2.map(0x2000, 0x2, K4, PERM_RW)
    assert s2.tables_live == 4
    assert s2.unmap_range(0x1000, K4) is False
    assert s2.tables_live == 4
    assert s2.unmap_range(0, G1) is False
    assert s2.tables_live == 2  # the two concatenated root pages
    assert (s2.counters.tlbi_addr, s2.counters.tlbi_range) == (2, 2)
    assert s2.counters.tables_freed == 2
    assert s2.counters.table_bytes == 2 * PAGE_SIZE
    validate_bbm(s2)
    validate_tables(s2)


@pytest.mark.parametrize("cls", [X86Tdp, RiscvGstage])
def test_x86_riscv_unmap_zaps_leaves_only_tdp_mmu_zap_leafs(cls: type[Stage2]) -> None:
    """``tdp_mmu_zap_leafs`` / ``kvm_riscv_gstage_unmap_range`` clear leaves and
    leave the page tables; the caller flushes (return True)."""
    s2 = cls()
    s2.map(0x1000, 0x1, K4, PERM_RW)
    live = s2.tables_live
    assert s2.unmap_range(0, G1) is True
    assert leaves(s2) == [] and s2.tables_live == live
    assert s2.counters.tlbi_addr == 0
    assert s2.unmap_range(0, G1) is False
    s2.map(0x1000, 0x1, K4, PERM_RW)
    assert s2.unmap_range(0, G1, free_tables=True) is True
    assert s2.tables_live == s2.root_pages
    validate_tables(s2)


@pytest.mark.parametrize("arch", ["arm64", "x86"])
def test_unmap_of_part_of_a_block_removes_the_whole_block(arch: str) -> None:
    """arm64 ``stage2_unmap_walker`` and x86 ``tdp_mmu_zap_leafs`` visit every
    leaf meeting the range and clear it whole."""
    s2 = make_stage2(arch)
    s2.map(0x200000, 0x1000, M2, PERM_RW)
    s2.unmap_range(0x201000, K4)
    assert leaves(s2) == []


def test_riscv_unmap_skips_a_partly_covered_leaf_kvm_riscv_gstage_unmap_range() -> None:
    """``kvm_riscv_gstage_unmap_range`` WARNs ("Skip unmap range") and leaves a
    leaf the range does not cover whole in place."""
    s2 = RiscvGstage()
    s2.map(0x200000, 0x1000, M2, PERM_RW)
    assert s2.unmap_range(0x201000, K4) is False
    assert leaves(s2) == [(0x200000, M2, 0x1000)]
    assert s2.counters.unmap_skipped == 1
    assert s2.unmap_range(0, 4 * M2) is True
    assert leaves(s2) == []


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_unmap_all_leaves_only_the_root(arch: str) -> None:
    """``kvm_mmu_zap_all`` / stage-2 teardown: no table below the root left."""
    s2 = make_stage2(arch)
    s2.record_history()
    for i, size in enumerate(s2.leaf_sizes):
        s2.map((i + 1) * G1 + 0 * size, ((i + 1) * G1) >> 12, size, PERM_RW)
    assert s2.unmap_all() is (arch != "arm64")
    assert leaves(s2) == []
    assert s2.tables_live == s2.root_pages
    assert s2.counters.tables_allocated - s2.counters.tables_freed == s2.root_pages
    if arch == "arm64":
        assert s2.counters.tlbi_vm == 1
    validate_tables(s2)
    validate_bbm(s2)


# --- attribute updates ------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_wrprotect_range_kvm_pgtable_stage2_wrprotect(arch: str) -> None:
    """Write permission removed from every leaf meeting the range, no TLBI
    (the caller flushes the memslot)."""
    s2 = make_stage2(arch)
    s2.map(0, 0x10, K4, PERM_RW)
    s2.map(M2, 0x200, M2, PERM_RWX)
    assert s2.wrprotect_range(0, 4 * M2) is True
    assert all(not lf.writable for lf in s2.for_each_leaf())
    assert s2.wrprotect_range(0, 4 * M2) is False
    assert s2.counters.tlbi_addr == 0
    leaf = s2.walk(M2)
    assert leaf is not None and leaf.perm == PERM_RX


def test_x86_wrprotect_keeps_mmu_writable_for_fast_page_fault() -> None:
    """``wrprot_gfn_range`` clears only PT_WRITABLE_MASK; MMU-writable (58)
    stays so ``fast_page_fault`` can restore W without the slow path."""
    s2 = X86Tdp()
    s2.map(0, 0x10, K4, PERM_RWX)
    s2.wrprotect_range(0, K4)
    leaf = s2.walk(0)
    assert leaf is not None and leaf.raw == 0x8600_0000_0001_0B75
    s2.relax_perms(0, PERM_RW)
    leaf = s2.walk(0)
    assert leaf is not None and leaf.raw == 0x8600_0000_0001_0B77


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_test_clear_young_kvm_age_gfn(arch: str) -> None:
    """``kvm_age_gfn`` clears the access flag and reports whether it was set;
    ``kvm_test_age_gfn`` only reports; no TLBI."""
    s2 = make_stage2(arch)
    s2.map(0, 0x10, K4, PERM_RW)
    assert s2.test_clear_young(0, K4, clear=False) is True
    assert s2.test_clear_young(0, K4) is True
    assert s2.test_clear_young(0, K4) is False
    leaf = s2.walk(0)
    assert leaf is not None and not leaf.young
    assert leaf.accessible is (arch == "x86")
    assert s2.mkyoung(0)
    leaf = s2.walk(0)
    assert leaf is not None and leaf.young and leaf.accessible
    assert s2.counters.tlbi_addr == 0


def test_collect_dirty_ept_d_bits_under_pml() -> None:
    """x86 with PML: dirty = the EPT D bit; ``kvm_tdp_mmu_clear_dirty_slot``
    clears it.  Writable SPTEs are created dirty (``make_spte``); the
    hardware sets D on a write (:meth:`hw_access`)."""
    s2 = X86Tdp()
    s2.map(0, 0x10, K4, PERM_RW)
    s2.map(M2, 0x200, M2, PERM_RW)
    s2.map(2 * M2, 0x400, K4, PERM_RX)
    got = s2.collect_dirty(0, 4 * M2)
    assert got == [0, *list(range(M2 >> 12, 2 * M2 >> 12))]
    assert s2.collect_dirty(0, 4 * M2) == []
    s2.hw_access(0x0, write=True)
    s2.hw_access(2 * M2, write=True)  # not writable: no D
    assert s2.collect_dirty(0, 4 * M2, clear=False) == [0]
    assert s2.counters.hw_ad_updates == 1


def test_collect_dirty_arm64_has_no_hardware_dirty_state() -> None:
    """KVM does not set DBM at stage 2: arm64 dirty logging is write-protection
    plus ``mark_page_dirty`` in the fault path, never a hardware bit."""
    s2 = Arm64Stage2()
    s2.map(0, 0x10, K4, PERM_RW)
    s2.hw_access(0, write=True)
    assert s2.collect_dirty(0, K4) == []


# --- split / collapse ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_split_then_collapse_round_trip(arch: str) -> None:
    """Eager split (``kvm_pgtable_stage2_split``, ``tdp_mmu_split_huge_page``,
    ``kvm_riscv_gstage_split_huge``) keeps every translation; collapsing the
    table again gives back the same block."""
    s2 = make_stage2(arch)
    s2.record_history()
    s2.map(G1, G1 >> 12, G1, PERM_RWX)
    block = s2.walk(G1)
    assert block is not None
    per_split = 512 + (2 if arch == "arm64" else 1)  # children + link (+ break on arm64)
    assert s2.split(G1 + 5 * M2) == per_split
    assert len(leaves(s2)) == 512
    assert s2.split_range(G1, 4 * M2) == 4 * per_split
    assert len(leaves(s2)) == 508 + 4 * 512
    leaf = s2.walk(G1 + 3 * M2 + 7 * K4)
    assert leaf is not None and leaf.pfn == (G1 + 3 * M2 + 7 * K4) >> 12 and leaf.size == K4
    for i in range(4):
        assert s2.collapse(G1 + i * M2, M2) > 0
    assert s2.collapse(G1, G1) > 0
    again = s2.walk(G1)
    assert again is not None and again.raw == block.raw
    assert s2.tables_live == s2.root_pages + (1 if arch == "x86" else 0)
    validate_tables(s2)
    validate_bbm(s2)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_collapse_refuses_holes_discontiguity_and_mixed_permissions(arch: str) -> None:
    s2 = make_stage2(arch)
    for i in range(511):
        s2.map(i * K4, 0x1000 + i, K4, PERM_RW)
    assert s2.collapse(0, M2) == 0  # a hole
    s2.map(511 * K4, 0x5000, K4, PERM_RW)
    assert s2.collapse(0, M2) == 0  # not contiguous
    s2.map(511 * K4, 0x1000 + 511, K4, PERM_R)
    assert s2.collapse(0, M2) == 0  # permissions differ
    s2.relax_perms(511 * K4, PERM_RW)
    assert s2.collapse(0, M2) > 0
    assert leaves(s2) == [(0, M2, 0x1000)]


# --- TLBI listeners and accounting ------------------------------------------------------------


def test_tlbi_listeners_see_every_invalidation() -> None:
    """The vCPU TLB model subscribes to the engine's own invalidations (arm64
    break-before-make inside map/unmap) and to the flushes callers request."""
    s2 = Arm64Stage2()
    seen: list[Tlbi] = []
    s2.tlbi_listeners.append(seen.append)
    s2.map(0, 0x10, K4, PERM_RW)
    s2.map(0, 0x20, K4, PERM_RW)
    s2.flush_remote_tlbs_range(0, M2)
    s2.flush_remote_tlbs()
    assert seen == [Tlbi(TlbiKind.ADDR, 0, K4), Tlbi(TlbiKind.RANGE, 0, M2),
                    Tlbi(TlbiKind.VM, 0, 0)]
    c = s2.counters
    assert (c.tlbi_addr, c.tlbi_range, c.tlbi_vm) == (1, 1, 1)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_entries_written_and_table_accounting(arch: str) -> None:
    """``map`` returns the entries it wrote: one per new table plus the leaf."""
    s2 = make_stage2(arch)
    n = s2.nlevels
    assert s2.map(0, 0x10, K4, PERM_RW) == n
    assert s2.map(K4, 0x11, K4, PERM_RW) == 1
    assert s2.counters.entries_written == n + 1
    assert s2.counters.tables_allocated == s2.root_pages + n - 1
    assert s2.counters.table_bytes == (s2.root_pages + n - 1) * PAGE_SIZE


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_model_memory_per_4k_page_is_close_to_hardware(arch: str) -> None:
    """Hardware needs 8 bytes per mapped 4K page; the model stays under 16."""
    s2 = make_stage2(arch)
    n = 8192
    for i in range(n):
        s2.map(i * K4, 0x100000 + i, K4, PERM_RW)
    assert s2.model_bytes() / n <= 16


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_walk_path_and_for_each_leaf_order(arch: str) -> None:
    s2 = make_stage2(arch)
    s2.map(3 * G1, (3 * G1) >> 12, G1, PERM_RX, MemAttr.DEVICE)
    s2.map(M2, 0x999, K4, PERM_RW)
    s2.map(0, 0x400, M2, PERM_RW)
    assert [lf.gpa for lf in s2.for_each_leaf()] == [0, M2, 3 * G1]
    assert [lf.gpa for lf in s2.for_each_leaf(M2, 3 * G1)] == [M2]
    path = s2.walk_path(M2)
    assert path[-1].raw == next(iter(s2.for_each_leaf(M2))).raw
    assert s2.walk(5 * K4 + M2) is None
    dev = s2.walk(3 * G1 + 0x123456)
    assert dev is not None and dev.device and dev.pfn == (3 * G1 + 0x123000) >> 12
