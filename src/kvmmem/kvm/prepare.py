"""The prepare-time VMA walk of ``kvm_arch_prepare_memory_region``, shared by
arm64 and riscv: the 2019 arm code (virt/kvm/arm/mmu.c), which RISC-V copied into
arch/riscv/kvm/mmu.c.  Each architecture's ``prepare_vma_walk`` calls it with the
checks its release keeps (kvmmem.variants): EPERM for a writable slot over a VMA
without VM_WRITE, EINVAL for dirty logging over VM_PFNMAP, arm64's v6.17 cacheable
PFNMAP check, and the premap of VM_PFNMAP ranges (arm64 ``kvm_phys_addr_ioremap``
until v5.14, riscv ``kvm_riscv_gstage_ioremap`` until v6.18).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmmem.errors import KernelError
from kvmmem.host.vma import VM_PFNMAP, VM_WRITE
from kvmmem.kvm.memslot import KVM_MEM_LOG_DIRTY_PAGES, KvmMrChange
from kvmmem.sync import Op, acquire, release

if TYPE_CHECKING:
    from collections.abc import Callable

    from kvmmem.host.vma import Vma
    from kvmmem.kvm.kvm_host import Kvm
    from kvmmem.kvm.memslot import MemorySlot


def prepare_vma_walk(vm: Kvm, new: MemorySlot, change: KvmMrChange | str, *, premap: bool,
                     check_write: bool, refuse_cacheable_pfnmap: bool = False,
                     refuse_mte: Callable[[Vma], bool] | None = None) -> Op[None]:
    """The prepare-time VMA walk shared by arm64 and riscv (v5.4 arm code,
    copied into riscv): per-VMA EPERM / EINVAL checks and, when ``premap``,
    the 4K Device premap of VM_PFNMAP ranges.  ``refuse_cacheable_pfnmap``: arm64
    v6.17+ on a CPU without FWB and DIC, EINVAL for a VM_PFNMAP VMA whose memory type
    is cacheable (``kvm_vma_is_cacheable``).  ``refuse_mte``: an arm64 MTE VM's test of
    each VMA (EINVAL where it says so: VM_SHARED from v5.14, no VM_MTE_ALLOWED from
    v6.2), made before the VM_PFNMAP checks.  (The IPA-range check before it is
    ``ArchKvm.prepare_memory_region``'s.)"""
    writable = not new.readonly
    refuse = vm.prepare_vma_checks
    hva: int = new.userspace_addr
    page_shift = new.page_shift
    reg_end = hva + (new.npages << page_shift)
    premapped: list[tuple[int, int]] = []
    yield acquire("mmap_lock", shared=True)
    failed: KernelError | None = None
    try:
        while hva < reg_end:
            vma = vm.mm.find_vma(hva)
            if vma is None or vma.start >= reg_end:
                break
            if refuse and check_write and writable and not vma.flags & VM_WRITE:
                raise KernelError("EPERM", "KVM_SET_USER_MEMORY_REGION",
                                  f"writable slot over a VMA without VM_WRITE at {vma.start:#x}")
            if refuse and refuse_mte is not None and refuse_mte(vma):
                raise KernelError("EINVAL", "KVM_SET_USER_MEMORY_REGION",
                                  f"an MTE VM and a VMA it may not tag at {vma.start:#x}")
            vm_start = max(hva, vma.start)
            vm_end = min(reg_end, vma.end)
            if vma.flags & VM_PFNMAP:
                if refuse and new.flags & KVM_MEM_LOG_DIRTY_PAGES:
                    raise KernelError("EINVAL", "KVM_SET_USER_MEMORY_REGION",
                                      "dirty logging requested over a VM_PFNMAP VMA")
                if refuse and refuse_cacheable_pfnmap and vma.cacheable:
                    raise KernelError("EINVAL", "KVM_SET_USER_MEMORY_REGION",
                                      "a cacheable VM_PFNMAP VMA and no FWB+DIC "
                                      "(kvm_supports_cacheable_pfnmap)")
                if premap:
                    gpa = (new.base_gfn << page_shift) + (vm_start - new.userspace_addr)
                    pa = (vma.pgoff << page_shift) + (vm_start - vma.start)
                    premapped.append((gpa, vm_end - vm_start))
                    kvm_phys_addr_ioremap(vm, new, gpa, pa, vm_end - vm_start, writable)
            hva = vm_end
    except KernelError as err:
        failed = err
        if premapped and change != KvmMrChange.FLAGS_ONLY:
            # On error the whole region's I/O mappings are undone.
            vm.zap_gfn_range(new.base_gfn, new.base_gfn + new.npages)
    yield release("mmap_lock", shared=True)
    if failed is not None:
        raise failed


def kvm_phys_addr_ioremap(vm: Kvm, slot: MemorySlot, gpa: int, pa: int, size: int,
                          writable: bool) -> None:
    """v5.4 ``kvm_phys_addr_ioremap``: page-sized (``PAGE_SIZE``, the host's) Device
    stage-2 PTEs for ``[gpa, gpa+size)`` -> ``pa``, writable if the slot is, installed
    under mmu_lock but outside the invalidation protocol; -EFAULT if a valid PTE
    is already there (``KVM_S2PTE_FLAG_IS_IOMAP``)."""
    page_shift = slot.page_shift
    page_size = 1 << page_shift
    for off in range(0, size, page_size):
        if vm.stage2.walk(gpa + off) is not None:
            raise KernelError("EFAULT", "KVM_SET_USER_MEMORY_REGION",
                              f"ioremap: gpa {gpa + off:#x} is already mapped")
        vm.install(slot, gpa + off, (pa + off) >> page_shift, page_size, write=writable,
                   execute=False, device=True, access=None)
        vm.stats.premapped_pages += 1
