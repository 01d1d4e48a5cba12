"""KVM_SET_USER_MEMORY_REGION(2): validation, change kinds, limits, generations.

Each test names the kernel function / rule it mirrors: ``kvm_set_memory_region``
rules are numbered as in kernel-semantics.md §1.5, the flow is
``kvm_set_memslot`` (§1.7), generations ``kvm_swap_active_memslots`` (§1.8),
selftests are ``tools/testing/selftests/kvm/set_memory_region_test.c`` (§8.1),
and "host" cases are what the real KVM on this machine returned
(kvm-on-this-host.md §4).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from kvmmem.errors import InputError, KernelError, ValidationError
from kvmmem.kvm.arch_common import PG_LEVEL_2M, PG_LEVEL_4K
from kvmmem.kvm.arches import ArchMemslotHooks
from kvmmem.kvm.memslot import (
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_MAX_NR_PAGES,
    KVM_MEM_READONLY,
    KVM_MEM_SLOTS_NUM,
    KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS,
    KVM_MEMSLOT_INVALID,
    ULONG_MAX,
    X86_TASK_SIZE_MAX,
    GmemBinding,
    KvmMrChange,
    KvmUserspaceMemoryRegion,
    MemorySlot,
    MemslotSet,
    NoopMemslotHooks,
    SortedInts,
    VmMemslots,
    access_ok,
    check_memory_region_flags,
    kvm_dirty_bitmap_bytes,
    kvm_replace_memslot,
    kvm_set_internal_memslot,
    mark_page_dirty_in_slot,
    memslot_limits,
    region,
    untagged_addr,
    validate_memslot_set,
    validate_memslots,
)
from kvmmem.sync import Op, Sync, SyncKind, drive
from kvmmem.variants import LINUX_5_4

P = 4096
M2 = 2 << 20
HVA = 0x7F00_0000_0000
LOG = KVM_MEM_LOG_DIRTY_PAGES
RO = KVM_MEM_READONLY
GMEM = KVM_MEM_GUEST_MEMFD


def vm(arch: str = "x86", hooks: Any = None, **kw: Any) -> VmMemslots:
    return VmMemslots(memslot_limits(arch, **kw), hooks)


def err(fn: Callable[[], object]) -> KernelError:
    with pytest.raises(KernelError) as info:
        fn()
    assert info.value.call == "KVM_SET_USER_MEMORY_REGION"
    return info.value


def errno(kvm: VmMemslots, mem: KvmUserspaceMemoryRegion, v2: bool = False) -> str:
    return err(lambda: kvm.set_user_memory_region(mem, v2)).errno


def snapshot(kvm: VmMemslots) -> list[object]:
    """Everything a failing call must leave alone."""
    out: list[object] = [kvm.nr_memslot_pages, kvm.nr_memslots_dirty_logging]
    for as_id in range(kvm.limits.nr_as_ids):
        out.append(kvm.generation(as_id))
        out.append(kvm.memslots(as_id).node_idx)
        for slot in kvm.for_each_memslot(as_id):
            out.append((slot, slot.base_gfn, slot.npages, slot.userspace_addr, slot.flags,
                        None if slot.dirty_bitmap is None else id(slot.dirty_bitmap)))
    return out


def syncs(op: Op[Any]) -> tuple[list[str], BaseException | None]:
    """Drive ``op``, recording its pauses; returns them and what it raised."""
    seen: list[str] = []
    try:
        for s in op:
            seen.append(str(s))
    except KernelError as e:
        return seen, e
    return seen, None


def balanced(pauses: list[str]) -> bool:
    held: dict[str, int] = {}
    for p in pauses:
        kind, name = p.split()[0], p.split()[1]
        if kind == "acquire":
            held[name] = held.get(name, 0) + 1
        elif kind == "release":
            held[name] = held.get(name, 0) - 1
            if held[name] < 0:
                return False
    return all(v == 0 for v in held.values())


class Recorder(NoopMemslotHooks):
    """Records every hook call; ``fail_prepare`` makes prepare raise."""

    def __init__(self, fail_prepare: str | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.updated: list[int] = []
        self.fail_prepare = fail_prepare
        self.kvm: VmMemslots | None = None
        self.seen_in_flush: MemorySlot | None = None

    def prepare_memory_region(self, old: MemorySlot | None, new: MemorySlot | None,
                              change: KvmMrChange) -> Op[None]:
        self.calls.append(("prepare", old, new, change))
        if self.fail_prepare:
            raise KernelError(self.fail_prepare, "KVM_SET_USER_MEMORY_REGION", "test")
        return
        yield  # pragma: no cover

    def commit_memory_region(self, old: MemorySlot | None, new: MemorySlot | None,
                             change: KvmMrChange) -> None:
        self.calls.append(("commit", old, new, change))

    def flush_shadow_memslot(self, slot: MemorySlot) -> Op[None]:
        self.calls.append(("flush", slot))
        if self.kvm is not None:
            self.seen_in_flush = self.kvm.gfn_to_memslot(slot.base_gfn, slot.as_id)
        yield Sync(SyncKind.ACQUIRE, "mmu_lock")
        yield Sync(SyncKind.RELEASE, "mmu_lock")

    def memslots_updated(self, gen: int) -> None:
        self.updated.append(gen)

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


# --- the request ------------------------------------------------------------------------


def test_request_fields_are_uapi_widths() -> None:
    """struct kvm_userspace_memory_region2: u32 slot/flags/guest_memfd, u64 others."""
    mem = region(5, 0x1000, 0x2000, HVA, LOG, as_id=1)
    assert (mem.slot, mem.as_id, mem.id) == ((1 << 16) | 5, 1, 5)
    for bad in ({"slot": 1 << 32}, {"flags": -1}, {"guest_phys_addr": 1 << 64},
                {"memory_size": True}, {"userspace_addr": 1.0}):
        kw = {"slot": 0, "flags": 0, "guest_phys_addr": 0, "memory_size": 0,
              "userspace_addr": 0} | bad
        with pytest.raises(InputError):
            KvmUserspaceMemoryRegion(**kw)


# --- rule 1: check_memory_region_flags -------------------------------------------------------


@pytest.mark.parametrize("arch", ["x86", "arm64", "riscv"])
def test_invalid_memory_region_flags(arch: str) -> None:
    """set_memory_region_test.c test_invalid_memory_region_flags: every flag bit
    outside LOG_DIRTY_PAGES|READONLY is EINVAL through v1 and v2 (no
    guest_memfd support); slot 0, gpa 0, 2 MiB, uaddr NULL."""
    kvm = vm(arch)
    for bit in range(32):
        flags = 1 << bit
        mem = region(0, 0, M2, 0, flags)
        if flags in (LOG, RO):
            kvm.set_user_memory_region(mem)
            kvm.set_user_memory_region(region(0, 0, 0, 0))
            continue
        assert errno(kvm, mem) == "EINVAL"
        assert errno(kvm, mem, v2=True) == "EINVAL"
    assert not kvm.all_slots()


def test_guest_memfd_flag_rules() -> None:
    """check_memory_region_flags with CONFIG_KVM_GUEST_MEMFD: GUEST_MEMFD only
    through v2 (KVM_SET_USER_MEMORY_REGION_V1_FLAGS), and never with
    LOG_DIRTY_PAGES or READONLY (set_memory_region_test gmem combos)."""
    kvm = vm(guest_memfd=True)
    assert errno(kvm, region(0, 0, M2, HVA, GMEM)) == "EINVAL"
    assert errno(kvm, region(0, 0, M2, HVA, GMEM | LOG), v2=True) == "EINVAL"
    assert errno(kvm, region(0, 0, M2, HVA, GMEM | RO), v2=True) == "EINVAL"
    kvm.set_user_memory_region(region(0, 0, M2, HVA, GMEM, guest_memfd=3), v2=True)
    binding = kvm.id_to_memslot(0).gmem  # type: ignore[union-attr]
    assert binding is not None and (binding.file, binding.pgoff) == (3, 0)


def test_readonly_needs_kvm_arch_has_readonly_mem() -> None:
    """check_memory_region_flags: READONLY only if kvm_arch_has_readonly_mem()
    (false e.g. for x86 VMs with protected state)."""
    kvm = vm(readonly_mem=False)
    assert errno(kvm, region(0, 0, P, HVA, RO)) == "EINVAL"
    assert not check_memory_region_flags(kvm, region(0, 0, P, HVA, RO))
    assert check_memory_region_flags(kvm, region(0, 0, P, HVA, LOG))


# --- rules 3-9: general sanity checks ---------------------------------------------------------


@pytest.mark.parametrize(("mem", "reason"), [
    (region(0, 0, P + 1, HVA), "memory_size not page aligned"),        # rule 3
    (region(0, 0x800, P, HVA), "guest_phys_addr not page aligned"),    # rule 4
    (region(0, 0, P, HVA + 8), "userspace_addr not page aligned"),     # rule 5
    (region(0, 0, P, 0xFFFF_8880_0000_0000), "access_ok"),            # rule 5: kernel half
    (region(0, 0, 2 * P, X86_TASK_SIZE_MAX - P), "access_ok"),         # rule 5: past TASK_SIZE_MAX
    (region(0, (1 << 64) - P, 2 * P, HVA), "wraps"),                   # rule 8
    (region(0, 0, (KVM_MEM_MAX_NR_PAGES + 1) * P, 0), "KVM_MEM_MAX_NR_PAGES"),  # rule 9
    (region(0, 0, P, HVA, as_id=2), "as_id"),                          # rule 7 (x86: 2 as)
])
def test_kvm_set_memory_region_sanity_checks(mem: KvmUserspaceMemoryRegion, reason: str) -> None:
    """kvm_set_memory_region "General sanity checks": EINVAL."""
    kvm = vm()
    e = err(lambda: kvm.set_user_memory_region(mem))
    assert e.errno == "EINVAL" and reason in e.reason


def test_access_ok_boundary_x86() -> None:
    """access_ok on x86-64: a slot may end exactly at TASK_SIZE_MAX
    (0x7ffffffff000; USER_PTR_MAX == TASK_SIZE_MAX), not a page later; hva 0
    and unmapped hvas are accepted (no VMA check at creation)."""
    kvm = vm()
    lim = kvm.limits
    assert access_ok(lim, X86_TASK_SIZE_MAX - P, P)
    assert not access_ok(lim, X86_TASK_SIZE_MAX - P, 2 * P)
    kvm.set_user_memory_region(region(0, 0, P, X86_TASK_SIZE_MAX - P))
    kvm.set_user_memory_region(region(1, P, P, 0))
    assert errno(kvm, region(2, 2 * P, 2 * P, X86_TASK_SIZE_MAX - P)) == "EINVAL"


def test_tagged_userspace_addr_arm64() -> None:
    """kvm_set_memory_region: userspace_addr != untagged_addr() is EINVAL; on
    arm64 (TBI) a tag in the top byte is caught by that check, before access_ok."""
    kvm = vm("arm64")
    tagged = (0x5A << 56) | 0x7000_0000_0000
    assert untagged_addr(kvm.limits, tagged) == 0x7000_0000_0000
    assert untagged_addr(vm().limits, tagged) == tagged  # x86 without LAM: identity
    e = err(lambda: kvm.set_user_memory_region(region(0, 0, P, tagged)))
    assert e.errno == "EINVAL" and "tagged" in e.reason
    e = err(lambda: vm().set_user_memory_region(region(0, 0, P, tagged)))
    assert "access_ok" in e.reason
    kvm.set_user_memory_region(region(0, 0, P, 0x7000_0000_0000))


def test_guest_memfd_offset_checks() -> None:
    """kvm_set_memory_region rule 6: KVM_MEM_GUEST_MEMFD with a misaligned
    guest_memfd_offset, or offset + size wrapping u64, is EINVAL."""
    kvm = vm(guest_memfd=True)
    for off in (1, 2048, P - 1):
        assert errno(kvm, region(0, 0, M2, HVA, GMEM, guest_memfd_offset=off), v2=True) \
            == "EINVAL"
    e = err(lambda: kvm.set_user_memory_region(
        region(0, 0, M2, HVA, GMEM, guest_memfd_offset=(1 << 64) - P), v2=True))
    assert "wraps" in e.reason


def test_slot_ids_and_address_spaces() -> None:
    """kvm_vm_ioctl_set_memory_region: (u16)slot >= KVM_USER_MEM_SLOTS is
    EINVAL; kvm_set_memory_region rule 7: as_id >= kvm_arch_nr_memslot_as_ids."""
    x86 = vm()
    assert x86.limits.nr_memslots == 32764
    x86.set_user_memory_region(region(32763, 0, P, HVA))
    assert errno(x86, region(32764, P, P, HVA)) == "EINVAL"
    assert errno(x86, KvmUserspaceMemoryRegion(0xFFFFFFFF, 0, P, P, HVA)) == "EINVAL"
    x86.set_user_memory_region(region(5, 0, P, HVA, as_id=1))   # SMM address space
    assert errno(x86, region(5, 0, P, HVA, as_id=2)) == "EINVAL"
    arm = vm("arm64")
    assert arm.limits.nr_memslots == 32767 and arm.limits.nr_as_ids == 1
    arm.set_user_memory_region(region(32766, 0, P, HVA))
    assert errno(arm, region(0x7FFF, P, P, HVA)) == "EINVAL"
    assert errno(arm, region(5, P, P, HVA, as_id=1)) == "EINVAL"


def test_max_nr_pages_and_internal_slots() -> None:
    """Rule 9 applies to user slots only (KVM_MEM_MAX_NR_PAGES); internal slots
    (kvm_set_internal_memslot, x86 ids 32764-32766) are exempt, need no flags,
    and rule 7 still bounds their id by KVM_MEM_SLOTS_NUM."""
    kvm = vm()
    kvm.set_user_memory_region(region(0, 0, KVM_MEM_MAX_NR_PAGES * P, 0))
    big = KvmUserspaceMemoryRegion(32764, 0, 1 << 44, (KVM_MEM_MAX_NR_PAGES + 1) * P, 0)
    drive(kvm_set_internal_memslot(kvm, big))
    assert kvm.id_to_memslot(32764).npages == KVM_MEM_MAX_NR_PAGES + 1  # type: ignore[union-attr]
    assert err(lambda: drive(kvm_set_internal_memslot(kvm, region(5, 0, P, 0)))).errno == "EINVAL"
    assert err(lambda: kvm.set_internal_memslot(
        KvmUserspaceMemoryRegion(32765, LOG, 0, P, 0))).errno == "EINVAL"
    e = err(lambda: kvm.set_internal_memslot(
        KvmUserspaceMemoryRegion(KVM_MEM_SLOTS_NUM, 0, 1 << 46, P, 0)))
    assert "slot id" in e.reason
    # internal slots take part in the overlap check
    e = err(lambda: kvm.set_internal_memslot(KvmUserspaceMemoryRegion(32765, 0, 1 << 44, P, 0)))
    assert e.errno == "EEXIST"


# --- rules 10-18: delete / create / modify ---------------------------------------------------


def test_delete_missing_slot() -> None:
    """Rule 11: memory_size 0 on a slot that does not exist is EINVAL (host too)."""
    kvm = vm()
    assert errno(kvm, region(3, 0, 0, 0)) == "EINVAL"


def test_nr_memslot_pages_underflow_is_eio() -> None:
    """Rule 12: delete with kvm->nr_memslot_pages < old->npages is EIO (WARN)."""
    kvm = vm()
    kvm.set_user_memory_region(region(0, 0, 4 * P, HVA))
    kvm.nr_memslot_pages = 3
    assert errno(kvm, region(0, 0, 0, 0)) == "EIO"
    assert kvm.id_to_memslot(0) is not None


def test_nr_memslot_pages_overflow() -> None:
    """Rule 14: CREATE whose pages would overflow nr_memslot_pages is EINVAL."""
    kvm = vm()
    kvm.nr_memslot_pages = ULONG_MAX - 5
    assert errno(kvm, region(0, 0, 8 * P, HVA)) == "EINVAL"
    kvm.set_user_memory_region(region(0, 0, 5 * P, HVA))
    assert kvm.nr_memslot_pages == ULONG_MAX


def test_modify_rules() -> None:
    """Rules 17/18 (host §4): size, hva or READONLY changes are EINVAL;
    LOG_DIRTY toggles, moves, move+LOG and identical requests are fine."""
    kvm = vm()
    kvm.set_user_memory_region(region(0, 0, 4 * P, HVA))
    before = snapshot(kvm)
    assert errno(kvm, region(0, 0, 8 * P, HVA)) == "EINVAL"
    assert errno(kvm, region(0, 0, 4 * P, HVA + P)) == "EINVAL"
    assert errno(kvm, region(0, 0, 4 * P, HVA, RO)) == "EINVAL"
    assert snapshot(kvm) == before
    kvm.set_user_memory_region(region(0, 0, 4 * P, HVA))          # identical: no-op
    assert snapshot(kvm) == before
    kvm.set_user_memory_region(region(0, 0, 4 * P, HVA, LOG))     # FLAGS_ONLY
    kvm.set_user_memory_region(region(0, 0, 4 * P, HVA))          # FLAGS_ONLY back
    kvm.set_user_memory_region(region(0, 1 << 30, 4 * P, HVA))    # MOVE
    kvm.set_user_memory_region(region(0, 2 << 30, 4 * P, HVA, LOG))  # MOVE + LOG
    slot = kvm.id_to_memslot(0)
    assert slot is not None and slot.base_gfn == (2 << 30) // P and slot.logging
    validate_memslots(kvm)


def test_guest_memfd_slots_are_immutable() -> None:
    """Rule 16: a request carrying KVM_MEM_GUEST_MEMFD for an existing slot is
    EINVAL (even an identical one); gmem slots can only be deleted."""
    kvm = vm(guest_memfd=True)
    mem = region(0, 0, M2, HVA, GMEM, guest_memfd=7)
    kvm.set_user_memory_region(mem, v2=True)
    assert errno(kvm, mem, v2=True) == "EINVAL"
    assert errno(kvm, region(0, M2, M2, HVA, GMEM, guest_memfd=7), v2=True) == "EINVAL"
    slot = kvm.id_to_memslot(0)
    kvm.set_user_memory_region(region(0, 0, 0, 0), v2=True)
    assert slot is not None and slot.gmem is None  # kvm_free_memslot -> kvm_gmem_unbind


# --- rule 19: overlap ----------------------------------------------------------------------


def test_overlap_is_eexist_in_gpa_space_only() -> None:
    """Rule 19 kvm_check_memslot_overlap (host §4): inside, straddling,
    identical and moving onto another slot are EEXIST; adjacent slots, hva
    aliases and other address spaces are fine; FLAGS_ONLY never rechecks."""
    kvm = vm()
    kvm.set_user_memory_region(region(0, 16 * P, 16 * P, HVA))
    before = snapshot(kvm)
    for gpa, size in ((20 * P, P), (8 * P, 16 * P), (16 * P, 16 * P), (31 * P, 4 * P),
                      (0, 64 * P)):
        assert errno(kvm, region(1, gpa, size, HVA)) == "EEXIST"
    assert snapshot(kvm) == before
    kvm.set_user_memory_region(region(1, 32 * P, 4 * P, HVA))       # adjacent, hva alias
    kvm.set_user_memory_region(region(2, 12 * P, 4 * P, HVA))       # adjacent below
    kvm.set_user_memory_region(region(0, 16 * P, 16 * P, HVA, as_id=1))  # other as
    assert errno(kvm, region(1, 30 * P, 4 * P, HVA)) == "EEXIST"    # move onto slot 0
    kvm.set_user_memory_region(region(0, 17 * P, 16 * P, HVA, as_id=1))  # move over itself
    kvm.set_user_memory_region(region(1, 32 * P, 4 * P, HVA, LOG))  # flags only
    validate_memslots(kvm)


def test_move_over_own_range_checks_only_other_slots() -> None:
    """kvm_check_memslot_overlap skips the slot's own id: a MOVE may overlap its
    old range, but not a neighbour below it."""
    kvm = vm()
    kvm.set_user_memory_region(region(0, 0, 4 * P, HVA))
    kvm.set_user_memory_region(region(1, 8 * P, 4 * P, HVA))
    kvm.set_user_memory_region(region(1, 6 * P, 4 * P, HVA))
    assert errno(kvm, region(1, 3 * P, 4 * P, HVA)) == "EEXIST"
    kvm.set_user_memory_region(region(1, 4 * P, 4 * P, HVA))
    validate_memslots(kvm)


# --- the first failing rule wins ------------------------------------------------------------


def test_first_failing_rule_wins() -> None:
    """kvm_set_memory_region checks in order; a request breaking two rules gets
    the earlier rule's errno and reason."""
    kvm = vm(hooks=Recorder(fail_prepare="EFAULT"))
    kvm.hooks = NoopMemslotHooks()
    kvm.set_user_memory_region(region(0, 0, 16 * P, HVA))
    kvm.hooks = Recorder(fail_prepare="EFAULT")
    # rule 1 before rule 3
    assert "flags" in err(lambda: kvm.set_user_memory_region(region(1, 0, 5, HVA, 8),
                                                             v2=True)).reason
    # rule 4 before rule 11/13: a delete with a misaligned gpa fails even for a real slot
    assert "guest_phys_addr" in err(lambda: kvm.set_user_memory_region(
        region(0, 0x10, 0, 0))).reason
    # rule 5 (access_ok of a kernel address, size 0) before the delete
    assert "access_ok" in err(lambda: kvm.set_user_memory_region(
        region(0, 0, 0, 0xFFFF_FFFF_FFFF_F000))).reason
    # rule 9 (EINVAL) before rule 19 (EEXIST)
    assert errno(kvm, region(1, 0, (KVM_MEM_MAX_NR_PAGES + 1) * P, 0)) == "EINVAL"
    # rule 17 (EINVAL) before rule 19 (EEXIST): modify + overlap
    kvm.hooks = NoopMemslotHooks()
    kvm.set_user_memory_region(region(1, 32 * P, 4 * P, HVA))
    kvm.hooks = Recorder(fail_prepare="EFAULT")
    assert errno(kvm, region(1, 0, 8 * P, HVA)) == "EINVAL"
    # rule 19 (EEXIST) before rule 22 (the arch hook's EFAULT): prepare never runs
    rec = kvm.hooks
    assert errno(kvm, region(2, 4 * P, P, HVA)) == "EEXIST"
    assert isinstance(rec, Recorder) and rec.calls == []
    assert errno(kvm, region(2, 64 * P, P, HVA)) == "EFAULT"
    # rule 11 before rule 12: with broken accounting, a missing slot is EINVAL
    kvm.nr_memslot_pages = 0
    assert errno(kvm, region(9, 0, 0, 0)) == "EINVAL"
    assert errno(kvm, region(0, 0, 0, 0)) == "EIO"
    # ioctl checks come first: v1 flag check, then the user slot id
    assert "v1" in err(lambda: kvm.set_user_memory_region(region(40000 & 0xFFFF, 0, 5, 1,
                                                                 GMEM))).reason


