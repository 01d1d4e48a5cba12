"""Device memory as VMMs map it, and MTE VMs: the KVM side (kernel-semantics.md §3.2,
§3.3; issue 14).  Each test names the kernel code that decides it; expected values are
the kernel's:

* arm64 ``user_mem_abort``: the memory type of a device page (Device-nGnRE; Normal-NC
  for VM_ALLOW_ANY_UNCACHED since v6.9, 8c47ce3e1d2c), cacheable PFNMAP memory outside
  the linear map (Device before v6.17; Normal write-back with FWB and DIC since
  0c67288e0c8b, EFAULT without), execute permission with CTR_EL0.DIC, the MTE checks
  (VM_SHARED from v5.14, VM_MTE_ALLOWED from v6.2), and the FWB encodings of every type;
* arm64 ``kvm_arch_prepare_memory_region``: the MTE and cacheable-PFNMAP refusals;
* x86 ``kvm_mmu_hugepage_adjust`` / ``host_pfn_mapping_level``: a vfio-pci BAR's PMD
  special leaf (v6.12) gives a 2M SPTE, UC (``kvm_is_mmio_pfn``);
* KVM_ENABLE_CAP(KVM_CAP_ARM_MTE) and KVM_CHECK_EXTENSION.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmmem.arch.arm64 import decode_memattr
from kvmmem.arch.arm64_pte import S2_MEMATTR_MASK, S2_MEMATTR_SHIFT, XN_MASK
from kvmmem.arch.pgtable import MemAttr
from kvmmem.errors import KernelError
from kvmmem.host import PROT_READ, PROT_WRITE
from kvmmem.kvm.arm64 import (
    KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED,
    KVM_CAP_ARM_MTE,
    kvm_vm_ioctl_check_extension,
)
from kvmmem.kvm.dirty_log import kvm_vm_ioctl_enable_cap
from kvmmem.kvm.invariants import validate_vm
from kvmmem.kvm.vcpu import Access
from kvmmem.kvm.vm import Vm

RW = PROT_READ | PROT_WRITE
P = 4096
M2 = 2 << 20
G = 0x4000_0000
HVA = 0x7E00_0000_0000
READ, WRITE, EXEC = Access.READ, Access.WRITE, Access.EXEC


def vm_with(arch: str, kind: str, *, variant: str = "upstream", feats: tuple[str, ...] = (),
            size: int = 4 * M2, mte: bool = False, hva: int = HVA) -> tuple[Vm, int]:
    vm = Vm(arch, variant=variant, cpu_features=feats, mte=mte)
    addr = vm.mm.mmap(size, RW, kind, addr=hva, fixed=True)
    vm.set_user_memory_region(0, G, size, addr, 0)
    return vm, addr


def access(vm: Vm, gpa: int, kind: Access = READ, value: int = 0) -> dict[str, object]:
    out = vm.guest_access(gpa, 4, kind, value).to_outcome()
    validate_vm(vm)
    return out


def memattr_bits(raw: int) -> int:
    return (raw & S2_MEMATTR_MASK) >> S2_MEMATTR_SHIFT


# --- vfio-pci BARs --------------------------------------------------------------------


@pytest.mark.parametrize(("variant", "attr", "bits"), [
    ("6.8", MemAttr.DEVICE, 0b0001), ("6.9", MemAttr.NORMAL_NC, 0b0101),
    ("upstream", MemAttr.NORMAL_NC, 0b0101)])
def test_arm64_vfio_bar_memory_type(variant: str, attr: MemAttr, bits: int) -> None:
    """v6.9 (8c47ce3e1d2c, a39d3a966a09): vfio-pci's VMA is VM_ALLOW_ANY_UNCACHED and
    user_mem_abort maps its device pages KVM_PGTABLE_PROT_NORMAL_NC: MemAttr 0b0101;
    before, Device-nGnRE 0b0001.  Execution stays refused (s2_force_noncacheable)."""
    vm, _hva = vm_with("arm64", "vfio-bar", variant=variant)
    assert access(vm, G + 5 * P) == {"result": "ok", "value": 0}
    leaf = vm.stage2.walk(G + 5 * P)
    assert leaf is not None and leaf.attr is attr and memattr_bits(leaf.raw) == bits
    assert access(vm, G + 6 * P, EXEC) == {"result": "abort", "abort": "prefetch abort"}


def test_arm64_fwb_encodings() -> None:
    """With FEAT_S2FWB the stage-2 MemAttr encodings change (stage2_has_fwb):
    Normal-NC 0b0101 stays, Device-nGnRE 0b0001 stays, Normal-WB becomes 0b0110."""
    vm, hva = vm_with("arm64", "vfio-bar", feats=("fwb",))
    assert vm.stage2.fwb
    access(vm, G)
    leaf = vm.stage2.walk(G)
    assert leaf is not None and memattr_bits(leaf.raw) == 0b0101
    assert decode_memattr(0b0101, True) == (MemAttr.NORMAL_NC, "Normal-NC (FWB)")
    ram = vm.mm.mmap(M2, RW, "anon", fill=1)
    vm.set_user_memory_region(1, 0x8000_0000, M2, ram, 0)
    access(vm, 0x8000_0000)
    leaf = vm.stage2.walk(0x8000_0000)
    assert leaf is not None and memattr_bits(leaf.raw) == 0b0110
    assert "Normal-WB (FWB)" in vm.stage2.describe_entry(leaf.raw, leaf.level)
    del hva


@pytest.mark.parametrize(("variant", "offset", "x86_size"), [
    ("6.11", 0, P), ("6.12", 0, M2), ("6.12", 5 * P, P), ("upstream", 5 * P, M2)])
def test_x86_vfio_bar_level_follows_the_host_leaf(variant: str, offset: int,
                                                  x86_size: int) -> None:
    """x86 kvm_mmu_hugepage_adjust -> host_pfn_mapping_level reads the host's PMD leaf:
    vfio-pci inserts one from v6.12 (f9e54c3a2f5b), at a fault on the 2M boundary only
    until v6.15 (c1d9dac0db16 aligns it down); the SPTE is UC (no IPAT)."""
    vm, hva = vm_with("x86", "vfio-bar", variant=variant)
    assert access(vm, G + offset, WRITE, 0x77) == {"result": "ok"}
    leaf = vm.stage2.walk(G + offset)
    assert leaf is not None and leaf.size == x86_size and leaf.attr is MemAttr.DEVICE
    assert vm.mm.mapping_size(hva + offset) == x86_size
    assert vm.mm.host_read(hva + offset, 4) == 0x77


@pytest.mark.parametrize(("variant", "offset", "size"), [
    ("6.11", 0, P), ("6.12", 0, 1 << 30), ("6.12", 0x5000, P), ("upstream", 0x5000, 1 << 30)])
def test_x86_vfio_bar_1g_spte_from_a_pud_leaf(variant: str, offset: int, size: int) -> None:
    """x86 host_pfn_mapping_level reads a PUD special leaf too (v6.12): a 1 GiB BAR at a
    1 GiB-aligned address behind a 1 GiB-aligned slot gets a 1G SPTE (pages_1g), as on
    real x86 6.12 and 7.x; 6.11's 4K PTEs give 4K SPTEs.  Until v6.15 a fault that is
    not at the PUD's start inserts a page."""
    vm, hva = vm_with("x86", "vfio-bar", variant=variant, size=1 << 30,
                      hva=0x7E00_0000_0000)
    assert access(vm, G + offset, WRITE, 3) == {"result": "ok"}
    leaf = vm.stage2.walk(G + offset)
    assert leaf is not None and leaf.size == size and leaf.attr is MemAttr.DEVICE
    assert vm.stats.pages_1g == (1 if size == 1 << 30 else 0)
    assert vm.mm.host_read(hva + offset, 4) == 3


