"""Progress and Ctrl-C (issue 17): a search reports the executions done out of
the exact (plain dfs: counted from the state graph), estimated or budgeted
total; SIGINT stops it cleanly (locally, on worker processes, on Dask) with the
partial summary, verdict ``interrupted``, exit status 130, no process left.

The progress bar itself needs a terminal (CliRunner's output is not one): the
callback and the formatter are tested directly, the command line for staying
quiet when piped and for its summary."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvmmem.cli import app
from kvmmem.explore import SearchParams, explore
from kvmmem.explore.explorer import SearchProgress, planned_executions
from kvmmem.explore.report import progress_text
from kvmmem.explore.search import (
    Combiner,
    Stop,
    Task,
    count_dfs_executions,
    estimate_dfs_executions,
    root_tasks,
    run_task,
)
from kvmmem.scenario.loader import load_scenario

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"
ROOT = SCENARIOS.parent
PREFAULT = load_scenario(SCENARIOS / "race-prefault-vs-munmap.yaml")
MPROTECT_FILE = SCENARIOS / "race-fault-vs-mprotect.yaml"
MPROTECT = load_scenario(MPROTECT_FILE)


# --- the formatter and the planned total -------------------------------------------------


def test_progress_text_says_exact_estimated_budget_or_bound() -> None:
    assert progress_text(SearchProgress(1234, 129381, "exact")) == \
        "1,234/129,381 executions"
    assert progress_text(SearchProgress(12, 5000, "estimate")) == \
        "12/~5,000 executions (estimated)"
    assert progress_text(SearchProgress(7, 200000, "budget")) == \
        "7/200,000 executions (the budget)"
    assert progress_text(SearchProgress(7, 200000, "budget", schedules=1500000)) == \
        "7/200,000 executions (the budget; ~1,500,000 schedules in all)"
    assert progress_text(SearchProgress(103, 200000, "bound")) == \
        "103 executions (at most 200,000: the budget)"


def test_planned_total_per_strategy() -> None:
    """Plain dfs: the exact count (capped: the budget); dpor: the budget as a
    bound; random and pct: the budget; dfs with a preemption bound: Knuth's
    estimate."""
    dfs = SearchParams(strategy="dfs")
    assert planned_executions(PREFAULT, "x86", "upstream", dfs) == \
        SearchProgress(0, count_dfs_executions(PREFAULT, "x86", "upstream"), "exact")
    assert planned_executions(PREFAULT, "x86", "upstream",
                              SearchParams(strategy="dfs", max_executions=100)) == \
        SearchProgress(0, 100, "budget")
    assert planned_executions(PREFAULT, "x86", "upstream", SearchParams()) == \
        SearchProgress(0, 200_000, "bound")
    for strategy in ("random", "pct"):
        assert planned_executions(PREFAULT, "x86", "upstream",
                                  SearchParams(strategy=strategy, max_executions=64)) == \
            SearchProgress(0, 64, "budget")
    bounded = planned_executions(PREFAULT, "x86", "upstream",
                                 SearchParams(strategy="dfs", preemptions=1))
    ran = explore(PREFAULT, "x86", "upstream", SearchParams(strategy="dfs", preemptions=1))
    assert bounded.kind == "estimate"
    assert ran.executions / 4 <= bounded.total <= ran.executions * 4, (bounded, ran.executions)


def test_a_count_that_takes_too_long_becomes_an_estimate(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Counting gives up after COUNT_SECONDS; the total is then estimated (and
    shown with ``~``), or the budget when the estimate is larger."""
    import kvmmem.explore.explorer as explorer

    monkeypatch.setattr(explorer, "COUNT_SECONDS", -1.0)
    planned = planned_executions(MPROTECT, "x86", "upstream", SearchParams(strategy="dfs"))
    assert planned.kind == "estimate" and 30_000 < planned.total < 500_000
    assert progress_text(planned).startswith("0/~")
    small = planned_executions(MPROTECT, "x86", "upstream",
                               SearchParams(strategy="dfs", max_executions=1000))
    assert small.kind == "budget" and small.total == 1000
    assert small.schedules is not None and small.schedules > 1000