# --- rule 22: the arch prepare hook and what a failure leaves behind ------------------------


def test_prepare_failure_on_create_changes_nothing() -> None:
    """kvm_set_memslot: a failing kvm_arch_prepare_memory_region on CREATE or
    FLAGS_ONLY returns its errno and changes nothing (a fresh dirty bitmap is
    freed again)."""
    kvm = vm()
    kvm.set_user_memory_region(region(0, 0, 4 * P, HVA))
    rec = Recorder(fail_prepare="EPERM")
    kvm.hooks = rec
    before = snapshot(kvm)
    assert errno(kvm, region(1, 8 * P, 4 * P, HVA, LOG)) == "EPERM"
    new = rec.calls[0][2]
    assert isinstance(new, MemorySlot) and new.dirty_bitmap is None
    assert errno(kvm, region(0, 0, 4 * P, HVA, LOG)) == "EPERM"
    assert snapshot(kvm) == before
    assert rec.names() == ["prepare", "prepare"]
    validate_memslots(kvm)


@pytest.mark.parametrize("change", ["move", "delete"])
def test_prepare_failure_after_invalidate_restores_slot(change: str) -> None:
    """kvm_set_memslot I5: prepare failing a MOVE (or a DELETE) after
    kvm_invalidate_memslot restores the old slot with one more swap: the zap
    (flush_shadow_memslot) stays done and the generation moved by 2 * nr_as."""
    kvm = vm()
    kvm.set_user_memory_region(region(0, 0, 4 * P, HVA, LOG))
    old = kvm.id_to_memslot(0)
    assert old is not None and old.dirty_bitmap is not None
    bitmap = old.dirty_bitmap
    rec = Recorder(fail_prepare="EFAULT")
    kvm.hooks = rec
    gen = kvm.generation()
    mem = region(0, 64 * P, 4 * P, HVA, LOG) if change == "move" else region(0, 0, 0, 0)
    assert errno(kvm, mem) == "EFAULT"
    assert kvm.id_to_memslot(0) is old and old.dirty_bitmap is bitmap and not old.invalid
    assert kvm.generation() == gen + 2 * kvm.limits.nr_as_ids
    assert rec.names() == ["flush", "prepare"]
    assert rec.calls[0][1] is old
    validate_memslots(kvm)


