"""``kvmmem compare``: a column per (architecture, variant), rows for steps
and counters, differences marked, exit status, JSON.

The counter rows also check decision-table facts that step outcomes cannot
show (kernel-semantics.md §3.5.2, §5, §6): whether a read already mapped a
page writable, block sizes, premapped vs faulted VM_PFNMAP ranges.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvmmem.cli import app
from kvmmem.report.compare import (
    COUNTERS,
    Comparison,
    compare_runs,
    comparison_table,
    summarize,
)
from kvmmem.scenario.loader import load_scenario, load_scenario_text

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"


def _cmp(name: str, arches: list[str], variants: list[str] | None = None) -> Comparison:
    scn = load_scenario(SCENARIOS / name)
    return compare_runs(scn, arches, variants or [scn.variant])


def _counter(cmp: Comparison, name: str) -> list[str]:
    return next(r.cells for r in cmp.rows if r.kind == "counter" and r.label == name)


def test_summaries() -> None:
    assert summarize({"result": "ok", "value": 0x5a}) == "ok 0x5a"
    assert summarize({"result": "ok", "dirty": [1, 2]}) == "ok dirty[0x1,0x2]"
    assert summarize({"result": "ok", "remaining": 4096}) == "ok left 0x1000"
    assert summarize({"result": "mmio", "gpa": 0x1000, "len": 4, "is_write": True,
                      "data": 7}) == "mmio W 0x1000/4 =0x7"
    assert summarize({"result": "mmio", "gpa": 0x1000, "len": 2, "is_write": False}) == \
        "mmio R 0x1000/2"
    assert summarize({"result": "fault", "gpa": 0x2000, "size": 4}) == "fault 0x2000"
    assert summarize({"result": "error", "errno": "EPERM"}) == "error EPERM"
    assert summarize({"result": "abort", "abort": "#UD"}) == "abort #UD"


def test_premap_vs_fault_across_variants() -> None:
    """The discussion's comparison: VM_PFNMAP premapped at memslot creation in
    2019 (arm64 kvm_phys_addr_ioremap, 16 x 4K pages) vs faulted in upstream;
    same outcomes but the first store's fault count (the file counts its faults: 1
    upstream, 0 after the premap), different counters, marked against the first
    column."""
    cmp = _cmp("pfnmap-faulted.yaml", ["arm64"], ["upstream", "linux-5.4"])
    assert [c.label for c in cmp.columns] == ["arm64 upstream", "arm64 linux-5.4"]
    assert [c.claimed for c in cmp.columns] == [True, False]
    steps = [r for r in cmp.rows if r.kind == "step"]
    assert [any(r.differs) for r in steps] == [True] + [False] * (len(steps) - 1)
    assert steps[0].cells == ["ok faults=1", "ok faults=0"]
    premapped = next(r for r in cmp.rows if r.label == "premapped_pages")
    assert premapped.cells == ["0", "16"]
    assert premapped.differs == [False, True]
    assert _counter(cmp, "pf_fixed") == ["1", "0"]
    assert cmp.exit_status == 0
    assert cmp.differences >= 2


def test_setup_difference_and_unclaimed_expectations() -> None:
    """ro-vma-at-create: riscv (upstream) and arm64 linux-5.4 refuse the slot
    with EPERM (kvm_arch_prepare_memory_region); their steps then miss the
    file's expectations, but those runs are not claimed by the file (riscv is
    not in its arch list, linux-5.4 not its variant), so the exit status is 0."""
    cmp = _cmp("ro-vma-at-create.yaml", ["x86", "arm64", "riscv"], ["upstream", "linux-5.4"])
    setup = next(r for r in cmp.rows if r.kind == "setup")
    labels = [c.label for c in cmp.columns]
    cells = dict(zip(labels, setup.cells, strict=True))
    assert cells["riscv upstream"] == "error EPERM"
    assert cells["arm64 linux-5.4"] == "error EPERM"
    assert cells["arm64 upstream"] == "ok"
    first_step = next(r for r in cmp.rows if r.kind == "step")
    failed = dict(zip(labels, first_step.failed, strict=True))
    assert failed["riscv upstream"] and not failed["x86 upstream"]
    assert cmp.exit_status == 0


def test_claimed_expectation_failure_exits_1() -> None:
    text = """\
kvmmem: 1
name: wrong
memory: {ram: {size: 64K, kind: anon, prot: rw}}
memslots: [{slot: 0, gpa: 0, size: 64K, memory: ram}]
steps:
  - guest_read: {gpa: 0x100000, size: 4}
    expect: {result: ok}
