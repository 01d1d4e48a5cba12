"""KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: enabling it, GET without clearing, CLEAR's lazy
protection, KVM_DIRTY_LOG_INITIALLY_SET.

References: kernel-semantics.md §7.1; virt/kvm/kvm_main.c
``kvm_vm_ioctl_enable_cap_generic`` (the options allowed), ``kvm_get_dirty_log_protect``
(the manual branch copies the bitmap), ``kvm_clear_dirty_log_protect``,
``kvm_prepare_memory_region`` (a new bitmap all set with INITIALLY_SET); x86
``kvm_mmu_slot_apply_flags``, arm64/riscv ``kvm_arch_commit_memory_region`` (no
write protection with INITIALLY_SET).  Every guest access is followed by
``validate_vm`` (dirty-log completeness: a writable leaf of a logging slot is marked
dirty).
"""

from __future__ import annotations

from typing import Any

import pytest

from kvmmem.errors import KernelError
from kvmmem.host import PROT_READ, PROT_WRITE
from kvmmem.kvm.dirty_log import (
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    kvm_clear_dirty_log,
    kvm_dirty_log_manual_caps,
    kvm_get_dirty_log,
    kvm_vm_ioctl_enable_cap,
)
from kvmmem.kvm.invariants import validate_vm
from kvmmem.kvm.memslot import KVM_MEM_LOG_DIRTY_PAGES
from kvmmem.kvm.vcpu import Access
from kvmmem.kvm.vm import Vm

ARCHES = ("x86", "arm64", "riscv")
P = 4096
G = 0x4000_0000
GFN = G >> 12
RW = PROT_READ | PROT_WRITE
LOG = KVM_MEM_LOG_DIRTY_PAGES
CAP = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2


def write(vm: Vm, gpa: int, value: int) -> dict[str, Any]:
    out = vm.guest_access(gpa, 4, Access.WRITE, value).to_outcome()
    validate_vm(vm)
    return out


def enable(vm: Vm, arg0: int, flags: int = 0) -> str | None:
    try:
        kvm_vm_ioctl_enable_cap(vm, CAP, flags, (arg0,))
    except KernelError as err:
        return err.errno
    return None


def logged_vm(arch: str, arg0: int, npages: int = 128, *, log_at_create: bool = True,
              variant: str = "upstream") -> Vm:
    vm = Vm(arch, variant=variant)
    assert enable(vm, arg0) is None
    hva = vm.mm.mmap(npages * P, RW, "anon", fill=0)
    vm.set_user_memory_region(0, G, npages * P, hva, LOG if log_at_create else 0)
    return vm


@pytest.mark.parametrize("arch", ARCHES)
def test_enable_cap_options(arch: str) -> None:
    """``allowed_options`` is MANUAL_PROTECT_ENABLE, and KVM_DIRTY_LOG_MANUAL_CAPS when
    that bit is given: INITIALLY_SET alone, unknown bits and non-zero flags are EINVAL;
    0 (off), 1 and 3 are accepted and become ``kvm->manual_dirty_log_protect``."""
    vm = Vm(arch)
    for arg0, flags in ((2, 0), (4, 0), (5, 0), (1 << 63 | 1, 0), (1, 1), (0, 1 << 31)):
        assert enable(vm, arg0, flags) == "EINVAL", (arg0, flags)
        assert vm.manual_dirty_log_protect == 0
    for arg0 in (1, 3, 0):
        assert enable(vm, arg0) is None
        assert vm.manual_dirty_log_protect == arg0
        assert vm.memslots.manual_protect_init_set == (arg0 == 3)
    with pytest.raises(KernelError) as err:
        kvm_vm_ioctl_enable_cap(vm, 0x7FFF, 0, (1,))
    assert err.value.errno == "EINVAL"


@pytest.mark.parametrize(("arch", "before", "since"),
                         [("x86", "5.6", "5.7"), ("arm64", "5.7", "5.8"),
                          ("riscv", "6.18", "6.19")])
def test_initially_set_by_release(arch: str, before: str, since: str) -> None:
    """KVM_DIRTY_LOG_MANUAL_CAPS has INITIALLY_SET on x86 since v5.7, arm64 since v5.8,
    riscv since v6.19; before, args[0] 3 is EINVAL and 1 still works."""
    riscv_oldest = "5.16"
    old = Vm(arch, variant=before if arch != "riscv" else max(before, riscv_oldest))
    assert kvm_dirty_log_manual_caps(old) == 1
    assert enable(old, 3) == "EINVAL" and enable(old, 1) is None
    new = Vm(arch, variant=since)
    assert kvm_dirty_log_manual_caps(new) == 3
    assert enable(new, 3) is None


