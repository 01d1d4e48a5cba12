"""madvise(2) DONTNEED/REMOVE/HUGEPAGE and mremap(2)."""

from __future__ import annotations

import pytest

from kvmmem.errors import KernelError
from kvmmem.host import (
    PROT_READ,
    PROT_WRITE,
    HostSignal,
    Mm,
    NotifierEvent,
    RecordingNotifier,
)

from .conftest import M, P

RW = PROT_READ | PROT_WRITE
BASE = 0x40000000


def bounds(mm: Mm, base: int = BASE) -> list[tuple[int, int]]:
    return [((v.start - base) // P, (v.end - base) // P) for v in mm.for_each_vma()]


# --- MADV_DONTNEED ----------------------------------------------------------------------


def test_dontneed_anonymous_reads_zero_again(mm: Mm, rec: RecordingNotifier) -> None:
    """madvise_dontneed_single_vma() -> zap_page_range_single(): MMU_NOTIFY_CLEAR over
    the range; private anonymous pages are dropped and read back as zero."""
    mm.mmap(4 * P, RW, "anon", addr=BASE, fixed=True, fill=0xAB)
    pte = mm.host_pte(BASE + P)
    assert pte is not None
    rec.log.clear()
    mm.madvise(BASE + P, 2 * P, "dontneed")
    assert rec.starts() == [(BASE + P, BASE + 3 * P, NotifierEvent.CLEAR)]
    assert mm.physmem.is_free(pte.pfn)
    assert mm.host_read(BASE + P, 1) == 0
    assert mm.host_read(BASE, 1) == 0xAB


def test_dontneed_shared_memfd_keeps_data(mm: Mm) -> None:
    """kvm-on-this-host §3.5: MADV_DONTNEED on a shared memfd only unmaps; the page
    cache keeps the data and the next access maps the same page again."""
    a = mm.mmap(2 * P, RW, "memfd", fill=0xAB)
    pfn = mm.host_pte(a).pfn  # type: ignore[union-attr]
    mm.madvise(a, 2 * P, "dontneed")
    assert mm.host_pte(a) is None
    assert mm.host_read(a, 1) == 0xAB
    assert mm.host_pte(a).pfn == pfn  # type: ignore[union-attr]


def test_dontneed_private_file_drops_cow_copy(mm: Mm) -> None:
    """A private file mapping's COW copy is dropped; the file content shows again."""
    f = mm.open_file("/f", P, fill=0x5A)
    a = mm.mmap(P, RW, "file", file=f)
    mm.host_write(a, 1, 0x11)
    mm.madvise(a, P, "dontneed")
    assert mm.host_read(a, 1) == 0x5A


def test_dontneed_over_a_hole_applies_then_enomem(mm: Mm) -> None:
    """madvise_walk_vmas(): the mapped parts are advised, a hole gives ENOMEM at the end."""
    mm.mmap(2 * P, RW, "anon", addr=BASE, fixed=True, fill=1)
    mm.mmap(2 * P, RW, "anon", addr=BASE + 3 * P, fixed=True, fill=2)
    with pytest.raises(KernelError) as e:
        mm.madvise(BASE, 5 * P, "dontneed")
    assert e.value.errno == "ENOMEM"
    assert mm.host_read(BASE, 1) == 0 and mm.host_read(BASE + 4 * P, 1) == 0


@pytest.mark.parametrize(
    ("off", "length", "advice", "errno"),
    [
        (5, P, "dontneed", "EINVAL"),
        (0, P, "dontneeed", "EINVAL"),
        (0, P, 99, "EINVAL"),
        (16 * P, P, "dontneed", "ENOMEM"),
        (0, P, "remove", "EINVAL"),
    ],
)
def test_madvise_errnos_change_nothing(
    mm: Mm, off: int, length: int, advice: str | int, errno: str
) -> None:
    """madvise(): unaligned start / unknown advice EINVAL; nothing mapped ENOMEM;
    MADV_REMOVE on anonymous memory EINVAL (madvise_remove: no file)."""
    mm.mmap(4 * P, RW, "anon", addr=BASE, fixed=True, fill=7)
    before = mm.snapshot()
    with pytest.raises(KernelError) as e:
        mm.madvise(BASE + off, length, advice)
    assert e.value.errno == errno
    assert mm.snapshot() == before


def test_madvise_zero_length_is_ok(mm: Mm) -> None:
    """madvise(): end == start returns 0 (after the advice is validated)."""
    mm.madvise(0x60000000, 0, "dontneed")
    with pytest.raises(KernelError):
        mm.madvise(0x60000000, 0, "bogus")


def test_dontneed_refuses_pfnmap(mm: Mm) -> None:
    """madvise_dontneed_free_valid_vma(): VM_PFNMAP is EINVAL."""
    a = mm.mmap(P, RW, "device")
    with pytest.raises(KernelError) as e:
        mm.madvise(a, P, "dontneed")
    assert e.value.errno == "EINVAL"


def test_dontneed_hugetlb_rounds_end_down(mm: Mm) -> None:
    """madvise_dontneed_free_valid_vma(): hugetlb start must be 2M aligned (EINVAL), the
    end is rounded down to a huge page, so a 4K DONTNEED drops nothing."""
    a = mm.mmap(2 * M, RW, "hugetlb")
    mm.host_write(a, 1, 9)
    with pytest.raises(KernelError):
        mm.madvise(a + P, P, "dontneed")
    mm.madvise(a, P, "dontneed")
    assert mm.host_read(a, 1) == 9
    mm.madvise(a, M, "dontneed")
    assert mm.host_read(a, 1) == 0


# --- MADV_REMOVE -------------------------------------------------------------------------


def test_remove_punches_hole_in_every_mapping(mm: Mm, rec: RecordingNotifier) -> None:
    """madvise_remove() -> fallocate(PUNCH_HOLE) -> unmap_mapping_range(even_cows=0):
    every shared mapping of the file is zapped (one CLEAR per VMA), the pages leave the
    page cache and read zero; a private COW copy survives."""
    f = mm.memfd_create("m", 4 * P)
    a = mm.mmap(4 * P, RW, "memfd", file=f, fill=0x77)
    b = mm.mmap(4 * P, RW, "memfd", file=f)
    c = mm.mmap(4 * P, RW, "file", file=f)
    assert mm.host_read(b + P, 1) == 0x77
    mm.host_write(c + P, 1, 0x33)
    rec.log.clear()
    mm.madvise(a + P, P, "remove")
    starts = rec.starts()
    assert (a + P, a + 2 * P, NotifierEvent.CLEAR) in starts
    assert (b + P, b + 2 * P, NotifierEvent.CLEAR) in starts
    assert mm.host_read(b + P, 1) == 0 and mm.host_read(a + P, 1) == 0
    assert mm.host_read(c + P, 1) == 0x33
    assert f.pread(P, 1) == b"\x00" and f.pread(0, 1) == b"\x77"


def test_remove_rules(mm: Mm) -> None:
    """madvise_remove(): EACCES unless VM_SHARED and VM_MAYWRITE (a private mapping, or a
    shared one of a read-only file); a PROT_READ shared mapping of a writable memfd is
    fine (VM_MAYWRITE, checked on this host)."""
    f = mm.memfd_create("m", P)
    priv = mm.mmap(P, RW, "file", file=f)
    with pytest.raises(KernelError) as e:
        mm.madvise(priv, P, "remove")
    assert e.value.errno == "EACCES"
    ro = mm.mmap(P, PROT_READ, "memfd", file=f)
    mm.madvise(ro, P, "remove")
    g = mm.open_file("/ro", P, writable=False)
    s = mm.mmap(P, PROT_READ, "file-shared", file=g)
    with pytest.raises(KernelError) as e:
        mm.madvise(s, P, "remove")
    assert e.value.errno == "EACCES"


# --- MADV_HUGEPAGE / NOHUGEPAGE ----------------------------------------------------------


def test_hugepage_flags_split_and_merge(mm: Mm, rec: RecordingNotifier) -> None:
    """hugepage_madvise() + madvise_update_vma(): VM_HUGEPAGE ("hg") / VM_NOHUGEPAGE
    ("nh") on the range, splitting and merging VMAs, no PTE change."""
    mm.mmap(4 * P, RW, "anon", addr=BASE, fixed=True)
    mm.madvise(BASE + P, P, "hugepage")
    assert bounds(mm) == [(0, 1), (1, 2), (2, 4)]
    assert "hg" in mm.vma_lookup(BASE + P).vm_flags_names()  # type: ignore[union-attr]
    assert mm.vma_lookup(BASE + P).kind.value == "thp"  # type: ignore[union-attr]
    mm.madvise(BASE, 4 * P, "nohugepage")
    assert bounds(mm) == [(0, 4)]
    assert "nh" in mm.vma_lookup(BASE).vm_flags_names()  # type: ignore[union-attr]
    assert rec.log == []


def test_hugepage_ignored_on_special_vmas(mm: Mm) -> None:
    """hugepage_madvise(): VM_NO_KHUGEPAGED (VM_SPECIAL, hugetlb) VMAs keep their flags."""
    a = mm.mmap(P, RW, "device")
    mm.madvise(a, P, "hugepage")
    assert "hg" not in mm.vma_lookup(a).vm_flags_names()  # type: ignore[union-attr]


# --- mremap -------------------------------------------------------------------------------


def test_mremap_move_keeps_data_and_notifies(mm: Mm, rec: RecordingNotifier) -> None:
    """move_vma() -> move_page_tables(): the PTEs move under MMU_NOTIFY_UNMAP of the old
    range, the old range is unmapped (UNMAP again); the data is at the new address."""
    mm.mmap(4 * P, RW, "anon", addr=BASE, fixed=True, fill=0x42)
    rec.log.clear()
    new = mm.mremap(BASE, 4 * P, 4 * P, maymove=True, fixed_addr=BASE + 32 * P)
    assert new == BASE + 32 * P
    assert rec.starts() == [(BASE, BASE + 4 * P, NotifierEvent.UNMAP),
                            (BASE, BASE + 4 * P, NotifierEvent.UNMAP)]
    assert mm.host_read(new + 3 * P, 1) == 0x42
    with pytest.raises(HostSignal):
        mm.host_read(BASE, 1)
    moved = mm.vma_lookup(new)
    assert moved is not None and moved.pgoff == BASE >> 12  # copy_vma keeps vm_pgoff


@pytest.mark.parametrize(
    ("old", "old_len", "new_len", "kw", "errno"),
    [
        (5, P, 2 * P, {}, "EINVAL"),
        (0, P, 0, {}, "EINVAL"),
        (0, P, P, {"fixed_addr": BASE + 40 * P}, "EINVAL"),
        (0, 4 * P, 4 * P, {"maymove": True, "fixed_addr": BASE + 2 * P}, "EINVAL"),
        (0, P, P, {"maymove": True, "fixed_addr": BASE + 40 * P + 5}, "EINVAL"),
        (0, 0, P, {"maymove": True}, "EINVAL"),
        (20 * P, P, 2 * P, {}, "EFAULT"),
        (0, 16 * P, 32 * P, {"maymove": True}, "EFAULT"),
        (0, 8 * P, 10 * P, {}, "ENOMEM"),
    ],
)
def test_mremap_errnos_change_nothing(
    mm: Mm, old: int, old_len: int, new_len: int, kw: dict[str, object], errno: str
) -> None:
    """mremap(): EINVAL (unaligned, new_len 0, FIXED without MAYMOVE, overlapping
    ranges, unaligned new address, old_len 0 on a private mapping), EFAULT (nothing at
    old_addr, a grown range spanning two VMAs), ENOMEM (no room to grow in place)."""
    mm.mmap(8 * P, RW, "anon", addr=BASE, fixed=True, fill=1)
    mm.mmap(8 * P, PROT_READ, "anon", addr=BASE + 8 * P, fixed=True)
    before = mm.snapshot()
    with pytest.raises(KernelError) as e:
        mm.mremap(BASE + old, old_len, new_len, **kw)  # type: ignore[arg-type]
    assert e.value.errno == errno
    assert mm.snapshot() == before


def test_mremap_same_length_spanning_vmas_is_ok(mm: Mm) -> None:
    """mremap(): old_len == new_len returns the address without checking the span
    (checked on this host)."""
    mm.mmap(2 * P, RW, "anon", addr=BASE, fixed=True)
    mm.mmap(2 * P, PROT_READ, "anon", addr=BASE + 2 * P, fixed=True)
    assert mm.mremap(BASE, 4 * P, 4 * P) == BASE


def test_mremap_shrink_and_grow_in_place(mm: Mm) -> None:
    """Shrinking unmaps the tail; growing into free space extends the VMA."""
    mm.mmap(4 * P, RW, "anon", addr=BASE, fixed=True, fill=3)
    assert mm.mremap(BASE, 4 * P, 2 * P) == BASE
    assert bounds(mm) == [(0, 2)]
    assert mm.mremap(BASE, 2 * P, 6 * P) == BASE
    assert bounds(mm) == [(0, 6)]
    assert mm.host_read(BASE + P, 1) == 3 and mm.host_read(BASE + 5 * P, 1) == 0


def test_mremap_grow_moves_when_allowed(mm: Mm) -> None:
    """No room to grow in place: MREMAP_MAYMOVE moves to a fresh range."""
    mm.mmap(2 * P, RW, "anon", addr=BASE, fixed=True, fill=4)
    mm.mmap(P, RW, "memfd", addr=BASE + 2 * P, fixed=True)
    new = mm.mremap(BASE, 2 * P, 8 * P, maymove=True)
    assert new != BASE and mm.host_read(new + P, 1) == 4
    assert mm.vma_lookup(BASE) is None


def test_mremap_cannot_grow_pfnmap_or_hugetlb(mm: Mm) -> None:
    """vma_to_resize(): VM_PFNMAP/VM_DONTEXPAND cannot grow (EFAULT); hugetlb mremap
    may not grow (EINVAL)."""
    a = mm.mmap(P, RW, "device", addr=BASE, fixed=True)
    with pytest.raises(KernelError) as e:
        mm.mremap(a, P, 2 * P)
    assert e.value.errno == "EFAULT"
    h = mm.mmap(M, RW, "hugetlb")
    with pytest.raises(KernelError) as e:
        mm.mremap(h, M, 2 * M, maymove=True)
    assert e.value.errno == "EINVAL"


def test_mremap_unfaulted_anon_merges_at_destination(mm: Mm) -> None:
    """copy_vma(): a never-faulted anonymous VMA takes the new address as vm_pgoff, so
    it merges with a compatible neighbour (checked on this host)."""
    mm.mmap(32 * P, PROT_READ, "anon", addr=BASE, fixed=True)
    mm.mremap(BASE + 4 * P, 4 * P, 4 * P, maymove=True, fixed_addr=BASE + 20 * P)
    assert bounds(mm) == [(0, 4), (8, 32)]


def test_mremap_fixed_move_spans_vmas_and_gaps(mm: Mm) -> None:
    """remap_move() (v6.17, "permit mremap() move of multiple VMAs"): a MREMAP_FIXED move
    without resize takes every VMA in the range, keeping the gaps; only the pieces'
    targets are unmapped first; the range must start inside a VMA (else EFAULT)."""
    mm.mmap(2 * P, RW, "anon", addr=BASE, fixed=True, fill=1)
    mm.mmap(P, PROT_READ, "anon", addr=BASE + 2 * P, fixed=True)
    mm.mmap(P, RW, "memfd", addr=BASE + 4 * P, fixed=True, fill=3)
    mm.mmap(8 * P, PROT_READ, "anon", addr=BASE + 32 * P, fixed=True)  # target area
    assert mm.mremap(BASE, 6 * P, 6 * P, maymove=True, fixed_addr=BASE + 33 * P) == BASE + 33 * P
    # the moved, never-faulted read-only page merges with the old area's page after it
    assert bounds(mm) == [(32, 33), (33, 35), (35, 37), (37, 38), (38, 40)]
    assert mm.host_read(BASE + 33 * P, 1) == 1 and mm.host_read(BASE + 37 * P, 1) == 3
    assert mm.vma_lookup(BASE + 36 * P).maps_perms() == "r--p"  # type: ignore[union-attr]
    with pytest.raises(KernelError) as e:
        mm.mremap(BASE + 31 * P, 2 * P, 2 * P, maymove=True, fixed_addr=BASE)
    assert e.value.errno == "EFAULT"
