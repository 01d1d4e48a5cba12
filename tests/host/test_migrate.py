"""Page migration (mm/migrate.c, try_to_migrate_one / remove_migration_ptes)."""

from __future__ import annotations

import pytest

from kvmmem.errors import KernelError
from kvmmem.host import PROT_READ, PROT_WRITE, Mm, NotifierEvent, RecordingNotifier
from kvmmem.sync import SyncKind

from .conftest import M, P

RW = PROT_READ | PROT_WRITE


def test_migrate_anonymous_page(mm: Mm, rec: RecordingNotifier) -> None:
    """try_to_migrate_one(): MMU_NOTIFY_CLEAR on the page, migration entry, copy,
    remove_migration_ptes() maps the new frame (no notification); the old one is freed."""
    a = mm.mmap(P, RW, "anon", fill=0x3C)
    mm.host_write(a + 8, 2, 0xBEEF)
    old = mm.host_pte(a).pfn  # type: ignore[union-attr]
    new = mm.migrate(a)
    assert new != old and mm.host_pte(a).pfn == new  # type: ignore[union-attr]
    assert mm.host_pte(a).writable  # type: ignore[union-attr]
    assert mm.host_read(a + 8, 2) == 0xBEEF and mm.host_read(a, 1) == 0x3C
    assert rec.starts() == [(a, a + P, NotifierEvent.CLEAR)]
    assert mm.physmem.is_free(old)


def test_migrate_page_cache_page_updates_every_mapping(mm: Mm, rec: RecordingNotifier) -> None:
    """rmap_walk(): every VMA mapping the page-cache page gets its own CLEAR range and
    the new frame; the page cache points at the new frame."""
    f = mm.memfd_create("m", P)
    a = mm.mmap(P, RW, "memfd", file=f, fill=0x21)
    b = mm.mmap(P, PROT_READ, "memfd", file=f)
    mm.host_read(b, 1)
    old = f.cache[0]
    new = mm.migrate(a)
    assert f.cache[0] == new != old
    assert mm.host_pte(b).pfn == new  # type: ignore[union-attr]
    assert sorted(r[0] for r in rec.starts()) == sorted([a, b])
    assert mm.physmem.page_count(new) == 3  # cache + two mappings


def test_migrate_fails_with_extra_reference(mm: Mm, rec: RecordingNotifier) -> None:
    """folio_migrate_mapping(): a GUP reference makes the refcount check fail; the PTEs
    are restored (after the notifier already ran) and the call fails."""
    a = mm.mmap(P, RW, "anon", fill=1)
    pfn = mm.get_user_pages(a, False)
    with pytest.raises(KernelError) as e:
        mm.migrate(a)
    assert e.value.errno == "EAGAIN"
    assert mm.host_pte(a).pfn == pfn  # type: ignore[union-attr]
    assert rec.starts() == [(a, a + P, NotifierEvent.CLEAR)]
    mm.physmem.put_page(pfn)


def test_migrate_nothing_migratable(mm: Mm) -> None:
    """Nothing mapped, the zero page, device memory: EFAULT, nothing changes."""
    a = mm.mmap(P, RW, "anon")
    with pytest.raises(KernelError):
        mm.migrate(a)
    mm.host_read(a, 1)
    d = mm.mmap(P, RW, "device")
    before = mm.snapshot()
    for addr in (a, d):
        with pytest.raises(KernelError) as e:
            mm.migrate(addr)
        assert e.value.errno == "EFAULT"
    assert mm.snapshot() == before


def test_migrate_thp_moves_whole_folio(mm: Mm) -> None:
    """A PMD-mapped THP migrates as one 2 MiB folio (set_pmd_migration_entry)."""
    a = mm.mmap(2 * M, RW, "thp", fill=0x44)
    old = mm.host_pte(a).pfn  # type: ignore[union-attr]
    new = mm.migrate(a + 3 * P)
    head = mm.host_pte(a).pfn  # type: ignore[union-attr]
    assert head != old and new == head + 3
    assert mm.host_mapping_size(a) == M and mm.host_read(a + 100 * P, 1) == 0x44
    assert mm.physmem.is_free(old)


def test_fault_during_migration_waits(mm: Mm) -> None:
    """A fault that meets a migration entry waits (migration_entry_wait) and retries;
    after the migration it sees the new frame."""
    a = mm.mmap(P, RW, "anon", fill=9)
    mig = mm.migrate_op(a)
    for s in mig:
        if s.kind is SyncKind.POINT and s.name == "pte_changed":
            break
    assert mm.host_pte(a) is None  # a migration entry is not present
    reader = mm.host_read_op(a, 1)
    waits = 0
    for s in reader:
        if s.kind is SyncKind.POINT and s.name == "migration_entry_wait":
            waits += 1
            break
    assert waits == 1
    for _ in mig:
        pass
    try:
        while True:
            next(reader)
    except StopIteration as stop:
        assert stop.value == 9
