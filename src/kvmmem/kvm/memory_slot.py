"""``struct kvm_memory_slot`` and what describes one (part of
:mod:`kvmmem.kvm.memslot`, which re-exports every name here).

The ``KVM_MEM_*`` flags and limits of include/uapi/linux/kvm.h and
include/linux/kvm_host.h, :class:`KvmMrChange` (``enum kvm_mr_change``), the
per-architecture limits (``KVM_USER_MEM_SLOTS``, ``TASK_SIZE_MAX``,
``untagged_addr``, ``access_ok``), :class:`KvmUserspaceMemoryRegion`
(``struct kvm_userspace_memory_region2``), :class:`MemorySlot` and the slot's
dirty bitmap (``kvm_dirty_bitmap_bytes``, ``mark_page_dirty_in_slot``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from kvmmem.errors import InputError
from kvmmem.types import PAGE_SIZE, Gfn, Hva


class DirtyRingPush(Protocol):
    """A vCPU's dirty ring as ``mark_page_dirty_in_slot`` sees it
    (:class:`kvmmem.kvm.dirty_ring.DirtyRing`)."""

    def push(self, slot: int, offset: int) -> None:
        """``kvm_dirty_ring_push``."""
        ...


class _RingVm(Protocol):
    @property
    def dirty_ring_size(self) -> int: ...


class RunningVcpu(Protocol):
    """What ``mark_page_dirty_in_slot`` needs of the running vCPU."""

    @property
    def vm(self) -> _RingVm: ...

    @property
    def dirty_ring(self) -> DirtyRingPush | None: ...

CALL = "KVM_SET_USER_MEMORY_REGION"

# --- include/uapi/linux/kvm.h ---------------------------------------------------------
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2
# include/linux/kvm_host.h: kernel-internal flag of the transient copy of a slot
# being deleted or moved.
KVM_MEMSLOT_INVALID = 1 << 16
# virt/kvm/kvm_main.c: the only flags the v1 ioctl accepts.
KVM_SET_USER_MEMORY_REGION_V1_FLAGS = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY

# --- include/linux/kvm_host.h ---------------------------------------------------------
KVM_MEM_SLOTS_NUM = 32767  # SHRT_MAX
KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS = 1 << 63
# virt/kvm/kvm_main.c: dirty-bitmap indices are unsigned int.
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
ULONG_MAX = U64_MAX  # 64-bit hosts only
BITS_PER_LONG = 64

LOCK_SLOTS = "slots_lock"
LOCK_SLOTS_ARCH = "slots_arch_lock"
LOCK_SRCU = "srcu"
LOCK_MEMSLOTS_FROZEN = "memslots_frozen"
POINT_INVALID_PUBLISHED = "memslot_invalid_published"


class KvmMrChange(IntEnum):
    """``enum kvm_mr_change`` (include/linux/kvm_host.h), same order."""

    CREATE = 0
    DELETE = 1
    MOVE = 2
    FLAGS_ONLY = 3


# --- per-architecture limits -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemslotLimits:
    """The per-architecture constants ``kvm_set_memory_region`` consults.

    ``user_mem_slots`` is ``KVM_USER_MEM_SLOTS`` (= ``KVM_CAP_NR_MEMSLOTS``):
    ``KVM_MEM_SLOTS_NUM`` minus the arch's internal slots (x86: 3 -> 32764;
    arm64/riscv: 0 -> 32767).  ``nr_as_ids`` is ``kvm_arch_nr_memslot_as_ids``
    (x86 2 with SMM, else 1).  ``task_size_max`` is the bound ``access_ok``
    checks ``userspace_addr + memory_size`` against; ``tbi`` selects arm64's
    ``untagged_addr`` (top byte ignored).  ``readonly_mem`` is
    ``kvm_arch_has_readonly_mem``; ``guest_memfd`` is ``CONFIG_KVM_GUEST_MEMFD``.
    ``page_shift`` is the host's ``PAGE_SHIFT`` (12; 14 or 16 on an arm64 host built
    with 16 KiB or 64 KiB pages): the unit of gfns and the alignment every address and
    size of a request must have.
    """

    arch: str
    user_mem_slots: int
    nr_as_ids: int
    task_size_max: int
    tbi: bool = False
    readonly_mem: bool = True
    guest_memfd: bool = False
    page_shift: int = 12

    @property
    def nr_memslots(self) -> int:
        """``KVM_CAP_NR_MEMSLOTS``."""
        return self.user_mem_slots


# x86: TASK_SIZE_MAX with 4-level paging is (1 << 47) - PAGE_SIZE, and
# USER_PTR_MAX == TASK_SIZE_MAX, so a slot may end exactly there (this host:
# "a last page ending above TASK_SIZE_MAX (0x7ffffffff000) gives EINVAL").
X86_TASK_SIZE_MAX = (1 << 47) - PAGE_SIZE
# arm64: TASK_SIZE_64 = 1 << VA_BITS (48 with 4K pages).
ARM64_TASK_SIZE_MAX = 1 << 48
# riscv: TASK_SIZE_64 = PGDIR_SIZE * PTRS_PER_PGD / 2; 1 << 47 for Sv48.
RISCV_TASK_SIZE_MAX = 1 << 47

_ARCH_DEFAULTS: dict[str, tuple[int, int, int, bool]] = {
    # arch: (KVM_USER_MEM_SLOTS, nr_as_ids, TASK_SIZE_MAX, TBI)
    "x86": (KVM_MEM_SLOTS_NUM - 3, 2, X86_TASK_SIZE_MAX, False),
    "arm64": (KVM_MEM_SLOTS_NUM, 1, ARM64_TASK_SIZE_MAX, True),
    "riscv": (KVM_MEM_SLOTS_NUM, 1, RISCV_TASK_SIZE_MAX, False),
}


def memslot_limits(
    arch: str,
    *,
    nr_as_ids: int | None = None,
    task_size_max: int | None = None,
    readonly_mem: bool = True,
    guest_memfd: bool = False,
    user_mem_slots: int | None = None,
    page_shift: int = 12,
) -> MemslotLimits:
    """The limits of ``arch`` ("x86", "arm64", "riscv"), with optional overrides
    (``user_mem_slots``: a release's ``KVM_USER_MEM_SLOTS``, Variant.user_mem_slots;
    ``page_shift``: the host's ``PAGE_SHIFT``).

    ``nr_as_ids=1`` on x86 is a VM without SMM (or this host: MULTI_ADDRESS_SPACE
    is 0).  Raises :class:`InputError` for an unknown arch."""
    try:
        slots, as_ids, task_size, tbi = _ARCH_DEFAULTS[arch]
    except KeyError:
        raise InputError(f"unknown architecture {arch!r} (known: x86, arm64, riscv)") from None
    return MemslotLimits(
        arch=arch,
        user_mem_slots=slots if user_mem_slots is None else user_mem_slots,
        nr_as_ids=as_ids if nr_as_ids is None else nr_as_ids,
        task_size_max=task_size if task_size_max is None else task_size_max,
        tbi=tbi,
        readonly_mem=readonly_mem,
        guest_memfd=guest_memfd,
        page_shift=page_shift,
    )


def untagged_addr(limits: MemslotLimits, addr: int) -> int:
    """``untagged_addr()``: arm64 sign-extends bit 55 over the top byte (TBI);
    x86 without LAM and riscv without pointer masking return ``addr``."""
    if not limits.tbi:
        return addr
    if addr & (1 << 55):
        return addr | (0xFF << 56)
    return addr & ((1 << 56) - 1)


def access_ok(limits: MemslotLimits, addr: int, size: int) -> bool:
    """``access_ok(addr, size)``: the range lies below the user address limit
    (x86 ``valid_user_address(addr + size)`` without wrap; the generic
    ``size <= TASK_SIZE_MAX && addr <= TASK_SIZE_MAX - size``)."""
    return addr + size <= limits.task_size_max


# --- the request -------------------------------------------------------------------------


@dataclass(slots=True)
class KvmUserspaceMemoryRegion:
    """``struct kvm_userspace_memory_region2`` (v1 = the first five fields).

    ``slot`` carries the address space in bits 16-31 and the slot id in bits
    0-15.  ``pad1``/``pad2`` are not checked by the kernel (this host accepts
    non-zero padding) and are not modelled.  Field widths are those of the
    UAPI (u32 slot/flags/guest_memfd, u64 otherwise); a value that does not fit
    raises :class:`InputError`.  Treat it as immutable."""

    slot: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    guest_memfd_offset: int = 0
    guest_memfd: int = 0

    def __post_init__(self) -> None:
        slot, flags, gpa = self.slot, self.flags, self.guest_phys_addr
        size, uaddr = self.memory_size, self.userspace_addr
        off, fd = self.guest_memfd_offset, self.guest_memfd
        if (type(slot) is int and type(flags) is int and type(gpa) is int
                and type(size) is int and type(uaddr) is int and type(off) is int
                and type(fd) is int and 0 <= slot <= U32_MAX and 0 <= flags <= U32_MAX
                and 0 <= gpa <= U64_MAX and 0 <= size <= U64_MAX and 0 <= uaddr <= U64_MAX
                and 0 <= off <= U64_MAX and 0 <= fd <= U32_MAX):
            return
        for name, limit in (
            ("slot", U32_MAX),
            ("flags", U32_MAX),
            ("guest_phys_addr", U64_MAX),
            ("memory_size", U64_MAX),
            ("userspace_addr", U64_MAX),
            ("guest_memfd_offset", U64_MAX),
            ("guest_memfd", U32_MAX),
        ):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= limit:
                raise InputError(
                    f"kvm_userspace_memory_region2.{name}: {value!r} is not a "
                    f"u{limit.bit_length()}"
                )

    @property
    def as_id(self) -> int:
        """``slot >> 16``."""
        return self.slot >> 16

    @property
    def id(self) -> int:
        """``(u16)slot``."""
        return self.slot & 0xFFFF


def region(
    slot: int,
    guest_phys_addr: int,
    memory_size: int,
    userspace_addr: int,
    flags: int = 0,
    *,
    as_id: int = 0,
    guest_memfd: int = 0,
    guest_memfd_offset: int = 0,
) -> KvmUserspaceMemoryRegion:
    """Shorthand for a request: ``region(1, gpa, size, hva, flags, as_id=1)``."""
    return KvmUserspaceMemoryRegion(
        (as_id << 16) | slot, flags, guest_phys_addr, memory_size, userspace_addr,
        guest_memfd_offset, guest_memfd,
    )


# --- the slot ----------------------------------------------------------------------------

DirtyBitmap = npt.NDArray[np.bool_]


@dataclass(slots=True, eq=False)
class GmemBinding:
    """``slot->gmem``: the guest_memfd file a slot binds (a
    :class:`kvmmem.kvm.guest_memfd.GmemFile`; None once unbound; the bare fd under
    :class:`~kvmmem.kvm.memslot.NoopMemslotHooks`), the file page the slot starts at
    (``pgoff``), and whether the slot is gmem-only (``KVM_MEMSLOT_GMEM_ONLY``, v6.18:
    every fault served from the file)."""

    file: Any
    pgoff: int
    gmem_only: bool = False


@dataclass(slots=True, eq=False)
class MemorySlot:
    """``struct kvm_memory_slot``.

    Identity matters (``eq=False``): the kernel swaps whole slot objects, and
    the INVALID copy of a slot is a different object with the same geometry.
    A published slot's geometry and flags never change.  ``dirty_bitmap`` is
    one bool per page (``None`` unless LOG_DIRTY_PAGES and a bitmap is in
    use); ``arch`` is the arch-private ``struct kvm_arch_memory_slot``;
    ``gmem`` is the guest_memfd binding (:class:`GmemBinding`), if any;
    ``page_shift`` the host's ``PAGE_SHIFT`` (gfns and ``npages`` count host pages)."""

    id: int
    as_id: int
    base_gfn: Gfn
    npages: int
    userspace_addr: Hva
    flags: int
    dirty_bitmap: DirtyBitmap | None = None
    arch: dict[str, Any] = field(default_factory=dict)
    gmem: GmemBinding | None = None
    page_shift: int = 12

    @property
    def end_gfn(self) -> Gfn:
        """First gfn after the slot."""
        return Gfn(self.base_gfn + self.npages)

    @property
    def size(self) -> int:
        """Size in bytes."""
        return self.npages << self.page_shift

    @property
    def hva_end(self) -> Hva:
        """First hva after the slot."""
        return Hva(self.userspace_addr + (self.npages << self.page_shift))

    @property
    def invalid(self) -> bool:
        """``KVM_MEMSLOT_INVALID`` set (slot being deleted or moved)."""
        return bool(self.flags & KVM_MEMSLOT_INVALID)

    @property
    def readonly(self) -> bool:
        """``memslot_is_readonly()``."""
        return bool(self.flags & KVM_MEM_READONLY)

    @property
    def logging(self) -> bool:
        """``kvm_slot_dirty_track_enabled()``: LOG_DIRTY_PAGES set."""
        return bool(self.flags & KVM_MEM_LOG_DIRTY_PAGES)

    def contains_gfn(self, gfn: int) -> bool:
        """``base_gfn <= gfn < base_gfn + npages``."""
        return self.base_gfn <= gfn < self.base_gfn + self.npages

    def gfn_to_hva(self, gfn: int) -> Hva:
        """``__gfn_to_hva_memslot()``: linear translation, no checks."""
        return Hva(self.userspace_addr + ((gfn - self.base_gfn) << self.page_shift))

    def hva_to_gfn(self, hva: int) -> Gfn:
        """``hva_to_gfn_memslot()``: the gfn ``hva`` backs (hva in the slot)."""
        return Gfn(self.base_gfn + ((hva - self.userspace_addr) >> self.page_shift))

    def __repr__(self) -> str:
        names = [n for bit, n in ((KVM_MEM_LOG_DIRTY_PAGES, "LOG_DIRTY"),
                                   (KVM_MEM_READONLY, "READONLY"),
                                   (KVM_MEM_GUEST_MEMFD, "GUEST_MEMFD"),
                                   (KVM_MEMSLOT_INVALID, "INVALID")) if self.flags & bit]
        return (f"MemorySlot(as={self.as_id} id={self.id} "
                f"gpa={self.base_gfn << self.page_shift:#x}-"
                f"{self.end_gfn << self.page_shift:#x} "
                f"hva={self.userspace_addr:#x} {'|'.join(names) or '-'})")


def kvm_dirty_bitmap_bytes(slot: MemorySlot) -> int:
    """``kvm_dirty_bitmap_bytes()``: bytes of one bitmap half (whole longs)."""
    return ((slot.npages + BITS_PER_LONG - 1) // BITS_PER_LONG) * (BITS_PER_LONG // 8)


def mark_page_dirty_in_slot(slot: MemorySlot | None, gfn: int,
                            vcpu: RunningVcpu | None = None) -> None:
    """``mark_page_dirty_in_slot()``: when the slot logs dirty pages, push ``gfn`` into
    the running vCPU's dirty ring (``vcpu``, ``kvm_get_running_vcpu()``; a VM with a
    ring, kvm/dirty_ring.py), else set its bit when the slot has a bitmap."""
    if slot is None or not slot.flags & KVM_MEM_LOG_DIRTY_PAGES:
        return
    if vcpu is not None and vcpu.vm.dirty_ring_size and vcpu.dirty_ring is not None:
        vcpu.dirty_ring.push(slot.as_id << 16 | slot.id, gfn - slot.base_gfn)
        return
    if slot.dirty_bitmap is not None:
        slot.dirty_bitmap[gfn - slot.base_gfn] = True


def kvm_copy_memslot(src: MemorySlot) -> MemorySlot:
    """``kvm_copy_memslot()``: a new slot object with ``src``'s fields; the
    dirty bitmap is shared, ``arch`` copied by value (a struct copy)."""
    return MemorySlot(src.id, src.as_id, src.base_gfn, src.npages, src.userspace_addr,
                      src.flags, src.dirty_bitmap, dict(src.arch), src.gmem, src.page_shift)
