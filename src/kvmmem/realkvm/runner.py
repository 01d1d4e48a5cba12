"""Run a sequential scenario on this host's real KVM, step by step.

:func:`run_scenario` makes the scenario's host mappings for real
(:class:`~kvmmem.realkvm.host.HostMemory`), creates its memslots on a
:class:`~kvmmem.realkvm.harness.RealVm` and performs every step, collecting one
outcome per step in the SCENARIOS.md vocabulary (``{"step": I, "op": NAME,
"result": ..., ...}``).  What this host cannot do (another architecture, a
concurrent scenario, a mapping kind without a source here, a harness
conflict) makes the run ``supported=False`` with the reason, for
``kvmmem conform``'s ``unsupported`` verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvmmem.realkvm.harness import DEFAULT_TIMEOUT, RealVm
from kvmmem.realkvm.host import HostMemory, MappingUnsupported
from kvmmem.realkvm.kvm import Kvm, KvmUnsupported
from kvmmem.scenario.model import (
    ClearDirtyLog,
    GetDirtyLog,
    GuestExec,
    GuestRead,
    GuestWrite,
    HostMadvise,
    HostMmap,
    HostMprotect,
    HostMunmap,
    HostRead,
    HostWrite,
    Mapping,
    Prefault,
    Scenario,
    SetMemslot,
    Step,
)

Outcome = dict[str, Any]


@dataclass(slots=True)
class RealRun:
    """The result of one scenario on real KVM: ``supported`` (False with ``reason``
    when this host cannot run it), the outcomes of the ``memory`` and ``memslots``
    setup (``setup``) and of each step (``steps``, in order; a run that became
    unsupported half-way keeps the steps done so far)."""

    scenario: str
    path: str
    supported: bool = True
    reason: str = ""
    setup: list[Outcome] = field(default_factory=list)
    steps: list[Outcome] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"scenario": self.scenario, "path": self.path, "supported": self.supported,
                "reason": self.reason, "setup": self.setup, "steps": self.steps}


def scenario_footprint(scenario: Scenario) -> tuple[list[tuple[int, int]], list[int]]:
    """Every guest physical range and memslot id ``scenario`` uses: ``(ranges, ids)``
    (memslot ranges, guest access ranges, prefault ranges), for
    :class:`~kvmmem.realkvm.harness.RealVm` to keep clear of."""
    ranges: list[tuple[int, int]] = []
    slots: list[int] = []
    for step in (*scenario.memslots, *scenario.all_steps()):
        if isinstance(step, SetMemslot):
            slots.append(step.slot)
            if step.size:
                ranges.append((step.gpa, step.size))
        elif isinstance(step, GuestRead | GuestWrite):
            ranges.append((step.gpa, step.size))
        elif isinstance(step, GuestExec):
            ranges.append((step.gpa, 16))
        elif isinstance(step, Prefault):
            ranges.append((step.gpa, step.size))
        elif isinstance(step, GetDirtyLog | ClearDirtyLog):
            slots.append(step.slot)
    return ranges, sorted(set(slots))


def unsupported_reason(scenario: Scenario) -> str | None:
    """Why this host's real KVM cannot run ``scenario`` at all, or ``None``."""
    if "x86" not in scenario.arches:
        return f"this host's KVM is x86; the scenario is for {', '.join(scenario.arches)}"
    if scenario.is_concurrent:
        return "real-KVM runs are sequential; the scenario has threads"
    return None


class _Unsupported(Exception):
    pass


