"""PhysMem: struct page refcount/mapcount, sparse content, LIFO reuse, device frames."""

from __future__ import annotations

import numpy as np
import pytest

from kvmmem.errors import InputError
from kvmmem.host import PhysMem
from kvmmem.host.physmem import DEVICE_BASE_PFN, RAM_BASE_PFN

P = 4096


def test_alloc_page_is_zeroed_with_refcount_one() -> None:
    """alloc_page(__GFP_ZERO): refcount 1, mapcount 0, all bytes zero."""
    pm = PhysMem()
    pfn = pm.alloc_page()
    assert pm.pfn_valid(pfn) and not pm.is_device(pfn)
    assert pm.page_count(pfn) == 1
    assert pm.page_mapcount(pfn) == 0
    assert pm.read(pfn, 0, P) == bytes(P)
    assert not pm.is_free(pfn)


def test_put_page_frees_at_zero_and_reuse_is_lifo() -> None:
    """folio_put(): the frame is freed when the last reference goes; the page
    allocator hands the most recently freed frame out first (per-cpu list LIFO)."""
    pm = PhysMem()
    a, b = pm.alloc_page(), pm.alloc_page()
    pm.get_page(a)
    pm.put_page(a)
    assert not pm.is_free(a)
    pm.put_page(a)
    pm.put_page(b)
    assert pm.is_free(a) and pm.is_free(b)
    assert pm.alloc_page() == b
    assert pm.alloc_page() == a


def test_freed_frame_keeps_stale_bytes_until_reallocated() -> None:
    """A stale mapping of a freed frame reads the old data (nothing scrubs on free);
    the next allocation zeroes it, and generation() tells the two lives apart."""
    pm = PhysMem()
    pfn = pm.alloc_page()
    pm.write(pfn, 100, b"\x01\x02\x03")
    gen = pm.generation(pfn)
    pm.put_page(pfn)
    assert pm.generation(pfn) == gen + 1
    assert pm.read(pfn, 100, 3) == b"\x01\x02\x03"
    again = pm.alloc_page()
    assert again == pfn and pm.read(pfn, 100, 3) == bytes(3)


def test_content_is_stored_sparsely() -> None:
    """A uniform frame keeps one fill byte; a bytearray appears only on a
    non-uniform write; a full uniform overwrite drops it again."""
    pm = PhysMem()
    pfn = pm.alloc_page()
    pm.fill(pfn, 0xAB)
    assert pfn not in pm._content
    assert pm.read_int(pfn, 8, 4) == 0xABABABAB
    pm.write_int(pfn, 8, 2, 0xABAB)  # same bytes: still uniform
    assert pfn not in pm._content
    pm.write_int(pfn, 8, 2, 0x1234)
    assert pfn in pm._content
    assert pm.read(pfn, 7, 4) == b"\xab\x34\x12\xab"
    pm.write(pfn, 0, b"\x07" * P)
    assert pfn not in pm._content and pm.uniform_byte(pfn) == 7


def test_write_and_read_cross_frame_boundary() -> None:
    """read()/write() run on into the next frame (compound pages are contiguous)."""
    pm = PhysMem()
    head = pm.alloc_huge()
    pm.write(head, P - 2, b"\x11\x22\x33\x44")
    assert pm.read(head + 1, 0, 2) == b"\x33\x44"
    assert pm.read(head, P - 2, 4) == b"\x11\x22\x33\x44"


def test_zero_page_is_never_freed() -> None:
    """ZERO_PAGE(0): references come and go, the frame stays."""
    pm = PhysMem()
    z = pm.zero_pfn
    pm.get_page(z)
    pm.put_page(z)
    pm.put_page(z)
    assert not pm.is_free(z)
    assert pm.read(z, 0, 16) == bytes(16)


