"""Running the tasks of a search: here, on local processes, or on Dask.

Whatever runs them, task results are combined in task order by
:class:`~kvmmem.explore.search.Combiner`, so the verdict, the
counterexample and the counts do not depend on the driver or on the number
of workers.  Parallel drivers submit every task, collect results as they
come, and cancel what is left as soon as the combined answer is settled
(a violation in a leading task, or the budget spent).

Dask is an optional extra (``pip install 'kvmmem[dask]'``): ``dask`` is a
scheduler address (``tcp://host:8786``) or a ready ``distributed.Client``;
the workers need kvmmem installed (the tasks carry the parsed scenario, not
the file).

Progress and Ctrl-C: every task calls a tick after each execution (here it
counts; worker processes add to a shared counter the driver reads a few times
a second; Dask reports per finished task).  A stop request
(:class:`StopFlag`, set by the first SIGINT) ends the running tasks after
their current execution, keeping what they explored (Dask tasks cannot be
reached: they are cancelled), and the result is
:meth:`~kvmmem.explore.search.Combiner.partial`, verdict ``interrupted``.
Worker processes ignore SIGINT (a Ctrl-C on a terminal reaches the whole
process group): the driver decides, and a second SIGINT (a
``KeyboardInterrupt`` in the driver) terminates them without waiting.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import signal
import time
from collections.abc import Callable
from typing import Any

from kvmmem.errors import InputError
from kvmmem.scenario.model import Scenario

from .search import (
    Combined,
    Combiner,
    SearchParams,
    Stop,
    Task,
    TaskResult,
    root_tasks,
    run_task,
)

Executions = Callable[[int], None]
"""Called with the executions run so far (by every task, as they happen)."""

PROGRESS_INTERVAL = 0.1
"""Seconds between two progress reports."""


class StopFlag:
    """A request to stop the search (the first Ctrl-C): tasks end after their
    current execution, and the drivers start nothing new."""

    def __init__(self) -> None:
        self.requested = False

    def set(self) -> None:
        """Ask the search to stop."""
        self.requested = True


def run_tasks(scenario: Scenario, arch: str, variant: str, params: SearchParams,
              *, workers: int = 1, dask: Any = None, progress: Executions | None = None,
              stop: StopFlag | None = None) -> Combined:
    """Run a search's tasks (and the subtasks they hand back) and combine
    their results (see the module docstring).  ``progress`` hears the
    executions run so far; when ``stop`` is set (or a KeyboardInterrupt
    arrives) before the answer is settled, the result is the partial one,
    verdict ``interrupted``."""
    stop = stop if stop is not None else StopFlag()
    combiner = Combiner(params, root_tasks(params))
    try:
        if dask is not None:
            _run_dask(scenario, arch, variant, params, combiner, dask, progress, stop)
        elif workers > 1:
            _run_processes(scenario, arch, variant, params, combiner, workers, progress, stop)
        else:
            _run_here(scenario, arch, variant, params, combiner, progress, stop)
    except KeyboardInterrupt:
        stop.set()
    if stop.requested and not combiner.settled():
        return combiner.partial()
    return combiner.combine()


def _run_here(scenario: Scenario, arch: str, variant: str, params: SearchParams,
              combiner: Combiner, progress: Executions | None, stop: StopFlag) -> None:
    done = 0
    reported = time.monotonic()

    def tick() -> None:
        nonlocal done, reported
        done += 1
        if progress is not None:
            now = time.monotonic()
            if now - reported >= PROGRESS_INTERVAL:
                reported = now
                progress(done)
        if stop.requested:
            raise Stop

    try:
        while not combiner.settled() and not stop.requested:
            task = combiner.pending()[0]
            combiner.add(run_task(scenario, arch, variant, params, task, tick))
    finally:
        if progress is not None:
            progress(done)


def _drive(submit: Callable[[Task], Any], wait_some: Callable[[list[Any]], list[Any]],
           wind_down: Callable[[list[Any]], list[TaskResult]], combiner: Combiner, limit: int,
           poll: Callable[[], None], stop: StopFlag) -> None:
    """Keep up to ``limit`` tasks in flight, earliest in task order first,
    until the answer is settled or ``stop`` is set.  ``wait_some`` returns the
    futures done within a short wait (maybe none), ``poll`` reports progress,
    ``wind_down`` ends the tasks still in flight and returns the results they
    hand back (kept only when stopping: what they explored so far)."""
    inflight: dict[Any, tuple[int, ...]] = {}
    started: set[tuple[int, ...]] = set()
    results: list[TaskResult] = []
    try:
        while not combiner.settled() and not stop.requested:
            for task in combiner.pending():
                if len(inflight) >= limit:
                    break
                if task.index not in started:
                    started.add(task.index)
                    inflight[submit(task)] = task.index
            for fut in sorted(wait_some(list(inflight)), key=inflight.__getitem__):
                del inflight[fut]
                combiner.add(fut.result())
            poll()
    finally:
        results = wind_down(list(inflight))
    if stop.requested:
        for result in results:
            combiner.add(result)
        poll()


_counter: Any = None
_halt: Any = None


def _worker_init(counter: Any, halt: Any) -> None:
    """In each worker process: leave SIGINT to the driver; keep the shared
    execution counter and stop flag."""
    global _counter, _halt
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _counter, _halt = counter, halt


def _worker_tick() -> None:
    with _counter.get_lock():
        _counter.value += 1
    if _halt.value:
        raise Stop


def _worker_task(scenario: Scenario, arch: str, variant: str, params: SearchParams,
                 task: Task) -> TaskResult:
    return run_task(scenario, arch, variant, params, task, _worker_tick)


def _run_processes(scenario: Scenario, arch: str, variant: str, params: SearchParams,
                   combiner: Combiner, workers: int, progress: Executions | None,
                   stop: StopFlag) -> None:
    ctx = multiprocessing.get_context("fork")
    counter = ctx.Value("q", 0)
    halt = ctx.RawValue("b", 0)
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                initializer=_worker_init, initargs=(counter, halt)) as pool:
        def submit(task: Task) -> Any:
            return pool.submit(_worker_task, scenario, arch, variant, params, task)

        def wait_some(futures: list[Any]) -> list[Any]:
            done, _ = cf.wait(futures, timeout=PROGRESS_INTERVAL * 2,
                              return_when=cf.FIRST_COMPLETED)
            return list(done)

        def wind_down(futures: list[Any]) -> list[TaskResult]:
            # the running tasks end after their current execution, the queued
            # ones are dropped (or end after their first)
            halt.value = 1
            for fut in futures:
                fut.cancel()
            out: list[TaskResult] = []
            for fut in cf.as_completed(futures):
                if not fut.cancelled() and fut.exception() is None:
                    out.append(fut.result())
            return out

        def poll() -> None:
            if progress is not None:
                progress(counter.value)

        try:
            _drive(submit, wait_some, wind_down, combiner, workers * 2, poll, stop)
        except KeyboardInterrupt:
            # a second Ctrl-C: do not wait for the workers
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()
            stop.set()


def _run_dask(scenario: Scenario, arch: str, variant: str, params: SearchParams,
              combiner: Combiner, dask: Any, progress: Executions | None,
              stop: StopFlag) -> None:
    try:
        import distributed
    except ImportError:
        raise InputError("--dask: dask.distributed is not installed "
                         "(pip install 'kvmmem[dask]')") from None
    lib: Any = distributed  # untyped library: its calls are checked by the tests
    own = not isinstance(dask, lib.Client)
    try:
        client = lib.Client(dask) if own else dask
    except OSError as err:
        raise InputError(f"--dask: cannot reach the scheduler at {dask!r} ({err})") from None
    except (ValueError, TypeError) as err:  # distributed's address parsing
        raise InputError(f"--dask: {dask!r} is not a scheduler address like "
                         f"tcp://HOST:8786 ({err})") from None
    try:
        workers = max(1, sum(client.nthreads().values()))

        def submit(task: Task) -> Any:
            return client.submit(run_task, scenario, arch, variant, params, task, pure=False)

        def wait_some(futures: list[Any]) -> list[Any]:
            try:
                return list(lib.wait(futures, timeout=PROGRESS_INTERVAL * 2,
                                     return_when="FIRST_COMPLETED").done)
            except TimeoutError:
                return []

        def wind_down(futures: list[Any]) -> list[TaskResult]:
            # a remote task cannot be asked to stop early: what it did is lost
            if futures:
                client.cancel(futures)
            return []

        def poll() -> None:
            if progress is not None:
                progress(sum(r.executions for r in combiner.results.values()))

        _drive(submit, wait_some, wind_down, combiner, workers * 2, poll, stop)
    finally:
        if own:
            client.close()
