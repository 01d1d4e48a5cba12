"""The dirty ring: ``KVM_CAP_DIRTY_LOG_RING`` / ``_ACQ_REL`` / ``_WITH_BITMAP`` and
``KVM_RESET_DIRTY_RINGS``.

Mirrors virt/kvm/dirty_ring.c and its callers in virt/kvm/kvm_main.c
(kernel-semantics.md §7.2): ``kvm_vm_ioctl_enable_dirty_log_ring`` (the size checks,
then "only once", then "only before any vCPU"), one ring per vCPU allocated at
``KVM_CREATE_VCPU`` (``kvm_dirty_ring_alloc``: ``size / 16`` entries, soft limit
``size - kvm_dirty_ring_get_rsvd_entries()``), ``kvm_dirty_ring_push`` from
``mark_page_dirty_in_slot`` when the VM has a ring and a vCPU is running (the slot
as ``as_id << 16 | id``, the offset in the slot), ``KVM_REQ_DIRTY_RING_SOFT_FULL``
when the push reaches the soft limit and ``kvm_dirty_ring_check_request`` at the next
guest entry (KVM_RUN returns with ``KVM_EXIT_DIRTY_RING_FULL``, again at every entry
until the ring is reset), ``kvm_dirty_ring_reset`` (the harvested entries from
``reset_index`` on, coalesced per slot into 64-page masks handed to
``kvm_arch_mmu_enable_log_dirty_pt_masked``: the pages are write-protected again so
a later write is pushed again) and ``kvm_vm_ioctl_reset_dirty_pages`` (returns the
entries reset, flushes when there were some).

The VMM's side is :func:`kvm_dirty_ring_harvest`: it reads the vCPU's ring (mmapped
at ``KVM_DIRTY_LOG_PAGE_OFFSET`` of the vCPU fd) from its own fetch index, collecting
the entries flagged ``KVM_DIRTY_GFN_F_DIRTY`` and flagging each
``KVM_DIRTY_GFN_F_RESET``, as QEMU's ``kvm_dirty_ring_reap_one`` and the selftest's
``dirty_ring_collect_one`` do.

Releases: x86 has KVM_CAP_DIRTY_LOG_RING since v5.11 ("KVM: X86: Implement
ring-based dirty memory tracking"); KVM_CAP_DIRTY_LOG_RING_ACQ_REL (x86, arm64) and
arm64's ring with KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP since v6.1 ("KVM: Add
KVM_CAP_DIRTY_LOG_RING_ACQ_REL capability and config option", "KVM: arm64: Enable
ring-based dirty memory tracking"); riscv's ring (ACQ_REL only, no WITH_BITMAP) since
v6.17 ("RISC-V: KVM: Enable ring-based dirty memory tracking", release believed: real
riscv 6.12 has none, 7.2 has it); hashes not identified.  A capability KVM_CHECK_EXTENSION
answers 0 for is EINVAL to enable (riscv 7.2 refuses KVM_CAP_DIRTY_LOG_RING so).

Not modelled: the PML entries x86 VMX adds to the reserved ones
(``kvm_cpu_dirty_log_size``: 512 with PML enabled, raising the smallest ring from 4 KiB
to 16 KiB; this host and the QEMU machines have no PML), and the ring full exit of an
access the x86 emulator completes (the model reports it at the next access).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvmmem.errors import KernelError

if TYPE_CHECKING:
    from kvmmem.kvm.kvm_host import Kvm
    from kvmmem.kvm.memslot import MemorySlot

KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_DIRTY_LOG_RING_ACQ_REL = 223
KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP = 225
KVM_DIRTY_GFN_F_DIRTY = 1 << 0
KVM_DIRTY_GFN_F_RESET = 1 << 1
KVM_DIRTY_RING_RSVD_ENTRIES = 64
KVM_DIRTY_RING_MAX_ENTRIES = 65536
KVM_DIRTY_GFN_SIZE = 16
"""``sizeof(struct kvm_dirty_gfn)``: ``{__u32 flags; __u32 slot; __u64 offset}``."""
KVM_EXIT_DIRTY_RING_FULL = "KVM_EXIT_DIRTY_RING_FULL"
BITS_PER_LONG = 64


@dataclass(slots=True)
class DirtyGfn:
    """``struct kvm_dirty_gfn``: one ring entry, shared with userspace."""

    flags: int = 0
    slot: int = 0
    offset: int = 0


@dataclass(slots=True)
class DirtyRing:
    """``struct kvm_dirty_ring`` of one vCPU, plus the VMM's fetch index
    (``fetch_index``, which lives in the VMM, not in the kernel)."""

    index: int
    size: int
    """Entries (a power of two)."""
    soft_limit: int
    dirty_gfns: list[DirtyGfn]
    dirty_index: int = 0
    reset_index: int = 0
    fetch_index: int = 0
    soft_full_request: bool = False
    """``KVM_REQ_DIRTY_RING_SOFT_FULL`` pending on the vCPU."""
    pushed: dict[tuple[int, int], int] = field(default_factory=dict)
    """(slot, offset) -> entries pushed and not yet reset: what the dirty-log
    completeness invariant reads (derived from the entries, kept for speed)."""

    def used(self) -> int:
        """``kvm_dirty_ring_used``."""
        return self.dirty_index - self.reset_index

    def push(self, slot: int, offset: int) -> None:
        """:func:`kvm_dirty_ring_push` (what ``mark_page_dirty_in_slot`` calls)."""
        kvm_dirty_ring_push(self, slot, offset)


def dirty_ring_caps(vm: Kvm) -> dict[int, int]:
    """What KVM_CHECK_EXTENSION answers for the ring capabilities on the VM's arch and
    release: the maximum size in bytes for the ring ones, 1 for WITH_BITMAP; absent
    ones are 0."""
    v = vm.variant
    arch = vm.arch
    caps: dict[int, int] = {}
    if not arch.switch_on(v, arch.dirty_ring_switch):
        return caps
    max_bytes = KVM_DIRTY_RING_MAX_ENTRIES * KVM_DIRTY_GFN_SIZE
    if arch.dirty_ring_plain:
        caps[KVM_CAP_DIRTY_LOG_RING] = max_bytes
    if not arch.dirty_ring_plain or v.dirty_ring_acq_rel:
        caps[KVM_CAP_DIRTY_LOG_RING_ACQ_REL] = max_bytes
    if arch.dirty_ring_with_bitmap:
        caps[KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP] = 1
    return caps


def kvm_dirty_ring_get_rsvd_entries(vm: Kvm) -> int:
    """``kvm_dirty_ring_get_rsvd_entries``: the 64 reserved entries plus
    ``kvm_cpu_dirty_log_size`` (0 here: no PML)."""
    return KVM_DIRTY_RING_RSVD_ENTRIES


def kvm_vm_ioctl_enable_dirty_log_ring(vm: Kvm, cap: int, size: int) -> None:
    """KVM_ENABLE_CAP of KVM_CAP_DIRTY_LOG_RING or _ACQ_REL with ``args[0]`` = ``size``
    bytes (``kvm_vm_ioctl_enable_cap_generic``'s case, then
    ``kvm_vm_ioctl_enable_dirty_log_ring``).

    Raises KernelError EINVAL (the capability is not offered; size 0, not a power of
    two, below a page or the reserved entries; a ring already enabled; a vCPU already
    created) or E2BIG (more than 65536 entries), in the kernel's order."""
    call = "KVM_ENABLE_CAP"
    if not dirty_ring_caps(vm).get(cap):
        raise KernelError("EINVAL", call, f"capability {cap} is not offered here")
    size &= 0xFFFFFFFF  # the u32 parameter
    if not size or size & (size - 1):
        raise KernelError("EINVAL", call, f"ring size {size} is not a power of two")
    if size < kvm_dirty_ring_get_rsvd_entries(vm) * KVM_DIRTY_GFN_SIZE \
            or size < vm.pg.page_size:
        raise KernelError("EINVAL", call, f"ring size {size} is below the minimum")
    if size > KVM_DIRTY_RING_MAX_ENTRIES * KVM_DIRTY_GFN_SIZE:
        raise KernelError("E2BIG", call, f"ring size {size} is above 65536 entries")
    if vm.dirty_ring_size:
        raise KernelError("EINVAL", call, "the dirty ring is already enabled")
    if vm.created_vcpus:
        raise KernelError("EINVAL", call, "vCPUs already exist")
    vm.dirty_ring_size = size
    vm.memslots.use_dirty_bitmap = vm.dirty_ring_with_bitmap


