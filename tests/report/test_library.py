"""The bundled scenario library (issue 5): at least 25 files, each with a
description saying what it shows and at least one expectation; the
decision-table rows and the named selftests are all there.  (That every
file's expectations hold on its architectures is tests/scenario/test_bundled.py.)"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

from kvmmem.scenario.loader import load_scenario

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"
FILES = sorted(SCENARIOS.glob("*.yaml"))


def test_library_size() -> None:
    assert len(FILES) >= 25


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_each_file_describes_and_expects(path: Path) -> None:
    scn = load_scenario(path)
    assert len(scn.description.split()) >= 25, "describe what the scenario shows"
    expects = [s for s in scn.all_steps() if s.expect] + [s for s in scn.memslots if s.expect]
    assert expects, "at least one expectation"
    if not path.name.startswith("race-") and path.name != "quickstart.yaml":
        assert scn.name == path.stem, "the scenario is named like its file"


@cache
def _descriptions() -> str:
    return "\n".join(load_scenario(p).description for p in FILES)


@cache
def _row_descriptions() -> str:
    return " ".join(" ".join(load_scenario(p).description for p in FILES
                             if p.name.startswith("row-")).split())


@pytest.mark.parametrize("selftest", [
    "set_memory_region_test", "mmu_stress_test", "dirty_log_test", "pre_fault_memory_test",
    "page_fault_test",
])
def test_selftest_ports_are_bundled(selftest: str) -> None:
    """The issue's selftest ports (readonly memory is page_fault_test's RO-slot part)."""
    assert selftest in _descriptions().replace("\n", " ")


@pytest.mark.parametrize("row", [
    "read", "write", "instruction fetch", "anon page present", "page absent",
    "VMA PROT_READ", "PROT_NONE", "no VMA at hva", "exec / normal RAM",
    "VM_PFNMAP non-cacheable", "VM_PFNMAP, PTE absent", "VM_PFNMAP, host PTE read-only",
    "READONLY / read", "READONLY / write", "LOG_DIRTY / read", "LOG_DIRTY / write",
    "LOG_DIRTY+READONLY",
])
def test_decision_table_rows_are_bundled(row: str) -> None:
    """Every modelled row of kernel-semantics.md §3.5 is named by a row-* file."""
    assert row in _row_descriptions()
