"""Transparent huge pages and hugetlb: PMD mappings, the huge zero page, splits."""

from __future__ import annotations

import pytest

from kvmmem.errors import KernelError
from kvmmem.host import PROT_READ, PROT_WRITE, Mm, NotifierEvent, PhysMem, RecordingNotifier

from .conftest import M, P

RW = PROT_READ | PROT_WRITE


def test_thp_write_fault_maps_pmd(mm: Mm) -> None:
    """do_huge_pmd_anonymous_page(): in a VM_HUGEPAGE VMA a write fault in a 2M-aligned
    range fully inside the VMA maps a 2 MiB folio with one PMD."""
    a = mm.mmap(4 * M, RW, "thp")
    assert a % M == 0
    mm.host_write(a + 5 * P, 8, 0x1234)
    assert mm.host_mapping_size(a + 100 * P) == M
    pte = mm.host_pte(a + 5 * P)
    assert pte is not None and pte.huge_size == M and pte.leaf_pfn % 512 == 0
    assert pte.pfn == pte.leaf_pfn + 5  # the subpage behind the address
    assert mm.physmem.page_count(pte.pfn) == 1
    assert mm.physmem.page_mapcount(pte.leaf_pfn + 7) == 1
    assert mm.host_read(a + 5 * P, 8) == 0x1234
    assert mm.host_mapping_size(a + M) == 0  # the next 2M is untouched


def test_thp_read_maps_huge_zero_then_write_allocates(mm: Mm, rec: RecordingNotifier) -> None:
    """A read fault maps the huge zero page (transparent_hugepage/use_zero_page=1); the
    first write replaces it by a THP under MMU_NOTIFY_CLEAR of the 2 MiB
    (do_huge_zero_wp_pmd, v6.12+)."""
    a = mm.mmap(2 * M, RW, "thp")
    assert mm.host_read(a, 8) == 0
    pte = mm.host_pte(a)
    assert pte is not None and pte.pfn == mm.physmem.huge_zero_pfn and not pte.writable
    mm.host_write(a + P, 1, 1)
    assert rec.starts() == [(a, a + M, NotifierEvent.CLEAR)]
    assert mm.host_mapping_size(a) == M and mm.host_pte(a).writable  # type: ignore[union-attr]


def test_no_thp_without_madvise_or_when_unaligned(mm: Mm) -> None:
    """thp_vma_allowable_order(): with enabled=madvise, plain anonymous memory gets 4K;
    a THP VMA maps 4K where the 2M range is not fully inside it."""
    a = mm.mmap(2 * M, RW, "anon")
    mm.host_write(a, 1, 1)
    assert mm.host_mapping_size(a) == P
    b = mm.mmap(M, RW, "thp", addr=0x40000000 - 2 * P, fixed=True)
    mm.host_write(b, 1, 1)
    assert mm.host_mapping_size(b) == P
    mm.host_write(0x40000000, 1, 1)
    assert mm.host_mapping_size(0x40000000) == P  # [0x40000000, +2M) is not inside


def test_thp_always_mode() -> None:
    """transparent_hugepage/enabled=always: any suitable anonymous range gets a THP,
    unless MADV_NOHUGEPAGE."""
    mm = Mm(PhysMem(), thp="always")
    a = mm.mmap(2 * M, RW, "anon")
    mm.host_write(a, 1, 1)
    assert mm.host_mapping_size(a) == M
    b = mm.mmap(2 * M, RW, "anon")
    mm.madvise(b, 2 * M, "nohugepage")
    mm.host_write(b, 1, 1)
    assert mm.host_mapping_size(b) == P


def test_dontneed_4k_inside_thp_splits_pmd(mm: Mm, rec: RecordingNotifier) -> None:
    """zap_pmd_range() -> __split_huge_pmd(): DONTNEED of 4 KiB inside a THP splits the
    PMD (MMU_NOTIFY_CLEAR of the 2 MiB nested in the DONTNEED range); the other pages
    keep their data as 4K PTEs of the same folio, the dropped page reads 0
    (kvm-on-this-host §3.5)."""
    a = mm.mmap(2 * M, RW, "thp")
    mm.host_write(a, 1, 0xAA)
    mm.host_write(a + 2 * P, 1, 0xBB)
    head = mm.host_pte(a).pfn  # type: ignore[union-attr]
    rec.log.clear()
    mm.madvise(a + 2 * P, P, "dontneed")
    assert rec.starts() == [(a + 2 * P, a + 3 * P, NotifierEvent.CLEAR),
                            (a, a + M, NotifierEvent.CLEAR)]
    assert mm.host_mapping_size(a) == P
    assert mm.host_pte(a + P).pfn == head + 1  # type: ignore[union-attr]
    assert mm.host_read(a, 1) == 0xAA and mm.host_read(a + 2 * P, 1) == 0
    assert mm.physmem.page_count(head) == 511


