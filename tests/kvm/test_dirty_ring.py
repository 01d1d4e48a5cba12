"""The dirty ring: enabling it (sizes, once, before vCPUs), push from the fault path,
the VMM's harvest, KVM_RESET_DIRTY_RINGS re-protecting, the soft-full exit, GET/CLEAR
ENXIO, WITH_BITMAP, releases.

References: kernel-semantics.md §7.2; virt/kvm/dirty_ring.c (``kvm_dirty_ring_alloc``,
``_push``, ``_check_request``, ``_reset``), virt/kvm/kvm_main.c
(``kvm_vm_ioctl_enable_dirty_log_ring``, ``kvm_vm_ioctl_reset_dirty_pages``,
``mark_page_dirty_in_slot``).  Every guest access is followed by ``validate_vm``
(dirty-log completeness in ring mode: a writable leaf of a logging slot is in a ring
since its last reset).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from kvmmem.errors import InputError, KernelError
from kvmmem.host import PROT_READ, PROT_WRITE
from kvmmem.kvm import dirty_ring as dr
from kvmmem.kvm.dirty_log import kvm_clear_dirty_log, kvm_get_dirty_log, kvm_vm_ioctl_enable_cap
from kvmmem.kvm.invariants import validate_vm
from kvmmem.kvm.memslot import KVM_MEM_LOG_DIRTY_PAGES
from kvmmem.kvm.vcpu import Access
from kvmmem.kvm.vm import Vm
from kvmmem.scenario import load_scenario_text
from kvmmem.scenario.loader import load_scenario
from kvmmem.scenario.runner import Runner

RING_ARCHES = ("x86", "arm64", "riscv")
P = 4096
G = 0x4000_0000
GFN = G >> 12
RW = PROT_READ | PROT_WRITE
LOG = KVM_MEM_LOG_DIRTY_PAGES
ACQ_REL = dr.KVM_CAP_DIRTY_LOG_RING_ACQ_REL


def access(vm: Vm, gpa: int, kind: Access, value: int = 0, vcpu: int = 0) -> dict[str, Any]:
    out = vm.vcpus[vcpu].access(gpa, 4, kind, value).to_outcome()
    validate_vm(vm)
    return out


def ring_vm(arch: str, size: int = 64 << 10, npages: int = 128, vcpus: int = 1,
            **kw: Any) -> Vm:
    vm = Vm(arch, dirty_ring=size, vcpus=vcpus, **kw)
    hva = vm.mm.mmap(npages * P, RW, "anon", fill=0)
    vm.set_user_memory_region(0, G, npages * P, hva, LOG)
    return vm


def errno_of(fn: Any, *args: Any) -> str | None:
    try:
        fn(*args)
    except KernelError as err:
        return err.errno
    return None


@pytest.mark.parametrize("arch", RING_ARCHES)
@pytest.mark.parametrize(("size", "errno"), [
    (12288, "EINVAL"), (2048, "EINVAL"), (512, "EINVAL"), (3 << 20, "EINVAL"),
    (2 << 20, "E2BIG"), (4096, None), (1 << 20, None)])
def test_enable_sizes(arch: str, size: int, errno: str | None) -> None:
    """Power of two, at least a page and 64 reserved entries, at most 65536 entries."""
    vm = Vm.__new__(Vm)
    try:
        Vm.__init__(vm, arch, dirty_ring=size)
    except KernelError as err:
        assert err.errno == errno and err.call == "KVM_ENABLE_CAP"
        return
    assert errno is None and vm.dirty_ring_size == size
    ring = vm.vcpus[0].dirty_ring
    assert ring is not None and ring.size == size // 16 and ring.soft_limit == size // 16 - 64


@pytest.mark.parametrize("arch", RING_ARCHES)
def test_enable_only_once_and_before_vcpus(arch: str) -> None:
    """A second enable is EINVAL, so is one after a vCPU exists; the size checks come
    first (E2BIG even then)."""
    vm = ring_vm(arch)
    assert errno_of(kvm_vm_ioctl_enable_cap, vm, ACQ_REL, 0, (64 << 10,)) == "EINVAL"
    plain = Vm(arch)
    assert errno_of(kvm_vm_ioctl_enable_cap, plain, ACQ_REL, 0, (64 << 10,)) == "EINVAL"
    assert errno_of(kvm_vm_ioctl_enable_cap, plain, ACQ_REL, 0, (2 << 20,)) == "E2BIG"
    assert plain.dirty_ring_size == 0


def test_capabilities_by_arch_and_release() -> None:
    """x86: RING since v5.11, ACQ_REL since v6.1; arm64: ACQ_REL and WITH_BITMAP since
    v6.1; riscv: ACQ_REL since v6.17 (none before: EINVAL whatever the size)."""
    assert set(dr.dirty_ring_caps(Vm("x86"))) == {192, 223}
    assert set(dr.dirty_ring_caps(Vm("x86", variant="6.0"))) == {192}
    assert set(dr.dirty_ring_caps(Vm("x86", variant="5.10"))) == set()
    assert set(dr.dirty_ring_caps(Vm("arm64"))) == {223, 225}
    assert set(dr.dirty_ring_caps(Vm("arm64", variant="6.0"))) == set()
    assert set(dr.dirty_ring_caps(Vm("riscv"))) == {223}
    assert dr.dirty_ring_caps(Vm("riscv", variant="6.12")) == {}
    with pytest.raises(KernelError, match="not offered"):
        Vm("riscv", variant="6.12", dirty_ring=64 << 10)
    vm = Vm("x86", variant="6.0", dirty_ring=64 << 10)  # falls back to KVM_CAP_DIRTY_LOG_RING
    assert vm.dirty_ring_size == 64 << 10


@pytest.mark.parametrize("arch", RING_ARCHES)
def test_write_harvest_reset_write_again(arch: str) -> None:
    """A write pushes (slot, offset); the harvest gives the gfns in ring order once; the
    reset counts them and write-protects them again: a read takes no fault, the next
    write faults and is pushed again."""
    vm = ring_vm(arch)
    ring = vm.vcpus[0].dirty_ring
    assert access(vm, G + 5 * P, Access.WRITE, 1)["result"] == "ok"
    assert access(vm, G + 2 * P, Access.WRITE, 2)["result"] == "ok"
    assert ring is not None and ring.dirty_gfns[0].slot == 0 and ring.dirty_gfns[0].offset == 5
    assert dr.kvm_dirty_ring_harvest(vm, ring) == [GFN + 5, GFN + 2]
    assert dr.kvm_dirty_ring_harvest(vm, ring) == []
    assert dr.kvm_vm_ioctl_reset_dirty_pages(vm) == 2
    validate_vm(vm)
    faults = vm.stats.pf_taken
    assert access(vm, G + 5 * P, Access.READ) == {"result": "ok", "value": 1}
    assert vm.stats.pf_taken == faults
    assert dr.kvm_dirty_ring_harvest(vm, ring) == []
    assert access(vm, G + 5 * P, Access.WRITE, 3)["result"] == "ok"
    assert vm.stats.pf_taken == faults + 1
    assert dr.kvm_dirty_ring_harvest(vm, ring) == [GFN + 5]
    assert dr.kvm_vm_ioctl_reset_dirty_pages(vm) == 1
    assert dr.kvm_vm_ioctl_reset_dirty_pages(vm) == 0


def test_reset_takes_only_harvested_entries_and_each_vcpu_ring() -> None:
    """Entries not yet harvested stay (the reset stops at the first without RESET); each
    vCPU pushes into its own ring; the reset walks every vCPU's."""
    vm = ring_vm("x86", vcpus=2)
    access(vm, G, Access.WRITE, 1, vcpu=0)
    access(vm, G + P, Access.WRITE, 1, vcpu=1)
    r0, r1 = vm.vcpus[0].dirty_ring, vm.vcpus[1].dirty_ring
    assert r0 is not None and r1 is not None
    assert dr.kvm_dirty_ring_harvest(vm, r1) == [GFN + 1]
    assert dr.kvm_vm_ioctl_reset_dirty_pages(vm) == 1
    assert dr.kvm_dirty_ring_harvest(vm, r0) == [GFN]
    assert dr.kvm_vm_ioctl_reset_dirty_pages(vm) == 1


