"""The host page size: an arm64 kernel built with 4 KiB, 16 KiB or 64 KiB pages
(``CONFIG_ARM64_{4K,16K,64K}_PAGES``); x86 and riscv have 4 KiB pages only.

What follows from ``PAGE_SIZE`` and is checked here against the kernel's rules:

* ``kvm_set_memory_region``: ``memory_size``, ``guest_phys_addr`` and
  ``userspace_addr`` must be ``PAGE_SIZE``-aligned, else EINVAL (seen on Debian's 7.3
  arm64-16k kernel: a 4 KiB slot EINVAL, 16 KiB and 64 KiB accepted);
* gfns, pfns and the dirty bitmap count host pages;
* arm64 stage-2 uses the host ``PAGE_SIZE`` as its granule; its blocks are PMD-sized
  only with 16 KiB and 64 KiB pages (``KVM_PGTABLE_MIN_BLOCK_LEVEL`` 2): 32 MiB and
  512 MiB, reached through a PMD-sized THP (``transparent_hugepage_adjust``) or the
  default hugetlb size (``get_vma_page_shift``);
* ``user_mem_abort``'s ``switch (vma_shift)``: CONT_PMD sizes map as PMD blocks,
  CONT_PTE sizes force pages (``arch/arm64/mm/hugetlbpage.c`` hstates: 64K/2M/32M/1G
  with 4 KiB pages, 2M/32M/1G with 16 KiB, 2M/512M/16G with 64 KiB).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmmem.errors import InputError, KernelError
from kvmmem.host import PROT_READ, PROT_WRITE, Mm
from kvmmem.host.vma import VM_HUGETLB, VM_READ, VM_WRITE, Vma, VmaKind
from kvmmem.kvm.arm64 import vma_pagesize
from kvmmem.kvm.memslot import KVM_MEM_LOG_DIRTY_PAGES, MemorySlot
from kvmmem.kvm.vcpu import Access
from kvmmem.kvm.vm import Vm
from kvmmem.types import PAGES_4K, PAGES_16K, PAGES_64K, Gfn, Hva, PageGeometry
from kvmmem.variants import UPSTREAM

RW = PROT_READ | PROT_WRITE
G1 = 1 << 30
K, M = 1 << 10, 1 << 20
GEOMETRIES = (PAGES_4K, PAGES_16K, PAGES_64K)


def test_page_geometry_numbers() -> None:
    """PMD = PAGE_SIZE * PAGE_SIZE / 8; the contiguous-hint and PUD sizes of each build."""
    sizes = {g.name: (g.page_size, g.pmd_size, g.pud_size, 1 << g.cont_pte_shift,
                      1 << g.cont_pmd_shift) for g in GEOMETRIES}
    assert sizes == {
        "4K": (4 * K, 2 * M, G1, 64 * K, 32 * M),
        "16K": (16 * K, 32 * M, 64 * G1, 2 * M, G1),
        "64K": (64 * K, 512 * M, 4096 * G1, 2 * M, 16 * G1),
    }


@pytest.mark.parametrize("page_size", [4096, 16384, 65536])
def test_a_4k_slot_is_einval_on_a_bigger_page_host(page_size: int) -> None:
    """Real Debian 7.3 arm64-16k: a 4 KiB memslot is EINVAL, 16 KiB and 64 KiB are
    accepted (``kvm_set_memory_region``'s PAGE_SIZE checks)."""
    mm = Mm(page_size=page_size)
    vm = Vm("arm64", mm=mm)
    hva = mm.mmap(1 * M, RW, "anon")
    for i, size in enumerate((4 * K, 16 * K, 64 * K)):
        gpa = 0x4000_0000 + i * M
        if size % page_size:
            with pytest.raises(KernelError) as err:
                vm.set_user_memory_region(i, gpa, size, hva)
            assert err.value.errno == "EINVAL"
        else:
            vm.set_user_memory_region(i, gpa, size, hva)


@settings(max_examples=150, deadline=None)
@given(geometry=st.sampled_from(GEOMETRIES), gpa_pages=st.integers(0, 1 << 12),
       size_pages=st.integers(1, 64), hva_pages=st.integers(0, 1 << 12))
def test_memslot_alignment_follows_the_host_page_size(
        geometry: PageGeometry, gpa_pages: int, size_pages: int, hva_pages: int) -> None:
    """Random 4 KiB-granular slot geometries against the kernel's rule: EINVAL exactly
    when gpa, size or userspace_addr is not aligned to the host ``PAGE_SIZE``; else the
    slot exists, its gfns in host pages."""
    vm = Vm("arm64", mm=Mm(page_size=geometry))
    gpa, size = 0x1_0000_0000 + gpa_pages * 4 * K, size_pages * 4 * K
    hva = 0x7000_0000_0000 + hva_pages * 4 * K
    aligned = not (gpa | size | hva) & (geometry.page_size - 1)
    try:
        vm.set_user_memory_region(0, gpa, size, hva)
    except KernelError as err:
        assert not aligned and err.errno == "EINVAL"
        return
    assert aligned
    slot = vm.gfn_to_memslot(gpa >> geometry.page_shift)
    assert slot is not None and slot.npages == size // geometry.page_size
    assert slot.base_gfn == gpa >> geometry.page_shift and slot.hva_end == hva + size


def test_x86_and_riscv_refuse_bigger_pages_and_granule_must_match() -> None:
    """Only arm64 hosts have 16 KiB or 64 KiB pages; the stage-2 granule is the host's
    PAGE_SIZE (a different one is refused naming both)."""
    for arch in ("x86", "riscv"):
        with pytest.raises(InputError, match="page_size: 16K"):
            Vm(arch, mm=Mm(page_size=16384))
    with pytest.raises(InputError, match="granule: 16K differs from page_size 4K"):
        Vm("arm64", granule=16384)
    vm = Vm("arm64", mm=Mm(page_size=65536), granule=65536)
    assert vm.stage2.granule == 65536 and vm.stage2.leaf_sizes == (64 * K, 512 * M)
    with pytest.raises(InputError, match="differs from the physmem"):
        Mm(Mm(page_size=16384).physmem, page_size=4096)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: g.name)
