"""KVM_SET_MEMORY_ATTRIBUTES and the VM type in the real-KVM backend: the uapi struct and
ioctl, the program's ``vm_type`` and ``set_memory_attributes`` fields, the step's
dispatch and harness check, and the ``KVM_CAP_VM_TYPES`` gate (with fakes).  Only the
last two tests need /dev/kvm (and accept whichever answer this kernel gives)."""

from __future__ import annotations

import ctypes
import json
from typing import Any

import pytest

from kvmmem.realkvm import HostMemory, Kvm, RealVm, ioctls, structs
from kvmmem.realkvm import program as prog
from kvmmem.realkvm.harness import HARNESS_WINDOW, HarnessConflict, HarnessLayout, HarnessVm
from kvmmem.realkvm.kvm import KvmUnsupported, require_vm_type
from kvmmem.realkvm.runner import run_scenario, scenario_program
from kvmmem.scenario import load_scenario_text
from kvmmem.scenario.model import MEMORY_ATTRIBUTES
from kvmmem.types import VM_TYPES

from .helpers import G

ATTRS = f"""\
kvmmem: 1
name: attrs
arch: x86
vm_type: {{vm_type}}
memory:
  ram: {{{{size: 2M, kind: anon, prot: rw}}}}
memslots:
  - {{{{slot: 0, gpa: {G:#x}, size: 2M, memory: ram}}}}
steps:
  - set_memory_attributes: {{{{gpa: {G:#x}, size: 4K}}}}
  - set_memory_attributes: {{{{gpa: {G:#x}, size: 4K, attributes: [private], flags: 1}}}}
  - guest_write: {{{{gpa: {G:#x}, size: 4, value: 3}}}}
"""


def _scenario(vm_type: str = "default") -> Any:
    return load_scenario_text(ATTRS.format(vm_type=vm_type), "attrs.yaml")


def test_memory_attributes_layout_and_number() -> None:
    """struct kvm_memory_attributes is four u64 (32 bytes); KVM_SET_MEMORY_ATTRIBUTES is
    _IOW(KVMIO, 0xd2, 32) and needs KVM_CAP_MEMORY_ATTRIBUTES (233); KVM_CAP_VM_TYPES is
    235; PRIVATE is bit 3 (include/uapi/linux/kvm.h, v6.8)."""
    s = structs.kvm_memory_attributes
    assert ctypes.sizeof(s) == structs.KERNEL_SIZES[s] == 32
    assert [(n, getattr(s, n).offset) for n, _ in s._fields_] == [
        ("address", 0), ("size", 8), ("attributes", 16), ("flags", 24)]
    assert ioctls.ioctl_number("KVM_SET_MEMORY_ATTRIBUTES") == 0x4020AED2
    assert ioctls.ioctl_capability("KVM_SET_MEMORY_ATTRIBUTES") == 233
    assert ioctls.KVM_CAP_MEMORY_ATTRIBUTES == 233
    assert ioctls.KVM_CAP_VM_TYPES == 235
    assert structs.KVM_MEMORY_ATTRIBUTE_PRIVATE == MEMORY_ATTRIBUTES["private"] == 1 << 3


def test_program_carries_vm_type_and_attributes() -> None:
    """The program has the VM type's number; a set_memory_attributes step its gpa, size,
    attributes as the uapi bits and flags; all JSON."""
    p = scenario_program(_scenario("sw_protected"), "x86")
    json.dumps(p)
    assert p["vm_type"] == VM_TYPES["sw_protected"] == 1
    assert scenario_program(_scenario(), "x86")["vm_type"] == 0
    got = [{k: s[k] for k in ("op", "gpa", "size", "attributes", "flags")}
           for s in p["steps"][:2]]
    assert got == [
        {"op": "set_memory_attributes", "gpa": G, "size": 0x1000, "attributes": 0, "flags": 0},
        {"op": "set_memory_attributes", "gpa": G, "size": 0x1000, "attributes": 8, "flags": 1}]
    assert [G, 0x1000] in p["reserved_gpas"]


class _Caps:
    """/dev/kvm answering KVM_CHECK_EXTENSION from a table; creating a VM is an error
    (the gate must refuse first)."""

    def __init__(self, caps: dict[int, int]) -> None:
        self.caps = caps
        self.asked: list[int] = []

    def check_extension(self, cap: int) -> int:
        self.asked.append(cap)
        return self.caps.get(cap, 0)

    def create_vm(self, vm_type: int = 0) -> Any:
        raise AssertionError(f"KVM_CREATE_VM({vm_type}) reached past the gate")


@pytest.mark.parametrize(("vm_types", "vm_type", "refused"), [
    (0, 0, False), (1, 0, False), (0x3, 1, False), (0x1, 1, True), (0, 1, True),
    (0x13, 4, False), (0x1D, 1, True)],
    ids=["default-no-cap", "default", "swprot-listed", "swprot-missing", "no-cap",
         "other-type", "sev-only"])
def test_vm_type_gate(vm_types: int, vm_type: int, refused: bool) -> None:
    """The default VM never needs KVM_CAP_VM_TYPES (pre-6.8 kernels have none); another
    type needs its bit, else KvmUnsupported naming the capability, its value and the
    type."""
    kvm = _Caps({ioctls.KVM_CAP_VM_TYPES: vm_types})
    if not refused:
        require_vm_type(kvm, vm_type)
        assert kvm.asked == ([] if vm_type == 0 else [ioctls.KVM_CAP_VM_TYPES])
        return
    with pytest.raises(KvmUnsupported,
                       match=rf"sw_protected \(1\).*KVM_CAP_VM_TYPES is {vm_types:#x}"):
        require_vm_type(kvm, vm_type)