def test_reset_coalesces_masks_backwards_and_across_slots() -> None:
    """kvm_dirty_ring_reset's coalescing (forward, backward within 64, new slot) ends in
    the same re-protection as one page at a time."""
    vm = ring_vm("x86", npages=256)
    order = [10, 11, 3, 70, 200, 199]
    for i in order:
        access(vm, G + i * P, Access.WRITE, 1)
    ring = vm.vcpus[0].dirty_ring
    assert dr.kvm_dirty_ring_harvest(vm, ring) == [GFN + i for i in order]
    assert dr.kvm_vm_ioctl_reset_dirty_pages(vm) == len(order)
    for i in order:
        leaf = vm.stage2.walk(G + i * P)
        assert leaf is not None and not leaf.writable


@pytest.mark.parametrize("arch", RING_ARCHES)
def test_soft_full_exits_before_the_access_is_retried(arch: str) -> None:
    """A 4 KiB ring: 256 entries, soft limit 192.  The 192nd push makes the fault's next
    entry exit with KVM_EXIT_DIRTY_RING_FULL (the store is not done); every access exits
    so until harvest and reset; then the store is made."""
    vm = ring_vm(arch, size=4096, npages=256)
    for i in range(191):
        assert access(vm, G + i * P, Access.WRITE, i + 1)["result"] == "ok"
    full = {"result": "exit", "exit_reason": "KVM_EXIT_DIRTY_RING_FULL", "suberror": 0}
    assert access(vm, G + 191 * P, Access.WRITE, 192) == full
    assert access(vm, G + 192 * P, Access.WRITE, 193) == full
    assert access(vm, G, Access.READ) == full
    hva = vm.memslots.id_to_memslot(0, 0).userspace_addr  # type: ignore[union-attr]
    assert vm.mm.host_read(hva + 191 * P, 8) == 0
    ring = vm.vcpus[0].dirty_ring
    assert len(dr.kvm_dirty_ring_harvest(vm, ring)) == 192
    assert access(vm, G + 192 * P, Access.WRITE, 193) == full  # harvested, not yet reset
    assert dr.kvm_vm_ioctl_reset_dirty_pages(vm) == 192
    assert access(vm, G + 191 * P, Access.WRITE, 192)["result"] == "ok"
    assert dr.kvm_dirty_ring_harvest(vm, ring) == [GFN + 191]


