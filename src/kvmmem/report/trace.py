"""The event log of a run and its export as Chrome trace-event JSON.

A run with an event log attached records every tracepoint the model hits,
named as the kernel names them (``kvm_set_user_memory_region``,
``kvm_mmu_spte_requested``, ``kvm_mmu_set_spte``, ``kvm_unmap_hva_range``,
``kvm_tlb_flush``, ``kvm_mmio``, ``kvm_userspace_exit``, ``kvm_age_hva``; see
:mod:`kvmmem.kvm.stats`).  :func:`run_traced` runs a scenario with a log that
also remembers which step each event belongs to (:class:`StepEventLog`).

:func:`chrome_trace` turns one or more traced runs into the Trace Event
Format that Perfetto (ui.perfetto.dev) and chrome://tracing open::

    {"traceEvents": [{"name", "ph", "ts", "dur", "pid", "tid", "args"}, ...],
     "displayTimeUnit": "ns", "otherData": {...}}

* one process (``pid``) per run (architecture x variant);
* one track (``tid``) per actor: ``kvm`` (the VMM's VM ioctls:
  ``set_memslot``, ``get_dirty_log``, ``clear_dirty_log`` and the setup
  memslots), ``host`` (userspace changing its mappings: ``host_*``) and
  ``vcpuN`` (guest accesses and ``prefault``, a vCPU ioctl); under
  ``explore`` the scenario's thread names;
* each step is a complete event (``"ph": "X"``) on its actor's track, with
  the outcome in ``args``;
* each tracepoint is a thread-scoped instant event (``"ph": "i"``) on the
  track of the step that caused it, inside that step's span;
* a violated invariant is a process-scoped instant event;
* with ``--explain``, the kernel functions each step went through
  (:mod:`kvmmem.report.explain`) are complete events nested inside the step's span,
  category ``explain``, with their source file, result and facts in ``args``.

The model has no clock: time is a logical microsecond counter, one tick per
event, so a trace shows order and nesting, not durations.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmmem.kvm.stats import Event, EventLog
from kvmmem.scenario.model import STEP_TYPES, Prefault, Scenario, Step
from kvmmem.scenario.runner import Runner, RunResult

SETUP_STEP = -1
"""The step index of events emitted while the top-level ``memslots`` are made."""

TRACEPOINT_CATEGORY = {
    "kvm_mmu_spte_requested": "kvmmmu",
    "kvm_mmu_set_spte": "kvmmmu",
    "kvm_tlb_flush": "kvmmmu",
}
"""Tracepoints of the ``kvmmmu`` system; every other one is in ``kvm``."""

_DECIMAL_ARGS = ("level", "len", "slot", "errno")


@dataclass(slots=True)
class StepEventLog(EventLog):
    """An :class:`EventLog` that also records, per event, the step index the
    runner had set (``EventLog.step``) when the event was emitted:
    ``steps[i]`` is the step of ``events[i]`` (``-1``: the setup memslots)."""

    steps: list[int] = field(default_factory=list)

    def emit(self, name: str, **args: Any) -> None:
        """Record tracepoint ``name`` with ``args`` and the current step."""
        EventLog.emit(self, name, **args)
        self.steps.append(self.step)

    def events_of_step(self, step: int) -> list[Event]:
        """The events emitted during step ``step`` (``-1``: setup), in order."""
        return [ev for ev, s in zip(self.events, self.steps, strict=True) if s == step]


def run_traced(scenario: Scenario, arch: str, variant: str | None = None) -> RunResult:
    """Run ``scenario`` like :func:`kvmmem.scenario.runner.run_scenario` with a
    :class:`StepEventLog` attached; ``result.events`` is that log.

    Raises InputError as ``run_scenario`` does (threads, bad arch/variant)."""
    from kvmmem.errors import InputError

    if scenario.steps is None:
        raise InputError(f"{scenario.source}: {scenario.name} has threads, not steps: "
                         "run it with `kvmmem explore`")
    runner = Runner(scenario, arch, variant)
    runner.vm.log = StepEventLog()
    return runner.run()


def event_step(log: EventLog, index: int) -> int | None:
    """The step index of ``log.events[index]``: from a :class:`StepEventLog`,
    or from the event itself when the kernel model records it; None if unknown."""
    if isinstance(log, StepEventLog):
        return log.steps[index]
    step = getattr(log.events[index], "step", None)
    return step if isinstance(step, int) else None


def format_args(args: dict[str, Any]) -> dict[str, Any]:
    """Tracepoint arguments for display: addresses and values in hex, sizes,
    levels, slot ids and errnos in decimal, everything else unchanged."""
    out: dict[str, Any] = {}
    for key, value in args.items():
        if isinstance(value, int) and not isinstance(value, bool) and key not in _DECIMAL_ARGS:
            out[key] = hex(value)
        else:
            out[key] = value
    return out


def step_actor(step: Step | None, op: str) -> str:
    """The track a step runs on: ``vcpuN`` for guest accesses and prefault,
    ``host`` for ``host_*`` steps, ``kvm`` for VM ioctls (and the setup);
    under explore, the step's own thread name (:attr:`Step.actor` says which)."""
    if step is not None and step.thread is not None:
        return step.thread
    cls = type(step) if step is not None else STEP_TYPES.get(op)
    actor = cls.actor if cls is not None else "kvm"
    if actor == "vcpu":
        return f"vcpu{getattr(step, 'vcpu', 0)}"
    return actor


