"""The stage-2 fault policy, in its one copy: the functions the fault paths call.

arm64 ``user_mem_abort`` (:func:`kvmmem.kvm.arm64.vma_pagesize`,
``get_vma_page_shift``), riscv ``kvm_riscv_mmu_map``
(:func:`kvmmem.kvm.riscv.gstage_mapping_size`), x86 ``kvm_mmu_hugepage_adjust``
(``lpage_disallowed``, ``X86Kvm.hugepage_adjust``) and what arm64 and riscv share
(``fault_supports_stage2_huge_mapping``, ``transparent_hugepage_adjust``);
kernel-semantics.md §3.2-§3.4.  The versioned rules (``arm64_pfnmap_vma_block``,
``arm64_pfnmap_force_pte``, ``riscv_hugetlb_lookup``) are checked per variant.
"""

from __future__ import annotations

from kvmmem.host import PROT_READ, PROT_WRITE
from kvmmem.host.vma import VM_HUGETLB, VM_IO, VM_PFNMAP, VM_READ, VM_WRITE, Vma, VmaKind
from kvmmem.kvm.arch_common import fault_supports_stage2_huge_mapping
from kvmmem.kvm.arm64 import get_vma_page_shift, vma_pagesize
from kvmmem.kvm.memslot import MemorySlot
from kvmmem.kvm.riscv import gstage_mapping_size
from kvmmem.kvm.vcpu import Access
from kvmmem.kvm.vm import Vm
from kvmmem.kvm.x86 import lpage_disallowed
from kvmmem.types import Gfn, Hva
from kvmmem.variants import get_variant

K4, M2, G1 = 4096, 2 << 20, 1 << 30
HVA = 0x7F00_0000_0000  # 1G aligned


def slot(base_gfn: int, npages: int, hva: int) -> MemorySlot:
    return MemorySlot(0, 0, Gfn(base_gfn), npages, Hva(hva), 0)


def vma(start: int, end: int, flags: int, kind: VmaKind, pgoff: int = 0) -> Vma:
    return Vma(start, end, flags | VM_READ | VM_WRITE, kind, pgoff=pgoff)


def test_fault_supports_stage2_huge_mapping() -> None:
    """gpa and hva congruent modulo the block; the block inside the slot (riscv's
    ``fault_supports_gstage_huge_mapping`` is the same rule)."""
    ok = fault_supports_stage2_huge_mapping
    assert ok(slot(0x80000, 0x1000, HVA), HVA + 0x5000, M2)
    assert ok(slot(0x80000, 0x1000, HVA), HVA + 0x5000, K4)
    assert not ok(slot(0x80000, 0x1000, HVA + K4), HVA + M2 + 0x5000, M2)  # not congruent
    assert not ok(slot(0x80000, 0x100, HVA), HVA + 0x5000, M2)  # slot smaller than the block
    assert not ok(slot(0x80001, 0x1000, HVA + K4), HVA + 0x5000, M2)  # first block leaves it
    assert ok(slot(0x80001, 0x1000, HVA + K4), HVA + M2, M2)


def test_arm64_get_vma_page_shift() -> None:
    """VM_PFNMAP: PUD/PMD when the pfn estimated from vm_pgoff is congruent with the
    hva and the aligned block fits the VMA; hugetlb: the hstate; else a page."""
    dev = VM_IO | VM_PFNMAP
    assert get_vma_page_shift(vma(HVA, HVA + 2 * G1, dev, VmaKind.DEVICE, G1 >> 12),
                              HVA + 0x3000) == 30
    assert get_vma_page_shift(vma(HVA, HVA + 4 * M2, dev, VmaKind.DEVICE, M2 >> 12),
                              HVA + 0x3000) == 21
    assert get_vma_page_shift(vma(HVA, HVA + 4 * M2, dev, VmaKind.DEVICE, 1), HVA + 0x3000) == 12
    assert get_vma_page_shift(vma(HVA, HVA + M2, VM_HUGETLB, VmaKind.HUGETLB), HVA) == 21
    assert get_vma_page_shift(vma(HVA, HVA + M2, 0, VmaKind.ANON), HVA) == 12


