"""Memslots: ``KVM_SET_USER_MEMORY_REGION(2)`` and the memslot sets.

Mirrors the memslot half of ``virt/kvm/kvm_main.c`` (kernel-semantics.md §1):

* :class:`KvmUserspaceMemoryRegion` is ``struct kvm_userspace_memory_region2``
  (the v1 ioctl is the same struct with the v2-only fields zero).
* :class:`MemorySlot` is ``struct kvm_memory_slot``; :class:`MemslotSet` is
  ``struct kvm_memslots`` (one address space: id hash, gfn tree, hva interval
  tree, generation).
* :class:`VmMemslots` is the memslot state of ``struct kvm``: for every address
  space an *active* and an *inactive* set, ``nr_memslot_pages``,
  ``nr_memslots_dirty_logging``.  As in the kernel (since the scalable memslot
  rework, v5.17) an update edits the inactive set, swaps it active
  (:func:`kvm_swap_active_memslots`) and then repeats the edit on the other
  set, so one update costs O(log n) whatever the number of slots; nothing is
  ever copied wholesale.  Slot objects are shared by both sets and never
  changed once published (a change installs a new object), so a reader that
  holds a slot keeps a consistent view.
* :func:`kvm_set_memory_region` is written once, as an :data:`~kvmmem.sync.Op`
  that yields at ``slots_lock``, ``slots_arch_lock``, the publication of a new
  set (``memslots_frozen``: waits for MMU-notifier invalidations, the
  ``mn_active_invalidate_count`` wait), ``synchronize_srcu`` (an exclusive
  ``srcu`` acquire/release: vCPUs hold ``srcu`` shared while they read the
  memslots) and the point ``memslot_invalid_published`` (the INVALID copy of a
  slot being deleted or moved is active, its stage-2 mappings not yet zapped).
  :meth:`VmMemslots.set_user_memory_region` drives it sequentially.

Validation follows ``kvm_set_memory_region`` rule by rule (kernel-semantics.md
§1.5); the first failing rule wins and raises
``KernelError(errno, "KVM_SET_USER_MEMORY_REGION", reason)``.  A failing call
changes nothing, with the one exception the kernel has too (§10.3 I5): when the
arch prepare hook fails a DELETE or MOVE, the INVALID slot has already been
published and the old range zapped (``flush_shadow_memslot`` ran), and the
restore is one more swap, so the address space's generation has moved by
``2 * nr_as_ids`` and the stage-2 mappings are gone (they are re-faulted).

What the VM layer supplies (:class:`MemslotHooks`): the arch prepare/commit
hooks, the stage-2 flush on DELETE/MOVE and ``kvm_arch_memslots_updated``.
:class:`kvmmem.kvm.arches.ArchMemslotHooks` delegates each hook to the
architecture's class (``kvm/x86.py``, ``kvm/arm64.py``, ``kvm/riscv.py``), where
the per-architecture decisions live; :class:`NoopMemslotHooks` does nothing at all.
This module tests no architecture by name.

Not modelled: memory allocation failure (``ENOMEM``), ``-EIO`` for a dead VM
or a caller from another mm (the VM layer's ioctl entry), 32-bit hosts
(``memory_size`` always fits an ``unsigned long``), the dirty ring, guest_memfd
files (``KVM_MEM_GUEST_MEMFD`` is rejected unless
``MemslotLimits.guest_memfd``; then binding is delegated to
:meth:`MemslotHooks.gmem_bind`), the v5.4 memslot rules (509/512 slots, array
copy per update).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from kvmmem.errors import InputError, KernelError, ValidationError
from kvmmem.sync import Op, acquire, point, release
from kvmmem.types import PAGE_SHIFT, PAGE_SIZE, Gfn, Hva

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
    """

    arch: str
    user_mem_slots: int
    nr_as_ids: int
    task_size_max: int
    tbi: bool = False
    readonly_mem: bool = True
    guest_memfd: bool = False

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
) -> MemslotLimits:
    """The limits of ``arch`` ("x86", "arm64", "riscv"), with optional overrides
    (``user_mem_slots``: a release's ``KVM_USER_MEM_SLOTS``, Variant.user_mem_slots).

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
class MemorySlot:
    """``struct kvm_memory_slot``.

    Identity matters (``eq=False``): the kernel swaps whole slot objects, and
    the INVALID copy of a slot is a different object with the same geometry.
    A published slot's geometry and flags never change.  ``dirty_bitmap`` is
    one bool per page (``None`` unless LOG_DIRTY_PAGES and a bitmap is in
    use); ``arch`` is the arch-private ``struct kvm_arch_memory_slot``;
    ``gmem`` is the (fd, offset) guest_memfd binding, if any."""

    id: int
    as_id: int
    base_gfn: Gfn
    npages: int
    userspace_addr: Hva
    flags: int
    dirty_bitmap: DirtyBitmap | None = None
    arch: dict[str, Any] = field(default_factory=dict)
    gmem: tuple[int, int] | None = None

    @property
    def end_gfn(self) -> Gfn:
        """First gfn after the slot."""
        return Gfn(self.base_gfn + self.npages)

    @property
    def size(self) -> int:
        """Size in bytes."""
        return self.npages << PAGE_SHIFT

    @property
    def hva_end(self) -> Hva:
        """First hva after the slot."""
        return Hva(self.userspace_addr + (self.npages << PAGE_SHIFT))

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
        return Hva(self.userspace_addr + ((gfn - self.base_gfn) << PAGE_SHIFT))

    def hva_to_gfn(self, hva: int) -> Gfn:
        """``hva_to_gfn_memslot()``: the gfn ``hva`` backs (hva in the slot)."""
        return Gfn(self.base_gfn + ((hva - self.userspace_addr) >> PAGE_SHIFT))

    def __repr__(self) -> str:
        names = [n for bit, n in ((KVM_MEM_LOG_DIRTY_PAGES, "LOG_DIRTY"),
                                   (KVM_MEM_READONLY, "READONLY"),
                                   (KVM_MEM_GUEST_MEMFD, "GUEST_MEMFD"),
                                   (KVM_MEMSLOT_INVALID, "INVALID")) if self.flags & bit]
        return (f"MemorySlot(as={self.as_id} id={self.id} "
                f"gpa={self.base_gfn << PAGE_SHIFT:#x}-{self.end_gfn << PAGE_SHIFT:#x} "
                f"hva={self.userspace_addr:#x} {'|'.join(names) or '-'})")


def kvm_dirty_bitmap_bytes(slot: MemorySlot) -> int:
    """``kvm_dirty_bitmap_bytes()``: bytes of one bitmap half (whole longs)."""
    return ((slot.npages + BITS_PER_LONG - 1) // BITS_PER_LONG) * (BITS_PER_LONG // 8)


def mark_page_dirty_in_slot(slot: MemorySlot | None, gfn: int) -> None:
    """``mark_page_dirty_in_slot()`` (bitmap mode): set ``gfn``'s bit when the
    slot logs dirty pages and has a bitmap."""
    if slot is not None and slot.flags & KVM_MEM_LOG_DIRTY_PAGES and slot.dirty_bitmap is not None:
        slot.dirty_bitmap[gfn - slot.base_gfn] = True


def kvm_copy_memslot(src: MemorySlot) -> MemorySlot:
    """``kvm_copy_memslot()``: a new slot object with ``src``'s fields; the
    dirty bitmap is shared, ``arch`` copied by value (a struct copy)."""
    return MemorySlot(src.id, src.as_id, src.base_gfn, src.npages, src.userspace_addr,
                      src.flags, src.dirty_bitmap, dict(src.arch), src.gmem)


# --- sorted integer keys ------------------------------------------------------------------


class SortedInts:
    """A sorted set of ints in chunks of at most ``2 * load`` (the layout of
    ``sortedcontainers.SortedList``, reduced to what the memslot indexes need:
    add, remove, predecessor, ordered iteration).  Every operation is a couple
    of C-level bisects on lists no longer than ``2 * load``: O(log n) plus a
    bounded memmove, whatever the number of keys."""

    __slots__ = ("_len", "_lists", "_load", "_maxes")

    def __init__(self, load: int = 256) -> None:
        self._lists: list[list[int]] = []
        self._maxes: list[int] = []
        self._load = load
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[int]:
        for lst in self._lists:
            yield from lst

    def add(self, x: int) -> None:
        """Insert ``x`` (not already present)."""
        maxes = self._maxes
        self._len += 1
        if not maxes:
            self._lists.append([x])
            maxes.append(x)
            return
        pos = bisect_left(maxes, x)
        if pos == len(maxes):
            pos -= 1
            lst = self._lists[pos]
            lst.append(x)
            maxes[pos] = x
        else:
            lst = self._lists[pos]
            insort(lst, x)
        if len(lst) > self._load << 1:
            half = lst[self._load:]
            del lst[self._load:]
            maxes[pos] = lst[-1]
            self._lists.insert(pos + 1, half)
            maxes.insert(pos + 1, half[-1])

    def remove(self, x: int) -> None:
        """Remove ``x``; raises ``KeyError`` if absent."""
        maxes = self._maxes
        pos = bisect_left(maxes, x)
        if pos == len(maxes):
            raise KeyError(x)
        lst = self._lists[pos]
        i = bisect_left(lst, x)
        if lst[i] != x:
            raise KeyError(x)
        del lst[i]
        self._len -= 1
        if lst:
            maxes[pos] = lst[-1]
        else:
            del self._lists[pos]
            del maxes[pos]

    def floor(self, x: int) -> int | None:
        """The largest key ``<= x``, or ``None``."""
        maxes = self._maxes
        pos = bisect_right(maxes, x)
        if pos < len(maxes):
            lst = self._lists[pos]
            i = bisect_right(lst, x)
            if i:
                return lst[i - 1]
        if pos:
            return maxes[pos - 1]
        return None

    def irange(self, lo: int, hi: int) -> Iterator[int]:
        """Keys ``k`` with ``lo <= k <= hi``, ascending."""
        lists = self._lists
        pos = bisect_left(self._maxes, lo)
        if pos == len(lists):
            return
        lst = lists[pos]
        for j in range(bisect_left(lst, lo), len(lst)):
            k = lst[j]
            if k > hi:
                return
            yield k
        for lst in lists[pos + 1:]:
            for k in lst:
                if k > hi:
                    return
                yield k


# --- one memslot set ---------------------------------------------------------------------


class MemslotKeys:
    """The sorted keys of the two sets of one address space.

    The kernel threads every slot into one rb-tree node per set
    (``gfn_node[node_idx]``, ``hva_node[node_idx]``).  Here both sets share one
    sorted list of base gfns and one of userspace starts, holding the union of
    their keys; each set keeps its own dicts and skips keys that are not its
    own.  Outside an update the sets are equal; during one they differ by the
    one slot being changed, so a lookup skips at most a couple of keys, and a
    slot's keys are sorted in once, when the first set gets it, and sorted out
    once, when the last set drops it."""

    __slots__ = ("gfn", "hva")

    def __init__(self) -> None:
        self.gfn = SortedInts()
        self.hva: dict[int, SortedInts] = {}  # size class -> keys (uaddr << 16 | id)


def _size_class(npages: int) -> int:
    return npages.bit_length() - 1


class MemslotSet:
    """``struct kvm_memslots``: the slots of one address space, as one of the
    two copies (``node_idx``) the kernel keeps.

    Indexes: slot id -> slot (the kernel's ``id_hash``); base gfn, sorted (the
    ``gfn_tree``): :meth:`search_memslots` is O(log n); userspace range (the
    ``hva_tree`` interval tree): :meth:`for_each_memslot_in_hva_range` is
    O(c log n + k) with c the number of distinct power-of-two slot sizes
    (slots are bucketed by size class so that only starts within one class
    length before the range can intersect it).  The sorted keys live in a
    :class:`MemslotKeys` shared with the sibling set."""

    __slots__ = ("_by_base", "_by_id", "_keys", "_sibling", "as_id", "generation",
                 "node_idx")

    def __init__(self, as_id: int, node_idx: int, keys: MemslotKeys | None = None) -> None:
        self.as_id = as_id
        self.node_idx = node_idx
        # kvm_create_vm(): address space i starts at generation i.
        self.generation = as_id
        self._by_id: dict[int, MemorySlot] = {}
        self._by_base: dict[int, MemorySlot] = {}
        self._keys = keys if keys is not None else MemslotKeys()
        self._sibling: MemslotSet | None = None

    @staticmethod
    def pair(as_id: int) -> tuple[MemslotSet, MemslotSet]:
        """The two sets of address space ``as_id`` (``node_idx`` 0 and 1)."""
        keys = MemslotKeys()
        a = MemslotSet(as_id, 0, keys)
        b = MemslotSet(as_id, 1, keys)
        a._sibling = b
        b._sibling = a
        return a, b

    # --- lookups -----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._by_id)

    def id_to_memslot(self, id: int) -> MemorySlot | None:
        """``id_to_memslot()``: the slot with this id, or ``None``."""
        return self._by_id.get(id)

    def _floor_base(self, gfn: int) -> int | None:
        """This set's largest base gfn ``<= gfn``."""
        keys = self._keys.gfn
        by_base = self._by_base
        base = keys.floor(gfn)
        while base is not None and base not in by_base:
            base = keys.floor(base - 1) if base else None
        return base

    def search_memslots(self, gfn: int) -> MemorySlot | None:
        """``search_memslots()`` / ``__gfn_to_memslot()``: the slot whose gfn
        range holds ``gfn`` (INVALID slots included, as in the kernel), or
        ``None``.  O(log n)."""
        base = self._floor_base(gfn)
        if base is None:
            return None
        slot = self._by_base[base]
        if gfn < base + slot.npages:
            return slot
        return None

    gfn_to_memslot = search_memslots

    def for_each_memslot(self) -> Iterator[MemorySlot]:
        """``kvm_for_each_memslot()``: every slot, in gfn order."""
        by_base = self._by_base
        for base in self._keys.gfn:
            slot = by_base.get(base)
            if slot is not None:
                yield slot

    def for_each_memslot_in_gfn_range(self, start: int, end: int) -> Iterator[MemorySlot]:
        """``kvm_for_each_memslot_in_gfn_range()``: slots intersecting
        ``[start, end)``, in gfn order.  O(log n + k)."""
        if start >= end:
            return
        by_base = self._by_base
        lo = self._floor_base(start)
        if lo is None or lo + by_base[lo].npages <= start:
            lo = start
        for base in self._keys.gfn.irange(lo, end - 1):
            slot = by_base.get(base)
            if slot is not None:
                yield slot

    def for_each_memslot_in_hva_range(self, start: int, end: int) -> list[MemorySlot]:
        """``kvm_for_each_memslot_in_hva_range()``: slots whose userspace range
        intersects ``[start, end)``, in address order (ties by id)."""
        if start >= end:
            return []
        found: list[tuple[int, MemorySlot]] = []
        by_id = self._by_id
        classes = self._keys.hva
        for cls, keys in classes.items():
            # A slot of this class is shorter than 2 ** (cls + 1) pages.
            lo = start - (2 << (cls + PAGE_SHIFT)) + 1
            for key in keys.irange(lo << 16 if lo > 0 else 0, ((end - 1) << 16) | 0xFFFF):
                slot = by_id.get(key & 0xFFFF)
                if slot is None or slot.userspace_addr != key >> 16 \
                        or _size_class(slot.npages) != cls:
                    continue  # the sibling's key
                if slot.userspace_addr + (slot.npages << PAGE_SHIFT) > start:
                    found.append((key, slot))
        if len(classes) > 1:
            found.sort(key=lambda ks: ks[0])
        return [slot for _, slot in found]

