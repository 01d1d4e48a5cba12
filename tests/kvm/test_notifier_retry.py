"""KVM's MMU-notifier subscriber, driven by hand at the kernel's
synchronisation points (kvmmem.sync): the invalidation retry check per
architecture, aging, release, the v5.4 protocol, and huge mappings coming
back when dirty logging is switched off.

A fault and an mm operation are generators; the tests step each one to a
named pause and interleave them the way two CPUs can in the kernel:

* the vCPU fault samples ``mmu_invalidate_seq``, resolves its pfn and pauses
  before taking ``mmu_lock`` (it then holds no lock: ``mmap_lock`` was
  dropped after ``vma_lookup`` on arm64/riscv, and x86 resolves a present
  page with the lockless ``get_user_page_fast_only``);
* ``munmap`` runs ``invalidate_range_start`` (zap, ``mmu_invalidate_begin``)
  and pauses at ``pte_changed``, before ``invalidate_range_end``: an
  invalidation is in progress;
* the fault takes ``mmu_lock`` and makes its retry check.

Expected values are the kernel's (virt/kvm/kvm_main.c, include/linux/kvm_host.h,
arch/*/kvm/mmu.c), named in each docstring; kernel-semantics.md §4.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from kvmmem.host import PROT_READ, PROT_WRITE
from kvmmem.kvm.invariants import validate_vm
from kvmmem.kvm.memslot import KVM_MEM_LOG_DIRTY_PAGES
from kvmmem.kvm.mmu_notifier import INVALID_GPA
from kvmmem.kvm.vcpu import Access, Fault, FaultResult
from kvmmem.kvm.vm import Vm
from kvmmem.sync import Sync, SyncKind
from kvmmem.variants import get_variant

ARCHES = ("x86", "arm64", "riscv")
P = 4096
M2 = 2 << 20
G = 0x4000_0000  # slot gpa (2M aligned)
GFN = G >> 12
NPAGES = 16
RW = PROT_READ | PROT_WRITE
HVA_2M = 0x7E00_0000_0000  # a 2M aligned hva for huge backings
# The accessed bit of a stage-2 leaf: EPT bit 8 (SDM Vol. 3 "Accessed and Dirty
# Flags for EPT"), arm64 AF bit 10 (Arm ARM stage-2 descriptor), RISC-V A bit 6
# (privileged spec, Sv39x4 PTE).
YOUNG_BIT = {"x86": 1 << 8, "arm64": 1 << 10, "riscv": 1 << 6}


def ram_vm(arch: str, variant: str = "upstream") -> tuple[Vm, int]:
    """A VM with slot 0 at ``G`` over 16 present pages of anonymous RAM, plus an
    unrelated 4-page mapping no memslot covers; returns (vm, slot hva)."""
    vm = Vm(arch, variant=variant)
    hva = vm.mm.mmap(NPAGES * P, RW, "anon", fill=0x11)
    vm.set_user_memory_region(0, G, NPAGES * P, hva)
    return vm, hva


def fault_op(vm: Vm, gpa: int) -> Generator[Sync, None, FaultResult]:
    """The architecture's stage-2 fault handler for a write to ``gpa``
    (kvm_tdp_page_fault / kvm_handle_guest_abort / gstage_page_fault)."""
    return vm.arch.handle_fault(vm, vm.vcpus[0], gpa, Access.WRITE)


def run_to(op: Generator[Sync, None, Any], kind: SyncKind, name: str) -> list[Sync]:
    """Step ``op`` until it pauses at ``kind name``; the pauses it went through."""
    seen: list[Sync] = []
    for sync in op:
        seen.append(sync)
        if sync.kind is kind and sync.name == name:
            return seen
    raise AssertionError(f"never paused at {kind.value} {name}: {[str(s) for s in seen]}")


def finish(op: Generator[Sync, None, Any]) -> tuple[Any, list[Sync]]:
    """Run ``op`` to completion; (its result, the pauses on the way)."""
    seen: list[Sync] = []
    try:
        while True:
            seen.append(next(op))
    except StopIteration as stop:
        return stop.value, seen


def takes_mmap_lock(syncs: list[Sync]) -> bool:
    return any(s.kind is SyncKind.ACQUIRE and s.name == "mmap_lock" for s in syncs)


def fault_paused_before_mmu_lock(vm: Vm, gpa: int) -> Generator[Sync, None, FaultResult]:
    """A write fault on ``gpa`` stepped to its ``acquire mmu_lock`` pause,
    holding no lock (every mmap_lock it took is dropped again)."""
    op = fault_op(vm, gpa)
    seen = run_to(op, SyncKind.ACQUIRE, "mmu_lock")
    taken = sum(1 for s in seen if s.name == "mmap_lock" and s.kind is SyncKind.ACQUIRE)
    dropped = sum(1 for s in seen if s.name == "mmap_lock" and s.kind is SyncKind.RELEASE)
    assert taken == dropped
    return op


def munmap_in_progress(vm: Vm, hva: int) -> Generator[Sync, None, None]:
    """``munmap(hva, 4K)`` stepped past ``invalidate_range_start`` to its
    ``pte_changed`` pause (``invalidate_range_end`` not yet run)."""
    op = vm.mm.munmap_op(hva, P)
    run_to(op, SyncKind.POINT, "pte_changed")
    return op


# =====================================================================================
# The retry check: x86 per gfn, arm64 / riscv any invalidation
# =====================================================================================


@pytest.mark.parametrize("arch", ARCHES)
def test_fault_outside_the_invalidated_range(arch: str) -> None:
    """An invalidation of gfn G+8 is in progress when a fault on gfn G takes
    mmu_lock.  x86 (``is_page_fault_stale`` -> ``mmu_invalidate_retry_gfn``)
    checks only the recorded gfn range (``kvm_mmu_invalidate_range_add``) and
    the sequence: the fault proceeds and maps G.  arm64 (``user_mem_abort``)
    and riscv (``kvm_riscv_mmu_map``) call ``mmu_invalidate_retry``, true while
    ``mmu_invalidate_in_progress`` is non-zero: the fault returns -EAGAIN
    (RETRY) and maps nothing; the guest re-faults after
    ``invalidate_range_end``."""
    vm, hva = ram_vm(arch)
    seq = vm.mmu_invalidate_seq
    fault = fault_paused_before_mmu_lock(vm, G)
    unmap = munmap_in_progress(vm, hva + 8 * P)
    assert vm.mmu_invalidate_in_progress == 1
    assert (vm.mmu_invalidate_range_start, vm.mmu_invalidate_range_end) == (GFN + 8, GFN + 9)
    result, rest = finish(fault)
    assert not takes_mmap_lock(rest)  # munmap holds mmap_lock for writing
    leaf = vm.stage2.walk(G)
    if arch == "x86":
        assert result.kind is Fault.RESUME
        assert leaf is not None and leaf.perm.write
        pte = vm.mm.host_pte(hva)
        assert pte is not None and leaf.pfn == pte.pfn
    else:
        assert result.kind is Fault.RETRY
        assert leaf is None
    finish(unmap)
    assert vm.mmu_invalidate_in_progress == 0 and vm.mmu_invalidate_seq == seq + 1
    validate_vm(vm)
    # The re-executed access completes once the invalidation has ended.
    assert vm.guest_access(G, 4, Access.WRITE, 0x5A).result == "ok"
    assert vm.mm.host_read(hva, 4) == 0x5A
    validate_vm(vm)


@pytest.mark.parametrize("arch", ARCHES)
def test_fault_inside_the_invalidated_range_retries_everywhere(arch: str) -> None:
    """The fault resolved the pfn of gfn G+8, then munmap of that page ran its
    ``invalidate_range_start``: every architecture retries (the pfn is being
    unmapped; mapping it would leave a stale translation), x86 because G+8 lies in
    ``[mmu_invalidate_range_start, mmu_invalidate_range_end)``."""
    vm, hva = ram_vm(arch)
    fault = fault_paused_before_mmu_lock(vm, G + 8 * P)
    unmap = munmap_in_progress(vm, hva + 8 * P)
    result, _ = finish(fault)
    assert result.kind is Fault.RETRY
    assert vm.stage2.walk(G + 8 * P) is None
    finish(unmap)
    validate_vm(vm)
    assert vm.guest_access(G + 8 * P, 4, Access.READ).result == "fault"  # no VMA any more


def test_x86_fault_starting_during_an_invalidation() -> None:
    """x86 ``kvm_tdp_page_fault`` also checks before resolving the pfn
    (``mmu_invalidate_retry_gfn_unsafe``, the lockless pre-check of
    ``kvm_faultin_pfn``): started while munmap of G+8 is between start and end,
    a fault on G+8 returns RETRY at once, without a single pause (no pfn
    resolved, no lock taken), and a fault on G completes."""
    vm, hva = ram_vm("x86")
    unmap = munmap_in_progress(vm, hva + 8 * P)
    inside, syncs = finish(fault_op(vm, G + 8 * P))
    assert inside.kind is Fault.RETRY and syncs == []
    outside, syncs = finish(fault_op(vm, G))
    assert outside.kind is Fault.RESUME and not takes_mmap_lock(syncs)
    assert vm.stage2.walk(G) is not None
    finish(unmap)
    validate_vm(vm)


@pytest.mark.parametrize("arch", ARCHES)
def test_sequence_bumped_by_a_completed_invalidation(arch: str) -> None:
    """A whole invalidation of gfn G+8 (start and end) completes while the fault
    on G waits for mmu_lock: ``mmu_invalidate_seq`` moved past the value the fault
    sampled, so all three retry (``mmu_invalidate_retry_gfn`` checks the sequence
    for any gfn, not only the range)."""
    vm, hva = ram_vm(arch)
    fault = fault_paused_before_mmu_lock(vm, G)
    vm.mm.munmap(hva + 8 * P, P)
    assert vm.mmu_invalidate_in_progress == 0
    result, _ = finish(fault)
    assert result.kind is Fault.RETRY
    assert vm.stage2.walk(G) is None


# =====================================================================================
# linux-5.4: notifier_counts_every_range
# =====================================================================================


@pytest.mark.parametrize("arch", ARCHES)
def test_v5_4_counts_an_invalidation_outside_every_memslot(arch: str) -> None:
    """v5.4 ``kvm_mmu_notifier_invalidate_range_start`` raised
    ``mmu_notifier_count`` for every invalidation and ``..._range_end`` bumped
    ``mmu_notifier_seq``, memslots or not; upstream (``kvm_handle_hva_range``
    calls ``kvm_mmu_invalidate_begin``/``end`` only for a range meeting a
    memslot) leaves both alone.  So munmap of memory no memslot covers makes a
    concurrent fault retry on every architecture in 5.4 (``mmu_notifier_retry``:
    count non-zero), and not upstream."""
    for variant, counted in (("upstream", False), ("linux-5.4", True)):
        if get_variant(variant).arch_unsupported(arch):
            continue  # riscv KVM came in v5.16, after the v5.13 change
        vm, _hva = ram_vm(arch, variant)
        other = vm.mm.mmap(4 * P, RW, "anon", fill=0x22)
        seq = vm.mmu_invalidate_seq
        invalidations = vm.stats.notifier_invalidations
        fault = fault_paused_before_mmu_lock(vm, G)
        unmap = munmap_in_progress(vm, other)
        assert vm.mmu_invalidate_in_progress == int(counted), variant
        assert vm.mmu_invalidate_range_start == INVALID_GPA  # no range recorded either way
        result, _ = finish(fault)
        assert result.kind is (Fault.RETRY if counted else Fault.RESUME), variant
        finish(unmap)
        assert vm.mmu_invalidate_in_progress == 0
        assert vm.mmu_invalidate_seq == seq + int(counted), variant
        assert vm.stats.notifier_invalidations == invalidations + int(counted), variant
        validate_vm(vm)


def test_v5_4_x86_records_no_gfn_range() -> None:
    """v5.4 x86 ``tdp_page_fault`` rechecked ``mmu_notifier_retry(kvm, mmu_seq)``:
    no range was recorded (``mmu_notifier_range_start`` came in v5.13), so an
    in-progress invalidation of gfn G+8 makes a fault on G retry; upstream
    (``mmu_invalidate_retry_gfn``) lets it proceed."""
    for variant, expected in (("upstream", Fault.RESUME), ("linux-5.4", Fault.RETRY)):
        vm, hva = ram_vm("x86", variant)
        fault = fault_paused_before_mmu_lock(vm, G)
        unmap = munmap_in_progress(vm, hva + 8 * P)
        assert vm.mmu_invalidate_in_progress == 1
        recorded = (vm.mmu_invalidate_range_start, vm.mmu_invalidate_range_end)
        assert recorded == ((INVALID_GPA, INVALID_GPA) if variant == "linux-5.4"
                            else (GFN + 8, GFN + 9)), variant
        result, _ = finish(fault)
        assert result.kind is expected, variant
        finish(unmap)
        validate_vm(vm)


# =====================================================================================
# Aging: kvm_age_gfn / kvm_test_age_gfn through the young notifiers
# =====================================================================================


@pytest.mark.parametrize("arch", ARCHES)
def test_test_young_and_clear_young(arch: str) -> None:
    """``kvm_mmu_notifier_test_young`` -> ``kvm_test_age_gfn`` reports whether a
    stage-2 leaf of the range has its accessed bit (EPT A, arm64 AF, RISC-V A)
    and changes nothing; ``kvm_mmu_notifier_clear_young`` -> ``kvm_age_gfn``
    clears it, reports that it was set, keeps the mapping (same pfn and
    permissions) and never flushes; ``mmu_notifier_clear_young`` also clears
    the host PTEs' accessed bits, so afterwards nothing reads young."""
    vm, hva = ram_vm(arch)
    assert vm.guest_access(G, 4, Access.WRITE, 0x77).result == "ok"
    leaf = vm.stage2.walk(G)
    assert leaf is not None and leaf.young and leaf.raw & YOUNG_BIT[arch]
    raw = leaf.raw
    assert vm.notifier.test_young(hva, hva + P)
    assert not vm.notifier.test_young(hva + P, hva + 2 * P)  # no leaf there
    after = vm.stage2.walk(G)
    assert after is not None and after.raw == raw  # test_young modifies nothing
    flushes = vm.stats.remote_tlb_flush_requests
    assert vm.mm.clear_young(hva, hva + NPAGES * P)
    aged = vm.stage2.walk(G)
    assert aged is not None and not aged.young
    assert aged.raw == raw & ~YOUNG_BIT[arch]
    assert (aged.pfn, aged.perm, aged.size) == (leaf.pfn, leaf.perm, leaf.size)
    assert vm.stats.remote_tlb_flush_requests == flushes
    assert not vm.notifier.test_young(hva, hva + NPAGES * P)
    assert not vm.mm.test_young(hva, hva + NPAGES * P)
    assert not vm.mm.clear_young(hva, hva + NPAGES * P)  # nothing young left
    assert vm.mmu_invalidate_seq == 0  # aging is not an invalidation
    validate_vm(vm)


