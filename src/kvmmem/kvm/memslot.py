"""Memslots: ``KVM_SET_USER_MEMORY_REGION(2)`` and the memslot sets.

Mirrors the memslot half of ``virt/kvm/kvm_main.c`` (kernel-semantics.md §1):

* :class:`KvmUserspaceMemoryRegion` is ``struct kvm_userspace_memory_region2``
  (the v1 ioctl is the same struct with the v2-only fields zero).
* :class:`MemorySlot` is ``struct kvm_memory_slot``; :class:`MemslotSet` is
  ``struct kvm_memslots`` (one address space: id hash, gfn tree, hva interval
  tree, generation).  They live in :mod:`kvmmem.kvm.memory_slot` (with the
  request, the flags and limits, the dirty bitmap) and
  :mod:`kvmmem.kvm.memslot_set`; this module re-exports them.
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

from collections.abc import Iterator
from typing import NamedTuple, Protocol

import numpy as np

from kvmmem.errors import KernelError, ValidationError
from kvmmem.kvm.memory_slot import (
    ARM64_TASK_SIZE_MAX,
    BITS_PER_LONG,
    CALL,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_MAX_NR_PAGES,
    KVM_MEM_READONLY,
    KVM_MEM_SLOTS_NUM,
    KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS,
    KVM_MEMSLOT_INVALID,
    KVM_SET_USER_MEMORY_REGION_V1_FLAGS,
    LOCK_MEMSLOTS_FROZEN,
    LOCK_SLOTS,
    LOCK_SLOTS_ARCH,
    LOCK_SRCU,
    POINT_INVALID_PUBLISHED,
    RISCV_TASK_SIZE_MAX,
    U32_MAX,
    U64_MAX,
    ULONG_MAX,
    X86_TASK_SIZE_MAX,
    DirtyBitmap,
    GmemBinding,
    KvmMrChange,
    KvmUserspaceMemoryRegion,
    MemorySlot,
    MemslotLimits,
    access_ok,
    kvm_copy_memslot,
    kvm_dirty_bitmap_bytes,
    mark_page_dirty_in_slot,
    memslot_limits,
    region,
    untagged_addr,
)
from kvmmem.kvm.memslot_set import (
    MemslotKeys,
    MemslotSet,
    SortedInts,
    kvm_replace_memslot,
    validate_memslot_keys,
    validate_memslot_set,
)
from kvmmem.sync import Op, acquire, point, release
from kvmmem.types import Gfn

__all__ = [
    "ARM64_TASK_SIZE_MAX", "BITS_PER_LONG", "CALL", "KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS",
    "KVM_MEMSLOT_INVALID", "KVM_MEM_GUEST_MEMFD", "KVM_MEM_LOG_DIRTY_PAGES",
    "KVM_MEM_MAX_NR_PAGES", "KVM_MEM_READONLY", "KVM_MEM_SLOTS_NUM",
    "KVM_SET_USER_MEMORY_REGION_V1_FLAGS", "LOCK_MEMSLOTS_FROZEN", "LOCK_SLOTS",
    "LOCK_SLOTS_ARCH", "LOCK_SRCU", "PG_LEVEL_2M", "PG_LEVEL_4K", "POINT_INVALID_PUBLISHED",
    "RISCV_TASK_SIZE_MAX", "U32_MAX", "U64_MAX", "ULONG_MAX", "X86_TASK_SIZE_MAX",
    "DirtyBitmap", "GmemBinding", "HookOp", "KvmMrChange", "KvmUserspaceMemoryRegion",
    "MemoryRegion", "MemorySlot", "MemslotHooks", "MemslotKeys", "MemslotLimits", "MemslotPlan",
    "MemslotSet", "MemslotUpdate",
    "Memslots", "NoopMemslotHooks", "SortedInts", "VmMemslots", "access_ok",
    "check_memory_region_flags", "kvm_alloc_dirty_bitmap", "kvm_check_memory_region",
    "kvm_check_memslot_overlap", "kvm_commit_accounting", "kvm_commit_free",
    "kvm_copy_memslot", "kvm_dirty_bitmap_bytes", "kvm_prepare_dirty_bitmap",
    "kvm_replace_memslot", "kvm_set_internal_memslot", "kvm_set_memory_region",
    "kvm_set_memslot", "kvm_swap_active_memslots", "kvm_vm_ioctl_set_memory_region",
    "mark_page_dirty_in_slot", "memslot_limits", "region", "untagged_addr",
    "validate_memslot_keys", "validate_memslot_set", "validate_memslots",
]
"""Every memslot name, those of :mod:`kvmmem.kvm.memory_slot` and
:mod:`kvmmem.kvm.memslot_set` included (callers import them from here)."""


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
        """Records the binding in ``slot.gmem`` (the fd stands for the file)."""
        slot.gmem = GmemBinding(fd, offset >> slot.page_shift)

    def gmem_unbind(self, slot: MemorySlot) -> None:
        """Drops the binding."""
        slot.gmem = None


# Page-table levels for write_protect_memslot (x86 PG_LEVEL_4K / PG_LEVEL_2M).
PG_LEVEL_4K = 1
PG_LEVEL_2M = 2


# --- the VM-wide memslot state ----------------------------------------------------------


class MemslotUpdate(NamedTuple):
    """A memslot update in flight, as :attr:`VmMemslots.update_in_flight` publishes it.

    Not kernel state (no kernel reader needs it): what a checker of states
    between two pauses must know to tell an update half done from a bug.
    ``old`` and ``new`` are the slot before and after (None for CREATE and
    DELETE; a published slot's geometry and flags never change).  Between the
    swap that publishes ``new`` and the end of the ioctl, stage-2 entries
    premapped by the prepare hook may have no slot yet (linux-5.4 arm64), and
    dirty logging is not in force until the commit hook has write-protected the
    slot.  (A tuple: one is made per update, and a memslot update is hot.)"""

    old: MemorySlot | None
    new: MemorySlot | None



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
        self._sets = [MemslotSet.pair(i, self.limits.page_shift)
                      for i in range(self.limits.nr_as_ids)]
        self._active = [pair[0] for pair in self._sets]
        self.update_in_flight: MemslotUpdate | None = None
        """The update in flight (published by :func:`kvm_set_memory_region` from
        its validation until it returns), or None.  Left out of state
        fingerprints: it follows from where the updating thread is paused."""

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
            hva_end = min(end, slot.hva_end)
            out.append((slot, slot.hva_to_gfn(hva_start),
                        slot.hva_to_gfn(hva_end + (1 << slot.page_shift) - 1)))
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
    except KernelError:
        yield _RELEASE_SLOTS
        raise
    if plan is None:
        yield _RELEASE_SLOTS
        return
    old, new, change = plan
    kvm.update_in_flight = MemslotUpdate(old, new)
    try:
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
    else:
        yield _RELEASE_SLOTS
    finally:
        kvm.update_in_flight = None


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
    # PAGE_SIZE is the host's: 16 KiB or 64 KiB on an arm64 kernel built so, where a
    # 4 KiB slot is EINVAL (seen on Debian's 7.3 arm64-16k kernel)
    page_shift = limits.page_shift
    page_mask = (1 << page_shift) - 1
    # rule 3 (the unsigned-long truncation cannot happen on a 64-bit host)
    if size & page_mask:
        raise KernelError("EINVAL", CALL, "memory_size not page aligned")
    # rule 4
    if gpa & page_mask:
        raise KernelError("EINVAL", CALL, "guest_phys_addr not page aligned")
    # rule 5
    if uaddr & page_mask:
        raise KernelError("EINVAL", CALL, "userspace_addr not page aligned")
    if limits.tbi and uaddr != untagged_addr(limits, uaddr):
        raise KernelError("EINVAL", CALL, "userspace_addr is tagged")
    if uaddr + size > limits.task_size_max:
        raise KernelError("EINVAL", CALL, "userspace range fails access_ok()")
    # rule 6
    if mem.flags & KVM_MEM_GUEST_MEMFD and (
            mem.guest_memfd_offset & page_mask
            or mem.guest_memfd_offset + size > U64_MAX):
        raise KernelError("EINVAL", CALL, "guest_memfd_offset misaligned or wraps")
    # rule 7
    if as_id >= limits.nr_as_ids or id >= KVM_MEM_SLOTS_NUM:
        raise KernelError("EINVAL", CALL, f"as_id {as_id} / slot id {id} out of range")
    # rule 8
    if gpa + size > U64_MAX:
        raise KernelError("EINVAL", CALL, "guest_phys_addr + memory_size wraps")
    npages = size >> page_shift
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
    base_gfn = gpa >> page_shift
    if old is None or not old.npages:
        # rules 14, 15
        change = _CREATE
        if kvm.nr_memslot_pages + npages > ULONG_MAX:
            raise KernelError("EINVAL", CALL, "nr_memslot_pages would overflow")
    else:
        # rule 16
        if mem.flags & KVM_MEM_GUEST_MEMFD:
            raise KernelError("EINVAL", CALL, "guest_memfd slots cannot be modified")
        # rule 17: GUEST_MEMFD is in the mask in the current kernel, so a request that
        # drops it from a guest_memfd slot is refused too (v6.8 compared READONLY only and
        # took it as a FLAGS_ONLY change; the release of the change is not identified, and
        # the model's VMs have guest_memfd slots only from v6.18)
        if uaddr != old.userspace_addr or npages != old.npages \
                or (mem.flags ^ old.flags) & (KVM_MEM_READONLY | KVM_MEM_GUEST_MEMFD):
            raise KernelError("EINVAL", CALL, "userspace_addr, size, READONLY or GUEST_MEMFD "
                              "of a slot cannot change")
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
    new = MemorySlot(id, as_id, base_gfn, npages, uaddr, mem.flags,  # type: ignore[arg-type]
                     page_shift=page_shift)
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
