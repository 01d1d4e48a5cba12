"""kvmmem.conform and the ``kvmmem conform`` command (SCENARIOS.md "kvmmem conform",
exit status): what is compared, verdicts, the TAP report, JSON, exit status."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from kvmmem import conform as cf
from kvmmem.cli import app
from kvmmem.realkvm import Kvm, RealRun
from kvmmem.scenario import load_scenario_text
from kvmmem.scenario.runner import RunResult

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"

RO_WRITE = """
kvmmem: 1
name: ro-write
memory:
  ram: {size: 64K, kind: memfd, prot: r, fill: 0x5a}
memslots:
  - {slot: 0, gpa: 0x40000000, size: 64K, memory: ram}
steps:
  - guest_read: {gpa: 0x40002000, size: 4}
  - guest_write: {gpa: 0x40002000, size: 4, value: 1}
  - guest_read: {gpa: 0x80000000, size: 2}
"""


def _scenario(text: str = RO_WRITE, **replace: str) -> Any:
    for old, new in replace.items():
        text = text.replace(old, new)
    return load_scenario_text(text)


# --- comparing outcomes ------------------------------------------------------------------


def test_fault_compares_on_result_only_where_the_host_reports_no_memory_fault() -> None:
    """KVM_EXIT_MEMORY_FAULT is never produced on this host (kvm-on-this-host.md §3.4):
    a real fault without gpa/size agrees with the model's fault carrying them."""
    model = {"step": 1, "op": "guest_write", "result": "fault", "gpa": 0x2000, "size": 4}
    assert cf.compare_outcomes(model, {"step": 1, "op": "guest_write", "result": "fault"})
    assert not cf.compare_outcomes(model, {"result": "mmio", "gpa": 0x2000, "len": 4,
                                           "is_write": True, "data": 1})
    # Where both report a key, it must be equal.
    assert cf.outcome_differences(model, {"result": "fault", "gpa": 0x3000}) == ["gpa"]


def test_mmio_read_without_value_counts_as_zero() -> None:
    """An MMIO read is answered with zero bytes: the model's outcome without ``value``
    equals a real one with ``value: 0`` and differs from any other value."""
    model = {"result": "mmio", "gpa": 0x80000000, "len": 2, "is_write": False}
    real = {"result": "mmio", "gpa": 0x80000000, "len": 2, "is_write": False, "value": 0}
    assert cf.compare_outcomes(model, real)
    assert cf.outcome_differences(model, {**real, "value": 5}) == ["value"]
    assert cf.outcome_differences(model, {**real, "len": 1}) == ["len"]


def test_every_shared_key_is_compared() -> None:
    """value, errno, dirty, data, is_write, abort: any shared key that differs is named."""
    assert cf.outcome_differences({"result": "ok", "value": 1}, {"result": "ok", "value": 2}) \
        == ["value"]
    assert cf.outcome_differences({"result": "error", "errno": "EEXIST"},
                                  {"result": "error", "errno": "EINVAL"}) == ["errno"]
    assert cf.outcome_differences({"result": "ok", "dirty": [1]}, {"result": "ok", "dirty": []}) \
        == ["dirty"]
    assert cf.outcome_differences({"result": "abort", "abort": "#UD"},
                                  {"result": "abort", "abort": "#UD"}) == []
    assert cf.outcome_differences(None, {"result": "ok"}) == ["result"]


# --- verdicts --------------------------------------------------------------------------------


def test_unsupported_before_anything_runs() -> None:
    """Another architecture, a non-upstream variant, threads: unsupported, with the
    reason, without /dev/kvm."""
    arm = _scenario(**{"name: ro-write": "name: a\narch: arm64"})
    assert cf.unsupported_reason(arm) == "arch arm64 only: this host is x86"
    both = _scenario(**{"name: ro-write": "name: a\narch: [arm64, riscv]"})
    assert cf.unsupported_reason(both) == "arch arm64, riscv only: this host is x86"
    old = _scenario(**{"name: ro-write": "name: a\nvariant: linux-5.4"})
    assert cf.unsupported_reason(old) == "variant linux-5.4: the real kernel is upstream"
    result = cf.conform_scenario(arm)
    assert (result.verdict, result.steps) == ("unsupported", [])
    assert cf.unsupported_reason(_scenario()) is None


