"""Where to read, in the kernel, each model function an explanation shows.

``kvmmem run --explain`` prints the path a step took as a tree of kernel functions
(:mod:`kvmmem.report.explain`).  The tree is recorded from the code that computes the
outcome, so nothing here describes logic: this table only says, for the model
functions that mirror a kernel function, which function that is, in which file of the
modelled release it lives, and which of the function's local variables are the facts
it decided on (shown when it returns).

A model function appears in an explanation only if it is listed here; helpers that
decide nothing (accessors, pure arithmetic) are left out on purpose.  The test
``tests/report/test_explain.py`` checks that every entry exists and that its
docstring names the kernel function given here.

Files moved over the releases the model covers (5.4 .. 7.3); each move is given with
the first release that has the new path:

* arm64 KVM: ``virt/kvm/arm/`` until v5.7, ``arch/arm64/kvm/`` from v5.8 ("KVM: arm64:
  Move virt/kvm/arm to arch/arm64", Marc Zyngier);
* x86 MMU: ``arch/x86/kvm/mmu.c`` until v5.5, ``arch/x86/kvm/mmu/mmu.c`` from v5.6
  (release believed); the TDP MMU (``arch/x86/kvm/mmu/tdp_mmu.c``) from v5.10;
* the VMA code of munmap: ``mm/mmap.c`` until v6.11, ``mm/vma.c`` from v6.12
  (release believed);
* ``hva_to_pfn_remapped`` reads the PFNMAP PTE with ``follow_pfn`` until v5.11,
  ``follow_pte`` from v5.12 (bd2fae8da794) and ``follow_pfnmap_start`` from v6.12.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import CodeType
from typing import Any

Release = tuple[int, int]

_ARM64_MOVE: Release = (5, 8)
_X86_MMU_MOVE: Release = (5, 6)
_MM_VMA_C: Release = (6, 12)


def _arm64(path: str) -> tuple[tuple[Release, str], ...]:
    """``arch/arm64/kvm/PATH`` from v5.8, ``virt/kvm/arm/PATH`` before."""
    return ((_ARM64_MOVE, f"arch/arm64/kvm/{path}"), ((0, 0), f"virt/kvm/arm/{path}"))


_X86_MMU = ((_X86_MMU_MOVE, "arch/x86/kvm/mmu/mmu.c"), ((0, 0), "arch/x86/kvm/mmu.c"))
_KVM_MAIN = "virt/kvm/kvm_main.c"


@dataclass(frozen=True, slots=True)
class Source:
    """One model function's kernel counterpart.

    ``files``: ``(first release, path)`` pairs, newest first (one plain path when the
    file never moved).  ``names``: the same for the function's name where it changed,
    else the one name.  ``facts``: local variables shown when the function returns
    (those not bound on the path taken are skipped).  ``arch``: per-architecture
    ``(name, path)`` overrides for a shared model function (the vCPU run loop)."""

    names: tuple[tuple[Release, str], ...]
    files: tuple[tuple[Release, str], ...]
    facts: tuple[str, ...] = ()
    arch: dict[str, tuple[str, str]] = field(default_factory=dict)

    def name_at(self, release: Release, arch: str) -> str:
        if arch in self.arch:
            return self.arch[arch][0]
        return _at(self.names, release)

    def file_at(self, release: Release, arch: str) -> str:
        if arch in self.arch:
            return self.arch[arch][1]
        return _at(self.files, release)


def _at(history: tuple[tuple[Release, str], ...], release: Release) -> str:
    for first, value in history:
        if release >= first:
            return value
    return history[-1][1]


def _s(name: str | tuple[tuple[Release, str], ...],
       file: str | tuple[tuple[Release, str], ...], *facts: str,
       arch: dict[str, tuple[str, str]] | None = None) -> Source:
    names = ((((0, 0), name),) if isinstance(name, str) else name)
    files = ((((0, 0), file),) if isinstance(file, str) else file)
    return Source(names, files, facts, arch or {})


SOURCES: dict[str, Source] = {
    # --- the vCPU: KVM_RUN's exit handling, per architecture --------------------------
    "kvmmem.kvm.vcpu:Vcpu._fragment_op": _s(
        "kvm_arch_vcpu_ioctl_run", "arch/arm64/kvm/arm.c",
        arch={"x86": ("vcpu_enter_guest", "arch/x86/kvm/x86.c"),
              "arm64": ("handle_exit", "arch/arm64/kvm/handle_exit.c"),
              "riscv": ("kvm_riscv_vcpu_exit", "arch/riscv/kvm/vcpu_exit.c")}),
    "kvmmem.kvm.vcpu:Vcpu._emulated_op": _s(
        "emulator_read_write", "arch/x86/kvm/x86.c", "slot", "hva"),
    "kvmmem.kvm.prefault:kvm_vcpu_pre_fault_memory_op": _s(
        "kvm_vcpu_pre_fault_memory", _KVM_MAIN, "left"),
    # --- arm64 ---------------------------------------------------------------------
    "kvmmem.kvm.arm64:Arm64Kvm.handle_fault": _s(
        "kvm_handle_guest_abort", _arm64("mmu.c"), "slot", "write", "leaf"),
    "kvmmem.kvm.arm64:Arm64Kvm.user_mem_abort": _s(
        "user_mem_abort", _arm64("mmu.c"), "hva", "vma", "logging", "size", "force_pte",
        "mmu_seq", "writable", "device", "pfn"),
    "kvmmem.kvm.arm64:Arm64Kvm.gmem_abort": _s(
        "gmem_abort", _arm64("mmu.c"), "pfn", "writable"),
    "kvmmem.kvm.arm64:get_vma_page_shift": _s("get_vma_page_shift", _arm64("mmu.c")),
    "kvmmem.kvm.arch_common:fault_supports_stage2_huge_mapping": _s(
        "fault_supports_stage2_huge_mapping", _arm64("mmu.c"), "map_size"),
    "kvmmem.kvm.arch_common:transparent_hugepage_adjust": _s(
        "transparent_hugepage_adjust", _arm64("mmu.c")),
    "kvmmem.kvm.arm64:stage2_map": _s(
        "kvm_pgtable_stage2_map", _arm64("hyp/pgtable.c"), "size", "write", "device", "old"),
    "kvmmem.kvm.prepare:prepare_vma_walk": _s(
        "kvm_arch_prepare_memory_region", _arm64("mmu.c"), "vma", "writable",
        arch={"riscv": ("kvm_arch_prepare_memory_region", "arch/riscv/kvm/mmu.c")}),
    # --- x86 -------------------------------------------------------------------------
    "kvmmem.kvm.x86:X86Kvm.handle_fault": _s("kvm_mmu_page_fault", _X86_MMU),
    "kvmmem.kvm.x86:X86Kvm.tdp_page_fault": _s(
        "kvm_tdp_mmu_page_fault", _X86_MMU, "slot", "private", "mmu_seq", "fin", "size",
        "device"),
    "kvmmem.kvm.x86:X86Kvm.tdp_mmu_map": _s(
        "kvm_tdp_mmu_map", "arch/x86/kvm/mmu/tdp_mmu.c", "size", "write", "device"),
    "kvmmem.kvm.x86:X86Kvm.hugepage_adjust": _s("kvm_mmu_hugepage_adjust", _X86_MMU, "host"),
    "kvmmem.kvm.x86:is_page_fault_stale": _s("is_page_fault_stale", _X86_MMU),
    "kvmmem.kvm.x86:X86Kvm.pre_fault_memory": _s("kvm_arch_vcpu_pre_fault_memory", _X86_MMU),
    "kvmmem.kvm.x86:X86Kvm.prepare_memory_region": _s(
        "kvm_arch_prepare_memory_region", "arch/x86/kvm/x86.c"),
    "kvmmem.kvm.x86:X86Kvm.commit_memory_region": _s(
        "kvm_arch_commit_memory_region", "arch/x86/kvm/x86.c"),
    # --- riscv -----------------------------------------------------------------------
    "kvmmem.kvm.riscv:RiscvKvm.handle_fault": _s(
        "gstage_page_fault", "arch/riscv/kvm/vcpu_exit.c", "slot", "write"),
    "kvmmem.kvm.riscv:RiscvKvm.kvm_riscv_mmu_map": _s(
        "kvm_riscv_mmu_map", "arch/riscv/kvm/mmu.c", "hva", "vma", "logging", "size",
        "mmu_seq", "writable"),
    "kvmmem.kvm.riscv:gstage_mapping_size": _s("kvm_riscv_mmu_map", "arch/riscv/kvm/mmu.c"),
    # --- generic fault-in (virt/kvm/kvm_main.c) ----------------------------------------
    "kvmmem.kvm.faultin:kvm_faultin_pfn": _s(
        "__kvm_faultin_pfn", _KVM_MAIN, "hva", "slot_writable"),
    "kvmmem.kvm.faultin:hva_to_pfn": _s("hva_to_pfn", _KVM_MAIN, "vma"),
    "kvmmem.kvm.faultin:hva_to_pfn_remapped": _s(
        "hva_to_pfn_remapped", _KVM_MAIN, "entry", "pte_writable"),
    "kvmmem.kvm.memory_slot:mark_page_dirty_in_slot": _s("mark_page_dirty_in_slot", _KVM_MAIN),
    "kvmmem.kvm.guest_memfd:kvm_gmem_get_pfn": _s("kvm_gmem_get_pfn", "virt/kvm/guest_memfd.c"),
    "kvmmem.kvm.mmu_notifier:mmu_invalidate_retry": _s(
        "mmu_invalidate_retry", "include/linux/kvm_host.h"),
    "kvmmem.kvm.mmu_notifier:mmu_invalidate_retry_gfn": _s(
        "mmu_invalidate_retry_gfn", "include/linux/kvm_host.h"),
    # --- memslots ------------------------------------------------------------------------
    "kvmmem.kvm.memslot:kvm_vm_ioctl_set_memory_region": _s(
        "kvm_vm_ioctl_set_memory_region", _KVM_MAIN),
    "kvmmem.kvm.memslot:kvm_set_memory_region": _s(
        "kvm_set_memory_region", _KVM_MAIN, "change"),
    "kvmmem.kvm.memslot:kvm_set_memslot": _s("kvm_set_memslot", _KVM_MAIN, "change"),
    "kvmmem.kvm.memslot:check_memory_region_flags": _s("check_memory_region_flags", _KVM_MAIN),
    "kvmmem.kvm.memslot:kvm_check_memslot_overlap": _s("kvm_check_memslot_overlap", _KVM_MAIN),
    "kvmmem.kvm.guest_memfd:kvm_gmem_bind": _s("kvm_gmem_bind", "virt/kvm/guest_memfd.c"),
    # --- dirty logging ---------------------------------------------------------------
    "kvmmem.kvm.dirty_log:kvm_get_dirty_log": _s(
        "kvm_get_dirty_log_protect", _KVM_MAIN, "offsets"),
    "kvmmem.kvm.dirty_log:kvm_clear_dirty_log": _s(
        "kvm_clear_dirty_log_protect", _KVM_MAIN, "offsets"),
    "kvmmem.kvm.dirty_log:kvm_vm_ioctl_enable_cap": _s(
        "kvm_vm_ioctl_enable_cap_generic", _KVM_MAIN),
    "kvmmem.kvm.dirty_ring:kvm_dirty_ring_push": _s("kvm_dirty_ring_push", "virt/kvm/dirty_ring.c"),
    "kvmmem.kvm.dirty_ring:kvm_vm_ioctl_reset_dirty_pages": _s(
        "kvm_vm_ioctl_reset_dirty_pages", _KVM_MAIN),
    # --- MMU notifiers -----------------------------------------------------------------
    "kvmmem.kvm.mmu_notifier:KvmMmuNotifier.invalidate_range_start": _s(
        "kvm_mmu_notifier_invalidate_range_start", _KVM_MAIN),
    "kvmmem.kvm.mmu_notifier:KvmMmuNotifier.invalidate_range_end": _s(
        "kvm_mmu_notifier_invalidate_range_end", _KVM_MAIN),
    "kvmmem.kvm.mmu_notifier:kvm_mmu_unmap_gfn_range": _s("kvm_mmu_unmap_gfn_range", _KVM_MAIN),
    # --- the host mm ---------------------------------------------------------------------
    "kvmmem.host.gup:gup_fast": _s("gup_fast", "mm/gup.c"),
    "kvmmem.host.gup:get_user_pages_unlocked_op": _s(
        "get_user_pages_unlocked", "mm/gup.c", "vma", "pfn"),
    "kvmmem.host.gup:fixup_user_fault_op": _s("fixup_user_fault", "mm/gup.c", "vma"),
    "kvmmem.host.gup:follow_pfnmap": _s(
        (((6, 12), "follow_pfnmap_start"), ((5, 12), "follow_pte"), ((0, 0), "follow_pfn")),
        "mm/memory.c"),
    "kvmmem.host.memory:handle_mm_fault_op": _s("handle_mm_fault", "mm/memory.c"),
    "kvmmem.host.memory:do_wp_page_op": _s("do_wp_page", "mm/memory.c"),
    "kvmmem.host.mmap:mmap_op": _s("do_mmap", "mm/mmap.c"),
    "kvmmem.host.mmap:munmap_op": _s(
        "do_vmi_munmap", (((_MM_VMA_C), "mm/vma.c"), ((0, 0), "mm/mmap.c"))),
    "kvmmem.host.mprotect:mprotect_op": _s("do_mprotect_pkey", "mm/mprotect.c"),
    "kvmmem.host.mprotect:change_protection_op": _s("change_protection", "mm/mprotect.c"),
    "kvmmem.host.madvise:madvise_op": _s("do_madvise", "mm/madvise.c"),
    "kvmmem.host.notifier:MmuNotifierSubscriptions.invalidate_range_start": _s(
        "mmu_notifier_invalidate_range_start", "mm/mmu_notifier.c"),
    "kvmmem.host.notifier:MmuNotifierSubscriptions.invalidate_range_end": _s(
        "mmu_notifier_invalidate_range_end", "mm/mmu_notifier.c"),
    "kvmmem.host.truncate:vfs_fallocate_op": _s("vfs_fallocate", "fs/open.c"),
    # --- drivers -------------------------------------------------------------------------
    "kvmmem.host.vfio:vfio_pci_core_mmap": _s(
        "vfio_pci_core_mmap", "drivers/vfio/pci/vfio_pci_core.c"),
    "kvmmem.host.vfio:vfio_pci_mmap_fault": _s(
        (((6, 12), "vfio_pci_mmap_page_fault"), ((0, 0), "vfio_pci_mmap_fault")),
        "drivers/vfio/pci/vfio_pci_core.c"),
    "kvmmem.host.vfio:vfio_pci_mmap_huge_fault": _s(
        "vfio_pci_mmap_huge_fault", "drivers/vfio/pci/vfio_pci_core.c", "size"),
}
"""``"module:Qualified.name"`` of a model function -> its kernel source."""


def resolve(target: str) -> Callable[..., Any]:
    """The function ``"module:Qualified.name"`` names (a method through its class)."""
    module_name, _, qualname = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return getattr(obj, "__func__", obj)  # type: ignore[no-any-return]


def code_table() -> dict[CodeType, Source]:
    """The code object of every listed function -> its :class:`Source`."""
    return {resolve(target).__code__: source for target, source in SOURCES.items()}
