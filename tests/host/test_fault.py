"""The fault path and userspace loads/stores: zero page, COW, page cache, signals."""

from __future__ import annotations

import pytest

from kvmmem.errors import ArgumentError, InputError, KernelError
from kvmmem.host import (
    PROT_EXEC,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    HostSignal,
    Mm,
    NotifierEvent,
    RecordingNotifier,
)

from .conftest import P

RW = PROT_READ | PROT_WRITE


def test_read_of_untouched_anon_maps_zero_page(mm: Mm) -> None:
    """do_anonymous_page(): a read fault maps the shared zero page read-only (special)."""
    a = mm.mmap(2 * P, RW, "anon")
    assert mm.host_read(a + 100, 8) == 0
    pte = mm.host_pte(a)
    assert pte is not None
    assert (pte.pfn, pte.writable, pte.special) == (mm.physmem.zero_pfn, False, True)
    assert mm.host_pte(a + P) is None  # faults are per page


def test_write_after_read_breaks_cow_with_clear(mm: Mm, rec: RecordingNotifier) -> None:
    """do_wp_page() -> wp_page_copy(): writing a zero-page PTE allocates a page and
    notifies MMU_NOTIFY_CLEAR for that page (kvm-on-this-host §3: the host COW fires the
    notifier during the guest's fault)."""
    a = mm.mmap(P, RW, "anon")
    mm.host_read(a, 1)
    mm.host_write(a + 9, 1, 0x7F)
    assert rec.starts() == [(a, a + P, NotifierEvent.CLEAR)]
    pte = mm.host_pte(a)
    assert pte is not None and pte.writable and pte.dirty and pte.pfn != mm.physmem.zero_pfn
    assert mm.host_read(a + 8, 2) == 0x7F00


def test_first_write_maps_fresh_page_without_notifier(mm: Mm, rec: RecordingNotifier) -> None:
    """A write fault on pte_none installs a new page: nothing is replaced, no notifier."""
    a = mm.mmap(P, RW, "anon")
    mm.host_write(a, 8, 0x0102030405060708)
    assert rec.log == []
    assert mm.host_read(a, 8) == 0x0102030405060708
    assert mm.physmem.page_mapcount(mm.host_pte(a).pfn) == 1  # type: ignore[union-attr]


def test_page_cache_is_shared_by_every_mapping(mm: Mm) -> None:
    """filemap_fault()/shmem_fault(): all mappings of a file, shared or private, map
    the same page-cache page until a private write copies it."""
    f = mm.memfd_create("m", 2 * P)
    a = mm.mmap(2 * P, RW, "memfd", file=f)
    b = mm.mmap(2 * P, PROT_READ, "memfd", file=f)
    c = mm.mmap(2 * P, RW, "file", file=f)
    mm.host_write(a, 4, 0xCAFEBABE)
    assert mm.host_read(b, 4) == 0xCAFEBABE
    assert mm.host_read(c, 4) == 0xCAFEBABE
    pa, pc = mm.host_pte(a), mm.host_pte(c)
    assert pa is not None and pc is not None and pa.pfn == pc.pfn and not pc.writable
    assert mm.physmem.page_mapcount(pa.pfn) == 3
    mm.host_write(c, 4, 0x11111111)  # COW in the private mapping
    mm.host_write(a, 4, 0x22222222)
    assert (mm.host_read(b, 4), mm.host_read(c, 4)) == (0x22222222, 0x11111111)
    assert f.pread(0, 4) == (0x22222222).to_bytes(4, "little")


def test_shared_read_fault_writability(mm: Mm) -> None:
    """do_read_fault(): shmem has no write-notify, so a read of a writable shared memfd
    maps the page writable; a disk file (write-notify) maps it read-only until the first
    write (do_page_mkwrite)."""
    a = mm.mmap(P, RW, "memfd")
    mm.host_read(a, 1)
    assert mm.host_pte(a).writable  # type: ignore[union-attr]
    b = mm.mmap(P, RW, "file-shared")
    mm.host_read(b, 1)
    assert not mm.host_pte(b).writable  # type: ignore[union-attr]
    mm.host_write(b, 1, 1)
    assert mm.host_pte(b).writable  # type: ignore[union-attr]


