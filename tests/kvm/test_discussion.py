"""The cases of the November 2019 "Memory regions and VMAs across architectures"
discussion (linux-arm-kernel / kvm), as issue 4 lists them:

* a writable slot, then a read-only VMA put over it: later guest writes fail
  with EFAULT on every architecture (upstream) - the fault path re-checks the
  VMA (``hva_to_pfn`` -> KVM_PFN_ERR_FAULT), nothing at creation time matters;
* under ``linux-5.4`` the same slot *created* over a read-only VMA fails with
  EPERM on arm64 (v5.4 ``kvm_arch_prepare_memory_region``: writable slot over a
  VMA without VM_WRITE, removed in v5.5), so two histories that reach the same
  state disagree, and the path-independence invariant reports it.  RISC-V
  copied that check and upstream still has it (kernel-semantics.md §2.4), so
  the EPERM history applies to riscv upstream too;
* a VM_PFNMAP region premapped at creation (``linux-5.4`` arm64
  ``kvm_phys_addr_ioremap``; riscv ``kvm_riscv_gstage_ioremap`` before v6.18)
  against faulted in (upstream ``user_mem_abort`` / ``kvm_riscv_mmu_map`` ->
  ``hva_to_pfn_remapped``), with the faults taken and mappings made by each;
* munmap of that region afterwards leaves no device mapping in either (the MMU
  notifier zaps both, ``kvm_unmap_gfn_range``).
"""

from __future__ import annotations

from typing import Any

import pytest

from kvmmem.arch.pgtable import MemAttr
from kvmmem.errors import KernelError
from kvmmem.host import PROT_READ, PROT_WRITE
from kvmmem.kvm.invariants import validate_path_independence, validate_vm
from kvmmem.kvm.memslot import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY
from kvmmem.kvm.vcpu import Access
from kvmmem.kvm.vm import Vm
from kvmmem.scenario.loader import load_scenario_text
from kvmmem.scenario.runner import run_scenario

ARCHES = ("x86", "arm64", "riscv")
VARIANTS = ("upstream", "linux-5.4")
P = 4096
G = 0x4000_0000
SIZE = 16 * P
RW = PROT_READ | PROT_WRITE
READ, WRITE = Access.READ, Access.WRITE


def era(arch: str, variant: str) -> str:
    """The variant a test runs: riscv KVM did not exist in v5.4 (merged in v5.16), so its
    2019-era code (the copied prepare-time walk and premap) is tested at 6.12, the last
    riscv release before the premap was removed (v6.18)."""
    return "6.12" if arch == "riscv" and variant == "linux-5.4" else variant


def eperm_at_create(arch: str, variant: str) -> bool:
    """Does ``kvm_arch_prepare_memory_region`` refuse a writable slot over a VMA without
    VM_WRITE?  arm64 only in v5.4 (removed v5.5); RISC-V always (§2.4); x86 never."""
    return arch == "riscv" or (arch == "arm64" and variant == "linux-5.4")


def access(vm: Vm, gpa: int, size: int, kind: Access, value: int = 0) -> dict[str, Any]:
    out = vm.guest_access(gpa, size, kind, value).to_outcome()
    validate_vm(vm)
    return out


# --- case 1: writable slot, then a read-only VMA over it --------------------------------