def test_thp_maps_a_pmd_block_of_the_host_size(geometry: PageGeometry) -> None:
    """A PMD-sized THP (thp=always) behind a congruent slot: one stage-2 block of the
    host's PMD size (2M / 32M / 512M); the guest's bytes land in the THP's subpage."""
    mm = Mm(page_size=geometry, thp="always")
    vm = Vm("arm64", mm=mm)
    pmd = geometry.pmd_size
    hva = mm.mmap(2 * pmd, RW, "anon")
    assert hva % pmd == 0  # thp_get_unmapped_area
    gpa = 4 * pmd
    vm.set_user_memory_region(0, gpa, 2 * pmd, hva)
    assert vm.guest_access(gpa + pmd + 3 * geometry.page_size + 8, 8, Access.WRITE,
                           0xABCD).result == "ok"
    leaves = [(leaf.gpa, leaf.size) for leaf in vm.stage2.for_each_leaf()]
    assert leaves == [(gpa + pmd, pmd)]
    assert mm.host_read(hva + pmd + 3 * geometry.page_size + 8, 8) == 0xABCD
    counters = vm.stats_dict()
    assert counters[f"pages_{geometry.name.lower()}"] == 0
    assert counters[{"4K": "pages_2m", "16K": "pages_32m", "64K": "pages_512m"}[
        geometry.name]] == 1


@pytest.mark.parametrize("geometry", [PAGES_16K, PAGES_64K], ids=lambda g: g.name)
def test_hugetlb_default_size_is_the_pmd(geometry: PageGeometry) -> None:
    """MAP_HUGETLB uses the default hstate, ``HPAGE_SIZE`` = PMD_SIZE (32M / 512M): the
    length rounds up to it, the stage-2 block has its size; a slot one page off the
    congruence gets pages only (``fault_supports_stage2_huge_mapping``)."""
    mm = Mm(page_size=geometry)
    vm = Vm("arm64", mm=mm)
    pmd, page = geometry.pmd_size, geometry.page_size
    hva = mm.mmap(2 * M, RW, "hugetlb")  # rounded up to one huge page
    vma = mm.vma_lookup(hva)
    assert vma is not None and vma.end - vma.start == pmd and hva % pmd == 0
    vm.set_user_memory_region(0, 8 * pmd, pmd, hva)
    vm.set_user_memory_region(1, 16 * pmd + page, pmd - page, hva + page)
    assert vm.guest_access(8 * pmd, 8, Access.WRITE, 1).result == "ok"
    assert vm.guest_access(16 * pmd + 2 * page, 8, Access.READ).value == 0
    sizes = {leaf.gpa: leaf.size for leaf in vm.stage2.for_each_leaf()}
    assert sizes == {8 * pmd: pmd, 16 * pmd + 2 * page: page}


