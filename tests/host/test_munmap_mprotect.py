"""munmap(2) and mprotect(2): splitting, errno rules, PTE effects, notifications."""

from __future__ import annotations

import pytest

from kvmmem.errors import KernelError
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

from .conftest import M, P

RW = PROT_READ | PROT_WRITE
BASE = 0x40000000


def bounds(mm: Mm, base: int = BASE) -> list[tuple[int, int, str]]:
    return [((v.start - base) // P, (v.end - base) // P, v.maps_perms())
            for v in mm.for_each_vma()]


# --- munmap ---------------------------------------------------------------------------


def test_munmap_splits_the_vma(mm: Mm) -> None:
    """do_vmi_align_munmap(): unmapping the middle leaves two VMAs with the right pgoff."""
    mm.mmap(8 * P, RW, "anon", addr=BASE, fixed=True)
    mm.munmap(BASE + 2 * P, 3 * P)
    assert bounds(mm) == [(0, 2, "rw-p"), (5, 8, "rw-p")]
    upper = mm.vma_lookup(BASE + 5 * P)
    assert upper is not None and upper.pgoff == (BASE >> 12) + 5


@pytest.mark.parametrize(
    ("addr_off", "length"),
    [(5, P), (0, 0), (0, -P), (0, 1 << 47)],
)
def test_munmap_einval(mm: Mm, addr_off: int, length: int) -> None:
    """__vm_munmap/do_vmi_munmap(): unaligned start, length 0, or a range beyond
    TASK_SIZE is EINVAL and changes nothing."""
    mm.mmap(4 * P, RW, "anon", addr=BASE, fixed=True, fill=3)
    before = mm.snapshot()
    with pytest.raises(KernelError) as e:
        mm.munmap(BASE + addr_off, length)
    assert e.value.errno == "EINVAL"
    assert mm.snapshot() == before


def test_munmap_of_nothing_succeeds_silently(mm: Mm, rec: RecordingNotifier) -> None:
    """munmap of an unmapped range is 0, with no notification."""
    mm.munmap(0x60000000, 16 * P)
    assert rec.log == []


def test_munmap_rounds_length_up(mm: Mm) -> None:
    """PAGE_ALIGN(len): munmap(addr, 1) removes a whole page."""
    mm.mmap(2 * P, RW, "anon", addr=BASE, fixed=True)
    mm.munmap(BASE, 1)
    assert bounds(mm) == [(1, 2, "rw-p")]


def test_munmap_notifies_requested_range_then_frees(mm: Mm) -> None:
    """vms_clear_ptes() -> unmap_vmas(): one MMU_NOTIFY_UNMAP range = the request,
    even across a hole; frames go back to the allocator only after the end."""
    seen: list[tuple[str, bool]] = []
    mm.mmap(2 * P, RW, "anon", addr=BASE, fixed=True, fill=1)
    mm.mmap(2 * P, RW, "anon", addr=BASE + 4 * P, fixed=True, fill=2)
    pte = mm.host_pte(BASE)
    assert pte is not None
    pfn = pte.pfn

    class Watch(RecordingNotifier):
        def invalidate_range_start(self, rng):  # type: ignore[no-untyped-def]
            seen.append(("start", mm.physmem.is_free(pfn)))
            return super().invalidate_range_start(rng)

        def invalidate_range_end(self, rng):  # type: ignore[no-untyped-def]
            seen.append(("end", mm.physmem.is_free(pfn)))
            return super().invalidate_range_end(rng)

    w = Watch()
    mm.mmu_notifier_register(w)
    mm.munmap(BASE, 6 * P)
    assert w.starts() == [(BASE, BASE + 6 * P, NotifierEvent.UNMAP)]
    assert seen == [("start", False), ("end", False)]
    assert mm.physmem.is_free(pfn)
    assert mm.host_pte(BASE) is None


def test_munmap_hugetlb_inside_a_page_is_einval(mm: Mm) -> None:
    """hugetlb_vm_op_split(): a hugetlb VMA splits only at huge-page boundaries."""
    a = mm.mmap(2 * M, RW, "hugetlb")
    before = mm.snapshot()
    with pytest.raises(KernelError) as e:
        mm.munmap(a, P)
    assert e.value.errno == "EINVAL"
    assert mm.snapshot() == before
    mm.munmap(a, M)
    assert [(v.start - a, v.end - a) for v in mm.for_each_vma()] == [(M, 2 * M)]


# --- mprotect -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start_off", "length", "prot", "errno"),
    [
        (5, P, PROT_READ, "EINVAL"),
        (0, P, 0x100, "EINVAL"),
        (0, P, PROT_READ | 0x01000000, "EINVAL"),
        (0, -P, PROT_READ, "ENOMEM"),
        (16 * P, P, PROT_READ, "ENOMEM"),
        (-P, 2 * P, PROT_READ, "ENOMEM"),
    ],
)
def test_mprotect_errnos_change_nothing(
    mm: Mm, start_off: int, length: int, prot: int, errno: str
) -> None:
    """do_mprotect_pkey(): EINVAL for an unaligned start or bad prot bits (arch_validate_prot,
    PROT_GROWSDOWN without a stack), ENOMEM for a wrapping range or one starting in a hole."""
    mm.mmap(4 * P, RW, "anon", addr=BASE, fixed=True, fill=9)
    before = mm.snapshot()
    with pytest.raises(KernelError) as e:
        mm.mprotect(BASE + start_off, length, prot)
    assert e.value.errno == errno
    assert mm.snapshot() == before


