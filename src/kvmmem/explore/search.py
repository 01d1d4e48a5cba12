"""Search strategies: which interleavings to run, and when to stop.

This is the *scheduler* and *runner* part of the explorer.  The model is
deterministic, so an execution is fully given by its schedule (the thread
chosen at every transition) and is replayed from scratch for every new
schedule (stateless model checking).

Strategies
----------
``dfs``
    Every schedule, depth first (optionally with a preemption bound: switching
    away from a thread that could have continued costs one preemption).
``dpor``
    The same search with two reductions that keep every reachable state and
    every verdict:

    * *sleep sets* (Godefroid): after the subtree of thread ``t`` at a state
      is explored, ``t`` is put to sleep in its siblings' subtrees for as long
      as the transitions taken there are independent of ``t``'s (see
      :meth:`~kvmmem.explore.execution.Footprint.independent`): the
      interleavings it would start only reorder commuting transitions;
    * *state caching*: a state (the full fingerprint: host, VM, locks and
      every thread's suspended frames) already explored is explored again only
      for the threads that slept there then and are awake now (Godefroid,
      "Partial-Order Methods for the Verification of Concurrent Systems",
      1996, ch. 6) - two schedules that differ only in the order of commuting
      work converge on the same state and share one subtree.

    With a preemption bound the sleep sets are off (they do not combine
    soundly with a bound) and a state is skipped when it was explored after
    the same thread with no more preemptions used.
``random``
    ``max_executions`` schedules chosen uniformly at each transition, seeded.
``pct``
    Probabilistic concurrency testing (Burckhardt et al., ASPLOS 2010):
    random thread priorities and ``preemptions`` priority-change points per
    execution; finds a bug of depth ``d`` with probability at least
    ``1/(n k^(d-1))``.

Splitting
---------
A systematic search runs as a tree of tasks: a task explores the subtree
below its schedule prefix for at most ``split`` executions (or the budget,
when smaller: no more executions can count); if work is left
it stops and hands back its pending alternatives, in depth-first order, as
subtasks (each with a copy of the states it had explored, for ``dpor``).
The first task has the empty prefix.  ``random`` and ``pct`` are split into
fixed chunks of execution numbers.  How tasks split depends on ``split``
only, never on the number of workers, and results are combined in
depth-first task order (a task's own executions, then its subtasks), so
``--workers 1``, ``--workers N`` and a Dask cluster report the same verdict,
counterexample and counts.  A search within ``split`` executions is one task.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvmmem.errors import InputError
from kvmmem.scenario.model import Scenario

from .execution import Execution, Observation, Violation, opaque_objects
from .footprint import Footprint, Key
from .schedule import (
    Chooser,
    Run,
    allowed,
    count_dfs_executions,
    estimate_dfs_executions,
    run_execution,
)

__all__ = ["STRATEGIES", "Combined", "Combiner", "SearchParams", "Stop", "Task",
           "count_dfs_executions", "estimate_dfs_executions", "root_tasks", "run_task"]

STRATEGIES = ("dfs", "dpor", "random", "pct")
DEFAULT_SPLIT = 1 << 16
"""Executions a systematic task runs before it splits (see above).  Large on
purpose: a subtask starts from a copy of its parent's state cache and does not
see what its siblings explore, so every split costs ``dpor`` reduction, and the
more so the larger the search (two vCPUs writing two pages while userspace
write-protects them, x86: 17,323 executions as one task, 136,838 split every
4096).  A search within 65,536 executions is one task: parallel workers help
the larger ones."""
RANDOM_CHUNK = 32
"""Executions per task for ``random`` and ``pct``."""
DEFAULT_MAX_EXECUTIONS = {"dfs": 200_000, "dpor": 200_000, "random": 1000, "pct": 1000}
DEFAULT_PCT_DEPTH = 3


@dataclass(frozen=True, slots=True)
class SearchParams:
    """How to search: ``strategy``, ``preemptions`` (bound for dfs/dpor, bug
    depth - 1 for pct; None: unbounded / pct default), ``max_executions``
    (budget), ``seed`` (random, pct), ``split`` (executions per systematic
    task before it splits; it changes the counts of ``dpor``, whose state
    cache is per task, never the verdict)."""

    strategy: str = "dpor"
    preemptions: int | None = None
    max_executions: int | None = None
    seed: int = 0
    split: int = DEFAULT_SPLIT

    def budget(self) -> int:
        """The execution budget in effect."""
        if self.max_executions is not None:
            return self.max_executions
        return DEFAULT_MAX_EXECUTIONS[self.strategy]

    def check(self) -> None:
        """Raise InputError for an unknown strategy or a negative number."""
        if self.strategy not in STRATEGIES:
            raise InputError(f"--strategy: unknown strategy {self.strategy!r} "
                             f"(known: {', '.join(STRATEGIES)})")
        if self.preemptions is not None and self.preemptions < 0:
            raise InputError("--preemptions: must be >= 0")
        if self.max_executions is not None and self.max_executions < 1:
            raise InputError("--max-executions: must be >= 1")
        if self.split < 1:
            raise InputError("--split: must be >= 1")


@dataclass(slots=True)
class Found:
    """A violation found by a task: the full schedule (thread per transition),
    its compressed form (choices where more than one thread could run) and
    what broke."""

    schedule: list[int]
    choices: list[int]
    violation: Violation


@dataclass(slots=True)
class TaskResult:
    """What one task explored.  Per-execution records allow cutting the task
    at any execution count when the results are combined under a budget:
    ``lengths[i]`` transitions and ``preemptions[i]`` of execution ``i``;
    ``states`` maps a state digest to the execution that first reached it;
    ``outcomes`` maps ``(thread, step, outcome text)`` likewise, and
    ``notes`` each end-of-run observation (validate_path_independence);
    ``subtasks`` is the work a systematic task left when it split."""

    task: tuple[int, ...]
    lengths: list[int] = field(default_factory=list)
    preemptions: list[int] = field(default_factory=list)
    states: dict[bytes, int] = field(default_factory=dict)
    outcomes: dict[tuple[int, int, str], int] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)
    found: Found | None = None
    found_at: int = -1
    complete: bool = False
    """The task did all it was given (its subtree, or its range of executions),
    or handed the rest on as ``subtasks``."""
    stopped: bool = False
    """The task was asked to stop (Ctrl-C) and returned after its last whole
    execution: what it explored is recorded, what it left is not."""
    subtasks: list[Task] = field(default_factory=list)

    @property
    def executions(self) -> int:
        """Executions run."""
        return len(self.lengths)


@dataclass(slots=True)
class _Node:
    """One state along the current execution of a systematic search."""

    enabled: tuple[int, ...]
    choice: int
    todo: list[int]
    done: list[int]
    sleep: dict[int, Footprint]
    footprints: dict[int, Footprint]
    last: int | None
    preempt: int
    obs: Observation | None
    """The state (None in a subtask's forced prefix, which is only replayed)."""
    frozen: bool = False
    reads: dict[int, frozenset[Key] | None] = field(default_factory=dict)
    """What each thread's transition from here reads (taken before it runs)."""


Tick = Callable[[], None]
"""Called after every execution a task completes (progress); it raises
:class:`Stop` to end the task there."""


class Stop(Exception):
    """Raised by a :data:`Tick` to end the current task after the execution
    that just completed (the search was interrupted)."""


class _Explorer:
    """Shared plumbing of the strategies: building executions, recording states."""

    def __init__(self, scenario: Scenario, arch: str, variant: str, params: SearchParams,
                 task: tuple[int, ...], tick: Tick | None = None) -> None:
        self.scenario = scenario
        self.arch = arch
        self.variant = variant
        self.params = params
        self.opaque = opaque_objects(scenario)
        self.result = TaskResult(task)
        self.end_checked: dict[bytes, tuple[Violation | None, list[str]]] = {}
        self.tick = tick

    def new(self) -> Execution:
        """A fresh execution (setup done, threads at their first pause)."""
        return Execution(self.scenario, self.arch, self.variant, opaque=self.opaque)

    def start(self) -> Execution | None:
        """A fresh execution, or None when its setup already breaks an
        invariant (recorded as this execution's violation)."""
        ex = self.new()
        if ex.violation is not None:
            self.violated(ex, [], [])
            self.finish(ex, 0, 0)
            return None
        return ex

    def seen(self, full: bytes) -> None:
        """Record a state reached by the current execution."""
        self.result.states.setdefault(full, self.result.executions)

    def record_outcomes(self, ex: Execution) -> None:
        """Record the outcomes of every step the execution completed."""
        index = self.result.executions
        outcomes = self.result.outcomes
        for tid, outs in enumerate(ex.outcomes):
            for i, out in enumerate(outs):
                outcomes.setdefault((tid, i, _outcome_key(out)), index)

    def finish(self, ex: Execution, length: int, preempt: int) -> None:
        """Close the current execution's records."""
        self.record_outcomes(ex)
        self.result.lengths.append(length)
        self.result.preemptions.append(preempt)
        if self.tick is not None:
            self.tick()

    def end_check(self, ex: Execution, data: bytes) -> bool:
        """Path independence on a final state (once per distinct final state)."""
        cached = self.end_checked.get(data)
        if cached is None:
            ok = ex.check_end()
            cached = self.end_checked[data] = (None if ok else ex.violation, ex.notes)
        violation, notes = cached
        for note in notes:
            self.result.notes.setdefault(note, self.result.executions)
        if violation is not None:
            ex.violation = violation
        return violation is None

    def violated(self, ex: Execution, schedule: list[int], choices: list[int]) -> None:
        """Record the violation the current execution found."""
        assert ex.violation is not None
        self.result.found = Found(list(schedule), list(choices), ex.violation)
        self.result.found_at = self.result.executions


def _outcome_key(out: dict[str, Any]) -> str:
    """An outcome in the notation of ``kvmmem run``'s details: integers in hex,
    errnos and signals by name (``result=fault, gpa=0x1000, size=0x4``)."""
    return ", ".join(f"{k}={_shown(v)}" for k, v in out.items() if k not in ("step", "op"))


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:#x}"
    if isinstance(value, list):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return str(value)


# --- systematic search ---------------------------------------------------------------------


class _Systematic(_Explorer):
    """dfs and dpor over the subtree below ``task.prefix`` (a forced schedule)."""

    def __init__(self, scenario: Scenario, arch: str, variant: str, params: SearchParams,
                 task: Task, tick: Tick | None = None) -> None:
        super().__init__(scenario, arch, variant, params, task.index, tick)
        self.prefix = list(task.prefix)
        self.reduce = params.strategy == "dpor"
        self.sleep_sets = self.reduce and params.preemptions is None
        self.visited: dict[Any, Any] = dict(task.visited) if self.reduce else {}

    def run(self) -> TaskResult:
        """Explore until the subtree is done or a violation is found; after
        ``split`` executions (or the whole budget, if smaller: no more can
        count) hand what is left on as subtasks."""
        stack: list[_Node] = []
        limit = min(self.params.split, self.params.budget())
        while True:
            self._execution(stack)
            if self.result.found is not None:
                self.result.complete = True
                return self.result
            # backtrack: the deepest node with an alternative left
            while stack:
                node = stack[-1]
                node.done.append(node.choice)
                if not node.frozen and node.todo:
                    node.choice = node.todo.pop(0)
                    break
                stack.pop()
            self.result.complete = True
            if not stack:
                return self.result
            if self.result.executions >= limit:
                self.result.subtasks = self._split(stack)
                return self.result

    def _split(self, stack: list[_Node]) -> list[Task]:
        """The pending alternatives of ``stack`` as subtasks, in the order this
        task would have explored them: the deepest node's current choice and
        its other alternatives, then each shallower node's."""
        out: list[Task] = []
        visited = dict(self.visited)
        for depth in range(len(stack) - 1, -1, -1):
            node = stack[depth]
            if node.frozen:
                break
            alternatives = ([node.choice] if depth == len(stack) - 1 else []) + node.todo
            base = tuple(n.choice for n in stack[:depth])
            for alt in alternatives:
                out.append(Task((*self.result.task, len(out)), (*base, alt), visited=visited))
        return out

    def _execution(self, stack: list[_Node]) -> None:
        """Run one execution: replay ``stack`` (the last node with its new
        choice), then extend it with default choices to the end."""
        ex = self.start()
        if ex is None:
            return
        run = run_execution(ex, _Walk(self, stack))
        if run.end not in ("finished", "pruned"):
            self.violated(ex, run.schedule, run.choices)
        # an execution cut by a broken transition records the preemptions before it
        self.finish(ex, len(run.schedule),
                    run.before_last if run.end == "transition" else run.preemptions)

    def _close(self, node: _Node, ex: Execution, obs: Observation) -> dict[int, Footprint]:
        """Complete the footprint of the transition taken at ``node`` (what it
        changed, from the states before and after; what it reads) and return
        the sleep set of the state it led to."""
        lock_part = node.footprints[node.choice]
        before = node.obs
        if before is None:
            fp = Footprint(frozenset(), True, None, lock_part.locks)
        else:
            writes, glob = ex.tracker.writes(before.view, obs.view)
            reads = node.reads.get(node.choice)
            glob = glob or obs.glob != before.glob \
                or (reads is not None and not writes <= reads)
            fp = Footprint(writes, glob, reads, lock_part.locks)
        node.footprints[node.choice] = fp
        if not self.sleep_sets:
            return {}
        sleep: dict[int, Footprint] = {}
        for tid, other in node.sleep.items():
            if tid != node.choice and other.independent(fp):
                sleep[tid] = other
        for tid in node.done:
            other = node.footprints[tid]
            if tid != node.choice and other.independent(fp):
                sleep[tid] = other
        return sleep

    def _cached(self, full: bytes, last: int | None, enabled: list[int], preempt: int,
                sleep: dict[int, Footprint]) -> frozenset[int] | None:
        """State caching: which threads still need exploring from this state
        (None: all the search would pick; an empty set: none, prune)."""
        bound = self.params.preemptions
        if bound is not None:
            # Explored before after thread ``l`` with ``b`` preemptions left: that
            # covers every schedule allowed now if ``b`` is at least what is left
            # now, plus one when switching away from ``l`` costs a preemption that
            # is free now.  (``l`` is None when nothing continues for free.)
            cur = last if last in enabled else None
            left = bound - preempt
            seen = self.visited.get(full, ())
            for was, had in seen:
                if had >= left + (1 if was is not None and was != cur else 0):
                    return frozenset()
            self.visited[full] = (*seen, (cur, left))  # immutable: subtasks share them
            return None
        # Godefroid's state caching with sleep sets: a state explored before with
        # sleep set ``stored`` had every enabled thread outside ``stored``
        # explored; now only those asleep then and awake now are left.
        asleep = frozenset(sleep)
        stored: frozenset[int] | None = self.visited.get(full)
        self.visited[full] = asleep if stored is None else stored & asleep
        if stored is None:
            return None
        return stored - asleep


# --- random and PCT ------------------------------------------------------------------------


class _Sampling(_Explorer):
    """random and pct over executions ``first .. first + count - 1``."""

    def __init__(self, scenario: Scenario, arch: str, variant: str, params: SearchParams,
                 task: tuple[int, ...], first: int, count: int,
                 tick: Tick | None = None) -> None:
        super().__init__(scenario, arch, variant, params, task, tick)
        self.first = first
        self.count = count

    def run(self) -> TaskResult:
        """Run the task's executions; stop at the first violation."""
        for i in range(self.first, self.first + self.count):
            rng = _random.Random(f"{self.params.seed}:{i}")
            self._execution(rng)
            if self.result.found is not None:
                break
        self.result.complete = True
        return self.result

    def _execution(self, rng: _random.Random) -> None:
        ex = self.start()
        if ex is None:
            return
        run = run_execution(ex, _Sample(self, rng, len(ex.threads)))
        if run.end != "finished":
            self.violated(ex, run.schedule, run.choices)
        self._horizon = max(self._horizon, len(run.schedule))
        self.finish(ex, len(run.schedule), run.preemptions)

    _horizon = 64


class _Walk(Chooser):
    """The systematic search's chooser: replays the known nodes of ``stack``
    (unchecked: they were checked when first run), runs the last one's new
    choice, then extends the stack with a node per state (sleep sets, state
    caching, the preemption bound, the forced prefix of a subtask)."""

    def __init__(self, search: _Systematic, stack: list[_Node]) -> None:
        self.search = search
        self.stack = stack
        self.known = len(stack)
        self.pending: _Node | None = None
        """The node whose transition led to the current state."""
        self.node: _Node | None = None
        self.obs: Observation | None = None
        self.sleep: dict[int, Footprint] = {}

    def visit(self, ex: Execution, run: Run) -> None:
        if len(run.schedule) < self.known:
            return
        near = self.pending.obs if self.pending is not None else None
        self.obs = obs = ex.observe(near.view if near is not None else None)
        self.search.seen(obs.full)
        self.sleep = self.search._close(self.pending, ex, obs) \
            if self.pending is not None else {}

    def choose(self, ex: Execution, enabled: list[int], run: Run) -> int | None:
        depth = len(run.schedule)
        if depth < self.known:
            self.verify = depth == self.known - 1
            self.node = self.stack[depth] if self.verify else None
            if self.node is not None:
                if self.search.reduce:
                    self.node.reads[self.node.choice] = ex.reads(self.node.choice)
                if self.node.obs is not None:
                    ex.checked_before(self.node.obs)
            return self.stack[depth].choice
        self.verify = True
        search = self.search
        last = run.schedule[-1] if run.schedule else None
        preempt = run.preemptions
        if depth < len(search.prefix):
            forced = search.prefix[depth]
            if forced not in enabled:  # pragma: no cover - prefixes come from this code
                raise RuntimeError("partition prefix does not replay")
            candidates = [forced]
            frozen = True
        else:
            frozen = False
            only = search._cached(self.obs.full, last, enabled, preempt, self.sleep) \
                if search.reduce and self.obs is not None else None
            candidates = [t for t in allowed(enabled, last, preempt, search.params.preemptions)
                          if t not in self.sleep and (only is None or t in only)]
            if not candidates:
                return None
        node = _Node(tuple(enabled), candidates[0], candidates[1:], [], self.sleep, {}, last,
                     preempt, self.obs, frozen)
        if search.reduce:
            node.reads[node.choice] = ex.reads(node.choice)
        self.stack.append(node)
        self.node = node
        return node.choice

    def after(self, tid: int, footprint: Footprint, run: Run) -> None:
        if self.node is not None:
            self.node.footprints[self.node.choice] = footprint
            self.pending = self.node

    def end(self, ex: Execution, run: Run) -> bool:
        assert self.obs is not None
        return self.search.end_check(ex, self.obs.data)


class _Sample(Chooser):
    """random and pct: a thread at random, or the highest PCT priority (its
    priorities and change points drawn from ``rng`` first)."""

    def __init__(self, search: _Sampling, rng: _random.Random, nthreads: int) -> None:
        self.search = search
        self.rng = rng
        self.pct = search.params.strategy == "pct"
        self.data = b""
        self.prio: list[float] = []
        self.change: dict[int, int] = {}
        if self.pct:
            preemptions = search.params.preemptions
            depth_bug = (preemptions if preemptions is not None else DEFAULT_PCT_DEPTH - 1) + 1
            order = list(range(nthreads))
            rng.shuffle(order)
            self.prio = [0.0] * nthreads
            for rank, tid in enumerate(order):
                self.prio[tid] = float(depth_bug + rank)
            horizon = max(search._horizon, 1)
            for i in range(1, depth_bug):
                self.change[rng.randrange(horizon)] = depth_bug - i

    def visit(self, ex: Execution, run: Run) -> None:
        self.data, full = ex.fingerprint()
        self.search.seen(full)

    def choose(self, ex: Execution, enabled: list[int], run: Run) -> int | None:
        if self.pct:
            return max(enabled, key=lambda t: self.prio[t])
        return enabled[self.rng.randrange(len(enabled))]

    def after(self, tid: int, footprint: Footprint, run: Run) -> None:
        if self.pct and len(run.schedule) - 1 in self.change:
            self.prio[tid] = float(self.change[len(run.schedule) - 1])

    def end(self, ex: Execution, run: Run) -> bool:
        return self.search.end_check(ex, self.data)


# --- partitioning and tasks ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Task:
    """One independent part of a search.  ``index`` orders tasks: a tuple,
    a subtask extending its parent's (depth-first order is tuple order).
    Systematic strategies: a forced schedule ``prefix`` and the states
    already explored (``visited``, dpor); random/pct: execution numbers
    ``first .. first + count - 1``."""

    index: tuple[int, ...]
    prefix: tuple[int, ...] = ()
    visited: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)
    first: int = 0
    count: int = 0


