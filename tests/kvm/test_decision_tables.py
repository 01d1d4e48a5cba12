"""Every row of the stage-2 fault decision tables, on every architecture.

The tables are kernel-semantics.md §3.5.1 (gpa not covered by any memslot) and
§3.5.2 (gpa in a memslot); each ``test_row_*`` names its row and, in its
docstring, the kernel function(s) that decide it:

* arm64: ``kvm_handle_guest_abort`` -> ``io_mem_abort`` / ``user_mem_abort``
  (arch/arm64/kvm/mmu.c, mmio.c);
* x86 (TDP): ``kvm_mmu_page_fault`` -> ``kvm_tdp_page_fault`` ->
  ``kvm_mmu_faultin_pfn`` / ``kvm_handle_noslot_fault`` / ``kvm_handle_error_pfn``
  -> emulator (arch/x86/kvm/mmu/mmu.c, x86.c);
* RISC-V: ``gstage_page_fault`` -> ``kvm_riscv_mmu_map`` (arch/riscv/kvm/vcpu_exit.c,
  mmu.c);
* all: ``__kvm_faultin_pfn`` / ``hva_to_pfn`` / ``hva_to_pfn_remapped``
  (virt/kvm/kvm_main.c, §3.1).

Expected values are the kernel's (the reference), not the model's output.
After every guest access the per-step invariants run (``validate_vm``).  Rows
the model cannot express are skipped with the reason; model divergences are
``xfail(strict=True)`` with their /work/notes/KVM_FINDINGS.md number.

Device memory: host mappings of kind ``device`` (``remap_pfn_range``: every
frame present with the mapping's protection, ``vm_pgoff`` = the base pfn) and
``device-lazy`` (nothing present; the driver's fault handler inserts a frame,
read-only on a read fault).
"""

from __future__ import annotations

from typing import Any

import pytest

from kvmmem.arch.pgtable import Leaf, MemAttr
from kvmmem.errors import KernelError, ValidationError
from kvmmem.host import PROT_NONE, PROT_READ, PROT_WRITE
from kvmmem.kvm.dirty_log import kvm_get_dirty_log
from kvmmem.kvm.guest_memfd import GUEST_MEMFD_FLAG_MMAP
from kvmmem.kvm.invariants import validate_vm
from kvmmem.kvm.memory_attributes import (
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_MEMORY_EXIT_FLAG_PRIVATE,
)
from kvmmem.kvm.memslot import KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY
from kvmmem.kvm.prefault import kvm_vcpu_pre_fault_memory
from kvmmem.kvm.vcpu import Access, Fault
from kvmmem.kvm.vm import Vm
from kvmmem.sync import SyncKind, drive

ARCHES = ("x86", "arm64", "riscv")
P = 4096
M2 = 2 << 20
G = 0x4000_0000  # slot gpa (1 GiB, 2M and 1G aligned)
NOSLOT = 0x9000_0000  # a gpa no slot covers
HVA_2M = 0x7E00_0000_0000  # a 2M (and 1G) aligned hva for huge-mapping rows
RW = PROT_READ | PROT_WRITE
LOG = KVM_MEM_LOG_DIRTY_PAGES
RO = KVM_MEM_READONLY
READ, WRITE, EXEC = Access.READ, Access.WRITE, Access.EXEC
QWORD = 0xA1A2A3A4A5A6A7A8


def xfail_on(arches: tuple[str, ...], n: int) -> list[Any]:
    """The arch parameters, with ``arches`` expected to fail on KVM_FINDINGS #n."""
    mark = pytest.mark.xfail(strict=True, reason=f"KVM_FINDINGS #{n}")
    return [pytest.param(a, marks=mark) if a in arches else a for a in ARCHES]


def access(vm: Vm, gpa: int, size: int, kind: Access, value: int = 0) -> dict[str, Any]:
    """One guest access on vCPU 0; the outcome dict, after validate_vm."""
    out = vm.guest_access(gpa, size, kind, value).to_outcome()
    validate_vm(vm)
    return out


def slot_vm(arch: str, *, kind: str = "anon", size: int = 4 * P, flags: int = 0,
            fill: int | None = None, gpa: int = G, addr: int | None = None,
            variant: str = "upstream") -> tuple[Vm, int]:
    """A VM with slot 0 at ``gpa`` over a fresh rw host mapping of ``kind``;
    returns (vm, hva)."""
    vm = Vm(arch, variant=variant)
    kw: dict[str, Any] = {"fill": fill}
    if addr is not None:
        kw.update(addr=addr, fixed=True)
    hva = vm.mm.mmap(size, RW, kind, **kw)
    vm.set_user_memory_region(0, gpa, size, hva, flags)
    return vm, hva


def leaf_at(vm: Vm, gpa: int) -> Leaf:
    leaf = vm.stage2.walk(gpa)
    assert leaf is not None, f"no stage-2 leaf at {gpa:#x}"
    return leaf


def host_frame(vm: Vm, hva: int) -> int:
    """The 4 KiB frame the host page table maps ``hva`` to (inside a 2M leaf: the subpage)."""
    pte = vm.mm.host_pte(hva)
    assert pte is not None
    return int(pte.pfn)


def is_ud(out: dict[str, Any]) -> bool:
    """x86 #UD injected (the model spells it ``#UD``, realkvm ``UD``: KVM_FINDINGS N1)."""
    return out["result"] == "abort" and str(out["abort"]).lstrip("#") == "UD"


# =====================================================================================
# §3.5.1  gpa not covered by any memslot
# =====================================================================================


@pytest.mark.parametrize("arch", ARCHES)
def test_row_no_slot_read_valid_syndrome_exits_mmio(arch: str) -> None:
    """§3.5.1 "read, valid syndrome/decodable": arm64 ``io_mem_abort`` -> KVM_EXIT_MMIO
    (is_write=0, len = 1 << SAS); x86 ``kvm_handle_noslot_fault`` -> RET_PF_EMULATE ->
    emulator -> KVM_EXIT_MMIO; RISC-V ``kvm_riscv_vcpu_mmio_load`` -> KVM_EXIT_MMIO."""
    vm = Vm(arch)
    for size in (1, 2, 4, 8):
        out = access(vm, NOSLOT + 0x10, size, READ)
        assert out == {"result": "mmio", "gpa": NOSLOT + 0x10, "len": size, "is_write": False}
    assert vm.stage2.walk(NOSLOT) is None
    assert vm.stats_dict()["mmio_exits"] == 4


@pytest.mark.parametrize("arch", ARCHES)
def test_row_no_slot_write_valid_syndrome_exits_mmio_with_data(arch: str) -> None:
    """§3.5.1 "write, valid syndrome/decodable": KVM_EXIT_MMIO is_write=1 carrying the
    written bytes little-endian (arm64 ``io_mem_abort``, x86 emulator
    ``emulator_read_write``, RISC-V ``kvm_riscv_vcpu_mmio_store``)."""
    vm = Vm(arch)
    for size in (1, 2, 4, 8):
        out = access(vm, NOSLOT, size, WRITE, QWORD)
        assert out == {"result": "mmio", "gpa": NOSLOT, "len": size, "is_write": True,
                       "data": QWORD & ((1 << (8 * size)) - 1)}
    assert vm.stage2.walk(NOSLOT) is None