def kvm_replace_memslot(slots: MemslotSet, old: MemorySlot | None,
                        new: MemorySlot | None) -> None:
    """``kvm_replace_memslot()`` on one set: ``old`` -> ``new`` (either may be
    ``None`` for an insert or a removal).

    A replacement with the same geometry (INVALID copy, FLAGS_ONLY, restore)
    swaps the object in O(1).  Otherwise ``old``'s keys leave the shared key
    lists unless the sibling set still holds them, and ``new``'s enter them
    unless the sibling already did: O(log n)."""
    by_id = slots._by_id
    by_base = slots._by_base
    if old is not None:
        if new is not None and old.base_gfn == new.base_gfn and old.npages == new.npages \
                and old.userspace_addr == new.userspace_addr:
            by_id[new.id] = new
            by_base[new.base_gfn] = new
            return
        del by_id[old.id]
        del by_base[old.base_gfn]
        keys = slots._keys
        other = slots._sibling
        twin = other._by_id.get(old.id) if other is not None else None
        if other is None or old.base_gfn not in other._by_base:
            keys.gfn.remove(old.base_gfn)
        if twin is None or twin.userspace_addr != old.userspace_addr \
                or twin.npages.bit_length() != old.npages.bit_length():
            cls = old.npages.bit_length() - 1
            lst = keys.hva[cls]
            lst.remove((old.userspace_addr << 16) | old.id)
            if not lst:
                del keys.hva[cls]
    if new is not None:
        by_id[new.id] = new
        by_base[new.base_gfn] = new
        keys = slots._keys
        other = slots._sibling
        twin = other._by_id.get(new.id) if other is not None else None
        if other is None or new.base_gfn not in other._by_base:
            keys.gfn.add(new.base_gfn)
        if twin is None or twin.userspace_addr != new.userspace_addr \
                or twin.npages.bit_length() != new.npages.bit_length():
            cls = new.npages.bit_length() - 1
            lst2 = keys.hva.get(cls)
            if lst2 is None:
                lst2 = keys.hva[cls] = SortedInts()
            lst2.add((new.userspace_addr << 16) | new.id)