@pytest.mark.parametrize("arch", ["x86", "arm64", "riscv"])
def test_access_after_aging_is_young_again(arch: str) -> None:
    """After ``kvm_age_gfn`` and a TLB flush, the guest's next access makes the
    leaf young again: x86 the CPU sets EPT A on its walk (A/D enabled); arm64
    the walk takes an access flag fault, ``kvm_handle_guest_abort`` ->
    ``handle_access_fault`` -> ``kvm_pgtable_stage2_mkyoung`` (or hardware AF
    with VTCR_EL2.HA); riscv a guest page fault, ``kvm_riscv_gstage_map_page``
    finds the leaf for the same frame and rewrites its protection, A included.
    The access completes (no endless re-faulting) and sees the memory."""
    vm, hva = ram_vm(arch)
    assert vm.guest_access(G, 4, Access.WRITE, 0x77).result == "ok"
    assert vm.mm.clear_young(hva, hva + P)
    vm.flush_remote_tlbs(zap=False)
    out = vm.guest_access(G, 4, Access.READ)
    assert (out.result, out.value) == ("ok", 0x77)
    leaf = vm.stage2.walk(G)
    assert leaf is not None and leaf.young
    assert vm.notifier.test_young(hva, hva + P)
    validate_vm(vm)


@pytest.mark.parametrize("arch", ARCHES)
def test_clear_flush_young_flushes_except_on_x86(arch: str) -> None:
    """``kvm_mmu_notifier_clear_flush_young`` ages like clear_young and flushes
    the TLBs when something was young (``kvm_handle_hva_range(...,
    flush_on_ret)``), except where ``CONFIG_KVM_ELIDE_TLB_FLUSH_IF_YOUNG`` is
    selected: x86 since v6.13; v5.4 flushed on x86 too.  Nothing young: no
    flush anywhere."""
    for variant in ("upstream", "linux-5.4"):
        if get_variant(variant).arch_unsupported(arch):
            continue  # riscv KVM came in v5.16
        vm, hva = ram_vm(arch, variant)
        assert vm.guest_access(G, 4, Access.READ).result == "ok"
        assert vm.vcpus[0].tlb
        flushes = vm.stats.remote_tlb_flush_requests
        assert vm.mm.clear_flush_young(hva, hva + NPAGES * P)
        leaf = vm.stage2.walk(G)
        assert leaf is not None and not leaf.young
        elided = arch == "x86" and variant == "upstream"
        assert vm.stats.remote_tlb_flush_requests == flushes + (0 if elided else 1), variant
        assert bool(vm.vcpus[0].tlb) == elided, variant
        flushes = vm.stats.remote_tlb_flush_requests
        assert not vm.mm.clear_flush_young(hva, hva + NPAGES * P)
        assert vm.stats.remote_tlb_flush_requests == flushes