@pytest.mark.parametrize("arch", ARCHES)
def test_manual_get_reports_without_clearing(arch: str) -> None:
    """With manual protect GET copies the bitmap: a second GET reports the same pages,
    the written pages stay writable (nothing re-protected); CLEAR clears the window and
    write-protects exactly its dirty pages; a write after it is logged again."""
    vm = logged_vm(arch, 1)
    for page in (0, 3, 65):
        assert write(vm, G + page * P, page) == {"result": "ok"}
    dirty = [GFN, GFN + 3, GFN + 65]
    assert kvm_get_dirty_log(vm, 0) == dirty
    assert kvm_get_dirty_log(vm, 0) == dirty
    leaf = vm.stage2.walk(G + 3 * P)
    assert leaf is not None and leaf.perm.write
    kvm_clear_dirty_log(vm, 0, 0, 64)
    validate_vm(vm)
    leaf, leaf65 = vm.stage2.walk(G + 3 * P), vm.stage2.walk(G + 65 * P)
    assert leaf is not None and not leaf.perm.write
    assert leaf65 is not None and leaf65.perm.write
    assert kvm_get_dirty_log(vm, 0) == [GFN + 65]
    assert write(vm, G + 3 * P, 7) == {"result": "ok"}
    assert kvm_get_dirty_log(vm, 0) == [GFN + 3, GFN + 65]


@pytest.mark.parametrize("arch", ARCHES)
def test_manual_protect_off_again_clears_on_get(arch: str) -> None:
    """args[0] 0 turns manual protect off: GET clears and re-protects once more."""
    vm = logged_vm(arch, 1)
    assert write(vm, G, 1) == {"result": "ok"}
    assert kvm_get_dirty_log(vm, 0) == [GFN]
    assert enable(vm, 0) is None
    assert kvm_get_dirty_log(vm, 0) == [GFN]
    assert kvm_get_dirty_log(vm, 0) == []


@pytest.mark.parametrize("arch", ARCHES)
def test_initially_set_new_bitmap_all_set(arch: str) -> None:
    """With INITIALLY_SET a slot created with logging reports every page at once."""
    vm = logged_vm(arch, 3, npages=8)
    assert kvm_get_dirty_log(vm, 0) == [GFN + i for i in range(8)]
    kvm_clear_dirty_log(vm, 0, 0, 8)
    assert kvm_get_dirty_log(vm, 0) == []


@pytest.mark.parametrize("arch", ARCHES)
def test_initially_set_enabling_logging_protects_nothing(arch: str) -> None:
    """A FLAGS_ONLY change turning logging on leaves a writable mapping writable (no
    write protection at commit: the pages are all dirty); the write takes no fault;
    CLEAR protects lazily, and the next write faults and is logged."""
    vm = logged_vm(arch, 3, npages=8, log_at_create=False)
    assert write(vm, G + P, 1) == {"result": "ok"}
    hva = vm.gfn_to_memslot(GFN)
    assert hva is not None
    vm.set_user_memory_region(0, G, 8 * P, hva.userspace_addr, LOG)
    validate_vm(vm)
    leaf = vm.stage2.walk(G + P)
    assert leaf is not None and leaf.perm.write
    taken = vm.stats.pf_taken
    assert write(vm, G + P, 2) == {"result": "ok"}
    assert vm.stats.pf_taken == taken
    kvm_clear_dirty_log(vm, 0, 0, 8)
    leaf = vm.stage2.walk(G + P)
    assert leaf is not None and not leaf.perm.write
    assert kvm_get_dirty_log(vm, 0) == []
    assert write(vm, G + P, 3) == {"result": "ok"}
    assert vm.stats.pf_taken == taken + 1
    assert kvm_get_dirty_log(vm, 0) == [GFN + 1]


@pytest.mark.parametrize("arch", ARCHES)
def test_without_initially_set_enabling_logging_protects(arch: str) -> None:
    """Manual protect alone: enabling logging write-protects as before and the new
    bitmap starts empty."""
    vm = logged_vm(arch, 1, npages=8, log_at_create=False)
    assert write(vm, G + P, 1) == {"result": "ok"}
    slot = vm.gfn_to_memslot(GFN)
    assert slot is not None
    vm.set_user_memory_region(0, G, 8 * P, slot.userspace_addr, LOG)
    leaf = vm.stage2.walk(G + P)
    assert leaf is None or not leaf.perm.write
    assert kvm_get_dirty_log(vm, 0) == []