@pytest.mark.parametrize(("variant", "size"), [("6.11", M2), ("7.2", M2), ("7.3", M2),
                                                ("debian-6.12", M2)])
def test_arm64_vfio_bar_block(variant: str, size: int) -> None:
    """arm64 sizes a VM_PFNMAP fault from the VMA until the 7.3-cycle fix: with the
    post-v6.10 vm_pgoff (region offset 0) get_vma_page_shift's guessed address is
    congruent with the hva whenever vm_start is 2M aligned, so a 2M Normal-NC block
    whatever the host's leaves (6.11: 4K PTEs).  After the fix (7.3, Debian 6.12.117)
    the host's leaf sizes it: vfio-pci's PMD special leaf (v6.12), the same 2M block,
    as real arm64 6.12.117, 7.2 and 7.3 show (one fault per 2 MiB)."""
    vm, hva = vm_with("arm64", "vfio-bar", variant=variant)
    assert access(vm, G + 5 * P) == {"result": "ok", "value": 0}
    leaf = vm.stage2.walk(G + 5 * P)
    assert leaf is not None and leaf.size == size
    assert leaf.pfn == vm.mm.follow_pfnmap(hva + 5 * P)[0]
    assert access(vm, G + 511 * P) == {"result": "ok", "value": 0}
    assert vm.stats.pf_fixed == 1