def test_compare_runs_lists_every_step_and_marks_differences() -> None:
    """compare_runs: every step with both outcomes; ``differ`` names the first
    difference; the memslot setup is compared too."""
    scn = _scenario()
    model = RunResult("ro-write", "x86", "upstream",
                      steps=[{"step": 0, "op": "guest_read", "result": "ok", "value": 5},
                             {"step": 1, "op": "guest_write", "result": "fault", "gpa": 0x40002000,
                              "size": 4},
                             {"step": 2, "op": "guest_read", "result": "mmio",
                              "gpa": 0x80000000, "len": 2, "is_write": False}],
                      setup=[{"step": 0, "op": "set_memslot", "result": "ok"}])
    real = RealRun("ro-write", "native",
                   setup=[{"memory": "ram", "result": "ok"}, {"memslot": 0, "result": "ok"}],
                   steps=[{"step": 0, "op": "guest_read", "result": "ok", "value": 5},
                          {"step": 1, "op": "guest_write", "result": "fault"},
                          {"step": 2, "op": "guest_read", "result": "mmio", "gpa": 0x80000000,
                           "len": 2, "is_write": False, "value": 0}])
    result = cf.compare_runs(scn, model, real)
    assert result.verdict == "agree" and result.reason == ""
    assert [s.agree for s in result.steps] == [True, True, True]
    real.steps[0]["value"] = 6
    real.setup[1] = {"memslot": 0, "result": "error", "errno": "EINVAL"}
    result = cf.compare_runs(scn, model, real)
    assert result.verdict == "differ"
    assert result.reason == "2 differences; first: memslots[0] (set_memslot) differs in result"
    assert [d.where for d in result.differences] == ["memslots[0]", "step 0"]
    entry = result.to_json()
    assert entry["steps"][0] == {"step": 0, "model": {"result": "ok", "value": 5},
                                 "kvm": {"result": "ok", "value": 6}, "op": "guest_read",
                                 "agree": False}
    assert list(entry)[:4] == ["scenario", "verdict", "steps", "reason"]
    real.supported, real.reason = False, "no hugetlb pages"
    assert cf.compare_runs(scn, model, real).verdict == "unsupported"


# --- TAP and exit status -------------------------------------------------------------------


def _result(verdict: str, reason: str = "", diff: bool = False) -> cf.Conformance:
    r = cf.Conformance(f"s-{verdict}", "f.yaml", "native", verdict, reason)
    if diff:
        r.steps.append(cf.StepComparison(3, "guest_write", {"result": "fault", "gpa": 0x1000},
                                         {"result": "mmio", "gpa": 0x1000, "len": 4,
                                          "is_write": True, "data": 1}, False, "step 3"))
    return r


def test_tap_report_is_kselftest_style() -> None:
    """TAP 13 header and plan, ``ok N - name``, ``not ok N - name`` followed by
    ``# step I: model {...} kvm {...}``, ``# SKIP reason``, kselftest ``# Totals``."""
    lines = cf.tap_lines([_result("agree"), _result("differ", "x", diff=True),
                          _result("unsupported", "arch arm64 only: this host is x86")])
    assert lines == [
        "TAP version 13",
        "1..3",
        "ok 1 - s-agree",
        "not ok 2 - s-differ",
        '# step 3: model {"result": "fault", "gpa": 0x1000} kvm {"result": "mmio", '
        '"gpa": 0x1000, "len": 4, "is_write": true, "data": 0x1}',
        "ok 3 - s-unsupported # SKIP arch arm64 only: this host is x86",
        "# Totals: pass:1 fail:1 xfail:0 xpass:0 skip:1 error:0",
    ]


def test_exit_status_follows_scenarios_md() -> None:
    """0 all agree (skips allowed), 1 a difference, 3 a model invariant violation,
    4 nothing compared."""
    agree, differ, skip = _result("agree"), _result("differ"), _result("unsupported")
    assert cf.exit_status([agree, skip]) == 0
    assert cf.exit_status([agree, differ, skip]) == 1
    assert cf.exit_status([skip, skip]) == 4
    broken = _result("differ")
    broken.violations.append({"invariant": "coherence", "step": 0, "detail": "x"})
    assert cf.exit_status([differ, broken]) == 3


