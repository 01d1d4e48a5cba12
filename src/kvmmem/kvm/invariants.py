"""The invariants of DESIGN.md as ``validate_*`` functions over a VM.

They live apart from the fast paths, walk the whole state, and raise one
:class:`~kvmmem.errors.ValidationError` naming the invariant and the entry
that breaks it.  ``validate_vm`` runs every per-step invariant;
``validate_path_independence`` replays the final state in a fresh VM and is
meant for the end of a run (DESIGN.md invariant 4).

Exemption, as in the kernel's own reasoning (kernel-semantics.md §4.5): while
an invalidation covering a gfn is in progress (between
``invalidate_range_start`` and ``_end``), the host PTE may already have
changed while a racing fault still holds the old pfn; a stale entry is only
an error once no invalidation covers it.  Slots being deleted or moved
(``KVM_MEMSLOT_INVALID``) are skipped the same way.
"""

from __future__ import annotations

import copy
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from kvmmem.errors import KernelError, ValidationError
from kvmmem.host import Mm, MmuNotifierSubscriptions
from kvmmem.host.vma import VM_WRITE
from kvmmem.kvm.arch_common import memslot_is_logging
from kvmmem.kvm.dirty_ring import ring_pushed
from kvmmem.kvm.fault import Access
from kvmmem.kvm.guest_memfd import (
    GmemFile,
    gmem_page,
    kvm_memslot_is_gmem_only,
    kvm_slot_has_gmem,
)
from kvmmem.kvm.kvm_host import kvm_mem_is_private
from kvmmem.kvm.memslot import KVM_MEM_LOG_DIRTY_PAGES
from kvmmem.kvm.mmu_notifier import INVALID_GPA
from kvmmem.kvm.vm import Vm

if TYPE_CHECKING:
    from kvmmem.arch.pgtable_types import Leaf
    from kvmmem.kvm.memslot import MemorySlot

INVARIANTS = (
    "no-stale-translation",
    "permission-containment",
    "memory-type",
    "path-independence",
    "coherence",
    "dirty-log-completeness",
    "break-before-make",
)


def _invalidation_covers(vm: Vm, gfn: int) -> bool:
    if not vm.mmu_invalidate_in_progress:
        return False
    start = vm.mmu_invalidate_range_start
    if start == INVALID_GPA:
        return True
    return start <= gfn < vm.mmu_invalidate_range_end


def _slot_of(vm: Vm, gfn: int) -> MemorySlot | None:
    return vm.memslots.gfn_to_memslot(gfn, 0, include_invalid=True)


def _for_each_mapped_page(vm: Vm, gfns: Collection[int] | None = None
                          ) -> list[tuple[int, int, bool, bool, str]]:
    """(gfn, pfn, writable, device, source) for every stage-2 page and TLB entry
    (of the pages ``gfns`` only, when given)."""
    out: list[tuple[int, int, bool, bool, str]] = []
    shift = vm.pg.page_shift
    for leaf in _leaves(vm, gfns):
        for i in range(leaf.size >> shift):
            gfn = (leaf.gpa >> shift) + i
            if gfns is None or gfn in gfns:
                out.append((gfn, leaf.pfn + i, leaf.writable, leaf.device, "stage-2"))
    for vcpu in vm.vcpus:
        for gfn, entry in vcpu.tlb.items():
            if gfns is not None and gfn not in gfns:
                continue
            out.append((gfn, entry.pfn, entry.writable, False, f"vcpu{vcpu.index} TLB"))
    return out


def _leaves(vm: Vm, gfns: Collection[int] | None) -> list[Leaf]:
    """The stage-2 leaves (covering one of ``gfns``, when given), in gpa order."""
    if gfns is None:
        return list(vm.stage2.for_each_leaf())
    shift = vm.pg.page_shift
    out: list[Leaf] = []
    seen: set[int] = set()
    for gfn in sorted(gfns):
        for leaf in vm.stage2.for_each_leaf(gfn << shift, (gfn + 1) << shift):
            if leaf.gpa not in seen:
                seen.add(leaf.gpa)
                out.append(leaf)
    return out


