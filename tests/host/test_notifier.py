"""The MMU-notifier chain and the sync points an explorer interleaves at."""

from __future__ import annotations

from kvmmem.host import (
    PROT_READ,
    PROT_WRITE,
    Mm,
    MmuNotifier,
    MmuNotifierRange,
    NotifierEvent,
    RecordingNotifier,
)
from kvmmem.sync import Op, Sync, SyncKind, acquire, drive, release

from .conftest import P

RW = PROT_READ | PROT_WRITE


class LockingSubscriber(RecordingNotifier):
    """Like KVM: takes mmu_lock inside start/end and records what it saw of the host."""

    def __init__(self, mm: Mm, hva: int) -> None:
        super().__init__()
        self.mm = mm
        self.hva = hva
        self.seen: list[tuple[str, bool, bool]] = []

    def _look(self, what: str) -> None:
        pte = self.mm.host_pte(self.hva)
        freed = pte is None and self.frame is not None and self.mm.physmem.is_free(self.frame)
        self.seen.append((what, pte is not None, freed))

    frame: int | None = None

    def invalidate_range_start(self, rng: MmuNotifierRange) -> Op[None]:
        yield acquire("mmu_lock")
        self._look("start")
        yield release("mmu_lock")
        yield from super().invalidate_range_start(rng)

    def invalidate_range_end(self, rng: MmuNotifierRange) -> Op[None]:
        yield acquire("mmu_lock")
        self._look("end")
        yield release("mmu_lock")
        yield from super().invalidate_range_end(rng)


def trace(op: Op[object]) -> list[str]:
    out: list[str] = []
    try:
        while True:
            s: Sync = next(op)
            out.append(str(s))
    except StopIteration:
        return out


def test_recording_notifier_satisfies_protocol() -> None:
    """struct mmu_notifier_ops as a runtime-checkable Protocol."""
    assert isinstance(RecordingNotifier(), MmuNotifier)


def test_munmap_sync_points_in_kernel_order(mm: Mm) -> None:
    """munmap: mmap_lock (write) -> notifier start (each subscriber, which may take its
    own locks) -> PTE cleared [pte_changed] -> notifier end -> frames freed -> unlock.
    At start the PTE is still there; at end it is gone but the frame is not yet freed."""
    a = mm.mmap(P, RW, "anon", fill=1)
    sub = LockingSubscriber(mm, a)
    sub.frame = mm.host_pte(a).pfn  # type: ignore[union-attr]
    mm.mmu_notifier_register(sub)
    steps = trace(mm.munmap_op(a, P))
    assert steps == [
        "acquire mmap_lock",
        "point mmu_notifier_start",
        "acquire mmu_lock",
        "release mmu_lock",
        "point pte_changed",
        "acquire mmu_lock",
        "release mmu_lock",
        "point mmu_notifier_end",
        "release mmap_lock",
    ]
    assert sub.seen == [("start", True, False), ("end", False, False)]
    assert mm.physmem.is_free(sub.frame)


def test_fault_and_madvise_take_mmap_lock_for_read(mm: Mm) -> None:
    """Page faults and MADV_DONTNEED hold mmap_lock for read; mmap/mprotect for write."""
    a = mm.mmap(P, RW, "anon")
    steps = trace(mm.host_write_op(a, 1, 1))
    assert steps[0] == "acquire mmap_lock (read)" and steps[-1] == "release mmap_lock (read)"
    steps = trace(mm.madvise_op(a, P, "dontneed"))
    assert steps[0] == "acquire mmap_lock (read)"
    assert "point pte_changed" in steps
    steps = trace(mm.mprotect_op(a, P, PROT_READ))
    assert steps[0] == "acquire mmap_lock"