# --- hooks the VM layer implements ------------------------------------------------------

HookOp = Op[None] | None
"""What a hook returns: an :data:`Op` to run, or ``None`` when it has nothing to do
(saves a generator on the fast path)."""


class MemslotHooks(Protocol):
    """What the VM (arch code) provides to the memslot layer.

    Each hook returns an :data:`Op` (which may yield: take ``mmu_lock``,
    ``mmap_lock``, ...) or ``None``.  Only ``prepare_memory_region`` and
    ``gmem_bind`` may fail (raise :class:`KernelError`), as in the kernel."""

    def prepare_memory_region(self, old: MemorySlot | None, new: MemorySlot | None,
                              change: KvmMrChange) -> HookOp:
        """``kvm_arch_prepare_memory_region()``: may reject the change."""
        ...

    def commit_memory_region(self, old: MemorySlot | None, new: MemorySlot | None,
                             change: KvmMrChange) -> HookOp:
        """``kvm_arch_commit_memory_region()``: dirty-logging enable/disable
        effects (write-protect, split, recover huge pages) happen here."""
        ...

    def flush_shadow_memslot(self, slot: MemorySlot) -> HookOp:
        """``kvm_arch_flush_shadow_memslot()``: zap ``slot`` (DELETE/MOVE)."""
        ...

    def memslots_updated(self, gen: int) -> HookOp:
        """``kvm_arch_memslots_updated()``: a set with generation ``gen`` is
        about to become current (x86 MMIO SPTE generation wrap)."""
        ...

    def gmem_bind(self, slot: MemorySlot, fd: int, offset: int) -> None:
        """``kvm_gmem_bind()``: bind ``slot`` to guest_memfd ``fd`` at ``offset``."""
        ...

    def gmem_unbind(self, slot: MemorySlot) -> None:
        """``kvm_gmem_unbind()``."""
        ...