@pytest.mark.parametrize("arch", ARCHES)
def test_row_no_slot_data_access_without_syndrome(arch: str) -> None:
    """§3.5.1 "data access, no syndrome (ISV=0)": arm64 KVM_EXIT_ARM_NISV / ENOSYS
    (``io_mem_abort``), RISC-V EOPNOTSUPP for undecodable instructions."""
    pytest.skip("not modelled: a guest access carries no instruction encoding, so every "
                "access has a valid syndrome (arm64 ISV=1) / decodes (x86, RISC-V htinst)")


@pytest.mark.parametrize("arch", ARCHES)
def test_row_no_slot_cache_maintenance_op(arch: str) -> None:
    """§3.5.1 "cache-maintenance op": arm64 ``kvm_handle_guest_abort`` skips the
    instruction (``kvm_vcpu_dabt_is_cm`` -> ``kvm_incr_pc``); n/a on x86 and RISC-V."""
    if arch != "arm64":
        pytest.skip(f"the table has no such case on {arch} (n/a)")
    pytest.skip("not modelled: cache-maintenance instructions (DC CIVAC etc.) are not an "
                "Access kind")


@pytest.mark.parametrize("arch", ARCHES)
def test_row_no_slot_instruction_fetch(arch: str) -> None:
    """§3.5.1 "instruction fetch": arm64 I/O branch of ``kvm_handle_guest_abort`` ->
    prefetch abort injected (``kvm_inject_pabt``); x86 native path (CPL3, as this host's
    ``nat`` vCPU) -> the emulator cannot fetch -> #UD injected (``handle_emulation_failure``
    at CPL>0); RISC-V ``gstage_page_fault`` instruction guest page fault -> an
    instruction access fault redirected to the guest (KVM_RUN -1/EOPNOTSUPP up to at
    least v6.12)."""
    vm = Vm(arch)
    out = access(vm, NOSLOT, 4, EXEC)
    if arch == "arm64":
        assert out == {"result": "abort", "abort": "prefetch abort"}
    elif arch == "x86":
        assert is_ud(out), out
    else:
        assert out == {"result": "abort", "abort": "instruction access fault"}
    assert vm.stage2.walk(NOSLOT) is None


def test_row_no_slot_instruction_fetch_x86_emulated_path() -> None:
    """§3.5.1 "instruction fetch", x86 at CPL0 (the emulated path): emulation failure
    -> KVM_EXIT_INTERNAL_ERROR / KVM_INTERNAL_ERROR_EMULATION (§3.3.4;
    set_memory_region_test ``test_zero_memory_regions``); never an MMIO exit.  Outcome
    spelled as realkvm reports it."""
    vm = Vm("x86")
    vm.vcpus[0].path = "emulated"
    out = access(vm, NOSLOT, 4, EXEC)
    # suberror 1 = KVM_INTERNAL_ERROR_EMULATION
    assert out == {"result": "exit", "exit_reason": "KVM_EXIT_INTERNAL_ERROR", "suberror": 1}


@pytest.mark.parametrize("arch", ARCHES)
def test_row_no_slot_stage1_table_walk(arch: str) -> None:
    """§3.5.1 "stage-1 table walk (guest PT in no-slot gpa)": arm64 data abort injected
    (S1PTW in the I/O branch of ``kvm_handle_guest_abort``); x86 emulation path."""
    pytest.skip("not modelled: guest stage-1 page tables and S1PTW aborts are not "
                "simulated (accesses are guest-physical)")


@pytest.mark.parametrize("arch", ARCHES)
def test_row_no_slot_private_access(arch: str) -> None:
    """§3.5.1 "private access (CoCo/SW-protected)": x86 ``kvm_handle_noslot_fault`` ->
    KVM_EXIT_MEMORY_FAULT + EFAULT; no such case on arm64/RISC-V."""
    if arch != "x86":
        pytest.skip(f"the table has no such case on {arch}")
    vm = Vm(arch, vm_type="sw_protected")
    drive(vm.set_memory_attributes_op(NOSLOT, P, KVM_MEMORY_ATTRIBUTE_PRIVATE))
    out = access(vm, NOSLOT + 8, 4, READ)
    assert out == {"result": "fault", "gpa": NOSLOT, "size": P,
                   "flags": KVM_MEMORY_EXIT_FLAG_PRIVATE}
    assert vm.stage2_lookup(NOSLOT) is None


@pytest.mark.parametrize("arch", ARCHES)
def test_row_no_slot_slot_invalid_during_delete(arch: str) -> None:
    """§3.5.1 "slot INVALID (transient)": while ``kvm_invalidate_memslot`` has published
    the KVM_MEMSLOT_INVALID copy, arm64/RISC-V see no usable hva
    (``__gfn_to_hva_many`` -> KVM_HVA_ERR_BAD) and take the MMIO path; x86
    ``kvm_mmu_faultin_pfn`` returns RET_PF_RETRY (the vCPU spins) and a pre-fault
    ``-EAGAIN`` (§5.1)."""
    vm, hva = slot_vm(arch, fill=0x11)
    assert access(vm, G, 4, READ) == {"result": "ok", "value": 0x11111111}
    op = vm.set_user_memory_region_op(0, G, 0, hva)
    for pause in op:
        if pause.kind is SyncKind.POINT and pause.name == "memslot_invalid_published":
            break
    else:
        pytest.fail("the delete never published the INVALID slot")
    if arch == "x86":
        decision = drive(vm.arch.handle_fault(vm, vm.vcpus[0], G + P, READ))
        assert decision.kind is Fault.RETRY
        with pytest.raises(KernelError) as err:
            kvm_vcpu_pre_fault_memory(vm, vm.vcpus[0], G + P, P)
        assert err.value.errno == "EAGAIN"
    else:
        out = access(vm, G + P, 4, READ)
        assert out == {"result": "mmio", "gpa": G + P, "len": 4, "is_write": False}
        out = access(vm, G + P, 4, WRITE, 5)
        assert out == {"result": "mmio", "gpa": G + P, "len": 4, "is_write": True, "data": 5}
    validate_vm(vm)
    for _ in op:
        pass
    assert vm.stage2.walk(G) is None
    assert access(vm, G, 4, READ)["result"] == "mmio"


# =====================================================================================
# §3.5.2  gpa in a memslot: slot flags none
# =====================================================================================


@pytest.mark.parametrize("arch", ARCHES)
def test_row_in_slot_read_page_present_writable_maps_rw(arch: str) -> None:
    """§3.5.2 none / read / "anon/file page present & writable" -> map RW (RISC-V RWX):
    ``hva_to_pfn_fast`` finds the page writable, so ``map_writable``; arm64
    ``user_mem_abort``, x86 ``make_spte``, RISC-V ``kvm_riscv_mmu_map`` (always X)."""
    vm, hva = slot_vm(arch, fill=0x5A)
    assert access(vm, G + P, 4, READ) == {"result": "ok", "value": 0x5A5A5A5A}
    leaf = leaf_at(vm, G + P)
    assert (leaf.size, leaf.perm.read, leaf.perm.write) == (P, True, True)
    assert leaf.attr is MemAttr.NORMAL
    assert leaf.pfn == host_frame(vm, hva + P)
    if arch == "riscv":
        assert leaf.perm.execute


