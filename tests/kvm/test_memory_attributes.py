"""KVM_SET_MEMORY_ATTRIBUTES and private memory (x86 KVM_X86_SW_PROTECTED_VM).

Expected values are the kernel's: kvm_vm_ioctl_set_mem_attributes' checks in order,
kvm_vm_set_mem_attributes' invalidation, x86 kvm_mmu_faultin_pfn's private branch
and the KVM_EXIT_MEMORY_FAULT fields private_mem_kvm_exits_test expects."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmmem.errors import InputError, KernelError
from kvmmem.host import PROT_READ, PROT_WRITE
from kvmmem.kvm.guest_memfd import GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP
from kvmmem.kvm.invariants import validate_path_independence, validate_vm
from kvmmem.kvm.kvm_host import MemAttrArray
from kvmmem.kvm.memory_attributes import KVM_MEMORY_ATTRIBUTE_PRIVATE
from kvmmem.kvm.memslot import KVM_MEM_GUEST_MEMFD
from kvmmem.kvm.vcpu import Access
from kvmmem.kvm.vm import Vm
from kvmmem.sync import drive

M2 = 2 << 20
GPA = 0x4000_0000
PRIVATE = KVM_MEMORY_ATTRIBUTE_PRIVATE


def set_attrs(vm: Vm, gpa: int, size: int, attrs: int, flags: int = 0) -> None:
    drive(vm.set_memory_attributes_op(gpa, size, attrs, flags))


def errno_of(vm: Vm, gpa: int, size: int, attrs: int, flags: int = 0) -> str:
    with pytest.raises(KernelError) as err:
        set_attrs(vm, gpa, size, attrs, flags)
    return err.value.errno


def private_vm(variant: str = "upstream") -> tuple[Vm, int]:
    """A sw_protected VM: slot 0 at GPA binds a guest_memfd (no MMAP: not gmem-only) and
    keeps anonymous memory (filled with 0x5a) at its hva."""
    vm = Vm("x86", variant=variant, vm_type="sw_protected")
    gmem = vm.create_guest_memfd(M2, 0)
    hva = vm.mm.mmap(M2, PROT_READ | PROT_WRITE, "anon", fill=0x5A)
    vm.set_user_memory_region(0, GPA, M2, hva, KVM_MEM_GUEST_MEMFD, guest_memfd=gmem.fd,
                              v2=True)
    return vm, hva


# --- the ioctl ---------------------------------------------------------------------------------


def test_checks_in_the_kernels_order() -> None:
    """flags, then unsupported attributes, then size 0, then alignment: EINVAL each;
    a default VM supports no attribute, attributes 0 pass, any range (slot or not)."""
    vm = Vm("x86")
    assert errno_of(vm, 0x800, 0, PRIVATE, flags=1) == "EINVAL"
    assert errno_of(vm, 0, 4096, PRIVATE) == "EINVAL"
    assert errno_of(vm, 0x800, 0, 0) == "EINVAL"
    assert errno_of(vm, 0x800, 4096, 0) == "EINVAL"
    assert errno_of(vm, 0, 0x800, 0) == "EINVAL"
    assert errno_of(vm, (1 << 64) - 4096, 8192, 0) == "EINVAL"
    set_attrs(vm, 1 << 40, 4096, 0)
    pv = Vm("x86", vm_type="sw_protected")
    set_attrs(pv, 1 << 40, 4096, PRIVATE)
    assert pv.mem_attr_array.get((1 << 40) >> 12) == PRIVATE


@pytest.mark.parametrize(("arch", "variant", "errno"), [
    ("x86", "6.7", "ENOTTY"), ("arm64", "upstream", "EINVAL"), ("riscv", "upstream", "EINVAL")])
def test_without_memory_attributes_the_ioctl_is_unknown(arch: str, variant: str,
                                                        errno: str) -> None:
    assert errno_of(Vm(arch, variant=variant), 0, 4096, 0) == errno


def test_sw_protected_is_x86_from_6_8() -> None:
    with pytest.raises(InputError, match="sw_protected"):
        Vm("arm64", vm_type="sw_protected")
    with pytest.raises(InputError, match=r"6\.7"):
        Vm("x86", variant="6.7", vm_type="sw_protected")


def test_a_private_vm_binds_before_6_18_and_gets_no_init_shared() -> None:
    """check_memory_region_flags: KVM_MEM_GUEST_MEMFD for a VM with private memory from
    v6.8; kvm_arch_supports_gmem_init_shared is false for it (v6.18: MMAP only)."""
    private_vm("6.12")
    vm = Vm("x86", vm_type="sw_protected")
    vm.create_guest_memfd(M2, GUEST_MEMFD_FLAG_MMAP)
    with pytest.raises(KernelError, match="EINVAL"):
        vm.create_guest_memfd(M2, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)


# --- conversion --------------------------------------------------------------------------------


def test_conversion_zaps_and_moves_the_sequence_and_a_no_op_does_not() -> None:
    vm, _ = private_vm()
    vm.guest_access(GPA, 4, Access.READ)
    assert vm.stage2_lookup(GPA) is not None
    seq = vm.mmu_invalidate_seq
    set_attrs(vm, GPA, 4096, PRIVATE)
    assert vm.stage2_lookup(GPA) is None and vm.mmu_invalidate_seq == seq + 1
    set_attrs(vm, GPA, 4096, PRIVATE)  # already so: kvm_range_has_memory_attributes
    assert vm.mmu_invalidate_seq == seq + 1
    set_attrs(vm, 1 << 40, 4096, PRIVATE)  # no slot there: stored, no invalidation
    assert vm.mmu_invalidate_seq == seq + 1


def test_private_and_shared_are_two_pages() -> None:
    vm, hva = private_vm()
    set_attrs(vm, GPA, 4096, PRIVATE)
    assert vm.guest_access(GPA, 4, Access.WRITE, 7).result == "ok"
    assert vm.mm.host_read(hva, 4) == 0x5A5A5A5A
    validate_vm(vm)
    assert validate_path_independence(vm) == []
    set_attrs(vm, GPA, 4096, 0)
    assert vm.guest_access(GPA, 4, Access.READ).value == 0x5A5A5A5A
    set_attrs(vm, GPA, 4096, PRIVATE)
    assert vm.guest_access(GPA, 4, Access.READ).value == 7


def test_private_access_without_guest_memfd_is_a_private_memory_fault() -> None:
    """kvm_handle_noslot_fault and kvm_mmu_faultin_pfn_gmem without a file: EFAULT with
    KVM_EXIT_MEMORY_FAULT, the page's gpa, size 4096, flags PRIVATE."""
    vm, _ = private_vm()
    other = vm.mm.mmap(M2, PROT_READ | PROT_WRITE, "anon")
    vm.set_user_memory_region(1, 2 * GPA, M2, other)
    set_attrs(vm, 2 * GPA, M2, PRIVATE)
    set_attrs(vm, 4 * GPA, 4096, PRIVATE)
    want = {"result": "fault", "size": 4096, "flags": PRIVATE}
    assert vm.guest_access(2 * GPA + 0x1234, 4, Access.WRITE, 1).to_outcome() == \
        {**want, "gpa": 2 * GPA + 0x1000}
    assert vm.guest_access(4 * GPA + 8, 4, Access.READ).to_outcome() == {**want, "gpa": 4 * GPA}


# --- the interval store ----------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(1, 12), st.sampled_from([0, 8, 9])),
                max_size=20))
def test_mem_attr_array_is_a_gfn_map(ops: list[tuple[int, int, int]]) -> None:
    """set/get/uniform against a plain per-gfn dict."""
    arr = MemAttrArray()
    ref: dict[int, int] = {}
    for start, n, attrs in ops:
        end = start + n
        assert arr.uniform(start, end, attrs) == all(ref.get(g, 0) == attrs
                                                     for g in range(start, end))
        arr.set(start, end, attrs)
        for g in range(start, end):
            ref[g] = attrs
        assert all(arr.get(g) == ref.get(g, 0) for g in range(0, 60))
        spans = arr.ranges()
        assert all(a for _, _, a in spans)
        assert all(e1 <= s2 for (_, e1, _), (s2, _, _) in itertools.pairwise(spans))
