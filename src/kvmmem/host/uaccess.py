"""Userspace loads and stores: the x86 user page-fault path (``do_user_addr_fault``,
``access_error``) until the PTE allows the access, then the access itself.

A load or store that spans pages faults every page in and re-checks that none
changed before touching memory (the ``mmap_lock`` is held for read)."""

from __future__ import annotations

from kvmmem.errors import ArgumentError, InputError
from kvmmem.host.args import ULONG_MAX, ulong_arg
from kvmmem.host.memory import handle_mm_fault_op
from kvmmem.host.mm_types import (
    MMAP_READ_LOCK,
    MMAP_READ_UNLOCK,
    VM_FAULT_HWPOISON,
    VM_FAULT_OOM,
    VM_FAULT_RETRY,
    VM_FAULT_SIGBUS,
    VM_FAULT_SIGSEGV,
    HostSignal,
    MmStruct,
)
from kvmmem.host.pagetable import present_pfn, touch_pte
from kvmmem.host.vma import VM_ACCESS_FLAGS, VM_WRITE, Vma
from kvmmem.sync import Op, drive


def access_permitted(vma: Vma, write: bool) -> bool:
    """x86 ``access_error()`` inverted: writes need VM_WRITE, reads any of R/W/X."""
    if write:
        return bool(vma.flags & VM_WRITE)
    return bool(vma.flags & VM_ACCESS_FLAGS)


def fault_in_op(mm: MmStruct, addr: int, write: bool) -> Op[int | str]:
    """A user access at ``addr``: ``do_user_addr_fault`` until the PTE allows it.

    Returns the pfn to use, or the signal name (``"SIGSEGV"``,
    ``"SIGBUS"``).  The caller holds ``mmap_lock`` for read (so the VMA
    stays; the PTE may change under a concurrent zap, hence the re-check)."""
    pm = mm.physmem
    vma = mm.vma_lookup(addr)
    if vma is None or not access_permitted(vma, write):
        return "SIGSEGV"
    tries = 0
    while True:
        pfn = present_pfn(mm.pt, addr, write)
        if pfn >= 0:
            if pm.is_hwpoison(pfn):
                return "SIGBUS"
            touch_pte(mm.pt, addr, write)
            return pfn
        if tries >= 64:  # pragma: no cover - a fault that never resolves
            raise RuntimeError(f"fault at {addr:#x} did not resolve")
        code = yield from handle_mm_fault_op(mm, vma, addr, write)
        if code & (VM_FAULT_SIGBUS | VM_FAULT_HWPOISON | VM_FAULT_OOM):
            return "SIGBUS"
        if code & VM_FAULT_SIGSEGV:
            return "SIGSEGV"
        if not code & VM_FAULT_RETRY:
            tries += 1


def access_op(mm: MmStruct, hva: int, size: int, write: bool) -> Op[list[tuple[int, int, int]]]:
    """Fault in every page an access touches; returns ``(pfn, offset, n)`` chunks.

    Raises HostSignal (lock still held by the caller)."""
    page_size = mm.page_size
    if (hva & (page_size - 1)) + size <= page_size:
        r = yield from fault_in_op(mm, hva, write)
        if isinstance(r, str):
            raise HostSignal(r, hva)
        return [(r, hva & (page_size - 1), size)]
    chunks: list[tuple[int, int]] = []
    addr, left = hva, size
    while left:
        n = min(left, page_size - (addr & (page_size - 1)))
        chunks.append((addr, n))
        addr += n
        left -= n
    while True:
        out: list[tuple[int, int, int]] = []
        for a, n in chunks:
            r = yield from fault_in_op(mm, a, write)
            if isinstance(r, str):
                raise HostSignal(r, a)
            out.append((r, a & (page_size - 1), n))
        if len(out) == 1 or all(
            present_pfn(mm.pt, a, write) == pfn for (a, _), (pfn, _, _) in zip(
                chunks, out, strict=True)
        ):
            return out


def check_access(hva: object, size: object, call: str) -> tuple[int, int]:
    a = ulong_arg(hva, f"{call}: hva")
    if not isinstance(size, int) or isinstance(size, bool):
        raise ArgumentError(f"{call}: size", f"expected an int, got {size!r}")
    if size <= 0:
        raise InputError(f"{call}: size must be a positive int, got {size!r}")
    if a + size > ULONG_MAX + 1:
        raise InputError(f"{call}: access wraps the address space")
    return a, size


def host_read_op(mm: MmStruct, hva: int, size: int) -> Op[int]:
    """A userspace load of ``size`` bytes at ``hva``: returns the little-endian value.

    Faults pages in like the kernel (zero page for untouched private
    anonymous memory, page cache for files).  Raises :class:`HostSignal`
    SIGSEGV (no VMA, no access right) or SIGBUS (beyond EOF, empty hugetlb
    pool, device without handler, poisoned page)."""
    hva, size = check_access(hva, size, "host_read")
    yield MMAP_READ_LOCK
    try:
        chunks = yield from access_op(mm, hva, size, False)
    except HostSignal:
        yield MMAP_READ_UNLOCK
        raise
    pm = mm.physmem
    if len(chunks) == 1:
        pfn, off, n = chunks[0]
        value = pm.read_int(pfn, off, n)
    else:
        data = b"".join(pm.read(pfn, off, n) for pfn, off, n in chunks)
        value = int.from_bytes(data, "little")
    yield MMAP_READ_UNLOCK
    return value


def host_write_op(mm: MmStruct, hva: int, size: int, value: int) -> Op[None]:
    """A userspace store of ``value`` (``size`` bytes, little-endian) at ``hva``.

    Breaks COW (zero page, page-cache page of a private mapping) with a
    CLEAR notification.  Raises :class:`HostSignal` like host_read; no byte
    is stored then."""
    hva, size = check_access(hva, size, "host_write")
    if not isinstance(value, int) or isinstance(value, bool):
        raise ArgumentError("host_write: value", f"expected an int, got {value!r}")
    if not -(1 << (8 * size - 1)) <= value < (1 << (8 * size)):
        raise InputError(f"host_write: value {value:#x} does not fit in {size} bytes")
    value &= (1 << (8 * size)) - 1
    yield MMAP_READ_LOCK
    try:
        chunks = yield from access_op(mm, hva, size, True)
    except HostSignal:
        yield MMAP_READ_UNLOCK
        raise
    pm = mm.physmem
    if len(chunks) == 1:
        pfn, off, n = chunks[0]
        pm.write_int(pfn, off, n, value)
    else:
        data = value.to_bytes(size, "little")
        pos = 0
        for pfn, off, n in chunks:
            pm.write(pfn, off, data[pos : pos + n])
            pos += n
    yield MMAP_READ_UNLOCK


def host_read(mm: MmStruct, hva: int, size: int) -> int:
    """Sequential :func:`host_read_op`."""
    return drive(host_read_op(mm, hva, size))


def host_write(mm: MmStruct, hva: int, size: int, value: int) -> None:
    """Sequential :func:`host_write_op`."""
    drive(host_write_op(mm, hva, size, value))


def host_read_bytes(mm: MmStruct, hva: int, size: int) -> bytes:
    """A userspace load of ``size`` bytes as bytes (same faults as host_read)."""
    return host_read(mm, hva, size).to_bytes(size, "little")
