"""The model as a library (issue 17, items 5 and 6): ``vm.stats`` and
``vm.stats_dict()`` agree, ``stage2_lookup`` returns a named
:class:`~kvmmem.arch.pgtable.Translation`, and a failed access is a bare
``fault`` (no memory-fault gpa/size: no kernel fills ``kvm_run.memory_fault``
for ordinary memory), exactly as the README's library section shows."""

from __future__ import annotations

import pytest

from kvmmem.arch.pgtable import Translation
from kvmmem.kvm.stats import COUNTERS
from kvmmem.kvm.vcpu import Access
from kvmmem.kvm.vm import ARCHES, Vm


@pytest.mark.parametrize("arch", ARCHES)
def test_stats_and_stats_dict_agree(arch: str) -> None:
    vm = Vm(arch, variant="upstream")
    hva = vm.mm.mmap(2 << 20, 3, "anon")
    vm.set_user_memory_region(0, 0x0, 2 << 20, hva)
    assert vm.stats.pages_4k == vm.stats_dict()["pages_4k"] == 0
    assert vm.guest_access(0x1000, 8, Access.WRITE, 0x42).to_outcome() == {"result": "ok"}
    assert vm.guest_access(0x3000, 8, Access.WRITE, 0x42).to_outcome() == {"result": "ok"}
    stats = vm.stats_dict()
    assert vm.stats.pages_4k == stats["pages_4k"] == 2
    assert vm.stats.pages_2m == stats["pages_2m"] == 0
    assert vm.stats.as_dict() == {name: stats[name] for name in COUNTERS}
    vm.mm.mprotect(hva, 2 << 20, 1)  # the notifier zaps stage-2
    assert vm.stats.pages_4k == vm.stats_dict()["pages_4k"] == 0


@pytest.mark.parametrize("arch", ARCHES)
def test_stage2_lookup_is_a_named_translation(arch: str) -> None:
    vm = Vm(arch)
    hva = vm.mm.mmap(2 << 20, 3, "anon")
    vm.set_user_memory_region(0, 0x0, 2 << 20, hva)
    assert vm.stage2_lookup(0x1000) is None
    vm.guest_access(0x1000, 8, Access.WRITE, 1)
    t = vm.stage2_lookup(0x1000)
    assert isinstance(t, Translation)
    assert t.writable is True
    assert vm.stage2.walk(0x1000) is not None
    assert t.pfn == vm.stage2.walk(0x1000).pfn  # type: ignore[union-attr]
    pfn, writable, executable = t  # still a tuple
    assert (pfn, writable, executable) == (t.pfn, t.writable, t.executable)


@pytest.mark.parametrize("arch", ARCHES)
def test_a_failed_access_is_a_bare_fault(arch: str) -> None:
    """Real x86 (6.1 and 7.3 with TDP, this host's KVM), arm64 7.3 and riscv 7.2 all
    return a bare EFAULT with no KVM_EXIT_MEMORY_FAULT for a write to a read-only VMA;
    the model's outcome has no gpa/size either."""
    vm = Vm(arch)
    hva = vm.mm.mmap(2 << 20, 3, "anon")
    vm.set_user_memory_region(0, 0x0, 2 << 20, hva)
    vm.mm.mprotect(hva, 2 << 20, 1)
    r = vm.guest_access(0x1000, 8, Access.WRITE, 1)
    assert r.to_outcome() == {"result": "fault"}
    assert (r.gpa, r.length) == (0x1000, 8)  # the access itself is still known
