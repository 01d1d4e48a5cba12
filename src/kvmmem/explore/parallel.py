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
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
from typing import Any

from kvmmem.errors import InputError
from kvmmem.scenario.model import Scenario

from .search import Combined, Combiner, SearchParams, Task, root_tasks, run_task


def run_tasks(scenario: Scenario, arch: str, variant: str, params: SearchParams,
              *, workers: int = 1, dask: Any = None, progress: Any = None) -> Combined:
    """Run a search's tasks (and the subtasks they hand back) and combine
    their results (see the module docstring)."""
    combiner = Combiner(params, root_tasks(params))
    if dask is not None:
        _run_dask(scenario, arch, variant, params, combiner, dask, progress)
    elif workers > 1:
        _run_processes(scenario, arch, variant, params, combiner, workers, progress)
    else:
        while not combiner.settled():
            task = combiner.pending()[0]
            combiner.add(run_task(scenario, arch, variant, params, task))
            _report(progress, combiner)
    return combiner.combine()


def _report(progress: Any, combiner: Combiner) -> None:
    if progress is not None:
        progress(len(combiner.results), len(combiner.tasks))


def _drive(submit: Any, wait_one: Any, cancel: Any, combiner: Combiner, limit: int,
           progress: Any) -> None:
    """Keep up to ``limit`` tasks in flight, earliest in task order first,
    until the answer is settled."""
    inflight: dict[Any, tuple[int, ...]] = {}
    started: set[tuple[int, ...]] = set()
    try:
        while not combiner.settled():
            for task in combiner.pending():
                if len(inflight) >= limit:
                    break
                if task.index not in started:
                    started.add(task.index)
                    inflight[submit(task)] = task.index
            fut = wait_one(list(inflight))
            del inflight[fut]
            combiner.add(fut.result())
            _report(progress, combiner)
    finally:
        cancel(list(inflight))


def _run_processes(scenario: Scenario, arch: str, variant: str, params: SearchParams,
                   combiner: Combiner, workers: int, progress: Any) -> None:
    ctx = multiprocessing.get_context("fork")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        def submit(task: Task) -> Any:
            return pool.submit(run_task, scenario, arch, variant, params, task)

        def wait_one(futures: list[Any]) -> Any:
            done, _ = cf.wait(futures, return_when=cf.FIRST_COMPLETED)
            return min(done, key=futures.index)

        def cancel(futures: list[Any]) -> None:
            for fut in futures:
                fut.cancel()

        _drive(submit, wait_one, cancel, combiner, workers * 2, progress)


def _run_dask(scenario: Scenario, arch: str, variant: str, params: SearchParams,
              combiner: Combiner, dask: Any, progress: Any) -> None:
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

        def wait_one(futures: list[Any]) -> Any:
            done = lib.wait(futures, return_when="FIRST_COMPLETED").done
            return min(done, key=futures.index)

        def cancel(futures: list[Any]) -> None:
            if futures:
                client.cancel(futures)

        _drive(submit, wait_one, cancel, combiner, workers * 2, progress)
    finally:
        if own:
            client.close()
