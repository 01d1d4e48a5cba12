"""Fault-path policy per architecture: block size, memory type, permissions.

kernel-semantics.md §3.2 (arm64 ``user_mem_abort``), §3.3.3 (x86
``kvm_mmu_hugepage_adjust``), §3.4 (riscv ``kvm_riscv_mmu_map``) and §6.
"""

from __future__ import annotations

import inspect

import pytest

from kvmmem.arch import ARCHES, MemAttr, Perm, arm64, make_stage2, riscv, x86
from kvmmem.errors import KernelError

K4, M2, G1 = 4096, 2 << 20, 1 << 30
HVA = 0x7F00_0000_0000  # 1G aligned


def test_registry_has_the_three_architectures_with_uniform_policy() -> None:
    assert list(ARCHES) == ["x86", "arm64", "riscv"]
    for name, info in ARCHES.items():
        assert make_stage2(name).arch == name
        assert isinstance(make_stage2(name), info.stage2)
        params = list(inspect.signature(info.max_mapping_size).parameters)[:8]
        assert params == ["gfn", "hva", "slot_base_gfn", "slot_npages", "slot_hva",
                          "host_map_size", "logging", "is_device"]
        # a 4K-backed RAM fault maps a page everywhere
        assert info.max_mapping_size(0x80000, HVA, 0x80000, 512, HVA, K4, False, False) == K4
        assert info.memory_attr(False) is MemAttr.NORMAL
        assert info.fault_prot(True, False, False).write
    assert ARCHES["arm64"].break_before_make and ARCHES["arm64"].frees_empty_tables
    assert not ARCHES["x86"].break_before_make


# --- arm64 -----------------------------------------------------------------------------


def test_arm64_fault_supports_stage2_huge_mapping() -> None:
    """gpa and hva congruent modulo the block; the block inside the slot."""
    ok = arm64.fault_supports_stage2_huge_mapping
    assert ok(0x80000, 0x1000, HVA, HVA + 0x5000, M2)
    assert ok(0x80000, 0x1000, HVA, HVA + 0x5000, K4)
    assert not ok(0x80000, 0x1000, HVA + K4, HVA + M2 + 0x5000, M2)  # not congruent
    assert not ok(0x80000, 0x100, HVA, HVA + 0x5000, M2)  # slot smaller than the block
    assert not ok(0x80001, 0x1000, HVA + K4, HVA + 0x5000, M2)  # first block leaves the slot
    assert ok(0x80001, 0x1000, HVA + K4, HVA + M2, M2)