def _vma(pg: PageGeometry, shift: int, size: int) -> Vma:
    return Vma(0x7F00_0000_0000, 0x7F00_0000_0000 + size, VM_HUGETLB | VM_READ | VM_WRITE,
               VmaKind.HUGETLB, pg=pg)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: g.name)
def test_user_mem_abort_switch_on_vma_shift(geometry: PageGeometry,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """``switch (vma_shift)``: PUD kept where the slot allows it (else PMD); CONT_PMD ->
    PMD blocks; PMD kept where allowed; CONT_PTE -> pages with force_pte."""
    pg = geometry
    hva = 0x7F00_0000_0000  # aligned to every size here but 4T
    big = 1 << max(pg.pud_shift, pg.cont_pmd_shift)
    slot = MemorySlot(0, 0, Gfn(hva >> pg.page_shift), big >> pg.page_shift, Hva(hva), 0,
                      page_shift=pg.page_shift)
    cases = {pg.cont_pmd_shift: (pg.pmd_size, False), pg.pmd_shift: (pg.pmd_size, False),
             pg.cont_pte_shift: (pg.page_size, True), pg.page_shift: (pg.page_size, False)}
    if hva % pg.pud_size == 0:
        cases[pg.pud_shift] = (pg.pud_size, False)
    for shift, want in cases.items():
        vma = _vma(pg, shift, big)
        monkeypatch.setattr(Vma, "page_shift", property(lambda self, s=shift: s))
        assert vma_pagesize(UPSTREAM, slot, vma, hva, False) == want, shift
        # logging forces pages whatever the VMA
        assert vma_pagesize(UPSTREAM, slot, vma, hva, True) == (pg.page_size, True)


@pytest.mark.parametrize("geometry", [PAGES_16K, PAGES_64K], ids=lambda g: g.name)
def test_dirty_log_counts_host_pages(geometry: PageGeometry) -> None:
    """The dirty bitmap has one bit per host page and reports absolute gfns in host
    pages; logging maps pages, not blocks."""
    from kvmmem.kvm.dirty_log import kvm_get_dirty_log
    mm = Mm(page_size=geometry, thp="always")
    vm = Vm("arm64", mm=mm)
    pmd, page = geometry.pmd_size, geometry.page_size
    hva = mm.mmap(pmd, RW, "anon")
    gpa = 2 * pmd
    vm.set_user_memory_region(0, gpa, pmd, hva, KVM_MEM_LOG_DIRTY_PAGES)
    for off in (0, 5 * page + 100, 7 * page):
        assert vm.guest_access(gpa + off, 4, Access.WRITE, 1).result == "ok"
    assert kvm_get_dirty_log(vm, 0) == [(gpa >> geometry.page_shift) + i for i in (0, 5, 7)]
    assert {leaf.size for leaf in vm.stage2.for_each_leaf()} == {page}


RACE = """kvmmem: 1
name: race-16k
arch: arm64
page_size: 16K
memory:
  ram: {size: 32K, kind: anon, prot: rw, fill: 0x5a}
memslots:
  - {slot: 0, gpa: 0x0, size: 32K, memory: ram}
threads:
  vcpu:
    - guest_read: {gpa: 0x4000, size: 4}
  host:
    - host_munmap: {memory: ram}
"""


@pytest.mark.parametrize(("variant", "verdict"), [("upstream", "exhausted"),
                                                  ("no-invalidate-retry", "violation")])
def test_the_invariants_hold_and_catch_at_16k(variant: str, verdict: str) -> None:
    """Every interleaving of a fault against munmap with 16 KiB host pages: the
    invalidation retry keeps the fault from installing the freed page; without it the
    stale translation is found (the same race as race-fault-vs-munmap.yaml at 4K)."""
    from kvmmem.explore import SearchParams, explore
    from kvmmem.scenario.loader import load_scenario_text

    found = explore(load_scenario_text(RACE, "race-16k.yaml"), "arm64", variant,
                    SearchParams(strategy="dpor"))
    assert found.verdict == verdict