def _nothing() -> Op[None]:
    return
    yield  # pragma: no cover


class NoopMemslotHooks:
    """Hooks that accept everything and touch no stage-2 state."""

    def prepare_memory_region(self, old: MemorySlot | None, new: MemorySlot | None,
                              change: KvmMrChange) -> HookOp:
        """Accepts every change."""
        return None

    def commit_memory_region(self, old: MemorySlot | None, new: MemorySlot | None,
                             change: KvmMrChange) -> HookOp:
        """Does nothing."""
        return None

    def flush_shadow_memslot(self, slot: MemorySlot) -> HookOp:
        """Does nothing."""
        return None

    def memslots_updated(self, gen: int) -> HookOp:
        """Does nothing."""
        return None

    def gmem_bind(self, slot: MemorySlot, fd: int, offset: int) -> None:
        """Records the binding in ``slot.gmem``."""
        slot.gmem = (fd, offset)

    def gmem_unbind(self, slot: MemorySlot) -> None:
        """Drops the binding."""
        slot.gmem = None


# Page-table levels for write_protect_memslot (x86 PG_LEVEL_4K / PG_LEVEL_2M).
PG_LEVEL_4K = 1
PG_LEVEL_2M = 2


# --- the VM-wide memslot state ----------------------------------------------------------


class VmMemslots:
    """The memslot part of ``struct kvm``: per address space two
    :class:`MemslotSet` s (active and inactive), ``nr_memslot_pages``,
    ``nr_memslots_dirty_logging``, the dirty-bitmap options and the hooks.

    ``use_dirty_bitmap`` is ``kvm_use_dirty_bitmap()`` (false for a dirty-ring
    VM without ``KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP``);
    ``manual_protect_init_set`` is manual protect with
    ``KVM_DIRTY_LOG_INITIALLY_SET`` (new bitmaps start all set)."""

    def __init__(self, limits: MemslotLimits | str, hooks: MemslotHooks | None = None) -> None:
        self.limits = memslot_limits(limits) if isinstance(limits, str) else limits
        self.hooks: MemslotHooks = hooks if hooks is not None else NoopMemslotHooks()
        self.nr_memslot_pages = 0
        self.nr_memslots_dirty_logging = 0
        self.use_dirty_bitmap = True
        self.manual_protect_init_set = False
        self._sets = [MemslotSet.pair(i) for i in range(self.limits.nr_as_ids)]
        self._active = [pair[0] for pair in self._sets]

    # --- readers -------------------------------------------------------------------------

    def memslots(self, as_id: int = 0) -> MemslotSet:
        """``__kvm_memslots()``: the active set of ``as_id`` (what SRCU readers see)."""
        return self._active[as_id]

    def inactive_memslots(self, as_id: int = 0) -> MemslotSet:
        """``kvm_get_inactive_memslots()``."""
        active = self._active[as_id]
        return self._sets[as_id][active.node_idx ^ 1]

    def gfn_to_memslot(self, gfn: int, as_id: int = 0, *,
                       include_invalid: bool = True) -> MemorySlot | None:
        """``gfn_to_memslot()``: the active slot holding ``gfn``, or ``None``.

        Like the kernel's lookup it also finds a slot marked INVALID (being
        deleted or moved; ``__gfn_to_hva_many`` is what refuses it), unless
        ``include_invalid`` is false."""
        slot = self._active[as_id].search_memslots(gfn)
        if slot is not None and not include_invalid and slot.flags & KVM_MEMSLOT_INVALID:
            return None
        return slot

    def id_to_memslot(self, id: int, as_id: int = 0) -> MemorySlot | None:
        """``id_to_memslot(__kvm_memslots(kvm, as_id), id)``."""
        return self._active[as_id]._by_id.get(id)

    def generation(self, as_id: int = 0) -> int:
        """The active set's generation (``kvm_memslots(kvm)->generation``)."""
        return self._active[as_id].generation

    def for_each_memslot(self, as_id: int | None = None) -> Iterator[MemorySlot]:
        """The active slots of ``as_id`` (default: of every address space, one
        after the other), in gfn order."""
        if as_id is not None:
            yield from self._active[as_id].for_each_memslot()
            return
        for slots in self._active:
            yield from slots.for_each_memslot()

    def all_slots(self) -> list[MemorySlot]:
        """Every active slot of every address space (as ``for_each_memslot()``)."""
        return list(self.for_each_memslot())

    def slots_for_hva_range(self, start: int, end: int) -> list[MemorySlot]:
        """The active slots, address space by address space, whose userspace
        range intersects ``[start, end)`` (``kvm_for_each_memslot_in_hva_range``
        over every address space, as ``kvm_handle_hva_range`` walks them)."""
        out: list[MemorySlot] = []
        for slots in self._active:
            out.extend(slots.for_each_memslot_in_hva_range(start, end))
        return out

    def gfn_ranges_for_hva(self, start: int, end: int) -> list[tuple[MemorySlot, Gfn, Gfn]]:
        """What ``kvm_handle_hva_range()`` hands its handler for ``[start, end)``:
        for every address space and every active slot whose userspace range
        intersects it, ``(slot, gfn_start, gfn_end)``."""
        out: list[tuple[MemorySlot, Gfn, Gfn]] = []
        for slot in self.slots_for_hva_range(start, end):
            hva_start = max(start, slot.userspace_addr)
            hva_end = min(end, slot.userspace_addr + (slot.npages << PAGE_SHIFT))
            out.append((slot, slot.hva_to_gfn(hva_start),
                        slot.hva_to_gfn(hva_end + PAGE_SIZE - 1)))
        return out

    # --- the ioctl -----------------------------------------------------------------------

    def set_user_memory_region_op(self, mem: KvmUserspaceMemoryRegion,
                                  v2: bool = False) -> Op[None]:
        """The ioctl as an :data:`Op` (see :func:`kvm_vm_ioctl_set_memory_region`)."""
        return kvm_vm_ioctl_set_memory_region(self, mem, v2)

    set_memory_region_op = set_user_memory_region_op

    def set_user_memory_region(self, mem: KvmUserspaceMemoryRegion, v2: bool = False) -> None:
        """``KVM_SET_USER_MEMORY_REGION`` (``v2``: ``..._REGION2``), run to
        completion.  Returns nothing; raises :class:`KernelError`."""
        for _ in kvm_vm_ioctl_set_memory_region(self, mem, v2):
            pass

    def set_internal_memslot(self, mem: KvmUserspaceMemoryRegion) -> None:
        """``kvm_set_internal_memslot()`` run to completion (x86 private slots)."""
        for _ in kvm_set_internal_memslot(self, mem):
            pass


