"""Dirty logging in bitmap mode: ``KVM_GET_DIRTY_LOG`` and ``KVM_CLEAR_DIRTY_LOG``.

Mirrors ``kvm_get_dirty_log_protect`` and ``kvm_clear_dirty_log_protect``
(virt/kvm/kvm_main.c; kernel-semantics.md §7.1) without manual protect:
GET hands back the dirty pages, clears their bits and write-protects them
again (``kvm_arch_mmu_enable_log_dirty_pt_masked``) so the next write
faults and is logged; CLEAR clears the bits of a 64-page-aligned window and
write-protects exactly the pages that were dirty in it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmmem.errors import KernelError
from kvmmem.types import PAGE_SHIFT

if TYPE_CHECKING:
    from kvmmem.kvm.kvm_host import Kvm
    from kvmmem.kvm.memslot import MemorySlot

BITS_PER_LONG = 64


def _logged_slot(vm: Kvm, slot: int, call: str) -> MemorySlot:
    as_id, sid = slot >> 16, slot & 0xFFFF
    if as_id >= vm.arch.nr_address_spaces or sid >= vm.memslots.limits.user_mem_slots:
        raise KernelError("EINVAL", call, f"slot {slot:#x} is out of range")
    memslot = vm.memslots.id_to_memslot(sid, as_id)
    if memslot is None or memslot.dirty_bitmap is None:
        raise KernelError("ENOENT", call, f"slot {slot} does not exist or is not logging")
    return memslot


def _reprotect(vm: Kvm, memslot: MemorySlot, offsets: list[int]) -> None:
    flush = False
    for off in offsets:
        flush |= vm.stage2.wrprotect_range((memslot.base_gfn + off) << PAGE_SHIFT, 1 << PAGE_SHIFT)
    if flush or offsets:
        vm.flush_remote_tlbs(zap=False)


def kvm_get_dirty_log(vm: Kvm, slot: int) -> list[int]:
    """``KVM_GET_DIRTY_LOG``: the sorted absolute gfns dirtied since the last
    harvest; their bits are cleared and the pages write-protected again.

    Raises KernelError EINVAL (slot id out of range) or ENOENT (no such slot,
    or logging is off)."""
    memslot = _logged_slot(vm, slot, "KVM_GET_DIRTY_LOG")
    bitmap = memslot.dirty_bitmap
    assert bitmap is not None
    offsets = [int(i) for i in bitmap.nonzero()[0]]
    bitmap[:] = False
    _reprotect(vm, memslot, offsets)
    return [memslot.base_gfn + off for off in offsets]


def kvm_clear_dirty_log(vm: Kvm, slot: int, first_page: int, num_pages: int) -> None:
    """``KVM_CLEAR_DIRTY_LOG`` with every bit of the user bitmap set.

    Raises KernelError EINVAL (bad slot, ``first_page`` not a multiple of 64,
    a window outside the slot or a length not a multiple of 64 short of the
    slot's end) or ENOENT (no slot or logging off), in the kernel's order."""
    call = "KVM_CLEAR_DIRTY_LOG"
    as_id, sid = slot >> 16, slot & 0xFFFF
    if as_id >= vm.arch.nr_address_spaces or sid >= vm.memslots.limits.user_mem_slots:
        raise KernelError("EINVAL", call, f"slot {slot:#x} is out of range")
    if first_page & (BITS_PER_LONG - 1):
        raise KernelError("EINVAL", call, "first_page is not a multiple of 64")
    memslot = _logged_slot(vm, slot, call)
    npages = memslot.npages
    if first_page > npages or num_pages > npages - first_page or (
            num_pages < npages - first_page and num_pages & (BITS_PER_LONG - 1)):
        raise KernelError("EINVAL", call, "the window does not fit the slot")
    bitmap = memslot.dirty_bitmap
    assert bitmap is not None
    window = bitmap[first_page:first_page + num_pages]
    offsets = [first_page + int(i) for i in window.nonzero()[0]]
    window[:] = False
    _reprotect(vm, memslot, offsets)
