"""One execution: a scenario's threads interleaved at their real synchronisation points.

This is the *execution* part of the explorer (STYLE.md, loom/shuttle: the
execution, the scheduler, the runner).  :class:`Execution` builds a fresh
:class:`~kvmmem.scenario.runner.Runner`, makes the ``memory`` mappings and
the top-level ``memslots`` sequentially (exactly as ``kvmmem run`` does),
then turns every scenario thread into a generator that runs
``runner.step_op(step)`` for its steps in order - the same kernel code the
sequential runner drives, paused wherever it yields a :class:`~kvmmem.sync.Sync`
(DESIGN.md, "One code path, many drivers").  Each thread also pauses before
each of its steps, so a vCPU whose access hits in its TLB (no pause inside)
still interleaves between two accesses.

Scheduling semantics
--------------------
* Threads, locks and who can run are :mod:`kvmmem.explore.threads`'s
  (reader/writer locks, ``srcu`` readers never held back by a waiting writer).
* A vCPU whose fault was answered ``RETRY`` publishes what it waits on
  (``Vcpu.fault_wait``, a :class:`~kvmmem.kvm.mmu_notifier.FaultWait`); while
  that still holds (an invalidation in progress covering the gfn, a memslot
  being deleted) it would only spin: it is not runnable until the invalidation
  sequence, count, range or a memslot set changes, unless no other thread can
  run.  Retries caused by a sequence change that is already over are ordinary
  transitions.
* A transition is one thread's run from one pause to the next; after every
  transition the invariants are checked (:meth:`Execution.check`).  No
  runnable thread while some are unfinished is a ``deadlock`` violation; an
  unexpected exception inside the model a ``model-exception`` one.

Checks while an operation is half done
--------------------------------------
``validate_vm`` is meant for states between complete steps; checking after
every transition also sees windows the kernel itself has and that are not
bugs, which :meth:`Execution.check` exempts by validating a copy of the VM
in which the window is closed.  The explorer does not work them out from
step types: the model publishes each while it is open, and
:meth:`Execution._windows` reads them.

* A memslot update in flight (``VmMemslots.update_in_flight``, from the
  validation in ``kvm_set_memory_region`` to its end): stage-2 entries
  premapped by ``kvm_arch_prepare_memory_region`` (linux-5.4) before the new
  slot is published have no memslot yet; and dirty logging counts from the
  end of the ioctl that enables it, not from the swap (the write-protection
  comes in the commit hook, after the swap).
* A guest write fault between installing its writable entry and marking the
  page dirty (``Vcpu.unmarked_dirty``: arm64's ``user_mem_abort`` marks it
  after dropping ``mmu_lock``).
* An address-space change holding ``mmap_lock`` (``MmStruct.changes_in_flight``:
  munmap, mmap over a range, mprotect, madvise, mremap): its VMAs may
  already say what its PTEs only say after the invalidation; the entries are
  checked again once it is done.
"""

from __future__ import annotations

import copy
import copyreg
import hashlib
import io
import pickle
from collections import OrderedDict
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from kvmmem.errors import InputError, ValidationError
from kvmmem.kvm.invariants import validate_path_independence, validate_vm
from kvmmem.kvm.memslot import KVM_MEM_LOG_DIRTY_PAGES
from kvmmem.scenario.model import (
    MEMSLOT_FLAGS,
    STEP_TYPES,
    GuestAccess,
    GuestExec,
    GuestRead,
    GuestWrite,
    Prefault,
    Scenario,
    Step,
    prot_letters,
)
from kvmmem.scenario.runner import Runner, expectation_holds
from kvmmem.sync import Sync, SyncKind, acquire, point
from kvmmem.types import EXEC_FETCH_SIZE, PageGeometry, page_geometry

from .fingerprint import Canon, StatePickler
from .footprint import FRAME_FIELDS, Footprint, Key, Tracker, View
from .threads import LockOp, LockProtocolError, OpThread, Threads

