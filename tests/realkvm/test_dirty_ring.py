"""The dirty ring in the real-KVM backend: struct kvm_dirty_gfn, the capability and ioctl
numbers, the program's top-level ``dirty_ring`` and its ``harvest_dirty_ring`` /
``reset_dirty_rings`` steps, the VMM's harvest over a ring in ordinary memory, and the
enabling (ACQ_REL where offered, unsupported naming the capability or the errno) with a
fake VM fd.  Only the last test needs /dev/kvm."""

from __future__ import annotations

import ctypes
import json
from typing import Any

import pytest

from kvmmem.realkvm import HostMemory, Kvm, ioctls, structs
from kvmmem.realkvm import program as prog
from kvmmem.realkvm.harness import HarnessLayout, HarnessVm, _Slot
from kvmmem.realkvm.kvm import KvmUnsupported, VcpuFd
from kvmmem.realkvm.runner import run_scenario, scenario_footprint, scenario_program
from kvmmem.scenario import load_scenario_text
from kvmmem.scenario.model import VM_CAPS

from .helpers import G

RING = f"""\
kvmmem: 1
name: ring
arch: [x86, arm64]
dirty_ring: 64K
memory:
  ram: {{size: 256K, kind: anon, prot: rw, fill: 0}}
memslots:
  - {{slot: 3, gpa: {G:#x}, size: 256K, memory: ram, flags: [log_dirty]}}
steps:
  - guest_write: {{gpa: {G + 0x2000:#x}, size: 4, value: 1}}
  - guest_write: {{gpa: {G:#x}, size: 4, value: 1}}
  - harvest_dirty_ring: {{vcpu: 0}}
  - reset_dirty_rings: {{}}
  - get_dirty_log: {{slot: 3}}
"""


def test_ring_layout_and_numbers() -> None:
    """struct kvm_dirty_gfn {u32 flags; u32 slot; u64 offset} is 16 bytes; the ring is
    at page 64 of the vCPU fd; KVM_RESET_DIRTY_RINGS is _IO(KVMIO, 0xc7); the
    capabilities are 192, 223, 225; KVM_EXIT_DIRTY_RING_FULL is 31."""
    s = structs.kvm_dirty_gfn
    assert ctypes.sizeof(s) == structs.KERNEL_SIZES[s] == 16
    assert [(n, getattr(s, n).offset) for n, _ in s._fields_] == [
        ("flags", 0), ("slot", 4), ("offset", 8)]
    assert structs.KVM_DIRTY_LOG_PAGE_OFFSET == 64
    assert ioctls.ioctl_number("KVM_RESET_DIRTY_RINGS") == 0xAEC7
    assert (VM_CAPS["dirty_log_ring"], VM_CAPS["dirty_log_ring_acq_rel"],
            VM_CAPS["dirty_log_ring_with_bitmap"]) == (
        ioctls.KVM_CAP_DIRTY_LOG_RING, ioctls.KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
        ioctls.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP) == (192, 223, 225)
    assert structs.EXIT_REASONS[31] == "KVM_EXIT_DIRTY_RING_FULL"


def test_program_carries_the_ring() -> None:
    """The program has the ring's size and bitmap flag at the top; the ring steps carry
    their vCPU (harvest) or nothing; JSON; no guest address reserved for them."""
    scenario = load_scenario_text(RING, "ring.yaml")
    p = scenario_program(scenario, "arm64")
    json.dumps(p)
    assert p["dirty_ring"] == 64 << 10 and p["dirty_ring_with_bitmap"] is False
    assert p["steps"][2] == {"index": 2, "op": "harvest_dirty_ring", "vcpu": 0}
    assert p["steps"][3] == {"index": 3, "op": "reset_dirty_rings"}
    ranges, slots = scenario_footprint(scenario)
    assert slots == [3] and ranges == [(G, 256 << 10), (G + 0x2000, 4), (G, 4)]


def _ring_fd(entries: int) -> tuple[VcpuFd, Any]:
    """A VcpuFd whose 'mapped ring' is an ordinary ctypes array (no fd behind it)."""
    ring = (structs.kvm_dirty_gfn * entries)()
    fd = object.__new__(VcpuFd)
    fd.ring_addr, fd.ring_size, fd.ring_fetch = ctypes.addressof(ring), ctypes.sizeof(ring), 0
    return fd, ring


def test_harvest_reads_dirty_entries_from_the_fetch_index() -> None:
    """The harvest collects the entries flagged DIRTY in ring order from the fetch index,
    flags each RESET and stops at the first that is not (just DIRTY); the next harvest
    starts after them and wraps around the ring."""
    fd, ring = _ring_fd(4)
    for i, (slot, off) in enumerate([(3, 2), (3, 0), (1 << 16 | 5, 7)]):
        ring[i].flags, ring[i].slot, ring[i].offset = structs.KVM_DIRTY_GFN_F_DIRTY, slot, off
    assert fd.harvest_dirty_ring() == [(3, 2), (3, 0), (1 << 16 | 5, 7)]
    assert [ring[i].flags for i in range(4)] == [3, 3, 3, 0]
    assert fd.harvest_dirty_ring() == []
    ring[3].flags, ring[3].slot, ring[3].offset = 1, 3, 9
    ring[0].flags, ring[0].slot, ring[0].offset = 1, 3, 10  # the kernel reset and reused it
    assert fd.harvest_dirty_ring() == [(3, 9), (3, 10)]
    assert fd.ring_fetch == 5


