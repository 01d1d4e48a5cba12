"""Whole scenarios on real KVM (kvmmem.realkvm.runner), in the SCENARIOS.md vocabulary."""

from __future__ import annotations

from kvmmem.realkvm import Kvm, run_scenario, scenario_footprint
from kvmmem.scenario import load_scenario_text

from .helpers import open_fds

RO_VMA = """
kvmmem: 1
name: ro-vma-after-create
memory:
  ram: {size: 2M, kind: memfd, prot: rw, fill: 0x22}
memslots:
  - {slot: 0, gpa: 0x40000000, size: 2M, memory: ram, flags: [log_dirty]}
steps:
  - guest_read: {gpa: 0x40000010, size: 4}
  - guest_write: {gpa: 0x40001000, size: 8, value: 0x1122334455667788}
  - host_read: {memory: ram, offset: 0x1000, size: 8}
  - get_dirty_log: {slot: 0}
  - host_mprotect: {memory: ram, offset: 0, size: 2M, prot: r}
  - guest_write: {gpa: 0x40000000, size: 4, value: 1}
  - guest_write: {gpa: 0x40000000, size: 4, value: 1, path: emulated}
  - guest_read: {gpa: 0x40001000, size: 8}
  - host_write: {memory: ram, offset: 0, size: 1, value: 1}
  - set_memslot: {slot: 1, gpa: 0x40000000, size: 4K, memory: ram}
  - host_munmap: {memory: ram}
  - guest_read: {gpa: 0x40000000, size: 4}
  - host_mmap: {name: again, size: 2M, kind: anon, prot: rw, at: {memory: ram}}
  - guest_read: {gpa: 0x40000000, size: 4}
  - guest_read: {gpa: 0x80000000, size: 2}
"""


def test_scenario_outcomes_on_real_kvm(kvm: Kvm) -> None:
    """A read-only VMA appearing under a writable, dirty-logged memfd slot
    (kvm-on-this-host.md §3.4/3.5): every step's real outcome."""
    fds = open_fds()
    run = run_scenario(load_scenario_text(RO_VMA), kvm=kvm)
    assert run.supported, run.reason
    assert run.setup == [{"memory": "ram", "result": "ok"}, {"memslot": 0, "result": "ok"}]
    got = [{k: v for k, v in s.items() if k not in ("step", "op")} for s in run.steps]
    assert got == [
        {"result": "ok", "value": 0x22222222},
        {"result": "ok"},
        {"result": "ok", "value": 0x1122334455667788},
        # The read of page 0 maps it writable too (a present, writable memfd page) and
        # make_spte marks every writable SPTE of a logged slot dirty, as on a TDP host.
        {"result": "ok", "dirty": [0x40000000 >> 12, (0x40000000 >> 12) + 1]},
        {"result": "ok"},
        {"result": "fault"},
        {"result": "mmio", "gpa": 0x40000000, "len": 4, "is_write": True, "data": 1},
        {"result": "ok", "value": 0x1122334455667788},
        {"result": "signal", "signal": "SIGSEGV"},
        {"result": "error", "errno": "EEXIST"},
        {"result": "ok"},
        {"result": "fault"},
        {"result": "ok"},
        {"result": "ok", "value": 0},
        {"result": "mmio", "gpa": 0x80000000, "len": 2, "is_write": False, "value": 0},
    ]
    assert [s["op"] for s in run.steps][:3] == ["guest_read", "guest_write", "host_read"]
    assert open_fds() == fds


def test_footprint_lists_every_range_and_slot() -> None:
    """The harness is told every gpa range and slot id before the VM is built."""
    ranges, slots = scenario_footprint(load_scenario_text(RO_VMA))
    assert (0x40000000, 2 << 20) in ranges and (0x80000000, 2) in ranges
    assert slots == [0, 1]


def test_unsupported_scenarios_say_why() -> None:
    """Another architecture, threads, or a mapping kind without a source on this host:
    the run is unsupported with the reason (no /dev/kvm needed for the first two)."""
    arm = load_scenario_text(RO_VMA.replace("name: ro-vma-after-create",
                                            "name: a\narch: arm64"))
    run = run_scenario(arm)
    assert not run.supported and "arm64" in run.reason
    threads = load_scenario_text(RO_VMA.split("steps:")[0] + """threads:
  a:
    - guest_read: {gpa: 0x40000010, size: 4}
  b:
    - host_munmap: {memory: ram}
""")
    run = run_scenario(threads)
    assert not run.supported and "threads" in run.reason


def test_device_lazy_is_unsupported(kvm: Kvm) -> None:
    """device-lazy has no VM_PFNMAP source that fills lazily on this host."""
    text = RO_VMA.replace("kind: memfd", "kind: device-lazy").replace(", fill: 0x22", "")
    run = run_scenario(load_scenario_text(text), kvm=kvm)
    assert not run.supported and "lazily" in run.reason