# --- the change kinds (kvm_set_memslot) ------------------------------------------------------


def test_create_publishes_slot() -> None:
    """KVM_MR_CREATE: prepare, kvm_create_memslot, commit; generation +nr_as;
    nr_memslot_pages grows; the slot is found by id, gfn and hva."""
    rec = Recorder()
    kvm = vm(hooks=rec)
    kvm.set_user_memory_region(region(3, 0x10_0000, 8 * P, HVA))
    slot = kvm.id_to_memslot(3)
    assert slot is not None and (slot.base_gfn, slot.npages, slot.userspace_addr) == \
        (0x100, 8, HVA)
    assert kvm.gfn_to_memslot(0x107) is slot and kvm.gfn_to_memslot(0x108) is None
    assert kvm.gfn_to_memslot(0xFF) is None
    assert kvm.slots_for_hva_range(HVA + 7 * P, HVA + 9 * P) == [slot]
    assert kvm.gfn_ranges_for_hva(HVA + P, HVA + P + 1) == [(slot, 0x101, 0x102)]
    assert kvm.generation(0) == 2 and kvm.generation(1) == 1  # x86: two address spaces
    assert kvm.nr_memslot_pages == 8
    assert [(c[0], c[3]) for c in rec.calls] == \
        [("prepare", KvmMrChange.CREATE), ("commit", KvmMrChange.CREATE)]
    assert rec.calls[0][1] is None and rec.calls[0][2] is slot
    validate_memslots(kvm)


