"""Page migration (``mm/migrate.c``): migration entries in every mapping of the
folio, copy, then point the entries at the new frame.

Order-0 pages and PMD-mapped folios only (a PTE-mapped THP is EBUSY)."""

from __future__ import annotations

from kvmmem.errors import KernelError
from kvmmem.host.args import ulong_arg
from kvmmem.host.mm_types import (
    MMAP_READ_LOCK,
    MMAP_READ_UNLOCK,
    MmStruct,
    invalidate_range_end_op,
    invalidate_range_start_op,
)
from kvmmem.host.notifier import NotifierEvent
from kvmmem.host.pagetable import (
    PFN_SHIFT,
    PTE_DIRTY,
    PTE_MIGRATION,
    PTE_PRESENT,
    PTE_SPECIAL,
    PTE_WRITE,
    PTE_YOUNG,
    set_pte,
)
from kvmmem.host.physmem import PG_ANON, PG_ANON_EXCLUSIVE, PG_DIRTY, PG_HUGETLB, RAM_BASE_PFN
from kvmmem.host.rmap import rmap_walk
from kvmmem.sync import Op, acquire, drive, release
from kvmmem.types import Pfn

_P, _W, _D, _Y, _S = PTE_PRESENT, PTE_WRITE, PTE_DIRTY, PTE_YOUNG, PTE_SPECIAL


def migrate_op(mm: MmStruct, hva: int) -> Op[Pfn]:
    """Migrate the folio mapped at ``hva`` to a new frame (``migrate_pages`` ->
    ``try_to_migrate_one`` -> ``remove_migration_ptes``); returns the new pfn
    mapped at ``hva``.

    Every mapping of the folio (this mm, or all mappings of a page-cache
    page) gets MMU_NOTIFY_CLEAR, its PTE becomes a migration entry, the
    content is copied, the PTEs point at the new frame.  Raises KernelError
    EFAULT (nothing migratable mapped there: no page, zero page, device
    memory), EBUSY (a PTE-mapped part of a THP), EAGAIN (the folio has
    references besides its mappings and the page cache, e.g. a GUP
    reference: the PTEs are restored, after the notifiers ran)."""
    a = ulong_arg(hva, "migrate: hva")
    call = f"migrate({a:#x})"
    pm = mm.physmem
    yield MMAP_READ_LOCK
    vma = mm.vma_lookup(a)
    e, huge = mm.pt.entry(a)
    err: KernelError | None = None
    if vma is None or not e & _P or e & (_S | PTE_MIGRATION):
        err = KernelError("EFAULT", call, "no migratable page mapped there")
    elif not huge and pm.is_compound(e >> PFN_SHIFT):
        err = KernelError("EBUSY", call, "PTE-mapped THP (split folios are not migrated)")
    yield MMAP_READ_UNLOCK
    if err is not None:
        raise err
    old = e >> PFN_SHIFT
    return (yield from migrate_folio_op(mm, old, huge, a))


def migrate(mm: MmStruct, hva: int) -> Pfn:
    """Sequential :func:`migrate_op`."""
    return drive(migrate_op(mm, hva))


def migrate_folio_op(mm: MmStruct, old: int, huge: bool, hva: int) -> Op[Pfn]:
    """``migrate_folio`` under the folio lock: unmap every mapping into migration
    entries, check the references, copy, remap (see :func:`migrate_op`)."""
    pm = mm.physmem
    lock = f"folio_lock:{old:#x}"
    yield acquire(lock)
    maps = rmap_walk(mm, old, huge, hva)
    size = mm.pg.pmd_size if huge else mm.page_size
    # try_to_migrate: each mapping -> migration entry, under CLEAR notifications
    saved: list[tuple[MmStruct, int, int]] = []
    for owner, at in maps:
        rng = yield from invalidate_range_start_op(owner, at, at + size, NotifierEvent.CLEAR)
        ent, _ = owner.pt.entry(at)
        saved.append((owner, at, ent))
        _put_entry(owner, at, huge, (ent & ~_P) | PTE_MIGRATION)
        yield from invalidate_range_end_op(owner, rng)
    # folio_migrate_mapping: refcount must be exactly mappings + page cache
    cached = 0 if pm.is_anon(old) else 1
    expected = len(maps) + cached
    if pm.page_count(old) != expected:
        for owner, at, ent in saved:  # remove_migration_ptes(folio, folio): undo
            _put_entry(owner, at, huge, ent)
        yield release(lock)
        raise KernelError("EAGAIN", f"migrate({hva:#x})",
                          "folio has extra references (pinned or under GUP)")
    if huge:
        if pm.page_flags(old) & PG_HUGETLB:
            new = pm.alloc_hugetlb(reserved=False)
            if new is None:
                for owner, at, ent in saved:
                    _put_entry(owner, at, huge, ent)
                yield release(lock)
                raise KernelError("ENOMEM", f"migrate({hva:#x})", "hugetlb pool empty")
        else:
            new = pm.alloc_huge()
        n = pm.pages_per_pmd
    else:
        new = pm.alloc_page()
        n = 1
    keep = pm.page_flags(old) & (PG_ANON | PG_ANON_EXCLUSIVE | PG_DIRTY)
    for k in range(n):
        pm.copy_page(new + k, old + k)
        pm.set_flags(new + k, keep)
        pm._map[new + k - RAM_BASE_PFN] = pm._map[old + k - RAM_BASE_PFN]
        pm._map[old + k - RAM_BASE_PFN] = 0
    pm._ref[new - RAM_BASE_PFN] = expected
    if cached:
        vma = mm.vma_lookup(hva)
        f = None if vma is None else vma.file
        if f is not None:
            for k, v in list(f.cache.items()):
                if v == old:
                    f.cache[k] = new
    # remove_migration_ptes(folio, newfolio): no notification (a new mapping)
    for owner, at, ent in saved:
        _put_entry(owner, at, huge, (new << PFN_SHIFT) | (ent & ((1 << PFN_SHIFT) - 1)))
    pm._ref[old - RAM_BASE_PFN] = 1
    pm.put_page(old)
    yield release(lock)
    return Pfn(new + ((hva >> mm.page_shift) & (n - 1)))


def _put_entry(mm: MmStruct, at: int, huge: bool, ent: int) -> None:
    if huge:
        mm.pt.pmd[at >> mm.pt.pmd_shift] = ent
    else:
        set_pte(mm.pt, at, ent)