@pytest.mark.parametrize("arch", RING_ARCHES)
def test_get_and_clear_dirty_log_are_enxio(arch: str) -> None:
    """No bitmaps in a ring VM: GET and CLEAR are ENXIO before any slot check."""
    vm = ring_vm(arch)
    access(vm, G, Access.WRITE, 1)
    assert errno_of(kvm_get_dirty_log, vm, 0) == "ENXIO"
    assert errno_of(kvm_get_dirty_log, vm, 7) == "ENXIO"
    assert errno_of(kvm_clear_dirty_log, vm, 0, 0, 64) == "ENXIO"
    assert vm.memslots.id_to_memslot(0, 0).dirty_bitmap is None  # type: ignore[union-attr]


def test_with_bitmap_arm64() -> None:
    """arm64 WITH_BITMAP: slots keep a bitmap, GET works (vCPU writes go to the ring, so
    it is empty); it needs the ring first and no memslot yet; x86 refuses it."""
    vm = ring_vm("arm64", dirty_ring_with_bitmap=True)
    access(vm, G, Access.WRITE, 1)
    assert kvm_get_dirty_log(vm, 0) == []
    assert dr.kvm_dirty_ring_harvest(vm, vm.vcpus[0].dirty_ring) == [GFN]
    cap = dr.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP
    assert errno_of(kvm_vm_ioctl_enable_cap, vm, cap, 0, ()) == "EINVAL"  # memslots exist
    assert errno_of(kvm_vm_ioctl_enable_cap, Vm("arm64"), cap, 0, ()) == "EINVAL"  # no ring
    with pytest.raises(KernelError):
        Vm("x86", dirty_ring=64 << 10, dirty_ring_with_bitmap=True)


