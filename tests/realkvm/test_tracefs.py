"""Counting stage-2 faults from tracefs without a kernel: the events of a fake trace
file inside an access's pages, per architecture's tracepoint and field; x86 counts only
under two-dimensional paging."""

from __future__ import annotations

from pathlib import Path

from kvmmem.realkvm import tracefs
from kvmmem.realkvm.tracefs import FAULT_EVENTS, EventCounter, tdp_enabled

HEAD = "      python3-123 [000] d..1. 10.000001: "
ARM64_TRACE = "".join([
    "# tracer: nop\n#\n",
    HEAD + "kvm_guest_fault: ipa 0x40001000, esr 0x93c08006, far 0x40001000, pc 0x0\n",
    HEAD + "kvm_guest_fault: ipa 0x7fffe01000, esr 0x93c08006, far 0x0, pc 0x0\n",
    HEAD + "kvm_mmio: mmio write len 8 gpa 0x40001000 val 0x0\n",
])
"""``kvm_guest_fault`` lines (``ipa %#016llx, ...``) and another event's."""
X86_TRACE = "".join([
    "# tracer: nop\n",
    HEAD + "kvm_page_fault: vcpu 0 rip 0x1004 address 0x0000000080001000 error_code 0x4\n",
    HEAD + "kvm_page_fault: vcpu 0 rip 0x1004 address 0x0000000080203000 error_code 0x6\n",
    HEAD + "kvm_page_fault: vcpu 0 rip 0x1008 address 0x00000000fee01000 error_code 0x6\n",
])
"""``kvm_page_fault`` lines (``vcpu %u rip 0x%lx address 0x%016llx error_code 0x%llx``)."""


def _counter(tmp_path: Path, arch: str, trace: str) -> EventCounter:
    event, field = FAULT_EVENTS[arch]
    (tmp_path / "events" / event).mkdir(parents=True)
    (tmp_path / "events" / event / "enable").write_text("0")
    counter = EventCounter(str(tmp_path), event, field)
    assert (tmp_path / "events" / event / "enable").read_text() == "1"
    (tmp_path / "trace").write_text(trace)
    return counter


def test_arm64_counts_kvm_guest_fault_by_ipa(tmp_path: Path) -> None:
    counter = _counter(tmp_path, "arm64", ARM64_TRACE)
    assert counter.count(0x4000_1000, 0x4000_2000) == 1
    assert counter.count(0x4000_0000, 0x4000_1000) == 0
    counter.close()
    assert (tmp_path / "events/kvm/kvm_guest_fault/enable").read_text() == "0"


def test_x86_counts_kvm_page_fault_by_address(tmp_path: Path) -> None:
    counter = _counter(tmp_path, "x86", X86_TRACE)
    assert counter.count(0x8000_1000, 0x8000_2000) == 1
    assert counter.count(0x8000_0000, 0x8040_0000) == 2
    counter.reset()
    assert counter.count(0, 1 << 40) == 0


def test_tdp_enabled(tmp_path: Path) -> None:
    npt, ept = tmp_path / "npt", tmp_path / "ept"
    assert not tdp_enabled((str(npt), str(ept)))  # no kvm_amd, no kvm_intel (this PVM host)
    ept.write_text("N\n")
    assert not tdp_enabled((str(npt), str(ept)))
    npt.write_text("Y\n")
    assert tdp_enabled((str(npt), str(ept)))
    assert tracefs.TDP_PARAMETERS[0].endswith("kvm_amd/parameters/npt")