@pytest.mark.parametrize("arch", ARCHES)
def test_row_in_slot_read_page_absent_private_anon_maps_zero_page_readonly(arch: str) -> None:
    """§3.5.2 none / read / "page absent, VMA readable", private anon: slow GUP read-faults
    the shared zero page in (``hva_to_pfn_slow``), the opportunistic FOLL_WRITE fast GUP
    fails, so the leaf is read-only on the zero pfn."""
    vm, _hva = slot_vm(arch)
    assert access(vm, G, 8, READ) == {"result": "ok", "value": 0}
    leaf = leaf_at(vm, G)
    assert leaf.pfn == vm.mm.physmem.zero_pfn
    assert not leaf.perm.write
    assert leaf.size == P


@pytest.mark.parametrize("arch", ARCHES)
def test_row_in_slot_read_page_absent_shmem_maps_rw(arch: str) -> None:
    """§3.5.2 none / read / "page absent, VMA readable", shmem: the shared writable
    mapping's read fault installs a writable PTE (no write-notify), so the opportunistic
    FOLL_WRITE fast GUP in ``hva_to_pfn_slow`` succeeds -> map RW."""
    vm, hva = slot_vm(arch, kind="memfd")
    assert access(vm, G, 4, READ) == {"result": "ok", "value": 0}
    leaf = leaf_at(vm, G)
    assert leaf.perm.write
    assert leaf.pfn == host_frame(vm, hva)


@pytest.mark.parametrize("arch", ARCHES)
def test_row_in_slot_read_page_absent_writenotify_file_maps_readonly(arch: str) -> None:
    """§3.5.2 none / read / "page absent, VMA readable", write-notify file mapping
    (MAP_SHARED of a disk file): the read fault maps the page-cache page read-only
    (``vma_wants_writenotify``), so KVM maps R."""
    vm = Vm(arch)
    f = vm.mm.open_file("data", 4 * P, fill=0x33)
    hva = vm.mm.mmap(4 * P, RW, "file-shared", file=f)
    vm.set_user_memory_region(0, G, 4 * P, hva)
    assert access(vm, G, 4, READ) == {"result": "ok", "value": 0x33333333}
    leaf = leaf_at(vm, G)
    assert not leaf.perm.write
    assert leaf.pfn == host_frame(vm, hva)


@pytest.mark.parametrize("arch", ARCHES)
def test_row_in_slot_write_after_read_fault_upgrades_in_place(arch: str) -> None:
    """§3.5.2 none / write / page present read-only in a writable shared VMA (the
    write-notify file of the previous row): the write fault's FOLL_WRITE GUP runs
    ``page_mkwrite`` and KVM upgrades the leaf to RW for the same pfn (arm64
    ``kvm_pgtable_stage2_relax_perms``; x86 ``make_spte`` - the EPT violation itself
    drops the stale translation; RISC-V remap + ``gstage_tlb_flush``)."""
    vm = Vm(arch)
    f = vm.mm.open_file("data", 4 * P)
    hva = vm.mm.mmap(4 * P, RW, "file-shared", file=f)
    vm.set_user_memory_region(0, G, 4 * P, hva)
    assert access(vm, G, 8, READ) == {"result": "ok", "value": 0}
    pfn = leaf_at(vm, G).pfn
    assert access(vm, G, 8, WRITE, QWORD) == {"result": "ok"}
    leaf = leaf_at(vm, G)
    assert leaf.perm.write and leaf.pfn == pfn
    assert vm.mm.host_read(hva, 8) == QWORD


@pytest.mark.parametrize("arch", ARCHES)
def test_row_in_slot_read_prot_read_vma_maps_readonly(arch: str) -> None:
    """§3.5.2 none / read / "VMA PROT_READ" -> map R: GUP gives the page, the
    FOLL_WRITE fast GUP fails on the read-only PTE, ``map_writable`` false.  (The VMA is
    made read-only after the slot exists: RISC-V refuses to create a writable slot over
    it, §2.4.)"""
    vm, hva = slot_vm(arch, fill=0x42)
    vm.mm.mprotect(hva, 4 * P, PROT_READ)
    assert access(vm, G + 2 * P, 4, READ) == {"result": "ok", "value": 0x42424242}
    leaf = leaf_at(vm, G + 2 * P)
    assert not leaf.perm.write
    assert leaf.pfn == host_frame(vm, hva + 2 * P)


@pytest.mark.parametrize("arch", ARCHES)
def test_row_in_slot_write_prot_read_vma_efault(arch: str) -> None:
    """§3.5.2 none / write / "VMA PROT_READ (mprotect)" -> -EFAULT on every arch:
    FOLL_WRITE GUP fails, ``vma_lookup`` finds a VMA without VM_WRITE -> KVM_PFN_ERR_FAULT
    (``hva_to_pfn``); x86 ``kvm_handle_error_pfn`` -> -EFAULT, arm64/RISC-V -EFAULT.
    Memory is unchanged."""
    vm, hva = slot_vm(arch, fill=0x42)
    assert access(vm, G, 4, WRITE, 7) == {"result": "ok"}
    vm.mm.mprotect(hva, 4 * P, PROT_READ)
    assert access(vm, G, 4, WRITE, 9) == {"result": "fault"}
    assert access(vm, G + P, 4, WRITE, 9) == {"result": "fault"}
    assert vm.mm.host_read(hva, 4) == 7
    assert vm.mm.host_read(hva + P, 4) == 0x42424242


@pytest.mark.parametrize("kind", [READ, WRITE, EXEC], ids=lambda a: a.value)
@pytest.mark.parametrize("arch", ARCHES)
def test_row_in_slot_any_access_prot_none_vma_efault(arch: str, kind: Access) -> None:
    """§3.5.2 none / any / "PROT_NONE VMA" -> -EFAULT: GUP fails and the VMA permits
    nothing (``hva_to_pfn`` -> KVM_PFN_ERR_FAULT); the notifier zapped the old leaf."""
    vm, hva = slot_vm(arch, fill=0x42)
    assert access(vm, G, 4, READ)["result"] == "ok"
    vm.mm.mprotect(hva, 4 * P, PROT_NONE)
    assert vm.stage2.walk(G) is None
    assert access(vm, G, 4, kind, 1) == {"result": "fault"}