def test_gup_between_notifier_start_and_zap_keeps_frame(mm: Mm) -> None:
    """Interleaving at a sync point: a GUP (mmap_lock read, like DONTNEED) that runs
    after the notifier start still finds the page and takes a reference; the zap then
    removes the PTE but the frame survives until that reference is put -- the case
    KVM's mmu_invalidate_retry protects against."""
    a = mm.mmap(P, RW, "anon", fill=7)
    op = mm.madvise_op(a, P, "dontneed")
    for s in op:
        if s.kind is SyncKind.POINT and s.name == "mmu_notifier_start":
            break
    pfn = mm.get_user_pages(a, False)
    drive(op, held=1)  # mmap_lock (read), taken before the point
    assert mm.host_pte(a) is None
    assert not mm.physmem.is_free(pfn) and mm.physmem.read_int(pfn, 0, 1) == 7
    mm.physmem.put_page(pfn)
    assert mm.physmem.is_free(pfn)


def test_notifier_events_per_operation(mm: Mm, rec: RecordingNotifier) -> None:
    """include/linux/mmu_notifier.h events: munmap/MAP_FIXED/mremap UNMAP, zap and COW
    CLEAR, mprotect PROTECTION_VMA; every start has its end, in order."""
    a = mm.mmap(4 * P, RW, "anon", fill=1)
    mm.mprotect(a, P, PROT_READ)
    mm.madvise(a + P, P, "dontneed")
    mm.mmap(P, RW, "anon", addr=a + 2 * P, fixed=True)
    mm.munmap(a + 3 * P, P)
    events = [e[2] for e in rec.starts()]
    assert events == [NotifierEvent.PROTECTION_VMA, NotifierEvent.CLEAR,
                      NotifierEvent.UNMAP, NotifierEvent.UNMAP]
    kinds = [e[0] for e in rec.log]
    assert kinds == ["start", "end"] * 4
    assert rec.active == 0


def test_unregister_calls_release_and_stops_callbacks(mm: Mm) -> None:
    """mmu_notifier_unregister(): ->release() is called, later changes are not seen."""
    rec = RecordingNotifier()
    mm.mmu_notifier_register(rec)
    mm.mmu_notifier_unregister(rec)
    assert rec.log == [("release",)]
    a = mm.mmap(P, RW, "anon", fill=1)
    mm.munmap(a, P)
    assert rec.log == [("release",)]


def test_close_releases_then_unmaps_silently(mm: Mm) -> None:
    """exit_mmap(): mmu_notifier_release() first, then everything is torn down with no
    further invalidations; all frames return to the allocator."""
    rec = RecordingNotifier()
    mm.mmu_notifier_register(rec)
    a = mm.mmap(4 * P, RW, "anon", fill=1)
    f = mm.memfd_create("m", P)
    mm.mmap(P, RW, "memfd", file=f, fill=2)
    pfn = mm.host_pte(a).pfn  # type: ignore[union-attr]
    mm.close()
    assert rec.log == [("release",)]
    assert mm.physmem.is_free(pfn)
    assert list(mm.for_each_vma()) == []
    assert f.pread(0, 1) == b"\x02"  # the page cache outlives the mapping


def test_young_notifiers(mm: Mm) -> None:
    """clear_young/test_young/clear_flush_young: the host accessed bits and every
    subscriber's answer (page_idle, folio_referenced)."""
    rec = RecordingNotifier(young=False)
    mm.mmu_notifier_register(rec)
    a = mm.mmap(2 * P, RW, "anon", fill=1)
    assert mm.test_young(a, a + 2 * P)
    assert mm.clear_young(a, a + 2 * P)
    assert not mm.host_pte(a).young  # type: ignore[union-attr]
    assert not mm.test_young(a, a + 2 * P)
    rec.young = True
    assert mm.test_young(a, a + 2 * P)
    assert mm.clear_flush_young(a, a + P)
    # the host accessed bit answers first (folio_test_young || mmu_notifier_test_young)
    assert [e[0] for e in rec.log] == ["clear_young", "test_young", "test_young",
                                       "clear_flush_young"]
    mm.host_read(a, 1)
    assert mm.host_pte(a).young  # type: ignore[union-attr]
