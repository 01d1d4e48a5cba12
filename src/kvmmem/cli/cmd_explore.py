"""``kvmmem explore``: every interleaving of a concurrent scenario's threads,
with a progress bar on a terminal.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from kvmmem.cli.common import _dumps, _fail, _split, _variant_pairs, _variants, app


@app.command()
def explore(
    file: Annotated[Path, typer.Argument(help="scenario file with threads (YAML, format v1)")],
    arch: Annotated[str | None, typer.Option(
        help="architectures, comma list (default: the file's)")] = None,
    variant: Annotated[str | None, typer.Option(
        help="variants, comma list: releases 5.4..7.3 (6.1), upstream, linux-5.4, "
             "mutations, RELEASE+MUTATION (default: the file's)")] = None,
    strategy: Annotated[str, typer.Option(help="dfs, dpor, random or pct")] = "dpor",
    preemptions: Annotated[int | None, typer.Option(
        help="preemption bound (dfs, dpor; default none) or bug depth - 1 (pct; default 2)")]
    = None,
    max_executions: Annotated[int | None, typer.Option(
        help="execution budget (default 200000 for dfs/dpor, 1000 for random/pct)")] = None,
    seed: Annotated[int, typer.Option(help="seed of random and pct")] = 0,
    workers: Annotated[int, typer.Option(help="local worker processes")] = 1,
    dask: Annotated[str | None, typer.Option(
        help="run the search on the Dask cluster whose scheduler is at this address "
             "(pip install 'kvmmem[dask]')")] = None,
    replay: Annotated[str | None, typer.Option(
        help="replay a schedule: a token printed by explore, or its .replay file")] = None,
    replay_dir: Annotated[Path, typer.Option(
        help="where the replay token of a violation is written")] = Path("."),
    explain: Annotated[str | None, typer.Option(
        metavar="",
        help="with --replay: show, for every step of the replayed execution, the kernel "
             "functions it went through and the one that decided its outcome (kvmmem run "
             "--explain)")] = None,
    determinism: Annotated[int, typer.Option(
        help="first run N random schedules twice each and compare the state after "
             "every transition (prints what it compared on stderr)")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object per run")]
    = False,
) -> None:
    """Explore every interleaving of a scenario's threads at the kernel's
    synchronisation points, checking every invariant after every step.

    Verdicts: exhausted (every schedule explored, no violation), budget (the
    budget ran out first), violation (the failing execution is printed, one
    column per thread, with a replay token, also written to a file).  A step
    expectation that fails in some interleaving is reported the same way.

    Progress (on a terminal): executions done out of the schedules counted
    (dfs) or the budget.  Ctrl-C stops the search and prints what it explored,
    verdict interrupted.

    Exit status: 0 no violation; 1 an expectation failed; 2 bad input; 3 an
    invariant was violated; 130 interrupted."""
    from kvmmem.explore import (
        NondeterminismError,
        SearchParams,
        Token,
        check_determinism,
        read_token,
        write_token,
    )
    from kvmmem.explore import explore as run_explore
    from kvmmem.explore import replay as run_replay
    from kvmmem.explore.report import print_replay, print_result, replay_json
    from kvmmem.kvm.vm import ARCHES
    from kvmmem.scenario.loader import load_scenario

    arches = _split(arch, ARCHES, "arch")
    variants = _variants(variant)
    if workers < 1:
        _fail("--workers: must be >= 1")
    if determinism < 0:
        _fail("--determinism: must be >= 0")
    if dask is not None and workers != 1:
        _fail("--dask and --workers: give one of them")
    params = SearchParams(strategy=strategy, preemptions=preemptions,
                          max_executions=max_executions, seed=seed)
    params.check()
    token = read_token(replay) if replay is not None else None
    scenario = load_scenario(file)
    if scenario.threads is None:
        _fail(f"{file}: this scenario has steps, not threads; run it with `kvmmem run`")
    # Piped output is not cut at 80 columns: a trace has a column per thread.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
    if token is not None:
        if arches is not None or variants is not None:
            _fail("--replay: the token names its architecture and variant; "
                  "drop --arch and --variant")
        explained: list[dict[str, Any]] = []
        if explain is not None:
            from kvmmem.report.explain import replay_explained

            replayed, explained = replay_explained(scenario, token)
        else:
            replayed = run_replay(scenario, token)
        if as_json:
            out = replay_json(scenario.name, token, replayed)
            if explain is not None:
                out["explain"] = explained
            typer.echo(_dumps(out))
        else:
            print_replay(console, scenario.name, token, replayed)
            if explained:
                from kvmmem.report.explain import explain_text

                for entry in explained:
                    console.print(f"[{entry['thread']}] " + explain_text(entry, entry["explain"]),
                                  highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(replayed.exit_status)
    if explain is not None:
        _fail("--explain: give it with --replay TOKEN (the paths of one execution's steps)")
    status = 0
    try:
        runs = _variant_pairs(scenario, arches or list(scenario.arches), variants,
                              arches is not None, "explore")
        for a, v0 in runs:
            v = v0 or scenario.variant
            if determinism:
                checked = check_determinism(scenario, a, v, samples=determinism, seed=seed)
                typer.echo(f"determinism: {scenario.name} {a} {v}: {checked.schedules} "
                           f"random schedules (seed {seed}) each run twice, the state "
                           f"fingerprint after every one of {checked.transitions} "
                           "transitions compared: identical", err=True)
            with _progress_bar(f"{scenario.name} {a} {v}") as progress:
                result = run_explore(scenario, a, v, params, workers=workers, dask=dask,
                                     progress=progress)
            if result.token is not None:
                try:
                    path = write_token(replay_dir, Token.decode(result.token))
                except OSError as err:
                    _fail(f"--replay-dir: cannot write the replay token: {err}")
                result.replay_file = str(path)
            if as_json:
                typer.echo(_dumps(result.to_json()))
            else:
                print_result(console, result, source=str(file))
            status = max(status, result.exit_status)
            if result.verdict == "interrupted":
                raise typer.Exit(result.exit_status)
    except NondeterminismError as err:
        _fail(f"the model is not deterministic: {err}", 3)
    raise typer.Exit(status)


@contextmanager
def _progress_bar(label: str) -> Iterator[Callable[[Any], None] | None]:
    """The progress of a search on stderr when it is a terminal (executions done
    and what they are out of: explore.report.progress_text); nothing when piped."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from kvmmem.explore.report import progress_text

    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                  TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(f"{label}: counting schedules", total=None)

        def update(p: Any) -> None:
            # dpor's budget is only a bound: the bar pulses
            bar.update(task, completed=p.executions,
                       total=None if p.kind == "bound" else p.total,
                       description=f"{label}: {progress_text(p)}")

        yield update