@pytest.mark.parametrize("kind", [READ, WRITE, EXEC], ids=lambda a: a.value)
@pytest.mark.parametrize("arch", ARCHES)
def test_row_in_slot_any_access_no_vma_efault(arch: str, kind: Access) -> None:
    """§3.5.2 none / any / "no VMA at hva (munmapped)" -> -EFAULT: arm64/RISC-V
    ``vma_lookup`` in ``user_mem_abort`` / ``kvm_riscv_mmu_map`` fails; x86
    ``hva_to_pfn`` -> KVM_PFN_ERR_FAULT -> -EFAULT."""
    vm, hva = slot_vm(arch, fill=0x42)
    assert access(vm, G, 4, READ)["result"] == "ok"
    vm.mm.munmap(hva, 4 * P)
    assert vm.stage2.walk(G) is None
    assert access(vm, G, 4, kind, 1) == {"result": "fault"}


@pytest.mark.parametrize("arch", ARCHES)
def test_row_in_slot_hwpoisoned_page_sigbus_then_eintr(arch: str) -> None:
    """§3.5.2 none / any / "hwpoisoned page": GUP -EHWPOISON -> KVM_PFN_ERR_HWPOISON ->
    SIGBUS (BUS_MCEERR_AR) to the task and resume/retry, so KVM_RUN returns EINTR
    (arm64 ``user_mem_abort``, x86 ``kvm_handle_error_pfn``, RISC-V
    ``kvm_riscv_mmu_map``).  The signal itself is not modelled, only the EINTR exit."""
    vm, hva = slot_vm(arch, fill=0x42)
    pte = vm.mm.host_pte(hva)
    assert pte is not None
    vm.mm.physmem.hwpoison(pte.pfn)
    assert access(vm, G, 4, READ) == {"result": "error", "errno": "EINTR"}
    assert vm.stage2.walk(G) is None


@pytest.mark.parametrize("arch", ARCHES)
def test_row_in_slot_exec_normal_ram_maps_executable(arch: str) -> None:
    """§3.5.2 none / exec / "normal RAM" -> map with X (+R, +W since the page is
    writable): arm64 ``user_mem_abort`` adds X on exec faults; x86 exec allowed; RISC-V
    always X."""
    vm, _hva = slot_vm(arch, fill=0x90)
    assert access(vm, G, 4, EXEC) == {"result": "ok"}
    leaf = leaf_at(vm, G)
    assert leaf.perm.execute and leaf.perm.read and leaf.perm.write
    assert leaf.attr is MemAttr.NORMAL


@pytest.mark.parametrize("arch", ARCHES)
def test_row_in_slot_exec_pfnmap_device(arch: str) -> None:
    """§3.5.2 none / exec / "VM_PFNMAP non-cacheable (device)": arm64 -ENOEXEC from
    ``user_mem_abort`` (exec_fault && s2_force_noncacheable) -> prefetch abort injected,
    nothing mapped; x86 mapped (UC memtype, exec allowed); RISC-V mapped X."""
    vm, hva = slot_vm(arch, kind="device")
    out = access(vm, G, 4, EXEC)
    if arch == "arm64":
        assert out == {"result": "abort", "abort": "prefetch abort"}
        assert vm.stage2.walk(G) is None
        return
    assert out == {"result": "ok"}
    leaf = leaf_at(vm, G)
    assert leaf.perm.execute
    assert leaf.pfn == host_frame(vm, hva)
    if arch == "x86":
        assert leaf.attr is MemAttr.DEVICE  # EPT memtype UC (get_mt_mask: host MMIO)


@pytest.mark.parametrize("arch", ARCHES)
def test_row_in_slot_pfnmap_present_maps_device_writable_per_host_pte(arch: str) -> None:
    """§3.5.2 none / read/write / "VM_PFNMAP/VM_IO, PTE present": ``hva_to_pfn_remapped``
    reads the PTE (``follow_pfnmap_start``), writable := host PTE write bit; arm64 maps
    Device-nGnRE, x86 memtype UC; RISC-V 4K.  A 16K BAR cannot hold a block: 4K."""
    vm, hva = slot_vm(arch, kind="device")
    assert access(vm, G + P, 4, READ) == {"result": "ok", "value": 0}
    leaf = leaf_at(vm, G + P)
    assert leaf.size == P
    assert leaf.perm.write  # remap_pfn_range of a rw MAP_SHARED mapping: writable PTEs
    assert leaf.pfn == host_frame(vm, hva + P)
    assert not vm.mm.physmem.pfn_valid(leaf.pfn)
    if arch != "riscv":  # riscv memory type: test_..._riscv_maps_without_memory_type
        assert leaf.attr is MemAttr.DEVICE
    assert access(vm, G + P, 4, WRITE, 0xBEEF) == {"result": "ok"}
    assert access(vm, G + P, 4, READ) == {"result": "ok", "value": 0xBEEF}
    assert vm.mm.physmem.read_int(leaf.pfn, 0, 4) == 0xBEEF


@pytest.mark.parametrize("arch", ARCHES)
def test_row_in_slot_pfnmap_present_readonly_pte_maps_readonly(arch: str) -> None:
    """§3.5.2 none / read / "VM_PFNMAP, PTE present", read-only PTE: R only ("W per host
    PTE", ``hva_to_pfn_remapped`` since bd2fae8da794)."""
    vm, hva = slot_vm(arch, kind="device")
    vm.mm.mprotect(hva, 4 * P, PROT_READ)
    assert access(vm, G, 4, READ) == {"result": "ok", "value": 0}
    leaf = leaf_at(vm, G)
    assert not leaf.perm.write
    assert leaf.pfn == host_frame(vm, hva)


@pytest.mark.parametrize("arch", ARCHES)
def test_row_in_slot_pfnmap_present_riscv_maps_without_memory_type(arch: str) -> None:
    """§3.5.2 / §3.4 step 9 memory type of a fault-time VM_PFNMAP mapping: arm64
    Device-nGnRE (``s2_force_noncacheable``), x86 UC; RISC-V
    ``kvm_riscv_gstage_map_page`` sets no memory type (PAGE_READ/PAGE_WRITE[_EXEC] only,
    PBMT=0: the PMAs decide) since the creation-time ioremap was removed (v6.18)."""
    vm, _hva = slot_vm(arch, kind="device")
    assert access(vm, G, 4, READ)["result"] == "ok"
    leaf = leaf_at(vm, G)
    if arch == "riscv":
        assert (leaf.raw >> 61) & 3 == 0
        assert leaf.attr is MemAttr.NORMAL
    else:
        assert leaf.attr is MemAttr.DEVICE


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("variant", ["7.2", "upstream"])
def test_row_in_slot_pfnmap_block_size(arch: str, variant: str) -> None:
    """§3.5.2 none / read / "VM_PFNMAP, PTE present", block size: arm64 from v5.14 to
    7.2 ``get_vma_page_shift`` derives PMD from ``vm_pgoff`` (hva and pa congruent, block
    inside the VMA) and ``fault_supports_stage2_huge_mapping`` agrees -> 2M Device block;
    since "Don't use the VMA to size stage-2 block mappings for VM_PFNMAP" (7.3) the
    host's 4K PTEs decide -> 4K.  x86 ``host_pfn_mapping_level`` sees 4K host PTEs -> 4K;
    RISC-V VM_PFNMAP -> PAGE_SIZE."""
    vm, hva = slot_vm(arch, kind="device", size=2 * M2, addr=HVA_2M, variant=variant)
    assert access(vm, G + 5 * P, 4, READ)["result"] == "ok"
    leaf = leaf_at(vm, G + 5 * P)
    assert leaf.size == (M2 if arch == "arm64" and variant == "7.2" else P)
    assert leaf.pfn == host_frame(vm, hva + 5 * P)


