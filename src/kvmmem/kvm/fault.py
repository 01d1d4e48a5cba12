"""What a stage-2 fault handler decides and what a guest access ends in.

:class:`Access` is the kind of access (the fault's read/write/exec bits),
:class:`FaultResult` the handler's decision (``RET_PF_*`` on x86, the return of
``user_mem_abort`` / ``kvm_riscv_mmu_map`` and what ``kvm_handle_guest_abort`` /
``gstage_page_fault`` do with it), :class:`AccessResult` the access's outcome as
KVM_RUN reports it.  Shared by the vCPU (:mod:`kvmmem.kvm.vcpu`, which re-exports
every name) and the architectures' fault paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any


class Access(Enum):
    """The kind of guest access."""

    READ = "read"
    WRITE = "write"
    EXEC = "exec"


class Fault(Enum):
    """What a stage-2 fault handler decided."""

    RESUME = "resume"  # mapping installed (or nothing to do): re-execute
    RETRY = "retry"  # stale: an invalidation raced; re-execute and re-fault
    MMIO = "mmio"  # exit to userspace with KVM_EXIT_MMIO
    EMULATE = "emulate"  # x86 RET_PF_EMULATE: run the access through the emulator
    EFAULT = "efault"  # KVM_RUN fails with EFAULT
    ERRNO = "errno"  # KVM_RUN fails with another errno (ENOSYS, EOPNOTSUPP, ENOEXEC...)
    ABORT = "abort"  # an exception is injected into the guest
    MEMORY_FAULT = "memory_fault"  # KVM_RUN fails (errno) with KVM_EXIT_MEMORY_FAULT filled


@dataclass(slots=True)
class FaultResult:
    """A fault handler's decision; ``errno`` for ERRNO, ``abort`` names the
    injected exception for ABORT."""

    kind: Fault
    errno: str = ""
    abort: str = ""
    gpa: int = 0
    size: int = 0
    flags: int = 0
    """``kvm_run.memory_fault`` of a MEMORY_FAULT (``kvm_prepare_memory_fault_exit``)."""


def memory_fault_exit(gpa: int, size: int, flags: int, errno: str = "EFAULT") -> FaultResult:
    """``kvm_prepare_memory_fault_exit`` + the error KVM_RUN returns with it."""
    return FaultResult(Fault.MEMORY_FAULT, errno=errno, gpa=gpa, size=size, flags=flags)


RESUME = FaultResult(Fault.RESUME)
RETRY = FaultResult(Fault.RETRY)
MMIO = FaultResult(Fault.MMIO)
EMULATE = FaultResult(Fault.EMULATE)
EFAULT = FaultResult(Fault.EFAULT)


@dataclass(slots=True)
class AccessResult:
    """The outcome of one guest access, in the SCENARIOS.md vocabulary.

    ``result`` is ``ok`` (with ``value`` for reads), ``mmio`` (``gpa``,
    ``length``, ``is_write``, ``data``), ``fault`` (KVM_RUN -> EFAULT),
    ``error`` (KVM_RUN -> another ``errno``), ``abort`` (an exception was
    injected into the guest, named by ``abort``) or ``exit`` (another exit
    to userspace, ``exit_reason`` and ``suberror``); the last two extend the
    contract.

    A ``fault`` keeps the access's ``gpa`` and ``length`` here, but its outcome
    carries ``gpa``/``size``/``flags`` only when ``memory_fault`` is set: when
    the kernel fills ``kvm_run.memory_fault`` (KVM_EXIT_MEMORY_FAULT), which no
    architecture does for a failed fault on ordinary (shared) memory: x86
    ``kvm_handle_error_pfn``, arm64 ``user_mem_abort`` and riscv
    ``kvm_riscv_mmu_map`` return a bare -EFAULT (seen on x86 6.1 and 7.3 with
    TDP, arm64 7.3, riscv 7.2, and this host's KVM); only guest_memfd (private)
    faults fill it: guest_memfd faults (``kvm_gmem_get_pfn`` failing; ``flags`` 0 for
    a shared gmem-only fault)."""

    result: str
    value: int | None = None
    gpa: int = 0
    length: int = 0
    is_write: bool = False
    data: int = 0
    errno: str = ""
    abort: str = ""
    exit_reason: str = ""
    suberror: int = 0
    memory_fault: bool = False
    flags: int = 0

    def to_outcome(self) -> dict[str, Any]:
        """The outcome keys of SCENARIOS.md (without ``step``/``op``)."""
        out: dict[str, Any] = {"result": self.result}
        if self.result == "ok":
            if self.value is not None:
                out["value"] = self.value
        elif self.result == "mmio":
            out.update(gpa=self.gpa, len=self.length, is_write=self.is_write)
            if self.is_write:
                out["data"] = self.data
            elif self.value is not None:
                out["value"] = self.value
        elif self.result == "fault" and self.memory_fault:
            out["gpa"] = self.gpa
            out["size"] = self.length
            out["flags"] = self.flags
        elif self.result == "error":
            out["errno"] = self.errno
        elif self.result == "abort":
            out["abort"] = self.abort
        elif self.result == "exit":
            out["exit_reason"] = self.exit_reason
            out["suberror"] = self.suberror
        return out