def test_delete_zaps_and_frees() -> None:
    """KVM_MR_DELETE: kvm_invalidate_memslot (INVALID copy published, then
    kvm_arch_flush_shadow_memslot(old)), prepare(old, NULL), kvm_delete_memslot,
    commit, kvm_free_memslot; generation +2*nr_as."""
    rec = Recorder()
    kvm = vm(hooks=rec)
    rec.kvm = kvm
    kvm.set_user_memory_region(region(1, 0, 4 * P, HVA, LOG))
    old = kvm.id_to_memslot(1)
    assert old is not None
    rec.calls.clear()
    gen = kvm.generation()
    kvm.set_user_memory_region(region(1, 0, 0, 0))
    assert kvm.id_to_memslot(1) is None and kvm.gfn_to_memslot(0) is None
    assert kvm.generation() == gen + 4
    assert rec.names() == ["flush", "prepare", "commit"]
    assert rec.calls[1][1:] == (old, None, KvmMrChange.DELETE)
    assert rec.seen_in_flush is not None and rec.seen_in_flush.invalid
    assert rec.seen_in_flush is not old and rec.seen_in_flush.base_gfn == old.base_gfn
    assert old.dirty_bitmap is None and kvm.nr_memslot_pages == 0
    assert kvm.nr_memslots_dirty_logging == 0
    validate_memslots(kvm)


