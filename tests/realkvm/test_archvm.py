"""Arm64Vm / RiscvVm without a kernel: register ids, layout, the run loop's outcome
assembly against a scripted fake vCPU, guest_exec's classification, the completion
run before new registers.  Real kernels are exercised through the machine layer."""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from kvmmem.realkvm import arm64_code, riscv_code
from kvmmem.realkvm.archvm import POISON, ArchVm, Vcpu
from kvmmem.realkvm.arm64 import Arm64Vm, vm_type
from kvmmem.realkvm.harness import HarnessLayout, assemble_outcome, choose_layout, public
from kvmmem.realkvm.riscv import RiscvVm
from kvmmem.realkvm.structs import (
    KVM_EXIT_MEMORY_FAULT,
    KVM_EXIT_MMIO,
    KVM_EXIT_SYSTEM_EVENT,
    kvm_run,
)

LAYOUT = HarnessLayout(slot=31, gpa=0x7F_FFC0_0000, doorbell=0x7F_FFE0_1000,
                       probe=0x7F_FFE0_3000)
EXC = LAYOUT.doorbell + 0x100

Exit = Callable[[kvm_run], int]
"""One scripted KVM_RUN: fills the run page, returns 0 or an errno."""


def mmio_exit(gpa: int, length: int, is_write: bool, data: int = 0) -> Exit:
    def fill(run: kvm_run) -> int:
        run.exit_reason = KVM_EXIT_MMIO
        m = run.exit.mmio
        m.phys_addr, m.len, m.is_write = gpa, length, int(is_write)
        ctypes.memmove(ctypes.addressof(m.data), data.to_bytes(8, "little"), 8)
        return 0
    return fill


def fail(code: int, reason: int = 0) -> Exit:
    def fill(run: kvm_run) -> int:
        run.exit_reason = reason
        if reason == KVM_EXIT_MEMORY_FAULT:
            f = run.exit.memory_fault
            f.gpa, f.size, f.flags = 0x4000_0000, 4096, 8
        return code
    return fill


class FakeAlarm:
    fired = False


class FakeVcpuFd:
    """Records ONE_REG writes and KVM_RUNs (with immediate_exit), plays ``script``."""

    vcpu_id = 0

    def __init__(self, script: list[Exit]) -> None:
        self.run = kvm_run()
        self.script = list(script)
        self.regs: dict[int, int] = {}
        self.log: list[tuple[str, Any]] = []
        self.data_seen: list[bytes] = []
        """``kvm_run.mmio.data`` as each KVM_RUN found it."""
        self.alarm = FakeAlarm()

    def set_one_reg(self, reg_id: int, value: int) -> None:
        self.regs[reg_id] = value
        self.log.append(("set", reg_id))

    def kvm_run(self) -> int:
        self.log.append(("run", self.run.immediate_exit, self.run.exit_reason))
        self.data_seen.append(bytes(self.run.exit.mmio.data))
        if self.run.immediate_exit:
            return errno.EINTR
        if not self.script:
            self.alarm.fired = True
            return errno.EINTR
        return self.script.pop(0)(self.run)

    @contextmanager
    def watchdog(self, seconds: float) -> Iterator[FakeAlarm]:
        yield self.alarm


def fake_vm(cls: type[ArchVm], script: list[Exit]) -> tuple[ArchVm, FakeVcpuFd]:
    """An ``cls`` whose vCPU 0 is a fake (no /dev/kvm: the constructor is bypassed)."""
    vm = object.__new__(cls)
    vm.layout = LAYOUT
    vm.timeout = 1.5
    vm.phys_bits = 40
    prog = (arm64_code if cls is Arm64Vm else riscv_code).assemble()
    vm.entries = {k: LAYOUT.gpa + off for k, off in prog.entries.items()}
    fd = FakeVcpuFd(script)
    vm.vcpus = [Vcpu(fd)]  # type: ignore[arg-type]
    if cls is Arm64Vm:
        vm._tables = arm64_code.Stage1Tables(  # type: ignore[attr-defined]
            0x1000, ctypes.addressof(_TABLE_MEMORY), ctypes.sizeof(_TABLE_MEMORY))
    return vm, fd


_TABLE_MEMORY = ctypes.create_string_buffer(8 * 4096)

ARCHES = [Arm64Vm, RiscvVm]