def test_arm64_user_mem_abort_sizes() -> None:
    """Current ``user_mem_abort``: logging forces pages; hugetlb cascade
    PUD -> PMD -> page; THP -> PMD via ``transparent_hugepage_adjust``;
    PFNMAP keeps the ``get_vma_page_shift`` estimate and is never THP-adjusted."""
    size = arm64.max_mapping_size
    gfn = G1 >> 12
    # 2G slot at gpa 1G, hva 1G aligned
    slot = (G1 >> 12, (2 * G1) >> 12, HVA)
    assert size(gfn, HVA, *slot, G1, False, False, hugetlb=True) == G1
    assert size(gfn, HVA, *slot, G1, True, False, hugetlb=True) == K4
    assert size(gfn, HVA, *slot, M2, False, False) == M2  # THP
    assert size(gfn, HVA, *slot, K4, False, False) == K4
    assert size(gfn, HVA, *slot, G1, False, True) == G1  # huge PFNMAP (current)
    assert size(gfn, HVA, *slot, M2, False, True) == M2
    # a 1G hugetlb page in a slot that cannot hold a 1G block -> 2M
    small = (G1 >> 12, (G1 // 2) >> 12, HVA)
    assert size(gfn, HVA, *small, G1, False, False, hugetlb=True) == M2
    # cont-PTE hugetlb (64K) -> page, and no THP promotion
    assert size(gfn, HVA, *slot, 64 << 10, False, False, hugetlb=True) == K4
    # max_size caps to what the table has (2-level stage-2: no 1G blocks)
    assert size(gfn, HVA, *slot, G1, False, False, hugetlb=True, max_size=M2) == M2


def test_arm64_linux_5_4_rules() -> None:
    """v5.4: VM_PFNMAP forces pages; a hugetlb size failing the slot check
    falls straight to a page; THP still gives PMD."""
    size = arm64.max_mapping_size
    gfn = G1 >> 12
    slot = (G1 >> 12, (2 * G1) >> 12, HVA)
    small = (G1 >> 12, (G1 // 2) >> 12, HVA)
    assert size(gfn, HVA, *slot, M2, False, True, linux_5_4=True) == K4
    assert size(gfn, HVA, *small, G1, False, False, hugetlb=True, linux_5_4=True) == K4
    assert size(gfn, HVA, *slot, M2, False, False, linux_5_4=True) == M2


def test_arm64_get_vma_page_shift_for_pfnmap() -> None:
    """``get_vma_page_shift``: PUD/PMD when the pfn estimated from vm_pgoff is
    congruent with the hva and the aligned block fits the VMA."""
    shift = arm64.get_vma_page_shift
    assert shift(HVA + 0x3000, HVA, HVA + 2 * G1, G1 >> 12, pfnmap=True) == 30
    assert shift(HVA + 0x3000, HVA, HVA + 4 * M2, M2 >> 12, pfnmap=True) == 21
    assert shift(HVA + 0x3000, HVA, HVA + 4 * M2, 1, pfnmap=True) == 12
    assert shift(HVA, HVA, HVA + M2, 0, hugetlb_shift=21) == 21
    assert shift(HVA, HVA, HVA + M2, 0) == 12


def test_arm64_memory_attr_and_permissions() -> None:
    """Device memory: Device-nGnRE, or Normal-NC with VM_ALLOW_ANY_UNCACHED;
    an exec fault on it is -ENOEXEC; X on exec faults or with DIC."""
    assert arm64.memory_attr(True) is MemAttr.DEVICE
    assert arm64.memory_attr(True, allow_any_uncached=True) is MemAttr.NORMAL_NC
    assert arm64.memory_attr(False) is MemAttr.NORMAL
    with pytest.raises(KernelError) as err:
        arm64.fault_prot(True, True, True)
    assert err.value.errno == "ENOEXEC"
    assert arm64.fault_prot(False, False, False) == Perm(True, False, False)
    assert arm64.fault_prot(True, True, False) == Perm(True, True, True)
    assert arm64.fault_prot(True, False, False, dic=True) == Perm(True, True, True)
    assert arm64.fault_prot(True, False, True, dic=True) == Perm(True, True, False)


# --- x86 -------------------------------------------------------------------------------


def test_x86_lpage_info_geometry_kvm_alloc_memslot_metadata() -> None:
    """Misaligned slot head/tail frames and gfn/hva incongruence disallow
    huge pages."""
    dis = x86.lpage_disallowed
    assert not dis(0x200, 0x200, 0x400, HVA, x86.PG_LEVEL_2M)
    assert dis(0x201, 0x201, 0x400, HVA + K4, x86.PG_LEVEL_2M)  # head frame
    assert not dis(0x400, 0x201, 0x400, HVA + K4, x86.PG_LEVEL_2M)
    assert dis(0x600, 0x201, 0x400, HVA + K4, x86.PG_LEVEL_2M)  # tail frame
    assert dis(0x400, 0x200, 0x400, HVA + K4, x86.PG_LEVEL_2M)  # incongruent


def test_x86_kvm_mmu_hugepage_adjust() -> None:
    """Dirty tracking -> 4K; else min(host level, lpage_info, max level);
    device memory is not special; NX huge pages -> 4K for exec faults."""
    size = x86.max_mapping_size
    slot = (G1 >> 12, (2 * G1) >> 12, HVA)
    gfn = G1 >> 12
    assert size(gfn, HVA, *slot, G1, False, False) == G1
    assert size(gfn, HVA, *slot, G1, False, True) == G1
    assert size(gfn, HVA, *slot, G1, True, False) == K4
    assert size(gfn, HVA, *slot, M2, False, False) == M2
    assert size(gfn, HVA, *slot, G1, False, False, max_level=x86.PG_LEVEL_2M) == M2
    assert size(gfn, HVA, *slot, G1, False, False, nx_huge_pages=True, exec_fault=True) == K4
    assert size(gfn, HVA + K4, G1 >> 12, (2 * G1) >> 12, HVA + K4, G1, False, False) == K4
    assert x86.memory_attr(True) is MemAttr.DEVICE
    assert x86.fault_prot(False) == Perm(True, False, True)
    assert x86.fault_prot(True, huge=True, nx_huge_pages=True) == Perm(True, True, False)


# --- riscv ---------------------------------------------------------------------------------


def test_riscv_kvm_riscv_mmu_map_sizes() -> None:
    """Logging or VM_PFNMAP -> page; hugetlb through ``hugetlb_mapping_size``;
    THP (late 2025) -> PMD; other hugetlb sizes come back unchanged (the
    caller fails with -EFAULT)."""
    size = riscv.max_mapping_size
    slot = (G1 >> 12, (2 * G1) >> 12, HVA)
    small = (G1 >> 12, (G1 // 2) >> 12, HVA)
    gfn = G1 >> 12
    assert size(gfn, HVA, *slot, G1, False, False, hugetlb=True) == G1
    assert size(gfn, HVA, *small, G1, False, False, hugetlb=True) == M2
    assert size(gfn, HVA, *slot, G1, True, False, hugetlb=True) == K4
    assert size(gfn, HVA, *slot, M2, False, True) == K4
    assert size(gfn, HVA, *slot, M2, False, False) == M2
    assert size(gfn, HVA, *slot, M2, False, False, thp=False) == K4
    assert size(gfn, HVA, *slot, 64 << 10, False, False, hugetlb=True) == 64 << 10
    assert riscv.fault_supports_gstage_huge_mapping(*slot, HVA + 5 * M2, M2)
    assert not riscv.fault_supports_gstage_huge_mapping(*slot, HVA + 2 * G1, M2)


def test_riscv_attributes_and_permissions() -> None:
    """The fault path derives no memory type; the v5.16..v6.17 prepare-time
    ioremap mapped device memory PBMT=IO without X."""
    assert riscv.memory_attr(True) is MemAttr.NORMAL
    assert riscv.memory_attr(True, ioremap=True) is MemAttr.DEVICE
    assert riscv.fault_prot(False) == Perm(True, False, True)
    assert riscv.fault_prot(True, ioremap=True) == Perm(True, True, False)
