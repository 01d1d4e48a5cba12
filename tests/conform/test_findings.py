"""The KVM_FINDINGS entries the conformance tests found, one deterministic scenario each
(the shrunk differential examples), run through ``kvmmem conform``: #3 (a write after a
read fault upgrades the SPTE in place), #8 (one MMIO exit per page fragment), #9 (the
rest of an access whose first part exited as MMIO is emulated).  All three were fixed
in 7d3c610; these scenarios keep them fixed.  A new finding gets its scenario here,
marked ``xfail(strict=True, reason="KVM_FINDINGS #N")``, and its shape in findings.py.
"""

from __future__ import annotations

import pytest

from kvmmem.conform import conform_scenario, tap_lines
from kvmmem.realkvm import Kvm
from kvmmem.scenario import load_scenario_text

from .findings import SHAPES, explained_by, unexplained

FINDING_3 = """
kvmmem: 1
name: finding-3-write-after-read-fault
memory:
  f: {size: 16K, kind: file-shared, prot: rw}
memslots:
  - {slot: 1, gpa: 0x40000000, size: 16K, memory: f}
steps:
  - guest_read: {gpa: 0x40001000, size: 8}
  - guest_write: {gpa: 0x40001010, size: 4, value: 7}
  - host_read: {memory: f, offset: 0x1010, size: 4}
"""

FINDING_8 = """
kvmmem: 1
name: finding-8-page-crossing-mmio
memory:
  ram: {size: 4K, kind: anon, prot: rw}
memslots:
  - {slot: 0, gpa: 0x40000000, size: 4K, memory: ram}
steps:
  - guest_read: {gpa: 0x40001fff, size: 2}
  - guest_write: {gpa: 0x40001ffc, size: 8, value: 0x1122334455667788}
"""

FINDING_9 = """
kvmmem: 1
name: finding-9-emulated-rest
memory:
  ram: {size: 8K, kind: anon, prot: rw, fill: 0x11}
memslots:
  - {slot: 0, gpa: 0x40001000, size: 4K, memory: ram, offset: 4K}
steps:
  - host_mprotect: {memory: ram, offset: 4K, size: 4K, prot: none}
  - guest_write: {gpa: 0x40000ffc, size: 8, value: 0x1122334455667788}
  - guest_read: {gpa: 0x40000ffc, size: 8}
  - host_mprotect: {memory: ram, offset: 4K, size: 4K, prot: r}
  - guest_write: {gpa: 0x40000ffc, size: 8, value: 0x1122334455667788}
"""


@pytest.mark.kvm
@pytest.mark.parametrize(("text", "path"), [
    pytest.param(FINDING_3, "native", id="3-native"),
    pytest.param(FINDING_8, "native", id="8-native"),
    pytest.param(FINDING_8, "emulated", id="8-emulated"),
    pytest.param(FINDING_9, "native", id="9-native"),
])
def test_finding_scenario_conforms(kvm: Kvm, text: str, path: str) -> None:
    """x86 emulator_read_write / emulator_read_write_onepage (one MMIO exit per page
    fragment; a failed guest copy becomes MMIO) and the EPT-violation TLB rule (#3)."""
    result = conform_scenario(load_scenario_text(text), path, kvm=kvm)
    assert result.verdict == "agree", "\n".join(tap_lines([result]))


def test_an_explained_difference_ends_the_judged_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """findings.unexplained: differences before the first explained one still fail; the
    explained one and everything after it are not judged; a shape explains only what it
    accepts."""
    from kvmmem.conform import Conformance, StepComparison

    def diff(step: int, model: dict[str, object], kvm: dict[str, object]) -> StepComparison:
        return StepComparison(step, "guest_write", model, kvm, False, f"step {step}")

    eagain = diff(1, {"result": "error", "errno": "EAGAIN"}, {"result": "ok"})
    later = diff(2, {"result": "ok", "value": 0}, {"result": "ok", "value": 7})
    before = diff(0, {"result": "ok", "value": 1}, {"result": "ok", "value": 2})
    result = Conformance("s", "s.yaml", "native", "differ", steps=[before, eagain, later])
    assert unexplained(result) == [before, eagain, later]
    monkeypatch.setitem(SHAPES, 99, lambda m, k: bool(m and m.get("errno") == "EAGAIN"))
    assert explained_by(eagain) == 99 and explained_by(later) is None
    assert unexplained(result) == [before]
    result.steps = [eagain, later]
    assert unexplained(result) == []