def test_knuth_estimate_is_near_the_count() -> None:
    """Unbounded, the estimate tracks count_dfs_executions: it is rough (a
    product of branching factors has a heavy tail), within a factor of 4 over
    256 probes on these races (seeded: the same every run)."""
    for scenario in (PREFAULT, MPROTECT):
        exact = count_dfs_executions(scenario, "x86", "upstream")
        guess = estimate_dfs_executions(scenario, "x86", "upstream", probes=256)
        assert exact / 4 <= guess <= exact * 4, (scenario.name, exact, guess)


def test_counting_is_cheap_next_to_the_search() -> None:
    """The count costs a pass over the state graph: well under a second on a
    bundled race whose plain DFS runs for minutes."""
    start = time.perf_counter()
    total = count_dfs_executions(MPROTECT, "x86", "upstream")
    assert total > 100_000
    assert time.perf_counter() - start < 5


# --- progress during a search --------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_progress_counts_every_execution(workers: int) -> None:
    """The first report is the plan (0 executions of the exact total), the
    last one the executions run, which for an exhausted dfs is the count."""
    seen: list[SearchProgress] = []
    result = explore(PREFAULT, "x86", "upstream", SearchParams(strategy="dfs", split=100),
                     workers=workers, progress=seen.append)
    assert result.verdict == "exhausted"
    total = count_dfs_executions(PREFAULT, "x86", "upstream")
    assert seen[0] == SearchProgress(0, total, "exact")
    assert seen[-1] == SearchProgress(result.executions, total, "exact")
    assert result.executions == total
    done = [p.executions for p in seen]
    assert done == sorted(done)


def test_no_progress_asked_no_count() -> None:
    """Without a progress callback nothing is counted (the library and the
    bench pay nothing)."""
    import kvmmem.explore.explorer as explorer

    def boom(*_: object, **__: object) -> SearchProgress:
        raise AssertionError("planned_executions called")

    saved = explorer.planned_executions
    explorer.planned_executions = boom  # type: ignore[assignment]
    try:
        explore(PREFAULT, "arm64", "upstream", SearchParams(strategy="dfs"))
    finally:
        explorer.planned_executions = saved


def test_a_budgeted_dfs_task_stops_at_the_budget() -> None:
    """A task runs min(split, budget) executions before it splits: a dfs run with
    --max-executions 5 runs 5 executions, not a whole 4096-execution task."""
    params = SearchParams(strategy="dfs", max_executions=5)
    result = run_task(MPROTECT, "x86", "upstream", params, Task(()))
    assert result.executions == 5 and result.subtasks


def test_a_stopped_task_keeps_what_it_explored() -> None:
    """A tick raising Stop ends the task after that execution; the combiner's
    partial result counts it, verdict interrupted, and is not settled."""
    params = SearchParams(strategy="dfs")
    n = 0

    def tick() -> None:
        nonlocal n
        n += 1
        if n == 7:
            raise Stop

    result = run_task(MPROTECT, "x86", "upstream", params, Task(()), tick)
    assert result.stopped and not result.complete and result.executions == 7
    assert not result.subtasks
    combiner = Combiner(params, root_tasks(params))
    combiner.add(result)
    assert not combiner.settled()
    partial = combiner.partial()
    assert partial.verdict == "interrupted" and partial.executions == 7
    assert len(partial.states) == len(result.states) > 0
    assert partial.found is None


