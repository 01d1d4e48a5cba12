"""Dirty logging in bitmap mode: ``KVM_GET_DIRTY_LOG``, ``KVM_CLEAR_DIRTY_LOG`` and
``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2``.

Mirrors ``kvm_get_dirty_log_protect``, ``kvm_clear_dirty_log_protect`` and the
capability's case of ``kvm_vm_ioctl_enable_cap_generic`` (virt/kvm/kvm_main.c;
kernel-semantics.md §7.1).  Without manual protect GET hands back the dirty
pages, clears their bits and write-protects them again
(``kvm_arch_mmu_enable_log_dirty_pt_masked``) so the next write faults and is
logged.  With manual protect (``kvm->manual_dirty_log_protect``) GET only
copies the bitmap; CLEAR clears the bits of a 64-page-aligned window and
write-protects exactly the pages that were dirty in it (it works on any logging
slot, manual protect or not: kvm_main.c checks nothing).  With
``KVM_DIRTY_LOG_INITIALLY_SET`` a new bitmap starts all set
(``kvm_prepare_memory_region``, kvm/memslot.py) and enabling logging
write-protects nothing (each arch's ``kvm_arch_commit_memory_region``): the
pages are protected lazily by CLEAR.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from kvmmem.errors import KernelError
from kvmmem.kvm import dirty_ring as ring
from kvmmem.kvm.dirty_ring import kvm_arch_mmu_enable_log_dirty_pt_masked

if TYPE_CHECKING:
    from kvmmem.kvm.kvm_host import Kvm
    from kvmmem.kvm.memslot import MemorySlot

BITS_PER_LONG = 64

KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1


def kvm_dirty_log_manual_caps(vm: Kvm) -> int:
    """``KVM_DIRTY_LOG_MANUAL_CAPS`` of the VM's arch at its release (what
    KVM_CHECK_EXTENSION(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) returns): the generic
    default is MANUAL_PROTECT_ENABLE alone; an arch that write-protects lazily defines
    it with INITIALLY_SET too - x86 since v5.7 (3c9bd4006bfc "KVM: x86: enable dirty
    log gradually in small chunks"), arm64 since v5.8 ("KVM: arm64: Support enabling
    dirty log gradually in small chunks", c862626, hash seen abbreviated), riscv since
    v6.19 ("KVM: riscv: Support enabling dirty log gradually in small chunks"; real
    riscv 6.12 refuses INITIALLY_SET, 7.2 takes it)."""
    caps = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
    if vm.arch.switch_on(vm.variant, vm.arch.dirty_log_initially_set_switch):
        caps |= KVM_DIRTY_LOG_INITIALLY_SET
    return caps


def kvm_vm_ioctl_enable_cap(vm: Kvm, cap: int, flags: int, args: tuple[int, ...]) -> None:
    """``KVM_ENABLE_CAP`` on the VM (``kvm_vm_ioctl_enable_cap_generic``).  Modelled:
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, whose ``args[0]`` becomes
    ``kvm->manual_dirty_log_protect`` (0 turns manual protect off again); the options
    allowed are MANUAL_PROTECT_ENABLE, and with it :func:`kvm_dirty_log_manual_caps`
    (INITIALLY_SET alone is refused).  The dirty ring's capabilities go to
    kvm/dirty_ring.py (their errnos are documented there).  Any other capability falls to the arch's
    ``kvm_vm_ioctl_enable_cap``, which refuses the ones it does not know.

    Raises KernelError EINVAL (``flags`` not 0 or an option not allowed: one test, so
    neither comes first; an unknown capability)."""
    call = "KVM_ENABLE_CAP"
    if cap in (ring.KVM_CAP_DIRTY_LOG_RING, ring.KVM_CAP_DIRTY_LOG_RING_ACQ_REL):
        ring.kvm_vm_ioctl_enable_dirty_log_ring(vm, cap, args[0] if args else 0)
        return
    if cap == ring.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP:
        ring.kvm_vm_ioctl_enable_dirty_log_ring_with_bitmap(vm, flags)
        return
    if cap != KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2:
        vm.arch.vm_ioctl_enable_cap(vm, cap, flags, args)
        return
    arg0 = args[0] if args else 0
    allowed = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
    if arg0 & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
        allowed = kvm_dirty_log_manual_caps(vm)
    if flags or arg0 & ~allowed:
        raise KernelError("EINVAL", call, f"flags {flags:#x} / args[0] {arg0:#x} not "
                                          f"within {allowed:#x}")
    vm.set_manual_dirty_log_protect(arg0)


def _logged_slot(vm: Kvm, slot: int, call: str) -> MemorySlot:
    as_id, sid = slot >> 16, slot & 0xFFFF
    if as_id >= vm.arch.nr_address_spaces or sid >= vm.memslots.limits.user_mem_slots:
        raise KernelError("EINVAL", call, f"slot {slot:#x} is out of range")
    memslot = vm.memslots.id_to_memslot(sid, as_id)
    if memslot is None or memslot.dirty_bitmap is None:
        raise KernelError("ENOENT", call, f"slot {slot} does not exist or is not logging")
    return memslot


_reprotect = kvm_arch_mmu_enable_log_dirty_pt_masked


def kvm_use_dirty_bitmap(vm: Kvm, call: str) -> None:
    """``kvm_use_dirty_bitmap()`` as GET/CLEAR check it first: a VM with a dirty ring
    keeps no bitmaps unless KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP was enabled.

    Raises KernelError ENXIO then."""
    if vm.dirty_ring_size and not vm.dirty_ring_with_bitmap:
        raise KernelError("ENXIO", call, "the VM uses a dirty ring without a bitmap")


def kvm_get_dirty_log(vm: Kvm, slot: int) -> list[int]:
    """``KVM_GET_DIRTY_LOG``: the sorted absolute gfns whose bits are set.  Without
    manual protect those bits are cleared and the pages write-protected again
    (dirtied since the last harvest); with it the bitmap is only copied (no clear, no
    flush: ``kvm_get_dirty_log_protect``'s manual branch), KVM_CLEAR_DIRTY_LOG does the
    rest.

    Raises KernelError EINVAL (slot id out of range) or ENOENT (no such slot,
    or logging is off), ENXIO (a dirty-ring VM without bitmap)."""
    kvm_use_dirty_bitmap(vm, "KVM_GET_DIRTY_LOG")
    memslot = _logged_slot(vm, slot, "KVM_GET_DIRTY_LOG")
    bitmap = memslot.dirty_bitmap
    assert bitmap is not None
    offsets = [int(i) for i in bitmap.nonzero()[0]]
    if not vm.manual_dirty_log_protect:
        bitmap[:] = False
        _reprotect(vm, memslot, offsets)
    return [memslot.base_gfn + off for off in offsets]


def kvm_clear_dirty_log(vm: Kvm, slot: int, first_page: int, num_pages: int,
                        pages: Iterable[int] | None = None) -> None:
    """``KVM_CLEAR_DIRTY_LOG`` (``kvm_clear_dirty_log_protect``): the user bitmap has a
    bit for each page of the window ``[first_page, first_page + num_pages)``; ``pages``
    are the slot pages whose bits are set (``None``: all of them).  Each set bit that is
    also set in the slot's bitmap is cleared and its page write-protected again
    (``atomic_long_fetch_andnot`` then ``kvm_arch_mmu_enable_log_dirty_pt_masked``); a
    set bit for a clean page does nothing, a clear bit leaves its page dirty.

    Raises KernelError EINVAL (bad slot, ``first_page`` not a multiple of 64,
    a window outside the slot or a length not a multiple of 64 short of the
    slot's end), ENOENT (no slot or logging off) or ENXIO (a dirty-ring VM without
    bitmap), in the kernel's order."""
    call = "KVM_CLEAR_DIRTY_LOG"
    kvm_use_dirty_bitmap(vm, call)
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
    if pages is None:
        window = bitmap[first_page:first_page + num_pages]
        offsets = [first_page + int(i) for i in window.nonzero()[0]]
        window[:] = False
    else:
        # the window's bits only: the kernel reads ceil(num_pages / 64) words, and a
        # bit past num_pages can only lie past the slot's end (the checks above)
        offsets = [p for p in sorted(set(pages))
                   if first_page <= p < first_page + num_pages and bitmap[p]]
        bitmap[offsets] = False
    _reprotect(vm, memslot, offsets)
