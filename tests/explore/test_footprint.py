"""Footprints and the incremental checks (kvmmem.explore.footprint, issue 16).

* The independence relation is a claim about the model (what a guest access
  reads); here it is held against the model itself: from random states of the
  bundled races and of the three- and four-thread races, every pair of
  enabled transitions whose footprints say they commute is run in both orders,
  and both orders must reach the same state with the same step outcomes.
* The incremental invariant check (only the pages a transition changed) and
  the full one agree after every transition of every search of the bundled
  races (``Execution.cross_check`` runs both and raises on a difference).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmmem.explore import SearchParams, explore
from kvmmem.explore.execution import Execution
from kvmmem.explore.footprint import Footprint
from kvmmem.scenario.loader import load_scenario
from kvmmem.scenario.model import Scenario

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"
RACES = sorted(SCENARIOS.glob("race-*.yaml"))


def _run(scenario: Scenario, arch: str, schedule: list[int]) -> Execution:
    ex = Execution(scenario, arch, "upstream")
    for tid in schedule:
        assert tid in ex.enabled()
        assert ex.step(tid) is not None
    return ex


def _footprint(scenario: Scenario, arch: str, prefix: list[int], tid: int) -> tuple[
        Footprint, Execution]:
    """The footprint of ``tid``'s transition after ``prefix``, and the execution after it."""
    ex = _run(scenario, arch, prefix)
    before = ex.observe()
    reads = ex.reads(tid)
    locks = ex.step(tid)
    assert locks is not None
    after = ex.observe()
    writes, glob = ex.tracker.writes(before.view, after.view)
    glob = glob or before.glob != after.glob or (reads is not None and not writes <= reads)
    return Footprint(writes, glob, reads, locks.locks), ex


def _pairs(scenario: Scenario, arch: str, rng: random.Random, samples: int
           ) -> Iterator[tuple[list[int], int, int]]:
    """Random (prefix, a, b): a state reached by a random schedule and two of its
    enabled threads."""
    for _ in range(samples):
        ex = Execution(scenario, arch, "upstream")
        prefix: list[int] = []
        stop = rng.randrange(0, 40)
        while not ex.finished and len(prefix) < stop:
            enabled = ex.enabled()
            if not enabled:
                break
            tid = rng.choice(enabled)
            if ex.step(tid) is None:
                break
            prefix.append(tid)
        if ex.violation is not None or ex.finished:
            continue
        enabled = ex.enabled()
        if len(enabled) >= 2:
            a, b = rng.sample(enabled, 2)
            yield prefix, a, b


def _independent_pairs_commute(scenario: Scenario, samples: int, seed: int) -> int:
    rng = random.Random(seed)
    commuting = 0
    for arch in scenario.arches:
        for prefix, a, b in _pairs(scenario, arch, rng, samples):
            fa, ex_a = _footprint(scenario, arch, prefix, a)
            fb, ex_b = _footprint(scenario, arch, prefix, b)
            if not fa.independent(fb):
                continue
            # both orders: each must still be able to run the other's transition
            assert b in ex_a.enabled() and a in ex_b.enabled(), (arch, prefix, a, b)
            assert ex_a.step(b) is not None and ex_b.step(a) is not None
            assert ex_a.observe().full == ex_b.observe().full, (arch, prefix, a, b)
            assert ex_a.outcomes == ex_b.outcomes
            commuting += 1
    return commuting


@pytest.mark.parametrize("path", RACES, ids=lambda p: p.stem)
def test_independent_transitions_commute(path: Path) -> None:
    """Transitions the footprints call independent commute, on every bundled race."""
    scenario = load_scenario(path)
    _independent_pairs_commute(scenario, samples=25, seed=1)


THREE_PAGES = """
kvmmem: 1
name: two-vcpus-two-pages
vcpus: 2
arch: [x86, arm64, riscv]
memory:
  ram: {size: 64K, kind: anon, prot: rw, fill: 0x5a}
memslots:
  - {slot: 0, gpa: 0x0, size: 64K, memory: ram}
threads:
  vcpu0:
    - guest_write: {gpa: 0x0, size: 4, value: 1}
    - guest_read: {gpa: 0x0, size: 4}
  vcpu1:
    - guest_write: {gpa: 0x1000, size: 4, value: 2, vcpu: 1}
    - guest_read: {gpa: 0x1000, size: 4, vcpu: 1}
"""


def test_vcpus_on_different_pages_commute() -> None:
    """Two vCPUs on two pages: most of their transitions are independent (their
    first entry into the guest loads a root, which is global), and all of
    those commute."""
    from kvmmem.scenario.loader import load_scenario_text

    scenario = load_scenario_text(THREE_PAGES)
    assert _independent_pairs_commute(scenario, samples=40, seed=2) >= 20


@pytest.mark.parametrize("path", RACES, ids=lambda p: p.stem)
def test_incremental_checks_agree_with_full_checks(path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Every transition of the upstream search of each bundled race, on every
    architecture it names: the incremental check and the full one agree."""
    monkeypatch.setattr(Execution, "cross_check", True)
    scenario = load_scenario(path)
    for arch in scenario.arches:
        result = explore(scenario, arch, "upstream", SearchParams(strategy="dpor"))
        assert result.verdict == "exhausted"
