"""The CLI edges a new user trips over (issue 17), run as a user runs them: the
command line through typer's CliRunner, its exit status, its one line, no
traceback.

* ``kvmmem --version``;
* ``--plot`` with a name that is no image file, or a directory: one line, exit 2;
* a file naming several architectures with an x86-only step: ``run`` runs x86 and
  says why not arm64, ``compare`` shows the arm64 column as not applicable;
* ``run --variant`` and ``compare --variant``: the same comma-list syntax and the
  same error line;
* ``--help`` without ``<bool>`` after flags;
* ``--json``: the exact hex of 64-bit values beside the integers (run, compare,
  explore --replay, conform); ``bench --json`` counts are integers;
* ``explore``: outcome lines in hex, the replay hint names the real file,
  ``--determinism N`` says what it ran and compared;
* ``conform`` with a missing file: that file is an error line, the others run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from kvmmem import __version__
from kvmmem.benchmarks.suite import bench_json
from kvmmem.cli import app
from kvmmem.report.jsonout import with_hex

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"
QUICKSTART = str(SCENARIOS / "quickstart.yaml")
RACE = str(SCENARIOS / "race-fault-vs-munmap.yaml")
WIDE = {"COLUMNS": "200"}

# x86 and arm64, one step on x86's instruction emulator (which arm64 lacks)
EMULATED_BOTH = """\
kvmmem: 1
name: emulated-both
arch: [x86, arm64]
memory:
  ram: {size: 2M, kind: anon, prot: rw}
memslots:
  - {slot: 0, gpa: 0x0, size: 2M, memory: ram}
steps:
  - guest_write: {gpa: 0x1000, size: 8, value: 0xabababababababab, path: emulated}
  - guest_read: {gpa: 0x1000, size: 8}
    expect: {result: ok, value: 0xabababababababab}
