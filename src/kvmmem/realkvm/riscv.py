"""The riscv64 real-KVM harness: :class:`RiscvVm` (standard library only: it runs on the
emulated machine's bare Python).

The guest runs the routines of :mod:`kvmmem.realkvm.riscv_code` in VS-mode (``mode``
S) with ``satp`` 0 (Bare: guest virtual = guest physical, no guest page tables);
``stvec`` points at the trap handler, which reports ``scause``/``stval`` through the
exception doorbell.  Registers: ``a0`` address, ``a1`` value, ``a2`` doorbell, ``a3``
count, ``a4`` stride, ``s11`` exception doorbell (written at vCPU creation), ``pc``
each step (``KVM_SET_ONE_REG`` of ``struct kvm_riscv_core``).

KVM keeps every vCPU but 0 powered off (``KVM_MP_STATE_STOPPED``) until
``KVM_SET_MP_STATE`` makes it runnable; the harness does so when it creates one.
A load or store outside every memslot is emulated as MMIO from the trapped
instruction (``gstage_page_fault`` -> ``kvm_riscv_vcpu_mmio_load/store``), which
refuses a misaligned one: ``KVM_RUN`` fails EIO ("VCPU exit error -5" in the kernel
log).  Seen on Debian riscv64 7.2.13 under QEMU: an instruction fetch outside every
memslot reaches the guest as an instruction access fault (``abort`` ``instruction
access fault``, ``stval`` the gpa), not as an EOPNOTSUPP failure of ``KVM_RUN``.
Misaligned loads and stores inside a slot complete in the guest (QEMU performs
them; nothing traps).  The guest physical size
is the G-stage mode's (Sv57x4 59 bits, Sv48x4 50, Sv39x4 41: ``KVM_CAP_VM_GPA_BITS``
where the kernel reports it); ``ipa_bits`` other than that is
:class:`~kvmmem.realkvm.kvm.KvmUnsupported`.
"""

from __future__ import annotations

from typing import ClassVar

from kvmmem.realkvm import riscv_code as code
from kvmmem.realkvm.archvm import ArchVm, Outcome
from kvmmem.realkvm.kvm import Kvm, KvmUnsupported, VcpuFd, VmFd
from kvmmem.realkvm.structs import KVM_MP_STATE_RUNNABLE

KVM_CAP_VM_GPA_BITS = 207
"""``KVM_CHECK_EXTENSION`` on a riscv VM: the G-stage guest physical address bits."""
BARE_ADDRESS_BITS = 56
"""What the harness lets the Bare-mode guest address (the physical address size of
RV64's Sv57): beyond it a step is ``unsupported``."""


class RiscvVm(ArchVm):
    """A VM on a riscv64 kernel's KVM with the kvmmem guest harness; the constructor and
    step methods are :class:`~kvmmem.realkvm.archvm.ArchVm`'s."""

    arch: ClassVar[str] = "riscv"

    def _create_vm(self, kvm: Kvm) -> VmFd:
        vm = kvm.create_vm(0)
        gpa_bits = vm.check_extension(KVM_CAP_VM_GPA_BITS)
        if self.ipa_bits is not None and gpa_bits and self.ipa_bits != gpa_bits:
            vm.close()
            raise KvmUnsupported(f"this riscv KVM's G-stage translates {gpa_bits} guest "
                                 f"physical bits, not {self.ipa_bits}")
        self.phys_bits = gpa_bits or self.ipa_bits or 50
        return vm

    def _program(self) -> tuple[bytes, dict[str, int]]:
        prog = code.assemble()
        return prog.code, prog.entries

    def _init_vcpu(self, fd: VcpuFd) -> None:
        """Make the vCPU runnable (vCPUs other than 0 start STOPPED), S mode, Bare
        translation, ``stvec`` at the trap handler, the exception doorbell in ``s11``."""
        if fd.vcpu_id:
            fd.set_mp_state(KVM_MP_STATE_RUNNABLE)
        fd.set_one_reg(code.REG_MODE, code.KVM_RISCV_MODE_S)
        fd.set_one_reg(code.csr_reg_id("satp"), 0)
        fd.set_one_reg(code.csr_reg_id("stvec"), self.entries["trap"])
        fd.set_one_reg(code.x_reg_id(code.R_EXC_DOORBELL), self.exc_doorbell)

    def _routine_reg_ids(self) -> tuple[int, ...]:
        return tuple(code.x_reg_id(n) for n in code.ROUTINE_REGS)

    def _pc_id(self) -> int:
        return code.REG_PC

    def _reachable(self, gpa: int, size: int) -> bool:
        return gpa >= 0 and gpa + max(size, 1) <= 1 << BARE_ADDRESS_BITS

    def _exception(self, cause: int, address: int) -> Outcome:
        return {"result": "abort", "abort": code.describe_cause(cause),
                "scause": cause, "stval": address}

    def _fetch_failed(self, cause: int, address: int, gpa: int) -> bool:
        return code.is_fetch_fault(cause) and address == gpa

    def _poisoned(self) -> tuple[int, ...]:
        return tuple(code.x_reg_id(n) for n in range(1, 32) if n != code.R_EXC_DOORBELL)
