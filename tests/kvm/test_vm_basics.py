"""VM basics: memslot delete/move zaps, MMU-notifier effects of host VMA changes,
slot aliasing, KVM_PRE_FAULT_MEMORY errors and dirty-log GET/CLEAR errnos.

References: kernel-semantics.md §1.7 (``kvm_set_memslot``: DELETE/MOVE
invalidate and ``kvm_arch_flush_shadow_memslot``), §4 (MMU notifiers,
``kvm_mmu_notifier_invalidate_range_start`` -> ``kvm_unmap_gfn_range``), §5
(``kvm_vcpu_pre_fault_memory``, ``kvm_arch_vcpu_pre_fault_memory``) and §8.2
(``pre_fault_memory_test.c``), §7.1 (``kvm_get_dirty_log_protect``,
``kvm_clear_dirty_log_protect``); kvm-on-this-host.md §3.5 (VMA changes behind a
live slot on the real KVM, x86 zap-all on delete/move) and §4 (dirty log).
Every guest access is followed by ``validate_vm``.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmmem.errors import KernelError
from kvmmem.host import PROT_NONE, PROT_READ, PROT_WRITE
from kvmmem.kvm.dirty_log import kvm_clear_dirty_log, kvm_get_dirty_log
from kvmmem.kvm.invariants import validate_coherence, validate_vm
from kvmmem.kvm.memslot import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY
from kvmmem.kvm.prefault import kvm_vcpu_pre_fault_memory
from kvmmem.kvm.vcpu import Access
from kvmmem.kvm.vm import Vm

ARCHES = ("x86", "arm64", "riscv")
P = 4096
G = 0x4000_0000
G2 = 0x8000_0000
SIZE = 16 * P
RW = PROT_READ | PROT_WRITE
LOG = KVM_MEM_LOG_DIRTY_PAGES
READ, WRITE = Access.READ, Access.WRITE


def access(vm: Vm, gpa: int, size: int, kind: Access, value: int = 0) -> dict[str, Any]:
    out = vm.guest_access(gpa, size, kind, value).to_outcome()
    validate_vm(vm)
    if kind is WRITE and out["result"] == "ok":
        validate_coherence(vm, gpa, size, value)
    return out


def slot_vm(arch: str, *, kind: str = "anon", fill: int | None = 0x11, flags: int = 0,
            size: int = SIZE, variant: str = "upstream") -> tuple[Vm, int]:
    vm = Vm(arch, variant=variant)
    hva = vm.mm.mmap(size, RW, kind, fill=fill)
    vm.set_user_memory_region(0, G, size, hva, flags)
    return vm, hva


def read(vm: Vm, gpa: int) -> dict[str, Any]:
    return access(vm, gpa, 4, READ)


def ok(value: int) -> dict[str, Any]:
    return {"result": "ok", "value": value}


def fault(gpa: int, size: int = 4) -> dict[str, Any]:
    """A failed access at ``gpa``: a bare EFAULT, no memory-fault gpa/size (no kernel
    fills ``kvm_run.memory_fault`` for shared memory)."""
    return {"result": "fault"}


# =====================================================================================
# Memslot delete / move / create: what gets zapped
# =====================================================================================


def two_slot_vm(arch: str) -> tuple[Vm, int, int]:
    """Slots 0 (G) and 1 (G2), each with two pages mapped."""
    vm = Vm(arch)
    a = vm.mm.mmap(SIZE, RW, "anon", fill=0x11)
    b = vm.mm.mmap(SIZE, RW, "anon", fill=0x22)
    vm.set_user_memory_region(0, G, SIZE, a)
    vm.set_user_memory_region(1, G2, SIZE, b)
    for gpa in (G, G + P, G2, G2 + P):
        assert read(vm, gpa)["result"] == "ok"
    assert vm.stats_dict()["pages_4k"] == 4
    return vm, a, b


@pytest.mark.parametrize("arch", ARCHES)
def test_memslot_delete_zaps_all_on_x86_only_the_slot_elsewhere(arch: str) -> None:
    """Deleting slot 1: ``kvm_arch_flush_shadow_memslot`` - x86 with
    KVM_X86_QUIRK_SLOT_ZAP_ALL (default) ``kvm_mmu_zap_all_fast``: every mapping of the
    VM goes (kvm-on-this-host.md §3.5: pages_4k -> 0, mmu_shadow_zapped up); arm64
    ``kvm_stage2_unmap_range`` / RISC-V ``kvm_riscv_gstage_unmap_range`` over the slot
    only.  The deleted gpa then exits as MMIO; the other slot still reads its data."""
    vm, _a, _b = two_slot_vm(arch)
    vm.set_user_memory_region(1, G2, 0, 0)
    stats = vm.stats_dict()
    if arch == "x86":
        assert stats["pages_4k"] == 0
        assert stats["mmu_shadow_zapped"] == 1
        assert vm.stage2.walk(G) is None
    else:
        assert stats["pages_4k"] == 2
        assert vm.stage2.walk(G) is not None and vm.stage2.walk(G + P) is not None
    assert vm.stage2.walk(G2) is None
    validate_vm(vm)
    assert read(vm, G2) == {"result": "mmio", "gpa": G2, "len": 4, "is_write": False}
    assert read(vm, G) == ok(0x11111111)


@pytest.mark.parametrize("arch", ARCHES)
def test_memslot_move_zaps_old_range(arch: str) -> None:
    """KVM_MR_MOVE (same id/size/uaddr, new gpa): the old gpa range is invalidated and
    zapped (x86: everything, as for delete); old gpa -> MMIO, new gpa -> the same data."""
    vm, _a, _b = two_slot_vm(arch)
    new = G2 + 0x10_0000
    vm.set_user_memory_region(1, new, SIZE, _b)
    stats = vm.stats_dict()
    assert stats["pages_4k"] == (0 if arch == "x86" else 2)
    assert vm.stage2.walk(G2) is None
    validate_vm(vm)
    assert read(vm, G2)["result"] == "mmio"
    assert read(vm, new + P) == ok(0x22222222)


@pytest.mark.parametrize("arch", ARCHES)
def test_memslot_create_zaps_nothing(arch: str) -> None:
    """KVM_MR_CREATE invalidates nothing (kvm-on-this-host.md §3.5 "creating a slot
    drops none"): existing leaves stay."""
    vm, _a, _b = two_slot_vm(arch)
    c = vm.mm.mmap(SIZE, RW, "anon")
    vm.set_user_memory_region(2, G2 + 0x100_0000, SIZE, c)
    assert vm.stats_dict()["pages_4k"] == 4
    assert vm.stats_dict()["mmu_shadow_zapped"] == 0


# =====================================================================================
# MMU notifier: host VMA changes behind a live slot
# =====================================================================================


@pytest.mark.parametrize("arch", ARCHES)
def test_munmap_behind_live_slot_faults_next_access(arch: str) -> None:
    """munmap -> MMU_NOTIFY_UNMAP -> ``kvm_unmap_gfn_range`` zaps the leaves; the next
    access finds no VMA -> -EFAULT (kvm-on-this-host.md §3.5).  A new anonymous MAP_FIXED
    at the same hva then reads 0."""
    vm, hva = slot_vm(arch)
    assert read(vm, G + P) == ok(0x11111111)
    assert access(vm, G + 2 * P, 4, WRITE, 5) == {"result": "ok"}
    vm.mm.munmap(hva, SIZE)
    validate_vm(vm)
    assert vm.stats_dict()["pages_4k"] == 0
    assert read(vm, G + P) == fault(G + P)
    assert access(vm, G + 2 * P, 4, WRITE, 6) == fault(G + 2 * P)
    vm.mm.mmap(SIZE, RW, "anon", addr=hva, fixed=True)
    assert read(vm, G + P) == ok(0)


@pytest.mark.parametrize("arch", ARCHES)
def test_madv_dontneed_anon_guest_reads_zero(arch: str) -> None:
    """MADV_DONTNEED on private anonymous memory: the notifier zaps, the pages are
    dropped, the guest's next read refaults the zero page (kvm-on-this-host.md §3.5)."""
    vm, hva = slot_vm(arch)
    assert access(vm, G + P, 4, WRITE, 0xABCD) == {"result": "ok"}
    vm.mm.madvise(hva, SIZE, "dontneed")
    validate_vm(vm)
    assert vm.stage2.walk(G + P) is None
    assert read(vm, G + P) == ok(0)
    assert read(vm, G) == ok(0)


@pytest.mark.parametrize("arch", ARCHES)
def test_madv_dontneed_memfd_keeps_data(arch: str) -> None:
    """MADV_DONTNEED on a shared memfd mapping only drops the PTEs: the shmem page cache
    keeps the data, the guest refaults the same page (kvm-on-this-host.md §3.5)."""
    vm, hva = slot_vm(arch, kind="memfd")
    assert access(vm, G + P, 4, WRITE, 0xABCD) == {"result": "ok"}
    vm.mm.madvise(hva, SIZE, "dontneed")
    validate_vm(vm)
    assert vm.stage2.walk(G + P) is None
    assert read(vm, G + P) == ok(0xABCD)
    assert read(vm, G) == ok(0x11111111)


@pytest.mark.parametrize("arch", ARCHES)
def test_map_fixed_memfd_over_live_slot_guest_sees_new_content(arch: str) -> None:
    """MAP_FIXED of another memfd over a live slot (A -> B): the replaced range is
    unmapped with notifiers; the guest reads B's content and its writes go to B
    (kvm-on-this-host.md §3.5)."""
    vm, hva = slot_vm(arch, kind="memfd")
    assert read(vm, G + P) == ok(0x11111111)
    b = vm.mm.memfd_create("B", SIZE)
    vm.mm.mmap(SIZE, RW, "memfd", file=b, addr=hva, fixed=True, fill=0x44)
    validate_vm(vm)
    assert read(vm, G + P) == ok(0x44444444)
    assert access(vm, G + 3 * P, 4, WRITE, 0x4545) == {"result": "ok"}
    other = vm.mm.mmap(SIZE, RW, "memfd", file=b)  # a second view of B
    assert vm.mm.host_read(other + 3 * P, 4) == 0x4545


@pytest.mark.parametrize("arch", ARCHES)
def test_mprotect_readonly_then_back_to_rw(arch: str) -> None:
    """mprotect(PROT_READ) zaps (protection downgrade notifies): reads map R, writes
    EFAULT; mprotect back to RW and the next write succeeds (mmu_stress_test stages 3/4;
    kvm-on-this-host.md §3.4)."""
    vm, hva = slot_vm(arch)
    assert access(vm, G, 4, WRITE, 1) == {"result": "ok"}
    vm.mm.mprotect(hva, SIZE, PROT_READ)
    validate_vm(vm)
    assert access(vm, G, 4, WRITE, 2) == fault(G)
    assert read(vm, G) == ok(1)
    leaf = vm.stage2.walk(G)
    assert leaf is not None and not leaf.perm.write
    vm.mm.mprotect(hva, SIZE, RW)
    assert access(vm, G, 4, WRITE, 3) == {"result": "ok"}
    assert vm.mm.host_read(hva, 4) == 3
    assert access(vm, G + P, 4, WRITE, 4) == {"result": "ok"}


@pytest.mark.parametrize("arch", ARCHES)
def test_mprotect_prot_none_then_back(arch: str) -> None:
    """mprotect(PROT_NONE): any access EFAULT; back to RW: the data is still there."""
    vm, hva = slot_vm(arch)
    assert access(vm, G, 4, WRITE, 7) == {"result": "ok"}
    vm.mm.mprotect(hva, SIZE, PROT_NONE)
    assert read(vm, G) == fault(G)
    vm.mm.mprotect(hva, SIZE, RW)
    assert read(vm, G) == ok(7)


@pytest.mark.parametrize("arch", ARCHES)
def test_two_slots_aliasing_one_hva_see_each_others_writes(arch: str) -> None:
    """Overlap in hva space is legal (only gpa overlap is checked, §1.5 rule 19; I9):
    a write through one alias is read through the other; a munmap invalidates both
    aliases (the notifier walks every slot whose hva range intersects)."""
    vm = Vm(arch)
    hva = vm.mm.mmap(SIZE, RW, "memfd", fill=0)
    vm.set_user_memory_region(0, G, SIZE, hva)
    vm.set_user_memory_region(1, G2, SIZE, hva)
    assert read(vm, G2 + P) == ok(0)
    assert access(vm, G + P, 4, WRITE, 0x1234) == {"result": "ok"}
    assert read(vm, G2 + P) == ok(0x1234)
    assert access(vm, G2 + 2 * P, 4, WRITE, 0x5678) == {"result": "ok"}
    assert read(vm, G + 2 * P) == ok(0x5678)
    vm.mm.munmap(hva, SIZE)
    validate_vm(vm)
    assert vm.stats_dict()["pages_4k"] == 0
    assert read(vm, G + P) == fault(G + P)
    assert read(vm, G2 + P) == fault(G2 + P)


@pytest.mark.parametrize("arch", ARCHES)
def test_two_slots_aliasing_private_anon(arch: str) -> None:
    """Aliases of private anonymous memory share the one anonymous page too (same mm,
    same PTE): the second alias's write fault does not COW away from the first."""
    vm = Vm(arch)
    hva = vm.mm.mmap(SIZE, RW, "anon")
    vm.set_user_memory_region(0, G, SIZE, hva)
    vm.set_user_memory_region(1, G2, SIZE, hva)
    assert access(vm, G, 4, WRITE, 9) == {"result": "ok"}
    assert read(vm, G2) == ok(9)
    assert access(vm, G2, 4, WRITE, 10) == {"result": "ok"}
    assert read(vm, G) == ok(10)


# =====================================================================================
# KVM_PRE_FAULT_MEMORY (kernel-semantics.md §5, pre_fault_memory_test.c)
# =====================================================================================


def prefault(vm: Vm, gpa: int, size: int, flags: int = 0) -> int:
    left = kvm_vcpu_pre_fault_memory(vm, vm.vcpus[0], gpa, size, flags)
    validate_vm(vm)
    return left


def prefault_errno(vm: Vm, gpa: int, size: int, flags: int = 0) -> str:
    with pytest.raises(KernelError) as err:
        kvm_vcpu_pre_fault_memory(vm, vm.vcpus[0], gpa, size, flags)
    validate_vm(vm)
    return err.value.errno


@pytest.mark.parametrize(("gpa", "size", "flags"), [
    (G + 1, P, 0),
    (G, P + 1, 0),
    (G, 0, 0),
    (G, P, 1),
    ((1 << 64) - P, 2 * P, 0),
], ids=["unaligned-gpa", "unaligned-size", "size-0", "flags", "overflow"])
def test_prefault_einval(gpa: int, size: int, flags: int) -> None:
    """``kvm_vcpu_pre_fault_memory``: flags != 0, gpa or size not page aligned, and
    ``gpa + size <= gpa`` (size 0 and wrap) -> EINVAL before anything is done (§5.1)."""
    vm, _ = slot_vm("x86")
    assert prefault_errno(vm, gpa, size, flags) == "EINVAL"
    assert vm.stats_dict()["pages_4k"] == 0


def test_prefault_enoent_outside_slots() -> None:
    """No memslot at the first gpa: the fault path returns RET_PF_EMULATE, which
    ``kvm_arch_vcpu_pre_fault_memory`` turns into ENOENT (§5.3 step 4)."""
    vm, _ = slot_vm("x86")
    assert prefault_errno(vm, G2, P) == "ENOENT"


def test_prefault_full_range_maps_readonly_without_accessed() -> None:
    """A full range: 0 bytes left; every page mapped as if by a *read* (private anon ->
    zero page, read-only: no CoW break), x86 entries not Accessed (prefetch); no guest
    fault counted; the guest then reads without faulting (pre_fault_memory_test)."""
    vm, _ = slot_vm("x86", fill=None)
    assert prefault(vm, G, SIZE) == 0
    stats = vm.stats_dict()
    assert stats["pages_4k"] == SIZE // P
    assert stats["pf_taken"] == 0
    for i in range(SIZE // P):
        leaf = vm.stage2.walk(G + i * P)
        assert leaf is not None and not leaf.perm.write and not leaf.young
        assert leaf.pfn == vm.mm.physmem.zero_pfn
    assert read(vm, G + 3 * P) == ok(0)
    assert vm.stats_dict()["pf_taken"] == 0


def test_prefault_partial_progress_returns_bytes_left_then_enoent() -> None:
    """pre_fault_memory_test: range ``[end - page, end + page)`` -> progress (return 0,
    one page left, here the bytes left); the next call from the slot end -> ENOENT;
    a range far past the slot keeps the unprocessed remainder."""
    vm, _ = slot_vm("x86")
    end = G + SIZE
    assert prefault(vm, end - P, 2 * P) == P
    assert vm.stage2.walk(end - P) is not None
    assert prefault_errno(vm, end, P) == "ENOENT"
    assert prefault(vm, G, 1 << 20) == (1 << 20) - SIZE


def test_prefault_efault_when_host_memory_cannot_be_faulted() -> None:
    """GUP fails (the slot's hva is unmapped) -> EFAULT (§5.1)."""
    vm, hva = slot_vm("x86")
    vm.mm.munmap(hva, SIZE)
    assert prefault_errno(vm, G, P) == "EFAULT"


def test_prefault_absent_before_v6_10() -> None:
    """KVM_PRE_FAULT_MEMORY was added in v6.10: a linux-5.4 vCPU does not know the
    ioctl (x86 ``kvm_arch_vcpu_ioctl`` default -> EINVAL)."""
    vm, _ = slot_vm("x86", variant="linux-5.4")
    assert prefault_errno(vm, G, P) == "EINVAL"


@pytest.mark.parametrize("arch", ["arm64", "riscv"])
def test_prefault_einval_on_arm64_riscv(arch: str) -> None:
    """Only x86 selects ``CONFIG_KVM_GENERIC_PRE_FAULT_MEMORY``: elsewhere
    ``kvm_vcpu_ioctl`` has no KVM_PRE_FAULT_MEMORY case and
    ``kvm_arch_vcpu_ioctl`` (arch/arm64/kvm/arm.c, arch/riscv/kvm/vcpu.c) answers
    the unknown ioctl with -EINVAL; nothing is mapped."""
    vm, _ = slot_vm(arch)
    assert prefault_errno(vm, G, P) == "EINVAL"
    assert prefault_errno(vm, G2, P) == "EINVAL"
    assert vm.stats_dict()["pages_4k"] == 0


# =====================================================================================
# Dirty log: KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG errnos (kernel-semantics.md §7.1)
# =====================================================================================


@pytest.mark.parametrize("arch", ARCHES)
def test_get_dirty_log_errnos(arch: str) -> None:
    """``kvm_get_dirty_log_protect``: ``as_id >= nr_as`` or ``id >= KVM_USER_MEM_SLOTS``
    -> EINVAL (x86: 2 address spaces, 32764 user slots; arm64/RISC-V 1 and 32767); no
    slot, or a slot without a dirty bitmap -> ENOENT (kvm-on-this-host.md §4)."""
    vm, _ = slot_vm(arch)
    user_slots = 32764 if arch == "x86" else 32767
    cases = {user_slots: "EINVAL", 0xFFFF: "EINVAL", 0: "ENOENT", 5: "ENOENT",
             user_slots - 1: "ENOENT", (1 << 16) | 0: "ENOENT" if arch == "x86" else "EINVAL",
             (2 << 16) | 0: "EINVAL"}
    for slot, errno in cases.items():
        with pytest.raises(KernelError) as err:
            kvm_get_dirty_log(vm, slot)
        assert err.value.errno == errno, hex(slot)


@pytest.mark.parametrize("arch", ARCHES)
def test_clear_dirty_log_errnos_in_kernel_order(arch: str) -> None:
    """``kvm_clear_dirty_log_protect``, first failing rule wins: bad slot id -> EINVAL;
    ``first_page % 64`` -> EINVAL (checked before the slot lookup); no slot / no bitmap
    -> ENOENT; ``first_page > npages``, ``num_pages > npages - first_page``, or
    ``num_pages`` not a multiple of 64 short of the slot end -> EINVAL."""
    npages = 100
    vm, _ = slot_vm(arch, flags=LOG, size=npages * P)
    nolog = vm.mm.mmap(SIZE, RW, "anon")
    vm.set_user_memory_region(1, G2, SIZE, nolog)
    user_slots = 32764 if arch == "x86" else 32767
    cases = [
        ((user_slots, 0, 64), "EINVAL"),
        ((7, 1, 64), "EINVAL"),       # first_page check precedes the lookup
        ((7, 0, 64), "ENOENT"),
        ((1, 0, 64), "ENOENT"),       # slot without LOG_DIRTY_PAGES
        ((0, 1, 64), "EINVAL"),
        ((0, 128, 0), "EINVAL"),      # first_page > npages
        ((0, 64, 37), "EINVAL"),      # beyond the slot
        ((0, 0, 101), "EINVAL"),
        ((0, 0, 36), "EINVAL"),       # not a multiple of 64, short of the end
    ]
    for args, errno in cases:
        with pytest.raises(KernelError) as err:
            kvm_clear_dirty_log(vm, *args)
        assert err.value.errno == errno, args
    for args in [(0, 64, 36), (0, 0, 64), (0, 0, 100), (0, 64, 0)]:
        kvm_clear_dirty_log(vm, *args)


@pytest.mark.parametrize("arch", ARCHES)
def test_clear_dirty_log_clears_and_reprotects_only_the_window(arch: str) -> None:
    """KVM_CLEAR_DIRTY_LOG clears the requested bits and write-protects exactly the pages
    that were requested and dirty; pages outside the window stay dirty and writable, a
    re-protected page is logged again on its next write."""
    vm, _ = slot_vm(arch, flags=LOG, size=128 * P)
    for page in (1, 70):
        assert access(vm, G + page * P, 4, WRITE, page) == {"result": "ok"}
    kvm_clear_dirty_log(vm, 0, 0, 64)
    leaf1, leaf70 = vm.stage2.walk(G + P), vm.stage2.walk(G + 70 * P)
    assert leaf1 is not None and not leaf1.perm.write
    assert leaf70 is not None and leaf70.perm.write
    validate_vm(vm)
    assert kvm_get_dirty_log(vm, 0) == [(G >> 12) + 70]
    assert access(vm, G + P, 4, WRITE, 11) == {"result": "ok"}
    assert kvm_get_dirty_log(vm, 0) == [(G >> 12) + 1]


@settings(max_examples=25, deadline=None)
@given(arch=st.sampled_from(ARCHES),
       dirty=st.sets(st.integers(0, 99), max_size=12),
       mask=st.sets(st.integers(0, 99), max_size=12),
       window=st.sampled_from([(0, 64), (64, 36), (0, 100)]))
def test_clear_dirty_log_user_bitmap(arch: str, dirty: set[int], mask: set[int],
                                     window: tuple[int, int]) -> None:
    """``kvm_clear_dirty_log_protect`` with a partial user bitmap: exactly the pages whose
    user bit is set, that lie in the window and are dirty, lose their bit and are
    write-protected again; every other dirty page keeps its bit and its writable entry."""
    first, num = window
    vm, _ = slot_vm(arch, flags=LOG, size=100 * P)
    for page in sorted(dirty):
        assert access(vm, G + page * P, 4, WRITE, page + 1) == {"result": "ok"}
    pages = [p for p in mask if first <= p < first + num]
    kvm_clear_dirty_log(vm, 0, first, num, pages)
    cleared = dirty & set(pages)
    for page in dirty:
        leaf = vm.stage2.walk(G + page * P)
        assert leaf is not None and leaf.perm.write == (page not in cleared), page
    validate_vm(vm)
    assert kvm_get_dirty_log(vm, 0) == sorted((G >> 12) + p for p in dirty - cleared)


@pytest.mark.parametrize("arch", ARCHES)
def test_dirty_log_readonly_slot_never_dirty(arch: str) -> None:
    """§7.1: a KVM_MEM_READONLY slot with LOG_DIRTY_PAGES never gets dirty bits (writes
    exit as MMIO; ``mark_page_dirty_in_slot`` is only called for writable mappings)."""
    vm, _ = slot_vm(arch, flags=LOG | KVM_MEM_READONLY)
    assert read(vm, G) == ok(0x11111111)
    assert access(vm, G, 4, WRITE, 1)["result"] == "mmio"
    assert kvm_get_dirty_log(vm, 0) == []


@pytest.mark.parametrize("arch", ARCHES)
def test_dirty_log_host_write_not_logged(arch: str) -> None:
    """kvm-on-this-host.md §4: a host (userspace) poke is not logged - only guest writes
    through KVM mark pages dirty."""
    vm, hva = slot_vm(arch, flags=LOG)
    vm.mm.host_write(hva + P, 4, 0x99)
    assert read(vm, G + P) == ok(0x99)
    if arch != "x86":  # x86 logs a writable read-fault mapping at once (§3.3.2 step 7)
        assert kvm_get_dirty_log(vm, 0) == []
