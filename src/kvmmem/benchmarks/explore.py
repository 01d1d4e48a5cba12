"""What the explorer costs, and what DPOR saves, on the bundled races.

For each race and architecture (upstream):

* ``dpor`` - executions to exhaust the scenario, distinct states, executions
  per second;
* ``dfs`` - the executions plain DFS needs to exhaust it, counted exactly
  from the state graph (:func:`~kvmmem.explore.search.count_dfs_executions`),
  its executions per second over a budgeted run and, where the count is within
  ``full_limit``, a full DFS run whose verdict must equal DPOR's;
* for every broken variant that the race catches: executions until the
  first violation, DFS against DPOR (both must report the violation).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from kvmmem.explore import SearchParams, explore
from kvmmem.explore.search import count_dfs_executions
from kvmmem.scenario.loader import load_scenario
from kvmmem.scenario.model import Scenario
from kvmmem.variants import MUTATIONS

from .common import Tick, no_tick

BROKEN = (*MUTATIONS, "linux-5.4")


@dataclass(slots=True)
class RaceFigures:
    """One race on one architecture (see the module docstring)."""

    scenario: str
    arch: str
    dpor_executions: int
    dpor_states: int
    dpor_per_s: float
    dfs_executions: int
    dfs_per_s: float
    dfs_verdict: str
    """``exhausted`` when DFS was run to the end, else ``not run``."""
    violations: dict[str, tuple[int, int]] = field(default_factory=dict)
    """broken variant -> (dfs executions, dpor executions) to the first violation."""

    @property
    def ratio(self) -> float:
        """Plain DFS executions per DPOR execution."""
        return self.dfs_executions / self.dpor_executions


def races(directory: Path) -> list[Scenario]:
    """The bundled races (``race-*.yaml``) in file-name order."""
    return [load_scenario(p) for p in sorted(directory.glob("race-*.yaml"))]


def ticks(scenarios: list[Scenario]) -> int:
    """How many ticks :func:`measure` makes for these scenarios."""
    return sum(len(s.arches) for s in scenarios)


def measure(scenarios: list[Scenario], *, dfs_sample: int, full_limit: int,
            tick: Tick = no_tick) -> list[RaceFigures]:
    """The figures for every race and architecture.  ``dfs_sample``: executions
    of the budgeted DFS run that gives its rate; ``full_limit``: run DFS to
    exhaustion when it needs at most that many executions.  Raises
    RuntimeError if DFS and DPOR ever disagree on a verdict."""
    out: list[RaceFigures] = []
    for scenario in scenarios:
        for arch in scenario.arches:
            start = time.perf_counter()
            dpor = explore(scenario, arch, "upstream", SearchParams(strategy="dpor"))
            dpor_s = time.perf_counter() - start
            total = count_dfs_executions(scenario, arch, "upstream")
            budget = total if total <= full_limit else dfs_sample
            start = time.perf_counter()
            dfs = explore(scenario, arch, "upstream",
                          SearchParams(strategy="dfs", max_executions=budget))
            dfs_s = time.perf_counter() - start
            if total <= full_limit and dfs.verdict != dpor.verdict:
                raise RuntimeError(f"{scenario.name} {arch}: dfs says {dfs.verdict}, "
                                   f"dpor {dpor.verdict}")
            figures = RaceFigures(scenario.name, arch, dpor.executions, dpor.distinct_states,
                                  dpor.executions / dpor_s, total, dfs.executions / dfs_s,
                                  dfs.verdict if total <= full_limit else "not run")
            for variant in BROKEN:
                reduced = explore(scenario, arch, variant, SearchParams(strategy="dpor"))
                if reduced.verdict != "violation":
                    continue
                plain = explore(scenario, arch, variant, SearchParams(strategy="dfs"))
                if plain.verdict != "violation":
                    raise RuntimeError(f"{scenario.name} {arch} {variant}: dpor found a "
                                       f"violation, dfs says {plain.verdict}")
                figures.violations[variant] = (plain.executions, reduced.executions)
            out.append(figures)
            tick(f"{scenario.name} {arch}")
    return out
