"""The VM: memslots over a host mm, a stage-2 table, the MMU-notifier state,
vCPUs, dirty logging and prefault.

``Vm`` holds what ``struct kvm`` holds for this model (kernel-semantics.md
§10.1): the memslots of each address space, ``mmu_invalidate_seq`` /
``mmu_invalidate_in_progress`` / the in-progress gfn range /
``mn_active_invalidate_count``, one stage-2 table (the architecture's real
entry format) and the vCPUs.  Everything an architecture does differently
lives in its :class:`~kvmmem.kvm.arch_common.ArchKvm` (``kvm/arm64.py``,
``kvm/x86.py``, ``kvm/riscv.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from kvmmem.arch import make_stage2
from kvmmem.errors import InputError
from kvmmem.host import Mm
from kvmmem.kvm.memslot import (
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    Memslots,
    MemorySlot,
    MemoryRegion,
)
from kvmmem.kvm.mmu_notifier import INVALID_GPA, KvmMmuNotifier
from kvmmem.kvm.stats import EventLog, Stats
from kvmmem.kvm.vcpu import Access, AccessResult, Vcpu
from kvmmem.sync import Op, drive
from kvmmem.types import PAGE_SHIFT, PAGE_SIZE, Hva
from kvmmem.variants import UPSTREAM, Variant, get_variant

if TYPE_CHECKING:
    from kvmmem.kvm.arch_common import ArchKvm

ARCHES = ("x86", "arm64", "riscv")


class Vm:
    """One VM (``KVM_CREATE_VM``) on the host address space ``mm``.

    ``arch`` is ``x86``, ``arm64`` or ``riscv``; ``variant`` a name from
    :mod:`kvmmem.variants` or a :class:`Variant`.  Raises
    :class:`InputError` for an unknown arch, variant or granule."""

    def __init__(
        self,
        arch: str,
        *,
        variant: str | Variant = UPSTREAM,
        mm: Mm | None = None,
        vcpus: int = 1,
        granule: int = PAGE_SIZE,
        ipa_bits: int | None = None,
    ) -> None:
        from kvmmem.kvm.arch_common import make_arch_kvm

        if arch not in ARCHES:
            raise InputError(f"arch: unknown architecture {arch!r} (known: {', '.join(ARCHES)})")
        if granule != PAGE_SIZE:
            raise InputError(
                f"granule: {granule // 1024}K stage-2 granules need a host with that page size; "
                "the host model has 4K pages, so the VM model supports granule 4K (the 16K/64K "
                "tables themselves are in kvmmem.arch)"
            )
        if not isinstance(vcpus, int) or vcpus < 1:
            raise InputError(f"vcpus: must be a positive integer, got {vcpus!r}")
        self.arch_name = arch
        self.variant = get_variant(variant) if isinstance(variant, str) else variant
        self.mm = mm if mm is not None else Mm()
        self.arch: ArchKvm = make_arch_kvm(arch)
        self.stage2 = make_stage2(arch, ipa_bits=ipa_bits)
        self.stats = Stats()
        self.log: EventLog | None = None
        self.memslots = Memslots(arch, hooks=self.arch.memslot_hooks(self))
        self.mmu_invalidate_seq = 0
        self.mmu_invalidate_in_progress = 0
        self.mmu_invalidate_range_start = INVALID_GPA
        self.mmu_invalidate_range_end = INVALID_GPA
        self.mn_active_invalidate_count = 0
        self.vcpus = [Vcpu(self, i) for i in range(vcpus)]
        self.notifier = KvmMmuNotifier(self)
        self.mm.mmu_notifier_register(self.notifier)
        self.closed = False

    def close(self) -> None:
        """Destroy the VM: unregister from the mm and drop every mapping."""
        if not self.closed:
            self.zap_all()
            self.mm.mmu_notifier_unregister(self.notifier)
            self.closed = True

    # --- memslots ----------------------------------------------------------

    def set_user_memory_region(
        self, slot: int, gpa: int, size: int, hva: int, flags: int = 0
    ) -> None:
        """``KVM_SET_USER_MEMORY_REGION`` run to completion; raises KernelError."""
        drive(self.set_user_memory_region_op(slot, gpa, size, hva, flags))

    def set_user_memory_region_op(
        self, slot: int, gpa: int, size: int, hva: int, flags: int = 0
    ) -> Op[None]:
        """The memslot update as an operation (pauses at slots_lock, the
        INVALID-slot publication, SRCU synchronisation and mmu_lock)."""
        region = MemoryRegion(slot=slot, flags=flags, guest_phys_addr=gpa,
                              memory_size=size, userspace_addr=hva)
        if self.log is not None:
            self.log.emit("kvm_set_user_memory_region", slot=slot, flags=flags, gpa=gpa,
                          size=size, hva=hva)
        self.stats.memslot_updates += 1
        yield from self.memslots.set_memory_region_op(region)

    def gfn_to_memslot(self, gfn: int, as_id: int = 0) -> MemorySlot | None:
        """``gfn_to_memslot``: the slot of the active set covering ``gfn``, or None."""
        return self.memslots.gfn_to_memslot(gfn, as_id)

    def for_each_memslot(self, as_id: int = 0) -> Iterator[MemorySlot]:
        """The active slots of address space ``as_id`` in gfn order."""
        return self.memslots.for_each_memslot(as_id)

    def gfn_ranges_for_hva(self, start: int, end: int) -> list[tuple[MemorySlot, int, int]]:
        """``kvm_handle_hva_range``'s slot walk: each slot whose hva range
        meets ``[start, end)``, with the clipped gfn range ``[gfn_start, gfn_end)``."""
        out: list[tuple[MemorySlot, int, int]] = []
        for slot in self.memslots.slots_for_hva_range(start, end):
            uaddr = slot.userspace_addr
            s = max(start, uaddr)
            e = min(end, uaddr + (slot.npages << PAGE_SHIFT))
            gfn_start = slot.base_gfn + ((s - uaddr) >> PAGE_SHIFT)
            gfn_end = slot.base_gfn + ((e + PAGE_SIZE - 1 - uaddr) >> PAGE_SHIFT)
            out.append((slot, gfn_start, gfn_end))
        return out

    @staticmethod
    def gfn_to_hva(slot: MemorySlot, gfn: int) -> Hva:
        """``__gfn_to_hva_memslot``."""
        return Hva(slot.userspace_addr + ((gfn - slot.base_gfn) << PAGE_SHIFT))

    # --- stage-2 helpers used by the vCPU and the arch code ------------------

    def stage2_lookup(self, gpa: int) -> tuple[int, bool, bool] | None:
        """The hardware walk: ``(pfn, writable, executable)`` of the leaf
        mapping ``gpa``, or None when the walk faults (no valid leaf, or the
        access flag is clear on arm64)."""
        leaf = self.stage2.walk(gpa)
        if leaf is None or not leaf.valid_for_access:
            return None
        return leaf.pfn, leaf.perm.write, leaf.perm.execute

    def install(self, slot: MemorySlot, gpa: int, pfn: int, size: int, *, write: bool,
                execute: bool, device: bool, access: Access | None) -> None:
        """Install the leaf of ``size`` covering ``gpa`` -> ``pfn`` (caller holds
        mmu_lock).  ``access`` is the faulting access (None for a prefetch or
        a premap, which count no ``pf_fixed``)."""
        base_gpa = gpa & ~(size - 1)
        base_pfn = pfn - ((gpa - base_gpa) >> PAGE_SHIFT)
        if self.log is not None:
            self.log.emit("kvm_mmu_spte_requested", gfn=gpa >> PAGE_SHIFT, pfn=pfn,
                          level=size.bit_length() - 1)
        self.stage2.map(base_gpa, base_pfn, size, read=True, write=write, execute=execute,
                        device=device)
        if self.log is not None:
            self.log.emit("kvm_mmu_set_spte", gfn=base_gpa >> PAGE_SHIFT, pfn=base_pfn,
                          level=size.bit_length() - 1,
                          perm=("r" + ("w" if write else "-") + ("x" if execute else "-")))
        if access is not None:
            self.stats.pf_fixed += 1
        del slot

    def touch_frame(self, pfn: int, gpa: int, size: int, access: Access, value: int
                    ) -> AccessResult:
        """Perform the access on host frame ``pfn`` (the memory the guest reaches)."""
        offset = gpa & (PAGE_SIZE - 1)
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

    def zap_gfn_range(self, start: int, end: int) -> bool:
        """Remove every stage-2 leaf for gfns ``[start, end)``; True if any was removed."""
        return self.stage2.unmap_range(start << PAGE_SHIFT, (end - start) << PAGE_SHIFT)

    def zap_all(self) -> None:
        """``kvm_arch_flush_shadow_all``: drop every stage-2 mapping and flush."""
        if self.stage2.unmap_all():
            self.flush_remote_tlbs()

    def stage2_test_young(self, gfn_start: int, gfn_end: int, clear: bool) -> bool:
        """``kvm_age_gfn`` / ``kvm_test_age_gfn`` over ``[gfn_start, gfn_end)``."""
        return self.stage2.test_clear_young(
            gfn_start << PAGE_SHIFT, (gfn_end - gfn_start) << PAGE_SHIFT, clear
        )

    # --- dirty logging ---------------------------------------------------------

    def mark_page_dirty(self, slot: MemorySlot, gfn: int) -> None:
        """``mark_page_dirty_in_slot``: set the slot's bit when it is logging."""
        if slot.dirty_bitmap is not None and not slot.readonly:
            slot.dirty_bitmap[gfn - slot.base_gfn] = True

    # --- vCPU entry points (sequential) --------------------------------------

    def guest_access(self, gpa: int, size: int, access: Access, value: int = 0,
                     vcpu: int = 0) -> AccessResult:
        """One guest access on vCPU ``vcpu``, run to completion."""
        return self.vcpus[vcpu].access(gpa, size, access, value)
