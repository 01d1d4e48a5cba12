"""RISC-V KVM MMU: ``gstage_page_fault`` and ``kvm_riscv_mmu_map`` of
arch/riscv/kvm/vcpu_exit.c and arch/riscv/kvm/mmu.c (kernel-semantics.md
§2.4, §3.4).

``kvm_arch_prepare_memory_region`` keeps, upstream, the checks RISC-V copied
from the 2019 arm code: the ``>=`` IPA check, EPERM for a writable slot over
a VMA without VM_WRITE and EINVAL for dirty logging over VM_PFNMAP.  The
premapping of VM_PFNMAP ranges (``kvm_riscv_gstage_ioremap``) existed from
v5.16 until 8c5fa3764fac removed it for v6.18 (``riscv_prepare_premap``,
kvmmem.variants).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmmem.host.vma import VM_PFNMAP
from kvmmem.kvm.arch_common import (
    fault_supports_stage2_huge_mapping,
    memslot_is_logging,
    transparent_hugepage_adjust,
)
from kvmmem.kvm.fault import EFAULT, MMIO, RESUME, RETRY, Access, Fault, FaultResult
from kvmmem.kvm.faultin import (
    KVM_PFN_ERR_HWPOISON,
    is_error_noslot_pfn,
    kvm_faultin_pfn,
    kvm_release_faultin_page,
)
from kvmmem.kvm.kvm_host import ArchKvm
from kvmmem.kvm.memslot import mark_page_dirty_in_slot
from kvmmem.kvm.mmu_notifier import mmu_invalidate_retry
from kvmmem.kvm.prepare import prepare_vma_walk
from kvmmem.sync import Op, acquire, release
from kvmmem.types import PAGE_SHIFT, PAGE_SIZE, PMD_SIZE, PUD_SIZE, align_down
from kvmmem.variants import Variant

if TYPE_CHECKING:
    from kvmmem.host.vma import Vma
    from kvmmem.kvm.kvm_host import Kvm, KvmVcpu
    from kvmmem.kvm.memslot import KvmMrChange, MemorySlot

INST_ACCESS_FAULT = FaultResult(Fault.ABORT, abort="instruction access fault")
"""An instruction guest-page fault outside every memslot, redirected to the guest as
``EXC_INST_ACCESS`` (scause 1, stval the address).  The name is the one the real riscv
harness reports (:func:`kvmmem.realkvm.riscv_code.describe_cause`)."""
EXEC_EOPNOTSUPP = FaultResult(Fault.ERRNO, errno="EOPNOTSUPP")
"""Before the change above: ``gstage_page_fault`` returns -EOPNOTSUPP, KVM_RUN fails."""
HUGETLB_ANY_SLOT, HUGETLB_FAULTING_SLOT, HUGETLB_CHECKED = 0, 1, 2
"""Values of ``Variant.riscv_hugetlb_lookup``: how ``kvm_riscv_gstage_map`` treats a
hugetlb size (v5.16, v6.17 583c7288feb4, v7.2 49476d58f217)."""
_MMAP_READ_LOCK = acquire("mmap_lock", shared=True)
_MMAP_READ_UNLOCK = release("mmap_lock", shared=True)
_MMU_LOCK = acquire("mmu_lock")
_MMU_UNLOCK = release("mmu_lock")


def gstage_mapping_size(variant: Variant, slot: MemorySlot, vma: Vma, hva: int,
                        logging: bool) -> int:
    """``kvm_riscv_mmu_map``'s size from the VMA: a page under logging or for
    VM_PFNMAP, else the VMA's page size (hugetlb); from 49476d58f217 (v7.2,
    ``riscv_hugetlb_lookup`` 2) ``hugetlb_mapping_size`` goes 1G -> 2M -> 4K while
    ``fault_supports_gstage_huge_mapping`` refuses (the same rule as arm64's
    :func:`~kvmmem.kvm.arch_common.fault_supports_stage2_huge_mapping`)."""
    size = 1 << vma.page_shift
    if logging or vma.flags & VM_PFNMAP:
        size = PAGE_SIZE
    if variant.riscv_hugetlb_lookup == HUGETLB_CHECKED:
        # hugetlb_mapping_size: 1G, else 2M, else 4K, each where the slot allows it
        if size == PUD_SIZE and not fault_supports_stage2_huge_mapping(slot, hva, size):
            size = PMD_SIZE
        if size == PMD_SIZE and not fault_supports_stage2_huge_mapping(slot, hva, size):
            size = PAGE_SIZE
    return size


class RiscvKvm(ArchKvm):
    """The RISC-V G-stage MMU."""

    name = "riscv"
    max_user_slots = 32767
    dirty_log_initially_set_switch = "riscv_dirty_log_initially_set"
    dirty_ring_switch = "riscv_dirty_ring"
    has_memory_type = False
    default_phys_bits = 50

    def ipa_limit_inclusive(self, variant: Variant) -> bool:
        """riscv's ``kvm_arch_prepare_memory_region`` keeps the 2019 arm ``>=`` check
        (a slot may not reach the G-stage GPA size)."""
        return True

    def mmio_exit_error(self, gpa: int, length: int) -> str | None:
        """``kvm_riscv_vcpu_mmio_load``/``_store`` refuse a fault address that is not
        aligned to the access length with -EIO, which KVM_RUN returns (seen on real
        riscv 7.2: a 2-byte load at an odd gpa outside every slot)."""
        return "EIO" if gpa & (length - 1) else None

    def handle_fault(self, vm: Kvm, vcpu: KvmVcpu, gpa: int, access: Access) -> Op[FaultResult]:
        """``gstage_page_fault``."""
        gfn = gpa >> PAGE_SHIFT
        slot = vcpu.gfn_to_memslot(gfn)
        write = access is Access.WRITE
        if slot is None or slot.invalid or (write and slot.readonly):
            # Loads and stores are emulated as MMIO; an instruction fetch cannot be, and
            # reaches the guest as an instruction access fault.  Until some release after
            # v6.12 the default case of gstage_page_fault's switch returned -EOPNOTSUPP
            # and KVM_RUN failed with it instead (still so on Debian 6.12.117; Debian
            # 7.2.13 injects the fault, kvmmem conform on the riscv machines):
            # ``riscv_exec_outside_slots_injects``, commit not identified.
            if access is Access.EXEC:
                if not vm.variant.riscv_exec_outside_slots_injects:
                    return EXEC_EOPNOTSUPP
                return INST_ACCESS_FAULT
            return MMIO
        return (yield from self.kvm_riscv_mmu_map(vm, slot, gpa, write, vcpu))

    def kvm_riscv_mmu_map(self, vm: Kvm, slot: MemorySlot, gpa: int, write: bool,
                          vcpu: KvmVcpu | None = None) -> Op[FaultResult]:
        """``kvm_riscv_mmu_map``: size from the VMA, pfn, retry check, map RWX."""
        mm = vm.mm
        variant = vm.variant
        gfn = gpa >> PAGE_SHIFT
        hva = slot.gfn_to_hva(gfn)
        logging = memslot_is_logging(slot)
        yield _MMAP_READ_LOCK
        vma = mm.vma_lookup(hva)
        if vma is None:
            yield _MMAP_READ_UNLOCK
            return EFAULT
        size = gstage_mapping_size(variant, slot, vma, hva, logging)
        # Before 49476d58f217 (v7.2) a hugetlb size is kept whatever the slot's layout.
        # The gfn is aligned down to the size and its pfn looked up: in every memslot
        # until v6.16 (gfn_to_pfn_prot: no slot there is -EFAULT), in the faulting one,
        # unchecked, from 583c7288feb4 (v6.17) on.
        lookup_slot: MemorySlot | None = slot
        fault_gpa = gpa
        if size != PAGE_SIZE:
            gfn = align_down(gfn, size >> PAGE_SHIFT)
            gpa = gfn << PAGE_SHIFT
            if variant.riscv_hugetlb_lookup == HUGETLB_ANY_SLOT:
                lookup_slot = vm.gfn_to_memslot(gfn)
                if lookup_slot is None or lookup_slot.invalid:
                    yield _MMAP_READ_UNLOCK
                    return EFAULT
        mmu_seq = vm.mmu_invalidate_seq
        is_pfnmap = bool(vma.flags & VM_PFNMAP)
        yield _MMAP_READ_UNLOCK

        assert lookup_slot is not None
        fin = yield from kvm_faultin_pfn(mm, variant, lookup_slot, gfn, write)
        if fin.pfn == KVM_PFN_ERR_HWPOISON:
            return FaultResult(Fault.ERRNO, errno="EINTR")
        if is_error_noslot_pfn(fin.pfn):
            return EFAULT
        writable = fin.map_writable
        if logging and not write:
            writable = False
        yield _MMU_LOCK
        if variant.invalidate_retry and mmu_invalidate_retry(vm, mmu_seq):
            yield _MMU_UNLOCK
            kvm_release_faultin_page(mm, fin)
            return RETRY
        if fin.pfn & ((size >> PAGE_SHIFT) - 1):
            # Before v7.2 a hugetlb size over a slot whose gpa and hva are not congruent:
            # the leaf's output address is not aligned, the hardware refuses it and the
            # guest re-faults on the same entry for ever.
            yield _MMU_UNLOCK
            kvm_release_faultin_page(mm, fin)
            return RETRY
        # kvm_riscv_gstage_map_page gets the faulting gpa for a hugetlb size
        # and the PMD-aligned one after transparent_hugepage_adjust
        lookup = fault_gpa
        if size == PAGE_SIZE and not logging and not is_pfnmap \
                and transparent_hugepage_adjust(mm, slot, hva) == PMD_SIZE:
            size = PMD_SIZE  # THP support (ed7ae7a34bea, late 2025)
            lookup = gpa & ~(PMD_SIZE - 1)
        if writable:
            # kvm_riscv_mmu_map marks a writable mapping's page dirty under mmu_lock,
            # before kvm_riscv_gstage_map_page (mark_page_dirty_in_slot; mark_page_dirty
            # in gstage_map before v6.13): a dirty-log harvest that takes mmu_lock
            # after the fault never misses it.
            mark_page_dirty_in_slot(slot, gfn, vcpu)
        # kvm_riscv_gstage_map_page derives no memory type (no pgprot_noncached):
        # PBMT stays 0 and the platform's PMAs decide, device frames included.
        vm.install(slot, gpa, fin.pfn, size, write=writable, execute=True, device=False,
                   access=Access.WRITE if write else Access.READ, lookup=lookup)
        yield _MMU_UNLOCK
        kvm_release_faultin_page(mm, fin)
        return RESUME

    def prepare_vma_walk(
        self, vm: Kvm, old: MemorySlot | None, new: MemorySlot, change: KvmMrChange
    ) -> Op[None]:
        """The VMA walk of ``kvm_arch_prepare_memory_region`` (riscv): the EPERM
        and EINVAL checks always; the PFNMAP premap before v6.18
        (``riscv_prepare_premap``)."""
        yield from prepare_vma_walk(vm, new, change, premap=vm.variant.riscv_prepare_premap,
                                    check_write=True)