@pytest.mark.parametrize("how", ["map_fixed_readonly", "mprotect_readonly"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", ARCHES)
def test_writable_slot_then_readonly_vma_writes_efault(arch: str, variant: str,
                                                       how: str) -> None:
    """History A: slot created writable over a rw memfd, the guest writes, then userspace
    replaces the VMA by a read-only one (MAP_FIXED PROT_READ memfd, or mprotect).  The
    notifier zapped the writable leaf; reads see the current mapping; writes: FOLL_WRITE
    GUP fails, the VMA lacks VM_WRITE -> KVM_PFN_ERR_FAULT -> -EFAULT on every
    architecture (§3.5.2 none/write/"VMA PROT_READ")."""
    vm = Vm(arch, variant=era(arch, variant))
    hva = vm.mm.mmap(SIZE, RW, "memfd", fill=0x11)
    vm.set_user_memory_region(0, G, SIZE, hva)
    assert access(vm, G + P, 4, WRITE, 0xAA) == {"result": "ok"}
    if how == "map_fixed_readonly":
        f = vm.mm.memfd_create("ro", SIZE)
        vm.mm.mmap(SIZE, RW, "memfd", file=f, addr=hva, fixed=True, fill=0x5A)
        vm.mm.mprotect(hva, SIZE, PROT_READ)
        seen = 0x5A5A5A5A
    else:
        vm.mm.mprotect(hva, SIZE, PROT_READ)
        seen = 0xAA
    validate_vm(vm)
    leaf = vm.stage2.walk(G + P)
    assert leaf is None or not leaf.perm.write
    assert access(vm, G + P, 4, READ) == {"result": "ok", "value": seen}
    for gpa in (G, G + P):
        assert access(vm, gpa, 4, WRITE, 0xBB) == {"result": "fault"}
    assert vm.mm.host_read(hva + P, 4) == seen
    assert vm.stats_dict()["pf_efault"] == 2


# --- case 2: the same slot created over a read-only VMA -----------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", ARCHES)
def test_writable_slot_created_over_readonly_vma(arch: str, variant: str) -> None:
    """History B: the slot is created writable over a VMA that is already read-only.
    v5.4 arm64 and RISC-V ``kvm_arch_prepare_memory_region`` walk the VMAs and fail with
    EPERM (nothing created; I5: the call changes nothing); upstream arm64 and x86 accept
    it and guest writes fail with EFAULT later, exactly as in history A."""
    vm = Vm(arch, variant=era(arch, variant))
    hva = vm.mm.mmap(SIZE, RW, "memfd", fill=0x5A)
    vm.mm.mprotect(hva, SIZE, PROT_READ)
    if eperm_at_create(arch, variant):
        with pytest.raises(KernelError) as err:
            vm.set_user_memory_region(0, G, SIZE, hva)
        assert err.value.errno == "EPERM"
        assert list(vm.for_each_memslot()) == []
        assert access(vm, G, 4, WRITE, 1)["result"] == "mmio"  # no slot: MMIO exit
        return
    vm.set_user_memory_region(0, G, SIZE, hva)
    assert access(vm, G, 4, READ) == {"result": "ok", "value": 0x5A5A5A5A}
    assert access(vm, G, 4, WRITE, 1) == {"result": "fault"}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", ARCHES)
def test_readonly_slot_created_over_readonly_vma_is_accepted(arch: str, variant: str) -> None:
    """§2.1 corner case: the v5.4 permission check only concerns *writable* slots
    (``writable = !(mem->flags & KVM_MEM_READONLY)``): a READONLY slot over a read-only
    VMA passes everywhere; writes exit as MMIO."""
    vm = Vm(arch, variant=era(arch, variant))
    hva = vm.mm.mmap(SIZE, RW, "memfd", fill=0x5A)
    vm.mm.mprotect(hva, SIZE, PROT_READ)
    vm.set_user_memory_region(0, G, SIZE, hva, KVM_MEM_READONLY)
    assert access(vm, G, 4, READ) == {"result": "ok", "value": 0x5A5A5A5A}
    assert access(vm, G, 4, WRITE, 1) == {"result": "mmio", "gpa": G, "len": 4,
                                          "is_write": True, "data": 1}
    validate_path_independence(vm)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", ARCHES)
def test_two_histories_path_independence(arch: str, variant: str) -> None:
    """DESIGN.md invariant 4 on the discussion's case: history A reaches "writable slot
    over a read-only VMA" legally; replaying that final state from scratch must give the
    same access outcomes.  Where prepare refuses to *create* such a slot (v5.4 arm64,
    RISC-V) the state is still reachable: kvm_arch_prepare_memory_region checks the VMAs
    only while the ioctl runs, and a later mprotect is legal.  So the invariant holds
    everywhere, and where creation checks the VMAs it reports that the two histories
    disagree: this slot could not be created over today's VMA (EPERM)."""
    vm = Vm(arch, variant=era(arch, variant))
    hva = vm.mm.mmap(SIZE, RW, "memfd", fill=0x11)
    vm.set_user_memory_region(0, G, SIZE, hva)
    assert access(vm, G, 4, READ)["result"] == "ok"
    vm.mm.mprotect(hva, SIZE, PROT_READ)
    assert access(vm, G, 4, WRITE, 1)["result"] == "fault"
    notes = validate_path_independence(vm)
    if eperm_at_create(arch, variant):
        assert len(notes) == 1 and "EPERM" in notes[0] and "slot 0" in notes[0]
    else:
        assert notes == []
    if eperm_at_create(arch, variant):
        with pytest.raises(KernelError) as err:
            vm.set_user_memory_region(1, G + SIZE, SIZE, hva)
        assert err.value.errno == "EPERM"
    else:
        vm.set_user_memory_region(1, G + SIZE, SIZE, hva)


HISTORY_A = """
kvmmem: 1
name: rw-slot-then-ro-vma
memory:
  ram: {size: 64K, kind: memfd, prot: rw, fill: 0x11}
memslots:
  - {slot: 0, gpa: 0x40000000, size: 64K, memory: ram}
steps:
  - guest_write: {gpa: 0x40001000, size: 4, value: 0xaa}
    expect: {result: ok}
  - host_mmap: {name: ro, size: 64K, kind: memfd, prot: r, fill: 0x5a,
                at: {memory: ram, offset: 0}}
  - guest_read: {gpa: 0x40001000, size: 4}
    expect: {result: ok, value: 0x5a5a5a5a}
  - guest_write: {gpa: 0x40001000, size: 4, value: 0xbb}
    expect: {result: fault}
"""

HISTORY_B = """
kvmmem: 1
name: rw-slot-created-over-ro-vma
memory:
  ro: {size: 64K, kind: memfd, prot: r, fill: 0x5a}
memslots:
  - {slot: 0, gpa: 0x40000000, size: 64K, memory: ro}
steps:
  - guest_read: {gpa: 0x40001000, size: 4}
  - guest_write: {gpa: 0x40001000, size: 4, value: 0xbb}
"""


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", ARCHES)
def test_two_histories_as_scenarios(arch: str, variant: str) -> None:
    """The same two histories through the scenario runner (SCENARIOS.md contract): A
    always meets its expectations and holds every invariant (its end state is legal
    everywhere); B's memslot setup is EPERM exactly where prepare walks the VMAs, and
    then the guest sees MMIO (no slot) instead of data / EFAULT.  There A's run notes
    the disagreement (path-independence)."""
    a = run_scenario(load_scenario_text(HISTORY_A), arch, era(arch, variant))
    assert a.mismatches == []
    assert a.violations == [] and a.exit_status == 0
    if eperm_at_create(arch, variant):
        assert [n["invariant"] for n in a.notes] == ["path-independence"]
        assert "EPERM" in a.notes[0]["detail"]
        assert a.to_json()["notes"] == a.notes
    else:
        assert a.notes == []
    b = run_scenario(load_scenario_text(HISTORY_B), arch, era(arch, variant))
    assert b.violations == []
    if eperm_at_create(arch, variant):
        assert b.setup[0]["result"] == "error" and b.setup[0]["errno"] == "EPERM"
        assert [s["result"] for s in b.steps] == ["mmio", "mmio"]
    else:
        assert b.setup[0]["result"] == "ok"
        assert [s["result"] for s in b.steps] == ["ok", "fault"]
        assert b.steps[0]["value"] == 0x5A5A5A5A


# --- case 3: VM_PFNMAP premapped at creation vs faulted in -------------------------------

NPAGES = 8


def pfnmap_vm(arch: str, variant: str) -> tuple[Vm, int]:
    """A VM with slot 0 over a rw ``device`` (remap_pfn_range) BAR of NPAGES pages."""
    vm = Vm(arch, variant=era(arch, variant))
    bar = vm.mm.mmap(NPAGES * P, RW, "device")
    vm.set_user_memory_region(0, G, NPAGES * P, bar)
    validate_vm(vm)
    return vm, bar


def leaves(vm: Vm) -> list[tuple[int, int, int, MemAttr, bool, bool]]:
    return [(lf.gpa, lf.pfn, lf.size, lf.attr, lf.perm.write, lf.perm.execute)
            for lf in vm.stage2.for_each_leaf()]


def premaps(arch: str, variant: str) -> bool:
    """v5.4 arm ``kvm_phys_addr_ioremap`` / RISC-V ``kvm_riscv_gstage_ioremap`` (removed
    by fd6f17bade21 in v5.14 and 8c5fa3764fac in v6.18); x86 never premaps."""
    return arch in ("arm64", "riscv") and variant == "linux-5.4"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", ARCHES)
def test_pfnmap_premapped_at_creation_or_faulted_in(arch: str, variant: str) -> None:
    """Premap (v5.4 arm64/riscv prepare) vs fault-in (upstream, and x86 always): the
    premap installs NPAGES 4K Device leaves at creation, writable because the slot is,
    and the guest then takes no fault at all; fault-in installs nothing at creation and
    takes one fault (``pf_taken``/``pf_fixed``; riscv has no ``pf_fixed``) per page,
    each mapping the page 4K Device, W per the host PTE (rw here)."""
    vm, bar = pfnmap_vm(arch, variant)
    stats = vm.stats_dict()
    if premaps(arch, variant):
        assert stats["premapped_pages"] == NPAGES
        assert stats["pages_4k"] == NPAGES
        assert all(size == P and attr is MemAttr.DEVICE and write and not execute
                   for _g, _p, size, attr, write, execute in leaves(vm))
    else:
        assert stats["premapped_pages"] == 0
        assert leaves(vm) == []
    for i in range(NPAGES):
        assert access(vm, G + i * P, 4, READ) == {"result": "ok", "value": 0}
    after = vm.stats_dict()
    faults = 0 if premaps(arch, variant) else NPAGES
    assert after["pf_taken"] == faults
    if arch != "riscv":
        assert after["pf_fixed"] == faults
    assert after["pages_4k"] == NPAGES and after["pages_2m"] == 0
    for i, (gpa, pfn, size, attr, write, _x) in enumerate(leaves(vm)):
        assert (gpa, size, write) == (G + i * P, P, True)
        pte = vm.mm.host_pte(bar + i * P)
        assert pte is not None and pfn == pte.pfn
        assert not vm.mm.physmem.pfn_valid(pfn)
        if arch != "riscv" or premaps(arch, variant):
            assert attr is MemAttr.DEVICE  # riscv fault-time attr: KVM_FINDINGS #2
    assert access(vm, G, 4, WRITE, 0xCAFE) == {"result": "ok"}
    first = vm.stage2.walk(G)
    assert first is not None and vm.mm.physmem.read_int(first.pfn, 0, 4) == 0xCAFE
    validate_path_independence(vm)


@pytest.mark.parametrize("arch", ["arm64", "riscv"])
def test_pfnmap_premap_and_fault_in_reach_the_same_mappings(arch: str) -> None:
    """After the guest touched every page, premap (linux-5.4) and fault-in (upstream)
    hold the same gpa -> pfn map, 4K, writable, Device (two code paths building the same
    mappings - the argument for removing the premap, §2.1 / §4.5)."""
    old, _ = pfnmap_vm(arch, "linux-5.4")
    new, _ = pfnmap_vm(arch, "upstream")
    for vm in (old, new):
        for i in range(NPAGES):
            assert access(vm, G + i * P, 4, READ)["result"] == "ok"
    assert [(g, p, s, w) for g, p, s, _a, w, _x in leaves(old)] == \
        [(g, p, s, w) for g, p, s, _a, w, _x in leaves(new)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", ARCHES)
def test_pfnmap_munmap_leaves_no_device_mapping(arch: str, variant: str) -> None:
    """munmap of the BAR afterwards: the MMU notifier (``kvm_mmu_notifier_invalidate_range_start``
    -> ``kvm_unmap_gfn_range``) zaps premapped and faulted-in leaves alike; no device
    mapping is left, and the next access faults (no VMA -> -EFAULT)."""
    vm, bar = pfnmap_vm(arch, variant)
    for i in range(0, NPAGES, 2):
        assert access(vm, G + i * P, 4, READ)["result"] == "ok"
    assert vm.stats_dict()["pages_4k"] == (NPAGES if premaps(arch, variant) else NPAGES // 2)
    vm.mm.munmap(bar, NPAGES * P)
    validate_vm(vm)
    assert leaves(vm) == []
    assert vm.stats_dict()["pages_4k"] == 0
    for i in range(NPAGES):
        assert access(vm, G + i * P, 4, READ) == {"result": "fault"}
    assert leaves(vm) == []


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", ARCHES)
def test_pfnmap_with_dirty_logging(arch: str, variant: str) -> None:
    """§2.1/§2.3/§2.4: arm64 and RISC-V prepare refuse VM_PFNMAP + LOG_DIRTY_PAGES with
    EINVAL (v5.4 and upstream alike, nothing premapped); x86 has no such check."""
    vm = Vm(arch, variant=era(arch, variant))
    bar = vm.mm.mmap(NPAGES * P, RW, "device")
    if arch == "x86":
        vm.set_user_memory_region(0, G, NPAGES * P, bar, KVM_MEM_LOG_DIRTY_PAGES)
        assert access(vm, G, 4, WRITE, 1) == {"result": "ok"}
        return
    with pytest.raises(KernelError) as err:
        vm.set_user_memory_region(0, G, NPAGES * P, bar, KVM_MEM_LOG_DIRTY_PAGES)
    assert err.value.errno == "EINVAL"
    assert leaves(vm) == [] and list(vm.for_each_memslot()) == []