"""


def kvmmem(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), env=WIDE)


def one_error_line(res: Result) -> str:
    """The command printed exactly one line on stderr, ``kvmmem: error: ...``, and
    no traceback; returns it."""
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("kvmmem: error: "), lines[0]
    return lines[0]


def write(tmp_path: Path, text: str, name: str = "s.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --- --version ----------------------------------------------------------------------


def test_version_option_and_command() -> None:
    for args in (["--version"], ["version"]):
        res = kvmmem(*args)
        assert res.exit_code == 0
        assert res.stdout == f"{__version__}\n"


# --- --plot -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "message"), [
    ("x.txt", "'.txt' is not an image format (give a file name ending in .png, .svg, .pdf)"),
    ("noext", "no file suffix (give a file name ending in .png, .svg, .pdf)"),
])
def test_plot_to_a_file_that_is_no_image_is_one_line(tmp_path: Path, name: str,
                                                     message: str) -> None:
    target = tmp_path / name
    res = kvmmem("run", QUICKSTART, "--plot", str(target))
    assert res.exit_code == 2
    assert one_error_line(res) == f"kvmmem: error: --plot {target}: {message}"
    assert list(tmp_path.iterdir()) == []  # nothing ran, nothing written
    assert res.stdout == ""


def test_plot_to_a_directory_is_one_line(tmp_path: Path) -> None:
    res = kvmmem("run", QUICKSTART, "--plot", str(tmp_path))
    assert res.exit_code == 2
    assert one_error_line(res) == (f"kvmmem: error: --plot {tmp_path}: is a directory; give "
                                   "a file name ending in .png")
    assert list(tmp_path.iterdir()) == []
    assert not Path(f"{tmp_path}.png").exists()


# --- what can run on each architecture ------------------------------------------------


def test_run_skips_an_architecture_the_scenario_cannot_run_on(tmp_path: Path) -> None:
    """x86 runs (exit 0, its JSON object); arm64 is one stderr line saying why."""
    path = write(tmp_path, EMULATED_BOTH)
    res = kvmmem("run", path, "--json")
    assert res.exit_code == 0, res.output
    (obj,) = [json.loads(line) for line in res.stdout.splitlines()]
    assert obj["arch"] == "x86" and obj["violations"] == []
    assert res.stderr.splitlines() == [
        f"kvmmem run: arm64: not applicable: {path}:9: guest_write.path: the emulated path "
        "is x86's instruction emulator; arm64 has none"]


def test_run_on_an_architecture_named_that_cannot_is_bad_input(tmp_path: Path) -> None:
    path = write(tmp_path, EMULATED_BOTH)
    res = kvmmem("run", path, "--arch", "arm64")
    assert res.exit_code == 2
    assert one_error_line(res) == (f"kvmmem: error: {path}:9: guest_write.path: the emulated "
                                   "path is x86's instruction emulator; arm64 has none")
    assert res.stdout == ""  # nothing ran half-way


def test_compare_shows_the_column_as_not_applicable(tmp_path: Path) -> None:
    path = write(tmp_path, EMULATED_BOTH)
    res = kvmmem("compare", path, "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    x86, arm64 = doc["columns"]
    assert (x86["arch"], x86["applicable"], x86["reason"]) == ("x86", True, None)
    assert (arm64["arch"], arm64["applicable"]) == ("arm64", False)
    assert "arm64 has none" in arm64["reason"]
    assert [r["arch"] for r in doc["runs"]] == ["x86"]
    for row in doc["rows"]:
        assert row["cells"][1] == "n/a" and row["differs"] == [False, False]
    assert doc["differences"] == 0
    res = kvmmem("compare", path)
    assert res.exit_code == 0
    assert "(n/a)" in res.stdout
    assert "arm64 upstream: not applicable:" in res.stdout


def test_compare_with_no_applicable_column_is_bad_input(tmp_path: Path) -> None:
    path = write(tmp_path, EMULATED_BOTH)
    res = kvmmem("compare", path, "--arch", "arm64,riscv")
    assert res.exit_code == 2
    assert "arm64 has none" in one_error_line(res)


# --- --variant: one syntax, one error ---------------------------------------------------


def test_run_and_compare_take_the_same_variant_list() -> None:
    for command in ("run", "compare"):
        res = kvmmem(command, QUICKSTART, "--variant", "upstream,nope")
        assert res.exit_code == 2
        assert one_error_line(res) == (
            "kvmmem: error: --variant: unknown variant 'nope' (known: upstream, linux-5.4, "
            "no-invalidate-retry, remapped-no-write-check, no-tlb-flush, no-gmem-invalidate, "
            "no-ring-reprotect, a release 5.4..7.3 such as 6.1, RELEASE+MUTATION, with an "
            "optional page-size suffix such as 7.3-16k)")
    res = kvmmem("run", QUICKSTART, "--arch", "arm64", "--variant", "upstream,linux-5.4",
                 "--json")
    assert res.exit_code == 0, res.output
    objs = [json.loads(line) for line in res.stdout.splitlines()]
    assert [(o["arch"], o["variant"]) for o in objs] == [("arm64", "upstream"),
                                                          ("arm64", "linux-5.4")]


# --- --help -------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "compare", "conform", "explore", "bench"])
def test_help_shows_no_bool_metavar_and_fits(command: str) -> None:
    res = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "80"})
    assert res.exit_code == 0
    assert "<bool>" not in res.stdout
    assert "--json" in res.stdout
    assert max(len(line) for line in res.stdout.splitlines()) <= 80


# --- JSON: exact hex beside 64-bit values --------------------------------------------------


def test_with_hex_adds_twins_to_outcomes_only() -> None:
    doc: dict[str, Any] = {"steps": [
        {"step": 0, "op": "guest_read", "result": "ok", "value": 0xabababababababab},
        {"step": 1, "op": "guest_write", "result": "mmio", "gpa": 0x1000, "len": 8,
         "is_write": True, "data": 1},
        {"step": 2, "op": "host_read", "result": "ok", "value": True}],
        "value": 5}
    out = with_hex(doc)
    assert list(out["steps"][0]) == ["step", "op", "result", "value", "value_hex"]
    assert out["steps"][0]["value_hex"] == "0xabababababababab"
    assert out["steps"][1]["data_hex"] == "0x1" and "gpa_hex" not in out["steps"][1]
    assert "value_hex" not in out["steps"][2]  # a boolean is not a number here
    assert out["value"] == 5 and "value_hex" not in out  # not an outcome


def test_run_json_has_value_hex_that_jq_keeps() -> None:
    res = kvmmem("run", QUICKSTART, "--arch", "x86", "--json")
    assert res.exit_code == 0
    obj = json.loads(res.stdout)
    read = obj["steps"][3]
    assert read["value"] == 0xabababababababab  # the integer stays (the contract)
    assert read["value_hex"] == "0xabababababababab"
    assert '"value_hex": "0xabababababababab"' in res.stdout


def test_compare_json_runs_carry_value_hex() -> None:
    res = kvmmem("compare", QUICKSTART, "--json")
    assert res.exit_code == 0
    for run in json.loads(res.stdout)["runs"]:
        assert run["steps"][3]["value_hex"] == "0xabababababababab"


def test_bench_json_counts_are_integers() -> None:
    doc = bench_json({"fault_pages": 1000.0, "memslots_present": 32000.0,
                      "fault_4k_fresh_us": 4.5}, None)
    assert doc == {"model": {"fault_pages": 1000, "memslots_present": 32000,
                             "fault_4k_fresh_us": 4.5}, "kvm": None}
    assert isinstance(doc["model"]["fault_pages"], int)
    assert json.dumps(doc["model"]).startswith('{"fault_pages": 1000, "memslots_present": 32000,')


# --- explore --------------------------------------------------------------------------------


def test_explore_outcomes_in_hex_and_replay_names_the_file(tmp_path: Path) -> None:
    res = kvmmem("explore", RACE, "--arch", "x86", "--variant", "no-invalidate-retry",
                 "--replay-dir", str(tmp_path))
    assert res.exit_code == 3
    lines = res.stdout.splitlines()
    assert any("result=ok, value=0x5a5a5a5a" in ln for ln in lines), res.stdout
    assert not any("value=1515870810" in ln for ln in lines)
    hint = next(ln for ln in lines if ln.startswith("replay: "))
    assert hint.startswith(f"replay: kvmmem explore {RACE} --replay kx1.")
    token = hint.split()[-1]
    res = kvmmem("explore", RACE, "--replay", token, "--json")
    assert res.exit_code == 3
    doc = json.loads(res.stdout)
    outs = [o for steps in doc["outcomes"].values() for o in steps]
    assert any(o.get("value_hex") == "0x5a5a5a5a" for o in outs) or all(
        "value" not in o for o in outs)


def test_explore_determinism_says_what_it_compared() -> None:
    res = kvmmem("explore", RACE, "--arch", "x86", "--determinism", "3", "--max-executions",
                 "5", "--seed", "7")
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.stderr.splitlines() if ln.startswith("determinism: "))
    assert line.startswith("determinism: race-fault-vs-munmap x86 upstream: 3 random "
                           "schedules (seed 7) each run twice, the state fingerprint after "
                           "every one of ")
    assert line.endswith(" transitions compared: identical")


# --- conform: a missing file is one error, the others still run ------------------------------


def test_conform_reports_a_missing_file_and_goes_on(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The real side is replaced by a stub target (no /dev/kvm needed): the bundled
    quickstart agrees, the missing file is ``not ok`` with its one-line message,
    the totals count it as an error, exit 2."""
    import contextlib

    import kvmmem.conform as cf
    import kvmmem.realkvm as realkvm

    def agree(scenario: Any, path: str, target: Any = None) -> cf.Conformance:
        return cf.Conformance(scenario.name, scenario.source, path, "agree")

    class StubTarget:
        name = "host"
        release = "stub"

        def __init__(self, kvm: Any) -> None:
            pass

    monkeypatch.setattr(realkvm, "probe_kvm", lambda: None)
    monkeypatch.setattr(realkvm, "Kvm", contextlib.nullcontext)
    monkeypatch.setattr(cf, "HostTarget", StubTarget)
    monkeypatch.setattr(cf, "conform_scenario", agree)
    missing = str(tmp_path / "missing.yaml")
    res = kvmmem("conform", missing, QUICKSTART)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert res.stdout.splitlines() == [
        "TAP version 13", "1..2", f"not ok 1 - {missing}",
        f"# error: {missing}: no such file", "ok 2 - ro-vma-after-create",
        "# Totals: pass:1 fail:0 xfail:0 xpass:0 skip:0 error:1"]
    res = kvmmem("conform", QUICKSTART, missing, "--json")
    assert res.exit_code == 2
    first, second = json.loads(res.stdout)["results"]
    assert first["verdict"] == "agree"
    assert second == {"scenario": missing, "verdict": "error", "steps": [],
                      "reason": f"{missing}: no such file", "source": missing}


def test_events_name_the_errno(tmp_path: Path) -> None:
    """``--show events``: the failed fault's kvm_userspace_exit names EFAULT, not 0xe."""
    res = kvmmem("run", QUICKSTART, "--arch", "x86", "--show", "events")
    assert res.exit_code == 0
    line = next(ln for ln in res.stdout.splitlines() if "kvm_userspace_exit" in ln
                and "reason=error" in ln)
    assert "errno=EFAULT" in line and "0xe" not in line