# Pauses, built once (sync.acquire() looks them up on every call).
_ACQUIRE_SLOTS = acquire(LOCK_SLOTS)
_RELEASE_SLOTS = release(LOCK_SLOTS)
_ACQUIRE_SLOTS_ARCH = acquire(LOCK_SLOTS_ARCH)
_RELEASE_SLOTS_ARCH = release(LOCK_SLOTS_ARCH)
_ACQUIRE_FROZEN = acquire(LOCK_MEMSLOTS_FROZEN)
_RELEASE_FROZEN = release(LOCK_MEMSLOTS_FROZEN)
_ACQUIRE_SRCU = acquire(LOCK_SRCU)
_RELEASE_SRCU = release(LOCK_SRCU)
_INVALID_PUBLISHED = point(POINT_INVALID_PUBLISHED)

_CREATE = KvmMrChange.CREATE
_DELETE = KvmMrChange.DELETE
_MOVE = KvmMrChange.MOVE
_FLAGS_ONLY = KvmMrChange.FLAGS_ONLY


def _failed(err: KernelError) -> Op[None]:
    """An op that fails with ``err`` when driven (checks made before any lock)."""
    raise err
    yield  # pragma: no cover


def kvm_vm_ioctl_set_memory_region(kvm: VmMemslots, mem: KvmUserspaceMemoryRegion,
                                   v2: bool = False) -> Op[None]:
    """``kvm_vm_ioctl(KVM_SET_USER_MEMORY_REGION[2])`` +
    ``kvm_vm_ioctl_set_memory_region()``: the op of one ioctl.

    Before any lock: the v1 ioctl rejects flags outside
    LOG_DIRTY_PAGES|READONLY (and sees the v2-only fields as zero); a slot id
    at or above ``KVM_USER_MEM_SLOTS`` is ``EINVAL`` (internal slots are not
    the user's).  Then :func:`kvm_set_memory_region` under ``slots_lock``.
    The returned op returns nothing; it raises :class:`KernelError`."""
    if not v2:
        if mem.flags & ~KVM_SET_USER_MEMORY_REGION_V1_FLAGS:
            return _failed(KernelError("EINVAL", CALL,
                                       f"flags {mem.flags:#x} not allowed by the v1 ioctl"))
        if mem.guest_memfd or mem.guest_memfd_offset:
            mem = KvmUserspaceMemoryRegion(mem.slot, mem.flags, mem.guest_phys_addr,
                                           mem.memory_size, mem.userspace_addr)
    if (mem.slot & 0xFFFF) >= kvm.limits.user_mem_slots:
        return _failed(KernelError("EINVAL", CALL,
                                   f"slot id {mem.slot & 0xFFFF} >= KVM_USER_MEM_SLOTS "
                                   f"({kvm.limits.user_mem_slots})"))
    return kvm_set_memory_region(kvm, mem)


def kvm_set_internal_memslot(kvm: VmMemslots, mem: KvmUserspaceMemoryRegion) -> Op[None]:
    """``kvm_set_internal_memslot()``: for the arch's private slots (id at or
    above ``KVM_USER_MEM_SLOTS``, no flags), under ``slots_lock`` as x86's
    ``x86_set_memory_region`` holds it.  The op raises :class:`KernelError`."""
    if (mem.slot & 0xFFFF) < kvm.limits.user_mem_slots:
        return _failed(KernelError("EINVAL", CALL, "internal memslot with a user slot id"))
    if mem.flags:
        return _failed(KernelError("EINVAL", CALL, "internal memslot with flags"))
    return kvm_set_memory_region(kvm, mem)


def check_memory_region_flags(kvm: VmMemslots, mem: KvmUserspaceMemoryRegion) -> bool:
    """``check_memory_region_flags()``: True if ``mem.flags`` is acceptable.

    LOG_DIRTY_PAGES always (but not with GUEST_MEMFD); GUEST_MEMFD with
    guest_memfd support; READONLY if the arch has read-only memory and the
    request is not GUEST_MEMFD."""
    flags = mem.flags
    valid = KVM_MEM_LOG_DIRTY_PAGES
    if kvm.limits.guest_memfd:
        valid |= KVM_MEM_GUEST_MEMFD
    if flags & KVM_MEM_GUEST_MEMFD:
        valid &= ~KVM_MEM_LOG_DIRTY_PAGES
    elif kvm.limits.readonly_mem:
        valid |= KVM_MEM_READONLY
    return not flags & ~valid


