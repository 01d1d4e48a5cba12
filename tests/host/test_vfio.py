"""A PCI BAR mapped through vfio-pci (kvmmem.host.vfio): the VMA vfio_pci_core_mmap
makes and how its fault handler fills it, per release (drivers/vfio/pci/vfio_pci_core.c,
the switches ``vfio_pci_mmap``, ``vfio_huge_fault_pfn_check``, ``vfio_huge_fault_align``
and ``arm64_allow_any_uncached``), and VM_MTE_ALLOWED per mapping kind on an MTE CPU
(arm64 ``arch_calc_vm_flag_bits``).  Expected values are the kernel code's."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmmem.errors import InputError
from kvmmem.host import PROT_READ, PROT_WRITE, Mm, NotifierEvent, RecordingNotifier
from kvmmem.host.huge_memory import split_huge_pmd_op
from kvmmem.host.validate import validate_mm
from kvmmem.host.vfio import (
    VFIO_FAULT_INSERT_VMA,
    VFIO_FAULT_REMAP,
    VFIO_HUGE_FAULT,
    VFIO_REMAP_AT_MMAP,
)
from kvmmem.host.vma import (
    VM_ALLOW_ANY_UNCACHED,
    VM_DONTDUMP,
    VM_DONTEXPAND,
    VM_IO,
    VM_MTE_ALLOWED,
    VM_PFNMAP,
    VM_SHARED,
)
from kvmmem.sync import drive
from kvmmem.types import PAGE_SIZE, PMD_SIZE

RW = PROT_READ | PROT_WRITE
M2 = PMD_SIZE
HVA = 0x7E00_0000_0000  # 1G aligned


def bar_mm(mode: int = VFIO_HUGE_FAULT, *, align: bool = True, pfn_check: bool = True,
           size: int = 4 * M2, at: int = HVA) -> tuple[Mm, int]:
    mm = Mm()
    mm.vfio_pci_mmap, mm.vfio_huge_fault_align = mode, align
    mm.vfio_huge_fault_pfn_check = pfn_check
    hva = mm.mmap(size, RW, "vfio-bar", addr=at, fixed=True)
    return mm, hva


def test_vma_flags_and_bar_alignment() -> None:
    """vfio_pci_core_mmap: VM_IO|VM_PFNMAP|VM_DONTEXPAND|VM_DONTDUMP, shared, since v6.9
    VM_ALLOW_ANY_UNCACHED; the BAR's physical base is aligned to its size."""
    mm, hva = bar_mm(size=8 * M2)
    vma = mm.vma_lookup(hva)
    assert vma is not None
    want = VM_IO | VM_PFNMAP | VM_DONTEXPAND | VM_DONTDUMP | VM_SHARED | VM_ALLOW_ANY_UNCACHED
    assert vma.flags & want == want
    assert not vma.cacheable
    assert vma.file is not None and vma.file.device_base % (8 * M2 // PAGE_SIZE) == 0
    mm.vfio_allow_any_uncached = False
    other = mm.mmap(M2, RW, "vfio-bar")
    vma2 = mm.vma_lookup(other)
    assert vma2 is not None and not vma2.flags & VM_ALLOW_ANY_UNCACHED


def test_bar_size_must_be_a_power_of_two() -> None:
    with pytest.raises(InputError, match="power of two"):
        Mm().mmap(3 * PAGE_SIZE, RW, "vfio-bar")


@pytest.mark.parametrize(("mode", "pgoff_is_pfn", "present_at_mmap"), [
    (VFIO_REMAP_AT_MMAP, True, True), (VFIO_FAULT_REMAP, True, False),
    (VFIO_FAULT_INSERT_VMA, False, False), (VFIO_HUGE_FAULT, False, False)])
def test_vm_pgoff_and_population_per_release(mode: int, pgoff_is_pfn: bool,
                                             present_at_mmap: bool) -> None:
    """vm_pgoff holds the pfn before v6.10 (aac6db75a9fc), the region offset since (BAR 0:
    0); the VMA is remapped at mmap before v5.8 (11c4cd07ba11); from v5.8 to v6.11 the
    first fault fills the whole VMA at 4K; since v6.12 a fault fills what it needs."""
    mm, hva = bar_mm(mode)
    vma = mm.vma_lookup(hva)
    assert vma is not None and vma.file is not None
    assert vma.pgoff == (vma.file.device_base if pgoff_is_pfn else 0)
    assert (mm.host_pte(hva + PAGE_SIZE) is not None) == present_at_mmap
    assert mm.host_read(hva + 3 * PAGE_SIZE, 8) == 0
    last = mm.host_pte(hva + 4 * M2 - PAGE_SIZE)
    if mode == VFIO_HUGE_FAULT:
        assert last is None
        pte = mm.host_pte(hva + 3 * PAGE_SIZE)
        assert pte is not None and pte.huge_size == M2
    else:
        assert last is not None and last.huge_size == PAGE_SIZE
        assert last.pfn == vma.file.device_base + 4 * 512 - 1
    validate_mm(mm)


@pytest.mark.parametrize(("align", "offset", "huge"), [
    (False, 0, True), (False, 5 * PAGE_SIZE, False), (True, 5 * PAGE_SIZE, True)])
def test_huge_fault_alignment(align: bool, offset: int, huge: bool) -> None:
    """Before v6.15 only a fault at a 2M-aligned address gets the PMD leaf (and a page
    fault first leaves a PTE table, so the 2M stays 4K); since c1d9dac0db16 the address
    is aligned down."""
    mm, hva = bar_mm(align=align)
    mm.host_write(hva + offset, 4, 0xA5)
    pte = mm.host_pte(hva + offset)
    assert pte is not None and pte.huge_size == (M2 if huge else PAGE_SIZE)
    assert pte.special and pte.writable
    assert mm.mapping_size(hva + offset) == (M2 if huge else PAGE_SIZE)
    assert mm.follow_pfnmap(hva + offset) == (pte.pfn, True)


@pytest.mark.parametrize(("pfn_check", "leaf_pfn_shift"), [(True, None), (False, 0)])
def test_unaligned_pfn(pfn_check: bool, leaf_pfn_shift: int | None) -> None:
    """A BAR mapped at an hva 1M off a 2M boundary: the 2M-aligned address inside it has
    an unaligned pfn.  Since v6.13 (09dfc8a5f2ce) that falls back to 4K; in v6.12 the
    PMD is made and its output address aligned down (pfn_pmd), so it maps the frames 1M
    before the intended ones."""
    mm, hva = bar_mm(align=False, pfn_check=pfn_check, at=HVA + (M2 >> 1))
    target = hva + (M2 >> 1)  # 2M aligned
    mm.host_read(target, 8)
    pte = mm.host_pte(target)
    vma = mm.vma_lookup(hva)
    assert pte is not None and vma is not None and vma.file is not None
    intended = vma.file.device_base + 256
    if leaf_pfn_shift is None:
        assert pte.huge_size == PAGE_SIZE and pte.pfn == intended
    else:
        assert pte.huge_size == M2 and pte.pfn == intended - 256


def test_partial_munmap_and_mprotect_of_a_special_pmd() -> None:
    """Splitting a huge PFNMAP leaf only clears it (vma_is_special_huge); mprotect of the
    whole 2M keeps it (change_huge_pmd) and takes the write bit away."""
    mm, hva = bar_mm()
    mm.host_read(hva, 8)
    mm.host_read(hva + M2, 8)
    mm.mprotect(hva + M2, M2, PROT_READ)
    pte = mm.host_pte(hva + M2)
    assert pte is not None and pte.huge_size == M2 and not pte.writable
    mm.munmap(hva + PAGE_SIZE, PAGE_SIZE)
    assert mm.host_pte(hva) is None
    assert mm.host_read(hva, 8) == 0  # refaulted at 4K: the PMD slot holds a table now
    pte = mm.host_pte(hva)
    assert pte is not None and pte.huge_size == PAGE_SIZE
    drive(split_huge_pmd_op(mm, (hva + M2) >> 21))
    assert mm.host_pte(hva + M2) is None
    validate_mm(mm)


G1 = 1 << 30


def pud_mm(*, align: bool = True) -> tuple[Mm, int, RecordingNotifier]:
    """A 1 GiB BAR at a 1 GiB-aligned address on an x86-like mm (PMD and PUD leaves)."""
    mm, hva = bar_mm(align=align, size=G1)
    mm.huge_pfnmap = ("pud", "pmd")
    rec = RecordingNotifier()
    mm.mmu_notifier_register(rec)
    return mm, hva, rec


@pytest.mark.parametrize(("align", "offset", "size"), [
    (False, 0, G1), (False, 0x5000, PAGE_SIZE), (False, 3 * M2, M2),
    (True, 0x5000, G1), (True, G1 - PAGE_SIZE, G1)])
def test_pud_leaf_on_x86(align: bool, offset: int, size: int) -> None:
    """x86 (ARCH_SUPPORTS_PUD_PFNMAP, v6.12): the fault tries huge_fault(PUD_ORDER) while
    the PUD is empty, then PMD_ORDER.  Before v6.15 only a fault at the aligned address
    gets the leaf (at 3*2M: the PMD; at 0x5000: a page); since then the block around it."""
    mm, hva, _ = pud_mm(align=align)
    mm.host_read(hva + offset, 8)
    pte = mm.host_pte(hva + offset)
    vma = mm.vma_lookup(hva)
    assert pte is not None and vma is not None and vma.file is not None
    assert pte.huge_size == size and mm.mapping_size(hva + offset) == size
    assert pte.pfn == vma.file.device_base + (offset >> 12)
    validate_mm(mm)


def test_arm64_has_no_pud_pfnmap_leaves() -> None:
    """arm64 selects ARCH_SUPPORTS_PMD_PFNMAP only: a 1 GiB BAR gets PMD leaves."""
    mm, hva = bar_mm(size=G1)
    mm.huge_pfnmap = ("pmd",)
    mm.host_read(hva + 0x5000, 8)
    assert mm.mapping_size(hva + 0x5000) == M2


def test_a_cut_pud_leaf_is_cleared_whole() -> None:
    """zap_pud_range / change_pud_range: a range that does not cover the PUD leaf splits
    it, and splitting a special PUD clears it (__split_huge_pud_locked): one
    MMU_NOTIFY_CLEAR over the whole 1 GiB; the next fault (the PUD is no longer empty
    in the kernel once a PMD table is there) refills it."""
    mm, hva, rec = pud_mm()
    mm.host_read(hva, 8)
    rec.log.clear()
    mm.mprotect(hva + M2, M2, PROT_READ)
    assert (hva, hva + G1, NotifierEvent.CLEAR) in rec.starts()
    assert mm.host_pte(hva) is None and mm.host_pte(hva + G1 - PAGE_SIZE) is None
    mm.host_read(hva + M2, 8)  # the mprotected PMD: read-only now, PMD-sized
    pte = mm.host_pte(hva + M2)
    assert pte is not None and pte.huge_size == M2 and not pte.writable
    validate_mm(mm)
    mm2, hva2, rec2 = pud_mm()
    mm2.host_read(hva2, 8)
    rec2.log.clear()
    mm2.munmap(hva2 + G1 - M2, M2)
    assert (hva2, hva2 + G1, NotifierEvent.CLEAR) in rec2.starts()
    assert mm2.host_pte(hva2) is None
    validate_mm(mm2)


def test_mprotect_of_a_whole_pud_leaf_keeps_it() -> None:
    """change_huge_pud: mprotect over the whole 1 GiB rewrites the leaf in place."""
    mm, hva, _ = pud_mm()
    mm.host_write(hva, 8, 5)
    mm.mprotect(hva, G1, PROT_READ)
    pte = mm.host_pte(hva + 0x1234_5000)
    assert pte is not None and pte.huge_size == G1 and not pte.writable
    assert mm.host_read(hva, 8) == 5
    validate_mm(mm)


@pytest.mark.parametrize(("dest", "kept"), [(HVA + 4 * G1, True),
                                             (HVA + 4 * G1 + M2, False)])
def test_mremap_moves_a_pud_leaf_whole_or_clears_it(dest: int, kept: bool) -> None:
    """move_page_tables: a PUD leaf moves as one entry when the whole of it moves to a
    PUD-aligned place (move_pgt_entry HPAGE_PUD); otherwise it is split (cleared) and
    the new place refaults."""
    mm, hva, _ = pud_mm()
    mm.host_write(hva + 0x3000, 8, 9)
    new = mm.mremap(hva, G1, G1, maymove=True, fixed_addr=dest)
    pte = mm.host_pte(new + 0x3000)
    assert (pte is not None and pte.huge_size == G1) is kept
    assert mm.host_read(new + 0x3000, 8) == 9
    validate_mm(mm)


@settings(max_examples=60, deadline=None)
@given(pages=st.integers(1, 2048), fault=st.integers(0, 4 * 512 - 1),
       align=st.booleans(), shift=st.sampled_from([0, 256, 511]))
def test_a_leaf_maps_the_bar_frame_of_its_address(pages: int, fault: int, align: bool,
                                                  shift: int) -> None:
    """With the pfn check (v6.13+), whatever the mapping's placement and the fault's
    address, the host entry at every address of the BAR maps the BAR frame of that
    address: base + (address - start) / 4K."""
    size = 1 << (pages - 1).bit_length() << 12
    mm, hva = bar_mm(align=align, size=max(size, PAGE_SIZE), at=HVA + shift * PAGE_SIZE)
    vma = mm.vma_lookup(hva)
    assert vma is not None and vma.file is not None
    addr = hva + (fault * PAGE_SIZE) % (vma.end - vma.start)
    mm.host_read(addr, 4)
    for probe in (addr, vma.start, vma.end - PAGE_SIZE):
        pte = mm.host_pte(probe)
        if pte is not None:
            assert pte.pfn == vma.file.device_base + ((probe - vma.start) >> 12)
    validate_mm(mm)


@pytest.mark.parametrize(("kind", "allowed"), [
    ("anon", True), ("thp", True), ("memfd", True), ("hugetlb", True), ("file", False),
    ("file-shared", False), ("device", False), ("device-lazy", False), ("dmabuf", False),
    ("vfio-bar", False), ("device-cacheable", False)])
def test_vm_mte_allowed_per_kind(kind: str, allowed: bool) -> None:
    """arm64 arch_calc_vm_flag_bits on a CPU with MTE (9f3419315f3c, v5.10): anonymous
    memory, shmem and (mainline) anonymous hugetlb can hold tags; files, devices and
    dma-bufs cannot.  Without MTE nothing gets the flag."""
    mm = Mm()
    mm.mte = True
    hva = mm.mmap(M2, RW, kind)
    vma = mm.vma_lookup(hva)
    assert vma is not None and bool(vma.flags & VM_MTE_ALLOWED) == allowed
    plain = Mm()
    hva = plain.mmap(M2, RW, kind)
    vma = plain.vma_lookup(hva)
    assert vma is not None and not vma.flags & VM_MTE_ALLOWED


def test_stable_kernels_drop_vm_mte_allowed_from_hugetlb() -> None:
    """5.10.y-6.12.y (Debian 6.12.117): "arm64: mte: Do not allow PROT_MTE on MAP_HUGETLB
    user mappings"."""
    mm = Mm()
    mm.mte, mm.hugetlb_mte_allowed = True, False
    vma = mm.vma_lookup(mm.mmap(M2, RW, "hugetlb"))
    assert vma is not None and not vma.flags & VM_MTE_ALLOWED


def test_device_cacheable_is_remapped_cacheable() -> None:
    """nvgrace-gpu's usemem region (v6.9): remap_pfn_range at mmap, vm_pgoff the start
    pfn, the default cacheable memory type, no struct page."""
    mm = Mm()
    hva = mm.mmap(4 * PAGE_SIZE, RW, "device-cacheable")
    vma = mm.vma_lookup(hva)
    assert vma is not None and vma.cacheable and vma.flags & (VM_IO | VM_PFNMAP)
    pte = mm.host_pte(hva + PAGE_SIZE)
    assert pte is not None and pte.pfn == vma.pgoff + 1
    assert mm.physmem.is_cacheable_device(pte.pfn) and not mm.physmem.pfn_valid(pte.pfn)
