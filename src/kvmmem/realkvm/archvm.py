"""What the arm64 and riscv real-KVM harnesses share: :class:`ArchVm`.

An :class:`ArchVm` is :class:`~kvmmem.realkvm.x86.RealVm`'s counterpart for an
architecture whose registers are reached with ``KVM_{GET,SET}_ONE_REG``
(:class:`~kvmmem.realkvm.arm64.Arm64Vm`, :class:`~kvmmem.realkvm.riscv.RiscvVm`).  It
runs on the emulated machine's bare Python, so everything it imports is the standard
library or the stdlib-only modules of :mod:`kvmmem.realkvm`.

Layout: the harness's slot id and 4 MiB guest-physical window come from
:func:`~kvmmem.realkvm.harness.choose_layout` (2 MiB slot: the code page, then the
arm64 stage-1 tables; then 2 MiB that no memslot covers, with the doorbell at
+2 MiB+0x1000 and the exception doorbell 0x100 after it).

Step methods and outcomes are RealVm's (its module docstring is the vocabulary):
``ok`` (+ ``value``), ``mmio`` (``gpa``, ``len``, ``is_write``, ``data``; a read is
answered with zero bytes; later exits of the same access under ``more_mmio``),
``fault`` (``KVM_RUN`` EFAULT; ``gpa``/``size``/``flags`` with
``KVM_EXIT_MEMORY_FAULT``), ``error`` + ``errno`` (an ioctl failed, e.g. ``KVM_RUN``
EOPNOTSUPP for a riscv fetch outside every memslot), ``timeout`` (the vCPU
watchdog stopped the guest), ``exit`` + ``exit_reason`` (any other exit),
``unsupported`` + ``reason`` (a gpa the guest cannot address).  One extension:
``{"result": "abort", "abort": NAME, ...}`` when the access ended in an exception
taken inside the guest (an exception KVM injected, such as arm64's
``kvm_inject_pabt`` / ``kvm_inject_size_fault``, or one the guest's own hardware
raised), with the raw syndrome (arm64 ``esr``/``far``, riscv ``scause``/``stval``).
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from kvmmem.realkvm.harness import (
    DEFAULT_TIMEOUT,
    EXC_DOORBELL_OFFSET,
    HarnessLayout,
    HarnessVm,
    choose_layout,
    public,
)
from kvmmem.realkvm.kvm import Kvm, VcpuFd, VmFd

Outcome = dict[str, Any]

CODE_OFFSET = 0
"""The code page's offset in the harness slot."""
POISON = 0xA000_0000_0000_0000
"""Register value during ``guest_exec``: no address the guest can reach (beyond every
virtual and physical address size here), so an instruction using a register as an
address faults instead of touching memory."""


@dataclass(slots=True)
class Vcpu:
    """One vCPU of the harness: its fd, and whether an exit may still await completion
    (``pending``: flushed with an ``immediate_exit`` run before the registers change)."""

    fd: VcpuFd
    pending: bool = False