def test_split_huge_pmd_api(mm: Mm, rec: RecordingNotifier) -> None:
    """split_huge_pmd_address(): 512 PTEs of the same folio (refcount 512); a no-op where
    no THP is mapped; hugetlb pages cannot be split (EINVAL)."""
    a = mm.mmap(2 * M, RW, "thp", fill=3)
    head = mm.host_pte(a).pfn  # type: ignore[union-attr]
    rec.log.clear()
    mm.split_huge_pmd(a + 17 * P)
    assert rec.starts() == [(a, a + M, NotifierEvent.CLEAR)]
    assert mm.physmem.page_count(head) == 512
    assert mm.host_pte(a + 17 * P).pfn == head + 17  # type: ignore[union-attr]
    assert mm.host_read(a + 17 * P, 1) == 3
    rec.log.clear()
    mm.split_huge_pmd(a)
    assert rec.log == []
    h = mm.mmap(M, RW, "hugetlb", populate=True)
    with pytest.raises(KernelError):
        mm.split_huge_pmd(h)


def test_munmap_part_of_thp_splits_first(mm: Mm, rec: RecordingNotifier) -> None:
    """__split_vma() -> vma_adjust_trans_huge(): cutting a VMA inside a THP splits the
    PMD (CLEAR) before the UNMAP of the range; the folio is freed when its last PTE goes."""
    a = mm.mmap(2 * M, RW, "thp", fill=1)
    head = mm.host_pte(a).pfn  # type: ignore[union-attr]
    rec.log.clear()
    mm.munmap(a + M - P, P)
    assert [e[2] for e in rec.starts()] == [NotifierEvent.CLEAR, NotifierEvent.UNMAP]
    assert mm.host_read(a + M - 2 * P, 1) == 1
    mm.munmap(a, 2 * M)
    assert mm.physmem.is_free(head)


def test_mprotect_whole_thp_keeps_pmd(mm: Mm) -> None:
    """change_huge_pmd(): mprotect of a whole PMD changes the leaf without splitting."""
    a = mm.mmap(2 * M, RW, "thp", fill=1)
    mm.mprotect(a, M, PROT_READ)
    assert mm.host_mapping_size(a) == M and not mm.host_pte(a).writable  # type: ignore[union-attr]
    mm.mprotect(a, M, RW)
    assert mm.host_pte(a).writable  # type: ignore[union-attr]


def test_hugetlb_fault_private_and_shared(mm: Mm) -> None:
    """hugetlb_no_page(): private read maps a new zeroed 2 MiB page read-only, the write
    reuses it (hugetlb_wp, exclusive); a shared hugetlbfs mapping maps the page-cache page
    writable at once and a second mapping sees the same page."""
    a = mm.mmap(M, RW, "hugetlb")
    assert mm.host_read(a + 5, 1) == 0
    pte = mm.host_pte(a)
    assert pte is not None and pte.huge_size == M and not pte.writable
    mm.host_write(a, 1, 7)
    assert mm.host_pte(a).pfn == pte.pfn and mm.host_pte(a).writable  # type: ignore[union-attr]
    f = mm.memfd_create("h", 2 * M, hugetlb=True)
    s1 = mm.mmap(2 * M, RW, "hugetlb", file=f)
    s2 = mm.mmap(2 * M, PROT_READ, "hugetlb", file=f)
    mm.host_read(s1, 1)
    assert mm.host_pte(s1).writable  # type: ignore[union-attr]
    mm.host_write(s1 + M + 3, 1, 0x5E)
    assert mm.host_read(s2 + M + 3, 1) == 0x5E
    assert mm.host_pte(s2 + M).pfn == mm.host_pte(s1 + M).pfn  # type: ignore[union-attr]


def test_hugetlb_pool_exhaustion_sigbus() -> None:
    """alloc_hugetlb_folio() without a page (MAP_NORESERVE, empty pool): SIGBUS."""
    from kvmmem.host import HostSignal

    mm = Mm(PhysMem(hugetlb_pages=1))
    a = mm.mmap(2 * M, RW, "hugetlb", noreserve=True)
    mm.host_write(a, 1, 1)
    with pytest.raises(HostSignal) as e:
        mm.host_write(a + M, 1, 1)
    assert e.value.signal == "SIGBUS"
    mm.munmap(a, M)
    mm.host_write(a + M, 1, 1)


def test_mremap_moves_thp_whole_only_when_aligned(mm: Mm) -> None:
    """move_page_tables() -> move_huge_pmd(): a 2M-aligned THP moving to a 2M-aligned
    place keeps its PMD; to an unaligned place it is split first (checked on this host
    with AnonHugePages)."""
    a = mm.mmap(2 * M, RW, "thp", fill=1)
    t = mm.mremap(a, M, M, maymove=True, fixed_addr=0x40000000)
    assert mm.host_mapping_size(t) == M and mm.host_read(t + 5, 1) == 1
    u = mm.mremap(t, M, M, maymove=True, fixed_addr=0x50000000 + P)
    assert mm.host_mapping_size(u) == P and mm.host_read(u + M - 1, 1) == 1
