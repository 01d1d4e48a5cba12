"""The one fault-in resolver: gfn -> memslot -> hva -> pfn.

Every stage-2 fault and every prefault on every architecture resolves its
page here, as the kernel's ``__kvm_faultin_pfn`` / ``kvm_follow_pfn`` /
``hva_to_pfn`` do (virt/kvm/kvm_main.c; kernel-semantics.md §3.1).  The
result is a pfn or one of the kernel's error pfns, whether the mapping may be
writable (``map_writable``), and whether a page reference was taken that the
caller must drop (``kvm_release_faultin_page``).

The resolver is an :data:`~kvmmem.sync.Op`: it pauses wherever the host mm
code it calls pauses (``mmap_lock`` inside GUP and around ``vma_lookup``), so
a concurrent munmap can slip in between resolving the pfn and the caller
taking ``mmu_lock`` - exactly the window the invalidation sequence guards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvmmem.errors import KernelError
from kvmmem.host import Mm
from kvmmem.host.gup import get_user_pages_unlocked_op, gup_fast
from kvmmem.host.vma import VM_IO, VM_PFNMAP
from kvmmem.sync import Op, acquire, release
from kvmmem.types import Hva, Pfn
from kvmmem.variants import Variant

if TYPE_CHECKING:
    from kvmmem.kvm.memslot import MemorySlot

# include/linux/kvm_host.h: error pfns live above every real pfn.
KVM_PFN_ERR_MASK = 0x7FF << 52
KVM_PFN_ERR_NOSLOT_MASK = 0xFFF << 52
KVM_PFN_NOSLOT = 1 << 63
KVM_PFN_ERR_FAULT = KVM_PFN_ERR_MASK + 0
KVM_PFN_ERR_HWPOISON = KVM_PFN_ERR_MASK + 1
KVM_PFN_ERR_RO_FAULT = KVM_PFN_ERR_MASK + 2
KVM_PFN_ERR_SIGPENDING = KVM_PFN_ERR_MASK + 3
KVM_PFN_ERR_NEEDS_IO = KVM_PFN_ERR_MASK + 4

PFN_ERROR_NAMES = {
    KVM_PFN_ERR_FAULT: "KVM_PFN_ERR_FAULT",
    KVM_PFN_ERR_HWPOISON: "KVM_PFN_ERR_HWPOISON",
    KVM_PFN_ERR_RO_FAULT: "KVM_PFN_ERR_RO_FAULT",
    KVM_PFN_ERR_SIGPENDING: "KVM_PFN_ERR_SIGPENDING",
    KVM_PFN_ERR_NEEDS_IO: "KVM_PFN_ERR_NEEDS_IO",
    KVM_PFN_NOSLOT: "KVM_PFN_NOSLOT",
}

# include/linux/kvm_host.h: error hvas sit at and above PAGE_OFFSET.
PAGE_OFFSET = 0xFFFF_8880_0000_0000
KVM_HVA_ERR_BAD = PAGE_OFFSET
KVM_HVA_ERR_RO_BAD = PAGE_OFFSET + 4096

_MAX_REMAPPED_RETRIES = 8


def is_error_pfn(pfn: int) -> bool:
    """``is_error_pfn()``."""
    return bool(pfn & KVM_PFN_ERR_MASK)


def is_error_noslot_pfn(pfn: int) -> bool:
    """``is_error_noslot_pfn()``: an error pfn or ``KVM_PFN_NOSLOT``."""
    return bool(pfn & KVM_PFN_ERR_NOSLOT_MASK)


def pfn_name(pfn: int) -> str:
    """A pfn for humans: ``0x1234`` or the error's kernel name."""
    return PFN_ERROR_NAMES.get(pfn, hex(pfn))


@dataclass(slots=True)
class Faultin:
    """What ``__kvm_faultin_pfn`` hands back.

    ``pfn`` is a real pfn or an error pfn; ``map_writable`` says whether a
    writable stage-2 entry is allowed; ``refcounted`` that a page reference is
    held (drop it with :func:`kvm_release_faultin_page`); ``hva`` the address
    resolved."""

    pfn: int
    map_writable: bool
    refcounted: bool
    hva: int


def gfn_to_hva_memslot_prot(slot: MemorySlot, gfn: int, write: bool) -> tuple[int, bool]:
    """``__gfn_to_hva_many`` with the write check: (hva or error hva, slot writable).

    An INVALID slot gives ``KVM_HVA_ERR_BAD``; a write to a READONLY slot
    ``KVM_HVA_ERR_RO_BAD``."""
    if slot.invalid:
        return KVM_HVA_ERR_BAD, False
    writable = not slot.readonly
    if write and not writable:
        return KVM_HVA_ERR_RO_BAD, False
    return slot.gfn_to_hva(gfn), writable