def test_move_zaps_old_range_and_keeps_bitmap() -> None:
    """KVM_MR_MOVE: old gfn range invalidated and zapped, new slot at the new
    gfn; kvm_prepare_memory_region reuses a logged slot's bitmap."""
    rec = Recorder()
    kvm = vm(hooks=rec)
    kvm.set_user_memory_region(region(1, 0, 4 * P, HVA, LOG))
    old = kvm.id_to_memslot(1)
    assert old is not None and old.dirty_bitmap is not None
    mark_page_dirty_in_slot(old, 2)
    rec.calls.clear()
    kvm.set_user_memory_region(region(1, 16 * P, 4 * P, HVA, LOG))
    new = kvm.id_to_memslot(1)
    assert new is not None and new is not old and new.base_gfn == 16
    assert new.dirty_bitmap is old.dirty_bitmap and bool(new.dirty_bitmap[2])
    assert kvm.gfn_to_memslot(0) is None and kvm.gfn_to_memslot(19) is new
    assert rec.names() == ["flush", "prepare", "commit"]
    assert rec.calls[0][1] is old and rec.calls[1][1:] == (old, new, KvmMrChange.MOVE)
    assert kvm.nr_memslot_pages == 4 and kvm.nr_memslots_dirty_logging == 1
    validate_memslots(kvm)


def test_flags_only_toggles_dirty_logging() -> None:
    """KVM_MR_FLAGS_ONLY: no invalidation/zap; enabling LOG_DIRTY_PAGES
    allocates a zeroed bitmap (kvm_alloc_dirty_bitmap), disabling drops it
    (freed at commit); nr_memslots_dirty_logging follows; generation +nr_as."""
    rec = Recorder()
    kvm = vm(hooks=rec)
    kvm.set_user_memory_region(region(0, 0, 100 * P, HVA))
    plain = kvm.id_to_memslot(0)
    rec.calls.clear()
    gen = kvm.generation()
    kvm.set_user_memory_region(region(0, 0, 100 * P, HVA, LOG))
    logged = kvm.id_to_memslot(0)
    assert logged is not None and logged is not plain and logged.dirty_bitmap is not None
    assert logged.dirty_bitmap.dtype == np.bool_ and not logged.dirty_bitmap.any()
    assert len(logged.dirty_bitmap) == 100 and kvm_dirty_bitmap_bytes(logged) == 16
    assert kvm.nr_memslots_dirty_logging == 1 and kvm.generation() == gen + 2
    kvm.set_user_memory_region(region(0, 0, 100 * P, HVA))
    off = kvm.id_to_memslot(0)
    assert off is not None and off.dirty_bitmap is None and logged.dirty_bitmap is None
    assert kvm.nr_memslots_dirty_logging == 0
    assert rec.names() == ["prepare", "commit", "prepare", "commit"]
    assert [c[3] for c in rec.calls if c[0] == "commit"] == [KvmMrChange.FLAGS_ONLY] * 2
    validate_memslots(kvm)


def test_dirty_bitmap_options() -> None:
    """kvm_prepare_memory_region: manual protect + KVM_DIRTY_LOG_INITIALLY_SET
    starts with every bit set; a dirty-ring-only VM (!kvm_use_dirty_bitmap)
    gets no bitmap; mark_page_dirty_in_slot sets one bit."""
    kvm = vm()
    kvm.manual_protect_init_set = True
    kvm.set_user_memory_region(region(0, 0, 70 * P, HVA, LOG))
    slot = kvm.id_to_memslot(0)
    assert slot is not None and slot.dirty_bitmap is not None and slot.dirty_bitmap.all()
    ring = vm()
    ring.use_dirty_bitmap = False
    ring.set_user_memory_region(region(0, 0, 4 * P, HVA, LOG))
    slot = ring.id_to_memslot(0)
    assert slot is not None and slot.dirty_bitmap is None and slot.logging
    mark_page_dirty_in_slot(slot, 1)  # no bitmap: nothing to mark
    plain = vm()
    plain.set_user_memory_region(region(0, 0, 4 * P, HVA, LOG))
    slot = plain.id_to_memslot(0)
    assert slot is not None
    mark_page_dirty_in_slot(slot, 3)
    assert slot.dirty_bitmap is not None and list(slot.dirty_bitmap) == [0, 0, 0, 1]


# --- generations (kvm_swap_active_memslots) ----------------------------------------------------


def test_generations_per_address_space() -> None:
    """kvm_create_vm: as i starts at generation i; every swap adds
    kvm_arch_nr_memslot_as_ids (I4: CREATE/FLAGS_ONLY once, DELETE/MOVE
    twice); generations of the two x86 address spaces never collide."""
    kvm = vm()
    assert (kvm.generation(0), kvm.generation(1)) == (0, 1)
    kvm.set_user_memory_region(region(0, 0, P, HVA))                  # create
    kvm.set_user_memory_region(region(0, 0, P, HVA, LOG))             # flags
    kvm.set_user_memory_region(region(0, P, P, HVA, LOG))             # move
    kvm.set_user_memory_region(region(0, 0, 0, 0))                    # delete
    assert kvm.generation(0) == 2 + 2 + 4 + 4 and kvm.generation(1) == 1
    kvm.set_user_memory_region(region(0, 0, P, HVA, as_id=1))
    assert kvm.generation(1) == 3
    arm = vm("arm64")
    arm.set_user_memory_region(region(0, 0, P, HVA))
    arm.set_user_memory_region(region(0, 0, 0, 0))
    assert arm.generation() == 3


def test_generation_in_progress_while_publishing() -> None:
    """kvm_swap_active_memslots: the newly published set carries the old
    generation | KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS until readers are gone,
    and kvm_arch_memslots_updated sees the final value."""
    rec = Recorder()
    kvm = vm(hooks=rec)
    op = kvm.set_user_memory_region_op(region(0, 0, P, HVA))
    seen = []
    for s in op:
        seen.append((str(s), kvm.generation()))
    gens = dict(seen)
    assert gens["acquire srcu"] == KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS | 0
    assert gens["release slots_lock"] == 2
    assert rec.updated == [2]


def test_sync_points_of_each_change() -> None:
    """The pauses of kvm_vm_ioctl_set_memory_region: slots_lock, slots_arch_lock,
    each kvm_swap_active_memslots (publish under memslots_frozen, drop
    slots_arch_lock, synchronize_srcu), and memslot_invalid_published before
    the zap of a DELETE/MOVE."""
    kvm = vm()
    swap = ["acquire memslots_frozen", "release memslots_frozen", "release slots_arch_lock",
            "acquire srcu", "release srcu"]
    create, e = syncs(kvm.set_user_memory_region_op(region(0, 0, P, HVA)))
    assert e is None
    assert create == ["acquire slots_lock", "acquire slots_arch_lock", *swap,
                      "release slots_lock"]
    delete, e = syncs(kvm.set_user_memory_region_op(region(0, 0, 0, 0)))
    assert delete == ["acquire slots_lock", "acquire slots_arch_lock", *swap,
                      "point memslot_invalid_published", "acquire slots_arch_lock", *swap,
                      "release slots_lock"]
    failed, e = syncs(kvm.set_user_memory_region_op(region(0, 0, 0, 0)))
    assert isinstance(e, KernelError) and failed == ["acquire slots_lock",
                                                     "release slots_lock"]
    early, e = syncs(kvm.set_user_memory_region_op(region(1, 0, P, HVA, 8)))
    assert isinstance(e, KernelError) and early == []
    for pauses in (create, delete, failed):
        assert balanced(pauses)


