"""The uapi structures of ``include/uapi/linux/kvm.h`` (x86) as ctypes structures.

Field names and order follow the kernel header; every structure's size is
checked against the kernel's when this module is imported
(:data:`KERNEL_SIZES`), and the offsets of the ``kvm_run`` union members
that kvmmem reads are checked too, so a layout mistake fails at import, not
as a corrupted guest.  Class names are the kernel's (``kvm_regs``, ...).
"""

from __future__ import annotations

import ctypes

u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
u64 = ctypes.c_uint64
s16 = ctypes.c_int16
s32 = ctypes.c_int32


class kvm_userspace_memory_region(ctypes.Structure):
    """``KVM_SET_USER_MEMORY_REGION``'s argument."""

    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class kvm_userspace_memory_region2(ctypes.Structure):
    """``KVM_SET_USER_MEMORY_REGION2``'s argument (adds guest_memfd)."""

    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
        ("guest_memfd_offset", u64),
        ("guest_memfd", u32),
        ("pad1", u32),
        ("pad2", u64 * 14),
    ]


KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2


class kvm_create_guest_memfd(ctypes.Structure):
    """``KVM_CREATE_GUEST_MEMFD``'s argument (v6.8): the file's ``size`` and ``flags``."""

    _fields_ = [("size", u64), ("flags", u64), ("reserved", u64 * 6)]


GUEST_MEMFD_FLAG_MMAP = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1
GUEST_MEMFD_FLAGS: dict[str, int] = {"mmap": GUEST_MEMFD_FLAG_MMAP,
                                     "init_shared": GUEST_MEMFD_FLAG_INIT_SHARED}
"""``KVM_CREATE_GUEST_MEMFD`` flags by their scenario names (uapi since v6.18; which
ones a VM accepts is ``KVM_CAP_GUEST_MEMFD_FLAGS``)."""


class kvm_memory_attributes(ctypes.Structure):
    """``KVM_SET_MEMORY_ATTRIBUTES``'s argument (v6.8): the gpa range ``[address, address
    + size)``, its new ``attributes`` (``KVM_MEMORY_ATTRIBUTE_*``) and ``flags`` (none
    defined: the kernel refuses any with EINVAL)."""

    _fields_ = [("address", u64), ("size", u64), ("attributes", u64), ("flags", u64)]


KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3


def guest_memfd_flag_names(bits: int) -> list[str]:
    """The scenario names of the ``GUEST_MEMFD_FLAG_*`` bits in ``bits`` (an unknown bit
    as its hex value)."""
    names = [name for name, bit in GUEST_MEMFD_FLAGS.items() if bits & bit]
    rest = bits & ~sum(GUEST_MEMFD_FLAGS.values())
    return names + ([f"{rest:#x}"] if rest else [])


# --- kvm_run -----------------------------------------------------------------------


class kvm_run_io(ctypes.Structure):
    """``kvm_run.io`` (KVM_EXIT_IO); the data is at ``run + data_offset``."""

    _fields_ = [
        ("direction", u8),
        ("size", u8),
        ("port", u16),
        ("count", u32),
        ("data_offset", u64),
    ]


class kvm_run_mmio(ctypes.Structure):
    """``kvm_run.mmio`` (KVM_EXIT_MMIO); fill ``data[0:len]`` before re-entering on a read."""

    _fields_ = [
        ("phys_addr", u64),
        ("data", u8 * 8),
        ("len", u32),
        ("is_write", u8),
    ]


class kvm_run_internal(ctypes.Structure):
    """``kvm_run.internal`` (KVM_EXIT_INTERNAL_ERROR)."""

    _fields_ = [
        ("suberror", u32),
        ("ndata", u32),
        ("data", u64 * 16),
    ]


class kvm_run_fail_entry(ctypes.Structure):
    """``kvm_run.fail_entry`` (KVM_EXIT_FAIL_ENTRY)."""

    _fields_ = [
        ("hardware_entry_failure_reason", u64),
        ("cpu", u32),
    ]


class kvm_run_ex(ctypes.Structure):
    """``kvm_run.ex`` (KVM_EXIT_EXCEPTION)."""

    _fields_ = [("exception", u32), ("error_code", u32)]


class kvm_run_memory_fault(ctypes.Structure):
    """``kvm_run.memory_fault`` (KVM_EXIT_MEMORY_FAULT, with KVM_RUN failing EFAULT)."""

    _fields_ = [("flags", u64), ("gpa", u64), ("size", u64)]


class kvm_run_exit(ctypes.Union):
    """The 256-byte exit union of ``kvm_run``."""

    _fields_ = [
        ("hw_exit_reason", u64),
        ("fail_entry", kvm_run_fail_entry),
        ("ex", kvm_run_ex),
        ("io", kvm_run_io),
        ("mmio", kvm_run_mmio),
        ("internal", kvm_run_internal),
        ("memory_fault", kvm_run_memory_fault),
        ("padding", u8 * 256),
    ]