def _interrupt_soon(after: float) -> threading.Timer:
    timer = threading.Timer(after, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    return timer


@pytest.mark.parametrize("workers", [1, 2])
def test_sigint_in_process_returns_the_partial_result(workers: int) -> None:
    """explore() in the main thread: SIGINT stops the search (it would run for
    minutes) after the executions under way; the result is interrupted, with
    what was explored, and exit status 130."""
    seen: list[SearchProgress] = []
    start = time.perf_counter()
    timer = _interrupt_soon(1.5)
    try:
        result = explore(MPROTECT, "x86", "upstream", SearchParams(strategy="dfs"),
                         workers=workers, progress=seen.append)
    finally:
        timer.cancel()
    assert time.perf_counter() - start < 30
    assert result.verdict == "interrupted" and result.exit_status == 130
    assert 0 < result.executions < seen[0].total
    assert result.distinct_states > 0 and result.violation is None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert result.to_json()["verdict"] == "interrupted"


def test_sigint_during_a_dask_search() -> None:
    """On Dask the tasks in flight are cancelled; the result is interrupted."""
    distributed = pytest.importorskip("distributed", reason="the kvmmem[dask] extra is "
                                      "not installed")
    dask = pytest.importorskip("dask")
    with tempfile.TemporaryDirectory(prefix="kvmmem-dask-") as scratch, \
            dask.config.set({"temporary-directory": scratch}), \
            distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                     dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        timer = _interrupt_soon(2.0)
        try:
            result = explore(MPROTECT, "x86", "upstream",
                             SearchParams(strategy="dfs", split=200), dask=client)
        finally:
            timer.cancel()
    assert result.verdict == "interrupted" and result.exit_status == 130
    assert result.executions < count_dfs_executions(MPROTECT, "x86", "upstream")


# --- the command line ------------------------------------------------------------------


def test_cli_budget_summary_and_no_progress_when_piped() -> None:
    """A tiny budget: the summary line with its counts, no progress text (not
    a terminal), and quickly (the task stops at the budget)."""
    start = time.perf_counter()
    res = CliRunner().invoke(app, ["explore", str(MPROTECT_FILE), "--strategy", "dfs",
                                   "--arch", "x86", "--max-executions", "5"])
    assert res.exit_code == 0, res.output
    line = res.output.splitlines()[0]
    assert "BUDGET" in line and "strategy dfs, executions 5," in line
    assert "distinct states" in line
    assert "/129,381" not in res.output and "counting" not in res.output
    assert time.perf_counter() - start < 10


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "--ppid", str(pid), "-o", "pid="], capture_output=True,
                         text=True, check=False).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize("extra", [[], ["--workers", "2"], ["--json"],
                                   ["--json", "--workers", "2"]],
                         ids=["local", "workers", "json", "json-workers"])
def test_sigint_prints_the_partial_summary_and_exits_130(extra: list[str]) -> None:
    """`python -m kvmmem.cli explore RACE --strategy dfs` (minutes to exhaust),
    SIGINT once it runs: exit status 130, the summary with verdict interrupted
    (in --json the result object), and no worker process left."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmmem.cli", "explore", str(MPROTECT_FILE), "--strategy",
         "dfs", "--arch", "x86", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        workers = "--workers" in extra
        deadline = time.monotonic() + 30
        kids: list[int] = []
        while time.monotonic() < deadline:  # started: the workers are up, or 2 s
            time.sleep(0.5)
            kids = _children(proc.pid)
            if (len(kids) >= 2 if workers else time.monotonic() > deadline - 28):
                break
        assert proc.poll() is None, proc.communicate()
        if workers:
            assert len(kids) >= 2
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err, err
    if "--json" in extra:
        result = json.loads(out)
        assert result["verdict"] == "interrupted"
        assert result["executions"] > 0 and result["distinct_states"] > 0
        assert result["violations"] == []
    else:
        line = out.splitlines()[0]
        assert "INTERRUPTED" in line and "strategy dfs, executions" in line
        assert "distinct states" in line
        assert "interrupted (Ctrl-C)" in out
    assert not [k for k in kids if _alive(k)], kids