def kvm_check_memslot_overlap(slots: MemslotSet, id: int, start: int, end: int) -> bool:
    """``kvm_check_memslot_overlap()``: does a slot other than ``id`` intersect
    ``[start, end)`` (gpa space only)?

    Same answer as the kernel's walk over ``kvm_for_each_memslot_in_gfn_range``,
    in two lookups: slots are disjoint and sorted, so only the last slot
    starting below ``end`` - or, if that is ``id`` itself (a MOVE), the one
    before it - can reach into the range."""
    by_base = slots._by_base
    base = slots._floor_base(end - 1)
    if base is None:
        return False
    slot = by_base[base]
    if base + slot.npages <= start:
        return False
    if slot.id != id:
        return True
    if not base:
        return False
    base = slots._floor_base(base - 1)
    return base is not None and base + by_base[base].npages > start


def kvm_set_memory_region(kvm: VmMemslots, mem: KvmUserspaceMemoryRegion) -> Op[None]:
    """``kvm_set_memory_region()``: validate (:func:`kvm_check_memory_region`),
    bind guest_memfd if asked, run :func:`kvm_set_memslot`.

    Both kernel callers hold ``kvm->slots_lock`` around this function (the
    ioctl takes it, x86's internal-slot callers assert it); here the op takes
    and drops it itself.  Returns nothing (an identical request is a no-op
    that leaves the generation alone); raises :class:`KernelError`."""
    yield _ACQUIRE_SLOTS
    try:
        plan = kvm_check_memory_region(kvm, mem)
        if plan is not None:
            old, new, change = plan
            # rule 21
            gmem = new is not None and bool(mem.flags & KVM_MEM_GUEST_MEMFD)
            if gmem:
                assert new is not None
                kvm.hooks.gmem_bind(new, mem.guest_memfd, mem.guest_memfd_offset)
            # rule 22
            try:
                yield from kvm_set_memslot(kvm, old, new, change)
            except KernelError:
                if gmem:
                    assert new is not None
                    kvm.hooks.gmem_unbind(new)
                raise
    except KernelError:
        yield _RELEASE_SLOTS
        raise
    yield _RELEASE_SLOTS


MemslotPlan = tuple["MemorySlot | None", "MemorySlot | None", KvmMrChange]


def kvm_check_memory_region(kvm: VmMemslots,
                            mem: KvmUserspaceMemoryRegion) -> MemslotPlan | None:
    """The checks of ``kvm_set_memory_region()`` in the kernel's order, first
    failing rule wins (kernel-semantics.md §1.5 rules 1-20; the comments number
    them).  Caller holds ``slots_lock``.

    Returns ``(old, new, change)`` - ``new`` a fresh, unpublished slot (``None``
    for DELETE) - or ``None`` for an identical request; raises
    :class:`KernelError`."""
    limits = kvm.limits
    # rule 1
    if not check_memory_region_flags(kvm, mem):
        raise KernelError("EINVAL", CALL, f"invalid flags {mem.flags:#x}")
    # rule 2
    as_id = mem.slot >> 16
    id = mem.slot & 0xFFFF
    size = mem.memory_size
    gpa = mem.guest_phys_addr
    uaddr = mem.userspace_addr
    # rule 3 (the unsigned-long truncation cannot happen on a 64-bit host)
    if size & (PAGE_SIZE - 1):
        raise KernelError("EINVAL", CALL, "memory_size not page aligned")
    # rule 4
    if gpa & (PAGE_SIZE - 1):
        raise KernelError("EINVAL", CALL, "guest_phys_addr not page aligned")
    # rule 5
    if uaddr & (PAGE_SIZE - 1):
        raise KernelError("EINVAL", CALL, "userspace_addr not page aligned")
    if limits.tbi and uaddr != untagged_addr(limits, uaddr):
        raise KernelError("EINVAL", CALL, "userspace_addr is tagged")
    if uaddr + size > limits.task_size_max:
        raise KernelError("EINVAL", CALL, "userspace range fails access_ok()")
    # rule 6
    if mem.flags & KVM_MEM_GUEST_MEMFD and (
            mem.guest_memfd_offset & (PAGE_SIZE - 1)
            or mem.guest_memfd_offset + size > U64_MAX):
        raise KernelError("EINVAL", CALL, "guest_memfd_offset misaligned or wraps")
    # rule 7
    if as_id >= limits.nr_as_ids or id >= KVM_MEM_SLOTS_NUM:
        raise KernelError("EINVAL", CALL, f"as_id {as_id} / slot id {id} out of range")
    # rule 8
    if gpa + size > U64_MAX:
        raise KernelError("EINVAL", CALL, "guest_phys_addr + memory_size wraps")
    npages = size >> PAGE_SHIFT
    # rule 9
    if id < limits.user_mem_slots and npages > KVM_MEM_MAX_NR_PAGES:
        raise KernelError("EINVAL", CALL, "more than KVM_MEM_MAX_NR_PAGES pages")
    # rule 10
    slots = kvm._active[as_id]
    old = slots._by_id.get(id)
    if not size:
        # rule 11
        if old is None or not old.npages:
            raise KernelError("EINVAL", CALL, f"delete of slot {id}, which does not exist")
        # rule 12 (an accounting bug; WARN in the kernel)
        if kvm.nr_memslot_pages < old.npages:
            raise KernelError("EIO", CALL, "nr_memslot_pages underflow")
        # rule 13
        return old, None, _DELETE
    base_gfn = gpa >> PAGE_SHIFT
    if old is None or not old.npages:
        # rules 14, 15
        change = _CREATE
        if kvm.nr_memslot_pages + npages > ULONG_MAX:
            raise KernelError("EINVAL", CALL, "nr_memslot_pages would overflow")
    else:
        # rule 16
        if mem.flags & KVM_MEM_GUEST_MEMFD:
            raise KernelError("EINVAL", CALL, "guest_memfd slots cannot be modified")
        # rule 17
        if uaddr != old.userspace_addr or npages != old.npages \
                or (mem.flags ^ old.flags) & KVM_MEM_READONLY:
            raise KernelError("EINVAL", CALL,
                              "userspace_addr, size or READONLY of a slot cannot change")
        # rule 18
        if base_gfn != old.base_gfn:
            change = _MOVE
        elif mem.flags != old.flags:
            change = _FLAGS_ONLY
        else:
            return None
    # rule 19
    if change is not _FLAGS_ONLY and \
            kvm_check_memslot_overlap(slots, id, base_gfn, base_gfn + npages):
        raise KernelError("EEXIST", CALL, "guest physical range overlaps another slot")
    # rule 20 (kzalloc cannot fail here)
    # (plain ints for the Gfn/Hva fields: NewType calls cost a function call)
    new = MemorySlot(id, as_id, base_gfn, npages, uaddr, mem.flags)  # type: ignore[arg-type]
    return old, new, change