@pytest.mark.parametrize("kind", ["delete", "move"])
def test_invalid_slot_window(kind: str) -> None:
    """kvm_invalidate_memslot: at memslot_invalid_published the active set holds
    an INVALID copy of the slot (same range, same hva; gfn_to_hva refuses it),
    the inactive set still the old slot; the zap has not run yet."""
    rec = Recorder()
    kvm = vm(hooks=rec)
    kvm.set_user_memory_region(region(4, 32 * P, 8 * P, HVA))
    old = kvm.id_to_memslot(4)
    assert old is not None
    rec.calls.clear()
    mem = region(4, 0, 0, 0) if kind == "delete" else region(4, 64 * P, 8 * P, HVA)
    op = kvm.set_user_memory_region_op(mem)
    for s in op:
        if str(s) == "point memslot_invalid_published":
            break
    inv = kvm.gfn_to_memslot(35)
    assert inv is not None and inv is not old and inv.invalid
    assert inv.flags == old.flags | KVM_MEMSLOT_INVALID and inv.id == 4
    assert kvm.gfn_to_memslot(35, include_invalid=False) is None
    assert kvm.id_to_memslot(4) is inv
    assert kvm.slots_for_hva_range(HVA, HVA + P) == [inv]   # notifiers still find it
    assert kvm.inactive_memslots().id_to_memslot(4) is old
    assert rec.names() == []
    with pytest.raises(ValidationError):
        validate_memslots(kvm)
    drive(op, held=1)  # slots_lock, taken before the point
    assert rec.names() == ["flush", "prepare", "commit"]
    assert kvm.gfn_to_memslot(35) is None
    validate_memslots(kvm)


def test_closing_an_op_midway_is_clean() -> None:
    """An op abandoned by its driver (generator close) raises nothing."""
    kvm = vm()
    op = kvm.set_user_memory_region_op(region(0, 0, P, HVA))
    next(op)
    next(op)
    op.close()


# --- limits ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "nr"), [("x86", 32764), ("arm64", 32767), ("riscv", 32767)])
def test_add_max_memory_regions(arch: str, nr: int) -> None:
    """set_memory_region_test.c test_add_max_memory_regions: KVM_CAP_NR_MEMSLOTS
    slots of 2 MiB at gpa i*2MiB from one area all succeed; slot N is EINVAL."""
    kvm = vm(arch)
    assert kvm.limits.nr_memslots == nr
    for i in range(nr):
        kvm.set_user_memory_region(region(i, i * M2, M2, (1 << 40) + i * M2))
    assert errno(kvm, region(nr, nr * M2, M2, 1 << 44)) == "EINVAL"
    assert len(kvm.memslots()) == nr and kvm.nr_memslot_pages == nr * 512
    assert kvm.gfn_to_memslot((nr - 1) * 512 + 5) is kvm.id_to_memslot(nr - 1)
    validate_memslots(kvm)


def test_host_observed_outcomes() -> None:
    """kvm-on-this-host.md §4 on an x86 model without SMM (MULTI_ADDRESS_SPACE
    0) and shadow-paging GPA bits (52): every request check listed there."""
    kvm = vm(nr_as_ids=1, hooks=ArchMemslotHooks("x86", phys_bits=52))
    ok = kvm.set_user_memory_region
    assert errno(kvm, region(0, 0, P, HVA, as_id=1)) == "EINVAL"
    for flags in (0x4, 0x8, 0x10, 0x100, 0x80000000):
        assert errno(kvm, region(0, 0, P, HVA, flags)) == "EINVAL"
    ok(region(0, 0, P, HVA, LOG | RO))
    ok(region(1, P, P, 0))                                   # hva 0 accepted
    for gpa in (1 << 36, 1 << 39, 1 << 46, 1 << 47, (1 << 48) - P, 1 << 48):
        ok(region(2, gpa, P, HVA))
        ok(region(2, 0, 0, 0))
    for gpa in (1 << 52, (1 << 64) - P):
        assert errno(kvm, region(2, gpa, P, HVA)) == "EINVAL"
    assert errno(kvm, region(2, 1 << 40, 1 << 43, 0)) == "EINVAL"    # 2^31 pages
    assert errno(kvm, region(2, (1 << 64) - P, 2 * P, HVA)) == "EINVAL"
    ok(region(32763, 1 << 30, P, HVA))
    for slot in (32764, 0x7FFF):
        assert errno(kvm, region(slot, 1 << 31, P, HVA)) == "EINVAL"
    validate_memslots(kvm)


# --- arch hooks: where each architecture zaps, write-protects, splits ---------------------------


class ArchRecorder(ArchMemslotHooks):
    def __init__(self, arch: str, **kw: Any) -> None:
        super().__init__(arch, **kw)
        self.log: list[tuple[Any, ...]] = []
        self.walk_error: str | None = None

    def prepare_vma_walk(self, old: MemorySlot | None, new: MemorySlot,
                         change: KvmMrChange) -> Op[None]:
        self.log.append(("walk", change))
        if self.walk_error:
            raise KernelError(self.walk_error, "KVM_SET_USER_MEMORY_REGION", "vma walk")
        return
        yield  # pragma: no cover

    def _rec(self, *entry: Any) -> Op[None]:
        self.log.append(entry)
        return
        yield  # pragma: no cover

    def zap_all(self) -> Op[None]:
        return self._rec("zap_all")

    def zap_memslot(self, slot: MemorySlot) -> Op[None]:
        return self._rec("zap_memslot", slot.base_gfn)

    def write_protect_memslot(self, slot: MemorySlot, min_level: int) -> Op[None]:
        return self._rec("wp", min_level)

    def clear_dirty_memslot(self, slot: MemorySlot) -> Op[None]:
        return self._rec("clear_dirty")

    def split_memslot(self, slot: MemorySlot) -> Op[None]:
        return self._rec("split")

    def recover_huge_pages(self, slot: MemorySlot) -> Op[None]:
        return self._rec("recover_huge")

    def flush_remote_tlbs_memslot(self, slot: MemorySlot) -> Op[None]:
        return self._rec("flush_tlbs")


def run_arch(arch: str, *reqs: KvmUserspaceMemoryRegion, **kw: Any) -> list[tuple[Any, ...]]:
    hooks = ArchRecorder(arch, **kw)
    kvm = VmMemslots(arch, hooks)
    for r in reqs:
        kvm.set_user_memory_region(r)
    validate_memslots(kvm)
    return [e for e in hooks.log if e[0] != "walk"]


def test_x86_flush_shadow_memslot_zaps_everything() -> None:
    """kvm_arch_flush_shadow_memslot (x86): with KVM_X86_QUIRK_SLOT_ZAP_ALL (on
    by default) delete/move zap all roots (kvm_mmu_zap_all_fast; this host:
    every shadow page goes); without the quirk only the slot; arm64 and riscv
    unmap the slot's range."""
    mk, mv, rm = region(0, 0, 4 * P, HVA), region(0, 8 * P, 4 * P, HVA), region(0, 0, 0, 0)
    assert run_arch("x86", mk, mv, rm) == [("zap_all",), ("zap_all",)]
    assert run_arch("x86", mk, mv, rm, slot_zap_all=False) == \
        [("zap_memslot", 0), ("zap_memslot", 8)]
    for arch in ("arm64", "riscv"):
        assert run_arch(arch, mk, mv, rm) == [("zap_memslot", 0), ("zap_memslot", 8)]