EXPECTATION = "expectation"
"""The name a failed step expectation is reported under (not an invariant:
``kvmmem explore`` exits 1 for it, as ``run`` does)."""

STEP_BEGIN = point("step")
"""The pause every thread makes before each of its steps."""

_SRCU_READ_LOCK = acquire("srcu", shared=True)
_MMU_LOCK = "mmu_lock"
_MMAP_LOCK = "mmap_lock"

# --- what the failing execution shows ----------------------------------------------


@dataclass(slots=True)
class TraceEvent:
    """One transition of the failing execution: its number (1-based), thread and text lines."""

    number: int
    thread: int
    lines: list[str]


@dataclass(slots=True)
class Violation:
    """An invariant that broke: ``after`` is the number of the transition after
    which it was seen (0: in the setup), ``thread`` who ran it (None for the
    end-of-run checks and deadlocks)."""

    invariant: str
    detail: str
    after: int
    thread: int | None
    state: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The SCENARIOS.md ``violations`` entry (``step``: the transition number)."""
        return {"invariant": self.invariant, "step": self.after, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class Observation:
    """A state as the search sees it: its page-keyed :class:`~kvmmem.explore.footprint.View`,
    the digest of the rest of the host and VM (``glob``), of all of the host and VM
    (``data``) and of everything, threads and locks included (``full``)."""

    view: View
    glob: bytes
    data: bytes
    full: bytes
    windows: Windows | None


# --- threads -----------------------------------------------------------------------------


def _thread_body(runner: Runner, steps: tuple[Step, ...], tid: int,
                 sink: Callable[[int, Step, dict[str, Any]], None]) -> Generator[Sync, None, None]:
    """A scenario thread: pause before each step, run it, hand its outcome to ``sink``."""
    for step in steps:
        yield STEP_BEGIN
        sink(tid, step, (yield from runner.step_op(step)))


@dataclass(slots=True)
class ThreadState(OpThread):
    """One scenario thread inside an execution: an :class:`OpThread` running
    its steps one after the other."""

    steps: tuple[Step, ...] = ()
    step: int = -1
    """Index of the step it is in (-1 before the first)."""

    def current(self) -> Step | None:
        """The step the thread is inside (None before its first or when done)."""
        if self.pending is None or self.pending is STEP_BEGIN or self.step < 0:
            return None
        return self.steps[self.step]


class Execution:
    """A fresh model with the scenario's setup done and its threads at their
    first pause.  ``trace`` records a :class:`TraceEvent` per transition and
    the VM's tracepoints (for the printed counterexample)."""

    def __init__(self, scenario: Scenario, arch: str, variant: str, *, trace: bool = False,
                 opaque: dict[int, int] | None = None) -> None:
        if scenario.threads is None:
            raise InputError(f"{scenario.source}: {scenario.name} has steps, not threads: "
                             "run it with `kvmmem run`")
        self.scenario = scenario
        runner, setup = _set_up(scenario, arch, variant, trace)
        self.runner = runner
        self.vm = runner.vm
        self.setup: list[dict[str, Any]] = setup
        self.sched = Threads()
        self.locks = self.sched.locks
        self.threads: list[ThreadState] = []
        for tid, (name, steps) in enumerate(scenario.threads.items()):
            gen = _thread_body(runner, steps, tid, self._record)
            next(gen)  # to the pause before its first step (nothing runs before it)
            self.threads.append(ThreadState(name, gen, STEP_BEGIN, steps=steps))
        self.sched.threads = self.threads  # type: ignore[assignment]
        self.outcomes: list[list[dict[str, Any]]] = [[] for _ in self.threads]
        self.trace: list[TraceEvent] | None = [] if trace else None
        self.transitions = 0
        self.last: int | None = None
        """The thread that ran the latest transition."""
        self.violation: Violation | None = None
        self.notes: list[str] = []
        """What the end-of-run check observed that is not a violation."""
        self._opaque = opaque if opaque is not None else opaque_objects(scenario)
        self._opaque_self = dict(self._opaque)
        self._opaque_self[id(self)] = len(self._opaque)
        self._done_steps: list[tuple[Step, dict[str, Any]]] = []
        self.tracker = Tracker(self.vm)
        self._pickler = _state_pickler(type(self), self.vm, self.tracker.frames_keyed)
        self._observed: Observation | None = None
        self._observed_at = -1
        self._checked: tuple[int, Observation, Windows | None] | None = None
        """(transitions, observation, windows) of the last state that passed the checks."""
        try:
            validate_vm(self.vm)
        except ValidationError as err:
            self.violation = Violation(err.invariant, err.detail, 0, None, self.state_lines())

    # --- scheduling ------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """Every thread ran all its steps."""
        return self.sched.finished

    def enabled(self) -> list[int]:
        """The threads that can run now, in thread order (see :mod:`.threads`;
        a retrying fault waits on :meth:`retry_key`)."""
        return self.sched.enabled(self.retry_key)

    def step(self, tid: int) -> Footprint | None:
        """Run one transition of thread ``tid`` (which must be enabled).

        Returns the lock part of its footprint (the rest is filled by the
        caller, who observes states: :meth:`observe`, :meth:`reads`) or None
        when it broke something: then :attr:`violation` says what."""
        th = self.threads[tid]
        sync = th.pending
        assert sync is not None
        self.transitions += 1
        self.last = tid
        ops: list[LockOp] = []
        lines: list[str] | None = [] if self.trace is not None else None
        if sync is STEP_BEGIN:
            th.step += 1
            if lines is not None:
                lines.append(describe_step(th.steps[th.step]))
        elif lines is not None and sync.kind is SyncKind.ACQUIRE:
            lines.append(f"got {sync.name}{' (read)' if sync.shared else ''}")
        log = self.vm.log
        mark = 0
        if log is not None:
            log.thread = th.name
            mark = len(log.events)
        self._done_steps.clear()
        failed: Violation | None = None
        nxt: Sync | None = None
        try:
            nxt = self.sched.resume(tid, ops)
        except LockProtocolError as err:
            nxt = th.pending
            failed = Violation("lock-protocol", str(err), self.transitions, tid)
        except ValidationError as err:
            failed = Violation(err.invariant, err.detail, self.transitions, tid)
        except InputError:
            raise
        except Exception as exc:  # a model bug that this interleaving exposes
            failed = Violation("model-exception", f"{type(exc).__name__}: {exc}",
                               self.transitions, tid)
        if failed is None:
            for step, outcome in self._done_steps:
                if not expectation_holds(step.expect, outcome):
                    failed = Violation(EXPECTATION, f"{th.name} step {step.index} ({step.op}): "
                                       f"expected {step.expect}, got {outcome}",
                                       self.transitions, tid)
                    break
        if nxt is _SRCU_READ_LOCK and self._would_retry_again(th):
            th.blocked = self.retry_key()
        if lines is not None and self.trace is not None:
            if log is not None:
                lines.extend(e.format() for e in log.events[mark:])
            for step, outcome in self._done_steps:
                lines.append(f"= {step.op}: {describe_outcome(outcome)}")
            if failed is not None:
                lines.append(f"!! {failed.invariant}")
            elif nxt is not None and nxt is not STEP_BEGIN:
                lines.append(describe_pause(nxt))
            self.trace.append(TraceEvent(self.transitions, tid, lines))
        if failed is not None:
            failed.state = self.state_lines()
            self.violation = failed
            return None
        return Footprint(frozenset(), False, None, tuple(ops))

    def _record(self, tid: int, step: Step, outcome: dict[str, Any]) -> None:
        out = {"step": step.index, "op": step.op, **outcome}
        self.outcomes[tid].append(out)
        self._done_steps.append((step, out))

    # --- in-flight state: what a retrying fault waits on ---------------------------------

    def retry_key(self) -> tuple[Any, ...]:
        """What a retrying fault waits on: the invalidation sequence, count and
        range, and each address space's active memslot set and generation."""
        vm = self.vm
        slots = vm.memslots
        sets = tuple((slots.memslots(a).node_idx, slots.generation(a))
                     for a in range(slots.limits.nr_as_ids))
        return (vm.mmu_invalidate_in_progress, vm.mmu_invalidate_seq,
                vm.mmu_invalidate_range_start, vm.mmu_invalidate_range_end, sets)

    def _would_retry_again(self, th: ThreadState) -> bool:
        """Whether the thread's vCPU published a fault wait (it was answered RETRY)
        that still holds now, so re-running the fault can only spin."""
        step = th.current()
        if not isinstance(step, GuestAccess):
            return False
        wait = self.vm.vcpus[step.vcpu].fault_wait
        return wait is not None and wait.holds(self.vm)

    # --- checks ------------------------------------------------------------------------

    cross_check = False
    """Tests: after every incremental check also run the full one, and raise
    AssertionError if they disagree."""

    def check(self) -> bool:
        """The per-step invariants on the current state; False (and
        :attr:`violation` set) when one breaks.

        Incremental where the change is local: when the state before this
        transition passed, nothing but page keys changed (no global write, see
        :mod:`kvmmem.explore.footprint`) and the exempt windows are the same,
        only the pages whose stage-2 leaf, TLB entries or host PTE changed are
        checked - the invariants of a page read nothing else that is not global
        (frames only name themselves in the messages).  Otherwise, and for the
        windows, everything is."""
        windows = self._windows()
        gfns = self._changed_pages(windows)
        first = self._validate(gfns, windows)
        if self.cross_check and gfns is not None:
            full = self._validate(None, windows)
            said = None if first is None else (first.invariant, first.detail)
            if said != (None if full is None else (full.invariant, full.detail)):
                raise AssertionError(f"incremental check of {sorted(gfns)} says {said}, "
                                     f"the full check {full}")
        if first is None:
            self._checked = (self.transitions, self.observe(), windows)
            return True
        self.violation = Violation(first.invariant, first.detail, self.transitions, self.last,
                                   self.state_lines())
        return False

    def _validate(self, gfns: set[int] | None, windows: Windows | None
                  ) -> ValidationError | None:
        """What :func:`validate_vm` (of ``gfns``) finds, looked at again with the
        exempt windows closed."""
        first = _validate(self.vm, gfns)
        if first is not None and windows is not None:
            first = _validate(_close_windows(self.vm, windows), None)
        return first

    def _changed_pages(self, windows: Windows | None) -> set[int] | None:
        """The pages an incremental check must look at, or None for all (see :meth:`check`)."""
        prev = self._checked
        if prev is None or prev[0] != self.transitions - 1 or prev[2] != windows:
            return None
        before = prev[1]
        obs = self.observe()
        if obs.glob != before.glob:
            return None
        keys, glob = self.tracker.writes(before.view, obs.view)
        if glob:
            return None
        gfns: set[int] = set()
        slots = self.vm.memslots
        shift = self.vm.pg.page_shift
        for kind, n in keys:
            if kind == "g":
                gfns.add(n)
            elif kind == "h":
                hva = n << shift
                for slot in slots.slots_for_hva_range(hva, hva + (1 << shift)):
                    gfns.add(slot.base_gfn + ((hva - slot.userspace_addr) >> shift))
        return gfns

    def checked_before(self, obs: Observation) -> None:
        """The state before the next transition is ``obs`` and passed the checks
        (a search replaying a known prefix says so: the next check may be
        incremental)."""
        self._observed, self._observed_at = obs, self.transitions
        self._checked = (self.transitions, obs, obs.windows)

    def check_end(self) -> bool:
        """The end-of-run invariant (path independence); False on a violation.
        Its observations that are not violations go to :attr:`notes`."""
        try:
            self.notes = validate_path_independence(self.vm)
            return True
        except ValidationError as err:
            self.violation = Violation(err.invariant, err.detail, self.transitions, None,
                                       self.state_lines())
            return False

    def deadlock(self) -> None:
        """Record a deadlock: nothing can run but some threads are unfinished."""
        self.violation = Violation("deadlock", self.sched.describe_waits(), self.transitions,
                                   None, self.state_lines())

    def _windows(self) -> Windows | None:
        """The exempt windows open now, as the model publishes them (see the
        module docstring), or None."""
        vm = self.vm
        w = Windows()
        update = vm.memslots.update_in_flight
        if update is not None:
            new, old = update.new, update.old
            if new is not None:
                span = (int(new.base_gfn), int(new.base_gfn) + new.npages)
                w.premap.append(span)
                if new.flags & KVM_MEM_LOG_DIRTY_PAGES:
                    w.logging.append(span)
            if old is not None:
                w.logging.append((int(old.base_gfn), int(old.base_gfn) + old.npages))
        for vcpu in vm.vcpus:
            if vcpu.unmarked_dirty is not None:
                w.dirty.append((vcpu.unmarked_dirty, vcpu.unmarked_dirty + 1))
        w.mm_change.extend(vm.mm.changes_in_flight)
        return w if w else None

    # --- fingerprints --------------------------------------------------------------------

    def fingerprint(self) -> tuple[bytes, bytes]:
        """``(data, full)`` digests of the current state: ``data`` covers the
        host and the VM (the shared data), ``full`` adds the lock table and
        every thread (where it is paused, its locals, its retry wait)."""
        obs = self.observe()
        return obs.data, obs.full

    def observe(self, near: View | None = None) -> Observation:
        """The current state's :class:`Observation` (computed once per state).
        ``near``: the view of a state close to this one (the digests of the
        parts they share are reused), when this execution observed none yet."""
        if self._observed is not None and self._observed_at == self.transitions:
            return self._observed
        prev = self._observed.view if self._observed is not None else near
        view = self.tracker.view(prev)
        rest = (self.locks.canonical(),
                tuple((th.step, str(th.pending), th.blocked,
                       th.gen if th.pending is not None else None) for th in self.threads))
        try:
            glob, everything = self._pickler.digests((self.runner,), rest)
        except Exception:  # an object pickle cannot encode: the slower generic walk
            canon = Canon(self._opaque_self)
            canon.walk(self.runner)
            data_end = canon.mark()
            canon.walk(rest)
            glob, everything = canon.digest(0, data_end), canon.digest()
        vd = view.digest()
        obs = Observation(view, glob, _hash(glob, vd), _hash(everything, vd), self._windows())
        self._observed = obs
        self._observed_at = self.transitions
        return obs

    def reads(self, tid: int) -> frozenset[Key] | None:
        """What the next transition of thread ``tid`` reads, as page keys (None:
        anything; see :mod:`kvmmem.explore.footprint`): a guest access or a
        prefault reads its pages, every other step anything."""
        th = self.threads[tid]
        if th.pending is None:
            return None
        index = th.step + 1 if th.pending is STEP_BEGIN else th.step
        if not 0 <= index < len(th.steps):
            return None
        step = th.steps[index]
        if isinstance(step, GuestRead | GuestWrite):
            return self.tracker.scope(step.gpa, step.size)
        if isinstance(step, GuestExec):
            return self.tracker.scope(step.gpa, EXEC_FETCH_SIZE)
        if isinstance(step, Prefault):
            return self.tracker.scope(step.gpa, step.size)
        return None

    # --- reporting -----------------------------------------------------------------------

    def state_lines(self) -> list[str]:
        """The state a violation is seen in, for people: memslots, stage-2
        leaves, TLB entries, the host page table over every slot, the
        invalidation state, locks and where each thread is."""
        vm = self.vm
        mm = vm.mm
        out: list[str] = []
        for slot in vm.memslots.all_slots():
            flags = [n for n, bit in MEMSLOT_FLAGS.items() if slot.flags & bit]
            if slot.invalid:
                flags.append("INVALID")
            shift = slot.page_shift
            out.append(f"memslot {slot.id}: gpa {slot.base_gfn << shift:#x}+"
                       f"{slot.npages << shift:#x} -> hva {slot.userspace_addr:#x}"
                       + (f" [{', '.join(flags)}]" if flags else ""))
            for i in range(min(slot.npages, 16)):
                hva = slot.userspace_addr + (i << shift)
                pte = mm.host_pte(hva)
                text = "none" if pte is None else \
                    f"pfn {pte.pfn:#x}{' w' if pte.writable else ' ro'}"
                out.append(f"  host pte hva {hva:#x}: {text}")
        leaves = list(vm.stage2.for_each_leaf())
        if not leaves:
            out.append("stage-2: empty")
        for leaf in leaves:
            perm = ("r" + ("w" if leaf.perm.write else "-") + ("x" if leaf.perm.execute else "-"))
            kind = "device" if leaf.device else "normal"
            out.append(f"stage-2: gpa {leaf.gpa:#x} -> pfn {leaf.pfn:#x} {perm} "
                       f"{leaf.size // 1024}K {kind}")
        for vcpu in vm.vcpus:
            for gfn, entry in vcpu.tlb.items():
                out.append(f"vcpu{vcpu.index} TLB: gfn {gfn:#x} -> pfn {entry.pfn:#x}"
                           f"{' w' if entry.writable else ''}")
        rng = ""
        if vm.mmu_invalidate_in_progress and vm.mmu_invalidate_range_start >= 0:
            rng = (f" range [{vm.mmu_invalidate_range_start:#x}, "
                   f"{vm.mmu_invalidate_range_end:#x})")
        out.append(f"mmu_invalidate_seq {vm.mmu_invalidate_seq}, in_progress "
                   f"{vm.mmu_invalidate_in_progress}{rng}")
        for tid, th in enumerate(self.threads):
            held = self.locks.held_by(tid)
            where = "done" if th.pending is None else \
                f"step {th.step} at '{th.pending}'" if th.step >= 0 else "not started"
            out.append(f"thread {th.name}: {where}"
                       + (f", holds {', '.join(held)}" if held else ""))
        return out


