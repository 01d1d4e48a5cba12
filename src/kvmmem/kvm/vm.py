"""The VM: memslots over a host mm, a stage-2 table, the MMU-notifier state,
vCPUs, dirty logging and prefault.

``Vm`` holds what ``struct kvm`` holds for this model (kernel-semantics.md
§10.1): the memslots of each address space, ``mmu_invalidate_seq`` /
``mmu_invalidate_in_progress`` / the in-progress gfn range /
``mn_active_invalidate_count``, one stage-2 table (the architecture's real
entry format) and the vCPUs.  Everything an architecture does differently
lives in its :class:`~kvmmem.kvm.kvm_host.ArchKvm` (``kvm/arm64.py``,
``kvm/x86.py``, ``kvm/riscv.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from kvmmem.arch import make_stage2
from kvmmem.arch.pgtable import MemAttr, Tlbi, Translation
from kvmmem.errors import InputError, KernelError
from kvmmem.host import Mm
from kvmmem.kvm.arches import ArchMemslotHooks, make_arch_kvm
from kvmmem.kvm.arm64 import KVM_CAP_ARM_MTE
from kvmmem.kvm.guest_memfd import GmemFile, kvm_gmem_bind, kvm_gmem_create, kvm_gmem_unbind
from kvmmem.kvm.kvm_host import MemAttrArray
from kvmmem.kvm.memory_attributes import kvm_vm_ioctl_set_mem_attributes_op
from kvmmem.kvm.memslot import (
    KvmMrChange,
    KvmUserspaceMemoryRegion,
    MemorySlot,
    VmMemslots,
    memslot_limits,
)
from kvmmem.kvm.mmu_notifier import INVALID_GPA, KvmMmuNotifier
from kvmmem.kvm.stats import EventLog, Stats
from kvmmem.kvm.vcpu import Access, AccessResult, Vcpu
from kvmmem.sync import Op, acquire, drive, release
from kvmmem.types import CPU_FEATURES, VM_TYPES, PageGeometry, format_size
from kvmmem.variants import UPSTREAM, Variant, get_variant

if TYPE_CHECKING:
    from kvmmem.kvm.kvm_host import ArchKvm

ARCHES = ("x86", "arm64", "riscv")
MTE_ENABLE_CALL = "KVM_ENABLE_CAP(KVM_CAP_ARM_MTE)"
"""How a refused ``mte`` VM setup names the call (``Vm(mte=True)``)."""


def configure_host(mm: Mm, variant: Variant, huge_pfnmap: tuple[str, ...],
                   cpu_features: frozenset[str]) -> None:
    """Give the host mm the release's driver behaviour (vfio-pci's BAR mapping) and the
    CPU's: the huge PFNMAP leaf sizes the architecture has (``huge_pfnmap``, since
    v6.12 with vfio-pci's huge_fault) and MTE (``system_supports_mte``, arm64
    ``cpu_features`` mte)."""
    mm.vfio_pci_mmap = variant.vfio_pci_mmap
    mm.vfio_huge_fault_pfn_check = variant.vfio_huge_fault_pfn_check
    mm.vfio_huge_fault_align = variant.vfio_huge_fault_align
    mm.vfio_allow_any_uncached = variant.arm64_allow_any_uncached
    mm.huge_pfnmap = huge_pfnmap
    mm.mte = "mte" in cpu_features
    mm.hugetlb_mte_allowed = variant.hugetlb_mte_allowed

PAGE_SIZES: dict[str, tuple[int, ...]] = {"x86": (4096,), "arm64": (4096, 16384, 65536),
                                          "riscv": (4096,)}
"""The host page sizes each architecture's kernel can be built with: arm64
``CONFIG_ARM64_{4K,16K,64K}_PAGES``; x86-64 and riscv64 have 4 KiB pages only (riscv's
Svnapot sizes are hugetlb sizes, not base pages)."""


def check_page_size(arch: str, pg: PageGeometry, granule: int | None = None) -> None:
    """Raise :class:`InputError` unless ``arch`` runs hosts with ``pg``'s pages and
    ``granule`` (the scenario's stage-2 ``granule``, if given) is that page size: arm64
    stage-2 always uses the host ``PAGE_SIZE`` as its granule (``kvm_get_vtcr``: VTCR_EL2.TG0
    from ``PAGE_SHIFT``), the other architectures 4 KiB."""
    if pg.page_size not in PAGE_SIZES.get(arch, (4096,)):
        raise InputError(f"page_size: {pg.name} host pages are arm64's (CONFIG_ARM64_"
                         f"{pg.name}_PAGES); {arch} hosts have 4K pages")
    if granule is not None and granule != pg.page_size:
        raise InputError(f"granule: {format_size(granule)} differs from page_size "
                         f"{pg.name}: the stage-2 granule is the host's PAGE_SIZE "
                         f"(set page_size: {format_size(granule)}, or drop granule)")


class Vm:
    """One VM (``KVM_CREATE_VM``) on the host address space ``mm``.

    ``arch`` is ``x86``, ``arm64`` or ``riscv``; ``variant`` a name from
    :mod:`kvmmem.variants` or a :class:`Variant`.

    The host page size is the mm's (``mm.pg``; a fresh 4 KiB mm when ``mm`` is None):
    arm64 hosts run 4 KiB, 16 KiB or 64 KiB pages, x86 and riscv 4 KiB only.  gfns,
    memslot alignment, the stage-2 granule (arm64 uses the host ``PAGE_SIZE``:
    ``granule`` may only repeat it) and the block sizes follow it.  Raises
    :class:`InputError` for an unknown arch, variant or granule, a page size the arch
    has not, or a granule other than the page size."""

    def __init__(
        self,
        arch: str,
        *,
        variant: str | Variant = UPSTREAM,
        mm: Mm | None = None,
        vcpus: int = 1,
        granule: int | None = None,
        ipa_bits: int | None = None,
        cpu_features: Iterable[str] = (),
        vm_type: str = "default",
        dirty_ring: int = 0,
        dirty_ring_with_bitmap: bool = False,
        mte: bool = False,
    ) -> None:
        if arch not in ARCHES:
            raise InputError(f"arch: unknown architecture {arch!r} (known: {', '.join(ARCHES)})")
        if not isinstance(vcpus, int) or vcpus < 1:
            raise InputError(f"vcpus: must be a positive integer, got {vcpus!r}")
        self.arch_name = arch
        self.cpu_features = frozenset(cpu_features)
        """The host CPU's optional features the arch code asks about (arm64 ``fwb``,
        ``dic``: :data:`CPU_FEATURES`); none by default, as on QEMU's ``-cpu max``."""
        unknown = self.cpu_features - set(CPU_FEATURES)
        if unknown:
            raise InputError(f"cpu_features: unknown feature {sorted(unknown)[0]!r} "
                             f"(known: {', '.join(CPU_FEATURES)})")
        self.variant = get_variant(variant) if isinstance(variant, str) else variant
        missing = self.variant.arch_unsupported(arch)
        if missing is not None:
            raise InputError(missing)
        if vm_type not in VM_TYPES:
            raise InputError(f"vm_type: unknown VM type {vm_type!r} (known: "
                             f"{', '.join(VM_TYPES)})")
        if vm_type == "sw_protected" and not make_arch_kvm(arch).has_memory_attributes(
                self.variant):
            raise InputError(f"vm_type: sw_protected is x86's KVM_X86_SW_PROTECTED_VM (v6.8); "
                             f"{arch} KVM of {self.variant.name} has no such VM type")
        self.vm_type = vm_type
        """The KVM_CREATE_VM type: ``default`` or x86 ``sw_protected``."""
        self.mem_attr_array = MemAttrArray()
        """Per-gfn memory attributes (KVM_SET_MEMORY_ATTRIBUTES, kvmmem.kvm.memory_attributes)."""
        self.mm = mm if mm is not None else Mm()
        self.pg: PageGeometry = self.mm.pg
        """The host's page geometry, the mm's (``PAGE_SIZE``, ``PMD_SIZE``, ...)."""
        self.page_shift = self.pg.page_shift
        self.page_size = self.pg.page_size
        check_page_size(arch, self.pg, granule)
        # The host kernel is the variant's release too (host mm history), on this
        # architecture's CPU.
        self.mm.hugetlb_madv_dontneed = self.variant.hugetlb_madv_dontneed
        self.arch: ArchKvm = make_arch_kvm(arch)
        configure_host(self.mm, self.variant, self.arch.huge_pfnmap, self.cpu_features
                       if arch == "arm64" else frozenset())
        # arm64 stage-2 always uses the host PAGE_SIZE as its granule (kvm_get_vtcr
        # picks VTCR_EL2.TG0 from it); x86 EPT and the riscv G-stage are 4K.
        self.stage2 = make_stage2(arch, granule=self.pg.page_size, ipa_bits=ipa_bits,
                                  **self.arch.stage2_options(self.cpu_features))
        self.stage2.tlbi_listeners.append(self._on_tlbi)
        self.zapping = False
        self.prepare_vma_checks = True
        """arm64/riscv: whether the prepare-time VMA walk refuses (EPERM, EINVAL).
        Off only for re-creating a reached state (validate_path_independence)."""
        self.stats = Stats(leaves=self._leaf_sizes, page_size=self.pg.page_size)
        self.log: EventLog | None = None
        # KVM_USER_MEM_SLOTS of the variant's release (509/512 before v5.12).
        self.memslots = VmMemslots(
            memslot_limits(arch, user_mem_slots=self.variant.user_mem_slots(arch),
                           guest_memfd=self.arch.binds_guest_memfd(
                               self.variant, self.has_private_mem),
                           page_shift=self.pg.page_shift),
            hooks=VmMemslotHooks(self))
        self.manual_dirty_log_protect = 0
        """``kvm->manual_dirty_log_protect``: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2's
        ``args[0]`` (kvm/dirty_log.py), 0 until it is enabled."""
        self.mmu_invalidate_seq = 0
        self.mmu_invalidate_in_progress = 0
        self.mmu_invalidate_range_start = INVALID_GPA
        self.mmu_invalidate_range_end = INVALID_GPA
        self.mn_active_invalidate_count = 0
        self.dirty_ring_size = 0
        """``kvm->dirty_ring_size``: bytes of each vCPU's dirty ring, 0 without one."""
        self.dirty_ring_with_bitmap = False
        """``kvm->dirty_ring_with_bitmap`` (KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP, arm64)."""
        self.created_vcpus = 0
        self.mte_enabled = False
        """``kvm_has_mte()``: KVM_CAP_ARM_MTE was enabled (arm64, kvm/arm64.py)."""
        if dirty_ring:
            # The VMM enables the ring right after KVM_CREATE_VM, before any vCPU
            # (KVM_ENABLE_CAP; KernelError as the kernel answers it).
            from kvmmem.kvm.dirty_ring import (
                KVM_CAP_DIRTY_LOG_RING,
                KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
                dirty_ring_caps,
                kvm_vm_ioctl_enable_dirty_log_ring,
                kvm_vm_ioctl_enable_dirty_log_ring_with_bitmap,
            )
            cap = KVM_CAP_DIRTY_LOG_RING_ACQ_REL \
                if KVM_CAP_DIRTY_LOG_RING_ACQ_REL in dirty_ring_caps(self) \
                else KVM_CAP_DIRTY_LOG_RING
            kvm_vm_ioctl_enable_dirty_log_ring(self, cap, dirty_ring)
            if dirty_ring_with_bitmap:
                kvm_vm_ioctl_enable_dirty_log_ring_with_bitmap(self, 0)
        if mte:
            # KVM_ENABLE_CAP(KVM_CAP_ARM_MTE), also before any vCPU (kvm/arm64.py)
            from kvmmem.kvm.dirty_log import kvm_vm_ioctl_enable_cap
            try:
                kvm_vm_ioctl_enable_cap(self, KVM_CAP_ARM_MTE, 0, ())
            except KernelError as err:
                raise KernelError(err.errno, MTE_ENABLE_CALL, err.reason) from None
        self.vcpus = [self._create_vcpu(i) for i in range(vcpus)]
        self.notifier = KvmMmuNotifier(self)
        self.mm.mmu_notifier_register(self.notifier)
        self.closed = False
        self.loaded_roots: set[int] = set()
        """x86: the vCPUs (indices) that have loaded a TDP root: on their first KVM_RUN or
        KVM_PRE_FAULT_MEMORY (``kvm_mmu_reload``)."""
        self.obsolete_roots: set[int] = set()
        """x86: the vCPUs whose root ``kvm_mmu_zap_all_fast`` (a memslot delete or move)
        made obsolete and that have not entered the guest since.  Before v6.15 a
        KVM_PRE_FAULT_MEMORY on such a vCPU retries forever
        (``x86_prefault_frees_obsolete_root``, kvm/x86.py)."""

    def _create_vcpu(self, index: int) -> Vcpu:
        """``kvm_vm_ioctl_create_vcpu``: the vCPU, with its dirty ring in a ring VM."""
        vcpu = Vcpu(self, index)
        if self.dirty_ring_size:
            from kvmmem.kvm.dirty_ring import kvm_dirty_ring_alloc
            vcpu.dirty_ring = kvm_dirty_ring_alloc(self, index)
        self.created_vcpus += 1
        return vcpu

    def set_manual_dirty_log_protect(self, value: int) -> None:
        """Set ``kvm->manual_dirty_log_protect`` (KVM_ENABLE_CAP, already checked) and
        what ``kvm_dirty_log_manual_protect_and_init_set()`` tells the memslot code
        (new bitmaps all set) and the arch commit hooks (no write protection)."""
        self.manual_dirty_log_protect = value
        init_set = bool(value & 2)  # KVM_DIRTY_LOG_INITIALLY_SET
        self.memslots.manual_protect_init_set = init_set
        hooks = self.memslots.hooks
        if isinstance(hooks, VmMemslotHooks):
            hooks.manual_protect_init_set = init_set

    def close(self) -> None:
        """Destroy the VM: unregister from the mm and drop every mapping."""
        if not self.closed:
            self.zap_all()
            self.mm.mmu_notifier_unregister(self.notifier)
            self.closed = True

    # --- memslots ----------------------------------------------------------

    def set_user_memory_region(
        self, slot: int, gpa: int, size: int, hva: int, flags: int = 0, *,
        guest_memfd: int = 0, guest_memfd_offset: int = 0, v2: bool = False,
    ) -> None:
        """``KVM_SET_USER_MEMORY_REGION`` (``v2``: ``..._REGION2`` with the guest_memfd
        fields) run to completion; raises KernelError."""
        drive(self.set_user_memory_region_op(slot, gpa, size, hva, flags,
                                             guest_memfd=guest_memfd,
                                             guest_memfd_offset=guest_memfd_offset, v2=v2))

    def set_user_memory_region_op(
        self, slot: int, gpa: int, size: int, hva: int, flags: int = 0, *,
        guest_memfd: int = 0, guest_memfd_offset: int = 0, v2: bool = False,
    ) -> Op[None]:
        """The memslot update as an operation (pauses at slots_lock, the
        INVALID-slot publication, SRCU synchronisation and mmu_lock)."""
        region = KvmUserspaceMemoryRegion(slot, flags, gpa, size, hva, guest_memfd_offset,
                                          guest_memfd)
        if self.log is not None:
            self.log.emit("kvm_set_user_memory_region", slot=slot, flags=flags, gpa=gpa,
                          size=size, hva=hva)
        self.stats.memslot_updates += 1
        yield from self.memslots.set_user_memory_region_op(region, v2)

    @property
    def has_private_mem(self) -> bool:
        """``kvm_arch_has_private_mem``: an x86 ``KVM_X86_SW_PROTECTED_VM``."""
        return self.vm_type == "sw_protected"

    def set_memory_attributes_op(self, gpa: int, size: int, attributes: int,
                                 flags: int = 0) -> Op[None]:
        """``KVM_SET_MEMORY_ATTRIBUTES`` (kvmmem.kvm.memory_attributes), as an op."""
        return kvm_vm_ioctl_set_mem_attributes_op(self, gpa, size, attributes, flags)

    def create_guest_memfd(self, size: int, flags: int = 0) -> GmemFile:
        """``KVM_CREATE_GUEST_MEMFD`` (kvmmem.kvm.guest_memfd); raises KernelError."""
        return kvm_gmem_create(self, size, flags)

    def gfn_to_memslot(self, gfn: int, as_id: int = 0) -> MemorySlot | None:
        """``gfn_to_memslot``: the slot of the active set covering ``gfn``, or None."""
        return self.memslots.gfn_to_memslot(gfn, as_id)

    def for_each_memslot(self, as_id: int = 0) -> Iterator[MemorySlot]:
        """The active slots of address space ``as_id`` in gfn order."""
        return self.memslots.for_each_memslot(as_id)

    def gfn_ranges_for_hva(self, start: int, end: int) -> list[tuple[MemorySlot, int, int]]:
        """``kvm_handle_hva_range``'s slot walk: each slot whose hva range
        meets ``[start, end)``, with the clipped gfn range ``[gfn_start, gfn_end)``."""
        return [(slot, int(a), int(b))
                for slot, a, b in self.memslots.gfn_ranges_for_hva(start, end)]

    # --- stage-2 helpers used by the vCPU and the arch code ------------------

    def stage2_lookup(self, gpa: int) -> Translation | None:
        """The hardware walk: the :class:`~kvmmem.arch.pgtable.Translation`
        ``(pfn, writable, executable)`` of the leaf mapping ``gpa``, or None when
        the walk faults (no valid leaf, or the access flag is clear on arm64)."""
        stage2 = self.stage2
        if gpa >> stage2.ipa_bits:
            return None
        return stage2.translate(gpa, self.arch.walk_sets_accessed)

    def install(self, slot: MemorySlot, gpa: int, pfn: int, size: int, *, write: bool,
                execute: bool, device: bool, access: Access | None,
                lookup: int | None = None, prefetch: bool = False,
                attr: MemAttr | None = None) -> None:
        """Install the leaf of ``size`` covering ``gpa`` -> ``pfn`` (caller holds
        mmu_lock).  ``access`` is the faulting access (None for a prefetch or
        a premap, which count no ``pf_fixed``); ``lookup`` as for
        :meth:`Stage2.map` (riscv); ``prefetch`` as for :meth:`Stage2.map` (x86
        ``make_spte``: the leaf starts without its accessed bit); ``attr`` the memory
        type where the arch chooses among more than two (arm64 Normal-NC), else
        ``device`` picks Device or Normal.  The generic install: what an architecture
        does around it (arm64's permission relaxing, x86's ``kvmmmu`` tracepoints) is
        in its fault path."""
        base_gpa = gpa & ~(size - 1)
        base_pfn = pfn - ((gpa - base_gpa) >> self.page_shift)
        self.stage2.map(base_gpa, base_pfn, size, read=True, write=write, execute=execute,
                        device=device, prefetch=prefetch, lookup=lookup, attr=attr)
        if access is not None:
            self.stats.pf_fixed += 1
        del slot

    def touch_frame(self, pfn: int, gpa: int, size: int, access: Access, value: int
                    ) -> AccessResult:
        """Perform the access on host frame ``pfn`` (the memory the guest reaches)."""
        offset = gpa & (self.page_size - 1)
        pm = self.mm.physmem
        if access is Access.WRITE:
            pm.write_int(pfn, offset, size, value)
            return AccessResult("ok")
        if access is Access.EXEC:
            return AccessResult("ok")
        return AccessResult("ok", value=pm.read_int(pfn, offset, size))

    def flush_remote_tlbs(self, zap: bool = True) -> None:
        """``kvm_flush_remote_tlbs``: every vCPU drops its cached translations.

        ``zap`` marks a flush that follows a zap; the ``no-tlb-flush`` mutation
        skips exactly those."""
        self.stats.remote_tlb_flush_requests += 1
        if zap and not self.variant.zap_flushes_tlb:
            return
        self.stats.remote_tlb_flush += 1
        if self.log is not None:
            self.log.emit("kvm_tlb_flush", vm=True)
        for vcpu in self.vcpus:
            vcpu.tlb_flush()

    def _on_tlbi(self, tlbi: Tlbi) -> None:
        """A TLB invalidation the stage-2 code issued itself (arm64 break-before-
        make and per-entry unmap): the vCPUs drop the matching translations,
        except, under ``no-tlb-flush``, those a zap asked for."""
        if self.zapping and not self.variant.zap_flushes_tlb:
            return
        if tlbi.size == 0:
            for vcpu in self.vcpus:
                vcpu.tlb_flush()
            return
        shift = self.pg.page_shift
        start = tlbi.gpa >> shift
        end = (tlbi.gpa + tlbi.size + (1 << shift) - 1) >> shift
        for vcpu in self.vcpus:
            vcpu.tlb_flush_gfn_range(start, end)

    def zap_gfn_range(self, start: int, end: int) -> bool:
        """Remove every stage-2 leaf for gfns ``[start, end)``; True if the
        caller must still flush TLBs (x86, riscv; arm64 invalidates per entry)."""
        self.zapping = True
        try:
            shift = self.pg.page_shift
            return self.stage2.unmap_range(start << shift, (end - start) << shift)
        finally:
            self.zapping = False

    def vcpu_enter_guest(self, index: int) -> None:
        """x86 ``vcpu_enter_guest`` before the guest runs: KVM_REQ_MMU_FREE_OBSOLETE_ROOTS
        frees an obsolete root and ``kvm_mmu_reload`` loads a valid one."""
        self.obsolete_roots.discard(index)
        self.loaded_roots.add(index)

    def zap_all(self) -> None:
        """``kvm_arch_flush_shadow_all``: drop every stage-2 mapping and flush."""
        self.zapping = True
        try:
            flush = self.stage2.unmap_all()
        finally:
            self.zapping = False
        if flush:
            self.flush_remote_tlbs()

    def stage2_test_young(self, gfn_start: int, gfn_end: int, clear: bool) -> bool:
        """``kvm_age_gfn`` / ``kvm_test_age_gfn`` over ``[gfn_start, gfn_end)``."""
        shift = self.pg.page_shift
        return self.stage2.test_clear_young(
            gfn_start << shift, (gfn_end - gfn_start) << shift, clear
        )

    def _leaf_sizes(self) -> Iterator[int]:
        return (leaf.size for leaf in self.stage2.for_each_leaf())

    def stats_dict(self) -> dict[str, int]:
        """``vm.stats`` by name (the live leaf counts by size included, the same
        values ``vm.stats.pages_4k`` ... give) and the stage-2 engine's counters
        (``stage2_*``)."""
        out = self.stats.as_dict()
        for name, value in self.stage2.counters.as_dict().items():
            out[f"stage2_{name}"] = value
        return out

    # --- vCPU entry points (sequential) --------------------------------------

    def guest_access(self, gpa: int, size: int, access: Access, value: int = 0,
                     vcpu: int = 0) -> AccessResult:
        """One guest access on vCPU ``vcpu``, run to completion."""
        return self.vcpus[vcpu].access(gpa, size, access, value)


