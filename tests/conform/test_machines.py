"""Conformance on real kernels of every architecture: the machines CI fetches (arm64
7.3, riscv 7.2, x86 7.3 with TDP; ``kvmmem machine fetch``), each booted once per
session.

* Every bundled scenario that names the machine's architecture agrees with the model
  (``kvmmem conform --arch A --kernel V``), or is unsupported for a reason listed in
  ``MACHINE_UNSUPPORTED`` with its justification.
* The random differential test (strategies.py, as test_differential_kvm.py does on
  this host) runs on arm64 7.3 and riscv 7.2: 100 sequences each (``--long``: 1000),
  no difference.

``KVMMEM_MACHINES=all`` (every machine of the catalog) or a list such as
``KVMMEM_MACHINES=arm64-6.12,riscv-6.12`` runs both tests on those machines instead.
Skipped with the reason where a machine is not fetched or QEMU is missing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings

from kvmmem.conform import MachineTarget, conform_scenario, tap_lines
from kvmmem.scenario import load_scenario, load_scenario_text

from .conftest import long_run
from .strategies import scenarios

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"

CI_MACHINES = (("arm64", "7.3"), ("riscv", "7.2"), ("x86", "7.3"))


def _chosen() -> tuple[tuple[str, str], ...]:
    wanted = os.environ.get("KVMMEM_MACHINES", "")
    if not wanted:
        return CI_MACHINES
    from kvmmem.machine import machines
    if wanted == "all":
        return tuple((m.arch, m.version) for m in machines())
    return tuple(tuple(name.split("-", 1)) for name in wanted.split(","))  # type: ignore[misc]


MACHINES = _chosen()
DIFFERENTIAL = MACHINES if os.environ.get("KVMMEM_MACHINES") else CI_MACHINES[:2]

MACHINE_UNSUPPORTED: dict[str, str] = {
    r"has threads; real-KVM runs are sequential":
        "a concurrent scenario is for kvmmem explore",
    r"^variant [\w.-]+: the real kernel is upstream$":
        "a scenario about another kernel's behaviour (variant)",
    r"the emulated access path exists only on this host":
        "the emulated path is this host's PVM instruction emulator",
    r"no VM_PFNMAP source (on this host|inside the machine) inserts frames lazily":
        "device-lazy: no source inside the machines behaves as the kind describes",
}
"""Reasons a scenario may be unsupported on a machine (regex -> justification)."""


def _files(arch: str) -> list[str]:
    return [p.name for p in sorted(SCENARIOS.glob("*.yaml"))
            if arch in load_scenario(p).arches]


@pytest.mark.parametrize(("arch", "version"), MACHINES, ids=[f"{a}-{v}" for a, v in MACHINES])
def test_bundled_scenarios_agree(arch: str, version: str, machines: Any) -> None:
    """Every bundled scenario naming ``arch``: agree, or unsupported for a listed reason."""
    target = MachineTarget(machines.get(arch, version))
    bad = []
    for name in _files(arch):
        result = conform_scenario(load_scenario(SCENARIOS / name), target=target)
        if result.verdict == "differ" or result.violations:
            bad.append("\n".join(tap_lines([result])))
        elif result.verdict == "unsupported" and not any(
                re.search(pattern, result.reason) for pattern in MACHINE_UNSUPPORTED):
            bad.append(f"{name}: unsupported for an unlisted reason: {result.reason}")
    assert bad == [], "\n".join(bad)


@pytest.mark.parametrize(("arch", "version"), DIFFERENTIAL,
                         ids=[f"{a}-{v}" for a, v in DIFFERENTIAL])
def test_random_sequences_agree(arch: str, version: str, machines: Any,
                                request: pytest.FixtureRequest) -> None:
    """hva_to_pfn / the stage-2 fault path / MMU notifiers / kvm_set_memory_region of a
    real arm64 or riscv kernel: every random sequence gives the model's outcomes."""
    target = MachineTarget(machines.get(arch, version))
    examples = 1000 if long_run(request.config) else 100

    @settings(max_examples=examples, deadline=None)
    @given(scenarios(arch, emulated=False))
    def run(text: str) -> None:
        result = conform_scenario(load_scenario_text(text, "differential.yaml"), target=target)
        assert result.verdict != "unsupported", result.reason
        assert result.violations == [], "\n" + text + "\n".join(tap_lines([result]))
        assert result.differences == [], "\n" + text + "\n".join(tap_lines([result]))

    run()