_SETUPS: OrderedDict[tuple[int, str, str], tuple[Scenario, bytes, list[dict[str, Any]]]] = \
    OrderedDict()
_SETUPS_KEPT = 8


def _set_up(scenario: Scenario, arch: str, variant: str,
            trace: bool) -> tuple[Runner, list[dict[str, Any]]]:
    """A runner with the scenario's ``memory`` mapped and its ``memslots`` made,
    and the outcomes of those memslot steps.  The model is deterministic, so
    after the first time (per scenario, architecture and variant, in this
    process) the result is a copy of a pickle of the first one: three times
    cheaper than doing the setup again.  A traced runner is always made anew
    (its event log starts empty)."""
    key = (id(scenario), arch, variant)
    hit = None if trace else _SETUPS.get(key)
    if hit is not None and hit[0] is scenario:
        _SETUPS.move_to_end(key)
        runner: Runner = pickle.loads(hit[1])
        return runner, [dict(out) for out in hit[2]]
    runner = Runner(scenario, arch, variant, trace=trace)
    runner.make_memory()
    setup = [{"step": slot.index, "op": "set_memslot", **runner.do(slot)}
             for slot in scenario.memslots]
    if not trace:
        try:
            blob = _dumps(runner)
        except (pickle.PicklingError, TypeError, AttributeError):  # pragma: no cover
            return runner, setup
        _SETUPS[key] = (scenario, blob, [dict(out) for out in setup])
        while len(_SETUPS) > _SETUPS_KEPT:
            _SETUPS.popitem(last=False)
    return runner, setup