def _outcome_summary(outcome: dict[str, Any]) -> str:
    parts = [str(outcome.get("result", "?"))]
    for key, value in outcome.items():
        if key in ("step", "op", "result"):
            continue
        if isinstance(value, bool):
            parts.append(f"{key}={'yes' if value else 'no'}")
        elif isinstance(value, int):
            parts.append(f"{key}={value:#x}")
        elif isinstance(value, list):
            parts.append(f"{key}=[{', '.join(hex(v) for v in value)}]")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


class _Tracks:
    """Stable small integer thread ids per actor name, in first-use order
    (``kvm`` 1, ``host`` 2, vCPUs from 10 in index order, others after)."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def tid(self, actor: str) -> int:
        if actor not in self.ids:
            if actor == "kvm":
                self.ids[actor] = 1
            elif actor == "host":
                self.ids[actor] = 2
            elif actor.startswith("vcpu") and actor[4:].isdigit():
                self.ids[actor] = 10 + int(actor[4:])
            else:
                self.ids[actor] = 100 + sum(1 for t in self.ids.values() if t >= 100)
        return self.ids[actor]


def _run_events(result: RunResult, scenario: Scenario, pid: int) -> list[dict[str, Any]]:
    """The trace events of one run (without metadata)."""
    out: list[dict[str, Any]] = []
    tracks = _Tracks()
    steps_by_index: dict[int, Step] = {s.index: s for s in scenario.steps or ()}
    log = result.events
    # Group the log's events by step, keeping their order.
    grouped: dict[int, list[Event]] = {}
    unplaced: list[Event] = []
    if log is not None:
        for i, ev in enumerate(log.events):
            at = event_step(log, i)
            if at is None:
                unplaced.append(ev)
            else:
                grouped.setdefault(at, []).append(ev)
    clock = 0

    def nested(node: dict[str, Any], tid: int) -> None:
        """An explanation's node and its children as nested complete events."""
        nonlocal clock
        start = clock
        clock += 1
        for child in node["children"]:
            nested(child, tid)
        args = {"source": node["source"], "result": node["result"], **node["facts"]}
        if node.get("decisive"):
            args["decisive"] = True
        out.append({"name": node["function"], "cat": "explain", "ph": "X", "ts": start,
                    "dur": clock - start, "pid": pid, "tid": tid, "args": args})
        clock += 1

    def span(name: str, actor: str, events: list[Event], args: dict[str, Any],
             actor_of_event: bool = False, tree: dict[str, Any] | None = None) -> None:
        nonlocal clock
        start = clock
        clock += 1
        if tree is not None:
            for child in tree["children"]:
                nested(child, tracks.tid(actor))
        instants = []
        for ev in events:
            where = ev.thread if actor_of_event or ev.thread != "main" else actor
            instants.append({"name": ev.name, "cat": TRACEPOINT_CATEGORY.get(ev.name, "kvm"),
                             "ph": "i", "s": "t", "ts": clock, "pid": pid,
                             "tid": tracks.tid(where),
                             "args": {"seq": ev.seq, **format_args(ev.args)}})
            clock += 1
        out.append({"name": name, "cat": "step", "ph": "X", "ts": start, "dur": clock - start,
                    "pid": pid, "tid": tracks.tid(actor), "args": args})
        out.extend(instants)
        clock += 1

    mismatched = {m.step: m for m in result.mismatches}
    setup_events = grouped.get(SETUP_STEP, [])
    if result.setup or setup_events:
        span("setup: memslots", "kvm", setup_events,
             {"memslots": [_outcome_summary(o) for o in result.setup]})
    for outcome in result.steps:
        index = outcome["step"]
        op = outcome["op"]
        step = steps_by_index.get(index)
        args: dict[str, Any] = {"step": index, "op": op, "outcome": _outcome_summary(outcome)}
        if step is not None:
            args["line"] = step.line
            if step.expect is not None:
                args["expect"] = json.dumps(step.expect, sort_keys=True)
        if index in mismatched:
            args["expectation"] = "FAILED"
        if isinstance(step, Prefault):
            args["range"] = f"{step.gpa:#x}+{step.size:#x}"
        span(f"{index} {op}", step_actor(step, op), grouped.get(index, []), args,
             tree=result.explanations.get(index))
    if unplaced:
        span("events (step unknown)", "kvm", unplaced, {}, actor_of_event=True)
    for v in result.violations:
        out.append({"name": f"invariant violated: {v['invariant']}", "cat": "invariant",
                    "ph": "i", "s": "p", "ts": clock, "pid": pid, "tid": tracks.tid("kvm"),
                    "args": {"step": v["step"], "detail": v["detail"],
                             **({"setup": True} if v.get("setup") else {})}})
        clock += 1
    meta: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "ts": 0, "pid": pid, "tid": 0,
         "args": {"name": f"{result.scenario} arch={result.arch} variant={result.variant}"}},
        {"name": "process_sort_index", "ph": "M", "ts": 0, "pid": pid, "tid": 0,
         "args": {"sort_index": pid}},
    ]
    for actor, tid in tracks.ids.items():
        meta.append({"name": "thread_name", "ph": "M", "ts": 0, "pid": pid, "tid": tid,
                     "args": {"name": actor}})
        meta.append({"name": "thread_sort_index", "ph": "M", "ts": 0, "pid": pid, "tid": tid,
                     "args": {"sort_index": tid}})
    return meta + out


