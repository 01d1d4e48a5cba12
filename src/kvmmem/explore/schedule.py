"""The one loop that runs an execution under a schedule, and what is counted with it.

Every way the explorer runs a schedule - the systematic search (dfs, dpor),
sampling (random, pct), a replay token, the determinism check and the
estimate of a dfs search - is :func:`run_execution` with a different
:class:`Chooser`: the loop owns the order of things (the state is visited,
the end or a deadlock recognised, a thread chosen, the transition run and the
invariants checked, preemptions and the choice points recorded), the chooser
only picks the next thread and hears what happened (STYLE.md, loom/shuttle:
the scheduler only picks).
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable
from dataclasses import dataclass, field

from kvmmem.errors import InputError
from kvmmem.scenario.model import Scenario

from .execution import Execution, opaque_objects
from .footprint import Footprint


@dataclass(slots=True)
class Run:
    """One execution's schedule as it runs: the thread of every transition,
    the ``choices`` (where more than one thread could run), the preemptions
    used (``preemptions``; ``before_last``: before the latest transition) and
    how it ended (``end``: ``finished``; ``end-check`` when the end-of-run
    check failed; ``transition`` when a transition broke something;
    ``deadlock``; ``pruned`` when the chooser stopped it)."""

    schedule: list[int] = field(default_factory=list)
    choices: list[int] = field(default_factory=list)
    preemptions: int = 0
    before_last: int = 0
    end: str = ""


class Chooser:
    """What :func:`run_execution` asks at every state (the default: run the
    first enabled thread, check everything, note nothing)."""

    verify = True
    """Check the invariants after the transition just chosen (a systematic
    search replaying a known prefix does not)."""

    def visit(self, ex: Execution, run: Run) -> None:
        """A state reached (the first, and after every transition that broke nothing)."""

    def choose(self, ex: Execution, enabled: list[int], run: Run) -> int | None:
        """The next thread (one of ``enabled``), or None to stop here (``pruned``)."""
        return enabled[0]

    def after(self, tid: int, footprint: Footprint, run: Run) -> None:
        """The transition of ``tid`` ran and broke nothing."""

    def end(self, ex: Execution, run: Run) -> bool:
        """Every thread finished: the end-of-run check; False on a violation."""
        return ex.check_end()


def run_execution(ex: Execution, chooser: Chooser) -> Run:
    """Run ``ex`` to its end under ``chooser``; returns the :class:`Run`
    (the violation, if any, is ``ex.violation``)."""
    run = Run()
    if ex.violation is not None:
        run.end = "transition"
        return run
    last: int | None = None
    while True:
        chooser.visit(ex, run)
        if ex.finished:
            run.end = "finished" if chooser.end(ex, run) else "end-check"
            return run
        enabled = ex.enabled()
        if not enabled:
            ex.deadlock()
            run.end = "deadlock"
            return run
        tid = chooser.choose(ex, enabled, run)
        if tid is None:
            run.end = "pruned"
            return run
        run.before_last = run.preemptions
        if last is not None and tid != last and last in enabled:
            run.preemptions += 1
        last = tid
        run.schedule.append(tid)
        if len(enabled) > 1:
            run.choices.append(tid)
        fp = ex.step(tid)
        if fp is None or (chooser.verify and not ex.check()):
            run.end = "transition"
            return run
        chooser.after(tid, fp, run)


def allowed(enabled: list[int], last: int | None, preempt: int, bound: int | None) -> list[int]:
    """Candidates under the preemption bound, default choice first (keep
    running ``last`` when it can run), then thread order."""
    cont = last is not None and last in enabled
    out: list[int] = []
    if cont:
        assert last is not None
        out.append(last)
    for t in enabled:
        if t == last:
            continue
        if cont and bound is not None and preempt + 1 > bound:
            continue
        out.append(t)
    return out


class Forced(Chooser):
    """A schedule given as choices (a replay token): where one thread can run
    it runs, elsewhere the next choice; InputError when they do not fit."""

    def __init__(self, choices: tuple[int, ...] | list[int]) -> None:
        self.choices = list(choices)
        self.pos = 0

    def choose(self, ex: Execution, enabled: list[int], run: Run) -> int | None:
        if len(enabled) == 1:
            return enabled[0]
        if self.pos >= len(self.choices):
            raise InputError("--replay: the token's schedule ends before the execution "
                             "does (was it made for another version of kvmmem?)")
        tid = self.choices[self.pos]
        self.pos += 1
        if tid not in enabled:
            raise InputError(f"--replay: the token picks thread {tid}, which cannot "
                             "run at that point")
        return tid


class Fingerprinted(Chooser):
    """Records the full fingerprint of every state (the determinism check);
    picks at random with ``rng``, or follows ``schedule`` (a thread per
    transition; a thread that cannot run raises ``mismatch``)."""

    def __init__(self, rng: _random.Random | None = None,
                 schedule: list[int] | None = None,
                 mismatch: Callable[[int], Exception] | None = None) -> None:
        self.rng = rng
        self.schedule = schedule
        self.mismatch = mismatch
        self.prints: list[bytes] = []

    def visit(self, ex: Execution, run: Run) -> None:
        self.prints.append(ex.fingerprint()[1])

    def choose(self, ex: Execution, enabled: list[int], run: Run) -> int | None:
        if self.schedule is None:
            assert self.rng is not None
            return enabled[self.rng.randrange(len(enabled))]
        depth = len(run.schedule)
        if depth >= len(self.schedule):
            return None
        tid = self.schedule[depth]
        if tid not in enabled:
            raise self.mismatch(tid) if self.mismatch is not None else \
                RuntimeError(f"thread {tid} cannot run")
        return tid

    def end(self, ex: Execution, run: Run) -> bool:
        return True


class _Knuth(Chooser):
    """A random schedule under a preemption bound, multiplying the number of
    choices the search has along it (:func:`estimate_dfs_executions`)."""

    def __init__(self, rng: _random.Random, bound: int | None) -> None:
        self.rng = rng
        self.bound = bound
        self.product = 1.0

    def choose(self, ex: Execution, enabled: list[int], run: Run) -> int | None:
        last = run.schedule[-1] if run.schedule else None
        options = allowed(enabled, last, run.preemptions, self.bound)
        self.product *= len(options)
        return options[self.rng.randrange(len(options))]

    def end(self, ex: Execution, run: Run) -> bool:
        return True


# --- how many executions plain DFS would run ---------------------------------------------


def count_dfs_executions(scenario: Scenario, arch: str, variant: str,
                         limit: int = 10_000_000,
                         give_up: Callable[[], bool] | None = None) -> int:
    """The number of executions an unbounded plain ``dfs`` runs to exhaust the
    scenario: the number of maximal paths through its state graph, counted
    without running them.  The model is deterministic, so two schedules that
    reach the same state (full fingerprint: host, VM, locks, every thread's
    suspended frames) have the same futures, and the count of a state is the
    sum over its enabled threads of their successors' counts (1 where the
    execution ends: finished, deadlocked or an invariant broken).  Each
    distinct state is expanded once; each edge replays its prefix.

    Raises InputError when a state's count exceeds ``limit`` (the count is
    then only a lower bound), TimeoutError when ``give_up`` (asked before
    each distinct state is expanded) says so."""
    opaque = opaque_objects(scenario)
    memo: dict[bytes, int] = {}

    def replayed(prefix: list[int]) -> Execution:
        ex = Execution(scenario, arch, variant, opaque=opaque)
        for tid in prefix:
            ex.step(tid)
        return ex

    def count(prefix: list[int], ex: Execution) -> int:
        if ex.violation is not None or ex.finished:
            return 1
        key = ex.fingerprint()[1]
        known = memo.get(key)
        if known is not None:
            return known
        if give_up is not None and give_up():
            raise TimeoutError("gave up counting the schedules")
        enabled = ex.enabled()
        total = 0 if enabled else 1
        for i, tid in enumerate(enabled):
            child = ex if i == len(enabled) - 1 else replayed(prefix)
            if child.step(tid) is not None:
                child.check()
            total += count([*prefix, tid], child)
            if total > limit:
                raise InputError(f"more than {limit} schedules")
        memo[key] = total
        return total

    return count([], Execution(scenario, arch, variant, opaque=opaque))


def estimate_dfs_executions(scenario: Scenario, arch: str, variant: str,
                            preemptions: int | None = None, probes: int = 128,
                            seed: int = 0) -> float:
    """Knuth's estimate of the executions a ``dfs`` search runs (with an optional
    preemption bound): the mean, over ``probes`` random schedules, of the
    product of the number of choices the search has at each point along the
    schedule (an unbiased estimate of the number of leaves of its tree; D. E.
    Knuth, "Estimating the efficiency of backtrack programs", 1975).  For when
    :func:`count_dfs_executions` would take too long; rough (128 probes: within
    a factor of 2 or 3 on the bundled races)."""
    opaque = opaque_objects(scenario)
    rng = _random.Random(seed)
    total = 0.0
    for _ in range(probes):
        probe = _Knuth(rng, preemptions)
        run_execution(Execution(scenario, arch, variant, opaque=opaque), probe)
        total += probe.product
    return total / probes
