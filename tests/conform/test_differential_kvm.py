"""Differential test: random sequences of host operations, memslot operations and guest
accesses run on the model and on this host's real KVM (``kvmmem conform``), outcomes
compared step by step (kvmmem.conform.compare_outcomes).

Each example is a scenario file (YAML text through ``load_scenario_text``): one or two
host mappings (anon, memfd, private or shared file; read-write or read-only; filled or
untouched), one or two memslots over them, then up to 14 steps drawn from guest_read /
guest_write (the native path, KVM's fault path ``kvm_mmu_page_fault`` ->
``__kvm_faultin_pfn`` -> ``hva_to_pfn``; one in eight on the emulated path,
``kvm_vcpu_read/write_guest``), host_read / host_write, host_mprotect, host_munmap,
host_mmap with MAP_FIXED over part of an existing mapping, host_madvise (MADV_DONTNEED),
set_memslot (create, move, flags change, delete, read-only and dirty-logged slots;
``kvm_set_memory_region`` checks) and get_dirty_log.  Guest addresses fall inside, next
to and between the slots, mostly on pages touched before; a few straddle a page
boundary.

100 sequences per run; ``pytest tests/conform --long`` (or KVMMEM_LONG=1) runs 1000.
A disagreement fails with the shrunk scenario and the TAP lines of the difference;
every one found is written down in /work/notes/KVM_FINDINGS.md (#3, #8, #9 came from
here; all fixed).  While a finding is open, a difference of exactly its shape
(findings.py) is counted (``hypothesis.event``) instead of failing; the steps after it
are not judged, since the two sides then continue from different states.  Each finding
has its own regression scenario in test_findings.py.
"""

from __future__ import annotations

import pytest
from hypothesis import event, given, settings

from kvmmem.conform import conform_scenario, tap_lines
from kvmmem.realkvm import Kvm
from kvmmem.scenario import load_scenario_text

from .conftest import long_run
from .findings import explained_by, unexplained
from .strategies import scenarios


def check_agrees(text: str, kvm: Kvm) -> None:
    """The scenario in ``text`` agrees on the model and real KVM (native path), but for
    a difference of exactly the shape of an open KVM_FINDINGS entry (findings.py; the
    steps after it are not judged)."""
    result = conform_scenario(load_scenario_text(text, "differential.yaml"), "native",
                              kvm=kvm)
    assert result.verdict != "unsupported", result.reason
    assert result.violations == [], "\n" + text + "\n".join(tap_lines([result]))
    for diff in result.differences:
        finding = explained_by(diff)
        if finding is not None:
            event(f"explained by KVM_FINDINGS #{finding}")
            break
    assert unexplained(result) == [], "\n" + text + "\n".join(tap_lines([result]))


def test_random_sequences_agree_with_real_kvm(kvm: Kvm, request: pytest.FixtureRequest) -> None:
    """kvm_mmu_page_fault / hva_to_pfn / MMU notifiers / kvm_set_memory_region: every
    random sequence gives the same outcome, step by step, on the model and on /dev/kvm."""
    examples = 1000 if long_run(request.config) else 100

    @settings(max_examples=examples, deadline=None)
    @given(scenarios())
    def run(text: str) -> None:
        check_agrees(text, kvm)

    run()
