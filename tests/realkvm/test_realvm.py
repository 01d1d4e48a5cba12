"""Real KVM on this host: each test runs a guest and checks what the kernel did.

Skipped, with the reason, where /dev/kvm cannot run a VM (``kvm`` fixture).  The
expected outcomes are those kvm-on-this-host.md records for this kernel, which are
also upstream's except where noted (no KVM_EXIT_MEMORY_FAULT on PVM).
"""

from __future__ import annotations

import pytest

from kvmmem.realkvm import HarnessConflict, HostMemory, Kvm, RealVm, libc
from kvmmem.realkvm.harness import HARNESS_WINDOW
from kvmmem.realkvm.host import MappingUnsupported, hugetlb_free_bytes
from kvmmem.realkvm.structs import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY

from .helpers import G, M, open_fds, rss_bytes

RW = libc.PROT_READ | libc.PROT_WRITE
PATHS = ("native", "emulated")


def _slot(host: HostMemory, vm: RealVm, slot: int = 0, gpa: int = G, size: int = M,
          kind: str = "anon", prot: int = RW, flags: int = 0, fill: int | None = None) -> int:
    name = f"m{slot}"
    assert host.mmap(name, size, kind, prot, fill) == {"result": "ok"}
    assert vm.set_memslot(slot, gpa, size, host.hva(name), flags) == {"result": "ok"}
    return host.hva(name)


@pytest.mark.parametrize("path", PATHS)
def test_guest_write_then_host_read(host: HostMemory, vm: RealVm, path: str) -> None:
    """hva_to_pfn / kvm_vcpu_write_guest: a guest store lands in the slot's host
    memory, and a host store is what the guest then loads."""
    hva = _slot(host, vm)
    for size, value in ((1, 0xA1), (2, 0xB2B1), (4, 0xC4C3C2C1), (8, 0xD8D7D6D5D4D3D2D1)):
        assert vm.guest_write(G + 0x1000 + size, size, value, path=path) == {"result": "ok"}
        assert host.host_read(hva + 0x1000 + size, size) == {"result": "ok", "value": value}
    assert host.host_write(hva + 0x2008, 8, 0x1122334455667788) == {"result": "ok"}
    assert vm.guest_read(G + 0x2008, 8, path=path) == {"result": "ok",
                                                       "value": 0x1122334455667788}
    assert vm.guest_read(G + 0x200A, 2, path=path) == {"result": "ok", "value": 0x5566}


@pytest.mark.parametrize("path", PATHS)
def test_no_slot_read_and_write_exit_as_mmio(vm: RealVm, path: str) -> None:
    """A gpa in no memslot: the emulator turns the access into KVM_EXIT_MMIO
    (vcpu_mmio_read/write failing -> emulator_read_write_onepage); the read is
    answered with zeros."""
    gpa = G + 8 * M + 0x10
    assert vm.guest_read(gpa, 4, path=path) == {
        "result": "mmio", "gpa": gpa, "len": 4, "is_write": False, "value": 0}
    assert vm.guest_write(gpa, 2, 0xBEEF, path=path) == {
        "result": "mmio", "gpa": gpa, "len": 2, "is_write": True, "data": 0xBEEF}


def test_page_crossing_read_exits_only_for_the_part_outside(host: HostMemory,
                                                            vm: RealVm) -> None:
    """emulator_read_write splits at the page: RAM half read, MMIO half exits (len 4)."""
    hva = _slot(host, vm)
    host.host_write(hva + M - 4, 4, 0x11223344)
    out = vm.guest_read(G + M - 4, 8)
    assert out == {"result": "mmio", "gpa": G + M, "len": 4, "is_write": False,
                   "value": 0x11223344}