def test_file_content_and_pwrite_visibility(mm: Mm) -> None:
    """Private file mappings see pwrite()s made after they mapped the page, until they
    write themselves (kvm-on-this-host §3.1, private file F2/F3)."""
    f = mm.open_file("/img", 2 * P, fill=0xF1)
    a = mm.mmap(2 * P, RW, "file", file=f)
    assert mm.host_read(a, 1) == 0xF1
    f.pwrite(0, b"\xf2")
    assert mm.host_read(a, 1) == 0xF2
    mm.host_write(a, 1, 0xB3)
    f.pwrite(0, b"\xf3")
    assert mm.host_read(a, 1) == 0xB3
    assert f.pread(0, 1) == b"\xf3"


@pytest.mark.parametrize(
    ("prot", "load", "store"),
    [
        (PROT_NONE, "SIGSEGV", "SIGSEGV"),
        (PROT_READ, None, "SIGSEGV"),
        (PROT_WRITE, None, None),
        (PROT_EXEC, None, "SIGSEGV"),
        (RW, None, None),
    ],
)
def test_access_rights(mm: Mm, prot: int, load: str | None, store: str | None) -> None:
    """x86 access_error(): stores need VM_WRITE; loads need any of R/W/X (PROT_WRITE and
    PROT_EXEC mappings are readable on x86 without protection keys)."""
    a = mm.mmap(P, prot, "anon")
    for write, expected in ((False, load), (True, store)):
        before = mm.snapshot()
        try:
            if write:
                mm.host_write(a, 1, 1)
            else:
                mm.host_read(a, 1)
            got = None
        except HostSignal as e:
            got = e.signal
            assert e.addr == a
            assert mm.snapshot() == before
        assert got == expected


def test_access_to_unmapped_address_is_sigsegv(mm: Mm) -> None:
    """No VMA: SEGV_MAPERR."""
    with pytest.raises(HostSignal) as e:
        mm.host_read(0x1234000, 4)
    assert (e.value.signal, e.value.addr) == ("SIGSEGV", 0x1234000)


def test_access_beyond_eof_is_sigbus(mm: Mm) -> None:
    """filemap_fault(): a page at or beyond i_size is SIGBUS; the page holding EOF is
    readable, zero after EOF."""
    f = mm.open_file("/short", P + 100, fill=0xEE)
    a = mm.mmap(4 * P, RW, "file-shared", file=f)
    assert mm.host_read(a + P + 99, 2) == 0x00EE
    with pytest.raises(HostSignal) as e:
        mm.host_read(a + 2 * P, 1)
    assert e.value.signal == "SIGBUS"
    with pytest.raises(HostSignal):
        mm.host_write(a + 3 * P, 1, 0)


def test_truncate_unmaps_and_sigbus(mm: Mm, rec: RecordingNotifier) -> None:
    """truncate_pagecache()/shmem_setattr(): shrinking a file zaps the pages past EOF
    in every mapping, private COW copies included (even_cows), twice, with
    MMU_NOTIFY_CLEAR; accesses there SIGBUS; growing again reads zero
    (kvm-on-this-host §3.5: ftruncate(memfd, 0) then back)."""
    f = mm.memfd_create("m", 4 * P)
    a = mm.mmap(4 * P, RW, "memfd", file=f, fill=0x99)
    c = mm.mmap(4 * P, RW, "file", file=f)
    mm.host_write(c + 3 * P, 1, 0x55)
    rec.log.clear()
    mm.ftruncate(f, P)
    assert rec.starts() == [
        (a + P, a + 4 * P, NotifierEvent.CLEAR), (c + P, c + 4 * P, NotifierEvent.CLEAR),
        (a + P, a + 4 * P, NotifierEvent.CLEAR), (c + P, c + 4 * P, NotifierEvent.CLEAR),
    ]
    for addr in (a + 2 * P, c + 3 * P):
        with pytest.raises(HostSignal) as e:
            mm.host_read(addr, 1)
        assert e.value.signal == "SIGBUS"
    assert mm.host_read(a, 1) == 0x99
    mm.ftruncate(f, 4 * P)
    assert mm.host_read(a + 2 * P, 1) == 0


