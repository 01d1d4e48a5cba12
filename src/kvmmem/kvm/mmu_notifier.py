"""KVM's MMU-notifier subscriber: invalidation start/end, aging, release.

Mirrors ``kvm_mmu_notifier_invalidate_range_start/end``,
``kvm_mmu_invalidate_begin/end``, ``kvm_mmu_invalidate_range_add``,
``kvm_handle_hva_range`` and the aging callbacks of virt/kvm/kvm_main.c
(kernel-semantics.md §4).  Start and end are :data:`~kvmmem.sync.Op` s that
pause when they take and drop ``mmu_lock``, so the explorer can run a fault
between the zap and the host PTE change, or between the PTE change and the
sequence bump.

The memslot set is frozen while any start has not seen its end
(``mn_active_invalidate_count``): modelled as the shared side of the
``memslots_frozen`` lock, which ``kvm_swap_active_memslots`` takes
exclusively.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvmmem.host.notifier import MmuNotifierRange
from kvmmem.sync import Op, acquire, release
from kvmmem.types import Hva

if TYPE_CHECKING:
    from kvmmem.kvm.kvm_host import Kvm
    from kvmmem.kvm.memory_slot import MemorySlot

INVALID_GPA = -1


class KvmMmuNotifier:
    """The ``struct mmu_notifier`` KVM registers on the VM's mm."""

    def __init__(self, vm: Kvm) -> None:
        self.vm = vm

    # --- invalidation ------------------------------------------------------

    def invalidate_range_start(self, rng: MmuNotifierRange) -> Op[None]:
        """``kvm_mmu_notifier_invalidate_range_start``: zap every stage-2 leaf
        whose hva lies in ``rng`` and raise the in-progress count."""
        vm = self.vm
        yield acquire("memslots_frozen", shared=True)
        vm.mn_active_invalidate_count += 1
        if vm.log is not None:
            vm.log.emit("kvm_unmap_hva_range", start=rng.start, end=rng.end,
                        event=rng.event.name)
        ranges = vm.gfn_ranges_for_hva(rng.start, rng.end)
        if not ranges and not vm.variant.notifier_counts_every_range:
            return
        yield acquire("mmu_lock")
        vm.stats.notifier_invalidations += 1
        kvm_mmu_invalidate_begin(vm)
        flush = False
        for slot, gfn_start, gfn_end in ranges:
            if vm.variant.notifier_counts_every_range:
                # v5.4: no range recorded, every invalidation counts
                flush |= vm.arch.unmap_gfn_range(vm, slot, gfn_start, gfn_end)
            else:
                flush |= kvm_mmu_unmap_gfn_range(vm, slot, gfn_start, gfn_end)
        if flush:
            vm.flush_remote_tlbs()
        yield release("mmu_lock")

    def invalidate_range_end(self, rng: MmuNotifierRange) -> Op[None]:
        """``kvm_mmu_notifier_invalidate_range_end``: bump the sequence, then
        drop the in-progress count (``kvm_mmu_invalidate_end``)."""
        vm = self.vm
        if vm.gfn_ranges_for_hva(rng.start, rng.end) or vm.variant.notifier_counts_every_range:
            yield acquire("mmu_lock")
            kvm_mmu_invalidate_end(vm)
            yield release("mmu_lock")
        vm.mn_active_invalidate_count -= 1
        yield release("memslots_frozen", shared=True)

    # --- aging -------------------------------------------------------------

    def _age(self, start: Hva, end: Hva, clear: bool, flush: bool, name: str) -> bool:
        vm = self.vm
        young = False
        for slot, gfn_start, gfn_end in vm.gfn_ranges_for_hva(start, end):
            del slot
            young |= vm.stage2_test_young(gfn_start, gfn_end, clear)
        if vm.log is not None:
            vm.log.emit(name, start=start, end=end, young=young)
        if young and flush:
            vm.flush_remote_tlbs()
        return young

    def clear_flush_young(self, start: Hva, end: Hva) -> bool:
        """``kvm_mmu_notifier_clear_flush_young``: clear Accessed, flush if any was
        set -- except on x86, which selects ``CONFIG_KVM_ELIDE_TLB_FLUSH_IF_YOUNG``
        (v6.13; ``kvm_handle_hva_range(..., kvm_age_gfn, flush_on_ret=false)``)."""
        vm = self.vm
        flush = not vm.arch.elide_tlb_flush_if_young(vm)
        return self._age(start, end, True, flush, "kvm_age_hva")

    def clear_young(self, start: Hva, end: Hva) -> bool:
        """``kvm_mmu_notifier_clear_young``: clear Accessed, never flush."""
        return self._age(start, end, True, False, "kvm_age_hva")

    def test_young(self, start: Hva, end: Hva) -> bool:
        """``kvm_mmu_notifier_test_young``: report Accessed, change nothing."""
        return self._age(start, end, False, False, "kvm_test_age_hva")

    def release(self) -> None:
        """``kvm_mmu_notifier_release`` -> ``kvm_flush_shadow_all``: drop every mapping."""
        self.vm.zap_all()