@pytest.mark.parametrize("path", PATHS)
def test_readonly_slot_write_exits_with_data(host: HostMemory, vm: RealVm, path: str) -> None:
    """KVM_MEM_READONLY: reads map, a write is emulated into KVM_EXIT_MMIO carrying the
    little-endian data, and memory is unchanged (kvm_faultin_pfn -> RO slot ->
    emulate)."""
    hva = _slot(host, vm, flags=KVM_MEM_READONLY, fill=0x5A)
    assert vm.guest_read(G + 8, 4, path=path) == {"result": "ok", "value": 0x5A5A5A5A}
    out = vm.guest_write(G + 0x10, 8, 0xA1A2A3A4A5A6A7A8, path=path)
    assert out == {"result": "mmio", "gpa": G + 0x10, "len": 8, "is_write": True,
                   "data": 0xA1A2A3A4A5A6A7A8}
    assert host.host_read(hva + 0x10, 8) == {"result": "ok", "value": 0x5A5A5A5A5A5A5A5A}


def test_writable_slot_over_read_only_vma(host: HostMemory, vm: RealVm) -> None:
    """A writable slot over a PROT_READ VMA: hva_to_pfn cannot get a writable page, so
    the native write makes KVM_RUN fail with EFAULT; the emulator's copy_to_user
    fails too and becomes an MMIO exit.  Reads work on both paths."""
    _slot(host, vm, prot=libc.PROT_READ)
    assert vm.guest_read(G, 8, path="native") == {"result": "ok", "value": 0}
    assert vm.guest_write(G, 8, 1, path="native")["result"] == "fault"
    assert vm.guest_read(G, 8, path="emulated") == {"result": "ok", "value": 0}
    assert vm.guest_write(G, 8, 1, path="emulated") == {
        "result": "mmio", "gpa": G, "len": 8, "is_write": True, "data": 1}


def test_munmap_behind_live_slot(host: HostMemory, vm: RealVm) -> None:
    """munmap behind a live slot: the MMU notifier (kvm_mmu_notifier_invalidate_range_start)
    zaps the SPTEs and the next native access faults (no VMA: EFAULT); the emulator's
    copy_from_user fails into MMIO."""
    hva = _slot(host, vm, fill=0x33)
    assert vm.guest_read(G, 8) == {"result": "ok", "value": 0x3333333333333333}
    pages_before = vm.stats()["pages_4k"]
    assert host.munmap(hva, M) == {"result": "ok"}
    assert vm.stats()["pages_4k"] < pages_before
    assert vm.guest_read(G, 8)["result"] == "fault"
    assert vm.guest_write(G, 8, 7)["result"] == "fault"
    assert vm.guest_read(G, 8, path="emulated")["result"] == "mmio"
    assert host.host_read(hva, 8) == {"result": "signal", "signal": "SIGSEGV"}


def test_watchdog_stops_a_spinning_guest(kvm: Kvm, host: HostMemory) -> None:
    """A guest that never exits is stopped by SIGALRM + immediate_exit (KVM_RUN returns
    EINTR) and reported; the vCPU then runs the next access normally."""
    with RealVm([(G, M)], [0], timeout=0.2, kvm=kvm) as vm:
        _slot(host, vm, fill=1)
        assert vm.spin() == {"result": "timeout", "seconds": 0.2}
        assert vm.guest_read(G, 1) == {"result": "ok", "value": 1}


def test_dirty_log_reports_written_pages_once(host: HostMemory, vm: RealVm) -> None:
    """KVM_GET_DIRTY_LOG: guest writes (native and emulated) mark their gfn, reads and
    host stores do not, and the get clears the log (kvm_get_dirty_log_protect)."""
    hva = _slot(host, vm, flags=KVM_MEM_LOG_DIRTY_PAGES)
    vm.guest_write(G + 0x3000, 4, 1)
    vm.guest_write(G + 0x5000, 4, 1, path="emulated")
    vm.guest_read(G + 0x7000, 4)
    host.host_write(hva + 0x9000, 4, 1)
    gfn = G >> 12
    assert vm.get_dirty_log(0) == {"result": "ok", "dirty": [gfn + 3, gfn + 5]}
    assert vm.get_dirty_log(0) == {"result": "ok", "dirty": []}
    assert vm.get_dirty_log(1) == {"result": "error", "errno": "ENOENT"}


