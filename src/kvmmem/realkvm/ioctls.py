"""One table of the KVM ioctls kvmmem issues, each with the capability it needs.

The numbers are computed with the ``_IO``/``_IOR``/``_IOW``/``_IOWR`` macros of
``include/uapi/asm-generic/ioctl.h`` from the request code and the size of the
uapi structure (taken from :mod:`kvmmem.realkvm.structs`, whose sizes are
asserted against the kernel's), the way ``include/uapi/linux/kvm.h`` defines
them.  :data:`IOCTLS` maps the kernel's name to ``(number, capability)``;
``capability`` is the ``KVM_CAP_*`` number ``KVM_CHECK_EXTENSION`` must report
non-zero before the ioctl may be used (``None``: part of the base API 12).
"""

from __future__ import annotations

import ctypes

from kvmmem.realkvm import structs as s

# --- include/uapi/asm-generic/ioctl.h ---------------------------------------------

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _IOC(direction: int, kind: int, nr: int, size: int) -> int:
    """``_IOC()``: pack direction, type, number and argument size into a request."""
    if not 0 <= size < (1 << _IOC_SIZEBITS):
        raise ValueError(f"ioctl argument size {size} does not fit {_IOC_SIZEBITS} bits")
    return (
        (direction << _IOC_DIRSHIFT)
        | (kind << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(kind: int, nr: int) -> int:
    """``_IO()``: a request without argument structure."""
    return _IOC(_IOC_NONE, kind, nr, 0)


def _IOR(kind: int, nr: int, struct: type[ctypes.Structure] | int) -> int:
    """``_IOR()``: the kernel writes the structure back to userspace."""
    return _IOC(_IOC_READ, kind, nr, _size(struct))


def _IOW(kind: int, nr: int, struct: type[ctypes.Structure] | int) -> int:
    """``_IOW()``: userspace passes the structure in."""
    return _IOC(_IOC_WRITE, kind, nr, _size(struct))


def _IOWR(kind: int, nr: int, struct: type[ctypes.Structure] | int) -> int:
    """``_IOWR()``: the structure goes in and comes back."""
    return _IOC(_IOC_READ | _IOC_WRITE, kind, nr, _size(struct))


def _size(struct: type[ctypes.Structure] | int) -> int:
    return struct if isinstance(struct, int) else ctypes.sizeof(struct)


KVMIO = 0xAE

# --- capabilities (include/uapi/linux/kvm.h, KVM_CAP_*) ---------------------------

KVM_CAP_USER_MEMORY = 3
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MP_STATE = 14
KVM_CAP_SYNC_MMU = 16
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_ONE_REG = 70
KVM_CAP_READONLY_MEM = 81
KVM_CAP_ENABLE_CAP_VM = 98
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_ARM_VM_IPA_SIZE = 165
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_BINARY_STATS_FD = 203
KVM_CAP_ARM_MTE = 205
KVM_CAP_DIRTY_LOG_RING_ACQ_REL = 223
KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP = 225
KVM_CAP_USER_MEMORY2 = 231
KVM_CAP_MEMORY_FAULT_INFO = 232
KVM_CAP_MEMORY_ATTRIBUTES = 233
KVM_CAP_GUEST_MEMFD = 234
KVM_CAP_VM_TYPES = 235
KVM_CAP_PRE_FAULT_MEMORY = 236
KVM_CAP_GUEST_MEMFD_FLAGS = 244

CAPABILITIES: dict[str, int] = {
    name: value for name, value in globals().items() if name.startswith("KVM_CAP_")
}
"""Capability name -> number, for reports."""

# --- the table ---------------------------------------------------------------------

IOCTLS: dict[str, tuple[int, int | None]] = {
    # /dev/kvm
    "KVM_GET_API_VERSION": (_IO(KVMIO, 0x00), None),
    "KVM_CREATE_VM": (_IO(KVMIO, 0x01), None),
    "KVM_CHECK_EXTENSION": (_IO(KVMIO, 0x03), None),
    "KVM_GET_VCPU_MMAP_SIZE": (_IO(KVMIO, 0x04), None),
    "KVM_GET_SUPPORTED_CPUID": (_IOWR(KVMIO, 0x05, s.kvm_cpuid2), KVM_CAP_EXT_CPUID),
    # VM fd
    "KVM_CREATE_VCPU": (_IO(KVMIO, 0x41), None),
    "KVM_GET_DIRTY_LOG": (_IOW(KVMIO, 0x42, s.kvm_dirty_log), None),
    "KVM_SET_USER_MEMORY_REGION": (
        _IOW(KVMIO, 0x46, s.kvm_userspace_memory_region), KVM_CAP_USER_MEMORY),
    "KVM_SET_USER_MEMORY_REGION2": (
        _IOW(KVMIO, 0x49, s.kvm_userspace_memory_region2), KVM_CAP_USER_MEMORY2),
    "KVM_ENABLE_CAP": (_IOW(KVMIO, 0xA3, s.kvm_enable_cap), KVM_CAP_ENABLE_CAP_VM),
    "KVM_CLEAR_DIRTY_LOG": (
        _IOWR(KVMIO, 0xC0, s.kvm_clear_dirty_log), KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2),
    "KVM_GET_STATS_FD": (_IO(KVMIO, 0xCE), KVM_CAP_BINARY_STATS_FD),
    "KVM_RESET_DIRTY_RINGS": (_IO(KVMIO, 0xC7), None),
    "KVM_CREATE_GUEST_MEMFD": (
        _IOWR(KVMIO, 0xD4, s.kvm_create_guest_memfd), KVM_CAP_GUEST_MEMFD),
    "KVM_SET_MEMORY_ATTRIBUTES": (
        _IOW(KVMIO, 0xD2, s.kvm_memory_attributes), KVM_CAP_MEMORY_ATTRIBUTES),
    # vCPU fd
    "KVM_RUN": (_IO(KVMIO, 0x80), None),
    "KVM_GET_REGS": (_IOR(KVMIO, 0x81, s.kvm_regs), None),
    "KVM_SET_REGS": (_IOW(KVMIO, 0x82, s.kvm_regs), None),
    "KVM_GET_SREGS": (_IOR(KVMIO, 0x83, s.kvm_sregs), None),
    "KVM_SET_SREGS": (_IOW(KVMIO, 0x84, s.kvm_sregs), None),
    "KVM_SET_CPUID2": (_IOW(KVMIO, 0x90, s.kvm_cpuid2), KVM_CAP_EXT_CPUID),
    "KVM_PRE_FAULT_MEMORY": (
        _IOWR(KVMIO, 0xD5, s.kvm_pre_fault_memory), KVM_CAP_PRE_FAULT_MEMORY),
    "KVM_GET_MP_STATE": (_IOR(KVMIO, 0x98, s.kvm_mp_state), KVM_CAP_MP_STATE),
    "KVM_SET_MP_STATE": (_IOW(KVMIO, 0x99, s.kvm_mp_state), KVM_CAP_MP_STATE),
    "KVM_GET_ONE_REG": (_IOW(KVMIO, 0xAB, s.kvm_one_reg), KVM_CAP_ONE_REG),
    "KVM_SET_ONE_REG": (_IOW(KVMIO, 0xAC, s.kvm_one_reg), KVM_CAP_ONE_REG),
    # arm64 (base API there: no capability)
    "KVM_ARM_VCPU_INIT": (_IOW(KVMIO, 0xAE, s.kvm_vcpu_init), None),
    "KVM_ARM_PREFERRED_TARGET": (_IOR(KVMIO, 0xAF, s.kvm_vcpu_init), None),
}
"""ioctl name -> (request number, capability it needs or ``None``)."""


def ioctl_number(name: str) -> int:
    """The request number of ioctl ``name``.  Raises ``KeyError`` for an unknown name."""
    return IOCTLS[name][0]


def ioctl_capability(name: str) -> int | None:
    """The ``KVM_CAP_*`` ioctl ``name`` needs (``None``: always there)."""
    return IOCTLS[name][1]


# Spot checks against the values kvm-on-this-host.md §2 read from the running kernel.
_KNOWN = {
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_SET_USER_MEMORY_REGION2": 0x40A0AE49,
    "KVM_PRE_FAULT_MEMORY": 0xC040AED5,
    "KVM_CREATE_GUEST_MEMFD": 0xC040AED4,
    "KVM_SET_MEMORY_ATTRIBUTES": 0x4020AED2,
    "KVM_GET_STATS_FD": 0xAECE,
    "KVM_RUN": 0xAE80,
    "KVM_GET_SREGS": 0x8138AE83,
    # arm64/riscv values as their kernels' headers expand them
    "KVM_SET_ONE_REG": 0x4010AEAC,
    "KVM_GET_ONE_REG": 0x4010AEAB,
    "KVM_ARM_VCPU_INIT": 0x4020AEAE,
    "KVM_ARM_PREFERRED_TARGET": 0x8020AEAF,
    "KVM_SET_MP_STATE": 0x4004AE99,
}
for _name, _number in _KNOWN.items():
    if ioctl_number(_name) != _number:
        raise ImportError(f"{_name}: computed {ioctl_number(_name):#x}, kernel {_number:#x}")
