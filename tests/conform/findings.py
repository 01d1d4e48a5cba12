"""Open KVM_FINDINGS entries the conformance tests have found, each with the exact shape of
the difference it explains.

A difference is *explained* only when it matches its finding's shape exactly; every other
difference still fails the tests.  Each finding also has a deterministic regression test
(xfail strict, test_findings.py) that XPASSes - and so fails - once the model is fixed:
then delete the entry here and the marker there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvmmem.conform import Conformance, StepComparison

Outcome = dict[str, Any]


def _split_mmio_exit(model: Outcome | None, kvm: Outcome | None) -> bool:
    """KVM_FINDINGS #8: an access straddling a page boundary whose both parts exit.
    The kernel makes one KVM_EXIT_MMIO per page fragment (``emulator_read_write`` ->
    ``emulator_read_write_onepage`` queues one ``mmio_fragments`` entry per page,
    ``complete_emulated_mmio`` exits once per fragment); the model merges them into one
    exit.  Shape: same gpa and direction, the model's len is the sum of the real exits'
    lens, its data their concatenation."""
    if model is None or kvm is None or model.get("result") != "mmio" \
            or kvm.get("result") != "mmio" or not kvm.get("more_mmio"):
        return False
    exits = [kvm, *kvm["more_mmio"]]
    if model.get("gpa") != kvm.get("gpa") or model.get("is_write") != kvm.get("is_write"):
        return False
    at, data = int(kvm["gpa"]), 0
    for e in exits:
        if e.get("gpa") != at:
            return False
        if e.get("is_write"):
            data |= int(e.get("data", 0)) << 8 * (at - int(kvm["gpa"]))
        at += int(e["len"])
    if model.get("len") != at - int(kvm["gpa"]):
        return False
    if kvm.get("is_write"):
        return bool(model.get("data") == data)
    return bool(model.get("value", 0) == kvm.get("value", 0))


def _upgrade_never_seen(model: Outcome | None, kvm: Outcome | None) -> bool:
    """KVM_FINDINGS #3: a write to a page the vCPU cached read-only (after a read fault
    on a write-notify or zero page, or a dirty-log re-protect) spins in the model until
    ``MAX_FAULT_RETRIES`` and ends ``error EAGAIN``; the kernel's re-executed access
    uses the upgraded SPTE (an EPT violation invalidates the cached translation)."""
    return (model == {**(model or {}), "result": "error", "errno": "EAGAIN"}
            and kvm is not None and kvm.get("result") == "ok")


def _emulated_rest_of_access(model: Outcome | None, kvm: Outcome | None) -> bool:
    """KVM_FINDINGS #9: an access straddling a page boundary whose first part exits as
    MMIO on the native path.  KVM emulates the whole instruction
    (``x86_emulate_instruction`` -> ``emulator_read_write``), so the second part goes
    through ``kvm_vcpu_{read,write}_guest`` and, where the copy fails (a VMA without the
    permission, nothing mapped), becomes one more MMIO fragment; the model takes the
    second part on the native fault path and reports EFAULT for it."""
    if model is None or kvm is None or model.get("result") != "fault" \
            or kvm.get("result") != "mmio" or not kvm.get("more_mmio"):
        return False
    return any(e.get("gpa") == model.get("gpa") for e in kvm["more_mmio"]) \
        and int(model.get("gpa", 0)) % 4096 == 0


SHAPES: dict[int, Callable[[Outcome | None, Outcome | None], bool]] = {
    3: _upgrade_never_seen,
    8: _split_mmio_exit,
    9: _emulated_rest_of_access,
}
"""Finding number -> whether one step's (model, kvm) difference has that finding's shape."""


def explained_by(diff: StepComparison) -> int | None:
    """The open finding whose shape ``diff`` has, or ``None``."""
    for number, shape in SHAPES.items():
        if shape(diff.model, diff.kvm):
            return number
    return None


def unexplained(result: Conformance) -> list[StepComparison]:
    """The differences of ``result`` that no open finding explains, up to the first
    explained one: after it the two sides no longer start a step from the same state
    (the model's write did not land, a vCPU is left in another state), so later
    differences may be its consequences and are not judged."""
    out: list[StepComparison] = []
    for diff in result.differences:
        if explained_by(diff) is not None:
            break
        out.append(diff)
    return out