@pytest.mark.parametrize("cls", ARCHES)
def test_read_sets_routine_registers_and_returns_the_doorbell_value(cls: type[ArchVm]) -> None:
    vm, fd = fake_vm(cls, [mmio_exit(LAYOUT.doorbell, 8, True, 0xFFEE_DDCC_BBAA_9988)])
    assert vm.guest_read(0x4000_0003, 4) == {"result": "ok", "value": 0xBBAA_9988}
    code = arm64_code if cls is Arm64Vm else riscv_code
    addr, value, bell = code.ROUTINE_REGS[:3]
    assert fd.regs[code.x_reg_id(addr)] == 0x4000_0003
    assert fd.regs[code.x_reg_id(value)] == 0
    assert fd.regs[code.x_reg_id(bell)] == LAYOUT.doorbell
    assert fd.regs[code.REG_PC] == vm.entries["read4"]
    assert fd.log[-2] == ("set", code.REG_PC)  # the PC is written last
    if cls is Arm64Vm:
        assert fd.regs[arm64_code.REG_PSTATE] == 0x3C5


@pytest.mark.parametrize("cls", ARCHES)
def test_write_passes_the_masked_value(cls: type[ArchVm]) -> None:
    vm, fd = fake_vm(cls, [mmio_exit(LAYOUT.doorbell, 8, True, 0x34)])
    assert vm.guest_write(0x4000_0000, 1, 0x1234) == {"result": "ok"}
    code = arm64_code if cls is Arm64Vm else riscv_code
    assert fd.regs[code.x_reg_id(code.ROUTINE_REGS[1])] == 0x34


@pytest.mark.parametrize("cls", ARCHES)
def test_mmio_read_is_answered_with_zeros_and_reported(cls: type[ArchVm]) -> None:
    vm, fd = fake_vm(cls, [mmio_exit(0x9000_0000, 8, False, 0x1111),
                           mmio_exit(LAYOUT.doorbell, 8, True, 0)])
    out = vm.guest_read(0x9000_0000, 8)
    assert out == {"result": "mmio", "gpa": 0x9000_0000, "len": 8, "is_write": False,
                   "value": 0}
    assert fd.data_seen[1] == bytes(8)  # the read exit was answered with zeros


@pytest.mark.parametrize("cls", ARCHES)
def test_mmio_write_and_more_mmio(cls: type[ArchVm]) -> None:
    vm, _ = fake_vm(cls, [mmio_exit(0x9000_0ffc, 4, True, 0xAABB),
                          mmio_exit(0x9000_1000, 4, True, 0xCCDD),
                          mmio_exit(LAYOUT.doorbell, 8, True, 0)])
    assert vm.guest_write(0x9000_0ffc, 8, 0) == {
        "result": "mmio", "gpa": 0x9000_0ffc, "len": 4, "is_write": True, "data": 0xAABB,
        "more_mmio": [{"result": "mmio", "gpa": 0x9000_1000, "len": 4, "is_write": True,
                       "data": 0xCCDD}]}


@pytest.mark.parametrize("cls", ARCHES)
def test_every_exit_is_completed_before_the_next_registers(cls: type[ArchVm]) -> None:
    """The next step first runs with immediate_exit while exit_reason still reads
    KVM_EXIT_MMIO (KVM completes the exit), then writes registers."""
    vm, fd = fake_vm(cls, [mmio_exit(LAYOUT.doorbell, 8, True, 0),
                           mmio_exit(LAYOUT.doorbell, 8, True, 0)])
    vm.guest_write(0x4000_0000, 8, 1)
    fd.log.clear()
    vm.guest_write(0x4000_0000, 8, 2)
    assert fd.log[0] == ("run", 1, KVM_EXIT_MMIO)
    assert fd.log[1][0] == "set"
    assert fd.run.immediate_exit == 0


def test_arm64_exception_doorbell_is_an_abort() -> None:
    esr = 0x25 << 26 | 1 << 25 | 0x10
    vm, _ = fake_vm(Arm64Vm, [mmio_exit(EXC, 8, True, esr),
                              mmio_exit(EXC + 8, 8, True, 1 << 41)])
    assert vm.guest_read(1 << 41, 8) == {"result": "abort", "abort": "data abort",
                                         "esr": esr, "far": 1 << 41}


def test_riscv_exception_doorbell_is_an_abort() -> None:
    vm, _ = fake_vm(RiscvVm, [mmio_exit(EXC, 8, True, 4), mmio_exit(EXC + 8, 8, True, 0x41)])
    assert vm.guest_read(0x41, 8) == {"result": "abort", "abort": "load address misaligned",
                                      "scause": 4, "stval": 0x41}