def served_from_gmem(vm: Vm, slot: MemorySlot, gfn: int) -> bool:
    """Whether the fault path serves ``gfn`` of ``slot`` from its guest_memfd: the gfn is
    private (and the slot binds a file), or the slot is gmem-only.  A shared gfn of any
    other slot is served through the slot's hva."""
    if kvm_memslot_is_gmem_only(slot):
        return True
    return kvm_slot_has_gmem(slot) and vm.has_private_mem and kvm_mem_is_private(vm, gfn)


def validate_no_stale_translation(vm: Vm, gfns: Collection[int] | None = None) -> None:
    """Invariant 1: every valid stage-2 leaf and TLB entry maps its gfn to the
    pfn the host page table maps the slot's hva to; no freed frame is mapped.
    ``gfns``: check only the entries of these pages."""
    mm = vm.mm
    pm = mm.physmem
    for gfn, pfn, _w, _d, source in _for_each_mapped_page(vm, gfns):
        if _invalidation_covers(vm, gfn):
            continue
        slot = _slot_of(vm, gfn)
        if slot is not None and slot.invalid:
            continue
        if slot is None:
            raise ValidationError("no-stale-translation",
                                  f"{source}: gfn {gfn:#x} -> pfn {pfn:#x} but no memslot "
                                  "covers the gfn")
        if vm.has_private_mem and kvm_mem_is_private(vm, gfn) \
                and not kvm_slot_has_gmem(slot):
            raise ValidationError("no-stale-translation",
                                  f"{source}: private gfn {gfn:#x} -> pfn {pfn:#x}, but slot "
                                  f"{slot.id} has no guest_memfd: private memory reached "
                                  "through a shared mapping")
        if served_from_gmem(vm, slot, gfn):
            # served from the guest_memfd, whatever the slot's hva maps
            held = gmem_page(slot, gfn)
            if held != pfn:
                now = "no page (punched or never allocated)" if held is None \
                    else f"pfn {held:#x}"
                kind = "gfn" if kvm_memslot_is_gmem_only(slot) else "private gfn"
                raise ValidationError("no-stale-translation",
                                      f"{source}: {kind} {gfn:#x} -> pfn {pfn:#x}, but slot "
                                      f"{slot.id}'s guest_memfd holds {now} there")
            continue
        hva = slot.gfn_to_hva(gfn)
        pte = mm.host_pte(hva)
        if pte is None or pte.pfn != pfn:
            host = "nothing" if pte is None else f"pfn {pte.pfn:#x}"
            freed = " (a freed frame)" if pm.pfn_valid(pfn) and pm.is_free(pfn) else ""
            raise ValidationError("no-stale-translation",
                                  f"{source}: gfn {gfn:#x} -> pfn {pfn:#x}{freed}, but the host "
                                  f"maps hva {hva:#x} to {host}")


def validate_permission_containment(vm: Vm, gfns: Collection[int] | None = None) -> None:
    """Invariant 2: a writable entry needs a writable slot, a VMA with
    VM_WRITE, a writable host PTE and, under dirty logging, a dirty bit.
    ``gfns``: check only the entries of these pages."""
    mm = vm.mm
    for gfn, _pfn, writable, _d, source in _for_each_mapped_page(vm, gfns):
        if not writable or _invalidation_covers(vm, gfn):
            continue
        slot = _slot_of(vm, gfn)
        if slot is None or slot.invalid:
            continue
        where = f"{source}: writable gfn {gfn:#x}"
        if slot.readonly:
            raise ValidationError("permission-containment", f"{where} in read-only slot {slot.id}")
        if served_from_gmem(vm, slot, gfn):
            continue  # no VMA or host PTE decides (kvm_mmu_faultin_pfn_gmem, gmem_abort)
        hva = slot.gfn_to_hva(gfn)
        vma = mm.vma_lookup(hva)
        if vma is None or not vma.flags & VM_WRITE:
            raise ValidationError("permission-containment",
                                  f"{where}, but the VMA at hva {hva:#x} does not allow writes")
        pte = mm.host_pte(hva)
        if pte is None or not pte.writable:
            raise ValidationError("permission-containment",
                                  f"{where}, but the host PTE at hva {hva:#x} is read-only "
                                  "(copy-on-write or read-only page)")
        logging = memslot_is_logging(slot)
        if vm.dirty_ring_size and source == "stage-2":
            # Ring mode: a writable leaf of a LOG_DIRTY slot must have been pushed into
            # some vCPU's ring since its last reset (a reset write-protects it again),
            # or set in the bitmap (arm64 WITH_BITMAP, writes without a running vCPU).
            # On every arch: arm64 ring-only VMs break it, as the kernel does
            # (docs/findings.md#finding-13).
            logging = bool(slot.flags & KVM_MEM_LOG_DIRTY_PAGES) and not slot.readonly
            if logging and not ring_pushed(vm, slot, gfn) and not (
                    slot.dirty_bitmap is not None and slot.dirty_bitmap[gfn - slot.base_gfn]):
                raise ValidationError("dirty-log-completeness",
                                      f"{where} in logged slot {slot.id} is in no dirty ring "
                                      "since its last reset: a write through it would be "
                                      "missed")
        elif logging and source == "stage-2" and slot.dirty_bitmap is not None \
                and not slot.dirty_bitmap[gfn - slot.base_gfn]:
            raise ValidationError("dirty-log-completeness",
                                  f"{where} in logged slot {slot.id} is not marked dirty: a "
                                  "write through it would be missed")