@pytest.mark.parametrize(("variant", "size"), [("7.2", M2), ("7.3", P)])
def test_arm64_pfnmap_behind_ptes_after_the_fix(variant: str, size: int) -> None:
    """A VM_PFNMAP VMA whose host mapping is 4K PTEs (``remap_pfn_range`` at mmap, kind
    ``device``), at a 2M-aligned address with a congruent vm_pgoff: the VMA guess maps a
    2M block until the fix (7.2), the host's PTE maps one page after it (7.3)."""
    vm, hva = vm_with("arm64", "device", variant=variant)
    vma = vm.mm.vma_lookup(hva)
    assert vma is not None and (vma.pgoff << 12) % M2 == 0
    assert access(vm, G + 5 * P) == {"result": "ok", "value": 0}
    leaf = vm.stage2.walk(G + 5 * P)
    assert leaf is not None and leaf.size == size
    assert vm.mm.mapping_size(hva + 5 * P) == P


# --- cacheable device memory ------------------------------------------------------------


@pytest.mark.parametrize(("variant", "feats", "slot", "attr"), [
    ("6.16", (), "ok", MemAttr.DEVICE),
    ("6.16", ("fwb", "dic"), "ok", MemAttr.DEVICE),
    ("6.17", (), "EINVAL", None),
    ("6.17", ("fwb",), "EINVAL", None),
    ("6.17", ("dic",), "EINVAL", None),
    ("6.17", ("fwb", "dic"), "ok", MemAttr.NORMAL)])
def test_arm64_device_cacheable(variant: str, feats: tuple[str, ...], slot: str,
                                attr: MemAttr | None) -> None:
    """Grace-style cacheable device memory: since v6.17 prepare refuses its slot without
    FWB and DIC (2a8dfab26677) and with both user_mem_abort maps it Normal write-back
    (0c67288e0c8b), executable at once (DIC); before, it is device memory."""
    vm = Vm("arm64", variant=variant, cpu_features=feats)
    hva = vm.mm.mmap(M2, RW, "device-cacheable", addr=HVA, fixed=True)
    if slot != "ok":
        with pytest.raises(KernelError) as err:
            vm.set_user_memory_region(0, G, M2, hva, 0)
        assert err.value.errno == slot
        return
    vm.set_user_memory_region(0, G, M2, hva, 0)
    assert access(vm, G + P, WRITE, 9) == {"result": "ok"}
    leaf = vm.stage2.walk(G + P)
    assert leaf is not None and leaf.attr is attr
    assert bool(leaf.raw & XN_MASK) == (attr is not MemAttr.NORMAL)


def test_arm64_cacheable_pfnmap_fault_is_efault_without_fwb_dic() -> None:
    """The same memory mapped behind an accepted slot (MAP_FIXED after creation) is
    refused at the fault: user_mem_abort returns -EFAULT (v6.17)."""
    vm, hva = vm_with("arm64", "anon", size=M2)
    vm.mm.mmap(M2, RW, "device-cacheable", addr=hva, fixed=True)
    assert access(vm, G) == {"result": "fault"}


def test_x86_maps_device_cacheable_uc() -> None:
    """x86 make_spte -> kvm_is_mmio_pfn: a pfn outside e820 RAM is host MMIO, UC."""
    vm, _ = vm_with("x86", "device-cacheable", size=M2)
    assert access(vm, G) == {"result": "ok", "value": 0}
    leaf = vm.stage2.walk(G)
    assert leaf is not None and leaf.attr is MemAttr.DEVICE