@pytest.mark.parametrize(("cls", "cause", "far", "expected"), [
    (Arm64Vm, 0x21 << 26 | 0x10, 0x4040_0000, "abort"),    # kvm_inject_pabt at gpa
    (Arm64Vm, 0x21 << 26 | 0x10, 0x4040_1000, "ok"),       # a later fetch failed
    (Arm64Vm, 0x00, 0x0, "ok"),                           # zeros: UDF, fetched
    (Arm64Vm, 0x25 << 26 | 0x04, POISON, "ok"),           # a load through a poisoned reg
    (RiscvVm, 1, 0x4040_0000, "abort"),
    (RiscvVm, 2, 0, "ok"),                                # illegal instruction: fetched
    (RiscvVm, 12, 0x4040_0004, "ok"),
])
def test_guest_exec_classifies_the_exception(cls: type[ArchVm], cause: int, far: int,
                                             expected: str) -> None:
    vm, fd = fake_vm(cls, [mmio_exit(EXC, 8, True, cause), mmio_exit(EXC + 8, 8, True, far)])
    out = vm.guest_exec(0x4040_0000)
    assert out["result"] == expected
    code = arm64_code if cls is Arm64Vm else riscv_code
    assert fd.regs[code.REG_PC] == 0x4040_0000
    exc_reg = code.x_reg_id(arm64_code.X_EXC_DOORBELL if cls is Arm64Vm
                            else riscv_code.R_EXC_DOORBELL)
    assert exc_reg not in fd.regs
    poisoned = [v for k, v in fd.regs.items() if k != code.REG_PC and
                (cls is not Arm64Vm or k != arm64_code.REG_PSTATE)]
    assert len(poisoned) == 30 and set(poisoned) == {POISON}


@pytest.mark.parametrize("cls", ARCHES)
def test_guest_exec_mmio_and_errors(cls: type[ArchVm]) -> None:
    vm, _ = fake_vm(cls, [mmio_exit(0x1234, 4, False)])
    assert vm.guest_exec(0x4000_0000) == {"result": "ok"}
    vm, _ = fake_vm(cls, [fail(errno.EOPNOTSUPP)])
    assert vm.guest_exec(0x4000_0000) == {"result": "error", "errno": "EOPNOTSUPP"}


@pytest.mark.parametrize("cls", ARCHES)
def test_fault_error_exit_timeout(cls: type[ArchVm]) -> None:
    vm, _ = fake_vm(cls, [fail(errno.EFAULT)])
    assert vm.guest_write(0x4000_0000, 8, 1) == {"result": "fault"}
    vm, _ = fake_vm(cls, [fail(errno.EFAULT, KVM_EXIT_MEMORY_FAULT)])
    assert vm.guest_write(0x4000_0000, 8, 1) == {"result": "fault", "gpa": 0x4000_0000,
                                                 "size": 4096, "flags": 8}
    vm, _ = fake_vm(cls, [fail(errno.EIO)])
    assert vm.guest_write(0x4040_0011, 2, 1) == {"result": "error", "errno": "EIO"}

    def system_event(run: kvm_run) -> int:
        run.exit_reason = KVM_EXIT_SYSTEM_EVENT
        return 0
    vm, _ = fake_vm(cls, [system_event])
    assert vm.guest_read(0, 1) == {"result": "exit", "exit_reason": "KVM_EXIT_SYSTEM_EVENT"}
    vm, _ = fake_vm(cls, [])
    assert vm.spin() == {"result": "timeout", "seconds": 1.5}


@pytest.mark.parametrize("cls", ARCHES)
def test_bad_size_and_unreachable(cls: type[ArchVm]) -> None:
    vm, _ = fake_vm(cls, [])
    with pytest.raises(ValueError):
        vm.guest_read(0, 3)
    assert vm.guest_read(1 << 60, 8)["result"] == "unsupported"


def test_arm64_maps_the_gibs_an_access_touches() -> None:
    vm, _ = fake_vm(Arm64Vm, [mmio_exit(LAYOUT.doorbell, 8, True, 0)])
    vm.guest_write((3 << 30) - 4, 8, 0)
    assert {2, 3} <= vm._tables.mapped  # type: ignore[attr-defined]
    assert vm.guest_read(1 << 48, 1)["result"] == "unsupported"


