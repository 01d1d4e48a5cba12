"""The invariants hold after every setup memslot, not only after steps.

Issue 12: ``run`` checked the invariants only after steps, so a violation made
by a top-level ``memslots`` entry (5.4-5.13 arm64 and riscv up to 6.17 premap a
VM_PFNMAP range at creation) was blamed on step 0.  It is now reported against
that entry: ``{"invariant", "step": I, "detail", "setup": true}`` with ``I`` its
index in ``memslots``.

The same runs used to exit 2 ("pfn 0x0 is neither RAM nor device memory"): the
5.4 premap of a lazily populated device mapping computes its physical address
from ``vm_pgoff`` (the file offset, 0), and the model's physmem did not know
that frame.  It is other host memory (a foreign frame); the run must end in a
violation (exit 3) and ``compare`` must print its table.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvmmem.cli import app
from kvmmem.scenario.loader import load_scenario, load_scenario_text
from kvmmem.scenario.runner import Runner

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"

TWO_SLOTS = """
kvmmem: 1
name: premap-second-slot
arch: [arm64, riscv]
memory:
  ram: {size: 64K, kind: anon, prot: rw}
  dev: {size: 64K, kind: device-lazy, prot: rw}
memslots:
  - {slot: 1, gpa: 0x0, size: 64K, memory: ram}
  - {slot: 2, gpa: 0x10000000, size: 64K, memory: dev}
steps:
  - guest_read: {gpa: 0x0, size: 4}
    expect: {result: ok}
"""


PREMAPPING = {"arm64": "5.10", "riscv": "6.1"}
"""A release of each arch that premaps VM_PFNMAP memslots at creation."""


@pytest.mark.parametrize("arch", ["arm64", "riscv"])
def test_a_violation_made_by_a_setup_memslot_is_reported_against_it(arch: str) -> None:
    result = Runner(load_scenario_text(TWO_SLOTS), arch, PREMAPPING[arch]).run()
    assert [o["result"] for o in result.setup] == ["ok", "ok"]
    assert result.steps == [], "the run stops at the violating setup entry"
    (violation,) = result.violations
    assert violation["step"] == 1
    assert violation["setup"] is True
    assert violation["invariant"] == "no-stale-translation"
    assert result.exit_status == 3


def test_a_setup_violation_with_keep_going_runs_the_steps_unchecked() -> None:
    result = Runner(load_scenario_text(TWO_SLOTS), "arm64", "5.10", keep_going=True).run()
    assert [v.get("setup") for v in result.violations] == [True]
    assert [o["result"] for o in result.steps] == ["ok"]


def test_a_step_violation_carries_no_setup_key() -> None:
    result = Runner(load_scenario_text(TWO_SLOTS), "arm64", "upstream").run()
    assert result.violations == []
    scn = load_scenario(SCENARIOS / "pfnmap-mprotect-after-premap.yaml")
    result = Runner(scn, "arm64", "5.10").run()
    (violation,) = result.violations
    assert violation["step"] == 2
    assert "setup" not in violation


@pytest.mark.parametrize(("name", "arch", "variant"), [
    ("row-pfnmap-lazy.yaml", "arm64", "linux-5.4"),
    ("row-pfnmap-ro-pte.yaml", "arm64", "linux-5.4"),
    ("row-pfnmap-ro-pte-x86.yaml", "arm64", "linux-5.4"),
    ("row-pfnmap-lazy.yaml", "riscv", "6.1"),
    ("row-pfnmap-ro-pte.yaml", "riscv", "6.12"),
])
def test_the_premap_of_pfn_0_is_a_setup_violation_not_bad_input(
        name: str, arch: str, variant: str) -> None:
    res = CliRunner().invoke(app, ["run", str(SCENARIOS / name), "--arch", arch,
                                   "--variant", variant, "--json"])
    assert res.exit_code == 3, res.output
    (run,) = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    (violation,) = run["violations"]
    assert violation["setup"] is True
    assert violation["step"] == 0
    assert run["steps"] == []
    text = CliRunner().invoke(app, ["run", str(SCENARIOS / name), "--arch", arch,
                                    "--variant", variant])
    assert text.exit_code == 3
    assert "violated after setup memslot s0" in text.output


def test_compare_prints_the_premapping_runs() -> None:
    res = CliRunner().invoke(app, ["compare", str(SCENARIOS / "row-pfnmap-lazy.yaml"),
                                   "--arch", "arm64", "--variant", "linux-5.4,upstream"])
    assert res.exit_code == 3, res.output
    assert "violated: no-stale-translation" in res.output
    assert "setup slot 2" in res.output