def kvm_vm_ioctl_enable_dirty_log_ring_with_bitmap(vm: Kvm, flags: int) -> None:
    """KVM_ENABLE_CAP of KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP: only where the arch needs
    it (arm64), after the ring, with ``flags`` 0 and while no memslot exists.

    Raises KernelError EINVAL otherwise."""
    call = "KVM_ENABLE_CAP"
    if not dirty_ring_caps(vm).get(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP) \
            or not vm.dirty_ring_size or flags:
        raise KernelError("EINVAL", call, "WITH_BITMAP needs the ring first (arm64)")
    as_ids = vm.arch.nr_address_spaces
    if any(True for a in range(as_ids) for _ in vm.for_each_memslot(a)):
        raise KernelError("EINVAL", call, "memslots already exist")
    vm.dirty_ring_with_bitmap = True
    vm.memslots.use_dirty_bitmap = True


def kvm_dirty_ring_alloc(vm: Kvm, index: int) -> DirtyRing:
    """``kvm_dirty_ring_alloc`` at KVM_CREATE_VCPU of a ring VM."""
    entries = vm.dirty_ring_size // KVM_DIRTY_GFN_SIZE
    return DirtyRing(index, entries, entries - kvm_dirty_ring_get_rsvd_entries(vm),
                     [DirtyGfn() for _ in range(entries)])


