"""What KVM uses to turn an hva into a pfn: ``mm/gup.c`` and the PFNMAP lookup.

* :func:`get_user_page_fast_only` - ``get_user_page_fast_only()``: a lockless
  walk that succeeds only if the page is present (and writable for a write);
  special PTEs (zero page, PFNMAP) are refused, like ``gup_fast_pte_range``.
* :func:`get_user_pages_op` - ``get_user_pages_unlocked()`` for one page: takes
  ``mmap_lock`` for read, checks the VMA (``check_vma_flags``: VM_IO/VM_PFNMAP
  and missing rights are EFAULT), faults the page in (``faultin_page``: the
  zero page for a read of untouched private anonymous memory, a COW break with
  MMU_NOTIFY_CLEAR for FOLL_WRITE) and takes a reference.
* :func:`follow_pfnmap` - ``follow_pfnmap_start()``: the pfn and write bit of a
  VM_IO/VM_PFNMAP PTE, no reference (KVM's ``hva_to_pfn_remapped``).
* :func:`fixup_user_fault_op` - ``fixup_user_fault()``: run the VMA's fault
  handler (a device-lazy driver inserts its pfn); the caller holds mmap_lock.
"""

from __future__ import annotations

from kvmmem.errors import ArgumentError, KernelError
from kvmmem.host.memory import handle_mm_fault_op
from kvmmem.host.mm_types import (
    MMAP_READ_LOCK,
    MMAP_READ_UNLOCK,
    VM_FAULT_HWPOISON,
    VM_FAULT_OOM,
    VM_FAULT_RETRY,
    VM_FAULT_SIGBUS,
    VM_FAULT_SIGSEGV,
    MmStruct,
)
from kvmmem.host.pagetable import (
    PFN_SHIFT,
    PTE_MIGRATION,
    PTE_PRESENT,
    PTE_PROTNONE,
    PTE_SPECIAL,
    PTE_WRITE,
    present_pfn,
)
from kvmmem.host.vma import VM_IO, VM_PFNMAP, VM_READ, VM_WRITE
from kvmmem.sync import Op, drive
from kvmmem.types import Pfn


def _addr(hva: object, call: str) -> int:
    if not isinstance(hva, int) or isinstance(hva, bool):
        raise ArgumentError(f"{call}: hva", f"expected an int, got {hva!r}")
    return hva & ((1 << 64) - 1)


def _write(write: object, call: str) -> bool:
    if not isinstance(write, bool):
        raise ArgumentError(f"{call}: write", f"expected a bool, got {write!r}")
    return write


def get_user_page_fast_only(mm: MmStruct, hva: int, write: bool) -> Pfn | None:
    """``get_user_page_fast_only(hva, FOLL_WRITE if write)``: lockless, never faults.

    Returns the pfn with a reference taken, or None when the PTE is not
    present, not writable for a write, special (zero page, PFNMAP), PROT_NONE,
    a migration entry, or the page is poisoned."""
    return gup_fast(mm, _addr(hva, "get_user_page_fast_only"),
                    _write(write, "get_user_page_fast_only"))


def gup_fast(mm: MmStruct, addr: int, write: bool) -> Pfn | None:
    """``gup_fast()`` for one page: :func:`get_user_page_fast_only` on an
    address and flag already checked (KVM's ``hva_to_pfn_fast``, whose hva is
    a slot's user address)."""
    pt = mm.pt
    slot = pt.pmd.get(addr >> pt.pmd_shift)
    if slot is None:
        return None
    if isinstance(slot, int):
        e = slot
        pfn = (e >> PFN_SHIFT) + ((addr >> pt.page_shift) & pt.pte_mask)
    else:
        e = slot[(addr >> pt.page_shift) & pt.pte_mask]
        pfn = e >> PFN_SHIFT
    if not e & PTE_PRESENT or e & (PTE_SPECIAL | PTE_PROTNONE | PTE_MIGRATION):
        return None
    if write and not e & PTE_WRITE:
        return None
    if not mm.physmem.try_get_page(pfn):
        return None
    return Pfn(pfn)


def get_user_pages_op(mm: MmStruct, hva: int, write: bool) -> Op[Pfn]:
    """``get_user_pages_unlocked(hva, 1, FOLL_HWPOISON | (FOLL_WRITE if write))``.

    Returns the pfn with a reference taken.  Raises KernelError EFAULT (no
    VMA, VM_IO/VM_PFNMAP, the VMA lacks the right, the fault ends in SIGBUS or
    SIGSEGV), EHWPOISON (poisoned page), ENOMEM (fault OOM)."""
    a = _addr(hva, "get_user_pages")
    w = _write(write, "get_user_pages")
    return (yield from get_user_pages_unlocked_op(mm, a, w))