def test_memslot_errnos(host: HostMemory, vm: RealVm) -> None:
    """kvm_set_memory_region checks: overlap -> EEXIST, misaligned -> EINVAL, deleting
    a slot that does not exist -> EINVAL, a changed READONLY flag -> EINVAL."""
    hva = _slot(host, vm)
    assert vm.set_memslot(1, G + 0x1000, 0x1000, hva) == {"result": "error", "errno": "EEXIST"}
    assert vm.set_memslot(1, G + M + 0x10, 0x1000, hva)["errno"] == "EINVAL"
    assert vm.set_memslot(2, 0, 0, 0) == {"result": "error", "errno": "EINVAL"}
    assert vm.set_memslot(0, G, M, hva, KVM_MEM_READONLY)["errno"] == "EINVAL"
    assert vm.set_memslot(0, G, 0, 0) == {"result": "ok"}
    assert vm.guest_read(G, 4)["result"] == "mmio"


def test_prefault_reports_the_kernels_answer(vm: RealVm, kvm: Kvm) -> None:
    """KVM_PRE_FAULT_MEMORY: ok where the capability exists, else the ioctl's errno
    (EOPNOTSUPP on this PVM host, kvm-on-this-host.md §4)."""
    out = vm.prefault(G, 0x1000)
    if vm.vm.supports("KVM_PRE_FAULT_MEMORY"):
        assert out["result"] in ("ok", "error")
    else:
        assert out == {"result": "error", "errno": "EOPNOTSUPP"}


def test_stats_count_faults_and_sptes(host: HostMemory, vm: RealVm) -> None:
    """Binary stats: a native read of a fresh page takes pf_taken/pf_fixed and adds
    leaf SPTEs (pages_4k); deleting a slot zaps every shadow page (mmu_shadow_zapped)."""
    _slot(host, vm, fill=2)
    before = vm.stats()
    assert {"pages_4k", "pf_fixed", "mmio_exits", "mmu_shadow_zapped"} <= set(before)
    vm.guest_read(G + 0x4000, 8)
    after = vm.stats()
    assert after["pf_fixed"] > before["pf_fixed"]
    assert after["pages_4k"] > before["pages_4k"]
    assert after["mmio_exits"] >= before["mmio_exits"] + 1  # the doorbell
    vm.set_memslot(0, G, 0, 0)
    assert vm.stats()["mmu_shadow_zapped"] > after["mmu_shadow_zapped"]


def test_guest_exec(host: HostMemory, vm: RealVm) -> None:
    """Instruction fetch: from RAM it succeeds; from a gpa without a slot the emulator
    cannot fetch and injects #UD (handle_emulation_failure, CPL3)."""
    _slot(host, vm)
    assert vm.guest_exec(G + 0x100) == {"result": "ok"}
    assert vm.guest_exec(G + 8 * M) == {"result": "abort", "abort": "#UD"}
    assert vm.guest_read(G, 4) == {"result": "ok", "value": 0}


def test_device_mapping_is_a_real_pfnmap(host: HostMemory, vm: RealVm) -> None:
    """A `device` mapping (perf user pages, VM_PFNMAP|VM_IO): hva_to_pfn takes the
    follow_pfnmap path; guest and host see the same frame."""
    hva = _slot(host, vm, kind="device", size=8 * 0x1000, fill=0x44)
    with open("/proc/self/smaps") as f:
        text = f.read()
    start = text.index(f"{hva:x}-")
    flags = text[start:].split("VmFlags:")[1].split("\n")[0].split()
    assert {"pf", "io"} <= set(flags)
    assert vm.guest_read(G + 0x1008, 8)["value"] == 0x4444444444444444
    assert vm.guest_write(G + 0x2000, 4, 0x12345678) == {"result": "ok"}
    assert host.host_read(hva + 0x2000, 4) == {"result": "ok", "value": 0x12345678}


def test_unsupported_mapping_kinds_say_why(host: HostMemory) -> None:
    """device-lazy has no source here; hugetlb needs free pool pages (never allocated
    by kvmmem)."""
    with pytest.raises(MappingUnsupported, match="lazily"):
        host.mmap("x", M, "device-lazy", RW)
    if hugetlb_free_bytes() < M:
        with pytest.raises(MappingUnsupported, match="nr_hugepages"):
            host.mmap("h", M, "hugetlb", RW)