@pytest.mark.parametrize("variant", ["6.1", "debian-6.12", "upstream"])
def test_arm64_pfnmap_block_over_a_dmabuf(variant: str) -> None:
    """arm64 over a dma-buf (VM_PFNMAP of RAM pages that are not contiguous) at a
    vm_pgoff-congruent hva: until the fix ``user_mem_abort`` aligns the fault to the
    block, resolves the pfn of the block's first page and maps the 512 frames after it,
    so gfn 1 reaches a frame the host never mapped there (kernel-matrix.md §7: real on
    Debian 6.1.176); with the fix (Debian 6.12.117, 7.3) gfn 1 is faulted on its own
    and maps the host's page 1."""
    vm = Vm("arm64", variant=variant, cpu_features=("fwb", "dic"))
    hva = vm.mm.mmap(2 * M2, RW, "dmabuf", addr=HVA_2M, fixed=True)
    vm.set_user_memory_region(0, G, 2 * M2, hva, 0)
    first = vm.guest_access(G, 8, Access.READ).to_outcome()
    assert first == {"result": "ok", "value": 0}
    page1 = vm.stage2.walk(G + P)
    if variant == "6.1":
        assert page1 is not None and page1.pfn == leaf_at(vm, G).pfn + 1
        assert vm.mm.host_pte(hva + P) is None  # the driver never inserted page 1
        with pytest.raises(ValidationError, match="no-stale-translation"):
            validate_vm(vm)
    else:
        validate_vm(vm)
        assert page1 is None
        assert access(vm, G + P, 8, READ)["result"] == "ok"
        assert leaf_at(vm, G + P).size == P
        assert leaf_at(vm, G + P).pfn == host_frame(vm, hva + P)


@pytest.mark.parametrize("arch", ARCHES)
def test_row_in_slot_pfnmap_absent_fault_handler_populates(arch: str) -> None:
    """§3.5.2 none / read/write / "VM_PFNMAP, PTE absent": ``hva_to_pfn_remapped`` calls
    ``fixup_user_fault`` so the driver's fault handler inserts the frame (read-only on a
    read fault, writable on a write fault), then maps it, W per the new PTE."""
    vm, hva = slot_vm(arch, kind="device-lazy")
    assert vm.mm.host_pte(hva) is None
    assert access(vm, G, 4, READ) == {"result": "ok", "value": 0}
    assert vm.mm.host_pte(hva) is not None
    leaf = leaf_at(vm, G)
    assert leaf.size == P and not leaf.perm.write
    assert leaf.pfn == host_frame(vm, hva)
    assert access(vm, G + P, 4, WRITE, 0x77) == {"result": "ok"}
    leaf = leaf_at(vm, G + P)
    assert leaf.perm.write and leaf.pfn == host_frame(vm, hva + P)


def test_row_in_slot_pfnmap_absent_fault_handler_fails() -> None:
    """§3.5.2 none / read/write / "VM_PFNMAP, PTE absent", failure -> -EFAULT."""
    pytest.skip("not modelled: a device-lazy driver fault handler always inserts the frame "
                "(no failing .fault)")


@pytest.mark.parametrize("arch", ARCHES)
def test_row_in_slot_write_pfnmap_readonly_host_pte(arch: str) -> None:
    """§3.5.2 none / write / "VM_PFNMAP, host PTE read-only" (a read-only BAR mapping,
    like ``[vvar]``): ``hva_to_pfn_remapped`` -> KVM_PFN_ERR_RO_FAULT; arm64/RISC-V
    -EFAULT; x86 ``kvm_handle_error_pfn`` -> RET_PF_EMULATE, the emulator cannot write
    the read-only mapping -> KVM_EXIT_MMIO (kvm-on-this-host.md §3.6)."""
    vm, hva = slot_vm(arch, kind="device")
    vm.mm.mprotect(hva, 4 * P, PROT_READ)
    out = access(vm, G, 4, WRITE, 0x1234)
    if arch == "x86":
        assert out == {"result": "mmio", "gpa": G, "len": 4, "is_write": True, "data": 0x1234}
    else:
        assert out == {"result": "fault"}
    pte = vm.mm.host_pte(hva)
    assert pte is not None
    assert vm.mm.physmem.read_int(pte.pfn, 0, 4) == 0


@pytest.mark.parametrize("arch", ARCHES)
def test_row_in_slot_write_pfnmap_writenotify_pte(arch: str) -> None:
    """§3.5.2 none / write / "VM_PFNMAP, host PTE read-only" in a writable VMA (the
    driver inserted the frame read-only on a read, pfn_mkwrite pattern): a present
    read-only PTE gives KVM_PFN_ERR_RO_FAULT without asking the driver; arm64/RISC-V
    -EFAULT; x86 emulates and the emulator's ``copy_to_user`` runs the host write fault,
    so the write lands (kvm-on-this-host.md §3.6 "writable PFNMAP subtlety")."""
    vm, hva = slot_vm(arch, kind="device-lazy")
    assert access(vm, G, 4, READ)["result"] == "ok"
    out = access(vm, G, 4, WRITE, 0x1234)
    pte = vm.mm.host_pte(hva)
    assert pte is not None
    if arch == "x86":
        assert out == {"result": "ok"}
        assert vm.mm.physmem.read_int(pte.pfn, 0, 4) == 0x1234
    else:
        assert out == {"result": "fault"}
        assert vm.mm.physmem.read_int(pte.pfn, 0, 4) == 0


@pytest.mark.parametrize("fwb_dic", [False, True])
@pytest.mark.parametrize("arch", ARCHES)
def test_row_in_slot_pfnmap_cacheable(arch: str, fwb_dic: bool) -> None:
    """§3.5.2 none / any / "VM_PFNMAP cacheable, non-RAM pfn" (``device-cacheable``:
    Grace-style memory): arm64 (v6.17) cacheable only with FWB+DIC
    (``kvm_supports_cacheable_pfnmap``: Normal write-back, FWB encoding) else -EFAULT at
    the fault and EINVAL at prepare; x86 mapped (UC: ``kvm_is_mmio_pfn``); RISC-V
    mapped (no memory type)."""
    feats = ("fwb", "dic") if fwb_dic else ()
    vm = Vm(arch, cpu_features=feats)
    hva = vm.mm.mmap(4 * P, RW, "device-cacheable")
    if arch == "arm64" and not fwb_dic:
        with pytest.raises(KernelError, match="EINVAL"):
            vm.set_user_memory_region(0, G, 4 * P, hva, 0)
        ram = vm.mm.mmap(4 * P, RW, "anon")
        vm.set_user_memory_region(0, G, 4 * P, ram, 0)
        vm.mm.mmap(4 * P, RW, "device-cacheable", addr=ram, fixed=True)
        assert access(vm, G, 4, READ) == {"result": "fault"}
        return
    vm.set_user_memory_region(0, G, 4 * P, hva, 0)
    assert access(vm, G, 4, WRITE, 0x5A) == {"result": "ok"}
    leaf = leaf_at(vm, G)
    assert leaf.pfn == host_frame(vm, hva)
    want = {"arm64": MemAttr.NORMAL, "x86": MemAttr.DEVICE, "riscv": MemAttr.NORMAL}[arch]
    assert leaf.attr is want
    if arch == "arm64":
        assert "Normal-WB (FWB)" in vm.stage2.describe_entry(leaf.raw, leaf.level)