def kvm_dirty_ring_soft_full(ring: DirtyRing) -> bool:
    """``kvm_dirty_ring_soft_full``."""
    return ring.used() >= ring.soft_limit


def kvm_dirty_ring_push(ring: DirtyRing, slot: int, offset: int) -> None:
    """``kvm_dirty_ring_push``: publish ``(slot, offset)`` flagged DIRTY; a push that
    reaches the soft limit makes KVM_REQ_DIRTY_RING_SOFT_FULL."""
    entry = ring.dirty_gfns[ring.dirty_index & (ring.size - 1)]
    entry.slot, entry.offset = slot, offset
    entry.flags = KVM_DIRTY_GFN_F_DIRTY
    ring.dirty_index += 1
    ring.pushed[(slot, offset)] = ring.pushed.get((slot, offset), 0) + 1
    if kvm_dirty_ring_soft_full(ring):
        ring.soft_full_request = True


def kvm_dirty_ring_check_request(ring: DirtyRing | None) -> bool:
    """``kvm_dirty_ring_check_request`` at guest entry: True (KVM_RUN exits with
    KVM_EXIT_DIRTY_RING_FULL; the request stays) while the ring is soft-full."""
    if ring is None or not ring.soft_full_request:
        return False
    ring.soft_full_request = False
    if kvm_dirty_ring_soft_full(ring):
        ring.soft_full_request = True
        return True
    return False


def kvm_arch_mmu_enable_log_dirty_pt_masked(vm: Kvm, memslot: MemorySlot, offsets: list[int],
                                            flush: bool = True) -> None:
    """``kvm_arch_mmu_enable_log_dirty_pt_masked`` for the slot's pages ``offsets``:
    write-protect them so the next write faults and is logged; with ``flush`` the
    caller's TLB flush follows (the dirty ring's reset flushes once, at its end).  Shared
    with KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG (kvm/dirty_log.py)."""
    need = False
    for off in offsets:
        shift = memslot.page_shift
        need |= vm.stage2.wrprotect_range((memslot.base_gfn + off) << shift, 1 << shift)
    if flush and (need or offsets):
        vm.flush_remote_tlbs(zap=False)


def _rings(vm: Kvm) -> list[DirtyRing]:
    return [ring for vcpu in vm.vcpus if isinstance(ring := vcpu.dirty_ring, DirtyRing)]


def kvm_reset_dirty_gfn(vm: Kvm, slot: int, offset: int, mask: int) -> None:
    """``kvm_reset_dirty_gfn``: write-protect the pages ``offset + bit`` of ``mask``
    in the slot again (``kvm_arch_mmu_enable_log_dirty_pt_masked``)."""
    as_id, sid = slot >> 16, slot & 0xFFFF
    if as_id >= vm.arch.nr_address_spaces or sid >= vm.memslots.limits.user_mem_slots:
        return
    memslot = vm.memslots.id_to_memslot(sid, as_id)
    if memslot is None or not mask or offset + mask.bit_length() - 1 >= memslot.npages:
        return
    if not vm.variant.ring_reset_reprotects:
        return  # the mutation no-ring-reprotect
    kvm_arch_mmu_enable_log_dirty_pt_masked(
        vm, memslot, [offset + b for b in range(BITS_PER_LONG) if mask >> b & 1], flush=False)


