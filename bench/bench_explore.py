"""The explorer on the bundled races: DPOR against plain DFS.

The measurements live in :mod:`kvmmem.benchmarks.explore`; this script prints
them (``python bench/bench_explore.py [--quick]``): per race and architecture
the executions DPOR needs to exhaust the scenario and those plain DFS needs
(counted exactly from the state graph; DFS is also run to the end where that
takes at most ``--full-limit`` executions, and its verdict must match), both
rates in executions per second, and, for each broken variant the race catches,
the executions until the first violation under DFS and under DPOR.  A rich
progress bar is shown only when stdout is a terminal.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from kvmmem.benchmarks import explore as bench
from kvmmem.benchmarks.common import progress

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"


def format_table(rows: list[bench.RaceFigures]) -> list[str]:
    """The figures as plain-text lines."""
    head = (f"{'race':30} {'arch':6} {'dpor ex':>8} {'states':>6} {'dpor ex/s':>9} "
            f"{'dfs ex':>9} {'dfs/dpor':>8} {'dfs ex/s':>8} {'dfs run':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.scenario:30} {r.arch:6} {r.dpor_executions:8d} {r.dpor_states:6d} "
                     f"{r.dpor_per_s:9.0f} {r.dfs_executions:9d} {r.ratio:8.0f} "
                     f"{r.dfs_per_s:8.0f} {r.dfs_verdict:>9}")
    lines += ["", "executions to the first violation (dfs / dpor):", ""]
    for r in rows:
        for variant, (dfs, dpor) in r.violations.items():
            lines.append(f"  {r.scenario:30} {r.arch:6} {variant:24} {dfs:6d} / {dpor:4d}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="x86 only, DFS rate over 100 executions, full DFS up to 1000")
    parser.add_argument("--full-limit", type=int, default=None,
                        help="run plain DFS to the end when it needs at most this many "
                             "executions (default 20000; --quick 1000)")
    args = parser.parse_args(argv)
    full_limit = args.full_limit if args.full_limit is not None else \
        (1000 if args.quick else 20000)
    if full_limit < 0:
        parser.error("--full-limit: must be >= 0")
    scenarios = bench.races(SCENARIOS)
    if args.quick:
        scenarios = [dataclasses.replace(s, arches=("x86",)) for s in scenarios]
    with progress("explore", bench.ticks(scenarios)) as tick:
        rows = bench.measure(scenarios, dfs_sample=100 if args.quick else 1000,
                             full_limit=full_limit, tick=tick)
    print("\n".join(format_table(rows)))
    ratios = [r.ratio for r in rows if r.dfs_executions > 2 * r.dpor_executions]
    if ratios:
        print(f"\nDPOR runs {min(ratios):.0f}x to {max(ratios):.0f}x fewer executions than "
              "plain DFS where the threads interleave")
    return 0


if __name__ == "__main__":
    sys.exit(main())
