"""The in-flight state the model publishes for the explorer's checks.

The explorer exempts three windows the kernel has (explore/execution.py):
a memslot update in flight, a write fault between its stage-2 install and
mark_page_dirty (arm64), and an mm change holding mmap_lock.  It reads them
from the model; these tests drive each operation pause by pause and check
that what is published is open exactly while the window is.
"""

from __future__ import annotations

from typing import Any

import pytest

from kvmmem.host import PROT_READ, PROT_WRITE
from kvmmem.kvm.memslot import KVM_MEM_LOG_DIRTY_PAGES, MemslotUpdate
from kvmmem.kvm.vcpu import Access
from kvmmem.kvm.vm import Vm
from kvmmem.sync import Op, Sync, SyncKind

MB = 1 << 20


def test_memslot_update_published_from_validation_to_the_end() -> None:
    vm = Vm("x86")
    hva = vm.mm.mmap(2 * MB, PROT_READ | PROT_WRITE, "anon")
    vm.set_user_memory_region(0, 0, 2 * MB, hva)
    op = vm.set_user_memory_region_op(0, 0, 2 * MB, hva, KVM_MEM_LOG_DIRTY_PAGES)
    old = vm.memslots.id_to_memslot(0)
    seen: list[tuple[str, MemslotUpdate | None]] = []
    for sync in op:
        seen.append((str(sync), vm.memslots.update_in_flight))
    # before slots_lock is granted nothing is validated yet
    assert seen[0] == ("acquire slots_lock", None)
    # then at every pause, the release of slots_lock included: the old slot and the
    # new one (logging), which the swap publishes on the way
    new = vm.memslots.id_to_memslot(0)
    assert new is not old and new is not None and new.flags == KVM_MEM_LOG_DIRTY_PAGES
    assert [u for _, u in seen[1:]] == [MemslotUpdate(old, new)] * (len(seen) - 1)
    assert seen[-1][0] == "release slots_lock"
    assert vm.memslots.update_in_flight is None


def test_memslot_update_cleared_when_it_fails() -> None:
    vm = Vm("arm64", variant="linux-5.4")
    hva = vm.mm.mmap(2 * MB, PROT_READ, "anon")
    # linux-5.4 arm64 prepare: a writable slot over a read-only VMA is EPERM
    op = vm.set_user_memory_region_op(0, 0, 2 * MB, hva)
    with pytest.raises(Exception, match="EPERM"):
        for _ in op:
            pass
    assert vm.memslots.update_in_flight is None


def test_arm64_unmarked_dirty_between_install_and_mark() -> None:
    vm = Vm("arm64")
    hva = vm.mm.mmap(2 * MB, PROT_READ | PROT_WRITE, "anon")
    vm.set_user_memory_region(0, 0, 2 * MB, hva, KVM_MEM_LOG_DIRTY_PAGES)
    vcpu = vm.vcpus[0]
    seen: list[tuple[Sync, int | None]] = []
    for sync in vcpu.access_op(0x3000, 4, Access.WRITE, 1):
        seen.append((sync, vcpu.unmarked_dirty))
    unlock = [u for s, u in seen if s.kind is SyncKind.RELEASE and s.name == "mmu_lock"]
    # published at the pause after mmu_lock is dropped (the page is writable in
    # stage-2, its dirty bit not yet set), and nowhere else
    assert unlock == [3]
    assert [u for s, u in seen if u is not None] == [3]
    assert vcpu.unmarked_dirty is None
    slot = vm.memslots.id_to_memslot(0)
    assert slot is not None and slot.dirty_bitmap is not None and slot.dirty_bitmap[3]


@pytest.mark.parametrize("arch", ["x86", "riscv"])
def test_marked_under_mmu_lock_publishes_nothing(arch: str) -> None:
    """x86 (make_spte) and riscv (kvm_riscv_mmu_map) mark the page dirty under
    mmu_lock: there is no window to publish."""
    vm = Vm(arch)
    hva = vm.mm.mmap(2 * MB, PROT_READ | PROT_WRITE, "anon")
    vm.set_user_memory_region(0, 0, 2 * MB, hva, KVM_MEM_LOG_DIRTY_PAGES)
    vcpu = vm.vcpus[0]
    for _ in vcpu.access_op(0x3000, 4, Access.WRITE, 1):
        assert vcpu.unmarked_dirty is None


@pytest.mark.parametrize("name", ["munmap", "mprotect", "madvise", "mmap-fixed", "mremap"])
def test_mm_change_published_while_mmap_lock_is_held(name: str) -> None:
    vm = Vm("x86")
    mm = vm.mm
    hva = mm.mmap(4 * MB, PROT_READ | PROT_WRITE, "anon")
    mm.host_write(hva, 8, 1)
    ops: dict[str, tuple[Op[Any], list[tuple[int, int]]]] = {
        "munmap": (mm.munmap_op(hva, MB), [(hva, hva + MB)]),
        "mprotect": (mm.mprotect_op(hva, MB, PROT_READ), [(hva, hva + MB)]),
        "madvise": (mm.madvise_op(hva, MB, "dontneed"), [(hva, hva + MB)]),
        "mmap-fixed": (mm.mmap_op(MB, PROT_READ, "anon", addr=hva, fixed=True),
                       [(hva, hva + MB)]),
        "mremap": (mm.mremap_op(hva, MB, MB, maymove=True, fixed_addr=hva + 2 * MB),
                   [(hva, hva + MB), (hva + 2 * MB, hva + 3 * MB)]),
    }
    op, ranges = ops[name]
    held = False
    published = []
    for sync in op:
        if sync.name == "mmap_lock":
            held = sync.kind is SyncKind.ACQUIRE
            continue
        if held:
            published.append(list(mm.changes_in_flight))
        else:
            assert mm.changes_in_flight == []
    assert published and all(p == ranges for p in published)
    assert mm.changes_in_flight == []