# --- the command -----------------------------------------------------------------------------


def test_cli_bad_input_exits_2(tmp_path: Path) -> None:
    """A missing file, a broken file or an unknown --path: exit 2, nothing runs."""
    runner = CliRunner()
    res = runner.invoke(app, ["conform", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "no such file" in res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("kvmmem: 1\nname: x\nsteps: [{guest_read: {gpa: 0}}]\n")
    res = runner.invoke(app, ["conform", str(bad)])
    assert res.exit_code == 2 and "bad.yaml" in res.output
    res = runner.invoke(app, ["conform", "--path", "fast", str(SCENARIOS / "quickstart.yaml")])
    assert res.exit_code == 2 and "--path" in res.output


def test_cli_without_kvm_exits_4_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """No usable /dev/kvm: one line saying so, exit status 4 (SCENARIOS.md)."""
    monkeypatch.setattr("kvmmem.realkvm.probe_kvm", lambda: "/dev/kvm: No such file")
    res = CliRunner().invoke(app, ["conform", str(SCENARIOS / "quickstart.yaml")])
    assert res.exit_code == 4
    assert res.output.splitlines() == [
        "kvmmem conform: skipped: no usable /dev/kvm: /dev/kvm: No such file"]


@pytest.mark.kvm
def test_cli_tap_and_json_on_real_kvm(kvm: Kvm, tmp_path: Path) -> None:
    """kvmmem conform on real KVM: an agreeing scenario and an arm64-only one (SKIP);
    --json has the contract's keys; exit 0; every scenario unsupported exits 4."""
    ro = tmp_path / "ro.yaml"
    ro.write_text(RO_WRITE)
    arm = tmp_path / "arm.yaml"
    arm.write_text(RO_WRITE.replace("name: ro-write", "name: arm\narch: arm64"))
    runner = CliRunner()
    res = runner.invoke(app, ["conform", str(ro), str(arm)])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines() == [
        "TAP version 13", "1..2", "ok 1 - ro-write",
        "ok 2 - arm # SKIP arch arm64 only: this host is x86",
        "# Totals: pass:1 fail:0 xfail:0 xpass:0 skip:1 error:0"]
    res = runner.invoke(app, ["conform", "--json", "--path", "emulated", str(ro), str(arm)])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    first, second = doc["results"]
    assert (first["scenario"], first["verdict"], first["reason"]) == ("ro-write", "agree", "")
    assert [s["step"] for s in first["steps"]] == [0, 1, 2]
    # The emulated path: a write the emulator cannot complete is MMIO on both sides.
    # (--json adds the exact hex of 64-bit values beside them: data_hex)
    assert first["steps"][1]["kvm"] == {"result": "mmio", "gpa": 0x40002000, "len": 4,
                                        "is_write": True, "data": 1, "data_hex": "0x1"}
    assert first["path"] == "emulated"
    assert second == {**second, "scenario": "arm", "verdict": "unsupported", "steps": []}
    res = runner.invoke(app, ["conform", str(arm)])
    assert res.exit_code == 4


@pytest.mark.kvm
def test_cli_difference_exits_1(kvm: Kvm, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A step whose outcomes differ: ``not ok`` with the step line, exit status 1.  The
    difference is made by giving the model a wrong answer for one step."""
    real_run_model = cf.run_model

    def wrong_model(scenario: Any, path: str = "native", arch: str = "x86",
                    variant: str | None = None) -> RunResult:
        result = real_run_model(scenario, path, arch, variant)
        result.steps[1] = {"step": 1, "op": "guest_write", "result": "ok"}
        return result

    monkeypatch.setattr(cf, "run_model", wrong_model)
    ro = tmp_path / "ro.yaml"
    ro.write_text(RO_WRITE)
    res = CliRunner().invoke(app, ["conform", str(ro)])
    assert res.exit_code == 1, res.output
    lines = res.output.splitlines()
    assert lines[2:4] == ["not ok 1 - ro-write",
                          '# step 1: model {"result": "ok"} kvm {"result": "fault"}']