_PICKLERS: dict[tuple[Any, ...], StatePickler] = {}


def _state_pickler(execution: type, vm: Any, frames_keyed: bool) -> StatePickler:
    """The :class:`StatePickler` for executions of this kind (cached): the
    scenario, its steps and the execution are opaque; the VM, the mm and the
    memslots lose their counters, logs and in-flight bookkeeping; what the
    page-keyed :class:`~kvmmem.explore.footprint.View` holds is left out (the
    stage-2 table, the host page table, the vCPUs' TLBs and, when keyed, the
    frames), so that the digest tells whether anything *else* changed."""
    skipping = (type(vm), type(vm.mm), type(vm.memslots))
    key = (execution, *skipping, type(vm.stage2), type(vm.mm.pt), type(vm.mm.physmem),
           type(vm.vcpus[0]) if vm.vcpus else None, frames_keyed)
    pickler = _PICKLERS.get(key)
    if pickler is None:
        # the variant and the memslot limits are fixed for the VM's life (and the
        # same in every execution of a search): their names stand for them
        opaque: dict[type, Any] = {Scenario: lambda s: "scenario", execution: lambda e: "execution",
                                   type(vm.stage2): lambda s: "stage2",
                                   type(vm.mm.pt): lambda p: "pt",
                                   type(vm.variant): lambda v: ("variant", v.name),
                                   type(vm.memslots.limits): lambda m: "limits",
                                   PageGeometry: lambda g: ("pg", g.name)}
        for cls in STEP_TYPES.values():
            opaque[cls] = lambda st: (st.thread, st.index, st.op)
        leave_out: dict[type, frozenset[str]] = {}
        if vm.vcpus:
            leave_out[type(vm.vcpus[0])] = frozenset({"tlb"})
        if frames_keyed:
            leave_out[type(vm.mm.physmem)] = FRAME_FIELDS
        pickler = _PICKLERS[key] = StatePickler(opaque, skipping, leave_out)
    return pickler


