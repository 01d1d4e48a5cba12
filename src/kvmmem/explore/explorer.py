"""``kvmmem explore``: search a concurrent scenario, report, replay.

:func:`explore` partitions the search (:func:`~kvmmem.explore.search.partition`),
runs the tasks here, on local worker processes or on a Dask cluster
(:mod:`kvmmem.explore.parallel`), combines them in task order and, when an
invariant broke, replays the failing schedule twice with tracing on: the
printed trace comes from that replay, and the two replays and the search
must agree (the determinism check).  :func:`replay` runs one schedule from a
token.

A search with a ``progress`` callback hears, several times a second, the
executions done and what they are out of (:class:`SearchProgress`).  While
:func:`explore` runs in the main thread, the first SIGINT (Ctrl-C) asks the
search to stop after the executions under way (the second stops it at once);
the result is then what was explored so far, verdict ``interrupted``.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from kvmmem.errors import InputError
from kvmmem.kvm.vm import ARCHES
from kvmmem.scenario.model import Scenario
from kvmmem.variants import get_variant

from .execution import EXPECTATION, Execution, TraceEvent, Violation
from .parallel import StopFlag
from .schedule import (
    Fingerprinted,
    Forced,
    count_dfs_executions,
    estimate_dfs_executions,
    run_execution,
)
from .search import Combined, SearchParams
from .token import Token, scenario_digest

INTERRUPTED_STATUS = 130
"""The exit status of an interrupted search (128 + SIGINT, as a shell reports it)."""

COUNT_SECONDS = 2.0
"""How long counting the schedules of a plain ``dfs`` search may take before
the total shown is estimated instead (it takes 0.3 s or less on the bundled
races, whose plain DFS runs last minutes)."""


@dataclass(frozen=True, slots=True)
class SearchProgress:
    """How far a search is: ``executions`` run (by every worker) out of
    ``total``, which is ``exact`` (plain dfs: its schedules, counted from the
    state graph), ``estimate`` (dfs with a preemption bound, or a state graph
    too large to count quickly), ``budget`` (random and pct, and a dfs search
    with more schedules than the budget: it stops there) or ``bound`` (dpor:
    the budget, an upper bound).  ``schedules``: the estimated schedules of a
    dfs search cut by the budget, where known.  A violation ends any search
    early."""

    executions: int
    total: int
    kind: str
    schedules: int | None = None


Progress = Callable[[SearchProgress], None]
"""Called with the :class:`SearchProgress` as a search advances."""


class NondeterminismError(RuntimeError):
    """Replaying a schedule did not reproduce what the search saw: a model bug
    (hidden state, iteration over an unordered collection of objects...)."""


@dataclass(slots=True)
class ReplayResult:
    """One schedule run with tracing: its transitions, the violation (if any),
    the full schedule and every thread's step outcomes."""

    threads: list[str]
    trace: list[TraceEvent]
    violation: Violation | None
    schedule: list[int]
    outcomes: list[list[dict[str, Any]]]

    @property
    def exit_status(self) -> int:
        """As :attr:`ExploreResult.exit_status`."""
        if self.violation is None:
            return 0
        return 1 if self.violation.invariant == EXPECTATION else 3

    def signature(self) -> tuple[Any, ...]:
        """What two replays of one schedule must share."""
        v = self.violation
        return (tuple((e.number, e.thread, tuple(e.lines)) for e in self.trace),
                None if v is None else (v.invariant, v.detail, v.after, tuple(v.state)),
                tuple(self.schedule), repr(self.outcomes))


