"""The event log (kernel tracepoint names, per step) and its Chrome
trace-event export, against a scenario whose events are known.

The expected events follow the kernel: KVM_SET_USER_MEMORY_REGION fires
``kvm_set_user_memory_region``; a stage-2 fault ``kvm_mmu_spte_requested``
then ``kvm_mmu_set_spte`` (arch/x86/kvm/mmu/mmutrace.h); munmap the MMU
notifier's ``kvm_unmap_hva_range`` (virt/kvm/kvm_main.c
kvm_mmu_notifier_invalidate_range_start) followed on x86 by the remote TLB
flush, while arm64 invalidates per entry (no VM-wide flush); KVM_RUN failing
with EFAULT ``kvm_userspace_exit``; an access outside every slot ``kvm_mmio``.
"""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from kvmmem.cli import app
from kvmmem.report.trace import (
    SETUP_STEP,
    StepEventLog,
    chrome_trace,
    events_text,
    format_args,
    run_traced,
    step_actor,
)
from kvmmem.scenario.loader import load_scenario_text
from kvmmem.scenario.runner import run_scenario

KNOWN = """\
kvmmem: 1
name: known-events
arch: [x86, arm64]
memory:
  ram: {size: 64K, kind: anon, prot: rw, fill: 0x11}
memslots:
  - {slot: 0, gpa: 0x40000000, size: 64K, memory: ram}
steps:
  - guest_write: {gpa: 0x40001000, size: 4, value: 7}
    expect: {result: ok}
  - host_munmap: {memory: ram}
  - guest_read: {gpa: 0x40001000, size: 4}
    expect: {result: fault}
  - guest_read: {gpa: 0x80000000, size: 4}
    expect: {result: mmio}
  - host_mmap: {name: other, size: 4K, kind: anon, prot: rw}
"""


def _scenario() -> Any:
    return load_scenario_text(KNOWN, "known.yaml")


def _names_by_step(log: StepEventLog) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for ev, step in zip(log.events, log.steps, strict=True):
        out.setdefault(step, []).append(ev.name)
    return out


@pytest.mark.parametrize("arch", ["x86", "arm64"])
def test_event_log_names_each_step_like_the_kernel(arch: str) -> None:
    """Tracepoints per step: slot creation, fault (x86: requested, set; arm64:
    kvm_guest_fault for every abort, kvm_mmio_emulate before an MMIO exit), notifier
    invalidation on munmap (plus the remote flush on x86 only), the EFAULT
    userspace exit and the MMIO exit; a mapping no slot covers fires nothing."""
    result = run_traced(_scenario(), arch)
    log = result.events
    assert isinstance(log, StepEventLog)
    assert result.mismatches == [] and result.violations == []
    by_step = _names_by_step(log)
    assert by_step[SETUP_STEP] == ["kvm_set_user_memory_region"]
    # each arch its own tracepoints: x86's kvmmmu, arm64's kvm_guest_fault (issue 12)
    fault = ["kvm_mmu_spte_requested", "kvm_mmu_set_spte"] if arch == "x86" else \
        ["kvm_guest_fault"]
    assert by_step[0] == fault
    munmap = ["kvm_unmap_hva_range", "kvm_tlb_flush"] if arch == "x86" else \
        ["kvm_unmap_hva_range"]
    assert by_step[1] == munmap
    assert by_step[2] == ([] if arch == "x86" else ["kvm_guest_fault"]) + ["kvm_userspace_exit"]
    assert by_step[3] == (["kvm_mmio"] if arch == "x86" else
                          ["kvm_guest_fault", "kvm_mmio_emulate", "kvm_mmio"])
    assert 4 not in by_step
    # seq numbers order the whole log
    assert [ev.seq for ev in log.events] == list(range(len(log.events)))


