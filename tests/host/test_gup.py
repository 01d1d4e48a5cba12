"""What KVM uses: GUP fast/slow, the PFNMAP lookup, fixup_user_fault, mapping size."""

from __future__ import annotations

import pytest

from kvmmem.errors import ArgumentError, KernelError
from kvmmem.host import (
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    Mm,
    NotifierEvent,
    RecordingNotifier,
)

from .conftest import M, P

RW = PROT_READ | PROT_WRITE


def test_fast_gup_needs_present_and_writable(mm: Mm) -> None:
    """get_user_page_fast_only(): only a present PTE (writable for FOLL_WRITE) succeeds;
    it takes a reference; special PTEs (the zero page) are refused."""
    a = mm.mmap(2 * P, RW, "anon")
    assert mm.get_user_page_fast_only(a, False) is None
    mm.host_read(a, 1)
    assert mm.get_user_page_fast_only(a, False) is None  # zero page: pte_special
    mm.host_write(a + P, 1, 1)
    pfn = mm.get_user_page_fast_only(a + P, True)
    assert pfn == mm.host_pte(a + P).pfn  # type: ignore[union-attr]
    assert mm.physmem.page_count(pfn) == 2
    mm.physmem.put_page(pfn)
    mm.mprotect(a + P, P, PROT_READ)
    assert mm.get_user_page_fast_only(a + P, True) is None
    assert mm.get_user_page_fast_only(a + P, False) == pfn
    mm.physmem.put_page(pfn)


def test_slow_gup_read_maps_zero_page(mm: Mm) -> None:
    """__get_user_pages() without FOLL_WRITE on untouched private anonymous memory
    faults in the zero page and returns it with a reference."""
    a = mm.mmap(P, RW, "anon")
    pfn = mm.get_user_pages(a, False)
    assert pfn == mm.physmem.zero_pfn
    pte = mm.host_pte(a)
    assert pte is not None and not pte.writable


def test_slow_gup_write_breaks_cow(mm: Mm, rec: RecordingNotifier) -> None:
    """FOLL_WRITE on the zero page: faultin_page(FAULT_FLAG_WRITE) -> wp_page_copy with
    MMU_NOTIFY_CLEAR; the new page is writable, then fast GUP for write succeeds."""
    a = mm.mmap(P, RW, "anon")
    mm.get_user_pages(a, False)
    pfn = mm.get_user_pages(a, True)
    assert pfn != mm.physmem.zero_pfn
    assert rec.starts() == [(a, a + P, NotifierEvent.CLEAR)]
    assert mm.physmem.page_count(pfn) == 2
    fast = mm.get_user_page_fast_only(a, True)
    assert fast == pfn


def test_slow_gup_private_file_write_copies(mm: Mm) -> None:
    """FOLL_WRITE on a private file mapping gets a private copy (do_cow_fault), the
    page cache page stays untouched."""
    f = mm.open_file("/f", P, fill=0x66)
    a = mm.mmap(P, RW, "file", file=f)
    pfn = mm.get_user_pages(a, True)
    assert f.cache[0] != pfn
    assert mm.physmem.read_int(pfn, 0, 1) == 0x66


@pytest.mark.parametrize(
    ("kind", "prot", "write"),
    [
        ("anon", PROT_READ, True),
        ("anon", PROT_NONE, False),
        ("anon", PROT_WRITE, False),
        ("device", RW, False),
        ("device-lazy", RW, True),
    ],
)
def test_slow_gup_efault(mm: Mm, kind: str, prot: int, write: bool) -> None:
    """check_vma_flags(): VM_IO|VM_PFNMAP, a write without VM_WRITE, a read without
    VM_READ are EFAULT (KVM then tries hva_to_pfn_remapped or fails the fault)."""
    a = mm.mmap(P, prot, kind)
    before = mm.snapshot()
    with pytest.raises(KernelError) as e:
        mm.get_user_pages(a, write)
    assert e.value.errno == "EFAULT"
    assert mm.snapshot() == before


def test_slow_gup_no_vma_and_sigbus_are_efault(mm: Mm) -> None:
    """No VMA: EFAULT; a fault that would SIGBUS (beyond EOF): EFAULT (vm_fault_to_errno)."""
    with pytest.raises(KernelError) as e:
        mm.get_user_pages(0x1000000, False)
    assert e.value.errno == "EFAULT"
    f = mm.memfd_create("m", P)
    a = mm.mmap(2 * P, RW, "memfd", file=f)
    with pytest.raises(KernelError) as e:
        mm.get_user_pages(a + P, False)
    assert e.value.errno == "EFAULT"


def test_slow_gup_hwpoison(mm: Mm) -> None:
    """FOLL_HWPOISON: a poisoned page gives EHWPOISON (KVM_PFN_ERR_HWPOISON)."""
    a = mm.mmap(P, RW, "anon", fill=1)
    mm.physmem.hwpoison(mm.host_pte(a).pfn)  # type: ignore[union-attr]
    with pytest.raises(KernelError) as e:
        mm.get_user_pages(a, False)
    assert e.value.errno == "EHWPOISON"
    assert mm.get_user_page_fast_only(a, False) is None