def get_user_pages_unlocked_op(mm: MmStruct, addr: int, write: bool) -> Op[Pfn]:
    """:func:`get_user_pages_op` on an address and flag already checked
    (``get_user_pages_unlocked`` as KVM's ``hva_to_pfn_slow`` calls it)."""
    pm = mm.physmem
    yield MMAP_READ_LOCK
    err: KernelError | None = None
    result = -1
    tries = 0
    while tries < 64:
        vma = mm.vma_lookup(addr)
        if vma is None:
            err = KernelError("EFAULT", _gup_call(addr, write), "no VMA")
            break
        if vma.flags & (VM_IO | VM_PFNMAP):
            err = KernelError("EFAULT", _gup_call(addr, write),
                              "VM_IO | VM_PFNMAP (check_vma_flags)")
            break
        if not vma.flags & (VM_WRITE if write else VM_READ):
            err = KernelError("EFAULT", _gup_call(addr, write),
                              "VMA lacks the access right (check_vma_flags)")
            break
        pfn = present_pfn(mm.pt, addr, write)
        if pfn >= 0:
            if pm.is_hwpoison(pfn):
                err = KernelError("EHWPOISON", _gup_call(addr, write), "page is poisoned")
                break
            pm.get_page(pfn)
            result = pfn
            break
        code = yield from handle_mm_fault_op(mm, vma, addr, write)
        if code & VM_FAULT_HWPOISON:
            err = KernelError("EHWPOISON", _gup_call(addr, write), "page is poisoned")
            break
        if code & VM_FAULT_OOM:
            err = KernelError("ENOMEM", _gup_call(addr, write), "fault out of memory")
            break
        if code & (VM_FAULT_SIGBUS | VM_FAULT_SIGSEGV):
            err = KernelError("EFAULT", _gup_call(addr, write),
                              "the fault would signal (vm_fault_to_errno)")
            break
        if not code & VM_FAULT_RETRY:
            tries += 1
    yield MMAP_READ_UNLOCK
    if err is not None:
        raise err
    if result < 0:  # pragma: no cover - a fault that never resolves
        raise KernelError("EFAULT", _gup_call(addr, write), "fault did not resolve")
    return Pfn(result)


def _gup_call(addr: int, write: bool) -> str:
    """How a get_user_pages error names the call."""
    return f"get_user_pages({addr:#x}, write={write})"


def get_user_pages(mm: MmStruct, hva: int, write: bool) -> Pfn:
    """Sequential :func:`get_user_pages_op`."""
    return drive(get_user_pages_op(mm, hva, write))


def follow_pfnmap(mm: MmStruct, hva: int) -> tuple[Pfn, bool] | None:
    """``follow_pfnmap_start()``: ``(pfn, pte writable)`` of a VM_IO/VM_PFNMAP mapping.

    Returns None if no PTE is present (the caller then uses
    ``fixup_user_fault``).  Like the kernel's walk, a PROT_NONE entry counts as
    present (not writable).  Raises KernelError EINVAL when ``hva`` is not in a
    VM_IO/VM_PFNMAP VMA.  Takes no reference; the caller holds mmap_lock."""
    a = _addr(hva, "follow_pfnmap")
    vma = mm.vma_lookup(a)
    if vma is None or not vma.flags & (VM_IO | VM_PFNMAP):
        raise KernelError("EINVAL", f"follow_pfnmap({a:#x})", "not a VM_IO/VM_PFNMAP mapping")
    e, huge = mm.pt.entry(a)
    if not e & PTE_PRESENT or e & PTE_MIGRATION:
        return None
    pfn = e >> PFN_SHIFT
    if huge:
        pfn += (a >> mm.pt.page_shift) & mm.pt.pte_mask
    return Pfn(pfn), bool(e & PTE_WRITE)


def fixup_user_fault_op(mm: MmStruct, hva: int, write: bool) -> Op[None]:
    """``fixup_user_fault(mm, hva, FAULT_FLAG_WRITE if write)``: run the fault handler.

    For a device-lazy VMA the driver inserts its pfn read-only on a read and
    writable on a write (upgrading a read-only entry, like ``pfn_mkwrite``).
    The caller holds mmap_lock (read).  Raises KernelError EFAULT (no VMA, the
    VMA lacks the right, the fault ends in SIGBUS/SIGSEGV), EHWPOISON, ENOMEM."""
    a = _addr(hva, "fixup_user_fault")
    w = _write(write, "fixup_user_fault")
    call = f"fixup_user_fault({a:#x}, write={w})"
    while True:
        vma = mm.vma_lookup(a)
        if vma is None:
            raise KernelError("EFAULT", call, "no VMA")
        if not vma.flags & (VM_WRITE if w else VM_READ):
            raise KernelError("EFAULT", call, "VMA lacks the access right (vma_permits_fault)")
        code = yield from handle_mm_fault_op(mm, vma, a, w)
        if code & VM_FAULT_HWPOISON:
            raise KernelError("EHWPOISON", call, "page is poisoned")
        if code & VM_FAULT_OOM:
            raise KernelError("ENOMEM", call, "fault out of memory")
        if code & (VM_FAULT_SIGBUS | VM_FAULT_SIGSEGV):
            raise KernelError("EFAULT", call, "the fault would signal")
        if not code & VM_FAULT_RETRY:
            return


def fixup_user_fault(mm: MmStruct, hva: int, write: bool) -> None:
    """Sequential :func:`fixup_user_fault_op`."""
    drive(fixup_user_fault_op(mm, hva, write))
