"""Printing exploration results: verdict lines, metrics and the column trace.

Only the failing execution is printed: numbered transitions, one column per
thread (STYLE.md, loom/shuttle), then the invariant, its detail, the state
that breaks it and the replay token.
"""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

from .explorer import ExploreResult


def verdict_line(result: ExploreResult) -> str:
    """``NAME  ARCH  VARIANT  VERDICT  executions ...`` in one line."""
    return (f"{result.scenario}  {result.arch}  {result.variant}  {result.verdict.upper()}  "
            f"strategy {result.strategy}, executions {result.executions}, steps {result.steps}, "
            f"max preemptions {result.max_preemptions}, distinct states "
            f"{result.distinct_states}, {result.seconds:.2f}s ({result.rate:.0f} executions/s)")


def trace_table(result: ExploreResult) -> Table:
    """The failing execution as a table: ``#`` then one column per thread."""
    table = Table(box=box.SIMPLE_HEAD, show_lines=False, pad_edge=False)
    table.add_column("#", justify="right", style="dim")
    for name in result.threads:
        table.add_column(name, overflow="fold")
    for event in result.trace:
        cells = [""] * len(result.threads)
        cells[event.thread] = "\n".join(event.lines)
        table.add_row(str(event.number), *cells)
    return table


def print_result(console: Console, result: ExploreResult) -> None:
    """The verdict, the step outcomes seen and, on a violation, the
    counterexample (trace, invariant, state, token)."""
    console.print(verdict_line(result))
    for thread, steps in result.outcomes.items():
        for i, outs in enumerate(steps):
            if outs:
                console.print(f"  {thread}[{i}]: " + " | ".join(outs))
    v = result.violation
    if v is None:
        return
    console.print()
    console.print(trace_table(result))
    who = f" (after transition {v.after}" + \
        (f", thread {result.threads[v.thread]})" if v.thread is not None else ")")
    console.print(f"[bold red]violation[/]: {v.invariant}{who}")
    console.print(f"  {v.detail}")
    console.print("state:")
    for line in v.state:
        console.print(f"  {line}")
    console.print(f"replay: kvmmem explore FILE --replay {result.token}")
    if result.replay_file is not None:
        console.print(f"replay token written to {result.replay_file}")