def test_mprotect_zero_length_and_sem_are_fine(mm: Mm) -> None:
    """len 0 returns 0; PROT_SEM is accepted (arch_validate_prot)."""
    mm.mmap(P, RW, "anon", addr=BASE, fixed=True)
    mm.mprotect(BASE, 0, PROT_NONE)
    mm.mprotect(BASE, P, PROT_READ | 0x8)
    assert bounds(mm) == [(0, 1, "r--p")]


def test_mprotect_applies_up_to_a_hole_then_enomem(mm: Mm) -> None:
    """do_mprotect_pkey(): VMAs before a hole are changed, then ENOMEM (checked on
    this host: mprotect over [rw anon][hole] leaves the first part read-only)."""
    mm.mmap(4 * P, RW, "anon", addr=BASE, fixed=True)
    with pytest.raises(KernelError) as e:
        mm.mprotect(BASE + 2 * P, 4 * P, PROT_READ)
    assert e.value.errno == "ENOMEM"
    assert bounds(mm) == [(0, 2, "rw-p"), (2, 4, "r--p")]


def test_mprotect_eacces_after_earlier_vmas(mm: Mm) -> None:
    """mprotect_fixup loop: a VMA without VM_MAYWRITE (shared, read-only file) refuses
    PROT_WRITE with EACCES; the VMA before it was already changed."""
    f = mm.open_file("/ro", 4 * P, writable=False)
    mm.mmap(2 * P, PROT_READ, "anon", addr=BASE, fixed=True)
    mm.mmap(2 * P, PROT_READ, "file-shared", file=f, addr=BASE + 2 * P, fixed=True)
    with pytest.raises(KernelError) as e:
        mm.mprotect(BASE, 4 * P, RW)
    assert e.value.errno == "EACCES"
    assert bounds(mm) == [(0, 2, "rw-p"), (2, 4, "r--s")]
    mm.mprotect(BASE + 2 * P, 2 * P, PROT_READ | PROT_EXEC)
    assert bounds(mm)[-1] == (2, 4, "r-xs")


def test_mprotect_splits_and_remerges(mm: Mm) -> None:
    """vma_modify_flags(): the changed part is split off; restoring the old protection
    merges the pieces back (same anon_vma, contiguous pgoff)."""
    mm.mmap(8 * P, RW, "anon", addr=BASE, fixed=True, fill=1)
    mm.mprotect(BASE + 3 * P, 2 * P, PROT_READ)
    assert bounds(mm) == [(0, 3, "rw-p"), (3, 5, "r--p"), (5, 8, "rw-p")]
    mm.mprotect(BASE + 3 * P, 2 * P, RW)
    assert bounds(mm) == [(0, 8, "rw-p")]


def test_mprotect_account_flag(mm: Mm) -> None:
    """mprotect_fixup(): a never-faulted anonymous VMA loses VM_ACCOUNT when made
    read-only (no anon_vma), one that was written keeps it; making a read-only
    private mapping writable charges it (VM_ACCOUNT)."""
    a = mm.mmap(P, RW, "anon")
    mm.mprotect(a, P, PROT_READ)
    assert "ac" not in mm.vma_lookup(a).vm_flags_names()  # type: ignore[union-attr]
    b = mm.mmap(P, RW, "anon", fill=1)
    mm.mprotect(b, P, PROT_READ)
    assert "ac" in mm.vma_lookup(b).vm_flags_names()  # type: ignore[union-attr]
    c = mm.mmap(P, PROT_READ, "anon")
    mm.mprotect(c, P, RW)
    assert "ac" in mm.vma_lookup(c).vm_flags_names()  # type: ignore[union-attr]