@dataclass(slots=True)
class ExploreResult:
    """The answer for one scenario, architecture and variant."""

    scenario: str
    arch: str
    variant: str
    strategy: str
    verdict: str
    executions: int
    steps: int
    max_preemptions: int
    distinct_states: int
    seconds: float
    threads: list[str]
    outcomes: dict[str, list[list[str]]] = field(default_factory=dict)
    violation: Violation | None = None
    token: str | None = None
    trace: list[TraceEvent] = field(default_factory=list)
    tasks: int = 0
    replay_file: str | None = None
    notes: list[str] = field(default_factory=list)
    """End-of-run observations that are not violations, over every execution
    (validate_path_independence: a slot the creation-time VMA checks would
    refuse now)."""

    @property
    def exit_status(self) -> int:
        """SCENARIOS.md: 3 an invariant violated, 1 an expectation failed in
        some interleaving, 130 interrupted (Ctrl-C), else 0 (exhausted or
        budget)."""
        if self.verdict == "interrupted":
            return INTERRUPTED_STATUS
        if self.violation is None:
            return 0
        return 1 if self.violation.invariant == EXPECTATION else 3

    @property
    def rate(self) -> float:
        """Executions per second."""
        return self.executions / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        """The ``kvmmem explore --json`` object of SCENARIOS.md ("Exploration
        output") plus metrics, per-step outcomes and the trace."""
        out: dict[str, Any] = {
            "scenario": self.scenario, "arch": self.arch, "variant": self.variant,
            "verdict": self.verdict, "executions": self.executions,
            "violations": [] if self.violation is None else [self.violation.to_json()],
            "strategy": self.strategy, "steps": self.steps,
            "preemptions": self.max_preemptions, "distinct_states": self.distinct_states,
            "seconds": round(self.seconds, 3), "outcomes": self.outcomes,
            "notes": [{"invariant": "path-independence", "detail": n} for n in self.notes],
        }
        if self.violation is not None:
            out["schedule"] = self.token
            out["state"] = self.violation.state
            out["trace"] = [{"event": e.number, "thread": self.threads[e.thread],
                             "lines": e.lines} for e in self.trace]
            if self.replay_file is not None:
                out["replay_file"] = self.replay_file
        return out


def check_target(scenario: Scenario, arch: str, variant: str) -> None:
    """Raise InputError unless the scenario has threads and arch/variant exist."""
    if scenario.threads is None:
        raise InputError(f"{scenario.source}: {scenario.name} has steps, not threads: "
                         "run it with `kvmmem run`")
    if arch not in ARCHES:
        raise InputError(f"--arch: unknown architecture {arch!r} (known: {', '.join(ARCHES)})")
    why = get_variant(variant).arch_unsupported(arch)
    if why is not None:
        raise InputError(why)


def explore(scenario: Scenario, arch: str, variant: str | None = None,
            params: SearchParams | None = None, *, workers: int = 1,
            dask: Any = None, progress: Progress | None = None) -> ExploreResult:
    """Search ``scenario`` on ``arch`` under ``variant`` (default: the file's).

    ``workers`` local processes (1: in this process) or, when ``dask`` is a
    scheduler address or a ``distributed.Client``, that cluster.  Returns the
    :class:`ExploreResult`; raises InputError for bad input and
    :class:`NondeterminismError` if the counterexample does not replay.
    ``progress``: see :class:`SearchProgress` (for a plain dfs search the
    schedules are counted first, see :func:`planned_executions`).  Interrupted
    (SIGINT, KeyboardInterrupt), the result is the part explored, verdict
    ``interrupted``, exit status 130."""
    from .parallel import run_tasks

    params = params or SearchParams()
    params.check()
    variant = variant or scenario.variant
    check_target(scenario, arch, variant)
    if workers < 1:
        raise InputError("--workers: must be >= 1")
    stop = StopFlag()
    with _sigint_stops(stop):
        report = None
        if progress is not None:
            planned = planned_executions(scenario, arch, variant, params, stop)
            progress(planned)

            def report(done: int) -> None:
                progress(SearchProgress(done, planned.total, planned.kind,
                                        planned.schedules))

        start = time.perf_counter()
        combined = run_tasks(scenario, arch, variant, params, workers=workers, dask=dask,
                             progress=report, stop=stop)
        seconds = time.perf_counter() - start
    return _result(scenario, arch, variant, params, combined, seconds)


def planned_executions(scenario: Scenario, arch: str, variant: str, params: SearchParams,
                       stop: StopFlag | None = None) -> SearchProgress:
    """What a search will run, before it starts (:class:`SearchProgress` with 0
    executions).  Plain dfs: the schedules counted from the state graph
    (:func:`~kvmmem.explore.search.count_dfs_executions`, given up after
    :data:`COUNT_SECONDS` or on a stop request) or else estimated
    (:func:`~kvmmem.explore.search.estimate_dfs_executions`), capped by the
    budget; random and pct: the budget; dpor: the budget as a bound."""
    budget = params.budget()
    if params.strategy in ("random", "pct"):
        return SearchProgress(0, budget, "budget")
    if params.strategy != "dfs":
        return SearchProgress(0, budget, "bound")
    count: int | None = None
    if params.preemptions is None:
        deadline = time.monotonic() + COUNT_SECONDS
        try:
            count = count_dfs_executions(
                scenario, arch, variant, limit=budget,
                give_up=lambda: time.monotonic() > deadline or bool(stop and stop.requested))
        except InputError:  # more schedules than the budget
            return SearchProgress(0, budget, "budget")
        except TimeoutError:
            pass
    if count is not None:
        return SearchProgress(0, count, "exact")
    if stop is not None and stop.requested:
        return SearchProgress(0, budget, "bound")
    estimate = round(estimate_dfs_executions(scenario, arch, variant, params.preemptions))
    if estimate > budget:
        return SearchProgress(0, budget, "budget", schedules=estimate)
    return SearchProgress(0, max(estimate, 1), "estimate")


