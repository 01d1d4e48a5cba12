"""``include/linux/kvm_host.h`` as the architectures see it: what their code
needs of ``struct kvm`` (:class:`Kvm`) and ``struct kvm_vcpu`` (:class:`KvmVcpu`),
and the ``kvm_arch_*`` hooks every architecture implements (:class:`ArchKvm`).

What every architecture's KVM MMU provides, and the pieces they share.

An :class:`ArchKvm` is the per-architecture half of KVM's MMU
(``arch/*/kvm/mmu.c``): the stage-2 fault handler, the notifier zap
(``kvm_unmap_gfn_range``), the memslot hooks (``kvm_arch_prepare_memory_region``,
``kvm_arch_commit_memory_region``, ``kvm_arch_flush_shadow_memslot``),
dirty-log write protection and ``KVM_PRE_FAULT_MEMORY``, and the attributes in
which the architectures differ (the generic code tests no architecture by name).
``kvm/arm64.py``, ``kvm/x86.py`` and ``kvm/riscv.py`` implement it;
:func:`kvmmem.kvm.arches.make_arch_kvm` picks one.

The memslot hooks here are arm64's (``arch/arm64/kvm/mmu.c``), which riscv copied
into ``arch/riscv/kvm/mmu.c`` and keeps with the differences the attributes name;
x86 overrides all three.  They decide; the stage-2 work is the ``hooks`` object's
(:class:`MemslotHookContext`, implemented by
:class:`~kvmmem.kvm.arches.ArchMemslotHooks`: the VM's primitives and options).

:class:`Kvm` and :class:`KvmVcpu` are protocols: :class:`kvmmem.kvm.vm.Vm` and
:class:`kvmmem.kvm.vcpu.Vcpu` satisfy them, so the arch code, the vCPU, the
MMU notifier, prepare and prefault depend on this module and never on ``vm.py``
(dependencies run vm -> arch classes -> shared helpers, never back).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

from sortedcontainers import SortedDict

from kvmmem.errors import KernelError
from kvmmem.kvm.memory_slot import DirtyRingPush
from kvmmem.kvm.memslot import CALL, KVM_MEM_LOG_DIRTY_PAGES, KvmMrChange
from kvmmem.sync import Op
from kvmmem.variants import Variant

if TYPE_CHECKING:
    from kvmmem.arch.pgtable import MemAttr, Stage2, Translation
    from kvmmem.host import Mm
    from kvmmem.kvm.fault import Access, AccessResult, FaultResult
    from kvmmem.kvm.memslot import MemorySlot, VmMemslots
    from kvmmem.kvm.stats import EventLog, Stats
    from kvmmem.types import PageGeometry

PG_LEVEL_4K = 1
PG_LEVEL_2M = 2
"""Page-table levels for ``write_protect_memslot`` (x86 PG_LEVEL_4K / PG_LEVEL_2M)."""
KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3


class MemAttrArray:
    """``kvm->mem_attr_array`` (v6.8; an xarray of multi-index entries there): disjoint
    ``[start, end)`` gfn intervals -> attributes (absent: 0)."""

    __slots__ = ("_ranges",)

    def __init__(self) -> None:
        self._ranges: SortedDict = SortedDict()  # start -> (end, attrs)

    def get(self, gfn: int) -> int:
        """``kvm_get_memory_attributes``."""
        i = self._ranges.bisect_right(gfn)
        if i:
            start = self._ranges.keys()[i - 1]
            end, attrs = self._ranges[start]
            if gfn < end:
                return int(attrs)
        return 0

    def uniform(self, start: int, end: int, attrs: int) -> bool:
        """``kvm_range_has_memory_attributes(kvm, start, end, ~0, attrs)``: every gfn of
        ``[start, end)`` has exactly ``attrs``."""
        pos = start
        for s, (e, a) in self._overlapping(start, end):
            if a != attrs or (s > pos and attrs):
                return False  # another value, or a gap (attributes 0) before this range
            pos = max(pos, e)
        return pos >= end or not attrs

    def set(self, start: int, end: int, attrs: int) -> None:
        """Give ``[start, end)`` the attributes ``attrs`` (0 erases)."""
        for s, (e, a) in list(self._overlapping(start, end)):
            del self._ranges[s]
            if s < start:
                self._ranges[s] = (start, a)
            if e > end:
                self._ranges[end] = (e, a)
        if attrs:
            self._ranges[start] = (end, attrs)

    def ranges(self) -> list[tuple[int, int, int]]:
        """Every ``(start, end, attrs)``, in gfn order."""
        return [(s, e, a) for s, (e, a) in self._ranges.items()]

    def _overlapping(self, start: int, end: int) -> list[tuple[int, tuple[int, int]]]:
        out = []
        i = self._ranges.bisect_right(start)
        if i:
            i -= 1
        keys = self._ranges.keys()
        while i < len(keys):
            s = keys[i]
            if s >= end:
                break
            e, a = self._ranges[s]
            if e > start:
                out.append((s, (e, a)))
            i += 1
        return out



def kvm_mem_is_private(kvm: Kvm, gfn: int) -> bool:
    """``kvm_mem_is_private``: the gfn's attributes say PRIVATE."""
    return bool(kvm.mem_attr_array.get(gfn) & KVM_MEMORY_ATTRIBUTE_PRIVATE)