def root_tasks(params: SearchParams) -> list[Task]:
    """The tasks a search starts with: one for a systematic search (the empty
    prefix; it splits as it goes), fixed chunks for random and pct."""
    if params.strategy in ("random", "pct"):
        total = params.budget()
        return [Task((i,), first=start, count=min(RANDOM_CHUNK, total - start))
                for i, start in enumerate(range(0, total, RANDOM_CHUNK))]
    return [Task(())]


def run_task(scenario: Scenario, arch: str, variant: str, params: SearchParams,
             task: Task, tick: Tick | None = None) -> TaskResult:
    """Search one task (this is what worker processes and Dask workers run).
    ``tick`` is called after every execution; when it raises :class:`Stop`
    the task returns what it explored so far, marked ``stopped``."""
    explorer: _Systematic | _Sampling
    if params.strategy in ("random", "pct"):
        explorer = _Sampling(scenario, arch, variant, params, task.index, task.first,
                             task.count, tick)
    else:
        explorer = _Systematic(scenario, arch, variant, params, task, tick)
    try:
        return explorer.run()
    except Stop:
        result = explorer.result
        if result.found is not None:  # its last execution broke something: done anyway
            result.complete = True
            return result
        result.complete = False
        result.subtasks = []
        result.stopped = True
        return result


