"""The x86 real-KVM harness: :class:`RealVm`, on this host's KVM or an x86 machine's
(standard library only; its guest code comes from :mod:`kvmmem.realkvm.x86_code`,
encoded on the host).  Its steps and their outcomes are those of
:class:`~kvmmem.realkvm.harness.HarnessVm` (:mod:`kvmmem.realkvm.harness`).

Guest virtual = guest physical below 2^47.  A GiB above 2^47 is reached through
an alias GiB in the lower half that no reserved range uses (a CPL3 PVM guest
cannot touch the upper half).

Guest exceptions: the guest has an IDT, GDT and TSS of its own in the harness memslot
(:mod:`kvmmem.realkvm.guest`); every exception vector reports to the *exception
doorbell* (the doorbell + 0x100: the vector, then CR2).  A TDP host (VMX/SVM) delivers
them there; this host's PVM ends them in a triple fault (``KVM_EXIT_SHUTDOWN``) as it
did before.  After an exception, a shutdown, an internal error or a timeout the vCPU
is *stale*: before its next step its pending and injected events are dropped
(``KVM_SET_VCPU_EVENTS`` with nothing set) and its segment state is rewritten, so an
event KVM re-queued at the exit (``svm_complete_interrupts`` / ``vmx_complete_interrupts``
requeue the interrupted delivery) cannot leak into the next step.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kvmmem.realkvm import libc
from kvmmem.realkvm.guest import (
    EXC_DOORBELL_FROM_CODE,
    LOWER_HALF,
    PATHS,
    RFLAGS_DEFAULT,
    RFLAGS_TF,
    STACK_TOP_OFFSET,
    SYSTEM_OFFSET,
    TABLES_OFFSET,
    VECTOR_NAMES,
    PageTables,
    long_mode_sregs,
    write_system_tables,
)
from kvmmem.realkvm.harness import (
    DEFAULT_TIMEOUT,
    EXC_DOORBELL_OFFSET,
    HARNESS_SLOT_SIZE,
    HarnessConflict,
    HarnessLayout,
    HarnessVm,
    Outcome,
    choose_layout,
    public,
)
from kvmmem.realkvm.kvm import Kvm, KvmIoctlError, VcpuFd, VmFd, require_vm_type
from kvmmem.realkvm.structs import GPR_NAMES, KVM_EXIT_MMIO, kvm_regs
from kvmmem.types import PAGE_SIZE, GiB

if EXC_DOORBELL_OFFSET != EXC_DOORBELL_FROM_CODE:  # pragma: no cover - a layout edit
    raise ImportError("the x86 exception handler's doorbell offset disagrees with the layout")
KVM_SET_VCPU_EVENTS = 0x4040AEA0
"""``_IOW(KVMIO, 0xa0, struct kvm_vcpu_events)`` (64 bytes; x86 base API since 2.6.32)."""
EXEC_POISON = 0xA000_0000_0000_0000
"""Register value during ``guest_exec``: non-canonical, and so are its sums and scaled
sums (x2, x4, x8), so a memory operand built from registers raises #GP/#SS."""


@dataclass(slots=True)
class _Vcpu:
    fd: VcpuFd
    path: str = ""
    stale: bool = True
    """True when the vCPU's state must be rewritten (new, or after an exception, a
    shutdown, an internal error or a timeout left it in an unknown state)."""
    pending: bool = False
    """True when an exit may still await completion (flushed with immediate_exit)."""