@pytest.mark.parametrize("arch", ARCHES)
def test_row_in_slot_pfnmap_allow_any_uncached(arch: str) -> None:
    """§3.5.2 none / read/write / "VM_PFNMAP/VM_IO, PTE present", the Normal-NC case: a
    vfio-pci BAR (``VM_ALLOW_ANY_UNCACHED`` since v6.9) is mapped Normal-NC on arm64
    (``KVM_PGTABLE_PROT_NORMAL_NC``), UC on x86, without memory type on RISC-V."""
    vm, hva = slot_vm(arch, kind="vfio-bar")
    assert access(vm, G, 4, WRITE, 0x11) == {"result": "ok"}
    leaf = leaf_at(vm, G)
    assert leaf.pfn == host_frame(vm, hva)
    want = {"arm64": MemAttr.NORMAL_NC, "x86": MemAttr.DEVICE, "riscv": MemAttr.NORMAL}[arch]
    assert leaf.attr is want


@pytest.mark.parametrize(("kind", "slot", "later"), [
    ("anon", "ok", None), ("memfd", "ok", None), ("file", "EINVAL", "fault"),
    ("device", "EINVAL", "ok")])
def test_row_in_slot_mte_vm(kind: str, slot: str, later: str | None) -> None:
    """§3.2.2 step 15 and the prepare walk for an MTE VM (arm64, KVM_CAP_ARM_MTE): a VMA
    without VM_MTE_ALLOWED is refused at prepare (EINVAL); when it replaces an accepted
    one, a cacheable fault on it is -EFAULT, while device memory skips the tag check
    (``!s2_force_noncacheable``) and is mapped.  Anonymous memory and shmem are mapped."""
    vm = Vm("arm64", cpu_features=("mte",), mte=True)
    hva = vm.mm.mmap(4 * P, RW, kind)
    if slot != "ok":
        with pytest.raises(KernelError, match=slot):
            vm.set_user_memory_region(0, G, 4 * P, hva, 0)
        ram = vm.mm.mmap(4 * P, RW, "anon")
        vm.set_user_memory_region(0, G, 4 * P, ram, 0)
        vm.mm.mmap(4 * P, RW, kind, addr=ram, fixed=True)
        assert access(vm, G, 4, READ)["result"] == later
        return
    vm.set_user_memory_region(0, G, 4 * P, hva, 0)
    assert access(vm, G, 4, WRITE, 3) == {"result": "ok"}


# =====================================================================================
# §3.5.2  READONLY slots
# =====================================================================================


@pytest.mark.parametrize("kind", [
    "anon", "memfd",
    "device",
])
@pytest.mark.parametrize("arch", ARCHES)
def test_row_readonly_slot_read_maps_readonly(arch: str, kind: str) -> None:
    """§3.5.2 READONLY / read / "any readable backing" -> map R: ``kvm_follow_pfn`` drops
    the want-writable request for a read-only slot (it clears ``map_writable`` before
    ``hva_to_pfn``, so neither GUP nor ``hva_to_pfn_remapped`` can set it); a later write
    still exits as MMIO and changes nothing."""
    vm = Vm(arch)
    hva = vm.mm.mmap(4 * P, RW, kind, fill=None if kind == "device" else 0x21)
    vm.set_user_memory_region(0, G, 4 * P, hva, RO)
    value = 0 if kind == "device" else 0x21212121
    assert access(vm, G + P, 4, READ) == {"result": "ok", "value": value}
    leaf = leaf_at(vm, G + P)
    assert leaf.pfn == host_frame(vm, hva + P)
    assert not leaf.perm.write
    assert access(vm, G + P, 4, WRITE, 5) == {"result": "mmio", "gpa": G + P, "len": 4,
                                              "is_write": True, "data": 5}
    assert vm.mm.physmem.read_int(leaf.pfn, 0, 4) == value


@pytest.mark.parametrize("arch", ARCHES)
def test_row_readonly_slot_exec_normal_ram_maps_rx(arch: str) -> None:
    """§3.5.2 READONLY / exec / "normal RAM" -> map R+X (x86: no W): an instruction abort
    is never a write (``kvm_is_write_fault``), so no I/O branch."""
    vm, _hva = slot_vm(arch, fill=0x90, flags=RO)
    assert access(vm, G, 4, EXEC) == {"result": "ok"}
    leaf = leaf_at(vm, G)
    assert leaf.perm.read and leaf.perm.execute and not leaf.perm.write


@pytest.mark.parametrize("arch", ARCHES)
def test_row_readonly_slot_write_exits_mmio_with_data(arch: str) -> None:
    """§3.5.2 READONLY / write -> MMIO exit with the data (arm64 I/O branch of
    ``kvm_handle_guest_abort`` with a valid syndrome; x86 KVM_PFN_ERR_RO_FAULT ->
    emulate -> KVM_EXIT_MMIO; RISC-V ``kvm_riscv_vcpu_mmio_store``).  Memory is unchanged
    and a page never read gets no leaf (kvm-on-this-host.md §3.2)."""
    vm, hva = slot_vm(arch, fill=0, flags=RO)
    for size in (1, 2, 4, 8):
        out = access(vm, G + 0x10, size, WRITE, QWORD)
        assert out == {"result": "mmio", "gpa": G + 0x10, "len": size, "is_write": True,
                       "data": QWORD & ((1 << (8 * size)) - 1)}
    assert vm.mm.host_read(hva + 0x10, 8) == 0
    assert vm.stage2.walk(G) is None
    assert access(vm, G + 0x10, 8, READ) == {"result": "ok", "value": 0}
    assert access(vm, G + 0x10, 8, WRITE, 1)["result"] == "mmio"  # with a read-only leaf too
    assert not leaf_at(vm, G).perm.write


@pytest.mark.parametrize("arch", ARCHES)
def test_row_readonly_slot_s1ptw_write(arch: str) -> None:
    """§3.5.2 READONLY / "S1PTW write (A/D update)": arm64 data abort injected."""
    pytest.skip("not modelled: guest stage-1 walks / hardware A-D updates (S1PTW)")


# =====================================================================================
# §3.5.2  LOG_DIRTY slots
# =====================================================================================


