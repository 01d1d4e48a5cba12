"""The bundled races under ``kvmmem explore`` (issue 7, DESIGN.md "Invariants").

Upstream keeps every invariant in every interleaving on all three
architectures: the invalidation sequence and its re-check under mmu_lock
(``mmu_invalidate_retry`` / ``mmu_invalidate_retry_gfn``), the TLB flush in
``kvm_mmu_notifier_invalidate_range_start`` and the ``pte_write`` check of
``hva_to_pfn_remapped`` are what make it so.  Each mutation removes one of
them and the explorer finds a schedule that breaks an invariant; linux-5.4
breaks where its 2019 code applies (the arm64/riscv prepare-time premap of
VM_PFNMAP, the remapped-PFN lookup that reports every PFNMAP page writable).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmmem.explore import SearchParams, explore
from kvmmem.scenario.loader import load_scenario
from kvmmem.variants import get_variant

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"
RACES = sorted(p.name for p in SCENARIOS.glob("race-*.yaml"))
ARCHES = ("x86", "arm64", "riscv")
ALL = ("x86", "arm64", "riscv")

# scenario -> variant -> (architectures where a violation is found, the invariants it may be)
STALE = {"no-stale-translation"}
PERM = {"permission-containment"}
BROKEN: dict[str, dict[str, tuple[tuple[str, ...], set[str]]]] = {
    "race-fault-vs-munmap.yaml": {
        "no-invalidate-retry": (ALL, STALE),  # the fault installs the freed page
        "no-tlb-flush": (ALL, STALE),          # the TLB keeps it after the zap
    },
    "race-fault-vs-mprotect.yaml": {
        "no-invalidate-retry": (ALL, PERM),   # writable over a write-protected PTE
        "no-tlb-flush": (ALL, PERM),
    },
    "race-fault-vs-map-fixed.yaml": {
        "no-invalidate-retry": (ALL, STALE),  # the replaced page
        "no-tlb-flush": (ALL, STALE),
    },
    "race-device-write-vs-mprotect.yaml": {
        # hva_to_pfn_remapped without pte_write: writable over a read-only PFNMAP PTE
        "remapped-no-write-check": (ALL, PERM),
        "linux-5.4": (ALL, PERM),
        "no-invalidate-retry": (ALL, PERM),
        "no-tlb-flush": (ALL, PERM),
    },
    "race-prefault-vs-munmap.yaml": {
        # KVM_PRE_FAULT_MEMORY exists on x86 only (arm64/riscv: EINVAL, nothing mapped)
        "no-invalidate-retry": (("x86",), STALE),
    },
    # kvm_vcpu_pre_fault_memory holds kvm->srcu and x86 checks is_page_fault_stale:
    # upstream holds on x86 under every variant (no mutation removes either);
    # arm64/riscv have no KVM_PRE_FAULT_MEMORY (EINVAL, nothing races)
    "race-prefault-vs-delete.yaml": {},
    "race-memslot-delete-vs-fault.yaml": {
        # the zap of the deleted slot without its flush leaves the TLB entry
        "no-tlb-flush": (ALL, STALE),
    },
    "race-premap-vs-munmap.yaml": {
        # kvm_arch_prepare_memory_region premaps outside the notifier protocol
        "linux-5.4": (("arm64", "riscv"), STALE),
    },
    "race-dirty-log-vs-write.yaml": {},
    # guest_memfd (x86 and arm64 only; riscv has none)
    "race-gmem-punch-vs-fault.yaml": {
        "no-gmem-invalidate": (ALL, STALE),   # stage-2 keeps the punched page
        "no-invalidate-retry": (ALL, STALE),  # a fault that raced the punch installs it
        "no-tlb-flush": (ALL, STALE),
    },
    "race-gmem-conversion-vs-fault.yaml": {
        "no-invalidate-retry": (ALL, STALE),  # the shared page for a gfn now private
        "no-tlb-flush": (ALL, STALE),
    },
    # the memslot machinery (SRCU, the INVALID slot) orders unbinding after the zap
    "race-gmem-delete-vs-fault.yaml": {
        "no-tlb-flush": (ALL, STALE),
    },
    # KVM_RESET_DIRTY_RINGS without re-protecting: a later write is never pushed
    "race-dirty-ring-reset-vs-write.yaml": {
        "no-ring-reprotect": (ALL, {"dirty-log-completeness"}),
    },
}
VARIANTS = ("upstream", "no-invalidate-retry", "remapped-no-write-check", "no-tlb-flush",
            "no-gmem-invalidate", "no-ring-reprotect", "linux-5.4")
GMEM = {"race-gmem-punch-vs-fault.yaml": ("x86", "arm64"),
        "race-gmem-conversion-vs-fault.yaml": ("x86",),
        "race-gmem-delete-vs-fault.yaml": ("x86", "arm64")}
"""The guest_memfd races and the architectures they name (linux-5.4 has no
guest_memfd: not run there)."""


def test_every_race_is_listed() -> None:
    assert sorted(BROKEN) == RACES
    assert len(RACES) >= 8


@pytest.mark.parametrize("name", RACES)
def test_race_verdicts(name: str) -> None:
    """Every architecture the file names, every variant: exhausted without a
    violation, or a violation of the expected invariant - never the budget."""
    scenario = load_scenario(SCENARIOS / name)
    assert scenario.arches == GMEM.get(name, ARCHES)
    for arch in scenario.arches:
        for variant in VARIANTS:
            if get_variant(variant).arch_unsupported(arch):
                continue  # riscv at linux-5.4: no riscv KVM (tests/kvm/test_versions.py)
            if name in GMEM and variant == "linux-5.4":
                continue  # no guest_memfd in v5.4
            if "ring" in name and variant == "linux-5.4":
                continue  # riscv has no dirty ring before v6.17 (x86 and arm64 only then)
            result = explore(scenario, arch, variant, SearchParams(strategy="dpor"))
            broken = BROKEN[name].get(variant)
            if broken is not None and arch in broken[0]:
                assert result.verdict == "violation", (arch, variant)
                assert result.violation is not None
                assert result.violation.invariant in broken[1], (arch, variant, result.violation)
                assert result.exit_status == 3
                assert result.token is not None and result.trace
            else:
                assert result.verdict == "exhausted", (arch, variant, result.violation)
                assert result.exit_status == 0
                assert result.executions > 1 and result.distinct_states > 1


@pytest.mark.parametrize("name", RACES)
def test_upstream_outcomes_are_the_kernel_ones(name: str) -> None:
    """The outcomes seen over all interleavings: the mm or memslot change
    always succeeds (its expectation), the guest access ends in one of the
    outcomes the kernel gives for the two orders."""
    scenario = load_scenario(SCENARIOS / name)
    result = explore(scenario, "x86", "upstream")
    assert result.verdict == "exhausted"
    for thread, steps in result.outcomes.items():
        for outs in steps:
            assert outs, f"{thread}: a step never completed"
            for text in outs:
                assert text.split(",")[0] in ("result=ok", "result=fault", "result=mmio",
                                              "result=error"), text


def test_path_independence_notes() -> None:
    """riscv keeps kvm_arch_prepare_memory_region's EPERM for a writable slot over
    a VMA without VM_WRITE (arch/riscv/kvm/mmu.c): after the race the slot sits
    over a read-only VMA, a legal state that could not be created directly.  The
    explorer reports it as a note, not a violation; x86 and arm64 have nothing
    to note (arm64 dropped the check in v5.5)."""
    scenario = load_scenario(SCENARIOS / "race-fault-vs-mprotect.yaml")
    riscv = explore(scenario, "riscv", "upstream")
    assert riscv.verdict == "exhausted"
    assert len(riscv.notes) == 1 and "EPERM" in riscv.notes[0]
    assert riscv.to_json()["notes"][0]["invariant"] == "path-independence"
    for arch in ("x86", "arm64"):
        assert explore(scenario, arch, "upstream").notes == []
    assert explore(scenario, "arm64", "linux-5.4").notes == riscv.notes