def test_huge_frames_are_512_aligned_compounds() -> None:
    """folio_alloc(order 9): head pfn 2 MiB aligned; the refcount lives on the head
    (page_count of a tail is the folio's); freeing returns the whole compound."""
    pm = PhysMem()
    pm.alloc_page()
    head = pm.alloc_huge()
    assert head % 512 == 0
    assert pm.is_compound(head + 7) and pm.compound_head(head + 7) == head
    pm.get_page(head + 7)
    assert pm.page_count(head) == 2 and pm.page_count(head + 300) == 2
    pm.put_page(head + 300)
    pm.put_page(head)
    assert pm.is_free(head) and pm.is_free(head + 511)
    assert pm.alloc_huge() == head  # LIFO for huge frames too
    with pytest.raises(InputError):
        pm.alloc_huge(order=10)


def test_frames_skipped_for_huge_alignment_are_reused() -> None:
    """The frames below an aligned compound go to the order-0 free list."""
    pm = PhysMem()
    small = pm.alloc_page()
    pm.alloc_huge()
    nxt = pm.alloc_page()
    assert nxt == small + 1


def test_device_frames_have_no_struct_page() -> None:
    """A PCI BAR: pfn_valid() false, content stored, no refcounting."""
    pm = PhysMem()
    base = pm.add_device_region(4)
    assert base >= DEVICE_BASE_PFN
    assert pm.is_device(base + 3) and not pm.is_device(base + 4)
    assert not pm.pfn_valid(base)
    pm.write_int(base + 1, 0, 4, 0xCAFEF00D)
    assert pm.read_int(base + 1, 0, 4) == 0xCAFEF00D
    assert pm.read_int(base, 0, 8) == 0
    assert pm.generation(base) == 0
    with pytest.raises(InputError):
        pm.get_page(base)
    with pytest.raises(InputError):
        pm.add_device_region(0)


def test_refcount_misuse_is_input_error() -> None:
    """get_page on a free frame or a put below zero is a caller bug (the kernel BUGs)."""
    pm = PhysMem()
    pfn = pm.alloc_page()
    pm.put_page(pfn)
    with pytest.raises(InputError):
        pm.put_page(pfn)
    with pytest.raises(InputError):
        pm.get_page(pfn)
    with pytest.raises(InputError):
        pm.page_count(RAM_BASE_PFN + 10**6)
    with pytest.raises(InputError):
        pm.page_count("12")  # type: ignore[arg-type]


def test_bulk_alloc_matches_sequential_order() -> None:
    """alloc_pages_bulk hands out frames in the order alloc_page would."""
    a, b = PhysMem(), PhysMem()
    for pm in (a, b):
        frames = [pm.alloc_page() for _ in range(6)]
        for f in frames[1::2]:
            pm.put_page(f)
    seq = [a.alloc_page() for _ in range(5)]
    bulk = b.alloc_pages_bulk(5).tolist()
    assert seq == bulk
    assert all(b.page_count(p) == 1 for p in bulk)


def test_put_pages_vectorised_frees_in_order() -> None:
    """put_pages drops one reference per entry; folios reaching zero are freed in
    the order given (tlb_finish_mmu frees in address order)."""
    pm = PhysMem()
    frames = [pm.alloc_page() for _ in range(4)]
    pm.get_page(frames[2])
    pm.put_pages(np.array(frames, dtype=np.int64))
    assert [pm.is_free(f) for f in frames] == [True, True, False, True]
    assert pm.alloc_page() == frames[3]


def test_hugetlb_pool_limits() -> None:
    """hstate pool: reservations and allocations never exceed nr_hugepages."""
    pm = PhysMem(hugetlb_pages=2)
    assert pm.hugetlb_reserve(1)
    assert not pm.hugetlb_reserve(2)
    a = pm.alloc_hugetlb(reserved=True)
    b = pm.alloc_hugetlb(reserved=False)
    assert a is not None and b is not None
    assert pm.alloc_hugetlb(reserved=False) is None
    pm.put_page(a)
    assert pm.alloc_hugetlb(reserved=False) == a
    with pytest.raises(InputError):
        PhysMem(hugetlb_pages=-1)


def test_hwpoison_mark() -> None:
    """memory_failure() marks the page (PageHWPoison)."""
    pm = PhysMem()
    pfn = pm.alloc_page()
    assert not pm.is_hwpoison(pfn)
    pm.hwpoison(pfn)
    assert pm.is_hwpoison(pfn)