@pytest.mark.parametrize("arch", ARCHES)
def test_row_log_dirty_read_writable_page(arch: str) -> None:
    """§3.5.2 LOG_DIRTY / read / "writable page": arm64 (``user_mem_abort``: logging &&
    !write_fault -> !writable) and RISC-V map R at 4K and log nothing; x86 maps 4K
    writable and ``make_spte`` marks the page dirty at once."""
    vm, _hva = slot_vm(arch, fill=0x11, flags=LOG)
    assert access(vm, G + P, 4, READ) == {"result": "ok", "value": 0x11111111}
    leaf = leaf_at(vm, G + P)
    assert leaf.size == P
    gfn = (G + P) >> 12
    if arch == "x86":
        assert leaf.perm.write
        assert kvm_get_dirty_log(vm, 0) == [gfn]
        assert not leaf_at(vm, G + P).perm.write  # GET re-write-protects
    else:
        assert not leaf.perm.write
        assert kvm_get_dirty_log(vm, 0) == []
    validate_vm(vm)


@pytest.mark.parametrize("arch", ARCHES)
def test_row_log_dirty_write_writable_page_maps_rw_and_marks_dirty(arch: str) -> None:
    """§3.5.2 LOG_DIRTY / write / "writable page" -> map RW 4K and
    ``mark_page_dirty_in_slot``; after KVM_GET_DIRTY_LOG the page is write-protected
    again and the next write is logged again (§7.1)."""
    vm, hva = slot_vm(arch, fill=0x11, flags=LOG)
    gfn = (G + 2 * P) >> 12
    assert access(vm, G + 2 * P, 4, WRITE, 0x22) == {"result": "ok"}
    leaf = leaf_at(vm, G + 2 * P)
    assert leaf.size == P and leaf.perm.write
    assert kvm_get_dirty_log(vm, 0) == [gfn]
    validate_vm(vm)
    assert not leaf_at(vm, G + 2 * P).perm.write
    assert kvm_get_dirty_log(vm, 0) == []
    assert access(vm, G + 2 * P, 4, WRITE, 0x23) == {"result": "ok"}
    assert kvm_get_dirty_log(vm, 0) == [gfn]
    assert vm.mm.host_read(hva + 2 * P, 4) == 0x23


@pytest.mark.parametrize("arch", ARCHES)
def test_row_log_dirty_write_pfnmap_after_remap(arch: str) -> None:
    """§3.5.2 LOG_DIRTY / write / "VM_PFNMAP (after userspace remap)": prepare only
    refused PFNMAP+logging at creation; a device mapping put over the slot later is
    mapped at 4K (logging forces pages), Device (arm64) / UC (x86), writable per the
    host PTE, and marked dirty."""
    vm, hva = slot_vm(arch, fill=0x11, flags=LOG)
    dev = vm.mm.mmap(4 * P, RW, "device", addr=hva, fixed=True)
    assert dev == hva
    assert access(vm, G + P, 4, WRITE, 0x99) == {"result": "ok"}
    leaf = leaf_at(vm, G + P)
    assert leaf.size == P and leaf.perm.write
    assert leaf.pfn == host_frame(vm, hva + P)
    if arch != "riscv":
        assert leaf.attr is MemAttr.DEVICE
    assert kvm_get_dirty_log(vm, 0) == [(G + P) >> 12]
    validate_vm(vm)


@pytest.mark.parametrize("arch", ARCHES)
def test_row_log_dirty_readonly_slot_logging_inactive(arch: str) -> None:
    """§3.5.2 LOG_DIRTY+READONLY / any: arm64/RISC-V ``memslot_is_logging`` is false
    (read-only), so huge mappings stay allowed (2M block over hugetlb); x86's dirty-track
    check is flag based (``kvm_mmu_hugepage_adjust``) -> 4K; never writable, never dirty,
    writes exit as MMIO."""
    vm, _hva = slot_vm(arch, kind="hugetlb", size=2 * M2, fill=0x44, flags=LOG | RO,
                      addr=HVA_2M)
    out = vm.guest_access(G, 4, READ).to_outcome()
    assert out == {"result": "ok", "value": 0x44444444}
    leaf = leaf_at(vm, G)
    assert leaf.size == (P if arch == "x86" else M2)
    assert not leaf.perm.write
    assert kvm_get_dirty_log(vm, 0) == []
    validate_vm(vm)
    assert access(vm, G + P, 4, WRITE, 1)["result"] == "mmio"
    assert kvm_get_dirty_log(vm, 0) == []


@pytest.mark.parametrize("arch", ARCHES)
def test_row_gmem_private(arch: str) -> None:
    """§3.5.2 gmem (private) / any: arm64 ``gmem_abort``, x86 ``kvm_gmem_get_pfn``: the
    guest_memfd's page at 4K, writable, whatever the slot's hva maps (x86: a private
    gfn of a sw_protected VM; arm64: a gmem-only slot, its only kind; riscv has none)."""
    if arch == "riscv":
        pytest.skip("the table has no such case on riscv (no guest_memfd up to 7.3)")
    vm = Vm(arch, vm_type="sw_protected" if arch == "x86" else "default")
    gmem = vm.create_guest_memfd(4 * P, GUEST_MEMFD_FLAG_MMAP if arch == "arm64" else 0)
    hva = vm.mm.mmap(4 * P, RW, "anon", fill=0x5A)
    vm.set_user_memory_region(0, G, 4 * P, hva, KVM_MEM_GUEST_MEMFD, guest_memfd=gmem.fd,
                              v2=True)
    if arch == "x86":
        drive(vm.set_memory_attributes_op(G, P, KVM_MEMORY_ATTRIBUTE_PRIVATE))
    for kind in (READ, WRITE, EXEC):
        assert access(vm, G, 4, kind, 1)["result"] == "ok", kind
    leaf = leaf_at(vm, G)
    assert (leaf.pfn, leaf.size, leaf.perm.write) == (gmem.inode.cache[0], P, True)
    assert vm.mm.host_read(hva, 4) == 0x5A5A5A5A


# =====================================================================================
# Huge mappings: fault_supports_stage2_huge_mapping (arm64, riscv) / lpage_info (x86)
# =====================================================================================

HUGE_KINDS = ["thp", "hugetlb"]


@pytest.mark.parametrize("kind", HUGE_KINDS)
@pytest.mark.parametrize("arch", ARCHES)
def test_huge_aligned_backing_maps_2m_leaf(arch: str, kind: str) -> None:
    """§6: 2M-aligned slot and hva over a 2M host leaf -> one 2M stage-2 block (arm64
    hugetlb ``get_vma_page_shift`` / THP ``transparent_hugepage_adjust``; x86
    ``kvm_mmu_hugepage_adjust`` via ``host_pfn_mapping_level``; RISC-V hugetlb size / THP
    adjust), mapping the same frames as the host leaf."""
    vm, hva = slot_vm(arch, kind=kind, size=2 * M2, fill=0x66, addr=HVA_2M)
    out = vm.guest_access(G + 5 * P, 4, READ).to_outcome()
    assert out == {"result": "ok", "value": 0x66666666}
    assert vm.mm.host_mapping_size(hva) == M2
    leaf = leaf_at(vm, G + 5 * P)
    assert leaf.size == M2 and leaf.perm.write
    assert leaf.pfn == host_frame(vm, hva + 5 * P)
    assert vm.stats_dict()["pages_2m"] == 1
    validate_vm(vm)