def test_truncate_to_partial_page_zeroes_tail(mm: Mm) -> None:
    """truncate_inode_partial_folio(): the bytes after the new EOF in its page read 0."""
    f = mm.memfd_create("m", P)
    a = mm.mmap(P, RW, "memfd", file=f, fill=0x44)
    mm.ftruncate(f, 100)
    assert mm.host_read(a + 99, 2) == 0x0044


def test_ftruncate_errors(mm: Mm) -> None:
    """do_ftruncate(): negative length EINVAL; a file not open for writing EINVAL;
    hugetlbfs sizes are multiples of 2 MiB."""
    f = mm.memfd_create("m", P)
    with pytest.raises(KernelError):
        mm.ftruncate(f, -1)
    with pytest.raises(KernelError):
        mm.ftruncate(mm.open_file("/ro", P, writable=False), 0)
    with pytest.raises(KernelError):
        mm.ftruncate(mm.memfd_create("h", 0, hugetlb=True), P)
    with pytest.raises(ArgumentError) as bad:
        mm.ftruncate("f", 0)  # type: ignore[arg-type]
    assert bad.value.errno == "EBADF"  # ftruncate(2) on something that is not a file


def test_access_crossing_pages(mm: Mm) -> None:
    """An 8-byte store across a page boundary lands in both pages; when the second
    page faults, no byte is stored (x86 stores are not split by a fault)."""
    a = mm.mmap(2 * P, RW, "anon")
    mm.host_write(a + P - 4, 8, 0x1122334455667788)
    assert mm.host_read(a + P - 4, 8) == 0x1122334455667788
    assert mm.host_read(a + P, 4) == 0x11223344
    b = mm.mmap(P, RW, "anon", addr=0x50000000, fixed=True)
    with pytest.raises(HostSignal) as e:
        mm.host_write(b + P - 4, 8, -1)
    assert e.value.addr == b + P
    assert mm.host_read(b + P - 4, 4) == 0


def test_access_argument_checks(mm: Mm) -> None:
    """Bad sizes or values are API misuse (InputError); a wrong type is an
    ArgumentError (KernelError EINVAL and InputError)."""
    a = mm.mmap(P, RW, "anon")
    with pytest.raises(InputError):
        mm.host_read(a, 0)
    with pytest.raises(InputError):
        mm.host_write(a, 1, 256)
    with pytest.raises(ArgumentError) as bad:
        mm.host_read(float(a), 1)  # type: ignore[arg-type]
    assert bad.value.errno == "EINVAL"
    mm.host_write(a, 1, -1)
    assert mm.host_read(a, 1) == 0xFF


def test_device_mappings(mm: Mm) -> None:
    """remap_pfn_range maps device frames at mmap (special PTEs, writable per the VMA);
    a device-lazy VMA's fault handler inserts read-only on a read and upgrades on a
    write (pfn_mkwrite) without a notifier."""
    rec = RecordingNotifier()
    mm.mmu_notifier_register(rec)
    d = mm.open_device("/dev/bar0", 4)
    a = mm.mmap(4 * P, RW, "device", file=d)
    pte = mm.host_pte(a + 2 * P)
    assert pte is not None and pte.special and pte.writable and pte.pfn == d.device_base + 2
    mm.host_write(a + 8, 4, 0xABCD)
    assert mm.physmem.read_int(d.device_base, 8, 4) == 0xABCD
    lazy = mm.mmap(2 * P, RW, "device-lazy")
    assert mm.host_pte(lazy) is None
    assert mm.host_read(lazy, 4) == 0
    assert not mm.host_pte(lazy).writable  # type: ignore[union-attr]
    mm.host_write(lazy, 4, 1)
    assert mm.host_pte(lazy).writable  # type: ignore[union-attr]
    assert rec.log == []


def test_hwpoisoned_page_sigbus(mm: Mm) -> None:
    """memory_failure(): touching a poisoned page is SIGBUS (BUS_MCEERR_AR)."""
    a = mm.mmap(P, RW, "anon", fill=1)
    mm.physmem.hwpoison(mm.host_pte(a).pfn)  # type: ignore[union-attr]
    with pytest.raises(HostSignal) as e:
        mm.host_read(a, 1)
    assert e.value.signal == "SIGBUS"