def kvm_set_memslot(kvm: VmMemslots, old: MemorySlot | None, new: MemorySlot | None,
                    change: KvmMrChange) -> Op[None]:
    """``kvm_set_memslot()``: invalidate (DELETE/MOVE), prepare, install, commit.

    The kernel's steps are inlined (only each swap is a nested op: the number
    of generator levels is what a memslot update costs here):

    * ``kvm_invalidate_memslot()`` (DELETE/MOVE): put an INVALID copy of
      ``old`` in the inactive set and swap it active - never propagated, the
      INVALID slot only ever lives in the active set; yield
      ``point("memslot_invalid_published")``; zap ``old``
      (``flush_shadow_memslot``); retake ``slots_arch_lock``; copy the arch
      data back into ``old``.
    * ``kvm_prepare_memory_region()``: :func:`kvm_prepare_dirty_bitmap`, then
      the arch prepare hook.  If it fails: drop a fresh bitmap; DELETE/MOVE
      restore ``old`` with one more swap (``kvm_activate_memslot(invalid,
      old)``; the zap stays, I5), else drop ``slots_arch_lock``; re-raise.
    * ``kvm_{create,delete,move,update_flags}_memslot()``: edit the inactive
      set, then ``kvm_activate_memslot()``: swap, and repeat the edit on the
      set that just became inactive, where DELETE/MOVE find the INVALID slot.
    * ``kvm_commit_memory_region()``: :func:`kvm_commit_accounting`, the arch
      commit hook, :func:`kvm_commit_free`.

    Takes ``slots_arch_lock`` (each swap releases it).  Raises the prepare
    hook's :class:`KernelError`."""
    yield _ACQUIRE_SLOTS_ARCH
    slot = old if old is not None else new
    assert slot is not None
    as_id = slot.as_id
    pair = kvm._sets[as_id]
    active = kvm._active
    hooks = kvm.hooks
    invalid: MemorySlot | None = None
    if change is _DELETE or change is _MOVE:
        assert old is not None
        # kvm_invalidate_memslot()
        invalid = kvm_copy_memslot(old)
        invalid.flags |= KVM_MEMSLOT_INVALID
        kvm_replace_memslot(pair[active[as_id].node_idx ^ 1], old, invalid)
        yield from kvm_swap_active_memslots(kvm, as_id)
        yield _INVALID_PUBLISHED
        flush = hooks.flush_shadow_memslot(old)
        if flush is not None:
            yield from flush
        yield _ACQUIRE_SLOTS_ARCH
        old.arch = invalid.arch
    # kvm_prepare_memory_region()
    fresh_bitmap = change is not _DELETE and kvm_prepare_dirty_bitmap(kvm, old, new, change)
    try:
        prepare = hooks.prepare_memory_region(old, new, change)
        if prepare is not None:
            yield from prepare
    except KernelError:
        if fresh_bitmap:
            assert new is not None
            new.dirty_bitmap = None
        if invalid is not None:
            # kvm_activate_memslot(kvm, invalid_slot, old)
            yield from kvm_swap_active_memslots(kvm, as_id)
            kvm_replace_memslot(pair[active[as_id].node_idx ^ 1], invalid, old)
        else:
            yield _RELEASE_SLOTS_ARCH
        raise
    # kvm_{create,delete,move,update_flags}_memslot() + kvm_activate_memslot()
    kvm_replace_memslot(pair[active[as_id].node_idx ^ 1], old, new)
    yield from kvm_swap_active_memslots(kvm, as_id)
    kvm_replace_memslot(pair[active[as_id].node_idx ^ 1],
                        old if invalid is None else invalid, new)
    # kvm_commit_memory_region()
    kvm_commit_accounting(kvm, old, new, change)
    commit = hooks.commit_memory_region(old, new, change)
    if commit is not None:
        yield from commit
    kvm_commit_free(kvm, old, new, change)


def kvm_swap_active_memslots(kvm: VmMemslots, as_id: int) -> Op[None]:
    """``kvm_swap_active_memslots()``: publish the inactive set of ``as_id``.

    The new set first carries the old generation with
    ``KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS``; it is published once no MMU-notifier
    invalidation is active (exclusive ``memslots_frozen``), ``slots_arch_lock``
    is dropped, readers are waited for (``synchronize_srcu_expedited``: an
    exclusive ``srcu`` acquire/release), ``kvm_arch_memslots_updated`` runs,
    and the generation becomes old + ``nr_as_ids``."""
    active = kvm._active[as_id]
    slots = kvm._sets[as_id][active.node_idx ^ 1]
    slots.generation = active.generation | KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS
    yield _ACQUIRE_FROZEN
    kvm._active[as_id] = slots
    yield _RELEASE_FROZEN
    yield _RELEASE_SLOTS_ARCH
    yield _ACQUIRE_SRCU
    yield _RELEASE_SRCU
    gen = (slots.generation & ~KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS) + kvm.limits.nr_as_ids
    updated = kvm.hooks.memslots_updated(gen)
    if updated is not None:
        yield from updated
    slots.generation = gen


def kvm_alloc_dirty_bitmap(slot: MemorySlot) -> DirtyBitmap:
    """``kvm_alloc_dirty_bitmap()``: a cleared bitmap, one bit per page (the
    kernel's second, scratch half is ``KVM_GET_DIRTY_LOG``'s business)."""
    return np.zeros(slot.npages, dtype=np.bool_)