@pytest.mark.parametrize("kind", HUGE_KINDS)
@pytest.mark.parametrize("arch", ARCHES)
def test_huge_gpa_hva_not_congruent_maps_4k(arch: str, kind: str) -> None:
    """§3.2.4 / §3.3.3: gpa and hva not congruent modulo 2M (slot at a 4K-offset gpa over
    a 2M-aligned hva) -> ``fault_supports_stage2_huge_mapping`` false / every
    ``lpage_info`` entry disallowed -> 4K, although the host leaf is 2M."""
    vm, hva = slot_vm(arch, kind=kind, size=2 * M2, fill=0x66, gpa=G + P, addr=HVA_2M)
    assert access(vm, G + P, 4, READ) == {"result": "ok", "value": 0x66666666}
    assert vm.mm.host_mapping_size(hva) == M2
    leaf = leaf_at(vm, G + P)
    assert leaf.size == P
    assert leaf.pfn == host_frame(vm, hva)
    assert vm.stats_dict()["pages_2m"] == 0


@pytest.mark.parametrize("arch", ARCHES)
def test_huge_slot_smaller_than_block_maps_4k(arch: str) -> None:
    """§3.2.4 / §3.3.3: the 2M block around the hva must lie inside the slot (arm64/RISC-V
    block-inside-slot check; x86 ``lpage_info`` head/tail frames disallowed): a 1M slot
    over a hugetlb page maps 4K."""
    vm = Vm(arch)
    hva = vm.mm.mmap(M2, RW, "hugetlb", fill=0x67, addr=HVA_2M, fixed=True)
    vm.set_user_memory_region(0, G, M2 // 2, hva)
    assert access(vm, G, 4, READ) == {"result": "ok", "value": 0x67676767}
    assert leaf_at(vm, G).size == P


@pytest.mark.parametrize("arch", ARCHES)
def test_huge_log_dirty_forces_4k(arch: str) -> None:
    """§6 / §7.1: dirty logging forces page mappings (arm64 ``force_pte``, RISC-V
    logging -> PAGE_SIZE, x86 ``kvm_slot_dirty_track_enabled``) even over hugetlb."""
    vm, _hva = slot_vm(arch, kind="hugetlb", size=2 * M2, fill=0x68, flags=LOG, addr=HVA_2M)
    assert access(vm, G, 4, WRITE, 0x1) == {"result": "ok"}
    leaf = leaf_at(vm, G)
    assert leaf.size == P and leaf.perm.write
    assert kvm_get_dirty_log(vm, 0) == [G >> 12]


# =====================================================================================
# Path-specific and page-crossing outcomes (kvm-on-this-host.md §3.3, §3.4)
# =====================================================================================


def test_x86_emulated_path_write_to_prot_read_vma_exits_mmio() -> None:
    """kvm-on-this-host.md §3.4: a writable slot over a PROT_READ VMA; the emulated path
    (``kvm_vcpu_write_guest`` -> ``copy_to_user`` fails) turns the write into
    KVM_EXIT_MMIO, the native path gets EFAULT; reads work on both."""
    vm = Vm("x86")
    hva = vm.mm.mmap(4 * P, PROT_READ, "anon")
    vm.set_user_memory_region(0, G, 4 * P, hva)
    vcpu = vm.vcpus[0]
    vcpu.path = "emulated"
    assert access(vm, G, 4, WRITE, 0xAB) == {"result": "mmio", "gpa": G, "len": 4,
                                             "is_write": True, "data": 0xAB}
    assert access(vm, G, 4, READ) == {"result": "ok", "value": 0}
    vcpu.path = "native"
    assert access(vm, G, 4, WRITE, 0xAB) == {"result": "fault"}
    assert access(vm, G, 4, READ) == {"result": "ok", "value": 0}
    assert vm.mm.host_read(hva, 4) == 0


# A page-crossing access at a slot edge: x86's emulator splits it page by page
# (kvm-on-this-host.md §3.3, and x86 7.3 with TDP); arm64 and riscv have no emulator
# and exit whole, with the full length at the edge (real arm64 6.1/6.12/7.3, riscv
# 6.12/7.2: kernel-matrix.md §7).
SPLITS = {"x86": True, "arm64": False, "riscv": False}


@pytest.mark.parametrize("arch", ARCHES)
def test_page_crossing_read_at_slot_end(arch: str) -> None:
    """8 bytes at slot_end-4: on x86 only the part outside the slot exits (MMIO read at
    slot_end, len 4) and the RAM half is read; elsewhere one exit of 8 at slot_end,
    answered with zeros in every byte."""
    vm, _hva = slot_vm(arch, fill=0x11)
    end = G + 4 * P
    out = access(vm, end - 4, 8, READ)
    if SPLITS[arch]:
        assert out == {"result": "mmio", "gpa": end, "len": 4, "is_write": False,
                       "value": 0x11111111}
    else:
        assert out == {"result": "mmio", "gpa": end, "len": 8, "is_write": False}


@pytest.mark.parametrize("arch", ARCHES)
def test_page_crossing_write_at_slot_end(arch: str) -> None:
    """An 8-byte write at slot_end-4: x86 writes the RAM half and the exit carries the
    other 4 bytes; arm64/riscv exit with all 8 bytes and store none."""
    vm, hva = slot_vm(arch, fill=0x11)
    end = G + 4 * P
    out = access(vm, end - 4, 8, WRITE, QWORD)
    if SPLITS[arch]:
        assert out == {"result": "mmio", "gpa": end, "len": 4, "is_write": True,
                       "data": QWORD >> 32}
        assert vm.mm.host_read(hva + 4 * P - 4, 4) == QWORD & 0xFFFF_FFFF
    else:
        assert out == {"result": "mmio", "gpa": end, "len": 8, "is_write": True,
                       "data": QWORD}
        assert vm.mm.host_read(hva + 4 * P - 4, 4) == 0x11111111


@pytest.mark.parametrize("arch", ARCHES)
def test_page_crossing_write_rw_slot_next_to_readonly_slot(arch: str) -> None:
    """A RW slot next to a READONLY slot: x86 writes the RW half and the read-only half
    exits as MMIO (len 4); arm64/riscv exit whole at the edge and write nothing."""
    vm = Vm(arch)
    a = vm.mm.mmap(4 * P, RW, "anon", fill=0x11)
    b = vm.mm.mmap(4 * P, RW, "anon", fill=0x22)
    vm.set_user_memory_region(0, G, 4 * P, a)
    vm.set_user_memory_region(1, G + 4 * P, 4 * P, b, RO)
    edge = G + 4 * P
    out = access(vm, edge - 4, 8, WRITE, QWORD)
    split = SPLITS[arch]
    assert out == {"result": "mmio", "gpa": edge, "len": 4 if split else 8,
                   "is_write": True, "data": QWORD >> 32 if split else QWORD}
    assert vm.mm.host_read(a + 4 * P - 4, 4) == (QWORD & 0xFFFF_FFFF if split else 0x11111111)
    assert vm.mm.host_read(b, 4) == 0x22222222