@contextmanager
def _sigint_stops(stop: StopFlag) -> Iterator[None]:
    """While a search runs in the main thread with Python's own SIGINT handler
    in place: the first SIGINT sets ``stop``, the next raises KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.requested:
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _result(scenario: Scenario, arch: str, variant: str, params: SearchParams,
            combined: Combined, seconds: float) -> ExploreResult:
    threads = list((scenario.threads or {}).keys())
    outcomes: dict[str, list[list[str]]] = {}
    for tid, name in enumerate(threads):
        steps = (scenario.threads or {})[name]
        outcomes[name] = [combined.outcomes.get((tid, i), []) for i in range(len(steps))]
    result = ExploreResult(scenario.name, arch, variant, params.strategy, combined.verdict,
                           combined.executions, combined.steps, combined.max_preemptions,
                           len(combined.states), seconds, threads, outcomes,
                           tasks=combined.tasks, notes=combined.notes)
    found = combined.found
    if found is not None:
        token = Token(scenario.name, scenario_digest(scenario), arch, variant,
                      tuple(found.choices))
        first = replay(scenario, token)
        second = replay(scenario, token)
        if first.signature() != second.signature():
            raise NondeterminismError(f"{scenario.name} ({arch}, {variant}): two replays of "
                                      f"{token.encode()} differ")
        v = first.violation
        if v is None or (v.invariant, v.detail) != (found.violation.invariant,
                                                    found.violation.detail) \
                or first.schedule != found.schedule:
            raise NondeterminismError(f"{scenario.name} ({arch}, {variant}): the replay of "
                                      f"{token.encode()} does not reproduce "
                                      f"{found.violation.invariant}")
        result.violation = v
        result.trace = first.trace
        result.token = token.encode()
    return result


def replay(scenario: Scenario, token: Token | str) -> ReplayResult:
    """Run the schedule of ``token`` on a fresh model with tracing, checking
    every invariant after every transition; stops at the first violation.
    Raises InputError when the token does not fit the scenario."""
    if isinstance(token, str):
        token = Token.decode(token)
    token.check(scenario)
    check_target(scenario, token.arch, token.variant)
    ex = Execution(scenario, token.arch, token.variant, trace=True)
    run = run_execution(ex, Forced(token.choices))
    assert ex.trace is not None
    return ReplayResult([t.name for t in ex.threads], ex.trace, ex.violation, run.schedule,
                        ex.outcomes)


@dataclass(frozen=True, slots=True)
class DeterminismCheck:
    """What :func:`check_determinism` ran: ``schedules`` random schedules, each run
    twice, with ``transitions`` state fingerprints compared in all."""

    schedules: int
    transitions: int


def check_determinism(scenario: Scenario, arch: str, variant: str | None = None, *,
                      samples: int = 20, seed: int = 0) -> DeterminismCheck:
    """Run ``samples`` random schedules twice each and compare every state's
    fingerprint along the way; returns what was compared
    (:class:`DeterminismCheck`), raises :class:`NondeterminismError` at the first
    difference."""
    import random

    variant = variant or scenario.variant
    check_target(scenario, arch, variant)
    compared = 0
    for i in range(samples):
        first = Fingerprinted(rng=random.Random(f"{seed}:{i}"))
        schedule = run_execution(Execution(scenario, arch, variant), first).schedule
        second = Fingerprinted(schedule=schedule, mismatch=partial(_cannot_run, i))
        run_execution(Execution(scenario, arch, variant), second)
        prints, again = first.prints, second.prints
        if prints != again:
            at = next(j for j, (a, b) in enumerate(zip(prints, again, strict=False)) if a != b) \
                if any(a != b for a, b in zip(prints, again, strict=False)) else len(again)
            raise NondeterminismError(f"schedule {i} ({schedule}): states differ after "
                                      f"transition {at}")
        compared += len(again) - 1
    return DeterminismCheck(samples, compared)


def _cannot_run(schedule: int, tid: int) -> NondeterminismError:
    return NondeterminismError(f"schedule {schedule}: thread {tid} cannot run on replay")
