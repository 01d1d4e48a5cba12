"""Random operation sequences: the model stays consistent, failed calls change nothing,
and interleaving the operations at their sync points keeps it consistent too."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmmem.errors import KernelError
from kvmmem.host import (
    PROT_EXEC,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    HostSignal,
    Mm,
    PhysMem,
    RecordingNotifier,
)
from kvmmem.host.validate import validate_mm
from kvmmem.sync import Op, Sync, SyncKind

P = 4096
M = 2 << 20
BASE = 0x40000000
NPAGES = 1024  # a 4 MiB window: two THP-sized halves
PROTS = (PROT_NONE, PROT_READ, PROT_READ | PROT_WRITE, PROT_WRITE, PROT_READ | PROT_EXEC)
KINDS = ("anon", "memfd", "file", "file-shared", "thp", "device-lazy")

page = st.integers(0, NPAGES - 1)
npages = st.sampled_from((1, 1, 2, 3, 8, 512))


@st.composite
def ops(draw: st.DrawFn) -> tuple[Any, ...]:
    which = draw(st.sampled_from(
        ("mmap", "mmap", "munmap", "mprotect", "madvise", "mremap", "read", "write",
         "write", "gup", "split", "migrate", "truncate")))
    p, n = draw(page), draw(npages)
    if which == "mmap":
        return ("mmap", p, n, draw(st.sampled_from(PROTS)), draw(st.sampled_from(KINDS)),
                draw(st.integers(0, 3)), draw(st.booleans()))
    if which == "mprotect":
        return ("mprotect", p, n, draw(st.sampled_from(PROTS)))
    if which == "madvise":
        return ("madvise", p, n, draw(st.sampled_from(("dontneed", "remove", "hugepage"))))
    if which == "mremap":
        return ("mremap", p, n, draw(npages), draw(st.booleans()), draw(page))
    if which in ("read", "write", "gup"):
        return (which, p, draw(st.sampled_from((1, 8))), draw(st.booleans()))
    if which == "truncate":
        return ("truncate", draw(st.integers(0, 16)))
    return (which, p, n)


PARTIAL_OK = {"mprotect", "madvise"}  # may apply up to a hole, then fail (kernel-exact)


class World:
    def __init__(self) -> None:
        self.mm = Mm(PhysMem(hugetlb_pages=4))
        self.rec = RecordingNotifier()
        self.mm.mmu_notifier_register(self.rec)
        self.file = self.mm.memfd_create("shared", 16 * P)
        self.disk = self.mm.open_file("/disk", 16 * P, fill=0x5A)

    def apply(self, op: tuple[Any, ...]) -> None:
        mm = self.mm
        name = op[0]
        addr = BASE + op[1] * P if len(op) > 1 and name != "truncate" else 0
        if name == "mmap":
            _, _, n, prot, kind, foff, fill = op
            f = None
            if kind in ("memfd",):
                f = self.file
            elif kind in ("file", "file-shared"):
                f = self.disk if foff % 2 else self.file
            mm.mmap(n * P, prot, kind, addr=addr, fixed=True, file=f,
                    offset=foff * P if f is not None else 0,
                    fill=0x11 if fill and prot & PROT_WRITE else None)
        elif name == "munmap":
            mm.munmap(addr, op[2] * P)
        elif name == "mprotect":
            mm.mprotect(addr, op[2] * P, op[3])
        elif name == "madvise":
            mm.madvise(addr, op[2] * P, op[3])
        elif name == "mremap":
            _, _, n, new_n, fixed, target = op
            mm.mremap(addr, n * P, new_n * P, maymove=fixed,
                      fixed_addr=BASE + target * P if fixed else None)
        elif name == "read":
            mm.host_read(addr, op[2])
        elif name == "write":
            mm.host_write(addr, op[2], 0x42)
        elif name == "gup":
            pfn = mm.get_user_pages(addr, op[3])
            mm.physmem.put_page(pfn)
        elif name == "split":
            mm.split_huge_pmd(addr)
        elif name == "migrate":
            mm.migrate(addr)
        elif name == "truncate":
            mm.ftruncate(self.file, op[1] * P)


@settings(max_examples=400, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops(), min_size=1, max_size=30))
def test_random_sequences_stay_consistent(seq: list[tuple[Any, ...]]) -> None:
    """After every operation: VMAs sorted and aligned, PTEs only inside VMAs and never on
    free frames, mapcount/refcount equal to page-table + page-cache references
    (validate_mm); a call that raises KernelError changed nothing, except the
    documented partial mprotect/madvise; every notifier start has its end."""
    w = World()
    for op in seq:
        before = w.mm.snapshot()
        try:
            w.apply(op)
        except KernelError:
            if op[0] not in PARTIAL_OK:
                assert w.mm.snapshot() == before, op
        except HostSignal:
            pass
        validate_mm(w.mm, extra_files=(w.file, w.disk))
        assert w.rec.active == 0
    w.mm.close()
    assert w.rec.released


def _run_interleaved(threads: list[Op[Any]], rng: random.Random) -> list[object]:
    """A tiny scheduler: mmap_lock is a reader/writer lock, other locks are ignored
    (one subscriber, no contention); picks a random runnable thread at every step."""
    readers = 0
    writer = False
    pending: list[Sync | None] = [None] * len(threads)
    results: list[object] = [None] * len(threads)
    live = list(range(len(threads)))

    def can_run(i: int) -> bool:
        s = pending[i]
        if s is None or s.kind is not SyncKind.ACQUIRE or s.name != "mmap_lock":
            return True
        return not writer if s.shared else (not writer and readers == 0)

    while live:
        runnable = [i for i in live if can_run(i)]
        assert runnable, "deadlock"
        i = rng.choice(runnable)
        s = pending[i]
        if s is not None and s.name == "mmap_lock" and s.kind is SyncKind.ACQUIRE:
            if s.shared:
                readers += 1
            else:
                writer = True
        try:
            nxt = threads[i].send(None)
        except StopIteration as stop:
            results[i] = stop.value
            live.remove(i)
            continue
        except (KernelError, HostSignal) as e:
            results[i] = e
            live.remove(i)
            continue
        if nxt.name == "mmap_lock" and nxt.kind is SyncKind.RELEASE:
            if nxt.shared:
                readers -= 1
            else:
                writer = False
        pending[i] = nxt
    return results


@settings(max_examples=200, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1))
def test_interleaved_operations_stay_consistent(seed: int) -> None:
    """The same operation code, interleaved at its sync points by a random scheduler
    (a userspace writer, a DONTNEED, a GUP, a THP split, a migration, an mprotect):
    the model stays consistent and every GUP reference is accounted for."""
    rng = random.Random(seed)
    w = World()
    mm = w.mm
    mm.mmap(2 * M, PROT_READ | PROT_WRITE, "thp", addr=BASE, fixed=True, fill=0x10)
    mm.mmap(8 * P, PROT_READ | PROT_WRITE, "anon", addr=BASE + 2 * M, fixed=True)
    mm.host_read(BASE + 2 * M, 1)  # zero page: the writer will COW it
    makers: list[tuple[str, Callable[[], Op[Any]]]] = [
        ("write", lambda: mm.host_write_op(BASE + 2 * M, 8, 7)),
        ("dontneed", lambda: mm.madvise_op(BASE + rng.randrange(512) * P, P, "dontneed")),
        ("gup", lambda: mm.get_user_pages_op(BASE + 2 * M, rng.random() < 0.5)),
        ("gup", lambda: mm.get_user_pages_op(BASE + rng.randrange(512) * P, True)),
        ("split", lambda: mm.split_huge_pmd_op(BASE)),
        ("migrate", lambda: mm.migrate_op(BASE + 2 * M)),
        ("mprotect", lambda: mm.mprotect_op(BASE + 2 * M, P, PROT_READ)),
        ("read", lambda: mm.host_read_op(BASE + rng.randrange(512) * P, 8)),
    ]
    chosen = rng.sample(makers, k=rng.randint(2, 5))
    results = _run_interleaved([make() for _, make in chosen], rng)
    for (name, _), r in zip(chosen, results, strict=True):
        if name == "gup" and isinstance(r, int):
            mm.physmem.put_page(r)  # the GUP reference, as kvm_release_page_clean
    validate_mm(mm, extra_files=(w.file, w.disk))
    assert w.rec.active == 0


def _highest_gap(mm: Mm, length: int, align: int) -> int | None:
    """Reference: scan every gap below mmap_base from the top (unmapped_area_topdown)."""
    from kvmmem.host.mm import MMAP_MIN_ADDR

    high = mm.mmap_base
    for vma in reversed(list(mm.for_each_vma())):
        if vma.start >= high:
            high = min(high, vma.start)
            continue
        low = max(vma.end, MMAP_MIN_ADDR)
        if vma.end <= high and high - low >= length:
            addr = (high - length) & ~(align - 1)
            if addr >= low:
                return addr
        high = min(high, vma.start)
    low = MMAP_MIN_ADDR
    if high - low >= length:
        addr = (high - length) & ~(align - 1)
        if addr >= low:
            return addr
    return None


@settings(max_examples=200, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 40), st.integers(0, 200),
                          st.booleans()), min_size=1, max_size=60))
def test_free_area_cache_finds_the_highest_gap(steps: list[tuple[bool, int, int, bool]]) -> None:
    """get_unmapped_area(): the model's free_area_cache/cached_hole_size search returns
    what a full top-down scan of the gaps (the maple-tree search) returns."""
    mm = Mm(PhysMem(), mmap_base=0x40000000)
    for is_map, n, where, huge in steps:
        length = n * P * (512 if huge else 1)
        if is_map:
            align = M if huge else P
            expect = _highest_gap(mm, length, align)
            got = mm.get_unmapped_area(length, align=align)
            assert got == expect
            if got is not None:
                mm.mmap(length, PROT_READ if n % 2 else PROT_NONE, "anon", addr=got, fixed=True)
        else:
            mm.munmap(0x40000000 - (where + 1) * 16 * P, n * P)
