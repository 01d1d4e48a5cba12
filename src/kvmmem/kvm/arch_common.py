"""What every architecture's KVM MMU provides, and the pieces they share.

An :class:`ArchKvm` is the per-architecture half of KVM's MMU
(``arch/*/kvm/mmu.c``): the stage-2 fault handler, the notifier zap
(``kvm_unmap_gfn_range``), the memslot hooks (``kvm_arch_prepare_memory_region``,
``kvm_arch_commit_memory_region``, ``kvm_arch_flush_shadow_memslot``),
dirty-log write protection and ``KVM_PRE_FAULT_MEMORY``.  ``kvm/arm64.py``,
``kvm/x86.py`` and ``kvm/riscv.py`` implement it; ``make_arch_kvm`` picks one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmmem.errors import KernelError
from kvmmem.sync import Op
from kvmmem.types import PAGE_SHIFT, PAGE_SIZE, align_down

if TYPE_CHECKING:
    from kvmmem.kvm.memslot import KvmMrChange, MemorySlot
    from kvmmem.kvm.vcpu import Access, FaultResult, Vcpu
    from kvmmem.kvm.vm import Vm


def fault_supports_stage2_huge_mapping(slot: MemorySlot, hva: int, map_size: int) -> bool:
    """``fault_supports_stage2_huge_mapping`` (arm64; riscv's
    ``fault_supports_gstage_huge_mapping`` is the same rule): a block of
    ``map_size`` is allowed only if gpa and hva are congruent modulo the
    block and the block around ``hva`` lies inside the slot."""
    if map_size == PAGE_SIZE:
        return True
    gpa_start = slot.base_gfn << PAGE_SHIFT
    uaddr_start = slot.userspace_addr
    uaddr_end = uaddr_start + (slot.npages << PAGE_SHIFT)
    if (gpa_start & (map_size - 1)) != (uaddr_start & (map_size - 1)):
        return False
    block = align_down(hva, map_size)
    return block >= uaddr_start and block + map_size <= uaddr_end


def memslot_is_logging(slot: MemorySlot) -> bool:
    """``memslot_is_logging`` (arm64/riscv): a dirty bitmap and not read-only."""
    return slot.dirty_bitmap is not None and not slot.readonly


class ArchKvm:
    """Base class: the behaviour shared by all architectures."""

    name = "?"
    max_user_slots = 32767
    """Today's ``KVM_USER_MEM_SLOTS``; a VM's own limit follows its variant's release
    (``vm.memslots.limits.user_mem_slots``, Variant.user_mem_slots: 509/512 before v5.12)."""
    nr_address_spaces = 1
    has_pre_fault_memory = False
    """``CONFIG_KVM_GENERIC_PRE_FAULT_MEMORY``: only x86 selects it in the modelled
    kernel (the arm64 series was queued in kvmarm in 2025, not modelled)."""
    emulates_page_crossing = False
    """Whether an instruction emulator completes a page-crossing access page by page
    (x86 ``emulator_read_write_onepage``); arm64 and riscv complete or exit it whole."""
    has_emulated_path = False
    """Whether a vCPU can run every access through KVM's instruction emulator (x86's
    ``x86_emulate_instruction``: the ``emulated`` access path)."""
    walk_sets_accessed = False
    """Whether the hardware's stage-2 walk sets a leaf's accessed flag itself (x86 EPT
    with A/D bits); arm64 takes an access flag fault instead."""
    has_memory_type = True
    """Whether stage-2 leaves carry a memory type the fault path derives (invariant 3);
    the riscv G-stage has none, the platform's PMAs decide."""
    break_before_make = False
    """Whether the architecture requires break-before-make on a live leaf (arm64)."""
    default_phys_bits = 52
    """The guest-physical width the memslot hooks check against when the VM gives none."""

    # --- faults ------------------------------------------------------------

    def mmio_exit_error(self, gpa: int, length: int) -> str | None:
        """The errno with which KVM_RUN fails instead of exiting for an MMIO access of
        ``length`` bytes at ``gpa`` (``None``: the exit is made)."""
        return None

    def handle_fault(self, vm: Vm, vcpu: Vcpu, gpa: int, access: Access) -> Op[FaultResult]:
        """The stage-2 fault handler for an access that missed in the walk."""
        raise NotImplementedError

    def elide_tlb_flush_if_young(self, vm: Vm) -> bool:
        """``CONFIG_KVM_ELIDE_TLB_FLUSH_IF_YOUNG``: whether ``clear_flush_young``
        skips its TLB flush (x86 only, v6.13)."""
        return False

    # --- notifier zap ------------------------------------------------------

    def unmap_gfn_range(self, vm: Vm, slot: MemorySlot, start: int, end: int) -> bool:
        """``kvm_unmap_gfn_range``: zap leaves for gfns ``[start, end)``;
        returns whether a TLB flush is needed."""
        return vm.zap_gfn_range(start, end)

    # --- memslot hooks ---------------------------------------------------------

    def prepare_vma_walk(
        self, vm: Vm, old: MemorySlot | None, new: MemorySlot, change: KvmMrChange
    ) -> Op[None]:
        """The VMA walk of ``kvm_arch_prepare_memory_region`` (arm64, riscv);
        x86 has none.  Raises KernelError to refuse the change."""
        return
        yield  # pragma: no cover

    # --- prefault ------------------------------------------------------------

    def pre_fault_memory(self, vm: Vm, vcpu: Vcpu, gpa: int) -> Op[int]:
        """``kvm_arch_vcpu_pre_fault_memory`` for one page: bytes mapped from
        ``gpa`` (> 0) or raises KernelError.  Only reached where
        :attr:`has_pre_fault_memory` is set."""
        raise KernelError("EOPNOTSUPP", "KVM_PRE_FAULT_MEMORY",
                          f"{self.name} has no kvm_arch_vcpu_pre_fault_memory")
        yield  # pragma: no cover


def make_arch_kvm(arch: str) -> ArchKvm:
    """The :class:`ArchKvm` for ``arch`` (``x86``, ``arm64``, ``riscv``)."""
    if arch == "x86":
        from kvmmem.kvm.x86 import X86Kvm

        return X86Kvm()
    if arch == "arm64":
        from kvmmem.kvm.arm64 import Arm64Kvm

        return Arm64Kvm()
    from kvmmem.kvm.riscv import RiscvKvm

    return RiscvKvm()