class RealVm(HarnessVm):
    """A VM on this host's KVM with the kvmmem guest harness.

    ``reserved_gpas``: every ``(gpa, size)`` a scenario will use (slots, accesses);
    ``reserved_slots``: every slot id it will use; ``path``: the default guest path
    (``native`` or ``emulated``); ``timeout``: seconds one guest step may run;
    ``kvm``: an open :class:`Kvm` to share (else one is opened and owned).

    Raises :class:`~kvmmem.realkvm.kvm.KvmUnavailable` without a usable /dev/kvm,
    :class:`HarnessConflict` when the scenario leaves no room.  Use as a context
    manager (or call :meth:`close`): every fd and mapping is released, also when the
    constructor fails half-way.  ``code``: the guest code page as
    :func:`kvmmem.realkvm.x86_code.code_blob` gives it (encoded here when absent; an
    agent inside an emulated machine, which has no iced-x86, is sent it).  ``vm_type``:
    ``KVM_CREATE_VM``'s type (``kvmmem.types.VM_TYPES``); a type other than 0 that
    ``KVM_CAP_VM_TYPES`` does not list raises
    :class:`~kvmmem.realkvm.kvm.KvmUnsupported` naming the capability."""

    layout: HarnessLayout
    vm: VmFd
    reset_exit_reason = True

    def __init__(self, reserved_gpas: Iterable[tuple[int, int]] = (),
                 reserved_slots: Iterable[int] = (), path: str = "native",
                 timeout: float = DEFAULT_TIMEOUT, kvm: Kvm | None = None,
                 code: dict[str, Any] | None = None, vm_type: int = 0,
                 dirty_ring: tuple[int, bool] = (0, False)) -> None:
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, not {path!r}")
        super().__init__(reserved_gpas, reserved_slots, timeout, kvm, dirty_ring)
        self.path = path
        self.vcpus: list[_Vcpu] = []
        self._entries: dict[str, int] = {}
        self._phys_bits = 36
        self._alias: dict[int, int] = {}
        self._doorbell_va = 0
        self._probe_va = 0
        self._code = code
        self.vm_type = vm_type
        self._start()

    def _setup(self, kvm: Kvm) -> None:
        require_vm_type(kvm, self.vm_type)
        self._vm = self.vm = kvm.create_vm(self.vm_type)
        self._enable_requested_ring()
        for ioctl in ("KVM_SET_USER_MEMORY_REGION", "KVM_SET_CPUID2"):
            self.vm.require(ioctl)
        self._phys_bits = kvm.phys_bits()
        self.layout = choose_layout(self.reserved_gpas, self.reserved_slots,
                                    self.vm.max_memslots() or 32, self._phys_bits)
        addr = self._map_harness_memory()
        if self._code is None:
            from kvmmem.realkvm.x86_code import code_blob  # iced-x86: host side only
            self._code = code_blob()
        code = bytes.fromhex(self._code["code"])
        self._entries = {name: self.layout.gpa + offset
                         for name, offset in self._code["entries"].items()}
        ctypes.memmove(addr, code, len(code))
        write_system_tables(self.layout.gpa, addr)
        self._tables = PageTables(self.layout.gpa + TABLES_OFFSET, addr + TABLES_OFFSET,
                                  HARNESS_SLOT_SIZE - TABLES_OFFSET)
        self._tables.map_gib(self.layout.gpa // GiB)
        self._tables.map_gib(self.layout.doorbell // GiB)
        self._doorbell_va = self.layout.doorbell
        self._probe_va = self.layout.probe
        self._add_harness_slot(addr)

    # --- vCPUs ----------------------------------------------------------------------

    def _vcpu(self, index: int, path: str | None) -> _Vcpu:
        """vCPU ``index`` (created on first use) set up for ``path``."""
        path = path or self.path
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, not {path!r}")
        def new(fd: VcpuFd) -> _Vcpu:
            fd.set_cpuid2(self.vm.kvm.supported_cpuid())
            return _Vcpu(fd)

        v: _Vcpu = self._ready_vcpu(index, new)
        if v.stale or v.path != path:
            if v.stale:
                _drop_events(v.fd)
            v.fd.set_sregs(long_mode_sregs(v.fd.get_sregs(), self._tables.cr3, path,
                                           self.layout.gpa))
            v.path = path
            v.stale = False
        return v

    def _va(self, gpa: int, size: int) -> int | None:
        """The guest virtual address through which the guest reaches
        ``[gpa, gpa + size)``, mapping it first; ``None`` when it cannot be reached
        (beyond MAXPHYADDR, straddling 2^47, or in a GiB an undeclared range let the
        harness use as an alias).

        Below 2^47 the map is the identity.  Each GiB above gets an alias GiB in the lower
        half that no reserved range uses (a PVM guest's CPL3 cannot touch the upper
        half)."""
        end = gpa + max(size, 1)
        if gpa < 0 or end > min(1 << 48, 1 << self._phys_bits):
            return None
        first, last = gpa // GiB, (end - 1) // GiB
        if end <= LOWER_HALF:
            if any(self._tables.targets.get(g, g) != g for g in range(first, last + 1)):
                return None  # that virtual GiB already aliases an upper-half GiB
            for gib in range(first, last + 1):
                self._tables.map_gib(gib)
            return gpa
        if gpa < LOWER_HALF:
            return None
        base = self._alias.get(first)
        if base is None or any(self._alias.get(first + i) != base + i
                               for i in range(last - first + 1)):
            base = self._alloc_alias(last - first + 1)
            for i in range(last - first + 1):
                self._alias[first + i] = base + i
                self._tables.map_gib(base + i, first + i)
        return base * GiB + gpa % GiB

    def _alloc_alias(self, count: int) -> int:
        """``count`` consecutive free lower-half virtual GiBs (highest first)."""
        spans = sorted((g // GiB, -(-(g + s) // GiB)) for g, s in self.reserved_gpas if s > 0)
        gib = LOWER_HALF // GiB - count
        while gib >= 0:
            clash = next(((a, b) for a, b in spans if a < gib + count and b > gib), None)
            if clash is not None:
                gib = clash[0] - count
                continue
            taken = [g for g in range(gib, gib + count) if self._tables.is_mapped(g)]
            if taken:
                gib = taken[0] - count
                continue
            return gib
        raise HarnessConflict("no free lower-half GiB left to alias an upper-half gpa")

    # --- guest steps ----------------------------------------------------------------

    def _unreachable(self, gpa: int, size: int) -> Outcome:
        return {"result": "unsupported",
                "reason": f"[{gpa:#x}, {gpa + size:#x}) cannot be reached through the "
                          f"guest's page tables (MAXPHYADDR {self._phys_bits}, or it "
                          f"straddles 2^47)"}

    def _access(self, routine: str, gpa: int, size: int, value: int, vcpu: int,
                path: str | None, is_read: bool) -> Outcome:
        self._check_size(size)
        va = self._va(gpa, size)
        if va is None:
            return self._unreachable(gpa, size)
        v = self._vcpu(vcpu, path)
        regs = kvm_regs(rip=self._entries[routine], rsi=va, rax=value,
                        rdi=self._doorbell_va, rflags=RFLAGS_DEFAULT)
        return self._access_outcome(self._run(v, regs), size, is_read)

    def guest_exec(self, gpa: int, vcpu: int = 0, path: str | None = None) -> Outcome:
        """An instruction fetch at ``gpa``: the guest jumps there with the trap flag set
        and every general register holding a non-canonical address, so the fetched
        instruction either faults on its memory operand or single-steps, and the
        resulting guest exception ends the run: on a TDP host the harness's IDT reports
        it at the exception doorbell; a CPL3 PVM guest triple-faults
        (``KVM_EXIT_SHUTDOWN``).  Whatever the bytes at ``gpa`` are, at most about one
        instruction runs (RIP-relative operands aside).

        ``ok`` when the fetch succeeded (any exception, or an MMIO exit of the
        instruction's own access); ``fault`` on EFAULT; ``abort`` ``#UD`` when KVM
        could not fetch the instruction for emulation (``insn_emulation_fail`` rose:
        ``handle_emulation_failure`` injects #UD into a CPL>0 guest); an ``exit``
        outcome for anything else (``KVM_EXIT_INTERNAL_ERROR`` where KVM reports the
        emulation failure to userspace instead, as upstream does at CPL0)."""
        va = self._va(gpa, 1)
        if va is None:
            return self._unreachable(gpa, 1)
        v = self._vcpu(vcpu, path)
        primed = self._prime(v)
        if primed is not None:
            return primed
        regs = kvm_regs(**dict.fromkeys(GPR_NAMES, EXEC_POISON))
        regs.rip = va
        regs.rflags = RFLAGS_DEFAULT | RFLAGS_TF
        with v.fd.stats() as stats:
            before = stats.read()
            out = self._run(v, regs, until_doorbell=False)
            after = stats.read()
        failed = after.get("insn_emulation_fail", 0) > before.get("insn_emulation_fail", 0)
        if out["result"] == "abort" or (out["result"] == "exit"
                                        and out.get("exit_reason") == "KVM_EXIT_SHUTDOWN"):
            return {"result": "abort", "abort": "#UD"} if failed else {"result": "ok"}
        if out["result"] == "mmio":
            return {"result": "ok"}
        return public(out)

    def _prime(self, v: _Vcpu) -> Outcome | None:
        """Map the pages the delivery of a guest exception touches (the IDT/GDT/TSS page
        and, writable, the exception stack; the code page and page tables are in use
        already) before ``guest_exec`` raises one: ``None``, or the outcome of a prime
        that did not complete.

        Under QEMU's SVM (the x86 machines) an exception delivery interrupted by a
        nested page fault on one of these pages left the next exit, the handler's
        store to the exception doorbell, still flagged as happening during event
        delivery (EXITINTINFO valid), and KVM refuses to emulate MMIO then
        (``svm_check_emulate_instruction``: ``KVM_INTERNAL_ERROR_DELIVERY_EV``).
        Mapped pages take no fault during delivery."""
        base = self.layout.gpa
        out = self._run(v, kvm_regs(rip=self._entries["prime"], rsi=base + SYSTEM_OFFSET,
                                    rbx=base + STACK_TOP_OFFSET - 8,
                                    rdi=self._doorbell_va, rflags=RFLAGS_DEFAULT))
        if out["result"] == "ok":
            return None
        return public(out)

    def _run(self, v: _Vcpu, regs: kvm_regs, until_doorbell: bool = True) -> Outcome:
        """Enter the guest at ``regs`` and drive it (:meth:`HarnessVm._drive`) until the
        doorbell (or, with ``until_doorbell`` False, until it stops on its own): returns
        the outcome, with the doorbell's data under ``_doorbell`` when it rang.  A guest
        exception ends the run as ``abort`` with the vector's mnemonic and ``vector``
        (and the private ``_cause``/``_address``: vector and CR2)."""
        v.fd.set_regs(regs)
        out, stale = self._drive(v.fd, until_doorbell)
        v.pending = True
        v.stale = v.stale or stale
        return out

    def _exception(self, first: int, second: int) -> Outcome:
        name = VECTOR_NAMES[first] if 0 <= first < len(VECTOR_NAMES) else str(first)
        return {"result": "abort", "abort": name, "vector": first}

    def _vcpu_fd(self, index: int) -> VcpuFd:
        return self._vcpu(index, None).fd

    # --- measurements and diagnostics -------------------------------------------------

    def touch(self, gpa: int, count: int, stride: int = PAGE_SIZE, write: bool = True,
              vcpu: int = 0, path: str | None = None) -> tuple[Outcome, float]:
        """One guest routine that reads or writes one byte every ``stride`` bytes,
        ``count`` times from ``gpa``: ``(outcome, seconds inside KVM_RUN loop)``."""
        va = self._va(gpa, count * stride)
        if va is None:
            return self._unreachable(gpa, count * stride), 0.0
        v = self._vcpu(vcpu, path)
        regs = kvm_regs(rip=self._entries["touch_write" if write else "touch_read"],
                        rsi=va, rcx=count, rdx=stride, rdi=self._doorbell_va,
                        rflags=RFLAGS_DEFAULT)
        start = time.perf_counter()
        out = self._run(v, regs)
        elapsed = time.perf_counter() - start
        return public(out), elapsed

    def mmio_round_trips(self, count: int, vcpu: int = 0,
                         path: str | None = None) -> tuple[int, float]:
        """Run a guest loop whose every iteration is an MMIO write exit, re-entering
        after each: ``(exits seen, seconds)``."""
        v = self._vcpu(vcpu, path)
        fd, run = v.fd, v.fd.run
        fd.set_regs(kvm_regs(rip=self._entries["mmio_loop"], rcx=count,
                             rbx=self._probe_va, rdi=self._doorbell_va,
                             rflags=RFLAGS_DEFAULT))
        seen = 0
        probe = self.layout.probe
        with fd.watchdog(max(self.timeout, count * 1e-3)):
            start = time.perf_counter()
            while True:
                if fd.kvm_run() or run.exit_reason != KVM_EXIT_MMIO:
                    break
                if run.exit.mmio.phys_addr != probe:
                    break
                seen += 1
            elapsed = time.perf_counter() - start
        v.pending = True
        return seen, elapsed

    def spin(self, vcpu: int = 0, path: str | None = None) -> Outcome:
        """Enter a guest that loops forever; the watchdog stops it (``timeout``)."""
        v = self._vcpu(vcpu, path)
        return public(self._run(v, kvm_regs(rip=self._entries["spin"], rflags=RFLAGS_DEFAULT)))


def _drop_events(fd: VcpuFd) -> None:
    """``KVM_SET_VCPU_EVENTS`` with nothing set: no exception pending or injected, no
    interrupt or NMI injected, no interrupt shadow (fields a zero ``flags`` leaves
    alone, such as a pending NMI or SMI, cannot arise in the harness guest).  Raises
    :class:`KvmIoctlError`."""
    events = ctypes.create_string_buffer(64)
    ret = libc.ioctl_ptr(fd.fd, KVM_SET_VCPU_EVENTS, ctypes.addressof(events))
    if ret < 0:
        raise KvmIoctlError(-ret, "KVM_SET_VCPU_EVENTS")