def test_realvm_refuses_an_unlisted_type_before_creating_it() -> None:
    """RealVm checks the type on /dev/kvm before KVM_CREATE_VM and releases itself."""
    kvm: Any = _Caps({ioctls.KVM_CAP_VM_TYPES: 1})
    with pytest.raises(KvmUnsupported, match="KVM_CAP_VM_TYPES is 0x1"):
        RealVm([(G, 0x200000)], [0], kvm=kvm, code={"code": "", "entries": {}}, vm_type=1)


def test_make_vm_refuses_a_vm_type_off_x86(monkeypatch: pytest.MonkeyPatch) -> None:
    """A VM type is x86's; another architecture's program with one is unsupported (the
    model refuses such scenarios before; the driver does not guess)."""
    monkeypatch.setattr(prog, "host_arch", lambda: "arm64")
    with pytest.raises(KvmUnsupported, match="x86's"):
        prog.make_vm({"arch": "arm64", "vm_type": 1}, None)


class _AttrVm:
    """A VM fd recording KVM_SET_MEMORY_ATTRIBUTES calls and answering ``err``."""

    def __init__(self, err: str | None) -> None:
        self.err = err
        self.calls: list[tuple[int, int, int, int]] = []

    def set_memory_attributes(self, address: int, size: int, attributes: int,
                              flags: int = 0) -> str | None:
        self.calls.append((address, size, attributes, flags))
        return self.err


def _harness(err: str | None) -> HarnessVm:
    vm = HarnessVm([], [], 1.0, None)
    vm.layout = HarnessLayout(slot=31, gpa=0x80_0000_0000, doorbell=0x80_0020_0000,
                              probe=0x80_0020_1000)
    vm.vm = _AttrVm(err)  # type: ignore[assignment]
    return vm


@pytest.mark.parametrize("err", [None, "EINVAL", "ENOTTY"])
def test_set_memory_attributes_step(err: str | None) -> None:
    """The program's step reaches KVM_SET_MEMORY_ATTRIBUTES with the uapi arguments; the
    answer is ok or an error with the errno name, ENOTTY (no such ioctl) included."""
    vm = _harness(err)
    step = {"index": 0, "op": "set_memory_attributes", "gpa": G, "size": 0x1000,
            "attributes": 8, "flags": 1}
    with HostMemory() as host:
        out = prog._step(host, vm, step)
    assert out == ({"result": "ok"} if err is None else {"result": "error", "errno": err})
    assert vm.vm.calls == [(G, 0x1000, 8, 1)]  # type: ignore[attr-defined]


def test_set_memory_attributes_keeps_off_the_harness() -> None:
    """A range touching the harness window is a HarnessConflict (undeclared), never
    issued; size 0 there is issued (the kernel's EINVAL is the outcome)."""
    vm = _harness(None)
    base = vm.layout.gpa
    with pytest.raises(HarnessConflict, match="harness window"):
        vm.set_memory_attributes(base + HARNESS_WINDOW - 0x1000, 0x2000, 0)
    assert vm.set_memory_attributes(base, 0, 0) == {"result": "ok"}
    assert vm.vm.calls == [(base, 0, 0, 0)]  # type: ignore[attr-defined]


def test_memory_attributes_on_this_host(kvm: Kvm) -> None:
    """This host's KVM answers every set_memory_attributes with ok or an errno (ENOTTY
    where the kernel has no such ioctl); the guest write after them still works.  An
    x86 kernel of v6.8 or later built without memory attributes
    (KVM_CAP_MEMORY_ATTRIBUTES 0 on /dev/kvm) is unsupported, naming the capability."""
    run = run_scenario(_scenario(), kvm=kvm)
    if not kvm.check_extension(ioctls.KVM_CAP_MEMORY_ATTRIBUTES) \
            and prog.kernel_version() >= (6, 8):
        assert not run.supported and "KVM_CAP_MEMORY_ATTRIBUTES" in run.reason
        return
    assert run.supported, run.reason
    for step in run.steps[:2]:
        assert step["result"] in ("ok", "error")
        assert step["result"] == "ok" or step["errno"] in ("EINVAL", "ENOTTY")
    assert run.steps[1]["result"] == "error"  # flags 1 is never accepted
    assert run.steps[2]["result"] == "ok"


def test_sw_protected_on_this_host(kvm: Kvm) -> None:
    """A sw_protected scenario runs where KVM_CAP_VM_TYPES lists type 1, else it is
    unsupported naming the capability; the probe reports the capabilities asked."""
    caps = prog.probe_capabilities(kvm)
    assert set(caps) == {"dev", "vm"}
    assert set(caps["dev"]) == set(prog.PROBED_CAPABILITIES)
    run = run_scenario(_scenario("sw_protected"), kvm=kvm)
    listed = kvm.check_extension(ioctls.KVM_CAP_VM_TYPES) >> 1 & 1
    assert run.supported == bool(listed)
    if not listed:
        assert "KVM_CAP_VM_TYPES" in run.reason
