"""bench/bench_explore.py's measurements (kvmmem.benchmarks.explore) on the
smallest race: counts and verdicts only, never a time."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from kvmmem.benchmarks import explore as bench

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"


def test_measure_small_race() -> None:
    race = next(s for s in bench.races(SCENARIOS) if s.name == "race-prefault-vs-munmap")
    rows = bench.measure([dataclasses.replace(race, arches=("x86",))], dfs_sample=20,
                         full_limit=6000)  # plain DFS needs 5056 executions
    (row,) = rows
    assert row.dfs_verdict == "exhausted" and row.ratio >= 10
    # x86 KVM_PRE_FAULT_MEMORY without the retry installs the page munmap frees
    assert set(row.violations) == {"no-invalidate-retry"}
    dfs, dpor = row.violations["no-invalidate-retry"]
    assert dfs >= dpor >= 1
    assert row.dpor_per_s > 0 and row.dfs_per_s > 0