def kvm_faultin_pfn(
    mm: Mm, variant: Variant, slot: MemorySlot, gfn: int, write: bool
) -> Op[Faultin]:
    """``__kvm_faultin_pfn(slot, gfn, write ? FOLL_WRITE : 0, ...)``.

    Returns a :class:`Faultin`; never raises for a resolution failure (that is
    an error pfn, as in the kernel).  The slot is read when the operation is
    made (the caller runs it at once): the hva resolution itself never pauses."""
    hva, slot_writable = gfn_to_hva_memslot_prot(slot, gfn, write)
    if hva == KVM_HVA_ERR_RO_BAD:
        return _resolved(Faultin(KVM_PFN_ERR_RO_FAULT, False, False, hva))
    if hva >= PAGE_OFFSET:
        return _resolved(Faultin(KVM_PFN_NOSLOT, False, False, hva))
    # A read-only slot never asks for a writable mapping.
    return hva_to_pfn(mm, variant, hva, write, slot_writable)


def _resolved(fin: Faultin) -> Op[Faultin]:
    """A fault-in decided without touching the host mm (no pause)."""
    return fin
    yield  # pragma: no cover


def hva_to_pfn(mm: Mm, variant: Variant, hva: int, write: bool, want_writable: bool
               ) -> Op[Faultin]:
    """``hva_to_pfn()``: fast GUP, slow GUP, then the VM_IO/VM_PFNMAP lookup.

    ``hva`` is a slot's user address below ``PAGE_OFFSET`` and ``write`` a
    bool: GUP is called without re-checking its arguments."""
    # hva_to_pfn_fast: only when a writable page is wanted or needed.
    if write or want_writable:
        pfn = gup_fast(mm, hva, True)
        if pfn is not None:
            return Faultin(pfn, True, True, hva)
    # hva_to_pfn_slow: get_user_pages_unlocked (may fault the page in).
    try:
        pfn = yield from get_user_pages_unlocked_op(mm, hva, write)
    except KernelError as err:
        if err.errno == "EHWPOISON":
            return Faultin(KVM_PFN_ERR_HWPOISON, False, False, hva)
        pfn = None
    if pfn is not None:
        writable = write
        if not write and want_writable:
            # Opportunistic upgrade: a read that finds the page already writable.
            wpfn = gup_fast(mm, hva, True)
            if wpfn is not None:
                mm.physmem.put_page(pfn)
                pfn, writable = wpfn, True
        return Faultin(pfn, writable, True, hva)
    # GUP failed: look at the VMA under mmap_read_lock.
    for _ in range(_MAX_REMAPPED_RETRIES):
        yield acquire("mmap_lock", shared=True)
        vma = mm.vma_lookup(hva)
        if vma is None or not vma.flags & (VM_IO | VM_PFNMAP):
            yield release("mmap_lock", shared=True)
            return Faultin(KVM_PFN_ERR_FAULT, False, False, hva)
        result = yield from hva_to_pfn_remapped(mm, variant, Hva(hva), write, want_writable)
        yield release("mmap_lock", shared=True)
        if result is not None:
            return result
    return Faultin(KVM_PFN_ERR_FAULT, False, False, hva)


def hva_to_pfn_remapped(mm: Mm, variant: Variant, hva: Hva, write: bool,
                        want_writable: bool = True) -> Op[Faultin | None]:
    """``hva_to_pfn_remapped()``: read the PFNMAP PTE, asking the driver's fault
    handler (``fixup_user_fault``) to populate it when absent.  A read-only
    slot never gets a writable mapping (``kvm_follow_pfn`` drops
    ``map_writable`` for it).

    Returns None for -EAGAIN (the caller looks the VMA up again)."""
    entry = mm.follow_pfnmap(hva)
    if entry is None:
        # Only an absent PTE goes to the driver; a present read-only one is an
        # RO fault below (the perf-ring write-notify case, kvm-on-this-host §3.6).
        try:
            yield from mm.fixup_user_fault_op(hva, write)
        except KernelError:
            return Faultin(KVM_PFN_ERR_FAULT, False, False, hva)
        entry = mm.follow_pfnmap(hva)
        if entry is None:
            return None
    pfn, pte_writable = entry
    if variant.remapped_always_writable:
        # v5.4 follow_pfn() knew nothing of the PTE's write bit (fixed by bd2fae8da794).
        return Faultin(pfn, want_writable, False, hva)
    if write and not pte_writable:
        return Faultin(KVM_PFN_ERR_RO_FAULT, False, False, hva)
    return Faultin(Pfn(pfn), pte_writable and want_writable, False, hva)


def kvm_release_faultin_page(mm: Mm, fin: Faultin) -> None:
    """``kvm_release_faultin_page()``: drop the GUP reference, if one was taken."""
    if fin.refcounted:
        mm.physmem.put_page(Pfn(fin.pfn))
        fin.refcounted = False