def test_x86_slot_apply_flags() -> None:
    """kvm_mmu_slot_apply_flags: only FLAGS_ONLY of a writable slot acts;
    enabling logging splits (eager_page_split), write-protects 4K (2M + D-bit
    clear with PML) and flushes; disabling recovers huge pages."""
    mk, on, off = region(0, 0, 512 * P, HVA), region(0, 0, 512 * P, HVA, LOG), \
        region(0, 0, 512 * P, HVA)
    assert run_arch("x86", mk, on, off) == [
        ("split",), ("wp", PG_LEVEL_4K), ("flush_tlbs",), ("recover_huge",)]
    assert run_arch("x86", mk, on, eager_page_split=False, pml=True) == [
        ("clear_dirty",), ("wp", PG_LEVEL_2M), ("flush_tlbs",)]
    assert run_arch("x86", region(0, 0, P, HVA, LOG)) == []             # CREATE: nothing
    assert run_arch("x86", region(0, 0, P, HVA, RO), region(0, 0, P, HVA, RO | LOG)) == []
    hooks = ArchRecorder("x86")
    hooks.manual_protect_init_set = True
    kvm = VmMemslots("x86", hooks)
    kvm.set_user_memory_region(mk)
    kvm.set_user_memory_region(on)
    assert hooks.log == []  # initially-all-set: no write protection


def test_arm64_riscv_commit_write_protects_whenever_logging() -> None:
    """kvm_arch_commit_memory_region (arm64, riscv): whenever the new slot logs
    (CREATE and MOVE too) write-protect and split; disabling does nothing
    visible; manual protect + INITIALLY_SET skips it; riscv splits only with
    eager_page_split."""
    mk, mv_log, off = region(0, 0, P, HVA, LOG), region(0, 8 * P, P, HVA, LOG), \
        region(0, 8 * P, P, HVA)
    for arch in ("arm64", "riscv"):
        log = run_arch(arch, mk, mv_log, off)
        assert log == [("wp", PG_LEVEL_4K), ("split",), ("zap_memslot", 0),
                       ("wp", PG_LEVEL_4K), ("split",)]
    assert run_arch("riscv", mk, eager_page_split=False) == [("wp", PG_LEVEL_4K)]


def test_arch_prepare_range_checks() -> None:
    """kvm_arch_prepare_memory_region: x86 last gfn > kvm_mmu_max_gfn() is
    EINVAL; arm64 a slot ending beyond the IPA space is EFAULT (v5.4: ending
    *at* it too, the >= off-by-one); riscv keeps >=; DELETE is never checked;
    arm64/riscv then run the VMA walk hook, whose errno propagates."""
    end40 = (1 << 40) - 4 * P
    for arch, ok_gpa, bad_gpa, want in (("x86", (1 << 52) - P, 1 << 52, "EINVAL"),
                                        ("arm64", end40, end40 + P, "EFAULT"),
                                        ("riscv", (1 << 50) - 8 * P, (1 << 50) - 4 * P, "EFAULT")):
        hooks = ArchRecorder(arch)
        kvm = VmMemslots(arch, hooks)
        ok_size = P if arch == "x86" else 4 * P
        kvm.set_user_memory_region(region(0, ok_gpa, ok_size, HVA))
        kvm.set_user_memory_region(region(0, 0, 0, 0))
        assert errno(kvm, region(1, bad_gpa, 4 * P, HVA)) == want
    v54 = VmMemslots("arm64", ArchRecorder("arm64", variant=LINUX_5_4))
    assert errno(v54, region(0, end40, 4 * P, HVA)) == "EFAULT"
    hooks = ArchRecorder("arm64")
    kvm = VmMemslots("arm64", hooks)
    kvm.set_user_memory_region(region(0, 0, P, HVA))
    hooks.walk_error = "EPERM"
    assert errno(kvm, region(1, P, P, HVA)) == "EPERM"
    kvm.set_user_memory_region(region(0, 0, 0, 0))  # DELETE: no walk
    assert [e for e in hooks.log if e[0] == "walk"] == \
        [("walk", KvmMrChange.CREATE), ("walk", KvmMrChange.CREATE)]


def test_x86_prepare_metadata_and_page_track() -> None:
    """x86 kvm_arch_prepare_memory_region: CREATE/MOVE get fresh arch metadata
    (kvm_alloc_memslot_metadata), FLAGS_ONLY copies old->arch; a MOVE with an
    external page-track user is EINVAL."""
    kvm = VmMemslots("x86", ArchMemslotHooks("x86"))
    kvm.set_user_memory_region(region(0, 0, P, HVA))
    slot = kvm.id_to_memslot(0)
    assert slot is not None
    slot.arch["lpage_info"] = "x"
    kvm.set_user_memory_region(region(0, 0, P, HVA, LOG))
    flagged = kvm.id_to_memslot(0)
    assert flagged is not None and flagged.arch == {"lpage_info": "x"}
    kvm.set_user_memory_region(region(0, 8 * P, P, HVA, LOG))
    moved = kvm.id_to_memslot(0)
    assert moved is not None and moved.arch == {}
    kvm.hooks = ArchMemslotHooks("x86", external_page_track=True)
    assert errno(kvm, region(0, 0, P, HVA, LOG)) == "EINVAL"
    with pytest.raises(InputError):
        ArchMemslotHooks("mips")
    with pytest.raises(InputError):
        memslot_limits("mips")


# --- guest_memfd selftests (binding delegated to the hooks) ------------------------------------