class KvmVcpu(Protocol):
    """What the arch code needs of ``struct kvm_vcpu`` (:class:`kvmmem.kvm.vcpu.Vcpu`)."""

    unmarked_dirty: int | None
    """Published for the explorer: a gfn made writable, not yet marked dirty."""

    @property
    def vm(self) -> Kvm:
        """``vcpu->kvm``."""
        ...

    @property
    def dirty_ring(self) -> DirtyRingPush | None:
        """``vcpu->dirty_ring`` (kvm/dirty_ring.py), None without a ring."""
        ...

    @property
    def index(self) -> int:
        """``vcpu->vcpu_idx``."""
        ...

    def gfn_to_memslot(self, gfn: int) -> MemorySlot | None:
        """``kvm_vcpu_gfn_to_memslot``."""
        ...


class Kvm(Protocol):
    """What the arch code, the vCPU, the MMU notifier, prepare and prefault need of
    ``struct kvm`` (:class:`kvmmem.kvm.vm.Vm`, which documents each member)."""

    mmu_invalidate_seq: int
    mmu_invalidate_in_progress: int
    mem_attr_array: MemAttrArray
    mmu_invalidate_range_start: int
    mmu_invalidate_range_end: int
    mn_active_invalidate_count: int
    manual_dirty_log_protect: int
    dirty_ring_size: int
    dirty_ring_with_bitmap: bool
    created_vcpus: int
    mte_enabled: bool

    @property
    def arch(self) -> ArchKvm: ...

    @property
    def has_private_mem(self) -> bool:
        """``kvm_arch_has_private_mem``."""
        ...

    @property
    def cpu_features(self) -> frozenset[str]: ...

    @property
    def variant(self) -> Variant: ...

    @property
    def mm(self) -> Mm: ...

    @property
    def pg(self) -> PageGeometry:
        """The host's page geometry (the mm's: ``PAGE_SIZE``, ``PMD_SIZE``, ...)."""
        ...

    @property
    def stage2(self) -> Stage2: ...

    @property
    def stats(self) -> Stats: ...

    @property
    def log(self) -> EventLog | None: ...

    @property
    def memslots(self) -> VmMemslots: ...

    @property
    def prepare_vma_checks(self) -> bool: ...

    @property
    def loaded_roots(self) -> set[int]: ...

    @property
    def obsolete_roots(self) -> set[int]: ...

    def set_manual_dirty_log_protect(self, value: int) -> None: ...

    @property
    def vcpus(self) -> Sequence[KvmVcpu]: ...

    @property
    def arch_name(self) -> str: ...

    def gfn_to_memslot(self, gfn: int, as_id: int = 0) -> MemorySlot | None: ...

    def for_each_memslot(self, as_id: int = 0) -> Iterator[MemorySlot]: ...

    def gfn_ranges_for_hva(self, start: int, end: int) -> list[tuple[MemorySlot, int, int]]: ...

    def stage2_lookup(self, gpa: int) -> Translation | None: ...

    def install(self, slot: MemorySlot, gpa: int, pfn: int, size: int, *, write: bool,
                execute: bool, device: bool, access: Access | None,
                lookup: int | None = None, prefetch: bool = False,
                attr: MemAttr | None = None) -> None: ...

    def touch_frame(self, pfn: int, gpa: int, size: int, access: Access, value: int
                    ) -> AccessResult: ...

    def flush_remote_tlbs(self, zap: bool = True) -> None: ...

    def zap_gfn_range(self, start: int, end: int) -> bool: ...

    def vcpu_enter_guest(self, index: int) -> None: ...

    def zap_all(self) -> None: ...

    def stage2_test_young(self, gfn_start: int, gfn_end: int, clear: bool) -> bool: ...


