"""The arm64 real-KVM harness: :class:`Arm64Vm` (standard library only: it runs on the
emulated machine's bare Python).

The guest runs the routines of :mod:`kvmmem.realkvm.arm64_code` at EL1h with DAIF
masked (``PSTATE`` 0x3c5) and the stage-1 MMU on: an identity map of 1 GiB Normal
write-back blocks over every GiB a step touches (tables in the harness slot,
``TTBR0_EL1``; ``TCR_EL1`` 48-bit VA, 4 KiB granule, IPS 48; ``SCTLR_EL1`` M, C, I on
and A off), so unaligned and page-crossing accesses reach stage 2 whole.  Exceptions
go to the vectors at ``VBAR_EL1``, which report ``ESR_EL1``/``FAR_EL1`` through the
exception doorbell.

Registers: ``X0`` address, ``X1`` value, ``X2`` doorbell, ``X3`` count, ``X4`` stride,
``X28`` exception doorbell (written at vCPU creation), ``PC``, ``PSTATE`` each step
(``KVM_SET_ONE_REG`` of the core registers).

IPA size: ``ipa_bits=None`` creates a VM of type 0, KVM's default 40-bit IPA, which
is also the model's arm64 default (``kvmmem.arch.arm64``); any other value asks
``KVM_VM_TYPE_ARM_IPA_SIZE(ipa_bits)`` and needs ``KVM_CAP_ARM_VM_IPA_SIZE`` to
report at least that many bits (48 on the emulated machines).  A guest access at or
beyond 2^ipa_bits is answered by an injected exception: ``kvm_inject_size_fault``
(``abort`` ``address size fault``) beyond the host's IPA limit; between the VM's IPA
size and that limit, Debian 7.3.4 injected a synchronous external abort (ESR FSC
0x10: ``abort`` ``data abort`` for a load or store, ``prefetch abort`` for a fetch)
where the model says ``address size fault``.  An instruction fetch outside every
memslot gets ``kvm_inject_pabt``: ``abort`` ``prefetch abort``; a load or store there
is ``io_mem_abort``'s ``KVM_EXIT_MMIO`` with the length from the syndrome
(ESR_EL2.SAS).
"""

from __future__ import annotations

from typing import ClassVar

from kvmmem.realkvm import arm64_code as code
from kvmmem.realkvm.archvm import ArchVm, Outcome
from kvmmem.realkvm.harness import HARNESS_SLOT_SIZE
from kvmmem.realkvm.ioctls import KVM_CAP_ARM_VM_IPA_SIZE
from kvmmem.realkvm.kvm import Kvm, KvmUnsupported, VcpuFd, VmFd

DEFAULT_IPA_BITS = 40
"""KVM's IPA size for a VM of type 0 (``KVM_PHYS_SHIFT``) and the model's default."""
TABLES_OFFSET = code.PAGE_SIZE
"""The stage-1 tables follow the code page in the harness slot."""


def vm_type(ipa_bits: int | None) -> int:
    """The ``KVM_CREATE_VM`` type for ``ipa_bits`` (``KVM_VM_TYPE_ARM_IPA_SIZE``: the low
    byte; 0 for the default)."""
    return 0 if ipa_bits is None else ipa_bits & 0xFF


class Arm64Vm(ArchVm):
    """A VM on an arm64 kernel's KVM with the kvmmem guest harness; the constructor and
    step methods are :class:`~kvmmem.realkvm.archvm.ArchVm`'s."""

    arch: ClassVar[str] = "arm64"

    _tables: code.Stage1Tables | None = None
    _target: tuple[int, tuple[int, ...]] | None = None

    def _create_vm(self, kvm: Kvm) -> VmFd:
        if self.ipa_bits is not None and self.ipa_bits != DEFAULT_IPA_BITS:
            limit = kvm.check_extension(KVM_CAP_ARM_VM_IPA_SIZE)
            if not 32 <= self.ipa_bits <= limit:
                raise KvmUnsupported(
                    f"a {self.ipa_bits}-bit IPA needs KVM_CAP_ARM_VM_IPA_SIZE >= "
                    f"{self.ipa_bits} (and >= 32); this kernel reports {limit}")
        self.phys_bits = self.ipa_bits or DEFAULT_IPA_BITS
        vm = kvm.create_vm(vm_type(None if self.phys_bits == DEFAULT_IPA_BITS
                                   else self.phys_bits))
        self._target = vm.preferred_target()
        return vm

    def _program(self) -> tuple[bytes, dict[str, int]]:
        prog = code.assemble()
        return prog.code, prog.entries

    def _place(self, hva: int) -> None:
        self._tables = code.Stage1Tables(self.layout.gpa + TABLES_OFFSET, hva + TABLES_OFFSET,
                                         HARNESS_SLOT_SIZE - TABLES_OFFSET)
        self._tables.map_gib(self.layout.gpa >> 30)
        self._tables.map_gib(self.layout.doorbell >> 30)

    def _init_vcpu(self, fd: VcpuFd) -> None:
        """``KVM_ARM_VCPU_INIT`` with the preferred target and no features (every vCPU
        powered on), then the EL1 MMU and vector registers and the exception doorbell."""
        assert self._target is not None and self._tables is not None
        fd.arm_vcpu_init(self._target[0])
        for reg, value in ((code.MAIR_EL1, code.MAIR_VALUE), (code.TCR_EL1, code.TCR_VALUE),
                           (code.TTBR0_EL1, self._tables.ttbr0),
                           (code.VBAR_EL1, self.entries["vectors"]),
                           (code.SCTLR_EL1, code.SCTLR_VALUE)):
            fd.set_one_reg(reg.one_reg_id, value)
        fd.set_one_reg(code.x_reg_id(code.X_EXC_DOORBELL), self.exc_doorbell)

    def _routine_reg_ids(self) -> tuple[int, ...]:
        return tuple(code.x_reg_id(n) for n in code.ROUTINE_REGS)

    def _pc_id(self) -> int:
        return code.REG_PC

    def _entry_regs(self) -> dict[int, int]:
        return {code.REG_PSTATE: code.PSTATE_EL1H_MASKED}

    def _reachable(self, gpa: int, size: int) -> bool:
        """Below 2^48 (the guest's virtual address size): map the GiBs first."""
        assert self._tables is not None
        end = gpa + max(size, 1)
        if gpa < 0 or end > 1 << code.VA_BITS:
            return False
        for gib in range(gpa >> 30, ((end - 1) >> 30) + 1):
            self._tables.map_gib(gib)
        return True

    def _exception(self, cause: int, address: int) -> Outcome:
        return {"result": "abort", "abort": code.describe_exception(cause),
                "esr": cause, "far": address}

    def _fetch_failed(self, cause: int, address: int, gpa: int) -> bool:
        return code.is_instruction_abort(cause) and address == gpa

    def _poisoned(self) -> tuple[int, ...]:
        return tuple(code.x_reg_id(n) for n in range(31) if n != code.X_EXC_DOORBELL)

    def esr_far(self, vcpu: int = 0) -> tuple[int, int]:
        """``(ESR_EL1, FAR_EL1)`` of vCPU ``vcpu`` as KVM holds them (diagnostics)."""
        v = self._vcpu(vcpu)
        return (v.fd.get_one_reg(code.ESR_EL1.one_reg_id),
                v.fd.get_one_reg(code.FAR_EL1.one_reg_id))