def test_assemble_outcome_and_public() -> None:
    first = {"result": "mmio", "gpa": 1, "len": 4, "is_write": False}
    assert assemble_outcome([first], {"result": "ok", "_doorbell": 5}) == {
        **first, "_doorbell": 5}
    assert assemble_outcome([first], {"result": "fault"}) == {"result": "fault"}
    assert assemble_outcome([], {"result": "ok"}) == {"result": "ok"}
    assert public({"result": "ok", "_doorbell": 1, "value": 2}) == {"result": "ok", "value": 2}


def test_layout_for_a_40_bit_ipa() -> None:
    lay = choose_layout([(0x4000_0000, 1 << 30)], range(8), 32764, 40)
    assert lay.slot == 32763
    assert lay.gpa + 4 * 2**20 <= 512 << 30
    assert lay.doorbell == lay.gpa + (2 << 20) + 0x1000


def test_vm_type() -> None:
    assert vm_type(None) == 0
    assert vm_type(48) == 48


# --- on real kernels, through a machine's agent (skipped where none is fetched) ---------

G = 0x4000_0000
M2 = 2 << 20


def _program(arch: str) -> dict[str, Any]:
    """One anonymous slot at G; reads and writes inside, MMIO outside, a store straddling
    the slot's end, an exec inside and outside."""
    steps: list[dict[str, Any]] = [
        {"op": "guest_write", "gpa": G + 0x10, "size": 8, "value": 0x1122334455667788},
        {"op": "host_read", "memory": "m", "offset": 0x10, "size": 8},
        {"op": "guest_read", "gpa": G + 0x13, "size": 2},
        {"op": "guest_read", "gpa": G + 0xFFD, "size": 8},
        {"op": "guest_read", "gpa": G + 2 * M2, "size": 4},
        {"op": "guest_write", "gpa": G + 2 * M2 + 8, "size": 8, "value": 5},
        {"op": "guest_write", "gpa": G + M2 - 4, "size": 8, "value": 7},
        {"op": "guest_exec", "gpa": G + 0x1000},
        {"op": "guest_exec", "gpa": G + 2 * M2},
        {"op": "prefault", "gpa": G, "size": 4096},
        {"op": "guest_read", "gpa": G + 0x10, "size": 1, "vcpu": 1},
    ]
    return {"scenario": f"archvm-{arch}", "arch": arch, "path": "native", "timeout": 5.0,
            "ipa_bits": None, "reserved_gpas": [[G, 3 * M2]], "reserved_slots": [0],
            "needs": [],
            "memory": [{"name": "m", "size": M2, "kind": "anon", "prot": 3, "fill": None,
                        "at": None}],
            "memslots": [{"index": 0, "op": "set_memslot", "slot": 0, "gpa": G, "size": M2,
                          "memory": "m", "offset": 0, "flags": 0}],
            "steps": [{"index": i, **s} for i, s in enumerate(steps)]}


@pytest.mark.parametrize(("arch", "version"), [("arm64", "7.3"), ("riscv", "7.2")])
def test_on_a_real_kernel(arch: str, version: str, machines: Any) -> None:
    """What arm64 7.3 and riscv 7.2 answered when this harness was written."""
    run = machines.get(arch, version).request("run", program=_program(arch), timeout=120)
    assert run["supported"], run["reason"]
    assert run["setup"] == [{"memory": "m", "result": "ok"}, {"memslot": 0, "result": "ok"}]
    got = [{k: v for k, v in s.items() if k not in ("step", "op")} for s in run["steps"]]
    exec_outside = ({"result": "abort", "abort": "prefetch abort", "esr": 0x86000010,
                     "far": G + 2 * M2} if arch == "arm64" else
                    {"result": "abort", "abort": "instruction access fault", "scause": 1,
                     "stval": G + 2 * M2})
    assert got == [
        {"result": "ok"},
        {"result": "ok", "value": 0x1122334455667788},
        {"result": "ok", "value": 0x4455},
        {"result": "ok", "value": 0},
        {"result": "mmio", "gpa": G + 2 * M2, "len": 4, "is_write": False, "value": 0},
        {"result": "mmio", "gpa": G + 2 * M2 + 8, "len": 8, "is_write": True, "data": 5},
        {"result": "mmio", "gpa": G + M2, "len": 8, "is_write": True, "data": 7},
        {"result": "ok"},
        exec_outside,
        {"result": "error", "errno": "EINVAL"},
        {"result": "ok", "value": 0x88},
    ]