def test_gup_reference_keeps_frame_after_munmap(mm: Mm) -> None:
    """A GUP reference outlives the mapping: munmap drops the PTE, the frame is freed
    only at the last put_page (KVM's kvm_release_page_*)."""
    a = mm.mmap(P, RW, "anon", fill=0x31)
    pfn = mm.get_user_pages(a, True)
    gen = mm.physmem.generation(pfn)
    mm.munmap(a, P)
    assert not mm.physmem.is_free(pfn) and mm.physmem.page_mapcount(pfn) == 0
    assert mm.physmem.read_int(pfn, 0, 1) == 0x31
    mm.physmem.put_page(pfn)
    assert mm.physmem.is_free(pfn) and mm.physmem.generation(pfn) == gen + 1


def test_gup_on_thp_returns_subpage(mm: Mm) -> None:
    """follow_trans_huge_pmd(): the subpage of the folio, reference on the folio."""
    a = mm.mmap(2 * M, RW, "thp", fill=2)
    pfn = mm.get_user_pages(a + 3 * P, True)
    head = mm.host_pte(a).pfn  # type: ignore[union-attr]
    assert pfn == head + 3 and mm.physmem.page_count(head) == 2
    assert mm.get_user_page_fast_only(a + 5 * P, True) == head + 5


def test_follow_pfnmap_and_fixup_user_fault(mm: Mm, rec: RecordingNotifier) -> None:
    """hva_to_pfn_remapped(): follow_pfnmap_start() reads the PFNMAP PTE (pfn, write
    bit); when absent, fixup_user_fault() runs the driver's fault handler: read fault ->
    read-only entry, write fault -> writable (pfn_mkwrite upgrade, no notifier)."""
    d = mm.open_device("/dev/vfio-bar", 8, lazy=True)
    a = mm.mmap(6 * P, RW, "device-lazy", file=d, offset=2 * P)
    assert mm.follow_pfnmap(a) is None
    mm.fixup_user_fault(a, False)
    assert mm.follow_pfnmap(a) == (d.device_base + 2, False)
    mm.fixup_user_fault(a, True)
    assert mm.follow_pfnmap(a) == (d.device_base + 2, True)
    assert rec.log == []
    r = mm.mmap(2 * P, PROT_READ, "device")
    pfn, writable = mm.follow_pfnmap(r + P)  # type: ignore[misc]
    assert mm.physmem.is_device(pfn) and not writable


def test_follow_pfnmap_rejects_normal_vmas(mm: Mm) -> None:
    """follow_pfnmap_start(): -EINVAL unless the VMA is VM_IO|VM_PFNMAP."""
    a = mm.mmap(P, RW, "anon", fill=1)
    with pytest.raises(KernelError) as e:
        mm.follow_pfnmap(a)
    assert e.value.errno == "EINVAL"


def test_fixup_user_fault_errors(mm: Mm) -> None:
    """fixup_user_fault(): no VMA or no right (vma_permits_fault) EFAULT; beyond the
    device (SIGBUS from the handler) EFAULT; a remap_pfn_range VMA without a PTE has
    no handler (SIGBUS -> EFAULT)."""
    with pytest.raises(KernelError):
        mm.fixup_user_fault(0x1000000, False)
    a = mm.mmap(2 * P, PROT_READ, "device-lazy")
    with pytest.raises(KernelError) as e:
        mm.fixup_user_fault(a, True)
    assert e.value.errno == "EFAULT"
    d = mm.open_device("/dev/small", 1, lazy=True)
    b = mm.mmap(P, RW, "device-lazy", file=d)
    mm.fixup_user_fault(b, True)
    with pytest.raises(KernelError):
        mm.mmap(2 * P, RW, "device-lazy", file=d)  # beyond the BAR
    with pytest.raises(ArgumentError) as bad:
        mm.fixup_user_fault(b, 1)  # type: ignore[arg-type]
    assert bad.value.errno == "EINVAL"


def test_host_mapping_size(mm: Mm) -> None:
    """host_pfn_mapping_level(): 4K for a PTE, 2M for a THP or hugetlb leaf, 0 if none."""
    a = mm.mmap(P, RW, "anon")
    assert mm.host_mapping_size(a) == 0
    mm.host_write(a, 1, 1)
    assert mm.host_mapping_size(a) == P
    h = mm.mmap(M, RW, "hugetlb", populate=True)
    assert mm.host_mapping_size(h + 77 * P) == M
    assert mm.vma_lookup(h).page_shift == 21  # type: ignore[union-attr]
    assert mm.vma_lookup(a).page_shift == 12  # type: ignore[union-attr]
