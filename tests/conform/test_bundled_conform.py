"""Every bundled scenario naming x86 (with steps) goes through ``kvmmem conform`` on both
guest paths and agrees with this host's real KVM (kvm-on-this-host.md), or is
unsupported for a reason listed, with its justification, in ``ALLOWED_UNSUPPORTED``.

Where the model is wrong the scenario is listed in ``MODEL_FINDINGS`` (xfail strict,
naming the KVM_FINDINGS entry): it XPASSes, and so fails, once the lead fixes the model;
then drop the entry.  Skipped with the reason where /dev/kvm is unusable.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvmmem.conform import conform_scenario, tap_lines
from kvmmem.errors import InputError
from kvmmem.realkvm import Kvm
from kvmmem.scenario.loader import load_scenario

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"

ALLOWED_UNSUPPORTED: dict[str, str] = {
    r"host source cannot make a vfio-bar mapping|no vfio-pci device to map a BAR of|"
    r"no PCI device here may be bound to vfio-pci":
        "vfio-bar: this host has no PCI device bound to vfio-pci (a VFIO BAR is made "
        "inside the emulated machines, issue 14)",
    r"device-cacheable needs coherent device memory":
        "device-cacheable: Grace-style coherent device memory exists on no machine here",
    r"no VM_PFNMAP source on this host inserts frames lazily":
        "device-lazy: no driver on this host inserts VM_PFNMAP frames on first touch "
        "(perf rings map every page at mmap; no dma-buf, vfio, uio; kvm-on-this-host.md "
        "§3.6)",
    r"hugetlb needs \d+ free 2 MiB pages and the host pool has":
        "hugetlb pool empty: the tests never change vm.nr_hugepages (BRIEF: leave the "
        "machine unchanged)",
    r"transparent huge pages are disabled on this host":
        "THP set to never on this host",
    r"KVM_PRE_FAULT_MEMORY needs a TDP \(EPT/NPT\) MMU":
        "prefault: upstream x86 offers KVM_PRE_FAULT_MEMORY only with TDP "
        "(KVM_CAP_PRE_FAULT_MEMORY = tdp_enabled); this host's KVM uses shadow paging",
    r"^variant [\w.-]+: the real kernel is upstream$":
        "a scenario about another kernel's behaviour (variant) has no real counterpart",
    r"cannot be reached through the guest's page tables":
        "a gpa beyond this host's MAXPHYADDR (or straddling 2^47) cannot be reached by "
        "the guest",
    r"KVM_CAP_(USER_MEMORY2|GUEST_MEMFD|GUEST_MEMFD_FLAGS) is 0":
        "guest_memfd: some hosts' KVM is built without it (kvm-on-this-host.md: the "
        "6.18-based host kernel reports KVM_CAP_GUEST_MEMFD 0); the machines conform it",
    r"KVM_CAP_MEMORY_ATTRIBUTES is 0 on /dev/kvm":
        "memory attributes: a kernel built without CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES "
        "(this host's: ENOTTY); the x86 machines conform it",
    r"KVM_CAP_VM_TYPES":
        "vm_type sw_protected: no kernel here offers KVM_X86_SW_PROTECTED_VM",
}
"""Reasons an x86 scenario may be unsupported on this host (regex -> justification)."""

MODEL_FINDINGS: dict[tuple[str, str], str] = {}
"""(file, path) -> the open finding that explains a difference (the model is wrong),
e.g. ``("row-no-slot-exec-x86.yaml", "emulated"): "KVM_FINDINGS #4"`` until 7d3c610."""


def _x86_files() -> list[str]:
    names = []
    for path in sorted(SCENARIOS.glob("*.yaml")):
        try:
            scenario = load_scenario(path)
        except InputError:
            names.append(path.name)  # fails in the test, with the loader's message
            continue
        if "x86" in scenario.arches and scenario.steps is not None:
            names.append(path.name)
    return names


CASES = [
    pytest.param(name, path, id=f"{name}-{path}",
                 marks=[pytest.mark.xfail(strict=True, reason=MODEL_FINDINGS[(name, path)])]
                 if (name, path) in MODEL_FINDINGS else [])
    for name in _x86_files() for path in ("native", "emulated")
]


@pytest.mark.kvm
@pytest.mark.parametrize(("name", "path"), CASES)
def test_bundled_scenario_conforms(kvm: Kvm, name: str, path: str) -> None:
    """kvmmem conform (SCENARIOS.md): the model's x86 upstream outcomes equal real
    KVM's, step by step, on the native path (KVM's fault path) and the emulated one."""
    result = conform_scenario(load_scenario(SCENARIOS / name), path, kvm=kvm)
    if result.verdict == "unsupported":
        allowed = [why for pattern, why in ALLOWED_UNSUPPORTED.items()
                   if re.search(pattern, result.reason)]
        assert allowed, f"unsupported for a reason not in ALLOWED_UNSUPPORTED: {result.reason}"
        return
    assert result.violations == []
    assert result.verdict == "agree", "\n".join(tap_lines([result]))


def test_every_finding_names_a_bundled_file() -> None:
    """MODEL_FINDINGS only lists scenarios that exist (a renamed file must not silently
    drop its xfail)."""
    files = set(_x86_files())
    assert {name for name, _ in MODEL_FINDINGS} <= files
