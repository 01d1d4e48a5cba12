"""Threads of kernel operations sharing a lock table: the explorer's scheduling core.

Each thread is an :data:`~kvmmem.sync.Op` generator paused at a
:class:`~kvmmem.sync.Sync` (``pending``).  :class:`Threads` says which
threads can run (:meth:`Threads.enabled`) and runs one of them from its pause
to the next (:meth:`Threads.resume`), keeping the lock table.  It knows
nothing about scenarios, invariants or the VM: :class:`~kvmmem.explore.execution.Execution`
builds scenario threads on it, and tests that interleave operations of their
own (``tests/kvm/test_state_machine.py``) use it directly.

Semantics
---------
* At an ``ACQUIRE`` pause a thread is runnable only when the lock can be
  granted (reader/writer: any number of shared holders, or one exclusive
  holder); resuming it grants the lock, then runs the code up to its next
  pause.  A ``RELEASE`` is yielded *after* the code dropped the lock, so the
  lock table drops it as soon as the pause is seen.
* ``srcu`` follows the same rules: vCPU faults hold it shared and
  ``synchronize_srcu`` is an exclusive acquire + release, which waits for the
  readers; new readers are not held back by a waiting writer (SRCU readers
  never are).
* A thread may be marked ``blocked`` on a wait key (a retrying fault whose
  cause persists, see :mod:`kvmmem.explore.execution`): it is not runnable
  while the key it waits on is the current one, unless no other thread can
  run.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from kvmmem.sync import Sync, SyncKind, point

START = point("start")
"""The pause of a thread whose operation has not started yet."""


class LockTable:
    """Reader/writer locks by name: ``owner`` (exclusive holder) and ``readers``
    (shared holders with their nesting counts), in grant order."""

    __slots__ = ("owner", "readers")

    def __init__(self) -> None:
        self.owner: dict[str, int] = {}
        self.readers: dict[str, dict[int, int]] = {}

    def can_grant(self, sync: Sync) -> bool:
        """Whether the ``ACQUIRE`` pause ``sync`` could take its lock now."""
        if sync.name in self.owner:
            return False
        return sync.shared or not self.readers.get(sync.name)

    def grant(self, sync: Sync, tid: int) -> None:
        """Take the lock of ``sync`` for thread ``tid`` (caller checked :meth:`can_grant`)."""
        if sync.shared:
            holders = self.readers.setdefault(sync.name, {})
            holders[tid] = holders.get(tid, 0) + 1
        else:
            self.owner[sync.name] = tid

    def release(self, sync: Sync, tid: int) -> str | None:
        """Drop the lock of the ``RELEASE`` pause ``sync``; returns an error
        text when ``tid`` did not hold it that way, else None."""
        if sync.shared:
            holders = self.readers.get(sync.name)
            if not holders or tid not in holders:
                return f"released {sync.name} (read) without holding it"
            holders[tid] -= 1
            if not holders[tid]:
                del holders[tid]
                if not holders:
                    del self.readers[sync.name]
            return None
        if self.owner.get(sync.name) != tid:
            return f"released {sync.name} without holding it"
        del self.owner[sync.name]
        return None

    def holds(self, tid: int, name: str, shared: bool = False) -> bool:
        """Whether thread ``tid`` holds lock ``name`` exclusively (or, with
        ``shared``, on the shared side)."""
        if shared:
            return tid in self.readers.get(name, {})
        return self.owner.get(name) == tid

    def held_by(self, tid: int) -> list[str]:
        """The locks thread ``tid`` holds, as ``name`` or ``name (read)``."""
        out = [name for name, owner in self.owner.items() if owner == tid]
        out += [f"{name} (read)" for name, holders in self.readers.items() if tid in holders]
        return out

    def canonical(self) -> tuple[Any, ...]:
        """A hashable, order-independent view (for fingerprints)."""
        return (tuple(sorted(self.owner.items())),
                tuple(sorted((n, tuple(sorted(h.items()))) for n, h in self.readers.items())))


@dataclass(frozen=True, slots=True)
class LockOp:
    """A lock taken (``acquire``) or dropped by a transition."""

    name: str
    shared: bool
    acquire: bool


class LockProtocolError(Exception):
    """An operation released a lock it did not hold (a model bug)."""


@dataclass(slots=True)
class OpThread:
    """One thread: its operation and where it is paused."""

    name: str
    gen: Generator[Sync, None, Any]
    pending: Sync | None = START
    """The pause the thread sits at; None once it finished."""
    blocked: tuple[Any, ...] | None = None
    """The wait key it spins on (see the module docstring), or None."""
    result: Any = None
    """What the operation returned, once finished."""

    @property
    def done(self) -> bool:
        """The operation ran to its end (or raised)."""
        return self.pending is None


class Threads:
    """Threads over one lock table (see the module docstring)."""

    def __init__(self) -> None:
        self.locks = LockTable()
        self.threads: list[OpThread] = []

    def add(self, name: str, gen: Generator[Sync, None, Any], pending: Sync = START) -> int:
        """Add a thread paused at ``pending`` (:data:`START`: not started; else
        the pause its caller already ran it to); returns its number."""
        self.threads.append(OpThread(name, gen, pending))
        return len(self.threads) - 1

    @property
    def finished(self) -> bool:
        """Every thread ran to its end."""
        return all(t.pending is None for t in self.threads)

    def enabled(self, wait_key: Callable[[], tuple[Any, ...]] | None = None) -> list[int]:
        """The threads that can run now, in thread order.  ``wait_key``: the
        current wait key (asked only when some thread is ``blocked``)."""
        can: list[int] = []
        spinning: list[int] = []
        key: tuple[Any, ...] | None = None
        for tid, th in enumerate(self.threads):
            sync = th.pending
            if sync is None:
                continue
            if sync.kind is SyncKind.ACQUIRE and not self.locks.can_grant(sync):
                continue
            if th.blocked is not None and wait_key is not None:
                if key is None:
                    key = wait_key()
                if th.blocked == key:
                    spinning.append(tid)
                    continue
            can.append(tid)
        return can or spinning

    def resume(self, tid: int, ops: list[LockOp]) -> Sync | None:
        """Run thread ``tid`` (enabled) from its pause to the next: grant the
        lock it waits for, resume its operation, drop the lock of a
        ``RELEASE`` pause it stops at.  Appends the lock operations to
        ``ops``; returns the new pause (None: finished, ``result`` set).
        Exceptions of the operation propagate (the thread is then finished);
        :class:`LockProtocolError` when it released a lock it did not hold."""
        th = self.threads[tid]
        sync = th.pending
        assert sync is not None
        if sync.kind is SyncKind.ACQUIRE:
            self.locks.grant(sync, tid)
            ops.append(LockOp(sync.name, sync.shared, True))
        th.blocked = None
        try:
            nxt: Sync | None = th.gen.send(None)
        except StopIteration as stop:
            th.pending = None
            th.result = stop.value
            return None
        except BaseException:
            th.pending = None
            raise
        th.pending = nxt
        if nxt is not None and nxt.kind is SyncKind.RELEASE:
            ops.append(LockOp(nxt.name, nxt.shared, False))
            error = self.locks.release(nxt, tid)
            if error is not None:
                raise LockProtocolError(f"{th.name}: {error}")
        return nxt

    def describe_waits(self) -> str:
        """Where every unfinished thread waits and what it holds (a deadlock)."""
        waiting = []
        for tid, th in enumerate(self.threads):
            if th.pending is None:
                continue
            held = ", ".join(self.locks.held_by(tid)) or "nothing"
            waiting.append(f"{th.name} waits at '{th.pending}' holding {held}")
        return "; ".join(waiting)