class VmMemslotHooks(ArchMemslotHooks):
    """The memslot layer's hooks, doing their stage-2 work on this VM.

    The decisions (which architecture zaps what, when logging write-protects
    or splits) are the architecture's (``X86Kvm.commit_memory_region``...); this class
    supplies the primitives on the VM's stage-2 table and vCPU TLBs."""

    def __init__(self, vm: Vm) -> None:
        super().__init__(vm.arch, vm.variant,
                         phys_bits=vm.arch.memslot_phys_bits(vm.stage2.ipa_bits))
        self.vm = vm

    def prepare_vma_walk(self, old: MemorySlot | None, new: MemorySlot,
                         change: KvmMrChange) -> Op[None]:
        """arm64/riscv: the architecture's VMA walk (EPERM, EINVAL, 5.4 premap)."""
        return self.vm.arch.prepare_vma_walk(self.vm, old, new, change)

    def gmem_bind(self, slot: MemorySlot, fd: int, offset: int) -> None:
        """``kvm_gmem_bind`` on this VM."""
        kvm_gmem_bind(self.vm, slot, fd, offset)

    def gmem_unbind(self, slot: MemorySlot) -> None:
        """``kvm_gmem_unbind``."""
        kvm_gmem_unbind(slot)

    def zap_all(self) -> Op[None]:
        """``kvm_mmu_zap_all_fast``: every mapping of the VM; every loaded root becomes
        obsolete (freed by KVM_REQ_MMU_FREE_OBSOLETE_ROOTS at the vCPU's next entry)."""
        vm = self.vm
        yield acquire("mmu_lock")
        vm.obsolete_roots |= vm.loaded_roots
        vm.zap_all()
        vm.stats.mmu_shadow_zapped += 1
        yield release("mmu_lock")

    def zap_memslot(self, slot: MemorySlot) -> Op[None]:
        """The slot's gfn range, with its TLB flush."""
        vm = self.vm
        yield acquire("mmu_lock")
        if vm.zap_gfn_range(slot.base_gfn, slot.base_gfn + slot.npages):
            vm.flush_remote_tlbs()
        yield release("mmu_lock")

    def write_protect_memslot(self, slot: MemorySlot, min_level: int) -> Op[None]:
        """Remove write access from the slot's leaves, then flush."""
        vm = self.vm
        yield acquire("mmu_lock")
        shift = slot.page_shift
        if vm.stage2.wrprotect_range(slot.base_gfn << shift, slot.npages << shift):
            vm.flush_remote_tlbs(zap=False)
        else:
            for vcpu in vm.vcpus:
                vcpu.tlb_flush_gfn_range(slot.base_gfn, slot.base_gfn + slot.npages)
        yield release("mmu_lock")

    def split_memslot(self, slot: MemorySlot) -> Op[None]:
        """Eager split of the slot's huge leaves into pages."""
        vm = self.vm
        shift = slot.page_shift
        yield acquire("mmu_lock")
        vm.stage2.split_range(slot.base_gfn << shift, slot.npages << shift, 1 << shift)
        yield release("mmu_lock")

    def recover_huge_pages(self, slot: MemorySlot) -> Op[None]:
        """``kvm_mmu_recover_huge_pages``: drop the slot's 4K leaves so the
        next faults can map huge pages again."""
        yield from self.zap_memslot(slot)

    def flush_remote_tlbs_memslot(self, slot: MemorySlot) -> Op[None]:
        """``kvm_flush_remote_tlbs_memslot``."""
        self.vm.flush_remote_tlbs(zap=False)
        return
        yield  # pragma: no cover