class kvm_run(ctypes.Structure):
    """``struct kvm_run``: the page shared with KVM (``mmap(vcpu_fd)`` at offset 0)."""

    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("exit", kvm_run_exit),
        ("kvm_valid_regs", u64),
        ("kvm_dirty_regs", u64),
        ("s", u8 * 2048),
    ]


KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_DIRTY_RING_FULL = 31
KVM_EXIT_MEMORY_FAULT = 39

EXIT_REASONS: dict[int, str] = {
    value: name for name, value in globals().items() if name.startswith("KVM_EXIT_")
}
"""Exit reason number -> kernel name."""


# --- registers ---------------------------------------------------------------------


GPR_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
"""The general registers in ``kvm_regs`` order."""


class kvm_regs(ctypes.Structure):
    """``KVM_GET_REGS``/``KVM_SET_REGS``: the general registers, rip and rflags."""

    _fields_ = [(name, u64) for name in (*GPR_NAMES, "rip", "rflags")]


class kvm_segment(ctypes.Structure):
    """A segment register as KVM describes it (hidden part included)."""

    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class kvm_dtable(ctypes.Structure):
    """GDTR/IDTR."""

    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(ctypes.Structure):
    """``KVM_GET_SREGS``/``KVM_SET_SREGS``: segments, control registers, EFER."""

    _fields_ = [
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", u64),
        ("cr2", u64),
        ("cr3", u64),
        ("cr4", u64),
        ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


# --- CPUID -------------------------------------------------------------------------


class kvm_cpuid_entry2(ctypes.Structure):
    """One CPUID leaf/subleaf."""

    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


class kvm_cpuid2(ctypes.Structure):
    """The header of ``KVM_GET_SUPPORTED_CPUID``/``KVM_SET_CPUID2``; entries follow it."""

    _fields_ = [("nent", u32), ("padding", u32)]


def cpuid2_buffer(nent: int) -> ctypes.Array[ctypes.c_char]:
    """A zeroed buffer holding a ``kvm_cpuid2`` header with room for ``nent`` entries
    (``nent`` already set in the header)."""
    buf = ctypes.create_string_buffer(
        ctypes.sizeof(kvm_cpuid2) + nent * ctypes.sizeof(kvm_cpuid_entry2))
    kvm_cpuid2.from_buffer(buf).nent = nent
    return buf


# --- dirty log, prefault, capabilities ----------------------------------------------


class kvm_dirty_log(ctypes.Structure):
    """``KVM_GET_DIRTY_LOG``: the slot and a pointer to one bit per page."""

    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class kvm_clear_dirty_log(ctypes.Structure):
    """``KVM_CLEAR_DIRTY_LOG``: clear ``num_pages`` bits from ``first_page``."""

    _fields_ = [
        ("slot", u32),
        ("num_pages", u32),
        ("first_page", u64),
        ("dirty_bitmap", u64),
    ]


class kvm_pre_fault_memory(ctypes.Structure):
    """``KVM_PRE_FAULT_MEMORY``: the kernel advances ``gpa`` and shrinks ``size``."""

    _fields_ = [("gpa", u64), ("size", u64), ("flags", u64), ("padding", u64 * 5)]


class kvm_enable_cap(ctypes.Structure):
    """``KVM_ENABLE_CAP``."""

    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class kvm_dirty_gfn(ctypes.Structure):
    """One entry of a vCPU's dirty ring (mmapped at ``KVM_DIRTY_LOG_PAGE_OFFSET``)."""

    _fields_ = [("flags", u32), ("slot", u32), ("offset", u64)]


KVM_DIRTY_GFN_F_DIRTY = 1 << 0
KVM_DIRTY_GFN_F_RESET = 1 << 1
KVM_DIRTY_LOG_PAGE_OFFSET = 64
"""Pages into the vCPU fd where the ring is mapped (x86 and arm64 uapi; riscv has none)."""


# --- arm64 and riscv: vCPU init, ONE_REG, MP state -----------------------------------


class kvm_vcpu_init(ctypes.Structure):
    """arm64 ``KVM_ARM_VCPU_INIT`` / ``KVM_ARM_PREFERRED_TARGET``: target and feature bits."""

    _fields_ = [("target", u32), ("features", u32 * 7)]


class kvm_one_reg(ctypes.Structure):
    """``KVM_GET_ONE_REG`` / ``KVM_SET_ONE_REG``: register ``id`` and the userspace address
    of a buffer of the size the id encodes (``KVM_REG_SIZE``)."""

    _fields_ = [("id", u64), ("addr", u64)]


class kvm_mp_state(ctypes.Structure):
    """``KVM_GET_MP_STATE`` / ``KVM_SET_MP_STATE``."""

    _fields_ = [("mp_state", u32)]


KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_STOPPED = 5
"""``mp_state`` values arm64 and riscv use (a powered-off vCPU is STOPPED)."""

# Register ids (include/uapi/linux/kvm.h): arch | size | arch-specific coprocessor bits.
KVM_REG_ARCH_MASK = 0xFF00_0000_0000_0000
KVM_REG_ARM64 = 0x6000_0000_0000_0000
KVM_REG_RISCV = 0x8000_0000_0000_0000
KVM_REG_SIZE_SHIFT = 52
KVM_REG_SIZE_MASK = 0x00F0_0000_0000_0000
KVM_REG_SIZE_U32 = 0x0020_0000_0000_0000
KVM_REG_SIZE_U64 = 0x0030_0000_0000_0000


def kvm_reg_size(reg_id: int) -> int:
    """Bytes of the register ``reg_id`` names (``KVM_REG_SIZE``)."""
    return 1 << ((reg_id & KVM_REG_SIZE_MASK) >> KVM_REG_SIZE_SHIFT)


# --- binary stats (Documentation/virt/kvm/api.rst, KVM_GET_STATS_FD) ----------------


class kvm_stats_header(ctypes.Structure):
    """The header at offset 0 of a stats fd."""

    _fields_ = [
        ("flags", u32),
        ("name_size", u32),
        ("num_desc", u32),
        ("id_offset", u32),
        ("desc_offset", u32),
        ("data_offset", u32),
    ]


class kvm_stats_desc(ctypes.Structure):
    """A stats descriptor; ``name_size`` bytes of name follow it."""

    _fields_ = [
        ("flags", u32),
        ("exponent", s16),
        ("size", u16),
        ("offset", u32),
        ("bucket_size", u32),
    ]


KVM_STATS_TYPE_SHIFT = 0
KVM_STATS_TYPE_MASK = 0xF << KVM_STATS_TYPE_SHIFT
KVM_STATS_UNIT_SHIFT = 4
KVM_STATS_UNIT_MASK = 0xF << KVM_STATS_UNIT_SHIFT
KVM_STATS_BASE_SHIFT = 8
KVM_STATS_BASE_MASK = 0xF << KVM_STATS_BASE_SHIFT
STATS_TYPES = ("cumulative", "instant", "peak", "linear_hist", "log_hist")
STATS_UNITS = ("none", "bytes", "seconds", "cycles", "boolean")


# --- size checks -------------------------------------------------------------------

KERNEL_SIZES: dict[type[ctypes.Structure], int] = {
    kvm_userspace_memory_region: 32,
    kvm_userspace_memory_region2: 160,
    kvm_run: 2352,
    kvm_run_mmio: 24,
    kvm_run_internal: 136,
    kvm_regs: 144,
    kvm_segment: 24,
    kvm_dtable: 16,
    kvm_sregs: 312,
    kvm_cpuid_entry2: 40,
    kvm_cpuid2: 8,
    kvm_dirty_log: 16,
    kvm_clear_dirty_log: 24,
    kvm_pre_fault_memory: 64,
    kvm_create_guest_memfd: 64,
    kvm_memory_attributes: 32,
    kvm_enable_cap: 104,
    kvm_dirty_gfn: 16,
    kvm_vcpu_init: 32,
    kvm_one_reg: 16,
    kvm_mp_state: 4,
    kvm_stats_header: 24,
    kvm_stats_desc: 16,
}
"""``sizeof()`` of each structure in the kernel (x86-64), as the ioctl numbers encode them."""

KVM_RUN_OFFSETS: dict[str, int] = {
    "immediate_exit": 1,
    "exit_reason": 8,
    "cr8": 16,
    "exit": 32,
    "kvm_valid_regs": 288,
    "kvm_dirty_regs": 296,
    "s": 304,
}
"""Offsets of ``struct kvm_run`` fields (the exit union at 32, sync regs at 304)."""


def check_layouts() -> None:
    """Compare every structure's size and the ``kvm_run`` offsets with the kernel's.

    Raises ``ImportError`` (this module is unusable) on the first mismatch."""
    for struct, size in KERNEL_SIZES.items():
        if ctypes.sizeof(struct) != size:
            raise ImportError(
                f"{struct.__name__}: ctypes size {ctypes.sizeof(struct)}, kernel size {size}")
    for name, offset in KVM_RUN_OFFSETS.items():
        got = getattr(kvm_run, name).offset
        if got != offset:
            raise ImportError(f"kvm_run.{name} at offset {got}, kernel offset {offset}")
    for name, offset in (("phys_addr", 0), ("data", 8), ("len", 16), ("is_write", 20)):
        got = getattr(kvm_run_mmio, name).offset
        if got != offset:
            raise ImportError(f"kvm_run.mmio.{name} at offset {got}, kernel offset {offset}")
    if ctypes.sizeof(kvm_run_exit) != 256:
        raise ImportError(f"kvm_run exit union is {ctypes.sizeof(kvm_run_exit)} bytes, not 256")


check_layouts()