class MemslotHookContext(Protocol):
    """What an architecture's memslot hooks work with
    (:class:`kvmmem.kvm.arches.ArchMemslotHooks`): the VM's options and its stage-2
    primitives, each an :data:`Op`."""

    variant: Variant
    phys_bits: int
    slot_zap_all: bool
    eager_page_split: bool
    pml: bool
    external_page_track: bool

    def kvm_dirty_log_manual_protect_and_init_set(self) -> bool: ...

    def prepare_vma_walk(self, old: MemorySlot | None, new: MemorySlot,
                         change: KvmMrChange) -> Op[None]: ...

    def zap_all(self) -> Op[None]: ...

    def zap_memslot(self, slot: MemorySlot) -> Op[None]: ...

    def write_protect_memslot(self, slot: MemorySlot, min_level: int) -> Op[None]: ...

    def clear_dirty_memslot(self, slot: MemorySlot) -> Op[None]: ...

    def split_memslot(self, slot: MemorySlot) -> Op[None]: ...

    def recover_huge_pages(self, slot: MemorySlot) -> Op[None]: ...

    def flush_remote_tlbs_memslot(self, slot: MemorySlot) -> Op[None]: ...


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
    retry_checks_gfn = False
    """Whether a fault's invalidation retry check tests the faulting gfn against the
    range being invalidated (x86 ``mmu_invalidate_retry_gfn``) rather than any
    invalidation in progress (arm64/riscv ``mmu_invalidate_retry``)."""
    retries_invalid_slot = False
    """Whether a fault on an INVALID (being deleted or moved) memslot is answered
    RETRY (x86 ``kvm_mmu_faultin_pfn``); arm64 and riscv handle it as no slot."""
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
    splits_on_log_enable = False
    """Whether enabling dirty logging always calls the eager split
    (``kvm_mmu_split_memory_region``: arm64), not only with ``eager_page_split``."""

    unknown_vm_ioctl_errno = "EINVAL"
    """What ``kvm_arch_vm_ioctl`` answers an ioctl it does not know (arm64 and riscv
    EINVAL; x86 ENOTTY): a VM ioctl compiled out, e.g. KVM_CREATE_GUEST_MEMFD."""
    guest_memfd_switch = ""
    """The :class:`~kvmmem.variants.Variant` switch saying whether the release's KVM has
    guest_memfd (``CONFIG_KVM_GUEST_MEMFD``) on this architecture ("": never)."""
    memory_attributes = False
    """Whether the arch selects ``CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES`` with guest_memfd
    (x86, v6.8; neither arm64 nor riscv up to 7.3)."""
    dirty_log_initially_set_switch = ""
    """The switch saying whether KVM_DIRTY_LOG_INITIALLY_SET is offered (the arch
    defines ``KVM_DIRTY_LOG_MANUAL_CAPS`` with it; kvmmem.kvm.dirty_log)."""
    dirty_ring_switch = ""
    """The switch saying whether the release's KVM has the dirty ring on this arch
    (kvmmem.kvm.dirty_ring; "": never)."""
    dirty_ring_plain = False
    """The ring is offered as KVM_CAP_DIRTY_LOG_RING (x86; its ACQ_REL form from
    v6.1), not only as KVM_CAP_DIRTY_LOG_RING_ACQ_REL (arm64, riscv)."""
    dirty_ring_with_bitmap = False
    """KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP is offered with the ring (arm64)."""

    huge_pfnmap: tuple[str, ...] = ()
    """The levels of special huge leaves the host kernel of this architecture can put in
    a PFNMAP VMA (``CONFIG_ARCH_SUPPORTS_PMD_PFNMAP`` / ``_PUD_PFNMAP``, v6.12): a
    driver's ``huge_fault`` (vfio-pci) inserts them."""

    def stage2_options(self, cpu_features: frozenset[str]) -> dict[str, bool]:
        """The stage-2 format options the CPU's features select (arm64 FEAT_S2FWB)."""
        return {}

    def vm_ioctl_enable_cap(self, vm: Kvm, cap: int, flags: int, args: tuple[int, ...]
                            ) -> None:
        """``kvm_vm_ioctl_enable_cap``, the arch part of KVM_ENABLE_CAP: a capability
        the generic code does not know.  Raises KernelError EINVAL for one the arch
        does not know either."""
        raise KernelError("EINVAL", "KVM_ENABLE_CAP",
                          f"capability {cap} is not enabled by the model on {self.name}")

    @staticmethod
    def switch_on(variant: Variant, switch: str) -> bool:
        """Whether ``variant`` has the named switch on ("": an arch that never has it)."""
        return bool(switch and getattr(variant, switch))

    def has_memory_attributes(self, variant: Variant) -> bool:
        """Whether KVM_SET_MEMORY_ATTRIBUTES exists (``CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES``
        comes with guest_memfd where the arch selects it)."""
        return self.memory_attributes and self.has_guest_memfd(variant)

    def has_guest_memfd(self, variant: Variant) -> bool:
        """Whether KVM_CREATE_GUEST_MEMFD exists in ``variant`` for this architecture."""
        return self.switch_on(variant, self.guest_memfd_switch)

    def binds_guest_memfd(self, variant: Variant, private_mem: bool = False) -> bool:
        """Whether the VM accepts KVM_MEM_GUEST_MEMFD (``check_memory_region_flags``: with
        guest_memfd, before v6.18 only a VM with private memory; from v6.18 any VM)."""
        return self.has_guest_memfd(variant) and (variant.gmem_mmap or private_mem)

    def check_gmem_slot(self, variant: Variant, new: MemorySlot) -> None:
        """The arch prepare hook's guest_memfd rule (arm64); nothing by default."""

    # --- faults ------------------------------------------------------------

    def mmio_exit_error(self, gpa: int, length: int) -> str | None:
        """The errno with which KVM_RUN fails instead of exiting for an MMIO access of
        ``length`` bytes at ``gpa`` (``None``: the exit is made)."""
        return None

    def handle_fault(self, vm: Kvm, vcpu: KvmVcpu, gpa: int, access: Access) -> Op[FaultResult]:
        """The stage-2 fault handler for an access that missed in the walk."""
        raise NotImplementedError

    def elide_tlb_flush_if_young(self, vm: Kvm) -> bool:
        """``CONFIG_KVM_ELIDE_TLB_FLUSH_IF_YOUNG``: whether ``clear_flush_young``
        skips its TLB flush (x86 only, v6.13)."""
        return False

    # --- notifier zap ------------------------------------------------------

    def unmap_gfn_range(self, vm: Kvm, slot: MemorySlot, start: int, end: int) -> bool:
        """``kvm_unmap_gfn_range``: zap leaves for gfns ``[start, end)``;
        returns whether a TLB flush is needed."""
        return vm.zap_gfn_range(start, end)

    # --- memslot hooks ---------------------------------------------------------

    def memslot_phys_bits(self, ipa_bits: int) -> int | None:
        """The width the memslot hooks check a slot's end against, given the stage-2
        table's input width: the IPA / G-stage GPA size (None: :attr:`default_phys_bits`)."""
        return ipa_bits

    def ipa_limit_inclusive(self, variant: Variant) -> bool:
        """Whether prepare refuses a slot that *reaches* the IPA size (``>=``; arm64
        before v5.12, riscv still) rather than one that exceeds it."""
        return variant.ipa_limit_off_by_one

    def prepare_memory_region(self, hooks: MemslotHookContext, old: MemorySlot | None,
                              new: MemorySlot | None, change: KvmMrChange) -> Op[None]:
        """``kvm_arch_prepare_memory_region`` (arm64; riscv's copy): a slot ending
        beyond the IPA size is EFAULT, then the VMA walk (:meth:`prepare_vma_walk`,
        reached through ``hooks``)."""
        if change == KvmMrChange.DELETE or new is None:
            return
        limit = 1 << (hooks.phys_bits - new.page_shift)
        end = new.base_gfn + new.npages
        if self.ipa_limit_inclusive(hooks.variant):
            if end >= limit:
                raise KernelError("EFAULT", CALL, f"{self.name}: slot reaches the GPA size")
        elif end > limit:
            raise KernelError("EFAULT", CALL, f"{self.name}: slot beyond the IPA size")
        self.check_gmem_slot(hooks.variant, new)
        yield from hooks.prepare_vma_walk(old, new, change)

    def flush_shadow_memslot(self, hooks: MemslotHookContext, slot: MemorySlot) -> Op[None]:
        """``kvm_arch_flush_shadow_memslot`` (arm64 ``unmap_stage2_range``, riscv
        ``kvm_riscv_gstage_unmap_range``): the slot's range."""
        yield from hooks.zap_memslot(slot)

    def commit_memory_region(self, hooks: MemslotHookContext, old: MemorySlot | None,
                             new: MemorySlot | None, change: KvmMrChange) -> Op[None]:
        """``kvm_arch_commit_memory_region`` (arm64; riscv's copy): a slot that logs
        (CREATE and MOVE included) is write-protected (``kvm_mmu_wp_memory_region``)
        and split (:attr:`splits_on_log_enable`, or with ``eager_page_split``),
        unless manual protect with ``KVM_DIRTY_LOG_INITIALLY_SET``."""
        logging = new is not None and bool(new.flags & KVM_MEM_LOG_DIRTY_PAGES)
        if new is None or not logging or change == KvmMrChange.DELETE:
            return
        if hooks.kvm_dirty_log_manual_protect_and_init_set():
            return
        yield from hooks.write_protect_memslot(new, PG_LEVEL_4K)
        if self.splits_on_log_enable or hooks.eager_page_split:
            yield from hooks.split_memslot(new)

    def prepare_vma_walk(
        self, vm: Kvm, old: MemorySlot | None, new: MemorySlot, change: KvmMrChange
    ) -> Op[None]:
        """The VMA walk of ``kvm_arch_prepare_memory_region`` (arm64, riscv);
        x86 has none.  Raises KernelError to refuse the change."""
        return
        yield  # pragma: no cover

    # --- prefault ------------------------------------------------------------

    def pre_fault_memory(self, vm: Kvm, vcpu: KvmVcpu, gpa: int) -> Op[int]:
        """``kvm_arch_vcpu_pre_fault_memory`` for one page: bytes mapped from
        ``gpa`` (> 0) or raises KernelError.  Only reached where
        :attr:`has_pre_fault_memory` is set."""
        raise KernelError("EOPNOTSUPP", "KVM_PRE_FAULT_MEMORY",
                          f"{self.name} has no kvm_arch_vcpu_pre_fault_memory")
        yield  # pragma: no cover
