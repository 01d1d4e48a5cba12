"""Synchronisation points: how one kernel code path serves many drivers.

Every kernel operation kvmmem models (an mm change with its notifier calls, a
stage-2 fault, a memslot update, a prefault) is written once, as a generator
that *yields* a :class:`Sync` at each of the kernel's real synchronisation
points: taking or dropping a lock (``mmap_lock``, ``mmu_lock``,
``slots_lock``, ...) and the named points between which another CPU may act
(``notifier_start`` done, PTE changed, sequence sampled, ...).

* A sequential run drives the generator to completion with :func:`drive`:
  nothing contends, every acquire succeeds at once.
* The explorer (``kvmmem.explore``) resumes several such generators in an
  order it chooses, blocking a thread whose ``ACQUIRE`` cannot be granted.

The generator's return value is the operation's result; a failing operation
raises from inside the generator (``KernelError``) after releasing whatever it
took, so a driver sees either a result or an error and never a half-done
change.  Yielded objects are shared constants (see :func:`acquire`), so the
sequential fast path allocates nothing per pause.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

T = TypeVar("T")


class SyncKind(Enum):
    ACQUIRE = "acquire"
    RELEASE = "release"
    POINT = "point"


@dataclass(frozen=True, slots=True)
class Sync:
    """One pause: ``kind`` of thing at lock or point ``name``.

    ``shared`` marks a read-side acquire/release (``mmap_read_lock``,
    ``read_lock(&kvm->mmu_lock)``, SRCU read side)."""

    kind: SyncKind
    name: str
    shared: bool = False
    held: int = 0
    """What the pause changes in the number of locks its thread holds: +1 for an
    acquire, -1 for a release, 0 for a point (what :func:`drive` sums)."""

    def __str__(self) -> str:
        mode = " (read)" if self.shared else ""
        return f"{self.kind.value} {self.name}{mode}"


Op = Generator[Sync, None, T]
"""A kernel operation: yields :class:`Sync` pauses, returns its result."""

_acquires: dict[tuple[str, bool], Sync] = {}
_releases: dict[tuple[str, bool], Sync] = {}
_points: dict[str, Sync] = {}
"""The shared pauses, one table per kind (keys without the enum, whose hash
is Python code)."""


def acquire(lock: str, shared: bool = False) -> Sync:
    """The pause before taking ``lock`` (write side unless ``shared``)."""
    s = _acquires.get((lock, shared))
    if s is None:
        s = _acquires[(lock, shared)] = Sync(SyncKind.ACQUIRE, lock, shared, 1)
    return s


def release(lock: str, shared: bool = False) -> Sync:
    """The pause after dropping ``lock``."""
    s = _releases.get((lock, shared))
    if s is None:
        s = _releases[(lock, shared)] = Sync(SyncKind.RELEASE, lock, shared, -1)
    return s


def point(name: str) -> Sync:
    """A named point where another CPU may act (no lock involved)."""
    s = _points.get(name)
    if s is None:
        s = _points[name] = Sync(SyncKind.POINT, name, False)
    return s


class UnbalancedLocks(AssertionError):
    """An operation finished (or failed) holding a lock it took, or released one it
    did not take: a bug in the model, never a kernel outcome."""


def drive(op: Op[T], held: int = 0) -> T:
    """Run ``op`` to completion with no other thread: the sequential driver.

    Returns what the operation returns; exceptions raised inside propagate.
    Raises :class:`UnbalancedLocks` when the operation's acquires and releases do
    not pair up (on success and on failure: a failing kernel call drops what it
    took before it returns its error).  ``held``: the locks the operation already
    took in pauses its caller consumed before handing it over."""
    try:
        while True:
            held += next(op).held
    except StopIteration as stop:
        if held:
            raise UnbalancedLocks(f"{_name(op)} returned holding {held} lock(s)") from None
        result: T = stop.value
        return result
    except UnbalancedLocks:
        raise
    except BaseException as exc:
        if held:
            raise UnbalancedLocks(f"{_name(op)} raised {type(exc).__name__} holding "
                                  f"{held} lock(s)") from exc
        raise


def _name(op: Op[T]) -> str:
    return getattr(op, "__qualname__", type(op).__name__)