@pytest.mark.parametrize(("variant", "dic", "exec_bit"), [
    ("5.9", True, False), ("5.10", True, True), ("upstream", False, False),
    ("upstream", True, True)])
def test_arm64_dic_makes_cacheable_memory_executable(variant: str, dic: bool,
                                                     exec_bit: bool) -> None:
    """user_mem_abort adds KVM_PGTABLE_PROT_X to a cacheable mapping when the CPU has
    CTR_EL0.DIC (v5.10, the generic page-table conversion); before, only an instruction
    fetch fault makes a page executable."""
    vm, _ = vm_with("arm64", "anon", variant=variant, feats=("dic",) if dic else (),
                    size=M2)
    access(vm, G, WRITE, 1)
    leaf = vm.stage2.walk(G)
    assert leaf is not None and leaf.perm.execute == exec_bit


# --- MTE -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("variant", "kind", "slot", "fault"), [
    ("6.1", "anon", "ok", "ok"), ("6.1", "file", "ok", "ok"),
    ("6.1", "memfd", "EINVAL", None), ("6.1", "hugetlb", "ok", "ok"),
    ("upstream", "anon", "ok", "ok"), ("upstream", "memfd", "ok", "ok"),
    ("upstream", "hugetlb", "ok", "ok"), ("upstream", "file", "EINVAL", None),
    ("upstream", "file-shared", "EINVAL", None), ("upstream", "vfio-bar", "EINVAL", None),
    ("upstream", "dmabuf", "EINVAL", None), ("debian-6.12", "hugetlb", "EINVAL", None)])
def test_mte_vm_slots(variant: str, kind: str, slot: str, fault: str | None) -> None:
    """kvm_arch_prepare_memory_region of an MTE VM: v5.14 refuses VM_SHARED VMAs, v6.2
    every VMA without VM_MTE_ALLOWED (anon, shmem, mainline hugetlb have it)."""
    vm = Vm("arm64", variant=variant, cpu_features=("mte",), mte=True)
    hva = vm.mm.mmap(M2, RW, kind, addr=HVA, fixed=True)
    if slot != "ok":
        with pytest.raises(KernelError) as err:
            vm.set_user_memory_region(0, G, M2, hva, 0)
        assert err.value.errno == slot
        return
    vm.set_user_memory_region(0, G, M2, hva, 0)
    assert access(vm, G, WRITE, 5)["result"] == fault


@pytest.mark.parametrize(("variant", "replacement", "result"), [
    ("6.1", "file", "ok"), ("6.1", "file-shared", "fault"), ("upstream", "file", "fault"),
    ("upstream", "memfd", "ok")])
def test_mte_fault_on_a_replaced_vma(variant: str, replacement: str, result: str) -> None:
    """user_mem_abort re-checks the VMA for an MTE VM ("Check the VMM hasn't introduced a
    new disallowed VMA"): EFAULT for VM_SHARED (v5.14) / without VM_MTE_ALLOWED (v6.2)."""
    vm, hva = vm_with("arm64", "anon", variant=variant, feats=("mte",), mte=True, size=M2)
    vm.mm.mmap(M2, RW, replacement, addr=hva, fixed=True, fill=3)
    assert access(vm, G)["result"] == result


@pytest.mark.parametrize(("variant", "feats", "flags", "errno"), [
    ("upstream", ("mte",), 0, None), ("upstream", ("mte",), 1, "EINVAL"),
    ("upstream", (), 0, "EINVAL"), ("5.13", ("mte",), 0, "EINVAL")])
def test_enable_mte(variant: str, feats: tuple[str, ...], flags: int, errno: str | None) -> None:
    """kvm_vm_ioctl_enable_cap(KVM_CAP_ARM_MTE): flags must be 0, the CPU must have MTE,
    no vCPU may exist yet; before v5.14 the capability is unknown (EINVAL)."""
    vm = Vm("arm64", variant=variant, cpu_features=feats, vcpus=1)
    vm.created_vcpus = 0  # as right after KVM_CREATE_VM
    if errno is None:
        kvm_vm_ioctl_enable_cap(vm, KVM_CAP_ARM_MTE, flags, ())
        assert vm.mte_enabled
    else:
        with pytest.raises(KernelError) as err:
            kvm_vm_ioctl_enable_cap(vm, KVM_CAP_ARM_MTE, flags, ())
        assert err.value.errno == errno
    vm.created_vcpus = 1
    with pytest.raises(KernelError, match="EINVAL"):
        kvm_vm_ioctl_enable_cap(vm, KVM_CAP_ARM_MTE, 0, ())
    x86 = Vm("x86", cpu_features=("mte",))
    x86.created_vcpus = 0
    with pytest.raises(KernelError, match="EINVAL"):
        kvm_vm_ioctl_enable_cap(x86, KVM_CAP_ARM_MTE, 0, ())