# =====================================================================================
# Release: the mm goes away
# =====================================================================================


@pytest.mark.parametrize("arch", ARCHES)
def test_release_zaps_every_mapping(arch: str) -> None:
    """``exit_mmap`` -> ``mmu_notifier_release`` -> ``kvm_mmu_notifier_release``
    -> ``kvm_flush_shadow_all`` -> ``kvm_arch_flush_shadow_all``: every stage-2
    mapping of every slot is dropped and no vCPU keeps a translation, before
    the mm's pages are freed."""
    vm, hva = ram_vm(arch)
    other = vm.mm.mmap(4 * P, RW, "memfd", file=vm.mm.memfd_create("second", 4 * P),
                       fill=0x33)
    vm.set_user_memory_region(1, G + M2, 4 * P, other)
    for gpa in (G, G + 5 * P, G + M2, G + M2 + 3 * P):
        assert vm.guest_access(gpa, 4, Access.WRITE, gpa & 0xFFFF).result == "ok"
    assert len(list(vm.stage2.for_each_leaf())) == 4
    assert vm.vcpus[0].tlb
    vm.mm.close()
    assert list(vm.stage2.for_each_leaf()) == []
    assert vm.vcpus[0].tlb == {}
    assert hva and vm.memslots.id_to_memslot(0) is not None  # memslots stay (the VM is alive)