def test_harness_conflict_is_clear_and_leaks_nothing(kvm: Kvm) -> None:
    """A scenario that takes every slot id leaves the harness no room: HarnessConflict,
    and the half-built VM is released."""
    fds = open_fds()
    with pytest.raises(HarnessConflict, match="every memslot id"):
        RealVm([], range(40000), kvm=kvm)
    with RealVm([(G, M)], [0], kvm=kvm) as vm, pytest.raises(HarnessConflict):
        vm.set_memslot(1, vm.layout.gpa, HARNESS_WINDOW, 0)
    assert open_fds() == fds


def test_many_vms_keep_fds_and_rss_flat(kvm: Kvm) -> None:
    """200 RealVm create/run/destroy cycles (with host mappings) leave the open-fd count
    unchanged and RSS flat (bench/bench_realkvm.py runs 1000)."""

    def cycle(i: int) -> None:
        with HostMemory() as host, RealVm([(G, M)], [0], kvm=kvm) as vm:
            _slot(host, vm)
            vm.guest_write(G + 0x10, 8, i)
            assert vm.guest_read(G + 0x10, 8)["value"] == i

    for i in range(20):
        cycle(i)
    fds, rss = open_fds(), rss_bytes()
    for i in range(200):
        cycle(i)
    print(f"fds {fds} -> {open_fds()}, rss {rss >> 10} KiB -> {rss_bytes() >> 10} KiB")
    assert open_fds() == fds
    assert rss_bytes() - rss < 4 << 20


@pytest.mark.parametrize("path", PATHS)
def test_upper_half_gpa_is_reached_through_an_alias(kvm: Kvm, host: HostMemory,
                                                    path: str) -> None:
    """A slot above 2^47 (inside MAXPHYADDR 48): the guest reaches it through a
    lower-half alias GiB of its page tables, and the slot serves it like any other."""
    bits = kvm.phys_bits()
    if bits < 48:
        pytest.skip(f"the guest's MAXPHYADDR here is {bits}: no gpa above 2^47 exists")
    gpa = (1 << 47) + (5 << 30)
    with RealVm([(gpa, M)], [0], kvm=kvm) as vm:
        hva = _slot(host, vm, gpa=gpa, fill=0x66)
        assert vm.guest_read(gpa + 8, 2, path=path) == {"result": "ok", "value": 0x6666}
        assert vm.guest_write(gpa + 16, 4, 0x01020304, path=path) == {"result": "ok"}
        assert host.host_read(hva + 16, 4) == {"result": "ok", "value": 0x01020304}
        assert vm.guest_read(gpa + M, 4, path=path)["result"] == "mmio"
        beyond = vm.guest_read(1 << bits, 4, path=path)
        assert beyond["result"] == "unsupported" and "MAXPHYADDR" in beyond["reason"]


def test_vcpus_share_the_slots(host: HostMemory, vm: RealVm) -> None:
    """Every vCPU of a VM sees the same memslots (kvm_vcpu_memslots of address space 0);
    the vCPUs may run on different paths."""
    _slot(host, vm)
    assert vm.guest_write(G, 4, 0xAABBCCDD, vcpu=0) == {"result": "ok"}
    assert vm.guest_read(G, 4, vcpu=1, path="emulated") == {"result": "ok",
                                                            "value": 0xAABBCCDD}
    assert vm.guest_read(G, 4, vcpu=1) == {"result": "ok", "value": 0xAABBCCDD}


def _anon_huge_kib(hva: int) -> int:
    with open("/proc/self/smaps") as f:
        text = f.read()
    block = text[text.index(f"{hva:x}-"):].split("VmFlags:")[0]
    return int(block.split("AnonHugePages:")[1].split()[0])


def test_thp_backed_slot_gets_a_2m_spte(host: HostMemory, vm: RealVm) -> None:
    """A THP-backed slot: kvm_mmu_hugepage_adjust maps the guest's 2 MiB page with a
    level-2 SPTE (pages_2m), when the host really got a huge page."""
    hva = _slot(host, vm, kind="thp", fill=0x77)
    if _anon_huge_kib(hva) < 2048:
        pytest.skip("the host did not back the THP mapping with a huge page this time")
    before = vm.stats()["pages_2m"]
    assert vm.guest_read(G + 0x1234, 1) == {"result": "ok", "value": 0x77}
    assert vm.stats()["pages_2m"] == before + 1