def _hash(a: bytes, b: bytes) -> bytes:
    return hashlib.blake2b(a + b, digest_size=16).digest()


def opaque_objects(scenario: Scenario) -> dict[int, int]:
    """The scenario, its steps and mappings (constant for every execution):
    encoded by number in fingerprints."""
    objs: list[object] = [scenario, *scenario.memory.values(), *scenario.memslots]
    for steps in (scenario.threads or {}).values():
        objs.append(steps)
        objs.extend(steps)
    return {id(o): i for i, o in enumerate(objs)}


@dataclass(slots=True)
class Windows:
    """Exempt windows open in a state: gfn ranges of memslot updates in flight
    (``premap``: entries no slot covers yet; ``logging``: slots whose dirty
    logging is being switched), of guest writes between install and
    mark_page_dirty (``dirty``), and host ranges of mm changes in flight
    (``mm_change``: an operation holding mmap_lock works on them)."""

    premap: list[tuple[int, int]] = field(default_factory=list)
    logging: list[tuple[int, int]] = field(default_factory=list)
    dirty: list[tuple[int, int]] = field(default_factory=list)
    mm_change: list[tuple[int, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.premap or self.logging or self.dirty or self.mm_change)


def _validate(vm: Any, gfns: set[int] | None) -> ValidationError | None:
    try:
        validate_vm(vm, gfns)
    except ValidationError as err:
        return err
    return None


def _copy_vm(vm: Any) -> Any:
    """An independent copy of ``vm`` (and its host): a pickle round trip, about
    ten times faster than ``copy.deepcopy`` on the model's object graph."""
    try:
        return pickle.loads(_dumps(vm))
    except (pickle.PicklingError, TypeError, AttributeError):  # pragma: no cover
        return copy.deepcopy(vm)


_COPY_TABLE: dict[type, Any] = {
    PageGeometry: lambda g: (page_geometry, (g.page_size,)),
}
"""What a copy shares with the original: the page geometry (one instance per page
size, as ``copy.deepcopy`` keeps it)."""


def _dumps(obj: object) -> bytes:
    """``pickle.dumps`` for copies of the model (see :data:`_COPY_TABLE`)."""
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = {**copyreg.dispatch_table, **_COPY_TABLE}
    pickler.dump(obj)
    return buf.getvalue()


def _close_windows(vm: Any, w: Windows) -> Any:
    """A copy of ``vm`` with the exempt windows closed: no stage-2 or TLB entry
    for a gfn of an in-flight memslot update that no slot covers yet, nor for
    a gfn whose host address an mm change in flight works on (its VMAs may
    already say what its PTEs will only say after the invalidation; the
    entries are checked again once it drops mmap_lock); every page of a slot
    whose logging is being switched, and of a guest write between install and
    mark_page_dirty, marked dirty (in the bitmap, or in ring mode as pushed)."""
    clone = _copy_vm(vm)

    def drop(start: int, end: int) -> None:
        clone.zap_gfn_range(start, end)
        for vcpu in clone.vcpus:
            vcpu.tlb_flush_gfn_range(start, end)

    for start, end in w.premap:
        for gfn in range(start, end):
            if clone.memslots.gfn_to_memslot(gfn) is None:
                drop(gfn, gfn + 1)
    for hva_start, hva_end in w.mm_change:
        if hva_end > hva_start:
            for _slot, start, end in clone.gfn_ranges_for_hva(hva_start, hva_end):
                drop(start, end)
    ring = clone.vcpus[0].dirty_ring if clone.dirty_ring_size else None
    for start, end in w.logging + w.dirty:
        for gfn in range(start, end):
            slot = clone.memslots.gfn_to_memslot(gfn)
            if slot is None:
                continue
            if slot.dirty_bitmap is not None:
                slot.dirty_bitmap[gfn - slot.base_gfn] = True
            elif ring is not None:  # ring mode: as if pushed (kvm_dirty_ring_push)
                ring.pushed[(slot.as_id << 16 | slot.id, gfn - slot.base_gfn)] = 1
    return clone


# --- text for traces ---------------------------------------------------------------------


def describe_step(step: Step) -> str:
    """A step as one line: ``guest_read gpa=0x0 size=0x4`` (its own keys,
    :meth:`~kvmmem.scenario.model.Step.args`, without those left at nothing,
    no, or a zero vCPU/offset)."""
    parts = [step.op]
    for name, value in step.args().items():
        if value is None or value is False or value == () \
                or (name in ("vcpu", "offset") and value == 0):
            continue
        if name == "prot" and isinstance(value, int):
            value = prot_letters(value)
        elif isinstance(value, int) and not isinstance(value, bool) and name != "slot":
            value = hex(value)
        elif isinstance(value, tuple):
            value = ",".join(str(v) for v in value)
        parts.append(f"{name}={value}")
    return " ".join(parts)


def describe_outcome(outcome: dict[str, Any]) -> str:
    """An outcome as one line: ``ok value=0x5a5a5a5a``."""
    parts = [str(outcome.get("result"))]
    for key, value in outcome.items():
        if key in ("step", "op", "result"):
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            value = hex(value)
        parts.append(f"{key}={value}")
    return " ".join(parts)


def describe_pause(sync: Sync) -> str:
    """The pause a thread stopped at, for the trace."""
    if sync.kind is SyncKind.ACQUIRE:
        return f"wants {sync.name}{' (read)' if sync.shared else ''}"
    if sync.kind is SyncKind.RELEASE:
        return f"dropped {sync.name}{' (read)' if sync.shared else ''}"
    return f"at {sync.name}"

