"""KVM_ENABLE_CAP in the real-KVM backend: the uapi struct, the program's ``enable_cap``
step (the capability's number, args, flags), its dispatch to the VM fd (with a fake)
and the ``kvm_enable_cap`` the fd fills in.  Only the last test needs /dev/kvm."""

from __future__ import annotations

import ctypes
import json
from typing import Any

import pytest

from kvmmem.realkvm import HostMemory, Kvm, ioctls, structs
from kvmmem.realkvm import program as prog
from kvmmem.realkvm.harness import HarnessLayout, HarnessVm
from kvmmem.realkvm.runner import run_scenario, scenario_footprint, scenario_program
from kvmmem.scenario import load_scenario_text
from kvmmem.scenario.model import VM_CAPS

from .helpers import G

CAPS = f"""\
kvmmem: 1
name: caps
arch: [x86, arm64, riscv]
memory:
  ram: {{size: 256K, kind: anon, prot: rw}}
memslots:
  - {{slot: 3, gpa: {G:#x}, size: 256K, memory: ram, flags: [log_dirty]}}
steps:
  - enable_cap: {{cap: manual_dirty_log_protect2, args: [1], flags: 1}}
  - enable_cap: {{cap: manual_dirty_log_protect2, args: [3]}}
  - enable_cap: {{cap: manual_dirty_log_protect2}}
  - guest_write: {{gpa: {G:#x}, size: 4, value: 1}}
  - get_dirty_log: {{slot: 3}}
"""


def test_enable_cap_layout_and_numbers() -> None:
    """struct kvm_enable_cap {u32 cap; u32 flags; u64 args[4]; u8 pad[64]} is 104 bytes;
    KVM_ENABLE_CAP is _IOW(KVMIO, 0xa3, 104) on the VM fd; manual_dirty_log_protect2 is
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (168), which KVM_CLEAR_DIRTY_LOG needs."""
    s = structs.kvm_enable_cap
    assert ctypes.sizeof(s) == structs.KERNEL_SIZES[s] == 104
    assert [(n, getattr(s, n).offset) for n, _ in s._fields_] == [
        ("cap", 0), ("flags", 4), ("args", 8), ("pad", 40)]
    assert ioctls.ioctl_number("KVM_ENABLE_CAP") == 0x4068AEA3
    assert VM_CAPS["manual_dirty_log_protect2"] == ioctls.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
    assert ioctls.ioctl_capability("KVM_CLEAR_DIRTY_LOG") == 168


def test_program_carries_the_cap_number_args_and_flags() -> None:
    """An enable_cap step in the program: the KVM_CAP_* number, the args as given (missing
    ones are the driver's zeros), flags; JSON; no guest address reserved for it."""
    scenario = load_scenario_text(CAPS, "caps.yaml")
    p = scenario_program(scenario, "arm64")
    json.dumps(p)
    got = [{k: s[k] for k in ("op", "cap", "args", "flags")} for s in p["steps"][:3]]
    assert got == [
        {"op": "enable_cap", "cap": 168, "args": [1], "flags": 1},
        {"op": "enable_cap", "cap": 168, "args": [3], "flags": 0},
        {"op": "enable_cap", "cap": 168, "args": [], "flags": 0}]
    ranges, slots = scenario_footprint(scenario)
    assert slots == [3] and ranges == [(G, 256 << 10), (G, 4)]


class _CapVm:
    """A VM fd recording KVM_ENABLE_CAP calls and answering ``err``."""

    def __init__(self, err: str | None) -> None:
        self.err = err
        self.calls: list[tuple[int, tuple[int, ...], int]] = []

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> str | None:
        self.calls.append((cap, args, flags))
        return self.err


def _harness(err: str | None) -> HarnessVm:
    vm = HarnessVm([], [], 1.0, None)
    vm.layout = HarnessLayout(slot=31, gpa=0x80_0000_0000, doorbell=0x80_0020_0000,
                              probe=0x80_0020_1000)
    vm.vm = _CapVm(err)  # type: ignore[assignment]
    return vm


@pytest.mark.parametrize("err", [None, "EINVAL"])
def test_enable_cap_step(err: str | None) -> None:
    """The program's step reaches KVM_ENABLE_CAP with the capability, args and flags; the
    answer is ok or the errno exactly as given (a kernel without the capability answers
    EINVAL: an outcome, not unsupported)."""
    vm = _harness(err)
    step: dict[str, Any] = {"index": 0, "op": "enable_cap", "cap": 168, "args": [3],
                            "flags": 2}
    with HostMemory() as host:
        out = prog._step(host, vm, step)
    assert out == ({"result": "ok"} if err is None else {"result": "error", "errno": err})
    assert vm.vm.calls == [(168, (3,), 2)]  # type: ignore[attr-defined]


def test_enable_cap_on_this_host(kvm: Kvm) -> None:
    """This host's KVM: flags != 0 is EINVAL; args[0] 3 is accepted where
    KVM_CHECK_EXTENSION(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) offers INITIALLY_SET (3), else
    EINVAL; 0 turns manual protect off; the write after it is reported."""
    run = run_scenario(load_scenario_text(CAPS, "caps.yaml"), kvm=kvm)
    assert run.supported, run.reason
    out = [{k: v for k, v in s.items() if k not in ("step", "op")} for s in run.steps]
    caps = kvm.check_extension(ioctls.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
    assert out[0] == {"result": "error", "errno": "EINVAL"}
    assert out[1] == ({"result": "ok"} if caps & 2 else {"result": "error", "errno": "EINVAL"})
    assert out[2] == {"result": "ok"}
    assert out[4] == {"result": "ok", "dirty": [G >> 12]}
