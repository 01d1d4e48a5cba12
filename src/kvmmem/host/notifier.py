"""MMU notifiers: how the host mm tells secondary MMUs (KVM) that PTEs change.

Mirrors ``include/linux/mmu_notifier.h`` and ``mm/mmu_notifier.c``:

* :class:`NotifierEvent` is ``enum mmu_notifier_event`` (why the range is
  invalidated);
* :class:`MmuNotifierRange` is ``struct mmu_notifier_range`` (``start``,
  ``end`` exclusive, ``event``);
* :class:`MmuNotifier` is ``struct mmu_notifier_ops`` as a Protocol.  The
  invalidate callbacks are *operations* (generators yielding sync points), so
  a subscriber such as KVM can take its ``mmu_lock`` inside them and the
  explorer can interleave there;
* :class:`MmuNotifierSubscriptions` is ``struct mmu_notifier_subscriptions``:
  the list the mm walks (``mn_hlist_invalidate_range_start`` etc.).

Every mm operation that removes or downgrades a host PTE brackets the change
with ``invalidate_range_start`` / ``invalidate_range_end``; frames are freed
only after ``end``.  :class:`RecordingNotifier` is a ready-made subscriber
that logs every call (for tests and for the differential checker).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Protocol, cast, runtime_checkable

from kvmmem.sync import Op, point
from kvmmem.types import Hva

_START = point("mmu_notifier_start")
_END = point("mmu_notifier_end")


class NotifierEvent(Enum):
    """``enum mmu_notifier_event``: why a range is being invalidated."""

    UNMAP = "unmap"  # MMU_NOTIFY_UNMAP: munmap / MAP_FIXED replace / mremap source
    CLEAR = "clear"  # MMU_NOTIFY_CLEAR: zap (DONTNEED, truncate), COW, THP split, migration
    PROTECTION_VMA = "protection_vma"  # MMU_NOTIFY_PROTECTION_VMA: mprotect
    PROTECTION_PAGE = "protection_page"  # MMU_NOTIFY_PROTECTION_PAGE: write-protect one page
    SOFT_DIRTY = "soft_dirty"  # MMU_NOTIFY_SOFT_DIRTY: clear_refs soft-dirty
    RELEASE = "release"  # MMU_NOTIFY_RELEASE: the mm is going away
    MIGRATE = "migrate"  # MMU_NOTIFY_MIGRATE: migrate_vma (device memory)
    EXCLUSIVE = "exclusive"  # MMU_NOTIFY_EXCLUSIVE: make_device_exclusive


@dataclass(frozen=True, slots=True)
class MmuNotifierRange:
    """``struct mmu_notifier_range``: ``[start, end)`` of host virtual addresses."""

    start: Hva
    end: Hva
    event: NotifierEvent

    def __str__(self) -> str:
        return f"[{self.start:#x}, {self.end:#x}) {self.event.value}"


@runtime_checkable
class MmuNotifier(Protocol):
    """``struct mmu_notifier_ops``: what a secondary MMU implements."""

    def invalidate_range_start(self, rng: MmuNotifierRange) -> Op[None]:
        """Called before PTEs in ``rng`` are removed or downgraded."""
        ...

    def invalidate_range_end(self, rng: MmuNotifierRange) -> Op[None]:
        """Called after the change; the frames may be freed afterwards."""
        ...

    def clear_flush_young(self, start: Hva, end: Hva) -> bool:
        """Clear the accessed state (with TLB flush); True if any was young."""
        ...

    def clear_young(self, start: Hva, end: Hva) -> bool:
        """Clear the accessed state (no flush); True if any was young."""
        ...

    def test_young(self, start: Hva, end: Hva) -> bool:
        """True if any page in the range was accessed (no change)."""
        ...

    def release(self) -> None:
        """The mm is being torn down (``exit_mmap``) or the subscriber unregistered."""
        ...


class MmuNotifierSubscriptions:
    """``struct mmu_notifier_subscriptions``: the subscribers of one mm, in registration order."""

    __slots__ = ("_subs",)

    def __init__(self) -> None:
        self._subs: list[MmuNotifier] = []

    def __bool__(self) -> bool:
        return bool(self._subs)

    def __iter__(self) -> Iterator[MmuNotifier]:
        return iter(list(self._subs))

    def __len__(self) -> int:
        return len(self._subs)

    def register(self, sub: MmuNotifier) -> None:
        """``mmu_notifier_register``: add ``sub`` (raises ValueError if already there)."""
        if any(s is sub for s in self._subs):
            raise ValueError("mmu_notifier_register: already registered")
        self._subs.append(sub)

    def unregister(self, sub: MmuNotifier) -> bool:
        """Remove ``sub``; returns whether it was registered."""
        for i, s in enumerate(self._subs):
            if s is sub:
                del self._subs[i]
                return True
        return False

    def clear(self) -> list[MmuNotifier]:
        """Remove every subscriber; returns them in registration order."""
        subs, self._subs = self._subs, []
        return subs

    def invalidate_range_start(self, rng: MmuNotifierRange) -> Op[None]:
        """``mmu_notifier_invalidate_range_start``: each subscriber's start, in order.

        Yields ``point("mmu_notifier_start")`` first so another thread can run
        just before the invalidation begins."""
        yield _START
        for sub in list(self._subs):
            yield from sub.invalidate_range_start(rng)

    def invalidate_range_end(self, rng: MmuNotifierRange) -> Op[None]:
        """``mmu_notifier_invalidate_range_end``: each subscriber's end, in order."""
        for sub in list(self._subs):
            yield from sub.invalidate_range_end(rng)
        yield _END

    def clear_flush_young(self, start: Hva, end: Hva) -> bool:
        """``mmu_notifier_clear_flush_young``: OR of every subscriber's answer."""
        young = False
        for sub in list(self._subs):
            young |= sub.clear_flush_young(start, end)
        return young

    def clear_young(self, start: Hva, end: Hva) -> bool:
        """``mmu_notifier_clear_young``: OR of every subscriber's answer."""
        young = False
        for sub in list(self._subs):
            young |= sub.clear_young(start, end)
        return young

    def test_young(self, start: Hva, end: Hva) -> bool:
        """``mmu_notifier_test_young``: True as soon as one subscriber says young."""
        return any(sub.test_young(start, end) for sub in list(self._subs))