class FakeGmem(NoopMemslotHooks):
    """kvm_gmem_bind's rules on a table of fds: EBADF for a closed fd, EINVAL
    for a non-gmem file or a range beyond its size, EEXIST for a range already
    bound to another slot."""

    def __init__(self) -> None:
        self.files: dict[int, int | None] = {}   # fd -> gmem size (None: not gmem)
        self.bound: dict[int, list[tuple[int, int, MemorySlot]]] = {}

    def gmem_bind(self, slot: MemorySlot, fd: int, offset: int) -> None:
        if fd not in self.files:
            raise KernelError("EBADF", "KVM_SET_USER_MEMORY_REGION", "fd")
        size = self.files[fd]
        end = offset + (slot.npages * P)
        if size is None or end > size:
            raise KernelError("EINVAL", "KVM_SET_USER_MEMORY_REGION", "not gmem / too big")
        for s, e, _ in self.bound.get(fd, []):
            if s < end and offset < e:
                raise KernelError("EEXIST", "KVM_SET_USER_MEMORY_REGION", "bound")
        self.bound.setdefault(fd, []).append((offset, end, slot))
        slot.gmem = GmemBinding(fd, offset // P)

    def gmem_unbind(self, slot: MemorySlot) -> None:
        assert slot.gmem is not None
        fd = slot.gmem.file
        self.bound[fd] = [b for b in self.bound[fd] if b[2] is not slot]
        slot.gmem = None


def test_add_private_memory_region() -> None:
    """set_memory_region_test.c test_add_private_memory_region: slot 10 at
    0xc0000000, 2 MiB: a closed fd, a non-gmem fd and offsets 1..4095 are
    rejected; offset 0 on the VM's own guest_memfd works."""
    hooks = FakeGmem()
    hooks.files = {5: None, 6: M2}
    kvm = vm(guest_memfd=True, hooks=hooks)

    def add(fd: int, off: int) -> None:
        kvm.set_user_memory_region(region(10, 0xC000_0000, M2, 0, GMEM, guest_memfd=fd,
                                          guest_memfd_offset=off), v2=True)

    assert err(lambda: add(9, 0)).errno == "EBADF"
    assert err(lambda: add(5, 0)).errno == "EINVAL"
    for off in (1, 511, P - 1):
        assert err(lambda off=off: add(6, off)).errno == "EINVAL"  # type: ignore[misc]
    assert not kvm.all_slots() and hooks.bound.get(6, []) == []
    add(6, 0)
    assert hooks.bound[6][0][2] is kvm.id_to_memslot(10)


def test_add_overlapping_private_memory_regions() -> None:
    """set_memory_region_test.c test_add_overlapping_private_memory_regions:
    re-adding a slot over a guest_memfd range bound to another slot, or over
    another slot's gpa range, is EEXIST."""
    hooks = FakeGmem()
    hooks.files = {6: 10 << 20}
    kvm = vm(guest_memfd=True, hooks=hooks)

    def add(slot: int, gpa: int, off: int) -> None:
        kvm.set_user_memory_region(region(slot, gpa, 4 << 20, 0, GMEM, guest_memfd=6,
                                          guest_memfd_offset=off), v2=True)

    add(10, 0xC000_0000, 0)
    add(11, 0x1_8000_0000, 4 << 20)
    kvm.set_user_memory_region(region(10, 0, 0, 0), v2=True)
    for off in (2 << 20, 6 << 20):
        assert err(lambda off=off: add(10, 0xC000_0000, off)).errno == "EEXIST"  # type: ignore[misc]
    for gpa in (0x1_8000_0000 - (2 << 20), 0x1_8000_0000 + (2 << 20)):
        assert err(lambda gpa=gpa: add(10, gpa, 0)).errno == "EEXIST"  # type: ignore[misc]
    assert [b[:2] for b in hooks.bound[6]] == [(4 << 20, 8 << 20)]
    validate_memslots(kvm)


# --- move / delete selftests at the memslot layer ------------------------------------------------


def test_move_and_delete_memory_region_selftests() -> None:
    """set_memory_region_test.c test_move_memory_region / test_delete_memory_region
    at the memslot layer: slot 10 at 0xc0000000 (2 MiB) moved to gpa - 4 KiB
    and back (each move zaps the old range and the gfns in between are
    unmapped while the INVALID slot is published), deleted, re-created,
    deleted again; x86 zaps everything each time."""
    hooks = ArchRecorder("x86")
    kvm = VmMemslots("x86", hooks)
    base = 0xC000_0000
    kvm.set_user_memory_region(region(10, base, M2, HVA))
    kvm.set_user_memory_region(region(10, base - P, M2, HVA))
    assert kvm.gfn_to_memslot((base - P) // P) is not None
    assert kvm.gfn_to_memslot((base + M2 - P) // P) is None
    kvm.set_user_memory_region(region(10, base, M2, HVA))
    kvm.set_user_memory_region(region(10, 0, 0, 0))
    assert kvm.gfn_to_memslot(base // P) is None
    kvm.set_user_memory_region(region(10, base, M2, HVA))
    kvm.set_user_memory_region(region(10, 0, 0, 0))
    assert hooks.log == [("zap_all",)] * 4
    validate_memslots(kvm)


# --- lookups ------------------------------------------------------------------------------------


def test_hva_lookup_aliases_and_sizes() -> None:
    """kvm_for_each_memslot_in_hva_range: every slot whose hva range meets
    [start, end), in address order; aliases (mmu_stress_test: one memfd in many
    slots) all found; slots of very different sizes."""
    kvm = vm()
    kvm.set_user_memory_region(region(0, 0, 1 << 30, HVA))                 # 1 GiB
    for i in range(1, 6):
        kvm.set_user_memory_region(region(i, (1 << 31) + i * M2, M2, HVA + 5 * M2))
    kvm.set_user_memory_region(region(9, 1 << 33, P, HVA + (1 << 30) - P))
    slots = kvm.slots_for_hva_range(HVA + 5 * M2 + P, HVA + 5 * M2 + 2 * P)
    assert [s.id for s in slots] == [0, 1, 2, 3, 4, 5]
    assert [s.id for s in kvm.slots_for_hva_range(HVA + (1 << 30) - 1, HVA + (1 << 30))] == \
        [0, 9]
    assert kvm.slots_for_hva_range(HVA + (1 << 30), HVA + (2 << 30)) == []
    assert kvm.slots_for_hva_range(HVA - P, HVA) == []
    assert [s.id for s in kvm.memslots().for_each_memslot_in_gfn_range(0, 1 << 40)] == \
        [0, 1, 2, 3, 4, 5, 9]
    assert [s.id for s in kvm.memslots().for_each_memslot_in_gfn_range(
        (1 << 30) // P - 1, ((1 << 31) + 2 * M2) // P + 1)] == [0, 1, 2]


def test_sorted_ints() -> None:
    """The chunked sorted key list behind the gfn and hva indexes."""
    keys = SortedInts(load=4)
    values = list(range(0, 400, 7))[::-1]
    for v in values:
        keys.add(v)
    assert list(keys) == sorted(values) and len(keys) == len(values)
    assert keys.floor(6) == 0 and keys.floor(7) == 7 and keys.floor(-1) is None
    assert keys.floor(10_000) == max(values)
    assert list(keys.irange(20, 50)) == [21, 28, 35, 42, 49]
    for v in values[::2]:
        keys.remove(v)
    assert list(keys) == sorted(values[1::2])
    with pytest.raises(KeyError):
        keys.remove(1)
    with pytest.raises(KeyError):
        keys.remove(10_000)


def test_validate_catches_broken_sets() -> None:
    """validate_memslot_set / validate_memslots raise ValidationError."""
    kvm = vm()
    kvm.set_user_memory_region(region(0, 0, 4 * P, HVA))
    validate_memslots(kvm)
    kvm.nr_memslot_pages += 1
    with pytest.raises(ValidationError):
        validate_memslots(kvm)
    kvm.nr_memslot_pages -= 1
    a, _ = MemslotSet.pair(0)
    kvm_replace_memslot(a, None, MemorySlot(0, 0, 0, 4, HVA, 0))  # type: ignore[arg-type]
    kvm_replace_memslot(a, None, MemorySlot(1, 0, 2, 4, HVA, 0))  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        validate_memslot_set(a)


def test_names_the_vm_layer_uses() -> None:
    """The VM (kvm/vm.py) drives memslots through Memslots / MemoryRegion /
    set_memory_region_op and reads all_slots, for_each_memslot(as_id),
    slots_for_hva_range and gfn_to_memslot(include_invalid=)."""
    from kvmmem.kvm.memslot import MemoryRegion, Memslots

    kvm = Memslots("arm64", hooks=NoopMemslotHooks())
    drive(kvm.set_memory_region_op(MemoryRegion(slot=1, flags=0, guest_phys_addr=0,
                                                memory_size=2 * P, userspace_addr=HVA)))
    slot = kvm.id_to_memslot(1)
    assert kvm.all_slots() == [slot] and list(kvm.for_each_memslot(0)) == [slot]
    assert kvm.slots_for_hva_range(HVA + P, HVA + 2 * P) == [slot]
    assert kvm.gfn_to_memslot(1, 0, include_invalid=False) is slot
