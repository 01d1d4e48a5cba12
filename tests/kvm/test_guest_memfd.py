"""guest_memfd (virt/kvm/guest_memfd.c) in the model: creation, binding, gmem-only
faults, the file's own invalidation, host mappings of the file.

Expected values are the kernel's: the v6.18-era guest_memfd.c and kvm_main.c rules,
and what real arm64 and x86 7.2/7.3 answered under QEMU (docs/conformance.md);
each test names the function whose rule it checks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmmem.errors import KernelError, ValidationError
from kvmmem.host import PROT_READ, PROT_WRITE, HostSignal
from kvmmem.host.truncate import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, vfs_fallocate_op
from kvmmem.kvm.fault import Fault
from kvmmem.kvm.guest_memfd import (
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    GmemFile,
    kvm_gmem_get_supported_flags,
    kvm_memslot_is_gmem_only,
)
from kvmmem.kvm.invariants import validate_path_independence, validate_vm
from kvmmem.kvm.memslot import KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES
from kvmmem.kvm.vcpu import Access
from kvmmem.kvm.vm import Vm
from kvmmem.sync import drive

M2 = 2 << 20
GPA = 0x4000_0000
MMAP_SHARED = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def errno_of(fn: object, *args: object, **kw: object) -> str:
    with pytest.raises(KernelError) as err:
        fn(*args, **kw)  # type: ignore[operator]
    return err.value.errno


def gmem_vm(arch: str = "x86", variant: str = "upstream", flags: int = MMAP_SHARED,
            size: int = M2) -> tuple[Vm, GmemFile, int]:
    """A VM with a gmem-only slot at GPA over a mapped guest_memfd: (vm, file, hva)."""
    vm = Vm(arch, variant=variant)
    gmem = vm.create_guest_memfd(size, flags)
    hva = vm.mm.mmap(size, PROT_READ | PROT_WRITE, "guest_memfd", file=gmem.inode)
    vm.set_user_memory_region(0, GPA, size, hva, KVM_MEM_GUEST_MEMFD, guest_memfd=gmem.fd,
                              v2=True)
    return vm, gmem, hva


# --- KVM_CREATE_GUEST_MEMFD -----------------------------------------------------------------


@pytest.mark.parametrize(("arch", "variant", "errno"), [
    ("x86", "6.7", "ENOTTY"),     # compiled out: kvm_arch_vm_ioctl's default on x86
    ("arm64", "6.17", "EINVAL"),  # arm64 selects KVM_GUEST_MEMFD from v6.18
    ("riscv", "upstream", "EINVAL"),
])
def test_create_without_guest_memfd_is_the_unknown_ioctl(arch: str, variant: str,
                                                         errno: str) -> None:
    assert errno_of(Vm(arch, variant=variant).create_guest_memfd, M2, 0) == errno


def test_create_checks_flags_then_size() -> None:
    """kvm_gmem_create: flags outside kvm_gmem_get_supported_flags, then size <= 0 or
    unaligned, EINVAL (this host's 6.18: flags 4, size 0 and 0x1800 refused)."""
    vm = Vm("x86")
    assert kvm_gmem_get_supported_flags(vm) == MMAP_SHARED
    for flags in (0, 1, 2, 3):
        vm.create_guest_memfd(M2, flags)
    assert errno_of(vm.create_guest_memfd, M2, 4) == "EINVAL"
    assert errno_of(vm.create_guest_memfd, 0, 4) == "EINVAL"
    assert errno_of(vm.create_guest_memfd, 0, 0) == "EINVAL"
    assert errno_of(vm.create_guest_memfd, 0x1800, 0) == "EINVAL"


def test_before_6_18_flags_are_zero_and_a_default_vm_cannot_bind() -> None:
    """v6.8-v6.17: valid flags 0 (KVM_CAP_GUEST_MEMFD_FLAGS absent), and
    check_memory_region_flags admits KVM_MEM_GUEST_MEMFD only for a VM with private
    memory: Debian x86 6.12 reports KVM_CAP_GUEST_MEMFD 0 on a default VM."""
    vm = Vm("x86", variant="6.12")
    assert errno_of(vm.create_guest_memfd, M2, GUEST_MEMFD_FLAG_MMAP) == "EINVAL"
    gmem = vm.create_guest_memfd(M2, 0)
    assert errno_of(vm.set_user_memory_region, 0, GPA, M2, 0, KVM_MEM_GUEST_MEMFD,
                    guest_memfd=gmem.fd, v2=True) == "EINVAL"


def test_fds_are_the_lowest_free_above_stderr() -> None:
    vm = Vm("arm64")
    assert [vm.create_guest_memfd(M2).fd for _ in range(3)] == [3, 4, 5]


# --- binding ---------------------------------------------------------------------------------


def test_bind_errnos_and_gmem_only() -> None:
    """kvm_gmem_bind: EBADF for a closed fd, EINVAL for a range outside the file or an
    unaligned offset, EEXIST for a bound range (7.2, 7.3; EINVAL in the 6.18 source);
    KVM_MEMSLOT_GMEM_ONLY with GUEST_MEMFD_FLAG_MMAP only."""
    vm = Vm("x86")
    gmem = vm.create_guest_memfd(M2, MMAP_SHARED)
    plain = vm.create_guest_memfd(M2, 0)

    def bind(slot: int, gpa: int, size: int, fd: int, off: int = 0) -> None:
        vm.set_user_memory_region(slot, gpa, size, 0, KVM_MEM_GUEST_MEMFD, guest_memfd=fd,
                                  guest_memfd_offset=off, v2=True)

    assert errno_of(bind, 0, GPA, M2, 99) == "EBADF"
    assert errno_of(bind, 0, GPA, M2, gmem.fd, 4096) == "EINVAL"
    assert errno_of(bind, 0, GPA, M2, gmem.fd, 2048) == "EINVAL"
    bind(0, GPA, M2 // 2, gmem.fd)
    assert errno_of(bind, 1, 2 * GPA, M2 // 2, gmem.fd, M2 // 4) == "EEXIST"
    bind(1, 2 * GPA, M2 // 2, gmem.fd, M2 // 2)
    bind(2, 3 * GPA, M2, plain.fd)
    slots = [vm.memslots.id_to_memslot(i) for i in range(3)]
    assert [kvm_memslot_is_gmem_only(s) for s in slots] == [True, True, False]
    assert [(b[0], b[1]) for b in gmem.bindings] == [(0, 256), (256, 512)]
    old = Vm("x86", variant="7.1")
    g = old.create_guest_memfd(M2, MMAP_SHARED)
    old.set_user_memory_region(0, GPA, M2, 0, KVM_MEM_GUEST_MEMFD, guest_memfd=g.fd, v2=True)
    assert errno_of(old.set_user_memory_region, 1, 2 * GPA, M2, 0, KVM_MEM_GUEST_MEMFD,
                    guest_memfd=g.fd, v2=True) == "EINVAL"


def test_gmem_slots_are_immutable_and_unbind_on_delete() -> None:
    """kvm_set_memory_region: a request with KVM_MEM_GUEST_MEMFD for an existing slot,
    or one dropping it, is EINVAL; DELETE frees the binding (kvm_gmem_unbind) so the
    range binds again."""
    vm, gmem, hva = gmem_vm()
    assert errno_of(vm.set_user_memory_region, 0, GPA, M2, hva, KVM_MEM_GUEST_MEMFD,
                    guest_memfd=gmem.fd, v2=True) == "EINVAL"
    assert errno_of(vm.set_user_memory_region, 0, GPA, M2, hva,
                    KVM_MEM_LOG_DIRTY_PAGES) == "EINVAL"
    vm.set_user_memory_region(0, GPA, 0, 0)
    assert gmem.bindings == []
    vm.set_user_memory_region(1, 2 * GPA, M2, hva, KVM_MEM_GUEST_MEMFD, guest_memfd=gmem.fd,
                              v2=True)


def test_arm64_refuses_a_slot_that_is_not_gmem_only() -> None:
    """arm64 kvm_arch_prepare_memory_region (v6.18): EINVAL, and the binding is undone."""
    vm = Vm("arm64")
    gmem = vm.create_guest_memfd(M2, 0)
    hva = vm.mm.mmap(M2, PROT_READ | PROT_WRITE, "anon")
    assert errno_of(vm.set_user_memory_region, 0, GPA, M2, hva, KVM_MEM_GUEST_MEMFD,
                    guest_memfd=gmem.fd, v2=True) == "EINVAL"
    assert gmem.bindings == [] and vm.memslots.id_to_memslot(0) is None


# --- faults ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["x86", "arm64"])
def test_gmem_only_fault_maps_the_files_page_at_4k(arch: str) -> None:
    """kvm_mmu_faultin_pfn_gmem / gmem_abort: the file's page, never a block (max_order
    0), writable; the host PTE at the hva plays no part."""
    vm, gmem, _ = gmem_vm(arch)
    assert vm.guest_access(GPA + 0x3000, 4, Access.WRITE, 0xAB).result == "ok"
    leaf = vm.stage2_lookup(GPA + 0x3000)
    assert leaf is not None and leaf[0] == gmem.inode.cache[3]
    assert [lf.size for lf in vm.stage2.for_each_leaf()] == [4096]
    validate_vm(vm)
    assert validate_path_independence(vm) == []


@pytest.mark.parametrize("arch", ["x86", "arm64"])
def test_a_vanished_file_is_a_memory_fault_exit(arch: str) -> None:
    """kvm_gmem_get_pfn fails EFAULT when the slot's file is gone: KVM_RUN fails EFAULT
    with KVM_EXIT_MEMORY_FAULT for the page, flags 0 (a shared fault)."""
    vm, _, _ = gmem_vm(arch)
    slot = vm.memslots.id_to_memslot(0)
    assert slot is not None and slot.gmem is not None
    slot.gmem.file = None  # as kvm_gmem_release leaves a bound slot
    r = vm.guest_access(GPA + 0x1234, 4, Access.READ)
    assert r.to_outcome() == {"result": "fault", "gpa": GPA + 0x1000, "size": 4096, "flags": 0}
    decision = drive(vm.arch.handle_fault(vm, vm.vcpus[0], GPA, Access.READ))
    assert decision.kind is Fault.MEMORY_FAULT and decision.errno == "EFAULT"


# --- the file --------------------------------------------------------------------------------


def test_punch_hole_invalidates_through_guest_memfd_not_the_notifier() -> None:
    """kvm_gmem_punch_hole: kvm_gmem_invalidate_begin zaps the bound gfns under
    mmu_lock and the sequence moves at the end; the host mapping of the file is zapped by
    the truncation (one MMU-notifier event, for the hva range, which this slot's
    userspace_addr also covers)."""
    vm, gmem, hva = gmem_vm()
    vm.guest_access(GPA + 0x1000, 4, Access.WRITE, 5)
    vm.guest_access(GPA + 0x2000, 4, Access.WRITE, 6)
    seq = vm.mmu_invalidate_seq
    drive(vfs_fallocate_op(gmem.inode, PUNCH, 0x1000, 0x1000))
    assert vm.stage2_lookup(GPA + 0x1000) is None and vm.stage2_lookup(GPA + 0x2000)
    assert vm.mmu_invalidate_seq > seq and vm.mmu_invalidate_in_progress == 0
    assert 1 not in gmem.inode.cache
    assert vm.guest_access(GPA + 0x1000, 4, Access.READ).value == 0
    assert vm.mm.host_read(hva + 0x2000, 4) == 6
    validate_vm(vm)


@pytest.mark.parametrize("arch", ["x86", "arm64"])
def test_no_gmem_invalidate_leaves_the_punched_page_mapped(arch: str) -> None:
    """The mutation no-gmem-invalidate (a punch without kvm_gmem_invalidate_begin):
    stage-2 keeps the page the file freed, which no-stale-translation reports.  The
    slot's hva is not the file's mapping (else the truncation's MMU-notifier event for
    that mapping would zap the slot too)."""
    vm = Vm(arch, variant="no-gmem-invalidate")
    gmem = vm.create_guest_memfd(M2, MMAP_SHARED)
    hva = vm.mm.mmap(M2, PROT_READ | PROT_WRITE, "anon")
    vm.set_user_memory_region(0, GPA, M2, hva, KVM_MEM_GUEST_MEMFD, guest_memfd=gmem.fd,
                              v2=True)
    vm.guest_access(GPA, 4, Access.WRITE, 1)
    drive(vfs_fallocate_op(gmem.inode, PUNCH, 0, 4096))
    with pytest.raises(ValidationError) as err:
        validate_vm(vm)
    assert err.value.invariant == "no-stale-translation"


def test_fallocate_errnos() -> None:
    """vfs_fallocate: PUNCH_HOLE needs KEEP_SIZE (EOPNOTSUPP); kvm_gmem_fallocate:
    unaligned EINVAL, an allocation beyond i_size EINVAL, a punch beyond it nothing."""
    _, gmem, _ = gmem_vm()
    f = gmem.inode
    assert errno_of(drive, vfs_fallocate_op(f, FALLOC_FL_PUNCH_HOLE, 0, 4096)) == "EOPNOTSUPP"
    assert errno_of(drive, vfs_fallocate_op(f, PUNCH, 2048, 4096)) == "EINVAL"
    assert errno_of(drive, vfs_fallocate_op(f, FALLOC_FL_KEEP_SIZE, M2, 4096)) == "EINVAL"
    drive(vfs_fallocate_op(f, PUNCH, M2, 4096))
    drive(vfs_fallocate_op(f, FALLOC_FL_KEEP_SIZE, 0, 8192))
    assert sorted(f.cache) == [0, 1]


def test_host_mapping_needs_mmap_and_touching_needs_init_shared() -> None:
    """kvm_gmem_mmap: ENODEV without GUEST_MEMFD_FLAG_MMAP; kvm_gmem_fault_user_mapping:
    SIGBUS without INIT_SHARED (the guest still uses the pages)."""
    vm = Vm("x86")
    plain = vm.create_guest_memfd(M2, 0)
    assert errno_of(vm.mm.mmap, M2, PROT_READ, "guest_memfd", file=plain.inode) == "ENODEV"
    vm, _, hva = gmem_vm(flags=GUEST_MEMFD_FLAG_MMAP)
    with pytest.raises(HostSignal, match="SIGBUS"):
        vm.mm.host_read(hva, 4)
    assert vm.guest_access(GPA, 4, Access.WRITE, 9).result == "ok"
    assert vm.guest_access(GPA, 4, Access.READ).value == 9


# --- random sequences -------------------------------------------------------------------------

_PAGES = 8
_ops = st.lists(st.one_of(
    st.tuples(st.just("guest_write"), st.integers(0, _PAGES - 1), st.integers(1, 0xFFFF)),
    st.tuples(st.just("host_write"), st.integers(0, _PAGES - 1), st.integers(1, 0xFFFF)),
    st.tuples(st.just("punch"), st.integers(0, _PAGES - 1), st.integers(1, 3)),
    st.tuples(st.just("read"), st.integers(0, _PAGES - 1), st.just(0)),
), max_size=25)


@settings(max_examples=60, deadline=None)
@given(arch=st.sampled_from(["x86", "arm64"]), ops=_ops)
def test_random_sequences_keep_one_view(arch: str, ops: list[tuple[str, int, int]]) -> None:
    """Guest and host writes, punches and reads on a gmem-only slot over the file's own
    mapping: the guest and the host see the same bytes, a punched page reads zero, and
    the invariants (no stale translation into the file, path independence) hold."""
    vm, _, hva = gmem_vm(arch, size=_PAGES * 4096)
    want = [0] * _PAGES
    for op, page, value in ops:
        if op == "guest_write":
            assert vm.guest_access(GPA + page * 4096, 4, Access.WRITE, value).result == "ok"
            want[page] = value
        elif op == "host_write":
            vm.mm.host_write(hva + page * 4096, 4, value)
            want[page] = value
        elif op == "punch":
            n = min(value, _PAGES - page)
            drive(vfs_fallocate_op(vm.mm.fdtable[3].inode,  # type: ignore[attr-defined]
                                   PUNCH, page * 4096, n * 4096))
            want[page:page + n] = [0] * n
        else:
            assert vm.guest_access(GPA + page * 4096, 4, Access.READ).value == want[page]
            assert vm.mm.host_read(hva + page * 4096, 4) == want[page]
        validate_vm(vm)
    validate_path_independence(vm)