class RecordingNotifier:
    """A subscriber that records every callback as a tuple, for tests and checkers.

    ``log`` holds ``("start", start, end, event)``, ``("end", start, end,
    event)``, ``("clear_flush_young", start, end)``, ``("clear_young", start,
    end)``, ``("test_young", start, end)`` and ``("release",)``.  ``young``
    is what the aging callbacks answer."""

    def __init__(self, *, young: bool = False) -> None:
        self.log: list[tuple[object, ...]] = []
        self.young = young
        self.released = False
        self.active = 0  # invalidations between start and end

    def invalidate_range_start(self, rng: MmuNotifierRange) -> Op[None]:
        self.log.append(("start", rng.start, rng.end, rng.event))
        self.active += 1
        return
        yield  # pragma: no cover - makes this a generator

    def invalidate_range_end(self, rng: MmuNotifierRange) -> Op[None]:
        self.log.append(("end", rng.start, rng.end, rng.event))
        self.active -= 1
        return
        yield  # pragma: no cover

    def clear_flush_young(self, start: Hva, end: Hva) -> bool:
        self.log.append(("clear_flush_young", start, end))
        return self.young

    def clear_young(self, start: Hva, end: Hva) -> bool:
        self.log.append(("clear_young", start, end))
        return self.young

    def test_young(self, start: Hva, end: Hva) -> bool:
        self.log.append(("test_young", start, end))
        return self.young

    def release(self) -> None:
        self.log.append(("release",))
        self.released = True

    def starts(self) -> list[tuple[int, int, NotifierEvent]]:
        """The ``(start, end, event)`` of every invalidate_range_start, in order."""
        out: list[tuple[int, int, NotifierEvent]] = []
        for e in self.log:
            if e[0] == "start":
                out.append(cast(tuple[int, int, NotifierEvent], e[1:4]))
        return out