def kvm_prepare_dirty_bitmap(kvm: VmMemslots, old: MemorySlot | None,
                             new: MemorySlot | None, change: KvmMrChange) -> bool:
    """The generic half of ``kvm_prepare_memory_region()``: settle ``new``'s
    dirty bitmap.  Returns True if it allocated a fresh one (dropped again if
    the arch prepare hook fails).

    Not for DELETE: no LOG_DIRTY_PAGES -> no bitmap; ``old`` has a bitmap ->
    reuse it (in practice a MOVE of a logged slot keeps its bits); else, if
    the VM uses bitmaps, allocate one (all set with manual protect +
    ``KVM_DIRTY_LOG_INITIALLY_SET``)."""
    if change is _DELETE or new is None:
        return False
    if not new.flags & KVM_MEM_LOG_DIRTY_PAGES:
        new.dirty_bitmap = None
    elif old is not None and old.dirty_bitmap is not None:
        new.dirty_bitmap = old.dirty_bitmap
    elif kvm.use_dirty_bitmap:
        bitmap = kvm_alloc_dirty_bitmap(new)
        if kvm.manual_protect_init_set:
            bitmap[:] = True
        new.dirty_bitmap = bitmap
        return True
    return False


def kvm_commit_accounting(kvm: VmMemslots, old: MemorySlot | None, new: MemorySlot | None,
                          change: KvmMrChange) -> None:
    """``kvm_commit_memory_region()`` before the arch hook: ``nr_memslot_pages``
    (+ on CREATE, - on DELETE) and ``nr_memslots_dirty_logging`` (when
    LOG_DIRTY_PAGES toggles)."""
    old_flags = 0
    new_flags = 0
    if old is not None:
        old_flags = old.flags
        if change is _DELETE:
            kvm.nr_memslot_pages -= old.npages
    if new is not None:
        new_flags = new.flags
        if change is _CREATE:
            kvm.nr_memslot_pages += new.npages
    if (old_flags ^ new_flags) & KVM_MEM_LOG_DIRTY_PAGES:
        kvm.nr_memslots_dirty_logging += 1 if new_flags & KVM_MEM_LOG_DIRTY_PAGES else -1


def kvm_commit_free(kvm: VmMemslots, old: MemorySlot | None, new: MemorySlot | None,
                    change: KvmMrChange) -> None:
    """``kvm_commit_memory_region()`` after the arch hook: DELETE frees ``old``
    (``kvm_free_memslot``: bitmap, guest_memfd binding); MOVE/FLAGS_ONLY free
    ``old``'s bitmap when ``new`` does not share it (logging turned off)."""
    if old is None:
        return
    if change is _DELETE:
        if old.gmem is not None:
            kvm.hooks.gmem_unbind(old)
        old.dirty_bitmap = None
    elif old.dirty_bitmap is not None and new is not None and new.dirty_bitmap is None:
        old.dirty_bitmap = None


# --- consistency checks (never called by the fast paths) --------------------------------


def validate_memslot_set(slots: MemslotSet) -> None:
    """Check one set's indexes against each other: ids, sorted and
    non-overlapping gfn ranges, its keys present in the shared key lists.
    Raises :class:`ValidationError`."""
    inv = "memslot-set"
    if len(slots._by_id) != len(slots._by_base):
        raise ValidationError(inv, f"as {slots.as_id}: index sizes differ")
    prev_end = -1
    seen = 0
    for slot in slots.for_each_memslot():
        seen += 1
        if slots._by_id.get(slot.id) is not slot:
            raise ValidationError(inv, f"{slot!r} not in the id index")
        if slot.as_id != slots.as_id or slot.npages <= 0:
            raise ValidationError(inv, f"{slot!r} misfiled")
        if slot.base_gfn < prev_end:
            raise ValidationError(inv, f"{slot!r} overlaps the previous slot")
        prev_end = slot.base_gfn + slot.npages
        hva = slots._keys.hva.get(_size_class(slot.npages))
        key = (slot.userspace_addr << 16) | slot.id
        if hva is None or key not in list(hva.irange(key, key)):
            raise ValidationError(inv, f"{slot!r} missing from the hva keys")
    if seen != len(slots._by_id):
        raise ValidationError(inv, f"as {slots.as_id}: gfn keys miss slots")


def validate_memslot_keys(a: MemslotSet, b: MemslotSet) -> None:
    """The shared keys of a pair of sets are exactly the union of their keys.
    Raises :class:`ValidationError`."""
    keys = a._keys
    gfn = sorted(set(a._by_base) | set(b._by_base))
    if list(keys.gfn) != gfn or len(keys.gfn) != len(gfn):
        raise ValidationError("memslot-keys", f"as {a.as_id}: stale gfn keys")
    hva = sorted({(s.userspace_addr << 16) | s.id for st in (a, b) for s in st._by_id.values()})
    have = sorted(k for lst in keys.hva.values() for k in lst)
    if have != hva:
        raise ValidationError("memslot-keys", f"as {a.as_id}: stale hva keys")


def validate_memslots(kvm: VmMemslots) -> None:
    """Check every set, that active and inactive hold the same slots outside
    an update, that no generation is marked in progress, and the page and
    logging counters.  Raises :class:`ValidationError`."""
    pages = 0
    logging = 0
    for as_id, pair in enumerate(kvm._sets):
        for slots in pair:
            validate_memslot_set(slots)
        validate_memslot_keys(*pair)
        active = kvm._active[as_id]
        inactive = kvm.inactive_memslots(as_id)
        if list(active.for_each_memslot()) != list(inactive.for_each_memslot()):
            raise ValidationError("memslot-sets", f"as {as_id}: active and inactive differ")
        if active.generation & KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS:
            raise ValidationError("memslot-generation", f"as {as_id}: update in progress")
        for slot in active.for_each_memslot():
            if slot.invalid:
                raise ValidationError("memslot-sets", f"{slot!r} left INVALID")
            pages += slot.npages
            logging += bool(slot.flags & KVM_MEM_LOG_DIRTY_PAGES)
            bitmap = slot.dirty_bitmap
            if bitmap is not None and (not slot.logging or len(bitmap) != slot.npages):
                raise ValidationError("memslot-dirty-bitmap", f"{slot!r}: stray bitmap")
    if pages != kvm.nr_memslot_pages:
        raise ValidationError("memslot-accounting",
                              f"nr_memslot_pages {kvm.nr_memslot_pages} != {pages}")
    if logging != kvm.nr_memslots_dirty_logging:
        raise ValidationError("memslot-accounting",
                              f"nr_memslots_dirty_logging {kvm.nr_memslots_dirty_logging} "
                              f"!= {logging}")


# Names the VM layer was first written against.
Memslots = VmMemslots
MemoryRegion = KvmUserspaceMemoryRegion