def chrome_trace(scenario: Scenario, results: list[RunResult]) -> dict[str, Any]:
    """The Chrome trace-event object for ``results`` (runs of ``scenario``),
    one process per run, ``pid`` 1, 2, ... in order."""
    events: list[dict[str, Any]] = []
    for pid, result in enumerate(results, start=1):
        events.extend(_run_events(result, scenario, pid))
    return {
        "traceEvents": events,
        "displayTimeUnit": "ns",
        "otherData": {"tool": "kvmmem", "scenario": scenario.name,
                      "clock": "logical: one microsecond per event"},
    }


def write_chrome_trace(path: Path, scenario: Scenario, results: list[RunResult]) -> None:
    """Write :func:`chrome_trace` as JSON to ``path`` (raises OSError)."""
    path.write_text(json.dumps(chrome_trace(scenario, results), indent=None) + "\n")


def events_text(result: RunResult) -> str:
    """The event log as text, grouped by step: ``kvm_mmu_set_spte: gfn=0x1 ...``."""
    log = result.events
    lines = [f"events ({result.arch}, {result.variant}):"]
    if log is None or not log.events:
        lines.append("  (none)")
        return "\n".join(lines)
    current: int | str | None = "start"
    for i, ev in enumerate(log.events):
        step = event_step(log, i)
        if step != current:
            current = step
            label = "setup" if step == SETUP_STEP else ("?" if step is None else f"step {step}")
            lines.append(f"  [{label}]")
        lines.append(f"    {ev.seq:>4}  {ev.format()}")
    return "\n".join(lines)