def kvm_dirty_ring_reset(vm: Kvm, ring: DirtyRing) -> int:
    """``kvm_dirty_ring_reset``: the harvested entries from ``reset_index`` on are
    invalidated and their pages re-protected, coalesced per slot; returns how many."""
    count = 0
    cur_slot = cur_offset = mask = 0
    first_round = True
    while True:
        entry = ring.dirty_gfns[ring.reset_index & (ring.size - 1)]
        if not entry.flags & KVM_DIRTY_GFN_F_RESET:
            break
        next_slot, next_offset = entry.slot, entry.offset
        entry.flags = 0
        key = (next_slot, next_offset)
        ring.pushed[key] -= 1
        if not ring.pushed[key]:
            del ring.pushed[key]
        ring.reset_index += 1
        count += 1
        if not first_round and next_slot == cur_slot:
            delta = next_offset - cur_offset
            if 0 <= delta < BITS_PER_LONG:
                mask |= 1 << delta
                continue
            if -BITS_PER_LONG < delta < 0 and ((mask << -delta) & (2**64 - 1)) >> -delta == mask:
                cur_offset = next_offset
                mask = ((mask << -delta) | 1) & (2**64 - 1)
                continue
        kvm_reset_dirty_gfn(vm, cur_slot, cur_offset, mask)
        cur_slot, cur_offset, mask = next_slot, next_offset, 1
        first_round = False
    kvm_reset_dirty_gfn(vm, cur_slot, cur_offset, mask)
    return count


def kvm_vm_ioctl_reset_dirty_pages(vm: Kvm) -> int:
    """``KVM_RESET_DIRTY_RINGS`` (``kvm_vm_ioctl_reset_dirty_pages``): reset every
    vCPU's ring; returns the entries reset
    (the ioctl's return value).

    Raises KernelError EINVAL (the VM has no ring)."""
    if not vm.dirty_ring_size:
        raise KernelError("EINVAL", "KVM_RESET_DIRTY_RINGS", "the VM has no dirty ring")
    cleared = 0
    for ring in _rings(vm):
        cleared += kvm_dirty_ring_reset(vm, ring)
    if cleared:
        vm.flush_remote_tlbs(zap=False)
    return cleared


def kvm_dirty_ring_harvest(vm: Kvm, ring: DirtyRing | None) -> list[int]:
    """The VMM harvesting one vCPU's ring: from its fetch index, every entry flagged
    DIRTY is collected and flagged RESET; returns their absolute gfns in ring order
    (an entry whose slot the VMM no longer has is skipped, as QEMU does).

    Raises KernelError EINVAL (the VM has no ring: there is nothing to mmap; the
    kernel refuses the mmap of KVM_DIRTY_LOG_PAGE_OFFSET)."""
    if ring is None:
        raise KernelError("EINVAL", "mmap", "the VM has no dirty ring")
    gfns: list[int] = []
    while True:
        entry = ring.dirty_gfns[ring.fetch_index & (ring.size - 1)]
        if entry.flags != KVM_DIRTY_GFN_F_DIRTY:
            break
        entry.flags |= KVM_DIRTY_GFN_F_RESET
        ring.fetch_index += 1
        as_id, sid = entry.slot >> 16, entry.slot & 0xFFFF
        memslot = vm.memslots.id_to_memslot(sid, as_id)
        if memslot is not None:
            gfns.append(memslot.base_gfn + entry.offset)
    return gfns


def ring_pushed(vm: Kvm, slot: MemorySlot, gfn: int) -> bool:
    """Whether some vCPU's ring holds ``gfn`` of ``slot`` pushed and not yet reset
    (the dirty-log completeness invariant in ring mode)."""
    key = (slot.as_id << 16 | slot.id, gfn - slot.base_gfn)
    return any(key in ring.pushed for ring in _rings(vm))


__all__ = [
    "KVM_CAP_DIRTY_LOG_RING",
    "KVM_CAP_DIRTY_LOG_RING_ACQ_REL",
    "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP",
    "DirtyGfn",
    "DirtyRing",
    "dirty_ring_caps",
    "kvm_arch_mmu_enable_log_dirty_pt_masked",
    "kvm_dirty_ring_alloc",
    "kvm_dirty_ring_check_request",
    "kvm_dirty_ring_harvest",
    "kvm_dirty_ring_push",
    "kvm_dirty_ring_reset",
    "kvm_vm_ioctl_enable_dirty_log_ring",
    "kvm_vm_ioctl_enable_dirty_log_ring_with_bitmap",
    "kvm_vm_ioctl_reset_dirty_pages",
    "ring_pushed",
]
