"""Printing exploration results: verdict lines, metrics and the column trace.

Only the failing execution is printed: numbered transitions, one column per
thread (STYLE.md, loom/shuttle), then the invariant, its detail, the state
that breaks it and the replay token.
"""

from __future__ import annotations

import shlex
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from .execution import TraceEvent, Violation
from .explorer import ExploreResult, ReplayResult, SearchProgress
from .token import Token


def progress_text(p: SearchProgress) -> str:
    """How far a search is, for the progress line: ``1,234/129,381 executions``
    (plain dfs, counted), ``1,234/~5,000 executions (estimated)``,
    ``1,234/200,000 executions (the budget)`` or, for dpor,
    ``1,234 executions (at most 200,000: the budget)``."""
    done = f"{p.executions:,}"
    if p.kind == "exact":
        return f"{done}/{p.total:,} executions"
    if p.kind == "estimate":
        return f"{done}/~{p.total:,} executions (estimated)"
    if p.kind == "budget":
        more = f"; ~{p.schedules:,} schedules in all" if p.schedules else ""
        return f"{done}/{p.total:,} executions (the budget{more})"
    return f"{done} executions (at most {p.total:,}: the budget)"


def verdict_line(result: ExploreResult) -> str:
    """``NAME  ARCH  VARIANT  VERDICT  executions ...`` in one line."""
    return (f"{result.scenario}  {result.arch}  {result.variant}  {result.verdict.upper()}  "
            f"strategy {result.strategy}, executions {result.executions}, steps {result.steps}, "
            f"max preemptions {result.max_preemptions}, distinct states "
            f"{result.distinct_states}, {result.seconds:.2f}s ({result.rate:.0f} executions/s)")


def trace_table(threads: list[str], trace: list[TraceEvent]) -> Table:
    """An execution as a table: ``#`` then one column per thread."""
    table = Table(box=box.SIMPLE_HEAD, show_lines=False, pad_edge=False)
    table.add_column("#", justify="right", style="dim")
    for name in threads:
        table.add_column(name, overflow="fold")
    for event in trace:
        cells = [""] * len(threads)
        cells[event.thread] = "\n".join(event.lines)
        table.add_row(str(event.number), *cells)
    return table


def print_result(console: Console, result: ExploreResult, source: str = "FILE") -> None:
    """The verdict, the step outcomes seen and, on a violation, the
    counterexample (trace, invariant, state, token).  ``source``: the scenario
    file, as the replay command line names it."""
    console.print(verdict_line(result), soft_wrap=True)
    if result.verdict == "interrupted":
        console.print("  interrupted (Ctrl-C) before the search ended: the counts and "
                      "outcomes are those of the executions run", soft_wrap=True)
    for thread, steps in result.outcomes.items():
        for i, outs in enumerate(steps):
            if outs:
                console.print(f"  {thread}[{i}]: " + " | ".join(outs))
    for note in result.notes:
        console.print(f"[yellow]note (path-independence): {note}[/]")
    v = result.violation
    if v is None:
        return
    console.print()
    console.print(trace_table(result.threads, result.trace))
    _print_violation(console, result.threads, v)
    console.print(f"replay: kvmmem explore {shlex.quote(source)} --replay {result.token}",
                  soft_wrap=True, markup=False, highlight=False)
    if result.replay_file is not None:
        console.print(f"replay token written to {result.replay_file}", soft_wrap=True)


def _print_violation(console: Console, threads: list[str], v: Violation) -> None:
    who = f" (after transition {v.after}" + \
        (f", thread {threads[v.thread]})" if v.thread is not None else ")")
    console.print(f"[bold red]violation[/]: {v.invariant}{who}")
    console.print(f"  {v.detail}")
    console.print("state:")
    for line in v.state:
        console.print(f"  {line}")


def print_replay(console: Console, scenario: str, token: Token, replayed: ReplayResult) -> None:
    """A replayed schedule: every transition, one column per thread, and the
    violation it ends in (if any)."""
    verdict = "VIOLATION" if replayed.violation is not None else "no violation"
    console.print(f"{scenario}  {token.arch}  {token.variant}  replay: {verdict}, "
                  f"{len(replayed.schedule)} transitions")
    console.print(trace_table(replayed.threads, replayed.trace))
    if replayed.violation is not None:
        _print_violation(console, replayed.threads, replayed.violation)


def replay_json(scenario: str, token: Token, replayed: ReplayResult) -> dict[str, Any]:
    """``kvmmem explore --replay --json``: the run object of an exploration
    with verdict ``violation`` or ``ok``, each thread's step outcomes (the
    SCENARIOS.md outcome objects) and the replayed execution."""
    v = replayed.violation
    return {
        "scenario": scenario, "arch": token.arch, "variant": token.variant,
        "verdict": "violation" if v is not None else "ok", "executions": 1,
        "violations": [] if v is None else [v.to_json()],
        "schedule": token.encode(), "replay": True,
        "outcomes": dict(zip(replayed.threads, replayed.outcomes, strict=True)),
        "trace": [{"event": e.number, "thread": replayed.threads[e.thread], "lines": e.lines}
                  for e in replayed.trace],
        **({"state": v.state} if v is not None else {}),
    }