def test_event_arguments_are_the_fault_and_the_range() -> None:
    """kvm_mmu_set_spte names the gfn; kvm_unmap_hva_range the munmapped hva
    range; kvm_mmio the exit's type, gpa and length; the EFAULT exit errno 14."""
    result = run_traced(_scenario(), "x86")
    log = result.events
    assert isinstance(log, StepEventLog)
    ev = {e.name: e for e in log.events}
    assert ev["kvm_set_user_memory_region"].args["gpa"] == 0x40000000
    assert ev["kvm_set_user_memory_region"].args["size"] == 0x10000
    assert ev["kvm_mmu_set_spte"].args["gfn"] == 0x40001
    hva = ev["kvm_set_user_memory_region"].args["hva"]
    assert ev["kvm_unmap_hva_range"].args["start"] == hva
    assert ev["kvm_unmap_hva_range"].args["end"] == hva + 0x10000
    assert ev["kvm_mmio"].args["gpa"] == 0x80000000
    assert ev["kvm_mmio"].args["len"] == 4
    assert ev["kvm_mmio"].args["type"] == "unsatisfied-read"
    assert ev["kvm_userspace_exit"].args["errno"] == "EFAULT"  # by name, not 0xe


def test_traced_run_has_the_same_outcomes_as_a_plain_run() -> None:
    """Recording events changes nothing the run reports."""
    scn = _scenario()
    for arch in ("x86", "arm64"):
        assert run_traced(scn, arch).to_json() == run_scenario(scn, arch).to_json()


def _validate_chrome_trace(trace: dict[str, Any]) -> None:
    """The Trace Event Format Perfetto reads: every event has name, ph, ts,
    pid, tid; complete events a non-negative dur; instants a scope; args a dict."""
    assert isinstance(trace["traceEvents"], list)
    json.dumps(trace)  # serialisable as it stands
    for ev in trace["traceEvents"]:
        assert {"name", "ph", "ts", "pid", "tid"} <= ev.keys(), ev
        assert isinstance(ev["ts"], int) and ev["ts"] >= 0
        assert ev["ph"] in ("X", "i", "M")
        if ev["ph"] == "X":
            assert isinstance(ev["dur"], int) and ev["dur"] >= 1
        if ev["ph"] == "i":
            assert ev["s"] in ("t", "p")
        assert isinstance(ev.get("args", {}), dict)


def test_chrome_trace_structure_tracks_and_nesting() -> None:
    """One process per run, named; a track per actor (kvm, host, vcpu0); a
    complete event per step on its actor's track; each tracepoint an instant
    on the same track inside its step's span."""
    scn = _scenario()
    results = [run_traced(scn, "x86"), run_traced(scn, "arm64")]
    trace = chrome_trace(scn, results)
    _validate_chrome_trace(trace)
    events = trace["traceEvents"]
    procs = {ev["pid"]: ev["args"]["name"] for ev in events if ev["name"] == "process_name"}
    assert procs == {1: "known-events arch=x86 variant=upstream",
                     2: "known-events arch=arm64 variant=upstream"}
    threads = {(ev["pid"], ev["args"]["name"]): ev["tid"] for ev in events
               if ev["name"] == "thread_name"}
    assert {name for _, name in threads} == {"kvm", "host", "vcpu0"}
    for pid in (1, 2):
        spans = [ev for ev in events if ev["ph"] == "X" and ev["pid"] == pid]
        assert [s["name"] for s in spans] == ["setup: memslots", "0 guest_write",
                                              "1 host_munmap", "2 guest_read",
                                              "3 guest_read", "4 host_mmap"]
        actor = {s["name"]: s["tid"] for s in spans}
        assert actor["0 guest_write"] == threads[(pid, "vcpu0")]
        assert actor["1 host_munmap"] == threads[(pid, "host")]
        assert actor["setup: memslots"] == threads[(pid, "kvm")]
        # spans do not overlap, in step order
        for a, b in pairwise(spans):
            assert a["ts"] + a["dur"] <= b["ts"]
        instants = [ev for ev in events if ev["ph"] == "i" and ev["pid"] == pid]
        assert len(instants) == len(results[pid - 1].events.events)  # type: ignore[union-attr]
        for inst in instants:
            owner = [s for s in spans if s["ts"] < inst["ts"] < s["ts"] + s["dur"]]
            assert len(owner) == 1, inst
            assert owner[0]["tid"] == inst["tid"]
        if pid == 1:  # x86: kvmmmu
            set_spte = next(i for i in instants if i["name"] == "kvm_mmu_set_spte")
            assert set_spte["cat"] == "kvmmmu"
            assert set_spte["args"]["gfn"] == "0x40001"
        else:  # arm64: kvm_handle_guest_abort's kvm_guest_fault
            fault = next(i for i in instants if i["name"] == "kvm_guest_fault")
            assert fault["args"]["ipa"] == "0x40001000"
        step0 = next(s for s in spans if s["name"] == "0 guest_write")
        assert step0["args"]["outcome"] == "ok"
        assert step0["args"]["expect"] == '{"result": "ok"}'