def test_arm64_vma_pagesize_by_release() -> None:
    """Logging forces pages; a hugetlb block the slot cannot hold falls to a page
    (force_pte); VM_PFNMAP: pages before v5.14, the VMA estimate from v5.14 until
    the 7.3-cycle fix, then the host page table (a page here, THP-style below)."""
    up, v510, v54 = (get_variant(v) for v in ("upstream", "5.14", "linux-5.4"))
    big = slot(G1 >> 12, (2 * G1) >> 12, HVA)
    huge = vma(HVA, HVA + 4 * M2, VM_HUGETLB, VmaKind.HUGETLB)
    assert vma_pagesize(up, big, huge, HVA, False) == (M2, False)
    assert vma_pagesize(up, big, huge, HVA, True) == (K4, True)
    assert vma_pagesize(up, slot(G1 >> 12, 16, HVA), huge, HVA, False) == (K4, True)
    dev = vma(HVA, HVA + 4 * M2, VM_IO | VM_PFNMAP, VmaKind.DEVICE, M2 >> 12)
    assert not up.arm64_pfnmap_vma_block and v510.arm64_pfnmap_vma_block
    assert vma_pagesize(up, big, dev, HVA, False) == (K4, False)
    assert vma_pagesize(v510, big, dev, HVA, False) == (M2, False)
    assert vma_pagesize(v54, big, dev, HVA, False) == (K4, True)


def test_riscv_gstage_mapping_size_by_release() -> None:
    """Logging or VM_PFNMAP: a page; a hugetlb VMA's size kept whatever the slot
    (before v7.2) or cut to what the slot allows (49476d58f217)."""
    up, v612 = get_variant("upstream"), get_variant("6.12")
    huge = vma(HVA, HVA + 4 * M2, VM_HUGETLB, VmaKind.HUGETLB)
    small = slot(G1 >> 12, 16, HVA)
    assert gstage_mapping_size(up, slot(G1 >> 12, 2048, HVA), huge, HVA, False) == M2
    assert gstage_mapping_size(up, small, huge, HVA, False) == K4
    assert gstage_mapping_size(v612, small, huge, HVA, False) == M2
    assert gstage_mapping_size(up, slot(G1 >> 12, 2048, HVA), huge, HVA, True) == K4
    dev = vma(HVA, HVA + 4 * M2, VM_IO | VM_PFNMAP, VmaKind.DEVICE, M2 >> 12)
    assert gstage_mapping_size(up, slot(G1 >> 12, 2048, HVA), dev, HVA, False) == K4


def test_x86_lpage_info_geometry() -> None:
    """``kvm_alloc_memslot_metadata``: misaligned head/tail frames and gfn/hva
    incongruence disallow a huge page."""
    assert not lpage_disallowed(slot(0x200, 0x400, HVA), 0x200, M2)
    assert lpage_disallowed(slot(0x201, 0x400, HVA + K4), 0x201, M2)  # head frame
    assert not lpage_disallowed(slot(0x201, 0x400, HVA + K4), 0x400, M2)
    assert lpage_disallowed(slot(0x201, 0x400, HVA + K4), 0x600, M2)  # tail frame
    assert lpage_disallowed(slot(0x200, 0x400, HVA + K4), 0x400, M2)  # incongruent


def test_hugepage_adjust_from_the_host_mapping() -> None:
    """A THP behind the slot maps a 2M block on every architecture
    (``kvm_mmu_hugepage_adjust`` / ``transparent_hugepage_adjust``); under dirty
    logging a page; device memory is never THP-adjusted on arm64."""
    for arch in ("x86", "arm64", "riscv"):
        for flags, size in ((0, M2), (1, K4)):
            vm = Vm(arch)
            hva = vm.mm.mmap(4 * M2, PROT_READ | PROT_WRITE, "thp", fill=1)
            vm.set_user_memory_region(0, G1, 4 * M2, hva, flags)
            assert vm.guest_access(G1 + M2 + 0x10, 4, Access.READ).result == "ok"
            leaf = vm.stage2.walk(G1 + M2)
            assert leaf is not None and leaf.size == size, (arch, flags)
