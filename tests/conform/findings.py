"""Open KVM_FINDINGS entries the conformance tests have found, each with the exact shape of
the difference it explains.

While the model is being fixed, a finding's entry in :data:`SHAPES` lets the
differential test tell its known difference from a new one: a difference is *explained*
only when its shape function accepts it, every other difference still fails, and the
steps after an explained difference are not judged (the two sides then continue from
different states).  Each finding also gets a deterministic scenario in
test_findings.py, marked xfail strict with its number: once the model is fixed it
XPASSes (and so fails): then drop the marker and the entry here.

No finding is open: #3, #8 and #9, found by these tests, were fixed in 7d3c610 (their
scenarios in test_findings.py now have to agree).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvmmem.conform import Conformance, StepComparison

Outcome = dict[str, Any]

SHAPES: dict[int, Callable[[Outcome | None, Outcome | None], bool]] = {}
"""Finding number -> whether one step's (model, kvm) difference has that finding's
shape.  A shape must be as narrow as the finding (same gpa, the exact lengths, ...)."""


def explained_by(diff: StepComparison) -> int | None:
    """The open finding whose shape ``diff`` has, or ``None``."""
    for number, shape in SHAPES.items():
        if shape(diff.model, diff.kvm):
            return number
    return None


def unexplained(result: Conformance) -> list[StepComparison]:
    """The differences of ``result`` that no open finding explains, up to the first
    explained one: after it the two sides no longer start a step from the same state
    (a write did not land, a vCPU is left in another state), so later differences may
    be its consequences and are not judged."""
    out: list[StepComparison] = []
    for diff in result.differences:
        if explained_by(diff) is not None:
            break
        out.append(diff)
    return out