class ArchVm(HarnessVm):
    """The generic part of a ONE_REG architecture's harness.  Subclasses set ``arch`` and
    ``phys_bits`` and implement the hooks (``_create_vm``, ``_program``, ``_place``,
    ``_init_vcpu``, ``_routine_reg_ids``, ``_pc_id``, ``_entry_regs``, ``_reachable``,
    ``_fetch_failed``, ``_poisoned``, and :class:`~kvmmem.realkvm.harness.HarnessVm`'s
    ``_exception``).

    ``reserved_gpas``: every ``(gpa, size)`` the scenario will use; ``reserved_slots``:
    every slot id it will use; ``timeout``: seconds one guest step may run; ``kvm``: an
    open :class:`Kvm` to share; ``ipa_bits``: the guest physical address size to ask for
    (``None``: the kernel's default for a VM of type 0).

    Raises :class:`~kvmmem.realkvm.kvm.KvmUnavailable` without a usable /dev/kvm,
    :class:`~kvmmem.realkvm.kvm.KvmUnsupported` when the kernel lacks what the harness
    needs (``ipa_bits`` beyond ``KVM_CAP_ARM_VM_IPA_SIZE``),
    :class:`~kvmmem.realkvm.harness.HarnessConflict` when the scenario leaves no room.
    A context manager; :meth:`close` releases everything, also after a failed
    construction."""

    arch: ClassVar[str] = ""
    layout: HarnessLayout
    vm: VmFd

    def __init__(self, reserved_gpas: Iterable[tuple[int, int]] = (),
                 reserved_slots: Iterable[int] = (), timeout: float = DEFAULT_TIMEOUT,
                 kvm: Kvm | None = None, ipa_bits: int | None = None,
                 dirty_ring: tuple[int, bool] = (0, False), mte: bool = False) -> None:
        super().__init__(reserved_gpas, reserved_slots, timeout, kvm, dirty_ring, mte)
        self.ipa_bits = ipa_bits
        self.phys_bits = 40
        self.vcpus: list[Vcpu] = []
        self.entries: dict[str, int] = {}
        self._start()

    # --- hooks --------------------------------------------------------------------------------

    def _create_vm(self, kvm: Kvm) -> VmFd:
        """Create the VM (its type carries the IPA size where the arch has one) and set
        ``self.phys_bits``."""
        raise NotImplementedError

    def _program(self) -> tuple[bytes, dict[str, int]]:
        """The code page and its entry offsets."""
        raise NotImplementedError

    def _place(self, hva: int) -> None:
        """Prepare the rest of the harness memory at ``hva`` (arm64: stage-1 tables)."""

    def _init_vcpu(self, fd: VcpuFd) -> None:
        """Make a new vCPU ready to run the routines (init, system registers, mode)."""
        raise NotImplementedError

    def _routine_reg_ids(self) -> tuple[int, ...]:
        """The ONE_REG ids of the routines' address, value, doorbell, count and stride
        registers."""
        raise NotImplementedError

    def _pc_id(self) -> int:
        raise NotImplementedError

    def _entry_regs(self) -> dict[int, int]:
        """ONE_REG ids and values written before every entry besides the routine's."""
        return {}

    def _reachable(self, gpa: int, size: int) -> bool:
        """Whether the guest can address ``[gpa, gpa + size)`` (mapping it if needed)."""
        raise NotImplementedError

    def _fetch_failed(self, cause: int, address: int, gpa: int) -> bool:
        """Whether the exception ``cause``/``address`` says the fetch at ``gpa`` failed."""
        raise NotImplementedError

    def _poisoned(self) -> tuple[int, ...]:
        """The ONE_REG ids of the general registers ``guest_exec`` fills with
        :data:`POISON`."""
        raise NotImplementedError

    # --- setup and lifetime ------------------------------------------------------------------

    def _setup(self, kvm: Kvm) -> None:
        self._vm = self.vm = self._create_vm(kvm)
        self._enable_requested_ring()
        self.vm.require("KVM_SET_USER_MEMORY_REGION")
        self.layout = choose_layout(self.reserved_gpas, self.reserved_slots,
                                    self.vm.max_memslots() or 32, self.phys_bits)
        addr = self._map_harness_memory()
        code, offsets = self._program()
        ctypes.memmove(addr + CODE_OFFSET, code, len(code))
        self.entries = {name: self.layout.gpa + CODE_OFFSET + off
                        for name, off in offsets.items()}
        self._place(addr)
        self._add_harness_slot(addr)

    @property
    def exc_doorbell(self) -> int:
        """The gpa the exception vectors report to (no memslot covers it)."""
        return self.layout.gpa + EXC_DOORBELL_OFFSET

    # --- vCPUs ----------------------------------------------------------------------------

    def _vcpu(self, index: int) -> Vcpu:
        """vCPU ``index`` (created, with every lower one, on first use), with any exit of
        its last run completed: a ``KVM_RUN`` with ``immediate_exit`` set lets KVM finish
        the MMIO exit (arm64 ``kvm_handle_mmio_return`` commits the PC advance before
        returning EINTR; riscv ``kvm_riscv_vcpu_mmio_return`` moves ``sepc``), so the PC
        the next step sets is not advanced after the fact (kernel-matrix.md §4)."""
        def new(fd: VcpuFd) -> Vcpu:
            self._init_vcpu(fd)
            return Vcpu(fd)

        v: Vcpu = self._ready_vcpu(index, new)
        return v

    def _enter(self, v: Vcpu, pc: int, regs: dict[int, int]) -> None:
        """Write ``regs`` (ONE_REG id -> value), the arch's entry registers and the PC
        (``KVM_SET_ONE_REG`` each)."""
        fd = v.fd
        for reg_id, value in regs.items():
            fd.set_one_reg(reg_id, value)
        for reg_id, value in self._entry_regs().items():
            fd.set_one_reg(reg_id, value)
        fd.set_one_reg(self._pc_id(), pc)

    def _run(self, v: Vcpu, until_doorbell: bool = True) -> Outcome:
        """Run until the doorbell rings, the exception vectors report (``abort``, built by
        :meth:`_exception`), or anything else ends the run
        (:meth:`~kvmmem.realkvm.harness.HarnessVm._drive`).  ``until_doorbell`` False
        stops at the first MMIO exit that is not the exception doorbell
        (``guest_exec``)."""
        out, _stale = self._drive(v.fd, until_doorbell, stop_at_mmio=not until_doorbell)
        v.pending = True
        return out

    # --- guest steps ------------------------------------------------------------------------

    def _routine_regs(self, address: int, value: int, count: int = 0,
                      stride: int = 0) -> dict[int, int]:
        """The routine registers' ids and values for one step (doorbell included)."""
        ids = self._routine_reg_ids()
        values = (address, value, self.layout.doorbell, count, stride)
        used = 5 if count else 3
        return dict(zip(ids[:used], values[:used], strict=True))

    def _unreachable(self, gpa: int, size: int) -> Outcome:
        return {"result": "unsupported",
                "reason": f"[{gpa:#x}, {gpa + size:#x}) is beyond what the {self.arch} "
                          f"harness guest can address"}

    def _access(self, routine: str, gpa: int, size: int, value: int, vcpu: int,
                path: str | None, is_read: bool) -> Outcome:
        self._check_size(size)
        if not self._reachable(gpa, size):
            return self._unreachable(gpa, size)
        v = self._vcpu(vcpu)
        self._enter(v, self.entries[routine], self._routine_regs(gpa, value))
        return self._access_outcome(self._run(v), size, is_read)

    def guest_exec(self, gpa: int, vcpu: int = 0, path: str | None = None) -> Outcome:
        """An instruction fetch at ``gpa``: the PC is set there with every general
        register but the exception doorbell's holding :data:`POISON`.

        ``ok`` when the fetch succeeded: the instruction ran, or raised an exception that
        is not a fetch fault at ``gpa`` (zeroed memory is an undefined instruction on
        both arches), or left the VM through an MMIO exit.  ``abort`` when the guest took
        a fetch exception at ``gpa``: arm64's ``kvm_handle_guest_abort`` injects a
        prefetch abort (``kvm_inject_pabt``, ESR FSC 0x10) for a fetch outside every
        memslot and, on 7.3, also for one beyond the VM's IPA size but below the
        host's; riscv 7.2 delivers an instruction access fault (scause 1).  Other
        outcomes as they come: ``KVM_RUN`` failing (EOPNOTSUPP where a riscv kernel
        refuses the fetch in ``gstage_page_fault``) is ``error``, EFAULT is
        ``fault``, a guest that loops is ``timeout``.  Instructions after the first may
        run before an exception stops the guest (no single-step): a later fetch fault
        at another address is still ``ok``."""
        if not self._reachable(gpa, 4):
            return self._unreachable(gpa, 4)
        v = self._vcpu(vcpu)
        self._enter(v, gpa, dict.fromkeys(self._poisoned(), POISON))
        out = self._run(v, until_doorbell=False)
        if out["result"] == "abort":
            if self._fetch_failed(out["_cause"], out["_address"], gpa):
                return public(out)
            return {"result": "ok"}
        if out["result"] == "mmio":
            return {"result": "ok"}
        return out

    def spin(self, vcpu: int = 0) -> Outcome:
        """Enter a guest that loops forever; the watchdog stops it (``timeout``)."""
        v = self._vcpu(vcpu)
        self._enter(v, self.entries["spin"], {})
        return public(self._run(v))

    def touch(self, gpa: int, count: int, stride: int = 4096, write: bool = True,
              vcpu: int = 0) -> Outcome:
        """One routine that reads or writes one byte every ``stride`` bytes, ``count``
        (>= 1) times from ``gpa``."""
        if count < 1:
            raise ValueError("touch needs count >= 1")
        if not self._reachable(gpa, count * stride):
            return self._unreachable(gpa, count * stride)
        v = self._vcpu(vcpu)
        self._enter(v, self.entries["touch_write" if write else "touch_read"],
                    self._routine_regs(gpa, 0, count, stride))
        return public(self._run(v))

    # --- VM steps ---------------------------------------------------------------------------

    def _vcpu_fd(self, index: int) -> VcpuFd:
        return self._vcpu(index).fd