def validate_memory_type(vm: Vm, gfns: Collection[int] | None = None) -> None:
    """Invariant 3: frames without struct page are mapped device/uncached,
    RAM normal cacheable (riscv G-stage has no attribute bits: its PMAs decide).
    Device memory the device exposes cacheable (Grace-style, ``device-cacheable``) may
    be mapped cacheable where the CPU needs no cache maintenance for it: FWB and DIC
    (arm64 ``kvm_supports_cacheable_pfnmap``).  ``gfns``: check only the leaves
    covering these pages."""
    if not vm.arch.has_memory_type:
        return
    pm = vm.mm.physmem
    coherent = {"fwb", "dic"} <= vm.cpu_features
    for leaf in _leaves(vm, gfns):
        is_ram = pm.pfn_valid(leaf.pfn)
        if is_ram and leaf.device:
            raise ValidationError("memory-type", f"gpa {leaf.gpa:#x}: RAM pfn {leaf.pfn:#x} "
                                  "mapped with a device memory type")
        if not is_ram and not leaf.device \
                and not (coherent and pm.is_cacheable_device(leaf.pfn)):
            raise ValidationError("memory-type", f"gpa {leaf.gpa:#x}: device pfn "
                                  f"{leaf.pfn:#x} mapped as normal cacheable memory")


def validate_break_before_make(vm: Vm) -> None:
    """Invariant 7 (arm64): no valid-to-valid change of output or size without
    an invalid entry and a TLB invalidation in between."""
    if vm.arch.break_before_make:
        vm.stage2.validate_bbm()


def validate_vm(vm: Vm, gfns: Collection[int] | None = None) -> None:
    """Every per-step invariant (1, 2, 3, 6, 7); raises ValidationError.

    ``gfns``: only the entries of these pages (and break-before-make), for a
    caller that knows nothing else changed since the last full check
    (the explorer's incremental check, kvmmem.explore.execution)."""
    validate_no_stale_translation(vm, gfns)
    validate_permission_containment(vm, gfns)
    validate_memory_type(vm, gfns)
    validate_break_before_make(vm)


def validate_coherence(vm: Vm, gpa: int, size: int, value: int, vcpu: int = 0, *,
                       emulated: bool = False) -> None:
    """Invariant 5, after a guest write of ``value`` that completed: host
    userspace reads the same bytes at the slot's hva (through the host page
    table, without faulting anything in) -- or, for a gmem-only slot written
    through the fault path, in the slot's guest_memfd (x86's instruction
    emulator, ``emulated``, writes through the hva even there)."""
    shift = vm.pg.page_shift
    mask = (1 << shift) - 1
    slot = vm.gfn_to_memslot(gpa >> shift)
    if slot is None:
        return
    got = 0
    for i in range(size):
        g = gpa + i
        s = vm.gfn_to_memslot(g >> shift)
        if s is None:
            return  # part of the access was MMIO
        if served_from_gmem(vm, s, g >> shift) and not emulated:
            held = gmem_page(s, g >> shift)
            if held is None:
                raise ValidationError("coherence", f"guest wrote gpa {g:#x} but slot {s.id}'s "
                                      "guest_memfd holds no page there: the write is lost")
            got |= vm.mm.physmem.read_int(held, g & mask, 1) << (8 * i)
            continue
        hva = s.gfn_to_hva(g >> shift) + (g & mask)
        pte = vm.mm.host_pte(hva)
        if pte is None:
            raise ValidationError("coherence", f"guest wrote gpa {g:#x} but hva {hva:#x} has "
                                  "no host page: the write is lost")
        got |= vm.mm.physmem.read_int(pte.pfn, hva & mask, 1) << (8 * i)
    if got != value & ((1 << (8 * size)) - 1):
        raise ValidationError("coherence", f"guest wrote {value:#x} at gpa {gpa:#x} (vcpu "
                              f"{vcpu}) but host userspace reads {got:#x} at the same hva")


