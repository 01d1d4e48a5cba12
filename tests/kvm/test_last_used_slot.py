"""The per-vCPU memslot lookup cache (``vcpu->last_used_slot`` of
``kvm_vcpu_gfn_to_memslot``): a memslot update makes the next fault look the
slot up again, and the cache is no part of an explored state."""

from __future__ import annotations

import pytest

from kvmmem.explore.fingerprint import SKIPPED_ATTRIBUTES
from kvmmem.host import PROT_READ, PROT_WRITE
from kvmmem.kvm.vcpu import Access
from kvmmem.kvm.vm import ARCHES, Vm

G = 0x4000_0000
SIZE = 0x10_0000


@pytest.mark.parametrize("arch", ARCHES)
def test_slot_replaced_at_same_gpa_is_found(arch: str) -> None:
    vm = Vm(arch)
    a = vm.mm.mmap(SIZE, PROT_READ | PROT_WRITE, "anon")
    b = vm.mm.mmap(SIZE, PROT_READ | PROT_WRITE, "anon")
    vm.set_user_memory_region(0, G, SIZE, a)
    assert vm.guest_access(G, 8, Access.WRITE, 0x11).to_outcome() == {"result": "ok"}
    vcpu = vm.vcpus[0]
    old = vcpu.gfn_to_memslot(G >> 12)
    assert old is vm.gfn_to_memslot(G >> 12)
    # Same gfn range, another hva: the cached slot must not be used any more.
    vm.set_user_memory_region(0, G, 0, a)
    assert vcpu.gfn_to_memslot(G >> 12) is None
    vm.set_user_memory_region(0, G, SIZE, b)
    new = vcpu.gfn_to_memslot(G >> 12)
    assert new is not old and new is vm.gfn_to_memslot(G >> 12)
    assert vm.guest_access(G, 8, Access.READ).to_outcome() == {"result": "ok", "value": 0}
    assert vm.mm.host_read(a, 8) == 0x11
    vm.close()


def test_cache_is_not_state() -> None:
    assert "_last_used_slot" in SKIPPED_ATTRIBUTES