def test_chrome_trace_marks_a_violation() -> None:
    """A run stopped by an invariant violation (the remapped-no-write-check
    mutation maps a read-only device page writable) shows it as a
    process-scoped instant event."""
    from kvmmem.scenario.loader import load_scenario

    scn = load_scenario(Path(__file__).resolve().parents[2] / "scenarios"
                        / "pfnmap-readonly-vma.yaml")
    result = run_traced(scn, "x86", "remapped-no-write-check")
    assert result.violations
    trace = chrome_trace(scn, [result])
    _validate_chrome_trace(trace)
    marks = [ev for ev in trace["traceEvents"] if ev.get("cat") == "invariant"]
    assert len(marks) == 1
    assert marks[0]["s"] == "p"
    assert marks[0]["name"].startswith("invariant violated: ")


def test_helpers() -> None:
    """Actor per step kind; hex for addresses, decimal for sizes and levels."""
    assert step_actor(None, "guest_read") == "vcpu0"
    assert step_actor(None, "prefault") == "vcpu0"
    assert step_actor(None, "host_mprotect") == "host"
    assert step_actor(None, "set_memslot") == "kvm"
    assert step_actor(None, "get_dirty_log") == "kvm"
    assert format_args({"gpa": 4096, "len": 8, "level": 1, "vm": True, "type": "write"}) == \
        {"gpa": "0x1000", "len": 8, "level": 1, "vm": True, "type": "write"}


def test_events_text_groups_by_step() -> None:
    text = events_text(run_traced(_scenario(), "x86"))
    assert "[setup]" in text and "[step 1]" in text
    assert "kvm_unmap_hva_range: start=" in text


def test_cli_run_trace_and_show_events(tmp_path: Path) -> None:
    """``kvmmem run FILE --trace OUT.json --show events`` writes the trace
    (one process per architecture) and prints the tracepoints."""
    scn = tmp_path / "known.yaml"
    scn.write_text(KNOWN)
    out = tmp_path / "trace.json"
    res = CliRunner().invoke(app, ["run", str(scn), "--trace", str(out), "--show", "events"])
    assert res.exit_code == 0, res.output
    assert "kvm_mmu_spte_requested" in res.output
    trace = json.loads(out.read_text())
    _validate_chrome_trace(trace)
    assert {ev["pid"] for ev in trace["traceEvents"]} == {1, 2}


def test_cli_run_trace_unwritable_path_is_bad_input(tmp_path: Path) -> None:
    scn = tmp_path / "known.yaml"
    scn.write_text(KNOWN)
    res = CliRunner().invoke(app, ["run", str(scn), "--arch", "x86", "--trace",
                                   str(tmp_path / "missing" / "t.json")])
    assert res.exit_code == 2
    assert "cannot write" in res.output