"""
    cmp = compare_runs(load_scenario_text(text), ["x86", "arm64"], ["upstream"])
    assert cmp.columns[0].claimed and not cmp.columns[1].claimed
    row = next(r for r in cmp.rows if r.kind == "step")
    assert row.failed == [True, True]
    assert cmp.exit_status == 1


def test_violation_exits_3_and_shows_stopped_steps() -> None:
    """The remapped-no-write-check mutation (hva_to_pfn_remapped ignoring the
    PTE's write bit, fixed by bd2fae8da794) maps a read-only device page
    writable: permission containment fails, the run stops, later cells are '-'."""
    cmp = _cmp("pfnmap-readonly-vma.yaml", ["x86"], ["upstream", "remapped-no-write-check"])
    result_row = next(r for r in cmp.rows if r.kind == "result")
    assert result_row.cells[0] == "held"
    assert result_row.cells[1].startswith("violated: ")
    last = [r for r in cmp.rows if r.kind == "step"][-1]
    assert last.cells[1] == "-"
    assert cmp.exit_status == 3
    data = cmp.to_json()
    json.dumps(data)
    assert data["status"] == 3
    assert data["columns"][1]["violations"]
    assert len(data["runs"]) == 2
    assert [r["label"] for r in data["rows"] if r["kind"] == "counter"] == list(COUNTERS)


@pytest.mark.parametrize(("name", "counter", "value"), [
    # §3.5.2 row 1: a read of a present writable page maps it RW; the write
    # then takes no second fault.
    ("row-ram-present.yaml", "pf_taken", "1"),
    # §3.5.2 row 2, shmem: the read fault maps the page writable at once.
    ("row-shmem-absent.yaml", "pf_taken", "1"),
    # §3.5.2 row 2, private anon: zero page read-only, the write faults again
    # (and once more: the COW's own notifier invalidation makes it retry).
    ("row-ram-absent-zero-page.yaml", "pf_fixed", "2"),
    ("row-ram-absent-zero-page.yaml", "pf_retry", "1"),
    # §6: a 2M hugetlb page behind a congruent slot is one 2M block; the
    # incongruent alias is mapped with 4K pages.
    ("row-huge-hugetlb.yaml", "pages_2m", "1"),
    ("row-huge-hugetlb.yaml", "pages_4k", "1"),
    # §3.5.2 READONLY / write: both stores are MMIO exits, no entry is made
    # for the page never read.
    ("row-readonly-slot.yaml", "mmio_exits", "2"),
    ("row-readonly-slot.yaml", "pages_4k", "1"),
])
def test_decision_table_counters_on_every_arch(name: str, counter: str, value: str) -> None:
    scn = load_scenario(SCENARIOS / name)
    cmp = compare_runs(scn, list(scn.arches), ["upstream"])
    assert _counter(cmp, counter) == [value] * len(scn.arches)


def test_prefault_maps_without_faults() -> None:
    """KVM_PRE_FAULT_MEMORY (§5) runs the fault path ahead of time: 32 pages
    pre-mapped, the guest's accesses fix no fault."""
    cmp = _cmp("prefault-one-path.yaml", ["x86"])
    assert _counter(cmp, "prefault_pages") == ["32"]
    assert _counter(cmp, "pf_fixed") == ["0"]


def test_x86_slot_delete_zaps_everything() -> None:
    """KVM_X86_QUIRK_SLOT_ZAP_ALL: deleting a slot zaps every mapping of an x86
    VM (kvm-on-this-host.md §3.5); arm64/riscv zap the slot only."""
    cmp = _cmp("slot-alias.yaml", ["x86", "arm64", "riscv"])
    assert _counter(cmp, "mmu_shadow_zapped") == ["1", "0", "0"]


def test_table_renders_marks() -> None:
    from rich.console import Console

    cmp = _cmp("pfnmap-faulted.yaml", ["arm64"], ["upstream", "linux-5.4"])
    console = Console(width=200, record=True)
    console.print(comparison_table(cmp))
    text = console.export_text()
    assert "16 *" in text
    assert "(unclaimed)" in text


def test_cli_compare(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["compare", str(SCENARIOS / "pfnmap-faulted.yaml"), "--arch",
                              "x86,arm64,riscv", "--variant", "upstream,linux-5.4", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert [(c["arch"], c["variant"]) for c in data["columns"]] == [
        ("x86", "upstream"), ("x86", "linux-5.4"), ("arm64", "upstream"),
        ("arm64", "linux-5.4"), ("riscv", "upstream"), ("riscv", "linux-5.4")]
    res = runner.invoke(app, ["compare", str(SCENARIOS / "pfnmap-readonly-vma.yaml"),
                              "--variant", "upstream,remapped-no-write-check"])
    assert res.exit_code == 3
    assert "violated" in res.output
    res = runner.invoke(app, ["compare", str(SCENARIOS / "quickstart.yaml"), "--arch", "mips"])
    assert res.exit_code == 2
    res = runner.invoke(app, ["compare", str(SCENARIOS / "quickstart.yaml"), "--variant",
                              "nonsense"])
    assert res.exit_code == 2