def test_mprotect_downgrade_write_protects_ptes(mm: Mm, rec: RecordingNotifier) -> None:
    """change_protection(): PROT_READ clears the PTE write bit under an
    MMU_NOTIFY_PROTECTION_VMA range; a store then SIGSEGVs, a load still works."""
    mm.mmap(2 * P, RW, "anon", addr=BASE, fixed=True, fill=5)
    rec.log.clear()
    mm.mprotect(BASE, 2 * P, PROT_READ)
    assert rec.starts() == [(BASE, BASE + 2 * P, NotifierEvent.PROTECTION_VMA)]
    pte = mm.host_pte(BASE)
    assert pte is not None and not pte.writable
    with pytest.raises(HostSignal) as s:
        mm.host_write(BASE, 1, 0)
    assert s.value.signal == "SIGSEGV"
    assert mm.host_read(BASE, 1) == 5


def test_mprotect_upgrade_notifies_and_restores_write(mm: Mm, rec: RecordingNotifier) -> None:
    """change_pud_range() notifies for any populated range, upgrade or not; PTEs of
    exclusive anonymous pages become writable again (can_change_pte_writable), the
    zero page stays read-only."""
    mm.mmap(2 * P, RW, "anon", addr=BASE, fixed=True)
    mm.host_write(BASE, 1, 1)
    mm.host_read(BASE + P, 1)  # zero page
    mm.mprotect(BASE, 2 * P, PROT_READ)
    rec.log.clear()
    mm.mprotect(BASE, 2 * P, RW)
    assert rec.starts() == [(BASE, BASE + 2 * P, NotifierEvent.PROTECTION_VMA)]
    assert mm.host_pte(BASE).writable  # type: ignore[union-attr]
    assert not mm.host_pte(BASE + P).writable  # type: ignore[union-attr]


def test_mprotect_unpopulated_range_does_not_notify(mm: Mm, rec: RecordingNotifier) -> None:
    """change_pud_range(): no page table under the range, no invalidation."""
    mm.mmap(2 * P, RW, "anon", addr=BASE, fixed=True)
    mm.mprotect(BASE, 2 * P, PROT_READ)
    assert rec.log == []


def test_mprotect_same_flags_is_a_noop(mm: Mm, rec: RecordingNotifier) -> None:
    """mprotect_fixup(): newflags == oldflags does nothing (no split, no notification)."""
    mm.mmap(2 * P, RW, "anon", addr=BASE, fixed=True, fill=1)
    rec.log.clear()
    mm.mprotect(BASE + P, P, RW)
    assert rec.log == [] and bounds(mm) == [(0, 2, "rw-p")]


def test_mprotect_prot_none_then_back(mm: Mm) -> None:
    """PROT_NONE keeps the frames (protnone PTEs); access SIGSEGVs; restoring the
    protection shows the same data."""
    mm.mmap(P, RW, "anon", addr=BASE, fixed=True, fill=0x33)
    mm.mprotect(BASE, P, PROT_NONE)
    pte = mm.host_pte(BASE)
    assert pte is not None and pte.protnone
    with pytest.raises(HostSignal):
        mm.host_read(BASE, 1)
    mm.mprotect(BASE, P, PROT_READ)
    assert mm.host_read(BASE, 1) == 0x33


def test_mprotect_shared_memfd_upgrade_makes_ptes_writable(mm: Mm) -> None:
    """pte_modify() with the new vm_page_prot: shmem mappings have no write-notify,
    so a shared writable VMA gets writable PTEs straight away."""
    mm.mmap(P, PROT_READ, "memfd", addr=BASE, fixed=True)
    mm.host_read(BASE, 1)
    mm.mprotect(BASE, P, RW)
    assert mm.host_pte(BASE).writable  # type: ignore[union-attr]


def test_mprotect_write_notified_file_needs_dirty(mm: Mm) -> None:
    """can_change_pte_writable(): on a write-notified shared file mapping only dirty
    PTEs become writable again; clean ones wait for the next write fault."""
    f = mm.open_file("/f", 2 * P)
    mm.mmap(2 * P, RW, "file-shared", file=f, addr=BASE, fixed=True)
    mm.host_write(BASE, 1, 1)
    mm.host_read(BASE + P, 1)
    assert not mm.host_pte(BASE + P).writable  # type: ignore[union-attr]
    mm.mprotect(BASE, 2 * P, PROT_READ)
    mm.mprotect(BASE, 2 * P, RW)
    assert mm.host_pte(BASE).writable  # type: ignore[union-attr]
    assert not mm.host_pte(BASE + P).writable  # type: ignore[union-attr]


def test_mprotect_hugetlb_alignment(mm: Mm) -> None:
    """hugetlb_vm_op_split(): mprotect of 4K inside a hugetlb page is EINVAL; a whole
    page works (hugetlb_change_protection notifies the range)."""
    a = mm.mmap(2 * M, RW, "hugetlb")
    with pytest.raises(KernelError) as e:
        mm.mprotect(a, P, PROT_READ)
    assert e.value.errno == "EINVAL"
    mm.mprotect(a, M, PROT_READ)
    assert [v.maps_perms() for v in mm.for_each_vma()] == ["r--p", "rw-p"]
