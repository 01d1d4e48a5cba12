"""Per-gfn memory attributes: ``KVM_SET_MEMORY_ATTRIBUTES`` (``virt/kvm/kvm_main.c``).

v6.8 (``CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES``, on x86) gives each gfn of a VM an
attribute word, today one bit: ``KVM_MEMORY_ATTRIBUTE_PRIVATE``.  A private gfn is
served from the guest_memfd its memslot binds (``kvm_gmem_get_pfn``), a shared one
from the slot's host address; a fault whose private bit disagrees with the attribute,
or a private fault with no guest_memfd behind it, exits to userspace with
``KVM_EXIT_MEMORY_FAULT`` (``KVM_MEMORY_EXIT_FLAG_PRIVATE``) so the VMM can convert
and retry.  Only a VM with private memory supports the attribute (x86
``KVM_X86_SW_PROTECTED_VM``, SEV-SNP, TDX: ``kvm_arch_has_private_mem``); on a
default VM the ioctl takes attributes 0 only.

The attributes themselves (``kvm->mem_attr_array``, ``kvm_get_memory_attributes``,
``kvm_mem_is_private``) are in :mod:`kvmmem.kvm.kvm_host`, as in ``kvm_host.h``.
Changing them for a range that a memslot covers is an invalidation
(``kvm_vm_set_mem_attributes``): under ``slots_lock``, ``kvm_mmu_invalidate_begin``
with the range recorded and every mapping of it zapped
(x86 ``kvm_arch_pre_set_memory_attributes`` -> ``kvm_unmap_gfn_range``: without
mirrored TDP, TDX's, private and shared alike), then the new attributes, then
``kvm_mmu_invalidate_end``: a fault racing the conversion retries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmmem.errors import KernelError
from kvmmem.kvm.guest_memfd import kvm_gmem_invalidate_begin_op
from kvmmem.kvm.kvm_host import KVM_MEMORY_ATTRIBUTE_PRIVATE, MemAttrArray, kvm_mem_is_private
from kvmmem.kvm.mmu_notifier import kvm_mmu_invalidate_end
from kvmmem.sync import Op, acquire, release

if TYPE_CHECKING:
    from kvmmem.kvm.kvm_host import Kvm

KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3
CALL = "KVM_SET_MEMORY_ATTRIBUTES"
__all__ = ["CALL", "KVM_MEMORY_ATTRIBUTE_PRIVATE", "KVM_MEMORY_EXIT_FLAG_PRIVATE", "MemAttrArray",
           "kvm_mem_is_private", "kvm_supported_mem_attributes",
           "kvm_vm_ioctl_set_mem_attributes_op", "kvm_vm_set_mem_attributes_op"]
_U64 = 1 << 64


def kvm_supported_mem_attributes(kvm: Kvm) -> int:
    """``kvm_supported_mem_attributes`` (= KVM_CAP_MEMORY_ATTRIBUTES on the VM):
    PRIVATE for a VM with private memory, else none."""
    return KVM_MEMORY_ATTRIBUTE_PRIVATE if kvm.has_private_mem else 0


def kvm_vm_ioctl_set_mem_attributes_op(kvm: Kvm, address: int, size: int, attributes: int,
                                       flags: int = 0) -> Op[None]:
    """``KVM_SET_MEMORY_ATTRIBUTES`` (``kvm_vm_ioctl_set_mem_attributes``), as an op.

    Raises KernelError: the architecture's unknown-ioctl errno where the kernel has no
    memory attributes; EINVAL for flags, an unsupported attribute, a zero or wrapping
    size, an unaligned address or size (in that order).  Any gfn range is accepted, a
    slot behind it or not."""
    if not kvm.arch.has_memory_attributes(kvm.variant):
        raise KernelError(kvm.arch.unknown_vm_ioctl_errno, CALL,
                          f"{kvm.arch_name} KVM of {kvm.variant.name} has no memory attributes")
    if flags:
        raise KernelError("EINVAL", CALL, "flags must be 0")
    if attributes & ~kvm_supported_mem_attributes(kvm):
        raise KernelError("EINVAL", CALL, f"attributes {attributes:#x} not supported by this "
                          f"VM (KVM_CAP_MEMORY_ATTRIBUTES {kvm_supported_mem_attributes(kvm):#x})")
    if not size or address + size >= _U64:
        raise KernelError("EINVAL", CALL, "size zero or the range wraps")
    shift = kvm.pg.page_shift
    if address % (1 << shift) or size % (1 << shift):
        raise KernelError("EINVAL", CALL, "address or size not page aligned")
    yield from kvm_vm_set_mem_attributes_op(kvm, address >> shift,
                                            (address + size) >> shift, attributes)


def kvm_vm_set_mem_attributes_op(kvm: Kvm, start: int, end: int, attributes: int) -> Op[None]:
    """``kvm_vm_set_mem_attributes``: nothing if the range already has ``attributes``;
    else, where memslots cover it, an invalidation around the change (see the module
    docstring)."""
    yield acquire("slots_lock")
    arr = kvm.mem_attr_array
    if arr.uniform(start, end, attributes):
        yield release("slots_lock")
        return
    ranges = [(slot, max(start, slot.base_gfn), min(end, slot.base_gfn + slot.npages))
              for slot in kvm.for_each_memslot()
              if slot.base_gfn < end and start < slot.base_gfn + slot.npages]
    if ranges:
        # kvm_handle_gfn_range(pre_set_range): on_lock = kvm_mmu_invalidate_begin, the
        # handler kvm_pre_set_memory_attributes -> kvm_arch_pre_set_memory_attributes
        # (x86: kvm_unmap_gfn_range, private and shared alike without mirrored TDP) - the
        # same locked begin-and-unmap as the guest_memfd invalidation
        yield from kvm_gmem_invalidate_begin_op(kvm, ranges)
    arr.set(start, end, attributes)
    if kvm.log is not None:
        kvm.log.emit("kvm_vm_set_mem_attributes", start=start, end=end, attrs=attributes)
    if ranges:
        # kvm_handle_gfn_range(post_set_range): on_lock = kvm_mmu_invalidate_end
        yield acquire("mmu_lock")
        kvm_mmu_invalidate_end(kvm)
        yield release("mmu_lock")
    yield release("slots_lock")