# =====================================================================================
# Dirty logging off: huge mappings come back
# =====================================================================================


def _huge_slot(arch: str, kind: str) -> tuple[Vm, int]:
    """Slot 0 at ``G`` over 4M of ``kind`` (hugetlb or THP) backing, logging."""
    vm = Vm(arch)
    hva = vm.mm.mmap(2 * M2, RW, kind, fill=0x5A, addr=HVA_2M, fixed=True)
    assert vm.mm.host_mapping_size(hva) == M2
    vm.set_user_memory_region(0, G, 2 * M2, hva, KVM_MEM_LOG_DIRTY_PAGES)
    return vm, hva


@pytest.mark.parametrize("kind", ["hugetlb", "thp"])
@pytest.mark.parametrize("arch", ["x86", "arm64"])
def test_dirty_logging_off_maps_huge_again(arch: str, kind: str) -> None:
    """While the slot logs, faults map 4K (x86 ``kvm_mmu_hugepage_adjust`` under
    ``kvm_slot_dirty_track_enabled``; arm64 ``user_mem_abort`` ``force_pte``).
    After KVM_SET_USER_MEMORY_REGION drops LOG_DIRTY_PAGES (FLAGS_ONLY), the next
    fault in that 2M frame maps a 2M leaf again: x86 ``kvm_mmu_slot_apply_flags``
    -> ``kvm_mmu_recover_huge_pages`` removes the 4K leaves (zapped, or since
    v6.13 replaced in place by the huge SPTE); arm64 does nothing at commit and
    ``kvm_pgtable_stage2_map`` replaces the table with a block on the next
    fault (``stage2_map_walk_table_pre``)."""
    vm, hva = _huge_slot(arch, kind)
    assert vm.guest_access(G, 4, Access.WRITE, 0x1).result == "ok"
    leaf = vm.stage2.walk(G)
    assert leaf is not None and leaf.size == P
    assert vm.stats_dict()["pages_2m"] == 0
    vm.set_user_memory_region(0, G, 2 * M2, hva, 0)
    leaf = vm.stage2.walk(G)
    if arch == "x86":
        assert leaf is None or leaf.size == M2
    else:
        assert leaf is not None and leaf.size == P  # untouched until the next fault
    assert vm.guest_access(G + P, 4, Access.WRITE, 0x2).result == "ok"
    leaf = vm.stage2.walk(G + P)
    assert leaf is not None and leaf.size == M2
    pte = vm.mm.host_pte(hva + P)
    assert pte is not None and leaf.pfn == pte.pfn
    stats = vm.stats_dict()
    assert (stats["pages_2m"], stats["pages_4k"]) == (1, 0)
    out = vm.guest_access(G, 4, Access.READ)
    assert (out.result, out.value) == ("ok", 0x1)  # the write made while logging
    validate_vm(vm)


def test_riscv_dirty_logging_off_maps_hugetlb_huge_again() -> None:
    """riscv, hugetlb backing: ``kvm_riscv_mmu_map`` picks the hugetlb size
    (``hugetlb_mapping_size``) once logging is off and calls
    ``kvm_riscv_gstage_map_page`` with the faulting gpa (G+4K) and the 2M-aligned
    frame; ``kvm_riscv_gstage_get_leaf(G+4K)`` finds nothing, so
    ``kvm_riscv_gstage_set_pte`` overwrites the level-1 table pointer with the
    2M leaf.  (Commit does nothing when logging goes off.)"""
    vm, hva = _huge_slot("riscv", "hugetlb")
    assert vm.guest_access(G, 4, Access.WRITE, 0x1).result == "ok"
    vm.set_user_memory_region(0, G, 2 * M2, hva, 0)
    assert vm.guest_access(G + P, 4, Access.WRITE, 0x2).result == "ok"
    leaf = vm.stage2.walk(G + P)
    assert leaf is not None and leaf.size == M2
