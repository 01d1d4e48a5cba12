"""The architectures by name, and the memslot layer's hooks that delegate to them.

:func:`make_arch_kvm` gives the :class:`~kvmmem.kvm.kvm_host.ArchKvm` of an
architecture name.  :class:`ArchMemslotHooks` is what the memslot code
(:mod:`kvmmem.kvm.memslot`) calls for ``kvm_arch_prepare_memory_region``,
``kvm_arch_commit_memory_region`` and ``kvm_arch_flush_shadow_memslot``: it
delegates each to the architecture's method, which decides, and supplies the
stage-2 primitives those methods use (no-ops here; the VM overrides them,
:class:`kvmmem.kvm.vm.VmMemslotHooks`) and the VM's options.
"""

from __future__ import annotations

from kvmmem.errors import InputError
from kvmmem.kvm.arm64 import Arm64Kvm
from kvmmem.kvm.kvm_host import ArchKvm
from kvmmem.kvm.memslot import KvmMrChange, MemorySlot, NoopMemslotHooks
from kvmmem.kvm.riscv import RiscvKvm
from kvmmem.kvm.x86 import X86Kvm
from kvmmem.sync import Op
from kvmmem.variants import UPSTREAM, Variant

ARCH_KVM: dict[str, type[ArchKvm]] = {"x86": X86Kvm, "arm64": Arm64Kvm, "riscv": RiscvKvm}


def make_arch_kvm(arch: str) -> ArchKvm:
    """The :class:`ArchKvm` for ``arch`` (``x86``, ``arm64``, ``riscv``); raises
    :class:`InputError` for another name."""
    cls = ARCH_KVM.get(arch)
    if cls is None:
        raise InputError(f"unknown architecture {arch!r} (known: {', '.join(ARCH_KVM)})")
    return cls()


def _nothing() -> Op[None]:
    return
    yield  # pragma: no cover


class ArchMemslotHooks(NoopMemslotHooks):
    """The memslot hooks of one architecture: each ``kvm_arch_*`` hook is the
    architecture's method (``X86Kvm.commit_memory_region``...); the stage-2 work is
    left to the overridable no-op methods below (the VM subclasses this).

    ``phys_bits``: x86 max GPA bits (52 with shadow paging, MAXPHYADDR with TDP),
    arm64 IPA bits (``KVM_VM_TYPE_ARM_IPA_SIZE``, default 40), riscv G-stage GPA bits
    (Sv39x4 41, Sv48x4 50, Sv57x4 59); default the architecture's
    :attr:`~kvmmem.kvm.kvm_host.ArchKvm.default_phys_bits`.  ``slot_zap_all``
    (x86 ``KVM_X86_QUIRK_SLOT_ZAP_ALL``), ``eager_page_split``, ``pml`` (x86) and
    ``external_page_track`` (x86) are the VM's options the hooks read."""

    def __init__(
        self,
        arch: str | ArchKvm,
        variant: Variant = UPSTREAM,
        *,
        phys_bits: int | None = None,
        slot_zap_all: bool = True,
        eager_page_split: bool = True,
        pml: bool = False,
        external_page_track: bool = False,
    ) -> None:
        self.arch_kvm = make_arch_kvm(arch) if isinstance(arch, str) else arch
        self.arch = self.arch_kvm.name
        self.variant = variant
        self.phys_bits = phys_bits if phys_bits is not None else self.arch_kvm.default_phys_bits
        self.slot_zap_all = slot_zap_all
        self.eager_page_split = eager_page_split
        self.pml = pml
        self.external_page_track = external_page_track
        self.manual_protect_init_set = False

    # --- state the VM may override ------------------------------------------------------

    def kvm_dirty_log_manual_protect_and_init_set(self) -> bool:
        """``kvm_dirty_log_manual_protect_and_init_set()``."""
        return self.manual_protect_init_set

    # --- stage-2 primitives (no-ops; the VM implements them) ---------------------------

    def prepare_vma_walk(self, old: MemorySlot | None, new: MemorySlot,
                         change: KvmMrChange) -> Op[None]:
        """arm64/riscv prepare's VMA walk (may raise ``EPERM``/``EINVAL``)."""
        return _nothing()

    def zap_all(self) -> Op[None]:
        """x86 ``kvm_mmu_zap_all_fast()``: obsolete every root."""
        return _nothing()

    def zap_memslot(self, slot: MemorySlot) -> Op[None]:
        """Zap ``slot``'s range: x86 ``kvm_mmu_zap_memslot``, arm64
        ``unmap_stage2_range``, riscv ``kvm_riscv_gstage_unmap_range`` (with
        their TLB flushes)."""
        return _nothing()

    def write_protect_memslot(self, slot: MemorySlot, min_level: int) -> Op[None]:
        """Remove write access from ``slot``'s leaves of ``min_level`` and up:
        x86 ``kvm_mmu_slot_remove_write_access``, arm64
        ``kvm_mmu_wp_memory_region``, riscv ``mmu_wp_memory_region`` (arm64 and
        riscv flush TLBs inside)."""
        return _nothing()

    def clear_dirty_memslot(self, slot: MemorySlot) -> Op[None]:
        """x86 with PML: ``kvm_mmu_slot_leaf_clear_dirty``."""
        return _nothing()

    def split_memslot(self, slot: MemorySlot) -> Op[None]:
        """Eager split of huge leaves: x86 ``kvm_mmu_slot_try_split_huge_pages``,
        arm64 ``kvm_mmu_split_memory_region`` (a no-op unless the VM set an
        eager-split chunk size), riscv ``mmu_split_memory_region``."""
        return _nothing()

    def recover_huge_pages(self, slot: MemorySlot) -> Op[None]:
        """x86 ``kvm_mmu_recover_huge_pages``: let huge mappings come back."""
        return _nothing()

    def flush_remote_tlbs_memslot(self, slot: MemorySlot) -> Op[None]:
        """``kvm_flush_remote_tlbs_memslot()``."""
        return _nothing()

    # --- the hooks: the architecture's methods -------------------------------------------

    def prepare_memory_region(self, old: MemorySlot | None, new: MemorySlot | None,
                              change: KvmMrChange) -> Op[None]:
        """``kvm_arch_prepare_memory_region()``: the architecture's."""
        return self.arch_kvm.prepare_memory_region(self, old, new, change)

    def flush_shadow_memslot(self, slot: MemorySlot) -> Op[None]:
        """``kvm_arch_flush_shadow_memslot()``: the architecture's."""
        return self.arch_kvm.flush_shadow_memslot(self, slot)

    def commit_memory_region(self, old: MemorySlot | None, new: MemorySlot | None,
                             change: KvmMrChange) -> Op[None]:
        """``kvm_arch_commit_memory_region()``: the architecture's."""
        return self.arch_kvm.commit_memory_region(self, old, new, change)
