"""arm64 KVM MMU: ``kvm_handle_guest_abort``, ``user_mem_abort`` and the
memslot hooks of arch/arm64/kvm/mmu.c (kernel-semantics.md §2, §3.2).

Versions before v5.14 switch in what virt/kvm/arm/mmu.c did in 2019
(kvmmem.variants, docs/versions.md): the VMA walk in
``kvm_arch_prepare_memory_region`` (EPERM for a writable slot over a VMA
without VM_WRITE until v5.5, the ``>=`` IPA check until v5.12) and
``kvm_phys_addr_ioremap`` premapping VM_PFNMAP ranges as 4K Device pages
outside the notifier protocol until v5.14; and, in ``user_mem_abort``, 4K
mappings forced for VM_PFNMAP until v5.14.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmmem.arch.pgtable import MemAttr, Perm
from kvmmem.errors import KernelError
from kvmmem.host.vma import (
    VM_ALLOW_ANY_UNCACHED,
    VM_MIXEDMAP,
    VM_MTE_ALLOWED,
    VM_PFNMAP,
    VM_SHARED,
    Vma,
)
from kvmmem.kvm.arch_common import (
    fault_supports_stage2_huge_mapping,
    memslot_is_logging,
    transparent_hugepage_adjust,
)
from kvmmem.kvm.fault import (
    EFAULT,
    MMIO,
    RESUME,
    RETRY,
    Access,
    Fault,
    FaultResult,
    memory_fault_exit,
)
from kvmmem.kvm.faultin import (
    KVM_PFN_ERR_HWPOISON,
    is_error_noslot_pfn,
    kvm_faultin_pfn,
    kvm_release_faultin_page,
)
from kvmmem.kvm.guest_memfd import kvm_gmem_get_pfn, kvm_memslot_is_gmem_only, kvm_slot_has_gmem
from kvmmem.kvm.kvm_host import ArchKvm
from kvmmem.kvm.memslot import CALL, mark_page_dirty_in_slot
from kvmmem.kvm.mmu_notifier import mmu_invalidate_retry
from kvmmem.kvm.prepare import prepare_vma_walk
from kvmmem.sync import Op, acquire, release
from kvmmem.types import align_down
from kvmmem.variants import Variant

if TYPE_CHECKING:
    from kvmmem.kvm.kvm_host import Kvm, KvmVcpu
    from kvmmem.kvm.memslot import KvmMrChange, MemorySlot

PREFETCH_ABORT = FaultResult(Fault.ABORT, abort="prefetch abort")
DATA_ABORT = FaultResult(Fault.ABORT, abort="data abort")
ADDRESS_SIZE_FAULT = FaultResult(Fault.ABORT, abort="address size fault")
HOST_IPA_LIMIT = 48
"""``get_kvm_ipa_limit()``: the host's sanitised PARange (48 bits on QEMU's ``-cpu max``
and on most arm64 servers; a machine feature the model does not vary)."""
_MMAP_READ_LOCK = acquire("mmap_lock", shared=True)
_MMAP_READ_UNLOCK = release("mmap_lock", shared=True)
_MMU_READ_LOCK = acquire("mmu_lock", shared=True)
_MMU_READ_UNLOCK = release("mmu_lock", shared=True)


def get_vma_page_shift(vma: Vma, hva: int) -> int:
    """``get_vma_page_shift``: hugetlb -> the hstate's shift; VM_PFNMAP -> the
    largest of PUD/PMD whose block around ``hva`` is congruent with the
    physical address guessed from ``vm_pgoff`` and inside the VMA; else ``PAGE_SHIFT``.
    The sizes are the host's (``vma.pg``); the PUD is tried because the PMD level is
    not folded in any modelled build (``__PAGETABLE_PMD_FOLDED`` unset)."""
    pg = vma.pg
    if vma.flags & VM_PFNMAP:
        pa = (vma.pgoff << pg.page_shift) + (hva - vma.start)
        for shift in (pg.pud_shift, pg.pmd_shift):
            size = 1 << shift
            if ((hva ^ pa) & (size - 1)) == 0 and align_down(hva, size) >= vma.start \
                    and align_down(hva, size) + size <= vma.end:
                return shift
        return pg.page_shift
    return vma.page_shift


def vma_pagesize(variant: Variant, slot: MemorySlot, vma: Vma, hva: int, logging: bool
                 ) -> tuple[int, bool]:
    """``user_mem_abort``'s mapping size from the VMA, before the pfn is known:
    ``(vma_pagesize, force_pte)``.  Logging forces pages; VM_PFNMAP forces them
    before v5.14 (``arm64_pfnmap_force_pte``) and is sized from the host page table,
    not the VMA, once the 7.3-cycle fix is in (``arm64_pfnmap_vma_block`` false);
    otherwise :func:`get_vma_page_shift`, then the kernel's ``switch (vma_shift)``
    (2f40c46021bb, "KVM: arm64: Use fallback mapping sizes for contiguous huge page
    sizes", v5.10; before it a contiguous size was kept and mapped as one page: not
    modelled, as the model's hugetlb pages are PMD-sized only): PUD kept where
    :func:`fault_supports_stage2_huge_mapping` allows it, else PMD; a contiguous PMD
    size (a CONT_PMD hugetlb page: 32 MiB with 4 KiB pages, 1 GiB with 16 KiB, 16 GiB
    with 64 KiB) is mapped as PMD blocks; a PMD the slot does not allow, or a contiguous
    PTE size (CONT_PTE: 64 KiB / 2 MiB / 2 MiB), forces pages (``force_pte``).
    Every size is the host's: stage-2 uses the host ``PAGE_SIZE`` as its granule."""
    pg = vma.pg
    force_pte = logging
    if force_pte:
        vma_shift = pg.page_shift
    elif variant.arm64_pfnmap_force_pte and vma.flags & VM_PFNMAP:
        vma_shift = pg.page_shift
        force_pte = True
    elif vma.flags & VM_PFNMAP and not variant.arm64_pfnmap_vma_block:
        # "Don't use the VMA to size stage-2 block mappings for VM_PFNMAP" (7.3
        # cycle, stable down to 5.10): the host page table's leaf decides, once the
        # pfn is known (in user_mem_abort)
        vma_shift = pg.page_shift
    else:
        vma_shift = get_vma_page_shift(vma, hva)
    # switch (vma_shift), its fallthroughs in order
    if vma_shift == pg.pud_shift:
        if fault_supports_stage2_huge_mapping(slot, hva, pg.pud_size):
            return pg.pud_size, force_pte
        vma_shift = pg.pmd_shift
    if vma_shift == pg.cont_pmd_shift:
        vma_shift = pg.pmd_shift
    if vma_shift == pg.pmd_shift:
        if fault_supports_stage2_huge_mapping(slot, hva, pg.pmd_size):
            return pg.pmd_size, force_pte
        vma_shift = pg.cont_pte_shift
    if vma_shift == pg.cont_pte_shift:
        return pg.page_size, True
    return 1 << vma_shift, force_pte


def stage2_map(vm: Kvm, slot: MemorySlot, gpa: int, pfn: int, size: int, *, write: bool,
               execute: bool, device: bool, access: Access | None,
               attr: MemAttr | None = None) -> None:
    """``user_mem_abort``'s last step, under mmu_lock: a permission fault on a leaf of
    the same size and output relaxes it (``kvm_pgtable_stage2_relax_perms``), where
    ``kvm_pgtable_stage2_map`` would answer -EAGAIN; anything else is mapped.  ``attr``
    (default: Device if ``device`` else Normal) is the memory type."""
    if attr is None:
        attr = MemAttr.DEVICE if device else MemAttr.NORMAL
    old = vm.stage2.walk(gpa)
    if old is not None and old.size == size and old.pfn == pfn and old.attr is attr:
        vm.stage2.relax_perms(gpa & ~(size - 1),
                              Perm(True, write or old.perm.write, execute or old.perm.execute))
        if access is not None:
            vm.stats.pf_fixed += 1
        return
    vm.install(slot, gpa, pfn, size, write=write, execute=execute, device=device,
               access=access, attr=attr)


class Arm64Kvm(ArchKvm):
    """The arm64 stage-2 MMU."""

    name = "arm64"
    guest_memfd_switch = "arm64_guest_memfd"
    dirty_log_initially_set_switch = "arm64_dirty_log_initially_set"
    dirty_ring_switch = "arm64_dirty_ring"
    dirty_ring_with_bitmap = True
    max_user_slots = 32767
    break_before_make = True
    huge_pfnmap = ("pmd",)
    """``ARCH_SUPPORTS_PMD_PFNMAP`` only: arm64 has no transparent PUDs, so no PUD
    special leaves."""
    default_phys_bits = 40
    splits_on_log_enable = True
    """``kvm_arch_commit_memory_region`` calls ``kvm_mmu_split_memory_region`` whenever
    logging is enabled (a no-op unless the VM set an eager-split chunk size)."""

    def handle_fault(self, vm: Kvm, vcpu: KvmVcpu, gpa: int, access: Access) -> Op[FaultResult]:
        """``kvm_handle_guest_abort``."""
        if gpa >> vm.stage2.ipa_bits:
            # kvm_handle_guest_abort's out-of-range branch for a translation fault
            # beyond the VM's IPA size: past the host's PARange kvm_inject_size_fault;
            # between the two a synchronous external abort (kvm_inject_sea; before
            # that helper, kvm_inject_pabt/kvm_inject_dabt, FSC 0x10 either way).  Seen
            # on real arm64 7.3 at 1<<41 in a 40-bit VM (docs/conformance.md); the
            # release that brought the branch is not pinned here yet.
            if gpa >> HOST_IPA_LIMIT:
                return ADDRESS_SIZE_FAULT
            return PREFETCH_ABORT if access is Access.EXEC else DATA_ABORT
        log = vm.log
        if log is not None:
            log.emit("kvm_guest_fault", ipa=gpa)
        gfn = gpa >> vm.pg.page_shift
        slot = vcpu.gfn_to_memslot(gfn)
        write = access is Access.WRITE
        if slot is None or slot.invalid or (write and slot.readonly):
            # The I/O branch: io_mem_abort with a valid syndrome (plain LDR/STR).
            if access is Access.EXEC:
                return PREFETCH_ABORT
            if log is not None:
                log.emit("kvm_mmio_emulate")  # pc, instr, cpsr: not modelled
            return MMIO
        leaf = vm.stage2.walk(gpa)
        if leaf is not None and not leaf.young:
            # An access flag fault (a valid leaf whose AF kvm_age_gfn cleared):
            # handle_access_fault sets AF under the read side of mmu_lock.
            yield acquire("mmu_lock", shared=True)
            vm.stage2.mkyoung(gpa)
            if vm.log is not None:
                vm.log.emit("kvm_access_fault", ipa=gpa)
            yield release("mmu_lock", shared=True)
            return RESUME
        if kvm_slot_has_gmem(slot):
            return (yield from self.gmem_abort(vm, vcpu, slot, gpa, access))
        return (yield from self.user_mem_abort(vm, vcpu, slot, gpa, access))

    def gmem_abort(self, vm: Kvm, vcpu: KvmVcpu, slot: MemorySlot, gpa: int,
                   access: Access) -> Op[FaultResult]:
        """``gmem_abort`` (v6.18): the page of the slot's guest_memfd, mapped at
        ``PAGE_SIZE`` always (no VMA, no block), writable unless the slot is read-only,
        executable on an instruction fetch.  A ``kvm_gmem_get_pfn`` error fills a
        memory-fault exit for the faulting page with flags 0 and fails KVM_RUN with it."""
        page_shift = vm.pg.page_shift
        gfn = gpa >> page_shift
        exec_fault = access is Access.EXEC
        mmu_seq = vm.mmu_invalidate_seq
        try:
            pfn = kvm_gmem_get_pfn(vm, slot, gfn)
        except KernelError as err:
            return memory_fault_exit(gfn << page_shift, 1 << page_shift, 0, err.errno)
        writable = not slot.readonly
        yield _MMU_READ_LOCK
        if vm.variant.invalidate_retry and mmu_invalidate_retry(vm, mmu_seq):
            yield _MMU_READ_UNLOCK
            return RETRY
        stage2_map(vm, slot, gfn << page_shift, pfn, 1 << page_shift, write=writable,
                   execute=exec_fault, device=False, access=access)
        if writable:
            vcpu.unmarked_dirty = gfn
        yield _MMU_READ_UNLOCK
        if writable:
            mark_page_dirty_in_slot(slot, gfn, vcpu)
            vcpu.unmarked_dirty = None
        return RESUME

    def check_gmem_slot(self, variant: Variant, new: MemorySlot) -> None:
        """``kvm_arch_prepare_memory_region``'s guest_memfd rule (v6.18, with arm64's
        guest_memfd): only a gmem-only slot; arm64 has no private memory."""
        if kvm_slot_has_gmem(new) and not kvm_memslot_is_gmem_only(new):
            raise KernelError("EINVAL", CALL, "arm64: a guest_memfd slot whose file lacks "
                              "GUEST_MEMFD_FLAG_MMAP (not gmem-only)")

    def user_mem_abort(self, vm: Kvm, vcpu: KvmVcpu, slot: MemorySlot, gpa: int,
                       access: Access) -> Op[FaultResult]:
        """``user_mem_abort``: size, pfn, attributes, retry check, install."""
        mm = vm.mm
        variant = vm.variant
        pg = vm.pg
        page_shift, page_size = pg.page_shift, pg.page_size
        gfn = gpa >> page_shift
        write = access is Access.WRITE
        exec_fault = access is Access.EXEC
        hva = slot.gfn_to_hva(gfn)
        logging = memslot_is_logging(slot)
        # A permission fault (the ESR's FSC): a valid leaf is there and the access
        # needs more rights than it gives.
        fault_is_perm = vm.stage2.walk(gpa) is not None

        yield _MMAP_READ_LOCK
        vma = mm.vma_lookup(hva)
        if vma is None:
            yield _MMAP_READ_UNLOCK
            return EFAULT
        size, force_pte = vma_pagesize(variant, slot, vma, hva, logging)
        if size > page_size:
            # The fault IPA and gfn are aligned to the block before the pfn is looked
            # up: the block maps the frames that follow the pfn of its first page.
            gpa = align_down(gpa, size)
            gfn = gpa >> page_shift
        # snapshots of the VMA (kvm_vma_mte_allowed, VM_ALLOW_ANY_UNCACHED,
        # kvm_vma_is_cacheable), taken before mmap_lock is dropped
        vm_flags = vma.flags
        is_vma_cacheable = vma.cacheable
        mmu_seq = vm.mmu_invalidate_seq
        yield _MMAP_READ_UNLOCK

        fin = yield from kvm_faultin_pfn(mm, variant, slot, gfn, write)
        if fin.pfn == KVM_PFN_ERR_HWPOISON:
            return FaultResult(Fault.ERRNO, errno="EINTR")
        if is_error_noslot_pfn(fin.pfn):
            return EFAULT
        writable = fin.map_writable
        # s2_force_noncacheable (v6.17; "device" before): a VM_PFNMAP/VM_MIXEDMAP pfn
        # outside the kernel's linear map (!pfn_is_map_memory) is device memory, unless
        # the VMA maps it cacheable, which since v6.17 needs FWB and DIC
        # (kvm_supports_cacheable_pfnmap) and is EFAULT without them
        device = bool(vm_flags & (VM_PFNMAP | VM_MIXEDMAP)) and not mm.physmem.pfn_valid(fin.pfn)
        if device and is_vma_cacheable and variant.arm64_cacheable_pfnmap_fault:
            if not kvm_supports_cacheable_pfnmap(vm):
                kvm_release_faultin_page(mm, fin)
                return EFAULT
            device = False
        elif not device and logging and not write:
            writable = False
        if exec_fault and device:
            kvm_release_faultin_page(mm, fin)
            return PREFETCH_ABORT

        yield _MMU_READ_LOCK
        if variant.invalidate_retry and mmu_invalidate_retry(vm, mmu_seq):
            yield _MMU_READ_UNLOCK
            kvm_release_faultin_page(mm, fin)
            return RETRY
        pfn = fin.pfn
        # transparent_hugepage_adjust: a THP behind the hva allows a PMD block (IPA and
        # pfn aligned down to it).
        if size == page_size and not force_pte and not device \
                and transparent_hugepage_adjust(mm, slot, hva) == pg.pmd_size:
            size = pg.pmd_size
            gpa = align_down(gpa, size)
            pfn = align_down(pfn, size >> page_shift)
        elif size == page_size and not force_pte and device and vm_flags & VM_PFNMAP \
                and not variant.arm64_pfnmap_vma_block \
                and mm.mapping_size(hva) >= pg.pmd_size \
                and fault_supports_stage2_huge_mapping(slot, hva, pg.pmd_size):
            # Since "Don't use the VMA to size stage-2 block mappings for VM_PFNMAP" the
            # host's leaf sizes a VM_PFNMAP block: a PMD special leaf (vfio-pci's
            # huge_fault, v6.12) gives a PMD block.  Read from real arm64 6.12.117, 7.2
            # and 7.3 (docs/findings.md 14): one fault maps a vfio BAR's 2 MiB (32 MiB
            # with 16 KiB pages), a 1 GiB BAR too (arm64 has no PUD special leaves).
            size = pg.pmd_size
            gpa = align_down(gpa, size)
            pfn = align_down(pfn, size >> page_shift)
        if not fault_is_perm and not device and vm.mte_enabled \
                and not kvm_vma_mte_allowed(variant, vm_flags):
            # "Check the VMM hasn't introduced a new disallowed VMA" (sanitise_mte_tags
            # otherwise: tags are not modelled)
            yield _MMU_READ_UNLOCK
            kvm_release_faultin_page(mm, fin)
            return EFAULT
        attr = stage2_memattr(variant, device, vm_flags)
        # CTR_EL0.DIC: cacheable memory is mapped executable at once
        execute = exec_fault or (not device and variant.arm64_dic_eager_exec
                                 and "dic" in vm.cpu_features)
        if size > page_size and pfn & ((size >> page_shift) - 1):
            # kvm_pgtable_stage2_map: kvm_block_mapping_supported refuses a block whose
            # output address is not aligned to it, and the walk descends to map one page
            # per granule, from the pfn on (what a VMA-sized PFNMAP block comes to when
            # the first page's frame is not block aligned)
            for i in range(size >> page_shift):
                stage2_map(vm, slot, gpa + (i << page_shift), pfn + i, page_size,
                           write=writable, execute=execute, device=device,
                           access=access if i == 0 else None, attr=attr)
        elif size not in vm.stage2.leaf_sizes:
            # a PUD-sized PFNMAP block with 16K/64K pages (64 GiB / 4 TiB): stage-2 has
            # no block that large (KVM_PGTABLE_MIN_BLOCK_LEVEL 2), so the walk maps the
            # range with the largest blocks it has
            block = max(s for s in vm.stage2.leaf_sizes if s <= size)
            for i in range(size // block):
                stage2_map(vm, slot, gpa + i * block, pfn + i * (block >> page_shift), block,
                           write=writable, execute=execute, device=device,
                           access=access if i == 0 else None, attr=attr)
        else:
            stage2_map(vm, slot, gpa, pfn, size, write=writable, execute=execute,
                       device=device, access=access, attr=attr)
        if writable:
            vcpu.unmarked_dirty = gfn  # published until the mark below
        yield _MMU_READ_UNLOCK
        kvm_release_faultin_page(mm, fin)
        if writable:
            mark_page_dirty_in_slot(slot, gfn, vcpu)
            vcpu.unmarked_dirty = None
        return RESUME

    # --- memslot hooks -------------------------------------------------------

    def prepare_vma_walk(
        self, vm: Kvm, old: MemorySlot | None, new: MemorySlot, change: KvmMrChange
    ) -> Op[None]:
        """The VMA walk of ``kvm_arch_prepare_memory_region``.

        Upstream it rejects VM_PFNMAP with dirty logging and, since v6.17 on a CPU
        without FWB and DIC, a cacheable VM_PFNMAP VMA (EINVAL); before v5.5 it
        also rejects a writable slot over a VMA without VM_WRITE
        (``arm64_prepare_write_check``) and before v5.14 premaps VM_PFNMAP ranges
        (``kvm_phys_addr_ioremap``, ``arm64_prepare_premap``, fd6f17bade21): from
        v5.5 to v5.13 a read-only PFNMAP VMA behind a writable slot is premapped
        writable."""
        cacheable_refused = vm.variant.arm64_cacheable_pfnmap_check \
            and not kvm_supports_cacheable_pfnmap(vm)
        mte_refuses = None
        if vm.mte_enabled:
            if kvm_slot_has_gmem(new):
                # an MTE VM takes no guest_memfd slot (with arm64's guest_memfd, v6.18;
                # release believed)
                raise KernelError("EINVAL", CALL, "arm64: a guest_memfd slot in an MTE VM")
            variant = vm.variant

            def mte_refuses(vma: Vma) -> bool:
                return not kvm_vma_mte_allowed(variant, vma.flags)
        yield from prepare_vma_walk(vm, new, change, premap=vm.variant.arm64_prepare_premap,
                                    check_write=vm.variant.arm64_prepare_write_check,
                                    refuse_cacheable_pfnmap=cacheable_refused,
                                    refuse_mte=mte_refuses)

    # --- capabilities --------------------------------------------------------

    def stage2_options(self, cpu_features: frozenset[str]) -> dict[str, bool]:
        """FEAT_S2FWB changes the stage-2 MemAttr encodings (``stage2_has_fwb``)."""
        return {"fwb": "fwb" in cpu_features}

    def vm_ioctl_enable_cap(self, vm: Kvm, cap: int, flags: int, args: tuple[int, ...]
                            ) -> None:
        """``kvm_vm_ioctl_enable_cap`` (arch/arm64/kvm/arm.c): ``flags`` must be 0;
        KVM_CAP_ARM_MTE (v5.14) makes an MTE VM: EINVAL on a CPU without MTE
        (``system_supports_mte``) or once a vCPU exists (``kvm->created_vcpus``), and
        with arm64's guest_memfd (v6.18) while a guest_memfd slot exists.  Any other
        capability: EINVAL."""
        if flags:
            raise KernelError("EINVAL", "KVM_ENABLE_CAP", f"flags {flags:#x} must be 0")
        if cap != KVM_CAP_ARM_MTE or not vm.variant.arm64_mte:
            super().vm_ioctl_enable_cap(vm, cap, flags, args)
            return
        if "mte" not in vm.cpu_features:
            raise KernelError("EINVAL", "KVM_ENABLE_CAP", "KVM_CAP_ARM_MTE: the CPU has no "
                              "MTE (system_supports_mte)")
        if vm.created_vcpus:
            raise KernelError("EINVAL", "KVM_ENABLE_CAP", "KVM_CAP_ARM_MTE after "
                              f"{vm.created_vcpus} vCPU(s) were created")
        if vm.variant.arm64_guest_memfd and any(
                kvm_slot_has_gmem(s) for s in vm.for_each_memslot()):
            raise KernelError("EINVAL", "KVM_ENABLE_CAP", "KVM_CAP_ARM_MTE with a "
                              "guest_memfd slot")
        vm.mte_enabled = True


def kvm_supports_cacheable_pfnmap(vm: Kvm) -> bool:
    """``kvm_supports_cacheable_pfnmap``: the CPU has FWB (stage-2 forced write-back)
    and ``CTR_EL0.DIC``, so KVM needs no cache maintenance through a kernel mapping."""
    return {"fwb", "dic"} <= vm.cpu_features


KVM_CAP_ARM_MTE = 205
KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED = 243


def kvm_vm_ioctl_check_extension(vm: Kvm, cap: int) -> int:
    """What ``KVM_CHECK_EXTENSION`` answers for the arm64 capabilities modelled here:
    KVM_CAP_ARM_MTE (``system_supports_mte()``, v5.14) and
    KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED (``kvm_supports_cacheable_pfnmap()``,
    v6.17); 0 for either before it existed."""
    if cap == KVM_CAP_ARM_MTE:
        return int(vm.variant.arm64_mte and "mte" in vm.cpu_features)
    if cap == KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED:
        return int(vm.variant.arm64_cacheable_pfnmap_check and kvm_supports_cacheable_pfnmap(vm))
    return 0


def kvm_vma_mte_allowed(variant: Variant, vm_flags: int) -> bool:
    """Whether an MTE VM may map the VMA: ``kvm_vma_mte_allowed`` (v6.2, d89585fbb308
    and c911f0d46879): VM_MTE_ALLOWED; before, any VMA but a VM_SHARED one (v5.14,
    the ``VM_SHARED`` tests of prepare and ``user_mem_abort``)."""
    if variant.arm64_mte_allowed_check:
        return bool(vm_flags & VM_MTE_ALLOWED)
    return not vm_flags & VM_SHARED


def stage2_memattr(variant: Variant, device: bool, vm_flags: int) -> MemAttr:
    """The memory type ``user_mem_abort`` gives the leaf: Normal (write-back) for
    cacheable memory; for device memory Device-nGnRE, or Normal-NC when the VMA is
    VM_ALLOW_ANY_UNCACHED (v6.9, 8c47ce3e1d2c: ``KVM_PGTABLE_PROT_NORMAL_NC``)."""
    if not device:
        return MemAttr.NORMAL
    if variant.arm64_allow_any_uncached and vm_flags & VM_ALLOW_ANY_UNCACHED:
        return MemAttr.NORMAL_NC
    return MemAttr.DEVICE