def test_reset_without_ring_is_einval() -> None:
    assert errno_of(dr.kvm_vm_ioctl_reset_dirty_pages, Vm("x86")) == "EINVAL"


def test_invariant_catches_a_lost_push() -> None:
    """Ring-mode dirty-log completeness: a writable leaf whose push was dropped (the ring
    forgets it) is a violation."""
    from kvmmem.errors import ValidationError
    vm = ring_vm("x86")
    access(vm, G, Access.WRITE, 1)
    ring = vm.vcpus[0].dirty_ring
    assert ring is not None
    ring.pushed.clear()
    with pytest.raises(ValidationError, match="dirty-log-completeness"):
        validate_vm(vm)


SCENARIO = """\
kvmmem: 1
name: t
arch: [x86, arm64]
dirty_ring: {size}
memory:
  ram: {{size: 64K, kind: anon, prot: rw, fill: 0}}
memslots:
  - {{slot: 0, gpa: 0x40000000, size: 64K, memory: ram, flags: [log_dirty]}}
steps:
  - guest_write: {{gpa: 0x40000000, size: 4, value: 1}}
  - harvest_dirty_ring: {{vcpu: 0}}
  - reset_dirty_rings: {{}}
"""


def test_scenario_steps_and_refused_setup() -> None:
    """The contract: harvest reports ``dirty``, reset ``reset``; a refused size is an
    InputError naming the errno (the column is not applicable)."""
    run = Runner(load_scenario_text(SCENARIO.format(size="64K"), "t.yaml"), "arm64").run()
    assert [s.get("dirty", s.get("reset")) for s in run.steps] == [None, [GFN], 1]
    with pytest.raises(InputError, match=r"t\.yaml:4: dirty_ring: .* failed with E2BIG"):
        Runner(load_scenario_text(SCENARIO.format(size="2M"), "t.yaml"), "x86")
    with pytest.raises(InputError, match="failed with EINVAL"):
        Runner(load_scenario_text(SCENARIO.format(size="64K"), "t.yaml"), "riscv", "6.12")


def test_arm64_ring_without_bitmap_loses_a_write_in_a_block() -> None:
    """docs/findings.md#finding-13: arm64 memslot_is_logging reads the dirty bitmap, so a
    ring-only VM (no KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP) maps a read fault on a logged
    2M hugetlb page as a writable block; a write to another page of it takes no fault
    and reaches no ring.  Real arm64 7.3 does exactly this (harvest reports only the
    read's gfn, the write took 0 faults); the model does the same and its
    dirty-log-completeness invariant names the lost page."""
    path = Path(__file__).resolve().parents[2] / "scenarios" / "dirty-ring-arm64-block.yaml"
    scenario = dataclasses.replace(load_scenario(path), dirty_ring_with_bitmap=False)
    unchecked = Runner(scenario, "arm64", check=False).run()
    assert [{k: v for k, v in s.items() if k not in ("step", "op")}
            for s in unchecked.steps] == [
        {"result": "ok", "value": 0x1010101},
        {"result": "ok", "faults": 0},
        {"result": "ok", "dirty": [0x40000]},
    ]
    checked = Runner(scenario, "arm64").run()
    assert checked.violations[0]["invariant"] == "dirty-log-completeness"
    assert checked.violations[0]["step"] == 0