def kvm_mmu_invalidate_begin(vm: Kvm) -> None:
    """``kvm_mmu_invalidate_begin`` (caller holds ``mmu_lock``): raise the in-progress
    count; the first one starts with no range recorded."""
    vm.mmu_invalidate_in_progress += 1
    if vm.mmu_invalidate_in_progress == 1:
        vm.mmu_invalidate_range_start = INVALID_GPA
        vm.mmu_invalidate_range_end = INVALID_GPA


def kvm_mmu_invalidate_end(vm: Kvm) -> None:
    """``kvm_mmu_invalidate_end`` (caller holds ``mmu_lock``): bump the sequence, then
    drop the in-progress count."""
    vm.mmu_invalidate_seq += 1
    vm.mmu_invalidate_in_progress -= 1


def kvm_mmu_unmap_gfn_range(vm: Kvm, slot: MemorySlot, start: int, end: int) -> bool:
    """``kvm_mmu_unmap_gfn_range`` (caller holds ``mmu_lock``, inside an invalidation):
    record ``[start, end)`` as being invalidated, then unmap it; True if a TLB flush
    is due."""
    kvm_mmu_invalidate_range_add(vm, start, end)
    return vm.arch.unmap_gfn_range(vm, slot, start, end)


def kvm_mmu_invalidate_range_add(vm: Kvm, start: int, end: int) -> None:
    """``kvm_mmu_invalidate_range_add``: widen the recorded in-progress gfn range."""
    if vm.mmu_invalidate_range_start == INVALID_GPA:
        vm.mmu_invalidate_range_start = start
        vm.mmu_invalidate_range_end = end
    else:
        vm.mmu_invalidate_range_start = min(vm.mmu_invalidate_range_start, start)
        vm.mmu_invalidate_range_end = max(vm.mmu_invalidate_range_end, end)


def mmu_invalidate_retry(vm: Kvm, seq: int) -> bool:
    """``mmu_invalidate_retry``: any invalidation in progress, or one completed since ``seq``."""
    return vm.mmu_invalidate_in_progress != 0 or vm.mmu_invalidate_seq != seq


def mmu_invalidate_retry_gfn(vm: Kvm, seq: int, gfn: int) -> bool:
    """``mmu_invalidate_retry_gfn``: an in-progress invalidation covering ``gfn``,
    or one completed since ``seq``.

    With the v5.4 protocol no range is recorded, so any in-progress
    invalidation counts."""
    if vm.mmu_invalidate_in_progress:
        if vm.mmu_invalidate_range_start == INVALID_GPA:
            return True
        if vm.mmu_invalidate_range_start <= gfn < vm.mmu_invalidate_range_end:
            return True
    return vm.mmu_invalidate_seq != seq


@dataclass(frozen=True, slots=True)
class FaultWait:
    """What a vCPU whose fault was answered RETRY waits on, published by the vCPU
    (:attr:`kvmmem.kvm.vcpu.Vcpu.fault_wait`) until its next attempt proceeds.

    The fault at ``gfn`` will be answered RETRY again, and the vCPU only spin,
    while an invalidation is in progress - one covering ``gfn`` with ``ranged``
    (x86 ``mmu_invalidate_retry_gfn``), any without (arm64/riscv
    ``mmu_invalidate_retry``) - or, with ``invalid_slot``, while its memslot is
    INVALID (x86 ``kvm_mmu_faultin_pfn``; arm64 and riscv treat it as no slot).
    A retry for a sequence change already over, or an obsolete root
    (``vcpu_enter_guest`` frees it before the next attempt), does not persist."""

    gfn: int
    ranged: bool
    invalid_slot: bool

    def holds(self, vm: Kvm) -> bool:
        """Whether the next attempt would be answered RETRY again now."""
        slot = vm.gfn_to_memslot(self.gfn)
        if slot is None:
            return False
        if slot.invalid:
            return self.invalid_slot
        if not (vm.variant.invalidate_retry and vm.mmu_invalidate_in_progress):
            return False
        return not self.ranged or mmu_invalidate_retry_gfn(vm, vm.mmu_invalidate_seq, self.gfn)