def run_scenario(scenario: Scenario, path: str = "native", timeout: float = DEFAULT_TIMEOUT,
                 kvm: Kvm | None = None) -> RealRun:
    """Run ``scenario`` on real KVM with guest accesses on ``path`` (``native`` or
    ``emulated``; a step's own ``path`` wins).  Every fd and mapping is released
    before returning, errors included.

    Raises :class:`~kvmmem.realkvm.kvm.KvmUnavailable` without a usable /dev/kvm."""
    out = RealRun(scenario.name, path)
    reason = unsupported_reason(scenario)
    if reason is not None:
        out.supported, out.reason = False, reason
        return out
    ranges, slots = scenario_footprint(scenario)
    try:
        with HostMemory() as host, RealVm(ranges, slots, path=path, timeout=timeout,
                                          kvm=kvm) as vm:
            _check_capabilities(scenario, vm)
            for mapping in scenario.memory.values():
                out.setup.append({"memory": mapping.name, **_mmap(host, mapping)})
            for slot in scenario.memslots:
                out.setup.append({"memslot": slot.index, **_set_memslot(host, vm, slot)})
            for step in scenario.steps or ():
                outcome = _step(host, vm, step)
                out.steps.append({"step": step.index, "op": step.op, **outcome})
                if outcome["result"] == "unsupported":
                    raise _Unsupported(outcome.get("reason", ""))
    except (MappingUnsupported, KvmUnsupported, _Unsupported) as exc:
        out.supported, out.reason = False, str(exc)
    return out


def _check_capabilities(scenario: Scenario, vm: RealVm) -> None:
    """Raise :class:`_Unsupported` when a step needs an ioctl this host's KVM lacks:
    ``prefault`` needs KVM_PRE_FAULT_MEMORY, which upstream x86 offers only with TDP
    (``kvm_arch_vcpu_pre_fault_memory`` refuses a shadow-paging MMU with EOPNOTSUPP;
    kvm-on-this-host.md §0: capability 0 here), so the model's upstream outcome has no
    real counterpart."""
    if any(isinstance(step, Prefault) for step in scenario.all_steps()) \
            and not vm.vm.supports("KVM_PRE_FAULT_MEMORY"):
        raise _Unsupported("KVM_PRE_FAULT_MEMORY needs a TDP (EPT/NPT) MMU; this host's KVM "
                           "uses shadow paging (KVM_CAP_PRE_FAULT_MEMORY is 0)")


def _mmap(host: HostMemory, mapping: Mapping) -> Outcome:
    at = host.hva(mapping.at.memory, mapping.at.offset) if mapping.at is not None else None
    return host.mmap(mapping.name, mapping.size, mapping.kind, mapping.prot, mapping.fill, at)


def _set_memslot(host: HostMemory, vm: RealVm, step: SetMemslot) -> Outcome:
    hva = host.hva(step.memory, step.offset) if step.memory is not None else (step.hva or 0)
    return vm.set_memslot(step.slot, step.gpa, step.size, hva, step.flag_bits)


def _step(host: HostMemory, vm: RealVm, step: Step) -> Outcome:
    """Perform one step; returns its outcome (without ``step``/``op``)."""
    if isinstance(step, GuestRead):
        return vm.guest_read(step.gpa, step.size, step.vcpu, step.path)
    if isinstance(step, GuestWrite):
        return vm.guest_write(step.gpa, step.size, step.value, step.vcpu, step.path)
    if isinstance(step, GuestExec):
        return vm.guest_exec(step.gpa, step.vcpu, step.path)
    if isinstance(step, HostRead):
        return host.host_read(host.hva(step.memory, step.offset), step.size)
    if isinstance(step, HostWrite):
        return host.host_write(host.hva(step.memory, step.offset), step.size, step.value)
    if isinstance(step, HostMmap):
        return _mmap(host, step.mapping)
    if isinstance(step, HostMunmap):
        mapping = host.mappings[step.memory]
        size = step.size if step.size is not None else mapping.size - step.offset
        return host.munmap(mapping.hva + step.offset, size)
    if isinstance(step, HostMprotect):
        return host.mprotect(host.hva(step.memory, step.offset), step.size, step.prot)
    if isinstance(step, HostMadvise):
        return host.madvise(host.hva(step.memory, step.offset), step.size, step.advice)
    if isinstance(step, SetMemslot):
        return _set_memslot(host, vm, step)
    if isinstance(step, Prefault):
        return vm.prefault(step.gpa, step.size, step.vcpu)
    if isinstance(step, GetDirtyLog):
        return vm.get_dirty_log(step.slot)
    if isinstance(step, ClearDirtyLog):
        return vm.clear_dirty_log(step.slot, step.first_page, step.num_pages)
    return {"result": "unsupported", "reason": f"step {step.op!r} has no real-KVM driver"}