# --- combining -----------------------------------------------------------------------------


@dataclass(slots=True)
class Combined:
    """The search's result, independent of how the tasks were run."""

    verdict: str
    executions: int
    steps: int
    max_preemptions: int
    states: set[bytes]
    outcomes: dict[tuple[int, int], list[str]]
    found: Found | None
    tasks: int
    notes: list[str] = field(default_factory=list)


class Combiner:
    """Collects task results and adds them up in depth-first task order under
    the budget.  :meth:`pending` says which known tasks still have to run,
    :meth:`settled` whether the answer can no longer change."""

    def __init__(self, params: SearchParams, roots: list[Task]) -> None:
        self.params = params
        self.roots = roots
        self.results: dict[tuple[int, ...], TaskResult] = {}
        self.tasks: dict[tuple[int, ...], Task] = {t.index: t for t in roots}

    def add(self, result: TaskResult) -> list[Task]:
        """Store one task's result; returns its subtasks (now known tasks)."""
        self.results[result.task] = result
        for sub in result.subtasks:
            self.tasks[sub.index] = sub
        return result.subtasks

    def _order(self) -> tuple[list[TaskResult], bool, bool]:
        """The results in task order up to where the answer is decided:
        ``(results, settled, more)``; ``more`` says that the budget ran out
        while work was left."""
        remaining = self.params.budget()
        out: list[TaskResult] = []
        todo = list(reversed(self.roots))
        while todo:
            task = todo.pop()
            r = self.results.get(task.index)
            if r is None:
                return out, False, False
            out.append(r)
            if r.found is not None and r.found_at < remaining:
                return out, True, False
            if r.stopped and r.executions < remaining:
                return out, False, False
            remaining -= r.executions
            todo.extend(reversed(r.subtasks))
            if remaining <= 0:
                return out, True, remaining < 0 or bool(todo)
        return out, True, False

    def settled(self) -> bool:
        """The combined answer is final."""
        return self._order()[1]

    def pending(self) -> list[Task]:
        """Known tasks without a result, in task order."""
        return [t for i, t in sorted(self.tasks.items()) if i not in self.results]

    def stopped(self) -> bool:
        """Some task was stopped (the search was interrupted) before the
        combined answer was settled."""
        return any(r.stopped for r in self.results.values()) and not self.settled()

    def partial(self) -> Combined:
        """What an interrupted search explored: every result received, in
        task order, whether or not the tasks before it finished; verdict
        ``interrupted``, no counterexample (the first violation in task order
        is not known)."""
        executions = steps = maxp = 0
        states: set[bytes] = set()
        outcomes: dict[tuple[int, int], list[str]] = {}
        notes: list[str] = []
        for _, r in sorted(self.results.items()):
            executions += r.executions
            steps += sum(r.lengths)
            maxp = max([maxp, *r.preemptions])
            states.update(r.states)
            for (tid, idx, text), _v in r.outcomes.items():
                outs = outcomes.setdefault((tid, idx), [])
                if text not in outs:
                    outs.append(text)
            notes.extend(t for t in r.notes if t not in notes)
        for outs in outcomes.values():
            outs.sort()
        return Combined("interrupted", executions, steps, maxp, states, outcomes, None,
                        len(self.results), sorted(notes))

    def combine(self) -> Combined:
        """The combined result (call once :meth:`settled`)."""
        ordered, _, more = self._order()
        remaining = self.params.budget()
        executions = steps = maxp = 0
        states: set[bytes] = set()
        outcomes: dict[tuple[int, int], list[str]] = {}
        notes: list[str] = []
        found: Found | None = None
        for r in ordered:
            allow = remaining
            if r.found is not None and r.found_at < allow:
                allow = r.found_at + 1
                found = r.found
            n = min(r.executions, allow)
            executions += n
            steps += sum(r.lengths[:n])
            if n:
                maxp = max(maxp, max(r.preemptions[:n]))
            states.update(k for k, v in r.states.items() if v < n)
            for (tid, idx, text), v in r.outcomes.items():
                if v < n:
                    outs = outcomes.setdefault((tid, idx), [])
                    if text not in outs:
                        outs.append(text)
            notes.extend(t for t, v in r.notes.items() if v < n and t not in notes)
            remaining -= n
            if found is not None:
                break
        if found is not None:
            verdict = "violation"
        elif more or self.params.strategy in ("random", "pct"):
            verdict = "budget"
        else:
            verdict = "exhausted"
        for outs in outcomes.values():
            outs.sort()
        return Combined(verdict, executions, steps, maxp, states, outcomes, found,
                        len(ordered), sorted(notes))
