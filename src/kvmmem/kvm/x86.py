"""x86 KVM MMU (TDP, EPT format): ``kvm_tdp_page_fault``, ``make_spte``,
``kvm_mmu_hugepage_adjust``, ``KVM_PRE_FAULT_MEMORY`` and the memslot hooks
of arch/x86/kvm/mmu/mmu.c and arch/x86/kvm/x86.c (kernel-semantics.md §3.3,
§5.3, §6.2).

Deleting or moving a memslot zaps every mapping of the VM
(``KVM_X86_QUIRK_SLOT_ZAP_ALL``, on by default, ``kvm_mmu_zap_all_fast``),
as the real KVM on these machines shows (kvm-on-this-host.md §3.5).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmmem.errors import KernelError
from kvmmem.kvm.fault import (
    EFAULT,
    EMULATE,
    RESUME,
    RETRY,
    Access,
    Fault,
    FaultResult,
    memory_fault_exit,
)
from kvmmem.kvm.faultin import (
    KVM_PFN_ERR_HWPOISON,
    KVM_PFN_ERR_RO_FAULT,
    Faultin,
    is_error_noslot_pfn,
    kvm_faultin_pfn,
    kvm_release_faultin_page,
)
from kvmmem.kvm.guest_memfd import kvm_gmem_get_pfn, kvm_memslot_is_gmem_only, kvm_slot_has_gmem
from kvmmem.kvm.kvm_host import PG_LEVEL_2M, PG_LEVEL_4K, ArchKvm, MemslotHookContext
from kvmmem.kvm.memory_attributes import KVM_MEMORY_EXIT_FLAG_PRIVATE, kvm_mem_is_private
from kvmmem.kvm.memslot import (
    CALL,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KvmMrChange,
    mark_page_dirty_in_slot,
)
from kvmmem.kvm.mmu_notifier import mmu_invalidate_retry_gfn
from kvmmem.kvm.prefault import PrefaultHang
from kvmmem.sync import Op, acquire, release
from kvmmem.types import PAGE_SHIFT, PAGE_SIZE, PMD_SIZE, PUD_SIZE

if TYPE_CHECKING:
    from kvmmem.kvm.kvm_host import Kvm, KvmVcpu
    from kvmmem.kvm.memslot import MemorySlot

INVALID_OPCODE = FaultResult(Fault.ABORT, abort="#UD")
_PG_LEVEL = {PAGE_SIZE: 1, PMD_SIZE: 2, PUD_SIZE: 3}
"""Sizes as the tracepoints print levels (PG_LEVEL_4K = 1, PG_LEVEL_2M, PG_LEVEL_1G)."""
_MMU_READ_LOCK = acquire("mmu_lock", shared=True)
_MMU_READ_UNLOCK = release("mmu_lock", shared=True)


def lpage_disallowed(slot: MemorySlot, gfn: int, size: int) -> bool:
    """``lpage_info[level].disallow_lpage`` as ``kvm_alloc_memslot_metadata``
    builds it: the huge frame around ``gfn`` is disallowed when it sticks out
    of the slot, or when gpa and hva are not congruent below ``size``."""
    npages = size >> PAGE_SHIFT
    if (slot.base_gfn ^ (slot.userspace_addr >> PAGE_SHIFT)) & (npages - 1):
        return True
    frame = gfn & ~(npages - 1)
    return frame < slot.base_gfn or frame + npages > slot.base_gfn + slot.npages


def is_obsolete_root(vm: Kvm, vcpu: KvmVcpu) -> bool:
    """``is_obsolete_sp`` of the vCPU's root: a ``kvm_mmu_zap_all_fast`` (memslot delete
    or move) has made it obsolete since the vCPU last entered the guest."""
    return vcpu.index in vm.obsolete_roots


def is_page_fault_stale(vm: Kvm, vcpu: KvmVcpu, mmu_seq: int, gfn: int) -> bool:
    """``is_page_fault_stale``, under mmu_lock: the vCPU's root is obsolete, or an
    invalidation covering ``gfn`` is in progress or completed since ``mmu_seq``
    (``mmu_invalidate_retry_gfn``; not with the ``no-invalidate-retry`` mutation)."""
    if is_obsolete_root(vm, vcpu):
        return True
    return vm.variant.invalidate_retry and mmu_invalidate_retry_gfn(vm, mmu_seq, gfn)


class X86Kvm(ArchKvm):
    """x86 with the TDP MMU (EPT entries)."""

    name = "x86"
    unknown_vm_ioctl_errno = "ENOTTY"
    guest_memfd_switch = "x86_guest_memfd"
    memory_attributes = True
    dirty_log_initially_set_switch = "x86_dirty_log_initially_set"
    dirty_ring_switch = "x86_dirty_ring"
    dirty_ring_plain = True
    emulates_page_crossing = True
    has_emulated_path = True
    retry_checks_gfn = True
    retries_invalid_slot = True
    walk_sets_accessed = True
    """EPT with A/D enabled (what KVM turns on, ``enable_ept_ad_bits``): the CPU's walk
    sets the accessed flag (Intel SDM 29.3.5)."""
    max_user_slots = 32764
    nr_address_spaces = 2
    has_pre_fault_memory = True
    max_level_size = PUD_SIZE
    huge_pfnmap = ("pud", "pmd")
    """x86 has PMD and PUD special PFNMAP leaves (``CONFIG_ARCH_SUPPORTS_PMD_PFNMAP`` /
    ``_PUD_PFNMAP``, v6.12)."""

    def elide_tlb_flush_if_young(self, vm: Kvm) -> bool:
        """x86 selects ``CONFIG_KVM_ELIDE_TLB_FLUSH_IF_YOUNG`` (v6.13;
        ``x86_elide_flush_if_young``)."""
        return vm.variant.x86_elide_flush_if_young

    # --- memslot hooks (arch/x86/kvm/x86.c) -------------------------------------------

    def memslot_phys_bits(self, ipa_bits: int) -> int | None:
        """``kvm_mmu_max_gfn`` is checked against 52 bits (shadow paging's maximum),
        whatever the TDP table's width."""
        return None

    def prepare_memory_region(self, hooks: MemslotHookContext, old: MemorySlot | None,
                              new: MemorySlot | None, change: KvmMrChange) -> Op[None]:
        """``kvm_arch_prepare_memory_region`` (x86): a MOVE with an external page-track
        user and a last gfn above ``kvm_mmu_max_gfn()`` are EINVAL; CREATE and MOVE get
        fresh arch metadata (``kvm_alloc_memslot_metadata``), FLAGS_ONLY copies old's."""
        if change == KvmMrChange.DELETE or new is None:
            return
        if change == KvmMrChange.MOVE and hooks.external_page_track:
            raise KernelError("EINVAL", CALL, "x86: MOVE with an external page-track user")
        if change in (KvmMrChange.CREATE, KvmMrChange.MOVE):
            if new.base_gfn + new.npages - 1 > (1 << (hooks.phys_bits - PAGE_SHIFT)) - 1:
                raise KernelError("EINVAL", CALL, "x86: last gfn above kvm_mmu_max_gfn()")
            new.arch = {}  # kvm_alloc_memslot_metadata
        elif old is not None:
            new.arch = dict(old.arch)
        return
        yield  # pragma: no cover

    def flush_shadow_memslot(self, hooks: MemslotHookContext, slot: MemorySlot) -> Op[None]:
        """``kvm_arch_flush_shadow_memslot`` (x86): with ``KVM_X86_QUIRK_SLOT_ZAP_ALL``
        (default VM type, on by default) every mapping (``kvm_mmu_zap_all_fast``),
        without it only the slot's (``kvm_mmu_zap_memslot``)."""
        if hooks.slot_zap_all:
            yield from hooks.zap_all()
        else:
            yield from hooks.zap_memslot(slot)

    def commit_memory_region(self, hooks: MemslotHookContext, old: MemorySlot | None,
                             new: MemorySlot | None, change: KvmMrChange) -> Op[None]:
        """``kvm_arch_commit_memory_region`` -> ``kvm_mmu_slot_apply_flags``: only a
        FLAGS_ONLY change of a writable slot acts.  Enabling logging splits
        (``eager_page_split``), write-protects (4K, or 2M + D-bit clear with PML) and
        flushes; disabling recovers huge pages; manual protect with
        ``KVM_DIRTY_LOG_INITIALLY_SET`` skips the write protection."""
        new_flags = new.flags if new is not None else 0
        if change != KvmMrChange.FLAGS_ONLY or new_flags & KVM_MEM_READONLY or new is None:
            return
        if not new_flags & KVM_MEM_LOG_DIRTY_PAGES:
            yield from hooks.recover_huge_pages(new)
            return
        if hooks.kvm_dirty_log_manual_protect_and_init_set():
            return
        if hooks.eager_page_split:
            yield from hooks.split_memslot(new)
        if hooks.pml:
            yield from hooks.clear_dirty_memslot(new)
            yield from hooks.write_protect_memslot(new, PG_LEVEL_2M)
        else:
            yield from hooks.write_protect_memslot(new, PG_LEVEL_4K)
        yield from hooks.flush_remote_tlbs_memslot(new)

    def handle_fault(self, vm: Kvm, vcpu: KvmVcpu, gpa: int, access: Access) -> Op[FaultResult]:
        """``kvm_mmu_page_fault`` -> ``kvm_tdp_page_fault`` for a guest access
        (the operation is ``tdp_page_fault``'s own: no forwarding layer)."""
        return self.tdp_page_fault(vm, vcpu, gpa, access, prefetch=False)

    def tdp_page_fault(self, vm: Kvm, vcpu: KvmVcpu, gpa: int, access: Access, *, prefetch: bool
                       ) -> Op[FaultResult]:
        """``kvm_tdp_mmu_page_fault``: faultin, stale check, map.

        ``fast_page_fault`` is not modelled: a write to a leaf write-protected
        for dirty logging takes this full path and ends in the same mapping."""
        mm = vm.mm
        variant = vm.variant
        gfn = gpa >> PAGE_SHIFT
        write = access is Access.WRITE
        # kvm_mmu_page_fault (v6.10): on a KVM_X86_SW_PROTECTED_VM a fault is private when
        # the gfn's attributes say so at fault time (PFERR_PRIVATE_ACCESS); the CPU says
        # it for SNP and TDX, which the model does not have
        private = vm.has_private_mem and kvm_mem_is_private(vm, gfn)
        mf_flags = KVM_MEMORY_EXIT_FLAG_PRIVATE if private else 0
        slot = vcpu.gfn_to_memslot(gfn)
        mmu_seq = vm.mmu_invalidate_seq
        if slot is None:
            if private:
                # kvm_handle_noslot_fault: a private access outside every slot
                return memory_fault_exit(gfn << PAGE_SHIFT, PAGE_SIZE, mf_flags)
            if is_obsolete_root(vm, vcpu):
                # kvm_handle_noslot_fault continues (MMIO caching) to is_page_fault_stale
                return RETRY
            # kvm_handle_noslot_fault: MMIO (emulated); no instruction to fetch -> #UD at CPL3.
            if access is Access.EXEC:
                return INVALID_OPCODE
            return EMULATE
        if slot.invalid:
            if prefetch:
                raise KernelError("EAGAIN", "KVM_PRE_FAULT_MEMORY",
                                  "the memslot is being deleted or moved")
            return RETRY
        if variant.invalidate_retry and vm.mmu_invalidate_in_progress \
                and mmu_invalidate_retry_gfn(vm, mmu_seq, gfn):
            return RETRY  # the lockless mmu_invalidate_retry_gfn_unsafe pre-check
        if private != (vm.has_private_mem and kvm_mem_is_private(vm, gfn)):
            # kvm_mmu_faultin_pfn: the attribute changed under the fault
            return memory_fault_exit(gfn << PAGE_SHIFT, PAGE_SIZE, mf_flags)
        gmem = private or kvm_memslot_is_gmem_only(slot)
        if gmem:
            # __kvm_mmu_faultin_pfn -> kvm_mmu_faultin_pfn_gmem (private: v6.8; gmem-only
            # slots: v6.18): the file's page, at 4K (max_order 0); no guest_memfd behind
            # the slot, or its error, fills a memory-fault exit (PRIVATE for a private
            # fault)
            if not kvm_slot_has_gmem(slot):
                return memory_fault_exit(gfn << PAGE_SHIFT, PAGE_SIZE, mf_flags)
            try:
                pfn = kvm_gmem_get_pfn(vm, slot, gfn)
            except KernelError as err:
                return memory_fault_exit(gfn << PAGE_SHIFT, PAGE_SIZE, mf_flags, err.errno)
            fin = Faultin(pfn, not slot.readonly, False, 0)
        else:
            fin = yield from kvm_faultin_pfn(mm, variant, slot, gfn, write)
        if fin.pfn == KVM_PFN_ERR_RO_FAULT:
            return EMULATE
        if fin.pfn == KVM_PFN_ERR_HWPOISON:
            return FaultResult(Fault.ERRNO, errno="EINTR")
        if is_error_noslot_pfn(fin.pfn):
            return EFAULT
        yield _MMU_READ_LOCK
        if is_page_fault_stale(vm, vcpu, mmu_seq, gfn):
            yield _MMU_READ_UNLOCK
            kvm_release_faultin_page(mm, fin)
            return RETRY
        size = PAGE_SIZE if gmem else self.hugepage_adjust(vm, slot, gfn, fin.hva)
        device = not mm.physmem.pfn_valid(fin.pfn)
        self.tdp_mmu_map(vm, slot, gpa, fin.pfn, size, write=fin.map_writable,
                         device=device, access=None if prefetch else access)
        if fin.map_writable:
            # make_spte, under mmu_lock: a writable SPTE in a logged slot is logged
            # right away (mark_page_dirty_in_slot).
            mark_page_dirty_in_slot(slot, gfn, vcpu)
        yield _MMU_READ_UNLOCK
        kvm_release_faultin_page(mm, fin)
        return RESUME

    @staticmethod
    def tdp_mmu_map(vm: Kvm, slot: MemorySlot, gpa: int, pfn: int, size: int, *, write: bool,
                    device: bool, access: Access | None) -> None:
        """``kvm_tdp_mmu_map`` -> ``tdp_mmu_map_handle_target_level``: the leaf with
        ``ACC_ALL`` (R, X; W when ``write``), with their ``kvmmmu`` tracepoints
        (``kvm_mmu_spte_requested``, ``kvm_mmu_set_spte``; arch/x86/kvm/mmu/mmutrace.h).
        ``access`` None: a prefetch (``make_spte`` leaves the accessed bit clear)."""
        log = vm.log
        base_gpa = gpa & ~(size - 1)
        if log is not None:
            log.emit("kvm_mmu_spte_requested", gfn=gpa >> PAGE_SHIFT, pfn=pfn,
                     level=_PG_LEVEL.get(size, 0))
        vm.install(slot, gpa, pfn, size, write=write, execute=True, device=device,
                   access=access, prefetch=access is None)
        if log is not None:
            log.emit("kvm_mmu_set_spte", gfn=base_gpa >> PAGE_SHIFT,
                     pfn=pfn - ((gpa - base_gpa) >> PAGE_SHIFT), level=_PG_LEVEL.get(size, 0),
                     perm="r" + ("w" if write else "-") + "x")

    def hugepage_adjust(self, vm: Kvm, slot: MemorySlot, gfn: int, hva: int) -> int:
        """``kvm_mmu_hugepage_adjust``: 4K under dirty tracking; otherwise the
        largest level allowed by ``lpage_info`` and the host mapping
        (``host_pfn_mapping_level``)."""
        if slot.flags & KVM_MEM_LOG_DIRTY_PAGES:
            return PAGE_SIZE
        host = vm.mm.mapping_size(hva)
        if host < PMD_SIZE:
            return PAGE_SIZE
        for size in (PUD_SIZE, PMD_SIZE):
            if size <= self.max_level_size and host >= size \
                    and not lpage_disallowed(slot, gfn, size):
                return size
        return PAGE_SIZE

    # --- KVM_PRE_FAULT_MEMORY ------------------------------------------------

    def pre_fault_memory(self, vm: Kvm, vcpu: KvmVcpu, gpa: int) -> Op[int]:
        """``kvm_arch_vcpu_pre_fault_memory`` -> ``kvm_tdp_map_page``: the
        fault path with ``prefetch`` and a read error code; returns the bytes
        from ``gpa`` to the end of the mapping that now covers it.

        ``kvm_mmu_reload`` first: since v6.15 (20a6cff3b283) it frees a root that a
        memslot delete made obsolete; before, the obsolete root stays, every fault is
        stale (RET_PF_RETRY) and the call loops until a signal: :class:`PrefaultHang`."""
        if vcpu.index in vm.obsolete_roots and vm.variant.x86_prefault_frees_obsolete_root:
            vm.obsolete_roots.discard(vcpu.index)
        vm.loaded_roots.add(vcpu.index)
        for _ in range(64):
            r = yield from self.tdp_page_fault(vm, vcpu, gpa, Access.READ, prefetch=True)
            if r.kind is Fault.RETRY:
                continue
            if r.kind is Fault.RESUME:
                leaf = vm.stage2.walk(gpa)
                size = leaf.size if leaf is not None else PAGE_SIZE
                return size - (gpa & (size - 1))
            if r.kind is Fault.EFAULT:
                raise KernelError("EFAULT", "KVM_PRE_FAULT_MEMORY",
                                  f"gpa {gpa:#x}: the host memory cannot be faulted in")
            if r.kind is Fault.ERRNO:
                raise KernelError(r.errno, "KVM_PRE_FAULT_MEMORY", f"gpa {gpa:#x}")
            # RET_PF_EMULATE: no memslot (MMIO) -> ENOENT
            raise KernelError("ENOENT", "KVM_PRE_FAULT_MEMORY",
                              f"gpa {gpa:#x} is not covered by a memslot")
        if vcpu.index in vm.obsolete_roots:
            raise PrefaultHang(f"gpa {gpa:#x}: every fault is stale (obsolete root)")
        raise KernelError("EINTR", "KVM_PRE_FAULT_MEMORY", "retried too often")