@pytest.mark.parametrize(("variant", "feats", "mte", "cacheable"), [
    ("upstream", ("mte", "fwb", "dic"), 1, 1), ("upstream", ("fwb",), 0, 0),
    ("6.16", ("fwb", "dic"), 0, 0), ("5.13", ("mte",), 0, 0)])
def test_check_extension(variant: str, feats: tuple[str, ...], mte: int,
                         cacheable: int) -> None:
    """KVM_CHECK_EXTENSION: KVM_CAP_ARM_MTE is system_supports_mte() (v5.14),
    KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED kvm_supports_cacheable_pfnmap() (v6.17)."""
    vm = Vm("arm64", variant=variant, cpu_features=feats)
    assert kvm_vm_ioctl_check_extension(vm, KVM_CAP_ARM_MTE) == mte
    assert kvm_vm_ioctl_check_extension(vm, KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED) == cacheable


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["read", "write", "exec", "munmap",
                                                "mprotect_r", "mprotect_rw"]),
                              st.integers(0, 1023)), min_size=1, max_size=12),
       arch=st.sampled_from(["x86", "arm64"]),
       variant=st.sampled_from(["6.11", "6.12", "6.15", "upstream"]))
def test_vfio_bar_sequences_keep_the_invariants(ops: list[tuple[str, int]], arch: str,
                                                variant: str) -> None:
    """Random guest accesses and host munmap/mprotect over a vfio-pci BAR: after every
    step the stage-2 maps exactly what the host maps (no stale translation), device
    memory stays uncached, and a completed read returns what the host reads there."""
    vm, hva = vm_with(arch, "vfio-bar", variant=variant)
    for op, page in ops:
        gpa, addr = G + page * P, hva + page * P
        if op == "munmap":
            vm.mm.munmap(addr, P)
        elif op.startswith("mprotect"):
            if vm.mm.vma_lookup(addr) is not None:
                vm.mm.mprotect(addr, P, RW if op == "mprotect_rw" else PROT_READ)
        else:
            kind = {"read": READ, "write": WRITE, "exec": EXEC}[op]
            out = vm.guest_access(gpa, 4, kind, page).to_outcome()
            if op == "read" and out["result"] == "ok":
                assert out["value"] == vm.mm.host_read(addr, 4)
        validate_vm(vm)


@pytest.mark.parametrize(("variant", "offset", "size"), [
    ("7.3", 0, M2), ("debian-6.12", 0, M2), ("7.3", P, P), ("debian-6.12", P, P)])
def test_arm64_pfnmap_block_follows_the_host_leaf(variant: str, offset: int,
                                                  size: int) -> None:
    """Since "Don't use the VMA to size stage-2 block mappings for VM_PFNMAP" the host's
    leaf sizes the block: a vfio BAR mapped at a 2M-aligned hva gets PMD special leaves
    and 2M blocks, one mapped 4K off gets 4K PTEs and 4K pages (huge_fault cannot
    align the pfn with the address).  Real arm64 6.12.117 and 7.3: one stage-2 fault
    per 2 MiB (docs/findings.md 14)."""
    vm = Vm("arm64", variant=variant)
    hole = vm.mm.mmap(3 * M2, RW, "anon", addr=HVA, fixed=True)
    hva = vm.mm.mmap(M2, RW, "vfio-bar", addr=hole + offset, fixed=True)
    vm.set_user_memory_region(0, G, M2, hva, 0)
    assert access(vm, G + 5 * P) == {"result": "ok", "value": 0}
    assert vm.mm.mapping_size(hva + 5 * P) == size
    leaf = vm.stage2.walk(G + 5 * P)
    assert leaf is not None and leaf.size == size and leaf.attr is MemAttr.NORMAL_NC
