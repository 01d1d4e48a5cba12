"""Where the fault and prefault paths do their work relative to their locks, and
which tracepoints each architecture fires (issue 12's bugs).

* x86 ``make_spte`` marks a writable SPTE's page dirty under ``mmu_lock``
  (``mark_page_dirty_in_slot`` inside ``tdp_mmu_map_handle_target_level``), not
  after the lock is dropped; riscv's ``kvm_riscv_mmu_map`` likewise calls
  ``mark_page_dirty_in_slot`` under ``mmu_lock``, before
  ``kvm_riscv_gstage_map_page``.
* ``kvm_vcpu_pre_fault_memory`` holds ``kvm->srcu`` around its loop, so a
  memslot delete's ``synchronize_srcu`` waits for it before the zap
  (scenarios/race-prefault-vs-delete.yaml); x86's ``is_page_fault_stale``
  refuses to map through a root made obsolete meanwhile.
* arm64 fires its own ``kvm_guest_fault`` / ``kvm_mmio_emulate``
  (arch/arm64/kvm/trace_arm.h), riscv no fault tracepoint, and only x86 the
  ``kvmmmu`` ones (arch/x86/kvm/mmu/mmutrace.h).
"""

from __future__ import annotations

from pathlib import Path

from kvmmem.errors import KernelError
from kvmmem.explore import SearchParams, explore
from kvmmem.host import PROT_READ, PROT_WRITE
from kvmmem.kvm.memslot import KVM_MEM_LOG_DIRTY_PAGES
from kvmmem.kvm.prefault import kvm_vcpu_pre_fault_memory_op
from kvmmem.kvm.stats import EventLog
from kvmmem.kvm.vcpu import Access, Fault
from kvmmem.kvm.vm import Vm
from kvmmem.scenario.loader import load_scenario
from kvmmem.sync import Op, Sync, acquire, release

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"
G = 0x4000_0000
SIZE = 0x4000
RW = PROT_READ | PROT_WRITE


def _vm(arch: str, flags: int = 0) -> Vm:
    vm = Vm(arch)
    hva = vm.mm.mmap(SIZE, RW, "anon", fill=0x11)
    vm.set_user_memory_region(0, G, SIZE, hva, flags)
    return vm


def test_x86_marks_the_page_dirty_before_dropping_mmu_lock() -> None:
    """The bit is set when the fault's ``release mmu_lock`` pause is reached: a
    GET_DIRTY_LOG that takes mmu_lock after the fault never misses it."""
    vm = _vm("x86", KVM_MEM_LOG_DIRTY_PAGES)
    slot = vm.gfn_to_memslot(G >> 12)
    assert slot is not None and slot.dirty_bitmap is not None
    op = vm.arch.handle_fault(vm, vm.vcpus[0], G + 0x1000, Access.WRITE)
    seen_at_unlock = None
    try:
        pause = next(op)
        while True:
            if pause == release("mmu_lock", shared=True):
                seen_at_unlock = bool(slot.dirty_bitmap[1])
            pause = op.send(None)
    except StopIteration as stop:
        assert stop.value.kind is Fault.RESUME
    assert seen_at_unlock is True


def test_riscv_marks_the_page_dirty_before_dropping_mmu_lock() -> None:
    """As on x86: ``kvm_riscv_mmu_map`` sets the bit under ``mmu_lock``, so it is
    set when the fault reaches its ``release mmu_lock`` pause."""
    vm = _vm("riscv", KVM_MEM_LOG_DIRTY_PAGES)
    slot = vm.gfn_to_memslot(G >> 12)
    assert slot is not None and slot.dirty_bitmap is not None
    op = vm.arch.handle_fault(vm, vm.vcpus[0], G + 0x1000, Access.WRITE)
    seen_at_unlock = None
    try:
        pause = next(op)
        while True:
            if pause == release("mmu_lock"):
                seen_at_unlock = bool(slot.dirty_bitmap[1])
            pause = op.send(None)
    except StopIteration as stop:
        assert stop.value.kind is Fault.RESUME
    assert seen_at_unlock is True


def _pauses(op: Op[int]) -> tuple[list[Sync], str]:
    """Every pause of ``op`` run alone, and how it ended (``ok`` or the errno)."""
    out: list[Sync] = []
    try:
        out.append(next(op))
        while True:
            out.append(op.send(None))
    except StopIteration:
        return out, "ok"
    except KernelError as err:
        return out, err.errno


def test_prefault_holds_srcu_around_its_loop() -> None:
    """``srcu_read_lock`` is the first pause and ``srcu_read_unlock`` the last,
    on success and on failure (ENOENT outside every slot) alike."""
    for gpa, pages, end in ((G, 2, "ok"), (0x1000_0000, 0, "ENOENT")):
        vm = _vm("x86")
        pauses, how = _pauses(kvm_vcpu_pre_fault_memory_op(vm, vm.vcpus[0], gpa, 0x2000))
        assert how == end
        assert pauses[0] == acquire("srcu", shared=True)
        assert pauses[-1] == release("srcu", shared=True)
        assert sum(1 for p in pauses if p.name == "srcu") == 2
        assert vm.stats.prefault_pages == pages


def test_prefault_vs_delete_race_holds_upstream() -> None:
    """Every interleaving of a prefault with the delete of its slot: the prefault
    maps before the delete (which zaps it), or fails (EAGAIN on the INVALID slot,
    ENOENT after); no stage-2 entry outlives the slot."""
    scenario = load_scenario(SCENARIOS / "race-prefault-vs-delete.yaml")
    result = explore(scenario, "x86", "upstream", SearchParams(strategy="dpor"))
    assert result.verdict == "exhausted", result.violation
    outs = {o.split(",")[0] + ("" if "errno" not in o else o.split(",")[1])
            for o in result.outcomes["vcpu"][0]}
    assert outs == {"result=ok", "result=error errno=EAGAIN", "result=error errno=ENOENT"}


def test_x86_fault_through_an_obsolete_root_is_stale() -> None:
    """``is_page_fault_stale`` under mmu_lock: a root made obsolete while the
    fault resolved its pfn gets RET_PF_RETRY and nothing is mapped."""
    vm = _vm("x86")
    vcpu = vm.vcpus[0]
    vm.loaded_roots.add(0)
    op = vm.arch.handle_fault(vm, vcpu, G, Access.READ)
    pause = next(op)
    while pause != acquire("mmu_lock", shared=True):
        pause = op.send(None)
    vm.obsolete_roots.add(0)  # kvm_mmu_zap_all_fast by another thread
    try:
        while True:
            op.send(None)
    except StopIteration as stop:
        assert stop.value.kind is Fault.RETRY
    assert vm.stage2.walk(G) is None


def _fault_events(arch: str) -> list[str]:
    vm = _vm(arch)
    vm.log = EventLog()
    vm.guest_access(G, 4, Access.READ)  # a RAM fault
    vm.guest_access(0x1000_0000, 4, Access.READ)  # outside every slot: MMIO
    return [ev.name for ev in vm.log.events]


def test_each_architecture_logs_its_own_tracepoints() -> None:
    assert _fault_events("x86") == ["kvm_mmu_spte_requested", "kvm_mmu_set_spte", "kvm_mmio"]
    assert _fault_events("arm64") == ["kvm_guest_fault", "kvm_guest_fault",
                                      "kvm_mmio_emulate", "kvm_mmio"]
    assert _fault_events("riscv") == ["kvm_mmio"]