class _RingVm:
    """A VM fd offering ``caps`` and answering KVM_ENABLE_CAP / RESET with ``err``."""

    def __init__(self, caps: dict[int, int], err: str | None = None) -> None:
        self.caps, self.err = caps, err
        self.calls: list[tuple[int, tuple[int, ...]]] = []

    def check_extension(self, cap: int) -> int:
        return self.caps.get(cap, 0)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> str | None:
        self.calls.append((cap, args))
        return self.err

    def reset_dirty_rings(self) -> tuple[int, str | None]:
        return (0, self.err) if self.err else (2, None)


def _harness(vm: _RingVm) -> HarnessVm:
    h = HarnessVm([], [], 1.0, None)
    h.layout = HarnessLayout(slot=31, gpa=0x80_0000_0000, doorbell=0x80_0020_0000,
                             probe=0x80_0020_1000)
    h.vm = vm  # type: ignore[assignment]
    return h


@pytest.mark.parametrize(("caps", "cap"), [
    ({223: 1 << 20, 192: 1 << 20}, 223), ({192: 1 << 20}, 192)])
def test_enable_prefers_acq_rel(caps: dict[int, int], cap: int) -> None:
    """KVM_CAP_DIRTY_LOG_RING_ACQ_REL where offered, else KVM_CAP_DIRTY_LOG_RING, with
    args[0] the size; WITH_BITMAP after it on request."""
    vm = _RingVm({**caps, 225: 1})
    h = _harness(vm)
    h.enable_dirty_ring(65536, with_bitmap=True)
    assert vm.calls == [(cap, (65536,)), (225, ())]
    assert h.dirty_ring_size == 65536


def test_enable_refusals_are_unsupported_naming_the_cause() -> None:
    """No ring capability: unsupported naming both; a refused size: naming the errno."""
    with pytest.raises(KvmUnsupported, match="KVM_CAP_DIRTY_LOG_RING and"):
        _harness(_RingVm({})).enable_dirty_ring(65536)
    with pytest.raises(KvmUnsupported, match="failed with E2BIG"):
        _harness(_RingVm({223: 1 << 20}, "E2BIG")).enable_dirty_ring(1 << 21)


def test_ring_steps_dispatch() -> None:
    """reset_dirty_rings reports the ioctl's count; harvest without a ring is unsupported
    (the model refuses the file); harvest maps slot/offset to absolute gfns."""
    h = _harness(_RingVm({}))
    with HostMemory() as host:
        assert prog._step(host, h, {"index": 0, "op": "reset_dirty_rings"}) == {
            "result": "ok", "reset": 2}
        out = prog._step(host, h, {"index": 1, "op": "harvest_dirty_ring", "vcpu": 0})
    assert out["result"] == "unsupported"
    fd, ring = _ring_fd(4)
    ring[0].flags, ring[0].slot, ring[0].offset = 1, 3, 2
    ring[1].flags, ring[1].slot, ring[1].offset = 1, 9, 0  # a slot the harness lacks
    h.dirty_ring_size = ctypes.sizeof(ring)
    h.slots[3] = _Slot(G, 256 << 10, 1)
    h._vcpu_fd = lambda index: fd  # type: ignore[method-assign]
    fd.map_dirty_ring = lambda size: None  # type: ignore[method-assign]
    assert h.harvest_dirty_ring(0) == {"result": "ok", "dirty": [(G >> 12) + 2]}


def test_ring_on_this_host(kvm: Kvm) -> None:
    """This host's KVM (a ring of 1 MiB at most): the writes are harvested in ring order,
    the reset counts them, and KVM_GET_DIRTY_LOG is ENXIO."""
    if not (kvm.check_extension(ioctls.KVM_CAP_DIRTY_LOG_RING)
            or kvm.check_extension(ioctls.KVM_CAP_DIRTY_LOG_RING_ACQ_REL)):
        pytest.skip("this KVM has no dirty ring")
    run = run_scenario(load_scenario_text(RING, "ring.yaml"), kvm=kvm)
    assert run.supported, run.reason
    out = [{k: v for k, v in s.items() if k not in ("step", "op")} for s in run.steps]
    assert out[2] == {"result": "ok", "dirty": [(G >> 12) + 2, G >> 12]}
    assert out[3] == {"result": "ok", "reset": 2}
    assert out[4] == {"result": "error", "errno": "ENXIO"}


def test_the_ring_is_enabled_at_setup_when_asked() -> None:
    """make_vm hands the program's ring to the harness, whose _setup enables it right
    after KVM_CREATE_VM (before its own memslot: WITH_BITMAP needs no memslot yet)."""
    vm = _RingVm({223: 1 << 20, 225: 1})
    h = HarnessVm([], [], 1.0, None, dirty_ring=(4096, True))
    h.vm = vm  # type: ignore[assignment]
    h._enable_requested_ring()
    assert vm.calls == [(223, (4096,)), (225, ())] and h.dirty_ring_size == 4096
    plain = HarnessVm([], [], 1.0, None)
    plain.vm = _RingVm({})  # type: ignore[assignment]
    plain._enable_requested_ring()
    assert plain.dirty_ring_size == 0
