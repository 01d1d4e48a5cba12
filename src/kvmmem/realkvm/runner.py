"""Run a sequential scenario on real KVM, step by step.

:func:`scenario_program` reduces a loaded scenario to a program (plain data,
:mod:`kvmmem.realkvm.program`); :func:`run_scenario` performs it on this
host's ``/dev/kvm`` with :func:`~kvmmem.realkvm.program.run_program`, the same
driver the agent runs inside an emulated machine.  Each step's outcome is in
the SCENARIOS.md vocabulary (``{"step": I, "op": NAME, "result": ..., ...}``).
What the kernel or machine cannot do (another architecture, a concurrent
scenario, a mapping kind without a source, a harness conflict) makes the run
``supported=False`` with the reason, for ``kvmmem conform``'s ``unsupported``
verdict.
"""

from __future__ import annotations

from typing import Any, assert_never

from kvmmem.realkvm.harness import DEFAULT_TIMEOUT
from kvmmem.realkvm.kvm import Kvm
from kvmmem.realkvm.program import Program, RealRun, run_program
from kvmmem.scenario.model import (
    ClearDirtyLog,
    EnableCap,
    GetDirtyLog,
    GuestExec,
    GuestRead,
    GuestWrite,
    HarvestDirtyRing,
    HostMadvise,
    HostMmap,
    HostMprotect,
    HostMunmap,
    HostRead,
    HostWrite,
    Mapping,
    Prefault,
    PunchHole,
    ResetDirtyRings,
    Scenario,
    SetMemoryAttributes,
    SetMemslot,
    Step,
    as_step,
)
from kvmmem.types import VM_TYPES

Outcome = dict[str, Any]


EXEC_RESERVE = 16
"""Guest bytes kept clear at a ``guest_exec`` address: the longest x86 instruction
(15 bytes) rounded up, whatever the architecture fetches."""


def scenario_footprint(scenario: Scenario) -> tuple[list[tuple[int, int]], list[int]]:
    """Every guest physical range and memslot id ``scenario`` uses: ``(ranges, ids)``
    (memslot ranges, guest access ranges, prefault ranges), for
    :class:`~kvmmem.realkvm.x86.RealVm` to keep clear of."""
    ranges: list[tuple[int, int]] = []
    slots: list[int] = []
    for step in (*scenario.memslots, *scenario.all_steps()):
        match as_step(step):
            case SetMemslot() as memslot:
                slots.append(memslot.slot)
                if memslot.size:
                    ranges.append((memslot.gpa, memslot.size))
            case GuestRead() | GuestWrite() | Prefault() | SetMemoryAttributes() as access:
                ranges.append((access.gpa, access.size))
            case GuestExec() as fetch:
                ranges.append((fetch.gpa, EXEC_RESERVE))
            case GetDirtyLog() | ClearDirtyLog() as log:
                slots.append(log.slot)
            case HostRead() | HostWrite() | HostMmap() | HostMunmap() | HostMprotect() \
                    | HostMadvise() | PunchHole() | EnableCap() | HarvestDirtyRing() \
                    | ResetDirtyRings():
                pass  # host addresses only, or no address at all
            case unknown:
                assert_never(unknown)
    return ranges, sorted(set(slots))


def unsupported_reason(scenario: Scenario, arch: str = "x86") -> str | None:
    """Why real ``arch`` KVM cannot run ``scenario`` at all, or ``None``."""
    if arch not in scenario.arches:
        return f"the scenario is for {', '.join(scenario.arches)}, not {arch}"
    if scenario.is_concurrent:
        return "real-KVM runs are sequential; the scenario has threads"
    return None


def _mapping(mapping: Mapping) -> dict[str, Any]:
    """A mapping as data; ``gmem_flags`` as the ``GUEST_MEMFD_FLAG_*`` bits."""
    return {"name": mapping.name, "size": mapping.size, "kind": mapping.kind,
            "prot": mapping.prot, "fill": mapping.fill,
            "at": [mapping.at.memory, mapping.at.offset] if mapping.at is not None else None,
            "gmem_flags": mapping.gmem_flag_bits}


def _step(step: Step) -> dict[str, Any]:
    """One step as data: ``index``, ``op`` and its own keys (SCENARIOS.md names: a
    memslot's ``guest_memfd`` name and ``guest_memfd_offset``, a ``punch_hole``'s
    ``memory``, ``offset``, ``size``); a ``host_mmap``'s keys as a ``mapping``, a
    memslot's ``flags`` and a ``set_memory_attributes``'s ``attributes`` as the uapi
    bits, an ``enable_cap``'s ``cap`` as its ``KVM_CAP_*`` number."""
    out: dict[str, Any] = {"index": step.index, "op": step.op}
    if isinstance(step, HostMmap):
        out["mapping"] = _mapping(step.mapping)
        return out
    out.update(step.args())
    if isinstance(step, SetMemslot):
        out["flags"] = step.flag_bits
    if isinstance(step, SetMemoryAttributes):
        out["attributes"] = step.attribute_bits
    if isinstance(step, EnableCap):
        out["cap"] = step.cap_number
        out["args"] = list(step.cap_args)
    return out


def scenario_program(scenario: Scenario, arch: str = "x86", path: str = "native",
                     timeout: float = DEFAULT_TIMEOUT, x86_code: bool = False) -> Program:
    """``scenario`` as a program for real ``arch`` KVM (:mod:`kvmmem.realkvm.program`);
    ``x86_code`` ships the x86 guest code page (for an agent, which cannot encode
    it)."""
    ranges, slots = scenario_footprint(scenario)
    needs = sorted({step.op for step in scenario.all_steps() if isinstance(step, Prefault)})
    program: Program = {
        "scenario": scenario.name, "arch": arch, "path": path, "timeout": timeout,
        "ipa_bits": scenario.ipa_bits, "cpu_features": list(scenario.cpu_features),
        "vm_type": VM_TYPES[scenario.vm_type],
        "dirty_ring": scenario.dirty_ring,
        "dirty_ring_with_bitmap": scenario.dirty_ring_with_bitmap,
        "mte": scenario.mte,
        "reserved_gpas": [list(r) for r in ranges],
        "reserved_slots": slots, "needs": needs,
        "memory": [_mapping(m) for m in scenario.memory.values()],
        "memslots": [_step(s) for s in scenario.memslots],
        "steps": [_step(s) for s in scenario.steps or ()],
        "x86_code": None,
    }
    if x86_code and arch == "x86":
        from kvmmem.realkvm.x86_code import code_blob
        program["x86_code"] = code_blob()
    return program


def run_scenario(scenario: Scenario, path: str = "native", timeout: float = DEFAULT_TIMEOUT,
                 kvm: Kvm | None = None) -> RealRun:
    """Run ``scenario`` on this host's real KVM with guest accesses on ``path``
    (``native`` or ``emulated``; a step's own ``path`` wins).  Every fd and mapping is
    released before returning, errors included.

    Raises :class:`~kvmmem.realkvm.kvm.KvmUnavailable` without a usable /dev/kvm."""
    reason = unsupported_reason(scenario)
    if reason is not None:
        return RealRun(scenario.name, path, supported=False, reason=reason)
    return run_program(scenario_program(scenario, "x86", path, timeout), kvm=kvm)


__all__ = ["RealRun", "run_scenario", "scenario_footprint", "scenario_program",
           "unsupported_reason"]