def clone_mm(mm: Mm) -> Mm:
    """An independent copy of ``mm`` (VMAs, page table, frames, page cache)
    without its notifier subscribers."""
    memo: dict[int, object] = {id(mm.notifiers): MmuNotifierSubscriptions()}
    return copy.deepcopy(mm, memo)


def validate_path_independence(vm: Vm) -> list[str]:
    """Invariant 4: the final state, replayed in a fresh VM over a copy of the
    host, can be created and maps every present page the same way.

    Returns the observations that are not violations: each slot that
    ``KVM_SET_USER_MEMORY_REGION`` would refuse to create directly over the
    current host mappings because of the arm64/riscv creation-time VMA checks
    (EPERM, EINVAL).  Those checks run only inside the ioctl, so the state is
    legal (reached by changing the VMAs after creation) and the slot is
    re-created without them; but the two histories that reach this state
    disagree, and that is worth saying.  Raises ValidationError on a
    violation."""
    mm_copy = clone_mm(vm.mm)
    fresh = Vm(vm.arch_name, variant=vm.variant, mm=mm_copy, vcpus=1,
                    cpu_features=vm.cpu_features, vm_type=vm.vm_type)
    for start, end, attrs in vm.mem_attr_array.ranges():
        fresh.mem_attr_array.set(start, end, attrs)
    for f in mm_copy.fdtable.values():
        if isinstance(f, GmemFile):
            f.kvm = fresh  # the copied guest_memfd files are the fresh VM's
    notes: list[str] = []
    shift = vm.pg.page_shift
    for slot in sorted(vm.memslots.all_slots(), key=lambda s: (s.as_id, s.id)):
        if slot.invalid:
            continue
        args = (slot.id | (slot.as_id << 16), slot.base_gfn << shift,
                slot.npages << shift, slot.userspace_addr, slot.flags)
        gmem: dict[str, Any] = {}
        if slot.gmem is not None and slot.gmem.file is not None:
            gmem = {"guest_memfd": slot.gmem.file.fd,
                    "guest_memfd_offset": slot.gmem.pgoff << shift, "v2": True}
        try:
            fresh.set_user_memory_region(*args, **gmem)
            continue
        except KernelError as err:
            refused = err
        # kvm_arch_prepare_memory_region (arm64/riscv): a refusal of its VMA
        # walk concerns the ioctl only; try again without it
        fresh.prepare_vma_checks = False
        try:
            fresh.set_user_memory_region(*args, **gmem)
        except KernelError as err:
            raise ValidationError(
                "path-independence",
                f"this state cannot be reached from scratch: re-creating slot {slot.id} "
                f"(gpa {slot.base_gfn << shift:#x}, hva {slot.userspace_addr:#x}) over the "
                f"current host mappings fails with {err.errno}") from None
        finally:
            fresh.prepare_vma_checks = True
        notes.append(f"slot {slot.id} (gpa {slot.base_gfn << shift:#x}, hva "
                     f"{slot.userspace_addr:#x}) could not be created over the current host "
                     f"mappings ({refused.errno}: {refused.reason}); this state is reached only "
                     "by changing the VMAs after creation")
    for leaf in vm.stage2.for_each_leaf():
        if _invalidation_covers(vm, leaf.gpa >> shift):
            continue
        r = fresh.guest_access(leaf.gpa, 1, Access.READ)
        got = fresh.stage2_lookup(leaf.gpa)
        if r.result != "ok" or got is None or got[0] != leaf.pfn:
            now = r.result if got is None else f"pfn {got[0]:#x}"
            raise ValidationError(
                "path-independence",
                f"gpa {leaf.gpa:#x} maps pfn {leaf.pfn:#x} here, but faulting it in from "
                f"scratch gives {now}")
    fresh.close()
    return notes
